"""The four compute stages on a tiny synthetic dataset (CPU, ResNet-18, 64×32 images)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from purireid import VIEWS
from conftest import prepare_tiny_dataset, start_teacher_job, tiny_config as shared_tiny_config
from purireid.config.resolve import deep_merge, stage_config
from purireid.data import TrainLoader, read_manifest
from purireid.runtime.distributed import DistContext
from purireid.io.files import sha256_file
from purireid.labels.sources import DegenerateClustering, PseudoLabels, TrueLabels, check_clusters
from purireid.training.losses import view_weights
from purireid.stages import evaluate, extract_teacher_features, train_student, train_teacher
from purireid.io.checkpoints import load_model_checkpoint
from purireid.io.features import FeatureFileMismatch, read_teacher_features
from purireid.evaluation.inference import evaluate_model, extract_records
from purireid.runtime.signals import GracefulTermination
from purireid.training.loop import EpochPlan, TeacherGuidance, TrainFiles, TrainingRun, run_epoch, train
from purireid.training.terms import build_terms


def tiny_config(data_root: Path, **sections) -> dict:
    return shared_tiny_config(data_root, **deep_merge({"train": {"epochs": 2, "iters": 2, "eval_every": 1}}, sections))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    prepared = prepare_tiny_dataset(tmp_path_factory.mktemp("stages"))
    return {**prepared, "config": tiny_config(prepared["data_root"])}


def job(config: dict, stage: str) -> dict:
    """What the workflow gives `stage`'s job: its params plus its execution-only keys, nothing
    else, so a stage reading an undeclared key fails here (KeyError)."""
    return stage_config(config, stage)


def teacher_paths(base: Path) -> dict:
    return {"model_out": base / "model.pth", "log_jsonl": base / "log.jsonl",
            "curve_png": base / "curve.png", "state_dir": base / "state"}


@pytest.fixture(scope="module")
def teacher(dataset) -> dict:
    out = dataset["root"] / "results" / "teacher"
    paths = teacher_paths(out)
    train_teacher.run(job(dataset["config"], "train_teacher"), manifest=dataset["manifest"], **paths)
    features = out / "train_features.h5"
    extract_teacher_features.run(job(dataset["config"], "extract_teacher_features"), manifest=dataset["manifest"],
                                 checkpoint=paths["model_out"], features_out=features)
    return {**paths, "features": features}


def test_teacher_stage_writes_model_log_curve_and_clears_state(dataset, teacher):
    assert teacher["model_out"].exists() and teacher["curve_png"].exists()
    assert not (teacher["state_dir"] / "state.pth").exists()
    lines = [json.loads(line) for line in teacher["log_jsonl"].read_text().splitlines()]
    assert (lines[0]["epoch"], lines[0]["phase"]) == (None, "untrained") and 0.0 <= lines[0]["mAP"] <= 1.0
    assert lines[0]["rank1"] <= lines[0]["rank5"] <= lines[0]["rank10"] and lines[0]["mINP"] <= 1.0
    epochs = [r for r in lines[1:]]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        # at least the 2 pseudo-identities a batch of 8 = 2 x 4 needs (the tiny set's 12
        # identities in 3 cameras merge into few clusters with config.yaml's same-camera offset)
        assert r["clusters"] >= 2 and r["outliers"] >= 0 and 0 < r["purity"] <= 1
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
        assert "data:" in h5.attrs["config"] and h5.attrs["purireid_version"]  # the extraction job's config
    stored = read_teacher_features(teacher["features"])
    norms = stored["features"]["global"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    with pytest.raises(FeatureFileMismatch, match="extract_teacher_features"):
        read_teacher_features(teacher["features"], expected_checkpoint_sha256="0" * 64)
    with pytest.raises(FeatureFileMismatch, match="differ from the manifest"):
        read_teacher_features(teacher["features"], expected_paths=[r.path for r in train][::-1])


def test_extraction_matches_model_output(dataset, teacher):
    model = load_model_checkpoint(teacher["model_out"], torch.device("cpu")).eval()
    stored = read_teacher_features(teacher["features"])["features"]
    again = extract_records(model, read_manifest(dataset["manifest"])["train"], dataset["config"], DistContext(), "x")
    for view in VIEWS:
        assert torch.allclose(stored[view], again[view], atol=1e-5)


def test_student_and_evaluation(dataset, teacher):
    out = dataset["root"] / "results" / "student"
    paths = teacher_paths(out)
    # student.step_size 2: the warm-up and epoch 0 at train.lr, epoch 1 decayed by train.gamma;
    # the teacher (train.step_size 20) kept its rate throughout.
    config = deep_merge(dataset["config"], {"student": {"step_size": 2}})
    train_student.run(job(config, "train_student"), manifest=dataset["manifest"],
                      teacher_checkpoint=teacher["model_out"], teacher_features=teacher["features"], **paths)
    lines = [json.loads(line) for line in paths["log_jsonl"].read_text().splitlines()]
    assert [(r["epoch"], r["phase"]) for r in lines] == [(None, "untrained"), (-1, "warmup"), (0, "train"), (1, "train")]
    assert lines[1]["distill_global"] >= 0 and "distill_global" in lines[2]
    lr, gamma = config["train"]["lr"], config["train"]["gamma"]
    assert [r["lr"] for r in lines[1:]] == pytest.approx([lr, lr, lr * gamma])
    teacher_lines = [json.loads(line) for line in teacher["log_jsonl"].read_text().splitlines()]
    assert [r["lr"] for r in teacher_lines[1:]] == pytest.approx([lr, lr])
    eval_json = out / "eval.json"
    evaluate.run(job(dataset["config"], "evaluate"), manifest=dataset["manifest"], checkpoint=paths["model_out"],
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
    data = config["data"]
    loader = TrainLoader(train_records, config["data_root"], height=data["height"], width=data["width"],
                         batch_size=config["train"]["batch_size"], num_instances=config["train"]["num_instances"],
                         iters=2, seed=1, use_cache=True, cache_dir=dataset["manifest"].parent / "cache")
    teacher_model = load_model_checkpoint(teacher["model_out"], torch.device("cpu"))
    guidance = TeacherGuidance(teacher_model, read_teacher_features(teacher["features"])["features"], "x")
    camids = np.array([r.camid for r in train_records], dtype=np.int64)
    plan = EpochPlan(index=1, epoch=0, label_source=PseudoLabels(config, camids=camids), iters=2,
                     memory_momentum=config["train"]["memory_momentum"])
    results = []
    for guide in (None, guidance):
        torch.manual_seed(0)
        from purireid.model.network import build_model
        model = build_model("resnet18", "none", input_norm=config["model"]["input_norm"])
        optimizer = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4)
        with GracefulTermination() as stop:
            run = TrainingRun(config, DistContext(), train_records, loader, stop, build_terms(config, teacher=guide),
                              cache_dir=dataset["manifest"].parent / "cache")
            record = run_epoch(run, plan, model, optimizer)
        results.append((record, model.state_dict()))
    (r0, s0), (r1, s1) = results
    assert r0["loss"] == r1["loss"]
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key


def test_camera_proxy_term_joins_the_loss(dataset):
    """train.camera_proxy > 0 adds the camera-proxy term to every view's loss (logged as
    camproxy_<view>) and changes the step; 0 leaves the paper's loss."""
    records = read_manifest(dataset["manifest"])["train"]
    camids = np.array([r.camid for r in records], dtype=np.int64)
    results = []
    for weight in (0.0, 0.5):
        config = tiny_config(dataset["config"]["data_root"], train={"iters": 2, "camera_proxy": weight})
        data = config["data"]
        loader = TrainLoader(records, config["data_root"], height=data["height"], width=data["width"],
                             batch_size=config["train"]["batch_size"], num_instances=config["train"]["num_instances"],
                             iters=2, seed=1, use_cache=True, cache_dir=dataset["manifest"].parent / "cache")
        plan = EpochPlan(index=1, epoch=0, label_source=PseudoLabels(config, camids=camids), iters=2,
                         memory_momentum=config["train"]["memory_momentum"])
        torch.manual_seed(0)
        from purireid.model.network import build_model
        model = build_model("resnet18", "none", input_norm=config["model"]["input_norm"])
        optimizer = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4)
        with GracefulTermination() as stop:
            run = TrainingRun(config, DistContext(), records, loader, stop, build_terms(config),
                              cache_dir=dataset["manifest"].parent / "cache")
            record = run_epoch(run, plan, model, optimizer)
        results.append((record, model.state_dict()))
    (plain, s0), (with_proxies, s1) = results
    assert not any(key.startswith("camproxy_") for key in plain)
    weights = view_weights(tiny_config(dataset["config"]["data_root"])["train"]["lambda2"])
    assert all(with_proxies[f"camproxy_{v}"] > 0 for v in VIEWS)
    expected = sum(weights[v] * (with_proxies[f"ce_{v}"] + 0.5 * with_proxies[f"camproxy_{v}"]) for v in VIEWS)
    assert with_proxies["loss"] == pytest.approx(expected, rel=1e-5)
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)


