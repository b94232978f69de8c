"""Host work per training step, counted exactly: the aten ops (each a dispatch on the host, a few
µs in eager mode) and those that are not views (kernel launches on an accelerator) of

- the trainer's own step (purireid.training.loop.train_one_epoch: forward three views, the memory
  term on all views, backward, Adam with foreach=True as torch picks on CUDA, the memory update)
  at bn_groups 1 and 4, batch = ids x instances;
- the train augmentation's fixed-op path (data.transforms.augment_batched, what an accelerator
  runs) at several batch sizes.

The counts do not depend on the image size, so they are taken on this CPU with tiny images.

    python benchmarks/bench_dispatch.py [--arch resnet50] [--ids 16] [--instances 16] [--size 64 32]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
from collections.abc import Sequence

import numpy as np
import torch

from purireid import VIEWS
from purireid.data.transforms import augment_batched, sample_augmentation
from purireid.model.network import build_model
from purireid.runtime.dispatch import OpCount, count_ops
from purireid.runtime.distributed import DistContext
from purireid.training.loop import StepSettings, train_one_epoch
from purireid.training.losses import view_weights
from purireid.training.terms import EpochTargets
from purireid.training.terms.memory import MemoryTerm


def machine() -> str:
    """The CPU's model name (lscpu), else platform's processor string."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def step_ops(arch: str, bn_groups: int, ids: int, instances: int, size: tuple[int, int]) -> OpCount:
    """The aten ops of one step of train_one_epoch (an epoch of two steps minus an epoch of one,
    after a first epoch that creates Adam's state)."""
    torch.manual_seed(0)
    batch = ids * instances
    model = build_model(arch, "none", bn_groups).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4, foreach=True)
    labels = np.repeat(np.arange(ids), instances)
    features = {v: torch.nn.functional.normalize(torch.randn(batch, model.feat_dim), dim=1) for v in VIEWS}
    memory = MemoryTerm(temperature=0.05, rounds=instances)
    memory.start_epoch(EpochTargets(labels, features, labels * 0, ids, 0.1, torch.device("cpu")))
    images = torch.randn(batch, 3, *size)
    ctx, settings = DistContext(), StepSettings(view_weights(0.2))

    def epoch(steps: int) -> None:
        train_one_epoch(model, optimizer, [(images, torch.arange(batch))] * steps, [memory], ctx, settings)

    epoch(1)
    one, two = count_ops(lambda: epoch(1)), count_ops(lambda: epoch(2))
    return OpCount(two.ops - one.ops, two.views - one.views)


def augment_ops(batch: int, size: tuple[int, int] = (32, 16), pad: int = 4) -> OpCount:
    images = torch.zeros(batch, *size, 3, dtype=torch.uint8)
    params = sample_augmentation(np.random.default_rng(batch), batch, *size, pad=pad)
    return count_ops(lambda: augment_batched(images, params, pad=pad))


def table(arch: str, ids: int, instances: int, size: tuple[int, int], aug_batches: Sequence[int]) -> dict[str, OpCount]:
    batch = ids * instances
    rows = {f"train_one_epoch, {arch}, bn_groups: {g}": step_ops(arch, g, ids, instances, size) for g in (1, 4)}
    rows.update({f"augment_batched, batch {b}": augment_ops(b) for b in aug_batches})
    rows["the whole step (bn_groups: 4 + augmentation)"] = OpCount(
        rows[f"train_one_epoch, {arch}, bn_groups: 4"].ops + rows[f"augment_batched, batch {aug_batches[0]}"].ops,
        rows[f"train_one_epoch, {arch}, bn_groups: 4"].views + rows[f"augment_batched, batch {aug_batches[0]}"].views)
    print(f"machine: {machine()}, torch {torch.__version__}; per step, batch {batch} = {ids} x {instances}, "
          f"images {size[0]}x{size[1]} (the counts do not depend on the size)")
    print(f"| per step | aten ops | not views (kernels on a GPU) | most frequent |\n|---|---|---|---|")
    for name, count in rows.items():
        print(f"| {name} | {count.total:,} | {count.non_view:,} | {count.top()} |")
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, OpCount]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--ids", type=int, default=16)
    ap.add_argument("--instances", type=int, default=16)
    ap.add_argument("--size", type=int, nargs=2, default=(64, 32), metavar=("HEIGHT", "WIDTH"))
    ap.add_argument("--augment-batches", type=int, nargs="+", default=[256, 32, 512])
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return table(args.arch, args.ids, args.instances, tuple(args.size), args.augment_batches)


if __name__ == "__main__":
    main()
