"""The planner: from a job's input files to the exact requests a run will send.

:func:`build_plan` does all the reading and validation up front, in bounded memory:

1. **stage** — every source file is streamed in chunks (:mod:`sync.reading`), typed and checked
   (:func:`sync.validation.validate_chunk`); rejected rows go to the rejects CSV, clean rows are appended to one of
   ``K`` hash buckets (by the CRC-32 of the external ID) under a temporary directory in the job's workdir;
2. **settle** — each bucket (which holds every row of its IDs) is loaded on its own, duplicates are resolved
   ("last valid row wins", :func:`sync.validation.resolve_duplicates`) and the rows are written sorted in the
   canonical order ``(crc32(ext_id), ext_id, file, row)``. These *clean frames* are the typed, per-user data
   (``Plan.staged``) a future snapshot differ can read before any platform request is built;
3. **batch** — :meth:`Plan.batches` streams the clean frames through the platform's batch builder
   (:meth:`sync.platforms.base.Platform.builder`), phase by phase.

Because the canonical order depends only on the IDs (never on chunk sizes or ``K``), the same input always gives
the same batches with the same IDs. Memory is bounded by one chunk while staging and one bucket afterwards; ``K``
grows with the input so a bucket stays near :data:`ROWS_PER_BUCKET` rows.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import functools
import math
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import polars as pl
import pyarrow as pa
import pyarrow.ipc

from sync.config import DispatchSettings, Job, Source
from sync.errors import InterruptedRunError, StateError
from sync.platforms.base import BatchBuilder, Platform, Stream
from sync.platforms.registry import platform_for
from sync.reading import ROW, Chunk, estimate_rows, expand_paths, iter_chunks
from sync.records import Batch, Operation, Phase, RejectedRow
from sync.row_keys import with_row_keys
from sync.validation import (
    EXT_ID,
    FILE,
    KEY,
    REJECTS_SCHEMA,
    canonical_key,
    clean_schema,
    resolve_duplicates,
    validate_chunk,
)

__all__ = [
    "ASSUMED_LATENCY",
    "ROWS_PER_BUCKET",
    "EndpointSummary",
    "Plan",
    "PlanSummary",
    "RowFilter",
    "StagedSource",
    "build_plan",
    "check_workdir",
    "estimate_duration",
    "remove_stale_staging",
]

RowFilter = Callable[[pl.DataFrame], pl.DataFrame]
"""Keeps the rows of a keyed clean frame (``__ext_id``, ``__row_key``, ...) that are still to be sent."""

ROWS_PER_BUCKET = 50_000
"""Target rows per hash bucket: the unit of work (and of memory) after staging."""
MAX_BUCKETS = 4096
ASSUMED_LATENCY = 0.2
"""Seconds per request assumed by the duration estimate when the concurrency cap, not the rate, is the limit."""


@dataclass(frozen=True, slots=True)
class StagedSource:
    """A source after validation and deduplication: clean Parquet parts, in canonical order."""

    source: Source
    files: tuple[str, ...]
    """Input files in read order; ``__file`` in the clean frames indexes this tuple."""
    parts: tuple[Path, ...]
    """One Parquet file per non-empty hash bucket, in bucket order; each holds every row of its IDs."""
    rows_read: int
    rows_clean: int
    duplicates_dropped: int
    """Earlier rows of an ID identical to the winning row (not reported as rejects)."""

    def frames(self, columns: Sequence[str] = ()) -> Iterator[pl.DataFrame]:
        """The clean frames (one per bucket) with ``__ext_id``, ``__file``, ``__row`` and ``columns``."""
        wanted = list(dict.fromkeys([EXT_ID, FILE, ROW, *columns]))
        for part in self.parts:
            yield pl.read_parquet(part, columns=wanted)


@dataclass(frozen=True, slots=True)
class EndpointSummary:
    """Requests and IDs one operation sends through one endpoint in one phase."""

    phase: Phase
    endpoint: str
    operation: Operation
    requests: int
    ids: int
    """External IDs summed over requests (an ID in two requests counts twice)."""
    estimated_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class PlanSummary:
    """What a run of the plan will send, for people (``pushsync plan``) and scripts (``--output json``)."""

    job: str
    platform: str
    base_url: str
    endpoints: tuple[EndpointSummary, ...]
    rows_read: int
    rows_clean: int
    rejected_count: int
    rejects_path: str
    duplicates_dropped: int
    estimated_seconds: float
    samples: Mapping[str, Any] = field(default_factory=dict)
    """Endpoint → a request body built from its first few IDs (the shape a run sends)."""
    sources: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    @property
    def total_requests(self) -> int:
        return sum(e.requests for e in self.endpoints)

    @property
    def total_ids(self) -> int:
        return sum(e.ids for e in self.endpoints)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with the same content as the human output."""
        return {
            "job": self.job,
            "platform": self.platform,
            "base_url": self.base_url,
            "rows": {
                "read": self.rows_read,
                "clean": self.rows_clean,
                "rejected": self.rejected_count,
                "duplicates_dropped": self.duplicates_dropped,
            },
            "rejects_path": self.rejects_path,
            "sources": {k: dict(v) for k, v in self.sources.items()},
            "requests": self.total_requests,
            "ids": self.total_ids,
            "estimated_seconds": round(self.estimated_seconds, 3),
            "endpoints": [
                {
                    "phase": e.phase.name.lower(),
                    "endpoint": e.endpoint,
                    "operation": e.operation.value,
                    "requests": e.requests,
                    "ids": e.ids,
                    "estimated_seconds": round(e.estimated_seconds, 3),
                }
                for e in self.endpoints
            ],
            "samples": dict(self.samples),
        }


