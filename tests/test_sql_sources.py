"""Database sources end to end: a real PostgreSQL server (tests/pg_fixture.py), real DuckDB and SQLite files, the
Netmera sandbox. The platform's end state equals the table's content in changes and snapshot modes; every kind of
bad input ends in one clear error and exit code 2 with nothing sent; the password never shows."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest
from pg_fixture import PostgresServer
from reliability.workload import compare_state

from sync.cli import main
from sync.config import load_job
from sync.demo import generate_users
from sync.errors import BadInputError, BadJobError, ExitCode
from sync.planning.planning import build_plan
from sync.redact import redact, redact_pieces
from sync.run import RunOptions, run
from sync.sources.reading import CHUNK_ROWS, ROW
from sync.sources.reading_sql import SqlReader

URL_ENV = "PUSHSYNC_TEST_CRM_URL"
KEY_ENV = "PUSHSYNC_TEST_SQL_KEY"

_JOB = """\
version: 1
name: {name}
workdir: work
mode: {mode}
destination: {{platform: netmera, base_url: "{url}", secret: {{env: {key_env}}}}}
sources:
  - name: users
    database: {database}
    {what}
    ext_id: user_id
    attributes:
      name: string
      city: string
      score: number
      vip: {{attribute: isVip, type: boolean}}
      plan: string
    tags: {{column: segments, delimiter: "|"}}
    opt_ins:
      email: email_opt_in
      categories: {{News: news_opt_in}}
dispatch:
  batch_size: 100
  concurrency: 4
  budgets: {{"*": {{requests: 1000, period: 1}}}}
  retry: {{max_attempts: 3, base_delay: 0.01, max_delay: 0.05}}
"""


def write_job(
    directory: Path,
    sandbox_url: str,
    *,
    database: str = f"{{env: {URL_ENV}}}",
    what: str = "table: crm.users",
    mode: str = "changes",
    name: str = "sql",
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    job = directory / "job.yaml"
    job.write_text(
        _JOB.format(name=name, mode=mode, url=sandbox_url, key_env=KEY_ENV, database=database, what=what),
        encoding="utf-8",
    )
    return job


def users(n: int, seed: int) -> pl.DataFrame:
    """The demo's generated users (their expected platform state is :func:`sync.demo.expected_users`)."""
    with tempfile.TemporaryDirectory() as tmp:
        return generate_users(Path(tmp) / "users.csv", n, seed=seed)


def as_table(frame: pl.DataFrame) -> Any:
    """The users as a database table: segments as a text array (PostgreSQL text[], DuckDB VARCHAR[])."""
    return frame.with_columns(
        pl.col("segments").str.split("|").list.eval(pl.element().filter(pl.element() != ""))
    ).to_arrow()


def pg_load(url: str, frame: pl.DataFrame, *, table: str = "users") -> None:
    """Replace crm.<table> on the PostgreSQL database at ``url`` with ``frame`` (ADBC bulk ingest)."""
    import adbc_driver_postgresql.dbapi as pg

    with pg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CREATE SCHEMA IF NOT EXISTS crm")
        cur.execute(f"DROP TABLE IF EXISTS crm.{table}")
        cur.adbc_ingest(table, as_table(frame), mode="create", db_schema_name="crm")


def duck_load(path: Path, frame: pl.DataFrame) -> None:
    con = duckdb.connect(str(path))
    try:
        con.execute("CREATE SCHEMA IF NOT EXISTS crm")
        con.register("incoming", as_table(frame))
        con.execute("CREATE OR REPLACE TABLE crm.users AS SELECT * FROM incoming")
    finally:
        con.close()


async def platform_matches(sandbox: Any, frame: pl.DataFrame) -> None:
    dump = await sandbox.inspect("GET", "state", params={"format": "json"})
    comparison = compare_state(dump.body, frame)
    assert comparison.lost == 0 and comparison.unexpected == 0, comparison.examples


def requests_sent(sandbox: Any) -> int:
    return int(sandbox.sandbox.stats.snapshot()["requests_total"])


# --- end to end ------------------------------------------------------------------------------------------------


