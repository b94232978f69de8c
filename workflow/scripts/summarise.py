"""Rule summary: one row per evaluated model (and the untrained starting point) as TSV, Markdown
and HTML (purireid.evaluation.summary does the tabulating). Reads only its inputs and params (no config)."""

import json
import logging

from purireid.log import setup_logging

setup_logging(snakemake.log[0])
log = logging.getLogger("purireid.workflow")
try:
    from purireid.io.files import read_jsonl, write_text_atomic
    from purireid.evaluation.summary import summary_rows, to_html, to_markdown, to_tsv

    models = list(snakemake.params.models)
    evaluations, logs = {}, {}
    for model, eval_json, log_jsonl in zip(models, snakemake.input.eval_json, snakemake.input.log_jsonl, strict=True):
        with open(eval_json) as handle:
            evaluations[model] = json.load(handle)
        logs[model] = read_jsonl(log_jsonl)
    rows = summary_rows(models, evaluations, logs)
    dataset = snakemake.params.dataset
    rerank = any(e.get("rerank") for e in evaluations.values())
    write_text_atomic(snakemake.output.tsv, to_tsv(rows))
    markdown = to_markdown(rows, dataset=dataset, rerank=rerank)
    write_text_atomic(snakemake.output.md, markdown)
    write_text_atomic(snakemake.output.html, to_html(rows, dataset=dataset, rerank=rerank))
    log.info("summary: %d rows written to %s\n%s", len(rows), snakemake.output.md, markdown)
except BaseException as err:  # noqa: BLE001 - logged, then the job fails
    log.exception("summary failed: %s", err)
    raise SystemExit(1) from None
