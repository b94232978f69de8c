"""Gallery search: exact k nearest gallery images of each query, ranked lists as JSON and HTML.

`exact_search` returns, for every query, the k gallery items of smallest squared Euclidean
distance, ties broken by gallery index, with the exactness convention of purireid.labels.neighbours:
a distance is the float64 value of the float32 features rounded to a 2**-22 grid (the "key").
It is two-stage, whatever the backend:

1. a cheap scan proposes candidates: a bf16 GEMM on CPUs with bf16 dot-product units (half the
   memory traffic of float32: one query over 100,000 2048-d images is a memory-bound scan), a
   faiss flat L2 index (CPU, or GPU where faiss has GPUs), or a float32 torch GEMM (CPU or CUDA,
   TF32 off). The GEMM backends rank by the dot product alone, which for L2-normalised features
   orders like the distance up to ~1e-7 (other features stay exact, only slower). Each backend
   also gives a rigorous bound on its rounding error;
2. the candidates are re-scored exactly, and a query's list is *certified* when the bound proves
   that no other gallery item can come closer than its k-th. An uncertified query is searched
   again with 16x the candidates, then, if need be, against the whole gallery exactly.
So results are identical for every backend and device; only the speed differs.

With identities known (Market-style file names, `0002_c1s1_000451_03.jpg`) the metrics are
purireid.evaluation.metrics's, under the evaluate stage's protocol (docs/method.md).
"""

from __future__ import annotations

import functools
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["BACKENDS", "GalleryIndex", "SearchResult", "exact_search", "market_identities", "protocol_metrics",
           "ranked_lists", "rerank_search", "write_ranked_html", "write_ranked_json"]

BACKENDS = ("auto", "bf16", "faiss", "torch")
_GRID = 2.0**22  # key grid of purireid.labels.neighbours
_U32 = 2.0**-24  # float32 unit roundoff
_EXTRA = 32  # candidates beyond k in the first pass
_WIDEN = 16  # candidate factor of the second pass
_QUERY_CHUNK = 256  # queries per GEMM block (a [256, G] score block: 100 MB in float32 at G = 100,000)


@dataclass
class SearchResult:
    """indices int64 [Q, k] (best first; -1 pads when the gallery has fewer than k items),
    distances float64 [Q, k] (exact keys), and how many queries needed the wider / full pass."""

    indices: np.ndarray
    distances: np.ndarray
    widened: int = 0
    full: int = 0


