"""Stage prepare_dataset: find the dataset (extracting its archive, or generating the synthetic
one), decode every image, check the published counts, and write manifest.csv + summary.json."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from purireid.config.datasets import FOLDER_CONTENTS
from purireid.data.datasets import (DATASET_INFO, SPLITS, DatasetError, dataset_folder, load_crops_layout, load_dataset,
                                    write_manifest)
from purireid.data.prepare import camera_summary, check_published_counts, extract_archive, summarise, validate_images
from purireid.io.files import write_json_atomic
from purireid.log import get_logger
from purireid.io.checkpoints import write_resolved_config

log = get_logger("prepare")


def _locate(name: str, data_root: Path, prepare: Mapping[str, Any], synthetic: Mapping[str, Any] | None,
            workers: int = 1) -> Path:
    """The dataset's folder under data_root, extracted or generated (by `workers` processes) first when needed."""
    base = dataset_folder(name, data_root, prepare["folder_name"])
    if name == "synthetic":
        from purireid.data.synthetic import generate_synthetic, synthetic_params_match

        params = dict(synthetic or {})
        if not synthetic_params_match(base, **params):
            log.info("generating the synthetic dataset in %s (%s)", base, params)
            generate_synthetic(base, workers=workers, **params)
        return base
    if base.is_dir():
        return base
    archive = prepare["archive"]
    if archive is None:
        info = DATASET_INFO[name]
        hint = (f"download {info.hint}; either extract {info.archive} into "
                f"{base.parent} or set config key 'prepare.archive' to the archive's path")
        raise DatasetError(
            f"dataset folder {base} not found.\n  expected: {base} with the dataset's folders\n"
            f"  fix: {hint if info.archive else 'put your images there: ' + FOLDER_CONTENTS[info.layout]}")
    log.info("extracting %s into %s", archive, base.parent)
    tops = extract_archive(archive, base.parent)
    if not base.is_dir():
        raise DatasetError(
            f"{archive} does not contain the folder '{base.name}' at its top level.\n"
            f"  expected: {base.name}/\n  found:    {tops}\n"
            f"  fix: use the original archive ({DATASET_INFO[name].archive or 'any'})")
    return base


def _counts_note(name: str, check_counts: bool) -> str:
    """Why summary.json's counts_checked is what it is."""
    if not DATASET_INFO[name].counts:
        return f"not checked: '{name}' has no published image counts to compare with"
    if not check_counts:
        return "not checked: config key 'prepare.check_counts' is false"
    return "image counts per split equal the published ones"


def run(config: Mapping[str, Any], *, manifest: str | Path, summary: str | Path, workers: int = 1,
        progress: bool = True) -> dict[str, Any]:
    """Locate (extract / generate), validate and index the configured dataset; returns the summary.

    Reads config keys dataset, data_root, prepare.{archive, check_counts, folder_name} and, for
    dataset synthetic, the synthetic section (the generator's parameters; the folder is
    regenerated when absent or made with other parameters). `workers`: processes decoding the
    images (and rendering the synthetic set). The config is also written beside the manifest (config.yaml).
    """
    name, data_root, prepare = config["dataset"], Path(config["data_root"]), config["prepare"]
    base = _locate(name, data_root, prepare, config.get("synthetic") if name == "synthetic" else None, workers)
    kind = DATASET_INFO[name]
    cameras = None
    if kind.layout == "crops":  # the camera names are part of what it prepares
        crops = load_crops_layout(base, data_root)
        splits, cameras = crops.splits, camera_summary(crops)
    else:
        splits = load_dataset(name, data_root, folder_name=prepare["folder_name"])
    for split in SPLITS:
        # A kind whose labelled split is optional (crops) has neither query nor gallery, or both.
        if not splits[split] and (split == "train" or kind.labelled_split):
            raise DatasetError(f"{base}: split '{split}' has no images; expected at least one")
    if prepare["check_counts"]:
        check_published_counts(name, splits)
    all_paths = [data_root / r.path for s in SPLITS for r in splits[s]]
    log.info("decoding %d images with %d workers", len(all_paths), workers)
    validate_images(all_paths, workers=workers, progress=progress)
    counts_checked = bool(prepare["check_counts"] and DATASET_INFO[name].counts)
    result = {"dataset": name, "folder": base.relative_to(data_root).as_posix(),
              "data_root": str(data_root), "counts_checked": counts_checked,
              "counts_note": _counts_note(name, prepare["check_counts"]), "splits": summarise(splits)}
    if cameras is not None:
        result["labelled_split"] = bool(splits["query"])
        result["cameras"] = cameras
    write_manifest(manifest, splits)
    write_json_atomic(summary, result)
    write_resolved_config(manifest, config)
    log.info("wrote %s: %s", manifest, result["splits"])
    return result
