"""The proximity engine: for every query point, its M nearest reference points (indices, distances).

``nearest_neighbors`` is the one public function; the datamodule caches what it returns. Rows are
sorted by increasing distance, ties by increasing index; when the queries are the reference set
itself, each point is its own first neighbour at distance exactly 0 (MAPA's self-term is the row
maximum, method.md §3), ahead of exact duplicates.

Metrics: ``sqeuclidean`` (Gaussian kernel; computed on data centred on the reference mean, in fp32
with TF32 off) and ``hamming`` (Bernoulli kernel; binary data only, exact integers: on {0, 1} data
every fp32 product and sum below 2^24 is exact).

Backends (``backend="auto"`` picks one from the sizes, as measured in ``docs/benchmarks.md``):

* ``brute`` -- chunked torch matrix products (on the GPU when one is present) with a top-M per row;
  memory O(chunk * N_ref + N_query * M), the chunk sized to a fixed working-memory budget. Exact
  tie handling at the M-th distance; used for the dense structure (M = N) and small problems.
* ``kdtree`` -- scipy's cKDTree, for low dimension (D <= 8): O(N log N) instead of O(N^2). Its
  float64 distances on the centred fp32 data are squared and rounded to fp32 (Hamming: L1, exact).
* ``faiss`` -- exact exhaustive search with faiss for high dimension on the CPU: ``IndexFlatL2``
  (BLAS-blocked) for squared Euclidean, ``IndexBinaryFlat`` (bits packed 8 to a byte, popcount) for
  Hamming, whose integer distances are exact.

Every backend uses all the cores this process may run on and restores the thread settings after.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Callable

import numpy as np
import torch

from mapa_exp.errors import check
from mapa_exp.io import progress

log = logging.getLogger(__name__)

METRICS = ("sqeuclidean", "hamming")
BACKENDS = ("auto", "brute", "kdtree", "faiss")
KDTREE_MAX_DIM = 8  # the k-d tree beats brute force up to here (docs/benchmarks.md)
BRUTE_MAX_PAIRS = 1 << 22  # up to this many (query, reference) pairs brute force takes milliseconds
CHUNK_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}  # working memory of one brute-force chunk


def nearest_neighbors(
    reference: torch.Tensor | np.ndarray,
    queries: torch.Tensor | np.ndarray | None = None,
    M: int | None = None,
    metric: str = "sqeuclidean",
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """The M nearest reference points of every query: indices (Nq, M) int64 and distances (Nq, M) float32.

    ``reference`` (N, D) and ``queries`` (Nq, D) are tensors or arrays; ``queries=None`` means the
    reference set itself (self included, first, at distance 0). ``M=None`` means all N reference
    points (the exact dense structure). ``backend``: one of ``BACKENDS`` (see the module doc).
    """
    check(metric in METRICS, "proximity.metric", metric, f"must be one of {METRICS}")
    check(backend in BACKENDS, "proximity.backend", backend, f"must be one of {BACKENDS}")
    self_query = queries is None
    ref = _as_points(reference, "reference")
    qry = ref if self_query else _as_points(queries, "queries")
    N, D = ref.shape
    check(qry.shape[1] == D, "proximity.queries", tuple(qry.shape), f"must have the reference's {D} columns")
    M = N if M is None else M
    check(isinstance(M, (int, np.integer)) and 1 <= M <= N, "proximity.M", M,
          f"must be an integer between 1 and the number of reference points ({N})")
    M = int(M)
    if metric == "hamming":
        for name, a in [("reference", ref)] + ([] if self_query else [("queries", qry)]):
            check(bool(((a == 0) | (a == 1)).all()), f"proximity.{name}", "non-binary",
                  "the hamming metric needs binary (0/1) data")
    else:  # centring keeps fp32 products accurate; distances are unchanged
        centre = ref.mean(0, keepdim=True)
        ref = ref - centre
        qry = ref if self_query else qry - centre
    name = _auto_backend(N, qry.shape[0], D, M) if backend == "auto" else backend
    if name == "faiss" and not _faiss_available():
        log.warning("faiss is not installed; using the brute-force backend")
        name = "brute"
    t0 = time.perf_counter()
    with _all_cores(), _full_fp32():
        idx, dist = _BACKENDS[name](ref, qry, M, metric, self_query)
    idx, dist = _canonical_rows(idx, dist, self_query)
    log.info("nearest neighbours: %d queries x %d points, D=%d, M=%d, %s, backend %s: %.2fs",
             qry.shape[0], N, D, M, metric, name, time.perf_counter() - t0)
    return idx, dist


# -- choosing a backend ------------------------------------------------------------------------
def _auto_backend(n_ref: int, n_query: int, dim: int, M: int) -> str:
    """The backend that measured fastest for this shape (docs/benchmarks.md), exact in every case."""
    if M == n_ref or n_ref * n_query <= BRUTE_MAX_PAIRS:
        return "brute"  # the dense structure needs every distance anyway; tiny problems take ms
    if dim <= KDTREE_MAX_DIM:
        return "kdtree"
    if torch.cuda.is_available():
        return "brute"  # chunked matrix products on the GPU
    return "faiss" if _faiss_available() else "brute"


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# -- backends: (ref, qry, M, metric, self_query) -> idx (Nq, M) int64, dist (Nq, M) float32 ------
def _brute(ref, qry, M, metric, self_query):
    device = torch.device("cuda") if torch.cuda.is_available() else ref.device
    ref, qry = ref.to(device), qry.to(device)
    N, Nq = ref.shape[0], qry.shape[0]
    per_entry = 32 if M == N else 16  # bytes per (query, reference) pair: distances, sort buffers
    chunk = int(max(1, min(Nq, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"]) // (N * per_entry))))
    ref_sq = ref.pow(2).sum(1) if metric == "sqeuclidean" else ref.sum(1)  # (N,)
    idx_out = np.empty((Nq, M), dtype=np.int64)
    dist_out = np.empty((Nq, M), dtype=np.float32)
    for start in progress(range(0, Nq, chunk), "nearest neighbours (chunks)"):
        stop = min(start + chunk, Nq)
        d = _pairwise(qry[start:stop], ref, ref_sq, metric)  # (c, N)
        if self_query:
            rows = torch.arange(stop - start, device=device)
            d[rows, rows + start] = -1.0  # self sorts first, ahead of exact duplicates
        # stable sort keeps ties in index order; topk would not
        dist, idx = torch.sort(d, dim=1, stable=True) if M == N else _topk_stable(d, M)
        idx_out[start:stop] = idx.cpu().numpy()
        dist_out[start:stop] = dist.cpu().numpy()
    return idx_out, dist_out


def _pairwise(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor, metric: str) -> torch.Tensor:
    """(Na, D) x (Nb, D) -> (Na, Nb) distances, float32; ``b_sq`` is b's squared norms (row sums for hamming)."""
    if metric == "hamming":  # |a| + |b| - 2 a.b, exact integers on binary data
        return torch.addmm(a.sum(1, keepdim=True) + b_sq[None, :], a, b.T, alpha=-2)
    if a.shape[1] <= KDTREE_MAX_DIM:  # low dimension: direct differences, exact and cheap
        d = (a[:, None, 0] - b[None, :, 0]).pow_(2)
        for j in range(1, a.shape[1]):
            d += (a[:, None, j] - b[None, :, j]).pow_(2)
        return d
    d = torch.addmm(a.pow(2).sum(1, keepdim=True) + b_sq[None, :], a, b.T, alpha=-2)
    return d.clamp_min_(0)


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


