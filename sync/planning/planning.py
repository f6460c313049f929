"""The planner: from a job's input files to the exact requests a run will send.

:func:`build_plan` reads and validates the input up front, in bounded memory (:mod:`sync.planning._staging`):

1. **stage** — every source file is streamed in chunks (:mod:`sync.sources.reading`), typed and checked in one lazy
   query per chunk (:func:`sync.planning.validation.validate_chunk`); rejected rows go to the rejects CSV; the clean rows
   get their canonical key (the CRC-32 of the external ID, vectorised) and are written in *sorted chunks*: up to
   :data:`sync.planning._staging.STAGE_ROWS` rows sorted by key and written once, as one Arrow IPC file;
2. **settle** — bucket ``k`` is key range ``k`` (of ``2**bits``, sized by :data:`ROWS_PER_BUCKET`): its slice of
   every chunk file (found by binary search on the key; read with the next few buckets'), sorted in the canonical
   order ``(crc32(ext_id), ext_id, file, row)``, duplicates resolved ("the newest row decides": an ID whose last
   row was rejected is held, :func:`sync.planning.validation.resolve_duplicates`, with the rejected rows that name
   an ID, staged apart), written once. These *clean frames* are the typed, per-user data
   (``Plan.staged``) a snapshot diff reads before any platform request is built. By default every bucket is
   settled before :func:`build_plan` returns; ``lazy=True`` (a changes run) settles the *head* of each file
   source first (its lowest keys, read from the files once, only those rows validated), then stages the rest
   and settles it in a worker thread a few buckets ahead of the readers, so the first requests leave while the
   rest of the input is validated and settled;
3. **batch** — :meth:`Plan.batches` / :meth:`Plan.lanes` stream the clean frames through the platform's batch
   builder (:meth:`sync.platforms.base.Platform.builder`), phase by phase.

Because the canonical order depends only on the IDs (never on chunk sizes or the bucket count), the same input
always gives the same batches with the same IDs. Memory is bounded by one chunk while staging and one bucket
afterwards.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import itertools
import math
import os
import queue
import secrets
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl
import pyarrow as pa
import pyarrow.ipc

from sync._startup import mark_startup
from sync.config import DispatchSettings, FileFormat, Job, Source, SourceKind
from sync.errors import InterruptedRunError
from sync.planning._staging import (
    FINE_BITS,
    ChunkWriter,
    RejectsWriter,
    Settler,
    Settling,
    canonical_order,
    write_error,
)
from sync.planning.row_keys import with_row_keys
from sync.planning.validation import (
    EXT_ID,
    FILE,
    KEY,
    TAG,
    canonical_key,
    clean_schema,
    rejected_ids,
    validate_chunk,
)
from sync.platforms.base import BatchBuilder, Platform, Stream
from sync.platforms.registry import platform_for
from sync.records import Batch, Operation, Phase, RejectedRow
from sync.sources.reading import (
    ROW,
    Chunk,
    RowSelector,
    Spill,
    estimate_rows,
    expand_paths,
    iter_chunks,
    read_ids,
    read_rows,
    spilled_chunks,
)

__all__ = [
    "ASSUMED_LATENCY",
    "HEAD_FIRST_ROWS",
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

ROWS_PER_BUCKET = 65_536
"""Target rows per bucket (a key range): the unit of work, and of memory, after staging."""
BUCKET_BYTES = 16 << 20
"""Target bytes per bucket (its rows' buffers, polars' estimate), which makes buckets of fewer rows when rows are
wide (a bucket is sorted, settled and batched whole); narrow rows (the bench job's, about 130 bytes a row: 8.5 MB per
bucket) do not reach it. The bucket count never changes the batches."""
MAX_BUCKETS = 1 << FINE_BITS
ASSUMED_LATENCY = 0.2
"""Seconds per request assumed by the duration estimate when the concurrency cap, not the rate, is the limit."""


@dataclass(frozen=True, slots=True)
class StagedSource:
    """A source after validation and deduplication: clean frames, one per bucket, in canonical order.

    The counts of clean rows and dropped duplicates, and :attr:`parts`, are known once every bucket is settled:
    reading them settles what is left (a lazy plan's worker otherwise settles as the frames are read).
    """

    source: Source
    files: tuple[str, ...]
    """Input files in read order; ``__file`` in the clean frames indexes this tuple."""
    _settling: Settling = field(repr=False, compare=False)
    _index: int = field(repr=False, compare=False)

    @property
    def rows_read(self) -> int:
        """Input rows read (valid or not). Final once the source is staged — always, unless the plan is lazy:
        then once its rows are all settled (a lazy plan's staging reads on while the first batches are sent)."""
        return self._settling.settlers[self._index].rows_read

    @property
    def rows_clean(self) -> int:
        """Rows left once rejects and duplicates are gone (one per user; per user and tag for tags)."""
        self._settling.settle_all()
        return self._settling.settlers[self._index].rows_clean

    @property
    def duplicates_dropped(self) -> int:
        """Earlier rows of an ID identical to the winning row (not reported as rejects)."""
        self._settling.settle_all()
        return self._settling.settlers[self._index].dropped

    @property
    def parts(self) -> tuple[Path, ...]:
        """One Arrow IPC file per non-empty bucket, in bucket order; each holds every row of its IDs."""
        self._settling.settle_all()
        return tuple(p for p in self._settling.settlers[self._index].parts if p is not None)

    def frames(self, columns: Sequence[str] = ()) -> Iterator[pl.DataFrame]:
        """The clean frames (one per non-empty bucket, in key order) with ``__ext_id``, ``__file``, ``__row``
        and ``columns`` (``__key`` too when asked for). A bucket not settled yet is waited for.

        A lazy plan's head (bucket 0, settled before the rest) comes in slices, each ending where an ID does:
        :data:`HEAD_FIRST_ROWS` rows first, then four times as many each time (:func:`_head_slices`). The
        batches are the same — a batch's run of IDs is carried from one frame to the next, as from one bucket
        to the next — but a lane's first batch is cut from the first rows of the head only, not from all of
        it: a one-user endpoint's stream (``disablePush``) made ~7,000 batches of a 16,384-row head, in Python,
        before its first one, and held the interpreter meanwhile from the other lanes' first batches and the
        loop sending them (issue 13)."""
        read = _bucket_reader(self.source, columns)
        head = self._settling.settlers[self._index].head_end > 0
        k = 0
        while self._settling.has_bucket(self._index, k):
            part = self._settling.bucket(self._index, k)
            k += 1
            if part is None:
                continue
            if k == 1 and head:
                yield from _head_slices(read(part), HEAD_FIRST_ROWS)
            else:
                yield read(part)

    @classmethod
    def from_parts(
        cls,
        source: Source,
        files: Sequence[str],
        parts: Sequence[Path],
        rows_read: int,
        rows_clean: int,
        duplicates_dropped: int = 0,
    ) -> StagedSource:
        """A source staged elsewhere (a benchmark, a tool): its clean frames as settled files (Arrow IPC or
        Parquet with the clean columns), one per key range, in key order."""
        settler = Settler.settled(source, files, parts, rows_clean, duplicates_dropped)
        settler.rows_read = rows_read
        return cls(source, tuple(files), Settling([settler]), 0)


HEAD_FIRST_ROWS = 1024
"""Rows (about: a slice ends where an ID does) of a lazy plan's head handed to its readers first; the next
slices are four times as large each, up to the head's end (:meth:`StagedSource.frames`)."""


def _head_slices(frame: pl.DataFrame, first: int) -> Iterator[pl.DataFrame]:
    """``frame`` (in canonical order: the rows of an ID adjacent) in consecutive slices of about ``first`` rows,
    then four times as many each time, none splitting an ID's rows (stream counts and row keys are per ID)."""
    n = frame.height
    if n <= first:
        yield frame
        return
    ids = frame[EXT_ID]
    starts = (ids != ids.shift(1)).fill_null(True).arg_true()  # the rows that begin an ID
    at, size = 0, first
    while at < n:
        i = starts.search_sorted(at + size, side="left")  # the first ID beginning at or after the target
        assert isinstance(i, int)
        end = int(starts[i]) if i < len(starts) else n
        yield frame.slice(at, end - at)
        at, size = end, size * 4


def _bucket_reader(source: Source, columns: Sequence[str]) -> Callable[[Path], pl.DataFrame]:
    """Reads a settled bucket file of ``source``: its ``__ext_id``, ``__file``, ``__row`` and ``columns``."""
    wanted = list(dict.fromkeys([EXT_ID, FILE, ROW, *columns]))
    names = list(clean_schema(source))  # every bucket file's columns, in this order
    fields = sorted(names.index(c) for c in wanted)

    def read(part: Path) -> pl.DataFrame:
        if part.suffix == ".parquet":  # made elsewhere (from_parts)
            return pl.read_parquet(part, columns=wanted).select(wanted)
        return _read_columns(part, fields).select(wanted)

    return read


def _read_columns(path: Path, fields: list[int]) -> pl.DataFrame:
    """Some columns of a bucket file, read into memory. Not memory-mapped: polars keeps the mapping of a file it
    read (and the pages touched stay resident), which over every bucket of a large plan adds up to its size."""
    with pa.OSFile(str(path)) as source:
        table = pa.ipc.open_file(source, options=pa.ipc.IpcReadOptions(included_fields=fields)).read_all()
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


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
        rejects: RejectsWriter,
        settling: Settling,
        tmpdir: Path,
        lock_fd: int = -1,
    ) -> None:
        self.job = job
        self.staged = staged
        self.rejects_path = rejects.path
        self._rejects = rejects
        self._settling = settling
        self._tmpdir = tmpdir
        self.platform: Platform = platform_for(job)
        # The builder is bound to the job's settings (time zone, message constants, ...).
        self._builder: BatchBuilder = self.platform.builder(job)
        self._counts: dict[tuple[int, int], tuple[int, int]] | None = (
            None  # (source, stream) -> (requests, IDs)
        )
        # (source, stream) -> its sample body: taken while counting by a plan whose buckets were read once
        # (build_plan(count=True)); else built from the frames by summary().
        self._samples: dict[tuple[int, int], Any] | None = None
        self._summary: PlanSummary | None = None
        self._finalizer = weakref.finalize(self, _close_plan, settling, rejects, tmpdir, lock_fd)

    @property
    def rejected_count(self) -> int:
        """Rows rejected: by validation, and as conflicting duplicates (every bucket settled first)."""
        self.settle()
        return self._rejects.count

    @property
    def settled(self) -> bool:
        """Every bucket of every source is settled: counts and rejects are complete."""
        return self._settling.complete

    def settle(self) -> None:
        """Settle every bucket now (a lazy plan settles them as its frames are read otherwise)."""
        self._settling.settle_all()

    def wait_settled(self) -> bool:
        """Wait until the readers of a lazy plan had every bucket settled, without asking for more; False when
        the plan was closed or stopped first (a failure of the settling is raised)."""
        return self._settling.wait_complete()

    def settled_counts(self) -> tuple[int, int]:
        """``(rows_clean, duplicates_dropped)`` over the buckets settled so far (final once :attr:`settled`)."""
        settlers = self._settling.settlers
        return sum(s.rows_clean for s in settlers), sum(s.dropped for s in settlers)

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
        (:mod:`sync.planning.row_keys`), kept with each batch, and ``keep_rows`` (a resume's) drops those confirmed."""
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
        non-idempotent streams before they are cut into batches (see :meth:`sync.planning.resume.ReplayPlan.keep_rows`).
        """
        for staged, stream in self._streams():
            yield from self._builder.stream_batches(
                stream,
                self._frames(staged, stream, keep_rows),
                self.job.batch_size_for(stream.endpoint),
                staged.files,
            )

    def lanes(self, phase: Phase, keep_rows: RowFilter | None = None) -> list[tuple[str, Iterator[Batch]]]:
        """The batches of ``phase`` per endpoint, for the dispatcher's lanes (:class:`sync.dispatch.dispatch.LaneSource`).

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

    def rejected_rows(self, *, skip: int = 0, settled: bool = True) -> Iterator[RejectedRow]:
        """The rows validation refused, as written to :attr:`rejects_path`, from the ``skip``-th on.

        ``settled=True`` waits for every bucket to be settled (the conflicting duplicates found there
        included); ``settled=False`` gives the rows written so far — every row validation refused, once
        :func:`build_plan` returned, and the duplicates of the buckets settled since.
        """
        if settled:
            self.settle()
        count, size = self._rejects.written()
        if skip >= count:
            return
        with self.rejects_path.open("rb") as fh:
            for i, rec in enumerate(csv.DictReader(_lines(fh, size))):
                if i < skip:
                    continue
                yield RejectedRow(
                    path=rec["file"],
                    row=int(rec["row"]),
                    column=rec["column"] or None,
                    reason=rec["reason"],
                    ext_id=rec["ext_id"] or None,
                )

    def stream_counts(self) -> dict[tuple[int, int], tuple[int, int]]:
        """``(requests, IDs)`` per (source index, stream index in :meth:`~BatchBuilder.streams_for`), computed
        once: each bucket is read once for all the streams of its source (settling every bucket first)."""
        if self._counts is None:
            counts: dict[tuple[int, int], tuple[int, int]] = {}
            for i, staged in enumerate(self.staged):
                streams = list(self._builder.streams_for(staged.source))
                for j, result in enumerate(self._count_source(staged, streams)):
                    counts[(i, j)] = result
            self._counts = counts
        return self._counts

    def _count_source(self, staged: StagedSource, streams: list[Stream]) -> list[tuple[int, int]]:
        """``builder.stream_counts`` of every stream of one source, fed from one pass over its buckets."""
        if not streams:
            return []
        columns = list(dict.fromkeys(c for stream in streams for c in stream.columns))
        counter = _Counter(self._builder, self.job, streams)
        try:
            for frame in staged.frames([KEY, *columns]):
                counter.put(frame)
        except BaseException:
            counter.abandon()
            raise
        return counter.finish()

    def summary(self, *, assumed_latency: float = ASSUMED_LATENCY) -> PlanSummary:
        """Requests and IDs per phase, endpoint and operation, the duration estimate and a sample per endpoint.

        The counts are computed once per plan (:meth:`stream_counts`), whatever the latency asked for."""
        if self._summary is not None and assumed_latency == ASSUMED_LATENCY:
            return self._summary
        counts = self.stream_counts()
        totals: dict[tuple[Phase, str, Operation], list[int]] = {}
        samples: dict[str, Any] = {}
        for ph in Phase:
            found = [
                (i, j, staged, stream)
                for i, staged in enumerate(self.staged)
                for j, stream in enumerate(self._builder.streams_for(staged.source))
                if stream.phase is ph
            ]
            for i, j, staged, stream in sorted(found, key=lambda f: _rank(f[3])):
                requests, ids = counts[(i, j)]
                if not requests:
                    continue
                acc = totals.setdefault((stream.phase, stream.endpoint, stream.operation), [0, 0])
                acc[0] += requests
                acc[1] += ids
                if stream.endpoint not in samples:
                    samples[stream.endpoint] = (
                        self._samples[(i, j)]
                        if self._samples is not None
                        else self._builder.stream_sample(stream, staged.frames(stream.columns))
                    )
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


class _Counter:
    """``builder.stream_counts`` of the streams of one source, fed the source's clean frames (every row of their
    IDs, in bucket order) by :meth:`put`: each stream counts in its own thread, from a small queue of the frames
    (polars releases the GIL), while the next frame is read or settled. At most ``concurrency`` of them work on
    a frame at a time: each holds the intermediate frames of its count, and a large source has many streams.

    Each stream gets ``__ext_id``, ``__file``, ``__row``, its columns and, when the frames have it, ``__key``: a
    builder may tell from the keys alone that every row is an ID of its own (rows of one ID share a key)."""

    __slots__ = ("_feeds", "_futures", "_pool", "_sample_futures")

    def __init__(
        self,
        builder: BatchBuilder,
        job: Job,
        streams: Sequence[Stream],
        *,
        concurrency: int = 2,
        samples: bool = False,
    ) -> None:
        # Two streams count at a time by default: one per core, the reading (or settling) of the next
        # buckets beside them.
        gate = threading.BoundedSemaphore(max(1, concurrency))
        columns = [list(dict.fromkeys([KEY, EXT_ID, FILE, ROW, *stream.columns])) for stream in streams]
        self._feeds = [_Feed(names, gate) for names in columns]
        # ``samples``: each stream's sample body too (builder.stream_sample), from a feed of its own; it stops
        # taking frames once it has its first few IDs.
        sample_feeds = [_Feed(names, gate) for names in columns] if samples else []
        sampled = streams if samples else []
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, len(streams) + len(sample_feeds)), thread_name_prefix="plan-count"
        )
        self._futures: list[Future[tuple[int, int]]] = [
            self._pool.submit(builder.stream_counts, stream, feed, job.batch_size_for(stream.endpoint))
            for stream, feed in zip(streams, self._feeds, strict=True)
        ]
        self._sample_futures: list[Future[Any]] = [
            self._pool.submit(builder.stream_sample, stream, feed)
            for stream, feed in zip(sampled, sample_feeds, strict=True)
        ]
        self._feeds += sample_feeds
        for feed, future in zip(self._feeds, [*self._futures, *self._sample_futures], strict=True):
            feed.consumer = future

    def put(self, frame: pl.DataFrame) -> None:
        """Count the rows of ``frame`` (holding every row of its IDs), in every stream."""
        for feed in self._feeds:
            feed.put(frame)

    def finish(self) -> list[tuple[int, int]]:
        """``(requests, IDs)`` per stream, once every frame was given (a counter's failure is raised)."""
        self.abandon()
        return [future.result() for future in self._futures]

    def samples(self) -> list[Any]:
        """Each stream's sample body (None when it sends nothing), after :meth:`finish`; made with
        ``samples=True``."""
        return [future.result() for future in self._sample_futures]

    def abandon(self) -> None:
        """No more frames: the counters end (their threads are waited for)."""
        for feed in self._feeds:
            feed.close()
        self._pool.shutdown(wait=True)


