"""Variants of a run: the paper's ablation rows, the learning options and parameter sweeps as
named config overlays, and which stages two variants share.

A *run* is a resolved config whose outputs live under one folder: the configured run
(`BASE_RUN`, under results/<dataset>/) and one per variant (results/<dataset>/variants/<name>/).
A variant is an overlay merged over the configured config, plus the model whose evaluation is
its row of the table. Two runs share a stage when the stage's params and everything upstream of
it are equal (`stage_fingerprint`): the workflow then points both at the first run's files, so a
variant that changes only the student reuses the configured teacher and its features.

Pure functions, no file I/O: workflow/rules/common.smk and ablation.smk read the config and
paths; workflow/scripts/tabulate_variants.py writes the tables.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from purireid.config.resolve import ConfigError, deep_merge, load_schema, resolve_config, stage_params

BASE_RUN = "default"
# The model a variant's row scores, and the rule that trains it.
TRAINED_BY = {"teacher": "train_teacher", "student": "train_student", "supervised": "train_supervised"}
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=~-]*$")
# Keys a variant may not change: which dataset and results folder the ablation is about, and
# the execution settings every job of the run shares (set them in the config or a profile).
FIXED_KEYS = ("dataset", "data_root", "results_dir", "device", "train.gpus", "data.workers",
              "data.test_batch_size", "prepare.workers", "ablation", "sweeps", "export",
              "supervised_reference")


@dataclass(frozen=True)
class Variant:
    """A named overlay of the configured config and the model its row scores."""

    name: str
    about: str
    model: str
    overlay: Mapping[str, Any] = field(default_factory=dict)


# The paper's ablation (Table "components": Cluster Contrast baseline, + multi-view pseudo
# labels, + multi-view loss, + distillation), the supervised reference and the learning options.
BUILTIN_VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("baseline", "Cluster Contrast: global view only, in clustering and in the loss; no distillation",
            "teacher", {"cluster": {"lambda1": 0.0}, "train": {"lambda2": 0.0}}),
    Variant("multiview_labels", "+ multi-view pseudo labels (lambda1): views fused in the clustering",
            "teacher", {"train": {"lambda2": 0.0}}),
    Variant("multiview_loss", "+ multi-view loss (lambda2): the teacher", "teacher"),
    Variant("distillation", "+ distillation (mu): the student, the full method", "student"),
    Variant("supervised", "supervised reference: the teacher's recipe with the TRUE labels (uses labels)",
            "supervised"),
    Variant("camera_centre", "full method, camera-centred clustering features", "student",
            {"cluster": {"camera_centre": True}}),
    Variant("source", "full method, starting from source-pretrained weights (section source) at the "
            "fine-tuning rate train.lr 3.5e-4", "student",
            {"model": {"pretrained": "source"}, "train": {"lr": 0.00035}}),
    Variant("per_image", "full method, each image's channels standardised at the input (model.input_norm)",
            "student", {"model": {"input_norm": "per_image"}}),
    Variant("memory_momentum", "full method, cluster memories updated with momentum 0.5 (train.momentum)",
            "student", {"train": {"momentum": 0.5}}),
    Variant("camera_proxy", "full method, plus the camera-proxy term (train.camera_proxy 0.5): each pseudo-identity's "
            "proxy in every camera pulls its images together", "student", {"train": {"camera_proxy": 0.5}}),
    Variant("same_camera_offset", "full method, same-camera distances raised by 0.3 before the k-reciprocal lists "
            "(cluster.same_camera_offset)", "student", {"cluster": {"same_camera_offset": 0.3}}),
    Variant("paper_crop", "full method with the paper's 10-px crop border kept at the configured input size "
            "(train.crop_pad 10; config.yaml scales it to 2 px at 64x32)", "student", {"train": {"crop_pad": 10}}),
    Variant("shared_schedule", "full method, the student on the teacher's learning-rate schedule "
            "(student.step_size null, as in the paper; config.yaml decays the student's rate after 6 epochs)",
            "student", {"student": {"step_size": None}}),
    Variant("paper_recipe", "full method without the camera-robust options: ImageNet input normalisation, "
            "no camera centring or same-camera offset, memory momentum 0.1, as in the paper", "student",
            {"model": {"input_norm": "imagenet"}, "cluster": {"camera_centre": False, "same_camera_offset": 0.0},
             "train": {"momentum": 0.1}}),
)}


@dataclass(frozen=True)
class Sweep:
    """One config key over several values; each value is a variant named `<sweep>~<value>`."""

    name: str
    key: str
    values: tuple[Any, ...]
    model: str

    def point(self, value: Any) -> str:
        return f"{self.name}~{value}"


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


def describe_changes(overlay: Mapping[str, Any]) -> str:
    """'cluster.lambda1=0.0, train.lambda2=0.0', or 'nothing' for the configured run."""
    flat = flatten(overlay)
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in flat.items()) or "nothing"


def _check_overlay(where: str, overlay: Mapping[str, Any]) -> None:
    for dotted in flatten(overlay):
        for fixed in FIXED_KEYS:
            if dotted == fixed or dotted.startswith(fixed + "."):
                raise ConfigError(
                    f"config key '{where}' changes '{dotted}', which every variant shares; set it in the "
                    "config itself (or, for execution settings, in a profile), not in a variant")


def ablation_variants(config: Mapping[str, Any]) -> list[Variant]:
    """The variants of `ablation.variants`, in order: built-in or defined in `ablation.define`."""
    section = config["ablation"]
    defined = {}
    for name, spec in section["define"].items():
        _check_overlay(f"ablation.define.{name}.config", spec.get("config", {}))
        defined[name] = Variant(name, spec.get("about", ""), spec.get("model", "student"), spec.get("config", {}))
    variants = []
    for name in section["variants"]:
        if name in defined:
            variants.append(defined[name])
        elif name in BUILTIN_VARIANTS:
            variants.append(BUILTIN_VARIANTS[name])
        else:
            known = ", ".join(sorted(BUILTIN_VARIANTS) + sorted(defined))
            raise ConfigError(f"config key 'ablation.variants' names '{name}', which is neither built in nor "
                              f"defined under 'ablation.define' (known: {known})")
    return variants


def sweeps(config: Mapping[str, Any]) -> list[Sweep]:
    """The sweeps of the `sweeps` section, in order."""
    schema = load_schema()["properties"]
    found = []
    for name, spec in config["sweeps"].items():
        key = spec["key"]
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


def stage_inputs(config: Mapping[str, Any], stage: str) -> tuple[str, ...]:
    """The stages whose outputs `stage` reads, in `config` (evaluate_<model> for an evaluation)."""
    source = ("pretrain_source",) if config["model"]["pretrained"] == "source" else ()
    if stage.startswith("evaluate_"):
        return ("prepare_dataset", TRAINED_BY[stage.removeprefix("evaluate_")])
    return {
        "prepare_dataset": (),
        "prepare_source": (),
        "pretrain_source": ("prepare_source",),
        "train_teacher": ("prepare_dataset", *source),
        "extract_teacher_features": ("prepare_dataset", "train_teacher"),
        "train_student": ("prepare_dataset", "train_teacher", "extract_teacher_features", *source),
        "train_supervised": ("prepare_dataset", *source),
    }[stage]


def stage_fingerprint(config: Mapping[str, Any], stage: str) -> str:
    """What a stage's outputs depend on: its params and, recursively, its inputs' fingerprints."""
    params = stage_params(config, stage.split("_")[0] if stage.startswith("evaluate_") else stage)
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
