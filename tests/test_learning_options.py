"""The learning options: label diagnostics, camera-centred pseudo labels, the k1 warning, the
supervised reference and source pretraining (config, workflow plan and stages)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, prepare_tiny_dataset, tiny_config

from purireid import VIEWS
from purireid.config.resolve import ConfigError, load_config, resolve_config, source_config, stage_config, stage_params
from purireid.labels.diagnostics import camera_advice, k1_advice, label_diagnostics, replacement_advice
from purireid.labels.sources import PseudoLabels, camera_centred
from purireid.stages import train_supervised, train_teacher
from purireid.training.advice import crop_pad_advice, fine_tuning_advice, schedule_advice
from purireid.training.loop import lr_step_size

# ---------------------------------------------------------------- diagnostics (pure)


def test_label_diagnostics_on_hand_made_labels():
    pids = np.array([1, 1, 1, 2, 2, 2, 3, 3])
    cams = np.array([0, 1, 0, 0, 0, 0, 1, 2])
    perfect = label_diagnostics(np.array([0, 0, 0, 1, 1, 1, 2, 2]), pids, cams)
    assert perfect["purity"] == perfect["nmi"] == perfect["ari"] == 1.0
    # clusters 0 and 2 span two cameras, cluster 1 only camera 0
    assert perfect["multi_camera_share"] == pytest.approx(2 / 3)
    assert perfect["mean_cluster_size"] == pytest.approx(8 / 3)

    # identities 1 and 2 merged; identity 3 left out as outliers
    merged = label_diagnostics(np.array([0, 0, 0, 0, 0, 0, -1, -1]), pids, cams)
    assert merged["purity"] == 0.5
    assert merged["ari"] == 0.0 and merged["nmi"] == 0.0
    assert merged["multi_camera_share"] == 1.0 and merged["mean_cluster_size"] == 6.0

    none = label_diagnostics(np.full(8, -1), pids, cams)
    assert set(none.values()) == {None}


def test_k1_advice_flags_merged_and_too_small_clusters():
    assert k1_advice(30, 0.6, 17.0) is None  # Market-1501: k1 30, ~17 images per identity
    assert k1_advice(10, 0.6, None) is None
    small = k1_advice(30, 0.6, 8.0)
    assert "cluster.k1" in small and "e.g. 12" in small
    merged = k1_advice(10, 0.6, 90.0)
    assert "merged" in merged and "cluster.eps" in merged


def test_camera_advice_flags_clusters_confined_to_one_camera():
    assert camera_advice(0.5, 6, True, 0.3) is None
    assert camera_advice(0.1, 1, False, 0.0) is None  # one camera: nothing to cross
    assert camera_advice(None, 6, False, 0.0) is None  # no clusters
    advice = camera_advice(0.1, 3, False, 0.0)
    assert "10 %" in advice and "cluster.camera_centre" in advice and "cluster.same_camera_offset" in advice
    assert "recipe camera_robust to config key 'recipe'" in advice  # the camera options come as one recipe
    assert "camera_centre" not in camera_advice(0.2, 3, True, 0.3)
    assert "'cluster.camera_centre' to true" in camera_advice(0.2, 3, False, 0.3)


def test_fine_tuning_advice_flags_a_from_scratch_rate_on_pretrained_weights():
    assert fine_tuning_advice("none", 1e-3) is None  # from scratch: 1e-3 is the embedded default
    assert fine_tuning_advice("imagenet", 3.5e-4) is None  # the paper's fine-tuning
    advice = fine_tuning_advice("source", 1e-3)
    assert "train.lr" in advice and "0.00035" in advice


def test_schedule_advice_flags_a_rate_decayed_to_nothing():
    assert schedule_advice(20, 50, 0.1, "train.step_size") is None  # the paper: decays at 20 and 40
    assert schedule_advice(6, 9, 0.1, "student.step_size") is None  # config.yaml's student (warm-up + 8)
    advice = schedule_advice(6, 31, 0.1, "student.step_size")  # ... with train.epochs raised to 30
    assert "'student.step_size'" in advice and "5 times" in advice and "(21)" in advice
    assert schedule_advice(6, 31, 1.0, "train.step_size") is None  # gamma 1: no decay


def test_crop_pad_advice_flags_the_papers_border_on_small_inputs():
    assert crop_pad_advice(10, 128) is None  # the paper: 10 px at 256x128
    assert crop_pad_advice(2, 32) is None  # config.yaml's 64x32 default
    advice = crop_pad_advice(10, 32)  # the paper's 10 px kept at 64x32: shifts of up to 31 %
    assert "train.crop_pad" in advice and "31%" in advice and "near 2 " in advice
    assert crop_pad_advice(10, 64) is None and crop_pad_advice(21, 128) is not None


def test_the_source_row_fine_tunes_while_its_source_trains_from_scratch():
    """The `source` ablation row starts the target from source weights at the fine-tuning rate;
    the source itself keeps config.yaml's from-scratch rate (source.train.lr)."""
    from purireid.config.variants import run_configs

    runs = run_configs(load_config(REPO / "config.yaml"))
    row = runs["source"]
    assert (row["model"]["pretrained"], row["train"]["lr"]) == ("source", 0.00035)
    assert source_config(row)["train"]["lr"] == 0.001