class Plan:
    """The validated input of a job and the batches it makes. Build with :func:`build_plan`.

    Holds a temporary directory under the job's workdir, locked while the plan lives (``lock_fd``: an open
    descriptor holding its lock); :meth:`close` (or the context manager, or garbage collection) removes it. One a
    killed process left behind is removed by the next :func:`build_plan` (:func:`remove_stale_staging`).
    """

    def __init__(
        self,
        job: Job,
        staged: tuple[StagedSource, ...],
        rejects_path: Path,
        rejected_count: int,
        tmpdir: Path,
        lock_fd: int = -1,
    ) -> None:
        self.job = job
        self.staged = staged
        self.rejects_path = rejects_path
        self.rejected_count = rejected_count
        self._tmpdir = tmpdir
        self.platform: Platform = platform_for(job)
        # The builder is bound to the job's settings (time zone, message constants, ...).
        self._builder: BatchBuilder = self.platform.builder(job)
        self._summary: PlanSummary | None = None
        self._finalizer = weakref.finalize(self, _remove_staging, tmpdir, lock_fd)

    @property
    def staging_dir(self) -> Path:
        """The plan's staging directory (locked while the plan lives; removed by :meth:`close`)."""
        return self._tmpdir

    def close(self) -> None:
        """Remove the staged data. The plan cannot make batches afterwards."""
        self._finalizer()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _streams(self, phase: Phase | None = None) -> Iterator[tuple[StagedSource, Stream]]:
        phases = list(Phase) if phase is None else [phase]
        for ph in phases:
            found = [
                (staged, stream)
                for staged in self.staged
                for stream in self._builder.streams_for(staged.source)
                if stream.phase is ph
            ]
            # Lower ranks first (stable: sources in job order within a rank), as the dispatcher sends them.
            yield from sorted(found, key=lambda pair: _rank(pair[1]))

    def lane_rank(self, phase: Phase, endpoint: str) -> int:
        """The rank of ``endpoint``'s lane in ``phase``: within a phase, the dispatcher finishes every lane of a
        lower rank before starting the next rank's (a stream's ``rank``, 0 when its platform declares none;
        an endpoint takes the lowest rank of its streams)."""
        ranks = [_rank(stream) for _, stream in self._streams(phase) if stream.endpoint == endpoint]
        return min(ranks, default=0)

    def _frames(
        self, staged: StagedSource, stream: Any, keep_rows: RowFilter | None
    ) -> Iterator[pl.DataFrame]:
        """The clean frames a stream's batches are built from. A non-idempotent stream's rows carry their keys
        (:mod:`sync.row_keys`), kept with each batch, and ``keep_rows`` (a resume's) drops those confirmed."""
        frames = staged.frames(stream.columns)
        # The platform names its non-idempotent operations (:attr:`sync.platforms.base.Platform.non_idempotent`).
        if stream.operation not in self.platform.non_idempotent:
            yield from frames
            return
        for frame in frames:
            keyed = with_row_keys(frame, stream.columns)
            yield keep_rows(keyed) if keep_rows is not None else keyed

    def batches(self, keep_rows: RowFilter | None = None) -> Iterator[Batch]:
        """Every batch, by phase (opt-outs first, deletions last), in a deterministic order within a phase.

        Each call starts over and yields identical batches. ``keep_rows`` filters the keyed rows of
        non-idempotent streams before they are cut into batches (see :meth:`sync.resume.ReplayPlan.keep_rows`).
        """
        for staged, stream in self._streams():
            yield from self._builder.stream_batches(
                stream,
                self._frames(staged, stream, keep_rows),
                self.job.batch_size_for(stream.endpoint),
                staged.files,
            )

    def lanes(self, phase: Phase, keep_rows: RowFilter | None = None) -> list[tuple[str, Iterator[Batch]]]:
        """The batches of ``phase`` per endpoint, for the dispatcher's lanes (:class:`sync.dispatch.LaneSource`).

        One ``(endpoint, batches)`` pair per endpoint with a stream in ``phase``, endpoints in the order they
        first appear in :meth:`batches`; an endpoint's streams (e.g. ``tagUsers`` of several sources) are chained
        in that order too, so each lane yields exactly the batches :meth:`batches` yields for its endpoint in
        that phase, in the same order. The iterators are lazy (nothing is read until they are advanced).
        """
        by_endpoint: dict[str, list[tuple[StagedSource, Stream]]] = {}
        for staged, stream in self._streams(phase):
            by_endpoint.setdefault(stream.endpoint, []).append((staged, stream))
        return [
            (endpoint, self._lane_batches(streams, keep_rows)) for endpoint, streams in by_endpoint.items()
        ]

    def _lane_batches(
        self, streams: list[tuple[StagedSource, Stream]], keep_rows: RowFilter | None
    ) -> Iterator[Batch]:
        for staged, stream in streams:
            yield from self._builder.stream_batches(
                stream,
                self._frames(staged, stream, keep_rows),
                self.job.batch_size_for(stream.endpoint),
                staged.files,
            )

    def rejected_rows(self) -> Iterator[RejectedRow]:
        """The rows validation refused, as written to :attr:`rejects_path`."""
        with self.rejects_path.open(newline="", encoding="utf-8") as fh:
            for rec in csv.DictReader(fh):
                yield RejectedRow(
                    path=rec["file"],
                    row=int(rec["row"]),
                    column=rec["column"] or None,
                    reason=rec["reason"],
                    ext_id=rec["ext_id"] or None,
                )

    def summary(self, *, assumed_latency: float = ASSUMED_LATENCY) -> PlanSummary:
        """Requests and IDs per phase, endpoint and operation, the duration estimate and a sample per endpoint."""
        if self._summary is not None and assumed_latency == ASSUMED_LATENCY:
            return self._summary
        totals: dict[tuple[Phase, str, Operation], list[int]] = {}
        samples: dict[str, Any] = {}
        for staged, stream in self._streams():
            size = self.job.batch_size_for(stream.endpoint)
            requests, ids = self._builder.stream_counts(stream, staged.frames(stream.columns), size)
            if not requests:
                continue
            acc = totals.setdefault((stream.phase, stream.endpoint, stream.operation), [0, 0])
            acc[0] += requests
            acc[1] += ids
            if stream.endpoint not in samples:
                samples[stream.endpoint] = self._builder.stream_sample(stream, staged.frames(stream.columns))
        per_endpoint = estimate_duration(
            {key: acc[0] for key, acc in totals.items()}, self.job.dispatch, latency=assumed_latency
        )
        endpoints = tuple(
            EndpointSummary(ph, ep, op, acc[0], acc[1], per_endpoint.get((ph, ep, op), 0.0))
            for (ph, ep, op), acc in totals.items()
        )
        summary = PlanSummary(
            job=self.job.name,
            platform=self.job.destination.platform,
            base_url=self.job.destination.base_url,
            endpoints=endpoints,
            rows_read=sum(s.rows_read for s in self.staged),
            rows_clean=sum(s.rows_clean for s in self.staged),
            rejected_count=self.rejected_count,
            rejects_path=str(self.rejects_path),
            duplicates_dropped=sum(s.duplicates_dropped for s in self.staged),
            estimated_seconds=per_endpoint.get(None, 0.0),
            samples=samples,
            sources={
                s.source.name: {"files": len(s.files), "rows_read": s.rows_read, "rows_clean": s.rows_clean}
                for s in self.staged
            },
        )
        if assumed_latency == ASSUMED_LATENCY:
            self._summary = summary
        return summary


