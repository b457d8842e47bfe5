"""Bad input, one test each: one clear line (`error: key=value: reason`), a non-zero exit, nothing marked done.

Most cases run in-process through ``run_training`` (the line is ``error: {ConfigError}``, which train.py
prints before exiting with status 2); a few go through the command line to check the line, the exit
status and the run folder end to end (tests/test_train.py does so for bad method values and an unknown
method). Validation lives where each value is consumed; this file only collects the cases.
"""

from __future__ import annotations

import fractions
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import MissingConfigException

from mapa_exp.runs.training import RunFailed, config_error, run_training
from tests.conftest import FAST, ROOT, compose_cfg

TRAINER_FAST = [o for o in FAST if o.startswith("trainer.")]

# (id, overrides, the config key the line must start with)
BAD_VALUES = [
    ("K > N", ["method.K=300"], "method.K"),
    ("K = 0", ["method.K=0"], "method.K"),
    ("K < 0", ["method.K=-3"], "method.K"),
    ("K not an integer", ["method.K=2.5"], "method.K"),
    ("K not a number", ["method.K=abc"], "method.K"),
    ("S < 0", ["method.S=-1"], "method.S"),
    ("S = 0 for a VAE", ["method=vae", "method.S=0"], "method.S"),
    ("bandwidth = 0", ["method.bandwidth=0"], "method.bandwidth"),
    ("bandwidth < 0", ["method.bandwidth=-0.1"], "method.bandwidth"),
    ("rho = 0.5", ["method.rho=0.5"], "method.rho"),
    ("rho = 1", ["method.rho=1.0"], "method.rho"),
    ("unknown estimator", ["method=iwae", "method.estimator=foo"], "method.estimator"),
    ("latent_dim 2 for a 1-D f", ["dataset.latent_dim=2"], "dataset.latent_dim"),
    ("latent_dim 2, f returns the wrong shape", ["dataset=figure8", "dataset.latent_dim=2"], "dataset.obs_dim"),
    ("obs_dim mismatch", ["dataset.obs_dim=3"], "dataset.obs_dim"),
    ("latent_dim = 0", ["dataset.latent_dim=0"], "dataset.latent_dim"),
    ("n_train = 0", ["dataset.n_train=0"], "dataset.n_train"),
    ("n_val < 0", ["dataset.n_val=-1"], "dataset.n_val"),
    ("draw < 0", ["dataset.draw=-1"], "dataset.draw"),
    ("sigma2 = 0", ["dataset.likelihood.sigma2=0"], "dataset.likelihood.sigma2"),
    ("batch size = 0", ["data.batch_size=0"], "data.batch_size"),
    ("batch size < 0", ["data.batch_size=-5"], "data.batch_size"),
    ("neighbors_M = 0", ["data.neighbors_M=0"], "data.neighbors_M"),
    ("lr = 0", ["optimizer.lr=0"], "optimizer.lr"),
    ("lr < 0", ["optimizer.lr=-0.001"], "optimizer.lr"),
    ("Adam beta >= 1", ["+optimizer.betas=[0.9,1.5]"], "optimizer.betas"),
    ("max_epochs < -1", ["trainer.max_epochs=-5"], "trainer.max_epochs"),
    ("limit_train_batches < 0", ["trainer.limit_train_batches=-1"], "trainer.limit_train_batches"),
    ("unknown accelerator", ["trainer.accelerator=foo"], "trainer.accelerator"),
    ("seed < 0", ["seed=-1"], "seed"),
    ("seed >= 2**32", ["seed=4294967296"], "seed"),
    ("num_threads = 0", ["num_threads=0"], "num_threads"),
    ("mmap threshold above glibc's 32 MiB", ["malloc.mmap_threshold=67108864"], "malloc.mmap_threshold"),
    ("unknown nan_policy", ["nan_policy=ignore"], "nan_policy"),
]


def one_line(exc: BaseException) -> str:
    """What train.py prints for ``exc`` (a ConfigError somewhere in its chain), checked to be one line."""
    err = config_error(exc)
    assert err is not None, f"not a ConfigError: {exc!r}"
    line = f"error: {err}"
    assert "\n" not in line and len(line) < 400, line
    return line


def assert_nothing_completed(folder: Path) -> None:
    for path in folder.rglob("results.json"):
        assert json.loads(path.read_text())["status"] != "completed", path


def expect_refused(overrides: list[str], key: str, tmp_path: Path, cache_dir: Path) -> str:
    run_dir = tmp_path / "run"
    with pytest.raises(Exception) as info:
        run_training(compose_cfg(overrides, run_dir, cache_dir))
    line = one_line(info.value)
    assert line.startswith(f"error: {key}="), line
    assert_nothing_completed(tmp_path)
    return line


