"""The proximity engine (``mapa_exp.data.proximity.nearest_neighbors``) against independent references.

* every backend (brute force, k-d tree, faiss) returns the true M nearest neighbours of a float64
  numpy reference, sorted, self first at distance exactly 0 (also with exact duplicates);
* Hamming distances equal an integer reference (XOR counts) exactly, on every backend;
* centring keeps fp32 distances accurate on data far from the origin;
* the memory-bounded chunking does not change the result; bad input is refused in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mapa_exp.data.proximity as px
from mapa_exp.data.proximity import nearest_neighbors
from mapa_exp.errors import ConfigError

BACKENDS = ["brute", "kdtree", "faiss"]


def sq_reference(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(Nq, N) squared Euclidean distances in float64."""
    q, r = q.astype(np.float64), r.astype(np.float64)
    return np.maximum((q * q).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2 * q @ r.T, 0)


def check_rows(idx, dist, ref_dist, M, self_query, rtol=1e-5, atol=1e-6):
    """Rows hold the M nearest (by the float64 reference), sorted ascending, unique, self first at 0."""
    Nq = ref_dist.shape[0]
    assert idx.shape == dist.shape == (Nq, M) and idx.dtype == np.int64 and dist.dtype == np.float32
    assert (np.diff(dist, axis=1) >= 0).all()
    assert all(len(set(row)) == M for row in idx)
    np.testing.assert_allclose(dist, np.take_along_axis(ref_dist, idx, 1), rtol=rtol, atol=atol)
    np.testing.assert_allclose(dist, np.sort(ref_dist, 1)[:, :M], rtol=rtol, atol=atol)  # the M smallest
    if self_query:
        assert (idx[:, 0] == np.arange(Nq)).all() and (dist[:, 0] == 0).all()


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(0)
    return {D: rng.standard_normal((1500, D)).astype(np.float32) for D in (2, 5, 40)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [2, 5, 40])
def test_self_query_finds_the_true_neighbours(points, backend, D):
    x = points[D]
    idx, dist = nearest_neighbors(x, M=24, backend=backend)
    check_rows(idx, dist, sq_reference(x, x), 24, self_query=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_queries_and_backends_agree(points, backend):
    x = points[5]
    ref, qry = x[:1000], x[1000:] + 0.01
    idx, dist = nearest_neighbors(torch.from_numpy(ref), torch.from_numpy(qry), M=10, backend=backend)
    check_rows(idx, dist, sq_reference(qry, ref), 10, self_query=False)
    brute_idx, brute_dist = nearest_neighbors(ref, qry, M=10, backend="brute")
    assert (idx == brute_idx).all()  # continuous data: no ties, one right answer
    np.testing.assert_allclose(dist, brute_dist, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_first_at_zero_with_exact_duplicates(backend):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 3)).astype(np.float32)
    x[[7, 50, 300]] = x[100]  # four copies of one point
    x[200:205] = x[5]  # six copies of another: more than M
    idx, dist = nearest_neighbors(x, M=4, backend=backend)
    assert (idx[:, 0] == np.arange(400)).all() and (dist[:, 0] == 0).all()
    assert list(idx[100]) == [100, 7, 50, 300] and (dist[100] == 0).all()  # then ties by index
    assert list(idx[300]) == [300, 7, 50, 100]
    assert idx[203, 0] == 203 and (dist[203] == 0).all() and set(idx[203]) <= {5, 200, 201, 202, 203, 204}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [6, 64])
def test_hamming_equals_integer_reference(backend, D):
    rng = np.random.default_rng(D)
    xi = (rng.random((700, D)) < 0.3).astype(np.int64)
    ref = (xi[:, None, :] != xi[None, :, :]).sum(-1)  # (N, N) integer Hamming distances
    M = 20
    idx, dist = nearest_neighbors(xi.astype(np.float32), M=M, metric="hamming", backend=backend)
    assert (dist == np.take_along_axis(ref, idx, 1)).all()  # exact, not approximately
    assert (dist == np.sort(ref, 1)[:, :M]).all()
    assert (idx[:, 0] == np.arange(700)).all() and (dist[:, 0] == 0).all()
    assert all(len(set(row)) == M for row in idx)
    # rows sorted by (distance, index), except self first
    rest_d, rest_i = dist[:, 1:], idx[:, 1:]
    same = rest_d[:, 1:] == rest_d[:, :-1]
    assert (rest_i[:, 1:][same] > rest_i[:, :-1][same]).all()


def test_dense_structure_is_every_point_sorted():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 2)).astype(np.float32)
    idx, dist = nearest_neighbors(x)  # M = None: all N
    assert idx.shape == (300, 300)
    assert (np.sort(idx, 1) == np.arange(300)).all()
    check_rows(idx, dist, sq_reference(x, x), 300, self_query=True)


@pytest.mark.parametrize("backend", ["brute", "faiss"])
def test_centring_keeps_fp32_distances_accurate_far_from_the_origin(backend):
    rng = np.random.default_rng(3)
    x = (1000.0 + 0.05 * rng.standard_normal((800, 16))).astype(np.float32)  # |x|^2 ~ 1.6e7, distances ~ 0.08
    idx, dist = nearest_neighbors(x, M=8, backend=backend)
    exact = np.take_along_axis(sq_reference(x, x), idx, 1)
    np.testing.assert_allclose(dist[:, 1:], exact[:, 1:], rtol=1e-4)  # uncentred fp32 would be off by ~1


def test_chunking_does_not_change_the_result(points, monkeypatch):
    x = points[2][:500]
    full = nearest_neighbors(x, M=12, backend="brute")
    monkeypatch.setattr(px, "CHUNK_BYTES", {"cpu": 1, "cuda": 1})  # one query row per chunk
    chunked = nearest_neighbors(x, M=12, backend="brute")
    assert (full[0] == chunked[0]).all() and (full[1] == chunked[1]).all()


def test_auto_backend_follows_the_measurements(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert px._auto_backend(1000, 1000, 2, 1000) == "brute"  # dense
    assert px._auto_backend(1000, 1000, 64, 64) == "brute"  # tiny
    assert px._auto_backend(10**6, 10**6, 2, 64) == "kdtree"
    assert px._auto_backend(20_000, 20_000, 784, 64) == "faiss"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert px._auto_backend(20_000, 20_000, 784, 64) == "brute"  # on the GPU


def test_thread_and_precision_settings_are_restored(points):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nearest_neighbors(points[40], M=5, backend="brute")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(M=0), "proximity.M"),
        (dict(M=11), "proximity.M"),
        (dict(metric="cosine"), "proximity.metric"),
        (dict(backend="annoy"), "proximity.backend"),
        (dict(reference=np.array([[0.0, np.nan]] * 10)), "proximity.reference"),
        (dict(reference=np.zeros(10)), "proximity.reference"),
        (dict(metric="hamming", reference=np.full((10, 3), 0.5)), "proximity.reference"),
        (dict(queries=np.zeros((4, 3))), "proximity.queries"),
    ],
)
def test_bad_input_is_refused_in_one_line(kwargs, key):
    args = dict(reference=np.zeros((10, 2), dtype=np.float32)) | kwargs
    with pytest.raises(ConfigError) as err:
        nearest_neighbors(**args)
    assert err.value.key == key and "\n" not in str(err.value)
