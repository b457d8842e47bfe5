"""Quadrature log p(x) (mapa_exp.math.quadrature) against closed forms and scipy.integrate.quad."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from mapa_exp.data.analytic import figure8  # method.md §10
from mapa_exp.math.likelihoods import Gaussian
from mapa_exp.math.quadrature import (
    convergence_check,
    grid_log_posterior,
    posterior_log_density,
    quadrature_log_likelihood,
    standard_normal_rule_1d,
    StandardNormalPrior,
)

F64 = torch.float64
SIGMA2 = 0.01


def linear_gaussian(Dz: int, Dx: int, N: int, seed: int = 0):
    """z ~ N(0, I), x = W z + b + N(0, σ² I); returns decode, x (N, Dx), exact log p(x) (N,), W, b."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(Dx, Dz, generator=g, dtype=F64)
    b = torch.randn(Dx, generator=g, dtype=F64)
    z = torch.randn(N, Dz, generator=g, dtype=F64)
    x = z @ W.T + b + math.sqrt(SIGMA2) * torch.randn(N, Dx, generator=g, dtype=F64)
    cov = W @ W.T + SIGMA2 * torch.eye(Dx, dtype=F64)
    exact = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    return (lambda zz: zz @ W.T + b), x, exact, W, b


# J per axis: the narrowest posterior sd is 0.1 / 1.57 = 0.064 (1-D) and 0.1 / 2.88 = 0.035 (2-D);
# the uniform rule's spacing 16 / J must stay below ~1.4 sd for 1e-4 (error ~ 2 exp(-2π² sd²/Δ²)).
# Measured max errors in 2-D: J = 200: 5e-2, 300: 5e-4, 400: 7e-7, 600: 4e-13.
@pytest.mark.parametrize("Dz, J", [(1, 1000), (2, 400)])
def test_linear_gaussian_matches_closed_form(Dz, J):
    decode, x, exact, _, _ = linear_gaussian(Dz, Dz + 1, N=200)
    q = quadrature_log_likelihood(x, decode, Gaussian(SIGMA2), J, Dz)
    assert q.dtype == F64 and q.shape == (200,)
    assert (q - exact).abs().max() < 1e-4


def test_equal_mass_rule_converges_but_slowly():
    # method.md §7's equal-mass grid: right in the limit, but its spacing grows in the tails
    decode, x, exact, _, _ = linear_gaussian(1, 2, N=300)
    def err(J):
        q = quadrature_log_likelihood(x, decode, Gaussian(SIGMA2), J, 1, rule="equal_mass")
        return float((q - exact).abs().max())

    e3, e30 = err(3000), err(30000)
    assert e30 < e3 / 10
    assert e30 < 1e-2
    nodes, log_w = standard_normal_rule_1d(4, "equal_mass")
    assert torch.allclose(nodes, torch.tensor(stats.norm.ppf([1 / 8, 3 / 8, 5 / 8, 7 / 8]), dtype=F64))
    assert torch.allclose(log_w, torch.full((4,), -math.log(4), dtype=F64))


def test_convergence_check_reports_both_and_gap():
    decode, x, exact, _, _ = linear_gaussian(1, 2, N=100)
    c = convergence_check(x, decode, Gaussian(SIGMA2), 500, 1)
    assert c.J == 500 and c.log_px.shape == c.log_px_2J.shape == c.abs_diff.shape == (100,)
    assert torch.allclose(c.abs_diff, (c.log_px - c.log_px_2J).abs())
    assert c.max_abs_diff < 1e-8
    assert (c.log_px_2J - exact).abs().max() < 1e-8


def test_chunking_does_not_change_the_answer():
    decode, x, _, _, _ = linear_gaussian(2, 3, N=50)
    a = quadrature_log_likelihood(x, decode, Gaussian(SIGMA2), 60, 2)
    b = quadrature_log_likelihood(x, decode, Gaussian(SIGMA2), 60, 2, chunk_size=97, block_elements=1000)
    assert (a - b).abs().max() < 1e-12


def test_latent_dim_above_two_is_refused():
    decode, x, _, _, _ = linear_gaussian(3, 3, N=5)
    with pytest.raises(ValueError, match="latent_dim=3"):
        quadrature_log_likelihood(x, decode, Gaussian(SIGMA2), 10, 3)
    with pytest.raises(ValueError, match="latent_dim=3"):
        StandardNormalPrior(3).quadrature_grid(10)


def scipy_log_px(x: np.ndarray) -> float:
    def integrand(z):
        m = figure8(torch.tensor([[z]], dtype=F64))[0].numpy()
        return math.exp(-((x - m) ** 2).sum() / (2 * SIGMA2)) / (2 * math.pi * SIGMA2) * stats.norm.pdf(z)

    v, _ = integrate.quad(integrand, -12, 12, points=[-3, -2, -1, 0, 1, 2, 3], limit=2000, epsabs=0, epsrel=1e-11)
    return math.log(v)


def test_figure8_matches_scipy_quad():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 1, generator=g, dtype=F64)
    x = figure8(z) + math.sqrt(SIGMA2) * torch.randn(6, 2, generator=g, dtype=F64)
    x[0] = torch.tensor([0.0, 0.0], dtype=F64)  # the crossing: a three-mode posterior
    ref = torch.tensor([scipy_log_px(xi) for xi in x.numpy()], dtype=F64)
    uniform = quadrature_log_likelihood(x, figure8, Gaussian(SIGMA2), 2000, 1)
    equal_mass = quadrature_log_likelihood(x, figure8, Gaussian(SIGMA2), 3000, 1, rule="equal_mass")
    assert (uniform - ref).abs().max() < 1e-4
    assert (equal_mass - ref).abs().max() < 1e-4  # f depends on Φ(z): smooth in u, O(1/J²)


def test_posterior_helpers_match_the_exact_gaussian_posterior():
    decode, x, exact, W, b = linear_gaussian(1, 2, N=20)
    lik = Gaussian(SIGMA2)
    log_px = quadrature_log_likelihood(x, decode, lik, 1000, 1)
    prec = 1 + (W.T @ W)[0, 0] / SIGMA2
    mean = ((x - b) @ W)[:, 0] / SIGMA2 / prec  # (N,)
    z = torch.linspace(-3, 3, 41, dtype=F64)[:, None]
    exact_post = torch.distributions.Normal(mean[:, None], prec ** -0.5).log_prob(z[:, 0][None, :])  # (N, 41)
    assert (posterior_log_density(x, z, decode, lik, log_px) - exact_post).abs().max() < 1e-8
    grid = StandardNormalPrior(1).quadrature_grid(1000)
    lp = grid_log_posterior(x, decode, lik, grid)
    assert torch.allclose(torch.logsumexp(lp, -1), torch.zeros(20, dtype=F64), atol=1e-12)
    post_mean = (lp.exp() * grid.nodes[:, 0]).sum(-1)
    assert (post_mean - mean).abs().max() < 1e-8


def test_float32_decoder_gets_float32_nodes_and_float64_accumulation():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))  # float32
    x = net(torch.randn(40, 1)).detach() + 0.1 * torch.randn(40, 2)
    q32 = quadrature_log_likelihood(x, net, Gaussian(SIGMA2), 2000, 1)
    net64 = net.double()
    q64 = quadrature_log_likelihood(x.double(), net64, Gaussian(SIGMA2), 2000, 1)
    assert q32.dtype == F64
    assert (q32 - q64).abs().max() < 1e-3  # float32 decoder outputs, float64 sums
