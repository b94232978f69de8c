"""purireid.labels.cluster: exact pruned view fusion, DBSCAN labels and cluster centres against dense
references (tests/jaccard_reference.py)."""

from __future__ import annotations

import jaccard_reference as ref
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.cluster import DBSCAN

from purireid.labels import cluster
from purireid.labels.jaccard import jaccard_distance


def _views(n: int, seed: int, ids: int = 15) -> list[np.ndarray]:
    return [ref.clustered(n, ids=ids, noise=0.6, seed=seed * 10 + v) for v in range(3)]


def _dense_fused(views, k1, k2, lambda1) -> np.ndarray:
    return ref.fuse_reference(*[ref.jaccard_reference(v, k1, k2) for v in views], lambda1=lambda1)


@pytest.mark.parametrize("eps,seed", [(0.6, 0), (0.7, 1), (0.45, 2)])
def test_pseudo_labels_equal_dense_dbscan(eps, seed):
    views = _views(200, seed)
    want = DBSCAN(eps=eps, min_samples=4, metric="precomputed").fit_predict(_dense_fused(views, 20, 6, 0.15))
    got = cluster.pseudo_labels({"global": views[0], "upper": views[1], "lower": views[2]},
                                cluster.ClusterSettings(k1=20, k2=6, eps=eps))
    assert got.dtype == np.int64
    assert len(set(want)) > 2  # a non-trivial clustering
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("lambda1,eps", [(0.15, 0.6), (0.15, 0.7), (0.15, 0.9), (0.4, 0.65)])
def test_fused_pairs_are_exactly_the_dense_pairs_within_eps(lambda1, eps):
    # The pruning is exact: the kept pairs are the dense matrix's pairs within eps, with
    # bit-identical fused values; at eps 0.7 that includes pairs absent from view 0 whose
    # distance is 0 in views 1 and 2 (rows 0-9 duplicate rows 100-109 there, not in view 0).
    views = _views(160, 3, ids=12)
    for v in (1, 2):
        views[v][:10] = views[v][100:110]
    weights = (1 - 2 * lambda1, lambda1, lambda1)
    mats = [ref.densify(jaccard_distance(v, 20, 6)) for v in views]
    dense = weights[0] * mats[0] + weights[1] * mats[1] + weights[2] * mats[2]  # float32, view order
    codes, values = cluster.fuse_views(views, weights, cluster.ClusterSettings(k1=20, k2=6, eps=eps))
    i, j = np.divmod(codes, 160)
    want = np.triu(dense <= np.float32(eps))
    assert np.all(i <= j) and np.array_equal(np.sort(codes), codes)
    np.testing.assert_array_equal(values, dense[i, j])
    assert int(want.sum()) == len(codes) and want[i, j].all()
    absent0 = mats[0][i, j] == 1
    assert absent0.any() == (eps >= weights[0] or lambda1 == 0.4)
    if eps == 0.9:  # pairs stored by view 0 only count 1 for the other views
        assert np.any((mats[1][i, j] == 1) & (mats[2][i, j] == 1))


def test_pseudo_labels_rejects_bad_input():
    views = [ref.clustered(40, seed=v) for v in range(3)]
    with pytest.raises(ValueError, match="eps"):
        cluster.pseudo_labels(views, cluster.ClusterSettings(eps=1.0))
    with pytest.raises(ValueError, match="three views"):
        cluster.pseudo_labels(views[:2])
    with pytest.raises(ValueError, match="same number of rows"):
        cluster.pseudo_labels([views[0], views[1], views[2][:30]])


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


def test_cluster_centres():
    x = ref.clustered(30, seed=9)
    labels = np.array([0, 1, 2, -1, 1] * 6)
    c = cluster.cluster_centres(torch.from_numpy(labels), torch.from_numpy(x))
    assert c.shape == (3, x.shape[1]) and c.dtype == torch.float32
    for k in range(3):
        m = x[labels == k].astype(np.float64).mean(0)
        np.testing.assert_allclose(c[k].numpy(), m / np.linalg.norm(m), atol=1e-6)
    np.testing.assert_allclose(cluster.cluster_centres(labels, x).numpy(), c.numpy())
    assert cluster.cluster_centres(np.full(5, -1), x[:5]).shape == (0, x.shape[1])
