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
from conftest import copy_of_tiny_dag

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
PRESETS = sorted((REPO / "config" / "presets").glob("*.yaml"))
RULES = ("prepare_dataset", "train_teacher", "extract_teacher_features", "train_student", "evaluate", "pseudo_identities",
         "summary")


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
    return set(re.findall(r"rule evaluate:.*?wildcards: [^\n]*?model=(\w+)", output, flags=re.S))


def expected_outputs(dataset: str = "synthetic") -> list[str]:
    base = f"results/{dataset}"
    files = [f"{base}/data/manifest.csv", f"{base}/data/summary.json", f"{base}/teacher/train_features.h5"]
    for model in ("teacher", "student"):
        files += [f"{base}/{model}/{name}" for name in
                  ("model.pth", "log.jsonl", "curve.png", "eval.json", "cmc.png", "ranked.png",
                   "pseudo_identities.csv", "pseudo_identities.png")]
    return files + [f"{base}/summary.{ext}" for ext in ("tsv", "md", "html")]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- dry runs, lint, config


def test_dry_run_default(tmp_path):
    out = snakemake(tmp_path, "-n").stdout
    assert planned_jobs(out) == {
        "prepare_dataset": 1, "train_teacher": 1, "extract_teacher_features": 1, "train_student": 1, "evaluate": 2,
        "pseudo_identities": 2, "summary": 1,
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
    """A preset merged over config.yaml, as the commands above run it, is the paper (docs/method.md, Hyperparameters) on its
    dataset: its `recipe: []` drops config.yaml's CPU sizes and camera options."""
    from purireid.config.resolve import load_config

    for name, eps, iters in (("market1501", 0.6, 200), ("msmt17", 0.7, 400)):
        preset = yaml.safe_load((REPO / f"config/presets/{name}.yaml").read_text())
        assert preset["recipe"] == [] and preset["dataset"] == name
        config = load_config(REPO / "config.yaml", REPO / f"config/presets/{name}.yaml")
        assert config["cluster"]["eps"] == eps and config["train"]["iters"] == iters
        assert config["model"] == {"arch": "resnet50", "pretrained": "imagenet", "bn_groups": 4,
                                   "input_norm": "imagenet"}
        assert config["train"]["epochs"] == 50 and config["train"]["batch_size"] == 256
        assert config["train"]["num_instances"] == 16
        assert (config["data"]["height"], config["data"]["width"]) == (256, 128)
        # Not the CPU default's: ImageNet for a source model, the paper's parameters swept around its values.
        assert config["source"]["pretrained"] == "imagenet"
        sweeps = config["sweeps"]
        assert {s["key"] for s in sweeps.values()} == {"cluster.lambda1", "train.lambda2", "student.mu", "cluster.eps",
                                                       "cluster.k1"}
        assert eps in sweeps["eps"]["values"] and 0.15 in sweeps["lambda1"]["values"] and 30 in sweeps["k1"]["values"]


def test_lint_only_justified_findings(tmp_path):
    """`snakemake --lint`: the only finding is 'no conda/container per rule', justified in the README."""
    proc = snakemake(tmp_path, "--lint", check=False)
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    assert "Lints for snakefile" not in text, text
    titles = set(re.findall(r"^\s+\* (.+?):$", text, flags=re.M))
    assert titles <= {"Specify a conda environment or container for each rule."}, titles
    linted_rules = set(re.findall(r"^Lints for rule (\w+)", text, flags=re.M))
    # Rules off by default (opt-in outputs, the ablation and sweep tables).
    opt_in = {"export_student", "train_supervised", "prepare_source", "pretrain_source", "ablation", "sweep"}
    assert linted_rules <= set(RULES) | opt_in, linted_rules
    readme = (REPO / "README.md").read_text()
    assert "conda environment or container" in readme


def rulegraph_edges(text: str, *, svg: bool) -> set[tuple[str, str]]:
    """(from rule, to rule) pairs of `snakemake --rulegraph` output or of its Graphviz SVG."""
    import html

    text = html.unescape(text)
    if svg:
        labels = dict(re.findall(r'class="node">\s*<title>(\d+)</title>.*?<text[^>]*>([^<]+)</text>', text, flags=re.S))
        pairs = re.findall(r'class="edge">\s*<title>(\d+)->(\d+)</title>', text)
    else:
        labels = dict(re.findall(r'^\s*(\d+)\[label = "([^"]+)"', text, flags=re.M))
        pairs = re.findall(r"^\s*(\d+) -> (\d+)", text, flags=re.M)
    return {(labels[a], labels[b]) for a, b in pairs}


def test_docs_rulegraph_is_current(tmp_path):
    """docs/rulegraph.svg (shown on the report's first screen) is the default DAG's rule graph:
    after changing the rules, `make rulegraph` redraws it."""
    current = rulegraph_edges(snakemake(tmp_path, "--rulegraph").stdout, svg=False)
    drawn = rulegraph_edges((REPO / "docs" / "rulegraph.svg").read_text(), svg=True)
    assert ("evaluate", "summary") in current
    assert drawn == current, f"docs/rulegraph.svg is out of date (make rulegraph): {drawn ^ current}"


def test_list_rules_describes_every_rule(tmp_path):
    out = snakemake(tmp_path, "--list-rules").stdout
    described = dict(re.findall(r"^(\w+) \((.+?)\)?$", out, flags=re.M))
    for rule in (*RULES, "all"):
        assert len(described.get(rule, "")) > 20, (rule, out)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"student": {"mu": "high"}}, "student.mu"),
        ({"cluster": {"epss": 0.5}}, "cluster.epss"),  # with the nearest key, cluster.eps
        ({"dataset": "market"}, "dataset"),
        ({"train": {"batch_size": 30, "num_instances": 4}}, "train.batch_size"),
        ({"cluster": {"eps": 1.5}}, "cluster.eps"),  # refused before any job, not by the teacher job as 'eps'
        ({"train": {"epochs": 2.0}}, "train.epochs"),  # refused, not a crash in range()
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
    assert resolved["prepare"]["check_counts"] is True  # the schema's default
    assert "train" not in resolved  # the prepare job is given its own keys only (its rule's params)
    summary = json.loads((tmp_path / "results/synthetic/data/summary.json").read_text())
    assert summary


