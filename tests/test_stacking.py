"""Stacked training: a configuration's restarts and draws trained as one model equal the same runs trained alone;
members fail alone; a killed stack resumes exactly; completed members are not trained again."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from mapa_exp.methods.loop import split_evenly as _split
from mapa_exp.runs.checkpoints import load_checkpoint_safely, save_checkpoint, slice_checkpoint
from mapa_exp.runs.training import run_job, run_training
from mapa_exp.sweeps.stacking import group_jobs
from tests.conftest import compose_cfg
from tests.test_reliability import RESUMABLE, cli, fault, results, run_cli, wait_for

METHODS = ["vae", "iwae", "mapa", "mapa_gt", "mapa_naive"]
SMOKE = ["experiment=paper_density_smoke", "trainer.max_epochs=3", "evaluate=false"]
MEMBERS = "[{seed:0,draw:0,num:0},{seed:0,draw:1,num:1},{seed:1,draw:0,num:2},{seed:1,draw:1,num:3}]"


def stacked_cfg(overrides: list[str], tmp_path: Path, cache_dir: Path):
    """A stacked job of four members (seeds 0, 1 x draws 0, 1), composed in-process; members under tmp/sweep."""
    return compose_cfg([*overrides, f"stack_members={MEMBERS}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                        "hydra.sweep.subdir=${hydra.job.num}_seed${seed}_draw${dataset.draw}"],
                       tmp_path / "stack", cache_dir)


def test_jobs_differing_only_in_seed_and_draw_are_grouped():
    jobs = [[f"method={m}", f"seed={s}", f"dataset.draw={d}"] for m in ("vae", "mapa") for s in (0, 1) for d in (0, 2)]
    jobs.append(["method=vae", "seed=x", "dataset.draw=0"])  # not an integer: not stacked on
    stacks = group_jobs(jobs, first_num=10)
    assert [s.overrides for s in stacks] == [["method=vae"], ["method=mapa"], ["method=vae", "seed=x"]]
    assert stacks[1].members == [{"num": 14, "seed": 0, "draw": 0}, {"num": 15, "seed": 0, "draw": 2},
                                 {"num": 16, "seed": 1, "draw": 0}, {"num": 17, "seed": 1, "draw": 2}]
    own = stacks[1].job_overrides("${hydra.job.num}_x_${seed}")
    assert own[:3] == ["method=mapa", "seed=0", "dataset.draw=0"]
    assert own[3] == "stack_members=[{seed:0,draw:0,num:14},{seed:0,draw:2,num:15},{seed:1,draw:0,num:16}," \
                     "{seed:1,draw:2,num:17}]"
    assert own[4] == "stack_subdir='\\${hydra.job.num}_x_\\${seed}'"  # kept unresolved for each member


@pytest.fixture(scope="module")
def stacked_smoke_sweep(tmp_path_factory, cache_dir):
    """`python train.py -m experiment=paper_density_smoke stack=true` at 3 epochs, through the CLI."""
    sweep = tmp_path_factory.mktemp("stacked") / "sweep"
    p = run_cli(["-m", *SMOKE, "stack=true", f"hydra.sweep.dir={sweep}"], cache_dir, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return sweep


def test_stacked_sweep_gives_one_run_folder_per_member(stacked_smoke_sweep):
    sweep = stacked_smoke_sweep
    members = sorted(d.name for d in sweep.iterdir() if d.is_dir() and d.name != "stacks")
    assert members == sorted(f"{i:04d}_spiral_{m}_S2_Kf0.5_seed{s}_draw{d}" for i, (m, s, d) in enumerate(
        (m, s, d) for m in METHODS for s in (0, 1) for d in (0, 1)))  # the folders of the unstacked sweep
    for name in members:
        run = sweep / name
        assert {"config.yaml", "metrics.csv", "results.json"} <= {f.name for f in run.iterdir()}
        assert (run / "checkpoints" / "last.ckpt").exists()
        res = results(run)
        assert res["status"] == "completed" and res["epochs"] == 3 and res["stack_size"] == 4
        seed, draw = int(name.split("seed")[1][0]), int(name.split("draw")[1])
        assert (res["seed"], res["draw"]) == (seed, draw)
    stacks = sorted((sweep / "stacks").iterdir())
    assert len(stacks) == 5
    for stack in stacks:
        info = json.loads((stack / "stack.json").read_text())
        assert info["status"] == "completed" and len(info["members"]) == 4
        assert not (stack / "results.json").exists()  # collect.py sees members only


@pytest.mark.parametrize("method", METHODS)
def test_a_member_equals_the_same_run_trained_alone(stacked_smoke_sweep, method, tmp_path, cache_dir):
    """seed 1, draw 1 of each stack, trained alone: the same final bounds to 1e-5 nats per point."""
    (member,) = stacked_smoke_sweep.glob(f"*_spiral_{method}_S2_Kf0.5_seed1_draw1")
    alone = run_training(compose_cfg([*SMOKE, f"method={method}", "method.S=2", "seed=1", "dataset.draw=1"],
                                     tmp_path / "alone", cache_dir))
    stacked = results(member)
    for key in ("train_bound", "val_bound"):
        assert abs(stacked[key] - alone[key]) <= 1e-5, (key, stacked[key], alone[key])
    assert stacked["passes_decoder_total"] == alone["passes_decoder_total"]


@pytest.mark.slow  # 3-8 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_nan_in_one_member_fails_it_and_leaves_the_others_as_without_the_fault(tmp_path, cache_dir):
    base = ["dataset=spiral", "method=mapa", *RESUMABLE[1:6], "trainer.max_epochs=3",
            "trainer.enable_progress_bar=false"]
    clean = run_job(stacked_cfg(base, tmp_path / "clean", cache_dir))
    poisoned = run_job(stacked_cfg([*base, *fault("poison", "PoisonBatch", steps=[4], member=2)],
                                   tmp_path / "poisoned", cache_dir))
    assert [r["status"] for r in poisoned] == ["completed", "completed", "failed", "completed"]
    assert "non-finite loss at step 4" in poisoned[2]["reason"] and "seed=1 draw=0" in poisoned[2]["reason"]
    assert json.loads(Path(poisoned[2]["run_dir"], "results.json").read_text())["status"] == "failed"
    for e in (0, 1, 3):
        for key in ("train_bound", "val_bound", "passes_decoder_total"):
            assert poisoned[e][key] == clean[e][key], (e, key)
    info = json.loads((tmp_path / "poisoned" / "stack" / "stack.json").read_text())
    assert info["status"] == "failed"


def test_skip_batch_skips_one_members_step_only(tmp_path, cache_dir):
    base = ["dataset=spiral", "method=vae", *RESUMABLE[1:6], "trainer.max_epochs=2", "nan_policy=skip_batch",
            "trainer.enable_progress_bar=false"]
    res = run_job(stacked_cfg([*base, *fault("grad", "PoisonGradient", steps=[3, 5], member=1)], tmp_path, cache_dir))
    assert [r["status"] for r in res] == ["completed"] * 4
    assert [r["skipped_batches"] for r in res] == [0, 2, 0, 0]


def test_chunks_cover_every_member_once_in_sizes_that_differ_by_at_most_one():
    """The step loop's chunks (of members, or of a member's points): a partition of range(total) into the fewest
    pieces of at most ``most``, none of size 1 beside larger ones (a compiled step would trace a second graph)."""
    for total in range(1, 61):
        for most in range(1, 70):
            pieces = _split(total, most)
            assert [i for p in pieces for i in range(total)[p]] == list(range(total))
            sizes = [p.stop - p.start for p in pieces]
            assert len(pieces) == -(-total // most) and max(sizes) <= most and max(sizes) - min(sizes) <= 1
    assert [p.stop - p.start for p in _split(25, 12)] == [8, 8, 9]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile on the CPU needs a C++ compiler (g++ or $CXX); none on this machine")
@pytest.mark.parametrize("method", ["iwae", "mapa"])
def test_compiled_steps_train_a_stack_as_the_eager_steps_do(method, tmp_path, cache_dir):
    """compile=true (inductor's fused kernels, one graph for every member chunk) against torch's eager kernels:
    the same bounds to 1e-5 nats per point after 3 epochs, the same passes."""
    base = [*SMOKE, f"method={method}", "method.S=10"]
    eager = run_job(stacked_cfg(base, tmp_path / "eager", cache_dir))
    compiled = run_job(stacked_cfg([*base, "compile=true"], tmp_path / "compiled", cache_dir))
    assert [r["status"] for r in compiled] == ["completed"] * 4
    for e, c in zip(eager, compiled):
        for key in ("train_bound", "val_bound"):
            assert abs(c[key] - e[key]) <= 1e-5, (key, c[key], e[key])
        assert c["passes_decoder_total"] == e["passes_decoder_total"]


@pytest.mark.slow
def test_sigkill_of_a_stacked_job_then_rerun_resumes_to_equal_bounds(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    args = ["-m", *RESUMABLE, "method=mapa", "seed=0,1", "dataset.draw=0,1", "stack=true", "evaluate=false",
            *fault("slow", "SlowEpochs", seconds=0.1), f"hydra.sweep.dir={sweep}"]
    proc = cli(args, cache_dir)
    wait_for(sweep / "stacks" / "0000_spiral_mapa" / "checkpoints" / "last.ckpt", proc)
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    runs = sorted(d for d in sweep.iterdir() if d.is_dir() and d.name != "stacks")
    assert len(runs) == 4 and all(results(r)["status"] == "running" for r in runs)
    killed_at = load_checkpoint_safely(sweep / "stacks" / "0000_spiral_mapa" / "checkpoints" / "last.ckpt")["epoch"]
    assert killed_at < 11

    again = run_cli(args, cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    reference = run_job(stacked_cfg([*RESUMABLE, "method=mapa", "trainer.enable_progress_bar=false"],
                                    tmp_path / "reference", cache_dir))
    for run, ref in zip(runs, reference):
        res = results(run)
        assert res["status"] == "completed" and res["resumed_from_epoch"] == killed_at + 1
        assert (res["seed"], res["draw"]) == (ref["seed"], ref["draw"])
        assert res["train_bound"] == ref["train_bound"] and res["val_bound"] == ref["val_bound"]
        assert (run / "metrics.csv").read_text() == (Path(ref["run_dir"]) / "metrics.csv").read_text()


@pytest.mark.slow  # 3-8 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_a_members_slice_of_the_stack_checkpoint_resumes_alone_to_the_stacks_numbers(tmp_path, cache_dir):
    """The slice is a complete checkpoint: member 2 continued alone from epoch 2 ends where the stack ends."""
    base = ["dataset=spiral", "method=iwae", *RESUMABLE[1:6], "trainer.enable_progress_bar=false"]
    run_job(stacked_cfg([*base, "trainer.max_epochs=2"], tmp_path / "two", cache_dir))
    four = run_job(stacked_cfg([*base, "trainer.max_epochs=4"], tmp_path / "four", cache_dir))
    ckpt = load_checkpoint_safely(tmp_path / "two" / "stack" / "checkpoints" / "last.ckpt")
    alone_dir = tmp_path / "alone"
    save_checkpoint(slice_checkpoint(ckpt, [2]), alone_dir / "checkpoints" / "last.ckpt")
    res = run_training(compose_cfg([*base, "trainer.max_epochs=4", "seed=1", "dataset.draw=0"], alone_dir, cache_dir))
    assert res["resumed_from_epoch"] == 2
    assert abs(res["train_bound"] - four[2]["train_bound"]) < 1e-5
    assert abs(res["val_bound"] - four[2]["val_bound"]) < 1e-5


@pytest.mark.slow  # 3-8 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_rerun_of_a_finished_stack_trains_nothing(tmp_path, cache_dir, monkeypatch):
    base = ["dataset=spiral", "method=mapa_naive", *RESUMABLE[1:6], "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false"]
    first = run_job(stacked_cfg(base, tmp_path, cache_dir))

    def must_not_train(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr("lightning.Trainer.fit", must_not_train)
    assert run_job(stacked_cfg(base, tmp_path, cache_dir)) == first


def test_member_checkpoint_is_a_plain_one_member_checkpoint(tmp_path, cache_dir):
    base = ["dataset=spiral", "method=mapa", *RESUMABLE[1:6], "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false"]
    res = run_job(stacked_cfg(base, tmp_path, cache_dir))
    stack = load_checkpoint_safely(tmp_path / "stack" / "checkpoints" / "last.ckpt")
    member = load_checkpoint_safely(Path(res[3]["run_dir"]) / "checkpoints" / "last.ckpt")
    for k, v in stack["state_dict"].items():
        assert torch.equal(member["state_dict"][k], v[3:4] if v.dim() else v), k
    assert len(json.loads(member["run_identity"])) == 1


CONF_METHODS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "method").glob("*.yaml"))


@pytest.mark.parametrize("method", [m for m in CONF_METHODS if m not in METHODS])
def test_every_other_method_member_equals_the_same_run_trained_alone(method, tmp_path, cache_dir):
    """Every method of conf/method/ beyond the smoke sweep's (e.g. a scheme whose members step unequally):
    member seed 1, draw 1 of a stack of four equals the run alone to 1e-5 nats per point, passes included."""
    base = [*SMOKE, f"method={method}", "method.S=2"]
    stacked = run_job(stacked_cfg(base, tmp_path / "stack", cache_dir))
    alone = run_training(compose_cfg([*base, "seed=1", "dataset.draw=1"], tmp_path / "alone", cache_dir))
    member = next(r for r in stacked if (r["seed"], r["draw"]) == (1, 1))
    assert member["status"] == alone["status"] == "completed"
    for key in ("train_bound", "val_bound"):
        assert abs(member[key] - alone[key]) <= 1e-5, (key, member[key], alone[key])
    assert member["passes_decoder_total"] == alone["passes_decoder_total"]
    assert member["train_steps"] == alone["train_steps"]
