"""Prior recovery (mapa_exp.math.prior_recovery): copula map, its inverse, recovered log p(x), mixtures."""

import math

import pytest
import torch
from scipy import stats

from mapa_exp.math.likelihoods import Gaussian
from mapa_exp.math.prior_recovery import CopulaPrior1D, MixturePrior, compose_decoder
from mapa_exp.math.quadrature import quadrature_log_likelihood

F64 = torch.float64
SIGMA2 = 0.01
W = torch.tensor([[1.0], [-0.5]], dtype=F64)  # (Dx=2, Dz=1)
B = torch.tensor([0.2, 0.1], dtype=F64)


def linear_decode(z):
    return z @ W.T.to(z) + B.to(z)


def linear_gaussian_marginal(x, mean_z, sd_z):
    """log N(x; W mean_z + b, sd_z² W Wᵀ + σ² I) for z ~ N(mean_z, sd_z²)."""
    cov = sd_z**2 * W @ W.T + SIGMA2 * torch.eye(2, dtype=F64)
    return torch.distributions.MultivariateNormal(W[:, 0] * mean_z + B, cov).log_prob(x)


def data_from(z_codes_mean, z_codes_sd, n, g):
    z = z_codes_mean + z_codes_sd * torch.randn(n, 1, generator=g, dtype=F64)
    return linear_decode(z) + math.sqrt(SIGMA2) * torch.randn(n, 2, generator=g, dtype=F64)


def exponential_codes(n, g):
    return -torch.log(torch.rand(n, generator=g, dtype=F64))


def bimodal_codes(n, g):
    side = torch.rand(n, generator=g, dtype=F64) < 0.3
    return torch.where(side, -2 + 0.3 * torch.randn(n, generator=g, dtype=F64),
                       1 + 0.5 * torch.randn(n, generator=g, dtype=F64))


@pytest.mark.parametrize("make_codes", [exponential_codes, bimodal_codes])
def test_copula_whitens_codes_and_fresh_codes(make_codes):
    g = torch.Generator().manual_seed(0)
    codes = make_codes(5000, g)
    prior = CopulaPrior1D.fit(codes, bins=None)
    zhat = prior.to_standard(codes)
    assert stats.kstest(zhat.numpy(), "norm").pvalue > 0.01
    fresh = prior.to_standard(make_codes(2000, g))  # the map generalises to codes it was not fitted on
    assert stats.kstest(fresh.numpy(), "norm").pvalue > 0.01
    assert stats.kstest(codes.numpy(), "norm").pvalue < 1e-6  # and the codes themselves were not normal


def test_copula_map_and_inverse_are_inverse_and_monotone():
    g = torch.Generator().manual_seed(1)
    prior = CopulaPrior1D.fit(exponential_codes(1000, g), bins=None)
    zhat = torch.linspace(-8, 8, 4001, dtype=F64)  # well beyond the outermost knots (±3.3)
    z = prior.to_latent(zhat)
    assert (z.diff() > 0).all()
    assert (prior.to_standard(z) - zhat).abs().max() < 1e-10
    zz = torch.linspace(-5, 15, 4001, dtype=F64)  # codes lie in (0, ~7)
    assert (prior.to_latent(prior.to_standard(zz)) - zz).abs().max() < 1e-10
    assert prior.to_latent(zhat[:, None]).shape == (4001, 1)  # shape-preserving, for decode ∘ h


def test_recovered_model_is_exactly_linear_gaussian_on_quantile_codes():
    # codes at the exact quantiles a Φ⁻¹(k/(N+1)) + c, shuffled: every knot lies on z = a·sd_u·ẑ + c
    # (sd_u: the population sd of the copula scores, whitening divides by it), so the recovered
    # model, extrapolation included, is the linear-Gaussian model with prior N(c, (a sd_u)²).
    N, a, c = 1000, 0.7, 0.3
    u = torch.special.ndtri(torch.arange(1, N + 1, dtype=F64) / (N + 1))
    g = torch.Generator().manual_seed(2)
    prior = CopulaPrior1D.fit((a * u + c)[torch.randperm(N, generator=g)], bins=None)
    x = data_from(c, a, 300, g)
    exact = linear_gaussian_marginal(x, c, a * u.std(correction=0))
    via_grid = quadrature_log_likelihood(x, linear_decode, Gaussian(SIGMA2), 2000, 1, prior=prior)
    via_composition = quadrature_log_likelihood(x, compose_decoder(linear_decode, prior), Gaussian(SIGMA2), 2000, 1)
    assert (via_grid - exact).abs().max() < 1e-8
    assert (via_composition - via_grid).abs().max() < 1e-12


