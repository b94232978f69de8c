"""A second, independent synthetic person re-ID generator, used only by the benchmarks.

The project's own generator (`purireid.data.synthetic`) is what the pipeline was tuned on;
this one exists so that learning claims can be checked on data nobody tuned for. It shares no
code or image model with it, only the output format (the Market-1501 layout and naming):

- people: an articulated 3-D stick-and-volume body (tapered capsules for limbs, a profiled
  torso, an ellipsoid head) posed by a walking phase and a heading, projected orthographically,
  so the silhouette changes with gait and viewpoint; parts are drawn far to near with soft,
  anti-aliased edges and cylinder shading. Face, hair and hat follow the head's 3-D facing.
- identities: continuous shape (girth, shoulders, hips, head, stride, arm swing), HSV clothing
  colours from a clothing prior (many blacks, greys, denims), textures (plaid, dots, gradient,
  stripes, colour blocks, chest print, denim grain), open or closed jackets, sleeve lengths,
  trousers / shorts / skirts / dresses, hair styles, hats, backpacks, shoulder bags, handbags,
  umbrellas, scarves. A few "popular garments" are worn by several identities, so identities
  look alike in part.
- cameras: each has its own scene (street facade, park, indoor hall, plaza) rendered once and
  cropped per image, a walking direction (so a viewpoint mix), person scale and aspect, and a
  colour response: 3x3 colour mixing, white balance, exposure, gamma, contrast, flare, and an
  illumination gradient with vignetting; plus resolution, blur, motion blur, noise and JPEG
  quality. `camera_strength` scales the colour response, illumination and scene colours away
  from a neutral camera (0: identical colour response and grey scenes).
- images come in tracks (a person crossing a camera: a few frames with advancing gait phase),
  with detection jitter, truncated boxes, occluders (passers-by, cars, poles, bushes, signs),
  distractors (pid 0) and junk crops (pid -1) in the gallery.

Deterministic for a seed: every image has its own RNG keyed by (seed, role, pid, index).
The module is long because it is one self-contained, benchmark-only tool (body, scenes,
cameras, layout); splitting it would only scatter it.

    python benchmarks/heldout_generator.py OUT_DIR --train-ids 60 --test-ids 60 \\
        --images-per-id 10 --cameras 6 --camera-strength 1.0 --seed 0 [--preview sheet.png]
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageFilter

from purireid.io.files import current_umask

GENERATOR = "purireid-heldout"
VERSION = 1
SUMMARY_NAME = "heldout.json"
FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
SCENES = ("street", "park", "indoor", "plaza")

Colour = np.ndarray  # float32 RGB in [0, 1]


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, *keys])


def _clip(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """np.clip without its Python overhead, which dominates on the small part-sized arrays here."""
    return np.minimum(np.maximum(x, lo), hi)


def _hsv(h: float, s: float, v: float) -> Colour:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32)


# ----------------------------------------------------------------------------- identities

def _clothing_hsv(rng: np.random.Generator, role: str) -> list[float]:
    """A clothing colour from a street-clothing prior: mostly neutral, denim and earth tones."""
    neutral, denim, earth = {"top": (0.35, 0.10, 0.12), "bottom": (0.45, 0.30, 0.12),
                             "jacket": (0.50, 0.12, 0.18)}[role]
    r = rng.random()
    if r < neutral:  # black / grey / white, black most often
        return [rng.random(), rng.uniform(0, 0.1), float(np.clip(rng.beta(1.2, 2.0) * 1.05, 0.06, 0.97))]
    if r < neutral + denim:
        return [rng.uniform(0.57, 0.66), rng.uniform(0.3, 0.75), rng.uniform(0.18, 0.6)]
    if r < neutral + denim + earth:  # khaki, brown, olive
        return [rng.uniform(0.05, 0.2), rng.uniform(0.25, 0.65), rng.uniform(0.25, 0.75)]
    return [rng.random(), rng.uniform(0.4, 1.0), rng.uniform(0.35, 0.97)]


TEXTURES = {
    "top": (("solid", "plaid", "dots", "gradient", "breton", "diagonal", "block", "print"),
            (0.42, 0.1, 0.07, 0.09, 0.1, 0.05, 0.1, 0.07)),
    "bottom": (("solid", "denim", "plaid", "sidestripe"), (0.55, 0.3, 0.05, 0.1)),
    "jacket": (("solid", "plaid", "block", "gradient"), (0.75, 0.08, 0.1, 0.07)),
}


def _garment(rng: np.random.Generator, role: str) -> dict[str, Any]:
    hsv = _clothing_hsv(rng, role)
    if rng.random() < 0.5:  # contrasting second colour
        hsv2 = _clothing_hsv(rng, "top")
    else:  # tonal: same hue, lighter or darker
        hsv2 = [hsv[0] + rng.normal(0, 0.03), hsv[1] * rng.uniform(0.5, 1.2),
                hsv[2] + rng.choice([-1, 1]) * rng.uniform(0.2, 0.4)]
    names, probs = TEXTURES[role]
    return {"hsv": hsv, "hsv2": hsv2, "texture": str(rng.choice(names, p=probs)),
            "freq": float(rng.uniform(2.0, 5.0)), "phase": float(rng.random()),
            "split": float(rng.uniform(0.35, 0.65))}


def _worn(rng: np.random.Generator, garment: dict[str, Any]) -> dict[str, Any]:
    """A copy of a (popular) garment with small colour differences, plus its RGB colours."""
    g = dict(garment)
    jit = lambda c: [c[0] + rng.normal(0, 0.008), c[1] * (1 + rng.normal(0, 0.05)), c[2] + rng.normal(0, 0.025)]
    g["rgb"], g["rgb2"] = _hsv(*jit(g["hsv"])), _hsv(*jit(g["hsv2"]))
    return g


def _popular_garments(rng: np.random.Generator, n_people: int) -> dict[str, list[dict[str, Any]]]:
    return {role: [_garment(rng, role) for _ in range(max(2, n_people // k))]
            for role, k in (("top", 8), ("bottom", 6), ("jacket", 6))}


def _identity(rng: np.random.Generator, popular: dict[str, list[dict[str, Any]]] | None) -> dict[str, Any]:
    def pick(role: str, p_popular: float) -> dict[str, Any]:
        if popular and rng.random() < p_popular:
            return _worn(rng, popular[role][int(rng.integers(len(popular[role])))])
        return _worn(rng, _garment(rng, role))

    lower = str(rng.choice(["trousers", "shorts", "skirt", "dress"], p=[0.62, 0.12, 0.16, 0.1]))
    top = pick("top", 0.28)
    skin = _hsv(rng.uniform(0.03, 0.1), rng.uniform(0.2, 0.5), rng.uniform(0.3, 0.97))
    r = rng.random()
    hair_hsv = ([rng.uniform(0.05, 0.1), rng.uniform(0.3, 0.7), rng.uniform(0.03, 0.25)] if r < 0.6 else
                [rng.uniform(0.06, 0.12), rng.uniform(0.4, 0.7), rng.uniform(0.25, 0.5)] if r < 0.8 else
                [rng.uniform(0.1, 0.14), rng.uniform(0.35, 0.6), rng.uniform(0.6, 0.88)] if r < 0.9 else
                [0.0, rng.uniform(0, 0.08), rng.uniform(0.5, 0.85)] if r < 0.96 else
                [rng.random(), rng.uniform(0.5, 0.9), rng.uniform(0.4, 0.9)])
    bag = str(rng.choice(["none", "backpack", "shoulder", "handbag"], p=[0.45, 0.28, 0.17, 0.1]))
    return {
        "girth": rng.uniform(0.82, 1.3), "shoulders": rng.uniform(0.9, 1.15), "hips": rng.uniform(0.9, 1.2),
        "head": rng.uniform(0.9, 1.12), "stride": rng.uniform(0.6, 1.2), "swing": rng.uniform(0.3, 1.0),
        "height": rng.uniform(0.9, 1.0),
        "skin": skin, "hair": _hsv(*hair_hsv),
        "hairstyle": str(rng.choice(["short", "long", "bun", "bald", "curly"], p=[0.45, 0.25, 0.1, 0.08, 0.12])),
        "top": top, "sleeve": float(rng.choice([1.0, 0.45, 0.0], p=[0.45, 0.45, 0.1])),
        "jacket": pick("jacket", 0.3) if rng.random() < 0.3 else None, "jacket_open": bool(rng.random() < 0.6),
        "lower": lower, "bottom": top if lower == "dress" else pick("bottom", 0.4),
        "hem": rng.uniform(0.62, 0.8),  # skirt / dress length as body height fraction
        "tights": _hsv(0, 0, rng.uniform(0.05, 0.2)) if rng.random() < 0.3 else None,
        "shoes": _hsv(*_clothing_hsv(rng, "bottom")) * np.float32(0.8),
        "hat": str(rng.choice(["none", "cap", "beanie"], p=[0.85, 0.08, 0.07])),
        "hat_rgb": _hsv(*_clothing_hsv(rng, "top")),
        "bag": bag, "bag_rgb": _hsv(*_clothing_hsv(rng, "jacket")),
        "umbrella": bool(rng.random() < 0.06), "umbrella_rgb": _hsv(*_clothing_hsv(rng, "top")),
        "scarf": _hsv(*_clothing_hsv(rng, "top")) if rng.random() < 0.1 else None,
    }


# ----------------------------------------------------------------------------- drawing

class _Canvas:
    """Float RGB image in [0, 1]; parts are alpha-blended onto it inside their bounding boxes."""

    def __init__(self, img: np.ndarray) -> None:
        self.img = img
        self.h, self.w = img.shape[:2]

    def window(self, x0: float, x1: float, y0: float, y1: float):
        ix0, ix1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)) + 1, self.w)
        iy0, iy1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)) + 1, self.h)
        if ix0 >= ix1 or iy0 >= iy1:
            return None
        xs = np.arange(ix0, ix1, dtype=np.float32)[None, :] + 0.5
        ys = np.arange(iy0, iy1, dtype=np.float32)[:, None] + 0.5
        return (slice(iy0, iy1), slice(ix0, ix1)), xs, ys

    def blend(self, sl: tuple[slice, slice], alpha: np.ndarray, colour: np.ndarray) -> None:
        a = alpha[..., None]
        region = self.img[sl]
        region *= 1.0 - a
        region += a * colour


def _capsule(cv: _Canvas, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float):
    """Tapered capsule p0 (radius r0) -> p1 (r1): slices, soft alpha, t along, s across in [-1, 1]."""
    r = max(r0, r1) + 1
    win = cv.window(min(p0[0], p1[0]) - r, max(p0[0], p1[0]) + r, min(p0[1], p1[1]) - r, max(p0[1], p1[1]) + r)
    if win is None:
        return None
    sl, xs, ys = win
    dx, dy = float(p1[0] - p0[0]), float(p1[1] - p0[1])
    length2 = dx * dx + dy * dy + 1e-6
    t = _clip(((xs - p0[0]) * dx + (ys - p0[1]) * dy) / length2, 0.0, 1.0)
    ex, ey = xs - (p0[0] + t * dx), ys - (p0[1] + t * dy)
    rad = r0 + (r1 - r0) * t
    alpha = _clip(rad - np.sqrt(ex * ex + ey * ey) + 0.5, 0.0, 1.0)
    s = _clip((ex * dy - ey * dx) / np.sqrt(length2) / np.maximum(rad, 0.5), -1.0, 1.0)
    return sl, alpha, t, s


def _ellipse(cv: _Canvas, cx: float, cy: float, rx: float, ry: float):
    """Soft ellipse: slices, alpha, normalised coordinates nx, ny."""
    win = cv.window(cx - rx - 1, cx + rx + 1, cy - ry - 1, cy + ry + 1)
    if win is None:
        return None
    sl, xs, ys = win
    nx, ny = (xs - cx) / rx, (ys - cy) / ry
    q = np.sqrt(nx * nx + ny * ny)
    return sl, _clip((1.0 - q) * min(rx, ry) + 0.5, 0.0, 1.0), nx + 0 * ny, ny + 0 * nx  # full-size coordinates


def _profile(cv: _Canvas, y_knots: list[float], c_knots: list[float], hw_knots: list[float]):
    """Shape bounded by rows: centre and half-width interpolated between knots. Returns u (-1..1
    across), v (0..1 down)."""
    hw_max = max(hw_knots)
    win = cv.window(min(c_knots) - hw_max - 1, max(c_knots) + hw_max + 1, y_knots[0] - 1, y_knots[-1] + 1)
    if win is None:
        return None
    sl, xs, ys = win
    yy = ys[:, 0]
    c = np.interp(yy, y_knots, c_knots).astype(np.float32)[:, None]
    hw = np.interp(yy, y_knots, hw_knots).astype(np.float32)[:, None]
    rows = _clip(np.minimum(yy - y_knots[0], y_knots[-1] - yy) + 0.5, 0.0, 1.0)[:, None]
    alpha = _clip(hw - np.abs(xs - c) + 0.5, 0.0, 1.0) * rows
    u = _clip((xs - c) / np.maximum(hw, 0.5), -1.0, 1.0)
    v = np.broadcast_to((ys - y_knots[0]) / (y_knots[-1] - y_knots[0]), u.shape)
    return sl, alpha, u, v


def _texture(g: dict[str, Any], u: np.ndarray, v: np.ndarray, front: float) -> np.ndarray:
    """Garment colour at body-surface coordinates u (across, -1..1) and v (down, 0..1)."""
    f, ph, kind = g["freq"], g["phase"], g["texture"]
    if kind == "plaid":
        m = 0.5 * (((u * f + ph) % 1.0) < 0.3) + 0.5 * (((v * f * 1.6 + ph) % 1.0) < 0.3)
    elif kind == "dots":
        a, b = (u * f + ph) % 1.0 - 0.5, (v * f * 2.0) % 1.0 - 0.5
        m = (a * a + b * b < 0.07).astype(np.float32)
    elif kind == "gradient":
        m = v
    elif kind == "breton":
        m = ((v * f * 2.5 + ph) % 1.0) < 0.4
    elif kind == "diagonal":
        m = (((u * 0.6 + v) * f + ph) % 1.0) < 0.45
    elif kind == "block":
        m = v > g["split"]
    elif kind == "print":  # chest print, seen from the front only
        m = ((np.abs(u) + np.abs(v - 0.3) * 2.2) < 0.45) * (front > 0.35)
    elif kind == "denim":
        m = 0.12 + 0.12 * np.sin(u * 41.0 + v * 7.0) * np.sin(v * 53.0 + u * 3.0)
    elif kind == "sidestripe":
        m = np.abs(np.abs(u) - 0.8) < 0.12
    else:
        m = 0.0 * u
    m = np.asarray(m, np.float32)[..., None]
    return g["rgb"] * (1.0 - m) + g["rgb2"] * m


def _shade(colour: np.ndarray, across: np.ndarray, k: float = 0.32) -> np.ndarray:
    """Cylinder shading: darker towards the silhouette edge."""
    return colour * (1.0 - k * across * across)[..., None]


def _draw_person(cv: _Canvas, ident: dict[str, Any], pose: dict[str, float]) -> None:
    """Pose: cx, top, height (pixels), aspect (lateral scale), yaw (0 = facing the camera),
    phase (walking), bag_side (+-1), umbrella (0/1)."""
    H, Hx = pose["height"] * ident["height"], pose["height"] * ident["height"] * pose["aspect"]
    yaw, phase = pose["yaw"], pose["phase"]
    cos_y, sin_y = np.cos(yaw), np.sin(yaw)
    g = ident["girth"]
    cx, top = pose["cx"], pose["top"] + pose["height"] * (1 - ident["height"])

    # Skeleton in body units (y down from the head top, x lateral, z forward).
    def leg(side: int):
        ph = phase + (0.0 if side < 0 else np.pi)
        a = 0.42 * ident["stride"] * np.sin(ph)
        bend = 0.75 * ident["stride"] * max(0.0, np.cos(ph))
        hip = np.array([side * 0.055 * ident["hips"] * g, 0.5, 0.0])
        knee = hip + 0.245 * np.array([0.0, np.cos(a), np.sin(a)])
        ankle = knee + 0.235 * np.array([0.0, np.cos(a - bend), np.sin(a - bend)])
        return hip, knee, ankle, ankle + np.array([0.0, 0.012, 0.055])

    legs = {side: leg(side) for side in (-1, 1)}
    drop = 0.975 - max(legs[-1][2][1], legs[1][2][1])  # feet on the ground: the body bobs
    shx = 0.105 * ident["shoulders"] * g

    def arm(side: int):
        ph = phase + (0.0 if side < 0 else np.pi)
        c = -0.45 * ident["swing"] * ident["stride"] * np.sin(ph)
        flex = 0.2 + 0.45 * max(0.0, -np.sin(ph)) * ident["swing"]
        if pose["umbrella"] and side == 1:
            c, flex = 0.35, 1.9
        sh = np.array([side * shx, 0.19, 0.0])
        ab = 0.1
        el = sh + 0.165 * np.array([side * np.sin(ab), np.cos(ab) * np.cos(c), np.cos(ab) * np.sin(c)])
        wr = el + 0.15 * np.array([side * 0.05, np.cos(c + flex), np.sin(c + flex)])
        return sh, el, wr

    def proj(p: np.ndarray) -> np.ndarray:
        return np.array([cx + Hx * (p[0] * cos_y - p[2] * sin_y), top + H * (p[1] + drop)], np.float32)

    def depth(p: np.ndarray) -> float:
        return float(p[0] * sin_y + p[2] * cos_y)

    front = float(cos_y)
    top_g, bottom_g, jacket = ident["top"], ident["bottom"], ident["jacket"]
    outer = jacket or top_g
    skin, tights = ident["skin"], ident["tights"]
    items: list[tuple[float, Callable[[], None]]] = []

    def limb(points, radii, cover: float, garment, bare) -> Callable[[], None]:
        """A chain of capsules; the garment covers the first `cover` fraction of its length."""
        def draw() -> None:
            n = len(points) - 1
            for i in range(n):
                shape = _capsule(cv, proj(points[i]), proj(points[i + 1]), radii[i] * H, radii[i + 1] * H)
                if shape is None:
                    continue
                sl, alpha, t, s = shape
                pos = (i + t) / n
                colour = bare
                if garment is not None and cover > 0:
                    clothed = (pos < cover)[..., None]
                    colour = np.where(clothed, _texture(garment, s, pos, -1.0), colour)  # no chest print on limbs
                cv.blend(sl, alpha, _shade(colour, s))
        return draw

    leg_bare = tights if tights is not None else skin
    leg_cover = {"trousers": 1.0, "shorts": 0.42}.get(ident["lower"], 0.0)
    for side, (hip, knee, ankle, toe) in legs.items():
        items.append((-10 + depth(knee), limb([hip, knee, ankle], [0.05 * g, 0.04 * g, 0.03 * g],
                                             leg_cover, bottom_g, leg_bare)))
        items.append((-9.9 + depth(knee), _shoe(cv, proj, ankle, toe, H, ident["shoes"])))
    if ident["lower"] in ("skirt", "dress"):
        def skirt() -> None:
            y0, y1 = 0.47 + drop, ident["hem"] + drop
            hw0 = np.hypot(0.09 * ident["hips"] * g * cos_y, 0.07 * g * sin_y)
            hw1 = hw0 * 1.35 + 0.03
            shape = _profile(cv, [top + H * y0, top + H * y1], [cx, cx], [Hx * hw0, Hx * hw1])
            if shape is not None:
                sl, alpha, u, v = shape
                cv.blend(sl, alpha, _shade(_texture(bottom_g, u, v, front), u, 0.25))
        items.append((-5.0, skirt))

    def torso() -> None:
        ys = [0.16, 0.2, 0.34, 0.45, 0.53]
        ws = [0.06, 0.11 * ident["shoulders"], 0.095, 0.085, 0.092 * ident["hips"]]
        ds = [0.05, 0.07, 0.075, 0.065, 0.07]
        hws = [Hx * np.hypot(w * g * cos_y, d * g * sin_y) for w, d in zip(ws, ds)]
        lean = 0.04 * ident["stride"]
        centres = [cx - Hx * (0.53 - y) * lean * sin_y for y in ys]
        shape = _profile(cv, [top + H * (y + drop) for y in ys], centres, hws)
        if shape is None:
            return
        sl, alpha, u, v = shape
        colour = _texture(outer, u, v, front)
        if jacket is not None and ident["jacket_open"] and front > 0.2:
            inner = np.abs(u + 0.25 * sin_y) < 0.28 * front
            colour = np.where(inner[..., None], _texture(top_g, u, v, front), colour)
        if ident["scarf"] is not None:
            colour = np.where((v < 0.12)[..., None], ident["scarf"], colour)
        cv.blend(sl, alpha, _shade(colour, u, 0.28))
    items.append((0.0, torso))

    sleeve = 1.0 if jacket is not None else ident["sleeve"]
    for side in (-1, 1):
        sh, el, wr = arm(side)
        d = depth(el)
        items.append((d, limb([sh, el, wr], [0.034 * g, 0.028 * g, 0.023 * g], sleeve * 0.999, outer, skin)))
        hand = wr + (wr - el) * 0.18
        items.append((d + 1e-3, _blob(cv, proj(hand), 0.022 * H, skin)))
        if ident["bag"] == "handbag" and side == pose["bag_side"]:
            items.append((d + 2e-3, _blob(cv, proj(hand + np.array([0, 0.07, 0])), 0.05 * H, ident["bag_rgb"], 0.75)))

    if ident["bag"] == "backpack":
        bp = np.array([0.0, 0.33, -0.075 * g - 0.045])
        def backpack() -> None:
            hw = Hx * np.hypot(0.085 * cos_y, 0.045 * sin_y)
            c = proj(bp)
            shape = _profile(cv, [c[1] - 0.11 * H, c[1] + 0.1 * H], [c[0], c[0]], [hw, hw * 1.05])
            if shape is not None:
                sl, alpha, u, v = shape
                cv.blend(sl, alpha, _shade(ident["bag_rgb"], u))
        items.append((depth(bp), backpack))
        if front > 0.3:  # straps over the shoulders, seen from the front
            for side in (-1, 1):
                p0, p1 = np.array([side * 0.06 * g, 0.19, 0.08 * g]), np.array([side * 0.075 * g, 0.4, 0.08 * g])
                items.append((0.5, _strap(cv, proj(p0), proj(p1), 0.012 * H, ident["bag_rgb"])))
    elif ident["bag"] == "shoulder":
        side = pose["bag_side"]
        bag = np.array([side * (0.1 * ident["hips"] * g + 0.035), 0.5, 0.0])
        items.append((depth(bag), _blob(cv, proj(bag), 0.055 * H, ident["bag_rgb"], 0.8)))
        items.append((0.5 if front > -0.3 else -0.5, _strap(cv, proj(np.array([-side * shx * 0.8, 0.19, 0.0])),
                                                            proj(bag), 0.011 * H, ident["bag_rgb"])))

    items.append((5.0, lambda: _head(cv, ident, proj, H, Hx, cos_y, sin_y, behind=False)))
    if ident["hairstyle"] == "long":
        items.append((-20.0 if front > -0.2 else 5.5,
                      lambda: _head(cv, ident, proj, H, Hx, cos_y, sin_y, behind=True)))
    if pose["umbrella"]:
        wr = arm(1)[2]
        items.append((10.0, lambda: _umbrella(cv, proj, wr, H, Hx, ident["umbrella_rgb"])))
    for _, draw in sorted(items, key=lambda item: item[0]):
        draw()


def _shoe(cv: _Canvas, proj, ankle: np.ndarray, toe: np.ndarray, H: float, colour: Colour) -> Callable[[], None]:
    def draw() -> None:
        shape = _capsule(cv, proj(ankle), proj(toe), 0.027 * H, 0.022 * H)
        if shape is not None:
            sl, alpha, _, s = shape
            cv.blend(sl, alpha, _shade(colour, s, 0.2))
    return draw


def _blob(cv: _Canvas, centre: np.ndarray, r: float, colour: Colour, squash: float = 1.0) -> Callable[[], None]:
    def draw() -> None:
        shape = _ellipse(cv, float(centre[0]), float(centre[1]), r * squash, r)
        if shape is not None:
            sl, alpha, nx, ny = shape
            cv.blend(sl, alpha, _shade(colour, nx, 0.3))
    return draw


def _strap(cv: _Canvas, p0: np.ndarray, p1: np.ndarray, r: float, colour: Colour) -> Callable[[], None]:
    def draw() -> None:
        shape = _capsule(cv, p0, p1, max(r, 0.5), max(r, 0.5))
        if shape is not None:
            cv.blend(shape[0], shape[1], colour * np.float32(0.85))
    return draw


def _head(cv: _Canvas, ident: dict[str, Any], proj, H: float, Hx: float, cos_y: float, sin_y: float,
          behind: bool) -> None:
    """Neck, head and hair (face and hair from the head's 3-D facing), hat; or, `behind`, long hair."""
    centre = proj(np.array([0.0, 0.066, 0.01]))
    rx, ry = 0.052 * ident["head"] * Hx, 0.066 * ident["head"] * H
    hair = ident["hair"]
    if behind:  # long hair hanging behind the head and neck
        back = proj(np.array([0.0, 0.17, -0.04]))
        shape = _capsule(cv, centre, back + np.array([Hx * 0.04 * sin_y, 0.05 * H], np.float32), rx * 1.05, rx * 0.95)
        if shape is not None:
            cv.blend(shape[0], shape[1], _shade(hair, shape[3], 0.3))
        return
    neck = _capsule(cv, centre, proj(np.array([0.0, 0.17, 0.0])), 0.024 * H, 0.028 * H)
    if neck is not None:
        cv.blend(neck[0], neck[1], ident["skin"] * np.float32(0.85))
    if ident["hairstyle"] == "curly":  # volume around the head
        shape = _ellipse(cv, centre[0], centre[1] - 0.1 * ry, rx * 1.22, ry * 1.12)
        if shape is not None:
            cv.blend(shape[0], shape[1] * (shape[3] < 0.5), hair)
    shape = _ellipse(cv, centre[0], centre[1], rx, ry)
    if shape is None:
        return
    sl, alpha, nx, ny = shape
    nz = np.sqrt(_clip(1.0 - nx * nx - ny * ny, 0.0, 1.0))
    forward = -nx * sin_y + nz * cos_y  # how much a head point faces the person's forward direction
    line, back = {"short": (-0.35, -0.15), "long": (-0.45, 0.05), "bun": (-0.4, -0.1),
                  "bald": (-0.95, -2.0), "curly": (-0.3, -0.05)}[ident["hairstyle"]]
    is_hair = (ny < line) | (forward < back)
    colour = np.where(is_hair[..., None], hair, ident["skin"])
    light = 1.0 - 0.25 * nx * nx - 0.1 * np.clip(ny, 0, 1)
    cv.blend(sl, alpha, colour * light[..., None])
    if ident["hairstyle"] == "bun":
        bun = proj(np.array([0.0, 0.03, -0.06]))
        _blob(cv, bun, 0.028 * H, hair)()
    if ident["hat"] != "none":
        hat = _ellipse(cv, centre[0], centre[1] - 0.05 * ry, rx * 1.08, ry * 1.02)
        if hat is not None:
            cut = -0.25 if ident["hat"] == "cap" else -0.05
            cv.blend(hat[0], hat[1] * (hat[3] < cut), _shade(ident["hat_rgb"], hat[2], 0.25))
        if ident["hat"] == "cap":
            brim = proj(np.array([0.0, 0.066 - 0.066 * 0.3, 0.05]))
            _strap(cv, centre + np.array([0, -0.3 * ry], np.float32), brim, 0.012 * H, ident["hat_rgb"])()


def _umbrella(cv: _Canvas, proj, hand: np.ndarray, H: float, Hx: float, colour: Colour) -> None:
    tip = proj(hand + np.array([0.0, -0.42, 0.0]))
    _strap(cv, proj(hand), tip, 0.008 * H, np.array([0.2, 0.2, 0.2], np.float32))()
    shape = _ellipse(cv, tip[0], tip[1] + 0.07 * H, 0.3 * Hx, 0.11 * H)
    if shape is not None:
        sl, alpha, nx, ny = shape
        panels = 0.9 + 0.1 * np.cos(nx * 9.0)
        cv.blend(sl, alpha * (ny < 0.3), colour * panels[..., None])


# ----------------------------------------------------------------------------- cameras

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    grid = rng.standard_normal((max(2, cells * h // w), cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC))


def _perspective_grid(ys: np.ndarray, xs: np.ndarray, horizon: float, x_vanish: float, tile: float, lw: float):
    """Tile lines of a ground plane seen from a standing camera: (line mask, tile parity)."""
    dz = np.maximum(ys - horizon + 4.0, 1.0)
    depth, lateral = 60.0 / dz, (xs - x_vanish) / dz * 2.0
    fd, fl = (depth / tile) % 1.0, (lateral / tile) % 1.0
    lines = (fd < lw) | (fl < lw * 0.7)
    parity = (np.floor(depth / tile) + np.floor(lateral / tile)) % 2
    return lines, parity


def _scene(rng: np.random.Generator, kind: str, hc: int, wc: int, h: int, strength: float) -> np.ndarray:
    """One camera's background canvas (reflectance); colours pulled to grey as strength -> 0."""
    def col(hh: float, s: float, v: float) -> Colour:
        return _hsv(hh, s * strength, 0.5 + (v - 0.5) * (0.5 + 0.5 * strength))

    amp = 0.4 + 0.6 * strength
    ys = np.arange(hc, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(wc, dtype=np.float32)[None, :] + 0.5
    horizon = hc * rng.uniform(0.38, 0.68)
    img = np.zeros((hc, wc, 3), np.float32)
    upper, ground = ys < horizon, np.broadcast_to(ys >= horizon, (hc, wc))
    x_v = wc * rng.uniform(0.2, 0.8)
    if kind == "street":
        img[:] = col(rng.random(), rng.uniform(0.05, 0.45), rng.uniform(0.35, 0.85))
        cw, ch = rng.uniform(0.15, 0.3) * h, rng.uniform(0.2, 0.35) * h
        gx, gy = (xs - rng.uniform(0, cw)) / cw, (ys - rng.uniform(0, ch)) / ch
        bright = rng.uniform(0.3, 1.3, (int(hc / ch) + 3, int(wc / cw) + 3)).astype(np.float32)
        window = ((gx % 1.0) < rng.uniform(0.45, 0.7)) & ((gy % 1.0) < rng.uniform(0.5, 0.75))
        band = h * rng.uniform(0.1, 0.25)
        window &= ys < horizon - band
        glass = col(rng.uniform(0.5, 0.65), rng.uniform(0.1, 0.4), rng.uniform(0.15, 0.45))
        cell = bright[np.clip(np.floor(gy).astype(int) + 1, 0, bright.shape[0] - 1),
                      np.clip(np.floor(gx).astype(int) + 1, 0, bright.shape[1] - 1)]
        img = np.where(window[..., None], glass * cell[..., None], img)
        shop = (ys >= horizon - band) & upper
        sign = col(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.8))
        img = np.where(np.broadcast_to(shop, (hc, wc))[..., None], sign, img)
        lines, _ = _perspective_grid(ys, xs, horizon, x_v, rng.uniform(0.3, 0.7), 0.06)
        pave = col(rng.uniform(0.05, 0.15), rng.uniform(0.0, 0.25), rng.uniform(0.45, 0.8))
        img[ground] = pave
        img[ground & lines] = pave * np.float32(1 - 0.3 * amp)
    elif kind == "park":
        sky = col(0.58, rng.uniform(0.1, 0.4), rng.uniform(0.75, 0.95))
        img[:] = sky * (1.0 - 0.2 * ys / hc)[..., None]
        for _ in range(int(rng.integers(25, 40))):
            bx, by = rng.uniform(0, wc), rng.uniform(-0.1, 1.0) * horizon
            rx, ry = rng.uniform(0.08, 0.3) * h, rng.uniform(0.06, 0.2) * h
            blob = ((xs - bx) / rx) ** 2 + ((ys - by) / ry) ** 2 < 1
            img[blob] = col(rng.uniform(0.2, 0.38), rng.uniform(0.3, 0.75), rng.uniform(0.15, 0.6))
        for _ in range(int(rng.integers(1, 4))):
            tx, tw = rng.uniform(0, wc), rng.uniform(0.03, 0.07) * h
            trunk = (np.abs(xs - tx) < tw) & (ys > horizon * rng.uniform(0.3, 0.7)) & (ys < horizon + 0.05 * h)
            img[trunk] = col(rng.uniform(0.05, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.15, 0.35))
        grass = col(rng.uniform(0.2, 0.33), rng.uniform(0.35, 0.7), rng.uniform(0.25, 0.6))
        img[ground] = grass
        # A path receding to the vanishing point: constant width on the ground plane.
        path = ground & (np.abs((xs - x_v) / np.maximum(ys - horizon + 4.0, 1.0)) < rng.uniform(0.4, 1.0))
        img[path] = col(rng.uniform(0.08, 0.12), rng.uniform(0.1, 0.35), rng.uniform(0.5, 0.8))
    elif kind == "indoor":
        wall = col(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.55, 0.92))
        img[:] = wall * (0.85 + 0.25 * (1 - ys / horizon).clip(0, 1))[..., None]
        for _ in range(int(rng.integers(2, 6))):  # posters and doors
            x0, pw = rng.uniform(0, wc), rng.uniform(0.12, 0.35) * h
            door = rng.random() < 0.4
            y1 = horizon if door else horizon - rng.uniform(0.1, 0.3) * h
            y0 = y1 - (rng.uniform(0.45, 0.7) if door else rng.uniform(0.15, 0.35)) * h
            rect = (xs > x0) & (xs < x0 + pw) & (ys > y0) & (ys < y1)
            img[rect] = (col(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.1, 0.4)) if door else
                         col(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.4, 0.95)))
        lines, parity = _perspective_grid(ys, xs, horizon, x_v, rng.uniform(0.2, 0.5), 0.03)
        a = col(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.4, 0.85))
        b = a * np.float32(1 - 0.25 * amp * rng.uniform(0.3, 1.0))
        sheen = 1.0 + 0.25 * amp * np.exp(-(ys - horizon) / (0.1 * h))  # reflection near the wall
        floor = np.where(parity[..., None] > 0, a, b) * sheen[..., None]
        img = np.where(ground[..., None], floor, img)
    else:  # plaza
        sky_line = horizon * rng.uniform(0.25, 0.6)
        img[:] = col(0.6, rng.uniform(0.05, 0.35), rng.uniform(0.7, 0.95))
        x = 0.0
        while x < wc:  # distant buildings
            bw = rng.uniform(0.2, 0.6) * h
            top_y = sky_line * rng.uniform(0.1, 1.0)
            rect = (xs >= x) & (xs < x + bw) & (ys >= top_y) & upper
            img[rect] = col(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.75))
            x += bw
        lines, parity = _perspective_grid(ys, xs, horizon, x_v, rng.uniform(0.6, 1.2), 0.04)
        stone = col(rng.uniform(0.05, 0.15), rng.uniform(0.0, 0.2), rng.uniform(0.5, 0.85))
        img[ground] = stone
        img[ground & lines] = stone * np.float32(1 - 0.25 * amp)
        for _ in range(int(rng.integers(0, 3))):  # columns
            px, pw = rng.uniform(0, wc), rng.uniform(0.05, 0.12) * h
            d = (xs - px) / pw
            pillar = np.broadcast_to((np.abs(d) < 1) & (ys < horizon + 0.04 * h), (hc, wc))
            shade = np.broadcast_to(1 - 0.4 * d * d, (hc, wc))
            stone = col(rng.uniform(0.05, 0.12), rng.uniform(0.0, 0.2), rng.uniform(0.55, 0.9))
            img[pillar] = stone * shade[pillar][:, None]
    img *= (1.0 + 0.08 * amp * _smooth_noise(rng, hc, wc, 12))[..., None]
    img += (0.015 * amp * rng.standard_normal((hc, wc, 1))).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _camera(seed: int, index: int, h: int, w: int, strength: float) -> dict[str, Any]:
    """Camera `index`; its draws do not depend on `strength`, which only scales them."""
    rng = _rng(seed, 0, index)
    s = float(strength)
    kind = SCENES[int(rng.integers(len(SCENES)))]
    hc, wc = int(round(h * 1.3)), int(round(w * 3.5))
    mixing = np.eye(3, dtype=np.float32) + s * rng.normal(0, 0.06, (3, 3)).astype(np.float32)
    log_wb = rng.normal(0, 0.14, 3)
    white_balance = np.exp(s * (log_wb - log_wb.mean())).astype(np.float32)
    ys = (np.arange(hc, dtype=np.float32)[:, None] + 0.5) / hc * 2 - 1
    xs = (np.arange(wc, dtype=np.float32)[None, :] + 0.5) / wc * 2 - 1
    angle, slope, vignette = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.4), rng.uniform(0, 0.5)
    illum = 1.0 + s * slope * (np.cos(angle) * xs + np.sin(angle) * ys) - s * vignette * 0.5 * (xs * xs * 0.3 + ys * ys)
    cam = {
        "scene": kind, "canvas": _scene(rng, kind, hc, wc, h, s), "illumination": illum.astype(np.float32),
        "colour": (np.diag(white_balance) @ mixing).astype(np.float32),
        "exposure": float(np.exp(s * np.clip(rng.normal(0, 0.25), -0.5, 0.5))),
        "gamma": float(np.exp(s * rng.normal(0, 0.18))),
        "contrast": float(s * rng.uniform(-0.35, 0.5)),
        "flare": (s * rng.uniform(0, 0.08) * rng.dirichlet([2, 2, 2]) * 3).astype(np.float32),
        "heading": float(rng.uniform(0, 2 * np.pi)), "heading_spread": float(rng.uniform(0.2, 0.9)),
        "scale": float(rng.uniform(0.8, 0.95)), "aspect": float(rng.uniform(0.88, 1.12)),
        "resolution": float(1.0 if rng.random() < 0.5 else rng.uniform(0.45, 0.85)),
        "blur": float(rng.uniform(0.0, 1.1)), "motion_blur": bool(rng.random() < 0.3),
        "noise": float(rng.uniform(1.5, 7.0)), "quality": int(rng.integers(45, 93)),
        "occlusion": float(rng.uniform(0.05, 0.3)), "popularity": float(rng.uniform(0.5, 1.5)),
        "sequences": int(rng.integers(1, 7)),
        "noise_bank": _rng(seed, 6, index).standard_normal((2 * h, 2 * w, 4), dtype=np.float32),
    }
    return cam


