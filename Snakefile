# purireid: "Learning to Purification for Unsupervised Person Re-identification" as a workflow.
#
#   prepare_dataset -> train_teacher -> extract_teacher_features -> train_student
#                                   \-> evaluate (teacher)                     \-> evaluate (student)
#
# Run:  snakemake --profile profiles/default            (embedded synthetic default, CPU-sized)
#       snakemake --profile profiles/default --configfile config/presets/market1501.yaml
# See README.md for the outputs, the config keys and SLURM / multi-GPU use.

from pathlib import Path

from snakemake.utils import min_version

min_version("9.20")


# The embedded default, found beside this Snakefile whatever --directory is.
configfile: str(Path(workflow.basedir) / "config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/student.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
