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
