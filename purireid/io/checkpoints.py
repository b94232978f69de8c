"""What the stages write and read back, with its provenance: the resolved config beside the
outputs, config fingerprints, model checkpoints, the resume state of a training run, and the
teacher-feature HDF5 file.

Every file is written atomically (purireid.io.files) and byte-reproducibly: equal inputs give equal
bytes (no timestamps, no temporary names inside archives).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import yaml

from purireid import VIEWS, __version__
from purireid.config.resolve import without_execution_keys
from purireid.io.files import atomic_hdf5, torch_save_atomic, write_yaml_atomic
from purireid.log import get_logger
from purireid.model.network import build_model, input_norm_of

log = get_logger("checkpoints")

STATE_FILE = "state.pth"
BEST_FILE = "best.pth"


# --------------------------------------------------------------------------- config, provenance


def write_resolved_config(output: str | Path, config: Mapping[str, Any]) -> Path:
    """Write the config a job ran with beside `output` (as <output dir>/config.yaml)."""
    target = Path(output).parent / "config.yaml"
    write_yaml_atomic(target, dict(config))
    return target


def config_fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-able parts (config sections, input hashes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def image_list_digest(paths: Sequence[str]) -> str:
    """A hash of an ordered image list, to tie a feature file or a resume state to a manifest."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode())
        digest.update(b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------- model checkpoints


def save_model_checkpoint(path: str | Path, model: torch.nn.Module, config: Mapping[str, Any], **extra: Any) -> None:
    """A stage output: weights plus what is needed to rebuild the model, and the config that
    made them (less its execution-only keys, which cannot change the weights)."""
    model = getattr(model, "module", model)
    torch_save_atomic(
        {
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "arch": config["model"]["arch"],
            "feat_dim": int(model.feat_dim),
            "config": without_execution_keys(config),
            "purireid_version": __version__,
            **extra,
        },
        path,
    )


def load_model_checkpoint(path: str | Path, device: torch.device, bn_groups: int = 1) -> torch.nn.Module:
    """Rebuild a model from a stage checkpoint (random init, then the stored weights)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; run the stage that writes it first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        arch, state_dict = checkpoint["arch"], checkpoint["state_dict"]
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable purireid checkpoint ({exc}); rerun the stage that writes it") from exc
    model = build_model(arch, pretrained="none", bn_groups=bn_groups,
                        input_norm=input_norm_of(checkpoint.get("config", {})))
    model.load_state_dict(state_dict)
    return model.to(device)


# --------------------------------------------------------------------------- resume state


def save_state(state_dir: str | Path, state: Mapping[str, Any]) -> None:
    """The whole training state after an epoch (a full disk raises DiskFullError naming the file)."""
    torch_save_atomic(dict(state), Path(state_dir) / STATE_FILE)


def load_state(state_dir: str | Path, fingerprint: str) -> dict | None:
    """The saved training state, or None when absent or made by another config/input."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        log.warning("ignoring unreadable resume state %s (%s); starting from scratch", path, exc)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("resume state %s was made with another config or inputs; starting from scratch", path)
        return None
    return state


def save_best(state_dir: str | Path, model: torch.nn.Module, config: Mapping[str, Any], *, epoch: int,
              mAP: float) -> None:
    """Keep the weights of the best-by-test-mAP epoch so far (train.keep_best)."""
    save_model_checkpoint(Path(state_dir) / BEST_FILE, model, config, epoch=epoch, mAP=mAP)


def load_best(state_dir: str | Path) -> dict | None:
    """The checkpoint `save_best` kept, or None."""
    path = Path(state_dir) / BEST_FILE
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def clear_state(state_dir: str | Path) -> None:
    """Remove the resume state once the final output is written."""
    for name in (STATE_FILE, BEST_FILE):
        (Path(state_dir) / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        Path(state_dir).rmdir()


# --------------------------------------------------------------------------- teacher features (HDF5)


class FeatureFileMismatch(ValueError):
    """The HDF5 feature file is unreadable, or does not belong to the given checkpoint or image list."""


def write_teacher_features(
    path: str | Path,
    features: Mapping[str, torch.Tensor | np.ndarray],
    *,
    paths: Sequence[str],
    camids: Sequence[int],
    pids: Sequence[int],
    checkpoint_sha256: str,
    config: Mapping[str, Any],
) -> None:
    """Write the teacher-feature file atomically; no timestamps, so equal features give equal bytes."""
    with atomic_hdf5(path) as h5:
        group = h5.create_group("features")
        for view in VIEWS:
            array = np.asarray(features[view], dtype=np.float32)
            group.create_dataset(view, data=array, track_times=False,
                                 chunks=(min(len(array), 1024), array.shape[1]) if len(array) else None)
        h5.create_dataset("paths", data=np.asarray(list(paths), dtype=h5py.string_dtype()), track_times=False)
        h5.create_dataset("camids", data=np.asarray(camids, dtype=np.int64), track_times=False)
        h5.create_dataset("pids", data=np.asarray(pids, dtype=np.int64), track_times=False)
        h5.attrs["checkpoint_sha256"] = checkpoint_sha256
        h5.attrs["image_list_sha256"] = image_list_digest(paths)
        h5.attrs["config"] = yaml.safe_dump(without_execution_keys(config), sort_keys=False)
        h5.attrs["purireid_version"] = __version__


_RERUN = "delete it and rerun extract_teacher_features (snakemake -R extract_teacher_features)"


def read_teacher_features(
    path: str | Path,
    *,
    expected_checkpoint_sha256: str | None = None,
    expected_paths: Sequence[str] | None = None,
) -> dict:
    """Read a teacher-feature file, refusing a damaged one, or one made from another checkpoint
    or image list, with the fix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher feature file {path} does not exist; run the extract_teacher_features rule")
    try:
        with h5py.File(path, "r") as h5:
            return _read_teacher_features(h5, path, expected_checkpoint_sha256, expected_paths)
    except (OSError, KeyError, ValueError) as exc:
        if isinstance(exc, FeatureFileMismatch):
            raise
        # h5py's own messages ("truncated file: eof = ...") name neither the file nor the fix.
        raise FeatureFileMismatch(f"{path} cannot be read as a teacher-feature file ({exc}): it is truncated "
                                  f"or damaged; {_RERUN}") from exc


def _read_teacher_features(h5: h5py.File, path: Path, expected_checkpoint_sha256: str | None,
                           expected_paths: Sequence[str] | None) -> dict:
    missing = [f"/features/{v}" for v in VIEWS if f"features/{v}" not in h5]
    missing += [k for k in ("paths", "camids", "pids") if k not in h5]
    if missing:
        raise FeatureFileMismatch(f"{path} lacks {', '.join(missing)}; it is not a purireid teacher-feature file: "
                                  f"{_RERUN}")
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