def _kdtree(ref, qry, M, metric, self_query):
    from scipy.spatial import cKDTree

    r, q = ref.cpu().numpy(), qry.cpu().numpy()
    tree = cKDTree(r)
    d, idx = tree.query(q, k=M, p=1 if metric == "hamming" else 2, workers=_n_cores())
    d = np.asarray(d, dtype=np.float64).reshape(len(q), M)  # (Nq,) when M = 1
    dist = np.empty(d.shape, dtype=np.float32)
    if metric == "sqeuclidean":
        np.multiply(d, d, out=dist, casting="same_kind")  # square and round in one pass
    else:
        dist[:] = d
    return np.asarray(idx, dtype=np.int64).reshape(len(q), M), dist


def _faiss(ref, qry, M, metric, self_query):
    import faiss

    r = np.ascontiguousarray(ref.cpu().numpy())
    q = r if self_query else np.ascontiguousarray(qry.cpu().numpy())
    if metric == "hamming":  # zero padding to whole bytes leaves Hamming distances unchanged
        r = np.packbits(r.astype(np.uint8), axis=1)
        q = r if self_query else np.packbits(q.astype(np.uint8), axis=1)
        index = faiss.IndexBinaryFlat(8 * r.shape[1])
        index.use_heap = False  # measured faster for top-64 (and far less hurt by a busy machine)
    else:
        index = faiss.IndexFlatL2(r.shape[1])
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(_n_cores())
    try:
        index.add(r)
        dist, idx = index.search(q, M)
    finally:
        faiss.omp_set_num_threads(threads)
    dist = dist.astype(np.float32, copy=False)  # int32 Hamming counts: exact in float32
    np.maximum(dist, 0, out=dist)
    return idx.astype(np.int64, copy=False), dist


