"""Rule pseudo_identities, for {model} = teacher or student."""

from _workflow import run_stage


def main(config: dict) -> None:
    from purireid.stages import pseudo_identities  # here, so an import error lands in the rule log

    pseudo_identities.run(
        config,
        manifest=snakemake.input.manifest,
        summary=snakemake.input.summary,
        checkpoint=snakemake.input.checkpoint,
        teacher_features=snakemake.input.get("teacher_features"),
        csv_out=snakemake.output.csv,
        png_out=snakemake.output.strips,
        model=snakemake.wildcards.model,
    )


run_stage(snakemake, main)
