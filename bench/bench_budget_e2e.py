"""End to end: ``pushsync run`` against a rate-limited server in its own process, with a CPU hog on the worker's core.

The server (this file with ``--serve``) speaks enough of Netmera's REST API for the connector, counts every
request by the clock-aligned window of its *arrival*, and answers 429 (``Retry-After``: until the window ends)
above its limit — per endpoint (``endpoint`` case) or for the whole account (``account`` case). Each request
waits ``uniform(0, J)`` before it "arrives" and again before its answer leaves (network jitter), and faults are
on: 2 % of requests answer 500 unapplied, 1 % are applied and then answer 500.

The run is the real CLI (``python -m sync run``) on 100k users (6 attributes and tags), pinned to one core with
a CPU-bound process pinned to the same core. The job says what the server does: per-endpoint budgets
(Netmera's default ``"*": 20 per 1s``), or an account-wide budget group over every endpoint.

By default both cases run with 5, 50 and 100 ms of jitter (six runs, a few minutes); ``--quick`` sends the same
number of requests from 20k users (cheaper batches of 200 IDs: start-up is short) and runs the 50 ms cases
only. Figures per case, from the server's own records:

* ``429s`` — must be 0; ``max/win`` — the most requests in one window for any limit (never above N);
* ``sending`` — the binding budget's use over the sending part: the mean count per server window over the
  windows in which it was busy, without the first and last (partial), over N — must be >= 97 %. The last is
  the window in which the last new request (first attempt, from the run's ledger) left: windows after it hold
  only retries of the last answers;
* where the budget went (a second line per case): the binding budget's ``budget.window`` records (the run is
  started with ``--log-level debug``) over the same windows — released of allowed, and the slots not released:
  idle (nothing to send), waiting (the loop late), paused (429), carried (held for requests released late in
  the window before and still unanswered at its edge) —, the loop's worst lateness, the learned margins, and how many
  requests the server counted in another window than the budget did;
* ``budget-bound`` — the same over the windows in which an attempt always waited for the budget and the event
  loop released it on time (from the run summary, by release windows; ``starved/stalled/n``: of the n windows
  measured, those in which the run had nothing to send, and those in which the loop released a slot more than
  a spacing late). Not a target: when ``sending`` misses and this does not, the run starved the budget
  (planning, an event loop stalled by another thread holding the interpreter), not the budget itself;
* ``command`` — the least time the binding budget allows (its requests x T / N) over the command's wall time,
  start-up included — target >= 95 %, which depends on how fast planning starts sending (not this bench's
  part): printed, and a miss fails the bench only with ``--strict-startup``;
* ``ceiling`` and ``floor`` — before each case, ``floor_client.py`` (a minimal polars + aiohttp client: read the
  mapped columns, keep the last row per ID, post one body) runs on the worker's core beside the hog; ``floor`` is
  the time from its start to its first request, and ``ceiling`` the whole-command use of a client that sends its
  first request ``floor`` s after the run's start and then fills every window to N, the first included (its
  last request leaving as its last window opens): the most ``command`` can be with Python start-up;
* ``first window`` and the end (a third line per case): the binding budget's requests in the run's first window
  and how much of that window was left when the first request arrived (a first request late in its window
  leaves the window mostly unused), and how long the command ran after the last request arrived (its answer,
  the run's summary and ledger, the process's exit).

Exits 1 on a miss of a sending-part target (0 x 429, max <= N, sending >= 97 %). The machine's load average is
printed before and after: figures taken with a load above the core count are loaded-machine figures.

    .venv/bin/python bench/bench_budget_e2e.py [--quick] [--limit endpoint|account|both]
        [--jitter 0.005,0.05,0.1] [--users 100000] [--batch-size 1000] [--concurrency 16] [--no-hog]
        [--requests 20] [--strict-startup] [--json] [--log PREFIX]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _common import DATA  # noqa: E402

API_KEY = "bench-budget-key-0123456789"


# --- the server (its own process) ---------------------------------------------------------------------------


def serve(port: int, limit: str, requests: int, period: float, jitter: float, seed: int) -> None:
    from aiohttp import web

    rng = random.Random(seed)
    counts: dict[tuple[str, int], int] = defaultdict(int)
    log: list[tuple[float, str, int]] = []  # (arrival wall time, endpoint, status)

    async def handle(request: web.Request) -> web.Response:
        if request.headers.get("X-netmera-api-key") != API_KEY:
            return web.json_response({"code": 2010, "error": "invalid key"}, status=401)
        await request.read()
        await asyncio.sleep(rng.uniform(0, jitter))  # on the way in
        now = time.time()
        endpoint = request.match_info["endpoint"]
        window = math.floor(now / period)
        key = endpoint if limit == "endpoint" else "*"
        counts[key, window] += 1
        fault = rng.random()
        if counts[key, window] > requests:
            status = 429
        elif fault < 0.02:
            status = 500
        elif fault < 0.03:
            status = 501  # applied, then a 500 (recorded apart)
        else:
            status = 200
        log.append((now, endpoint, status))
        await asyncio.sleep(rng.uniform(0, jitter))  # on the way back
        if status == 429:
            reset = (window + 1) * period - time.time()
            return web.json_response(
                {"code": 429, "error": "rate limited"},
                status=429,
                headers={"Retry-After": f"{max(reset, 0.001):.3f}"},
            )
        if status != 200:
            return web.json_response({"code": 500, "error": "internal"}, status=500)
        return web.json_response({})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(log)

    async def probe(request: web.Request) -> web.Response:
        # floor_client.py's request: answered at once, counted in no window (it is not part of the run).
        await request.read()
        return web.json_response({})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/rest/3.0/{endpoint}", handle)
    app.router.add_get("/_stats", stats)
    app.router.add_post("/_probe", probe)
    web.run_app(app, host="127.0.0.1", port=port, print=lambda *_: print("ready", flush=True))


# --- the bench ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_job(
    path: Path, data: Path, url: str, limit: str, n: int, workdir: Path, args: argparse.Namespace
) -> None:
    budgets = (
        f'  budgets: {{"*": {{requests: {n}, per: 1s}}}}'
        if limit == "endpoint"
        else f'  budget_groups: {{account: {{requests: {n}, per: 1s, endpoints: ["*"]}}}}'
    )
    path.write_text(
        "\n".join(
            [
                "name: bench-budget",
                f"workdir: {workdir}",
                "destination:",
                "  platform: netmera",
                f"  base_url: {url}",
                "  secret: {env: BENCH_BUDGET_KEY}",
                "sources:",
                "  - name: users",
                f"    path: {data}",
                "    ext_id: customer_id",
                "    attributes:",
                "      first_name: {attribute: name}",
                "      last_name: {attribute: surname}",
                "      birth_date: {attribute: dateOfBirth, type: date}",
                "      score: number",
                "      vip: {attribute: isVip, type: boolean}",
                "      city: {on_null: unset}",
                "    tags: [{column: segments, delimiter: '|'}]",
                "dispatch:",
                f"  concurrency: {args.concurrency}",
                f"  batch_size: {args.batch_size}",
                "  drain_timeout: 5",
                budgets,
                "",
            ]
        ),
        encoding="utf-8",
    )


def _pin(cpu: int) -> Any:
    def pin() -> None:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {cpu})

    return pin


def _floor_first_request(data: Path, url: str, cpu: int, pin: bool) -> float:
    """Seconds from start to the first request of ``floor_client.py`` (a minimal polars + aiohttp client) run
    where the worker runs: the start-up no Python client can beat under the same conditions."""
    started = time.time()
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "floor_client.py"), str(data), url],
        capture_output=True,
        text=True,
        preexec_fn=_pin(cpu) if pin else None,
        timeout=120,
        check=True,
    )
    return float(result.stdout.strip()) - started


def _first_attempts(ledger: Path) -> dict[str, float]:
    """Per endpoint, when its last first attempt (a new request, not a retry) was sent (wall time), from the
    run's ledger."""
    import sqlite3

    if not ledger.exists():
        return {}
    conn = sqlite3.connect(ledger)
    try:
        rows = conn.execute(
            "SELECT endpoint, MAX(started_at) FROM attempts WHERE attempt = 1 GROUP BY endpoint"
        ).fetchall()
    finally:
        conn.close()
    return {str(endpoint): float(at) for endpoint, at in rows if at is not None}


