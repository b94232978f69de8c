"""The HDF5 feature file: one layout for the workflow's teacher features and for `purireid extract`.

    /features/<view>   float32 [N, D]   the teacher file: all three views; `purireid extract`:
                                        the global view, or all three (--views all)
    /paths             UTF-8 [N]        image paths (teacher: relative to data_root, as in the
                                        manifest; extract: absolute)
    /pids, /camids     int64 [N]        the teacher file: the manifest's identities and cameras
    /skipped           UTF-8 [S]        extract: unreadable images left out
    attrs              format "purireid-features", format_version 2, kind ("teacher" or
                       "extract"), checkpoint_sha256 (the model that made them), input_height /
                       input_width, purireid_version; teacher: image_list_sha256 and config
                       (YAML, less its execution-only keys); extract: checkpoint_path, arch, feat_dim

Written atomically and without timestamps: equal features give equal bytes. Files of the
previous layouts (teacher files without `format`, version-1 extract files) are read too.
Provenance is checked on reading: a file of another checkpoint, input size or image list is
refused with `FeatureFileMismatch`, naming the file and the fix; so is anything that is not a
feature file, saying what it is (purireid.io.filekinds.describe_file).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from purireid import VIEWS, __version__
from purireid.config.resolve import without_execution_keys
from purireid.io.filekinds import FEATURE_FILE_FORMAT, FEATURE_KINDS, feature_file_kind, require_kind
from purireid.io.files import atomic_hdf5, image_list_digest

__all__ = ["FEATURE_FILE_FORMAT", "FeatureFile", "FeatureFileMismatch", "FeatureProvenance", "read_feature_file",
           "read_teacher_features", "write_feature_file", "write_teacher_features"]

FEATURE_FILE_VERSION = 2
TEACHER_FIX = "delete it and rerun extract_teacher_features (snakemake -R extract_teacher_features)"


class FeatureFileMismatch(ValueError):
    """A feature file is unreadable, is not one, or does not belong to the given checkpoint,
    input size or image list; the message names the file and the fix."""


@dataclass
class FeatureFile:
    """The content of a feature file (either kind)."""

    path: Path
    kind: str  # "teacher" or "extract"
    features: dict[str, np.ndarray]  # view -> float32 [N, D]
    paths: list[str]
    checkpoint_sha256: str
    input_size: tuple[int, int] | None  # (height, width); None in old teacher files without it
    checkpoint_path: str = ""
    arch: str = ""
    pids: np.ndarray | None = None
    camids: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)
    config: str = ""  # YAML (teacher files)
    purireid_version: str = ""

    @property
    def feat_dim(self) -> int:
        return int(next(iter(self.features.values())).shape[1])


@dataclass(frozen=True)
class FeatureProvenance:
    """Where a feature file's features come from: its kind ("teacher" or "extract"), the sha256 of
    the checkpoint that made them, the model's input size (height, width), and the kind's own
    attributes (teacher: image_list_sha256, config; extract: checkpoint_path, arch, feat_dim)."""

    kind: str
    checkpoint_sha256: str
    input_size: tuple[int, int] | None
    attrs: Mapping[str, Any] = field(default_factory=dict)


def write_feature_file(path: str | Path, features: Mapping[str, Any], paths: Sequence[str],
                       provenance: FeatureProvenance, *, pids: Sequence[int] | None = None,
                       camids: Sequence[int] | None = None, skipped: Sequence[str] = ()) -> None:
    """Write a feature file atomically, in the one layout (module docstring). `features`: view ->
    [N, D] array or tensor, in VIEWS order."""
    kind, input_size = provenance.kind, provenance.input_size
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature file kind {kind!r} (one of {', '.join(FEATURE_KINDS)})")
    strings = h5py.string_dtype()
    with atomic_hdf5(path) as h5:  # built in memory: HDF5 must never meet a full disk itself
        group = h5.create_group("features")
        for view in (v for v in VIEWS if v in features):
            array = np.asarray(features[view], dtype=np.float32)
            group.create_dataset(view, data=array, track_times=False,
                                 chunks=(min(len(array), 1024), array.shape[1]) if len(array) else None)
        h5.create_dataset("paths", data=np.asarray(list(paths), dtype=strings), track_times=False)
        if pids is not None:
            h5.create_dataset("pids", data=np.asarray(pids, dtype=np.int64), track_times=False)
        if camids is not None:
            h5.create_dataset("camids", data=np.asarray(camids, dtype=np.int64), track_times=False)
        if kind == "extract":
            h5.create_dataset("skipped", data=np.asarray(list(skipped), dtype=strings), track_times=False)
        h5.attrs.update({"format": FEATURE_FILE_FORMAT, "format_version": FEATURE_FILE_VERSION, "kind": kind,
                         "checkpoint_sha256": provenance.checkpoint_sha256, "purireid_version": __version__})
        if input_size is not None:
            h5.attrs.update({"input_height": int(input_size[0]), "input_width": int(input_size[1])})
        h5.attrs.update(dict(provenance.attrs))


def _strings(dataset: Any) -> list[str]:
    return [p.decode() if isinstance(p, bytes) else str(p) for p in dataset[()]]


def read_feature_file(path: str | Path, *, fix: str, expected_checkpoint_sha256: str | None = None,
                      expected_paths: Sequence[str] | None = None) -> FeatureFile:
    """Read a feature file of either kind, refusing anything else (saying what it is), a damaged
    one, or one of another checkpoint or image list, with `fix`."""
    path = Path(path)
    require_kind(path, "hdf5", "feature file", "a feature file", fix, FeatureFileMismatch)
    try:
        with h5py.File(path, "r") as h5:
            kind = feature_file_kind(h5)
            if kind is None:
                raise FeatureFileMismatch(f"{path} is an HDF5 file that purireid did not write (it lacks /features, "
                                          f"/paths or the checkpoint's sha256); {fix}")
            features = {v: h5[f"features/{v}"][()] for v in VIEWS if f"features/{v}" in h5}
            stored = FeatureFile(
                path=path, kind=kind, features=features, paths=_strings(h5["paths"]),
                checkpoint_sha256=str(h5.attrs.get("checkpoint_sha256", "")),
                input_size=(int(h5.attrs["input_height"]), int(h5.attrs["input_width"]))
                if "input_height" in h5.attrs and "input_width" in h5.attrs else None,
                checkpoint_path=str(h5.attrs.get("checkpoint_path", "")), arch=str(h5.attrs.get("arch", "")),
                pids=h5["pids"][()] if "pids" in h5 else None, camids=h5["camids"][()] if "camids" in h5 else None,
                skipped=_strings(h5["skipped"]) if "skipped" in h5 else [],
                config=str(h5.attrs.get("config", "")), purireid_version=str(h5.attrs.get("purireid_version", "")))
    except FeatureFileMismatch:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py's own messages ("truncated file: eof = ...") name neither
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FeatureFileMismatch(f"{path} cannot be read as a feature file ({first}): it is truncated or "
                                  f"damaged; {fix}") from None
    if stored.input_size is None and stored.config:  # teacher files before version 2: from the config
        data = (yaml.safe_load(stored.config) or {}).get("data", {})
        if "height" in data and "width" in data:
            stored.input_size = (int(data["height"]), int(data["width"]))
    lengths = {len(f) for f in features.values()} | {len(stored.paths)}
    if not features or len(lengths) != 1:
        raise FeatureFileMismatch(f"{path}: its features and image paths disagree in length; {fix}")
    if expected_checkpoint_sha256 is not None and stored.checkpoint_sha256 != expected_checkpoint_sha256:
        raise FeatureFileMismatch(
            f"{path} was extracted from a checkpoint with sha256 {stored.checkpoint_sha256[:12]}…, but the "
            f"checkpoint given has sha256 {expected_checkpoint_sha256[:12]}…; the model was retrained since: {fix}")
    if expected_paths is not None and list(expected_paths) != stored.paths:
        raise FeatureFileMismatch(
            f"{path} holds features of {len(stored.paths)} images that differ from the manifest's "
            f"{len(expected_paths)} images (list hash {image_list_digest(stored.paths)[:12]}… vs "
            f"{image_list_digest(expected_paths)[:12]}…); the dataset was prepared again since: {fix}")
    return stored


# --------------------------------------------------------------------------- the teacher's file


def write_teacher_features(path: str | Path, features: Mapping[str, Any], *, paths: Sequence[str],
                           camids: Sequence[int], pids: Sequence[int], checkpoint_sha256: str,
                           config: Mapping[str, Any]) -> None:
    """The teacher-feature file of extract_teacher_features: the three views of every train image,
    with the manifest's identities, the image list's hash and the config."""
    data = config.get("data", {})
    size = (data["height"], data["width"]) if "height" in data and "width" in data else None
    attrs = {"image_list_sha256": image_list_digest(paths),
             "config": yaml.safe_dump(without_execution_keys(config), sort_keys=False)}
    write_feature_file(path, {v: features[v] for v in VIEWS}, paths,
                       FeatureProvenance("teacher", checkpoint_sha256, size, attrs), pids=pids, camids=camids)


def read_teacher_features(path: str | Path, *, expected_checkpoint_sha256: str | None = None,
                          expected_paths: Sequence[str] | None = None) -> dict:
    """The teacher-feature file as a dict (features: view -> float32 tensor [N, D], paths, camids,
    pids, checkpoint_sha256, config, purireid_version), refusing a damaged one, or one made from
    another checkpoint or image list, with the fix."""
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher feature file {path} does not exist; run the extract_teacher_features rule")
    stored = read_feature_file(path, fix=TEACHER_FIX, expected_checkpoint_sha256=expected_checkpoint_sha256,
                               expected_paths=expected_paths)
    missing = [f"/features/{v}" for v in VIEWS if v not in stored.features]
    missing += [name for name, value in (("/pids", stored.pids), ("/camids", stored.camids)) if value is None]
    if stored.kind != "teacher" or missing:
        raise FeatureFileMismatch(f"{path} is {FEATURE_KINDS.get(stored.kind, 'a feature file')}, not a teacher-feature "
                                  f"file (it lacks {', '.join(missing) or 'the teacher kind'}); {TEACHER_FIX}")
    return {
        "features": {v: torch.from_numpy(stored.features[v]) for v in VIEWS},
        "paths": stored.paths,
        "camids": stored.camids,
        "pids": stored.pids,
        "checkpoint_sha256": stored.checkpoint_sha256,
        "config": stored.config,
        "purireid_version": stored.purireid_version,
    }
