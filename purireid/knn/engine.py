"""The exact nearest-neighbour engine (squared Euclidean distance): one backend choice, one key
grid, one error bound, one candidate scan.

It serves the pseudo labels' self-kNN (purireid.labels.neighbours builds its certified lists on
`CandidateScan` and `pair_keys`), the query -> gallery search (`GalleryIndex`, `exact_search`,
used by purireid.serving.search and the `purireid search` command) and `purireid doctor`, which
checks both against a dense float64 result and reports `resolve_backend`'s choice.

Exactness conventions (tests/jaccard_reference.py and tests/test_search.py use the same):

* The *key* of a pair is its squared Euclidean distance |a|^2 + |b|^2 - 2 a.b, each term a
  float64 sum of products of the float32 inputs (such products are exact in float64), clipped
  at 0 and rounded to the absolute grid of 2**-22 (`grid_key`). The grid absorbs the ~1e-16
  differences between float64 summation orders, so ties (e.g. between duplicates) are real
  ties, broken by index.
* A search is two-stage. A cheap scan (`CandidateScan`) proposes candidates by the dot product
  alone: a bfloat16 GEMM on the CPU (half the memory traffic of float32), a float32 torch GEMM
  (CPU, or CUDA without TF32), or a faiss flat L2 index (CPU, or GPU with faiss-gpu). A rigorous
  bound on that scan's rounding error gives every non-candidate a lower bound on its exact
  distance (and each candidate an interval, when asked). Candidates are re-scored exactly
  (`pair_keys`); a list is *certified* when no non-candidate can come closer than its last
  entry, and the callers search an uncertified one again more widely or against every point.
  So results are identical whatever the backend and device; only the speed differs.
* The backend `auto` is the float32 torch GEMM on a GPU; on a CPU it is whichever of bf16 /
  torch / faiss was fastest in a short timing of their scan (`calibrated_cpu_backend`, once per
  process and feature dimension): measured, never read from CPU flags.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from purireid.log import get_logger

__all__ = [
    "BACKENDS", "CPU_BACKENDS", "GRID", "Candidates", "CandidateScan", "GalleryIndex", "SearchResult",
    "as_feature_tensor", "calibrated_cpu_backend", "calibration_timings", "exact_search", "faiss_gpus",
    "grid_key", "pair_keys", "resolve_backend", "sq_norms", "true_fp32_matmul",
]

log = get_logger("knn")

BACKENDS = ("auto", "bf16", "torch", "faiss")
CPU_BACKENDS = ("bf16", "torch", "faiss")
GRID = 2.0**22  # keys are multiples of 2**-22 (exactly representable in float32 below 4)
_U32 = 2.0**-24  # float32 unit roundoff
_BF16_OUTPUT = 2.0**-8 * (1.0 + 2.0**-6)  # a bf16 output b of a float32 sum a: |a - b| <= this * |b|
_TF32 = 2 * 2.0**-11  # TF32-rounded inputs, allowed for where faiss-gpu may use them
_NORMS_ROUNDED = 1.0 + 2.0**-40  # the float64 norms in the bounds are rounded themselves
_ROW_BLOCK = 512  # rows per block of the scan GEMM (sim block + oneDNN buffers ~ 80 MB at N = 13k)
_PAIR_CHUNK = 1024  # pairs per chunk of the exact float64 re-scoring (2 x 8 MB gathered rows)
_CALIBRATION_ROWS = 2048  # points of the backend timing sample (16 MB at D = 2048)
_CALIBRATION_QUERIES = 256  # rows of the timed block (5-100 ms per backend at D = 2048)
_CALIBRATION_NEAR = 53  # candidates of the timed block: the Jaccard search at k1 = 30 (30 + 24 - 1)
_CALIBRATION_ROUNDS = 5  # timings per competitive backend (best counts)
_GALLERY_EXTRA = 32  # gallery search: candidates beyond k in the first pass
_GALLERY_WIDEN = 16  # gallery search: candidate factor of the second pass
_QUERY_CHUNK = 256  # queries per gallery-search chunk (a [256, G] score block: 100 MB in float32 at G = 100,000)
_CALIBRATION_TIMINGS: dict[int, dict[str, float]] = {}


# ----------------------------------------------------------------------------- keys


def as_feature_tensor(features: Any) -> torch.Tensor:
    """float32, contiguous, 2-D torch tensor on its own device (numpy input shares memory)."""
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D [N, D], got shape {tuple(x.shape)}")
    return x.detach().to(torch.float32).contiguous()


def sq_norms(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float64 squared norms of float32 rows (products exact in float64; numpy's einsum casts
    in small buffers, ~10x faster than a float64 copy of x and no N x D temporary)."""
    xn = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    return np.einsum("ij,ij->i", xn, xn, dtype=np.float64)


