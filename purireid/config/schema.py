"""The config's vocabulary, shared by every config module: `ConfigError`, the schema file and its
defaults, and nested mappings (merging, dotted keys).

The schema (config/schemas/config.schema.yaml) is the single list of keys; its defaults are the
paper's Market-1501 settings (docs/method.md, Hyperparameters). Nothing here validates a run: that is
`purireid.config.resolve.resolve_config`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from importlib import resources
from typing import Any

import yaml

from purireid.config.datasets import DATASET_KINDS, labelled_source_names
from purireid.labels.methods import METHOD_NAMES
from purireid.model.backbones import ARCHS

SCHEMA_RESOURCE = "config/schemas/config.schema.yaml"

# A dotted key's value when no mapping along the way holds it.
MISSING = object()


class ConfigError(ValueError):
    """A configuration value is missing, mistyped or out of range."""


@functools.lru_cache(maxsize=1)
def _parsed_schema() -> dict:
    # Parsed once per process: a workflow resolves one config per variant.
    schema = yaml.safe_load(resources.files("purireid").joinpath(SCHEMA_RESOURCE).read_text())
    # The registries' names are the choices (one place to add a backbone, a pseudo-label method or
    # a dataset); a source pretraining needs identities, so only the kinds whose train split has them.
    properties = schema["properties"]
    properties["model"]["properties"]["arch"]["enum"] = list(ARCHS)
    properties["cluster"]["properties"]["method"]["enum"] = list(METHOD_NAMES)
    properties["dataset"]["enum"] = list(DATASET_KINDS)
    properties["source"]["properties"]["dataset"]["enum"] = labelled_source_names()
    return schema


def load_schema() -> dict:
    """The config schema (a fresh copy: callers may fill it in)."""
    return copy.deepcopy(_parsed_schema())


def schema_defaults(section: str) -> dict:
    """The schema's default of every key of `section` (e.g. the synthetic generator's parameters)."""
    properties = _parsed_schema()["properties"][section]["properties"]
    return {name: copy.deepcopy(spec["default"]) for name, spec in properties.items() if "default" in spec}


def key_schema(dotted: str) -> dict | None:
    """The schema of a top-level key or a `section.key` (None when the schema has no such key)."""
    section, _, name = dotted.partition(".")
    spec = _parsed_schema()["properties"].get(section)
    if spec is None or not name:
        return spec
    return spec.get("properties", {}).get(name)


def schema_default(dotted: str) -> Any:
    """The schema's default of a top-level key or a `section.key` (MISSING when it has none)."""
    spec = key_schema(dotted)
    return copy.deepcopy(spec["default"]) if spec is not None and "default" in spec else MISSING


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict:
    """Merge `override` into a copy of `base`, recursing into nested mappings."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def flatten(overlay: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'cluster': {'k1': 10}} -> {'cluster.k1': 10}."""
    flat: dict[str, Any] = {}
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def unflatten(dotted: str, value: Any) -> dict[str, Any]:
    """'cluster.k1', 10 -> {'cluster': {'k1': 10}}."""
    nested: Any = value
    for part in reversed(dotted.split(".")):
        nested = {part: nested}
    return nested


def dotted_get(config: Mapping[str, Any], dotted: str) -> Any:
    """config['cluster']['k1'] for 'cluster.k1' (MISSING when a mapping along the way lacks it)."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return MISSING
        value = value[part]
    return value
