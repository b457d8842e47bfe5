"""Exact checks of the bounds in ``mapa_exp.math`` (docs/method.md §1-4).

Every test compares against a value known independently of the code under test: a closed form,
a brute-force sum, an exact expectation by enumeration, or (where only expectations are known) a
Monte-Carlo mean with its standard error.

1. MAPA bound L_{K,S} (Eq 9-10) on a 30-point problem with a real Gaussian likelihood and the
   MAPA kernel proposal:
   * K=1, S=0 is the autoencoder objective minus log N; K=N is the exact Eq 6 value (pure-Python
     brute force), and the autoencoder identity of B.1 holds;
   * S=0 is below the exact value for every K and rises with K; every tail draw lifts it;
   * exact expectations over the tail draws, by enumerating all index tuples (S=1, 2): the
     estimator inside the log is unbiased (E exp L_n = exact, to 1e-12), E L_{K,S} <= exact and
     rises with S;
   * Monte-Carlo through ``sample_tail`` (S=1, 4, 16): the same properties within Monte-Carlo
     error, and agreement with the enumerated expectation;
   * ``tail_log_proposal`` equals renormalised q, and stays finite and normalised for a peaky
     kernel whose tail mass (~1e-20) is lost by 1 - sum(top-K q).
2. ELBO / IWAE on a linear-Gaussian model with closed-form log p(x): constant log-weights
   log p(x) when q is the exact posterior; E[ELBO] equals its closed form;
   E[ELBO] < E[IWAE_10] < E[IWAE_100] < E[IWAE_1000] <= log p(x), the S=1000 gap under 0.005 nats.
3. Gradient estimators (standard / STL / DReG), one estimate per copy of a point, many copies:
   decoder gradients identical per copy; at S=1 all match the closed-form ELBO gradient; at S=5
   DReG's expected encoder gradient equals the standard one with far lower variance, while STL is
   biased; at the exact posterior STL and DReG encoder gradients vanish per sample.

Monte-Carlo comparisons use at least 4 standard errors, more when a test makes many comparisons
(Bonferroni at a family-wise false-alarm rate of 1e-3); every random draw uses a fixed seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.special import logsumexp as np_logsumexp
from scipy.stats import chi2, norm

from mapa_exp.math.bounds import (
    elbo,
    empirical_log_likelihood,
    iwae_bound,
    iwae_surrogate,
    log_weights_gaussian_q,
    mapa_bound,
)
from mapa_exp.math.likelihoods import Gaussian
from mapa_exp.math.proposals import alias_table, log_softmax_rows, sample_tail, tail_log_proposal

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def z_tol(n_comparisons: int = 1, alpha: float = 1e-3) -> float:
    """Critical z for a two-sided test: at least 4, Bonferroni-corrected over the comparisons."""
    return max(4.0, float(norm.isf(alpha / (2 * n_comparisons))))


def mean_se(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample mean and its standard error along ``dim``."""
    return x.mean(dim), x.std(dim) / math.sqrt(x.shape[dim])


# ---------------------------------------------------------------------------------------------
# 1. MAPA: the problem, and the bound evaluated at given tail positions
# ---------------------------------------------------------------------------------------------

N_PTS = 30
SIGMA2 = 0.05


@dataclass
class MapaProblem:
    x: torch.Tensor  # (N, 2) observations
    mu: torch.Tensor  # (N, 2) decoded points x_m + noise
    ll: torch.Tensor  # (N, N) ll[n, m] = log N(x_n; mu_m, sigma2 I)
    order: torch.Tensor  # (N, N) candidate indices per row, by decreasing q (self first)
    ll_sorted: torch.Tensor  # (N, N) ll in that order
    log_q: torch.Tensor  # (N, N) MAPA log q in that order

    @property
    def N(self) -> int:
        return self.ll.shape[0]


def make_mapa_problem(seed: int = 0, N: int = N_PTS, sigma2: float = SIGMA2) -> MapaProblem:
    g = gen(seed)
    lik = Gaussian(sigma2)
    x = 0.5 * torch.randn(N, 2, generator=g, dtype=DT)
    mu = x + 0.1 * torch.randn(N, 2, generator=g, dtype=DT)
    ll = lik.log_prob(x[:, None, :], mu[None, :, :])
    d2 = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    d2_sorted, order = torch.sort(d2, dim=1, stable=True)
    log_q = log_softmax_rows(lik.log_kernel(d2_sorted))
    return MapaProblem(x, mu, ll, order, ll.gather(1, order), log_q)


