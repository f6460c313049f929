"""The dispatcher: sends a plan's batches through a platform client under rate budgets (per endpoint, and groups).

Shape (arq/AnyIO style): a feeder fills a bounded channel from the plan — so memory stays flat however large
the input — and workers in an :class:`asyncio.TaskGroup` take batches from it. Phases run in order: every
batch of a phase is *finished* before the first batch of the next is fed (all opt-outs before any change, all
changes before any deletion).

* A :class:`LaneSource` (a :class:`sync.planning.planning.Plan`) is sent in **lanes**: within a phase every endpoint
  gets its own bounded queue, fed from its own stream of batches, and its own workers (up to its concurrency
  cap), so endpoints use their separate rate budgets at the same time and a slow endpoint's batches never
  occupy the workers of a fast one. A phase ends when every lane has finished; then the next phase's lanes
  start. A lane's feeder never holds more than ``queue_size`` batches that no worker has taken yet. A source
  may rank its lanes within a phase (``lane_rank(phase, endpoint)``, e.g. NotifyVisitors' profiles before
  events): lanes of a lower rank finish before those of the next rank start.
* A plain (async) iterable of batches (in phase order) is sent phase by phase through one lane with
  ``concurrency`` workers: at each change of phase the lane's channel is closed, its workers finish, and the
  next phase's lane starts.

A lane is a closeable bounded channel (:class:`sync.dispatch._channel.Channel`): the feeder sends batches into it and
closes it at the end of its batches; the workers' ``async for`` then ends. A stop discards what is buffered
and closes every channel, so idle workers end at once; busy ones get ``drain_timeout`` (an
``asyncio.timeout`` scope, which ``force_stop`` cuts short) before they are cancelled. Pulls from a
synchronous plan run in worker threads — a lane's first batches one at a time, then in chunks: each lane in a
thread of its own (a lane's pulls one at a time, in order), so a lane waiting in its pull for the plan to read
further (a lazy plan settling the rest of its input) never holds back another lane's pulls of batches that are
ready.

A batch naming a predecessor (``Batch.after``: one user's events continued from an earlier request) is sent
only once that predecessor has finished, when this run sends it. Either way, the global cap
(``DispatchSettings.concurrency``) bounds the requests in flight: a slot is taken *after* the endpoint's rate
budget released the attempt, so tasks waiting for a slow budget hold no slot.

Per batch: ``planned`` is recorded when it is queued, ``sent`` before the first attempt, and the final result
the moment it is known — synchronously, before the next ``await``, so a cancellation cannot fall between an
answer and its record. Each attempt takes a slot from the endpoint's rate budget (retries count) and a place
under the endpoint's concurrency cap.

* 429: the endpoint's budget and every budget group holding it pause (Retry-After, guarded) for *every* task;
  the rate is lowered only when 429s are more than a share of a window's answers (:mod:`sync.dispatch.budget`).
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
The sending of one batch (budgets, slots, retries, splits, its ledger records) is in :mod:`sync.dispatch._sending`;
the report records and the observer protocol are in :mod:`sync.dispatch._dispatch_records`, re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from sync.config import DispatchSettings
from sync.dispatch._channel import Channel
from sync.dispatch._dispatch_records import DispatchObserver, DispatchOutcome, DispatchReport, EndpointStats
from sync.dispatch._sending import BatchSender
from sync.dispatch.budget import Budget, Clock, meter_of
from sync.errors import PushSyncError, StateError
from sync.ledger.ledger import RunLedger
from sync.logs import get_logger
from sync.platforms.base import PlatformClient
from sync.records import Batch, Phase

__all__ = [
    "BatchPuller",
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
    """A plan that hands its batches out per endpoint, phase by phase (:meth:`sync.planning.planning.Plan.lanes`).

    ``lanes(phase)`` returns, in a deterministic order, one ``(endpoint, batches)`` pair per endpoint with work
    in ``phase`` (possibly none); each ``batches`` yields batches of that phase only and is read once. It may
    also have ``lane_rank(phase, endpoint) -> int``: lanes of a lower rank then finish before higher ranks
    start (optional, so a source without ranks sends every lane of a phase at once).
    """

    def lanes(self, phase: Phase) -> Sequence[tuple[str, Iterable[Batch] | AsyncIterable[Batch]]]: ...


@runtime_checkable
class BatchPuller(Protocol):
    """A lane's batches handed out on demand (a coordinated worker's queue: :mod:`sync.coordination.queue`).

    When a lane's ``batches`` has ``take(n)``, the dispatcher pulls only when the lane's workers wait with
    nothing buffered, and asks for as many batches as workers wait: ``take`` returns up to ``n`` batches —
    whatever is ready, without waiting for more than the first — and an empty list once the lane is over. So
    no batch is taken from the source before a worker is free to send it (a claimed batch is a lease)."""

    async def take(self, n: int) -> list[Batch]: ...


@dataclass(slots=True, eq=False)
class _Lane:
    """One channel with its feeder and workers: an endpoint's lane in a phase, or one phase of a plain plan."""

    name: str
    pull: _Pull
    channel: Channel[Batch]
    workers: int
    phase: Phase
    plain: bool = False
    """One phase of a plain plan: a batch of a later phase ends the lane (it is kept in ``next_batch``)."""
    exhausted: bool = False
    """The feeder reached the end of the lane's batches."""
    next_batch: list[Batch] = field(default_factory=list)
    """Plain plans: batches read ahead and not sent yet (the first are this lane's, then the next phase's)."""
    more: bool = True
    """The source may hold batches not pulled yet (False once a pull came back short)."""
    pulls: int = 0
    """Pulls made so far (the first ``_FEED_CHUNK`` take one batch each, the next up to a chunk)."""


