# Config validation, path helpers, per-rule params and per-dataset resources.

import json

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from purireid.config import ConfigError, resolve_config


# purireid's own check first: its message names the offending key (e.g. 'train.batch_size')
# and it also checks the cross-key constraints a JSON schema cannot express.
try:
    resolve_config(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

# Then Snakemake's validation against the same schema, which fills in every default in place,
# so the params below see complete sections.
validate(config, "../schemas/config.schema.yaml", set_default=True)


DATASET = config["dataset"]
RESULTS = f"{config['results_dir']}/{DATASET}"
MODELS = ("teacher", "student")


wildcard_constraints:
    model="teacher|student",


# ---------------------------------------------------------------- paths (the public contract)


def out(*parts):
    """results/<dataset>/<parts...>"""
    return "/".join((RESULTS,) + parts)


def log_path(name):
    return out("logs", f"{name}.log")


def benchmark_path(name):
    return out("benchmarks", f"{name}.tsv")


def final_outputs():
    """Every file the workflow promises; the default target."""
    files = [out("data", "manifest.csv"), out("data", "summary.json"), out("teacher", "train_features.h5")]
    for model in MODELS:
        files += [out(model, name) for name in ("model.pth", "log.jsonl", "curve.png")]
        files += [out(model, name) for name in ("eval.json", "cmc.png", "ranked.png")]
    return files


# ---------------------------------------------------------------- params (rerun triggers)


def canonical(obj):
    """Key-sorted copy, so the stored params do not depend on the key order of the YAML files."""
    return json.loads(json.dumps(obj, sort_keys=True))


# Keys that change how a job runs but not what it computes: changing them reruns nothing.
EXECUTION_ONLY = {"train": ("gpus",), "data": ("workers", "test_batch_size"), "prepare": ("workers",)}


def sections(*names):
    """The named config sections (execution-only keys dropped), for a rule's `params:`."""
    picked = {}
    for name in names:
        value = config[name]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in EXECUTION_ONLY.get(name, ())}
        picked[name] = value
    return canonical(picked)


def prepare_params():
    names = ["dataset", "data_root", "prepare"]
    if DATASET == "synthetic":
        names.append("synthetic")
    return sections(*names)


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
