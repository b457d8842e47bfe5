"""One datamodule for every method and every stack of members: data draws, cached proximity, batches.

A *stack* is E runs of one configuration that differ only in ``seed`` and ``dataset.draw`` (a lone run is
a stack of one). The datamodule holds each distinct draw once -- ``xs[split]`` (D, n, Dx) -- and maps
member e to its draw (``member_draw``). Every random draw a batch needs comes from member e's own
generator (``mapa_exp.seeding``): its shuffling, MAPA's tail samples and the VAE's reparameterisation
noise, so a member sees exactly the batches it would see trained alone.

The proximity structure (``mapa_exp.data.proximity``) is built once per (data, metric, M) and cached on
disk under a key derived from the data's content; every method, restart and sweep job reuses it, and the
log says whether the cache was hit. Kernels, bandwidths and rho are applied after loading, and the tail
proposal's tail is turned into an alias table once per draw, so a step draws each tail sample in O(1).

A batch is a dict of stacked tensors: ``x`` (E, B, Dx) and ``index`` (E, B); for the VAE/IWAE ``eps``
(E, B, S, Dz), standard normal noise; with a proposal (the MAPA family) ``x_union`` (E, U, Dx), the
training points each member's batch touches (each once, zero-padded to the largest member's count),
``U`` (E,) each member's count, ``pos`` (E, B, K+S) positions into ``x_union`` of the top-K set then
the S tail samples, ``tail_log_q`` (E, B, S) = log q~ of those samples (log q_mix with a
``uniform_share`` eps > 0, ``mapa_exp.math.truncated``), and the ints ``K`` and ``N``.

``neighbors_M``: null keeps all N neighbours (the exact dense structure, refused when it would not fit in
memory); an integer M keeps the M nearest (memory O(N M)), for large N.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mapa_exp.data.proposals import Proposal, ProposalContext
from mapa_exp.data.proximity import nearest_neighbors
from mapa_exp.errors import check
from mapa_exp.io import ArrayCache, content_key
from mapa_exp.math.proposals import AliasTable, alias_positions, alias_table, tail_log_proposal, take, uniforms
from mapa_exp.math.truncated import mixture_from_uniforms, mixture_log_prob
from mapa_exp.seeding import generators

log = logging.getLogger(__name__)

DENSE_MAX_BYTES = 8 << 30  # the largest dense (N x N) proximity structure set up without neighbors_M
SPLITS = ("train", "val", "test")


class _OnePass(Dataset):
    """One item per pass: Lightning runs a training or validation pass as one "batch", whose step loop the
    module runs itself (``mapa_exp.methods.base``), so Lightning's per-batch overhead is paid once a pass."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        return i


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


