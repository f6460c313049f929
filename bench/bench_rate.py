"""Rate budget against a server that counts in clock-aligned fixed windows, compressed in time, with jitter.

A local aiohttp server counts every request by the window of its *arrival* (``floor(time.time() / T)``) and
answers 429 above N. Workers acquire a slot, wait a uniform 0..J network jitter, then send. Several limiters
run side by side, each on its own path and counter:

* ``pushsync``   — sync.dispatch.budget.RateBudget, default (window-aligned) settings: the one that must pass;
* ``unaligned``  — RateBudget(align=False): even spacing + sliding cap N per (T + tail);
* ``gcra``       — aiolimiter(1, T/N): even spacing, burst 1;
* ``aiolimiter`` — aiolimiter(N, T): leaky bucket, burst N;
* ``throttle``   — asyncio-throttle(N, T): sliding window, polling.

Reports the largest count in any server window and the utilisation (requests that arrived in complete windows
over N × windows). Exits 1 when pushsync puts more than N into a window or uses less than 97 %.

    .venv/bin/python bench/bench_rate.py [--requests 50] [--period 1] [--jitter 0.05] [--windows 35]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiolimiter import AsyncLimiter
from asyncio_throttle import Throttler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sync.config import RateBudgetSpec
from sync.dispatch.budget import RateBudget


def make_server(limit: int, period: float, arrivals: dict[str, list[float]]) -> web.Application:
    counts: dict[tuple[str, int], int] = defaultdict(int)

    async def handle(request: web.Request) -> web.Response:
        now = time.time()
        mode = request.match_info["mode"]
        arrivals[mode].append(now)
        window = math.floor(now / period)
        counts[mode, window] += 1
        if counts[mode, window] > limit:
            reset = (window + 1) * period - now
            return web.json_response(
                {"code": 429, "error": "rate limited"},
                status=429,
                headers={"Retry-After": f"{reset:.3f}", "X-RateLimit-Remaining": "0"},
            )
        return web.json_response({}, headers={"X-RateLimit-Remaining": str(limit - counts[mode, window])})

    app = web.Application()
    app.router.add_post("/m/{mode}", handle)
    return app


def limiters(n: int, period: float) -> dict[str, Callable[[], Awaitable[Any]]]:
    ours = RateBudget(RateBudgetSpec(n, period))
    unaligned = RateBudget(RateBudgetSpec(n, period), align=False, tail=0.05)
    gcra = AsyncLimiter(1, period / n)
    bucket = AsyncLimiter(n, period)
    throttle = Throttler(n, period)
    return {
        "pushsync": ours.acquire,
        "unaligned": unaligned.acquire,
        "gcra": gcra.acquire,
        "aiolimiter": bucket.acquire,
        "throttle": throttle.acquire,
    }


async def drive(
    session: aiohttp.ClientSession,
    url: str,
    acquire: Callable[[], Awaitable[Any]],
    jitter: float,
    deadline: float,
    workers: int,
    rng: random.Random,
) -> None:
    async def worker() -> None:
        while time.monotonic() < deadline:
            await acquire()
            await asyncio.sleep(
                rng.uniform(0, jitter)
            )  # network jitter before the request reaches the server
            async with session.post(url, json={}) as resp:
                await resp.read()

    async with asyncio.TaskGroup() as tg:
        for _ in range(workers):
            tg.create_task(worker())


def analyse(times: list[float], n: int, period: float) -> dict[str, float]:
    per_window = Counter(math.floor(t / period) for t in times)
    first, last = min(per_window), max(per_window)
    full = [per_window.get(w, 0) for w in range(first + 1, last)]  # the first and last windows are partial
    return {
        "max_per_window": max(per_window.values()),
        "windows": len(full),
        "utilisation": sum(min(c, n) for c in full) / (n * len(full)) if full else 0.0,
        "over_limit_windows": sum(1 for c in per_window.values() if c > n),
    }


async def main(args: argparse.Namespace) -> int:
    arrivals: dict[str, list[float]] = defaultdict(list)
    runner = web.AppRunner(make_server(args.requests, args.period, arrivals), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rng = random.Random(args.seed)
    modes = limiters(args.requests, args.period)
    if not args.compare:
        modes = {"pushsync": modes["pushsync"]}
    deadline = time.monotonic() + args.windows * args.period
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
            asyncio.TaskGroup() as tg,
        ):
            for mode, acquire in modes.items():
                tg.create_task(
                    drive(
                        session,
                        f"http://127.0.0.1:{port}/m/{mode}",
                        acquire,
                        args.jitter,
                        deadline,
                        args.workers,
                        rng,
                    )
                )
    finally:
        await runner.cleanup()
    report = {mode: analyse(arrivals[mode], args.requests, args.period) for mode in modes}
    ours = report["pushsync"]
    ok = ours["max_per_window"] <= args.requests and ours["utilisation"] >= 0.97
    if args.json:
        print(
            json.dumps(
                {
                    "limit": args.requests,
                    "period": args.period,
                    "jitter": args.jitter,
                    "results": report,
                    "ok": ok,
                },
                indent=2,
            )
        )
    else:
        print(
            f"fixed-window server: {args.requests} per {args.period:g} s, jitter 0-{args.jitter * 1000:.0f} ms, "
            f"{args.windows} windows (2 shared cores)"
        )
        print(f"{'limiter':<12} {'max/window':>10} {'over-limit windows':>19} {'utilisation':>12}")
        for mode, r in report.items():
            print(
                f"{mode:<12} {r['max_per_window']:>10.0f} {r['over_limit_windows']:>19.0f} "
                f"{r['utilisation']:>11.1%}"
            )
        print(
            "PASS" if ok else "FAIL",
            f"(pushsync: max {ours['max_per_window']:.0f} <= {args.requests}, "
            f"utilisation {ours['utilisation']:.1%} >= 97%)",
        )
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=50, help="N per window")
    parser.add_argument("--period", type=float, default=1.0, help="window length T, seconds")
    parser.add_argument("--jitter", type=float, default=0.05, help="max network jitter, seconds")
    parser.add_argument("--windows", type=int, default=35, help="run length in windows (>= 30)")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the other limiters side by side (default on)",
    )
    parser.add_argument("--json", action="store_true")
    raise SystemExit(asyncio.run(main(parser.parse_args())))
