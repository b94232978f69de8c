# The paper's ablation and parameter sweeps as targets (purireid/config/variants.py, docs/ablation.md):
#   snakemake ablation          every variant of ablation.variants -> results/<dataset>/ablation/
#   snakemake sweeps            every sweep -> results/<dataset>/sweeps/<name>/
#   snakemake sweep_<name>      one sweep (e.g. sweep_eps)
# A variant's jobs are the stage rules' own, under results/<dataset>/variants/<name>/; a stage a
# variant does not change is read from the run that owns it (the configured run first), so only
# what differs is trained.


# Seconds of reading JSON and drawing: run by Snakemake itself, never submitted as cluster jobs.
localrules:
    ablation,
    sweep,
    sweeps,


rule ablation:
    """Run every variant of ablation.variants and tabulate them: one row per variant (what it changes,
    mAP, mINP, Rank-1/5/10, clusters and outliers at the last epoch, training time) and a figure."""
    input:
        variant_inputs(ABLATION),
    output:
        csv=out("ablation", "table.csv"),
        md=out("ablation", "table.md"),
        html=report(
            out("ablation", "table.html"),
            caption="../report/ablation.rst",
            category=REPORT_ABLATION,
            subcategory="ablation",
            labels={"table": "ablation", "figure": "table"},
        ),
        figure=report(
            out("ablation", "figure.png"),
            caption="../report/ablation_figure.rst",
            category=REPORT_ABLATION,
            subcategory="ablation",
            labels={"table": "ablation", "figure": "mAP and Rank-1"},
        ),
    params:
        rows=variant_rows(ABLATION),
        title=f"Ablation: {DATASET}",
        dataset=DATASET,
        sweep=None,
    log:
        out("logs", "ablation.log"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
        gpu=0,
    script:
        "../scripts/tabulate_variants.py"


rule sweep:
    """Run every value of one sweep and tabulate them like the ablation, with mAP / Rank-1 against the value."""
    input:
        lambda w: variant_inputs(sweep_variants(SWEEPS[w.sweep])),
    output:
        csv=out("sweeps", "{sweep}", "table.csv"),
        md=out("sweeps", "{sweep}", "table.md"),
        html=report(
            out("sweeps", "{sweep}", "table.html"),
            caption="../report/sweep.rst",
            category=REPORT_ABLATION,
            subcategory="sweep {sweep}",
            labels={"table": "sweep {sweep}", "figure": "table"},
        ),
        figure=report(
            out("sweeps", "{sweep}", "figure.png"),
            caption="../report/sweep_figure.rst",
            category=REPORT_ABLATION,
            subcategory="sweep {sweep}",
            labels={"table": "sweep {sweep}", "figure": "mAP and Rank-1"},
        ),
    params:
        rows=lambda w: variant_rows(sweep_variants(SWEEPS[w.sweep])),
        title=lambda w: f"Sweep {w.sweep} ({SWEEPS[w.sweep].key}): {DATASET}",
        dataset=DATASET,
        sweep=lambda w: {"key": SWEEPS[w.sweep].key, "values": list(SWEEPS[w.sweep].values),
                         "configured": config_value(SWEEPS[w.sweep].key)},
    log:
        out("logs", "sweep_{sweep}.log"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
        gpu=0,
    script:
        "../scripts/tabulate_variants.py"


rule sweeps:
    """Every sweep of the sweeps section (its tables under results/<dataset>/sweeps/)."""
    input:
        [out("sweeps", name, "table.md") for name in SWEEPS],


# One target per sweep: `snakemake sweep_eps`.
for _sweep in SWEEPS:

    rule:
        """One sweep's table (results/<dataset>/sweeps/<name>/)."""
        name:
            f"sweep_{_sweep}"
        input:
            out("sweeps", _sweep, "table.md"),
        localrule: True
