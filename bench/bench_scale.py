"""Scaling out on PostgreSQL (docs/scaling.md): what coordination costs, what several workers buy, and whether
three workers sharing one budget use it fully without a 429.

1. **Claim + record overhead per batch** (in this process, no HTTP): the leader queues batches of 1000 IDs;
   one worker claims them (``FOR UPDATE SKIP LOCKED``) and records ``sent``, one attempt and the result for
   each (flushed every 50 ms, as in a run). A worker claims on demand — as many batches as its dispatcher has
   workers waiting, which in the steady state is one — so the target figure claims one at a time; four at a
   time (a worker's start) is printed beside it. Also the cost of one shared-budget acquisition (one call of
   ``take_slot``). Target: claim + record ≤ 2 ms per batch.
2. **1, 2 and 3 workers against an unlimited server**: ``pushsync run`` processes sharing one job against a
   Netmera sandbox with no limits; requests/s over the sending part (first to last request in the ledger) and
   over the whole command, and when the first request left against when the leader queued the last batch
   (workers send while the leader plans). The same job run by one process on SQLite is the baseline.
3. **Three workers sharing one budget**: the sandbox limits the whole account to N requests per clock-aligned
   1 s window; the job's budget group says the same. Budget use = requests per busy window (first and last
   excluded) / N. Targets: ≥ 95 % and 0 × 429.

Everything runs on this machine (a throwaway PostgreSQL server started like the tests' fixture): workers, the sandbox and the database share its cores, so the worker figures are lower bounds.
Exit 1 when a target is missed.

    .venv/bin/python bench/bench_scale.py                       # ≈ 1-2 minutes
    .venv/bin/python bench/bench_scale.py --users 60000 --limit 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sync.demo import start_sandbox_process, stop_sandbox_process  # noqa: E402
from sync.records import Phase  # noqa: E402

KEY = "bench-scale-key-0123456789"
OVERHEAD_TARGET_MS = 2.0
USE_TARGET = 0.95


# --- 1. claim + record overhead ---------------------------------------------------------------------------------


async def overhead(url: str, batches: int) -> dict[str, float]:
    from sync.config import DispatchSettings, RateBudgetSpec
    from sync.coordination._db import Link, connect
    from sync.coordination.budget import SharedBudgets
    from sync.coordination.ledger import PgLedger
    from sync.coordination.queue import Membership, QueueLanes, enqueue

    ledger = PgLedger.open(url, worker="bench")
    # The round trip of an empty statement: on a loaded machine every figure below is a few of these.
    probe = connect(url)
    for _ in range(50):
        probe.execute("SELECT 1")
    started = time.perf_counter()
    for _ in range(500):
        probe.execute("SELECT 1")
    round_trip = (time.perf_counter() - started) / 500
    probe.close()
    lead = connect(url)
    figures: dict[str, float] = {"batches": float(batches), "round_trip_ms": round_trip * 1000}
    links = [await Link.open(url, what=what) for what in ("claims", "heartbeats", "budget slots")]
    for at_once in (1, 4):
        run = f"bench-{at_once}"
        ledger.start_run(run, job=run)  # one live run per job
        plan = _plan(batches)
        started = time.perf_counter()
        enqueue(lead, run, plan)
        figures["enqueue_ms"] = (time.perf_counter() - started) / batches * 1000
        member = Membership(links[1], run, f"bench-worker-{at_once}", lease=30)
        await member.join()
        lanes = QueueLanes(links[0], ledger, member)
        done = 0
        started = time.perf_counter()
        while got := await lanes.take(Phase.CHANGES, "tagUsers", at_once):
            for batch in got:
                _record(ledger, run, batch)
                done += 1
        ledger.flush()
        assert done == batches, (done, batches)
        figures[f"claim_record_{at_once}_ms"] = (time.perf_counter() - started) / done * 1000
    settings = DispatchSettings(budgets={"*": RateBudgetSpec(1_000_000, 1.0)})
    shared = SharedBudgets(links[2], settings, scope="bench")
    budget = shared.budget("tagUsers")
    for _ in range(20):
        await budget.acquire()  # warm-up: the row exists, statements are prepared
    n = 1000
    started = time.perf_counter()
    for _ in range(n):
        await budget.acquire()
    figures["budget_acquire_ms"] = (time.perf_counter() - started) / n * 1000
    for link in links:
        await link.close()
    lead.close()
    ledger.close()
    return figures


def _plan(batches: int) -> list[Any]:
    from sync.records import Batch, Operation

    ids = [f"user{i:07d}" for i in range(1000)]
    # Bytes, as the platforms' builders make bodies (in polars); the queue keeps them as they are.
    body = json.dumps({"tag": "gold", "extIds": ids}).encode()
    return [Batch(f"b{n:06d}", "tagUsers", Operation.TAG, body, tuple(ids)) for n in range(batches)]


def _record(ledger: Any, run: str, batch: Any) -> None:
    """What the dispatcher records for a batch answered at once: sent, one attempt, the result."""
    from sync.records import Attempt, AttemptOutcome, BatchResult, BatchStatus

    now = time.time()
    ledger.record_sent(run, batch.batch_id)
    ledger.record_attempt(
        run,
        Attempt(batch.batch_id, batch.endpoint, 1, len(batch.ext_ids), 0.01, AttemptOutcome.OK, 200),
        started_at=now,
    )
    ledger.record_result(
        run,
        BatchResult(
            batch.batch_id,
            batch.endpoint,
            batch.operation,
            BatchStatus.OK,
            1,
            200,
            ok_ids=len(batch.ext_ids),
            started_at=now,
            finished_at=now,
        ),
    )
    ledger.maybe_flush()


# --- 2./3. worker processes -----------------------------------------------------------------------------------


def write_data(directory: Path, users: int) -> None:
    lines = ["id,name,score,segments"]
    lines += [f"user{i:07d},Name{i},{i % 997},{'gold|beta' if i % 2 else 'silver'}" for i in range(users)]
    (directory / "users.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_job(directory: Path, url: str, *, batch: int, budget: str) -> Path:
    job = directory / "job.yaml"
    job.write_text(
        f"""version: 1
