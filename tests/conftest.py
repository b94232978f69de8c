"""Shared test helpers: the tiny synthetic configuration the stage tests run on, a workflow
script run as Snakemake runs it, and a small tmpfs for disk-full tests."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from purireid.config.resolve import deep_merge, load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_config(data_root: Path | str, **sections: Any) -> dict:
    """config.yaml + tests/configs/tiny.yaml on the CPU, with `sections` merged key by key."""
    overrides = deep_merge({"data_root": str(data_root), "device": "cpu"}, sections)
    return load_config(REPO / "config.yaml", REPO / "tests" / "configs" / "tiny.yaml", overrides=overrides)


def prepare_tiny_dataset(root: Path) -> dict:
    """Generate the tiny synthetic dataset under `root` and write its manifest."""
    from purireid.config.resolve import stage_config
    from purireid.stages import prepare_dataset

    config = tiny_config(root / "data")
    manifest = root / "results" / "data" / "manifest.csv"
    prepare_dataset.run(stage_config(config, "prepare_dataset"), manifest=manifest,
                        summary=manifest.with_name("summary.json"), workers=1, progress=False)
    return {"root": root, "data_root": root / "data", "manifest": manifest}


class Files(dict):
    """Snakemake's named lists as a workflow script uses them: by attribute and iterated."""

    __getattr__ = dict.__getitem__

    def __iter__(self):
        return iter(self.values())


def fake_snakemake(rule: str, config: dict, *, log: Path | str, input: dict | None = None,
                   output: dict | None = None, params: dict | None = None, threads: int = 1,
                   wildcards: dict | None = None) -> Any:
    """The parts of Snakemake's `snakemake` object a workflow script reads; `params.config` is the
    rule's (purireid.config.resolve.stage_params), `config` the whole workflow config."""
    from purireid.config.resolve import stage_params

    return type("Snakemake", (), {
        "rule": rule, "config": config, "threads": threads, "log": [str(log)],
        "wildcards": Files(wildcards or {}), "input": Files({k: str(v) for k, v in (input or {}).items()}),
        "output": Files({k: str(v) for k, v in (output or {}).items()}),
        "params": Files({"config": stage_params(config, rule), **(params or {})}),
    })


def run_workflow_script(script: str, snakemake: Any) -> None:
    """Run workflow/scripts/<script> in this process as Snakemake would (its SystemExit propagates)."""
    scripts = str(REPO / "workflow" / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    runpy.run_path(str(REPO / "workflow" / "scripts" / script), init_globals={"snakemake": snakemake})


# The workflow script of rule train_teacher, run as Snakemake runs it, in a process of its own.
RUN_TEACHER_JOB = textwrap.dedent("""
    import sys, yaml
    tests, config_file, out, manifest = sys.argv[1:5]
    sys.path.insert(0, tests)
    from conftest import fake_snakemake, run_workflow_script
    job = fake_snakemake("train_teacher", yaml.safe_load(open(config_file)), log=out + "/run.log",
                         input={"manifest": manifest}, params={"state_dir": out + "/state"},
                         output={"model": out + "/model.pth", "log_jsonl": out + "/log.jsonl", "curve": out + "/curve.png"})
    run_workflow_script("train_teacher.py", job)
""")


def start_teacher_job(tmp: Path, config: dict, manifest: Path, name: str) -> subprocess.Popen:
    """The train_teacher job on `config` (written to tmp/config.yaml), outputs and run.log in tmp/<name>,
    in a new session (so a test can signal its whole process group)."""
    import yaml

    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp / name
    out.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", RUN_TEACHER_JOB, str(REPO / "tests"), str(cfg), str(out), str(manifest)],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
                            stderr=subprocess.DEVNULL)


def tmpfs_mount(mount: Path, options: str, why: str):
    """A generator fixture's body: a tmpfs mounted at `mount` with `options` (needs root; skips,
    saying `why` it is needed, where it cannot be mounted), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs ({why}) needs root")
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs mounted in the test's folder, for disk-full tests (needs root)."""
    yield from tmpfs_mount(tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}", "size=256k,mode=0755", "a small one to fill up")


@pytest.fixture(scope="session")
def tiny_dag(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, float]:
    """The whole DAG of the tiny config, run once per session: (folder, snakemake's process, seconds).
    Tests that run Snakemake again take their own copy (`copy_of_tiny_dag`) and leave it untouched."""
    from test_workflow import TINY, snakemake

    workdir = tmp_path_factory.mktemp("tiny_dag")
    start = time.monotonic()
    proc = snakemake(workdir, "--cores", "2", "--configfile", str(TINY))
    return workdir, proc, time.monotonic() - start


def copy_of_tiny_dag(tiny_dag: tuple[Path, subprocess.CompletedProcess, float], target: Path) -> Path:
    """A copy of the finished tiny run in `target`, .snakemake metadata and modification times
    included, so Snakemake sees its outputs up to date as in the original."""
    shutil.copytree(tiny_dag[0], target, symlinks=True, dirs_exist_ok=True)
    return target
