"""Stage pseudo_identities: the identities the method found, as a result. The final model's
eval-mode features of every train image (the teacher's from extract_teacher_features, the
student's extracted here with the same extractor) are clustered by the run's label source with
its settings (cluster.*), as one more epoch would; pseudo_identities.csv lists each image's
camera, pseudo-identity (-1 = outlier) and distance to its cluster's centre, and
pseudo_identities.png shows a sample of the clusters as image strips for a person to judge.

This is the final model's clustering, not the last training epoch's labels (those came from the
weights before the epoch's steps); the training loop is left untouched by it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from purireid.data import Record, read_manifest
from purireid.evaluation.inference import cache_dir_for, extract_records
from purireid.evaluation.reporting import ClusterStrip, cluster_strips_picture
from purireid.io.checkpoints import load_model_checkpoint
from purireid.io.features import read_teacher_features
from purireid.io.files import atomic_path, sha256_file
from purireid.labels.quality import distances_to_centres, sample_clusters, spread_members
from purireid.labels.sources import label_source
from purireid.log import get_logger
from purireid.runtime.distributed import DistContext, launch

log = get_logger("pseudo_identities")

CSV_HEADER = ["path", "camera", "pseudo_identity", "distance_to_centre"]
SHOWN_CLUSTERS = 12


def camera_names(summary: Mapping[str, Any] | None, camids: Sequence[int]) -> list[str]:
    """Each image's camera as the user named it (crops: the prepared summary's camera list),
    else as the dataset numbers it (c1, c2, ...)."""
    named = {c["id"]: c["name"] for c in (summary or {}).get("cameras", [])}
    return [named.get(int(c), f"c{int(c) + 1}") for c in camids]


def write_pseudo_identities(path: str | Path, records: Sequence[Record], cameras: Sequence[str],
                            labels: np.ndarray, distances: np.ndarray) -> None:
    """The CSV (CSV_HEADER), one row per train image in manifest order; written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_HEADER)
        for record, camera, label, distance in zip(records, cameras, labels, distances, strict=True):
            writer.writerow([record.path, camera, int(label), "" if np.isnan(distance) else f"{distance:.6f}"])


def cluster_strips(records: Sequence[Record], cameras: Sequence[str], labels: np.ndarray,
                   distances: np.ndarray, count: int = SHOWN_CLUSTERS, per_strip: int = 10) -> list[ClusterStrip]:
    """The strips of `sample_clusters`: each cluster's caption and a spread of its members."""
    strips = []
    for cluster in sample_clusters(labels, count):
        members = np.flatnonzero(labels == cluster)
        shown = spread_members(members, distances, per_strip)
        num_cameras = len({cameras[i] for i in members})
        strips.append(ClusterStrip(f"id {cluster}\n{len(members)} images\n{num_cameras} camera"
                                   f"{'s' if num_cameras != 1 else ''}", [records[i].path for i in shown]))
    return strips


def _features(config: Mapping[str, Any], records: Sequence[Record], checkpoint: Path,
              teacher_features: Path | None, manifest: Path, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The final model's features: the teacher's stored ones, else extracted from `checkpoint`."""
    if teacher_features is not None:
        stored = read_teacher_features(teacher_features, expected_checkpoint_sha256=sha256_file(checkpoint),
                                       expected_paths=[r.path for r in records])
        return stored["features"]
    model = load_model_checkpoint(checkpoint, ctx.device)
    return extract_records(model, records, config, ctx, "final features", cache_dir_for(manifest))


def _worker(config: Mapping[str, Any], paths: Mapping[str, Path | None], model_name: str, *,
            ctx: DistContext) -> None:
    manifest = paths["manifest"]
    records = read_manifest(manifest)["train"]
    features = _features(config, records, paths["checkpoint"], paths["teacher_features"], manifest, ctx)
    if not ctx.is_main:
        return
    source = label_source(config["cluster"]["method"], config, records, features=features)
    labels = np.asarray(source.assign(features, epoch=0), dtype=np.int64)  # epoch: only named in messages
    distances = distances_to_centres(labels, features)
    summary_path = paths["summary"]
    summary = json.loads(summary_path.read_text()) if summary_path is not None and summary_path.is_file() else None
    cameras = camera_names(summary, [r.camid for r in records])
    write_pseudo_identities(paths["csv"], records, cameras, labels, distances)
    found = int(labels.max()) + 1 if (labels >= 0).any() else 0
    outliers = int((labels < 0).sum())
    title = f"{config['dataset']}: {model_name}'s pseudo-identities ({found} found, {outliers} outliers)"
    cluster_strips_picture(paths["png"], config["data_root"], cluster_strips(records, cameras, labels, distances),
                           title=title)
    log.info("%s: %d pseudo-identities, %d outliers of %d train images -> %s", model_name, found, outliers,
             len(records), paths["csv"])


def run(config: Mapping[str, Any], *, manifest: str | Path, summary: str | Path | None, checkpoint: str | Path,
        csv_out: str | Path, png_out: str | Path, model: str, teacher_features: str | Path | None = None) -> None:
    """Cluster the train images with the final `model` (teacher: its stored features; else
    extracted) and write pseudo_identities.csv and the strips picture.

    `config`: at least the keys of purireid.config.resolve.stage_config(config, "pseudo_identities").
    """
    paths = {"manifest": Path(manifest), "summary": None if summary is None else Path(summary),
             "checkpoint": Path(checkpoint), "teacher_features": None if teacher_features is None else Path(teacher_features),
             "csv": Path(csv_out), "png": Path(png_out)}
    launch(_worker, dict(config), paths, model, world_size=config["train"]["gpus"], device=config["device"])
