"""Damaged files and bad setups, each named in one line with the command that fixes it: a
truncated image cache (rebuilt), a manifest cut mid-row, a damaged checkpoint, the project's own
errors in a rule log (no traceback), a read-only results folder, config mistakes (`purireid
config` and the workflow's own message), and TensorBoard's event files."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, fake_snakemake, run_workflow_script, tiny_config, tmpfs_mount
from purireid.config.check import Layer, check_layers, read_layer
from purireid.data import (
    DatasetError, build_image_cache, generate_synthetic, load_dataset, read_manifest, write_manifest,
)
from purireid.io.checkpoints import CheckpointError, load_model_checkpoint, save_model_checkpoint
from purireid.io.tensorboard import EVENT_FILE, write_event_file
from purireid.model.network import build_model
from purireid.serving.cli import main as cli

TINY = REPO / "tests" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("images")
    generate_synthetic(root / "synthetic" / "Synthetic-ReID", num_train_ids=4, num_test_ids=2, images_per_id=4,
                       num_cameras=2, height=32, width=16)
    return {"root": root, "splits": load_dataset("synthetic", root)}


# --------------------------------------------------------------------------- the image cache


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_image_cache_is_rebuilt_with_a_log_line(tmp_path, images, caplog, damage):
    """A cache file cut short (a kill or a full disk while it was copied) or with another header is
    found before it is memory-mapped, named in the log and rebuilt: the same bytes as before."""
    records = images["splits"]["train"]
    path = build_image_cache(records, images["root"], tmp_path, 32, 16, workers=1, progress=False)
    good = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    else:
        np.save(path, np.zeros((len(records) + 1, 32, 16, 3), np.uint8))  # another shape, same name
    with caplog.at_level(logging.WARNING, logger="purireid"):
        again = build_image_cache(records, images["root"], tmp_path, 32, 16, workers=1, progress=False)
    assert again == path and path.read_bytes() == good
    assert f"image cache {path} is damaged" in caplog.text and "rebuilding it" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="purireid"):
        build_image_cache(records, images["root"], tmp_path, 32, 16, workers=1, progress=False)
    assert "damaged" not in caplog.text  # a sound cache is used as it is


# --------------------------------------------------------------------------- the manifest


def test_manifest_cut_mid_row_names_file_line_and_command(tmp_path, images):
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, images["splits"])
    text = manifest.read_text()
    assert read_manifest(manifest)["train"] == sorted(images["splits"]["train"])
    lines = text.splitlines(keepends=True)
    empty_camid = "".join(lines[:5]) + lines[5].rsplit(",", 1)[0] + ",\r\n"  # line 6 lost its last field
    for cut, line in ((text[: len(text) - 3], len(lines)), (empty_camid, 6)):
        manifest.write_text(cut)
        with pytest.raises(DatasetError) as info:
            read_manifest(manifest)
        message = str(info.value)
        assert message.startswith(f"{manifest}:{line}:"), message
        assert "snakemake --forcerun prepare_dataset" in message and "\n" not in message, message


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run") / "teacher" / "model.pth"
    torch.manual_seed(0)
    save_model_checkpoint(path, build_model("resnet18", "none"), tiny_config("data"))
    return path


def test_damaged_checkpoint_is_called_damaged_with_the_rebuild_command(tmp_path, checkpoint):
    damaged = tmp_path / "teacher" / "model.pth"
    damaged.parent.mkdir()
    data = checkpoint.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_model_checkpoint(damaged, torch.device("cpu"))
    message = str(info.value)
    assert f"checkpoint {damaged} is damaged" in message, message
    # A plain rerun keeps a file newer than its inputs: the fix forces the rule that writes it.
    assert message.endswith("rebuild it with snakemake --forcerun train_teacher"), message


def test_cli_calls_a_truncated_checkpoint_damaged(tmp_path, checkpoint, images, capsys):
    damaged = tmp_path / "model.pth"
    damaged.write_bytes(checkpoint.read_bytes()[:100_000])
    assert cli(["extract", str(damaged), str(images["root"]), "--out", str(tmp_path / "f.h5")]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {damaged} is damaged" in err and "unknown format" not in err, err


def test_extract_says_it_replaces_an_existing_out_file(tmp_path, checkpoint, images, capsys):
    out = tmp_path / "f.h5"
    out.write_text("old")
    assert cli(["extract", str(checkpoint), str(images["root"]), "--out", str(out), "--workers", "1"]) == 0
    assert f"extract: {out} exists; it is replaced once the new file is complete" in capsys.readouterr().out


# --------------------------------------------------------------------------- rule logs


def _job(tmp_path: Path, manifest: Path):
    config = tiny_config(tmp_path / "data")
    return fake_snakemake("extract_teacher_features", config, log=tmp_path / "job.log",
                          input={"manifest": manifest, "checkpoint": tmp_path / "teacher" / "model.pth"},
                          output={"features": tmp_path / "teacher" / "train_features.h5"})


def test_a_known_error_is_one_line_in_the_rule_log(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("split,path,pid,camid\r\ntrain,a.jpg,1,")  # cut mid-row
    with pytest.raises(SystemExit) as info:
        run_workflow_script("extract_teacher_features.py", _job(tmp_path, manifest))
    assert info.value.code == 1
    text = (tmp_path / "job.log").read_text()
    assert f"extract_teacher_features failed: {manifest}:2:" in text, text
    assert "Traceback" not in text, text


def test_an_unexpected_error_keeps_its_traceback(tmp_path, monkeypatch):
    import purireid.stages.extract_teacher_features as stage

    def crash(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(stage, "run", crash)
    with pytest.raises(SystemExit):
        run_workflow_script("extract_teacher_features.py", _job(tmp_path, tmp_path / "manifest.csv"))
    text = (tmp_path / "job.log").read_text()
    assert "failed: a bug" in text and "Traceback" in text and "ZeroDivisionError" in text, text


# --------------------------------------------------------------------------- the workflow's start


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("snakemake")
    return subprocess.run([str(exe), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), *args],
                          cwd=workdir, capture_output=True, text=True, timeout=300)


@pytest.fixture
def read_only_results(tmp_path):
    yield from tmpfs_mount(tmp_path / "results", "size=64k,ro", "a read-only results folder")


def test_read_only_results_folder_is_one_line_before_any_job(tmp_path, read_only_results):
    proc = snakemake(tmp_path, "--cores", "1", "--configfile", str(TINY))
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if "results folder" in line]
    assert len(lines) == 1 and "read-only" in lines[0] and "results_dir" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Errno" not in proc.stderr, proc.stderr
    assert snakemake(tmp_path, "-n", "--configfile", str(TINY)).returncode == 0  # a dry run writes nothing


def test_workflow_config_error_names_the_file_and_the_nearest_key(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("train:\n  epocs: 3\n")
    proc = snakemake(tmp_path, "-n", "--configfile", str(bad))
    assert proc.returncode == 1
    assert "mine.yaml: config key 'train.epocs' is not a config key; did you mean 'train.epochs'?" in proc.stderr
    ours = proc.stderr.split("invalid configuration:", 1)[1]  # after Snakemake's own line naming its profile
    assert str(REPO) not in ours and "File \"" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = snakemake(tmp_path, "-n", "--config", "seed=x")
    assert "the command line (--config): config key 'seed'" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- purireid config


def test_config_refuses_each_mistake_in_one_line(tmp_path, capsys):
    cases = {
        "syntax.yaml": ("train:\n  epochs: [3\n", "syntax.yaml:3:1: YAML syntax error"),
        "typo.yaml": ("train:\n  epocs: 3\n", "typo.yaml: config key 'train.epocs' is not a config key; did you mean "
                      "'train.epochs'?"),
        "range.yaml": ("cluster:\n  eps: 5\n", "range.yaml: config key 'cluster.eps'"),
        "retired.yaml": ("train:\n  momentum: 0.2\n", "retired.yaml: config key 'train.momentum' is now "
                         "'train.memory_momentum'"),
        "cross.yaml": ("train:\n  batch_size: 30\n",
                       "cross.yaml: config key 'train.batch_size' (30) must be a multiple"),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        assert cli(["config", str(tmp_path / name)]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith(f"purireid config: error: {tmp_path}/{expected}"), err
        assert len(err.strip().splitlines()) == 1, err


def test_config_prints_a_stage_config(tmp_path, capsys):
    assert cli(["config", str(TINY), "--stage", "train_teacher", "--config", "seed=3"]) == 0
    out = capsys.readouterr().out
    job = yaml.safe_load(out)
    assert job["seed"] == 3 and job["cluster"]["k1"] == 10 and "student" not in job
    assert out.startswith("# the config job train_teacher is given: config.yaml + ")


def test_config_layers_name_who_set_a_key():
    default = read_layer(REPO / "config.yaml", "config.yaml")
    assert check_layers([default])[1] == []
    problems = check_layers([default, Layer("a.yaml", {"seed": "x"}), Layer("b.yaml", {"epochs": 2})])[1]
    assert problems[0] == "b.yaml: config key 'epochs' is not a config key; did you mean 'train.epochs'?"
    assert problems[1].startswith("a.yaml: config key 'seed'"), problems


# --------------------------------------------------------------------------- TensorBoard


RECORDS = [{"epoch": None, "phase": "untrained", "mAP": 0.1, "seconds": 2.0},
           {"epoch": 0, "phase": "train", "loss": 3.5, "mAP": 0.2, "gpu_memory_peak_gb": None, "seconds": 5.0}]


def test_event_file_holds_the_log_scalars(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("the tensorboard package is not installed (pip install -e '.[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = write_event_file(tmp_path / "log.jsonl", RECORDS)
    assert path == tmp_path / EVENT_FILE
    first = path.read_bytes()
    assert write_event_file(tmp_path / "log.jsonl", RECORDS).read_bytes() == first  # rewritten, same bytes
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "mAP", "seconds"]
    assert [(e.step, round(e.value, 6), e.wall_time) for e in events.Scalars("mAP")] == [(0, 0.1, 2.0), (1, 0.2, 7.0)]
    assert [e.step for e in events.Scalars("loss")] == [1]


def test_without_tensorboard_nothing_is_written(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert write_event_file(tmp_path / "log.jsonl", RECORDS) is None
    assert list(tmp_path.iterdir()) == []


def test_doctor_names_the_config_file_that_set_a_bad_key(tmp_path, capsys):
    mine = tmp_path / "mine.yaml"
    mine.write_text("cluster:\n  epz: 0.5\n")
    assert cli(["doctor", "--config", str(mine), "--skip-run"]) == 1
    err = capsys.readouterr().err
    expected = f"{mine}: config key 'cluster.epz' is not a config key; did you mean 'cluster.eps'?"
    assert err.strip() == f"purireid doctor: error: {expected}", err
