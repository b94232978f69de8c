"""The workflow on a real single-node SLURM cluster, through `--profile profiles/slurm`.

A session fixture installs (apt) and starts munge + slurmctld + slurmd on this machine with
tests/slurm/start_slurm.sh and always stops them (tests/slurm/stop_slurm.sh, by PID).
Needs root and apt (or SLURM already installed); skipped with the reason otherwise.
Set PURIREID_REQUIRE_SLURM=1 (CI) to turn "SLURM could not start" into a failure.

The tests run the user-facing profile unchanged, plus only the flags a test cluster without
slurmdbd and GPUs needs (TEST_FLAGS below; the tiny config pins device: cpu, so the rules ask
for no GPU).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "slurm"
SNAKEFILE = REPO / "Snakefile"
PROFILE = REPO / "profiles" / "slurm"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
# The jobs must run in this same installed environment: put its bin/ first on PATH (sbatch
# exports the submitting environment; the plugin starts jobs with sys.executable).
VENV_BIN = Path(sys.executable).parent
SLURM_DIR = Path(os.environ.get("PURIREID_SLURM_DIR", "/tmp/purireid-slurm"))
LOCK_FILE = Path("/tmp/purireid-slurm.lock")
# Wall-clock limits (seconds) of one snakemake call; a hang fails the test, not CI.
RUN_TIMEOUT = int(os.environ.get("PURIREID_SLURM_RUN_TIMEOUT", "300"))

# Only what this test cluster needs on top of the user-facing profile:
TEST_FLAGS = [
    # profiles/default/ (the local profile) would otherwise be loaded on top of the profile
    "--workflow-profile", "none",
    # no slurmdbd here: sacct fails, the plugin would lose the jobs and wait forever
    "--slurm-status-command", "squeue",
    # first status check after 1 s instead of 40 s (MinJobAge=300 >= 3x this)
    "--slurm-init-seconds-before-status-checks", "1",
    # the node has nproc CPUs; rules asking for more would never be scheduled
    "--max-threads", str(os.cpu_count() or 1),
    # keep the SLURM logs of successful jobs, for the failure reports below
    "--slurm-keep-successful-logs",
]

DATASET = "synthetic"


# --------------------------------------------------------------------------- the cluster


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "SLURM test cluster: Linux only"
    if os.geteuid() != 0:
        return "SLURM test cluster: needs root (it installs and starts munge/slurmctld/slurmd)"
    installed = all(shutil.which(b) or Path("/usr/sbin", b).exists()
                    for b in ("slurmctld", "slurmd", "munged", "sbatch", "squeue"))
    if not installed and shutil.which("apt-get") is None:
        return "SLURM test cluster: SLURM not installed and apt-get unavailable"
    if shutil.which("timeout") is None:
        return "SLURM test cluster: coreutils `timeout` missing"
    return None


def _not_started(msg: str) -> None:
    if os.environ.get("PURIREID_REQUIRE_SLURM") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node SLURM; stopped (every daemon it started, by PID) at the end."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # One test cluster per machine: a second pytest session waits for the first one.
    lock = open(LOCK_FILE, "w")
    deadline = time.monotonic() + 600
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                _not_started("the SLURM test cluster is held by another test session (lock "
                             f"{LOCK_FILE}) for more than 10 minutes")
            time.sleep(2)
    env = dict(os.environ, PURIREID_SLURM_DIR=str(SLURM_DIR))
    tic = time.monotonic()
    try:
        try:
            proc = subprocess.run(["timeout", "-k", "10", "300", str(SCRIPTS / "start_slurm.sh")],
                                  env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                _not_started(f"SLURM test cluster could not start (rc {proc.returncode}):\n"
                             f"{proc.stderr[-3000:]}")
            times = dict(re.findall(r"(\w+)=(\d+)", proc.stdout))
            print(f"\nSLURM test cluster up in {time.monotonic() - tic:.1f} s "
                  f"(apt install {times.get('install', '?')} s, daemons {times.get('start', '?')} s)")
            yield {"install_s": int(times.get("install", -1)), "start_s": int(times.get("start", -1))}
        finally:
            subprocess.run(["timeout", "-k", "5", "120", str(SCRIPTS / "stop_slurm.sh")], env=env)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


# --------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _snakemake_cmd(workdir: Path, *args: str, timeout: int = RUN_TIMEOUT) -> list[str]:
    return ["timeout", "-k", "10", str(timeout),
            str(VENV_BIN / "python"), "-m", "snakemake",
            "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
            "--profile", str(PROFILE), *TEST_FLAGS, *args]


def _diagnostics(workdir: Path, output: str) -> str:
    parts = [f"--- snakemake output (tail)\n{output[-6000:]}"]
    for pattern in ("results/*/logs/*.log", ".snakemake/slurm_logs/**/*.log"):
        for path in sorted(workdir.glob(pattern))[-8:]:
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.relative_to(workdir)} (tail)\n{text[-1500:]}")
    try:
        squeue = subprocess.run(["squeue", "-a"], capture_output=True, text=True, timeout=10).stdout
        parts.append(f"--- squeue\n{squeue}")
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        parts.append(f"--- squeue failed: {exc}")
    return "\n".join(parts)


def _run(workdir: Path, *args: str, timeout: int = RUN_TIMEOUT) -> str:
    proc = subprocess.run(_snakemake_cmd(workdir, *args, timeout=timeout), env=_env(),
                          cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        what = "timed out" if proc.returncode in (124, 137) else f"failed (rc {proc.returncode})"
        pytest.fail(f"snakemake on SLURM {what}\n{_diagnostics(workdir, proc.stdout)}")
    return proc.stdout


def _declared_outputs(workdir: Path, *configfiles: Path) -> list[dict[str, str]]:
    """Every output file of the workflow with Snakemake's status for it (snakemake --summary)."""
    proc = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "snakemake", "--snakefile", str(SNAKEFILE),
         "--directory", str(workdir), "--workflow-profile", "none", "--summary",
         "--configfile", *map(str, configfiles)],
        env=_env(), cwd=workdir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(proc.stdout), delimiter="\t"))
    assert rows, proc.stdout[-2000:]
    return rows


