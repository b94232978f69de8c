"""The prepare-dataset stage: extract (safely), validate, write manifest.csv + summary JSON.

    python -m purireid.data.prepare --dataset market1501 --data-root data \
        --manifest results/market1501/data/manifest.csv --summary results/market1501/data/summary.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from purireid.data.datasets import (
    DATASET_INFO, SPLITS, DatasetError, Record, dataset_folder, load_dataset, write_manifest,
)
from purireid.io import write_json_atomic

MAX_LISTED = 10


# --------------------------------------------------------------------------- archives
def _check_member(name: str, archive: Path) -> None:
    """Refuse absolute paths and '..' components: an archive must not write outside its folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise DatasetError(
            f"{archive}: member '{name}' would be extracted outside the target folder; refusing "
            f"to extract.\n  fix: use the original, unmodified archive")


def extract_archive(archive: str | Path, dest: str | Path) -> list[str]:
    """Extract a .zip / .tar / .tar.gz / .tgz into `dest`; returns the top-level names.

    Every member is checked before anything is written (no absolute paths, no '..', no links
    or device files in tars). Extraction goes to a temporary folder inside `dest` whose
    top-level entries are renamed into place at the end, so a killed run leaves no
    half-extracted dataset behind under its final name.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DatasetError(f"archive {archive} not found; fix: check config key 'prepare.archive'")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract.", dir=dest))
    try:
        name = archive.name.lower()
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member(info.filename, archive)
                zf.extractall(tmp)
        elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for m in members:
                    _check_member(m.name, archive)
                    if not (m.isfile() or m.isdir()):
                        raise DatasetError(
                            f"{archive}: member '{m.name}' is a link or special file; refusing to "
                            f"extract.\n  fix: use the original, unmodified archive")
                tf.extractall(tmp, members=members)
        else:
            raise DatasetError(
                f"{archive}: unknown archive type; expected .zip, .tar, .tar.gz or .tgz")
        tops = sorted(p.name for p in tmp.iterdir() if p.name != "__MACOSX")
        for top in tops:
            target = dest / top
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(tmp / top, target)
        return tops
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- validation
def _check_image(path: str) -> str | None:
    """None if the file decodes completely, else the reason (truncated, not an image, ...)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # full decode: a truncated JPEG fails here, not at open()
            if im.width < 1 or im.height < 1:
                return "empty image"
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file
        return f"{type(err).__name__}: {err}"
    return None


def _check_chunk(paths: Sequence[str]) -> list[tuple[str, str]]:
    return [(p, r) for p in paths if (r := _check_image(p)) is not None]


def validate_images(paths: Sequence[str | Path], workers: int = 4, progress: bool = True) -> None:
    """Decode every image in parallel (progress bar); raise DatasetError naming the bad ones."""
    from tqdm import tqdm

    paths = [str(p) for p in paths]
    chunk = 256
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    bad: list[tuple[str, str]] = []
    bar = tqdm(total=len(paths), desc="decoding images", unit="img", disable=not progress,
               file=sys.stderr)
    if workers <= 1 or len(chunks) <= 1:
        for c in chunks:
            bad += _check_chunk(c)
            bar.update(len(c))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for c, result in zip(chunks, pool.map(_check_chunk, chunks)):
                bad += result
                bar.update(len(c))
    bar.close()
    if bad:
        listed = "\n".join(f"    {p}: {r}" for p, r in bad[:MAX_LISTED])
        more = f"\n    ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DatasetError(
            f"{len(bad)} of {len(paths)} images cannot be decoded (corrupt or truncated):\n"
            f"{listed}{more}\n  expected: every image decodes completely\n"
            f"  fix: re-extract these files from the original archive (or delete the dataset "
            f"folder and run prepare again with prepare.archive set)")


def check_published_counts(name: str, splits: Mapping[str, Sequence[Record]]) -> None:
    """Raise DatasetError unless the split sizes equal the published ones."""
    expected = DATASET_INFO[name].counts
    if not expected:
        return
    found = {s: len(splits[s]) for s in SPLITS}
    if found != dict(expected):
        diffs = ", ".join(f"{s}: expected {expected[s]}, found {found[s]}"
                          for s in SPLITS if found[s] != expected[s])
        raise DatasetError(
            f"{name}: image counts differ from the published ones ({diffs}; gallery counted "
            f"without junk pid -1).\n  fix: re-extract the complete original archive, or set "
            f"config key 'prepare.check_counts: false' if you use a subset on purpose")


