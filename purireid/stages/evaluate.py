"""Stage: query/gallery evaluation of a checkpoint (SPEC §8): eval.json, a CMC plot, ranked lists."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from purireid.data import Record, read_manifest
from purireid.distributed import DistContext, launch
from purireid.io import atomic_path, sha256_file, write_json_atomic
from purireid.log import get_logger
from purireid.stages.common import load_model_checkpoint, write_resolved_config
from purireid.stages.trainer import cache_dir_for, evaluate_model

log = get_logger("evaluate")

RANKED_LIST_LENGTH = 10
# Extra candidates fetched so that same-pid-same-camera matches, which the protocol
# ignores, can be skipped in the picture.
RANKED_LIST_FETCH = 30


def plot_cmc(path: str | Path, cmc: Sequence[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = np.arange(1, len(cmc) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(ranks, 100 * np.asarray(cmc), marker=".")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def ranked_list_picture(path: str | Path, data_root: str | Path, query: Sequence[Record], gallery: Sequence[Record],
                        topk_indices: np.ndarray, query_rows: Sequence[int], *, tile: tuple[int, int] = (64, 128)) -> None:
    """One row per query: the query, then its top gallery images framed green (match) or red."""
    width, height = tile
    border, gap = 4, 6
    cell_w, cell_h = width + 2 * border, height + 2 * border
    canvas = Image.new("RGB", (gap + (cell_w + gap) * (RANKED_LIST_LENGTH + 1) + gap,
                               gap + (cell_h + gap) * max(1, len(query_rows))), "white")
    draw = ImageDraw.Draw(canvas)
    root = Path(data_root)

    def framed(record: Record, colour: str) -> Image.Image:
        with Image.open(root / record.path) as img:
            return ImageOps.expand(img.convert("RGB").resize((width, height), Image.BICUBIC), border=border, fill=colour)

    for row, q in enumerate(query_rows):
        y = gap + row * (cell_h + gap)
        canvas.paste(framed(query[q], "black"), (gap, y))
        shown = 0
        for g in topk_indices[q]:
            if g < 0:  # fewer valid gallery images than requested
                break
            match = gallery[g].pid == query[q].pid
            if match and gallery[g].camid == query[q].camid:
                continue  # not counted by the protocol
            x = gap + (shown + 1) * (cell_w + gap) + gap
            canvas.paste(framed(gallery[g], "green" if match else "red"), (x, y))
            shown += 1
            if shown == RANKED_LIST_LENGTH:
                break
        draw.line([(cell_w + gap + gap // 2 + 1, y), (cell_w + gap + gap // 2 + 1, y + cell_h)], fill="grey", width=2)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def _worker(config: Mapping[str, Any], manifest: Path, checkpoint: Path, eval_json: Path, cmc_png: Path,
            ranked_png: Path, *, ctx: DistContext) -> None:
    splits = read_manifest(manifest)
    model = load_model_checkpoint(checkpoint, ctx.device)
    metrics = evaluate_model(model, splits, config, ctx, topk=RANKED_LIST_FETCH, cache_dir=cache_dir_for(manifest))
    if not ctx.is_main:
        return
    cmc = [float(c) for c in metrics["cmc"]]
    result = {
        "mAP": float(metrics["mAP"]),
        "rank1": cmc[0],
        "rank5": cmc[min(4, len(cmc) - 1)],
        "rank10": cmc[min(9, len(cmc) - 1)],
        "cmc": cmc,
        "num_queries": len(splits["query"]),
        "num_valid_queries": int(metrics["num_valid_queries"]),
        "num_gallery": len(splits["gallery"]),
        "rerank": bool(config["evaluate"]["rerank"]),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
    }
    title = f"{config['dataset']}: {checkpoint.parent.name} (mAP {100 * result['mAP']:.1f}%)"
    plot_cmc(cmc_png, cmc, title)
    count = min(config["evaluate"]["num_ranked_queries"], len(splits["query"]))
    rows = np.linspace(0, len(splits["query"]) - 1, num=count).round().astype(int).tolist() if count else []
    ranked_list_picture(ranked_png, config["data_root"], splits["query"], splits["gallery"],
                        np.asarray(metrics["topk_indices"]), rows)
    write_resolved_config(eval_json, config)
    write_json_atomic(eval_json, result)
    log.info("%s: mAP %.1f%%  Rank-1 %.1f%%  Rank-5 %.1f%%  Rank-10 %.1f%% (%d queries)", checkpoint,
             100 * result["mAP"], 100 * result["rank1"], 100 * result["rank5"], 100 * result["rank10"],
             result["num_queries"])


def run(config: Mapping[str, Any], *, manifest: str | Path, checkpoint: str | Path, eval_json: str | Path,
        cmc_png: str | Path, ranked_png: str | Path) -> None:
    # One process: the rule asks for one GPU (evaluation is a single pass over query + gallery).
    launch(_worker, dict(config), Path(manifest), Path(checkpoint), Path(eval_json), Path(cmc_png), Path(ranked_png),
           world_size=1, device=config["device"])
