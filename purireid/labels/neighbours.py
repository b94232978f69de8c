"""Certified exact nearest-neighbour lists (squared Euclidean) and their candidate-search backends.

Pure functions on in-memory arrays; the k-reciprocal Jaccard distance (purireid.labels.jaccard) and
the pseudo labels (purireid.labels.cluster) are built on `exact_lists` and `prefix_exact_lists`, and
`knn` is the public entry point. Exactness conventions (tests/jaccard_reference.py uses the same):

* The distance of a pair is the squared Euclidean distance of the float32 inputs, evaluated in
  float64 (products of float32 values are exact there) and rounded to a fixed absolute grid of
  2**-22, negative values clipped to 0: the *key*. The grid absorbs the ~1e-16 differences
  between float64 summation orders, so ties (e.g. between duplicate points) are real ties and
  are broken deterministically.
* A neighbour list is the point itself first, then the others by (key, index).
* The search is two-stage: a cheap GEMM (bfloat16 or float32 torch on CPU, float32 on CUDA, or a
  faiss flat index) proposes candidates; a rigorous bound on that GEMM's rounding error gives
  every candidate an interval for its key and every non-candidate a lower bound. Only pairs the
  intervals leave undecided are re-scored exactly, and a row whose list the bounds cannot
  certify is recomputed against all points. Results are identical whatever the backend.
* `prefix_exact_lists` certifies less: only the *sets* of the first p entries for a few prefix
  lengths p, which is all the Jaccard distance needs (~16 of 53 candidates re-scored per row).
* The backend `auto` is CUDA's float32 GEMM when a GPU is present; on CPU it is whichever of
  bf16 / torch / faiss was fastest in a short timing of their candidate search, run once per
  process and feature dimension (`calibrated_cpu_backend`): no CPU flag decides.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from purireid.log import get_logger

__all__ = [
    "BACKENDS", "NeighbourLists", "ExactKeys", "as_feature_tensor", "resolve_backend", "calibrated_cpu_backend",
    "exact_lists", "prefix_exact_lists", "offset_lists", "knn",
]

log = get_logger("neighbours")

BACKENDS = ("auto", "bf16", "torch", "faiss")
_CPU_BACKENDS = ("bf16", "torch", "faiss")
_GRID = 2.0**22  # keys are multiples of 2**-22 (exactly representable in float32 below 4)
_EXTRA_CANDIDATES = 24  # over-fetch beyond the list length in the cheap candidate search
_FAR_CANDIDATES = 8  # candidates for the farthest point (re-ranking's row maximum)
_ROW_BLOCK = 512  # rows per block of the candidate GEMM (sim block + oneDNN buffers ~ 80 MB at N = 13k)
_PAIR_CHUNK = 1024  # pairs per chunk of the exact float64 re-scoring (2 x 8 MB gathered rows)
_CALIBRATION_ROWS = 2048  # points of the backend timing sample (16 MB at D = 2048)
_CALIBRATION_QUERIES = 256  # rows of the timed block (5-100 ms per backend at D = 2048)
_CALIBRATION_ROUNDS = 5  # timings per competitive backend (best counts)


# ----------------------------------------------------------------------------- helpers


def as_feature_tensor(features: Any) -> torch.Tensor:
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


@contextlib.contextmanager
def _true_fp32_matmul() -> Iterator[None]:
    """The error bounds assume true fp32 (or bf16) products: no TF32 on CUDA and no implicit
    bf16 for fp32 on CPU, whatever the caller chose (torch.set_float32_matmul_precision or the
    per-backend fp32_precision of newer torch); the caller's setting is restored."""
    backends = [b for b in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul) if hasattr(b, "fp32_precision")]
    if backends:
        saved = [b.fp32_precision for b in backends]
        for b in backends:
            b.fp32_precision = "ieee"
        try:
            yield
        finally:
            for b, value in zip(backends, saved):
                b.fp32_precision = value
    else:  # older torch: one global setting
        saved_precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(saved_precision)


def _gamma(k: int) -> float:
    """Worst-case relative error of a float32 sum of k products (Higham's gamma_k)."""
    u = 2.0**-24
    return k * u / (1.0 - k * u)


