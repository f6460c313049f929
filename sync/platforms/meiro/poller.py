"""Waiting for a Meiro push-notification export to end (finished, error or canceled), with progress.

:func:`wait_for_export` polls ``GET .../exports/{id}`` every ``interval`` seconds. A retryable failure (429,
5xx, time-out, dropped connection) backs off per :class:`sync.config.RetryPolicy` — full jitter, Retry-After
honoured — and polling resumes after a success; ``max_attempts`` failures *in a row* end the wait with the
last error. Fatal errors (401 after a new login, 403, 404) propagate at once. Time (``clock``, ``sleep``) and
randomness are injectable, so tests never sleep for real.

Each wait ends in a :class:`ExportWait` record, which a :class:`WaitRecorder` stores: the run ledger
(:meth:`sync.ledger.Ledger.record_export_wait`), or a :class:`MemoryRecorder` in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from sync.config import RetryPolicy
from sync.errors import FatalPlatformError, PlatformError, RetryableError
from sync.platforms.meiro import Export, ExportStatus, MessageCounts
from sync.platforms.meiro.client import MeiroClient
from sync.platforms.retrying import Sleep, backoff_delay
from sync.redact import redact

__all__ = [
    "ExportWait",
    "MemoryRecorder",
    "ProgressCallback",
    "WaitOutcome",
    "WaitRecorder",
    "wait_for_export",
]


class WaitOutcome(StrEnum):
    """How a wait ended. Values are stable: they are stored in the ledger."""

    FINISHED = "finished"
    ERROR = "error"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"
    """The export was still waiting or running when the wait's time-out passed."""
    FAILED = "failed"
    """The wait itself failed: the export was not found, or polls kept failing (``message`` says why)."""

    @property
    def ok(self) -> bool:
        return self is WaitOutcome.FINISHED


