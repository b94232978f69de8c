"""k-reciprocal Jaccard distance (docs/method.md) on sparse rows, and k-reciprocal re-ranking.

Pure functions on in-memory arrays, built on the exact neighbour lists of purireid.labels.neighbours
(whose docstring states the exactness conventions). The algorithm is the textbook one of
docs/method.md, including the released code's k1 cap, but every matrix is sparse: memory is O(N·k)
and no N×N array is ever built (tests/jaccard_reference.py is the dense loop reference).

* `jaccard_distance` returns the symmetric CSR matrix; `jaccard_pairs` the upper triangle as
  sorted pair codes i*N + j, optionally filtered block by block (the view fusion of
  purireid.labels.cluster uses this to keep one view's pairs at a time).
* One kernel (`_overlap_sums`) computes s_ij = Σ_m min(V[i,m], V[j,m]) for a block of rows,
  summing over m in ascending order, so s_ij and s_ji are bit-identical and the upper
  triangle is the exact mirror of the lower.
* `rerank_distance` is query-gallery re-ranking (Zhong et al., CVPR 2017) for evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from purireid.knn.engine import as_feature_tensor
from purireid.labels.neighbours import exact_lists, offset_lists, prefix_exact_lists
from purireid.log import get_logger

__all__ = ["jaccard_distance", "jaccard_pairs", "pairs_to_csr", "rerank_distance"]

log = get_logger("jaccard")

_TRIPLES_PER_BLOCK = 1_000_000  # (i, m, j) triples per block of the overlap kernel (~40 MB)
_BUFFER_PER_BLOCK = 4_000_000  # dense accumulator entries (rows x N) per block

# A block filter: (sorted pair codes i*N + j, float32 distances) -> the (codes, values) to keep.
PairFilter = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _add(stats: dict | None, key: str, value: float) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + value


def _ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for every (s, l), without a Python loop."""
    lengths = lengths.astype(np.int64, copy=False)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_begin = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts.astype(np.int64) - seg_begin, lengths)


# ------------------------------------------------------------------ the V matrix


def _list_matrix(idx: np.ndarray, m: int) -> sp.csr_matrix:
    rows = idx.shape[0]
    return sp.csr_matrix(
        (np.ones(rows * m, dtype=np.int32), idx[:, :m].ravel(), np.arange(0, rows * m + 1, m)), shape=(rows, rows)
    )


def _reciprocal(idx: np.ndarray, m: int) -> sp.csr_matrix:
    """R(i): j among the first m entries of i's list whose first m entries contain i."""
    f = _list_matrix(idx, m)
    r = f.multiply(f.T).tocsr()
    r.sort_indices()
    return r


def _expanded_sets(idx: np.ndarray, k1: int) -> sp.csr_matrix:
    """Pattern of the expanded k-reciprocal sets of docs/method.md (with the k1 cap)."""
    length = idx.shape[1]
    r1 = _reciprocal(idx, min(k1 + 1, length))
    r2 = _reciprocal(idx, min(int(np.around(k1 / 2)) + 1, length))
    # |R2(c) ∩ R1(i)| for every c in R1(i): entries of R1 @ R2^T on R1's pattern (>= 1, as c is
    # in both R1(i) and R2(c), so the pattern is exactly R1's).
    inter = (r1 @ r2.T).multiply(r1).tocsr()
    inter.sort_indices()
    assert inter.nnz == r1.nnz and np.array_equal(inter.indices, r1.indices)
    size2 = np.diff(r2.indptr)[r1.indices]
    accept = inter.data > (2.0 / 3.0) * size2  # the released code's float comparison
    rows1 = np.repeat(np.arange(r1.shape[0]), np.diff(r1.indptr))
    acc = sp.csr_matrix(
        (np.ones(int(accept.sum()), dtype=np.int32), (rows1[accept], r1.indices[accept])), shape=r1.shape
    )
    expanded = (r1 + acc @ r2).tocsr()
    expanded.sort_indices()
    expanded.data[:] = 1
    return expanded


