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


def prepare_tiny_dataset(root: Path) -> dict:
    """Generate the tiny synthetic dataset under `root` and write its manifest."""
    from purireid.data import prepare_dataset

    config = tiny_config(root / "data")
    manifest = root / "results" / "data" / "manifest.csv"
    prepare_dataset("synthetic", config["data_root"], manifest, manifest.with_name("summary.json"),
                    synthetic=config["synthetic"], workers=1)
    return {"root": root, "data_root": root / "data", "manifest": manifest}
