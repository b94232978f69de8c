"""Group ("ghost") BatchNorm: training-mode statistics per group of batch / bn_groups images,
what each replica of the authors' 4-GPU DataParallel computed (model.bn_groups).

Per-group BatchNorm of a [B, C, *S] batch is GroupNorm with one channel per group on the
[g, C, n, *S] view of it (g groups of n samples: a transpose of the free [g, n, C, *S] view):
the statistics of every (group, channel) over its n images and *S positions are that view's
"group" statistics, and the affine parameters are per channel in both. So each direction is one
native kernel for all groups, plus the copy back to the input's layout, whatever the number of
groups (no per-group loop: the host issues the same handful of ops for every layer). The running
statistics are updated by torch's own kernel from group 0, exactly as a plain BatchNorm pass on
that group would.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "group_batch_norm", "set_bn_groups"]


def _one_dtype(device: torch.device) -> bool:
    """Whether torch's GroupNorm kernels on `device` need the data in the parameters' dtype (its
    CPU kernels take bf16 data with fp32 parameters; the others are not relied on to)."""
    return device.type != "cpu"


def _grouped(tensor: Tensor, groups: int) -> Tensor:
    """[B, C, *S] -> the [g, C, n, *S] view (g groups of n consecutive samples), any layout.

    Eagerly one strided view from the tensor's own strides. While torch.compile traces, the
    strides it sees come from the ops' stride rules, which a kernel may not follow (GroupNorm's
    backward returns a contiguous gradient where the rule says otherwise): there two view ops
    that mean the same whatever the strides."""
    if torch.compiler.is_compiling():
        return tensor.unflatten(0, (groups, -1)).transpose(1, 2)
    size, stride = list(tensor.shape), list(tensor.stride())
    n = size[0] // groups
    return tensor.as_strided([groups, size[1], n, *size[2:]], [n * stride[0], stride[1], stride[0], *stride[2:]])


def _ungrouped(values: Tensor, like: Tensor, groups: int) -> Tensor:
    """A [g, C, n, *S] result as a [B, C, *S] tensor in `like`'s dtype and memory format: one copy."""
    if (values.dtype == like.dtype and like.is_contiguous() and values.is_contiguous()
            and not torch.compiler.is_compiling()):
        g, c, n, *rest = values.shape
        copy = torch.as_strided_copy(values, [g, n, c, *rest],
                                     [values.stride(0), values.stride(2), values.stride(1), *values.stride()[3:]])
        # not a view for autograd: the caller may modify the output in place (ReLU(inplace=True))
        return torch.ops.aten._unsafe_view(copy, like.shape)
    out = torch.empty_like(like)
    _grouped(out, groups).copy_(values)
    return out


class _GroupBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor | None, bias: Tensor | None,  # noqa: A002
                groups: int, eps: float) -> Tensor:
        view = _grouped(input, groups)
        if weight is not None and view.dtype != weight.dtype and _one_dtype(view.device):
            # converted in the copy the kernel would make anyway (it reads a contiguous tensor)
            view = view.to(weight.dtype, memory_format=torch.contiguous_format)
        channels = input.shape[1]
        spread = input.numel() // (groups * channels)  # n images x *S positions per (group, channel)
        y, mean, rstd = torch.native_group_norm(view, weight, bias, groups, channels, spread, channels, eps)
        ctx.save_for_backward(view, weight, mean, rstd)
        ctx.groups, ctx.spread = groups, spread
        return _ungrouped(y, input, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        groups, channels = ctx.groups, x.shape[1]
        wants = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        dy = _grouped(grad_output, groups)
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype, memory_format=torch.contiguous_format)
        dx, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
            dy, x, mean, rstd, weight, groups, channels, ctx.spread, channels, wants)
        grad_input = _ungrouped(dx, grad_output, groups) if wants[0] else None
        return grad_input, grad_weight if wants[1] else None, grad_bias if wants[2] else None, None, None


def group_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,  # noqa: A002
                     weight: Tensor | None, bias: Tensor | None, groups: int, momentum: float,
                     eps: float) -> Tensor:
    """Training-mode ``F.batch_norm`` with statistics per group of ``batch / groups`` consecutive
    samples; the running statistics (updated in place, like F.batch_norm) come from the first
    group. ``input``: [B, C, *S] in any memory format, which the output keeps.

    Eight parameters: F.batch_norm's own (less `training`) plus the groups."""
    batch = input.shape[0]
    if batch % groups != 0:
        raise ValueError(f"a batch of {batch} is not divisible by bn_groups={groups}")
    if running_mean is not None:
        # torch's own update from group 0 (its momentum rule and unbiased variance): a plain
        # BatchNorm pass on that group, whose output is not needed (its kernel, unlike the
        # statistics-only one, also traces under torch.compile).
        torch.native_batch_norm(input[:batch // groups], None, None, running_mean, running_var, True, momentum, eps)
    return _GroupBatchNorm.apply(input, weight, bias, groups, eps)


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
