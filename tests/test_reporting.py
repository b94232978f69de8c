"""What a researcher looks at: the training curve, the ranked-list picture (sized for the report on
a laptop screen) and progress output that stays readable in a saved log (no carriage returns)."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from purireid.data import Record
from purireid.log import Progress, progress_iter
from purireid.evaluation.reporting import (
    REPORT_MAX_SIZE,
    lr_drops,
    plot_training_curve,
    ranked_list_layout,
    ranked_list_picture,
    training_curve_figure,
)


def student_log():
    untrained = {"epoch": None, "phase": "untrained", "mAP": 0.30, "mINP": 0.1, "rank1": 0.5, "rank5": 0.7,
                 "rank10": 0.8}
    epochs = [{"epoch": e, "phase": "warmup" if e < 0 else "train", "loss": 2.0 - 0.1 * e, "clusters": 10 + e,
               "outliers": 5, "purity": 0.6 + 0.05 * e, "nmi": 0.7, "ari": 0.4, "multi_camera_share": 0.9,
               "mAP": None if e < 0 else 0.4 + 0.05 * e, "rank1": None if e < 0 else 0.6}
              for e in (-1, 0, 1, 2)]
    return [untrained, *epochs]


def test_training_curve_fits_the_report(tmp_path):
    path = tmp_path / "curve.png"
    plot_training_curve(path, student_log(), "student (synthetic)")
    with Image.open(path) as img:
        assert img.width <= REPORT_MAX_SIZE[0] and img.height <= REPORT_MAX_SIZE[1]
    # a log without diagnostics or evaluations (the first epoch of a run) still plots
    plot_training_curve(path, [{"epoch": 0, "phase": "train", "loss": 1.0, "clusters": 3, "outliers": 0,
                                "purity": None, "mAP": None, "rank1": None}], "teacher")
    assert path.stat().st_size > 1000


def training_log(epochs: int, *, warmup: bool, step_size: int, lr: float = 1e-3) -> list[dict]:
    """A log as the trainer writes it: the untrained evaluation, then one record per epoch with its
    learning rate (StepLR: x0.1 every `step_size` epochs, the warm-up counted first)."""
    records = [{"epoch": None, "phase": "untrained", "mAP": 0.1, "rank1": 0.2}]
    for k, epoch in enumerate(range(-1 if warmup else 0, epochs)):
        records.append({"epoch": epoch, "phase": "warmup" if epoch < 0 else "train", "loss": 3.0 - 0.01 * k,
                        "clusters": 20, "outliers": 5, "purity": 0.7, "lr": lr * 0.1 ** (k // step_size),
                        "mAP": 0.3 if epoch >= 0 else None, "rank1": 0.4 if epoch >= 0 else None})
    return records


@pytest.mark.parametrize(("epochs", "warmup", "step_size", "drops"), [
    (8, True, 6, [5]),            # the demo's student: its rate falls after the warm-up and 5 epochs
    (8, False, 20, []),           # the demo's teacher
    (50, False, 20, [20, 40]),    # the paper's teacher
    (50, True, 20, [19, 39]),     # the paper's student (its warm-up counts as a step)
])
def test_training_curve_labels_apart_and_lr_drops_marked(epochs, warmup, step_size, drops):
    """No two x labels overlap ("untrained" and the warm-up's used to), and each fall of the
    learning rate is marked where the log's lr changes."""
    records = training_log(epochs, warmup=warmup, step_size=step_size)
    assert [epoch for epoch, _ in lr_drops(records)] == drops
    fig = training_curve_figure(records, "student (synthetic)")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes[2:]:  # the bottom row carries the labels
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.get_xticklabels() if t.get_text()]
            assert "\nuntrained" in [text for text, _ in boxes]
            assert ("−1\nwarm-up" in [text for text, _ in boxes]) == warmup
            for k, (text, box) in enumerate(boxes):
                for other, other_box in boxes[k + 1:]:
                    assert not box.overlaps(other_box), (text, other)
        marked = sorted({line.get_xdata()[0] for line in fig.axes[0].lines if line.get_linestyle() == "--"})
        assert marked == [epoch - 0.5 for epoch in drops]
        assert [t.get_text() for t in fig.axes[0].texts] == ["lr ×0.1"] * len(drops)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


