"""The ablation and sweeps (issue 12): variants as config overlays sharing what they do not change,
their dry runs on the embedded default and the presets, and a tiny real run whose table rows
are the variants' own eval.json."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from purireid.evaluation.ablation import to_csv, to_markdown, variant_row
from purireid.config.resolve import ConfigError, deep_merge, load_config
from purireid.config.variants import BASE_RUN, BUILTIN_VARIANTS, Runs, all_variants, describe_changes, run_configs
from conftest import copy_of_tiny_dag
from test_workflow import PRESETS, REPO, TINY, planned_jobs, snakemake, write_yaml

DEFAULT = REPO / "config.yaml"


def runs_of(*overrides: dict) -> Runs:
    config = load_config(DEFAULT)
    for override in overrides:
        config = load_config(DEFAULT, overrides=deep_merge(config, override))
    return Runs(run_configs(config))


# --------------------------------------------------------------------------- what variants share


def test_variants_share_exactly_the_stages_they_do_not_change():
    runs = runs_of()
    # The full method's rows are the configured run's own files.
    for name in ("multiview_loss", "distillation", "supervised"):
        for stage in ("train_teacher", "train_student", "train_supervised", "evaluate_student"):
            assert runs.owner(name, stage) == BASE_RUN, (name, stage)
    # The baseline changes the clustering and the loss: its own teacher, the configured data.
    assert runs.owner("baseline", "prepare_dataset") == BASE_RUN
    assert runs.owner("baseline", "train_teacher") == "baseline"
    # A student-only change (mu) reuses the configured teacher and its features.
    assert runs.owner("mu~0.0", "train_teacher") == BASE_RUN
    assert runs.owner("mu~0.0", "extract_teacher_features") == BASE_RUN
    assert runs.owner("mu~0.0", "train_student") == "mu~0.0"
    # The sweep point equal to the configured value is the configured run.
    assert runs.owner("eps~0.5", "evaluate_student") == BASE_RUN
    # lambda2 = 0 is set by two variants: the first one owns the teacher.
    assert runs.owner("lambda2~0.0", "train_teacher") == "multiview_labels"
    # Source pretraining is the same job whoever asks for it.
    assert runs.owner("source", "pretrain_source") == BASE_RUN
    assert runs.owner("source", "train_teacher") == "source"


def test_jobs_of_the_ablation():
    runs = runs_of()
    wanted = [(v.name, f"evaluate_{v.model}") for v in all_variants(runs[BASE_RUN])
              if "~" not in v.name]
    jobs = {stage: len(owners) for stage, owners in runs.jobs_by_stage(wanted).items()}
    assert jobs == {"prepare_dataset": 1, "prepare_source": 1, "pretrain_source": 1, "train_supervised": 1,
                    "train_teacher": 5, "extract_teacher_features": 3, "train_student": 3,
                    "evaluate_teacher": 3, "evaluate_student": 3, "evaluate_supervised": 1}


def test_variant_overlays_are_the_papers_rows():
    assert describe_changes(BUILTIN_VARIANTS["baseline"].overlay) == "cluster.lambda1=0.0, train.lambda2=0.0"
    assert describe_changes(BUILTIN_VARIANTS["distillation"].overlay) == "nothing"
    runs = runs_of()
    assert runs["baseline"]["cluster"]["lambda1"] == 0.0 and runs["baseline"]["train"]["lambda2"] == 0.0
    assert runs["multiview_labels"]["cluster"]["lambda1"] == runs[BASE_RUN]["cluster"]["lambda1"] > 0
    # config.yaml's recipe has the camera-robust options on; its paper_recipe row turns them off.
    assert runs[BASE_RUN]["cluster"]["camera_centre"] is True
    assert runs[BASE_RUN]["cluster"]["same_camera_offset"] == 0.3
    paper = runs["paper_recipe"]
    assert (paper["model"]["input_norm"], paper["cluster"]["camera_centre"], paper["cluster"]["same_camera_offset"],
            paper["train"]["momentum"]) == ("imagenet", False, 0.0, 0.1)
    assert BUILTIN_VARIANTS["camera_centre"].overlay == {"cluster": {"camera_centre": True}}
    # the crop border is scaled to config.yaml's 64x32 input; paper_crop keeps the paper's 10 px
    crop = runs_of({"ablation": {"variants": ["paper_crop"]}})
    assert runs[BASE_RUN]["train"]["crop_pad"] == 2 and crop["paper_crop"]["train"]["crop_pad"] == 10


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"ablation": {"variants": ["baseline", "nonesuch"]}}, "'nonesuch'"),
        ({"ablation": {"define": {"big": {"config": {"train": {"gpus": 4}}}}, "variants": ["big"]}},
         "'train.gpus'"),
        ({"ablation": {"define": {"x": {"config": {"dataset": "market1501"}}}, "variants": ["x"]}}, "'dataset'"),
        ({"ablation": {"define": {"x": {"config": {"cluster": {"k1": 0}}}}, "variants": ["x"]}},
         "variant 'x' (cluster.k1=0)"),
        ({"sweeps": {"bad": {"key": "cluster.kk", "values": [1]}}}, "'sweeps.bad.key'"),
        ({"sweeps": {"bad": {"key": "device", "values": ["cpu"]}}}, "'sweeps.bad.key'"),
        ({"ablation": {"define": {"default": {"config": {}}}, "variants": ["default"]}}, "'default'"),
    ],
)
def test_bad_variants_are_refused_by_name(override, named):
    config = load_config(DEFAULT)
    with pytest.raises(ConfigError, match=re.escape(named)):
        Runs(run_configs(load_config(DEFAULT, overrides=deep_merge(config, override))))


def test_rows_from_eval_and_logs():
    spec = {"variant": "v", "about": "a | b", "changes": "cluster.k1=10", "model": "student", "eval_json": "e.json"}
    evaluation = {"mAP": 0.5, "mINP": 0.1, "rank1": 0.6, "rank5": 0.7, "rank10": 0.8}
    model_log = [{"epoch": None, "phase": "untrained", "mAP": 0.2},
                 {"epoch": -1, "phase": "warmup", "seconds": 10.0, "clusters": 9, "outliers": 3},
                 {"epoch": 0, "phase": "train", "seconds": 20.0, "clusters": 7, "outliers": 2}]
    teacher_log = [{"epoch": 0, "phase": "train", "seconds": 30.0, "clusters": 5, "outliers": 1}]
    row = variant_row(spec, evaluation, model_log, [teacher_log, model_log])
    assert (row.start_mAP, row.clusters, row.outliers, row.train_seconds) == (0.2, 7, 2, 60.0)
    parsed = next(csv.DictReader(to_csv([row]).splitlines()))
    assert parsed["mAP_pct"] == "50.00" and parsed["train_minutes"] == "1.00" and parsed["about"] == "a | b"
    assert "| v | cluster.k1=10 | student | 50.0 | 10.0 | 60.0 |" in to_markdown([row], title="t", dataset="d",
                                                                               rerank=False)


# --------------------------------------------------------------------------- the workflow


def test_dry_run_ablation_default_and_presets(tmp_path):
    expected = {"prepare_dataset": 1, "prepare_source": 1, "pretrain_source": 1, "train_supervised": 1,
                "train_teacher": 5, "extract_teacher_features": 3, "train_student": 3, "evaluate": 7, "ablation": 1}
    for configfile in (None, *PRESETS):
        args = ["-n", "ablation"] + (["--configfile", str(configfile)] if configfile else [])
        out = snakemake(tmp_path, *args).stdout
        assert planned_jobs(out) == expected, (configfile, planned_jobs(out))
        dataset = load_config(DEFAULT, *([configfile] if configfile else []))["dataset"]
        teachers = re.findall(r"rule train_teacher:.*?wildcards: run=(\S+)", out, flags=re.S)
        # The configured teacher once, in the configured run's folder, shared by three rows.
        assert teachers.count(f"results/{dataset}") == 1 and len(set(teachers)) == 5, teachers


def test_dry_run_sweeps_share_the_teacher(tmp_path):
    out = snakemake(tmp_path, "-n", "sweep_mu").stdout
    # mu changes only the student: one teacher (the configured one) for three students.
    assert planned_jobs(out) == {"prepare_dataset": 1, "train_teacher": 1, "extract_teacher_features": 1,
                                 "train_student": 3, "evaluate": 3, "sweep": 1, "sweep_mu": 1}
    all_sweeps = planned_jobs(snakemake(tmp_path, "-n", "sweeps").stdout)
    assert all_sweeps["sweep"] == 5 and all_sweeps["train_teacher"] == 9 and all_sweeps["train_student"] == 11


def test_a_shared_stage_is_not_run_again_under_a_variant(tmp_path):
    proc = snakemake(tmp_path, "-n", "results/synthetic/variants/distillation/student/model.pth", check=False)
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "under results/synthetic/ (ask for those files" in said and "computes the same train_student as 'default'" in said


@pytest.fixture(scope="module")
def tiny_ablation(tiny_dag, tmp_path_factory):
    """The tiny config's configured run (the session's, copied), then an ablation of three variants over it."""
    workdir = copy_of_tiny_dag(tiny_dag, tmp_path_factory.mktemp("ablation"))
    variants = write_yaml(workdir / "variants.yaml", {
        "ablation": {"variants": ["baseline", "distillation", "no_distillation"],
                     "define": {"no_distillation": {"about": "the student without distillation", "model": "student",
                                                    "config": {"student": {"mu": 0.0}}}}},
        "sweeps": {"mu": {"key": "student.mu", "values": [0.0, 1.0]}},
    })
    args = ["--configfile", str(TINY), str(variants)]
    configured = snakemake(workdir, "--cores", "2", *args)  # the configured run (default target)
    assert "Nothing to be done" in configured.stdout + configured.stderr, "the copied run is up to date"
    dry = snakemake(workdir, "-n", "ablation", *args).stdout
    proc = snakemake(workdir, "--cores", "2", "ablation", *args)
    return workdir, args, dry, proc


def test_ablation_reuses_the_configured_run(tiny_ablation):
    _, _, dry, _ = tiny_ablation
    # Only what the variants change: the baseline's teacher, the mu = 0 student, their evaluations.
    assert planned_jobs(dry) == {"train_teacher": 1, "train_student": 1, "evaluate": 2, "ablation": 1}
    assert re.findall(r"rule train_student:.*?wildcards: run=(\S+)", dry, flags=re.S) == \
        ["results/synthetic/variants/no_distillation"]


def test_ablation_table_rows_are_the_variants_own_eval(tiny_ablation):
    workdir, args, _, proc = tiny_ablation
    base = workdir / "results" / "synthetic"
    rows = list(csv.DictReader((base / "ablation" / "table.csv").read_text().splitlines()))
    assert [r["variant"] for r in rows] == ["baseline", "distillation", "no_distillation"]
    where = {"baseline": base / "variants/baseline/teacher", "distillation": base / "student",
             "no_distillation": base / "variants/no_distillation/student"}
    for row in rows:
        evaluation = json.loads((where[row["variant"]] / "eval.json").read_text())
        assert Path(workdir / row["eval_json"]) == where[row["variant"]] / "eval.json"
        for key in ("mAP", "mINP", "rank1", "rank5", "rank10"):
            assert float(row[f"{key}_pct"]) == pytest.approx(100 * evaluation[key], abs=0.006), (row, key)
        assert row["clusters"].isdigit() and float(row["train_minutes"]) > 0
    assert rows[2]["changes"] == "student.mu=0.0" and rows[1]["changes"] == "nothing"
    table = (base / "ablation" / "table.md").read_text()
    assert "| baseline | cluster.lambda1=0.0, train.lambda2=0.0 | teacher |" in table
    assert (base / "ablation" / "figure.png").stat().st_size > 5000
    # Nothing left to do.
    again = snakemake(workdir, "-n", "ablation", *args).stdout
    assert planned_jobs(again) == {}
    # The sweep over mu trains nothing: 0.0 is no_distillation's student, 1.0 the configured one.
    sweep = snakemake(workdir, "-n", "sweep_mu", *args).stdout
    assert planned_jobs(sweep) == {"sweep": 1, "sweep_mu": 1}


def test_ablation_in_the_report(tiny_ablation, tmp_path):
    workdir, args, _, _ = tiny_ablation
    snakemake(workdir, "ablation", *args, "--report", "ablation_report.html")
    html = (workdir / "ablation_report.html").read_text()
    assert "4. Ablation and sweeps" in html and "figure.png" in html and "table.html" in html
