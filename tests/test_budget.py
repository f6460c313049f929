"""Rate budgets on a virtual-time loop: spacing, per-window caps under jitter, pauses, AIMD and discovery."""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vtime import run_virtual

from sync.config import BudgetGroupSpec, RateBudgetSpec, load_job
from sync.dispatch._rate_meter import RateMeter
from sync.dispatch.budget import BudgetPool, RateBudget, clock_sleep
from sync.errors import BadJobError


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
    # Even: the sending zone (0.88 s) less its second half, kept for catching up (sync.dispatch._rate_meter._SLACK), over N.
    assert min(gaps) >= (0.88 * 0.5 / 10) - 1e-9  # never a burst
    assert max(times) < 10.0


def test_a_run_that_begins_mid_window_still_sends_n_there_evenly() -> None:
    """The budget's first window spreads its N slots over the first half of what is left of its zone at the
    first release (a run whose plan is ready mid-window would otherwise leave most of that window unused, and
    end that much later); the windows after it are spaced as always, and none holds more than N."""
    budget = RateBudget(RateBudgetSpec(10, 1.0), tail=0.1, lead=0.02, wall_offset=0.0)

    async def scenario() -> list[float]:
        await asyncio.sleep(0.6)  # the plan is ready
        return await _release_times(budget, 30)

    times = sorted(run_virtual(scenario()))
    per_window = Counter(math.floor(t) for t in times)
    assert per_window == {
        0: 10,
        1: 10,
        2: 10,
    }  # at the nominal 44 ms from 0.6, 7 fitted before the zone's end
    first, later = times[:10], times[10:20]
    # The zone ends at 0.9 (the margin before the window's end): 0.3 s left, its first half for the 10 slots.
    assert first[0] == pytest.approx(0.6)
    assert [b - a for a, b in itertools.pairwise(first)] == pytest.approx([0.015] * 9)
    # The next window: from its zone's start, at the nominal spacing.
    assert later[0] == pytest.approx(1.02)
    assert [b - a for a, b in itertools.pairwise(later)] == pytest.approx([0.88 * 0.5 / 10] * 9)


def test_a_run_that_begins_just_before_the_zones_end_is_not_sent_as_a_burst() -> None:
    """The first window's slots come at most four times closer than the nominal spacing: with 0.05 s of the zone
    left, five go there (11 ms apart), not all ten within 25 ms. (The margin is fixed: no edge past the zone.)"""
    budget = RateBudget(RateBudgetSpec(10, 1.0), tail=0.1, lead=0.02, wall_offset=0.0)

    async def scenario() -> list[float]:
        await asyncio.sleep(0.85)
        return await _release_times(budget, 30)

    times = sorted(run_virtual(scenario()))
    assert Counter(math.floor(t) for t in times) == {0: 5, 1: 10, 2: 10, 3: 5}
    assert [b - a for a, b in itertools.pairwise(times[:5])] == pytest.approx([0.88 * 0.5 / 10 / 4] * 4)


def _served(
    ready: float, requests: int, arrive: Callable[[], float], back: Callable[[], float], workers: int = 16
) -> tuple[list[float], list[float]]:
    """Release and server-arrival times of ``requests`` attempts at a 20/s budget (its margin learned) by
    ``workers`` workers from ``ready`` on: each request reaches the server ``arrive()`` after its release and its
    answer comes ``back()`` after that, when the budget is told (as the dispatcher tells it)."""
    budget = RateBudget(RateBudgetSpec(20, 1.0), wall_offset=0.0, expect_answers=True)
    released: list[float] = []
    arrived: list[float] = []
    left = [requests]

    async def worker() -> None:
        loop = asyncio.get_running_loop()
        while left[0] > 0:
            left[0] -= 1
            await budget.acquire()
            at = loop.time()
            released.append(at)
            await asyncio.sleep(arrive())
            arrived.append(loop.time())
            await asyncio.sleep(back())
            budget.observe(loop.time() - at)
            budget.on_success()

    async def scenario() -> None:
        await asyncio.sleep(ready)  # the plan is ready
        async with asyncio.TaskGroup() as tg:
            for _ in range(workers):
                tg.create_task(worker())

    run_virtual(scenario())
    return sorted(released), sorted(arrived)


