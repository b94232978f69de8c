"""The training loop shared by the teacher, the student and any run driven by a LabelSource
(docs/method.md, Pseudo labels to Hyperparameters).

Every epoch is two steps:
1. labelling (`label_epoch`): eval-mode features of the train set (or the label source's
   fixed features) -> one label per record from the `LabelSource`; each loss term builds its
   epoch's state from them (`LossTerm.start_epoch`: the cluster memories from the class centres);
2. `train_one_epoch`: the optimiser steps over the batches the sampler draws from the labels,
   on the sum of the run's loss terms (purireid.training.terms), which the loop knows only as
   named parts. Nothing is read back from the device between steps.

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
from purireid.data import Record, TrainLoader, read_manifest
from purireid.training.diagnostics import (crop_pad_advice, fine_tuning_advice, label_diagnostics, replacement_advice,
                                           schedule_advice)
from purireid.runtime.distributed import DistContext
from purireid.evaluation.metrics import HEADLINE_KEYS, HEADLINE_RANKS, headline_metrics
from purireid.evaluation.inference import autocast_context
from purireid.io.files import sha256_file, write_jsonl
from purireid.io.tensorboard import write_event_file
from purireid.labels.sources import LabelSource, label_source as make_label_source
from purireid.log import Progress, get_logger
from purireid.training.losses import view_weights
from purireid.training.terms import Batch, EpochTargets, GatheredBatch, LossTerm, build_terms, weighted_view_sum
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
from purireid.evaluation.reporting import plot_training_curve
from purireid.evaluation.summary import PHASE_TRAIN, PHASE_UNTRAINED, PHASE_WARMUP
from purireid.runtime.signals import GracefulTermination, TerminationRequested, exit_status

log = get_logger("train")


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


def epoch_plans(config: Mapping[str, Any], label_source: LabelSource, teacher: TeacherGuidance | None = None,
                records: Sequence[Record] = ()) -> list[EpochPlan]:
    """train.epochs epochs from `label_source`, after the student's warm-up when `teacher` is given:
    the pseudo-label method (cluster.method) on the teacher's features of the train `records`."""
    train = config["train"]
    plans: list[EpochPlan] = []
    if teacher is not None:
        warmup = make_label_source(config["cluster"]["method"], config, records, features=teacher.features)
        plans.append(EpochPlan(0, -1, warmup, train["iters"] * config["student"]["warmup_iters_factor"], 1.0))
    for epoch in range(train["epochs"]):
        plans.append(EpochPlan(len(plans), epoch, label_source, train["iters"], train["memory_momentum"]))
    return plans


def lr_step_size(config: Mapping[str, Any], *, student: bool) -> tuple[int, str]:
    """Epochs between learning-rate decays and the config key that set them: student.step_size
    for the student when set, else train.step_size (the student's warm-up epoch is its first
    scheduler step)."""
    own = config["student"]["step_size"] if student else None
    if own is not None:
        return int(own), "student.step_size"
    return int(config["train"]["step_size"]), "train.step_size"


@dataclass(frozen=True)
class Labelling:
    """An epoch's labels for the terms, and what the labelling cost."""

    targets: EpochTargets
    extract_s: float
    label_s: float


def label_epoch(model: torch.nn.Module, source: LabelSource, records: Sequence[Record], config: Mapping[str, Any],
                ctx: DistContext, *, epoch: int, memory_momentum: float, cache_dir: Path | None = None) -> Labelling:
    """The labelling step: features (the model's, or the source's fixed ones) -> labels (on rank 0,
    broadcast) -> what the loss terms build their epoch's state from (`LossTerm.start_epoch`)."""
    tic = time.time()
    features = source.features
    if features is None:
        features = extract_records(model, records, config, ctx, f"epoch {epoch} features", cache_dir)
    extract_s = time.time() - tic

    tic = time.time()
    labels = source.assign(features, epoch=epoch) if ctx.is_main else None
    labels = ctx.broadcast_object(labels)
    num_classes = source.check(labels, epoch=epoch)
    camids = np.array([r.camid for r in records], dtype=np.int64)
    targets = EpochTargets(labels, features, camids, num_classes, memory_momentum, ctx.device)
    return Labelling(targets, extract_s, time.time() - tic)


@dataclass(frozen=True)
class StepSettings:
    """How the steps of an epoch run: the views' weights in the loss (docs/method.md, Memories and losses), bf16 autocast and
    channels_last on CUDA, and the epoch's number and length (messages and the progress bar)."""

    view_weights: Mapping[str, float]
    amp: bool = False
    channels_last: bool = False
    epoch: int = 0
    steps: int | None = None


