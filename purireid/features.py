"""Eval-mode feature extraction: L2-normalised features of every view for the images a loader yields
(the teacher-feature HDF5 file is purireid.stages.checkpoints')."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from purireid import VIEWS
from purireid.log import progress_iter


def autocast_context(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when asked; a no-op elsewhere (CPU runs stay in fp32)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_images: int,
    device: torch.device,
    *,
    amp: bool = False,
    channels_last: bool = False,
    views: Sequence[str] = VIEWS,
    desc: str = "extract",
) -> dict[str, torch.Tensor]:
    """Eval-mode, L2-normalised features of every image the loader yields, as CPU float32.

    Rows are placed by the indices the loader yields, so row i belongs to record i.
    """
    was_training = model.training
    model.eval()
    out: dict[str, torch.Tensor] = {}
    filled = torch.zeros(num_images, dtype=torch.bool)
    try:
        total = len(loader) if hasattr(loader, "__len__") else None
        for images, indices in progress_iter(loader, total, desc, unit="batch"):
            images = images.to(device, non_blocking=True)
            if channels_last and device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp):
                feats = model(images)
            for view in views:
                f = torch.nn.functional.normalize(feats[view].float(), dim=1).cpu()
                if view not in out:
                    out[view] = torch.empty((num_images, f.shape[1]), dtype=torch.float32)
                out[view][indices] = f
            filled[indices] = True
    finally:
        model.train(was_training)
    if num_images and not bool(filled.all()):
        missing = int((~filled).sum())
        raise RuntimeError(f"feature extraction missed {missing} of {num_images} images")
    return out
