"""Variants of a run: the paper's ablation rows, the recipe parts' rows and parameter sweeps as
named config overlays, and which stages two variants share.

A *run* is a resolved config whose outputs live under one folder: the configured run
(`BASE_RUN`, under results/<dataset>/) and one per variant (results/<dataset>/variants/<name>/).
A variant is an overlay merged over the configured config, plus the model whose evaluation is
its row of the table. The rows of the recipe parts are not listed here but derived from the
registry (purireid.config.recipes): `without_<part>` is the configured run without a part of its
recipe, `with_<part>` the run with one added (a recipe's name stands for all its parts), and
`without_each_part` is one such row per ablatable part of the configured recipe. Two runs share
a stage when the stage's params and everything upstream of it are equal (`stage_fingerprint`):
the workflow then points both at the first run's files, so a variant that changes only the
student reuses the configured teacher and its features.

Pure functions, no file I/O: workflow/rules/common.smk and ablation.smk read the config and
paths; workflow/scripts/tabulate_variants.py writes the tables.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from purireid.config.dag import PROVENANCE_KEYS, STAGE_KEYS, TRAINED_BY, stage_inputs, stage_params
from purireid.config.recipes import PARTS, RECIPES, expand, part_keys, recipe_names, recipe_value, without
from purireid.config.resolve import RENAMED_KEYS, resolve_config
from purireid.config.schema import (
    MISSING, ConfigError, deep_merge, dotted_get, flatten, load_schema, schema_default, unflatten,
)

BASE_RUN = "default"
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=~-]*$")
# Keys a variant may not change: which dataset and results folder the ablation is about, and
# the execution settings every job of the run shares (set them in the config or a profile).
FIXED_KEYS = ("dataset", "data_root", "results_dir", "device", "train.gpus", "data.workers",
              "data.test_batch_size", "prepare.workers", "ablation", "sweeps", "export",
              "supervised_reference")
# The ablation.variants entry standing for one without_<part> row per ablatable part of the recipe.
EACH_PART = "without_each_part"


@dataclass(frozen=True)
class Variant:
    """A named overlay of the configured config and the model its row scores."""

    name: str
    about: str
    model: str
    overlay: Mapping[str, Any] = field(default_factory=dict)


# The paper's ablation (Table "components": Cluster Contrast baseline, + multi-view pseudo
# labels, + multi-view loss, + distillation), the supervised reference and source pretraining.
BUILTIN_VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("baseline", "Cluster Contrast: global view only, in clustering and in the loss; no distillation",
            "teacher", {"cluster": {"lambda1": 0.0}, "train": {"lambda2": 0.0}}),
    Variant("multiview_labels", "+ multi-view pseudo labels (lambda1): views fused in the clustering",
            "teacher", {"train": {"lambda2": 0.0}}),
    Variant("multiview_loss", "+ multi-view loss (lambda2): the teacher", "teacher"),
    Variant("distillation", "+ distillation (mu): the student, the full method", "student"),
    Variant("supervised", "supervised reference: the teacher's recipe with the TRUE labels (uses labels)",
            "supervised"),
    Variant("source", "full method, starting from source-pretrained weights (section source) at the "
            "fine-tuning rate train.lr 3.5e-4", "student",
            {"model": {"pretrained": "source"}, "train": {"lr": 0.00035}}),
)}


def _is_fixed(dotted: str) -> bool:
    return any(dotted == fixed or dotted.startswith(fixed + ".") for fixed in FIXED_KEYS)


def recipe_change(config: Mapping[str, Any], names: Sequence[str], where: str) -> dict:
    """The overlay that gives a resolved config the recipe list `names`, as if it had been resolved
    with that list: each key a part of the old or new list sets takes the new list's value (or the
    schema's default), except a key whose value is not the old list's, which the config set
    itself and which wins over any recipe. (A key the config set to the recipe's very value
    counts as the recipe's.) The overlay states the new list too."""
    before, after = expand(config["recipe"]), expand(names)
    overlay: dict = {}
    for key in part_keys([*before, *after]):
        old, new = recipe_value(before, key), recipe_value(after, key)
        old = schema_default(key) if old is MISSING else old
        new = schema_default(key) if new is MISSING else new
        if old == new or dotted_get(config, key) != old:
            continue
        if _is_fixed(key) or new is MISSING:
            part = next(p for p in [*before, *after] if key in flatten(PARTS[p].overlay))
            raise ConfigError(f"{where}: recipe {list(names)} changes part {part}, which sets '{key}', a key "
                              "every run of an ablation shares; change the recipe in the config itself")
        overlay = deep_merge(overlay, unflatten(key, new))
    return overlay | {"recipe": list(names)}


def _scored_model(overlay: Mapping[str, Any]) -> str:
    """A recipe part's row scores the teacher when the part changes it (the first model it
    changes; compare with the multiview_loss row, the configured teacher), else the student."""
    changed = [k for k in flatten(overlay) if k not in PROVENANCE_KEYS]
    teacher = STAGE_KEYS[TRAINED_BY["teacher"]]
    return "teacher" if any(k == t or k.startswith(t + ".") for k in changed for t in teacher) else "student"


def part_variant(config: Mapping[str, Any], name: str) -> Variant | None:
    """The row `with_<part>` / `without_<part>` (or <recipe>: all its parts) of a resolved config;
    None when `name` is no such row. Raises ConfigError when the row cannot be made."""
    mode, _, target = name.partition("_")
    if mode not in ("with", "without") or (target not in PARTS and target not in RECIPES):
        return None
    where = f"config key 'ablation.variants' names '{name}'"
    parts = expand([target])
    fixed = [p for p in parts if not PARTS[p].ablate]
    if fixed:
        raise ConfigError(f"{where}, but {', '.join(fixed)} {'sets' if len(fixed) == 1 else 'set'} the run's "
                          "sizes, which the ablation keeps (parts it can add or remove: "
                          f"{', '.join(p for p in PARTS if PARTS[p].ablate)})")
    configured = expand(config["recipe"])
    if mode == "without" and not set(parts) & set(configured):
        raise ConfigError(f"{where}, but the configured recipe {config['recipe']} does not hold "
                          f"{target}: write with_{target}")
    if mode == "with" and set(parts) <= set(configured):
        raise ConfigError(f"{where}, but the configured recipe {config['recipe']} already holds "
                          f"{target}: write without_{target}")
    names = without(config["recipe"], parts) if mode == "without" else [*config["recipe"], target]
    overlay = recipe_change(config, names, where)
    about = PARTS[target].about if target in PARTS else RECIPES[target].about
    return Variant(name, f"the configured run {mode} {target}: {about}", _scored_model(overlay), overlay)


@dataclass(frozen=True)
class Sweep:
    """One config key over several values; each value is a variant named `<sweep>~<value>`."""

    name: str
    key: str
    values: tuple[Any, ...]
    model: str

    def point(self, value: Any) -> str:
        return f"{self.name}~{value}"


def describe_changes(overlay: Mapping[str, Any]) -> str:
    """'cluster.lambda1=0.0, train.lambda2=0.0', or 'nothing' for the configured run (the recipe
    list a row states for provenance is not a change)."""
    flat = {k: v for k, v in flatten(overlay).items() if k not in PROVENANCE_KEYS}
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in flat.items()) or "nothing"


