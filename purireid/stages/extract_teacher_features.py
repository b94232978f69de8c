"""Stage extract_teacher_features: eval-mode teacher features of every train image, three views,
into HDF5 with their provenance: the checkpoint's hash, the image list's hash and the config
(docs/method.md, Distillation). The teacher's folder keeps the training job's config.yaml."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from purireid.data import read_manifest
from purireid.runtime.distributed import DistContext, launch
from purireid.io.files import sha256_file
from purireid.log import get_logger
from purireid.io.checkpoints import load_model_checkpoint
from purireid.io.features import write_teacher_features
from purireid.evaluation.inference import cache_dir_for, extract_records

log = get_logger("extract")


def _worker(config: Mapping[str, Any], manifest: Path, checkpoint: Path, features_out: Path, *,
            ctx: DistContext) -> None:
    records = read_manifest(manifest)["train"]
    model = load_model_checkpoint(checkpoint, ctx.device)
    features = extract_records(model, records, config, ctx, "teacher features", cache_dir_for(manifest))
    if ctx.is_main:
        write_teacher_features(
            features_out, features, paths=[r.path for r in records], camids=[r.camid for r in records],
            pids=[r.pid for r in records], checkpoint_sha256=sha256_file(checkpoint), config=config)
        log.info("wrote %d × 3 views of %d-d features to %s", len(records), features["global"].shape[1], features_out)


def run(config: Mapping[str, Any], *, manifest: str | Path, checkpoint: str | Path, features_out: str | Path) -> None:
    """`config`: at least the keys purireid.config.resolve.stage_config(config, "extract_teacher_features") holds."""
    launch(_worker, dict(config), Path(manifest), Path(checkpoint), Path(features_out),
           world_size=config["train"]["gpus"], device=config["device"])
