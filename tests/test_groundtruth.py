"""Ground truths: analytic shapes, deterministic cached surrogates, draws, user-defined truths from config."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mapa_exp.data import analytic
from mapa_exp.data.groundtruth import GroundTruth
from mapa_exp.math.likelihoods import Bernoulli, Gaussian
from tests.conftest import FAST, ROOT

SMALL_FIT = {"steps": 200, "n_fit": 256}


def test_analytic_shapes_match_their_definitions():
    z0 = torch.zeros(1, 1)
    assert torch.allclose(analytic.figure8(z0), torch.zeros(1, 2), atol=1e-7)  # the crossing sits at z = 0
    z = torch.linspace(-4, 4, 201)[:, None]
    assert torch.allclose(analytic.circle(z).norm(dim=1), torch.ones(201), atol=1e-6)
    av = analytic.absolute_value(z)
    assert torch.allclose(av[:, 1], av[:, 0].abs())
    # staircases: C equal-mass steps, so each plateau holds 1/C of N(0,1)
    zs = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(5000) + 0.5) / 5000)[:, None]
    for C in (5, 8):
        s = analytic.staircase(zs, C, 30.0).round().squeeze(1)
        counts = torch.bincount(s.long(), minlength=C).float() / len(s)
        assert torch.allclose(counts, torch.full((C,), 1 / C), atol=0.02)
    assert analytic.spiral_dots(zs).norm(dim=1).max() <= 1.0 + 1e-6
    assert torch.allclose(analytic.clusters(zs).norm(dim=1), torch.ones(len(zs)), atol=1e-6)


def _gt(tmp_path, f=analytic.figure8, **kw):
    kw = {"n_train": 50, "n_val": 20, "n_test": 20, "surrogate": SMALL_FIT, **kw}
    return GroundTruth(name="t", f=f, likelihood=Gaussian(0.01), cache_dir=str(tmp_path), **kw)


def test_surrogate_is_deterministic_and_cached(tmp_path, caplog):
    caplog.set_level("INFO")
    a = _gt(tmp_path / "a").decoder
    b = _gt(tmp_path / "b").decoder  # a separate cache: fitted again from the same seed
    for (_, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q)
    caplog.clear()
    c = _gt(tmp_path / "a").decoder  # the first cache: loaded, not refitted
    assert "cache hit: surrogates/" in caplog.text and "fitted surrogate" not in caplog.text
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    other = _gt(tmp_path / "a", surrogate={**SMALL_FIT, "seed": 1}).decoder
    assert not torch.equal(other.params, a.params)


def test_draws_are_reproducible_and_independent(tmp_path):
    d0, d0_again, d1 = (_gt(tmp_path, draw=d).splits() for d in (0, 0, 1))
    assert torch.equal(d0["train"].x, d0_again["train"].x) and torch.equal(d0["test"].z, d0_again["test"].z)
    assert not torch.allclose(d0["train"].x, d1["train"].x)
    assert [d0[s].x.shape[0] for s in ("train", "val", "test")] == [50, 20, 20]
    # x = f_GT(z) + noise with the stated sigma^2
    gt = _gt(tmp_path)
    s = gt.splits()["train"]
    resid = s.x - gt.decoder(s.z)
    assert resid.pow(2).mean().item() == pytest.approx(0.01, rel=0.35)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["figure8", "circle", "absolute_value", "clusters", "spiral_dots"])
def test_default_surrogates_reproduce_the_analytic_shape(name, tmp_path):
    """Spec §10: the surrogate's mean squared error is below sigma^2 / 10 at the default fit settings."""
    torch.set_num_threads(1)
    gt = GroundTruth(name=name, f=getattr(analytic, name), likelihood=Gaussian(0.01), cache_dir=None)
    gt.decoder
    assert gt.surrogate_mse < 0.01 / 10


def test_bernoulli_ground_truth(tmp_path):
    def logits(z):
        return torch.cat([4 * z, -4 * z, 8 * torch.sin(3 * z)], -1)

    gt = GroundTruth(name="b", f=logits, likelihood=Bernoulli(0.95), obs_dim=3, n_train=40, n_val=10, n_test=10,
                     surrogate=SMALL_FIT, cache_dir=None)
    x = gt.splits()["train"].x
    assert set(x.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.slow
def test_user_ground_truth_from_a_config_outside_the_package(tmp_path):
    """A sixth truth: a callable in the user's own module and a config in the user's own folder."""
    (tmp_path / "my_shapes.py").write_text(textwrap.dedent("""
        import torch
        def wave(z, freq=2.0):
            return torch.cat([z, torch.sin(freq * z)], -1)
        def bits(z):
            return torch.cat([6 * z, -6 * z, 6 * torch.cos(2 * z) - 3, 5 * torch.sin(3 * z)], -1)
    """))
    (tmp_path / "confs" / "dataset").mkdir(parents=True)
    common = "latent_dim: 1\nn_train: 100\nn_val: 50\nn_test: 50\ncache_dir: ${paths.cache_dir}\n"
    (tmp_path / "confs" / "dataset" / "wave.yaml").write_text(
        "_target_: mapa_exp.data.groundtruth.GroundTruth\nname: wave\n"
        "f: {_target_: my_shapes.wave, _partial_: true, freq: 3.0}\n"
        "likelihood: {_target_: mapa_exp.math.likelihoods.Gaussian, sigma2: 0.02}\n"
        "obs_dim: 2\nsurrogate: {steps: 300, n_fit: 512}\n" + common
    )
    (tmp_path / "confs" / "dataset" / "bits.yaml").write_text(
        "_target_: mapa_exp.data.groundtruth.GroundTruth\nname: bits\n"
        "f: {_target_: my_shapes.bits, _partial_: true}\n"
        "likelihood: {_target_: mapa_exp.math.likelihoods.Bernoulli, rho: 0.9}\n"
        "obs_dim: 4\nsurrogate: {fit: false}\n" + common
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "MAPA_EXP_OUTPUTS": str(tmp_path / "out"),
           "MAPA_EXP_CACHE": str(tmp_path / "cache")}
    fast = [o for o in FAST if not o.startswith("dataset.")]
    for name in ("wave", "bits"):
        p = subprocess.run([sys.executable, "train.py", "--config-dir", str(tmp_path / "confs"), f"dataset={name}",
                            "method=mapa", *fast], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        (res_file,) = (tmp_path / "out").rglob(f"*_{name}_mapa/results.json")
        res = json.loads(res_file.read_text())
        assert res["status"] == "completed" and math.isfinite(res["val_bound"])
    # the Bernoulli truth's bound is a log-probability of binary data: at most 0 nats
    assert res["val_bound"] <= 0 and res["train_bound"] <= 0
