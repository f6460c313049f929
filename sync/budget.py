"""Per-endpoint rate budgets: ``async with budget:`` before every attempt (retries included).

Design (measured figures in ``docs/run.md`` and ``bench/bench_rate.py``):

* **Even spacing** (GCRA with burst 1): releases are spread over the period instead of sent as a burst at its
  start. A leaky bucket with burst N (``aiolimiter(N, T)``) put 199 into a 100-window; asyncio-throttle alone
  sends its N as a burst at each period's start and landed 103 in one window once jitter moved a few across.
* **Window alignment** (the default): servers that count in clock-aligned fixed windows (each minute from
  ``:00``) accept N per window whatever the spacing. We release at most N per window, evenly, inside the part
  of the window from which a request still *arrives* in the same window: ``[start + lead, end - tail)``, where
  ``tail`` covers the worst one-way latency (network jitter) plus clock skew. Every request then lands in the
  window it was counted in — never more than N per server window — and the whole budget is used (~100 %).
  Without alignment, the only jitter-proof guarantee is N per ``T + tail`` (utilisation ``T / (T + tail)``,
  95 % for 50 per 1 s with 50 ms of jitter, above 99.9 % for 100 per minute); ``align=False`` selects it.
* **A hard sliding-window cap** of N per ``T`` (``T + tail`` unaligned) over actual release times, so no
  timer lateness or rate change can ever let N+1 out in one period. It is a deque of release times and one
  ``loop.call_at`` wake-up, not asyncio-throttle: asyncio-throttle polls with ``sleep`` (measured: much CPU
  with hundreds of waiters) and keeps no FIFO order among waiters.
* **Adaptation**: a 429 pauses the whole endpoint (``Retry-After``, guarded; else until the window resets);
  repeated 429s halve the rate (multiplicative decrease) and periods without one add back 5 % of the ceiling
  (additive increase) up to the configured budget. With no configured budget the limit is *discovered*:
  no throttle until the first 429, then the rate seen in the last period, times the decrease factor, AIMD on.

Time comes from an injectable clock (by default the running loop: ``loop.time()`` and ``loop.call_at``), so
tests run on a virtual-time loop and never sleep for real. Waiters are woken in FIFO order by one timer; there
is no polling.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from sync.config import RateBudgetSpec

__all__ = ["Budget", "BudgetClosedError", "BudgetStats", "Clock", "RateBudget", "clock_sleep"]

_EPS = 1e-9


class _Handle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic time and timed call-backs; an :class:`asyncio.AbstractEventLoop` is one."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object], /) -> _Handle: ...


class BudgetClosedError(Exception):
    """Raised by :meth:`RateBudget.acquire` once the budget is closed (the run is aborting)."""


class Budget(Protocol):
    """What the dispatcher needs from a rate budget."""

    async def acquire(self) -> None: ...

    def close(self) -> None: ...

    def on_rate_limited(self, retry_after: float | None, remaining: int | None) -> float: ...

    def on_success(self, remaining: int | None = None, reset_after: float | None = None) -> None: ...


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


@dataclass(frozen=True, slots=True)
class BudgetStats:
    """Counters for the summary: releases, 429s seen, time paused, and the current and configured rates."""

    released: int
    rate_limited: int
    paused_seconds: float
    rate: float | None
    ceiling: float | None
    period: float


class RateBudget:
    """At most N requests per period T for one endpoint, evenly spaced, adapting to 429s.

    ``spec=None`` means no configured budget: unthrottled until the first 429, then discovered (AIMD).
    ``align`` releases per clock-aligned window (see the module docstring); ``tail`` is the margin at a
    window's end (worst one-way latency + clock skew, default ``min(0.2 T, 1 s)``); ``lead`` the margin at its
    start (clock skew, default ``tail / 4``); ``wall_offset`` is wall-clock time minus ``clock.time()``
    (measured at construction when None), which places the windows on the server's clock.
    """

    __slots__ = (
        "_aligned",
        "_anchor",
        "_ceiling",
        "_clock",
        "_closed",
        "_count",
        "_decrease",
        "_discover_period",
        "_grid",
        "_history",
        "_last_429",
        "_last_change",
        "_last_release",
        "_lead",
        "_max_pause",
        "_paused_seconds",
        "_paused_until",
        "_period",
        "_rate",
        "_rate_limited",
        "_released",
        "_tail",
        "_timer",
        "_waiters",
        "_wall_offset",
        "_window",
    )

    def __init__(
        self,
        spec: RateBudgetSpec | None,
        *,
        clock: Clock | None = None,
        align: bool = True,
        tail: float | None = None,
        lead: float | None = None,
        wall_offset: float | None = None,
        decrease: float = 0.5,
        max_pause: float = 300.0,
        discover_period: float = 1.0,
    ) -> None:
        if spec is not None and (spec.requests < 1 or spec.period <= 0):
            raise ValueError(f"rate budget needs requests >= 1 and period > 0, got {spec}")
        if not 0 < decrease < 1:
            raise ValueError("decrease must be in (0, 1)")
        self._clock: Clock | None = clock  # None: the running loop, looked up on first use
        self._period: float = spec.period if spec else discover_period  # T, seconds
        self._ceiling: float | None = float(spec.requests) if spec else None  # configured N; None: discover
        self._rate: float | None = self._ceiling  # current allowed requests per period; None: unthrottled
        self._discover_period: float = discover_period
        self._decrease: float = decrease  # multiplicative factor applied on repeated 429s
        self._max_pause: float = max_pause  # a Retry-After above this is absurd and capped
        self._tail: float = min(0.2 * self._period, 1.0) if tail is None else tail  # margin before window end
        self._lead: float = self._tail / 4 if lead is None else lead  # margin after window start
        # Alignment only makes sense when the margins leave room to send in: otherwise fall back to spacing.
        self._aligned: bool = align and self._period - self._tail - self._lead > 0
        self._wall_offset: float | None = wall_offset  # wall clock minus clock.time(); None until measured
        self._waiters: deque[asyncio.Future[None]] = deque()  # FIFO of acquirers not yet released
        self._timer: _Handle | None = None  # the one pending wake-up, if any
        self._history: deque[float] = deque()  # release times within the last cap period (sliding cap)
        self._grid: float = -math.inf  # nominal time of the next evenly spaced slot (unaligned mode)
        self._last_release: float = -math.inf  # actual time of the last release
        self._window: int = -1  # index of the aligned window that _count refers to
        self._count: int = 0  # releases in that window
        self._anchor: float = -math.inf  # time of that window's first release: its slots count from here
        self._paused_until: float = -math.inf  # no release before this (Retry-After / window reset)
        self._last_429: float = -math.inf  # when the last 429 was reported
        self._last_change: float = -math.inf  # last rate change (additive increase steps from here)
        self._closed: bool = False  # set by close(): every waiter fails with BudgetClosedError
        self._released: int = 0
        self._rate_limited: int = 0
        self._paused_seconds: float = 0.0

    # -- public face -------------------------------------------------------------------------------------

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
        if self._closed:
            raise BudgetClosedError("rate budget closed")
        clock = self._get_clock()
        if not self._waiters and self._due(clock.time()):
            self._release(clock.time())
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._schedule()
        try:
            await fut
        except asyncio.CancelledError:
            # A waiter released and cancelled in the same step has spent its slot: that errs on the safe side.
            self._schedule()
            raise

    def close(self) -> None:
        """Fail every waiter and every later acquire: nothing more may be sent (the run is aborting)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(BudgetClosedError("rate budget closed"))

    def on_rate_limited(self, retry_after: float | None, remaining: int | None = None) -> float:
        """A 429 came back: pause the whole endpoint and, if 429s repeat, lower the rate. Returns the pause.

        The pause is ``retry_after`` when it is usable (capped at ``max_pause``); when it is absent, zero or
        negative, the endpoint waits until the rate window resets (``X-RateLimit-Remaining`` said 0, or the
        server said nothing at all).
        """
        now = self._get_clock().time()
        self._rate_limited += 1
        if retry_after is not None and retry_after > 0 and math.isfinite(retry_after):
            pause = min(retry_after, self._max_pause)
        else:
            # No usable Retry-After (absent, 0, negative): wait until the window resets.
            pause = self._until_window_reset(now)
        repeated = now - self._last_429 < 2 * self._period
        self._last_429 = now
        if self._rate is None:
            # Discovery: the rate that just failed, a little lower, is our first estimate.
            seen = sum(1 for t in self._history if t > now - self._discover_period)
            self._rate = max(1.0, seen * self._decrease)
            self._period = self._discover_period
            self._history.clear()
            self._last_change = now
        elif repeated and now - self._last_change >= self._period:
            # At most one decrease per period: the other 429s of the same burst answer requests that were
            # already in flight before the rate changed, and carry no new information.
            self._rate = max(1.0, self._rate * self._decrease)
            self._last_change = now
        until = now + pause
        if until > self._paused_until:
            self._paused_seconds += until - max(now, self._paused_until)
            self._paused_until = until
        self._schedule()
        return pause

    def on_success(self, remaining: int | None = None, reset_after: float | None = None) -> None:
        """A request went through: recover additively, one step per quiet period, up to the ceiling.

        ``remaining`` is the server's ``X-RateLimit-Remaining``: at 0 the endpoint waits for the window reset
        instead of collecting a 429 first — ``reset_after`` seconds when the connector knows when the
        *platform's* window resets (capped at ``max_pause``), else until this budget's own window ends.
        """
        now = self._get_clock().time()
        exhausted = remaining is not None and remaining <= 0
        if exhausted and reset_after is not None and reset_after > 0 and math.isfinite(reset_after):
            # The platform's window may be longer than ours (100 per minute against a budget per second):
            # nothing more goes through until it resets, so sending on our own period only collects 429s.
            until = now + min(reset_after, self._max_pause)
            if until > self._paused_until:
                self._paused_seconds += until - max(now, self._paused_until)
                self._paused_until = until
                self._schedule()
        # Unaligned, the reset time is unknown and even spacing already keeps the pace: act on 429s only.
        elif exhausted and (self._aligned or self._rate is None):
            until = now + self._until_window_reset(now)
            if until > self._paused_until:
                self._paused_seconds += until - max(now, self._paused_until)
                self._paused_until = until
                self._schedule()
        if self._rate is None:
            return
        if now - self._last_429 < self._period or now - self._last_change < self._period:
            return
        step = max(1.0, (self._ceiling or self._rate) * 0.05)
        new = self._rate + step if self._ceiling is None else min(self._ceiling, self._rate + step)
        if new != self._rate:
            self._rate = new
            self._last_change = now

    @property
    def rate(self) -> float | None:
        """Requests per period currently allowed (None: unthrottled, nothing discovered yet)."""
        return self._rate

    @property
    def period(self) -> float:
        return self._period

    @property
    def ceiling(self) -> float | None:
        return self._ceiling

    def window_of(self, t: float) -> int:
        """Index of the clock-aligned budget period holding clock time ``t`` (for per-window counts)."""
        self._get_clock()
        return self._window_bounds(t)[0]

    def stats(self) -> BudgetStats:
        return BudgetStats(
            released=self._released,
            rate_limited=self._rate_limited,
            paused_seconds=self._paused_seconds,
            rate=self._rate,
            ceiling=self._ceiling,
            period=self._period,
        )

    # -- scheduling --------------------------------------------------------------------------------------

    def _get_clock(self) -> Clock:
        if self._clock is None:
            self._clock = asyncio.get_running_loop()
        if self._wall_offset is None:
            self._wall_offset = time.time() - self._clock.time()
        return self._clock

    def _n(self) -> int:
        assert self._rate is not None
        return max(1, int(self._rate + _EPS))

    def _window_bounds(self, t: float) -> tuple[int, float]:
        """The aligned window holding clock time ``t``: its index and start (in clock time)."""
        off = self._wall_offset or 0.0
        k = math.floor((t + off) / self._period + _EPS)
        return k, k * self._period - off

    def _until_window_reset(self, now: float) -> float:
        if self._aligned or self._rate is None:
            _, start = self._window_bounds(now)
            return start + self._period + self._lead - now
        return self._period + self._tail

    def _earliest(self, now: float) -> float:
        """Earliest time the next release may happen (>= now)."""
        t = max(now, self._paused_until)
        if self._rate is None:
            return t
        n = self._n()
        cap_period = self._period if self._aligned else self._period + self._tail
        history = self._history
        while history and history[0] <= now - cap_period:
            history.popleft()
        if len(history) >= n:
            t = max(t, history[-n] + cap_period)
        if not self._aligned:
            spacing = cap_period / n
            # The grid keeps slots evenly spaced without carrying timer lateness forward; the minimum gap
            # to the last actual release stops a late timer from being "caught up" as a burst.
            return max(t, self._grid, self._last_release + spacing / 2)
        usable = self._period - self._lead - self._tail
        spacing = usable / n
        t = max(t, self._last_release + spacing / 2)
        for _ in range(4):  # at most a couple of hops: the next window is always free
            k, start = self._window_bounds(t)
            zone_start, zone_end = start + self._lead, start + self._period - self._tail
            if k == self._window:
                # Slots count from the window's first release (not its start), so a run that begins
                # mid-window is evenly spaced too, and a late timer is not carried into later slots.
                count, slot = self._count, max(t, self._anchor + self._count * spacing)
            else:
                count, slot = 0, max(t, zone_start)
            if count < n and slot < zone_end:
                return slot
            t = max(t, start + self._period + self._lead)
        return t

    def _due(self, now: float) -> bool:
        return self._earliest(now) <= now + _EPS

    def _release(self, now: float) -> None:
        self._released += 1
        self._last_release = now
        if self._rate is None:
            # Unthrottled: remember recent releases only for discovery at the first 429.
            self._history.append(now)
            while self._history and self._history[0] <= now - self._discover_period:
                self._history.popleft()
            return
        self._history.append(now)
        n = self._n()
        if self._aligned:
            k, _ = self._window_bounds(now)
            if k != self._window:
                self._window, self._count, self._anchor = k, 0, now
            self._count += 1
        else:
            spacing = (self._period + self._tail) / n
            # On time (or a little late): keep the grid, so timer lateness is not carried forward.
            # Idle before this release: the grid restarts from now.
            base = self._grid if now - self._grid < spacing / 2 else now
            self._grid = base + spacing
        while len(self._history) > n:
            self._history.popleft()

    def _schedule(self) -> None:
        """Release every waiter that is due now, and set one timer for the next."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        clock = self._get_clock()
        while self._waiters:
            head = self._waiters[0]
            if head.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            now = clock.time()
            when = self._earliest(now)
            if when > now + _EPS:
                self._timer = clock.call_at(when, self._on_timer)
                return
            self._waiters.popleft()
            self._release(now)
            head.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        self._schedule()
