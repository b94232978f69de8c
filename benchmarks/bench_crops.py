"""Unlabelled crops against labelled names: does `dataset: crops` learn as well as `dataset: folder`?
And what do preparing and labelling 100,000 crops cost?

    python benchmarks/bench_crops.py learning [--sets heldout-6cam-s1.0,...] [--seeds 1,2] [--cores 2]
        [--work benchmarks/out/crops] [--configfile extra.yaml ...] [--tiny]
    python benchmarks/bench_crops.py scale [--n 100000] [--cameras 8] [--workers 2]
        [--work benchmarks/out/crops-scale]

learning: each held-out set (bench_learning.VARIANTS, made by the heldout package in the
Market-1501 layout) is trained twice with the embedded default (config.yaml, plus any
--configfile): as `dataset: folder` on the original names, and as `dataset: crops` after
benchmarks/to_crops.py moved its training images into camera folders under meaningless (hashed)
names, query/ and gallery/ kept. Prints the teacher's and the student's query/gallery mAP of
both per set and seed, and the crops - folder difference; with two or more seeds, the spread of
each setting over the seeds is the run-to-run noise to compare the difference with. The order of
the training images differs between the two (crops sort by camera folder, then name), so they
are not expected to be bitwise equal. --tiny: small sets and tests/configs/tiny.yaml (minutes;
checks the script, measures nothing).

scale: writes --n synthetic crops (64x128 JPEGs of a few coloured blocks, --cameras camera
folders) once, then, each in a fresh process, runs the prepare stage on them (`dataset: crops`:
listing, decoding every image, the manifest) and one epoch's pseudo-labelling of --n images
(benchmarks/bench_pseudo_labels.py, the same clustering whatever the dataset), printing wall
seconds, peak RSS and both per image, to compare with the MSMT17-scale figures of RESULTS.md.

Each learning run is a full Snakemake run and the scale run decodes 100,000 images: run them
alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_learning import SET_FOLDER, VARIANTS, build_dataset  # noqa: E402  (the held-out sets, one list)
from to_crops import convert  # noqa: E402

TINY_SET = dict(num_train_ids=12, num_test_ids=8, images_per_id=8, num_cameras=3, camera_strength=0.5, seed=11)


def run_workflow(work: Path, name: str, overrides: dict, configfiles: list[str], cores: int) -> dict:
    """One Snakemake run; returns the teacher's and the student's mAP (fractions)."""
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(overrides))
    cmd = [str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"), "--cores", str(cores),
           "--workflow-profile", "none", "--configfile", str(REPO / "config.yaml"), *configfiles, str(config)]
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed (exit {proc.returncode}); see {work / f'{name}.log'}")
    out = Path(overrides["results_dir"]) / overrides["dataset"]
    return {m: json.loads((out / m / "eval.json").read_text())["mAP"] for m in ("teacher", "student")}


def learning(args: argparse.Namespace) -> None:
    sets = {"tiny": ("project", TINY_SET)} if args.tiny else \
        {name: VARIANTS[name] for name in (VARIANTS if args.sets == "all" else args.sets.split(","))}
    configfiles = [str(REPO / "tests" / "configs" / "tiny.yaml")] if args.tiny else []
    configfiles += [str(Path(c).resolve()) for c in args.configfile]
    print(f"{'set':22s} {'seed':>4s} {'model':8s} {'folder':>7s} {'crops':>7s} {'diff':>7s}")
    rows = []
    for name, (generator, params) in sets.items():
        work = args.work / name
        data = work / "data"
        build_dataset(generator, params, data)  # data/<SET_FOLDER>, the Market-1501 layout
        if not (data / "crops").is_dir():
            convert(data / SET_FOLDER, data / "crops", names="hashed", cameras="folders")
        for seed in args.seeds:
            maps = {}
            for kind in ("folder", "crops"):
                prepare = {"folder_name": kind if kind == "crops" else SET_FOLDER}
                if kind == "folder":
                    prepare["check_counts"] = False
                maps[kind] = run_workflow(work, f"{kind}-seed{seed}", {
                    "dataset": kind, "data_root": str(data), "results_dir": str(work / f"results-{kind}-seed{seed}"),
                    "seed": seed, "prepare": prepare}, configfiles, args.cores)
            for model in ("teacher", "student"):
                a, b = maps["folder"][model], maps["crops"][model]
                rows.append({"set": name, "seed": seed, "model": model, "folder": a, "crops": b})
                print(f"{name:22s} {seed:4d} {model:8s} {100 * a:7.1f} {100 * b:7.1f} {100 * (b - a):+7.1f}", flush=True)
    (args.work / "learning.json").write_text(json.dumps(rows, indent=1))
    print(f"rows written to {args.work / 'learning.json'} (mAP as fractions)")


def write_crops(base: Path, n: int, cameras: int) -> None:
    """n small JPEG crops in camera folders (kept when already complete)."""
    import numpy as np
    from PIL import Image

    done = base / ".complete"
    if done.is_file() and done.read_text() == f"{n} {cameras}":
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = base / "train" / f"camera-{i % cameras:02d}" / f"{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        image = np.empty((128, 64, 3), dtype=np.uint8)
        for top in range(0, 128, 32):  # four coloured blocks and a little noise: a real JPEG to decode
            image[top:top + 32] = rng.integers(0, 256, 3)
        image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:07d}.jpg", quality=90)
    done.write_text(f"{n} {cameras}")


def prepare_child(data_root: Path, out: Path, workers: int) -> None:
    """The prepare stage on the crops, in this (fresh) process; prints one JSON line."""
    from purireid.config.resolve import resolve_config, stage_config
    from purireid.stages import prepare_dataset

    config = resolve_config({"dataset": "crops", "data_root": str(data_root), "prepare": {"folder_name": "crops"}})
    tic = time.time()
    result = prepare_dataset.run(stage_config(config, "prepare_dataset"), manifest=out / "manifest.csv",
                                 summary=out / "summary.json", workers=workers, progress=False)
    seconds = time.time() - tic
    print(json.dumps({"images": result["splits"]["train"]["images"], "seconds": seconds,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def scale(args: argparse.Namespace) -> None:
    data = args.work / "data"
    write_crops(data / "crops", args.n, args.cameras)
    proc = subprocess.run([sys.executable, __file__, "prepare-child", str(data), str(args.work / "prepared"),
                           str(args.workers)], capture_output=True, text=True, check=True)
    prepared = json.loads(proc.stdout.strip().splitlines()[-1])
    n = prepared["images"]
    print(f"prepare (dataset: crops, {args.workers} workers): {n} images, {prepared['seconds']:.1f} s "
          f"({1e3 * prepared['seconds'] / n:.3f} ms/image), peak RSS {prepared['peak_rss_gib']:.2f} GiB "
          f"({prepared['peak_rss_gib'] * 2**20 / n:.1f} KiB/image)", flush=True)
    print("pseudo-labelling (benchmarks/bench_pseudo_labels.py):", flush=True)
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_pseudo_labels.py"), "--n", str(n)], check=True)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "prepare-child":
        prepare_child(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    learn = sub.add_parser("learning", help="dataset: folder against dataset: crops on held-out sets")
    learn.add_argument("--sets", default="heldout-6cam-s1.0,heldout-3cam-s0.5",
                       help="comma-separated names of bench_learning.VARIANTS, or all")
    learn.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    learn.add_argument("--cores", type=int, default=2)
    learn.add_argument("--work", type=Path, default=REPO / "benchmarks" / "out" / "crops")
    learn.add_argument("--configfile", action="append", default=[], help="merged over config.yaml")
    learn.add_argument("--tiny", action="store_true", help="a small set and the tiny config (checks the script)")
    size = sub.add_parser("scale", help="prepare and label --n synthetic crops")
    size.add_argument("--n", type=int, default=100_000)
    size.add_argument("--cameras", type=int, default=8)
    size.add_argument("--workers", type=int, default=2)
    size.add_argument("--work", type=Path, default=REPO / "benchmarks" / "out" / "crops-scale")
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    learning(args) if args.command == "learning" else scale(args)


if __name__ == "__main__":
    main()
