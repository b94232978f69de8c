"""Gallery search: the k nearest gallery images of each query, ranked lists as JSON and HTML.

The exact search itself (`GalleryIndex`, `exact_search`, `SearchResult`) is the kNN engine's
(purireid.knn.engine: the same backends, backend choice, key grid and error bounds as the pseudo
labels' self-kNN): for every query, the k gallery items of smallest squared Euclidean distance,
ties broken by gallery index, identical for every backend and device. `rerank_search` ranks by
the k-reciprocal re-ranked distance instead.

With identities known (Market-style file names, `0002_c1s1_000451_03.jpg`) the metrics are
purireid.evaluation.metrics's, under the evaluate stage's protocol (docs/method.md).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from purireid.knn.engine import GalleryIndex, SearchResult, exact_search

__all__ = ["DISTANCES", "GalleryIndex", "SearchResult", "exact_search", "market_identities", "protocol_metrics",
           "ranked_lists", "rerank_search", "write_ranked_html", "write_ranked_json"]

# What the distances of a ranked list are, by whether it was re-ranked (ranked.json and the page).
DISTANCES = {False: "squared Euclidean (exact)", True: "k-reciprocal re-ranked"}


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
                      distance: str = DISTANCES[False], max_queries: int = 200) -> None:
    """A page of ranked lists: one row per query (framed black), its top-k with distances (what
    they are: `distance`, one of DISTANCES' values), framed green (true match) / red (other
    identity) / grey (ignored by the protocol) when identities are known.

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
           "and camera or junk (ignored by the evaluation protocol).</p>"
           if any("verdict" in r for e in ranked for r in e["results"]) else "")
    key += f"<p>Distances: {html.escape(distance)}.</p>"
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
