"""Counting the tensor ops a piece of code dispatches: every aten op is host work (a few µs in
eager mode) and, on an accelerator, a kernel launch for all but the views. The count does not
depend on the tensors' sizes, so it is measured exactly on a CPU with tiny inputs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCount", "count_ops"]


@dataclass
class OpCount:
    """The aten ops dispatched, by name, and how many of them were views (no kernel)."""

    ops: Counter = field(default_factory=Counter)
    views: int = 0

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def non_view(self) -> int:
        return self.total - self.views

    def top(self, k: int = 5) -> str:
        """The k most frequent ops, e.g. "select 1,120, view 348"."""
        return ", ".join(f"{name} {n:,}" for name, n in self.ops.most_common(k))


class _Counter(TorchDispatchMode):
    def __init__(self, tally: OpCount) -> None:
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.tally.ops[func.overloadpacket.__name__] += 1
        self.tally.views += bool(func.is_view)
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> OpCount:
    """Run `fn()` and count the aten ops it dispatches (autograd's backward included when `fn`
    calls it; ops run inside another op's kernel are that op's, as on a device)."""
    tally = OpCount()
    with _Counter(tally):
        fn()
    return tally
