"""Camera-robust training (opt-in, train.camera_proxy > 0): an inter-camera term after CAP
(Wang et al., AAAI 2021). Each epoch one proxy per (pseudo-identity, camera) pair is built from
those images' features; an image is pulled towards its identity's proxy in every camera against
the hardest other identities' proxies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from purireid import VIEWS
from purireid.labels.cluster import cluster_centres
from purireid.training.losses import CameraProxyMemory, camera_proxy_labels
from purireid.training.terms.base import Batch, EpochTargets, GatheredBatch, LossTerm, labels_on

# Hard negatives per image: CAP's setting.
HARD_NEGATIVES = 50


class CameraProxyTerm(LossTerm):
    """``camproxy_<view>``, weighted by train.camera_proxy inside each view's sum."""

    name = "camproxy"

    def __init__(self, *, weight: float, temperature: float, rounds: int) -> None:
        self.weight = weight
        self.temperature = temperature
        self.rounds = rounds
        self.proxies: dict[str, CameraProxyMemory] = {}
        self.labels: Tensor | None = None
        self.proxy_labels: Tensor | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **_: Any) -> CameraProxyTerm | None:
        train = config["train"]
        if train["camera_proxy"] <= 0:
            return None
        return cls(weight=train["camera_proxy"], temperature=train["temperature"], rounds=train["num_instances"])

    def start_epoch(self, targets: EpochTargets) -> None:
        proxy_labels, proxy_classes, _ = camera_proxy_labels(targets.labels, targets.camids)
        self.labels = labels_on(targets.device, targets.labels)
        self.proxy_labels = labels_on(targets.device, proxy_labels)
        self.proxies = {v: CameraProxyMemory(cluster_centres(proxy_labels, targets.features[v]).to(targets.device),
                                             proxy_classes, temperature=self.temperature,
                                             momentum=targets.memory_momentum, hard_negatives=HARD_NEGATIVES)
                        for v in VIEWS}

    def __call__(self, out: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        targets = self.labels[batch.indices]
        return {v: self.proxies[v](out[v], targets) for v in VIEWS}

    def after_step(self, gathered: GatheredBatch) -> None:
        proxy_targets = self.proxy_labels[gathered.indices]
        for v in VIEWS:
            self.proxies[v].update(gathered.features[v], proxy_targets, rounds=self.rounds)

    def end_epoch(self) -> None:
        for proxies in self.proxies.values():
            proxies.proxies.raise_if_rounds_overflowed("train.num_instances")
