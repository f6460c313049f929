"""Several workers, one job, on a real PostgreSQL server (tests/pg_fixture.py) and Netmera sandbox processes:
``pushsync run`` with ``PUSHSYNC_DATABASE_URL`` (docs/scaling.md)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sync.records import Batch, Phase, RejectedRow
from tests.conftest import REPO_ROOT, NetmeraProcess
from tests.netmera_e2e import (
    COORDINATED_BATCH,
    applied,
    batch_counts,
    coordinated_job,
    expected_users,
    finish,
    inspect,
    kill_a_busy_worker,
    minimal_applications,
    netmera_job,
    query,
    run_json,
    run_workers,
    sandbox_faults,
    sandbox_users,
    user_row,
    worker,
    write_users,
)
from tests.pg_fixture import PostgresServer
from tests.sandbox_fixtures import start_sandbox_process, stop_sandbox_process


def test_one_worker_on_postgres_sends_the_job_and_the_ledger_commands_read_it(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess, postgres_url: str
) -> None:
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(coordinated_job(sandbox.url), encoding="utf-8")
    rows = write_users(tmp_path, range(400))
    code, doc, err = run_json(tmp_path, sandbox, postgres_url)
    assert code == 0, (doc, err)
    assert doc["totals"]["requests"] > 0 and doc["totals"]["batches_unfinished"] == 0
    assert sandbox_users(sandbox) == expected_users(rows)
    assert not (tmp_path / "work" / "ledger.sqlite").exists()  # the ledger is in PostgreSQL
    run_id = doc["run_id"]
    code, out, err = finish(worker(tmp_path, sandbox, postgres_url, "runs", "--output", "json"))
    assert code == 0, err
    runs = json.loads(out)
    assert [r["run_id"] for r in runs] == [run_id] and runs[0]["status"] == "done"
    code, out, err = finish(worker(tmp_path, sandbox, postgres_url, "show", "latest", "--output", "json"))
    assert code == 0, err
    assert json.loads(out)["summary"]["totals"]["requests"] == doc["totals"]["requests"]
    code, out, err = finish(worker(tmp_path, sandbox, postgres_url, "report", run_id, "-o", "r.html"))
    assert code == 0, err
    assert run_id in (tmp_path / "r.html").read_text(encoding="utf-8")
    code, out, err = finish(worker(tmp_path, sandbox, postgres_url, "trace", "user00007", "--output", "json"))
    assert code == 0, err
    traced = json.loads(out)
    assert traced and {e["run_id"] for e in traced} == {run_id} and {e["status"] for e in traced} == {"ok"}
    code, out, err = finish(
        worker(
            tmp_path,
            sandbox,
            postgres_url,
            "ledger-export",
            "latest",
            "--format",
            "csv",
            "-o",
            "b.csv",
        )
    )
    assert code == 0, err
    assert (tmp_path / "b.csv").read_text(encoding="utf-8").count("\n") == doc["totals"]["batches_done"] + 1
    # A worker started again under the run's ID after it ended (a restarted pod) reports it, sends nothing.
    before = sum(applied(sandbox).values())
    code, out, err = finish(
        worker(tmp_path, sandbox, postgres_url, "run", "job.yaml", "--run-id", run_id, "--output", "json")
    )
    assert code == 0, err
    assert json.loads(out)["run_id"] == run_id and sum(applied(sandbox).values()) == before


def test_resume_and_retry_latest_take_the_newest_run_of_the_coordination_database(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess, postgres_url: str
) -> None:
    """``show latest`` read the coordination database; ``resume latest`` and ``retry latest`` without ``--job``
    searched the workdirs' SQLite ledgers: "no run recorded", exit 2, for the run ``pushsync runs`` listed."""
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(coordinated_job(sandbox.url), encoding="utf-8")
    write_users(tmp_path, range(50))
    code, doc, err = run_json(tmp_path, sandbox, postgres_url)
    assert code == 0, err
    code, out, err = finish(worker(tmp_path, sandbox, postgres_url, "resume", "latest", "--progress", "none"))
    assert code == 0, err
    assert f"run {doc['run_id']} finished (done): nothing to resume" in out
    before = sum(applied(sandbox).values())
    code, out, err = finish(
        worker(tmp_path, sandbox, postgres_url, "retry", "latest", "--progress", "none", "--output", "json")
    )
    assert code == 0, err
    assert json.loads(out)["totals"]["requests"] == 0 and sum(applied(sandbox).values()) == before


def test_a_worker_of_the_job_for_another_destination_does_not_join_its_live_run(
    tmp_path: Path,
    netmera_process_factory: Any,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    """One job file serving production and staging (``base_url`` from the environment) has one name. A staging
    worker joined production's live run, sent a share of production's batches to staging and confirmed them:
    both exited 0, and production never got those updates."""
    production, staging = netmera_process_factory(), netmera_process_factory()
    budget = '  budgets: {"*": {requests: 5, per: 1s}}\n'
    rows: list[list[str]] = []
    for name, sandbox in (("production", production), ("staging", staging)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "job.yaml").write_text(
            coordinated_job(sandbox.url, budget=budget), encoding="utf-8"
        )
        rows = write_users(tmp_path / name, range(1000))
    first = worker(
        tmp_path / "production",
        production,
        postgres_url,
        "run",
        "job.yaml",
        "--progress",
        "none",
        "--output",
        "json",
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(RuntimeError):  # the tables are not there yet
            if query(
                postgres_server, postgres_url, "SELECT count(*) FROM pushsync.runs WHERE status = 'running'"
            ) == [["1"]]:
                break
        time.sleep(0.05)
    joined = finish(
        worker(tmp_path / "staging", staging, postgres_url, "run", "job.yaml", "--progress", "none")
    )
    code, _, err = finish(first)
    assert code == 0, err
    code, _, err = joined
    assert code == 2, err
    assert "sends to another destination" in err and err.count("\n") == 1, err
    assert sandbox_users(production) == expected_users(rows)
    assert inspect(staging, "stats")["requests_total"] == 0
    # Had production's run stopped (interrupted, aborted), staging's next run resumed it: it skipped every batch
    # production confirmed, and staging got none of them.
    query(postgres_server, postgres_url, "UPDATE pushsync.runs SET status = 'interrupted' RETURNING run_id")
    code, _, err = finish(
        worker(tmp_path / "staging", staging, postgres_url, "run", "job.yaml", "--progress", "none")
    )
    assert code == 0, err
    assert sandbox_users(staging) == expected_users(rows)


LIMIT = 40  # requests per 1 s window for the whole account (every endpoint counted together)
FAULTS = {
    "error_500": 0.02,
    "applied_then_500": 0.01,
    "drop": 0.01,
    "slow": 0.02,
    "latency": {"low": 0.02, "high": 0.2},
}


@pytest.fixture
def account_limited_sandbox(tmp_path: Path) -> Any:
    """A Netmera sandbox process with faults on and one limit for the whole account."""
    config = tmp_path / "sandbox.json"
    config.write_text(
        json.dumps(
            {
                "limits": {"account": {"requests": LIMIT, "window": 1}},
                "limit_groups": {"*": "account"},
                "faults": FAULTS,
                "seed": 15,
                "stats_window": 1,
            }
        ),
        encoding="utf-8",
    )
    key = "scale-test-key-0123456789"
    process, url = start_sandbox_process("netmera", "--api-key", key, "--config", str(config))
    try:
        yield NetmeraProcess(url=url, api_key=key, process=process)
    finally:
        stop_sandbox_process(process)


def test_three_workers_share_one_job_and_one_budget_and_survive_a_kill_9(
    tmp_path: Path,
    account_limited_sandbox: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    sandbox = account_limited_sandbox
    budget = f'  budget_groups: {{account: {{requests: {LIMIT}, per: 1s, endpoints: ["*"]}}}}\n'
    (tmp_path / "job.yaml").write_text(coordinated_job(sandbox.url, budget=budget, lease=3), encoding="utf-8")
    users = 2400
    rows = write_users(tmp_path, range(users))
    procs = run_workers(tmp_path, sandbox, postgres_url, 3)
    # SIGKILL the worker with the most requests in flight once a fifth of the batches are confirmed.
    victim = kill_a_busy_worker(postgres_server, postgres_url, procs, share=5)
    survivors = [p for p in procs if p is not victim]
    results = [finish(p) for p in survivors]
    for code, out, err in results:
        assert code == 0, (out, err[-3000:])
    docs = [json.loads(out) for _, out, _ in results]
    assert len({d["run_id"] for d in docs}) == 1  # one run, joined by every worker
    assert sandbox_users(sandbox) == expected_users(rows)
    # No batch confirmed twice, none left; every worker took part.
    twice = query(
        postgres_server, postgres_url, "SELECT count(*) FROM pushsync.batches WHERE confirmations > 1"
    )
    assert twice == [["0"]]
    left = query(postgres_server, postgres_url, "SELECT count(*) FROM pushsync.batches WHERE status <> 'ok'")
    assert left == [["0"]]
    senders = query(postgres_server, postgres_url, "SELECT count(DISTINCT worker) FROM pushsync.attempts")
    assert int(senders[0][0]) == 3
    stats = inspect(sandbox, "stats")
    assert stats["rate_limited_total"] == 0, stats
    # The summary's budget-group line counts every worker's requests (the killed one's too), as one process's.
    attempts = query(postgres_server, postgres_url, "SELECT count(*) FROM pushsync.attempts")
    for doc in docs:
        (group,) = doc["budget_groups"]
        assert group["group"] == "account" and group["budget"] == f"{LIMIT}/1s", group
        assert group["requests"] == int(attempts[0][0]) == doc["totals"]["requests"], (group, attempts)
        assert group["rate_limited"] == 0 and 0 < group["max_per_window"] <= LIMIT, group
    # Duplicates only from ambiguous outcomes: faults that applied a batch and failed anyway, and what the
    # killed worker had in flight (its requests and the answers of its last ledger flush interval).
    faults = stats["faults"]
    duplicates = sum(applied(sandbox).values()) - minimal_applications(rows, "changes")
    bound = (faults.get("applied_then_500", 0) + faults.get("slow", 0) + 4 + 4) * COORDINATED_BATCH
    assert 0 <= duplicates <= bound, (duplicates, bound, faults)
    run_id = docs[0]["run_id"]
    status = query(
        postgres_server,
        postgres_url,
        f"SELECT status, exit_code FROM pushsync.runs WHERE run_id = '{run_id}'",
    )
    assert status == [["done", "0"]]


# --- bad conditions ---------------------------------------------------------------------------------------------


def _cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, *args: str) -> tuple[int, str]:
    from sync.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PUSHSYNC_DATABASE_URL", url)
    monkeypatch.setenv("NETMERA_API_KEY", "any-key-0123456789")
    code = main(list(args))
    return code, ""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("problem", ["password", "unreachable", "database"])
def test_a_database_that_cannot_be_used_is_one_clear_error_exit_2_without_the_password(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    postgres_server: PostgresServer,
    postgres_url: str,
    problem: str,
) -> None:
    (tmp_path / "job.yaml").write_text(coordinated_job("http://127.0.0.1:9/rest/3.0/"), encoding="utf-8")
    write_users(tmp_path, range(10))
    secret = "Wr0ngButSecretPassw0rd"
    url = {
        "password": postgres_url.replace(postgres_server.password, secret),
        "unreachable": f"postgresql://pushsync:{secret}@127.0.0.1:{_free_port()}/db",
        "database": postgres_server.url("no_such_db", password=postgres_server.password),
    }[problem]
    code, _ = _cli(tmp_path, monkeypatch, url, "run", "job.yaml", "--progress", "none")
    out, err = capsys.readouterr()
    assert code == 2, err
    expected = {
        "password": "the user or password is wrong",
        "unreachable": "the server cannot be reached",
        "database": "the database does not exist",
    }[problem]
    assert expected in err and "coordination database pushsync@127.0.0.1" in err, err
    assert err.count("\n") == 1  # one line
    for text in (out, err):
        assert secret not in text and postgres_server.password not in text


def test_show_latest_of_a_database_without_runs_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], postgres_url: str
) -> None:
    """``show latest`` before any run read "no run latest found in …", as if a run were named ``latest``."""
    code, _ = _cli(tmp_path, monkeypatch, postgres_url, "show", "latest")
    err = capsys.readouterr().err
    assert code == 2, err
    assert (
        err.startswith("pushsync: error: no run recorded in pushsync@127.0.0.1:") and "latest" not in err
    ), err


