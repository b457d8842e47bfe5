"""Proposals over training indices for MAPA and its ablations (method.md §3, §9), as configurable objects.

Each proposal turns query points into *rows*: candidate training indices sorted by decreasing
probability (R, M) and their log-probabilities (R, M). The top K columns are T_K(n); the tail q~ is
a log-softmax over the remaining columns (``mapa_exp.math.proposals``).

* ``KernelProposal`` -- MAPA (Eq 8): q from the cached proximity structure and the likelihood's kernel;
  the bandwidth (default: the likelihood's, sigma^2 for a Gaussian) and rho are applied here, after
  loading, so sweeping them never recomputes distances. With a truncated structure (M < N candidates)
  and ``uniform_share`` eps > 0 the tail is the defensive mixture of ``mapa_exp.math.truncated``.
* ``GroundTruthPosteriorProposal`` -- MAPA-GT (Eq 7): the true index posterior from f_GT and z_GT.
* ``UniformProposal`` -- MAPA-naive: q = 1/N, top-K ties broken self first, then at random.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from mapa_exp.errors import check
from mapa_exp.math.proposals import log_softmax_rows


class Proposal(ABC):
    """Common validation and the (K, S) every proposal carries."""

    uniform_share = 0.0  # the tail's share drawn uniformly from all non-top-K points (KernelProposal)

    def __init__(self, K: int, S: int):
        check(isinstance(K, int) and K >= 1, "method.K", K, "must be an integer >= 1")
        check(isinstance(S, int) and S >= 0, "method.S", S, "must be an integer >= 0")
        self.K, self.S = K, S

    def check_data(self, dataset) -> None:
        """Fail before any work if the data set lacks what this proposal needs (default: nothing)."""

    def check_size(self, n_ref: int, m: int) -> None:
        check(self.K <= n_ref, "method.K", self.K, f"exceeds the number of training points N={n_ref}")
        if self.S > 0:
            if self.uniform_share < 1:
                check(self.K < m, "method.K", self.K, f"leaves no tail to sample S={self.S} from among M={m} candidates")
            if self.uniform_share > 0:
                check(self.K < n_ref, "method.K", self.K, f"leaves no tail to sample S={self.S} from among N={n_ref} points")

    @abstractmethod
    def rows(self, ctx: "ProposalContext", split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate indices (R, M) sorted by decreasing q and their log q (R, M) for ``split``'s points."""


class KernelProposal(Proposal):
    """MAPA: q(m | x_n) proportional to k(x_n, x_m), over the cached M nearest neighbours.

    ``uniform_share`` eps in [0, 1]: the tail samples come from (1 - eps) q~ + eps * uniform over all
    N - K non-top-K points, with their exact log-proposal in the weights (``mapa_exp.math.truncated``).
    0 (the default) is q~ alone: with M < N the bound then covers the neighbour subset only (still a
    lower bound); eps > 0 makes it unbiased for the full tail again.
    """

    def __init__(
        self, K: int, S: int, bandwidth: float | None = None, rho: float | None = None, uniform_share: float = 0.0
    ):
        super().__init__(K, S)
        if bandwidth is not None:
            check(bandwidth > 0, "method.bandwidth", bandwidth, "must be > 0 (or null for the likelihood's default)")
        if rho is not None:
            check(0.5 < rho < 1, "method.rho", rho, "must lie in (0.5, 1)")
        check(isinstance(uniform_share, (int, float)) and 0 <= uniform_share <= 1, "method.uniform_share",
              uniform_share, "must be a number in [0, 1]")
        self.bandwidth, self.rho, self.uniform_share = bandwidth, rho, float(uniform_share)

    def rows(self, ctx, split):
        idx, dist = ctx.neighbors(split)
        self.check_size(ctx.n_train, idx.shape[1])
        log_k = ctx.likelihood.log_kernel(dist, bandwidth=self.bandwidth, rho=self.rho)
        return idx, log_softmax_rows(log_k)


class GroundTruthPosteriorProposal(Proposal):
    """MAPA-GT: q(m | x_n) = p(i_n = m | x_n) under the ground truth (Eq 7), over all N."""

    def check_data(self, dataset) -> None:
        check(getattr(dataset, "has_ground_truth", True), "method", "mapa_gt",
              f"needs ground-truth codes and a decoder, and dataset {getattr(dataset, 'name', '?')!r} has none "
              "(observed data); use method=mapa or method=mapa_naive")

    def rows(self, ctx, split):
        self.check_data(ctx.groundtruth)
        self.check_size(ctx.n_train, ctx.n_train)
        with torch.no_grad():
            means = ctx.groundtruth.decoder(ctx.z_train)  # (N, Dx)
            x = ctx.x[split]
            ll = torch.cat([ctx.likelihood.log_prob(c[:, None, :], means[None]) for c in x.split(256)])  # (R, N)
        log_q, idx = torch.sort(log_softmax_rows(ll), dim=1, descending=True, stable=True)
        return idx, log_q


class UniformProposal(Proposal):
    """MAPA-naive: uniform q; top-K is the point itself (when it is a training point), then random ones."""

    def __init__(self, K: int, S: int, seed: int = 0):
        super().__init__(K, S)
        self.seed = seed

    def rows(self, ctx, split):
        N = ctx.n_train
        self.check_size(N, N)
        g = torch.Generator().manual_seed(self.seed + (0 if split == "train" else 1))
        R = ctx.x[split].shape[0]
        ranks = torch.rand(R, N, generator=g)
        if split == "train":  # self first, the others in random order
            ranks[torch.arange(R), torch.arange(R)] = -1.0
        idx = torch.argsort(ranks, dim=1)
        return idx, torch.full((R, N), -math.log(N))


class ProposalContext:
    """What a proposal may look at: the data, the ground truth and the (cached) neighbour structures.

    ``neighbors(split)`` returns the structure of ``split``'s points (indices, distances), built or loaded
    on first use: proposals that need none (MAPA-GT, MAPA-naive) never pay for it.
    """

    def __init__(self, groundtruth, x: dict, z_train: torch.Tensor | None, neighbors):
        self.groundtruth, self.likelihood = groundtruth, groundtruth.likelihood
        self.x, self.z_train = x, z_train
        self._neighbors, self._built = neighbors, {}
        self.n_train = x["train"].shape[0]

    def neighbors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._built:
            self._built[split] = self._neighbors[split] if isinstance(self._neighbors, dict) else self._neighbors(split)
        return self._built[split]