def _rank(stream: Any) -> int:
    return int(getattr(stream, "rank", 0))


def _builder_for(job: Job) -> BatchBuilder:
    """The platform's batch builder for ``job``, bound to the job's settings (time zone, constants)."""
    return platform_for(job).builder(job)


def estimate_duration(
    requests: Mapping[tuple[Phase, str, Operation], int],
    dispatch: DispatchSettings,
    *,
    latency: float = ASSUMED_LATENCY,
) -> dict[Any, float]:
    """Seconds a run needs, from the rate budgets and the concurrency caps (no retries assumed).

    Phases run one after another. Within a phase, each endpoint is held back by its own rate budget
    (``requests × period / budget``) and by its concurrency (``requests × latency / cap``), and all endpoints
    share the global cap; a budget group holds its endpoints together to ``their requests × period / budget``.
    Returns the per-(phase, endpoint, operation) figure under its key and the total under ``None``. Budgets are
    per endpoint, ``"*"`` standing for each endpoint not named.
    """
    out: dict[Any, float] = {}
    total = 0.0
    concurrency = max(1, dispatch.concurrency)
    for phase in Phase:
        keys = [k for k in requests if k[0] is phase]
        if not keys:
            continue
        per_endpoint: dict[str, int] = {}
        for _, endpoint, _op in keys:
            per_endpoint[endpoint] = per_endpoint.get(endpoint, 0) + requests[(phase, endpoint, _op)]
        endpoint_time = {}
        for endpoint, n in per_endpoint.items():
            budget = dispatch.budget_for(endpoint)
            cap = min(concurrency, dispatch.per_endpoint_concurrency.get(endpoint, concurrency))
            endpoint_time[endpoint] = max(n * budget.interval if budget else 0.0, n * latency / cap)
        # A budget group is shared: its endpoints' requests together take ``sum × period / budget``; each of
        # them finishes by then at the latest (the group is shared round robin).
        for group in dispatch.budget_groups:
            members = [e for e in per_endpoint if group.holds(e)]
            group_time = sum(per_endpoint[e] for e in members) * group.budget.interval
            for endpoint in members:
                endpoint_time[endpoint] = max(endpoint_time[endpoint], group_time)
        for key in keys:
            share = requests[key] / per_endpoint[key[1]]
            out[key] = endpoint_time[key[1]] * share
        total += max(max(endpoint_time.values()), sum(per_endpoint.values()) * latency / concurrency)
    out[None] = total
    return out


