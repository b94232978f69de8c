"""The `purireid` command (extract, search, export, doctor) and the FeatureExtractor API beneath it,
on the tiny synthetic dataset with a random-init ResNet-18 checkpoint (CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import purireid
from conftest import REPO, prepare_tiny_dataset, tiny_config, tmpfs_mount
from purireid.serving.cli import main
from purireid.config.resolve import deep_merge, stage_config
from purireid.io.files import sha256_file
from purireid.model.network import build_model
from purireid.stages import evaluate
from purireid.io.checkpoints import save_model_checkpoint

SUBCOMMANDS = ("extract", "search", "export", "doctor", "recipes", "config")


def write_checkpoint(path: Path, config: dict, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model(config["model"]["arch"], pretrained="none", input_norm=config["model"]["input_norm"])
    save_model_checkpoint(path, model, config)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Tiny dataset, a random ResNet-18 checkpoint, the evaluate stage's eval.json (with and without
    re-ranking), and query/gallery feature files written by `purireid extract`."""
    prepared = prepare_tiny_dataset(tmp_path_factory.mktemp("cli"))
    root, config = prepared["root"], tiny_config(prepared["data_root"])
    checkpoint = write_checkpoint(root / "model.pth", config, seed=0)
    evals = {}
    for rerank in (False, True):
        cfg = deep_merge(config, {"evaluate": {"rerank": rerank}})
        out = root / f"eval-{'rerank' if rerank else 'plain'}"
        evaluate.run(stage_config(cfg, "evaluate"), manifest=prepared["manifest"], checkpoint=checkpoint,
                     eval_json=out / "eval.json", cmc_png=out / "cmc.png", ranked_png=out / "ranked.png")
        evals[rerank] = json.loads((out / "eval.json").read_text())
    images = prepared["data_root"] / "synthetic" / "Synthetic-ReID"
    features = {}
    for split, folder in (("query", "query"), ("gallery", "bounding_box_test")):
        features[split] = root / f"{split}.h5"
        assert main(["extract", str(checkpoint), str(images / folder), "--out", str(features[split])]) == 0
    return {**prepared, "config": config, "checkpoint": checkpoint, "eval": evals, "images": images,
            "features": features}


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- help and usage


def test_console_script_and_help_of_every_subcommand(capsys):
    script = Path(sys.executable).with_name("purireid")
    assert script.exists(), "the console script is declared in pyproject.toml [project.scripts]"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and all(cmd in proc.stdout for cmd in SUBCOMMANDS)
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: purireid {command}") and "purireid " + command in out


