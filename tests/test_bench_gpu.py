"""benchmarks/bench_gpu.py end to end in its --smoke mode (tiny set, ResNet-18, CPU): every stage
runs, the table has a row per phase and epoch, and the extrapolation adds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402


def test_smoke_run_prints_the_table_and_the_extrapolation(tmp_path, capsys):
    result = bench_gpu.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--prepare-workers", "1",
                             "--teacher-epochs", "1", "--iters", "1"])
    printed = capsys.readouterr().out
    phases = {(r["stage"], r["epoch"], r["phase"]) for r in result["rows"]}
    for stage in ("teacher", "student"):
        assert (stage, "-", "job start-up") in phases and (stage, "-", "evaluation (untrained)") in phases
        assert (stage, 0, "feature extraction") in phases and (stage, 0, "pseudo labels") in phases
        assert (stage, 0, "evaluation") in phases
    assert ("teacher", 0, "training steps (1 it)") in phases and ("student", -1, "training steps (2 it)") in phases
    assert ("student", 0, "training steps (1 it)") in phases
    assert ("teacher", "-", "state, log, curve per epoch") in phases
    assert {("extract", "-", "feature extraction (job)"), ("evaluate", "-", "evaluation (job)"),
            ("job", "-", "process start-up")} <= phases
    for row in result["rows"]:
        if row["seconds"] is not None:
            assert row["seconds"] >= 0, row
    assert "training steps (1 it)" in printed and "images/s" in printed
    full = result["extrapolated_s"]
    assert full["total"] == pytest.approx(sum(v for k, v in full.items() if k != "total"), abs=0.5)
    assert full["train_teacher"] > 0 and full["train_student"] > 0
    assert "extrapolated full DAG" in printed
    assert json.loads((tmp_path / "bench_gpu.json").read_text())["extrapolated_s"] == full
    assert (tmp_path / "results" / "student" / "eval.json").exists()


def test_extrapolation_scales_the_steps_and_counts_the_evaluations():
    measured = {
        "process_startup_s": 5.0, "prepare_s": 10.0, "extract_s": 20.0, "evaluate_s": 8.0,
        "teacher": {"startup_s": 4.0, "eval_s": 3.0, "bookkeeping_s": 0.5,
                    "epochs": [{"epoch": 1, "extract_s": 2.0, "cluster_s": 1.0, "train_s": 6.0, "iters": 60}]},
        "student": {"startup_s": 6.0, "eval_s": 3.0, "bookkeeping_s": 0.5,
                    "epochs": [{"epoch": -1, "extract_s": 0.0, "cluster_s": 1.0, "train_s": 12.0, "iters": 120},
                               {"epoch": 0, "extract_s": 2.0, "cluster_s": 1.0, "train_s": 8.0, "iters": 60}]},
    }
    recipe = {"train": {"iters": 200}, "student": {"warmup_iters_factor": 2}}
    full = bench_gpu.extrapolate(measured, recipe)
    assert bench_gpu.evaluations_in(50, 10) == 5 and bench_gpu.evaluations_in(3, 10) == 1
    # 50 epochs of (2 + 1 + 6 * 200 / 60) s and their bookkeeping, the untrained evaluation and 5 more, start-ups
    assert full["train_teacher"] == pytest.approx(5 + 4 + 3 * 6 + 50 * (23.0 + 0.5), abs=0.1)
    assert full["train_student"] == pytest.approx(5 + 6 + 3 * 6 + (1 + 12 * 400 / 120) + 51 * 0.5
                                                  + 50 * (3 + 8 * 200 / 60), abs=0.1)
    assert full["evaluate"] == 2 * (5 + 8) and full["prepare_dataset"] == 15 and full["extract_teacher_features"] == 25


def test_gpu_check_script_plans_every_part_and_its_configs_resolve(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the script parses, plans every part of the device check,
    and its cheap checks pass here (imports, the scripts' options, both DAGs' configs)."""
    repo = Path(__file__).resolve().parents[1]
    script = repo / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    planned = [line.split()[0] for line in summary if " planned " in line]
    assert planned == ["environment", "doctor", "step", "demo_dag", "market_dag", "bench_gpu", "pseudo_labels",
                       "search", "batchnorm", "step_compiled"]
    assert summary[-1].startswith("dry_run_checks ok"), summary
    assert "scripts and imports: ok" in (tmp_path / "out" / "gpu_check.log").read_text()