def grid_key(d64: np.ndarray) -> np.ndarray:
    """The exact distance key: a float64 distance clipped at 0 and rounded to the 2**-22 grid."""
    return np.rint(np.maximum(d64, 0.0) * GRID) / GRID


def pair_keys(a_rows: np.ndarray, a: np.ndarray, b_rows: np.ndarray, b: np.ndarray,
              a_norms: np.ndarray, b_norms: np.ndarray) -> np.ndarray:
    """float64 keys of the pairs (a_rows[a[t]], b_rows[b[t]]) (float32 features, float64 squared
    norms). The dot products are float64 sums of gathered float32 rows, in chunks on a thread
    pool: no float64 copy of the features, O(chunk) working memory."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    dots = np.empty(len(a), dtype=np.float64)

    def chunk(s: int) -> None:
        e = s + _PAIR_CHUNK
        dots[s:e] = np.einsum("ij,ij->i", a_rows[a[s:e]], b_rows[b[s:e]], dtype=np.float64)

    if len(a) <= _PAIR_CHUNK:
        chunk(0)
    else:
        # numpy releases the GIL in the gathers and einsum: threads overlap the random row reads
        # (~2.5x on 2 cores). Each chunk writes its own slice: the result does not depend on them.
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            list(pool.map(chunk, range(0, len(a), _PAIR_CHUNK)))
    return grid_key(a_norms[a] + b_norms[b] - 2.0 * dots)


@contextlib.contextmanager
def true_fp32_matmul() -> Iterator[None]:
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
    return k * _U32 / (1.0 - k * _U32)


# ------------------------------------------------------------------- backend choice


def faiss_gpus() -> int:
    """GPUs faiss can use (0 for the faiss-cpu wheel, or without faiss)."""
    try:
        import faiss
    except ImportError:
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None and hasattr(faiss, "StandardGpuResources") else 0


def resolve_backend(backend: str, device: str | torch.device, dim: int) -> str:
    """The scan backend for `dim`-dimensional features on `device`: `backend` itself unless it is
    "auto", which is the float32 GEMM on a GPU and the calibrated fastest on a CPU."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown knn backend {backend!r} (one of {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    if torch.device(device).type == "cuda":
        return "torch"
    return calibrated_cpu_backend(int(dim))


def _block_seconds(x: torch.Tensor, queries: int, n_near: int, backend: str) -> float:
    """Seconds of the dominant step of a scan: one block of `queries` rows against every row of
    `x` (GEMM + top-k), for `backend`."""
    if backend == "faiss":
        import faiss

        xn = x.numpy()
        index = faiss.IndexFlatL2(xn.shape[1])
        index.add(xn)
        t0 = time.perf_counter()
        index.search(xn[:queries], n_near + 1)
        return time.perf_counter() - t0
    xs = x.to(torch.bfloat16) if backend == "bf16" else x
    with true_fp32_matmul():
        t0 = time.perf_counter()
        torch.topk(xs[:queries] @ xs.T, n_near, dim=1, sorted=False)
        return time.perf_counter() - t0


