"""Budget groups and the pool on a virtual-time loop: shared windows, fairness, pauses, learned margins, no
lost slot nor burst across a window's edge after a late loop, and the plan's duration estimate."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from vtime import VirtualTimeLoop, run_virtual

from sync.config import BudgetGroupSpec, DispatchSettings, RateBudgetSpec
from sync.dispatch.budget import MIN_MARGIN, BudgetPool, BudgetStats, RateBudget, clock_sleep
from sync.dispatch.dispatch import Dispatcher
from sync.planning.planning import estimate_duration
from sync.records import Operation, Phase

ACCOUNT = BudgetGroupSpec("account", RateBudgetSpec(20, 1.0, margin=0.05), ("*",))


async def _send_all(pool: BudgetPool, work: dict[str, int]) -> dict[str, list[float]]:
    """Each endpoint's attempts, two workers per endpoint; returns release times per endpoint."""
    loop = asyncio.get_running_loop()
    times: dict[str, list[float]] = defaultdict(list)

    async def worker(endpoint: str, n: int) -> None:
        budget = pool.budget(endpoint)
        for _ in range(n):
            await budget.acquire()
            times[endpoint].append(loop.time())
            budget.on_success()

    async with asyncio.TaskGroup() as tg:
        for endpoint, n in work.items():
            tg.create_task(worker(endpoint, n // 2))
            tg.create_task(worker(endpoint, n - n // 2))
    return times


def _per_window(times: list[float], period: float = 1.0) -> Counter[int]:
    return Counter(math.floor(t / period + 1e-9) for t in times)


def test_a_group_over_three_endpoints_never_exceeds_its_budget_and_uses_all_of_it() -> None:
    pool_budgets = {"*": RateBudgetSpec(20, 1.0, margin=0.05)}
    work = {"tagUsers": 120, "setProfileAttributes": 120, "enableMail": 120}

    async def scenario() -> dict[str, list[float]]:
        pool = BudgetPool(pool_budgets, (ACCOUNT,), wall_offset=0.0)
        return await _send_all(pool, work)

    times = run_virtual(scenario())
    every = sorted(itertools.chain.from_iterable(times.values()))
    assert len(every) == 360
    windows = _per_window(every)
    assert max(windows.values()) == 20  # the group's budget in every window, never more
    assert len(windows) == 18  # 360 / 20: the whole budget used, no window lost
    # Round robin: while all three wait, each gets a third of every window.
    for endpoint in work:
        assert set(_per_window(times[endpoint]).values()) <= {6, 7}


def test_an_endpoint_held_back_by_its_own_budget_leaves_group_slots_to_the_others() -> None:
    budgets = {"slow": RateBudgetSpec(2, 1.0, margin=0.05), "*": RateBudgetSpec(100, 1.0, margin=0.05)}
    work = {"slow": 10, "fast": 90}

    async def scenario() -> dict[str, list[float]]:
        pool = BudgetPool(
            budgets, (BudgetGroupSpec("g", RateBudgetSpec(20, 1.0, margin=0.05), ("*",)),), wall_offset=0.0
        )
        return await _send_all(pool, work)

    times = run_virtual(scenario())
    assert max(_per_window(times["slow"]).values()) == 2
    every = sorted(times["slow"] + times["fast"])
    assert max(_per_window(every).values()) == 20
    assert math.floor(max(every)) == 4  # 100 attempts in 5 windows: no group slot wasted on "slow"


def test_a_group_of_named_endpoints_leaves_the_others_alone() -> None:
    group = BudgetGroupSpec("users", RateBudgetSpec(10, 1.0, margin=0.05), ("tagUsers", "untagUsers"))

    async def scenario() -> dict[str, list[float]]:
        pool = BudgetPool({"*": RateBudgetSpec(10, 1.0, margin=0.05)}, (group,), wall_offset=0.0)
        return await _send_all(pool, {"tagUsers": 20, "untagUsers": 20, "fireEvents": 20})

    times = run_virtual(scenario())
    assert max(_per_window(times["tagUsers"] + times["untagUsers"]).values()) == 10
    assert max(_per_window(times["fireEvents"]).values()) == 10
    assert math.floor(max(times["fireEvents"])) == 1  # 20 at its own 10/s: not slowed by the group


def test_a_429_on_one_endpoint_pauses_every_endpoint_of_its_group() -> None:
    async def scenario() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        pool = BudgetPool({}, (ACCOUNT,), wall_offset=0.0)
        a, b = pool.budget("tagUsers"), pool.budget("enableMail")
        await a.acquire()
        pause = a.on_rate_limited(2.0, None)
        await b.acquire()
        b_at = loop.time()
        await a.acquire()
        return pause, b_at, loop.time()

    pause, b_at, a_at = run_virtual(scenario())
    assert pause == 2.0
    assert b_at >= 2.0 and a_at >= 2.0


def test_the_margin_follows_the_p99_of_observed_latencies_within_bounds() -> None:
    async def scenario() -> list[float]:
        budget = RateBudget(RateBudgetSpec(20, 1.0), wall_offset=0.0)
        await budget.acquire()
        seen = [budget.margin]  # the default before anything is observed: 0.2 T
        for _ in range(200):
            budget.observe(0.030)
        seen.append(budget.margin)
        for i in range(200):
            budget.observe(0.090 if i % 50 == 0 else 0.020)  # 2 % slow answers: the p99 is the slow one
        seen.append(budget.margin)
        for _ in range(200):
            budget.observe(5.0)  # a very slow server: the margin stops at 0.3 T
        seen.append(budget.margin)
        for _ in range(200):
            budget.observe(0.0001)
        seen.append(budget.margin)
        return seen

    default, fast, tail_heavy, slow, tiny = run_virtual(scenario())
    assert default == pytest.approx(0.2)
    assert fast == pytest.approx(0.035)
    assert tail_heavy == pytest.approx(0.095)
    assert slow == pytest.approx(0.3)
    assert tiny == pytest.approx(MIN_MARGIN)


def test_a_margin_set_in_the_job_is_not_learned() -> None:
    async def scenario() -> float:
        budget = RateBudget(RateBudgetSpec(20, 1.0, margin=0.12), wall_offset=0.0)
        await budget.acquire()
        for _ in range(200):
            budget.observe(0.01)
        return budget.margin

    assert run_virtual(scenario()) == pytest.approx(0.12)


def test_a_learned_margin_gives_more_of_each_window_to_sending() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        budget = RateBudget(RateBudgetSpec(20, 1.0), wall_offset=0.0)
        for _ in range(40):
            await budget.acquire()
            await clock_sleep(loop, 0.02)
            budget.observe(0.02)
        await clock_sleep(loop, math.ceil(loop.time()) - loop.time())
        times = []
        for _ in range(20):
            await budget.acquire()
            times.append(loop.time())
        assert math.floor(min(times)) == math.floor(max(times))  # one window
        return max(times) - min(times)

    spread = run_virtual(scenario())
    # Default margins (0.2 T + 0.05 T) would leave 0.75 s to send in (20 slots over its first half: spread
    # 19 x 0.01875 = 0.356 s); the learned 25 ms leaves about 0.97 s (spread 19 x 0.0242 = 0.46 s).
    assert spread == pytest.approx(19 * (1.0 - 1.25 * 0.025) * 0.5 / 20)


def test_a_late_loop_releases_the_slots_due_in_its_window_and_never_crosses_its_edge() -> None:
    loop = VirtualTimeLoop()

    budget = RateBudget(RateBudgetSpec(20, 1.0, margin=0.05), clock=loop, wall_offset=0.0)
    spacing = (1.0 - 0.05 - 0.0125) * 0.5 / 20  # the sending zone less its slack (_rate_meter._SLACK), over N

    async def scenario() -> list[float]:
        times: list[float] = []

        async def one() -> None:
            await budget.acquire()
            times.append(loop.time())

        # A CPU-bound neighbour: the loop is stuck for 0.3 s mid-window, then from just before a window's
        # zone ends until well into the next window.
        loop.call_at(0.21, loop.advance, 0.2)
        loop.call_at(2.4, loop.advance, 0.8)
        async with asyncio.TaskGroup() as tg:
            for _ in range(100):
                tg.create_task(one())
        return times

    try:
        times = loop.run_until_complete(scenario())
    finally:
        loop.close()
    times.sort()
    windows = _per_window(times)
    assert max(windows.values()) <= 20
    # Window 0: every slot that came due while the loop was stuck (0.21-0.41) goes when it runs again, in
    # that window: the stall costs nothing.
    at_wake = [t for t in times if math.isclose(t, 0.41)]
    assert len(at_wake) == sum(1 for i in range(20) if 0.21 < 0.0125 + i * spacing <= 0.41) > 1
    assert windows[0] == 20 and windows[1] == 20
    # Window 2: the slots due after 2.4 are lost with its zone (none is carried over the edge), and window
    # 3 releases at 3.2 only its own slots that came due, from its zone's start.
    assert windows[2] == sum(1 for i in range(20) if 2.0125 + i * spacing < 2.4) < 20
    assert not [t for t in times if 2.4 < t < 3.2]
    assert len([t for t in times if math.isclose(t, 3.2)]) == math.floor((3.2 - 3.0125) / spacing) + 1
    # The summary tells those windows apart from the budget's own use, and the window record says why.
    stats = budget.stats()
    assert stats.stalled_windows == {0, 2, 3}
    assert not stats.starved_windows  # attempts waited all along
    use = {w.window: w for w in stats.windows}
    assert (use[0].released, use[0].waiting, use[0].idle) == (20, 0, 0)
    assert use[0].late_max > 0.15  # the first slot due in the stall waited for its end
    assert use[2].waiting == 20 - windows[2] and use[2].idle == 0 and use[2].paused == 0


def test_the_duration_estimate_accounts_for_groups() -> None:
    requests = {
        (Phase.CHANGES, "tagUsers", Operation.TAG): 100,
        (Phase.CHANGES, "setProfileAttributes", Operation.SET_ATTRIBUTES): 100,
        (Phase.CHANGES, "enableMail", Operation.ENABLE_EMAIL): 100,
    }
    per_endpoint = DispatchSettings(concurrency=8, budgets={"*": RateBudgetSpec(20, 1.0)})
    grouped = DispatchSettings(
        concurrency=8,
        budgets={"*": RateBudgetSpec(20, 1.0)},
        budget_groups=(BudgetGroupSpec("account", RateBudgetSpec(20, 1.0), ("*",)),),
    )
    assert estimate_duration(requests, per_endpoint, latency=0.01)[None] == pytest.approx(5.0)
    assert estimate_duration(requests, grouped, latency=0.01)[None] == pytest.approx(15.0)


def test_an_endpoints_most_rate_is_the_lowest_of_its_budget_and_groups() -> None:
    settings = DispatchSettings(
        budgets={"*": RateBudgetSpec(20, 1.0)},
        budget_groups=(BudgetGroupSpec("users", RateBudgetSpec(600, 60.0), ("tagUsers",)),),
    )
    assert settings.max_rate("tagUsers") == 10.0
    assert settings.max_rate("fireEvents") == 20.0
    assert DispatchSettings().max_rate("tagUsers") is None


def test_the_run_summary_has_a_line_per_budget_group() -> None:
    from test_dispatch_lanes import Lanes, MemoryPlatform, batches_for, settings

    from sync.report.summary import summarise

    group = BudgetGroupSpec("account", RateBudgetSpec(10, 1.0, margin=0.05), ("a", "b"))
    plan = Lanes(
        {Phase.CHANGES: [(name, batches_for(name, n)) for name, n in (("a", 30), ("b", 30), ("c", 5))]}
    )
    dispatcher = Dispatcher(MemoryPlatform(latency=0.01), settings(budget_groups=(group,)))
    report = run_virtual(dispatcher.run(plan))
    summary = summarise(report, run_id="r1", job="j")
    (line,) = summary.groups
    assert line.group == "account" and set(line.endpoints) == {"a", "b"}  # "c" is not in the group
    assert line.requests == 60 and line.rate_limited == 0
    assert line.budget == "10/1s" and line.max_per_window == 10
    assert line.utilisation == pytest.approx(1.0)  # 10 in every full window
    assert line.budget_bound_utilisation == pytest.approx(1.0)
    # 60 at 10 a window: 4 or 5 full windows between the partial first and last (the windows sit on the
    # wall clock, which the virtual loop does not move), none starved or stalled.
    assert line.windows in (4, 5) and (line.windows_starved, line.windows_stalled) == (0, 0)
    data = summary.to_json()["budget_groups"][0]
    assert data["group"] == "account" and data["requests"] == 60 and data["utilisation"] == 1.0
    text = summary.render_text()
    assert "budget group" in text and "account" in text and "10/1s (100%)" in text


def test_windows_with_nothing_to_send_are_told_apart_from_the_budgets_own_use() -> None:
    async def scenario() -> BudgetStats:
        loop = asyncio.get_running_loop()
        pool = BudgetPool({}, (ACCOUNT,), wall_offset=0.0)
        budget = pool.budget("tagUsers")
        for _ in range(60):  # three full windows
            await budget.acquire()
        await clock_sleep(loop, 2.0)  # the run has nothing to send (planning, a phase's tail)
        async with asyncio.TaskGroup() as tg:
            for _ in range(60):
                tg.create_task(budget.acquire())
        return pool.group_stats()["account"]

    stats = run_virtual(scenario())
    assert 3 in stats.starved_windows and 4 in stats.starved_windows  # the idle ones
    assert not stats.starved_windows & {0, 1, 2}  # attempts waited for the budget all along
    windows = [stats.per_window.get(k, 0) for k in range(min(stats.per_window), max(stats.per_window) + 1)]
    assert 0 in windows  # so the mean over the sending part is below the budget...
    budget_bound = [c for k, c in stats.per_window.items() if k not in stats.starved_windows]
    assert max(budget_bound) == 20  # ...but the budget itself filled its windows


def test_slots_missed_for_want_of_work_are_caught_up_in_the_window_and_each_window_says_why() -> None:
    spacing = (1.0 - 0.05 - 0.0125) * 0.5 / 20

    async def scenario() -> tuple[list[float], BudgetStats]:
        loop = asyncio.get_running_loop()
        pool = BudgetPool({}, (ACCOUNT,), wall_offset=0.0)
        budget = pool.budget("tagUsers")
        times: list[float] = []

        async def one() -> None:
            await budget.acquire()
            times.append(loop.time())

        async def take(n: int) -> None:
            async with asyncio.TaskGroup() as tg:
                for _ in range(n):
                    tg.create_task(one())

        await take(20)  # window 0: evenly spaced from its first release
        await take(10)  # window 1: its first ten slots
        await clock_sleep(loop, 1.4 - loop.time())  # nothing to send for a while (planning)
        await take(10)  # then ten attempts at once: the slots that came due meanwhile go now
        await clock_sleep(loop, 2.2 - loop.time())
        budget.on_rate_limited(0.5)  # a 429: paused until 2.7
        await take(20)  # window 2 ends paused from 2.2 to 2.7; window 3 gets the rest
        await clock_sleep(loop, 4.5 - loop.time())
        await take(1)  # after the rest of window 3 went unused: nothing was left to send
        return times, pool.group_stats()["account"]

    times, stats = run_virtual(scenario())
    # At 1.4 the ten attempts found slots 10-16 of window 1 due (slot i at 1.0125 + i x spacing): seven went
    # at once, the others at their slots.
    assert len([t for t in times if math.isclose(t, 1.4)]) == 7
    assert all(any(math.isclose(t, 1.0125 + i * spacing) for t in times) for i in (17, 18, 19))
    assert stats.per_window[1] == 20
    use = {w.window: w for w in stats.windows}
    assert (use[0].released, use[0].idle, use[0].waiting, use[0].paused) == (20, 0, 0, 0)
    assert (use[1].released, use[1].idle) == (20, 0)
    # Window 2: nothing to send until 2.2, then paused until 2.7. The slots that fell in the pause are not
    # caught up (the server asked for less, not for a burst): the rest of the window is evenly spaced from
    # the pause's end, and the slots that pushed out of the zone are the pause's.
    after = sum(1 for i in range(20) if 2.7 + i * spacing < 2.95)
    assert 0 < after < 20
    assert (use[2].released, use[2].paused, use[2].idle, use[2].waiting) == (after, 20 - after, 0, 0)
    assert stats.per_window[2] == after
    # Window 3: its first slots took the rest; nobody waited for the others.
    assert (use[3].released, use[3].idle, use[3].waiting, use[3].paused) == (20 - after, after, 0, 0)


def test_plan_shows_each_budget_group_with_its_requests_and_least_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sync.cli import main

    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "jobs", tmp_path / "jobs", ignore=shutil.ignore_patterns(".pushsync"))
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "jobs" / "example.yaml"
    text = job.read_text(encoding="utf-8").replace(
        "dispatch:\n",
        'dispatch:\n  budget_groups:\n    users: {requests: 2, per: 1s, endpoints: ["tagUsers", "setProfileAttributes"]}\n',
        1,
    )
    job.write_text(text, encoding="utf-8")
    assert main(["plan", str(job)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("Budget group users"))
    assert "2/1s, shared by setProfileAttributes, tagUsers" in line
    assert main(["plan", str(job), "--output", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (group,) = doc["budget_groups"]
    held = [e for e in doc["endpoints"] if e["endpoint"] in ("tagUsers", "setProfileAttributes")]
    assert group["requests"] == sum(e["requests"] for e in held) > 0
    assert group["estimated_seconds"] == pytest.approx(group["requests"] / 2)
    assert doc["estimated_seconds"] >= group["estimated_seconds"]  # the run's estimate counts the group


def _answered_releases(
    answer_at: Callable[[float], float],
    rounds: Sequence[tuple[float, int]],
    stalls: Sequence[tuple[float, float]] = (),
) -> tuple[list[float], BudgetStats]:
    """Attempts at ``tagUsers`` under the :data:`ACCOUNT` group on a virtual loop: for each round ``(at, n)``,
    from ``at`` (and once the round before is over), ``n`` attempts at once; the one released at ``t`` has its
    answer at ``answer_at(t)``, which the budget observes. ``stalls``: ``(at, seconds)`` our own loop is stuck.
    Returns the release times and the group's stats."""
    loop = VirtualTimeLoop()

    async def scenario() -> tuple[list[float], BudgetStats]:
        pool = BudgetPool({}, (ACCOUNT,), clock=loop, wall_offset=0.0)
        budget = pool.budget("tagUsers")
        times: list[float] = []

        async def one() -> None:
            await budget.acquire()
            released = loop.time()
            times.append(released)
            await clock_sleep(loop, answer_at(released) - released)
            budget.observe(loop.time() - released)
            budget.on_success()

        for at, seconds in stalls:
            loop.call_at(at, loop.advance, seconds)
        for at, n in rounds:
            if at:
                await clock_sleep(loop, at - loop.time())
            async with asyncio.TaskGroup() as tg:
                for _ in range(n):
                    tg.create_task(one())
        return times, pool.group_stats()["account"]

    try:
        return loop.run_until_complete(scenario())
    finally:
        loop.close()


def test_late_releases_with_no_answer_by_the_windows_end_take_slots_of_the_next_window() -> None:
    # Window 1: ten attempts at their slots, then nothing to send until 1.6 s, when ten more come and the
    # slots that came due go at once (catching up, late in the window). The server stalls: those get their
    # answer only at 2.3 s. They may have arrived (and been counted by the server) in window 2, so window 2
    # leaves them room: even if they all did, the server counts no more than N there, and sends no 429.
    times, stats = _answered_releases(
        lambda released: 2.3 if 1.5 <= released < 2.0 else released + 0.03,
        # window 0 and window 1's first ten slots; then ten at once at 1.6, then windows 2 and 3
        [(0.0, 30), (1.6, 30)],
    )
    windows = _per_window(times)
    stalled = sum(1 for t in times if 1.5 <= t < 2.0)
    assert stalled == 10 and windows[1] == 20
    # Window 2: those requests' slots are held, whatever happened to them; the others go as usual.
    assert windows[2] == 20 - stalled
    use = {w.window: w for w in stats.windows}
    assert use[2].carried == stalled and use[2].idle == use[2].waiting == use[2].paused == 0
    # Regular releases, answered within their window, take nothing from the next.
    assert use[1].carried == 0 and windows[0] == 20


def test_a_slow_answer_to_a_regular_release_takes_nothing_from_the_next_window() -> None:
    # Every answer of window 1 comes after its edge (a slow server, or its outbound network): its requests
    # were released in the first half of the zone, far from the edge, and arrived in time; window 2 is full.
    times, _stats = _answered_releases(
        lambda released: 2.2 if 1.0 <= released < 2.0 else released + 0.03, [(0.0, 60)]
    )
    windows = _per_window(times)
    assert [windows[k] for k in (0, 1, 2)] == [20, 20, 20]


def test_answers_read_late_by_a_stalled_loop_do_not_hold_slots_of_the_next_window() -> None:
    # Our own loop is stuck from 0.3 s to 0.85 s (the slots due meanwhile go at once at 0.85 s, late in the
    # window), then again from 0.86 s to 1.25 s: the answers to those requests came in at 0.88 s, before the
    # edge, but are read only at 1.25 s. They arrived in window 0, so window 1 holds nothing for them.
    times, stats = _answered_releases(
        lambda released: released + 0.03, [(0.0, 60)], stalls=[(0.3, 0.55), (0.86, 0.39)]
    )
    windows = _per_window(times)
    assert len([t for t in times if math.isclose(t, 0.85)]) > 1  # caught up late in window 0
    assert [windows[k] for k in (0, 1, 2)] == [20, 20, 20]
    use = {w.window: w for w in stats.windows}
    assert use[1].carried == 0
    assert {0, 1} <= stats.stalled_windows  # the loop was late: the summary says so