def _slurm_jobs() -> list[dict[str, str]]:
    out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%k"], capture_output=True, text=True,
                         timeout=10).stdout
    jobs = []
    for line in out.splitlines():
        jobid, state, comment = (line.split("|", 2) + ["", ""])[:3]
        jobs.append({"id": jobid.strip(), "state": state.strip(), "comment": comment.strip()})
    return jobs


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def tiny_run(slurm_cluster):
    """The whole DAG of the tiny config through the SLURM profile, once."""
    # not under pytest's basetemp: other pytest sessions on a shared machine prune old
    # basetemps, and the SLURM jobs of this one may still be writing there
    workdir = Path(tempfile.mkdtemp(prefix="purireid-slurm-run-"))
    tic = time.monotonic()
    try:
        output = _run(workdir, "--configfile", str(TINY))
        yield {"workdir": workdir, "output": output, "seconds": time.monotonic() - tic}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_whole_dag_runs_on_slurm(tiny_run):
    workdir, output = tiny_run["workdir"], tiny_run["output"]
    print(f"\nwhole tiny DAG on SLURM: {tiny_run['seconds']:.0f} s")
    # every job went through sbatch
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", output)
    rules = set(re.findall(r"^rule (\w+):", output, re.M))
    assert {"prepare_dataset", "train_teacher", "extract_teacher_features", "train_student",
            "evaluate"} <= rules, output[-3000:]
    assert len(submitted) >= 6, output[-3000:]  # prepare, teacher, extract, student, 2x evaluate

    # the public contract
    res = workdir / "results" / DATASET
    contract = ["data/manifest.csv", "teacher/model.pth", "teacher/train_features.h5",
                "student/model.pth"]
    for model in ("teacher", "student"):
        contract += [f"{model}/eval.json", f"{model}/cmc.png", f"{model}/ranked.png"]
    for rel in contract:
        path = res / rel
        assert path.is_file() and path.stat().st_size > 0, f"missing or empty: {path}"
    for model in ("teacher", "student"):
        metrics = json.loads((res / model / "eval.json").read_text())
        assert 0.0 <= metrics["mAP"] <= 1.0, metrics

    # every declared output of the workflow exists and is up to date
    rows = _declared_outputs(workdir, TINY)
    for row in rows:
        path = workdir / row["output_file"]
        assert path.exists(), f"declared output missing: {row['output_file']}"
        assert row["status"] == "ok", row
        assert row["plan"] == "no update", row

    # and a second call through SLURM has nothing to do
    again = _run(workdir, "--configfile", str(TINY))
    assert "Nothing to be done" in again, again[-2000:]
    assert "has been submitted with SLURM jobid" not in again


