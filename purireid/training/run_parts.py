"""The parts a training run is assembled from (purireid.training.loop.train wires them):

- `ModelUnderTraining`: the model, its optimiser and learning-rate schedule, and the module the
  steps run (`for_steps`: channels_last, DistributedDataParallel, torch.compile);
- `RunState`: resume and keep-best: the whole state saved after every epoch and restored on a
  restart, the best-by-test-mAP weights kept (train.keep_best), the final checkpoint written;
- `PeriodicEvaluation`: the test-set evaluation before training and every train.eval_every epochs;
- `RunLog`: the run's records, the one place they are written (log.jsonl and the training curve).

Each part does its file work on rank 0 only; every rank keeps the same records and state.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from purireid.data import Record
from purireid.evaluation.inference import evaluate_model
from purireid.evaluation.metrics import HEADLINE_RANKS, headline_metrics
from purireid.evaluation.reporting import plot_training_curve
from purireid.io.checkpoints import clear_state, load_best, load_state, save_best, save_model_checkpoint, save_state
from purireid.io.files import write_jsonl
from purireid.io.runlog import PHASE_UNTRAINED
from purireid.io.tensorboard import write_event_file
from purireid.log import get_logger
from purireid.model.network import build_model
from purireid.runtime.distributed import DistContext, per_process_bn_groups
from purireid.runtime.signals import TerminationRequested, exit_status

log = get_logger("train")


def compiled_network(net: torch.nn.Module, mode: bool | str) -> torch.nn.Module:
    """`net` under torch.compile as train.compile says: False = eager, True = torch.compile's
    default mode, "reduce-overhead" = also CUDA graphs on a GPU. The network (group BatchNorm
    included) traces as one graph forward and backward (tests/test_compile.py holds it to that)."""
    if mode is False:
        return net
    return torch.compile(net, mode=None if mode is True else mode)


@dataclass
class ModelUnderTraining:
    """The model (eager, unwrapped: labelling, evaluation and checkpoints use it), its Adam optimiser
    and its step learning-rate schedule."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR

    @classmethod
    def build(cls, config: Mapping[str, Any], pretrained: str, step_size: int, ctx: DistContext) -> ModelUnderTraining:
        """model.arch from `pretrained` weights on the run's device, BN groups shared among the processes."""
        model_cfg, train_cfg = config["model"], config["train"]
        model = build_model(model_cfg["arch"], pretrained, per_process_bn_groups(model_cfg["bn_groups"], ctx.world_size),
                            input_norm=model_cfg["input_norm"]).to(ctx.device)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                     lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=train_cfg["gamma"])
        return cls(model, optimizer, scheduler)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def for_steps(self, train_cfg: Mapping[str, Any], ctx: DistContext) -> torch.nn.Module:
        """The module the optimiser steps run: the model in channels_last on CUDA when asked, wrapped
        in DistributedDataParallel across processes, compiled with train.compile (the steps only:
        labelling and evaluation use the eager `model`)."""
        device = ctx.device
        if device.type == "cuda" and train_cfg["channels_last"]:
            self.model.to(memory_format=torch.channels_last)
        net: torch.nn.Module = self.model
        if ctx.distributed:
            net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        return compiled_network(net, train_cfg["compile"])


class RunLog:
    """The run's records (one per evaluation or epoch, purireid.io.runlog) and where they are
    written: log.jsonl and the training curve, by rank 0. Every record reaches the files through
    `write`, so another destination is added here."""

    def __init__(self, log_jsonl: str | Path, curve_png: str | Path, title: str, ctx: DistContext) -> None:
        self.log_jsonl, self.curve_png, self.title, self.ctx = log_jsonl, curve_png, title, ctx
        self.records: list[dict] = []

    @property
    def epochs_done(self) -> int:
        return len(self.records) - 1  # the untrained evaluation is no epoch

    def append(self, record: dict) -> None:
        self.records.append(record)

    def write(self, *, curve: bool = True) -> None:
        """The records so far into log.jsonl (and TensorBoard's event file beside it, when the
        optional tensorboard package is installed) and, with `curve`, the training curve (rank 0)."""
        if self.ctx.is_main:
            write_jsonl(self.log_jsonl, self.records)
            write_event_file(self.log_jsonl, self.records)
            if curve:
                plot_training_curve(self.curve_png, self.records, self.title)


