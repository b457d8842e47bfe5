"""Truncated MAPA (method.md §4): top-K from the M nearest neighbours, the tail from the defensive mixture
(1 - eps) q~ + eps * uniform over all non-top-K points, with the exact log-proposal in the weights.

Checked against independent values on a 300-point problem whose log-likelihood matrix ll (N, N) is
known (a Gaussian likelihood around perturbed "decoded" points; the truncation to M neighbours loses
mass):

* the mixture's log-density equals the one written out by enumeration, and its samples follow it;
  the uniform part never returns a top-K index;
* eps = 0 is the untruncated code path bit for bit;
* S = 0: L <= exact empiricalized log-likelihood (Eq 6) for every point and every M;
* the tail estimator is unbiased: E exp(L_n) = (1/N) sum over T_K and the proposal's support, i.e.
  the M neighbours for eps = 0 (<= the exact value) and all N points for eps > 0 (= the exact value);
* E L <= exact, and the gap shrinks as M -> N (eps = 0);
* the datamodule trains with ``data.neighbors_M`` and ``method.uniform_share``, and refuses a dense
  structure too large for memory in one line.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mapa_exp.data.datamodule as dm
from mapa_exp.methods.proposals import ProposalTables, candidate_batch
from mapa_exp.methods.proposals import KernelProposal, ProposalContext
from mapa_exp.data.proximity import nearest_neighbors
from mapa_exp.errors import ConfigError
from mapa_exp.math.bounds import empirical_log_likelihood, mapa_bound
from mapa_exp.math.likelihoods import Gaussian
from mapa_exp.math.proposals import sample_tail, tail_log_proposal
from mapa_exp.math.truncated import mixture_log_prob, sample_outside, sample_tail_mixture
from mapa_exp.runs.training import run_training
from tests.conftest import FAST, compose_cfg

N, K = 300, 3


class _Data:
    likelihood = Gaussian(0.01)


BANDWIDTH = 0.05  # the kernel matches the likelihood's width: bounded weights, honest standard errors


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(N, generator=g) * 2 * math.pi
    x = torch.stack([torch.cos(t), torch.sin(2 * t) / 2], 1) + 0.05 * torch.randn(N, 2, generator=g)
    means = x + 0.05 * torch.randn(N, 2, generator=g)  # f(g(x_m)): near, not at, the data
    ll = Gaussian(0.05).log_prob(x[:, None, :], means[None, :, :])  # (N, N)
    return x, ll.double(), empirical_log_likelihood(ll.double())


def kernel_rows(x, M):
    idx, dist = nearest_neighbors(x, M=M)
    ctx = ProposalContext(_Data(), {"train": x}, None, {"train": (torch.from_numpy(idx), torch.from_numpy(dist))})
    return KernelProposal(K, 1, bandwidth=BANDWIDTH).rows(ctx, "train")


def draw_bounds(problem, M, S, eps, R, seed=0):
    """R independent L_{K,S} per point (R, N) through the BatchBuilder, as training draws them."""
    x, ll, _ = problem
    codes = torch.arange(N, dtype=torch.float64)[None, :, None]  # x_ref = the index itself: x_union names the candidates
    tables = ProposalTables([kernel_rows(x, M)], K)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(R):
        b = candidate_batch(tables, codes, torch.tensor([0]), torch.arange(N)[None], [g], K, S, eps)
        cand = b["x_union"][0][b["pos"][0], 0].long()  # (N, K+S) training indices
        ll_c = ll.gather(1, cand)
        out.append(mapa_bound(ll_c[:, :K], ll_c[:, K:], b["tail_log_q"][0].double(), N))
    return torch.stack(out)


def support_value(problem, M, eps):
    """log (1/N) sum of e^ll over T_K and the tail proposal's support: the M neighbours, or all N if eps > 0."""
    x, ll, exact = problem
    if eps > 0:
        return exact
    idx, _ = kernel_rows(x, M)
    return torch.logsumexp(ll.gather(1, idx), 1) - math.log(N)


