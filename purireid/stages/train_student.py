"""Stage: train the student, distilled from the teacher (SPEC §5)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from purireid.data import read_manifest
from purireid.distributed import DistContext, launch
from purireid.features import read_features_h5
from purireid.io import sha256_file
from purireid.stages.common import load_model_checkpoint
from purireid.stages.trainer import TeacherGuidance, per_process_bn_groups, train


def _worker(config: Mapping[str, Any], paths: dict[str, Path], teacher_checkpoint: Path,
            teacher_features: Path, *, ctx: DistContext) -> None:
    checkpoint_sha = sha256_file(teacher_checkpoint)
    train_paths = [r.path for r in read_manifest(paths["manifest"])["train"]]
    stored = read_features_h5(teacher_features, expected_checkpoint_sha256=checkpoint_sha, expected_paths=train_paths)
    teacher_model = load_model_checkpoint(
        teacher_checkpoint, ctx.device, bn_groups=per_process_bn_groups(config["model"]["bn_groups"], ctx.world_size))
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    if ctx.device.type == "cuda" and config["train"]["channels_last"]:
        teacher_model.to(memory_format=torch.channels_last)
    guidance = TeacherGuidance(model=teacher_model, features=stored["features"], checkpoint_sha256=checkpoint_sha)
    train(config, **paths, ctx=ctx, teacher=guidance, role="student")


def run(config: Mapping[str, Any], *, manifest: str | Path, teacher_checkpoint: str | Path,
        teacher_features: str | Path, model_out: str | Path, log_jsonl: str | Path, curve_png: str | Path,
        state_dir: str | Path) -> None:
    """Train the student from a fresh ImageNet-initialised model; resumes from `state_dir`."""
    paths = {"manifest": Path(manifest), "model_out": Path(model_out), "log_jsonl": Path(log_jsonl),
             "curve_png": Path(curve_png), "state_dir": Path(state_dir)}
    launch(_worker, dict(config), paths, Path(teacher_checkpoint), Path(teacher_features),
           world_size=config["train"]["gpus"], device=config["device"])
