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
        **training_outputs("student"),
    params:
        **training_params("train_student", "student"),
    log:
        log_path("train_student"),
    benchmark:
        benchmark_path("train_student")
    threads: TRAIN_THREADS
    resources:
        **training_resources("train_student"),
    script:
        "../scripts/train_student.py"
