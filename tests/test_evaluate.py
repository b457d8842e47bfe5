"""The evaluation stage end to end: eval.json from trained runs, both estimators, sweeps, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mapa_exp.errors import ConfigError
from mapa_exp.evaluation.estimators import MogIwaeEstimator, QuadratureEstimator, standard_model
from mapa_exp.evaluation.evaluate import evaluate_run, evaluate_sweep, model_of
from mapa_exp.evaluation.runs import load_run
from mapa_exp.runs.training import run_training
from tests.conftest import FAST, ROOT, compose_cfg

QUICK = {"quadrature": QuadratureEstimator(J_1d=2000), "mog_iwae": MogIwaeEstimator(steps=150, S_eval=500)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """A VAE and a MAPA run on Figure-8 (small), trained once for this module."""
    root = tmp_path_factory.mktemp("sweep")
    out = {}
    for method in ("vae", "mapa"):
        cfg = compose_cfg(["dataset=figure8", f"method={method}", *FAST, "trainer.max_epochs=3",
                           "trainer.limit_train_batches=null"], root / f"0_figure8_{method}", cache_dir)
        assert run_training(cfg)["status"] == "completed"
        out[method] = root / f"0_figure8_{method}"
    return out


@pytest.mark.parametrize("method", ["vae", "mapa"])
def test_eval_json_has_test_kl_by_both_estimators(runs, method, cache_dir):
    res = evaluate_run(runs[method], QUICK, cache_dir=str(cache_dir))
    saved = json.loads((runs[method] / "eval.json").read_text())
    assert saved["status"] == "completed" and saved["metrics"] == pytest.approx(res["metrics"])
    m = res["metrics"]
    for est in ("quadrature", "mog_iwae"):
        for key in ("val_loglik", "test_loglik", "test_loglik_gt", "test_kl"):
            assert math.isfinite(m[f"{key}/{est}"])
        assert m[f"test_kl/{est}"] == pytest.approx(m[f"test_loglik_gt/{est}"] - m[f"test_loglik/{est}"])
    # the mixture IWAE is a lower bound on the exact value (up to its Monte-Carlo error)
    assert m["test_loglik/mog_iwae"] <= m["test_loglik/quadrature"] + 4 * m["test_loglik_se/mog_iwae"]
    assert abs(m["test_loglik_gap/mog_iwae"]) < 0.1
    assert m["convergence/quadrature"] < 1e-2
    # a barely trained model is further from the truth than the truth itself
    assert m["test_kl/quadrature"] > 0


def test_ground_truth_density_integrates_to_one(runs):
    """Quadrature's log p_GT(x), integrated over an x-grid, is a normalised density: the integral is 1."""
    run = load_run(runs["vae"])
    gt = run.datamodule.groundtruth
    model = standard_model(gt.decoder, gt.likelihood, 1)
    h = 0.02  # x spacing, 0.2 sigma: the midpoint rule is exact to ~1e-6 for sigma = 0.1 bumps
    axis = torch.arange(-1.5, 1.5, h) + h / 2
    grid = torch.cartesian_prod(axis, axis)  # (G, 2)
    res, _ = QuadratureEstimator(J_1d=1000, check_convergence=False).evaluate(model, grid, {"grid": grid})
    total = torch.logsumexp(res["grid"][0], 0).exp() * h * h
    assert float(total) == pytest.approx(1.0, abs=2e-3)


