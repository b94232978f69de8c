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
        **training_outputs("supervised"),
    params:
        **training_params("train_supervised", "supervised", role="supervised"),
    log:
        log_path("train_supervised"),
    benchmark:
        benchmark_path("train_supervised")
    threads: TRAIN_THREADS
    resources:
        **training_resources("train_supervised"),
    script:
        "../scripts/train_supervised.py"