@pytest.mark.parametrize("bins", [None, 8])
def test_recovered_model_from_random_gaussian_codes(bins):
    # codes z = a ε + c: the recovered model tends to the linear-Gaussian marginal as N grows. At
    # N = 20000 the quantile noise of h is a·sqrt(p(1-p))/(φ(ẑ) sqrt N) ≈ 0.006 at the median and
    # larger in the tails; measured (seeds 3, 4, 5), interpolating map: mean |error| 0.014-0.018 nats,
    # mean error -0.001 to -0.005, max 0.17-0.24; smooth map (8 bins): 0.010-0.013, -0.002, 0.03-0.12.
    # Bounds at ~2x.
    N, a, c = 20000, 0.7, 0.3
    g = torch.Generator().manual_seed(3)
    prior = CopulaPrior1D.fit(c + a * torch.randn(N, generator=g, dtype=F64), bins=bins)
    x = data_from(c, a, 300, g)
    q = quadrature_log_likelihood(x, linear_decode, Gaussian(SIGMA2), 3000, 1, prior=prior)
    err = q - linear_gaussian_marginal(x, c, a)
    assert err.abs().mean() < 0.03
    assert abs(float(err.mean())) < 0.01
    assert err.abs().max() < 0.5


def test_smooth_copula_map_density_and_change_of_variables():
    # every code a knot: log_prob is a one-spacing density estimate (mean |error| 0.75 nats here); the smooth
    # map through 8 bin means: < 0.05
    g = torch.Generator().manual_seed(4)
    codes = 0.3 + 0.7 * torch.randn(20000, generator=g, dtype=F64)
    t = 0.3 + 0.7 * torch.randn(5000, generator=g, dtype=F64)
    true = torch.distributions.Normal(0.3, 0.7).log_prob(t)
    rough = CopulaPrior1D.fit(codes, bins=None)
    smooth = CopulaPrior1D.fit(codes, bins=8)
    assert (rough.log_prob(t[:, None]) - true).abs().mean() > 0.5
    assert (smooth.log_prob(t[:, None]) - true).abs().mean() < 0.05
    zhat = torch.linspace(-5, 5, 41, dtype=F64)  # beyond the bins' range too (linear tails)
    z = smooth.to_latent(zhat)
    assert (z.diff() > 0).all() and (smooth.to_standard(z) - zhat).abs().max() < 1e-9
    slope = (smooth.to_latent(zhat + 1e-6) - smooth.to_latent(zhat - 1e-6)) / 2e-6
    # change of variables: log p_z(h(ẑ)) = log φ(ẑ) - log h'(ẑ)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(zhat) - slope.log()
    assert (smooth.log_prob(z[:, None]) - expected).abs().max() < 1e-4  # a table of 4097 nodes


@pytest.mark.parametrize("name", ["circle", "figure8"])
def test_smooth_map_recovers_a_ground_truth_from_its_own_codes(name, cache_dir):
    """A perfect MAPA: the ground truth's decoder and its own codes (true map: the identity). The recovered
    model's test KL (exact quadrature) must stay <= 0.003 nats on three draws; the interpolating map, whose
    density follows the codes' spacing noise, costs more on some draw."""
    from mapa_exp.data import analytic
    from mapa_exp.data.groundtruth import GroundTruth

    worst = {8: 0.0, None: 0.0}
    for draw in range(3):
        gt = GroundTruth(name, getattr(analytic, name), Gaussian(SIGMA2), draw=draw, cache_dir=str(cache_dir),
                         surrogate={"steps": 300, "n_fit": 512})
        splits = gt.splits()
        decode = lambda z: gt.decoder(z.float()).double()  # noqa: E731
        x = splits["test"].x.double()
        truth = quadrature_log_likelihood(x, decode, gt.likelihood, 20000, 1)
        for bins in worst:
            prior = CopulaPrior1D.fit(splits["train"].z[:, 0], bins=bins)
            kl = float((truth - quadrature_log_likelihood(x, compose_decoder(decode, prior), gt.likelihood, 20000, 1)).mean())
            worst[bins] = max(worst[bins], kl)
    assert worst[8] <= 0.003, worst
    assert worst[None] > worst[8], worst


def test_priors_round_trip_through_weights_only_torch_save(tmp_path):
    g = torch.Generator().manual_seed(5)
    copula = CopulaPrior1D.fit(exponential_codes(500, g))
    mixture = MixturePrior.fit(torch.randn(500, 2, generator=g, dtype=F64), n_components=3)
    torch.save({"copula": copula.state_dict(), "mixture": mixture.state_dict()}, tmp_path / "priors.pt")
    state = torch.load(tmp_path / "priors.pt", weights_only=True)
    z = torch.linspace(-4, 4, 101, dtype=F64)
    assert torch.equal(CopulaPrior1D.from_state_dict(state["copula"]).to_latent(z), copula.to_latent(z))
    z2 = torch.randn(50, 2, generator=g, dtype=F64)
    assert torch.equal(MixturePrior.from_state_dict(state["mixture"]).log_prob(z2), mixture.log_prob(z2))


