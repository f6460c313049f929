"""Rate budgets shared by every worker of a job: one row per budget in PostgreSQL, updated atomically.

Which design: **GCRA-like state in one row per budget** (not leased reservations). Each endpoint budget and each
budget group is a row ``(win, used, last_release, paused_until, anchor, late, carried)``; an attempt calls the database function
``pushsync.take_slot`` (PL/pgSQL, :mod:`sync.coordination._db`), which locks the rows of its endpoint and of
every group holding it (``SELECT … FOR UPDATE``, in name order, so two workers never deadlock), computes the
earliest instant every one of them allows — the same rules as the single-process budget (:mod:`sync.dispatch.budget`):
at most N per clock-aligned window, inside ``[start + lead, end - margin)``, the k-th slot of a window from
``anchor + k × spacing`` on (the N slots over the first half of that zone), never before a pause ends — writes
the release into each row and commits. The worker then sleeps until that instant. A slot whose time has come
is given at once, so the slots a stalled worker (or a stalled fleet) missed are caught up, several at once, in
their window — never past its zone, never more than N — and a worker that wakes late still sends while its
slot's window is open (:func:`send_until`). A release in the second half of the zone (catching up, near the
edge) holds a slot of the next window until its answer says it came before the edge (:func:`late_releases`,
``late``/``carried``): the server may have counted it there. One round trip
per attempt, the rows locked only while the function runs; its cost is measured by ``bench/bench_scale.py``. Leased reservations (a worker takes k slots at a
time) would cost fewer round trips but strand slots in a worker that dies or idles, and could not keep the even
spacing across workers; with one row, three workers at the limit release exactly what one would.

Time is the database's clock (``clock_timestamp()``): every worker reads windows on the same clock, whatever
its own machine's says, and sleeps the difference. A 429 seen by any worker sets ``paused_until`` on the
endpoint's rows and its groups': every worker's next acquisition waits for it (Retry-After, capped; else until
the window ends). Endpoints without a configured budget and outside every group keep a budget of their own in
each worker (a discovered rate is per process).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from sync.config import DispatchSettings, RateBudgetSpec
from sync.coordination._db import SCHEMA, Link, safe_message
from sync.dispatch._rate_meter import _SLACK
from sync.dispatch.budget import Budget, BudgetClosedError, RateBudget
from sync.errors import StateError
from sync.logs import get_logger

__all__ = ["SharedBudgets", "SharedEndpointBudget", "SharedMeter", "late_releases", "send_until"]

S = SCHEMA
_SHIFT_LATE = (
    f"UPDATE {S}.budgets SET late = CASE WHEN win = %s THEN greatest(late + %s, 0) ELSE late END, "
    "carried = CASE WHEN win = %s THEN greatest(carried + %s, 0) ELSE carried END "
    "WHERE scope = %s AND name = %s AND win IN (%s, %s)"
)
"""One slot of the window after a budget's window held (+1) or given back (-1), in one statement: the row's
``late`` while that window is the row's, its ``carried`` once take_slot moved on to the next."""


@dataclass(frozen=True, slots=True)
class SharedMeter:
    """One shared budget's rules: N (``requests``) per ``period`` seconds, released inside ``[start + lead,
    end - margin)`` of each clock-aligned window (``align``), or evenly at N per ``period + margin``."""

    name: str
    requests: int
    period: float
    align: bool
    margin: float
    lead: float

    learn: bool = True
    """The margin follows this worker's release-to-answer times (a fixed ``margin:`` in the job: False)."""

    @classmethod
    def of(cls, name: str, spec: RateBudgetSpec) -> SharedMeter:
        # Several workers on shared cores wake later than one process alone: start from a wider margin than
        # the single-process default (0.2 T), then follow what this worker observes (SharedBudgets.observe).
        margin = spec.margin if spec.margin is not None else min(0.3 * spec.period, 2.0)
        return cls(
            name, spec.requests, spec.period, spec.align, margin, margin / 4, learn=spec.margin is None
        )


