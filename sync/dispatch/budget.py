"""Rate budgets: ``await budget.acquire()`` before every attempt (retries included).

A run has one :class:`BudgetPool`: every endpoint's own budget (``dispatch.budgets``) and every budget group
(``dispatch.budget_groups``, a budget shared by several endpoints — a limit per account or API key). An attempt
at an endpoint takes a slot from its endpoint's budget *and* from every group holding the endpoint, at the same
instant, so it is counted in the same window everywhere. Design (figures in ``docs/run.md``):

* **Even spacing** (GCRA with burst 1): releases are spread over the period, never sent as a burst at its
  start. A leaky bucket with burst N (``aiolimiter(N, T)``) put 199 into a 100-window.
* **Window alignment** (the default): servers that count in clock-aligned fixed windows accept N per window
  whatever the spacing. At most N are released per window, evenly, inside ``[start + lead, end - margin)``,
  where the margin covers the time from release to arrival. Every request then lands in the window it was
  counted in — never more than N per server window — and the whole budget is used. ``align: false`` (per
  budget, in the job file) selects N per ``T + margin`` instead, for servers that count sliding windows.
* **A hard cap on actual release times**: never more than N released in a window, counted when each request
  is released, whatever the timers did (``align: false``: N per sliding ``T + margin``).
* **Releases timed from the clock, not from the loop**: the i-th release of a window may go from its slot's
  time on, only inside the window's sending zone. A loop that wakes late (a CPU-bound neighbour, the
  interpreter held by another thread) releases every slot of the window whose time has come, so the budget
  does not depend on the loop being on time; no slot of the next window goes early, and a slot the zone's end
  overtook is gone, never carried over the edge (no burst across a window edge). The N slots fill the first
  half of the zone; the second half is room to catch up. Slots of a window that follows a busy one are placed from
  the zone's start; after an idle window or a pause the slots count from the first release (a window entered
  mid-way is not sent as a burst, nor is the end of a 429's pause). The budget's first window is the exception:
  its N slots are spread, evenly, over the first half of what was left of its zone at the run's first release,
  so a run whose plan is ready mid-window still sends N there (each request it left unsent put the run's end
  one spacing later) — never more than N, and never closer than a quarter of the nominal spacing (no burst of
  N when the run begins just before the zone's end). Once the run's first answers came, it also sends in its
  edge, past the zone's end (the default margin: nothing learned yet) up to where a request as slow as the
  slowest answer so far is answered ``lead`` before the window's end; each request released there whose
  answer has not come by then takes one of the next window's N, this budget's answers reported yet or not.
* **The run's last attempts come closer**: once every batch of an endpoint was taken by a worker
  (:meth:`EndpointBudget.finishing`, from the dispatcher), its budget's slots — a group's once every endpoint
  it holds is finishing — come four times closer than nominal, so the last window's requests leave at its
  start and the run ends sooner.
  An earlier design also capped N per sliding T over release times: every late release then stayed late in
  every later window (the cap held each slot at or after the same slot of the window before plus T), and on a
  loaded core slots fell off the windows' ends (86–99 % of the budget end to end; ``docs/run.md``).
* **Late releases that may have crossed the edge**: a request released in the second half of a window's zone
  (catching up) with no answer when the window ends may have been counted by the server in the next window,
  so it takes one of the next window's N (an answer read just after our own loop stalled, which may have come
  in before the edge, gives it back).
* **Per-window records** (:class:`WindowUse`, a ``budget.window`` debug line each): allowed, released, and
  why the other slots were not — nobody waited (idle), the loop or another limit did not release a waiting
  attempt in time (waiting), a pause, or held for late releases of the window before (carried).
* **Margin learned from latency**: unless the job fixes it (``margin:``), the margin before a window's end
  starts at ``min(0.2 T, 1 s)`` and then follows the p99 of the release-to-answer times observed, within
  ``[10 ms, min(0.3 T, 2 s)]``: a fast network gives more of each window to sending, a slow one more margin.
  In a pool the p99 is over every endpoint's answers (one server, one network), and every budget and group
  of the pool uses it: a group never keeps a slot near a window's end that its endpoints' own budgets, still
  at a wider margin, would refuse.
* **Adaptation that does not collapse on one 429**: every 429 pauses the budget (``Retry-After``, guarded;
  else until the window resets) — a 429 on any endpoint of a group pauses the group. The rate is lowered by
  30 % only after a window in which more than 10 % of the answers were 429s, and raised by 10 % after two
  windows in a row without one, up to the configured budget (RudderStack's router does the same). With no
  configured budget the rate is *discovered*: no throttle until the first 429, then the rate seen in the last
  period, lowered.
* **Fair sharing of a group: round robin** between the endpoints that have an attempt waiting. Each release
  goes to the next waiting endpoint whose own budget allows it, so an endpoint held back by its own budget
  leaves the group's slots to the others (no slot is wasted). Splitting in proportion to remaining work would
  not end a phase sooner — a phase ends when the group's total is sent either way — and would need the
  dispatcher to know the work ahead; round robin needs nothing and keeps every lane moving.

Time comes from an injectable clock (by default the running loop: ``loop.time()`` and ``loop.call_at``), so
tests run on a virtual-time loop and never sleep for real. One timer per pool wakes waiters; there is no
polling, and releases are timed from the clock, never from how fast the loop runs.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from sync.config import BudgetGroupSpec, DispatchSettings, RateBudgetSpec
from sync.dispatch._rate_meter import MIN_MARGIN, BudgetStats, LatencyLearner, RateMeter, WindowUse

__all__ = [
    "MIN_MARGIN",
    "Budget",
    "BudgetClosedError",
    "BudgetGroupStats",
    "BudgetPool",
    "BudgetStats",
    "Clock",
    "EndpointBudget",
    "RateBudget",
    "WindowUse",
    "clock_sleep",
    "meter_of",
]

_EPS = 1e-9
_STALL_READ = 0.1  # seconds after a stall in which the answers read may have come in during it


class _Handle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic time and timed call-backs; an :class:`asyncio.AbstractEventLoop` is one."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object], /) -> _Handle: ...


class BudgetClosedError(Exception):
    """Raised by ``acquire`` once the budget is closed (the run is aborting)."""


class Budget(Protocol):
    """What the dispatcher needs from an endpoint's rate budget."""

    async def acquire(self) -> None: ...

    def close(self) -> None: ...

    def on_rate_limited(self, retry_after: float | None, remaining: int | None) -> float: ...

    def on_success(self, remaining: int | None = None, reset_after: float | None = None) -> None: ...

    def observe(self, latency: float) -> None: ...


