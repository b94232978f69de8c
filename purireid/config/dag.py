"""The DAG declared once: per stage, the stages it reads, the config keys that can change its
outputs, the execution-only keys it reads, and its resources; and what each stage's job is given.

Everything else is derived from `STAGES`: `STAGE_KEYS` / `EXECUTION_KEYS` and `stage_params` /
`execution_settings` / `stage_config` (a rule's `params:`, Snakemake's rerun trigger, and the job's
config), `stage_inputs` (which stages two ablation runs share, purireid.config.variants),
`SOURCE_STAGES`, `TRAINED_BY` and the resources of workflow/rules/common.smk. The .smk files keep
their rules (outputs, scripts, report entries); tests/test_config.py checks that the inputs they
name are the ones declared here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from purireid.config.schema import deep_merge, schema_defaults

# Execution-only keys change how a job runs (processes, threads, batch of a no-grad pass, device),
# not what it computes: never a rerun trigger, never recorded as provenance. prepare.workers
# reaches the prepare job as its thread count, not through its config.
ALL_EXECUTION_KEYS = ("device", "train.gpus", "data.workers", "data.test_batch_size", "prepare.workers")
_LOADING = ("device", "train.gpus", "data.workers", "data.test_batch_size")

# Stated in every job's config for provenance (which recipe list the values came from), but not
# what an output depends on: runs that differ only here share their stages (variants.stage_fingerprint).
PROVENANCE_KEYS = ("recipe",)

# Resources per job when a dataset has no entry of its own: sized for Market-1501 on one GPU.
DEFAULT_DATASET = "default"


@dataclass(frozen=True)
class Resources:
    """A job's resources: memory in MB, runtime in minutes (an upper bound for one uninterrupted
    run on one GPU; on SLURM a shorter runtime with retries works too, training resumes)."""

    mem_mb: int
    runtime: int


@dataclass(frozen=True)
class Stage:
    """One stage of the DAG (one rule; `evaluate` scores each trained model).

    inputs: the stages whose outputs it always reads; `reads_source_weights`: also pretrain_source
    when the run starts from it (model.pretrained: source). keys: the keys (a section or
    section.key) that can change its outputs (the job gets these and nothing else, so a key
    missing here fails the job instead of changing an output behind Snakemake's back).
    execution: the execution-only keys it reads. trains: the model folder whose model.pth it
    writes (teacher, student, supervised; None when it trains none that is evaluated).
    runs_on_source: for the source rules, the stage it runs on the source config (`source_config`).
    resources: per dataset, DEFAULT_DATASET for every dataset without an entry.
    """

    name: str
    inputs: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    execution: tuple[str, ...] = ()
    reads_source_weights: bool = False
    trains: str | None = None
    runs_on_source: str | None = None
    resources: Mapping[str, Resources] = field(default_factory=dict)


STAGES: dict[str, Stage] = {s.name: s for s in (
    # The synthetic section joins prepare_dataset's keys when the dataset is synthetic (stage_params).
    Stage("prepare_dataset", keys=("dataset", "data_root", "prepare"),
          resources={DEFAULT_DATASET: Resources(8000, 60), "synthetic": Resources(2000, 15),
                     "msmt17": Resources(16000, 120)}),
    Stage("prepare_source", runs_on_source="prepare_dataset"),
    Stage("pretrain_source", inputs=("prepare_source",), runs_on_source="train_supervised"),
    # evaluate.rerank: the test mAP logged every train.eval_every epochs, which with train.keep_best
    # also picks the weights that become model.pth.
    Stage("train_teacher", inputs=("prepare_dataset",), reads_source_weights=True, trains="teacher",
          keys=("dataset", "data_root", "seed", "data", "model", "cluster", "train", "evaluate.rerank"),
          execution=_LOADING,
          resources={DEFAULT_DATASET: Resources(32000, 720), "synthetic": Resources(4000, 60),
                     "msmt17": Resources(64000, 1440)}),
    Stage("extract_teacher_features", inputs=("prepare_dataset", "train_teacher"),
          keys=("data_root", "data", "train.amp", "train.channels_last"), execution=_LOADING,
          resources={DEFAULT_DATASET: Resources(16000, 30), "synthetic": Resources(3000, 15),
                     "msmt17": Resources(32000, 60)}),
    Stage("train_student", inputs=("prepare_dataset", "train_teacher", "extract_teacher_features"),
          reads_source_weights=True, trains="student",
          keys=("dataset", "data_root", "seed", "data", "model", "cluster", "train", "student", "evaluate.rerank"),
          execution=_LOADING,
          resources={DEFAULT_DATASET: Resources(32000, 900), "synthetic": Resources(4000, 60),
                     "msmt17": Resources(64000, 1800)}),
    # The supervised reference: the teacher's recipe with the true train labels (no clustering).
    Stage("train_supervised", inputs=("prepare_dataset",), reads_source_weights=True, trains="supervised",
          keys=("dataset", "data_root", "seed", "data", "model", "train", "evaluate.rerank"), execution=_LOADING,
          resources={DEFAULT_DATASET: Resources(32000, 720), "synthetic": Resources(4000, 60),
                     "msmt17": Resources(64000, 1440)}),
    # Scores one model: its inputs are the manifest and the trained model (stage_inputs).
    Stage("evaluate", inputs=("prepare_dataset",),
          keys=("dataset", "data_root", "data", "train.amp", "train.channels_last", "evaluate"),
          execution=("device", "data.workers", "data.test_batch_size"),
          resources={DEFAULT_DATASET: Resources(16000, 30), "synthetic": Resources(3000, 15),
                     "msmt17": Resources(48000, 60)}),
    # The final teacher's / student's clustering of the train images (its inputs: the manifest and
    # its summary, the trained model, and for the teacher its extracted features).
    Stage("pseudo_identities", inputs=("prepare_dataset",),
          keys=("dataset", "data_root", "data", "cluster", "train.amp", "train.channels_last"), execution=_LOADING,
          resources={DEFAULT_DATASET: Resources(16000, 60), "synthetic": Resources(3000, 15),
                     "msmt17": Resources(32000, 120)}),
    # export.enabled only decides whether the exported file is a target, not what it holds.
    Stage("export_student", inputs=("train_student",),
          keys=("export.format", "export.views", "export.opset", "export.tolerance"),
          resources={DEFAULT_DATASET: Resources(4000, 15)}),
)}

# The stages run on the configured dataset, and the keys each reads.
STAGE_KEYS: dict[str, tuple[str, ...]] = {s.name: s.keys for s in STAGES.values() if s.runs_on_source is None}
EXECUTION_KEYS: dict[str, tuple[str, ...]] = {s.name: s.execution for s in STAGES.values()
                                              if s.runs_on_source is None}
# Rules that run a stage on the source dataset's config (`source_config`): rule -> stage.
SOURCE_STAGES: dict[str, str] = {s.name: s.runs_on_source for s in STAGES.values() if s.runs_on_source}
# The model an evaluation scores -> the stage that trains it.
TRAINED_BY: dict[str, str] = {s.trains: s.name for s in STAGES.values() if s.trains}


def stage_inputs(config: Mapping[str, Any], stage: str) -> tuple[str, ...]:
    """The stages whose outputs `stage` reads, in `config` (evaluate_<model> for an evaluation)."""
    if stage.startswith("evaluate_"):
        return (*STAGES["evaluate"].inputs, TRAINED_BY[stage.removeprefix("evaluate_")])
    declared = STAGES[stage]
    source = ("pretrain_source",) if declared.reads_source_weights and config["model"]["pretrained"] == "source" \
        else ()
    return (*declared.inputs, *source)


def stage_resources(stage: str, dataset: str) -> Resources:
    """`stage`'s resources on `dataset` (the defaults when the dataset has no entry); a source
    rule's are those of the stage it runs, on the source dataset the caller names."""
    declared = STAGES[SOURCE_STAGES.get(stage, stage)].resources
    return declared.get(dataset, declared[DEFAULT_DATASET])


# --------------------------------------------------------------------------- what a job is given

SOURCE_SYNTHETIC_SEED = 1000


def source_config(config: Mapping[str, Any]) -> dict:
    """The config of the source stages (prepare_source, pretrain_source) of a resolved config: the
    top level with the source section's dataset, data_root and initial weights, its prepare and
    train merged over the top-level ones, and its synthetic merged over the generator's defaults."""
    source = config["source"]
    derived = deep_merge(config, {"dataset": source["dataset"], "data_root": source["data_root"],
                                  "prepare": source["prepare"], "train": source["train"],
                                  "model": {"pretrained": source["pretrained"]}})
    # A synthetic source gets its own seed (other identities and cameras than the target's).
    derived["synthetic"] = deep_merge(schema_defaults("synthetic") | {"seed": SOURCE_SYNTHETIC_SEED},
                                      source["synthetic"])
    return derived


def _select(config: Mapping[str, Any], keys: tuple[str, ...] | list[str]) -> dict:
    picked: dict[str, Any] = {}
    for key in keys:
        section, _, name = key.partition(".")
        if name:
            picked.setdefault(section, {})[name] = copy.deepcopy(config[section][name])
        else:
            picked[section] = copy.deepcopy(config[section])
    return picked


def without_execution_keys(config: Mapping[str, Any]) -> dict:
    """`config` less every execution-only key (what provenance records: outputs do not depend on them)."""
    stripped = copy.deepcopy(dict(config))
    for key in ALL_EXECUTION_KEYS:
        section, _, name = key.partition(".")
        if name and isinstance(stripped.get(section), dict):
            stripped[section].pop(name, None)
        elif not name:
            stripped.pop(section, None)
    return stripped


def stage_params(config: Mapping[str, Any], stage: str) -> dict:
    """What `stage`'s outputs can depend on in a resolved config, key-sorted (a rule's params):
    its keys less the execution-only ones, plus the recipe list the values came from."""
    if stage in SOURCE_STAGES:
        return stage_params(source_config(config), SOURCE_STAGES[stage])
    keys = [*STAGE_KEYS[stage], *(k for k in PROVENANCE_KEYS if k in config)]
    if stage == "prepare_dataset" and config["dataset"] == "synthetic":
        keys.append("synthetic")
    return json.loads(json.dumps(without_execution_keys(_select(config, keys)), sort_keys=True))


def execution_settings(config: Mapping[str, Any], stage: str) -> dict:
    """The execution-only keys `stage`'s job reads (device, processes, loader workers)."""
    return _select(config, EXECUTION_KEYS[SOURCE_STAGES.get(stage, stage)])


def stage_config(config: Mapping[str, Any], stage: str) -> dict:
    """Exactly the config `stage`'s job runs with: its params plus its execution-only keys."""
    return deep_merge(stage_params(config, stage), execution_settings(config, stage))
