"""Where an epoch's training labels come from: pseudo labels by clustering, or given labels.

At the start of every epoch the trainer asks a `LabelSource` for one label per train record
(-1 = left out of this epoch) and builds one cluster memory per view from those labels and
the epoch's features (docs/method.md, Memories and losses):

- `PseudoLabels`: fused k-reciprocal Jaccard distance + DBSCAN (docs/method.md, Pseudo labels) of the model's
  current features, or of fixed features given once (the student's epoch -1 clusters the
  teacher's features, docs/method.md, Distillation);
- `TrueLabels`: fixed labels given once, e.g. the train split's identities, for a supervised
  reference or supervised pretraining on a labelled source dataset.

Pure: no files, no devices, no processes; the trainer extracts features, calls `assign` on
rank 0, broadcasts the labels and calls `check` on every rank.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from purireid import VIEWS
from purireid.labels.cluster import ClusterSettings, pseudo_labels
from purireid.labels.diagnostics import camera_advice, k1_advice


class DegenerateLabels(RuntimeError):
    """An epoch's labels have too few classes to fill a training batch."""


class DegenerateClustering(DegenerateLabels):
    """DBSCAN produced too few clusters to fill a training batch."""


def count_classes(labels: np.ndarray) -> int:
    """Number of classes of labels 0..C-1 (-1 = left out)."""
    labels = np.asarray(labels)
    return int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0


def classes_per_batch(config: Mapping[str, Any]) -> int:
    """Identities one batch samples: train.batch_size / train.num_instances."""
    return config["train"]["batch_size"] // config["train"]["num_instances"]


def check_clusters(labels: np.ndarray, config: Mapping[str, Any], epoch: int) -> int:
    """Number of clusters; a clear error, with the cluster.eps advice, when they cannot fill a batch."""
    num_clusters = count_classes(labels)
    train = config["train"]
    needed = classes_per_batch(config)
    eps = config["cluster"]["eps"]
    outliers = int((np.asarray(labels) < 0).sum())
    if num_clusters >= needed:
        return num_clusters
    if num_clusters == 0 or outliers > labels.size / 2:
        advice = (f"most images are outliers: raise config key 'cluster.eps' (now {eps}, try {eps + 0.1:.2f}) "
                  "or lower 'cluster.min_samples'")
    else:
        advice = (f"clusters merged: lower config key 'cluster.eps' (now {eps}, try {max(eps - 0.1, 0.05):.2f})")
    raise DegenerateClustering(
        f"epoch {epoch}: DBSCAN found {num_clusters} clusters ({outliers} of {labels.size} images outliers), "
        f"but a batch of train.batch_size={train['batch_size']} with train.num_instances={train['num_instances']} "
        f"needs {needed} pseudo-identities; {advice}, or lower train.batch_size / raise train.num_instances"
    )


class LabelSource(abc.ABC):
    """One label per train record for an epoch; the memories are built from these labels.

    Subclasses set `role` and implement `assign`, `check` and `fingerprint`. `features` is
    None when labels and memories come from the model's current eval-mode features
    (extracted at the start of every epoch); otherwise it holds fixed features
    ({view: float32 [N, D]}, rows in train-record order) used instead, and nothing is
    extracted.
    """

    #: What a model trained from this source alone is called (logs, the checkpoint's 'role').
    role: str = "model"
    features: Mapping[str, torch.Tensor] | None = None

    @abc.abstractmethod
    def assign(self, features: Mapping[str, torch.Tensor], *, epoch: int) -> np.ndarray:
        """int64 [N]: class 0..C-1 of every train record, -1 = left out this epoch (rank 0 only)."""

    @abc.abstractmethod
    def check(self, labels: np.ndarray, *, epoch: int) -> int:
        """Number of classes C; raises DegenerateLabels when they cannot fill a batch (every rank)."""

    @abc.abstractmethod
    def fingerprint(self) -> Any:
        """JSON-able identity of the source, part of the resume fingerprint."""

    def advice(self, diagnostics: Mapping[str, Any]) -> list[str]:
        """Warnings about the first epoch's labels (`diagnostics`: purireid.labels.diagnostics.
        label_diagnostics of them), naming the config keys to change; none by default."""
        return []


def camera_centred(features: torch.Tensor, camids: np.ndarray | Sequence[int]) -> torch.Tensor:
    """Features with each camera's mean feature subtracted, then L2-normalised again.

    An untrained or source-trained network sees a camera's colour cast and background before
    the person, so raw features group by camera; removing each camera's mean (per view)
    before the Jaccard distance lets neighbours cross cameras. Measured: cluster
    purity 0.40 -> 0.77 from random weights on a held-out 6-camera set.
    """
    camids_t = torch.as_tensor(np.asarray(camids), dtype=torch.long, device=features.device)
    if camids_t.shape[0] != features.shape[0]:
        raise ValueError(f"{camids_t.shape[0]} camera ids for {features.shape[0]} feature rows")
    x = features.float()
    _, codes = torch.unique(camids_t, return_inverse=True)
    sums = torch.zeros(int(codes.max()) + 1, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, codes, x)
    means = sums / torch.bincount(codes).unsqueeze(1).to(x.dtype)
    return torch.nn.functional.normalize(x - means[codes], dim=1)


