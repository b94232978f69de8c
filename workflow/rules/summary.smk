# Last stage: the results of every evaluated model in one table (results/<dataset>/summary.*),
# the report's first screen, and printed at the end of a run that built anything. The rule graph
# drawn by Graphviz (docs/rulegraph.svg, `make rulegraph`) is copied beside it for the report's
# first screen (Snakemake's own drawing of this DAG misleads; README, "The report"): a report
# file keeps its path, and one under results/ shows no machine's folders.


# Seconds of reading JSON: run by Snakemake itself, never submitted as a cluster job.
localrules:
    summary,


rule summary:
    """Tabulate mAP, mINP, Rank-1/5/10, queries, epochs and training time of every evaluated
    model (and the untrained starting point) into summary.tsv / summary.md / summary.html, beside
    a copy of the rule graph (docs/rulegraph.svg) for the report."""
    input:
        # without a labelled split (crops without query/gallery) no eval.json: rows without metrics
        eval_json=expand(out("{model}", "eval.json"), model=summarised_models() if LABELLED else []),
        log_jsonl=expand(out("{model}", "log.jsonl"), model=summarised_models()),
    output:
        tsv=out("summary.tsv"),
        md=out("summary.md"),
        html=report(
            out("summary.html"),
            caption="../report/summary.rst",
            category=REPORT_SUMMARY,
            subcategory="results",
            labels={"table": "results of every model"},
        ),
        rulegraph=report(
            out("rulegraph.svg"),
            caption="../report/rulegraph.rst",
            category=REPORT_SUMMARY,
            subcategory="workflow",
            labels={"table": "rule graph"},
        ),
    params:
        models=summarised_models(),
        dataset=DATASET,
        labelled=LABELLED,
        rulegraph_sha256=rulegraph_digest(),
    log:
        out("logs", "summary.log"),
    benchmark:
        out("benchmarks", "summary.tsv")
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
        gpu=0,
    script:
        "../scripts/summarise.py"


# The closing table (print_summary in common.smk), after a run that built anything.
onsuccess:
    print_summary()