async def clock_sleep(clock: Clock, delay: float) -> None:
    """Sleep ``delay`` seconds of ``clock`` time (a ``call_at`` wake-up, so a virtual clock works too)."""
    if delay <= 0:
        await asyncio.sleep(0)
        return
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _wake() -> None:
        if not fut.done():
            fut.set_result(None)

    handle = clock.call_at(clock.time() + delay, _wake)
    try:
        await fut
    finally:
        handle.cancel()


class _Lane:
    """The attempts waiting for one endpoint (FIFO) and the meters each of them needs."""

    __slots__ = ("closed", "finishing", "meters", "name", "waiters")

    def __init__(self, name: str, meters: tuple[RateMeter, ...]) -> None:
        self.name = name
        self.meters = meters  # the endpoint's own budget (if any) and every group holding it
        self.waiters: deque[tuple[asyncio.Future[None], float]] = deque()  # (waiter, since when it waits)
        self.closed = False  # set by close(): waiters fail with BudgetClosedError
        self.finishing = False  # only the endpoint's last attempts are left (see RateMeter.set_finishing)

    def earliest(self, now: float) -> float:
        """Earliest time every meter allows the next release (a common fixed point of their schedules)."""
        t = now
        if len(self.meters) == 1:  # the usual case, without the generator below (asked at every request)
            meter = self.meters[0]
            for _ in range(8):
                nxt = meter.earliest(now, t)
                if nxt <= t + _EPS:
                    return t
                t = nxt
            return t
        for _ in range(8):
            nxt = max((m.earliest(now, t) for m in self.meters), default=t)
            if nxt <= t + _EPS:
                return t
            t = nxt
        return t  # not settled: the timer fires then and asks again


