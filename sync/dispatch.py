"""The dispatcher: sends a plan's batches through a platform client under per-endpoint budgets.

Shape (arq/AnyIO style): a feeder fills a bounded queue from the plan — so memory stays flat however large
the input — and workers in an :class:`asyncio.TaskGroup` take batches from it. Phases run in order: every
batch of a phase is *finished* before the first batch of the next is fed (all opt-outs before any change, all
changes before any deletion).

* A :class:`LaneSource` (a :class:`sync.planning.Plan`) is sent in **lanes**: within a phase every endpoint
  gets its own bounded queue, fed from its own stream of batches, and its own workers (up to its concurrency
  cap), so endpoints use their separate rate budgets at the same time and a slow endpoint's batches never
  occupy the workers of a fast one. A phase ends when every lane has finished; then the next phase's lanes
  start. A lane's feeder never holds more than ``queue_size`` batches that no worker has taken yet.
* A plain (async) iterable of batches has one queue and ``concurrency`` workers; its feeder waits for the
  queue to be finished (``queue.join()``) at each change of phase.

Either way, the global cap (``DispatchSettings.concurrency``) bounds the requests in flight: a slot is taken
*after* the endpoint's rate budget released the attempt, so tasks waiting for a slow budget hold no slot.

Per batch: ``planned`` is recorded when it is queued, ``sent`` before the first attempt, and the final result
the moment it is known — synchronously, before the next ``await``, so a cancellation cannot fall between an
answer and its record. Each attempt takes a slot from the endpoint's rate budget (retries count) and a place
under the endpoint's concurrency cap.

* 429: the endpoint's budget pauses (Retry-After, guarded) for *every* task, and slows down if 429s repeat.
* 5xx, time-outs, dropped connections: retried with exponential backoff and full jitter, up to
  ``RetryPolicy.max_attempts`` attempts in all.
* 400: the batch is split in halves (``client.split``), repeatedly, until the refused IDs are isolated; the
  rest is sent and each refused ID is recorded with the platform's code and message.
* 401/403 (:class:`FatalPlatformError`): the run stops at once — nothing new is fed or retried; requests
  already in flight finish (within the drain time-out) and are recorded.
* ``stop`` (an :class:`asyncio.Event`, set on SIGINT/SIGTERM): stop feeding, let in-flight batches finish
  within ``drain_timeout``, then cancel what is left. Batches cancelled mid-request stay ``sent`` in the
  ledger (their outcome is unknown); batches never taken stay ``planned``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from sync.budget import Budget, BudgetClosedError, Clock, RateBudget, clock_sleep
from sync.config import DispatchSettings
from sync.errors import FatalPlatformError, PushSyncError, RejectedBatchError, RetryableError, StateError
from sync.ledger import Ledger
from sync.logs import get_logger
from sync.platforms.base import PlatformClient
from sync.records import (
    NON_IDEMPOTENT,
    Attempt,
    AttemptOutcome,
    Batch,
    BatchResult,
    BatchStatus,
    Phase,
    RejectedId,
)

__all__ = [
    "DispatchObserver",
    "DispatchOutcome",
    "DispatchReport",
    "Dispatcher",
    "EndpointStats",
    "LaneSource",
]

_NOT_IDEMPOTENT = NON_IDEMPOTENT  # their ``sent`` record is committed before the request goes out
_FEED_CHUNK = 64  # batches pulled from a synchronous plan per worker-thread hop
LATENCY_SAMPLE = 20_000
"""Latencies kept per endpoint (a reservoir sample: percentiles stay accurate, memory stays flat)."""


class DispatchOutcome(StrEnum):
    """How a dispatch ended."""

    COMPLETED = "completed"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"


@dataclass(slots=True)
class EndpointStats:
    """Counters for one endpoint, accumulated during the run (the summary reads them)."""

    endpoint: str
    requests: int = 0
    batches: int = 0
    ids_ok: int = 0
    ids_rejected: int = 0
    ids_failed: int = 0
    rate_limited: int = 0
    retries: int = 0
    splits: int = 0
    first_request: float | None = None
    last_request: float | None = None
    latencies: list[float] = field(default_factory=list)
    """A uniform sample (reservoir) of at most LATENCY_SAMPLE request latencies, for p50/p95 in flat memory."""
    latency_count: int = 0
    per_window: dict[int, int] = field(default_factory=dict)
    """Requests per clock-aligned budget period (configured budgets only): what the server's windows saw."""
    budget_requests: int | None = None
    budget_period: float | None = None
    discovered_rate: float | None = None


