"""Rules train_supervised (the supervised reference) and pretrain_source: training with true labels."""

from _workflow import run_stage


def main(config: dict) -> None:
    from purireid.stages import train_supervised  # here, so an import error lands in the rule log

    train_supervised.run(
        config,
        manifest=snakemake.input.manifest,
        model_out=snakemake.output.model,
        log_jsonl=snakemake.output.log_jsonl,
        curve_png=snakemake.output.curve,
        state_dir=snakemake.params.state_dir,
        role=snakemake.params.role,
        source_weights=snakemake.input.get("source_weights"),
    )


run_stage(snakemake, main)
