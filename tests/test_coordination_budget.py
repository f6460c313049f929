"""The budgets shared by every worker of a job (sync/coordination/budget.py, ``take_slot`` in _db.py) on a real
PostgreSQL server (tests/pg_fixture.py): an aligned shared budget places its slots as one process does
(sync/dispatch/_rate_meter.py), so the slots a stalled worker missed are caught up inside their window."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from typing import Any

import pytest

from sync.config import BudgetGroupSpec, DispatchSettings, RateBudgetSpec
from sync.coordination._db import Link, connect, ensure_schema
from sync.coordination.budget import _SHIFT_LATE, SharedBudgets, SharedMeter, late_releases, send_until
from sync.dispatch._rate_meter import _SLACK

N, T, MARGIN = 5, 1.0, 0.1
LEAD = MARGIN / 4
GAP = (T - LEAD - MARGIN) * (1 - _SLACK) / N
"""The spacing of one window's slots: the N slots fill the first half of the sending zone, the second half is
there to catch up."""


def _take(conn: Any, now: float, *, align: bool = True) -> float:
    """One acquisition of the budget ``g`` (N per T) at ``now`` (the clock injected into ``take_slot``)."""
    row = conn.execute(
        "SELECT slot_at FROM pushsync.take_slot(%s, %s, %s, %s, %s, %s, %s, %s)",
        ("job", ["g"], [N], [T], [align], [MARGIN], [LEAD], now),
    ).fetchone()
    return float(row[0])


@pytest.fixture
def budget_conn(postgres_url: str) -> Any:
    conn = connect(postgres_url)
    ensure_schema(conn, postgres_url)
    conn.execute("INSERT INTO pushsync.budgets (scope, name) VALUES ('job', 'g')")
    try:
        yield conn
    finally:
        conn.close()


def test_slots_a_stalled_worker_missed_are_caught_up_in_their_window_never_past_it(budget_conn: Any) -> None:
    conn = budget_conn
    # Window 10, after an idle one: its slots count from the first release.
    assert _take(conn, 10.0) == pytest.approx(10.0 + LEAD)
    assert _take(conn, 10.03) == pytest.approx(10.0 + LEAD + GAP)
    # The worker stalls until 10.4: slots 2, 3 and 4 came due meanwhile, and go at once when it asks again.
    assert [_take(conn, 10.4) for _ in range(3)] == [10.4] * 3
    # N are out in window 10: the next go in window 11, from its zone's start (window 10 was busy), evenly —
    # also for a worker asking while window 10's zone is still open, after one was reserved in window 11.
    assert _take(conn, 10.4) == pytest.approx(11.0 + LEAD)
    assert _take(conn, 10.5) == pytest.approx(11.0 + LEAD + GAP)
    # A stall past window 11's zone: its three slots left are gone, not carried over its edge. Window 12 gives
    # its own slots, one at a time (no burst at its start).
    assert _take(conn, 11.95) == pytest.approx(12.0 + LEAD)
    assert _take(conn, 11.95) == pytest.approx(12.0 + LEAD + GAP)
    # A 429 pauses the budget until 13.5: the slots that fell in the pause are not caught up after it.
    conn.execute("UPDATE pushsync.budgets SET paused_until = 13.5")
    assert _take(conn, 13.2) == pytest.approx(13.5)
    assert _take(conn, 13.5) == pytest.approx(13.5 + GAP)
    # A pause within the window, until 13.8: slots 2 and 3 came due in it (13.5 + 2 and 3 gaps) and are not
    # caught up after it; the first slot goes at its end, the next a gap later.
    conn.execute("UPDATE pushsync.budgets SET paused_until = 13.8")
    assert _take(conn, 13.81) == pytest.approx(13.81)
    assert _take(conn, 13.81) == pytest.approx(13.81 + GAP)
    (used, releases) = conn.execute("SELECT used, releases FROM pushsync.budgets").fetchone()
    assert (used, releases) == (4, 13)  # in window 13; each acquisition counted once


def test_releases_late_in_a_window_hold_slots_of_the_next_until_their_answer_came_in_time(
    budget_conn: Any,
) -> None:
    # The rule of one process (docs/run.md, "late releases that may have crossed the edge"), across workers.
    conn = budget_conn

    def give_back(window: int) -> None:  # what a worker does when the answer came before the window's edge
        conn.execute(_SHIFT_LATE, (window, -1, window + 1, -1, "job", "g", window, window + 1))

    assert _take(conn, 30.0) == pytest.approx(30.0 + LEAD)
    # Stalled until 30.6, in the second half of the zone (from 30.4625): the four slots due go at once, and each
    # holds one of window 31's, as their requests may reach the server after the edge.
    assert [_take(conn, 30.6) for _ in range(4)] == [30.6] * 4
    assert conn.execute("SELECT late FROM pushsync.budgets").fetchone() == (4,)
    for _ in range(3):  # three answers came before the edge: those requests were counted in window 30
        give_back(30)
    # Window 31 (after a busy window: from its zone's start) keeps one slot for the fourth.
    assert [_take(conn, 30.7) for _ in range(4)] == pytest.approx([31.0 + LEAD + k * GAP for k in range(4)])
    assert conn.execute("SELECT used, carried, late FROM pushsync.budgets").fetchone() == (4, 1, 0)
    give_back(30)  # the fourth answer had come in time too (read late): its slot comes back in window 31
    assert _take(conn, 30.7) == pytest.approx(31.0 + LEAD + 4 * GAP)
    assert _take(conn, 30.7) == pytest.approx(32.0 + LEAD)  # window 31 has had its N
    give_back(30)  # nothing held for window 30 any more: nothing changes
    assert conn.execute("SELECT used, carried, late FROM pushsync.budgets").fetchone() == (1, 0, 0)


def test_an_unaligned_shared_budget_keeps_its_spacing_after_a_stall(budget_conn: Any) -> None:
    spacing = (T + MARGIN) / N
    first = _take(budget_conn, 20.0, align=False)
    assert first == 20.0
    assert _take(budget_conn, 20.0, align=False) == pytest.approx(20.0 + spacing)
    # After a stall the next slot is now, and the one after a spacing later: no catching up as a burst.
    assert _take(budget_conn, 25.0, align=False) == 25.0
    assert _take(budget_conn, 25.0, align=False) == pytest.approx(25.0 + spacing)


def test_a_late_slot_may_be_sent_until_its_windows_zone_ends() -> None:
    aligned = SharedMeter("group:account", 20, 1.0, True, 0.1, 0.025)
    sliding = SharedMeter("tagUsers", 20, 1.0, False, 0.1, 0.025)
    assert send_until((aligned,), (0.1,), 7.3) == pytest.approx(7.9)
    assert send_until((aligned,), (0.2,), 7.3) == pytest.approx(7.8)  # the margin this worker learned
    assert send_until((aligned, sliding), (0.1, 0.1), 7.3) == pytest.approx(7.35)
    # The second half of window 7's zone starts at 7 + 0.025 + (1 - 0.125) / 2 = 7.4625: a slot of the first
    # half sent there holds a slot of window 8 (take_slot did not); one reserved there was held by take_slot.
    assert late_releases((aligned, sliding), (0.1, 0.1), 7.3, 7.3) == []
    assert late_releases((aligned, sliding), (0.1, 0.1), 7.3, 7.5) == [("group:account", 7, 8.0, False)]
    assert late_releases((aligned,), (0.1,), 7.5, 7.5) == [("group:account", 7, 8.0, True)]


async def test_a_worker_stalled_mid_window_catches_up_its_slots_and_never_sends_more_than_n(
    postgres_url: str,
) -> None:
    """Six attempts at a time against a shared 20/1 s budget; the worker's loop is stuck for 0.35 s (a
    CPU-bound neighbour) from a quarter into a window. Every slot of that window still goes, those that came
    due in the stall several at once when it ends, and no window gets more than 20."""
    limit, stall = 20, 0.35
    settings = DispatchSettings(
        budget_groups=(BudgetGroupSpec("account", RateBudgetSpec(limit, 1.0, margin=0.1), ("*",)),)
    )
    conn = connect(postgres_url)
    ensure_schema(conn, postgres_url)  # as a worker's ledger does when it opens
    conn.close()
    link = await Link.open(postgres_url, what="budget slots")
    shared = SharedBudgets(link, settings, scope="catch-up")
    budget = shared.budget("tagUsers")
    await budget.acquire()  # the row exists; the first window's slots count from here
    loop = asyncio.get_running_loop()
    first = math.floor(time.time()) + 1  # PostgreSQL on this machine: the database's clock is ours
    stalled = first + 1  # the window with the stall
    times: list[float] = []

    async def attempts() -> None:
        while True:
            await budget.acquire()
            times.append(time.time())
            budget.observe(0.001)  # answered at once: a late release gives its next-window slot back

    def stuck() -> None:
        time.sleep(stall)  # what a CPU-bound neighbour on the worker's core does to its loop

    await asyncio.sleep(first - time.time())
    loop.call_at(loop.time() + (stalled + 0.25 - time.time()), stuck)
    tasks = [asyncio.create_task(attempts()) for _ in range(6)]
    await asyncio.sleep(stalled + 2 - time.time())
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await link.close()
    windows = Counter(math.floor(t) for t in times)
    assert max(windows.values()) <= limit, windows
    assert windows[stalled] == limit, windows  # the stall cost nothing
    assert windows[stalled + 1] == limit, windows
    # The slots that came due in the stall went as soon as the loop ran again, several at once.
    woke = stalled + 0.25 + stall
    assert len([t for t in times if woke - 0.01 <= t < woke + 0.05]) >= 3, sorted(times)
    assert shared.late == 0  # no reservation was given up: the late ones were still in their window
