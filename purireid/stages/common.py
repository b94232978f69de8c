"""What every stage entry point shares: checkpoints, resume state, termination, logs, plots."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from purireid import __version__
from purireid.data import Record
from purireid.io import torch_save_atomic, write_text_atomic, write_yaml_atomic
from purireid.log import get_logger
from purireid.models import build_model

log = get_logger("stages")

STATE_FILE = "state.pth"


# --------------------------------------------------------------------------- config, seeds


def write_resolved_config(output: str | Path, config: Mapping[str, Any]) -> Path:
    """Write the fully resolved config beside `output` (as <output dir>/config.yaml)."""
    target = Path(output).parent / "config.yaml"
    write_yaml_atomic(target, dict(config))
    return target


def config_fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-able parts (config sections, input hashes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- model checkpoints


def save_model_checkpoint(path: str | Path, model: torch.nn.Module, config: Mapping[str, Any], **extra: Any) -> None:
    """The stage output: weights plus what is needed to rebuild the model."""
    model = getattr(model, "module", model)
    torch_save_atomic(
        {
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "arch": config["model"]["arch"],
            "feat_dim": int(model.feat_dim),
            "config": dict(config),
            "purireid_version": __version__,
            **extra,
        },
        path,
    )


def load_model_checkpoint(path: str | Path, device: torch.device, bn_groups: int = 1) -> torch.nn.Module:
    """Rebuild a model from a stage checkpoint (random init, then the stored weights)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; run the stage that writes it first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        arch, state_dict = checkpoint["arch"], checkpoint["state_dict"]
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable purireid checkpoint ({exc}); rerun the stage that writes it") from exc
    model = build_model(arch, pretrained="none", bn_groups=bn_groups)
    model.load_state_dict(state_dict)
    return model.to(device)


# --------------------------------------------------------------------------- resume state


def save_state(state_dir: str | Path, state: Mapping[str, Any]) -> None:
    torch_save_atomic(dict(state), Path(state_dir) / STATE_FILE)


def load_state(state_dir: str | Path, fingerprint: str) -> dict | None:
    """The saved training state, or None when absent or made by another config/input."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        log.warning("ignoring unreadable resume state %s (%s); starting from scratch", path, exc)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("resume state %s was made with another config or inputs; starting from scratch", path)
        return None
    return state


def clear_state(state_dir: str | Path) -> None:
    path = Path(state_dir) / STATE_FILE
    if path.exists():
        path.unlink()
    best = Path(state_dir) / "best.pth"
    if best.exists():
        best.unlink()
    try:
        Path(state_dir).rmdir()
    except OSError:
        pass


class TerminationRequested(RuntimeError):
    """SIGTERM (SLURM time-out, preemption, snakemake cancel) arrived during training."""


class GracefulTermination:
    """Turn SIGTERM/SIGINT into a flag the training loop checks between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulTermination:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.signum = signum

    def check(self, ctx: Any = None) -> None:
        """Raise TerminationRequested once a signal arrived; with a DistContext, on every rank
        as soon as any rank received one (so no rank is left waiting in a collective)."""
        requested = self.signum is not None
        if ctx is not None:
            requested = ctx.any_true(requested)
        if requested:
            name = signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"
            raise TerminationRequested(f"received {name}")

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


# --------------------------------------------------------------------------- logs and plots


def write_jsonl(path: str | Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite the whole per-epoch log atomically (it is small), so it is never half a line."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def plot_training_curve(path: str | Path, records: Sequence[Mapping[str, Any]], title: str) -> None:
    """Loss, number of clusters and mAP per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r for r in records if isinstance(r.get("epoch"), int)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = [r["epoch"] for r in epochs]
    axes[0].plot(x, [r["loss"] for r in epochs], marker="o")
    axes[0].set_title("loss")
    axes[1].plot(x, [r["clusters"] for r in epochs], marker="o", label="clusters")
    axes[1].plot(x, [r["outliers"] for r in epochs], marker="x", label="outliers")
    axes[1].set_title("pseudo labels")
    axes[1].legend()
    evaluated = [r for r in records if r.get("mAP") is not None]
    if evaluated:
        ex = [r["epoch"] if isinstance(r.get("epoch"), int) else (x[0] - 1 if x else -1) for r in evaluated]
        axes[2].plot(ex, [100 * r["mAP"] for r in evaluated], marker="o", label="mAP")
        axes[2].plot(ex, [100 * r["rank1"] for r in evaluated], marker="s", label="Rank-1")
        axes[2].legend()
    axes[2].set_title("test accuracy (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    from purireid.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def cluster_purity(labels: np.ndarray, pids: np.ndarray) -> float | None:
    """Share of clustered images whose true pid is their cluster's majority pid (diagnostic only)."""
    mask = labels >= 0
    if not mask.any():
        return None
    lab, pid = labels[mask], pids[mask]
    _, pid_codes = np.unique(pid, return_inverse=True)
    counts = np.zeros((lab.max() + 1, pid_codes.max() + 1), dtype=np.int64)
    np.add.at(counts, (lab, pid_codes), 1)
    return float(counts.max(axis=1).sum() / mask.sum())


def records_arrays(records: Sequence[Record]) -> tuple[list[str], np.ndarray, np.ndarray]:
    return ([r.path for r in records], np.array([r.pid for r in records], dtype=np.int64),
            np.array([r.camid for r in records], dtype=np.int64))


def dump_yaml(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(config), sort_keys=False)