class SharedBudgets:
    """The job's shared budgets, for one worker: ``budget(endpoint)`` is the dispatcher's ``budget_factory``.

    ``link``: a connection of this worker's own (acquisitions are serialised on it; made again when lost — a
    reservation whose answer the loss swallowed is one slot unused, never one slot too many); ``scope``: what
    separates the budgets of different jobs (the job's name)."""

    def __init__(self, link: Link, settings: DispatchSettings, scope: str) -> None:
        self._link = link
        self._settings = settings
        self._scope = scope
        self._groups = {g.name: SharedMeter.of(f"group:{g.name}", g.budget) for g in settings.budget_groups}
        self._ready: set[str] = set()
        self._closed = asyncio.Event()
        self._local: dict[str, RateBudget] = {}
        self._latencies: deque[float] = deque(maxlen=200)
        # The attempts released late in a window (second half of its zone) still waiting for their answer:
        # (budget, window, its edge) of each, and the clock offset. By task: an attempt's answer is observed in
        # the task that acquired its slot; one without an answer is dropped with its task, its slots held.
        self._held: weakref.WeakKeyDictionary[
            asyncio.Task[Any], tuple[list[tuple[str, int, float]], float]
        ] = weakref.WeakKeyDictionary()
        self.acquisitions = 0
        self.late = 0
        """Slots given up because this worker woke too late for their window."""
        self.seconds = 0.0
        """Time spent in ``take_slot`` round trips (not in waiting for this worker's other acquisitions)."""
        self._log = get_logger(job=scope)

    def meters_for(self, endpoint: str) -> tuple[SharedMeter, ...]:
        """The rows an attempt at ``endpoint`` takes a slot from: its own budget (if configured) and its groups."""
        spec = self._settings.budgets.get(endpoint) or self._settings.budgets.get("*")
        own = (SharedMeter.of(endpoint, spec),) if spec is not None else ()
        groups = tuple(self._groups[g.name] for g in self._settings.budget_groups if g.holds(endpoint))
        return tuple(sorted((*own, *groups), key=lambda m: m.name))

    def budget(self, endpoint: str) -> Budget:
        """The endpoint's budget: shared when configured (or held by a group), else a local discovered one."""
        meters = self.meters_for(endpoint)
        if not meters:
            local = self._local.get(endpoint)
            if local is None:
                local = self._local[endpoint] = RateBudget(
                    None, max_pause=self._settings.retry.max_retry_after
                )
            return local
        return SharedEndpointBudget(self, endpoint, meters)

    def close(self) -> None:
        """Fail every waiting and later acquisition (the run is aborting)."""
        self._closed.set()
        for local in self._local.values():
            local.close()

    async def _ensure_rows(self, conn: psycopg.AsyncConnection[Any], meters: tuple[SharedMeter, ...]) -> None:
        missing = [m.name for m in meters if m.name not in self._ready]
        if not missing:
            return
        async with conn.cursor() as cur:
            await cur.executemany(
                f"INSERT INTO {S}.budgets (scope, name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                [(self._scope, name) for name in missing],
            )
        self._ready.update(missing)

    async def acquire(self, meters: tuple[SharedMeter, ...]) -> None:
        """Reserve the next instant every meter allows (one transaction), then sleep until it. A request must
        land in the window it was counted in: a worker that wakes late (a stalled loop) still sends while every
        aligned meter's sending zone of that window is open — it is counted there, and the slots the stall
        made it miss are caught up the same way (``take_slot`` gives a slot whose time has come at once) — and
        gives the slot up once a zone has closed (or, for an unaligned meter, once it is half a margin late),
        then takes another."""
        while True:
            if self._closed.is_set():
                raise BudgetClosedError("rate budget closed")
            t, offset, margins = await self._reserve(meters)
            delay = t - (time.time() + offset)
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._closed.wait()
            if self._closed.is_set():
                raise BudgetClosedError("rate budget closed")
            now = time.time() + offset
            if now < send_until(meters, margins, t):
                held = late_releases(meters, margins, t, now)
                if held:
                    # Sent in the second half of its window's zone: it holds a slot of the next window until
                    # its answer says it came in time (``answered``). ``take_slot`` held it already unless
                    # this worker woke late for a slot of the first half.
                    unheld = [(name, window) for name, window, _edge, by_db in held if not by_db]
                    if unheld:
                        await self._shift(unheld, +1)
                    task = asyncio.current_task()
                    if task is not None:
                        self._held[task] = ([(name, w, edge) for name, w, edge, _ in held], offset)
                return
            self.late += 1

    def answered(self) -> list[tuple[str, int]]:
        """The current attempt's answer came: the next-window slots its release held, to give back — those of
        windows whose edge it came before (it was counted in its own window then)."""
        task = asyncio.current_task()
        entry = self._held.pop(task, None) if task is not None else None
        if entry is None:
            return []
        held, offset = entry
        now = time.time() + offset
        return [(name, window) for name, window, edge in held if now < edge]

    async def _shift(self, held: Sequence[tuple[str, int]], delta: int) -> None:
        """Hold (+1) or give back (-1) one slot of the window after each ``(budget, window)``: the row's
        ``late`` while that window is the row's, its ``carried`` once the next window is."""

        async def write(conn: psycopg.AsyncConnection[Any]) -> None:
            for name, window in held:
                await conn.execute(
                    _SHIFT_LATE, (window, delta, window + 1, delta, self._scope, name, window, window + 1)
                )

        try:
            await self._link.run(write)
        except (psycopg.Error, StateError) as exc:  # a slot held or not given back: the budget stays safe
            self._log.warning("budget.late_not_shared", error=safe_message(exc))

    def margin(self, meter: SharedMeter) -> float:
        """The margin this worker keeps before a window's end for ``meter``: the meter's, or — learning — the
        99th percentile of this worker's release-to-answer times (with 20 % on top), within ``[the meter's
        default, 0.45 T]``."""
        if not meter.learn or len(self._latencies) < 20:
            return meter.margin
        ordered = sorted(self._latencies)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        return min(max(meter.margin, 1.2 * p99), 0.45 * meter.period)

    def observe(self, latency: float) -> None:
        """A release-to-answer time of this worker (its in-flight wait, the request and the answer)."""
        self._latencies.append(latency)

    def group_margin(self, group: str) -> float:
        """The margin this worker keeps for budget group ``group`` (for the summary's group lines)."""
        meter = self._groups.get(group)
        return 0.0 if meter is None else self.margin(meter)

    async def _reserve(self, meters: tuple[SharedMeter, ...]) -> tuple[float, float, list[float]]:
        """(the reserved instant, database clock minus this machine's, the margins it was reserved with): one
        call of ``take_slot``, the database function that locks the rows, finds the earliest instant every one
        allows and records the release (one round trip; the rows are locked for microseconds)."""
        margins = [self.margin(m) for m in meters]
        params = (
            self._scope,
            [m.name for m in meters],
            [m.requests for m in meters],
            [m.period for m in meters],
            [m.align for m in meters],
            margins,
            [m.lead for m in meters],
        )

        async def take(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, float, float]:
            await self._ensure_rows(conn, meters)
            # Timed here, once this worker's other acquisitions are done with the connection: waiting for them
            # is no part of the round trip the database clock is read in.
            sent_at, started = time.time(), time.perf_counter()
            cur = await conn.execute(
                f"SELECT slot_at, db_now FROM {S}.take_slot(%s, %s, %s, %s, %s, %s, %s)", params
            )
            return await cur.fetchone(), sent_at, time.perf_counter() - started

        try:
            row, sent_at, elapsed = await self._link.run(take)
        except psycopg.Error as exc:
            raise StateError(
                f"coordination database: cannot take a budget slot ({safe_message(exc)})"
            ) from None
        assert row is not None
        self.acquisitions += 1
        self.seconds += elapsed
        # The database read its clock about half-way through the round trip: close enough (a loopback or LAN
        # round trip is well under the margins, which are tens of milliseconds at least).
        return float(row[0]), float(row[1]) - (sent_at + elapsed / 2), margins

    async def pause(self, meters: tuple[SharedMeter, ...], seconds: float | None) -> None:
        """A 429: every worker waits ``seconds`` (Retry-After) or, without one, until the current window ends."""

        async def write(conn: psycopg.AsyncConnection[Any]) -> None:
            for m in meters:
                if seconds is not None:
                    until = "extract(epoch FROM clock_timestamp())::float8 + %s"
                    value: float = seconds
                else:  # until the end of the window the 429 fell in
                    until = "(floor(extract(epoch FROM clock_timestamp()) / %s) + 1) * %s"
                    value = m.period
                params: tuple[Any, ...] = (value,) if seconds is not None else (value, value)
                await conn.execute(
                    f"UPDATE {S}.budgets SET paused_until = greatest(paused_until, {until}) "
                    "WHERE scope = %s AND name = %s",
                    (*params, self._scope, m.name),
                )

        try:
            await self._link.run(write)  # greatest(): safe to repeat after a reconnection
        except (psycopg.Error, StateError) as exc:
            self._log.warning("budget.pause_not_shared", error=safe_message(exc))


