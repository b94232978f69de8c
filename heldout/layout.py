"""The held-out generator's layout: identities split into train and test with disjoint 4-digit
pids, images per identity spread over cameras in tracks (a person crossing a camera: a few
frames with advancing gait phase), queries with a gallery match in another camera, distractors
(pid 0) and junk crops (pid -1), written in the Market-1501 layout and naming that
`dataset: folder` reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from heldout.camera import describe_camera, make_camera, render
from heldout.draw import keyed_rng
from heldout.identity import identity, popular_garments
from purireid.io.files import atomic_dir

__all__ = ["FOLDERS", "GENERATOR", "SUMMARY_NAME", "VERSION", "generate_heldout"]

GENERATOR = "purireid-heldout"
VERSION = 1
SUMMARY_NAME = "heldout.json"
FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def _track(seed: int, pid: int, cam_index: int, track_index: int, cam: dict[str, Any],
           h: int, w: int) -> dict[str, Any]:
    """A person crossing a camera: fixed heading, scale and carrying side; advancing gait."""
    rng = keyed_rng(seed, 2, pid, cam_index, track_index)
    wc = cam["canvas"].shape[1]
    hc = cam["canvas"].shape[0]
    return {
        "yaw": cam["heading"] + (np.pi if rng.random() < 0.5 else 0.0) + rng.normal(0, cam["heading_spread"]),
        "phase": rng.uniform(0, 2 * np.pi), "step": rng.uniform(0.5, 1.7),
        "scale": cam["scale"] * rng.uniform(0.92, 1.06), "x0": rng.uniform(0, wc - w), "dx": rng.normal(0, 0.03) * w,
        "y0": rng.uniform(0, hc - h), "bag_side": float(rng.choice([-1, 1])), "umbrella": float(rng.random() < 0.6),
        "sequence": int(rng.integers(1, cam["sequences"] + 1)), "frame": int(rng.integers(1, 800000)),
        "frame_step": int(rng.integers(3, 15)),
    }


def _image_plan(rng: np.random.Generator, n_images: int, num_cameras: int,
                popularity: np.ndarray) -> list[tuple[int, int]]:
    """(camera, track) of each image of one identity: 2..num_cameras cameras, 1-2 tracks each."""
    n_cams = int(rng.integers(2, min(num_cameras, n_images) + 1))
    cams = rng.choice(num_cameras, size=n_cams, replace=False, p=popularity).tolist()
    counts = np.ones(n_cams, int) + rng.multinomial(n_images - n_cams, popularity[cams] / popularity[cams].sum())
    plan = []
    for cam, count in zip(cams, counts):
        split = int(rng.integers(1, count)) if count >= 3 and rng.random() < 0.35 else count
        plan += [(cam, 0)] * split + [(cam, 1)] * (count - split)
    return plan


class _Writer:
    """Writes a set's images into `folder` under Market-1501 names, counting them per camera."""

    def __init__(self, folder: Path, num_cameras: int) -> None:
        self.folder = folder
        self.names: set[str] = set()
        self.counts = {"train": 0, "query": 0, "gallery": 0, "distractors": 0, "junk": 0}
        self.per_camera = [0] * num_cameras
        for sub in FOLDERS:
            (folder / sub).mkdir()

    def write(self, folder: str, pid: int, cam: int, track: dict[str, Any], k: int, data: bytes) -> None:
        frame = (track["frame"] + k * track["frame_step"]) % 1000000
        pid_s = "-1" if pid < 0 else f"{pid:04d}"
        n = 1
        while (name := f"{pid_s}_c{cam + 1}s{track['sequence']}_{frame:06d}_{n:02d}.jpg") in self.names:
            n += 1
        self.names.add(name)
        (self.folder / folder / name).write_bytes(data)
        self.per_camera[cam] += 1


