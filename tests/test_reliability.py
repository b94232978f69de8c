"""Faults a job must survive with a clear message and no damage: a full disk while saving the
resume state, building the image cache or writing any other output (one message for every
writer), a truncated teacher-feature file, an image damaged after prepare_dataset, the hidden
temporaries a killed job leaves; outputs that are byte-reproducible and readable as the umask
allows; and a SIGTERM to the whole process group, DataLoader workers included. (Signals to the
main process: tests/test_stages.py; bad configs: tests/test_config.py.)"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, fake_snakemake, prepare_tiny_dataset, run_workflow_script, start_teacher_job, tiny_config
from purireid import VIEWS
from purireid.data import DatasetError, TrainLoader, build_image_cache, build_test_loader, generate_synthetic, load_dataset
from purireid.data.prepare import validate_images
from purireid.io.files import (
    DiskFullError, atomic_dir, atomic_path, torch_save_atomic, write_json_atomic, write_text_atomic, write_yaml_atomic,
)
from purireid.model.network import build_model
from purireid.io.checkpoints import save_model_checkpoint, save_state
from purireid.io.features import FeatureFileMismatch, read_teacher_features, write_teacher_features


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory) -> dict:
    """A few dozen small synthetic images (more than the 256 KiB tmpfs holds once cached)."""
    root = tmp_path_factory.mktemp("images")
    generate_synthetic(root / "synthetic" / "Synthetic-ReID", num_train_ids=6, num_test_ids=2, images_per_id=8,
                       num_cameras=2, height=64, width=32)
    return {"root": root, "train": load_dataset("synthetic", root)["train"]}


# --------------------------------------------------------------------------- D2: resume state, disk full


def test_disk_full_saving_resume_state_names_the_file(small_tmpfs):
    state = {"fingerprint": "x", "model": {"w": torch.zeros(200_000)}, "next_epoch_index": 1}  # 800 kB
    with pytest.raises(DiskFullError) as info:
        save_state(small_tmpfs / "state", state)
    message = str(info.value)
    assert "no space left" in message and str(small_tmpfs / "state" / "state.pth") in message, message
    assert leftovers(small_tmpfs) == ["state"], "a temporary file was left behind"


# --------------------------------------------------------------------------- D3: image cache, disk full


def test_disk_full_building_the_image_cache_is_an_error_not_sigbus(small_tmpfs, tiny_images):
    records = tiny_images["train"]  # 48 images of 64x32x3: 295 kB of rows
    with pytest.raises(DiskFullError, match=f"no space left.*{small_tmpfs / 'cache'}"):
        build_image_cache(records, tiny_images["root"], small_tmpfs / "cache", 64, 32, workers=1, progress=False)
    assert not any((small_tmpfs / "cache").glob("*")), leftovers(small_tmpfs)


def test_disk_full_while_writing_the_image_cache(small_tmpfs, tiny_images, monkeypatch):
    """When the free-space check passes but the disk fills during the writes (another job wrote
    meanwhile), the write fails cleanly too: no SIGBUS, no hidden temporary file."""
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
    with pytest.raises(DiskFullError, match="no space left"):
        build_image_cache(tiny_images["train"], tiny_images["root"], small_tmpfs / "cache", 64, 32, workers=1,
                          progress=False)
    assert not any((small_tmpfs / "cache").glob("*")), leftovers(small_tmpfs)


def test_disk_full_image_cache_lands_in_the_rule_log(small_tmpfs, tmp_path, tiny_images):
    """The extract_teacher_features job with its manifest (and so its cache) on a full disk: the
    rule log holds the error, naming the cache file."""
    from purireid.data import write_manifest

    config = tiny_config(tiny_images["root"], data={"height": 64, "width": 32})
    manifest = small_tmpfs / "data" / "manifest.csv"
    write_manifest(manifest, {"train": tiny_images["train"], "query": [], "gallery": []})
    checkpoint = tmp_path / "model.pth"
    torch.manual_seed(0)
    save_model_checkpoint(checkpoint, build_model("resnet18", "none"), config)
    log = tmp_path / "extract.log"
    job = fake_snakemake("extract_teacher_features", config, log=log,
                         input={"manifest": manifest, "checkpoint": checkpoint},
                         output={"features": small_tmpfs / "teacher" / "train_features.h5"})
    with pytest.raises(SystemExit) as info:
        run_workflow_script("extract_teacher_features.py", job)
    assert info.value.code == 1
    text = log.read_text()
    assert "extract_teacher_features failed" in text and "no space left" in text, text
    assert str(small_tmpfs / "data" / "cache") in text, text
    assert not any((small_tmpfs / "data" / "cache").glob("*"))


# --------------------------------------------------------------------------- D4: every writer, disk full


def fill_up(folder: Path) -> None:
    """Fill the file system holding `folder` to its last byte."""
    with open(folder / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def _plot(path: Path) -> None:
    from purireid.evaluation.reporting import plot_cmc

    plot_cmc(path, [0.1 * k for k in range(1, 11)], "CMC")


WRITERS = {
    "text": lambda path: write_text_atomic(path, "x" * 10_000),
    "json": lambda path: write_json_atomic(path, {"mAP": 0.5, "cmc": [0.5] * 1000}),
    "yaml": lambda path: write_yaml_atomic(path, {"train": {"lr": 0.1}, "paths": ["a" * 100] * 100}),
    "torch": lambda path: torch_save_atomic({"w": torch.zeros(10_000)}, path),
    "hdf5": lambda path: _write_features(path),
    "png": _plot,
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_every_writer_names_the_full_device(small_tmpfs, writer, capfd):
    """torch, h5py (which reports a failed write in words: "errno = 28"), matplotlib and plain
    files all end in the same message, with no temporary file left and nothing else printed."""
    fill_up(small_tmpfs)
    target = small_tmpfs / "out" / f"output.{writer}"
    with pytest.raises(DiskFullError) as info:
        WRITERS[writer](target)
    message = str(info.value)
    assert f"no space left on the device holding {target.parent} while writing {target}" in message, message
    assert "free space there" in message, message
    assert leftovers(small_tmpfs) == ["filler", "out"], "a temporary file was left behind"
    assert "Traceback" not in capfd.readouterr().err  # h5py's failed flushes are not printed one by one


def test_disk_full_in_words_is_recognised():
    """Libraries that report a failed write as text (HDF5's "errno = 28") are mapped too."""
    from purireid.io.files import is_disk_full

    hdf5 = RuntimeError("Disable slist on flush dest failure failed (file write failed: time = ..., errno = 28, "
                        "error message = 'No space left on device', buf = 0x1)")
    assert is_disk_full(hdf5) and is_disk_full(OSError(errno.EDQUOT, "quota"))
    assert not is_disk_full(RuntimeError("errno = 280")) and not is_disk_full(OSError(errno.EACCES, "denied"))
    wrapped = RuntimeError("PytorchStreamWriter failed writing file data/0")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped)