# ---------------------------------------------------------------- camera-centred pseudo labels


def test_camera_centred_removes_each_cameras_mean():
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(12, 5)), dtype=torch.float32)
    cams = np.array([0, 1, 2] * 4)
    x[cams == 1] += 10.0  # a camera-wide offset dominates the raw features
    centred = camera_centred(x, cams)
    assert torch.allclose(centred.norm(dim=1), torch.ones(12), atol=1e-6)
    raw = torch.nn.functional.normalize(x, dim=1)
    # without the offset, rows of camera 1 are no longer nearer each other than to the others
    same_cam = (centred[cams == 1] @ centred[cams == 1].T).mean()
    assert (raw[cams == 1] @ raw[cams == 1].T).mean() > 0.9 and same_cam < 0.5
    with pytest.raises(ValueError, match="camera ids"):
        camera_centred(x, cams[:5])


def _camera_biased_views(num_ids=8, per_id=6, num_cams=3, dim=32, seed=0):
    """Identities as directions, each image shifted by a strong offset of its camera."""
    rng = np.random.default_rng(seed)
    ids = rng.normal(size=(num_ids, dim))
    offsets = 2.5 * rng.normal(size=(num_cams, dim))
    pids = np.repeat(np.arange(num_ids), per_id)
    cams = np.tile(np.arange(num_cams), num_ids * per_id // num_cams)
    x = ids[pids] + offsets[cams] + 0.3 * rng.normal(size=(len(pids), dim))
    x = torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1)
    return {v: x for v in VIEWS}, pids, cams


def test_camera_centring_lets_clusters_cross_cameras():
    views, pids, cams = _camera_biased_views()
    config = resolve_config({"cluster": {"k1": 6, "k2": 2, "eps": 0.6, "min_samples": 2}})
    plain = PseudoLabels(config, camids=cams).assign(views, epoch=0)
    centred_config = resolve_config({"cluster": {**config["cluster"], "camera_centre": True}})
    centred = PseudoLabels(centred_config, camids=cams).assign(views, epoch=0)
    plain_d = label_diagnostics(plain, pids, cams)
    centred_d = label_diagnostics(centred, pids, cams)
    assert centred_d["multi_camera_share"] > plain_d["multi_camera_share"]
    assert centred_d["ari"] > plain_d["ari"] + 0.3
    assert centred_d["ari"] > 0.8


