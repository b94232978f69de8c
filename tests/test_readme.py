"""The README's commands, run exactly as written: the shell blocks marked
`<!-- readme-test: NAME -->` (the demo, the report, the config override and "Using a trained
model"), in a fresh clone of this checkout whose embedded default (config.yaml) is the tiny
config. The session's tiny run is copied into the clone first, so `make demo` finds its results
up to date instead of training again. Each block must succeed with the virtual environment's
bin/ off the PATH (the README writes `.venv/bin/...`, which works without activating it), and
the checkout must stay clean (`git status`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_of_tiny_dag
from test_workflow import planned_jobs
from purireid.config.resolve import deep_merge

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
MARKED = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```bash\n(.*?)```", re.S)
RUN_ORDER = ("demo", "report", "use", "config")  # each block relies on the ones before it
OLD = 946684800  # 2000-01-01: the clone's files predate every result copied into it


def readme_blocks() -> dict[str, str]:
    """The marked shell blocks of README.md by name."""
    blocks: dict[str, str] = {}
    for name, body in MARKED.findall(README.read_text()):
        assert name not in blocks, f"two README blocks are marked '{name}'"
        blocks[name] = body
    return blocks


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def commands(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_marks_the_blocks_it_runs():
    """The blocks the slow test runs exist, every shell block of "Using a trained model" is among
    them, and their commands need no activated environment."""
    blocks = readme_blocks()
    assert set(blocks) == set(RUN_ORDER), sorted(blocks)
    assert [line.split("#")[0].strip() for line in commands(blocks["demo"])] == ["make demo"]
    assert any(line.startswith("make report") for line in commands(blocks["report"]))
    using = readme_section("Using a trained model")
    assert using.count("```bash") == 1 and "<!-- readme-test: use -->" in using
    for name, block in blocks.items():
        for line in commands(block):
            assert line.split()[0] in ("make", ".venv/bin/snakemake", ".venv/bin/purireid", "mkdir", "printf"), \
                (name, line)


def test_the_method_is_documented_in_the_checkout():
    """A clone carries its method document; no document points outside the repository."""
    assert (REPO / "docs" / "method.md").is_file()
    assert "docs/method.md" in README.read_text()
    documents = [README, *(REPO / "docs").glob("*.md"), *(REPO / "workflow").rglob("*.smk"),
                 *(REPO / "config").rglob("*.yaml"), REPO / "purireid" / "config" / "schemas" / "config.schema.yaml"]
    for path in documents:
        text = path.read_text()
        assert "shared/SPEC" not in text and "SPEC §" not in text, path


def fresh_clone_of_the_checkout(target: Path) -> Path:
    """The working tree's files (tracked, and untracked but not ignored) as a new git repository,
    with config.yaml replaced by config.yaml + tests/configs/tiny.yaml, committed."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    merged = deep_merge(yaml.safe_load((REPO / "config.yaml").read_text()), yaml.safe_load(TINY.read_text()))
    (target / "config.yaml").write_text("# config.yaml + tests/configs/tiny.yaml (tests/test_readme.py)\n"
                                        + yaml.safe_dump(merged, sort_keys=False))
    for path in target.rglob("*"):
        os.utime(path, (OLD, OLD))
    git = ["git", "-c", "user.name=readme test", "-c", "user.email=readme@example.invalid"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "fresh clone"]):
        subprocess.run([*git, *args], cwd=target, check=True, capture_output=True)
    return target


def venv_like_make_setup(clone: Path) -> None:
    """`.venv/` as `make` leaves it (the stamp newer than pyproject.toml), pointing to the
    environment running the tests."""
    venv = clone / ".venv"
    venv.mkdir()
    for entry in Path(sys.prefix).iterdir():
        (venv / entry.name).symlink_to(entry)
    (venv / ".purireid-installed").touch()


@pytest.fixture(scope="module")
def fresh_clone(tiny_dag, tmp_path_factory) -> Path:
    if sys.prefix == sys.base_prefix:
        pytest.skip("the README's .venv/bin commands need the tests to run in a virtual environment")
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.skip("make and git are needed to run the README's commands in a fresh clone")
    clone = fresh_clone_of_the_checkout(tmp_path_factory.mktemp("readme") / "purireid")
    venv_like_make_setup(clone)
    copy_of_tiny_dag(tiny_dag, clone)  # results/, data/, .snakemake/: all ignored by git
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert status == "", f"the fresh clone is not clean before the README's commands:\n{status}"
    return clone


@pytest.mark.slow
def test_readme_commands_run_as_written(fresh_clone):
    venv_bins = {str(Path(sys.prefix) / "bin"), str(Path(sys.executable).parent)}
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p not in venv_bins)
    blocks, output = readme_blocks(), {}
    for name in RUN_ORDER:
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", blocks[name]], cwd=fresh_clone, env=env,
                              capture_output=True, text=True, timeout=900)
        output[name] = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README block '{name}' exited {proc.returncode}:\n{blocks[name]}\n" \
                                     f"{output[name][-6000:]}"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=fresh_clone, capture_output=True, text=True)
    assert status.stdout == "", f"the README's commands left the checkout dirty:\n{status.stdout}"
    # What the blocks promise.
    assert not re.search(r"^rule train_\w+:", output["demo"], flags=re.M), "make demo trained again"
    assert (fresh_clone / "report.html").stat().st_size > 100_000
    results = fresh_clone / "results"
    for name in ("search/gallery.h5", "search/query.h5", "search/ranked/ranked.json", "search/ranked/index.html",
                 "search/reranked/ranked.json", "export/student.onnx", "export/student.pt"):
        assert (results / name).is_file(), name
    assert "mAP" in output["use"] and "this machine can run this config" in output["use"]
    assert planned_jobs(output["config"]) == {"train_student": 1, "evaluate": 1, "pseudo_identities": 1, "summary": 1}, \
        output["config"]
