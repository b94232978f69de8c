"""purireid.labels.jaccard against the dense loop reference of docs/method.md (tests/jaccard_reference.py)."""

from __future__ import annotations

import jaccard_reference as ref
import numpy as np
import pytest
import torch

from purireid.labels import jaccard
from purireid.labels import neighbours


def assert_same_jaccard(fast, dense: np.ndarray) -> None:
    n = dense.shape[0]
    assert fast.shape == (n, n) and fast.dtype == np.float32
    rows = np.repeat(np.arange(n), np.diff(fast.indptr))
    # Stored pattern == pairs with distance < 1; diagonal stored explicitly as 0.
    stored = np.zeros((n, n), dtype=bool)
    stored[rows, fast.indices] = True
    np.testing.assert_array_equal(stored, dense < 1)
    assert np.all(fast.diagonal() == 0) and np.all(stored.diagonal())
    np.testing.assert_allclose(ref.densify(fast), dense, rtol=0, atol=1e-6)


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
    x = ref.clustered(n, seed=seed, duplicates=dups, quantise=quant)
    assert_same_jaccard(jaccard.jaccard_distance(x, k1, k2), ref.jaccard_reference(x, k1, k2))


def test_jaccard_k1_cap_matters():
    # The reference without the cap (lists of k1+1) differs: the test can tell them apart.
    x = ref.clustered(150, seed=6)
    v, _ = ref.v_matrix(x, 30, 6, list_len=31)
    uncapped = ref.jaccard_from_v(v)
    fast = ref.densify(jaccard.jaccard_distance(x, 30, 6))
    assert np.abs(fast - uncapped).max() > 1e-3


def test_jaccard_backends_and_torch_input_identical():
    x = ref.clustered(220, seed=7, duplicates=5)
    base = jaccard.jaccard_distance(x, 20, 6, backend="bf16")
    for other in (jaccard.jaccard_distance(torch.from_numpy(x), 20, 6, backend="faiss"),
                  jaccard.jaccard_distance(x, 20, 6, backend="torch")):
        np.testing.assert_array_equal(other.indptr, base.indptr)
        np.testing.assert_array_equal(other.indices, base.indices)
        np.testing.assert_array_equal(other.data, base.data)


def test_jaccard_uncertified_rows_fall_back_exactly(monkeypatch):
    # No over-fetch and many exact ties: some rows cannot be certified from the candidates and
    # take the full-row path; the Jaccard distance must still equal the dense reference.
    monkeypatch.setattr(neighbours, "_EXTRA_CANDIDATES", 0)
    x = ref.clustered(160, quantise=True, seed=12, duplicates=8)
    stats: dict = {}
    got = jaccard.jaccard_distance(x, 16, 3, backend="bf16", stats=stats)
    assert stats["uncertified_rows"] > 0 and stats["rescored_pairs"] > 0 and stats["knn_s"] > 0
    assert_same_jaccard(got, ref.jaccard_reference(x, 16, 3))


def test_jaccard_pairs_filter_sees_every_pair_once():
    x = ref.clustered(200, seed=8)
    full = jaccard.jaccard_distance(x, 20, 6)
    seen = []

    def keep_close(codes, d):
        seen.append(codes)
        return codes[d < 0.5], d[d < 0.5] * 2

    codes, vals = jaccard.jaccard_pairs(x, 20, 6, pair_filter=keep_close)
    i, j = np.divmod(codes, 200)
    dense = ref.densify(full)
    allseen = np.concatenate(seen)
    assert len(np.unique(allseen)) == len(allseen) == (full.nnz + 200) // 2  # blocks may run concurrently
    np.testing.assert_array_equal(np.sort(codes), codes)
    np.testing.assert_array_equal(vals, dense[i, j] * 2)
    assert np.all(i <= j) and len(codes) == int(np.triu(dense < 0.5).sum())


@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (15, 1, 0.5)])
def test_rerank_equals_dense_reference(k1, k2, lam):
    x = ref.clustered(260, seed=11, duplicates=4)
    q, g = x[:60], x[60:]
    got = jaccard.rerank_distance(q, g, k1=k1, k2=k2, lambda_value=lam)
    want = ref.rerank_reference(q, g, k1=k1, k2=k2, lambda_value=lam)
    assert got.shape == (60, 200) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    got_t = jaccard.rerank_distance(torch.from_numpy(q), torch.from_numpy(g), k1=k1, k2=k2, lambda_value=lam)
    np.testing.assert_array_equal(got_t, got)


def _offset_jaccard(x, cams, offset, k1, k2, **kw):
    codes, values = jaccard.jaccard_pairs(x, k1, k2, camids=cams, same_camera_offset=offset, **kw)
    return jaccard.pairs_to_csr(codes, values, len(x))


@pytest.mark.parametrize("offset,k1,k2,seed,quant", [(0.3, 20, 6, 0, False), (1.5, 16, 3, 1, True), (0.05, 25, 1, 2, False)])
def test_same_camera_offset_equals_dense_reference(offset, k1, k2, seed, quant):
    # cluster.same_camera_offset: the offset is part of the key for the lists and the V weights.
    x = ref.clustered(150, seed=seed, quantise=quant, duplicates=6 if quant else 0)
    cams = np.random.default_rng(seed).integers(0, 3, len(x))
    key_offset = np.float32(offset) * (cams[:, None] == cams[None, :])
    expected = ref.jaccard_reference(x, k1, k2, key_offset=key_offset)
    assert_same_jaccard(_offset_jaccard(x, cams, offset, k1, k2, backend="bf16"), expected)
    # ... and the offset changes the distance (the test can tell it from the plain one)
    assert np.abs(expected - ref.jaccard_reference(x, k1, k2)).max() > 1e-3


def test_same_camera_offset_uncertified_rows_fall_back_exactly(monkeypatch):
    monkeypatch.setattr(neighbours, "_EXTRA_CANDIDATES", 0)
    x = ref.clustered(120, seed=13)
    cams = (np.arange(len(x)) % 10 == 0).astype(int)  # a rare camera: lists reach far past it
    stats: dict = {}
    got = jaccard.pairs_to_csr(*jaccard.jaccard_pairs(x, 30, 6, camids=cams, same_camera_offset=2.0, stats=stats),
                               len(x))
    assert stats["uncertified_rows"] > 0
    key_offset = np.float32(2.0) * (cams[:, None] == cams[None, :])
    assert_same_jaccard(got, ref.jaccard_reference(x, 30, 6, key_offset=key_offset))


def test_same_camera_offset_needs_camera_ids():
    x = ref.clustered(40, seed=3)
    with pytest.raises(ValueError, match="camids"):
        jaccard.jaccard_pairs(x, 10, 3, same_camera_offset=0.5)
    with pytest.raises(ValueError, match="group ids"):
        jaccard.jaccard_pairs(x, 10, 3, camids=np.zeros(39), same_camera_offset=0.5)
