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

`train` wires the run's named parts (purireid.training.run_parts) around the epochs: the model
under training, resume and keep-best (`RunState`), the periodic evaluation and the run log.
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
from purireid.evaluation.inference import cache_dir_for, extract_records
from purireid.evaluation.metrics import HEADLINE_KEYS
from purireid.io.checkpoints import config_fingerprint, write_resolved_config
from purireid.io.files import image_list_digest, sha256_file
from purireid.io.runlog import epoch_phase
from purireid.labels.diagnostics import label_diagnostics, replacement_advice
from purireid.labels.sources import LabelSource, label_source as make_label_source
from purireid.log import Progress, get_logger
from purireid.runtime.distributed import DistContext, unwrapped
from purireid.runtime.precision import autocast_context
from purireid.runtime.signals import GracefulTermination, TerminationRequested
from purireid.training.advice import settings_advice
from purireid.training.losses import view_weights
from purireid.training.run_parts import ModelUnderTraining, PeriodicEvaluation, RunLog, RunState, compiled_network
from purireid.training.terms import Batch, EpochTargets, GatheredBatch, LossTerm, build_terms, weighted_view_sum

log = get_logger("train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class TeacherGuidance:
    """What the student gets from the teacher: its model (online distillation) and its features."""

    model: torch.nn.Module
    features: Mapping[str, torch.Tensor]
    checkpoint_sha256: str


@dataclass(frozen=True)
class EpochPlan:
    """One epoch of a run: where its labels come from, its length, and the memory momentum its
    loss terms update with."""

    index: int  # position in the run: seeds the epoch, counts it for resuming
    epoch: int  # its number in the log; -1 = the student's warm-up on the teacher's features
    label_source: LabelSource
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
    """An epoch's labels (-1 = left out), the features they came from, the records' cameras, and
    what the labelling cost."""

    labels: np.ndarray
    features: Mapping[str, torch.Tensor]
    camids: np.ndarray
    num_classes: int
    device: torch.device
    extract_s: float
    label_s: float

    def targets(self, memory_momentum: float) -> EpochTargets:
        """What the loss terms build their epoch's state from, with the epoch plan's memory momentum."""
        return EpochTargets(self.labels, self.features, self.camids, self.num_classes, memory_momentum, self.device)


def label_epoch(model: torch.nn.Module, source: LabelSource, records: Sequence[Record], config: Mapping[str, Any],
                ctx: DistContext, *, epoch: int, cache_dir: Path | None = None) -> Labelling:
    """The labelling step: features (the model's, or the source's fixed ones) -> labels (on rank 0,
    broadcast), checked by the source on every rank."""
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
    return Labelling(labels, features, camids, num_classes, ctx.device, extract_s, time.time() - tic)


@dataclass(frozen=True)
class StepSettings:
    """How the steps of an epoch run: the views' weights in the loss (docs/method.md, Memories and losses), bf16 autocast and
    channels_last on CUDA, and the epoch's number and length (messages and the progress bar)."""

    view_weights: Mapping[str, float]
    amp: bool = False
    channels_last: bool = False
    epoch: int = 0
    steps: int | None = None


def _step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, active: Sequence[LossTerm],
          settings: StepSettings) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimiser step on the view-weighted sum of the active terms: returns the views'
    features (detached) and the step's logged values [loss, each term's views] on the device."""
    with autocast_context(batch.images.device, settings.amp):
        out = net(batch.images)
    out = {v: out[v].float() for v in VIEWS}
    values = [(t, t(out, batch)) for t in active]
    loss = weighted_view_sum([(t.weight, v) for t, v in values], settings.view_weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # the logged values, without a detach each
        logged = torch.stack([loss, *(value[v] for _, value in values for v in VIEWS)])
    return {v: out[v].detach() for v in VIEWS}, logged


def _epoch_sums(logged: Sequence[torch.Tensor], positions: torch.Tensor, size: int, epoch: int) -> list[float]:
    """The sums over the steps of the logged values (in float64), read once; a non-finite loss
    raises FloatingPointError naming the epoch and the first step where it occurred."""
    if not logged:
        return [0.0] * size
    steps = torch.stack(logged)
    losses = steps[:, 0].tolist()
    bad = next((i for i, value in enumerate(losses) if not np.isfinite(value)), None)
    if bad is not None:
        raise FloatingPointError(f"epoch {epoch}, step {bad}: the loss became {losses[bad]}; lower train.lr")
    sums = torch.zeros(size, dtype=torch.float64, device=steps.device)
    return sums.index_add_(0, positions, steps.double().sum(0)).tolist()


def train_one_epoch(net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], terms: Sequence[LossTerm], ctx: DistContext,
                    settings: StepSettings, stop: GracefulTermination | None = None) -> dict[str, float]:
    """One optimiser step per batch (images, indices into the train records): the loss is the
    view-weighted sum of the terms (`weighted_view_sum`); after each step every term updates its
    state with the whole global batch.

    Nothing is read back from the device inside the loop: each step's logged values stay there
    and are read once at the end, where a non-finite loss raises FloatingPointError naming the
    epoch and step. Returns the mean per step of "loss" and of every term's "<name>_<view>" (0 for
    a term of weight 0), averaged over the ranks.
    """
    device = ctx.device
    net.train()
    active = [t for t in terms if t.weight != 0]
    keys = ["loss", *(key for t in terms for key in t.log_keys())]
    slots = {key: i for i, key in enumerate(keys)}
    # Where each step's logged values go (a term of weight 0 is not computed: its sums stay 0).
    positions = torch.tensor([0] + [slots[key] for t in active for key in t.log_keys()], device=device)
    logged: list[torch.Tensor] = []
    bar = Progress(settings.steps, f"epoch {settings.epoch}", enabled=ctx.is_main)  # a bar on a terminal, else log lines
    for images, indices in batches:
        if stop is not None:
            stop.check(ctx)  # every rank stops at the same step
        images = images.to(device, non_blocking=True)
        if device.type == "cuda" and settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        batch = Batch(images, indices.to(device, non_blocking=True))
        features, values = _step(net, optimizer, batch, active, settings)
        logged.append(values)
        # The terms' states must see the whole global batch, in batch order, on every rank.
        gathered = GatheredBatch({v: ctx.all_gather_equal(features[v]) for v in VIEWS},
                                 ctx.all_gather_equal(batch.indices))
        for t in terms:
            t.after_step(gathered)
        bar.update(1)
    bar.close()
    sums = _epoch_sums(logged, positions, len(keys), settings.epoch)
    for t in terms:
        t.end_epoch()
    means = ctx.all_reduce_mean(dict(zip(keys, sums)))  # each rank's losses are means over its share
    return {key: value / max(len(logged), 1) for key, value in means.items()}


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


def run_epoch(run: TrainingRun, plan: EpochPlan, net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Label, then train one epoch; returns its log record (mAP, mINP, rank1/5/10 None: evaluation is the caller's).

    `net`: the module the steps run (the model, or its DistributedDataParallel / compiled
    wrapper); the labelling extracts features with the eager model inside it."""
    config, ctx, train = run.config, run.ctx, run.config["train"]
    # Every epoch reseeds, so a resumed run draws the same batches and augmentations.
    seed_everything(config["seed"] * 1000 + plan.index)
    labelling = label_epoch(unwrapped(net), plan.label_source, run.train_records, config, ctx, epoch=plan.epoch,
                            cache_dir=run.cache_dir)
    targets = labelling.targets(plan.memory_momentum)
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
    diagnostics = label_diagnostics(targets.labels, run.train_pids, run.train_camids, targets.features)
    if plan.index == 0 and ctx.is_main:
        notes = [*plan.label_source.advice(diagnostics), replacement_advice(targets.labels, train["num_instances"])]
        for advice in filter(None, notes):
            log.warning("epoch %d: %s", plan.epoch, advice)
    record: dict[str, Any] = {
        "epoch": plan.epoch,
        "phase": epoch_phase(plan.epoch),
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
             *("n/a" if record.get(k) is None else f"{record[k]:.3f}" for k in ("purity", "nmi", "multi_camera_share")),
             record["loss"], record["lr"], record["seconds"], record["images_per_s"])
    return record