def test_a_run_ready_near_its_first_zones_end_goes_on_in_that_windows_edge() -> None:
    """A run ready at 0.78 s, just before the first window's zone ends (0.8 s: the default margin, nothing learned
    yet), goes on past it in the window's edge once its first answers came (5-10 ms): up to where a request
    as slow as the slowest answer so far is answered ``lead`` before the window's end, so what it sends there
    surely arrives in the window. It sent 5 there and ended most of a window later."""
    rng = random.Random(3)
    released, arrived = _served(0.78, 100, lambda: rng.uniform(0, 0.005), lambda: rng.uniform(0, 0.005))
    per_window = Counter(math.floor(a) for a in arrived)
    assert per_window == {0: 20, 1: 20, 2: 20, 3: 20, 4: 20}  # {0: 5, 1-4: 20, 5: 15} without the edge
    assert max(released) < 4.5  # 5.35 s without the edge
    assert all(t - math.floor(t) < 0.95 for t in released)  # never in the last ``lead`` (margin / 4)


@pytest.mark.parametrize("jitter", [0.005, 0.05, 0.1, 0.2])
def test_first_window_edge_releases_answered_late_take_slots_of_the_next_window(jitter: float) -> None:
    """Released in the first window's edge, a request whose answer has not come ``lead`` before the window's end
    may be counted in the next window: it takes one of that window's N. Never more than N in a server window,
    wherever the run begins and whatever the jitter."""
    for seed, ready in itertools.product(range(3), (0.55, 0.7, 0.78, 0.8, 0.85, 0.9, 0.94, 0.96)):
        delay = functools.partial(random.Random(seed).uniform, 0, jitter)
        _, arrived = _served(ready, 80, delay, delay)
        assert max(Counter(math.floor(a) for a in arrived).values()) <= 20, (seed, ready)


def test_first_window_edge_releases_are_held_against_the_next_window_before_any_answer() -> None:
    """Another endpoint's quick answer (10 ms) tells the pool how long answers take; this endpoint's requests
    then take 0.16 s to reach the server and their answers come only in the next window: its releases in its
    first window's edge all arrive in the next window, which holds a slot for each of them though none of
    this endpoint's answers was reported yet (as are the first window's releases in its zone's second half:
    nothing says they arrived in time)."""
    released: list[float] = []
    arrived: list[float] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pool = BudgetPool({"*": RateBudgetSpec(20, 1.0)}, wall_offset=0.0)
        await asyncio.sleep(0.5)
        quick = pool.budget("quick")
        await quick.acquire()
        await asyncio.sleep(0.01)
        quick.observe(0.01)
        slow = pool.budget("slow")
        await asyncio.sleep(0.78 - loop.time())

        async def worker() -> None:
            while len(released) < 80:
                await slow.acquire()
                at = loop.time()
                released.append(at)
                await asyncio.sleep(0.16)
                arrived.append(loop.time())
                await asyncio.sleep(0.44)
                slow.observe(loop.time() - at)

        async with asyncio.TaskGroup() as tg:
            for _ in range(40):
                tg.create_task(worker())

    run_virtual(scenario())
    in_edge = sum(1 for t in released if 0.8 <= t < 1.0)
    assert in_edge > 10  # the edge was used: up to 0.94 s
    per_window = Counter(math.floor(a) for a in arrived)
    # Those released from 0.84 s on arrive after the edge: each holds one of window 1's slots (the others,
    # which arrived in time, too: no answer says so).
    late = sum(1 for t in released if 0.84 <= t < 1.0)
    assert late > 0 and per_window[1] == late + 20 - sum(1 for t in released if t < 1.0)
    assert max(per_window.values()) <= 20


