"""Training-loader throughput (images/s) at 256x128: PIL path vs cached-uint8 + batched-tensor path,
after the cached path's augmentation timed against the per-sample implementation it replaced.

    python benchmarks/bench_loader.py [--workers 0 1 2] [--batch-size 128] [--iters 12] [--device cpu]

Uses the synthetic dataset (128x64 JPEGs, like Market-1501's) generated in a temporary folder
unless --data-root holds a prepared one (--dataset / --manifest).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from purireid.data import TrainLoader, load_dataset, read_manifest
from purireid.data.synthetic import generate_synthetic
from purireid.data.transforms import augment_batch, sample_augmentation

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from augment_reference import per_sample_augment  # noqa: E402


def measure(loader: TrainLoader, labels: np.ndarray, device: torch.device) -> float:
    it = loader.epoch(0, labels)
    next(it)  # exclude worker start-up and the first batch
    t0 = time.perf_counter()
    n = 0
    for images, _ in it:
        n += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def compare_augmentation(batch: int, height: int, width: int, rounds: int) -> None:
    """The cached path's augmentation (augment_batch on the CPU) against the per-sample
    implementation it replaced, alternating round by round on the same batches (a shared machine's
    load hits both alike): the medians and their ratio."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8))
    times: dict[str, list[float]] = {"augment_batch": [], "per-sample": []}
    for k in range(rounds + 1):
        params = sample_augmentation(rng, batch, height, width)
        for name, fn in (("augment_batch", augment_batch), ("per-sample", per_sample_augment)):
            tic = time.perf_counter()
            fn(images, params, 10)
            if k:  # the first round warms up
                times[name].append(time.perf_counter() - tic)
    new, old = (statistics.median(times[n]) for n in ("augment_batch", "per-sample"))
    print(f"augmentation of a batch of {batch} at {height}x{width}, median of {rounds}: augment_batch "
          f"{1e3 * new:.1f} ms, per-sample (replaced) {1e3 * old:.1f} ms: ratio {new / old:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root")
    ap.add_argument("--manifest", help="prepared manifest.csv (else the synthetic layout under --data-root)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--augment-rounds", type=int, default=20, help="rounds of the augmentation comparison (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the main process's batched ops use one thread; workers add parallelism
    if args.augment_rounds:
        compare_augmentation(args.batch_size, args.height, args.width, args.augment_rounds)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_root or tmp)
        if args.manifest:
            records = read_manifest(args.manifest)["train"]
        else:
            if not (root / "synthetic" / "Synthetic-ReID").is_dir():
                generate_synthetic(root / "synthetic" / "Synthetic-ReID", num_train_ids=100, num_test_ids=2)
            records = load_dataset("synthetic", root)["train"]
        labels = np.unique([r.pid for r in records], return_inverse=True)[1]
        device = torch.device(args.device)
        common = dict(height=args.height, width=args.width, batch_size=args.batch_size, num_instances=16,
                      iters=args.iters, device=device)
        print(f"{len(records)} train images, batch {args.batch_size}, {args.height}x{args.width}, "
              f"device {device}, {torch.get_num_threads()} torch thread(s) in the main process")
        t0 = time.perf_counter()
        TrainLoader(records, root, use_cache=True, cache_dir=Path(tmp) / "cache", workers=2, **common)
        print(f"cache build (decode + bicubic resize once, 2 threads): {time.perf_counter() - t0:.2f} s "
              f"= {len(records) / (time.perf_counter() - t0):.0f} images/s")
        for use_cache in (False, True):
            for workers in args.workers:
                loader = TrainLoader(records, root, use_cache=use_cache, cache_dir=Path(tmp) / "cache",
                                     workers=workers, **common)
                rate = measure(loader, labels, device)
                name = "cache+tensor" if use_cache else "PIL        "
                print(f"{name} workers={workers}: {rate:8.0f} images/s")


if __name__ == "__main__":
    main()