def send_until(meters: Sequence[SharedMeter], margins: Sequence[float], t: float) -> float:
    """Until when (database clock) a slot reserved at ``t`` may still be sent: the end of the sending zone of
    ``t``'s window for an aligned meter (a request sent then still lands in the window it was counted in), half
    a margin after ``t`` for an unaligned one (the spacing must not shrink); the earliest of them."""
    ends = []
    for meter, margin in zip(meters, margins, strict=True):
        if meter.align:
            ends.append((math.floor(t / meter.period) + 1) * meter.period - margin)
        else:
            ends.append(t + margin / 2)
    return min(ends)


def late_releases(
    meters: Sequence[SharedMeter], margins: Sequence[float], t: float, now: float
) -> list[tuple[str, int, float, bool]]:
    """``(budget, window, its edge, held by take_slot)`` for each aligned meter whose slot reserved at ``t``,
    sent at ``now``, goes in the second half of its window's sending zone — where catching up releases, near the
    edge: such a request may reach the server after the edge and be counted in the next window, so it holds one
    of that window's N until its answer says otherwise (the rule of one process, sync/dispatch/_rate_meter.py).
    ``take_slot`` held it already when ``t`` itself was in that half (the same formula, in SQL)."""
    out = []
    for meter, margin in zip(meters, margins, strict=True):
        if not meter.align:
            continue
        window = math.floor(t / meter.period)
        gap = max(0.0, meter.period - meter.lead - margin) * (1 - _SLACK) / meter.requests
        late_from = window * meter.period + meter.lead + gap * meter.requests
        if now >= late_from:
            out.append((meter.name, window, (window + 1) * meter.period, t >= late_from))
    return out


