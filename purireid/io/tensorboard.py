"""TensorBoard event files of a training run: the scalars of its log.jsonl, for watching a long
run with `tensorboard --logdir results/<dataset>`, when the `tensorboard` package is installed
(the optional extra: pip install -e '.[tensorboard]'). Without it nothing is written.

The file is rewritten whole from the records after every epoch, as log.jsonl is, with a fixed
name and times: a resumed run's file is the uninterrupted run's, byte for byte. Each record is
one step (0 the untrained evaluation, then one per epoch); its wall time is the sum of the
records' `seconds` so far, so TensorBoard's relative-time axis shows the run's own time.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from purireid.io.files import atomic_path, remove_stale_temporaries

# "tfevents" in the name is what TensorBoard looks for; no host name nor time in it.
EVENT_FILE = "events.out.tfevents.purireid"


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a log.jsonl record (not its epoch, phase or missing values)."""
    return {key: float(value) for key, value in record.items()
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def write_event_file(log_jsonl: str | Path, records: Sequence[Mapping[str, Any]]) -> Path | None:
    """Rewrite EVENT_FILE beside `log_jsonl` from `records`; its path, or None when the
    tensorboard package is not installed."""
    if not tensorboard_installed():
        return None
    # The optional extra's modules, imported only where it is installed.
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    path = Path(log_jsonl).parent / EVENT_FILE
    remove_stale_temporaries([path])  # a job killed while it wrote this (not a declared output) left it
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        writer = RecordWriter(handle)
        writer.write(Event(wall_time=0.0, file_version="brain.Event:2").SerializeToString())
        elapsed = 0.0
        for step, record in enumerate(records):
            elapsed += float(record.get("seconds") or 0.0)
            values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars(record).items()]
            writer.write(Event(wall_time=elapsed, step=step, summary=Summary(value=values)).SerializeToString())
        writer.flush()
    return path