def test_same_camera_offset_lets_clusters_cross_cameras():
    """cluster.same_camera_offset: with same-camera distances raised, the k-reciprocal sets and
    the clusters reach across cameras even without camera centring."""
    views, pids, cams = _camera_biased_views()
    config = resolve_config({"cluster": {"k1": 6, "k2": 2, "eps": 0.6, "min_samples": 2}})
    plain = label_diagnostics(PseudoLabels(config, camids=cams).assign(views, epoch=0), pids, cams)
    assert plain["multi_camera_share"] == 0.0  # every cluster inside one camera
    # the toy's camera offsets are large: same-camera squared distances ~2 below cross-camera ones
    offset_config = resolve_config({"cluster": {**config["cluster"], "same_camera_offset": 2.0}})
    offset = label_diagnostics(PseudoLabels(offset_config, camids=cams).assign(views, epoch=0), pids, cams)
    assert offset["multi_camera_share"] >= 0.3
    assert offset["ari"] > plain["ari"] + 0.25


def test_camera_centring_needs_camera_ids():
    for key, value in (("camera_centre", True), ("same_camera_offset", 0.3)):
        config = resolve_config({"cluster": {key: value}})
        with pytest.raises(ValueError, match="camera ids"):
            PseudoLabels(config)


def test_paper_presets_keep_the_faithful_options():
    """A preset as users run it (merged over config.yaml, whose recipes turn the camera-robust
    options on) is the paper's recipe: its `recipe: []` drops config.yaml's."""
    for preset in ("market1501", "msmt17"):
        path = REPO / "config" / "presets" / f"{preset}.yaml"
        for config in (resolve_config(yaml.safe_load(path.read_text())), load_config(REPO / "config.yaml", path)):
            assert config["cluster"]["camera_centre"] is False
            assert config["cluster"]["same_camera_offset"] == 0.0
            assert config["model"]["input_norm"] == "imagenet"
            assert config["train"]["memory_momentum"] == 0.1
            assert config["model"]["pretrained"] == "imagenet"
            assert config["recipe"] == [] and config["model"]["bn_groups"] == 4
            assert config["supervised_reference"] is False
            assert config["train"]["camera_proxy"] == 0.0
            assert config["train"]["crop_pad"] == 10  # the paper's border at 256x128
            # the student on the teacher's schedule (config.yaml gives the student its own decay)
            assert config["student"]["step_size"] is None
            assert config["train"]["step_size"] == 20
            assert lr_step_size(config, student=True) == (20, "train.step_size")
            # the source row's ImageNet-initialised source fine-tunes at the paper's rate, not at
            # config.yaml's from-scratch source rate
            assert source_config(config)["train"]["lr"] == config["train"]["lr"] == 0.00035


# ---------------------------------------------------------------- source config


def test_source_config_merges_the_source_section():
    config = resolve_config({"model": {"pretrained": "source"}, "train": {"epochs": 5, "lr": 1e-3},
                             "synthetic": {"num_train_ids": 7},
                             "source": {"train": {"epochs": 2}, "synthetic": {"num_train_ids": 40},
                                        "pretrained": "none"}})
    source = source_config(config)
    assert source["dataset"] == "synthetic" and source["data_root"] == "data/source"
    assert source["train"]["epochs"] == 2 and source["train"]["lr"] == 1e-3  # merged over train
    assert source["synthetic"]["num_train_ids"] == 40 and source["synthetic"]["seed"] == 1000
    assert source["synthetic"]["num_cameras"] == 6  # the generator's default, not the target's section
    assert source["model"]["pretrained"] == "none"
    params = stage_params(config, "pretrain_source")
    assert params["dataset"] == "synthetic" and params["train"]["epochs"] == 2 and "cluster" not in params
    assert stage_params(config, "prepare_source")["synthetic"]["num_train_ids"] == 40


def test_bad_source_keys_are_refused_naming_the_section():
    with pytest.raises(ConfigError, match=r"config key 'source.train.epochs'"):
        resolve_config({"model": {"pretrained": "source"}, "source": {"train": {"epochs": 0}}})
    with pytest.raises(ConfigError, match="source.pretrained"):
        resolve_config({"model": {"pretrained": "source"}, "source": {"pretrained": "source"}})
    # unused source settings are not checked
    resolve_config({"source": {"train": {"epochs": 0}}})


