"""The paper's loss: each view's cross-entropy against a memory of pseudo-identity centres
(cluster contrast, docs/method.md, Memories and losses). The memories are built at the start of every epoch from the class
centres of that epoch's labels and updated with every batch's features after the step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from purireid import VIEWS
from purireid.labels.cluster import cluster_centres
from purireid.training.losses import ClusterMemory
from purireid.training.terms.base import Batch, EpochTargets, GatheredBatch, LossTerm, check_labels_fit, labels_on


class MemoryTerm(LossTerm):
    """``ce_<view>``: cross-entropy of ``features @ memory.T / train.temperature`` against the labels."""

    name = "ce"

    def __init__(self, *, temperature: float, rounds: int) -> None:
        self.temperature = temperature
        # A batch holds at most train.num_instances images of one class (the sampler draws a
        # class's images together), so the sequential memory update takes that many rounds.
        self.rounds = rounds
        self.memories: dict[str, ClusterMemory] = {}
        self.labels: Tensor | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **_: Any) -> MemoryTerm:
        train = config["train"]
        return cls(temperature=train["temperature"], rounds=train["num_instances"])

    def start_epoch(self, targets: EpochTargets) -> None:
        check_labels_fit(targets.labels, targets.num_classes, "cluster memory")
        self.labels = labels_on(targets.device, targets.labels)
        self.memories = {v: ClusterMemory(cluster_centres(targets.labels, targets.features[v]).to(targets.device),
                                          temperature=self.temperature, momentum=targets.memory_momentum)
                         for v in VIEWS}

    def __call__(self, out: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        targets = self.labels[batch.indices]
        return {v: self.memories[v](out[v], targets) for v in VIEWS}

    def after_step(self, gathered: GatheredBatch) -> None:
        targets = self.labels[gathered.indices]
        for v in VIEWS:
            self.memories[v].update(gathered.features[v], targets, rounds=self.rounds)

    def end_epoch(self) -> None:
        for memory in self.memories.values():
            memory.raise_if_rounds_overflowed("train.num_instances")
