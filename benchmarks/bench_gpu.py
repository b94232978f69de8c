"""Benchmark: where the time of a Market-1501-size run goes on one GPU.

Runs the Market-1501 recipe (config/presets/market1501.yaml over config.yaml) at the real size,
stage by stage as the workflow does (purireid.stages.*, in this process): prepare_dataset on a
synthetic set of 751 + 750 identities x 17 images (rendered in parallel; or any prepared
manifest with --manifest), train_teacher for 2 epochs, extract_teacher_features,
train_student for its warm-up epoch and 1 epoch, evaluate. Then it prints one row per phase
and epoch (feature extraction, pseudo labels, training steps, evaluation, job start-up) with
images/s and the GPU memory peak, and extrapolates the full DAG: teacher 50 epochs, student
warm-up + 50 epochs, evaluation every 10 epochs, two evaluate jobs.

Where the numbers come from: each epoch's extract_s, cluster_s, train_s and images_per_s (and
gpu_memory_peak_gb where the trainer logs it) are read from the stage's log.jsonl; the
untrained evaluation's "seconds" too. The evaluations inside training and each epoch's
bookkeeping (resume state, log.jsonl, training curve) are timed here by wrapping the trainer's
functions, and so are the stages' wall times; a training job's start-up is its wall time minus
all of those. "process start-up" is a fresh interpreter
importing torch and the stages and creating the CUDA context: what every job of the DAG pays
on top (each rule is a process). The GPU memory peak of a stage is
torch.cuda.max_memory_allocated over its run.

    python benchmarks/bench_gpu.py                        # on a CUDA machine: < 8 min on one H200
    python benchmarks/bench_gpu.py --iters 60             # shorter epochs (training extrapolated per step)
    python benchmarks/bench_gpu.py --manifest results/market1501/data/manifest.csv --data-root data
    python benchmarks/bench_gpu.py --smoke --device cpu   # tiny set, ResNet-18 64x32: end to end in seconds

The recipe's model starts from random weights (model.pretrained none: a GPU machine has no
ImageNet weights unless you put them in $TORCH_HOME); --pretrained imagenet uses them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "config" / "presets" / "market1501.yaml"

# Market-1501's size: 751 train and 750 test identities; 17 images each is ~12.8k train images.
MARKET_SYNTHETIC = {"num_train_ids": 751, "num_test_ids": 750, "images_per_id": 17}
# The full run the extrapolation is for (the paper's schedule, docs/method.md, Hyperparameters).
FULL_TEACHER_EPOCHS, FULL_STUDENT_EPOCHS, FULL_EVAL_EVERY, EVALUATE_JOBS = 50, 50, 10, 2
# --smoke: the tests' tiny problem (tests/configs/tiny.yaml) on the recipe.
SMOKE = {
    "synthetic": {"num_train_ids": 12, "num_test_ids": 6, "images_per_id": 8, "num_cameras": 3,
                  "height": 64, "width": 32},
    "data": {"height": 64, "width": 32, "workers": 0, "test_batch_size": 64},
    "model": {"arch": "resnet18", "bn_groups": 1},
    "cluster": {"k1": 10, "k2": 3, "eps": 0.6, "min_samples": 4, "camera_centre": True, "same_camera_offset": 0.3},
    "train": {"iters": 2, "batch_size": 8, "num_instances": 4},
    "evaluate": {"num_ranked_queries": 2},
}


# --------------------------------------------------------------------------- measurements


class Rows:
    """The table: one row per (stage, epoch, phase)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, stage: str, epoch: Any, phase: str, seconds: float | None, images: int | None = None,
            gpu_peak_gb: float | None = None) -> None:
        rate = None if not images or not seconds else images / seconds
        self.rows.append({"stage": stage, "epoch": "-" if epoch is None else epoch, "phase": phase,
                          "seconds": None if seconds is None else round(seconds, 2), "images": images,
                          "images_per_s": None if rate is None else round(rate, 1), "gpu_peak_gb": gpu_peak_gb})

    def text(self) -> str:
        def cell(value: Any, fmt: str) -> str:
            return "" if value is None else format(value, fmt)

        lines = [f"{'stage':9s} {'epoch':>5s}  {'phase':26s} {'seconds':>8s} {'images':>9s} {'images/s':>9s} "
                 f"{'GPU peak GiB':>12s}"]
        for r in self.rows:
            lines.append(f"{r['stage']:9s} {str(r['epoch']):>5s}  {r['phase']:26s} {cell(r['seconds'], '8.1f')} "
                         f"{cell(r['images'], '9,d')} {cell(r['images_per_s'], '9,.0f')} "
                         f"{cell(r['gpu_peak_gb'], '12.1f')}")
        return "\n".join(lines)


