"""Human-facing outputs of the stages: the training curve, the CMC curve and the ranked-list
picture (all written atomically; the per-epoch JSON-lines log is purireid.io.files.write_jsonl).

Every picture is sized for the Snakemake report, which shows an image at its natural size,
centred: one larger than the page cannot be scrolled to its top. So pictures
stay within `REPORT_MAX_SIZE` pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from purireid.data import Record
from purireid.io.files import atomic_path
from purireid.io.runlog import PHASE_UNTRAINED, record_phase

RANKED_LIST_LENGTH = 10
# Extra candidates fetched so that same-pid-same-camera matches, which the protocol
# ignores, can be skipped in the picture.
RANKED_LIST_FETCH = 30
# Width x height in pixels a report picture keeps within: a 1366 x 768 laptop screen less the
# report's side menu (~270 px) and the browser's bars.
REPORT_MAX_SIZE = (1040, 600)
FIGURE_DPI = 90

# Label-quality diagnostics of the training log (fractions), plotted when present.
LABEL_QUALITY = (("purity", "cluster purity"), ("nmi", "NMI"), ("ari", "ARI"),
                 ("multi_camera_share", "multi-camera clusters"))
# Plotted instead when no true identity is known: shares and cosine distances (purireid.labels.quality).
LABEL_FREE_QUALITY = (("multi_camera_share", "multi-camera clusters (share)"),
                      ("within_cluster_distance", "distance to own centre"),
                      ("nearest_cluster_distance", "centre to nearest centre"))


def _save_figure(fig: Any, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI)
    plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _epoch_ticks(epochs: Sequence[int], max_ticks: int = 12) -> list[int]:
    """The epochs to label: all of them, or every k-th (and the last) when there are many; a
    thinned axis keeps k epochs clear of the warm-up's label."""
    if len(epochs) <= max_ticks:
        return list(epochs)
    step = math.ceil(len(epochs) / (max_ticks - 1))
    picked = [e for e in epochs if e < 0 or (e % step == 0 and not (-1 in epochs and e < step - 1))]
    last_gap = epochs[-1] - picked[-1]
    if 0 < last_gap < step / 2:  # the last epoch would crowd the tick before it
        picked.pop()
    return picked + ([epochs[-1]] if epochs[-1] not in picked else [])


