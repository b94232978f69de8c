"""The four compute stages on a tiny synthetic dataset (CPU, ResNet-18, 64×32 images)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from purireid import VIEWS
from conftest import prepare_tiny_dataset, tiny_config as shared_tiny_config
from purireid.config import deep_merge
from purireid.data import TrainLoader, read_manifest
from purireid.distributed import DistContext
from purireid.features import FeatureFileMismatch, read_features_h5
from purireid.io import sha256_file
from purireid.stages import evaluate, extract_features, train_student, train_teacher
from purireid.stages.trainer import DegenerateClustering, TeacherGuidance, _train_epoch, check_clusters
from purireid.stages.common import GracefulTermination, load_model_checkpoint



def tiny_config(data_root: Path, **sections) -> dict:
    return shared_tiny_config(data_root, **deep_merge({"train": {"epochs": 2, "iters": 2, "eval_every": 1}}, sections))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    prepared = prepare_tiny_dataset(tmp_path_factory.mktemp("stages"))
    return {**prepared, "config": tiny_config(prepared["data_root"])}


def teacher_paths(base: Path) -> dict:
    return {"model_out": base / "model.pth", "log_jsonl": base / "log.jsonl",
            "curve_png": base / "curve.png", "state_dir": base / "state"}


@pytest.fixture(scope="module")
def teacher(dataset) -> dict:
    out = dataset["root"] / "results" / "teacher"
    paths = teacher_paths(out)
    train_teacher.run(dataset["config"], manifest=dataset["manifest"], **paths)
    features = out / "train_features.h5"
    extract_features.run(dataset["config"], manifest=dataset["manifest"], checkpoint=paths["model_out"],
                         features_out=features)
    return {**paths, "features": features}


def test_teacher_stage_writes_model_log_curve_and_clears_state(dataset, teacher):
    assert teacher["model_out"].exists() and teacher["curve_png"].exists()
    assert not (teacher["state_dir"] / "state.pth").exists()
    lines = [json.loads(line) for line in teacher["log_jsonl"].read_text().splitlines()]
    assert lines[0]["epoch"] == "untrained" and 0.0 <= lines[0]["mAP"] <= 1.0
    epochs = [r for r in lines[1:]]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        assert r["clusters"] >= 4 and r["outliers"] >= 0 and 0 < r["purity"] <= 1
        assert np.isfinite(r["loss"]) and r["images_per_s"] > 0 and r["mAP"] is not None
    assert (teacher["model_out"].parent / "config.yaml").exists()


def test_feature_file_layout_and_refusals(dataset, teacher, tmp_path):
    train = read_manifest(dataset["manifest"])["train"]
    with h5py.File(teacher["features"], "r") as h5:
        for view in VIEWS:
            assert h5[f"features/{view}"].shape == (len(train), 512)
            assert h5[f"features/{view}"].dtype == np.float32
        assert [p.decode() for p in h5["paths"][()]] == [r.path for r in train]
        assert list(h5["camids"][()]) == [r.camid for r in train]
        assert h5.attrs["checkpoint_sha256"] == sha256_file(teacher["model_out"])
        assert "model:" in h5.attrs["config"] and h5.attrs["purireid_version"]
    stored = read_features_h5(teacher["features"])
    norms = stored["features"]["global"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    with pytest.raises(FeatureFileMismatch, match="extract_teacher_features"):
        read_features_h5(teacher["features"], expected_checkpoint_sha256="0" * 64)
    with pytest.raises(FeatureFileMismatch, match="differ from the manifest"):
        read_features_h5(teacher["features"], expected_paths=[r.path for r in train][::-1])


def test_extraction_matches_model_output(dataset, teacher):
    model = load_model_checkpoint(teacher["model_out"], torch.device("cpu")).eval()
    stored = read_features_h5(teacher["features"])["features"]
    from purireid.stages.trainer import extract_records
    again = extract_records(model, read_manifest(dataset["manifest"])["train"], dataset["config"], DistContext(), "x")
    for view in VIEWS:
        assert torch.allclose(stored[view], again[view], atol=1e-5)


def test_student_and_evaluation(dataset, teacher):
    out = dataset["root"] / "results" / "student"
    paths = teacher_paths(out)
    train_student.run(dataset["config"], manifest=dataset["manifest"], teacher_checkpoint=teacher["model_out"],
                      teacher_features=teacher["features"], **paths)
    lines = [json.loads(line) for line in paths["log_jsonl"].read_text().splitlines()]
    assert [r["epoch"] for r in lines] == ["untrained", -1, 0, 1]
    assert lines[1]["distill_global"] >= 0 and "distill_global" in lines[2]
    eval_json = out / "eval.json"
    evaluate.run(dataset["config"], manifest=dataset["manifest"], checkpoint=paths["model_out"],
                 eval_json=eval_json, cmc_png=out / "cmc.png", ranked_png=out / "ranked.png")
    result = json.loads(eval_json.read_text())
    assert set(result) >= {"mAP", "rank1", "rank5", "rank10", "cmc", "num_queries"}
    assert result["rank1"] <= result["rank5"] <= result["rank10"] and 0 <= result["mAP"] <= 1
    assert result["num_queries"] == len(read_manifest(dataset["manifest"])["query"])
    from PIL import Image
    with Image.open(out / "ranked.png") as img:
        assert img.width > img.height  # a row of query + ranked gallery images
    assert (out / "cmc.png").stat().st_size > 1000


def test_student_refuses_features_of_another_teacher(dataset, teacher, tmp_path):
    other = tmp_path / "other.pth"
    ckpt = torch.load(teacher["model_out"], weights_only=False)
    ckpt["epochs"] = -5
    torch.save(ckpt, other)
    with pytest.raises(FeatureFileMismatch, match="retrained"):
        train_student.run(dataset["config"], manifest=dataset["manifest"], teacher_checkpoint=other,
                          teacher_features=teacher["features"], **teacher_paths(tmp_path / "student"))


def test_mu_zero_reduces_to_teacher_training(dataset, teacher):
    """With μ = 0 a student epoch updates the weights exactly as a teacher epoch does."""
    config = tiny_config(dataset["config"]["data_root"], student={"mu": 0.0}, train={"iters": 2})
    train_records = read_manifest(dataset["manifest"])["train"]
    pids = np.array([r.pid for r in train_records])
    data = config["data"]
    loader = TrainLoader(train_records, config["data_root"], height=data["height"], width=data["width"],
                         batch_size=config["train"]["batch_size"], num_instances=config["train"]["num_instances"],
                         iters=2, seed=1, use_cache=True, cache_dir=dataset["manifest"].parent / "cache")
    teacher_model = load_model_checkpoint(teacher["model_out"], torch.device("cpu"))
    guidance = TeacherGuidance(teacher_model, read_features_h5(teacher["features"])["features"], "x")
    results = []
    for guide in (None, guidance):
        torch.manual_seed(0)
        from purireid.models import build_model
        model = build_model("resnet18", "none")
        optimizer = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4)
        with GracefulTermination() as term:
            record = _train_epoch(model, model, optimizer, config, DistContext(), epoch=0, index=1,
                                  train_records=train_records, train_pids=pids, loader=loader,
                                  cache_dir=dataset["manifest"].parent / "cache", teacher=guide, term=term)
        results.append((record, model.state_dict()))
    (r0, s0), (r1, s1) = results
    assert r0["loss"] == r1["loss"]
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key


def test_degenerate_clustering_suggests_eps(dataset):
    config = dataset["config"]
    with pytest.raises(DegenerateClustering, match=r"raise config key 'cluster.eps'"):
        check_clusters(np.full(40, -1), config, epoch=3)
    with pytest.raises(DegenerateClustering, match=r"lower config key 'cluster.eps'"):
        check_clusters(np.zeros(40, dtype=int), config, epoch=3)
    assert check_clusters(np.repeat(np.arange(6), 5), config, epoch=0) == 6


def test_degenerate_epoch_stops_teacher_with_clear_error(dataset, tmp_path):
    config = tiny_config(dataset["config"]["data_root"], cluster={"eps": 1e-6})
    with pytest.raises(DegenerateClustering, match="cluster.eps"):
        train_teacher.run(config, manifest=dataset["manifest"], **teacher_paths(tmp_path))
    assert not (tmp_path / "model.pth").exists()


RUN_TEACHER = textwrap.dedent("""
    import sys, yaml
    from purireid.log import setup_logging
    from purireid.stages import train_teacher
    config = yaml.safe_load(open(sys.argv[1]))
    setup_logging(sys.argv[3])
    out = sys.argv[2]
    train_teacher.run(config, manifest=sys.argv[4], model_out=out + "/model.pth", log_jsonl=out + "/log.jsonl",
                      curve_png=out + "/curve.png", state_dir=out + "/state")
