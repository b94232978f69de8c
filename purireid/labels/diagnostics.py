"""Diagnostics of an epoch's labels against the true identities and the cameras, and the advice
they lead to: reported in the training log, never fed back into training (docs/method.md,
Stages). Pure functions of label arrays; the label sources give their own advice from them
(`LabelSource.advice`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from purireid.labels.quality import label_free_diagnostics


def cluster_purity(labels: np.ndarray, pids: np.ndarray) -> float | None:
    """Share of clustered images whose true pid is their cluster's majority pid; None when
    every image is an outlier (label -1)."""
    labels, pids = np.asarray(labels), np.asarray(pids)
    mask = labels >= 0
    if not mask.any():
        return None
    clustered, clustered_pids = labels[mask], pids[mask]
    _, pid_codes = np.unique(clustered_pids, return_inverse=True)
    counts = np.zeros((clustered.max() + 1, pid_codes.max() + 1), dtype=np.int64)
    np.add.at(counts, (clustered, pid_codes), 1)
    return float(counts.max(axis=1).sum() / mask.sum())


def label_diagnostics(labels: np.ndarray, pids: np.ndarray, camids: np.ndarray,
                      features: Mapping[str, torch.Tensor] | None = None) -> dict[str, float | None]:
    """How an epoch's labels relate to the true identities and the cameras.

    - ``purity``: see `cluster_purity`;
    - ``nmi`` / ``ari``: normalised mutual information and adjusted Rand index of the labels
      against the pids, over the clustered images (outliers, label -1, left out);
    - the label-free figures of purireid.labels.quality (cluster sizes, ``multi_camera_share``,
      and with `features` the within-cluster and nearest-cluster distances).

    When no pid is known (every one -1, purireid.data.datasets.UNKNOWN_PID: a dataset of unlabelled crops) purity, NMI and
    ARI are left out, not faked: only the label-free figures are returned.
    Values are None when no image is clustered.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels, pids, camids = np.asarray(labels), np.asarray(pids), np.asarray(camids)
    free = label_free_diagnostics(labels, camids, features)
    if (pids < 0).all():  # UNKNOWN_PID (-1) everywhere: no identity is known
        return free
    mask = labels >= 0
    if not mask.any():
        return {**dict.fromkeys(("purity", "nmi", "ari")), **free}
    return {
        "purity": cluster_purity(labels, pids),
        "nmi": float(normalized_mutual_info_score(pids[mask], labels[mask])),
        "ari": float(adjusted_rand_score(pids[mask], labels[mask])),
        **free,
    }


def k1_advice(k1: int, eps: float, mean_cluster_size: float | None) -> str | None:
    """A warning when the clusters found do not fit cluster.k1 (None when they do).

    The k-reciprocal lists hold k1 neighbours. Rule of thumb: k1 between 1x and 2x the typical
    number of images per identity (the paper's 30 suits Market-1501's ~17). Measured on
    a set with ~10 images per identity: cluster purity 0.08 at k1 30 (a few giant
    clusters), 0.58 at k1 10. Two symptoms are visible without labels:
    - clusters far larger than k1: identities merged (k1 or cluster.eps too large);
    - clusters far smaller than k1: each list reaches deep into other identities.
    """
    if mean_cluster_size is None:
        return None
    suggestion = f"near 1-2x the typical number of images per identity"
    if mean_cluster_size > 3 * k1:
        return (f"the clusters hold {mean_cluster_size:.0f} images on average, over 3x cluster.k1={k1}: "
                f"identities are probably merged; lower config key 'cluster.eps' (now {eps}) or set "
                f"'cluster.k1' {suggestion}")
    if k1 > 2.5 * mean_cluster_size:
        return (f"cluster.k1={k1} is over 2.5x the mean cluster size ({mean_cluster_size:.1f} images): the "
                f"k-reciprocal lists reach far into other identities; set config key 'cluster.k1' {suggestion} "
                f"(e.g. {max(4, round(1.5 * mean_cluster_size))})")
    return None


# Below this share of multi-camera clusters the pseudo labels split people by camera: 0.06-0.20
# on three held-out sets where same_camera_offset 0.3 then gave 0.30-0.62 and +1.5 to +8.5 mAP.
MIN_MULTI_CAMERA_SHARE = 0.25


def camera_advice(multi_camera_share: float | None, num_cameras: int, camera_centre: bool,
                  same_camera_offset: float) -> str | None:
    """A warning when few clusters span two or more cameras (None otherwise).

    Needs no identity labels: a cluster's cameras are known. When people cross cameras, a
    cluster confined to one camera holds one camera's share of an identity (or one camera's
    look-alikes), and the loss then pushes the same person's images in other cameras away."""
    if multi_camera_share is None or num_cameras < 2 or multi_camera_share >= MIN_MULTI_CAMERA_SHARE:
        return None
    if not camera_centre and not same_camera_offset:
        fix = ("add the recipe camera_robust to config key 'recipe' (it sets 'cluster.camera_centre' true and "
               "'cluster.same_camera_offset' 0.3, with per-image input standardisation and memory momentum 0.5), "
               "or set those two keys")
    else:
        fixes = [] if camera_centre else ["set config key 'cluster.camera_centre' to true"]
        fixes.append(f"raise 'cluster.same_camera_offset' (now {same_camera_offset}; recipe camera_robust sets 0.3)")
        fix = " and ".join(fixes)
    return (f"only {100 * multi_camera_share:.0f} % of the clusters span two or more of the {num_cameras} cameras: "
            f"the pseudo labels group images by camera. If people cross cameras in these data, {fix}")


def replacement_advice(labels: np.ndarray, num_instances: int) -> str | None:
    """A note when most classes have fewer images than a batch takes of each (train.num_instances):
    the sampler then draws their images with replacement, repeating images within a batch."""
    labels = np.asarray(labels)
    sizes = np.bincount(labels[labels >= 0])
    sizes = sizes[sizes > 0]
    short = int((sizes < num_instances).sum())
    if sizes.size == 0 or short <= sizes.size // 2:
        return None
    return (f"{short} of {sizes.size} classes have fewer than train.num_instances={num_instances} images (median "
            f"{int(np.median(sizes))}): the sampler draws their images with replacement, so a batch repeats them; "
            "lower config key 'train.num_instances' if that is not intended")
