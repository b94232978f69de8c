"""Unlabelled camera crops (`dataset: crops`): the layout and its bad inputs, the dataset registry
as the one source of the dataset choices, the label-free diagnostics, the workflow without a
labelled split, and (marked slow) whole runs: no identity is ever read in training, and a folder
with no cameras and no query/gallery runs end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from purireid.config.datasets import DATASET_KINDS, has_labelled_split
from purireid.config.resolve import ConfigError, check_labelled_split, load_schema, resolve_config
from purireid.data.datasets import DATASETS, UNKNOWN_PID, DatasetError, load_crops_layout, load_dataset
from purireid.evaluation.summary import summary_rows, to_markdown
from purireid.labels.quality import label_free_diagnostics, sample_clusters, separation_figures, spread_members
from purireid.labels.diagnostics import label_diagnostics

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from to_crops import convert  # noqa: E402


def image(path: Path, colour: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (colour, 0, 0)).save(path)
    return path


def crops_folder(root: Path, cameras: dict[str, int], *, nested: bool = False) -> Path:
    base = root / "crops"
    for camera, count in cameras.items():
        for i in range(count):
            image(base / "train" / camera / ("day1" if nested else "") / f"img{i}.jpg", i)
    return base


def one_line_error(call, *named: str) -> str:
    with pytest.raises(DatasetError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for name in named:
        assert name in message, (name, message)
    assert "fix:" in message, message
    return message


# --------------------------------------------------------------------------- the layout


def test_camera_folders_give_sorted_camera_ids_and_no_identity(tmp_path):
    crops_folder(tmp_path, {"west gate": 3, "east": 2}, nested=True)
    layout = load_crops_layout(tmp_path / "crops", tmp_path)
    assert layout.cameras == ["east", "west gate"]
    train = layout.splits["train"]
    assert len(train) == 5 and {r.pid for r in train} == {UNKNOWN_PID}
    assert [r.camid for r in train] == [0, 0, 1, 1, 1]
    assert train[0].path == "crops/train/east/day1/img0.jpg"
    assert layout.splits["query"] == layout.splits["gallery"] == []


def test_images_directly_in_train_are_one_camera(tmp_path):
    for i in range(3):
        image(tmp_path / "crops" / "train" / f"{i}.png")
    layout = load_crops_layout(tmp_path / "crops", tmp_path)
    assert layout.cameras == ["train"] and {r.camid for r in layout.splits["train"]} == {0}


def test_train_csv_names_images_and_cameras(tmp_path):
    base = tmp_path / "crops"
    for i in range(4):
        image(base / "pics" / f"{i}.jpg")
    (base / "train.csv").write_text("path,camera\npics/0.jpg,b\npics/1.jpg,a\npics/2.jpg,b\npics/3.jpg,a\n")
    splits = load_dataset("crops", tmp_path, folder_name="crops")
    assert [(r.path, r.camid) for r in splits["train"]] == [
        ("crops/pics/0.jpg", 1), ("crops/pics/1.jpg", 0), ("crops/pics/2.jpg", 1), ("crops/pics/3.jpg", 0)]


def test_query_and_gallery_are_a_labelled_split(tmp_path):
    base = crops_folder(tmp_path, {"a": 2})
    image(base / "query" / "0001_c1s1_000001_00.jpg")
    image(base / "gallery" / "0001_c2s1_000001_00.jpg")
    image(base / "gallery" / "-1_c2s1_000002_00.jpg")  # junk: dropped
    splits = load_dataset("crops", tmp_path, folder_name="crops")
    assert [(r.pid, r.camid) for r in splits["query"]] == [(1, 0)]
    assert [(r.pid, r.camid) for r in splits["gallery"]] == [(1, 1)]
    config = resolve_config({"dataset": "crops", "data_root": str(tmp_path), "prepare": {"folder_name": "crops"}})
    assert has_labelled_split(config)
    (base / "query" / "0001_c1s1_000001_00.jpg").unlink()
    (base / "query").rmdir()
    assert not has_labelled_split(config)


# --------------------------------------------------------------------------- bad inputs: one line each


def test_empty_train_folder(tmp_path):
    (tmp_path / "crops" / "train").mkdir(parents=True)
    one_line_error(lambda: load_dataset("crops", tmp_path, folder_name="crops"), "crops/train", "no training images")


def test_empty_camera_folder(tmp_path):
    crops_folder(tmp_path, {"a": 3})
    (tmp_path / "crops" / "train" / "b" / "day1").mkdir(parents=True)
    one_line_error(lambda: load_dataset("crops", tmp_path, folder_name="crops"), "crops/train/b", "empty camera folder")


def test_camera_folder_with_one_image(tmp_path):
    crops_folder(tmp_path, {"a": 3, "lonely": 1})
    one_line_error(lambda: load_dataset("crops", tmp_path, folder_name="crops"), "lonely/img0.jpg", "camera 'lonely'")


def test_non_image_file(tmp_path):
    base = crops_folder(tmp_path, {"a": 3})
    (base / "train" / "a" / "notes.txt").write_text("x")
    (base / "train" / "a" / ".DS_Store").write_text("x")  # hidden files are ignored
    one_line_error(lambda: load_dataset("crops", tmp_path, folder_name="crops"), "a/notes.txt", "not an image")


def test_csv_naming_a_missing_file(tmp_path):
    base = tmp_path / "crops"
    image(base / "pics" / "0.jpg")
    (base / "train.csv").write_text("path,camera\npics/0.jpg,a\npics/gone.jpg,a\n")
    one_line_error(lambda: load_dataset("crops", tmp_path, folder_name="crops"), "train.csv:3", "pics/gone.jpg")


@pytest.mark.parametrize("content, named", [
    ("file,cam\nx.jpg,a\n", "train.csv:1"),
    ("path,camera\nx.jpg\n", "train.csv:2"),
    ("path,camera\n../x.jpg,a\n", "train.csv:2"),
])
def test_bad_csv_rows(tmp_path, content, named):
    (tmp_path / "crops").mkdir()
    (tmp_path / "crops" / "train.csv").write_text(content)
    one_line_error(lambda: load_dataset("crops", tmp_path, folder_name="crops"), named)


def test_query_without_gallery_and_mixed_train(tmp_path):
    base = crops_folder(tmp_path, {"a": 2})
    image(base / "query" / "0001_c1s1_000001_00.jpg")
    one_line_error(lambda: load_dataset("crops", tmp_path, folder_name="crops"), "query", "gallery")
    (base / "query" / "0001_c1s1_000001_00.jpg").unlink()
    (base / "query").rmdir()
    image(base / "train" / "loose.jpg")
    one_line_error(lambda: load_dataset("crops", tmp_path, folder_name="crops"), "loose.jpg", "camera folder")


def test_missing_folder_and_folder_name(tmp_path):
    one_line_error(lambda: load_dataset("crops", tmp_path, folder_name="nowhere"), "nowhere", "prepare.folder_name")
    with pytest.raises(DatasetError, match="prepare.folder_name"):
        load_dataset("crops", tmp_path)


def test_unreadable_image_is_named_by_prepare(tmp_path):
    from purireid.config.resolve import stage_config
    from purireid.stages import prepare_dataset

    base = crops_folder(tmp_path, {"a": 3})
    (base / "train" / "a" / "img1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    config = resolve_config({"dataset": "crops", "data_root": str(tmp_path), "prepare": {"folder_name": "crops"}})
    one_line_error(lambda: prepare_dataset.run(stage_config(config, "prepare_dataset"),
                                               manifest=tmp_path / "out" / "manifest.csv",
                                               summary=tmp_path / "out" / "summary.json", progress=False),
                   "train/a/img1.jpg", "cannot be decoded", "fix: replace or delete")


def test_prepare_records_cameras_and_no_identities(tmp_path):
    from purireid.config.resolve import stage_config
    from purireid.stages import prepare_dataset

    crops_folder(tmp_path, {"north": 3, "south": 2})
    config = resolve_config({"dataset": "crops", "data_root": str(tmp_path), "prepare": {"folder_name": "crops"}})
    result = prepare_dataset.run(stage_config(config, "prepare_dataset"), manifest=tmp_path / "out" / "manifest.csv",
                                 summary=tmp_path / "out" / "summary.json", progress=False)
    assert result["cameras"] == [{"name": "north", "id": 0, "images": 3}, {"name": "south", "id": 1, "images": 2}]
    assert result["labelled_split"] is False
    assert result["splits"]["train"] == {"images": 5, "ids": None, "cameras": 2}
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == result


# --------------------------------------------------------------------------- the registry and the config


def test_the_registry_is_the_one_source_of_the_dataset_choices():
    schema = load_schema()
    assert schema["properties"]["dataset"]["enum"] == list(DATASET_KINDS)
    assert "crops" in DATASET_KINDS and set(DATASETS) == set(DATASET_KINDS)
    # a source pretraining trains with identities: crops has none
    assert schema["properties"]["source"]["properties"]["dataset"]["enum"] == \
        [name for name, kind in DATASET_KINDS.items() if kind.train_identities]
    with pytest.raises(ConfigError, match="source.dataset"):
        resolve_config({"source": {"dataset": "crops"}})


def test_what_needs_identities_or_a_labelled_split_is_refused(tmp_path):
    crops = {"dataset": "crops", "data_root": str(tmp_path), "prepare": {"folder_name": "crops"}}
    with pytest.raises(ConfigError, match="'supervised_reference'"):
        resolve_config({**crops, "supervised_reference": True})
    config = resolve_config({**crops, "train": {"keep_best": True}})
    with pytest.raises(ConfigError, match="'train.keep_best'.*no labelled"):
        check_labelled_split(config)
    assert check_labelled_split(resolve_config({**crops})) is False
    assert check_labelled_split(resolve_config({"train": {"keep_best": True}})) is True  # synthetic: labelled


# --------------------------------------------------------------------------- label-free figures


def test_label_free_diagnostics_leave_out_what_needs_identities():
    labels = np.array([0, 0, 0, 1, 1, -1])
    camids = np.array([0, 1, 0, 0, 0, 1])
    features = {"global": torch.tensor([[1.0, 0], [1, 0.1], [1, -0.1], [0, 1], [0.1, 1], [1, 1]])}
    unknown = np.full(6, UNKNOWN_PID)
    free = label_diagnostics(labels, unknown, camids, features)
    assert not {"purity", "nmi", "ari"} & set(free)
    assert free["multi_camera_share"] == 0.5 and free["mean_cluster_size"] == 2.5 and free["largest_cluster"] == 3
    assert 0 < free["within_cluster_distance"] < free["nearest_cluster_distance"]
    assert free["separation"] == pytest.approx(free["nearest_cluster_distance"] / free["within_cluster_distance"],
                                               rel=1e-4)
    known = label_diagnostics(labels, np.array([5, 5, 5, 6, 6, 7]), camids, features)
    assert known["purity"] == 1.0 and {k: known[k] for k in free} == free
    assert separation_figures(np.array([0, 0, -1]), features := {"g": torch.eye(3)})["separation"] is None
    assert label_free_diagnostics(np.array([-1, -1, -1]), np.zeros(3), features)["mean_cluster_size"] is None


def test_sampled_clusters_and_members_spread_over_sizes_and_distances():
    labels = np.repeat(np.arange(20), np.arange(20, 0, -1))  # cluster i has 20 - i images
    picked = sample_clusters(labels, 5)
    assert picked[0] == 0 and picked[-1] == 19 and len(picked) == 5
    members = np.arange(10)
    distances = np.linspace(1, 0, 10)
    spread = spread_members(members, distances, 4)
    assert spread[0] == 9 and spread[-1] == 0 and len(spread) == 4  # nearest first, farthest last


def test_summary_without_a_labelled_split_invents_no_metric():
    logs = {m: [{"epoch": 0, "phase": "train", "seconds": 3.0}] for m in ("teacher", "student")}
    rows = summary_rows(["teacher", "student"], {}, logs)
    assert [r.model for r in rows] == ["teacher", "student"]
    assert all(v is None for r in rows for v in r.metrics.values())
    table = to_markdown(rows, dataset="crops", rerank=False, labelled=False)
    assert "no labelled split" in table and "| teacher | — | — |" in table and "Market-1501 protocol" not in table


def test_camera_options_work_with_a_single_camera():
    """Crops with no camera folders are one camera: camera centring, the same-camera offset, the
    camera-aware sampler and the camera proxies all run (nothing to refuse)."""
    from purireid import VIEWS
    from purireid.config.resolve import resolve_config
    from purireid.data.samplers import build_sampler
    from purireid.labels.sources import PseudoLabels
    from purireid.training.terms.base import Batch, EpochTargets
    from purireid.training.terms.camera_proxy import CameraProxyTerm

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 16))
    x = np.repeat(centres, 8, axis=0) + 0.05 * rng.standard_normal((32, 16))
    features = {v: torch.nn.functional.normalize(torch.from_numpy(x.astype(np.float32)), dim=1) for v in VIEWS}
    camids = np.zeros(32, dtype=np.int64)
    config = resolve_config({"cluster": {"k1": 6, "k2": 2, "min_samples": 2, "camera_centre": True,
                                         "same_camera_offset": 0.3},
                             "train": {"camera_proxy": 0.5, "batch_size": 8, "num_instances": 4}})
    labels = PseudoLabels(config, camids=camids).assign(features, epoch=0)
    assert len(set(labels[labels >= 0])) == 4
    batches = build_sampler("camera", labels, camids, 4).epoch_batches(rng, 8, 3)
    assert batches.shape == (3, 8)
    term = CameraProxyTerm.from_config(config)
    term.start_epoch(EpochTargets(labels, features, camids, 4, 0.5, torch.device("cpu")))
    out = {v: features[v][:8] for v in VIEWS}
    losses = term(out, Batch(torch.zeros(8, 3, 4, 2), torch.arange(8)))
    assert all(torch.isfinite(losses[v]) for v in VIEWS)


# --------------------------------------------------------------------------- purireid extract / search


def test_extract_and_search_take_a_crops_folder(tmp_path, capsys):
    """`purireid extract` reads a crops folder (camera folders, sub-folders, any names) as any
    images, and `search` ranks them: lists, no metric invented without identities."""
    import h5py

    from conftest import tiny_config
    from purireid.io.checkpoints import save_model_checkpoint
    from purireid.model.network import build_model
    from purireid.serving.cli import main

    base = crops_folder(tmp_path, {"door": 4, "hall": 3}, nested=True)
    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    save_model_checkpoint(tmp_path / "model.pth", build_model("resnet18", pretrained="none",
                                                              input_norm=config["model"]["input_norm"]), config)
    assert main(["extract", str(tmp_path / "model.pth"), str(base / "train"), "--out", str(tmp_path / "g.h5")]) == 0
    with h5py.File(tmp_path / "g.h5") as h5:
        paths = [p.decode() if isinstance(p, bytes) else p for p in h5["paths"][()]]
    assert len(paths) == 7 and all("/day1/img" in p for p in paths)
    query = base / "train" / "door" / "day1"
    assert main(["search", "--gallery", str(tmp_path / "g.h5"), "--query", str(query), "--out",
                 str(tmp_path / "ranked")]) == 0
    ranked = json.loads((tmp_path / "ranked" / "ranked.json").read_text())
    assert len(ranked["queries"]) == 4 and not ranked.get("metrics")
    assert "mAP" not in capsys.readouterr().out


# --------------------------------------------------------------------------- the workflow


def snakemake(workdir: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    from test_workflow import snakemake as run

    return run(workdir, *args, timeout=timeout)


def crops_config(path: Path, folder: str = "crops", **extra) -> Path:
    path.write_text(yaml.safe_dump({"dataset": "crops", "data_root": "data", "prepare": {"folder_name": folder},
                                    **extra}))
    return path


def test_dag_without_a_labelled_split_ends_with_models_and_pseudo_identities(tmp_path):
    from test_workflow import TINY, planned_jobs

    crops_folder(tmp_path / "data", {"a": 4})
    out = snakemake(tmp_path, "-n", "--configfile", str(TINY), str(crops_config(tmp_path / "c.yaml"))).stdout
    assert planned_jobs(out) == {"prepare_dataset": 1, "train_teacher": 1, "extract_teacher_features": 1,
                                 "train_student": 1, "pseudo_identities": 2, "summary": 1}
    for model in ("teacher", "student"):
        assert f"results/crops/{model}/pseudo_identities.csv" in out
    image(tmp_path / "data" / "crops" / "query" / "0001_c1s1_000001_00.jpg")
    image(tmp_path / "data" / "crops" / "gallery" / "0001_c2s1_000001_00.jpg")
    out = snakemake(tmp_path, "-n", "--configfile", str(TINY), str(crops_config(tmp_path / "c.yaml"))).stdout
    assert planned_jobs(out)["evaluate"] == 2


def test_keep_best_without_a_labelled_split_is_refused_at_parse_time(tmp_path):
    from test_workflow import snakemake as run

    crops_folder(tmp_path / "data", {"a": 4})
    proc = run(tmp_path, "-n", "--configfile", str(crops_config(tmp_path / "c.yaml", train={"keep_best": True})),
               check=False)
    assert proc.returncode != 0 and "config key 'train.keep_best'" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- whole runs (slow)


def market_tiny(root: Path) -> Path:
    """The tiny synthetic set in the Market-1501 layout, generated under `root`."""
    from conftest import prepare_tiny_dataset

    prepare_tiny_dataset(root)
    return root / "data" / "synthetic" / "Synthetic-ReID"


def weights_sha256(path: Path) -> str:
    import hashlib

    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_identities_in_file_names_are_never_read(tmp_path):
    """The same crops, in the same order, with and without person ids in their file names: byte-
    identical teacher and student weights, and the same mAP on the labelled query/gallery."""
    from test_workflow import TINY

    market = market_tiny(tmp_path / "gen")
    results = {}
    for names in ("keep", "index"):
        work = tmp_path / names
        convert(market, work / "data" / "crops", names=names, cameras="folders")
        snakemake(work, "--cores", "2", "--configfile", str(TINY), str(crops_config(work / "c.yaml")))
        base = work / "results" / "crops"
        results[names] = {m: (weights_sha256(base / m / "model.pth"), json.loads((base / m / "eval.json").read_text())["mAP"])
                          for m in ("teacher", "student")}
        assert {r.pid for r in load_dataset("crops", work / "data", folder_name="crops")["train"]} == {UNKNOWN_PID}
    assert results["keep"] == results["index"], results


@pytest.mark.slow
def test_one_camera_no_query_runs_end_to_end(tmp_path):
    """The README's crops example: no camera folders, no query/gallery; one command leaves the
    models, the teacher's features, the pseudo-identity CSVs and pictures, and a summary."""
    from test_workflow import TINY

    market = market_tiny(tmp_path / "gen")
    convert(market, tmp_path / "data" / "crops", names="hashed", cameras="none", test=False)
    proc = snakemake(tmp_path, "--cores", "2", "--configfile", str(TINY), str(crops_config(tmp_path / "c.yaml")))
    base = tmp_path / "results" / "crops"
    for path in ("teacher/model.pth", "student/model.pth", "teacher/train_features.h5", "teacher/curve.png",
                 "teacher/pseudo_identities.png", "student/pseudo_identities.png", "summary.md", "summary.html"):
        assert (base / path).is_file(), path
    assert not list(base.rglob("eval.json"))
    for model in ("teacher", "student"):
        with open(base / model / "pseudo_identities.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 96 and set(rows[0]) == {"path", "camera", "pseudo_identity", "distance_to_centre"}
        assert {r["camera"] for r in rows} == {"train"}
        assert all((r["pseudo_identity"] == "-1") == (r["distance_to_centre"] == "") for r in rows)
        records = [json.loads(line) for line in (base / model / "log.jsonl").read_text().splitlines()]
        assert records[0]["phase"] != "untrained" and all("purity" not in r and r["mAP"] is None for r in records)
        assert all("within_cluster_distance" in r for r in records)
    table = (base / "summary.md").read_text()
    assert "no labelled split" in table and table.strip() in proc.stderr
    summary = json.loads((base / "data" / "summary.json").read_text())
    assert summary["cameras"] == [{"name": "train", "id": 0, "images": 96}] and summary["labelled_split"] is False
