"""Rule prepare_dataset: the validated manifest (and the synthetic images when dataset=synthetic)."""

from _workflow import run_stage


def main(config: dict) -> None:
    from purireid.stages import prepare_dataset  # here, so an import error lands in the rule log

    prepare_dataset.run(config, manifest=snakemake.output.manifest, summary=snakemake.output.summary,
                        workers=snakemake.threads)


run_stage(snakemake, main, torch_threads=False)
