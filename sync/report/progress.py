"""Run progress: a rich progress bar on a terminal, structlog lines otherwise (JSON when not a TTY).

Both implement :class:`sync.dispatch.dispatch.DispatchObserver` and share one :class:`_Tracker`. The ETA is counted in
*requests* (planned batches), not IDs: the rate budgets limit requests, and IDs per request vary by endpoint (an
opt-out batch of 3 IDs costs as much budget as a tag batch of 1000), so an ID-based ETA jumped as the mix changed.
The rate is the batches finished over the last ``window`` seconds, so it follows the budget the run gets now
rather than the average since a slow start.

The totals may be unknown when sending starts (a changes run sends while the rest of its input is settled,
:mod:`sync.planning.planning`): they are ``None`` until :meth:`set_totals` fills them in; no ETA is shown until then.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

from sync.logs import get_logger
from sync.records import Attempt, AttemptOutcome, Batch, BatchResult, BatchStatus, Phase

__all__ = ["BarProgress", "LogProgress", "make_progress"]

_PHASE_NAMES = {Phase.OPT_OUT: "opt-outs", Phase.CHANGES: "changes", Phase.DELETIONS: "deletions"}


class _Tracker:
    """What both progress views show: counts, the current phase and a requests-based ETA."""

    __slots__ = (
        "_clock",
        "_recent",
        "_window",
        "batches",
        "failed",
        "ids",
        "phase",
        "rate_limited",
        "rejected",
        "requests",
        "started",
        "total_ids",
        "total_requests",
    )

    def __init__(
        self, total_ids: int | None, total_requests: int | None, clock: Callable[[], float], window: float
    ) -> None:
        self._clock = clock  # monotonic seconds; injectable so tests never sleep
        self._window = window  # seconds of history behind the current rate
        self._recent: deque[tuple[float, int]] = deque()  # (time, batches done) samples within the window
        self.started = clock()
        self.total_ids = total_ids
        self.total_requests = total_requests  # planned batches: one request each unless retried or split
        self.requests = 0  # HTTP attempts, retries included
        self.batches = 0  # planned batches finished (ok, rejected or failed)
        self.ids = 0
        self.failed = 0  # batches that failed after every retry
        self.rejected = 0  # IDs the platform refused
        self.rate_limited = 0  # 429 answers
        self.phase = ""

    def attempt(self, attempt: Attempt) -> None:
        self.requests += 1
        if attempt.outcome is AttemptOutcome.RATE_LIMITED:
            self.rate_limited += 1

    def start(self, batch: Batch) -> None:
        self.phase = _PHASE_NAMES.get(batch.phase, str(batch.phase))

    def done(self, batch: Batch, result: BatchResult) -> float:
        self.batches += 1
        self.ids += len(batch.ext_ids)
        self.rejected += len(result.rejected)
        if result.status is BatchStatus.FAILED:
            self.failed += 1
        now = self._clock()
        self._recent.append((now, self.batches))
        while len(self._recent) > 1 and self._recent[0][0] < now - self._window:
            self._recent.popleft()
        return now

    def rate(self, now: float) -> float:
        """Batches (≈ requests) per second over the window; since the start while the window is not full."""
        if len(self._recent) > 1 and now - self._recent[0][0] >= self._window / 2:
            t0, n0 = self._recent[0]
            return (self.batches - n0) / max(now - t0, 1e-9)
        return self.batches / max(now - self.started, 1e-9)

    def eta(self, now: float) -> float | None:
        rate = self.rate(now)
        if self.total_requests is None or rate <= 0:
            return None
        return max(self.total_requests - self.batches, 0) / rate


class LogProgress:
    """A structlog ``run.progress`` line when the first batch is answered (the log then shows when sending
    really began), and one every ``every`` seconds after that."""

    def __init__(
        self,
        *,
        total_ids: int | None,
        total_requests: int | None,
        every: float = 10.0,
        window: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        **context: Any,
    ) -> None:
        self._t = _Tracker(total_ids, total_requests, clock, window)
        self._every = every
        self._next = self._t.started  # the first answered batch logs at once
        self._log = get_logger(**context)

    def on_batch_start(self, batch: Batch) -> None:
        self._t.start(batch)

    def on_attempt(self, attempt: Attempt) -> None:
        self._t.attempt(attempt)

    def on_batch_done(self, batch: Batch, result: BatchResult) -> None:
        t = self._t
        now = t.done(batch, result)
        if now >= self._next:
            self._next = now + self._every
            eta = t.eta(now)
            self._log.info(
                "run.progress",
                phase=t.phase,
                batches_done=t.batches,
                requests_done=t.requests,
                requests_planned=t.total_requests,
                ids_done=t.ids,
                ids_total=t.total_ids,
                ids_per_second=round(t.ids / max(now - t.started, 1e-9), 1),
                requests_per_second=round(t.rate(now), 2),
                ids_refused=t.rejected,
                batches_failed=t.failed,
                rate_limited=t.rate_limited,
                eta_seconds=None if eta is None else round(eta, 1),
            )

    def set_totals(self, total_ids: int, total_requests: int) -> None:
        """The run's totals, once known (see the module docstring)."""
        self._t.total_ids, self._t.total_requests = total_ids, total_requests

    def close(self) -> None:
        return None