# --- staging ---------------------------------------------------------------------------------------------------


class _RejectsWriter:
    """Appends rejected rows to the rejects CSV (file,row,column,reason,ext_id) and counts them."""

    def __init__(self, fh: TextIO) -> None:
        self._fh = fh
        self.count = 0
        csv.writer(fh, lineterminator="\n").writerow(list(REJECTS_SCHEMA))

    def frame(self, rejects: pl.DataFrame) -> None:
        if rejects.height:
            self._fh.write(rejects.select(list(REJECTS_SCHEMA)).write_csv(include_header=False))
            self.count += rejects.height

    def rows(self, rows: Sequence[RejectedRow]) -> None:
        writer = csv.writer(self._fh, lineterminator="\n")
        for r in rows:
            writer.writerow([r.path, r.row, r.column or "", r.reason, r.ext_id or ""])
        self.count += len(rows)


def _bucket_bits(estimated_rows: int, rows_per_bucket: int) -> int:
    buckets = max(1, min(MAX_BUCKETS, math.ceil(estimated_rows / max(1, rows_per_bucket))))
    return max(0, (buckets - 1).bit_length())


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise InterruptedRunError("interrupted while the input was read; nothing was sent or recorded")


def _stage(
    job: Job,
    source: Source,
    tmp: Path,
    rejects: _RejectsWriter,
    rejects_path: Path,
    rows_per_bucket: int,
    builder: Any = None,
    stop: threading.Event | None = None,
    limit: int | None = None,
) -> StagedSource:
    inputs: list[tuple[str, Callable[[], Iterator[Chunk]]]]
    if source.sql is not None:
        # A database source is one input, named by its label (database and table, never the password).
        from sync.reading_sql import SqlReader

        reader = SqlReader(source)
        inputs = [(reader.label, reader.chunks)]
        estimated = reader.estimate_rows()
    else:
        files = expand_paths(source, workdir=job.workdir, exclude=[rejects_path])
        inputs = [(str(p), functools.partial(iter_chunks, source, p)) for p in files]
        estimated = estimate_rows(source, files)
    names = tuple(name for name, _ in inputs)
    bits = _bucket_bits(estimated, rows_per_bucket)
    schema = clean_schema(source)
    raw_dir = tmp / f"{source.name}.raw"
    raw_dir.mkdir()
    # Arrow IPC streams, not Parquet: a Parquet writer keeps every row group's metadata until it closes, which
    # for hundreds of buckets × hundreds of chunks grows with the input; a stream writer keeps nothing.
    writers: dict[int, tuple[Any, pa.ipc.RecordBatchStreamWriter]] = {}
    rows_read = 0
    check_rows = getattr(builder, "check_rows", None)
    kept = 0
    try:
        for index, (name, read) in enumerate(inputs):
            if limit is not None and kept >= limit:
                break
            chunks = read()
            for chunk in chunks:
                _check_stop(stop)
                if limit is not None and kept >= limit:
                    close = getattr(chunks, "close", None)
                    if close is not None:
                        close()  # the sample is complete: stop reading this file now
                    break
                rejects.rows(chunk.malformed)
                rows_read += chunk.frame.height + len(chunk.malformed)
                if chunk.frame.is_empty():
                    continue
                clean, bad = validate_chunk(chunk.frame, source, job.validation, index, name)
                rejects.frame(bad)
                if check_rows is not None and not clean.is_empty():
                    # Values valid in general that this platform cannot take (a negative expiry, a character
                    # XML cannot carry): rejected rows now, not a refused request (or a crash) later.
                    clean, bad = check_rows(source, clean, name)
                    rejects.frame(bad)
                if limit is not None:
                    clean = clean.head(limit - kept)
                    kept += clean.height
                if clean.is_empty():
                    continue
                clean = clean.with_columns(canonical_key(clean[EXT_ID])).select(list(schema))
                bucket = pl.col(KEY) // (1 << (32 - bits))  # top bits: buckets are ranges of the key
                for group, piece in (
                    clean.with_columns(bucket.alias("__b")).partition_by("__b", as_dict=True).items()
                ):
                    b = int(str(group[0]))
                    table = piece.drop("__b").to_arrow()
                    if b not in writers:
                        sink = pa.OSFile(str(raw_dir / f"{b:04d}.arrows"), "wb")
                        options = pa.ipc.IpcWriteOptions(compression="lz4")
                        writers[b] = (sink, pa.ipc.new_stream(sink, table.schema, options=options))
                    writers[b][1].write_table(table)
    finally:
        for sink, writer in writers.values():
            writer.close()
            sink.close()
    parts = []
    rows_clean = dropped = 0
    out_dir = tmp / source.name
    out_dir.mkdir()
    for b in sorted(writers):
        _check_stop(stop)
        frame = pl.read_ipc_stream(raw_dir / f"{b:04d}.arrows")
        winners, duplicate_rejects, identical = resolve_duplicates(frame, source, names)
        del frame
        rejects.frame(duplicate_rejects)
        dropped += identical
        rows_clean += winners.height
        out = out_dir / f"{b:04d}.parquet"
        winners.sort([KEY, EXT_ID, FILE, ROW]).write_parquet(out, compression="zstd")
        (raw_dir / f"{b:04d}.arrows").unlink()
        parts.append(out)
    raw_dir.rmdir()
    return StagedSource(source, names, tuple(parts), rows_read, rows_clean, dropped)