def test_mapa_prior_is_recovered_before_scoring(runs):
    run = load_run(runs["mapa"])
    model = model_of(run)
    codes = run.module.codes(run.datamodule.x["train"]).detach()
    # z^ ~ N(0,1) mapped through h reproduces the codes' distribution (quantiles of the empirical codes)
    zhat = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    from mapa_exp.math.prior_recovery import CopulaPrior1D

    h = CopulaPrior1D.fit(codes[:, 0].double())
    q = torch.quantile(codes[:, 0].double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    assert torch.allclose(h.to_latent(zhat), q, atol=0.05 * float(codes.std()))
    assert model.latent_dim == 1


def test_sweep_evaluation_writes_every_eval_json_and_a_summary(runs, cache_dir):
    folder = runs["vae"].parent
    counts = evaluate_sweep(folder, {"quadrature": QuadratureEstimator(J_1d=1000)}, cache_dir=str(cache_dir))
    assert counts == {"evaluated": 2, "already": 0, "skipped": 0, "failed": 0}
    assert all((p / "eval.json").exists() for p in runs.values())
    assert (folder / "summary.csv").exists()


def test_quadrature_refuses_latent_dim_above_two():
    model = standard_model(lambda z: z[..., :2], None, 3)
    with pytest.raises(ConfigError, match="latent_dim=3"):
        QuadratureEstimator().evaluate(model, torch.zeros(4, 2), {"test": torch.zeros(4, 2)})


def _evaluate_cli(*args, tmp_path):
    env = {**os.environ, "MAPA_EXP_OUTPUTS": str(tmp_path / "out"), "MAPA_EXP_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_bad_run_path_gives_one_line(tmp_path):
    p = _evaluate_cli(f"run={tmp_path / 'nope'}", tmp_path=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert p.stderr.startswith("error: run=") and "is not a folder" in p.stderr


def test_run_without_checkpoint_gives_one_line(runs, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(runs["vae"], broken)
    (broken / "checkpoints" / "last.ckpt").unlink()
    p = _evaluate_cli(f"run={broken}", tmp_path=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert "has no checkpoints/last.ckpt" in p.stderr


@pytest.mark.slow
def test_quadrature_with_latent_dim_three_gives_one_line(tmp_path, cache_dir):
    (tmp_path / "confs" / "dataset").mkdir(parents=True)
    (tmp_path / "shapes3.py").write_text("import torch\ndef f(z):\n    return torch.stack([z.sum(-1), (z**2).sum(-1)], -1)\n")
    (tmp_path / "confs" / "dataset" / "three.yaml").write_text(
        "_target_: mapa_exp.data.groundtruth.GroundTruth\nname: three\nf: {_target_: shapes3.f, _partial_: true}\n"
        "likelihood: {_target_: mapa_exp.math.likelihoods.Gaussian, sigma2: 0.01}\nlatent_dim: 3\nobs_dim: 2\n"
        "n_train: 100\nn_val: 50\nn_test: 50\nsurrogate: {fit: false}\ncache_dir: ${paths.cache_dir}\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "MAPA_EXP_OUTPUTS": str(tmp_path / "out"),
           "MAPA_EXP_CACHE": str(tmp_path / "cache")}
    fast = [o for o in FAST if not o.startswith("dataset.")]
    p = subprocess.run([sys.executable, "train.py", "--config-dir", str(tmp_path / "confs"), "dataset=three",
                        "method=vae", *fast, f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-1500:]
    p = subprocess.run([sys.executable, "evaluate.py", f"run={tmp_path / 'run'}", "evaluator=quadrature"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr[-1500:]
    assert "latent_dim=3" in p.stderr and "mog_iwae" in p.stderr


@pytest.mark.slow  # 10-60 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_an_evaluation_record_follows_its_checkpoint(tmp_path, cache_dir):
    """Provenance: a run trained 3 epochs and evaluated, then trained on to 30 epochs, is re-scored by
    `evaluate.py sweep=`, and its eval.json then equals a fresh evaluation of the same folder, key for key
    (wall time aside). Numbers of an estimator not run again are removed with a note, never kept beside
    numbers of other weights."""
    from mapa_exp.sweeps.results import collect

    run_dir = tmp_path / "sweep" / "0000_figure8_mapa"
    base = ["dataset=figure8", "method=mapa", *FAST, "trainer.limit_train_batches=null"]
    assert run_training(compose_cfg([*base, "trainer.max_epochs=3"], run_dir, cache_dir))["status"] == "completed"
    quick = {"quadrature": QuadratureEstimator(J_1d=1000), "mog_iwae": MogIwaeEstimator(steps=20, S_eval=50)}
    first = evaluate_run(run_dir, quick, cache_dir=str(cache_dir))
    assert first["scored"]["checkpoint"]["epoch"] <= 3 and set(first["diagnostics"]) == {"quadrature", "mog_iwae"}
    assert (collect([tmp_path / "sweep"]).query("source == 'eval'")["status"] == "completed").all()

    res = run_training(compose_cfg([*base, "trainer.max_epochs=30"], run_dir, cache_dir))
    assert res["status"] == "completed" and res["epochs"] == 30 and res["resumed_from_epoch"] == 3
    stale = collect([tmp_path / "sweep"]).query("source == 'eval'")
    assert (stale["status"] == "stale").all()  # the tidy table does not pass old numbers off as the run's

    env = {**os.environ, "MAPA_EXP_OUTPUTS": str(tmp_path / "out"), "MAPA_EXP_CACHE": str(cache_dir)}
    p = subprocess.run([sys.executable, "evaluate.py", f"sweep={tmp_path / 'sweep'}", "evaluator=quadrature",
                        "evaluator.quadrature.J_1d=1000"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 evaluated, 0 already" in p.stdout, p.stdout
    # a long step says what it does, and evaluate.py leaves no folder of its own (it once left outputs/evaluations/)
    said = p.stdout + p.stderr
    assert "fitting and scoring the prior candidates on validation data" in said and "chosen by val_loglik" in said
    assert not (tmp_path / "out").exists(), sorted((tmp_path / "out").rglob("*"))
    after = json.loads((run_dir / "eval.json").read_text())
    assert after["scored"]["checkpoint"]["epoch"] > 3
    assert "mog_iwae" not in after["diagnostics"] and not any(k.endswith("/mog_iwae") for k in after["metrics"])
    assert len(after["notes"]) == 1 and "removed the mog_iwae numbers" in after["notes"][0]

    (run_dir / "eval.json").unlink()
    fresh = evaluate_run(run_dir, {"quadrature": QuadratureEstimator(J_1d=1000)}, cache_dir=str(cache_dir))
    after.pop("notes")
    for d in (after, fresh):
        d.pop("wall_time_s")
    assert after.keys() == fresh.keys()
    assert _same(after, fresh)
    p = subprocess.run(p.args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "0 evaluated, 1 already" in p.stdout, p.stdout + p.stderr[-2000:]


def _same(a, b, path="") -> bool:
    """Equal key for key; floats to 1e-9 (the same computation twice)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, set(a) ^ set(b))
        return all(_same(a[k], b[k], f"{path}.{k}") for k in a)
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        return all(_same(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-9, abs=1e-12), (path, a, b)
        return True
    assert a == b, (path, a, b)
    return True
