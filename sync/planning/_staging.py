"""The planner's staging area: sorted chunk files, then key-range buckets settled one at a time (see
:mod:`sync.planning.planning` for the whole picture).

* :class:`ChunkWriter` — clean rows (typed, keyed) go to disk in *sorted chunks*: up to :data:`STAGE_ROWS` rows
  at a time are sorted by the canonical key (stably: rows of one key stay in file and row order) and written
  once, as one uncompressed Arrow IPC file. At write time the row offsets of :data:`FINE_RANGES` equal key ranges
  are found by binary search on the sorted key column and kept in memory, so a key range is later read back from
  every chunk file as one slice of the memory-mapped file (only the pages holding its rows are read). A run's small
  input holds its first sorted chunks in memory instead (``memory_bytes``), and their key ranges are sliced from
  there: the same rows, without writing and mapping them back.
* :class:`Settler` — bucket ``k`` of a source is key range ``k`` of ``2**bits``: its slices of every chunk file
  (read with those of the next few buckets, :data:`GROUP_ROWS`), sorted in the canonical order
  ``(key, ext_id, file, row)``, duplicates resolved
  (:func:`sync.planning.validation.resolve_duplicates`), written as one IPC file. A bucket holds every row of
  its IDs, so it is settled on its own. The rejected rows that name an ID are staged apart, in sorted chunk
  files of their own (:func:`sync.planning.validation.rejected_ids`: key, ID, file, row), and a bucket reads
  their slice too: an ID whose newest row was rejected is held. A source without such rows has no such files,
  and its settling reads nothing more.
* :class:`Settling` — settles the buckets of every source of a plan: all at once (``pushsync plan``, snapshot
  runs) or lazily, in a worker thread that stays at most :data:`LOOKAHEAD` buckets ahead of the furthest
  reader (a changes run sends its first batches while the rest is settled).
"""

from __future__ import annotations

import bisect
import csv
import errno
import io
import os
import re
import threading
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import polars as pl
import pyarrow as pa
import pyarrow.ipc

from sync.config import Source
from sync.errors import InterruptedRunError, StateError, printable
from sync.planning.validation import EXT_ID, KEY, REJECTS_SCHEMA, canonical_key, resolve_duplicates
from sync.records import RejectedRow

__all__ = [
    "FINE_BITS",
    "LOOKAHEAD",
    "STAGE_ROWS",
    "ChunkFile",
    "ChunkWriter",
    "RejectsWriter",
    "Settler",
    "Settling",
    "canonical_order",
    "held_bytes",
    "write_error",
]

STAGE_ROWS = 100_000
"""Clean rows sorted and written together as one chunk file (bounded memory; few files to read a bucket from)."""
STAGE_BYTES = 16 << 20
"""A sorted chunk is also cut once its rows hold this many bytes (polars' estimate of their buffers): rows of a
few KB (long text attributes) would otherwise make 100k-row chunks of hundreds of MB, sorted (copied) at once.
Narrow rows (the bench job's, about 130 bytes a row by that estimate: 13 MB per 100k rows) do not reach it."""
CHUNK_BATCH_ROWS = 4096
"""Rows per record batch of a chunk file (a slice is cut from the batches holding it, without copying)."""
FINE_BITS = 12
FINE_RANGES = 1 << FINE_BITS
"""Key ranges whose row offsets each chunk file records: any bucket count up to this is a union of them."""
LOOKAHEAD = 2
"""Buckets a lazy settle runs ahead of the furthest bucket a reader asked for."""
GROUP_ROWS = 131_072
"""Rows (at most, unless one bucket holds more) of the consecutive buckets read from the chunk files together and
sorted at once: one read of each chunk file per group, not per bucket (reading a slice costs about as much as
reading a few thousand rows, and a large input has many chunk files and many buckets: their product of slices
would grow with the square of the input). Settling holds about two groups (read, then sorted)."""
GROUP_BYTES = 24 << 20
"""A group also holds at most about this many bytes of rows (polars' estimate, at the staged rows' mean width; one
bucket at least): wide rows make groups of fewer rows. Narrow rows (the bench job's, about 130 bytes a row by that
estimate: 17 MB per group) do not reach it."""


def write_error(where: Path | str, exc: OSError) -> StateError:
    """The :class:`StateError` for an OS error writing the job's working files (disk full, read-only...)."""
    code = exc.errno
    if code is None:
        # polars' own OSError carries the system's error in its message only: "... (os error 28)".
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    reason = exc.strerror or (os.strerror(code) if code is not None else type(exc).__name__)
    hint = {
        errno.ENOSPC: "free some space (or point 'workdir' at a larger disk)",
        errno.EDQUOT: "free some space (or point 'workdir' at a larger disk)",
        errno.EROFS: "point 'workdir' (or --workdir) at a writable directory",
        errno.EACCES: "point 'workdir' (or --workdir) at a directory you may write to",
        errno.EPERM: "point 'workdir' (or --workdir) at a directory you may write to",
    }.get(code or 0, "check the workdir")
    return StateError(f"cannot write the job's working files ({where}): {reason}; {hint}. Nothing was sent.")