def resume_fingerprint(config: Mapping[str, Any], role: str, plans: Sequence[EpochPlan],
                       train_records: Sequence[Record], teacher: TeacherGuidance | None,
                       source_weights: str | Path | None) -> str:
    """What a saved state must match to be resumed: everything that changes the weights (not
    train.eval_every, which only adds evaluations)."""
    label_sources = sorted({json.dumps(p.label_source.fingerprint(), sort_keys=True, default=str) for p in plans})
    parts: list[Any] = [role, config["dataset"], config["seed"], config["data"]["height"], config["data"]["width"],
                        config["model"], config["train"] | {"eval_every": None}, config["evaluate"]["rerank"],
                        label_sources, image_list_digest([r.path for r in train_records])]
    if teacher is not None:
        parts += [config["student"], teacher.checkpoint_sha256]
    if source_weights is not None and config["model"]["pretrained"] == "source":
        parts.append(sha256_file(source_weights))
    return config_fingerprint(*parts)


@dataclass(frozen=True)
class TrainFiles:
    """The files of a training run: what it reads (the manifest; the pretrain_source rule's
    checkpoint when model.pretrained is 'source') and what it writes (the checkpoint, log.jsonl,
    the training curve, the resume state's folder)."""

    manifest: Path
    model_out: Path
    log_jsonl: Path
    curve_png: Path
    state_dir: Path
    source_weights: Path | None = None