def test_the_coordination_url_makes_its_password_a_secret_not_its_host_user_or_database() -> None:
    """Only the password of ``PUSHSYNC_DATABASE_URL`` is masked. With the whole URL registered, every
    8-character run of it was masked in what a platform answers (``redact_pieces``): after a coordination
    test, a redirect to ``http://127.0.0.1:3…`` read ``http://***…`` and the redirect tests of
    tests/reliability/test_adversarial_secrets.py failed when run after them."""
    from sync.coordination._urls import register_url
    from sync.redact import redact, redact_pieces

    register_url("postgresql://syncer:Zq8%2Fw9-kept-secret@db.example.org:6543/syncdb?sslmode=require")
    answer = "HTTP 301: moved to http://db.example.org:6543/v2 for syncer on syncdb"
    assert redact_pieces(answer) == answer
    assert redact("said Zq8/w9-kept-secret and Zq8%2Fw9-kept-secret") == "said *** and ***"
    assert "kept-sec" not in redact_pieces("it echoed w9-kept-secr back")
    register_url("postgresql://db.example.org/syncdb?user=syncer&password=Other-kept-phrase")
    assert redact("password Other-kept-phrase") == "password ***"
    register_url("postgresql://syncer:pw@[::1/db-Unparsable-kept-url")  # no password to tell apart: all of it
    assert redact("postgresql://syncer:pw@[::1/db-Unparsable-kept-url") == "***"


def test_a_schema_from_a_newer_pushsync_is_refused_clearly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    from sync.coordination import open_ledger

    open_ledger(postgres_url).close()  # creates the schema
    postgres_server.sql(postgres_url, "UPDATE pushsync.schema_version SET version = 99")
    (tmp_path / "job.yaml").write_text(coordinated_job("http://127.0.0.1:9/rest/3.0/"), encoding="utf-8")
    write_users(tmp_path, range(10))
    code, _ = _cli(tmp_path, monkeypatch, postgres_url, "run", "job.yaml", "--progress", "none")
    err = capsys.readouterr().err
    assert code == 2
    assert "pushsync schema is version 99, newer than this pushsync understands (3)" in err, err
    code, _ = _cli(tmp_path, monkeypatch, postgres_url, "runs")
    assert code == 2  # every command refuses it, before reading anything


def test_urls_written_into_the_job_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Snapshot jobs run coordinated too now: tests/test_coordination_snapshot.py.
    text = coordinated_job("http://127.0.0.1:9/rest/3.0/")
    literal = text.replace(
        "coordination: {lease: 2}", "coordination: {database: 'postgresql://u:Secr3tPw@h/db'}"
    )
    (tmp_path / "literal.yaml").write_text(literal, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PUSHSYNC_DATABASE_URL", raising=False)
    from sync.cli import main

    assert main(["validate", "literal.yaml"]) == 2
    out, err = capsys.readouterr()
    assert "coordination.database" in out + err and "Secr3tPw" not in out + err


def test_the_job_names_where_the_url_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], postgres_url: str
) -> None:
    from sync.config import load_job
    from sync.coordination import resolve_database_url

    text = coordinated_job("http://127.0.0.1:9/rest/3.0/").replace(
        "coordination: {lease: 2}", "coordination: {database: {env: JOB_DB_URL}, lease: 5}"
    )
    (tmp_path / "job.yaml").write_text(text, encoding="utf-8")
    job = load_job(tmp_path / "job.yaml")
    assert job.coordination is not None and job.coordination.lease == 5
    assert (
        resolve_database_url(job, None, {"JOB_DB_URL": postgres_url, "PUSHSYNC_DATABASE_URL": "x"})
        == postgres_url
    )
    assert (
        resolve_database_url(job, "postgresql://flag/db", {"JOB_DB_URL": postgres_url})
        == "postgresql://flag/db"
    )
    assert resolve_database_url(None, None, {}) is None  # no URL: SQLite, as before
    from sync.errors import SecretError

    with pytest.raises(
        SecretError, match=r"coordination\.database: environment variable JOB_DB_URL is not set"
    ):
        resolve_database_url(job, None, {})


