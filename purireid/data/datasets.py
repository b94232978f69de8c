"""Dataset registry: name -> loader that turns a dataset folder into sorted record lists.

Loaders only list and parse file names (no decoding); `purireid.data.prepare` adds the
image decoding and count checks. Every failure raises `DatasetError` saying what was
expected, what was found and how to fix it.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

SPLITS: tuple[str, str, str] = ("train", "query", "gallery")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
# Market-1501 naming: PPPP_cC..., pid -1 = junk, 0 = distractor. Also covers DukeMTMC-reID
# (0001_c2_f0046182.jpg) and the Market-style reformatted MSMT17 (0000_c1_0000.jpg).
MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
# MSMT17 original release: <pid>_<index>_<camera>_<date><time>_<frame>_<n>.jpg
MSMT_ORIGINAL_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_")


class Record(NamedTuple):
    """One image: path relative to data_root, person id (>= 0), 0-based camera id."""

    path: str
    pid: int
    camid: int


class DatasetError(ValueError):
    """The dataset on disk does not look like what was expected."""


class DatasetInfo(NamedTuple):
    folder: str  # relative to data_root
    archive: str | None  # the original archive's file name
    counts: Mapping[str, int] | None  # published image counts (gallery without junk)
    url_hint: str


DATASET_INFO: dict[str, DatasetInfo] = {
    "market1501": DatasetInfo(
        "market1501/Market-1501-v15.09.15", "Market-1501-v15.09.15.zip",
        {"train": 12936, "query": 3368, "gallery": 15913},
        "Market-1501 (Zheng et al., ICCV 2015)"),
    "msmt17": DatasetInfo(
        "msmt17/MSMT17_V1", "MSMT17_V1.tar.gz",
        {"train": 32621, "query": 11659, "gallery": 82161},
        "MSMT17 (Wei et al., CVPR 2018; obtained from its authors on request)"),
    "dukemtmcreid": DatasetInfo(
        "dukemtmc/DukeMTMC-reID", "DukeMTMC-reID.zip",
        {"train": 16522, "query": 2228, "gallery": 17661},
        "DukeMTMC-reID (Zheng et al., ICCV 2017)"),
    "synthetic": DatasetInfo("synthetic/Synthetic-ReID", None, None, "purireid's generator"),
    "folder": DatasetInfo("", None, None, "your own data in the Market-1501 layout"),
}


def dataset_folder(name: str, data_root: str | Path, folder_name: str | None = None) -> Path:
    """The folder (absolute or relative to cwd) where dataset `name` is expected."""
    if name not in DATASET_INFO:
        raise DatasetError(f"unknown dataset '{name}'; expected one of {sorted(DATASET_INFO)}")
    if name == "folder":
        if not folder_name:
            raise DatasetError(
                "dataset 'folder' needs a folder name: set config key 'prepare.folder_name' to the "
                "sub-folder of data_root that holds bounding_box_train/, query/ and bounding_box_test/")
        return Path(data_root) / folder_name
    return Path(data_root) / DATASET_INFO[name].folder


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
    splits: dict[str, list[Record]] = {}
    for split, sub in MARKET_FOLDERS.items():
        records = []
        for path in _image_files(base / sub):
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
        splits[split] = sorted(records)
    return splits


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


def load_market1501(data_root: str | Path, **_: object) -> dict[str, list[Record]]:
    root = Path(data_root)
    return load_market_layout(dataset_folder("market1501", root), root, "Market-1501")


def load_dukemtmcreid(data_root: str | Path, **_: object) -> dict[str, list[Record]]:
    root = Path(data_root)
    return load_market_layout(dataset_folder("dukemtmcreid", root), root, "DukeMTMC-reID")


def load_msmt17(data_root: str | Path, **_: object) -> dict[str, list[Record]]:
    """Market-style reformatted MSMT17 when bounding_box_train/ exists, else the original release."""
    root = Path(data_root)
    base = dataset_folder("msmt17", root)
    if (base / "bounding_box_train").is_dir():
        return load_market_layout(base, root, "MSMT17 (Market-style)")
    if (base / "list_train.txt").is_file() or (base / "train").is_dir():
        return _load_msmt_original(base, root)
    found = sorted(p.name for p in base.iterdir()) if base.is_dir() else "the folder does not exist"
    raise DatasetError(
        f"{base}: neither MSMT17 layout found.\n"
        f"  expected: bounding_box_train/, query/, bounding_box_test/ (reformatted) or train/, test/, "
        f"list_train.txt, list_val.txt, list_query.txt, list_gallery.txt (original release)\n"
        f"  found:    {found}\n  fix: extract MSMT17_V1.tar.gz into {base.parent}")


def load_synthetic(data_root: str | Path, **_: object) -> dict[str, list[Record]]:
    root = Path(data_root)
    return load_market_layout(dataset_folder("synthetic", root), root, "synthetic (Market-1501)")


def load_folder(data_root: str | Path, folder_name: str | None = None, **_: object) -> dict[str, list[Record]]:
    root = Path(data_root)
    return load_market_layout(dataset_folder("folder", root, folder_name), root, "Market-1501")


DATASETS: dict[str, Callable[..., dict[str, list[Record]]]] = {
    "market1501": load_market1501,
    "msmt17": load_msmt17,
    "dukemtmcreid": load_dukemtmcreid,
    "synthetic": load_synthetic,
    "folder": load_folder,
}


def load_dataset(name: str, data_root: str | Path, **kw: object) -> dict[str, list[Record]]:
    """Records of every split of dataset `name`; kw: folder_name for 'folder'."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset '{name}'; expected one of {sorted(DATASETS)}")
    return DATASETS[name](data_root, **kw)


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
