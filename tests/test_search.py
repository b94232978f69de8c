"""purireid.serving.search.exact_search: every backend gives the exact float64 ranking (ties by index),
including where the cheap scan cannot certify a list and the wider / full passes take over."""

from __future__ import annotations

import numpy as np
import pytest

from purireid.serving.search import exact_search, market_identities

BACKENDS = ["bf16", "faiss", "torch"]


def brute_force(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    d = (q64**2).sum(1)[:, None] + (g64**2).sum(1)[None, :] - 2 * q64 @ g64.T
    key = np.rint(np.maximum(d, 0) * 2.0**22) / 2.0**22
    order = np.lexsort((np.broadcast_to(np.arange(len(g)), key.shape), key), axis=1)[:, :k]
    return order, np.take_along_axis(key, order, axis=1)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_features_with_duplicates_and_single_query(backend):
    rng = np.random.default_rng(0)
    g = unit(rng.standard_normal((2000, 128)))
    g[[300, 900]] = g[7]  # exact ties: broken by gallery index
    q = unit(rng.standard_normal((40, 128)))
    q[0] = g[7]
    ref_idx, ref_d = brute_force(q, g, 10)
    result = exact_search(q, g, 10, backend=backend)
    np.testing.assert_array_equal(result.indices, ref_idx)
    np.testing.assert_array_equal(result.distances, ref_d)
    assert list(result.indices[0, :3]) == [7, 300, 900]
    one = exact_search(q[5:6], g, 10, backend=backend)  # the one-query (matrix-vector) path
    np.testing.assert_array_equal(one.indices, ref_idx[5:6])


@pytest.mark.parametrize("backend", BACKENDS)
def test_crowded_gallery_needs_the_wider_passes_and_stays_exact(backend):
    """Tight clusters of 200 near-identical items: the first candidates cannot be certified."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((10, 64))
    g = unit(centres[rng.integers(0, 10, 2000)] + 0.01 * rng.standard_normal((2000, 64)))
    q = unit(centres[rng.integers(0, 10, 30)] + 0.01 * rng.standard_normal((30, 64)))
    ref_idx, ref_d = brute_force(q, g, 5)
    result = exact_search(q, g, 5, backend=backend)
    np.testing.assert_array_equal(result.indices, ref_idx)
    np.testing.assert_array_equal(result.distances, ref_d)
    if backend == "bf16":  # bf16 rounding is coarser than these clusters: the wider pass decides
        assert result.widened > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_facing_away_from_the_whole_gallery(backend):
    """Every similarity negative (thresholds below zero), gallery norms unequal: still exact."""
    rng = np.random.default_rng(3)
    g = np.abs(rng.standard_normal((1500, 96))).astype(np.float32) * rng.uniform(0.5, 2.0, (1500, 1)).astype(np.float32)
    q = -unit(np.abs(rng.standard_normal((20, 96))))
    ref_idx, ref_d = brute_force(q, g, 8)
    result = exact_search(q, g, 8, backend=backend)
    np.testing.assert_array_equal(result.indices, ref_idx)
    np.testing.assert_array_equal(result.distances, ref_d)


def test_small_gallery_pads_and_bad_input_is_refused():
    g = unit(np.random.default_rng(2).standard_normal((4, 16)))
    result = exact_search(g[:2], g, 6)
    assert result.indices[0, 0] == 0 and sorted(result.indices[0, :4]) == [0, 1, 2, 3]
    assert (result.indices[:, 4:] == -1).all()
    assert np.isinf(result.distances[:, 4:]).all()
    with pytest.raises(ValueError, match="finite"):
        exact_search(np.full((1, 16), np.nan, np.float32), g, 2)
    with pytest.raises(ValueError, match=r"\[Q, D\] and \[G, D\]"):
        exact_search(g[:, :8], g, 2)


def test_market_identities_from_file_names():
    pids, cams = market_identities(["/x/0002_c1s1_000451_03.jpg", "-1_c3s2_000001_00.jpg", "0000_c6_f01.png"])
    assert list(pids) == [2, -1, 0] and list(cams) == [0, 2, 5]
    assert market_identities(["/x/0002_c1s1_000451_03.jpg", "holiday.jpg"]) is None
