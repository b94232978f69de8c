"""The ablation and sweeps: variants as config overlays sharing what they do not change,
the recipe parts' rows derived from the recipe registry, their dry runs on the embedded default
and the presets, and a tiny real run whose table rows are the variants' own eval.json."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from purireid.evaluation.ablation import to_csv, to_markdown, variant_row
from purireid.config.recipes import PARTS, RECIPES, expand
from purireid.config.resolve import ConfigError, deep_merge, load_config
from purireid.config.schema import flatten, schema_default
from purireid.config.variants import (
    BASE_RUN, BUILTIN_VARIANTS, Runs, ablation_variants, all_variants, describe_changes, run_configs,
)
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
    # A recipe part's row: the student's own decay changes the student only; a camera part the
    # teacher. The recipe list a run states is provenance, not a reason to train again.
    assert runs.owner("without_student_step_decay", "train_teacher") == BASE_RUN
    assert runs.owner("without_student_step_decay", "train_student") == "without_student_step_decay"
    assert runs.owner("without_camera_centre", "prepare_dataset") == BASE_RUN
    assert runs.owner("without_camera_centre", "train_teacher") == "without_camera_centre"


def test_jobs_of_the_ablation():
    runs = runs_of()
    wanted = [(v.name, f"evaluate_{v.model}") for v in all_variants(runs[BASE_RUN])
              if "~" not in v.name]
    jobs = {stage: len(owners) for stage, owners in runs.jobs_by_stage(wanted).items()}
    # the configured run, baseline, multiview_labels, source and five camera / crop parts train a
    # teacher; the configured run, source and the student's decay a student
    assert jobs == {"prepare_dataset": 1, "prepare_source": 1, "pretrain_source": 1, "train_supervised": 1,
                    "train_teacher": 9, "extract_teacher_features": 2, "train_student": 3,
                    "evaluate_teacher": 8, "evaluate_student": 3, "evaluate_supervised": 1}


def test_variant_overlays_are_the_papers_rows():
    assert describe_changes(BUILTIN_VARIANTS["baseline"].overlay) == "cluster.lambda1=0.0, train.lambda2=0.0"
    assert describe_changes(BUILTIN_VARIANTS["distillation"].overlay) == "nothing"
    runs = runs_of()
    assert runs["baseline"]["cluster"]["lambda1"] == 0.0 and runs["baseline"]["train"]["lambda2"] == 0.0
    assert runs["multiview_labels"]["cluster"]["lambda1"] == runs[BASE_RUN]["cluster"]["lambda1"] > 0


def test_recipe_part_rows_come_from_the_registry():
    """without_each_part: one row per ablatable part of the configured recipe, in recipe order, each
    the configured run with that part's keys back at the schema's defaults (the paper), and the
    recipe list without it; a teacher-side part's row scores the teacher."""
    config = load_config(DEFAULT)
    rows = {v.name: v for v in ablation_variants(config)}
    ablatable = [p for r in config["recipe"] for p in RECIPES[r].parts if PARTS[p].ablate]
    assert [n for n in rows if n.startswith("without_")] == [f"without_{p}" for p in ablatable]
    assert ablatable == ["scaled_crop_border", "student_step_decay", "per_image_input", "camera_centre",
                         "same_camera_offset", "memory_momentum"]
    for part in ablatable:
        row = rows[f"without_{part}"]
        assert flatten({k: v for k, v in row.overlay.items() if k != "recipe"}) == \
            {key: schema_default(key) for key in flatten(PARTS[part].overlay)}, part
        assert expand(row.overlay["recipe"]) == [p for p in expand(config["recipe"]) if p != part], part
        assert row.model == ("student" if part == "student_step_decay" else "teacher"), part
    assert rows["without_camera_centre"].overlay["recipe"] == ["cpu_demo", "per_image_input", "same_camera_offset",
                                                               "memory_momentum"]
    runs = runs_of()
    assert (runs["without_scaled_crop_border"]["train"]["crop_pad"], runs[BASE_RUN]["train"]["crop_pad"]) == (10, 2)
    assert runs["without_student_step_decay"]["student"]["step_size"] is None
    # A whole recipe: its parts together (the paper's camera handling on the CPU demo).
    paper = runs_of({"ablation": {"variants": ["without_camera_robust"]}})["without_camera_robust"]
    assert (paper["model"]["input_norm"], paper["cluster"]["camera_centre"], paper["cluster"]["same_camera_offset"],
            paper["train"]["memory_momentum"], paper["recipe"]) == ("imagenet", False, 0.0, 0.1, ["cpu_demo"])
    # On the paper (a preset) there is nothing to remove; with_<part> adds one.
    preset = load_config(DEFAULT, PRESETS[0], overrides={"ablation": {"variants": ["without_each_part",
                                                                                 "with_camera_centre"]}})
    added = ablation_variants(preset)
    assert [v.name for v in added] == ["with_camera_centre"]
    assert describe_changes(added[0].overlay) == "cluster.camera_centre=True" and added[0].model == "teacher"
    assert added[0].overlay["recipe"] == ["camera_centre"]