class _Scheduler:
    """Releases waiting attempts of several lanes: one timer, FIFO within a lane, round robin between lanes."""

    __slots__ = ("_bound", "_clock", "_lanes", "_next", "_seen", "_stall", "_timer", "_timer_at")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lanes: list[_Lane] = []
        self._bound: set[int] = set()  # ids of meters already wired to this scheduler
        self._next = 0  # round robin: the lane index asked first at the next release
        self._timer: _Handle | None = None  # the one pending wake-up, if any
        self._timer_at = math.inf  # when it fires
        self._stall = (-math.inf, -math.inf)  # the last stretch the loop did not run: (last seen, woke)
        self._seen = -math.inf  # the last time the loop was seen running (an acquire, an answer, a timer)

    def add(self, name: str, meters: tuple[RateMeter, ...]) -> _Lane:
        lane = _Lane(name, meters)
        for meter in meters:
            if id(meter) not in self._bound:
                self._bound.add(id(meter))
                meter.bind(self._clock.time, self.schedule)
            meter.set_finishing(False)  # a group's new endpoint brings new work
        self._lanes.append(lane)
        return lane

    def finishing(self, lane: _Lane, on: bool) -> None:
        """Only ``lane``'s last attempts are left (``on``), or new work came for it after all: each of its meters
        closes up its slots (:meth:`RateMeter.set_finishing`) once every lane it limits is finishing."""
        lane.finishing = on
        for meter in lane.meters:
            meter.set_finishing(on and all(other.finishing for other in self._lanes if meter in other.meters))

    async def acquire(self, lane: _Lane) -> None:
        if lane.closed:
            raise BudgetClosedError("rate budget closed")
        now = self._clock.time()
        self._seen = now
        # Straight through only when nobody waits: a waiting attempt of another lane comes first (fairness).
        if not any(other.waiters for other in self._lanes) and lane.earliest(now) <= now + _EPS:
            for meter in lane.meters:
                meter.release(now, waited=False)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane.waiters.append((fut, now))
        self.schedule()
        try:
            await fut
        except asyncio.CancelledError:
            # A waiter released and cancelled in the same step has spent its slot: that errs on the safe side.
            self.schedule()
            raise

    def time(self) -> float:
        """The clock's time."""
        return self._clock.time()

    def close(self, lane: _Lane) -> None:
        lane.closed = True
        while lane.waiters:
            fut, _ = lane.waiters.popleft()
            if not fut.done():
                fut.set_exception(BudgetClosedError("rate budget closed"))
        self.schedule()

    def schedule(self, due: float | None = None) -> None:
        """Release every waiter that is due now (round robin between lanes), and set one timer for the next.
        ``due``: when the timer that calls this was due (its lateness is told to the meters)."""
        clock = self._clock
        lanes = self._lanes
        while True:
            now = clock.time()
            soonest = math.inf
            released = False
            for i in range(len(lanes)):
                index = (self._next + i) % len(lanes)
                lane = lanes[index]
                while lane.waiters and lane.waiters[0][0].done():  # cancelled while waiting
                    lane.waiters.popleft()
                if not lane.waiters:
                    continue
                when = lane.earliest(now)
                if when <= now + _EPS:
                    fut, since = lane.waiters.popleft()
                    for meter in lane.meters:
                        meter.release(now, due=due, since=since)
                    fut.set_result(None)
                    self._next = (index + 1) % len(lanes)
                    released = True
                    break
                soonest = min(soonest, when)
            if not released:
                break
        if soonest == self._timer_at and self._timer is not None:
            return  # already set for that moment
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf
        if soonest < math.inf:
            self._timer = clock.call_at(soonest, self._on_timer)
            self._timer_at = soonest

    def _on_timer(self) -> None:
        due = self._timer_at
        self._timer = None
        self._timer_at = math.inf
        now = self._clock.time()
        if now - due > MIN_MARGIN:
            # The loop did not run from some time after it was last seen until now: answers it reads next
            # may have been received in that stretch.
            self._stall = (min(self._seen, due), now)
        self._seen = now
        self.schedule(due)

    def received_by(self, now: float) -> float:
        """The earliest an answer processed at ``now`` may have been received: when the loop has just come
        out of a stall (a timer fired late), the answers it reads then may have waited in the socket since it
        was last seen running; otherwise ``now``."""
        seen, woke = self._stall
        self._seen = now
        return seen if woke <= now <= woke + _STALL_READ else now