_STAGING_PREFIX = "plan-"
_STAGING_LOCK = ".in-use"
"""The file in a staging directory its plan holds an exclusive ``flock`` on while it lives — the job lock's
mechanism (:meth:`sync.state.StateStore.lock`), per directory: ``pushsync plan`` stages without the job's lock."""
STALE_UNLOCKED_AGE = 600.0
"""Seconds after which a staging directory with no lock file is stale: one written by a pushsync before staging
locks existed, or one whose process died between creating it and its lock (a fresh one may be just being made)."""


def _new_staging(workdir: Path) -> tuple[Path, int]:
    """A new staging directory under ``workdir`` and an open descriptor holding its lock."""
    tmp = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=workdir))
    try:
        fd = os.open(tmp / _STAGING_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fcntl.flock(fd, fcntl.LOCK_EX)  # a new directory: nobody else holds it, this never waits
    return tmp, fd


def _remove_staging(tmp: Path, lock_fd: int) -> None:
    # Removed before the lock is let go: a clean-up elsewhere never sees this directory unlocked and half gone.
    shutil.rmtree(tmp, ignore_errors=True)
    if lock_fd >= 0:
        os.close(lock_fd)


def remove_stale_staging(workdir: Path, *, now: float | None = None) -> list[Path]:
    """Remove the staging directories (``plan-*``) under ``workdir`` that no live plan holds — left by a process
    killed with SIGKILL or by a power loss — and return them. A directory whose lock another process holds is
    in use and is never touched; one without a lock file is removed only once :data:`STALE_UNLOCKED_AGE` old."""
    import time

    now = time.time() if now is None else now
    removed: list[Path] = []
    if not workdir.is_dir():
        return removed
    for directory in sorted(workdir.glob(f"{_STAGING_PREFIX}*")):
        if not directory.is_dir() or directory.is_symlink():
            continue
        try:
            fd = os.open(directory / _STAGING_LOCK, os.O_RDWR)
        except FileNotFoundError:
            try:
                fresh = now - directory.stat().st_mtime < STALE_UNLOCKED_AGE
            except FileNotFoundError:
                continue  # removed meanwhile by its own plan
            if not fresh:
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory)
            continue
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live plan (this process's or another's) holds it
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
        finally:
            os.close(fd)
    return removed