name: bench-scale
workdir: work
destination: {{platform: netmera, base_url: "{url}", secret: {{env: BENCH_SCALE_KEY}}}}
sources:
  - name: users
    path: users.csv
    ext_id: id
    attributes: {{name: string, score: number}}
    tags: {{column: segments, delimiter: "|"}}
coordination: {{lease: 10}}
dispatch:
  concurrency: 8
  batch_size: {batch}
  request_timeout: 30
{budget}""",
        encoding="utf-8",
    )
    return job


def run_workers(directory: Path, db_url: str | None, n: int) -> tuple[float, list[int]]:
    """``n`` ``pushsync run`` processes of the job in ``directory``; without ``db_url``: one, on SQLite."""
    env = {**os.environ, "BENCH_SCALE_KEY": KEY, "PYTHONPATH": str(ROOT)}
    env.pop("PUSHSYNC_DATABASE_URL", None)
    if db_url is not None:
        env["PUSHSYNC_DATABASE_URL"] = db_url
    # Every worker names the run (as the Kubernetes example does): one that starts after a short run ended
    # reports that run instead of starting the job over.
    run_id = ["--run-id", f"bench-{n}-{os.getpid()}"] if db_url is not None else []
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sync",
                "--log-level",
                "warning",
                "run",
                "job.yaml",
                "--progress",
                "none",
                *run_id,
            ],
            cwd=directory,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    codes = []
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode:
            print(err[-2000:], file=sys.stderr)
        codes.append(proc.returncode)
    return time.monotonic() - started, codes


def attempts(db_url: str | None, directory: Path) -> list[tuple[float, str]]:
    """(sent at, outcome) of every attempt, from the coordination database or the job's SQLite ledger."""
    if db_url is None:
        import sqlite3

        conn = sqlite3.connect(directory / "work" / "ledger.sqlite")
        try:
            return [(float(t), str(o)) for t, o in conn.execute("SELECT started_at, outcome FROM attempts")]
        finally:
            conn.close()
    from sync.coordination._db import connect

    with connect(db_url) as pg:
        rows = pg.execute("SELECT started_at, outcome FROM pushsync.attempts").fetchall()
    return [(float(r[0]), str(r[1])) for r in rows]


def overlap(db_url: str) -> tuple[float, float]:
    """(first request, last batch queued), in seconds after the run started: workers send while the leader
    plans when the first is well before the second."""
    from sync.coordination._db import connect

    with connect(db_url) as pg:
        row = pg.execute(
            "SELECT (SELECT min(started_at) FROM pushsync.attempts) - r.started_at, "
            "(SELECT max(planned_at) FROM pushsync.batches) - r.started_at FROM pushsync.runs r"
        ).fetchone()
    assert row is not None
    return float(row[0]), float(row[1])


def sandbox_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url.removesuffix('/rest/3.0/')}/_sandbox/stats", timeout=30) as resp:
        return dict(json.loads(resp.read()))


def scale(server: Any, base: Path, users: int, workers: int) -> dict[str, float]:
    """``workers`` workers against an unlimited sandbox (0: one process on SQLite, the baseline)."""
    directory = base / f"unlimited-{workers}"
    directory.mkdir()
    write_data(directory, users)
    process, url = start_sandbox_process(KEY, {}, directory / "sandbox")
    try:
        # No window alignment: an unlimited server has no windows to land in (aligned releases keep the last
        # part of each window free, which would cap the rate for nothing).
        write_job(
            directory, url, batch=100, budget='  budgets: {"*": {requests: 100000, per: 1s, align: false}}\n'
        )
        db_url = server.new_database() if workers else None
        elapsed, codes = run_workers(directory, db_url, max(workers, 1))
        rows = attempts(db_url, directory)
        first_s, queued_s = overlap(db_url) if db_url is not None else (float("nan"), float("nan"))
    finally:
        stop_sandbox_process(process)
    times = sorted(t for t, _ in rows)
    sending = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {
        "first_request_s": first_s,
        "last_queued_s": queued_s,
        "workers": workers,
        "exit_codes_ok": float(all(c == 0 for c in codes)),
        "requests": len(rows),
        "sending_rps": (len(rows) - 1) / sending if sending > 0 else float("nan"),
        "command_rps": len(rows) / elapsed,
        "command_s": elapsed,
    }