# --------------------------------------------------------------------------- real runs (slow)


@pytest.fixture(scope="module")
def tiny_run(tiny_dag, tmp_path_factory):
    """The whole DAG of the tiny config (run once per session), copied for this module's slow tests."""
    _, proc, seconds = tiny_dag
    return copy_of_tiny_dag(tiny_dag, tmp_path_factory.mktemp("tiny_run")), proc, seconds


@pytest.mark.slow
def test_end_to_end_outputs(tiny_run):
    workdir, proc, seconds = tiny_run
    print(f"tiny DAG: {seconds:.0f} s")
    for path in expected_outputs():
        assert (workdir / path).is_file(), path
        assert (workdir / path).stat().st_size > 0, path
    base = workdir / "results/synthetic"
    per_model = [f"{rule}_{model}" for rule in ("evaluate", "pseudo_identities") for model in ("teacher", "student")]
    for name in [r for r in RULES if r not in ("evaluate", "pseudo_identities")] + per_model:
        assert (base / "logs" / f"{name}.log").is_file(), name
    for name in ("train_teacher", "extract_teacher_features", "train_student", "evaluate_teacher", "evaluate_student"):
        assert (base / "benchmarks" / f"{name}.tsv").is_file(), name
    for folder in ("data", "teacher", "student"):
        assert (base / folder / "config.yaml").is_file(), f"resolved config beside the {folder} outputs"
    for model in ("teacher", "student"):
        metrics = json.loads((base / model / "eval.json").read_text())
        for key in ("mAP", "mINP", "rank1", "rank5", "rank10", "cmc", "units"):
            assert key in metrics, (model, key)
        assert (metrics["dataset"], metrics["model"], metrics["role"]) == ("synthetic", model, model)
        assert 0.0 <= metrics["mINP"] <= metrics["mAP"] <= 1.0 and "fractions" in metrics["units"]
        records = [json.loads(line) for line in (base / model / "log.jsonl").read_text().splitlines()]
        # epoch: an integer, or null for the untrained evaluation; phase says which
        assert all(r["epoch"] is None or type(r["epoch"]) is int for r in records), records
        assert [r["phase"] for r in records] == ["untrained", *(["warmup"] if model == "student" else []),
                                                 "train", "train"]
    # The closing table: written, and printed at the end of the run with the models' metrics.
    table = (base / "summary.md").read_text()
    teacher = json.loads((base / "teacher" / "eval.json").read_text())
    assert f"| teacher | {100 * teacher['mAP']:.1f} | {100 * teacher['mINP']:.1f} | {100 * teacher['rank1']:.1f} |" \
        in table, table
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")][1:] == \
        ["| untrained", "| teacher", "| student"]
    assert table.strip() in proc.stderr and proc.stderr.rindex(table.strip()) > proc.stderr.rindex("Finished"), \
        proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count(table.strip()) == 1, "the closing table is printed once"
    assert "Evaluated on the CPU in float32" in table  # what was in effect, whatever train.amp says
    # Saved console output and job logs stay readable: no progress bars' carriage returns.
    assert "\r" not in proc.stdout + proc.stderr
    for log in (base / "logs").glob("*.log"):
        assert "\r" not in log.read_text(), log
    assert "Shell command: None" not in proc.stdout + proc.stderr  # no printshellcmds for script rules
    summary = json.loads((base / "data" / "summary.json").read_text())
    assert summary["counts_checked"] is False and "no published image counts" in summary["counts_note"]


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
    assert planned_jobs(out) == {"train_student": 1, "evaluate": 1, "pseudo_identities": 1, "summary": 1}
    assert planned_evaluations(out) == {"student"}
    assert "params changed" in out.lower() or "params have changed" in out.lower(), out
    # a teacher parameter reruns everything downstream of the teacher
    eps = write_yaml(tmp_path / "eps.yaml", {"cluster": {"eps": 0.55}})
    out = snakemake(workdir, "-n", "--configfile", str(TINY), str(eps)).stdout
    assert planned_jobs(out) == {"train_teacher": 1, "extract_teacher_features": 1, "train_student": 1, "evaluate": 2,
                                 "pseudo_identities": 2, "summary": 1}


