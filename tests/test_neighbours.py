"""purireid.labels.neighbours: certified exact kNN against a dense sort (tests/jaccard_reference.py), and
the engine's calibrated backend choice (purireid.knn.engine)."""

from __future__ import annotations

import jaccard_reference as ref
import numpy as np
import pytest
import torch

from purireid.knn import engine
from purireid.labels import neighbours


@pytest.mark.parametrize("backend", ["bf16", "torch", "faiss", "auto"])
def test_knn_matches_dense_sort(backend):
    x = ref.clustered(300, duplicates=20, seed=1)
    keys = ref.dense_keys(x)
    want = ref.ranking(keys, 12)
    d, i = neighbours.knn(x, 12, backend=backend)
    assert i.dtype == np.int64 and d.dtype == np.float32 and i.shape == (300, 12)
    np.testing.assert_array_equal(i, want)
    np.testing.assert_array_equal(i[:, 0], np.arange(300))  # self first, even with duplicates
    np.testing.assert_array_equal(d, np.take_along_axis(keys, want, 1))


def test_uncertified_rows_are_recomputed_exactly(monkeypatch):
    # No over-fetch and exact ties: certification must fail and the full-row path must agree.
    monkeypatch.setattr(neighbours, "_EXTRA_CANDIDATES", 0)
    x = ref.clustered(200, quantise=True, seed=2)
    lists = neighbours.exact_lists(torch.from_numpy(x), 10, backend="bf16", want_row_max=True)
    assert lists.uncertified_rows > 0
    keys = ref.dense_keys(x)
    np.testing.assert_array_equal(lists.indices, ref.ranking(keys, 10))
    np.testing.assert_array_equal(lists.row_max, keys.max(axis=1))


def test_knn_torch_input_and_k_larger_than_n():
    x = ref.clustered(20, seed=3)
    _, i = neighbours.knn(torch.from_numpy(x), 50)
    assert i.shape == (20, 20)
    np.testing.assert_array_equal(i, ref.ranking(ref.dense_keys(x), 20))
    with pytest.raises(ValueError, match="backend"):
        neighbours.knn(x, 5, backend="gpu")


def test_auto_backend_is_the_fastest_in_the_calibration(monkeypatch):
    # The CPU choice is measured, not read from CPU flags: make faiss the fast one here.
    fake = {"bf16": 0.03, "torch": 0.02, "faiss": 0.01}
    calls = []

    def timed(x, queries, n_near, backend):
        calls.append(backend)
        return fake[backend]

    monkeypatch.setattr(engine, "_block_seconds", timed)
    monkeypatch.setattr(neighbours.torch.cuda, "is_available", lambda: False)
    engine.calibrated_cpu_backend.cache_clear()
    try:
        assert engine.resolve_backend("auto", "cpu", 24) == "faiss"
        n_calls = len(calls)
        assert engine.resolve_backend("auto", "cpu", 24) == "faiss"
        assert len(calls) == n_calls  # cached per process and dimension
        assert engine.resolve_backend("bf16", "cpu", 24) == "bf16"
        fake.update(bf16=0.001)
        assert engine.resolve_backend("auto", "cpu", 25) == "bf16"
    finally:
        engine.calibrated_cpu_backend.cache_clear()


def test_fp32_backend_ignores_reduced_matmul_precision():
    # "medium" lets oneDNN/cuBLAS compute fp32 products in bf16/TF32, which the fp32 error bound
    # does not cover: the search must use true fp32 and leave the caller's setting alone.
    x = ref.clustered(300, dim=256, ids=4, noise=0.05, seed=13)
    want = ref.ranking(ref.dense_keys(x), 12)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        _, i = neighbours.knn(x, 12, backend="torch")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    np.testing.assert_array_equal(i, want)
