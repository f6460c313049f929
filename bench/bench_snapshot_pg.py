"""Benchmark the snapshot state kept in PostgreSQL (sync/coordination/snapshot.py) beside the workdir's files:
N users in the confirmed state, an export where 1 % changed (bench_snapshot.py's data), a throwaway PostgreSQL
server on a loopback port (tests/pg_fixture.py).

    .venv/bin/python bench/bench_snapshot_pg.py                   # 1,000,000 users (a few minutes)
    .venv/bin/python bench/bench_snapshot_pg.py --users 200000    # a quick look

Measured, each backend in turn on the same data: the import of the workdir's state into PostgreSQL (``pushsync
state import``), the leader's diff against the state, the commit of every batch confirmed (an overlay segment),
a second diff that must find nothing, and the fold of the overlay into a new base (a compaction). Issue 15 sets
no target for these: the script prints the figures and exits 1 only when the PostgreSQL state differs from the
file state after the same commit, or the second diff would send anything. On a machine shared with other work
the figures are loaded-machine figures: the script names the CPU count and the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_snapshot import _job, generate  # noqa: E402


def _staged(workdir: Path, job: Any) -> Any:
    import json

    from sync.planning.planning import StagedSource

    gen = json.loads((workdir / "gen.json").read_text())
    return StagedSource.from_parts(
        job.sources[0],
        (str(workdir / "users.csv"),),
        tuple(sorted((workdir / "staged").iterdir())),
        gen["rows_clean"],
        gen["rows_clean"],
        0,
    )


def cycle(workdir: Path, job: Any, store: Any, tag: str) -> dict[str, float]:
    """Diff, confirm every batch (SQLite ledger: no platform), commit, diff again, compact; seconds of each."""
    from sync.ledger.ledger import Ledger
    from sync.records import BatchResult, BatchStatus
    from sync.state import RemovalAction, SnapshotSettings, commit, compute_diff, snapshot_builder_for
    from sync.state._store import key_range, range_bits

    source = job.sources[0]
    staged = _staged(workdir, job)
    settings = SnapshotSettings(removal=RemovalAction.UNTAG, max_removal_share=0.01)
    builder = snapshot_builder_for(job)
    out: dict[str, float] = {}
    deltas = workdir / f"deltas-{tag}"
    t = time.perf_counter()
    d = compute_diff(
        store,
        [staged],
        f"{tag}-1",
        settings,
        batch_size=job.batch_sizes,
        builder=builder,
        directory=deltas / "1",
    )
    out["diff"] = time.perf_counter() - t
    with Ledger.open(workdir / f"ledger-{tag}.sqlite", flush_every=4096) as ledger:
        ledger.start_run(f"{tag}-1", job=job.name)
        for batch in d.batches():
            ledger.record_planned(f"{tag}-1", batch)
            ledger.record_result(
                f"{tag}-1",
                BatchResult(
                    batch.batch_id,
                    batch.endpoint,
                    batch.operation,
                    BatchStatus.OK,
                    1,
                    ok_ids=len(batch.ext_ids),
                ),
            )
        t = time.perf_counter()
        commit(store, job.sources, d.directory, ledger, settings, builder=builder)
        out["commit"] = time.perf_counter() - t
    t = time.perf_counter()
    again = compute_diff(
        store,
        [staged],
        f"{tag}-2",
        settings,
        batch_size=job.batch_sizes,
        builder=builder,
        directory=deltas / "2",
    )
    out["second_diff"] = time.perf_counter() - t
    out["second_requests"] = float(sum(r for r, _ in again.request_counts().values()))
    again.discard()
    t = time.perf_counter()
    bits = range_bits(store.rows(source))
    store.write(source, (store.slice(source, *key_range(r, bits)) for r in range(1 << bits)))
    out["compaction"] = time.perf_counter() - t
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    args = parser.parse_args(argv)

    from pg_fixture import find_postgres_bin, start_postgres

    from sync.coordination._db import connect
    from sync.coordination.ledger import PgLedger
    from sync.coordination.snapshot import import_workdir_state, pg_state_store
    from sync.state import StateStore

    bin_dir = find_postgres_bin()
    if bin_dir is None:
        print("no PostgreSQL binaries (initdb): install postgresql")
        return 1
    server, root = start_postgres(bin_dir)
    base = Path(tempfile.mkdtemp(prefix="bench-snapshot-pg-"))
    try:
        t = time.perf_counter()
        generate(base, args.users)
        gen_seconds = time.perf_counter() - t
        job = _job(base)
        source = job.sources[0]
        url = server.new_database()
        PgLedger.open(url).close()  # the schema
        conn = connect(url)
        try:
            t = time.perf_counter()
            import_workdir_state(job, conn, url)
            imported = time.perf_counter() - t
            pg_store = pg_state_store(job, conn, url)
            file_store = StateStore(job.workdir, job.destination)
            size = conn.execute(
                "SELECT pg_total_relation_size('pushsync.state_chunks'), count(*) FROM pushsync.state_chunks"
            ).fetchone()
            figures = {
                "file": cycle(base, job, file_store, "file"),
                "postgresql": cycle(base, job, pg_store, "pg"),
            }
            same = pg_store.read(source).equals(file_store.read(source))
        finally:
            conn.close()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    load = os.getloadavg()
    print(f"snapshot state in PostgreSQL: {args.users:,} users in the state, 1% churn")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.1f} at the end "
        f"(a loaded machine when other work runs), Python {platform.python_version()}, polars {pl.__version__}"
    )
    print(f"  data generation (not measured):       {gen_seconds:8.1f} s")
    assert size is not None
    print(
        f"  import of the workdir state:          {imported:8.2f} s  "
        f"({size[1]:,} chunks, {size[0] / 1024**2:.0f} MB in PostgreSQL)"
    )
    print(f"  {'':36} {'files':>9} {'PostgreSQL':>11}")
    for key, label in (
        ("diff", "diff (the leader)"),
        ("commit", "commit (an overlay segment)"),
        ("second_diff", "second diff (no changes)"),
        ("compaction", "compaction (a new base)"),
    ):
        print(f"  {label:<36} {figures['file'][key]:8.2f}s {figures['postgresql'][key]:10.2f}s")
    print("  target: none (issue 15 sets none for the state in PostgreSQL): figures for the record")
    ok = True
    if not same:
        print("FAIL: the PostgreSQL state differs from the file state after the same commit")
        ok = False
    if figures["postgresql"]["second_requests"] or figures["file"]["second_requests"]:
        print("FAIL: a second diff with no changes would send requests")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