@pytest.fixture(scope="module")
def prob() -> MapaProblem:
    return make_mapa_problem()


@pytest.fixture(scope="module")
def exact(prob) -> torch.Tensor:
    """The exact empiricalized log-likelihood per point, by brute force."""
    return torch.as_tensor(brute_force_exact(prob.ll))


def brute_force_exact(ll: torch.Tensor) -> np.ndarray:
    """log (1/N) sum_m exp ll[n, m] per row, in pure Python (math.fsum), independent of torch."""
    out = []
    for row in ll.tolist():
        top = max(row)
        out.append(top + math.log(math.fsum(math.exp(v - top) for v in row)) - math.log(len(row)))
    return np.array(out)


def bound_s0(p: MapaProblem, K: int) -> torch.Tensor:
    """L_{K,0}: the top-K terms only (deterministic); (N,)."""
    return mapa_bound(p.ll_sorted[:, :K], p.ll_sorted[:, :0], p.log_q[:, :0], p.N)


def bound_at(p: MapaProblem, K: int, pos: torch.Tensor) -> torch.Tensor:
    """L_{K,S} for tail positions ``pos`` (N, R, S) into each row's tail; returns (N, R)."""
    N, R, S = pos.shape
    log_q_tail = tail_log_proposal(p.log_q, K)
    flat = pos.reshape(N, R * S)
    ll_tail = p.ll_sorted[:, K:].gather(1, flat).reshape(N * R, S)
    lq_tail = log_q_tail.gather(1, flat).reshape(N * R, S)
    ll_top = p.ll_sorted[:, :K].repeat_interleave(R, 0)
    return mapa_bound(ll_top, ll_tail, lq_tail, N).reshape(N, R)


