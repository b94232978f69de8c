"""Rule prepare_dataset: the validated manifest (and the synthetic images when dataset=synthetic)."""

from pathlib import Path

from _workflow import run_stage

from purireid.io import write_yaml_atomic


def main(config: dict) -> None:
    from purireid.data import prepare_dataset  # here, so an import error lands in the rule log

    prepare = config["prepare"]
    prepare_dataset(
        config["dataset"],
        config["data_root"],
        snakemake.output.manifest,
        snakemake.output.summary,
        archive=prepare["archive"],
        check_counts=prepare["check_counts"],
        folder_name=prepare["folder_name"],
        workers=snakemake.threads,
        synthetic=config["synthetic"],
    )
    # The resolved config beside the outputs, as the training stages write theirs.
    write_yaml_atomic(Path(snakemake.output.manifest).parent / "config.yaml", config)


run_stage(snakemake, main, torch_threads=False)
