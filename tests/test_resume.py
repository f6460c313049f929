"""Resume and retry decisions from the ledger (sync/planning/resume.py), with the real SQLite ledger and real batches."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from observers import StopAfter

from sync.errors import StateError
from sync.ledger.ledger import Ledger
from sync.planning.resume import (
    ReplayMode,
    ReplayStats,
    replay,
    replay_plan,
    restrict_batch,
    unfinished_run,
)
from sync.planning.row_keys import ROW_KEY
from sync.planning.validation import EXT_ID
from sync.platforms.netmera.platform import NETMERA
from sync.platforms.netmera.requests import batch_id_for, make_batch
from sync.records import Batch, BatchResult, BatchStatus, Operation, RejectedId, RowRef, body_json


def tag(name: str, *ids: str) -> Batch:
    return make_batch(
        Operation.TAG,
        {"tag": name, "extIds": list(ids)},
        origins={i: RowRef("in.csv", n) for n, i in enumerate(ids, 1)},
    )


def event(*ids: str) -> Batch:
    return make_batch(Operation.FIRE_EVENTS, [{"extId": i, "name": "purchase", "amount": 1} for i in ids])


def attrs(*ids: str) -> Batch:
    return make_batch(Operation.SET_ATTRIBUTES, [{"extId": i, "profile": {"name": i.upper()}} for i in ids])


def record(
    ledger: Ledger,
    run_id: str,
    batch: Batch,
    status: BatchStatus | None,
    refused: tuple[str, ...] = (),
) -> None:
    """planned (status None), sent (SENT), or a final result."""
    ledger.record_planned(run_id, batch)
    if status is None:
        return
    ledger.record_sent(run_id, batch.batch_id)
    if status is BatchStatus.SENT:
        return
    ledger.record_result(
        run_id,
        BatchResult(
            batch.batch_id,
            batch.endpoint,
            batch.operation,
            status,
            1,
            rejected=tuple(RejectedId(x, 5016, "external id not found") for x in refused),
        ),
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    with Ledger.open(tmp_path / "ledger.sqlite") as led:
        yield led  # type: ignore[misc]


def crashed_run(ledger: Ledger) -> list[Batch]:
    plan = [
        tag("gold", "a", "b"),
        tag("vip", "c"),
        attrs("a", "b", "c"),
        event("a"),
        event("b"),
        tag("new", "d"),
    ]
    ledger.start_run("r1", job="nightly", platform="netmera")
    record(ledger, "r1", plan[0], BatchStatus.OK)
    record(ledger, "r1", plan[1], BatchStatus.SENT)  # in flight when the process died
    record(ledger, "r1", plan[2], BatchStatus.REJECTED, refused=("b",))
    record(ledger, "r1", plan[3], BatchStatus.SENT)  # an event with an unknown outcome
    record(ledger, "r1", plan[4], None)  # queued, never taken
    # plan[5] was never fed: not in the ledger at all
    ledger.flush()
    return plan


def test_resume_sends_what_was_not_confirmed_and_holds_unknown_events(ledger: Ledger) -> None:
    plan = crashed_run(ledger)
    stats = ReplayStats()
    sent = list(replay(plan, replay_plan(ledger, "r1"), stats))
    assert [b.batch_id for b in sent] == [plan[1].batch_id, plan[4].batch_id, plan[5].batch_id]
    assert stats.to_json() == {
        "sent": 3,
        "skipped_confirmed": 1,
        "skipped_refused": 1,
        "held": 1,
        "cut_to_refused": 0,
        "rows_confirmed": 0,
        "rows_held": 0,
        "rows_refused": 0,
        "ids_deleted": 0,
        "rows_deleted": 0,
    }


def test_retry_replays_failed_held_and_refused_rows(ledger: Ledger) -> None:
    plan = crashed_run(ledger)
    stats = ReplayStats()
    sent = list(replay(plan, replay_plan(ledger, "r1", ReplayMode.RETRY), stats))
    assert [b.endpoint for b in sent] == [
        "tagUsers",
        "setProfileAttributes",
        "fireEvents",
        "fireEvents",
        "tagUsers",
    ]
    cut = sent[1]
    assert body_json(cut) == [{"extId": "b", "profile": {"name": "B"}}] and cut.ext_ids == ("b",)
    assert cut.batch_id == batch_id_for("setProfileAttributes", cut.body) != plan[2].batch_id
    assert stats.cut_to_refused == 1 and stats.held == 0 and stats.skipped_confirmed == 1


def test_later_runs_count_a_resume_of_a_resume_sends_nothing_twice(ledger: Ledger) -> None:
    plan = crashed_run(ledger)
    ledger.start_run("r2", job="nightly")
    for batch in replay(plan, replay_plan(ledger, "r1")):
        record(ledger, "r2", batch, BatchStatus.OK)
    ledger.start_run("other", job="another-job")
    record(ledger, "other", plan[3], BatchStatus.OK)  # another job's ledger rows do not count
    ledger.flush()
    again = list(replay(plan, replay_plan(ledger, "r1")))
    assert again == []  # the held event stays held; nothing else is left
    assert [b.endpoint for b in replay(plan, replay_plan(ledger, "r1", ReplayMode.RETRY))] == [
        "setProfileAttributes",
        "fireEvents",
    ]


def test_a_retry_follows_the_cuts_later_retries_sent(ledger: Ledger) -> None:
    # A retry sends a refused batch's cut under the cut's own ID: a later retry must find that ID's outcome, so
    # a cut refused again in part is cut down once more, and a confirmed one is not sent again.
    batch = attrs("a", "b", "c")
    ledger.start_run("r1", job="nightly", platform="netmera")
    record(ledger, "r1", batch, BatchStatus.REJECTED, refused=("a", "b"))
    cut = restrict_batch(batch, ["a", "b"], NETMERA)
    assert cut is not None
    ledger.start_run("r2", job="nightly", platform="netmera")
    record(ledger, "r2", cut, BatchStatus.REJECTED, refused=("b",))
    ledger.flush()
    [again] = replay([batch], replay_plan(ledger, "r1", ReplayMode.RETRY))
    assert again.ext_ids == ("b",)
    ledger.start_run("r3", job="nightly", platform="netmera")
    record(ledger, "r3", again, BatchStatus.OK)
    ledger.flush()
    stats = ReplayStats()
    assert list(replay([batch], replay_plan(ledger, "r1", ReplayMode.RETRY), stats)) == []
    assert stats.skipped_confirmed == 1 and stats.sent == 0


def test_unfinished_run_finds_the_oldest_run_since_the_last_finished_one(ledger: Ledger) -> None:
    assert unfinished_run(ledger, "nightly") is None
    ledger.start_run("r0", job="nightly")
    ledger.finish_run("r0", status="done", exit_code=0)
    assert unfinished_run(ledger, "nightly") is None
    ledger.start_run("r1", job="nightly")  # crashed: stays "running"
    ledger.start_run("r2", job="nightly")
    ledger.finish_run("r2", status="interrupted", exit_code=4)
    assert unfinished_run(ledger, "nightly") == "r1"
    ledger.start_run("r3", job="nightly")
    ledger.finish_run("r3", status="partial", exit_code=1)
    assert unfinished_run(ledger, "nightly") is None


def test_replay_of_an_unknown_run_is_refused(ledger: Ledger) -> None:
    with pytest.raises(StateError, match="no run nope"):
        replay_plan(ledger, "nope")


def test_restrict_batch_keeps_items_origins_and_one_user_bodies() -> None:
    batch = tag("gold", "a", "b", "c")
    cut = restrict_batch(batch, ["c", "a", "zz"], NETMERA)
    assert cut is not None and body_json(cut) == {"tag": "gold", "extIds": ["a", "c"]}
    assert cut.origins == {"a": RowRef("in.csv", 1), "c": RowRef("in.csv", 3)}
    assert restrict_batch(batch, ["zz"], NETMERA) is None
    assert restrict_batch(batch, ["a", "b", "c"], NETMERA) is batch
    one = make_batch(Operation.ENABLE_PUSH, {"extId": "a"})
    assert restrict_batch(one, ["a"], NETMERA) is one


def test_a_resume_of_a_resume_counts_the_runs_it_resumed(ledger: Ledger) -> None:
    plan = crashed_run(ledger)  # r1 died
    ledger.start_run("r2", job="nightly")  # r2 resumed r1: sent only plan[1] before it died too
    record(ledger, "r2", plan[1], BatchStatus.OK)
    ledger.flush()
    sent = [b.batch_id for b in replay(plan, replay_plan(ledger, "r2"))]
    assert sent == [plan[4].batch_id, plan[5].batch_id]  # plan[0] was confirmed by r1: not sent again


def test_a_resume_follows_the_chain_of_origins_past_finished_runs(ledger: Ledger) -> None:
    # r1 died; a sample run finished after it (r2, done); `retry r1` (r3) was interrupted. Resuming r3 must count
    # what r1 confirmed: the walk back through unfinished runs stops at r2, the recorded origin does not.
    plan = crashed_run(ledger)
    ledger.finish_run("r1", status="interrupted", exit_code=4)
    ledger.start_run("r2", job="nightly")
    ledger.finish_run("r2", status="done", exit_code=0)
    ledger.start_run("r3", job="nightly", platform="netmera", origin="r1", origin_mode="retry")
    record(ledger, "r3", plan[1], BatchStatus.OK)
    ledger.flush()
    stats = ReplayStats()
    sent = list(replay(plan, replay_plan(ledger, "r3"), stats))
    # plan[0] (r1 confirmed) and plan[1] (r3) are not sent again. The retry was asked to send what r1 left held
    # (the event sent without an answer) and refused (plan[2], cut down to "b"): its resume sends them too.
    assert [b.batch_id for b in sent] == [
        restrict_batch(plan[2], ["b"], NETMERA).batch_id,  # type: ignore[union-attr]
        plan[3].batch_id,
        plan[4].batch_id,
        plan[5].batch_id,
    ]
    assert stats.skipped_confirmed == 2 and stats.held == 0 and stats.cut_to_refused == 1
    assert "r1" in replay_plan(ledger, "r3").runs


def test_a_resume_of_a_resume_holds_what_the_runs_before_it_left_unknown(ledger: Ledger) -> None:
    # Only a retry sends what was held: a resume of a resume (past a finished run) still holds it.
    plan = crashed_run(ledger)
    ledger.finish_run("r1", status="interrupted", exit_code=4)
    ledger.start_run("r2", job="nightly")
    ledger.finish_run("r2", status="done", exit_code=0)
    ledger.start_run("r3", job="nightly", origin="r1", origin_mode="resume")
    ledger.flush()
    sent = [b.batch_id for b in replay(plan, replay_plan(ledger, "r3"))]
    assert sent == [plan[1].batch_id, plan[4].batch_id, plan[5].batch_id]


def test_runs_of_another_destination_do_not_count(ledger: Ledger) -> None:
    # One job name, two destinations (staging and production): what staging confirmed is not on production.
    batch = tag("gold", "a")
    ledger.start_run("prod1", job="nightly", destination="netmera-prod")
    record(ledger, "prod1", batch, None)
    ledger.finish_run("prod1", status="interrupted", exit_code=4)
    ledger.start_run("stage1", job="nightly", destination="netmera-stage")
    record(ledger, "stage1", batch, BatchStatus.OK)
    ledger.finish_run("stage1", status="interrupted", exit_code=4)
    ledger.start_run("legacy", job="nightly")  # recorded by an older pushsync: any destination, as before
    ledger.finish_run("legacy", status="interrupted", exit_code=4)
    ledger.flush()
    assert [b.batch_id for b in replay([batch], replay_plan(ledger, "prod1"))] == [batch.batch_id]
    assert list(replay([batch], replay_plan(ledger, "stage1"))) == []
    assert unfinished_run(ledger, "nightly") == "prod1"
    assert unfinished_run(ledger, "nightly", "netmera-prod") == "prod1"
    assert unfinished_run(ledger, "nightly", "netmera-stage") == "stage1"
    assert unfinished_run(ledger, "nightly", "netmera-elsewhere") == "legacy"


EVENTS_JOB = """\
version: 1
name: backfill
workdir: work
destination:
  platform: netmera
  base_url: {url}
  secret: {{env: NETMERA_API_KEY}}
