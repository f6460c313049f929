"""The send path alone: client CPU per 1000-ID request of the dispatcher, ledger, progress and metrics.

Batches are built before the clock starts — 1000 IDs each, their bodies already encoded JSON bytes (what the
columnar builders hand over) — so nothing but the per-batch path is measured: the feeder, the channels, the
budgets (unconfigured, as ``pushsync run`` makes them), the retry loop, ``sync.platforms._http``, the Netmera
client, the SQLite ledger (planned, sent, attempt, result), the log progress and the Prometheus observer.

As ``pushsync run`` sends a plan, the batches go through per-endpoint lanes (``--plain``: one plain iterable), under
the budget the hand-written bench's job sets (``"*": 1,000,000 requests per second``: a budget far above what is
sent must cost nothing per request; ``--budget 0``: no budget configured). The bodies have the shapes of that job's
requests (``setProfileAttributes`` with its six attributes, ``tagUsers``), made up, or with ``--from-plan USERS``
taken from pushsync's own plan of that job on ``USERS`` clean users (``bench/gen_data.py``; planned before the
clock starts).

The server is ``bench/bare_server.py`` (reads each body whole, answers ``{}``: it can never be the bottleneck),
or with ``--server stateless`` the Netmera sandbox in its stateless mode (``pushsync sandbox netmera
--stateless``: request shapes checked strictly, nothing kept; about 2 ms of its CPU per 1000-item profile
request, so the client then waits and pays more per request for its wake-ups). It runs in its own process pinned
to the last core with ``taskset``; this process is pinned to the first core. The figure is this process's
user+sys CPU time over the dispatch divided by the requests (each carries 1000 IDs).

Target: **≤ 0.75 ms** of client CPU per request — half of the issue's 1.5 ms budget for the whole run (reading,
planning and body building get the other half). The same bodies posted by a bare aiohttp loop (no ledger,
budgets, retries or observers) are measured in the same run and printed beside it: that is the floor (about
0.3 ms here), and the difference is what pushsync's send path adds. Exits 1 on a miss.

    .venv/bin/python bench/bench_dispatch.py                    # 3,000 requests, bare server
    .venv/bin/python bench/bench_dispatch.py --server stateless # against the stateless Netmera sandbox
    .venv/bin/python bench/bench_dispatch.py --requests 1000 --profile out.prof   # with cProfile
    .venv/bin/python bench/bench_dispatch.py --from-plan 1000000 # the 1M-user job's own 3,002 requests
    /work/main/.venv/bin/python bench/bench_dispatch.py --code /work/main   # A/B: another checkout's pushsync

Run the same command for both sides of an A/B, alternating, and compare the best of a few runs: on a shared
machine only CPU figures mean anything, and only side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _code_root() -> Path:
    """The checkout whose pushsync is measured: ``--code DIR`` (read before the imports below), else this one."""
    for i, arg in enumerate(sys.argv):
        if arg == "--code" and i + 1 < len(sys.argv):
            return Path(sys.argv[i + 1]).resolve()
        if arg.startswith("--code="):
            return Path(arg.split("=", 1)[1]).resolve()
    return HERE.parent


sys.path.insert(0, str(_code_root()))
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    DATA,
    cores,
    pin_self,
    process_cpu,
    sandbox,
    start_server,
    stop_server,
)

from sync.config import Destination, DispatchSettings, RateBudgetSpec  # noqa: E402
from sync.dispatch.dispatch import Dispatcher  # noqa: E402
from sync.ledger.ledger import Ledger, new_run_id  # noqa: E402
from sync.logs import configure_logging  # noqa: E402
from sync.platforms.netmera.client import NetmeraClient  # noqa: E402
from sync.records import Batch, Operation, Phase  # noqa: E402
from sync.report.metrics import RunMetrics  # noqa: E402
from sync.report.progress import LogProgress  # noqa: E402

TARGET_MS = 0.75
IDS = 1000


def make_batches(n: int, *, encoded: bool = True) -> list[Batch]:
    """``n`` batches of 1000 IDs: one profile batch (the hand-written job's 6 attributes, keys in canonical
    order) for two tag batches, as in the 1M-user run. Bodies are encoded bytes, or (``encoded=False``)
    JSON-ready objects, as builders not yet columnar make them."""
    out = []
    for b in range(n):
        ids = tuple(f"C{b:05d}{i:04d}" for i in range(IDS))
        if b % 3:
            body: Any = {"extIds": list(ids), "tag": f"seg{b % 7}"}
            endpoint, operation = "tagUsers", Operation.TAG
        else:
            items = [
                {
                    "extId": x,
                    "profile": {
                        "city": "Izmir",
                        "dateOfBirth": 631238400000 + i * 86_400_000,
                        "isVip": i % 2 == 0,
                        "name": "Ada",
                        "score": i * 0.5,
                        "surname": "Lovelace",
                    },
                }
                for i, x in enumerate(ids)
            ]
            body = items
            endpoint, operation = "setProfileAttributes", Operation.SET_ATTRIBUTES
        if encoded:
            body = json.dumps(body, separators=(",", ":")).encode()
        out.append(Batch(f"{b:016x}", endpoint, operation, body, ids, Phase.CHANGES))
    return out


def planned_batches(users: int) -> list[Batch]:
    """Every batch of the hand-written bench's job on ``users`` clean users, as pushsync plans them (in
    ``Plan.batches()`` order); the CSV is reused from ``bench/data/`` or generated there."""
    from bench_handwritten import JOB
    from gen_data import generate_users

    from sync.config import load_job
    from sync.planning.planning import build_plan

    data = DATA / f"users-clean-{users}.csv"
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        generate_users(data, users, bad_every=10**12, duplicate_every=10**12)
    out = HERE / "out" / "dispatch"
    out.mkdir(parents=True, exist_ok=True)
    job_path = out / "job.yaml"
    workdir = out / f"work-{users}"
    job_path.write_text(
        JOB.format(workdir=workdir, url="http://127.0.0.1:1/rest/3.0/", data=data), encoding="utf-8"
    )
    os.environ.setdefault("BENCH_NETMERA_KEY", "bench-plan-only")
    with build_plan(load_job(job_path)) as plan:
        return list(plan.batches())


class GcTimer:
    """Seconds the cyclic garbage collector ran (and its collections by generation) while the block ran."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


