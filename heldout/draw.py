"""Drawing primitives of the held-out generator: keyed random streams, colours, and soft-edged
shapes (capsules, ellipses, row profiles) alpha-blended onto a float RGB canvas, with garment
textures and cylinder shading."""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np

__all__ = ["Canvas", "Colour", "capsule", "clip", "ellipse", "hsv", "keyed_rng", "profile", "shade", "texture"]

Colour = np.ndarray  # float32 RGB in [0, 1]


def keyed_rng(seed: int, *keys: int) -> np.random.Generator:
    """The random stream of (seed, *keys): every image, camera and track has its own."""
    return np.random.default_rng([seed & 0xFFFFFFFF, *keys])


def clip(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """np.clip without its Python overhead, which dominates on the small part-sized arrays here."""
    return np.minimum(np.maximum(x, lo), hi)


def hsv(h: float, s: float, v: float) -> Colour:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32)



class Canvas:
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


def capsule(cv: Canvas, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float):
    """Tapered capsule p0 (radius r0) -> p1 (r1): slices, soft alpha, t along, s across in [-1, 1]."""
    r = max(r0, r1) + 1
    win = cv.window(min(p0[0], p1[0]) - r, max(p0[0], p1[0]) + r, min(p0[1], p1[1]) - r, max(p0[1], p1[1]) + r)
    if win is None:
        return None
    sl, xs, ys = win
    dx, dy = float(p1[0] - p0[0]), float(p1[1] - p0[1])
    length2 = dx * dx + dy * dy + 1e-6
    t = clip(((xs - p0[0]) * dx + (ys - p0[1]) * dy) / length2, 0.0, 1.0)
    ex, ey = xs - (p0[0] + t * dx), ys - (p0[1] + t * dy)
    rad = r0 + (r1 - r0) * t
    alpha = clip(rad - np.sqrt(ex * ex + ey * ey) + 0.5, 0.0, 1.0)
    s = clip((ex * dy - ey * dx) / np.sqrt(length2) / np.maximum(rad, 0.5), -1.0, 1.0)
    return sl, alpha, t, s


def ellipse(cv: Canvas, cx: float, cy: float, rx: float, ry: float):
    """Soft ellipse: slices, alpha, normalised coordinates nx, ny."""
    win = cv.window(cx - rx - 1, cx + rx + 1, cy - ry - 1, cy + ry + 1)
    if win is None:
        return None
    sl, xs, ys = win
    nx, ny = (xs - cx) / rx, (ys - cy) / ry
    q = np.sqrt(nx * nx + ny * ny)
    return sl, clip((1.0 - q) * min(rx, ry) + 0.5, 0.0, 1.0), nx + 0 * ny, ny + 0 * nx  # full-size coordinates


def profile(cv: Canvas, y_knots: list[float], c_knots: list[float], hw_knots: list[float]):
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
    rows = clip(np.minimum(yy - y_knots[0], y_knots[-1] - yy) + 0.5, 0.0, 1.0)[:, None]
    alpha = clip(hw - np.abs(xs - c) + 0.5, 0.0, 1.0) * rows
    u = clip((xs - c) / np.maximum(hw, 0.5), -1.0, 1.0)
    v = np.broadcast_to((ys - y_knots[0]) / (y_knots[-1] - y_knots[0]), u.shape)
    return sl, alpha, u, v


def texture(g: dict[str, Any], u: np.ndarray, v: np.ndarray, front: float) -> np.ndarray:
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


def shade(colour: np.ndarray, across: np.ndarray, k: float = 0.32) -> np.ndarray:
    """Cylinder shading: darker towards the silhouette edge."""
    return colour * (1.0 - k * across * across)[..., None]
