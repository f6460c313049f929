"""Benchmark of the Netmera sandbox: tagUsers throughput (1000 extIds per request) and the memory of its state.

Throughput: the sandbox runs in its own process (``python -m sync sandbox netmera``, one event loop = one core,
stats on, as always); the load comes from this process over keep-alive connections with a minimal raw-socket
HTTP/1.1 client, so the client costs far less than the server and the server's core is what is measured.
Every request tags 1000 distinct extIds (new users are created on first sight, as in a real first sync).

Memory: builds N users three ways, each in a fresh child process, and measures the RSS growth of each, extrapolated
linearly to 10M: users as tagUsers creates them (extId + one tag); full users (one device, a 2-key profile on half, one tag)
whose tag came over the API — tagUsers holds its own copies of the extId strings, as a real sync does; and the same
full users with the tag from the seed (one extId string per user).

    .venv/bin/python bench/bench_sandbox.py                  # 15 s of load, 1M users for memory (≈1 min)
    .venv/bin/python bench/bench_sandbox.py --memory-only --users 10000000     # 10M users measured directly

Exits 1 when throughput is below ``--target`` requests per second (3,000), or when 10M full users (tag over the
API) would need more than ``--memory-target`` GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
KEY = "bench-netmera-key-0123456789"
MEMORY_TARGET_GIB = 5.0
"""Issue #2: the state of 10M users must fit in a few GB (it took 6.3 GiB before the compact records)."""
TAGGED = "tagged users (as tagUsers creates them)"
FULL_API = "full users (device, profile on half, tag over the API)"
FULL_SEEDED = "full users (device, profile on half, tag from the seed)"


def build_requests(host: str, port: int, count: int, ids_per_request: int) -> list[bytes]:
    """Pre-encoded HTTP/1.1 tagUsers requests, each with its own 1000 extIds (a few hundred, reused in a loop)."""
    out = []
    for i in range(count):
        ids = [f"user-{i * ids_per_request + j:09d}" for j in range(ids_per_request)]
        body = json.dumps({"tag": f"tag{i % 10}", "extIds": ids}).encode()
        head = (
            f"POST /rest/3.0/tagUsers HTTP/1.1\r\nHost: {host}:{port}\r\nX-netmera-api-key: {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        out.append(head + body)
    return out


async def _worker(
    host: str, port: int, requests: list[bytes], offset: int, deadline: float, counts: dict[str, int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = offset
    try:
        while time.perf_counter() < deadline:
            writer.write(requests[i % len(requests)])
            i += 1
            header = await reader.readuntil(b"\r\n\r\n")
            status = int(header[9:12])
            length = 0
            for line in header.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            counts[str(status)] = counts.get(str(status), 0) + 1
    finally:
        writer.close()
        await writer.wait_closed()


async def load(
    host: str, port: int, seconds: float, connections: int, ids: int
) -> tuple[dict[str, int], float]:
    requests = build_requests(host, port, 400, ids)
    warm: dict[str, int] = {}
    await asyncio.gather(
        *(_worker(host, port, requests, c * 7, time.perf_counter() + 1.0, warm) for c in range(4))
    )
    counts: dict[str, int] = {}
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(
        *(_worker(host, port, requests, c * 13, deadline, counts) for c in range(connections))
    )  # bounded: one task per connection
    return counts, time.perf_counter() - start


def throughput(args: argparse.Namespace) -> tuple[float, dict[str, int], float]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sync", "sandbox", "netmera", "--port", "0", "--api-key", KEY],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        port = int(url.split(":")[2].split("/")[0])
        server = psutil.Process(proc.pid)
        server.cpu_percent(None)
        counts, elapsed = asyncio.run(load("127.0.0.1", port, args.seconds, args.connections, args.ids))
        cpu = server.cpu_percent(None)
        return sum(counts.values()) / elapsed, counts, cpu
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def build_and_measure(kind: str, users: int) -> float:
    """Build ``users`` users of one ``kind`` in this process; the RSS growth per user, in bytes."""
    from sync.sandboxes.netmera_state import NetmeraState

    def tag_over_api(state: NetmeraState, prefix: str) -> None:
        # as tagUsers does: 1000 new extId strings per request, added by one set.update
        for start in range(0, users, 1000):
            state.tag("seeded", {f"{prefix}{i}" for i in range(start, min(users, start + 1000))})

    def full(state: NetmeraState, *, tag_from_seed: bool) -> None:
        state.add_synthetic(users, 1, prefix="u", tag="seeded" if tag_from_seed else None)
        if not tag_from_seed:
            tag_over_api(state, "u")
        for i in range(0, users, 2):
            state.user(f"u{i}").profile = {"age": i % 90, "city": "Istanbul"}

    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    state = NetmeraState()
    if kind == TAGGED:
        tag_over_api(state, "user-")
    else:
        full(state, tag_from_seed=kind == FULL_SEEDED)
    gc.collect()
    return (process.memory_info().rss - before) / users


def memory(users: int) -> dict[str, float]:
    """Bytes per user for each kind of user, each built in a fresh process (so no kind reuses memory another
    one freed)."""
    out: dict[str, float] = {}
    for kind in (TAGGED, FULL_API, FULL_SEEDED):
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "--build-only", kind, "--users", str(users)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        out[kind] = float(done.stdout.strip().splitlines()[-1])
        print(f"  built {users:,} {kind} in {time.perf_counter() - started:.1f} s", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--ids", type=int, default=1000)
    parser.add_argument("--users", type=int, default=1_000_000, help="users seeded for the memory figure")
    parser.add_argument("--target", type=float, default=3000.0)
    parser.add_argument(
        "--memory-target",
        type=float,
        default=MEMORY_TARGET_GIB,
        help="most GiB that 10M full users (tag over the API) may need",
    )
    parser.add_argument("--memory-only", action="store_true", help="skip the throughput part")
    parser.add_argument("--build-only", choices=(TAGGED, FULL_API, FULL_SEEDED), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:  # the child process of memory(): build one kind of users, print bytes per user
        print(build_and_measure(args.build_only, args.users))
        return 0

    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    failures = []
    if not args.memory_only:
        rate, counts, cpu = throughput(args)
        print(
            f"tagUsers: {rate:,.0f} req/s, {rate * args.ids:,.0f} IDs/s ({args.ids} IDs/request, "
            f"{args.connections} connections, {args.seconds:.0f} s, sandbox CPU {cpu:.0f}%, statuses {counts})"
        )
        if cpu > 0:
            # On a shared machine the sandbox may not get its whole core; this is what one full core would serve.
            print(f"tagUsers per CPU-second of the sandbox: {rate / (cpu / 100):,.0f} req")
        if rate < args.target or counts.get("200", 0) != sum(counts.values()):
            failures.append(f"below the target of {args.target:,.0f} req/s or errors")
    per_user = memory(args.users)
    for label, size in per_user.items():
        print(
            f"memory, {label}: {size:,.0f} bytes/user on {args.users:,} users "
            f"→ {size * 10_000_000 / 2**30:.2f} GiB for 10M users"
        )
    if per_user[FULL_API] * 10_000_000 / 2**30 > args.memory_target:
        failures.append(f"10M full users would need more than {args.memory_target} GiB")
    if failures:
        print(f"FAIL: {'; '.join(failures)}", file=sys.stderr)
        return 1
    print(
        f"OK: targets met ({'memory only' if args.memory_only else f'{args.target:,.0f} req/s'}, "
        f"10M full users within {args.memory_target} GiB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