def test_disk_full_teacher_features_lands_in_the_rule_log(small_tmpfs, tmp_path, tiny_images, capfd):
    """The extract_teacher_features job writing train_features.h5 onto a full disk: the rule log's
    error line is the common one, naming the file (not HDF5's "Disable slist on flush dest failure");
    the job exits with status 1 and leaves no temporary file."""
    from purireid.data import write_manifest

    config = tiny_config(tiny_images["root"], data={"height": 64, "width": 32, "use_cache": False})
    manifest = tmp_path / "data" / "manifest.csv"
    write_manifest(manifest, {"train": tiny_images["train"], "query": [], "gallery": []})
    checkpoint = tmp_path / "model.pth"
    torch.manual_seed(0)
    save_model_checkpoint(checkpoint, build_model("resnet18", "none"), config)
    log = tmp_path / "extract.log"
    features = small_tmpfs / "teacher" / "train_features.h5"  # 48 images x 3 views x 512 floats > 256 KiB
    job = fake_snakemake("extract_teacher_features", config, log=log,
                         input={"manifest": manifest, "checkpoint": checkpoint}, output={"features": features})
    with pytest.raises(SystemExit) as info:
        run_workflow_script("extract_teacher_features.py", job)
    assert info.value.code == 1
    failed = [line for line in log.read_text().splitlines() if "extract_teacher_features failed" in line]
    assert len(failed) == 1 and f"no space left on the device holding {features.parent} while writing {features}" \
        in failed[0], failed
    assert leftovers(small_tmpfs / "teacher") == []
    assert "Exception ignored" not in capfd.readouterr().err


