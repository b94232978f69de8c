# Stage 2: the teacher, trained from ImageNet weights with per-view pseudo labels (docs/method.md).
# Resume state lives in the undeclared <results>/teacher/state/ (Snakemake deletes declared
# outputs before a job starts, so a killed or timed-out job resumes from its last epoch).
# Its params include evaluate.rerank: the test mAP it logs, and with train.keep_best the weights
# that become model.pth, depend on it.


rule train_teacher:
    """Train the teacher on per-view pseudo labels of its own features (DBSCAN over fused
    k-reciprocal Jaccard distances), one clustering per epoch; resumes after interruption."""
    input:
        unpack(owned("train_teacher")),
        unpack(source_weights_input),
        manifest=upstream("prepare_dataset", "data", "manifest.csv"),
    output:
        **training_outputs("teacher"),
    params:
        **training_params("train_teacher", "teacher"),
    log:
        log_path("train_teacher"),
    benchmark:
        benchmark_path("train_teacher")
    threads: TRAIN_THREADS
    resources:
        **training_resources("train_teacher"),
    script:
        "../scripts/train_teacher.py"
