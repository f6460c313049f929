"""Benchmark: how many batches per second the ledger records (issue #4: it must keep up with 3,000+/s).

Each batch is written the way a run writes it: planned, sent, one attempt and the result (100 IDs per batch),
with the ledger's own periodic flushes. Prints batches/s; exits 0 when the target is met.

    .venv/bin/python bench/bench_ledger.py [--batches 30000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sync.ledger.ledger import Ledger  # noqa: E402
from sync.platforms.netmera.requests import make_batch  # noqa: E402
from sync.records import Attempt, AttemptOutcome, BatchResult, BatchStatus, Operation  # noqa: E402

TARGET_BATCHES_PER_SECOND = 3_000


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=30_000)
    args = parser.parse_args()
    batches = [
        make_batch(Operation.TAG, {"tag": f"t{i % 50}", "extIds": [f"u{i}-{k}" for k in range(100)]})
        for i in range(args.batches)
    ]
    with tempfile.TemporaryDirectory() as tmp, Ledger.open(Path(tmp) / "ledger.sqlite") as ledger:
        ledger.start_run("bench", job="bench")
        start = time.perf_counter()
        for b in batches:
            ledger.record_planned("bench", b)
            ledger.record_sent("bench", b.batch_id)
            ledger.record_attempt(
                "bench", Attempt(b.batch_id, b.endpoint, 1, 100, 0.01, AttemptOutcome.OK, 200), started_at=1.0
            )
            ledger.record_result(
                "bench", BatchResult(b.batch_id, b.endpoint, b.operation, BatchStatus.OK, 1, 200, ok_ids=100)
            )
            ledger.maybe_flush()
        ledger.flush()
        elapsed = time.perf_counter() - start
        confirmed = len(ledger.confirmed_ok("bench"))
    rate = args.batches / elapsed
    print(f"machine: {os.uname().machine}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(
        f"ledger: {args.batches:,} batches (planned + sent + attempt + result, 100 IDs each) in {elapsed:.2f} s"
    )
    print(
        f"        {rate:,.0f} batches/s (target >= {TARGET_BATCHES_PER_SECOND:,}); confirmed ok: {confirmed:,}"
    )
    ok = rate >= TARGET_BATCHES_PER_SECOND and confirmed == args.batches
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
