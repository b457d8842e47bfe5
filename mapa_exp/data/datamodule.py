"""One datamodule for every method: a ground truth's draw, its cached proximity structure, MAPA batches.

The proximity structure (``mapa_exp.data.proximity``) is built once per (data, metric, M) and cached on
disk under a key derived from the data's content; every method, restart and sweep job reuses it, and
the log says whether the cache was hit. Kernels, bandwidths and rho are applied after loading.

A batch is a dict: ``x`` (B, Dx) and ``index`` (B,); with a proposal also ``x_union`` (U, Dx), the
training points the batch touches (each once), ``pos`` (B, K+S) positions into ``x_union`` of the
top-K set then the S tail samples, ``tail_log_q`` (B, S) = log q~ of those samples, and the ints
``K`` and ``N``. With a proposal's ``uniform_share`` eps > 0 the tail samples come from the mixture of
``mapa_exp.math.truncated`` and ``tail_log_q`` is their exact log q_mix.

``neighbors_M``: null keeps all N neighbours (the exact dense structure, refused when it would not
fit in memory); an integer M keeps the M nearest (memory O(N M)), for large N.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mapa_exp.data.groundtruth import GroundTruth
from mapa_exp.data.proposals import Proposal, ProposalContext
from mapa_exp.data.proximity import nearest_neighbors
from mapa_exp.errors import check
from mapa_exp.io import ArrayCache, content_key
from mapa_exp.math.proposals import sample_tail, tail_log_proposal
from mapa_exp.math.truncated import sample_tail_mixture

log = logging.getLogger(__name__)

DENSE_MAX_BYTES = 8 << 30  # the largest dense (N x N) proximity structure set up without neighbors_M


class _Indices(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class BatchBuilder:
    """Collate function: turns a list of point indices into a method-ready batch (see module doc)."""

    def __init__(self, x, x_ref, rows=None, K: int = 0, S: int = 0, uniform_share: float = 0.0):
        self.x, self.x_ref, self.K, self.S, self.uniform_share = x, x_ref, K, S, float(uniform_share)
        if rows is not None:
            self.idx, log_q = rows
            self.tail_log_q = tail_log_proposal(log_q, K) if S > 0 else None
        else:
            self.idx = None

    def __call__(self, indices: list[int]) -> dict:
        n = torch.as_tensor(indices, dtype=torch.long)
        batch = {"x": self.x[n], "index": n}
        if self.idx is None:
            return batch
        rows = self.idx[n]  # (B, M)
        cand = rows[:, : self.K]  # (B, K)
        tail_log_q = torch.empty(len(n), 0)
        if self.S > 0 and self.uniform_share > 0:
            N = self.x_ref.shape[0]
            tail, tail_log_q = sample_tail_mixture(rows, self.tail_log_q[n], self.K, N, self.S, self.uniform_share)
            cand = torch.cat([cand, tail], 1)  # (B, K+S)
        elif self.S > 0:
            pos, tail_log_q = sample_tail(self.tail_log_q[n], self.S)  # (B, S)
            cand = torch.cat([cand, torch.gather(rows[:, self.K :], 1, pos)], 1)  # (B, K+S)
        union, inverse = torch.unique(cand, return_inverse=True)
        batch.update(x_union=self.x_ref[union], pos=inverse, tail_log_q=tail_log_q, K=self.K, N=self.x_ref.shape[0])
        return batch


class GroundTruthDataModule(L.LightningDataModule):
    def __init__(
        self,
        groundtruth: GroundTruth,
        proposal: Proposal | None = None,
        batch_size: int = 100,
        num_workers: int = 0,
        cache_dir: str | None = None,
        neighbors_M: int | None = None,
    ):
        check(isinstance(batch_size, int) and batch_size >= 1, "data.batch_size", batch_size, "must be an integer >= 1")
        check(isinstance(num_workers, int) and num_workers >= 0, "data.num_workers", num_workers, "must be an integer >= 0")
        super().__init__()
        self.groundtruth, self.proposal = groundtruth, proposal
        self.batch_size, self.num_workers, self.neighbors_M = batch_size, num_workers, neighbors_M
        self.cache = ArrayCache(cache_dir) if cache_dir else None
        self.cache_hits: dict[str, bool] = {}
        self._ready = False

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        if self.proposal is not None:
            self.proposal.check_data(self.groundtruth)
        splits = self.groundtruth.splits()
        self.x = {k: s.x for k, s in splits.items()}
        self.z = {k: s.z for k, s in splits.items()}
        self.n_train = self.x["train"].shape[0]
        self.neighbors = {split: self._neighbors(split) for split in ("train", "val")}
        self.rows = {}
        if self.proposal is not None:
            ctx = ProposalContext(self.groundtruth, self.x, self.z["train"], self.neighbors)
            self.rows = {split: self.proposal.rows(ctx, split) for split in ("train", "val")}
        self._ready = True

    def _neighbors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached nearest training points of ``split``'s points (self-query for train)."""
        metric = self.groundtruth.likelihood.metric
        x_ref, x_q = self.x["train"], self.x[split]
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
        self.cache_hits[split] = hit
        log.info("proximity structure (%s, %s): cache %s", split, metric, "hit" if hit else "miss (computed)")
        return torch.from_numpy(arrays["idx"]), torch.from_numpy(arrays["dist"])

    # -- loaders -----------------------------------------------------------------------------
    def _builder(self, split: str) -> BatchBuilder:
        p = self.proposal
        return BatchBuilder(
            self.x[split], self.x["train"], self.rows.get(split), K=p.K if p else 0, S=p.S if p else 0,
            uniform_share=p.uniform_share if p else 0.0,
        )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            _Indices(self.x[split].shape[0]),
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=self._builder(split),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def train_eval_dataloader(self) -> DataLoader:
        """The training points in order, for computing the final training bound."""
        return self._loader("train", shuffle=False)
