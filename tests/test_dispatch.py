"""The dispatcher on a virtual-time loop, against an in-memory platform that implements PlatformClient.

(The end-to-end tests against the Netmera sandbox are in tests/test_runner.py.)
"""

from __future__ import annotations

import asyncio
import io
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from vtime import run_virtual

from sync.config import DispatchSettings, RateBudgetSpec, RetryPolicy
from sync.dispatch.dispatch import Dispatcher, DispatchOutcome, DispatchReport
from sync.errors import FatalPlatformError, RejectedBatchError, RetryableError, StateError
from sync.ledger.ledger import Ledger
from sync.platforms.base import SendOutcome
from sync.records import Attempt, AttemptOutcome, Batch, BatchResult, BatchStatus, Operation, Phase
from sync.report.progress import BarProgress, LogProgress

Behaviour = Callable[[Batch, int], Exception | None]


@dataclass
class MemoryPlatform:
    """A tiny in-memory platform: tags users, answers after ``latency``, misbehaves as ``behaviour`` says."""

    latency: float = 0.01
    behaviour: Behaviour | None = None
    platform: str = "memory"
    tags: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    sends: list[tuple[float, Batch]] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    async def send(self, batch: Batch) -> SendOutcome:
        loop = asyncio.get_running_loop()
        self.sends.append((loop.time(), batch))
        self.attempts[batch.batch_id] += 1
        self.in_flight[batch.endpoint] += 1
        self.max_in_flight[batch.endpoint] = max(
            self.max_in_flight[batch.endpoint], self.in_flight[batch.endpoint]
        )
        try:
            await asyncio.sleep(self.latency)
            error = self.behaviour(batch, self.attempts[batch.batch_id]) if self.behaviour else None
            if error is not None:
                raise error
            for ext_id in batch.ext_ids:
                self.tags[ext_id].add(batch.body["tag"])
            return SendOutcome(200, self.latency)
        finally:
            self.in_flight[batch.endpoint] -= 1

    def split(self, batch: Batch) -> tuple[Batch, Batch] | None:
        if len(batch.ext_ids) < 2:
            return None
        half = len(batch.ext_ids) // 2
        return _batch(batch.body["tag"], batch.ext_ids[:half], batch.phase), _batch(
            batch.body["tag"], batch.ext_ids[half:], batch.phase
        )

    async def aclose(self) -> None:
        return None


def _batch(tag: str, ids: tuple[str, ...], phase: Phase = Phase.CHANGES, endpoint: str = "tagUsers") -> Batch:
    body = {"tag": tag, "extIds": list(ids)}
    return Batch(f"{endpoint}:{tag}:{ids[0]}:{len(ids)}", endpoint, Operation.TAG, body, ids, phase)


def _plan(n_batches: int, per_batch: int = 10, tag: str = "t", phase: Phase = Phase.CHANGES) -> list[Batch]:
    return [_batch(tag, tuple(f"{tag}{b}-{i}" for i in range(per_batch)), phase) for b in range(n_batches)]


def _settings(**kw: object) -> DispatchSettings:
    base: dict[str, object] = {
        "concurrency": 4,
        "queue_size": 8,
        "request_timeout": 5.0,
        "drain_timeout": 2.0,
    }
    base.update(kw)
    return DispatchSettings(**base)  # type: ignore[arg-type]


async def _dispatch(
    client: MemoryPlatform, batches: list[Batch], settings: DispatchSettings, **kw: object
) -> DispatchReport:
    dispatcher = Dispatcher(client, settings, rng=random.Random(7), **kw)  # type: ignore[arg-type]
    return await dispatcher.run(batches)


def test_every_batch_arrives_and_phases_run_in_order() -> None:
    client = MemoryPlatform()
    plan = (
        _plan(6, tag="optout", phase=Phase.OPT_OUT)
        + _plan(10, tag="change")
        + _plan(5, tag="del", phase=Phase.DELETIONS)
    )
    report = run_virtual(_dispatch(client, plan, _settings()))
    assert report.outcome is DispatchOutcome.COMPLETED
    assert report.batches_done == 21 and report.batches_unfinished == 0
    expected = {ext_id: {b.body["tag"]} for b in plan for ext_id in b.ext_ids}
    assert dict(client.tags) == expected
    by_phase: dict[Phase, list[float]] = defaultdict(list)
    for t, batch in client.sends:
        by_phase[batch.phase].append(t)
    # A phase starts only after every batch of the previous one has been answered (latency 0.01).
    assert min(by_phase[Phase.CHANGES]) >= max(by_phase[Phase.OPT_OUT]) + 0.01
    assert min(by_phase[Phase.DELETIONS]) >= max(by_phase[Phase.CHANGES]) + 0.01
    stats = report.endpoints["tagUsers"]
    assert (stats.requests, stats.ids_ok, stats.retries) == (21, 210, 0)


