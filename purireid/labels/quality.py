"""Label-free figures of an epoch's clusters: what can be said of pseudo labels without knowing
any identity (a dataset of unlabelled crops logs these instead of purity / NMI / ARI). Pure
functions of the labels, the cameras and the features the labels came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

LABEL_FREE_KEYS = ("multi_camera_share", "mean_cluster_size", "median_cluster_size", "largest_cluster",
                   "within_cluster_distance", "nearest_cluster_distance", "separation")


def cluster_sizes_and_cameras(labels: np.ndarray, camids: np.ndarray) -> dict[str, float | None]:
    """Cluster sizes (mean, median, largest) and the share of clusters whose members come from
    >= 2 cameras (a cluster confined to one camera has usually grouped by camera, not by person).
    None when no image is clustered (label -1 = outlier)."""
    labels, camids = np.asarray(labels), np.asarray(camids)
    mask = labels >= 0
    if not mask.any():
        return dict.fromkeys(("multi_camera_share", "mean_cluster_size", "median_cluster_size", "largest_cluster"))
    clustered = labels[mask]
    num_clusters = int(clustered.max()) + 1
    _, cam_codes = np.unique(camids[mask], return_inverse=True)
    seen = np.zeros((num_clusters, cam_codes.max() + 1), dtype=bool)
    seen[clustered, cam_codes] = True
    sizes = np.bincount(clustered, minlength=num_clusters)
    present = sizes > 0
    return {
        "multi_camera_share": float((seen.sum(axis=1)[present] >= 2).mean()),
        "mean_cluster_size": float(mask.sum() / present.sum()),
        "median_cluster_size": float(np.median(sizes[present])),
        "largest_cluster": int(sizes.max()),
    }


def centre_distances(labels: np.ndarray, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(cosine distance of each clustered image to its cluster's centre, in image order;
    each cluster's cosine distance to the nearest other cluster's centre, NaN with one cluster).

    Centres are the mean of the L2-normalised member features, normalised again.
    """
    labels = np.asarray(labels)
    mask = labels >= 0
    x = torch.nn.functional.normalize(features.detach().float().cpu()[torch.from_numpy(mask)], dim=1)
    index = torch.from_numpy(labels[mask]).long()
    num_clusters = int(labels[mask].max()) + 1
    centres = torch.zeros(num_clusters, x.shape[1]).index_add_(0, index, x)
    centres = torch.nn.functional.normalize(centres, dim=1)
    within = 1.0 - (x * centres[index]).sum(dim=1)
    between = 1.0 - centres @ centres.T
    between.fill_diagonal_(float("inf"))
    nearest = between.min(dim=1).values if num_clusters > 1 else torch.full((num_clusters,), float("nan"))
    return within.numpy().astype(np.float64), nearest.numpy().astype(np.float64)


def separation_figures(labels: np.ndarray, features: Mapping[str, torch.Tensor]) -> dict[str, float | None]:
    """The label-free quality figure of a clustering, averaged over the views (equal weights):

    - ``within_cluster_distance``: mean cosine distance of a clustered image to its cluster's centre;
    - ``nearest_cluster_distance``: mean cosine distance of a cluster's centre to the nearest other one;
    - ``separation``: their ratio nearest / within (higher = tighter clusters further apart).

    None when fewer than two clusters exist (nothing to be apart from) or no features are given.
    """
    labels = np.asarray(labels)
    if not features or (labels >= 0).sum() == 0 or len(np.unique(labels[labels >= 0])) < 2:
        return dict.fromkeys(("within_cluster_distance", "nearest_cluster_distance", "separation"))
    within, nearest = zip(*(centre_distances(labels, f) for f in features.values()))
    mean_within = float(np.mean([w.mean() for w in within]))
    mean_nearest = float(np.mean([n.mean() for n in nearest]))
    return {"within_cluster_distance": round(mean_within, 6), "nearest_cluster_distance": round(mean_nearest, 6),
            "separation": round(mean_nearest / mean_within, 6) if mean_within > 0 else None}


def label_free_diagnostics(labels: np.ndarray, camids: np.ndarray,
                           features: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Every label-free figure (LABEL_FREE_KEYS) of one epoch's labels."""
    return {**cluster_sizes_and_cameras(labels, camids), **separation_figures(labels, features or {})}


def distances_to_centres(labels: np.ndarray, features: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Each image's cosine distance to its cluster's centre, averaged over the views (equal
    weights); NaN for an outlier (label -1). In image order."""
    labels = np.asarray(labels)
    out = np.full(labels.shape, np.nan, dtype=np.float64)
    if (labels >= 0).any():
        out[labels >= 0] = np.mean([centre_distances(labels, f)[0] for f in features.values()], axis=0)
    return out


def sample_clusters(labels: np.ndarray, count: int) -> list[int]:
    """`count` clusters to show a person, spread evenly over the clusters sorted by size (largest
    first, ties by id): the biggest, the typical and the smallest all appear. Deterministic."""
    labels = np.asarray(labels)
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    if not len(ids) or count < 1:
        return []
    return _evenly_spaced(ids[np.lexsort((ids, -sizes))], count)


def spread_members(members: np.ndarray, distances: np.ndarray, count: int) -> list[int]:
    """Up to `count` of a cluster's `members` (image indices), from the nearest to its centre to
    the farthest, evenly spaced in that order (so the doubtful members are shown too)."""
    return _evenly_spaced(members[np.argsort(distances[members], kind="stable")], count)


def _evenly_spaced(ordered: np.ndarray, count: int) -> list[int]:
    """Up to `count` entries of `ordered`, evenly spaced from its first to its last (all of them
    when there are no more than `count`)."""
    if len(ordered) <= count:
        return [int(i) for i in ordered]
    return [int(ordered[p]) for p in np.unique(np.round(np.linspace(0, len(ordered) - 1, count)).astype(int))]
