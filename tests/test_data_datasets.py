"""Dataset loaders, archive extraction, validation errors and the prepare stage on miniature
copies of the real layouts (tiny JPEGs with the real naming, junk and distractors)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from purireid.config.resolve import resolve_config, stage_config
from purireid.data import DatasetError, Record, extract_archive, load_dataset, read_manifest
from purireid.stages import prepare_dataset


def prepare(name: str, data_root: Path, manifest: Path, summary: Path, *, workers: int = 1, **prepare_keys) -> dict:
    """The prepare_dataset stage on the job config of `name`, `data_root` and prepare.* keys."""
    keys = {k: str(v) if isinstance(v, Path) else v for k, v in prepare_keys.items()}
    config = resolve_config({"dataset": name, "data_root": str(data_root), "prepare": keys})
    return prepare_dataset.run(stage_config(config, "prepare_dataset"), manifest=manifest, summary=summary,
                               workers=workers, progress=False)


def _jpeg(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), ((seed * 37) % 256, (seed * 91) % 256, 80)).save(path, "JPEG")


MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c3s1_000101_01.jpg",
                           "0007_c6s2_000201_02.jpg", "0010_c5s3_000111_01.jpg"],
    "query": ["0003_c1s1_001051_00.jpg", "0005_c2s1_002151_00.jpg", "0005_c4s1_002251_00.jpg"],
    "bounding_box_test": ["0003_c2s1_001111_01.jpg", "0003_c3s1_001111_02.jpg", "0005_c1s1_002111_01.jpg",
                          "0000_c1s1_000001_01.jpg", "0000_c6s1_000002_01.jpg",
                          "-1_c1s1_000401_03.jpg", "-1_c3s1_000402_03.jpg"],
}


def make_market(root: Path, folder: str = "market1501/Market-1501-v15.09.15", names=MARKET) -> Path:
    base = root / folder
    for i, (sub, files) in enumerate(names.items()):
        for j, name in enumerate(files):
            _jpeg(base / sub / name, 10 * i + j)
    (base / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")  # ignored, as in the zip
    return base


def make_msmt_original(root: Path) -> Path:
    base = root / "msmt17" / "MSMT17_V1"
    lists = {
        "list_train.txt": ("train", [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                                     ("0000/0000_001_05_0303noon_0020_1.jpg", 0),
                                     ("0001/0001_000_15_0303afternoon_0100_0.jpg", 1)]),
        "list_val.txt": ("train", [("0002/0002_000_03_0303morning_0300_0.jpg", 2)]),
        "list_query.txt": ("test", [("0000/0000_000_02_0113morning_0001_0.jpg", 0)]),
        "list_gallery.txt": ("test", [("0000/0000_001_07_0113noon_0002_0.jpg", 0),
                                      ("0001/0001_000_09_0113noon_0003_0.jpg", 1)]),
    }
    for list_name, (sub, entries) in lists.items():
        for k, (rel, _) in enumerate(entries):
            _jpeg(base / sub / rel, k)
        (base / list_name).parent.mkdir(parents=True, exist_ok=True)
        (base / list_name).write_text("".join(f"{rel} {pid}\n" for rel, pid in entries))
    return base


def test_market_parsing_splits_and_order(tmp_path):
    make_market(tmp_path)
    splits = load_dataset("market1501", tmp_path)
    assert [len(splits[s]) for s in ("train", "query", "gallery")] == [5, 3, 5]  # 2 junk dropped
    assert splits["train"][0] == Record(
        "market1501/Market-1501-v15.09.15/bounding_box_train/0002_c1s1_000451_03.jpg", 2, 0)
    assert splits["train"][3].camid == 5  # c6 -> 5 (0-based)
    assert all(r.pid != -1 for s in splits.values() for r in s)
    assert sum(r.pid == 0 for r in splits["gallery"]) == 2  # distractors stay in the gallery
    for recs in splits.values():
        assert recs == sorted(recs)


def test_duke_and_folder_and_msmt_market_style(tmp_path):
    duke = {"bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c8_f0046300.jpg"],
            "query": ["0005_c1_f0100000.jpg"], "bounding_box_test": ["0005_c3_f0100500.jpg", "0000_c1_f0000001.jpg"]}
    make_market(tmp_path, "dukemtmc/DukeMTMC-reID", duke)
    splits = load_dataset("dukemtmcreid", tmp_path)
    assert [(r.pid, r.camid) for r in splits["train"]] == [(1, 1), (1, 7)]
    make_market(tmp_path, "mine", duke)
    assert load_dataset("folder", tmp_path, folder_name="mine")["query"][0].path == "mine/query/0005_c1_f0100000.jpg"
    msmt = {"bounding_box_train": ["0000_c1_0000.jpg", "0000_c15_0001.jpg"], "query": ["0000_c2_0000.jpg"],
            "bounding_box_test": ["0000_c3_0003.jpg"]}
    make_market(tmp_path, "msmt17/MSMT17_V1", msmt)
    assert [r.camid for r in load_dataset("msmt17", tmp_path)["train"]] == [14, 0]  # sorted by path


def test_msmt_original_lists_train_is_train_plus_val(tmp_path):
    make_msmt_original(tmp_path)
    splits = load_dataset("msmt17", tmp_path)
    assert [len(splits[s]) for s in ("train", "query", "gallery")] == [4, 1, 2]
    assert Record("msmt17/MSMT17_V1/train/0002/0002_000_03_0303morning_0300_0.jpg", 2, 2) in splits["train"]
    assert Record("msmt17/MSMT17_V1/train/0001/0001_000_15_0303afternoon_0100_0.jpg", 1, 14) in splits["train"]
    assert splits["query"] == [Record("msmt17/MSMT17_V1/test/0000/0000_000_02_0113morning_0001_0.jpg", 0, 1)]
    assert splits["train"] == sorted(splits["train"])


def test_msmt_original_missing_list_file(tmp_path):
    base = make_msmt_original(tmp_path)
    (base / "list_val.txt").unlink()
    with pytest.raises(DatasetError, match=r"list_val.txt.*\n.*expected.*\n.*found.*\n.*fix"):
        load_dataset("msmt17", tmp_path)


def test_prepare_writes_manifest_and_summary(tmp_path):
    make_market(tmp_path)
    manifest, summary = tmp_path / "res" / "manifest.csv", tmp_path / "res" / "summary.json"
    out = prepare("market1501", tmp_path, manifest, summary, check_counts=False)
    lines = manifest.read_text().splitlines()
    assert lines[0] == "split,path,pid,camid"
    assert lines[1] == "train,market1501/Market-1501-v15.09.15/bounding_box_train/0002_c1s1_000451_03.jpg,2,0"
    assert [ln.split(",")[0] for ln in lines[1:]] == ["train"] * 5 + ["query"] * 3 + ["gallery"] * 5
    assert read_manifest(manifest) == load_dataset("market1501", tmp_path)
    saved = json.loads(summary.read_text())
    assert saved == out and saved["splits"]["gallery"] == {"images": 5, "ids": 3, "cameras": 4}
    assert not [p for p in manifest.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_wrong_count_error_and_opt_out(tmp_path):
    make_market(tmp_path)
    args = ("market1501", tmp_path, tmp_path / "m.csv", tmp_path / "s.json")
    with pytest.raises(DatasetError, match=r"(?s)train: expected 12936, found 5.*check_counts: false"):
        prepare(*args)
    assert not (tmp_path / "m.csv").exists()
    prepare(*args, check_counts=False)


def test_missing_folder_error(tmp_path):
    base = make_market(tmp_path)
    for f in (base / "query").iterdir():
        f.unlink()
    (base / "query").rmdir()
    with pytest.raises(DatasetError, match=r"missing folder\(s\) \['query'\].*\n.*expected.*\n.*found.*\n.*fix"):
        load_dataset("market1501", tmp_path)
    with pytest.raises(DatasetError, match=r"not found.*\n.*\n.*prepare.archive"):
        prepare("dukemtmcreid", tmp_path, tmp_path / "m.csv", tmp_path / "s.json")


def test_unparsable_name_error(tmp_path):
    base = make_market(tmp_path)
    _jpeg(base / "query" / "person3_cam1.jpg")
    with pytest.raises(DatasetError, match=r"query/person3_cam1.jpg.*expected the Market-1501 naming"):
        load_dataset("market1501", tmp_path)


def test_corrupt_and_truncated_jpeg_named(tmp_path):
    base = make_market(tmp_path)
    good = base / "bounding_box_test" / "0003_c2s1_001111_01.jpg"
    buf = io.BytesIO()
    Image.effect_noise((64, 128), 60).convert("RGB").save(buf, "JPEG")
    good.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated
    (base / "query" / "0005_c4s1_002251_00.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError) as err:
        prepare("market1501", tmp_path, tmp_path / "m.csv", tmp_path / "s.json", check_counts=False, workers=2)
    msg = str(err.value)
    assert "2 of 13 images cannot be decoded" in msg
    assert "0003_c2s1_001111_01.jpg" in msg and "truncated" in msg
    assert "0005_c4s1_002251_00.jpg" in msg and "fix" in msg


def _zip_dir(src: Path, zip_path: Path) -> None:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src.parent).as_posix())


def test_prepare_from_zip_and_tar_archives(tmp_path):
    src = make_market(tmp_path / "src")
    archive = tmp_path / "Market-1501-v15.09.15.zip"
    _zip_dir(src, archive)
    root = tmp_path / "data"
    out = prepare("market1501", root, root / "m.csv", root / "s.json", archive=archive, check_counts=False)
    assert out["splits"]["train"]["images"] == 5
    assert not [p for p in (root / "market1501").iterdir() if p.name.startswith(".")]

    msmt = make_msmt_original(tmp_path / "src2")
    tgz = tmp_path / "MSMT17_V1.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(msmt, arcname="MSMT17_V1")
    assert prepare("msmt17", root, root / "m2.csv", root / "s2.json", archive=tgz,
                   check_counts=False)["splits"]["train"]["images"] == 4


def test_archive_without_expected_folder(tmp_path):
    src = make_market(tmp_path / "src", folder="Wrong-Name")
    archive = tmp_path / "a.zip"
    _zip_dir(src, archive)
    with pytest.raises(DatasetError, match=r"does not contain the folder 'Market-1501-v15.09.15'.*\n.*\n.*Wrong-Name"):
        prepare("market1501", tmp_path / "d", tmp_path / "m.csv", tmp_path / "s.json", archive=archive)


def test_archive_path_escape_rejected(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("Market-1501-v15.09.15/query/0001_c1s1_000001_00.jpg", b"x")
        zf.writestr("../escaped.txt", b"owned")
    dest = tmp_path / "data" / "market1501"
    with pytest.raises(DatasetError, match="outside the target folder"):
        extract_archive(archive, dest)
    assert not (tmp_path / "data" / "escaped.txt").exists()
    assert not (dest / "Market-1501-v15.09.15").exists()  # nothing extracted at all

    tar_path = tmp_path / "evil.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        info = tarfile.TarInfo("MSMT17_V1/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(DatasetError, match="link or special file"):
        extract_archive(tar_path, tmp_path / "x")


def test_prepare_stage_on_a_folder_dataset(tmp_path):
    make_market(tmp_path, "mine")
    manifest = tmp_path / "out" / "manifest.csv"
    out = prepare("folder", tmp_path, manifest, manifest.with_name("summary.json"), folder_name="mine",
                  check_counts=True)
    assert out["folder"] == "mine" and not out["counts_checked"]  # no published counts for a folder
    assert [r.path.split("/")[0] for r in read_manifest(manifest)["train"]] == ["mine"] * 5
    assert (tmp_path / "out" / "config.yaml").is_file()  # the job's config beside its outputs
