"""Resume and retry decisions from the ledger (sync/resume.py), with the real SQLite ledger and real batches."""

from __future__ import annotations

from pathlib import Path

import pytest

from sync.errors import StateError
from sync.ledger import Ledger
from sync.platforms.netmera.requests import batch_id_for, make_batch
from sync.records import Batch, BatchResult, BatchStatus, Operation, RejectedId, RowRef
from sync.resume import (
    ReplayMode,
    ReplayStats,
    replay,
    replay_plan,
    restrict_batch,
    unfinished_run,
)


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
    ledger.start_run("r1", job="nightly")
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
    assert cut.body == [{"extId": "b", "profile": {"name": "B"}}] and cut.ext_ids == ("b",)
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
    cut = restrict_batch(batch, ["c", "a", "zz"])
    assert cut is not None and cut.body == {"tag": "gold", "extIds": ["a", "c"]}
    assert cut.origins == {"a": RowRef("in.csv", 1), "c": RowRef("in.csv", 3)}
    assert restrict_batch(batch, ["zz"]) is None
    assert restrict_batch(batch, ["a", "b", "c"]) is batch
    one = make_batch(Operation.ENABLE_PUSH, {"extId": "a"})
    assert restrict_batch(one, ["a"]) is one
