"""Helpers shared by the workflow scripts.

Snakemake puts this folder on ``sys.path`` when it runs a script, so the scripts import it as
``_workflow``; purireid itself is installed in the environment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from purireid.config import resolve_config
from purireid.log import get_logger, setup_logging

log = get_logger("workflow")


def run_stage(snakemake: Any, body: Callable[[dict], None], *, torch_threads: bool = True) -> None:
    """Log to the rule's log file, resolve the config and run `body(config)`.

    A failure is logged (with its traceback) to the rule's log file and to stderr, and the
    job exits with status 1.
    """
    setup_logging(snakemake.log[0])
    name = snakemake.rule + (f" ({snakemake.wildcards.model})" if "model" in snakemake.wildcards.keys() else "")
    try:
        config = resolve_config(snakemake.config)
        if torch_threads:
            import torch

            torch.set_num_threads(snakemake.threads)
        log.info("%s: %d thread(s), outputs %s", name, snakemake.threads, list(snakemake.output))
        body(config)
    except BaseException as err:  # noqa: BLE001 - logged, then the job fails
        if isinstance(err, SystemExit) and not err.code:
            raise
        log.exception("%s failed: %s", name, err)
        raise SystemExit(1) from None
    log.info("%s: done", name)
