"""Configuration: validation against the JSON schema, defaults, merging, the resolved-config file."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_RESOURCE = "schemas/config.schema.yaml"


class ConfigError(ValueError):
    """A configuration value is missing, mistyped or out of range."""


def load_schema() -> dict:
    text = resources.files("purireid").joinpath(SCHEMA_RESOURCE).read_text()
    return yaml.safe_load(text)


def _with_defaults(validator_class):
    """A validator that fills in `default` values of object properties while it validates."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict:
    """Merge `override` into a copy of `base`, recursing into nested mappings."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_config(config: Mapping[str, Any] | None = None) -> dict:
    """Validate `config` and return a new dict with every default filled in.

    Raises ConfigError naming the offending key (e.g. ``train.batch_size``) and the fix.
    """
    resolved = copy.deepcopy(dict(config or {}))
    validator = _with_defaults(jsonschema.Draft7Validator)(load_schema())
    errors = sorted(validator.iter_errors(resolved), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            lines.append(f"  config key '{key}': {err.message}")
        raise ConfigError(
            "invalid configuration:\n" + "\n".join(lines)
            + "\nFix these keys in config.yaml or in the file given with --configfile "
            "(the schema with every key and its default is purireid/schemas/config.schema.yaml)."
        )
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
    return resolved


def load_config(*paths: str | Path, overrides: Mapping[str, Any] | None = None) -> dict:
    """Read YAML files in order (later ones merge over earlier ones), apply overrides, resolve."""
    merged: dict = {}
    for path in paths:
        with open(path) as handle:
            merged = deep_merge(merged, yaml.safe_load(handle) or {})
    return resolve_config(deep_merge(merged, overrides or {}))
