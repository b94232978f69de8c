"""benchmarks/bench_dispatch.py: the table of aten ops per step, and the host-work targets it
measures (counts, not timings: the same on every machine with this torch)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_dispatch  # noqa: E402


def test_prints_the_table_from_the_trainers_step(capsys):
    rows = bench_dispatch.main(["--arch", "resnet18", "--ids", "2", "--instances", "4", "--size", "32", "16",
                                "--augment-batches", "8", "16"])
    printed = capsys.readouterr().out
    assert printed.startswith("machine: ") and "batch 8 = 2 x 4" in printed
    for name, count in rows.items():
        assert f"| {name} | {count.total:,} | {count.non_view:,} |" in printed
        assert 0 < count.non_view <= count.total
    step = rows["train_one_epoch, resnet18, bn_groups: 4"]
    assert step.ops["native_group_norm"] == step.ops["native_group_norm_backward"] > 0


def test_the_market_recipes_step_meets_the_host_work_targets():
    """ResNet-50, batch 256 = 16 x 16, the memory term on all views (16 update rounds), Adam with
    foreach: the whole step with bn_groups 4 and the augmentation <= 2,500 aten ops, bn_groups 4
    <= 1.3 x bn_groups 1, the augmentation <= 40 at any batch size (tiny images: the counts do not
    depend on the size)."""
    plain = bench_dispatch.step_ops("resnet50", 1, 16, 16, (32, 16))
    grouped = bench_dispatch.step_ops("resnet50", 4, 16, 16, (32, 16))
    augment = {batch: bench_dispatch.augment_ops(batch).total for batch in (32, 256, 512)}
    assert len(set(augment.values())) == 1 and augment[256] <= 40, augment
    assert grouped.total + augment[256] <= 2500, (grouped.total, grouped.top(10))
    assert grouped.total <= 1.3 * plain.total, (grouped.total, plain.total)
