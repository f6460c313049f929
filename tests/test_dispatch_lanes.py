"""Per-endpoint lanes: within a phase every endpoint has its own queue, workers and rate budget.

The dispatcher tests run on the virtual-time loop against an in-memory platform; the last tests run a real job
through ``sync.run.run`` against the Netmera sandbox and read the overlap of the endpoints' sends from the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import threading
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from observers import StopAfter
from vtime import run_virtual

from sync.config import BudgetGroupSpec, DispatchSettings, RateBudgetSpec, load_job
from sync.dispatch.budget import Budget, BudgetPool, RateBudget
from sync.dispatch.dispatch import Dispatcher, DispatchOutcome, DispatchReport, LaneSource
from sync.errors import ExitCode, FatalPlatformError, StateError
from sync.ledger.ledger import Ledger
from sync.planning.planning import build_plan
from sync.platforms.base import SendOutcome
from sync.records import Attempt, Batch, BatchResult, BatchStatus, Operation, Phase
from sync.run import RunOptions, run
from sync.sandboxes.netmera_state import Device

# --- an in-memory platform with many endpoints --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    endpoint: str
    phase: Phase
    batch_id: str
    start: float
    end: float


@dataclass
class MemoryPlatform:
    """Answers every request after ``latency`` (per endpoint if given), counting what is in flight."""

    latency: float = 0.01
    latencies: Mapping[str, float] = field(default_factory=dict)
    fatal_on: str | None = None  # an endpoint whose requests answer 403
    platform: str = "memory"
    sends: list[Send] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    in_flight_by: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_in_flight_by: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    async def send(self, batch: Batch) -> SendOutcome:
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.in_flight_by[batch.endpoint] += 1
        self.max_in_flight_by[batch.endpoint] = max(
            self.max_in_flight_by[batch.endpoint], self.in_flight_by[batch.endpoint]
        )
        try:
            latency = self.latencies.get(batch.endpoint, self.latency)
            await asyncio.sleep(latency)
            self.sends.append(Send(batch.endpoint, batch.phase, batch.batch_id, start, loop.time()))
            if batch.endpoint == self.fatal_on:
                raise FatalPlatformError("HTTP 403: API key invalid", status=403, code=2010)
            return SendOutcome(200, latency)
        finally:
            self.in_flight -= 1
            self.in_flight_by[batch.endpoint] -= 1

    def split(self, batch: Batch) -> tuple[Batch, Batch] | None:
        return None

    async def aclose(self) -> None:
        return None

    def last_end(self, endpoint: str) -> float:
        return max(s.end for s in self.sends if s.endpoint == endpoint)


def batches_for(endpoint: str, n: int, phase: Phase = Phase.CHANGES) -> list[Batch]:
    out = []
    for b in range(n):
        ids = tuple(f"{endpoint}-{b}-{i}" for i in range(5))
        out.append(
            Batch(
                f"{endpoint}:{phase.name}:{b}",
                endpoint,
                Operation.TAG,
                {"tag": endpoint, "extIds": list(ids)},
                ids,
                phase,
            )
        )
    return out


async def _agen(batches: Iterable[Batch]) -> AsyncIterator[Batch]:
    for batch in batches:
        yield batch


@dataclass
class Lanes:
    """A LaneSource from a table ``phase -> [(endpoint, batches)]``. Async iterables by default: virtual time
    then moves only when every task waits for a timer (a worker thread would let it jump meanwhile)."""

    table: Mapping[Phase, Sequence[tuple[str, Sequence[Batch]]]]
    synchronous: bool = False
    asked: list[Phase] = field(default_factory=list)

    def lanes(self, phase: Phase) -> list[tuple[str, Iterable[Batch] | AsyncIterator[Batch]]]:
        self.asked.append(phase)
        return [
            (name, iter(batches) if self.synchronous else _agen(batches))
            for name, batches in self.table.get(phase, ())
        ]

    def flat(self) -> list[Batch]:
        return [b for phase in Phase for _, batches in self.table.get(phase, ()) for b in batches]


def settings(**kw: Any) -> DispatchSettings:
    base: dict[str, Any] = {"concurrency": 4, "queue_size": 8, "request_timeout": 5.0, "drain_timeout": 2.0}
    base.update(kw)
    return DispatchSettings(**base)


def budgets(specs: Mapping[str, RateBudgetSpec]) -> Any:
    """Budgets whose windows start at virtual time 0 (so timings do not depend on the wall clock)."""

    def make(endpoint: str) -> Budget:
        return RateBudget(specs.get(endpoint), wall_offset=0.0)

    return make


async def dispatch(
    client: MemoryPlatform,
    plan: LaneSource | list[Batch],
    dispatch_settings: DispatchSettings,
    specs: Mapping[str, RateBudgetSpec] | None = None,
    **kw: Any,
) -> DispatchReport:
    dispatcher = Dispatcher(
        client, dispatch_settings, budget_factory=budgets(specs or {}), rng=random.Random(5), **kw
    )
    return await dispatcher.run(plan)


# --- the dispatcher on virtual time ---------------------------------------------------------------------------


def test_two_endpoints_take_the_longer_time_not_the_sum() -> None:
    n, m = 10, 30  # budget 10 per second each; 30 batches each: about 3 s alone
    specs = {"a": RateBudgetSpec(n, 1.0), "b": RateBudgetSpec(n, 1.0)}
    both = {Phase.CHANGES: [("a", batches_for("a", m)), ("b", batches_for("b", m))]}

    alone = run_virtual(
        dispatch(MemoryPlatform(), Lanes({Phase.CHANGES: both[Phase.CHANGES][:1]}), settings(), specs)
    )
    client = MemoryPlatform()
    lanes = run_virtual(dispatch(client, Lanes(both), settings(), specs))
    one_queue = run_virtual(dispatch(MemoryPlatform(), Lanes(both).flat(), settings(), specs))

    assert lanes.outcome is DispatchOutcome.COMPLETED and lanes.batches_done == 2 * m
    assert {s.endpoint for s in client.sends} == {"a", "b"} and len(client.sends) == 2 * m
    assert alone.elapsed > 2.0  # the budget, not the latency, is the limit
    assert lanes.elapsed == pytest.approx(alone.elapsed, abs=0.1)  # the max of the two ...
    assert one_queue.elapsed > 1.8 * alone.elapsed  # ... where one queue takes their sum
    for name in ("a", "b"):  # and each endpoint used its whole budget: never more than n per window
        assert max(lanes.endpoints[name].per_window.values()) == n


def test_a_slow_endpoint_does_not_hold_back_a_fast_one() -> None:
    specs = {"slow": RateBudgetSpec(1, 1.0), "fast": RateBudgetSpec(20, 1.0)}
    table = {Phase.CHANGES: [("slow", batches_for("slow", 8)), ("fast", batches_for("fast", 60))]}
    tight = settings(concurrency=2)  # one queue: the slow endpoint's batches soon occupy both workers

    fast_alone = MemoryPlatform()
    run_virtual(dispatch(fast_alone, Lanes({Phase.CHANGES: table[Phase.CHANGES][1:]}), tight, specs))
    client = MemoryPlatform()
    report = run_virtual(dispatch(client, Lanes(table), tight, specs))
    shared = MemoryPlatform()
    run_virtual(dispatch(shared, Lanes(table).flat(), tight, specs))

    assert report.outcome is DispatchOutcome.COMPLETED and report.batches_done == 68
    assert client.last_end("fast") == pytest.approx(fast_alone.last_end("fast"), abs=0.1)
    assert client.last_end("fast") < 3.5 < client.last_end("slow")  # 60 at 20/s; 8 at 1/s
    assert shared.last_end("fast") > client.last_end("fast") + 3  # head-of-line blocking without lanes
    assert client.max_in_flight <= 2


def test_phases_still_run_in_order() -> None:
    table = {
        Phase.OPT_OUT: [
            ("disablePush", batches_for("disablePush", 7, Phase.OPT_OUT)),
            ("disableMail", batches_for("disableMail", 3, Phase.OPT_OUT)),
        ],
        Phase.CHANGES: [("a", batches_for("a", 20)), ("b", batches_for("b", 5)), ("c", batches_for("c", 11))],
        Phase.DELETIONS: [
            ("deleteUsers", batches_for("deleteUsers", 4, Phase.DELETIONS)),
            ("untag", batches_for("untag", 9, Phase.DELETIONS)),
        ],
    }
    specs = {
        "a": RateBudgetSpec(5, 1.0),
        "disablePush": RateBudgetSpec(3, 1.0),
        "untag": RateBudgetSpec(4, 1.0),
    }
    client = MemoryPlatform(latencies={"b": 0.5, "disableMail": 0.3, "deleteUsers": 0.2})
    source = Lanes(table)
    caps = {"b": 1, "disableMail": 1, "deleteUsers": 1}  # slow answers: leave the other lanes a slot
    tight = settings(concurrency=3, queue_size=2, per_endpoint_concurrency=caps)
    report = run_virtual(dispatch(client, source, tight, specs))
    assert report.outcome is DispatchOutcome.COMPLETED and report.batches_done == 59
    assert source.asked == list(Phase)
    sends = defaultdict(list)
    for s in client.sends:
        sends[s.phase].append(s)
    ordered = [p for p in Phase if p in table]
    for earlier, later in itertools.pairwise(ordered):
        assert min(s.start for s in sends[later]) >= max(s.end for s in sends[earlier])
    for phase in ordered:  # while within a phase the endpoints overlapped
        spans = {
            name: (
                min(s.start for s in sends[phase] if s.endpoint == name),
                max(s.end for s in sends[phase] if s.endpoint == name),
            )
            for name, _ in table[phase]
        }
        assert max(start for start, _ in spans.values()) < min(end for _, end in spans.values())


def test_the_global_concurrency_cap_is_never_exceeded() -> None:
    table = {Phase.CHANGES: [(name, batches_for(name, 40)) for name in ("a", "b", "c", "d")]}
    client = MemoryPlatform(latency=0.2)
    capped = settings(concurrency=3, per_endpoint_concurrency={"a": 2, "b": 1})
    report = run_virtual(dispatch(client, Lanes(table), capped))  # no budgets: only the caps hold it back
    assert report.batches_done == 160
    assert client.max_in_flight == 3  # reached, never exceeded
    assert client.max_in_flight_by["a"] <= 2 and client.max_in_flight_by["b"] == 1
    assert {s.endpoint for s in client.sends} == {"a", "b", "c", "d"}


def test_each_lane_pulls_at_most_queue_size_batches_ahead() -> None:
    queue_size = 6
    pulled: dict[str, int] = defaultdict(int)
    started: dict[str, int] = defaultdict(int)
    ahead: dict[str, int] = defaultdict(int)

    def counting(name: str, batches: list[Batch]) -> Iterator[Batch]:
        for batch in batches:
            pulled[name] += 1
            ahead[name] = max(ahead[name], pulled[name] - started[name])
            yield batch

    class Started:
        def on_batch_start(self, batch: Batch) -> None:
            started[batch.endpoint] += 1

        def on_attempt(self, attempt: Attempt) -> None:
            return None

        def on_batch_done(self, batch: Batch, result: BatchResult) -> None:
            return None

    class CountingLanes:
        def lanes(self, phase: Phase) -> list[tuple[str, Iterator[Batch]]]:
            if phase is not Phase.CHANGES:
                return []
            return [(name, counting(name, batches_for(name, 100))) for name in ("a", "b", "c")]

    specs = {"a": RateBudgetSpec(20, 1.0), "b": RateBudgetSpec(50, 1.0)}  # "c": unthrottled
    report = run_virtual(
        dispatch(
            MemoryPlatform(), CountingLanes(), settings(queue_size=queue_size), specs, observers=[Started()]
        )
    )
    assert report.batches_done == 300 and dict(pulled) == {"a": 100, "b": 100, "c": 100}
    for name in ("a", "b", "c"):
        assert queue_size // 2 <= ahead[name] <= queue_size, (name, ahead[name])


def _sent_while_settling(
    lanes: list[tuple[str, Iterable[Batch]]], settled: threading.Event, expected: Mapping[str, int]
) -> tuple[Counter[str], DispatchReport]:
    """Dispatch ``lanes`` (one CHANGES phase; real threads and time: each lane is a synchronous iterable read in
    its lane's pull thread) until ``expected`` batches per endpoint were sent (or 5 s went by), then set
    ``settled`` (the rest of a lazy plan's input settled) and let the run end. Returns what was sent before
    ``settled``, and the report."""

    class Source:
        def lanes(self, phase: Phase) -> list[tuple[str, Iterable[Batch]]]:
            return lanes if phase is Phase.CHANGES else []

    @dataclass
    class Watched(MemoryPlatform):
        """Sets ``reached`` once ``expected`` is sent."""

        reached: asyncio.Event = field(default_factory=asyncio.Event)

        async def send(self, batch: Batch) -> SendOutcome:
            outcome = await MemoryPlatform.send(self, batch)
            sent = Counter(s.endpoint for s in self.sends)
            if all(sent[name] >= n for name, n in expected.items()):
                self.reached.set()
            return outcome

    client = Watched(latency=0.0)

    async def go() -> tuple[Counter[str], DispatchReport]:
        task = asyncio.ensure_future(dispatch(client, Source(), settings(concurrency=4, queue_size=8)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.reached.wait(), 5.0)
        sent_before = Counter(s.endpoint for s in client.sends)
        settled.set()
        return sent_before, await task

    return asyncio.run(go())


@pytest.mark.parametrize("head", [7, 16, 40])
def test_a_lane_sends_the_batches_made_so_far_while_its_plan_makes_the_rest(head: int) -> None:
    """A lazy plan makes a lane's first batches from the head of its input, then waits until the rest is settled:
    every batch made so far leaves meanwhile (they fill the first budget window), none waits in a pull that
    only the settled rest can fill (with pulls of 1, 2, 4, 8, 16 batches, the 16th of a head of 16 did)."""
    made, rest = batches_for("a", head + 20)[:head], batches_for("a", head + 20)[head:]
    settled = threading.Event()

    def lane() -> Iterator[Batch]:
        yield from made
        settled.wait(10)  # the rest of the input being settled
        yield from rest

    sent, report = _sent_while_settling([("a", lane())], settled, {"a": len(made)})
    assert sent == {"a": len(made)}
    assert report.outcome is DispatchOutcome.COMPLETED
    assert report.batches_done == len(made) + len(rest)


def test_a_lane_waiting_for_its_plan_does_not_hold_back_another_lanes_pulls() -> None:
    """A lazy plan's lane whose head batches are used up waits in its pull for the rest of the input to be
    settled; meanwhile another lane's batches, made already, are pulled and sent — each lane pulls in a thread
    of its own (with one pull thread for every lane, lane b's pulls queued behind lane a's waiting one, and its
    first budget window went unused)."""
    a_made, a_rest = batches_for("a", 12)[:1], batches_for("a", 12)[1:]
    b_made = batches_for("b", 30)
    settled = threading.Event()

    def lane_a() -> Iterator[Batch]:
        yield from a_made
        settled.wait(10)  # the rest of the input being settled
        yield from a_rest

    sent, report = _sent_while_settling(
        [("a", lane_a()), ("b", iter(b_made))], settled, {"a": len(a_made), "b": len(b_made)}
    )
    assert sent == {"a": len(a_made), "b": len(b_made)}
    assert report.outcome is DispatchOutcome.COMPLETED
    assert report.batches_done == len(a_made) + len(a_rest) + len(b_made)


def test_a_stop_drains_every_lane_and_feeds_no_later_phase(tmp_path: Path) -> None:
    table = {
        Phase.CHANGES: [("a", batches_for("a", 50)), ("b", batches_for("b", 50))],
        Phase.DELETIONS: [("c", batches_for("c", 5, Phase.DELETIONS))],
    }
    ledger = Ledger.open(tmp_path / "l.sqlite")
    ledger.start_run("r", job="j")
    client = MemoryPlatform(latency=0.5)
    source = Lanes(table)

    async def go() -> DispatchReport:
        dispatcher = Dispatcher(
            client, settings(concurrency=4), ledger=ledger, run_id="r", budget_factory=budgets({})
        )
        asyncio.get_running_loop().call_later(1.2, dispatcher.stop_event.set)
        return await dispatcher.run(source)

    report = run_virtual(go())
    assert report.outcome is DispatchOutcome.INTERRUPTED
    assert report.batches_done == 12  # 3 rounds of 4 requests in flight: the round at 1.2 s finished
    assert {s.endpoint for s in client.sends} == {"a", "b"}
    counts = ledger.run("r").batches_by_status  # type: ignore[union-attr]
    assert counts["ok"] == 12 and "sent" not in counts
    assert not any(b.endpoint == "c" for b in ledger.batches("r"))  # the next phase was never fed
    ledger.close()


def test_a_bad_key_on_one_lane_aborts_every_lane(tmp_path: Path) -> None:
    table = {Phase.CHANGES: [("a", batches_for("a", 30)), ("b", batches_for("b", 30))]}
    ledger = Ledger.open(tmp_path / "l.sqlite")
    ledger.start_run("r", job="j")
    client = MemoryPlatform(fatal_on="b", latencies={"a": 0.05, "b": 0.2})
    specs = {"a": RateBudgetSpec(10, 1.0), "b": RateBudgetSpec(10, 1.0)}
    report = run_virtual(dispatch(client, Lanes(table), settings(), specs, ledger=ledger, run_id="r"))
    assert report.outcome is DispatchOutcome.ABORTED and report.fatal is not None
    fatal_at = min(s.end for s in client.sends if s.endpoint == "b")
    assert all(s.start < fatal_at for s in client.sends)  # nothing sent after the 403
    statuses = [b.status for b in ledger.batches("r")]
    assert BatchStatus.SENT not in statuses and BatchStatus.FAILED in statuses
    ledger.close()


def test_a_lane_yielding_another_phase_is_refused_as_a_state_error() -> None:
    wrong = {Phase.OPT_OUT: [("a", batches_for("a", 2, Phase.OPT_OUT) + batches_for("a", 1))]}
    with pytest.raises(StateError, match="lane a of phase OPT_OUT yielded batch a:CHANGES:0"):
        run_virtual(dispatch(MemoryPlatform(), Lanes(wrong), settings()))


def test_plain_iterables_still_use_one_queue() -> None:
    """A list (what resume, snapshot diffs and most tests pass) goes through the one-queue path unchanged."""
    client = MemoryPlatform()
    plan = batches_for("a", 5, Phase.OPT_OUT) + batches_for("b", 5)
    report = run_virtual(dispatch(client, plan, settings(), {"a": RateBudgetSpec(5, 1.0)}))
    assert report.outcome is DispatchOutcome.COMPLETED and report.batches_done == 10
    assert min(s.start for s in client.sends if s.endpoint == "b") >= client.last_end("a")


# --- the planner's lanes ---------------------------------------------------------------------------------------


def test_plan_lanes_yield_exactly_the_plans_batches_per_endpoint(tmp_path: Path) -> None:
    fixtures = Path(__file__).parent / "fixtures"
    text = (fixtures / "all_ops.yaml").read_text(encoding="utf-8")
    (tmp_path / "job.yaml").write_text(text + f"workdir: {tmp_path / 'work'}\n", encoding="utf-8")
    for name in ("users.csv", "tags.csv", "events.csv", "deletions.csv"):
        (tmp_path / name).write_bytes((fixtures / name).read_bytes())
    job = load_job(tmp_path / "job.yaml")
    with build_plan(job) as plan:
        everything = list(plan.batches())
        from_lanes: list[Batch] = []
        endpoints_seen = 0
        for phase in Phase:
            lanes = plan.lanes(phase)
            names = [name for name, _ in lanes]
            assert len(names) == len(set(names))  # one lane per endpoint
            endpoints_seen += len(names)
            for name, batches in lanes:
                mine = list(batches)
                assert all(b.endpoint == name and b.phase is phase for b in mine)
                # The same batches, in the same order, as plan.batches() yields for this endpoint and phase.
                assert [b.batch_id for b in mine] == [
                    b.batch_id for b in everything if b.endpoint == name and b.phase is phase
                ]
                from_lanes.extend(mine)
        assert sorted(b.batch_id for b in from_lanes) == sorted(b.batch_id for b in everything)
        assert endpoints_seen >= 8 and {b.endpoint for b in from_lanes} == {b.endpoint for b in everything}
        assert [b.batch_id for b in plan.batches()] == [b.batch_id for b in everything]  # batches() unchanged


# --- end to end against the Netmera sandbox --------------------------------------------------------------------

KEY_ENV = "PUSHSYNC_TEST_NETMERA_KEY"
SEGMENTS = ("gold", "silver", "beta")
LANE_USERS = 240
"""Users of the lanes job: 24 requests of setProfileAttributes, more than one window's 20 (a budget's first
window sends its 20 from wherever the run begins in it, so an endpoint with fewer could be done before another
endpoint's first pull came back, and the spans would not overlap)."""


def write_lanes_job(tmp_path: Path, url: str, users: int) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Users with attributes, tags and a push opt-in; returns the job path and what the platform must hold."""
    lines = ["id,name,city,segments,push"]
    expected: dict[str, dict[str, Any]] = {}
    for i in range(users):
        ext_id = f"u{i:04d}"
        tags = [t for k, t in enumerate(SEGMENTS) if (i >> k) & 1]
        push = ["true", "false", ""][i % 3]
        lines.append(f"{ext_id},Name {i},city{i % 7},{'|'.join(tags)},{push}")
        expected[ext_id] = {
            "profile": {"name": f"Name {i}", "city": f"city{i % 7}"},
            "tags": sorted(tags),
            # Every user starts with one device whose permission is the opposite of the input's (or True).
            "push": {"true": True, "false": False, "": True}[push],
        }
    (tmp_path / "users.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "job.yaml").write_text(
        f"""
version: 1
name: lanes
workdir: work
destination: {{platform: netmera, base_url: "{url}", secret: {{env: {KEY_ENV}}}}}
defaults: {{ext_id: id}}
sources:
  - name: users
    path: users.csv
    attributes: {{name: string, city: string}}
    tags: {{column: segments, delimiter: "|"}}
    opt_ins: {{push: push}}
dispatch:
  batch_size: 10
  concurrency: 8
  request_timeout: 5
  budgets: {{"*": {{requests: 20, period: 0.5}}}}
""",
        encoding="utf-8",
    )
    return tmp_path / "job.yaml", expected


def endpoint_spans(ledger_path: Path, run_id: str) -> dict[tuple[int, str], tuple[float, float]]:
    """(phase, endpoint) -> (first request sent, last answer), in Unix time, from the ledger's attempts."""
    with Ledger.open(ledger_path) as ledger:
        phase_of = {b.batch_id: b.phase for b in ledger.batches(run_id)}
        attempts = ledger.attempts(run_id)
    spans: dict[tuple[int, str], tuple[float, float]] = {}
    for a in attempts:
        key = (phase_of[a.batch_id], a.endpoint)
        lo, hi = spans.get(key, (a.started_at, a.started_at + a.latency))
        spans[key] = (min(lo, a.started_at), max(hi, a.started_at + a.latency))
    return spans


def assert_overlapping(spans: Mapping[str, tuple[float, float]]) -> None:
    """Every endpoint was sending while each of the others was: their spans overlap pairwise."""
    for a_ep, (a_lo, a_hi) in spans.items():
        for b_ep, (b_lo, b_hi) in spans.items():
            assert a_lo < b_hi and b_lo < a_hi, (a_ep, b_ep, spans)


def read_back(state: Any, expected: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The sandbox's state of the expected users, in the shape of ``write_lanes_job``'s expectation."""
    got = {}
    for ext_id in expected:
        user = state.user_dict(ext_id)
        got[ext_id] = {
            "profile": dict(user["profile"]),
            "tags": sorted(user["tags"]),
            "push": all(d["pushPermitted"] for d in user["devices"]),
        }
    return got


def add_devices(state: Any, users: int) -> None:
    """One device per user, its push permission the opposite of the input's (True where the input is empty)."""
    for i in range(users):
        push = ["true", "false", ""][i % 3]
        state.add_device(Device(f"u{i:04d}", "ios", f"tok-u{i:04d}", "Model X", push != "true"))


async def test_endpoints_send_at_the_same_time_and_the_end_state_equals_the_input(
    netmera_sandbox: Any, tmp_path: Path
) -> None:
    job_path, expected = write_lanes_job(tmp_path, netmera_sandbox.url, users=LANE_USERS)
    state = netmera_sandbox.sandbox.state
    add_devices(state, LANE_USERS)
    job = load_job(job_path)

    outcome = await run(job, RunOptions(api_key=netmera_sandbox.api_key))

    assert outcome.exit_code is ExitCode.OK, outcome.summary.render_text()
    assert read_back(state, expected) == expected
    spans = endpoint_spans(outcome.ledger_path, outcome.run_id)
    changes = {ep: span for (phase, ep), span in spans.items() if phase == Phase.CHANGES}
    assert set(changes) == {"setProfileAttributes", "tagUsers", "enablePush"}
    assert_overlapping(changes)
    # disablePush (opt-outs) finished before any change was sent.
    opt_out = [span for (phase, _), span in spans.items() if phase == Phase.OPT_OUT]
    assert opt_out and max(hi for _, hi in opt_out) <= min(lo for lo, _ in changes.values()) + 0.01
    # The run took about the longest endpoint's time, not the sum of them.
    longest = max(hi - lo for lo, hi in changes.values())
    total = sum(hi - lo for lo, hi in changes.values())
    assert max(hi for _, hi in changes.values()) - min(lo for lo, _ in changes.values()) < 0.5 * (
        longest + total
    )


async def test_a_resumed_run_is_sent_in_lanes_too(netmera_sandbox: Any, tmp_path: Path) -> None:
    job_path, expected = write_lanes_job(tmp_path, netmera_sandbox.url, users=LANE_USERS)
    state = netmera_sandbox.sandbox.state
    add_devices(state, LANE_USERS)
    job = load_job(job_path)
    stop = asyncio.Event()
    stopper = StopAfter(stop, 5)  # while the opt-outs (20 requests) are sent
    first = await run(job, RunOptions(api_key=netmera_sandbox.api_key, stop=stop, observers=[stopper]))
    resumed = await run(job, RunOptions(api_key=netmera_sandbox.api_key))

    assert first.exit_code is ExitCode.INTERRUPTED and first.summary.batches_done > 0
    assert resumed.resumed_from == first.run_id and resumed.exit_code is ExitCode.OK
    assert resumed.replay is not None
    assert resumed.replay.skipped_confirmed == first.summary.batches_done
    assert resumed.replay.sent == resumed.summary.batches_done > 0
    assert read_back(state, expected) == expected
    spans = endpoint_spans(resumed.ledger_path, resumed.run_id)
    assert_overlapping({ep: span for (phase, ep), span in spans.items() if phase == Phase.CHANGES})


def test_lanes_share_a_budget_group_window_by_window() -> None:
    group = BudgetGroupSpec("account", RateBudgetSpec(10, 1.0, margin=0.05), ("*",))
    plan = Lanes({Phase.CHANGES: [(name, batches_for(name, 20)) for name in ("a", "b", "c")]})
    client = MemoryPlatform(latency=0.01)

    async def go() -> DispatchReport:
        pool = BudgetPool({}, (group,), wall_offset=0.0)
        return await Dispatcher(client, settings(), budget_factory=pool.budget).run(plan)

    report = run_virtual(go())
    assert report.batches_done == 60
    per_window = Counter(math.floor(s.start) for s in client.sends)
    assert max(per_window.values()) == 10 and len(per_window) == 6  # 10 a window, all endpoints together
    for name in ("a", "b", "c"):  # round robin: each lane moves in every window
        assert len({math.floor(s.start) for s in client.sends if s.endpoint == name}) == 6


def test_the_job_settings_groups_are_used_by_default() -> None:
    group = BudgetGroupSpec("account", RateBudgetSpec(10, 1.0, margin=0.05), ("*",))
    plan = Lanes({Phase.CHANGES: [(name, batches_for(name, 10)) for name in ("a", "b", "c")]})
    report = run_virtual(Dispatcher(MemoryPlatform(), settings(budget_groups=(group,))).run(plan))
    assert report.batches_done == 30
    # 30 at 10 per window: three windows (the first from wherever the run began in it); unthrottled, 0.08 s.
    assert report.elapsed >= 1.0


def test_the_dispatcher_feeds_answer_times_to_the_learned_margin() -> None:
    plan = Lanes({Phase.CHANGES: [("a", batches_for("a", 60))]})

    async def go() -> tuple[float, float]:
        pool = BudgetPool({"*": RateBudgetSpec(50, 1.0)}, wall_offset=0.0)
        meter = pool.budget("a").meter
        assert meter is not None
        before = meter.margin
        await Dispatcher(MemoryPlatform(latency=0.03), settings(), budget_factory=pool.budget).run(plan)
        return before, meter.margin

    before, after = run_virtual(go())
    assert before == pytest.approx(0.2)  # min(0.2 T, 1 s) until answers come
    assert after == pytest.approx(0.035)  # release to answer (30 ms) + 5 ms


async def test_a_snapshot_run_is_sent_in_lanes_with_opt_outs_first(
    netmera_sandbox: Any, tmp_path: Path
) -> None:
    job_path, expected = write_lanes_job(tmp_path, netmera_sandbox.url, users=LANE_USERS)
    job_path.write_text(job_path.read_text(encoding="utf-8") + "mode: snapshot\n", encoding="utf-8")
    state = netmera_sandbox.sandbox.state
    add_devices(state, LANE_USERS)

    outcome = await run(load_job(job_path), RunOptions(api_key=netmera_sandbox.api_key))

    assert outcome.exit_code is ExitCode.OK, outcome.summary.render_text()
    assert read_back(state, expected) == expected
    spans = endpoint_spans(outcome.ledger_path, outcome.run_id)
    changes = {ep: span for (phase, ep), span in spans.items() if phase == Phase.CHANGES}
    assert {"setProfileAttributes", "tagUsers", "enablePush"} <= set(changes)
    assert_overlapping(changes)
    opt_out = [span for (phase, _), span in spans.items() if phase == Phase.OPT_OUT]
    assert opt_out and max(hi for _, hi in opt_out) <= min(lo for lo, _ in changes.values()) + 0.01


@pytest.mark.parametrize("group", [True, False])
def test_the_runs_last_attempts_leave_at_the_start_of_the_last_window(group: bool) -> None:
    """Once every batch was taken by a worker (its lane's channel is closed and empty), only those workers'
    attempts are left: their budget (and a group, once every endpoint it holds is there) places them four times
    closer than the nominal spacing, so the last window's requests leave at its start and the run ends sooner
    (here 2.128 s instead of 2.233 s: the last seven 5.9 ms apart, not 23.4 ms). Never more than N a window."""
    spec = RateBudgetSpec(20, 1.0, margin=0.05)
    sizes = {"a": 30, "b": 15, "c": 5} if group else {"a": 50}
    plan = Lanes({Phase.CHANGES: [(name, batches_for(name, n)) for name, n in sizes.items()]})
    client = MemoryPlatform(latency=0.01)

    async def go() -> DispatchReport:
        groups = (BudgetGroupSpec("account", spec, ("*",)),) if group else ()
        pool = BudgetPool({} if group else {"*": spec}, groups, wall_offset=0.0)
        return await Dispatcher(client, settings(concurrency=8), budget_factory=pool.budget).run(plan)

    report = run_virtual(go())
    starts = sorted(s.start for s in client.sends)
    assert Counter(math.floor(s) for s in starts) == {0: 20, 1: 20, 2: 10}
    nominal = (1.0 - 0.05 - 0.0125) * 0.5 / 20
    assert [b - a for a, b in itertools.pairwise(starts[-7:])] == pytest.approx([nominal / 4] * 6)
    assert report.elapsed < 2.13
