"""The loss terms the step loop sums, registered by name. A new term is a module with a
`LossTerm` subclass and one line in LOSS_TERMS; its `from_config` returns None when the run
does not use it. The registry's order is the order of the per-view sum (docs/method.md, Memories and losses; Distillation: the memory
cross-entropy, then the opt-in camera proxies, then the distillation)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from purireid.training.terms.base import Batch, EpochTargets, GatheredBatch, LossTerm, weighted_view_sum
from purireid.training.terms.camera_proxy import CameraProxyTerm
from purireid.training.terms.distillation import DistillationTerm
from purireid.training.terms.memory import MemoryTerm

LOSS_TERMS: dict[str, type[LossTerm]] = {cls.name: cls for cls in (
    MemoryTerm,
    CameraProxyTerm,
    DistillationTerm,
)}


def build_terms(config: Mapping[str, Any], *, teacher: Any = None) -> list[LossTerm]:
    """The run's terms, in registry order (`teacher`: the student's TeacherGuidance, else None)."""
    terms = [cls.from_config(config, teacher=teacher) for cls in LOSS_TERMS.values()]
    return [t for t in terms if t is not None]


__all__ = ["Batch", "EpochTargets", "GatheredBatch", "LOSS_TERMS", "LossTerm", "build_terms", "weighted_view_sum"]
