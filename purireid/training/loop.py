"""The training loop shared by the teacher, the student and any run driven by a LabelSource
(docs/method.md, Pseudo labels to Hyperparameters).

Every epoch is two steps:
1. labelling (`label_epoch`): eval-mode features of the train set (or the label source's
   fixed features) -> one label per record from the `LabelSource` -> one cluster memory
   per view, initialised with the class centres of those labels in those features;
2. `train_one_epoch`: the optimiser steps over the batches the sampler draws from the labels.

A run is a list of `EpochPlan`s. The teacher trains on pseudo labels of its own features in
every epoch. The student starts with an epoch -1 on pseudo labels of the teacher's features
(frozen memories, student.warmup_iters_factor × the iterations), then trains like the teacher
(on its own learning-rate step when student.step_size is set), and distils from the teacher in
every epoch. `train(label_source=TrueLabels(...))` trains from given labels instead (a
supervised reference).

Resume: after every epoch the whole state is saved atomically in `state_dir`; a restarted
run continues after the last completed epoch. Every epoch reseeds from (seed, epoch), so a
resumed run ends with the same weights as an uninterrupted one. SIGTERM / SIGINT stop the
run at the next step with the state kept, and exit with status 143 / 130.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from purireid import VIEWS
from purireid.labels.cluster import cluster_centres
from purireid.data import Record, TrainLoader, read_manifest
from purireid.training.diagnostics import (camera_advice, crop_pad_advice, fine_tuning_advice, k1_advice, label_diagnostics,
                                  schedule_advice)
from purireid.runtime.distributed import DistContext
from purireid.evaluation.metrics import HEADLINE_KEYS, HEADLINE_RANKS, headline_metrics
from purireid.evaluation.inference import autocast_context
from purireid.io.files import sha256_file
from purireid.labels.sources import LabelSource, PseudoLabels
from purireid.log import Progress, get_logger
from purireid.training.losses import CameraProxyMemory, ClusterMemory, camera_proxy_labels, distillation_loss, purification_loss
from purireid.model.network import build_model
from purireid.io.checkpoints import (
    clear_state,
    config_fingerprint,
    image_list_digest,
    load_best,
    load_state,
    save_best,
    save_model_checkpoint,
    save_state,
    write_resolved_config,
)
from purireid.evaluation.inference import cache_dir_for, evaluate_model, extract_records
from purireid.evaluation.reporting import plot_training_curve, write_jsonl
from purireid.evaluation.summary import PHASE_TRAIN, PHASE_UNTRAINED, PHASE_WARMUP
from purireid.runtime.signals import GracefulTermination, TerminationRequested, exit_status

log = get_logger("train")

# Hard negatives of the camera-proxy term (train.camera_proxy): CAP's setting.
CAMERA_PROXY_HARD_NEGATIVES = 50


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def per_process_bn_groups(bn_groups: int, world_size: int) -> int:
    """BN groups inside one process: the global `bn_groups` shared among the processes."""
    return max(1, bn_groups // world_size)


@dataclass
class TeacherGuidance:
    """What the student gets from the teacher: its model (online distillation) and its features."""

    model: torch.nn.Module
    features: Mapping[str, torch.Tensor]
    checkpoint_sha256: str


@dataclass(frozen=True)
class EpochPlan:
    """One epoch of a run."""

    index: int  # position in the run: seeds the epoch, counts it for resuming
    epoch: int  # its number in the log; -1 = the student's warm-up on the teacher's features
    labels: LabelSource
    iters: int
    memory_momentum: float  # 1.0 = frozen memories


def epoch_plans(config: Mapping[str, Any], label_source: LabelSource,
                teacher: TeacherGuidance | None = None, camids: np.ndarray | None = None) -> list[EpochPlan]:
    """train.epochs epochs from `label_source`, after the student's warm-up when `teacher` is given
    (`camids`: the train records' cameras, for cluster.camera_centre)."""
    train = config["train"]
    plans: list[EpochPlan] = []
    if teacher is not None:
        warmup = PseudoLabels(config, features=teacher.features, camids=camids)
        plans.append(EpochPlan(0, -1, warmup, train["iters"] * config["student"]["warmup_iters_factor"], 1.0))
    for epoch in range(train["epochs"]):
        plans.append(EpochPlan(len(plans), epoch, label_source, train["iters"], train["momentum"]))
    return plans


def lr_step_size(config: Mapping[str, Any], *, student: bool) -> tuple[int, str]:
    """Epochs between learning-rate decays and the config key that set them: student.step_size
    for the student when set, else train.step_size (the student's warm-up epoch is its first
    scheduler step)."""
    own = config["student"]["step_size"] if student else None
    if own is not None:
        return int(own), "student.step_size"
    return int(config["train"]["step_size"]), "train.step_size"


@dataclass
class EpochTargets:
    """What an epoch trains against: a label per train record (-1 = left out) and a memory per view."""

    labels: np.ndarray
    memories: dict[str, ClusterMemory]
    num_classes: int
    extract_s: float
    label_s: float
    # train.camera_proxy > 0: each record's (class, camera) proxy (-1 = left out) and a proxy memory per view
    proxy_labels: np.ndarray | None = None
    proxies: dict[str, CameraProxyMemory] | None = None


def label_epoch(model: torch.nn.Module, source: LabelSource, records: Sequence[Record], config: Mapping[str, Any],
                ctx: DistContext, *, epoch: int, memory_momentum: float,
                cache_dir: Path | None = None) -> EpochTargets:
    """The labelling step: features (the model's, or the source's fixed ones) -> labels (on rank 0,
    broadcast) -> one ClusterMemory per view from the class centres (config train.temperature);
    with train.camera_proxy > 0 also one CameraProxyMemory per view from the (class, camera) centres."""
    tic = time.time()
    features = source.features
    if features is None:
        features = extract_records(model, records, config, ctx, f"epoch {epoch} features", cache_dir)
    extract_s = time.time() - tic

    tic = time.time()
    labels = source.assign(features, epoch=epoch) if ctx.is_main else None
    labels = ctx.broadcast_object(labels)
    num_classes = source.check(labels, epoch=epoch)
    temperature = config["train"]["temperature"]
    memories = {v: ClusterMemory(cluster_centres(labels, features[v]).to(ctx.device),
                                 temperature=temperature, momentum=memory_momentum)
                for v in VIEWS}
    proxy_labels = proxies = None
    if config["train"]["camera_proxy"] > 0:
        proxy_labels, proxy_classes, _ = camera_proxy_labels(labels, np.array([r.camid for r in records]))
        proxies = {v: CameraProxyMemory(cluster_centres(proxy_labels, features[v]).to(ctx.device), proxy_classes,
                                        temperature=temperature, momentum=memory_momentum,
                                        hard_negatives=CAMERA_PROXY_HARD_NEGATIVES)
                   for v in VIEWS}
    return EpochTargets(labels, memories, num_classes, extract_s, time.time() - tic, proxy_labels, proxies)


def train_one_epoch(net: torch.nn.Module, optimizer: torch.optim.Optimizer, memories: Mapping[str, ClusterMemory],
                    labels: np.ndarray, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], ctx: DistContext, *,
                    lambda2: float, amp: bool = False, channels_last: bool = False,
                    teacher_model: torch.nn.Module | None = None, mu: float = 0.0,
                    term: GracefulTermination | None = None, epoch: int = 0, steps: int | None = None,
                    proxies: Mapping[str, CameraProxyMemory] | None = None, proxy_labels: np.ndarray | None = None,
                    camera_proxy: float = 0.0) -> dict[str, float]:
    """One optimiser step per batch (images, indices into the train records): memory cross-entropy
    of every view against `labels[indices]`, plus `mu` × the distillation towards `teacher_model`
    when given (docs/method.md, Distillation); the memories are updated with the whole global batch after each step.
    With `proxies`, each view's cross-entropy gets `camera_proxy` × the camera-proxy term
    (train.camera_proxy; off in the paper), and the proxies are updated like the memories.

    Returns the mean per step of "loss" and "ce_<view>" (and "distill_<view>" with a teacher,
    "camproxy_<view>" with proxies), averaged over the ranks. `steps` only sizes the progress bar.
    """
    device = ctx.device
    labels_t = torch.as_tensor(labels, dtype=torch.long, device=device)
    proxy_t = None if proxies is None else torch.as_tensor(proxy_labels, dtype=torch.long, device=device)
    net.train()
    keys = ["loss", *(f"ce_{v}" for v in VIEWS)]
    if teacher_model is not None:
        keys += [f"distill_{v}" for v in VIEWS]
    if proxies is not None:
        keys += [f"camproxy_{v}" for v in VIEWS]
    sums = dict.fromkeys(keys, 0.0)
    done = 0
    bar = Progress(steps, f"epoch {epoch}", enabled=ctx.is_main)  # a bar on a terminal, else log lines
    for images, indices in batches:
        if term is not None:
            term.check(ctx)  # every rank stops at the same step
        images = images.to(device, non_blocking=True)
        if device.type == "cuda" and channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = labels_t[indices.to(device)]
        with autocast_context(device, amp):
            out = net(images)
        out = {v: out[v].float() for v in VIEWS}
        ce = {v: memories[v](out[v], targets) for v in VIEWS}
        camproxy = None
        if proxies is not None:
            camproxy = {v: proxies[v](out[v], targets) for v in VIEWS}
            ce_terms = {v: ce[v] + camera_proxy * camproxy[v] for v in VIEWS}
        else:
            ce_terms = ce
        distill = None
        if teacher_model is not None:
            with torch.no_grad(), autocast_context(device, amp):
                teacher_out = teacher_model(images)
            distill = {v: distillation_loss(out[v], teacher_out[v].float()) for v in VIEWS}
        loss = purification_loss(ce_terms, distill, lambda2=lambda2, mu=mu)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch}: the loss became {loss.item()}; lower train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # The memories must see the whole global batch, in batch order, on every rank.
        all_targets = ctx.all_gather_cat(targets)
        all_proxy_targets = None if proxy_t is None else ctx.all_gather_cat(proxy_t[indices.to(device)])
        for v in VIEWS:
            all_out = ctx.all_gather_cat(out[v].detach())
            memories[v].update(all_out, all_targets)
            if proxies is not None:
                proxies[v].update(all_out, all_proxy_targets)
        sums["loss"] += loss.item()
        for v in VIEWS:
            sums[f"ce_{v}"] += ce[v].item()
            if distill is not None:
                sums[f"distill_{v}"] += distill[v].item()
            if camproxy is not None:
                sums[f"camproxy_{v}"] += camproxy[v].item()
        done += 1
        bar.update(1)
    bar.close()
    sums = ctx.all_reduce_mean(sums)  # each rank's losses are means over its share of the batch
    return {k: v / max(done, 1) for k, v in sums.items()}