def _cuda(device: str) -> Any:
    import torch

    return torch.cuda if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else None


@contextlib.contextmanager
def stage_clock(device: str, result: dict) -> Iterator[None]:
    """result["seconds"] = the block's wall time; result["gpu_peak_gb"] = its CUDA memory peak."""
    cuda = _cuda(device)
    if cuda is not None:
        cuda.synchronize()
        cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    try:
        yield
    finally:
        if cuda is not None:
            cuda.synchronize()
            result["gpu_peak_gb"] = round(cuda.max_memory_allocated() / 2**30, 2)
        result["seconds"] = time.perf_counter() - tic


# What the trainer does once per epoch besides the epoch's logged phases: its resume state, its
# log.jsonl and its training curve (purireid.training.loop's names for them).
BOOKKEEPING = ("save_state", "write_jsonl", "plot_training_curve")


@contextlib.contextmanager
def timed_trainer_calls(names: tuple[str, ...], durations: dict[str, list[float]]) -> Iterator[None]:
    """Append the wall time of every call the trainer makes to one of `names` (functions it
    imported into purireid.training.loop) to durations[name]; a name it no longer has is left out."""
    import purireid.training.loop as loop

    originals = {name: getattr(loop, name) for name in names if callable(getattr(loop, name, None))}

    def timed(name: str, function: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            tic = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                durations.setdefault(name, []).append(time.perf_counter() - tic)
        return call

    for name, function in originals.items():
        setattr(loop, name, timed(name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(loop, name, function)


def process_startup_seconds(device: str) -> float:
    """A fresh interpreter importing torch and the training stages and creating the CUDA context."""
    code = ("import torch, purireid.stages.train_teacher, purireid.stages.train_student\n"
            "from purireid.runtime.distributed import resolve_device\n"
            f"d = resolve_device({device!r})\n"
            "torch.zeros(1, device=d).sum().item()\n")
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    return time.perf_counter() - tic


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_rows(rows: Rows, stage: str, log: list[dict], wall: float, calls: Mapping[str, list[float]],
                  train: Mapping[str, Any], warmup_factor: int, num_train: int, num_test: int,
                  stage_peak: float | None) -> dict[str, Any]:
    """The rows of one training stage from its log.jsonl (`train`: the config's train section it
    ran with; `calls`: timed_trainer_calls' durations); returns what the extrapolation needs."""
    untrained = next(r for r in log if r.get("phase") == "untrained")
    epochs = [r for r in log if isinstance(r.get("epoch"), int)]
    # The trainer's evaluations in order: the untrained one, then those of the evaluated epochs.
    evals = list(calls.get("evaluate_model", [])) or [untrained["seconds"]]
    in_training = evals[1:]
    # Each epoch saves the state, rewrites the log and redraws the curve: one call of each (the
    # calls before and after the epochs stay in the start-up, paid once).
    timed = [calls[name] for name in BOOKKEEPING if calls.get(name)]
    per_epoch = sum(sum(d) / len(d) for d in timed)
    accounted = untrained["seconds"] + sum(r["seconds"] for r in epochs) + sum(in_training) + per_epoch * len(epochs)
    rows.add(stage, None, "job start-up", wall - accounted)
    rows.add(stage, None, "evaluation (untrained)", untrained["seconds"], num_test)
    later = iter(in_training)
    for r in epochs:
        iters = r["iters"] = train["iters"] * (warmup_factor if r["epoch"] < 0 else 1)
        rows.add(stage, r["epoch"], "feature extraction", r["extract_s"], num_train if r["extract_s"] >= 0.05 else None)
        rows.add(stage, r["epoch"], "pseudo labels", r["cluster_s"])
        rows.add(stage, r["epoch"], f"training steps ({iters} it)", r["train_s"], iters * train["batch_size"],
                 r.get("gpu_memory_peak_gb"))
        if r.get("mAP") is not None:
            rows.add(stage, r["epoch"], "evaluation", next(later, None), num_test)
    rows.add(stage, None, "state, log, curve per epoch", per_epoch if timed else None)
    rows.add(stage, None, "stage total", wall, None, stage_peak)
    return {"startup_s": wall - accounted, "eval_s": in_training[-1] if in_training else evals[0], "epochs": epochs,
            "bookkeeping_s": per_epoch}


# --------------------------------------------------------------------------- extrapolation


def evaluations_in(epochs: int, every: int) -> int:
    """Evaluated epochs of a run (the trainer's rule: every `every` epochs and the last one)."""
    return sum(1 for e in range(epochs) if (e + 1) % every == 0 or e == epochs - 1)


def _epoch_seconds(record: Mapping[str, Any], iters: int) -> float:
    """An epoch of `iters` steps at the measured epoch's pace (training scaled per step)."""
    return record["extract_s"] + record["cluster_s"] + record["train_s"] * iters / record["iters"]


def extrapolate(measured: Mapping[str, Any], recipe: Mapping[str, Any]) -> dict[str, float]:
    """Seconds of each job of the full DAG (see the module docstring) and their total."""
    iters, factor = recipe["train"]["iters"], recipe["student"]["warmup_iters_factor"]
    proc = measured["process_startup_s"]
    teacher, student = measured["teacher"], measured["student"]
    t_epoch = _epoch_seconds(teacher["epochs"][-1], iters)
    warmup = next(r for r in student["epochs"] if r["epoch"] < 0)
    s_epoch = _epoch_seconds([r for r in student["epochs"] if r["epoch"] >= 0][-1], iters)
    n_eval_t = evaluations_in(FULL_TEACHER_EPOCHS, FULL_EVAL_EVERY)
    n_eval_s = evaluations_in(FULL_STUDENT_EPOCHS, FULL_EVAL_EVERY)
    jobs = {
        "prepare_dataset": proc + measured["prepare_s"],
        "train_teacher": (proc + teacher["startup_s"] + teacher["eval_s"] * (1 + n_eval_t)
                          + FULL_TEACHER_EPOCHS * (t_epoch + teacher["bookkeeping_s"])),
        "extract_teacher_features": proc + measured["extract_s"],
        "train_student": (proc + student["startup_s"] + student["eval_s"] * (1 + n_eval_s)
                          + _epoch_seconds(warmup, iters * factor)
                          + (1 + FULL_STUDENT_EPOCHS) * student["bookkeeping_s"] + FULL_STUDENT_EPOCHS * s_epoch),
        "evaluate": EVALUATE_JOBS * (proc + measured["evaluate_s"]),
    }
    return {**{k: round(v, 1) for k, v in jobs.items()}, "total": round(sum(jobs.values()), 1)}


# --------------------------------------------------------------------------- the run


def build_config(args: argparse.Namespace, work: Path) -> tuple[dict, dict]:
    """(the config the benchmark runs, the recipe it extrapolates to)."""
    import yaml

    from purireid.config.resolve import deep_merge, load_config

    recipe = load_config(REPO / "config.yaml", PRESET)
    overrides: dict[str, Any] = {"device": args.device, "results_dir": str(work / "results"),
                                 "model": {"pretrained": args.pretrained},
                                 "data": {"workers": args.workers}, "train": {}}
    if args.manifest is not None:
        beside = Path(args.manifest).parent / "config.yaml"
        prepared = yaml.safe_load(beside.read_text()) if beside.is_file() else {}
        overrides["dataset"] = args.dataset or prepared.get("dataset", "folder")
        overrides["data_root"] = str(args.data_root or prepared.get("data_root", "data"))
    else:
        overrides.update({"dataset": "synthetic", "data_root": str(work / "data"),
                          "synthetic": dict(MARKET_SYNTHETIC), "prepare": {"check_counts": False}})
    if args.smoke:
        overrides = deep_merge(overrides, SMOKE)
        overrides["data"]["workers"] = 0
    if args.iters is not None:
        overrides["train"]["iters"] = args.iters
    if args.bn_groups is not None:
        overrides["model"]["bn_groups"] = args.bn_groups
    return load_config(REPO / "config.yaml", PRESET, overrides=overrides), recipe


def run(args: argparse.Namespace) -> dict[str, Any]:
    from purireid.config.resolve import deep_merge, stage_config
    from purireid.data import read_manifest
    from purireid.stages import evaluate, extract_teacher_features, prepare_dataset, train_student, train_teacher

    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config, recipe = build_config(args, work)
    device = config["device"]
    rows = Rows()
    measured: dict[str, Any] = {}
    out = work / "results"

    if args.manifest is None:
        manifest = out / "data" / "manifest.csv"
        params = dict(config["synthetic"])
        from purireid.data.synthetic import generate_synthetic, synthetic_params_match
        from purireid.data.datasets import dataset_folder

        folder = dataset_folder("synthetic", Path(config["data_root"]), config["prepare"]["folder_name"])
        clock: dict = {}
        generated = not synthetic_params_match(folder, **params)
        with stage_clock("cpu", clock):
            if generated:
                generate_synthetic(folder, workers=args.prepare_workers, **params)
        prep: dict = {}
        with stage_clock("cpu", prep):
            summary = prepare_dataset.run(stage_config(config, "prepare_dataset"), manifest=manifest,
                                          summary=manifest.with_name("summary.json"), workers=args.prepare_workers,
                                          progress=False)
        summary_images = sum(s["images"] for s in summary["splits"].values())
        if generated:
            rows.add("data", None, f"synthetic set ({args.prepare_workers} procs)", clock["seconds"], summary_images)
        else:
            rows.add("data", None, "synthetic set (already there)", None, summary_images)
        rows.add("data", None, "prepare (decode, index)", prep["seconds"], summary_images)
        measured["prepare_s"] = prep["seconds"]
    else:
        manifest = Path(args.manifest).resolve()
        measured["prepare_s"] = 0.0  # not part of this run: the manifest was prepared before
    splits = read_manifest(manifest)
    num_train, num_test = len(splits["train"]), len(splits["query"]) + len(splits["gallery"])

    measured["process_startup_s"] = process_startup_seconds(device)
    rows.add("job", None, "process start-up", measured["process_startup_s"])

    teacher_dir, student_dir = out / "teacher", out / "student"
    for folder in (teacher_dir, student_dir):  # no resume state or log of an earlier run
        shutil.rmtree(folder, ignore_errors=True)
    teacher_cfg = deep_merge(config, {"train": {"epochs": args.teacher_epochs, "eval_every": args.teacher_epochs}})
    calls: dict[str, list[float]] = {}
    clock = {}
    with stage_clock(device, clock), timed_trainer_calls(("evaluate_model", *BOOKKEEPING), calls):
        train_teacher.run(stage_config(teacher_cfg, "train_teacher"), manifest=manifest,
                          model_out=teacher_dir / "model.pth", log_jsonl=teacher_dir / "log.jsonl",
                          curve_png=teacher_dir / "curve.png", state_dir=teacher_dir / "state")
    factor = config["student"]["warmup_iters_factor"]
    measured["teacher"] = training_rows(rows, "teacher", read_log(teacher_dir / "log.jsonl"), clock["seconds"], calls,
                                        config["train"], factor, num_train, num_test, clock.get("gpu_peak_gb"))

    clock = {}
    with stage_clock(device, clock):
        extract_teacher_features.run(stage_config(config, "extract_teacher_features"), manifest=manifest,
                                     checkpoint=teacher_dir / "model.pth", features_out=teacher_dir / "train_features.h5")
    rows.add("extract", None, "feature extraction (job)", clock["seconds"], num_train, clock.get("gpu_peak_gb"))
    measured["extract_s"] = clock["seconds"]

    student_cfg = deep_merge(config, {"train": {"epochs": args.student_epochs, "eval_every": args.student_epochs}})
    calls = {}
    clock = {}
    with stage_clock(device, clock), timed_trainer_calls(("evaluate_model", *BOOKKEEPING), calls):
        train_student.run(stage_config(student_cfg, "train_student"), manifest=manifest,
                          teacher_checkpoint=teacher_dir / "model.pth",
                          teacher_features=teacher_dir / "train_features.h5", model_out=student_dir / "model.pth",
                          log_jsonl=student_dir / "log.jsonl", curve_png=student_dir / "curve.png",
                          state_dir=student_dir / "state")
    measured["student"] = training_rows(rows, "student", read_log(student_dir / "log.jsonl"), clock["seconds"], calls,
                                        config["train"], factor, num_train, num_test, clock.get("gpu_peak_gb"))

    clock = {}
    with stage_clock(device, clock):
        evaluate.run(stage_config(config, "evaluate"), manifest=manifest, checkpoint=student_dir / "model.pth",
                     eval_json=student_dir / "eval.json", cmc_png=student_dir / "cmc.png",
                     ranked_png=student_dir / "ranked.png")
    rows.add("evaluate", None, "evaluation (job)", clock["seconds"], num_test, clock.get("gpu_peak_gb"))
    measured["evaluate_s"] = clock["seconds"]

    full = extrapolate(measured, recipe)
    return {"config": {k: config[k] for k in ("dataset", "device", "data", "model", "train")},
            "num_train": num_train, "num_test": num_test, "rows": rows.rows, "table": rows.text(),
            "extrapolated_s": full, "recipe_iters": recipe["train"]["iters"]}


def machine(device: str) -> str:
    import torch

    cuda = _cuda(device)
    where = cuda.get_device_name() if cuda is not None else (platform.processor() or platform.machine())
    return (f"{where}, torch {torch.__version__}, CUDA {torch.version.cuda}, {len(os.sched_getaffinity(0))} CPUs, "
            f"load {os.getloadavg()[0]:.2f}")


@contextlib.contextmanager
def log_to(path: Path, also_stderr: bool) -> Iterator[None]:
    """purireid's log records to `path` (and stderr when asked) for the duration of the block."""
    from purireid.log import LOGGER_NAME

    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(path, mode="a")]
    if also_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(fmt)
    logger.handlers, logger.propagate = handlers, False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in handlers:
            handler.close()
        logger.handlers, logger.level, logger.propagate = saved


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "bench_gpu"),
                        help="work folder (data, results, bench_gpu.log, bench_gpu.json)")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (config key device)")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--student-epochs", type=int, default=1, help="epochs after the student's warm-up epoch")
    parser.add_argument("--iters", type=int, default=None, help="steps per epoch (default: the recipe's 200)")
    parser.add_argument("--bn-groups", type=int, default=None, help="model.bn_groups (default: the recipe's 4)")
    parser.add_argument("--workers", type=int, default=min(12, max(0, len(os.sched_getaffinity(0)) - 2)),
                        help="data.workers (loader processes)")
    parser.add_argument("--prepare-workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes rendering and decoding the synthetic set")
    parser.add_argument("--pretrained", default="none", help="model.pretrained (none: random weights)")
    parser.add_argument("--manifest", default=None, help="a prepared manifest.csv instead of the synthetic set")
    parser.add_argument("--data-root", default=None, help="with --manifest: its data_root (default: its config.yaml's)")
    parser.add_argument("--dataset", default=None, help="with --manifest: its dataset (default: its config.yaml's)")
    parser.add_argument("--smoke", action="store_true", help="a tiny set and model (CPU allowed): checks that it runs")
    parser.add_argument("--json", default=None, help="also write the results here (default: <out>/bench_gpu.json)")
    parser.add_argument("--verbose", action="store_true", help="the stages' log on stderr too")
    args = parser.parse_args(argv)

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {machine(args.device)}", flush=True)
    tic = time.perf_counter()
    with log_to(work / "bench_gpu.log", args.verbose):
        result = run(args)
    result["machine"] = machine(args.device)
    result["benchmark_s"] = round(time.perf_counter() - tic, 1)
    c = result["config"]
    print(f"# Market-1501 recipe ({PRESET.relative_to(REPO)}): {c['model']['arch']} {c['data']['height']}x"
          f"{c['data']['width']}, batch {c['train']['batch_size']}, bn_groups {c['model']['bn_groups']}, amp "
          f"{c['train']['amp']}, channels_last {c['train']['channels_last']}, {c['data']['workers']} loader workers; "
          f"{c['dataset']}: {result['num_train']:,} train images, {result['num_test']:,} query + gallery")
    print(result["table"])
    full = result["extrapolated_s"]
    print(f"# extrapolated full DAG (teacher {FULL_TEACHER_EPOCHS} epochs, student warm-up + {FULL_STUDENT_EPOCHS}, "
          f"evaluation every {FULL_EVAL_EVERY}, {result['recipe_iters']} steps per epoch; this run "
          f"{c['train']['iters']}): {full['total'] / 60:.1f} min  ("
          + ", ".join(f"{k} {v / 60:.1f}" for k, v in full.items() if k != "total") + " min)")
    print(f"# this benchmark took {result['benchmark_s'] / 60:.1f} min; load {os.getloadavg()[0]:.2f}", flush=True)
    json_path = Path(args.json) if args.json else work / "bench_gpu.json"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
