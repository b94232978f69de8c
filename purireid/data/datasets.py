"""Dataset registry: name -> loader that turns a dataset folder into sorted record lists.

Loaders only list and parse file names (no decoding); `purireid.data.prepare` adds the
image decoding and count checks. Every failure raises `DatasetError` saying what was
expected, what was found and how to fix it.
"""

from __future__ import annotations

import csv
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from purireid.config.datasets import DATASET_KINDS, DatasetKind, kind_folder

SPLITS: tuple[str, str, str] = ("train", "query", "gallery")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
# Market-1501 naming: PPPP_cC..., pid -1 = junk, 0 = distractor. Also covers DukeMTMC-reID
# (0001_c2_f0046182.jpg) and the Market-style reformatted MSMT17 (0000_c1_0000.jpg).
MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
# MSMT17 original release: <pid>_<index>_<camera>_<date><time>_<frame>_<n>.jpg
MSMT_ORIGINAL_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_")


# The pid of a train image whose identity is not known (dataset kinds without train identities,
# e.g. crops): training never reads it; what needs identities is refused for such a dataset.
UNKNOWN_PID = -1


class Record(NamedTuple):
    """One image: path relative to data_root, person id (>= 0, or UNKNOWN_PID for the train images
    of a dataset without identities), 0-based camera id."""

    path: str
    pid: int
    camid: int


class DatasetError(ValueError):
    """The dataset on disk does not look like what was expected."""


# The registry lives in purireid.config.datasets (plain data the config check reads); these are its views.
DATASET_INFO: Mapping[str, DatasetKind] = DATASET_KINDS


def dataset_folder(name: str, data_root: str | Path, folder_name: str | None = None) -> Path:
    """The folder (absolute or relative to cwd) where dataset `name` is expected."""
    try:
        return kind_folder(name, data_root, folder_name)
    except ValueError as err:
        raise DatasetError(str(err)) from None


def _rel(path: Path, data_root: Path) -> str:
    return path.relative_to(data_root).as_posix()


def _require_dirs(base: Path, names: Sequence[str], layout: str) -> None:
    missing = [n for n in names if not (base / n).is_dir()]
    if missing:
        found = sorted(p.name for p in base.iterdir()) if base.is_dir() else []
        raise DatasetError(
            f"{base}: missing folder(s) {missing} of the {layout} layout.\n"
            f"  expected: {list(names)} inside {base}\n"
            f"  found:    {found if base.is_dir() else 'the folder itself does not exist'}\n"
            f"  fix: extract the original archive so that these folders sit directly in {base} "
            f"(or point data_root / prepare.folder_name at the right place)")


def _image_files(folder: Path) -> list[Path]:
    # Non-image files (e.g. Thumbs.db in the Market-1501 zip) are ignored on purpose.
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def parse_market_name(name: str) -> tuple[int, int]:
    """`0002_c1s1_000451_03.jpg` -> (2, 0): pid and 0-based camera id. Raises DatasetError."""
    match = MARKET_NAME.match(name)
    if not match or int(match.group(2)) < 1:
        raise DatasetError(
            f"cannot parse image name '{name}': expected the Market-1501 naming "
            f"'<pid>_c<camera>...' with camera >= 1, e.g. 0002_c1s1_000451_03.jpg")
    return int(match.group(1)), int(match.group(2)) - 1


def load_market_layout(base: Path, data_root: Path, layout: str = "Market-1501") -> dict[str, list[Record]]:
    """bounding_box_train / query / bounding_box_test with Market naming; junk (-1) dropped."""
    _require_dirs(base, list(MARKET_FOLDERS.values()), layout)
    return {split: _market_split(base / sub, data_root) for split, sub in MARKET_FOLDERS.items()}


def _market_split(folder: Path, data_root: Path) -> list[Record]:
    """The Market-1501-named images of one split folder, sorted; junk (-1) dropped."""
    records = []
    for path in _image_files(folder):
        try:
            pid, camid = parse_market_name(path.name)
        except DatasetError as err:
            raise DatasetError(
                f"{path}: {err}\n  fix: remove or rename files that do not follow the naming") from None
        if pid == -1:
            continue  # junk: never enters any split
        if pid < -1:
            raise DatasetError(f"{path}: pid {pid} is negative (only -1 = junk is allowed)")
        records.append(Record(_rel(path, data_root), pid, camid))
    return sorted(records)