def test_feeding_is_bounded_by_the_queue() -> None:
    pulled = 0
    max_ahead = 0
    client = MemoryPlatform(latency=0.1)

    async def plan() -> AsyncIterator[Batch]:
        nonlocal pulled, max_ahead
        for batch in _plan(200):
            pulled += 1
            max_ahead = max(max_ahead, pulled - len(client.sends))
            yield batch

    async def go() -> DispatchReport:
        return await Dispatcher(client, _settings(concurrency=4, queue_size=8)).run(plan())

    report = run_virtual(go())
    assert report.batches_done == 200
    assert max_ahead <= 8 + 4 + 1  # queue + one batch per worker + the one being put


def test_transient_errors_are_retried_with_full_jitter_backoff() -> None:
    def flaky(batch: Batch, attempt: int) -> Exception | None:
        return RetryableError("HTTP 503", status=503) if attempt <= 2 else None

    client = MemoryPlatform(behaviour=flaky)
    settings = _settings(retry=RetryPolicy(max_attempts=5, base_delay=1.0, max_delay=8.0))
    report = run_virtual(_dispatch(client, _plan(1), settings))
    stats = report.endpoints["tagUsers"]
    assert (stats.requests, stats.retries, stats.ids_ok) == (3, 2, 10)
    times = [t for t, _ in client.sends]
    # attempt 1 at 0; backoff uniform(0, 1) then uniform(0, 2), each after the 0.01 s answer.
    assert 0.01 <= times[1] - times[0] <= 1.01
    assert 0.01 <= times[2] - times[1] <= 2.01


def test_exhausted_retries_fail_the_batch_but_not_the_run(tmp_path: Path) -> None:
    def down(batch: Batch, attempt: int) -> Exception | None:
        return RetryableError("timed out") if batch.ext_ids[0].startswith("t0-") else None

    client = MemoryPlatform(behaviour=down)
    ledger = Ledger.open(tmp_path / "l.sqlite")
    ledger.start_run("r", job="j")
    settings = _settings(retry=RetryPolicy(max_attempts=3, base_delay=0.1))
    report = run_virtual(_dispatch(client, _plan(3), settings, ledger=ledger, run_id="r"))
    assert report.outcome is DispatchOutcome.COMPLETED
    stats = report.endpoints["tagUsers"]
    assert (stats.ids_failed, stats.ids_ok, stats.requests) == (10, 20, 5)
    rows = {b.batch_id: b for b in ledger.batches("r")}
    failed = [b for b in rows.values() if b.status is BatchStatus.FAILED]
    assert len(failed) == 1 and failed[0].attempts == 3 and failed[0].message == "timed out"
    ledger.close()


def test_a_429_pauses_the_whole_endpoint_for_retry_after() -> None:
    limited_at: list[float] = []

    def limit_once(batch: Batch, attempt: int) -> Exception | None:
        if not limited_at:
            limited_at.append(asyncio.get_running_loop().time())
            return RetryableError("HTTP 429", status=429, retry_after=3.0)
        return None

    client = MemoryPlatform(behaviour=limit_once)
    report = run_virtual(_dispatch(client, _plan(12), _settings(concurrency=4)))
    stats = report.endpoints["tagUsers"]
    assert (stats.rate_limited, stats.ids_ok, stats.requests) == (1, 120, 13)
    # Requests already in flight when the 429 came back were sent before it; nothing was sent during the pause.
    later = [t for t, _ in client.sends if t > limited_at[0]]
    assert later and min(later) >= limited_at[0] + 3.0 - 1e-9


