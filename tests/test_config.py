"""The config check (every value a job would reject is refused up front, naming the key), the
schema's defaults (the paper), the recipes, the keys each stage's job is given (its rule's params,
which are Snakemake's rerun trigger) and the stage table the workflow's rules are derived from."""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import yaml

from conftest import REPO, fake_snakemake
from purireid.config.dag import STAGES as STAGE_TABLE
from purireid.config.dag import (
    DEFAULT_DATASET, PROVENANCE_KEYS, SOURCE_STAGES, TRAINED_BY, Resources, stage_inputs, stage_resources,
)
from purireid.config.recipes import PARTS, RECIPES, describe_registry, expand, recipe_overlay
from purireid.config.resolve import (
    ALL_EXECUTION_KEYS, EXECUTION_KEYS, STAGE_KEYS, ConfigError, load_config, load_schema, resolve_config,
    stage_config, stage_params,
)
from purireid.config.schema import MISSING, flatten, schema_default
from purireid.config.variants import FIXED_KEYS

STAGES = tuple(STAGE_KEYS)
SCHEMA = load_schema()


@pytest.mark.parametrize(
    ("override", "key", "text"),
    [
        ({"cluster": {"eps": 1.5}}, "cluster.eps", "maximum of 1"),  # D4: the teacher job rejected it later as 'eps'
        ({"cluster": {"eps": 1.0}}, "cluster.eps", "maximum of 1"),
        ({"train": {"epochs": 2.0}}, "train.epochs", "whole number"),  # D5: crashed in range()
        ({"train": {"iters": 30.0}}, "train.iters", "whole number"),
        ({"cluster": {"k1": 20.5}}, "cluster.k1", "not of type 'integer'"),
        ({"synthetic": {"images_per_id": 2}}, "synthetic.images_per_id", "minimum"),  # a query without a true match
        ({"data": {"height": 16}}, "data.height", "minimum"),  # one feature-map row: empty upper/lower views
        ({"supervised_reference": "true"}, "supervised_reference", "--config key=True"),  # Snakemake's text 'true'
        ({"model": {"input_norm": "grey_world"}}, "model.input_norm", "is not one of"),
    ],
)
def test_values_a_job_would_reject_are_refused_naming_the_key(override, key, text):
    with pytest.raises(ConfigError, match=rf"config key '{key}'.*{text}"):
        load_config(REPO / "config.yaml", overrides=override)


def test_eps_below_the_fused_distance_of_unrelated_pairs():
    """The clustering refuses eps at or above the fused distance of two unrelated images, a float32
    sum over the view weights: so does the config check, whatever lambda1."""
    for lambda1 in (0.0, 0.15, 0.3, 0.5):
        assert resolve_config({"cluster": {"eps": 0.99, "lambda1": lambda1}})["cluster"]["eps"] == 0.99
    with pytest.raises(ConfigError, match="config key 'cluster.eps'"):
        resolve_config({"cluster": {"eps": 0.9999999999, "lambda1": 0.15}})


def test_integers_stay_integers_and_numbers_accept_integers():
    config = resolve_config({"train": {"epochs": 2, "lr": 1}})
    assert config["train"]["epochs"] == 2 and config["train"]["lr"] == 1
    with pytest.raises(ConfigError, match="config key 'train.keep_best'"):
        resolve_config({"train": {"keep_best": 1}})


# --------------------------------------------------------------------------- params = what a job reads


def leaf_keys(config: dict) -> list[str]:
    return [f"{section}.{name}" for section, body in config.items() if isinstance(body, dict) for name in body] \
        + [section for section, body in config.items() if not isinstance(body, dict)]


def changed(config: dict, key: str) -> dict | None:
    """`config` with `key` set to another valid value (None when the key has no other)."""
    other = copy.deepcopy(config)
    section, _, name = key.partition(".")
    holder, leaf = (other[section], name) if name else (other, section)
    spec = SCHEMA["properties"][section]
    spec = spec.get("properties", {}).get(name, spec.get("additionalProperties", {})) if name else spec
    value = holder[leaf]
    if section == "recipe":  # provenance: the values stay, the list they came from changes
        holder[leaf] = value[:-1]
    elif section == "sweeps":  # a sweep (which only the ablation targets read) over another key
        holder[leaf] = {"key": "cluster.min_samples", "values": [2, 3]}
    elif section == "ablation":  # which variants the ablation target runs
        holder[leaf] = value[:-1] if isinstance(value, list) else {"x": {"config": {"student": {"mu": 0.5}}}}
    elif "enum" in spec:
        others = [v for v in spec["enum"] if v != value]
        if not others:  # a choice with one value so far (cluster.method): nothing to change it to
            return None
        holder[leaf] = others[0]
    elif isinstance(value, bool):
        holder[leaf] = not value
    elif isinstance(value, int):
        holder[leaf] = value + (value if leaf in ("batch_size", "num_instances", "gpus", "bn_groups") else 1)
    elif isinstance(value, float):
        holder[leaf] = value / 2 if value else 0.5  # a weight that is off by default: turn it on
    elif isinstance(value, dict):  # the source section's sub-sections, merged over the top level's
        holder[leaf] = {"prepare": {"check_counts": False}, "synthetic": {"num_train_ids": 7},
                        "train": {"epochs": 3}}[leaf]
    else:
        holder[leaf] = f"{value}-other"
    return other


