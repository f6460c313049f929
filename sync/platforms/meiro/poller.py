"""Waiting for a Meiro push-notification export to end (finished, error or canceled), with progress.

:func:`wait_for_export` polls ``GET .../exports/{id}`` every ``interval`` seconds. A retryable failure (429,
5xx, time-out, dropped connection) backs off per :class:`sync.config.RetryPolicy` — full jitter, Retry-After
honoured — and polling resumes after a success; ``max_attempts`` failures *in a row* end the wait with the
last error. Fatal errors (401 after a new login, 403, 404) propagate at once. Time (``clock``, ``sleep``) and
randomness are injectable, so tests never sleep for real.

Each wait ends in a :class:`ExportWait` record, which a :class:`WaitRecorder` stores: the run ledger
(:meth:`sync.ledger.ledger.Ledger.record_export_wait`), or a :class:`MemoryRecorder` in tests.

:func:`wait_for_exports` waits for several; it tells an export that cannot be waited for (recorded as
``failed``, the others go on) from a Meiro that cannot be used at all — 401, 403, or no answer whatever after
the retries (refused connections, time-outs) — which ends the whole run with that error.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
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
    "NO_EXPORT",
    "ExportWait",
    "MemoryRecorder",
    "ProgressCallback",
    "WaitOutcome",
    "WaitRecorder",
    "wait_for_export",
]


NO_EXPORT = -1
"""``export_id`` of a wait for a notification's newest export when no export could be picked (it has none,
or the listing failed). The ledger's ``export_id`` column is NOT NULL, so the record keeps this marker; every
reader shows it as "no export" (``null`` in JSON)."""


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

    @property
    def has_export(self) -> bool:
        """Whether the wait was for a known export (not :data:`NO_EXPORT`)."""
        return self.export_id != NO_EXPORT

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as the ledger's ``export_waits`` rows read back: absent values are ``null``."""
        return {
            "notification_id": self.notification_id,
            "export_id": self.export_id if self.has_export else None,
            "export_name": self.export_name,
            "outcome": str(self.outcome),
            "status": None if self.status is None else str(self.status),
            "message_counts": self.message_counts.to_dict(),
            "polls": self.polls,
            "retries": self.retries,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "statuses_history": dict(self.statuses_history),
            "message": self.message or None,
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
    still ends in an :class:`ExportWait` (outcome ``timed_out``) with the state seen by a last poll at the
    deadline (an export that ended since the poll before is reported as it ended).

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
    last_error: RetryableError | None = None
    final = False  # the poll at the deadline was made
    while True:
        try:
            export = await client.get_export(notification_id, export_id)
        except RetryableError as exc:
            last_error = exc
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
                if not final:
                    # One last look at the deadline: an export that ended since the last poll is reported as
                    # it ended, not as timed out with a status up to an interval old.
                    final = True
                    continue
            if last is None:
                # Only failures so far (the loop polls before it pauses): the last one says what kind.
                raise RetryableError(
                    f"export {export_id} of push notification {notification_id}: no successful poll "
                    f"within {max_wait:g} s; the last failure: {last_error}",
                    status=None if last_error is None else last_error.status,
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

    An export that cannot be waited for (not found; a notification with no export for ``latest``; polls
    answered with errors ``max_attempts`` times in a row) ends as a ``failed`` wait and the others go on.
    401/403 abort everything (the credentials or features are wrong for all of them), and so does a Meiro that
    gave no answer at all through the retries (refused connections, time-outs): it is unreachable for every
    export, not failing for one; so does a login refused for any reason (before any wait starts). Returns the
    waits in the order of ``refs``."""
    # Log in first: a login refused for any reason (a base URL that answers 404 or a redirect, 401) fails every
    # wait alike, so it stops the run instead of being recorded as each export's failure. A transient failure
    # (or no answer) is left to each wait, which retries it as a failed poll and tells unreachable apart.
    with contextlib.suppress(RetryableError):
        await client.ensure_token()
    gate = asyncio.Semaphore(max(1, concurrency))
    results: list[ExportWait | None] = [None] * len(refs)
    wall_clock: Callable[[], float] = wait_options.get("wall_clock", time.time)

    async def one(i: int, ref: ExportRef) -> None:
        async with gate:
            started = wall_clock()
            export_id = ref.export_id if ref.export_id is not None else NO_EXPORT
            progress = progress_for(ref)
            try:
                if ref.export_id is None:
                    export_id = await _newest_export_id(client, ref.notification_id, progress, wait_options)
                wait = await wait_for_export(
                    client, ref.notification_id, export_id, progress=progress, **wait_options
                )
            except FatalPlatformError as exc:
                if exc.status in (401, 403):
                    raise
                wait = _failed(ref, export_id, exc, started, wall_clock())
            except RetryableError as exc:
                if exc.status is None:
                    raise RetryableError(
                        f"Meiro did not answer (check base_url and the network): {exc}"
                    ) from exc
                wait = _failed(ref, export_id, exc, started, wall_clock())
            except PlatformError as exc:  # an answer we cannot use
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


async def _newest_export_id(
    client: MeiroClient, notification_id: str, progress: ProgressCallback | None, options: Mapping[str, Any]
) -> int:
    """The ID of the notification's newest export, with the polls' retry policy (a 503 while looking it up is
    as transient as one while polling); :class:`PlatformError` when it has no export."""
    policy: RetryPolicy = options.get("retry") or RetryPolicy()
    sleep: Sleep = options.get("sleep", asyncio.sleep)
    rng: random.Random = options.get("rng") or random.Random()
    failures = 0
    while True:
        try:
            page = await client.list_exports(notification_id, limit=1)
        except RetryableError as exc:
            failures += 1
            if failures >= policy.max_attempts:
                raise
            delay = backoff_delay(policy, failures, exc, rng)
            if progress is not None:
                progress.on_retry(exc, delay)
            await sleep(delay)
            continue
        if not page.exports:
            raise PlatformError(f"push notification {notification_id} has no export to wait for", status=404)
        return page.exports[0].id


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
