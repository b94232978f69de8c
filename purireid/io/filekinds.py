"""What a file is, from its first bytes, for the readers' messages ("<path> is <what it is>, not
<what was expected>; <fix>").

The signatures of every kind of file purireid reads or writes live here, below their readers:
the model checkpoint's keys (read by purireid.io.checkpoints) and the HDF5 feature file's
format attributes (read and written by purireid.io.features). Each reader refuses the others'
files by name, so what recognises them must sit under both.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from purireid.io.files import torch_load

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

# A model checkpoint (purireid.io.checkpoints): a torch.save dict holding at least these keys.
CHECKPOINT_KEYS = ("state_dict", "arch", "feat_dim", "config")

# A feature file (purireid.io.features): its `format` attribute, and its kinds in words.
FEATURE_FILE_FORMAT = "purireid-features"
FEATURE_KINDS = {"teacher": "the workflow's teacher-feature file of the train images",
                 "extract": "a feature file of `purireid extract`"}

DAMAGED_ZIP = ("a zip archive, as torch.save writes, cut short or corrupted (e.g. a partial copy, or a file "
               "another program wrote or changed)")


def file_kind(path: str | Path) -> str:
    """What `path` is, from its first bytes (nothing is loaded): "missing", "folder", "empty
    folder", "empty file", "hdf5", "torch" (a torch.save file), "torchscript", "onnx", "text",
    "damaged" (a zip archive, as torch.save writes, that cannot be opened), "unreadable" or "binary"."""
    path = Path(path)
    if path.is_dir():
        return "folder" if any(path.iterdir()) else "empty folder"
    if not path.exists():
        return "missing"
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return "unreadable"
    if not head:
        return "empty file"
    if head.startswith(HDF5_SIGNATURE):
        return "hdf5"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "damaged"  # a zip archive (as torch.save writes) cut short or corrupted
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        return "torch" if any(n.endswith("/data.pkl") for n in names) else "binary"
    if head.startswith(b"\x80\x02"):  # torch.save's legacy (pre-zip) format: a pickled magic number
        return "torch"
    # An ONNX model is a protobuf ModelProto: field 1 (ir_version, a varint) first, then its
    # producer ("pytorch" for torch.onnx); no magic number, so the suffix counts too.
    if head[:1] == b"\x08" and (path.suffix.lower() == ".onnx" or b"pytorch" in head[:256] or b"onnx" in head[:256]):
        return "onnx"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "text"
        except UnicodeDecodeError as exc:
            if exc.start >= len(head) - 3:  # a multi-byte character cut by the 4 KiB read
                return "text"
    return "binary"


def describe_file(path: str | Path) -> str:
    """One phrase saying what `path` is, for messages ("<path> is <phrase>, not ..."): a purireid
    checkpoint (its arch), another torch file, a TorchScript export, an ONNX model, a purireid
    feature file (which kind), another HDF5 file, a text file, a folder, an empty folder, ..."""
    kind = file_kind(path)
    if kind == "hdf5":
        return describe_hdf5(path)
    if kind == "torch":
        try:
            obj = torch_load(path)
        except Exception:  # noqa: BLE001 - what it is matters here, not why torch refused it
            return "a PyTorch file that does not load without running code, or is damaged"
        return describe_torch_object(obj)
    return {
        "missing": "missing (no such file or folder)",
        "folder": "a folder",
        "empty folder": "an empty folder",
        "empty file": "an empty file",
        "torchscript": "a TorchScript export (loaded with torch.jit.load)",
        "onnx": "an ONNX model (run with onnxruntime)",
        "text": "a text file",
        "unreadable": "a file this user cannot read",
        "damaged": DAMAGED_ZIP,
    }.get(kind, "a binary file of an unknown format")


def require_kind(path: Path, kind: str, role: str, expected: str, fix: str, error: type[Exception]) -> None:
    """Raise `error` unless `path` is a file of `kind` (file_kind), naming the file by the `role` it
    was given for: "<role> <path>: no such file; <fix>", or "<role> <path> is <what it is>, not
    <expected>; <fix>"."""
    found = file_kind(path)
    if found == "missing":
        raise error(f"{role} {path}: no such file; {fix}")
    if found == "damaged" and kind == "torch":
        raise error(f"{role} {path} is damaged: {DAMAGED_ZIP}; {fix}")
    if found != kind:
        raise error(f"{role} {path} is {describe_file(path)}, not {expected}; {fix}")


def describe_torch_object(obj: Any) -> str:
    """What a loaded torch file holds: a purireid checkpoint (its arch), a bare state_dict, a
    training job's resume state, or another object (naming the checkpoint keys it lacks)."""
    import torch

    if isinstance(obj, dict) and all(k in obj for k in CHECKPOINT_KEYS):
        return f"a purireid checkpoint ({obj['arch']})"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "a PyTorch file holding a bare state_dict (weights without the arch and config of a checkpoint)"
    if isinstance(obj, dict) and "fingerprint" in obj and "optimizer" in obj:
        return "the resume state of a training job (state/state.pth), not a finished checkpoint"
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(obj, dict) or k not in obj]
    return f"a PyTorch file holding a {type(obj).__name__} without the key(s) {', '.join(missing)}"


def feature_file_kind(h5: Any) -> str | None:
    """The kind of a purireid feature file (an open h5py.File), or None for another HDF5 file
    (old layouts included)."""
    if "features" not in h5 or "paths" not in h5:
        return None
    if h5.attrs.get("format") == FEATURE_FILE_FORMAT:
        return str(h5.attrs.get("kind", "extract"))  # version 1 was written by `purireid extract` only
    return "teacher" if "checkpoint_sha256" in h5.attrs else None  # the teacher file before version 2


def describe_hdf5(path: str | Path) -> str:
    """What an HDF5 file is: a purireid feature file (which kind) or another one."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            kind = feature_file_kind(h5)
    except Exception:  # noqa: BLE001 - truncated or damaged
        return "an HDF5 file that cannot be opened (truncated or damaged)"
    return f"{FEATURE_KINDS[kind]} (HDF5)" if kind in FEATURE_KINDS else "an HDF5 file that purireid did not write"