def test_a_refused_record_is_isolated_by_splitting(tmp_path: Path) -> None:
    def refuse_bad(batch: Batch, attempt: int) -> Exception | None:
        if "t0-5" in batch.ext_ids:
            return RejectedBatchError("external id not found", status=400, code=5016)
        return None

    client = MemoryPlatform(behaviour=refuse_bad)
    ledger = Ledger.open(tmp_path / "l.sqlite")
    ledger.start_run("r", job="j")
    plan = _plan(2, per_batch=16)
    report = run_virtual(_dispatch(client, plan, _settings(), ledger=ledger, run_id="r"))
    stats = report.endpoints["tagUsers"]
    assert (stats.ids_ok, stats.ids_rejected, stats.ids_failed) == (31, 1, 0)
    assert stats.requests == 1 + 2 * 4 + 1  # 16 → 8 → 4 → 2 → 1: two requests per level; the other batch
    assert "t0-5" not in client.tags and all(f"t0-{i}" in client.tags for i in range(16) if i != 5)
    assert ledger.refused_ids("r") == [(plan[0].batch_id, "t0-5", "5016", "external id not found")]
    assert {b.status for b in ledger.batches("r")} == {BatchStatus.OK, BatchStatus.REJECTED}
    ledger.close()


def test_a_refusal_of_every_id_alike_is_not_split_down_to_each_id(tmp_path: Path) -> None:
    """A 400 that does not depend on the rows (an attribute the platform does not know, a quota) refuses every
    ID alone as it refused the batch: splitting took 2n - 1 requests per batch of n IDs (127 for 64; 1,999 per
    batch of 1,000), every one refused, at the rate budget. Now, once 16 IDs sent alone got the batch's own
    answer and nothing of the batch went through, the rest is failed (retry it once fixed), and the endpoint's
    next batches given that answer are failed whole, in one request each."""

    def refuse_all(batch: Batch, attempt: int) -> Exception | None:
        return RejectedBatchError("profile attribute 'tier' is not defined", status=400, code=2020)

    client = MemoryPlatform(behaviour=refuse_all)
    ledger = Ledger.open(tmp_path / "l.sqlite")
    ledger.start_run("r", job="j")
    plan = _plan(4, per_batch=64)
    report = run_virtual(_dispatch(client, plan, _settings(concurrency=1), ledger=ledger, run_id="r"))
    stats = report.endpoints["tagUsers"]
    assert (stats.ids_ok, stats.ids_rejected, stats.ids_failed) == (0, 16, 4 * 64 - 16)
    # 64 -> 32 -> 16 (its 31 requests give the 16 single IDs) -> one more refused part; then 1 per batch.
    assert stats.requests == 1 + 1 + 31 + 1 + 3 < 4 * 127
    batches = {b.batch_id: b for b in ledger.batches("r")}
    assert {b.status for b in batches.values()} == {BatchStatus.FAILED}
    first = batches[plan[0].batch_id]
    assert "each of 16 IDs sent alone got this same answer" in first.message
    assert "not split further" in batches[plan[3].batch_id].message
    assert len(ledger.refused_ids("r")) == 16
    ledger.close()


def test_refusals_that_name_their_row_are_still_split_down_to_each_id() -> None:
    """Only a refusal repeated word for word is taken as the request's: one naming its record is split as
    before, every ID isolated (2n - 1 requests for n IDs every one of which is refused)."""

    def refuse_each(batch: Batch, attempt: int) -> Exception | None:
        return RejectedBatchError(f"invalid user {batch.ext_ids[0]}", status=400, code=2020)

    client = MemoryPlatform(behaviour=refuse_each)
    report = run_virtual(_dispatch(client, _plan(1, per_batch=64), _settings(concurrency=1)))
    stats = report.endpoints["tagUsers"]
    assert (stats.ids_rejected, stats.ids_failed, stats.requests) == (64, 0, 127)


def test_a_bad_key_aborts_at_once_and_in_flight_work_is_recorded(tmp_path: Path) -> None:
    def unauthorised(batch: Batch, attempt: int) -> Exception | None:
        return FatalPlatformError("HTTP 403: API key invalid", status=403, code=2010)

    client = MemoryPlatform(behaviour=unauthorised)
    ledger = Ledger.open(tmp_path / "l.sqlite")
    ledger.start_run("r", job="j")
    settings = _settings(concurrency=4, budgets={"*": RateBudgetSpec(2, 1.0)})
    report = run_virtual(_dispatch(client, _plan(50), settings, ledger=ledger, run_id="r"))
    assert report.outcome is DispatchOutcome.ABORTED
    assert report.fatal is not None and report.fatal.status == 403
    assert len(client.sends) == 1  # the others were waiting for a slot and gave up at once
    statuses = [b.status for b in ledger.batches("r")]
    assert statuses.count(BatchStatus.FAILED) >= 1
    assert BatchStatus.OK not in statuses and BatchStatus.SENT not in statuses
    ledger.close()


