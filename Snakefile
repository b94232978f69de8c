# purireid: "Learning to Purification for Unsupervised Person Re-identification" as a workflow.
#
#   prepare_dataset -> train_teacher -> extract_teacher_features -> train_student
#                                   \-> evaluate (teacher)                     \-> evaluate (student)
#   evaluate (teacher, student) -> summary        (evaluate only with a labelled query/gallery split)
#   train_teacher / train_student -> pseudo_identities (teacher, student)
#
# Run:  snakemake            (embedded synthetic default, CPU-sized; profiles/default is the
#                             workflow profile, applied without --profile)
#       snakemake --configfile config/presets/market1501.yaml
# See README.md for the outputs, the config keys and SLURM / multi-GPU use.

from pathlib import Path

from snakemake.utils import min_version

min_version("9.20")


# The embedded default, found beside this Snakefile whatever --directory is.
configfile: str(Path(workflow.basedir) / "config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/source.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/student.smk"
include: "workflow/rules/supervised.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/pseudo_identities.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/ablation.smk"


rule all:
    """Every output of the configured run (final_outputs() in workflow/rules/common.smk)."""
    default_target: True
    input:
        final_outputs(),