def _v_matrix(pattern: sp.csr_matrix, dist: np.ndarray, idx: np.ndarray, k2: int) -> sp.csr_matrix:
    """V of docs/method.md: softmax of -dist over each row's expanded set (float64), then the
    query expansion over the first k2 entries of each list (V[i] <- mean of their rows)."""
    n = pattern.shape[0]
    rows = np.repeat(np.arange(n), np.diff(pattern.indptr))
    rowmin = np.full(n, np.inf)
    np.minimum.at(rowmin, rows, dist)
    w = np.exp(-(dist - rowmin[rows]))
    w /= np.bincount(rows, weights=w, minlength=n)[rows]
    v = sp.csr_matrix((w, pattern.indices.copy(), pattern.indptr.copy()), shape=pattern.shape)
    k2 = min(k2, idx.shape[1])
    if k2 != 1:
        qe = sp.csr_matrix((np.full(n * k2, 1.0 / k2), idx[:, :k2].ravel(), np.arange(0, n * k2 + 1, k2)), shape=(n, n))
        v = (qe @ v).tocsr()
    v.sort_indices()
    return v


# --------------------------------------------------------------- the overlap kernel


def _overlap_sums(
    b: int, n: int, i_loc: np.ndarray, v_im: np.ndarray, starts: np.ndarray, counts: np.ndarray, vc: sp.csc_matrix
) -> tuple[np.ndarray, np.ndarray]:
    """s[r, j] = Σ_m min(V[i_r, m], V[j, m]) for a block of b rows.

    The block's V entries are (i_loc[t], m_t) with value v_im[t], in row order and m ascending;
    for each, the j visited are column m's entries vc[starts[t] : starts[t] + counts[t]].
    Returns the distinct local codes r*N + j (ascending) and their float64 sums, each summed
    in order of t, i.e. over m ascending."""
    tpos = _ragged_arange(starts, counts)
    vals = np.minimum(np.repeat(v_im, counts), vc.data[tpos])
    flat = np.repeat(i_loc * n, counts) + vc.indices[tpos]
    del tpos
    # Distinct (r, j) via a boolean mark (cheap to scan), then sums into compact slots;
    # bincount adds in order of appearance.
    mark = np.zeros(b * n, dtype=bool)
    mark[flat] = True
    nz = np.flatnonzero(mark)
    del mark
    slot = np.empty(b * n, dtype=np.int32)
    slot[nz] = np.arange(len(nz), dtype=np.int32)
    sums = np.bincount(slot[flat], weights=vals, minlength=len(nz))
    return nz, sums


def _distance(sums: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - sums / (2.0 - sums), 0.0).astype(np.float32)


