"""Rate budgets on a virtual-time loop: spacing, per-window caps under jitter, pauses, AIMD and discovery."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vtime import run_virtual

from sync.budget import RateBudget, clock_sleep
from sync.config import RateBudgetSpec


async def _release_times(budget: RateBudget, n: int) -> list[float]:
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def one() -> None:
        async with budget:
            times.append(loop.time())

    async with asyncio.TaskGroup() as tg:
        for _ in range(n):
            tg.create_task(one())
    return times


def _max_per_window(arrivals: list[float], period: float) -> int:
    return max(Counter(math.floor(a / period) for a in arrivals).values())


def test_aligned_releases_are_evenly_spaced_inside_each_window() -> None:
    budget = RateBudget(RateBudgetSpec(10, 1.0), tail=0.1, lead=0.02, wall_offset=0.0)
    times = run_virtual(_release_times(budget, 100))
    assert len(times) == 100
    per_window = Counter(math.floor(t) for t in times)
    assert set(per_window.values()) == {10}
    for t in times:
        assert 0.02 - 1e-9 <= t - math.floor(t) < 0.9
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= (0.88 / 10) - 1e-9  # never a burst
    assert max(times) < 10.0


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=120),
    period=st.sampled_from([0.5, 1.0, 2.0, 60.0]),
    jitter_fraction=st.floats(min_value=0.0, max_value=0.1),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_never_more_than_n_in_any_server_window_and_full_use(
    n: int, period: float, jitter_fraction: float, seed: int
) -> None:
    jitter = period * jitter_fraction
    budget = RateBudget(RateBudgetSpec(n, period), tail=jitter + 0.01 * period, wall_offset=0.0)
    times = run_virtual(_release_times(budget, n * 31))
    rng = random.Random(seed)
    arrivals = [t + rng.uniform(0, jitter) for t in times]
    assert _max_per_window(arrivals, period) <= n
    windows = math.floor(max(arrivals) / period) + 1
    assert len(arrivals) / (windows * n) >= 0.96  # 31 full windows; the partial last one costs < 4 %


def test_unaligned_sliding_cap_holds_n_per_period_plus_tail() -> None:
    budget = RateBudget(RateBudgetSpec(20, 1.0), align=False, tail=0.05)
    times = run_virtual(_release_times(budget, 200))
    times.sort()
    for i in range(len(times) - 20):
        assert times[i + 20] - times[i] >= 1.05 - 1e-9
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 1.05 / 20 - 1e-9


async def _paused_release(budget: RateBudget, retry_after: float | None) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    await budget.acquire()
    pause = budget.on_rate_limited(retry_after, None)
    await budget.acquire()
    return pause, loop.time()


@pytest.mark.parametrize(
    ("retry_after", "expected_pause"),
    # The first release happens at 0.05 (the window's lead); "until the window resets" is then 1.05 - 0.05.
    [(3.0, 3.0), (None, 1.0), (0.0, 1.0), (-5.0, 1.0), (1e9, 300.0), (math.inf, 1.0)],
)
def test_rate_limit_pauses_the_endpoint_with_guarded_retry_after(
    retry_after: float | None, expected_pause: float
) -> None:
    budget = RateBudget(RateBudgetSpec(5, 1.0), tail=0.2, lead=0.05, wall_offset=0.0)
    pause, released_at = run_virtual(_paused_release(budget, retry_after))
    assert pause == pytest.approx(expected_pause)
    assert released_at >= 0.05 + pause - 1e-9


def test_pause_holds_every_waiter_of_the_endpoint() -> None:
    async def scenario() -> list[float]:
        budget = RateBudget(RateBudgetSpec(100, 1.0), wall_offset=0.0)
        await budget.acquire()
        budget.on_rate_limited(2.5, 0)
        return await _release_times(budget, 5)

    assert min(run_virtual(scenario())) >= 2.5


def test_remaining_zero_on_success_waits_for_window_reset() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        budget = RateBudget(RateBudgetSpec(100, 1.0), tail=0.1, lead=0.01, wall_offset=0.0)
        await clock_sleep(loop, 0.3)
        await budget.acquire()
        budget.on_success(remaining=0)
        await budget.acquire()
        return loop.time()

    assert run_virtual(scenario()) == pytest.approx(1.01)


def test_repeated_429s_halve_the_rate_and_quiet_periods_restore_it() -> None:
    async def scenario() -> list[float | None]:
        loop = asyncio.get_running_loop()
        budget = RateBudget(RateBudgetSpec(40, 1.0), wall_offset=0.0)
        seen: list[float | None] = []
        await budget.acquire()
        budget.on_rate_limited(0.1, None)  # first 429: pause only
        seen.append(budget.rate)
        await clock_sleep(loop, 1.0)
        budget.on_rate_limited(0.1, None)  # repeated: x0.5
        budget.on_rate_limited(0.1, None)  # same burst (within a period of the change): no new decrease
        seen.append(budget.rate)
        await clock_sleep(loop, 1.01)
        budget.on_rate_limited(0.1, None)
        seen.append(budget.rate)
        for _ in range(30):
            await clock_sleep(loop, 1.01)
            budget.on_success()
        seen.append(budget.rate)
        return seen

    first, once, twice, recovered = run_virtual(scenario())
    assert (first, once, twice) == (40.0, 20.0, 10.0)
    assert recovered == 40.0  # additive +2 per period, capped at the ceiling


def test_no_budget_is_unthrottled_until_a_429_then_discovers_a_rate() -> None:
    async def scenario() -> tuple[float, float | None, list[float]]:
        loop = asyncio.get_running_loop()
        budget = RateBudget(None, wall_offset=0.0, discover_period=1.0)
        start = loop.time()
        await _release_times(budget, 60)
        burst = loop.time() - start
        budget.on_rate_limited(None, 0)
        rate = budget.rate
        times = await _release_times(budget, 60)
        return burst, rate, times

    burst, rate, times = run_virtual(scenario())
    assert burst == 0.0
    assert rate == 30.0  # 60 seen in the last second, halved
    assert _max_per_window(times, 1.0) <= 30


def test_cancelled_waiter_does_not_block_the_queue() -> None:
    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        budget = RateBudget(RateBudgetSpec(2, 1.0), align=False, tail=0.0)
        await budget.acquire()
        waiter = asyncio.create_task(budget.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await budget.acquire()
        return [loop.time()]

    assert run_virtual(scenario()) == [pytest.approx(0.5)]


class _CountingClock:
    """A clock that counts wake-ups: hundreds of waiters must not cost a timer per waiter per tick."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.timers = 0

    def time(self) -> float:
        return self.loop.time()

    def call_at(self, when: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        self.timers += 1
        return self.loop.call_at(when, callback)


def test_hundreds_of_waiters_are_woken_by_timers_not_polling() -> None:
    async def scenario() -> tuple[int, int]:
        clock = _CountingClock(asyncio.get_running_loop())
        budget = RateBudget(RateBudgetSpec(50, 1.0), clock=clock, wall_offset=0.0)
        times = await _release_times(budget, 500)
        return len(times), clock.timers

    released, timers = run_virtual(scenario())
    assert released == 500
    # Each arrival re-arms the one timer and each release sets the next one: O(waiters + releases).
    assert timers <= 2 * 500 + 10


def test_invalid_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="requests >= 1"):
        RateBudget(RateBudgetSpec(0, 1.0))
    with pytest.raises(ValueError, match="decrease"):
        RateBudget(RateBudgetSpec(1, 1.0), decrease=1.5)


def test_remaining_zero_on_success_is_ignored_when_unaligned() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        budget = RateBudget(RateBudgetSpec(10, 1.0), align=False, tail=0.0)
        await budget.acquire()
        budget.on_success(remaining=0)
        await budget.acquire()
        return loop.time()

    assert run_virtual(scenario()) == pytest.approx(0.1)