def test_a_runs_first_request_slower_than_the_margin_is_held_against_the_next_window() -> None:
    """The run's first request, released at the end of its first window's zone (0.797 s: the default margin), takes
    0.25 s to arrive (a new connection, a cold server) and is answered only after the next window opened: no
    answer had come, yet it takes one of that window's N, so the server counts 20 there, not 21 (a 429; seen
    end to end, 2026-12-07 00:29 UTC)."""
    first = [True]

    def arrive() -> float:
        slow, first[0] = first[0], False
        return 0.25 if slow else 0.005

    released, arrived = _served(0.797, 60, arrive, lambda: 0.1)
    assert released[0] == pytest.approx(0.797) and released[1] > 1.0  # the only release of window 0
    assert any(1.0 < a < 1.05 for a in arrived)
    assert Counter(math.floor(t) for t in released)[1] == 19
    assert max(Counter(math.floor(a) for a in arrived).values()) <= 20


def test_a_late_read_answer_gives_back_the_slot_its_release_held() -> None:
    """Before any answer, the first window's late releases (its zone's second half, its edge) are all held
    against the next window; an answer then read late (received before the edge, read after a stall) proves
    its request arrived in time and gives that slot back."""
    meter = RateMeter(RateBudgetSpec(20, 1.0), wall_offset=0.0, expect_answers=True)  # zone 0.05-0.8
    now = [0.77]
    meter.bind(lambda: now[0])
    meter.learn(0.01)  # another endpoint's answer (a pool learns from all): answers take 10 ms
    released: list[float] = []

    def release_until(end: float) -> None:
        while (at := meter.earliest(now[0])) < end:
            now[0] = at
            meter.release(at, waited=False)
            released.append(at)

    release_until(1.0)
    assert len(released) == 20 and sum(1 for t in released if 0.8 <= t < 1.0) > 0  # the edge was used
    now[0] = 1.0
    meter.answered(0.77, 0.78)  # the run's first release, answered before the edge, read only now
    release_until(2.0)
    assert sum(1 for t in released if 1.0 <= t < 2.0) == 1  # 19 still held


def test_the_runs_last_attempts_come_four_times_closer_from_the_next_slot_on() -> None:
    """``finishing()``: only the run's last attempts are left, so they go four times closer than the nominal
    spacing — from the next slot on (none that the closer spacing would have placed earlier goes at once), at
    most N a window — and new work (``finishing(False)``) brings the nominal spacing back."""
    budget = RateBudget(RateBudgetSpec(10, 1.0), tail=0.1, lead=0.02, wall_offset=0.0)
    nominal = 0.88 * 0.5 / 10

    async def scenario() -> list[float]:
        times = await _release_times(budget, 13)  # window 0, then three of window 1
        budget.finishing()
        times += await _release_times(budget, 10)  # the rest of window 1, then three of window 2
        budget.finishing(False)
        return times + await _release_times(budget, 3)

    times = sorted(run_virtual(scenario()))
    assert Counter(math.floor(t) for t in times) == {0: 10, 1: 10, 2: 6}
    in_one, in_two = times[10:20], times[20:]
    # The slot after finishing() stays where it was (a nominal spacing on); the ones after it are closer.
    assert [b - a for a, b in itertools.pairwise(in_one)] == pytest.approx([nominal] * 3 + [nominal / 4] * 6)
    # The slot after finishing(False) stays where the closer spacing put it; the ones after it are nominal.
    assert [b - a for a, b in itertools.pairwise(in_two)] == pytest.approx([nominal / 4] * 3 + [nominal] * 2)