async def test_a_dead_workers_non_idempotent_sent_batch_is_held_and_its_other_claims_freed(
    postgres_url: str,
) -> None:
    from sync.coordination._db import Link, connect
    from sync.coordination.ledger import PgLedger
    from sync.coordination.queue import Membership, QueueLanes, enqueue
    from sync.records import Batch, Operation, Phase

    ledger = PgLedger.open(postgres_url)
    try:
        ledger.start_run("r1", job="j")
        batches = [
            Batch("ev1", "fireEvents", Operation.FIRE_EVENTS, [{"e": 1}], ("u1",)),
            Batch("ev2", "fireEvents", Operation.FIRE_EVENTS, [{"e": 2}], ("u2",)),
            Batch("tag1", "tagUsers", Operation.TAG, {"tag": "t", "extIds": ["u1"]}, ("u1",)),
        ]
        sync_conn = connect(postgres_url)
        assert enqueue(sync_conn, "r1", batches) == 3
        dead_conn = await Link.open(postgres_url, what="claims")
        live_conn = await Link.open(postgres_url, what="claims")
        dead = Membership(dead_conn, "r1", "dead-worker", lease=1)
        live = Membership(live_conn, "r1", "live-worker", lease=1)
        await dead.join()
        await live.join()
        lanes = QueueLanes(dead_conn, ledger, dead, claim=10)
        claimed = [b.batch_id for b in await lanes._take(Phase.CHANGES, "fireEvents")]
        claimed += [b.batch_id for b in await lanes._take(Phase.CHANGES, "tagUsers")]
        assert sorted(claimed) == ["ev1", "ev2", "tag1"]
        ledger.record_sent("r1", "ev1")  # its request may have reached the platform
        ledger.record_sent("r1", "tag1")
        ledger.flush()
        assert await live.reap() == 0  # the dead worker's heartbeat is still fresh
        sync_conn.execute(
            "UPDATE pushsync.workers SET heartbeat = clock_timestamp() - interval '5 s' WHERE worker_id = 'dead-worker'"
        )
        await live.beat()
        # Nobody counts as dead within a lease of the server's start (its restart): when this test is the first
        # of the session the server is younger than that, and the reap found nobody dead (seen run alone).
        for _ in range(100):
            young = sync_conn.execute(
                "SELECT clock_timestamp() - pg_postmaster_start_time() < interval '1.2 s'"
            ).fetchone()
            if not young[0]:
                break
            await asyncio.sleep(0.05)
        assert await live.reap() == 1
        rows = sync_conn.execute(
            "SELECT batch_id, status, held, claimed_by FROM pushsync.batches ORDER BY batch_id"
        ).fetchall()
        assert rows == [
            ("ev1", "sent", True, None),
            ("ev2", "planned", False, None),
            ("tag1", "sent", False, None),
        ]
        # The live worker takes the others over; the held one is not sent again (pushsync retry sends it).
        taken = QueueLanes(live_conn, ledger, live, claim=10)
        assert [b.batch_id for b in await taken._take(Phase.CHANGES, "fireEvents")] == ["ev2"]
        again = await taken._take(Phase.CHANGES, "tagUsers")
        assert [(b.batch_id, b.body, b.ext_ids) for b in again] == [
            ("tag1", {"tag": "t", "extIds": ["u1"]}, ("u1",))
        ]
        for conn in (dead_conn, live_conn):
            await conn.close()
        sync_conn.close()
    finally:
        ledger.close()


async def test_a_worker_stalled_past_its_lease_does_not_send_the_batches_another_worker_took_over(
    postgres_url: str,
) -> None:
    """SIGSTOP for longer than the lease, then SIGCONT: the worker's dispatcher still holds the batches it had
    claimed (waiting for a budget slot, so still ``planned``) while another worker took them over and sent them.
    It stops (exit 3 in the CLI) instead of firing those events a second time."""
    import dataclasses

    from sync.config import DispatchSettings
    from sync.coordination._db import Link, connect
    from sync.coordination.ledger import PgLedger
    from sync.coordination.queue import Membership, QueueLanes, enqueue
    from sync.dispatch.dispatch import Dispatcher, DispatchOutcome
    from sync.errors import StateError
    from sync.records import Operation
    from tests.fake_platform import FakeClient, FakeServer, make_batch

    bodies = [json.dumps({"users": [{"id": f"u{i}", "e": i}]}).encode() for i in range(2)]
    batches = [dataclasses.replace(make_batch(b, {}), operation=Operation.FIRE_EVENTS) for b in bodies]
    links: list[Link] = []

    async def member(name: str) -> Membership:
        links.append(await Link.open(postgres_url, what="heartbeats"))
        membership = Membership(links[-1], "r1", name, lease=1)
        await membership.join()
        return membership

    with (
        PgLedger.open(postgres_url, worker="a") as ledger_a,
        PgLedger.open(postgres_url, worker="b") as ledger_b,
    ):
        ledger_a.start_run("r1", job="j")
        sync_conn = connect(postgres_url)
        try:
            assert enqueue(sync_conn, "r1", batches) == 2
            stalled, other = await member("a"), await member("b")
            links.append(await Link.open(postgres_url, what="claims"))
            held = await QueueLanes(links[-1], ledger_a, stalled, claim=10)._take(
                Phase.CHANGES, batches[0].endpoint
            )
            assert len(held) == 2
            # Stopped longer than the lease: the other worker frees its claims and sends both batches.
            sync_conn.execute(
                "UPDATE pushsync.workers SET heartbeat = clock_timestamp() - interval '5 s' WHERE worker_id = 'a'"
            )
            assert await other.reap() == 0  # nothing recorded sent: freed, not held
            links.append(await Link.open(postgres_url, what="claims"))
            taken_over = QueueLanes(links[-1], ledger_b, other, poll=0.01)
            server = FakeServer()
            report = await Dispatcher(
                FakeClient(server), DispatchSettings(), ledger=ledger_b, run_id="r1"
            ).run(taken_over)
            assert report.outcome is DispatchOutcome.COMPLETED and len(server.requests) == 2
            # Woken up (SIGCONT), the stalled worker's dispatcher goes on with what it held.
            dispatcher = Dispatcher(FakeClient(server), DispatchSettings(), ledger=ledger_a, run_id="r1")
            with pytest.raises(
                StateError, match=r"run r1: this worker's claim on batch .* taken over"
            ) as caught:
                await dispatcher.run(held)
            assert "stops without sending" in str(caught.value)
            assert len(server.requests) == 2, server.requests  # the events were not fired a second time
            rows = sync_conn.execute(
                "SELECT status, confirmations, claimed_by FROM pushsync.batches ORDER BY seq"
            ).fetchall()
            assert rows == [("ok", 1, "b"), ("ok", 1, "b")]
        finally:
            sync_conn.close()
            for link in links:
                await link.close()


def _ok_batches(server: PostgresServer, url: str) -> int:
    try:
        return int(query(server, url, "SELECT count(*) FROM pushsync.batches WHERE status = 'ok'")[0][0])
    except RuntimeError:
        return 0  # the tables are not there yet