class Dispatcher:
    """Sends batches; see the module docstring. One instance per run."""

    def __init__(
        self,
        client: PlatformClient,
        settings: DispatchSettings,
        *,
        ledger: RunLedger | None = None,
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
        self._forced = False  # set by force_stop(): the drain ends at once
        self._drain_scope: asyncio.Timeout | None = None  # the drain's time-out, while it runs
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
        self._fed_all = False  # the feeders queued the plan's last batch
        # Batches queued and not yet finished → the event a follower (``Batch.after``) waits on, once one does.
        self._open: dict[str, asyncio.Event | None] = {}
        self._log = get_logger(run=run_id, platform=client.platform)

    # -- public ------------------------------------------------------------------------------------------

    @property
    def stop_event(self) -> asyncio.Event:
        """Set it (e.g. from a signal handler) to stop feeding and drain."""
        return self._stop

    def force_stop(self) -> None:
        """Stop now: like setting the stop event, but cancel in-flight batches instead of draining them
        (a second Ctrl-C). Cancelled batches stay ``sent`` in the ledger."""
        self._forced = True
        self._stop.set()
        if self._drain_scope is not None:
            self._drain_scope.reschedule(asyncio.get_running_loop().time())

    def endpoint_stats(self) -> dict[str, EndpointStats]:
        """The counters of every endpoint a batch was taken for so far."""
        return {name: ep.stats for name, ep in self._sender.endpoints.items()}

    async def run(self, batches: Iterable[Batch] | AsyncIterable[Batch] | LaneSource) -> DispatchReport:
        """Send every batch (phases in order) and return the report; never raises for platform errors.

        ``batches``: a :class:`LaneSource` (a plan: sent in per-endpoint lanes) or an iterable of batches in
        phase order (sent through one lane per phase).
        """
        clock = self._sender.clock()
        started = clock.time()
        # While sending, a ledger whose database connection is lost waits for it off the event loop
        # (RunLedger.sending): the loop goes on serving the run's other connections meanwhile.
        with self._ledger.sending() if self._ledger is not None else contextlib.nullcontext():
            try:
                if isinstance(batches, LaneSource):
                    await self._run_phases(batches)
                else:
                    with _PullThreads() as threads:
                        await self._run_plain(_Pull(batches, threads.new("plan")))
            except* PushSyncError as group:
                # A failure of our own (the ledger cannot be written, a plan out of phase order) ends the run;
                # it surfaces as itself, not wrapped in an ExceptionGroup, so the CLI can map it to an exit code.
                raise _first_error(group) from None
            if self._ledger is not None:
                await self._ledger.flush_async()
        # A stop after the last answer changes nothing.
        finished = self._fed_all and self._sender.done == self._queued
        outcome = (
            DispatchOutcome.ABORTED
            if self._sender.fatal is not None
            else DispatchOutcome.INTERRUPTED
            if self._stop.is_set() and not finished
            else DispatchOutcome.COMPLETED
        )
        for name, ep in self._sender.endpoints.items():
            meter = meter_of(ep.budget)
            if meter is not None:
                ep.stats.budget_requests = int(meter.ceiling) if meter.ceiling else None
                ep.stats.budget_period = meter.period if meter.ceiling else None
                ep.stats.discovered_rate = meter.rate if meter.ceiling is None else None
                budget_stats = meter.stats()
                ep.stats.starved_windows = budget_stats.starved_windows
                ep.stats.stalled_windows = budget_stats.stalled_windows
            self._log.debug("endpoint.done", endpoint=name, requests=ep.stats.requests)
        groups = self._sender.pool.group_report() if self._sender.pool is not None else ()
        for budget_group in groups:
            stats = budget_group.stats
            self._log.debug(
                "budget_group.done", group=budget_group.name, released=stats.released, rate=stats.rate
            )
        return DispatchReport(
            outcome=outcome,
            endpoints=self.endpoint_stats(),
            elapsed=clock.time() - started,
            batches_done=self._sender.done,
            batches_unfinished=self._queued - self._sender.done,
            fatal=self._sender.fatal,
            groups=groups,
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
                # A thread per lane for its pulls (see the module docstring); ended with the lanes.
                with _PullThreads() as threads:
                    for name, batches in step:
                        workers_n = max(1, min(self._sender.endpoint_cap(name), self._settings.concurrency))
                        channel: Channel[Batch] = Channel(max(1, self._settings.queue_size))
                        lanes.append(
                            _Lane(name, _Pull(batches, threads.new(name)), channel, workers_n, phase)
                        )
                    self._log.debug(
                        "phase.start", phase=phase.name.lower(), lanes=[lane.name for lane in lanes]
                    )
                    await self._run_lanes(lanes)
                complete = complete and all(lane.exhausted for lane in lanes)
            if not complete:
                break
        self._fed_all = complete

    async def _run_plain(self, pull: _Pull) -> None:
        """A plain plan: one lane per phase, each finished before the next phase's first batch is sent."""
        workers_n = max(1, self._settings.concurrency)
        bound = max(self._settings.queue_size, workers_n)
        carry: list[Batch] = []
        more = True
        while not self._stop.is_set():
            if not carry and more:
                want = min(_FEED_CHUNK, bound) if pull.is_async else _FEED_CHUNK
                carry = await pull.take(want)
                more = len(carry) == want
            if not carry:
                self._fed_all = True
                return
            channel: Channel[Batch] = Channel(bound)
            lane = _Lane(
                "plan", pull, channel, workers_n, carry[0].phase, plain=True, next_batch=carry, more=more
            )
            await self._run_lanes([lane])
            carry, more = lane.next_batch, lane.more
            if not lane.exhausted:
                return
            if not carry and not more:
                self._fed_all = True
                return

    async def _run_lanes(self, lanes: Sequence[_Lane]) -> None:
        """Run the lanes' feeders and workers until every worker has finished, or drain them on a stop."""
        for lane in lanes:
            self._sender.finishing(None if lane.plain else lane.name, on=False)
        async with asyncio.TaskGroup() as tg:
            feeders = [tg.create_task(self._feed(lane), name=f"feeder-{lane.name}") for lane in lanes]
            workers = [
                tg.create_task(self._worker(lane), name=f"worker-{lane.name}-{i}")
                for lane in lanes
                for i in range(lane.workers)
            ]
            stop_wait = tg.create_task(self._stop.wait(), name="stop-wait")
            flusher = tg.create_task(self._flush_ledger(), name="ledger-flush") if self._ledger else None
            try:
                while not self._stop.is_set():
                    running = [w for w in workers if not w.done()]
                    if not running:
                        break
                    await asyncio.wait([stop_wait, *running], return_when=asyncio.FIRST_COMPLETED)
                if self._stop.is_set():
                    for feeder in feeders:
                        feeder.cancel()
                    for lane in lanes:
                        lane.channel.discard()  # never taken: they stay planned
                        lane.channel.close()  # idle workers end now
                    await self._drain(workers)
            finally:
                stop_wait.cancel()
                if flusher is not None:
                    flusher.cancel()

    # -- feeding and draining ----------------------------------------------------------------------------

    async def _feed(self, lane: _Lane) -> None:
        """Send the lane's batches into its channel, then close it. An endpoint's lane never holds more batches
        that no worker has taken than its channel's bound (pulls are sized to the room that is free); a plain
        plan from a synchronous iterable holds one pulled chunk besides."""
        channel = lane.channel
        # Refill in chunks once a good part of the room is free: one thread hop per chunk, not per batch.
        refill = max(1, min(_FEED_CHUNK, channel.statistics().max_buffered // 2))
        chunk, lane.next_batch = lane.next_batch, []
        while True:
            for i, batch in enumerate(chunk):
                if batch.phase != lane.phase:
                    if lane.plain and batch.phase > lane.phase:
                        lane.next_batch = chunk[i:]  # a plain plan's next phase: after this one finishes
                        lane.exhausted = True
                        channel.close()
                        return
                    raise StateError(
                        f"lane {lane.name} of phase {lane.phase.name} yielded batch {batch.batch_id} of phase "
                        f"{batch.phase.name}"
                        if not lane.plain
                        else f"plan out of phase order: batch {batch.batch_id} ({batch.phase.name}) after "
                        f"{lane.phase.name}"
                    )
                await channel.wait_room(1)
                if self._stop.is_set():
                    return
                if self._ledger is not None:
                    self._ledger.record_planned(self._run_id, batch)
                self._queued += 1
                self._open[batch.batch_id] = None
                channel.send_nowait(batch)
            if not lane.more:
                break
            # A plain plan pulls whole chunks and hands them over as room frees (as it always did); a lane
            # pulls no more than the room that is free, so it never holds more than its channel's bound; an
            # on-demand lane (BatchPuller) pulls only for workers waiting with nothing buffered.
            if lane.pull.on_demand:
                want = await channel.wait_demand()
            elif lane.plain and not lane.pull.is_async:
                want = _FEED_CHUNK
            elif lane.pulls < _FEED_CHUNK:
                # A lane's first batches are pulled one at a time: a pull waits until it has all it asked for,
                # so each batch a lazy plan made from the head of its input is queued as soon as it is made,
                # and none waits in a pull that only the settled rest of the input can fill (they fill the
                # first budget window while the rest is settled). 64 thread hops, once per lane.
                await channel.wait_room(1)
                want = 1
            else:
                await channel.wait_room(refill)
                want = min(_FEED_CHUNK, channel.free)
            if self._stop.is_set():
                return
            lane.pulls += 1
            chunk = await lane.pull.take(want)
            lane.more = bool(chunk) if lane.pull.on_demand else len(chunk) == want
            if self._stop.is_set():
                return
        lane.exhausted = True
        channel.close()

    async def _drain(self, workers: list[asyncio.Task[None]]) -> None:
        """Give busy workers ``drain_timeout`` seconds (cut short by :meth:`force_stop`), then cancel the rest."""
        running = [w for w in workers if not w.done()]
        if not running:
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._settings.drain_timeout) as scope:
                self._drain_scope = scope
                if self._forced:
                    scope.reschedule(loop.time())
                await asyncio.wait(running)
        except TimeoutError:
            pass
        finally:
            self._drain_scope = None
        late = [w for w in running if not w.done()]
        for task in late:
            task.cancel()
        if late:
            self._log.warning("drain.cut_short", cancelled=len(late), forced=self._forced)

    async def _flush_ledger(self) -> None:
        assert self._ledger is not None
        while True:
            await asyncio.sleep(0.05)
            await self._ledger.maybe_flush_async()

    # -- workers -------------------------------------------------------------------------------------------

    async def _worker(self, lane: _Lane) -> None:
        async for batch in lane.channel:
            try:
                if self._stop.is_set():
                    return
                if batch.after is not None and batch.after in self._open:
                    # Its predecessor was queued earlier (so a worker already took it): wait for its end, so
                    # e.g. one user's events reach the platform in file order across requests.
                    done = self._open[batch.after] or asyncio.Event()
                    self._open[batch.after] = done
                    await done.wait()
                await self._sender.process(batch)
            finally:
                finished = self._open.pop(batch.batch_id, None)
                if finished is not None:
                    finished.set()
        # The lane's channel is closed and empty: only the attempts of its other workers are left.
        self._sender.finishing(None if lane.plain else lane.name)


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


def _take(iterator: Iterator[Batch], n: int) -> list[Batch]:
    out: list[Batch] = []
    for batch in iterator:
        out.append(batch)
        if len(out) >= n:
            break
    return out


class _PullThreads:
    """The worker threads that pull from a synchronous plan: one per lane (a single-thread executor each, so a
    lane's pulls stay in order and its iterator is only ever advanced by one thread at a time). Leaving the
    ``with`` block shuts them down without waiting: a pull cut short by a stop ends on its own, and the loop
    must not block on it."""

    __slots__ = ("_executors",)

    def __init__(self) -> None:
        self._executors: list[ThreadPoolExecutor] = []

    def new(self, lane: str) -> ThreadPoolExecutor:
        """A pull thread for ``lane`` (made when its first pull is submitted)."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"plan-pull-{lane}")
        self._executors.append(executor)
        return executor

    def __enter__(self) -> _PullThreads:
        return self

    def __exit__(self, *_exc: object) -> None:
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)


class _Pull:
    """Takes batches from an iterable of batches, a few at a time: a synchronous one in its lane's pull thread
    (so the loop never blocks on planning, and lanes never wait for one another's pulls), an asynchronous one
    directly."""

    __slots__ = ("_async", "_demand", "_executor", "_sync")

    def __init__(self, batches: Iterable[Batch] | AsyncIterable[Batch], executor: ThreadPoolExecutor) -> None:
        self._demand: BatchPuller | None = batches if isinstance(batches, BatchPuller) else None
        self._async: AsyncIterator[Batch] | None = (
            aiter(batches) if self._demand is None and isinstance(batches, AsyncIterable) else None
        )
        self._sync: Iterator[Batch] | None = (
            iter(batches) if self._demand is None and not isinstance(batches, AsyncIterable) else None
        )
        self._executor = executor

    @property
    def is_async(self) -> bool:
        """The batches come from an asynchronous iterable (no worker thread involved)."""
        return self._async is not None

    @property
    def on_demand(self) -> bool:
        """The batches come from a :class:`BatchPuller`: pulled only for waiting workers."""
        return self._demand is not None

    async def take(self, n: int) -> list[Batch]:
        """Up to ``n`` batches; fewer only at the end (a :class:`BatchPuller`: whatever it has ready)."""
        if self._demand is not None:
            return await self._demand.take(n)
        if self._async is not None:
            out: list[Batch] = []
            while len(out) < n:
                try:
                    out.append(await anext(self._async))
                except StopAsyncIteration:
                    break
            return out
        assert self._sync is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, _take, self._sync, n)


def _first_error(group: BaseExceptionGroup[PushSyncError]) -> PushSyncError:
    """The first of our own errors in a (possibly nested) exception group."""
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
