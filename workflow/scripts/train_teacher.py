"""Rule train_teacher."""

from _workflow import run_stage


def main(config: dict) -> None:
    from purireid.stages import train_teacher  # here, so an import error lands in the rule log

    train_teacher.run(
        config,
        manifest=snakemake.input.manifest,
        model_out=snakemake.output.model,
        log_jsonl=snakemake.output.log_jsonl,
        curve_png=snakemake.output.curve,
        state_dir=snakemake.params.state_dir,
        source_weights=snakemake.input.get("source_weights"),
    )


run_stage(snakemake, main)
