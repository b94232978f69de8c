"""Market-1501 evaluation protocol (docs/method.md, Evaluation protocol): mAP, mINP and CMC, vectorised and chunked.

Ranking rule: gallery items are ordered by distance, ties broken by gallery index (the
order of a stable argsort). For each query, gallery items with the same pid *and* the same
camera are removed, junk (pid -1) is removed, distractors (pid 0) stay. AP is the mean of
the precision at the rank of every true match; INP (Ye et al., "Deep Learning for Person
Re-identification: A Survey and Outlook", TPAMI 2021) is the number of true matches divided
by the rank of the last one (1 - the share of false items ranked before the hardest match);
queries without a true match are left out of mAP, mINP and CMC. Every metric is a fraction
in [0, 1].

One loop (`_evaluate`) serves `evaluate_rank` (a given distance matrix) and
`evaluate_features` (distances computed per chunk of queries, or re-ranked).

How it avoids sorting: only the ranks of the true matches are needed. A query's true
matches (few) are sorted by (distance, gallery index); the rank of the k-th one is k plus
the number of valid negatives ranked before it. Negatives farther than the last true match
cannot change any rank, so one compare pass finds the "candidates" that can:
- few candidates (a trained model): each gets an int64 key ordering exactly like
  (row, distance, gallery index) and is placed among the matches' keys by one
  ``searchsorted``;
- many (a poor model): every item is bucketed among the row's match distances by a
  batched float ``searchsorted``; exact-distance ties are then fixed sparsely by index.
Cost O(G log P) per query instead of O(G log G), in batched torch ops over a chunk of
queries; no per-query Python loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["HEADLINE_KEYS", "HEADLINE_RANKS", "evaluate_features", "evaluate_rank", "headline_metrics"]

# The CMC ranks a results table shows (Rank-1/5/10, as fast-reid and torchreid print them), and
# the keys of headline_metrics.
HEADLINE_RANKS = (1, 5, 10)
HEADLINE_KEYS = ("mAP", "mINP", *(f"rank{k}" for k in HEADLINE_RANKS))

_INT64_MAX = torch.iinfo(torch.int64).max
_CHUNK_ELEMENTS = 1 << 22  # ~4M distances per chunk: bounded temporaries
_SPARSE_FRACTION = 0.25  # below: key only the candidates; above: bucket every item


def _as_long(a: Any) -> Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.int64).reshape(-1)


def _order_keys(dist: Tensor) -> Tensor:
    """int64 keys ordering like (float32 distance, column index) (for the top-k lists)."""
    d = dist.float().contiguous() + 0.0  # -0.0 -> +0.0, so it ties with +0.0
    bits = d.view(torch.int32).to(torch.int64)
    # Signed-int order of IEEE floats: flip the magnitude bits of negative numbers.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    cols = torch.arange(d.shape[1], dtype=torch.int64, device=d.device)
    return (bits << 32) | cols


def _composite_keys(rows: Tensor, d: Tensor, cols: Tensor, col_bits: int) -> Tensor:
    """int64 keys ordering like (row, float32 distance, column): row | 32 bits | col_bits."""
    bits = (d.float() + 0.0).view(torch.int32).to(torch.int64)  # -0.0 -> +0.0 first
    # Unsigned order of IEEE floats: negatives get all bits flipped, positives the sign bit.
    u = torch.where(bits < 0, bits ^ 0xFFFFFFFF, bits ^ 0x80000000) & 0xFFFFFFFF
    return (rows << (32 + col_bits)) | (u << col_bits) | cols


def _col_bits(num_g: int) -> int:
    return max(1, (num_g - 1).bit_length())


def _max_rows(num_g: int) -> int:
    # Keys must fit in 63 bits: row bits + 32 + column bits.
    return 1 << (31 - _col_bits(num_g))


def _counts_sparse(
    dist: Tensor, cand: Tensor, pos_keys: Tensor, starts: Tensor, pmax: int,
    qpids: Tensor, gpids: Tensor, junk: Tensor, cb: int,
) -> Tensor:
    """counts[i, b] = number of valid negatives of row i with b true matches before them.

    Over 8 parameters on purpose: a pure kernel of the chunk's arrays, called once from
    `_match_ranks` with the same names as `_counts_dense`; grouping them would only rename them."""
    q = dist.shape[0]
    crow, ccol = cand.nonzero(as_tuple=True)
    keep = (gpids[ccol] != qpids[crow]) & ~junk[ccol]  # valid negatives only
    crow, ccol = crow[keep], ccol[keep]
    cand_keys = _composite_keys(crow, dist[crow, ccol], ccol, cb)
    before = torch.searchsorted(pos_keys, cand_keys) - starts[crow]  # 0..npos
    return torch.bincount(crow * (pmax + 1) + before, minlength=q * (pmax + 1)).view(q, pmax + 1)


def _counts_dense(
    dist: Tensor, same_pid: Tensor, pos_keys: Tensor, npos: Tensor, starts: Tensor,
    pmax: int, junk: Tensor, cb: int,
) -> Tensor:
    """Same as :func:`_counts_sparse`, bucketing every item with a batched float search."""
    q = dist.shape[0]
    # Matches as a padded [q, pmax] table, sorted by (distance, column) within a row.
    prow = pos_keys >> (32 + cb)
    pcol = pos_keys & ((1 << cb) - 1)
    slot = torch.arange(pos_keys.numel()) - starts[prow]
    pos_d = torch.full((q, pmax), torch.finfo(torch.float32).max)
    pos_c = torch.full((q, pmax), -1, dtype=torch.int64)
    pos_d[prow, slot] = dist[prow, pcol]
    pos_c[prow, slot] = pcol
    bucket = torch.searchsorted(pos_d, dist)  # matches strictly closer
    # An item at exactly a match's distance is after it iff its column is larger.
    tr, tc = (pos_d.gather(1, bucket.clamp(max=pmax - 1)) == dist).nonzero(as_tuple=True)
    if tr.numel():
        lo = bucket[tr, tc]
        hi = torch.searchsorted(pos_d[tr], dist[tr, tc][:, None], right=True)
        k = torch.arange(pmax)[None, :]
        ahead = (k >= lo[:, None]) & (k < hi) & (pos_c[tr] < tc[:, None])
        bucket[tr, tc] = lo + ahead.sum(dim=1)
    counts = torch.zeros(q, pmax + 1, dtype=torch.int64)
    counts.scatter_add_(1, bucket, torch.ones(1, 1, dtype=torch.int64).expand(bucket.shape))
    # Remove what is not a valid negative: same-pid items (sparse) and junk columns.
    xr, xc = (same_pid | junk[None, :]).nonzero(as_tuple=True) if bool(junk.any()) else same_pid.nonzero(as_tuple=True)
    counts.view(-1).index_add_(0, xr * (pmax + 1) + bucket[xr, xc], torch.full_like(xr, -1))
    return counts


def _match_ranks(
    dist: Tensor, qpids: Tensor, qcams: Tensor, gpids: Tensor, gcams: Tensor
) -> tuple[Tensor, Tensor]:
    """For a chunk of queries: (same_pid mask [q, G], ranks [q, P] of the true matches).

    ``ranks[i, k]`` is the 1-based rank, among the valid gallery items, of query i's k-th
    true match (ascending); entries past the query's number of matches are 0.
    Ranking is by (distance, gallery index).

    Only the negatives that come before a query's last true match can change a rank, so
    after one compare pass only those "candidates" (a sparse set) are keyed and counted.
    """
    q, g = dist.shape
    cb = _col_bits(g)
    if q > _max_rows(g):
        raise ValueError(f"chunk of {q} rows too large for {g} columns")
    dist = dist.float()
    if not bool(torch.isfinite(dist.sum())):  # cheap check: no NaN / inf anywhere
        raise ValueError("distances must be finite")
    junk = gpids == -1
    same_pid = gpids[None, :] == qpids[:, None]
    # True matches are few: find them among the same-pid entries, drop same camera / junk.
    rows, cols = same_pid.nonzero(as_tuple=True)
    keep = (gcams[cols] != qcams[rows]) & ~junk[cols]
    rows, cols = rows[keep], cols[keep]
    if rows.numel() == 0:
        return same_pid, torch.zeros(q, 0, dtype=torch.int64)
    pos_keys = _composite_keys(rows, dist[rows, cols], cols, cb).sort().values
    rows = pos_keys >> (32 + cb)
    npos = torch.bincount(rows, minlength=q)
    starts = torch.cumsum(npos, 0) - npos
    pmax = int(npos.max())
    has = npos > 0
    last = pos_keys[starts[has] + npos[has] - 1] & ((1 << cb) - 1)  # column of the last match
    dmax = torch.full((q,), -float("inf"))
    dmax[has] = dist[has.nonzero(as_tuple=True)[0], last]
    # Candidates: items at a distance <= the last match's; the others come after every
    # match. Few (a good model) -> key and count just them; many -> bucket every item.
    cand = dist <= dmax[:, None]
    if int(cand.sum()) <= _SPARSE_FRACTION * cand.numel():
        counts = _counts_sparse(dist, cand, pos_keys, starts, pmax, qpids, gpids, junk, cb)
    else:
        counts = _counts_dense(dist, same_pid, pos_keys, npos, starts, pmax, junk, cb)
    k = torch.arange(1, pmax + 1, dtype=torch.int64)
    ranks = k[None, :] + torch.cumsum(counts[:, :pmax], dim=1)
    ranks = torch.where(k[None, :] <= npos[:, None], ranks, torch.zeros_like(ranks))
    return same_pid, ranks




def _chunk_stats(ranks: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query with a true match: (AP, INP, rank of the first match).

    ``ranks`` is :func:`_match_ranks`' ``[q, P]`` (ascending ranks, 0 past a query's matches).
    INP = matches / rank of the last (hardest) match (Ye et al., TPAMI 2021): 1 when every
    true match comes before every false one.
    """
    ranks = ranks.numpy()
    npos = (ranks > 0).sum(axis=1)
    has = npos > 0
    r = ranks[has].astype(np.float64)
    k = np.arange(1, r.shape[1] + 1, dtype=np.float64)
    prec = np.where(r > 0, k[None, :] / np.where(r > 0, r, 1.0), 0.0)
    ap = prec.sum(axis=1) / npos[has]
    hardest = r.max(axis=1) if r.shape[1] else np.ones(0)
    inp = npos[has] / hardest
    first = ranks[has, 0] if r.shape[1] else np.zeros(0, dtype=np.int64)
    return ap, inp, first


