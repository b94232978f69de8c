"""Benchmark: the cost of group BatchNorm (model.bn_groups) in a training step.

A training step of the multi-view ResNet (forward of the three views, a memory-style
cross-entropy per view, backward, Adam step) on random images, per memory layout
(contiguous, channels_last), for bn_groups 1 (plain BatchNorm), bn_groups G with the
project's implementation (purireid.model.batchnorm: one GroupNorm kernel per direction for all
groups) and bn_groups G with the reshape implementation of the released code's replicas
(tests/batchnorm_reference.py). The cases run interleaved, round
after round, so a change of load hits all of them alike; each line gives the median and the
fastest step and the cost over bn_groups 1 in the same layout (of the medians).

    python benchmarks/bench_batchnorm.py                      # ResNet-18 64x32 batch 32, CPU
    python benchmarks/bench_batchnorm.py --device cuda --amp --arch resnet50 --height 256 --width 128 --batch 256

The CPU may be shared: the 1-minute load average is printed before and after; --wait-load L
waits (up to 15 min) for it to drop to L first.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from batchnorm_reference import reshape_implementation  # noqa: E402

from purireid import VIEWS  # noqa: E402
from purireid.runtime.precision import autocast_context  # noqa: E402
from purireid.model.network import build_model  # noqa: E402

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def make_step(arch: str, groups: int, layout: torch.memory_format, batch: int, height: int, width: int,
              device: torch.device, amp: bool) -> Callable[[], None]:
    """One training step of a fresh model on a fixed random batch (the same seed for every case)."""
    torch.manual_seed(0)
    model = build_model(arch, "none", bn_groups=groups).to(device).train().to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4)
    images = torch.randn(batch, 3, height, width, device=device).contiguous(memory_format=layout)
    centres = F.normalize(torch.randn(64, model.feat_dim, device=device), dim=1)
    targets = torch.randint(0, 64, (batch,), device=device)

    def step() -> None:
        with autocast_context(device, amp):
            out = model(images)
        loss = sum(F.cross_entropy(out[v].float() @ centres.T / 0.05, targets) for v in VIEWS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step: Callable[[], None], device: torch.device, reshape: bool) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tic = time.perf_counter()
    if reshape:
        with reshape_implementation():
            step()
    else:
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - tic


def wait_for_load(limit: float | None) -> None:
    deadline = time.time() + 900
    while limit is not None and os.getloadavg()[0] > limit and time.time() < deadline:
        time.sleep(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--groups", type=int, default=4, help="bn_groups compared with 1 (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (each case once per round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only, as train.amp)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-reshape", action="store_true", help="skip the reshape implementation")
    parser.add_argument("--wait-load", type=float, default=None)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    wait_for_load(args.wait_load)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"# {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.arch} "
          f"{args.height}x{args.width} batch {args.batch}{', bf16 autocast' if args.amp else ''}; "
          f"load {os.getloadavg()[0]:.2f}")
    cases = [(1, False, "bn_groups 1"), (args.groups, False, f"bn_groups {args.groups}")]
    if not args.no_reshape:
        cases.append((args.groups, True, f"bn_groups {args.groups} reshape (old)"))
    for layout_name in args.layouts:
        layout = LAYOUTS[layout_name]
        steps = [make_step(args.arch, g, layout, args.batch, args.height, args.width, device, args.amp)
                 for g, _, _ in cases]
        times: list[list[float]] = [[] for _ in cases]
        for r in range(args.warmup + args.steps):
            for i, (_, reshape, _) in enumerate(cases):
                t = timed(steps[i], device, reshape)
                if r >= args.warmup:
                    times[i].append(t)
        base = statistics.median(times[0])
        for (_, _, label), ts in zip(cases, times):
            med = statistics.median(ts)
            print(f"{layout_name:13s} {label:28s} {1e3 * med:8.1f} ms/step (fastest {1e3 * min(ts):8.1f})  "
                  f"{100 * (med / base - 1):+6.1f} %  {args.batch / med:8.1f} images/s", flush=True)
        del steps
    print(f"# load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
