"""Shared test helpers: the tiny synthetic configuration the stage tests run on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from purireid.config import deep_merge, load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_config(data_root: Path | str, **sections: Any) -> dict:
    """config.yaml + tests/configs/tiny.yaml on the CPU, with `sections` merged key by key."""
    overrides = deep_merge({"data_root": str(data_root), "device": "cpu"}, sections)
    return load_config(REPO / "config.yaml", REPO / "tests" / "configs" / "tiny.yaml", overrides=overrides)