def canonical_order(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` sorted by ``(key, ext_id, file, row)``, for rows that come in read order within each key
    (a bucket's slices of the chunk files, in chunk order; a head's rows, in file order).

    Then a stable sort on the key alone gives that order — one integer sort instead of four columns, strings
    among them — unless two IDs share a key (a CRC-32 collision, rare): only then are the IDs compared too.
    """
    frame = frame.sort(KEY, maintain_order=True)
    keys = frame[KEY]
    same = keys == keys.shift(1)
    # The IDs are compared only where the key repeats (a duplicate ID, or a collision): comparing every ID
    # with the one before cost a quarter of the sort.
    if same.any():
        ids = frame[EXT_ID]
        if (ids.filter(same) != ids.shift(1).filter(same)).any():
            frame = frame.sort([KEY, EXT_ID], maintain_order=True)
    return frame


class RejectsWriter:
    """Appends rejected rows to the rejects CSV (file,row,column,reason,ext_id) and counts them.

    Validation writes while the input is staged; a lazy settle appends duplicate rejects from its worker thread
    while readers may read what is written so far: every write is whole lines, under a lock.
    """

    __slots__ = ("_fh", "_lock", "count", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: TextIO | None = path.open("w", newline="", encoding="utf-8")
        self._lock = threading.Lock()
        self.count = 0
        csv.writer(self._fh, lineterminator="\n").writerow(list(REJECTS_SCHEMA))

    def frame(self, rejects: pl.DataFrame) -> None:
        """Append a frame of rejects (the columns of :data:`sync.planning.validation.REJECTS_SCHEMA`)."""
        if rejects.height:
            text = _printable_ids(rejects.select(list(REJECTS_SCHEMA))).write_csv(include_header=False)
            with self._lock:
                assert self._fh is not None
                self._fh.write(text)
                self.count += rejects.height

    def rows(self, rows: Sequence[RejectedRow]) -> None:
        """Append rejected rows found by the reader (malformed records)."""
        if not rows:
            return
        with self._lock:
            assert self._fh is not None
            writer = csv.writer(self._fh, lineterminator="\n")
            for r in rows:
                writer.writerow([r.path, r.row, r.column or "", r.reason, _shown_id(r.ext_id or "")])
            self.count += len(rows)

    def written(self) -> tuple[int, int]:
        """``(rows, bytes)`` written so far, flushed: a reader may read that many bytes of the file."""
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                return self.count, self._fh.tell()
            return self.count, self.path.stat().st_size

    def close(self, *, quiet: bool = False) -> None:
        """Close the file (flushing it); ``quiet``: when giving up anyway, an error writing it is not raised."""
        with self._lock:
            fh, self._fh = self._fh, None
            if fh is not None:
                try:
                    fh.close()
                except OSError:
                    if not quiet:
                        raise


_CONTROL = r"[\x00-\x1f\x7f-\x9f]"
_SHOWN_ID_CHARS = 4096
"""The most characters of an ID the rejects file holds: the schema's largest ``max_id_length``, so a longer ID —
refused — is cut to a text no valid ID can equal. Whole, a 200,000-character ID (a file pasted into the ID
column) made the rejects file's own reading fail (Python's CSV field limit, 128 KiB): ``pushsync plan`` ended in
an internal error (exit 5)."""


def _shown_id(ext_id: str) -> str:
    """``ext_id`` as the rejects file holds it: control characters escaped, cut after :data:`_SHOWN_ID_CHARS`."""
    text = printable(ext_id)
    if len(text) <= _SHOWN_ID_CHARS:
        return text
    return f"{text[:_SHOWN_ID_CHARS]}… ({len(ext_id)} characters)"


def _printable_ids(rejects: pl.DataFrame) -> pl.DataFrame:
    """``rejects`` with the control characters of its IDs escaped (:func:`sync.errors.printable`) and IDs past
    :data:`_SHOWN_ID_CHARS` cut: the rejects file is read by people (and shown by ``pushsync plan``). Only an ID
    validation refused holds either, so the form written names no user that is sent (a snapshot run holds the
    users rejected rows name by this column)."""
    ids = rejects["ext_id"]
    odd = (ids.str.contains(_CONTROL) | (ids.str.len_chars() > _SHOWN_ID_CHARS)).fill_null(False)
    if not odd.any():
        return rejects
    rows = odd.arg_true()
    escaped = pl.Series([_shown_id(x) for x in rejects["ext_id"].gather(rows).to_list()], dtype=pl.String)
    return rejects.with_columns(rejects["ext_id"].clone().scatter(rows, escaped))


@dataclass(frozen=True, slots=True)
class ChunkFile:
    """One sorted chunk file: ``offsets[r]`` is the first row whose key is in fine range ``r`` or later."""

    path: Path
    rows: int
    offsets: array[int]  # FINE_RANGES + 1 row offsets ('q')
    batches: tuple[int, ...]  # the first row of each record batch of the file, then its row count
    frame: pl.DataFrame | None = None
    """The sorted rows, when held in memory instead of written (a small input's, :class:`ChunkWriter`)."""
    size: int = 0
    """The bytes of its rows in memory (polars' estimate): sizes groups and buckets of wide rows."""

    def rows_of(self, first_range: int, end_range: int) -> pl.DataFrame:
        """The rows of fine ranges ``[first_range, end_range)`` of a chunk held in memory (a slice, no copy)."""
        assert self.frame is not None
        start = self.offsets[first_range]
        return self.frame.slice(start, self.offsets[end_range] - start)

    def rows_in(self, first_range: int, end_range: int) -> int:
        """How many rows fine ranges ``[first_range, end_range)`` hold in this file."""
        return self.offsets[end_range] - self.offsets[first_range]

    def record_batches(self, first_range: int, end_range: int) -> list[pa.RecordBatch]:
        """The rows of fine ranges ``[first_range, end_range)``: the record batches holding them, sliced to them,
        backed by a memory map of the file that lives as long as they do (the file itself is closed at once:
        a large input's many chunk files hold no descriptors).

        Mapped, not read: a slice of a large input's chunk file is a small part of a record batch (a chunk
        holds every bucket's rows, and a bucket group gets a few thousand of them), and reading whole batches
        read several times the rows wanted. Only the pages of the slice's rows are touched, and the mapping
        is let go with the last frame made of them (the settled group's), so the pages touched do not stay
        resident over the buckets of a large input as they would under one mapping held open throughout."""
        start, stop = self.offsets[first_range], self.offsets[end_range]
        if stop <= start:
            return []
        first = bisect.bisect_right(self.batches, start) - 1
        last = bisect.bisect_left(self.batches, stop)  # one past the last batch holding a row of the slice
        with pa.memory_map(str(self.path)) as source:
            reader = pa.ipc.open_file(source)
            out = []
            for i in range(first, last):
                batch = reader.get_batch(i)
                lo = max(start, self.batches[i]) - self.batches[i]
                hi = min(stop, self.batches[i + 1]) - self.batches[i]
                out.append(batch if lo == 0 and hi == batch.num_rows else batch.slice(lo, hi - lo))
            return out


_FINE_BOUNDS = pl.Series(
    "bounds", [r << (32 - FINE_BITS) for r in range(FINE_RANGES)], dtype=pl.UInt32
)  # the first key of each fine range


def _compact(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` copied into buffers of its own. A slice, or a gather, of a frame shares its buffers (a gather of
    strings keeps every data buffer of the column it gathered from); written as Arrow IPC and read back, the copy
    holds its rows' bytes and nothing else."""
    out = io.BytesIO()
    frame.write_ipc(out, compression="uncompressed")
    out.seek(0)
    return pl.read_ipc(out)


def held_bytes(frame: pl.DataFrame) -> int:
    """The bytes ``frame``'s buffers take in memory. Not :meth:`polars.DataFrame.estimated_size`, which leaves out
    the 16-byte view of every string (most of a short string column's memory: 1.7 times the estimate for the
    bench job's chunks)."""
    return int(frame.to_arrow(compat_level=pl.CompatLevel.newest()).nbytes)


class ChunkWriter:
    """Collects a source's clean, keyed frames (in read order) and writes them as sorted chunk files.

    ``head_key`` (a lazy plan that settled the keys below it first, its *head*): the rows of keys below it are
    kept apart (:attr:`head`), not written. They are the first rows of each sorted chunk, so they come out as a
    slice of it (copied: cheaper than filtering every frame twice, once for the head's rows and once for the rest).

    ``memory_bytes`` (a run's small input): the first sorted chunks, as long as their buffers hold no more than
    that many bytes in all, are held in memory (:attr:`ChunkFile.frame`) instead of written; the first chunk past
    the bound and every chunk after it are written. The chunks, their rows and their order are the same.

    ``keyed=False`` (the rejected rows that name an ID): the rows come without ``__key``, which is computed as
    they are sorted, for all of a chunk's rows at once (keying has a fixed cost per call, and they come a few
    rows at a time), and put first."""

    __slots__ = (
        "_directory",
        "_head",
        "_head_key",
        "_keyed",
        "_memory",
        "_pending",
        "_pending_bytes",
        "_pending_rows",
        "bytes",
        "chunks",
        "rows",
        "stage_rows",
    )

    def __init__(
        self,
        directory: Path,
        stage_rows: int | None = None,
        head_key: int = 0,
        memory_bytes: int = 0,
        *,
        keyed: bool = True,
    ) -> None:
        self._directory = directory
        self._keyed = keyed
        self._memory = memory_bytes  # bytes the sorted chunks may still hold in memory (0: write every chunk)
        self._pending: list[pl.DataFrame] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self._head_key = head_key
        self._head: list[pl.DataFrame] = []
        self.stage_rows = stage_rows or STAGE_ROWS
        self.chunks: list[ChunkFile] = []
        self.rows = 0  # rows written (the head's left out)
        self.bytes = 0  # their bytes in memory (polars' estimate)

    @property
    def head(self) -> pl.DataFrame | None:
        """The rows of keys below ``head_key`` met so far, chunk by chunk, each chunk's in key order (rows of one
        key in read order); None when there were none."""
        if not self._head:
            return None
        return pl.concat(self._head) if len(self._head) > 1 else self._head[0]

    def add(self, frame: pl.DataFrame) -> None:
        """Add clean rows (with ``__key``, unless made with ``keyed=False``), in read order."""
        if frame.height:
            self._pending.append(frame)
            self._pending_rows += frame.height
            self._pending_bytes += int(frame.estimated_size())
            if self._pending_rows >= self.stage_rows or self._pending_bytes >= STAGE_BYTES:
                self.flush()

    def flush(self) -> None:
        """Sort what is pending by key (rows of one key stay in read order) and write it as one chunk file."""
        if not self._pending:
            return
        # Not copied into one piece first: the sort gathers from the pieces (one copy of the rows, not two).
        frame = pl.concat(self._pending, rechunk=False) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        if not self._keyed:
            frame = frame.insert_column(0, canonical_key(frame[EXT_ID]))
        frame = frame.sort(KEY, maintain_order=True)
        if self._head_key:
            # The head's rows sort first: a slice of each side, no copy.
            if self._head_key >= 1 << 32:
                cut = frame.height
            else:
                found = frame[KEY].search_sorted(self._head_key, side="left")
                assert isinstance(found, int)
                cut = found
            if cut:
                # Copied out, not a slice: a slice keeps the whole sorted chunk's buffers alive, and the head's
                # rows are held until the staging is done — every chunk, in memory, by the end (about 200 MB
                # more at the peak of a lazy plan of the 1M-row 17-column bench file).
                self._head.append(_compact(frame.slice(0, cut)))
                frame = frame.slice(cut)
            if frame.is_empty():
                return
        path = self._directory / f"{len(self.chunks):06d}.arrow"
        bounds = frame[KEY].search_sorted(_FINE_BOUNDS, side="left")
        assert isinstance(bounds, pl.Series)
        offsets = array("q", bounds.to_list())
        offsets.append(frame.height)
        self.rows += frame.height
        estimate = int(frame.estimated_size())
        self.bytes += estimate
        if self._memory:
            size = held_bytes(frame)
            if size <= self._memory:
                self._memory -= size
                self.chunks.append(ChunkFile(path, frame.height, offsets, (0, frame.height), frame, estimate))
                return
            # Past the bound: this chunk and every later one are written (those held stay held: the chunks
            # held are the first ones, so a bucket's rows still come in chunk order).
            self._memory = 0
        self.chunks.append(replace(self._written(path, frame, offsets), size=estimate))

    @staticmethod
    def _written(path: Path, frame: pl.DataFrame, offsets: array[int]) -> ChunkFile:
        """``frame`` (a sorted chunk) written as the chunk file ``path``."""
        # Uncompressed, in small record batches: a key range's rows are read back from the file, the few
        # batches that hold them and nothing else.
        frame.write_ipc(path, compression="uncompressed", record_batch_size=CHUNK_BATCH_ROWS)
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
            del reader
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        return ChunkFile(path, frame.height, offsets, tuple(starts))


class Settler:
    """Settles the buckets of one source, in key order (see the module docstring). Not thread-safe:
    :class:`Settling` calls :meth:`settle_next` from one thread at a time.

    Bucket ``k`` is the fine key ranges ``[bounds[k], bounds[k + 1])``. A settler made before its source was
    staged (a lazy plan that settled a *head* first, :meth:`settle_head`) learns its chunks and the rest of
    its bounds from :meth:`staged`; until then it knows only the buckets settled so far.
    """

    __slots__ = (
        "_chunks",
        "_deferred",
        "_directory",
        "_group",
        "_group_end",
        "_group_rows",
        "_head",
        "_head_rejected",
        "_rejected",
        "_rejected_group",
        "_rejects",
        "bounds",
        "consumed",
        "dropped",
        "head_end",
        "names",
        "next",
        "on_settled",
        "parts",
        "rows_clean",
        "rows_read",
        "source",
    )

    def __init__(
        self,
        source: Source,
        names: Sequence[str],
        chunks: Sequence[ChunkFile] | None,
        bits: int,
        directory: Path,
        rejects: RejectsWriter | None,
        *,
        rows_read: int = 0,
        rejected: Sequence[ChunkFile] = (),
    ) -> None:
        self.source = source
        self.names = tuple(names)
        self._directory = directory
        self._rejects = rejects
        self._chunks: tuple[ChunkFile, ...] = ()
        # The sorted chunks of the rejected rows that name an ID (rejected_ids), and those of the buckets read
        # together, in key order (None: none there): what holds an ID whose newest row was rejected.
        self._rejected: tuple[ChunkFile, ...] = ()
        self._rejected_group: pl.DataFrame | None = None
        self._head_rejected: pl.DataFrame | None = None  # the head's, until the staging checked them
        self._deferred: pl.DataFrame | None = None  # the head's duplicate rejects, written once staged
        self._head: pl.DataFrame | None = None  # the head's clean rows, until the staging checked them
        self.bounds: tuple[int, ...] | None = None  # fine-range bounds of the buckets, once staged
        self.head_end = 0  # fine ranges [0, head_end) were settled before staging (bucket 0)
        self.next = 0  # the next bucket to settle
        self.parts: list[Path | None] = []  # per settled bucket: its file, None when empty
        self.on_settled: Callable[[Path], None] | None = None
        """Called with each non-empty bucket's file once written, in bucket order (a plan that counts its
        requests while it settles, :func:`sync.planning.planning.build_plan`)."""
        self.consumed = False
        """The buckets were read once, by :attr:`on_settled`, and their files removed: none can be read again."""
        self.rows_clean = 0
        self.dropped = 0
        self.rows_read = rows_read  # input rows read by staging (final once staged)
        self._group: pl.DataFrame | None = (
            None  # the sorted rows of buckets [next, _group_end), read together
        )
        self._group_end = 0
        self._group_rows = GROUP_ROWS  # at most, in a group (fewer when rows are wide: group_rows)
        if chunks is not None:
            self.staged(chunks, bits, rows_read, rejected)

    @classmethod
    def settled(
        cls, source: Source, names: Sequence[str], parts: Sequence[Path], rows_clean: int, dropped: int
    ) -> Settler:
        """A settler whose buckets were settled elsewhere: ``parts``, in key order."""
        bits = max(0, (max(1, len(parts)) - 1).bit_length())
        settler = cls(source, names, (), bits, Path(), None)
        settler.parts = [*parts, *([None] * ((1 << bits) - len(parts)))]
        settler.next, settler.rows_clean, settler.dropped = 1 << bits, rows_clean, dropped
        return settler

    def staged(
        self, chunks: Sequence[ChunkFile], bits: int, rows_read: int, rejected: Sequence[ChunkFile] = ()
    ) -> None:
        """The source is staged: its sorted chunk files (and those of its rejected rows that name an ID), and
        ``2**bits`` buckets (those within the head, if one was settled, are part of it). Writes the head's
        duplicate rejects (after validation's, as without a head)."""
        self._chunks = tuple(chunks)
        self._rejected = tuple(rejected)
        self._group_rows = group_rows(self._chunks)
        width = 1 << (FINE_BITS - bits)
        head = (self.head_end,) if self.head_end else ()
        self.bounds = (0, *head, *(b for b in range(width, FINE_RANGES + 1, width) if b > self.head_end))
        self.rows_read = rows_read
        if self._deferred is not None:
            self._write_head_rejects(bits)
        if self.done:
            self._drop_chunks()

    @property
    def is_staged(self) -> bool:
        """The source's chunks and bucket bounds are known."""
        return self.bounds is not None

    @property
    def buckets(self) -> int:
        """The number of buckets (known once staged)."""
        assert self.bounds is not None
        return len(self.bounds) - 1

    @property
    def done(self) -> bool:
        return self.bounds is not None and self.next >= len(self.bounds) - 1

    def settle_head(self, frame: pl.DataFrame, head_end: int, rejected: pl.DataFrame | None = None) -> None:
        """Settle bucket 0 — fine ranges ``[0, head_end)`` — from ``frame``: every clean, keyed row of those
        ranges, read before the rest of the source is staged (``rejected``: the rejected rows of those ranges
        that name an ID). Its duplicate rejects are held back until :meth:`staged`, so the rejects file lists
        validation's refusals first, as without a head."""
        assert self.next == 0 and self.bounds is None and head_end > 0
        self.head_end = head_end
        self._head, self._head_rejected = frame, rejected
        self._settle_frame(frame if frame.height else None, 0, defer=True, rejected=rejected)

    def _write_head_rejects(self, bits: int) -> None:
        """Write the head's duplicate rejects as a plan without a head would: bucket by bucket of ``2**bits``,
        file and row order within each. Those of a bucket the head covers only in part are held back and
        written with those of the rest of it (:meth:`settle_next` of bucket 1)."""
        assert self._deferred is not None and self._rejects is not None
        width = 1 << (FINE_BITS - bits)
        whole = self.head_end // width  # buckets (of 2**bits) wholly inside the head
        files = {name: i for i, name in enumerate(self.names)}
        ranked = self._deferred.with_columns(
            (canonical_key(self._deferred["ext_id"]).cast(pl.Int64) // (1 << (32 - bits))).alias("__bucket"),
            pl.col("file").replace_strict(files, return_dtype=pl.Int64).alias("__file"),
        ).sort(["__bucket", "__file", "row"])
        self._rejects.frame(ranked.filter(pl.col("__bucket") < whole).drop("__bucket", "__file"))
        rest = ranked.filter(pl.col("__bucket") >= whole).drop("__bucket", "__file")
        self._deferred = rest if rest.height else None

    def take_head(self) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
        """The head's clean rows (before duplicates were resolved) and its rejected rows that name an ID, once:
        for the staging to check."""
        head, rejected, self._head, self._head_rejected = self._head, self._head_rejected, None, None
        return head, rejected

    def settle_next(self) -> None:
        """Settle bucket :attr:`next`: its rows (read from every chunk with those of the next few buckets, up to
        :data:`GROUP_ROWS` rows, and sorted with them), duplicates resolved, written."""
        assert self.bounds is not None
        k = self.next
        if self._group_end <= k:
            self._read_group(k)
        end_range = self.bounds[k + 1]
        frame, self._group = _split(self._group, end_range)
        rejected, self._rejected_group = _split(self._rejected_group, end_range)
        self._settle_frame(frame, k, defer=False, ordered=True, rejected=rejected)
        if self.done:
            self._drop_chunks()

    def _read_group(self, k: int) -> None:
        """Read buckets ``[k, j)`` from every chunk file — the most that hold :data:`GROUP_ROWS` rows, one at
        least — and put them in canonical order: the same order, bucket by bucket, as each sorted alone
        (:func:`canonical_order` of rows in read order is a stable sort on keys, which the buckets split)."""
        assert self.bounds is not None
        bounds = self.bounds
        # The rejected rows that name an ID count too: an input most of whose rows were rejected keeps its
        # groups, and its memory, bounded.
        chunks = (*self._chunks, *self._rejected) if self._rejected else self._chunks
        j = k + 1
        rows = sum(c.rows_in(bounds[k], bounds[j]) for c in chunks)
        while j < len(bounds) - 1:
            more = sum(c.rows_in(bounds[j], bounds[j + 1]) for c in chunks)
            if rows + more > self._group_rows:
                break
            rows += more
            j += 1
        self._group_end = j
        self._group = self._rejected_group = None
        clean = sum(c.rows_in(bounds[k], bounds[j]) for c in self._chunks) if self._rejected else rows
        if clean:
            # Not bound to a name: the unsorted rows are let go as soon as they are sorted.
            self._group = canonical_order(self._read(bounds[k], bounds[j]))
            if clean < rows:
                # Rejected rows that name an ID (few, mostly), read only where there are rows for them to hold;
                # in key order is enough: each bucket's slice is looked up by ID.
                rejected = _read_chunks(self._rejected, bounds[k], bounds[j])
                self._rejected_group = rejected.sort(KEY, maintain_order=True)

    def _read(self, first: int, end: int) -> pl.DataFrame:
        """The clean rows of fine ranges ``[first, end)`` from every chunk file, in chunk order (some rows)."""
        return _read_chunks(self._chunks, first, end)

    def _settle_frame(
        self,
        frame: pl.DataFrame | None,
        k: int,
        *,
        defer: bool,
        ordered: bool = False,
        rejected: pl.DataFrame | None = None,
    ) -> None:
        """Resolve the duplicates of bucket ``k``'s rows and write its winners (no file when it has no rows).
        ``defer`` (the head): its rejects wait for :meth:`staged`. ``ordered``: the rows are in canonical order
        already (else they come in read order). ``rejected``: the bucket's rejected rows that name an ID."""
        assert self._rejects is not None  # only a settler made by settled() has none, and it is done
        path: Path | None = None
        rejects: pl.DataFrame | None = None
        if frame is not None:
            if not ordered:
                frame = canonical_order(frame)
            winners, rejects, identical = resolve_duplicates(frame, self.source, self.names, rejected)
            del frame
            path = self._directory / f"{k:04d}.arrow"
            # Uncompressed too: compressing costs more CPU than the rest of the settling (disk is cheaper).
            winners.write_ipc(path, compression="uncompressed")
            self.rows_clean += winners.height
            self.dropped += identical
            del winners
            if self.on_settled is not None:
                self.on_settled(path)
        if defer:
            self._deferred = rejects if rejects is not None and rejects.height else None
        elif self._deferred is not None:
            # The head's rejects of the bucket (of a plan without a head) this one completes: in file order
            # with this one's, as that bucket would have written them.
            held, self._deferred = self._deferred, None
            merged = pl.concat([held, rejects]) if rejects is not None else held
            files = {name: i for i, name in enumerate(self.names)}
            self._rejects.frame(
                merged.sort(pl.col("file").replace_strict(files, return_dtype=pl.Int64), "row")
            )
        elif rejects is not None:
            self._rejects.frame(rejects)
        self.parts.append(path)
        self.next = k + 1

    def release(self) -> None:
        """Let the rows read go (settling stopped, or is over): with them the chunk files' mappings."""
        self._group = self._rejected_group = None
        self._chunks = tuple(c for c in self._chunks if c.frame is None)

    def _drop_chunks(self) -> None:
        # Every bucket is settled: the chunk files are read no more (and the chunks held in memory go).
        self.release()
        chunks, self._chunks, self._rejected = (*self._chunks, *self._rejected), (), ()
        for chunk in chunks:
            chunk.path.unlink(missing_ok=True)


def group_rows(chunks: Sequence[ChunkFile]) -> int:
    """The most rows a settling group of ``chunks`` holds: :data:`GROUP_ROWS`, fewer when that many rows of their
    mean width would hold more than :data:`GROUP_BYTES`."""
    rows = sum(c.rows for c in chunks)
    size = sum(c.size for c in chunks)
    if not size:
        return GROUP_ROWS
    return max(1, min(GROUP_ROWS, GROUP_BYTES * rows // size))


def _read_chunks(chunks: Sequence[ChunkFile], first: int, end: int) -> pl.DataFrame:
    """The rows of fine ranges ``[first, end)`` from ``chunks``, in chunk order (some rows)."""
    # The chunks held in memory come first (ChunkWriter): their slices, then those of the chunk files, so
    # the rows stay in chunk order. Copied once, by the sort that follows.
    pieces = [c.rows_of(first, end) for c in chunks if c.frame is not None and c.rows_in(first, end)]
    batches = []
    for chunk in chunks:
        if chunk.frame is None and chunk.rows_in(first, end) > 0:
            batches += chunk.record_batches(first, end)
    if batches or not pieces:
        frame = pl.from_arrow(pa.Table.from_batches(batches))
        assert isinstance(frame, pl.DataFrame)
        pieces.append(frame)
    return pl.concat(pieces, rechunk=False) if len(pieces) > 1 else pieces[0]


def _split(group: pl.DataFrame | None, end_range: int) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """``group`` (rows in key order) cut where fine range ``end_range`` begins: the rows before, and the rest
    (None for an empty side; slices, no copy)."""
    if group is None:
        return None, None
    if end_range >= FINE_RANGES:
        end = group.height
    else:
        found = group[KEY].search_sorted(end_range << (32 - FINE_BITS), side="left")
        assert isinstance(found, int)
        end = found
    rest = group.slice(end)
    return (group.slice(0, end) if end else None), (rest if rest.height else None)


class Settling:
    """Settles the buckets of a plan's sources — all now (:meth:`settle_all`) or on demand in a worker thread
    (:meth:`start`), at most ``lookahead`` buckets ahead of the furthest bucket asked for (:meth:`bucket`).

    ``stage`` (a lazy plan that settled the head of its sources first): the staging of the rest of the input,
    run by the worker before it settles anything else; it tells each settler :meth:`Settler.staged`, and stops
    early (:class:`sync.errors.InterruptedRunError`) once :attr:`halted` is set.
    A failure while staging or settling is raised to every reader that waits for a bucket (an OS error as
    :class:`sync.errors.StateError`); ``stop`` (the run's signal event) or :meth:`close` ends the settling,
    and a reader still waiting then gets :class:`sync.errors.InterruptedRunError`.
    """

    __slots__ = (
        "_closed",
        "_cond",
        "_demanded",
        "_error",
        "_lookahead",
        "_on_done",
        "_settle_lock",
        "_stage",
        "_stop",
        "_thread",
        "_wanted",
        "_wanted_all",
        "halted",
        "settlers",
    )

    def __init__(
        self,
        settlers: Sequence[Settler],
        *,
        stop: threading.Event | None = None,
        lookahead: int = LOOKAHEAD,
        on_done: Callable[[], None] | None = None,
        stage: Callable[[], None] | None = None,
    ) -> None:
        self.settlers = tuple(settlers)
        self._cond = threading.Condition()
        self._stop = stop
        self._lookahead = max(0, lookahead)
        self._wanted = [0] * len(self.settlers)  # per source: buckets to have settled (asked for + lookahead)
        self._wanted_all = False
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._on_done = on_done  # called once every bucket is settled (the rejects file is then complete)
        self._settle_lock = threading.Lock()  # settling without a worker: one reader at a time
        self._stage = stage
        self._demanded = False  # a reader asked for a bucket past those settled (the staging waits for it)
        self.halted = threading.Event()
        """Set by :meth:`close`: the staging still under way stops at its next chunk."""

    @property
    def complete(self) -> bool:
        """Every bucket of every source is settled."""
        return all(s.done for s in self.settlers)

    def _stopped(self) -> bool:
        return self._closed or (self._stop is not None and self._stop.is_set())

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stopped():
            raise InterruptedRunError("interrupted while the input was read; nothing was sent or recorded")

    def _settle_one(self, settler: Settler) -> None:
        try:
            settler.settle_next()
            if self.complete and self._on_done is not None:
                self._on_done()
        except OSError as exc:
            raise write_error(exc.filename or "the staging directory", exc) from exc

    def settle_all(self) -> None:
        """Settle every bucket now (in the worker when there is one, else in this thread)."""
        if self._thread is not None:
            with self._cond:
                self._wanted_all = self._demanded = True
                self._cond.notify_all()
                while not self.complete:
                    self._raise_if_failed()
                    self._cond.wait(0.1)
            return
        for settler in self.settlers:
            self.settle_source(settler)

    def settle_source(self, settler: Settler) -> None:
        """Settle every bucket of one source now, in this thread (a plan without a worker)."""
        assert self._thread is None
        with self._settle_lock:
            while not settler.done:
                self._raise_if_failed()
                self._settle_one(settler)

    def wait_complete(self) -> bool:
        """Wait until every bucket is settled without asking for more; False when closed or stopped first."""
        with self._cond:
            while not self.complete:
                if self._error is not None:
                    raise self._error
                if self._stopped():
                    return False
                self._cond.wait(0.1)
        return True

    def start(self) -> None:
        """Settle lazily from now on, in a worker thread (which first stages the rest of the input, if asked)."""
        if self._thread is None and (self._stage is not None or not self.complete):
            self._thread = threading.Thread(target=self._work, name="plan-settle", daemon=True)
            self._thread.start()

    def staged(
        self,
        source: int,
        chunks: Sequence[ChunkFile],
        bits: int,
        rows_read: int,
        rejected: Sequence[ChunkFile] = (),
    ) -> None:
        """Source ``source`` is staged (see :meth:`Settler.staged`): its readers may go on past its head."""
        with self._cond:
            self.settlers[source].staged(chunks, bits, rows_read, rejected)
            self._cond.notify_all()

    def has_bucket(self, source: int, k: int) -> bool:
        """Whether source ``source`` has a bucket ``k`` (waits, if need be, until the source is staged)."""
        settler = self.settlers[source]
        with self._cond:
            while True:
                if k < settler.next:
                    return True
                if settler.is_staged:
                    return k < settler.buckets
                if not self._demanded:
                    self._demanded = True
                    self._cond.notify_all()
                self._raise_if_failed()
                if self._thread is None:
                    raise RuntimeError("a source that is not staged, and no worker to stage it")
                self._cond.wait(0.1)

    def bucket(self, source: int, k: int) -> Path | None:
        """The settled file of bucket ``k`` of source ``source`` (None when it has no rows), once settled."""
        settler = self.settlers[source]
        if settler.consumed:
            raise RuntimeError(
                f"the buckets of source {settler.source.name!r} were counted and removed (build_plan(count=True))"
            )
        with self._cond:
            if settler.next > k:
                return settler.parts[k]
            self._wanted[source] = max(self._wanted[source], k + 1 + self._lookahead)
            self._demanded = True
            self._cond.notify_all()
            while settler.next <= k:
                self._raise_if_failed()
                if self._thread is None:
                    break
                self._cond.wait(0.1)
            else:
                return settler.parts[k]
        # No worker: the readers settle what they ask for.
        with self._settle_lock:
            while settler.next <= k:
                self._raise_if_failed()
                self._settle_one(settler)
        return settler.parts[k]

    def _pick(self) -> Settler | None:
        for i, settler in enumerate(self.settlers):
            if (
                settler.is_staged
                and not settler.done
                and (self._wanted_all or settler.next < self._wanted[i])
            ):
                return settler
        return None

    def _work(self) -> None:
        try:
            if self._stage is not None:
                # The staging waits until a reader asks for more than the head: while the first batches are
                # built and sent it would only compete with them for the CPU and the GIL.
                with self._cond:
                    while not self._demanded and not self._stopped():
                        self._cond.wait(0.1)
                if self._stopped():
                    return
                self._stage()
                if self.complete and self._on_done is not None:
                    self._on_done()
        except BaseException as exc:
            self._fail(exc)
            return
        with self._cond:
            self._cond.notify_all()
        while True:
            with self._cond:
                while (settler := self._pick()) is None and not self._stopped() and not self.complete:
                    self._cond.wait(0.1)
                if settler is None or self._stopped():
                    self._cond.notify_all()
                    return
            try:
                self._settle_one(settler)
            except BaseException as exc:
                self._fail(exc)
                return
            with self._cond:
                self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        # The worker's error is handed to the readers, who raise it in their threads.
        with self._cond:
            self._error = exc
            self._cond.notify_all()

    def close(self) -> None:
        """Stop staging and settling, and wait for the chunk or bucket under way (its files are about to be
        removed)."""
        self.halted.set()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=60)
        if thread is not None and thread.is_alive():
            return  # still at work (it gave no sign for a minute): its files go with the process
        # No settling under way any more (a reader settling without a worker holds the lock while it does).
        if self._settle_lock.acquire(timeout=60):
            try:
                for settler in self.settlers:
                    settler.release()
            finally:
                self._settle_lock.release()
