"""Configuration: one check of a run, filling in the defaults and the chosen recipes.

`resolve_config` is the one check of a run: the workflow calls it once, before any job, and
refuses every value a job would reject, naming the key. The schema's defaults are the paper's
settings; the top-level key `recipe` names recipes or parts (purireid.config.recipes) applied
over them and under the keys the config sets itself. Which keys each stage's job is given is
purireid.config.dag; the names it exports are re-exported here, the config's one front door.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from purireid.config.dag import (  # noqa: F401 - the config API, re-exported
    ALL_EXECUTION_KEYS, EXECUTION_KEYS, SOURCE_STAGES, STAGE_KEYS, execution_settings, source_config, stage_config,
    stage_params, without_execution_keys,
)
from purireid.config.datasets import DATASET_KINDS, has_labelled_split
from purireid.config.recipes import recipe_names, recipe_overlay
from purireid.config.schema import (  # noqa: F401 - the config API, re-exported
    MISSING, ConfigError, deep_merge, dotted_get, load_schema, schema_default, schema_defaults,
)
from purireid.labels.methods import config_problems

# Keys that were renamed: old -> (new, why). The old name is refused, naming the new one.
RENAMED_KEYS = {
    "train.momentum": ("train.memory_momentum", "the cluster memories' update momentum; the optimiser is Adam"),
}


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
    problems = config_problems(resolved)  # the checks of cluster.method's own (purireid.labels.methods)
    if problems:
        raise ConfigError(problems[0])


def _check_dataset_kind(resolved: Mapping[str, Any]) -> None:
    """What needs the train images' identities is refused for a dataset kind without them (crops)."""
    name = resolved["dataset"]
    if DATASET_KINDS[name].train_identities:
        return
    if resolved["supervised_reference"]:
        raise ConfigError(
            f"config key 'supervised_reference' must be false for dataset '{name}': the supervised reference "
            f"trains with the true identities of the train images, and '{name}' has none")


def check_labelled_split(resolved: Mapping[str, Any]) -> bool:
    """Whether the run evaluates (the dataset has a labelled query/gallery split, decided from the
    registry or, for crops, from its folder: purireid.config.datasets.has_labelled_split); without
    one, refuses what needs test mAP (train.keep_best). train.eval_every is then unused."""
    labelled = has_labelled_split(resolved)
    if not labelled and resolved["train"]["keep_best"]:
        raise ConfigError(
            f"config key 'train.keep_best' must be false: dataset '{resolved['dataset']}' has no labelled "
            f"query/gallery split to pick the best epoch by (add query/ and gallery/ beside train/ to evaluate)")
    return labelled


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


def _refuse_renamed(config: Mapping[str, Any]) -> None:
    for old, (new, why) in RENAMED_KEYS.items():
        for prefix in ("", "source."):  # source.train merges over train
            if dotted_get(config, prefix + old) is not MISSING:
                raise ConfigError(f"config key '{prefix}{old}' is now '{prefix}{new}' ({why}): rename it")


def apply_recipes(config: Mapping[str, Any]) -> dict:
    """`config` merged over the settings of its recipe list, which merge over the schema's sweeps:
    the config's own keys win. The recipe list is checked (ConfigError naming the key)."""
    names = recipe_names(config.get("recipe", schema_default("recipe")))
    # The schema's sweeps are a layer too, so a config naming one sweep keeps the others.
    layers = deep_merge({"sweeps": schema_default("sweeps")}, recipe_overlay(names))
    return deep_merge(layers, config) | {"recipe": names}


def resolve_config(config: Mapping[str, Any] | None = None) -> dict:
    """Validate `config` and return a new dict with its recipes applied and every default filled in.

    Raises ConfigError naming the offending key (e.g. ``train.batch_size``) and the fix.
    Resolving a resolved config returns it unchanged (every key is then the config's own).
    """
    _refuse_renamed(config or {})
    resolved = apply_recipes(config or {})
    validator = _validator_class()(load_schema())
    errors = sorted(validator.iter_errors(resolved), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            lines.append(f"  config key '{key}': {_schema_message(err)}")
        raise ConfigError(
            "invalid configuration:\n" + "\n".join(lines)
            + "\nEvery key and its default: purireid/config/schemas/config.schema.yaml; `purireid config FILE...` "
            "names the file that set each key at fault."
        )
    _check_cross_keys(resolved)
    _check_dataset_kind(resolved)
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
