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
