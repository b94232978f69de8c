"""Rule train_student."""

from _workflow import run_stage


def main(config: dict) -> None:
    from purireid.stages import train_student  # here, so an import error lands in the rule log

    train_student.run(
        config,
        manifest=snakemake.input.manifest,
        teacher_checkpoint=snakemake.input.teacher_checkpoint,
        teacher_features=snakemake.input.teacher_features,
        model_out=snakemake.output.model,
        log_jsonl=snakemake.output.log_jsonl,
        curve_png=snakemake.output.curve,
        state_dir=snakemake.params.state_dir,
        source_weights=snakemake.input.get("source_weights"),
    )


run_stage(snakemake, main)
