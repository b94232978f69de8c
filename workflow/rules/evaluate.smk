# Stage 5: query/gallery retrieval metrics (SPEC §8) of the teacher or the student.


rule evaluate:
    input:
        manifest=rules.prepare_dataset.output.manifest,
        checkpoint=out("{model}", "model.pth"),
    output:
        eval_json=report(
            out("{model}", "eval.json"),
            caption="../report/eval_json.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "metrics (JSON)"},
        ),
        cmc=report(
            out("{model}", "cmc.png"),
            caption="../report/cmc.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "CMC curve"},
        ),
        ranked=report(
            out("{model}", "ranked.png"),
            caption="../report/ranked.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "ranked lists"},
        ),
    params:
        config=sections("data", "model", "evaluate"),
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
