"""Checking config files as the workflow merges them, naming the file (or the command line) that
set each key at fault: `purireid config` and the workflow's own config errors.

A run's config is layers merged in order, later ones key by key over earlier ones: config.yaml
beside the Snakefile, each --configfile, then --config KEY=VALUE. Each layer is read and checked
on its own first (YAML syntax with file and line, unknown keys with the nearest valid one,
retired keys), then their merge is resolved (types, ranges, cross-key constraints, the ablation
variants and sweeps), each problem named with the last layer that set its key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from purireid.config.resolve import RENAMED_KEYS, resolve_config
from purireid.config.schema import MISSING, ConfigError, deep_merge, dotted_get, flatten, load_schema
from purireid.config.variants import Runs, ablation_variants, run_configs, sweeps

COMMAND_LINE = "the command line (--config)"
DEFAULTS = "the recipes and defaults"
_KEY_IN_MESSAGE = re.compile(r"config key '([^']+)'")


@dataclass(frozen=True)
class Layer:
    """One source of config keys: `name` says where they were written (a file, the command line)."""

    name: str
    values: dict


def read_layer(path: str | Path, name: str | None = None) -> Layer:
    """A config file as a Layer; ConfigError naming the file (and line) when it is missing,
    unreadable, not YAML, or not a mapping of keys."""
    name = name or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: holds a {type(values).__name__}, not a mapping of config keys (key: value)")
    return Layer(name, values)


def _hint(key: str, choices: Sequence[str], prefix: str) -> str:
    """'; did you mean ...' for an unknown `key` beside `choices` (the valid keys where it sits)."""
    sections = {section: spec.get("properties", {}) for section, spec in load_schema()["properties"].items()}
    section, _, name = key.partition(".")
    if not prefix and name in sections.get(section, {}):  # 'train.epochs: 3' written as one key
        return f"; a dotted key is written nested ({section}: then {name}: on the next line, indented)"
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    if prefix:
        return ""
    homes = [f"{section}.{key}" for section, names in sections.items() if key in names]
    return f"; did you mean '{homes[0]}'?" if homes else ""


def unknown_keys(values: Any, schema: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, hint naming the nearest valid key, or "") for each key of `values` the schema
    does not know."""
    if not isinstance(values, Mapping):
        return []
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    found: list[tuple[str, str]] = []
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key in properties:
            found += unknown_keys(value, properties[key], dotted + ".")
        elif isinstance(extra, Mapping):
            found += unknown_keys(value, extra, dotted + ".")
        elif extra is False:
            found.append((dotted, _hint(str(key), properties, prefix)))
    return found


def layer_problems(layer: Layer) -> tuple[list[str], list[str]]:
    """What is wrong with one layer on its own, retired keys and unknown ones: (one line per
    problem, the keys at fault)."""
    problems, keys = [], []
    retired = {prefix + old for old in RENAMED_KEYS for prefix in ("", "source.")}  # source.train merges over train
    for old in sorted(retired):
        if dotted_get(layer.values, old) is not MISSING:
            new, why = RENAMED_KEYS[old.removeprefix("source.")]
            new = old.replace(old.removeprefix("source."), new)
            problems.append(f"{layer.name}: config key '{old}' is now '{new}' ({why}): rename it")
            keys.append(old)
    for key, hint in unknown_keys(layer.values, load_schema()):
        if key not in retired:
            problems.append(f"{layer.name}: config key '{key}' is not a config key{hint}")
            keys.append(key)
    return problems, keys


def _without(values: Mapping[str, Any], dotted: str) -> dict:
    """`values` less the key `dotted` (a copy)."""
    head, _, rest = dotted.partition(".")
    kept = dict(values)
    if dotted in kept or head not in kept:  # a key written with dots ('train.lr: 1') is one key
        kept.pop(dotted, None)
    elif isinstance(kept[head], Mapping):
        kept[head] = _without(kept[head], rest)
    return kept


def origin(layers: Sequence[Layer], dotted: str) -> str:
    """The name of the last layer that sets `dotted`, a key above it or one below it."""
    for layer in reversed(layers):
        flat = flatten(layer.values)
        if any(k == dotted or k.startswith(dotted + ".") or dotted.startswith(k + ".") for k in flat):
            return layer.name
    return DEFAULTS


def _attributed(err: ConfigError, layers: Sequence[Layer]) -> list[str]:
    """One line per key at fault in `err`, each named with the layer that set it."""
    lines = [line.strip() for line in str(err).splitlines() if _KEY_IN_MESSAGE.search(line)]
    if not lines:
        return [str(err)]
    return [f"{origin(layers, _KEY_IN_MESSAGE.search(line).group(1))}: {line}" for line in lines]


def check_layers(layers: Sequence[Layer]) -> tuple[dict | None, list[str]]:
    """(the resolved config, []) when the merged layers make a valid run, else (None, one line per
    problem). Checks what the workflow checks before any job: every key, and every variant."""
    problems: list[str] = []
    merged: dict = {}
    for layer in layers:
        found, keys = layer_problems(layer)
        problems += found
        values = layer.values
        for key in keys:  # left out, so that the other keys are still checked
            values = _without(values, key)
        merged = deep_merge(merged, values)
    try:
        resolved = resolve_config(merged)
        Runs(run_configs(resolved))
        ablation_variants(resolved)
        list(sweeps(resolved))
    except ConfigError as err:
        return None, problems + _attributed(err, layers)
    return (None, problems) if problems else (resolved, [])


def parse_command_line(entries: Sequence[str]) -> Layer:
    """`--config KEY=VALUE ...` as Snakemake reads it: top-level keys only; a value is an int, a
    float, True / False, else YAML read with the base loader (nested values stay text), else text."""
    values: dict = {}
    for entry in entries:
        key, sep, text = entry.partition("=")
        if not sep:
            raise ConfigError(f"{COMMAND_LINE}: '{entry}' is not KEY=VALUE")
        if not re.fullmatch(r"[a-zA-Z_][\w-]*\w|[a-zA-Z_]", key):
            hint = (f"; --config takes top-level keys only: put {key.split('.', 1)[1]} under {key.split('.', 1)[0]}: "
                    "in a --configfile") if "." in key else ""
            raise ConfigError(f"{COMMAND_LINE}: '{key}' is not a top-level key name{hint}")
        values[key] = _command_line_value(text)
    return Layer(COMMAND_LINE, values)


def _command_line_value(text: str) -> Any:
    if text == "":
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    if text in ("True", "False"):
        return text == "True"
    try:
        return yaml.load(text, Loader=yaml.BaseLoader)  # noqa: S506 - the base loader builds only text, lists, maps
    except yaml.YAMLError:
        return text