_BACKENDS: dict[str, Callable] = {"brute": _brute, "kdtree": _kdtree, "faiss": _faiss}


# -- the same rows from every backend ----------------------------------------------------------
def _canonical_rows(idx: np.ndarray, dist: np.ndarray, self_query: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by (distance, index); for self-queries each point first at distance exactly 0.

    Only rows that need it are touched: those with a tie or an inversion, and those whose self is
    not first (exact duplicates; if self fell off the row, it replaces the last entry).
    """
    bad = np.flatnonzero((dist[:, 1:] <= dist[:, :-1]).any(1))
    if bad.size:
        order = np.lexsort((idx[bad], dist[bad]), axis=-1)
        idx[bad] = np.take_along_axis(idx[bad], order, 1)
        dist[bad] = np.take_along_axis(dist[bad], order, 1)
    if not self_query:
        return idx, dist
    M = idx.shape[1]
    bad = np.flatnonzero(idx[:, 0] != np.arange(len(idx)))
    if bad.size:
        i, d = idx[bad], dist[bad]
        keep = i != bad[:, None]
        keep &= np.cumsum(keep, 1) <= M - 1  # drops the last entry of rows that lacked self
        idx[bad, 1:], dist[bad, 1:] = i[keep].reshape(-1, M - 1), d[keep].reshape(-1, M - 1)
        idx[bad, 0] = bad
    dist[:, 0] = 0.0
    return idx, dist


# -- input and runtime settings ----------------------------------------------------------------
def _as_points(a, name: str) -> torch.Tensor:
    """A (n, D) float32 tensor of finite values, n >= 1, D >= 1."""
    t = torch.as_tensor(a).detach()
    check(t.ndim == 2 and t.shape[0] >= 1 and t.shape[1] >= 1, f"proximity.{name}", tuple(t.shape),
          "must be a non-empty 2-D array (points, dimensions)")
    t = t.to(torch.float32)
    check(bool(torch.isfinite(t).all()), f"proximity.{name}", "non-finite", "contains NaN or inf")
    return t


def _n_cores() -> int:
    """Cores this process may run on (respects taskset / SLURM binding, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _all_cores():
    """torch on every available core for the build (training itself may run on one), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(_n_cores())
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _full_fp32():
    """fp32 matrix products in full precision (no TF32 on the GPU), restored after."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; reading the legacy flag can raise after its use
        saved = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = saved
    else:
        saved = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = saved
