"""Atomic file output: a killed job never leaves a file that looks complete.

Every output goes through `atomic_path`: written under a hidden temporary name beside the
target, made readable as the umask allows (not mkstemp's 0600), then renamed into place. A
full disk surfaces as `DiskFullError` naming the target and the folder to clear, with the
temporary file removed, whatever library wrote it (torch, h5py, matplotlib, PIL, plain
files): `is_disk_full` recognises their ways of saying so. A job killed while writing leaves
the hidden temporary behind; `remove_stale_temporaries` clears those of its outputs at its
next start. A folder is built the same way: `atomic_dir` yields a hidden folder beside the
target and renames it into place when the build succeeds.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """The device (or quota) holding an output has no space left."""


def current_umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, in every thread)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: the classic swap
    os.umask(mask)
    return mask


# Libraries that report a failed write in words rather than as an OSError: HDF5 ("errno = 28"),
# and any message quoting the C library's text for ENOSPC / EDQUOT.
_NO_SPACE_TEXT = re.compile("|".join([*(rf"errno\s*=\s*{code}\b" for code in _NO_SPACE),
                                      *(re.escape(os.strerror(code)) for code in _NO_SPACE)]))


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an error it wraps, says the device or the quota is full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        if _NO_SPACE_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(path: str | Path, needed: int | None = None) -> DiskFullError:
    """The error raised when `path` cannot be written for lack of space."""
    path = Path(path)
    size = f" ({needed / 2**20:.1f} MiB needed)" if needed else ""
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on the device holding {path.parent} while writing {path}{size}; "
        "free space there (or point results_dir / data_root to a larger disk) and rerun: "
        "finished outputs and the training state of completed epochs are kept",
        str(path),
    )


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file gets the mode a plain open() would give it (0666 minus the umask). A full disk
    raises DiskFullError naming `path`, however the writing library reported it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~current_umask())
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException as exc:
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise disk_full_error(path) from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def replace_dir(built: str | Path, path: str | Path) -> None:
    """Rename the finished folder `built` onto `path`, replacing what is there (a folder or a
    file). An existing folder is first renamed aside under a hidden name and removed only
    after the new one is in place, so `path` never holds a half-deleted folder."""
    built, path = Path(built), Path(path)
    old = None
    if path.is_dir() and not path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.replace(path, old / path.name)
    elif path.exists() or path.is_symlink():
        path.unlink()
    os.replace(built, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside `path` to build a folder in; rename it onto `path`
    (replacing an existing one, see `replace_dir`) only if the block succeeds, else remove it.

    A failed or killed build never leaves a folder under the final name. The folder gets the
    mode a plain mkdir would give it (0777 minus the umask), not mkdtemp's 0700.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_hdf5(path: str | Path) -> Iterator[Any]:
    """Yield a writable h5py.File, built in memory and written to `path` through `atomic_path`
    when the block succeeds. HDF5 itself never writes to the disk: a full disk during its own
    flush leaves the library with half-closed objects that crash the interpreter at exit
    (HDF5 2.0), while a plain write fails cleanly (DiskFullError)."""
    import io

    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        yield h5
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def temporary_names(path: str | Path) -> list[Path]:
    """The hidden temporaries `atomic_path` may have left beside `path` (a killed writer's)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if p.is_file())


def remove_stale_temporaries(outputs: Iterable[str | Path], folders: Iterable[str | Path] = ()) -> list[Path]:
    """Delete what killed writers left: the hidden temporaries of `outputs` (made by
    `atomic_path`), and every hidden ``.*.tmp`` file directly in `folders` (a job's own
    state folder). Call it at a job's start, before anything writes; returns what it removed."""
    stale = [tmp for output in outputs for tmp in temporary_names(output)]
    for folder in map(Path, folders):
        if folder.is_dir():
            stale += sorted(p for p in folder.glob(".*.tmp") if p.is_file())
    for tmp in stale:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return stale


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (a training log.jsonl), blank lines skipped."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path: str | Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite a whole JSON-lines file (a training log.jsonl) atomically: it is small, and then
    never half a line."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def write_yaml_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, yaml.safe_dump(obj, sort_keys=False))


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save into an open file: the zip's records are then named archive/..., not after the
    temporary file, so equal objects give byte-identical files."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def torch_load(path: str | Path) -> Any:
    """purireid's one torch.load, with one trust policy: weights_only=True. Every torch file it
    writes (checkpoints, resume states, best epochs) holds only tensors and plain Python values,
    and a file that needs arbitrary code to load (a pickle with code) is refused, never executed."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def image_list_digest(paths: Sequence[str]) -> str:
    """A hash of an ordered image list, to tie a feature file or a resume state to a manifest."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode())
        digest.update(b"\n")
    return digest.hexdigest()