def starting_weights(config: Mapping[str, Any], source_weights: Path | None) -> str:
    """model.pretrained, with 'source' replaced by the source-pretrained checkpoint's path."""
    pretrained = config["model"]["pretrained"]
    if pretrained != "source":
        return pretrained
    if source_weights is None:
        raise ValueError("model.pretrained is 'source' but no source weights were given "
                         "(the pretrain_source rule's model.pth)")
    log.info("starting from the source-pretrained weights %s", source_weights)
    return str(source_weights)


def train_loader(config: Mapping[str, Any], train_records: Sequence[Record], ctx: DistContext,
                 cache_dir: Path | None) -> TrainLoader:
    """The loader of the run's training batches (its sampler, augmentation and image cache)."""
    data, train_cfg = config["data"], config["train"]
    return TrainLoader(train_records, config["data_root"], height=data["height"], width=data["width"],
                       batch_size=train_cfg["batch_size"], num_instances=train_cfg["num_instances"],
                       iters=train_cfg["iters"], sampler=train_cfg["sampler"], workers=data["workers"],
                       seed=config["seed"], rank=ctx.rank, world_size=ctx.world_size, use_cache=data["use_cache"],
                       cache_dir=cache_dir, device=ctx.device, crop_pad=train_cfg["crop_pad"])


def train(config: Mapping[str, Any], files: TrainFiles, *, ctx: DistContext, teacher: TeacherGuidance | None = None,
          label_source: LabelSource | None = None) -> None:
    """Train a model from `label_source` (default: pseudo labels of its own features, i.e. the
    teacher); with `teacher`, the student. Resumes from `files.state_dir` when possible; with
    model.pretrained 'source' starts from `files.source_weights` (its sha256 joins the resume
    fingerprint).

    Reads config keys dataset, data_root, seed, data, model, train, evaluate.rerank, plus
    cluster (pseudo labels) and student (with a teacher).
    """
    splits = read_manifest(files.manifest)
    train_records = splits["train"]
    if label_source is None:  # the teacher and the student: pseudo labels of the model's own features
        label_source = make_label_source(config["cluster"]["method"], config, train_records)
    role = "student" if teacher is not None else label_source.role
    plans = epoch_plans(config, label_source, teacher, train_records)
    step_size, step_key = lr_step_size(config, student=teacher is not None)
    if ctx.is_main:
        for advice in settings_advice(config, step_size, step_key, len(plans)):
            log.warning("%s", advice)
    pretrained = starting_weights(config, files.source_weights)
    fingerprint = resume_fingerprint(config, role, plans, train_records, teacher, files.source_weights)

    seed_everything(config["seed"])
    trained = ModelUnderTraining.build(config, pretrained, step_size, ctx)
    run_log = RunLog(files.log_jsonl, files.curve_png, f"{role} ({config['dataset']})", ctx)
    state = RunState(files.state_dir, fingerprint, config, ctx, role)
    start = state.restore(trained, run_log, len(plans))
    net = trained.for_steps(config["train"], ctx)
    cache_dir = cache_dir_for(files.manifest)
    evaluation = PeriodicEvaluation(trained.model, splits, config, ctx, cache_dir)
    if ctx.is_main:  # a declared output of the rule: written on every (also resumed) start
        write_resolved_config(files.model_out, config)
    if start is None and evaluation.labelled:
        run_log.append(evaluation.untrained(role))
        run_log.write(curve=False)

    loader = train_loader(config, train_records, ctx, cache_dir)
    with GracefulTermination() as stop:
        run = TrainingRun(config, ctx, train_records, loader, stop, build_terms(config, teacher=teacher),
                          cache_dir=cache_dir)
        try:
            for plan in plans[start or 0:]:
                record = run_epoch(run, plan, net, trained.optimizer)
                trained.scheduler.step()
                if evaluation.due(plan.epoch, last=plan.index == len(plans) - 1):
                    record.update(evaluation.after_epoch(plan.epoch))
                    state.keep_if_best(trained.model, plan.epoch, record["mAP"])
                run_log.append(record)
                state.save(trained, plan.index + 1, run_log.records)
                run_log.write()
                ctx.barrier()
        except TerminationRequested as exc:
            raise state.stopped(exc, run_log.epochs_done) from None

    run_log.write()
    state.write_output(trained.model, files.model_out)
    ctx.barrier()
