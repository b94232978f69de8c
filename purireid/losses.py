"""Cluster-contrast memory, distillation and the fused purification loss (SPEC §4-§5)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from purireid import VIEWS

__all__ = ["ClusterMemory", "distillation_loss", "purification_loss", "view_weights"]


class ClusterMemory(nn.Module):
    """One view's memory of cluster centres (SPEC §4).

    ``forward(features, targets)``: cross-entropy of ``features @ memory.T / temperature``
    against the pseudo labels; the memory gets no gradient (it is a buffer).
    ``update(features, targets)``: momentum update, sample by sample in batch order:
    ``m_y <- momentum * m_y + (1 - momentum) * x``, then ``m_y <- m_y / |m_y|``.
    ``momentum == 1.0`` freezes the memory (the student's epoch -1).
    """

    memory: Tensor

    def __init__(self, centres: Tensor, temperature: float = 0.05, momentum: float = 0.1) -> None:
        super().__init__()
        if centres.ndim != 2 or centres.shape[0] == 0:
            raise ValueError(f"centres must be a non-empty [C, D] tensor, got {tuple(centres.shape)}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.register_buffer("memory", centres.detach().clone().float())

    @property
    def num_clusters(self) -> int:
        return int(self.memory.shape[0])

    def logits(self, features: Tensor) -> Tensor:
        return features.float() @ self.memory.T / self.temperature

    def forward(self, features: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(features), targets.to(self.memory.device).long())

    @torch.no_grad()
    def update(self, features: Tensor, targets: Tensor) -> None:
        if self.momentum == 1.0:  # frozen: leave the memory bit-for-bit unchanged
            return
        x = features.detach().to(device=self.memory.device, dtype=self.memory.dtype)
        y = targets.detach().to(self.memory.device).long()
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} features but {y.shape[0]} targets")
        if x.shape[0] == 0:
            return
        if int(y.min()) < 0 or int(y.max()) >= self.num_clusters:
            raise ValueError(f"targets must lie in [0, {self.num_clusters}), got {y.min()}..{y.max()}")
        # The sequential update only chains samples that share a label; different labels
        # touch different rows and commute. So process "rounds": round r updates, in one
        # batched step, the r-th occurrence (in batch order) of every label. Same
        # arithmetic per row as the sample-by-sample loop; rounds = max multiplicity
        # (16 for a 16 x 16 batch) instead of 256 steps.
        occurrence = _occurrence_rank(y)
        mu = self.momentum
        for r in range(int(occurrence.max()) + 1):
            sel = (occurrence == r).nonzero(as_tuple=True)[0]
            rows = y[sel]  # unique within a round
            m = self.memory[rows] * mu + x[sel] * (1.0 - mu)
            self.memory[rows] = m / m.norm(dim=1, keepdim=True)


def _occurrence_rank(y: Tensor) -> Tensor:
    """For each position i, how many j < i have y[j] == y[i]."""
    n = y.shape[0]
    order = torch.sort(y, stable=True).indices  # same labels together, batch order kept
    ys = y[order]
    pos = torch.arange(n, device=y.device)
    new_run = torch.ones(n, dtype=torch.bool, device=y.device)
    new_run[1:] = ys[1:] != ys[:-1]
    run_start = torch.cummax(torch.where(new_run, pos, torch.zeros_like(pos)), dim=0).values
    rank = torch.empty_like(pos)
    rank[order] = pos - run_start
    return rank


def distillation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Batch mean of the squared L2 distance ``|s - t|^2`` (SPEC §5). No gradient to the teacher."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    diff = student.float() - teacher.detach().float()
    return diff.pow(2).sum(dim=1).mean()


def view_weights(lambda2: float = 0.2) -> dict[str, float]:
    """``(1 - lambda2, lambda2, lambda2)``: sums to 1 + lambda2, as in the released code."""
    return {"global": 1.0 - lambda2, "upper": lambda2, "lower": lambda2}


def purification_loss(
    ce: Mapping[str, Tensor],
    distill: Mapping[str, Tensor] | None = None,
    *,
    lambda2: float = 0.2,
    mu: float = 1.0,
) -> Tensor:
    """``(1-l2)(CE_g + mu D_g) + l2 (CE_u + mu D_u) + l2 (CE_l + mu D_l)`` (SPEC §4-§5).

    ``distill=None`` gives the teacher loss (``mu`` is then unused).
    """
    for name, terms in (("ce", ce), ("distill", distill)):
        if terms is not None and set(terms) != set(VIEWS):
            raise ValueError(f"{name} must have exactly the views {VIEWS}, got {sorted(terms)}")
    weights = view_weights(lambda2)
    total = None
    for v in VIEWS:
        term = ce[v] if distill is None else ce[v] + mu * distill[v]
        total = weights[v] * term if total is None else total + weights[v] * term
    return total
