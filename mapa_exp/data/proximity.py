"""The proximity engine: for every query point, its M nearest reference points (indices, distances).

``nearest_neighbors`` is the one public function; the datamodule caches what it returns. Rows are
sorted by increasing distance; when the queries are the reference set itself, each point is its own
first neighbour with distance exactly 0 (MAPA's self-term is the row maximum, spec §3).

Metrics: ``sqeuclidean`` (Gaussian kernel; computed on centred data in fp32, TF32 off) and
``hamming`` (Bernoulli kernel; exact integers on binary data). The brute-force backend works in
row chunks so memory is O(chunk * N_ref + N_query * M), never N x N unless M = N.
"""

from __future__ import annotations

import numpy as np
import torch

from mapa_exp.errors import check

METRICS = ("sqeuclidean", "hamming")


def pairwise_distances(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """(Na, D) x (Nb, D) -> (Na, Nb) distances in the given metric, float32."""
    if metric == "sqeuclidean":
        if a.shape[1] <= 8:  # low dimension: the direct difference is exact and cheap
            return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
        d = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None, :] - 2 * a @ b.T
        return d.clamp_min_(0)
    if metric == "hamming":
        return a.sum(1, keepdim=True) + b.sum(1)[None, :] - 2 * a @ b.T
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def nearest_neighbors(
    reference: torch.Tensor,
    queries: torch.Tensor | None = None,
    M: int | None = None,
    metric: str = "sqeuclidean",
    chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """The M nearest reference points of every query: indices (Nq, M) int64 and distances (Nq, M) float32.

    ``queries=None`` means the reference set itself (self included, first, at distance 0).
    ``M=None`` means all reference points (the exact dense structure).
    """
    check(metric in METRICS, "metric", metric, f"must be one of {METRICS}")
    N = reference.shape[0]
    M = N if M is None else int(M)
    check(1 <= M <= N, "proximity.M", M, f"must be between 1 and the number of reference points ({N})")
    self_query = queries is None
    ref = reference.detach().to(torch.float32)
    qry = ref if self_query else queries.detach().to(torch.float32)
    if metric == "sqeuclidean":  # centring keeps fp32 products accurate
        centre = ref.mean(0, keepdim=True)
        ref, qry = ref - centre, qry - centre
    idx_out = np.empty((qry.shape[0], M), dtype=np.int64)
    dist_out = np.empty((qry.shape[0], M), dtype=np.float32)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for start in range(0, qry.shape[0], chunk_size):
            stop = min(start + chunk_size, qry.shape[0])
            d = pairwise_distances(qry[start:stop], ref, metric)  # (c, N)
            if self_query:
                rows = torch.arange(stop - start)
                d[rows, rows + start] = -1.0  # self sorts first, ahead of exact duplicates
            # stable sort keeps ties in index order; topk would not
            dist, idx = torch.sort(d, dim=1, stable=True) if M == N else _topk_stable(d, M)
            if self_query:
                dist[:, 0] = 0.0
            idx_out[start:stop] = idx.numpy()
            dist_out[start:stop] = dist.numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return idx_out, dist_out


def _topk_stable(d: torch.Tensor, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The M smallest entries per row, sorted by (distance, index) so ties resolve as a stable sort would."""
    vals, idx = torch.topk(d, M, dim=1, largest=False, sorted=False)
    kth = vals.max(1, keepdim=True).values
    tied = (d == kth).sum(1) > (vals == kth).sum(1)  # rows whose boundary tie topk may have cut arbitrarily
    if tied.any():
        vs, ids = torch.sort(d[tied], dim=1, stable=True)
        vals[tied], idx[tied] = vs[:, :M], ids[:, :M]
    by_index = torch.argsort(idx, dim=1)
    vals, idx = torch.gather(vals, 1, by_index), torch.gather(idx, 1, by_index)
    by_value = torch.argsort(vals, dim=1, stable=True)
    return torch.gather(vals, 1, by_value), torch.gather(idx, 1, by_value)
