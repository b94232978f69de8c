# The identities the method found, as a result: the final teacher's and student's clustering of the
# train images (purireid/stages/pseudo_identities.py), for every dataset, labelled or not.


rule pseudo_identities:
    """Cluster the train images with the final model's features and the run's label source:
    pseudo_identities.csv (path, camera, pseudo_identity or -1 for an outlier, distance to the
    cluster's centre) and a picture of a sample of the clusters as image strips."""
    input:
        unpack(lambda w: {"teacher_features": upstream("extract_teacher_features", "teacher", "train_features.h5")(w)}
               if w.model == "teacher" else {}),
        manifest=upstream("prepare_dataset", "data", "manifest.csv"),
        summary=upstream("prepare_dataset", "data", "summary.json"),
        checkpoint=lambda w: upstream(TRAINED_BY[w.model], w.model, "model.pth")(w),
    output:
        csv=run_out("{model}", "pseudo_identities.csv"),
        strips=report(
            run_out("{model}", "pseudo_identities.png"),
            caption="../report/pseudo_identities.rst",
            category=report_category(REPORT_TRAINING),
            subcategory=report_subcategory("{model}"),
            labels={"model": "{model}", "figure": "pseudo-identities"},
        ),
    params:
        config=params_of("pseudo_identities"),
    log:
        log_path("pseudo_identities_{model}"),
    benchmark:
        benchmark_path("pseudo_identities_{model}")
    threads: COMPUTE_THREADS
    resources:
        mem_mb=mem_mb("pseudo_identities"),
        runtime=runtime("pseudo_identities"),
        gpu=EVAL_GPUS,
    script:
        "../scripts/pseudo_identities.py"
