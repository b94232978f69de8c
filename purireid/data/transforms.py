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


class RandomErasing(NamedTuple):
    """Random erasing's settings (docs/method.md): probability, area share range, least aspect."""

    p: float = 0.5
    area: tuple[float, float] = (0.02, 0.4)
    min_aspect: float = 0.3


def sample_augmentation(rng: np.random.Generator, n: int, height: int, width: int, *,
                        pad: int = PAD, flip_p: float = 0.5, erasing: RandomErasing = RandomErasing()) -> AugParams:
    """Draw the random parameters of n train samples (flip, crop offsets, erased rectangle)."""
    erase_p, erase_area, erase_min_aspect = erasing
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

    Same result as `augment_pil` on every sample. On an accelerator the whole batch takes a
    fixed handful of tensor ops whatever its size (`augment_batched`: every op is a launch the
    host issues). On a CPU the host does the work itself, and per-sample window copies are
    several times faster there than a batched gather (`_augment_on_cpu`).
    """
    if images.device.type == "cpu":
        return _augment_on_cpu(images, p, pad)
    return augment_batched(images, p, pad)


def _augment_on_cpu(images: torch.Tensor, p: AugParams, pad: int) -> torch.Tensor:
    """`augment_batch` on a CPU: flip + pad + crop as one window copy per sample into a black
    canvas (uint8), one batched normalisation, one rectangle write per erased sample. numpy copies
    the unflipped windows (no tensor dispatch, and its fresh zero canvas costs nothing until
    written); torch's flip kernel the flipped ones (numpy's reversed 3-byte pixels are slower)."""
    b, height, width, _ = images.shape
    out = np.zeros(tuple(images.shape), dtype=np.uint8)
    canvas, src = torch.from_numpy(out), images.numpy()
    for i in range(b):
        # Output pixel (r, c) is padded pixel (r + dy, c + dx) = source pixel (r + dy - pad, c + dx - pad).
        oy, ox = int(p.dy[i]) - pad, int(p.dx[i]) - pad
        r0, c0 = max(0, -oy), max(0, -ox)
        r1, c1 = max(r0, min(height, height - oy)), max(c0, min(width, width - ox))  # empty past the border
        if p.flip[i]:
            canvas[i, r0:r1, c0:c1] = images[i].flip(1)[r0 + oy:r1 + oy, c0 + ox:c1 + ox]
        else:
            out[i, r0:r1, c0:c1] = src[i, r0 + oy:r1 + oy, c0 + ox:c1 + ox]
    x = _normalise_nhwc(canvas)
    values, xs = np.array(ERASE_VALUE, dtype=np.float32).reshape(3, 1, 1), x.numpy()
    for i in np.flatnonzero(p.erase):
        y0, x0, h, w = int(p.ey[i]), int(p.ex[i]), int(p.eh[i]), int(p.ew[i])
        xs[i, :, y0:y0 + h, x0:x0 + w] = values
    return x


def _window_starts(p: AugParams, b: int, height: int, width: int, pad: int) -> np.ndarray:
    """Per output row (b, r): the pixel, in the flattened padded batch, where its window of
    `width` pixels starts. A flipped sample reads the mirrored window (reversed afterwards):
    output column c of the flipped, padded, cropped image is padded column Wp - 1 - c - dx."""
    hp, wp = height + 2 * pad, width + 2 * pad
    x0 = np.where(p.flip, wp - width - p.dx, p.dx)
    rows = np.arange(b)[:, None] * hp + np.arange(height)[None] + p.dy[:, None]
    return (rows * wp + x0[:, None]).reshape(-1)


def augment_batched(images: torch.Tensor, p: AugParams, pad: int = PAD) -> torch.Tensor:
    """`augment_batch` in a fixed number of tensor ops whatever the batch size (the parameters'
    index arithmetic runs on the host on [B, H] / [B, W] arrays and travels in one copy):
    pad, one row gather over an overlapping view of every pixel's window, one `where` for the
    flipped rows, the normalisation, one `where` for the erased rectangles."""
    b, height, width, _ = images.shape
    rows, cols = np.arange(height), np.arange(width)
    erase_rows = (rows >= p.ey[:, None]) & (rows < (p.ey + p.eh)[:, None])
    erase_cols = (cols >= p.ex[:, None]) & (cols < (p.ex + p.ew)[:, None])
    n = b * height
    host = np.concatenate([_window_starts(p, b, height, width, pad), np.repeat(p.flip, height),
                           erase_rows.reshape(-1), erase_cols.reshape(-1)])
    small = torch.from_numpy(host).to(images.device, non_blocking=True)
    starts, flip, small = small[:n], small[n:2 * n].bool(), small[2 * n:].bool()
    padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad)).contiguous()
    # Every pixel's window of `width` pixels, overlapping rows of one view (no copy).
    windows = padded.as_strided((padded.numel() // 3 - width + 1, width * 3), (3, 1))
    crops = windows.index_select(0, starts).view(n, width, 3)
    crops = torch.where(flip.view(n, 1, 1), crops.flip(1), crops)
    x = _normalise_nhwc(crops.view(b, height, width, 3))
    erased = small[:n].view(b, 1, height, 1) & small[n:].view(b, 1, 1, width)
    value = torch.tensor(ERASE_VALUE, dtype=x.dtype).to(x.device, non_blocking=True).view(1, 3, 1, 1)
    return torch.where(erased, value, x)


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
