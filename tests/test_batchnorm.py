"""Group BatchNorm (model.bn_groups) in a fixed handful of ops per layer: equal to the reshape
implementation of the released code's DataParallel replicas (tests/batchnorm_reference.py) to
float rounding, in both memory layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from batchnorm_reference import reshape_implementation
from purireid import VIEWS
from purireid.model import batchnorm
from purireid.model.batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, group_batch_norm
from purireid.model.network import build_model

torch.set_num_threads(min(2, torch.get_num_threads()))

SHAPES = {"2d": (GhostBatchNorm2d, (16, 6, 5, 3)), "1d": (GhostBatchNorm1d, (16, 7)),
          "1d-seq": (GhostBatchNorm1d, (16, 4, 5))}


def _module(kind: str, groups: int, momentum: float | None, dtype=torch.float32) -> tuple[nn.Module, torch.Size]:
    cls, shape = SHAPES[kind]
    torch.manual_seed(11)
    bn = cls(shape[1], momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    bn.bn_groups = groups
    return bn, torch.Size(shape)


def _pass(bn: nn.Module, x: torch.Tensor, dy: torch.Tensor, steps: int = 2) -> dict:
    """`steps` training passes (the running statistics move twice), the last one backpropagated."""
    bn = bn.train()
    for _ in range(steps - 1):
        bn(x)
    xi = x.detach().clone().requires_grad_(True)
    y = bn(xi)
    y.backward(dy)
    return {"out": y.detach(), "grad_input": xi.grad, "grad_weight": bn.weight.grad, "grad_bias": bn.bias.grad,
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
            "num_batches_tracked": bn.num_batches_tracked.clone()}


def _both(kind: str, groups: int, momentum: float | None, layout: torch.memory_format, dtype=torch.float32,
          input_dtype=None) -> tuple[dict, dict, torch.Tensor]:
    bn, shape = _module(kind, groups, momentum, dtype)
    ref_bn, _ = _module(kind, groups, momentum, dtype)
    x = (torch.randn(shape, dtype=dtype) * 3 + 1).to(input_dtype or dtype)
    dy = torch.randn(shape, dtype=dtype).to(input_dtype or dtype)
    if len(shape) == 4:
        x, dy = x.contiguous(memory_format=layout), dy.contiguous(memory_format=layout)
    new = _pass(bn, x, dy)
    with reshape_implementation():
        ref = _pass(ref_bn, x, dy)
    return new, ref, x


# channels_last is a 4-d layout: the 1d BatchNorms' inputs have one
LAYOUTS = [("2d", torch.contiguous_format), ("2d", torch.channels_last), ("1d", torch.contiguous_format),
           ("1d-seq", torch.contiguous_format)]


@pytest.mark.parametrize(("kind", "layout"), LAYOUTS, ids=["2d", "2d-channels_last", "1d", "1d-seq"])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_equals_the_reshape_implementation(kind, groups, momentum, layout):
    new, ref, x = _both(kind, groups, momentum, layout)
    for key, value in ref.items():
        if groups == 1:  # plain BatchNorm, as before: bit for bit
            assert torch.equal(new[key], value), key
        else:
            torch.testing.assert_close(new[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert int(new["num_batches_tracked"]) == 2
    if x.dim() == 4:  # the output and the gradient keep the input's layout
        assert new["out"].is_contiguous(memory_format=layout)
        assert new["grad_input"].is_contiguous(memory_format=layout)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_float64(layout):
    new, ref, _ = _both("2d", 4, 0.1, layout, dtype=torch.float64)
    for key, value in ref.items():
        assert new[key].dtype == value.dtype, key
        torch.testing.assert_close(new[key], value, rtol=1e-12, atol=1e-12, msg=key)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_bf16_input_fp32_parameters(layout):
    """What bf16 autocast hands a BatchNorm on CUDA (bf16 activations, fp32 parameters and
    buffers): statistics and arithmetic in fp32, output and input gradient in bf16."""
    new, ref, _ = _both("2d", 4, 0.1, layout, input_dtype=torch.bfloat16)
    assert new["out"].dtype == new["grad_input"].dtype == torch.bfloat16
    assert new["running_mean"].dtype == new["grad_weight"].dtype == torch.float32
    for key in ("running_mean", "running_var", "grad_weight", "grad_bias"):
        torch.testing.assert_close(new[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)
    for key in ("out", "grad_input"):  # both rounded once from fp32: at most one bf16 step apart
        torch.testing.assert_close(new[key].float(), ref[key].float(), rtol=2 ** -7, atol=1e-2, msg=key)


class _FullSizeOps(TorchDispatchMode):
    """The aten ops, in order, that write a tensor of at least `numel` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(r, torch.Tensor) and r.numel() >= self.numel for r in results):
            self.ops.append(func.overloadpacket.__name__)
        return out


