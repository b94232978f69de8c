"""Deterministic synthetic person re-id dataset in the Market-1501 layout and naming.

Designed so that the method's ideas matter on a CPU-sized problem:
- identities are defined by *separate* upper and lower clothing (colour, pattern, sleeve /
  trouser type) drawn from a small palette, plus minor cues (bag, shoes, hair), so the
  upper/lower part views carry different, complementary evidence;
- near-duplicate identities share their upper or lower clothing (or both, differing only in
  minor cues) so clustering on the global appearance alone makes impure clusters;
- every camera has its own colour cast, gain/gamma, background, blur, noise, JPEG quality
  and viewpoint mix (front / back / side; the chest logo is only seen from the front), so
  raw colour statistics of an untrained network match camera before identity;
- detection jitter (scale / shift), occluders (cars, poles, passers-by), distractors
  (pid 0, gallery only) and junk crops (pid -1, gallery only) as in Market-1501.

Every image is drawn from its own RNG seeded by (seed, kind, pid, index), so the output is
byte-identical for a seed whatever the order of generation.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from purireid.config.resolve import schema_defaults
from purireid.io.files import atomic_dir

GENERATOR_VERSION = 1

# Small palette so colours collide between identities (clothing colour alone is ambiguous).
PALETTE = np.array([
    [20, 20, 24], [235, 235, 230], [128, 128, 128], [180, 30, 35], [35, 60, 170],
    [25, 30, 70], [40, 130, 60], [220, 200, 40], [110, 70, 40], [210, 190, 150],
    [220, 120, 160], [240, 130, 30],
], dtype=np.float32)
SKIN = np.array([[240, 205, 180], [210, 160, 120], [160, 110, 75], [100, 65, 45]], np.float32)
HAIR = np.array([[15, 12, 10], [70, 45, 25], [190, 160, 90], [120, 120, 120]], np.float32)
UPPER_PATTERNS = ("solid", "hstripe", "vstripe", "check", "logo")
LOWER_TYPES = ("trousers", "shorts", "skirt")
VIEWPOINTS = ("front", "back", "side")  # of the rendered person; not the model's views (purireid.VIEWS)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return np.clip(PALETTE[rng.integers(len(PALETTE))] + rng.normal(0, 12, 3), 0, 255)


def _identity(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "upper": {"colour": _colour(rng), "pattern": UPPER_PATTERNS[rng.integers(5)],
                  "colour2": _colour(rng), "freq": int(rng.integers(3, 7)),
                  "long_sleeves": bool(rng.random() < 0.6)},
        "lower": {"colour": _colour(rng), "type": LOWER_TYPES[rng.choice(3, p=[0.6, 0.2, 0.2])],
                  "striped": bool(rng.random() < 0.2), "colour2": _colour(rng)},
        "skin": SKIN[rng.integers(len(SKIN))] + rng.normal(0, 6, 3),
        "hair": HAIR[rng.integers(len(HAIR))], "long_hair": bool(rng.random() < 0.3),
        "shoes": _colour(rng) * 0.6,
        "bag": ["none", "backpack", "shoulder"][rng.choice(3, p=[0.5, 0.3, 0.2])],
        "bag_colour": _colour(rng),
        "build": float(rng.uniform(0.85, 1.15)),
    }


def _near_duplicate(rng: np.random.Generator, base: dict[str, Any]) -> dict[str, Any]:
    """A new identity sharing part of `base`'s appearance (hard negative for clustering)."""
    new = _identity(rng)
    share = rng.choice(["upper", "lower", "both"], p=[0.4, 0.4, 0.2])
    for part in (["upper", "lower"] if share == "both" else [share]):
        new[part] = {k: (v + rng.normal(0, 6, 3) if isinstance(v, np.ndarray) else v)
                     for k, v in base[part].items()}
    return new


def _identities(rng: np.random.Generator, n: int, dup_prob: float = 0.35) -> list[dict[str, Any]]:
    ids: list[dict[str, Any]] = []
    for _ in range(n):
        if ids and rng.random() < dup_prob:
            ids.append(_near_duplicate(rng, ids[int(rng.integers(len(ids)))]))
        else:
            ids.append(_identity(rng))
    return ids


# The scene colours cameras are pulled towards as camera_strength goes to 0.
_NEUTRAL_WALL = np.array([128.0, 128.0, 128.0], np.float32)
_NEUTRAL_FLOOR = _NEUTRAL_WALL * 0.7


