"""Human-readable logging for stage entry points: to the rule's log file and to stderr; and
progress of long work (a bar on a terminal, plain periodic log lines elsewhere)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

LOGGER_NAME = "purireid"


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Send purireid's log records to `log_file` (appending) and to stderr."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a"))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


# Seconds between the plain progress lines written where no terminal shows a bar.
PROGRESS_LOG_INTERVAL_S = 60.0


class Progress:
    """Progress of long work: a tqdm bar on a terminal only (tqdm's ``disable=None``: none
    when stderr is a file, a pipe, nohup, a SLURM log or CI, whose saved text the bar's
    carriage returns would garble), and there a plain log line every `interval` seconds
    instead ("<desc>: 120/200 it (60%), 45 s").

    ``enabled=False`` shows nothing (e.g. the non-zero ranks of a DDP run).
    """

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", enabled: bool = True,
                 interval: float = PROGRESS_LOG_INTERVAL_S, logger: logging.Logger | None = None) -> None:
        from tqdm import tqdm

        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=2.0,
                        disable=None if enabled else True)
        self.plain = enabled and self.bar.disable  # no terminal: log lines instead of a bar
        self.logger = logger or get_logger("progress")
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        if self.plain and time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            of = f"/{self.total}" if self.total else ""
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            self.logger.info("%s: %d%s %s%s, %.0f s", self.desc, self.done, of, self.unit, share,
                             self.last - self.start)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_iter(iterable: Iterable[T], total: int | None, desc: str, **kwargs: Any) -> Iterator[T]:
    """Yield from `iterable` while showing a :class:`Progress` (one step per item)."""
    with Progress(total, desc, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update(1)
