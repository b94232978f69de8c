# Source pretraining (opt-in with model.pretrained: source): supervised training with the labels
# of a *source* dataset (config section `source`), whose weights the teacher and the student
# start from. Default source: the synthetic generator with its own seed, a stand-in for ImageNet
# weights on a CPU without them; any registered dataset can be the source (e.g. Market-1501 ->
# MSMT17, unsupervised domain adaptation). Outputs under results/<dataset>/source/.


rule prepare_source:
    """Find, extract or generate the source dataset and write its validated manifest."""
    input:
        unpack(owned("prepare_source")),
    output:
        manifest=run_out("source", "data", "manifest.csv"),
        summary=run_out("source", "data", "summary.json"),
    params:
        config=params_of("prepare_source"),
    log:
        log_path("prepare_source"),
    benchmark:
        benchmark_path("prepare_source")
    threads: SOURCE_CONFIG["prepare"]["workers"]
    resources:
        mem_mb=mem_mb("prepare_source"),
        runtime=runtime("prepare_source"),
    script:
        "../scripts/prepare_dataset.py"


rule pretrain_source:
    """Train the model with the source dataset's true labels (the teacher's recipe, source.train over train)."""
    input:
        unpack(owned("pretrain_source")),
        manifest=upstream("prepare_source", "source", "data", "manifest.csv"),
    output:
        **training_outputs("source"),
    params:
        **training_params("pretrain_source", "source", role="source"),
    log:
        log_path("pretrain_source"),
    benchmark:
        benchmark_path("pretrain_source")
    threads: TRAIN_THREADS
    resources:
        **training_resources("pretrain_source"),
    script:
        "../scripts/train_supervised.py"