@pytest.mark.slow
def test_params_are_what_jobs_read(tiny_run, tmp_path):
    """evaluate.rerank picks the weights (train.keep_best) and the logged mAP: it reruns training;
    evaluate.num_ranked_queries changes the evaluations only; an execution-only key nothing."""
    workdir, _, _ = tiny_run
    rerank = write_yaml(tmp_path / "rerank.yaml", {"evaluate": {"rerank": True}})
    out = snakemake(workdir, "-n", "--configfile", str(TINY), str(rerank)).stdout
    assert planned_jobs(out) == {"train_teacher": 1, "extract_teacher_features": 1, "train_student": 1, "evaluate": 2,
                                 "pseudo_identities": 2, "summary": 1}
    pictures = write_yaml(tmp_path / "pictures.yaml", {"evaluate": {"num_ranked_queries": 3}})
    out = snakemake(workdir, "-n", "--configfile", str(TINY), str(pictures)).stdout
    assert planned_jobs(out) == {"evaluate": 2, "summary": 1}
    workers = write_yaml(tmp_path / "workers.yaml", {"data": {"workers": 1, "test_batch_size": 7}})
    out = snakemake(workdir, "-n", "--configfile", str(TINY), str(workers))
    assert "Nothing to be done" in out.stdout + out.stderr


@pytest.mark.slow
def test_two_runs_write_identical_bytes(tiny_run, tmp_path):
    """The same config run in a second fresh directory writes byte-identical outputs."""
    workdir, _, _ = tiny_run
    base = "results/synthetic"
    targets = [f"{base}/teacher/eval.json", f"{base}/teacher/train_features.h5"]
    snakemake(tmp_path, *targets, "--cores", "2", "--configfile", str(TINY))
    for name in ("data/manifest.csv", "teacher/model.pth", "teacher/train_features.h5", "teacher/eval.json"):
        first, second = workdir / base / name, tmp_path / base / name
        assert first.read_bytes() == second.read_bytes(), name