def _check_overlay(where: str, overlay: Mapping[str, Any]) -> None:
    for dotted in flatten(overlay):
        if _is_fixed(dotted):
            raise ConfigError(
                f"config key '{where}' changes '{dotted}', which every variant shares; set it in the "
                "config itself (or, for execution settings, in a profile), not in a variant")


def _defined_variant(config: Mapping[str, Any], name: str, spec: Mapping[str, Any]) -> Variant:
    """A row of ablation.define; a recipe list in its config becomes the keys that list changes."""
    where = f"ablation.define.{name}.config"
    overlay = dict(spec.get("config", {}))
    _check_overlay(where, {k: v for k, v in overlay.items() if k not in PROVENANCE_KEYS})
    if "recipe" in overlay:
        names = recipe_names(overlay.pop("recipe"), f"{where}.recipe")
        overlay = deep_merge(recipe_change(config, names, f"config key '{where}.recipe'"), overlay)
    return Variant(name, spec.get("about", ""), spec.get("model", "student"), overlay)


def ablation_variants(config: Mapping[str, Any]) -> list[Variant]:
    """The variants of `ablation.variants`, in order: the paper's rows, a recipe part's row
    (with_<part>, without_<part>, `EACH_PART`) or a row defined in `ablation.define`."""
    section = config["ablation"]
    defined = {name: _defined_variant(config, name, spec) for name, spec in section["define"].items()}
    names: list[str] = []
    for name in section["variants"]:
        if name == EACH_PART and name not in defined:
            names += [f"without_{p}" for p in expand(config["recipe"]) if PARTS[p].ablate]
        else:
            names.append(name)
    variants = []
    for name in dict.fromkeys(names):  # a part named beside without_each_part: one row
        variant = defined.get(name) or BUILTIN_VARIANTS.get(name) or part_variant(config, name)
        if variant is None:
            ablatable = ", ".join(p for p in PARTS if PARTS[p].ablate)
            known = ", ".join([*BUILTIN_VARIANTS, EACH_PART, *sorted(defined)])
            raise ConfigError(f"config key 'ablation.variants' names '{name}', which is no row: the rows are "
                              f"{known}, or with_<part> / without_<part> for a part ({ablatable}) or a recipe "
                              f"({', '.join(RECIPES)}), or a name defined under 'ablation.define'")
        variants.append(variant)
    return variants