def test_a_row_follows_the_configs_own_keys():
    """A key the config sets itself wins over the recipes: removing the part leaves it, as
    resolving the config without the part would; a defined row's recipe list is a row too."""
    config = load_config(DEFAULT, overrides={"cluster": {"same_camera_offset": 0.2}})
    rows = {v.name: v for v in ablation_variants(config)}
    assert describe_changes(rows["without_same_camera_offset"].overlay) == "nothing"
    defined = load_config(DEFAULT, overrides={"ablation": {
        "variants": ["with_camera_proxy", "proxy_k1"],
        "define": {"proxy_k1": {"config": {"recipe": ["cpu_demo", "camera_robust", "camera_proxy"],
                                           "cluster": {"k1": 10}}}}}})
    rows = {v.name: v for v in ablation_variants(defined)}
    assert rows["proxy_k1"].overlay == deep_merge(rows["with_camera_proxy"].overlay, {"cluster": {"k1": 10}})
    assert describe_changes(rows["proxy_k1"].overlay) == "train.camera_proxy=0.5, cluster.k1=10"


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
        ({"ablation": {"variants": ["with_camera_centre"]}},
         "already holds camera_centre: write without_camera_centre"),
        ({"ablation": {"variants": ["without_camera_proxy"]}}, "does not hold camera_proxy: write with_camera_proxy"),
        ({"ablation": {"variants": ["without_cpu_demo"]}}, "cpu_scale, from_scratch, demo_sweeps set the run's sizes"),
        ({"ablation": {"variants": ["with_gpu_scale"]}}, "names 'with_gpu_scale', which is no row"),
        ({"ablation": {"define": {"x": {"config": {"recipe": ["camera_robust"]}}}, "variants": ["x"]}},
         "part cpu_scale, which sets 'data.workers', a key every run of an ablation shares"),
        ({"ablation": {"define": {"x": {"config": {"recipe": ["nonesuch"]}}}, "variants": ["x"]}},
         "config key 'ablation.define.x.config.recipe' names 'nonesuch'"),
        ({"sweeps": {"m": {"key": "train.momentum", "values": [0.5]}}}, "now 'train.memory_momentum'"),
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
    shared = {"prepare_dataset": 1, "prepare_source": 1, "pretrain_source": 1, "train_supervised": 1, "ablation": 1}
    # the embedded default: the paper's rows, six recipe parts (five of them teacher-side), source
    demo = shared | {"train_teacher": 9, "extract_teacher_features": 2, "train_student": 3, "evaluate": 12}
    # a preset is the paper: no recipe part to remove
    paper = shared | {"train_teacher": 4, "extract_teacher_features": 2, "train_student": 2, "evaluate": 6}
    for configfile in (None, *PRESETS):
        args = ["-n", "ablation"] + (["--configfile", str(configfile)] if configfile else [])
        out = snakemake(tmp_path, *args).stdout
        expected = paper if configfile else demo
        assert planned_jobs(out) == expected, (configfile, planned_jobs(out))
        dataset = load_config(DEFAULT, *([configfile] if configfile else []))["dataset"]
        teachers = re.findall(r"rule train_teacher:.*?wildcards: run=(\S+)", out, flags=re.S)
        # The configured teacher once, in the configured run's folder, shared by several rows.
        assert teachers.count(f"results/{dataset}") == 1 and len(set(teachers)) == expected["train_teacher"], teachers


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
