"""The peak RSS of ``pushsync run`` on wide rows: N users of about W bytes each (a long text attribute).

Writes the users (``id``, ``bio`` of W bytes, each its own text, ``city``; the last 2 % repeat earlier IDs) as
Parquet or CSV under ``bench/out/run-memory-wide/``, starts ``bench/bare_server.py``, runs the real CLI
(``python -m sync run``) on a job mapping ``bio`` and ``city`` as strings, and prints the run's peak RSS — the
kernel's high-water mark of the run's process, read by a small wrapper process as ``bench_plan.py`` reads it.
``--extra`` appends text to the job (e.g. ``dispatch: {concurrency: 1}``). Not a ``bench_*`` script: ``make
bench`` does not run it (no target: a run's memory has none; ``pushsync plan``'s is 512 MB).

    .venv/bin/python bench/run_memory_wide.py                          # 40,000 Parquet rows of 12 KB
    .venv/bin/python bench/run_memory_wide.py --format csv --rows 60000 --width 3000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import start_server, stop_server  # noqa: E402

_PEAK = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def write_users(path: Path, rows: int, width: int, fmt: str) -> None:
    """``rows`` users of about ``width`` bytes each (see the module docstring)."""
    base = "".join(chr(97 + (i * 7919) % 26) if i % 11 else " " for i in range(width + 1000))
    ids = pl.int_range(0, rows, eager=True) % max(1, rows - rows // 50)
    frame = pl.DataFrame({"id": ids}).select(
        pl.format("U{}", pl.col("id")).alias("id"),
        pl.format("{} {}", pl.int_range(0, rows), pl.lit(base).str.slice(pl.int_range(0, rows) % 997, width))
        .str.slice(0, width)
        .alias("bio"),
        pl.format("city{}", pl.int_range(0, rows) % 13).alias("city"),
    )
    if fmt == "csv":
        frame.write_csv(path)
    else:
        frame.write_parquet(path, row_group_size=20_000)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--width", type=int, default=12_000)
    parser.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    parser.add_argument("--extra", default="", help="text appended to the job file")
    args = parser.parse_args()
    out = HERE / "out" / "run-memory-wide"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = out / f"users.{args.format}"
    write_users(data, args.rows, args.width, args.format)
    key = "bench-wide"
    server, url = start_server(key, out, kind="bare")
    try:
        job = out / "job.yaml"
        job.write_text(
            f"""version: 1
name: wide
workdir: {out / "work"}
destination: {{platform: netmera, base_url: "{url}", secret: {{env: BENCH_NETMERA_KEY}}}}
sources:
  - name: users
    path: {data}
    ext_id: id
    attributes: {{bio: string, city: string}}
{args.extra}
""",
            encoding="utf-8",
        )
        report = out / "run.maxrss"
        command = [sys.executable, "-m", "sync", "run", str(job), "--progress", "none", "--output", "json"]
        done = subprocess.run(
            [sys.executable, "-c", _PEAK, str(report), *command],
            env={**os.environ, "BENCH_NETMERA_KEY": key},
            check=False,
        )
    finally:
        stop_server(server)
    peak_mb = int(report.read_text(encoding="ascii")) / 1024  # ru_maxrss: KiB on Linux
    print(
        json.dumps(
            {
                "rows": args.rows,
                "width": args.width,
                "format": args.format,
                "extra": args.extra,
                "exit_code": done.returncode,  # 1: partial (the repeated IDs' older rows are rejected)
                "peak_rss_mb": round(peak_mb),
            }
        )
    )
    return 0 if done.returncode in (0, 1) else 1


if __name__ == "__main__":
    sys.exit(main())