class _Feed:
    """The frames one stream's count reads, handed over by the reading thread through a small queue; a
    counter that stopped early (failed) no longer holds the reader up."""

    __slots__ = ("_columns", "_gate", "_queue", "consumer")

    _END = object()

    def __init__(self, columns: list[str], gate: threading.BoundedSemaphore) -> None:
        self._columns = columns
        self._gate = gate  # held by a counter while it works on a frame (until it asks for the next)
        # One frame waiting: the frames in flight (and the buckets they keep in memory) stay few.
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self.consumer: Future[Any] | None = None

    def put(self, frame: pl.DataFrame) -> None:
        item = frame.select(c for c in self._columns if c != KEY or KEY in frame.columns)
        while self.consumer is None or not self.consumer.done():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        while self.consumer is None or not self.consumer.done():
            try:
                self._queue.put(self._END, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[pl.DataFrame]:
        while (item := self._queue.get()) is not self._END:
            with self._gate:
                yield item


def _lines(fh: BinaryIO, size: int) -> Iterator[str]:
    """The text lines of the first ``size`` bytes of ``fh`` (a file another thread may be appending to)."""
    left = size
    while left > 0:
        line = fh.readline(left)
        if not line:
            return
        left -= len(line)
        yield line.decode("utf-8")


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


def _bucket_bits(rows: int, rows_per_bucket: int, st: _Staged | None = None) -> int:
    # ``rows``: the clean rows and the rejected rows that name an ID, which a bucket's settling reads too. Wide
    # rows (``st``'s staged rows' mean width) make buckets of fewer rows: BUCKET_BYTES each. The bucket count
    # never changes the batches.
    staged_rows = 0 if st is None else st.chunks.rows + st.rejected.rows
    if staged_rows and st is not None:
        width = (st.chunks.bytes + st.rejected.bytes) / staged_rows
        rows_per_bucket = min(rows_per_bucket, max(1, int(BUCKET_BYTES / max(1.0, width))))
    buckets = max(1, min(MAX_BUCKETS, math.ceil(rows / max(1, rows_per_bucket))))
    return max(0, (buckets - 1).bit_length())


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise InterruptedRunError("interrupted while the input was read; nothing was sent or recorded")


@dataclass(frozen=True, slots=True)
class _Staged:
    """A source after the staging pass: its inputs, what was read, and its sorted chunk files."""

    source: Source
    names: tuple[str, ...]
    rows_read: int
    chunks: ChunkWriter
    rejected: ChunkWriter
    """The rejected rows that name an ID (:func:`sync.planning.validation.rejected_ids`), in sorted chunks of their
    own: a bucket's settling reads them to hold an ID whose newest row was rejected."""
    head: pl.DataFrame | None = None
    """The clean rows of the head's key ranges met (and left out of the chunks) by this staging."""


class _Prefetched:
    """The chunks of one input, read one ahead in a thread of their own (``ahead``): pyarrow's CSV parsing (or
    Parquet decoding) of the next chunk overlaps the validation of this one (both release the GIL). Leaving the
    ``with`` block stops the reading (and closes the reader, in its thread) and waits for it. Without ``ahead``
    (a database source: it reads ahead itself where that helps) the chunks are read here, on demand."""

    __slots__ = ("_closed", "_inline", "_queue", "_read", "_thread")

    _END = object()

    def __init__(self, read: Callable[[], Iterator[Chunk]], *, ahead: bool = True) -> None:
        self._read = read
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        self._thread = (
            threading.Thread(target=self._produce, name="plan-read", daemon=True) if ahead else None
        )
        self._inline: Iterator[Chunk] | None = None

    def __enter__(self) -> _Prefetched:
        if self._thread is not None:
            self._thread.start()
        else:
            self._inline = self._read()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._closed.set()
        if self._thread is None:
            close = getattr(self._inline, "close", None)
            if close is not None:
                close()
            return
        while self._thread.is_alive():
            # Make room, so a reader blocked on a full queue sees the close.
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()

    def _put(self, item: Any) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            chunks = self._read()
            try:
                for chunk in chunks:
                    if not self._put(chunk):
                        return
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # raised again by the consumer, in its thread
            self._put(exc)
            return
        self._put(self._END)

    def __iter__(self) -> Iterator[Chunk]:
        if self._inline is not None:
            yield from self._inline
            return
        while (item := self._queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item


def _stage(
    job: Job,
    source: Source,
    tmp: Path,
    rejects: RejectsWriter,
    builder: Any = None,
    stop: threading.Event | None = None,
    limit: int | None = None,
    head_end: int = 0,
    files: Sequence[Path] | None = None,
    spills: Sequence[Spill | None] = (),
    memory_bytes: int = 0,
) -> _Staged:
    """Read, validate and key every row of ``source`` into sorted chunk files. The clean rows of the fine key
    ranges ``[0, head_end)`` (a head settled already, :func:`_stage_head`) are counted and left out. ``spills``
    (by file, as ``files``): the chunks of a file the head's reading kept, read instead of the file.
    ``memory_bytes``: the first sorted chunks, up to that many bytes, are held in memory instead of written
    (:class:`sync.planning._staging.ChunkWriter`)."""
    inputs: list[tuple[str, Callable[[], Iterator[Chunk]]]]
    if source.sql is not None:
        # A database source is one input, named by its label (database and table, never the password).
        from sync.sources.reading_sql import SqlReader

        reader = SqlReader(source)
        # The reader looks at ``stop`` while the database works (a query may take minutes before its first rows).
        inputs = [(reader.label, functools.partial(reader.chunks, stop))]
    else:
        if files is None:
            files = expand_paths(source, workdir=job.workdir, exclude=[rejects.path])
        inputs = [
            (
                str(p),
                functools.partial(spilled_chunks, source, spill)
                if spill is not None
                else functools.partial(iter_chunks, source, p),
            )
            for p, spill in itertools.zip_longest(files, spills)
        ]
    names = tuple(name for name, _ in inputs)
    schema = list(clean_schema(source))
    chunk_dir = tmp / f"{source.name}.chunks"
    chunk_dir.mkdir()
    # The head's rows are left out by the writer, from each sorted chunk (no filtering here).
    writer = ChunkWriter(chunk_dir, head_key=_head_key(head_end), memory_bytes=memory_bytes)
    # Apart from the clean rows, so that a clean input's chunks and settling carry nothing more; written only
    # once it has rows (most inputs have few rejected rows, many none).
    rejected_dir = tmp / f"{source.name}.rejected"
    rejected_dir.mkdir()
    rejected = ChunkWriter(rejected_dir, head_key=_head_key(head_end), keyed=False)
    rows_read = 0
    check_rows = getattr(builder, "check_rows", None)
    kept = 0
    # A users or tags source's sample follows its users to the end of the input: the newest row of a sampled ID
    # (ID and tag) decides, as without --limit. Stopping at the sample's last row sent an older row's values —
    # a push opt-in the user withdrew in a later row, a tag a later row removes.
    follow = limit is not None and source.kind in (SourceKind.USERS, SourceKind.TAGS)
    sampled: list[pl.DataFrame] = []  # the sample's IDs (and tags), chunk by chunk, until it is complete
    sample: _Sample | None = None
    for index, (name, read) in enumerate(inputs):
        if limit is not None and kept >= limit and not follow:
            break
        with _Prefetched(read, ahead=source.sql is None) as chunks:
            for chunk in chunks:
                _check_stop(stop)
                if limit is not None and kept >= limit and not follow:
                    break  # the sample is complete: leaving the block stops reading this file now
                malformed = chunk.malformed if sample is None else sample.malformed(chunk.malformed)
                rejects.rows(malformed)
                if malformed:
                    _add(rejected, rejected_ids(source, index, malformed=malformed))
                rows_read += chunk.frame.height + len(chunk.malformed)
                if chunk.frame.is_empty():
                    continue
                clean, bad = validate_chunk(chunk.frame, source, job.validation, index, name)
                if sample is not None:
                    # Past the sample: only its users' rows, and no other row's reject (none is reported past
                    # the chunk where the sample ends, as when reading stopped there).
                    clean, bad = sample.rows(clean), sample.rejects(bad)
                rejects.frame(bad)
                if bad.height:
                    _add(rejected, rejected_ids(source, index, bad))
                if check_rows is not None and not clean.is_empty():
                    # Values valid in general that this platform cannot take (a negative expiry, a character
                    # XML cannot carry): rejected rows now, not a refused request (or a crash) later.
                    checked, bad = check_rows(source, clean, name)
                    rejects.frame(bad)
                    if bad.height:
                        _add(rejected, _refused_by_check(source, index, clean, checked))
                    clean = checked
                if limit is not None and sample is None:
                    taken = clean.head(limit - kept)
                    kept += taken.height
                    if follow:
                        sampled.append(taken.select(_Sample.columns(source)))
                        if kept >= limit:
                            sample = _Sample(source, pl.concat(sampled).unique())
                            # The rest of this chunk: the sample's users' later rows.
                            taken = pl.concat([taken, sample.rows(clean.slice(taken.height))])
                    clean = taken
                if clean.is_empty():
                    continue
                writer.add(clean.with_columns(canonical_key(clean[EXT_ID])).select(schema))
    writer.flush()
    rejected.flush()
    return _Staged(source, names, rows_read, writer, rejected, writer.head)


@dataclass(frozen=True, slots=True)
class _Sample:
    """A complete ``--limit`` sample of a users or tags source: its IDs (a tags source: its ID and tag pairs),
    which select the rows read after it."""

    source: Source
    keys: pl.DataFrame
    """The sample's unique IDs (``__ext_id``; and ``__tag`` for a tags source)."""

    @staticmethod
    def columns(source: Source) -> list[str]:
        """The clean columns that name what a row of ``source`` is about: its ID, and its tag."""
        return [EXT_ID, TAG] if source.kind is SourceKind.TAGS else [EXT_ID]

    def rows(self, clean: pl.DataFrame) -> pl.DataFrame:
        """The clean rows of the sample's IDs (tags)."""
        return clean.join(self.keys, on=self.columns(self.source), how="semi", nulls_equal=False)

    def rejects(self, bad: pl.DataFrame) -> pl.DataFrame:
        """The rejects (:func:`validate_chunk`'s) of rows of the sample's IDs (tags): those hold them."""
        named = self.keys.rename({EXT_ID: "ext_id"})
        return bad.join(named, on=list(named.columns), how="semi", nulls_equal=False)

    def malformed(self, records: Sequence[RejectedRow]) -> tuple[RejectedRow, ...]:
        """The malformed records naming one of the sample's IDs (a tags source's name no tag: none)."""
        if not records or self.source.kind is SourceKind.TAGS:
            return ()
        ids = set(self.keys[EXT_ID].to_list())
        return tuple(r for r in records if r.ext_id in ids)


def _add(writer: ChunkWriter, frame: pl.DataFrame | None) -> None:
    if frame is not None:
        writer.add(frame)


def _refused_by_check(
    source: Source, index: int, clean: pl.DataFrame, checked: pl.DataFrame
) -> pl.DataFrame | None:
    """The rejected IDs of the clean rows a platform's ``check_rows`` refused (those of ``clean`` not in
    ``checked``; a chunk's rows are one file's, so the row number tells them apart)."""
    refused = clean.join(checked.select(ROW), on=ROW, how="anti")
    return rejected_ids(source, index, refused=refused)


MEMORY_ROWS = 2_000_000
"""A run's file source estimated to hold at most this many rows keeps its first sorted chunks in memory (up to
:data:`MEMORY_CHUNK_BYTES`) instead of writing them as chunk files; a larger one writes every chunk (its
memory stays that of one chunk, and the chunks held would be a small part of its staging)."""
MEMORY_CHUNK_BYTES = 96 * 2**20
"""The most a lazy plan's sorted chunks hold in memory (their buffers' bytes,
:func:`sync.planning._staging.held_bytes`). Holding a chunk saves writing it and mapping it back (about a sixth of
a 1M-row CSV run's staging CPU); the bound keeps a run's peak RSS under 512 MB: it holds the 1M-user bench job's
first 7 of 10 chunks (136 bytes a row), and a lazy plan of the 1M-row 17-column file peaked at 456–462 MB with it
(491–493 MB at 128 MiB)."""


def _chunk_memory(rows: int | None) -> int:
    """The bytes a source's sorted chunks may hold in memory in a lazy plan (:class:`ChunkWriter`), by its
    estimated rows (None: no file): none for a database source (staged before the run starts, as by ``pushsync
    plan``) or a large input (:data:`MEMORY_ROWS`). An eager plan (``pushsync plan``, a snapshot run) writes every chunk: it is not what a
    run's requests wait on, and its memory stays that of one chunk."""
    if rows is None or rows > MEMORY_ROWS:
        return 0
    return MEMORY_CHUNK_BYTES


HEAD_ROWS = 16_384
"""Rows (about) a lazy plan settles first, before the rest of a file source is staged: its first batches."""


def _head_ranges(rows: int) -> int:
    """How many fine key ranges (of :data:`FINE_BITS`) make a head of about :data:`HEAD_ROWS` rows, of a source of
    about ``rows`` rows."""
    rows = max(1, rows)
    return max(1, min(1 << FINE_BITS, math.ceil((1 << FINE_BITS) * HEAD_ROWS / rows)))


def _head_key(head_end: int) -> int:
    """The first key past fine ranges ``[0, head_end)`` (0: no head; ``2**32``: every key)."""
    return head_end << (32 - FINE_BITS)


def _head_mask(source: Source, rules: Any, head_key: int) -> Callable[[pl.Series], pl.Series]:
    """The mask of the IDs (as read) whose rows may fall in the head: a superset of those whose *validated* ID
    does.

    The ID's text is taken as validation takes it (trimmed when the job trims, null values as missing), so the
    key is the one the clean row gets; an ID that is not text as read (a date column) keeps its row (the head
    keeps only the rows validation keys into it, and the staging checks that it saw no more than those)."""

    def select(ids: pl.Series) -> pl.Series:
        if ids.dtype != pl.String or head_key >= 1 << 32:
            return pl.repeat(True, len(ids), dtype=pl.Boolean, eager=True)
        text = ids.str.strip_chars() if rules.trim else ids
        if source.null_values:
            text = text.replace(list(source.null_values), None)
        return text.is_not_null() & (canonical_key(text) < head_key)

    return select


def _stage_head(
    job: Job,
    source: Source,
    files: Sequence[Path],
    builder: Any,
    head_end: int,
    stop: threading.Event | None = None,
    spills: Sequence[Spill | None] = (),
) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """The clean, keyed rows of ``source`` whose keys fall in fine ranges ``[0, head_end)``, and its rejected rows
    there that name an ID (None: none): every file is read, only those rows are validated (their rejects are
    not written: the staging that follows writes every reject, in file order). Reading the whole input here also
    means a file that cannot be read fails before anything is sent, as without a head. A file with a spill
    (``spills``, by file: a CSV file, which is parsed whole here) has every chunk parsed written there, for the
    staging to read instead of parsing the file again."""
    schema = list(clean_schema(source))
    head_key = _head_key(head_end)
    select = _head_mask(source, job.validation, head_key)
    check_rows = getattr(builder, "check_rows", None)
    pieces: list[pl.DataFrame] = []
    refused: list[pl.DataFrame] = []  # the rejected rows that name an ID
    for index, (path, spill) in enumerate(itertools.zip_longest(files, spills)):
        name = str(path)
        raw: list[pl.DataFrame] = []
        picked = None if spill is not None else _picked_rows(source, path, select)
        if picked is not None:
            mark_startup("head_read")  # the first file's head rows, read
            if picked.height:
                _validate_head(job, source, picked, index, name, check_rows, pieces, refused)
            continue
        for chunk in iter_chunks(source, path, keep=_selector(source, path, select), spill=spill):
            _check_stop(stop)
            if (
                chunk.malformed
                and (found := rejected_ids(source, index, malformed=chunk.malformed)) is not None
            ):
                refused.append(found)
            if chunk.frame.height:
                if raw and raw[-1].schema != chunk.frame.schema:
                    _validate_head(job, source, _concat(raw), index, name, check_rows, pieces, refused)
                    raw = []
                raw.append(chunk.frame)
        mark_startup("head_read")
        if raw:
            _validate_head(job, source, _concat(raw), index, name, check_rows, pieces, refused)
    mark_startup("head_validated")
    in_head = pl.col(KEY).cast(pl.Int64) < head_key
    rejected = None
    if refused:
        named = _concat(refused)
        rejected = named.insert_column(0, canonical_key(named[EXT_ID])).filter(in_head)
        if rejected.is_empty():
            rejected = None
    keyed = [p.with_columns(canonical_key(p[EXT_ID])).select(schema) for p in pieces if p.height]
    if not keyed:
        return pl.DataFrame(schema=clean_schema(source)), rejected
    return _concat(keyed).filter(in_head), rejected


def _picked_rows(source: Source, path: Path, select: Callable[[pl.Series], pl.Series]) -> pl.DataFrame | None:
    """The rows of a Parquet file ``select`` chooses by their IDs, read alone (:func:`sync.sources.reading.read_rows`):
    the ID column is read (and checked) whole, the other columns only for those rows. None when the file is
    not one polars reads like pyarrow (read it through :func:`iter_chunks` then)."""
    ids = read_ids(source, path)
    if ids is None:
        return None
    rows: list[pl.Series] = []
    chosen: list[pl.Series] = []
    first = 1
    for group in ids:  # a row group's IDs at a time: memory stays bounded by one row group
        mask = select(group)
        rows.append(pl.int_range(first, first + len(group), dtype=pl.Int64, eager=True).filter(mask))
        chosen.append(group.filter(mask))
        first += len(group)
    if not rows:
        return None
    chunk = read_rows(source, path, pl.concat(rows), pl.concat(chosen))
    return None if chunk is None else chunk.frame


def _selector(source: Source, path: Path, select: Callable[[pl.Series], pl.Series]) -> RowSelector:
    """The rows of ``path`` that ``select`` chooses by their IDs. For Parquet, whose ID column is read alone
    cheaply, ``select`` runs once per row group (one key computation over many rows, not one per chunk);
    for CSV, once per chunk."""
    ids = read_ids(source, path)
    if ids is None:
        return lambda chunk_ids, _rows: select(chunk_ids())
    masks = [select(group) for group in ids]
    mask = pl.concat(masks) if masks else pl.Series([], dtype=pl.Boolean)

    def chosen(_chunk_ids: Callable[[], pl.Series], rows: pl.Series) -> pl.Series:
        # A Parquet chunk's rows are numbered one after another (no malformed records to step over).
        return mask.slice(int(rows[0]) - 1, len(rows)) if len(rows) else mask.clear()

    return chosen


def _validate_head(
    job: Job,
    source: Source,
    raw: pl.DataFrame,
    index: int,
    name: str,
    check_rows: Any,
    clean_rows: list[pl.DataFrame],
    rejected: list[pl.DataFrame],
) -> None:
    """Validate the head's rows ``raw`` of one file as the staging does: the clean rows go to ``clean_rows``, the
    rejected ones that name an ID to ``rejected`` (:func:`sync.planning.validation.rejected_ids`)."""
    clean, bad = validate_chunk(raw, source, job.validation, index, name)
    found = rejected_ids(source, index, bad) if bad.height else None
    if check_rows is not None and not clean.is_empty():
        checked, bad = check_rows(source, clean, name)
        if bad.height:
            more = _refused_by_check(source, index, clean, checked)
            found = more if found is None else found if more is None else pl.concat([found, more])
        clean = checked
    if found is not None:
        rejected.append(found)
    clean_rows.append(clean)


def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(frames) if len(frames) > 1 else frames[0]


_STAGING_PREFIX = "plan-"
_STAGING_LOCK = ".in-use"
"""The file in a staging directory its plan holds an exclusive ``flock`` on while it lives — the job lock's
mechanism (:meth:`sync.state.StateStore.lock`), per directory: ``pushsync plan`` stages without the job's lock."""
STALE_UNLOCKED_AGE = 600.0
"""Seconds after which a staging directory with no lock file is stale: one written by a pushsync before staging
locks existed, or one whose process died between creating it and its lock (a fresh one may be just being made)."""


def _make_staging(workdir: Path, made: list[Path]) -> int:
    """Make a new staging directory under ``workdir`` and return an open descriptor holding its lock.

    The directory's path is put in ``made`` *before* the directory is made, so a ``KeyboardInterrupt`` (SIGINT,
    or SIGTERM taken as one) raised anywhere in here — the interpreter handles a signal right after a call such
    as ``os.mkdir`` returns — still leaves the caller the path to remove; ``tempfile.mkdtemp`` names its
    directory only once it returns, and a plan interrupted there left its ``plan-*`` behind."""
    while True:
        made[:] = [workdir / f"{_STAGING_PREFIX}{secrets.token_hex(8)}"]
        try:
            os.mkdir(made[0], 0o700)
        except FileExistsError:  # another plan's (64 random bits): never ours to remove
            made.clear()
            continue
        break
    fd = os.open(made[0] / _STAGING_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a new directory: nobody else holds it, this never waits
    return fd


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
    rows_per_bucket: int | None = None,
    stop: threading.Event | None = None,
    limit: int | None = None,
    lazy: bool = False,
    count: bool = False,
) -> Plan:
    """Read, validate and deduplicate every source of ``job``, ready to make batches.

    ``limit`` (``--limit N``, a sample run): of each source, only the first N rows that pass validation, in
    file order (files in their sorted order). Duplicate IDs among those N still collapse to one user. A users or
    tags source is read to its end for the later rows of those IDs (ID and tag pairs), so that the newest row
    still decides for them (:class:`_Sample`); other rows after the chunk where the sample ends are neither sent
    nor rejected. An events or deletions source's reading stops with that chunk.

    Unless ``lazy``, when this returns every input row has been read and validated and every bucket is settled:
    the rows refused (by validation, and as conflicting duplicates) are in ``plan.rejects_path`` (default
    ``<workdir>/rejects.csv``) and the counts are final. With ``lazy=True`` (and no ``limit``) it returns once
    the *head* of each file source — its lowest keys, about :data:`HEAD_ROWS` rows, from one read of every file —
    is settled (a database source is staged whole first); once a reader asks for more, a worker thread stages
    the rest (validation's rejects in file order) and settles the buckets as the plan's frames are read, a few
    ahead (:meth:`Plan.settle` settles the rest at once). The batches, the rejects file and the counts are the
    same either way. Staging directories that killed runs left in the workdir are removed first.
    ``rows_per_bucket`` (default :data:`ROWS_PER_BUCKET`) sizes the buckets (memory vs. number of files); it
    never changes the batches. ``count`` (a plan that is settled now, for its :meth:`Plan.summary`: ``pushsync
    plan``): the requests are counted and each stream's sample taken while the buckets are settled, from the
    frames in hand, on the other core, instead of reading every bucket back for :meth:`Plan.stream_counts`; each
    bucket's file is removed once read, so such a plan gives its summary, counts and rejects but no frames or
    batches (asking for them raises RuntimeError).
    Raises :class:`sync.errors.BadInputError` for a file that cannot be read at all, :class:`BadJobError` for a
    platform that is not registered. ``stop`` (set by a signal handler) ends the reading (and the settling) at
    the next chunk (bucket) with :class:`sync.errors.InterruptedRunError`; the staging files are removed.
    """
    platform_for(job)  # an unknown platform fails here, before any reading
    check_workdir(job.workdir)
    rejects_path = rejects_path or job.workdir / "rejects.csv"
    made: list[Path] = []  # the staging directory, once named
    lock_fd = -1  # the descriptor holding its lock, once taken
    rejects: RejectsWriter | None = None
    plan: Plan | None = None
    settling: Settling | None = None
    counts: dict[tuple[int, int], tuple[int, int]] | None = None
    samples: dict[tuple[int, int], Any] | None = None
    try:
        rejects_path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(job.workdir)
        lock_fd = _make_staging(job.workdir, made)
        tmp = made[0]
        rejects = RejectsWriter(rejects_path)
        builder = _builder_for(job)
        if lazy and limit is None:
            settling = _start_lazy(job, tmp, rejects, builder, rows_per_bucket or ROWS_PER_BUCKET, stop)
            staged = tuple(
                StagedSource(source, settling.settlers[i].names, settling, i)
                for i, source in enumerate(job.sources)
            )
        else:
            stages = [_stage(job, source, tmp, rejects, builder, stop, limit) for source in job.sources]
            settlers = []
            for st in stages:
                out = tmp / st.source.name
                out.mkdir()
                bits = _bucket_bits(st.chunks.rows + st.rejected.rows, rows_per_bucket or ROWS_PER_BUCKET, st)
                settlers.append(
                    Settler(
                        st.source,
                        st.names,
                        st.chunks.chunks,
                        bits,
                        out,
                        rejects,
                        rows_read=st.rows_read,
                        rejected=st.rejected.chunks,
                    )
                )
            # A lazy plan is settled while its batches are sent: a signal then drains the run (the dispatcher's
            # stop), it does not interrupt the settling under the lanes.
            settling = Settling(settlers, stop=None if lazy else stop, on_done=rejects.close)
            staged = tuple(StagedSource(st.source, st.names, settling, i) for i, st in enumerate(stages))
            if lazy:
                settling.start()
            elif count:
                counts, samples = _count_while_settling(job, builder, settling)
            else:
                settling.settle_all()
        plan = Plan(job, staged, rejects, settling, tmp, lock_fd)
    except OSError as exc:
        _abandon(plan, made, lock_fd, rejects, settling)
        # Input files are read through sync.sources.reading, which turns their errors into BadInputError: an OSError
        # here comes from writing the staging data or the rejects file.
        raise write_error(exc.filename or job.workdir, exc) from exc
    except BaseException:
        _abandon(plan, made, lock_fd, rejects, settling)
        raise
    if counts is not None:
        plan._counts, plan._samples = counts, samples
    return plan


def _count_while_settling(
    job: Job, builder: BatchBuilder, settling: Settling
) -> tuple[dict[tuple[int, int], tuple[int, int]], dict[tuple[int, int], Any]]:
    """Settle every bucket now, counting each source's requests (:meth:`Plan.stream_counts`) and taking each
    stream's sample body from each bucket as soon as it is written: the counters work on the other core while
    the next buckets are settled. Returns the counts and the samples.

    Each bucket is read back from its file (just written: from the page cache) rather than handed over as the
    settling's frame: that frame is a slice of its whole sorted group and holds the group (and the chunk files'
    pages it was read from) in memory until the slowest counter is done with it, while the settling goes on to
    the next group — about 80 MB more at 10M rows. The frame read back holds the bucket alone.

    The file is then removed (the settler is marked :attr:`~Settler.consumed`: nothing reads a bucket of this
    plan again), so the page cache it took is free for the next buckets' writes. Kept to the end, a 10M-row
    plan's buckets took 2.4 GB of fresh page cache, and on a virtual machine a page the guest has not touched
    lately costs a host fault when first written: removing each file once counted took a 10M-row plan from
    about 21-26 to 14-15 CPU-s of system time (docs/planning.md)."""
    counts: dict[tuple[int, int], tuple[int, int]] = {}
    samples: dict[tuple[int, int], Any] = {}
    for i, settler in enumerate(settling.settlers):
        streams = list(builder.streams_for(settler.source))
        if not streams:
            continue
        # One counter per source, made when its settling starts: the threads of one source at a time.
        counter = _Counter(builder, job, streams, samples=True)
        read = _bucket_reader(settler.source, [KEY, *(c for stream in streams for c in stream.columns)])

        def count(
            part: Path, counter: _Counter = counter, read: Callable[[Path], pl.DataFrame] = read
        ) -> None:
            frame = read(part)  # read into memory (not mapped): the file may go at once
            part.unlink()
            counter.put(frame)

        settler.on_settled = count
        settler.consumed = True
        try:
            settling.settle_source(settler)
        except BaseException:
            counter.abandon()
            raise
        finally:
            settler.on_settled = None
        for j, result in enumerate(counter.finish()):
            counts[(i, j)] = result
        for j, sample in enumerate(counter.samples()):
            samples[(i, j)] = sample
    settling.settle_all()  # the sources without streams (and the on_done hook, if not called yet)
    return counts, samples


def _start_lazy(
    job: Job,
    tmp: Path,
    rejects: RejectsWriter,
    builder: Any,
    rows_per_bucket: int,
    stop: threading.Event | None,
) -> Settling:
    """A lazy plan's settling, started. The *head* of each file source — its lowest keys, about
    :data:`HEAD_ROWS` rows: the first batches — is settled now, from one read of its files that validates those
    rows only; a worker thread then stages the whole input (validation's rejects in file order, as always) and
    settles the rest, a few buckets ahead of the readers. So the first requests leave once the input was read,
    not once all of it was validated and staged. A database source has no head (it is read once)."""
    settlers: list[Settler] = []
    inputs: list[list[Path] | None] = []
    heads: list[int] = []
    # Each file source's estimated rows, taken once (a compressed CSV's estimate decompresses a sample of it).
    estimates: list[int | None] = []
    spills: list[list[Spill]] = [
        [] for _ in job.sources
    ]  # by source and file: what the head's reading parsed
    for i, source in enumerate(job.sources):
        out = tmp / source.name
        out.mkdir()
        files: list[Path] | None = None
        if source.sql is not None:
            from sync.sources.reading_sql import SqlReader

            names = [SqlReader(source).label]
        else:
            files = expand_paths(source, workdir=job.workdir, exclude=[rejects.path])
            names = [str(p) for p in files]
        settler = Settler(source, names, None, 0, out, rejects)
        head_end = 0
        estimate = estimate_rows(source, files) if files else None
        if files is None:
            # A database source is read once, and staged now: what it cannot read fails before anything is sent.
            st = _stage(job, source, tmp, rejects, builder, stop)
            bits = _bucket_bits(st.chunks.rows + st.rejected.rows, rows_per_bucket, st)
            settler.staged(st.chunks.chunks, bits, st.rows_read, st.rejected.chunks)
        elif estimate is not None:
            head_end = _head_ranges(estimate)
            if source.format is FileFormat.CSV:
                # The head's reading parses every row of a CSV file: the staging reads what it parsed.
                spill_dir = tmp / f"{source.name}.spill"
                spills[i] = [Spill(spill_dir / f"{k}.arrow", ROW) for k in range(len(files))]
            head, head_rejected = _stage_head(job, source, files, builder, head_end, stop, spills[i])
            settler.settle_head(head, head_end, head_rejected)
            mark_startup("head_settled")
        settlers.append(settler)
        inputs.append(files)
        estimates.append(estimate)
        heads.append(head_end)

    def stage() -> None:
        for i, source in enumerate(job.sources):
            if settlers[i].is_staged:
                continue
            st = _stage(
                job,
                source,
                tmp,
                rejects,
                builder,
                settling.halted,
                head_end=heads[i],
                files=inputs[i],
                spills=spills[i],
                memory_bytes=_chunk_memory(estimates[i]),
            )
            head_rows = 0 if st.head is None else st.head.height
            head_rejected_rows = 0 if st.rejected.head is None else st.rejected.head.height
            if heads[i]:
                head, head_rejected = settlers[i].take_head()
                if not (_same_rows(st.head, head) and _same_rejected(st.rejected.head, head_rejected)):
                    # The head's reading chose its rows by the key validation gives their IDs, and read them as
                    # the staging does: it must hold exactly the clean rows (and the rejected rows that name an
                    # ID) the staging met in its key ranges. A difference is a bug, never a quirk of the input.
                    raise RuntimeError(
                        f"source {source.name!r}: the head settled first differs from the rows the staging "
                        f"found in its key ranges ({head_rows} clean)"
                    )
            # The rejected rows that name an ID count (the head's too): they are settled with the clean rows.
            rows = st.chunks.rows + head_rows + st.rejected.rows + head_rejected_rows
            bits = _bucket_bits(rows, rows_per_bucket, st)
            settling.staged(i, st.chunks.chunks, bits, st.rows_read, st.rejected.chunks)

    settling = Settling(settlers, on_done=rejects.close, stage=stage)
    settling.start()
    return settling


def _same_rows(staged: pl.DataFrame | None, head: pl.DataFrame | None) -> bool:
    if staged is None or head is None:
        return (staged is None or staged.is_empty()) and (head is None or head.is_empty())
    return canonical_order(staged).equals(canonical_order(head))


def _same_rejected(staged: pl.DataFrame | None, head: pl.DataFrame | None) -> bool:
    """Whether two sets of rejected rows that name an ID hold the same rows, in any order (the head gathers a
    file's malformed records apart from its refused rows)."""
    if staged is None or head is None:
        return (staged is None or staged.is_empty()) and (head is None or head.is_empty())
    order = [KEY, EXT_ID, FILE, ROW]
    return staged.sort(order).equals(head.sort(order))


def _abandon(
    plan: Plan | None,
    made: list[Path],
    lock_fd: int,
    rejects: RejectsWriter | None,
    settling: Settling | None,
) -> None:
    """Undo what an interrupted or failed :func:`build_plan` made, however far it got: the staging directory
    ``made`` holds once named, its lock ``lock_fd`` once taken (-1 before: a descriptor opened but not yet
    returned goes with the process)."""
    if plan is not None:
        plan.close()  # its finalizer: the same, once
        return
    if settling is not None:
        settling.close()
    if rejects is not None:
        rejects.close(quiet=True)  # the error that brought us here is the one to report
    if made:
        _remove_staging(made[0], lock_fd)


def _close_plan(settling: Settling, rejects: RejectsWriter, tmp: Path, lock_fd: int) -> None:
    # The worker first: it must not write into the directory being removed.
    settling.close()
    rejects.close(quiet=True)
    _remove_staging(tmp, lock_fd)


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
        raise write_error(workdir, exc) from exc
