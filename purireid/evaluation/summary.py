"""The results of a run in one table: one row per model (the untrained starting point, the
teacher, the student, and whatever else was evaluated), from each model's eval.json and
log.jsonl, as TSV, Markdown and an HTML fragment (the report's first screen). Pure functions:
the summary rule's script (workflow/scripts/summarise.py) reads and writes the files.

Metrics are fractions in eval.json and log.jsonl; the table shows percentages.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from purireid.io.runlog import PHASE_TRAIN, PHASE_UNTRAINED, PHASE_WARMUP, record_phase

UNTRAINED = "untrained"
METRICS = (("mAP", "mAP"), ("mINP", "mINP"), ("rank1", "Rank-1"), ("rank5", "Rank-5"), ("rank10", "Rank-10"))
TSV_COLUMNS = ("model", *(f"{key}_pct" for key, _ in METRICS), "queries", "epochs", "warmup_epochs", "train_seconds")


@dataclass(frozen=True)
class SummaryRow:
    """One model's line. Metrics are fractions (None: not measured); `train_seconds` sums the
    labelling and optimisation time of its epochs (test evaluations excluded)."""

    model: str
    metrics: Mapping[str, float | None]
    queries: int | None
    epochs: int
    warmup_epochs: int
    train_seconds: float | None


def training_totals(records: Sequence[Mapping[str, Any]]) -> tuple[int, int, float | None]:
    """(training epochs, warm-up epochs, seconds of labelling and optimisation) of a training log."""
    phases = [record_phase(r) for r in records]
    epochs, warmup = phases.count(PHASE_TRAIN), phases.count(PHASE_WARMUP)
    seconds = [float(r["seconds"]) for r, p in zip(records, phases) if p != PHASE_UNTRAINED and r.get("seconds")]
    return epochs, warmup, (sum(seconds) if seconds else None)


def untrained_row(records: Sequence[Mapping[str, Any]], queries: int | None) -> SummaryRow | None:
    """The evaluation before the first epoch in a training log (None if it has none)."""
    for record in records:
        if record_phase(record) == PHASE_UNTRAINED and record.get("mAP") is not None:
            metrics = {key: record.get(key) for key, _ in METRICS}
            return SummaryRow(UNTRAINED, metrics, queries, 0, 0, None)
    return None


def model_row(model: str, evaluation: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> SummaryRow:
    """A trained model: its eval.json metrics and its training log's epochs and time."""
    epochs, warmup, seconds = training_totals(records)
    metrics = {key: evaluation.get(key) for key, _ in METRICS}
    return SummaryRow(model, metrics, evaluation.get("num_valid_queries"), epochs, warmup, seconds)


def summary_rows(models: Sequence[str], evaluations: Mapping[str, Mapping[str, Any]],
                 logs: Mapping[str, Sequence[Mapping[str, Any]]], *, untrained_from: str = "teacher") -> list[SummaryRow]:
    """Rows in `models` order, led by the untrained starting point of `untrained_from` (the
    teacher's: the evaluation its training log records before the first epoch)."""
    rows = []
    if untrained_from in models:
        first = untrained_row(logs.get(untrained_from, []),
                              evaluations.get(untrained_from, {}).get("num_valid_queries"))
        if first is not None:
            rows.append(first)
    # A model without an evaluation (no labelled split): its training, no metric.
    return rows + [model_row(m, evaluations.get(m, {}), logs.get(m, [])) for m in models]


