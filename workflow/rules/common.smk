# Config validation, path helpers, report categories, the closing table, per-rule params and per-dataset resources.

import sys

from snakemake.exceptions import WorkflowError

from purireid.config import ConfigError, resolve_config, source_config, stage_params


# The one validation of a run, before any job: against purireid/schemas/config.schema.yaml
# (workflow/schemas/ links to it) plus the cross-key constraints a JSON schema cannot express,
# naming the offending key (e.g. 'train.batch_size'). Every default is filled in in place.
try:
    config.update(resolve_config(config))
except ConfigError as err:
    raise WorkflowError(str(err)) from None


DATASET = config["dataset"]
RESULTS = f"{config['results_dir']}/{DATASET}"
MODELS = ("teacher", "student")


wildcard_constraints:
    model="teacher|student|supervised",


# ---------------------------------------------------------------- paths (the public contract)


def out(*parts):
    """results/<dataset>/<parts...>"""
    return "/".join((RESULTS,) + parts)


def log_path(name):
    return out("logs", f"{name}.log")


def benchmark_path(name):
    return out("benchmarks", f"{name}.tsv")


# The opt-in deployable student (export.smk), part of the default target with export.enabled.
EXPORTED_STUDENT = out("student", {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}[config["export"]["format"]])


# Source pretraining (source.smk) runs when the models start from it (model.pretrained: source).
USES_SOURCE = config["model"]["pretrained"] == "source"
SOURCE_CONFIG = source_config(config)


def source_weights_input(wildcards):
    """Training rules' extra input: the source-pretrained weights, when the models start from them."""
    return {"source_weights": out("source", "model.pth")} if USES_SOURCE else {}


def evaluated_models():
    """The models the evaluate rule scores and the summary tabulates, in table order (the
    supervised reference, trained with the true labels, last when asked for)."""
    return list(MODELS) + (["supervised"] if config["supervised_reference"] else [])


# Report categories and subcategories: the report lists them alphabetically, hence the numbers
# (summary first, training before evaluation, teacher before student).
REPORT_SUMMARY = "1. Summary"
REPORT_TRAINING = "2. Training"
REPORT_EVALUATION = "3. Evaluation"
REPORT_MODEL_ORDER = ("teacher", "student", "supervised", "source")


def model_subcategory(model):
    """'1. teacher', '2. student', ...: the report's subcategory of a model's files."""
    order = list(dict.fromkeys([*evaluated_models(), *REPORT_MODEL_ORDER]))
    position = order.index(model) + 1 if model in order else len(order) + 1
    return f"{position}. {model}"


def summary_outputs():
    return [out(name) for name in ("summary.tsv", "summary.md", "summary.html")]


def print_summary():
    """The closing table of a run (summary.smk's onsuccess): summary.md, to stderr like
    Snakemake's own messages, when it is at least as new as what it tabulates."""
    table = Path(rules.summary.output.md)
    if not table.is_file():
        return
    sources = [Path(p) for p in rules.summary.input if Path(p).is_file()]
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
        files += [out(model, name) for name in ("eval.json", "cmc.png", "ranked.png")]
    if config["supervised_reference"]:  # the upper bound trained with the true labels
        files += [out("supervised", name) for name in ("model.pth", "log.jsonl", "curve.png", "eval.json")]
    if USES_SOURCE:
        files += [out("source", name) for name in ("model.pth", "log.jsonl", "curve.png")]
    files += summary_outputs()
    return files + ([EXPORTED_STUDENT] if config["export"]["enabled"] else [])


# ---------------------------------------------------------------- params (rerun triggers)

# A rule's `params.config` is exactly the config its job computes from (purireid.config.STAGE_KEYS):
# the job is given these keys and no others, plus the execution-only keys (device, train.gpus,
# data.workers, data.test_batch_size), which change how it runs but not what it computes and
# so trigger no rerun. prepare.workers reaches the prepare job as its thread count.


def params_of(stage):
    return stage_params(config, stage)


# ---------------------------------------------------------------- resources

# Sized per dataset (mem_mb in MB, runtime in minutes per job). Training runtimes are upper
# bounds for one uninterrupted run on one GPU; on SLURM a shorter runtime with retries works
# too, since training resumes from the last epoch (docs/slurm.md).
_MARKET_SIZED = {
    "prepare_dataset": dict(mem_mb=8000, runtime=60),
    "train_teacher": dict(mem_mb=32000, runtime=720),
    "extract_teacher_features": dict(mem_mb=16000, runtime=30),
    "train_student": dict(mem_mb=32000, runtime=900),
    "evaluate": dict(mem_mb=16000, runtime=30),
}
RESOURCES = {
    "synthetic": {
        "prepare_dataset": dict(mem_mb=2000, runtime=15),
        "train_teacher": dict(mem_mb=4000, runtime=60),
        "extract_teacher_features": dict(mem_mb=3000, runtime=15),
        "train_student": dict(mem_mb=4000, runtime=60),
        "evaluate": dict(mem_mb=3000, runtime=15),
    },
    "market1501": _MARKET_SIZED,
    "dukemtmcreid": _MARKET_SIZED,
    "folder": _MARKET_SIZED,
    "msmt17": {
        "prepare_dataset": dict(mem_mb=16000, runtime=120),
        "train_teacher": dict(mem_mb=64000, runtime=1440),
        "extract_teacher_features": dict(mem_mb=32000, runtime=60),
        "train_student": dict(mem_mb=64000, runtime=1800),
        "evaluate": dict(mem_mb=48000, runtime=60),
    },
}


def source_resources(rule):
    """Resources of a source stage: those of the same stage on the source dataset."""
    return RESOURCES[SOURCE_CONFIG["dataset"]][rule]


def mem_mb(rule):
    return RESOURCES[DATASET][rule]["mem_mb"]


def runtime(rule):
    return RESOURCES[DATASET][rule]["runtime"]


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
