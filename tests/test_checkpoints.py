"""The one reader of model checkpoints (purireid.io.checkpoints: weights_only), what a file is
(purireid.io.filekinds) and the one HDF5 feature layout (purireid.io.features) shared by the
teacher features and `purireid extract`."""

from __future__ import annotations

import pathlib
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from purireid import VIEWS
from purireid.io.checkpoints import (
    CheckpointError, load_best, load_state, read_checkpoint, save_best, save_model_checkpoint, save_state,
)
from purireid.io.features import (
    FeatureFileMismatch, FeatureProvenance, read_feature_file, read_teacher_features, write_feature_file,
    write_teacher_features,
)
from purireid.io.filekinds import describe_file, file_kind
from purireid.model.network import build_model

CONFIG = {"model": {"arch": "resnet18"}, "data": {"height": 64, "width": 32}}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One file of every kind the reader tells apart."""
    tmp = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    model = build_model("resnet18", "none")
    save_model_checkpoint(tmp / "model.pth", model, CONFIG)
    torch.save(model.state_dict(), tmp / "bare.pth")
    torch.save({"epochs": 3}, tmp / "legacy.pth", _use_new_zipfile_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is marked deprecated
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp / "linear.pt"))
    import onnx
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, producer_name="pytorch"), str(tmp / "model.onnx"))
    write_teacher_features(tmp / "train_features.h5", {v: np.eye(3, 4, dtype=np.float32) for v in VIEWS},
                           paths=["a.jpg", "b.jpg", "c.jpg"], camids=[0, 1, 2], pids=[5, 5, 6],
                           checkpoint_sha256="a" * 64, config=CONFIG)
    with h5py.File(tmp / "other.h5", "w") as h5:
        h5["x"] = np.zeros(3)
    (tmp / "notes.txt").write_text("a text file\n")
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "random.bin").write_bytes(bytes(range(256)) * 4)
    (tmp / "folder").mkdir()
    (tmp / "folder" / "x").write_text("x")
    (tmp / "empty").mkdir()
    return {p.name: p for p in tmp.iterdir()} | {"missing": tmp / "missing.pth"}


@pytest.mark.parametrize("name, kind, phrase", [
    ("model.pth", "torch", "a purireid checkpoint (resnet18)"),
    ("bare.pth", "torch", "a PyTorch file holding a bare state_dict"),
    ("legacy.pth", "torch", "a PyTorch file holding a dict without the key(s) state_dict, arch, feat_dim, config"),
    ("linear.pt", "torchscript", "a TorchScript export"),
    ("model.onnx", "onnx", "an ONNX model"),
    ("train_features.h5", "hdf5", "the workflow's teacher-feature file of the train images (HDF5)"),
    ("other.h5", "hdf5", "an HDF5 file that purireid did not write"),
    ("notes.txt", "text", "a text file"),
    ("empty.txt", "empty file", "an empty file"),
    ("random.bin", "binary", "a binary file of an unknown format"),
    ("folder", "folder", "a folder"),
    ("empty", "empty folder", "an empty folder"),
    ("missing", "missing", "missing (no such file or folder)"),
])
def test_what_a_file_is(files, name, kind, phrase):
    assert file_kind(files[name]) == kind
    assert describe_file(files[name]).startswith(phrase)


@pytest.mark.parametrize("name, says", [
    ("bare.pth", "is a PyTorch file holding a bare state_dict"), ("linear.pt", "is a TorchScript export"),
    ("model.onnx", "is an ONNX model"), ("train_features.h5", "is the workflow's teacher-feature file"),
    ("notes.txt", "is a text file"), ("empty", "is an empty folder"), ("missing", ": no such file"),
])
def test_read_checkpoint_refuses_what_is_not_one_saying_what_it_is(files, name, says):
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(files[name], fix="THE FIX")
    message = str(info.value)
    assert message.startswith(f"checkpoint {files[name]}") and says in message and message.endswith("THE FIX")
    assert "\n" not in message


def test_checkpoint_reads_with_weights_only_and_keeps_what_the_stage_recorded(files, tmp_path):
    stored = read_checkpoint(files["model.pth"])
    assert (stored.arch, stored.feat_dim, stored.input_size) == ("resnet18", 512, (64, 32))
    assert stored.extra == {"purireid_version": stored.extra["purireid_version"]}
    marker = tmp_path / "executed"

    class Payload:  # unpickling it would create `marker`: weights_only refuses to run it
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    torch.save({"state_dict": {}, "arch": "resnet18", "feat_dim": 512, "config": CONFIG, "x": Payload()},
               tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="needs code to load"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_resume_state_and_best_round_trip_with_weights_only(tmp_path):
    """What the training loop saves (model, Adam, StepLR, the log records) loads under weights_only."""
    torch.manual_seed(0)
    model = build_model("resnet18", "none")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.1)
    model(torch.randn(2, 3, 64, 32))["global"].sum().backward()
    optimizer.step()
    scheduler.step()
    state = {"fingerprint": "f" * 64, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "next_epoch_index": 1, "best_map": -1.0,
             "log": [{"epoch": None, "phase": "untrained", "mAP": 0.25, "seconds": 1.5}]}
    save_state(tmp_path, state)
    loaded = load_state(tmp_path, "f" * 64)
    assert loaded["log"] == state["log"] and loaded["scheduler"] == state["scheduler"]
    assert torch.equal(loaded["model"]["conv1.weight"], state["model"]["conv1.weight"])
    assert load_state(tmp_path, "0" * 64) is None  # another config: start from scratch
    save_best(tmp_path, model, CONFIG, epoch=3, mAP=0.5)
    best = load_best(tmp_path)
    assert (best["epoch"], best["mAP"], best["arch"]) == (3, 0.5, "resnet18")


def test_one_layout_for_teacher_and_extract_files(files, tmp_path):
    teacher = read_feature_file(files["train_features.h5"], fix="")
    assert teacher.kind == "teacher" and teacher.input_size == (64, 32) and list(teacher.pids) == [5, 5, 6]
    assert set(teacher.features) == set(VIEWS) and teacher.feat_dim == 4
    extract = tmp_path / "gallery.h5"
    write_feature_file(extract, {"global": np.eye(2, 4, dtype=np.float32)}, ["/x/a.jpg", "/x/b.jpg"],
                       FeatureProvenance("extract", "b" * 64, (64, 32)), skipped=["/x/c.jpg"])
    with h5py.File(extract) as a, h5py.File(files["train_features.h5"]) as b:
        assert (a.attrs["format"], a.attrs["format_version"]) == (b.attrs["format"], b.attrs["format_version"])
        assert {"features", "paths"} <= set(a) & set(b)
    stored = read_feature_file(extract, fix="")
    assert (stored.kind, stored.paths, stored.skipped) == ("extract", ["/x/a.jpg", "/x/b.jpg"], ["/x/c.jpg"])
    # An extract file is not the teacher's: refused by the teacher reader with the rerun advice.
    with pytest.raises(FeatureFileMismatch, match="not a teacher-feature file.*extract_teacher_features"):
        read_teacher_features(extract)
    again = tmp_path / "again.h5"  # no timestamps: equal features, equal bytes
    write_feature_file(again, {"global": np.eye(2, 4, dtype=np.float32)}, ["/x/a.jpg", "/x/b.jpg"],
                       FeatureProvenance("extract", "b" * 64, (64, 32)), skipped=["/x/c.jpg"])
    assert again.read_bytes() == extract.read_bytes()


def test_teacher_file_of_the_previous_layout_is_read(tmp_path):
    """Before the shared layout the teacher file had no format attributes and no input size."""
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as h5:
        for view in VIEWS:
            h5[f"features/{view}"] = np.ones((2, 3), np.float32)
        h5.create_dataset("paths", data=np.asarray(["a.jpg", "b.jpg"], dtype=h5py.string_dtype()))
        h5["camids"], h5["pids"] = np.zeros(2, np.int64), np.arange(2)
        h5.attrs.update({"checkpoint_sha256": "c" * 64, "config": yaml.safe_dump(CONFIG), "purireid_version": "0.1"})
    stored = read_teacher_features(path, expected_checkpoint_sha256="c" * 64, expected_paths=["a.jpg", "b.jpg"])
    assert stored["features"]["lower"].shape == (2, 3) and stored["paths"] == ["a.jpg", "b.jpg"]
    assert read_feature_file(path, fix="").input_size == (64, 32)  # from its config
