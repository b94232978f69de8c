"""The held-out generator's scenes: each camera's background (street facade, park, indoor hall,
plaza), rendered once as a reflectance canvas and cropped per image; colours are pulled to grey
as the camera strength goes to 0."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from heldout.draw import Colour, hsv

__all__ = ["SCENES", "scene_canvas"]

SCENES = ("street", "park", "indoor", "plaza")


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


@dataclass
class _Frame:
    """A scene canvas being painted: its size, pixel centres, horizon and vanishing point."""

    h: int  # the crop height: the scale of scene details
    hc: int
    wc: int
    ys: np.ndarray
    xs: np.ndarray
    horizon: float
    x_v: float
    upper: np.ndarray
    ground: np.ndarray
    amp: float
    col: Callable[[float, float, float], Colour]


def _street(rng: np.random.Generator, fr: _Frame, img: np.ndarray) -> np.ndarray:
    col, h, hc, wc, ys, xs, horizon = fr.col, fr.h, fr.hc, fr.wc, fr.ys, fr.xs, fr.horizon
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
    shop = (ys >= horizon - band) & fr.upper
    sign = col(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.8))
    img = np.where(np.broadcast_to(shop, (hc, wc))[..., None], sign, img)
    lines, _ = _perspective_grid(ys, xs, horizon, fr.x_v, rng.uniform(0.3, 0.7), 0.06)
    pave = col(rng.uniform(0.05, 0.15), rng.uniform(0.0, 0.25), rng.uniform(0.45, 0.8))
    img[fr.ground] = pave
    img[fr.ground & lines] = pave * np.float32(1 - 0.3 * fr.amp)
    return img


def _park(rng: np.random.Generator, fr: _Frame, img: np.ndarray) -> np.ndarray:
    col, h, hc, wc, ys, xs, horizon = fr.col, fr.h, fr.hc, fr.wc, fr.ys, fr.xs, fr.horizon
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
    img[fr.ground] = grass
    # A path receding to the vanishing point: constant width on the ground plane.
    path = fr.ground & (np.abs((xs - fr.x_v) / np.maximum(ys - horizon + 4.0, 1.0)) < rng.uniform(0.4, 1.0))
    img[path] = col(rng.uniform(0.08, 0.12), rng.uniform(0.1, 0.35), rng.uniform(0.5, 0.8))
    return img


def _indoor(rng: np.random.Generator, fr: _Frame, img: np.ndarray) -> np.ndarray:
    col, h, wc, ys, xs, horizon, amp = fr.col, fr.h, fr.wc, fr.ys, fr.xs, fr.horizon, fr.amp
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
    lines, parity = _perspective_grid(ys, xs, horizon, fr.x_v, rng.uniform(0.2, 0.5), 0.03)
    a = col(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.4, 0.85))
    b = a * np.float32(1 - 0.25 * amp * rng.uniform(0.3, 1.0))
    sheen = 1.0 + 0.25 * amp * np.exp(-(ys - horizon) / (0.1 * h))  # reflection near the wall
    floor = np.where(parity[..., None] > 0, a, b) * sheen[..., None]
    return np.where(fr.ground[..., None], floor, img)


def _plaza(rng: np.random.Generator, fr: _Frame, img: np.ndarray) -> np.ndarray:
    col, h, hc, wc, ys, xs, horizon = fr.col, fr.h, fr.hc, fr.wc, fr.ys, fr.xs, fr.horizon
    sky_line = horizon * rng.uniform(0.25, 0.6)
    img[:] = col(0.6, rng.uniform(0.05, 0.35), rng.uniform(0.7, 0.95))
    x = 0.0
    while x < wc:  # distant buildings
        bw = rng.uniform(0.2, 0.6) * h
        top_y = sky_line * rng.uniform(0.1, 1.0)
        rect = (xs >= x) & (xs < x + bw) & (ys >= top_y) & fr.upper
        img[rect] = col(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.75))
        x += bw
    lines, parity = _perspective_grid(ys, xs, horizon, fr.x_v, rng.uniform(0.6, 1.2), 0.04)
    stone = col(rng.uniform(0.05, 0.15), rng.uniform(0.0, 0.2), rng.uniform(0.5, 0.85))
    img[fr.ground] = stone
    img[fr.ground & lines] = stone * np.float32(1 - 0.25 * fr.amp)
    for _ in range(int(rng.integers(0, 3))):  # columns
        px, pw = rng.uniform(0, wc), rng.uniform(0.05, 0.12) * h
        d = (xs - px) / pw
        pillar = np.broadcast_to((np.abs(d) < 1) & (ys < horizon + 0.04 * h), (hc, wc))
        shade = np.broadcast_to(1 - 0.4 * d * d, (hc, wc))
        stone = col(rng.uniform(0.05, 0.12), rng.uniform(0.0, 0.2), rng.uniform(0.55, 0.9))
        img[pillar] = stone * shade[pillar][:, None]
    return img


_PAINTERS = {"street": _street, "park": _park, "indoor": _indoor, "plaza": _plaza}


def scene_canvas(rng: np.random.Generator, kind: str, hc: int, wc: int, h: int, strength: float) -> np.ndarray:
    """One camera's background canvas (reflectance); colours pulled to grey as strength -> 0."""
    def col(hh: float, s: float, v: float) -> Colour:
        return hsv(hh, s * strength, 0.5 + (v - 0.5) * (0.5 + 0.5 * strength))

    amp = 0.4 + 0.6 * strength
    ys = np.arange(hc, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(wc, dtype=np.float32)[None, :] + 0.5
    horizon = hc * rng.uniform(0.38, 0.68)
    img = np.zeros((hc, wc, 3), np.float32)
    upper, ground = ys < horizon, np.broadcast_to(ys >= horizon, (hc, wc))
    x_v = wc * rng.uniform(0.2, 0.8)
    frame = _Frame(h, hc, wc, ys, xs, horizon, x_v, upper, ground, amp, col)
    img = _PAINTERS.get(kind, _plaza)(rng, frame, img)
    img *= (1.0 + 0.08 * amp * _smooth_noise(rng, hc, wc, 12))[..., None]
    img += (0.015 * amp * rng.standard_normal((hc, wc, 1))).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)
