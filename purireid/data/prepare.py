"""What the prepare_dataset stage (purireid.stages.prepare_dataset) does to a dataset folder:
safe archive extraction, decoding every image in parallel, the published-count check, the summary."""

from __future__ import annotations

import tarfile
import tempfile
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from purireid.data.datasets import DATASET_INFO, SPLITS, UNKNOWN_PID, CropsLayout, DatasetError, Record
from purireid.io.files import replace_dir

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
    with tempfile.TemporaryDirectory(prefix=".extract.", dir=dest) as staging:
        _extract_into(archive, Path(staging))
        tops = sorted(p.name for p in Path(staging).iterdir() if p.name != "__MACOSX")
        for top in tops:  # each finished folder renamed into place (atomic_dir's last step)
            replace_dir(Path(staging) / top, dest / top)
    return tops


def _extract_into(archive: Path, folder: Path) -> None:
    """Every member checked first, then the archive extracted into `folder`."""
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_member(info.filename, archive)
            zf.extractall(folder)
    elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                _check_member(m.name, archive)
                if not (m.isfile() or m.isdir()):
                    raise DatasetError(
                        f"{archive}: member '{m.name}' is a link or special file; refusing to "
                        f"extract.\n  fix: use the original, unmodified archive")
            tf.extractall(folder, members=members)
    else:
        raise DatasetError(
            f"{archive}: unknown archive type; expected .zip, .tar, .tar.gz or .tgz")


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
    from purireid.log import Progress

    paths = [str(p) for p in paths]
    chunk = 256
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    bad: list[tuple[str, str]] = []
    bar = Progress(len(paths), "decoding images", unit="img", enabled=progress)  # a bar on a terminal only
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
    if bad:  # one line (the rule log's last line is the error): the files, then the fix
        listed = "; ".join(f"{p} ({r})" for p, r in bad[:MAX_LISTED])
        more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DatasetError(
            f"{len(bad)} of {len(paths)} images cannot be decoded (corrupt or truncated): {listed}{more}; "
            f"fix: replace or delete these files and rerun (a published dataset: re-extract them from its "
            f"archive, or delete the dataset folder and rerun with prepare.archive set)")


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
    """Images, identities and cameras per split; ids None for a split whose identities are unknown."""
    return {s: {"images": len(splits[s]),
                "ids": None if splits[s] and all(r.pid == UNKNOWN_PID for r in splits[s])
                else len({r.pid for r in splits[s]}),
                "cameras": len({r.camid for r in splits[s]})} for s in SPLITS}


def camera_summary(crops: CropsLayout) -> list[dict[str, Any]]:
    """Each train camera's name, the id it was given (sorted names -> 0, 1, ...) and its images."""
    counts = Counter(r.camid for r in crops.splits["train"])
    return [{"name": name, "id": camid, "images": counts[camid]} for camid, name in enumerate(crops.cameras)]
