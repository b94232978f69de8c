"""What the stages write and read back, with its provenance: the resolved config beside the
outputs, config fingerprints, model checkpoints and the resume state of a training run; and the
one reader of model checkpoints, which first says what a file is.

Every file is written atomically (purireid.io.files) and byte-reproducibly: equal inputs give equal
bytes (no timestamps, no temporary names inside archives). Every torch file is read with one
trust policy, weights_only=True (purireid.io.files.torch_load): model checkpoints, resume states
and best epochs hold only tensors and plain values. A file that is not a purireid checkpoint is
refused with one line saying what it is (purireid.io.filekinds.describe_file: a TorchScript or
ONNX export, an HDF5 feature file, a text file, a folder, ...). The HDF5 feature files are
purireid.io.features's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from purireid import __version__
from purireid.config.dag import TRAINED_BY
from purireid.config.resolve import without_execution_keys
from purireid.io.filekinds import CHECKPOINT_KEYS, describe_torch_object, require_kind
from purireid.io.files import sha256_file, torch_load, torch_save_atomic, write_yaml_atomic
from purireid.log import get_logger
from purireid.model.network import build_model, input_norm_of

log = get_logger("checkpoints")

STATE_FILE = "state.pth"
BEST_FILE = "best.pth"
# The fix when a checkpoint given by a person cannot be used (the stages give their own).
CHECKPOINT_FIX = ("give the model.pth written by the train_teacher or train_student rule "
                  "(results/<dataset>/student/model.pth)")


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
        raise CheckpointError(f"checkpoint {path} is {describe_torch_object(obj)}, not a purireid checkpoint; {fix}")
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
