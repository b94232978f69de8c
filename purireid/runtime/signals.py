"""Stopping a job on SIGTERM / SIGINT: the exit statuses (143 / 130, i.e. 128 + the signal
number, as a shell reports a process killed by it) and the flag the training loop checks
between steps so that it stops with the last completed epoch's state kept.

A signal to the whole process group (SLURM's scancel and preemption, `timeout`, Ctrl-C) also
reaches the job's helper processes (DataLoader workers). They ignore it (`ignore_stop_signals`,
their worker_init_fn) and the main process, which handles it, shuts them down as it stops;
`stop_signals_blocked` covers the moment between a worker's start and that call.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import types
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum: int) -> int:
    """The status a job stopped by `signum` exits with: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + int(signum)


STOPPED_STATUSES = frozenset(exit_status(s) for s in STOP_SIGNALS)


class TerminationRequested(RuntimeError):
    """SIGTERM/SIGINT (SLURM time-out, preemption, snakemake cancel, Ctrl-C) arrived during training."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class GracefulTermination:
    """Turn SIGTERM/SIGINT into a flag the training loop checks between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulTermination:
        for signum in STOP_SIGNALS:
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
            # A rank that saw no signal itself stops as for SIGTERM (the launcher forwards one).
            signum = self.signum if self.signum is not None else signal.SIGTERM
            name = signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"
            raise TerminationRequested(f"received {name}", signum)

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _raise_exit(signum: int, frame: types.FrameType | None) -> None:
    raise SystemExit(exit_status(signum))


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """Within the block SIGTERM/SIGINT raise SystemExit(143 / 130) at the next Python
    instruction, so `finally` blocks run (temporary files are removed) and the caller sees
    the status. The training loop's GracefulTermination takes over while it runs."""
    previous = {}
    for signum in STOP_SIGNALS:
        try:
            previous[signum] = signal.signal(signum, _raise_exit)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGTERM/SIGINT in the calling (main) thread within the block. Processes forked
    inside inherit the mask, so a stop signal sent to the process group cannot kill a helper
    process before it has called `ignore_stop_signals`; this process receives a signal that
    arrived meanwhile when the block ends."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals() -> None:
    """In a helper process of a job (a DataLoader worker): leave SIGTERM/SIGINT to the job's main
    process, which stops the job and then shuts its helpers down (see the module docstring)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked by stop_signals_blocked: a pending one is discarded
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
