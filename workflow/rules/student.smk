# Stage 4: the student, a fresh model distilled from the teacher (SPEC §5). Its params hold the
# student section, so changing e.g. student.mu reruns this rule and its evaluation only.


rule train_student:
    input:
        manifest=rules.prepare_dataset.output.manifest,
        teacher_checkpoint=rules.train_teacher.output.model,
        teacher_features=rules.extract_teacher_features.output.features,
    output:
        model=out("student", "model.pth"),
        log_jsonl=out("student", "log.jsonl"),
        curve=report(
            out("student", "curve.png"),
            caption="../report/curve.rst",
            category="Training",
            subcategory="student",
            labels={"model": "student", "figure": "training curve"},
        ),
    params:
        config=sections("seed", "data", "model", "cluster", "train", "student"),
        state_dir=out("student", "state"),
    log:
        log_path("train_student"),
    benchmark:
        benchmark_path("train_student")
    threads: TRAIN_THREADS
    resources:
        mem_mb=mem_mb("train_student"),
        runtime=runtime("train_student"),
        gpu=TRAIN_GPUS,
    script:
        "../scripts/train_student.py"