def shared_budget(server: Any, base: Path, users: int, limit: int) -> dict[str, float]:
    directory = base / "budget"
    directory.mkdir()
    write_data(directory, users)
    config = {"limits": {"account": {"requests": limit, "window": 1}}, "limit_groups": {"*": "account"}}
    process, url = start_sandbox_process(KEY, config, directory / "sandbox")
    try:
        budget = f'  budget_groups: {{account: {{requests: {limit}, per: 1s, endpoints: ["*"]}}}}\n'
        write_job(directory, url, batch=100, budget=budget)
        db_url = server.new_database()
        elapsed, codes = run_workers(directory, db_url, 3)
        rows = attempts(db_url, directory)
        stats = sandbox_stats(url)
    finally:
        stop_sandbox_process(process)
    windows: dict[int, int] = {}
    for t, outcome in rows:
        if outcome != "rate_limited":
            w = math.floor(t)
            windows[w] = windows.get(w, 0) + 1
    busy = sorted(windows)[1:-1]
    use = sum(windows[w] for w in busy) / (len(busy) * limit) if busy else float("nan")
    return {
        "exit_codes_ok": float(all(c == 0 for c in codes)),
        "requests": len(rows),
        "windows": len(busy),
        "budget_use": use,
        "max_per_window": max(windows.values(), default=0),
        "rate_limited": float(stats.get("rate_limited_total", 0)),
        "command_s": elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=2000, help="batches for the overhead figure")
    parser.add_argument("--users", type=int, default=40000, help="users for the unlimited-server runs")
    parser.add_argument("--budget-users", type=int, default=20000, help="users for the shared-budget run")
    parser.add_argument("--limit", type=int, default=20, help="the account's requests per 1 s window")
    parser.add_argument(
        "--parts",
        default="overhead,scale,budget",
        help="which figures, comma-separated: overhead (1.), scale (2.), budget (3.); default: all",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    from pg_fixture import find_postgres_bin, start_postgres

    bin_dir = find_postgres_bin()
    if bin_dir is None:
        print("no PostgreSQL binaries (initdb): install postgresql")
        return 1
    server, root = start_postgres(bin_dir)
    ok = True
    base = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        if "overhead" in parts:
            cost = asyncio.run(overhead(server.new_database(), args.batches))
            met = cost["claim_record_1_ms"] <= OVERHEAD_TARGET_MS
            ok &= met
            print(
                f"claim + record per batch (1000 IDs), claimed one at a time (a worker's steady state): "
                f"{cost['claim_record_1_ms']:.3f} ms (target ≤ {OVERHEAD_TARGET_MS} ms) {'OK' if met else 'MISSED'}; "
                f"four at a time: {cost['claim_record_4_ms']:.3f} ms; "
                f"enqueue by the leader {cost['enqueue_ms']:.3f} ms per batch; "
                f"shared-budget acquisition {cost['budget_acquire_ms']:.3f} ms; "
                f"(one SELECT 1 round trip: {cost['round_trip_ms']:.3f} ms; load average {os.getloadavg()[0]:.1f})"
            )
        for n in (0, 1, 2, 3) if "scale" in parts else ():
            fig = scale(server, base, args.users, n)
            ok &= bool(fig["exit_codes_ok"])
            who = "1 process on SQLite (baseline)" if n == 0 else f"{n} worker(s) on PostgreSQL"
            print(
                f"{who}, unlimited server: {fig['requests']:.0f} requests, {fig['sending_rps']:.0f} requests/s "
                f"while sending, {fig['command_rps']:.0f} requests/s over the whole command ({fig['command_s']:.1f} s)"
                + (
                    f"; first request {fig['first_request_s']:.2f} s after the run started, last batch queued "
                    f"{fig['last_queued_s']:.2f} s after"
                    if n
                    else ""
                )
                + ("" if fig["exit_codes_ok"] else " — a worker FAILED")
                + f" (load average {os.getloadavg()[0]:.1f})"
            )
        if "budget" in parts:
            fig = shared_budget(server, base, args.budget_users, args.limit)
            hit = fig["budget_use"] >= USE_TARGET and fig["rate_limited"] == 0 and bool(fig["exit_codes_ok"])
            ok &= hit
            print(
                f"3 workers sharing one budget of {args.limit}/1s: budget use {fig['budget_use']:.1%} over "
                f"{fig['windows']:.0f} full windows (target ≥ {USE_TARGET:.0%}), max {fig['max_per_window']:.0f} "
                f"per window, {fig['rate_limited']:.0f} × 429 (target 0), {fig['requests']:.0f} requests in "
                f"{fig['command_s']:.1f} s {'OK' if hit else 'MISSED'} (load average {os.getloadavg()[0]:.1f})"
            )
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