def build_plan(
    job: Job,
    *,
    rejects_path: Path | None = None,
    rows_per_bucket: int = ROWS_PER_BUCKET,
    stop: threading.Event | None = None,
    limit: int | None = None,
) -> Plan:
    """Read, validate and deduplicate every source of ``job``, ready to make batches.

    ``limit`` (``--limit N``, a sample run): of each source, only the first N rows that pass validation, in
    file order (files in their sorted order); reading stops there, so rows after them are neither sent nor
    rejected. Duplicate IDs among those N still collapse to one user.

    When this returns, input validation is complete: rejected rows are in ``plan.rejects_path`` (default
    ``<workdir>/rejects.csv``). Staging directories that killed runs left in the workdir are removed first.
    ``rows_per_bucket`` sizes the hash buckets (memory vs. number of files); it never changes the batches.
    Raises :class:`sync.errors.BadInputError` for a file that cannot be read at all, :class:`BadJobError` for a
    platform that is not registered. ``stop`` (set by a signal handler) ends the reading at the next chunk with
    :class:`sync.errors.InterruptedRunError`; the staging files are removed.
    """
    platform_for(job)  # an unknown platform fails here, before any reading
    check_workdir(job.workdir)
    rejects_path = rejects_path or job.workdir / "rejects.csv"
    staging: tuple[Path, int] | None = None  # the staging directory and the descriptor holding its lock
    try:
        rejects_path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(job.workdir)
        staging = _new_staging(job.workdir)
        tmp = staging[0]
        with rejects_path.open("w", newline="", encoding="utf-8") as fh:
            writer = _RejectsWriter(fh)
            builder = _builder_for(job)
            staged = tuple(
                _stage(job, source, tmp, writer, rejects_path, rows_per_bucket, builder, stop, limit)
                for source in job.sources
            )
    except OSError as exc:
        if staging is not None:
            _remove_staging(*staging)
        # Input files are read through sync.reading, which turns their errors into BadInputError: an OSError
        # here comes from writing the staging data or the rejects file.
        raise _write_error(exc.filename or job.workdir, exc) from exc
    except BaseException:
        if staging is not None:
            _remove_staging(*staging)
        raise
    assert staging is not None
    return Plan(job, staged, rejects_path, writer.count, *staging)


def check_workdir(workdir: Path) -> None:
    """Make sure the job's workdir exists and takes a file, or raise one clear :class:`StateError`.

    Run before anything else writes there (state lock, ledger, staging), so a read-only or missing mount stops the
    run with one line naming the directory — before anything is sent — instead of a traceback from whichever
    write came first.
    """
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir) as probe:
            probe.write(b"pushsync")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise _write_error(workdir, exc) from exc


def _write_error(where: Path | str, exc: OSError) -> StateError:
    reason = exc.strerror or type(exc).__name__
    hint = {
        errno.ENOSPC: "free some space (or point 'workdir' at a larger disk)",
        errno.EDQUOT: "free some space (or point 'workdir' at a larger disk)",
        errno.EROFS: "point 'workdir' (or --workdir) at a writable directory",
        errno.EACCES: "point 'workdir' (or --workdir) at a directory you may write to",
        errno.EPERM: "point 'workdir' (or --workdir) at a directory you may write to",
    }.get(exc.errno or 0, "check the workdir")
    return StateError(f"cannot write the job's working files ({where}): {reason}; {hint}. Nothing was sent.")