def _summarise(stats: list[tuple[np.ndarray, np.ndarray, np.ndarray]], max_rank: int) -> dict[str, Any]:
    ap, inp, first = (np.concatenate(parts) for parts in zip(*stats)) if stats else (np.zeros(0),) * 3
    n = int(ap.size)
    if n == 0:
        raise ValueError("no query has a true match in the gallery: mAP/CMC undefined")
    first = first.astype(np.int64)
    hist = np.bincount(first[first <= max_rank] - 1, minlength=max_rank)[:max_rank]
    cmc = np.cumsum(hist).astype(np.float64) / n
    return {"mAP": float(ap.mean()), "mINP": float(inp.mean()), "cmc": cmc, "num_valid_queries": n}


def _labels(num_q: int, num_g: int, query_pids: Any, gallery_pids: Any, query_cams: Any,
            gallery_cams: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    qp, gp, qc, gc = map(_as_long, (query_pids, gallery_pids, query_cams, gallery_cams))
    if qp.numel() != num_q or qc.numel() != num_q:
        raise ValueError(f"{num_q} queries but {qp.numel()} pids / {qc.numel()} cams")
    if gp.numel() != num_g or gc.numel() != num_g:
        raise ValueError(f"{num_g} gallery items but {gp.numel()} pids / {gc.numel()} cams")
    return qp, gp, qc, gc


def _rows_per_chunk(g: int, chunk_size: int | None) -> int:
    rows = int(chunk_size) if chunk_size is not None else _CHUNK_ELEMENTS // max(g, 1)
    return max(1, min(rows, _max_rows(g)))


def _evaluate(distance_rows: Callable[[int, int], Tensor], num_q: int, num_g: int,
              labels: tuple[Tensor, Tensor, Tensor, Tensor], *, max_rank: int, chunk_size: int | None,
              topk: int) -> dict[str, Any]:
    """The one evaluation loop: `distance_rows(s, e)` gives the distances of queries s..e-1 to
    the whole gallery; they are ranked in sub-chunks, so temporaries stay small whatever
    `chunk_size` (rows of distances asked for at once) is."""
    qp, gp, qc, gc = labels
    stats, tops = [], []
    step, sub = _rows_per_chunk(num_g, chunk_size), _rows_per_chunk(num_g, None)
    for s in range(0, num_q, step):
        e = min(s + step, num_q)
        dist = distance_rows(s, e)
        for t in range(s, e, sub):
            u = min(t + sub, e)
            d = dist[t - s : u - s]
            _, ranks = _match_ranks(d, qp[t:u], qc[t:u], gp, gc)
            stats.append(_chunk_stats(ranks))
            if topk > 0:
                tops.append(_topk_rows(d, topk, qp[t:u], qc[t:u], gp, gc))
        del dist
    out = _summarise(stats, max_rank)
    if topk > 0:
        out["topk_indices"] = torch.cat(tops).numpy() if tops else np.zeros((0, topk), dtype=np.int64)
    return out


def evaluate_rank(
    distmat: np.ndarray | Tensor,
    query_pids: Any,
    gallery_pids: Any,
    query_cams: Any,
    gallery_cams: Any,
    max_rank: int = 50,
    *,
    topk: int = 0,
) -> dict[str, Any]:
    """mAP, mINP and CMC of a query x gallery distance matrix under the Market-1501 protocol.

    Returns ``{"mAP": float, "mINP": float, "cmc": float64 [max_rank] (cmc[0] = Rank-1),
    "num_valid_queries": int}`` (fractions in [0, 1]), plus ``"topk_indices"`` int64
    ``[Q, topk]`` when ``topk > 0`` (each query's best gallery items, protocol-removed items
    skipped, -1 padding). Raises ValueError when no query has a true match.
    """
    dist = torch.as_tensor(distmat).detach().cpu()
    if dist.ndim != 2:
        raise ValueError(f"distmat must be [Q, G], got {tuple(dist.shape)}")
    num_q, num_g = dist.shape
    labels = _labels(num_q, num_g, query_pids, gallery_pids, query_cams, gallery_cams)
    return _evaluate(lambda s, e: dist[s:e], num_q, num_g, labels, max_rank=max_rank, chunk_size=None, topk=topk)


def _sq_euclidean(qf: Tensor, gf: Tensor, g_sq: Tensor) -> Tensor:
    # |q|^2 + |g|^2 - 2 q.g  (= 2 - 2 cos for L2-normalised rows, docs/method.md)
    d = torch.addmm(g_sq[None, :], qf, gf.T, beta=1.0, alpha=-2.0)
    return d.add_(qf.pow(2).sum(dim=1, keepdim=True))


def _topk_rows(d: Tensor, k: int, qp: Tensor, qc: Tensor, gp: Tensor, gc: Tensor) -> Tensor:
    """Gallery indices of the k best valid items per row, by (distance, index); -1 pads."""
    kk = min(k, d.shape[1])
    invalid = ((gp[None, :] == qp[:, None]) & (gc[None, :] == qc[:, None])) | (gp == -1)[None, :]
    keys = torch.where(invalid, _INT64_MAX, _order_keys(d))
    best = torch.topk(keys, kk, dim=1, largest=False).values  # sorted ascending
    idx = torch.where(best == _INT64_MAX, -1, best & 0xFFFFFFFF)
    if kk < k:
        idx = torch.cat([idx, torch.full((d.shape[0], k - kk), -1, dtype=torch.int64)], dim=1)
    return idx


def _as_features(x: np.ndarray | Tensor) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().cpu().float().contiguous()


def evaluate_features(
    query_features: np.ndarray | Tensor,
    gallery_features: np.ndarray | Tensor,
    query_pids: Any,
    gallery_pids: Any,
    query_cams: Any,
    gallery_cams: Any,
    *,
    max_rank: int = 50,
    chunk_size: int | None = 1024,
    rerank: bool = False,
    topk: int = 0,
) -> dict[str, Any]:
    """:func:`evaluate_rank` of the squared Euclidean distances of the features, computed per
    chunk of ``chunk_size`` queries.

    Memory is bounded by ``chunk_size x G`` (never the full Q x G matrix), except with
    ``rerank=True``, which needs the whole re-ranked matrix from
    ``purireid.labels.jaccard.rerank_distance``. Same keys as :func:`evaluate_rank`.

    Over 8 parameters on purpose: the six arrays are the two sides of the re-ID protocol in the
    order every re-ID evaluation takes them (query / gallery features, identities, cameras), as
    :func:`evaluate_rank` does, and the rest are keyword-only options.
    """
    qf, gf = _as_features(query_features), _as_features(gallery_features)
    if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"features must be [Q, D] and [G, D], got {tuple(qf.shape)}, {tuple(gf.shape)}")
    num_q, num_g = qf.shape[0], gf.shape[0]
    labels = _labels(num_q, num_g, query_pids, gallery_pids, query_cams, gallery_cams)
    if rerank:
        from purireid.labels.jaccard import rerank_distance  # lazy: only re-ranking needs the kNN engine

        reranked = torch.as_tensor(np.asarray(rerank_distance(qf.numpy(), gf.numpy()), dtype=np.float32))
        if tuple(reranked.shape) != (num_q, num_g):
            raise ValueError(f"rerank_distance returned {tuple(reranked.shape)}, expected {(num_q, num_g)}")
        return _evaluate(lambda s, e: reranked[s:e], num_q, num_g, labels, max_rank=max_rank,
                         chunk_size=chunk_size, topk=topk)
    g_sq = gf.pow(2).sum(dim=1)
    return _evaluate(lambda s, e: _sq_euclidean(qf[s:e], gf, g_sq), num_q, num_g, labels, max_rank=max_rank,
                     chunk_size=chunk_size, topk=topk)


def headline_metrics(result: Mapping[str, Any], ranks: Sequence[int] = HEADLINE_RANKS) -> dict[str, float | None]:
    """``HEADLINE_KEYS`` ({"mAP", "mINP", "rank1", "rank5", "rank10"}) of an evaluation result (fractions);
    a rank beyond the CMC's length (``max_rank``) is None, not the last value."""
    cmc = np.asarray(result["cmc"], dtype=np.float64)
    out: dict[str, float | None] = {"mAP": float(result["mAP"]), "mINP": float(result["mINP"])}
    for k in ranks:
        out[f"rank{k}"] = float(cmc[k - 1]) if k <= cmc.size else None
    return out