# ------------------------------------------------------------------- backend choice


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The candidate-search backend to use for `x`: `backend` itself unless it is "auto"."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown knn backend {backend!r} (one of {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    if x.is_cuda or torch.cuda.is_available():
        return "torch"  # fp32 GEMM on the GPU (moved there by the callers)
    return calibrated_cpu_backend(int(x.shape[1]))


def _block_seconds(x: torch.Tensor, queries: int, n_near: int, backend: str) -> float:
    """Seconds of the dominant step of a candidate search: one block of `queries` rows
    against every row of `x` (GEMM + top-k), for `backend`."""
    if backend == "faiss":
        import faiss

        xn = x.numpy()
        index = faiss.IndexFlatL2(xn.shape[1])
        index.add(xn)
        t0 = time.perf_counter()
        index.search(xn[:queries], n_near + 1)
        return time.perf_counter() - t0
    xs = x.to(torch.bfloat16) if backend == "bf16" else x
    with _true_fp32_matmul():
        t0 = time.perf_counter()
        torch.topk(xs[:queries] @ xs.T, n_near, dim=1, sorted=False)
        return time.perf_counter() - t0


@functools.lru_cache(maxsize=None)
def calibrated_cpu_backend(dim: int) -> str:
    """The fastest CPU candidate search for `dim`-dimensional features on this machine.

    At the sizes that matter (N in the tens of thousands) a search is dominated by its blocks
    of rows against all N points (GEMM + top-k, O(N^2 D)); the bounds and exact re-scoring are
    O(N k D). So each backend times one block of _CALIBRATION_QUERIES rows against a fixed
    sample of _CALIBRATION_ROWS points; the first timing (oneDNN JIT, OpenMP start) only
    rules out backends over 3x slower than the best, the others are timed _CALIBRATION_ROUNDS
    more times, interleaved, and their best time counts (~0.3 s in all at D = 2048 on a
    2-core machine). Cached for the process.
    A bf16 GEMM wins where the CPU has bf16 matrix or dot-product units, faiss or fp32 torch
    elsewhere: measured, not read from CPU flags. The choice only affects speed: every
    backend gives identical results.
    """
    # GEMM and top-k timings do not depend on the values: uniform numbers are cheapest to draw.
    x = torch.from_numpy(np.random.default_rng(0).random((_CALIBRATION_ROWS, dim), dtype=np.float32) - 0.5)
    queries = min(_CALIBRATION_QUERIES, _CALIBRATION_ROWS)
    n_near = min(_CALIBRATION_ROWS, 30 + _EXTRA_CANDIDATES) - 1  # the Jaccard search at k1 = 30
    best = {name: _block_seconds(x, queries, n_near, name) for name in _CPU_BACKENDS}  # incl. warm-up
    for _ in range(_CALIBRATION_ROUNDS):  # interleaved, best of several: robust to load spikes
        for name in [k for k, v in best.items() if v <= 3.0 * min(best.values())]:
            best[name] = min(best[name], _block_seconds(x, queries, n_near, name))
    winner = min(_CPU_BACKENDS, key=lambda name: best[name])
    log.debug("knn backend calibration (D=%d, %d x %d block): %s -> %s", dim, queries, _CALIBRATION_ROWS,
              ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items()), winner)
    return winner


# ------------------------------------------------------------------ candidate search


@dataclass
class _Candidates:
    """Cheap-GEMM candidates of every row, self excluded, with certified bounds.

    near [N, C] candidate indices; lower [N]: every non-candidate's key is >= lower;
    near_lo / near_hi [N, C]: interval of each candidate's exact float64 distance;
    far [N, F] / upper [N]: candidates for the farthest point, every non-candidate's
    distance <= upper (only when asked for)."""

    near: np.ndarray
    lower: np.ndarray
    near_lo: np.ndarray
    near_hi: np.ndarray
    far: np.ndarray | None = None
    upper: np.ndarray | None = None


def _candidates(x: torch.Tensor, norms: np.ndarray, n_near: int, n_far: int, backend: str) -> _Candidates:
    if backend == "faiss" and not n_far:
        return _candidates_faiss(x, n_near)
    return _candidates_torch(x, norms, n_near, n_far, use_bf16=(backend == "bf16"))


