"""`purireid doctor`: what this machine offers the pipeline, and whether a config can run on it.

Three parts, each a list of `Check`s (ok / warn / fail / info, with the fix for a failure):

* machine: Python, torch and its CUDA build, the GPUs (memory, bf16), the CPU, faiss (CPU or
  GPU flavour, and both wheels installed over each other), torch.distributed's NCCL / gloo;
* config: the device, GPUs and bf16 the config asks for, the ImageNet weights it needs (where
  they were found, or the exact path to place them), the dataset folder or archive, the
  export packages when the opt-in export is on;
* run: a few seconds of the real thing on every device (the CPU and each GPU): one
  forward/backward of the configured model (bf16 autocast and channels_last on CUDA where the
  config asks, as training does), and one self-kNN and one gallery search through the kNN
  engine's backend choice (purireid.knn.engine; on the CPU its calibration's timings are
  shown), each compared with an exact float64 result computed on the CPU.

A "fail" means the config cannot run here as it stands; the command then exits with status 1.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Check", "default_config_path", "doctor_checks", "format_check", "load_doctor_config"]

FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12", "faiss-gpu-cu13", "faiss")


@dataclass
class Check:
    section: str
    name: str
    status: str  # "ok", "warn", "fail" or "info"
    detail: str
    fix: str = ""


def format_check(check: Check) -> str:
    mark = {"ok": " ok ", "warn": "warn", "fail": "FAIL", "info": "    "}[check.status]
    line = f"[{mark}] {check.name}: {check.detail}"
    if check.fix:
        line += f"\n         fix: {check.fix}"
    return line


# --------------------------------------------------------------------------- config


def default_config_path() -> Path | None:
    """The embedded default config.yaml (beside the Snakefile of the purireid checkout), if any."""
    root = Path(__file__).resolve().parents[2]
    candidate = root / "config.yaml"
    return candidate if candidate.is_file() and (root / "Snakefile").is_file() else None


def load_doctor_config(config_file: str | Path | None) -> tuple[dict, str]:
    """The resolved config (`config_file` merged over the embedded default) and where it came from;
    ConfigError naming the file that set each key at fault."""
    from purireid.config.check import check_layers, read_layer
    from purireid.config.resolve import ConfigError

    base = default_config_path()
    if config_file is not None and not Path(config_file).is_file():
        from purireid.serving.api import InputError

        raise InputError(f"config file {config_file}: no such file (relative paths start at {Path.cwd()})")
    layers = ([read_layer(base)] if base else []) + ([read_layer(config_file)] if config_file else [])
    resolved, problems = check_layers(layers)
    if resolved is None:
        raise ConfigError("; ".join(problems))
    source = " + ".join(layer.name for layer in layers) if layers else "the schema's defaults"
    return resolved, source


# --------------------------------------------------------------------------- machine


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _installed(names: tuple[str, ...]) -> list[str]:
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return found


def machine_checks() -> Iterator[Check]:
    import purireid

    yield Check("machine", "python", "info", f"{sys.version.split()[0]} ({sys.executable}); purireid {purireid.__version__}")
    cuda_build = torch.version.cuda
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    yield Check("machine", "torch", "info", f"{torch.__version__}, CUDA build {cuda_build or 'none (CPU-only wheel)'}"
                + (f", cuDNN {cudnn}" if cudnn else ""))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    yield Check("machine", "cpu", "info", f"{_cpu_name()}, {cpus} usable core(s), torch threads "
                f"{torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            bf = p.major >= 8
            yield Check("machine", f"gpu {i}", "info", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute "
                        f"capability {p.major}.{p.minor}, bf16 {'yes' if bf else 'no (emulated or absent)'}")
    elif cuda_build:
        yield Check("machine", "gpus", "info", "none visible (CUDA build, but no device: no GPU here, or "
                    "CUDA_VISIBLE_DEVICES / the driver hides them)")
    else:
        yield Check("machine", "gpus", "info", "none (CPU-only torch)")
    yield from _faiss_checks()
    import torch.distributed as dist

    if not dist.is_available():
        yield Check("machine", "torch.distributed", "warn", "not built into this torch: multi-GPU training (train.gpus > 1) "
                    "cannot run", "install a torch wheel with distributed support (the PyPI wheels have it)")
    else:
        nccl, gloo = dist.is_nccl_available(), dist.is_gloo_available()
        yield Check("machine", "torch.distributed", "info", f"NCCL {'yes' if nccl else 'no'}, gloo {'yes' if gloo else 'no'}")


def _faiss_checks() -> Iterator[Check]:
    wheels = _installed(FAISS_DISTRIBUTIONS)
    try:
        import faiss
    except Exception as exc:  # noqa: BLE001 - a broken install raises anything
        yield Check("machine", "faiss", "fail", f"cannot import faiss ({exc}); installed: {', '.join(wheels) or 'none'}",
                    "pip uninstall -y faiss-cpu faiss-gpu; pip install faiss-cpu (or, on GPU nodes, "
                    "pip install --no-deps faiss-gpu)")
        return
    from purireid.knn.engine import faiss_gpus

    gpus = faiss_gpus()
    flavour = f"GPU flavour, sees {gpus} GPU(s)" if hasattr(faiss, "StandardGpuResources") else "CPU flavour"
    yield Check("machine", "faiss", "info", f"{faiss.__version__}, {flavour}; wheels: {', '.join(wheels) or 'none found'}")
    names = [w.split()[0] for w in wheels]
    if "faiss-cpu" in names and any(n.startswith("faiss-gpu") for n in names):
        yield Check("machine", "faiss wheels", "warn",
                    f"{' and '.join(wheels)} are installed over each other: both write the same `faiss` module, "
                    "so it is whichever was installed last, and uninstalling either one breaks the other",
                    "keep one: pip uninstall -y faiss-cpu faiss-gpu && pip install --no-deps faiss-gpu "
                    "(GPU nodes) or pip install faiss-cpu")
    if hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available() and gpus == 0:
        yield Check("machine", "faiss GPUs", "warn", "the faiss-gpu module sees no GPU although torch does: its CUDA "
                    "build does not fit this driver", "install the faiss-gpu wheel built for this CUDA "
                    f"({torch.version.cuda}), or use faiss-cpu (the pipeline's GPU kNN runs in torch)")


# --------------------------------------------------------------------------- config


def _device_for(config: Mapping[str, Any]) -> torch.device:
    wanted = config["device"]
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def config_checks(config: Mapping[str, Any]) -> Iterator[Check]:
    device = _device_for(config)
    gpus_visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if config["device"] == "cuda" and not torch.cuda.is_available():
        yield Check("config", "device", "fail", "config key 'device' is 'cuda' but torch sees no CUDA GPU "
                    f"(CUDA build: {torch.version.cuda or 'none'})",
                    "run on a GPU node with a CUDA build of torch, or set device: auto / cpu")
    else:
        yield Check("config", "device", "ok", f"'{config['device']}' -> {device.type}")
    world = config["train"]["gpus"]
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda" and gpus_visible < world:
            yield Check("config", "train.gpus", "fail", f"{world} processes (one per GPU) asked, {gpus_visible} GPU(s) visible",
                        f"run on a node with {world} GPUs (SLURM: request them for the rule), or lower train.gpus")
        backend = "nccl" if device.type == "cuda" else "gloo"
        ok = dist.is_available() and (dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available())
        yield Check("config", "multi-process backend", "ok" if ok else "fail",
                    f"{backend} for train.gpus = {world} on {device.type}" + ("" if ok else ": not available"),
                    "" if ok else "install a torch wheel with NCCL (Linux CUDA wheels from PyPI have it), or set train.gpus: 1")
    if device.type == "cuda" and config["train"]["amp"] and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            yield Check("config", "train.amp", "fail", "bf16 autocast asked (train.amp: true) but this GPU has no bf16 support",
                        "set train.amp: false (float32), or use an Ampere or newer GPU")
        else:
            yield Check("config", "train.amp", "ok", "bf16 autocast on CUDA")
    yield from _weights_check(config)
    yield from _dataset_check(config)
    export = config.get("export") or {}
    if export.get("enabled") and export.get("format", "onnx") == "onnx":
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not _importable(m)]
        yield Check("config", "export", "fail" if missing else "ok",
                    f"ONNX export of the student: {'missing ' + ', '.join(missing) if missing else 'packages present'}",
                    "pip install 'purireid[export]'" if missing else "")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _weights_check(config: Mapping[str, Any]) -> Iterator[Check]:
    from purireid.model.network import imagenet_weights_path

    arch, pretrained = config["model"]["arch"], str(config["model"]["pretrained"])
    if pretrained == "none":
        yield Check("config", "model weights", "ok", f"{arch} from a random init (model.pretrained: none)")
        return
    if pretrained != "imagenet":
        path = Path(pretrained).expanduser()
        ok = path.is_file()
        yield Check("config", "model weights", "ok" if ok else "fail",
                    f"model.pretrained = {pretrained}: " + ("found" if ok else f"no such file ({path.resolve()})"),
                    "" if ok else "give the path of a state_dict file in model.pretrained, or 'imagenet' / 'none'")
        return
    candidates = imagenet_weights_path(arch)
    found = next((p for p in candidates if p.is_file()), None)
    if found is not None:
        note = "" if found == candidates[0] else f" (not the paper's {candidates[0].name})"
        yield Check("config", "ImageNet weights", "ok" if not note else "warn", f"{arch}: {found}{note}")
        return
    from purireid.model.backbones import BACKBONES

    url = BACKBONES[arch].weights[0]
    yield Check("config", "ImageNet weights", "fail",
                f"{arch} (model.pretrained: imagenet): {candidates[0]} not found (nothing is downloaded)",
                f"place the file {candidates[0].name} at {candidates[0]} (from {url}; "
                "TORCH_HOME moves the folder), or set model.pretrained to a state_dict path or 'none'")


def _dataset_check(config: Mapping[str, Any]) -> Iterator[Check]:
    from purireid.config.datasets import FOLDER_CONTENTS
    from purireid.data.datasets import DATASET_INFO, DatasetError, dataset_folder

    name, root = config["dataset"], config["data_root"]
    prepare = config.get("prepare", {})
    try:
        folder = dataset_folder(name, root, prepare.get("folder_name"))
    except DatasetError as err:
        yield Check("config", "dataset", "fail", str(err).splitlines()[0], "set prepare.folder_name")
        return
    shown = folder if folder.is_absolute() else f"{folder} (under {Path.cwd()})"
    if folder.is_dir():
        yield Check("config", "dataset", "ok", f"{name}: {shown}")
        return
    if name == "synthetic":
        yield Check("config", "dataset", "ok", f"synthetic: {shown} will be generated by the prepare_dataset rule")
        return
    archive = prepare.get("archive")
    if archive:
        ok = Path(archive).is_file()
        yield Check("config", "dataset", "ok" if ok else "fail",
                    f"{name}: folder {shown} absent; prepare.archive {archive} " + ("found: the prepare_dataset rule "
                    "extracts it" if ok else "not found either"),
                    "" if ok else f"set prepare.archive to the path of {DATASET_INFO[name].archive or 'the archive'}")
        return
    archive_name = DATASET_INFO[name].archive
    if archive_name is None:  # your own images (folder, crops): nothing to extract
        yield Check("config", "dataset", "fail", f"{name}: folder {shown} not found",
                    f"put your images there ({FOLDER_CONTENTS[DATASET_INFO[name].layout]}), or set data_root and "
                    f"prepare.folder_name to where they are (run doctor from the workflow's working directory: "
                    f"data_root is relative)")
        return
    yield Check("config", "dataset", "fail", f"{name}: folder {shown} not found and no prepare.archive set",
                f"extract {archive_name} so that its folder is {folder}, or set prepare.archive to the "
                f"path of {archive_name} (run doctor from the workflow's working directory: data_root is relative)")


# --------------------------------------------------------------------------- run


def _timed(fn: Callable[[], str]) -> tuple[str, float]:
    start = time.perf_counter()
    detail = fn()
    return detail, time.perf_counter() - start


def _train_step(config: Mapping[str, Any], device: torch.device) -> str:
    """One forward/backward of the configured model as training runs it on `device`."""
    from purireid import VIEWS
    from purireid.runtime.precision import autocast_context
    from purireid.model.network import build_model

    bn_groups = config["model"]["bn_groups"]
    batch = 2 * bn_groups  # two images per BatchNorm group: a BatchNorm1d neck needs two in training mode
    height, width = config["data"]["height"], config["data"]["width"]
    model = build_model(config["model"]["arch"], pretrained="none", bn_groups=bn_groups,
                        input_norm=config["model"]["input_norm"]).to(device).train()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=gen).to(device)
    cuda = device.type == "cuda"
    channels_last = cuda and config["train"]["channels_last"]
    amp = cuda and config["train"]["amp"]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    target = torch.randn(batch, model.feat_dim, generator=gen).to(device)
    with autocast_context(device, amp):
        feats = model(images)
        loss = sum((feats[v].float() * target).sum() for v in VIEWS)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or not all(bool(torch.isfinite(g).all()) for g in grads):
        raise RuntimeError("non-finite or missing gradients")
    if not any(bool(g.abs().sum() > 0) for g in grads):
        raise RuntimeError("all gradients are zero")
    if cuda:
        torch.cuda.synchronize(device)
    mem = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if cuda else ""
    return (f"{config['model']['arch']} {height}x{width}, batch {batch} (bn_groups {bn_groups}), "
            f"{'bf16 autocast' if amp else 'float32'}{', channels_last' if channels_last else ''}{mem}")


def _dense_keys(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Every key of a x b by a dense float64 product: the reference the engine is checked against."""
    from purireid.knn.engine import grid_key

    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return grid_key(np.einsum("ij,ij->i", a64, a64)[:, None] + np.einsum("ij,ij->i", b64, b64)[None, :]
                    - 2 * a64 @ b64.T)