@pytest.mark.slow
def test_forced_student_rerun(tiny_run):
    """`-R train_student` reruns exactly the student, its evaluation and its pseudo-identities."""
    workdir, _, _ = tiny_run
    base = workdir / "results/synthetic"
    before = {p: (workdir / p).stat().st_mtime_ns for p in expected_outputs()}
    dry = snakemake(workdir, "-n", "-R", "train_student", "--configfile", str(TINY)).stdout
    assert planned_jobs(dry) == {"train_student": 1, "evaluate": 1, "pseudo_identities": 1, "summary": 1}
    assert planned_evaluations(dry) == {"student"}
    proc = snakemake(workdir, "--cores", "2", "-R", "train_student", "--configfile", str(TINY))
    assert planned_jobs(proc.stdout + proc.stderr) == {"train_student": 1, "evaluate": 1, "pseudo_identities": 1,
                                                       "summary": 1}
    changed = {p for p in before if (workdir / p).stat().st_mtime_ns != before[p]}
    assert changed == {p for p in expected_outputs() if "/student/" in p or "/synthetic/summary." in p}, changed
    assert not (base / "student" / "state" / "state.pth").exists()
    again = snakemake(workdir, "--cores", "2", "--configfile", str(TINY))
    assert "Nothing to be done" in again.stdout + again.stderr


def report_data(html: str) -> dict:
    """The data a Snakemake report's page is built from (JSON in its <script> blocks)."""
    data = {}
    for name, script in (("workflow_desc", "workflow-desc"), ("results", "results"), ("categories", "categories")):
        match = re.search(rf'<script id="{script}">\s*var {name} = (.*?);\n\s*</script>', html, flags=re.S)
        assert match, name
        data[name] = json.loads(match.group(1))
    return data


@pytest.fixture(scope="module")
def tiny_report(tiny_run):
    workdir, _, _ = tiny_run
    snakemake(workdir, "--configfile", str(TINY), "--report", "report.html")
    return workdir / "report.html"


@pytest.mark.slow
def test_report(tiny_run, tiny_report):
    workdir, _, _ = tiny_run
    data = report_data(tiny_report.read_text(errors="replace"))
    # First screen (the workflow description): the summary table with both models' metrics.
    desc = data["workflow_desc"]
    teacher = json.loads((workdir / "results/synthetic/teacher/eval.json").read_text())
    student = json.loads((workdir / "results/synthetic/student/eval.json").read_text())
    assert "purireid-summary" in desc and ">mAP<" in desc and ">Rank-1<" in desc and "in %" in desc
    for metrics in (teacher, student):
        assert f">{100 * metrics['mAP']:.1f}<" in desc and f">{100 * metrics['rank1']:.1f}<" in desc
    assert "<svg" in desc and ">summary</text>" in desc  # the Graphviz rule graph, inline (self-contained)
    # Categories in reading order; teacher before student.
    assert sorted(data["categories"]) == ["1. Summary", "2. Training", "3. Evaluation"]
    assert sorted(data["categories"]["3. Evaluation"]) == ["1. teacher", "2. student"]
    assert sorted(data["categories"]["2. Training"]) == ["1. teacher", "2. student"]
    # Captions name the model (the training rules have no {model} wildcard).
    captions = {path.split("/")[-2] + "/" + path.split("/")[-1]: r["caption"] for path, r in data["results"].items()}
    for model in ("teacher", "student"):
        for name in ("curve.png", "cmc.png", "ranked.png", "eval.json", "pseudo_identities.png"):
            assert f"<strong>{model}</strong>" in captions[f"{model}/{name}"], (model, name)
    assert not any("the  model" in c for c in captions.values())
    assert "purireid-summary" in captions["synthetic/summary.html"]
    # Every file by its path in the run's folder (the breadcrumb shows it), none by the machine's.
    assert "results/synthetic/rulegraph.svg" in data["results"]
    assert not [path for path in data["results"] if path.startswith("/") or ".." in path]