def test_stop_drains_in_flight_batches_then_returns_interrupted(tmp_path: Path) -> None:
    client = MemoryPlatform(latency=0.5)
    ledger = Ledger.open(tmp_path / "l.sqlite")
    ledger.start_run("r", job="j")

    async def go() -> DispatchReport:
        dispatcher = Dispatcher(client, _settings(concurrency=4), ledger=ledger, run_id="r")
        asyncio.get_running_loop().call_later(1.2, dispatcher.stop_event.set)
        return await dispatcher.run(_plan(100))

    report = run_virtual(go())
    assert report.outcome is DispatchOutcome.INTERRUPTED
    assert report.batches_done == 12  # 3 rounds of 4: the round in flight at 1.2 s finished
    assert len(client.tags) == 120
    counts = ledger.run("r").batches_by_status  # type: ignore[union-attr]
    assert counts["ok"] == 12 and "sent" not in counts
    ledger.close()


def _stopped_at(
    stop: float, client: Any, settings: Any, ledger: Ledger, batches: Any
) -> tuple[DispatchReport, float]:
    """Dispatch ``batches`` as run ``r`` of ``ledger`` (started here) on the virtual clock, asking the dispatcher
    to stop (drain) at ``stop`` seconds; returns its report and the clock's time when it ended."""
    ledger.start_run("r", job="j")

    async def go() -> tuple[DispatchReport, float]:
        loop = asyncio.get_running_loop()
        dispatcher = Dispatcher(client, settings, ledger=ledger, run_id="r")
        loop.call_later(stop, dispatcher.stop_event.set)
        report = await dispatcher.run(batches)
        return report, loop.time()

    return run_virtual(go())