def declared(stage: str, key: str, config: dict) -> bool:
    """Whether `stage`'s job is given `key`: in its STAGE_KEYS (less execution-only keys), its
    EXECUTION_KEYS, or a provenance key (the recipe list, in every job's config)."""
    if key in EXECUTION_KEYS[stage] or key in PROVENANCE_KEYS:
        return True
    keys = STAGE_KEYS[stage] + (("synthetic",) if stage == "prepare_dataset" and config["dataset"] == "synthetic" else ())
    return key not in ALL_EXECUTION_KEYS and any(key == k or key.startswith(k + ".") for k in keys)


def test_a_job_is_given_exactly_its_declared_keys():
    """Changing any config key that a stage does not declare leaves that stage's job config (and so
    its outputs) unchanged; changing a declared one changes it. Together with the stage tests,
    which run every stage on exactly this job config, a key absent from a rule's params
    cannot change its output."""
    config = load_config(REPO / "config.yaml")
    for key in leaf_keys(config):
        if (other := changed(config, key)) is None:
            continue
        other = resolve_config(other)
        for stage in STAGES:
            same = stage_config(other, stage) == stage_config(config, stage)
            if stage == "prepare_dataset" and key == "dataset":
                assert not same
                continue
            assert same != declared(stage, key, config), (stage, key)


def test_params_hold_no_execution_only_key():
    config = load_config(REPO / "config.yaml")
    for stage, key in itertools.product(STAGES, ("device", "train.gpus", "data.workers", "data.test_batch_size",
                                                 "prepare.workers")):
        assert stage_params(resolve_config(changed(config, key)), stage) == stage_params(config, stage), (stage, key)


def test_training_params_hold_the_evaluation_that_picks_the_weights():
    """With train.keep_best the test mAP (evaluate.rerank) picks which weights become model.pth, and
    the mAP is logged every train.eval_every epochs: the training rules rerun when it changes."""
    config = load_config(REPO / "config.yaml")
    for stage in ("train_teacher", "train_student"):
        assert stage_params(config, stage)["evaluate"] == {"rerank": False}
    assert "student" not in stage_params(config, "train_teacher")


def test_workflow_job_config_comes_from_params(tmp_path):
    """A script's config: its params plus the execution-only keys, not the whole workflow config."""
    import sys
    sys.path.insert(0, str(REPO / "workflow" / "scripts"))
    from _workflow import job_config

    config = load_config(REPO / "config.yaml")
    job = fake_snakemake("evaluate", config, log=tmp_path / "x.log")
    assert job_config(job) == stage_config(config, "evaluate")
    assert "cluster" not in job_config(job) and "student" not in job_config(job)
    job.config = changed(config, "cluster.eps")  # params are computed by the workflow, not by the job
    assert job_config(job) == stage_config(config, "evaluate")


# --------------------------------------------------------------------------- the paper is the default

PRESETS = {name: yaml.safe_load((REPO / "config" / "presets" / f"{name}.yaml").read_text())
           for name in ("market1501", "msmt17")}
# What a dataset preset may set: what differs per dataset (its name, archive, eps, iterations, the
# eps sweep around its eps), the machine a real dataset is run on (workers), and `recipe: []`,
# which drops config.yaml's recipes when the preset merges over it.
DATASET_SPECIFIC = {"dataset", "recipe", "prepare.archive", "prepare.workers", "data.workers", "cluster.eps",
                    "train.iters", "sweeps.eps.key", "sweeps.eps.values"}


def leaves(config: dict) -> dict:
    """Every leaf key of a resolved config (sweeps and ablation rows included), dotted."""
    return flatten(config)


