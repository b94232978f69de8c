"""Rule export_student: the evaluated student as ONNX / TorchScript, parity-checked (purireid.serving.export)."""

from _workflow import log, run_stage


def main(config: dict) -> None:
    from purireid.serving.export import export_model  # here, so an import error lands in the rule log

    settings = config["export"]
    report = export_model(snakemake.input.checkpoint, snakemake.output.model, fmt=settings["format"],
                          views=settings["views"], opset=settings["opset"], tolerance=settings["tolerance"])
    log.info("export_student: %s%s -> %s; parity with PyTorch: max abs diff %.3g (tolerance %g)", report.format,
             f" opset {report.opset}" if report.opset else "", report.path, report.max_abs_diff, report.tolerance)


run_stage(snakemake, main)
