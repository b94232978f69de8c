"""The training loop shared by the teacher and the student (SPEC §3–§6).

Per epoch: eval-mode features of the train set -> pseudo labels (three views, fused,
DBSCAN) -> one memory per view from the cluster centres -> `iters` steps with the
camera-aware sampler. The student adds an epoch -1 driven by the teacher's features
(frozen memories, more iterations) and the online distillation term.

Resume: after every epoch the whole state is saved atomically in `state_dir`; a restarted
run continues after the last completed epoch. Every epoch reseeds from (seed, epoch), so a
resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from purireid import VIEWS
from purireid.cluster import cluster_centres, pseudo_labels
from purireid.data import Record, TrainLoader, build_test_loader, read_manifest
from purireid.distributed import DistContext
from purireid.evaluation import evaluate_features
from purireid.features import autocast_context, extract_features, image_list_digest
from purireid.log import get_logger
from purireid.losses import ClusterMemory, distillation_loss, purification_loss
from purireid.models import build_model
from purireid.stages.common import (
    GracefulTermination,
    TerminationRequested,
    clear_state,
    cluster_purity,
    config_fingerprint,
    load_state,
    plot_training_curve,
    save_model_checkpoint,
    save_state,
    seed_everything,
    write_jsonl,
    write_resolved_config,
)

log = get_logger("train")


class DegenerateClustering(RuntimeError):
    """DBSCAN produced too few clusters to fill a training batch."""


@dataclass
class TeacherGuidance:
    """What the student gets from the teacher: its model (online distillation) and its features."""

    model: torch.nn.Module
    features: Mapping[str, torch.Tensor]
    checkpoint_sha256: str


def per_process_bn_groups(bn_groups: int, world_size: int) -> int:
    """BN groups inside one process: the global `bn_groups` shared among the processes."""
    return max(1, bn_groups // world_size)


def cache_dir_for(manifest: str | Path) -> Path:
    """Decoded-image caches live beside the manifest (results/<dataset>/data/cache)."""
    return Path(manifest).parent / "cache"


def extract_records(model: torch.nn.Module, records: Sequence[Record], config: Mapping[str, Any],
                    ctx: DistContext, desc: str, cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Eval-mode features of `records`; under DDP each rank extracts a contiguous shard."""
    ctx.broadcast_buffers(model)  # every rank uses rank 0's BN running statistics
    shard = ctx.shard(len(records))
    local = list(records[shard.start:shard.stop])
    data = config["data"]
    loader = build_test_loader(local, config["data_root"], height=data["height"], width=data["width"],
                               batch_size=data["test_batch_size"], workers=data["workers"],
                               use_cache=data["use_cache"] and cache_dir is not None, cache_dir=cache_dir,
                               pin_memory=ctx.device.type == "cuda")
    feats = extract_features(model, loader, len(local), ctx.device, amp=config["train"]["amp"],
                             channels_last=config["train"]["channels_last"], desc=desc)
    return {v: ctx.all_gather_cat(f.to(ctx.device)).cpu() for v, f in feats.items()}


def evaluate_model(model: torch.nn.Module, splits: Mapping[str, Sequence[Record]], config: Mapping[str, Any],
                   ctx: DistContext, topk: int = 0, cache_dir: Path | None = None) -> dict:
    """mAP / CMC of the global view on query vs gallery."""
    query = extract_records(model, splits["query"], config, ctx, "query", cache_dir)["global"]
    gallery = extract_records(model, splits["gallery"], config, ctx, "gallery", cache_dir)["global"]
    q_pids = np.array([r.pid for r in splits["query"]])
    g_pids = np.array([r.pid for r in splits["gallery"]])
    q_cams = np.array([r.camid for r in splits["query"]])
    g_cams = np.array([r.camid for r in splits["gallery"]])
    ev = config["evaluate"]
    return evaluate_features(query, gallery, q_pids, g_pids, q_cams, g_cams, max_rank=ev["max_rank"],
                             rerank=ev["rerank"], topk=topk)


def check_clusters(labels: np.ndarray, config: Mapping[str, Any], epoch: int) -> int:
    """Number of clusters; a clear error when they cannot fill a batch."""
    num_clusters = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    train = config["train"]
    needed = train["batch_size"] // train["num_instances"]
    eps = config["cluster"]["eps"]
    outliers = int((labels < 0).sum())
    if num_clusters >= needed:
        return num_clusters
    if num_clusters == 0 or outliers > labels.size / 2:
        advice = (f"most images are outliers: raise config key 'cluster.eps' (now {eps}, try {eps + 0.1:.2f}) "
                  "or lower 'cluster.min_samples'")
    else:
        advice = (f"clusters merged: lower config key 'cluster.eps' (now {eps}, try {max(eps - 0.1, 0.05):.2f})")
    raise DegenerateClustering(
        f"epoch {epoch}: DBSCAN found {num_clusters} clusters ({outliers} of {labels.size} images outliers), "
        f"but a batch of train.batch_size={train['batch_size']} with train.num_instances={train['num_instances']} "
        f"needs {needed} pseudo-identities; {advice}, or lower train.batch_size / raise train.num_instances"
    )


