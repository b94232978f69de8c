"""Stage evaluate: query/gallery evaluation of a checkpoint (docs/method.md): eval.json, a CMC plot, ranked lists."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from purireid.data import read_manifest
from purireid.runtime.distributed import DistContext, launch
from purireid.evaluation.metrics import headline_metrics
from purireid.io.files import write_json_atomic
from purireid.log import get_logger
from purireid.io.checkpoints import read_checkpoint, stage_checkpoint_fix
from purireid.evaluation.inference import cache_dir_for, evaluate_model
from purireid.runtime.precision import precision_in_effect
from purireid.evaluation.reporting import RANKED_LIST_FETCH, plot_cmc, ranked_list_picture

log = get_logger("evaluate")

# eval.json's statement of its units (the summary table and the report show percentages).
UNITS = "mAP, mINP, rank1, rank5, rank10 and cmc are fractions in [0, 1]; x100 for %"


def _worker(config: Mapping[str, Any], manifest: Path, checkpoint: Path, eval_json: Path, cmc_png: Path,
            ranked_png: Path, model_name: str, *, ctx: DistContext) -> None:
    splits = read_manifest(manifest)
    stored = read_checkpoint(checkpoint, fix=stage_checkpoint_fix(checkpoint))
    model = stored.model().to(ctx.device)
    settings = config["evaluate"]
    metrics = evaluate_model(model, splits, config, ctx, rerank=settings["rerank"], max_rank=settings["max_rank"],
                             topk=RANKED_LIST_FETCH, cache_dir=cache_dir_for(manifest))
    if not ctx.is_main:
        return
    cmc = [float(c) for c in metrics["cmc"]]
    dataset = config["dataset"]
    result = {
        "dataset": dataset,
        "model": model_name,  # results/<dataset>/<model>/
        "role": stored.extra.get("role"),  # what it was trained as (teacher, student, supervised), if recorded
        "units": UNITS,
        **headline_metrics(metrics),
        "cmc": cmc,
        "num_queries": len(splits["query"]),
        "num_valid_queries": int(metrics["num_valid_queries"]),
        "num_gallery": len(splits["gallery"]),
        "rerank": bool(settings["rerank"]),
        # What was in effect: train.amp is configured everywhere but autocasts on CUDA only.
        "device": ctx.device.type,
        "precision": precision_in_effect(ctx.device, config["train"]["amp"]),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": stored.sha256,
    }
    accuracy = f"mAP {100 * result['mAP']:.1f}%, Rank-1 {100 * result['rank1']:.1f}%"
    plot_cmc(cmc_png, cmc, f"{dataset}: CMC of the {model_name} ({accuracy})")
    count = min(settings["num_ranked_queries"], len(splits["query"]))
    rows = np.linspace(0, len(splits["query"]) - 1, num=count).round().astype(int).tolist() if count else []
    ranked_list_picture(ranked_png, config["data_root"], splits["query"], splits["gallery"],
                        np.asarray(metrics["topk_indices"]), rows,
                        title=f"{dataset}: {model_name}, ranked lists of {count} queries ({accuracy})")
    write_json_atomic(eval_json, result)

    def pct(key: str) -> str:
        return "n/a" if result[key] is None else f"{100 * result[key]:.1f}%"

    log.info("%s (%s): mAP %s  mINP %s  Rank-1 %s  Rank-5 %s  Rank-10 %s (%d queries with a true match)",
             model_name, checkpoint, *(pct(k) for k in ("mAP", "mINP", "rank1", "rank5", "rank10")),
             result["num_valid_queries"])


def run(config: Mapping[str, Any], *, manifest: str | Path, checkpoint: str | Path, eval_json: str | Path,
        cmc_png: str | Path, ranked_png: str | Path, model: str | None = None) -> None:
    """`config`: at least the keys purireid.config.resolve.stage_config(config, "evaluate") holds.
    `model`: the name eval.json and the pictures give the model (default: the checkpoint's
    folder, results/<dataset>/<model>/model.pth)."""
    checkpoint = Path(checkpoint)
    # One process: the rule asks for one GPU (evaluation is a single pass over query + gallery).
    launch(_worker, dict(config), Path(manifest), checkpoint, Path(eval_json), Path(cmc_png), Path(ranked_png),
           model or checkpoint.parent.name, world_size=1, device=config["device"])
