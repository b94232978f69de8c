"""Group ("ghost") BatchNorm: training-mode statistics per group of batch / bn_groups images,
what each replica of the authors' 4-GPU DataParallel computed (model.bn_groups).

The groups are the leading dimension of a [g, n, C, *S] view of the batch, which is free in
the contiguous and the channels_last layouts alike: the statistics come from the native
kernels on each group's slice, the output is one elementwise pass over the view (in the
input's memory format), and the backward runs the native BatchNorm backward per group.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "group_batch_norm", "set_bn_groups"]


def _per_channel(values: Tensor, ndim: int) -> Tensor:
    """[g, C] -> [g, 1, C, 1, ...]: broadcastable against the [g, n, C, *S] view of the batch."""
    return values.view(values.shape[0], 1, values.shape[1], *([1] * (ndim - 3)))


def _group_statistics(groups: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                      factor: float) -> tuple[Tensor, Tensor]:
    """Mean and biased variance, [g, C], of each group of the [g, n, C, *S] view; the running
    statistics (when given) are updated from group 0 by torch's own kernel (its momentum rule
    and the unbiased variance), i.e. exactly as a plain BatchNorm pass on group 0 would."""
    stats_dtype = torch.promote_types(groups.dtype, torch.float32)
    scratch: tuple[Tensor, Tensor] | None = None
    means, variances = [], []
    for k in range(groups.shape[0]):
        mean_buf, var_buf = (running_mean, running_var) if k == 0 else (None, None)
        if mean_buf is None and groups.dtype != stats_dtype:
            # Without fp32 buffers the kernel returns bf16/fp16 statistics; the buffers it
            # updates here are thrown away.
            if scratch is None:
                channels = groups.shape[2]
                scratch = (groups.new_zeros(channels, dtype=stats_dtype), groups.new_ones(channels, dtype=stats_dtype))
            mean_buf, var_buf = scratch
        mean, var = torch.batch_norm_update_stats(groups[k], mean_buf, var_buf, factor)
        means.append(mean)
        variances.append(var)
    return torch.stack(means), torch.stack(variances)


class _GroupBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor | None, bias: Tensor | None,  # noqa: A002
                running_mean: Tensor | None, running_var: Tensor | None, groups: int, factor: float,
                eps: float) -> Tensor:
        view = input.unflatten(0, (groups, -1))
        mean, var = _group_statistics(view, running_mean, running_var, factor)
        # 1 / sqrt(var + eps) in float64 as torch's CPU kernel has it (bit-equal outputs there)
        invstd = (var.double() + eps).sqrt().reciprocal().to(var.dtype)
        # y = x * scale + shift, per group and channel: one pass over the batch.
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1)
        output = torch.empty_like(input)
        torch.addcmul(_per_channel(shift, view.dim()), view, _per_channel(scale, view.dim()),
                      out=output.unflatten(0, (groups, -1)))
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.groups, ctx.eps = groups, eps
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        input, weight, mean, invstd = ctx.saved_tensors  # noqa: A001
        groups = ctx.groups
        wants = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        x, dy = input.unflatten(0, (groups, -1)), grad_output.unflatten(0, (groups, -1))
        # torch's own training-mode backward on each group (its statistics are the group's).
        parts = [torch.ops.aten.native_batch_norm_backward(dy[k], x[k], weight, None, None, mean[k], invstd[k],
                                                           True, ctx.eps, wants)
                 for k in range(groups)]
        grad_input = torch.cat([p[0] for p in parts]) if wants[0] else None
        grad_weight = torch.stack([p[1] for p in parts]).sum(0) if wants[1] else None
        grad_bias = torch.stack([p[2] for p in parts]).sum(0) if wants[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def group_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,  # noqa: A002
                     weight: Tensor | None, bias: Tensor | None, groups: int, momentum: float,
                     eps: float) -> Tensor:
    """Training-mode ``F.batch_norm`` with statistics per group of ``batch / groups`` consecutive
    samples; the running statistics (updated in place, like F.batch_norm) come from the first
    group. ``input``: [B, C, *S] in any memory format, which the output keeps."""
    batch = input.shape[0]
    if batch % groups != 0:
        raise ValueError(f"a batch of {batch} is not divisible by bn_groups={groups}")
    return _GroupBatchNorm.apply(input, weight, bias, running_mean, running_var, groups, momentum, eps)


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
        if input.shape[0] % g != 0:
            raise ValueError(
                f"{type(self).__name__}: batch of {input.shape[0]} is not divisible by bn_groups={g}"
            )
        # Same momentum bookkeeping as torch's _BatchNorm.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        running_mean, running_var = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return group_batch_norm(input, running_mean, running_var, self.weight, self.bias, g, factor, self.eps)


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