def _wait_ok(server: PostgresServer, url: str, proc: subprocess.Popen[str], n: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and _ok_batches(server, url) < n:
        time.sleep(0.05)
    assert proc.poll() is None, "the worker ended before the database could be restarted"


def _paced_job(tmp: Path, sandbox: NetmeraProcess) -> list[list[str]]:
    """A job of 600 users under a budget group of 10 requests/s (a run of several seconds); returns its rows."""
    budget = '  budget_groups: {account: {requests: 10, per: 1s, endpoints: ["*"]}}\n'
    (tmp / "job.yaml").write_text(coordinated_job(sandbox.url, budget=budget, lease=2), encoding="utf-8")
    return write_users(tmp, range(600))


def test_postgresql_restarted_mid_run_the_worker_reconnects_records_what_was_in_flight_and_finishes(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    sandbox = netmera_sandbox_process
    rows = _paced_job(tmp_path, sandbox)
    proc = worker(tmp_path, sandbox, postgres_url, "run", "job.yaml", "--progress", "none")
    _wait_ok(postgres_server, postgres_url, proc, 5)
    postgres_server.restart()  # every session ends: the ledger's, the claims', the budget's, the heartbeat's
    code, out, err = finish(proc)
    assert code == 0, (out, err[-3000:])
    assert sandbox_users(sandbox) == expected_users(rows)
    # What was in flight when the server went away was recorded once it was back: nothing is left unfinished.
    left = query(
        postgres_server, postgres_url, "SELECT count(*) FROM pushsync.batches WHERE status <> 'ok' OR held"
    )
    assert left == [["0"]]
    done = json.loads(next(line for line in err.splitlines() if '"worker.done"' in line))
    assert done["reconnections"] >= 2, done  # claims and budget slots connected again
    assert postgres_server.password not in out + err
    # The summary has its budget-group line, as a SQLite run's summary does.
    assert "budget group" in out and "account" in out, out


def test_a_leader_whose_statement_the_roles_statement_timeout_cancels_stops_instead_of_planning_forever(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    # A statement_timeout set on pushsync's role (or database) cancels a statement of the leader that waits for
    # a lock (here: another session holds the lanes table). The leader took that for a lost connection,
    # connected again and planned again — cancelled again each time, the worker waiting for a plan forever.
    from sync.coordination._db import connect
    from sync.coordination.ledger import PgLedger

    sandbox = netmera_sandbox_process
    _paced_job(tmp_path, sandbox)
    PgLedger.open(postgres_url).close()  # the schema, so that its table can be locked
    with connect(postgres_url) as holder:
        name = holder.execute("SELECT current_database()").fetchone()[0]
        holder.execute(f"ALTER DATABASE {name} SET statement_timeout = '300ms'")
        with holder.transaction():
            holder.execute("LOCK TABLE pushsync.lanes IN EXCLUSIVE MODE")
            proc = worker(tmp_path, sandbox, postgres_url, "run", "job.yaml", "--progress", "none")
            try:
                code, out, err = finish(proc, timeout=60)
            finally:
                proc.kill()
    assert code == 2, (out, err[-3000:])
    errors = [line for line in err.splitlines() if line.startswith("pushsync: error:")]
    assert len(errors) == 1, err[-3000:]
    assert "statement timeout" in errors[0] and "statement_timeout" in errors[0], errors
    assert sandbox_users(sandbox) == {}  # nothing was sent
    assert postgres_server.password not in out + err


def test_a_database_that_stays_away_stops_the_worker_with_one_clear_error_and_exit_3(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    sandbox = netmera_sandbox_process
    rows = _paced_job(tmp_path, sandbox)
    # The worker waits 2 s for the database instead of 30 (the bound is read when a connection is made).
    code = (
        "import sys; import sync.coordination._db as db; db.RECONNECT_FOR = 2.0\n"
        "from sync.cli import main; sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "run", "job.yaml", "--progress", "none"],
        cwd=tmp_path,
        env={
            **os.environ,
            "NETMERA_API_KEY": sandbox.api_key,
            "PYTHONPATH": str(REPO_ROOT),
            "PUSHSYNC_DATABASE_URL": postgres_url,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_ok(postgres_server, postgres_url, proc, 5)
        postgres_server.stop("fast")
        code_, out, err = finish(proc, timeout=90)
    finally:
        postgres_server.start()
    assert code_ == 3, (out, err[-3000:])
    errors = [line for line in err.splitlines() if line.startswith("pushsync: error:")]
    assert len(errors) == 1, err[-3000:]
    assert "this worker stopped after it began sending" in errors[0], errors
    assert "could not be made again within 2 s" in errors[0], errors
    assert postgres_server.password not in out + err
    # Run again once the database is back: the worker joins the run and finishes it.
    code_, out, err = finish(worker(tmp_path, sandbox, postgres_url, "run", "job.yaml", "--progress", "none"))
    assert code_ == 0, (out, err[-3000:])
    assert sandbox_users(sandbox) == expected_users(rows)


async def test_a_link_connects_again_and_gives_up_after_its_bound_with_a_clear_error(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    from sync.coordination._db import Link, async_connect

    async def pid(conn: Any) -> int:
        cur = await conn.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
        return int(row[0])

    link = await Link.open(postgres_url, what="claims")
    first = await link.run(pid)
    postgres_server.sql(postgres_server.admin_url(), f"SELECT pg_terminate_backend({first})")
    second = await link.run(pid)  # the lost connection is made again, the work repeated
    assert second != first and link.generation == 1
    await link.close()

    # A server that does not come back: bounded retries, the waits doubling, time injected (no real sleep).
    now = [0.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    gone = postgres_url.replace(f":{postgres_server.port}/", f":{_free_port()}/")
    stranded = Link(
        gone,
        await async_connect(postgres_url),
        what="claims",
        reconnect_for=5.0,
        clock=lambda: now[0],
        sleep=sleep,
    )
    victim = await stranded.run(pid)
    postgres_server.sql(postgres_server.admin_url(), f"SELECT pg_terminate_backend({victim})")
    with pytest.raises(Exception) as caught:
        await stranded.run(pid)
    assert waits == [0.2, 0.4, 0.8, 1.6, 2.0], waits  # the last attempt at 5 s; a further wait would pass it
    message = str(caught.value)
    assert type(caught.value).__name__ == "CoordinationError", caught.value
    assert "the connection for claims was lost and could not be made again within 5 s" in message, message
    assert postgres_server.password not in message


async def test_a_statement_cancelled_by_the_roles_statement_timeout_is_an_error_not_a_lost_connection(
    postgres_url: str,
) -> None:
    """A DBA's ``statement_timeout`` (on the role or the database) cancels a slow statement on a connection that
    is fine: taken for a lost one, it was connected again and repeated — forever, each time cancelled again, the
    worker hanging without a word. It is raised as it is (the caller names what failed)."""
    import psycopg

    from sync.coordination._db import Link, connect

    with connect(postgres_url) as admin:
        name = admin.execute("SELECT current_database()").fetchone()[0]
        admin.execute(f"ALTER DATABASE {name} SET statement_timeout = '200ms'")
    link = await Link.open(postgres_url, what="claims")
    try:

        async def slow(conn: Any) -> None:
            await conn.execute("SELECT pg_sleep(1)")

        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            await asyncio.wait_for(link.run(slow), 20)
        assert link.generation == 0  # not connected again: the connection was never lost
    finally:
        await link.close()


async def test_a_claim_whose_answer_was_lost_with_the_connection_is_found_again(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    from sync.coordination._db import Link, connect
    from sync.coordination.ledger import PgLedger
    from sync.coordination.queue import Membership, QueueLanes, enqueue
    from sync.records import Operation

    with PgLedger.open(postgres_url) as ledger:
        ledger.start_run("r1", job="j")
        lead = connect(postgres_url)
        batches = [
            Batch(f"t{i}", "tagUsers", Operation.TAG, {"tag": "t", "extIds": [f"u{i}"]}, (f"u{i}",))
            for i in range(3)
        ]
        assert enqueue(lead, "r1", batches) == 3
        link = await Link.open(postgres_url, what="claims")
        member = Membership(await Link.open(postgres_url, what="heartbeats"), "r1", "w1", lease=30)
        await member.join()
        lanes = QueueLanes(link, ledger, member)
        # As if claim number 1 had been made and its answer lost with the connection: the batch is this
        # worker's in the table, and the connection is gone.
        lead.execute("UPDATE pushsync.batches SET claimed_by = 'w1', claim_no = 1 WHERE batch_id = 't1'")
        cur = await link.conn.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
        assert row is not None
        postgres_server.sql(postgres_server.admin_url(), f"SELECT pg_terminate_backend({row[0]})")
        got = await lanes._take(Phase.CHANGES, "tagUsers", 1)  # claim number 1, repeated after reconnecting
        assert [b.batch_id for b in got] == ["t1"]  # found again, not a second claim of another batch
        rest = await lanes._take(Phase.CHANGES, "tagUsers", 8)  # after t1 in the queue, then from its start
        rest += await lanes._take(Phase.CHANGES, "tagUsers", 8)
        assert sorted(b.batch_id for b in rest) == ["t0", "t2"]
        lead.close()
        await link.close()
        await member.link.close()


async def test_a_claim_of_n_takes_n_batches_even_before_the_table_has_statistics(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    """``UPDATE … WHERE batch_id IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)`` on a table PostgreSQL has no
    statistics for yet ran as a semi-join that claimed the whole lane; a claim takes n, no more."""
    from sync.coordination._db import Link
    from sync.coordination.ledger import PgLedger
    from sync.coordination.queue import Membership, QueueLanes

    with PgLedger.open(postgres_url) as ledger:
        ledger.start_run("r1", job="j")
        postgres_server.sql(
            postgres_url,
            "INSERT INTO pushsync.batches (run_id, batch_id, endpoint, operation, phase, n_ids, ext_ids, "
            "body_json, origins, status, planned_at) SELECT 'r1', 'b' || i, 'tagUsers', 'tag', 1, 1, "
            "'[\"u' || i || '\"]', '{}', '{}', 'planned', 0 FROM generate_series(1, 300) i",
        )
        link = await Link.open(postgres_url, what="claims")
        member = Membership(await Link.open(postgres_url, what="heartbeats"), "r1", "w1", lease=30)
        try:
            await member.join()
            lanes = QueueLanes(link, ledger, member)
            got = await lanes._take(Phase.CHANGES, "tagUsers", 1)
            assert [b.batch_id for b in got] == ["b1"]
            claimed = query(
                postgres_server,
                postgres_url,
                "SELECT count(*) FROM pushsync.batches WHERE claimed_by IS NOT NULL",
            )
            assert claimed == [["1"]]
            assert len(await lanes._take(Phase.CHANGES, "tagUsers", 4)) == 4
        finally:
            await link.close()
            await member.link.close()


def test_leaving_the_pg_ledger_on_an_error_keeps_that_error_when_the_last_write_fails(
    postgres_url: str,
) -> None:
    """As the SQLite ledger (tests/test_ledger.py): a last flush that fails on the way out of an error must not
    replace that error (it says what happened and sets the exit code); the connection is closed either way."""
    from sync.coordination.ledger import PgLedger
    from sync.errors import StateError

    class Stopped(Exception):
        pass

    with pytest.raises(Stopped), PgLedger.open(postgres_url) as ledger:
        ledger.start_run("r1", job="j")
        ledger.record_rejected_rows("r1", [RejectedRow("in.csv", 2, "email", "not an email", "u1")])
        # Every write fails from here (a database that refuses writes), as the queued one will.
        ledger._conn.execute("SET default_transaction_read_only = on")
        raise Stopped
    assert ledger._conn.closed
    # Leaving normally, the failing write is the error, and the connection is closed too.
    other = PgLedger.open(postgres_url)
    other.record_rejected_rows("r1", [RejectedRow("in.csv", 3, "email", "not an email", "u2")])
    other._conn.execute("SET default_transaction_read_only = on")
    with pytest.raises(StateError, match="cannot write"), other:
        pass
    assert other._conn.closed


async def test_a_pg_ledger_that_loses_its_connection_while_sending_waits_for_it_off_the_event_loop(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    """While the dispatcher sends (``sending()``), a lost ledger connection is made again on a worker thread:
    ``flush()`` returns at once with the writes queued, the event loop goes on while ``flush_async()`` waits
    for the database, and the writes are committed once it is back. Made again on the loop, the wait stopped the
    worker's other connections half-way through connecting, which held PostgreSQL's shutdown for its
    authentication timeout (60 s) — past the ledger's 30 s: the worker gave up on a plain restart (found under
    load by test_postgresql_restarted_mid_run_the_worker_reconnects_records_what_was_in_flight_and_finishes).
    Past ``reconnect_for`` without the database, ``flush_async()`` raises as ever."""
    from sync.coordination.ledger import PgLedger
    from sync.errors import StateError

    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    with PgLedger.open(postgres_url) as ledger:
        ledger.start_run("r-off-loop", job="j-off-loop")
        with ledger.sending():
            postgres_server.stop("fast")  # every session ends; the server is away for a while
            back = threading.Timer(1.5, postgres_server.start)
            back.start()
            try:
                ledger.record_rejected_rows("r-off-loop", [RejectedRow("in.csv", 2, "email", "bad", "u1")])
                began = time.monotonic()
                ledger.flush()  # the connection is found lost: nothing waits here, the write stays queued
                assert time.monotonic() - began < 1.0
                assert ledger._pending
                ticker = asyncio.create_task(tick())
                await ledger.flush_async()  # connects again on a thread, then commits
                waited = time.monotonic() - began
                ticker.cancel()
            finally:
                back.join()
        assert waited >= 1.0, waited  # it did wait for the server
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert gaps and max(gaps) < 0.5, max(gaps)  # the loop went on meanwhile
        assert not ledger._pending
    rows = query(
        postgres_server,
        postgres_url,
        "SELECT count(*) FROM pushsync.rejected_rows WHERE run_id = 'r-off-loop' AND ext_id = 'u1'",
    )
    assert rows == [["1"]]

    # A flush_async cancelled while it waits (the dispatcher cut short) leaves its reconnection running; a flush
    # after sending() joins that thread first and commits through the connection it made (never two at once).
    with PgLedger.open(postgres_url) as ledger:
        ledger.start_run("r-cut-short", job="j-cut-short")
        with ledger.sending():
            postgres_server.stop("fast")
            back = threading.Timer(1.0, postgres_server.start)
            back.start()
            try:
                ledger.record_rejected_rows("r-cut-short", [RejectedRow("in.csv", 2, "email", "bad", "u3")])
                waiting = asyncio.create_task(ledger.flush_async())
                await asyncio.sleep(0.2)
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
                thread = ledger._reconnect_thread
                assert thread is not None and thread.is_alive()
            finally:
                back.join()
        ledger.flush()
        assert not thread.is_alive() and not ledger._pending
    rows = query(
        postgres_server,
        postgres_url,
        "SELECT count(*) FROM pushsync.rejected_rows WHERE run_id = 'r-cut-short' AND ext_id = 'u3'",
    )
    assert rows == [["1"]]

    # A database that stays away: StateError once reconnect_for has passed, the password never in it.
    with PgLedger.open(postgres_url, reconnect_for=1.0) as stranded:
        stranded.start_run("r-stranded", job="j-stranded")
        stranded._url = postgres_url.replace(f":{postgres_server.port}/", f":{_free_port()}/")
        with stranded.sending():
            pid = stranded._conn.info.backend_pid
            postgres_server.sql(postgres_server.admin_url(), f"SELECT pg_terminate_backend({pid})")
            stranded.record_rejected_rows("r-stranded", [RejectedRow("in.csv", 2, "email", "bad", "u2")])
            with pytest.raises(StateError) as caught:
                await stranded.flush_async()
        message = str(caught.value)
        assert "the connection for the ledger was lost and could not be made again within 1 s" in message
        assert postgres_server.password not in message
        stranded._url = postgres_url
        stranded._pending.clear()  # what the stranded run queued is not this test's to write


def test_both_ledgers_read_back_the_same_records(tmp_path: Path, postgres_url: str) -> None:
    """The readers are written once (sync.ledger.ledger.LedgerBase) over each ledger's SQL dialect: the same
    writes read back the same from SQLite and from PostgreSQL, in the same order."""
    import dataclasses

    from sync.coordination._db import connect
    from sync.coordination.ledger import PgLedger
    from sync.coordination.queue import enqueue
    from sync.ledger.ledger import Ledger
    from sync.records import Attempt, AttemptOutcome, BatchResult, BatchStatus, Operation, RejectedId, RowRef

    keys = (7).to_bytes(8, "little") + (9).to_bytes(8, "little")
    # In lane order (endpoint by endpoint), the order PostgreSQL's queue keeps them in too.
    batches = [
        Batch("t1", "tagUsers", Operation.TAG, {"tag": "t", "extIds": ["u1", "u2"]}, ("u1", "u2")),
        Batch("t2", "tagUsers", Operation.TAG, {"tag": "t", "extIds": ["u4"]}, ("u4",)),
        Batch("e1", "fireEvents", Operation.FIRE_EVENTS, [{"e": 1}], ("u3",), row_keys=keys),
    ]
    refused = RejectedId("u2", 5016, "external id not found", RowRef("users.csv", 3))
    results = [
        BatchResult(
            "t1", "tagUsers", Operation.TAG, BatchStatus.REJECTED, 1, 400, 5016, "one", 1, (refused,)
        ),
        BatchResult("e1", "fireEvents", Operation.FIRE_EVENTS, BatchStatus.OK, 2, 200, ok_ids=1),
    ]
    attempts = [
        Attempt("e1", "fireEvents", 1, 1, 0.25, AttemptOutcome.RETRYABLE, 503, "busy"),
        Attempt("t1", "tagUsers", 1, 2, 0.5, AttemptOutcome.REJECTED, 400),
        Attempt("e1", "fireEvents", 2, 1, 0.125, AttemptOutcome.OK, 200),
    ]
    invalid = [
        RejectedRow("users.csv", 5, "email", "not an email", "u9"),
        RejectedRow("users.csv", 6, None, "empty"),
    ]

    def write(ledger: Any, run_id: str) -> None:
        assert ledger.record_rejected_rows(run_id, invalid) == 2
        for batch_id in ("t1", "e1"):
            ledger.record_sent(run_id, batch_id)
        for n, attempt in enumerate(attempts):
            ledger.record_attempt(run_id, attempt, started_at=1000.0 + n)
        for result in results:
            ledger.record_result(run_id, result)
        ledger.flush()

    def read(ledger: Any) -> list[Any]:
        def same_times(info: Any) -> Any:  # each ledger started and ended its runs at its own instants
            return None if info is None else dataclasses.replace(info, started_at=0.0, finished_at=0.0)

        return [
            sorted(same_times(info).run_id for info in ledger.runs()),
            [same_times(info) for info in ledger.runs("j") if info.run_id == "r1"],
            ledger.runs("another job"),
            same_times(ledger.run("r2")),
            ledger.run("no such run"),
            ledger.batches("r1"),
            ledger.batches("r1", status=BatchStatus.PLANNED),
            ledger.confirmed_ok("r1"),
            ledger.attempts("r1"),
            list(ledger.batch_rows(["r1", "r2"])),
            ledger.refused_ids("r1"),
            ledger.rejected_rows("r1"),
        ]

    lead = connect(postgres_url)
    with Ledger.open(tmp_path / "ledger.sqlite") as lite, PgLedger.open(postgres_url) as pg:
        for run_id in ("r1", "r2"):
            lite.start_run(run_id, job="j", platform="netmera", full_refresh=run_id == "r2")
            for batch in batches:
                lite.record_planned(run_id, batch)
            write(lite, run_id)
            pg.start_run(run_id, job="j", platform="netmera", full_refresh=run_id == "r2")
            assert enqueue(lead, run_id, batches) == 3  # the PostgreSQL ledger's planned records
            write(pg, run_id)
            if run_id == "r1":  # one live run per job in PostgreSQL
                for ledger in (lite, pg):
                    ledger.finish_run("r1", status="partial", exit_code=1, summary={"sent": 2})
        got = read(pg)
        assert got == read(lite)
    lead.close()
    runs, r1, other, r2, missing, listed, planned, ok, tried, keyed, ids, rows = got
    assert runs == ["r1", "r2"] and other == [] and missing is None
    assert r1[0].batches_by_status == {"rejected": 1, "ok": 1, "planned": 1} and not r1[0].full_refresh
    assert (r1[0].status, r1[0].exit_code, r1[0].summary) == ("partial", 1, {"sent": 2})
    assert r2.full_refresh and r2.status == "running" and r2.batches == 3
    assert [(b.batch_id, b.status, b.rejected_ids) for b in listed] == [
        ("t1", "rejected", 1),
        ("t2", "planned", 0),
        ("e1", "ok", 0),
    ]
    assert [b.batch_id for b in planned] == ["t2"] and ok == {"e1"}
    assert [(a.batch_id, a.attempt, a.started_at) for a in tried] == [
        ("e1", 1, 1000.0),
        ("t1", 1, 1001.0),
        ("e1", 2, 1002.0),
    ]
    assert [(run, batch, status, row_keys) for run, batch, status, _scheme, row_keys in keyed] == [
        ("r1", "e1", "ok", keys),
        ("r2", "e1", "ok", keys),
    ]
    assert ids == [("t1", "u2", "5016", "external id not found")]
    assert rows == invalid


def test_a_schema_of_version_1_is_migrated_and_its_planned_runs_are_listed(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    from sync.coordination import open_ledger

    open_ledger(postgres_url).close()
    # Back to version 1: no lanes, no listed, no claim_no; one run planned by a version-1 leader.
    postgres_server.sql(
        postgres_url,
        "DROP TABLE pushsync.lanes; ALTER TABLE pushsync.runs DROP COLUMN listed; "
        "ALTER TABLE pushsync.batches DROP COLUMN claim_no; UPDATE pushsync.schema_version SET version = 1; "
        "INSERT INTO pushsync.runs (run_id, job, started_at, status, planned) VALUES ('old', 'j', 0, 'running', TRUE); "
        "INSERT INTO pushsync.batches (run_id, batch_id, endpoint, operation, phase, rank, n_ids, ext_ids, status, "
        "planned_at) VALUES ('old', 'b1', 'tagUsers', 'tag', 1, 2, 1, '[]', 'planned', 0)",
    )
    open_ledger(postgres_url).close()
    assert query(postgres_server, postgres_url, "SELECT version FROM pushsync.schema_version") == [["3"]]
    assert query(postgres_server, postgres_url, "SELECT listed FROM pushsync.runs") == [["t"]]
    lanes = query(postgres_server, postgres_url, "SELECT phase, endpoint, rank, queued FROM pushsync.lanes")
    assert lanes == [["1", "tagUsers", "2", "t"]]


def test_a_schema_of_version_2_gets_the_budget_anchor_and_the_new_take_slot_alone(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    from sync.coordination import open_ledger

    open_ledger(postgres_url).close()
    # Back to version 2: no budgets.anchor, version 2's take_slot (seven arguments).
    old_args = (
        "TEXT, TEXT[], INTEGER[], DOUBLE PRECISION[], BOOLEAN[], DOUBLE PRECISION[], DOUBLE PRECISION[]"
    )
    postgres_server.sql(
        postgres_url,
        f"DROP FUNCTION pushsync.take_slot({old_args}, DOUBLE PRECISION); "
        f"CREATE FUNCTION pushsync.take_slot({old_args}) RETURNS TABLE (slot_at DOUBLE PRECISION, "
        "db_now DOUBLE PRECISION) AS 'SELECT 0::float8, 0::float8' LANGUAGE sql; "
        "ALTER TABLE pushsync.budgets DROP COLUMN anchor; UPDATE pushsync.schema_version SET version = 2; "
        "INSERT INTO pushsync.budgets (scope, name) VALUES ('j', 'g')",
    )
    open_ledger(postgres_url).close()
    assert query(postgres_server, postgres_url, "SELECT version FROM pushsync.schema_version") == [["3"]]
    # The call a worker makes (seven arguments) reaches the new function, not an ambiguous pair.
    (slot,) = query(
        postgres_server,
        postgres_url,
        "SELECT slot_at FROM pushsync.take_slot('j', ARRAY['g'], ARRAY[5], ARRAY[1.0::float8], ARRAY[TRUE], "
        "ARRAY[0.1::float8], ARRAY[0.025::float8])",
    )
    anchor = query(postgres_server, postgres_url, "SELECT anchor, used FROM pushsync.budgets")
    assert float(slot[0]) > 0 and anchor == [[slot[0], "1"]]  # the first release of an idle budget
    functions = query(
        postgres_server, postgres_url, "SELECT count(*) FROM pg_proc WHERE proname = 'take_slot'"
    )
    assert functions == [["1"]]


class _GatedPlan:
    """A plan whose one lane gives its first batch, then waits for ``gate`` before the others: a leader that
    is still planning."""

    def __init__(self, batches: list[Batch], gate: threading.Event) -> None:
        self._batches = batches
        self._gate = gate

    def lanes(self, phase: Phase) -> list[tuple[str, Iterator[Batch]]]:
        return [("upsert", self._lane())] if phase is Phase.CHANGES else []

    def _lane(self) -> Iterator[Batch]:
        yield self._batches[0]
        assert self._gate.wait(60)
        yield from self._batches[1:]


async def test_a_worker_claims_and_confirms_a_batch_before_the_leader_queued_the_last_one(
    postgres_url: str,
) -> None:
    from sync.config import DispatchSettings
    from sync.coordination._db import Link, connect
    from sync.coordination.ledger import PgLedger
    from sync.coordination.queue import Membership, QueueLanes, enqueue
    from sync.dispatch.dispatch import Dispatcher, DispatchOutcome
    from tests.fake_platform import FakeClient, FakeServer, make_batch

    bodies = [json.dumps({"users": [{"id": f"u{i}", "name": f"N{i}"}]}).encode() for i in range(3)]
    batches = [make_batch(body, {}) for body in bodies]
    gate = threading.Event()
    with PgLedger.open(postgres_url, worker="w1") as ledger:
        ledger.start_run("r1", job="j")
        lead = connect(postgres_url)
        queueing = asyncio.create_task(asyncio.to_thread(enqueue, lead, "r1", _GatedPlan(batches, gate)))
        member = Membership(await Link.open(postgres_url, what="heartbeats"), "r1", "w1", lease=30)
        await member.join()
        claims = await Link.open(postgres_url, what="claims")
        lanes = QueueLanes(claims, ledger, member, poll=0.02)
        server = FakeServer()
        dispatcher = Dispatcher(
            FakeClient(server), DispatchSettings(concurrency=2), ledger=ledger, run_id="r1"
        )
        watch = connect(postgres_url)
        try:
            for _ in range(500):  # the leader lists the lanes before it queues a batch
                if watch.execute("SELECT listed FROM pushsync.runs").fetchone() == (True,):
                    break
                await asyncio.sleep(0.01)
            sending = asyncio.create_task(dispatcher.run(lanes))
            first = batches[0].batch_id
            for _ in range(1000):
                row = watch.execute(
                    "SELECT status FROM pushsync.batches WHERE batch_id = %s", (first,)
                ).fetchone()
                if row == ("ok",):
                    break
                await asyncio.sleep(0.01)
            # Confirmed while the leader has queued one batch of three and not finished the lane.
            assert row == ("ok",) and server.users == {"u0": {"name": "N0"}}
            state = watch.execute(
                "SELECT count(*), bool_and(l.queued) FROM pushsync.batches, pushsync.lanes l"
            ).fetchone()
            assert state == (1, False), state
            assert not sending.done()  # the lane waits for the rest of the plan
            gate.set()
            assert await queueing == 3
            report = await asyncio.wait_for(sending, 30)
        finally:
            gate.set()
            watch.close()
            lead.close()
            await claims.close()
            await member.link.close()
    assert report.outcome is DispatchOutcome.COMPLETED and report.batches_done == 3
    assert set(server.users) == {"u0", "u1", "u2"}


async def test_the_dispatcher_pulls_an_on_demand_lane_only_for_workers_that_wait() -> None:
    """A coordinated worker's lanes hand out batches on demand (BatchPuller): a claim is a lease, so none is
    taken before a worker is free to send it, and as many as workers wait are taken at once."""
    from sync.config import DispatchSettings
    from sync.dispatch.dispatch import Dispatcher, DispatchOutcome
    from sync.platforms.base import SendOutcome
    from tests.fake_platform import make_batch

    batches = [make_batch(json.dumps({"users": [{"id": f"u{i}"}]}).encode(), {}) for i in range(9)]
    started: list[str] = []
    release = asyncio.Event()

    class SlowClient:
        platform = "fake"

        async def send(self, batch: Batch) -> SendOutcome:
            started.append(batch.batch_id)
            await release.wait()
            return SendOutcome(http_status=200, latency=0.0)

        def split(self, batch: Batch) -> None:
            return None

        async def aclose(self) -> None:
            return None

    class Lane:
        def __init__(self) -> None:
            self.left = list(batches)
            self.asked: list[tuple[int, int]] = []  # (n asked, batches taken but not begun sending then)
            self.taken = 0

        async def take(self, n: int) -> list[Batch]:
            self.asked.append((n, self.taken - len(started)))
            out, self.left = self.left[:n], self.left[n:]
            self.taken += len(out)
            return out

        async def __aiter__(self) -> AsyncIterator[Batch]:  # what a dispatcher unaware of take() would read
            while batch := await self.take(1):
                yield batch[0]

    class Source:
        def __init__(self) -> None:
            self.lane = Lane()

        def lanes(self, phase: Phase) -> list[tuple[str, Lane]]:
            return [("upsert", self.lane)] if phase is Phase.CHANGES else []

    source = Source()
    dispatcher = Dispatcher(SlowClient(), DispatchSettings(concurrency=3, queue_size=64))
    sending = asyncio.create_task(dispatcher.run(source))  # type: ignore[arg-type]
    for _ in range(200):
        if len(started) == 3:
            break
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    # Three workers, three batches in flight, none taken beyond them (a queue of 64 would have taken all 9).
    assert len(started) == 3 and source.lane.taken == 3, (started, source.lane.asked)
    release.set()
    report = await asyncio.wait_for(sending, 10)
    assert report.outcome is DispatchOutcome.COMPLETED and report.batches_done == 9
    assert source.lane.asked[0] == (3, 0)  # the first pull: as many as workers wait
    assert all(pending == 0 for _n, pending in source.lane.asked), source.lane.asked


def test_the_kubernetes_example_carries_a_valid_job(tmp_path: Path) -> None:
    import yaml

    from sync.config import load_job

    docs = list(
        yaml.safe_load_all((REPO_ROOT / "deploy" / "k8s" / "indexed-job.yaml").read_text(encoding="utf-8"))
    )
    config = next(d for d in docs if d and d["kind"] == "ConfigMap")
    (tmp_path / "job.yaml").write_text(config["data"]["job.yaml"], encoding="utf-8")
    job = load_job(tmp_path / "job.yaml")
    assert job.coordination is not None and job.coordination.database_env == "PUSHSYNC_DATABASE_URL"
    pod = next(d for d in docs if d and d["kind"] == "Job")["spec"]["template"]["spec"]
    assert "--run-id" in pod["containers"][0]["args"]


def test_without_a_coordination_database_the_driver_is_never_loaded() -> None:
    # `pip install pushsync` without the postgres extra must run jobs as before.
    code = (
        "import sys\n"
        "from sync.coordination import resolve_database_url\n"
        "import sync.run, sync.cli._ledgers, sync.cli.run_cmd\n"
        "assert resolve_database_url(None, None, {}) is None\n"
        "assert 'psycopg' not in sys.modules, 'psycopg imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


async def test_each_worker_pushes_its_metrics_under_its_own_instance(
    netmera_sandbox: Any, tmp_path: Path, postgres_url: str
) -> None:
    from sync.config import load_job
    from sync.run import RunOptions, run
    from tests.test_metrics import _FakePushgateway

    write_users(tmp_path, range(60))
    (tmp_path / "job.yaml").write_text(coordinated_job(netmera_sandbox.url), encoding="utf-8")
    gateway = _FakePushgateway()
    try:
        outcome = await run(
            load_job(tmp_path / "job.yaml"),
            RunOptions(
                api_key=netmera_sandbox.api_key, metrics_pushgateway=gateway.url, database_url=postgres_url
            ),
        )
    finally:
        gateway.close()
    assert outcome.exit_code == 0
    paths = {path for _, path, _ in gateway.pushes}
    assert len(paths) == 1
    (path,) = paths
    assert path.startswith("/metrics/job/scale/instance/"), path


@pytest.mark.parametrize("problem", ["port", "textfile", "pushgateway"])
async def test_metrics_that_cannot_be_exported_stop_a_worker_before_it_joins_or_records_a_run(
    netmera_sandbox: Any, tmp_path: Path, postgres_server: PostgresServer, postgres_url: str, problem: str
) -> None:
    """As a one-process run does: a taken ``--metrics-port``, a textfile that cannot be written or a malformed
    Pushgateway URL is exit 2 before anything is recorded. A worker found out only after it had started the run
    (recorded running, its leader planning it), which the next `pushsync run` then joined."""
    import socket

    from sync.config import load_job
    from sync.errors import StateError
    from sync.run import RunOptions, run

    write_users(tmp_path, range(60))
    (tmp_path / "job.yaml").write_text(coordinated_job(netmera_sandbox.url), encoding="utf-8")
    (tmp_path / "file").write_text("", encoding="utf-8")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        option = {
            "port": {"metrics_port": taken.getsockname()[1]},
            "textfile": {"metrics_textfile": str(tmp_path / "file" / "pushsync.prom")},
            "pushgateway": {"metrics_pushgateway": "http://gateway:port"},
        }[problem]
        with pytest.raises(StateError) as refused:
            await run(
                load_job(tmp_path / "job.yaml"),
                RunOptions(api_key=netmera_sandbox.api_key, database_url=postgres_url, **option),  # type: ignore[arg-type]
            )
    assert int(refused.value.exit_code) == 2
    assert netmera_sandbox.sandbox.stats.snapshot()["requests_total"] == 0
    tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'pushsync' AND tablename = 'runs'"
    if query(postgres_server, postgres_url, tables) != [["0"]]:  # the database was not even touched, or:
        assert query(postgres_server, postgres_url, "SELECT count(*) FROM pushsync.runs") == [["0"]]


def test_input_that_cannot_be_planned_ends_the_run_for_every_worker(
    tmp_path: Path, postgres_server: PostgresServer, postgres_url: str
) -> None:
    (tmp_path / "job.yaml").write_text(coordinated_job("http://127.0.0.1:9/rest/3.0/"), encoding="utf-8")
    (tmp_path / "users.csv").write_text("name,score\nAda,1\n", encoding="utf-8")  # no id column
    procs = [worker(tmp_path, "k", postgres_url, "run", "job.yaml", "--progress", "none") for _ in range(2)]
    results = [finish(p, timeout=60) for p in procs]
    assert [code for code, _, _ in results] == [2, 2], results
    assert all("id" in err for _, _, err in results)
    rows = query(
        postgres_server,
        postgres_url,
        "SELECT status, exit_code, left(message, 12) = 'not planned:' FROM pushsync.runs",
    )
    # One run, or two when the second worker came after the first had already ended its run: never one left
    # waiting for a plan.
    assert rows in ([["aborted", "2", "t"]], [["aborted", "2", "t"]] * 2), rows


# --- a leader stopped while it reads the input of a run already listed ------------------------------------------

_CRM_ENV = "PUSHSYNC_TEST_CRM_URL"
_SQL_USERS = f"""\
  - name: users
    database: {{env: {_CRM_ENV}}}
    query: "SELECT u.* FROM crm.users AS u, pg_sleep((SELECT pause FROM crm.knob))"
    ext_id: id
    attributes:
      name: string
      score: number
      city: {{on_null: unset}}
    tags: {{column: segments}}
    opt_ins:
      email: mail
      categories: {{News: news}}
"""
""":data:`tests.netmera_e2e.FULL_USERS` from a PostgreSQL table, read after ``crm.knob.pause`` seconds."""

_STOP_ONCE_QUEUED = """\
import os, signal, sys, time
import sync.coordination.leader as leader
import sync.coordination.queue as queue

def stop() -> None:  # SIGTERM to this worker; its handler runs before the planning thread goes on
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)

if os.environ["STOP_WHEN"] == "queued-unsent":
    # A worker that claims nothing, stopped once the first batch is queued (before the second is).
    async def take(self, phase, endpoint, n):
        return []
    queue.QueueLanes.take = take
    encode = queue.encode_batch
    def encode_batch(batch):
        encode_batch.calls = getattr(encode_batch, "calls", 0) + 1
        if encode_batch.calls == 2:
            stop()
        return encode(batch)
    queue.encode_batch = encode_batch
else:
    # Once every batch is queued and confirmed, before planning is recorded as done.
    enqueue = leader.enqueue
    def enqueue_then_stop(conn, run_id, source, **kw):
        total = enqueue(conn, run_id, source, **kw)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and conn.execute(
            "SELECT count(*) FROM pushsync.batches WHERE run_id = %s AND status <> 'ok'", (run_id,)
        ).fetchone()[0]:
            time.sleep(0.05)
        stop()
        return total
    leader.enqueue = enqueue_then_stop

from sync.cli import main
sys.exit(main(sys.argv[1:]))
"""
"""``pushsync ARGS`` whose leader is stopped by SIGTERM after it listed the run, at ``STOP_WHEN``."""


def _sql_job(
    tmp_path: Path, sandbox: NetmeraProcess, postgres_server: PostgresServer, postgres_url: str
) -> list[list[str]]:
    """A coordinated job reading 120 users from a PostgreSQL query that sleeps ``crm.knob.pause`` seconds first
    (0 to begin with); the users' rows."""
    dispatch = coordinated_job(sandbox.url).split("dispatch:\n", 1)[1]
    job = netmera_job(
        sandbox.url, name="scale", sources=_SQL_USERS, tail="coordination: {lease: 2}\n", dispatch=dispatch
    )
    (tmp_path / "job.yaml").write_text(job, encoding="utf-8")
    rows = [user_row(i) for i in range(120)]
    values = ", ".join("(" + ", ".join("NULL" if v == "" else f"'{v}'" for v in row) + ")" for row in rows)
    postgres_server.sql(
        postgres_url,
        "CREATE SCHEMA crm; CREATE TABLE crm.knob (pause float8); INSERT INTO crm.knob VALUES (0); "
        "CREATE TABLE crm.users (id text, name text, score int, city text, segments text, mail text, news text); "
        f"INSERT INTO crm.users VALUES {values}",
    )
    return rows


def _stopped_while_reading(
    postgres_server: PostgresServer, proc: subprocess.Popen[str], ready: Callable[[], bool] = lambda: True
) -> tuple[int, str, str]:
    """SIGTERM to the worker ``proc`` once its query of :data:`_SQL_USERS` sleeps in the server (and ``ready()``);
    its exit code, stdout and stderr."""
    try:
        _until_reading(postgres_server, proc, ready)
        proc.send_signal(signal.SIGTERM)
        return finish(proc, timeout=30)
    finally:
        proc.kill()


def _first_worker_reading_slowly(
    tmp_path: Path, sandbox: NetmeraProcess, postgres_server: PostgresServer, postgres_url: str
) -> tuple[list[list[str]], dict[str, str], subprocess.Popen[str]]:
    """:func:`_sql_job` with its query sleeping 30 s, and the run's first worker started on it: (the users' rows,
    the workers' environment, the worker)."""
    rows = _sql_job(tmp_path, sandbox, postgres_server, postgres_url)
    postgres_server.sql(postgres_url, "UPDATE crm.knob SET pause = 30")
    env = {_CRM_ENV: postgres_url, "PUSHSYNC_DATABASE_URL": postgres_url}
    return (
        rows,
        env,
        worker(tmp_path, sandbox, postgres_url, "run", "job.yaml", "--progress", "none", env=env),
    )


def _the_next_run_finishes_it(
    tmp_path: Path,
    sandbox: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
    env: dict[str, str],
    rows: list[list[str]],
) -> None:
    """With the query quick again, the next `pushsync run` joins the run, plans it and finishes it."""
    postgres_server.sql(postgres_url, "UPDATE crm.knob SET pause = 0")
    code, out, err = finish(
        worker(tmp_path, sandbox, postgres_url, "run", "job.yaml", "--progress", "none", env=env)
    )
    assert code == 0, (out, err[-3000:])
    state = "SELECT listed, planned, status FROM pushsync.runs"
    assert query(postgres_server, postgres_url, state) == [["t", "t", "done"]]
    assert sandbox_users(sandbox) == expected_users(rows)


_READING = (
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pushsync' AND state = 'active' "
    "AND query LIKE '%pg_sleep%'"
)
"""How many of pushsync's queries of :data:`_SQL_USERS` sleep in the server."""


def _until_reading(
    postgres_server: PostgresServer, proc: subprocess.Popen[str], ready: Callable[[], bool] = lambda: True
) -> None:
    """Wait until the worker ``proc``'s query of :data:`_SQL_USERS` sleeps in the server (and ``ready()``)."""
    deadline = time.monotonic() + 30
    while postgres_server.sql(postgres_server.admin_url(), _READING).strip() != "1" or not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the worker never read the input (or was never ready)"
        time.sleep(0.05)


@pytest.mark.parametrize("sent", [False, True], ids=["sent-nothing", "sent-some"])
def test_a_leader_stopped_while_it_reads_the_input_of_a_listed_run_says_what_stays_and_exits_4(
    sent: bool,
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    # A run whose lanes are listed and whose batches are (partly) queued, but not planned: its leader was stopped
    # while it queued. The next worker joins it, sends what is queued, and plans it again — reading the input,
    # which a SIGTERM interrupts. It said "interrupted while the input was read; nothing was sent or recorded"
    # (exit 4) although the run and its queued batches stay recorded — or, once it had sent a queued batch,
    # "planning failed" with exit 3: a signal is not a failure.
    sandbox = netmera_sandbox_process
    rows = _sql_job(tmp_path, sandbox, postgres_server, postgres_url)
    env = {_CRM_ENV: postgres_url, "PUSHSYNC_DATABASE_URL": postgres_url}
    first = subprocess.Popen(
        [sys.executable, "-c", _STOP_ONCE_QUEUED, "run", "job.yaml", "--progress", "none"],
        cwd=tmp_path,
        env={
            **os.environ,
            **env,
            "NETMERA_API_KEY": sandbox.api_key,
            "PYTHONPATH": str(REPO_ROOT),
            "STOP_WHEN": "queued-unsent" if sent else "all-confirmed",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    code, out, err = finish(first, timeout=60)
    # A stopped worker exits 4, also when it sent every batch queued: planning was not done (it exited 0).
    assert code == 4, (out, err[-3000:])
    state = "SELECT listed, planned, status FROM pushsync.runs"
    assert query(postgres_server, postgres_url, state) == [["t", "f", "running"]], err[-3000:]
    ok, queued = batch_counts(postgres_server, postgres_url)
    assert queued >= 1 and ok == (0 if sent else queued), (ok, queued)

    # The next worker leads: it reads the input (a query that sleeps) while it sends what is queued — each
    # request answered after 1 s, so that one is in flight when the signal comes and planning stops first.
    postgres_server.sql(postgres_url, "UPDATE crm.knob SET pause = 30")
    if sent:
        sandbox_faults(sandbox, {"slow": 1.0, "latency": {"distribution": "fixed", "low": 1.0, "high": 1.0}})
    second = worker(tmp_path, sandbox, postgres_url, "run", "job.yaml", "--progress", "none", env=env)
    code, out, err = _stopped_while_reading(
        postgres_server, second, lambda: not sent or bool(inspect(sandbox, "stats")["faults"].get("slow"))
    )
    assert code == 4, (out, err[-3000:])
    assert "nothing was sent or recorded" not in out + err and "planning failed" not in out + err, err[-3000:]
    if sent:
        # It sent the queued batches: its summary says it was interrupted, as any stopped worker's does.
        assert "interrupted: in-flight batches were drained" in out, out
    else:
        errors = [line for line in err.splitlines() if line.startswith("pushsync: error:")]
        assert len(errors) == 1, err[-3000:]
        assert "interrupted while the input was read; this worker sent nothing" in errors[0], errors
        assert "`pushsync run` joins the run again and plans the rest" in errors[0], errors
    assert query(postgres_server, postgres_url, state) == [["t", "f", "running"]]

    # The next `pushsync run` joins the run, plans it again and finishes it.
    sandbox_faults(sandbox, {"slow": 0.0})
    _the_next_run_finishes_it(tmp_path, sandbox, postgres_server, postgres_url, env, rows)


def test_a_first_leader_stopped_while_it_reads_the_input_says_the_run_stays_and_exits_4(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    # The run's first worker leads, and a SIGTERM comes while it reads the input (a query that sleeps): it said
    # "nothing was sent or recorded", though the run stays recorded (running, not planned), and the next
    # `pushsync run` joins it.
    sandbox = netmera_sandbox_process
    rows, env, first = _first_worker_reading_slowly(tmp_path, sandbox, postgres_server, postgres_url)
    code, out, err = _stopped_while_reading(postgres_server, first)
    assert code == 4, (out, err[-3000:])
    errors = [line for line in err.splitlines() if line.startswith("pushsync: error:")]
    assert len(errors) == 1 and "nothing was recorded" not in errors[0], err[-3000:]
    assert "the run not yet planned; it stays recorded" in errors[0], errors
    state = "SELECT listed, planned, status FROM pushsync.runs"
    assert query(postgres_server, postgres_url, state) == [["f", "f", "running"]]
    _the_next_run_finishes_it(tmp_path, sandbox, postgres_server, postgres_url, env, rows)


def test_a_worker_whose_run_ends_while_it_leads_stops_its_planning_at_once_and_cancels_the_query(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    # The run's only worker leads and reads the input (a query that sleeps 30 s) when the run is ended under it
    # (an operator marks it aborted): the worker fails at once, but its planning thread was merely abandoned —
    # cancelling the task does not stop a thread —, so the query ran its 30 s on the server, the process waited
    # for it at exit, and the thread's connection was closed under it. Now the worker stops its planning (the
    # run's stop) and the query is cancelled.
    _, _, proc = _first_worker_reading_slowly(
        tmp_path, netmera_sandbox_process, postgres_server, postgres_url
    )
    try:
        _until_reading(postgres_server, proc)
        postgres_server.sql(
            postgres_url, "UPDATE pushsync.runs SET status = 'aborted', message = 'stopped by hand'"
        )
        ended = time.monotonic()
        code, out, err = finish(proc, timeout=60)
        took = time.monotonic() - ended
    finally:
        proc.kill()
    assert code == 2, (out, err[-3000:])  # the run's end is a state error, as before
    assert "ended (aborted) before it was planned: stopped by hand" in err, err[-3000:]
    assert took < 12, f"the worker took {took:.1f} s to exit: its planning thread read on"
    assert postgres_server.sql(postgres_server.admin_url(), _READING).strip() == "0"
    assert "Traceback" not in err, err[-3000:]


async def test_a_stop_that_comes_as_the_leader_lists_the_lanes_is_not_taken_for_an_unplanned_run(
    postgres_url: str,
) -> None:
    # until_listed looked whether the lanes were listed, then whether a stop had come: a leader that listed the
    # lanes (other workers then send what it queues) between the two looks, and was stopped, was reported as
    # "interrupted before anything was sent, the run not yet planned". It looks at the lanes again.
    from sync.coordination.leader import until_listed
    from sync.coordination.ledger import PgLedger
    from sync.run import StopSignals

    class StopAsListed(StopSignals):
        def interrupted(self) -> bool:
            # The stop comes just after the leader listed the lanes (the run's row says so).
            ledger._execute("UPDATE pushsync.runs SET listed = TRUE WHERE run_id = 'r1'")
            return True

    ledger = PgLedger.open(postgres_url)
    try:
        ledger.start_run("r1", job="j")
        planner: asyncio.Task[dict[str, Any] | None] = asyncio.create_task(asyncio.sleep(60, result=None))
        try:
            assert await until_listed(ledger, "r1", StopAsListed(), planner) is True
        finally:
            planner.cancel()
    finally:
        ledger.close()
