# The supervised reference (opt-in: supervised_reference: true, or ask for its files): the
# teacher's model and recipe trained with the TRUE train labels. It uses labels, so it is not
# an unsupervised result: it is the upper bound that shows what the unsupervised models leave
# on the table. Outputs under results/<dataset>/supervised/; evaluated by rule evaluate.


rule train_supervised:
    """Train the supervised reference: the teacher's recipe on the true train identities (uses labels)."""
    input:
        unpack(owned("train_supervised")),
        unpack(source_weights_input),
        manifest=upstream("prepare_dataset", "data", "manifest.csv"),
    output:
        model=run_out("supervised", "model.pth"),
        config=run_out("supervised", "config.yaml"),  # the resolved config the job ran with
        log_jsonl=run_out("supervised", "log.jsonl"),
        curve=report(
            run_out("supervised", "curve.png"),
            caption="../report/curve.rst",
            category=report_category(REPORT_TRAINING),
            subcategory=report_subcategory("supervised"),
            labels={"model": "supervised", "figure": "training curve"},
        ),
    params:
        config=params_of("train_supervised"),
        state_dir=run_out("supervised", "state"),
        role="supervised",
    log:
        log_path("train_supervised"),
    benchmark:
        benchmark_path("train_supervised")
    threads: TRAIN_THREADS
    resources:
        mem_mb=mem_mb("train_supervised"),
        runtime=runtime("train_supervised"),
        gpu=TRAIN_GPUS,
    script:
        "../scripts/train_supervised.py"
