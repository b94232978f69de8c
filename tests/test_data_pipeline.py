"""Samplers, transforms (PIL path vs batched/cached path), train/test loaders, synthetic generator."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from purireid.config.resolve import resolve_config, stage_config
from purireid.data import (
    CameraAwareSampler, RandomMultiInstanceSampler, Record, TrainLoader, build_image_cache,
    build_test_loader, generate_synthetic, load_dataset,
)
from purireid.data.datasets import load_market_layout
from purireid.data.loaders import open_image_cache
from purireid.data.samplers import epoch_rng
from purireid.data.transforms import (
    ERASE_VALUE, IMAGENET_MEAN, IMAGENET_STD, augment_batch, augment_batched, augment_pil, load_resized,
    sample_augmentation,
)
from purireid.runtime.dispatch import count_ops
from purireid.stages import prepare_dataset

from augment_reference import per_sample_augment


# --------------------------------------------------------------------------- samplers
def _labels():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 10)
    camids = rng.integers(0, 4, labels.size)
    labels[::7] = -1  # outliers
    camids[labels == 3] = 2  # a single-camera pseudo-id
    return labels, camids


@pytest.mark.parametrize("cls", [CameraAwareSampler, RandomMultiInstanceSampler])
def test_sampler_instances_per_id_and_outliers(cls):
    labels, camids = _labels()
    s = cls(labels, camids, 4)
    idx = s.sample_pass(np.random.default_rng(1))
    assert len(idx) == 12 * 4 and (labels[idx] >= 0).all()
    groups = labels[idx].reshape(-1, 4)
    assert (groups == groups[:, :1]).all()  # blocks of num_instances images of one pseudo-id
    assert sorted(groups[:, 0]) == list(range(12))  # every pseudo-id once per pass


def test_camera_aware_prefers_other_cameras():
    labels, camids = _labels()
    s = CameraAwareSampler(labels, camids, 4)
    for seed in range(5):
        blocks = s.sample_pass(np.random.default_rng(seed)).reshape(-1, 4)
        for block in blocks:
            pid = labels[block[0]]
            if pid == 3:  # one camera only: falls back to other images of the id
                assert (camids[block] == 2).all()
            else:
                assert (camids[block[1:]] != camids[block[0]]).all()
    # the camera-agnostic variant does pick same-camera images
    r = RandomMultiInstanceSampler(labels, camids, 4)
    blocks = np.concatenate([r.sample_pass(np.random.default_rng(s)) for s in range(5)]).reshape(-1, 4)
    assert any((camids[b[1:]] == camids[b[0]]).any() for b in blocks if labels[b[0]] != 3)


def test_sampler_reproducible_and_replacement_rule():
    labels, camids = _labels()
    s = CameraAwareSampler(labels, camids, 4)
    a = s.epoch_batches(epoch_rng(1, 3, 0), 16, 10)
    assert a.shape == (10, 16) and np.array_equal(a, s.epoch_batches(epoch_rng(1, 3, 0), 16, 10))
    assert not np.array_equal(a, s.epoch_batches(epoch_rng(1, 4, 0), 16, 10))
    assert not np.array_equal(a, s.epoch_batches(epoch_rng(2, 3, 0), 16, 10))
    # 2 images in a cluster: the other one is drawn with replacement num_instances-1 times
    two = CameraAwareSampler(np.array([0, 0]), np.array([0, 1]), 4).sample_pass(np.random.default_rng(0))
    assert len(two) == 4 and len(set(two[1:].tolist())) == 1
    # a singleton contributes only its anchor (released code)
    assert len(CameraAwareSampler(np.array([0]), np.array([0]), 4).sample_pass(np.random.default_rng(0))) == 1
    with pytest.raises(ValueError, match="fewer than one batch"):
        CameraAwareSampler(np.array([0, 0]), np.array([0, 1]), 2).epoch_batches(np.random.default_rng(0), 8, 1)


# --------------------------------------------------------------------------- transforms
def test_augmentation_parameter_statistics():
    h, w = 256, 128
    p = sample_augmentation(np.random.default_rng(0), 20000, h, w)
    assert abs(p.flip.mean() - 0.5) < 0.02 and abs(p.erase.mean() - 0.5) < 0.02
    assert p.dy.min() == 0 and p.dy.max() == 20 and abs(p.dx.mean() - 10) < 0.2
    e = p.erase
    area = p.eh[e] * p.ew[e] / (h * w)
    assert area.min() > 0.015 and area.max() < 0.42 and 0.1 < area.mean() < 0.25
    aspect = p.eh[e] / p.ew[e]
    assert aspect.min() > 0.27 and aspect.max() < 3.7
    assert (p.ey[e] + p.eh[e] <= h).all() and (p.ex[e] + p.ew[e] <= w).all()
    assert (p.eh[~e] == 0).all()


def _photo(seed: int, size=(40, 90)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("pad", [10, 2])  # the paper's border; config.yaml's at 64x32 (train.crop_pad)
def test_batched_augmentation_equals_pil_path(pad):
    h, w = 64, 32
    imgs = [_photo(s).resize((w, h), Image.BICUBIC) for s in range(64)]
    p = sample_augmentation(np.random.default_rng(5), 64, h, w, pad=pad)
    assert p.flip.any() and (~p.flip).any() and p.erase.any() and (~p.erase).any()
    assert p.dy.max() <= 2 * pad and p.dx.max() <= 2 * pad
    pil = torch.stack([augment_pil(im, p, i, pad=pad) for i, im in enumerate(imgs)])
    batch = augment_batch(torch.from_numpy(np.stack([np.array(im) for im in imgs])), p, pad=pad)
    assert batch.shape == (64, 3, h, w) and batch.dtype == torch.float32
    assert torch.equal(batch, pil)
    i = int(np.flatnonzero(p.erase)[0])
    patch = batch[i, :, p.ey[i]:p.ey[i] + p.eh[i], p.ex[i]:p.ex[i] + p.ew[i]]
    assert torch.allclose(patch, torch.tensor(ERASE_VALUE).view(3, 1, 1).expand_as(patch))
    black = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    plain = np.flatnonzero(~p.erase & ~p.flip)
    shifted = plain[p.dy[plain] > pad]  # shifted up by dy - pad rows: that many bottom rows are the border
    assert len(shifted)
    for j in shifted:
        rows = int(p.dy[j]) - pad
        torch.testing.assert_close(batch[j, :, h - rows:, :], black.expand(3, rows, w))
        assert not torch.allclose(batch[j, :, h - rows - 1, :], black[:, 0].expand(3, w))


def test_cache_equals_pil_resize_and_is_rebuilt_when_stale(tmp_path):
    recs = []
    for k in range(5):
        _photo(k).save(tmp_path / f"{k:04d}_c1s1_000001_01.jpg", quality=95)
        recs.append(Record(f"{k:04d}_c1s1_000001_01.jpg", k, 0))
    path = build_image_cache(recs, tmp_path, tmp_path / "cache", 48, 24, progress=False)
    arr = open_image_cache(path)
    assert arr.shape == (5, 48, 24, 3) and arr.dtype == np.uint8
    for k, r in enumerate(recs):
        assert np.array_equal(arr[k], np.asarray(load_resized(tmp_path / r.path, 48, 24)))
    assert build_image_cache(recs, tmp_path, tmp_path / "cache", 48, 24, progress=False) == path
    _photo(99).save(tmp_path / recs[2].path, quality=95)  # changed file -> new cache
    path2 = build_image_cache(recs, tmp_path, tmp_path / "cache", 48, 24, progress=False)
    assert path2 != path and np.array_equal(open_image_cache(path2)[2], np.asarray(load_resized(tmp_path / recs[2].path, 48, 24)))
    assert build_image_cache(recs, tmp_path, tmp_path / "cache", 64, 32, progress=False) not in (path, path2)
    # test loader: cached == PIL, in record order
    a = list(build_test_loader(recs, tmp_path, height=48, width=24, batch_size=2))
    b = list(build_test_loader(recs, tmp_path, height=48, width=24, batch_size=2, use_cache=True,
                               cache_dir=tmp_path / "cache"))
    assert [x[1].tolist() for x in a] == [[0, 1], [2, 3], [4]]
    torch.testing.assert_close(torch.cat([x[0] for x in a]), torch.cat([x[0] for x in b]), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- synthetic + loaders
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    params = dict(num_train_ids=6, num_test_ids=4, images_per_id=6, num_cameras=3, height=32, width=16, seed=3)
    config = stage_config(resolve_config({"dataset": "synthetic", "data_root": str(root), "synthetic": params}),
                          "prepare_dataset")
    prepare_dataset.run(config, manifest=root / "m.csv", summary=root / "s.json", workers=1, progress=False)
    return root, params


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.jpg"))}


def test_synthetic_deterministic_and_market_like(synth, tmp_path):
    root, params = synth
    base = root / "synthetic" / "Synthetic-ReID"
    again = generate_synthetic(tmp_path / "again", **params)
    assert _digest(base) == _digest(tmp_path / "again") and again["counts"]["train"] == 36
    other = generate_synthetic(tmp_path / "other", **{**params, "seed": 4})
    assert _digest(tmp_path / "other") != _digest(base) and other["counts"]["train"] == 36
    names = [p.name for p in (base / "bounding_box_test").iterdir()]
    assert any(n.startswith("-1_c") for n in names) and any(n.startswith("0000_c") for n in names)
    splits = load_market_layout(base, root)
    assert {r.camid for r in splits["train"]} <= {0, 1, 2}
    assert not {r.pid for r in splits["train"]} & {r.pid for r in splits["query"]}
    for q in splits["query"]:  # every query has a true match in another camera
        assert any(g.pid == q.pid and g.camid != q.camid for g in splits["gallery"])
    with Image.open(root / splits["train"][0].path) as im:
        assert im.size == (16, 32)



def test_synthetic_in_parallel_is_the_same_dataset(synth, tmp_path):
    """prepare's workers render the synthetic set in processes: the same files, byte for byte."""
    root, params = synth
    base = root / "synthetic" / "Synthetic-ReID"
    summary = generate_synthetic(tmp_path / "parallel", workers=2, **params)
    assert _digest(tmp_path / "parallel") == _digest(base)
    assert summary == json.loads((base / "synthetic.json").read_text())


