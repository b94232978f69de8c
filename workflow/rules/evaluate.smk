# Stage 5: query/gallery retrieval metrics (docs/method.md) of each evaluated model (teacher, student, ...).


rule evaluate:
    """Score a trained model on the query/gallery split: eval.json (mAP, mINP, Rank-1/5/10, CMC
    as fractions), a CMC plot and a picture of ranked lists."""
    input:
        unpack(owned("evaluate")),
        manifest=upstream("prepare_dataset", "data", "manifest.csv"),
        checkpoint=lambda w: upstream(TRAINED_BY[w.model], w.model, "model.pth")(w),
    output:
        eval_json=report(
            run_out("{model}", "eval.json"),
            caption="../report/eval_json.rst",
            category=report_category(REPORT_EVALUATION),
            subcategory=report_subcategory("{model}"),
            labels={"model": "{model}", "figure": "metrics (JSON)"},
        ),
        cmc=report(
            run_out("{model}", "cmc.png"),
            caption="../report/cmc.rst",
            category=report_category(REPORT_EVALUATION),
            subcategory=report_subcategory("{model}"),
            labels={"model": "{model}", "figure": "CMC curve"},
        ),
        ranked=report(
            run_out("{model}", "ranked.png"),
            caption="../report/ranked.rst",
            category=report_category(REPORT_EVALUATION),
            subcategory=report_subcategory("{model}"),
            labels={"model": "{model}", "figure": "ranked lists"},
        ),
    params:
        config=params_of("evaluate"),
    log:
        log_path("evaluate_{model}"),
    benchmark:
        benchmark_path("evaluate_{model}")
    threads: COMPUTE_THREADS
    resources:
        mem_mb=mem_mb("evaluate"),
        runtime=runtime("evaluate"),
        gpu=EVAL_GPUS,
    script:
        "../scripts/evaluate.py"