@dataclass(frozen=True, slots=True)
class DispatchReport:
    """What :meth:`Dispatcher.run` hands back."""

    outcome: DispatchOutcome
    endpoints: dict[str, EndpointStats]
    elapsed: float
    batches_done: int
    batches_unfinished: int
    fatal: FatalPlatformError | None = None


class DispatchObserver(Protocol):
    """Told about each batch taken, each HTTP attempt and each finished batch, synchronously (the progress
    bar and :class:`sync.metrics.RunMetrics` implement it)."""

    def on_batch_start(self, batch: Batch) -> None: ...

    def on_attempt(self, attempt: Attempt) -> None: ...

    def on_batch_done(self, batch: Batch, result: BatchResult) -> None: ...


@runtime_checkable
class LaneSource(Protocol):
    """A plan that hands its batches out per endpoint, phase by phase (:meth:`sync.planning.Plan.lanes`).

    ``lanes(phase)`` returns, in a deterministic order, one ``(endpoint, batches)`` pair per endpoint with work
    in ``phase`` (possibly none); each ``batches`` yields batches of that phase only and is read once.
    """

    def lanes(self, phase: Phase) -> Sequence[tuple[str, Iterable[Batch] | AsyncIterable[Batch]]]: ...


class _Aborted(Exception):
    """Internal: the run was aborted while this batch waited; it is recorded as failed."""


class _NotSent(Exception):
    """Internal: a stop came while this batch waited for its first slot; it is not sent and stays planned."""


@dataclass(slots=True, eq=False)
class _Lane:
    """One queue with its feeder and workers: an endpoint's lane in a phase, or a whole plain plan."""

    name: str
    source: Iterable[Batch] | AsyncIterable[Batch]
    queue: asyncio.Queue[Batch | None]
    workers: int
    phase: Phase | None = None
    """The lane's phase; None for a plain plan (its feeder follows the batches' phases itself)."""
    limit: int = 0
    """Lanes only: the most batches pulled from ``source`` that no worker has taken yet."""
    ahead: int = 0  # batches pulled and not yet taken by a worker
    room: asyncio.Event = field(default_factory=asyncio.Event)  # set when a worker takes a batch
    exhausted: bool = False  # the feeder reached the end of ``source``


@dataclass(slots=True)
class _Endpoint:
    budget: Budget
    cap: asyncio.Semaphore
    stats: EndpointStats


