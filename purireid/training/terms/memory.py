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
from purireid.training.losses import ClusterMemory, sequential_update_
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
        self.table: Tensor | None = None  # the views' tables stacked, [views, C + 1, D]
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
        # One stacked table, each view's memory a view of it: one update pass for all views
        # (same targets, momentum and rounds), the same arithmetic per row.
        self.table = torch.stack([self.memories[v].table for v in VIEWS])
        for i, v in enumerate(VIEWS):
            self.memories[v].table = self.table[i]

    def __call__(self, out: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        targets = self.labels[batch.indices]
        return {v: self.memories[v](out[v], targets) for v in VIEWS}

    def after_step(self, gathered: GatheredBatch) -> None:
        first = self.memories[VIEWS[0]]
        if first.momentum == 1.0:  # frozen: the memories stay bit-for-bit unchanged
            return
        features = torch.stack([gathered.features[v] for v in VIEWS])
        first.skipped += sequential_update_(self.table, features, self.labels[gathered.indices], first.momentum,
                                            self.rounds)

    def end_epoch(self) -> None:
        for memory in self.memories.values():
            memory.raise_if_rounds_overflowed("train.num_instances")
