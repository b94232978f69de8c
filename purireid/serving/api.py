"""Using a trained model outside the workflow: checkpoints, `FeatureExtractor`, image lists, feature files.

The `purireid` command (purireid.serving.cli) is a thin layer over this module:

* `read_checkpoint` opens a stage checkpoint (`model.pth` of train_teacher / train_student: a dict
  with state_dict, arch, feat_dim, config, ...) and refuses anything else with a message naming
  the file. The input size comes from the checkpoint's own config (data.height x data.width).
* `FeatureExtractor(checkpoint, device=...)` gives L2-normalised eval-mode features, the global
  view by default (the one retrieval uses, docs/method.md), all three on request. Images get the test
  transform of the evaluate stage (bicubic resize, ImageNet normalisation) and are decoded by a
  thread pool one batch ahead of the network, so the features equal the evaluate stage's.
* `collect_images` turns files, folders (recursive) and manifests into one ordered list.
* `write_feature_file` / `read_feature_file`: the HDF5 file of `purireid extract` (features,
  image paths, the checkpoint's sha256, the input size), written atomically, and
  `check_same_model`, which refuses to compare features of two models or input sizes.
"""

from __future__ import annotations

import csv
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from purireid import VIEWS, __version__
from purireid.runtime.distributed import DeviceUnavailable
from purireid.runtime.distributed import resolve_device as resolve_configured_device

__all__ = [
    "Checkpoint", "Extraction", "FeatureExtractor", "FeatureFile", "InputError", "IMAGE_SUFFIXES",
    "check_same_model", "collect_images", "fold_batchnorm", "read_checkpoint", "read_feature_file", "resolve_device",
    "resolve_views", "write_feature_file",
]

log = logging.getLogger("purireid.serving.api")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FEATURE_FILE_FORMAT = "purireid-features"
FEATURE_FILE_VERSION = 1
_LOG_EVERY_S = 30.0  # plain progress lines when stderr is not a terminal


class InputError(ValueError):
    """A file, folder or option given by the user cannot be used; the message names it and the fix."""