class Dispatcher:
    """Sends batches; see the module docstring. One instance per run."""

    def __init__(
        self,
        client: PlatformClient,
        settings: DispatchSettings,
        *,
        ledger: Ledger | None = None,
        run_id: str = "",
        stop: asyncio.Event | None = None,
        observers: Sequence[DispatchObserver] = (),
        budget_factory: Callable[[str], Budget] | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._settings = settings
        self._ledger = ledger
        self._run_id = run_id
        self._stop = stop if stop is not None else asyncio.Event()
        self._force = asyncio.Event()  # set by force_stop(): the drain ends at once
        self._observers = tuple(observers)
        self._budget_factory = budget_factory or self._default_budget
        self._clock: Clock | None = clock
        self._rng = rng or random.Random()
        self._endpoints: dict[str, _Endpoint] = {}
        self._fatal: FatalPlatformError | None = None
        self._done = 0
        self._queued = 0
        self._fed_all = False  # the feeder queued the plan's last batch
        # The global cap on requests in flight, over every endpoint (lanes may have more workers than this).
        self._in_flight = asyncio.Semaphore(max(1, settings.concurrency))
        # One synchronous pull from the plan at a time: lanes of one plan share its readers (and a replay's
        # counters), which are not made for several threads.
        self._pull_lock = asyncio.Lock()
        self._log = get_logger(run=run_id, platform=client.platform)

    # -- public ------------------------------------------------------------------------------------------

    @property
    def stop_event(self) -> asyncio.Event:
        """Set it (e.g. from a signal handler) to stop feeding and drain."""
        return self._stop

    def force_stop(self) -> None:
        """Stop now: like setting the stop event, but cancel in-flight batches instead of draining them
        (a second Ctrl-C). Cancelled batches stay ``sent`` in the ledger."""
        self._force.set()
        self._stop.set()

    def endpoint_stats(self) -> dict[str, EndpointStats]:
        return {name: ep.stats for name, ep in self._endpoints.items()}

    async def run(self, batches: Iterable[Batch] | AsyncIterable[Batch] | LaneSource) -> DispatchReport:
        """Send every batch (phases in order) and return the report; never raises for platform errors.

        ``batches``: a :class:`LaneSource` (a plan: sent in per-endpoint lanes) or an iterable of batches in
        phase order (sent through one queue).
        """
        clock = self._get_clock()
        started = clock.time()
        try:
            if isinstance(batches, LaneSource):
                await self._run_phases(batches)
            else:
                workers_n = max(1, self._settings.concurrency)
                queue: asyncio.Queue[Batch | None] = asyncio.Queue(
                    maxsize=max(self._settings.queue_size, workers_n)
                )
                await self._run_lanes([_Lane("plan", batches, queue, workers_n)])
        except* PushSyncError as group:
            # A failure of our own (the ledger cannot be written, a plan out of phase order) ends the run; it
            # surfaces as itself, not wrapped in an ExceptionGroup, so the CLI can map it to an exit code.
            raise _first_error(group) from None
        if self._ledger is not None:
            self._ledger.flush()
        finished = (
            self._fed_all and self._done == self._queued
        )  # a stop after the last answer changes nothing
        outcome = (
            DispatchOutcome.ABORTED
            if self._fatal is not None
            else DispatchOutcome.INTERRUPTED
            if self._stop.is_set() and not finished
            else DispatchOutcome.COMPLETED
        )
        for name, ep in self._endpoints.items():
            if isinstance(ep.budget, RateBudget):
                ep.stats.budget_requests = int(ep.budget.ceiling) if ep.budget.ceiling else None
                ep.stats.budget_period = ep.budget.period if ep.budget.ceiling else None
                ep.stats.discovered_rate = ep.budget.rate if ep.budget.ceiling is None else None
            self._log.debug("endpoint.done", endpoint=name, requests=ep.stats.requests)
        return DispatchReport(
            outcome=outcome,
            endpoints=self.endpoint_stats(),
            elapsed=clock.time() - started,
            batches_done=self._done,
            batches_unfinished=self._queued - self._done,
            fatal=self._fatal,
        )

    async def _run_phases(self, source: LaneSource) -> None:
        """Phase by phase: run every endpoint's lane of the phase to its end, then the next phase's."""
        complete = True
        for phase in Phase:
            pairs = source.lanes(phase)
            if not pairs:
                continue
            if self._stop.is_set():
                complete = False
                break
            lanes = []
            for name, batches in pairs:
                workers_n = max(1, min(self._endpoint_cap(name), self._settings.concurrency))
                limit = max(1, self._settings.queue_size)
                # Room for the workers' end markers too (the drain puts them without waiting).
                queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=max(limit, workers_n))
                lanes.append(_Lane(name, batches, queue, workers_n, phase, limit))
            self._log.debug("phase.start", phase=phase.name.lower(), lanes=[lane.name for lane in lanes])
            await self._run_lanes(lanes)
            complete = complete and all(lane.exhausted for lane in lanes)
        self._fed_all = complete

    async def _run_lanes(self, lanes: Sequence[_Lane]) -> None:
        """Run the lanes' feeders and workers until every worker has finished, or drain them on a stop."""
        flusher: asyncio.Task[None] | None = None
        async with asyncio.TaskGroup() as tg:
            feeders = [
                tg.create_task(
                    self._feed(lane) if lane.phase is None else self._feed_lane(lane),
                    name=f"feeder-{lane.name}",
                )
                for lane in lanes
            ]
            workers = [
                tg.create_task(self._worker(lane), name=f"worker-{lane.name}-{i}")
                for lane in lanes
                for i in range(lane.workers)
            ]
            stop_wait = tg.create_task(self._stop.wait(), name="stop-wait")
            if self._ledger is not None:
                flusher = tg.create_task(self._flush_ledger(), name="ledger-flush")
            while not self._stop.is_set():
                running = [w for w in workers if not w.done()]
                if not running:
                    break
                await asyncio.wait([stop_wait, *running], return_when=asyncio.FIRST_COMPLETED)
            if self._stop.is_set():
                await self._drain(feeders, workers, lanes)
            stop_wait.cancel()
            if flusher is not None:
                flusher.cancel()

    # -- feeding and draining ----------------------------------------------------------------------------

    async def _feed(self, lane: _Lane) -> None:
        """Feed a plain plan: one queue for every endpoint; wait for it to be finished at each new phase."""
        queue, workers, batches = lane.queue, lane.workers, lane.source
        phase: Phase | None = None
        async for batch in _aiter(batches):
            if self._stop.is_set():
                return
            if phase is not None and batch.phase < phase:
                raise StateError(
                    f"plan out of phase order: batch {batch.batch_id} ({batch.phase.name}) after {phase.name}"
                )
            if phase is not None and batch.phase != phase:
                await queue.join()  # every batch of the previous phase is finished, not just taken
                if self._stop.is_set():
                    return
            phase = batch.phase
            if self._ledger is not None:
                self._ledger.record_planned(self._run_id, batch)
            self._queued += 1
            await queue.put(batch)
        self._fed_all = True
        lane.exhausted = True
        for _ in range(workers):
            await queue.put(None)

    async def _feed_lane(self, lane: _Lane) -> None:
        """Feed one endpoint's lane, never holding more than ``lane.limit`` batches no worker has taken."""
        pull = _Pull(lane.source, self._pull_lock)
        # Refill in chunks once a good part of the room is free: one thread hop per chunk, not per batch.
        refill = max(1, min(_FEED_CHUNK, lane.limit // 2))
        while True:
            while lane.limit - lane.ahead < refill:
                lane.room.clear()
                await lane.room.wait()
            if self._stop.is_set():
                return
            want = min(_FEED_CHUNK, lane.limit - lane.ahead)
            chunk = await pull.take(want)
            if self._stop.is_set():
                return
            for batch in chunk:
                if batch.phase != lane.phase:
                    assert lane.phase is not None
                    raise StateError(
                        f"lane {lane.name} of phase {lane.phase.name} yielded batch {batch.batch_id} of phase "
                        f"{batch.phase.name}"
                    )
                if self._ledger is not None:
                    self._ledger.record_planned(self._run_id, batch)
                self._queued += 1
                lane.ahead += 1
                lane.queue.put_nowait(batch)  # never full: it holds at most ``limit`` batches
            if len(chunk) < want:
                break
        lane.exhausted = True
        for _ in range(lane.workers):
            await lane.queue.put(None)

    async def _drain(
        self,
        feeders: list[asyncio.Task[None]],
        workers: list[asyncio.Task[None]],
        lanes: Sequence[_Lane],
    ) -> None:
        """Stop feeding, release idle workers, give busy ones ``drain_timeout`` seconds, cancel the rest."""
        for feeder in feeders:
            feeder.cancel()
        for lane in lanes:
            queue = lane.queue
            while not queue.empty():
                queue.get_nowait()
                queue.task_done()
            for _ in range(lane.workers):
                queue.put_nowait(None)
        running = [w for w in workers if not w.done()]
        if running:
            # Wait for the busy workers, but no longer than the drain time-out, nor past force_stop().
            drained = asyncio.ensure_future(asyncio.wait(running))
            forced = asyncio.ensure_future(self._force.wait())
            try:
                await asyncio.wait(
                    [drained, forced],
                    timeout=self._settings.drain_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                drained.cancel()
                forced.cancel()
            late = [w for w in running if not w.done()]
            for task in late:
                task.cancel()
            if late:
                self._log.warning("drain.cut_short", cancelled=len(late), forced=self._force.is_set())

    async def _flush_ledger(self) -> None:
        assert self._ledger is not None
        while True:
            await asyncio.sleep(0.05)
            self._ledger.maybe_flush()

    # -- one batch ---------------------------------------------------------------------------------------

    async def _worker(self, lane: _Lane) -> None:
        queue = lane.queue
        while True:
            batch = await queue.get()
            try:
                if batch is None or self._stop.is_set():
                    return
                if lane.limit:
                    lane.ahead -= 1
                    lane.room.set()
                await self._process(batch)
            finally:
                queue.task_done()

    def _endpoint_cap(self, name: str) -> int:
        return self._settings.per_endpoint_concurrency.get(name, self._settings.concurrency)

    def _endpoint(self, name: str) -> _Endpoint:
        ep = self._endpoints.get(name)
        if ep is None:
            cap = self._endpoint_cap(name)
            ep = _Endpoint(self._budget_factory(name), asyncio.Semaphore(max(1, cap)), EndpointStats(name))
            self._endpoints[name] = ep
        return ep

    def _default_budget(self, endpoint: str) -> Budget:
        return RateBudget(
            self._settings.budget_for(endpoint),
            clock=self._clock,
            max_pause=self._settings.retry.max_retry_after,
        )

    def _get_clock(self) -> Clock:
        if self._clock is None:
            self._clock = asyncio.get_running_loop()
        return self._clock

    async def _process(self, batch: Batch) -> None:
        clock = self._get_clock()
        ep = self._endpoint(batch.endpoint)
        stats = ep.stats
        stats.batches += 1
        started = clock.time()
        for observer in self._observers:
            observer.on_batch_start(batch)
        attempts = 0
        ok_ids = 0
        failed_ids = 0
        rejected: list[RejectedId] = []
        last_status: int | None = None
        last_code: int | str | None = None
        last_message = ""
        fatal: FatalPlatformError | None = None
        pending = [batch]  # a stack: halves of a refused batch are pushed back
        while pending:
            part = pending.pop()
            try:
                used, status = await self._send_with_retries(part, ep, first=part is batch)
                attempts += used
                last_status = status
                ok_ids += len(part.ext_ids)
            except _AttemptsError as exc:
                attempts += exc.attempts
                err = exc.error
                last_status, last_code, last_message = err.status, err.code, err.message
                if isinstance(err, RejectedBatchError):
                    halves = self._client.split(part)
                    if halves is not None:
                        stats.splits += 1
                        pending.extend(reversed(halves))
                        continue
                    rejected.extend(
                        RejectedId(ext_id, err.code, err.message, part.origins.get(ext_id))
                        for ext_id in part.ext_ids
                    )
                elif isinstance(err, FatalPlatformError):
                    fatal = err
                    failed_ids += len(part.ext_ids) + sum(len(p.ext_ids) for p in pending)
                    pending.clear()
                else:
                    failed_ids += len(part.ext_ids)
            except _Aborted:
                failed_ids += len(part.ext_ids) + sum(len(p.ext_ids) for p in pending)
                pending.clear()
                last_message = "not sent: the run was aborted"
            except _NotSent:
                stats.batches -= (
                    1  # never sent: it stays planned, counted as unfinished, like a batch not taken
                )
                self._log.debug("batch.not_sent", endpoint=batch.endpoint, batch=batch.batch_id)
                return
        if failed_ids:
            status_ = BatchStatus.FAILED
        elif rejected:
            status_ = BatchStatus.REJECTED
        else:
            status_ = BatchStatus.OK
        result = BatchResult(
            batch_id=batch.batch_id,
            endpoint=batch.endpoint,
            operation=batch.operation,
            status=status_,
            attempts=attempts,
            http_status=last_status,
            code=None if status_ is BatchStatus.OK else last_code,
            message="" if status_ is BatchStatus.OK else last_message,
            ok_ids=ok_ids,
            rejected=tuple(rejected),
            started_at=started,
            finished_at=clock.time(),
        )
        # Recorded synchronously: no await between knowing the result and writing it.
        stats.ids_ok += ok_ids
        stats.ids_rejected += len(rejected)
        stats.ids_failed += failed_ids
        if self._ledger is not None:
            self._ledger.record_result(self._run_id, result)
        self._done += 1
        for observer in self._observers:
            observer.on_batch_done(batch, result)
        self._log.debug(
            "batch.done",
            endpoint=batch.endpoint,
            batch=batch.batch_id,
            status=str(status_),
            attempts=attempts,
        )
        if fatal is not None and self._fatal is None:
            self._fatal = fatal
            self._log.error("run.abort", endpoint=batch.endpoint, status=fatal.status, error=fatal.message)
            # Abort at once: whoever waits for a slot gives up now; requests already in flight finish.
            for other in self._endpoints.values():
                other.budget.close()
            self._stop.set()

    async def _send_with_retries(self, part: Batch, ep: _Endpoint, *, first: bool) -> tuple[int, int]:
        """Send one (sub-)batch until it succeeds; returns (attempts, HTTP status) or raises _AttemptsError.

        ``first``: this is the batch itself, not a half of it: its first attempt moves it to ``sent``.
        """
        clock = self._get_clock()
        policy = self._settings.retry
        stats = ep.stats
        attempt = 0
        while True:
            if self._fatal is not None:
                if attempt == 0:
                    raise _Aborted
                raise _AttemptsError(attempt, self._fatal)
            async with ep.cap:
                try:
                    await ep.budget.acquire()
                except BudgetClosedError:
                    if attempt == 0:
                        raise _Aborted from None
                    raise _AttemptsError(attempt, self._fatal or FatalPlatformError("run aborted")) from None
                # The global slot is taken only once the budget released this attempt: a task waiting for a
                # slow endpoint's budget must not hold a slot that a fast endpoint could use.
                await self._in_flight.acquire()
                try:
                    if self._fatal is not None:  # the run aborted while this attempt waited for a slot
                        if attempt == 0:
                            raise _Aborted
                        raise _AttemptsError(attempt, self._fatal)
                    if first and attempt == 0 and self._stop.is_set():
                        # Stopping: only requests already out (and their retries) finish. With lanes, more
                        # batches wait for a slot than requests may be in flight; none of them starts now.
                        raise _NotSent
                    if first and attempt == 0 and self._ledger is not None:
                        self._ledger.record_sent(self._run_id, part.batch_id)
                        if part.operation in _NOT_IDEMPOTENT:
                            # Durable before the request leaves: a resume must know this batch may have been
                            # applied, or it would send the events (or pushed values) a second time.
                            self._ledger.flush()
                    attempt += 1
                    stats.requests += 1
                    now = clock.time()
                    if stats.first_request is None:
                        stats.first_request = now
                    stats.last_request = now
                    if isinstance(ep.budget, RateBudget) and ep.budget.ceiling is not None:
                        window = ep.budget.window_of(now)
                        stats.per_window[window] = stats.per_window.get(window, 0) + 1
                    sent_at = time.time()
                    try:
                        # The client has its own per-request time-out; this outer one is a guard against a client
                        # that forgets it.
                        async with asyncio.timeout(self._settings.request_timeout * 2 + 1):
                            outcome = await self._client.send(part)
                    except TimeoutError as exc:
                        error: RetryableError | RejectedBatchError | FatalPlatformError = RetryableError(
                            f"no answer within {self._settings.request_timeout * 2 + 1:.0f} s"
                        )
                        error.__cause__ = exc
                    except (RetryableError, RejectedBatchError, FatalPlatformError) as exc:
                        error = exc
                    else:
                        self._sample_latency(stats, outcome.latency)
                        self._attempt_done(
                            Attempt(
                                part.batch_id,
                                part.endpoint,
                                attempt,
                                len(part.ext_ids),
                                outcome.latency,
                                AttemptOutcome.OK,
                                outcome.http_status,
                            ),
                            sent_at,
                        )
                        ep.budget.on_success(outcome.remaining)
                        return attempt, outcome.http_status
                    latency = clock.time() - now
                    self._sample_latency(stats, latency)
                    self._attempt_done(
                        Attempt(
                            part.batch_id,
                            part.endpoint,
                            attempt,
                            len(part.ext_ids),
                            latency,
                            _outcome_of(error),
                            error.status,
                            error.message,
                        ),
                        sent_at,
                    )
                finally:
                    self._in_flight.release()
            if isinstance(error, RetryableError):
                if error.rate_limited:
                    stats.rate_limited += 1
                    # The pause applies to the whole endpoint: every task's next acquire() waits for it.
                    ep.budget.on_rate_limited(error.retry_after, error.remaining)
                if attempt >= policy.max_attempts:
                    raise _AttemptsError(attempt, error)
                stats.retries += 1
                if not error.rate_limited:
                    delay = self._rng.uniform(
                        0, min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
                    )
                    if error.retry_after is not None and 0 < error.retry_after <= policy.max_retry_after:
                        delay = max(delay, error.retry_after)
                    await clock_sleep(clock, delay)
                continue
            raise _AttemptsError(attempt, error)

    def _attempt_done(self, attempt: Attempt, sent_at: float) -> None:
        """Record one HTTP attempt in the ledger and tell the observers (synchronously: before any await)."""
        if self._ledger is not None:
            self._ledger.record_attempt(self._run_id, attempt, started_at=sent_at)
        for observer in self._observers:
            observer.on_attempt(attempt)

    def _sample_latency(self, stats: EndpointStats, latency: float) -> None:
        stats.latency_count += 1
        if len(stats.latencies) < LATENCY_SAMPLE:
            stats.latencies.append(latency)
            return
        slot = self._rng.randrange(stats.latency_count)  # Algorithm R: keep each with probability k/n
        if slot < LATENCY_SAMPLE:
            stats.latencies[slot] = latency


def _outcome_of(error: RetryableError | RejectedBatchError | FatalPlatformError) -> AttemptOutcome:
    if isinstance(error, RetryableError):
        return AttemptOutcome.RATE_LIMITED if error.rate_limited else AttemptOutcome.RETRYABLE
    if isinstance(error, RejectedBatchError):
        return AttemptOutcome.REJECTED
    return AttemptOutcome.FATAL


class _AttemptsError(Exception):
    """Internal: a (sub-)batch ended in ``error`` after ``attempts`` attempts."""

    def __init__(
        self, attempts: int, error: RetryableError | RejectedBatchError | FatalPlatformError
    ) -> None:
        super().__init__(error.message)
        self.attempts = attempts
        self.error = error


async def _aiter(batches: Iterable[Batch] | AsyncIterable[Batch]) -> AsyncIterable[Batch]:
    """Iterate a plan without blocking the loop: a synchronous plan is advanced in a worker thread, in chunks
    (planning is CPU work in polars, which releases the GIL; budgets' timers must keep firing meanwhile)."""
    if isinstance(batches, AsyncIterable):
        async for batch in batches:
            yield batch
        return
    iterator = iter(batches)
    while True:
        chunk = await asyncio.to_thread(_take, iterator, _FEED_CHUNK)
        for batch in chunk:
            yield batch
        if len(chunk) < _FEED_CHUNK:
            return


def _take(iterator: Iterator[Batch], n: int) -> list[Batch]:
    out: list[Batch] = []
    for batch in iterator:
        out.append(batch)
        if len(out) >= n:
            break
    return out


class _Pull:
    """Takes batches from one lane's iterable, a few at a time: a synchronous one in a worker thread (as
    :func:`_aiter` does), one pull at a time across the lanes (``lock``)."""

    __slots__ = ("_async", "_lock", "_sync")

    def __init__(self, batches: Iterable[Batch] | AsyncIterable[Batch], lock: asyncio.Lock) -> None:
        self._async: AsyncIterator[Batch] | None = (
            aiter(batches) if isinstance(batches, AsyncIterable) else None
        )
        self._sync: Iterator[Batch] | None = iter(batches) if not isinstance(batches, AsyncIterable) else None
        self._lock = lock

    async def take(self, n: int) -> list[Batch]:
        """Up to ``n`` batches; fewer only at the end."""
        if self._async is not None:
            out: list[Batch] = []
            while len(out) < n:
                try:
                    out.append(await anext(self._async))
                except StopAsyncIteration:
                    break
            return out
        assert self._sync is not None
        async with self._lock:
            return await asyncio.to_thread(_take, self._sync, n)


def _first_error(group: BaseExceptionGroup[PushSyncError]) -> PushSyncError:
    """The first of our own errors in a (possibly nested) exception group."""
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
