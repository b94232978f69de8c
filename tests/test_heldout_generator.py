"""The held-out test-set generator (the `heldout` package): a dataset that purireid reads as
`dataset: folder`, with the split guarantees re-ID evaluation relies on, byte-identical
for a seed, and with `camera_strength` 0 giving every camera the same colour response."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import heldout as hg
from heldout.cli import main
from purireid.data.datasets import load_dataset, load_market_layout

TINY = dict(num_train_ids=6, num_test_ids=4, images_per_id=6, num_cameras=3, height=64, width=32)
NAME = re.compile(r"^(\d{4}|-1)_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    summary = hg.generate_heldout(root / "ds", seed=5, **TINY)
    return root, summary


def _files(base: Path) -> dict[str, list[str]]:
    return {folder: sorted(p.name for p in (base / folder).iterdir()) for folder in hg.FOLDERS}


def test_market_layout_read_by_purireid_loader(tiny):
    root, summary = tiny
    base = root / "ds"
    files = _files(base)
    for folder, names in files.items():
        bad = [n for n in names if not NAME.match(n)]
        assert not bad, f"{folder}: names not in Market-1501 form: {bad[:3]}"
        assert len(set(names)) == len(names)
    junk = [n for folder in hg.FOLDERS for n in files[folder] if n.startswith("-1_")]
    assert junk and all(n in files["bounding_box_test"] for n in junk)

    splits = load_dataset("folder", root, folder_name="ds")  # what `dataset: folder` reads
    assert splits == load_market_layout(base, root)
    assert {s: len(v) for s, v in splits.items()} == {
        "train": summary["counts"]["train"], "query": summary["counts"]["query"],
        "gallery": summary["counts"]["gallery"]}
    assert summary["counts"]["junk"] == len(junk)
    train_pids = {r.pid for r in splits["train"]}
    query_pids = {r.pid for r in splits["query"]}
    gallery_pids = {r.pid for r in splits["gallery"]}
    assert len(train_pids) == 6 and 0 not in train_pids
    assert len(query_pids) == 4 and 0 not in query_pids
    assert gallery_pids == query_pids | {0}  # test identities plus distractors
    assert not train_pids & (query_pids | gallery_pids)
    assert all(0 < pid <= 9999 for pid in train_pids | query_pids)
    assert {r.camid for s in splits.values() for r in s} <= set(range(3))

    cams: dict[int, set[int]] = {}
    for rec in splits["train"] + splits["query"] + splits["gallery"]:
        if rec.pid:
            cams.setdefault(rec.pid, set()).add(rec.camid)
    assert all(len(c) >= 2 for c in cams.values()), cams
    with Image.open(root / splits["query"][0].path) as img:
        assert (img.format, img.size, img.mode) == ("JPEG", (32, 64), "RGB")


def test_every_query_has_a_gallery_match_in_another_camera(tiny):
    root, _ = tiny
    splits = load_market_layout(root / "ds", root)
    gallery = {(r.pid, r.camid) for r in splits["gallery"]}
    for q in splits["query"]:
        assert any(pid == q.pid and cam != q.camid for pid, cam in gallery), q


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    root, summary = tiny
    again = hg.generate_heldout(tmp_path / "again", seed=5, **TINY)
    assert again == summary
    first, second = _files(root / "ds"), _files(tmp_path / "again")
    assert first == second
    for folder, names in first.items():
        for name in names:
            assert (root / "ds" / folder / name).read_bytes() == (tmp_path / "again" / folder / name).read_bytes()
    hg.generate_heldout(tmp_path / "other", seed=6, **TINY)
    assert _files(tmp_path / "other") != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def _camera_spread(base: Path) -> float:
    """Mean distance between a train identity's per-camera mean chromaticity (centre crop)."""
    means: dict[tuple[str, str], list[np.ndarray]] = {}
    for path in sorted((base / "bounding_box_train").iterdir()):
        pid, cam = path.name.split("_")[:2]
        rgb = np.asarray(Image.open(path), np.float32)[16:48, 8:24].reshape(-1, 3).mean(0)
        means.setdefault((pid, cam[:2]), []).append(rgb / rgb.sum())
    per_id: dict[str, list[np.ndarray]] = {}
    for (pid, _), values in means.items():
        per_id.setdefault(pid, []).append(np.mean(values, axis=0))
    return float(np.mean([np.linalg.norm(a - b) for m in per_id.values() for a, b in itertools.combinations(m, 2)]))


def test_camera_strength_zero_gives_cameras_one_colour_response(tiny, tmp_path):
    root, full = tiny  # camera_strength 1 (the default)
    neutral = hg.generate_heldout(tmp_path / "s0", seed=5, camera_strength=0.0, **TINY)
    # Strength changes the cameras' appearance only: same identities, cameras and frames.
    assert _files(tmp_path / "s0") == _files(root / "ds")
    assert neutral["counts"] == full["counts"]
    spread0, spread1 = _camera_spread(tmp_path / "s0"), _camera_spread(root / "ds")
    assert spread0 < 0.5 * spread1, (spread0, spread1)


def test_bad_input_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="camera_strength"):
        hg.generate_heldout(tmp_path / "x", camera_strength=1.5, **TINY)
    with pytest.raises(ValueError, match="images_per_id"):
        hg.generate_heldout(tmp_path / "x", **{**TINY, "images_per_id": 1})
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError, match="mine"):
        hg.generate_heldout(foreign, **TINY)
    assert (foreign / "keep.txt").read_text() == "not a dataset"
    # Its own output is replaced in place.
    small = dict(TINY, num_train_ids=2, num_test_ids=1, images_per_id=2)
    hg.generate_heldout(tmp_path / "own", seed=1, **small)
    summary = hg.generate_heldout(tmp_path / "own", seed=2, **small)
    assert summary["params"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "own"]


def test_command_line_writes_the_set_and_a_preview(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--train-ids", "3", "--test-ids", "2", "--images-per-id", "3", "--cameras", "2",
          "--height", "64", "--width", "32", "--seed", "4", "--preview", str(tmp_path / "sheet.png")])
    out = capsys.readouterr().out
    assert '"train":' in out and "preview:" in out
    assert (tmp_path / "cli" / hg.SUMMARY_NAME).is_file() and (tmp_path / "sheet.png").is_file()
    splits = load_dataset("folder", tmp_path, folder_name="cli")
    assert len({r.pid for r in splits["train"]}) == 3


def test_package_is_split_by_concern():
    """Modules well under 300 lines, no function over 80 (the package is read and extended by hand)."""
    package = Path(hg.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert {m.stem for m in modules} >= {"body", "scene", "camera", "layout", "identity", "draw"}
    for module in modules:
        text = module.read_text()
        assert len(text.splitlines()) < 300, module.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 80, (module.name, node.name)
