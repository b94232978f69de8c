# Stage 4: the student, a fresh model distilled from the teacher (docs/method.md). Its params hold the
# student section, so changing e.g. student.mu reruns this rule and its evaluation only.


rule train_student:
    """Train the student: a warm-up epoch on the teacher's clusters, then the teacher's recipe
    plus distillation towards the teacher; resumes after interruption."""
    input:
        unpack(owned("train_student")),
        unpack(source_weights_input),
        manifest=upstream("prepare_dataset", "data", "manifest.csv"),
        teacher_checkpoint=upstream("train_teacher", "teacher", "model.pth"),
        teacher_features=upstream("extract_teacher_features", "teacher", "train_features.h5"),
    output:
        model=run_out("student", "model.pth"),
        log_jsonl=run_out("student", "log.jsonl"),
        config=run_out("student", "config.yaml"),  # the resolved config the job ran with
        curve=report(
            run_out("student", "curve.png"),
            caption="../report/curve.rst",
            category=report_category(REPORT_TRAINING),
            subcategory=report_subcategory("student"),
            labels={"model": "student", "figure": "training curve"},
        ),
    params:
        config=params_of("train_student"),
        state_dir=run_out("student", "state"),
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
