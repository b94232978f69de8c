"""The Snakemake workflow: dry runs, lint, config handling, and (marked slow) real runs of the
whole DAG on the tiny synthetic config in a temporary directory: outputs, nothing left to do,
single-stage reruns, a params change, and resume after a killed training job."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
PRESETS = sorted((REPO / "config" / "presets").glob("*.yaml"))
RULES = ("prepare_dataset", "train_teacher", "extract_teacher_features", "train_student", "evaluate")


def snakemake_exe() -> str:
    exe = Path(sys.executable).with_name("snakemake")
    return str(exe) if exe.exists() else shutil.which("snakemake") or "snakemake"


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the repository's workflow with `workdir` as working directory (outputs go there)."""
    cmd = [snakemake_exe(), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-12000:]}")
    return proc


def planned_jobs(output: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run: rule -> count (without the 'all' target)."""
    jobs: dict[str, int] = {}
    if "Job stats:" not in output:
        return jobs
    table = output.split("Job stats:", 1)[1]
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not match:
            break
        if match.group(1) not in ("all", "total"):
            jobs[match.group(1)] = int(match.group(2))
    return jobs


def planned_evaluations(output: str) -> set[str]:
    return set(re.findall(r"rule evaluate:.*?wildcards: model=(\w+)", output, flags=re.S))


def expected_outputs(dataset: str = "synthetic") -> list[str]:
    base = f"results/{dataset}"
    files = [f"{base}/data/manifest.csv", f"{base}/data/summary.json", f"{base}/teacher/train_features.h5"]
    for model in ("teacher", "student"):
        files += [f"{base}/{model}/{name}" for name in
                  ("model.pth", "log.jsonl", "curve.png", "eval.json", "cmc.png", "ranked.png")]
    return files


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- dry runs, lint, config


def test_dry_run_default(tmp_path):
    out = snakemake(tmp_path, "-n").stdout
    assert planned_jobs(out) == {
        "prepare_dataset": 1, "train_teacher": 1, "extract_teacher_features": 1, "train_student": 1, "evaluate": 2,
    }
    assert planned_evaluations(out) == {"teacher", "student"}
    for path in expected_outputs():
        assert path in out
    assert not (tmp_path / "results").exists(), "a dry run must not write outputs"


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_dry_run_presets_without_data(tmp_path, preset):
    """Dry runs work without the real data: the prepare job has no declared input."""
    dataset = yaml.safe_load(preset.read_text())["dataset"]
    out = snakemake(tmp_path, "-n", "--configfile", str(preset)).stdout
    assert planned_jobs(out)["train_teacher"] == 1
    for path in expected_outputs(dataset):
        assert path in out
    # sized per dataset: the real datasets ask for far more memory than the synthetic one
    teacher = out.split("rule train_teacher:", 1)[1].split("rule ", 1)[0]
    mem = int(re.search(r"mem_mb=(\d+)", teacher).group(1))
    assert mem >= 32000
    assert re.search(r"gpu=1\b", teacher), teacher


def test_presets_hold_the_paper_settings():
    market = yaml.safe_load((REPO / "config/presets/market1501.yaml").read_text())
    msmt = yaml.safe_load((REPO / "config/presets/msmt17.yaml").read_text())
    for preset, eps, iters in ((market, 0.6, 200), (msmt, 0.7, 400)):
        assert preset["cluster"]["eps"] == eps and preset["train"]["iters"] == iters
        assert preset["model"] == {"arch": "resnet50", "pretrained": "imagenet", "bn_groups": 4}
        assert preset["train"]["epochs"] == 50 and preset["train"]["batch_size"] == 256
        assert preset["train"]["num_instances"] == 16
        assert (preset["data"]["height"], preset["data"]["width"]) == (256, 128)


def test_lint_only_justified_findings(tmp_path):
    """`snakemake --lint`: the only finding is 'no conda/container per rule', justified in the README."""
    proc = snakemake(tmp_path, "--lint", check=False)
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    assert "Lints for snakefile" not in text, text
    titles = set(re.findall(r"^\s+\* (.+?):$", text, flags=re.M))
    assert titles <= {"Specify a conda environment or container for each rule."}, titles
    linted_rules = set(re.findall(r"^Lints for rule (\w+)", text, flags=re.M))
    assert linted_rules <= set(RULES), linted_rules
    readme = (REPO / "README.md").read_text()
    assert "conda environment or container" in readme


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"student": {"mu": "high"}}, "student.mu"),
        ({"cluster": {"epss": 0.5}}, "cluster"),
        ({"dataset": "market"}, "dataset"),
        ({"train": {"batch_size": 30, "num_instances": 4}}, "train.batch_size"),
    ],
)
def test_invalid_config_names_the_key(tmp_path, override, key):
    bad = write_yaml(tmp_path / "bad.yaml", override)
    proc = snakemake(tmp_path, "-n", "--configfile", str(bad), check=False)
    assert proc.returncode != 0
    assert f"config key '{key}'" in proc.stdout + proc.stderr


def test_partial_configfile_merges_over_defaults(tmp_path):
    """A partial --configfile changes only its keys; the sections it touches keep their other keys."""
    partial = write_yaml(tmp_path / "partial.yaml", {"dataset": "msmt17", "data": {"workers": 7}})
    out = snakemake(tmp_path, "-n", "--cores", "64", "--configfile", str(partial)).stdout
    assert "results/msmt17/teacher/model.pth" in out
    teacher = out.split("rule train_teacher:", 1)[1].split("rule ", 1)[0]
    assert re.search(r"threads: 8\b", teacher), teacher  # data.workers + 1


def test_prepare_fails_clearly_without_the_dataset(tmp_path):
    """Real data absent: the dry run works (above), the prepare job fails with the data layer's message."""
    preset = REPO / "config/presets/market1501.yaml"
    proc = snakemake(tmp_path, "results/market1501/data/manifest.csv", "--cores", "1", "--configfile", str(preset),
                     check=False, timeout=300)
    assert proc.returncode != 0
    log = (tmp_path / "results/market1501/logs/prepare_dataset.log").read_text()
    assert "prepare_dataset failed" in log
    assert "Market-1501-v15.09.15" in log, log
    assert not (tmp_path / "results/market1501/data/manifest.csv").exists()


def test_partial_config_reaches_the_stage_resolved(tmp_path):
    """The config a stage sees: config.yaml, then tiny.yaml, then a partial file, key by key."""
    partial = write_yaml(tmp_path / "partial.yaml", {"synthetic": {"num_cameras": 2}})
    snakemake(tmp_path, "results/synthetic/data/manifest.csv", "--cores", "1", "--configfile", str(TINY), str(partial),
              timeout=300)
    resolved = yaml.safe_load((tmp_path / "results/synthetic/data/config.yaml").read_text())
    tiny = yaml.safe_load(TINY.read_text())
    assert resolved["synthetic"]["num_cameras"] == 2  # the partial file
    assert resolved["synthetic"]["num_train_ids"] == tiny["synthetic"]["num_train_ids"]  # tiny.yaml
    default = yaml.safe_load((REPO / "config.yaml").read_text())
    assert resolved["synthetic"]["seed"] == default["synthetic"]["seed"]  # config.yaml
    assert resolved["train"]["temperature"] == 0.05  # the schema's default
    summary = json.loads((tmp_path / "results/synthetic/data/summary.json").read_text())
    assert summary


# --------------------------------------------------------------------------- real runs (slow)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole DAG of the tiny config, run once for the slow tests of this module."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    start = time.monotonic()
    proc = snakemake(workdir, "--cores", "2", "--configfile", str(TINY))
    return workdir, proc, time.monotonic() - start


@pytest.mark.slow
def test_end_to_end_outputs(tiny_run):
    workdir, proc, seconds = tiny_run
    print(f"tiny DAG: {seconds:.0f} s")
    for path in expected_outputs():
        assert (workdir / path).is_file(), path
        assert (workdir / path).stat().st_size > 0, path
    base = workdir / "results/synthetic"
    for name in list(RULES[:-1]) + ["evaluate_teacher", "evaluate_student"]:
        assert (base / "logs" / f"{name}.log").is_file(), name
    for name in ("train_teacher", "extract_teacher_features", "train_student", "evaluate_teacher", "evaluate_student"):
        assert (base / "benchmarks" / f"{name}.tsv").is_file(), name
    for folder in ("data", "teacher", "student"):
        assert (base / folder / "config.yaml").is_file(), f"resolved config beside the {folder} outputs"
    for model in ("teacher", "student"):
        metrics = json.loads((base / model / "eval.json").read_text())
        for key in ("mAP", "rank1", "rank5", "rank10", "cmc"):
            assert key in metrics, (model, key)
        assert 0.0 <= metrics["mAP"] <= 1.0
        lines = (base / model / "log.jsonl").read_text().splitlines()
        assert lines and all(json.loads(line) for line in lines)


@pytest.mark.slow
def test_second_run_has_nothing_to_do(tiny_run):
    workdir, _, _ = tiny_run
    proc = snakemake(workdir, "--cores", "2", "--configfile", str(TINY))
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert planned_jobs(proc.stdout + proc.stderr) == {}


@pytest.mark.slow
def test_changed_student_param_reruns_only_student(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    mu = write_yaml(tmp_path / "mu.yaml", {"student": {"mu": 0.5}})
    out = snakemake(workdir, "-n", "--configfile", str(TINY), str(mu)).stdout
    assert planned_jobs(out) == {"train_student": 1, "evaluate": 1}
    assert planned_evaluations(out) == {"student"}
    assert "params changed" in out.lower() or "params have changed" in out.lower(), out
    # a teacher parameter reruns everything downstream of the teacher
    eps = write_yaml(tmp_path / "eps.yaml", {"cluster": {"eps": 0.55}})
    out = snakemake(workdir, "-n", "--configfile", str(TINY), str(eps)).stdout
    assert planned_jobs(out) == {"train_teacher": 1, "extract_teacher_features": 1, "train_student": 1, "evaluate": 2}


@pytest.mark.slow
def test_forced_student_rerun(tiny_run):
    """`-R train_student` reruns exactly the student and its evaluation."""
    workdir, _, _ = tiny_run
    base = workdir / "results/synthetic"
    before = {p: (workdir / p).stat().st_mtime_ns for p in expected_outputs()}
    dry = snakemake(workdir, "-n", "-R", "train_student", "--configfile", str(TINY)).stdout
    assert planned_jobs(dry) == {"train_student": 1, "evaluate": 1}
    assert planned_evaluations(dry) == {"student"}
    proc = snakemake(workdir, "--cores", "2", "-R", "train_student", "--configfile", str(TINY))
    assert planned_jobs(proc.stdout + proc.stderr) == {"train_student": 1, "evaluate": 1}
    changed = {p for p in before if (workdir / p).stat().st_mtime_ns != before[p]}
    assert changed == {p for p in expected_outputs() if "/student/" in p}, changed
    assert not (base / "student" / "state" / "state.pth").exists()
    again = snakemake(workdir, "--cores", "2", "--configfile", str(TINY))
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_report(tiny_run):
    workdir, _, _ = tiny_run
    snakemake(workdir, "--configfile", str(TINY), "--report", "report.html")
    html = (workdir / "report.html").read_text(errors="replace")
    assert len(html) > 10_000
    for name in ("curve.png", "cmc.png", "ranked.png", "eval.json"):
        assert name in html, name


@pytest.mark.slow
def test_killed_teacher_resumes(tmp_path):
    """SIGKILL snakemake and its job after the teacher's first epoch; the next run resumes it."""
    longer = write_yaml(tmp_path / "longer.yaml", {"train": {"epochs": 4, "eval_every": 0}})
    target = "results/synthetic/teacher/model.pth"
    snakemake(tmp_path, "results/synthetic/data/manifest.csv", "--cores", "1", "--configfile", str(TINY), str(longer),
              timeout=300)
    cmd = [snakemake_exe(), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path), target,
           "--cores", "2", "--configfile", str(TINY), str(longer)]
    state = tmp_path / "results/synthetic/teacher/state"
    log_file = tmp_path / "results/synthetic/logs/train_teacher.log"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not any(state.glob("*.pth")):
            assert proc.poll() is None, "snakemake ended before the first epoch's state appeared"
            assert time.monotonic() < deadline, "no resume state after 600 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / target).exists()
    assert any(state.glob("*.pth"))
    snakemake(tmp_path, "--unlock", "--configfile", str(TINY), str(longer))
    snakemake(tmp_path, target, "--cores", "2", "--configfile", str(TINY), str(longer))
    assert (tmp_path / target).is_file()
    log = log_file.read_text()
    assert re.search(r"resum", log, flags=re.I), log[-3000:]
    records = [json.loads(line) for line in (tmp_path / "results/synthetic/teacher/log.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in records if isinstance(r.get("epoch"), int)]
    assert epochs == sorted(set(epochs)) and len(epochs) == 4, epochs
