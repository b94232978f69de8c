"""Pseudo labels (docs/method.md, Pseudo labels): fusion of the views' Jaccard distances, DBSCAN, cluster centres.

Pure functions on in-memory arrays. The per-view k-reciprocal Jaccard distance comes from
purireid.labels.jaccard (on the exact neighbour lists of purireid.labels.neighbours); DBSCAN is
scikit-learn's, run on a sparse precomputed graph.

The fused distance D = w0·D0 + w1·D1 + w2·D2 (w = 1 - 2·λ1, λ1, λ1; a pair absent from a
view's sparse matrix has distance 1 there) is never built densely. The views are folded in
one at a time, keeping only the pairs that can still end within eps; the labels are exactly
those of DBSCAN on the dense float32 matrix `w0*D0 + w1*D1 + w2*D2` (tests check this):

* Each partial sum is evaluated as the dense expression would be (float32 products and
  sums in view order), and every remaining term w·d is >= 0, so a partial sum never
  exceeds the final one: a pair whose partial sum is already beyond eps is dropped for good.
* A pair absent from the views seen so far has the partial sum of the weights of those
  views. Pairs only ever stored by later views are therefore considered only while that sum
  is within eps: at the Market-1501 preset (eps 0.6 < w0 = 0.7) only pairs stored by view 0
  survive view 0; at the MSMT17 preset (eps 0.7 = w0) a pair absent from view 0 survives
  only while 0.7 + 0.15·d1 (+ 0.15·d2) still rounds to <= eps in float32, i.e. when d1 and
  d2 are 0 up to rounding (< ~2e-7: identical neighbourhoods in both other views).
* "Within eps" is tested against the larger of eps and float32(eps), which covers both ways
  scikit-learn may compare; scikit-learn then applies its own test to the graph.
At most one view's pairs (plus the survivors so far) are held at a time; when eps >= w0 every
pair stored by view 0 survives view 0, and that upper triangle is the largest thing held.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from purireid import VIEWS
from purireid.labels.jaccard import PairFilter, jaccard_pairs, pairs_to_csr
from purireid.log import get_logger

__all__ = ["ClusterSettings", "fuse_views", "pseudo_labels", "cluster_centres"]

log = get_logger("cluster")


@dataclass(frozen=True)
class ClusterSettings:
    """The pseudo labels' settings (config section `cluster`; defaults: the paper's,
    docs/method.md, Pseudo labels): k-reciprocal neighbours k1 and query expansion k2, the part
    views' weight lambda1 in the fused distance, DBSCAN's eps and min_samples, and the offset
    added to same-camera squared distances (0 = the paper)."""

    k1: int = 30
    k2: int = 6
    lambda1: float = 0.15
    eps: float = 0.6
    min_samples: int = 4
    same_camera_offset: float = 0.0

    @classmethod
    def from_config(cls, cluster: Mapping[str, Any]) -> ClusterSettings:
        return cls(k1=cluster["k1"], k2=cluster["k2"], lambda1=cluster["lambda1"], eps=cluster["eps"],
                   min_samples=cluster["min_samples"], same_camera_offset=cluster.get("same_camera_offset", 0.0))

    @property
    def view_weights(self) -> tuple[float, float, float]:
        """The fused distance's weights of the VIEWS: 1 - 2·lambda1, lambda1, lambda1."""
        return (1 - 2 * self.lambda1, self.lambda1, self.lambda1)


def _eps_limit(eps: float) -> np.float64:
    """The largest float64 value a float32 fused distance may have and still be within eps
    whether it is compared with eps in float64 or in float32."""
    return np.float64(max(float(eps), float(np.float32(eps))))


def _absent_sum(weights: Sequence[float]) -> np.float32:
    """The fused distance of a pair absent from every view (float32, in view order)."""
    total = np.float32(0.0)
    for w in weights:
        total = total + np.float32(w) * np.float32(1.0)
    return total


