"""Rule summary: one row per evaluated model (and the untrained starting point) as TSV, Markdown
and HTML (purireid.evaluation.summary does the tabulating), and the rule graph copied beside them
for the report. Reads only its inputs and params (no config), and the rule graph beside the
Snakefile (docs/rulegraph.svg, found from this script: Snakemake sets __file__ to it)."""

import json
import logging
import shutil
from pathlib import Path

from purireid.log import setup_logging

setup_logging(snakemake.log[0])
log = logging.getLogger("purireid.workflow")
RULEGRAPH_SVG = Path(__file__).resolve().parents[2] / "docs" / "rulegraph.svg"
try:
    from purireid.io.files import atomic_path, read_jsonl, remove_stale_temporaries, write_text_atomic
    from purireid.evaluation.summary import computed_on, summary_rows, to_html, to_markdown, to_tsv

    remove_stale_temporaries(list(snakemake.output))  # an interrupted run's

    models = list(snakemake.params.models)
    labelled = snakemake.params.labelled  # False: no query/gallery split, no eval.json, no metric
    evaluations, logs = {}, {}
    for model, log_jsonl in zip(models, snakemake.input.log_jsonl, strict=True):
        logs[model] = read_jsonl(log_jsonl)
    for model, eval_json in zip(models if labelled else [], snakemake.input.eval_json, strict=True):
        with open(eval_json) as handle:
            evaluations[model] = json.load(handle)
    rows = summary_rows(models, evaluations, logs)
    dataset = snakemake.params.dataset
    rerank = any(e.get("rerank") for e in evaluations.values())
    write_text_atomic(snakemake.output.tsv, to_tsv(rows))
    computed = computed_on(evaluations)
    markdown = to_markdown(rows, dataset=dataset, rerank=rerank, computed=computed, labelled=labelled)
    write_text_atomic(snakemake.output.md, markdown)
    write_text_atomic(snakemake.output.html, to_html(rows, dataset=dataset, rerank=rerank, computed=computed,
                                                     labelled=labelled))
    with atomic_path(snakemake.output.rulegraph) as tmp:  # for the report's first screen
        shutil.copyfile(RULEGRAPH_SVG, tmp)
    # The table itself is printed once, at the end of the run (common.smk's print_summary).
    log.info("summary: %d rows written to %s", len(rows), snakemake.output.md)
except BaseException as err:  # noqa: BLE001 - logged, then the job fails
    log.exception("summary failed: %s", err)
    raise SystemExit(1) from None