sources:
  - name: users
    path: users.csv
    ext_id: id
    tags: {{column: segments}}
  - name: purchases
    kind: events
    path: events.csv
    ext_id: id
    event: name
    attributes: {{amount: number}}
dispatch:
  retry: {{max_attempts: 1}}
  request_timeout: 5
"""


async def test_resume_never_resends_an_event_whose_outcome_is_unknown(
    tmp_path: Path, netmera_sandbox_factory: Any
) -> None:
    from sync.config import load_job
    from sync.run import RunOptions, run
    from sync.sandboxes._core import FaultSpec

    sandbox = await netmera_sandbox_factory(
        faults=FaultSpec(applied_then_500=1.0, endpoints=frozenset({"fireEvents"}))
    )
    (tmp_path / "job.yaml").write_text(EVENTS_JOB.format(url=sandbox.url), encoding="utf-8")
    (tmp_path / "users.csv").write_text("id,segments\na,gold\nb,silver\n", encoding="utf-8")
    (tmp_path / "events.csv").write_text("id,name,amount\na,purchase,10\nb,purchase,20\n", encoding="utf-8")
    job = load_job(tmp_path / "job.yaml")
    first = await run(job, RunOptions(api_key=sandbox.api_key))
    assert int(first.exit_code) == 1  # the event batch was applied, but answered 500: outcome unknown
    assert len(sandbox.sandbox.state.events) == 2
    sandbox.sandbox.configure(faults=FaultSpec())

    resumed = await run(job, RunOptions(api_key=sandbox.api_key, resume=first.run_id))
    # Held row by row (the two events of the batch whose outcome is unknown), before any batch is cut.
    assert (
        resumed.replay is not None and resumed.replay.rows_held == 2 and resumed.replay.skipped_confirmed == 2
    )
    assert resumed.summary.requests == 0
    assert len(sandbox.sandbox.state.events) == 2  # not sent twice

    retried = await run(job, RunOptions(api_key=sandbox.api_key, retry=first.run_id))
    assert retried.replay is not None and retried.replay.sent == 1 and int(retried.exit_code) == 0
    assert len(sandbox.sandbox.state.events) == 4  # the user asked for it


def test_resume_holds_back_every_non_idempotent_operation_with_an_unknown_outcome(ledger: Ledger) -> None:
    """A push (Forms On Fire) in flight at a crash is as unsafe to resend as an event: resume holds it back and
    only `retry` sends it; an idempotent batch in the same state is simply sent again."""
    from sync.platforms.formsonfire.requests import make_batch as push_batch
    from sync.platforms.formsonfire.requests import push_body

    push = push_batch(push_body("UserExternalId", "a", title="Hi", body="there"), origin=RowRef("p.csv", 1))
    pushed_value = make_batch(Operation.PUSH_ATTRIBUTES, [{"extId": "b", "profile": {"seen": ["x"]}}])
    tagged = tag("gold", "c")
    ledger.start_run("r1", job="pushes")
    for batch in (push, pushed_value, tagged):
        record(ledger, "r1", batch, BatchStatus.SENT)  # all three in flight when the process died
    ledger.flush()

    stats = ReplayStats()
    resent = list(replay([push, pushed_value, tagged], replay_plan(ledger, "r1"), stats))
    assert [b.batch_id for b in resent] == [tagged.batch_id]
    assert stats.held == 2

    retried = list(
        replay([push, pushed_value, tagged], replay_plan(ledger, "r1", ReplayMode.RETRY), ReplayStats())
    )
    assert {b.batch_id for b in retried} == {push.batch_id, pushed_value.batch_id, tagged.batch_id}


class _SlowReads(ReplayStats):
    """A ReplayStats whose counts take a moment to read, as a thread switch between reading a count and storing
    it plus one would: another lane's thread runs in that moment. Without a lock around the read and the store,
    its increment is then lost every time; with one, it waits."""

    __slots__ = ()

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name in _COUNTS:
            time.sleep(0.0005)
        return value


_COUNTS = frozenset(ReplayStats().to_json())


def test_replay_counts_add_up_when_lanes_count_at_the_same_time(ledger: Ledger) -> None:
    """One ReplayStats is shared by a resumed run's lanes, which the dispatcher pulls in a thread each (and
    whose keyed rows are filtered in their builders' threads): no count may be lost to two threads adding to it
    at once."""
    plan = crashed_run(ledger)
    decisions = replay_plan(ledger, "r1")
    keys = pl.Series(ROW_KEY, range(64), dtype=pl.UInt64)
    frame = pl.DataFrame({EXT_ID: [f"u{k}" for k in range(64)]}).with_columns(keys)
    # Every keyed row of the frame was confirmed by the crashed run: each call counts 64 confirmed rows.
    confirmed_rows = dataclasses.replace(
        decisions,
        rows=pl.DataFrame(
            {ROW_KEY: keys, "__batch": [0] * 64, "__class": [0] * 64},
            schema={ROW_KEY: pl.UInt64, "__batch": pl.UInt32, "__class": pl.UInt8},
        ),
    )
    stats = _SlowReads()
    threads_n, rounds = 4, 10
    start = threading.Barrier(threads_n)

    def lane() -> None:
        start.wait()
        for _ in range(rounds):
            assert confirmed_rows.keep_rows(frame, stats).is_empty()
            list(replay(plan, decisions, stats))

    threads = [threading.Thread(target=lane) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    calls = threads_n * rounds
    assert stats.to_json() == {
        "sent": 3 * calls,
        "skipped_confirmed": calls,
        "skipped_refused": calls,
        "held": calls,
        "cut_to_refused": 0,
        "rows_confirmed": 64 * calls,
        "rows_held": 0,
        "rows_refused": 0,
        "ids_deleted": 0,
        "rows_deleted": 0,
    }


CHAIN_JOB = """\
version: 1
name: backfill
workdir: work
destination:
  platform: netmera
  base_url: {url}
  secret: {{env: NETMERA_API_KEY}}
