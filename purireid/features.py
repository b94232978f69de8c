"""Eval-mode feature extraction and the teacher-feature HDF5 file."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from purireid import VIEWS, __version__
from purireid.io import atomic_path


class FeatureFileMismatch(ValueError):
    """The HDF5 feature file does not belong to the given checkpoint or image list."""


def autocast_context(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when asked; a no-op elsewhere (CPU runs stay in fp32)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_images: int,
    device: torch.device,
    *,
    amp: bool = False,
    channels_last: bool = False,
    views: Sequence[str] = VIEWS,
    desc: str = "extract",
) -> dict[str, torch.Tensor]:
    """Eval-mode, L2-normalised features of every image the loader yields, as CPU float32.

    Rows are placed by the indices the loader yields, so row i belongs to record i.
    """
    was_training = model.training
    model.eval()
    out: dict[str, torch.Tensor] = {}
    filled = torch.zeros(num_images, dtype=torch.bool)
    try:
        for images, indices in tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=2.0):
            images = images.to(device, non_blocking=True)
            if channels_last and device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp):
                feats = model(images)
            for view in views:
                f = torch.nn.functional.normalize(feats[view].float(), dim=1).cpu()
                if view not in out:
                    out[view] = torch.empty((num_images, f.shape[1]), dtype=torch.float32)
                out[view][indices] = f
            filled[indices] = True
    finally:
        model.train(was_training)
    if num_images and not bool(filled.all()):
        missing = int((~filled).sum())
        raise RuntimeError(f"feature extraction missed {missing} of {num_images} images")
    return out


def image_list_digest(paths: Sequence[str]) -> str:
    """A short hash of an ordered image list, to tie a feature file to a manifest."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def write_features_h5(
    path: str | Path,
    features: dict[str, torch.Tensor | np.ndarray],
    *,
    paths: Sequence[str],
    camids: Sequence[int],
    pids: Sequence[int],
    checkpoint_sha256: str,
    config_yaml: str,
) -> None:
    """Write the teacher-feature file atomically (temporary name, then rename)."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            group = h5.create_group("features")
            for view in VIEWS:
                array = np.asarray(features[view], dtype=np.float32)
                group.create_dataset(view, data=array, chunks=(min(len(array), 1024), array.shape[1]) if len(array) else None)
            h5.create_dataset("paths", data=np.asarray(list(paths), dtype=h5py.string_dtype()))
            h5.create_dataset("camids", data=np.asarray(camids, dtype=np.int64))
            h5.create_dataset("pids", data=np.asarray(pids, dtype=np.int64))
            h5.attrs["checkpoint_sha256"] = checkpoint_sha256
            h5.attrs["image_list_sha256"] = image_list_digest(paths)
            h5.attrs["config"] = config_yaml
            h5.attrs["purireid_version"] = __version__


def read_features_h5(
    path: str | Path,
    *,
    expected_checkpoint_sha256: str | None = None,
    expected_paths: Sequence[str] | None = None,
) -> dict:
    """Read a teacher-feature file, refusing one made from another checkpoint or image list."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher feature file {path} does not exist; run the extract_teacher_features rule")
    with h5py.File(path, "r") as h5:
        missing = [f"/features/{v}" for v in VIEWS if f"features/{v}" not in h5]
        missing += [k for k in ("paths", "camids", "pids") if k not in h5]
        if missing:
            raise FeatureFileMismatch(f"{path} lacks {', '.join(missing)}; it is not a purireid teacher-feature file. "
                                      "Delete it and rerun extract_teacher_features")
        stored_sha = str(h5.attrs.get("checkpoint_sha256", ""))
        if expected_checkpoint_sha256 is not None and stored_sha != expected_checkpoint_sha256:
            raise FeatureFileMismatch(
                f"{path} was extracted from a checkpoint with sha256 {stored_sha[:12]}…, but the teacher "
                f"checkpoint given has sha256 {expected_checkpoint_sha256[:12]}…; the teacher was retrained "
                "since. Rerun extract_teacher_features (snakemake -R extract_teacher_features)"
            )
        paths = [p.decode() if isinstance(p, bytes) else str(p) for p in h5["paths"][()]]
        if expected_paths is not None and list(expected_paths) != paths:
            raise FeatureFileMismatch(
                f"{path} holds features of {len(paths)} images that differ from the manifest's "
                f"{len(expected_paths)} train images (list hash {image_list_digest(paths)[:12]}… vs "
                f"{image_list_digest(expected_paths)[:12]}…); the dataset was prepared again since. "
                "Rerun extract_teacher_features"
            )
        return {
            "features": {v: torch.from_numpy(h5[f"features/{v}"][()]) for v in VIEWS},
            "paths": paths,
            "camids": h5["camids"][()],
            "pids": h5["pids"][()],
            "checkpoint_sha256": stored_sha,
            "config": str(h5.attrs.get("config", "")),
            "purireid_version": str(h5.attrs.get("purireid_version", "")),
        }
