"""Train / test transforms of docs/method.md (Hyperparameters), in two interchangeable implementations.

Train order: bicubic resize -> horizontal flip (p 0.5) -> pad 10 (black) + random crop ->
ImageNet normalisation -> random erasing (p 0.5, area 0.02-0.4, aspect in [0.3, 1/0.3]).

The random parameters of a batch are drawn once, vectorised, by `sample_augmentation` from an
explicit numpy Generator; `augment_pil` applies one sample's parameters to a PIL image and
`augment_batch` applies a whole batch's to a uint8 tensor (on any device). Given the same
parameters both give the same tensor, so the fast cached path is the PIL path, not merely
statistically like it.

Random erasing follows the released code (Zhong et al.'s RandomErasing as used by
cluster-contrast): it runs *after* normalisation and writes the constants
(0.485, 0.456, 0.406) into the normalised tensor; up to 100 attempts to fit the rectangle,
aspect ratio uniform in [r1, 1/r1], h = round(sqrt(area*aspect)), w = round(sqrt(area/aspect)).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ERASE_VALUE = IMAGENET_MEAN  # written into the normalised tensor, as the released code does
PAD = 10
ERASE_ATTEMPTS = 100


class AugParams(NamedTuple):
    """Per-sample augmentation parameters (numpy arrays of length n)."""

    flip: np.ndarray  # bool
    dy: np.ndarray  # crop offset in the padded image, 0..2*pad
    dx: np.ndarray
    erase: np.ndarray  # bool: a rectangle is erased
    ey: np.ndarray  # erased rectangle: top, left, height, width
    ex: np.ndarray
    eh: np.ndarray
    ew: np.ndarray

    def take(self, sl: slice | np.ndarray) -> AugParams:
        return AugParams(*(a[sl] for a in self))


def load_resized(source: str | Path | Image.Image, height: int, width: int) -> Image.Image:
    """Decode to RGB and bicubic-resize to (height, width) (torchvision's Resize with interpolation=3).
    `source`: an image file, or an already opened PIL image."""
    if isinstance(source, Image.Image):
        return source.convert("RGB").resize((width, height), Image.BICUBIC)
    with Image.open(source) as im:
        return im.convert("RGB").resize((width, height), Image.BICUBIC)


def sample_augmentation(rng: np.random.Generator, n: int, height: int, width: int, *,
                        pad: int = PAD, flip_p: float = 0.5, erase_p: float = 0.5,
                        erase_area: tuple[float, float] = (0.02, 0.4),
                        erase_min_aspect: float = 0.3) -> AugParams:
    """Draw the random parameters of n train samples (flip, crop offsets, erased rectangle)."""
    flip = rng.random(n) < flip_p
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    erase = rng.random(n) < erase_p
    eh = np.zeros(n, np.int64)
    ew = np.zeros(n, np.int64)
    found = ~erase
    area = height * width
    # First fitting attempt of up to 100, drawn in rounds (vectorised; same distribution).
    for _ in range(0, ERASE_ATTEMPTS, 10):
        todo = np.flatnonzero(~found)
        if todo.size == 0:
            break
        target = rng.uniform(*erase_area, (todo.size, 10)) * area
        aspect = rng.uniform(erase_min_aspect, 1.0 / erase_min_aspect, (todo.size, 10))
        h = np.round(np.sqrt(target * aspect)).astype(np.int64)
        w = np.round(np.sqrt(target / aspect)).astype(np.int64)
        ok = (w < width) & (h < height)
        first = ok.argmax(axis=1)
        hit = ok[np.arange(todo.size), first]
        eh[todo[hit]] = h[hit, first[hit]]
        ew[todo[hit]] = w[hit, first[hit]]
        found[todo[hit]] = True
    erase &= found  # no fit in 100 attempts: image left unerased, as in the released code
    ey = (rng.random(n) * (height - eh + 1)).astype(np.int64)
    ex = (rng.random(n) * (width - ew + 1)).astype(np.int64)
    return AugParams(flip, dy, dx, erase, ey * erase, ex * erase, eh * erase, ew * erase)


def to_normalised_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB PIL image or uint8 HxWx3 array -> normalised float32 [3, H, W] (test transform tail)."""
    return _normalise_nhwc(torch.from_numpy(np.array(img, dtype=np.uint8)[None]))[0]


def augment_pil(img: Image.Image, p: AugParams, i: int = 0, pad: int = PAD) -> torch.Tensor:
    """Apply sample i of `p` to an already resized RGB PIL image -> normalised [3, H, W]."""
    width, height = img.size
    if p.flip[i]:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    padded = Image.new("RGB", (width + 2 * pad, height + 2 * pad), (0, 0, 0))
    padded.paste(img, (pad, pad))
    dy, dx = int(p.dy[i]), int(p.dx[i])
    img = padded.crop((dx, dy, dx + width, dy + height))
    x = to_normalised_tensor(img)
    if p.erase[i]:
        y0, x0, h, w = int(p.ey[i]), int(p.ex[i]), int(p.eh[i]), int(p.ew[i])
        x[:, y0:y0 + h, x0:x0 + w] = torch.tensor(ERASE_VALUE).view(3, 1, 1)
    return x


def _normalise_nhwc(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float32 [B, 3, H, W] (same elementwise ops as
    `to_normalised_tensor`, so the same values).

    On a CPU, numpy's uint8 transpose and float conversion are 3-4x faster than torch's, and
    the arithmetic then runs in place on a contiguous NCHW tensor.
    """
    if images.device.type == "cpu":
        x = torch.from_numpy(np.ascontiguousarray(images.numpy().transpose(0, 3, 1, 2)).astype(np.float32))
    else:
        x = images.permute(0, 3, 1, 2).contiguous().float()
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return x.div_(255).sub_(mean).div_(std)


def augment_batch(images: torch.Tensor, p: AugParams, pad: int = PAD) -> torch.Tensor:
    """Batched train augmentation: uint8 [B, H, W, 3] (any device) -> normalised float32 [B, 3, H, W].

    Same result as `augment_pil` on every sample. Flip + pad + crop is one window copy per
    sample into a zero (black) canvas, on uint8; normalisation is one batched pass; erasing
    writes one rectangle per sample. Per-sample slicing keeps the CPU cost near memcpy
    (an index-gather over the whole batch was ~20x slower on a CPU).
    """
    b, height, width, _ = images.shape
    out = torch.zeros_like(images)
    for i in range(b):
        src = images[i].flip(1) if p.flip[i] else images[i]
        # Output pixel (r, c) is padded pixel (r + dy, c + dx) = source pixel (r + dy - pad, c + dx - pad).
        oy, ox = int(p.dy[i]) - pad, int(p.dx[i]) - pad
        r0, r1 = max(0, -oy), min(height, height - oy)
        c0, c1 = max(0, -ox), min(width, width - ox)
        out[i, r0:r1, c0:c1] = src[r0 + oy:r1 + oy, c0 + ox:c1 + ox]
    x = _normalise_nhwc(out)
    value = torch.tensor(ERASE_VALUE, dtype=x.dtype, device=x.device).view(3, 1, 1)
    for i in np.flatnonzero(p.erase):
        y0, x0, h, w = int(p.ey[i]), int(p.ex[i]), int(p.eh[i]), int(p.ew[i])
        x[i, :, y0:y0 + h, x0:x0 + w] = value
    return x


def normalise_batch(images: torch.Tensor) -> torch.Tensor:
    """Test transform tail, batched: uint8 [B, H, W, 3] -> normalised float32 [B, 3, H, W]."""
    return _normalise_nhwc(images)


class TrainTransform:
    """Stand-alone train transform (docs/method.md) on a PIL image: `t(img, rng=None) -> [3, H, W]`."""

    def __init__(self, height: int = 256, width: int = 128) -> None:
        self.height, self.width = height, width

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = rng if rng is not None else np.random.default_rng()
        img = img.convert("RGB").resize((self.width, self.height), Image.BICUBIC)
        return augment_pil(img, sample_augmentation(rng, 1, self.height, self.width))


class TestTransform:
    """Test transform (docs/method.md): bicubic resize + ImageNet normalisation."""

    def __init__(self, height: int = 256, width: int = 128) -> None:
        self.height, self.width = height, width

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_normalised_tensor(load_resized(img, self.height, self.width))
