"""Instructions, not seconds: the client-side work of :mod:`cpu_map`'s phases counted by valgrind's callgrind.

CPU seconds on a shared machine move by 10–30 % from one minute to the next (README "Measured"), so a change that
saves 2–5 % of a run's CPU cannot be told from the noise by timing it, however often. callgrind counts the
instructions a process executes in user space: the same checkout, data and job give the same count to within
~0.1 % whatever else the machine is doing (two runs of the 100k-user phases: 3,305.9M and 3,304.6M). This runs
:func:`cpu_map.phases` — a lazy plan of ``bench_handwritten``'s job (N users × tags + 6 attributes, clean rows),
settled, every batch built, each recorded in a ledger as a run records it; nothing sent — under callgrind, once
per checkout, and prints the total and the share of each library, per 1000-ID request::

    .venv/bin/python bench/instr_map.py                          # this checkout, 100,000 users (~1 min)
    .venv/bin/python bench/instr_map.py --code /path/to/other    # side by side with another checkout's sync/
    .venv/bin/python bench/instr_map.py --users 1000000          # ~8 min a checkout

What it does not count: kernel time (page faults, file writes; a quarter of a run's CPU in a perf profile), time
spent waiting for memory (a copy and a hash of the same length count alike), and the imports' share differs from
a run's (``python -m sync`` imports the command line and aiohttp too). And one distortion: valgrind's CPU has no
SHA extensions, so OpenSSL's SHA-256 (the batch IDs) runs its plain code — many times the instructions of the
SHA-NI code a real run uses on a CPU that has them (libcrypto's row: read it as an upper bound). Use it to compare two
checkouts, not to predict seconds. Not a ``bench_*`` script: ``make bench`` does not run it (it has no target).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import DATA  # noqa: E402
from bench_handwritten import JOB  # noqa: E402
from gen_data import generate_users  # noqa: E402

LIBRARIES = (
    ("lz4 (in arrow)", "LZ4_"),  # first: LZ4's functions live in libarrow, told apart by their names
    ("polars", "_polars_runtime"),
    ("arrow (pyarrow)", "libarrow"),
    ("python", "libpython"),
    ("openssl (sha-256)", "libcrypto"),
    ("sqlite", "libsqlite3"),
    ("libc (memcpy, malloc...)", "libc.so"),
)
"""Rows of the table: a name and what a function's line holds (its shared object, or its name), first match
wins; the rest is "other"."""

_LINE = re.compile(r"^\s*([\d,]+)\s+\([^)]*\)\s+(.*)$")


def _by_library(annotated: str) -> tuple[int, Counter[str]]:
    """The total and the instructions per library (:data:`LIBRARIES`, the rest as "other") from
    ``callgrind_annotate``'s per-function listing (exclusive counts)."""
    total = 0
    rows: Counter[str] = Counter()
    for line in annotated.splitlines():
        if "PROGRAM TOTALS" in line:
            total = int(line.split()[0].replace(",", ""))
            continue
        m = _LINE.match(line)
        if not m:
            continue
        count, where = int(m.group(1).replace(",", "")), m.group(2)
        rows[next((label for label, mark in LIBRARIES if mark in where), "other")] += count
    return total, rows


def count(code: Path, job: Path, workdir: Path, out: Path) -> tuple[int, Counter[str], int]:
    """Run the phases of ``job`` (whose workdir is ``workdir``, emptied first) with ``code``'s ``sync`` package under
    callgrind: (total instructions, per library, requests)."""
    result = out / f"callgrind-{secrets.token_hex(4)}.out"
    env = {**os.environ, "PYTHONPATH": str(code), "BENCH_NETMERA_KEY": "unused"}
    # Byte-compiled first: a module whose cached bytecode is stale (a checkout switched branches) would be parsed
    # again in the run, ~0.1 G instructions that are not the code's (PYTHONDONTWRITEBYTECODE keeps it so).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(code / "sync")], check=True, env=env)
    shutil.rmtree(workdir, ignore_errors=True)
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={result}",
            sys.executable,
            str(HERE / "cpu_map.py"),
            "--phases-of",
            str(job),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"valgrind exited {done.returncode}:\n{done.stderr[-3000:]}")
    requests = int(json.loads(done.stdout.strip().splitlines()[-1])["requests"])
    annotated = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(result)], capture_output=True, text=True, check=True
    ).stdout
    result.unlink(missing_ok=True)
    total, rows = _by_library(annotated)
    return total, rows, requests


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument(
        "--code",
        type=Path,
        action="append",
        default=[],
        help="another checkout whose sync/ to count too (its directory); repeatable",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        raise SystemExit("needs valgrind (Debian: apt-get install valgrind)")
    out = HERE / "out" / "instr_map"
    out.mkdir(parents=True, exist_ok=True)
    data = DATA / f"users-clean-{args.users}.csv"
    if not data.exists():
        generate_users(data, args.users, bad_every=10**12, duplicate_every=10**12)
    job, workdir = out / "job.yaml", out / "work-instr"
    job.write_text(
        JOB.format(workdir=workdir, url="http://127.0.0.1:9/rest/3.0/", data=data),
        encoding="utf-8",
    )
    codes = [ROOT, *(c.resolve() for c in args.code)]
    results = []
    for code in codes:
        if not (code / "sync").is_dir():
            raise SystemExit(f"{code}: no sync/ package there")
        results.append(count(code, job, workdir, out))
    requests = results[0][2]
    names = [label for label, _ in LIBRARIES] + ["other"]
    per = 1 / max(requests, 1)
    print(
        f"{args.users:,} users × (tags + 6 attributes), {requests:,} requests: instructions (millions) of "
        f"cpu_map's phases under callgrind, per library; per request in thousands"
    )
    header = "".join(f"{str(c)[-28:]:>30s}" for c in codes)
    print(f"  {'':26s}{header}")
    for name in names:
        cells = "".join(f"{r[1][name] / 1e6:14,.0f}M {r[1][name] * per / 1e3:11,.0f}k  " for r in results)
        print(f"  {name:26s}{cells}")
    cells = "".join(f"{r[0] / 1e6:14,.0f}M {r[0] * per / 1e3:11,.0f}k  " for r in results)
    print(f"  {'total':26s}{cells}")
    for code, (total, _, n) in zip(codes[1:], results[1:], strict=True):
        if n != requests:
            print(f"  note: {code} made {n:,} requests, this checkout {requests:,}")
        change = (results[0][0] - total) / total if total else 0.0
        print(f"  this checkout against {code}: {change:+.2%} instructions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
