"""Configuration: validation against the JSON schema, defaults, merging, and which keys each stage reads.

`resolve_config` is the one check of a run: the workflow calls it once, before any job, and
refuses every value a job would reject, naming the key. `STAGE_KEYS` says which keys can
change each stage's outputs: the workflow hands a job exactly those (its rule's `params:`,
Snakemake's rerun trigger) plus the execution-only keys of `EXECUTION_KEYS`.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import yaml

SCHEMA_RESOURCE = "config/schemas/config.schema.yaml"


class ConfigError(ValueError):
    """A configuration value is missing, mistyped or out of range."""


@functools.lru_cache(maxsize=1)
def _parsed_schema() -> dict:
    # Parsed once per process: a workflow resolves one config per variant.
    schema = yaml.safe_load(resources.files("purireid").joinpath(SCHEMA_RESOURCE).read_text())
    # model.arch's choices are the backbone registry's names (one place to add a backbone).
    from purireid.model.backbones import ARCHS

    schema["properties"]["model"]["properties"]["arch"]["enum"] = list(ARCHS)
    return schema


def load_schema() -> dict:
    """The config schema (a fresh copy: callers may fill it in)."""
    return copy.deepcopy(_parsed_schema())


def _validator_class():
    """Draft 7, filling in `default` values of object properties while it validates, and with
    'integer' meaning a YAML integer: jsonschema counts 2.0 as an integer, which then fails
    in range() deep inside a job."""
    base = jsonschema.Draft7Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    type_checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    return jsonschema.validators.extend(base, {"properties": set_defaults}, type_checker=type_checker)


def schema_defaults(section: str) -> dict:
    """The schema's default of every key of `section` (e.g. the synthetic generator's parameters)."""
    properties = load_schema()["properties"][section]["properties"]
    return {name: copy.deepcopy(spec["default"]) for name, spec in properties.items() if "default" in spec}


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict:
    """Merge `override` into a copy of `base`, recursing into nested mappings."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _schema_message(err: jsonschema.ValidationError) -> str:
    types = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
    if err.validator == "type" and "integer" in types and isinstance(err.instance, float) \
            and err.instance.is_integer():
        return f"{err.message}: write a whole number without a decimal point ({int(err.instance)})"
    if err.validator == "type" and "boolean" in types and isinstance(err.instance, str) \
            and err.instance.lower() in ("true", "false"):
        # Snakemake's --config reads only True / False as booleans; 'true' stays text.
        return f"{err.message}: on the command line write --config key={err.instance.capitalize()}"
    return err.message


def _check_cross_keys(resolved: Mapping[str, Any]) -> None:
    """Constraints between keys that a JSON schema cannot express (each one a job would hit)."""
    train = resolved["train"]
    if train["batch_size"] % train["num_instances"] != 0:
        raise ConfigError(
            f"config key 'train.batch_size' ({train['batch_size']}) must be a multiple of "
            f"'train.num_instances' ({train['num_instances']})"
        )
    bn_groups, gpus = resolved["model"]["bn_groups"], train["gpus"]
    if bn_groups > 1 and bn_groups % gpus != 0:
        raise ConfigError(
            f"config key 'model.bn_groups' ({bn_groups}) must be a multiple of 'train.gpus' ({gpus}): "
            "each process normalises bn_groups / gpus groups of its share of the batch"
        )
    if train["batch_size"] % max(bn_groups, gpus) != 0:
        raise ConfigError(
            f"config key 'train.batch_size' ({train['batch_size']}) must be divisible by "
            f"max(model.bn_groups, train.gpus) = {max(bn_groups, gpus)}"
        )
    cluster = resolved["cluster"]
    # Pairs that are no neighbours in any view have fused distance (1 - 2 l1) + l1 + l1, summed
    # in float32 as the clustering does; DBSCAN's eps must stay below it (else every image is
    # every other's neighbour and the sparse distance matrix is meaningless).
    lambda1 = cluster["lambda1"]
    unrelated = np.float32(1 - 2 * lambda1) + np.float32(lambda1) + np.float32(lambda1)
    if cluster["eps"] >= unrelated:
        raise ConfigError(
            f"config key 'cluster.eps' ({cluster['eps']}) must be below {float(unrelated):g}, the fused "
            "Jaccard distance of two unrelated images (the paper uses 0.6 for Market-1501, 0.7 for MSMT17)"
        )


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


def _check_source(resolved: Mapping[str, Any]) -> None:
    """The source stages' config is valid too (checked only when the source is used)."""
    if resolved["source"]["pretrained"] == "source":
        raise ConfigError("config key 'source.pretrained' cannot be 'source'; use imagenet, none or a weights path")
    def source_key(match: re.Match) -> str:
        key = match.group(1)
        key = "pretrained" if key == "model.pretrained" else key
        under_source = key.split(".")[0] in ("dataset", "data_root", "pretrained", "prepare", "synthetic", "train")
        return f"config key '{'source.' + key if under_source else key}'"

    try:
        resolve_config(source_config(resolved))
    except ConfigError as err:
        message = re.sub(r"config key '([^']+)'", source_key, str(err))
        raise ConfigError(f"source pretraining (model.pretrained: source): {message}") from None


