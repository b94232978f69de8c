# Config validation, path helpers, report categories, the closing table, per-rule params and resources
# (both from the stage table, purireid/config/dag.py).

import os
import posixpath
import re
import sys

from snakemake.exceptions import WorkflowError

from purireid.config.check import COMMAND_LINE, Layer, check_layers, read_layer
from purireid.config.dag import SOURCE_STAGES, TRAINED_BY, source_config, stage_params, stage_resources
from purireid.config.resolve import ConfigError, check_labelled_split, resolve_config
from purireid.config.variants import BASE_RUN, Runs, ablation_variants, describe_changes, run_configs, sweep_variants, \
    sweeps


# The one validation of a run, before any job: against purireid/config/schemas/config.schema.yaml
# (workflow/schemas/ links to it) plus the cross-key constraints a JSON schema cannot express,
# naming the offending key (e.g. 'train.batch_size'). The recipes the config names
# (purireid/config/recipes.py) and every default are filled in in place.
# The variants (ablation and sweeps, purireid/config/variants.py) are checked here too, each as a
# whole config, naming the variant and the key.


def shown_path(path):
    """A config file as messages name it: relative to the working directory when inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def config_layers():
    """The layers Snakemake merged into `config`, in its order (purireid/config/check.py)."""
    settings = workflow.config_settings
    embedded = Path(workflow.basedir) / "config.yaml"
    layers = [] if settings.replace_workflow_config else [read_layer(embedded, "config.yaml")]
    layers += [read_layer(path, shown_path(str(path))) for path in settings.configfiles]
    return layers + ([Layer(COMMAND_LINE, dict(settings.config))] if settings.config else [])


def refuse_config(err):
    """One line per problem, each naming the file (or the command line) that set the key and the
    nearest valid key; printed without a traceback (a WorkflowError would add this file's frame)."""
    try:
        problems = check_layers(config_layers())[1] or [str(err)]
    except ConfigError as unreadable:
        problems = [str(unreadable)]
    print("invalid configuration:", *problems, "(`purireid config FILE...` checks config files before a run; "
          "every key and its default: purireid/config/schemas/config.schema.yaml)", sep="\n", file=sys.stderr)
    sys.exit(1)


try:
    config.update(resolve_config(config))
    RUNS = Runs(run_configs(config))
    ABLATION = ablation_variants(config)
    SWEEPS = {sweep.name: sweep for sweep in sweeps(config)}
except ConfigError as err:
    refuse_config(err)


DATASET = config["dataset"]
RESULTS = f"{config['results_dir']}/{DATASET}"


# Before the first job (not in a dry run): a results folder that cannot take files is one line,
# not Snakemake's failure to create the first job's output folder.
onstart:
    from purireid.serving.api import InputError
    from purireid.serving.cli import writable_output

    try:
        writable_output(RESULTS, option="results folder (config key 'results_dir')", folder=True)
    except InputError as err:
        print(f"{err}, or set results_dir", file=sys.stderr, flush=True)
        sys.exit(1)


MODELS = ("teacher", "student")

# Whether the dataset has a labelled query/gallery split (the registry says, or for crops its
# folder's query/ and gallery/ when the workflow is parsed): without one there is no evaluate job,
# the summary says so, and what needs test mAP (train.keep_best) is refused here.
try:
    LABELLED = check_labelled_split(config)
except ConfigError as err:
    refuse_config(err)

# ---------------------------------------------------------------- runs: the configured one and the variants
#
# Each stage writes under {run}, that is results/<dataset> for the configured run, results/<dataset>/
# variants/<name> for a variant. A rule's inputs come from the run that *owns* the upstream
# stage (the first run computing the same thing, purireid.config.variants.Runs.owner), so a variant
# that changes only the student reads the configured teacher; a job whose outputs another run's
# folder holds is refused (owned below), so nothing is trained twice.
RUN_ROOTS = {name: RESULTS if name == BASE_RUN else f"{RESULTS}/variants/{name}" for name in RUNS}
RUN_OF_ROOT = {root: name for name, root in RUN_ROOTS.items()}


wildcard_constraints:
    model="teacher|student|supervised",
    run="|".join(re.escape(root) for root in RUN_ROOTS.values()),
    sweep="|".join(re.escape(name) for name in SWEEPS) or "(?!)",


def run_out(*parts):
    """{run}/<parts...>: an output of a rule that serves every run."""
    return posixpath.join("{run}", *parts)


def run_of(wildcards):
    return RUN_OF_ROOT[wildcards.run]


def run_config(wildcards):
    return RUNS[run_of(wildcards)]


def owner_root(run, stage):
    """The folder holding `stage`'s outputs for `run` (evaluate_<model> for an evaluation)."""
    return RUN_ROOTS[RUNS.owner(run, stage)]


def upstream(stage, *parts):
    """Input function: a file of `stage`'s outputs, from the run that owns them."""
    return lambda wildcards: posixpath.join(owner_root(run_of(wildcards), stage), *parts)


def owned(stage):
    """Input function adding no file: refuses a job whose outputs live in another run's folder
    (a variant asked for a stage it shares), naming where they are."""

    def check(wildcards):
        run = run_of(wildcards)
        key = f"evaluate_{wildcards.model}" if stage == "evaluate" else stage
        owner = RUNS.owner(run, key)
        if owner != run:
            raise WorkflowError(
                f"variant '{run}' computes the same {key} as '{owner}': its outputs are those under "
                f"{RUN_ROOTS[owner]}/ (ask for those files instead)")
        return {}

    return check


# ---------------------------------------------------------------- paths (the public contract)


def out(*parts):
    """results/<dataset>/<parts...>"""
    return posixpath.join(RESULTS, *parts)


def log_path(name):
    return run_out("logs", f"{name}.log")


def benchmark_path(name):
    return run_out("benchmarks", f"{name}.tsv")


# The opt-in deployable student (export.smk), part of the default target with export.enabled.
EXPORTED_STUDENT = out("student", {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}[config["export"]["format"]])


# Source pretraining (source.smk) runs when the models start from it (model.pretrained: source).
USES_SOURCE = config["model"]["pretrained"] == "source"
SOURCE_CONFIG = source_config(config)


def source_weights_input(wildcards):
    """Training rules' extra input: the source-pretrained weights, when the run's models start from them."""
    if run_config(wildcards)["model"]["pretrained"] != "source":
        return {}
    return {"source_weights": upstream("pretrain_source", "source", "model.pth")(wildcards)}


def evaluated_models():
    """The models the evaluate rule scores and the summary tabulates, in table order (the
    supervised reference, trained with the true labels, last when asked for)."""
    return list(MODELS) + (["supervised"] if config["supervised_reference"] else [])


def summarised_models():
    """The models of the summary's rows: the evaluated ones, or without a labelled split the
    trained ones (their epochs and training time, no metric)."""
    return evaluated_models() if LABELLED else list(MODELS)


# Report categories and subcategories: the report lists them alphabetically, hence the numbers
# (summary first, training before evaluation, teacher before student).
REPORT_SUMMARY = "1. Summary"
REPORT_TRAINING = "2. Training"
REPORT_EVALUATION = "3. Evaluation"
REPORT_ABLATION = "4. Ablation and sweeps"
REPORT_MODEL_ORDER = ("teacher", "student", "supervised", "source")


def model_subcategory(model):
    """'1. teacher', '2. student', ...: the report's subcategory of a model's files."""
    order = list(dict.fromkeys([*evaluated_models(), *REPORT_MODEL_ORDER]))
    position = order.index(model) + 1 if model in order else len(order) + 1
    return f"{position}. {model}"


def report_category(category):
    """A run's files in `category`; a variant's in the ablation category."""
    return lambda wildcards: category if run_of(wildcards) == BASE_RUN else REPORT_ABLATION


def report_subcategory(model):
    """A run's files by model ('1. teacher', ...); a variant's by variant ('variant camera_centre')."""

    def subcategory(wildcards):
        if run_of(wildcards) != BASE_RUN:
            return f"variant {run_of(wildcards)}"
        return model_subcategory(wildcards.model if model == "{model}" else model)

    return subcategory


# Drawn by `make rulegraph`, beside the Snakefile whatever --directory is (not built by a rule).
# The summary job finds it beside its script and gets its digest as a param (a redrawn graph
# reruns the job), not its path as an input or param: a report lists a rule's inputs and params,
# and this path says where the checkout is.
RULEGRAPH_SVG = Path(workflow.basedir) / "docs" / "rulegraph.svg"


def rulegraph_digest():
    from purireid.io.files import sha256_file

    return sha256_file(RULEGRAPH_SVG) if RULEGRAPH_SVG.is_file() else "missing"


def summary_outputs():
    return [out(name) for name in ("summary.tsv", "summary.md", "summary.html", "rulegraph.svg")]


def print_summary():
    """The closing table of a run (summary.smk's onsuccess): summary.md, to stderr like
    Snakemake's own messages, when it is at least as new as what it tabulates."""
    table = Path(rules.summary.output.md)
    if not table.is_file():
        return
    tabulated = [*rules.summary.input.get("eval_json", []), *rules.summary.input.log_jsonl]
    sources = [Path(p) for p in tabulated if Path(p).is_file()]
    if any(p.stat().st_mtime > table.stat().st_mtime for p in sources):
        print(f"\n{table} is older than the metrics it tabulates; `snakemake {table}` updates it.",
              file=sys.stderr, flush=True)
        return
    print(f"\n{table.read_text()}", file=sys.stderr, flush=True)


def final_outputs():
    """Every file the workflow promises; the default target."""
    files = [out("data", "manifest.csv"), out("data", "summary.json"), out("teacher", "train_features.h5")]
    for model in MODELS:
        files += [out(model, name) for name in ("model.pth", "log.jsonl", "curve.png")]
        files += [out(model, name) for name in ("pseudo_identities.csv", "pseudo_identities.png")]
        if LABELLED:  # else no query/gallery to score on
            files += [out(model, name) for name in ("eval.json", "cmc.png", "ranked.png")]
    if config["supervised_reference"]:  # the upper bound trained with the true labels
        files += [out("supervised", name) for name in ("model.pth", "log.jsonl", "curve.png", "eval.json")]
    if USES_SOURCE:
        files += [out("source", name) for name in ("model.pth", "log.jsonl", "curve.png")]
    files += summary_outputs()
    return files + ([EXPORTED_STUDENT] if config["export"]["enabled"] else [])


# ---------------------------------------------------------------- params (rerun triggers)

# A rule's `params.config` is exactly the config its job computes from (the stage's keys in the
# stage table, purireid/config/dag.py), plus the recipe list its values came from: the job is
# given these keys and no others, plus the execution-only keys (device, train.gpus, data.workers,
# data.test_batch_size), which change how it runs but not what it computes and so trigger no
# rerun. prepare.workers reaches the prepare job as its thread count.


def params_of(stage):
    """A rule's params.config: the keys of its run's config that `stage` reads."""
    return lambda wildcards: stage_params(run_config(wildcards), stage)


# ---------------------------------------------------------------- resources

# Memory (MB) and runtime (minutes) per job, from the stage table (purireid/config/dag.py): sized
# per dataset, with defaults for a dataset it does not list. A source rule is sized for the
# stage it runs, on the source dataset.


def resources_of(rule):
    return stage_resources(rule, SOURCE_CONFIG["dataset"] if rule in SOURCE_STAGES else DATASET)


def mem_mb(rule):
    return resources_of(rule).mem_mb


def runtime(rule):
    return resources_of(rule).runtime


# GPUs per job: the configured DDP width for training/extraction, one for evaluation,
# none when the config pins the CPU (device: cpu).
ON_GPU = config["device"] != "cpu"
TRAIN_GPUS = config["train"]["gpus"] if ON_GPU else 0
EVAL_GPUS = 1 if ON_GPU else 0

# Threads: the data-loader workers plus the main process, per training process (capped by
# --cores locally).
COMPUTE_THREADS = max(2, config["data"]["workers"] + 1)
TRAIN_THREADS = max(1, TRAIN_GPUS) * COMPUTE_THREADS
PREPARE_THREADS = config["prepare"]["workers"]


# ---------------------------------------------------------------- the training rules' shared shape

# Every training rule (teacher.smk, student.smk, supervised.smk, source.smk) writes the same files
# into <run>/<model>/, keeps its resume state in the undeclared <run>/<model>/state/, and has the
# training resources; it differs only in its inputs and script. Its output, params and resources
# are these (with `**`).


def training_outputs(model):
    """The weights, the jsonl log, the resolved config the job ran with, and the training curve
    (in the report's Training category)."""
    return {
        "model": run_out(model, "model.pth"),
        "log_jsonl": run_out(model, "log.jsonl"),
        "config": run_out(model, "config.yaml"),
        "curve": report(
            run_out(model, "curve.png"),
            caption="../report/curve.rst",
            category=report_category(REPORT_TRAINING),
            subcategory=report_subcategory(model),
            labels={"model": model, "figure": "training curve"},
        ),
    }


def training_params(rule, model, **extra):
    """The keys of the run's config that the rule's stage reads, its resume-state folder, and `extra`."""
    return {"config": params_of(rule), "state_dir": run_out(model, "state"), **extra}


def training_resources(rule):
    return {"mem_mb": mem_mb(rule), "runtime": runtime(rule), "gpu": TRAIN_GPUS}


def config_value(dotted):
    """The configured value of a section.key (the swept key's value in the configured run)."""
    section, _, key = dotted.partition(".")
    return config[section][key]


# ---------------------------------------------------------------- the ablation and sweep tables (ablation.smk)


def variant_rows(variants):
    """The table's rows as the tabulating job reads them: each variant's description and the
    files behind its row, from the runs that own them."""
    rows = []
    for variant in variants:
        scored = f"evaluate_{variant.model}"
        folder = owner_root(variant.name, scored)
        needed = RUNS.jobs_by_stage([(variant.name, scored)])
        training = [f"{RUN_ROOTS[RUNS.owner(variant.name, stage)]}/{model}/log.jsonl"
                    for stage, model in (("pretrain_source", "source"), ("train_teacher", "teacher"),
                                         ("train_student", "student"), ("train_supervised", "supervised"))
                    if stage in needed]
        rows.append({"variant": variant.name, "about": variant.about, "changes": describe_changes(variant.overlay),
                     "model": variant.model, "eval_json": f"{folder}/{variant.model}/eval.json",
                     "model_log": f"{folder}/{variant.model}/log.jsonl", "training_logs": training})
    return rows


def variant_inputs(variants):
    """Every eval.json and log.jsonl behind the rows (each once)."""
    files = []
    for row in variant_rows(variants):
        files += [row["eval_json"], row["model_log"], *row["training_logs"]]
    return list(dict.fromkeys(files))
