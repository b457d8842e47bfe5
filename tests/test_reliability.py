"""Reliability: exact resume after SIGKILL / SIGTERM, the NaN policy, multirun failures, safe checkpoints, secrets.

Faults are injected from outside the package: signals sent to a training subprocess, and the callbacks
below (added with ``+callbacks.<name>=...`` on the command line, or in-process) that slow epochs down,
poison a batch or a gradient.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from mapa_exp.runs.training import RunFailed, run_training
from tests.conftest import ROOT, compose_cfg


# -- fault injectors (importable as tests.test_reliability.<Name> from a training subprocess) ----------
class SlowEpochs(Callback):
    """Sleeps at the end of every training epoch, so that a signal lands mid-training (no RNG use)."""

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module):
        time.sleep(self.seconds)


class PoisonBatch(Callback):
    """Puts a NaN into the observations of the training batches at the given global steps (of ``member`` only,
    or of every member of a stack)."""

    def __init__(self, steps: list[int], member: int | None = None):
        self.steps, self.member = set(steps), member

    def on_train_step_start(self, trainer, pl_module, batch):
        if trainer.global_step in self.steps:
            batch["x"][slice(None) if self.member is None else self.member, 0, 0] = float("nan")


class PoisonGradient(Callback):
    """Sets one gradient entry of the decoder to +inf after the backward pass at the given global steps (the loss
    stays finite), of ``member`` (default 0)."""

    def __init__(self, steps: list[int], member: int = 0):
        self.steps, self.member = set(steps), member

    def on_after_step_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            pl_module.decoder.params.grad[self.member, 0] = float("inf")


class SendSignal(Callback):
    """Sends ``signum`` to this very process at the start of the given epoch (an in-process preemption)."""

    def __init__(self, signum: str, at_epoch: int):
        self.signum, self.at_epoch = signal.Signals[signum], at_epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at_epoch:
            os.kill(os.getpid(), self.signum)


class SigintAtFitEnd(Callback):
    """Sends SIGINT to this process once training is over (a Ctrl-C while the results are written)."""

    def on_fit_end(self, trainer, pl_module):
        os.kill(os.getpid(), signal.SIGINT)


def fault(name: str, target: str, **kwargs) -> list[str]:
    """Command-line overrides that add a fault-injecting callback from this module."""
    out = [f"+callbacks.{name}._target_=tests.test_reliability.{target}"]
    for k, v in kwargs.items():
        out.append(f"+callbacks.{name}.{k}={json.dumps(v) if isinstance(v, list) else v}")
    return out


# -- shared set-up -------------------------------------------------------------------------------------
# long enough to be killed mid-training (6 batches x 12 epochs), small enough to run in seconds
RESUMABLE = [
    "dataset=spiral", "dataset.n_train=600", "dataset.n_val=100", "dataset.n_test=100",
    "dataset.surrogate.steps=300", "dataset.surrogate.n_fit=512",
    "trainer.max_epochs=12", "trainer.check_val_every_n_epoch=3", "trainer.log_every_n_steps=2",
    "trainer.enable_progress_bar=false",
]
FAST_NAN = [  # a few steps are enough to hit a poisoned one
    "dataset=spiral", "method=mapa", "dataset.n_train=200", "dataset.n_val=100", "dataset.n_test=100",
    "dataset.surrogate.steps=300", "dataset.surrogate.n_fit=512", "trainer.max_epochs=4",
    "trainer.check_val_every_n_epoch=2", "trainer.enable_progress_bar=false",
]
COMPARED = ("status", "epochs", "train_bound", "val_bound", "passes_encoder_total", "passes_decoder_total",
            "train_steps", "skipped_batches", "passes_per_point_decoder")


def cli(args: list[str], cache_dir: Path, env: dict | None = None, **kw):
    env = {**os.environ, "MAPA_EXP_CACHE": str(cache_dir), **(env or {})}
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def run_cli(args: list[str], cache_dir: Path, env: dict | None = None, timeout: float = 120):
    p = cli(args, cache_dir, env)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def metrics_rows(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Final metrics, weights, optimiser state and the per-step metrics of two run folders are equal.

    Every metrics row is written before the checkpoint that covers it (mapa_exp.runs.callbacks.MemberLogging),
    so a SIGKILL loses none of them.
    """
    a, b = results(resumed), results(reference)
    assert {k: a.get(k) for k in COMPARED} == {k: b.get(k) for k in COMPARED}
    ca, cb = checkpoint(resumed), checkpoint(reference)
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for k in cb["state_dict"]:
        assert torch.equal(ca["state_dict"][k], cb["state_dict"][k]), k
    for sa, sb in zip(ca["optimizer_states"][0]["state"].values(), cb["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sb)
    assert metrics_rows(resumed) == metrics_rows(reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """Uninterrupted runs (in-process) of the set-ups that the kill tests interrupt, by method."""
    out = {}
    for method in ("mapa", "iwae"):
        run_dir = tmp_path_factory.mktemp("reference") / method
        cfg = compose_cfg([*RESUMABLE, f"method={method}"], run_dir, cache_dir)
        assert run_training(cfg)["status"] == "completed"
        out[method] = run_dir
    return out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


# -- 1. exact resume -------------------------------------------------------------------------------
@pytest.mark.slow  # 10-60 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, cache_dir, reference):
    """SIGKILL right after the first checkpoint; the same command again resumes and ends bit-identical."""
    run_dir = tmp_path / "run"
    args = [*RESUMABLE, "method=mapa", *fault("slow", "SlowEpochs", seconds=0.1), f"hydra.run.dir={run_dir}"]
    proc = cli(args, cache_dir)
    wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert results(run_dir)["status"] == "running"  # killed mid-training, not after it
    killed_at = checkpoint(run_dir)["epoch"]
    assert killed_at < 11

    again = run_cli(args, cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    res = results(run_dir)
    assert res["status"] == "completed" and res["resumed_from_epoch"] == killed_at + 1
    assert_same_run(run_dir, reference["mapa"])


@pytest.mark.slow  # 10-60 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_sigterm_stops_after_a_checkpoint_and_the_printed_command_resumes_exactly(tmp_path, cache_dir, reference):
    """SIGTERM (how SLURM preempts): finish the epoch, checkpoint, keep the best weights so far, exit 143 with status
    preempted and print the command that resumes -- the run folder was not pinned on the command line, so the same
    command alone would start over -- and that command resumes exactly, saying so."""
    import shlex

    outputs = tmp_path / "outputs"
    args = [*RESUMABLE, "method=iwae", *fault("slow", "SlowEpochs", seconds=0.1)]
    proc = cli(args, cache_dir, env={"MAPA_EXP_OUTPUTS": str(outputs)})
    deadline = time.monotonic() + 60
    while not list(outputs.glob("runs/*/*/checkpoints/last.ckpt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    *_, stopped, resume = err.strip().splitlines()
    assert stopped.startswith("preempted: SIGTERM received")
    assert resume.startswith("resume with: python train.py ")
    command = shlex.split(resume[len("resume with: "):])
    assert command[2:-1] == args and command[-1].startswith("hydra.run.dir=")
    run_dir = Path(command[-1].partition("=")[2])
    res = results(run_dir)
    assert res["status"] == "preempted" and res["signal"] == signal.SIGTERM and "to resume" in res["reason"]
    assert res["pid"] == proc.pid  # whose stop it is (a later attempt never hands it to SLURM again)
    assert checkpoint(run_dir)["epoch"] == res["epochs"] - 1 < 11  # the checkpoint is of the last epoch run
    assert (run_dir / "checkpoints" / "best.ckpt").exists()  # the validations done so far are not lost

    again = run_cli(command[2:], cache_dir, env={"MAPA_EXP_OUTPUTS": str(outputs)})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {run_dir} from checkpoints/last.ckpt: {res['epochs']} epoch(s) done" in again.stdout + again.stderr
    assert results(run_dir)["resumed_from_epoch"] == res["epochs"]
    assert len(list(outputs.glob("runs/*/*/results.json"))) == 1  # no second run folder
    assert_same_run(run_dir, reference["iwae"])


@pytest.mark.parametrize("status_file", ["results.json", "stack.json"])
def test_only_the_attempt_that_was_preempted_requeues_itself(tmp_path, status_file):
    """A job hands its preemption to submitit (which requeues it) only when this process stopped on the signal:
    a requeued attempt that fails before training (a busy folder, a bad checkpoint) must fail, not read the
    first attempt's ``preempted`` and requeue itself again and again (the sweep would never end)."""
    from mapa_exp.sweeps.launchers import hand_back_signal

    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        for pid, handed in ((os.getpid() + 1, False), (os.getpid(), True)):
            (tmp_path / status_file).write_text(json.dumps({"status": "preempted", "signal": int(signal.SIGUSR2),
                                                            "pid": pid}))
            assert hand_back_signal(tmp_path) is handed
        (tmp_path / status_file).write_text(json.dumps({"status": "failed", "pid": os.getpid()}))
        assert hand_back_signal(tmp_path) is False
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [signal.SIGUSR2]


@pytest.mark.slow
def test_sigint_interrupts_after_a_checkpoint_and_rerun_equals_an_uninterrupted_run(tmp_path, cache_dir, reference):
    """Ctrl-C: finish the epoch, checkpoint, exit 130 with status interrupted (not failed); resume exactly."""
    run_dir = tmp_path / "run"
    args = [*RESUMABLE, "method=mapa", *fault("slow", "SlowEpochs", seconds=0.1), f"hydra.run.dir={run_dir}"]
    # SIGINT as the shell's Ctrl-C would deliver it, also when this test runs with SIGINT ignored (nohup, &)
    proc = cli(args, cache_dir, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-2].startswith("interrupted: ")
    assert err.strip().splitlines()[-1].startswith("resume with: python train.py ")
    assert err.strip().splitlines()[-1].endswith(f"hydra.run.dir={run_dir.resolve()}")
    res = results(run_dir)
    assert res["status"] == "interrupted" and res["signal"] == signal.SIGINT and "to resume" in res["reason"]
    assert checkpoint(run_dir)["epoch"] == res["epochs"] - 1 < 11
    # an interrupted run keeps its best weights once a validation ran (every 3 epochs here), and has none before
    assert (run_dir / "checkpoints" / "best.ckpt").exists() == (res["epochs"] >= 3), res["epochs"]

    again = run_cli(args, cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert results(run_dir)["resumed_from_epoch"] == res["epochs"]
    assert_same_run(run_dir, reference["mapa"])


@pytest.mark.slow  # 10-60 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_sigint_after_the_epochs_gives_the_resume_command_and_the_rerun_completes(tmp_path, cache_dir):
    """Ctrl-C once the epochs are over (results being written): the two lines and exit 130, no traceback; the
    printed command then finishes the run without training again."""
    run_dir = tmp_path / "run"
    args = [*RESUMABLE, "method=vae", "trainer.max_epochs=2", *fault("late", "SigintAtFitEnd"),
            f"hydra.run.dir={run_dir}"]
    import shlex

    p = cli(args, cache_dir, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert lines[-2].startswith("interrupted: ") and lines[-1].startswith("resume with: python train.py ")
    command = shlex.split(lines[-1][len("resume with: "):])
    again = run_cli([a for a in command[2:] if "SigintAtFitEnd" not in a and not a.startswith("+callbacks.late")],
                    cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    res = results(run_dir)
    assert res["status"] == "completed" and res["epochs"] == 2


def test_two_preemptions_by_sigusr2_then_completion_equal_an_uninterrupted_run(tmp_path, cache_dir, reference):
    """In-process: SIGUSR2 at epoch 2, then again at epoch 7 of the resumed run; the third attempt completes."""
    run_dir = tmp_path / "run"
    for at_epoch, expected in ((2, "preempted"), (7, "preempted"), (None, "completed")):
        extra = fault("usr2", "SendSignal", signum="SIGUSR2", at_epoch=at_epoch) if at_epoch is not None else []
        res = run_training(compose_cfg([*RESUMABLE, "method=mapa", *extra], run_dir, cache_dir))
        assert res["status"] == expected
        if at_epoch is not None:
            assert res["signal"] == signal.SIGUSR2 and res["epochs"] == at_epoch + 1
    assert res["resumed_from_epoch"] == 8
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # handlers are given back after training
    assert_same_run(run_dir, reference["mapa"])


def test_rerun_of_a_completed_run_returns_its_results_without_training(tmp_path, cache_dir, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = compose_cfg(FAST_NAN, run_dir, cache_dir)
    first = run_training(cfg)

    def must_not_train(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr("lightning.Trainer.fit", must_not_train)
    assert run_training(compose_cfg(FAST_NAN, run_dir, cache_dir)) == first


# -- 2. NaN policy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("poison, what", [("PoisonBatch", "non-finite loss"),
                                          ("PoisonGradient", "non-finite gradient of")])
def test_nan_policy_fail_stops_with_one_line_naming_the_run(poison, what, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    cfg = compose_cfg([*FAST_NAN, "seed=7", *fault("poison", poison, steps=[3])], run_dir, cache_dir)
    with pytest.raises(RunFailed) as info:
        run_training(cfg)
    line = str(info.value)
    assert "\n" not in line
    for part in (what, "at step 3", "method=mapa", "dataset=spiral", "seed=7"):
        assert part in line
    res = results(run_dir)
    assert res["status"] == "failed" and res["reason"] == line


def test_nan_policy_skip_batch_skips_the_optimizer_step_and_counts_it(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    cfg = compose_cfg([*FAST_NAN, "nan_policy=skip_batch", *fault("poison", "PoisonBatch", steps=[1, 4]),
                       *fault("grad", "PoisonGradient", steps=[6])], run_dir, cache_dir)
    res = run_training(cfg)
    assert res["status"] == "completed" and res["skipped_batches"] == 3
    assert math.isfinite(res["train_bound"]) and math.isfinite(res["val_bound"])
    ckpt = checkpoint(run_dir)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    # Adam stepped only on the clean batches
    steps = {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert steps == {res["train_steps"] - 3}


@pytest.mark.slow  # 10-60 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_nan_failure_on_the_command_line_is_one_line_and_exit_1(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    p = run_cli([*FAST_NAN, *fault("poison", "PoisonBatch", steps=[2]), f"hydra.run.dir={run_dir}"], cache_dir)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert [l for l in lines if l.startswith("error:")] == [lines[-1]]
    assert lines[-1].startswith("error: non-finite loss at step 2") and "method=mapa dataset=spiral seed=0" in lines[-1]
    assert "Traceback" not in p.stderr
    assert results(run_dir)["status"] == "failed"


@pytest.mark.slow  # 10-60 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_multirun_keeps_going_past_failed_jobs_and_exits_non_zero(tmp_path, cache_dir):
    """4 jobs: a NaN failure, two bad inputs and one that skips its NaN batch; every job leaves results."""
    sweep = tmp_path / "sweep"
    p = run_cli(["-m", *FAST_NAN, "nan_policy=fail,skip_batch", "method.K=5,0",
                 *fault("poison", "PoisonBatch", steps=[1]), f"hydra.sweep.dir={sweep}"], cache_dir)
    assert p.returncode == 2, p.stderr[-3000:]  # the worst job: bad input
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 4 and "3 job(s) of the multirun failed" in errors[-1]
    assert "Traceback" not in p.stderr
    found = {}
    for path in sweep.rglob("results.json"):
        res = json.loads(path.read_text())
        cfg = (path.parent / "config.yaml").read_text()
        found[("skip_batch" if "nan_policy: skip_batch" in cfg else "fail", res.get("K"))] = res
    assert {k: v["status"] for k, v in found.items()} == {
        ("fail", 5): "failed", ("fail", 0): "failed", ("skip_batch", 5): "completed", ("skip_batch", 0): "failed"}
    assert found[("skip_batch", 5)]["skipped_batches"] == 1
    assert "non-finite loss at step 1" in found[("fail", 5)]["reason"]
    assert "method.K=0" in found[("fail", 0)]["reason"]


# -- 5. safe loading, no secrets -------------------------------------------------------------------------
def test_checkpoint_is_plain_data_and_resume_loads_it_weights_only(tmp_path, cache_dir, monkeypatch):
    run_dir = tmp_path / "run"
    run_training(compose_cfg(FAST_NAN, run_dir, cache_dir))
    ckpt = checkpoint(run_dir)  # weights_only=True: no pickled objects inside
    assert {"state_dict", "optimizer_states", "GroundTruthDataModule", "run_identity"} <= ckpt.keys()
    assert all(g.dtype == torch.uint8 for g in ckpt["GroundTruthDataModule"]["data_generators"])  # the RNG states
    assert "hyper_parameters" not in ckpt  # the modules never call save_hyperparameters
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    res = run_training(compose_cfg([*FAST_NAN, "trainer.max_epochs=5"], run_dir, cache_dir))  # one epoch more
    assert res["status"] == "completed" and res["resumed_from_epoch"] == 4 and res["epochs"] == 5
    assert calls and all(w is True for w in calls)


SECRET = "fake0secret0key0" + "3f9a1c7e5b2d4f6a8c0e" * 2


@pytest.mark.slow
def test_no_secret_reaches_any_file_of_the_run_folder(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    p = run_cli([*FAST_NAN, "logger=wandb", f"hydra.run.dir={run_dir}"], cache_dir,
                env={"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert p.returncode == 0, p.stderr[-3000:]
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    names = {f.name for f in files}
    assert {"config.yaml", "results.json", "train.log", "metrics.csv", "last.ckpt"} <= names
    assert any(f.suffix == ".wandb" for f in files), "no W&B offline run was written"
    assert (run_dir / ".hydra" / "config.yaml").exists()
    for f in files:
        data = f.read_bytes()
        assert SECRET.encode() not in data and SECRET[-20:].encode() not in data, f
    assert SECRET not in p.stdout + p.stderr