# --------------------------------------------------------------------------- formatting


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def percent(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage, or an em dash when not measured."""
    return "—" if value is None else f"{100 * value:.{digits}f}"


def _epochs(row: SummaryRow) -> str:
    return f"{row.warmup_epochs} + {row.epochs}" if row.warmup_epochs else str(row.epochs)


def _cells(row: SummaryRow) -> list[str]:
    return [row.model, *(percent(row.metrics.get(key)) for key, _ in METRICS),
            "—" if row.queries is None else str(row.queries), _epochs(row), format_duration(row.train_seconds)]


HEADERS = ("model", *(f"{name} (%)" for _, name in METRICS), "queries", "epochs", "training time")


def protocol_note(*, dataset: str, rerank: bool) -> str:
    """The first note under a results table: what was measured, and how."""
    return (f"Query/gallery retrieval on {dataset}, Market-1501 protocol (single query, re-ranking "
            f"{'on' if rerank else 'off'}); percentages (eval.json and log.jsonl hold fractions).")


def computed_on(evaluations: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Where and in which precision the evaluations ran (eval.json's "device" and "precision"),
    as a note: the configured train.amp asks for bf16 autocast, which takes effect on CUDA only,
    so the config alone does not say. None when the files do not record it."""
    done = {model: (e["device"], e["precision"]) for model, e in evaluations.items() if e.get("device")}
    if not done:
        return None
    settings = sorted(set(done.values()))
    if len(settings) == 1:
        device, precision = settings[0]
        where = f"on {'the CPU' if device == 'cpu' else device.upper()} in {precision}"
    else:
        where = "on " + ", ".join(f"{model}: {device} in {precision}" for model, (device, precision) in done.items())
    unused = " (train.amp's bf16 autocast applies on CUDA only)" if any(d == "cpu" for d, _ in settings) else ""
    return f"Evaluated {where}{unused}."


def no_labelled_split_note(dataset: str) -> str:
    """The first note under the table of a dataset without a labelled query/gallery split."""
    return (f"{dataset} has no labelled split (no query/ and gallery/ with identities), so no retrieval "
            f"metric is computed: — in every metric column, none invented. The result is each model and its "
            f"pseudo-identities (<model>/pseudo_identities.csv, and the picture beside it).")


def notes(*, dataset: str, rerank: bool, computed: str | None = None, labelled: bool = True) -> list[str]:
    """What the table's columns mean, under it (and where it was computed, `computed_on`)."""
    if not labelled:
        return [no_labelled_split_note(dataset),
                "epochs: training epochs (warm-up + epochs for the student). training time: labelling and "
                "optimisation summed over the epochs."]
    return [
        protocol_note(dataset=dataset, rerank=rerank) + (f" {computed}" if computed else ""),
        "untrained: the teacher's starting weights, evaluated before its first epoch. "
        "queries: queries with a true match in the gallery. epochs: training epochs "
        "(warm-up + epochs for the student, whose warm-up epoch -1 learns from the teacher's clusters). "
        "training time: labelling and optimisation summed over the epochs, test evaluations excluded.",
        "mINP: mean inverse negative penalty (Ye et al., TPAMI 2021), the matches of a query divided by "
        "the rank of its last match, averaged; it rewards finding the hardest match early.",
    ]


def to_tsv(rows: Sequence[SummaryRow]) -> str:
    """Machine-readable: percentages with 2 decimals, empty where not measured, seconds."""
    lines = ["\t".join(TSV_COLUMNS)]
    for row in rows:
        values = [row.model, *(percent(row.metrics.get(key), 2).replace("—", "") for key, _ in METRICS),
                  "" if row.queries is None else str(row.queries), str(row.epochs), str(row.warmup_epochs),
                  "" if row.train_seconds is None else f"{row.train_seconds:.1f}"]
        lines.append("\t".join(values))
    return "\n".join(lines) + "\n"


def to_markdown(rows: Sequence[SummaryRow], *, dataset: str, rerank: bool, computed: str | None = None,
                labelled: bool = True) -> str:
    """The table a run prints at its end (summary.md)."""
    lines = [f"## purireid results: {dataset}", "",
             "| " + " | ".join(HEADERS) + " |",
             "|:--|" + "--:|" * (len(HEADERS) - 1)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    below = notes(dataset=dataset, rerank=rerank, computed=computed, labelled=labelled)
    return "\n".join(lines) + "\n\n" + "\n\n".join(below) + "\n"


def to_html(rows: Sequence[SummaryRow], *, dataset: str, rerank: bool, computed: str | None = None,
            labelled: bool = True) -> str:
    """An HTML fragment (styles inline): the report's first screen (a column ~500 px wide) and
    its Summary entry. Metric headers without "(%)" to fit; the first note says percentages."""
    headers = ("model", *(name for _, name in METRICS), "queries", "epochs", "training time")
    return html_table(f"Results: {dataset}", "(mAP, mINP, Rank-k in %)", headers, [_cells(row) for row in rows],
                      notes(dataset=dataset, rerank=rerank, computed=computed, labelled=labelled),
                      css_class="purireid-summary")


def html_table(title: str, subtitle: str, headers: Sequence[str], cells: Sequence[Sequence[str]],
               notes_below: Sequence[str], *, css_class: str, left_columns: int = 1) -> str:
    """A compact HTML fragment (inline styles, escaped text): a bold title, the table (the first
    `left_columns` columns left-aligned, numbers right-aligned) and notes under it."""
    cell = "padding:2px 4px;border-bottom:1px solid #ddd;white-space:nowrap;text-align:{}"
    head = "".join(f'<th style="{cell.format("left" if i < left_columns else "right")}">{html.escape(h)}</th>'
                   for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td style="{cell.format("left" if i < left_columns else "right")}">{html.escape(c)}</td>'
                         for i, c in enumerate(row)) + "</tr>"
        for row in cells)
    text = "".join(f'<p style="font-size:0.8em;margin:4px 0">{html.escape(n)}</p>' for n in notes_below)
    return (f'<div class="{css_class}"><p style="margin:8px 0 4px"><b>{html.escape(title)}</b> '
            f'{html.escape(subtitle)}</p>'
            f'<table style="border-collapse:collapse;font-size:0.8em;margin:0">'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{text}</div>\n")