def _figures(
    log: list[list[Any]],
    limit: str,
    n: int,
    period: float,
    wall: float,
    first_attempts: dict[str, float] | None = None,
) -> dict[str, Any]:
    by_key: dict[str, list[float]] = defaultdict(list)
    for arrival, endpoint, _status in log:
        by_key[endpoint if limit == "endpoint" else "*"].append(arrival)
    # The binding limit: the one with the most requests (every endpoint has the same N).
    key, arrivals = max(by_key.items(), key=lambda kv: len(kv[1]))
    windows = Counter(math.floor(a / period) for a in arrivals)
    first, last = min(windows), max(windows)
    # The sending part ends with the window in which the last new request left (partial: the plan ran out
    # there); windows after it hold only the retries of the last answers, which are not the budget's to fill.
    sent = [at for e, at in (first_attempts or {}).items() if limit == "account" or e == key]
    if sent:
        last = min(last, math.floor(max(sent) / period))
    interior = [windows.get(k, 0) for k in range(first + 1, last)]
    sending = sum(interior) / (len(interior) * n) if interior else float("nan")
    ideal = len(arrivals) * period / n
    max_win = max(
        Counter((k, math.floor(a / period)) for k, arr in by_key.items() for a in arr).values(), default=0
    )
    return {
        "binding": key,
        "requests": len(log),
        "binding_requests": len(arrivals),
        "429s": sum(1 for *_, status in log if status == 429),
        "faults": sum(1 for *_, status in log if status in (500, 501)),
        "max_per_window": max_win,
        "sending_use": round(sending, 4),
        "interior_windows": len(interior),
        "sending_windows": [first, last],
        "per_window": [windows.get(k, 0) for k in range(first, last + 1)],
        "ideal_s": round(ideal, 2),
        "command_s": round(wall, 2),
        "command_use": round(ideal / wall, 4),
        "first_request_after_s": None,
    }


