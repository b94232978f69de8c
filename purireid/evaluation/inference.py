"""Inference: eval-mode, L2-normalised features of images; the one extractor (`feature_batches`,
gathered by `extract_features`) behind the training loop and the stages (`extract_records`,
sharded over the processes of a DDP run) and behind `purireid extract` / the API
(purireid.serving.api.FeatureExtractor over `image_batches`); query/gallery evaluation of a
model; and where the decoded-image cache lives.

Every image goes through the test transform's two functions, purireid.data.transforms's
`load_resized` (decode, RGB, bicubic resize) and `normalise_batch` (ImageNet normalisation of a
uint8 batch): the test loader's cache rows and `image_batches` call them, so the stages and the
API see the same tensors."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from purireid import VIEWS
from purireid.data import Record, build_test_loader
from purireid.data.transforms import load_resized, normalise_batch
from purireid.evaluation.metrics import evaluate_features
from purireid.log import progress_iter
from purireid.runtime.distributed import DistContext
from purireid.runtime.precision import autocast_context


@torch.no_grad()
def feature_batches(
    model: torch.nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    amp: bool = False,
    channels_last: bool = False,
    views: Sequence[str] = VIEWS,
    desc: str = "extract",
    progress: bool = True,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Per batch of the loader's (images, indices): ({view: CPU float32 [b, D] L2-normalised
    eval-mode features}, indices). `channels_last`: feed the network channels_last (wherever it
    runs); `amp`: bf16 autocast on CUDA. The model's train/eval mode is restored at the end."""
    was_training = model.training
    model.eval()
    try:
        total = len(loader) if hasattr(loader, "__len__") else None
        for images, indices in progress_iter(loader, total, desc, unit="batch", enabled=progress):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp):
                feats = model(images)
            yield {v: torch.nn.functional.normalize(feats[v].float(), dim=1).cpu() for v in views}, indices
    finally:
        model.train(was_training)


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
    """Eval-mode, L2-normalised features of every image the loader yields, as CPU float32
    (`feature_batches`; channels_last only on CUDA, as training runs).

    Rows are placed by the indices the loader yields, so row i belongs to record i.
    """
    out: dict[str, torch.Tensor] = {}
    filled = torch.zeros(num_images, dtype=torch.bool)
    for feats, indices in feature_batches(model, loader, device, amp=amp,
                                          channels_last=channels_last and device.type == "cuda", views=views,
                                          desc=desc):
        for view, f in feats.items():
            if view not in out:
                out[view] = torch.empty((num_images, f.shape[1]), dtype=torch.float32)
            out[view][indices] = f
        filled[indices] = True
    if num_images and not bool(filled.all()):
        missing = int((~filled).sum())
        raise RuntimeError(f"feature extraction missed {missing} of {num_images} images")
    return out


class UnreadableImage(ValueError):
    """An image that cannot be decoded: `name` (its path, or "<image i>") and `reason`."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"cannot read image {name} ({reason})")
        self.name, self.reason = name, reason


def image_batches(images: Sequence[Any], height: int, width: int, batch_size: int, *, workers: int = 2,
                  on_unreadable: Callable[[str, str], None] | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(normalised float32 [b, 3, height, width], indices int64 [b]) over `images` (file paths
    or PIL images) in order, with the test transform (`load_resized`, `normalise_batch`); a
    thread pool of `workers` decodes one batch ahead of the caller. An unreadable image raises
    `UnreadableImage`, or, with `on_unreadable(name, reason)`, is reported there and left out."""
    def decode(item: Any) -> np.ndarray:
        return np.asarray(load_resized(item, height, width), dtype=np.uint8)

    def name(i: int) -> str:
        return str(images[i]) if isinstance(images[i], (str, Path)) else f"<image {i}>"

    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        def submit(start: int) -> tuple[range, list[Future]]:
            rows = range(start, min(len(images), start + batch_size))
            return rows, [pool.submit(decode, images[i]) for i in rows]

        pending: deque = deque(submit(s) for s in range(0, min(len(images), 2 * batch_size), batch_size))
        next_start = 2 * batch_size
        while pending:
            rows, futures = pending.popleft()
            if next_start < len(images):
                pending.append(submit(next_start))
                next_start += batch_size
            kept, arrays = [], []
            for i, future in zip(rows, futures):
                try:
                    arrays.append(future.result())
                    kept.append(i)
                except Exception as exc:  # noqa: BLE001 - any decoder failure is the image's
                    if on_unreadable is None:
                        raise UnreadableImage(name(i), f"{type(exc).__name__}: {exc}") from None
                    on_unreadable(name(i), f"{type(exc).__name__}: {exc}")
            if kept:
                yield normalise_batch(torch.from_numpy(np.stack(arrays))), torch.tensor(kept, dtype=torch.int64)


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