def enumerate_tail(p: MapaProblem, K: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered S-tuple of tail positions: L (N, T) and its probability prod q~ (N, T)."""
    M = p.N - K
    tuples = torch.cartesian_prod(*[torch.arange(M)] * S).reshape(-1, S)  # (T, S)
    pos = tuples[None].expand(p.N, -1, -1)
    log_q_tail = tail_log_proposal(p.log_q, K)
    log_prob = log_q_tail.gather(1, pos.reshape(p.N, -1)).reshape(p.N, -1, S).sum(-1)
    return bound_at(p, K, pos), log_prob.exp()


def sampled_bounds(p: MapaProblem, K: int, S: int, R: int, seed: int) -> torch.Tensor:
    """R independent draws of L_{K,S} per point through ``sample_tail``: (N, R)."""
    log_q_tail = tail_log_proposal(p.log_q, K)
    pos, lq = sample_tail(log_q_tail, R * S, generator=gen(seed))  # R*S iid draws per row
    assert torch.equal(lq, log_q_tail.gather(1, pos))
    return bound_at(p, K, pos.reshape(p.N, R, S))


def test_mapa_problem_setup(prob):
    """ll is a real Gaussian log-density; q rows are normalised, sorted, self first (row max)."""
    ref = norm.logpdf(prob.x[:, None, :].numpy(), prob.mu[None, :, :].numpy(), math.sqrt(SIGMA2))
    np.testing.assert_allclose(prob.ll.numpy(), ref.sum(-1), rtol=0, atol=1e-12)
    assert torch.equal(prob.order[:, 0], torch.arange(prob.N))
    assert torch.all(prob.log_q[:, :-1] >= prob.log_q[:, 1:])
    lse = torch.logsumexp(prob.log_q, -1)
    torch.testing.assert_close(lse, torch.zeros(prob.N, dtype=DT), rtol=0, atol=1e-13)


def test_mapa_K1_S0_is_autoencoder_objective_minus_log_N(prob):
    L = bound_s0(prob, 1)
    expected = prob.ll.diagonal() - math.log(prob.N)
    torch.testing.assert_close(L, expected, rtol=0, atol=1e-12)


def test_mapa_KN_is_exact_empirical_log_likelihood(prob):
    N = prob.N
    exact = brute_force_exact(prob.ll)
    np.testing.assert_allclose(np_logsumexp(prob.ll.numpy(), axis=1) - math.log(N), exact, atol=1e-12)
    np.testing.assert_allclose(empirical_log_likelihood(prob.ll).numpy(), exact, rtol=0, atol=1e-12)
    L = bound_s0(prob, N)
    np.testing.assert_allclose(L.numpy(), exact, rtol=0, atol=1e-12)
    # B.1: log p(X) = sum ll_nn - N log N + sum_n log(1 + sum_{m != n} e^{ll_nm - ll_nn})
    diag = prob.ll.diagonal()
    off = (prob.ll - diag[:, None]).exp().sum(-1) - 1.0
    ae_identity = diag.sum() - N * math.log(N) + torch.log1p(off).sum()
    assert abs(ae_identity.item() - math.fsum(exact)) < 1e-10


def test_mapa_S0_below_exact_rising_in_K(prob, exact):
    L = torch.stack([bound_s0(prob, K) for K in range(1, prob.N + 1)])  # (K, N)
    assert torch.all(L <= exact + 1e-12)
    assert torch.all(L[1:] >= L[:-1])  # adding a top-K term adds mass
    assert torch.all(exact - L[0] > 0)  # strict for K=1: every off-diagonal term is > 0
    torch.testing.assert_close(L[-1], exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize("K", [1, 4])
def test_mapa_exact_expectation_by_enumeration(prob, exact, K):
    """All S-tuples of tail indices (S=1, 2): E exp(L_n) = exact exactly, E L_n <= exact, rising in S."""
    L0 = bound_s0(prob, K)
    expected_L = [L0]
    for S in (1, 2):
        L, w = enumerate_tail(prob, K, S)
        torch.testing.assert_close(w.sum(-1), torch.ones(prob.N, dtype=DT), rtol=0, atol=1e-12)
        assert torch.all(L >= L0[:, None] - 1e-12)  # each draw only adds mass to the S=0 bound
        # unbiasedness of the tail estimator: E exp(L_n) = (1/N) sum_m exp ll[n, m]
        log_mean_ratio = torch.log((w * (L - exact[:, None]).exp()).sum(-1))
        torch.testing.assert_close(log_mean_ratio, torch.zeros(prob.N, dtype=DT), rtol=0, atol=1e-12)
        expected_L.append((w * L).sum(-1))
    EL = torch.stack(expected_L)  # (S = 0, 1, 2; N)
    assert torch.all(EL <= exact + 1e-12)  # Jensen
    assert torch.all(EL[1:] >= EL[:-1] - 1e-12)  # tightens with S, pointwise
    assert torch.all((EL[1:] - EL[:-1]).sum(-1) > 1e-3)  # ... and strictly overall
    assert (exact - EL[2]).sum() > 1e-2  # the S=2 bound is strictly loose


@pytest.mark.parametrize("S", [1, 2])
def test_mapa_expected_bound_rises_in_K(prob, exact, S):
    """E[L_{K,S}] by exhaustive enumeration of the tail tuples, K = 1..N-1: it rises with K at every point
    (not a theorem, method.md §4: checked on this problem; measured summed over the 30 points at S = 1:
    -39.14, -38.63, -38.34, ... up to the exact value) and stays below the exact value."""
    EL = []
    for K in range(1, prob.N):
        L, w = enumerate_tail(prob, K, S)
        EL.append((w * L).sum(-1))
    EL = torch.stack(EL)  # (K, N)
    assert torch.all(EL <= exact + 1e-12)
    assert torch.all(EL[1:] >= EL[:-1] - 1e-12)  # pointwise
    assert torch.all((EL[1:] - EL[:-1]).sum(-1) > 0)  # strictly, summed over the points
    assert float((exact - EL[0]).sum()) > 0.5 > 1e-9 > float((exact - EL[-1]).sum())  # K = 1 loose; K = N - 1 exact


MC_KS = [(K, S) for K in (1, 4) for S in (1, 4, 16)]
MC_DRAWS = 4000


@pytest.fixture(scope="module")
def mc_bounds(prob) -> dict[tuple[int, int], torch.Tensor]:
    return {(K, S): sampled_bounds(prob, K, S, MC_DRAWS, seed=100 + 10 * K + S) for K, S in MC_KS}


def test_mapa_monte_carlo_bound_below_exact_and_rising_in_S(prob, exact, mc_bounds):
    tol = z_tol(len(MC_KS) * prob.N)
    for K in (1, 4):
        L0 = bound_s0(prob, K)
        gaps, ses = [], []
        for S in (1, 4, 16):
            L = mc_bounds[K, S]
            assert torch.all(L >= L0[:, None] - 1e-12)
            m, se = mean_se(L, dim=1)
            assert torch.all(m <= exact + tol * se), (K, S)  # per point, in expectation
            gaps.append((exact - m).sum())  # summed over points; draws independent across points
            ses.append(se.pow(2).sum().sqrt())
        # the bound is visibly loose at S=1 (gap positive by many standard errors) ...
        assert gaps[0] > tol * ses[0]
        # ... and tightens with S: E L_{K,4} > E L_{K,1}, E L_{K,16} > E L_{K,4}
        for i in (0, 1):
            assert gaps[i] - gaps[i + 1] > tol * math.hypot(ses[i], ses[i + 1]), (K, i)


def test_mapa_monte_carlo_agrees_with_enumeration(prob, mc_bounds):
    """sample_tail draws from q~: the MC mean of L_{K,1} matches the enumerated expectation."""
    tol = z_tol(2 * prob.N)
    for K in (1, 4):
        L, w = enumerate_tail(prob, K, 1)
        m, se = mean_se(mc_bounds[K, 1], dim=1)
        assert torch.all((m - (w * L).sum(-1)).abs() <= tol * se), K


def test_mapa_tail_estimator_is_unbiased_monte_carlo(prob, exact, mc_bounds):
    """E[exp L_n] = (1/N) sum_m exp ll[n, m] for every point, K and S (estimator inside the log)."""
    tol = z_tol(len(MC_KS) * prob.N)
    for (K, S), L in mc_bounds.items():
        m, se = mean_se((L - exact[:, None]).exp(), dim=1)
        assert torch.all((m - 1).abs() <= tol * se), (K, S)
        assert torch.all(se < 0.02)  # the check resolves 2% relative error or better


def test_tail_log_proposal_is_renormalised_q_and_sampled_correctly(prob):
    K = 3
    q = prob.log_q.exp()
    log_q_tail = tail_log_proposal(prob.log_q, K)
    assert log_q_tail.shape == (prob.N, prob.N - K)
    renormalised = q[:, K:] / q[:, K:].sum(-1, keepdim=True)
    torch.testing.assert_close(log_q_tail.exp(), renormalised, rtol=1e-12, atol=0)
    pos, lq = sample_tail(log_q_tail, 0)
    assert pos.shape == (prob.N, 0) and lq.shape == (prob.N, 0)
    # 20000 draws per row: Pearson chi-square goodness of fit to q~ (cells with expected count < 5
    # pooled into one), Bonferroni over rows
    n = 20000
    pos, lq = sample_tail(log_q_tail, n, generator=gen(5))
    torch.testing.assert_close(lq, log_q_tail.gather(1, pos), rtol=0, atol=0)
    counts = torch.zeros_like(log_q_tail).scatter_add_(1, pos, torch.ones_like(lq))
    for c, e in zip(counts, n * log_q_tail.exp()):
        big = e >= 5
        obs, exp = c[big], e[big]
        if e[~big].sum() > 0:
            obs, exp = torch.cat([obs, c[~big].sum()[None]]), torch.cat([exp, e[~big].sum()[None]])
        stat = ((obs - exp).pow(2) / exp).sum().item()
        assert chi2.sf(stat, df=len(obs) - 1) > 1e-3 / prob.N


@pytest.mark.parametrize("T", [1, 2, 7, 300])
def test_alias_table_holds_the_distribution_exactly(T):
    """Each column's probability, summed from the table (its own share plus what it stands in for as an alias),
    is q to float64 precision; zero-mass columns get exactly nothing; tiny masses keep their size."""
    g = gen(T)
    log_q = torch.randn(3, T, generator=g, dtype=torch.float64) * 3
    if T > 2:
        log_q[:, 1] = -math.inf  # zero mass
        log_q[:, 2] = log_q[:, 0] - 600  # ~1e-261 of the first column's mass
    q = torch.softmax(log_q, -1)
    table = alias_table(log_q)
    implied = table.prob.clone().scatter_add_(1, table.alias, 1 - table.prob) / T
    torch.testing.assert_close(implied, q, rtol=1e-12, atol=1e-15)
    if T > 2:
        assert (implied[:, 1] == 0).all()  # never drawn: neither kept nor an alias
        torch.testing.assert_close(implied[:, 2] / q[:, 2], torch.ones(3, dtype=torch.float64), rtol=1e-9, atol=0)


def test_tail_log_proposal_peaky_kernel():
    """sigma2 = 0.01, neighbours 0.96 apart: the tail mass is ~1e-20, lost by 1 - sum(top-K q)."""
    sigma2, N, K = 0.01, 12, 1
    lik = Gaussian(sigma2)
    t = torch.arange(N, dtype=DT) * math.sqrt(2 * sigma2 * 46.0)  # neighbour kernel e^-46 ~ 1e-20
    x = torch.stack([t, 0.3 * t], -1) / math.sqrt(1.09)
    d2 = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    d2_sorted, order = torch.sort(d2, dim=1, stable=True)
    scores = lik.log_kernel(d2_sorted)
    log_q = log_softmax_rows(scores)
    top_mass = log_q[:, :K].exp().sum(-1)
    assert torch.all(1.0 - top_mass == 0.0)  # the subtraction loses the whole tail
    tail_mass = torch.logsumexp(log_q[:, K:], -1).exp()
    assert torch.all((tail_mass > 1e-21) & (tail_mass < 1e-19))

    log_q_tail = tail_log_proposal(log_q, K)
    assert torch.isfinite(log_q_tail).all()
    zeros = torch.zeros(N, dtype=DT)
    torch.testing.assert_close(torch.logsumexp(log_q_tail, -1), zeros, rtol=0, atol=1e-12)
    reference = scores[:, K:] - torch.logsumexp(scores[:, K:], -1, keepdim=True)  # from raw scores
    torch.testing.assert_close(log_q_tail, reference, rtol=0, atol=1e-12)
    # interior points: two neighbours at e^-46, the rest at most e^-184, so q~ = 1/2 for each neighbour
    half = torch.full((N - 2, 2), -math.log(2), dtype=DT)
    torch.testing.assert_close(log_q_tail[1:-1, :2], half, rtol=0, atol=1e-12)

    # mu = x makes ll[n, m] - ll[n, n] = score[n, m]: q~ is proportional to exp(ll) on the tail, so
    # the tail estimator has zero variance and recovers the ~1e-20 tail sum exactly in log space
    ll_sorted = lik.log_prob(x[:, None, :], x[None, :, :]).gather(1, order)
    pos, lq = sample_tail(log_q_tail, 8, generator=gen(3))
    ll_tail = ll_sorted[:, K:].gather(1, pos)
    tail_only = mapa_bound(ll_sorted[:, :0], ll_tail, lq, N)
    expected = torch.logsumexp(ll_sorted[:, K:], -1) - math.log(N)
    torch.testing.assert_close(tail_only, expected, rtol=0, atol=1e-9)
    L = mapa_bound(ll_sorted[:, :K], ll_tail, lq, N)
    torch.testing.assert_close(L, empirical_log_likelihood(ll_sorted), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 2. Linear-Gaussian model: z ~ N(0, I_2), x | z ~ N(W z + b, sigma2 I_3)
# ---------------------------------------------------------------------------------------------

DZ, DX, LG_SIGMA2 = 2, 3, 0.5


@dataclass
class LinearGaussian:
    W: torch.Tensor  # (Dx, Dz)
    b: torch.Tensor  # (Dx,)
    sigma2: float

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W.T + self.b

    def log_lik(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return Gaussian(self.sigma2).log_prob(x, mean)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + self.sigma2 * torch.eye(DX, dtype=DT)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact p(z | x): mean (B, Dz) and covariance (Dz, Dz)."""
        cov = torch.linalg.inv(torch.eye(DZ, dtype=DT) + self.W.T @ self.W / self.sigma2)
        return (x - self.b) @ self.W @ cov / self.sigma2, cov

    def imperfect_q(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean-field q, deliberately off: mean shifted by 0.5, marginal variances doubled."""
        mean, cov = self.posterior(x)
        return mean + 0.5, (torch.log(cov.diagonal()) + math.log(2.0)).expand_as(mean)

    def sample_x(self, n: int, g: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, DZ, generator=g, dtype=DT)
        return self.decode(z) + math.sqrt(self.sigma2) * torch.randn(n, DX, generator=g, dtype=DT)


def make_model(seed: int, orthogonal: bool = False) -> LinearGaussian:
    """Random W, b; with ``orthogonal`` W has orthogonal columns, so the posterior is diagonal."""
    g = gen(seed)
    W = torch.randn(DX, DZ, generator=g, dtype=DT)
    if orthogonal:
        W = torch.linalg.qr(W).Q * torch.tensor([1.5, 0.7], dtype=DT)
    return LinearGaussian(W, torch.randn(DX, generator=g, dtype=DT), LG_SIGMA2)


def closed_form_elbo(x, q_mean, q_logvar, W, b, sigma2) -> torch.Tensor:
    """E_q[log p(x|z) + log p(z) - log q(z)] for q = N(q_mean, diag(exp q_logvar)); (B,)."""
    v = q_logvar.exp()
    resid = x - q_mean @ W.T - b
    e_sq = resid.pow(2).sum(-1) + (v * W.pow(2).sum(0)).sum(-1)  # E_q ||x - W z - b||^2
    e_lik = -0.5 * DX * math.log(2 * math.pi * sigma2) - 0.5 * e_sq / sigma2
    e_prior = -0.5 * DZ * math.log(2 * math.pi) - 0.5 * (q_mean.pow(2).sum(-1) + v.sum(-1))
    entropy = 0.5 * (1 + math.log(2 * math.pi) + q_logvar).sum(-1)
    return e_lik + e_prior + entropy


def test_exact_posterior_gives_constant_log_weights():
    """q = p(z|x) (diagonal: W has orthogonal columns) makes every log-weight equal log p(x)."""
    model = make_model(seed=2, orthogonal=True)
    x = model.sample_x(5, gen(3))
    mean, cov = model.posterior(x)
    torch.testing.assert_close(cov, torch.diag(cov.diagonal()), rtol=0, atol=1e-14)
    logvar = torch.log(cov.diagonal()).expand_as(mean)
    log_w, _ = log_weights_gaussian_q(x, mean, logvar, model.decode, model.log_lik, 64, generator=gen(4))
    torch.testing.assert_close(log_w, model.log_marginal(x)[:, None].expand_as(log_w), rtol=0, atol=1e-9)
    torch.testing.assert_close(iwae_bound(log_w), model.log_marginal(x), rtol=0, atol=1e-9)


IWAE_S = (1, 10, 100, 1000)
IWAE_REPLICATES = 2000


@pytest.fixture(scope="module")
def lg_iwae():
    """Imperfect q; 2 points x 2000 replicates x 1000 log-weights, and the exact values."""
    model = make_model(seed=1)
    x = model.sample_x(2, gen(11))
    q_mean, q_logvar = model.imperfect_q(x)
    R, Smax = IWAE_REPLICATES, max(IWAE_S)
    log_w, _ = log_weights_gaussian_q(
        x.repeat_interleave(R, 0), q_mean.repeat_interleave(R, 0), q_logvar.repeat_interleave(R, 0),
        model.decode, model.log_lik, Smax, generator=gen(12),
    )
    exact_elbo = closed_form_elbo(x, q_mean, q_logvar, model.W, model.b, model.sigma2)
    return log_w.reshape(2, R, Smax), model.log_marginal(x), exact_elbo


def blocked(log_w: torch.Tensor, S: int, bound) -> torch.Tensor:
    """Per replicate, the mean of ``bound`` over the Smax/S disjoint blocks of S log-weights.

    Each block is an independent draw of the S-sample bound, so the mean is unbiased for its
    expectation, with a far smaller variance than a single block (and nested across S)."""
    P, R, Smax = log_w.shape
    return bound(log_w.reshape(P, R, Smax // S, S)).mean(-1)  # (P, R)


def test_elbo_expectation_matches_closed_form(lg_iwae):
    log_w, log_px, exact_elbo = lg_iwae
    torch.testing.assert_close(elbo(log_w[..., :1]), iwae_bound(log_w[..., :1]), rtol=0, atol=1e-12)
    m, se = mean_se(blocked(log_w, 1, elbo), dim=1)
    assert torch.all((m - exact_elbo).abs() <= z_tol(2) * se)
    assert torch.all(se < 2e-3)
    assert torch.all(log_px - exact_elbo > 0.5)  # q is clearly imperfect: ELBO gap ~1.1 nats


def test_iwae_rises_with_S_and_converges_to_log_px(lg_iwae):
    log_w, log_px, _ = lg_iwae
    tol = z_tol(2 * len(IWAE_S))
    est = {S: blocked(log_w, S, iwae_bound) for S in IWAE_S}  # (P, R) each
    for S in IWAE_S:
        m, se = mean_se(est[S], dim=1)
        assert torch.all(m <= log_px + tol * se), S  # a lower bound in expectation
    for S1, S2 in zip(IWAE_S[:-1], IWAE_S[1:]):
        m, se = mean_se(est[S2] - est[S1], dim=1)  # paired: same log-weights
        assert torch.all(m > tol * se), (S1, S2)
    gap = {S: log_px - est[S].mean(1) for S in IWAE_S}
    # asymptotically gap ~ chi2(p(z|x) || q) / (2S), chi2 ~ 0.9 here: ~0.045 at S=10, ~0.0045 at 100
    assert torch.all(gap[1] > 1.0) and torch.all(gap[10] < 0.07) and torch.all(gap[100] < 0.01)
    assert torch.all(gap[1000] < 0.005)


# ---------------------------------------------------------------------------------------------
# 3. Gradient estimators: one copy of every parameter per replicate, so .grad rows are
#    per-replicate estimates
# ---------------------------------------------------------------------------------------------

GRAD_COPIES = 100_000


def per_copy_gradients(model, x, q_mean, q_logvar, S, estimator, seed, B=GRAD_COPIES):
    """B independent estimates of grad IWAE_S at one point x: encoder (B, 2 Dz) = d/d(mean, logvar),
    decoder (B, Dx Dz + Dx) = d/d(W, b). Same seed -> same noise, so estimators are paired."""
    qm = q_mean.expand(B, DZ).clone().requires_grad_()
    qlv = q_logvar.expand(B, DZ).clone().requires_grad_()
    W = model.W.expand(B, DX, DZ).clone().requires_grad_()
    b = model.b.expand(B, DX).clone().requires_grad_()

    def decode(z):  # z (B, S, Dz), copy-wise decoder
        return torch.einsum("bij,bsj->bsi", W, z) + b[:, None, :]

    log_w, z = log_weights_gaussian_q(
        x.expand(B, DX), qm, qlv, decode, model.log_lik, S, estimator, generator=gen(seed)
    )
    iwae_surrogate(log_w, z, estimator).sum().backward()
    return torch.cat([qm.grad, qlv.grad], 1), torch.cat([W.grad.reshape(B, -1), b.grad], 1)


ESTIMATORS = ("standard", "stl", "dreg")


@pytest.fixture(scope="module")
def grad_setup():
    model = make_model(seed=1)
    x = model.sample_x(1, gen(21))[0]
    q_mean, q_logvar = model.imperfect_q(x[None])
    grads = {
        (est, S): per_copy_gradients(model, x, q_mean[0], q_logvar[0], S, est, seed=30 + S)
        for S in (1, 5)
        for est in ESTIMATORS
    }
    return model, x, q_mean[0], q_logvar[0], grads


def test_decoder_gradient_identical_across_estimators(grad_setup):
    """STL/DReG only change the encoder path: the decoder gradient is the standard one, per copy."""
    *_, grads = grad_setup
    for S in (1, 5):
        ref = grads["standard", S][1]
        assert ref.abs().mean() > 0.1
        for est in ("stl", "dreg"):
            torch.testing.assert_close(grads[est, S][1], ref, rtol=0, atol=1e-10)


def test_elbo_gradients_match_closed_form(grad_setup):
    """S=1: the expected standard and STL gradients equal grad of the closed-form ELBO; DReG = STL."""
    model, x, q_mean, q_logvar, grads = grad_setup
    params = [q_mean.clone().requires_grad_(), q_logvar.clone().requires_grad_(),
              model.W.clone().requires_grad_(), model.b.clone().requires_grad_()]
    value = closed_form_elbo(x[None], params[0][None], params[1][None], params[2], params[3], model.sigma2)
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(value.sum(), params)])
    torch.testing.assert_close(grads["dreg", 1][0], grads["stl", 1][0], rtol=0, atol=1e-12)
    tol = z_tol(2 * exact.numel())
    for est in ("standard", "stl"):
        per_copy = torch.cat(grads[est, 1], 1)
        m, se = mean_se(per_copy)
        assert torch.all((m - exact).abs() <= tol * se), (est, m - exact, se)
    assert exact.abs().max() > 1.0


def test_dreg_encoder_gradient_unbiased_for_iwae(grad_setup):
    """S=5: E[DReG encoder gradient] = E[standard]; the paired difference resolves ~10% of it."""
    *_, grads = grad_setup
    std, dreg = grads["standard", 5][0], grads["dreg", 5][0]
    m_std, _ = mean_se(std)
    m, se = mean_se(dreg - std)
    tol = z_tol(m.numel())
    assert torch.all(m.abs() <= tol * se)
    assert torch.all(tol * se < 0.2 * m_std.abs())  # the test has power on every component


def test_dreg_reduces_encoder_variance(grad_setup):
    """Known property (Tucker et al. 2019): at S=5 DReG's per-copy variance is far below standard's."""
    *_, grads = grad_setup
    ratio = grads["dreg", 5][0].var(0) / grads["standard", 5][0].var(0)
    assert torch.all(ratio < 0.2), ratio  # ~0.05-0.07 per component on this problem


def test_stl_is_biased_for_iwae(grad_setup):
    """Known property: STL's encoder gradient is biased for S > 1 (here by ~3x on the means)."""
    *_, grads = grad_setup
    m, se = mean_se(grads["stl", 5][0] - grads["standard", 5][0])
    assert torch.all(m.abs() > 10 * se)


def test_path_estimators_vanish_at_exact_posterior():
    """q = p(z|x): d log w / dz = 0, so STL and DReG encoder gradients are 0 per sample; the
    standard estimator is pure score noise with mean 0."""
    model = make_model(seed=2, orthogonal=True)
    x = model.sample_x(1, gen(23))[0]
    mean, cov = model.posterior(x[None])
    logvar = torch.log(cov.diagonal())
    for est in ESTIMATORS:
        enc, _ = per_copy_gradients(model, x, mean[0], logvar, 5, est, seed=40, B=20_000)
        if est == "standard":
            m, se = mean_se(enc)
            assert torch.all(m.abs() <= z_tol(enc.shape[1]) * se)
            assert torch.all(enc.var(0) > 0.05)
        else:
            torch.testing.assert_close(enc, torch.zeros_like(enc), rtol=0, atol=1e-9)


def test_mutual_information_of_a_linear_gaussian_encoder_matches_its_closed_form():
    """x ~ N(0, 1), q(z|x) = N(a x, s^2): the aggregate posterior is N(0, a^2 + s^2), so I_q(x; z) =
    0.5 log(1 + a^2 / s^2) exactly (0.805 nats for a = 1, s = 0.5); an encoder that ignores x carries none."""
    from mapa_exp.math.bounds import mutual_information_gaussian_q

    g = torch.Generator().manual_seed(0)
    n, a, s = 4000, 1.0, 0.5
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)
    logvar = torch.full_like(x, 2 * math.log(s))
    eps = torch.randn(n, 1, generator=g, dtype=torch.float64)
    mi = float(mutual_information_gaussian_q(a * x, logvar, eps))
    assert mi == pytest.approx(0.5 * math.log(1 + a**2 / s**2), abs=0.03)
    assert abs(float(mutual_information_gaussian_q(torch.zeros_like(x), logvar, eps))) < 0.03  # Monte Carlo: 0.007
    stacked = mutual_information_gaussian_q(torch.stack([a * x, 0 * x]), torch.stack([logvar, logvar]),
                                            torch.stack([eps, eps]))  # (E,): members apart
    assert stacked.shape == (2,) and float(stacked[0]) == pytest.approx(mi, abs=1e-12)