def _budget_bound(summary: dict[str, Any], limit: str, binding: str) -> dict[str, Any]:
    """The binding budget's use over the windows in which an attempt always waited for it and the loop was on
    time, and how many windows were starved or stalled (the run summary's figures: the account group's, or the
    binding endpoint's)."""
    if limit == "account":
        entries = summary.get("budget_groups") or []
    else:
        entries = [e for e in summary.get("endpoints", []) if e.get("endpoint") == binding]
    if not entries:
        return {"budget_bound_use": None, "windows": None}
    return {
        "budget_bound_use": entries[0].get("budget_bound_utilisation"),
        "windows": entries[0].get("windows"),
    }


def _where_lost(
    stderr: str, log: list[list[Any]], limit: str, binding: str, sending: list[int]
) -> dict[str, Any]:
    """Where the binding budget's slots went over the sending part, from its ``budget.window`` records (one per
    window, logged at debug level by the run): released, and the slots not released told apart — ``idle``
    (no attempt waited: the plan not ready, retries backing off), ``waiting`` (an attempt waited but the loop
    did not release it before the window's zone ended), ``paused`` (a 429), ``carried`` (held for requests
    released late in the window before with no answer by its edge) —, the loop's worst lateness, the margins
    in force, and the requests the server counted in another window than the budget did (``spilled``)."""
    name = "account" if limit == "account" else binding
    records: dict[int, dict[str, Any]] = {}
    for line in stderr.splitlines():
        if '"budget.window"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "budget.window" and rec.get("budget") == name:
            records[int(rec["window"])] = rec
    if not records:
        return {"lost": None}
    arrivals = Counter(math.floor(a) for a, endpoint, _ in log if limit == "account" or endpoint == binding)
    first, last = sending  # the sending part, as for the sending figure
    interior = [records[k] for k in range(first + 1, last) if k in records]
    total = {
        key: sum(int(r[key]) for r in interior)
        for key in ("allowed", "released", "idle", "waiting", "paused", "carried")
    }
    spilled = sum(
        abs(int(records[k]["released"]) - arrivals.get(k, 0)) for k in range(first + 1, last) if k in records
    )
    margins = [float(r["margin_ms"]) for r in interior] or [0.0]
    return {
        "lost": {
            **total,
            "windows": len(interior),
            "late_max_ms": max((float(r["late_max_ms"]) for r in interior), default=0.0),
            "margin_ms": [min(margins), max(margins)],
            "spilled": spilled,
        }
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from gen_data import generate_users

    cache = DATA / f"budget-users-{args.users}.csv"
    if not cache.exists():
        generate_users(cache, args.users, bad_every=0, duplicate_every=0)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/rest/3.0/"
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    worker_cpu, server_cpu = cores[-1], cores[0]
    serve_argv = ["--serve", str(port), "--limit", args.limit, "--requests", str(args.requests)]
    server = subprocess.Popen(
        [sys.executable, __file__, *serve_argv, "--jitter", str(args.jitter)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_pin(server_cpu) if len(cores) > 1 else None,
    )
    hog = None
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "ready"
        if not args.no_hog:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=_pin(worker_cpu))
        floor = _floor_first_request(cache, f"http://127.0.0.1:{port}/_probe", worker_cpu, len(cores) > 1)
        with tempfile.TemporaryDirectory() as tmp:
            job = Path(tmp) / "job.yaml"
            _write_job(job, cache, url, args.limit, args.requests, Path(tmp) / "work", args)
            started = time.time()
            cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "sync",
                    "--log-level",
                    "debug",  # the budgets' per-window records (budget.window lines)
                    "--log-json",
                    "run",
                    str(job),
                    "--output",
                    "json",
                    "--progress",
                    "none",
                ],
                cwd=ROOT,
                env={**os.environ, "BENCH_BUDGET_KEY": API_KEY},
                capture_output=True,
                text=True,
                preexec_fn=_pin(worker_cpu),
                timeout=300,
            )
            wall = time.time() - started
            cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            first_attempts = _first_attempts(Path(tmp) / "work" / "ledger.sqlite")
            worker_cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (
                cpu_after.ru_stime - cpu_before.ru_stime
            )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=10) as resp:
            log = json.loads(resp.read())
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        server.terminate()
        server.wait()
    if result.returncode not in (0, 1):
        print(result.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"pushsync run exited {result.returncode}")
    if getattr(args, "log", None):
        Path(args.log).write_text(
            json.dumps({"started": started, "log": log, "stderr": result.stderr}), encoding="utf-8"
        )
    figures = _figures(log, args.limit, args.requests, 1.0, wall, first_attempts)
    figures["first_request_after_s"] = round(min(a for a, *_ in log) - started, 2) if log else None
    # Where the whole-command figure goes beside the sending part: how much of the first window was left when
    # the first request arrived (and how many of its N it got), and how long the command ran after the last
    # request arrived (its answer, then the run's end and the process's exit).
    if log:
        figures["first_window_left_s"] = round(1.0 - min(a for a, *_ in log) % 1.0, 2)
        figures["exit_after_last_s"] = round(started + wall - max(a for a, *_ in log), 2)
    figures["floor_first_request_s"] = round(floor, 2)
    # A client whose first request leaves ``floor`` s after this run's start and which then fills every window
    # (the first one included) to N: its last request leaves at the start of its last window.
    windows_needed = math.ceil(figures["binding_requests"] / args.requests)
    least_wall = (math.floor(started + floor) + windows_needed - 1) - started
    figures["command_ceiling"] = round(min(1.0, figures["ideal_s"] / max(least_wall, floor)), 4)
    summary = json.loads(result.stdout)
    figures.update(_budget_bound(summary, args.limit, figures["binding"]))
    # CPU the run got: with a hog on its core it gets about half of it; near wall / 2, the run was CPU-bound.
    figures.update(
        _where_lost(result.stderr, log, args.limit, figures["binding"], figures["sending_windows"])
    )
    figures["worker_cpu_s"] = round(worker_cpu_s, 2)
    figures["requests_per_window"] = args.requests
    figures["exit_code"] = result.returncode
    figures["ids_failed"] = summary.get("totals", {}).get("ids_failed")
    return figures