def test_schema_defaults_are_the_papers_market1501_settings():
    """A run with no config is the paper (docs/method.md, Hyperparameters: Market-1501)."""
    paper = resolve_config({})
    assert paper["recipe"] == []
    assert (paper["model"]["arch"], paper["model"]["pretrained"], paper["model"]["bn_groups"]) == ("resnet50",
                                                                                                  "imagenet", 4)
    assert (paper["data"]["height"], paper["data"]["width"], paper["model"]["input_norm"]) == (256, 128, "imagenet")
    assert {k: paper["cluster"][k] for k in ("k1", "k2", "lambda1", "eps", "camera_centre", "same_camera_offset")} \
        == {"k1": 30, "k2": 6, "lambda1": 0.15, "eps": 0.6, "camera_centre": False, "same_camera_offset": 0.0}
    train = paper["train"]
    assert (train["epochs"], train["iters"], train["batch_size"], train["num_instances"]) == (50, 200, 256, 16)
    assert (train["lr"], train["weight_decay"], train["step_size"], train["gamma"]) == (0.00035, 0.0005, 20, 0.1)
    assert (train["temperature"], train["memory_momentum"], train["lambda2"], train["crop_pad"]) == (0.05, 0.1, 0.2, 10)
    assert train["camera_proxy"] == 0.0 and paper["student"]["mu"] == 1.0 and paper["student"]["step_size"] is None
    assert paper["seed"] == 1 and paper["source"]["pretrained"] == "imagenet"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_no_default_differs_from_a_preset_but_its_dataset_specific_keys(preset):
    """Every key of a preset is dataset-specific, and a preset alone, or merged over config.yaml as
    Snakemake merges it, resolves to the schema's defaults everywhere else."""
    assert set(flatten(PRESETS[preset])) <= DATASET_SPECIFIC, set(flatten(PRESETS[preset])) - DATASET_SPECIFIC
    defaults = leaves(resolve_config({}))
    for config in (resolve_config(PRESETS[preset]), load_config(REPO / "config.yaml",
                                                                REPO / "config" / "presets" / f"{preset}.yaml")):
        differing = {key for key, value in leaves(config).items() if defaults.get(key, MISSING) != value}
        # config.yaml's synthetic section is about another dataset
        assert {k for k in differing if not k.startswith("synthetic.")} <= DATASET_SPECIFIC, differing
    market = resolve_config(PRESETS["market1501"])
    assert {k for k, v in leaves(market).items() if defaults[k] != v} == {
        "dataset", "prepare.workers", "data.workers"}, "Market-1501 is the paper's dataset: nothing else differs"


# --------------------------------------------------------------------------- recipes


def test_recipes_apply_in_order_under_the_configs_own_keys():
    demo = load_config(REPO / "config.yaml")
    assert demo["recipe"] == ["cpu_demo", "camera_robust"]
    assert (demo["model"]["arch"], demo["model"]["input_norm"], demo["train"]["memory_momentum"]) == \
        ("resnet18", "per_image", 0.5)
    assert demo["cluster"]["camera_centre"] is True and demo["student"]["step_size"] == 6
    assert demo["sweeps"]["eps"]["values"] == [0.4, 0.5, 0.6]  # cpu_demo's, around its eps 0.5
    # the config's own keys win, whatever the order of the files and the recipes
    own = resolve_config({"recipe": ["camera_robust"], "cluster": {"same_camera_offset": 0.1}})
    assert own["cluster"]["same_camera_offset"] == 0.1 and own["cluster"]["camera_centre"] is True
    # a part is a recipe of one part; later parts win; a name alone is a list of one
    assert resolve_config({"recipe": ["camera_centre"]})["cluster"]["camera_centre"] is True
    assert resolve_config({"recipe": "camera_centre"})["recipe"] == ["camera_centre"]
    # resolving a resolved config changes nothing (every key is then the config's own)
    assert resolve_config(demo) == demo
    assert resolve_config(dict(demo, recipe=[])) == dict(demo, recipe=[])
    # a config naming one sweep keeps the others (of the schema or of a recipe)
    one = resolve_config({"sweeps": {"eps": {"key": "cluster.eps", "values": [0.5]}}})
    assert set(one["sweeps"]) == {"lambda1", "lambda2", "mu", "eps", "k1"} and one["sweeps"]["eps"]["values"] == [0.5]


@pytest.mark.parametrize(("recipe", "text"), [
    (["camera_robust", "gpu_demo"], "names 'gpu_demo', which is no recipe or part"),
    ([3], "must be a list of recipe names"),
    ({"camera_robust": True}, "must be a list of recipe names"),
])
def test_unknown_recipes_are_refused_naming_the_key_and_the_known_ones(recipe, text):
    with pytest.raises(ConfigError, match=rf"config key 'recipe' {re.escape(text)}.*cpu_demo, camera_robust"):
        resolve_config({"recipe": recipe})


