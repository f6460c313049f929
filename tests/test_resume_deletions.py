"""Resume and retry never bring back a user the run deleted (sync/planning/resume.py, ``ReplayPlan.deleted``),
end to end against the Netmera sandbox, with the SQLite ledger and the PostgreSQL one (several workers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sync.ledger.ledger import Ledger
from sync.planning.resume import ReplayStats, replay, replay_plan
from sync.platforms.netmera.requests import make_batch
from sync.records import Batch, BatchResult, BatchStatus, Operation, RejectedId

JOB = """\
version: 1
name: leavers
workdir: work
destination:
  platform: netmera
  base_url: {url}
  secret: {{env: NETMERA_API_KEY}}
sources:
  - name: users
    path: users.csv
    ext_id: id
    attributes: {{name: string}}
  - name: purchases
    kind: events
    path: events.csv
    ext_id: id
    event: event
  - name: gone
    kind: deletions
    path: deleted.csv
    ext_id: id
dispatch:
  retry: {{max_attempts: 1}}
  request_timeout: 5
"""


@pytest.mark.parametrize("ledger_in", ["sqlite", "postgresql"])
async def test_a_retry_does_not_recreate_a_user_the_run_deleted(
    tmp_path: Path, netmera_sandbox_factory: Any, request: pytest.FixtureRequest, ledger_in: str
) -> None:
    """A user both updated and deleted in one run: the update and the event fail (503), the deletion, sent last,
    goes through. `pushsync retry` replayed the failed update and event after the deletion, and the deleted user
    was back on the platform with a profile and an event. Now the replay leaves the deleted user out."""
    from sync.config import load_job
    from sync.run import RunOptions, run
    from sync.sandboxes._core import FaultSpec

    sandbox = await netmera_sandbox_factory(
        faults=FaultSpec(error_503=1.0, endpoints=frozenset({"setProfileAttributes", "fireEvents"}))
    )
    state = sandbox.sandbox.state
    (tmp_path / "job.yaml").write_text(JOB.format(url=sandbox.url), encoding="utf-8")
    (tmp_path / "users.csv").write_text("id,name\nkeep,Ann\nleaver,Bob\n", encoding="utf-8")
    (tmp_path / "events.csv").write_text("id,event\nkeep,login\nleaver,login\n", encoding="utf-8")
    (tmp_path / "deleted.csv").write_text("id\nleaver\n", encoding="utf-8")
    state.ensure_users(["leaver"])
    job = load_job(tmp_path / "job.yaml")
    url = request.getfixturevalue("postgres_url") if ledger_in == "postgresql" else None

    first = await run(job, RunOptions(api_key=sandbox.api_key, database_url=url))
    assert int(first.exit_code) == 1  # the update and the event failed
    assert not state.exists("leaver") and not state.exists("keep")
    sandbox.sandbox.configure(faults=FaultSpec())

    retried = await run(job, RunOptions(api_key=sandbox.api_key, retry=first.run_id, database_url=url))
    assert int(retried.exit_code) == 0 and retried.replay is not None
    assert not state.exists("leaver")  # was re-created with name Bob and a login event
    assert state.user("keep").profile == {"name": "Ann"}
    assert [(e.ext_id, e.name) for e in state.events] == [("keep", "login")]
    assert (retried.replay.ids_deleted, retried.replay.rows_deleted) == (1, 1)
    assert "deleted users: 1 IDs and 1 event/push rows left out" in retried.render_text()


def _record(
    ledger: Ledger, run_id: str, batch: Batch, status: BatchStatus, refused: tuple[str, ...] = ()
) -> None:
    ledger.record_planned(run_id, batch)
    ledger.record_sent(run_id, batch.batch_id)
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


def test_only_the_deletions_the_platform_confirmed_keep_a_user_out_of_a_replay(tmp_path: Path) -> None:
    """An ID the platform refused in a deletion batch, or whose deletion has no answer, was not deleted: its
    failed update is replayed (an unanswered deletion is sent again after it, in its own phase)."""
    update = make_batch(
        Operation.SET_ATTRIBUTES, [{"extId": x, "profile": {"n": 1}} for x in ("a", "b", "c", "d")]
    )
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        ledger.start_run("r1", job="nightly", platform="netmera")
        _record(ledger, "r1", update, BatchStatus.FAILED)
        _record(ledger, "r1", make_batch(Operation.DELETE_USERS, {"extIds": ["a"]}), BatchStatus.OK)
        refused = make_batch(Operation.DELETE_USERS, {"extIds": ["b", "c"]})
        _record(ledger, "r1", refused, BatchStatus.REJECTED, refused=("c",))
        _record(ledger, "r1", make_batch(Operation.DELETE_USERS, {"extIds": ["d"]}), BatchStatus.FAILED)
        ledger.finish_run("r1", status="partial", exit_code=1)
        ledger.flush()
        stats = ReplayStats()
        sent = list(replay([update], replay_plan(ledger, "r1"), stats))
    assert [b.ext_ids for b in sent] == [("c", "d")]
    assert stats.ids_deleted == 2 and stats.sent == 1
