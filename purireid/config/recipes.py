"""Named recipes: every setting that is not the paper's, grouped into named parts, defined once.

The schema's defaults are the paper's Market-1501 settings (docs/method.md, Hyperparameters). Anything else is a *part*:
a named config overlay (`camera_centre` sets cluster.camera_centre true). A *recipe* is a named
list of parts (`camera_robust` = per-image input standardisation, camera centring, same-camera
offset, memory momentum). A config chooses them with its top-level key `recipe`, a list of
recipe or part names applied in order over the schema's defaults and under the keys the config
sets itself: the config's own keys win, and `recipe: []` (the default) is the paper.

The ablation derives its rows from the same registry (purireid.config.variants): for a part
marked `ablate`, `without_<part>` is the configured run without it and `with_<part>` the
configured run with it added. `purireid recipes` prints this registry.

Pure data and functions, no file I/O.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from purireid.config.schema import MISSING, ConfigError, deep_merge, flatten


@dataclass(frozen=True)
class Part:
    """A named config overlay. `ablate`: a choice whose effect the ablation measures (its rows
    without_<name> / with_<name>), as opposed to the sizes a run needs (never ablated)."""

    name: str
    about: str
    overlay: Mapping[str, Any]
    ablate: bool = True


@dataclass(frozen=True)
class Recipe:
    """A named list of parts, applied in order."""

    name: str
    about: str
    parts: tuple[str, ...] = field(default_factory=tuple)


# The embedded default's sweeps: three values around its own settings (the schema's sweep the
# paper's values around the paper's).
_DEMO_SWEEPS = {
    "lambda1": {"key": "cluster.lambda1", "values": [0.0, 0.15, 0.3]},
    "lambda2": {"key": "train.lambda2", "values": [0.0, 0.2, 0.5]},
    "mu": {"key": "student.mu", "values": [0.0, 1.0, 2.0]},
    "eps": {"key": "cluster.eps", "values": [0.4, 0.5, 0.6]},
    "k1": {"key": "cluster.k1", "values": [10, 20, 30]},
}

PARTS: dict[str, Part] = {p.name: p for p in (
    # cpu_demo: the whole DAG in a few minutes on 2 CPU cores.
    Part("cpu_scale", "CPU sizes: ResNet-18 at 64x32 with BatchNorm over the whole batch; 8 epochs x 30 "
         "iterations of 32 images (8 pseudo-ids x 4); k1 20 and eps 0.5 for ~1,000 train images and "
         "random-init features; a test every 2 epochs; no loader workers",
         {"data": {"height": 64, "width": 32, "workers": 0, "test_batch_size": 128},
          "model": {"arch": "resnet18", "bn_groups": 1},
          "cluster": {"k1": 20, "eps": 0.5},
          "train": {"epochs": 8, "iters": 30, "batch_size": 32, "num_instances": 4, "eval_every": 2}},
         ablate=False),
    Part("from_scratch", "no ImageNet weights: the models and the source model start from random weights, "
         "at a from-scratch learning rate 1e-3 (the paper fine-tunes at 3.5e-4; the source model keeps 1e-3 "
         "when a run fine-tunes from it)",
         {"model": {"pretrained": "none"}, "train": {"lr": 0.001},
          "source": {"pretrained": "none", "train": {"lr": 0.001}}},
         ablate=False),
    Part("scaled_crop_border", "the paper's 10-px crop border (for 128-px-wide inputs) scaled to a 32-px-wide "
         "input: 2 px", {"train": {"crop_pad": 2}}),
    Part("student_step_decay", "the student's own learning-rate decay (x train.gamma after its warm-up and 5 "
         "epochs): its last epochs settle instead of following the teacher's noise at the full rate",
         {"student": {"step_size": 6}}),
    Part("demo_sweeps", "sweeps of three values around the CPU demo's own settings",
         {"sweeps": _DEMO_SWEEPS}, ablate=False),
    # camera_robust: cameras with their own colour casts, and small batches.
    Part("per_image_input", "each image's channels standardised inside the model (undoes a camera's colour "
         "cast, in training, features and exports alike)", {"model": {"input_norm": "per_image"}}),
    Part("camera_centre", "each camera's mean feature removed before the Jaccard distance, so neighbours "
         "can cross cameras", {"cluster": {"camera_centre": True}}),
    Part("same_camera_offset", "same-camera squared distances raised by 0.3 before the k-reciprocal lists, "
         "so reciprocal neighbours and clusters reach across cameras", {"cluster": {"same_camera_offset": 0.3}}),
    Part("memory_momentum", "cluster memories updated with momentum 0.5: with 4 images per pseudo-id per "
         "batch the paper's 0.1 (16 per id) leaves each memory close to the last image seen",
         {"train": {"memory_momentum": 0.5}}),
    # In no recipe: an option to try (recipe: [..., camera_proxy], or the ablation row with_camera_proxy).
    Part("camera_proxy", "a camera-aware proxy term (weight 0.5) added to each view's memory loss: each "
         "pseudo-identity's proxy in every camera pulls its images together", {"train": {"camera_proxy": 0.5}}),
)}

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("cpu_demo", "the embedded default's sizes and schedule: the whole DAG in minutes on 2 CPU cores, "
           "without ImageNet weights",
           ("cpu_scale", "from_scratch", "scaled_crop_border", "student_step_decay", "demo_sweeps")),
    Recipe("camera_robust", "camera robustness for data whose cameras differ (colour casts, backgrounds) and "
           "small batches", ("per_image_input", "camera_centre", "same_camera_offset", "memory_momentum")),
)}


def known_names() -> str:
    """The recipe and part names, for error messages."""
    return f"recipes {', '.join(RECIPES)}; parts {', '.join(PARTS)}"


def recipe_names(value: Any, where: str = "recipe") -> list[str]:
    """The recipe list of config key `where`, checked: a list of recipe or part names (one name
    alone is taken as a list of one). Raises ConfigError naming the key and the known names."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"config key '{where}' must be a list of recipe names, e.g. [camera_robust] "
                          f"(got {json.dumps(value, default=str)}); known: {known_names()}")
    for name in names:
        if name not in RECIPES and name not in PARTS:
            raise ConfigError(f"config key '{where}' names '{name}', which is no recipe or part "
                              f"(known: {known_names()}; `purireid recipes` lists their settings)")
    return list(names)