async def test_postgres_changes_mode_end_state_equals_the_table(
    postgres_url: str, netmera_sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = users(300, seed=1)
    pg_load(postgres_url, frame)
    monkeypatch.setenv(URL_ENV, postgres_url)
    job = load_job(write_job(tmp_path, netmera_sandbox.url))
    outcome = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    assert outcome.exit_code is ExitCode.OK
    await platform_matches(netmera_sandbox, frame)


async def test_postgres_snapshot_mode_sends_the_difference_and_ends_equal_to_the_table(
    postgres_url: str, netmera_sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = users(300, seed=1)
    pg_load(postgres_url, first)
    monkeypatch.setenv(URL_ENV, postgres_url)
    job = load_job(
        write_job(tmp_path, netmera_sandbox.url, mode="snapshot", what="query: SELECT * FROM crm.users")
    )
    outcome = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    assert outcome.exit_code is ExitCode.OK
    await platform_matches(netmera_sandbox, first)

    # Change some users in the table: only they are sent, and the platform ends equal to the new content.
    changed = first.with_columns(
        pl.when(pl.int_range(pl.len()) % 10 == 0)
        .then(pl.lit("Paris"))
        .otherwise(pl.col("city"))
        .alias("city"),
        pl.when(pl.int_range(pl.len()) % 7 == 0)
        .then(pl.lit("gold"))
        .otherwise(pl.col("segments"))
        .alias("segments"),
    )
    pg_load(postgres_url, changed)
    second = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    assert second.exit_code is ExitCode.OK
    assert second.diff is not None and 0 < second.diff.users_changed < 300
    await platform_matches(netmera_sandbox, changed)

    before = requests_sent(netmera_sandbox)
    third = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    assert third.exit_code is ExitCode.OK and requests_sent(netmera_sandbox) == before  # nothing changed


async def test_duckdb_changes_and_snapshot_modes_end_equal_to_the_table(
    netmera_sandbox: Any, tmp_path: Path
) -> None:
    database = tmp_path / "sales.duckdb"
    frame = users(250, seed=3)
    duck_load(database, frame)
    # A DuckDB file URL may be written in the job: relative to the job file's folder (SQLAlchemy's form).
    job = load_job(write_job(tmp_path / "changes", netmera_sandbox.url, database="duckdb:///../sales.duckdb"))
    outcome = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    assert outcome.exit_code is ExitCode.OK
    await platform_matches(netmera_sandbox, frame)

    snap = load_job(
        write_job(
            tmp_path / "snap",
            netmera_sandbox.url,
            database=f"duckdb:///{database}",
            mode="snapshot",
            name="snap",
        )
    )
    await run(snap, RunOptions(api_key=netmera_sandbox.api_key))
    changed = frame.with_columns(pl.col("score") + 1)
    duck_load(database, changed)
    second = await run(snap, RunOptions(api_key=netmera_sandbox.api_key))
    assert second.exit_code is ExitCode.OK and second.diff is not None and second.diff.users_changed == 250
    await platform_matches(netmera_sandbox, changed)


async def test_sqlite_source_end_state_equals_the_table(netmera_sandbox: Any, tmp_path: Path) -> None:
    frame = users(120, seed=5)
    database = tmp_path / "crm.db"
    with sqlite3.connect(database) as con:
        con.execute(
            "CREATE TABLE users (user_id TEXT, name TEXT, city TEXT, score INTEGER, vip INTEGER, plan TEXT, "
            "segments TEXT, email_opt_in INTEGER, news_opt_in INTEGER)"
        )
        con.executemany("INSERT INTO users VALUES (?,?,?,?,?,?,?,?,?)", frame.rows())
    job = load_job(
        write_job(
            tmp_path,
            netmera_sandbox.url,
            database=f"sqlite:///{database}",
            what="query: SELECT * FROM users;",
        )
    )
    outcome = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    assert outcome.exit_code is ExitCode.OK
    await platform_matches(netmera_sandbox, frame)


# --- reading ---------------------------------------------------------------------------------------------------


def test_a_big_result_streams_in_bounded_chunks_numbered_by_position(
    postgres_url: str, postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    postgres_server.sql(
        postgres_url,
        "CREATE SCHEMA crm; CREATE TABLE crm.users AS SELECT 'U' || g AS user_id, 'n' || g AS name, "
        "'c' AS city, g AS score, g % 2 = 0 AS vip, 'p' AS plan, ARRAY['a'] AS segments, true AS email_opt_in, "
        "false AS news_opt_in FROM generate_series(1, 130000) g",
    )
    monkeypatch.setenv(URL_ENV, postgres_url)
    job = load_job(
        write_job(
            tmp_path, "http://127.0.0.1:9/rest/3.0/", what="query: SELECT * FROM crm.users ORDER BY score"
        )
    )
    chunks = list(SqlReader(job.sources[0]).chunks())
    assert [c.frame.height for c in chunks] == [CHUNK_ROWS, CHUNK_ROWS, 130000 - 2 * CHUNK_ROWS]
    rows = pl.concat([c.frame.select(ROW, "user_id") for c in chunks])
    assert rows[ROW].to_list() == list(range(1, 130001))
    assert rows["user_id"][:3].to_list() == ["U1", "U2", "U3"]

    # A reader left after its first chunk stops its read-ahead thread and closes its session.
    reading = SqlReader(job.sources[0]).chunks()
    assert next(reading).frame.height == CHUNK_ROWS
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pushsync'"
    assert postgres_server.sql(postgres_server.admin_url(), sessions).strip() == "1"
    reading.close()
    assert not [t for t in threading.enumerate() if t.name == "pushsync-sql-read-ahead"]
    # The server removes a closed session from pg_stat_activity when its backend process has exited: wait for it.
    deadline = time.monotonic() + 10
    while postgres_server.sql(postgres_server.admin_url(), sessions).strip() != "0":
        assert time.monotonic() < deadline, "the reader's session is still open"
        time.sleep(0.05)


_SLOW_COUNT = (
    "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 100000000) SELECT max(n) FROM t"
)
"""A query of minutes for DuckDB and SQLite (the server's pg_sleep has no equivalent there)."""


@pytest.mark.parametrize(
    ("engine", "command"),
    [("postgresql", "plan"), ("postgresql", "run"), ("duckdb", "plan"), ("sqlite", "plan")],
)
def test_sigterm_during_a_slow_query_stops_at_once_and_cancels_the_query(
    engine: str,
    command: str,
    postgres_url: str,
    postgres_server: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A scheduler (Kubernetes) stops the job with SIGTERM while the source's query runs. The planner waited for
    # the query's first rows before it looked at the signal: `pushsync plan` on a query with pg_sleep(40) exited
    # after 41 s, so a pod was killed after its grace period and the query ran on in the server.
    frame = users(30, seed=5)
    columns = ", ".join(f"u.{c}" for c in frame.columns)
    database = f"{{env: {URL_ENV}}}"
    if engine == "postgresql":
        pg_load(postgres_url, frame)
        what = f'query: "SELECT {columns} FROM crm.users AS u, pg_sleep(30)"'
    elif engine == "duckdb":
        duck_load(tmp_path / "source.duckdb", frame)
        database = f"duckdb:///{tmp_path / 'source.duckdb'}"
        what = f'query: "SELECT {columns} FROM crm.users AS u WHERE ({_SLOW_COUNT}) > 0"'
    else:
        with sqlite3.connect(tmp_path / "crm.db") as con:
            con.execute(f"CREATE TABLE users ({', '.join(frame.columns)})")
            con.executemany(
                f"INSERT INTO users VALUES ({', '.join('?' * frame.width)})",
                frame.with_columns(pl.col(pl.Boolean).cast(pl.Int8)).rows(),
            )
        database = f"sqlite:///{tmp_path / 'crm.db'}"
        what = f'query: "SELECT {columns} FROM users AS u WHERE ({_SLOW_COUNT}) > 0"'
    job = write_job(tmp_path / "job", "http://127.0.0.1:9/rest/3.0/", database=database, what=what)
    running = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pushsync' AND state = 'active' "
        "AND query LIKE '%pg_sleep%'"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "sync", command, str(job)],
        env={**os.environ, URL_ENV: postgres_url, KEY_ENV: "unused-key"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while process.poll() is None:
            assert time.monotonic() < deadline, "the query never started"
            if engine == "postgresql":
                if postgres_server.sql(postgres_server.admin_url(), running).strip() == "1":
                    break
            elif list((tmp_path / "job" / "work").glob("plan-*")):
                time.sleep(1)  # the schema is read (LIMIT 0, at once): the query runs now
                break
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        process.kill()
    assert process.returncode == ExitCode.INTERRUPTED, err
    # plan: 'pushsync: interrupted'; run: 'pushsync: error: interrupted while the input was read; nothing ...'
    assert err.splitlines()[-1].startswith("pushsync: ") and "interrupted" in err.splitlines()[-1], err
    assert took < 5, f"exited {took:.1f} s after SIGTERM"
    assert not list((tmp_path / "job" / "work").glob("plan-*"))
    if engine == "postgresql":
        # The query was cancelled, not left to run in the server.
        deadline = time.monotonic() + 5
        while postgres_server.sql(postgres_server.admin_url(), running).strip() != "0":
            assert time.monotonic() < deadline, "the query still runs in the server"
            time.sleep(0.05)


@pytest.mark.parametrize("command", ["plan", "run", "validate"])
def test_sigterm_while_the_table_is_locked_stops_at_once_and_leaves_no_session_waiting(
    command: str, postgres_url: str, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    # A migration holds the table (ALTER TABLE takes an ACCESS EXCLUSIVE lock): the reader's schema call waits
    # for it before any row. It ran outside the reading thread, so SIGTERM was seen only when the lock was
    # released — `pushsync plan` exited 21 s after it, a pod killed after its grace period, its session queued
    # for the lock ahead of every later query on the table. `pushsync validate` read the columns so too.
    import adbc_driver_postgresql.dbapi as pg

    pg_load(postgres_url, users(10, seed=7))
    job = write_job(tmp_path, "http://127.0.0.1:9/rest/3.0/")
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pushsync' AND wait_event_type = 'Lock'"
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pushsync'"
    with pg.connect(postgres_url) as migration, migration.cursor() as cur:
        cur.execute("LOCK TABLE crm.users IN ACCESS EXCLUSIVE MODE")
        process = subprocess.Popen(
            [sys.executable, "-m", "sync", command, str(job)],
            env={**os.environ, URL_ENV: postgres_url, KEY_ENV: "unused-key"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while postgres_server.sql(postgres_server.admin_url(), waiting).strip() != "1":
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "the reader never waited for the lock"
                time.sleep(0.05)
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _out, err = process.communicate(timeout=20)
            took = time.monotonic() - sent
        finally:
            process.kill()
        assert process.returncode == ExitCode.INTERRUPTED, err
        assert took < 5, f"exited {took:.1f} s after SIGTERM"
        # Its session has gone while the lock is still held: nothing waits in the lock's queue.
        deadline = time.monotonic() + 10
        while postgres_server.sql(postgres_server.admin_url(), sessions).strip() != "0":
            assert time.monotonic() < deadline, "the reader's session is still there"
            time.sleep(0.05)
        migration.rollback()


@pytest.mark.parametrize("command", ["plan", "run"])
def test_sigterm_while_connecting_to_a_server_that_does_not_answer_stops_at_once(
    command: str, tmp_path: Path
) -> None:
    # A server that takes the connection and never answers (a firewall, a hung pooler): libpq waits for its
    # connect timeout (15 s). SIGTERM then waited for it, then for the reading thread (10 s more).
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(60)
        url = f"postgresql://crm:not-used-1234@127.0.0.1:{server.getsockname()[1]}/crm"
        job = write_job(tmp_path, "http://127.0.0.1:9/rest/3.0/")
        process = subprocess.Popen(
            [sys.executable, "-m", "sync", command, str(job)],
            env={**os.environ, URL_ENV: url, KEY_ENV: "unused-key"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            connection, _ = server.accept()  # the reader connects, and waits for an answer
            with connection:
                sent = time.monotonic()
                process.send_signal(signal.SIGTERM)
                _out, err = process.communicate(timeout=30)
                took = time.monotonic() - sent
        finally:
            process.kill()
    assert process.returncode == ExitCode.INTERRUPTED, err
    assert took < 5, f"exited {took:.1f} s after SIGTERM"
    assert "not-used-1234" not in err


def test_rejected_rows_name_the_source_its_position_and_id_never_the_password(
    postgres_url: str,
    postgres_server: PostgresServer,
    netmera_sandbox_process: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    pg_load(postgres_url, users(20, seed=9))
    query = (
        "SELECT user_id, name, city, CASE WHEN user_id = 'U0000004' THEN 'many' ELSE score::text END AS score, "
        "vip, plan, segments, email_opt_in, news_opt_in FROM crm.users ORDER BY user_id"
    )
    monkeypatch.setenv(URL_ENV, postgres_url)
    job_path = write_job(tmp_path, netmera_sandbox_process.url, what=f'query: "{query}"')
    assert main(["plan", str(job_path)]) == ExitCode.OK
    out = capsys.readouterr().out
    label = f"users (postgresql://pushsync@127.0.0.1:{postgres_server.port}/{postgres_url.rsplit('/', 1)[1]}, query on crm.users)"
    assert f"Source {label}: 20 rows read" in out
    assert f"{label} result row 5, column score: not a number (ext_id U0000004)" in out
    rejects = (tmp_path / "work" / "rejects.csv").read_text(encoding="utf-8")
    assert list(csv.reader(rejects.splitlines()))[1:] == [[label, "5", "score", "not a number", "U0000004"]]
    assert main(["plan", str(job_path), "--output", "json"]) == ExitCode.OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["sources"]["users"]["database"] == label
    for text in (out, rejects, json.dumps(doc)):
        assert postgres_server.password not in text

    # A run, logging at debug level: the password is in no line printed and no byte of the workdir (ledger,
    # rejects, state) — the label with the row is in the ledger.
    done = subprocess.run(
        [sys.executable, "-m", "sync", "--log-level", "debug", "--log-json", "run", str(job_path)],
        env={**os.environ, KEY_ENV: netmera_sandbox_process.api_key},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == ExitCode.PARTIAL, done.stderr  # one row rejected, the rest sent
    assert '"event": "run.start"' in done.stderr or "run.start" in done.stderr
    assert postgres_server.password not in done.stdout + done.stderr
    stored = b"".join(p.read_bytes() for p in (tmp_path / "work").rglob("*") if p.is_file())
    assert label.encode() in stored and postgres_server.password.encode() not in stored


def test_validate_checks_the_columns_without_reading_a_row(
    postgres_url: str,
    postgres_server: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    pg_load(postgres_url, users(5, seed=2))
    # Every row fails when read (division by zero per row): validate passes because it reads none; plan does not.
    query = (
        "SELECT user_id, name, city, score / (length(name) - length(name)) AS score, vip, plan, segments, "
        "email_opt_in, news_opt_in FROM crm.users"
    )
    monkeypatch.setenv(URL_ENV, postgres_url)
    job_path = write_job(tmp_path, "http://127.0.0.1:9/rest/3.0/", what=f'query: "{query}"')
    assert main(["validate", str(job_path)]) == ExitCode.OK
    assert main(["plan", str(job_path)]) == ExitCode.BAD_JOB_OR_INPUT
    assert "division by zero" in capsys.readouterr().err

    typed = query.replace("score / (length(name) - length(name))", "now()")
    job_path.write_text(job_path.read_text(encoding="utf-8").replace(query, typed), encoding="utf-8")
    assert main(["validate", str(job_path)]) == ExitCode.BAD_JOB_OR_INPUT
    out = capsys.readouterr().out
    assert "column 'score' is timestamptz in the query's result, which cannot hold a number" in out


# --- bad input: one clear error, exit code 2, nothing sent -------------------------------------------------------


async def run_cli(job: Path) -> int:
    """``pushsync run JOB`` in a thread (the CLI runs its own event loop; the sandbox serves on the test's)."""
    return int(await asyncio.to_thread(main, ["run", str(job)]))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("refused port", "cannot connect to the database: connection to server at"),
        (
            "refused password",
            'the database refused the login: password authentication failed for user "pushsync"',
        ),
        ("no such database", "does not exist"),
        ("syntax error", 'the database refused the query: syntax error at or near "SELEKT" (SQLSTATE 42601)'),
        ("missing table", 'relation "crm.nosuch" does not exist (SQLSTATE 42P01)'),
        ("missing column", "column(s) 'plan' named by source 'users' are not in the query's result"),
        ("type does not fit", "column 'score' is bytea in the query's result, which cannot hold a number"),
        ("float id", "column 'user_id' is float8 in the query's result, which cannot hold the external ID"),
        ("dropped mid-stream", "the database connection failed after"),
        # A statement ended by the server mid-stream (a statement timeout, an error at some row) is no lost
        # connection: "the database connection failed after 114432 rows: division by zero" misled.
        ("fails mid-stream", "the query failed after"),
        (
            "unparseable url",
            "the PostgreSQL URL from environment variable PUSHSYNC_TEST_CRM_URL cannot be parsed",
        ),
    ],
)
async def test_bad_postgres_input_ends_in_one_clear_error_and_nothing_is_sent(
    case: str,
    expected: str,
    postgres_url: str,
    postgres_server: PostgresServer,
    netmera_sandbox: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    pg_load(postgres_url, users(50, seed=4))
    url, what = postgres_url, "table: crm.users"
    all_columns = "user_id, name, city, score, vip, plan, segments, email_opt_in, news_opt_in"
    if case == "refused port":
        url = postgres_url.replace(f":{postgres_server.port}/", ":1/")
    elif case == "refused password":
        url = postgres_url.replace(postgres_server.password, "not-the-password")
    elif case == "no such database":
        url = postgres_url.rsplit("/", 1)[0] + "/nosuch"
    elif case == "syntax error":
        what = "query: SELEKT * FROM crm.users"
    elif case == "missing table":
        what = "table: crm.nosuch"
    elif case == "missing column":
        what = "query: SELECT user_id, name, city, score, vip, segments, email_opt_in, news_opt_in FROM crm.users"
    elif case == "type does not fit":
        what = f"query: SELECT {all_columns.replace('score', 'score::text::bytea AS score')} FROM crm.users"
    elif case == "float id":
        what = f"query: SELECT {all_columns.replace('user_id', '1.5::float8 AS user_id')} FROM crm.users"
    elif case == "dropped mid-stream":
        # The server ends the session itself after sending part of the result: a connection lost mid-stream
        # (while the rows are copied out, not while the planner counts them first).
        what = (
            "query: SELECT 'U' || g AS user_id, repeat('x', 200) AS name, 'c' AS city, g AS score, true AS vip, "
            "CASE WHEN g = 150000 AND left(current_query(), 20) NOT LIKE '%count%' "
            "THEN pg_terminate_backend(pg_backend_pid())::text "
            "ELSE 'p' END AS plan, "
            "ARRAY['a'] AS segments, true AS email_opt_in, true AS news_opt_in FROM generate_series(1, 200000) g"
        )
    elif case == "fails mid-stream":
        what = (
            "query: SELECT 'U' || g AS user_id, repeat('x', 200) AS name, 'c' AS city, 100 / (150000 - g) AS score, "
            "true AS vip, 'p' AS plan, ARRAY['a'] AS segments, true AS email_opt_in, true AS news_opt_in "
            "FROM generate_series(1, 200000) g"
        )
    elif case == "unparseable url":
        url = postgres_url.replace("127.0.0.1", "[::1")
    monkeypatch.setenv(URL_ENV, url)
    monkeypatch.setenv(KEY_ENV, netmera_sandbox.api_key)
    code = await run_cli(write_job(tmp_path, netmera_sandbox.url, what=what))
    captured = capsys.readouterr()
    assert code == ExitCode.BAD_JOB_OR_INPUT, captured.err
    assert expected in captured.err
    assert captured.err.count("pushsync: error:") == 1
    assert postgres_server.password not in captured.err + captured.out
    assert requests_sent(netmera_sandbox) == 0


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing file", "database file not found:"),
        ("not a duckdb file", "cannot open the DuckDB database"),
        ("missing table", "Table with name nosuch does not exist"),
        ("type does not fit", "column 'vip' is DATE in the query's result, which cannot hold a boolean"),
    ],
)
async def test_bad_duckdb_input_ends_in_one_clear_error_and_nothing_is_sent(
    case: str,
    expected: str,
    netmera_sandbox: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    database = tmp_path / "sales.duckdb"
    duck_load(database, users(30, seed=6))
    what = "table: crm.users"
    if case == "missing file":
        database = tmp_path / "elsewhere.duckdb"
    elif case == "not a duckdb file":
        database = tmp_path / "job.txt"
        database.write_text("hello", encoding="utf-8")
    elif case == "missing table":
        what = "table: crm.nosuch"
    elif case == "type does not fit":
        what = "query: SELECT * REPLACE (DATE '2024-01-01' AS vip) FROM crm.users"
    monkeypatch.setenv(KEY_ENV, netmera_sandbox.api_key)
    code = await run_cli(
        write_job(tmp_path, netmera_sandbox.url, database=f"duckdb:///{database}", what=what)
    )
    captured = capsys.readouterr()
    assert code == ExitCode.BAD_JOB_OR_INPUT and expected in captured.err, captured.err
    assert requests_sent(netmera_sandbox) == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"\x00\x01", "row 3, column 'name': a BLOB (binary) value"),
        (12.0, "row 3, column 'user_id': the external ID is a REAL number, which would be sent as 12.0"),
    ],
)
def test_a_sqlite_value_of_the_wrong_kind_stops_the_read_naming_row_and_column(
    value: Any, expected: str, tmp_path: Path
) -> None:
    database = tmp_path / "crm.db"
    with sqlite3.connect(database) as con:
        con.execute(
            "CREATE TABLE users (user_id, name, city, score, vip, plan, segments, email_opt_in, news_opt_in)"
        )
        rows = [(f"U{i}", f"n{i}", "c", i, 1, "p", "a|b", 1, 0) for i in range(5)]
        column = 1 if isinstance(value, bytes) else 0
        rows[2] = tuple(value if i == column else v for i, v in enumerate(rows[2]))
        con.executemany("INSERT INTO users VALUES (?,?,?,?,?,?,?,?,?)", rows)
    job = load_job(
        write_job(
            tmp_path, "http://127.0.0.1:9/rest/3.0/", database=f"sqlite:///{database}", what="table: users"
        )
    )
    with pytest.raises(BadInputError) as caught:
        build_plan(job)
    assert expected in str(caught.value)
    assert str(caught.value).startswith(f"users (sqlite file {database}, table users), row 3")


@pytest.mark.parametrize("engine", ["postgresql", "duckdb"])
@pytest.mark.parametrize(("column", "mapping"), [("born", "date"), ("seen", "string")])
def test_an_infinite_date_stops_the_read_naming_row_and_column(
    engine: str,
    column: str,
    mapping: str,
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    """PostgreSQL's (and DuckDB's) ``infinity`` dates and timestamps: ADBC wrapped them into a day five million
    years BC, sent as the user's date; mapped as text, polars panicked (a traceback, exit 1)."""
    values = "('U1', DATE '2001-02-03', TIMESTAMP '2024-03-01 12:00'), ('U2', 'infinity', '-infinity'), "
    values += "('U3', '-infinity', 'infinity')"
    query = f"SELECT * FROM (VALUES {values}) AS t(user_id, born, seen) ORDER BY user_id"
    if engine == "postgresql":
        monkeypatch.setenv(URL_ENV, postgres_url)
        database = f"{{env: {URL_ENV}}}"
    else:
        duckdb.connect(str(tmp_path / "crm.duckdb")).close()
        database = "duckdb:///crm.duckdb"
    job = tmp_path / "job.yaml"
    job.write_text(
        "version: 1\nname: inf\nworkdir: work\n"
        'destination: {platform: netmera, base_url: "http://127.0.0.1:9/rest/3.0/", secret: {env: K}}\n'
        f'sources:\n  - name: users\n    database: {database}\n    query: "{query}"\n    ext_id: user_id\n'
        f"    attributes: {{{column}: {mapping}}}\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    code = main(["plan", "job.yaml"])
    err = capsys.readouterr().err
    assert code == ExitCode.BAD_JOB_OR_INPUT, err
    assert f"row 2, column '{column}': a date outside years 1-9999" in err
    assert err.startswith("pushsync: error: users (") and err.count("\n") == 1, err


@pytest.mark.parametrize("engine", ["postgresql", "duckdb", "sqlite"])
def test_a_query_whose_last_line_ends_in_a_comment_is_read(
    engine: str, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """The reader wraps the query (COPY (...), count(*) FROM (...)): a last line ending in ``-- ...`` commented
    out the closing parenthesis. validate said OK, then plan and run stopped on "syntax error at end of input"."""
    database = {
        "postgresql": f"{{env: {URL_ENV}}}",
        "duckdb": "duckdb:///crm.duckdb",
        "sqlite": "sqlite:///crm.db",
    }[engine]
    monkeypatch.setenv(URL_ENV, postgres_url)
    duckdb.connect(str(tmp_path / "crm.duckdb")).close()
    sqlite3.connect(tmp_path / "crm.db").close()
    job = tmp_path / "job.yaml"
    job.write_text(
        "version: 1\nname: commented\nworkdir: work\n"
        'destination: {platform: netmera, base_url: "http://127.0.0.1:9/rest/3.0/", secret: {env: K}}\n'
        f"sources:\n  - name: users\n    database: {database}\n    query: |\n"
        "      -- everyone\n      SELECT 'U1' AS user_id, 'Ada' AS name -- one row;\n"
        "      UNION ALL SELECT 'U2', 'Bob'; -- and another\n"
        "    ext_id: user_id\n    attributes: {name: string}\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "job.yaml"]) == 0
    code = main(["plan", "job.yaml", "--output", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out[out.index("{") :])["rows"]["read"] == 2


# --- the URL and its password ------------------------------------------------------------------------------------


def test_a_password_written_in_the_job_is_refused_without_repeating_it(tmp_path: Path) -> None:
    secret = "hunter2-" + "x" * 8
    for spec in (
        f'"postgresql://crm:{secret}@db.example:5432/crm"',
        f'"postgresql://crm@db.example/crm?password={secret}"',
        f'["postgresql://crm:{secret}@db.example/crm"]',
    ):
        path = write_job(tmp_path, "http://127.0.0.1:9/rest/3.0/", database=spec)
        with pytest.raises(BadJobError) as caught:
            load_job(path)
        assert [p.location for p in caught.value.problems] == ["sources[0].database"]
        assert secret not in str(caught.value)


def test_a_url_without_password_may_be_written_and_the_url_is_resolved_from_env_or_file(
    postgres_url: str, postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg_load(postgres_url, users(10, seed=8))
    (tmp_path / "db-url").write_text(postgres_url + "\n", encoding="utf-8")
    job = load_job(write_job(tmp_path, "http://127.0.0.1:9/rest/3.0/", database="{file: db-url}"))
    with build_plan(job) as plan:
        assert plan.staged[0].rows_clean == 10
        assert postgres_server.password not in repr(job) + plan.staged[0].files[0]
    # The URL from the file is masked whole, its password in pieces too — not its host, port or database:
    # registered in pieces, what a platform answered lost every 8-character run of them ("127.0.0.", "pushsync").
    where = postgres_url.rsplit("@", 1)[1]
    answer = f"HTTP 301: moved to http://{where}/v2 for pushsync"
    assert redact_pieces(answer) == answer
    assert redact(f"connecting to {postgres_url}") == "connecting to ***"
    assert postgres_server.password[2:-2] not in redact_pieces(f"it echoed {postgres_server.password[2:-2]}")

    monkeypatch.delenv(URL_ENV, raising=False)
    job = load_job(write_job(tmp_path, "http://127.0.0.1:9/rest/3.0/"))
    with pytest.raises(
        Exception, match=f"source 'users': the database URL: environment variable {URL_ENV} is not set"
    ):
        build_plan(job)
    # A literal URL without a password passes the loader (the password would come from PGPASSWORD or ~/.pgpass).
    literal = write_job(
        tmp_path, "http://127.0.0.1:9/rest/3.0/", database="postgresql://crm@db.example:5432/crm"
    )
    assert load_job(literal).sources[0].sql is not None


def test_a_password_with_a_hash_or_question_mark_logs_in_as_libpq_reads_it(
    postgres_url: str,
    postgres_server: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    # libpq reads a URL's password as written up to the "@", so a generated password with "#" or "?" works in
    # psql; the reader parsed the URL as a web address (the host ending at the "#"): 'the PostgreSQL URL ...
    # cannot be parsed', or, with digits before the "#", a connection to the host "crm" whose label showed them.
    database = postgres_url.rsplit("/", 1)[1]
    role, password = f"hashed_{database}", "1234#Zq9?kL:x1+y"
    postgres_server.sql(postgres_server.admin_url(), f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    where = f"127.0.0.1:{postgres_server.port}/{database}"
    monkeypatch.setenv(URL_ENV, f"postgresql://{role}:{password}@{where}")
    job = query_job(
        tmp_path, f"{{env: {URL_ENV}}}", "SELECT 'U1' AS user_id, current_user AS who", "who: string"
    )
    with build_plan(load_job(job)) as plan:
        assert next(plan.staged[0].frames(["who"]))["who"].to_list() == [role]
        assert plan.staged[0].files == (f"users (postgresql://{role}@{where}, query)",)
    # A wrong one is refused by the server, and no part of it is shown.
    monkeypatch.setenv(URL_ENV, f"postgresql://{role}:{password.replace('y', 'z')}@{where}")
    assert main(["plan", str(job)]) == ExitCode.BAD_JOB_OR_INPUT
    err = capsys.readouterr().err
    assert f'the database refused the login: password authentication failed for user "{role}"' in err
    assert "1234" not in err and "Zq9" not in err


def test_a_url_naming_several_hosts_connects_to_the_first_that_answers(
    postgres_url: str, postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libpq's URL for a primary and its standby (host1:5432,host2:5432, with target_session_attrs): urllib could
    # not read its port, so the source stopped with "the PostgreSQL URL ... cannot be parsed", where psql connects.
    database = postgres_url.rsplit("/", 1)[1]
    hosts = f"127.0.0.1:1,127.0.0.1:{postgres_server.port}"  # nothing listens on port 1
    url = (
        f"postgresql://pushsync:{postgres_server.password}@{hosts}/{database}?target_session_attrs=read-write"
    )
    monkeypatch.setenv(URL_ENV, url)
    job = query_job(tmp_path, f"{{env: {URL_ENV}}}", "SELECT 'U1' AS user_id, 'Ada' AS name", "name: string")
    with build_plan(load_job(job)) as plan:
        assert plan.staged[0].rows_clean == 1
        assert plan.staged[0].files == (f"users (postgresql://pushsync@{hosts}/{database}, query)",)


def test_the_urls_own_parameters_reach_the_server_as_written(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A statement timeout for the sync's session, as PostgreSQL's manual writes it in a URL: the reader decoded
    # the URL's parameters and encoded them again, a space as "+", which libpq reads as a plus sign. The run
    # stopped at once: 'cannot connect to the database: unrecognized configuration parameter "+statement_timeout"'.
    monkeypatch.setenv(
        URL_ENV, postgres_url + "?options=-c%20statement_timeout%3D1500&application_name=crm%20sync"
    )
    query = "SELECT 'U1' AS user_id, current_setting('statement_timeout') || ', ' || current_setting('application_name') AS seen"
    job = query_job(tmp_path, f"{{env: {URL_ENV}}}", query, "seen: string")
    with build_plan(load_job(job)) as plan:
        assert next(plan.staged[0].frames(["seen"]))["seen"].to_list() == ["1500ms, crm sync"]


def test_postgres_and_duckdb_types_arrive_as_the_values_they_hold(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """numeric, uuid, timestamptz, date, arrays, JSON, booleans, ENUMs and HUGEINTs become what the mapping says."""
    columns = {
        "user_id": "text",
        "score": "number",
        "u": "string",
        "seen": "date",
        "born": "date",
        "labels": "list",
        "doc": "string",
        "flag": "boolean",
    }
    attributes = ", ".join(f"{c}: {t}" for c, t in columns.items() if c != "user_id")
    job_text = (
        "version: 1\nname: types\nworkdir: work\n"
        'destination: {platform: netmera, base_url: "http://127.0.0.1:9/rest/3.0/", secret: {env: K}}\n'
        "sources:\n  - name: users\n    database: DATABASE\n    query: QUERY\n    ext_id: user_id\n"
        f"    attributes: {{{attributes}}}\n"
    )
    pg_query = (
        '"SELECT 42::bigint AS user_id, 12.50::numeric(6,2) AS score, '
        "'6514eb5d-aec7-44df-be9c-4bc1af819aca'::uuid AS u, '2024-03-01 12:00:00+02'::timestamptz AS seen, "
        "'2001-02-03'::date AS born, ARRAY[1, 2] AS labels, '{\\\"a\\\": 1}'::jsonb AS doc, 1 AS flag\""
    )
    monkeypatch.setenv(URL_ENV, postgres_url)
    path = tmp_path / "pg.yaml"
    path.write_text(
        job_text.replace("DATABASE", f"{{env: {URL_ENV}}}").replace("QUERY", pg_query), encoding="utf-8"
    )
    expected = {
        "__ext_id": "42",
        "score": 12.5,
        "u": "6514eb5d-aec7-44df-be9c-4bc1af819aca",
        "seen": 1709287200000,
        "born": 981158400000,
        "labels": ["1", "2"],
        "doc": '{"a": 1}',
        "flag": True,
    }
    with build_plan(load_job(path)) as plan:
        row = next(plan.staged[0].frames(list(columns)[1:])).drop("__file", ROW).row(0, named=True)
    assert row == expected

    con = duckdb.connect(str(tmp_path / "types.duckdb"))
    con.execute("CREATE TYPE mood AS ENUM ('calm', 'busy')")
    con.close()
    duck_query = (
        "\"SELECT 42::HUGEINT AS user_id, 12.5::DECIMAL(6,2) AS score, 'calm'::mood AS u, "
        "TIMESTAMPTZ '2024-03-01 12:00:00+02' AS seen, DATE '2001-02-03' AS born, [1, 2] AS labels, "
        '\'{\\"a\\": 1}\' AS doc, true AS flag"'
    )
    path = tmp_path / "duck.yaml"
    path.write_text(
        job_text.replace("DATABASE", "duckdb:///types.duckdb").replace("QUERY", duck_query), encoding="utf-8"
    )
    with build_plan(load_job(path)) as plan:
        row = next(plan.staged[0].frames(list(columns)[1:])).drop("__file", ROW).row(0, named=True)
    assert row == {**expected, "u": "calm"}


def query_job(directory: Path, database: str, query: str, attributes: str) -> Path:
    """A job of one users source reading ``query`` from ``database``, its ID in ``user_id`` (nothing is sent)."""
    job = directory / "job.yaml"
    job.write_text(
        "version: 1\nname: q\nworkdir: work\n"
        'destination: {platform: netmera, base_url: "http://127.0.0.1:9/rest/3.0/", secret: {env: K}}\n'
        f"sources:\n  - name: users\n    database: {database}\n    query: {json.dumps(query)}\n"
        f"    ext_id: user_id\n    attributes: {{{attributes}}}\n",
        encoding="utf-8",
    )
    return job


@pytest.mark.parametrize("mapping", ["number", "string"])
def test_a_money_column_is_refused_not_sent_in_cents(
    mapping: str, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # ADBC gives PostgreSQL's money as its count of cents: 12.50 was sent as 1250 (or "1250"), with exit 0.
    monkeypatch.setenv(URL_ENV, postgres_url)
    query = "SELECT 'U1' AS user_id, 12.50::money AS spent"
    job = query_job(tmp_path, f"{{env: {URL_ENV}}}", query, f"spent: {mapping}")
    expected = (
        "column 'spent' is money in the query's result, which arrives as cents (12.50 as 1250); convert it in "
        "the query (e.g. CAST(spent AS NUMERIC))"
    )
    for command in ("validate", "plan"):
        code = main([command, str(job)])
        out, err = capsys.readouterr()
        assert code == ExitCode.BAD_JOB_OR_INPUT, out + err
        assert expected in out + err
    job = query_job(
        tmp_path, f"{{env: {URL_ENV}}}", query.replace("::money", "::money::numeric"), f"spent: {mapping}"
    )
    with build_plan(load_job(job)) as plan:
        assert next(plan.staged[0].frames(["spent"]))["spent"].to_list() == [
            12.5 if mapping == "number" else "12.50"
        ]


@pytest.mark.parametrize("engine", ["duckdb", "sqlite"])
def test_a_mapped_column_named_twice_in_the_result_is_refused_not_read_from_the_last(
    engine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # SELECT u.*, p.* over two tables that both have user_id: the columns were checked through a sub-select,
    # where DuckDB and SQLite rename the second (user_id_1, user_id:1), so the check passed and the reading took
    # the last column of the name — profile U2's values were sent as user U1's. PostgreSQL refused it already.
    duckdb.connect(str(tmp_path / "crm.duckdb")).close()
    sqlite3.connect(tmp_path / "crm.db").close()
    database = {"duckdb": "duckdb:///crm.duckdb", "sqlite": "sqlite:///crm.db"}[engine]
    query = "SELECT 'U1' AS user_id, 'Ada' AS name, 'U2' AS user_id"
    job = query_job(tmp_path, database, query, "name: string")
    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(job)]) == ExitCode.BAD_JOB_OR_INPUT
    err = capsys.readouterr().err
    assert "column 'user_id': the query's result has several columns named 'user_id'" in err, err
    if (
        engine == "duckdb"
    ):  # SQLite gives the names as the query does only once it runs: plan and run see them
        assert main(["validate", str(job)]) == ExitCode.BAD_JOB_OR_INPUT
        assert "several columns named 'user_id'" in capsys.readouterr().out


def test_arrays_of_uuid_numeric_and_jsonb_arrive_as_lists_of_their_text(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Their items are Arrow extension types, which polars cannot take: a uuid[] column mapped as a list (or as
    # tags) ended the plan in "internal error: ComputeError: invalid utf8", numeric[] and jsonb[] in "cannot
    # cast extension types to String" (exit 5, a traceback). 60,000 rows: record batches cut into chunks.
    import hashlib
    import uuid

    monkeypatch.setenv(URL_ENV, postgres_url)
    query = (
        "SELECT 'U' || g AS user_id, CASE WHEN g % 7 = 0 THEN NULL ELSE ARRAY[md5(g::text)::uuid, NULL] END "
        "AS ids, ARRAY[g / 4.0, 1] AS scores, ARRAY[jsonb_build_object('g', g)] AS docs "
        "FROM generate_series(1, 60000) g ORDER BY g"
    )
    job = query_job(tmp_path, f"{{env: {URL_ENV}}}", query, "ids: list, scores: list, docs: list")
    chunks = list(SqlReader(load_job(job).sources[0]).chunks())
    assert len(chunks) == 2
    frame = pl.concat([c.frame for c in chunks])
    assert frame[ROW].to_list() == list(range(1, 60001))
    expected = [
        None if g % 7 == 0 else [str(uuid.UUID(hashlib.md5(str(g).encode()).hexdigest())), None]
        for g in range(1, 60001)
    ]
    assert frame["ids"].to_list() == expected
    assert frame["scores"][:2].to_list() == [["0.25000000000000000000", "1"], ["0.50000000000000000000", "1"]]
    assert frame["docs"][59999].to_list() == ['{"g": 60000}']


@pytest.mark.parametrize(
    ("value", "mapping", "fix"),
    [
        ("'NaN'::numeric", "string", "make it NULL in the query (e.g. NULLIF(v, 'NaN'))"),
        ("'-Infinity'::numeric", "string", "make it NULL in the query (e.g. NULLIF(v, 'NaN'))"),
        ("ARRAY[1, 'Infinity'::numeric]", "list", "remove it in the query (e.g. array_remove(v, 'NaN'))"),
    ],
)
def test_a_numeric_nan_or_infinity_read_as_text_stops_the_read_naming_row_and_column(
    value: str,
    mapping: str,
    fix: str,
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    # ADBC gives PostgreSQL's numeric as its text: a NaN mapped as a string was sent as the text "nan" (an
    # infinity as "inf"), where a float's NaN rejects its row. Mapped as a number, the row is rejected as before.
    monkeypatch.setenv(URL_ENV, postgres_url)
    first = "ARRAY[2.5::numeric]" if mapping == "list" else "2.5::numeric"
    query = f"SELECT 'U1' AS user_id, {first} AS v UNION ALL SELECT 'U2', {value} ORDER BY 1"
    job = query_job(tmp_path, f"{{env: {URL_ENV}}}", query, f"v: {mapping}")
    assert main(["plan", str(job)]) == ExitCode.BAD_JOB_OR_INPUT
    err = capsys.readouterr().err
    assert (
        f"row 2, column 'v': a numeric NaN or infinity, which would be sent as the text 'nan' or 'inf'; {fix}"
        in err
    )
    if mapping == "string":
        job = query_job(tmp_path, f"{{env: {URL_ENV}}}", query, "v: number")
        with build_plan(load_job(job)) as plan:
            assert [(r.row, r.reason) for r in plan.rejected_rows()] == [(2, "not a number")]


def test_a_text_that_is_not_utf8_stops_the_read_naming_row_and_column(
    postgres_url: str,
    postgres_server: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    # A SQL_ASCII database stores bytes unchecked (Latin-1 names written by an old application), and sends them
    # as they are: the plan ended in a Rust panic and a traceback (exit 1).
    name = postgres_url.rsplit("/", 1)[1] + "_ascii"
    postgres_server.sql(
        postgres_server.admin_url(),
        f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' TEMPLATE template0 OWNER pushsync",
    )
    url = postgres_server.url(name)
    postgres_server.sql(
        url,
        "CREATE TABLE t AS SELECT * FROM (VALUES ('U1', 'Ada', ARRAY['a']), ('U2', E'Caf\\xe9', ARRAY['b']), "
        "('U3', 'Bob', ARRAY[E'n\\xe9e'])) AS v(user_id, name, segments); "
        "CREATE TABLE big AS SELECT 'U' || lpad(g::text, 6, '0') AS user_id, CASE WHEN g = 55000 "
        "THEN ARRAY[E'n\\xe9e'] ELSE ARRAY['a'] END AS segments FROM generate_series(1, 60000) AS g",
    )
    monkeypatch.setenv(URL_ENV, url)
    # The last: a result of two chunks, the row in the second (a list's slice validates the whole batch's items).
    for query, attributes, where in (
        ("SELECT * FROM t ORDER BY user_id", "name: string", "row 2, column 'name'"),
        ("SELECT * FROM t ORDER BY user_id", "segments: list", "row 3, column 'segments'"),
        ("SELECT * FROM big ORDER BY user_id", "segments: list", "row 55000, column 'segments'"),
    ):
        job = query_job(tmp_path, f"{{env: {URL_ENV}}}", query, attributes)
        assert main(["plan", str(job)]) == ExitCode.BAD_JOB_OR_INPUT
        err = capsys.readouterr().err
        assert f"{where}: a text that is not UTF-8 (a SQL_ASCII database holding another encoding?)" in err, (
            err
        )
        assert err.count("\n") == 1, err


@pytest.mark.parametrize("engine", ["postgresql", "duckdb"])
def test_an_array_mapped_as_a_string_is_refused_with_a_hint_that_works(
    engine: str, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # The hint was CAST(segments AS TEXT): followed, '{gold,vip}' (PostgreSQL) or '[gold, vip]' (DuckDB) was
    # sent as the user's value.
    monkeypatch.setenv(URL_ENV, postgres_url)
    duckdb.connect(str(tmp_path / "crm.duckdb")).close()
    database = {"postgresql": f"{{env: {URL_ENV}}}", "duckdb": "duckdb:///crm.duckdb"}[engine]
    query = "SELECT 'U1' AS user_id, ARRAY['gold', 'vip'] AS segments"
    job = query_job(tmp_path, database, query, "segments: string")
    assert main(["validate", str(job)]) == ExitCode.BAD_JOB_OR_INPUT
    out = capsys.readouterr().out
    assert (
        "which cannot hold a text value; convert it in the query (e.g. array_to_string(segments, '|'))" in out
    )
    fixed = query.replace("ARRAY['gold', 'vip']", "array_to_string(ARRAY['gold', 'vip'], '|')")
    job = query_job(tmp_path, database, fixed, "segments: string")
    with build_plan(load_job(job)) as plan:
        assert next(plan.staged[0].frames(["segments"]))["segments"].to_list() == ["gold|vip"]


def test_a_duckdb_timestamptz_mapped_as_a_string_is_the_same_text_whatever_the_machines_time_zone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DuckDB gives a TIMESTAMPTZ in the machine's time zone: the same instant was sent as
    # "2024-03-01 05:00:00.000000-05:00" from a host in New York and "2024-03-01 10:00:00.000000+00:00" from one
    # in UTC (in snapshot mode, every user changed when the job moved). It is the UTC text, as PostgreSQL's is.
    duckdb.connect(str(tmp_path / "crm.duckdb")).close()
    query = "SELECT 'U1' AS user_id, TIMESTAMPTZ '2024-03-01 12:00:00+02' AS seen, TIMESTAMPTZ '2024-03-01 12:00:00+02' AS at"
    job = load_job(query_job(tmp_path, "duckdb:///crm.duckdb", query, "seen: string, at: date"))
    try:
        for zone in ("America/New_York", "Asia/Kolkata", "UTC"):
            monkeypatch.setenv("TZ", zone)
            time.tzset()  # DuckDB takes the machine's zone when it connects
            with build_plan(job) as plan:
                row = next(plan.staged[0].frames(["seen", "at"])).select("seen", "at").row(0)
            assert row == ("2024-03-01 10:00:00.000000+00:00", 1709287200000), zone
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_database_float_nan_mapped_as_a_string_is_not_sent_as_text(tmp_path: Path) -> None:
    # As a Parquet float column's (test_reading): a NaN or infinity rejects its row, never sent as "nan".
    con = duckdb.connect(str(tmp_path / "x.duckdb"))
    con.execute(
        "CREATE TABLE t AS SELECT * FROM (VALUES ('a', 'nan'::DOUBLE, 1.5::REAL), ('b', 2.5, 0.1::REAL), "
        "('c', NULL, '-inf'::REAL)) v(id, s, f)"
    )
    con.close()
    (tmp_path / "job.yaml").write_text(
        "version: 1\nname: t\nworkdir: work\n"
        'destination: {platform: netmera, base_url: "http://127.0.0.1:9/rest/3.0/", secret: {env: K}}\n'
        "sources:\n  - {name: users, database: 'duckdb:///x.duckdb', table: t, ext_id: id, "
        "attributes: {s: string, f: string}}\n",
        encoding="utf-8",
    )
    reason = "not a number (NaN or infinite), in a float column mapped as a string"
    with build_plan(load_job(tmp_path / "job.yaml")) as plan:
        rejects = {r.row: (r.column, r.reason) for r in plan.rejected_rows()}
        clean = next(plan.staged[0].frames(["s", "f"])).select("__ext_id", "s", "f").rows()
    assert rejects == {1: ("s", reason), 3: ("f", reason)}
    assert clean == [("b", "2.5", "0.1")]


def test_a_double_phone_number_or_tag_name_column_is_refused_as_in_parquet(tmp_path: Path) -> None:
    # A phone number stored as a DOUBLE was read as "905312345601.0", whose dot (a separator) was removed:
    # 9053123456010 was sent. A DOUBLE tag name's NaN was the tag "nan". Refused before any row is read, as a
    # Parquet file's float column is, with the cast that fixes it.
    con = duckdb.connect(str(tmp_path / "x.duckdb"))
    con.execute("CREATE TABLE t AS SELECT 'a' AS id, 905312345601.0::DOUBLE AS phone, 'nan'::DOUBLE AS tag")
    con.close()
    (tmp_path / "job.yaml").write_text(
        "version: 1\nname: t\nworkdir: work\n"
        'destination: {platform: netmera, base_url: "http://127.0.0.1:9/rest/3.0/", secret: {env: K}}\n'
        "sources:\n  - {name: users, database: 'duckdb:///x.duckdb', table: t, ext_id: id, msisdn: phone}\n"
        "  - {name: tags, kind: tags, database: 'duckdb:///x.duckdb', table: t, ext_id: id, tag: tag}\n",
        encoding="utf-8",
    )
    with pytest.raises(BadInputError) as info:
        build_plan(load_job(tmp_path / "job.yaml"))
    message = str(info.value)
    assert (
        "column 'phone' is DOUBLE in the query's result, which cannot hold an e-mail address, MSISDN"
        in message
    )
    assert "CAST(phone AS BIGINT)" in message
    lines = (tmp_path / "job.yaml").read_text(encoding="utf-8").splitlines()
    (tmp_path / "job.yaml").write_text(
        "\n".join(lines[:5] + lines[6:]) + "\n", encoding="utf-8"
    )  # tags alone
    with pytest.raises(
        BadInputError, match="column 'tag' is DOUBLE in the query's result, which cannot hold"
    ):
        build_plan(load_job(tmp_path / "job.yaml"))
    # SQLite declares no types: a REAL value stops the read, naming its row and column, as in the ID column.
    with contextlib.closing(sqlite3.connect(tmp_path / "x.db")) as lite, lite:
        lite.execute("CREATE TABLE t (id, phone)")
        lite.executemany("INSERT INTO t VALUES (?, ?)", [("a", "+905312345601"), ("b", 905312345602.0)])
    (tmp_path / "job.yaml").write_text(
        "\n".join(lines[:5])
        + "\n  - {name: users, database: 'sqlite:///x.db', table: t, ext_id: id, msisdn: phone}\n",
        encoding="utf-8",
    )
    with pytest.raises(BadInputError) as info:
        build_plan(load_job(tmp_path / "job.yaml"))
    assert "row 2, column 'phone': an MSISDN is a REAL number, which would be sent as 905312345602.0" in str(
        info.value
    )


def test_a_database_source_is_checked_for_every_problem_at_once(tmp_path: Path) -> None:
    text = """\
version: 1
destination: {platform: netmera, base_url: "http://127.0.0.1:9/rest/3.0/", secret: {env: K}}
sources:
  - {name: a, database: "duckdb:///x.duckdb", ext_id: id, attributes: {n: string}}
  - {name: b, database: "duckdb:///x.duckdb", query: "SELECT 1", table: t, ext_id: id, attributes: {n: string}}
  - {name: c, database: "duckdb:///x.duckdb", table: "t; DROP TABLE t", ext_id: id, attributes: {n: string}}
  - {name: d, database: "mysql://db/crm", query: " ; ", ext_id: id, attributes: {n: string}}
  - {name: e, database: "sqlite:///x.db", path: x.csv, delimiter: ";", table: t, ext_id: id, attributes: {n: string}}
  - {name: f, query: "SELECT 1", ext_id: id, attributes: {n: string}}
"""
    (tmp_path / "job.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(BadJobError) as caught:
        load_job(tmp_path / "job.yaml")
    assert sorted(str(p) for p in caught.value.problems) == sorted(
        [
            "sources[0]: a database source gives exactly one of 'query' or 'table'",
            "sources[1]: a database source gives exactly one of 'query' or 'table'",
            "sources[2].table: not a table name: give table, schema.table or catalog.schema.table "
            '(quote a part that needs it: "My Table"); use query: for anything else',
            "sources[3].database: not a database URL: use postgresql://..., duckdb:///path/file.duckdb or "
            "sqlite:///path/file.db",
            "sources[3].query: the query is empty",
            "sources[4].path: not used by a source that reads a database",
            "sources[4].delimiter: not used by a source that reads a database",
            "sources[5].database: a source with a query or table names its database",
        ]
    )
    ok = (
        text.split("  - {name: a")[0]
        + '  - {name: a, database: "sqlite:///x.db", table: \'crm."My Users"\', ext_id: id, attributes: {n: string}}\n'
    )
    (tmp_path / "job.yaml").write_text(ok, encoding="utf-8")
    source = load_job(tmp_path / "job.yaml").sources[0]
    assert source.sql is not None and source.sql.table == 'crm."My Users"' and source.paths == ()
    assert source.null_values == ("",)  # SQL NULL and empty text; 'N/A' in a database column is a value
