"""The per-sample train augmentation that the batched one replaced (one window copy and one
erased rectangle per sample, torch ops): the reference its outputs must equal bit for bit, and
the baseline of benchmarks/bench_loader.py."""

from __future__ import annotations

import numpy as np
import torch

from purireid.data.transforms import ERASE_VALUE, AugParams, normalise_batch


def per_sample_augment(images: torch.Tensor, p: AugParams, pad: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float32 [B, 3, H, W], sample by sample."""
    b, height, width, _ = images.shape
    out = torch.zeros_like(images)
    for i in range(b):
        src = images[i].flip(1) if p.flip[i] else images[i]
        # Output pixel (r, c) is padded pixel (r + dy, c + dx) = source pixel (r + dy - pad, c + dx - pad).
        oy, ox = int(p.dy[i]) - pad, int(p.dx[i]) - pad
        r0, r1 = max(0, -oy), min(height, height - oy)
        c0, c1 = max(0, -ox), min(width, width - ox)
        out[i, r0:r1, c0:c1] = src[r0 + oy:r1 + oy, c0 + ox:c1 + ox]
    x = normalise_batch(out)
    value = torch.tensor(ERASE_VALUE, dtype=x.dtype, device=x.device).view(3, 1, 1)
    for i in np.flatnonzero(p.erase):
        y0, x0, h, w = int(p.ey[i]), int(p.ex[i]), int(p.eh[i]), int(p.ew[i])
        x[i, :, y0:y0 + h, x0:x0 + w] = value
    return x