class SharedEndpointBudget:
    """One endpoint's shared budget (the :class:`sync.dispatch.budget.Budget` protocol)."""

    def __init__(self, owner: SharedBudgets, endpoint: str, meters: tuple[SharedMeter, ...]) -> None:
        self._owner = owner
        self.endpoint = endpoint
        self.meters = meters
        self._tasks: set[asyncio.Task[None]] = set()

    async def acquire(self) -> None:
        await self._owner.acquire(self.meters)

    def close(self) -> None:
        self._owner.close()

    def on_rate_limited(self, retry_after: float | None, remaining: int | None = None) -> float:
        """Pause every worker (written to the rows by a task: the dispatcher calls this synchronously)."""
        cap = self._owner._settings.retry.max_retry_after
        seconds = None if retry_after is None else min(max(retry_after, 0.0), cap)
        task = asyncio.get_running_loop().create_task(self._owner.pause(self.meters, seconds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return seconds if seconds is not None else max(m.period for m in self.meters)

    def on_success(self, remaining: int | None = None, reset_after: float | None = None) -> None:
        """Nothing to adapt: the shared budget keeps the configured rate."""

    def observe(self, latency: float) -> None:
        """A release-to-answer time, for this worker's learned margin; the answer came, so a late release that
        came before its window's edge gives back the slot of the next window it held."""
        self._owner.observe(latency)
        back = self._owner.answered()
        if back:
            task = asyncio.get_running_loop().create_task(self._owner._shift(back, -1))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