# --------------------------------------------------------------------------- devices, views


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" = the first CUDA device when there is one, else the CPU (InputError for a CUDA device
    torch cannot see)."""
    try:
        return resolve_configured_device(device, setting="--device")
    except DeviceUnavailable as err:
        raise InputError(str(err)) from None


def resolve_views(views: str | Sequence[str]) -> tuple[str, ...]:
    """"global" (default), "all" (global, upper, lower) or a sequence of view names."""
    if isinstance(views, str):
        views = VIEWS if views == "all" else (views,)
    bad = [v for v in views if v not in VIEWS]
    if bad or not views:
        raise InputError(f"unknown view(s) {bad or list(views)}: choose among {list(VIEWS)} or 'all'")
    return tuple(v for v in VIEWS if v in views)  # canonical order


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A stage checkpoint, read and checked: what is needed to rebuild its model."""

    path: Path
    sha256: str
    arch: str
    feat_dim: int
    input_size: tuple[int, int]  # (height, width) the model was trained and evaluated at
    config: dict
    state_dict: dict = field(repr=False)

    def build_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model in eval mode on `device`, with the checkpoint's weights."""
        from purireid.model.network import build_model, input_norm_of

        model = build_model(self.arch, pretrained="none", input_norm=input_norm_of(self.config))
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise InputError(f"{self.path}: its weights do not fit a purireid {self.arch} "
                             f"({str(exc).splitlines()[0]}); was the file edited or written by another "
                             "program? Use the model.pth written by train_teacher / train_student") from None
        return model.to(device).eval()


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Open a `model.pth` written by the train_teacher / train_student stages; clear errors otherwise."""
    from purireid.io.files import sha256_file

    path = Path(path)
    fix = ("give the model.pth written by the train_teacher or train_student rule "
           "(results/<dataset>/student/model.pth)")
    if not path.is_file():
        raise InputError(f"checkpoint {path}: no such file; {fix}")
    try:
        # weights_only: a checkpoint holds tensors and plain config values; a file that needs
        # arbitrary code to load is not one of ours and is never executed.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, pickle with code, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path} is not a purireid checkpoint (torch cannot read it: {first[:200]}); {fix}") from None
    needed = ("state_dict", "arch", "feat_dim", "config")
    missing = [k for k in needed if not isinstance(obj, dict) or k not in obj]
    if missing:
        what = "a bare state_dict" if isinstance(obj, dict) and obj and all(
            isinstance(v, torch.Tensor) for v in obj.values()) else f"a {type(obj).__name__}"
        raise InputError(f"{path} is not a purireid checkpoint: it is {what} without the key(s) "
                         f"{', '.join(missing)}; {fix}")
    data = obj["config"].get("data", {}) if isinstance(obj["config"], dict) else {}
    try:
        size = (int(data["height"]), int(data["width"]))
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path}: its config lacks data.height / data.width (the input size); {fix}") from None
    return Checkpoint(path=path, sha256=sha256_file(path), arch=str(obj["arch"]), feat_dim=int(obj["feat_dim"]),
                      input_size=size, config=dict(obj["config"]), state_dict=obj["state_dict"])


# --------------------------------------------------------------------------- image lists


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _manifest_entries(manifest: Path, split: str | None) -> list[str]:
    """Paths listed by a manifest: a CSV with a `path` column (purireid's manifest.csv: optionally
    one split) or a plain list, one path a line (blank lines and # comments skipped)."""
    try:
        text = manifest.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{manifest}: cannot read it as a text manifest ({exc}); give image files, "
                         "folders, or a manifest listing one image path per line") from None
    lines = text.splitlines()
    header = next(csv.reader(lines[:1]), []) if lines else []
    if "path" in header:
        rows = list(csv.DictReader(lines))
        if split is not None:
            if "split" not in header:
                raise InputError(f"{manifest}: --split {split} given, but the manifest has no 'split' column")
            rows = [r for r in rows if r["split"] == split]
        return [r["path"] for r in rows if r.get("path")]
    if split is not None:
        raise InputError(f"{manifest}: --split applies to a CSV manifest with 'split' and 'path' columns")
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def collect_images(sources: Iterable[str | Path], *, root: str | Path | None = None,
                   split: str | None = None) -> list[str]:
    """Absolute paths of the images named by `sources`, in order.

    A source is an image file, a folder (searched recursively; files sorted by path) or a
    manifest (any other file, see `_manifest_entries`). Relative paths in a manifest are taken
    from `root`, or from the manifest's folder when `root` is None.
    """
    images: list[str] = []
    for source in sources:
        src = Path(source)
        if src.is_dir():
            found = sorted(p for p in src.rglob("*") if p.is_file() and _is_image(p))
            if not found:
                raise InputError(f"folder {src} holds no images (looked for {', '.join(IMAGE_SUFFIXES)} files, "
                                 "recursively); point at the folder that holds the pictures")
            images += [str(p.resolve()) for p in found]
        elif src.is_file() and _is_image(src):
            images.append(str(src.resolve()))
        elif src.is_file():
            base = Path(root) if root is not None else src.parent
            entries = [Path(e) if Path(e).is_absolute() else base / e for e in _manifest_entries(src, split)]
            if not entries:
                raise InputError(f"manifest {src} lists no images" + (f" of split {split!r}" if split else ""))
            absent = [str(e) for e in entries if not e.is_file()]
            if absent:
                hint = ("" if root is not None else
                        f"; relative paths are taken from the manifest's folder {src.parent}: "
                        "give --root DIR (e.g. the data_root of purireid's manifest.csv)")
                raise InputError(f"manifest {src}: {len(absent)} of {len(entries)} listed images do not exist, "
                                 f"e.g. {absent[0]}{hint}")
            images += [str(e.resolve()) for e in entries]
        else:
            raise InputError(f"{src}: no such file or folder (give image files, folders or a manifest)")
    return images


