"""What a loss term is to the step loop: a named part of the training loss that computes one
value per view for a batch, is weighted inside each view's sum, and keeps its own state (a
memory, a teacher) up to date. The loop never knows a term by name."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from purireid import VIEWS


@dataclass(frozen=True)
class Batch:
    """One step's input as the terms see it: this rank's images (on the device, in the training
    memory format) and their indices into the train records."""

    images: Tensor
    indices: Tensor


@dataclass(frozen=True)
class GatheredBatch:
    """The whole global batch after the optimiser step, in batch order on every rank: each view's
    detached features and the train-record indices (what memory updates need)."""

    features: Mapping[str, Tensor]
    indices: Tensor


@dataclass(frozen=True)
class EpochTargets:
    """What the labelling step of an epoch gives the terms: a label per train record (-1 = left
    out), the features the labels came from ({view: float32 [N, D]}, CPU), the records' cameras,
    the memory momentum of this epoch (1.0 = frozen) and the training device."""

    labels: np.ndarray
    features: Mapping[str, Tensor]
    camids: np.ndarray
    num_classes: int
    memory_momentum: float
    device: torch.device


class LossTerm(abc.ABC):
    """A named part of the loss, one value per view.

    The loop sums, per view, ``weight × value`` of every term with a non-zero weight (in the
    registry's order), weights the views (docs/method.md, Memories and losses: 1 - lambda2, lambda2, lambda2) and logs each
    term's values as ``<name>_<view>``. A term with weight 0 is not computed and logs zeros.
    """

    #: Prefix of the term's log keys ("<name>_<view>").
    name: ClassVar[str]
    weight: float = 1.0

    def log_keys(self) -> list[str]:
        return [f"{self.name}_{v}" for v in VIEWS]

    def start_epoch(self, targets: EpochTargets) -> None:
        """Build the epoch's state (e.g. memories from the class centres); default: nothing."""

    @abc.abstractmethod
    def __call__(self, out: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """{view: scalar tensor} for this rank's batch (`out`: the model's float32 features)."""

    def after_step(self, gathered: GatheredBatch) -> None:
        """Update the term's state with the whole global batch, after the optimiser step."""

    def end_epoch(self) -> None:
        """Raise if the epoch's steps broke an assumption the term checks on the device."""


def weighted_view_sum(parts: Sequence[tuple[float, Mapping[str, Tensor]]],
                      view_weights: Mapping[str, float]) -> Tensor:
    """``sum over views of view_weight × (sum over parts of weight × value)``: the purification loss
    of docs/method.md, Memories and losses; Distillation when the parts are the memory cross-entropy (weight 1) and the distillation
    (weight mu). Parts are added in order, each view's first part unscaled when its weight is 1."""
    total = None
    for v in VIEWS:
        acc = None
        for weight, values in parts:
            term = values[v] if weight == 1.0 else weight * values[v]
            acc = term if acc is None else acc + term
        if acc is None:
            raise ValueError("no loss term is active")
        weighted = view_weights[v] * acc
        total = weighted if total is None else total + weighted
    return total


def check_labels_fit(labels: np.ndarray, num_classes: int, what: str) -> None:
    """Labels lie in -1..num_classes-1 (checked once per epoch on the host, not per step)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
        raise ValueError(f"{what}: labels {labels.min()}..{labels.max()} outside -1..{num_classes - 1}")


def labels_on(device: torch.device, labels: np.ndarray) -> Tensor:
    return torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)