def test_cancelled_training_job_is_resubmitted_and_resumes(tiny_run, tmp_path):
    """scancel a running train_teacher job after its first epoch: the profile's retries
    resubmit it and the stage resumes from the saved epoch (what happens on TIMEOUT too)."""
    workdir = tiny_run["workdir"]
    tiny = yaml.safe_load(TINY.read_text())
    epochs = tiny["train"]["epochs"]
    assert epochs >= 2, "the tiny config needs >= 2 epochs for a state between two epochs"
    overlay = tmp_path / "longer.yaml"
    # longer epochs (as many, so as many clusterings as in the tiny run): a changed
    # param makes train_teacher rerun (from scratch: the finished run cleared its state), and
    # leaves time to catch the job between its first and its last epoch
    overlay.write_text(f"train:\n  iters: {max(10, 3 * tiny['train']['iters'])}\n")
    res = workdir / "results" / DATASET
    state_file = res / "teacher" / "state" / "state.pth"
    train_log = res / "logs" / "train_teacher.log"
    assert not state_file.exists()

    cmd = _snakemake_cmd(workdir, "--configfile", str(TINY), str(overlay),
                         "--until", "train_teacher")
    out_path = tmp_path / "snakemake.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, env=_env(), cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
        cancelled, seen = None, []
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while cancelled is None and proc.poll() is None and time.monotonic() < deadline:
                jobs = _slurm_jobs()
                snapshot = (jobs, state_file.exists())
                if not seen or seen[-1][1:] != snapshot:
                    seen.append((round(time.monotonic() - deadline + RUN_TIMEOUT, 1), *snapshot))
                running = [j for j in jobs
                           if j["comment"].startswith("rule_train_teacher") and j["state"] == "RUNNING"]
                if running and state_file.exists():
                    cancelled = running[0]["id"]
                    subprocess.run(["scancel", cancelled], check=True, timeout=10)
                    break
                time.sleep(0.2)
            rc = proc.wait(timeout=RUN_TIMEOUT + 30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = out_path.read_text()
    if cancelled is None:
        pytest.fail("never saw a running train_teacher job with a saved epoch to cancel; "
                    "seen (seconds, squeue, state file exists):\n"
                    + "\n".join(map(str, seen)) + "\n" + _diagnostics(workdir, output))
    if rc != 0:
        pytest.fail(f"snakemake did not recover from the cancelled job (rc {rc})\n"
                    + _diagnostics(workdir, output))

    # only train_teacher ran; SLURM reported the cancelled job as failed (CANCELLED) and
    # Snakemake (the profile's `retries`) submitted it again
    assert "rule prepare_dataset:" not in output
    assert re.search(rf"SLURM-job '{cancelled}' failed", output), output[-4000:]
    teacher_jobs = re.findall(r"has been submitted with SLURM jobid (\d+)", output)
    assert cancelled in teacher_jobs and teacher_jobs[-1] != cancelled, (teacher_jobs, output[-4000:])
    # (the failed attempt's log, printed by show-failed-logs: it had started from scratch)
    assert "starting teacher training (no resume state" in output, output[-4000:]

    # the new attempt resumed from the saved epoch instead of starting over (the state of the
    # earlier, finished run was cleared, so this state can only come from the cancelled job)
    log_text = train_log.read_text(errors="replace")
    resumed = re.findall(r"resuming teacher from .*?: (\d+) of (\d+) epochs done", log_text)
    assert resumed, log_text[-3000:]
    done, total = map(int, resumed[-1])
    assert 1 <= done < total == epochs, resumed

    # and finished: all epochs in the log, model written, resume state cleared
    records = [json.loads(line) for line in (res / "teacher" / "log.jsonl").read_text().splitlines()
               if line.strip()]
    trained = [r for r in records if r.get("phase") != "untrained"]
    assert len(trained) == epochs, records
    assert (res / "teacher" / "model.pth").stat().st_size > 0
    assert not state_file.exists()
    print(f"\ncancelled SLURM job {cancelled} after {done} of {total} epochs; "
          f"resubmitted as {teacher_jobs[-1]} and resumed")
