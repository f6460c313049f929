"""End to end: ``pushsync run`` killed with SIGKILL at random points, then resumed, against the Netmera sandbox
running as a separate process. The sandbox's state must end exactly equal to the input; the IDs applied twice
must be no more than the batches in flight at each kill; a run with no changes sends nothing; a run after 1%
churn sends that 1% only; a removal past the threshold needs --force.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import NetmeraProcess
from tests.netmera_e2e import (
    applied,
    expected_users,
    finish,
    minimal_applications,
    netmera_job,
    pushsync,
    requests_total,
    sandbox_users,
    write_users,
)

__all__ = ["expected_users", "job_text", "sandbox_users", "write_users"]  # the CLI tests reuse these

USERS = 1200
BATCH = 40
CONCURRENCY = 4


def job_text(url: str, mode: str, removal: str = "none", share: float = 0.05) -> str:
    snapshot = (
        f"mode: snapshot\nsnapshot: {{removal: {removal}, max_removal_share: {share}}}\n"
        if mode == "snapshot"
        else ""
    )
    return netmera_job(
        url,
        name=f"crash-{mode}",
        head=snapshot,
        dispatch=f"""\
  concurrency: {CONCURRENCY}
  batch_size: {BATCH}
  request_timeout: 5
  drain_timeout: 2
  budgets:
    "*": {{requests: 150, per: 1s}}
  retry: {{max_attempts: 3, base_delay: 0.05, max_delay: 0.2}}
""",
    )


def _endpoints(tmp: Path) -> int:
    """How many endpoints the job's runs sent to (each has its own budget of 150 requests/s)."""
    conn = sqlite3.connect(f"file:{tmp / 'work' / 'ledger.sqlite'}?mode=ro", uri=True, timeout=1)
    try:
        return int(conn.execute("SELECT COUNT(DISTINCT endpoint) FROM batches").fetchone()[0])
    finally:
        conn.close()


def ok_batches(tmp: Path) -> int:
    path = tmp / "work" / "ledger.sqlite"
    if not path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM batches WHERE status = 'ok'").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return 0  # the tables are not there yet