class RateBudget(RateMeter):
    """One budget on its own: at most N requests per period T, evenly spaced, adapting to 429s.

    ``spec=None`` means no configured budget: unthrottled until the first 429, then discovered. ``align``
    (default: the spec's) releases per clock-aligned window; ``tail`` fixes the margin at a window's end
    (default: the spec's ``margin``, else learned from latencies); ``lead`` the margin at its start (default
    ``tail / 4``); ``wall_offset`` is wall-clock time minus ``clock.time()`` (measured when None), which places
    the windows on the server's clock; ``expect_answers``: every answer will be reported (:meth:`observe`), so
    the first window's late releases are held against the next window even before the first answer (and its
    edge may be used). For endpoints that share budget groups, use a :class:`BudgetPool`.
    """

    __slots__ = ("_clock", "_lane", "_sched")

    def __init__(
        self,
        spec: RateBudgetSpec | None,
        *,
        clock: Clock | None = None,
        align: bool | None = None,
        tail: float | None = None,
        lead: float | None = None,
        wall_offset: float | None = None,
        decrease: float = 0.7,
        max_pause: float = 300.0,
        discover_period: float = 1.0,
        expect_answers: bool = False,
    ) -> None:
        super().__init__(
            spec,
            align=align,
            tail=tail,
            lead=lead,
            wall_offset=wall_offset,
            decrease=decrease,
            max_pause=max_pause,
            discover_period=discover_period,
            expect_answers=expect_answers,
        )
        self._clock: Clock | None = clock  # None: the running loop, looked up on first use
        self._sched: _Scheduler | None = None
        self._lane: _Lane | None = None

    def _lane_of(self) -> tuple[_Scheduler, _Lane]:
        if self._sched is None or self._lane is None:
            clock = self._clock if self._clock is not None else asyncio.get_running_loop()
            self._sched = _Scheduler(clock)
            self._lane = self._sched.add(self.name, (self,))
        return self._sched, self._lane

    def _now(self) -> float:
        self._lane_of()
        return super()._now()

    def window_of(self, t: float) -> int:
        """Index of the clock-aligned period holding clock time ``t`` (for per-window counts)."""
        self._lane_of()
        return super().window_of(t)

    def observe(self, latency: float) -> None:
        """One release-to-answer time (see :meth:`RateMeter.observe`); an answer read just after the loop was
        stalled may have been received when the stall began."""
        sched, _ = self._lane_of()
        now = sched.time()
        self.answered(now - latency, sched.received_by(now))
        self.learn(latency)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def acquire(self) -> None:
        """Wait for this caller's slot (FIFO). Cancelling the wait gives the slot up.

        Raises :class:`BudgetClosedError` when the budget is (or gets) closed.
        """
        sched, lane = self._lane_of()
        await sched.acquire(lane)

    def close(self) -> None:
        """Fail every waiter and every later acquire: nothing more may be sent (the run is aborting)."""
        sched, lane = self._lane_of()
        sched.close(lane)

    def finishing(self, on: bool = True) -> None:
        """Only the run's last attempts are left (``on=False``: new work came after all); see
        :meth:`RateMeter.set_finishing`."""
        sched, lane = self._lane_of()
        sched.finishing(lane, on)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._lane is not None and self._lane.closed


@dataclass(frozen=True, slots=True)
class BudgetGroupStats:
    """One budget group's counters at the end of a run, for the summary."""

    name: str
    endpoints: tuple[str, ...]
    """The endpoints of this run that the group held (in order of first use)."""
    requests: int
    """The group's budget: N per ``period`` seconds."""
    period: float
    stats: BudgetStats


