"""Rule extract_teacher_features."""

from _workflow import run_stage


def main(config: dict) -> None:
    from purireid.stages import extract_teacher_features  # here, so an import error lands in the rule log

    extract_teacher_features.run(
        config,
        manifest=snakemake.input.manifest,
        checkpoint=snakemake.input.checkpoint,
        features_out=snakemake.output.features,
    )


run_stage(snakemake, main)
