"""Stage train_supervised: the teacher's model and recipe trained with the TRUE train labels
instead of pseudo labels. Two uses: the supervised reference (rule train_supervised, an upper
bound that unsupervised papers report; its outputs are marked as using labels) and source
pretraining (rule pretrain_source, on the source dataset's config, purireid.config.resolve.source_config)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from purireid.data import read_manifest
from purireid.runtime.distributed import DistContext, launch
from purireid.labels.sources import label_source
from purireid.training.loop import TrainFiles, train


def _worker(config: Mapping[str, Any], files: TrainFiles, role: str, *, ctx: DistContext) -> None:
    labels = label_source("true_identities", config, read_manifest(files.manifest)["train"])
    labels.role = role
    train(config, files, ctx=ctx, label_source=labels)


def run(config: Mapping[str, Any], *, manifest: str | Path, model_out: str | Path, log_jsonl: str | Path,
        curve_png: str | Path, state_dir: str | Path, role: str = "supervised",
        source_weights: str | Path | None = None) -> None:
    """Train with the identities of the manifest's train split as labels; resumes from `state_dir`.

    `config`: at least the keys purireid.config.resolve.stage_config(config, "train_supervised") holds.
    `role`: what the checkpoint and the logs call the model ("supervised" or "source").
    `source_weights`: the pretrain_source checkpoint, used when model.pretrained is 'source' (the
    supervised reference then starts where the teacher starts).
    """
    files = TrainFiles(Path(manifest), Path(model_out), Path(log_jsonl), Path(curve_png), Path(state_dir),
                       None if source_weights is None else Path(source_weights))
    launch(_worker, dict(config), files, role, world_size=config["train"]["gpus"], device=config["device"])
