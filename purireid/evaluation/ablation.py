"""The ablation and sweep tables: one row per variant (its name, what it changes, the model it
scores, mAP / mINP / Rank-1/5/10, clusters and outliers at the last epoch, training minutes),
as CSV, Markdown and an HTML fragment for the report. Pure functions: the ablation and sweep
rules' script (workflow/scripts/tabulate_variants.py) reads eval.json / log.jsonl and writes.

Metrics are fractions in eval.json; the tables show percentages.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from purireid.evaluation.summary import METRICS, format_duration, html_table, percent, protocol_note, training_totals
from purireid.io.runlog import PHASE_TRAIN, PHASE_UNTRAINED, record_phase

CSV_COLUMNS = ("variant", "about", "changes", "model", *(f"{key}_pct" for key, _ in METRICS), "start_mAP_pct",
               "clusters", "outliers", "train_minutes", "eval_json")


@dataclass(frozen=True)
class VariantRow:
    """One variant's line. Metrics are fractions; `start_mAP` is its model's mAP before training
    (None for a log without that evaluation); `clusters` / `outliers` are those of its model's
    last epoch (the true identities and 0 for the supervised reference); `train_seconds` sums
    every training stage its model depends on (source pretraining, teacher, student)."""

    variant: str
    about: str
    changes: str
    model: str
    metrics: Mapping[str, float | None]
    start_mAP: float | None
    clusters: int | None
    outliers: int | None
    train_seconds: float | None
    eval_json: str


def variant_row(spec: Mapping[str, Any], evaluation: Mapping[str, Any], model_log: Sequence[Mapping[str, Any]],
                training_logs: Sequence[Sequence[Mapping[str, Any]]]) -> VariantRow:
    """A row from the variant's description (`spec`: variant, about, changes, model, eval_json),
    its model's eval.json and log.jsonl records, and the logs of every training stage behind it."""
    start = next((r.get("mAP") for r in model_log if record_phase(r) == PHASE_UNTRAINED), None)
    last = next((r for r in reversed(model_log) if record_phase(r) == PHASE_TRAIN), {})
    seconds = [s for s in (training_totals(records)[2] for records in training_logs) if s is not None]
    return VariantRow(
        variant=spec["variant"], about=spec["about"], changes=spec["changes"], model=spec["model"],
        metrics={key: evaluation.get(key) for key, _ in METRICS}, start_mAP=start,
        clusters=last.get("clusters"), outliers=last.get("outliers"),
        train_seconds=sum(seconds) if seconds else None, eval_json=spec["eval_json"])


def _count(value: int | None) -> str:
    return "—" if value is None else str(value)


HEADERS = ("variant", "changes", "model", *(f"{name} (%)" for _, name in METRICS), "clusters", "outliers",
           "training")


def _cells(row: VariantRow) -> list[str]:
    return [row.variant, row.changes, row.model, *(percent(row.metrics.get(key)) for key, _ in METRICS),
            _count(row.clusters), _count(row.outliers), format_duration(row.train_seconds)]


def notes(*, dataset: str, rerank: bool) -> list[str]:
    """What the columns mean, under the table."""
    return [
        protocol_note(dataset=dataset, rerank=rerank),
        "changes: the config keys the variant sets over the configured run ('nothing': the configured run "
        "itself). model: the model whose evaluation is the row (teacher, student or the supervised reference, "
        "which uses the true labels). clusters / outliers: pseudo-label clusters and unclustered images at its "
        "last epoch (the supervised reference: its true identities, none left out). training: labelling and optimisation time of every training stage behind the model "
        "(source pretraining, teacher, student), shared stages included.",
    ]


def to_csv(rows: Sequence[VariantRow]) -> str:
    """Machine-readable: percentages with 2 decimals, empty where not measured, minutes."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([
            row.variant, row.about, row.changes, row.model,
            *(percent(row.metrics.get(key), 2).replace("—", "") for key, _ in METRICS),
            percent(row.start_mAP, 2).replace("—", ""),
            "" if row.clusters is None else row.clusters, "" if row.outliers is None else row.outliers,
            "" if row.train_seconds is None else f"{row.train_seconds / 60:.2f}", row.eval_json])
    return buffer.getvalue()


def to_markdown(rows: Sequence[VariantRow], *, title: str, dataset: str, rerank: bool) -> str:
    """The table as Markdown, with a legend of what each variant is."""
    lines = [f"## {title}", "", "| " + " | ".join(HEADERS) + " |", "|:--|:--|:--|" + "--:|" * (len(HEADERS) - 3)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |" for row in rows]
    legend = [f"- **{row.variant}**: {row.about}" for row in rows if row.about]
    return "\n".join(lines + [""] + legend) + "\n\n" + "\n\n".join(notes(dataset=dataset, rerank=rerank)) + "\n"


def to_html(rows: Sequence[VariantRow], *, title: str, dataset: str, rerank: bool) -> str:
    """An HTML fragment for the report's ablation category."""
    headers = ("variant", "changes", "model", *(name for _, name in METRICS), "clusters", "outliers", "training")
    legend = [f"{row.variant}: {row.about}" for row in rows if row.about]
    return html_table(title, "(mAP, mINP, Rank-k in %)", headers, [_cells(row) for row in rows],
                      legend + notes(dataset=dataset, rerank=rerank), css_class="purireid-ablation", left_columns=3)