class PseudoLabels(LabelSource):
    """Pseudo labels of the three views' features (fused Jaccard distance + DBSCAN, docs/method.md),
    with the config's `cluster` section; `features`: fixed features to cluster instead of the
    model's current ones (the student's warm-up epoch on the teacher's features).

    With `cluster.camera_centre` each view's features are camera-centred (`camera_centred`,
    `camids`: the train records' cameras) before the distance; the memories are still built
    from the features themselves. `cluster.same_camera_offset` raises same-camera distances
    before the k-reciprocal lists (`pseudo_labels`)."""

    role = "teacher"

    @classmethod
    def from_config(cls, config: Mapping[str, Any], records: Sequence[Any], *,
                    features: Mapping[str, torch.Tensor] | None = None) -> PseudoLabels:
        """Pseudo labels of `records` (the train split; their cameras feed the camera options)."""
        return cls(config, features=features, camids=np.array([r.camid for r in records], dtype=np.int64))

    def __init__(self, config: Mapping[str, Any], *, features: Mapping[str, torch.Tensor] | None = None,
                 camids: np.ndarray | Sequence[int] | None = None) -> None:
        self.cluster = dict(config["cluster"])
        self.config = config
        self.features = features
        self.camids = None if camids is None else np.asarray(camids, dtype=np.int64)
        for key in ("camera_centre", "same_camera_offset"):
            if self.cluster.get(key) and self.camids is None:
                raise ValueError(f"cluster.{key} needs the train records' camera ids (camids=...)")

    def assign(self, features: Mapping[str, torch.Tensor], *, epoch: int) -> np.ndarray:
        cluster = self.cluster
        views = [features[v] for v in VIEWS]
        if cluster.get("camera_centre"):
            views = [camera_centred(torch.as_tensor(f), self.camids) for f in views]
        return pseudo_labels(views, ClusterSettings.from_config(cluster), camids=self.camids)

    def check(self, labels: np.ndarray, *, epoch: int) -> int:
        return check_clusters(labels, self.config, epoch)

    def advice(self, diagnostics: Mapping[str, Any]) -> list[str]:
        cluster = self.cluster
        num_cameras = len(np.unique(self.camids)) if self.camids is not None else 0
        found = (k1_advice(cluster["k1"], cluster["eps"], diagnostics["mean_cluster_size"]),
                 camera_advice(diagnostics["multi_camera_share"], num_cameras, cluster["camera_centre"],
                               cluster["same_camera_offset"]))
        return [a for a in found if a]

    def fingerprint(self) -> Any:
        return {"labels": "pseudo", "cluster": self.cluster, "fixed_features": self.features is not None}


class TrueLabels(LabelSource):
    """Fixed labels, e.g. the pids of the train records: relabelled 0..C-1 in sorted order
    (negative labels stay -1, left out); the same every epoch."""

    role = "supervised"

    def __init__(self, labels: Sequence[int] | np.ndarray, *, batch_size: int, num_instances: int,
                 features: Mapping[str, torch.Tensor] | None = None) -> None:
        raw = np.asarray(labels, dtype=np.int64).reshape(-1)
        coded = np.full(raw.shape, -1, dtype=np.int64)
        kept = raw >= 0
        _, coded[kept] = np.unique(raw[kept], return_inverse=True)
        self.labels = coded
        self.needed = batch_size // num_instances
        self.batch_size, self.num_instances = batch_size, num_instances
        self.features = features

    @classmethod
    def from_pids(cls, pids: Sequence[int] | np.ndarray, config: Mapping[str, Any], *,
                  features: Mapping[str, torch.Tensor] | None = None) -> TrueLabels:
        """The identities as labels, with the config's train.batch_size / train.num_instances."""
        return cls(pids, batch_size=config["train"]["batch_size"], num_instances=config["train"]["num_instances"],
                   features=features)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], records: Sequence[Any], *,
                    features: Mapping[str, torch.Tensor] | None = None) -> TrueLabels:
        """The identities of `records` as labels."""
        return cls.from_pids([r.pid for r in records], config, features=features)

    def assign(self, features: Mapping[str, torch.Tensor], *, epoch: int) -> np.ndarray:
        if len(self.labels) != len(next(iter(features.values()))):
            raise ValueError(f"{len(self.labels)} true labels for {len(next(iter(features.values())))} train records")
        return self.labels.copy()

    def check(self, labels: np.ndarray, *, epoch: int) -> int:
        num_classes = count_classes(labels)
        if num_classes < self.needed:
            raise DegenerateLabels(
                f"epoch {epoch}: the labels have {num_classes} classes, but a batch of train.batch_size="
                f"{self.batch_size} with train.num_instances={self.num_instances} needs {self.needed}; "
                "lower train.batch_size or raise train.num_instances")
        return num_classes

    def fingerprint(self) -> Any:
        return {"labels": "true", "sha256": hashlib.sha256(self.labels.tobytes()).hexdigest()}


# Label sources by name. cluster.method picks one of the pseudo-label methods for the teacher and
# the student (and for the student's warm-up on the teacher's features); their names, the schema's
# choices, and their config checks are purireid.labels.methods (light: read when the workflow is
# parsed), which these keys match. The supervised stages use "true_identities". A new method is a
# module with a LabelSource subclass (with `from_config`), one line here and its entry there.
PSEUDO_LABEL_METHODS: dict[str, Any] = {
    "multiview_dbscan": PseudoLabels,
}
LABEL_SOURCES: dict[str, Any] = {**PSEUDO_LABEL_METHODS, "true_identities": TrueLabels}


def label_source(name: str, config: Mapping[str, Any], records: Sequence[Any], *,
                 features: Mapping[str, torch.Tensor] | None = None) -> LabelSource:
    """The registered source `name` for the train `records` (`features`: fixed features to label
    instead of the model's current ones)."""
    if name not in LABEL_SOURCES:
        raise ValueError(f"unknown label source {name!r} (known: {', '.join(sorted(LABEL_SOURCES))})")
    return LABEL_SOURCES[name].from_config(config, records, features=features)