def _camera(rng: np.random.Generator, strength: float = 1.0) -> dict[str, Any]:
    """One camera; `strength` scales its colour cast, gain, bias, gamma and background away
    from a neutral camera (1 = the full differences, 0 = identical colour response and scene).
    The draws are the same for every strength, so strength 1 is the original generator."""
    views = rng.dirichlet([1.0, 1.0, 1.0])
    cam = {
        "gain": rng.uniform(0.65, 1.35, 3), "bias": rng.uniform(-25, 25, 3),
        "gamma": float(rng.uniform(0.7, 1.45)), "blur": float(rng.uniform(0.0, 1.4)),
        "noise": float(rng.uniform(2, 9)), "quality": int(rng.integers(55, 95)),
        "views": views, "wall": _colour(rng), "floor": _colour(rng) * 0.7,
        "horizon": float(rng.uniform(0.45, 0.8)), "texture": float(rng.uniform(0, 30)),
        "tex_freq": float(rng.uniform(0.1, 0.6)),
    }
    if strength != 1.0:
        s = float(strength)
        cam["gain"] = 1.0 + s * (cam["gain"] - 1.0)
        cam["bias"] = s * cam["bias"]
        cam["gamma"] = float(1.0 + s * (cam["gamma"] - 1.0))
        cam["wall"] = _NEUTRAL_WALL + s * (cam["wall"] - _NEUTRAL_WALL)
        cam["floor"] = _NEUTRAL_FLOOR + s * (cam["floor"] - _NEUTRAL_FLOOR)
        cam["texture"] = s * cam["texture"]
    return cam


