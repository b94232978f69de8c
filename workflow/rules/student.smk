# Stage 4: the student, a fresh model distilled from the teacher (SPEC §5). Its params hold the
# student section, so changing e.g. student.mu reruns this rule and its evaluation only.


rule train_student:
    """Train the student: a warm-up epoch on the teacher's clusters, then the teacher's recipe
    plus distillation towards the teacher; resumes after interruption."""
    input:
        unpack(source_weights_input),
        manifest=rules.prepare_dataset.output.manifest,
        teacher_checkpoint=rules.train_teacher.output.model,
        teacher_features=rules.extract_teacher_features.output.features,
    output:
        model=out("student", "model.pth"),
        log_jsonl=out("student", "log.jsonl"),
        config=out("student", "config.yaml"),  # the resolved config the job ran with
        curve=report(
            out("student", "curve.png"),
            caption="../report/curve.rst",
            category=REPORT_TRAINING,
            subcategory=model_subcategory("student"),
            labels={"model": "student", "figure": "training curve"},
        ),
    params:
        config=params_of("train_student"),
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
