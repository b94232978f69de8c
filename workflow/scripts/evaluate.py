"""Rule evaluate, for {model} = each of the evaluated models (teacher, student, ...)."""

from _workflow import run_stage


def main(config: dict) -> None:
    from purireid.stages import evaluate  # here, so an import error lands in the rule log

    evaluate.run(
        config,
        manifest=snakemake.input.manifest,
        checkpoint=snakemake.input.checkpoint,
        eval_json=snakemake.output.eval_json,
        cmc_png=snakemake.output.cmc,
        ranked_png=snakemake.output.ranked,
        model=snakemake.wildcards.model,
    )


run_stage(snakemake, main)