@pytest.mark.parametrize("pad", [10, 2])
def test_both_batched_paths_equal_the_per_sample_reference_and_pil(pad):
    """The CPU path and the fixed-op path (what an accelerator runs) give the per-sample
    implementation's and the PIL path's tensors bit for bit."""
    h, w = 48, 24
    rng = np.random.default_rng(8)
    images = torch.from_numpy(rng.integers(0, 256, (40, h, w, 3), dtype=np.uint8))
    p = sample_augmentation(np.random.default_rng(9), 40, h, w, pad=pad)
    assert p.flip.any() and p.erase.any() and (p.dx == 0).any() and (p.dx == 2 * pad).any()
    reference = per_sample_augment(images, p, pad)
    pil = torch.stack([augment_pil(Image.fromarray(im.numpy()), p, i, pad=pad) for i, im in enumerate(images)])
    assert torch.equal(reference, pil)
    assert torch.equal(augment_batch(images, p, pad=pad), reference)
    assert torch.equal(augment_batched(images, p, pad=pad), reference)


def test_batched_augmentation_takes_a_fixed_handful_of_ops():
    """On an accelerator: the same number of tensor ops (each a launch) at any batch size, at most 40."""
    counts = set()
    for batch in (32, 256, 512):
        images = torch.zeros(batch, 24, 12, 3, dtype=torch.uint8)
        p = sample_augmentation(np.random.default_rng(batch), batch, 24, 12, pad=4)
        counts.add(count_ops(lambda: augment_batched(images, p, pad=4)).total)
    assert len(counts) == 1 and counts.pop() <= 40

