"""Inference: eval-mode, L2-normalised features of images (the one extractor behind the
training loop, the stages, the CLI and the API), sharded over the processes of a DDP run;
query/gallery evaluation of a model; and where the decoded-image cache lives."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from purireid import VIEWS
from purireid.data import Record, build_test_loader
from purireid.log import progress_iter
from purireid.runtime.distributed import DistContext
from purireid.evaluation.metrics import evaluate_features


def autocast_context(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when asked; a no-op elsewhere (CPU runs stay in fp32)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_in_effect(device: torch.device, amp: bool) -> str:
    """What `autocast_context` does on `device`, in words: "bf16 autocast" or "float32"."""
    return "bf16 autocast" if amp and device.type == "cuda" else "float32"


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



def cache_dir_for(manifest: str | Path) -> Path:
    """Decoded-image caches live beside the manifest (results/<dataset>/data/cache)."""
    return Path(manifest).parent / "cache"


def extract_records(model: torch.nn.Module, records: Sequence[Record], config: Mapping[str, Any],
                    ctx: DistContext, desc: str, cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Eval-mode features {view: float32 [N, D]} of `records`, in record order; under DDP each
    rank extracts a contiguous shard with rank 0's weights and BatchNorm statistics.

    Reads config keys data_root, data.{height, width, test_batch_size, workers, use_cache},
    train.{amp, channels_last}.
    """
    ctx.broadcast_buffers(model)  # every rank uses rank 0's BN running statistics
    shard = ctx.shard(len(records))
    local = list(records[shard.start:shard.stop])
    data = config["data"]
    loader = build_test_loader(local, config["data_root"], height=data["height"], width=data["width"],
                               batch_size=data["test_batch_size"], workers=data["workers"],
                               use_cache=data["use_cache"] and cache_dir is not None, cache_dir=cache_dir,
                               pin_memory=ctx.device.type == "cuda")
    features = extract_features(model, loader, len(local), ctx.device, amp=config["train"]["amp"],
                                channels_last=config["train"]["channels_last"], desc=desc)
    return {v: ctx.all_gather_cat(f.to(ctx.device)).cpu() for v, f in features.items()}


def evaluate_model(model: torch.nn.Module, splits: Mapping[str, Sequence[Record]], config: Mapping[str, Any],
                   ctx: DistContext, *, rerank: bool, max_rank: int, topk: int = 0,
                   cache_dir: Path | None = None) -> dict:
    """mAP / CMC (ranks 1..max_rank) of the global view on query vs gallery (docs/method.md), plus the
    `topk` best gallery indices per query when topk > 0 (see purireid.evaluation.metrics)."""
    query = extract_records(model, splits["query"], config, ctx, "query", cache_dir)["global"]
    gallery = extract_records(model, splits["gallery"], config, ctx, "gallery", cache_dir)["global"]

    def pids_cams(records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray]:
        return np.array([r.pid for r in records]), np.array([r.camid for r in records])

    (query_pids, query_cams), (gallery_pids, gallery_cams) = pids_cams(splits["query"]), pids_cams(splits["gallery"])
    return evaluate_features(query, gallery, query_pids, gallery_pids, query_cams, gallery_cams,
                             max_rank=max_rank, rerank=rerank, topk=topk)
