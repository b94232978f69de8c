"""The results table (purireid.evaluation.summary): one row per model from eval.json and log.jsonl, the
untrained starting point first, percentages, and the meaning of a log record's phase
(purireid.io.runlog)."""

from __future__ import annotations

import pytest

from purireid.evaluation.summary import (
    TSV_COLUMNS,
    computed_on,
    format_duration,
    summary_rows,
    to_html,
    to_markdown,
    to_tsv,
)
from purireid.io.runlog import record_phase


def evaluation(mAP, mINP=0.1, rank1=0.5, rank5=0.7, rank10=0.8, queries=90):
    return {"mAP": mAP, "mINP": mINP, "rank1": rank1, "rank5": rank5, "rank10": rank10, "num_valid_queries": queries,
            "rerank": False}


def untrained(**metrics):
    return {"epoch": None, "phase": "untrained", "seconds": 9.0,
            **{"mAP": 0.353, "mINP": 0.05, "rank1": 0.548, "rank5": 0.7, "rank10": 0.8, **metrics}}


def epoch(e, seconds=30.0):
    return {"epoch": e, "phase": "warmup" if e < 0 else "train", "seconds": seconds, "loss": 1.0}


@pytest.fixture
def run():
    evaluations = {"teacher": evaluation(0.574, rank1=0.658), "student": evaluation(0.631, rank1=0.699)}
    logs = {"teacher": [untrained(), *(epoch(e) for e in range(8))],
            "student": [untrained(mAP=0.2), epoch(-1, 60.0), *(epoch(e) for e in range(8))]}
    return summary_rows(["teacher", "student"], evaluations, logs)


def test_rows_untrained_teacher_student(run):
    assert [r.model for r in run] == ["untrained", "teacher", "student"]
    first, teacher, student = run
    assert first.metrics["mAP"] == 0.353  # the teacher's starting point, not the student's
    assert first.queries == 90 and first.epochs == 0 and first.train_seconds is None
    assert teacher.metrics["rank1"] == 0.658 and teacher.epochs == 8 and teacher.warmup_epochs == 0
    assert teacher.train_seconds == pytest.approx(8 * 30.0)  # the untrained evaluation's 9 s not counted
    assert (student.epochs, student.warmup_epochs) == (8, 1)
    assert student.train_seconds == pytest.approx(60.0 + 8 * 30.0)


def test_markdown_and_html_show_percentages(run):
    md = to_markdown(run, dataset="synthetic", rerank=False)
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    assert header.split(" | ")[1:6] == ["mAP (%)", "mINP (%)", "Rank-1 (%)", "Rank-5 (%)", "Rank-10 (%)"]
    row = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert "| 57.4 |" in row["teacher"] and "| 65.8 |" in row["teacher"]
    assert "| 63.1 |" in row["student"] and "| 1 + 8 |" in row["student"] and "5 min 00 s" in row["student"]
    assert "| 35.3 |" in row["untrained"] and "| — |" in row["untrained"]
    assert "re-ranking off" in md and "fractions" in md
    html = to_html(run, dataset="synthetic", rerank=False)
    assert html.count("<tr>") == 4 and "<th" in html and "57.4" in html and ">Rank-1<" in html and "in %" in html


def test_notes_say_what_was_in_effect(run):
    """The config's train.amp asks for bf16 autocast everywhere; the table says what the
    evaluations ran with (eval.json's device and precision)."""
    cpu = {"device": "cpu", "precision": "float32"}
    note = computed_on({"teacher": {**evaluation(0.5), **cpu}, "student": {**evaluation(0.6), **cpu}})
    assert note == "Evaluated on the CPU in float32 (train.amp's bf16 autocast applies on CUDA only)."
    assert note in to_markdown(run, dataset="synthetic", rerank=False, computed=note)
    assert "float32" in to_html(run, dataset="synthetic", rerank=False, computed=note)
    mixed = computed_on({"teacher": {"device": "cuda", "precision": "bf16 autocast"}, "student": cpu})
    assert mixed.startswith("Evaluated on teacher: cuda in bf16 autocast, student: cpu in float32"), mixed
    assert computed_on({"teacher": {"device": "cuda", "precision": "bf16 autocast"}}) == \
        "Evaluated on CUDA in bf16 autocast."
    assert computed_on({"teacher": evaluation(0.5)}) is None  # an eval.json from before the fields


def test_tsv_is_machine_readable(run):
    lines = to_tsv(run).splitlines()
    assert lines[0].split("\t") == list(TSV_COLUMNS)
    rows = [dict(zip(TSV_COLUMNS, line.split("\t"))) for line in lines[1:]]
    assert [r["model"] for r in rows] == ["untrained", "teacher", "student"]
    assert float(rows[1]["mAP_pct"]) == pytest.approx(57.4)
    assert rows[0]["train_seconds"] == "" and float(rows[2]["train_seconds"]) == pytest.approx(300.0)


def test_missing_metrics_show_as_unknown():
    """A log written before mINP / Rank-5 were logged (epoch 'untrained' as a string then)."""
    old = [{"epoch": "untrained", "mAP": 0.3, "rank1": 0.5, "seconds": 2.0}, {"epoch": 0, "seconds": 5.0}]
    rows = summary_rows(["teacher"], {"teacher": evaluation(0.4)}, {"teacher": old})
    assert rows[0].model == "untrained" and rows[0].metrics["mINP"] is None
    assert "| — |" in to_markdown(rows, dataset="x", rerank=True)
    assert rows[1].epochs == 1


def test_no_untrained_row_without_a_teacher():
    rows = summary_rows(["student"], {"student": evaluation(0.5)}, {"student": [untrained(), epoch(0)]})
    assert [r.model for r in rows] == ["student"]


@pytest.mark.parametrize(("record", "phase"), [
    ({"epoch": None, "phase": "untrained"}, "untrained"),
    ({"epoch": "untrained"}, "untrained"),  # logs before the phase field
    ({"epoch": -1}, "warmup"),
    ({"epoch": 0}, "train"),
    ({"epoch": 3, "phase": "train"}, "train"),
])
def test_record_phase(record, phase):
    assert record_phase(record) == phase


def test_format_duration():
    assert [format_duration(s) for s in (None, 4.4, 65, 3600 + 125)] == ["—", "4 s", "1 min 05 s", "1 h 02 min"]