def gaussian_codes_2d(n, g):
    L = torch.tensor([[1.0, 0.0], [0.6, 0.5]], dtype=F64)
    mu = torch.tensor([1.0, -2.0], dtype=F64)
    codes = mu + torch.randn(n, 2, generator=g, dtype=F64) @ L.T
    return codes, torch.distributions.MultivariateNormal(mu, scale_tril=L)


def test_mixture_prior_recovers_a_gaussian():
    # measured on 20000 fresh points, N = 5000 codes: C = 1: KL 2e-4, mean |Δ| 0.007, max 0.08;
    # C = 10 (default; extra components overfit): KL 0.008, mean |Δ| 0.10
    g = torch.Generator().manual_seed(6)
    codes, true = gaussian_codes_2d(5000, g)
    t, _ = gaussian_codes_2d(20000, g)
    one = true.log_prob(t) - MixturePrior.fit(codes, n_components=1).log_prob(t)
    assert one.abs().mean() < 0.02 and one.abs().max() < 0.2 and abs(float(one.mean())) < 0.002
    ten = true.log_prob(t) - MixturePrior.fit(codes).log_prob(t)
    assert float(ten.mean()) < 0.02  # Monte-Carlo KL(true || fitted)
    mp = MixturePrior.fit(codes, n_components=3)
    s = mp.sample(20000, generator=g)
    assert (s.mean(0) - true.mean).abs().max() < 0.05
    assert (torch.cov(s.T) - true.covariance_matrix).abs().max() < 0.05


def test_quadrature_under_a_mixture_prior_matches_the_closed_form():
    # linear decoder, mixture prior: p(x) = Σ_c π_c N(x; A μ_c + b, A Σ_c Aᵀ + σ² I), exact
    g = torch.Generator().manual_seed(7)
    codes, _ = gaussian_codes_2d(2000, g)
    mp = MixturePrior.fit(codes, n_components=3)
    A = torch.tensor([[1.0, 0.3], [-0.4, 0.8], [0.5, 0.5]], dtype=F64)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=F64)
    decode = lambda z: z @ A.T + b
    x = decode(mp.sample(200, generator=g)) + math.sqrt(SIGMA2) * torch.randn(200, 3, generator=g, dtype=F64)
    cov = mp.scale_tril @ mp.scale_tril.transpose(-1, -2)  # (C, 2, 2)
    comp = torch.distributions.MultivariateNormal(mp.means @ A.T + b, A @ cov @ A.T + SIGMA2 * torch.eye(3, dtype=F64))
    exact = torch.logsumexp(comp.log_prob(x[:, None, :]) + mp.log_weights, -1)
    q = quadrature_log_likelihood(x, decode, Gaussian(SIGMA2), 300, 2, prior=mp)
    assert (q - exact).abs().max() < 1e-4
    with pytest.raises(ValueError, match="rule"):
        mp.quadrature_grid(10, rule="equal_mass")


def test_mixture_grid_holds_the_mass_of_tight_far_apart_components():
    """Five tight components (sd 0.01) spread over [-3, 3]^2: the grid's weights sum to 1, and log p(x) of a
    linear decoder matches the closed form (a box grid over all of them held 0.93 of the mass at J = 400)."""
    g = torch.Generator().manual_seed(8)
    means = torch.tensor([[-3.0, -3.0], [3.0, 3.0], [0.0, 0.5], [-2.0, 2.5], [2.5, -1.0]], dtype=F64)
    L = 0.01 * torch.eye(2, dtype=F64).expand(5, 2, 2).clone()
    mp = MixturePrior(torch.full((5,), 0.2, dtype=F64).log(), means, L)
    grid = mp.quadrature_grid(400)
    assert abs(float(torch.logsumexp(grid.log_weights, 0))) < 1e-12
    A = torch.tensor([[1.0, 0.3], [-0.4, 0.8]], dtype=F64)
    decode = lambda z: z @ A.T  # noqa: E731
    x = decode(mp.sample(100, generator=g)) + math.sqrt(SIGMA2) * torch.randn(100, 2, generator=g, dtype=F64)
    comp = torch.distributions.MultivariateNormal(means @ A.T, A @ (L @ L.transpose(-1, -2)) @ A.T
                                                  + SIGMA2 * torch.eye(2, dtype=F64))
    exact = torch.logsumexp(comp.log_prob(x[:, None, :]) + mp.log_weights, -1)
    q = quadrature_log_likelihood(x, decode, Gaussian(SIGMA2), 100, 2, prior=mp)
    assert (q - exact).abs().max() < 1e-8