def _ranking(keys: np.ndarray, k: int) -> np.ndarray:
    cols = np.broadcast_to(np.arange(keys.shape[1]), keys.shape)
    return np.lexsort((cols, keys), axis=1)[:, :k]


def _knn_check(device: torch.device, dim: int) -> str:
    from purireid.knn.engine import calibration_timings, exact_search, resolve_backend
    from purireid.labels.neighbours import knn

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1024, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k = 20
    _, idx = knn(torch.from_numpy(x).to(device), k)
    keys = _dense_keys(x, x)
    np.fill_diagonal(keys, -1.0)  # self first
    bad = int((np.asarray(idx) != _ranking(keys, k)).any(axis=1).sum())
    if bad:
        raise RuntimeError(f"kNN lists of {bad} of {len(x)} points differ from the exact CPU result")
    query, gallery = x[:64], x[64:]
    found = exact_search(query, gallery, k, backend="auto", device=device)
    bad = int((found.indices != _ranking(_dense_keys(query, gallery), k)).any(axis=1).sum())
    if bad:
        raise RuntimeError(f"gallery search of {bad} of {len(query)} queries differs from the exact CPU result")
    # The self-kNN of the pseudo labels runs on a GPU whenever there is one; the search where asked.
    knn_on = torch.device("cuda" if device.type == "cuda" or torch.cuda.is_available() else "cpu")
    used = (f"self-kNN {resolve_backend('auto', knn_on, dim)} on {knn_on.type}, "
            f"search {resolve_backend('auto', device, dim)} on {device.type}")
    if device.type == "cpu":
        timed = ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in calibration_timings(dim).items())
        used += f"; CPU calibration: {timed} per block"
    return (f"kNN of {len(x)} x {dim}-d (k={k}) and search of {len(query)} queries: identical to the exact "
            f"CPU result ({used})")


def run_checks(config: Mapping[str, Any]) -> Iterator[Check]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and config["device"] != "cpu":
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    from purireid.model.backbones import BACKBONES

    dim = BACKBONES[config["model"]["arch"]].feat_dim
    for device in devices:
        for name, fn in ((f"train step on {device}", lambda d=device: _train_step(config, d)),
                         (f"kNN on {device}", lambda d=device: _knn_check(d, dim))):
            try:
                detail, seconds = _timed(fn)
                yield Check("run", name, "ok", f"{detail} ({seconds:.1f} s)")
            except Exception as exc:  # noqa: BLE001 - any failure here is the finding
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                yield Check("run", name, "fail", f"{type(exc).__name__}: {first[:300]}",
                            "see the message; `purireid doctor` on a healthy node of the same kind tells a "
                            "broken install from a broken machine")


def doctor_checks(config: Mapping[str, Any], *, run: bool = True) -> Iterator[Check]:
    """Every check, in order (a generator, so a caller can print each as it completes)."""
    yield from machine_checks()
    yield from config_checks(config)
    if run:
        yield from run_checks(config)