@functools.lru_cache(maxsize=None)
def calibrated_cpu_backend(dim: int) -> str:
    """The fastest CPU scan for `dim`-dimensional features on this machine.

    At the sizes that matter (N in the tens of thousands) a search is dominated by its blocks
    of rows against all N points (GEMM + top-k, O(N^2 D)); the bounds and exact re-scoring are
    O(N k D). So each backend times one block of _CALIBRATION_QUERIES rows against a fixed
    sample of _CALIBRATION_ROWS points; the first timing (oneDNN JIT, OpenMP start) only
    rules out backends over 3x slower than the best, the others are timed _CALIBRATION_ROUNDS
    more times, interleaved, and their best time counts (~0.3 s in all at D = 2048 on a
    2-core machine). Cached for the process; the timings stay readable through
    `calibration_timings`. A bf16 GEMM wins where the CPU has bf16 matrix or dot-product
    units, faiss or fp32 torch elsewhere: measured, not read from CPU flags. The choice only
    affects speed: every backend gives identical results.
    """
    # GEMM and top-k timings do not depend on the values: uniform numbers are cheapest to draw.
    x = torch.from_numpy(np.random.default_rng(0).random((_CALIBRATION_ROWS, dim), dtype=np.float32) - 0.5)
    queries = min(_CALIBRATION_QUERIES, _CALIBRATION_ROWS)
    n_near = min(_CALIBRATION_ROWS - 1, _CALIBRATION_NEAR)
    best = {name: _block_seconds(x, queries, n_near, name) for name in CPU_BACKENDS}  # incl. warm-up
    for _ in range(_CALIBRATION_ROUNDS):  # interleaved, best of several: robust to load spikes
        for name in [k for k, v in best.items() if v <= 3.0 * min(best.values())]:
            best[name] = min(best[name], _block_seconds(x, queries, n_near, name))
    winner = min(CPU_BACKENDS, key=lambda name: best[name])
    _CALIBRATION_TIMINGS[dim] = dict(best)
    log.debug("knn backend calibration (D=%d, %d x %d block): %s -> %s", dim, queries, _CALIBRATION_ROWS,
              ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items()), winner)
    return winner


def calibration_timings(dim: int) -> dict[str, float]:
    """Seconds per timed block of each CPU backend (best of the rounds), calibrating if need be."""
    calibrated_cpu_backend(int(dim))
    return dict(_CALIBRATION_TIMINGS.get(int(dim), {}))


# ------------------------------------------------------------------ candidate scan


@dataclass
class Candidates:
    """A scan's candidates per query row, with certified bounds.

    near [Q, C]: candidate indices (a row of the points themselves excludes itself); lower [Q]:
    every non-candidate's exact float64 distance is >= lower; near_lo / near_hi [Q, C]: an
    interval of each candidate's exact float64 distance (when asked for); far [Q, F] / upper
    [Q]: candidates for the farthest point, every non-candidate's distance <= upper (when asked
    for)."""

    near: np.ndarray
    lower: np.ndarray
    near_lo: np.ndarray | None = None
    near_hi: np.ndarray | None = None
    far: np.ndarray | None = None
    upper: np.ndarray | None = None


