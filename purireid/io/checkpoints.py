"""What the stages write and read back, with its provenance: the resolved config beside the
outputs, config fingerprints, model checkpoints and the resume state of a training run; and the
one reader of torch files, which first says what a file is.

Every file is written atomically (purireid.io.files) and byte-reproducibly: equal inputs give equal
bytes (no timestamps, no temporary names inside archives). Every torch file is read with one
trust policy, weights_only=True (purireid.io.files.torch_load): model checkpoints, resume states
and best epochs hold only tensors and plain values. A file that is not a purireid checkpoint is
refused with one line saying what it is (`describe_file`: a TorchScript or ONNX export, an HDF5
feature file, a text file, a folder, ...). The HDF5 feature files are purireid.io.features's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from purireid import __version__
from purireid.config.dag import TRAINED_BY
from purireid.config.resolve import without_execution_keys
from purireid.io.files import sha256_file, torch_load, torch_save_atomic, write_yaml_atomic
from purireid.log import get_logger
from purireid.model.network import build_model, input_norm_of

log = get_logger("checkpoints")

STATE_FILE = "state.pth"
BEST_FILE = "best.pth"
CHECKPOINT_KEYS = ("state_dict", "arch", "feat_dim", "config")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# The fix when a checkpoint given by a person cannot be used (the stages give their own).
CHECKPOINT_FIX = ("give the model.pth written by the train_teacher or train_student rule "
                  "(results/<dataset>/student/model.pth)")
DAMAGED_ZIP = ("a zip archive, as torch.save writes, cut short or corrupted (e.g. a partial copy, or a file "
               "another program wrote or changed)")


def stage_checkpoint_fix(path: str | Path) -> str:
    """The fix for a damaged or foreign stage checkpoint: the command that rebuilds it. A plain
    rerun would not: the file is newer than its inputs."""
    rule = {**TRAINED_BY, "source": "pretrain_source"}.get(Path(path).parent.name)
    if rule is None:
        return "rebuild it with snakemake --forcerun RULE, RULE the rule that writes it"
    return f"rebuild it with snakemake --forcerun {rule}"


class CheckpointError(ValueError):
    """A file given as a checkpoint is missing or is not one; the message says what it is and the fix."""


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


# --------------------------------------------------------------------------- what a file is


def file_kind(path: str | Path) -> str:
    """What `path` is, from its first bytes (nothing is loaded): "missing", "folder", "empty
    folder", "empty file", "hdf5", "torch" (a torch.save file), "torchscript", "onnx", "text",
    "damaged" (a zip archive, as torch.save writes, that cannot be opened), "unreadable" or "binary"."""
    path = Path(path)
    if path.is_dir():
        return "folder" if any(path.iterdir()) else "empty folder"
    if not path.exists():
        return "missing"
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return "unreadable"
    if not head:
        return "empty file"
    if head.startswith(HDF5_SIGNATURE):
        return "hdf5"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "damaged"  # a zip archive (as torch.save writes) cut short or corrupted
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        return "torch" if any(n.endswith("/data.pkl") for n in names) else "binary"
    if head.startswith(b"\x80\x02"):  # torch.save's legacy (pre-zip) format: a pickled magic number
        return "torch"
    # An ONNX model is a protobuf ModelProto: field 1 (ir_version, a varint) first, then its
    # producer ("pytorch" for torch.onnx); no magic number, so the suffix counts too.
    if head[:1] == b"\x08" and (path.suffix.lower() == ".onnx" or b"pytorch" in head[:256] or b"onnx" in head[:256]):
        return "onnx"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "text"
        except UnicodeDecodeError as exc:
            if exc.start >= len(head) - 3:  # a multi-byte character cut by the 4 KiB read
                return "text"
    return "binary"


def describe_file(path: str | Path) -> str:
    """One phrase saying what `path` is, for messages ("<path> is <phrase>, not ..."): a purireid
    checkpoint (its arch), another torch file, a TorchScript export, an ONNX model, a purireid
    feature file (which kind), another HDF5 file, a text file, a folder, an empty folder, ..."""
    kind = file_kind(path)
    if kind == "hdf5":
        from purireid.io.features import describe_hdf5

        return describe_hdf5(path)
    if kind == "torch":
        try:
            obj = torch_load(path)
        except Exception:  # noqa: BLE001 - what it is matters here, not why torch refused it
            return "a PyTorch file that does not load without running code, or is damaged"
        return _describe_torch_object(obj)
    return {
        "missing": "missing (no such file or folder)",
        "folder": "a folder",
        "empty folder": "an empty folder",
        "empty file": "an empty file",
        "torchscript": "a TorchScript export (loaded with torch.jit.load)",
        "onnx": "an ONNX model (run with onnxruntime)",
        "text": "a text file",
        "unreadable": "a file this user cannot read",
        "damaged": DAMAGED_ZIP,
    }.get(kind, "a binary file of an unknown format")


def require_kind(path: Path, kind: str, role: str, expected: str, fix: str, error: type[Exception]) -> None:
    """Raise `error` unless `path` is a file of `kind` (file_kind), naming the file by the `role` it
    was given for: "<role> <path>: no such file; <fix>", or "<role> <path> is <what it is>, not
    <expected>; <fix>"."""
    found = file_kind(path)
    if found == "missing":
        raise error(f"{role} {path}: no such file; {fix}")
    if found == "damaged" and kind == "torch":
        raise error(f"{role} {path} is damaged: {DAMAGED_ZIP}; {fix}")
    if found != kind:
        raise error(f"{role} {path} is {describe_file(path)}, not {expected}; {fix}")