class _Set:
    """The draws shared by every image of a set: its cameras, their popularity, the popular garments."""

    def __init__(self, params: dict[str, Any], n_ids: int) -> None:
        self.params, self.seed = params, params["seed"]
        self.h, self.w = params["height"], params["width"]
        self.cameras = [make_camera(self.seed, c, self.h, self.w, params["camera_strength"])
                        for c in range(params["num_cameras"])]
        popularity = np.array([c["popularity"] for c in self.cameras])
        popularity /= popularity.sum()
        self.popularity = popularity
        self.layout = keyed_rng(self.seed, 9)
        self.pids = self.layout.choice(np.arange(1, min(9999, max(1501, 2 * n_ids)) + 1), size=n_ids, replace=False)
        self.is_test = np.zeros(n_ids, bool)
        self.is_test[self.layout.permutation(n_ids)[:params["num_test_ids"]]] = True
        self.popular = popular_garments(keyed_rng(self.seed, 8), n_ids)

    def write_identity(self, out: _Writer, pid: int, test: bool) -> None:
        """Every image of identity `pid`: train images, or (`test`) query and gallery images."""
        seed, h, w, params = self.seed, self.h, self.w, self.params
        r = keyed_rng(seed, 1, pid)
        ident = identity(r, self.popular)
        spread = params["count_spread"]
        n_images = max(2, int(round(params["images_per_id"] * r.uniform(1 - spread, 1 + spread))))
        plan = _image_plan(r, n_images, params["num_cameras"], self.popularity)
        query: set[int] = set()
        if test:  # queries from 1-3 cameras; at least one camera keeps all its images in the gallery
            cams = sorted({c for c, _ in plan})
            q_cams = r.permutation(cams)[: int(r.integers(1, min(3, len(cams) - 1) + 1))]
            query = {int(r.choice([j for j, (c, _) in enumerate(plan) if c == qc])) for qc in q_cams}
        tracks: dict[tuple[int, int], dict[str, Any]] = {}
        in_track: dict[tuple[int, int], int] = {}
        for j, (cam, t) in enumerate(plan):
            k = in_track[(cam, t)] = in_track.get((cam, t), -1) + 1
            if (cam, t) not in tracks:
                tracks[(cam, t)] = _track(seed, pid, cam, t, self.cameras[cam], h, w)
            track = tracks[(cam, t)]
            data = render(keyed_rng(seed, 3, pid, j), ident, self.cameras[cam], track, k, h, w)
            split = "train" if not test else "query" if j in query else "gallery"
            out.write(SPLIT_FOLDERS[split], pid, cam, track, k, data)
            out.counts[split] += 1

    def write_extras(self, out: _Writer) -> None:
        """The gallery's distractors (one-off people, pid 0) and junk crops (background, body
        fragments, missed people: pid -1)."""
        seed, h, w, num_test_ids = self.seed, self.h, self.w, self.params["num_test_ids"]
        num_cameras, popularity, cameras = self.params["num_cameras"], self.popularity, self.cameras
        for j in range(max(2, int(round(0.8 * num_test_ids)))):
            r = keyed_rng(seed, 4, j)
            cam = int(r.choice(num_cameras, p=popularity))
            track = _track(seed, 0, cam, 100 + j, cameras[cam], h, w)
            data = render(r, identity(r, self.popular), cameras[cam], track, 0, h, w)
            out.write("bounding_box_test", 0, cam, track, 0, data)
            out.counts["gallery"] += 1
            out.counts["distractors"] += 1
        for j in range(max(2, num_test_ids // 4)):
            r = keyed_rng(seed, 5, j)
            cam = int(r.choice(num_cameras, p=popularity))
            track = _track(seed, 10000, cam, j, cameras[cam], h, w)
            kind = str(r.choice(["background", "fragment", "cut"]))
            ident = None if kind == "background" else identity(r, self.popular)
            out.write("bounding_box_test", -1, cam, track, 0, render(r, ident, cameras[cam], track, 0, h, w, junk=kind))
            out.counts["junk"] += 1


def _checked_params(params: dict[str, Any], out_dir: Path) -> None:
    """ValueError naming every bad parameter; FileExistsError for a folder that is not ours."""
    problems = [f"{k} must be >= {lo}, got {params[k]}" for k, lo in
                (("num_train_ids", 1), ("num_test_ids", 1), ("images_per_id", 2), ("num_cameras", 2),
                 ("height", 32), ("width", 16)) if params[k] < lo]
    if not 0.0 <= params["camera_strength"] <= 1.0:
        problems.append(f"camera_strength must lie in [0, 1], got {params['camera_strength']}")
    if not 0.0 <= params["count_spread"] < 1.0:
        problems.append(f"count_spread must lie in [0, 1), got {params['count_spread']}")
    if params["num_train_ids"] + params["num_test_ids"] > 9998:
        problems.append("num_train_ids + num_test_ids must be <= 9998 (4-digit pids)")
    if problems:
        raise ValueError("generate_heldout: " + "; ".join(problems))
    ours_or_empty = out_dir.is_dir() and ((out_dir / SUMMARY_NAME).is_file() or not any(out_dir.iterdir()))
    if out_dir.exists() and not ours_or_empty:
        raise FileExistsError(f"{out_dir} exists and is neither empty nor written by the held-out generator "
                              f"(no {SUMMARY_NAME} in it); fix: choose another output folder or remove it")


def generate_heldout(out_dir: str | Path, *, num_train_ids: int = 60, num_test_ids: int = 60,
                     images_per_id: int = 10, num_cameras: int = 6, camera_strength: float = 1.0,
                     seed: int = 0, height: int = 128, width: int = 64,
                     count_spread: float = 0.3) -> dict[str, Any]:
    """Write a held-out dataset in the Market-1501 layout to `out_dir`; return its summary.

    `images_per_id` is the mean number of images per identity: each identity gets
    round(images_per_id * U(1 - count_spread, 1 + count_spread)) images (count_spread 0: exactly
    images_per_id), at least 2, in 2 or more random cameras. Train and test identities have
    disjoint, non-contiguous 4-digit pids; each test identity has 1-3 query images, each with a
    gallery image of that identity in another camera. The gallery also holds about
    0.8 * num_test_ids distractors (pid 0000) and num_test_ids / 4 junk crops (pid -1).
    `camera_strength` in [0, 1] scales the cameras' colour response (mixing matrix, white
    balance, exposure, gamma, contrast, flare, illumination gradient and vignetting) and scene
    colours away from a neutral camera; 0 gives every camera the same colour response and grey
    scenes. Viewpoint, scale, resolution, blur, noise and JPEG quality always differ, and
    everything but the cameras' appearance is the same for every strength.
    Built in a hidden sibling folder and renamed into place (purireid.io.files.atomic_dir);
    `out_dir` may already exist only if empty or written by this generator (it is replaced).
    The summary is also written to `out_dir`/heldout.json.
    """
    out_dir = Path(out_dir)
    params = {"num_train_ids": int(num_train_ids), "num_test_ids": int(num_test_ids),
              "images_per_id": int(images_per_id), "num_cameras": int(num_cameras),
              "camera_strength": float(camera_strength), "seed": int(seed), "height": int(height),
              "width": int(width), "count_spread": float(count_spread)}
    _checked_params(params, out_dir)
    dataset = _Set(params, num_train_ids + num_test_ids)
    with atomic_dir(out_dir) as tmp:
        out = _Writer(tmp, num_cameras)
        for pid, test in sorted(zip(dataset.pids.tolist(), dataset.is_test.tolist())):
            dataset.write_identity(out, pid, test)
        dataset.write_extras(out)
        summary = {"generator": GENERATOR, "version": VERSION, "params": params, "counts": out.counts,
                   "train_ids": int((~dataset.is_test).sum()), "test_ids": int(dataset.is_test.sum()),
                   "images_per_camera": out.per_camera, "cameras": [describe_camera(c) for c in dataset.cameras]}
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
