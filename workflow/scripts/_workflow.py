"""Helpers shared by the workflow scripts.

Snakemake puts this folder on ``sys.path`` when it runs a script, so the scripts import it as
``_workflow``; purireid itself is installed in the environment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from purireid.config.resolve import deep_merge, execution_settings
from purireid.io.files import remove_stale_temporaries
from purireid.log import get_logger, setup_logging
from purireid.runtime.signals import STOPPED_STATUSES, exit_on_signals

log = get_logger("workflow")


def known_error(err: BaseException) -> bool:
    """One of the project's own errors, whose message names the file or key and the fix: the rule
    log (and Snakemake's copy of it on the console) holds that one line. Any other keeps its
    traceback, which is what a bug report needs. (Imported here, on failure: the classes' modules
    load torch, which a job that does not compute need not wait for.)"""
    from purireid.config.resolve import ConfigError
    from purireid.data.datasets import DatasetError
    from purireid.evaluation.inference import UnreadableImage
    from purireid.io.checkpoints import CheckpointError
    from purireid.io.features import FeatureFileMismatch
    from purireid.io.files import DiskFullError
    from purireid.labels.sources import DegenerateLabels
    from purireid.runtime.distributed import DeviceUnavailable

    return isinstance(err, (ConfigError, DatasetError, CheckpointError, FeatureFileMismatch, DiskFullError,
                            UnreadableImage, DegenerateLabels, DeviceUnavailable))


def job_config(snakemake: Any) -> dict:
    """The config this job runs with: its rule's `params.config` (the keys that can change its
    outputs, validated once by the workflow) plus the execution-only keys its stage reads."""
    return deep_merge(snakemake.params.config, execution_settings(snakemake.config, snakemake.rule))


def device_in_effect(config: dict) -> str:
    """", device cpu (float32)": where the job computes and in which precision, for its first log
    line (the rule's params show train.amp as configured; it takes effect on CUDA only)."""
    if "device" not in config:
        return ""
    from purireid.runtime.precision import precision_in_effect
    from purireid.runtime.distributed import resolve_device

    device = resolve_device(config["device"])
    amp = config.get("train", {}).get("amp")
    if amp is None:
        return f", device {device.type}"
    unused = "; train.amp applies on CUDA only" if amp and device.type != "cuda" else ""
    return f", device {device.type} ({precision_in_effect(device, amp)}{unused})"


def run_stage(snakemake: Any, body: Callable[[dict], None], *, torch_threads: bool = True) -> None:
    """Log to the rule's log file and run `body(job_config(snakemake))`.

    First the hidden temporaries a killed run of this job left beside its outputs and in its
    state folder (`params.state_dir`) are removed. A failure is logged to the rule's log file and
    to stderr, one line for the project's own errors (known_error), with its traceback for any
    other, and the job exits with status 1. SIGTERM / SIGINT stop
    the job with status 143 / 130 and a warning, no traceback (a training job keeps its last
    epoch's state and resumes).
    """
    setup_logging(snakemake.log[0])
    wildcards = dict(snakemake.wildcards.items())
    name = snakemake.rule + (f" ({wildcards['model']})" if "model" in wildcards else "")
    if "/variants/" in wildcards.get("run", ""):  # a variant of the ablation or a sweep point
        name += f" [variant {wildcards['run'].rsplit('/', 1)[-1]}]"
    try:
        with exit_on_signals():
            state_dir = snakemake.params.get("state_dir")
            stale = remove_stale_temporaries(list(snakemake.output), [state_dir] if state_dir else [])
            if stale:
                log.info("%s: removed %d temporary file(s) an interrupted run left: %s", name, len(stale),
                         ", ".join(map(str, stale)))
            config = job_config(snakemake)
            if torch_threads:
                import torch

                torch.set_num_threads(snakemake.threads)
            log.info("%s: %d thread(s)%s, outputs %s", name, snakemake.threads,
                     device_in_effect(config) if torch_threads else "", list(snakemake.output))
            body(config)
    except KeyboardInterrupt:
        log.warning("%s: stopped by SIGINT", name)
        raise SystemExit(130) from None
    except SystemExit as stop:
        if not stop.code:
            raise
        if stop.code in STOPPED_STATUSES:
            log.warning("%s: stopped by %s (exit status %d)", name, "SIGINT" if stop.code == 130 else "SIGTERM",
                        stop.code)
            raise
        log.exception("%s failed: exit status %s", name, stop.code)
        raise SystemExit(1) from None
    except BaseException as err:  # noqa: BLE001 - logged, then the job fails
        (log.error if known_error(err) else log.exception)("%s failed: %s", name, err)
        raise SystemExit(1) from None
    log.info("%s: done", name)
