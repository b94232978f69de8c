"""Stage train_student: a fresh model trained like the teacher after a warm-up epoch on the
teacher's features, and distilled from the teacher (docs/method.md, Distillation)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from purireid.data import read_manifest
from purireid.runtime.distributed import DistContext, launch, per_process_bn_groups
from purireid.io.files import sha256_file
from purireid.io.checkpoints import load_model_checkpoint
from purireid.io.features import read_teacher_features
from purireid.training.loop import TeacherGuidance, TrainFiles, train


def _worker(config: Mapping[str, Any], files: TrainFiles, teacher_checkpoint: Path,
            teacher_features: Path, *, ctx: DistContext) -> None:
    checkpoint_sha = sha256_file(teacher_checkpoint)
    train_paths = [r.path for r in read_manifest(files.manifest)["train"]]
    stored = read_teacher_features(teacher_features, expected_checkpoint_sha256=checkpoint_sha,
                                   expected_paths=train_paths)
    teacher_model = load_model_checkpoint(
        teacher_checkpoint, ctx.device, bn_groups=per_process_bn_groups(config["model"]["bn_groups"], ctx.world_size))
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    if ctx.device.type == "cuda" and config["train"]["channels_last"]:
        teacher_model.to(memory_format=torch.channels_last)
    guidance = TeacherGuidance(model=teacher_model, features=stored["features"], checkpoint_sha256=checkpoint_sha)
    train(config, files, ctx=ctx, teacher=guidance)


def run(config: Mapping[str, Any], *, manifest: str | Path, teacher_checkpoint: str | Path,
        teacher_features: str | Path, model_out: str | Path, log_jsonl: str | Path, curve_png: str | Path,
        state_dir: str | Path, source_weights: str | Path | None = None) -> None:
    """Train the student from fresh weights (model.pretrained); resumes from `state_dir`.

    `config`: at least the keys purireid.config.resolve.stage_config(config, "train_student") holds.
    `source_weights`: the pretrain_source checkpoint, used when model.pretrained is 'source'.

    Over 8 parameters on purpose: like every stage's `run`, one keyword per named input and
    output of its rule, which the rule's script passes by name.
    """
    files = TrainFiles(Path(manifest), Path(model_out), Path(log_jsonl), Path(curve_png), Path(state_dir),
                       None if source_weights is None else Path(source_weights))
    launch(_worker, dict(config), files, Path(teacher_checkpoint), Path(teacher_features),
           world_size=config["train"]["gpus"], device=config["device"])
