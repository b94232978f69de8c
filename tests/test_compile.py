"""The training network under torch.compile (train.compile): group BatchNorm (bn_groups 4) traces
as one graph forward and backward, and the compiled step trains to the eager step's weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from purireid import VIEWS
from purireid.model.batchnorm import set_bn_groups
from purireid.model.network import build_model
from purireid.runtime.distributed import DistContext
from purireid.training.loop import StepSettings, compiled_network, train_one_epoch
from purireid.training.losses import view_weights
from purireid.training.terms import EpochTargets
from purireid.training.terms.memory import MemoryTerm


class _TinyMultiView(nn.Module):
    """The network's shape in small: conv + BatchNorm2d trunk, a BatchNorm1d neck per view."""

    feat_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.necks = nn.ModuleDict({v: nn.Sequential(nn.Linear(8, self.feat_dim, bias=False),
                                                     nn.BatchNorm1d(self.feat_dim)) for v in VIEWS})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        trunk = self.trunk(images)
        return {v: nn.functional.normalize(self.necks[v](trunk), dim=1) for v in VIEWS}


def _forward_backward(net: nn.Module, images: torch.Tensor) -> tuple[dict, dict]:
    out = net(images)
    sum((out[v] * (i + 1)).sum() for i, v in enumerate(VIEWS)).backward()
    return ({v: out[v].detach() for v in VIEWS},
            {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})


def test_group_batchnorm_traces_as_one_graph_forward_and_backward():
    torch.manual_seed(0)
    model = set_bn_groups(_TinyMultiView(), 4).train()
    images = torch.randn(8, 3, 8, 4)
    explained = torch._dynamo.explain(copy.deepcopy(model))(images)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)  # fails on a break
    out, grads = _forward_backward(compiled, images)
    eager_out, eager_grads = _forward_backward(model, images)
    for v in VIEWS:
        torch.testing.assert_close(out[v], eager_out[v])
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _trained(net_of, steps: int = 3) -> dict[str, torch.Tensor]:
    """The weights after `steps` steps of train_one_epoch (the memory term, bn_groups 4) of the
    network `net_of(model)` runs."""
    torch.manual_seed(1)
    model = set_bn_groups(_TinyMultiView(), 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    labels = np.repeat(np.arange(4), 4)
    features = {v: nn.functional.normalize(torch.randn(16, model.feat_dim), dim=1) for v in VIEWS}
    memory = MemoryTerm(temperature=0.05, rounds=4)
    memory.start_epoch(EpochTargets(labels, features, labels * 0, 4, 0.2, torch.device("cpu")))
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 3, 8, 4, generator=generator), torch.arange(16)) for _ in range(steps)]
    train_one_epoch(net_of(model), optimizer, batches, [memory], DistContext(), StepSettings(view_weights(0.2)))
    return {**{k: v.clone() for k, v in model.state_dict().items()}, "memory": memory.table.clone()}


def _assert_same_training(compiled: dict, eager: dict) -> None:
    for key, value in eager.items():
        if value.is_floating_point():
            torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(compiled[key], value), key


def test_the_traced_step_trains_to_the_eager_weights():
    eager = _trained(lambda model: model)
    _assert_same_training(_trained(lambda model: torch.compile(model, backend="aot_eager", fullgraph=True)), eager)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [True, "reduce-overhead"])
def test_the_compiled_step_trains_to_the_eager_weights(mode):
    """train.compile's modes with torch's own compiler (minutes on a CPU: it compiles C++)."""
    _assert_same_training(_trained(lambda model: compiled_network(model, mode)), _trained(lambda model: model))


@pytest.mark.slow
def test_resnet18_with_group_batchnorm_compiles_without_a_graph_break():
    torch.manual_seed(3)
    model = build_model("resnet18", "none", bn_groups=4).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, grads = _forward_backward(compiled, torch.randn(8, 3, 32, 16))
    assert set(out) == set(VIEWS) and len(grads) > 50 and all(torch.isfinite(g).all() for g in grads.values())


def test_eager_is_the_default():
    model = _TinyMultiView()
    assert compiled_network(model, False) is model
