"""The held-out generator's people: an articulated 3-D stick-and-volume body (tapered capsules for
limbs, a profiled torso, an ellipsoid head) posed by a walking phase and a heading, projected
orthographically, so the silhouette changes with gait and viewpoint. Parts are drawn far to near
with soft, anti-aliased edges and cylinder shading; face, hair and hat follow the head's 3-D
facing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from heldout.draw import Canvas, Colour, capsule, clip, ellipse, profile, shade, texture

__all__ = ["draw_person"]

Item = tuple[float, Callable[[], None]]  # (depth, draw): drawn far to near


class _Figure:
    """A posed body: its skeleton in body units (y down from the head top, x lateral, z forward)
    and the projection onto the canvas. Pose: cx, top, height (pixels), aspect (lateral scale),
    yaw (0 = facing the camera), phase (walking), bag_side (+-1), umbrella (0/1)."""

    def __init__(self, cv: Canvas, ident: dict[str, Any], pose: dict[str, float]) -> None:
        self.cv, self.ident, self.pose = cv, ident, pose
        self.H, self.Hx = pose["height"] * ident["height"], pose["height"] * ident["height"] * pose["aspect"]
        self.phase = pose["phase"]
        self.cos_y, self.sin_y = np.cos(pose["yaw"]), np.sin(pose["yaw"])
        self.g = ident["girth"]
        self.cx, self.top = pose["cx"], pose["top"] + pose["height"] * (1 - ident["height"])
        self.legs = {side: self.leg(side) for side in (-1, 1)}
        self.drop = 0.975 - max(self.legs[-1][2][1], self.legs[1][2][1])  # feet on the ground: the body bobs
        self.shx = 0.105 * ident["shoulders"] * self.g
        self.front = float(self.cos_y)

    def leg(self, side: int):
        ident = self.ident
        ph = self.phase + (0.0 if side < 0 else np.pi)
        a = 0.42 * ident["stride"] * np.sin(ph)
        bend = 0.75 * ident["stride"] * max(0.0, np.cos(ph))
        hip = np.array([side * 0.055 * ident["hips"] * self.g, 0.5, 0.0])
        knee = hip + 0.245 * np.array([0.0, np.cos(a), np.sin(a)])
        ankle = knee + 0.235 * np.array([0.0, np.cos(a - bend), np.sin(a - bend)])
        return hip, knee, ankle, ankle + np.array([0.0, 0.012, 0.055])

    def arm(self, side: int):
        ident = self.ident
        ph = self.phase + (0.0 if side < 0 else np.pi)
        c = -0.45 * ident["swing"] * ident["stride"] * np.sin(ph)
        flex = 0.2 + 0.45 * max(0.0, -np.sin(ph)) * ident["swing"]
        if self.pose["umbrella"] and side == 1:
            c, flex = 0.35, 1.9
        sh = np.array([side * self.shx, 0.19, 0.0])
        ab = 0.1
        el = sh + 0.165 * np.array([side * np.sin(ab), np.cos(ab) * np.cos(c), np.cos(ab) * np.sin(c)])
        wr = el + 0.15 * np.array([side * 0.05, np.cos(c + flex), np.sin(c + flex)])
        return sh, el, wr

    def proj(self, p: np.ndarray) -> np.ndarray:
        return np.array([self.cx + self.Hx * (p[0] * self.cos_y - p[2] * self.sin_y),
                         self.top + self.H * (p[1] + self.drop)], np.float32)

    def depth(self, p: np.ndarray) -> float:
        return float(p[0] * self.sin_y + p[2] * self.cos_y)

    def limb(self, points, radii, cover: float, garment, bare) -> Callable[[], None]:
        """A chain of capsules; the garment covers the first `cover` fraction of its length."""
        cv, H, proj = self.cv, self.H, self.proj

        def draw() -> None:
            n = len(points) - 1
            for i in range(n):
                shape = capsule(cv, proj(points[i]), proj(points[i + 1]), radii[i] * H, radii[i + 1] * H)
                if shape is None:
                    continue
                sl, alpha, t, s = shape
                pos = (i + t) / n
                colour = bare
                if garment is not None and cover > 0:
                    clothed = (pos < cover)[..., None]
                    colour = np.where(clothed, texture(garment, s, pos, -1.0), colour)  # no chest print on limbs
                cv.blend(sl, alpha, shade(colour, s))
        return draw


def _leg_items(f: _Figure) -> list[Item]:
    ident, g = f.ident, f.g
    leg_bare = ident["tights"] if ident["tights"] is not None else ident["skin"]
    leg_cover = {"trousers": 1.0, "shorts": 0.42}.get(ident["lower"], 0.0)
    items: list[Item] = []
    for side, (hip, knee, ankle, toe) in f.legs.items():
        items.append((-10 + f.depth(knee), f.limb([hip, knee, ankle], [0.05 * g, 0.04 * g, 0.03 * g],
                                                   leg_cover, ident["bottom"], leg_bare)))
        items.append((-9.9 + f.depth(knee), _shoe(f.cv, f.proj, ankle, toe, f.H, ident["shoes"])))
    if ident["lower"] in ("skirt", "dress"):
        def skirt() -> None:
            y0, y1 = 0.47 + f.drop, ident["hem"] + f.drop
            hw0 = np.hypot(0.09 * ident["hips"] * g * f.cos_y, 0.07 * g * f.sin_y)
            hw1 = hw0 * 1.35 + 0.03
            shape = profile(f.cv, [f.top + f.H * y0, f.top + f.H * y1], [f.cx, f.cx], [f.Hx * hw0, f.Hx * hw1])
            if shape is not None:
                sl, alpha, u, v = shape
                f.cv.blend(sl, alpha, shade(texture(ident["bottom"], u, v, f.front), u, 0.25))
        items.append((-5.0, skirt))
    return items


def _torso(f: _Figure) -> None:
    ident, g, cos_y, sin_y, Hx = f.ident, f.g, f.cos_y, f.sin_y, f.Hx
    jacket = ident["jacket"]
    ys = [0.16, 0.2, 0.34, 0.45, 0.53]
    ws = [0.06, 0.11 * ident["shoulders"], 0.095, 0.085, 0.092 * ident["hips"]]
    ds = [0.05, 0.07, 0.075, 0.065, 0.07]
    hws = [Hx * np.hypot(w * g * cos_y, d * g * sin_y) for w, d in zip(ws, ds)]
    lean = 0.04 * ident["stride"]
    centres = [f.cx - Hx * (0.53 - y) * lean * sin_y for y in ys]
    shape = profile(f.cv, [f.top + f.H * (y + f.drop) for y in ys], centres, hws)
    if shape is None:
        return
    sl, alpha, u, v = shape
    colour = texture(jacket or ident["top"], u, v, f.front)
    if jacket is not None and ident["jacket_open"] and f.front > 0.2:
        inner = np.abs(u + 0.25 * sin_y) < 0.28 * f.front
        colour = np.where(inner[..., None], texture(ident["top"], u, v, f.front), colour)
    if ident["scarf"] is not None:
        colour = np.where((v < 0.12)[..., None], ident["scarf"], colour)
    f.cv.blend(sl, alpha, shade(colour, u, 0.28))


def _arm_items(f: _Figure) -> list[Item]:
    ident, g, cv, proj = f.ident, f.g, f.cv, f.proj
    jacket = ident["jacket"]
    sleeve = 1.0 if jacket is not None else ident["sleeve"]
    items: list[Item] = []
    for side in (-1, 1):
        sh, el, wr = f.arm(side)
        d = f.depth(el)
        items.append((d, f.limb([sh, el, wr], [0.034 * g, 0.028 * g, 0.023 * g], sleeve * 0.999,
                                jacket or ident["top"], ident["skin"])))
        hand = wr + (wr - el) * 0.18
        items.append((d + 1e-3, _blob(cv, proj(hand), 0.022 * f.H, ident["skin"])))
        if ident["bag"] == "handbag" and side == f.pose["bag_side"]:
            items.append((d + 2e-3, _blob(cv, proj(hand + np.array([0, 0.07, 0])), 0.05 * f.H, ident["bag_rgb"],
                                          0.75)))
    return items


def _bag_items(f: _Figure) -> list[Item]:
    ident, g, cv, proj, H = f.ident, f.g, f.cv, f.proj, f.H
    items: list[Item] = []
    if ident["bag"] == "backpack":
        bp = np.array([0.0, 0.33, -0.075 * g - 0.045])

        def backpack() -> None:
            hw = f.Hx * np.hypot(0.085 * f.cos_y, 0.045 * f.sin_y)
            c = proj(bp)
            shape = profile(cv, [c[1] - 0.11 * H, c[1] + 0.1 * H], [c[0], c[0]], [hw, hw * 1.05])
            if shape is not None:
                sl, alpha, u, v = shape
                cv.blend(sl, alpha, shade(ident["bag_rgb"], u))
        items.append((f.depth(bp), backpack))
        if f.front > 0.3:  # straps over the shoulders, seen from the front
            for side in (-1, 1):
                p0, p1 = np.array([side * 0.06 * g, 0.19, 0.08 * g]), np.array([side * 0.075 * g, 0.4, 0.08 * g])
                items.append((0.5, _strap(cv, proj(p0), proj(p1), 0.012 * H, ident["bag_rgb"])))
    elif ident["bag"] == "shoulder":
        side = f.pose["bag_side"]
        bag = np.array([side * (0.1 * ident["hips"] * g + 0.035), 0.5, 0.0])
        items.append((f.depth(bag), _blob(cv, proj(bag), 0.055 * H, ident["bag_rgb"], 0.8)))
        items.append((0.5 if f.front > -0.3 else -0.5, _strap(cv, proj(np.array([-side * f.shx * 0.8, 0.19, 0.0])),
                                                              proj(bag), 0.011 * H, ident["bag_rgb"])))
    return items


def _head_items(f: _Figure) -> list[Item]:
    ident, cv, proj, H, Hx, cos_y, sin_y = f.ident, f.cv, f.proj, f.H, f.Hx, f.cos_y, f.sin_y
    items: list[Item] = [(5.0, lambda: _head(cv, ident, proj, H, Hx, cos_y, sin_y, behind=False))]
    if ident["hairstyle"] == "long":
        items.append((-20.0 if f.front > -0.2 else 5.5,
                      lambda: _head(cv, ident, proj, H, Hx, cos_y, sin_y, behind=True)))
    if f.pose["umbrella"]:
        wr = f.arm(1)[2]
        items.append((10.0, lambda: _umbrella(cv, proj, wr, H, Hx, ident["umbrella_rgb"])))
    return items


def draw_person(cv: Canvas, ident: dict[str, Any], pose: dict[str, float]) -> None:
    """Draw identity `ident` in `pose` (see `_Figure`) onto `cv`, its parts far to near."""
    f = _Figure(cv, ident, pose)
    items = _leg_items(f) + [(0.0, lambda: _torso(f))] + _arm_items(f) + _bag_items(f) + _head_items(f)
    for _, draw in sorted(items, key=lambda item: item[0]):
        draw()


def _shoe(cv: Canvas, proj, ankle: np.ndarray, toe: np.ndarray, H: float, colour: Colour) -> Callable[[], None]:
    def draw() -> None:
        shape = capsule(cv, proj(ankle), proj(toe), 0.027 * H, 0.022 * H)
        if shape is not None:
            sl, alpha, _, s = shape
            cv.blend(sl, alpha, shade(colour, s, 0.2))
    return draw


def _blob(cv: Canvas, centre: np.ndarray, r: float, colour: Colour, squash: float = 1.0) -> Callable[[], None]:
    def draw() -> None:
        shape = ellipse(cv, float(centre[0]), float(centre[1]), r * squash, r)
        if shape is not None:
            sl, alpha, nx, ny = shape
            cv.blend(sl, alpha, shade(colour, nx, 0.3))
    return draw


def _strap(cv: Canvas, p0: np.ndarray, p1: np.ndarray, r: float, colour: Colour) -> Callable[[], None]:
    def draw() -> None:
        shape = capsule(cv, p0, p1, max(r, 0.5), max(r, 0.5))
        if shape is not None:
            cv.blend(shape[0], shape[1], colour * np.float32(0.85))
    return draw


def _head(cv: Canvas, ident: dict[str, Any], proj, H: float, Hx: float, cos_y: float, sin_y: float,
          behind: bool) -> None:
    """Neck, head and hair (face and hair from the head's 3-D facing), hat; or, `behind`, long hair."""
    centre = proj(np.array([0.0, 0.066, 0.01]))
    rx, ry = 0.052 * ident["head"] * Hx, 0.066 * ident["head"] * H
    hair = ident["hair"]
    if behind:  # long hair hanging behind the head and neck
        back = proj(np.array([0.0, 0.17, -0.04]))
        shape = capsule(cv, centre, back + np.array([Hx * 0.04 * sin_y, 0.05 * H], np.float32), rx * 1.05, rx * 0.95)
        if shape is not None:
            cv.blend(shape[0], shape[1], shade(hair, shape[3], 0.3))
        return
    neck = capsule(cv, centre, proj(np.array([0.0, 0.17, 0.0])), 0.024 * H, 0.028 * H)
    if neck is not None:
        cv.blend(neck[0], neck[1], ident["skin"] * np.float32(0.85))
    if ident["hairstyle"] == "curly":  # volume around the head
        shape = ellipse(cv, centre[0], centre[1] - 0.1 * ry, rx * 1.22, ry * 1.12)
        if shape is not None:
            cv.blend(shape[0], shape[1] * (shape[3] < 0.5), hair)
    shape = ellipse(cv, centre[0], centre[1], rx, ry)
    if shape is None:
        return
    sl, alpha, nx, ny = shape
    nz = np.sqrt(clip(1.0 - nx * nx - ny * ny, 0.0, 1.0))
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
        hat = ellipse(cv, centre[0], centre[1] - 0.05 * ry, rx * 1.08, ry * 1.02)
        if hat is not None:
            cut = -0.25 if ident["hat"] == "cap" else -0.05
            cv.blend(hat[0], hat[1] * (hat[3] < cut), shade(ident["hat_rgb"], hat[2], 0.25))
        if ident["hat"] == "cap":
            brim = proj(np.array([0.0, 0.066 - 0.066 * 0.3, 0.05]))
            _strap(cv, centre + np.array([0, -0.3 * ry], np.float32), brim, 0.012 * H, ident["hat_rgb"])()


def _umbrella(cv: Canvas, proj, hand: np.ndarray, H: float, Hx: float, colour: Colour) -> None:
    tip = proj(hand + np.array([0.0, -0.42, 0.0]))
    _strap(cv, proj(hand), tip, 0.008 * H, np.array([0.2, 0.2, 0.2], np.float32))()
    shape = ellipse(cv, tip[0], tip[1] + 0.07 * H, 0.3 * Hx, 0.11 * H)
    if shape is not None:
        sl, alpha, nx, ny = shape
        panels = 0.9 + 0.1 * np.cos(nx * 9.0)
        cv.blend(sl, alpha * (ny < 0.3), colour * panels[..., None])