# -- the mixture itself ------------------------------------------------------------------------
def test_sample_outside_is_uniform_off_the_excluded():
    excluded = torch.tensor([[7, 2, 5]] * 4)
    draws = sample_outside(excluded, 10, 20_000, torch.Generator().manual_seed(1)).flatten()
    counts = torch.bincount(draws, minlength=10).double()
    assert counts[[2, 5, 7]].sum() == 0
    allowed = counts[[0, 1, 3, 4, 6, 8, 9]]
    p = 1 / 7
    assert ((allowed - draws.numel() * p).abs() < 5 * math.sqrt(draws.numel() * p * (1 - p))).all()


@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0])
def test_mixture_log_prob_equals_enumeration_and_sampling_follows_it(problem, eps):
    x = problem[0]
    idx, log_q = kernel_rows(x, 12)
    rows, tail = idx[:5], tail_log_proposal(log_q[:5], K)  # (5, 12), (5, 9)
    q_mix = torch.zeros(5, N, dtype=torch.float64)  # written out: (1 - eps) q~ on the neighbours' tail + eps/(N-K) off T_K
    q_mix.scatter_(1, rows[:, K:], (1 - eps) * tail.double().exp())
    q_mix += eps / (N - K)
    q_mix.scatter_(1, rows[:, :K], 0.0)
    assert torch.allclose(q_mix.sum(1), torch.ones(5, dtype=torch.float64))
    everyone = torch.arange(N).expand(5, N)
    off_top = q_mix > 0
    got = mixture_log_prob(rows, tail, K, N, eps, everyone).double()
    assert torch.allclose(got[off_top], q_mix.log()[off_top], atol=1e-5)
    S = 40_000
    index, log_p = sample_tail_mixture(rows, tail, K, N, S, eps, torch.Generator().manual_seed(2))
    assert torch.equal(log_p, mixture_log_prob(rows, tail, K, N, eps, index))  # the weights use the exact density
    assert not (index[:, :, None] == rows[:, None, :K]).any()  # never a top-K index
    freq = torch.zeros(5, N, dtype=torch.float64).scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64)) / S
    assert ((freq - q_mix).abs() <= 5 * (q_mix * (1 - q_mix) / S).sqrt() + 1e-4).all()


def test_zero_uniform_share_batch_is_sample_tail_and_unique_bit_for_bit(problem):
    """The datamodule's MAPA batch with eps = 0 is q~'s own sampler and the sorted union, written out here."""
    x = problem[0]
    rows = kernel_rows(x, 40)
    n = torch.arange(0, N, 3)
    got = candidate_batch(ProposalTables([rows], K), x[None], torch.tensor([0]), n[None],
                          [torch.Generator().manual_seed(5)], K, 6, 0.0)
    pos, tail_log_q = sample_tail(tail_log_proposal(rows[1], K)[n], 6, torch.Generator().manual_seed(5))
    cand = torch.cat([rows[0][n, :K], torch.gather(rows[0][n, K:], 1, pos)], 1)
    union, inverse = torch.unique(cand, return_inverse=True)
    assert torch.equal(got["pos"][0], inverse) and torch.equal(got["tail_log_q"][0], tail_log_q)
    assert torch.equal(got["x_union"][0], x[union]) and got["U"].tolist() == [len(union)]


def test_union_of_a_stack_is_each_members_own():
    """Members' unions are computed together (offset indices, zero padding) and equal each member's alone."""
    from mapa_exp.methods.proposals import union_of_candidates

    g = torch.Generator().manual_seed(0)
    cand = torch.randint(0, 50, (3, 7, 4), generator=g)  # three members
    draws = torch.tensor([1, 0, 1])
    for n_ref in (50, 5000):  # marks over all indices (small N), or a sort (N much larger than the batch)
        x_ref = torch.randn(2, n_ref, 3, generator=g)  # two draws
        x_union, pos, counts = union_of_candidates(cand, x_ref, draws)
        for e in range(3):
            u, inv = torch.unique(cand[e], return_inverse=True)
            assert counts[e] == len(u) and torch.equal(pos[e], inv)
            assert torch.equal(x_union[e, : len(u)], x_ref[draws[e], u]) and (x_union[e, len(u):] == 0).all()


# -- the bound -----------------------------------------------------------------------------
@pytest.mark.parametrize("M", [K, 10, 60, N])
def test_s0_bound_is_below_exact_for_every_point(problem, M):
    _, _, exact = problem
    L = draw_bounds(problem, max(M, K + 1), S=0, eps=0.0, R=1)[0]
    assert (L <= exact + 1e-12).all()


