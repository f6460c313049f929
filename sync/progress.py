"""Run progress: a rich progress bar on a terminal, structlog lines otherwise (JSON when not a TTY).

Both implement :class:`sync.dispatch.DispatchObserver`. Totals come from the plan summary, so the ETA is
``remaining IDs / current ID rate``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from sync.logs import get_logger
from sync.records import Attempt, Batch, BatchResult

__all__ = ["BarProgress", "LogProgress", "make_progress"]


class _Counts:
    __slots__ = ("batches", "ids", "requests", "started")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.started = clock()
        self.requests = 0
        self.batches = 0
        self.ids = 0


class LogProgress:
    """One structlog ``run.progress`` line every ``every`` seconds (and none for short runs)."""

    def __init__(
        self,
        *,
        total_ids: int,
        total_requests: int,
        every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        **context: Any,
    ) -> None:
        self._clock = clock
        self._counts = _Counts(clock)
        self._total_ids = total_ids
        self._total_requests = total_requests
        self._every = every
        self._next = self._counts.started + every
        self._log = get_logger(**context)

    def on_batch_start(self, batch: Batch) -> None:
        return None

    def on_attempt(self, attempt: Attempt) -> None:
        self._counts.requests += 1

    def on_batch_done(self, batch: Batch, result: BatchResult) -> None:
        c = self._counts
        c.batches += 1
        c.ids += len(batch.ext_ids)
        now = self._clock()
        if now >= self._next:
            self._next = now + self._every
            elapsed = max(now - c.started, 1e-9)
            rate = c.ids / elapsed
            eta = (self._total_ids - c.ids) / rate if rate > 0 else None
            self._log.info(
                "run.progress",
                ids_done=c.ids,
                ids_total=self._total_ids,
                requests_done=c.requests,
                requests_planned=self._total_requests,
                ids_per_second=round(rate, 1),
                eta_seconds=None if eta is None else round(eta, 1),
            )

    def close(self) -> None:
        return None


class BarProgress:
    """A rich progress bar: IDs and requests done, the ID rate and the ETA."""

    def __init__(self, *, total_ids: int, total_requests: int, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[requests]} requests"),
            TextColumn("{task.fields[rate]} IDs/s"),
            TimeRemainingColumn(),
            console=Console(file=stream or sys.stderr),
            transient=False,
        )
        self._task = self._progress.add_task("IDs", total=max(total_ids, 1), requests=0, rate="-")
        self._requests = 0
        self._ids = 0
        self._started = time.monotonic()
        self._progress.start()

    def on_batch_start(self, batch: Batch) -> None:
        return None

    def on_attempt(self, attempt: Attempt) -> None:
        self._requests += 1

    def on_batch_done(self, batch: Batch, result: BatchResult) -> None:
        self._ids += len(batch.ext_ids)
        elapsed = max(time.monotonic() - self._started, 1e-9)
        self._progress.update(
            self._task,
            advance=len(batch.ext_ids),
            requests=self._requests,
            rate=f"{self._ids / elapsed:,.0f}",
        )

    def close(self) -> None:
        self._progress.stop()


def make_progress(
    *, total_ids: int, total_requests: int, enabled: bool | None = None, **context: Any
) -> BarProgress | LogProgress:
    """A bar when stderr is a terminal (or ``enabled`` is True), else log lines."""
    use_bar = sys.stderr.isatty() if enabled is None else enabled
    if use_bar:
        return BarProgress(total_ids=total_ids, total_requests=total_requests)
    return LogProgress(total_ids=total_ids, total_requests=total_requests, **context)