def _describe_torch_object(obj: Any) -> str:
    if isinstance(obj, dict) and all(k in obj for k in CHECKPOINT_KEYS):
        return f"a purireid checkpoint ({obj['arch']})"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "a PyTorch file holding a bare state_dict (weights without the arch and config of a checkpoint)"
    if isinstance(obj, dict) and "fingerprint" in obj and "optimizer" in obj:
        return "the resume state of a training job (state/state.pth), not a finished checkpoint"
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(obj, dict) or k not in obj]
    return f"a PyTorch file holding a {type(obj).__name__} without the key(s) {', '.join(missing)}"


# --------------------------------------------------------------------------- model checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A model checkpoint, read and checked: what is needed to rebuild its model, and the rest of
    what the stage recorded (`extra`: role, epochs, the best epoch and its mAP, ...)."""

    path: Path
    sha256: str
    arch: str
    feat_dim: int
    input_size: tuple[int, int]  # (height, width) the model was trained and evaluated at
    config: dict
    state_dict: dict = field(repr=False)
    extra: dict = field(default_factory=dict, repr=False)

    def model(self, bn_groups: int = 1) -> torch.nn.Module:
        """The model with the checkpoint's weights, on the CPU, as built (train mode)."""
        model = build_model(self.arch, pretrained="none", bn_groups=bn_groups, input_norm=input_norm_of(self.config))
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {self.path}: its weights do not fit a purireid {self.arch} "
                                  f"({str(exc).splitlines()[0]}); was the file edited or written by another "
                                  "program? Rerun the stage that wrote it") from None
        return model

    def build_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model in eval mode on `device`, with the checkpoint's weights."""
        return self.model().to(device).eval()


def read_checkpoint(path: str | Path, *, fix: str = CHECKPOINT_FIX) -> Checkpoint:
    """Open a `model.pth` written by the training stages (weights_only); a `CheckpointError` saying
    what the file is, and `fix`, for anything else."""
    path = Path(path)
    require_kind(path, "torch", "checkpoint", "a purireid checkpoint", fix, CheckpointError)
    try:
        obj = torch_load(path)
    except Exception as exc:  # noqa: BLE001 - truncated zip, a pickle with code, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is damaged, or a PyTorch file that needs code to load "
                              f"({first[:160]}); {fix}") from None
    if not (isinstance(obj, dict) and all(k in obj for k in CHECKPOINT_KEYS)):
        raise CheckpointError(f"checkpoint {path} is {_describe_torch_object(obj)}, not a purireid checkpoint; {fix}")
    data = obj["config"].get("data", {}) if isinstance(obj["config"], dict) else {}
    try:
        size = (int(data["height"]), int(data["width"]))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"checkpoint {path}: its config lacks data.height / data.width (the input size); "
                              f"{fix}") from None
    extra = {k: v for k, v in obj.items() if k not in CHECKPOINT_KEYS}
    return Checkpoint(path=path, sha256=sha256_file(path), arch=str(obj["arch"]), feat_dim=int(obj["feat_dim"]),
                      input_size=size, config=dict(obj["config"]), state_dict=obj["state_dict"], extra=extra)


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
    """Rebuild a model from a stage checkpoint (random init, then the stored weights) on `device`."""
    return read_checkpoint(path, fix=stage_checkpoint_fix(path)).model(bn_groups).to(device)


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
        state = torch_load(path)
    except Exception as exc:  # noqa: BLE001 - damaged, or holds something weights_only refuses
        log.warning("ignoring unreadable resume state %s (%s); starting from scratch", path, exc)
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        log.warning("resume state %s was made with another config or inputs; starting from scratch", path)
        return None
    return state


def save_best(state_dir: str | Path, model: torch.nn.Module, config: Mapping[str, Any], *, epoch: int,
              mAP: float) -> None:
    """Keep the weights of the best-by-test-mAP epoch so far (train.keep_best)."""
    save_model_checkpoint(Path(state_dir) / BEST_FILE, model, config, epoch=epoch, mAP=mAP)


def load_best(state_dir: str | Path) -> dict | None:
    """The checkpoint `save_best` kept (as the dict it saved), or None."""
    path = Path(state_dir) / BEST_FILE
    return torch_load(path) if path.exists() else None


def clear_state(state_dir: str | Path) -> None:
    """Remove the resume state once the final output is written."""
    for name in (STATE_FILE, BEST_FILE):
        (Path(state_dir) / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        Path(state_dir).rmdir()