@pytest.mark.parametrize("case, overrides, key", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_bad_value_is_refused_in_one_line(case, overrides, key, tmp_path, cache_dir):
    expect_refused([*FAST, *overrides], key, tmp_path, cache_dir)


@pytest.mark.parametrize("group, name", [("dataset", "nonexistent"), ("method", "nonexistent"), ("net", "cnn")])
def test_unknown_group_option_lists_the_available_ones(group, name, tmp_path, cache_dir):
    with pytest.raises(MissingConfigException) as info:
        compose_cfg([f"{group}={name}"], tmp_path / "run", cache_dir)
    assert f"Could not find '{group}/{name}'" in str(info.value)
    assert not (tmp_path / "run").exists()


# -- data files --------------------------------------------------------------------------------------
def _good(n=60, d=3):
    return np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)


def _write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _missing(tmp):
    return tmp / "absent.npz"


def _empty(tmp):
    (tmp / "empty.npz").write_bytes(b"")
    return tmp / "empty.npz"


def _truncated(tmp):
    path = _write_npz(tmp / "t.npz", x_train=_good())
    path.write_bytes(path.read_bytes()[:200])
    return path


def _wrong_shape(tmp):
    return _write_npz(tmp / "s.npz", x_train=_good().reshape(60, 3, 1))


def _nan(tmp):
    x = _good()
    x[5, 1] = np.nan
    return _write_npz(tmp / "nan.npz", x_train=x)


def _inf(tmp):
    x = _good()
    x[2, 0] = -np.inf
    return _write_npz(tmp / "inf.npz", x_train=x)


def _no_rows(tmp):
    return _write_npz(tmp / "e.npz", x_train=_good()[:0])