# --------------------------------------------------------------------------- extraction


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """The eval-mode model with every backbone BatchNorm2d folded into the convolution before it
    (in place; the views' heads are left alone). Same function up to float rounding."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    pairs = [(model, "conv1", "bn1")]
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for parent, conv, bn in pairs:
        parent._modules[conv] = fuse_conv_bn_eval(parent._modules[conv], parent._modules[bn])
        parent._modules[bn] = torch.nn.Identity()
    return model


@dataclass
class Extraction:
    """Features of the images that could be read, in input order, and the ones that could not."""

    features: dict[str, np.ndarray]  # view -> float32 [N, D], L2-normalised rows
    paths: list[str]
    skipped: list[tuple[str, str]]  # (path, reason)


def _decode(path: str, height: int, width: int) -> np.ndarray:
    from purireid.data.transforms import load_resized

    return np.asarray(load_resized(path, height, width), dtype=np.uint8)


def _from_pil(image: Any, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.uint8)


class FeatureExtractor:
    """L2-normalised eval-mode features of a trained purireid model.

        fx = purireid.FeatureExtractor("results/market1501/student/model.pth", device="auto")
        feats = fx(["a.jpg", "b.jpg"])          # float32 [2, 2048], the global view
        views = fx(["a.jpg"], views="all")      # {"global": ..., "upper": ..., "lower": ...}

    `images` are file paths or PIL images. The test transform of the evaluate stage is applied
    (bicubic resize to the checkpoint's input size, ImageNet normalisation). On CUDA, bf16
    autocast and channels_last follow the checkpoint's train.amp / train.channels_last, as in
    the evaluate stage, unless given.

    `cpu_fast_path` (None = on for ResNet-50 on the CPU): fold every BatchNorm2d into its
    convolution and run channels_last, ~1.2-1.6x faster there (measured: benchmarks/RESULTS.md);
    the features then differ from the evaluate stage's by float rounding (~1e-7). With
    ResNet-18/34 at small inputs it is slower, so off.
    """

    def __init__(self, checkpoint: str | Path | Checkpoint, device: str | torch.device = "auto", *,
                 views: str | Sequence[str] = "global", batch_size: int | None = None,
                 amp: bool | None = None, channels_last: bool | None = None, workers: int = 2,
                 cpu_fast_path: bool | None = None) -> None:
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
        self.device = resolve_device(device)
        self.views = resolve_views(views)
        cfg = self.checkpoint.config
        self.batch_size = int(batch_size or cfg.get("data", {}).get("test_batch_size", 64))
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")
        train = cfg.get("train", {})
        self.amp = bool(train.get("amp", False) if amp is None else amp)
        self.channels_last = bool(train.get("channels_last", False) if channels_last is None else channels_last)
        self.workers = max(1, int(workers))
        self.model = self.checkpoint.build_model(self.device)
        if cpu_fast_path is None:
            cpu_fast_path = self.checkpoint.arch == "resnet50"
        self.cpu_fast_path = bool(cpu_fast_path) and self.device.type == "cpu"
        if self.cpu_fast_path:
            self.model = fold_batchnorm(self.model).to(memory_format=torch.channels_last)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.checkpoint.input_size

    @property
    def feat_dim(self) -> int:
        return self.checkpoint.feat_dim

    def __call__(self, images: Sequence[Any], views: str | Sequence[str] | None = None
                 ) -> np.ndarray | dict[str, np.ndarray]:
        """Features of `images` (paths or PIL images): an array for one view, a dict for several."""
        wanted = self.views if views is None else resolve_views(views)
        result = self.extract(images, views=wanted, progress=False)
        return result.features[wanted[0]] if len(wanted) == 1 else result.features

    @torch.inference_mode()
    def forward_batch(self, batch: np.ndarray, views: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Features of a uint8 [B, H, W, 3] batch of resized RGB images."""
        from purireid.data.transforms import normalise_batch
        from purireid.evaluation.inference import autocast_context

        # uint8 to the device (a quarter of the bytes of float32), normalised there.
        x = normalise_batch(torch.from_numpy(batch).to(self.device))
        if (self.channels_last and self.device.type == "cuda") or self.cpu_fast_path:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device, self.amp):
            out = self.model(x)
        return {v: torch.nn.functional.normalize(out[v].float(), dim=1).cpu().numpy()
                for v in (views or self.views)}

    def extract(self, images: Sequence[Any], *, views: str | Sequence[str] | None = None,
                skip_unreadable: bool = False, progress: bool | None = None,
                on_skip: Callable[[str, str], None] | None = None) -> Extraction:
        """Features of every readable image. An unreadable one raises InputError naming it, or
        with `skip_unreadable` is left out (reported through `on_skip(path, reason)` and in
        `Extraction.skipped`). `progress`: a bar (None = only when stderr is a terminal)."""
        from tqdm import tqdm

        wanted = self.views if views is None else resolve_views(views)
        height, width = self.input_size
        n = len(images)
        chunks: dict[str, list[np.ndarray]] = {v: [] for v in wanted}
        kept: list[str] = []
        skipped: list[tuple[str, str]] = []
        bar = tqdm(total=n, unit="img", desc="extract", disable=None if progress is None else not progress,
                   leave=False, mininterval=1.0)
        last_log, done = time.monotonic(), 0
        with ThreadPoolExecutor(self.workers) as pool:
            for names, futures in self._prefetch(pool, images, height, width):
                arrays = []
                for name, future in zip(names, futures):
                    try:
                        arrays.append((name, future.result()))
                    except Exception as exc:  # noqa: BLE001 - any decoder failure is the image's
                        reason = f"{type(exc).__name__}: {exc}"
                        if not skip_unreadable:
                            bar.close()
                            raise InputError(f"cannot read image {name} ({reason}); fix or remove it, or pass "
                                             "--skip-unreadable (skip_unreadable=True) to leave unreadable "
                                             "images out") from None
                        skipped.append((name, reason))
                        if on_skip is not None:
                            on_skip(name, reason)
                if arrays:
                    feats = self.forward_batch(np.stack([a for _, a in arrays]), wanted)
                    for v in wanted:
                        chunks[v].append(feats[v])
                    kept += [name for name, _ in arrays]
                bar.update(len(names))
                done += len(names)
                if bar.disable and progress is None and time.monotonic() - last_log > _LOG_EVERY_S:
                    last_log = time.monotonic()  # plain lines where there is no bar (log files)
                    log.info("extract: %d / %d images", done, n)
        bar.close()
        dim = self.feat_dim
        features = {v: (np.concatenate(chunks[v]) if chunks[v] else np.zeros((0, dim), np.float32)) for v in wanted}
        return Extraction(features=features, paths=kept, skipped=skipped)

    def _prefetch(self, pool: ThreadPoolExecutor, images: Sequence[Any], height: int, width: int
                  ) -> Iterator[tuple[list[str], list[Future]]]:
        """Batches of (names, decode futures), decoding the next batch while this one runs."""
        def submit(start: int) -> tuple[list[str], list[Future]]:
            items = images[start:start + self.batch_size]
            names, futures = [], []
            for i, item in enumerate(items):
                if isinstance(item, (str, Path)):
                    names.append(str(item))
                    futures.append(pool.submit(_decode, str(item), height, width))
                else:  # a PIL image
                    names.append(f"<image {start + i}>")
                    futures.append(pool.submit(_from_pil, item, height, width))
            return names, futures

        pending: deque = deque(submit(s) for s in range(0, min(len(images), 2 * self.batch_size), self.batch_size))
        next_start = 2 * self.batch_size
        while pending:
            current = pending.popleft()
            if next_start < len(images):
                pending.append(submit(next_start))
                next_start += self.batch_size
            yield current