def test_drain_timeout_cancels_hung_requests_and_leaves_them_sent(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.sqlite")
    report, ended = _stopped_at(
        0.5,
        MemoryPlatform(latency=60.0),
        _settings(concurrency=2, drain_timeout=1.5, request_timeout=100.0),
        ledger,
        _plan(10),
    )
    assert report.outcome is DispatchOutcome.INTERRUPTED
    assert ended == pytest.approx(2.0)  # stop at 0.5 + drain 1.5
    assert ledger.run("r").batches_by_status.get("sent") == 2  # type: ignore[union-attr]
    ledger.close()


def test_per_endpoint_concurrency_cap_and_rate_budget() -> None:
    client = MemoryPlatform(latency=0.3)
    plan = _plan(40)
    settings = _settings(
        concurrency=8, per_endpoint_concurrency={"tagUsers": 2}, budgets={"tagUsers": RateBudgetSpec(10, 1.0)}
    )
    report = run_virtual(_dispatch(client, plan, settings))
    assert client.max_in_flight["tagUsers"] == 2
    stats = report.endpoints["tagUsers"]
    assert stats.budget_requests == 10 and stats.budget_period == 1.0
    assert report.batches_done == 40


def test_a_star_under_per_endpoint_concurrency_caps_every_endpoint_not_named() -> None:
    # "*" is accepted there as under budgets and batch_size; it was ignored (8 in flight instead of 1).
    client = MemoryPlatform(latency=0.3)
    report = run_virtual(
        _dispatch(client, _plan(20), _settings(concurrency=8, per_endpoint_concurrency={"*": 1}))
    )
    assert client.max_in_flight["tagUsers"] == 1
    assert report.batches_done == 20


def test_batches_and_attempts_reach_the_observers(tmp_path: Path) -> None:
    started: list[str] = []
    attempts: list[Attempt] = []
    done: list[BatchResult] = []

    class Observer:
        def on_batch_start(self, batch: Batch) -> None:
            started.append(batch.batch_id)

        def on_attempt(self, attempt: Attempt) -> None:
            attempts.append(attempt)

        def on_batch_done(self, batch: Batch, result: BatchResult) -> None:
            done.append(result)

    def flaky(batch: Batch, attempt: int) -> Exception | None:
        if batch.ext_ids[0] == "t0-0" and attempt == 1:
            return RetryableError("HTTP 429", status=429, retry_after=1.0)
        if batch.ext_ids[0] == "t1-0" and attempt == 1:
            return RetryableError("HTTP 503", status=503)
        return None

    ledger = Ledger.open(tmp_path / "l.sqlite")
    ledger.start_run("r", job="j")
    settings = _settings(retry=RetryPolicy(base_delay=0.01))
    run_virtual(
        _dispatch(
            MemoryPlatform(behaviour=flaky),
            _plan(3),
            settings,
            observers=[Observer()],
            ledger=ledger,
            run_id="r",
        )
    )
    assert len(started) == 3 and len(done) == 3 and all(r.status is BatchStatus.OK for r in done)
    outcomes = sorted((a.batch_id[-8:], a.attempt, str(a.outcome), a.http_status) for a in attempts)
    assert outcomes == [
        (":t0-0:10", 1, "rate_limited", 429),
        (":t0-0:10", 2, "ok", 200),
        (":t1-0:10", 1, "retryable", 503),
        (":t1-0:10", 2, "ok", 200),
        (":t2-0:10", 1, "ok", 200),
    ]
    stored = ledger.attempts("r")
    assert sorted((a.batch_id, a.attempt, a.outcome) for a in stored) == sorted(
        (a.batch_id, a.attempt, a.outcome) for a in attempts
    )
    assert all(a.started_at > 0 and a.latency == pytest.approx(0.01) for a in stored)
    ledger.close()


def test_a_plan_out_of_phase_order_is_refused_as_a_state_error() -> None:
    plan = _plan(2, tag="change") + _plan(1, tag="optout", phase=Phase.OPT_OUT)
    with pytest.raises(StateError, match="out of phase order"):
        run_virtual(_dispatch(MemoryPlatform(), plan, _settings()))


def test_log_progress_reports_rate_and_eta_every_interval() -> None:
    now = [0.0]
    with structlog.testing.capture_logs() as logs:
        progress = LogProgress(total_ids=100, total_requests=10, every=5.0, clock=lambda: now[0], job="j")
        for i in range(10):
            now[0] = (i + 1) * 1.0
            batch = _batch("t", tuple(f"u{i}-{k}" for k in range(10)))
            progress.on_attempt(Attempt(batch.batch_id, batch.endpoint, 1, 10, 0.01, AttemptOutcome.OK, 200))
            progress.on_batch_done(
                batch, BatchResult(batch.batch_id, batch.endpoint, batch.operation, BatchStatus.OK, 1)
            )
    lines = [e for e in logs if e["event"] == "run.progress"]
    assert [e["ids_done"] for e in lines] == [10, 60]  # the first answer, then every 5 s
    assert lines[1]["ids_per_second"] == 10.0 and lines[1]["eta_seconds"] == 4.0
    assert lines[1]["job"] == "j" and lines[1]["requests_done"] == 6


def test_latencies_are_a_bounded_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sync.dispatch.dispatch.LATENCY_SAMPLE", 5)
    report = run_virtual(_dispatch(MemoryPlatform(latency=0.02), _plan(20), _settings()))
    stats = report.endpoints["tagUsers"]
    assert stats.latency_count == 20 and len(stats.latencies) == 5
    assert all(latency == pytest.approx(0.02) for latency in stats.latencies)


def test_bar_progress_shows_ids_requests_and_rate() -> None:
    stream = io.StringIO()
    bar = BarProgress(total_ids=20, total_requests=2, stream=stream)
    for i in range(2):
        batch = _batch("t", tuple(f"u{i}-{k}" for k in range(10)))
        bar.on_attempt(Attempt(batch.batch_id, batch.endpoint, 1, 10, 0.01, AttemptOutcome.OK, 200))
        bar.on_batch_done(
            batch, BatchResult(batch.batch_id, batch.endpoint, batch.operation, BatchStatus.OK, 1)
        )
    bar.close()
    text = stream.getvalue()
    assert "2/2 requests" in text and "20/20 IDs" in text


def test_force_stop_cuts_the_drain_short() -> None:
    client = MemoryPlatform(latency=60.0)

    async def go() -> tuple[DispatchReport, float]:
        loop = asyncio.get_running_loop()
        dispatcher = Dispatcher(client, _settings(concurrency=2, drain_timeout=30.0, request_timeout=100.0))
        loop.call_later(0.5, dispatcher.stop_event.set)
        loop.call_later(1.0, dispatcher.force_stop)
        report = await dispatcher.run(_plan(10))
        return report, loop.time()

    report, ended = run_virtual(go())
    assert report.outcome is DispatchOutcome.INTERRUPTED
    assert ended == pytest.approx(1.0)
    assert report.batches_done == 0 and report.batches_unfinished == 10  # all were queued


def test_a_stop_after_the_last_answer_still_completes() -> None:
    stop = asyncio.Event()
    done: list[BatchResult] = []

    class StopAtEnd:
        def on_batch_start(self, batch: Batch) -> None:
            return None

        def on_attempt(self, attempt: Attempt) -> None:
            return None

        def on_batch_done(self, batch: Batch, result: BatchResult) -> None:
            done.append(result)
            if len(done) == 5:
                stop.set()

    report = run_virtual(
        _dispatch(MemoryPlatform(), _plan(5), _settings(), stop=stop, observers=[StopAtEnd()])
    )
    assert report.outcome is DispatchOutcome.COMPLETED and report.batches_done == 5


@dataclass
class HangingPlatform(MemoryPlatform):
    """Never answers a batch's first ``hangs`` attempts (a client that forgot its own time-out)."""

    hangs: int = 1

    async def send(self, batch: Batch) -> SendOutcome:
        if self.attempts[batch.batch_id] < self.hangs:
            self.attempts[batch.batch_id] += 1
            self.sends.append((asyncio.get_running_loop().time(), batch))
            await asyncio.sleep(10_000)
        return await super().send(batch)


def test_a_request_with_no_answer_is_cut_off_by_the_dispatcher_s_own_guard(tmp_path: Path) -> None:
    # The client's per-request time-out is its own; the dispatcher cuts any attempt off after twice the
    # request time-out plus 1 s (11 s here) whatever the client does: each hung attempt ends at its own
    # deadline — attempts that began at different times included — as a retryable failure, and is retried.
    client = HangingPlatform(hangs=2)
    ledger = Ledger.open(tmp_path / "l.sqlite")
    ledger.start_run("r", job="j")
    settings = _settings(
        concurrency=3, request_timeout=5.0, retry=RetryPolicy(max_attempts=3, base_delay=0.5, max_delay=0.5)
    )

    async def go() -> tuple[DispatchReport, float]:
        dispatcher = Dispatcher(client, settings, ledger=ledger, run_id="r", rng=random.Random(7))
        report = await dispatcher.run(_plan(5))
        return report, asyncio.get_running_loop().time()

    report, ended = run_virtual(go())
    attempts = ledger.attempts("r")
    ledger.close()
    assert report.outcome is DispatchOutcome.COMPLETED
    assert report.endpoints["tagUsers"].ids_ok == 50
    hung = [a for a in attempts if a.outcome is AttemptOutcome.RETRYABLE]
    assert len(hung) == 10 and len(attempts) == 15
    assert {a.message for a in hung} == {"no answer within 11 s"}
    assert all(a.latency == pytest.approx(11.0) for a in hung)
    assert ended < 3 * 11 * 2  # nothing waited for more than its own deadline


def test_a_stop_during_a_hung_request_is_a_cancellation_not_a_time_out(tmp_path: Path) -> None:
    # A drain cut short cancels a hung attempt before its guard's deadline: the batch stays sent (its outcome
    # unknown), no attempt is recorded as a time-out, and the run ends when the drain does.
    ledger = Ledger.open(tmp_path / "l.sqlite")
    report, ended = _stopped_at(
        0.5,
        HangingPlatform(hangs=1),
        _settings(concurrency=2, request_timeout=5.0, drain_timeout=1.0),
        ledger,
        _plan(4),
    )
    statuses = ledger.run("r").batches_by_status  # type: ignore[union-attr]
    attempts = ledger.attempts("r")
    ledger.close()
    assert report.outcome is DispatchOutcome.INTERRUPTED
    assert ended == pytest.approx(1.5)
    assert statuses.get("sent") == 2 and attempts == []


@pytest.mark.parametrize("level", ["debug", "info"])
def test_a_batch_s_debug_line_is_written_at_debug_level_only(level: str) -> None:
    # One ``batch.done`` line per batch at debug level (built only then: a filtered call still cost its
    # arguments at every request); none at info.
    from sync.logs import configure_logging

    configure_logging(level, json=True)
    with structlog.testing.capture_logs() as logs:
        run_virtual(_dispatch(MemoryPlatform(), _plan(3), _settings()))
    done = [e for e in logs if e["event"] == "batch.done"]
    if level == "debug":
        assert [(e["status"], e["attempts"]) for e in done] == [("ok", 1)] * 3
    else:
        assert done == []
