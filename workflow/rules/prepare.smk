# Stage 1: the validated manifest of (split, path, pid, camid).
#
# No declared input: the synthetic set is generated here, and for a real dataset the folder
# (or its archive, prepare.archive) is read at run time, so dry runs work without the data;
# a missing dataset fails this job with the data layer's message saying where to put it.


rule prepare_dataset:
    """Find, extract or generate the dataset, decode every image and write the validated
    manifest (split, path, pid, camid) with a summary of the splits."""
    input:
        unpack(owned("prepare_dataset")),
    output:
        manifest=run_out("data", "manifest.csv"),
        summary=run_out("data", "summary.json"),
        config=run_out("data", "config.yaml"),  # the resolved config the job ran with
    params:
        config=params_of("prepare_dataset"),
    log:
        log_path("prepare_dataset"),
    benchmark:
        benchmark_path("prepare_dataset")
    threads: PREPARE_THREADS
    resources:
        mem_mb=mem_mb("prepare_dataset"),
        runtime=runtime("prepare_dataset"),
    script:
        "../scripts/prepare_dataset.py"
