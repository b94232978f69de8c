"""Certified exact nearest-neighbour lists of a set of points (self-kNN, squared Euclidean): what
the k-reciprocal Jaccard distance (purireid.labels.jaccard) and the pseudo labels
(purireid.labels.cluster) are built on; `knn` is the public entry point.

The keys, the backends and their choice, the error bounds and the candidate scan are the
engine's (purireid.knn.engine, also behind the gallery search); this module adds the lists:

* A neighbour list is the point itself first, then the others by (key, index).
* `exact_lists`: the scan's candidates (the list's length plus _EXTRA_CANDIDATES) are re-scored
  exactly; a row whose list the bounds cannot certify is recomputed against all points. With
  `want_row_max`, each row's largest key (re-ranking's normaliser) is certified the same way.
  Results are identical whatever the backend.
* `prefix_exact_lists` certifies less: only the *sets* of the first p entries for a few prefix
  lengths p, which is all the Jaccard distance needs; only pairs whose candidate interval
  leaves their membership undecided are re-scored (~16 of 53 candidates per row).
* `offset_lists`: lists of the key plus a constant for pairs of the same group (camera).
* The exact keys computed stay in `ExactKeys` (by unordered pair) for the Jaccard weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from purireid.knn.engine import (
    GRID, CandidateScan, as_feature_tensor, grid_key, pair_keys, resolve_backend, sq_norms,
)
from purireid.log import get_logger

__all__ = ["NeighbourLists", "ExactKeys", "OffsetKeys", "as_feature_tensor", "exact_lists", "prefix_exact_lists",
           "offset_lists", "knn"]

log = get_logger("neighbours")

_EXTRA_CANDIDATES = 24  # over-fetch beyond the list length in the cheap candidate search
_FAR_CANDIDATES = 8  # candidates for the farthest point (re-ranking's row maximum)


def _grid_key(d64: np.ndarray) -> np.ndarray:
    """The engine's key as float32 (exact: keys of unit vectors are multiples of 2**-22 below 4)."""
    return grid_key(d64).astype(np.float32)


# ----------------------------------------------------------------------- exact keys