class BarProgress:
    """A rich progress bar over the planned requests: the phase, IDs, 429s, refusals, failures and the ETA."""

    def __init__(
        self,
        *,
        total_ids: int | None,
        total_requests: int | None,
        stream: TextIO | None = None,
        window: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn

        self._t = _Tracker(total_ids, total_requests, clock, window)
        self._progress = Progress(
            TextColumn("[bold]{task.fields[phase]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("requests"),
            TaskProgressColumn(),
            TextColumn("{task.fields[ids]} IDs"),
            TextColumn("{task.fields[problems]}"),
            TextColumn("ETA {task.fields[eta]}"),
            console=Console(file=stream or sys.stderr),
            transient=False,
        )
        self._task = self._progress.add_task(
            "requests",
            total=None if total_requests is None else max(total_requests, 1),
            phase="starting",
            ids="0",
            problems="",
            eta="-",
        )
        self._progress.start()

    def on_batch_start(self, batch: Batch) -> None:
        self._t.start(batch)
        self._progress.update(self._task, phase=self._t.phase)

    def on_attempt(self, attempt: Attempt) -> None:
        self._t.attempt(attempt)

    def on_batch_done(self, batch: Batch, result: BatchResult) -> None:
        t = self._t
        now = t.done(batch, result)
        problems = [
            f"{n:,} {what}"
            for n, what in ((t.rate_limited, "429s"), (t.rejected, "refused"), (t.failed, "failed"))
            if n
        ]
        self._progress.update(
            self._task,
            completed=t.batches,
            phase=t.phase,
            ids=f"{t.ids:,}/{t.total_ids:,}" if t.total_ids is not None else f"{t.ids:,}",
            problems=" · ".join(problems),
            eta=_clock_text(t.eta(now)),
        )

    def set_totals(self, total_ids: int, total_requests: int) -> None:
        """The run's totals, once known (see the module docstring)."""
        self._t.total_ids, self._t.total_requests = total_ids, total_requests
        self._progress.update(self._task, total=max(total_requests, 1))

    def close(self) -> None:
        self._progress.stop()


def _clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def make_progress(
    *, total_ids: int | None, total_requests: int | None, enabled: bool | None = None, **context: Any
) -> BarProgress | LogProgress:
    """A bar when stderr is a terminal (or ``enabled`` is True), else log lines."""
    use_bar = sys.stderr.isatty() if enabled is None else enabled
    if use_bar:
        return BarProgress(total_ids=total_ids, total_requests=total_requests)
    return LogProgress(total_ids=total_ids, total_requests=total_requests, **context)