@pytest.mark.parametrize("args, needle", [
    ([], "COMMAND"),
    (["extract", "ckpt.pth"], "--out"),
    (["search", "--query", "q.h5", "--out", "x"], "--gallery"),
    (["export", "ckpt.pth", "--format", "tflite", "--out", "m"], "invalid choice: 'tflite'"),
    (["doctor", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_exit_2_with_the_reason(args, needle, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert needle in capsys.readouterr().err


# --------------------------------------------------------------------------- extract and search


def test_feature_file_holds_paths_features_provenance(run):
    with h5py.File(run["features"]["gallery"], "r") as h5:
        paths = [p.decode() for p in h5["paths"][()]]
        feats = h5["features/global"][()]
        assert h5.attrs["checkpoint_sha256"] == sha256_file(run["checkpoint"])
        assert (h5.attrs["input_height"], h5.attrs["input_width"]) == (64, 32)
        assert "features/upper" not in h5  # the global view by default
    expected = sorted(str(p.resolve()) for p in (run["images"] / "bounding_box_test").glob("*.jpg"))
    assert paths == expected
    assert feats.shape == (len(paths), 512) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("rerank", [False, True])
def test_extract_then_search_gives_the_evaluate_stage_metrics(run, rerank, tmp_path, capsys):
    out = tmp_path / "ranked"
    args = ["search", "--gallery", run["features"]["gallery"], "--query", run["features"]["query"], "--out", out]
    code, stdout, _ = run_cli(args + (["--rerank"] if rerank else []), capsys)
    assert code == 0
    result = json.loads((out / "ranked.json").read_text())
    stage = run["eval"][rerank]
    assert abs(result["metrics"]["mAP"] - stage["mAP"]) <= 1e-6
    assert abs(result["metrics"]["rank1"] - stage["rank1"]) <= 1e-6
    assert abs(result["metrics"]["rank5"] - stage["rank5"]) <= 1e-6
    assert f"mAP {stage['mAP']:.2%}" in stdout
    queries = result["queries"]
    assert len(queries) == stage["num_queries"] and all(len(q["results"]) == 10 for q in queries)
    for q in queries:
        d = [r["distance"] for r in q["results"]]
        assert d == sorted(d)
        for r in q["results"]:  # verdicts from the Market-style names
            same = r["pid"] == q["pid"]
            assert r["verdict"] == ("ignored" if r["pid"] == -1 or (same and r["camid"] == q["camid"])
                                    else "match" if same else "mismatch")
    page = (out / "index.html").read_text()
    assert page.count('class="row"') == len(queries) and "#1a9641" in page and "#d7191c" in page
    # The page links the pictures relative to itself.
    first = queries[0]["results"][0]["path"]
    rel = Path(os.path.relpath(first, out)).as_posix()
    assert f'src="{rel}"' in page and (out / rel).resolve() == Path(first).resolve()


def test_search_with_query_images_uses_the_recorded_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "by-images"
    code, stdout, _ = run_cli(["search", "--gallery", run["features"]["gallery"], "--query",
                               run["images"] / "query", "--out", out, "--topk", "3"], capsys)
    assert code == 0
    result = json.loads((out / "ranked.json").read_text())
    assert abs(result["metrics"]["mAP"] - run["eval"][False]["mAP"]) <= 1e-6
    assert all(len(q["results"]) == 3 for q in result["queries"])


def test_feature_extractor_api(run):
    paths = sorted(str(p) for p in (run["images"] / "query").glob("*.jpg"))[:5]
    fx = purireid.FeatureExtractor(run["checkpoint"], device="cpu")
    assert fx.input_size == (64, 32) and fx.feat_dim == 512
    feats = fx(paths)
    assert feats.shape == (5, 512)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    with h5py.File(run["features"]["query"], "r") as h5:  # the same as the command wrote
        stored = dict(zip((p.decode() for p in h5["paths"][()]), h5["features/global"][()]))
    np.testing.assert_allclose(feats, np.stack([stored[str(Path(p).resolve())] for p in paths]), atol=1e-6)
    views = fx([Image.open(p) for p in paths[:2]], views="all")  # PIL images, three views
    assert set(views) == {"global", "upper", "lower"}
    np.testing.assert_allclose(views["global"], feats[:2], atol=1e-6)
    # The CPU fast path (BatchNorm folded, channels_last; on by default for ResNet-50 only).
    assert not fx.cpu_fast_path
    fast = purireid.FeatureExtractor(run["checkpoint"], device="cpu", cpu_fast_path=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.model.modules())
    np.testing.assert_allclose(fast(paths), feats, atol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_not_a_checkpoint_is_refused_by_name(run, tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("not a model")
    bare = tmp_path / "bare.pth"
    torch.save(build_model("resnet18", pretrained="none").state_dict(), bare)
    for bad in (text, bare, tmp_path / "missing.pth"):
        code, _, err = run_cli(["extract", bad, run["images"] / "query", "--out", tmp_path / "x.h5"], capsys)
        assert code == 1 and str(bad) in err and "train_student" in err
        assert not (tmp_path / "x.h5").exists()
    code, _, err = run_cli(["export", text, "--format", "onnx", "--out", tmp_path / "m.onnx"], capsys)
    assert code == 1 and str(text) in err


def test_cuda_device_without_a_gpu_is_refused_by_option(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        code, _, err = run_cli(["extract", run["checkpoint"], run["images"] / "query", "--out", tmp_path / "x.h5",
                                "--device", device], capsys)
        assert code == 1 and f"--device is '{device}'" in err and "no CUDA device" in err
        assert not (tmp_path / "x.h5").exists()


def test_folder_without_images_and_bad_manifest(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no pictures here")
    code, _, err = run_cli(["extract", run["checkpoint"], empty, "--out", tmp_path / "x.h5"], capsys)
    assert code == 1 and f"folder {empty} holds no images" in err
    manifest = tmp_path / "list.txt"
    manifest.write_text("query/0001_c1s1_000001_01.jpg\n")
    code, _, err = run_cli(["extract", run["checkpoint"], manifest, "--out", tmp_path / "x.h5"], capsys)
    assert code == 1 and str(manifest) in err and "--root" in err
    # The same list resolves with --root; a CSV manifest with --split picks rows.
    names = sorted(p.name for p in (run["images"] / "query").glob("*.jpg"))[:3]
    manifest.write_text("".join(f"query/{n}\n" for n in names))
    code, _, _ = run_cli(["extract", run["checkpoint"], manifest, "--root", run["images"], "--out",
                          tmp_path / "list.h5"], capsys)
    assert code == 0
    code, _, _ = run_cli(["extract", run["checkpoint"], run["manifest"], "--root", run["data_root"], "--split",
                          "query", "--out", tmp_path / "manifest.h5"], capsys)
    assert code == 0
    with h5py.File(tmp_path / "manifest.h5", "r") as h5:
        assert len(h5["paths"]) == run["eval"][False]["num_queries"]


def test_unreadable_images_refused_or_skipped(run, tmp_path, capsys):
    folder = tmp_path / "images"
    shutil.copytree(run["images"] / "query", folder)
    broken = folder / "0999_c1s1_000001_01.jpg"
    broken.write_bytes(b"\xff\xd8 this is no jpeg")
    count = len(list(folder.glob("*.jpg")))
    out = tmp_path / "f.h5"
    code, _, err = run_cli(["extract", run["checkpoint"], folder, "--out", out], capsys)
    assert code == 1 and str(broken.resolve()) in err and "--skip-unreadable" in err and not out.exists()
    code, stdout, err = run_cli(["extract", run["checkpoint"], folder, "--out", out, "--skip-unreadable"], capsys)
    assert code == 0 and str(broken.resolve()) in err and "1 unreadable skipped" in stdout
    with h5py.File(out, "r") as h5:
        assert len(h5["paths"]) == count - 1
        assert [p.decode() for p in h5["skipped"][()]] == [str(broken.resolve())]


def test_feature_files_of_another_checkpoint_or_size_are_refused(run, tmp_path, capsys):
    other = write_checkpoint(tmp_path / "other.pth", run["config"], seed=1)
    small = write_checkpoint(tmp_path / "small.pth", deep_merge(run["config"], {"data": {"height": 32}}), seed=0)
    for checkpoint, reason in ((other, "different checkpoints"), (small, "different input sizes (32x32 vs 64x32)")):
        query = tmp_path / f"{checkpoint.stem}.h5"
        assert run_cli(["extract", checkpoint, run["images"] / "query", "--out", query], capsys)[0] == 0
        code, _, err = run_cli(["search", "--gallery", run["features"]["gallery"], "--query", query,
                                "--out", tmp_path / "s"], capsys)
        assert code == 1 and reason in err
        assert str(query) in err and str(run["features"]["gallery"]) in err and "purireid extract" in err
        # Query images with a checkpoint other than the gallery's: refused the same way.
        code, _, err = run_cli(["search", "--gallery", run["features"]["gallery"], "--query", run["images"] / "query",
                                "--checkpoint", checkpoint, "--out", tmp_path / "s"], capsys)
        assert code == 1 and reason in err and str(checkpoint) in err
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(run["features"]["gallery"].read_bytes()[:2000])
    code, _, err = run_cli(["search", "--gallery", truncated, "--query", run["features"]["query"], "--out",
                            tmp_path / "s"], capsys)
    assert code == 1 and str(truncated) in err and "purireid extract" in err
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- what a file is, --out, help


def one_line_error(code: int, err: str, status: int = 1) -> str:
    """The error of a refused command: `status`, one line, no traceback."""
    assert code == status, err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def foreign_files(run, tmp_path_factory) -> dict:
    """Files people give in the wrong place: a TorchScript and an ONNX export of the checkpoint,
    a text file, a folder, an empty folder (and the feature files and the checkpoint of `run`)."""
    tmp = tmp_path_factory.mktemp("foreign")
    for fmt, name in (("torchscript", "student.pt"), ("onnx", "student.onnx")):
        assert main(["export", str(run["checkpoint"]), "--format", fmt, "--out", str(tmp / name)]) == 0
    (tmp / "notes.txt").write_text("not a model\n")
    (tmp / "folder").mkdir()
    (tmp / "folder" / "readme.md").write_text("x")
    (tmp / "empty").mkdir()
    return {"torchscript": tmp / "student.pt", "onnx": tmp / "student.onnx", "text": tmp / "notes.txt",
            "folder": tmp / "folder", "empty": tmp / "empty"}


@pytest.mark.parametrize("kind, says", [
    ("torchscript", "is a TorchScript export"), ("onnx", "is an ONNX model"), ("text", "is a text file"),
    ("folder", "is a folder"), ("empty", "is an empty folder"), ("features", "is a feature file of `purireid extract`"),
])
def test_a_wrong_file_as_checkpoint_says_what_it_is(run, foreign_files, kind, says, tmp_path, capsys):
    given = run["features"]["gallery"] if kind == "features" else foreign_files[kind]
    code, _, err = run_cli(["extract", given, run["images"] / "query", "--out", tmp_path / "x.h5"], capsys)
    err = one_line_error(code, err)
    assert f"checkpoint {given} {says}" in err and "not a purireid checkpoint" in err and "train_student" in err
    assert "Warning" not in err and "weights_only" not in err  # torch's own advice and warnings stay out
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("kind, says", [
    ("checkpoint", "is a purireid checkpoint (resnet18)"), ("torchscript", "is a TorchScript export"),
    ("text", "is a text file"), ("empty", "is an empty folder"), ("folder", "is a folder"),
])
def test_a_wrong_file_as_gallery_says_what_it_is(run, foreign_files, kind, says, tmp_path, capsys):
    given = run["checkpoint"] if kind == "checkpoint" else foreign_files[kind]
    code, _, err = run_cli(["search", "--gallery", given, "--query", run["features"]["query"], "--out",
                            tmp_path / "s"], capsys)
    err = one_line_error(code, err)
    assert f"{given} {says}" in err and ", not a feature file" in err and "purireid extract" in err
    assert "delete" not in err  # no advice to delete a checkpoint
    assert not (tmp_path / "s").exists()


def as_unprivileged():
    """Run the block as an unprivileged user: root bypasses permission bits (effective ids only,
    so that root takes them back); a no-op for a user already unprivileged."""
    import contextlib

    @contextlib.contextmanager
    def switch():
        if os.geteuid() != 0:
            yield
            return
        os.setegid(65534)
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)

    return switch()


@pytest.fixture
def locked_folder():
    """A folder nobody but root may write in, inside a folder everyone may enter."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="purireid-locked-"))
    base.chmod(0o755)
    locked = base / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    yield locked
    locked.chmod(0o755)
    shutil.rmtree(base)


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only file system (a small tmpfs mounted ro; needs root: the permission case covers
    unprivileged users)."""
    yield from tmpfs_mount(tmp_path / "ro", "ro,size=64k", "read-only")


def test_unwritable_or_impossible_out_is_refused_before_any_work(run, tmp_path, capsys, monkeypatch,
                                                                   locked_folder, read_only_folder):
    import purireid.serving.api as api
    import purireid.serving.export as export

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(api.FeatureExtractor, "__init__", no_work)
    monkeypatch.setattr(export, "export_model", no_work)
    monkeypatch.setattr(api, "read_feature_file", no_work)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "a_folder").mkdir()
    cases = [  # (--out, what the line must say)
        ("/proc/student.pt", "cannot create files in /proc"),
        (tmp_path / "a_folder", "is an existing folder"),
        (a_file / "x.pt", f"{a_file} is a file, not a folder"),
        (a_file / "deeper" / "x.pt", f"{a_file} is a file, not a folder"),
        (read_only_folder / "x.pt", "a read-only file system"),
    ]
    for out, says in cases:
        for args in (["export", run["checkpoint"], "--format", "torchscript", "--out", out],
                     ["extract", run["checkpoint"], run["images"] / "query", "--out", out]):
            err = one_line_error(*run_cli(args, capsys)[::2])
            assert f"--out {out}" in err and says in err, err
    with as_unprivileged():
        code, _, err = run_cli(["export", run["checkpoint"], "--format", "onnx", "--out", locked_folder / "m.onnx"],
                               capsys)
    err = one_line_error(code, err)
    assert f"--out {locked_folder / 'm.onnx'}" in err and "permission denied" in err
    code, _, err = run_cli(["search", "--gallery", run["features"]["gallery"], "--query", run["features"]["query"],
                            "--out", a_file], capsys)
    assert f"--out {a_file} is an existing file" in one_line_error(code, err)
    assert not list(locked_folder.iterdir()) and not list(read_only_folder.iterdir())


def test_missing_folders_of_out_are_created_and_help_says_so(run, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "gallery.h5"
    assert run_cli(["extract", run["checkpoint"], run["images"] / "query", "--out", out], capsys)[0] == 0
    assert out.is_file()
    for command in ("extract", "search", "export"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--out OUT the HDF5 file to write (missing folders are created)" in text or \
            "--out OUT output folder (created if missing)" in text or \
            "--out OUT the file to write (missing folders are created)" in text


def test_help_states_defaults_once_and_explains_every_option(capsys):
    from purireid.serving.cli import _Formatter, build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for command, parser in sub.choices.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: False)" not in text, command
        for action in parser._actions:
            shown = _Formatter(parser.prog)._get_help_string(action)
            assert action.help and shown.count("(default:") <= 1, (command, action.option_strings, shown)
            if action.required:
                assert "(default:" not in shown, (command, action.option_strings)
        if command == "extract":
            assert "--root ROOT folder that relative paths in a manifest start from (default: the manifest's " \
                "folder) --split" in text


def test_command_alone_lists_the_commands_and_a_mistyped_option_hints_the_right_one(capsys):
    with pytest.raises(SystemExit) as stop:
        main([])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert all(f"{command} " in err for command in SUBCOMMANDS) and "usage: purireid" in err
    with pytest.raises(SystemExit) as stop:
        main(["search", "--gallery", "g.h5", "--query", "q.h5", "--out", "x", "--k", "0"])
    err = one_line_error(stop.value.code, capsys.readouterr().err, status=2)
    assert err.startswith("purireid search: error: unrecognized arguments: --k 0") and "did you mean --topk?" in err
    with pytest.raises(SystemExit) as stop:
        main(["search", "--gallery", "g.h5", "--query", "q.h5", "--out", "x", "--topk", "0"])
    err = one_line_error(stop.value.code, capsys.readouterr().err, status=2)
    assert "argument --topk: must be >= 1, got 0" in err


def test_topk_beyond_the_gallery_is_recorded_as_what_the_lists_hold(run, tmp_path, capsys):
    out = tmp_path / "all"
    code, stdout, _ = run_cli(["search", "--gallery", run["features"]["gallery"], "--query", run["features"]["query"],
                               "--out", out, "--topk", "100000"], capsys)
    assert code == 0
    result = json.loads((out / "ranked.json").read_text())
    gallery = run["eval"][False]["num_gallery"]  # no junk in the synthetic gallery
    assert result["topk"] == gallery and result["topk_requested"] == 100000
    assert all(len(q["results"]) == gallery for q in result["queries"])
    assert f"top {gallery} (--topk 100000: the gallery holds {gallery})" in stdout


@pytest.mark.parametrize("rerank", [False, True])
def test_search_page_says_which_distance(run, rerank, tmp_path, capsys):
    out = tmp_path / "page"
    args = ["search", "--gallery", run["features"]["gallery"], "--query", run["features"]["query"], "--out", out]
    assert run_cli(args + (["--rerank"] if rerank else []), capsys)[0] == 0
    page = (out / "index.html").read_text()
    said = "Distances: k-reciprocal re-ranked." if rerank else "Distances: squared Euclidean (exact)."
    assert said in page and ("re-ranked" in page) == rerank
    assert json.loads((out / "ranked.json").read_text())["distance"] in said


def test_feature_files_of_different_dimensions_name_both(run, tmp_path, capsys):
    from purireid.io.features import FeatureProvenance, read_feature_file, write_feature_file

    gallery = read_feature_file(run["features"]["gallery"], fix="")
    narrow = tmp_path / "narrow.h5"
    write_feature_file(narrow, {"global": np.ones((3, 256), np.float32) / 16}, ["a.jpg", "b.jpg", "c.jpg"],
                       FeatureProvenance("extract", gallery.checkpoint_sha256, gallery.input_size))
    code, _, err = run_cli(["search", "--gallery", run["features"]["gallery"], "--query", narrow, "--out",
                            tmp_path / "s"], capsys)
    err = one_line_error(code, err)
    assert "different dimensions (256 vs 512)" in err and str(narrow) in err and str(run["features"]["gallery"]) in err


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_parity_and_dynamic_batch(run, fmt, tmp_path, capsys):
    out = tmp_path / f"model.{fmt}"
    code, stdout, _ = run_cli(["export", run["checkpoint"], "--format", fmt, "--out", out], capsys)
    assert code == 0 and out.is_file() and "max abs diff" in stdout
    diff = float(stdout.split("max abs diff ")[1].split()[0])
    assert diff <= 1e-4
    # Real images, a batch size the export never saw: the file gives the API's features.
    paths = sorted(str(p) for p in (run["images"] / "query").glob("*.jpg"))[:5]
    fx = purireid.FeatureExtractor(run["checkpoint"], device="cpu")
    from purireid.data.transforms import load_resized, normalise_batch

    batch = normalise_batch(torch.from_numpy(np.stack([np.asarray(load_resized(p, 64, 32)) for p in paths])))
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        exported = session.run(None, {"images": batch.numpy()})[0]
        meta = json.loads(session.get_modelmeta().custom_metadata_map["purireid"])
    else:
        extra = {"purireid.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is marked deprecated
            loaded = torch.jit.load(str(out), _extra_files=extra)
        exported = loaded(batch)[0].detach().numpy()
        meta = json.loads(extra["purireid.json"])
    assert np.abs(exported - fx(paths)).max() <= 1e-4
    assert meta["input"]["height"] == 64 and meta["checkpoint_sha256"] == sha256_file(run["checkpoint"])


def test_export_fails_above_tolerance_and_writes_nothing(run, tmp_path, capsys, monkeypatch):
    import purireid.serving.export as export

    real = export._run_exported
    monkeypatch.setattr(export, "_run_exported", lambda *a: [o + 1e-3 for o in real(*a)])
    out = tmp_path / "model.pt"
    code, _, err = run_cli(["export", run["checkpoint"], "--format", "torchscript", "--out", out], capsys)
    assert code == 1 and "exceeds the tolerance" in err and str(out) in err
    assert not out.exists() and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- doctor


def test_doctor_passes_on_the_embedded_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # data_root is relative: nothing here, and synthetic needs nothing
    code, stdout, _ = run_cli(["doctor"], capsys)
    assert code == 0, stdout
    assert f"config: {REPO / 'config.yaml'}" in stdout
    for needle in ("torch:", "faiss:", "torch.distributed: NCCL", "[ ok ] train step on cpu: resnet18 64x32",
                   "[ ok ] kNN on cpu", "identical to the exact CPU result", "this machine can run this config"):
        assert needle in stdout


def test_doctor_fails_naming_the_missing_imagenet_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    monkeypatch.chdir(tmp_path)
    dataset = tmp_path / "data" / "market1501" / "Market-1501-v15.09.15"
    dataset.mkdir(parents=True)  # the data is there: only the weights are missing
    preset = REPO / "config" / "presets" / "market1501.yaml"
    code, stdout, _ = run_cli(["doctor", "--config", preset, "--skip-run"], capsys)
    assert code == 1
    weights = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert f"[FAIL] ImageNet weights: resnet50 (model.pretrained: imagenet): {weights} not found" in stdout
    assert f"place the file resnet50-0676ba61.pth at {weights}" in stdout
    assert "[ ok ] dataset: market1501" in stdout and "1 problem(s)" in stdout


def test_doctor_flags_faiss_wheels_installed_over_each_other(monkeypatch):
    from purireid.serving import doctor

    monkeypatch.setattr(doctor, "_installed", lambda names: ["faiss-cpu 1.8.0", "faiss-gpu 1.7.2"])
    checks = list(doctor._faiss_checks())
    clash = [c for c in checks if c.name == "faiss wheels"]
    assert clash and clash[0].status == "warn" and "pip uninstall -y faiss-cpu faiss-gpu" in clash[0].fix


def test_export_rule_is_opt_in(tmp_path):
    """The DAG ends in the exported student only with export.enabled (dry runs)."""
    snakemake = Path(sys.executable).with_name("snakemake")

    def planned(*extra: str) -> str:
        proc = subprocess.run([str(snakemake), "-s", str(REPO / "Snakefile"), "-n", *extra], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        return proc.stdout

    assert "export_student" not in planned()
    (tmp_path / "export.yaml").write_text("export:\n  enabled: true\n  format: torchscript\n")
    plan = planned("--configfile", "export.yaml")
    assert "rule export_student:" in plan and "results/synthetic/student/model.torchscript.pt" in plan


@pytest.mark.slow
def test_export_rule_runs_after_the_student_evaluation(run, tmp_path):
    """The export job on an evaluated student (model.pth and eval.json in place, their rules not rerun)."""
    student = tmp_path / "results" / "synthetic" / "student"
    student.mkdir(parents=True)
    shutil.copy(run["checkpoint"], student / "model.pth")
    (student / "eval.json").write_text("{}\n")
    snakemake = Path(sys.executable).with_name("snakemake")
    proc = subprocess.run([str(snakemake), "-s", str(REPO / "Snakefile"), "--cores", "2", "results/synthetic/student/model.onnx",
                           "--rerun-triggers", "mtime"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (student / "model.onnx").is_file()
    log = (tmp_path / "results" / "synthetic" / "logs" / "export_student.log").read_text()
    assert "parity with PyTorch: max abs diff" in log and "onnx opset 18" in log


def test_fold_batchnorm_keeps_the_function():
    import copy

    from purireid.serving.api import fold_batchnorm

    torch.manual_seed(0)
    model = build_model("resnet50", pretrained="none").eval()
    for module in model.modules():  # trained-like statistics, so that folding has work to do
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    x = torch.randn(2, 3, 64, 32)
    folded = fold_batchnorm(copy.deepcopy(model)).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref, out = model(x), folded(x.contiguous(memory_format=torch.channels_last))
    for view in ref:
        assert (ref[view] - out[view]).abs().max() <= 1e-5
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
