# Stage 5: query/gallery retrieval metrics (SPEC §8) of each evaluated model (teacher, student, ...).


rule evaluate:
    """Score a trained model on the query/gallery split: eval.json (mAP, mINP, Rank-1/5/10, CMC
    as fractions), a CMC plot and a picture of ranked lists."""
    input:
        manifest=rules.prepare_dataset.output.manifest,
        checkpoint=out("{model}", "model.pth"),
    output:
        eval_json=report(
            out("{model}", "eval.json"),
            caption="../report/eval_json.rst",
            category=REPORT_EVALUATION,
            subcategory=lambda w: model_subcategory(w.model),
            labels={"model": "{model}", "figure": "metrics (JSON)"},
        ),
        cmc=report(
            out("{model}", "cmc.png"),
            caption="../report/cmc.rst",
            category=REPORT_EVALUATION,
            subcategory=lambda w: model_subcategory(w.model),
            labels={"model": "{model}", "figure": "CMC curve"},
        ),
        ranked=report(
            out("{model}", "ranked.png"),
            caption="../report/ranked.rst",
            category=REPORT_EVALUATION,
            subcategory=lambda w: model_subcategory(w.model),
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
