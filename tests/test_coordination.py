"""Several workers, one job, on a real PostgreSQL server (tests/pg_fixture.py) and Netmera sandbox processes:
``pushsync run`` with ``PUSHSYNC_DATABASE_URL`` (docs/scaling.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, NetmeraProcess
from tests.pg_fixture import PostgresServer
from tests.sandbox_fixtures import start_sandbox_process, stop_sandbox_process
from tests.test_crash_resume import applied, expected_users, minimal_applications, sandbox_users, write_users

BATCH = 40


def job_text(
    url: str, *, budget: str = "", lease: float = 2, concurrency: int = 4, name: str = "scale"
) -> str:
    return f"""\
version: 1
name: {name}
workdir: work
destination:
  platform: netmera
  base_url: {url}
  secret: {{env: NETMERA_API_KEY}}
sources:
  - name: users
    path: users.csv
    ext_id: id
    attributes:
      name: string
      score: number
      city: {{on_null: unset}}
    tags: {{column: segments}}
    opt_ins:
      email: mail
      categories: {{News: news}}
coordination: {{lease: {lease}}}
dispatch:
  concurrency: {concurrency}
  batch_size: {BATCH}
  request_timeout: 2
  drain_timeout: 2
  retry: {{max_attempts: 8, base_delay: 0.05, max_delay: 0.2}}
{budget}"""


def worker(
    tmp: Path, key: str, db_url: str | None, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    extra = {"PUSHSYNC_DATABASE_URL": db_url} if db_url else {}
    return subprocess.Popen(
        [sys.executable, "-m", "sync", *args],
        cwd=tmp,
        env={**os.environ, "NETMERA_API_KEY": key, "PYTHONPATH": str(REPO_ROOT), **extra, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_one_worker_on_postgres_sends_the_job_and_the_ledger_commands_read_it(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess, postgres_url: str
) -> None:
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(job_text(sandbox.url), encoding="utf-8")
    rows = write_users(tmp_path, range(400))
    code, out, err = finish(
        worker(
            tmp_path,
            sandbox.api_key,
            postgres_url,
            "run",
            "job.yaml",
            "--progress",
            "none",
            "--output",
            "json",
        )
    )
    assert code == 0, (out, err)
    doc = json.loads(out)
    assert doc["totals"]["requests"] > 0 and doc["totals"]["batches_unfinished"] == 0
    assert sandbox_users(sandbox) == expected_users(rows)
    assert not (tmp_path / "work" / "ledger.sqlite").exists()  # the ledger is in PostgreSQL
    run_id = doc["run_id"]
    code, out, err = finish(worker(tmp_path, sandbox.api_key, postgres_url, "runs", "--output", "json"))
    assert code == 0, err
    runs = json.loads(out)
    assert [r["run_id"] for r in runs] == [run_id] and runs[0]["status"] == "done"
    code, out, err = finish(
        worker(tmp_path, sandbox.api_key, postgres_url, "show", "latest", "--output", "json")
    )
    assert code == 0, err
    assert json.loads(out)["summary"]["totals"]["requests"] == doc["totals"]["requests"]
    code, out, err = finish(worker(tmp_path, sandbox.api_key, postgres_url, "report", run_id, "-o", "r.html"))
    assert code == 0, err
    assert run_id in (tmp_path / "r.html").read_text(encoding="utf-8")
    code, out, err = finish(
        worker(tmp_path, sandbox.api_key, postgres_url, "trace", "user00007", "--output", "json")
    )
    assert code == 0, err
    traced = json.loads(out)
    assert traced and {e["run_id"] for e in traced} == {run_id} and {e["status"] for e in traced} == {"ok"}
    code, out, err = finish(
        worker(
            tmp_path,
            sandbox.api_key,
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
        worker(
            tmp_path, sandbox.api_key, postgres_url, "run", "job.yaml", "--run-id", run_id, "--output", "json"
        )
    )
    assert code == 0, err
    assert json.loads(out)["run_id"] == run_id and sum(applied(sandbox).values()) == before


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


def _sandbox_stats(sandbox: NetmeraProcess) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{sandbox.root_url}/_sandbox/stats", timeout=10) as resp:
        return dict(json.loads(resp.read()))


def _query(server: PostgresServer, url: str, sql: str) -> list[list[str]]:
    return [line.split("|") for line in server.sql(url, sql).splitlines() if line]


def test_three_workers_share_one_job_and_one_budget_and_survive_a_kill_9(
    tmp_path: Path,
    account_limited_sandbox: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    sandbox = account_limited_sandbox
    budget = f'  budget_groups: {{account: {{requests: {LIMIT}, per: 1s, endpoints: ["*"]}}}}\n'
    (tmp_path / "job.yaml").write_text(job_text(sandbox.url, budget=budget, lease=3), encoding="utf-8")
    users = 2400
    rows = write_users(tmp_path, range(users))
    procs = [
        worker(
            tmp_path,
            sandbox.api_key,
            postgres_url,
            "run",
            "job.yaml",
            "--progress",
            "none",
            "--output",
            "json",
        )
        for _ in range(3)
    ]
    # SIGKILL the worker with the most requests in flight once a fifth of the batches are confirmed.
    victim = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and victim is None:
        time.sleep(0.05)
        try:
            counts = _query(
                postgres_server,
                postgres_url,
                "SELECT count(*) FILTER (WHERE status = 'ok'), count(*) FROM pushsync.batches",
            )
        except RuntimeError:
            continue  # the tables are not there yet
        ok, total = (int(v) for v in counts[0])
        if total and ok >= total // 5:
            busy = _query(
                postgres_server,
                postgres_url,
                "SELECT claimed_by, count(*) FROM pushsync.batches WHERE status IN ('planned', 'sent') "
                "AND claimed_by IS NOT NULL GROUP BY claimed_by ORDER BY 2 DESC",
            )
            pids = {p.pid for p in procs}
            for claimed_by, _n in busy:
                pid = int(claimed_by.split(":")[1])
                if pid in pids:
                    victim = next(p for p in procs if p.pid == pid)
                    victim.send_signal(signal.SIGKILL)
                    break
    assert victim is not None, ("no worker held batches to kill", counts, busy, [p.pid for p in procs])
    victim.communicate(timeout=30)
    survivors = [p for p in procs if p is not victim]
    results = [finish(p) for p in survivors]
    for code, out, err in results:
        assert code == 0, (out, err[-3000:])
    docs = [json.loads(out) for _, out, _ in results]
    assert len({d["run_id"] for d in docs}) == 1  # one run, joined by every worker
    assert sandbox_users(sandbox) == expected_users(rows)
    # No batch confirmed twice, none left; every worker took part.
    twice = _query(
        postgres_server, postgres_url, "SELECT count(*) FROM pushsync.batches WHERE confirmations > 1"
    )
    assert twice == [["0"]]
    left = _query(postgres_server, postgres_url, "SELECT count(*) FROM pushsync.batches WHERE status <> 'ok'")
    assert left == [["0"]]
    senders = _query(postgres_server, postgres_url, "SELECT count(DISTINCT worker) FROM pushsync.attempts")
    assert int(senders[0][0]) == 3
    stats = _sandbox_stats(sandbox)
    assert stats["rate_limited_total"] == 0, stats
    # Duplicates only from ambiguous outcomes: faults that applied a batch and failed anyway, and what the
    # killed worker had in flight (its requests and the answers of its last ledger flush interval).
    faults = stats["faults"]
    duplicates = sum(applied(sandbox).values()) - minimal_applications(rows, "changes")
    bound = (faults.get("applied_then_500", 0) + faults.get("slow", 0) + 4 + 4) * BATCH
    assert 0 <= duplicates <= bound, (duplicates, bound, faults)
    run_id = docs[0]["run_id"]
    status = _query(
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
    (tmp_path / "job.yaml").write_text(job_text("http://127.0.0.1:9/rest/3.0/"), encoding="utf-8")
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
    (tmp_path / "job.yaml").write_text(job_text("http://127.0.0.1:9/rest/3.0/"), encoding="utf-8")
    write_users(tmp_path, range(10))
    code, _ = _cli(tmp_path, monkeypatch, postgres_url, "run", "job.yaml", "--progress", "none")
    err = capsys.readouterr().err
    assert code == 2
    assert "pushsync schema is version 99, newer than this pushsync understands (1)" in err, err
    code, _ = _cli(tmp_path, monkeypatch, postgres_url, "runs")
    assert code == 2  # every command refuses it, before reading anything


def test_urls_written_into_the_job_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Snapshot jobs run coordinated too now: tests/test_coordination_snapshot.py.
    text = job_text("http://127.0.0.1:9/rest/3.0/")
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

    text = job_text("http://127.0.0.1:9/rest/3.0/").replace(
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
    from sync.coordination._db import async_connect, connect
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
        dead_conn, live_conn = await async_connect(postgres_url), await async_connect(postgres_url)
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


def test_postgresql_restarted_mid_run_stops_the_worker_clearly_and_the_job_converges_when_run_again(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    postgres_server: PostgresServer,
    postgres_url: str,
) -> None:
    sandbox = netmera_sandbox_process
    budget = '  budgets: {"*": {requests: 10, per: 1s}}\n'
    (tmp_path / "job.yaml").write_text(job_text(sandbox.url, budget=budget, lease=2), encoding="utf-8")
    rows = write_users(tmp_path, range(600))
    proc = worker(tmp_path, sandbox.api_key, postgres_url, "run", "job.yaml", "--progress", "none")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            ok = int(
                _query(
                    postgres_server, postgres_url, "SELECT count(*) FROM pushsync.batches WHERE status = 'ok'"
                )[0][0]
            )
        except RuntimeError:
            continue
        if ok >= 5:
            break
    # The server writes its log to stdout after a restart: not a pipe of ours (it would never close).
    subprocess.run(
        [
            *postgres_server.run_as,
            str(postgres_server.bin_dir / "pg_ctl"),
            "-D",
            str(postgres_server.data_dir),
            "-m",
            "fast",
            "-w",
            "restart",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
        check=True,
    )
    code, out, err = finish(proc)
    assert code == 3, (out, err[-2000:])
    assert "this worker stopped after it began sending" in err and "pushsync run" in err
    assert postgres_server.password not in out + err
    code, out, err = finish(
        worker(tmp_path, sandbox.api_key, postgres_url, "run", "job.yaml", "--progress", "none")
    )
    assert code == 0, (out, err[-2000:])
    assert sandbox_users(sandbox) == expected_users(rows)


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
    (tmp_path / "job.yaml").write_text(job_text(netmera_sandbox.url), encoding="utf-8")
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


def test_input_that_cannot_be_planned_ends_the_run_for_every_worker(
    tmp_path: Path, postgres_server: PostgresServer, postgres_url: str
) -> None:
    (tmp_path / "job.yaml").write_text(job_text("http://127.0.0.1:9/rest/3.0/"), encoding="utf-8")
    (tmp_path / "users.csv").write_text("name,score\nAda,1\n", encoding="utf-8")  # no id column
    procs = [worker(tmp_path, "k", postgres_url, "run", "job.yaml", "--progress", "none") for _ in range(2)]
    results = [finish(p, timeout=60) for p in procs]
    assert [code for code, _, _ in results] == [2, 2], results
    assert all("id" in err for _, _, err in results)
    rows = _query(
        postgres_server,
        postgres_url,
        "SELECT status, exit_code, left(message, 12) = 'not planned:' FROM pushsync.runs",
    )
    # One run, or two when the second worker came after the first had already ended its run: never one left
    # waiting for a plan.
    assert rows in ([["aborted", "2", "t"]], [["aborted", "2", "t"]] * 2), rows
