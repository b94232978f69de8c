"""The student's distillation towards its teacher (docs/method.md, Distillation): per view, the batch mean of the
squared distance between the student's and the teacher's features of the same images, weighted
by student.mu. The teacher runs in train or eval mode (student.teacher_mode) without gradients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from purireid import VIEWS
from purireid.runtime.precision import autocast_context
from purireid.training.losses import distillation_loss
from purireid.training.terms.base import Batch, EpochTargets, LossTerm


class DistillationTerm(LossTerm):
    """``distill_<view>``; present for every student (logged as 0 when student.mu is 0)."""

    name = "distill"

    def __init__(self, teacher_model: torch.nn.Module, *, weight: float, teacher_mode: str, amp: bool) -> None:
        self.teacher_model = teacher_model
        self.weight = weight
        self.teacher_mode = teacher_mode
        self.amp = amp

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, teacher: Any = None, **_: Any) -> DistillationTerm | None:
        if teacher is None:
            return None
        student = config["student"]
        return cls(teacher.model, weight=student["mu"], teacher_mode=student["teacher_mode"],
                   amp=config["train"]["amp"])

    def start_epoch(self, targets: EpochTargets) -> None:
        self.teacher_model.train(self.teacher_mode == "train")

    def __call__(self, out: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        with torch.no_grad(), autocast_context(batch.images.device, self.amp):
            teacher_out = self.teacher_model(batch.images)
        return {v: distillation_loss(out[v], teacher_out[v].float()) for v in VIEWS}
