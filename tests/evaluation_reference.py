"""Per-query references of the Market-1501 protocol (docs/method.md) for purireid.evaluation.metrics.

Tests and benchmarks only. `brute_force` is the definition written out (pure Python, small
inputs); `sklearn_reference` is the released code's way (a stable argsort per query and
scikit-learn's `average_precision_score`), fast enough for Market-1501-sized benchmarks.
Both return `{"mAP", "mINP", "cmc", "num_valid_queries"}` as fractions, like the evaluator.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def brute_force(d: Any, qp: Any, gp: Any, qc: Any, gc: Any, max_rank: int = 50) -> dict[str, Any]:
    """Rank by (distance, gallery index), drop same pid + same camera and junk (pid -1).

    AP = mean precision at each true match; INP = matches / rank of the last match
    (Ye et al., TPAMI 2021: 1 - NP, NP = (R_hard - |G|) / R_hard); both averaged over the
    queries that have a true match.
    """
    aps, inps, firsts = [], [], []
    for i in range(len(qp)):
        ranked = sorted(range(len(gp)), key=lambda j: (float(d[i][j]), j))
        ranked = [j for j in ranked if gp[j] != -1 and not (gp[j] == qp[i] and gc[j] == qc[i])]
        hits = [r + 1 for r, j in enumerate(ranked) if gp[j] == qp[i]]
        if not hits:
            continue
        aps.append(sum((k + 1) / r for k, r in enumerate(hits)) / len(hits))
        hardest = hits[-1]
        inps.append(1.0 - (hardest - len(hits)) / hardest)
        firsts.append(hits[0])
    if not aps:
        raise ValueError("no query has a true match")
    cmc = np.array([sum(f <= r for f in firsts) for r in range(1, max_rank + 1)]) / len(firsts)
    return {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)), "cmc": cmc, "num_valid_queries": len(aps)}


def sklearn_reference(d: np.ndarray, qp: np.ndarray, gp: np.ndarray, qc: np.ndarray, gc: np.ndarray,
                      max_rank: int = 50) -> dict[str, Any]:
    """Per query: stable argsort, the protocol's removals, scikit-learn's average precision."""
    from sklearn.metrics import average_precision_score

    qp, gp, qc, gc = map(np.asarray, (qp, gp, qc, gc))
    aps, inps, cmc, n = [], [], np.zeros(max_rank), 0
    for i in range(d.shape[0]):
        order = np.argsort(d[i], kind="stable")
        match = gp[order] == qp[i]
        valid = ~(match & (gc[order] == qc[i])) & (gp[order] != -1)
        y = match[valid]
        if not y.any():
            continue
        # Scores strictly decreasing along the ranking, so ties cannot reorder it.
        aps.append(average_precision_score(y, -np.arange(y.size)))
        hits = np.flatnonzero(y)
        inps.append(hits.size / (hits[-1] + 1))
        if hits[0] < max_rank:
            cmc[hits[0]:] += 1
        n += 1
    return {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)), "cmc": cmc / n, "num_valid_queries": n}