# --------------------------------------------------------------------------- feature files


@dataclass
class FeatureFile:
    """The content of a feature file written by `purireid extract`."""

    path: Path
    features: dict[str, np.ndarray]
    paths: list[str]
    checkpoint_sha256: str
    checkpoint_path: str
    arch: str
    input_size: tuple[int, int]
    skipped: list[str]

    @property
    def feat_dim(self) -> int:
        return int(next(iter(self.features.values())).shape[1])


def write_feature_file(path: str | Path, extraction: Extraction, checkpoint: Checkpoint) -> None:
    """Write the features, the image paths and the model's provenance atomically (HDF5)."""
    import h5py

    from purireid.io.files import atomic_path

    strings = h5py.string_dtype()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        group = h5.create_group("features")
        for view, array in extraction.features.items():
            group.create_dataset(view, data=np.asarray(array, dtype=np.float32))
        h5.create_dataset("paths", data=np.asarray(extraction.paths, dtype=object), dtype=strings)
        h5.create_dataset("skipped", data=np.asarray([p for p, _ in extraction.skipped], dtype=object), dtype=strings)
        h5.attrs.update({
            "format": FEATURE_FILE_FORMAT, "format_version": FEATURE_FILE_VERSION,
            "checkpoint_sha256": checkpoint.sha256, "checkpoint_path": str(checkpoint.path.resolve()),
            "arch": checkpoint.arch, "feat_dim": checkpoint.feat_dim,
            "input_height": checkpoint.input_size[0], "input_width": checkpoint.input_size[1],
            "purireid_version": __version__,
        })