def test_a_group_closes_up_its_slots_once_every_endpoint_it_holds_is_finishing() -> None:
    """A group's slots come closer only when none of its endpoints has batches left to take; a new endpoint
    of the group (new work) brings the nominal spacing back."""
    group = BudgetGroupSpec("account", RateBudgetSpec(10, 1.0, margin=0.1), ("*",))

    async def scenario() -> tuple[float, float, float]:
        pool = BudgetPool({}, (group,), wall_offset=0.0)
        a, b = pool.budget("a"), pool.budget("b")
        for _ in range(2):
            await a.acquire()
            await b.acquire()
        loop = asyncio.get_running_loop()
        b.finishing()
        before = loop.time()
        await a.acquire()  # a still has work: the nominal spacing
        nominal = loop.time() - before
        a.finishing()
        await a.acquire()  # the next slot stays where it was
        before = loop.time()
        await a.acquire()
        closer = loop.time() - before
        pool.budget("c")  # a new endpoint of the group: new work
        await a.acquire()  # the next slot stays where it was
        before = loop.time()
        await a.acquire()
        return nominal, closer, loop.time() - before

    nominal, closer, again = run_virtual(scenario())
    assert nominal == pytest.approx(0.875 * 0.5 / 10)
    assert closer == pytest.approx(nominal / 4)
    assert again == pytest.approx(nominal)


def test_only_the_budgets_first_window_is_filled_from_where_it_begins() -> None:
    """A window entered after an idle one later in the run (nothing was sent meanwhile) keeps the nominal
    spacing from its first release: only the run's start is packed into what is left of its window."""
    budget = RateBudget(RateBudgetSpec(10, 1.0), tail=0.1, lead=0.02, wall_offset=0.0)

    async def scenario() -> list[float]:
        head = await _release_times(budget, 10)  # window 0, all of it
        await asyncio.sleep(3.7 - asyncio.get_running_loop().time())  # idle until mid-window 3
        return head + await _release_times(budget, 10)

    times = sorted(run_virtual(scenario()))
    in_three = [t for t in times if 3 <= t < 4]
    assert in_three[0] == pytest.approx(3.7)
    assert [b - a for a, b in itertools.pairwise(in_three)] == pytest.approx([0.044] * (len(in_three) - 1))
    assert len(in_three) == 5  # 3.7 + 4 x 0.044 < 3.9, the zone's end


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


def test_remaining_zero_in_a_slow_answer_from_the_window_before_does_not_pause_the_next() -> None:
    # A server answering in 0.7 s put "X-RateLimit-Remaining: 0" (its window's last request) in an answer read
    # after the edge: the budget paused the whole next window, and a run took twice as long.
    async def scenario() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        budget = RateBudget(RateBudgetSpec(100, 1.0), tail=0.1, lead=0.01, wall_offset=0.0)
        await clock_sleep(loop, 0.3)
        await budget.acquire()
        await clock_sleep(loop, 0.9)  # answered at 1.2, in the next window
        budget.observe(0.9)
        budget.on_success(remaining=0)
        await budget.acquire()
        slow = loop.time()
        await clock_sleep(loop, 0.1)
        budget.observe(0.1)  # answered in its own window: that window is used up
        budget.on_success(remaining=0)
        await budget.acquire()
        return slow, loop.time()

    slow, same_window = run_virtual(scenario())
    assert slow == pytest.approx(1.2, abs=0.02)
    assert same_window == pytest.approx(2.01)


def test_one_429_among_many_answers_does_not_lower_the_rate() -> None:
    async def scenario() -> tuple[float | None, float]:
        loop = asyncio.get_running_loop()
        budget = RateBudget(RateBudgetSpec(40, 1.0), tail=0.1, lead=0.0, wall_offset=0.0)
        for window in range(5):
            for i in range(20):
                await budget.acquire()
                if window >= 1 and i == 5:
                    pause = budget.on_rate_limited(0.05, None)  # 1 of 20 answers in each window: 5 %
                    assert pause == pytest.approx(0.05)
                else:
                    budget.on_success()
            await clock_sleep(loop, window + 1 - loop.time())
        return budget.rate, budget.stats().paused_seconds

    rate, paused = run_virtual(scenario())
    assert rate == 40.0
    assert paused == pytest.approx(4 * 0.05)  # every Retry-After is honoured all the same


