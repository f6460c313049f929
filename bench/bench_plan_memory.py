"""Peak memory of `pushsync plan` on a large CRM export (target: ≤ 512 MB RSS for 10M rows).

    .venv/bin/python bench/bench_plan_memory.py                 # 10M rows (≈1.4 GB CSV), about 1.5 min
    .venv/bin/python bench/bench_plan_memory.py --rows 1000000  # quicker
    .venv/bin/python bench/bench_plan_memory.py --format parquet --batches

Generates the data with bench/gen_data.py (cached under bench/data/), writes a job mapping it like the users source
of jobs/example.yaml (attributes, tags, push/email/SMS opt-ins, categories, email and MSISDN updates), then runs
`pushsync plan --output json` in a subprocess and measures its peak resident set size: psutil polls it every
50 ms, and a small wrapper process reads the kernel's own high-water mark (getrusage RUSAGE_CHILDREN ru_maxrss)
when it exits — the larger of the two is reported. ``--batches`` also streams every batch the plan makes (much slower: it builds
every request body). Exits 0 when the peak is within the limit, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import DATA  # noqa: E402
from gen_data import write_job  # noqa: E402

LIMIT_MB = 512

_WRAPPER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""

_BATCH_DRIVER = """
import sys
from sync.config import load_job
from sync.planning.planning import build_plan
with build_plan(load_job(sys.argv[1])) as plan:
    s = plan.summary()
    n = sum(1 for _ in plan.batches())
    print(n, s.total_requests, s.rejected_count)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--format", choices=["csv", "parquet"], default="csv")
    parser.add_argument("--limit-mb", type=float, default=LIMIT_MB)
    parser.add_argument("--batches", action="store_true", help="also stream every batch (slow)")
    args = parser.parse_args(argv)

    data = DATA / f"users-{args.rows}.{args.format}"
    if not data.exists():
        t0 = time.monotonic()
        tmp = data.with_suffix(".tmp")
        # In a child process: the kernel's ru_maxrss of a forked child starts from the parent's size, so the
        # parent must stay small for the plan's figure to be its own.
        gen = [sys.executable, str(HERE / "gen_data.py"), "--rows", str(args.rows), "--format", args.format]
        subprocess.run([*gen, "--out", str(tmp)], check=True, stdout=subprocess.DEVNULL)
        tmp.rename(data)
        print(f"generated {args.rows:,} rows in {time.monotonic() - t0:.1f} s -> {data}")
    out = HERE / "out"
    job = write_job(
        out / f"bench-plan-{args.rows}-{args.format}.yaml", data, name="bench-plan", workdir=str(out / "work")
    )

    if args.batches:
        cmd = [sys.executable, "-c", _BATCH_DRIVER, str(job)]
    else:
        cmd = [sys.executable, "-m", "sync", "plan", str(job), "--output", "json"]
    # A small wrapper process runs the plan and reports the kernel's high-water mark of its only child: read
    # from this process, RUSAGE_CHILDREN would also count the data generator.
    report = out / "maxrss.txt"
    wrapper = [sys.executable, "-c", _WRAPPER, str(report), *cmd]
    t0 = time.monotonic()
    proc = subprocess.Popen(wrapper, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            for child in watched.children(recursive=True):
                peak = max(peak, child.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    elapsed = time.monotonic() - t0
    kernel_peak = int(report.read_text()) * 1024 if report.exists() else 0  # ru_maxrss is in KiB on Linux
    peak_mb = max(peak, kernel_peak) / 2**20
    if proc.returncode != 0:
        print(stderr, file=sys.stderr)
        print(f"FAIL: plan exited with {proc.returncode}")
        return 1
    if args.batches:
        batches, requests, rejected = map(int, stdout.split())
        detail = f"{batches:,} batches streamed ({requests:,} in the summary), {rejected:,} rejected rows"
    else:
        doc = json.loads(stdout)
        detail = (
            f"{doc['requests']:,} requests, {doc['ids']:,} IDs, {doc['rows']['rejected']:,} rejected rows"
        )
    size_mb = data.stat().st_size / 1e6
    print(
        f"machine: {platform.machine()}, {psutil.cpu_count()} CPU(s), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM (shared with other work)"
    )
    print(f"input: {args.rows:,} rows, {args.format}, {size_mb:,.0f} MB")
    print(f"plan: {elapsed:.1f} s; {detail}")
    print(
        f"peak RSS: {peak_mb:.0f} MB (limit {args.limit_mb:.0f} MB; psutil polling {peak / 2**20:.0f} MB, "
        f"kernel high-water mark {kernel_peak / 2**20:.0f} MB)"
    )
    ok = peak_mb <= args.limit_mb
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