def test_renamed_memory_momentum_is_refused_naming_the_new_key():
    for config, old, new in (({"train": {"momentum": 0.5}}, "train.momentum", "train.memory_momentum"),
                             ({"source": {"train": {"momentum": 0.5}}}, "source.train.momentum",
                              "source.train.memory_momentum")):
        with pytest.raises(ConfigError, match=rf"config key '{old}' is now '{new}'.*optimiser is Adam"):
            resolve_config(config)
    assert resolve_config({"train": {"memory_momentum": 0.5}})["train"]["memory_momentum"] == 0.5


def test_the_registry_is_consistent():
    """Every part sets schema keys to valid values; every recipe names known parts; the parts the
    ablation adds or removes set leaf keys with a default that a variant may change."""
    for name, part in PARTS.items():
        resolve_config({"recipe": [name]})  # valid on its own
        for key in flatten(part.overlay):
            section = key.split(".")[0]
            assert section in load_schema()["properties"], (name, key)
            if part.ablate:
                assert schema_default(key) is not MISSING, (name, key)
                assert not any(key == f or key.startswith(f + ".") for f in FIXED_KEYS), (name, key)
    for recipe in RECIPES.values():
        assert set(recipe.parts) <= set(PARTS) and recipe.name not in PARTS
        resolve_config({"recipe": [recipe.name]})
    assert expand(["cpu_demo", "camera_robust"]) == [*RECIPES["cpu_demo"].parts, *RECIPES["camera_robust"].parts]
    assert recipe_overlay(["camera_robust"])["cluster"] == {"camera_centre": True, "same_camera_offset": 0.3}


def test_recipes_command_lists_every_recipe_and_part(capsys):
    from purireid.serving.cli import main

    assert main(["recipes"]) == 0
    said = capsys.readouterr().out
    assert said == describe_registry()
    for name in (*RECIPES, *PARTS):
        assert re.search(rf"^ *{name}( \[ablation\])?: ", said, flags=re.M), name
    assert "cluster.same_camera_offset=0.3" in said and "train.memory_momentum=0.5" in said


def test_job_config_states_the_recipe_list():
    """The config written beside every output states the recipe list its values came from."""
    demo = load_config(REPO / "config.yaml")
    for stage in (*STAGE_KEYS, *SOURCE_STAGES):
        assert stage_config(demo, stage)["recipe"] == ["cpu_demo", "camera_robust"], stage


# --------------------------------------------------------------------------- the stage table


def test_a_dataset_without_resources_gets_the_defaults():
    for stage in STAGE_TABLE:
        assert stage_resources(stage, "a_new_dataset") == stage_resources(stage, DEFAULT_DATASET)
    assert stage_resources("train_teacher", "a_new_dataset") == Resources(mem_mb=32000, runtime=720)
    assert stage_resources("train_teacher", "synthetic").mem_mb < stage_resources("train_teacher", "msmt17").mem_mb
    # a source rule is sized as the stage it runs
    assert stage_resources("pretrain_source", "msmt17") == stage_resources("train_supervised", "msmt17")


def _rule_blocks() -> dict[str, str]:
    blocks = {}
    for path in (REPO / "workflow" / "rules").glob("*.smk"):
        for match in re.finditer(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", path.read_text(), flags=re.M | re.S):
            blocks[match.group(1)] = match.group(2)
    return blocks


def test_rules_read_the_inputs_the_stage_table_declares():
    """The inputs each rule names (upstream(...)) are those of the stage table, from which the
    variants' sharing is derived; the training rules read the source weights when asked."""
    blocks = _rule_blocks()
    plain, from_source = resolve_config({}), resolve_config({"model": {"pretrained": "source"}})
    for name, stage in STAGE_TABLE.items():
        block = blocks[name]
        # A training rule takes them through the training rules' shared helpers (common.smk).
        assert f'params_of("{name}")' in block or f'training_params("{name}"' in block or name == "export_student", name
        assert (f'mem_mb("{name}")' in block and f'runtime("{name}")' in block) \
            or f'training_resources("{name}")' in block, name
        if name in ("evaluate", "export_student", "pseudo_identities"):
            continue
        named = set(re.findall(r'upstream\("(\w+)"', block))
        assert named == set(stage_inputs(plain, name)), (name, named)
        assert ("source_weights_input" in block) == stage.reads_source_weights, name
        if stage.reads_source_weights:
            assert set(stage_inputs(from_source, name)) == named | {"pretrain_source"}
    assert set(stage_inputs(plain, "evaluate_student")) == {"prepare_dataset", "train_student"}
    # pseudo_identities reads the manifest, the model it clusters with and, for the teacher, its features
    assert set(re.findall(r'upstream\("(\w+)"', blocks["pseudo_identities"])) == \
        {"prepare_dataset", "extract_teacher_features"} and "TRAINED_BY[w.model]" in blocks["pseudo_identities"]
    assert TRAINED_BY == {"teacher": "train_teacher", "student": "train_student", "supervised": "train_supervised"}