def test_training_from_true_labels(dataset, tmp_path):
    """The loop trains from a given LabelSource: the identities as labels, memories from the
    model's current features (a supervised reference)."""
    config = tiny_config(dataset["config"]["data_root"], train={"epochs": 1, "iters": 2, "eval_every": 0})
    records = read_manifest(dataset["manifest"])["train"]
    paths = teacher_paths(tmp_path)
    train(job(config, "train_teacher"), TrainFiles(manifest=dataset["manifest"], **paths), ctx=DistContext(),
          label_source=TrueLabels.from_pids([r.pid for r in records], config))
    log = [json.loads(line) for line in paths["log_jsonl"].read_text().splitlines()]
    assert [r["epoch"] for r in log] == [None, 0]
    assert (log[1]["clusters"], log[1]["outliers"], log[1]["purity"]) == (len({r.pid for r in records}), 0, 1.0)
    assert torch.load(paths["model_out"], weights_only=False)["role"] == "supervised"


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




def resume_config(dataset: dict) -> dict:
    return tiny_config(dataset["config"]["data_root"], train={"epochs": 3, "iters": 2, "eval_every": 0})


@pytest.fixture(scope="module")
def uninterrupted_teacher(dataset, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    reference = start_teacher_job(tmp, resume_config(dataset), dataset["manifest"], "reference")
    assert reference.wait(timeout=600) == 0
    return tmp / "reference"


@pytest.mark.parametrize("sig, status", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_killed_teacher_resumes_to_the_same_weights(dataset, uninterrupted_teacher, tmp_path, sig, status):
    """A training job killed after an epoch resumes to the weights of an uninterrupted run; SIGTERM
    and SIGINT stop the job with status 143 / 130 and a warning, without a 'failed' traceback."""
    config = resume_config(dataset)
    proc = start_teacher_job(tmp_path, config, dataset["manifest"], "killed")
    state = tmp_path / "killed" / "state" / "state.pth"
    deadline = time.time() + 600
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert state.exists(), "no epoch state was saved"
    os.killpg(proc.pid, sig)
    code = proc.wait(timeout=120)
    assert code == status
    assert not (tmp_path / "killed" / "model.pth").exists()
    log_text = (tmp_path / "killed" / "run.log").read_text()
    if sig != signal.SIGKILL:
        assert "stopping teacher" in log_text and f"stopped by {signal.Signals(sig).name}" in log_text, log_text
        assert "failed" not in log_text and "Traceback" not in log_text, log_text

    resumed = start_teacher_job(tmp_path, config, dataset["manifest"], "killed")
    assert resumed.wait(timeout=600) == 0
    assert "resuming teacher" in (tmp_path / "killed" / "run.log").read_text()
    a = torch.load(uninterrupted_teacher / "model.pth", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "killed" / "model.pth", weights_only=False)["state_dict"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    log = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [None, 0, 1, 2]


def test_keep_best_outputs_the_best_evaluated_epoch(dataset, tmp_path):
    """train.keep_best: the output is the epoch with the best test mAP, not the last one."""
    config = tiny_config(dataset["config"]["data_root"], train={"epochs": 3, "iters": 2, "eval_every": 1,
                                                                 "keep_best": True, "lr": 0.01})
    paths = teacher_paths(tmp_path)
    train_teacher.run(config, manifest=dataset["manifest"], **paths)
    log = [json.loads(line) for line in paths["log_jsonl"].read_text().splitlines()]
    evaluated = {r["epoch"]: r["mAP"] for r in log if isinstance(r["epoch"], int)}
    model = load_model_checkpoint(paths["model_out"], torch.device("cpu"))
    got = evaluate_model(model, read_manifest(dataset["manifest"]), config, DistContext(), rerank=False,
                         max_rank=1)["mAP"]
    assert got == pytest.approx(max(evaluated.values()), abs=1e-6)
    assert not (paths["state_dir"] / "best.pth").exists()


def test_a_stop_before_the_first_epoch_keeps_no_state_and_says_so(dataset, tmp_path, monkeypatch, caplog):
    """SIGTERM before any epoch completed: exit 143, and the log says a rerun starts over (there is
    no state to resume from), not that the state of 0 epochs was kept."""
    from purireid.runtime.signals import TerminationRequested

    def stop_now(self, ctx=None):
        raise TerminationRequested("received SIGTERM", signal.SIGTERM)

    monkeypatch.setattr(GracefulTermination, "check", stop_now)
    paths = teacher_paths(tmp_path)
    with caplog.at_level("WARNING", logger="purireid"), pytest.raises(SystemExit) as stopped:
        train_teacher.run(job(dataset["config"], "train_teacher"), manifest=dataset["manifest"], **paths)
    assert stopped.value.code == 143
    assert "before its first epoch completed; no state is kept" in caplog.text
    assert "completed epochs is kept" not in caplog.text
    assert not (paths["state_dir"] / "state.pth").exists() and not paths["model_out"].exists()
