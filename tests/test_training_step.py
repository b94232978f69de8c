"""The step loop (purireid.training.loop.train_one_epoch) with every loss term on: nothing is read
back from the device inside it, and a non-finite loss still stops the run with the epoch and step."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import purireid
from purireid import VIEWS
from purireid.model.network import build_model
from purireid.runtime.distributed import DistContext
from purireid.runtime.signals import GracefulTermination
from purireid.training.loop import StepSettings, train_one_epoch
from purireid.training.losses import view_weights
from purireid.training.terms import EpochTargets, build_terms

PACKAGE = str(Path(purireid.__file__).parent)
# What makes the host wait for the device (on a GPU) when purireid's own code calls it.
SYNCING = [(torch.Tensor, name) for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__",
                                             "numpy", "cpu")] + [(torch, "nonzero"), (torch.cuda, "synchronize")]

CONFIG = {"train": {"temperature": 0.05, "num_instances": 4, "camera_proxy": 0.5, "amp": False},
          "student": {"mu": 1.0, "teacher_mode": "train"}}


def make_epoch(steps: int, seed: int = 0, poison_step: int | None = None, ctx: DistContext | None = None):
    """An epoch to run: `steps` steps of a ResNet-18 student (64x32, global batch 8 = 2 classes x 4,
    each rank of `ctx` taking its share) with the memory, camera-proxy and distillation terms;
    images of `poison_step` are NaN."""
    ctx = ctx or DistContext()
    torch.manual_seed(seed)
    model, teacher = build_model("resnet18", "none"), build_model("resnet18", "none")
    n = 16
    labels = np.repeat(np.arange(4), 4)
    camids = np.tile(np.arange(2), 8)
    features = {v: torch.nn.functional.normalize(torch.randn(n, model.feat_dim), dim=1) for v in VIEWS}
    terms = build_terms(CONFIG, teacher=SimpleNamespace(model=teacher))
    assert [t.name for t in terms] == ["ce", "camproxy", "distill"]
    for term in terms:
        term.start_epoch(EpochTargets(labels, features, camids, 4, 0.5, torch.device("cpu")))
    batches = []
    for step in range(steps):
        images = torch.randn(8, 3, 64, 32)
        if step == poison_step:
            images[:] = float("nan")
        share = slice(ctx.rank * 8 // ctx.world_size, (ctx.rank + 1) * 8 // ctx.world_size)
        batches.append((images[share], torch.from_numpy(np.r_[np.arange(4), np.arange(8, 12)])[share]))
    optimizer = torch.optim.Adam(model.parameters(), lr=3.5e-4)
    return lambda: train_one_epoch(model, optimizer, batches, terms, ctx, StepSettings(view_weights(0.2)),
                                   GracefulTermination())


def count_syncs(monkeypatch, run) -> int:
    calls = []

    def counting(original, name):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE):
                calls.append((name, caller))
            return original(*args, **kwargs)
        return wrapper

    with monkeypatch.context() as patch:
        for owner, name in SYNCING:
            patch.setattr(owner, name, counting(getattr(owner, name), name))
        run()
    return len(calls)


def test_a_step_reads_nothing_back_from_the_device(monkeypatch):
    few = count_syncs(monkeypatch, make_epoch(2))
    many = count_syncs(monkeypatch, make_epoch(5))
    # Only after the last step: the logged sums, the non-finite check and, per memory, its
    # overflow counter (3 cluster memories + 3 proxy memories).
    assert few == many, f"{many - few} host reads in 3 more steps"
    assert few == 8


def test_logged_terms_are_the_means_of_the_steps():
    losses = make_epoch(3)()
    assert set(losses) == {"loss", *(f"{name}_{v}" for name in ("ce", "camproxy", "distill") for v in VIEWS)}
    weights = view_weights(0.2)
    # the loss is linear in the terms, so the means obey the same formula
    expected = sum(weights[v] * (losses[f"ce_{v}"] + 0.5 * losses[f"camproxy_{v}"] + losses[f"distill_{v}"])
                   for v in VIEWS)
    assert losses["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_non_finite_loss_stops_the_epoch_naming_the_step():
    with pytest.raises(FloatingPointError, match=r"epoch 0, step 2: the loss became nan; lower train.lr"):
        make_epoch(4, poison_step=2)()