def _describe(cam: dict[str, Any]) -> dict[str, Any]:
    keys = ("scene", "exposure", "gamma", "contrast", "scale", "resolution", "blur", "motion_blur",
            "noise", "quality", "occlusion", "sequences")
    return {k: (round(cam[k], 4) if isinstance(cam[k], float) else cam[k]) for k in keys}


# ----------------------------------------------------------------------------- images

def _occluder(cv: _Canvas, rng: np.random.Generator, pose: dict[str, float]) -> None:
    h, w = cv.h, cv.w
    kind = rng.choice(["passerby", "car", "pole", "bush", "sign"], p=[0.35, 0.2, 0.2, 0.15, 0.1])
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    if kind == "passerby":
        other = dict(pose, cx=w / 2 + rng.choice([-1, 1]) * rng.uniform(0.45, 0.8) * w,
                     height=pose["height"] * rng.uniform(1.0, 1.25), yaw=rng.uniform(0, 2 * np.pi),
                     phase=rng.uniform(0, 2 * np.pi), umbrella=0.0, bag_side=1.0)
        other["top"] = h - other["height"] * rng.uniform(0.9, 1.0)
        _draw_person(cv, _identity(rng, None), other)
    elif kind == "car":
        y0 = h * rng.uniform(0.6, 0.85)
        x0, x1 = sorted(rng.uniform(-0.5, 1.5, 2) * w)
        body = _hsv(*_clothing_hsv(rng, "top"))
        sl = (slice(int(y0), h), slice(max(int(x0), 0), max(min(int(x1) + 1, w), 0)))
        shade = (0.8 + 0.3 * np.exp(-(ys[sl[0]] - y0) / (0.05 * h)))[..., None]
        cv.img[sl] = body * shade
    elif kind in ("pole", "sign"):
        px, pr = rng.uniform(0.05, 0.95) * w, rng.uniform(0.025, 0.07) * w
        d = (xs - px) / pr
        pole = np.broadcast_to(np.abs(d) < 1, (h, w))
        grey = _hsv(0, 0, rng.uniform(0.3, 0.7))
        cv.img[pole] = (grey * np.broadcast_to(1 - 0.4 * d * d, (h, w))[pole][:, None])
        if kind == "sign":
            sy, sw = rng.uniform(0.1, 0.4) * h, rng.uniform(0.2, 0.4) * w
            panel = (np.abs(xs - px) < sw) & (np.abs(ys - sy) < 0.08 * h)
            cv.img[np.broadcast_to(panel, (h, w))] = _hsv(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.5, 0.9))
    else:
        for _ in range(int(rng.integers(5, 12))):
            bx, by = rng.uniform(-0.1, 1.1) * w, h * rng.uniform(0.75, 1.05)
            r = rng.uniform(0.12, 0.3) * w
            blob = ((xs - bx) ** 2 + (ys - by) ** 2) < r * r
            cv.img[blob] = _hsv(rng.uniform(0.2, 0.38), rng.uniform(0.4, 0.8), rng.uniform(0.15, 0.55))


