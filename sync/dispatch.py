"""The dispatcher: sends a plan's batches through a platform client under per-endpoint budgets.

Shape (arq/AnyIO style): a feeder fills a bounded queue from the plan — so memory stays flat however large
the input — and workers in an :class:`asyncio.TaskGroup` take batches from it. Phases run in order: every
batch of a phase is *finished* before the first batch of the next is fed (all opt-outs before any change, all
changes before any deletion).

* A :class:`LaneSource` (a :class:`sync.planning.Plan`) is sent in **lanes**: within a phase every endpoint
  gets its own bounded queue, fed from its own stream of batches, and its own workers (up to its concurrency
  cap), so endpoints use their separate rate budgets at the same time and a slow endpoint's batches never
  occupy the workers of a fast one. A phase ends when every lane has finished; then the next phase's lanes
  start. A lane's feeder never holds more than ``queue_size`` batches that no worker has taken yet. A source
  may rank its lanes within a phase (``lane_rank(phase, endpoint)``, e.g. NotifyVisitors' profiles before
  events): lanes of a lower rank finish before those of the next rank start.
* A plain (async) iterable of batches has one queue and ``concurrency`` workers; its feeder waits for the
  queue to be finished (``queue.join()``) at each change of phase.

A batch naming a predecessor (``Batch.after``: one user's events continued from an earlier request) is sent
only once that predecessor has finished, when this run sends it. Either way, the global cap
(``DispatchSettings.concurrency``) bounds the requests in flight: a slot is taken *after* the endpoint's rate
budget released the attempt, so tasks waiting for a slow budget hold no slot.

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

Layout: this module is the public face and holds the orchestration (phases, lanes, feeding, stop and drain).
The sending of one batch (budgets, slots, retries, splits, its ledger records) is in :mod:`sync._sending`;
the report records and the observer protocol are in :mod:`sync._dispatch_records`, re-exported here.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from sync._dispatch_records import DispatchObserver, DispatchOutcome, DispatchReport, EndpointStats
from sync._sending import BatchSender
from sync.budget import Budget, Clock, RateBudget
from sync.config import DispatchSettings
from sync.errors import PushSyncError, StateError
from sync.ledger import Ledger
from sync.logs import get_logger
from sync.platforms.base import PlatformClient
from sync.records import Batch, Phase

__all__ = [
    "DispatchObserver",
    "DispatchOutcome",
    "DispatchReport",
    "Dispatcher",
    "EndpointStats",
    "LaneSource",
]

_FEED_CHUNK = 64  # batches pulled from a synchronous plan per worker-thread hop
LATENCY_SAMPLE = 20_000
"""Latencies kept per endpoint (a reservoir sample: percentiles stay accurate, memory stays flat). Read when a
:class:`Dispatcher` is made, so a test may lower it here."""


@runtime_checkable
class LaneSource(Protocol):
    """A plan that hands its batches out per endpoint, phase by phase (:meth:`sync.planning.Plan.lanes`).

    ``lanes(phase)`` returns, in a deterministic order, one ``(endpoint, batches)`` pair per endpoint with work
    in ``phase`` (possibly none); each ``batches`` yields batches of that phase only and is read once. It may
    also have ``lane_rank(phase, endpoint) -> int``: lanes of a lower rank then finish before higher ranks
    start (optional, so a source without ranks sends every lane of a phase at once).
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
        self._settings = settings
        self._ledger = ledger
        self._run_id = run_id
        self._stop = stop if stop is not None else asyncio.Event()
        self._force = asyncio.Event()  # set by force_stop(): the drain ends at once
        # Sends each batch the workers take, and keeps what the run's batches share (budgets, caps, counters,
        # the global cap on requests in flight, the first fatal error).
        self._sender = BatchSender(
            client,
            settings,
            ledger=ledger,
            run_id=run_id,
            stop=self._stop,
            observers=observers,
            budget_factory=budget_factory,
            clock=clock,
            rng=rng or random.Random(),
            latency_sample=LATENCY_SAMPLE,
        )
        self._queued = 0
        self._fed_all = False  # the feeder queued the plan's last batch
        # Batches queued and not yet finished → the event a follower (``Batch.after``) waits on, once one does.
        self._open: dict[str, asyncio.Event | None] = {}
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
        """The counters of every endpoint a batch was taken for so far."""
        return {name: ep.stats for name, ep in self._sender.endpoints.items()}

    async def run(self, batches: Iterable[Batch] | AsyncIterable[Batch] | LaneSource) -> DispatchReport:
        """Send every batch (phases in order) and return the report; never raises for platform errors.

        ``batches``: a :class:`LaneSource` (a plan: sent in per-endpoint lanes) or an iterable of batches in
        phase order (sent through one queue).
        """
        clock = self._sender.clock()
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
            self._fed_all and self._sender.done == self._queued
        )  # a stop after the last answer changes nothing
        outcome = (
            DispatchOutcome.ABORTED
            if self._sender.fatal is not None
            else DispatchOutcome.INTERRUPTED
            if self._stop.is_set() and not finished
            else DispatchOutcome.COMPLETED
        )
        for name, ep in self._sender.endpoints.items():
            if isinstance(ep.budget, RateBudget):
                ep.stats.budget_requests = int(ep.budget.ceiling) if ep.budget.ceiling else None
                ep.stats.budget_period = ep.budget.period if ep.budget.ceiling else None
                ep.stats.discovered_rate = ep.budget.rate if ep.budget.ceiling is None else None
            self._log.debug("endpoint.done", endpoint=name, requests=ep.stats.requests)
        return DispatchReport(
            outcome=outcome,
            endpoints=self.endpoint_stats(),
            elapsed=clock.time() - started,
            batches_done=self._sender.done,
            batches_unfinished=self._queued - self._sender.done,
            fatal=self._sender.fatal,
        )

    async def _run_phases(self, source: LaneSource) -> None:
        """Phase by phase: run every endpoint's lane of the phase to its end, then the next phase's. Within a
        phase, lanes of a lower rank (``source.lane_rank``, when the source has one) finish first."""
        complete = True
        for phase in Phase:
            pairs = source.lanes(phase)
            if not pairs:
                continue
            for step in _ranked(source, phase, pairs):
                if self._stop.is_set():
                    complete = False
                    break
                lanes = []
                for name, batches in step:
                    workers_n = max(1, min(self._sender.endpoint_cap(name), self._settings.concurrency))
                    limit = max(1, self._settings.queue_size)
                    # Room for the workers' end markers too (the drain puts them without waiting).
                    queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=max(limit, workers_n))
                    lanes.append(_Lane(name, batches, queue, workers_n, phase, limit))
                self._log.debug("phase.start", phase=phase.name.lower(), lanes=[lane.name for lane in lanes])
                await self._run_lanes(lanes)
                complete = complete and all(lane.exhausted for lane in lanes)
            if not complete:
                break
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
            self._open[batch.batch_id] = None
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
                self._open[batch.batch_id] = None
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

    # -- workers -------------------------------------------------------------------------------------------

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
                if batch.after is not None and batch.after in self._open:
                    # Its predecessor was queued earlier (so a worker already took it): wait for its end, so
                    # e.g. one user's events reach the platform in file order across requests.
                    done = self._open[batch.after] or asyncio.Event()
                    self._open[batch.after] = done
                    await done.wait()
                await self._sender.process(batch)
            finally:
                if batch is not None:
                    finished = self._open.pop(batch.batch_id, None)
                    if finished is not None:
                        finished.set()
                queue.task_done()


def _ranked(
    source: LaneSource, phase: Phase, pairs: Sequence[tuple[str, Iterable[Batch] | AsyncIterable[Batch]]]
) -> list[list[tuple[str, Iterable[Batch] | AsyncIterable[Batch]]]]:
    """A phase's lanes grouped by rank, lowest first: each group runs to its end before the next starts. A
    source without ``lane_rank(phase, endpoint)`` has one group (every lane at once)."""
    rank_of: Callable[[Phase, str], int] | None = getattr(source, "lane_rank", None)
    if rank_of is None:
        return [list(pairs)]
    ranks: dict[int, list[tuple[str, Iterable[Batch] | AsyncIterable[Batch]]]] = {}
    for name, batches in pairs:
        ranks.setdefault(rank_of(phase, name), []).append((name, batches))
    return [ranks[rank] for rank in sorted(ranks)]


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
