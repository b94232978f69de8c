"""The group BatchNorm that purireid.model.batchnorm replaced (the reshape trick), kept as the
reference of tests/test_batchnorm.py and benchmarks/bench_batchnorm.py.

Each BN input [g*n, C, *S] is copied into [n, g*C, *S], so that one plain F.batch_norm call
computes g independent sets of statistics (channel k*C + c is channel c of group k), and the
output is copied back: a copy in and out per layer (a full transpose for channels_last).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from purireid.model.batchnorm import _GhostBatchNorm


def reshape_forward(module: _GhostBatchNorm, input: Tensor) -> Tensor:  # noqa: A002
    """_GhostBatchNorm.forward as it was before the copy-free implementation."""
    g = int(module.bn_groups)
    if g == 1 or not module.training:
        return super(_GhostBatchNorm, module).forward(input)
    module._check_input_dim(input)
    b = input.shape[0]
    if b % g != 0:
        raise ValueError(f"{type(module).__name__}: batch of {b} is not divisible by bn_groups={g}")
    n, c = b // g, input.shape[1]
    rest = input.shape[2:]
    factor = 0.0 if module.momentum is None else module.momentum
    if module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            factor = 1.0 / float(module.num_batches_tracked)
    x = input.reshape(g, n, c, *rest).transpose(0, 1).reshape(n, g * c, *rest)
    weight = module.weight.repeat(g) if module.weight is not None else None
    bias = module.bias.repeat(g) if module.bias is not None else None
    if module.track_running_stats:
        rm = module.running_mean.repeat(g)
        rv = module.running_var.repeat(g)
    else:
        rm = rv = None
    y = F.batch_norm(x, rm, rv, weight, bias, True, factor, module.eps)
    if rm is not None:
        with torch.no_grad():
            module.running_mean.copy_(rm[:c])
            module.running_var.copy_(rv[:c])
    return y.reshape(n, g, c, *rest).transpose(0, 1).reshape(input.shape)


@contextlib.contextmanager
def reshape_implementation() -> Iterator[None]:
    """Within the block every ghost BatchNorm runs the reference (reshape) implementation."""
    current = _GhostBatchNorm.forward
    _GhostBatchNorm.forward = reshape_forward
    try:
        yield
    finally:
        _GhostBatchNorm.forward = current
