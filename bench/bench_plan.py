"""`pushsync plan` speed, linearity and memory at 1M and 10M rows (issue 13's planning targets).

    .venv/bin/python bench/bench_plan.py                         # 1M and 10M rows, CSV (generates missing data)
    .venv/bin/python bench/bench_plan.py --format parquet        # the same from Parquet
    .venv/bin/python bench/bench_plan.py --rows 1000000 --rows 10000000
    .venv/bin/python bench/bench_plan.py --format parquet --floor   # also bench/floor_plan.py, same files

For each row count, generates the data with bench/gen_data.py (cached in bench/data/, never committed), writes a
job mapping it like the users source of jobs/example.yaml (bench/gen_data.py's ``write_job``: 6 attributes, a
tag list, 5 opt-ins, email and MSISDN — every row validated and typed), then runs
``pushsync plan --output json`` in a subprocess: the whole planning path (read, validate, stage, settle, count
every request) from process start. Reports the wall time, rows/s and the peak RSS (psutil polling every 50 ms and
the kernel's high-water mark of the plan process, whichever is larger), then the largest/smallest time ratio.

Targets (issue 13): ≥ 1,000,000 rows/s at the largest size, time linear in rows (10M / 1M ≤ 11×), peak RSS
≤ 512 MB. Exits 1 on a miss. Figures depend on the machine and on what else runs on it: say which.

``--floor`` runs ``bench/floor_plan.py`` on the same file right after each plan: polars alone doing the parsing,
checks and de-duplication of that job in one in-memory query on every core, without rejects, order, batches,
counts or a memory bound — the speed no planner built on polars beats on this machine (printed, not a target).
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

TARGET_ROWS_PER_SECOND = 1_000_000
TARGET_RATIO_PER_10X = 11.0
TARGET_RSS_MB = 512.0

_WRAPPER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1] + ".out", "w")).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def data_for(rows: int, fmt: str) -> Path:
    """The cached generated file for ``rows`` (generated in a child process when missing)."""
    data = DATA / f"users-{rows}.{fmt}"
    if not data.exists():
        t0 = time.monotonic()
        tmp = data.with_suffix(".tmp")
        gen = [
            sys.executable,
            str(HERE / "gen_data.py"),
            "--rows",
            str(rows),
            "--format",
            fmt,
            "--out",
            str(tmp),
        ]
        subprocess.run(gen, check=True, stdout=subprocess.DEVNULL)
        tmp.rename(data)
        print(f"generated {rows:,} rows in {time.monotonic() - t0:.1f} s -> {data}", flush=True)
    return data


def plan_once(rows: int, fmt: str) -> dict[str, float]:
    """Run ``pushsync plan`` on ``rows`` generated rows; wall seconds, peak RSS (MB) and the plan's counts."""
    data = data_for(rows, fmt)
    out = HERE / "out"
    job = write_job(out / f"bench-plan-{rows}-{fmt}.yaml", data, name="bench-plan", workdir=str(out / "work"))
    report = out / f"plan-{rows}-{fmt}.maxrss"
    cmd = [sys.executable, "-m", "sync", "plan", str(job), "--output", "json"]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRAPPER, str(report), *cmd], cwd=ROOT, stderr=subprocess.PIPE
    )
    watched = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            for child in watched.children(recursive=True):
                peak = max(peak, child.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"pushsync plan exited with {proc.returncode}:\n{stderr.decode(errors='replace')}")
    kernel_peak = int(report.read_text()) * 1024  # ru_maxrss: KiB on Linux
    doc = json.loads(Path(str(report) + ".out").read_text(encoding="utf-8"))
    return {
        "rows": rows,
        "seconds": elapsed,
        "rows_per_second": rows / elapsed,
        "peak_rss_mb": max(peak, kernel_peak) / 2**20,
        "requests": doc["requests"],
        "rows_clean": doc["rows"]["clean"],
        "rows_rejected": doc["rows"]["rejected"],
    }


def floor_once(rows: int, fmt: str) -> dict[str, float]:
    """Run ``bench/floor_plan.py`` on the file of ``rows`` rows: its JSON line (seconds, CPU-s, peak RSS)."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "floor_plan.py"), str(data_for(rows, fmt))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(proc.stdout))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, action="append", help="row counts (default 1M and 10M)")
    parser.add_argument("--format", choices=["csv", "parquet"], default="csv")
    parser.add_argument("--floor", action="store_true", help="also run bench/floor_plan.py on each file")
    args = parser.parse_args(argv)
    sizes = sorted(args.rows or [1_000_000, 10_000_000])

    cpus = psutil.cpu_count()
    print(
        f"machine: {platform.machine()}, {cpus} CPU(s), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"load average {psutil.getloadavg()[0]:.1f} at start (shared with other work: say so with the figures)"
    )
    results = []
    for rows in sizes:
        r = plan_once(rows, args.format)
        results.append(r)
        print(
            f"  {rows:>12,} rows ({args.format}): {r['seconds']:6.1f} s, {r['rows_per_second']:>10,.0f} rows/s, "
            f"peak RSS {r['peak_rss_mb']:5.0f} MB; {int(r['rows_clean']):,} clean, "
            f"{int(r['rows_rejected']):,} rejected, {int(r['requests']):,} requests",
            flush=True,
        )
        if args.floor:
            f = floor_once(rows, args.format)
            print(
                f"  {'floor':>12} (polars alone): {f['seconds']:6.1f} s, {rows / f['seconds']:>10,.0f} rows/s, "
                f"peak RSS {f['peak_rss_mb']:5.0f} MB, {f['cpu_s']:.1f} CPU-s",
                flush=True,
            )
    ok = True
    largest = results[-1]
    verdict = largest["rows_per_second"] >= TARGET_ROWS_PER_SECOND
    ok &= verdict
    print(
        f"rows/s at {int(largest['rows']):,} rows: {largest['rows_per_second']:,.0f} "
        f"(target ≥ {TARGET_ROWS_PER_SECOND:,}) {'PASS' if verdict else 'FAIL'}"
    )
    if len(results) > 1:
        small = results[0]
        ratio = largest["seconds"] / small["seconds"]
        factor = largest["rows"] / small["rows"]
        limit = TARGET_RATIO_PER_10X * factor / 10
        verdict = ratio <= limit
        ok &= verdict
        print(
            f"time ratio {int(largest['rows']):,} / {int(small['rows']):,} rows: {ratio:.1f}× "
            f"(target ≤ {limit:.1f}×) {'PASS' if verdict else 'FAIL'}"
        )
    peak = max(r["peak_rss_mb"] for r in results)
    verdict = peak <= TARGET_RSS_MB
    ok &= verdict
    print(f"peak RSS: {peak:.0f} MB (target ≤ {TARGET_RSS_MB:.0f} MB) {'PASS' if verdict else 'FAIL'}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
