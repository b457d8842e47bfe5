"""One datamodule for every method and every stack of members: data draws, cached proximity, batches.

A *stack* is E runs of one configuration that differ only in ``seed`` and ``dataset.draw`` (a lone run is
a stack of one). The datamodule holds each distinct draw once -- ``xs[split]`` (D, n, Dx) -- and maps
member e to its draw (``member_draw``). Every random draw a batch needs comes from member e's own
generator (``mapa_exp.seeding``): its shuffling here, and whatever the method draws for the batch (the VAE's
reparameterisation noise, MAPA's tail samples: ``Method.batch_extras``, called with the same generators in
the same order), so a member sees exactly the batches it would see trained alone.

It knows no method. The proximity structure (``mapa_exp.data.proximity``) is built on first use
(``proximity``) once per (data, metric, M) and cached on disk under a key derived from the data's content;
every method, restart and sweep job reuses it, and the log says whether the cache was hit. Kernels,
bandwidths and rho are the method's, applied after loading.

A batch is a dict of stacked tensors: ``x`` (E, B, Dx) and ``index`` (E, B), plus the method's extras.

``neighbors_M``: null keeps all N neighbours (the exact dense structure, refused when it would not fit in
memory); an integer M keeps the M nearest (memory O(N M)), for large N.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mapa_exp.data.proximity import nearest_neighbors
from mapa_exp.errors import check
from mapa_exp.io import ArrayCache, content_key
from mapa_exp.seeding import generators

log = logging.getLogger(__name__)

Extras = Callable[[str, torch.Tensor, Sequence, "GroundTruthDataModule"], dict]  # Method.batch_extras
DENSE_MAX_BYTES = 8 << 30  # the largest dense (N x N) proximity structure set up without neighbors_M
SPLITS = ("train", "val", "test")


class _OnePass(Dataset):
    """One item per pass: Lightning runs a training or validation pass as one "batch", whose step loop the
    module runs itself (``mapa_exp.methods.loop``), so Lightning's per-batch overhead is paid once a pass."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        return i


class GroundTruthDataModule(L.LightningDataModule):
    def __init__(
        self,
        groundtruth,
        batch_size: int = 100,
        cache_dir: str | None = None,
        neighbors_M: int | None = None,
        seeds: Sequence[int] = (0,),
    ):
        """``groundtruth``: one ground truth (or observed data set), or one per member (members of the same
        draw may share one); ``seeds``: each member's seed."""
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
        self.batch_size, self.neighbors_M = batch_size, neighbors_M
        self.cache = ArrayCache(cache_dir) if cache_dir else None
        self.cache_hits: dict[tuple[int, str], bool] = {}
        self.limits: dict[str, int | float | None] = {"train": None, "val": None}  # steps per pass (trainer.limit_*)
        self.data_generators = generators(seeds, "data")
        self._ready = False

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Generate (or load) every draw."""
        if self._ready:
            return
        per_draw = [self._truths[d].splits() for d in self.draws]
        self.xs = {s: torch.stack([p[s].x for p in per_draw]) for s in SPLITS}  # (D, n, Dx)
        self.zs = {s: torch.stack([p[s].z for p in per_draw]) if per_draw[0][s].z is not None else None
                   for s in SPLITS}
        self.n_train = self.xs["train"].shape[1]
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

    def draw_truth(self, i: int):
        """The ground truth (or observed data set) of the i-th distinct draw (``draws[i]``)."""
        return self._truths[self.draws[i]]

    def proximity(self, i: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The i-th draw's nearest training points of ``split``'s points (self-query for train), built on first
        use and cached on disk: indices and distances, (n, M) each, rows sorted by increasing distance."""
        draw = self.draws[i]
        x = {s: self.xs[s][i] for s in SPLITS}
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

    def train_batches(self, extend: Extras | None = None) -> Iterator[dict]:
        """One training epoch: shuffled, drawing from the members' data streams (whose state is checkpointed)."""
        return self.batches("train", self.data_generators, shuffle=True, limit=self.limits["train"], extend=extend)

    def eval_batches(self, split: str, stream: str = "eval", *extra: int, limit: int | float | None = None,
                     extend: Extras | None = None):
        """A pass over ``split`` in order, its random draws from fresh per-member generators of ``stream``."""
        return self.batches(split, generators(self.seeds, stream, *extra), shuffle=False, limit=limit, extend=extend)

    def batches(self, split: str, gens: Sequence[torch.Generator], shuffle: bool,
                limit: int | float | None = None, extend: Extras | None = None) -> Iterator[dict]:
        """The batches of one pass over ``split``; ``extend(split, idx, gens, self)`` adds a method's entries."""
        n, B, E = self.xs[split].shape[1], self.batch_size, self.members
        if shuffle:
            order = torch.stack([torch.randperm(n, generator=g) for g in gens])  # (E, n)
        else:
            order = torch.arange(n).expand(E, n)
        for t in range(self.steps(split, limit)):
            yield self.batch(split, order[:, t * B : (t + 1) * B], gens, extend)

    def batch(self, split: str, idx: torch.Tensor, gens: Sequence[torch.Generator | None],
              extend: Extras | None = None) -> dict:
        """The batch of the points ``idx`` (E, b) of ``split``: ``x`` (E, b, Dx), ``index``, and the method's
        extras drawn from ``gens`` (module doc)."""
        batch = {"x": self.xs[split][self.member_draw[:, None], idx], "index": idx}  # (E, b, Dx)
        if extend is not None:
            batch.update(extend(split, idx, gens, self))
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