# ---------------------------------------------------------------- workflow plan


def _dry_run(tmp_path, extra: dict) -> str:
    config_file = tmp_path / "extra.yaml"
    config_file.write_text(yaml.safe_dump(extra))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-n", "--quiet", "rules",
                           "--configfile", str(config_file)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_dry_run_plans_source_pretraining_and_the_supervised_reference(tmp_path):
    plain = _dry_run(tmp_path, {})
    assert "pretrain_source" not in plain and "train_supervised" not in plain
    full = _dry_run(tmp_path, {"model": {"pretrained": "source"}, "supervised_reference": True})
    for rule in ("prepare_source", "pretrain_source", "train_supervised"):
        assert rule in full, rule


# ---------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    prepared = prepare_tiny_dataset(tmp_path_factory.mktemp("learning"))
    return {**prepared, "config": tiny_config(prepared["data_root"], train={"epochs": 1, "iters": 2,
                                                                            "eval_every": 0})}


def _paths(base):
    return {"model_out": base / "model.pth", "log_jsonl": base / "log.jsonl",
            "curve_png": base / "curve.png", "state_dir": base / "state"}


def test_teacher_starts_from_the_source_weights(dataset, tmp_path):
    """pretrain_source's checkpoint is where the teacher starts: the teacher's 'untrained' test
    mAP is that of the source checkpoint, and without the weights the stage refuses to start."""
    config = dataset["config"]
    source = _paths(tmp_path / "source")
    train_supervised.run(stage_config(config, "train_supervised"), manifest=dataset["manifest"], **source,
                         role="source")
    assert torch.load(source["model_out"], weights_only=False)["role"] == "source"
    source_log = [json.loads(line) for line in source["log_jsonl"].read_text().splitlines()]

    from_source = dict(config, model=dict(config["model"], pretrained="source"), source={})
    teacher = _paths(tmp_path / "teacher")
    with pytest.raises(ValueError, match="source weights"):
        train_teacher.run(stage_config(resolve_config(from_source), "train_teacher"),
                          manifest=dataset["manifest"], **teacher)
    train_teacher.run(stage_config(resolve_config(from_source), "train_teacher"), manifest=dataset["manifest"],
                      **teacher, source_weights=source["model_out"])
    teacher_log = [json.loads(line) for line in teacher["log_jsonl"].read_text().splitlines()]
    final_source_map = _evaluate_untrained(config, dataset, source["model_out"])
    assert teacher_log[0]["phase"] == "untrained"
    assert teacher_log[0]["mAP"] == pytest.approx(final_source_map, abs=1e-9)
    assert source_log[0]["phase"] == "untrained" and len(source_log) == 2
    assert {"nmi", "ari", "multi_camera_share", "mean_cluster_size"} <= set(teacher_log[1])


def _evaluate_untrained(config, dataset, checkpoint) -> float:
    from purireid.data import read_manifest
    from purireid.runtime.distributed import DistContext
    from purireid.io.checkpoints import load_model_checkpoint
    from purireid.evaluation.inference import cache_dir_for, evaluate_model

    model = load_model_checkpoint(checkpoint, torch.device("cpu"))
    splits = read_manifest(dataset["manifest"])
    metrics = evaluate_model(model, splits, stage_config(config, "train_teacher"), DistContext(),
                             rerank=False, max_rank=1, cache_dir=cache_dir_for(dataset["manifest"]))
    return metrics["mAP"]


def test_replacement_advice_says_when_most_classes_are_smaller_than_a_batch_takes():
    labels = np.repeat(np.arange(6), [2, 3, 2, 8, 3, 9])  # 4 of 6 classes under 4 images
    advice = replacement_advice(labels, 4)
    assert "4 of 6 classes" in advice and "train.num_instances=4" in advice and "with replacement" in advice
    assert replacement_advice(labels, 2) is None
    assert replacement_advice(np.array([-1, -1]), 4) is None  # nothing clustered: no classes to judge
