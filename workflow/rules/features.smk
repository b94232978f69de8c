# Stage 3: eval-mode features of every train image, three views, from the teacher (HDF5).


rule extract_teacher_features:
    """Extract the trained teacher's eval-mode features of every train image, three views, into HDF5."""
    input:
        unpack(owned("extract_teacher_features")),
        manifest=upstream("prepare_dataset", "data", "manifest.csv"),
        checkpoint=upstream("train_teacher", "teacher", "model.pth"),
    output:
        features=run_out("teacher", "train_features.h5"),
    params:
        config=params_of("extract_teacher_features"),
    log:
        log_path("extract_teacher_features"),
    benchmark:
        benchmark_path("extract_teacher_features")
    threads: TRAIN_THREADS
    resources:
        mem_mb=mem_mb("extract_teacher_features"),
        runtime=runtime("extract_teacher_features"),
        gpu=TRAIN_GPUS,
    script:
        "../scripts/extract_teacher_features.py"