class Lanes:
    """The batches as a plan hands them to ``pushsync run``: one lane per endpoint (``LaneSource``)."""

    def __init__(self, batches: list[Batch]) -> None:
        self._by_endpoint: dict[str, list[Batch]] = {}
        for batch in batches:
            self._by_endpoint.setdefault(batch.endpoint, []).append(batch)
        self._phase = batches[0].phase if batches else Phase.CHANGES

    def lanes(self, phase: Phase) -> list[tuple[str, list[Batch]]]:
        return list(self._by_endpoint.items()) if phase == self._phase else []


async def dispatch(
    url: str,
    key: str,
    batches: list[Batch],
    ledger_path: Path,
    concurrency: int,
    *,
    budget: int,
    lanes: bool,
    observers: bool,
) -> tuple:
    budgets = {"*": RateBudgetSpec(budget, 1.0)} if budget else {}
    settings = DispatchSettings(concurrency=concurrency, queue_size=64, request_timeout=60, budgets=budgets)
    run_id = new_run_id()
    metrics = RunMetrics(run_id=run_id, job="bench", platform="netmera")
    total_ids = sum(len(b.ext_ids) for b in batches)
    progress = LogProgress(total_ids=total_ids, total_requests=len(batches), job="bench", run=run_id)
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run(run_id, job="bench", platform="netmera")
        async with NetmeraClient(Destination("netmera", url), key, max_connections=concurrency) as client:
            dispatcher = Dispatcher(
                client,
                settings,
                ledger=ledger,
                run_id=run_id,
                observers=[progress, metrics] if observers else [],
            )
            gc_timer = GcTimer()
            cpu0, wall0 = os.times(), time.perf_counter()
            with gc_timer:
                report = await dispatcher.run(Lanes(batches) if lanes else batches)
            cpu1, wall1 = os.times(), time.perf_counter()
        ledger.finish_run(run_id, status="done", exit_code=0)
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return report, cpu, wall1 - wall0, gc_timer


