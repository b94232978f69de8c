# Opt-in last stage: the evaluated student as a deployable ONNX / TorchScript file.
# On with config key export.enabled (then part of the default target), or ask for the file:
#   snakemake --profile profiles/default results/synthetic/student/model.onnx


rule export_student:
    """Export the evaluated student (input float32 [batch, 3, H, W], dynamic batch; output the
    L2-normalised global feature) and check parity with PyTorch (purireid.serving.export)."""
    input:
        checkpoint=out("student", "model.pth"),
        # After evaluation: the DAG ends in a file whose accuracy eval.json states.
        eval_json=out("student", "eval.json"),
    output:
        model=EXPORTED_STUDENT,
    params:
        config=stage_params(config, "export_student"),
    log:
        out("logs", "export_student.log"),
    benchmark:
        out("benchmarks", "export_student.tsv")
    threads: 2
    resources:
        mem_mb=mem_mb("export_student"),
        runtime=runtime("export_student"),
        gpu=0,
    script:
        "../scripts/export_model.py"