def test_a_window_with_many_429s_lowers_by_30_percent_and_clean_windows_raise_by_10() -> None:
    async def scenario() -> list[float | None]:
        loop = asyncio.get_running_loop()
        budget = RateBudget(RateBudgetSpec(40, 1.0), tail=0.1, lead=0.0, wall_offset=0.0)
        seen: list[float | None] = []

        async def window(limited: int, answers: int = 10) -> None:
            start = math.floor(loop.time())
            for i in range(answers):
                await budget.acquire()
                if i < limited:
                    budget.on_rate_limited(0.001, None)
                else:
                    budget.on_success()
            await clock_sleep(loop, start + 1 - loop.time())

        await window(limited=3)  # 30 % of the answers were 429s
        await window(limited=0)  # the verdict on the last window comes with the first answer of this one
        seen.append(budget.rate)
        await window(limited=0)  # clean 1
        await window(limited=0)  # clean 2: +10 %
        seen.append(budget.rate)
        for _ in range(12):
            await window(limited=0)
        seen.append(budget.rate)
        return seen

    lowered, raised, recovered = run_virtual(scenario())
    assert lowered == pytest.approx(28.0)
    assert raised == pytest.approx(30.8)
    assert recovered == 40.0  # back to the configured budget, never above


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
    assert rate == 42.0  # 60 seen in the last second, lowered by 30 %
    assert _max_per_window(times, 1.0) <= 42


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


def test_validate_refuses_a_margin_that_leaves_an_aligned_window_no_time_to_send(tmp_path: Path) -> None:
    (tmp_path / "users.csv").write_text("id,name\nu1,Ann\n", encoding="utf-8")
    head = (
        "name: b\ndestination:\n  platform: netmera\n  base_url: http://127.0.0.1:8080/rest/3.0\n"
        "  secret: {env: SOME_KEY}\nsources:\n  - name: users\n    path: users.csv\n    ext_id: id\n"
        "    attributes: {name: string}\ndispatch:\n"
    )
    job = tmp_path / "job.yaml"
    job.write_text(
        head + '  budget_groups: {account: {requests: 20, per: 1s, endpoints: ["*"], margin: 0.9}}\n',
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(job)
    [problem] = info.value.problems
    assert problem.location == "dispatch.budget_groups.account.margin"
    assert "no time to send" in problem.message and "align: false" in problem.message
    # Unaligned, the same margin is a valid N per period + margin.
    job.write_text(
        head + "  budgets: {tagUsers: {requests: 20, per: 1s, margin: 0.9, align: false}}\n", encoding="utf-8"
    )
    assert load_job(job).dispatch.budgets["tagUsers"] == RateBudgetSpec(20, 1.0, align=False, margin=0.9)


def _window_by_formula(t: float, offset: float, period: float) -> int:
    return math.floor((t + offset) / period + 1e-9)


@settings(max_examples=200, deadline=None)
@given(
    offset=st.floats(min_value=0.0, max_value=2e9, allow_nan=False),
    period=st.sampled_from([0.001, 0.25, 1.0, 60.0, 3600.0]),
    steps=st.lists(
        st.one_of(
            st.floats(min_value=-3.0, max_value=3.0),  # anywhere near
            st.sampled_from([0.0, 1e-12, -1e-12, 1e-7, -1e-7, 1e-5, -1e-5]),  # on and around an edge
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_the_window_of_a_time_is_the_formula_s_at_every_edge(
    offset: float, period: float, steps: list[float]
) -> None:
    # The window a release is counted in is remembered between requests (a budget far above what is sent must
    # cost nothing per request): the answer stays the formula's for every time, at an edge too, whatever came
    # before — on Unix-time offsets, where rounding is coarsest.
    budget = RateBudget(RateBudgetSpec(1_000_000, period), wall_offset=offset, clock=_FixedClock())
    edge = math.floor(offset / period + 1) * period - offset  # an edge a little after clock time 0
    for step in steps:
        t = edge + step * period if abs(step) >= 1e-3 else edge + step
        assert budget.window_of(t) == _window_by_formula(t, offset, period)


class _FixedClock:
    """A clock that never moves (the windows here are asked for directly)."""

    def time(self) -> float:
        return 0.0

    def call_at(self, when: float, callback: Callable[[], object], /) -> asyncio.TimerHandle:
        raise AssertionError("no timer expected")
