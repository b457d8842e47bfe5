"""MAPA's prior recovery chosen on validation data (mapa_exp.math.prior_choice, method.md §6), tested on the codes
MAPA really produces: tight groups with wide gaps (Clusters, Spiral-Dots), not only the truth's Gaussian codes.

The independent answer is the empiricalized mixture of method.md Eq 6, log p(x) = log (1/N) sum_m p(x | f(z_m)):
exact at the codes, computed here by brute force. A recovered prior that follows the codes reproduces it."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mapa_exp.errors import ConfigError
from mapa_exp.evaluation.estimators import QuadratureEstimator
from mapa_exp.evaluation.evaluate import choose_prior
from mapa_exp.math.prior_choice import choose, plain_settings, prior_candidates
from mapa_exp.math.likelihoods import Gaussian
from mapa_exp.math.prior_recovery import MIN_SLOPE_RATIO, CopulaPrior1D

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
LIK = Gaussian(0.01)
C, N, SD = 5, 1000, 0.002  # five equal groups of codes, each 0.002 wide, one unit apart
CENTERS = torch.arange(C, dtype=F64) - (C - 1) / 2


def default_settings() -> dict:
    """The prior recovery a user gets: what evaluate.py and train.py (evaluate=true) compose, one file."""
    from mapa_exp.config import compose

    ev = OmegaConf.to_container(compose("evaluate").prior_recovery)
    tr = OmegaConf.to_container(compose("train").prior_recovery)
    assert ev == tr == plain_settings({})  # the Python API's defaults are the configs'
    return ev


def staircase(spread: float):
    """A decoder that maps each group of codes to its own point on the unit circle (steep steps between groups)
    and, with ``spread`` > 0, each group onto a segment of its cluster along the circle, as an autoencoder
    reconstructing its own points does (the offset within the group, in units of SD, moves along the tangent)."""
    mid = (CENTERS[1:] + CENTERS[:-1]) / 2

    def decode(z):
        z = z.double()
        s = (0.5 * (1 + torch.tanh(40 * (z - mid)))).sum(-1, keepdim=True)  # (..., 1) in [0, C-1]
        a = 2 * math.pi * s / C
        offset = (z - CENTERS[torch.round(s).long().clamp(0, C - 1)]) / SD
        point = torch.cat([torch.cos(a), torch.sin(a)], -1)
        tangent = torch.cat([-torch.sin(a), torch.cos(a)], -1)
        return point + spread * torch.tanh(offset / 2) * tangent

    return decode


def clustered(seed: int, spread: float):
    g = torch.Generator().manual_seed(seed)
    decode = staircase(spread)

    def draw(n):
        z = CENTERS[torch.randint(C, (n,), generator=g)] + SD * torch.randn(n, generator=g, dtype=F64)
        return z[:, None], decode(z[:, None]) + 0.1 * torch.randn(n, 2, generator=g, dtype=F64)

    codes, x_train = draw(N)
    x = {"train": x_train, "val": draw(1000)[1], "test": draw(1000)[1]}
    return decode, codes, x


def empiricalized(decode, codes, x):
    """method.md Eq 6 at the codes, by brute force: (n,)."""
    return torch.logsumexp(LIK.log_prob_matrix(x, decode(codes)), 1) - math.log(codes.shape[0])


@pytest.mark.parametrize("spread", [0.0, 0.1])
@pytest.mark.parametrize("seed", [0, 1])
def test_default_recovery_matches_the_empiricalized_mixture_on_collapsed_codes(seed, spread):
    """(a) Measured: the interpolating map is 0.0001-0.0008 nats per point below Eq 6; the old default, a smooth
    map through 8 bin means, 0.019-0.03 (spread 0) and 0.15 (spread 0.1); 16 bins 0.007 and 0.03."""
    decode, codes, x = clustered(seed, spread)
    est = {"quadrature": QuadratureEstimator(J_1d=10000, check_convergence=False)}
    chosen = choose_prior(decode, LIK, codes, x, est, default_settings())
    exact = float(empiricalized(decode, codes, x["test"]).mean())
    got = chosen["candidates"][chosen["label"]]["test_loglik/quadrature"]
    assert abs(got - exact) <= 0.01, (chosen["label"], got, exact)
    eight = choose_prior(decode, LIK, codes, x, est, {"bins": 8})  # a fixed map stays selectable
    assert eight["label"] == "bins=8"
    assert exact - eight["candidates"]["bins=8"]["test_loglik/quadrature"] > 0.01  # the old default fails it


def test_validation_decides_when_validation_and_test_disagree():
    """(b) The candidate with the best validation score wins even where another has the best test score."""
    table = {"bins=null": {"val": -1.20, "test": -0.90}, "bins=8": {"val": -1.10, "test": -1.40},
             "bins=16": {"val": -1.15, "test": -1.00}}
    chosen = choose({k: v["val"] for k, v in table.items()})
    assert chosen == "bins=8"
    assert max(table, key=lambda k: table[k]["test"]) == "bins=null"
    assert choose({"a": float("nan"), "b": -5.0, "c": -float("inf")}) == "b"  # no finite score never wins
    assert choose({"first": -1.0, "second": -1.0}) == "first"  # ties: the first listed


def test_chosen_candidate_is_the_best_on_validation_and_its_numbers_are_reported():
    decode, codes, x = clustered(2, 0.1)
    est = {"quadrature": QuadratureEstimator(J_1d=4000, check_convergence=False)}
    out = choose_prior(decode, LIK, codes, x, est, default_settings())
    val = {k: v["val_loglik/quadrature"] for k, v in out["candidates"].items()}
    assert set(val) == {"bins=null", "bins=8", "bins=16", "bins=32", "bins=64"}
    assert out["label"] == max(val, key=val.get)
    assert out["scores"][out["label"]]["metrics"] == out["candidates"][out["label"]]


def test_smooth_map_reaches_the_extreme_codes_and_no_end_slope_is_flat():
    """The smooth map's outer knots are the extreme codes (only the copula's own tail, ~1/(N+1), lies beyond),
    and tied extreme codes (a saturated encoder) do not make an end slope vanish."""
    g = torch.Generator().manual_seed(3)
    codes = torch.cat([torch.full((50,), -3.0, dtype=F64), CENTERS[torch.randint(C, (900,), generator=g)]
                       + SD * torch.randn(900, generator=g, dtype=F64), torch.full((50,), 3.5, dtype=F64)])
    for bins in (8, 16, None):
        prior = CopulaPrior1D.fit(codes, bins=bins)
        zhat = prior.zhat_knots
        assert float(prior.to_latent(zhat[:1])) == pytest.approx(-3.0, abs=1e-12)
        assert float(prior.to_latent(zhat[-1:])) == pytest.approx(3.5, abs=1e-12)
        below = torch.distributions.Normal(0.0, 1.0).cdf(zhat[0])  # the prior's mass below the lowest code
        assert float(below) <= 1.5 / (N + 1)
        u = torch.special.ndtri(torch.arange(1, N + 1, dtype=F64) / (N + 1))
        overall = 6.5 / float((u[-1] - u[0]) / u.std(correction=0))
        assert float(prior.slope_lo) >= MIN_SLOPE_RATIO * overall * (1 - 1e-9)
        assert float(prior.slope_hi) >= MIN_SLOPE_RATIO * overall * (1 - 1e-9)


def test_bad_prior_recovery_settings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"prior_recovery.bins=1"):
        prior_candidates(1, bins=[None, 1])
    with pytest.raises(ConfigError, match="lists a map twice"):
        prior_candidates(1, bins=[8, 8])
    with pytest.raises(ConfigError, match=r"prior_recovery.n_components=0"):
        prior_candidates(2, n_components=0)
    assert [c.label for c in prior_candidates(1, bins=None)] == ["bins=null"]
    assert [c.label for c in prior_candidates(2, n_components=[1, 3])] == ["n_components=1", "n_components=3"]


@pytest.mark.slow
def test_mapa_on_clusters_with_the_default_evaluation(tmp_path, cache_dir):
    """(c) End to end: MAPA (train.yaml's K = S = 5) on Clusters for 300 epochs, scored with the default prior
    recovery. Measured before the prior was chosen on validation data: test KL 0.625 nats with the 8-bin map,
    0.106 with the interpolating map."""
    import json

    from mapa_exp.pipeline import train_one
    from tests.conftest import compose_cfg

    run_dir = tmp_path / "run"
    cfg = compose_cfg(["dataset=clusters", "method=mapa", "trainer.max_epochs=300", "trainer.enable_progress_bar=false",
                       "evaluate=true", "evaluator=quadrature"], run_dir, cache_dir)
    assert train_one(cfg)["status"] == "completed"
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["scored"]["prior"]["settings"] == default_settings()
    assert ev["metrics"]["test_kl/quadrature"] <= 0.15, (ev["scored"]["prior"]["chosen"], ev["prior_candidates"])
