"""Budget use when the loop is not on time, on a virtual-time loop: late timers, a stalled loop, and a group whose
endpoints learn their margins. Each scenario keeps every guarantee (never more than N released per window, every
release inside its window's sending zone, none of a window's slots carried across its edge) and must still use
the budget nearly whole."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable

import pytest
from vtime import VirtualTimeLoop

from sync.config import BudgetGroupSpec, RateBudgetSpec
from sync.dispatch._rate_meter import RateMeter, WindowUse
from sync.dispatch.budget import MIN_MARGIN, BudgetPool, RateBudget

N = 20
PER_SECOND = RateBudgetSpec(N, 1.0)  # margins learned from the latencies observed


class _LateClock:
    """The loop's clock, whose timers fire up to ``late`` seconds after they are due (a loaded machine), and
    not before the end of a stall (the loop stuck in a CPU-bound neighbour's step) when they fall in one."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        late: float,
        stalls: list[tuple[float, float]],
    ) -> None:
        self._loop, self._rng, self._late, self._stalls = loop, rng, late, stalls

    def time(self) -> float:
        return self._loop.time()

    def call_at(self, when: float, callback: Callable[[], object], /) -> asyncio.TimerHandle:
        for start, end in self._stalls:
            if start <= when < end:
                when = end
        return self._loop.call_at(when + self._rng.uniform(0, self._late), callback)


def _send(
    *,
    endpoints: int,
    group: bool,
    late: float,
    stalls: tuple[float, float] | None,
    windows: int = 40,
    seed: int = 1,
    every: tuple[float, float] = (3.0, 6.0),
) -> list[float]:
    """Release times of ``windows * N`` attempts over ``endpoints`` endpoints (6 workers each, answers after
    20-250 ms); with ``stalls`` = (low, high), the loop is stuck that long every ``every`` seconds (a CPU-bound
    neighbour holding the interpreter)."""
    rng = random.Random(seed)
    loop = VirtualTimeLoop()
    stuck: list[tuple[float, float]] = []
    t = 0.0
    while stalls is not None and t < windows * 2:
        t += rng.uniform(*every)
        stuck.append((t, t + rng.uniform(*stalls)))

    async def scenario() -> list[float]:
        groups = (BudgetGroupSpec("account", PER_SECOND, ("*",)),) if group else ()
        pool = BudgetPool(
            {"*": PER_SECOND}, groups, clock=_LateClock(loop, rng, late, stuck), wall_offset=0.0
        )
        times: list[float] = []
        left = [windows * N]

        async def worker(endpoint: str) -> None:
            budget = pool.budget(endpoint)
            while left[0] > 0:
                left[0] -= 1
                await budget.acquire()
                released = loop.time()
                times.append(released)
                await asyncio.sleep(rng.uniform(0.02, 0.25))
                budget.observe(loop.time() - released)
                budget.on_success()

        async with asyncio.TaskGroup() as tg:
            for i in range(endpoints):
                for _ in range(6):
                    tg.create_task(worker(f"endpoint{i}"))
        return times

    try:
        return loop.run_until_complete(scenario())
    finally:
        loop.close()


def _use(times: list[float]) -> float:
    """Mean count per window over N, the first and last (partial) windows left out."""
    windows = Counter(math.floor(t + 1e-9) for t in times)
    interior = [windows.get(k, 0) for k in range(min(windows) + 1, max(windows))]
    return sum(interior) / (len(interior) * N)


def _check_guarantees(times: list[float]) -> None:
    ordered = sorted(times)
    # The hard cap: never more than N released in one window, counted on actual release times.
    assert max(Counter(math.floor(t + 1e-9) for t in ordered).values()) <= N
    # Every release inside its window's sending zone: after the lead (a quarter of the margin), before the
    # margin (at least MIN_MARGIN) — so a late loop never releases a slot of the window before across the
    # edge, and the gap between two windows' releases is at least both margins.
    for t in ordered:
        assert MIN_MARGIN / 4 - 1e-9 <= t - math.floor(t + 1e-9) <= 1.0 - MIN_MARGIN + 1e-9, t
    for a, b in itertools.pairwise(ordered):
        if math.floor(b + 1e-9) != math.floor(a + 1e-9):
            assert b - a >= 1.25 * MIN_MARGIN - 1e-9, (a, b)


def test_a_group_uses_every_slot_from_its_first_full_window_while_its_endpoints_learn_margins() -> None:
    # Each endpoint has its own budget and learns its own margin from a third of the answers; the group used
    # to learn first, kept slots near the window's end that the endpoints' wider default margins refused,
    # and lost two requests in each of the first windows.
    times = _send(endpoints=3, group=True, late=0.0, stalls=None, windows=30)
    _check_guarantees(times)
    windows = Counter(math.floor(t + 1e-9) for t in times)
    assert [windows[k] for k in range(1, max(windows))] == [N] * (max(windows) - 1)


def test_late_timers_cost_none_of_the_budget() -> None:
    # Timers firing 0-20 ms late: each firing releases every slot of the window whose time has come, so no
    # lateness is carried into the next window. (A sliding cap of N per T on release times held each slot at
    # or after the same slot of the window before plus T: 98.3-98.6 % of the budget.)
    for seed in (1, 2, 3):
        times = _send(endpoints=3, group=True, late=0.02, stalls=None, seed=seed)
        _check_guarantees(times)
        assert _use(times) == 1.0, seed