def _pickled(tmp):
    np.save(tmp / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return tmp / "objects.npy"


def _non_binary(tmp):
    x = (_good() > 0).astype(np.float32)
    x[3, 2] = 0.5
    return _write_npz(tmp / "b.npz", x_train=x)


BAD_FILES = [
    ("missing", "file", _missing, "no such file"),
    ("empty", "file", _empty, "cannot be read"),
    ("truncated", "file", _truncated, "cannot be read"),
    ("wrong shape", "file", _wrong_shape, "expected 2-D"),
    ("NaN", "file", _nan, "non-finite"),
    ("inf", "file", _inf, "non-finite"),
    ("no rows", "file", _no_rows, "empty"),
    ("pickled objects", "file", _pickled, "cannot be read"),
    ("non-binary for Bernoulli", "file_binary", _non_binary, "values other than 0 and 1"),
]


@pytest.mark.parametrize("case, dataset, make, reason", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_data_file_is_refused_in_one_line(case, dataset, make, reason, tmp_path, cache_dir):
    path = make(tmp_path)
    line = expect_refused([f"dataset={dataset}", f"dataset.path={path}", "method=vae", *TRAINER_FAST],
                          "dataset.path", tmp_path, cache_dir)
    assert reason in line


def test_unset_data_file_is_refused(tmp_path, cache_dir):
    expect_refused(["dataset=file", "method=vae", *TRAINER_FAST], "dataset.path", tmp_path, cache_dir)


# -- checkpoints in the run folder ------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_checkpoint(tmp_path_factory, cache_dir) -> Path:
    """A finished VAE run: its folder (with checkpoints/last.ckpt, config.yaml and results.json)."""
    run_dir = tmp_path_factory.mktemp("vae") / "run"
    assert run_training(compose_cfg([*FAST, "method=vae"], run_dir, cache_dir))["status"] == "completed"
    return run_dir


def _place(ckpt: dict | bytes, run_dir: Path) -> Path:
    path = run_dir / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    if isinstance(ckpt, bytes):
        path.write_bytes(ckpt)
    else:
        torch.save(ckpt, path)
    return path


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.parametrize("overrides, differs", [
    (["method=mapa"], "method.name: 'vae' there, 'mapa' here"),
    (["method=vae", "net.hidden=[20]"], "net.hidden"),
    (["method=vae", "seed=1"], "seed: 0 there, 1 here"),
    (["method=vae", "dataset=circle"], "dataset"),
])
def test_checkpoint_of_another_configuration_is_refused(overrides, differs, vae_checkpoint, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    ckpt = _place(_ckpt(vae_checkpoint), run_dir)
    line = expect_refused([*FAST, *overrides], "checkpoint", tmp_path, cache_dir)
    assert "was written by a different configuration" in line and differs in line
    assert sorted(p.name for p in run_dir.rglob("*")) == ["checkpoints", "last.ckpt"]  # nothing written
    assert ckpt.stat().st_size > 0


@pytest.mark.parametrize("case", ["truncated", "garbage", "pickled object", "no run identity", "not a checkpoint"])
def test_unusable_checkpoint_is_refused(case, vae_checkpoint, tmp_path, cache_dir):
    good = vae_checkpoint / "checkpoints" / "last.ckpt"
    if case == "truncated":
        content = good.read_bytes()[: good.stat().st_size // 2]
    elif case == "garbage":
        content = os.urandom(1000)
    elif case == "pickled object":  # would run code under weights_only=False
        content = {**_ckpt(vae_checkpoint), "extra": fractions.Fraction(1, 3)}
    elif case == "no run identity":  # e.g. a plain Lightning checkpoint from another project
        content = {k: v for k, v in _ckpt(vae_checkpoint).items() if k != "run_identity"}
    else:
        content = {"weights": torch.zeros(3)}
    _place(content, tmp_path / "run")
    line = expect_refused([*FAST, "method=vae"], "checkpoint", tmp_path, cache_dir)
    assert "delete it" in line


def test_another_configuration_pointed_at_a_finished_run_leaves_it_untouched(vae_checkpoint, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(vae_checkpoint, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(Exception) as info:
        run_training(compose_cfg([*FAST, "method=vae", "method.S=3"], run_dir, cache_dir))
    line = one_line(info.value)
    assert line.startswith("error: checkpoint=") and "method.S: 1 there, 3 here" in line
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # its results are not lost


# -- the command line end to end ----------------------------------------------------------------------
def cli(script: str, *args: str, tmp_path: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAPA_EXP_OUTPUTS": str(tmp_path / "outputs"), "MAPA_EXP_CACHE": str(cache_dir)}
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def assert_one_error_line(p: subprocess.CompletedProcess, start: str, status: int = 2) -> None:
    assert p.returncode == status, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), p.stderr[-3000:]


@pytest.mark.slow  # refused in-process by test_checkpoint_of_another_configuration_is_refused; here through train.py
def test_cli_checkpoint_of_another_configuration(vae_checkpoint, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    _place(_ckpt(vae_checkpoint), run_dir)
    p = cli("train.py", *FAST, "method=iwae", f"hydra.run.dir={run_dir}", tmp_path=tmp_path, cache_dir=cache_dir)
    assert_one_error_line(p, "error: checkpoint=")
    assert "different configuration" in p.stderr and not (run_dir / "results.json").exists()


def test_cli_evaluation_of_a_failed_run(tmp_path, cache_dir):
    run_dir = tmp_path / "failed"
    poison = ["+callbacks.poison._target_=tests.test_reliability.PoisonBatch", "+callbacks.poison.steps=[1]"]
    with pytest.raises(RunFailed):  # a NaN at step 1 under nan_policy=fail
        run_training(compose_cfg([*FAST, "method=vae", *poison], run_dir, cache_dir))
    assert json.loads((run_dir / "results.json").read_text())["status"] == "failed"
    p = cli("evaluate.py", f"run={run_dir}", tmp_path=tmp_path, cache_dir=cache_dir)
    assert_one_error_line(p, "error: run=")
    assert "did not complete (status 'failed'" in p.stderr
    assert not (run_dir / "eval.json").exists()


# evaluator settings of train.py evaluate=true: refused before any training (a run would otherwise train for
# its whole budget and then fail); once a traceback (a bad quadrature rule) or a silent wrong type
@pytest.mark.slow  # 10-60 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
@pytest.mark.parametrize("override, start", [
    ("evaluator.quadrature.rule=3", "error: evaluator.quadrature.rule='3': must be one of equal_mass, uniform"),
    ("evaluator.quadrature.J_1d=1", "error: evaluator.quadrature.J_1d=1: must be an integer >= 2"),
    ("evaluator.mog_iwae.restarts=0", "error: evaluator.mog_iwae.restarts=0: must be an integer >= 1"),
    ("evaluator.mog_iwae.estimator=foo", "error: evaluator.mog_iwae.estimator='foo': must be one of stl, standard"),
    ("evaluator.mog_iwae.steps=abc", "error: evaluator.mog_iwae.steps='abc': must be an integer"),
    ("prior_recovery.tail_knots=x", "error: prior_recovery.tail_knots='x': must be an integer"),
])
def test_bad_evaluator_setting_is_refused_before_training(override, start, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    p = cli("train.py", *FAST, "evaluate=true", override, f"hydra.run.dir={run_dir}", tmp_path=tmp_path,
            cache_dir=cache_dir)
    assert_one_error_line(p, start)
    assert not (run_dir / "results.json").exists() and not list(run_dir.glob("checkpoints/*"))