def _render(rng: np.random.Generator, ident: dict[str, Any] | None, cam: dict[str, Any], track: dict[str, float],
            k: int, h: int, w: int, junk: str | None = None) -> bytes:
    """One crop: background window, person, occluder, then the camera's optics and processing."""
    hc, wc = cam["canvas"].shape[:2]
    ox = int(np.clip(track["x0"] + k * track["dx"] + rng.normal(0, 2), 0, wc - w))
    oy = int(np.clip(track["y0"] + rng.normal(0, 1.5), 0, hc - h))
    cv = _Canvas(cam["canvas"][oy:oy + h, ox:ox + w].copy())
    height = h * track["scale"] * rng.normal(1.0, 0.03)
    pose = {"height": height, "cx": w / 2 + rng.normal(0, 0.06) * w,
            "top": (h - height) / 2 + rng.normal(0, 0.035) * h, "aspect": cam["aspect"],
            "yaw": track["yaw"] + rng.normal(0, 0.12), "phase": track["phase"] + k * track["step"],
            "bag_side": track["bag_side"],
            "umbrella": float(ident is not None and ident["umbrella"] and track["umbrella"])}
    if rng.random() < 0.05:  # truncated detection: feet or head cut off
        pose["top"] += rng.choice([-1, 1]) * rng.uniform(0.08, 0.15) * h
    if junk == "fragment":  # a detection of a body part, far too close
        pose["height"] = h * rng.uniform(1.8, 3.5)
        pose["top"] = -rng.uniform(0.0, pose["height"] - 0.8 * h)
        pose["cx"] = w / 2 + rng.normal(0, 0.3) * w
    elif junk == "cut":  # a detection that misses most of the person
        pose["cx"] = w / 2 + rng.choice([-1, 1]) * rng.uniform(0.55, 0.85) * w
    if ident is not None:
        _draw_person(cv, ident, pose)
    if rng.random() < cam["occlusion"]:
        _occluder(cv, rng, pose)

    img = cv.img * (cam["illumination"][oy:oy + h, ox:ox + w] * cam["exposure"] * rng.uniform(0.92, 1.08))[..., None]
    img = np.clip(img @ cam["colour"].T, 0.0, 1.0) ** cam["gamma"]
    img = img + cam["contrast"] * (img * img * (3 - 2 * img) - img)
    img = cam["flare"] + (1 - cam["flare"]) * img
    pil = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    if cam["resolution"] < 1.0:
        small = (max(4, int(w * cam["resolution"])), max(8, int(h * cam["resolution"])))
        pil = pil.resize(small, Image.BILINEAR).resize((w, h), Image.BILINEAR)
    blur = cam["blur"] + rng.uniform(0, 0.3)
    if blur > 0.25:
        pil = pil.filter(ImageFilter.GaussianBlur(blur * w / 64))
    if cam["motion_blur"]:
        pil = pil.filter(ImageFilter.Kernel((5, 5), [0] * 10 + [1] * 5 + [0] * 10, scale=5))
    # Sensor noise: a window of the camera's noise bank (drawing fresh normals costs more than the rest).
    ny, nx = int(rng.integers(0, h + 1)), int(rng.integers(0, w + 1))
    grain = cam["noise_bank"][ny:ny + h, nx:nx + w]
    arr = np.asarray(pil, np.float32) + cam["noise"] * (grain[..., :1] + 0.4 * grain[..., 1:])
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=cam["quality"])
    return buf.getvalue()