def _load_msmt_original(base: Path, data_root: Path) -> dict[str, list[Record]]:
    lists = {"train": ["list_train.txt", "list_val.txt"], "query": ["list_query.txt"],
             "gallery": ["list_gallery.txt"]}
    _require_dirs(base, ["train", "test"], "MSMT17 original")
    missing = [f for names in lists.values() for f in names if not (base / f).is_file()]
    if missing:
        raise DatasetError(
            f"{base}: missing list file(s) {missing} of the MSMT17 original release.\n"
            f"  expected: list_train.txt, list_val.txt, list_query.txt, list_gallery.txt in {base}\n"
            f"  found:    {sorted(p.name for p in base.iterdir())}\n"
            f"  fix: extract MSMT17_V1.tar.gz completely")
    splits: dict[str, list[Record]] = {}
    for split, names in lists.items():
        image_dir = base / ("train" if split == "train" else "test")
        records = []
        for list_name in names:
            list_path = base / list_name
            for lineno, line in enumerate(list_path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split()
                match = MSMT_ORIGINAL_NAME.match(Path(parts[0]).name) if len(parts) == 2 else None
                if match is None or not parts[1].lstrip("-").isdigit():
                    raise DatasetError(
                        f"{list_path}:{lineno}: cannot parse '{line.strip()}': expected "
                        f"'<dir>/<pid>_<index>_<camera>_<date>_<frame>_<n>.jpg <pid>', "
                        f"e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0'\n"
                        f"  fix: use the list files of the original release unchanged")
                pid, cam = int(parts[1]), int(match.group(3))
                if cam < 1:
                    raise DatasetError(f"{list_path}:{lineno}: camera {cam} in '{parts[0]}' must be >= 1")
                if pid == -1:
                    continue
                records.append(Record(_rel(image_dir / parts[0], data_root), pid, cam - 1))
        splits[split] = sorted(records)
    return splits


# --------------------------------------------------------------------------- crops (no identities)
CROPS_CSV = "train.csv"
CROPS_CSV_HEADER = ["path", "camera"]


class CropsLayout(NamedTuple):
    """A crops folder: its splits (train pids UNKNOWN_PID) and the camera names, in id order."""

    splits: dict[str, list[Record]]
    cameras: list[str]


def _crops_train_from_folders(train: Path) -> list[tuple[Path, str]]:
    """(image, camera name) under train/: a sub-folder per camera (images at any depth under it),
    or images directly in train/ as one camera."""
    if not train.is_dir():
        raise DatasetError(f"{train}: not found; expected a train/ folder of images (one sub-folder per "
                           f"camera) or a {CROPS_CSV} (path,camera) beside it; fix: put the training crops there")
    entries = sorted(p for p in train.iterdir() if not p.name.startswith("."))
    folders = [p for p in entries if p.is_dir()]
    files = [p for p in entries if p.is_file()]
    if folders and files:
        raise DatasetError(f"{files[0]}: train/ holds both images and camera folders; fix: move the images "
                           f"directly in train/ into a camera folder (images directly in train/ are one camera "
                           f"only when there are no camera folders)")
    found: list[tuple[Path, str]] = [(p, "train") for p in files]  # one camera, named after its folder
    for folder in folders:
        inside = [(p, folder.name) for p in sorted(folder.rglob("*"))
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
        if not inside:
            raise DatasetError(f"{folder}: empty camera folder; fix: put that camera's crops in it or remove it")
        found += inside
    for path, _ in found:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DatasetError(f"{path}: not an image (expected {', '.join(IMAGE_SUFFIXES)}); "
                               f"fix: remove it or move it out of {train}")
    return found


def _crops_train_from_csv(csv_path: Path, base: Path) -> list[tuple[Path, str]]:
    """(image, camera name) from train.csv: a header `path,camera`, paths relative to the crops folder."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or [c.strip() for c in rows[0]] != CROPS_CSV_HEADER:
        raise DatasetError(f"{csv_path}:1: header {rows[0] if rows else 'missing'}, expected "
                           f"{','.join(CROPS_CSV_HEADER)}; fix: start the file with the line 'path,camera'")
    found: list[tuple[Path, str]] = []
    for lineno, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(f"{csv_path}:{lineno}: expected two non-empty values 'path,camera', found "
                               f"{row}; fix: give every image its path and its camera's name")
        path = base / row[0].strip()
        if Path(row[0].strip()).is_absolute() or ".." in Path(row[0].strip()).parts:
            raise DatasetError(f"{csv_path}:{lineno}: path '{row[0]}' must be relative to {base} and stay "
                               f"inside it; fix: write it relative to the folder holding {CROPS_CSV}")
        if not path.is_file():
            raise DatasetError(f"{csv_path}:{lineno}: image '{row[0]}' not found ({path}); fix: correct the "
                               f"path or remove the line")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DatasetError(f"{csv_path}:{lineno}: '{row[0]}' is not an image (expected "
                               f"{', '.join(IMAGE_SUFFIXES)}); fix: remove the line")
        found.append((path, row[1].strip()))
    return found


def _check_cameras(found: Sequence[tuple[Path, str]], where: Path) -> list[str]:
    """The camera names in id order (sorted); refuses no image and a camera with a single image."""
    if not found:
        raise DatasetError(f"{where}: no training images; expected .jpg/.png crops (in camera sub-folders or "
                           f"directly); fix: put the training crops there")
    images: dict[str, list[Path]] = {}
    for path, camera in found:
        images.setdefault(camera, []).append(path)
    for camera, paths in sorted(images.items()):
        if len(paths) == 1:
            raise DatasetError(f"{paths[0]}: the only image of camera '{camera}'; fix: add its other crops, move it "
                               f"into another camera's folder or remove it (a camera needs at least two images)")
    return sorted(images)


def load_crops_layout(base: Path, data_root: Path) -> CropsLayout:
    """train/<camera>/**/<image> (or train.csv) with no identity read, plus optional query/ and
    gallery/ in Market-1501 naming (a labelled split: both or neither)."""
    if not base.is_dir():
        raise DatasetError(f"{base}: not found; expected the crops folder holding train/ (or {CROPS_CSV}); "
                           f"fix: set config keys data_root and prepare.folder_name to where the crops are")
    csv_path, train = base / CROPS_CSV, base / "train"
    if csv_path.is_file() and train.is_dir():
        raise DatasetError(f"{csv_path}: both {CROPS_CSV} and train/ exist; fix: keep only one of them "
                           f"(the CSV lists the training images, train/ holds them in camera folders)")
    found = _crops_train_from_csv(csv_path, base) if csv_path.is_file() else _crops_train_from_folders(train)
    cameras = _check_cameras(found, csv_path if csv_path.is_file() else train)
    camid = {name: index for index, name in enumerate(cameras)}
    splits = {"train": sorted({Record(_rel(p, data_root), UNKNOWN_PID, camid[c]) for p, c in found}),
              "query": [], "gallery": []}
    present = [s for s in ("query", "gallery") if (base / s).is_dir()]
    if len(present) == 1:
        missing = ({"query", "gallery"} - set(present)).pop()
        raise DatasetError(f"{base / present[0]}: found without {missing}/; fix: add {base / missing} "
                           f"(Market-1501 names) to evaluate, or remove {base / present[0]} to train only")
    for split in present:
        splits[split] = _market_split(base / split, data_root)
        if not splits[split]:
            raise DatasetError(f"{base / split}: no images; fix: add Market-1501-named images "
                               f"(e.g. 0002_c1s1_000451_03.jpg) or remove the folder")
    return CropsLayout(splits, cameras)


def _load_market(name: str, base: Path, data_root: Path) -> dict[str, list[Record]]:
    layout = {"folder": "Market-1501", "synthetic": "synthetic (Market-1501)",
              "market1501": "Market-1501", "dukemtmcreid": "DukeMTMC-reID"}.get(name, name)
    return load_market_layout(base, data_root, layout)


def _load_msmt17(name: str, base: Path, data_root: Path) -> dict[str, list[Record]]:
    """Market-style reformatted MSMT17 when bounding_box_train/ exists, else the original release."""
    if (base / "bounding_box_train").is_dir():
        return load_market_layout(base, data_root, "MSMT17 (Market-style)")
    if (base / "list_train.txt").is_file() or (base / "train").is_dir():
        return _load_msmt_original(base, data_root)
    found = sorted(p.name for p in base.iterdir()) if base.is_dir() else "the folder does not exist"
    raise DatasetError(
        f"{base}: neither MSMT17 layout found.\n"
        f"  expected: bounding_box_train/, query/, bounding_box_test/ (reformatted) or train/, test/, "
        f"list_train.txt, list_val.txt, list_query.txt, list_gallery.txt (original release)\n"
        f"  found:    {found}\n  fix: extract MSMT17_V1.tar.gz into {base.parent}")


def _load_crops(name: str, base: Path, data_root: Path) -> dict[str, list[Record]]:
    return load_crops_layout(base, data_root).splits


# Loaders per on-disk layout (a registry entry's `layout`): (dataset name, its folder, data_root) -> splits.
LAYOUTS: dict[str, Callable[[str, Path, Path], dict[str, list[Record]]]] = {
    "market": _load_market,
    "msmt17": _load_msmt17,
    "crops": _load_crops,
}


def load_dataset(name: str, data_root: str | Path, folder_name: str | None = None,
                 **_: object) -> dict[str, list[Record]]:
    """Records of every split of dataset `name` (a registry name); folder_name for the kinds
    whose folder prepare.folder_name names (folder, crops)."""
    if name not in DATASET_KINDS:
        raise DatasetError(f"unknown dataset '{name}'; expected one of {sorted(DATASET_KINDS)}")
    root = Path(data_root)
    return LAYOUTS[DATASET_KINDS[name].layout](name, dataset_folder(name, root, folder_name), root)


# name -> loader, for callers that want one function per dataset (derived from the registry).
DATASETS: dict[str, Callable[..., dict[str, list[Record]]]] = {
    name: functools.partial(load_dataset, name) for name in DATASET_KINDS}


MANIFEST_HEADER = ["split", "path", "pid", "camid"]


def write_manifest(path: str | Path, splits: Mapping[str, Sequence[Record]]) -> None:
    """manifest.csv with header split,path,pid,camid; splits in train/query/gallery order, sorted."""
    from purireid.io.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_HEADER)
        for split in SPLITS:
            for rec in sorted(splits.get(split, [])):
                writer.writerow([split, rec.path, rec.pid, rec.camid])


# A manifest is prepare_dataset's output, newer than its inputs when damaged: a plain rerun keeps it.
MANIFEST_FIX = "fix: rewrite it with snakemake --forcerun prepare_dataset"


def read_manifest(path: str | Path) -> dict[str, list[Record]]:
    """{'train': [...], 'query': [...], 'gallery': [...]} from a manifest.csv, in file order."""
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    with open(path, newline="") as handle:
        text = handle.read()
    rows = list(csv.reader(text.splitlines()))
    if not rows or rows[0] != MANIFEST_HEADER:
        raise DatasetError(f"{path}:1: header {rows[0] if rows else 'missing'}, expected {MANIFEST_HEADER}; "
                           f"{MANIFEST_FIX}")
    if not text.endswith("\n"):  # every row the writer writes ends with one: the file was cut
        raise DatasetError(f"{path}:{len(rows)}: the file ends mid-row (cut short); {MANIFEST_FIX}")
    for lineno, row in enumerate(rows[1:], 2):
        try:
            if len(row) != 4 or row[0] not in splits:
                raise ValueError
            splits[row[0]].append(Record(row[1], int(row[2]), int(row[3])))
        except ValueError:
            raise DatasetError(f"{path}:{lineno}: bad row {row} (expected split,path,pid,camid); "
                               f"{MANIFEST_FIX}") from None
    return splits