# --------------------------------------------------------------------------- D5: a killed job's temporaries


def test_a_job_removes_the_temporaries_of_its_own_outputs_at_its_start(tmp_path):
    """SIGKILL while an output or the resume state is written leaves hidden `.name.XXXX.tmp`
    files; the job's next start removes its own (so the state folder can go once it succeeds),
    and leaves alone those of other jobs' outputs in the same folder."""
    if str(REPO / "workflow" / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "workflow" / "scripts"))
    from _workflow import run_stage

    teacher, state = tmp_path / "teacher", tmp_path / "teacher" / "state"
    state.mkdir(parents=True)
    own = [teacher / ".model.pth.a1b2c3d4.tmp", teacher / ".log.jsonl.x_y_z_12.tmp", state / ".state.pth.k9_x2abc.tmp"]
    others = [teacher / ".train_features.h5.abcdefgh.tmp", teacher / "eval.json", state / "state.pth"]
    for path in own + others:
        path.write_bytes(b"partial")
    outputs = {name: teacher / name for name in ("model.pth", "log.jsonl", "config.yaml", "curve.png")}
    job = fake_snakemake("train_teacher", tiny_config(tmp_path), log=tmp_path / "train_teacher.log", output=outputs,
                         params={"state_dir": state})
    seen = []
    run_stage(job, seen.append)
    assert len(seen) == 1  # the job ran
    assert not any(p.exists() for p in own), [p for p in own if p.exists()]
    assert all(p.exists() for p in others)
    text = (tmp_path / "train_teacher.log").read_text()
    assert "removed 3 temporary file(s)" in text and str(state / ".state.pth.k9_x2abc.tmp") in text, text
    assert "device cpu (float32; train.amp applies on CUDA only)" in text, text


# --------------------------------------------------------------------------- D6: truncated feature file


