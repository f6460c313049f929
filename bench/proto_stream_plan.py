"""Prototype (issue 13): `pushsync plan`'s staging and settling done by polars' streaming engine, in two passes.

Not the planner: a measurement of a different design, with an equality check against the planner's output.

**Pass 1** (one streaming query over the whole Parquet file, native and multi-threaded, memory-bounded by the
engine's morsels): the mapped columns with their row numbers, typed and checked by the planner's own validation
expressions (``sync.planning.validation._Query``: the same expressions ``validate_chunk`` runs per chunk, here on
one LazyFrame), then split in two sinks of one query (``pl.collect_all``):

- rows that pass every check and that no fallback flags (the fast forms are exact for them) get their canonical
  key (``canonical_key``, applied per morsel with ``map_batches``) and go to a partitioned Arrow IPC sink
  (``pl.PartitionBy`` on the key's top ``bits``: key ranges, like the planner's buckets);
- every other row — refused, or flagged for an exact reading — goes, raw (texts and row number), to one IPC
  file in file order: few rows (0.1-0.2 % in the bench data).

**Pass 2** (per partition, in memory): the side rows are validated by ``validate_chunk`` itself (exact: fallbacks,
messages, rejects in file order), their clean rows keyed and added to their partitions; each partition is put
in canonical order (key, ID, row), its duplicates resolved by ``resolve_duplicates`` (last valid row wins), cut
into the planner's buckets and written (Arrow IPC); the rejects file is validation's rejects (file order), then
each bucket's conflicting duplicates, as the planner writes it. ``--count`` also counts every stream's requests
as ``pushsync plan`` does (``_Counter``, fed each bucket).

    .venv/bin/python bench/proto_stream_plan.py run  JOB OUT [--count]    # both passes
    .venv/bin/python bench/proto_stream_plan.py pass1 JOB OUT             # pass 1 alone (for /usr/bin/time -v)
    .venv/bin/python bench/proto_stream_plan.py pass2 JOB OUT [--count]   # pass 2 alone, after pass1
    .venv/bin/python bench/proto_stream_plan.py check JOB OUT             # OUT (after run) == build_plan(JOB)
    .venv/bin/python bench/proto_stream_plan.py tricky IN.parquet OUT.parquet  # a file of hard cases to check

Prints one JSON line per pass (wall, CPU-s, peak RSS of the process). Parquet sources of one file only, no
``check_rows`` builder (Netmera), no ``--limit``, no head: see the report for what integration would take.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STARTED = time.monotonic()

import polars as pl  # noqa: E402

from sync.config import Job, Source, load_job  # noqa: E402
from sync.planning._staging import RejectsWriter  # noqa: E402
from sync.planning.planning import ROWS_PER_BUCKET, _bucket_bits, _builder_for, _Counter  # noqa: E402
from sync.planning.validation import (  # noqa: E402
    _REFUSED,
    EXT_ID,
    FILE,
    KEY,
    _chunk_query,
    canonical_key,
    clean_schema,
    resolve_duplicates,
    validate_chunk,
)
from sync.sources.reading import ROW, expand_paths, iter_chunks  # noqa: E402

PARTITION_BITS = 6
"""Pass 1 writes 2**6 = 64 key ranges: a 10M-row input gives ~156k rows (~70 MB typed) per partition."""
BUCKET = "__bucket"
NL = b"\n"


def _report(stage: str, **extra: object) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "stage": stage,
                "seconds": round(time.monotonic() - STARTED, 3),
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                **extra,
            }
        ),
        flush=True,
    )


def _source(job: Job) -> tuple[Source, Path]:
    (source,) = job.sources
    (path,) = expand_paths(source, workdir=job.workdir)
    return source, path


def pass1(job: Job, out: Path, *, sink: str = "partitioned") -> dict[str, int]:
    """Validate, key and partition every row of the job's one Parquet file in one streaming query.

    ``sink``: ``partitioned`` (the design), ``null`` (the same query, its clean rows dropped: the cost of the
    validation and keying alone), ``single`` (the clean rows to one IPC file: the cost of partitioning)."""
    source, path = _source(job)
    rules = job.validation
    # The raw schema as the planner's reader gives it (mapped columns, typed as read, and __row): its first chunk.
    first = next(iter(iter_chunks(source, path))).frame
    q = _chunk_query(first, source, rules)  # as validate_chunk does per chunk: here once, from the first
    raw_columns = [c for c in first.columns if c != ROW]
    scan = (
        pl.scan_parquet(path)
        .select(raw_columns)
        .with_row_index(ROW, offset=1)
        .with_columns(pl.col(ROW).cast(pl.Int64))
        .select(first.columns)
    )
    rows = pl.scan_parquet(path).select(pl.len()).collect().item()
    # The plan's bucket bits (its row count, less rejects, is not known yet: the planner sizes them on the clean
    # rows; for the bench data that is the same power of two).
    schema = {k: v for k, v in clean_schema(source).items() if k != KEY}
    typed = q.typed | {FILE: pl.lit(0)}
    flags = [*q.flags, *(rows_ for _, rows_ in q.pending)]

    def checks(lf: pl.LazyFrame) -> pl.LazyFrame:
        return (
            lf.with_columns(**q.trimmed)
            .with_columns(**q.texts)
            .with_columns(**q.values)
            .with_columns(
                (pl.any_horizontal(flags).fill_null(True) if flags else pl.lit(False)).alias(_REFUSED)
            )
        )

    checked = checks(scan)
    clean = (
        checked.filter(~pl.col(_REFUSED))
        .select(*(typed[k].cast(v).alias(k) for k, v in schema.items()))
        .with_columns(
            pl.col(EXT_ID).map_batches(canonical_key, return_dtype=pl.UInt32, is_elementwise=True).alias(KEY)
        )
        .select(KEY, *schema)
        .with_columns((pl.col(KEY) // (1 << (32 - PARTITION_BITS))).alias(BUCKET))
    )
    side = checked.filter(pl.col(_REFUSED)).select(first.columns)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    if sink == "null":
        pl.collect_all(
            [clean.sink_batches(lambda df: None, lazy=True), side.sink_ipc(out / "side.arrow", lazy=True)],
            engine="streaming",
        )
        return {"rows": rows}
    if sink == "slices":
        return _pass1_slices(checks, typed, schema, first.columns, path, out)
    if sink == "single":
        pl.collect_all(
            [
                clean.sink_ipc(out / "parts" / "000-0.arrow", lazy=True),
                side.sink_ipc(out / "side.arrow", lazy=True),
            ],
            engine="streaming",
        )
        return {"rows": rows}
    pl.collect_all(
        [
            clean.sink_ipc(
                pl.PartitionBy(
                    out / "parts",
                    key=BUCKET,
                    include_key=False,
                    file_path_provider=lambda args: (
                        out
                        / "parts"
                        / f"{args.partition_keys[BUCKET][0]:03d}-{args.index_in_partition}.arrow"
                    ),
                ),
                lazy=True,
            ),
            side.sink_ipc(out / "side.arrow", lazy=True),
        ],
        engine="streaming",
    )
    return {"rows": rows}


SLICE_ROWS = int(os.environ.get("PROTO_SLICE_ROWS", "250000"))


def _pass1_slices(
    checks: Callable[[pl.LazyFrame], pl.LazyFrame],
    typed: dict[str, pl.Expr],
    schema: dict[str, Any],
    raw: list[str],
    path: Path,
    out: Path,
) -> dict[str, int]:
    """Pass 1 as slices of :data:`SLICE_ROWS` rows, each one in-memory query (polars evaluates a step's
    expressions in parallel), the clean rows keyed and appended to one Arrow IPC stream per partition from Python
    (memory: one slice and its validation columns)."""
    import pyarrow.parquet as pq

    selected = [
        *(typed[k].cast(v).alias(k) for k, v in schema.items()),
        pl.col(_REFUSED),
        *(pl.when(pl.col(_REFUSED)).then(pl.col(c)).alias(f"__raw_{c}") for c in raw),
    ]
    writers: dict[int, Any] = {}
    sides: list[pl.DataFrame] = []
    # Slices of row groups read by pyarrow (a scan's slice decodes the file from its start: quadratic).
    pf = pq.ParquetFile(path)
    names = [c for c in raw if c != ROW]
    start = 1
    rows = 0
    pieces = []
    for g in range(pf.num_row_groups):
        group = pl.from_arrow(pf.read_row_group(g, columns=names))
        assert isinstance(group, pl.DataFrame)
        for offset in range(0, group.height, SLICE_ROWS):
            piece = group.slice(offset, SLICE_ROWS)
            n = piece.height
            pieces.append(
                piece.with_columns(pl.int_range(start, start + n, dtype=pl.Int64).alias(ROW)).select(raw)
            )
            start += n
        del group
        rows += sum(p.height for p in pieces)
        while pieces:
            frame = checks(pieces.pop(0).lazy()).select(selected).collect()
            _slice_out(frame, raw, schema, sides, writers, out)
    for writer in writers.values():
        writer.close()
    side = pl.concat(sides) if sides else pl.DataFrame(schema={c: pl.String for c in raw})
    side.write_ipc(out / "side.arrow")
    return {"rows": rows}


def _slice_out(
    frame: pl.DataFrame,
    raw: list[str],
    schema: dict[str, Any],
    sides: list[pl.DataFrame],
    writers: dict[int, Any],
    out: Path,
) -> None:
    """One validated slice: refused or flagged rows (raw) to ``sides``, clean rows keyed and appended to the
    IPC file of their partition."""
    import pyarrow as pa

    refused = frame[_REFUSED]
    if refused.any():
        sides.append(frame.filter(refused).select(pl.col(f"__raw_{c}").alias(c) for c in raw))
    clean = frame.filter(~refused).select(list(schema))
    del frame
    clean = clean.with_columns(canonical_key(clean[EXT_ID])).select(KEY, *schema)
    bucket = (clean[KEY] // (1 << (32 - PARTITION_BITS))).alias(BUCKET)
    for (k,), part in (
        clean.with_columns(bucket).partition_by(BUCKET, as_dict=True, include_key=False).items()
    ):
        table = part.to_arrow()
        writer = writers.get(int(k))
        if writer is None:
            path = out / "parts" / f"{int(k):03d}-0.arrow"
            writer = writers[int(k)] = pa.ipc.new_file(str(path), table.schema)
        writer.write_table(table)


def pass2(job: Job, out: Path, *, count: bool) -> dict[str, int]:
    """Settle pass 1's partitions: side rows validated exactly, canonical order, duplicates, buckets, rejects."""
    source, path = _source(job)
    names = [str(path)]
    side = pl.read_ipc(out / "side.arrow")
    rejects = RejectsWriter(out / "rejects.csv")
    side_clean, bad = (
        validate_chunk(side, source, job.validation, 0, str(path)) if side.height else (None, None)
    )
    if bad is not None:
        rejects.frame(bad)  # validation's rejects: file order (the side rows are in file order)
    schema = list(clean_schema(source))
    if side_clean is not None and side_clean.height:
        side_clean = side_clean.with_columns(canonical_key(side_clean[EXT_ID])).select(schema)
    parts = sorted((out / "parts").glob("*.arrow"))
    by_partition: dict[int, list[Path]] = {}
    for p in parts:
        by_partition.setdefault(int(p.name.split("-")[0]), []).append(p)
    clean_rows = sum(pl.scan_ipc(p).select(pl.len()).collect().item() for p in parts)
    clean_rows += 0 if side_clean is None else side_clean.height
    bits = _bucket_bits(clean_rows, ROWS_PER_BUCKET)
    counter = None
    builder = _builder_for(job)
    if count:
        streams = list(builder.streams_for(source))
        counter = _Counter(builder, job, streams)
    shutil.rmtree(out / "buckets", ignore_errors=True)
    (out / "buckets").mkdir()
    # Conflicting duplicates go to the rejects file bucket by bucket (the planner's buckets), each bucket's in
    # file and row order: a planner bucket may span several partitions here (small inputs), so they are held
    # until the bucket is complete.
    held: list[pl.DataFrame] = []
    held_bucket = -1

    def flush() -> None:
        if held:
            merged = pl.concat(held) if len(held) > 1 else held[0]
            rejects.frame(merged.sort("row", maintain_order=True))
            held.clear()

    written = 0
    dropped = 0
    for partition in range(1 << PARTITION_BITS):
        pieces = [pl.read_ipc(p) for p in by_partition.get(partition, [])]
        if side_clean is not None and side_clean.height:
            more = side_clean.filter((pl.col(KEY) // (1 << (32 - PARTITION_BITS))) == partition)
            if more.height:
                pieces.append(more)
        if not pieces:
            continue
        frame = pl.concat(pieces) if len(pieces) > 1 else pieces[0]
        del pieces
        # Canonical order (key, ID, file, row): one file, so (key, row) unless two IDs share a key.
        frame = frame.sort([KEY, ROW])
        keys = frame[KEY]
        same = keys == keys.shift(1)
        if same.any():
            ids = frame[EXT_ID]
            if (ids.filter(same) != ids.shift(1).filter(same)).any():
                frame = frame.sort([KEY, EXT_ID, ROW])
        # The planner's buckets within this partition (bits >= PARTITION_BITS at 10M rows; else whole).
        if bits > PARTITION_BITS:
            bucket_of = (frame[KEY] // (1 << (32 - bits))).alias(BUCKET)
            splits = frame.with_columns(bucket_of).partition_by(BUCKET, maintain_order=True, include_key=True)
        else:
            splits = [frame.with_columns(pl.lit(partition).alias(BUCKET))]
        del frame
        for piece in splits:
            k = int(piece[BUCKET][0])
            piece = piece.drop(BUCKET)
            winners, dup_rejects, identical = resolve_duplicates(piece, source, names)
            winners.write_ipc(out / "buckets" / f"{partition:03d}-{k:04d}.arrow", compression="uncompressed")
            planner_bucket = partition >> (PARTITION_BITS - bits) if bits <= PARTITION_BITS else k
            if planner_bucket != held_bucket:
                flush()
                held_bucket = planner_bucket
            if dup_rejects.height:
                held.append(dup_rejects)
            written += winners.height
            dropped += identical
            if counter is not None:
                counter.put(winners)
    flush()
    rejects.close()
    extra: dict[str, int] = {"clean": written, "dropped": dropped, "side_rows": side.height, "bits": bits}
    if counter is not None:
        results = counter.finish()
        extra["requests"] = sum(r for r, _ in results)
    return extra


def check(job: Job, out: Path) -> int:
    """Compare ``out`` (after ``run``) with ``build_plan(job)``: clean frames (every column, canonical order,
    concatenated: the batches are cut from that sequence alone), the rejects file byte for byte, the counts."""
    from sync.planning.planning import build_plan

    t0 = time.monotonic()
    with build_plan(job, rejects_path=out / "planner-rejects.csv", count=True) as plan:
        theirs = pl.concat(list(plan.staged[0].frames(list(clean_schema(job.sources[0])))))
        summary = plan.summary()
    print(
        f"planner: {time.monotonic() - t0:.1f} s, {theirs.height:,} clean rows, {summary.total_requests:,} requests"
    )
    ours = pl.concat([pl.read_ipc(p) for p in sorted((out / "buckets").glob("*.arrow"))])
    ours = ours.select(theirs.columns)
    ok = True
    if not ours.equals(theirs):
        ok = False
        print(f"clean rows DIFFER: ours {ours.height:,}, planner {theirs.height:,}")
        if ours.height == theirs.height:
            for c in theirs.columns:
                if not ours[c].equals(theirs[c]):
                    i = int((ours[c].ne_missing(theirs[c])).arg_true()[0])
                    print(f"  column {c}: first difference at {i}: {ours.row(i)} vs {theirs.row(i)}")
    else:
        print(f"clean rows equal: {ours.height:,} rows x {len(ours.columns)} columns, same order")
    a, b = (out / "rejects.csv").read_bytes(), (out / "planner-rejects.csv").read_bytes()
    if a != b:
        ok = False
        print(f"rejects DIFFER: ours {a.count(NL)} lines, planner {b.count(NL)} lines")
    else:
        print(f"rejects file identical: {a.count(NL) - 1:,} rejects")
    builder = _builder_for(job)
    source = job.sources[0]
    streams = list(builder.streams_for(source))
    counter = _Counter(builder, job, streams)
    for p in sorted((out / "buckets").glob("*.arrow")):
        counter.put(pl.read_ipc(p))
    mine = counter.finish()
    theirs_counts = [plan_count for plan_count in (summary.total_requests,)]
    total = sum(r for r, _ in mine)
    print(f"requests counted from our buckets: {total:,} (planner {theirs_counts[0]:,})")
    ok &= total == theirs_counts[0]
    print("EQUAL" if ok else "DIFFERENT")
    return 0 if ok else 1


def tricky(source_file: Path, target: Path, rows: int = 200_000) -> None:
    """A Parquet file of ``rows`` rows of ``source_file`` with the texts the fast forms leave to the exact
    reading (and the checks refuse) mixed in: IDs with whitespace at an end, duplicates spelt so, date-times,
    JSON-array and spaced lists, formatted MSISDNs, NULs, null-value spellings, CRC-32-sharing IDs; for ``check``."""
    frame = pl.read_parquet(source_file, n_rows=rows)
    n = frame.height
    i = pl.int_range(n)
    rules = [
        ("customer_id", 97, pl.concat_str(pl.lit("  "), pl.col("customer_id"))),  # trimmed: a duplicate
        ("customer_id", 101, pl.lit("C000000007")),  # a duplicate of an early row, conflicting values
        ("customer_id", 211, pl.lit("")),
        ("customer_id", 307, pl.lit("plumless")),  # CRC-32 equal to "buckeroo" (a collision)
        ("customer_id", 311, pl.lit("buckeroo")),
        ("birth_date", 89, pl.lit("1990-05-17T10:20:30+02:00")),
        ("birth_date", 93, pl.lit(" 1990-05-17 ")),
        ("birth_date", 113, pl.lit("1990-13-45")),
        ("interests", 83, pl.lit('["books","music"]')),
        ("interests", 79, pl.lit(" a | b |  | c ")),
        ("segments", 73, pl.lit('["x", "y"]')),
        ("phone", 71, pl.lit("+90 532 123 45 67")),
        ("phone", 67, pl.lit("(0532) 123-4567")),
        ("email", 61, pl.lit(" user@example.com ")),
        ("email", 59, pl.lit("not an email")),
        ("first_name", 53, pl.lit("nul\x00inside")),
        ("score", 47, pl.lit(" 1e3 ")),
        ("score", 43, pl.lit("NaN")),
        ("vip", 41, pl.lit(" YES ")),
        ("city", 37, pl.lit("NULL")),
        ("push_opt_in", 31, pl.lit("maybe")),
    ]
    for column, every, value in rules:
        frame = frame.with_columns(
            pl.when(i % every == every - 1).then(value).otherwise(pl.col(column)).alias(column)
        )
    frame.write_parquet(target, row_group_size=50_000)
    print(f"wrote {n:,} rows to {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["run", "pass1", "pass2", "check", "tricky"])
    parser.add_argument("job")
    parser.add_argument("out")
    parser.add_argument("--count", action="store_true")
    parser.add_argument("--sink", choices=["partitioned", "null", "single", "slices"], default="partitioned")
    args = parser.parse_args(argv)
    if args.mode == "tricky":  # JOB is the file to take rows from, OUT the file to write
        tricky(Path(args.job), Path(args.out))
        return 0
    job = load_job(args.job)
    out = Path(args.out)
    if args.mode == "check":
        return check(job, out)
    if args.mode in ("run", "pass1"):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        _report("pass1", **pass1(job, out, sink=args.sink))
    if args.mode in ("run", "pass2"):
        _report("pass2", **pass2(job, out, count=args.count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