sources:
  - name: purchases
    kind: events
    path: events.csv
    ext_id: id
    event: name
    attributes: {{amount: number}}
dispatch:
  concurrency: 1
  batch_size: 5
  retry: {{max_attempts: 1}}
  request_timeout: 5
"""


@pytest.mark.parametrize("ledger_in", ["sqlite", "postgresql"])
async def test_a_resume_of_an_interrupted_retry_sends_only_what_no_run_of_the_chain_confirmed(
    tmp_path: Path, netmera_sandbox_factory: Any, request: pytest.FixtureRequest, ledger_in: str
) -> None:
    """A run ends partial (events answered 500), its retry is interrupted, the retry is resumed. The resume went
    back only through *unfinished* runs before the retry: the partial run's confirmations did not count, and the
    resume sent every event it had confirmed again (the audit: 48 batches for 2 left). Each replaying run now
    records its origin, and the resume follows the chain — in SQLite, and in PostgreSQL (several workers), whose
    runs recorded their origin already."""
    from sync.config import load_job
    from sync.run import RunOptions, run
    from sync.sandboxes._core import FaultSpec

    sandbox = await netmera_sandbox_factory(
        faults=FaultSpec(error_500=0.3, endpoints=frozenset({"fireEvents"}))
    )
    events = sandbox.sandbox.state.events
    (tmp_path / "job.yaml").write_text(CHAIN_JOB.format(url=sandbox.url), encoding="utf-8")
    rows = [(f"u{i:03d}", i) for i in range(320)]  # 64 batches of 5 events
    lines = "".join(f"{ext_id},purchase,{amount}\n" for ext_id, amount in rows)
    (tmp_path / "events.csv").write_text("id,name,amount\n" + lines, encoding="utf-8")
    job = load_job(tmp_path / "job.yaml")
    url = request.getfixturevalue("postgres_url") if ledger_in == "postgresql" else None
    key = sandbox.api_key

    def open_ledger() -> Any:
        from sync.coordination import open_ledger as open_pg

        return open_pg(url) if url is not None else Ledger.open(tmp_path / "work" / "ledger.sqlite")

    first = await run(job, RunOptions(api_key=key, database_url=url))
    assert int(first.exit_code) == 1  # partial: the events answered 500 were not applied
    with open_ledger() as ledger:
        confirmed = len(ledger.confirmed_ok(first.run_id))
    failed = 64 - confirmed
    assert failed > 6 and len(events) == 5 * confirmed
    sandbox.sandbox.configure(faults=FaultSpec())

    stop = asyncio.Event()
    retry = await run(
        job,
        RunOptions(
            api_key=key, retry=first.run_id, stop=stop, observers=[StopAfter(stop, 3)], database_url=url
        ),
    )
    assert int(retry.exit_code) == 4 and retry.summary.batches_done == 3
    assert len(events) == 5 * (confirmed + 3)
    if url is not None:
        # A stopped worker leaves its run live for the others: the run ends once none is left (as every worker
        # had been stopped, or its lease ran out).
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE pushsync.runs SET status = 'interrupted' WHERE run_id = %s", (retry.run_id,))

    resumed = await run(job, RunOptions(api_key=key, resume=retry.run_id, database_url=url))
    assert int(resumed.exit_code) == 0 and resumed.replay is not None
    assert resumed.summary.requests == resumed.replay.sent == failed - 3  # not the partial run's 40-odd again
    landed = sorted((e.ext_id, e.attributes["amount"]) for e in events)
    assert landed == sorted(rows)  # every event once: none lost, none twice
    with open_ledger() as ledger:
        chain = [ledger.run(r) for r in (resumed.run_id, retry.run_id, first.run_id)]
    assert [(i.origin, i.origin_mode) for i in chain if i is not None] == [
        (retry.run_id, "resume"),
        (first.run_id, "retry"),
        (None, None),
    ]


async def test_a_run_for_another_destination_is_not_resumed(
    tmp_path: Path, netmera_sandbox_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One job file serving staging and production (``base_url`` from the environment) has one name and one
    workdir. Production's `pushsync run` after staging's interrupted run resumed it, by the job's name alone:
    it skipped every event staging had confirmed, and production never got them. Now a run of another
    destination is not resumed (planned afresh, saying so), and an explicit `resume` of it is refused."""
    import structlog

    from sync.config import load_job
    from sync.run import RunOptions, run

    staging, production = await netmera_sandbox_factory(), await netmera_sandbox_factory()
    (tmp_path / "job.yaml").write_text(
        CHAIN_JOB.format(url="${NETMERA_URL}").replace("batch_size: 5", "batch_size: 20"), encoding="utf-8"
    )
    rows = [(f"u{i:03d}", i) for i in range(200)]  # 10 batches of 20 events
    lines = "".join(f"{ext_id},purchase,{amount}\n" for ext_id, amount in rows)
    (tmp_path / "events.csv").write_text("id,name,amount\n" + lines, encoding="utf-8")

    def job_for(sandbox: Any) -> Any:
        monkeypatch.setenv("NETMERA_URL", sandbox.url)
        return load_job(tmp_path / "job.yaml")

    def landed(sandbox: Any) -> list[tuple[str, Any]]:
        return sorted((e.ext_id, e.attributes["amount"]) for e in sandbox.sandbox.state.events)

    stop = asyncio.Event()
    key = staging.api_key
    first = await run(job_for(staging), RunOptions(api_key=key, stop=stop, observers=[StopAfter(stop, 3)]))
    assert int(first.exit_code) == 4 and len(staging.sandbox.state.events) == 60

    with pytest.raises(StateError, match="sent to another destination") as refused:
        await run(job_for(production), RunOptions(api_key=key, resume=first.run_id))
    assert int(refused.value.exit_code) == 2 and "\n" not in str(refused.value)
    assert "nothing was sent" in str(refused.value) and production.sandbox.state.events == []

    with structlog.testing.capture_logs() as logs:
        fresh = await run(job_for(production), RunOptions(api_key=key))
    assert fresh.resumed_from is None and int(fresh.exit_code) == 0
    assert landed(production) == sorted(rows)  # every event, none skipped for staging's sake
    assert [e["unfinished"] for e in logs if e["event"] == "run.not_resumed"] == [first.run_id]

    resumed = await run(job_for(staging), RunOptions(api_key=key))  # staging's own unfinished run
    assert resumed.resumed_from == first.run_id and int(resumed.exit_code) == 0
    assert landed(staging) == sorted(rows)
    with Ledger.open(resumed.ledger_path) as ledger:
        destinations = {r.run_id: r.destination for r in ledger.runs("backfill")}
    # Recorded with the account the key names (Destination.key), never the key itself.
    staging_key, production_key = (job_for(s).destination.for_account(key).key for s in (staging, production))
    assert destinations[first.run_id] == destinations[resumed.run_id] == staging_key
    assert destinations[fresh.run_id] == production_key != destinations[first.run_id]
    assert all(key not in d for d in destinations.values())