@pytest.fixture(scope="module")
def draws(problem):
    return {(M, eps): draw_bounds(problem, M, S=8, eps=eps, R=300, seed=M) for M in (10, 60, N) for eps in (0.0, 0.2)}


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("M", [10, 60, N])
def test_tail_estimator_is_unbiased_for_its_support(problem, draws, M, eps):
    _, _, exact = problem
    target = support_value(problem, M, eps)
    assert (target <= exact + 1e-9).all()
    ratio = (draws[M, eps] - target).exp()  # E ratio = 1 per point
    mean, se = ratio.mean(0), ratio.std(0) / math.sqrt(ratio.shape[0])
    assert ((mean - 1).abs() <= 5 * se + 1e-9).all()  # 5 SE over 300 points: family-wise ~2e-4
    assert abs(mean.mean().item() - 1) < 0.02


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_mean_bound_below_exact_and_tightening_as_M_grows(problem, draws, eps):
    _, _, exact = problem
    gaps = {}
    for M in (10, 60, N):
        L = draws[M, eps]
        mean, se = L.mean(0), L.std(0) / math.sqrt(L.shape[0])
        assert (mean <= exact + 5 * se).all()
        gaps[M] = (exact - mean).mean().item()
        assert gaps[M] > 0
    if eps == 0:  # the neighbour subset grows to everything: the gap shrinks
        assert gaps[10] > gaps[60] > gaps[N]
        assert gaps[10] > 5 * gaps[N]
    assert gaps[N] < 0.1


# -- the datamodule and training -----------------------------------------------------------
def test_uniform_share_and_tail_size_are_validated():
    with pytest.raises(ConfigError, match=r"^method.uniform_share=1.5: "):
        KernelProposal(2, 3, uniform_share=1.5)
    KernelProposal(5, 3, uniform_share=0.0).check_size(100, 6)
    with pytest.raises(ConfigError, match="no tail"):
        KernelProposal(5, 3, uniform_share=0.0).check_size(100, 5)  # M = K: nothing to sample from q~
    KernelProposal(5, 3, uniform_share=1.0).check_size(100, 5)  # all uniform: fine


def test_truncated_structure_with_uniform_share_trains_to_a_bound_below_the_exact_value(tmp_path, cache_dir):
    """Trained with 32 neighbours and a uniform share: the final training bound (one draw of the tail per
    point) lies below the trained model's exact empiricalized log-likelihood (Eq 6, all N x N terms)."""
    from mapa_exp.evaluation.runs import load_run

    cfg = compose_cfg(["dataset=figure8", "method=mapa", "data.neighbors_M=32", "method.uniform_share=0.1", *FAST],
                      tmp_path / "run", cache_dir)
    res = run_training(cfg)
    assert res["status"] == "completed"
    assert 1 <= res["passes_per_point_decoder"] <= cfg.method.K + cfg.method.S
    run = load_run(tmp_path / "run", checkpoint="last")  # the weights the final bound was computed with
    x = run.datamodule.x["train"]
    with torch.no_grad():
        params = run.module.generative_decoder(0)(run.module.codes(x))  # (N, Dx)
        exact = empirical_log_likelihood(run.module.likelihood.log_prob_matrix(x.double(), params.double()))
    gap = float(exact.mean()) - res["train_bound"]
    assert 0 < gap < 5, gap  # a bound, and not a vacuous one (measured: 0.78 nats)


def test_dense_structure_too_large_is_refused_in_one_line(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(dm, "DENSE_MAX_BYTES", 1000)
    cfg = compose_cfg(["dataset=figure8", "method=mapa", *FAST], tmp_path / "run", cache_dir)
    with pytest.raises(ConfigError, match=r"^data.neighbors_M=None: the dense structure for N=200 needs"):
        run_training(cfg)


def test_neighbors_M_above_N_is_refused(tmp_path, cache_dir):
    cfg = compose_cfg(["dataset=figure8", "method=mapa", "data.neighbors_M=500", *FAST], tmp_path / "run", cache_dir)
    with pytest.raises(ConfigError, match=r"^data.neighbors_M=500: must be null or an integer between 1 and"):
        run_training(cfg)
