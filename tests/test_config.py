"""The config check (every value a job would reject is refused up front, naming the key) and the
keys each stage's job is given (its rule's params, which are Snakemake's rerun trigger)."""

from __future__ import annotations

import copy
import itertools

import pytest

from conftest import REPO, fake_snakemake
from purireid.config.resolve import (
    ALL_EXECUTION_KEYS, EXECUTION_KEYS, STAGE_KEYS, ConfigError, load_config, load_schema, resolve_config,
    stage_config, stage_params,
)

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


def changed(config: dict, key: str) -> dict:
    """`config` with `key` set to another valid value."""
    other = copy.deepcopy(config)
    section, _, name = key.partition(".")
    holder, leaf = (other[section], name) if name else (other, section)
    spec = SCHEMA["properties"][section]
    spec = spec.get("properties", {}).get(name, spec.get("additionalProperties", {})) if name else spec
    value = holder[leaf]
    if section == "sweeps":  # a sweep (which only the ablation targets read) over another key
        holder[leaf] = {"key": "cluster.min_samples", "values": [2, 3]}
    elif section == "ablation":  # which variants the ablation target runs
        holder[leaf] = value[:-1] if isinstance(value, list) else {"x": {"config": {"student": {"mu": 0.5}}}}
    elif "enum" in spec:
        holder[leaf] = next(v for v in spec["enum"] if v != value)
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
    """Whether `stage`'s job is given `key`: in its STAGE_KEYS (less execution-only keys) or its EXECUTION_KEYS."""
    if key in EXECUTION_KEYS[stage]:
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
        other = resolve_config(changed(config, key))
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