""")


def _run_teacher(tmp: Path, config: dict, manifest: Path, name: str) -> subprocess.Popen:
    import yaml
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp / name
    out.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", RUN_TEACHER, str(cfg), str(out), str(out / "run.log"), str(manifest)],
                            env=env, start_new_session=True)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_teacher_resumes_to_the_same_weights(dataset, tmp_path, sig):
    config = tiny_config(dataset["config"]["data_root"], train={"epochs": 3, "iters": 2, "eval_every": 0})
    reference = _run_teacher(tmp_path, config, dataset["manifest"], "reference")
    assert reference.wait(timeout=600) == 0

    proc = _run_teacher(tmp_path, config, dataset["manifest"], "killed")
    state = tmp_path / "killed" / "state" / "state.pth"
    deadline = time.time() + 600
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert state.exists(), "no epoch state was saved"
    os.killpg(proc.pid, sig)
    code = proc.wait(timeout=120)
    assert code != 0
    assert not (tmp_path / "killed" / "model.pth").exists()

    resumed = _run_teacher(tmp_path, config, dataset["manifest"], "killed")
    assert resumed.wait(timeout=600) == 0
    assert "resuming teacher" in (tmp_path / "killed" / "run.log").read_text()
    a = torch.load(tmp_path / "reference" / "model.pth", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "killed" / "model.pth", weights_only=False)["state_dict"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    log = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == ["untrained", 0, 1, 2]


def test_keep_best_outputs_the_best_evaluated_epoch(dataset, tmp_path):
    """train.keep_best: the output is the epoch with the best test mAP, not the last one."""
    config = tiny_config(dataset["config"]["data_root"], train={"epochs": 3, "iters": 2, "eval_every": 1,
                                                                 "keep_best": True, "lr": 0.01})
    paths = teacher_paths(tmp_path)
    train_teacher.run(config, manifest=dataset["manifest"], **paths)
    log = [json.loads(line) for line in paths["log_jsonl"].read_text().splitlines()]
    evaluated = {r["epoch"]: r["mAP"] for r in log if isinstance(r["epoch"], int)}
    model = load_model_checkpoint(paths["model_out"], torch.device("cpu"))
    from purireid.stages.trainer import evaluate_model
    got = evaluate_model(model, read_manifest(dataset["manifest"]), config, DistContext())["mAP"]
    assert got == pytest.approx(max(evaluated.values()), abs=1e-6)
    assert not (paths["state_dir"] / "best.pth").exists()