def lr_drops(records: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """(epoch, factor) where the learning rate (each record's "lr") fell from the epoch before."""
    drops, previous = [], None
    for record in records:
        if record_phase(record) == PHASE_UNTRAINED or record.get("lr") is None:
            continue
        if previous is not None and record["lr"] < previous:
            drops.append((int(record["epoch"]), record["lr"] / previous))
        previous = record["lr"]
    return drops


def _quality_panel(ax: Any, series: Any, *, identities: bool) -> None:
    """The pseudo labels' quality: against the true identities when they are known, else (unlabelled
    crops) what the clusters show by themselves. `series(key)`: (epochs, values) of a logged key."""
    if not identities:
        for key, name in LABEL_FREE_QUALITY:
            ax.plot(*series(key), marker="o", label=name)
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
        ax.set_title("pseudo labels without identities")
        return
    plotted = False
    for key, name in LABEL_QUALITY:
        ex, values = series(key)
        if values:
            ax.plot(ex, values, marker="o", label=name)
            plotted = True
    if plotted:
        ax.legend(fontsize=8)
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
    ax.set_title("pseudo labels vs true identities (fraction)")


def training_curve_figure(records: Sequence[Mapping[str, Any]], title: str) -> Any:
    """The figure `plot_training_curve` saves (matplotlib, not yet closed)."""
    plt = _pyplot()
    trained = [r for r in records if record_phase(r) != PHASE_UNTRAINED]
    untrained = [r for r in records if record_phase(r) == PHASE_UNTRAINED and r.get("mAP") is not None]
    x = [int(r["epoch"]) for r in trained]
    first, last = (min(x), max(x)) if x else (0, 0)
    # The untrained model's own position, a fifth of the axis left of the first epoch: far enough
    # for its label to clear the warm-up's however many epochs follow.
    x_untrained = first - max(1.5, (last - first + 1) / 4)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), sharex=True)
    ax_loss, ax_labels, ax_quality, ax_acc = axes.flat

    def series(key: str) -> tuple[list[int], list[float]]:
        pairs = [(e, r[key]) for e, r in zip(x, trained) if r.get(key) is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    ax_loss.plot(*series("loss"), marker="o")
    ax_loss.set_title("training loss")
    ax_labels.plot(*series("clusters"), marker="o", label="clusters")
    ax_labels.plot(*series("outliers"), marker="x", label="outliers (left out)")
    ax_labels.set_title("pseudo labels (train images)")
    ax_labels.legend(fontsize=8)
    _quality_panel(ax_quality, series, identities=any("purity" in r for r in trained) or not trained)

    ex, maps = series("mAP")
    if maps:
        ax_acc.plot(ex, [100 * v for v in maps], marker="o", color="C0", label="mAP")
        rx, rank1 = series("rank1")
        ax_acc.plot(rx, [100 * v for v in rank1], marker="s", color="C1", label="Rank-1")
    for r in untrained:  # a separate marker, not joined to the training line
        ax_acc.plot([x_untrained], [100 * r["mAP"]], marker="*", markersize=11, color="C0", linestyle="none",
                    label="mAP, untrained")
        if r.get("rank1") is not None:
            ax_acc.plot([x_untrained], [100 * r["rank1"]], marker="P", markersize=9, color="C1", linestyle="none",
                        label="Rank-1, untrained")
    if maps or untrained:
        ax_acc.legend(fontsize=8)
    else:
        ax_acc.text(0.5, 0.5, "no labelled query/gallery split:\nnot evaluated", transform=ax_acc.transAxes,
                    ha="center", va="center", color="0.4")
    ax_acc.set_ylim(bottom=0)
    ax_acc.set_title("query/gallery mAP and Rank-1 (%)")

    # Epoch numbers on the first line of the labels, the untrained model and the warm-up named on
    # the second, so that neither crowds a number.
    ticks = _epoch_ticks(sorted(set(x)))
    labels = ["−1\nwarm-up" if t == -1 else str(t) for t in ticks]
    if untrained:
        ticks, labels = [x_untrained, *ticks], ["\nuntrained", *labels]
    drops = lr_drops(trained)
    for ax in axes.flat:
        if -1 in x:
            ax.axvspan(-1.5, -0.5, color="0.9", zorder=0)
        if untrained:
            ax.axvline((x_untrained + first) / 2, color="0.5", linestyle=":", linewidth=1)
        for epoch, _ in drops:  # the schedule's step, between the last epoch at the old rate and the first at the new
            ax.axvline(epoch - 0.5, color="C3", linestyle="--", linewidth=1, alpha=0.6)
        ax.grid(alpha=0.3)
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels)
    for epoch, factor in drops:
        ax_loss.annotate(f"lr ×{factor:.3g}", (epoch - 0.5, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(3, -3), textcoords="offset points", ha="left", va="top", fontsize=8, color="C3")
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_training_curve(path: str | Path, records: Sequence[Mapping[str, Any]], title: str) -> None:
    """Four panels per epoch: loss; clusters and outliers; pseudo-label quality against the true
    identities (cluster purity, and NMI / ARI / multi-camera share when logged; without
    identities the label-free figures: multi-camera share, distances to the own and the nearest
    cluster centre); query/gallery mAP and Rank-1 (%), or a note when there is no labelled split.

    The untrained model's evaluation is no epoch: it gets its own position, labelled
    "untrained", left of a dotted line. The student's warm-up (epoch -1) is shaded; each fall of
    the learning rate is a dashed red line with its factor ("lr ×0.1").
    """
    _save_figure(training_curve_figure(records, title), path)


def plot_cmc(path: str | Path, cmc: Sequence[float], title: str) -> None:
    """Matching rate against rank, as a PNG; Rank-1/5/10 marked."""
    plt = _pyplot()
    ranks = np.arange(1, len(cmc) + 1)
    rates = 100 * np.asarray(cmc, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    ax.plot(ranks, rates, marker=".")
    for k in (1, 5, 10):
        if k <= len(cmc):
            ax.annotate(f"Rank-{k} {rates[k - 1]:.1f}%", (k, rates[k - 1]), textcoords="offset points",
                        xytext=(6, -12), fontsize=8)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


# --------------------------------------------------------------------------- ranked lists

_MARGIN, _BORDER, _GAP, _SEPARATOR, _BLOCK_GAP = 8, 3, 4, 10, 18
_TITLE_H, _KEY_H, _HEADER_H = 24, 22, 18
FRAME_COLOURS = {"query": "black", "true match": "green", "false match": "red"}


class RankedLayout(NamedTuple):
    """Queries in `blocks` side-by-side blocks of `rows` rows; every image `tile` (w, h) pixels."""

    rows: int
    blocks: int
    tile: tuple[int, int]
    size: tuple[int, int]  # the whole picture, width x height


def _ranked_size(rows: int, blocks: int, tile_w: int, tile_h: int) -> tuple[int, int]:
    cell_w, cell_h = tile_w + 2 * _BORDER + _GAP, tile_h + 2 * _BORDER + _GAP
    block_w = (RANKED_LIST_LENGTH + 1) * cell_w + _SEPARATOR
    width = 2 * _MARGIN + blocks * block_w + (blocks - 1) * _BLOCK_GAP
    height = 2 * _MARGIN + _TITLE_H + _KEY_H + _HEADER_H + rows * cell_h
    return width, height


def ranked_list_layout(num_queries: int, max_size: tuple[int, int] = REPORT_MAX_SIZE,
                       max_tile_height: int = 128, min_tile_height: int = 32) -> RankedLayout:
    """The largest tiles (height = 2 x width, a person's aspect) that fit `num_queries` rows of a
    query and its ranked list into `max_size`, the rows split into side-by-side blocks.
    With so many queries that even the smallest tiles overflow, the picture grows wider only."""
    n = max(1, num_queries)
    best: RankedLayout | None = None
    for rows in range(1, n + 1):
        blocks = math.ceil(n / rows)
        for tile_h in range(max_tile_height, min_tile_height - 1, -2):
            size = _ranked_size(rows, blocks, tile_h // 2, tile_h)
            if size[0] <= max_size[0] and size[1] <= max_size[1]:
                if best is None or tile_h > best.tile[1]:
                    best = RankedLayout(rows, blocks, (tile_h // 2, tile_h), size)
                break
    if best is None:  # too many queries: the smallest tiles, as many rows as the height allows
        tile_h = min_tile_height
        per_row = _ranked_size(1, 1, tile_h // 2, tile_h)[1] - _ranked_size(0, 1, tile_h // 2, tile_h)[1]
        rows = max(1, min(n, (max_size[1] - _ranked_size(0, 1, tile_h // 2, tile_h)[1]) // per_row))
        blocks = math.ceil(n / rows)
        best = RankedLayout(rows, blocks, (tile_h // 2, tile_h), _ranked_size(rows, blocks, tile_h // 2, tile_h))
    return best


def _font(size: int, bold: bool = False) -> ImageFont.ImageFont:
    """DejaVu Sans, which matplotlib ships (so always present), else PIL's default font."""
    try:
        from matplotlib import font_manager

        path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans",
                                                                  weight="bold" if bold else "normal"),
                                     fallback_to_default=True)
        return ImageFont.truetype(path, size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default()


def _strip_cells(layout: RankedLayout) -> tuple[tuple[int, int, int], Image.Image, ImageDraw.ImageDraw]:
    """The cell width and height of one framed image, the width of a row's block (its first image
    and RANKED_LIST_LENGTH more), and a white canvas with its drawing context: what the ranked
    lists and the cluster strips share."""
    width, height = layout.tile
    cell_w, cell_h = width + 2 * _BORDER + _GAP, height + 2 * _BORDER + _GAP
    block_w = (RANKED_LIST_LENGTH + 1) * cell_w + _SEPARATOR
    canvas = Image.new("RGB", layout.size, "white")
    return (cell_w, cell_h, block_w), canvas, ImageDraw.Draw(canvas)


def ranked_list_picture(path: str | Path, data_root: str | Path, query: Sequence[Record], gallery: Sequence[Record],
                        topk_indices: np.ndarray, query_rows: Sequence[int], *, title: str = "ranked lists",
                        max_size: tuple[int, int] = REPORT_MAX_SIZE) -> RankedLayout:
    """One row per query: the query (black frame), then its best gallery images by rank, framed
    green (same identity) or red; same identity in the query's camera is skipped, as the
    protocol does. A title, a colour key and rank numbers on top; sized by `ranked_list_layout`.
    Returns the layout used."""
    layout = ranked_list_layout(len(query_rows), max_size)
    width, height = layout.tile
    (cell_w, cell_h, block_w), canvas, draw = _strip_cells(layout)
    root = Path(data_root)
    title_font, font, small = _font(15, bold=True), _font(13), _font(11)

    draw.text((_MARGIN, _MARGIN), title, fill="black", font=title_font)
    x = _MARGIN
    key_y = _MARGIN + _TITLE_H
    for name, colour in FRAME_COLOURS.items():
        draw.rectangle([x, key_y + 3, x + 12, key_y + 15], outline=colour, width=3)
        draw.text((x + 17, key_y + 1), name, fill="black", font=font)
        x += 17 + int(draw.textlength(name, font=font)) + 14
    draw.text((x, key_y + 2), "(same identity in the query's camera: skipped, as the protocol does)", fill="grey",
              font=small)

    def framed(record: Record, colour: str) -> Image.Image:
        with Image.open(root / record.path) as img:
            return ImageOps.expand(img.convert("RGB").resize((width, height), Image.BICUBIC), border=_BORDER,
                                   fill=colour)

    top = _MARGIN + _TITLE_H + _KEY_H
    for block in range(layout.blocks):
        bx = _MARGIN + block * (block_w + _BLOCK_GAP)
        for column in range(RANKED_LIST_LENGTH + 1):
            label = "query" if column == 0 else str(column)
            cx = bx + column * cell_w + (_SEPARATOR if column else 0) + cell_w // 2 - _GAP // 2
            draw.text((cx - draw.textlength(label, font=small) / 2, top + 2), label, fill="black", font=small)
    for i, q in enumerate(query_rows):
        block, row = divmod(i, layout.rows)
        bx = _MARGIN + block * (block_w + _BLOCK_GAP)
        y = top + _HEADER_H + row * cell_h
        canvas.paste(framed(query[q], FRAME_COLOURS["query"]), (bx, y))
        shown = 0
        for g in topk_indices[q]:
            if g < 0:  # fewer valid gallery images than requested
                break
            match = gallery[g].pid == query[q].pid
            if match and gallery[g].camid == query[q].camid:
                continue  # not counted by the protocol
            colour = FRAME_COLOURS["true match" if match else "false match"]
            canvas.paste(framed(gallery[g], colour), (bx + (shown + 1) * cell_w + _SEPARATOR, y))
            shown += 1
            if shown == RANKED_LIST_LENGTH:
                break
        sx = bx + cell_w + _SEPARATOR // 2 - _GAP // 2
        draw.line([(sx, y), (sx, y + cell_h - _GAP)], fill="grey", width=2)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return layout


class ClusterStrip(NamedTuple):
    """One row of `cluster_strips_picture`: its caption (short lines, e.g. "id 7\n12 images\n3 cameras") and
    the images shown (paths relative to data_root), nearest to the cluster's centre first."""

    caption: str
    paths: Sequence[str]


def cluster_strips_picture(path: str | Path, data_root: str | Path, strips: Sequence[ClusterStrip], *,
                           title: str, max_size: tuple[int, int] = REPORT_MAX_SIZE) -> RankedLayout:
    """One row per pseudo-identity: its caption, then up to RANKED_LIST_LENGTH of its images (as
    the ranked lists are laid out, `ranked_list_layout`), so a person can judge whether each row
    shows one person. Returns the layout used."""
    layout = ranked_list_layout(len(strips), max_size)
    width, height = layout.tile
    (cell_w, cell_h, block_w), canvas, draw = _strip_cells(layout)
    root = Path(data_root)
    title_font, small = _font(15, bold=True), _font(11)
    draw.text((_MARGIN, _MARGIN), title, fill="black", font=title_font)
    draw.text((_MARGIN, _MARGIN + _TITLE_H + 2), "each row: one pseudo-identity, its images from the nearest to "
              "its centre to the farthest", fill="grey", font=small)
    top = _MARGIN + _TITLE_H + _KEY_H + _HEADER_H
    for i, strip in enumerate(strips):
        block, row = divmod(i, layout.rows)
        bx = _MARGIN + block * (block_w + _BLOCK_GAP)
        y = top + row * cell_h
        draw.multiline_text((bx, y), strip.caption, fill="black", font=small, spacing=2)
        for column, image_path in enumerate(strip.paths[:RANKED_LIST_LENGTH]):
            with Image.open(root / image_path) as img:
                tile = ImageOps.expand(img.convert("RGB").resize((width, height), Image.BICUBIC), border=_BORDER,
                                       fill="black")
            canvas.paste(tile, (bx + (column + 1) * cell_w + _SEPARATOR, y))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return layout


# --------------------------------------------------------------------------- ablation and sweeps


def plot_variant_bars(path: str | Path, names: Sequence[str], maps: Sequence[float | None],
                      rank1s: Sequence[float | None], title: str) -> None:
    """mAP and Rank-1 (fractions) of each variant as horizontal bars, first variant on top."""
    plt = _pyplot()
    height = min(REPORT_MAX_SIZE[1] / FIGURE_DPI, 1.4 + 0.42 * len(names))
    fig, ax = plt.subplots(figsize=(7.2, height))
    ys = np.arange(len(names))[::-1]
    for offset, values, label in ((0.2, maps, "mAP"), (-0.2, rank1s, "Rank-1")):
        widths = [0.0 if v is None else 100 * v for v in values]
        bars = ax.barh(ys + offset, widths, height=0.38, label=label)
        ax.bar_label(bars, labels=["—" if v is None else f"{100 * v:.1f}" for v in values], padding=2, fontsize=7)
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_xlabel("%")
    ax.set_xlim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_sweep(path: str | Path, key: str, values: Sequence[Any], maps: Sequence[float | None],
               rank1s: Sequence[float | None], title: str, configured: Any = None) -> None:
    """mAP and Rank-1 (fractions) against the swept value; the configured value marked."""
    plt = _pyplot()
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = list(values) if numeric else list(range(len(values)))
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for series, label in ((maps, "mAP"), (rank1s, "Rank-1")):
        points = [(x, 100 * v) for x, v in zip(xs, series) if v is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if configured is not None and configured in list(values):
        ax.axvline(xs[list(values).index(configured)], color="grey", linestyle=":", label="configured")
    if not numeric:
        ax.set_xticks(xs, [str(v) for v in values])
    ax.set_xlabel(key)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)
