"""Group ("ghost") BatchNorm: training-mode statistics per group of batch / bn_groups images,
what each replica of the authors' 4-GPU DataParallel computed (model.bn_groups)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "set_bn_groups"]


class _GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are computed per contiguous group.

    With ``bn_groups = g`` a batch of B samples is split into g groups of B/g; each group
    is normalised with its own batch statistics (as each GPU's replica does under
    DataParallel). Running statistics are updated from the first group only, which is
    what DataParallel (replica 0 holds the real buffers) and DDP with broadcast_buffers
    (rank 0's buffers win) end up keeping. Eval mode, or g = 1, is plain BatchNorm.
    The state_dict layout is that of the parent class.
    """

    bn_groups: int = 1

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's name
        g = int(self.bn_groups)
        if g == 1 or not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        b = input.shape[0]
        if b % g != 0:
            raise ValueError(
                f"{type(self).__name__}: batch of {b} is not divisible by bn_groups={g}"
            )
        n, c = b // g, input.shape[1]
        rest = input.shape[2:]

        # Same momentum bookkeeping as torch's _BatchNorm.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)

        # Reshape trick: [g*n, C, *S] -> [n, g*C, *S], so that one ordinary batch_norm
        # call computes g independent sets of statistics (channel k*C + c is channel c
        # of group k). One copy in, one copy out, no Python loop over groups.
        x = input.reshape(g, n, c, *rest).transpose(0, 1).reshape(n, g * c, *rest)
        weight = self.weight.repeat(g) if self.weight is not None else None
        bias = self.bias.repeat(g) if self.bias is not None else None
        if self.track_running_stats:
            # Every group starts from the same running stats; keep group 0's update.
            rm = self.running_mean.repeat(g)
            rv = self.running_var.repeat(g)
        else:
            rm = rv = None
        y = F.batch_norm(x, rm, rv, weight, bias, True, factor, self.eps)
        if rm is not None:
            with torch.no_grad():
                self.running_mean.copy_(rm[:c])
                self.running_var.copy_(rv[:c])
        return y.reshape(n, g, c, *rest).transpose(0, 1).reshape(input.shape)


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with ``bn_groups`` (see :class:`_GhostBatchNorm`)."""


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with ``bn_groups`` (see :class:`_GhostBatchNorm`)."""


def _convert_bn(module: nn.Module) -> None:
    """Turn every BatchNorm1d/2d under ``module`` into its ghost twin, in place.

    Only the class changes (the ghost classes add no state), so parameters keep their
    identity: an optimiser built before the conversion still holds the right tensors.
    """
    for m in module.modules():
        if isinstance(m, _GhostBatchNorm):
            continue
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GhostBatchNorm2d
        elif type(m) is nn.BatchNorm1d:
            m.__class__ = GhostBatchNorm1d


def set_bn_groups(model: nn.Module, n: int) -> nn.Module:
    """Set the number of ghost-BN groups of every BatchNorm in ``model`` (in place).

    Plain ``nn.BatchNorm1d/2d`` modules are converted first, so this also works on a
    model that was not built by :func:`build_model`. Returns ``model``.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"bn_groups must be >= 1, got {n}")
    _convert_bn(model)
    for m in model.modules():
        if isinstance(m, _GhostBatchNorm):
            m.bn_groups = n
    return model