def kill_after(proc: subprocess.Popen[str], tmp: Path, *, ok_at_least: int, timeout: float = 30) -> int:
    """SIGKILL the run once the ledger holds ``ok_at_least`` confirmed batches (or it ended). Returns the count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        n = ok_batches(tmp)
        if n >= ok_at_least:
            break
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    return ok_batches(tmp)


def kill_at(proc: subprocess.Popen[str], tmp: Path, delay: float) -> int:
    """SIGKILL the run ``delay`` seconds after it started (if it is still running)."""
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    return ok_batches(tmp)


@pytest.mark.parametrize("mode", ["snapshot", "changes"])
def test_kill_9_then_resume_leaves_the_sandbox_equal_to_the_input(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess, mode: str
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    (tmp_path / "job.yaml").write_text(job_text(netmera_sandbox_process.url, mode), encoding="utf-8")
    rows = write_users(tmp_path, range(USERS))
    total_batches_hint = 4 * USERS // BATCH
    kills = []
    # First kill: while batches are being answered. Second: at a random time — while the job is read and
    # planned (or diffed), while it sends, or while the state is committed.
    for attempt in range(2):
        proc = pushsync(tmp_path, netmera_sandbox_process, "run", "job.yaml", "--progress", "none")
        if attempt == 0:
            kills.append(kill_after(proc, tmp_path, ok_at_least=rng.randrange(3, total_batches_hint // 3)))
        else:
            kills.append(kill_at(proc, tmp_path, rng.uniform(0.2, 2.5)))
    runs = _runs(tmp_path)
    assert any(status in ("running", "interrupted") for _, status in runs), (seed, runs)  # a run really died
    last = runs[0][0]
    code, out, err = finish(
        pushsync(tmp_path, netmera_sandbox_process, "resume", last, "--job", "job.yaml", "--progress", "none")
    )
    assert code == 0, (seed, out, err)
    assert sandbox_users(netmera_sandbox_process) == expected_users(rows), seed
    duplicates = sum(applied(netmera_sandbox_process).values()) - minimal_applications(rows, mode)
    # Per kill: the batches in flight (at most CONCURRENCY) and those answered within the last ledger flush
    # interval (50 ms) may have been applied without the ledger knowing. The budget is 150/s *per endpoint*
    # (`"*"`), so the rate the job allows is that times its endpoints (5 in changes mode: up to 38 answers in
    # 50 ms). The bound used to assume 150/s in all (8 answers); it failed once in CI (29 batches for 24) after
    # the send path got cheaper.
    in_flight_bound = len(kills) * (CONCURRENCY + math.ceil(150 * _endpoints(tmp_path) * 0.05)) * BATCH
    print(
        f"seed {seed}: killed after {kills} confirmed batches; {duplicates} IDs applied twice (bound {in_flight_bound})"
    )
    assert 0 <= duplicates <= in_flight_bound, seed

    if mode == "snapshot":
        before = requests_total(netmera_sandbox_process)
        code, out, err = finish(
            pushsync(tmp_path, netmera_sandbox_process, "run", "job.yaml", "--progress", "none")
        )
        assert code == 0, (out, err)
        assert requests_total(netmera_sandbox_process) == before  # no changes: no requests


def _runs(tmp: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(f"file:{tmp / 'work' / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        return list(conn.execute("SELECT run_id, status FROM runs ORDER BY started_at DESC"))
    finally:
        conn.close()


def test_a_run_after_one_percent_churn_sends_that_one_percent_only(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess
) -> None:
    (tmp_path / "job.yaml").write_text(job_text(netmera_sandbox_process.url, "snapshot"), encoding="utf-8")
    write_users(tmp_path, range(USERS))
    code, out, err = finish(
        pushsync(tmp_path, netmera_sandbox_process, "run", "job.yaml", "--progress", "none")
    )
    assert code == 0, (out, err)
    before = applied(netmera_sandbox_process)
    rows = write_users(tmp_path, range(USERS), churn=1)  # users with i % 100 == 7 get a new score: 1%
    code, out, err = finish(
        pushsync(
            tmp_path, netmera_sandbox_process, "run", "job.yaml", "--progress", "none", "--output", "json"
        )
    )
    assert code == 0, (out, err)
    after = applied(netmera_sandbox_process)
    sent = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    assert sent == {"setProfileAttributes": USERS // 100}
    doc = json.loads(out)
    assert doc["diff"]["users_changed"] == USERS // 100 and doc["totals"]["requests"] == 1
    assert sandbox_users(netmera_sandbox_process) == expected_users(rows)


def test_removals_past_the_threshold_need_force(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess
) -> None:
    job = job_text(netmera_sandbox_process.url, "snapshot", removal="delete", share=0.1)
    (tmp_path / "job.yaml").write_text(job, encoding="utf-8")
    write_users(tmp_path, range(200))
    assert (
        finish(pushsync(tmp_path, netmera_sandbox_process, "run", "job.yaml", "--progress", "none"))[0] == 0
    )
    rows = write_users(tmp_path, range(150))  # 25% of the users left the export
    before = requests_total(netmera_sandbox_process)
    code, out, err = finish(
        pushsync(tmp_path, netmera_sandbox_process, "run", "job.yaml", "--progress", "none")
    )
    assert code == 2 and "50 of 200 users" in err and "--force" in err, (out, err)
    assert requests_total(netmera_sandbox_process) == before  # refused before anything was sent
    assert len(sandbox_users(netmera_sandbox_process)) == 200
    code, out, err = finish(
        pushsync(tmp_path, netmera_sandbox_process, "run", "job.yaml", "--progress", "none", "--force")
    )
    assert code == 0, (out, err)
    assert sandbox_users(netmera_sandbox_process) == expected_users(rows)
