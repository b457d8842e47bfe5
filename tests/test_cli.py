"""The command lines a newcomer types: bad input refused in one line before anything is touched, an
interrupted sweep evaluation that keeps what it finished and resumes, and the end-of-run lines.

Each bad input runs through the real ``train.py`` / ``evaluate.py`` (a subprocess each, several at a time),
pointed at a completed and evaluated run folder: the line, the exit status and the bytes of every file of
that folder are checked, and no new run folder may appear.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mapa_exp.evaluation.estimators import QuadratureEstimator
from mapa_exp.evaluation.evaluate import evaluate_run
from mapa_exp.runs.training import run_training
from tests.conftest import FAST, ROOT, compose_cfg


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, cache_dir):
    """A sweep folder with two completed MAPA runs; the first one evaluated (quadrature)."""
    sweep = tmp_path_factory.mktemp("sweep")
    runs = []
    for seed in (0, 1):
        run_dir = sweep / f"000{seed}_spiral_mapa"
        assert run_training(compose_cfg([*FAST, f"seed={seed}"], run_dir, cache_dir))["status"] == "completed"
        runs.append(run_dir)
    evaluate_run(runs[0], {"quadrature": QuadratureEstimator(J_1d=1000)}, cache_dir=str(cache_dir))
    return sweep, runs


@pytest.fixture(scope="module")
def broken(evaluated, tmp_path_factory):
    """Copies of the completed run without its best checkpoint and with a truncated one, and a regular file."""
    import shutil

    _, runs = evaluated
    root = tmp_path_factory.mktemp("broken")
    nobest, truncated = root / "nobest", root / "truncated"
    for folder in (nobest, truncated):
        shutil.copytree(runs[1], folder)
    (nobest / "checkpoints" / "best.ckpt").unlink()
    data = (truncated / "checkpoints" / "best.ckpt").read_bytes()
    (truncated / "checkpoints" / "best.ckpt").write_bytes(data[: len(data) // 2])
    (root / "a_file").write_text("not a folder\n")
    return {"nobest": nobest, "truncated": truncated, "file": root / "a_file"}


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


# (id, script, arguments, what the one line must start with after "error: ", a phrase it must hold);
# {run} and {sweep} are the fixture's folders. Every issue-12 case is here, with more of the same kinds.
CASES = [
    ("misspelt trainer key", "train", ["trainer.max_epoch=5"], "trainer.max_epoch=5", "did you mean trainer.max_epochs"),
    ("misspelt key added with +", "train", ["+method.bandwith=0.02"], "method.bandwith=0.02",
     "did you mean method.bandwidth"),
    ("mistyped _target_", "train", ["dataset.f._target_=mapa_exp.data.analytic.spiral_dot"], "dataset.f._target_=",
     "did you mean mapa_exp.data.analytic.spiral_dots"),
    ("unquoted ~ in a path", "train", ["dataset=file", "dataset.path=~/data.npz"], "dataset.path=",
     "quote the value"),
    ("unbounded training", "train", ["trainer.max_epochs=-1"], "trainer.max_epochs=-1", "max_time"),
    ("zero epochs", "train", ["trainer.max_epochs=0"], "trainer.max_epochs=0", ">= 1"),
    ("S not a number", "train", ["method.S=abc"], "method.S='abc'", "must be an integer"),
    ("misspelt group", "train", ["datset=spiral"], "datset=", "did you mean dataset"),
    ("unknown group option", "train", ["method=mapaa"], "method='mapaa'", "iwae, mapa, mapa_gt"),
    ("evaluate not a bool", "train", ["evaluate=maybe"], "evaluate='maybe'", "true or false"),
    ("compile not a bool", "train", ["compile=sometimes"], "compile='sometimes'", "true or false"),
    ("batch size a word", "train", ["data.batch_size=ten"], "data.batch_size='ten'", "must be an integer"),
    ("misspelt method key", "train", ["method=vae", "method.estimatr=stl"], "method.estimatr=",
     "did you mean method.estimator"),
    ("a Trainer option the step loop ignores", "train", ["+trainer.gradient_clip_val=1.0"],
     "trainer.gradient_clip_val=", "no such key"),
    ("n_train not an integer", "train", ["dataset.n_train=1e3"], "dataset.n_train=", "must be an integer"),
    ("batch limit below zero", "train", ["trainer.limit_train_batches=-2"], "trainer.limit_train_batches=-2",
     "must be null"),
    ("sweep= on a run folder", "evaluate", ["sweep={run}"], "sweep=", "is a run folder; use run="),
    ("run= on a sweep folder", "evaluate", ["run={sweep}"], "run=", "is a sweep folder; use sweep="),
    ("estimator setting a word", "evaluate", ["run={run}", "evaluator.quadrature.J_1d=many"],
     "evaluator.quadrature.J_1d='many'", "must be an integer"),
    ("misspelt estimator key", "evaluate", ["run={run}", "+evaluator.quadrature.J1d=100"],
     "evaluator.quadrature.J1d=100", "did you mean evaluator.quadrature.J_1d"),
    ("unknown checkpoint", "evaluate", ["run={run}", "eval_checkpoint=middle"], "eval_checkpoint='middle'",
     "best or last"),
    # what a new user hit in one afternoon (issue 23), by item
    ("1: an empty sweep=", "evaluate", ["sweep="], "sweep=''", "is empty"),
    ("1: an empty run=", "evaluate", ["run="], "run=''", "is empty"),
    ("3: a second writer of a run folder", "train", [], "hydra.run.dir=", "is being written by pid"),
    ("3: a second sweep into a sweep folder", "train", ["-m", "hydra.sweep.dir={sweep}"], "hydra.sweep.dir=",
     "is being written by pid"),
    ("4: the best checkpoint is missing", "evaluate", ["run={nobest}"], "run=", "has no checkpoints/best.ckpt"),
    ("4: a truncated best checkpoint", "evaluate", ["run={truncated}"], "run=", "cannot be loaded"),
    ("5: an output folder that cannot be written", "train", ["hydra.run.dir=/proc/mapa-exp-run"], "hydra.run.dir=",
     "cannot be written"),
    ("5: an output folder under a regular file", "train", ["hydra.run.dir={file}/run"], "hydra.run.dir=",
     "is a file, not a folder"),
    ("5: a sweep folder under a regular file", "train", ["-m", "hydra.sweep.dir={file}/sweep"], "hydra.sweep.dir=",
     "is a file, not a folder"),
    ("5: the SLURM launcher without SLURM", "train", ["-m", "hydra/launcher=slurm"], "hydra/launcher='slurm'",
     "sbatch is not on PATH"),
    ("10: stack=true without -m", "train", ["stack=true"], "stack='true'", "add -m"),
    ("10: the example of conf/local is not a group", "train", ["local.example=default"], "local.example=",
     "no such key"),
    ("a prior map that is no map", "evaluate", ["run={run}", "prior_recovery.bins=[null,1]"],
     "prior_recovery.bins=1", "integer >= 2"),
    ("a prior map that is no map, at training", "train", ["evaluate=true", "prior_recovery.bins=7x"],
     "prior_recovery.bins='7x'", "integer >= 2"),
]


@pytest.mark.slow  # 10-60 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_bad_inputs_stop_in_one_line_with_status_2_and_touch_nothing(evaluated, broken, tmp_path, cache_dir):
    from mapa_exp.io import FolderLock

    sweep, runs = evaluated
    outputs = tmp_path / "outputs"
    no_slurm = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                               if not (Path(d) / "sbatch").exists())
    env = {**os.environ, "MAPA_EXP_OUTPUTS": str(outputs), "MAPA_EXP_CACHE": str(cache_dir), "PATH": no_slurm}
    folders = {"run": runs[0], "sweep": sweep, **broken}
    watched = [sweep, broken["nobest"], broken["truncated"]]
    with FolderLock([runs[0], sweep], "test", "written"):  # this process writes them: every other is refused
        before = [snapshot(f) for f in watched]
        procs = []
        for case in CASES:
            name, script, args, _, _ = case
            args = [a.format(**folders) for a in args]
            if script == "train" and not any(a.startswith("hydra.run.dir=") for a in args):
                args.append(f"hydra.run.dir={runs[0]}")  # aimed at the completed run: a resume would rewrite it
            procs.append((case, subprocess.Popen([sys.executable, f"{script}.py", *args], cwd=ROOT, env=env,
                                                 text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
            if len(procs) % 4 == 0:  # a few at a time: the machine has 2 cores
                procs[-4][1].wait(timeout=120)
        for (name, _, _, start, phrase), proc in procs:
            _, err = proc.communicate(timeout=120)
            lines = err.strip().splitlines()
            assert proc.returncode == 2, (name, err[-2000:])
            assert len(lines) == 1, (name, err[-2000:])
            assert lines[0].startswith(f"error: {start}") and phrase in lines[0], (name, lines[0])
        assert [snapshot(f) for f in watched] == before  # no results.json, eval.json, checkpoint or log changed
    assert not outputs.exists() or not any(outputs.rglob("*"))  # and no run, sweep or evaluation folder was made
    assert not Path("/proc/mapa-exp-run").exists()


@pytest.fixture
def read_only(evaluated, tmp_path):
    """A copy of the evaluated sweep seen through a read-only bind mount (EROFS: the root user, who passes every
    permission check, cannot write it either); skipped where mounting is not allowed."""
    import shutil

    source, mount = tmp_path / "source", tmp_path / "read_only"
    shutil.copytree(evaluated[0], source / "sweep")
    mount.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow  # 3-8 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_a_read_only_mount_is_refused_in_one_line_before_any_work(read_only, tmp_path, cache_dir):
    """Item 5 of the new-user issue: an output folder on a read-only mount; also an evaluation whose eval.json
    could not be written (it used to score the run, then end in an OSError traceback, exit 1)."""
    sweep = read_only / "sweep"
    run = sorted(p.parent for p in sweep.rglob("results.json"))[0]
    outputs = tmp_path / "outputs"
    env = {**os.environ, "MAPA_EXP_OUTPUTS": str(outputs), "MAPA_EXP_CACHE": str(cache_dir)}
    before = snapshot(read_only)
    for script, args, start in (("train", [f"hydra.run.dir={read_only}/run"], "hydra.run.dir="),
                                ("train", ["-m", f"hydra.sweep.dir={read_only}/sweep2"], "hydra.sweep.dir="),
                                ("evaluate", [f"run={run}"], f"run='{run}'"),
                                ("evaluate", [f"sweep={sweep}"], "sweep=")):
        proc = subprocess.run([sys.executable, f"{script}.py", *args], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (args, proc.stderr[-2000:])
        assert lines[0].startswith(f"error: {start}") and "cannot be written (Read-only file system" in lines[0]
    assert snapshot(read_only) == before
    assert not outputs.exists() or not any(outputs.rglob("*"))


@pytest.mark.slow  # 3-8 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_the_command_line_is_checked_without_loading_torch(evaluated):
    """The pre-check reads ``_target_``s from the modules' source and the folders from the disk: good command lines
    and a bad folder are decided before torch or Lightning is imported (each would cost seconds); a misspelt
    ``_target_`` still gets its hint (that error path may import the module)."""
    _, runs = evaluated
    probe = ("import sys\nfrom mapa_exp.cli import _check\nfrom mapa_exp.errors import ConfigError\n"
             "def run(name, argv):\n    try:\n        _check(name, argv)\n        return 'ok'\n"
             "    except ConfigError as exc:\n        return str(exc)\n"
             "said = [run('train', ['method=mapa', 'dataset=figure8']), run('train', ['method=vae', 'trainer=gpu']),"
             " run('evaluate', [f'run={sys.argv[1]}']), run('evaluate', [f'run={sys.argv[1]}/nope'])]\n"
             "loaded = f\"{'torch' in sys.modules} {'lightning' in sys.modules}\"\n"
             "said.append(run('train', ['dataset.f._target_=mapa_exp.data.analytic.spiral_dot']))\n"  # may import
             "print(repr(said)); print(loaded)")
    p = subprocess.run([sys.executable, "-c", probe, str(runs[0])], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    said, loaded = p.stdout.strip().splitlines()
    said = eval(said)  # noqa: S307 -- our own repr of a list of strings
    assert said[:3] == ["ok", "ok", "ok"], said
    assert said[3].startswith("run=") and "is not a folder" in said[3]
    assert "did you mean mapa_exp.data.analytic.spiral_dots" in said[4]
    assert loaded == "False False"


def _evaluate(sweep: Path, cache_dir: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "MAPA_EXP_OUTPUTS": str(sweep.parent / "outputs"), "MAPA_EXP_CACHE": str(cache_dir)}
    # the mixture IWAE takes a few seconds a run: long enough to be interrupted between runs
    return subprocess.Popen([sys.executable, "evaluate.py", f"sweep={sweep}", "evaluator=mog_iwae",
                             "evaluator.mog_iwae.steps=300", "evaluator.mog_iwae.S_eval=200"], cwd=ROOT, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint, **kw)


def default_sigint() -> None:
    """Ctrl-C raises KeyboardInterrupt in the child even when this test runs with SIGINT ignored (nohup, &)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_interrupted_sweep_evaluation_keeps_what_it_finished_and_a_rerun_does_the_rest(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    runs = []
    for seed in range(4):  # four configurations (S differs), so the sweep evaluates them one by one
        run_dir = sweep / f"000{seed}_spiral_vae"
        cfg = compose_cfg([*FAST, "method=vae", f"seed={seed}", f"method.S={seed + 1}"], run_dir, cache_dir)
        assert run_training(cfg)["status"] == "completed"
        runs.append(run_dir)
    # an earlier evaluation with another estimator of the same model (N(0, I) prior: no prior choice, so both
    # score the same thing): its numbers must survive everything below. (A MAPA run's prior is chosen by the
    # evaluation's selector, so there another selector's numbers are removed with a note: test_evaluate.)
    for run_dir in runs:
        evaluate_run(run_dir, {"quadrature": QuadratureEstimator(J_1d=1000)}, cache_dir=str(cache_dir))
    earlier = {r: json.loads((r / "eval.json").read_text())["metrics"] for r in runs}

    proc = _evaluate(sweep, cache_dir)
    lines = []
    while not any(line.startswith("[1/4]") for line in lines):  # the first run is done: interrupt the second
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "".join(lines)[-3000:]
        lines.append(line)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: the runs evaluated so far keep their eval.json")
    done = [r for r in runs if "test_kl/mog_iwae" in json.loads((r / "eval.json").read_text())["metrics"]]
    assert 1 <= len(done) < 4
    for r in runs:  # every eval.json is complete and still holds the earlier metrics
        saved = json.loads((r / "eval.json").read_text())
        assert saved["status"] == "completed"
        assert {k: saved["metrics"][k] for k in earlier[r]} == earlier[r]
    stamps = {r: (r / "eval.json").stat().st_mtime_ns for r in done}

    again = _evaluate(sweep, cache_dir)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert f"evaluating {4 - len(done)} of 4 runs ({len(done)} already evaluated" in err
    assert {r: (r / "eval.json").stat().st_mtime_ns for r in done} == stamps  # not redone
    for r in runs:
        saved = json.loads((r / "eval.json").read_text())["metrics"]
        assert "test_kl/mog_iwae" in saved and "test_kl/quadrature" in saved


@pytest.mark.slow  # 10-60 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_train_prints_one_summary_line_per_run(tmp_path, cache_dir):
    env = {**os.environ, "MAPA_EXP_OUTPUTS": str(tmp_path / "outputs"), "MAPA_EXP_CACHE": str(cache_dir)}
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "train.py", *FAST, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    (line,) = [line for line in p.stdout.splitlines() if line.startswith("done: ")]  # beside Hydra's log lines
    assert line == (f"done: {run_dir}: train bound {res['train_bound']:.4f}, val bound {res['val_bound']:.4f} nats "
                    f"per point (best validation bound at epoch {res['best_epoch']})")


@pytest.mark.slow
def test_a_200_epoch_run_writes_under_50_kb_of_log_and_console(tmp_path, cache_dir):
    """Output redirected to a file (no terminal): no progress-bar redraws, banners or tips; train.log and the
    captured stdout and stderr of a 200-epoch run stay small."""
    env = {**os.environ, "MAPA_EXP_OUTPUTS": str(tmp_path / "outputs"), "MAPA_EXP_CACHE": str(cache_dir)}
    run_dir = tmp_path / "run"
    fast = [o for o in FAST if not o.startswith(("trainer.max_epochs", "trainer.limit_", "trainer.enable_progress"))]
    with open(tmp_path / "console.txt", "w") as out:
        p = subprocess.run([sys.executable, "train.py", *fast, "trainer.max_epochs=200", f"hydra.run.dir={run_dir}"],
                           cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    console = (tmp_path / "console.txt").read_text()
    assert p.returncode == 0, console[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["epochs"] == 200
    size = (run_dir / "train.log").stat().st_size + (tmp_path / "console.txt").stat().st_size
    assert size < 50_000, console[-3000:]
    for noise in ("GPU available", "TPU available", "💡", "Tip:", "LeafSpec", "srun", "\r"):
        assert noise not in console, noise


@pytest.mark.slow  # 3-8 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_help_lists_the_groups_a_user_picks_from_and_nothing_internal():
    """`train.py --help` is short, names every option of the user's groups (read from conf/) and none of the
    internal ones (schemas, the surrogate's base config, the git-ignored conf/local example)."""
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(p.stdout.splitlines()) <= 40
    for group in ("dataset", "method", "experiment", "trainer", "logger", "evaluator", "debug"):
        for option in sorted((ROOT / "conf" / group).glob("*.yaml")):
            if not option.stem.endswith("_smoke"):
                assert option.stem in p.stdout, (group, option.stem)
    for internal in ("schema/", "local.example", "base:"):
        assert internal not in p.stdout, internal
    e = subprocess.run([sys.executable, "evaluate.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert e.returncode == 0 and "schema/" not in e.stdout and "run=<run folder>" in e.stdout


def test_every_script_help_description_is_whole_sentences():
    """Each script's --help description (its docstring's first paragraph, mapa_exp.cli.description) ends a
    sentence: the first line alone stopped mid-sentence."""
    import ast

    from mapa_exp.cli import description

    for script in sorted((ROOT / "scripts").glob("*.py")):
        doc = ast.get_docstring(ast.parse(script.read_text()))
        if doc is None or "argparse" not in script.read_text():
            continue
        text = description(doc)
        assert text.rstrip().endswith((".", ":", ")")), (script.name, text)
        assert "splitlines()[0]" not in script.read_text(), script.name  # the first line alone: cut mid-sentence
