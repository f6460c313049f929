"""The CPU a ``pushsync run`` process has used when its first request arrives (issues 13 and 14: start-up).

Wall times to the first request follow whatever else runs on the machine; the CPU the run spent to get there
follows it much less. Starts the Netmera sandbox in its own process, runs the real CLI on generated data (the
same job as ``bench_first_request.py``) and polls the run's CPU (user + system, every thread, psutil) every
10 ms until the sandbox counts its first request; prints both. Not a ``bench_*`` script: ``make bench`` does
not run it. To compare two checkouts, run it from each (their own ``.venv``), alternating::

    .venv/bin/python bench/first_request_cpu.py --format csv --rows 100000
    PIN="taskset -c 0" .venv/bin/python bench/first_request_cpu.py   # the run pinned (e.g. beside a CPU hog)

The CPU figure is read just before the request is seen: it may miss up to one poll's worth (10 ms).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_first_request as first  # noqa: E402
from bench_plan import data_for  # noqa: E402
from gen_data import write_job  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=["csv", "parquet"], default="parquet")
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    data = data_for(args.rows, args.format)
    out = HERE / "out" / "first-request-cpu"
    out.mkdir(parents=True, exist_ok=True)
    key = "bench-" + secrets.token_hex(12)
    sandbox, url = first.start_sandbox_process(key, {}, out)
    root = url.removesuffix("/rest/3.0/")
    job = write_job(out / "job.yaml", data, name="bench-first-request-cpu", workdir=str(out / "work"))
    job.write_text(job.read_text().replace("http://127.0.0.1:8080/rest/3.0/", url))
    command = [sys.executable, "-m", "sync", "run", str(job), "--progress", "none", "--full-refresh"]
    try:
        started = time.time()
        run = subprocess.Popen(
            os.environ.get("PIN", "").split() + command,
            env={**os.environ, "NETMERA_API_KEY": key},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        process = psutil.Process(run.pid)
        cpu = seen = None
        while run.poll() is None and time.time() - started < 60:
            times = process.cpu_times()
            at = first.first_request_at(root)
            if at is not None:
                cpu, seen = times.user + times.system, at - started
                break
            time.sleep(0.01)
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
    finally:
        first.stop_sandbox_process(sandbox)
    if cpu is None or seen is None:
        print("no request arrived within 60 s")
        return 1
    print(
        f"first request {seen:.3f} s after start; the run's CPU by then {cpu:.3f} s ({args.rows:,} rows, {args.format})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