class ExactKeys:
    """Exact keys of pairs of rows of one feature matrix, computed on demand and cached by
    unordered pair (each pair is evaluated at most once; key(i, j) == key(j, i) bit for bit).

    A key is the engine's (purireid.knn.engine.pair_keys), as float32."""

    def __init__(self, features: np.ndarray, norms: np.ndarray):
        self.features, self.norms, self.n = features, norms, features.shape[0]
        self.codes = np.zeros(0, dtype=np.int64)  # sorted unordered pair codes min*N + max
        self.keys = np.zeros(0, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.codes)

    def get(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Keys of the pairs (i[t], j[t]), float32; self pairs are exactly 0."""
        i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
        out = np.zeros(len(i), dtype=np.float32)
        other = i != j
        codes = np.minimum(i[other], j[other]) * self.n + np.maximum(i[other], j[other])
        if len(self.codes):
            found = self.codes[np.minimum(np.searchsorted(self.codes, codes), len(self.codes) - 1)] == codes
            new = np.unique(codes[~found])
        else:
            new = np.unique(codes)
        if len(new):  # both sorted: insert in place of a re-sort
            at = np.searchsorted(self.codes, new)
            self.keys = np.insert(self.keys, at, self._compute(new))
            self.codes = np.insert(self.codes, at, new)
        out[other] = self.keys[np.searchsorted(self.codes, codes)]
        return out

    def _compute(self, codes: np.ndarray) -> np.ndarray:
        a, b = np.divmod(codes, self.n)
        return _grid_key(pair_keys(self.features, a, self.features, b, self.norms, self.norms))


def _full_rows(x: torch.Tensor, norms: np.ndarray, rows: np.ndarray, col_block: int = 8192) -> np.ndarray:
    """Exact keys of whole rows against every point (the fallback for uncertified rows); the
    float32 column blocks are widened to float64 on the fly."""
    n = x.shape[0]
    out = np.empty((len(rows), n), dtype=np.float32)
    xr = x[torch.from_numpy(rows).to(x.device)].double()
    for c in range(0, n, col_block):
        ce = min(n, c + col_block)
        dots = (xr @ x[c:ce].double().T).cpu().numpy()
        out[:, c:ce] = _grid_key(norms[rows][:, None] + norms[None, c:ce] - 2.0 * dots)
    return out


def _sort_lists(cand: np.ndarray, keys: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (key, index) and keep `length` columns. Column 0 must hold self with
    key -1 so that it stays first."""
    order = np.lexsort((cand, keys), axis=1)[:, :length]
    return np.take_along_axis(cand, order, 1), np.take_along_axis(keys, order, 1)


def _recompute_rows(x: torch.Tensor, norms: np.ndarray, rows: np.ndarray, length: int,
                    offset: _GroupOffset | None = None):
    """Exact lists (indices, keys) and row maxima of `rows` from their full rows, 256 at a time
    (keys plus the group offset, if given)."""
    n = x.shape[0]
    for s in range(0, len(rows), 256):
        part = rows[s : s + 256]
        full = _full_rows(x, norms, part)
        if offset is not None:
            full += offset.of(np.repeat(part, n), np.tile(np.arange(n), len(part))).reshape(full.shape)
        row_max = full.max(axis=1)
        full[np.arange(len(part)), part] = -1.0
        allc = np.broadcast_to(np.arange(n, dtype=np.int64), full.shape)
        idx, keys = _sort_lists(allc, full, length)
        yield part, idx, keys, row_max


# ---------------------------------------------------------------------- exact lists


@dataclass
class NeighbourLists:
    """Exact neighbour lists of N points.

    indices [N, L] int64, self first. keys [N, L] float32 exact keys in list order (self 0),
    or None for `prefix_exact_lists`, whose lists are exact only as prefix *sets*. row_max [N]
    float32: each row's largest key over all points (only when asked for). exact_keys: the
    cache of every key computed, for reuse. uncertified_rows: rows recomputed against all points.
    """

    indices: np.ndarray
    keys: np.ndarray | None
    row_max: np.ndarray | None
    exact_keys: ExactKeys | OffsetKeys
    uncertified_rows: int


def _prepare(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, CandidateScan, np.ndarray, ExactKeys]:
    """The points on the scan's device (a GPU, when there is one, for the fp32 torch scan), the
    scan, the float64 squared norms and an empty cache of exact keys."""
    gpu = x.is_cuda or torch.cuda.is_available()
    backend = resolve_backend(backend, "cuda" if gpu else "cpu", int(x.shape[1]))
    if backend == "torch" and gpu and not x.is_cuda:
        x = x.cuda()
    norms = sq_norms(x)
    return x, CandidateScan(x, backend, norms), norms, ExactKeys(x.cpu().numpy(), norms)


def exact_lists(x: torch.Tensor, length: int, *, backend: str = "auto", want_row_max: bool = False) -> NeighbourLists:
    """Exact neighbour lists of `length` entries (self first, then by (key, index)) with their
    keys, and optionally each row's exact maximum key (the farthest point)."""
    n = x.shape[0]
    x, scan, norms, table = _prepare(x, backend)
    n_near = min(n - 1, length - 1 + _EXTRA_CANDIDATES)
    n_far = min(n, _FAR_CANDIDATES) if want_row_max else 0
    cand = scan.scan(n_near, n_far=n_far)
    lower = np.full(n, np.inf) if n_near == n - 1 else cand.lower  # all points are candidates
    allc = np.concatenate([np.arange(n, dtype=np.int64)[:, None], cand.near], axis=1)
    keys = table.get(np.repeat(np.arange(n), allc.shape[1]), allc.ravel()).reshape(allc.shape)
    keys[:, 0] = -1.0
    idx, lkeys = _sort_lists(allc, keys, length)
    # Certified iff the last kept key is strictly below every non-candidate's possible key
    # (one grid step of margin for the rounding of the key itself).
    bad = lkeys[:, -1].astype(np.float64) >= lower - 2.0 / GRID
    row_max = None
    if want_row_max:
        upper = np.full(n, -np.inf) if n_far == n else cand.upper
        fkeys = table.get(np.repeat(np.arange(n), n_far), cand.far.ravel()).reshape(n, n_far)
        row_max = np.maximum(fkeys.max(axis=1), 0.0).astype(np.float32)  # self (0) is always a point
        bad |= row_max.astype(np.float64) <= upper + 2.0 / GRID
    bad_rows = np.flatnonzero(bad)
    for rows, ridx, rkeys, rmax in _recompute_rows(x, norms, bad_rows, length):
        idx[rows], lkeys[rows] = ridx, rkeys
        if row_max is not None:
            row_max[rows] = rmax
    lkeys[:, 0] = 0.0
    log.debug("exact_lists: N=%d length=%d backend=%s uncertified rows %d, exact keys %d",
              n, length, scan.backend, len(bad_rows), len(table))
    return NeighbourLists(idx, lkeys, row_max, table, len(bad_rows))


def _prefix_sets(
    cand: np.ndarray, klo: np.ndarray, khi: np.ndarray, exact: np.ndarray, sizes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Which candidates (non-self, one row per point) rank among the first p of their row, for
    every p in `sizes`, by (key, index). klo/khi bound each key; `exact` holds the exact key
    (NaN where unknown). Returns (tier [N, C]: number of prefixes a candidate is *not* in,
    missing [N, C]: candidates whose exact key is needed to decide, but unknown).

    Per prefix p: if hi_j < the (p+1)-th smallest lo, fewer than p candidates can precede j, so
    j is in; if lo_j > the p-th smallest hi, p candidates surely precede it, so j is out; the
    undecided rest is resolved by (exact key, index)."""
    n, c = cand.shape
    tier = np.zeros((n, c), dtype=np.int8)
    missing = np.zeros((n, c), dtype=bool)
    known = ~np.isnan(exact)
    lo = np.where(known, exact, klo)
    hi = np.where(known, exact, khi)
    slo, shi = np.sort(lo, axis=1), np.sort(hi, axis=1)
    for p in sizes:
        if p >= c:
            continue  # every candidate is in (the fallback handles rows with too few candidates)
        sure_in = hi < slo[:, p : p + 1]
        sure_out = lo > shi[:, p - 1 : p]
        amb = ~(sure_in | sure_out)
        need = p - sure_in.sum(1)
        missing |= amb & ~known
        # Among the undecided, the `need` smallest by (exact key, index) are in.
        kk = np.where(amb & known, exact, np.inf)
        order = np.lexsort((cand, kk), axis=1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(c)[None, :], axis=1)
        tier += ~(sure_in | (amb & (rank < need[:, None])))
    return tier, missing


def prefix_exact_lists(x: torch.Tensor, length: int, sizes: Sequence[int], *, backend: str = "auto") -> NeighbourLists:
    """Neighbour lists of `length` entries (self first) that are exact as *sets* for every
    prefix length in `sizes` (the order inside a tier between consecutive sizes is unspecified).
    Only candidates whose cheap-GEMM interval leaves their membership undecided are re-scored;
    their keys stay in the returned `exact_keys` cache for reuse."""
    n = x.shape[0]
    x, scan, norms, table = _prepare(x, backend)
    n_near = min(n - 1, length - 1 + _EXTRA_CANDIDATES)
    cand = scan.scan(n_near, intervals=True)
    near = cand.near
    lower = np.full(n, np.inf) if n_near == n - 1 else cand.lower  # all points are candidates
    # Key = rint(d * G) / G, so |key - d| <= 1/(2G): widen by one grid step.
    klo, khi = np.maximum(cand.near_lo, 0.0) - 1.0 / GRID, cand.near_hi + 1.0 / GRID
    del cand
    sizes = sorted(p for p in {min(p, length) - 1 for p in sizes} | {length - 1} if p >= 1)
    exact = np.full(near.shape, np.nan)
    # Re-score exactly the candidates that are undecided for some prefix, then decide (exact
    # keys only narrow the intervals, so nothing new becomes undecided).
    _, undecided = _prefix_sets(near, klo, khi, exact, sizes)
    r, c = np.nonzero(undecided)
    exact[r, c] = table.get(r, near[r, c])
    del undecided, r, c
    tier, missing = _prefix_sets(near, klo, khi, exact, sizes)
    # Certification: the (length-1)-th smallest upper bound must be below every non-candidate.
    p = length - 1
    hi_now = np.where(np.isnan(exact), khi, exact)
    bound = np.partition(hi_now, p - 1, axis=1)[:, p - 1] if p >= 1 else np.full(n, -np.inf)
    bad = missing.any(axis=1) | (bound >= lower - 2.0 / GRID)  # `missing` is empty by construction
    order = np.lexsort((near, tier), axis=1)[:, : length - 1]
    idx = np.concatenate([np.arange(n, dtype=np.int64)[:, None], np.take_along_axis(near, order, 1)], axis=1)
    bad_rows = np.flatnonzero(bad)
    for rows, ridx, _, _ in _recompute_rows(x, norms, bad_rows, length):
        idx[rows] = ridx
    log.debug("prefix_exact_lists: N=%d length=%d backend=%s uncertified rows %d, re-scored pairs %d",
              n, length, scan.backend, len(bad_rows), len(table))
    return NeighbourLists(idx, None, None, table, len(bad_rows))


class _GroupOffset:
    """A constant added to the key of every pair of distinct points in the same group."""

    def __init__(self, groups: np.ndarray, offset: float):
        self.groups, self.offset = groups, np.float32(offset)

    def of(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return np.where((self.groups[i] == self.groups[j]) & (i != j), self.offset, np.float32(0.0))


class OffsetKeys:
    """`ExactKeys` seen through a group offset: get(i, j) = exact key + offset when i != j
    share a group (what `offset_lists` ranks by, and what the Jaccard weights then use)."""

    def __init__(self, table: ExactKeys, offset: _GroupOffset):
        self.table, self.offset = table, offset

    def __len__(self) -> int:
        return len(self.table)

    def get(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
        return self.table.get(i, j) + self.offset.of(i, j)


def offset_lists(x: torch.Tensor, length: int, groups: np.ndarray | Sequence[int], offset: float, *,
                 backend: str = "auto") -> NeighbourLists:
    """Exact neighbour lists (self first, then by (key, index)) of the key plus `offset` for
    every pair of distinct points in the same group, e.g. the same camera: with offset > 0 a
    point's neighbours come more from other groups. The returned keys and `exact_keys` carry
    the offset.

    Certified like `exact_lists`: the offset only raises keys, so a non-candidate's offset key
    is still >= the plain search's lower bound. Four times the list's length is fetched, as
    same-group candidates may drop out of the list; rows the bounds cannot certify are
    recomputed against all points."""
    n = x.shape[0]
    group_ids = np.asarray(groups).reshape(-1)
    if len(group_ids) != n:
        raise ValueError(f"{len(group_ids)} group ids for {n} points")
    if offset < 0:
        raise ValueError(f"the same-group offset must be >= 0, got {offset}")
    shift = _GroupOffset(group_ids, offset)
    x, scan, norms, table = _prepare(x, backend)
    n_near = min(n - 1, 4 * (length - 1) + _EXTRA_CANDIDATES)
    cand = scan.scan(n_near)
    lower = np.full(n, np.inf) if n_near == n - 1 else cand.lower  # all points are candidates
    allc = np.concatenate([np.arange(n, dtype=np.int64)[:, None], cand.near], axis=1)
    rows = np.repeat(np.arange(n), allc.shape[1])
    keys = (table.get(rows, allc.ravel()) + shift.of(rows, allc.ravel())).reshape(allc.shape)
    del cand, rows
    keys[:, 0] = -1.0
    idx, lkeys = _sort_lists(allc, keys, length)
    bad_rows = np.flatnonzero(lkeys[:, -1].astype(np.float64) >= lower - 2.0 / GRID)
    for part, ridx, rkeys, _ in _recompute_rows(x, norms, bad_rows, length, shift):
        idx[part], lkeys[part] = ridx, rkeys
    lkeys[:, 0] = 0.0
    log.debug("offset_lists: N=%d length=%d offset=%s uncertified rows %d", n, length, offset, len(bad_rows))
    return NeighbourLists(idx, lkeys, None, OffsetKeys(table, shift), len(bad_rows))


def knn(features: Any, k: int, *, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by squared Euclidean distance, self first.

    Returns (distances float32 [N, k], indices int64 [N, k]); ties are broken by index and
    distances are the exact keys described in the module docstring (self: 0). `backend`
    picks only the candidate search (auto, bf16, torch, faiss): results are identical.
    """
    x = as_feature_tensor(features)
    k = min(int(k), x.shape[0])
    if k < 1:
        raise ValueError("k must be >= 1")
    lists = exact_lists(x, k, backend=backend)
    return lists.keys, lists.indices
