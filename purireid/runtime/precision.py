"""The arithmetic precision of a forward pass: bf16 autocast on CUDA when train.amp asks for it,
float32 elsewhere (CPU runs stay in float32). The training steps, the distillation's teacher
and the feature extractor all run under `autocast_context`."""

from __future__ import annotations

import contextlib

import torch


def autocast_context(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when asked; a no-op elsewhere (CPU runs stay in fp32)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_in_effect(device: torch.device, amp: bool) -> str:
    """What `autocast_context` does on `device`, in words: "bf16 autocast" or "float32"."""
    return "bf16 autocast" if amp and device.type == "cuda" else "float32"