def test_a_stalled_loop_is_caught_up_inside_the_window() -> None:
    # The loop stuck for 0.1-0.3 s every 3-6 s, timers 0-10 ms late: when it runs again, the slots that
    # came due meanwhile go at once, inside the window (98.3-99.4 % with the sliding cap and catching up at
    # most twice as fast as nominal).
    for seed in (1, 2, 3):
        times = _send(endpoints=3, group=True, late=0.01, stalls=(0.1, 0.3), seed=seed)
        _check_guarantees(times)
        assert _use(times) == 1.0, seed


def test_a_half_core_loop_stalled_in_most_windows_still_uses_the_budget() -> None:
    # The end-to-end bench's condition: the worker shares its core with a CPU-bound process and its
    # interpreter with the planning thread; the loop is stuck for 0.1-0.25 s every 0.6-1.5 s and timers are
    # 0-20 ms late. Only a stall over a window's last slots and its end can cost a slot.
    uses = []
    for seed in (1, 2, 3):
        times = _send(endpoints=3, group=True, late=0.02, stalls=(0.1, 0.25), every=(0.6, 1.5), seed=seed)
        _check_guarantees(times)
        uses.append(_use(times))
    assert min(uses) >= 0.99, uses  # 94.8-95.5 % with the sliding cap


def test_a_single_endpoint_under_a_stalled_loop() -> None:
    for seed in (1, 2, 3):
        times = _send(endpoints=1, group=False, late=0.01, stalls=(0.1, 0.3), seed=seed)
        _check_guarantees(times)
        assert _use(times) == 1.0, seed  # 97.6-99.2 % with the sliding cap


def test_long_stalls_of_a_loaded_machine_are_caught_up_in_the_second_half_of_the_zone() -> None:
    # Measured on the shared machine: the loop stalled for 0.1-0.6 s at a time, every second or two. The N
    # slots fill the first half of the sending zone, so a stall of up to half the zone anywhere in it is
    # caught up before the zone ends (with the slots over its first 80 %: 99.3 % at worst, 99.86 % mean).
    uses = []
    for seed in range(1, 7):
        times = _send(
            endpoints=3, group=True, late=0.03, stalls=(0.1, 0.6), every=(0.7, 2.0), seed=seed, windows=60
        )
        _check_guarantees(times)
        uses.append(_use(times))
    assert min(uses) >= 0.998, uses
    assert sum(uses) / len(uses) >= 0.9995, uses


def _window_use_slot_by_slot(meter: RateMeter, upto: float, waiting_since: float | None) -> WindowUse:
    """The definition of a window's record, one slot at a time (what :meth:`RateMeter._window_use` counts by
    index ranges)."""
    n = max(meter._w_n, meter._count)
    start = meter._window * meter._period - (meter._wall_offset or 0.0)
    zone_end = start + meter._period - meter._w_tail
    spacing = meter._spacing(n)
    pauses = [(a, b) for a, b in meter._pauses if a < zone_end and b > start]
    idle = waiting = paused = carried = 0
    for j in range(meter._count, n):
        if j >= n - meter._spill:
            carried += 1
            continue
        slot = meter._anchor + j * spacing
        if slot >= min(zone_end, upto):
            if upto < zone_end:
                break
            if pauses:
                paused += 1
            else:
                idle += 1
        elif pauses and any(a <= slot < b for a, b in pauses):
            paused += 1
        elif waiting_since is not None and waiting_since <= slot:
            waiting += 1
        else:
            idle += 1
    return WindowUse(
        window=meter._window,
        allowed=n,
        released=meter._count,
        idle=idle,
        waiting=waiting,
        paused=paused,
        carried=carried,
        late_max=meter._w_late,
        margin=meter._w_tail,
    )


def test_window_records_counted_by_ranges_are_the_slot_by_slot_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A window's record is counted by index ranges, because a generous budget (a million per second) has a
    # million slots per window and the record is made at every window's end (one slot at a time, that cost
    # 77 ms of CPU per request in the 1M-user bench). Checked against the slot-by-slot definition through
    # stalls, late timers and 429 pauses.
    checked: list[WindowUse] = []
    by_ranges = RateMeter._window_use

    def both(self: RateMeter, upto: float, waiting_since: float | None) -> WindowUse:
        use = by_ranges(self, upto, waiting_since)
        assert use == _window_use_slot_by_slot(self, upto, waiting_since)
        checked.append(use)
        return use

    monkeypatch.setattr(RateMeter, "_window_use", both)
    for seed in (1, 2, 3):
        _send(endpoints=3, group=True, late=0.03, stalls=(0.1, 0.6), every=(0.7, 2.0), seed=seed, windows=20)
    _send(endpoints=1, group=False, late=0.01, stalls=(0.1, 0.3), windows=20)
    # 429 pauses mid-window, with attempts waiting for the slots the pause took.
    loop = VirtualTimeLoop()
    budget = RateBudget(RateBudgetSpec(N, 1.0, margin=0.05), clock=loop, wall_offset=0.0)

    async def paused() -> None:
        async def one(i: int) -> None:
            await budget.acquire()
            if i % 17 == 5:
                budget.on_rate_limited(0.3)

        async with asyncio.TaskGroup() as tg:
            for i in range(120):
                tg.create_task(one(i))
        budget.stats()  # the open window's record too

    try:
        loop.run_until_complete(paused())
    finally:
        loop.close()
    assert len(checked) > 60
    assert any(u.paused for u in checked) and any(u.waiting for u in checked) and any(u.idle for u in checked)