@pytest.mark.slow
def test_report_with_directory_elsewhere(tiny_run):
    """One checkout, several experiment folders: `snakemake --directory <folder> --report ...` run
    from the checkout finds the workflow profile's stylesheet (Snakemake 9.27 resolved it against
    the experiment folder: "Unable to read custom report stylesheet")."""
    workdir, _, _ = tiny_run
    report = workdir / "report-from-the-checkout.html"
    proc = subprocess.run([snakemake_exe(), "--directory", str(workdir), "--configfile", str(TINY),
                           "--report", str(report)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text(errors="replace")
    assert ".h-screen.items-center.justify-center" in text and "align-items: flex-start" in text  # report.css


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def chromium_probe(report: Path, steps_js: str, size: tuple[int, int]) -> list:
    """Open `report` in headless Chromium at window `size`; once it has rendered, call the steps
    (`steps_js`: JS code returning an array of functions) 0.5 s apart and return their values."""
    import html as html_lib

    probe = report.with_name(f"probe-{size[0]}x{size[1]}.html")
    hook = ("<script>(function () { var steps = (function () {" + steps_js + "})(); var out = [];"
            " function next(i) { if (i === steps.length) {"
            " document.body.setAttribute('data-probe', JSON.stringify(out)); return; }"
            " out.push(steps[i]()); setTimeout(function () { next(i + 1); }, 500); }"
            " setTimeout(function () { next(0); }, 1000); })();</script>")
    head, _, tail = report.read_text(errors="replace").rpartition("</body>")
    probe.write_text(head + hook + "</body>" + tail)
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=30000", "--dump-dom",
                           probe.as_uri()], capture_output=True, text=True, timeout=180)
    match = re.search(r'data-probe="([^"]*)"', proc.stdout)
    assert match, proc.stderr[-3000:]
    return json.loads(html_lib.unescape(match.group(1)))


# JS run in the report: the summary table's box on the first screen, then every PNG result shown
# as a click on it shows it, and its box.
SUMMARY_THEN_EVERY_PICTURE = """
    function box(element) {
        var r = element.getBoundingClientRect();
        return {top: r.top, bottom: r.bottom, left: r.left, right: r.right,
                viewport: [window.innerWidth, window.innerHeight]};
    }
    var steps = [function () {
        var table = document.querySelector('.purireid-summary table');
        return Object.assign(box(table), {text: table.innerText});
    }];
    Object.keys(results).filter(function (k) { return k.endsWith('.png'); }).forEach(function (k) {
        steps.push(function () {
            app.setView({content: 'img', contentPath: results[k].data_uri, resultPath: k});
            return null;
        });
        steps.push(function () {
            return Object.assign(box(document.querySelector('#app img[src^="data:image/png"]')), {path: k});
        });
    });
    return steps;
"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to render the report (Debian: apt-get install chromium)")
@pytest.mark.parametrize("size", [(1366, 768), (1400, 1000)])
def test_report_in_a_browser(tiny_report, size):
    """The report as a newcomer opens it: the metrics table on the first screen; every figure
    whole on the screen when shown (not cut off above the top or left edge)."""
    first, *rest = chromium_probe(tiny_report, SUMMARY_THEN_EVERY_PICTURE, size)
    width, height = first["viewport"]
    assert 0 <= first["top"] and first["bottom"] <= min(height, 650), first  # above a laptop's fold
    assert 0 <= first["left"] and first["right"] <= width, first
    for model in ("untrained", "teacher", "student"):
        assert model in first["text"], first["text"]
    pictures = [p for p in rest if p is not None]
    assert {p["path"].rsplit("/", 2)[-2] + "/" + p["path"].rsplit("/", 1)[-1] for p in pictures} >= {
        f"{m}/{n}" for m in ("teacher", "student") for n in ("curve.png", "cmc.png", "ranked.png")}
    for p in pictures:
        assert p["top"] >= 0 and p["left"] >= 0, p
        assert p["bottom"] <= height and p["right"] <= width, p


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