def _features(n: int = 6, dim: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {v: rng.standard_normal((n, dim)).astype(np.float32) for v in VIEWS}


def _write_features(path: Path, config: dict | None = None) -> None:
    write_teacher_features(path, _features(), paths=[f"img{i}.jpg" for i in range(6)], camids=[0] * 6,
                           pids=list(range(6)), checkpoint_sha256="a" * 64, config=config or {"data": {"height": 64}})


def test_truncated_teacher_features_name_the_file_and_the_fix(tmp_path):
    path = tmp_path / "train_features.h5"
    _write_features(path)
    assert read_teacher_features(path)["features"]["global"].shape == (6, 4)
    data = path.read_bytes()
    for size in (len(data) // 2, 100):
        path.write_bytes(data[:size])
        with pytest.raises(FeatureFileMismatch) as info:
            read_teacher_features(path)
        message = str(info.value)
        assert str(path) in message and "rerun extract_teacher_features" in message, message


# --------------------------------------------------------------------------- D6b: an image damaged after prepare


def test_image_damaged_after_prepare_names_the_file_and_the_fix(tmp_path, tiny_images):
    """An image truncated in place after prepare_dataset validated it: every loader path names the
    file and the fix (rerun prepare_dataset, whose validation names it in turn), not PIL's bare
    "Truncated File Read"."""
    root = tmp_path / "images"
    shutil.copytree(tiny_images["root"], root)
    records = load_dataset("synthetic", root)["train"]
    damaged = root / records[5].path
    damaged.write_bytes(damaged.read_bytes()[:200])
    fix = "rerun prepare_dataset (snakemake -R prepare_dataset)"
    with pytest.raises(DatasetError) as info:
        build_image_cache(records, root, tmp_path / "cache", 64, 32, workers=1, progress=False)
    assert f"image {damaged} cannot be read" in str(info.value) and fix in str(info.value), info.value
    assert not any((tmp_path / "cache").glob("*")), "a temporary cache file was left behind"
    with pytest.raises(DatasetError) as info:
        list(build_test_loader(records, root, height=64, width=32, batch_size=16))
    assert f"image {damaged} cannot be read" in str(info.value) and fix in str(info.value), info.value
    with pytest.raises(DatasetError) as info:  # the check the message points to finds it too
        validate_images([root / r.path for r in records], workers=1, progress=False)
    assert str(damaged) in str(info.value), info.value


# --------------------------------------------------------------------------- D7: byte-reproducible outputs


def test_checkpoints_and_feature_files_are_byte_reproducible(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", "none")
    config = {"model": {"arch": "resnet18"}, "device": "cpu", "train": {"gpus": 1, "lr": 0.1}}
    save_model_checkpoint(tmp_path / "a" / "model.pth", model, config)
    _write_features(tmp_path / "a" / "train_features.h5", config)
    time.sleep(1.1)  # HDF5 object headers would record the modification time, to the second
    save_model_checkpoint(tmp_path / "b" / "model.pth", model, {**config, "device": "cuda", "train": {"gpus": 4,
                                                                                                    "lr": 0.1}})
    _write_features(tmp_path / "b" / "train_features.h5", config)
    for name in ("model.pth", "train_features.h5"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    stored = torch.load(tmp_path / "a" / "model.pth", weights_only=False)
    assert stored["config"] == {"model": {"arch": "resnet18"}, "train": {"lr": 0.1}}  # no execution-only keys


# --------------------------------------------------------------------------- atomic_dir: whole folders


def test_atomic_dir_renames_the_built_folder_into_place(tmp_path):
    target = tmp_path / "out" / "set"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".set.") and not target.exists()
        (tmp / "a").mkdir()
        (tmp / "a" / "x.txt").write_text("x")
    assert (target / "a" / "x.txt").read_text() == "x"
    assert sorted(p.name for p in target.parent.iterdir()) == ["set"]  # no hidden leftovers


def test_atomic_dir_failure_leaves_the_old_folder_or_nothing(tmp_path):
    target = tmp_path / "set"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("killed half way")
    assert list(tmp_path.iterdir()) == []  # no folder, and no hidden one either
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]  # the previous build untouched


def test_atomic_dir_replaces_an_existing_folder_or_file(tmp_path):
    target = tmp_path / "set"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    other = tmp_path / "file"
    other.write_text("a file where the folder goes")
    with atomic_dir(other) as tmp:
        (tmp / "new.txt").write_text("new")
    assert other.is_dir() and (other / "new.txt").read_text() == "new"


# --------------------------------------------------------------------------- D8: modes follow the umask


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_outputs_respect_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        torch_save_atomic({"x": 1}, tmp_path / "b.pth")
        with atomic_path(tmp_path / "c.bin") as tmp:
            tmp.write_bytes(b"x")
        reference = tmp_path / "plain.txt"
        reference.write_text("x")
        generate_synthetic(tmp_path / "synthetic", num_train_ids=2, num_test_ids=2, images_per_id=3, num_cameras=2,
                           height=16, width=8)
    finally:
        os.umask(previous)
    for name in ("a.txt", "b.pth", "c.bin", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert (tmp_path / "synthetic").stat().st_mode & 0o777 == 0o777 & ~umask


def test_synthetic_defaults_come_from_the_schema(tmp_path):
    from purireid.config.resolve import schema_defaults
    from purireid.data.synthetic import synthetic_params, synthetic_params_match

    params = synthetic_params()
    assert {k: params[k] for k in schema_defaults("synthetic")} == schema_defaults("synthetic")
    generate_synthetic(tmp_path / "s", num_train_ids=2, num_test_ids=2, images_per_id=3, num_cameras=2, height=16,
                       width=8)
    assert synthetic_params_match(tmp_path / "s", num_train_ids=2, num_test_ids=2, images_per_id=3, num_cameras=2,
                                  height=16, width=8, seed=schema_defaults("synthetic")["seed"])
    with pytest.raises(TypeError, match="unknown synthetic generator parameter"):
        generate_synthetic(tmp_path / "t", num_ids=3)


# --------------------------------------------------------------------------- D9: SIGTERM to the process group


def _children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _signal_workers_while_iterating(loader, signals) -> int:
    """Iterate `loader`, sending `signals` to its worker processes after the first batch; the number of batches."""
    count = 0
    before = set(_children(os.getpid()))  # other tests' processes that may still be winding down
    for _ in loader:
        if count == 0:
            workers = sorted(set(_children(os.getpid())) - before)
            assert len(workers) == 2, workers
            for worker in workers:
                for signum in signals:
                    os.kill(worker, signum)
            time.sleep(0.2)  # the signals arrive while the workers are busy or waiting
        count += 1
    return count


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_loader_workers_leave_stop_signals_to_the_main_process(tiny_images):
    """The train and the test (feature-extraction) loaders' workers outlive a SIGTERM/SIGINT meant
    for the job: the main process decides, and the epoch's batches all arrive."""
    records, root = tiny_images["train"], tiny_images["root"]
    earlier = set(_children(os.getpid()))  # processes of other tests, not the loaders'
    test_loader = build_test_loader(records, root, height=64, width=32, batch_size=8, workers=2)
    assert _signal_workers_while_iterating(test_loader, (signal.SIGTERM, signal.SIGINT)) == len(test_loader)
    train = TrainLoader(records, root, height=64, width=32, batch_size=8, num_instances=4, iters=4, workers=2)
    labels = np.array([r.pid for r in records])
    assert _signal_workers_while_iterating(train.epoch(0, labels), (signal.SIGTERM, signal.SIGINT)) == 4
    deadline = time.time() + 30
    while set(_children(os.getpid())) - earlier and time.time() < deadline:  # shut down with their iterators
        time.sleep(0.05)
    assert not set(_children(os.getpid())) - earlier


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_sigterm_to_the_process_group_stops_like_sigterm_to_the_job(tmp_path):
    """scancel, preemption and `timeout` signal every process of the job, DataLoader workers
    included: the job still stops with status 143 and its state kept, and a rerun resumes."""
    data = prepare_tiny_dataset(tmp_path / "tiny")
    config = tiny_config(data["data_root"], data={"workers": 2}, train={"epochs": 3, "iters": 2, "eval_every": 0})
    out = tmp_path / "teacher"
    job = start_teacher_job(tmp_path, config, data["manifest"], "teacher")
    deadline = time.time() + 600
    while not (out / "state" / "state.pth").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    while len(_children(job.pid)) < 2 and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # an epoch after the first, with its loader's two workers running
    assert job.poll() is None, "the job ended before its workers could be signalled"
    os.killpg(job.pid, signal.SIGTERM)
    assert job.wait(timeout=120) == 143
    log_text = (out / "run.log").read_text()
    assert "stopping teacher" in log_text and "a rerun resumes there" in log_text, log_text
    assert "stopped by SIGTERM (exit status 143)" in log_text, log_text
    assert "failed" not in log_text and "Traceback" not in log_text, log_text
    assert (out / "state" / "state.pth").exists() and not (out / "model.pth").exists()

    resumed = start_teacher_job(tmp_path, config, data["manifest"], "teacher")
    assert resumed.wait(timeout=600) == 0
    assert "resuming teacher" in (out / "run.log").read_text()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [None, 0, 1, 2]