def read_feature_file(path: str | Path) -> FeatureFile:
    """Read a file of `purireid extract`; a clear InputError for anything else."""
    import h5py

    path = Path(path)
    fix = "write it with `purireid extract CHECKPOINT IMAGES... --out FILE`"
    if not path.is_file():
        raise InputError(f"feature file {path}: no such file; {fix}")
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("format") != FEATURE_FILE_FORMAT:
                kind = (" (it looks like the workflow's teacher-feature file of the train images)"
                        if "checkpoint_sha256" in h5.attrs and "config" in h5.attrs else "")
                raise InputError(f"{path} is not a feature file of `purireid extract`{kind}; {fix}")
            features = {v: h5[f"features/{v}"][()] for v in VIEWS if f"features/{v}" in h5}
            paths = [p.decode() if isinstance(p, bytes) else str(p) for p in h5["paths"][()]]
            skipped = [p.decode() if isinstance(p, bytes) else str(p) for p in h5["skipped"][()]]
            attrs = dict(h5.attrs)
    except InputError:
        raise
    except Exception as exc:  # truncated or foreign HDF5, missing datasets
        raise InputError(f"{path}: cannot read it as a purireid feature file ({str(exc).splitlines()[0]}); "
                         f"if a run was interrupted, delete it and {fix}") from None
    if not features or any(len(f) != len(paths) for f in features.values()):
        raise InputError(f"{path}: features and image paths disagree in length; delete it and {fix}")
    return FeatureFile(path=path, features=features, paths=paths, checkpoint_sha256=str(attrs["checkpoint_sha256"]),
                       checkpoint_path=str(attrs.get("checkpoint_path", "")), arch=str(attrs.get("arch", "")),
                       input_size=(int(attrs["input_height"]), int(attrs["input_width"])), skipped=skipped)


def check_same_model(a: FeatureFile | Checkpoint, b: FeatureFile) -> None:
    """Refuse to compare features of two different checkpoints or input sizes (naming both)."""
    def name(x: FeatureFile | Checkpoint) -> str:
        return f"{'checkpoint' if isinstance(x, Checkpoint) else 'feature file'} {x.path}"

    sha_a = a.sha256 if isinstance(a, Checkpoint) else a.checkpoint_sha256
    problems = []
    if sha_a != b.checkpoint_sha256:
        problems.append(f"different checkpoints (sha256 {sha_a[:12]}… vs {b.checkpoint_sha256[:12]}…)")
    if tuple(a.input_size) != tuple(b.input_size):
        problems.append(f"different input sizes ({a.input_size[0]}x{a.input_size[1]} vs "
                        f"{b.input_size[0]}x{b.input_size[1]})")
    if problems:
        raise InputError(
            f"{name(a)} and {name(b)} come from {' and '.join(problems)}: their features cannot be compared. "
            f"Extract both with the same checkpoint: purireid extract CHECKPOINT IMAGES... --out FILE "
            f"(gallery {b.path} was made from {b.checkpoint_path or 'an unrecorded checkpoint'})")
