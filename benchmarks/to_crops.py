"""Convert a Market-1501-layout set into the crops layout of `dataset: crops`.

    python benchmarks/to_crops.py SOURCE TARGET [--names hashed|index|keep] [--cameras folders|none|csv]
        [--no-test]

SOURCE holds bounding_box_train/, query/ and bounding_box_test/ (Market-1501 naming). TARGET is
created (it must not exist) with:

    train/<camera>/<name>   the training images, one folder per camera ("cam1", "cam2", ...):
                            --cameras folders (default); --cameras none puts every image directly
                            in train/ (one camera); --cameras csv writes train.csv (path,camera)
                            over images/<name> instead of train/
    query/  gallery/        copied unchanged (Market-1501 names: evaluation), unless --no-test

Training file names (--names): hashed = a hash of the original name (no identity, order
shuffled), index = the image's position among its camera's images in the original sorted order
(no identity, same order as the original names: the manifest lists the crops in the order
`dataset: folder` lists the originals within each camera), keep = the original name. Junk
images (pid -1) are left out, as the Market-1501 reader drops them. Files are hard-linked where
the file system allows, else copied.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import re
import shutil
from pathlib import Path

MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
SUFFIXES = (".jpg", ".jpeg", ".png")


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def train_images(source: Path) -> list[tuple[Path, int]]:
    """(image, 1-based camera) of the training images in sorted name order, junk left out."""
    found = []
    for path in sorted((source / "bounding_box_train").iterdir()):
        match = MARKET_NAME.match(path.name)
        if path.suffix.lower() not in SUFFIXES or match is None:
            continue
        if int(match.group(1)) == -1:
            continue
        found.append((path, int(match.group(2))))
    return found


def new_name(path: Path, position: int, names: str) -> str:
    if names == "keep":
        return path.name
    if names == "index":
        return f"{position:07d}{path.suffix.lower()}"
    return hashlib.sha1(path.name.encode()).hexdigest()[:16] + path.suffix.lower()


def convert(source: Path, target: Path, *, names: str = "hashed", cameras: str = "folders",
            test: bool = True) -> int:
    """Write the crops layout of `source` into `target`; returns the number of training images."""
    if target.exists():
        raise SystemExit(f"{target} exists; choose a new folder (nothing is overwritten)")
    images = train_images(source)
    if not images:
        raise SystemExit(f"{source / 'bounding_box_train'}: no Market-1501-named images")
    positions: dict[int, int] = {}
    rows = []
    for path, camera in images:
        position = positions[camera] = positions.get(camera, -1) + 1
        name = new_name(path, position, names)
        if cameras == "folders":
            relative = Path("train") / f"cam{camera}" / name
        elif cameras == "none":
            relative = Path("train") / f"cam{camera}_{name}" if names == "index" else Path("train") / name
        else:
            relative = Path("images") / f"cam{camera}" / name
        _place(path, target / relative)
        rows.append((relative.as_posix(), f"cam{camera}"))
    if cameras == "csv":
        with open(target / "train.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "camera"])
            writer.writerows(rows)
    if test:
        for split, folder in (("query", "query"), ("gallery", "bounding_box_test")):
            for path in sorted((source / folder).iterdir()):
                if path.suffix.lower() in SUFFIXES:
                    _place(path, target / split / path.name)
    return len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--names", choices=("hashed", "index", "keep"), default="hashed")
    parser.add_argument("--cameras", choices=("folders", "none", "csv"), default="folders")
    parser.add_argument("--no-test", action="store_true", help="leave query/ and gallery/ out (no labelled split)")
    args = parser.parse_args()
    count = convert(args.source, args.target, names=args.names, cameras=args.cameras, test=not args.no_test)
    print(f"{args.target}: {count} training images ({args.names} names, cameras: {args.cameras})"
          f"{'' if args.no_test else ', query/ and gallery/ kept'}")


if __name__ == "__main__":
    main()