class NonFiniteLoss:
    """The first step whose loss was not finite, tracked on the device (no host read per step)."""

    def __init__(self, device: torch.device) -> None:
        self.step = torch.full((), -1, dtype=torch.long, device=device)  # -1: every loss so far finite
        self.value = torch.zeros((), dtype=torch.float32, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        first = ~torch.isfinite(loss) & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, loss.detach().float(), self.value)

    def raise_if_seen(self, epoch: int) -> None:
        step, value = torch.stack([self.step.double(), self.value.double()]).tolist()
        if step >= 0:
            raise FloatingPointError(f"epoch {epoch}, step {int(step)}: the loss became {value}; lower train.lr")


def train_one_epoch(net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], terms: Sequence[LossTerm], ctx: DistContext,
                    settings: StepSettings, stop: GracefulTermination | None = None) -> dict[str, float]:
    """One optimiser step per batch (images, indices into the train records): the loss is the
    view-weighted sum of the terms (`weighted_view_sum`); after each step every term updates its
    state with the whole global batch.

    Nothing is read back from the device inside the loop: the logged values are summed there and
    read once at the end, where a non-finite loss raises FloatingPointError naming the epoch and
    step. Returns the mean per step of "loss" and of every term's "<name>_<view>" (0 for a term
    of weight 0), averaged over the ranks.
    """
    device = ctx.device
    net.train()
    active = [t for t in terms if t.weight != 0]
    keys = ["loss", *(key for t in terms for key in t.log_keys())]
    slots = {key: i for i, key in enumerate(keys)}
    # Where each step's logged values go (a term of weight 0 is not computed: its sums stay 0).
    positions = torch.tensor([0] + [slots[key] for t in active for key in t.log_keys()], device=device)
    sums = torch.zeros(len(keys), dtype=torch.float64, device=device)
    non_finite = NonFiniteLoss(device)
    done = 0
    bar = Progress(settings.steps, f"epoch {settings.epoch}", enabled=ctx.is_main)  # a bar on a terminal, else log lines
    for images, indices in batches:
        if stop is not None:
            stop.check(ctx)  # every rank stops at the same step
        images = images.to(device, non_blocking=True)
        if device.type == "cuda" and settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        batch = Batch(images, indices.to(device, non_blocking=True))
        with autocast_context(device, settings.amp):
            out = net(images)
        out = {v: out[v].float() for v in VIEWS}
        values = [(t, t(out, batch)) for t in active]
        loss = weighted_view_sum([(t.weight, v) for t, v in values], settings.view_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # The terms' states must see the whole global batch, in batch order, on every rank.
        gathered = GatheredBatch({v: ctx.all_gather_equal(out[v].detach()) for v in VIEWS},
                                 ctx.all_gather_equal(batch.indices))
        for t in terms:
            t.after_step(gathered)
        logged = [loss.detach(), *(value[v].detach() for _, value in values for v in VIEWS)]
        sums.index_add_(0, positions, torch.stack(logged).double())
        non_finite.observe(loss, done)
        done += 1
        bar.update(1)
    bar.close()
    non_finite.raise_if_seen(settings.epoch)
    for t in terms:
        t.end_epoch()
    sums = ctx.all_reduce_mean(dict(zip(keys, sums.tolist())))  # each rank's losses are means over its share
    return {key: value / max(done, 1) for key, value in sums.items()}


@dataclass
class TrainingRun:
    """What every epoch of one training run shares."""

    config: Mapping[str, Any]
    ctx: DistContext
    train_records: Sequence[Record]
    loader: TrainLoader
    stop: GracefulTermination
    terms: Sequence[LossTerm]
    cache_dir: Path | None = None

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
    labelling = label_epoch(model, plan.labels, run.train_records, config, ctx, epoch=plan.epoch,
                            memory_momentum=plan.memory_momentum, cache_dir=run.cache_dir)
    targets = labelling.targets
    for term in run.terms:
        term.start_epoch(targets)
    batches = run.loader.epoch(plan.epoch, targets.labels, iters=plan.iters)
    settings = StepSettings(view_weights(train["lambda2"]), amp=train["amp"], channels_last=train["channels_last"],
                            epoch=plan.epoch, steps=plan.iters)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    tic = time.time()
    losses = train_one_epoch(net, optimizer, batches, run.terms, ctx, settings, run.stop)
    train_s = time.time() - tic

    # Diagnostics against the true identities: logged, never fed back into training.
    diagnostics = label_diagnostics(targets.labels, run.train_pids, run.train_camids)
    if plan.index == 0 and ctx.is_main:
        notes = [*plan.labels.advice(diagnostics), replacement_advice(targets.labels, train["num_instances"])]
        for advice in filter(None, notes):
            log.warning("epoch %d: %s", plan.epoch, advice)
    record: dict[str, Any] = {
        "epoch": plan.epoch,
        "phase": PHASE_WARMUP if plan.epoch < 0 else PHASE_TRAIN,
        "clusters": targets.num_classes,
        "outliers": int((targets.labels < 0).sum()),
        **diagnostics,
        **{k: round(v, 6) for k, v in losses.items()},
        "lr": optimizer.param_groups[0]["lr"],
        "seconds": round(labelling.extract_s + labelling.label_s + train_s, 2),
        "extract_s": round(labelling.extract_s, 2),
        "cluster_s": round(labelling.label_s, 2),
        "train_s": round(train_s, 2),
        "images_per_s": round(plan.iters * train["batch_size"] / max(train_s, 1e-9), 1),
        # the epoch's peak GPU memory (labelling and steps) on this process; None on the CPU
        "gpu_memory_peak_gb": (round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 2)
                               if ctx.device.type == "cuda" else None),
        **dict.fromkeys(HEADLINE_KEYS),  # mAP, mINP, rank1/5/10: filled in by the caller in evaluated epochs
    }
    log.info("epoch %d: %d clusters, %d outliers, purity %s, NMI %s, multi-camera clusters %s, loss %.4f, "
             "lr %.2e, %.1f s (%.0f img/s)", plan.epoch, targets.num_classes, record["outliers"],
             *("n/a" if record[k] is None else f"{record[k]:.3f}" for k in ("purity", "nmi", "multi_camera_share")),
             record["loss"], record["lr"], record["seconds"], record["images_per_s"])
    return record