# --------------------------------------------------------------------------- backend choice


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_dot() -> bool:
    """bf16 dot-product or matrix units (AVX512-BF16, AMX): a bf16 scan then costs half a float32 one."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def faiss_gpus() -> int:
    """GPUs faiss can use (0 for the faiss-cpu wheel)."""
    try:
        import faiss
    except ImportError:
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None and hasattr(faiss, "StandardGpuResources") else 0


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "bf16" and device.type != "cpu":
        raise ValueError("the bf16 search backend runs on the CPU; use --backend torch or faiss on a GPU")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "torch"
    return "bf16" if cpu_has_bf16_dot() else "faiss"


# --------------------------------------------------------------------------- exact search


def _keys(d64: np.ndarray) -> np.ndarray:
    return np.rint(np.maximum(d64, 0.0) * _GRID) / _GRID


def _exact_sq_dist(q: np.ndarray, g: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Float64 squared distances |q_i|^2 + |g_j|^2 - 2 q_i.g_j for j = idx[i, :] (products of
    float32 values are exact in float64), in blocks of about 4M gathered values."""
    q64 = q.astype(np.float64)
    qq = np.einsum("ij,ij->i", q64, q64)
    out = np.empty(idx.shape, dtype=np.float64)
    cols = max(1, min(idx.shape[1], (1 << 22) // max(1, q.shape[1])))
    rows = max(1, (1 << 22) // (cols * max(1, q.shape[1])))
    for s in range(0, len(idx), rows):
        for c in range(0, idx.shape[1], cols):
            block = g[idx[s:s + rows, c:c + cols]].astype(np.float64)  # [r, c, D]
            dots = np.einsum("rcd,rd->rc", block, q64[s:s + rows])
            norms = np.einsum("rcd,rcd->rc", block, block)
            out[s:s + rows, c:c + cols] = qq[s:s + rows, None] + norms - 2.0 * dots
    return out


class _Scanner:
    """The cheap candidate scan of one backend over a fixed gallery.

    `scan(q, n)` returns (candidates [Q, n], threshold [Q], radius [Q]) such that every gallery
    item j outside a query's candidates has an exact value t_j = q.g_j - |g_j|^2/2 (larger =
    closer) below threshold + radius."""

    def __init__(self, gallery: np.ndarray, backend: str, device: torch.device) -> None:
        self.backend, self.device = backend, device
        dim = gallery.shape[1]
        self.gamma = dim * _U32 / (1 - dim * _U32)  # float32 sum of dim products
        # Bounds only (exact distances are recomputed in float64): float32 norms, widened by
        # twice their worst-case relative error.
        grow = 1 + 2 * self.gamma + 1e-6
        g32 = torch.from_numpy(gallery)

        def max_norm(rows: torch.Tensor) -> float:
            return float(torch.linalg.vector_norm(rows, dim=1).max()) * grow if len(rows) else 0.0

        norms = torch.linalg.vector_norm(g32, dim=1) if len(gallery) else torch.zeros(1)
        self.g_norm_max = float(norms.max()) * grow
        self.g_norm_min = float(norms.min()) / grow
        if backend == "bf16":
            self.gs = g32.to(torch.bfloat16)
            # Largest rounding residual |g - bf16(g)| and largest |bf16(g)| (in blocks: no
            # float32 copy of the whole rounded gallery).
            self.g_res_max = self.gs_norm_max = 0.0
            for s in range(0, len(gallery), 16384):
                rounded = self.gs[s:s + 16384].float()
                self.g_res_max = max(self.g_res_max, max_norm(g32[s:s + 16384] - rounded))  # exact difference
                self.gs_norm_max = max(self.gs_norm_max, max_norm(rounded))
        elif backend == "torch":
            self.gt = torch.from_numpy(gallery).to(device)
        elif backend == "faiss":
            import faiss

            index = faiss.IndexFlatL2(dim)
            if device.type == "cuda":
                if faiss_gpus() == 0:
                    raise ValueError("--backend faiss on a GPU needs the faiss-gpu wheel (this faiss has no GPU "
                                     "support); use --backend torch, or see `purireid doctor`")
                self._res = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._res, device.index or 0, index)
            index.add(gallery)
            self.index = index

    def scan(self, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qn = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
        if self.backend == "faiss":
            return self._scan_faiss(q, qn, n)
        # Candidates by the cheap dot product alone: t = q.g - |g|^2/2 differs from it by at most
        # (max - min |g|^2)/2 (~1e-7 for L2-normalised features), which the threshold absorbs,
        # and a [Q, G] subtraction pass is saved.
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            if self.backend == "bf16":
                qs = torch.from_numpy(q).to(torch.bfloat16)
                # bf16 products, float32 sums, bf16 output. One query: a matrix-vector product
                # ([G, D] x [D]), much faster here than the [1, D] x [D, G] GEMM.
                score = torch.mv(self.gs, qs[0])[None] if len(q) == 1 else qs @ self.gs.T
            else:
                qt = torch.from_numpy(q).to(self.device)
                score = torch.mv(self.gt, qt[0])[None] if len(q) == 1 else qt @ self.gt.T
            n = min(n, score.shape[1])
            vals, idx = torch.topk(score, n, dim=1, largest=True, sorted=False)
            thr_dot = vals.min(dim=1).values.double().cpu().numpy()
            cand = idx.cpu().numpy()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        if self.backend == "bf16":
            rounded = qs.float().numpy()
            resid = q - rounded  # exact in float32
            q_res = np.sqrt(np.einsum("ij,ij->i", resid, resid, dtype=np.float64))
            qs_norm = np.sqrt(np.einsum("ij,ij->i", rounded, rounded, dtype=np.float64))
            # |q.g - qs.gs| <= |qs||g - gs| + |q - qs||gs| + |q - qs||g - gs|, plus the float32 sum.
            radius = (qs_norm * self.g_res_max + q_res * self.gs_norm_max + q_res * self.g_res_max
                      + self.gamma * qs_norm * self.gs_norm_max) * (1 + 2.0**-40)
            # The bf16 output b of a float32 sum a: a <= b + 2**-8 |b| (half an ulp, with margin).
            # A non-candidate has b <= thr_dot: where b > 0, |b| <= |thr_dot|; where b < 0,
            # b + 2**-8|b| <= max(0, thr_dot + 2**-8|thr_dot|). So 2**-8 |thr_dot| covers both.
            radius = radius + 2.0**-8 * (1 + 2.0**-6) * np.abs(thr_dot)
        else:
            # TF32-rounded inputs allowed for on CUDA: a global torch setting may switch them on.
            tf32 = 2 * 2.0**-11 if self.device.type == "cuda" else 0.0
            radius = (tf32 + self.gamma) * qn * self.g_norm_max
        # Every non-candidate j: t_j <= q.g_j - min|g|^2/2 <= thr_dot + radius - min|g|^2/2.
        return cand, thr_dot - 0.5 * self.g_norm_min**2, radius + 1e-12

    def _scan_faiss(self, q: np.ndarray, qn: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = min(n, self.index.ntotal)
        dist, idx = self.index.search(np.ascontiguousarray(q), n)
        # faiss: |q|^2 + |g|^2 - 2 q.g in float32; d = |q|^2 - 2t, so t = (|q|^2 - d) / 2.
        thr = (qn**2 - dist[:, -1].astype(np.float64)) / 2
        # GEMM error (with TF32-rounded inputs allowed for on a GPU, where faiss may use them),
        # plus the three-term float32 sum.
        tf32 = 2 * 2.0**-11 if self.device.type == "cuda" else 0.0
        radius = ((tf32 + self.gamma) * qn * self.g_norm_max
                  + 4 * _U32 * (qn**2 + self.g_norm_max**2 + 2 * qn * self.g_norm_max) + 1e-12)
        return idx.astype(np.int64), thr, radius


def _rank_candidates(q: np.ndarray, g: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best candidates per row by (exact key, index)."""
    keys = _keys(_exact_sq_dist(q, g, cand))
    order = np.lexsort((cand, keys), axis=1)[:, :k]
    return np.take_along_axis(cand, order, axis=1), np.take_along_axis(keys, order, axis=1)


def _certified(q: np.ndarray, keys_k: np.ndarray, thr: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Rows where no non-candidate can reach the k-th key: its exact d = |q|^2 - 2t > key_k + grid."""
    qq = np.einsum("ij,ij->i", q, q, dtype=np.float64)
    lower = qq - 2.0 * (thr + radius)
    return lower > keys_k + 2.0 / _GRID


def _as_features(x: Any, what: str) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if a.ndim != 2:
        raise ValueError(f"{what} features must be 2-D, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} features must be finite (NaN or inf found)")
    return a


class GalleryIndex:
    """A gallery prepared once (norms, the bf16 copy or the faiss index) for many exact searches."""

    def __init__(self, gallery: Any, *, backend: str = "auto", device: str | torch.device = "cpu") -> None:
        self.gallery = _as_features(gallery, "gallery")
        self.device = torch.device(device)
        self.backend = resolve_backend(backend, self.device)
        self._scanner = _Scanner(self.gallery, self.backend, self.device) if len(self.gallery) else None

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
        widened = full = 0
        for s in range(0, len(q), _QUERY_CHUNK):
            qc = q[s:s + _QUERY_CHUNK]
            rows = np.arange(len(qc))
            for n in (kk + _EXTRA, _WIDEN * (kk + _EXTRA)):
                cand, thr, radius = self._scanner.scan(qc[rows], n)
                idx, keys = _rank_candidates(qc[rows], g, cand, kk)
                out_idx[s + rows, :kk], out_d[s + rows, :kk] = idx, keys
                ok = _certified(qc[rows], keys[:, -1], thr, radius) | (cand.shape[1] >= len(g))
                rows = rows[~ok]
                if not len(rows):
                    break
                if n == kk + _EXTRA:
                    widened += len(rows)
            if len(rows):  # still undecided: every gallery item, exactly
                full += len(rows)
                all_idx = np.arange(len(g))[None, :]
                for r in rows:
                    idx, keys = _rank_candidates(qc[r:r + 1], g, all_idx, kk)
                    out_idx[s + r, :kk], out_d[s + r, :kk] = idx[0], keys[0]
        return SearchResult(out_idx, out_d, widened=widened, full=full)


def exact_search(query: Any, gallery: Any, k: int, *, backend: str = "auto",
                 device: str | torch.device = "cpu") -> SearchResult:
    """The k nearest gallery items of every query (squared Euclidean, ties by index), exactly."""
    return GalleryIndex(gallery, backend=backend, device=device).search(query, k)


def rerank_search(query: np.ndarray, gallery: np.ndarray, k: int) -> tuple[SearchResult, np.ndarray]:
    """Top k by the k-reciprocal re-ranked distance (ties by index), and that whole [Q, G] matrix."""
    from purireid.labels.jaccard import rerank_distance

    dist = np.asarray(rerank_distance(query, gallery), dtype=np.float32)
    kk = min(k, dist.shape[1])
    idx = np.full((len(dist), k), -1, dtype=np.int64)
    d = np.full((len(dist), k), np.inf)
    cols = np.arange(dist.shape[1])
    for i, row in enumerate(dist):
        order = np.lexsort((cols, row))[:kk]
        idx[i, :kk], d[i, :kk] = order, row[order]
    return SearchResult(idx, d), dist


# --------------------------------------------------------------------------- identities, metrics


def market_identities(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(pids, 0-based camids) when every file name follows the Market-1501 naming, else None."""
    from purireid.data.datasets import DatasetError, parse_market_name

    pids, cams = [], []
    for path in paths:
        try:
            pid, cam = parse_market_name(os.path.basename(path))
        except DatasetError:
            return None
        pids.append(pid)
        cams.append(cam)
    return np.asarray(pids, dtype=np.int64), np.asarray(cams, dtype=np.int64)


def protocol_metrics(query: np.ndarray, gallery: np.ndarray, q_ids: tuple[np.ndarray, np.ndarray],
                     g_ids: tuple[np.ndarray, np.ndarray], *, max_rank: int = 50,
                     reranked: np.ndarray | None = None) -> dict[str, Any]:
    """mAP, CMC (and mINP when purireid.evaluation.metrics reports it) as the evaluate stage computes them."""
    from purireid.evaluation.metrics import evaluate_features, evaluate_rank

    (qp, qc), (gp, gc) = q_ids, g_ids
    if reranked is not None:  # the matrix evaluate_features would compute with rerank=True
        return evaluate_rank(reranked, qp, gp, qc, gc, max_rank=max_rank)
    return evaluate_features(query, gallery, qp, gp, qc, gc, max_rank=max_rank)


# --------------------------------------------------------------------------- outputs


def ranked_lists(result: SearchResult, query_paths: Sequence[str], gallery_paths: Sequence[str],
                 q_ids: tuple[np.ndarray, np.ndarray] | None = None,
                 g_ids: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict]:
    """Per query: its path and its ranked gallery items (path, distance; identity verdicts when known).

    Verdict per item: "match" (same identity, other camera), "mismatch", or "ignored" (same
    identity and camera, or a junk image: left out by the evaluation protocol)."""
    out = []
    for i, qpath in enumerate(query_paths):
        entry: dict[str, Any] = {"query": qpath, "results": []}
        if q_ids is not None:
            entry["pid"], entry["camid"] = int(q_ids[0][i]), int(q_ids[1][i])
        for rank, (j, d) in enumerate(zip(result.indices[i], result.distances[i]), 1):
            if j < 0:
                break
            item: dict[str, Any] = {"rank": rank, "path": gallery_paths[j], "distance": float(d)}
            if q_ids is not None and g_ids is not None:
                gp, gc = int(g_ids[0][j]), int(g_ids[1][j])
                same = gp == entry["pid"]
                item["pid"], item["camid"] = gp, gc
                item["verdict"] = ("ignored" if gp == -1 or (same and gc == entry["camid"])
                                   else "match" if same else "mismatch")
            entry["results"].append(item)
        out.append(entry)
    return out


def write_ranked_json(path: str | Path, ranked: list[dict], meta: dict[str, Any]) -> None:
    from purireid.io.files import write_json_atomic

    write_json_atomic(path, {**meta, "queries": ranked})


_COLOURS = {"match": "#1a9641", "mismatch": "#d7191c", "ignored": "#9e9e9e", None: "#bdbdbd"}


def write_ranked_html(path: str | Path, ranked: list[dict], *, title: str, summary: str = "",
                      max_queries: int = 200) -> None:
    """A page of ranked lists: one row per query (framed black), its top-k with distances, framed
    green (true match) / red (other identity) / grey (ignored by the protocol) when identities are known.

    Pictures are linked by paths relative to the page, not copied."""
    from purireid.io.files import write_text_atomic

    here = Path(path).resolve().parent

    def src(p: str) -> str:
        try:
            rel = os.path.relpath(p, here)
        except ValueError:  # another drive (Windows)
            rel = p
        return html.escape(Path(rel).as_posix(), quote=True)

    def cell(p: str, caption: str, colour: str, tip: str) -> str:
        return (f'<figure><img src="{src(p)}" style="border-color:{colour}" title="{html.escape(tip, quote=True)}" '
                f'alt="{html.escape(os.path.basename(p), quote=True)}"><figcaption>{caption}</figcaption></figure>')

    rows = []
    for entry in ranked[:max_queries]:
        cells = [cell(entry["query"], "query", "#000", entry["query"])]
        for item in entry["results"]:
            cells.append(cell(item["path"], f'{item["rank"]}: {item["distance"]:.3f}',
                              _COLOURS[item.get("verdict")], item["path"]))
        rows.append(f'<div class="row">{"".join(cells)}</div>')
    more = (f"<p>First {max_queries} of {len(ranked)} queries shown; ranked.json holds all.</p>"
            if len(ranked) > max_queries else "")
    key = ("<p>Frames: <b style='color:#1a9641'>green</b> same identity (other camera), "
           "<b style='color:#d7191c'>red</b> other identity, <b style='color:#9e9e9e'>grey</b> same identity "
           "and camera or junk (ignored by the evaluation protocol). Distances: squared Euclidean "
           "(or re-ranked).</p>" if any("verdict" in r for e in ranked for r in e["results"]) else "")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.row {{ display: flex; gap: 6px; margin-bottom: 10px; align-items: flex-start; }}
figure {{ margin: 0; text-align: center; font-size: 11px; }}
img {{ width: 64px; height: 128px; object-fit: cover; border: 4px solid; display: block; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(summary)}</p>{key}{more}
{chr(10).join(rows)}
</body></html>
"""
    write_text_atomic(path, page)
