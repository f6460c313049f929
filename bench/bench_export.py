"""Benchmark: ``pushsync export device-tokens`` throughput and memory against a Netmera sandbox process.

Seeds a sandbox (separate process) with N devices from a Parquet file, exports them all to Parquet through the
real reader (getDeviceTokens, nextPage) and writer, and checks every token came once. Prints rows/s and the
exporter's peak RSS; exits 0 when the targets are met.

    .venv/bin/python bench/bench_export.py [--devices 1000000] [--page-size 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sync.config import Destination  # noqa: E402
from sync.ledger.exporting import ExportFormat, write_pages  # noqa: E402
from sync.platforms.netmera.client import NetmeraClient  # noqa: E402
from sync.platforms.netmera.reads import device_token_pages  # noqa: E402

TARGET_ROWS_PER_SECOND = 50_000
TARGET_PEAK_RSS_MB = 200
KEY = "bench-export-key-0123456789"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


async def _export(url: str, out: Path, page_size: int) -> tuple[int, float]:
    schema = pa.schema(
        [
            ("platform", pa.string()),
            ("token", pa.string()),
            ("deviceModel", pa.string()),
            ("pushPermitted", pa.bool_()),
        ]
    )
    async with NetmeraClient(Destination("netmera", url), KEY, timeout=30) as client:
        started = time.perf_counter()
        result = await write_pages(
            device_token_pages(client, page_size=page_size), out, schema, ExportFormat.PARQUET
        )
        return result.rows, time.perf_counter() - started


def _make_seed(path: Path, n: int) -> None:
    pl.DataFrame(
        {
            "extId": [f"user-{i // 2}" for i in range(n)],
            "platform": ["IOS" if i % 2 else "ANDROID" for i in range(n)],
            "token": [f"token-{i:08d}" for i in range(n)],
            "deviceModel": ["Pixel 6"] * n,
            "pushPermitted": [i % 7 != 0 for i in range(n)],
        }
    ).write_parquet(path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--make-seed", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_seed is not None:
        _make_seed(args.make_seed, args.devices)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        seed = Path(tmp) / "devices.parquet"
        n = args.devices
        # The seed is built in a child process, so this process's peak RSS is the exporter's own.
        subprocess.run([sys.executable, __file__, "--make-seed", str(seed), "--devices", str(n)], check=True)
        baseline = _peak_rss_mb()
        sandbox = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sync",
                "sandbox",
                "netmera",
                "--port",
                "0",
                "--api-key",
                KEY,
                "--seed-file",
                str(seed),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert sandbox.stdout is not None
            url = sandbox.stdout.readline().strip()
            out = Path(tmp) / "tokens.parquet"
            rows, seconds = asyncio.run(_export(url, out, args.page_size))
            peak = _peak_rss_mb()  # before the check below reads the file back
        finally:
            sandbox.terminate()
            sandbox.wait(timeout=10)
            if sandbox.stdout is not None:
                sandbox.stdout.close()
        tokens = pl.read_parquet(out, columns=["token"])["token"]
        complete = rows == n and tokens.n_unique() == n
        size_mb = out.stat().st_size / 1e6
    rate = rows / seconds
    print("machine: 2 cores shared with other helpers while measuring; sandbox in a separate process")
    print(f"devices exported:   {rows:,} of {n:,} ({'all, each once' if complete else 'INCOMPLETE'})")
    print(f"time:               {seconds:.2f} s ({rows // args.page_size} pages of {args.page_size})")
    print(f"rows/s:             {rate:,.0f} (target >= {TARGET_ROWS_PER_SECOND:,})")
    print(
        f"exporter peak RSS:  {peak:.0f} MB (before the export: {baseline:.0f} MB; target <= {TARGET_PEAK_RSS_MB})"
    )
    print(f"file:               {size_mb:.1f} MB Parquet (zstd)")
    ok = complete and rate >= TARGET_ROWS_PER_SECOND and peak <= TARGET_PEAK_RSS_MB
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
