"""Using a trained model outside the workflow: checkpoints, `FeatureExtractor`, image lists, feature files.

The `purireid` command (purireid.serving.cli) is a thin layer over this module, and this module
over the library:

* `read_checkpoint` (purireid.io.checkpoints, the one reader of torch files) opens a stage
  checkpoint (`model.pth` of train_teacher / train_student) and refuses anything else with one
  line saying what the file is. The input size comes from the checkpoint's own config.
* `FeatureExtractor(checkpoint, device=...)` gives L2-normalised eval-mode features, the global
  view by default (the one retrieval uses, docs/method.md, Model), all three on request: the stages' extractor
  (purireid.evaluation.inference.feature_batches) over `image_batches`, which decode and
  normalise with the test transform's functions, so the features equal the evaluate stage's.
* `collect_images` turns files, folders (recursive) and manifests into one ordered list.
* `write_feature_file` / `read_feature_file`: the HDF5 feature file (purireid.io.features, the
  layout the teacher features share) with the image paths, the checkpoint's sha256 and the input
  size, and `check_same_model`, which refuses to compare features of two models, input sizes or
  dimensions.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from purireid import VIEWS
from purireid.io.checkpoints import Checkpoint, read_checkpoint
from purireid.io.filekinds import describe_file, file_kind
from purireid.io.features import FeatureFile
from purireid.model.network import fold_batchnorm
from purireid.runtime.distributed import DeviceUnavailable
from purireid.runtime.distributed import resolve_device as resolve_configured_device

__all__ = [
    "Checkpoint", "Extraction", "FeatureExtractor", "FeatureFile", "InputError", "IMAGE_SUFFIXES",
    "check_same_model", "collect_images", "fold_batchnorm", "read_checkpoint", "read_feature_file", "resolve_device",
    "resolve_views", "write_feature_file",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
EXTRACT_FIX = "feature files are written by `purireid extract CHECKPOINT IMAGES... --out FILE`"


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
            kind = file_kind(src)
            if kind not in ("text", "empty file"):
                raise InputError(f"{src} is {describe_file(src)}, not an image, a folder of images or a manifest "
                                 f"(a text file listing image paths); image files end in {', '.join(IMAGE_SUFFIXES)}")
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


@dataclass
class Extraction:
    """Features of the images that could be read, in input order, and the ones that could not."""

    features: dict[str, np.ndarray]  # view -> float32 [N, D], L2-normalised rows
    paths: list[str]
    skipped: list[tuple[str, str]]  # (path, reason)


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

    def extract(self, images: Sequence[Any], *, views: str | Sequence[str] | None = None,
                skip_unreadable: bool = False, progress: bool | None = None,
                on_skip: Callable[[str, str], None] | None = None) -> Extraction:
        """Features of every readable image. An unreadable one raises InputError naming it, or
        with `skip_unreadable` is left out (reported through `on_skip(path, reason)` and in
        `Extraction.skipped`). `progress`: a bar on a terminal, plain log lines elsewhere (None,
        the default), or nothing (False)."""
        from purireid.evaluation.inference import UnreadableImage, feature_batches, image_batches

        wanted = self.views if views is None else resolve_views(views)
        skipped: list[tuple[str, str]] = []

        def unreadable(name: str, reason: str) -> None:
            skipped.append((name, reason))
            if on_skip is not None:
                on_skip(name, reason)

        height, width = self.input_size
        batches = image_batches(images, height, width, self.batch_size, workers=self.workers,
                                on_unreadable=unreadable if skip_unreadable else None)
        channels_last = (self.channels_last and self.device.type == "cuda") or self.cpu_fast_path
        chunks: dict[str, list[np.ndarray]] = {v: [] for v in wanted}
        kept: list[int] = []
        try:
            for feats, indices in feature_batches(self.model, batches, self.device, amp=self.amp,
                                                  channels_last=channels_last, views=wanted, desc="extract",
                                                  progress=progress is not False):
                for v in wanted:
                    chunks[v].append(feats[v].numpy())
                kept += indices.tolist()
        except UnreadableImage as err:
            raise InputError(f"{err}; fix or remove it, or pass --skip-unreadable (skip_unreadable=True) to leave "
                             "unreadable images out") from None
        dim = self.feat_dim
        features = {v: (np.concatenate(chunks[v]) if chunks[v] else np.zeros((0, dim), np.float32)) for v in wanted}
        names = [str(images[i]) if isinstance(images[i], (str, Path)) else f"<image {i}>" for i in kept]
        return Extraction(features=features, paths=names, skipped=skipped)


# --------------------------------------------------------------------------- feature files


def write_feature_file(path: str | Path, extraction: Extraction, checkpoint: Checkpoint) -> None:
    """Write the features, the image paths and the model's provenance atomically (purireid.io.features)."""
    from purireid.io.features import FeatureProvenance
    from purireid.io.features import write_feature_file as write

    attrs = {"checkpoint_path": str(checkpoint.path.resolve()), "arch": checkpoint.arch, "feat_dim": checkpoint.feat_dim}
    write(path, extraction.features, extraction.paths,
          FeatureProvenance("extract", checkpoint.sha256, checkpoint.input_size, attrs),
          skipped=[p for p, _ in extraction.skipped])


def read_feature_file(path: str | Path) -> FeatureFile:
    """Read a feature file (of `purireid extract`, or the workflow's teacher features); anything
    else is refused with one line saying what it is (FeatureFileMismatch)."""
    from purireid.io.features import FeatureFileMismatch
    from purireid.io.features import read_feature_file as read

    stored = read(path, fix=EXTRACT_FIX)
    if stored.input_size is None:
        raise FeatureFileMismatch(f"{path}: it does not record the input size of its model; {EXTRACT_FIX}")
    return stored


def made_from(features: FeatureFile) -> str:
    """The checkpoint a feature file was made from, as far as it recorded it: its path, else its sha256."""
    if features.checkpoint_path:
        return str(features.checkpoint_path)
    if features.checkpoint_sha256:
        return f"the checkpoint with sha256 {features.checkpoint_sha256[:12]}… (its path is not recorded)"
    return "an unrecorded checkpoint"


def check_same_model(a: FeatureFile | Checkpoint, b: FeatureFile) -> None:
    """Refuse to compare features of two different checkpoints, input sizes or dimensions (naming both)."""
    def name(x: FeatureFile | Checkpoint) -> str:
        return f"{'checkpoint' if isinstance(x, Checkpoint) else 'feature file'} {x.path}"

    sha_a = a.sha256 if isinstance(a, Checkpoint) else a.checkpoint_sha256
    problems = []
    if sha_a != b.checkpoint_sha256:
        problems.append(f"different checkpoints (sha256 {sha_a[:12]}… vs {b.checkpoint_sha256[:12]}…)")
    if tuple(a.input_size) != tuple(b.input_size):
        problems.append(f"different input sizes ({a.input_size[0]}x{a.input_size[1]} vs "
                        f"{b.input_size[0]}x{b.input_size[1]})")
    if a.feat_dim != b.feat_dim:
        problems.append(f"features of different dimensions ({a.feat_dim} vs {b.feat_dim})")
    if problems:
        raise InputError(
            f"{name(a)} and {name(b)} come from {' and '.join(problems)}: their features cannot be compared. "
            f"Extract both with the same checkpoint: purireid extract CHECKPOINT IMAGES... --out FILE "
            f"(gallery {b.path} was made from {made_from(b)})")