def _row_blocks(per_row: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Consecutive row ranges bounded by the triples per block and the accumulator size."""
    bounds, s = [], 0
    cum = np.concatenate([[0], np.cumsum(per_row)])
    while s < len(per_row):
        e = s + max(1, int(np.searchsorted(cum[s + 1 :] - cum[s], _TRIPLES_PER_BLOCK, side="right")))
        e = min(e, s + max(1, _BUFFER_PER_BLOCK // n), len(per_row))
        bounds.append((s, e))
        s = e
    return bounds


def _map_blocks(fn: Callable[[tuple[int, int]], Any], bounds: list[tuple[int, int]]) -> list:
    """fn over the row blocks, in order, on torch's thread count: numpy releases the GIL in the
    kernel's gathers, scatters and ufuncs (~2x on 2 cores). Blocks write disjoint outputs, so
    the result does not depend on the threads."""
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        return list(pool.map(fn, bounds))


def _jaccard_rows(v: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    """Rows `rows` of the Jaccard distance against every point: CSR [len(rows), N] float32 of
    the pairs with d < 1, the (i, i) entry an explicit 0."""
    n = v.shape[1]
    vc = v.tocsc()
    vc.sort_indices()
    col_len = np.diff(vc.indptr)
    row_len = np.diff(v.indptr)
    per_row = np.add.reduceat(col_len[v.indices], v.indptr[:-1]) if v.nnz else np.zeros(v.shape[0], np.int64)
    per_row = np.where(row_len > 0, per_row, 0)[rows]

    def block(se: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s, e = se
        blk = rows[s:e]
        pos = _ragged_arange(v.indptr[blk], row_len[blk])
        m = v.indices[pos]
        nz, sums = _overlap_sums(e - s, n, np.repeat(np.arange(e - s), row_len[blk]), v.data[pos],
                                 vc.indptr[m], col_len[m], vc)
        d = _distance(sums)
        r_loc, j = np.divmod(nz, n)
        d[j == blk[r_loc]] = 0.0  # the diagonal: exactly 0 (s_ii = 1 up to rounding)
        keep = d < 1.0
        return np.bincount(r_loc[keep], minlength=e - s), j[keep], d[keep]

    indptr, out_idx, out_val = [np.zeros(1, dtype=np.int64)], [], []
    for counts, j, d in _map_blocks(block, _row_blocks(per_row, n)):
        indptr.append(indptr[-1][-1] + np.cumsum(counts))
        out_idx.append(j)
        out_val.append(d)
    return sp.csr_matrix(
        (np.concatenate(out_val) if out_val else np.zeros(0, np.float32),
         np.concatenate(out_idx) if out_idx else np.zeros(0, np.int64), np.concatenate(indptr)),
        shape=(len(rows), n),
    )


def _jaccard_upper(v: sp.csr_matrix, pair_filter: PairFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Upper triangle (i <= j) of the Jaccard distance: sorted pair codes i*N + j and float32
    distances of the pairs with d < 1 (diagonal: 0), passed block by block through
    `pair_filter` if given (blocks may run concurrently: the filter must be thread-safe). Only
    triples with j >= i are visited (half the work of full rows)."""
    n = v.shape[1]
    v.sort_indices()
    # CSC copy that remembers where each CSR entry went (rows ascending within a column).
    where = sp.csr_matrix((np.arange(v.nnz, dtype=np.int64), v.indices, v.indptr), shape=v.shape).tocsc()
    assert where.has_sorted_indices
    vc = sp.csc_matrix((v.data[where.data], where.indices, where.indptr), shape=v.shape)
    # For each entry (i, m) of V, column m's entries with row >= i start at (i, m) itself.
    first = np.empty(v.nnz, dtype=np.int64)
    first[where.data] = np.arange(v.nnz, dtype=np.int64)
    del where
    count = vc.indptr[v.indices.astype(np.int64) + 1] - first
    row_len = np.diff(v.indptr)
    per_row = np.add.reduceat(count, v.indptr[:-1]) if v.nnz else np.zeros(n, np.int64)
    per_row = np.where(row_len > 0, per_row, 0)

    def block(se: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        s, e = se
        lo, hi = v.indptr[s], v.indptr[e]
        nz, sums = _overlap_sums(e - s, n, np.repeat(np.arange(e - s), row_len[s:e]), v.data[lo:hi],
                                 first[lo:hi], count[lo:hi], vc)
        d = _distance(sums)
        codes = nz + s * n  # (s + r) * n + j
        d[codes // n == codes % n] = 0.0  # the diagonal: exactly 0 (s_ii = 1 up to rounding)
        keep = d < 1.0
        codes, d = codes[keep], d[keep]
        return (codes, d) if pair_filter is None else pair_filter(codes, d)

    parts = _map_blocks(block, _row_blocks(per_row, n))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ------------------------------------------------------------------ public functions


def pairs_to_csr(codes: np.ndarray, values: np.ndarray, n: int) -> sp.csr_matrix:
    """Symmetric CSR [N, N] (sorted indices) from upper-triangle pair codes i*N + j (i <= j)."""
    i, j = np.divmod(codes, n)
    off = i != j
    rows = np.concatenate([i, j[off]])
    cols = np.concatenate([j, i[off]])
    data = np.concatenate([values, values[off]])
    del i, j, off
    m = sp.csr_matrix((data, (rows, cols)), shape=(n, n))  # COO -> CSR: O(nnz) bucketing by row
    m.sort_indices()
    return m


def jaccard_pairs(
    features: Any, k1: int = 30, k2: int = 6, *, backend: str = "auto", pair_filter: PairFilter | None = None,
    stats: dict | None = None, camids: Any = None, same_camera_offset: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Upper triangle of the Jaccard distance of docs/method.md: sorted pair codes i*N + j (i <= j)
    and float32 distances of every pair with distance < 1 (diagonal zeros included).

    `same_camera_offset` > 0 (with `camids`, one per row) adds that constant to the squared
    distance of two images of the same camera before the neighbour lists and their weights:
    the k-reciprocal sets then reach across cameras (0 = the paper).

    `pair_filter`, if given, is applied to each block of (codes, distances) as it is computed
    and returns what to keep (the values may be replaced); blocks cover disjoint code ranges
    and may be filtered concurrently, so the filter must be thread-safe. Everything of the view (candidates,
    exact keys, V) is freed on return. `stats`, if given, accumulates "knn_s", "jaccard_s",
    "uncertified_rows" and "rescored_pairs"."""
    x = as_feature_tensor(features)
    t0 = time.perf_counter()
    n = x.shape[0]
    length = min(k1, n)  # the released code's kNN returns k1 columns: the cap in docs/method.md
    half = int(np.around(k1 / 2))
    # Only the sets of the first k2, half+1 and k1+1 entries matter (capped at the list length).
    if same_camera_offset:
        if camids is None:
            raise ValueError("same_camera_offset needs the camera id of every row (camids=...)")
        lists = offset_lists(x, length, camids, same_camera_offset, backend=backend)
    else:
        lists = prefix_exact_lists(x, length, (k2, half + 1, k1 + 1), backend=backend)
    t1 = time.perf_counter()
    pattern = _expanded_sets(lists.indices, k1)
    rows = np.repeat(np.arange(n), np.diff(pattern.indptr))
    keys = lists.exact_keys.get(rows, pattern.indices)  # the candidates' keys are reused
    _add(stats, "uncertified_rows", lists.uncertified_rows)
    _add(stats, "rescored_pairs", len(lists.exact_keys))
    del rows
    v = _v_matrix(pattern, keys.astype(np.float64), lists.indices, k2)
    del pattern, keys, lists
    out = _jaccard_upper(v, pair_filter)
    _add(stats, "knn_s", t1 - t0)
    _add(stats, "jaccard_s", time.perf_counter() - t1)
    return out


def jaccard_distance(
    features: Any, k1: int = 30, k2: int = 6, *, backend: str = "auto", stats: dict | None = None
) -> sp.csr_matrix:
    """k-reciprocal Jaccard distance of docs/method.md as a symmetric float32 CSR matrix [N, N].

    Every pair with distance < 1 is stored (absent = 1); the diagonal zeros are explicit.
    `backend` picks the kNN candidate search only (results are identical); `stats` as in
    `jaccard_pairs`."""
    x = as_feature_tensor(features)
    codes, d = jaccard_pairs(x, k1, k2, backend=backend, stats=stats)
    return pairs_to_csr(codes, d, x.shape[0])


def rerank_distance(
    query_features: Any, gallery_features: Any, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of query-gallery distances [Q, G].

    Follows the classic `re_ranking` as called by Cluster-Contrast style evaluators with
    squared-Euclidean inputs d: original = d**2 / max_j d_ij**2 (row maximum over query and
    gallery together); the full ranking is available there, so R(i, k) looks at k+1 entries
    (no k1 cap); V = softmax of -original over the expanded set; query expansion with k2;
    final = (1 - lambda) * Jaccard + lambda * original. Ranking uses the exact keys of
    purireid.labels.neighbours (ordering by d**2/max equals ordering by d).
    """
    q = as_feature_tensor(query_features)
    g = as_feature_tensor(gallery_features).to(q.device)
    x = torch.cat([q, g], dim=0)
    n, nq = x.shape[0], q.shape[0]
    lists = exact_lists(x, min(k1 + 1, n), want_row_max=True)
    scale = np.maximum(lists.row_max.astype(np.float64) ** 2, np.finfo(np.float64).tiny)
    pattern = _expanded_sets(lists.indices, k1)
    rows = np.repeat(np.arange(n), np.diff(pattern.indptr))
    keys = lists.exact_keys.get(rows, pattern.indices).astype(np.float64)
    v = _v_matrix(pattern, keys**2 / scale[rows], lists.indices, k2)
    del pattern, rows, keys
    jsp = _jaccard_rows(v, np.arange(nq))[:, nq:].tocsr()
    jac = np.ones((nq, n - nq), dtype=np.float32)  # absent pairs: Jaccard distance 1
    jac[np.repeat(np.arange(nq), np.diff(jsp.indptr)), jsp.indices] = jsp.data
    # Original distance d**2 / rowmax, query block by query block (float32 GEMM).
    out = np.empty((nq, n - nq), dtype=np.float32)
    gn = g.pow(2).sum(1)
    for s in range(0, nq, 1024):
        e = min(nq, s + 1024)
        d = (q[s:e].pow(2).sum(1)[:, None] + gn[None, :] - 2.0 * (q[s:e] @ g.T)).clamp_min(0).cpu().numpy()
        orig = (d.astype(np.float64) ** 2 / scale[s:e, None]).astype(np.float32)
        out[s:e] = jac[s:e] * np.float32(1 - lambda_value) + orig * np.float32(lambda_value)
    return out