class PeriodicEvaluation:
    """The headline test metrics (mAP, mINP, Rank-1/5/10) of the model: before training, and after
    every train.eval_every epochs and the last (never after the student's warm-up epoch). A dataset
    without a labelled query/gallery split (unlabelled crops) is never evaluated."""

    def __init__(self, model: torch.nn.Module, splits: Mapping[str, Sequence[Record]], config: Mapping[str, Any],
                 ctx: DistContext, cache_dir: Path | None) -> None:
        self.model, self.splits, self.config, self.ctx, self.cache_dir = model, splits, config, ctx, cache_dir
        self.every = config["train"]["eval_every"]
        self.labelled = bool(splits["query"]) and bool(splits["gallery"])

    def metrics(self) -> dict:
        # The CMC up to rank 10 is enough for the headline metrics.
        result = evaluate_model(self.model, self.splits, self.config, self.ctx, rerank=self.config["evaluate"]["rerank"],
                                max_rank=max(HEADLINE_RANKS), cache_dir=self.cache_dir)
        return headline_metrics(result)

    def untrained(self, role: str) -> dict:
        """The log record of the model before its first epoch."""
        tic = time.time()
        metrics = self.metrics()
        log.info("%s before training: mAP %.1f%%  Rank-1 %.1f%%", role, 100 * metrics["mAP"], 100 * metrics["rank1"])
        return {"epoch": None, "phase": PHASE_UNTRAINED, **metrics, "seconds": round(time.time() - tic, 2)}

    def due(self, epoch: int, *, last: bool) -> bool:
        return self.labelled and bool(self.every) and epoch >= 0 and ((epoch + 1) % self.every == 0 or last)

    def after_epoch(self, epoch: int) -> dict:
        metrics = self.metrics()
        log.info("epoch %d: mAP %.1f%%  Rank-1 %.1f%%", epoch, 100 * metrics["mAP"], 100 * metrics["rank1"])
        return metrics


class RunState:
    """Resume and keep-best in `state_dir`: after every epoch the whole state (model, optimiser,
    schedule, the log's records, the best mAP) is saved atomically, and a restart with the same
    `fingerprint` continues after the last completed epoch; with train.keep_best the weights of
    the best-by-test-mAP epoch are kept and become the output."""

    def __init__(self, state_dir: str | Path, fingerprint: str, config: Mapping[str, Any], ctx: DistContext,
                 role: str) -> None:
        self.state_dir, self.fingerprint, self.config, self.ctx, self.role = state_dir, fingerprint, config, ctx, role
        self.best_map = -1.0

    def restore(self, trained: ModelUnderTraining, run_log: RunLog, epochs: int) -> int | None:
        """The index of the next epoch after a restored state (the model and the log restored too),
        or None when there is none to resume."""
        state = load_state(self.state_dir, self.fingerprint)
        if state is None:
            log.info("starting %s training (no resume state; %d epochs)", self.role, epochs)
            return None
        trained.load_state_dict(state)
        run_log.records = state["log"]
        self.best_map = state["best_map"]
        log.info("resuming %s from %s: %d of %d epochs done", self.role, self.state_dir, state["next_epoch_index"],
                 epochs)
        return state["next_epoch_index"]

    def keep_if_best(self, model: torch.nn.Module, epoch: int, mAP: float) -> None:
        if self.config["train"]["keep_best"] and mAP > self.best_map and self.ctx.is_main:
            self.best_map = mAP
            save_best(self.state_dir, model, self.config, epoch=epoch, mAP=mAP)

    def save(self, trained: ModelUnderTraining, next_epoch_index: int, records: list[dict]) -> None:
        if self.ctx.is_main:
            save_state(self.state_dir, {"fingerprint": self.fingerprint, **trained.state_dict(),
                                        "next_epoch_index": next_epoch_index, "log": records,
                                        "best_map": self.best_map})

    def stopped(self, exc: TerminationRequested, epochs_done: int) -> SystemExit:
        """The exit of a run stopped by SIGTERM / SIGINT (status 143 / 130), saying what is kept."""
        if epochs_done:
            log.warning("%s: stopping %s; the state after %d completed epochs is kept in %s and a rerun "
                        "resumes there", exc, self.role, epochs_done, self.state_dir)
        else:
            log.warning("%s: stopping %s before its first epoch completed; no state is kept, a rerun starts "
                        "from the beginning", exc, self.role)
        return SystemExit(exit_status(exc.signum))

    def write_output(self, model: torch.nn.Module, model_out: str | Path) -> None:
        """The final checkpoint (the best epoch's weights with train.keep_best), then the state removed (rank 0)."""
        if not self.ctx.is_main:
            return
        best = load_best(self.state_dir) if self.config["train"]["keep_best"] else None
        if best is not None:
            model.load_state_dict(best["state_dict"])
            log.info("output is the best-by-test-mAP checkpoint (epoch %s, mAP %.1f%%)", best["epoch"], 100 * best["mAP"])
        save_model_checkpoint(model_out, model, self.config, role=self.role, epochs=self.config["train"]["epochs"])
        clear_state(self.state_dir)