def _fold_filter(codes: np.ndarray, values: np.ndarray, absent: np.float32, w: np.float32, limit: np.float64,
                 taken: np.ndarray) -> PairFilter:
    """Block filter folding one view into the survivors (codes, values): each block pair's
    partial sum is the survivor's value (or `absent`) + w·d; pairs beyond `limit` are dropped;
    survivors met and kept are marked in `taken`. Blocks cover disjoint code ranges, so
    concurrent calls read shared arrays and write disjoint entries of `taken`."""

    def fold(block_codes: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(block_codes) == 0:
            return block_codes, d
        lo, hi = np.searchsorted(codes, [block_codes[0], block_codes[-1] + 1])
        pos = np.searchsorted(codes[lo:hi], block_codes)
        match = pos < hi - lo
        match[match] = codes[lo:hi][pos[match]] == block_codes[match]
        prev = np.full(len(block_codes), absent, dtype=np.float32)
        prev[match] = values[lo:hi][pos[match]]
        fused = prev + w * d  # float32, as the dense expression
        keep = fused <= limit
        taken[lo + pos[match & keep]] = True
        return block_codes[keep], fused[keep]

    return fold


def fuse_views(
    views: Sequence[Any], weights: Sequence[float], settings: ClusterSettings = ClusterSettings(), *,
    camids: Any = None, backend: str = "auto", stats: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs whose fused Jaccard distance sum_v w_v·D_v may be within settings.eps: sorted
    upper-triangle codes i*N + j (diagonal included) and their float32 fused distances,
    bit-identical to the dense float32 evaluation in view order. The Jaccard distance of each
    view takes settings.k1, k2 and same_camera_offset (with `camids`). See the module docstring
    for the pruning.

    Raises ValueError when pairs absent from every view (fused distance sum_v w_v) would be
    within eps: the graph would not be sparse."""
    eps, k1, k2, same_camera_offset = settings.eps, settings.k1, settings.k2, settings.same_camera_offset
    limit = _eps_limit(eps)
    if _absent_sum(weights) <= limit:
        raise ValueError(f"eps={eps} >= fused distance of unrelated pairs ({_absent_sum(weights)}); use eps < 1")
    codes = np.zeros(0, dtype=np.int64)
    values = np.zeros(0, dtype=np.float32)
    absent = np.float32(0.0)  # the partial sum of a pair absent from every view so far
    for x, w in zip(views, weights):
        w = np.float32(w)
        taken = np.zeros(len(codes), dtype=bool)
        fold = _fold_filter(codes, values, absent, w, limit, taken)
        new_codes, new_values = jaccard_pairs(x, k1, k2, backend=backend, pair_filter=fold, stats=stats,
                                              camids=camids, same_camera_offset=same_camera_offset)
        # Survivors not kept by `fold` are absent from this view (d = 1), or stored with a fused
        # value beyond eps, which d = 1 only makes larger: evaluating them with d = 1 is exact.
        rest_values = values[~taken] + w * np.float32(1.0)
        within = rest_values <= limit
        rest_codes = codes[~taken][within]
        at = np.searchsorted(rest_codes, new_codes)  # disjoint sorted sets: merge
        codes = np.insert(rest_codes, at, new_codes)
        values = np.insert(rest_values[within], at, new_values)
        absent = absent + w * np.float32(1.0)
        del fold, taken, rest_values, within, rest_codes, at, new_codes, new_values
        log.debug("fuse_views: %d pairs may still be within eps %s", len(codes), eps)
    if stats is not None:
        stats["fused_pairs"] = stats.get("fused_pairs", 0) + len(codes)
    return codes, values


def _dbscan_graph(graph: Any, min_samples: int, eps: float) -> np.ndarray:
    """scikit-learn's DBSCAN on a sparse precomputed graph holding every pair within eps, with
    the zero diagonal stored explicitly (so each point is its own neighbour)."""
    from sklearn.cluster import DBSCAN

    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(graph)


def pseudo_labels(
    views: Mapping[str, Any] | Sequence[Any],
    settings: ClusterSettings = ClusterSettings(),
    *,
    camids: Any = None,
    backend: str = "auto",
    stats: dict | None = None,
) -> np.ndarray:
    """DBSCAN labels (int64, -1 = outlier) of the fused Jaccard distance of the three views
    (a mapping keyed by VIEWS, or a sequence in VIEWS order), docs/method.md (Pseudo labels).

    `settings.same_camera_offset` (with `camids`) is added to same-camera squared distances before the
    Jaccard distance of each view (`purireid.labels.jaccard.jaccard_pairs`; 0 = the paper).
    `backend` picks the kNN candidate search only (labels are identical). `stats`, if given,
    accumulates seconds ("knn_s", "jaccard_s" including the fusion, "dbscan_s") and counts
    ("uncertified_rows", "rescored_pairs", "fused_pairs")."""
    feats = [views[v] for v in VIEWS] if isinstance(views, Mapping) else list(views)
    if len(feats) != 3:
        raise ValueError(f"expected three views {VIEWS}, got {len(feats)}")
    sizes = {len(f) for f in feats}
    if len(sizes) != 1:
        raise ValueError(f"the three views must have the same number of rows, got {[len(f) for f in feats]}")
    n = sizes.pop()
    codes, values = fuse_views(feats, settings.view_weights, settings, camids=camids, backend=backend, stats=stats)
    t0 = time.perf_counter()
    # Every view stores its zero diagonal, so the fused diagonal is an explicit 0 (<= eps):
    # a point is its own neighbour, as with a dense matrix (docs/method.md, DBSCAN).
    graph = pairs_to_csr(codes, values, n)
    del codes, values
    labels = _dbscan_graph(graph, settings.min_samples, settings.eps)
    if stats is not None:
        stats["dbscan_s"] = stats.get("dbscan_s", 0.0) + time.perf_counter() - t0
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