def resolve_config(config: Mapping[str, Any] | None = None) -> dict:
    """Validate `config` and return a new dict with every default filled in.

    Raises ConfigError naming the offending key (e.g. ``train.batch_size``) and the fix.
    """
    resolved = copy.deepcopy(dict(config or {}))
    validator = _validator_class()(load_schema())
    errors = sorted(validator.iter_errors(resolved), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            lines.append(f"  config key '{key}': {_schema_message(err)}")
        raise ConfigError(
            "invalid configuration:\n" + "\n".join(lines)
            + "\nFix these keys in config.yaml or in the file given with --configfile "
            "(the schema with every key and its default is purireid/config/schemas/config.schema.yaml)."
        )
    _check_cross_keys(resolved)
    if resolved["model"]["pretrained"] == "source":
        _check_source(resolved)
    return resolved


def load_config(*paths: str | Path, overrides: Mapping[str, Any] | None = None) -> dict:
    """Read YAML files in order (later ones merge over earlier ones), apply overrides, resolve."""
    merged: dict = {}
    for path in paths:
        with open(path) as handle:
            merged = deep_merge(merged, yaml.safe_load(handle) or {})
    return resolve_config(deep_merge(merged, overrides or {}))


# --------------------------------------------------------------------------- what each stage reads

# Keys (a section, or section.key) whose value can change a stage's outputs. A stage's job is
# given these and nothing else (plus its EXECUTION_KEYS), so a key missing here fails the job
# (KeyError) instead of changing an output behind Snakemake's back. The synthetic section
# joins prepare_dataset's keys when dataset is synthetic (see `stage_params`).
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "prepare_dataset": ("dataset", "data_root", "prepare"),
    # evaluate.rerank: the test mAP logged every train.eval_every epochs, which with
    # train.keep_best also picks the weights that become model.pth.
    "train_teacher": ("dataset", "data_root", "seed", "data", "model", "cluster", "train", "evaluate.rerank"),
    "extract_teacher_features": ("data_root", "data", "train.amp", "train.channels_last"),
    "train_student": ("dataset", "data_root", "seed", "data", "model", "cluster", "train", "student",
                      "evaluate.rerank"),
    "evaluate": ("dataset", "data_root", "data", "train.amp", "train.channels_last", "evaluate"),
    # export.enabled only decides whether the exported file is a target, not what it holds.
    "export_student": ("export.format", "export.views", "export.opset", "export.tolerance"),
    # The supervised reference: the teacher's recipe with the true train labels (no clustering).
    "train_supervised": ("dataset", "data_root", "seed", "data", "model", "train", "evaluate.rerank"),
}

# Rules that run a stage on the source dataset's config (`source_config`): rule -> stage.
SOURCE_STAGES = {"prepare_source": "prepare_dataset", "pretrain_source": "train_supervised"}

# Keys that change how a job runs (processes, threads, batch of a no-grad pass, device) but not
# what it computes: never a rerun trigger. prepare.workers reaches the job as its thread count.
ALL_EXECUTION_KEYS = ("device", "train.gpus", "data.workers", "data.test_batch_size", "prepare.workers")
EXECUTION_KEYS: dict[str, tuple[str, ...]] = {
    "prepare_dataset": (),
    "train_teacher": ("device", "train.gpus", "data.workers", "data.test_batch_size"),
    "extract_teacher_features": ("device", "train.gpus", "data.workers", "data.test_batch_size"),
    "train_student": ("device", "train.gpus", "data.workers", "data.test_batch_size"),
    "evaluate": ("device", "data.workers", "data.test_batch_size"),
    "train_supervised": ("device", "train.gpus", "data.workers", "data.test_batch_size"),
    "export_student": (),
}


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
    """The keys of a resolved config that can change `stage`'s outputs, key-sorted (a rule's params)."""
    if stage in SOURCE_STAGES:
        return stage_params(source_config(config), SOURCE_STAGES[stage])
    keys = list(STAGE_KEYS[stage])
    if stage == "prepare_dataset" and config["dataset"] == "synthetic":
        keys.append("synthetic")
    return json.loads(json.dumps(without_execution_keys(_select(config, keys)), sort_keys=True))


def execution_settings(config: Mapping[str, Any], stage: str) -> dict:
    """The execution-only keys `stage`'s job reads (device, processes, loader workers)."""
    return _select(config, EXECUTION_KEYS[SOURCE_STAGES.get(stage, stage)])


def stage_config(config: Mapping[str, Any], stage: str) -> dict:
    """Exactly the config `stage`'s job runs with: its params plus its execution-only keys."""
    return deep_merge(stage_params(config, stage), execution_settings(config, stage))