def train(
    config: Mapping[str, Any],
    *,
    manifest: str | Path,
    model_out: str | Path,
    log_jsonl: str | Path,
    curve_png: str | Path,
    state_dir: str | Path,
    ctx: DistContext,
    teacher: TeacherGuidance | None = None,
    role: str = "teacher",
) -> None:
    """Train a teacher (teacher=None) or a student, resuming from `state_dir` when possible."""
    model_cfg, cl, tr, st = config["model"], config["cluster"], config["train"], config["student"]
    device = ctx.device
    splits = read_manifest(manifest)
    train_records = splits["train"]
    train_pids = np.array([r.pid for r in train_records], dtype=np.int64)
    cache_dir = cache_dir_for(manifest)

    fingerprint_parts: list[Any] = [role, config["dataset"], config["seed"], config["data"]["height"],
                                    config["data"]["width"], model_cfg, cl, tr | {"eval_every": None},
                                    image_list_digest([r.path for r in train_records])]
    if teacher is not None:
        fingerprint_parts += [st, teacher.checkpoint_sha256]
    fingerprint = config_fingerprint(*fingerprint_parts)

    seed_everything(config["seed"])
    model = build_model(model_cfg["arch"], model_cfg["pretrained"],
                        per_process_bn_groups(model_cfg["bn_groups"], ctx.world_size)).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=tr["lr"], weight_decay=tr["weight_decay"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=tr["step_size"], gamma=tr["gamma"])

    epochs: list[int] = ([-1] if teacher is not None else []) + list(range(tr["epochs"]))
    state = load_state(state_dir, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        records: list[dict] = state["log"]
        start, best_map = state["next_epoch_index"], state["best_map"]
        log.info("resuming %s from %s: %d of %d epochs done", role, state_dir, start, len(epochs))
    else:
        records, start, best_map = [], 0, -1.0
        log.info("training %s from scratch (%d epochs)", role, len(epochs))

    if device.type == "cuda" and tr["channels_last"]:
        model.to(memory_format=torch.channels_last)
    net: torch.nn.Module = model
    if ctx.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if state is None and ctx.is_main:
        write_resolved_config(model_out, config)
    if state is None:
        tic = time.time()
        metrics = evaluate_model(model, splits, config, ctx, cache_dir=cache_dir)
        records.append({"epoch": "untrained", "mAP": metrics["mAP"], "rank1": float(metrics["cmc"][0]),
                        "seconds": round(time.time() - tic, 2)})
        log.info("%s before training: mAP %.1f%%  Rank-1 %.1f%%", role, 100 * metrics["mAP"], 100 * metrics["cmc"][0])
        if ctx.is_main:
            write_jsonl(log_jsonl, records)

    data = config["data"]
    loader = TrainLoader(train_records, config["data_root"], height=data["height"], width=data["width"],
                         batch_size=tr["batch_size"], num_instances=tr["num_instances"], iters=tr["iters"],
                         sampler=tr["sampler"], workers=data["workers"], seed=config["seed"], rank=ctx.rank,
                         world_size=ctx.world_size, use_cache=data["use_cache"], cache_dir=cache_dir,
                         device=device)
    with GracefulTermination() as term:
        try:
            for index in range(start, len(epochs)):
                epoch = epochs[index]
                record = _train_epoch(net, model, optimizer, config, ctx, epoch=epoch, index=index,
                                      train_records=train_records, train_pids=train_pids,
                                      loader=loader, cache_dir=cache_dir, teacher=teacher, term=term)
                scheduler.step()
                last = index == len(epochs) - 1
                if tr["eval_every"] and epoch >= 0 and ((epoch + 1) % tr["eval_every"] == 0 or last):
                    metrics = evaluate_model(model, splits, config, ctx, cache_dir=cache_dir)
                    record.update(mAP=metrics["mAP"], rank1=float(metrics["cmc"][0]))
                    log.info("epoch %d: mAP %.1f%%  Rank-1 %.1f%%", epoch, 100 * metrics["mAP"], 100 * metrics["cmc"][0])
                    if tr["keep_best"] and metrics["mAP"] > best_map and ctx.is_main:
                        best_map = metrics["mAP"]
                        save_model_checkpoint(Path(state_dir) / "best.pth", model, config, epoch=epoch, mAP=best_map)
                records.append(record)
                if ctx.is_main:
                    save_state(state_dir, {
                        "fingerprint": fingerprint, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "next_epoch_index": index + 1, "log": records, "best_map": best_map,
                    })
                    write_jsonl(log_jsonl, records)
                    plot_training_curve(curve_png, records, f"{role} ({config['dataset']})")
                ctx.barrier()
        except TerminationRequested as exc:
            done = len(records) - 1
            log.warning("%s: stopping %s; the state after %d completed epochs is kept in %s and a rerun resumes there",
                        exc, role, done, state_dir)
            raise SystemExit(143) from None

    if ctx.is_main:
        if tr["keep_best"] and (Path(state_dir) / "best.pth").exists():
            best = torch.load(Path(state_dir) / "best.pth", map_location="cpu", weights_only=False)
            model.load_state_dict(best["state_dict"])
            log.info("output is the best-by-test-mAP checkpoint (epoch %s, mAP %.1f%%)", best["epoch"], 100 * best["mAP"])
        write_jsonl(log_jsonl, records)
        plot_training_curve(curve_png, records, f"{role} ({config['dataset']})")
        save_model_checkpoint(model_out, model, config, role=role, epochs=tr["epochs"])
        clear_state(state_dir)
    ctx.barrier()


def _train_epoch(net: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 config: Mapping[str, Any], ctx: DistContext, *, epoch: int, index: int,
                 train_records: Sequence[Record], train_pids: np.ndarray, loader: TrainLoader,
                 cache_dir: Path, teacher: TeacherGuidance | None, term: GracefulTermination) -> dict:
    cl, tr, st = config["cluster"], config["train"], config["student"]
    device = ctx.device
    # Every epoch reseeds, so a resumed run draws the same batches and augmentations.
    seed_everything(config["seed"] * 1000 + index)
    tic = time.time()

    warmup = epoch == -1
    if warmup:  # the student's epoch -1: the teacher's features give labels and frozen memories
        features = {v: teacher.features[v] for v in VIEWS}
    else:
        features = extract_records(model, train_records, config, ctx, f"epoch {epoch} features", cache_dir)
    extract_s = time.time() - tic

    tic = time.time()
    labels = None
    if ctx.is_main:
        labels = pseudo_labels([features[v] for v in VIEWS], k1=cl["k1"], k2=cl["k2"], lambda1=cl["lambda1"],
                               eps=cl["eps"], min_samples=cl["min_samples"])
    labels = ctx.broadcast_object(labels)
    num_clusters = check_clusters(labels, config, epoch)
    momentum = 1.0 if warmup else tr["momentum"]
    memories = {v: ClusterMemory(cluster_centres(labels, features[v]).to(device), temperature=tr["temperature"],
                                 momentum=momentum) for v in VIEWS}
    cluster_s = time.time() - tic

    iters = tr["iters"] * (st["warmup_iters_factor"] if warmup else 1)
    batches = loader.epoch(epoch, labels, iters=iters)
    labels_t = torch.as_tensor(labels, dtype=torch.long, device=device)
    use_distill = teacher is not None and st["mu"] > 0
    if teacher is not None:
        teacher.model.train(st["teacher_mode"] == "train")

    net.train()
    sums = {k: 0.0 for k in ["loss", *(f"ce_{v}" for v in VIEWS), *(f"distill_{v}" for v in VIEWS)]}
    tic = time.time()
    bar = tqdm(total=iters, desc=f"epoch {epoch}", unit="it", leave=False, mininterval=2.0, disable=not ctx.is_main)
    for images, indices in batches:
        term.check(ctx)  # every rank stops at the same step
        images = images.to(device, non_blocking=True)
        if device.type == "cuda" and tr["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = labels_t[indices.to(device)]
        with autocast_context(device, tr["amp"]):
            out = net(images)
        out = {v: out[v].float() for v in VIEWS}
        ce = {v: memories[v](out[v], targets) for v in VIEWS}
        distill = None
        if use_distill:
            with torch.no_grad(), autocast_context(device, tr["amp"]):
                t_out = teacher.model(images)
            distill = {v: distillation_loss(out[v], t_out[v].float()) for v in VIEWS}
        loss = purification_loss(ce, distill, lambda2=tr["lambda2"], mu=st["mu"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch}: the loss became {loss.item()}; lower train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # The memories must see the whole global batch, in batch order, on every rank.
        all_targets = ctx.all_gather_cat(targets)
        for v in VIEWS:
            memories[v].update(ctx.all_gather_cat(out[v].detach()), all_targets)
        sums["loss"] += loss.item()
        for v in VIEWS:
            sums[f"ce_{v}"] += ce[v].item()
            if distill is not None:
                sums[f"distill_{v}"] += distill[v].item()
        bar.update(1)
    bar.close()
    train_s = time.time() - tic
    sums = ctx.all_reduce_mean(sums)  # each rank's losses are means over its share of the batch

    record: dict[str, Any] = {
        "epoch": epoch,
        "clusters": num_clusters,
        "outliers": int((labels < 0).sum()),
        "purity": cluster_purity(labels, train_pids),
        **{k: round(v / iters, 6) for k, v in sums.items() if teacher is not None or not k.startswith("distill")},
        "lr": optimizer.param_groups[0]["lr"],
        "seconds": round(extract_s + cluster_s + train_s, 2),
        "extract_s": round(extract_s, 2),
        "cluster_s": round(cluster_s, 2),
        "train_s": round(train_s, 2),
        "images_per_s": round(iters * tr["batch_size"] / max(train_s, 1e-9), 1),
        "mAP": None,
        "rank1": None,
    }
    log.info("epoch %d: %d clusters, %d outliers, purity %s, loss %.4f, lr %.2e, %.1f s (%.0f img/s)",
             epoch, num_clusters, record["outliers"],
             "n/a" if record["purity"] is None else f"{record['purity']:.3f}",
             record["loss"], record["lr"], record["seconds"], record["images_per_s"])
    return record
