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