def expand(names: Sequence[str]) -> list[str]:
    """The parts of a (checked) recipe list, in order, each once (its first place)."""
    parts: list[str] = []
    for name in names:
        for part in RECIPES[name].parts if name in RECIPES else (name,):
            if part not in parts:
                parts.append(part)
    return parts


def recipe_overlay(names: Sequence[str]) -> dict:
    """The settings of a (checked) recipe list: its parts' overlays merged in order."""
    overlay: dict = {}
    for part in expand(names):
        overlay = deep_merge(overlay, PARTS[part].overlay)
    return overlay


def part_keys(parts: Sequence[str]) -> list[str]:
    """The dotted keys the parts set, in order, each once."""
    return list(dict.fromkeys(key for part in parts for key in flatten(PARTS[part].overlay)))


def recipe_value(parts: Sequence[str], dotted: str) -> Any:
    """The value the parts give `dotted` (the last part setting it wins); MISSING when none sets it."""
    value = MISSING
    for part in parts:
        value = flatten(PARTS[part].overlay).get(dotted, value)
    return value


def without(names: Sequence[str], removed: Sequence[str]) -> list[str]:
    """A recipe list less some parts: a recipe holding one of them is replaced by its other parts."""
    kept: list[str] = []
    for name in names:
        if name in RECIPES and set(RECIPES[name].parts) & set(removed):
            kept += [p for p in RECIPES[name].parts if p not in removed and p not in kept]
        elif name not in removed and name not in kept:
            kept.append(name)
    return kept


def _settings(overlay: Mapping[str, Any]) -> str:
    """'model.arch=resnet18, ...'; a sweep as 'sweep eps: cluster.eps [0.4, 0.5, 0.6]'."""
    flat = {k: v for k, v in flatten(overlay).items() if not k.startswith("sweeps.")}
    said = [f"{k}={json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else v}" for k, v in flat.items()]
    said += [f"sweep {name}: {spec['key']} {spec['values']}" for name, spec in overlay.get("sweeps", {}).items()]
    return ", ".join(said)


def describe_registry() -> str:
    """Every recipe with its parts and their settings, then the parts in no recipe (`purireid recipes`)."""
    lines = ["The top-level config key 'recipe' lists recipes or parts, applied in order over the schema's",
             "defaults (the paper's Market-1501 settings) and under the keys a config sets itself.",
             "[ablation]: a part the ablation rows without_<part> / with_<part> remove or add.", ""]

    def wrap(text: str, first: str, rest: str) -> list[str]:
        return textwrap.wrap(text, 100, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)

    def part_lines(name: str) -> list[str]:
        part = PARTS[name]
        return wrap(f"{name}{' [ablation]' if part.ablate else ''}: {part.about}", "  ", "    ") \
            + wrap(_settings(part.overlay), "      ", "      ")

    for recipe in RECIPES.values():
        lines += wrap(f"{recipe.name}: {recipe.about}", "", "  ")
        for name in recipe.parts:
            lines += part_lines(name)
        lines.append("")
    alone = [name for name in PARTS if not any(name in r.parts for r in RECIPES.values())]
    if alone:
        lines.append("Parts in no recipe:")
        for name in alone:
            lines += part_lines(name)
    return "\n".join(lines).rstrip() + "\n"
