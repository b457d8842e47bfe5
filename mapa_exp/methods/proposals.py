"""Proposals over training indices for MAPA and its ablations (method.md §3, §9), and the batches they make.

Each proposal turns query points into *rows*: candidate training indices sorted by decreasing
probability (R, M) and their log-probabilities (R, M). The top K columns are T_K(n); the tail q~ is
a log-softmax over the remaining columns (``mapa_exp.math.proposals``).

* ``KernelProposal`` -- MAPA (Eq 8): q from the cached proximity structure and the likelihood's kernel;
  the bandwidth (default: the likelihood's, sigma^2 for a Gaussian) and rho are applied here, after
  loading, so sweeping them never recomputes distances. With a truncated structure (M < N candidates)
  and ``uniform_share`` eps > 0 the tail is the defensive mixture of ``mapa_exp.math.truncated``.
* ``GroundTruthPosteriorProposal`` -- MAPA-GT (Eq 7): the true index posterior from f_GT and z_GT.
* ``UniformProposal`` -- MAPA-naive: q = 1/N, top-K ties broken self first, then at random.

A proposal's rows are turned once into ``ProposalTables`` (the tail as an alias table, so a step draws each tail
sample in O(1)); ``candidate_batch`` then makes the MAPA part of a batch: the top-K set, the S tail samples drawn
from each member's own generator, and the union of both, on which g_phi and f_theta run once
(``union_of_candidates``). ``log_q_of`` gives q(m | x) of arbitrary points, for the dashboards' pictures.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from mapa_exp.errors import check
from mapa_exp.math.proposals import AliasTable, alias_positions, alias_table, log_softmax_rows, tail_log_proposal, take
from mapa_exp.math.proposals import uniforms
from mapa_exp.math.truncated import mixture_from_uniforms, mixture_log_prob


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

    @abstractmethod
    def log_q_of(self, ctx: "ProposalContext", x: torch.Tensor) -> torch.Tensor:
        """log q(m | x) of the points ``x`` (n, Dx) over every training index m, in index order: (n, N)."""


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

    def log_q_of(self, ctx, x):
        from mapa_exp.data.proximity import nearest_neighbors

        idx, dist = nearest_neighbors(ctx.x["train"], x, metric=ctx.likelihood.metric)  # (n, N), sorted (numpy)
        idx, dist = torch.from_numpy(idx), torch.from_numpy(dist).to(torch.get_default_dtype())
        log_q = log_softmax_rows(ctx.likelihood.log_kernel(dist, bandwidth=self.bandwidth, rho=self.rho))
        return torch.empty_like(log_q).scatter_(1, idx, log_q)


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

    def log_q_of(self, ctx, x):
        with torch.no_grad():
            means = ctx.groundtruth.decoder(ctx.z_train)  # (N, Dx)
            return log_softmax_rows(ctx.likelihood.log_prob(x[:, None, :], means[None]))


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

    def log_q_of(self, ctx, x):
        return torch.full((x.shape[0], ctx.n_train), -math.log(ctx.n_train))


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


class ProposalTables:
    """A proposal's rows for one split of every draw: candidates (D, n, M), log q~ (D, n, M - K) and the
    alias table of q~ (rows d * n + i), built once: a tail draw then costs O(1) whatever M."""

    def __init__(self, rows: list[tuple[torch.Tensor, torch.Tensor]], K: int):
        idx = torch.stack([r[0] for r in rows])  # (D, n, M)
        self.idx = idx.to(torch.int32) if idx.max() < 2**31 - 1 else idx
        self.log_q_tail = torch.stack([tail_log_proposal(r[1], K) for r in rows])  # (D, n, T), T = M - K
        D, n, T = self.log_q_tail.shape
        tables = [alias_table(t) for t in self.log_q_tail]
        self.alias = AliasTable(torch.cat([t.prob for t in tables]), torch.cat([t.alias for t in tables]))  # (D*n, T)


def candidate_batch(tables: ProposalTables, x_ref: torch.Tensor, member_draw: torch.Tensor, idx: torch.Tensor,
                    gens: Sequence[torch.Generator | None], K: int, S: int, uniform_share: float = 0.0) -> dict:
    """The MAPA part of a batch (module doc) for the points ``idx`` (E, b) of each member: its top-K set from
    ``tables``, S tail samples drawn with member e's generator ``gens[e]``, and the union of both.

    tables: the proposal's rows of the points' split (D draws); x_ref: the training points (D, N, Dx);
    member_draw: (E,) each member's draw. Returns ``x_union``, ``pos``, ``U``, ``tail_log_q``, ``K``, ``N``.
    """
    E, b = idx.shape
    N = x_ref.shape[1]
    draw = member_draw[:, None]  # (E, 1)
    cand = tables.idx[draw, idx, :K].long()  # (E, b, K) the top-K set
    tail_log_q = torch.empty(E, b, 0)
    if S > 0:
        n = tables.idx.shape[1]
        table_rows = draw * n + idx  # (E, b) rows of the alias table
        u = torch.stack([uniforms((b, S, 4 if uniform_share > 0 else 2), g) for g in gens])  # (E, b, S, .)
        if uniform_share > 0:
            rows = tables.idx[draw, idx].long()  # (E, b, M)
            flat = lambda t: t.flatten(0, 1)  # noqa: E731  (E*b, ...)
            tail = mixture_from_uniforms(flat(rows), tables.alias, flat(table_rows), K, N, uniform_share, flat(u))
            tail_log_q = mixture_log_prob(flat(rows), flat(tables.log_q_tail[draw, idx]), K, N, uniform_share,
                                          tail).view(E, b, S)
            tail = tail.view(E, b, S)
        else:
            pos = alias_positions(tables.alias, table_rows, u)  # (E, b, S) positions in the tail
            M, T = tables.idx.shape[-1], tables.log_q_tail.shape[-1]
            tail = take(tables.idx, table_rows[..., None] * M + K + pos).long()
            tail_log_q = take(tables.log_q_tail, table_rows[..., None] * T + pos)
        cand = torch.cat([cand, tail], -1)  # (E, b, K+S)
    x_union, pos, counts = union_of_candidates(cand, x_ref, member_draw)
    return {"x_union": x_union, "pos": pos, "U": counts, "tail_log_q": tail_log_q, "K": K, "N": N}


def union_of_candidates(cand: torch.Tensor, x_ref: torch.Tensor, member_draw: torch.Tensor):
    """Each member's distinct candidates, their points and where each candidate sits among them.

    cand: (E, b, C) training indices in [0, N); x_ref: (D, N, Dx); member_draw: (E,) into x_ref.
    Returns ``x_union`` (E, U, Dx) (member e's distinct candidates in increasing index order, zero rows after
    its count), ``pos`` (E, b, C) positions into member e's rows, and the counts (E,).
    """
    E, N = cand.shape[0], x_ref.shape[1]
    key = (cand + (torch.arange(E) * N)[:, None, None]).reshape(-1)  # member e's index m -> e*N + m
    if E * N <= 8 * key.numel():  # dense marks beat sorting when the index range is small
        present = torch.zeros(E * N, dtype=torch.bool)
        present[key] = True
        uniq = present.nonzero().squeeze(1)  # sorted
        rank = present.cumsum(0) - 1  # (E*N,) global position among the present keys
        counts = present.view(E, N).sum(1)
        inverse = rank[key]
    else:
        uniq, inverse = torch.unique(key, return_inverse=True)
        counts = torch.bincount(uniq // N, minlength=E)
    member = uniq // N
    starts = counts.cumsum(0) - counts
    slot = torch.arange(uniq.numel()) - starts[member]  # position within the member's own union
    x_union = x_ref.new_zeros(E, int(counts.max()), x_ref.shape[-1])
    x_union[member, slot] = x_ref[member_draw[member], uniq - member * N]
    pos = (inverse - starts.repeat_interleave(cand[0].numel())).view(cand.shape)
    return x_union, pos, counts