class EndpointBudget:
    """One endpoint's budget in a :class:`BudgetPool`: its own meter and the groups holding it."""

    __slots__ = ("_lane", "_learn", "_sched", "endpoint", "groups", "meter")

    def __init__(
        self,
        endpoint: str,
        meter: RateMeter | None,
        groups: tuple[RateMeter, ...],
        sched: _Scheduler,
        learn: Callable[[float], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.meter = meter
        """The endpoint's own budget; None when only groups limit it."""
        self.groups = groups
        """The groups holding the endpoint."""
        self._sched = sched
        self._lane = sched.add(endpoint, (*((meter,) if meter is not None else ()), *groups))
        self._learn = learn  # the pool's shared latency learner; None: each meter learns on its own

    async def acquire(self) -> None:
        """Wait for a slot of the endpoint's budget and of every group holding it, taken at the same instant."""
        await self._sched.acquire(self._lane)

    def close(self) -> None:
        """Fail every waiter and every later acquire (the run is aborting)."""
        self._sched.close(self._lane)

    def finishing(self, on: bool = True) -> None:
        """Every batch for this endpoint was taken by a worker: only their attempts (retries, splits) are left;
        ``on=False``: new batches came after all. See :meth:`RateMeter.set_finishing` (groups: once every endpoint
        they hold is finishing)."""
        self._sched.finishing(self._lane, on)

    def on_rate_limited(self, retry_after: float | None, remaining: int | None = None) -> float:
        """A 429: the endpoint and every group holding it pause (the server does not say which limit it hit)."""
        pauses = [m.on_rate_limited(retry_after, remaining) for m in self._lane.meters]
        return max(pauses, default=0.0)

    def on_success(self, remaining: int | None = None, reset_after: float | None = None) -> None:
        """A request went through (see :meth:`RateMeter.on_success`), for each meter."""
        for m in self._lane.meters:
            m.on_success(remaining, reset_after)

    def observe(self, latency: float) -> None:
        """A release-to-answer time, for the learned margins (the pool's, shared by all its meters), and for
        each meter's count of the answers to its window's releases."""
        if self._learn is None:
            for m in self._lane.meters:
                m.observe(latency)
            return
        now = self._sched.time()
        received = self._sched.received_by(now)
        for m in self._lane.meters:
            m.answered(now - latency, received)
        self._learn(latency)


class BudgetPool:
    """Every rate budget of one run: per endpoint (``budgets``, ``"*"`` for endpoints not named) and budget
    groups shared by several endpoints, released by one scheduler (see the module docstring). Made inside the
    running loop unless a ``clock`` is given."""

    __slots__ = (
        "_budgets",
        "_endpoints",
        "_group_specs",
        "_groups",
        "_learner",
        "_max_pause",
        "_sched",
        "_wall_offset",
    )

    def __init__(
        self,
        budgets: Mapping[str, RateBudgetSpec],
        groups: Sequence[BudgetGroupSpec] = (),
        *,
        clock: Clock | None = None,
        max_pause: float = 300.0,
        wall_offset: float | None = None,
    ) -> None:
        self._budgets = dict(budgets)
        self._group_specs = tuple(groups)
        self._max_pause = max_pause
        self._wall_offset = wall_offset
        self._sched = _Scheduler(clock if clock is not None else asyncio.get_running_loop())
        # One learned margin for the whole pool (same server, same network): see LatencyLearner.
        self._learner = LatencyLearner()
        self._groups: dict[str, RateMeter] = {
            g.name: RateMeter(
                g.budget,
                name=g.name,
                max_pause=max_pause,
                wall_offset=wall_offset,
                learner=self._learner,
                expect_answers=True,  # the dispatcher reports every answer (EndpointBudget.observe)
            )
            for g in self._group_specs
        }
        self._endpoints: dict[str, EndpointBudget] = {}

    @classmethod
    def from_settings(cls, settings: DispatchSettings, *, clock: Clock | None = None) -> BudgetPool:
        """The pool a job's ``dispatch`` settings describe."""
        return cls(
            settings.budgets, settings.budget_groups, clock=clock, max_pause=settings.retry.max_retry_after
        )

    def budget(self, endpoint: str) -> EndpointBudget:
        """The endpoint's budget (made on first use)."""
        found = self._endpoints.get(endpoint)
        if found is None:
            spec = self._budgets.get(endpoint) or self._budgets.get("*")
            groups = tuple(self._groups[g.name] for g in self._group_specs if g.holds(endpoint))
            # An endpoint limited only by groups has no budget of its own: a 429 then pauses its groups,
            # and no rate is "discovered" for the endpoint alone.
            meter = (
                RateMeter(
                    spec,
                    name=endpoint,
                    max_pause=self._max_pause,
                    wall_offset=self._wall_offset,
                    learner=self._learner,
                    expect_answers=True,
                )
                if spec is not None or not groups
                else None
            )
            if meter is not None:
                meter.follow_learner()  # an endpoint first used late in the run starts from what was learned
            found = EndpointBudget(endpoint, meter, groups, self._sched, self._observe)
            self._endpoints[endpoint] = found
        return found

    def _observe(self, latency: float) -> None:
        """A release-to-answer time at any endpoint: every learning meter of the pool follows the new p99."""
        if self._learner.observe(latency):
            for meter in self._meters():
                meter.follow_learner()

    def _meters(self) -> list[RateMeter]:
        out = list(self._groups.values())
        out.extend(b.meter for b in self._endpoints.values() if b.meter is not None)
        return out

    def group_stats(self) -> dict[str, BudgetStats]:
        """Counters of every budget group."""
        return {name: meter.stats() for name, meter in self._groups.items()}

    def group_report(self) -> tuple[BudgetGroupStats, ...]:
        """Every budget group that held an endpoint of this run, with its counters."""
        out = []
        for spec in self._group_specs:
            members = tuple(e for e, b in self._endpoints.items() if self._groups[spec.name] in b.groups)
            if members:
                stats = self._groups[spec.name].stats()
                out.append(
                    BudgetGroupStats(spec.name, members, spec.budget.requests, spec.budget.period, stats)
                )
        return tuple(out)

    def close(self) -> None:
        """Close every endpoint's budget."""
        for budget in self._endpoints.values():
            budget.close()


def meter_of(budget: Budget) -> RateMeter | None:
    """The rate meter that limits ``budget``'s endpoint (for its window counts and rates): its own, else its
    only group's; None if there is none."""
    if isinstance(budget, RateMeter):
        return budget
    if isinstance(budget, EndpointBudget):
        # Limited by one group only (NotifyVisitors' API families): that group's windows are the endpoint's.
        return budget.meter if budget.meter is not None or len(budget.groups) != 1 else budget.groups[0]
    return None