def _candidates_torch(x: torch.Tensor, norms: np.ndarray, n_near: int, n_far: int, use_bf16: bool) -> _Candidates:
    """Blocked GEMM + top-k (bf16 on CPU if asked, else fp32 without TF32)."""
    n, dim = x.shape
    if x.device.type == "cuda":
        use_bf16 = False  # cuBLAS may reduce bf16 in reduced precision: keep fp32, no TF32
    if use_bf16:
        xs = x.to(torch.bfloat16)
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
        out_round = 2.0**-8 * (1.0 + 2.0**-6)  # bf16 output: half-ulp <= 2**-8 |v|, with margin
    else:
        xs = x
        err = _gamma(dim) * np.sqrt(norms) * np.sqrt(norms.max())
        out_round = 0.0
    near_idx = np.empty((n, n_near), dtype=np.int64)
    near_val = np.empty((n, n_near), dtype=np.float32)  # the cheap dot products (for the bounds)
    far_idx = np.empty((n, n_far), dtype=np.int64) if n_far else None
    far_thr = np.empty(n, dtype=np.float64) if n_far else None
    with _true_fp32_matmul():
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
    err = err + 1e-12
    near_thr = near_val.min(axis=1).astype(np.float64) if n_near else np.full(n, np.inf)
    # Non-candidate j: approx <= thr, so its fp32 accumulated value <= thr + out_round|thr| and
    # its exact dot <= that + err_i; d = n_i + n_j - 2 dot >= n_i + min n - 2(...).
    lower = norms + norms.min() - 2.0 * (near_thr + out_round * np.abs(near_thr) + err)
    upper = None
    if n_far:
        upper = norms + norms.max() - 2.0 * (far_thr - out_round * np.abs(far_thr) - err)
    # Per-candidate interval of the exact float64 distance (the same bound, per pair).
    nv = near_val.astype(np.float64)
    if use_bf16:  # with the candidate's own norms instead of the maxima (tighter)
        sj, rj = sn[near_idx], resid[near_idx]
        pair_err = sn[:, None] * rj + resid[:, None] * sj + resid[:, None] * rj + _gamma(dim) * sn[:, None] * sj
        slack = out_round * np.abs(nv) + pair_err * (1.0 + 2.0**-40) + 1e-12
        del sj, rj, pair_err
    else:
        slack = out_round * np.abs(nv) + err[:, None]
    base = norms[:, None] + norms[near_idx]
    return _Candidates(near_idx, lower, base - 2.0 * (nv + slack), base - 2.0 * (nv - slack), far_idx, upper)


def _candidates_faiss(x: torch.Tensor, n_near: int) -> _Candidates:
    """Near candidates from a faiss flat L2 index (fp32 GEMM inside)."""
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
    norms = _sq_norms(x)
    xnorm = np.sqrt(norms)
    # faiss: |x|^2 + |y|^2 - 2 x.y in fp32; bound the GEMM and the three-term sum generously.
    err = 2.0 * _gamma(dim) * xnorm * xnorm.max() + 8 * 2.0**-24 * (norms + norms.max() + 2 * xnorm * xnorm.max())
    err = err + 1e-12
    return _Candidates(near_idx, thr - err, near_d - err[:, None], near_d + err[:, None])


# ----------------------------------------------------------------------- exact keys


class ExactKeys:
    """Exact keys of pairs of rows of one feature matrix, computed on demand and cached by
    unordered pair (each pair is evaluated at most once; key(i, j) == key(j, i) bit for bit).

    A key is a float64 dot product of gathered float32 rows, taken in small chunks on a
    thread pool: no float64 copy of the features, O(chunk) working memory."""

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
        dots = np.empty(len(codes), dtype=np.float64)
        xn = self.features

        def chunk(s: int) -> None:
            e = s + _PAIR_CHUNK
            dots[s:e] = np.einsum("ij,ij->i", xn[a[s:e]], xn[b[s:e]], dtype=np.float64)

        # numpy releases the GIL in the gathers and einsum: threads overlap the random row reads
        # (~2.5x on 2 cores). Each chunk writes its own slice: the result does not depend on them.
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            list(pool.map(chunk, range(0, len(codes), _PAIR_CHUNK)))
        return _grid_key(self.norms[a] + self.norms[b] - 2.0 * dots)


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


def _prepare(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, str, np.ndarray, ExactKeys]:
    backend = resolve_backend(backend, x)
    if backend == "torch" and not x.is_cuda and torch.cuda.is_available():
        x = x.cuda()
    norms = _sq_norms(x)
    return x, backend, norms, ExactKeys(x.cpu().numpy(), norms)