def _render(rng: np.random.Generator, ident: dict[str, Any] | None, cam: dict[str, Any],
            h: int, w: int, junk: bool = False) -> bytes:
    """One JPEG image of `ident` (None: background only) seen by camera `cam`, drawing from `rng`
    in a fixed order: background, person, occluder, camera."""
    img = _background(rng, cam, h, w)
    if ident is not None:
        _paint_person(img, rng, ident, cam["views"], junk)
    _occlude(img, rng)
    return _camera_image(img, rng, cam)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates: ys [h, 1] and xs [1, w]."""
    return np.arange(h, dtype=np.float32)[:, None] + 0.5, np.arange(w, dtype=np.float32)[None, :] + 0.5


def _background(rng: np.random.Generator, cam: dict[str, Any], h: int, w: int) -> np.ndarray:
    """Wall / floor split, textured, shifted per image (float32 [h, w, 3])."""
    ys, xs = _grid(h, w)
    phase = rng.uniform(0, 100)
    horizon = cam["horizon"] * h + rng.normal(0, 3)
    img = np.where((ys < horizon)[..., None], cam["wall"], cam["floor"]).astype(np.float32)
    img = img + cam["texture"] * np.sin((xs + phase) * cam["tex_freq"] + ys * 0.05)[..., None]
    return img + rng.normal(0, 10, (h, 1, 1)).astype(np.float32) * 0.5


def _paint_person(img: np.ndarray, rng: np.random.Generator, ident: dict[str, Any], views: np.ndarray,
                  junk: bool) -> None:
    """Paint `ident` into `img` in place, facing one of VIEWPOINTS (drawn with the camera's
    probabilities `views`); a junk image shows a cut, oversized part of the person."""
    h, w = img.shape[:2]
    ys, xs = _grid(h, w)
    scale = rng.uniform(0.78, 1.0) if not junk else rng.uniform(1.6, 2.6)
    ph = h * scale
    y0 = (h - ph) / 2 + rng.normal(0, 0.04) * h - (0 if not junk else rng.uniform(0, ph * 0.5))
    cx = w / 2 + rng.normal(0, 0.07) * w
    view = VIEWPOINTS[rng.choice(3, p=views)]
    pw = ph * 0.34 * ident["build"] * (0.62 if view == "side" else 1.0)
    u = (xs - cx) / pw
    v = (ys - y0) / ph
    au = np.abs(u)
    up, lo = ident["upper"], ident["lower"]

    def paint(mask: np.ndarray, colour: np.ndarray) -> None:
        img[mask] = colour

    if ident["bag"] == "backpack" and view != "front":
        off = 0.35 if view == "side" else 0.0
        paint((np.abs(u + off) < 0.42) & (v > 0.17) & (v < 0.45), ident["bag_colour"])
    # Legs / lower clothing.
    spread = rng.uniform(0.0, 0.12) if view == "side" else 0.0
    legs = (v > 0.52) & (v < 0.95) & (au < 0.44) & (au > 0.04 - spread)
    if lo["type"] == "trousers":
        paint(legs, lo["colour"])
        if lo["striped"]:
            paint(legs & ((au > 0.34) & (au < 0.42)), lo["colour2"])
    else:
        paint(legs, ident["skin"])
        top = 0.70 if lo["type"] == "shorts" else 0.78
        if lo["type"] == "skirt":
            paint((v > 0.5) & (v < top) & (au < 0.45 + 0.5 * (v - 0.5)), lo["colour"])
        else:
            paint(legs & (v < top), lo["colour"])
    paint((v >= 0.94) & (v < 0.995) & (au < 0.46) & (au > 0.02), ident["shoes"])
    # Torso with its pattern (the logo is on the chest: visible from the front only).
    torso = (v > 0.15) & (v <= 0.53) & (au < 0.5 - 0.08 * (v - 0.15))
    paint(torso, up["colour"])
    k = up["freq"]
    pat = up["pattern"]
    if pat == "hstripe":
        paint(torso & (((v - 0.15) / 0.38 * k) % 1 < 0.5), up["colour2"])
    elif pat == "vstripe":
        paint(torso & (((u + 0.5) * k) % 1 < 0.5), up["colour2"])
    elif pat == "check":
        paint(torso & ((((v - 0.15) / 0.38 * k) % 1 < 0.5) ^ (((u + 0.5) * k) % 1 < 0.5)), up["colour2"])
    elif pat == "logo" and view == "front":
        paint(torso & (au < 0.2) & (v > 0.22) & (v < 0.34), up["colour2"])
    # Arms: sleeves in the upper colour, forearms in skin for short sleeves.
    arm_side = (au > 0.5) & (au < 0.66) if view != "side" else (np.abs(u - 0.1) < 0.14)
    arms = arm_side & (v > 0.16) & (v < 0.52)
    paint(arms, ident["skin"])
    paint(arms & (v < (0.5 if up["long_sleeves"] else 0.28)), up["colour"])
    if ident["bag"] == "shoulder":
        side = 1 if view != "side" else 0
        paint((np.abs(u - 0.55 * side) < 0.16) & (v > 0.42) & (v < 0.58), ident["bag_colour"])
        paint((np.abs(u - (v - 0.16) * 1.6 + 0.5) < 0.06) & (v > 0.16) & (v < 0.42), ident["bag_colour"])
    # Head and hair (back view: hair covers the head).
    head = (u / 0.21) ** 2 + ((v - 0.08) / 0.075) ** 2 < 1
    paint(head, ident["skin"])
    hair = head & ((v < 0.05) if view == "front" else (v < 0.13 if view == "back" else (v < 0.06) | (u < -0.05)))
    paint(hair, ident["hair"])
    if ident["long_hair"] and view != "front":
        paint((au < 0.22) & (v > 0.1) & (v < 0.24), ident["hair"])


def _occlude(img: np.ndarray, rng: np.random.Generator) -> None:
    """In a quarter of the images, an occluder in place: a car / bench from below, a pole, or a
    passer-by at the side."""
    h, w = img.shape[:2]
    ys, xs = _grid(h, w)
    if rng.random() < 0.25:
        kind = rng.integers(3)
        col = _colour(rng)
        if kind == 0:
            occ = ys > h * rng.uniform(0.6, 0.85)
        elif kind == 1:
            x0 = rng.uniform(0, w)
            occ = np.abs(xs - x0) < w * rng.uniform(0.05, 0.14)
        else:
            x0 = rng.choice([0.0, float(w)])
            occ = np.abs(xs - x0) < w * rng.uniform(0.2, 0.4)
        img[np.broadcast_to(occ, (h, w))] = col + rng.normal(0, 8, 3)


def _camera_image(img: np.ndarray, rng: np.random.Generator, cam: dict[str, Any]) -> bytes:
    """What the camera makes of the scene: colour cast, gamma, noise, blur, JPEG quality."""
    w = img.shape[1]
    light = rng.uniform(0.85, 1.15)
    img = img * (cam["gain"] * light) + cam["bias"]
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** cam["gamma"]
    img = img + rng.normal(0, cam["noise"], img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    blur = cam["blur"] + rng.uniform(0, 0.3)
    if blur > 0.2:
        pil = pil.filter(ImageFilter.GaussianBlur(blur * w / 64))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=cam["quality"])
    return buf.getvalue()


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, *keys])


def _camera_split(rng: np.random.Generator, n_images: int, num_cameras: int, min_per_cam: int) -> list[int]:
    """Cameras of one identity's images: 2..num_cameras cameras, each with >= min_per_cam images."""
    max_cams = max(2, min(num_cameras, n_images // max(min_per_cam, 1)))
    n_cams = int(rng.integers(2, max_cams + 1)) if max_cams > 2 else 2
    cams = sorted(rng.choice(num_cameras, size=n_cams, replace=False).tolist())
    base = [c for c in cams for _ in range(min_per_cam)][:n_images]
    rest = rng.choice(cams, size=n_images - len(base)).tolist()
    return sorted(base + rest)


def _frame_name(pid: int, cam: int, frame: int) -> str:
    pid_s = "-1" if pid < 0 else f"{pid:04d}"
    return f"{pid_s}_c{cam + 1}s1_{frame:06d}_01.jpg"


def _write_identities(folder: Path, first: int, people: list[dict[str, Any]], cameras: list[dict[str, Any]],
                      params: dict[str, Any]) -> dict[str, int]:
    """Render people[k] as the identity at index first + k (pid first + k + 1) into `folder`;
    the counts of what was written. Its image j is frame index * images_per_id + j + 1, the
    number it gets when every identity is written in order."""
    num_train_ids, images_per_id = params["num_train_ids"], params["images_per_id"]
    seed, height, width = params["seed"], params["height"], params["width"]
    counts = {"train": 0, "query": 0, "gallery": 0}
    for k, ident in enumerate(people):
        index = first + k
        pid = index + 1
        is_test = index >= num_train_ids
        r = _rng(seed, 1, pid)
        cams = _camera_split(r, images_per_id, params["num_cameras"], 2 if is_test else 1)
        frames = [index * images_per_id + j + 1 for j in range(len(cams))]
        if not is_test:
            for j, cam in enumerate(cams):
                image = _render(_rng(seed, 2, pid, j), ident, cameras[cam], height, width)
                (folder / "bounding_box_train" / _frame_name(pid, cam, frames[j])).write_bytes(image)
            counts["train"] += len(cams)
            continue
        # Query: one image of up to 3 cameras; every camera keeps >= 1 gallery image, so
        # each query has a true match in another camera.
        per_cam: dict[int, list[int]] = {}
        for j, cam in enumerate(cams):
            per_cam.setdefault(cam, []).append(j)
        eligible = [c for c, js in per_cam.items() if len(js) >= 2]
        q_cams = set(r.permutation(eligible)[:3].tolist())
        query_j = {per_cam[c][0] for c in q_cams}
        for j, cam in enumerate(cams):
            split = "query" if j in query_j else "gallery"
            image = _render(_rng(seed, 2, pid, j), ident, cameras[cam], height, width)
            sub = "query" if split == "query" else "bounding_box_test"
            (folder / sub / _frame_name(pid, cam, frames[j])).write_bytes(image)
            counts[split] += 1
    return counts


def _write_extras(folder: Path, kind: str, indices: range, first_frame: int, cameras: list[dict[str, Any]],
                  params: dict[str, Any]) -> dict[str, int]:
    """Distractors (pid 0: one-off people) or junk crops (pid -1) number `indices` into the gallery."""
    seed, height, width = params["seed"], params["height"], params["width"]
    for j in indices:
        r = _rng(seed, 3 if kind == "distractors" else 4, j)
        cam = int(r.integers(params["num_cameras"]))
        if kind == "distractors":
            pid, image = 0, _render(r, _identity(r), cameras[cam], height, width)
        else:
            ident = _identity(r) if r.random() < 0.7 else None
            pid, image = -1, _render(r, ident, cameras[cam], height, width, junk=True)
        (folder / "bounding_box_test" / _frame_name(pid, cam, first_frame + j)).write_bytes(image)
    # (synthetic.json's gallery count includes the distractors, not the junk)
    return {"gallery": len(indices), kind: len(indices)} if kind == "distractors" else {kind: len(indices)}


def _run_task(task: tuple) -> dict[str, int]:
    kind, args = task
    return _write_identities(*args) if kind == "identities" else _write_extras(*args)


def generate_synthetic(out_dir: str | Path, *, workers: int = 1, **params: Any) -> dict[str, Any]:
    """Write the dataset to `out_dir` (bounding_box_train/, query/, bounding_box_test/, synthetic.json).

    `params`: any keys of the config's `synthetic` section (num_train_ids, num_test_ids,
    images_per_id, num_cameras, height, width, seed, camera_strength, near_duplicate_rate);
    the others take the schema's defaults (purireid/config/schemas/config.schema.yaml), which
    reproduce generator version 1. `camera_strength` scales the colour cast / gain / bias /
    gamma / background differences between cameras (1 = full, 0 = none; blur, noise, JPEG
    quality and viewpoint mix always differ); `near_duplicate_rate` is the probability that
    an identity shares its upper or lower clothing (or both) with an earlier one.

    `workers` > 1 renders in that many processes; the files are the same bytes (every image
    has its own RNG and its frame number is fixed by its position). Built in a temporary
    sibling folder and renamed into place, so a killed run leaves no half-written dataset.
    Returns the summary also written to synthetic.json.
    """
    from concurrent.futures import ProcessPoolExecutor

    from purireid.runtime.signals import ignore_stop_signals

    out_dir = Path(out_dir)
    params = synthetic_params(**params)
    num_train_ids, num_test_ids = params["num_train_ids"], params["num_test_ids"]
    if params["camera_strength"] < 0:
        raise ValueError(f"camera_strength must be >= 0, got {params['camera_strength']}")
    if not 0.0 <= params["near_duplicate_rate"] <= 1.0:
        raise ValueError(f"near_duplicate_rate must lie in [0, 1], got {params['near_duplicate_rate']}")
    rng = _rng(params["seed"], 0)
    cameras = [_camera(rng, params["camera_strength"]) for _ in range(params["num_cameras"])]
    people = _identities(rng, num_train_ids + num_test_ids, params["near_duplicate_rate"])

    # Frames: every identity's images in order, then the distractors (pid 0: one-off people in
    # the gallery), then the junk crops (pid -1: bad crops).
    num_distractors, num_junk = max(4, num_test_ids), max(2, num_test_ids // 5)
    first_extra = len(people) * params["images_per_id"] + 1
    chunk = max(1, min(32, len(people) // (4 * max(1, workers)) or 1))
    counts = {"train": 0, "query": 0, "gallery": 0, "distractors": 0, "junk": 0}
    with atomic_dir(out_dir) as tmp:
        tasks: list[tuple] = [("identities", (tmp, i, people[i:i + chunk], cameras, params))
                              for i in range(0, len(people), chunk)]
        tasks += [("extras", (tmp, "distractors", range(num_distractors), first_extra, cameras, params)),
                  ("extras", (tmp, "junk", range(num_junk), first_extra + num_distractors, cameras, params))]
        for sub in ("bounding_box_train", "query", "bounding_box_test"):
            (tmp / sub).mkdir()
        if workers > 1:
            # The workers leave SIGTERM/SIGINT to this process; a stop cancels what has not started.
            with ProcessPoolExecutor(workers, initializer=ignore_stop_signals) as pool:
                try:
                    results = list(pool.map(_run_task, tasks))
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        else:
            results = [_run_task(task) for task in tasks]
        for result in results:
            for key, value in result.items():
                counts[key] += value
        summary = {"params": params, "counts": counts}
        (tmp / "synthetic.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def synthetic_params(**params: Any) -> dict[str, Any]:
    """The generator's full parameters: `params` over the schema's defaults, plus the version."""
    defaults = schema_defaults("synthetic")
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise TypeError(f"unknown synthetic generator parameter(s) {unknown}; known: {sorted(defaults)}")
    full = {**defaults, **params}
    for key in ("camera_strength", "near_duplicate_rate"):  # stored as floats
        full[key] = float(full[key])
    return {**full, "version": GENERATOR_VERSION}


def synthetic_params_match(out_dir: str | Path, **params: Any) -> bool:
    """True if `out_dir` holds a complete dataset generated with exactly these parameters
    (those left out taking the schema's defaults, as they did when generating)."""
    meta = Path(out_dir) / "synthetic.json"
    if not meta.is_file():
        return False
    try:
        stored = json.loads(meta.read_text())["params"]
    except (ValueError, KeyError):
        return False
    return stored == synthetic_params(**params)
