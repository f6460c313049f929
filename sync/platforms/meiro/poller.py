"""Waiting for a Meiro push-notification export to end (finished, error or canceled), with progress.

:func:`wait_for_export` polls ``GET .../exports/{id}`` every ``interval`` seconds. A retryable failure (429,
5xx, time-out, dropped connection) backs off per :class:`sync.config.RetryPolicy` — full jitter, Retry-After
honoured — and polling resumes after a success; ``max_attempts`` failures *in a row* end the wait with the
last error. Fatal errors (401 after a new login, 403, 404) propagate at once. Time (``clock``, ``sleep``) and
randomness are injectable, so tests never sleep for real.

Each wait ends in a :class:`ExportWait` record, which a :class:`WaitRecorder` stores (the run ledger).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from sync.config import RetryPolicy
from sync.errors import RetryableError
from sync.platforms.meiro import Export, ExportStatus, MessageCounts
from sync.platforms.meiro.client import MeiroClient
from sync.platforms.retrying import Sleep, backoff_delay

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

    @property
    def ok(self) -> bool:
        return self is WaitOutcome.FINISHED


@dataclass(frozen=True, slots=True)
class ExportWait:
    """One wait for one export: where it ended, its last known state and what the wait took."""

    notification_id: str
    export_id: int
    outcome: WaitOutcome
    status: ExportStatus
    message_counts: MessageCounts
    export_name: str = ""
    polls: int = 0
    retries: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0
    statuses_history: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "notification_id": self.notification_id,
            "export_id": self.export_id,
            "export_name": self.export_name,
            "outcome": str(self.outcome),
            "status": str(self.status),
            "message_counts": self.message_counts.to_dict(),
            "polls": self.polls,
            "retries": self.retries,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "statuses_history": dict(self.statuses_history),
        }


class WaitRecorder(Protocol):
    """Stores finished waits (the run ledger implements it)."""

    def record_export_wait(self, run_id: str, wait: ExportWait) -> None: ...


class MemoryRecorder:
    """A :class:`WaitRecorder` that keeps waits in a list (tests; ``--no-ledger``)."""

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