def exact_lists(x: torch.Tensor, length: int, *, backend: str = "auto", want_row_max: bool = False) -> NeighbourLists:
    """Exact neighbour lists of `length` entries (self first, then by (key, index)) with their
    keys, and optionally each row's exact maximum key (the farthest point)."""
    n = x.shape[0]
    x, backend, norms, table = _prepare(x, backend)
    n_near = min(n - 1, length - 1 + _EXTRA_CANDIDATES)
    n_far = min(n, _FAR_CANDIDATES) if want_row_max else 0
    cand = _candidates(x, norms, n_near, n_far, backend)
    lower = np.full(n, np.inf) if n_near == n - 1 else cand.lower  # all points are candidates
    allc = np.concatenate([np.arange(n, dtype=np.int64)[:, None], cand.near], axis=1)
    keys = table.get(np.repeat(np.arange(n), allc.shape[1]), allc.ravel()).reshape(allc.shape)
    keys[:, 0] = -1.0
    idx, lkeys = _sort_lists(allc, keys, length)
    # Certified iff the last kept key is strictly below every non-candidate's possible key
    # (one grid step of margin for the rounding of the key itself).
    bad = lkeys[:, -1].astype(np.float64) >= lower - 2.0 / _GRID
    row_max = None
    if want_row_max:
        upper = np.full(n, -np.inf) if n_far == n else cand.upper
        fkeys = table.get(np.repeat(np.arange(n), n_far), cand.far.ravel()).reshape(n, n_far)
        row_max = np.maximum(fkeys.max(axis=1), 0.0).astype(np.float32)  # self (0) is always a point
        bad |= row_max.astype(np.float64) <= upper + 2.0 / _GRID
    bad_rows = np.flatnonzero(bad)
    for rows, ridx, rkeys, rmax in _recompute_rows(x, norms, bad_rows, length):
        idx[rows], lkeys[rows] = ridx, rkeys
        if row_max is not None:
            row_max[rows] = rmax
    lkeys[:, 0] = 0.0
    log.debug("exact_lists: N=%d length=%d backend=%s uncertified rows %d, exact keys %d",
              n, length, backend, len(bad_rows), len(table))
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
    x, backend, norms, table = _prepare(x, backend)
    n_near = min(n - 1, length - 1 + _EXTRA_CANDIDATES)
    cand = _candidates(x, norms, n_near, 0, backend)
    near = cand.near
    lower = np.full(n, np.inf) if n_near == n - 1 else cand.lower  # all points are candidates
    # Key = rint(d * G) / G, so |key - d| <= 1/(2G): widen by one grid step.
    klo, khi = np.maximum(cand.near_lo, 0.0) - 1.0 / _GRID, cand.near_hi + 1.0 / _GRID
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
    bad = missing.any(axis=1) | (bound >= lower - 2.0 / _GRID)  # `missing` is empty by construction
    order = np.lexsort((near, tier), axis=1)[:, : length - 1]
    idx = np.concatenate([np.arange(n, dtype=np.int64)[:, None], np.take_along_axis(near, order, 1)], axis=1)
    bad_rows = np.flatnonzero(bad)
    for rows, ridx, _, _ in _recompute_rows(x, norms, bad_rows, length):
        idx[rows] = ridx
    log.debug("prefix_exact_lists: N=%d length=%d backend=%s uncertified rows %d, re-scored pairs %d",
              n, length, backend, len(bad_rows), len(table))
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
    x, backend, norms, table = _prepare(x, backend)
    n_near = min(n - 1, 4 * (length - 1) + _EXTRA_CANDIDATES)
    cand = _candidates(x, norms, n_near, 0, backend)
    lower = np.full(n, np.inf) if n_near == n - 1 else cand.lower  # all points are candidates
    allc = np.concatenate([np.arange(n, dtype=np.int64)[:, None], cand.near], axis=1)
    rows = np.repeat(np.arange(n), allc.shape[1])
    keys = (table.get(rows, allc.ravel()) + shift.of(rows, allc.ravel())).reshape(allc.shape)
    del cand, rows
    keys[:, 0] = -1.0
    idx, lkeys = _sort_lists(allc, keys, length)
    bad_rows = np.flatnonzero(lkeys[:, -1].astype(np.float64) >= lower - 2.0 / _GRID)
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
