"""purireid.cluster against the dense loop reference of SPEC §3.2 (tests/jaccard_reference.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.cluster import DBSCAN

sys.path.insert(0, str(Path(__file__).parent))
import jaccard_reference as ref  # noqa: E402

from purireid import cluster  # noqa: E402


def clustered(n: int, dim: int = 32, ids: int | None = None, noise: float = 0.5, seed: int = 0,
              duplicates: int = 0, quantise: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = ids or max(2, n // 8)
    centres = rng.standard_normal((ids, dim))
    x = centres[rng.integers(0, ids, n)] + noise * rng.standard_normal((n, dim))
    if quantise:  # few distinct values: many exactly tied distances
        x = np.round(x)
        x[np.all(x == 0, axis=1), 0] = 1.0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float32)
    if duplicates:
        src = rng.integers(0, n, duplicates)
        dst = rng.choice(n, duplicates, replace=False)
        x[dst] = x[src]
    return x


def densify(m) -> np.ndarray:
    d = np.ones(m.shape, dtype=np.float32)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    d[rows, m.indices] = m.data
    return d


def assert_same_jaccard(fast, dense: np.ndarray) -> None:
    n = dense.shape[0]
    assert fast.shape == (n, n) and fast.dtype == np.float32
    rows = np.repeat(np.arange(n), np.diff(fast.indptr))
    # Stored pattern == pairs with distance < 1; diagonal stored explicitly as 0.
    stored = np.zeros((n, n), dtype=bool)
    stored[rows, fast.indices] = True
    np.testing.assert_array_equal(stored, dense < 1)
    assert np.all(fast.diagonal() == 0) and np.all(stored.diagonal())
    np.testing.assert_allclose(densify(fast), dense, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- knn


@pytest.mark.parametrize("backend", ["bf16", "torch", "faiss"])
def test_knn_matches_dense_sort(backend):
    x = clustered(300, duplicates=20, seed=1)
    keys = ref.dense_keys(x)
    want = ref.ranking(keys, 12)
    d, i = cluster.knn(x, 12, backend=backend)
    assert i.dtype == np.int64 and d.dtype == np.float32 and i.shape == (300, 12)
    np.testing.assert_array_equal(i, want)
    np.testing.assert_array_equal(i[:, 0], np.arange(300))  # self first, even with duplicates
    np.testing.assert_array_equal(d, np.take_along_axis(keys, want, 1))


def test_knn_fallback_rows_are_exact(monkeypatch):
    # No over-fetch and exact ties: certification must fail and the full-row path must agree.
    monkeypatch.setattr(cluster, "_EXTRA_CANDIDATES", 0)
    x = clustered(200, quantise=True, seed=2)
    _, i = cluster.knn(x, 10, backend="bf16")
    assert cluster._exact_lists.last_fallback_rows > 0
    np.testing.assert_array_equal(i, ref.ranking(ref.dense_keys(x), 10))


def test_knn_torch_input_and_k_larger_than_n():
    x = clustered(20, seed=3)
    d1, i1 = cluster.knn(torch.from_numpy(x), 50)
    assert i1.shape == (20, 20)
    np.testing.assert_array_equal(i1, ref.ranking(ref.dense_keys(x), 20))


# ------------------------------------------------------------------------- Jaccard


@pytest.mark.parametrize(
    "n,k1,k2,seed,dups,quant",
    [
        (150, 30, 6, 0, 0, False),
        (240, 20, 6, 1, 0, False),
        (200, 25, 6, 2, 10, False),  # odd k1: round(12.5) = 12 (half to even)
        (180, 30, 1, 3, 0, False),  # no query expansion
        (160, 16, 3, 4, 12, True),  # many exact ties and duplicate points
        (25, 30, 6, 5, 0, False),  # N < k1
    ],
)
def test_jaccard_equals_dense_reference(n, k1, k2, seed, dups, quant):
    x = clustered(n, seed=seed, duplicates=dups, quantise=quant)
    assert_same_jaccard(cluster.jaccard_distance(x, k1, k2), ref.jaccard_reference(x, k1, k2))


def test_jaccard_k1_cap_matters():
    # The reference without the cap (lists of k1+1) differs: the test can tell them apart.
    x = clustered(150, seed=6)
    v, _ = ref.v_matrix(x, 30, 6, list_len=31)
    uncapped = ref.jaccard_from_v(v)
    fast = densify(cluster.jaccard_distance(x, 30, 6))
    assert np.abs(fast - uncapped).max() > 1e-3


def test_jaccard_backends_and_torch_input_identical():
    x = clustered(220, seed=7, duplicates=5)
    base = cluster.jaccard_distance(x, 20, 6, backend="bf16")
    for other in (cluster.jaccard_distance(torch.from_numpy(x), 20, 6, backend="faiss"),
                  cluster.jaccard_distance(x, 20, 6, backend="torch")):
        np.testing.assert_array_equal(other.indptr, base.indptr)
        np.testing.assert_array_equal(other.indices, base.indices)
        np.testing.assert_array_equal(other.data, base.data)


# ------------------------------------------------------------------- pseudo labels


def _dense_labels(views, k1, k2, lambda1, eps, min_samples):
    mats = [ref.jaccard_reference(v, k1, k2) for v in views]
    fused = ref.fuse_reference(*mats, lambda1=lambda1)
    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(fused)


@pytest.mark.parametrize("eps,seed", [(0.6, 0), (0.7, 1), (0.45, 2)])
def test_pseudo_labels_equal_dense_dbscan(eps, seed):
    views = [clustered(200, ids=15, noise=0.6, seed=seed * 10 + v) for v in range(3)]
    want = _dense_labels(views, 20, 6, 0.15, eps, 4)
    got = cluster.pseudo_labels({"global": views[0], "upper": views[1], "lower": views[2]},
                                k1=20, k2=6, eps=eps)
    assert got.dtype == np.int64
    assert len(set(want)) > 2  # a non-trivial clustering
    np.testing.assert_array_equal(got, want)


def test_pseudo_labels_absent_pairs_count_as_one():
    # A pair close in only one view: the fused value must use 1 for the other views.
    views = [clustered(120, ids=10, seed=20 + v) for v in range(3)]
    mats = [cluster.jaccard_distance(v, 20, 6) for v in views]
    fused = cluster._fuse(mats, (0.7, 0.15, 0.15))
    want = ref.fuse_reference(*[densify(m) for m in mats])
    got = densify(fused)
    assert np.any((densify(mats[0]) < 1) & (densify(mats[1]) == 1))
    np.testing.assert_array_equal(got, want)


def test_pseudo_labels_rejects_eps_at_one():
    views = [clustered(40, seed=v) for v in range(3)]
    with pytest.raises(ValueError):
        cluster.pseudo_labels(views, eps=1.0)


# --------------------------------------------------------------------------- centres


def test_cluster_centres():
    x = clustered(30, seed=9)
    labels = np.array([0, 1, 2, -1, 1] * 6)
    c = cluster.cluster_centres(torch.from_numpy(labels), torch.from_numpy(x))
    assert c.shape == (3, x.shape[1]) and c.dtype == torch.float32
    for k in range(3):
        m = x[labels == k].astype(np.float64).mean(0)
        np.testing.assert_allclose(c[k].numpy(), m / np.linalg.norm(m), atol=1e-6)
    np.testing.assert_allclose(cluster.cluster_centres(labels, x).numpy(), c.numpy())
    assert cluster.cluster_centres(np.full(5, -1), x[:5]).shape == (0, x.shape[1])


# ------------------------------------------------------------------------ re-ranking


@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (15, 1, 0.5)])
def test_rerank_equals_dense_reference(k1, k2, lam):
    x = clustered(260, seed=11, duplicates=4)
    q, g = x[:60], x[60:]
    got = cluster.rerank_distance(q, g, k1=k1, k2=k2, lambda_value=lam)
    want = ref.rerank_reference(q, g, k1=k1, k2=k2, lambda_value=lam)
    assert got.shape == (60, 200) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    got_t = cluster.rerank_distance(torch.from_numpy(q), torch.from_numpy(g), k1=k1, k2=k2, lambda_value=lam)
    np.testing.assert_array_equal(got_t, got)


# ------------------------------------------------------- fast-path internals (exactness)


def test_jaccard_uncertified_rows_fall_back_exactly(monkeypatch):
    # No over-fetch and many exact ties: some rows cannot be certified from the candidates and
    # take the full-row path; the Jaccard distance must still equal the dense reference.
    monkeypatch.setattr(cluster, "_EXTRA_CANDIDATES", 0)
    x = clustered(160, quantise=True, seed=12, duplicates=8)
    got = cluster.jaccard_distance(x, 16, 3, backend="bf16")
    assert cluster._exact_lists.last_fallback_rows > 0
    assert_same_jaccard(got, ref.jaccard_reference(x, 16, 3))


@pytest.mark.parametrize("seed,min_samples", [(0, 4), (1, 3), (2, 6)])
def test_sparse_graph_dbscan_equals_dense(seed, min_samples):
    # Random geometric radius graphs: many clusters, noise, and border points between clusters.
    rng = np.random.default_rng(seed)
    n = 400
    p = rng.random((n, 2))
    d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1)).astype(np.float32)
    np.fill_diagonal(d, 0.0)
    eps = 0.06
    want = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(d)
    r, c = np.nonzero(d <= eps)
    graph = sp.csr_matrix((d[r, c], (r, c)), shape=(n, n))
    got = cluster._dbscan_graph(graph, min_samples, eps)
    assert len(set(want)) > 2 and np.any(want == -1)
    np.testing.assert_array_equal(got, want)


def test_pseudo_labels_pruned_path_equals_full_fusion():
    # eps < w0: the pruned path (only pairs that can be within eps) must give the labels of the
    # unpruned fusion of the full sparse matrices.
    views = [clustered(220, ids=18, noise=0.6, seed=40 + v) for v in range(3)]
    mats = [cluster.jaccard_distance(v, 20, 6) for v in views]
    fused = cluster._fuse(mats, (0.7, 0.15, 0.15))
    for eps in (0.5, 0.6):
        dense = densify(fused)
        want = DBSCAN(eps=eps, min_samples=4, metric="precomputed").fit_predict(dense)
        np.testing.assert_array_equal(cluster.pseudo_labels(views, k1=20, k2=6, eps=eps), want)
