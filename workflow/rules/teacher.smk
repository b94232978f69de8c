# Stage 2: the teacher, trained from ImageNet weights with per-view pseudo labels (SPEC §3-§4).
# Resume state lives in the undeclared <results>/teacher/state/ (Snakemake deletes declared
# outputs before a job starts, so a killed or timed-out job resumes from its last epoch).


rule train_teacher:
    input:
        manifest=rules.prepare_dataset.output.manifest,
    output:
        model=out("teacher", "model.pth"),
        log_jsonl=out("teacher", "log.jsonl"),
        curve=report(
            out("teacher", "curve.png"),
            caption="../report/curve.rst",
            category="Training",
            subcategory="teacher",
            labels={"model": "teacher", "figure": "training curve"},
        ),
    params:
        config=sections("seed", "data", "model", "cluster", "train"),
        state_dir=out("teacher", "state"),
    log:
        log_path("train_teacher"),
    benchmark:
        benchmark_path("train_teacher")
    threads: TRAIN_THREADS
    resources:
        mem_mb=mem_mb("train_teacher"),
        runtime=runtime("train_teacher"),
        gpu=TRAIN_GPUS,
    script:
        "../scripts/train_teacher.py"