SENDING_TARGET = 0.97
COMMAND_TARGET = 0.95


def _case_args(args: argparse.Namespace, limit: str, jitter: float) -> argparse.Namespace:
    case = argparse.Namespace(**vars(args))
    case.limit, case.jitter = limit, jitter
    return case


def _line(fig: dict[str, Any]) -> str:
    bound = fig.get("budget_bound_use")
    w = fig.get("windows") or {}
    starved = f"{w.get('starved', '-')}/{w.get('stalled', '-')}/{w.get('measured', '-')}"
    line = (
        f"{fig['limit']:<9}{fig['jitter'] * 1000:>6.0f} ms{fig['binding_requests']:>9}{fig['429s']:>6}"
        f"{fig['max_per_window']:>8}{fig['sending_use']:>10.1%}"
        f"{'-' if bound is None else f'{bound:.1%}':>14}{starved:>18}{fig['command_use']:>10.1%}"
        f"{fig['first_request_after_s'] or 0:>8.1f} s{fig['command_s']:>8.1f} s"
        f"{fig['command_ceiling']:>10.1%}{fig['floor_first_request_s']:>8.1f} s"
    )
    lost = fig.get("lost")
    if lost:
        line += (
            f"\n{'':<18}budget's windows {lost['windows']}: released {lost['released']} of {lost['allowed']}; "
            f"not released: idle {lost['idle']} (nothing to send), waiting {lost['waiting']} (loop late), "
            f"paused {lost['paused']} (429), carried {lost['carried']} (answers late); loop late by up to "
            f"{lost['late_max_ms']:.0f} ms; margin {lost['margin_ms'][0]:.0f}-{lost['margin_ms'][1]:.0f} ms; "
            f"counted in another window by the server: {lost['spilled']}; faults retried: {fig['faults']}"
        )
    if fig.get("exit_after_last_s") is not None:
        line += (
            f"\n{'':<18}first window: {fig['per_window'][0]} of {fig['requests_per_window']} with "
            f"{fig['first_window_left_s']:.2f} s of it left at the first request; the command ended "
            f"{fig['exit_after_last_s']:.2f} s after the last request arrived"
        )
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", choices=["endpoint", "account", "both"], default="both")
    parser.add_argument("--requests", type=int, default=20, help="the server's limit per 1 s window")
    parser.add_argument(
        "--jitter",
        default=None,
        help="seconds each way, comma-separated (default 0.005,0.05,0.1; with --quick 0.05)",
    )
    parser.add_argument("--users", type=int, default=None, help="default 100000 (--quick: 20000)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="IDs per request (default 1000; --quick: 200 — cheaper batches, as many requests)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="requests in flight (3 endpoints x 20/s x up to 0.3 s of latency under load need about 16)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run: 20k users, 50 ms of jitter only")
    parser.add_argument("--no-hog", action="store_true", help="no CPU-bound process on the worker's core")
    parser.add_argument(
        "--strict-startup",
        action="store_true",
        help=f"also fail on a whole-command use below {COMMAND_TARGET:.0%}% (start-up included)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON line per case instead of the table")
    parser.add_argument(
        "--log",
        default=None,
        help="write each case's server request log and the run's log lines (JSON) to PREFIX-<limit>-<ms>.json",
    )
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.limit, args.requests, 1.0, float(args.jitter), seed=7)
        return 0
    args.users = args.users or (20_000 if args.quick else 100_000)
    args.batch_size = args.batch_size or (200 if args.quick else 1000)
    jitters = [float(j) for j in (args.jitter or ("0.05" if args.quick else "0.005,0.05,0.1")).split(",")]
    limits = ["endpoint", "account"] if args.limit == "both" else [args.limit]
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"budget e2e: {args.users} users, {args.batch_size} IDs per request, limit {args.requests}/1s, "
        f"hog {'off' if args.no_hog else 'on'}; load average {load_before:.1f} on {cores} cores"
        + (" (a loaded machine: these are loaded-machine figures)" if load_before > cores else ""),
        flush=True,
    )
    if not args.json:
        print(
            f"{'case':<9}{'jitter':>9}{'requests':>9}{'429s':>6}{'max/win':>8}{'sending':>10}"
            f"{'budget-bound':>14}{'starved/stalled/n':>18}{'command':>10}{'first':>10}{'wall':>10}"
            f"{'ceiling':>10}{'floor':>10}",
            flush=True,
        )
    misses: list[str] = []
    startup: list[str] = []
    for limit in limits:
        for jitter in jitters:
            case = _case_args(args, limit, jitter)
            if args.log:
                case.log = f"{args.log}-{limit}-{round(jitter * 1000)}.json"
            fig = run(case)
            fig = {"limit": limit, "jitter": jitter, "hog": not args.no_hog, "users": args.users, **fig}
            print(json.dumps(fig) if args.json else _line(fig), flush=True)
            name = f"{limit} @ {jitter * 1000:g} ms"
            if fig["429s"]:
                misses.append(f"{name}: {fig['429s']} x 429 (target 0)")
            if fig["max_per_window"] > args.requests:
                misses.append(f"{name}: {fig['max_per_window']} in one window (limit {args.requests})")
            if not fig["sending_use"] >= SENDING_TARGET:
                misses.append(
                    f"{name}: sending part at {fig['sending_use']:.1%} (target {SENDING_TARGET:.0%})"
                )
            if not fig["command_use"] >= COMMAND_TARGET:
                startup.append(
                    f"{name}: whole command at {fig['command_use']:.1%} (target {COMMAND_TARGET:.0%}; first "
                    f"request after {fig['first_request_after_s']} s; a minimal polars + aiohttp client's first request "
                    f"after {fig['floor_first_request_s']} s caps any client at {fig['command_ceiling']:.1%})"
                )
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"targets: 0 x 429, max/win <= {args.requests}, sending >= {SENDING_TARGET:.0%}; whole command >= "
        f"{COMMAND_TARGET:.0%} ({'enforced' if args.strict_startup else 'printed only: --strict-startup'}); "
        f"load average now {load_after:.1f} on {cores} cores",
        flush=True,
    )
    for miss in misses:
        print(f"MISS: {miss}", file=sys.stderr)
    for miss in startup:
        print(f"{'MISS' if args.strict_startup else 'start-up'}: {miss}", file=sys.stderr)
    return 1 if misses or (args.strict_startup and startup) else 0


if __name__ == "__main__":
    sys.exit(main())