def sweeps(config: Mapping[str, Any]) -> list[Sweep]:
    """The sweeps of the `sweeps` section, in order."""
    schema = load_schema()["properties"]
    found = []
    for name, spec in config["sweeps"].items():
        key = spec["key"]
        if key in RENAMED_KEYS:
            raise ConfigError(f"config key 'sweeps.{name}.key' is '{key}', now '{RENAMED_KEYS[key][0]}': rename it")
        section, _, leaf = key.partition(".")
        if not leaf or leaf not in schema.get(section, {}).get("properties", {}):
            raise ConfigError(f"config key 'sweeps.{name}.key' is '{key}', which is not a config key "
                              "(write section.key, e.g. cluster.eps)")
        _check_overlay(f"sweeps.{name}.key", unflatten(key, None))
        found.append(Sweep(name, key, tuple(spec["values"]), spec.get("model", "student")))
    return found


def sweep_variants(sweep: Sweep) -> list[Variant]:
    return [Variant(sweep.point(v), f"{sweep.key} = {v}", sweep.model, unflatten(sweep.key, v))
            for v in sweep.values]


def all_variants(config: Mapping[str, Any]) -> list[Variant]:
    """The ablation's variants, then every sweep's points (names unique)."""
    variants = ablation_variants(config) + [v for s in sweeps(config) for v in sweep_variants(s)]
    seen: set[str] = set()
    for variant in variants:
        if variant.name == BASE_RUN or not VARIANT_NAME.match(variant.name):
            raise ConfigError(f"variant name '{variant.name}' is not usable as a folder name: use letters, "
                              f"digits and _ . + = ~ - (and not '{BASE_RUN}')")
        if variant.name in seen:
            raise ConfigError(f"variant name '{variant.name}' is used twice (ablation.define and sweeps)")
        seen.add(variant.name)
    return variants


def run_configs(config: Mapping[str, Any]) -> dict[str, dict]:
    """Every run's resolved config: the configured run first, then each variant's (its overlay
    merged over the configured config). Raises ConfigError naming the variant and key."""
    runs = {BASE_RUN: dict(config)}
    for variant in all_variants(config):
        try:
            runs[variant.name] = resolve_config(deep_merge(config, variant.overlay))
        except ConfigError as err:
            raise ConfigError(f"variant '{variant.name}' ({describe_changes(variant.overlay)}): {err}") from None
    return runs


# --------------------------------------------------------------------------- what is shared


def stage_fingerprint(config: Mapping[str, Any], stage: str) -> str:
    """What a stage's outputs depend on: its params (less the recipe list they came from) and,
    recursively, its inputs' fingerprints."""
    params = stage_params(config, stage.split("_")[0] if stage.startswith("evaluate_") else stage)
    params = {key: value for key, value in params.items() if key not in PROVENANCE_KEYS}
    upstream = {name: stage_fingerprint(config, name) for name in stage_inputs(config, stage)}
    return json.dumps({"stage": stage, "params": params, "inputs": upstream}, sort_keys=True)


class Runs:
    """The runs of a config (`run_configs`) and which run owns each stage's outputs (cached)."""

    def __init__(self, configs: Mapping[str, Mapping[str, Any]]):
        self.configs = dict(configs)
        self._fingerprints: dict[tuple[str, str], str] = {}

    def __iter__(self):
        return iter(self.configs)

    def __getitem__(self, run: str) -> Mapping[str, Any]:
        return self.configs[run]

    def fingerprint(self, run: str, stage: str) -> str:
        if (run, stage) not in self._fingerprints:
            self._fingerprints[run, stage] = stage_fingerprint(self.configs[run], stage)
        return self._fingerprints[run, stage]

    def owner(self, run: str, stage: str) -> str:
        """The first run (configured run first) whose `stage` computes the same thing as
        `run`'s: the run whose folder holds the outputs both use."""
        mine = self.fingerprint(run, stage)
        return next(name for name in self.configs if name == run or self.fingerprint(name, stage) == mine)

    def jobs_by_stage(self, wanted: Sequence[tuple[str, str]]) -> dict[str, set[str]]:
        """stage -> the runs whose folders hold its outputs, for the (run, stage) pairs wanted and
        everything upstream of them: the jobs a DAG of these targets holds."""
        needed: dict[str, set[str]] = {}

        def visit(run: str, stage: str) -> None:
            owner = self.owner(run, stage)
            if owner in needed.setdefault(stage, set()):
                return
            needed[stage].add(owner)
            for upstream in stage_inputs(self.configs[owner], stage):
                visit(owner, upstream)

        for run, stage in wanted:
            visit(run, stage)
        return needed