def _loader(root, **kw):
    recs = load_dataset("synthetic", root)["train"]
    base = dict(height=32, width=16, batch_size=8, num_instances=2, iters=3, seed=7)
    return recs, TrainLoader(recs, root, **{**base, **kw})


def test_train_loader_crops_with_the_configured_border(synth, tmp_path):
    """train.crop_pad reaches both loader paths: each batch is the cached images augmented with
    that border (the paper's 10 px would shift a 16-px-wide image by up to 10 px)."""
    root, _ = synth
    recs, pil = _loader(root, crop_pad=1)
    _, cached = _loader(root, crop_pad=1, use_cache=True, cache_dir=tmp_path / "cache")
    _, paper = _loader(root, use_cache=True, cache_dir=tmp_path / "cache")
    labels = np.array([r.pid for r in recs]) % 4
    images = torch.from_numpy(np.array(open_image_cache(cached.cache_path)))
    for k, (a, b, c) in enumerate(zip(pil.epoch(2, labels), cached.epoch(2, labels), paper.epoch(2, labels))):
        params = sample_augmentation(epoch_rng(7, 2, 1, k), 8, 32, 16, pad=1)
        torch.testing.assert_close(b[0], augment_batch(images[b[1]], params, pad=1), rtol=0, atol=0)
        assert torch.equal(a[0], b[0])
        assert torch.equal(a[1], c[1]) and not torch.allclose(b[0], c[0])


def test_train_loader_batches_ranks_and_paths(synth, tmp_path):
    root, _ = synth
    recs, full = _loader(root)
    labels = np.array([r.pid for r in recs]) % 4 - (np.arange(len(recs)) % 9 == 0)  # some -1
    batches = list(full.epoch(2, labels))
    assert len(batches) == 3 and len(full) == 3
    images, idx = batches[0]
    assert images.shape == (8, 3, 32, 16) and images.dtype == torch.float32 and idx.dtype == torch.int64
    assert (labels[np.concatenate([b[1].numpy() for b in batches])] >= 0).all()
    again = list(full.epoch(2, labels))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert not torch.equal(list(full.epoch(3, labels))[0][1], idx)
    assert len(list(full.epoch(-1, labels, iters=6))) == 6  # the student's epoch -1, twice the iterations
    # DDP: the ranks' slices concatenate to the global batch, images included
    parts = [list(_loader(root, rank=r, world_size=2)[1].epoch(2, labels)) for r in range(2)]
    for k in range(3):
        assert torch.equal(torch.cat([parts[0][k][1], parts[1][k][1]]), batches[k][1])
        torch.testing.assert_close(torch.cat([parts[0][k][0], parts[1][k][0]]), batches[k][0])
    # the cached path (with a worker process) gives the same batches as the PIL path
    _, cached = _loader(root, use_cache=True, cache_dir=tmp_path / "cache", workers=1)
    for a, b in zip(batches, cached.epoch(2, labels)):
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