def _bf16_parts(x: torch.Tensor, xs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row: |x - bf16(x)| and |bf16(x)| in float64 (in blocks: no N x D float64 temporary)."""
    n = len(x)
    resid, low_norm = np.empty(n), np.empty(n)
    for s in range(0, n, _ROW_BLOCK):
        xb = x[s:s + _ROW_BLOCK].cpu().numpy()
        xsb = xs[s:s + _ROW_BLOCK].float().cpu().numpy()
        eb = xb - xsb  # exact (Sterbenz)
        resid[s:s + _ROW_BLOCK] = np.sqrt(np.einsum("ij,ij->i", eb, eb, dtype=np.float64))
        low_norm[s:s + _ROW_BLOCK] = np.sqrt(np.einsum("ij,ij->i", xsb, xsb, dtype=np.float64))
    return resid, low_norm


class CandidateScan:
    """The cheap first stage over a fixed set of N points (a gallery, or the points of a self-kNN).

    `base`: float32 [N, D] on the CPU or a GPU; `backend`: a resolved one (`resolve_backend`);
    bf16 on a GPU scans in float32 (cuBLAS may reduce bf16 products in reduced precision), and
    faiss on a GPU uses faiss-gpu when it sees GPUs, else the CPU index.
    """

    def __init__(self, base: torch.Tensor, backend: str, norms: np.ndarray | None = None) -> None:
        if backend not in CPU_BACKENDS:
            raise ValueError(f"a scan needs a resolved backend ({', '.join(CPU_BACKENDS)}), got {backend!r}")
        self.base = base
        self.n, self.dim = int(base.shape[0]), int(base.shape[1])
        self.on_gpu = base.device.type == "cuda"
        self.backend = "torch" if backend == "bf16" and self.on_gpu else backend
        self.norms = sq_norms(base) if norms is None else norms
        self.gamma = _gamma(self.dim)
        self.norm_min = float(self.norms.min()) if self.n else 0.0
        self.norm_max = float(self.norms.max()) if self.n else 0.0
        self.length_max = float(np.sqrt(self.norm_max))
        if self.backend == "bf16":
            self.low = base.to(torch.bfloat16)
            self.resid, self.low_norm = _bf16_parts(base, self.low)
            self.resid_max = float(self.resid.max()) if self.n else 0.0
            self.low_norm_max = float(self.low_norm.max()) if self.n else 0.0
        elif self.backend == "faiss":
            self._faiss_index()

    def _faiss_index(self) -> None:
        import faiss

        self.base_np = np.ascontiguousarray(self.base.detach().cpu().numpy(), dtype=np.float32)
        index = faiss.IndexFlatL2(self.dim)
        self.faiss_gpu = self.on_gpu and faiss_gpus() > 0
        if self.faiss_gpu:
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, self.base.device.index or 0, index)
        index.add(self.base_np)
        self.index = index

    def scan(self, n: int, query: torch.Tensor | None = None, *, query_norms: np.ndarray | None = None,
             n_far: int = 0, intervals: bool = False) -> Candidates:
        """Up to `n` candidates of every query row (`query` None: every point, itself excluded),
        with the bounds of `Candidates`; `n_far` farthest-point candidates when asked for."""
        own = query is None
        n = max(0, min(int(n), self.n - 1 if own else self.n))
        if own:
            query_norms = self.norms
        elif query_norms is None:
            query_norms = sq_norms(query)
        if self.backend == "faiss" and not n_far:
            return self._scan_faiss(query, query_norms, n, intervals)
        return self._scan_gemm(query, query_norms, n, n_far, intervals)

    def _scan_gemm(self, query: torch.Tensor | None, query_norms: np.ndarray, n: int, n_far: int,
                   intervals: bool) -> Candidates:
        """Blocked GEMM + top-k by the dot product (bf16 on the CPU if chosen, else fp32 without TF32)."""
        own = query is None
        use_bf16 = self.backend == "bf16"
        table = self.low if use_bf16 else self.base
        if own:
            rows, m = table, self.n
            if use_bf16:
                q_resid, q_low_norm = self.resid, self.low_norm
        else:
            q = query.to(self.base.device, torch.float32)
            rows = q.to(torch.bfloat16) if use_bf16 else q
            m = len(q)
            if use_bf16:
                q_resid, q_low_norm = _bf16_parts(q, rows)
        near_idx = np.empty((m, n), dtype=np.int64)
        near_val = np.empty((m, n), dtype=np.float32)  # the cheap dot products (for the bounds)
        far_idx = np.empty((m, n_far), dtype=np.int64) if n_far else None
        far_thr = np.empty(m, dtype=np.float64) if n_far else None
        with true_fp32_matmul():
            for s in range(0, m, _ROW_BLOCK):
                e = min(m, s + _ROW_BLOCK)
                # One query: a matrix-vector product ([N, D] x [D]), much faster than a [1, D] x [D, N] GEMM.
                sim = torch.mv(table, rows[s])[None] if e - s == 1 and not own else rows[s:e] @ table.T
                if n_far:
                    v, i = torch.topk(sim, n_far, dim=1, largest=False, sorted=False)
                    far_idx[s:e] = i.cpu().numpy()
                    far_thr[s:e] = v.max(dim=1).values.double().cpu().numpy()
                if own:
                    torch.diagonal(sim, offset=s).fill_(float("-inf"))  # self is added by the caller
                v, i = torch.topk(sim, n, dim=1, largest=True, sorted=False)
                near_idx[s:e] = i.cpu().numpy()
                near_val[s:e] = v.float().cpu().numpy()
                del sim, v, i
        # err[i] bounds |exact dot - scanned dot| before the output rounding (out_round |dot|).
        if use_bf16:
            # |x.y - xs.ys| <= |xs||y - ys| + |x - xs||ys| + |x - xs||y - ys|, plus the fp32 accumulation.
            err = (q_low_norm * self.resid_max + q_resid * self.low_norm_max + q_resid * self.resid_max
                   + self.gamma * q_low_norm * self.low_norm_max) * _NORMS_ROUNDED
            out_round = _BF16_OUTPUT
        else:
            err = self.gamma * np.sqrt(query_norms) * self.length_max
            out_round = 0.0
        err = err + 1e-12
        thr = near_val.min(axis=1).astype(np.float64) if n else np.full(m, np.inf)
        # Non-candidate j: scanned dot <= thr, so its fp32 sum <= thr + out_round|thr| and its exact
        # dot <= that + err_i; d = |q_i|^2 + |x_j|^2 - 2 dot >= |q_i|^2 + min|x|^2 - 2(...).
        lower = query_norms + self.norm_min - 2.0 * (thr + out_round * np.abs(thr) + err)
        upper = None
        if n_far:
            upper = query_norms + self.norm_max - 2.0 * (far_thr - out_round * np.abs(far_thr) - err)
        near_lo = near_hi = None
        if intervals:  # per candidate: the same bound, with the candidate's own norms where they help
            nv = near_val.astype(np.float64)
            if use_bf16:
                sj, rj = self.low_norm[near_idx], self.resid[near_idx]
                pair_err = (q_low_norm[:, None] * rj + q_resid[:, None] * sj + q_resid[:, None] * rj
                            + self.gamma * q_low_norm[:, None] * sj)
                slack = out_round * np.abs(nv) + pair_err * _NORMS_ROUNDED + 1e-12
                del sj, rj, pair_err
            else:
                slack = out_round * np.abs(nv) + err[:, None]
            base = query_norms[:, None] + self.norms[near_idx]
            near_lo, near_hi = base - 2.0 * (nv + slack), base - 2.0 * (nv - slack)
        return Candidates(near_idx, lower, near_lo, near_hi, far_idx, upper)

    def _scan_faiss(self, query: torch.Tensor | None, query_norms: np.ndarray, n: int,
                    intervals: bool) -> Candidates:
        """Candidates from the faiss flat L2 index (an fp32 GEMM inside)."""
        own = query is None
        q = self.base_np if own else np.ascontiguousarray(query.detach().cpu().numpy(), dtype=np.float32)
        dist, idx = self.index.search(q, n + 1 if own else n)
        if own:
            is_self = idx == np.arange(len(q))[:, None]
            # Stable: keep the first n non-self columns (drop self, or the last when self is absent).
            order = np.argsort(is_self, axis=1, kind="stable")[:, :n]
            near_idx = np.take_along_axis(idx, order, axis=1).astype(np.int64)
            near_d = np.take_along_axis(dist, order, axis=1).astype(np.float64)
        else:
            near_idx, near_d = idx.astype(np.int64), dist.astype(np.float64)
        thr = dist[:, -1].astype(np.float64)  # every point not returned has a scanned distance >= this
        q_length = np.sqrt(query_norms)
        # faiss: |q|^2 + |x|^2 - 2 q.x in fp32 (TF32-rounded inputs allowed for on a GPU, where
        # faiss may use them); bound the GEMM and the three-term sum generously.
        tf32 = _TF32 if self.faiss_gpu else 0.0
        err = (2.0 * (self.gamma + tf32) * q_length * self.length_max
               + 8 * _U32 * (query_norms + self.norm_max + 2 * q_length * self.length_max)) + 1e-12
        near_lo = near_d - err[:, None] if intervals else None
        near_hi = near_d + err[:, None] if intervals else None
        return Candidates(near_idx, thr - err, near_lo, near_hi)


# ------------------------------------------------------------------ query -> gallery


@dataclass
class SearchResult:
    """indices int64 [Q, k] (best first; -1 pads when the gallery has fewer than k items),
    distances float64 [Q, k] (exact keys), and how many queries needed the wider / full pass."""

    indices: np.ndarray
    distances: np.ndarray
    widened: int = 0
    full: int = 0


def _as_features(x: Any, what: str) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if a.ndim != 2:
        raise ValueError(f"{what} features must be 2-D, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} features must be finite (NaN or inf found)")
    return a


class GalleryIndex:
    """A gallery prepared once (norms; the bf16 copy or the faiss index) for many exact searches.

    A query's k nearest gallery items come from a scan of k + 32 candidates; a list the bounds
    cannot certify is scanned again with 16x the candidates, then, if need be, compared with
    every gallery item exactly.
    """

    def __init__(self, gallery: Any, *, backend: str = "auto", device: str | torch.device = "cpu") -> None:
        self.gallery = _as_features(gallery, "gallery")
        self.device = torch.device(device)
        if backend == "bf16" and self.device.type != "cpu":
            raise ValueError("the bf16 search backend runs on the CPU; use --backend torch or faiss on a GPU")
        self.backend = resolve_backend(backend, self.device, self.gallery.shape[1])
        if self.backend == "faiss" and self.device.type == "cuda" and faiss_gpus() == 0:
            raise ValueError("--backend faiss on a GPU needs the faiss-gpu wheel (this faiss has no GPU "
                             "support); use --backend torch, or see `purireid doctor`")
        self.norms = sq_norms(self.gallery)
        self._scan = (CandidateScan(torch.from_numpy(self.gallery).to(self.device), self.backend, self.norms)
                      if len(self.gallery) else None)

    def _rank(self, q: np.ndarray, q_norms: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best candidates per row by (exact key, index)."""
        rows = np.repeat(np.arange(len(q)), cand.shape[1])
        keys = pair_keys(q, rows, self.gallery, cand.ravel(), q_norms, self.norms).reshape(cand.shape)
        order = np.lexsort((cand, keys), axis=1)[:, :k]
        return np.take_along_axis(cand, order, axis=1), np.take_along_axis(keys, order, axis=1)

    def search(self, query: Any, k: int) -> SearchResult:
        """The k nearest gallery items of every query (squared Euclidean, ties by index), exactly."""
        q, g = _as_features(query, "query"), self.gallery
        if q.shape[1] != g.shape[1]:
            raise ValueError(f"features must be [Q, D] and [G, D], got {q.shape} and {g.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kk = min(k, len(g))
        out_idx = np.full((len(q), k), -1, dtype=np.int64)
        out_d = np.full((len(q), k), np.inf)
        if kk == 0 or len(q) == 0:
            return SearchResult(out_idx, out_d)
        q_norms = sq_norms(q)
        widened = full = 0
        for s in range(0, len(q), _QUERY_CHUNK):
            qc, qc_norms = q[s:s + _QUERY_CHUNK], q_norms[s:s + _QUERY_CHUNK]
            rows = np.arange(len(qc))
            for n in (kk + _GALLERY_EXTRA, _GALLERY_WIDEN * (kk + _GALLERY_EXTRA)):
                cand = self._scan.scan(n, torch.from_numpy(qc[rows]), query_norms=qc_norms[rows])
                idx, keys = self._rank(qc[rows], qc_norms[rows], cand.near, kk)
                out_idx[s + rows, :kk], out_d[s + rows, :kk] = idx, keys
                # Certified: no non-candidate can reach the k-th key (one grid step of margin for
                # the rounding of the key itself), or every gallery item was a candidate.
                ok = (keys[:, -1] < cand.lower - 2.0 / GRID) | (cand.near.shape[1] >= len(g))
                rows = rows[~ok]
                if not len(rows):
                    break
                if n == kk + _GALLERY_EXTRA:
                    widened += len(rows)
            if len(rows):  # still undecided: every gallery item, exactly
                full += len(rows)
                every = np.arange(len(g))[None, :]
                for r in rows:
                    idx, keys = self._rank(qc[r:r + 1], qc_norms[r:r + 1], every, kk)
                    out_idx[s + r, :kk], out_d[s + r, :kk] = idx[0], keys[0]
        return SearchResult(out_idx, out_d, widened=widened, full=full)


def exact_search(query: Any, gallery: Any, k: int, *, backend: str = "auto",
                 device: str | torch.device = "cpu") -> SearchResult:
    """The k nearest gallery items of every query (squared Euclidean, ties by index), exactly."""
    return GalleryIndex(gallery, backend=backend, device=device).search(query, k)