def summarise(splits: Mapping[str, Sequence[Record]]) -> dict[str, Any]:
    return {s: {"images": len(splits[s]), "ids": len({r.pid for r in splits[s]}),
                "cameras": len({r.camid for r in splits[s]})} for s in SPLITS}


# --------------------------------------------------------------------------- the stage
def prepare_dataset(name: str, data_root: str | Path, manifest_path: str | Path,
                    summary_path: str | Path, *, archive: str | Path | None = None,
                    check_counts: bool = True, folder_name: str | None = None, workers: int = 4,
                    synthetic: Mapping[str, Any] | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Locate (extract / generate), validate and index dataset `name`; returns the summary.

    `synthetic`: the config's `synthetic` section (generator parameters) for name 'synthetic';
    the folder is (re)generated when absent or made with other parameters.
    """
    from purireid.log import get_logger

    log = get_logger("prepare")
    data_root = Path(data_root)
    base = dataset_folder(name, data_root, folder_name)
    if name == "synthetic":
        from purireid.data.synthetic import generate_synthetic, synthetic_params_match

        params = {"num_train_ids": 100, "num_test_ids": 50, "images_per_id": 15, "num_cameras": 6,
                  "height": 128, "width": 64, "seed": 0, **dict(synthetic or {})}
        if not synthetic_params_match(base, **params):
            log.info("generating the synthetic dataset in %s (%s)", base, params)
            generate_synthetic(base, **params)
    elif not base.is_dir():
        if archive is None:
            info = DATASET_INFO[name]
            hint = (f"download {info.url_hint}; either extract {info.archive} into "
                    f"{base.parent} or set config key 'prepare.archive' to the archive's path")
            raise DatasetError(
                f"dataset folder {base} not found.\n  expected: {base} with the dataset's folders\n"
                f"  fix: {hint if info.archive else 'put your images there in the Market-1501 layout'}")
        log.info("extracting %s into %s", archive, base.parent)
        tops = extract_archive(archive, base.parent)
        if not base.is_dir():
            raise DatasetError(
                f"{archive} does not contain the folder '{base.name}' at its top level.\n"
                f"  expected: {base.name}/\n  found:    {tops}\n"
                f"  fix: use the original archive ({DATASET_INFO[name].archive or 'any'})")
    splits = load_dataset(name, data_root, folder_name=folder_name)
    for split in SPLITS:
        if not splits[split]:
            raise DatasetError(f"{base}: split '{split}' has no images; expected at least one")
    if check_counts:
        check_published_counts(name, splits)
    all_paths = [data_root / r.path for s in SPLITS for r in splits[s]]
    log.info("decoding %d images with %d workers", len(all_paths), workers)
    validate_images(all_paths, workers=workers, progress=progress)
    summary = {"dataset": name, "folder": base.relative_to(data_root).as_posix(),
               "data_root": str(data_root), "counts_checked": bool(check_counts and DATASET_INFO[name].counts),
               "splits": summarise(splits)}
    write_manifest(manifest_path, splits)
    write_json_atomic(summary_path, summary)
    log.info("wrote %s: %s", manifest_path, summary["splits"])
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML config file(s); CLI flags override")
    parser.add_argument("--dataset")
    parser.add_argument("--data-root")
    parser.add_argument("--manifest", help="default: <results_dir>/<dataset>/data/manifest.csv")
    parser.add_argument("--summary", help="default: beside the manifest, summary.json")
    parser.add_argument("--archive")
    parser.add_argument("--folder-name")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--no-check-counts", action="store_true")
    args = parser.parse_args(argv)

    from purireid.config import load_config
    from purireid.log import setup_logging

    overrides: dict[str, Any] = {"prepare": {}}
    if args.dataset:
        overrides["dataset"] = args.dataset
    if args.data_root:
        overrides["data_root"] = args.data_root
    for key, value in (("archive", args.archive), ("folder_name", args.folder_name), ("workers", args.workers)):
        if value is not None:
            overrides["prepare"][key] = value
    if args.no_check_counts:
        overrides["prepare"]["check_counts"] = False
    cfg = load_config(*args.config, overrides=overrides)
    manifest = Path(args.manifest or Path(cfg["results_dir"]) / cfg["dataset"] / "data" / "manifest.csv")
    summary = Path(args.summary or manifest.with_name("summary.json"))
    setup_logging()
    try:
        prepare_dataset(cfg["dataset"], cfg["data_root"], manifest, summary,
                        archive=cfg["prepare"]["archive"], check_counts=cfg["prepare"]["check_counts"],
                        folder_name=cfg["prepare"]["folder_name"], workers=cfg["prepare"]["workers"],
                        synthetic=cfg["synthetic"])
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
