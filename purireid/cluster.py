"""Pseudo labels: exact kNN, sparse k-reciprocal Jaccard distance, fused DBSCAN (SPEC §3).

Everything here is a pure function on in-memory arrays. The Jaccard distance is the
textbook algorithm of SPEC §3.2 (including the released code's k1 cap), but computed on
sparse rows: memory is O(N·k) and no N×N array is ever built.

Exactness conventions (the dense reference in ``tests/jaccard_reference.py`` uses the same):

* The distance of a pair is the squared Euclidean distance of the float32 inputs,
  evaluated in float64 and rounded to a fixed absolute grid of 2**-22 (negative values
  clipped to 0). The grid makes the value independent of BLAS summation order (a float64
  result differs by ~1e-16 between kernels; rounding to the grid removes that), so ties,
  e.g. between exact duplicate points, are real ties and can be broken deterministically.
* Neighbour lists: the point itself first, then the others by (distance key, index).
* The fast kNN searches candidates with a cheap GEMM (bfloat16 AMX on CPU, float32 on
  CUDA, or a faiss flat index), re-scores the candidates with the exact key and *verifies*
  per row, from a rigorous bound on the cheap GEMM's error, that no non-candidate can
  enter the list. Rows that fail the check are recomputed against all points. The result
  is therefore identical to sorting the full exact distance matrix.
* The Jaccard path needs less: only the *sets* of the first k2, round(k1/2)+1 and k1 entries
  of each list. A candidate is re-scored exactly only if its certified interval from the
  cheap GEMM leaves its membership in one of those sets undecided (~16 of 53 per row); exact
  keys are kept per unordered pair and reused for the expanded sets' weights.
* Exact float64 dot products are taken on gathered float32 rows in small chunks: no float64
  copy of the features exists, and a view's memory is freed before the next view starts.
* pseudo_labels keeps only pairs that can be within eps of each other (fused >= w0 * d0 in
  float32, so view 0 decides), and runs DBSCAN on that graph with an exact re-implementation
  of scikit-learn's labelling (tests compare it with sklearn on dense matrices).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from purireid import VIEWS

__all__ = ["knn", "jaccard_distance", "pseudo_labels", "cluster_centres", "rerank_distance"]

_GRID = 2.0**22  # distance keys are multiples of 2**-22 (exactly representable in float32 < 4)
_EXTRA_CANDIDATES = 24  # over-fetch beyond the list length in the cheap candidate search
_FAR_CANDIDATES = 8  # candidates for the farthest point (re-ranking's row maximum)
_ROW_BLOCK = 512  # rows per block of the candidate GEMM (sim block + oneDNN buffers ~ 80 MB at N = 13k)
_TRIPLES_PER_BLOCK = 2_000_000  # (i, m, j) triples per block of the Jaccard accumulation
_BUFFER_PER_BLOCK = 4_000_000  # dense accumulator entries (rows × N) per Jaccard block
_PAIR_CHUNK = 1024  # pairs per chunk of the exact float64 re-scoring (2 x 8 MB gathered rows)


# ----------------------------------------------------------------------------- helpers


def _to_tensor(features: Any) -> torch.Tensor:
    """float32, contiguous, 2-D torch tensor on its own device (numpy input shares memory)."""
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D [N, D], got shape {tuple(x.shape)}")
    return x.detach().to(torch.float32).contiguous()


def _sq_norms(x: torch.Tensor) -> np.ndarray:
    """Float64 squared norms of float32 rows (products exact in float64; numpy's einsum casts
    in small buffers, ~10x faster than a float64 copy of x and no N x D temporary)."""
    xn = x.detach().cpu().numpy()
    return np.einsum("ij,ij->i", xn, xn, dtype=np.float64)


def _grid_key(d64: np.ndarray) -> np.ndarray:
    """Exact distance key: float64 distance clipped at 0 and rounded to the 2**-22 grid."""
    return (np.rint(np.maximum(d64, 0.0) * _GRID) / _GRID).astype(np.float32)


def _ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for every (s, l), without a Python loop."""
    lengths = lengths.astype(np.int64, copy=False)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_begin = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts.astype(np.int64) - seg_begin, lengths)


