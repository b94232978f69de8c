"""The held-out generator's cameras: each has its own scene, a walking direction (so a viewpoint
mix), person scale and aspect, and a colour response (3x3 colour mixing, white balance, exposure,
gamma, contrast, flare, an illumination gradient with vignetting), plus resolution, blur, motion
blur, noise and JPEG quality. `strength` scales the colour response, illumination and scene
colours away from a neutral camera. `render` composes one crop: scene window, person, occluder,
then the camera's optics and processing."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from heldout.body import draw_person
from heldout.draw import Canvas, hsv, keyed_rng
from heldout.identity import clothing_hsv, identity
from heldout.scene import SCENES, scene_canvas

__all__ = ["describe_camera", "make_camera", "render"]


def make_camera(seed: int, index: int, h: int, w: int, strength: float) -> dict[str, Any]:
    """Camera `index`; its draws do not depend on `strength`, which only scales them."""
    rng = keyed_rng(seed, 0, index)
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
        "scene": kind, "canvas": scene_canvas(rng, kind, hc, wc, h, s), "illumination": illum.astype(np.float32),
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
        "noise_bank": keyed_rng(seed, 6, index).standard_normal((2 * h, 2 * w, 4), dtype=np.float32),
    }
    return cam


def describe_camera(cam: dict[str, Any]) -> dict[str, Any]:
    keys = ("scene", "exposure", "gamma", "contrast", "scale", "resolution", "blur", "motion_blur",
            "noise", "quality", "occlusion", "sequences")
    return {k: (round(cam[k], 4) if isinstance(cam[k], float) else cam[k]) for k in keys}


def _occluder(cv: Canvas, rng: np.random.Generator, pose: dict[str, float]) -> None:
    h, w = cv.h, cv.w
    kind = rng.choice(["passerby", "car", "pole", "bush", "sign"], p=[0.35, 0.2, 0.2, 0.15, 0.1])
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    if kind == "passerby":
        other = dict(pose, cx=w / 2 + rng.choice([-1, 1]) * rng.uniform(0.45, 0.8) * w,
                     height=pose["height"] * rng.uniform(1.0, 1.25), yaw=rng.uniform(0, 2 * np.pi),
                     phase=rng.uniform(0, 2 * np.pi), umbrella=0.0, bag_side=1.0)
        other["top"] = h - other["height"] * rng.uniform(0.9, 1.0)
        draw_person(cv, identity(rng, None), other)
    elif kind == "car":
        y0 = h * rng.uniform(0.6, 0.85)
        x0, x1 = sorted(rng.uniform(-0.5, 1.5, 2) * w)
        body = hsv(*clothing_hsv(rng, "top"))
        sl = (slice(int(y0), h), slice(max(int(x0), 0), max(min(int(x1) + 1, w), 0)))
        shade = (0.8 + 0.3 * np.exp(-(ys[sl[0]] - y0) / (0.05 * h)))[..., None]
        cv.img[sl] = body * shade
    elif kind in ("pole", "sign"):
        px, pr = rng.uniform(0.05, 0.95) * w, rng.uniform(0.025, 0.07) * w
        d = (xs - px) / pr
        pole = np.broadcast_to(np.abs(d) < 1, (h, w))
        grey = hsv(0, 0, rng.uniform(0.3, 0.7))
        cv.img[pole] = (grey * np.broadcast_to(1 - 0.4 * d * d, (h, w))[pole][:, None])
        if kind == "sign":
            sy, sw = rng.uniform(0.1, 0.4) * h, rng.uniform(0.2, 0.4) * w
            panel = (np.abs(xs - px) < sw) & (np.abs(ys - sy) < 0.08 * h)
            cv.img[np.broadcast_to(panel, (h, w))] = hsv(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.5, 0.9))
    else:
        for _ in range(int(rng.integers(5, 12))):
            bx, by = rng.uniform(-0.1, 1.1) * w, h * rng.uniform(0.75, 1.05)
            r = rng.uniform(0.12, 0.3) * w
            blob = ((xs - bx) ** 2 + (ys - by) ** 2) < r * r
            cv.img[blob] = hsv(rng.uniform(0.2, 0.38), rng.uniform(0.4, 0.8), rng.uniform(0.15, 0.55))

def render(rng: np.random.Generator, ident: dict[str, Any] | None, cam: dict[str, Any], track: dict[str, float],
            k: int, h: int, w: int, junk: str | None = None) -> bytes:
    """One crop: background window, person, occluder, then the camera's optics and processing."""
    hc, wc = cam["canvas"].shape[:2]
    ox = int(np.clip(track["x0"] + k * track["dx"] + rng.normal(0, 2), 0, wc - w))
    oy = int(np.clip(track["y0"] + rng.normal(0, 1.5), 0, hc - h))
    cv = Canvas(cam["canvas"][oy:oy + h, ox:ox + w].copy())
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
        draw_person(cv, ident, pose)
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
