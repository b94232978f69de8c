"""Rules ablation and sweep: one row per variant (purireid.evaluation.ablation) as CSV, Markdown and HTML,
and a figure. Reads only its inputs and params (no config)."""

import json
import logging

from purireid.log import setup_logging

setup_logging(snakemake.log[0])
log = logging.getLogger("purireid.workflow")


try:
    from purireid.evaluation.ablation import to_csv, to_html, to_markdown, variant_row
    from purireid.io.files import read_jsonl, write_text_atomic
    from purireid.evaluation.reporting import plot_sweep, plot_variant_bars

    rows, rerank = [], False
    for spec in snakemake.params.rows:
        with open(spec["eval_json"]) as handle:
            evaluation = json.load(handle)
        rerank = rerank or bool(evaluation.get("rerank"))
        rows.append(variant_row(spec, evaluation, read_jsonl(spec["model_log"]),
                                [read_jsonl(path) for path in spec["training_logs"]]))
        if spec["eval_json"].count("/variants/") == 0:
            log.info("%s: shares the configured run's %s (%s)", spec["variant"], spec["model"], spec["eval_json"])
    title, dataset, sweep = snakemake.params.title, snakemake.params.dataset, snakemake.params.sweep
    write_text_atomic(snakemake.output.csv, to_csv(rows))
    markdown = to_markdown(rows, title=title, dataset=dataset, rerank=rerank)
    write_text_atomic(snakemake.output.md, markdown)
    write_text_atomic(snakemake.output.html, to_html(rows, title=title, dataset=dataset, rerank=rerank))
    maps = [row.metrics.get("mAP") for row in rows]
    rank1s = [row.metrics.get("rank1") for row in rows]
    if sweep:
        plot_sweep(snakemake.output.figure, sweep["key"], sweep["values"], maps, rank1s, title,
                   configured=sweep["configured"])
    else:
        plot_variant_bars(snakemake.output.figure, [row.variant for row in rows], maps, rank1s, title)
    log.info("%s: %d rows written to %s\n%s", title, len(rows), snakemake.output.md, markdown)
except BaseException as err:  # noqa: BLE001 - logged, then the job fails
    log.exception("tabulating variants failed: %s", err)
    raise SystemExit(1) from None
