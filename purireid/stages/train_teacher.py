"""Stage train_teacher: train the teacher from ImageNet initialisation on pseudo labels of its
own features (docs/method.md: Pseudo labels, Memories and losses)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from purireid.runtime.distributed import DistContext, launch
from purireid.training.loop import TrainFiles, train


def _worker(config: Mapping[str, Any], files: TrainFiles, *, ctx: DistContext) -> None:
    train(config, files, ctx=ctx)


def run(config: Mapping[str, Any], *, manifest: str | Path, model_out: str | Path, log_jsonl: str | Path,
        curve_png: str | Path, state_dir: str | Path, source_weights: str | Path | None = None) -> None:
    """Train the teacher; resumes from `state_dir` after an interruption.

    `config`: at least the keys purireid.config.resolve.stage_config(config, "train_teacher") holds.
    `source_weights`: the pretrain_source checkpoint, used when model.pretrained is 'source'.
    """
    files = TrainFiles(Path(manifest), Path(model_out), Path(log_jsonl), Path(curve_png), Path(state_dir),
                       None if source_weights is None else Path(source_weights))
    launch(_worker, dict(config), files, world_size=config["train"]["gpus"], device=config["device"])
