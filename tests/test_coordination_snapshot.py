"""Snapshot mode on PostgreSQL (sync/coordination/snapshot.py): the confirmed state, the pending deltas and the
batch maps in a real PostgreSQL server (tests/pg_fixture.py), workers as separate ``pushsync run`` processes
against a Netmera sandbox process."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pytest

import sync.state._store as state_store
from sync.config import Job, load_job
from sync.coordination._db import connect
from sync.coordination.snapshot import PgStateBackend, pending_runs, pg_state_store, state_scope
from sync.errors import StateError
from sync.ledger.ledger import Ledger
from sync.planning.planning import build_plan
from sync.state import SnapshotDiff, StateStore, commit, compute_diff, snapshot_builder_for
from tests.conftest import NetmeraProcess
from tests.netmera_e2e import (
    COORDINATED_BATCH,
    applied,
    batch_counts,
    coordinated_job,
    expected_users,
    finish,
    kill_a_busy_worker,
    minimal_applications,
    query,
    requests_total,
    run_json,
    run_workers,
    sandbox_faults,
    sandbox_users,
    worker,
    write_users,
)
from tests.pg_fixture import PostgresServer
from tests.test_state import MANY, send, write_input

USERS = 600


def snapshot_job(tmp: Path, sandbox: NetmeraProcess, budget: str = "") -> list[list[str]]:
    """A snapshot-mode job of :data:`USERS` users in ``tmp`` for several workers (``budget``: indented
    ``dispatch`` lines, as :func:`coordinated_job`'s); returns the users' rows."""
    (tmp / "job.yaml").write_text(
        coordinated_job(sandbox.url, name="snapscale", head="mode: snapshot\n", budget=budget),
        encoding="utf-8",
    )
    return write_users(tmp, range(USERS))


def test_two_workers_converge_a_second_run_sends_nothing_and_a_change_sends_only_the_change(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    sandbox = netmera_sandbox_process
    # Paced (about 3 s of sending), so that both workers send whenever the second starts late on a loaded
    # machine: unpaced, the first could send the whole run before the second had joined.
    rows = snapshot_job(
        tmp_path, sandbox, budget='  budget_groups: {account: {requests: 30, per: 1s, endpoints: ["*"]}}\n'
    )
    procs = run_workers(tmp_path, sandbox, postgres_url, 2)
    results = [finish(p) for p in procs]
    for code, out, err in results:
        assert code == 0, (out, err[-3000:])
    docs = [json.loads(out) for _, out, _ in results]
    assert len({d["run_id"] for d in docs}) == 1  # one run, joined by both
    assert sandbox_users(sandbox) == expected_users(rows)
    # Nothing sent twice, but for a request the client timed out on (a loaded machine) and sent again.
    assert (
        0 <= sum(applied(sandbox).values()) - minimal_applications(rows, "snapshot") <= 4 * COORDINATED_BATCH
    )
    # Exactly one worker merged the run's confirmed changes into the state, once every batch was confirmed.
    merged = [d["state"] for d in docs if "state" in d]
    assert len(merged) == 1 and merged[0]["users"] == {"users": USERS}, docs
    assert merged[0]["batches_unconfirmed"] == 0
    assert all(d["diff"]["users_new"] == USERS for d in docs)
    senders = query(postgres_server, postgres_url, "SELECT count(DISTINCT worker) FROM pushsync.attempts")
    assert int(senders[0][0]) == 2
    # The state lives in PostgreSQL: no state file in the workdir, no delta left pending.
    assert not list((tmp_path / "work").rglob("*.parquet"))
    assert query(postgres_server, postgres_url, "SELECT count(*) FROM pushsync.snapshot_pending") == [["0"]]
    code, out, err = finish(
        worker(tmp_path, sandbox, postgres_url, "state", "show", "job.yaml", "--output", "json")
    )
    assert code == 0, err
    shown = json.loads(out)
    assert shown["sources"]["users"]["users"] == USERS and shown["pending_runs"] == []
    assert shown["sources"]["users"]["fields"]["attr:name"] == USERS
    assert shown["state_dir"].startswith("coordination database pushsync@127.0.0.1:"), shown
    assert postgres_server.password not in out

    # The same export again: nothing to send.
    before = requests_total(sandbox)
    code, doc, err = run_json(tmp_path, sandbox, postgres_url)
    assert code == 0, err
    assert requests_total(sandbox) == before and doc["diff"]["users_changed"] == 0
    assert doc["totals"]["requests"] == 0

    # 1 % of the users change their score: `pushsync plan` shows it against the state in PostgreSQL...
    before_applied = applied(sandbox)
    rows = write_users(tmp_path, range(USERS), churn=1)
    code, out, err = finish(worker(tmp_path, sandbox, postgres_url, "plan", "job.yaml", "--output", "json"))
    assert code == 0, err
    assert json.loads(out)["diff"]["users_changed"] == USERS // 100
    # ... and a run sends that change alone.
    code, doc, err = run_json(tmp_path, sandbox, postgres_url)
    assert code == 0, err
    after = applied(sandbox)
    sent = {k: after[k] - before_applied.get(k, 0) for k in after if after[k] != before_applied.get(k, 0)}
    assert sent == {"setProfileAttributes": USERS // 100}
    assert doc["diff"]["users_changed"] == USERS // 100 and doc["state"]["users_updated"] == {
        "users": USERS // 100
    }
    assert sandbox_users(sandbox) == expected_users(rows)


def _wait(predicate: Any, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except RuntimeError:
            pass  # the tables are not there yet
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_worker_killed_between_sending_and_committing_the_next_run_commits_and_resends_nothing(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    sandbox = netmera_sandbox_process
    rows = snapshot_job(tmp_path, sandbox)
    job = load_job(tmp_path / "job.yaml")
    scope = state_scope(dataclasses.replace(job, destination=job.destination.for_account(sandbox.api_key)))
    proc = worker(tmp_path, sandbox, postgres_url, "run", "job.yaml", "--progress", "none")

    def planned() -> bool:
        return query(postgres_server, postgres_url, "SELECT bool_or(planned) FROM pushsync.runs") == [["t"]]

    _wait(planned, "the leader to queue the run")
    # Another holder of the job's state lock (a real advisory lock, as a second worker would hold it) keeps the
    # worker from committing once every batch is confirmed: the window between send and commit, held open.
    holder = psycopg.connect(postgres_url, autocommit=True)
    try:
        holder.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"pushsync.state:{scope}",))

        def all_confirmed() -> bool:
            ok, total = batch_counts(postgres_server, postgres_url)
            return total > 0 and ok == total

        _wait(all_confirmed, "every batch to be confirmed")
        time.sleep(1.0)  # the worker is at the state lock by now
        assert proc.poll() is None, finish(proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        holder.close()  # the lock goes with its session
    run_id = query(postgres_server, postgres_url, "SELECT run_id, status FROM pushsync.runs")
    assert [r[1] for r in run_id] == ["running"]  # the run never ended: its delta is pending
    assert query(
        postgres_server, postgres_url, "SELECT count(DISTINCT run_id) FROM pushsync.snapshot_pending"
    ) == [["1"]]
    assert sandbox_users(sandbox) == expected_users(rows)
    before = requests_total(sandbox)

    # The next run joins the live run, finds every batch confirmed, merges them and ends it: nothing resent.
    code, doc, err = run_json(tmp_path, sandbox, postgres_url)
    assert code == 0, err
    assert doc["run_id"] == run_id[0][0] and requests_total(sandbox) == before
    assert doc["state"]["users"] == {"users": USERS} and doc["state"]["batches_unconfirmed"] == 0
    assert query(postgres_server, postgres_url, "SELECT status FROM pushsync.runs") == [["done"]]
    # And the run after that diffs against a state holding every confirmed change: nothing to send.
    code, doc, err = run_json(tmp_path, sandbox, postgres_url)
    assert code == 0, err
    assert requests_total(sandbox) == before and doc["diff"]["users_changed"] == 0


def test_a_leader_killed_after_uploading_its_diff_is_taken_over_with_that_diff(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    sandbox = netmera_sandbox_process
    first = snapshot_job(tmp_path, sandbox)
    conn = connect(postgres_url)
    pg_state_store(load_job(tmp_path / "job.yaml"), conn, postgres_url)  # the tables, to lock one
    conn.close()
    before = requests_total(sandbox)
    # A session holding the batch maps' table stops the leader at its first map line: after the upload of its
    # diff, before any batch is queued.
    holder = psycopg.connect(postgres_url)
    try:
        holder.execute("LOCK TABLE pushsync.snapshot_batches IN EXCLUSIVE MODE")
        proc = worker(tmp_path, sandbox, postgres_url, "run", "job.yaml", "--progress", "none")

        def uploaded() -> bool:
            return query(
                postgres_server,
                postgres_url,
                "SELECT count(*) FROM pushsync.snapshot_pending WHERE path = 'meta.json'",
            ) == [["1"]]

        _wait(uploaded, "the leader to upload its diff")
        time.sleep(0.5)
        assert proc.poll() is None, finish(proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        holder.rollback()
        holder.close()
    (run,) = query(postgres_server, postgres_url, "SELECT run_id, status, planned FROM pushsync.runs")
    assert run[1:] == ["running", "f"] and requests_total(sandbox) == before
    # The export changes before the run is taken over: the run still sends the diff its first leader uploaded
    # (the batch map of whatever it queued or sent matches it), and the next run sends the change.
    second = write_users(tmp_path, range(USERS), churn=1)
    code, doc, err = run_json(tmp_path, sandbox, postgres_url)
    assert code == 0, err
    assert doc["run_id"] == run[0] and doc["diff"]["users_new"] == USERS
    assert doc["state"]["users"] == {"users": USERS}
    assert sandbox_users(sandbox) == expected_users(first)
    code, doc, err = run_json(tmp_path, sandbox, postgres_url)
    assert code == 0, err
    assert doc["diff"]["users_changed"] == USERS // 100
    assert sandbox_users(sandbox) == expected_users(second)


def test_the_pending_delta_of_a_run_that_ended_aborted_is_merged_by_the_next_runs_leader(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    sandbox = netmera_sandbox_process
    rows = snapshot_job(tmp_path, sandbox)
    # The platform cannot be reached (every connection dropped before an answer): the run is aborted (ended)
    # with its delta still pending. (Not a wrong key: that is another account, whose state is its own.)
    sandbox_faults(sandbox, {"drop": 1.0})
    code, doc, err = run_json(tmp_path, sandbox, postgres_url)
    assert code == 3, err
    sandbox_faults(sandbox, {"drop": 0.0})
    (aborted,) = query(postgres_server, postgres_url, "SELECT run_id, status FROM pushsync.runs")
    assert aborted[1] == "aborted"
    pending = "SELECT DISTINCT run_id FROM pushsync.snapshot_pending"
    assert query(postgres_server, postgres_url, pending) == [[aborted[0]]]
    code, doc, err = run_json(tmp_path, sandbox, postgres_url)
    assert code == 0, err
    # Nothing was confirmed: every user is sent (new, or uncertain where a request was in flight when the run
    # aborted: it may have reached the platform).
    assert doc["run_id"] != aborted[0] and doc["diff"]["users_changed"] == USERS
    assert "snapshot.recovered" in err and aborted[0] in err  # the leader merged it (nothing was confirmed)
    assert query(postgres_server, postgres_url, pending) == []
    assert query(postgres_server, postgres_url, "SELECT count(*) FROM pushsync.snapshot_batches") == [["0"]]
    assert sandbox_users(sandbox) == expected_users(rows)


def test_a_worker_killed_mid_run_the_other_finishes_and_commits_duplicates_stay_within_what_was_in_flight(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    sandbox = netmera_sandbox_process
    # Paced (about 3 s of sending), so that both workers send whenever the second starts late on a loaded
    # machine: unpaced, the first could send the whole run before the second had joined.
    rows = snapshot_job(
        tmp_path, sandbox, budget='  budget_groups: {account: {requests: 30, per: 1s, endpoints: ["*"]}}\n'
    )
    procs = run_workers(tmp_path, sandbox, postgres_url, 2)
    victim = kill_a_busy_worker(postgres_server, postgres_url, procs, share=5)
    (survivor,) = [p for p in procs if p is not victim]
    code, out, err = finish(survivor)
    assert code == 0, (out, err[-3000:])
    doc = json.loads(out)
    assert doc["state"]["users"] == {"users": USERS} and doc["state"]["batches_unconfirmed"] == 0
    assert sandbox_users(sandbox) == expected_users(rows)
    # As with SQLite (tests/test_crash_resume.py): only what the killed worker had in flight (its concurrency, 4)
    # and the answers of its last ledger flush interval (50 ms; one more when the loop was busy) may have been
    # applied twice. The job keeps Netmera's default budget, 20/s *per endpoint*, released over the first half
    # of each window: up to 40/s per endpoint, so 2 answers per endpoint per interval. The bound used to allow 4
    # answers in all; it failed once (14 batches) when the send path got cheaper and the worker killed became
    # the one holding the most batches.
    (endpoints,) = query(
        postgres_server, postgres_url, "SELECT count(DISTINCT endpoint) FROM pushsync.batches"
    )[0]
    bound = (4 + math.ceil(2 * 20 * 2 * 0.05 * int(endpoints))) * COORDINATED_BATCH
    duplicates = sum(applied(sandbox).values()) - minimal_applications(rows, "snapshot")
    assert 0 <= duplicates <= bound, (duplicates, bound)
    before = requests_total(sandbox)
    code, doc, err = run_json(tmp_path, sandbox, postgres_url)
    assert code == 0, err
    assert requests_total(sandbox) == before and doc["diff"]["users_changed"] == 0


def test_a_job_moving_onto_postgresql_imports_its_workdir_state_and_resends_nothing(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess, postgres_url: str
) -> None:
    sandbox = netmera_sandbox_process
    rows = snapshot_job(tmp_path, sandbox)
    code, out, err = finish(worker(tmp_path, sandbox, None, "run", "job.yaml", "--progress", "none"))
    assert code == 0, err  # one process, the state in the workdir
    code, out, err = finish(worker(tmp_path, sandbox, postgres_url, "state", "import", "job.yaml"))
    assert code == 0, err
    assert f"source users: {USERS} users copied" in out
    before = requests_total(sandbox)
    code, doc, err = run_json(tmp_path, sandbox, postgres_url)
    assert code == 0, err
    assert requests_total(sandbox) == before and doc["diff"]["users_state"] == USERS
    assert sandbox_users(sandbox) == expected_users(rows)
    # A second import would overwrite what coordinated runs confirmed since: refused.
    code, out, err = finish(worker(tmp_path, sandbox, postgres_url, "state", "import", "job.yaml"))
    assert code == 2 and "already holds a state for job snapscale" in err, err


def test_a_state_kept_by_the_base_url_alone_is_taken_over_by_the_accounts_run_and_resends_nothing(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    """A database of an older pushsync keeps the state under ``job/<platform>-<url hash>``: the first run that
    knows its account moves it under the account's scope (Destination.key), so the upgrade sends nothing again;
    a run with another key (another app behind the same URL) is another account, with a state of its own."""
    sandbox = netmera_sandbox_process
    snapshot_job(tmp_path, sandbox)
    code, doc, err = run_json(tmp_path, sandbox, postgres_url)
    assert code == 0, err
    job = load_job(tmp_path / "job.yaml")
    mine = state_scope(dataclasses.replace(job, destination=job.destination.for_account(sandbox.api_key)))
    legacy = state_scope(job)
    assert mine.startswith(legacy + "-")
    for table in ("state_heads", "state_chunks"):
        query(postgres_server, postgres_url, f"UPDATE pushsync.{table} SET scope = '{legacy}'")
    before = requests_total(sandbox)
    code, doc, err = run_json(tmp_path, sandbox, postgres_url)
    assert code == 0, err
    assert requests_total(sandbox) == before and doc["diff"]["users_state"] == USERS
    scopes = "SELECT DISTINCT scope FROM pushsync.state_heads"
    assert query(postgres_server, postgres_url, scopes) == [[mine]]
    # Another key: another account, with no state of its own — a rotated key or another app? The run asks.
    other = "another-app-key-0123456789"
    code, doc, err = run_json(tmp_path, other, postgres_url)
    assert code == 2 and "state rekey" in err and "--full-refresh" in err and other not in err, err
    assert requests_total(sandbox) == before and query(postgres_server, postgres_url, scopes) == [[mine]]
    # A rotated key: `state rekey` makes the old key's state the new key's, in the database.
    code, out, err = finish(worker(tmp_path, other, postgres_url, "state", "rekey", "job.yaml"))
    assert code == 0 and "nothing was sent" in out, err
    theirs = state_scope(dataclasses.replace(job, destination=job.destination.for_account(other)))
    assert query(postgres_server, postgres_url, scopes) == [[theirs]]


# --- the PostgreSQL backend of the state store, in process ---------------------------------------------------------


def _cycle(job: Job, store: StateStore, run_id: str, rows: list[str], tmp: Path) -> SnapshotDiff:
    """Diff ``rows`` against ``store``, confirm every batch in a SQLite ledger, commit into ``store``."""
    write_input(tmp, rows)
    builder = snapshot_builder_for(job)
    with build_plan(job) as plan:
        d = compute_diff(store, plan.staged, run_id, directory=tmp / "deltas" / run_id, builder=builder)
    send(job, d)
    with Ledger.open(job.workdir / "ledger.sqlite") as ledger:
        commit(store, job.sources, d.directory, ledger, builder=builder)
    return d


def test_the_postgresql_state_holds_what_the_file_state_holds_through_segments_and_a_compaction(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_store, "ROW_GROUP_ROWS", 16)  # several chunks per base and segment
    monkeypatch.setattr("sync.coordination.snapshot.ROW_GROUP_ROWS", 16)
    file_dir, pg_dir = tmp_path / "file", tmp_path / "pg"
    file_dir.mkdir()
    pg_dir.mkdir()
    file_job, pg_job = write_input(file_dir, MANY), write_input(pg_dir, MANY)
    conn = connect(postgres_url)
    try:
        file_store = StateStore(file_job.workdir, file_job.destination)
        pg_store = pg_state_store(pg_job, conn, postgres_url)
        source = pg_job.sources[0]
        versions = [pg_store.version(source)]
        assert not pg_store.exists(source) and pg_store.rows(source) == 0
        changes = [
            MANY,
            [r.replace("N5,", "Five,") if r.startswith("user005,") else r for r in MANY],
            [
                r.replace("N6,", "Six,") if r.startswith("user006,") else r
                for r in MANY
                if not r.startswith("user009,")
            ],
        ]
        for i, rows in enumerate(changes):
            if i == 2:  # the third commit takes the overlay past its share: folded into a new base
                monkeypatch.setattr(state_store, "COMPACT_SHARE", 0.015)
                monkeypatch.setattr("sync.state._commit.COMPACT_SHARE", 0.015)
            _cycle(file_job, file_store, f"r{i}", rows, file_dir)
            _cycle(pg_job, pg_store, f"r{i}", rows, pg_dir)
            assert pg_store.read(source).equals(file_store.read(source)), i
            assert pg_store.rows(source) == file_store.rows(source)
            assert pg_store.segment_count(source) == file_store.segment_count(source), i
            versions.append(pg_store.version(source))
            # Half the key space: only the chunks overlapping it are read, and nothing of the other half.
            lo, hi = 0, 1 << 31
            assert pg_store.slice(source, lo, hi).equals(file_store.slice(source, lo, hi))
        assert len(set(versions)) == len(versions)  # every write gives a new version
        # Compacted; user009 left the export but stays (removal: none).
        assert pg_store.segment_count(source) == 0 and pg_store.rows(source) == 100
        scanned = pg_store.scan(source).collect().sort(["__key", "__ext_id"])
        assert scanned.equals(file_store.read(source))
        # One generation is kept: the compaction removed the old base's and the segments' chunks.
        gens = conn.execute("SELECT DISTINCT generation, segment FROM pushsync.state_chunks").fetchall()
        assert len(gens) == 1 and gens[0][1] == 0
        assert pg_store.users(source, 0, 1 << 32, pl.Series(["user006", "user777"]))[
            "attr:name"
        ].to_list() == ["Six"]
    finally:
        conn.close()


def test_the_state_lock_keeps_a_second_holder_out(tmp_path: Path, postgres_url: str) -> None:
    job = write_input(tmp_path, MANY)
    first, second = connect(postgres_url), connect(postgres_url)
    try:
        a = pg_state_store(job, first, postgres_url)
        b = StateStore(
            job.workdir,
            job.destination,
            backend=PgStateBackend(second, state_scope(job), "test", lock_wait=0.5),
        )
        with a.lock(), pytest.raises(StateError, match="stayed locked by another worker"), b.lock():
            pass
        with b.lock():  # released with the block
            pass
        assert pending_runs(first, state_scope(job)) == []
    finally:
        first.close()
        second.close()


def test_damaged_state_bytes_are_one_clear_error(tmp_path: Path, postgres_url: str) -> None:
    job = write_input(tmp_path, MANY)
    conn = connect(postgres_url)
    try:
        store = pg_state_store(job, conn, postgres_url)
        _cycle(job, store, "r1", MANY, tmp_path)
        conn.execute("UPDATE pushsync.state_chunks SET data = 'not parquet'::bytea")
        with pytest.raises(StateError, match="cannot be read"):
            store.read(job.sources[0])
    finally:
        conn.close()
