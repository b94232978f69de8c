"""Teacher training speed on this machine.

1. Images/s of the trainer's step (purireid.training.loop.train_one_epoch: forward three views,
   memory CE on all views, backward, Adam step, memory update) for ResNet-18 and ResNet-50 at 256×128.
2. Where an epoch's time goes (feature extraction, clustering, training), from a real teacher
   epoch on the synthetic dataset.

    python benchmarks/bench_training.py [--batch 32] [--steps 3] [--epoch-config config.yaml]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from purireid import VIEWS
from purireid.runtime.distributed import DistContext
from purireid.model.network import build_model
from purireid.training.loop import StepSettings, compiled_network, train_one_epoch
from purireid.training.losses import view_weights
from purireid.training.terms import EpochTargets
from purireid.training.terms.memory import MemoryTerm


def step_images_per_s(arch: str, batch: int, steps: int, height: int, width: int, *, instances: int = 4,
                      bn_groups: int = 1, compile: bool | str = False, device: str = "cpu", amp: bool = False,
                      channels_last: bool = False) -> float:
    """The trainer's own step (purireid.training.loop.train_one_epoch) on random images already on
    `device`: a batch of batch / instances pseudo-ids x `instances` images, the memory term on all
    views, as train_teacher runs it (bf16 autocast and channels_last on CUDA when asked); `compile`:
    train.compile (False, True or "reduce-overhead")."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(arch, "none", bn_groups).to(dev).train()
    if channels_last and dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4)
    labels = np.repeat(np.arange(batch // instances), instances)
    features = {v: torch.nn.functional.normalize(torch.randn(batch, model.feat_dim), dim=1) for v in VIEWS}
    memory = MemoryTerm(temperature=0.05, rounds=instances)
    memory.start_epoch(EpochTargets(labels, features, labels * 0, int(labels.max()) + 1, 0.1, dev))
    batches = [(torch.randn(batch, 3, height, width, device=dev), torch.arange(batch))]
    net = compiled_network(model, compile)
    settings = StepSettings(view_weights(0.2), amp=amp, channels_last=channels_last)
    ctx = DistContext(device=dev)

    def run(count: int) -> None:
        train_one_epoch(net, optimizer, batches * count, [memory], ctx, settings)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    run(2)  # warm-up: allocator, kernels (and compilation)
    tic = time.perf_counter()
    run(steps)
    return steps * batch / (time.perf_counter() - tic)


def epoch_breakdown(config_path: Path, epochs: int) -> list[dict]:
    from purireid.config.resolve import load_config, stage_config
    from purireid.stages import prepare_dataset, train_teacher

    root = Path(tempfile.mkdtemp(prefix="bench_training_"))
    config = load_config(config_path, overrides={"data_root": str(root / "data"), "device": "cpu",
                                                 "train": {"epochs": epochs, "eval_every": 0}})
    manifest = root / "data" / "manifest.csv"
    prepare_dataset.run(stage_config(config, "prepare_dataset"), manifest=manifest,
                        summary=root / "data" / "summary.json", workers=2, progress=False)
    out = root / "teacher"
    train_teacher.run(stage_config(config, "train_teacher"), manifest=manifest, model_out=out / "model.pth",
                      log_jsonl=out / "log.jsonl", curve_png=out / "curve.png", state_dir=out / "state")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if isinstance(r.get("epoch"), int)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--epoch-config", type=Path, default=Path(__file__).resolve().parents[1] / "config.yaml")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"))
    parser.add_argument("--compile", nargs="*", choices=["default", "reduce-overhead"], default=None,
                        help="also time the step under torch.compile in these modes (train.compile: default = "
                        "true, reduce-overhead = CUDA graphs; no mode given: default); the first calls compile "
                        "and are not timed")
    parser.add_argument("--no-eager", action="store_true", help="time only the compiled modes")
    parser.add_argument("--no-epoch", action="store_true", help="skip the epoch breakdown")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the step runs (images already there)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only, train.amp)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last (CUDA only, train.channels_last)")
    parser.add_argument("--bn-groups", type=int, nargs="+", default=[1], help="model.bn_groups values to time")
    parser.add_argument("--instances", type=int, default=4, help="train.num_instances (16 in the paper)")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU")
    height, width = args.size
    if args.device != "cpu":
        print(f"# {torch.cuda.get_device_name()}, amp {args.amp}, channels_last {args.channels_last}")
    compiled_modes = [] if args.compile is None else [{"default": True}.get(m, m) for m in args.compile or ["default"]]
    modes = ([] if args.no_eager else [False]) + compiled_modes  # train.compile's values
    for arch in args.archs:
        for groups in args.bn_groups:
            for compiled in modes:
                rate = step_images_per_s(arch, args.batch, args.steps, height, width, instances=args.instances,
                                         bn_groups=groups, compile=compiled, device=args.device, amp=args.amp,
                                         channels_last=args.channels_last)
                mode = {False: "", True: " compiled"}.get(compiled, f" compiled {compiled}")
                print(f"teacher step {arch:9s} {height}x{width} batch {args.batch} bn_groups {groups}{mode}: "
                      f"{rate:7.1f} images/s ({1e3 * args.batch / rate:.1f} ms/step)",
                      flush=True)
    for r in ([] if args.no_epoch else epoch_breakdown(args.epoch_config, args.epochs)):
        total = r["extract_s"] + r["cluster_s"] + r["train_s"]
        print(f"epoch {r['epoch']} ({args.epoch_config.name}): {total:6.1f} s = extraction "
              f"{100 * r['extract_s'] / total:4.1f}% + clustering {100 * r['cluster_s'] / total:4.1f}% + "
              f"training {100 * r['train_s'] / total:4.1f}%  ({r['images_per_s']} train images/s)")


if __name__ == "__main__":
    main()