def _layer_ops(groups: int, layout: torch.memory_format) -> tuple[list, list, list]:
    """One layer's forward and backward: every aten op, and those writing a full-size tensor."""
    bn, shape = _module("2d", groups, 0.1)
    x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_(True)
    with _FullSizeOps(0) as every, _FullSizeOps(x.numel()) as forward:
        y = bn.train()(x)
    grad = torch.ones_like(y)
    with _FullSizeOps(0) as every_backward, _FullSizeOps(x.numel()) as backward:
        y.backward(grad)
    return every.ops + every_backward.ops, forward.ops, backward.ops


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_the_same_few_ops_for_any_number_of_groups(layout):
    """All groups in one native kernel each way, plus one copy back to the input's layout: the
    ops a layer dispatches do not grow with the groups (no per-group loop)."""
    ops2, forward, backward = _layer_ops(2, layout)
    ops4, forward4, backward4 = _layer_ops(4, layout)
    assert ops2 == ops4 and forward == forward4 and backward == backward4
    free = ("as_strided", "_unsafe_view", "detach", "empty_like")  # views and allocations
    copy = "as_strided_copy" if layout == torch.contiguous_format else "copy_"
    assert [op for op in forward if op not in free] == ["native_group_norm", copy], forward
    assert [op for op in backward if op not in free] == ["native_group_norm_backward", copy], backward
    plain, _, _ = _layer_ops(1, layout)
    assert len(ops4) <= len(plain) + (7 if layout == torch.contiguous_format else 9), (ops4, plain)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_bf16_data_converted_for_kernels_of_one_dtype(monkeypatch, layout):
    """Where GroupNorm's kernels take one dtype (an accelerator's), bf16 activations are converted
    to the fp32 parameters' dtype and the results back: the same values as the mixed-dtype kernel."""
    mixed, _, _ = _both("2d", 4, 0.1, layout, input_dtype=torch.bfloat16)
    monkeypatch.setattr(batchnorm, "_one_dtype", lambda device: True)
    converted, _, _ = _both("2d", 4, 0.1, layout, input_dtype=torch.bfloat16)
    for key, value in mixed.items():
        assert converted[key].dtype == value.dtype, key
        torch.testing.assert_close(converted[key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert converted["out"].is_contiguous(memory_format=layout)


def test_indivisible_batch_names_bn_groups():
    with pytest.raises(ValueError, match="bn_groups=4"):
        group_batch_norm(torch.randn(6, 3), None, None, None, None, 4, 0.1, 1e-5)


def test_resnet_channels_last_matches_the_reshape_implementation():
    """A whole ResNet-18 step in float64 (in float32 the 2-image groups of the deepest layers
    amplify rounding: both implementations are then ~1e-4 off the float64 result)."""
    torch.manual_seed(12)
    model = build_model("resnet18", "none", bn_groups=4).train().double().to(memory_format=torch.channels_last)
    reference = build_model("resnet18", "none", bn_groups=4).train().double().to(memory_format=torch.channels_last)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 3, 32, 16, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out = model(x)
    sum((o * (i + 1)).sum() for i, o in enumerate(out.values())).backward()
    with reshape_implementation():
        ref = reference(x)
        sum((o * (i + 1)).sum() for i, o in enumerate(ref.values())).backward()
    for v in VIEWS:
        torch.testing.assert_close(out[v], ref[v], rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9, msg=name)
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12, msg=name)
