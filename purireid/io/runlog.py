"""A training run's log, log.jsonl: one record per evaluation or epoch, and what each record
describes (its "phase"). The training loop writes it; the summary, the ablation table and the
curves read it, so its vocabulary lives here, below both."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# What a log.jsonl record describes (its "phase" field; "epoch" is an integer, or null for
# the untrained model's evaluation).
PHASE_UNTRAINED, PHASE_WARMUP, PHASE_TRAIN = "untrained", "warmup", "train"


def epoch_phase(epoch: int) -> str:
    """The phase of a training epoch's record: "warmup" for the student's epoch -1, else "train"."""
    return PHASE_WARMUP if epoch < 0 else PHASE_TRAIN


def record_phase(record: Mapping[str, Any]) -> str:
    """"untrained" (the evaluation before the first epoch), "warmup" (the student's epoch -1)
    or "train"; also for logs written before the "phase" field (epoch "untrained" then)."""
    if record.get("phase"):
        return str(record["phase"])
    epoch = record.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return PHASE_UNTRAINED
    return epoch_phase(epoch)