@dataclass(frozen=True, slots=True)
class ExportWait:
    """One wait for one export: where it ended, its last known state and what the wait took."""

    notification_id: str
    export_id: int
    outcome: WaitOutcome
    status: ExportStatus | None
    """The export's last status seen (None when it was never read)."""
    message_counts: MessageCounts
    export_name: str = ""
    polls: int = 0
    retries: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0
    statuses_history: dict[str, str] = field(default_factory=dict)
    message: str = ""
    """Why a ``failed`` wait failed (redacted)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "notification_id": self.notification_id,
            "export_id": self.export_id,
            "export_name": self.export_name,
            "outcome": str(self.outcome),
            "status": None if self.status is None else str(self.status),
            "message_counts": self.message_counts.to_dict(),
            "polls": self.polls,
            "retries": self.retries,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "statuses_history": dict(self.statuses_history),
            "message": self.message,
        }


class WaitRecorder(Protocol):
    """Stores finished waits (the run ledger implements it)."""

    def record_export_wait(self, run_id: str, wait: ExportWait) -> None: ...


class MemoryRecorder:
    """A :class:`WaitRecorder` that keeps waits in a list (tests)."""

    def __init__(self) -> None:
        self.waits: list[tuple[str, ExportWait]] = []

    def record_export_wait(self, run_id: str, wait: ExportWait) -> None:
        self.waits.append((run_id, wait))


class ProgressCallback(Protocol):
    """Told of every successful poll (``export`` as just read) and of every retry."""

    def on_poll(self, export: Export, poll: int) -> None: ...

    def on_retry(self, error: RetryableError, delay: float) -> None: ...


async def wait_for_export(
    client: MeiroClient,
    notification_id: str,
    export_id: int,
    *,
    interval: float = 5.0,
    max_wait: float | None = None,
    retry: RetryPolicy | None = None,
    progress: ProgressCallback | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    sleep: Sleep = asyncio.sleep,
    rng: random.Random | None = None,
) -> ExportWait:
    """Poll until the export is finished, error or canceled, or ``max_wait`` seconds have passed.

    ``max_wait`` is a deadline on the injectable clock (not ``asyncio.timeout``), so a wait that runs out
    still ends in an :class:`ExportWait` (outcome ``timed_out``) with the last state seen.

    Returns the :class:`ExportWait`; raises the last :class:`RetryableError` after ``retry.max_attempts``
    failed polls in a row, and fatal errors at once. ``interval`` is the pause between successful polls.
    """
    policy = retry or RetryPolicy()
    rng = rng or random.Random()
    started = clock()
    started_wall = wall_clock()
    deadline = None if max_wait is None else started + max_wait
    polls = retries = failures = 0
    last: Export | None = None
    while True:
        try:
            export = await client.get_export(notification_id, export_id)
        except RetryableError as exc:
            failures += 1
            if failures >= policy.max_attempts:
                raise
            retries += 1
            delay = backoff_delay(policy, failures, exc, rng)
            if progress is not None:
                progress.on_retry(exc, delay)
        else:
            failures = 0
            polls += 1
            last = export
            if progress is not None:
                progress.on_poll(export, polls)
            if export.status.terminal:
                return _result(
                    notification_id,
                    export_id,
                    WaitOutcome(str(export.status)),
                    export,
                    polls,
                    retries,
                    started_wall,
                    wall_clock(),
                )
            delay = interval
            # Refresh now if the token would expire during the pause; should that fail transiently, the next
            # poll refreshes (or logs in) and is retried as usual.
            with contextlib.suppress(RetryableError):
                await client.ensure_token(valid_for=delay)
        if deadline is not None and clock() + delay > deadline:
            if deadline > clock():
                await sleep(deadline - clock())
            if last is None:
                raise RetryableError(
                    f"export {export_id} of push notification {notification_id}: no successful poll "
                    f"within {max_wait:g} s"
                )
            return _result(
                notification_id,
                export_id,
                WaitOutcome.TIMED_OUT,
                last,
                polls,
                retries,
                started_wall,
                wall_clock(),
            )
        await sleep(delay)


def _result(
    notification_id: str,
    export_id: int,
    outcome: WaitOutcome,
    export: Export,
    polls: int,
    retries: int,
    started: float,
    finished: float,
) -> ExportWait:
    return ExportWait(
        notification_id=notification_id,
        export_id=export_id,
        outcome=outcome,
        status=export.status,
        message_counts=export.message_counts,
        export_name=export.name,
        polls=polls,
        retries=retries,
        started_at=started,
        finished_at=finished,
        statuses_history=dict(export.statuses_history),
    )


@dataclass(frozen=True, slots=True)
class ExportRef:
    """An export to wait for: by its ID, or (``export_id`` None) the newest export of the notification."""

    notification_id: str
    export_id: int | None = None

    def __str__(self) -> str:
        which = "the newest export" if self.export_id is None else f"export {self.export_id}"
        return f"{which} of push notification {self.notification_id}"


async def wait_for_exports(
    client: MeiroClient,
    refs: Sequence[ExportRef],
    *,
    run_id: str,
    recorder: WaitRecorder,
    concurrency: int = 4,
    progress_for: Callable[[ExportRef], ProgressCallback | None] = lambda ref: None,
    **wait_options: Any,
) -> list[ExportWait]:
    """Wait for several exports, ``concurrency`` at a time; each wait is recorded the moment it ends.

    An export that cannot be waited for (not found; polls failing ``max_attempts`` times in a row) ends as a
    ``failed`` wait and the others go on; 401/403 abort everything (the credentials or features are wrong for
    all of them). Returns the waits in the order of ``refs``."""
    gate = asyncio.Semaphore(max(1, concurrency))
    results: list[ExportWait | None] = [None] * len(refs)
    wall_clock: Callable[[], float] = wait_options.get("wall_clock", time.time)

    async def one(i: int, ref: ExportRef) -> None:
        async with gate:
            started = wall_clock()
            export_id = ref.export_id if ref.export_id is not None else -1
            try:
                if ref.export_id is None:
                    page = await client.list_exports(ref.notification_id, limit=1)
                    if not page.exports:
                        raise PlatformError(
                            f"push notification {ref.notification_id} has no export", status=404
                        )
                    export_id = page.exports[0].id
                wait = await wait_for_export(
                    client, ref.notification_id, export_id, progress=progress_for(ref), **wait_options
                )
            except FatalPlatformError as exc:
                if exc.status in (401, 403):
                    raise
                wait = _failed(ref, export_id, exc, started, wall_clock())
            except PlatformError as exc:  # retries exhausted, or an answer we cannot use
                wait = _failed(ref, export_id, exc, started, wall_clock())
            recorder.record_export_wait(run_id, wait)
            results[i] = wait

    try:
        async with asyncio.TaskGroup() as group:
            for i, ref in enumerate(refs):
                group.create_task(one(i, ref))
    except ExceptionGroup as failed:
        first = failed.exceptions[0]
        if isinstance(first, PlatformError):
            raise first from failed  # callers act on our error types, not on a group
        raise
    return [w for w in results if w is not None]


def _failed(
    ref: ExportRef, export_id: int, exc: PlatformError, started: float, finished: float
) -> ExportWait:
    return ExportWait(
        notification_id=ref.notification_id,
        export_id=export_id,
        outcome=WaitOutcome.FAILED,
        status=None,
        message_counts=MessageCounts(),
        started_at=started,
        finished_at=finished,
        message=redact(str(exc)),
    )