class GroundTruthDataModule(L.LightningDataModule):
    def __init__(
        self,
        groundtruth,
        proposal: Proposal | None = None,
        batch_size: int = 100,
        cache_dir: str | None = None,
        neighbors_M: int | None = None,
        seeds: Sequence[int] = (0,),
        noise_shape: tuple[int, int] | None = None,
    ):
        """``groundtruth``: one ground truth (or observed data set), or one per member (members of the same
        draw may share one); ``seeds``: each member's seed; ``noise_shape``: (S, Dz) of the standard normal
        noise each VAE/IWAE step needs, None for the MAPA family."""
        check(isinstance(batch_size, int) and batch_size >= 1, "data.batch_size", batch_size, "must be an integer >= 1")
        super().__init__()
        seeds = [int(s) for s in seeds]
        truths = list(groundtruth) if isinstance(groundtruth, (list, tuple)) else [groundtruth] * len(seeds)
        check(len(truths) == len(seeds) >= 1, "stack", len(seeds), f"members need one data set each, got {len(truths)}")
        self.seeds, self.members = seeds, len(seeds)
        self.groundtruth = truths[0]  # what the members share: f, likelihood, dimensions (their draws differ)
        self.draws = sorted({gt.draw for gt in truths})
        self._truths = {gt.draw: gt for gt in truths}
        self.member_draw = torch.tensor([self.draws.index(gt.draw) for gt in truths])  # (E,) into the draws
        self.proposal, self.batch_size, self.neighbors_M = proposal, batch_size, neighbors_M
        self.noise_shape = tuple(noise_shape) if noise_shape is not None else None
        self.cache = ArrayCache(cache_dir) if cache_dir else None
        self.cache_hits: dict[tuple[int, str], bool] = {}
        self.limits: dict[str, int | float | None] = {"train": None, "val": None}  # steps per pass (trainer.limit_*)
        self.data_generators = generators(seeds, "data")
        self._ready = False

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Generate (or load) every draw; for training also the proposal's tables (``stage="evaluate"``: not)."""
        if self._ready:
            return
        if self.proposal is not None:
            self.proposal.check_data(self.groundtruth)
        per_draw = [self._truths[d].splits() for d in self.draws]
        self.xs = {s: torch.stack([p[s].x for p in per_draw]) for s in SPLITS}  # (D, n, Dx)
        self.zs = {s: torch.stack([p[s].z for p in per_draw]) if per_draw[0][s].z is not None else None
                   for s in SPLITS}
        self.n_train = self.xs["train"].shape[1]
        self.tables: dict[str, ProposalTables] = {}
        if self.proposal is not None and stage != "evaluate":  # the VAE and IWAE need no proximity structure
            rows = {"train": [], "val": []}
            for i, d in enumerate(self.draws):
                x = {s: self.xs[s][i] for s in SPLITS}
                neighbors = lambda sp, d=d, x=x: self._neighbors(d, x, sp)  # noqa: E731  built on first use
                z_train = self.zs["train"][i] if self.zs["train"] is not None else None
                ctx = ProposalContext(self._truths[d], x, z_train, neighbors)
                for split in rows:
                    rows[split].append(self.proposal.rows(ctx, split))
            self.tables = {split: ProposalTables(r, self.proposal.K) for split, r in rows.items()}
        self._ready = True

    @property
    def x(self) -> dict[str, torch.Tensor]:
        """The observations (n, Dx) per split of a single-draw data module (e.g. an evaluated run)."""
        check(len(self.draws) == 1, "stack", self.draws, "holds several draws: use xs[split][member_draw[e]]")
        return {s: v[0] for s, v in self.xs.items()}

    @property
    def z(self) -> dict[str, torch.Tensor | None]:
        check(len(self.draws) == 1, "stack", self.draws, "holds several draws: use zs[split][member_draw[e]]")
        return {s: (v[0] if v is not None else None) for s, v in self.zs.items()}

    def member_x(self, split: str, e: int) -> torch.Tensor:
        """Member e's observations of ``split`` (n, Dx)."""
        return self.xs[split][self.member_draw[e]]

    def truth(self, e: int):
        """Member e's ground truth (or observed data set): its draw's."""
        return self._truths[self.draws[int(self.member_draw[e])]]

    def _neighbors(self, draw: int, x: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached nearest training points of ``split``'s points (self-query for train)."""
        key = (draw, split)
        metric = self.groundtruth.likelihood.metric
        x_ref, x_q = x["train"], x[split]
        self_query = split == "train"
        N, M = x_ref.shape[0], self.neighbors_M
        if M is None:
            gb = N * x_q.shape[0] * 12 / 2**30  # int64 indices + float32 distances
            check(gb <= DENSE_MAX_BYTES / 2**30, "data.neighbors_M", None,
                  f"the dense structure for N={N} needs {gb:.0f} GiB; set data.neighbors_M (e.g. 64) for a truncated one")
        else:
            check(isinstance(M, int) and 1 <= M <= N, "data.neighbors_M", M,
                  f"must be null or an integer between 1 and the number of training points ({N})")
        key_parts = [x_ref.numpy(), metric, self.neighbors_M] + ([] if self_query else [x_q.numpy()])

        def build():
            idx, dist = nearest_neighbors(x_ref, None if self_query else x_q, M=self.neighbors_M, metric=metric)
            return {"idx": idx, "dist": dist}

        if self.cache is None:
            arrays, hit = build(), False
        else:
            arrays, hit = self.cache.load_or_build("proximity", content_key(*key_parts), build)
        self.cache_hits[key] = hit
        log.info("proximity structure (draw %d, %s, %s): cache %s", draw, split, metric,
                 "hit" if hit else "miss (computed)")
        return torch.from_numpy(arrays["idx"]), torch.from_numpy(arrays["dist"])

    def member_cache_hit(self, e: int) -> bool | None:
        """Whether member e's training proximity structure came from the cache."""
        return self.cache_hits.get((self.draws[int(self.member_draw[e])], "train"))

    # -- batches -----------------------------------------------------------------------------
    def steps(self, split: str, limit: int | float | None = None) -> int:
        """Steps in one pass over ``split`` (Lightning's semantics for ``limit``: int = steps, float = fraction)."""
        n = math.ceil(self.xs[split].shape[1] / self.batch_size)
        if limit is None:
            return n
        return min(n, int(limit)) if isinstance(limit, int) else max(1, int(n * float(limit)))

    def train_batches(self) -> Iterator[dict]:
        """One training epoch: shuffled, drawing from the members' data streams (whose state is checkpointed)."""
        return self.batches("train", self.data_generators, shuffle=True, limit=self.limits["train"])

    def eval_batches(self, split: str, stream: str = "eval", *extra: int, limit: int | float | None = None):
        """A pass over ``split`` in order, its random draws from fresh per-member generators of ``stream``."""
        return self.batches(split, generators(self.seeds, stream, *extra), shuffle=False, limit=limit)

    def batches(self, split: str, gens: Sequence[torch.Generator], shuffle: bool,
                limit: int | float | None = None) -> Iterator[dict]:
        n, B, E = self.xs[split].shape[1], self.batch_size, self.members
        if shuffle:
            order = torch.stack([torch.randperm(n, generator=g) for g in gens])  # (E, n)
        else:
            order = torch.arange(n).expand(E, n)
        for t in range(self.steps(split, limit)):
            yield self._batch(split, order[:, t * B : (t + 1) * B], gens)

    def _batch(self, split: str, idx: torch.Tensor, gens: Sequence[torch.Generator]) -> dict:
        """The batch of the points ``idx`` (E, b) of ``split`` (module doc)."""
        draw = self.member_draw[:, None]  # (E, 1)
        b = idx.shape[1]
        batch = {"x": self.xs[split][draw, idx], "index": idx}  # (E, b, Dx)
        if self.noise_shape is not None:
            S, Dz = self.noise_shape
            batch["eps"] = torch.stack([torch.randn((b, S, Dz), generator=g) for g in gens])  # (E, b, S, Dz)
        p = self.proposal
        if p is not None:
            batch.update(candidate_batch(self.tables[split], self.xs["train"], self.member_draw, idx, gens, p.K, p.S,
                                         p.uniform_share))
        return batch

    # -- Lightning ---------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_OnePass(), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_OnePass(), batch_size=None)

    def state_dict(self) -> dict:
        """The members' data streams (checkpointed at each epoch end, so a resume draws what it would have)."""
        return {"data_generators": [g.get_state() for g in self.data_generators]}

    def load_state_dict(self, state_dict: dict) -> None:
        for g, s in zip(self.data_generators, state_dict["data_generators"], strict=True):
            g.set_state(s)


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