@pytest.mark.parametrize("num_queries", [1, 2, 4, 8, 12])
def test_ranked_layout_fits_a_laptop_screen(num_queries):
    layout = ranked_list_layout(num_queries)
    width, height = layout.size
    assert width <= REPORT_MAX_SIZE[0] and height <= REPORT_MAX_SIZE[1], layout
    assert layout.rows * layout.blocks >= num_queries and layout.tile[1] == 2 * layout.tile[0]
    assert layout.tile[1] >= 64 or num_queries > 8  # the default 8 queries stay legible


def test_ranked_layout_never_taller_than_the_screen_with_many_queries():
    layout = ranked_list_layout(60)
    assert layout.size[1] <= REPORT_MAX_SIZE[1] and layout.rows * layout.blocks >= 60


def test_ranked_list_picture(tmp_path):
    colours = {1: (200, 30, 30), 2: (30, 200, 30), 3: (30, 30, 200)}
    for pid, colour in colours.items():
        for cam in (0, 1):
            Image.new("RGB", (32, 64), colour).save(tmp_path / f"{pid}_{cam}.png")
    query = [Record(f"{pid}_0.png", pid, 0) for pid in colours]
    gallery = [Record(f"{pid}_{cam}.png", pid, cam) for pid in colours for cam in (0, 1)]
    # query 0: gallery 0 (same pid, same camera) is skipped; gallery 1 is its match
    topk = np.array([[0, 1, 2, 3, 4, 5, -1, -1]] * 3)
    out = tmp_path / "ranked.png"
    layout = ranked_list_picture(out, tmp_path, query, gallery, topk, [0, 1, 2], title="synthetic: teacher")
    with Image.open(out) as img:
        assert img.size == layout.size
        rgb = np.asarray(img.convert("RGB"))
    # the title and the key are drawn above the first row (dark text pixels at the top)
    assert (rgb[:30].min(axis=2) < 100).any()
    # row 0's first ranked image is gallery 1 (pid 1's colour), framed green: a true match
    tile_w, tile_h = layout.tile
    top = 8 + 24 + 22 + 18
    x0 = 8 + (tile_w + 6 + 4) + 10  # after the query cell and the separator
    assert tuple(rgb[top + tile_h // 2, x0 + 3 + tile_w // 2]) == colours[1]
    assert tuple(rgb[top + tile_h // 2, x0 + 1]) == (0, 128, 0)


def test_progress_logs_plain_lines_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="purireid")
    with Progress(4, "epoch 3", interval=0.0) as bar:  # pytest's stderr is no terminal
        for _ in range(4):
            bar.update()
    assert bar.plain
    assert [r.getMessage().split(",")[0] for r in caplog.records][-1] == "epoch 3: 4/4 it (100%)"
    assert list(progress_iter(range(3), 3, "x", enabled=False)) == [0, 1, 2]


def test_progress_writes_no_carriage_return_to_a_redirected_stderr(tmp_path):
    """`make demo > run.log 2>&1`: stderr is a file, so no bar (whose \\r would garble the file)."""
    code = ("from purireid.log import setup_logging, progress_iter\n"
            "setup_logging(None)\n"
            "for _ in progress_iter(range(50), 50, 'epoch 0', interval=0.0): pass\n")
    with open(tmp_path / "run.log", "w") as log:
        subprocess.run([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, check=True, timeout=120)
    text = (tmp_path / "run.log").read_text()
    assert "\r" not in text
    assert "epoch 0: 50/50 it (100%)" in text