def _track(seed: int, pid: int, cam_index: int, track_index: int, cam: dict[str, Any],
           h: int, w: int) -> dict[str, Any]:
    """A person crossing a camera: fixed heading, scale and carrying side; advancing gait."""
    rng = _rng(seed, 2, pid, cam_index, track_index)
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


# ----------------------------------------------------------------------------- layout

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
    Built in a temporary sibling folder and renamed into place; `out_dir` may already exist
    only if empty or written by this generator (it is replaced). The summary is also written
    to `out_dir`/heldout.json.
    """
    out_dir = Path(out_dir)
    params = {"num_train_ids": int(num_train_ids), "num_test_ids": int(num_test_ids),
              "images_per_id": int(images_per_id), "num_cameras": int(num_cameras),
              "camera_strength": float(camera_strength), "seed": int(seed), "height": int(height),
              "width": int(width), "count_spread": float(count_spread)}
    problems = [f"{k} must be >= {lo}, got {params[k]}" for k, lo in
                (("num_train_ids", 1), ("num_test_ids", 1), ("images_per_id", 2), ("num_cameras", 2),
                 ("height", 32), ("width", 16)) if params[k] < lo]
    if not 0.0 <= camera_strength <= 1.0:
        problems.append(f"camera_strength must lie in [0, 1], got {camera_strength}")
    if not 0.0 <= count_spread < 1.0:
        problems.append(f"count_spread must lie in [0, 1), got {count_spread}")
    if num_train_ids + num_test_ids > 9998:
        problems.append("num_train_ids + num_test_ids must be <= 9998 (4-digit pids)")
    if problems:
        raise ValueError("generate_heldout: " + "; ".join(problems))
    ours_or_empty = out_dir.is_dir() and ((out_dir / SUMMARY_NAME).is_file() or not any(out_dir.iterdir()))
    if out_dir.exists() and not ours_or_empty:
        raise FileExistsError(f"{out_dir} exists and is neither empty nor written by the held-out generator "
                              f"(no {SUMMARY_NAME} in it); fix: choose another output folder or remove it")

    h, w = params["height"], params["width"]
    cameras = [_camera(seed, c, h, w, camera_strength) for c in range(num_cameras)]
    popularity = np.array([c["popularity"] for c in cameras])
    popularity /= popularity.sum()
    layout = _rng(seed, 9)
    n_ids = num_train_ids + num_test_ids
    pids = layout.choice(np.arange(1, min(9999, max(1501, 2 * n_ids)) + 1), size=n_ids, replace=False)
    is_test = np.zeros(n_ids, bool)
    is_test[layout.permutation(n_ids)[:num_test_ids]] = True
    popular = _popular_garments(_rng(seed, 8), n_ids)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would stay on the renamed folder
    names: set[str] = set()
    counts = {"train": 0, "query": 0, "gallery": 0, "distractors": 0, "junk": 0}
    per_camera = [0] * num_cameras

    def write(folder: str, pid: int, cam: int, track: dict[str, Any], k: int, data: bytes) -> None:
        frame = (track["frame"] + k * track["frame_step"]) % 1000000
        pid_s = "-1" if pid < 0 else f"{pid:04d}"
        n = 1
        while (name := f"{pid_s}_c{cam + 1}s{track['sequence']}_{frame:06d}_{n:02d}.jpg") in names:
            n += 1
        names.add(name)
        (tmp / folder / name).write_bytes(data)
        per_camera[cam] += 1

    try:
        for folder in FOLDERS:
            (tmp / folder).mkdir()
        for pid, test in sorted(zip(pids.tolist(), is_test.tolist())):
            r = _rng(seed, 1, pid)
            ident = _identity(r, popular)
            n_images = max(2, int(round(images_per_id * r.uniform(1 - count_spread, 1 + count_spread))))
            plan = _image_plan(r, n_images, num_cameras, popularity)
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
                    tracks[(cam, t)] = _track(seed, pid, cam, t, cameras[cam], h, w)
                track = tracks[(cam, t)]
                data = _render(_rng(seed, 3, pid, j), ident, cameras[cam], track, k, h, w)
                split = "train" if not test else "query" if j in query else "gallery"
                write({"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}[split],
                      pid, cam, track, k, data)
                counts[split] += 1
        for j in range(max(2, int(round(0.8 * num_test_ids)))):  # distractors: one-off people
            r = _rng(seed, 4, j)
            cam = int(r.choice(num_cameras, p=popularity))
            track = _track(seed, 0, cam, 100 + j, cameras[cam], h, w)
            data = _render(r, _identity(r, popular), cameras[cam], track, 0, h, w)
            write("bounding_box_test", 0, cam, track, 0, data)
            counts["gallery"] += 1
            counts["distractors"] += 1
        for j in range(max(2, num_test_ids // 4)):  # junk: background, body fragments, missed people
            r = _rng(seed, 5, j)
            cam = int(r.choice(num_cameras, p=popularity))
            track = _track(seed, 10000, cam, j, cameras[cam], h, w)
            kind = str(r.choice(["background", "fragment", "cut"]))
            ident = None if kind == "background" else _identity(r, popular)
            write("bounding_box_test", -1, cam, track, 0, _render(r, ident, cameras[cam], track, 0, h, w, junk=kind))
            counts["junk"] += 1
        summary = {"generator": GENERATOR, "version": VERSION, "params": params, "counts": counts,
                   "train_ids": int((~is_test).sum()), "test_ids": int(is_test.sum()),
                   "images_per_camera": per_camera, "cameras": [_describe(c) for c in cameras]}
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return summary


def contact_sheet(data_dir: str | Path, png_path: str | Path, *, folder: str = "bounding_box_train",
                  identities: int = 10, per_identity: int = 12) -> Path:
    """A PNG grid to look at: one row per identity, its images sorted by camera."""
    files = sorted((Path(data_dir) / folder).glob("*.jpg"))
    by_pid: dict[str, list[Path]] = {}
    for f in files:
        by_pid.setdefault(f.name.split("_")[0], []).append(f)
    rows = [sorted(v, key=lambda p: p.name.split("_")[1])[:per_identity] for v in list(by_pid.values())[:identities]]
    w, h = Image.open(rows[0][0]).size
    sheet = Image.new("RGB", (per_identity * (w + 2), len(rows) * (h + 2)), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, path in enumerate(row):
            sheet.paste(Image.open(path).convert("RGB"), (j * (w + 2), i * (h + 2)))
    png_path = Path(png_path)
    sheet.save(png_path)
    return png_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="dataset folder to write (replaced if written by this generator)")
    ap.add_argument("--train-ids", type=int, default=60, help="train identities (default 60)")
    ap.add_argument("--test-ids", type=int, default=60, help="query/gallery identities (default 60)")
    ap.add_argument("--images-per-id", type=int, default=10, help="mean images per identity (default 10)")
    ap.add_argument("--cameras", type=int, default=6, help="number of cameras (default 6)")
    ap.add_argument("--camera-strength", type=float, default=1.0,
                    help="0..1: how far cameras' colour response and scenes depart from neutral (default 1)")
    ap.add_argument("--count-spread", type=float, default=0.3,
                    help="images per identity vary by this fraction around the mean; 0 = all equal (default 0.3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--preview", help="also write a contact sheet PNG of train identities here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    summary = generate_heldout(args.out_dir, num_train_ids=args.train_ids, num_test_ids=args.test_ids,
                               images_per_id=args.images_per_id, num_cameras=args.cameras,
                               camera_strength=args.camera_strength, seed=args.seed, height=args.height,
                               width=args.width, count_spread=args.count_spread)
    print(json.dumps({"counts": summary["counts"], "images_per_camera": summary["images_per_camera"],
                      "seconds": round(time.perf_counter() - t0, 2)}))
    if args.preview:
        print(f"preview: {contact_sheet(args.out_dir, args.preview)}")


if __name__ == "__main__":
    main()
