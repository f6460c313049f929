"""End to end: ``sync.run.run`` for N users × (tags + 5 attributes) against an unlimited Netmera sandbox.

The sandbox runs in its own process (``python -m sync sandbox netmera --port 0``, no limits, no faults); this
process plans the job (polars), dispatches it (aiohttp, one session, unthrottled budgets) and records every
batch in the SQLite ledger — the whole ``pushsync run`` path. Data come from ``bench/gen_data.py`` (clean rows).

Reports the planning time, the dispatch time, requests/s and IDs/s (over the dispatch and end to end), and
checks the sandbox applied exactly what was sent (``/_sandbox/stats``). Exits 1 when the run is not OK or the
sandbox disagrees.

    .venv/bin/python bench/bench_run.py                 # 1,000,000 users (≈1-2 min on 2 shared cores)
    .venv/bin/python bench/bench_run.py --users 100000  # shorter
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import secrets
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from _common import DATA  # noqa: E402
from gen_data import generate_users  # noqa: E402

from sync.config import load_job  # noqa: E402
from sync.demo import start_sandbox_process, stop_sandbox_process  # noqa: E402
from sync.dispatch.budget import RateBudget  # noqa: E402
from sync.logs import configure_logging  # noqa: E402
from sync.run import RunOptions, run  # noqa: E402


def write_job(path: Path, data: Path, workdir: Path, concurrency: int) -> Path:
    path.write_text(
        f"""version: 1
name: bench-run
workdir: {workdir}
destination: {{platform: netmera, base_url: "http://127.0.0.1:1/rest/3.0/", secret: {{env: BENCH_KEY}}}}
sources:
  - name: users
    path: {data}
    ext_id: customer_id
    attributes:
      first_name: {{attribute: name}}
      last_name: {{attribute: surname}}
      city: string
      score: number
      vip: {{attribute: isVip, type: boolean}}
    tags: [{{column: segments, delimiter: '|'}}]
dispatch:
  concurrency: {concurrency}
  queue_size: 64
  request_timeout: 60
""",
        encoding="utf-8",
    )
    return path


def sandbox_stats(root: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{root}/_sandbox/stats", timeout=30) as resp:
        stats: dict[str, object] = json.loads(resp.read())
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure_logging("warning")

    out = HERE / "out" / "run"
    out.mkdir(parents=True, exist_ok=True)
    data = DATA / f"users-clean-{args.users}.csv"
    if not data.exists():
        t0 = time.perf_counter()
        generate_users(data, args.users, bad_every=10**12, duplicate_every=10**12)
        print(f"generated {args.users:,} users in {time.perf_counter() - t0:.1f} s -> {data}", flush=True)
    workdir = out / f"work-{args.users}"
    job_path = write_job(out / "job.yaml", data, workdir, args.concurrency)
    key = "bench-" + secrets.token_hex(12)
    process, url = start_sandbox_process(key, {}, out)
    try:
        job = load_job(job_path)
        job = dataclasses.replace(job, destination=dataclasses.replace(job.destination, base_url=url))
        started = time.perf_counter()
        outcome = asyncio.run(
            run(
                job,
                RunOptions(api_key=key, budget_factory=lambda _endpoint: RateBudget(None), progress="none"),
            )
        )
        wall = time.perf_counter() - started
        stats = sandbox_stats(url.removesuffix("/rest/3.0/"))
    finally:
        stop_sandbox_process(process)

    summary = outcome.summary
    requests, ids = summary.requests, summary.ids_ok
    dispatch = summary.elapsed
    applied = stats["applied"]
    assert isinstance(applied, dict)
    sent_by_endpoint = {e.endpoint: e.ids_ok for e in summary.endpoints}
    agree = (
        stats["requests_total"] == requests
        and applied.get("setProfileAttributes") == sent_by_endpoint.get("setProfileAttributes") == args.users
        and applied.get("tagUsers") == sent_by_endpoint.get("tagUsers")
    )
    report = {
        "users": args.users,
        "concurrency": args.concurrency,
        "requests": requests,
        "ids": ids,
        "wall_seconds": round(wall, 2),
        "planning_seconds": round(wall - dispatch, 2),
        "dispatch_seconds": round(dispatch, 2),
        "requests_per_second_dispatch": round(requests / dispatch, 1),
        "ids_per_second_dispatch": round(ids / dispatch),
        "requests_per_second_end_to_end": round(requests / wall, 1),
        "ids_per_second_end_to_end": round(ids / wall),
        "p50_ms": {e.endpoint: round(e.p50_ms or 0, 1) for e in summary.endpoints},
        "exit_code": int(outcome.exit_code),
        "sandbox_agrees": agree,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{args.users:,} users × (tags + 5 attributes), unlimited sandbox in its own process, 2 shared cores"
        )
        print(
            f"  requests {requests:,}, IDs {ids:,}; wall {wall:.1f} s = planning {wall - dispatch:.1f} s "
            f"+ dispatch {dispatch:.1f} s"
        )
        print(f"  dispatch:    {requests / dispatch:,.0f} requests/s, {ids / dispatch:,.0f} IDs/s")
        print(f"  end to end:  {requests / wall:,.0f} requests/s, {ids / wall:,.0f} IDs/s")
        print(f"  p50 latency per endpoint (ms): {report['p50_ms']}")
        print(f"  run exit code {int(outcome.exit_code)}; sandbox applied what was sent: {agree}")
    return 0 if outcome.exit_code == 0 and agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