@dataclass
class TrainingRun:
    """What every epoch of one training run shares."""

    config: Mapping[str, Any]
    ctx: DistContext
    train_records: Sequence[Record]
    loader: TrainLoader
    term: GracefulTermination
    cache_dir: Path | None = None
    teacher: TeacherGuidance | None = None

    @property
    def train_pids(self) -> np.ndarray:
        return np.array([r.pid for r in self.train_records], dtype=np.int64)

    @property
    def train_camids(self) -> np.ndarray:
        return np.array([r.camid for r in self.train_records], dtype=np.int64)


def run_epoch(run: TrainingRun, plan: EpochPlan, net: torch.nn.Module, model: torch.nn.Module,
              optimizer: torch.optim.Optimizer) -> dict:
    """Label, then train one epoch; returns its log record (mAP, mINP, rank1/5/10 None: evaluation is the caller's)."""
    config, ctx, train = run.config, run.ctx, run.config["train"]
    # Every epoch reseeds, so a resumed run draws the same batches and augmentations.
    seed_everything(config["seed"] * 1000 + plan.index)
    targets = label_epoch(model, plan.labels, run.train_records, config, ctx, epoch=plan.epoch,
                          memory_momentum=plan.memory_momentum, cache_dir=run.cache_dir)
    batches = run.loader.epoch(plan.epoch, targets.labels, iters=plan.iters)
    distill_from, mu = None, 0.0
    if run.teacher is not None:
        student = config["student"]
        run.teacher.model.train(student["teacher_mode"] == "train")
        if student["mu"] > 0:
            distill_from, mu = run.teacher.model, student["mu"]

    tic = time.time()
    losses = train_one_epoch(net, optimizer, targets.memories, targets.labels, batches, ctx, lambda2=train["lambda2"],
                             amp=train["amp"], channels_last=train["channels_last"], teacher_model=distill_from, mu=mu,
                             term=run.term, epoch=plan.epoch, steps=plan.iters, proxies=targets.proxies,
                             proxy_labels=targets.proxy_labels, camera_proxy=train["camera_proxy"])
    train_s = time.time() - tic
    if run.teacher is not None:  # a student logs its distillation terms, 0 when student.mu is 0
        for v in VIEWS:
            losses.setdefault(f"distill_{v}", 0.0)

    # Diagnostics against the true identities: logged, never fed back into training.
    diagnostics = label_diagnostics(targets.labels, run.train_pids, run.train_camids)
    if isinstance(plan.labels, PseudoLabels) and plan.index == 0 and ctx.is_main:
        cluster = config["cluster"]
        for advice in (k1_advice(cluster["k1"], cluster["eps"], diagnostics["mean_cluster_size"]),
                       camera_advice(diagnostics["multi_camera_share"], len(np.unique(run.train_camids)),
                                     cluster.get("camera_centre", False), cluster.get("same_camera_offset", 0.0))):
            if advice:
                log.warning("epoch %d: %s", plan.epoch, advice)
    record: dict[str, Any] = {
        "epoch": plan.epoch,
        "phase": PHASE_WARMUP if plan.epoch < 0 else PHASE_TRAIN,
        "clusters": targets.num_classes,
        "outliers": int((targets.labels < 0).sum()),
        **diagnostics,
        **{k: round(v, 6) for k, v in losses.items()},
        "lr": optimizer.param_groups[0]["lr"],
        "seconds": round(targets.extract_s + targets.label_s + train_s, 2),
        "extract_s": round(targets.extract_s, 2),
        "cluster_s": round(targets.label_s, 2),
        "train_s": round(train_s, 2),
        "images_per_s": round(plan.iters * train["batch_size"] / max(train_s, 1e-9), 1),
        **dict.fromkeys(HEADLINE_KEYS),  # mAP, mINP, rank1/5/10: filled in by the caller in evaluated epochs
    }
    log.info("epoch %d: %d clusters, %d outliers, purity %s, NMI %s, multi-camera clusters %s, loss %.4f, "
             "lr %.2e, %.1f s (%.0f img/s)", plan.epoch, targets.num_classes, record["outliers"],
             *("n/a" if record[k] is None else f"{record[k]:.3f}" for k in ("purity", "nmi", "multi_camera_share")),
             record["loss"], record["lr"], record["seconds"], record["images_per_s"])
    return record


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
    label_source: LabelSource | None = None,
    source_weights: str | Path | None = None,
) -> None:
    """Train a model from `label_source` (default: pseudo labels of its own features, i.e. the
    teacher); with `teacher`, the student. Resumes from `state_dir` when possible.

    With model.pretrained 'source' the model starts from `source_weights` (the pretrain_source
    rule's checkpoint; its sha256 joins the resume fingerprint).

    Reads config keys dataset, data_root, seed, data, model, train, evaluate.rerank, plus
    cluster (pseudo labels) and student (with a teacher).
    """
    model_cfg, train_cfg = config["model"], config["train"]
    splits = read_manifest(manifest)
    train_records = splits["train"]
    camids = np.array([r.camid for r in train_records], dtype=np.int64)
    label_source = label_source if label_source is not None else PseudoLabels(config, camids=camids)
    role = "student" if teacher is not None else label_source.role
    device = ctx.device
    cache_dir = cache_dir_for(manifest)
    rerank = config["evaluate"]["rerank"]
    plans = epoch_plans(config, label_source, teacher, camids)

    label_sources = sorted({json.dumps(p.labels.fingerprint(), sort_keys=True, default=str) for p in plans})
    pretrained = model_cfg["pretrained"]
    step_size, step_key = lr_step_size(config, student=teacher is not None)
    for advice in (fine_tuning_advice(pretrained, train_cfg["lr"]),
                   crop_pad_advice(train_cfg["crop_pad"], config["data"]["width"]),
                   schedule_advice(step_size, len(plans), train_cfg["gamma"], step_key)):
        if advice and ctx.is_main:
            log.warning("%s", advice)
    if pretrained == "source":
        if source_weights is None:
            raise ValueError("model.pretrained is 'source' but no source weights were given "
                             "(the pretrain_source rule's model.pth)")
        pretrained = str(source_weights)
        log.info("starting from the source-pretrained weights %s", source_weights)
    fingerprint_parts: list[Any] = [role, config["dataset"], config["seed"], config["data"]["height"],
                                    config["data"]["width"], model_cfg, train_cfg | {"eval_every": None}, rerank,
                                    label_sources, image_list_digest([r.path for r in train_records])]
    if teacher is not None:
        fingerprint_parts += [config["student"], teacher.checkpoint_sha256]
    if source_weights is not None and model_cfg["pretrained"] == "source":
        fingerprint_parts.append(sha256_file(source_weights))
    fingerprint = config_fingerprint(*fingerprint_parts)

    seed_everything(config["seed"])
    model = build_model(model_cfg["arch"], pretrained,
                        per_process_bn_groups(model_cfg["bn_groups"], ctx.world_size),
                        input_norm=model_cfg["input_norm"]).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=train_cfg["gamma"])

    state = load_state(state_dir, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        records: list[dict] = state["log"]
        start, best_map = state["next_epoch_index"], state["best_map"]
        log.info("resuming %s from %s: %d of %d epochs done", role, state_dir, start, len(plans))
    else:
        records, start, best_map = [], 0, -1.0
        log.info("starting %s training (no resume state; %d epochs)", role, len(plans))

    if device.type == "cuda" and train_cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    net: torch.nn.Module = model
    if ctx.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def test_accuracy() -> dict:
        # The headline metrics (mAP, mINP, Rank-1/5/10): the CMC up to rank 10 is enough.
        metrics = evaluate_model(model, splits, config, ctx, rerank=rerank, max_rank=max(HEADLINE_RANKS),
                                 cache_dir=cache_dir)
        return headline_metrics(metrics)

    if ctx.is_main:  # a declared output of the rule: written on every (also resumed) start
        write_resolved_config(model_out, config)
    if state is None:
        tic = time.time()
        metrics = test_accuracy()
        records.append({"epoch": None, "phase": PHASE_UNTRAINED, **metrics, "seconds": round(time.time() - tic, 2)})
        log.info("%s before training: mAP %.1f%%  Rank-1 %.1f%%", role, 100 * metrics["mAP"], 100 * metrics["rank1"])
        if ctx.is_main:
            write_jsonl(log_jsonl, records)

    data = config["data"]
    loader = TrainLoader(train_records, config["data_root"], height=data["height"], width=data["width"],
                         batch_size=train_cfg["batch_size"], num_instances=train_cfg["num_instances"],
                         iters=train_cfg["iters"], sampler=train_cfg["sampler"], workers=data["workers"],
                         seed=config["seed"], rank=ctx.rank, world_size=ctx.world_size, use_cache=data["use_cache"],
                         cache_dir=cache_dir, device=device, crop_pad=train_cfg["crop_pad"])
    title = f"{role} ({config['dataset']})"
    with GracefulTermination() as term:
        run = TrainingRun(config, ctx, train_records, loader, term, cache_dir=cache_dir, teacher=teacher)
        try:
            for plan in plans[start:]:
                record = run_epoch(run, plan, net, model, optimizer)
                scheduler.step()
                last = plan.index == len(plans) - 1
                epoch, every = plan.epoch, train_cfg["eval_every"]
                if every and epoch >= 0 and ((epoch + 1) % every == 0 or last):
                    metrics = test_accuracy()
                    record.update(metrics)
                    log.info("epoch %d: mAP %.1f%%  Rank-1 %.1f%%", epoch, 100 * metrics["mAP"], 100 * metrics["rank1"])
                    if train_cfg["keep_best"] and metrics["mAP"] > best_map and ctx.is_main:
                        best_map = metrics["mAP"]
                        save_best(state_dir, model, config, epoch=epoch, mAP=best_map)
                records.append(record)
                if ctx.is_main:
                    save_state(state_dir, {
                        "fingerprint": fingerprint, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "next_epoch_index": plan.index + 1, "log": records, "best_map": best_map,
                    })
                    write_jsonl(log_jsonl, records)
                    plot_training_curve(curve_png, records, title)
                ctx.barrier()
        except TerminationRequested as exc:
            done = len(records) - 1
            log.warning("%s: stopping %s; the state after %d completed epochs is kept in %s and a rerun resumes there",
                        exc, role, done, state_dir)
            raise SystemExit(exit_status(exc.signum)) from None

    if ctx.is_main:
        best = load_best(state_dir) if train_cfg["keep_best"] else None
        if best is not None:
            model.load_state_dict(best["state_dict"])
            log.info("output is the best-by-test-mAP checkpoint (epoch %s, mAP %.1f%%)", best["epoch"], 100 * best["mAP"])
        write_jsonl(log_jsonl, records)
        plot_training_curve(curve_png, records, title)
        save_model_checkpoint(model_out, model, config, role=role, epochs=train_cfg["epochs"])
        clear_state(state_dir)
    ctx.barrier()