def resume_fingerprint(config: Mapping[str, Any], role: str, plans: Sequence[EpochPlan],
                       train_records: Sequence[Record], teacher: TeacherGuidance | None,
                       source_weights: str | Path | None) -> str:
    """What a saved state must match to be resumed: everything that changes the weights (not
    train.eval_every, which only adds evaluations)."""
    label_sources = sorted({json.dumps(p.labels.fingerprint(), sort_keys=True, default=str) for p in plans})
    parts: list[Any] = [role, config["dataset"], config["seed"], config["data"]["height"], config["data"]["width"],
                        config["model"], config["train"] | {"eval_every": None}, config["evaluate"]["rerank"],
                        label_sources, image_list_digest([r.path for r in train_records])]
    if teacher is not None:
        parts += [config["student"], teacher.checkpoint_sha256]
    if source_weights is not None and config["model"]["pretrained"] == "source":
        parts.append(sha256_file(source_weights))
    return config_fingerprint(*parts)


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
    if label_source is None:  # the teacher and the student: pseudo labels of the model's own features
        label_source = make_label_source(config["cluster"]["method"], config, train_records)
    role = "student" if teacher is not None else label_source.role
    device = ctx.device
    cache_dir = cache_dir_for(manifest)
    rerank = config["evaluate"]["rerank"]
    plans = epoch_plans(config, label_source, teacher, train_records)

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
    fingerprint = resume_fingerprint(config, role, plans, train_records, teacher, source_weights)

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
    if train_cfg["compile"]:  # the steps only: evaluation and labelling use the eager `model`
        net = torch.compile(net)

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
    with GracefulTermination() as stop:
        run = TrainingRun(config, ctx, train_records, loader, stop, build_terms(config, teacher=teacher),
                          cache_dir=cache_dir)
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
                    write_event_file(log_jsonl, records)  # TensorBoard's copy, when it is installed
                    plot_training_curve(curve_png, records, title)
                ctx.barrier()
        except TerminationRequested as exc:
            done = len(records) - 1  # the untrained evaluation is no epoch
            if done:
                log.warning("%s: stopping %s; the state after %d completed epochs is kept in %s and a rerun "
                            "resumes there", exc, role, done, state_dir)
            else:
                log.warning("%s: stopping %s before its first epoch completed; no state is kept, a rerun starts "
                            "from the beginning", exc, role)
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
