"""The send path alone: client CPU per 1000-ID request of the dispatcher, ledger, progress and metrics.

Batches are built before the clock starts — 1000 IDs each, their bodies already encoded JSON bytes (what the
columnar builders hand over) — so nothing but the per-batch path is measured: the feeder, the channels, the
budgets (unconfigured, as ``pushsync run`` makes them), the retry loop, ``sync.platforms._http``, the Netmera
client, the SQLite ledger (planned, sent, attempt, result), the log progress and the Prometheus observer.

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
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _common import cores, pin_self, process_cpu, sandbox, start_server, stop_server  # noqa: E402

from sync.config import Destination, DispatchSettings  # noqa: E402
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
    """``n`` batches of 1000 IDs: one profile batch (6 attributes) for two tag batches, as in the 1M-user run.
    Bodies are encoded bytes, or (``encoded=False``) JSON-ready objects, as builders not yet columnar make them."""
    out = []
    for b in range(n):
        ids = tuple(f"c{b:05d}{i:04d}" for i in range(IDS))
        if b % 3:
            body: Any = {"extIds": list(ids), "tag": f"seg{b % 7}"}
            endpoint, operation = "tagUsers", Operation.TAG
        else:
            items = [
                {
                    "extId": x,
                    "profile": {
                        "city": "Izmir",
                        "isVip": i % 2 == 0,
                        "name": "Ada",
                        "score": i * 0.5,
                        "surname": "Lovelace",
                        "birthDate": "1990-01-02",
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


async def dispatch(url: str, key: str, batches: list[Batch], ledger_path: Path, concurrency: int) -> tuple:
    settings = DispatchSettings(concurrency=concurrency, queue_size=64, request_timeout=60)
    run_id = new_run_id()
    metrics = RunMetrics(run_id=run_id, job="bench", platform="netmera")
    progress = LogProgress(total_ids=len(batches) * IDS, total_requests=len(batches), job="bench", run=run_id)
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run(run_id, job="bench", platform="netmera")
        async with NetmeraClient(Destination("netmera", url), key, max_connections=concurrency) as client:
            dispatcher = Dispatcher(
                client, settings, ledger=ledger, run_id=run_id, observers=[progress, metrics]
            )
            cpu0, wall0 = os.times(), time.perf_counter()
            report = await dispatcher.run(batches)
            cpu1, wall1 = os.times(), time.perf_counter()
        ledger.finish_run(run_id, status="done", exit_code=0)
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return report, cpu, wall1 - wall0


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
    batches = make_batches(args.requests, encoded=not args.json_bodies)
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(key, Path(tmp), kind=args.server, core=server_core)
        try:
            profiler = cProfile.Profile() if args.profile else None
            if profiler is not None:
                profiler.enable()
            report, cpu, wall = asyncio.run(
                dispatch(url, key, batches, Path(tmp) / "ledger.sqlite", args.concurrency)
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
    ok = report.outcome == "completed" and ids_ok == len(batches) * IDS
    ok = ok and (args.server == "bare" or applied == ids_ok)
    kind = "JSON-ready bodies" if args.json_bodies else "bytes bodies"
    print(f"dispatch only: {requests:,} requests × {IDS} IDs ({kind}), ledger + progress + metrics")
    print(
        f"  client pinned to core {client_core}, {args.server} server to core {server_core} (loaded machine: see README)"
    )
    print(f"  wall {wall:.2f} s, {requests / wall:,.0f} requests/s; client CPU {cpu:.2f} s")
    print(f"  client CPU per 1000-ID request: {per_request_ms:.3f} ms (target ≤ {TARGET_MS} ms)")
    floor_ms = floor_cpu / len(batches) * 1000
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
