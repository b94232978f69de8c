"""Atomic file output: a killed job never leaves a file that looks complete.

Every output goes through `atomic_path`: written under a hidden temporary name beside the
target, made readable as the umask allows (not mkstemp's 0600), then renamed into place. A
full disk surfaces as `DiskFullError` naming the target and the folder to clear, with the
temporary file removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
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


def _no_space_error(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind `exc`, if any (libraries such as torch wrap it)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


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

    The file gets the mode a plain open() would give it (0666 minus the umask).
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
        if _no_space_error(exc) is not None and not isinstance(exc, DiskFullError):
            raise disk_full_error(path) from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


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