@functools.lru_cache(maxsize=1)
def _cpu_has_fast_bf16() -> bool:
    """AMX-bf16 makes a bf16 GEMM ~5x faster than fp32 on CPU; without it bf16 is no win."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in ("auto", "bf16", "torch", "faiss"):
        raise ValueError(f"unknown knn backend {backend!r} (auto, bf16, torch, faiss)")
    if backend != "auto":
        return backend
    if x.is_cuda or torch.cuda.is_available():
        return "torch"  # fp32 GEMM on the GPU (moved there below)
    return "bf16" if _cpu_has_fast_bf16() else "faiss"


def _gamma(k: int) -> float:
    """Worst-case relative error of a float32 sum of k products (Higham's gamma_k)."""
    u = 2.0**-24
    return k * u / (1.0 - k * u)


# ------------------------------------------------------------------ candidate search


def _candidates_torch(
    x: torch.Tensor, norms: np.ndarray, n_near: int, n_far: int, use_bf16: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Blocked GEMM + topk. Returns near candidates (self excluded) with a certified lower
    bound on the exact distance of every non-candidate, and optionally far candidates with
    a certified upper bound on the distance of every non-candidate.
    """
    n, dim = x.shape
    device = x.device
    if device.type == "cuda":
        use_bf16 = False  # cuBLAS may reduce bf16 in reduced precision: keep fp32, no TF32
    if use_bf16:
        xs = x.to(torch.bfloat16)  # CPU here (CUDA keeps fp32)
        resid, sn = np.empty(n), np.empty(n)
        for s in range(0, n, _ROW_BLOCK):  # blocks: no N x D float32/float64 temporaries
            xb = x[s : s + _ROW_BLOCK].numpy()
            xsb = xs[s : s + _ROW_BLOCK].float().numpy()
            eb = xb - xsb  # exact (Sterbenz)
            resid[s : s + _ROW_BLOCK] = np.sqrt(np.einsum("ij,ij->i", eb, eb, dtype=np.float64))
            sn[s : s + _ROW_BLOCK] = np.sqrt(np.einsum("ij,ij->i", xsb, xsb, dtype=np.float64))
        # |x_i.x_j - xs_i.xs_j| <= |xs_i||e_j| + |e_i||xs_j| + |e_i||e_j|, plus fp32 accumulation.
        err = sn * resid.max() + resid * sn.max() + resid * resid.max() + _gamma(dim) * sn * sn.max()
        err = err * (1.0 + 2.0**-40)  # the float64 norms themselves are rounded
        pair_terms = (sn, resid, _gamma(dim))
        out_round = 2.0**-8 * (1.0 + 2.0**-6)  # bf16 output: half-ulp <= 2**-8 |v|, with margin
    else:
        xs = x
        xn = np.sqrt(norms)
        err = _gamma(dim) * xn * xn.max()
        pair_terms = None
        out_round = 0.0
    near_idx = np.empty((n, n_near), dtype=np.int64)
    near_val = np.empty((n, n_near), dtype=np.float32)  # the cheap dot products (for the bounds)
    far_idx = np.empty((n, n_far), dtype=np.int64) if n_far else None
    far_thr = np.empty(n, dtype=np.float64) if n_far else None
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for s in range(0, n, _ROW_BLOCK):
            e = min(n, s + _ROW_BLOCK)
            sim = xs[s:e] @ xs.T  # [b, n] approximate dot products
            if n_far:
                v, i = torch.topk(sim, n_far, dim=1, largest=False, sorted=False)
                far_idx[s:e] = i.cpu().numpy()
                far_thr[s:e] = v.max(dim=1).values.double().cpu().numpy()
            torch.diagonal(sim, offset=s).fill_(float("-inf"))  # self is added separately, first
            v, i = torch.topk(sim, n_near, dim=1, largest=True, sorted=False)
            near_idx[s:e] = i.cpu().numpy()
            near_val[s:e] = v.float().cpu().numpy()
            del sim, v, i
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    norms_np = norms
    err_np = err + 1e-12
    near_thr = near_val.min(axis=1).astype(np.float64) if n_near else np.full(n, np.inf)
    # Non-candidate j: approx <= thr, so its fp32 accumulated value <= thr + out_round|thr| and
    # its exact dot <= that + err_i; d = n_i + n_j - 2 dot >= n_i + min n - 2(...).
    lower = norms_np + norms_np.min() - 2.0 * (near_thr + out_round * np.abs(near_thr) + err_np)
    upper = None
    if n_far:
        upper = norms_np + norms_np.max() - 2.0 * (far_thr - out_round * np.abs(far_thr) - err_np)
    # Per-candidate interval of the exact float64 distance (same bound as above, per pair).
    nv = near_val.astype(np.float64)
    if pair_terms is None:
        slack = out_round * np.abs(nv) + err_np[:, None]
    else:  # the same bound with the candidate's own norms instead of the maxima (tighter)
        sn, resid, g = pair_terms
        sj, rj = sn[near_idx], resid[near_idx]
        pair_err = (sn[:, None] * rj + resid[:, None] * sj + resid[:, None] * rj + g * sn[:, None] * sj)
        slack = out_round * np.abs(nv) + pair_err * (1.0 + 2.0**-40) + 1e-12
        del sj, rj, pair_err
    base = norms_np[:, None] + norms_np[near_idx]
    near_lo, near_hi = base - 2.0 * (nv + slack), base - 2.0 * (nv - slack)
    return near_idx, lower, far_idx, upper, near_lo, near_hi


def _candidates_faiss(x: torch.Tensor, n_near: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Near candidates from a faiss flat L2 index (fp32 GEMM inside), self removed, with the
    certified lower bound for non-candidates and each candidate's distance interval."""
    import faiss

    xn = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
    n, dim = xn.shape
    index = faiss.IndexFlatL2(dim)
    index.add(xn)
    dist, idx = index.search(xn, n_near + 1)
    is_self = idx == np.arange(n)[:, None]
    # Stable: keep the first n_near non-self columns (drop self, or the last when self is absent).
    order = np.argsort(is_self, axis=1, kind="stable")[:, :n_near]
    near_idx = np.take_along_axis(idx, order, axis=1).astype(np.int64)
    near_d = np.take_along_axis(dist, order, axis=1).astype(np.float64)
    thr = dist[:, -1].astype(np.float64)  # every non-returned point has approx >= this
    norms = (xn.astype(np.float64) ** 2).sum(1)
    xnorm = np.sqrt(norms)
    # faiss: |x|^2 + |y|^2 - 2 x.y in fp32; bound the GEMM and the three-term sum generously.
    err = 2.0 * _gamma(dim) * xnorm * xnorm.max() + 8 * 2.0**-24 * (norms + norms.max() + 2 * xnorm * xnorm.max())
    err = err + 1e-12
    return near_idx, thr - err, near_d - err[:, None], near_d + err[:, None]


# ----------------------------------------------------------------------- exact keys


def _pair_keys(x64: torch.Tensor, norms: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Exact keys of the ragged pairs (i, indices[indptr[i]:indptr[i+1]]): float64 dot products
    of exactly those pairs (sampled dense-dense matmul, no gather copies), then the grid."""
    n = x64.shape[0]
    if len(indices) == 0:
        return np.zeros(0, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            torch.from_numpy(np.ascontiguousarray(indptr, dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)),
            torch.zeros(len(indices), dtype=torch.float64),
            size=(n, n),
            device=x64.device,
        )
        dots = torch.sparse.sampled_addmm(pattern, x64, x64.T, beta=0.0).values().cpu().numpy()
    rows = np.repeat(np.arange(n), np.diff(indptr))
    return _grid_key(norms[rows] + norms[indices] - 2.0 * dots)


def _full_rows(x: torch.Tensor, norms: np.ndarray, rows: np.ndarray, col_block: int = 8192) -> np.ndarray:
    """Exact keys of whole rows (fallback for rows whose candidate set was not certified).
    `x` may be float32: column blocks are widened to float64 on the fly."""
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


def _exact_lists(
    x: torch.Tensor, length: int, backend: str, want_far: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, torch.Tensor, np.ndarray]:
    """Exact neighbour lists of `length` entries (self first) with their keys and (optionally) each row's exact maximum distance key."""
    n = x.shape[0]
    backend = _resolve_backend(backend, x)
    if backend == "torch" and not x.is_cuda and torch.cuda.is_available():
        x = x.cuda()
    x64 = x.double()
    norms = torch.einsum("nd,nd->n", x64, x64).cpu().numpy()
    n_near = min(n - 1, length - 1 + _EXTRA_CANDIDATES)
    n_far = min(n, _FAR_CANDIDATES) if want_far else 0
    if backend == "faiss" and not want_far:
        near, lower, _, _ = _candidates_faiss(x, n_near)
        far = upper = None
    else:
        near, lower, far, upper, _, _ = _candidates_torch(x, norms, n_near, n_far, use_bf16=(backend == "bf16"))
    if n_near == n - 1:
        lower = np.full(n, np.inf)  # every point is a candidate: nothing to certify
    cand = np.concatenate([np.arange(n, dtype=np.int64)[:, None], near], axis=1)
    width = cand.shape[1]
    keys = _pair_keys(x64, norms, np.arange(0, n * width + 1, width), cand.ravel()).reshape(n, width)
    keys[:, 0] = -1.0
    idx, lkeys = _sort_lists(cand, keys, length)
    # Certified iff the last kept key is strictly below every non-candidate's possible key
    # (one grid step of margin for the rounding of the key itself).
    bad = lkeys[:, -1].astype(np.float64) >= lower - 2.0 / _GRID
    rowmax = None
    if want_far:
        if n_far == n:
            upper = np.full(n, -np.inf)
        fkeys = _pair_keys(x64, norms, np.arange(0, n * n_far + 1, n_far), far.ravel()).reshape(n, n_far)
        rowmax = np.maximum(fkeys.max(axis=1), 0.0).astype(np.float32)  # self (0) is always a point
        bad |= rowmax.astype(np.float64) <= upper + 2.0 / _GRID
    bad_rows = np.flatnonzero(bad)
    for s in range(0, len(bad_rows), 256):
        rows = bad_rows[s : s + 256]
        full = _full_rows(x64, norms, rows)
        if rowmax is not None:
            rowmax[rows] = full.max(axis=1)
        full[np.arange(len(rows)), rows] = -1.0
        allc = np.broadcast_to(np.arange(n, dtype=np.int64), full.shape)
        i2, k2 = _sort_lists(allc, full, length)
        idx[rows], lkeys[rows] = i2, k2
    lkeys[:, 0] = 0.0
    _exact_lists.last_fallback_rows = len(bad_rows)  # diagnostics for tests / benchmarks
    return idx, lkeys, rowmax, x64, norms


_exact_lists.last_fallback_rows = 0


def _prefix_sets(
    cand: np.ndarray, klo: np.ndarray, khi: np.ndarray, exact: np.ndarray, sizes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Which candidates (non-self, one row per point) rank among the first p of their row, for
    every p in `sizes`, by (key, index). klo/khi bound each key; `exact` holds the exact key
    (NaN where unknown). Returns (tier [N, C]: number of prefixes a candidate is *not* in,
    missing [N, C]: candidates whose exact key is needed to decide, but unknown).

    Proof sketch, per prefix p: if hi_j < the (p+1)-th smallest lo, fewer than p candidates
    can precede j, so j is in; if lo_j > the p-th smallest hi, p candidates surely precede it,
    so j is out; the undecided rest is resolved by (exact key, index)."""
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
        # IN: fewer than p candidates can precede it. OUT: p candidates surely precede it.
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
        inside = sure_in | (amb & (rank < need[:, None]))
        tier += ~inside
    return tier, missing


def _pair_codes(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Unordered pair code (the key of (i, j) equals that of (j, i))."""
    return np.minimum(i, j).astype(np.int64) * n + np.maximum(i, j)


def _keys_for_codes(xn: np.ndarray, norms: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Exact keys of the sorted, unique unordered pair codes: float64 dot products of the
    gathered float32 rows, in chunks (no float64 copy of the features: O(chunk) memory)."""
    n = xn.shape[0]
    a, b = np.divmod(codes, n)
    dots = np.empty(len(codes), dtype=np.float64)

    def chunk(s: int) -> None:
        e = s + _PAIR_CHUNK
        dots[s:e] = np.einsum("ij,ij->i", xn[a[s:e]], xn[b[s:e]], dtype=np.float64)

    # numpy releases the GIL in the gathers and einsum: threads overlap the random row reads
    # (~2.5x on 2 cores). Each chunk writes its own slice: the result does not depend on them.
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(chunk, range(0, len(codes), _PAIR_CHUNK)))
    return _grid_key(norms[a] + norms[b] - 2.0 * dots)


class _KeyTable:
    """Exact keys computed so far, by unordered pair: each pair is re-scored at most once."""

    def __init__(self, xn: np.ndarray, norms: np.ndarray):
        self.xn, self.norms, self.n = xn, norms, xn.shape[0]
        self.codes = np.zeros(0, dtype=np.int64)
        self.keys = np.zeros(0, dtype=np.float32)

    def get(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        codes = _pair_codes(i, j, self.n)
        pos = np.searchsorted(self.codes, codes)
        pos_c = np.minimum(pos, len(self.codes) - 1)
        hit = (pos < len(self.codes)) & (self.codes[pos_c] == codes) if len(self.codes) else np.zeros(len(codes), bool)
        new = np.unique(codes[~hit])
        if len(new):
            new_keys = _keys_for_codes(self.xn, self.norms, new)
            allc = np.concatenate([self.codes, new])
            order = np.argsort(allc, kind="stable")
            self.codes, self.keys = allc[order], np.concatenate([self.keys, new_keys])[order]
            pos = np.searchsorted(self.codes, codes)
        out = self.keys[pos]
        out[i == j] = 0.0  # self distance: exactly 0, as in the dense reference
        return out


def _exact_prefix_lists(
    x: torch.Tensor, length: int, sizes: Sequence[int], backend: str
) -> tuple[np.ndarray, _KeyTable]:
    """Neighbour lists of `length` entries (self first) that are exact as *sets* for every
    prefix length in `sizes` (order inside a tier between consecutive sizes is unspecified),
    which is all the Jaccard distance needs. Only candidates whose cheap-GEMM interval leaves
    their membership undecided are re-scored exactly."""
    n = x.shape[0]
    backend = _resolve_backend(backend, x)
    if backend == "torch" and not x.is_cuda and torch.cuda.is_available():
        x = x.cuda()
    norms = _sq_norms(x)
    n_near = min(n - 1, length - 1 + _EXTRA_CANDIDATES)
    if backend == "faiss":
        near, lower, lo, hi = _candidates_faiss(x, n_near)
    else:
        near, lower, _, _, lo, hi = _candidates_torch(x, norms, n_near, 0, use_bf16=(backend == "bf16"))
    table = _KeyTable(x.cpu().numpy(), norms)
    if n_near == n - 1:
        lower = np.full(n, np.inf)  # every point is a candidate: nothing to certify
    # Key = rint(d * G) / G, so |key - d| <= 1/(2G): widen by one grid step.
    klo, khi = np.maximum(lo, 0.0) - 1.0 / _GRID, hi + 1.0 / _GRID
    del lo, hi
    sizes = sorted(p for p in {min(p, length) - 1 for p in sizes} | {length - 1} if p >= 1)
    exact = np.full(near.shape, np.nan)
    # Re-score exactly the candidates that are undecided for some prefix, then decide (exact
    # keys only narrow the intervals, so nothing new becomes undecided).
    _, undecided = _prefix_sets(near, klo, khi, exact, sizes)
    r, c = np.nonzero(undecided)
    exact[r, c] = table.get(r, near[r, c])
    del undecided, r, c
    tier, missing = _prefix_sets(near, klo, khi, exact, sizes)
    ok = ~missing.any(axis=1)  # always true; a row that is not goes to the exact fallback
    # Certification: the (length-1)-th smallest upper bound must be below every non-candidate.
    p = length - 1
    hi_now = np.where(np.isnan(exact), khi, exact)
    bound = np.partition(hi_now, p - 1, axis=1)[:, p - 1] if p >= 1 else np.full(n, -np.inf)
    bad = ~ok | (bound >= lower - 2.0 / _GRID)
    order = np.lexsort((near, tier), axis=1)[:, : length - 1]
    idx = np.concatenate([np.arange(n, dtype=np.int64)[:, None], np.take_along_axis(near, order, 1)], axis=1)
    bad_rows = np.flatnonzero(bad)
    for s in range(0, len(bad_rows), 256):
        rows = bad_rows[s : s + 256]
        full = _full_rows(x, norms, rows)
        full[np.arange(len(rows)), rows] = -1.0
        allc = np.broadcast_to(np.arange(n, dtype=np.int64), full.shape)
        idx[rows] = _sort_lists(allc, full, length)[0]
    _exact_lists.last_fallback_rows = len(bad_rows)
    _exact_prefix_lists.last_rescored = len(table.codes)
    return idx, table


_exact_prefix_lists.last_rescored = 0


def knn(features: Any, k: int, *, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by squared Euclidean distance, self first.

    Returns (distances float32 [N, k], indices int64 [N, k]); ties are broken by index and
    distances are the exact keys described in the module docstring (self: 0). `backend`
    picks only the candidate search (auto, bf16, torch, faiss): results are identical.
    """
    x = _to_tensor(features)
    k = min(int(k), x.shape[0])
    if k < 1:
        raise ValueError("k must be >= 1")
    idx, keys, _, _, _ = _exact_lists(x, k, backend)
    return keys, idx


# --------------------------------------------------------------------------- Jaccard


def _list_matrix(idx: np.ndarray, m: int, n_cols: int) -> sp.csr_matrix:
    rows = idx.shape[0]
    return sp.csr_matrix(
        (np.ones(rows * m, dtype=np.int32), idx[:, :m].ravel(), np.arange(0, rows * m + 1, m)),
        shape=(rows, n_cols),
    )


def _reciprocal(idx: np.ndarray, m: int) -> sp.csr_matrix:
    """R(i): j among the first m entries of i's list whose first m entries contain i."""
    f = _list_matrix(idx, m, idx.shape[0])
    r = f.multiply(f.T).tocsr()
    r.sort_indices()
    return r


def _expanded_sets(idx: np.ndarray, k1: int) -> sp.csr_matrix:
    """Pattern of the expanded k-reciprocal sets of SPEC §3.2 (with the k1 cap)."""
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


def _softmax_rows(pattern: sp.csr_matrix, keys: np.ndarray, scale: np.ndarray | None = None) -> sp.csr_matrix:
    """V[i, j] = softmax over the row's pattern of -(distance) (float64)."""
    rows = np.repeat(np.arange(pattern.shape[0]), np.diff(pattern.indptr))
    d = keys.astype(np.float64)
    if scale is not None:
        d = d / scale[rows]
    rowmin = np.full(pattern.shape[0], np.inf)
    np.minimum.at(rowmin, rows, d)
    w = np.exp(-(d - rowmin[rows]))
    w /= np.bincount(rows, weights=w, minlength=pattern.shape[0])[rows]
    return sp.csr_matrix((w, pattern.indices.copy(), pattern.indptr.copy()), shape=pattern.shape)


def _jaccard_rows(v: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    """d_J(i, j) = 1 - s/(2 - s), s = sum_m min(V[i,m], V[j,m]), for i in `rows` and every j;
    stores pairs with d_J < 1 (float32), the (i, i) entry as an explicit 0."""
    n = v.shape[1]
    vc = v.tocsc()
    vc.sort_indices()
    col_len = np.diff(vc.indptr)
    per_row = np.add.reduceat(col_len[v.indices], v.indptr[:-1]) if v.nnz else np.zeros(v.shape[0])
    per_row = np.where(np.diff(v.indptr) > 0, per_row, 0)[rows]
    out_indptr = [np.zeros(1, dtype=np.int64)]
    out_idx, out_val = [], []
    s = 0
    while s < len(rows):
        # Block of rows bounded by the number of triples and the dense accumulator size.
        cum = np.cumsum(per_row[s:])
        e = s + max(1, int(np.searchsorted(cum, _TRIPLES_PER_BLOCK, side="right")))
        e = min(e, s + max(1, _BUFFER_PER_BLOCK // n), len(rows))
        blk = rows[s:e]
        b = len(blk)
        starts, lens = v.indptr[blk], np.diff(v.indptr)[blk]
        pos = _ragged_arange(starts, lens)
        m = v.indices[pos]
        v_im = v.data[pos]
        i_loc = np.repeat(np.arange(b), lens)
        cl = col_len[m]
        tpos = _ragged_arange(vc.indptr[m], cl)
        vals = np.minimum(np.repeat(v_im, cl), vc.data[tpos])
        flat = np.repeat(i_loc * n, cl) + vc.indices[tpos]
        # Distinct (i, j) pairs via a boolean mark (cheap to scan), then sum into compact slots.
        mark = np.zeros(b * n, dtype=bool)
        mark[flat] = True
        nz = np.flatnonzero(mark)
        slot = np.empty(b * n, dtype=np.int32)
        slot[nz] = np.arange(len(nz), dtype=np.int32)
        sm = np.bincount(slot[flat], weights=vals, minlength=len(nz))
        d = np.maximum(1.0 - sm / (2.0 - sm), 0.0).astype(np.float32)
        r_loc, j = np.divmod(nz, n)
        d[j == blk[r_loc]] = 0.0  # the diagonal: exactly 0 (s_ii = 1 up to rounding)
        keep = d < 1.0
        counts = np.bincount(r_loc[keep], minlength=b)
        out_indptr.append(out_indptr[-1][-1] + np.cumsum(counts))
        out_idx.append(j[keep])
        out_val.append(d[keep])
        s = e
    indptr = np.concatenate(out_indptr)
    if n < 2**31 - 1:
        out_idx = [j.astype(np.int32) for j in out_idx]
    return sp.csr_matrix(
        (np.concatenate(out_val) if out_val else np.zeros(0, np.float32),
         np.concatenate(out_idx) if out_idx else np.zeros(0, np.int64), indptr),
        shape=(len(rows), n),
    )


def _jaccard_upper(
    v: sp.csr_matrix, keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Upper triangle (i <= j) of the Jaccard distance of `_jaccard_rows`: sorted pair codes
    i*N + j and float32 distances of the pairs with d < 1 (diagonal: 0) that pass `keep`.

    s_ij is symmetric and is summed over m in the same (ascending) order for (i, j) and
    (j, i), so the lower triangle is the exact mirror: only triples with j >= i are visited.
    """
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
    per_row = np.add.reduceat(count, v.indptr[:-1]) if v.nnz else np.zeros(n, np.int64)
    per_row = np.where(np.diff(v.indptr) > 0, per_row, 0)
    # Row blocks bounded by the number of triples and by the dense accumulator size.
    bounds, s = [], 0
    cum_all = np.concatenate([[0], np.cumsum(per_row)])
    while s < n:
        e = s + max(1, int(np.searchsorted(cum_all[s + 1 :] - cum_all[s], _TRIPLES_PER_BLOCK // 2, side="right")))
        e = min(e, s + max(1, _BUFFER_PER_BLOCK // n), n)
        bounds.append((s, e))
        s = e

    def block(se: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        s, e = se
        b = e - s
        lo, hi = v.indptr[s], v.indptr[e]
        cl = count[lo:hi]
        i_loc = np.repeat(np.arange(b), np.diff(v.indptr[s : e + 1]))
        tpos = _ragged_arange(first[lo:hi], cl)
        vals = np.minimum(np.repeat(v.data[lo:hi], cl), vc.data[tpos])
        flat = np.repeat(i_loc * n, cl) + vc.indices[tpos]
        del tpos
        # Distinct (i, j) pairs via a boolean mark (cheap to scan), then sum into compact slots;
        # bincount adds in order of appearance, i.e. m ascending, as in _jaccard_rows.
        mark = np.zeros(b * n, dtype=bool)
        mark[flat] = True
        nz = np.flatnonzero(mark)
        del mark
        slot = np.empty(b * n, dtype=np.int32)
        slot[nz] = np.arange(len(nz), dtype=np.int32)
        sm = np.bincount(slot[flat], weights=vals, minlength=len(nz))
        del slot, flat, vals
        d = np.maximum(1.0 - sm / (2.0 - sm), 0.0).astype(np.float32)
        codes = nz + s * n  # (s + r_loc) * n + j
        d[codes // n == codes % n] = 0.0  # the diagonal: exactly 0 (s_ii = 1 up to rounding)
        ok = d < 1.0
        if keep is not None:
            ok &= keep(codes, d)
        return codes[ok], d[ok]

    parts = [block(se) for se in bounds]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _mirror_csr(codes: np.ndarray, vals: np.ndarray, n: int) -> sp.csr_matrix:
    """Full symmetric CSR (sorted indices) from upper-triangle codes i*N + j (i <= j)."""
    i, j = np.divmod(codes, n)
    off = i != j
    rows = np.concatenate([i, j[off]])
    cols = np.concatenate([j, i[off]])
    data = np.concatenate([vals, vals[off]])
    del i, j, off
    m = sp.csr_matrix((data, (rows, cols)), shape=(n, n))  # COO -> CSR: O(nnz) bucketing by row
    m.sort_indices()
    return m


def _v_matrix(
    x64: torch.Tensor, norms: np.ndarray, idx: np.ndarray, k1: int, k2: int, scale: np.ndarray | None = None,
    square: bool = False,
) -> sp.csr_matrix:
    """The (query-expanded) V matrix of SPEC §3.2 from exact neighbour lists."""
    pattern = _expanded_sets(idx, k1)
    keys = _pair_keys(x64, norms, pattern.indptr.astype(np.int64), pattern.indices.astype(np.int64))
    return _v_from_keys(pattern, keys, idx, k2, scale, square)


def _v_from_keys(
    pattern: sp.csr_matrix, keys: np.ndarray, idx: np.ndarray, k2: int, scale: np.ndarray | None = None,
    square: bool = False,
) -> sp.csr_matrix:
    """V from the expanded-set pattern and the exact keys of its entries, query-expanded."""
    n = pattern.shape[0]
    if square:
        keys = keys.astype(np.float64) ** 2
    v = _softmax_rows(pattern, keys, scale)
    k2 = min(k2, idx.shape[1])
    if k2 != 1:
        qe = sp.csr_matrix(
            (np.full(n * k2, 1.0 / k2), idx[:, :k2].ravel(), np.arange(0, n * k2 + 1, k2)), shape=(n, n)
        )
        v = (qe @ v).tocsr()
    v.sort_indices()
    return v


def jaccard_distance(
    features: Any, k1: int = 30, k2: int = 6, *, backend: str = "auto", timings: dict | None = None
) -> sp.csr_matrix:
    """k-reciprocal Jaccard distance of SPEC §3.2 as a float32 CSR matrix [N, N].

    Every pair with distance < 1 is stored (absent = 1); the diagonal zeros are explicit.
    `timings`, if given, accumulates seconds under "knn" and "jaccard".
    """
    x = _to_tensor(features)
    return _mirror_csr(*_jaccard_view(x, k1, k2, backend, timings), x.shape[0])


def _jaccard_view(
    x: torch.Tensor, k1: int, k2: int, backend: str, timings: dict | None,
    keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Upper triangle of one view's Jaccard distance (see `_jaccard_upper`). Everything of
    the view (candidates, exact keys, V) is freed on return: peak memory is one view's."""
    t0 = time.perf_counter()
    n = x.shape[0]
    length = min(k1, n)  # the released code's kNN returns k1 columns: the cap of SPEC §3.2
    half = int(np.around(k1 / 2))
    # Only the sets of the first k2, half+1 and k1+1 entries matter (capped at the list length).
    idx, table = _exact_prefix_lists(x, length, (k2, half + 1, k1 + 1), backend)
    t1 = time.perf_counter()
    pattern = _expanded_sets(idx, k1)
    rows = np.repeat(np.arange(n), np.diff(pattern.indptr))
    keys = table.get(rows, pattern.indices.astype(np.int64))  # candidates' keys are reused
    del table, rows
    v = _v_from_keys(pattern, keys, idx, k2)
    del pattern, keys, idx
    out = _jaccard_upper(v, keep)
    if timings is not None:
        timings["knn"] = timings.get("knn", 0.0) + t1 - t0
        timings["jaccard"] = timings.get("jaccard", 0.0) + time.perf_counter() - t1
    return out


def _lookup(codes: np.ndarray, vals: np.ndarray, query: np.ndarray, default: float) -> np.ndarray:
    """vals at the sorted `codes` matching `query`, `default` where absent."""
    if len(codes) == 0:
        return np.full(len(query), default, dtype=vals.dtype)
    pos = np.minimum(np.searchsorted(codes, query), len(codes) - 1)
    return np.where(codes[pos] == query, vals[pos], vals.dtype.type(default))


# --------------------------------------------------------------------- pseudo labels


def _fuse(mats: Sequence[sp.csr_matrix], weights: Sequence[float]) -> sp.csr_matrix:
    """sum_v w_v D_v with absent = 1 in each view, evaluated elementwise exactly as a dense
    float32 `w0*D0 + w1*D1 + w2*D2` would be, on the union of the stored patterns."""
    union = None
    for m in mats:
        # The stored structure (incl. explicit zeros), not the non-zero values.
        p = sp.csr_matrix((np.ones(m.nnz, np.int8), m.indices, m.indptr), shape=m.shape)
        union = p if union is None else union + p
    union = union.tocsr()
    union.sort_indices()
    pattern = sp.csr_matrix((np.full(union.nnz, -1.0), union.indices, union.indptr), shape=union.shape)
    fused = None
    for m, w in zip(mats, weights):
        m = m.tocsr()
        m.sort_indices()
        tag = sp.csr_matrix((np.arange(m.nnz, dtype=np.float64) + 2.0, m.indices, m.indptr), shape=m.shape)
        t = (pattern + tag).tocsr()  # -1 where absent, 1 + position where stored (never 0)
        t.sort_indices()
        assert t.nnz == union.nnz and np.array_equal(t.indices, union.indices)
        present = t.data > 0
        vals = np.ones(union.nnz, dtype=np.float32)
        vals[present] = m.data.astype(np.float32)[(t.data[present] - 1.0).astype(np.int64)]
        term = w * vals
        fused = term if fused is None else fused + term
    return sp.csr_matrix((fused.astype(np.float32), union.indices, union.indptr), shape=union.shape)


def _dbscan_graph(graph: sp.csr_matrix, min_samples: int, eps: float) -> np.ndarray:
    """scikit-learn's DBSCAN on a sparse precomputed graph holding exactly the pairs within
    eps, with the zero diagonal stored explicitly (so each point is its own neighbour)."""
    from sklearn.cluster import DBSCAN

    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(graph)


def _pseudo_labels_pruned(
    feats: Sequence[Any], k1: int, k2: int, weights: Sequence[float], eps: float, min_samples: int,
    backend: str, timings: dict | None,
) -> np.ndarray:
    """pseudo_labels when w0 * 1 > eps, keeping only pairs that can be DBSCAN neighbours.

    Float32 sums of non-negative terms are monotone, so fused >= w0 * d0 (evaluated as in
    the dense fusion). A pair with w0 * d0 > eps, or absent from view 0 (d0 = 1), is never
    within eps: view 0 keeps only pairs with w0 * d0 <= eps, and views 1, 2 only those pairs.
    Each view is reduced to its upper triangle before the next starts (one view's memory).
    """
    xs = [_to_tensor(f) for f in feats]
    n = xs[0].shape[0]
    w0 = weights[0]
    codes0, d0 = _jaccard_view(xs[0], k1, k2, backend, timings, keep=lambda c, d: w0 * d <= eps)

    def in_view0(c: np.ndarray, d: np.ndarray) -> np.ndarray:
        return _lookup(codes0, np.ones(len(codes0), bool), c, False)

    others = [_jaccard_view(x, k1, k2, backend, timings, keep=in_view0) for x in xs[1:]]
    t0 = time.perf_counter()
    fused = w0 * d0  # the dense evaluation order: ((w0*d0 + w1*d1) + w2*d2) in float32
    for (codes, d), w in zip(others, weights[1:]):
        fused = fused + w * _lookup(codes, d, codes0, 1.0)
    keep = fused <= eps  # sklearn's radius test is <= eps, sparse or dense
    # Every view stores its zero diagonal, so the fused diagonal is an explicit 0 (<= eps):
    # a point is its own neighbour, as with a dense matrix (SPEC §3.4).
    graph = _mirror_csr(codes0[keep], fused[keep], n)
    del codes0, d0, others, fused
    labels = _dbscan_graph(graph, min_samples, eps)
    if timings is not None:
        timings["fuse_dbscan"] = timings.get("fuse_dbscan", 0.0) + time.perf_counter() - t0
    return labels.astype(np.int64)


def pseudo_labels(
    views: Mapping[str, Any] | Sequence[Any],
    *,
    k1: int = 30,
    k2: int = 6,
    lambda1: float = 0.15,
    eps: float = 0.6,
    min_samples: int = 4,
    backend: str = "auto",
    timings: dict | None = None,
) -> np.ndarray:
    """DBSCAN labels (int64, -1 = outlier) of the fused Jaccard distance of the three views."""
    feats = [views[v] for v in VIEWS] if isinstance(views, Mapping) else list(views)
    if len(feats) != 3:
        raise ValueError(f"expected three views {VIEWS}, got {len(feats)}")
    weights = (1 - 2 * lambda1, lambda1, lambda1)
    absent = np.float32(weights[0]) + np.float32(weights[1]) + np.float32(weights[2])
    if absent <= eps:
        # Pairs absent from every view (distance 1) would be DBSCAN neighbours: not sparse.
        raise ValueError(f"eps={eps} >= fused distance of unrelated pairs ({absent}); use eps < 1")
    if weights[0] * np.ones(1, np.float32)[0] > eps:
        labels = _pseudo_labels_pruned(feats, k1, k2, weights, eps, min_samples, backend, timings)
        return labels
    mats = [jaccard_distance(f, k1, k2, backend=backend, timings=timings) for f in feats]
    t0 = time.perf_counter()
    n = mats[0].shape[0]
    parts_data, parts_idx, counts = [], [], []
    step = 2048  # row blocks bound the memory of the union / tag temporaries
    for s in range(0, n, step):
        fused = _fuse([m[s : s + step] for m in mats], weights)
        keep = fused.data <= eps  # sklearn's radius test is <= eps, sparse or dense
        rows = np.repeat(np.arange(fused.shape[0]), np.diff(fused.indptr))
        counts.append(np.bincount(rows[keep], minlength=fused.shape[0]))
        parts_data.append(fused.data[keep])
        parts_idx.append(fused.indices[keep])
    del mats, fused
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))])
    # Every view stores its zero diagonal, so the fused diagonal is an explicit 0 (<= eps):
    # a point is its own neighbour, as with a dense matrix (SPEC §3.4).
    graph = sp.csr_matrix((np.concatenate(parts_data), np.concatenate(parts_idx), indptr), shape=(n, n))
    labels = _dbscan_graph(graph, min_samples, eps)
    if timings is not None:
        timings["fuse_dbscan"] = timings.get("fuse_dbscan", 0.0) + time.perf_counter() - t0
    return labels.astype(np.int64)


def cluster_centres(labels: Any, features: Any) -> torch.Tensor:
    """L2-normalised mean feature per label 0..C-1 (float32 [C, D]); label -1 is ignored."""
    lab = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels).long().cpu()
    x = torch.as_tensor(features).detach().float().cpu()
    keep = lab >= 0
    num = int(lab.max().item()) + 1 if keep.any() else 0
    sums = torch.zeros(num, x.shape[1], dtype=torch.float64)
    sums.index_add_(0, lab[keep], x[keep].double())
    return torch.nn.functional.normalize(sums, dim=1).float()


# ------------------------------------------------------------------------ re-ranking


def rerank_distance(
    query_features: Any, gallery_features: Any, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of query-gallery distances [Q, G].

    Follows the classic `re_ranking` as called by Cluster-Contrast style evaluators with
    squared-Euclidean inputs d: original = d**2 / max_j d_ij**2 (row maximum over query and
    gallery together); the full ranking is available there, so R(i, k) looks at k+1 entries
    (no k1 cap); V = softmax of -original over the expanded set; query expansion with k2;
    final = (1 - lambda) * Jaccard + lambda * original. Ranking uses the exact keys of this
    module (ordering by d**2/max equals ordering by d).
    """
    q = _to_tensor(query_features)
    g = _to_tensor(gallery_features).to(q.device)
    x = torch.cat([q, g], dim=0)
    n, nq = x.shape[0], q.shape[0]
    length = min(k1 + 1, n)
    idx, _, rowmax, x64, norms = _exact_lists(x, length, "auto", want_far=True)
    scale = np.maximum(rowmax.astype(np.float64) ** 2, np.finfo(np.float64).tiny)
    v = _v_matrix(x64, norms, idx, k1, k2, scale=scale, square=True)
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