async def bare_loop(url: str, key: str, batches: list[Batch], concurrency: int) -> tuple[float, float]:
    """The floor: the same bodies posted by a plain aiohttp loop (no ledger, budgets or retries); CPU, wall."""
    import aiohttp

    headers = {"X-netmera-api-key": key, "Content-Type": "application/json"}
    queue = list(reversed(batches))

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            batch = queue.pop()
            body = batch.body if isinstance(batch.body, bytes) else json.dumps(batch.body).encode()
            async with session.post(url + batch.endpoint, data=body) as resp:
                await resp.read()
                resp.raise_for_status()

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        cpu0, wall0 = os.times(), time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        cpu1, wall1 = os.times(), time.perf_counter()
    return (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), wall1 - wall0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--profile", type=Path, help="write a cProfile of the dispatch here")
    parser.add_argument(
        "--budget",
        type=int,
        default=1_000_000,
        help="requests per second of the '*' budget (default: the hand-written job's 1,000,000; 0: none)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="send one plain iterable of batches instead of per-endpoint lanes",
    )
    parser.add_argument(
        "--no-observers", action="store_true", help="without the log progress and the Prometheus observer"
    )
    parser.add_argument(
        "--from-plan",
        type=int,
        metavar="USERS",
        help="send the batches pushsync plans for the hand-written job on USERS users (--requests is ignored)",
    )
    parser.add_argument(
        "--code", type=Path, help="measure the pushsync of this checkout (e.g. /work/main) with its own venv"
    )
    parser.add_argument(
        "--json-bodies",
        action="store_true",
        help="JSON-ready bodies (encoded by aiohttp on the loop), as builders not yet columnar hand them over",
    )
    parser.add_argument(
        "--server",
        choices=["bare", "stateless"],
        default="bare",
        help="a bare server that answers {} (default), or the stateless Netmera sandbox (checks every body)",
    )
    args = parser.parse_args()
    configure_logging("warning")
    client_core, server_core = cores()
    pin_self(client_core)
    key = "bench-" + secrets.token_hex(12)
    if args.from_plan:
        batches = planned_batches(args.from_plan)
    else:
        batches = make_batches(args.requests, encoded=not args.json_bodies)
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(key, Path(tmp), kind=args.server, core=server_core)
        try:
            profiler = cProfile.Profile() if args.profile else None
            if profiler is not None:
                profiler.enable()
            report, cpu, wall, gc_timer = asyncio.run(
                dispatch(
                    url,
                    key,
                    batches,
                    Path(tmp) / "ledger.sqlite",
                    args.concurrency,
                    budget=args.budget,
                    lanes=not args.plain,
                    observers=not args.no_observers,
                )
            )
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile)
            server_cpu = process_cpu(process.pid)
            stats: dict[str, object] = {}
            if args.server == "stateless":
                stats = sandbox(url, "stats")
            # After pushsync's figures are read: the floor's requests must not count in them.
            floor_cpu, floor_wall = asyncio.run(bare_loop(url, key, batches, args.concurrency))
        finally:
            stop_server(process)
    requests = sum(e.requests for e in report.endpoints.values())
    ids_ok = sum(e.ids_ok for e in report.endpoints.values())
    per_request_ms = cpu / max(requests, 1) * 1000
    applied_by = stats.get("applied", {})
    applied = sum(applied_by.values()) if isinstance(applied_by, dict) else 0
    ids_planned = sum(len(b.ext_ids) for b in batches)
    ok = report.outcome == "completed" and ids_ok == ids_planned
    ok = ok and (args.server == "bare" or applied == ids_ok)
    kind = "JSON-ready bodies" if args.json_bodies else "bytes bodies"
    kind += f", planned for {args.from_plan:,} users" if args.from_plan else ""
    budget = f"'*' budget {args.budget:,}/s" if args.budget else "no budget"
    watched = "" if args.no_observers else " + progress + metrics"
    print(
        f"dispatch only ({_code_root()}): {requests:,} requests, {ids_planned / max(len(batches), 1):,.0f} IDs "
        f"each ({kind}), {'plain iterable' if args.plain else 'lanes'}, {budget}, ledger{watched}"
    )
    print(
        f"  client pinned to core {client_core}, {args.server} server to core {server_core} (loaded machine: see README)"
    )
    print(f"  wall {wall:.2f} s, {requests / wall:,.0f} requests/s; client CPU {cpu:.2f} s")
    print(f"  client CPU per 1000-ID request: {per_request_ms:.3f} ms (target ≤ {TARGET_MS} ms)")
    print(
        f"    of which the garbage collector {gc_timer.seconds / max(requests, 1) * 1000:.3f} ms "
        f"(collections by generation {gc_timer.collections})"
    )
    floor_ms = floor_cpu / max(len(batches), 1) * 1000
    print(
        f"  the same bodies from a bare aiohttp loop: {floor_ms:.3f} ms per request ({floor_wall:.2f} s wall): "
        f"pushsync's send path adds {per_request_ms - floor_ms:.3f} ms"
    )
    print(
        f"  server ({args.server}) CPU {server_cpu:.2f} s: {server_cpu / max(requests, 1) * 1000:.3f} ms per request"
    )
    checked = f", applied by the server {applied:,}" if args.server == "stateless" else ""
    print(f"  outcome {report.outcome}; IDs confirmed {ids_ok:,}{checked}")
    if args.profile:
        print(f"  profile written to {args.profile}")
    met = ok and per_request_ms <= TARGET_MS
    print("  target met" if met else "  TARGET MISSED" if ok else "  RUN FAILED")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
