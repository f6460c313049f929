"""Body building: every batch of the 1M-user bench job (tags + 5 attributes), built from the staged clean frames.

The job is ``bench/bench_run.py``'s (data from ``bench/gen_data.py``, clean rows): ``setProfileAttributes`` for every
user and ``tagUsers`` per segment. Staging (reading, validation, deduplication) is done first and not timed; what is
timed is :meth:`sync.planning.planning.Plan.batches` from start to end — reading the staged Parquet parts, selecting the
rows, encoding every body as canonical JSON bytes (polars expressions), cutting the batches and hashing each body
for its ID. Prints the wall time, the process CPU time and µs of CPU per batch.

Target (issue 13): all bodies in **≤ 3 s** wall on the 2-core reference machine, unloaded (the issue's prototype
took 1.8 s; the row-by-row builder before it, 14.1 s plus 1.8 s of ``json.dumps``). Exit 1 on a miss. The load
average is printed with the figures: a run on a busy machine is a loaded-machine figure, not the target's.

For the default 1M users the digest of all batch IDs is compared with the one the row-by-row builder gave on the
same data (recorded before the columnar rewrite): the IDs must be identical, or the run exits 1.

    .venv/bin/python bench/bench_build.py                  # 1,000,000 users
    .venv/bin/python bench/bench_build.py --users 100000   # shorter (no digest check)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from _common import DATA  # noqa: E402
from bench_run import write_job  # noqa: E402
from gen_data import generate_users  # noqa: E402

from sync.config import load_job  # noqa: E402
from sync.planning.planning import build_plan  # noqa: E402

TARGET_SECONDS = 3.0
RECORDED_DIGESTS = {
    # sha256 over "<batch ID>\n" of every batch in Plan.batches() order, by the builder before issue 13.
    1_000_000: "c3fff9742701e658d7629f4aa3f1140a6e37e3958f47f7944804df0a28c3d43b",
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    out = HERE / "out" / "build"
    out.mkdir(parents=True, exist_ok=True)
    data = DATA / f"users-clean-{args.users}.csv"
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        generate_users(data, args.users, bad_every=10**12, duplicate_every=10**12)
    job = load_job(write_job(out / "job.yaml", data, out / f"work-{args.users}", 16))
    load_before = os.getloadavg()[0]
    with build_plan(job) as plan:
        digest = hashlib.sha256()
        batches = ids = body_bytes = 0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for batch in plan.batches():
            batches += 1
            ids += len(batch.ext_ids)
            body_bytes += len(batch.body)
            digest.update(batch.batch_id.encode() + b"\n")
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
    load_after = os.getloadavg()[0]
    recorded = RECORDED_DIGESTS.get(args.users)
    same_ids = None if recorded is None else digest.hexdigest() == recorded
    loaded = max(load_before, load_after) > 1.5
    report = {
        "users": args.users,
        "batches": batches,
        "ids": ids,
        "body_mb": round(body_bytes / 1e6, 1),
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "cpu_us_per_batch": round(cpu / max(batches, 1) * 1e6),
        "target_wall_seconds": TARGET_SECONDS,
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "loaded_machine": loaded,
        "batch_ids_identical_to_row_by_row_builder": same_ids,
    }
    missed = wall > TARGET_SECONDS or same_ids is False
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{args.users:,} users × (tags + 5 attributes): {batches:,} batches, {ids:,} IDs, {report['body_mb']} MB"
        )
        print(
            f"  all bodies built in {wall:.2f} s wall, {cpu:.2f} s CPU "
            f"({report['cpu_us_per_batch']} µs CPU per batch); target ≤ {TARGET_SECONDS:.1f} s wall"
        )
        if same_ids is not None:
            print(f"  batch IDs identical to the row-by-row builder's: {'yes' if same_ids else 'NO'}")
        note = " — a LOADED-machine figure, not the target's" if loaded else ""
        print(f"  load average {load_before:.2f} → {load_after:.2f} (2 cores){note}")
        print("  MISSED" if missed else "  OK")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
