"""Streaming readers: CSV and Parquet in bounded chunks, only the columns a job maps.

Memory does not grow with file size: CSV is parsed by pyarrow's streaming reader (which also transcodes any
encoding Python knows) one block at a time, Parquet one slice at a time by polars' own reader (pyarrow's, one record
batch at a time, for the column types polars would read otherwise and for what polars cannot read), and only the
mapped columns are converted. Every chunk comes out as a polars frame with a ``__row`` column (1-based data row number, header
excluded) and the mapped columns as text (or lists of text, for Parquet list columns — lists of floats keep their
floats, for validation to refuse a NaN item; float columns keep their floats, for validation to refuse a NaN or
infinite value; Parquet dates and times keep their temporal type). Typing and
validation happen next, in :mod:`sync.planning.validation`.

Anything that makes a file unreadable as a whole — missing, not CSV, wrong encoding, truncated Parquet, a mapped
column absent from the header, a Parquet column whose type its mapping cannot send (:mod:`sync.sources._column_types`) —
raises one :class:`BadInputError` naming the file (and column). A CSV record with
the wrong number of fields is not fatal: it becomes a rejected row and reading goes on.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import csv
import gc
import glob
import os
import re
import sys
import threading
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from sync._arrow import call as arrow_call
from sync._prefetch import ahead
from sync.config import FileFormat, Job, Source
from sync.errors import BadInputError, JobProblem
from sync.records import RejectedRow
from sync.sources._column_types import type_problems
from sync.sources._diagnose import compressed, has_oversized_record, oversized_record
from sync.sources._spill import Spill

__all__ = [
    "ROW",
    "Chunk",
    "RowSelector",
    "Spill",
    "check_sources",
    "estimate_rows",
    "expand_paths",
    "iter_chunks",
    "read_columns",
    "spilled_chunks",
]

ROW = "__row"
"""Name of the 1-based data row number column added to every chunk."""

CSV_BLOCK_BYTES = 1 << 20
"""CSV bytes pyarrow parses per step. Small, because its reader reads ahead several blocks."""
CHUNK_ROWS = 50_000
"""Rows per chunk handed to validation (CSV blocks are grouped up to this; Parquet batches have this size)."""
CHUNK_BYTES = 16 << 20
"""A chunk also holds at most about this many bytes of decoded columns: rows of a few KB (long text) make chunks
of fewer rows, so a chunk and validation's copies of it stay bounded (with :data:`sync.planning._staging.STAGE_BYTES`,
:data:`~sync.planning._staging.GROUP_BYTES` and :data:`sync.planning.planning.BUCKET_BYTES`: a plan of 60k rows of
3 KB peaked at 335-340 MB instead of 820-890 MB). Narrow rows (the bench file's ~140 bytes: 7 MB per 50k rows) never
reach it."""
PARQUET_BATCH_ROWS = CHUNK_ROWS
MIN_PARQUET_BATCH_ROWS = 256
"""The fewest rows a Parquet chunk is cut to for width (a slice costs a pass over the footer: a damaged or absurd
size must not make a large file read a row at a time)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A bounded slice of one input file: the mapped columns, ``__row``, and the records that could not be parsed."""

    frame: pl.DataFrame
    malformed: tuple[RejectedRow, ...] = ()


def expand_paths(source: Source, *, workdir: Path | None = None, exclude: Sequence[Path] = ()) -> list[Path]:
    """The files a source names, globs expanded, sorted by path (so the read order — and "the newest row decides" — is
    stable).

    Each real file is read once, whatever links point to it (the first path in sorted order names it), and a
    ``**`` walk enters each real directory once, so a symbolic link looping back to a parent adds nothing.
    pushsync's own files — anything under ``workdir`` (ledger, state, staging, rejects) and the ``exclude``
    paths (a rejects file written elsewhere) — are never input, even when a glob matches them. Raises
    BadInputError when a pattern matches no file (directories and pushsync's own files do not count), or when a
    path named without a glob is missing, not a file, or one of pushsync's own files.
    """
    own_dirs = [os.path.realpath(workdir)] if workdir is not None else []
    own_files = {os.path.realpath(p) for p in exclude}

    def own(path: str) -> bool:
        real = os.path.realpath(path)
        return real in own_files or any(real == d or real.startswith(d + os.sep) for d in own_dirs)

    files: dict[str, None] = {}
    seen: set[tuple[int, int]] = set()

    def add(path: str) -> None:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            files[path] = None

    for pattern in source.paths:
        if glob.has_magic(pattern):
            matches = _glob_once(pattern)
            if not matches:
                raise BadInputError(pattern, f"source {source.name!r}: no file matches this pattern")
            regular = [m for m in matches if os.path.isfile(m)]
            inputs = [m for m in regular if not own(m)]
            if not inputs:
                why = (
                    "it matches only pushsync's own working files (under the workdir)"
                    if regular
                    else "it matches only directories"
                )
                raise BadInputError(pattern, f"source {source.name!r}: no file matches this pattern ({why})")
            for m in inputs:
                add(m)
        else:
            if not os.path.exists(pattern):
                raise BadInputError(pattern, f"source {source.name!r}: file not found")
            if not os.path.isfile(pattern):
                raise BadInputError(pattern, f"source {source.name!r}: not a file (a directory? use a glob)")
            if own(pattern):
                raise BadInputError(
                    pattern, f"source {source.name!r}: this is one of pushsync's own working files, not input"
                )
            add(pattern)
    return [Path(p) for p in files]


def _glob_once(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, sorted, except that ``**`` enters each real directory once.

    Python's ``**`` follows symbolic links to directories without remembering where it has been: a link back to
    a parent is walked until the path is too long for the system (40 levels on Linux: the same file 41 times),
    and two such links make the walk exponential. Links to other directories are still followed, once.
    """
    if pattern.endswith(os.sep + "**"):
        pattern += os.sep + "*"  # "dir/**" names every file below dir (directories are dropped anyway)
    head, sep, rest = pattern.partition(os.sep + "**" + os.sep)
    if not sep:
        return sorted(glob.glob(pattern, recursive=True))
    out: set[str] = set()
    for base in glob.glob(head) if glob.has_magic(head) else [head]:
        visited: set[tuple[int, int]] = set()
        for directory, subdirs, _files in os.walk(base, followlinks=True):
            try:
                st = os.stat(directory)
            except OSError:
                subdirs.clear()
                continue
            if (st.st_dev, st.st_ino) in visited:
                subdirs.clear()
                continue
            visited.add((st.st_dev, st.st_ino))
            # Like glob's "**": hidden directories are not entered.
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            out.update(_glob_once(os.path.join(glob.escape(directory), rest)))
    return sorted(out)


_Handler = Callable[[pa_csv.InvalidRow], str]

_held_by_arrow: set[weakref.ref[_Handler]] = set()
"""Weak references to the invalid-row handlers pyarrow CSV readers still hold (guarded by ``_released``)."""
_released = threading.Condition()
_RELEASE_WAIT_SECONDS = 10.0


def _handed_to_arrow(handler: _Handler) -> _Handler:
    """Track a Python callable about to be handed to a pyarrow CSV reader; returns it.

    Why: pyarrow's streaming CSV reader reads ahead on Arrow's IO threads, and a read-ahead still pending keeps the
    C++ reader — and this Python callable inside it — alive after we have closed it. When that read-ahead ends
    while the interpreter is finalising, releasing the callable needs the GIL, which makes the IO thread exit from
    inside a C++ destructor: the process aborts ("terminate called without an active exception", exit 134) at
    random, even after a clean ``pushsync validate``. :func:`_wait_for_arrow` (run at exit, before finalisation)
    waits until every tracked callable has been released, i.e. until no reader is left on Arrow's threads.
    (A plain weak reference, not ``weakref.finalize``: finalizers stop firing once interpreter shutdown begins.)
    """
    with _released:
        _held_by_arrow.add(weakref.ref(handler, _release_one))
    return handler


def _release_one(ref: weakref.ref[_Handler]) -> None:
    with _released:
        _held_by_arrow.discard(ref)
        _released.notify_all()


def _wait_for_arrow(timeout: float = _RELEASE_WAIT_SECONDS) -> bool:
    """Wait until pyarrow has released every tracked handler; True when none is left."""
    if _held_by_arrow:
        # A reader may be kept only by a reference cycle (an exception's traceback): free it first.
        gc.collect()
    with _released:
        return _released.wait_for(lambda: not _held_by_arrow, timeout)


atexit.register(_wait_for_arrow)


def _csv_read_options(source: Source, block_size: int | None = None) -> pa_csv.ReadOptions:
    return pa_csv.ReadOptions(
        encoding=source.encoding, block_size=block_size or CSV_BLOCK_BYTES, use_threads=False
    )


def read_columns(source: Source, path: Path) -> list[str]:
    """The column names of a file (CSV header or Parquet schema), reading as little as possible."""
    try:
        if source.format is FileFormat.PARQUET:
            return list(pq.ParquetFile(path).schema_arrow.names)
        packed = compressed(path)
        if packed is not None:
            raise packed
        header_only = _header_without_newline(source, path)
        if header_only is not None:
            return header_only

        def skip(_row: pa_csv.InvalidRow) -> str:
            return "skip"

        # A small block first (the header is all we want), then the reading's own, which decides: pyarrow parses
        # the first block whole, and a wide export's header (6,000 columns of custom fields: ~120 KB) or a long
        # value in the first rows (a 200 KB note) does not fit in 64 KiB. That was reported as "not a CSV file"
        # or "a record is larger than 1 MiB", although the reading itself takes the file.
        for block_size in (_HEADER_PROBE_BYTES, CSV_BLOCK_BYTES):
            with _undecodable_rows(skip) as undecodable:
                try:
                    reader = pa_csv.open_csv(
                        path,
                        read_options=_csv_read_options(source, block_size=block_size),
                        parse_options=pa_csv.ParseOptions(
                            delimiter=source.delimiter,
                            newlines_in_values=True,
                            invalid_row_handler=_handed_to_arrow(skip),
                        ),
                        convert_options=pa_csv.ConvertOptions(column_types={}, include_columns=[]),
                    )
                    break
                except (pa.ArrowException, UnicodeError) as exc:
                    # A record past two small blocks is read again by the reading's own blocks unless it is
                    # larger than one of those too (a quote never closed, say: the whole file is refused then).
                    if block_size < CSV_BLOCK_BYTES and not (
                        "straddling object" in str(exc)
                        and has_oversized_record(source, path, CSV_BLOCK_BYTES)
                    ):
                        continue
                    raise _unreadable(source, path, exc, undecodable=bool(undecodable)) from exc
        try:
            return list(reader.schema.names)
        finally:
            reader.close()
    except (pa.ArrowException, OSError, UnicodeError) as exc:
        raise _unreadable(source, path, exc) from exc


@contextlib.contextmanager
def _undecodable_rows(handler: object) -> Iterator[list[BaseException]]:
    """Collect the malformed records pyarrow could not hand to ``handler`` because they are not valid UTF-8.

    pyarrow decodes a malformed record's text before it calls the invalid-row handler; when that fails it reports
    the error through ``sys.unraisablehook`` (a traceback on stderr) and then fails the read with a parse error
    quoting the raw bytes. While this is active those reports are collected instead (others pass through), so
    the caller can raise one clear "cannot decode" error. The hook is process-wide; it only takes reports about
    ``handler``, so a reader in another thread is not affected.
    """
    caught: list[BaseException] = []
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if unraisable.object is handler and isinstance(unraisable.exc_value, UnicodeDecodeError):
            caught.append(unraisable.exc_value)
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield caught
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous


def _header_without_newline(source: Source, path: Path) -> list[str] | None:
    """The column names of a CSV file holding one line without a line break (a header and no rows), else None.

    pyarrow cannot parse such a file ("Empty CSV file or block"), yet it is a valid CSV file with no rows.
    """
    with path.open("rb") as fh:
        head = fh.read(_HEADER_PROBE_BYTES + 1)
    if not head or len(head) > _HEADER_PROBE_BYTES:
        return None
    try:
        text = head.decode(source.encoding)
    except (UnicodeError, LookupError):
        return None
    text = text.removeprefix("\ufeff")
    if not text.strip() or "\n" in text or "\r" in text:
        return None
    return next(csv.reader([text], delimiter=source.delimiter))


def _long_first_line(source: Source, path: Path) -> bool:
    """True when the file's first :data:`CSV_BLOCK_BYTES` bytes are text holding no line break: a header line
    longer than a block (which pyarrow reports as "no line at all"), not binary data."""
    try:
        with path.open("rb") as fh:
            head = fh.read(CSV_BLOCK_BYTES)
        # Cut at a block's end: a multi-byte character there may be cut too.
        text = head.decode(source.encoding, errors="ignore")
    except (OSError, LookupError):
        return False
    return len(head) == CSV_BLOCK_BYTES and bool(text.strip()) and not any(c in text for c in "\x00\n\r")


def _blank(source: Source, path: Path) -> bool:
    """True when the file's start decodes to nothing but whitespace (a byte-order mark at most)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(_HEADER_PROBE_BYTES)
        return not head.decode(source.encoding).removeprefix("\ufeff").strip()
    except (OSError, UnicodeError, LookupError):
        return False


_HEADER_PROBE_BYTES = 1 << 16
_CONVERSION_ERROR = re.compile(
    r"In CSV column #(\d+): Row #(\d+): CSV conversion error to string: invalid UTF8"
)


def _unreadable(
    source: Source,
    path: Path,
    exc: BaseException,
    names: list[str] | None = None,
    *,
    undecodable: bool = False,
) -> BadInputError:
    text = str(exc)
    if undecodable:
        found = re.search(r"Row #(\d+)", text)
        return BadInputError(
            str(path),
            f"cannot decode the file as {source.encoding} (mixed encodings?); "
            "set the source's 'encoding' (e.g. latin-1, utf-16)",
            row=int(found.group(1)) - 1 if found else None,
        )
    # pyarrow quotes the raw record in parse errors: never repeat input values in a message.
    text = re.sub(r"(Expected \d+ columns, got \d+): .*", r"\1", text)
    if isinstance(exc, FileNotFoundError):
        return BadInputError(str(path), "file not found")
    if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowException):
        return BadInputError(str(path), f"cannot read file: {exc.strerror or text}")
    if source.format is FileFormat.PARQUET:
        return BadInputError(
            str(path),
            "not a readable Parquet file (truncated or corrupt?): "
            + (text.splitlines() or [type(exc).__name__])[0],
        )
    hint = "set the source's 'encoding' (e.g. latin-1, utf-16)"
    located = _CONVERSION_ERROR.search(text)
    if located:
        # pyarrow numbers records from 1 with the header as record 1, columns from 0 in the file's header.
        index, record = int(located.group(1)), int(located.group(2))
        column = names[index] if names is not None and index < len(names) else None
        return BadInputError(
            str(path),
            f"cannot decode the file as {source.encoding} (mixed encodings?); {hint}",
            row=record - 1,
            column=column,
        )
    if "straddling object" in text:
        # A record larger than a block (the header's reading uses smaller ones, but refuses no record a whole
        # reading takes): found again, and said what it likely is.
        return oversized_record(source, path, names, CSV_BLOCK_BYTES)
    if "UTF8" in text or "UTF-8" in text or isinstance(exc, UnicodeError):
        return BadInputError(
            str(path),
            f"cannot decode the file as {source.encoding}; set the source's 'encoding' (e.g. latin-1, utf-16)",
        )
    if "Empty CSV file" in text:
        if _long_first_line(source, path):
            return BadInputError(
                str(path),
                f"the header line is longer than {CSV_BLOCK_BYTES >> 20} MiB, the most pushsync reads as one line "
                "(tens of thousands of columns?); export only the columns the job maps",
            )
        if not _blank(source, path):
            # pyarrow found no line at all in bytes that are not blank text: a gzip or zip file, say.
            return BadInputError(
                str(path), "not a CSV file: it holds no line of text (compressed or binary?)"
            )
        return BadInputError(str(path), "the file is empty (a CSV file needs at least a header line)")
    return BadInputError(
        str(path), f"not a readable CSV file: {text.splitlines()[0] if text else type(exc).__name__}"
    )


def _check_header(source: Source, path: Path) -> list[str]:
    names = read_columns(source, path)
    if source.format is FileFormat.CSV:
        _check_byte_order_mark(source, path)
    if any("\x00" in n for n in names):
        # A UTF-16 file without a byte-order mark decodes as "UTF-8" with a NUL after every character.
        raise BadInputError(
            str(path), "the header holds NUL characters: is the file UTF-16? set the source's 'encoding'"
        )
    # Only a mapped column named twice is ambiguous: the others are not read, so the empty names of a
    # spreadsheet's trailing columns (``id,name,,``) or two unmapped ``notes`` columns are no reason to refuse.
    mapped = set(source.columns())
    dupes = sorted({n for n in names if n in mapped and names.count(n) > 1})
    if dupes:
        raise BadInputError(str(path), f"duplicate column name(s) in the header: {', '.join(dupes)}")
    if source.format is FileFormat.PARQUET:
        # After the duplicate check: a schema field is looked up by name, which two columns of one name make
        # ambiguous (a KeyError, not a message).
        _check_parquet_types(source, path)
    missing = [c for c in source.columns() if c not in names]
    if missing:
        hint = ""
        if len(names) == 1 and any(d in names[0] for d in ",;\t|" if d != source.delimiter):
            hint = f"; is the delimiter right? (the source says {source.delimiter!r})"
        # A name that differs only in case or in spaces around it ("Id ", " email") looks the same in the list
        # above: say which.
        near = [
            f"{_shown(n)!r} for {c!r}"
            for c in missing
            for n in names
            if n != c and n.strip().casefold() == c.strip().casefold()
        ]
        if near:
            hint += f"; the file has {', '.join(near[:3])} (names must match exactly: case and spaces)"
        raise BadInputError(
            str(path),
            f"column(s) {', '.join(map(repr, missing))} named by source {source.name!r} are not in the file "
            f"(it has {len(names)} column(s): {', '.join(map(_shown, names[:12]))}"
            f"{', ...' if len(names) > 12 else ''}){hint}",
            column=missing[0],
        )
    return names


_SHOWN_NAME_CHARS = 60
"""The most characters of a header's column name a message shows: a name can be as long as the header line (a
file that is not the export, one value of 300 KB), and the message would repeat it whole."""


def _shown(name: str) -> str:
    """``name`` as a message shows it: cut at :data:`_SHOWN_NAME_CHARS` characters."""
    if len(name) <= _SHOWN_NAME_CHARS:
        return name
    return f"{name[: _SHOWN_NAME_CHARS - 1]}… ({len(name)} characters)"


def _check_byte_order_mark(source: Source, path: Path) -> None:
    """Refuse a CSV file that starts with UTF-8's byte-order mark when the source names another encoding.

    The mark says the file is UTF-8, and every byte sequence is valid Latin-1 or cp1254: read so, nothing fails,
    and each accented letter is sent as two wrong ones (``José`` as ``JosÃ©``) to every user of the file. Only
    the mark is certain; a UTF-8 file without one is not guessed at.
    """
    if codecs.lookup(source.encoding).name in ("utf-8", "utf-8-sig"):
        return
    try:
        with path.open("rb") as fh:
            head = fh.read(len(codecs.BOM_UTF8))
    except OSError:
        return  # the reading says what is wrong
    if head == codecs.BOM_UTF8:
        raise BadInputError(
            str(path),
            f"the file starts with a UTF-8 byte-order mark but the source's encoding is {source.encoding}: its "
            "accented letters would be sent garbled (José as JosÃ©); set the source's 'encoding: utf-8'",
        )


def _check_parquet_types(source: Source, path: Path) -> None:
    """Refuse (file, column) a mapped Parquet column whose type its mapping cannot send (:mod:`sync.sources._column_types`)."""
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except (pa.ArrowException, OSError, UnicodeError) as exc:
        raise _unreadable(source, path, exc) from exc
    problems = type_problems(source, schema)
    if problems:
        column, message = problems[0]
        if len(problems) > 1:
            message += f" (also column(s) {', '.join(repr(c) for c, _ in problems[1:])})"
        raise BadInputError(str(path), message, column=column)


def _normalise(table: pa.Table | pa.RecordBatch) -> pl.DataFrame:
    """Arrow → polars, with scalar columns as text, except dates/times and floats (kept) and lists (as lists of
    text, or of floats): :func:`_as_text`."""
    frame = pl.from_arrow(_without_decimal256(table))
    assert isinstance(frame, pl.DataFrame)
    return _as_text(frame)


def _without_decimal256(table: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    """``table`` with its decimal256 columns (and lists of them) as text.

    polars cannot take a decimal256 column from Arrow (a Rust panic, "operator does not support primitive
    Int256"). A decimal256 is only a wider decimal, and a decimal128 column is read as its exact text ("1.50"):
    Arrow's own cast to text gives that same text for any precision, where a cast to decimal128 would fail for
    values past 38 digits. So such a column is read as a decimal128 one is, rather than refused.
    """
    schema = pa.schema([field.with_type(_decimal256_as_text(field.type)) for field in table.schema])
    if schema.equals(table.schema):
        return table
    return table.cast(schema)


def _decimal256_as_text(dtype: pa.DataType) -> pa.DataType:
    """``dtype`` with decimal256 (alone, dictionary-encoded or as list items) replaced by text."""
    if pa.types.is_decimal256(dtype):
        return pa.string()
    if pa.types.is_dictionary(dtype) and pa.types.is_decimal256(dtype.value_type):
        return pa.string()
    if pa.types.is_list(dtype):
        return pa.list_(_decimal256_as_text(dtype.value_type))
    if pa.types.is_large_list(dtype):
        return pa.large_list(_decimal256_as_text(dtype.value_type))
    if pa.types.is_fixed_size_list(dtype):
        return pa.list_(_decimal256_as_text(dtype.value_type), dtype.list_size)
    return dtype


def _as_text(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with scalar columns as text, except dates/times and floats (kept) and lists (as lists of text, or
    of floats)."""
    casts = []
    for name, dtype in frame.schema.items():
        if dtype in (pl.Date,) or isinstance(dtype, pl.Datetime) or dtype == pl.String:
            continue
        if isinstance(dtype, pl.List | pl.Array):
            # A list of floats keeps its floats, so that validation can refuse a NaN or infinite item as it
            # refuses such a value ("NaN" as text would be sent as an item); its items are made text there.
            inner = dtype.inner
            item = inner if inner is not None and inner.is_float() else pl.String
            casts.append(pl.col(name).cast(pl.List(item)))
        elif dtype == pl.Boolean:
            casts.append(pl.col(name).cast(pl.String))
        elif dtype.is_float():
            # Kept a float: as text, a NaN or infinite value could not be told from a CSV file's text "nan" or
            # "inf", which a string attribute sends as it is, where such a float is refused. Validation reads its
            # text (sync.planning._parsers.float_text) and refuses a NaN or infinity by the column's type.
            continue
        else:
            casts.append(pl.col(name).cast(pl.String, strict=False))
    return frame.with_columns(casts) if casts else frame


RowSelector = Callable[[Callable[[], pl.Series], pl.Series], pl.Series]
"""Given a function giving a chunk's ID column (as read: text, unless the file types it otherwise; converted
only when asked for) and its rows' numbers (``__row``), the mask of the rows to keep."""


def iter_chunks(
    source: Source, path: Path, *, keep: RowSelector | None = None, spill: Spill | None = None
) -> Iterator[Chunk]:
    """Stream one file of a source in bounded chunks, reading only the mapped columns.

    ``keep``: only the rows it selects (by their ID) come out, with their own row numbers; the file is checked
    and read as a whole all the same (malformed records are still reported). Converting only those rows is
    what makes a read of a few rows of a large file cheap.
    ``spill`` (a CSV file): every chunk as parsed — all its rows, whatever ``keep`` selects — is also written
    there, so that :func:`spilled_chunks` gives the chunks of this file later without parsing it again. It is
    complete once the file was read to its end (and discarded when the reading fails or stops early).
    Raises BadInputError (once, with the file's path) when the file cannot be read at all.
    """
    assert spill is None or source.format is FileFormat.CSV, "only a CSV file is spilled"
    try:
        names = _check_header(source, path)
        columns = list(source.columns())
        if source.format is FileFormat.PARQUET:
            yield from _parquet_chunks(source, path, columns, keep)
        elif _header_without_newline(source, path) is None:
            yield from _csv_chunks(source, path, columns, names, keep, spill)
    except BaseException:  # GeneratorExit included: a reading stopped early spilled part of the file only
        if spill is not None:
            spill.discard()
        raise
    if spill is not None:
        spill.finish()


def spilled_chunks(source: Source, spill: Spill) -> Iterator[Chunk]:
    """The chunks :func:`iter_chunks` gave while it wrote ``spill`` — every row, as if read without ``keep``,
    with the same row numbers and malformed records — read back from the spill instead of parsed again. Read
    once: the spill is removed afterwards."""
    columns = list(source.columns())
    for table, malformed in spill.chunks():
        if table is None:
            frame = pl.DataFrame(schema={**{c: pl.String for c in columns}, ROW: pl.Int64})
        else:
            rows = pl.from_arrow(table.select([spill.row_column]))
            assert isinstance(rows, pl.DataFrame)
            frame = _normalise(table.drop_columns([spill.row_column])).with_columns(
                rows.to_series().alias(ROW)
            )
        yield Chunk(frame, malformed)


def read_ids(source: Source, path: Path) -> Iterator[pl.Series] | None:
    """The ID column of a Parquet file as :func:`iter_chunks` gives it, one row group at a time (cheap: one column
    is decoded); None for a CSV file (whose columns cannot be read one without the others)."""
    if source.format is not FileFormat.PARQUET:
        return None
    _check_header(source, path)
    return _parquet_ids(source, path)


def _plain(dtype: pa.DataType) -> bool:
    """Whether polars' own Parquet reader gives ``dtype`` the polars type pyarrow's reading converts it to."""
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return _plain(dtype.value_type)
    return any(
        check(dtype)
        for check in (
            pa.types.is_string,
            pa.types.is_large_string,
            pa.types.is_integer,
            pa.types.is_floating,
            pa.types.is_boolean,
            pa.types.is_date32,
        )
    )


def read_rows(source: Source, path: Path, rows: pl.Series, ids: pl.Series) -> Chunk | None:
    """Rows ``rows`` (1-based data row numbers, ascending) of a Parquet file, as :func:`iter_chunks` gives them,
    given ``ids``: their IDs as :func:`read_ids` gives them, and every row with one of those IDs is among
    ``rows``. Read by polars' own reader with a predicate on the ID column, which decodes the other columns only
    for the rows it keeps (a few rows of a large file cost a fraction of reading it, in little memory).

    None when the file is not Parquet, maps a column of a type outside the plain ones (text, numbers, booleans,
    dates, lists of those: :func:`iter_chunks` is the reference for the others), has IDs that are neither text
    nor integers, or polars cannot read it: read it with :func:`iter_chunks`, which reports what is wrong."""
    if source.format is not FileFormat.PARQUET:
        return None
    columns = list(source.columns())
    try:
        schema = pq.ParquetFile(path).schema_arrow
        if not all(_plain(schema.field(c).type) for c in columns):
            return None
        id_type = schema.field(source.ext_id).type
        if pa.types.is_string(id_type) or pa.types.is_large_string(id_type):
            ext = pl.col(source.ext_id)
        elif pa.types.is_integer(id_type):
            ext = pl.col(source.ext_id).cast(pl.String)  # as _normalise gives them
        else:
            return None
        picked = (
            pl.scan_parquet(path, parallel="prefiltered")
            .select(columns)
            .filter(ext.is_in(ids.unique().implode()))
            .collect()
        )
    except (pa.ArrowException, OSError, UnicodeError, KeyError, pl.exceptions.PolarsError):
        return None
    except pl.exceptions.PanicException:  # a damaged file polars could not read: iter_chunks says what it is
        return None
    if picked.height != len(rows):
        return None
    return Chunk(_as_text(picked).with_columns(rows.cast(pl.Int64).alias(ROW)))


def _parquet_ids(source: Source, path: Path) -> Iterator[pl.Series]:
    next_row = 1
    first_group = 0
    sizes = _row_group_sizes(source, path)
    if _polars_reads(path, [source.ext_id]):
        # polars' own reader: a fifth of the CPU time of pyarrow's reading, its full validation and the
        # conversion (on the way to a lazy run's first request, which waits for every ID of the file). It checks
        # what it decodes; from a row group it cannot read on, pyarrow's reading says what is wrong, as ever.
        scan = pl.scan_parquet(str(path), glob=False, hive_partitioning=False).select(source.ext_id)
        for size in sizes:
            try:
                frame = scan.slice(next_row - 1, size).collect()
            except (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError):
                break
            if frame.height != size:
                break
            next_row += size
            first_group += 1
            yield _as_text(frame)[source.ext_id]
        if first_group == len(sizes):
            return
    for group in range(first_group, len(sizes)):
        start = next_row
        try:
            parquet = pq.ParquetFile(path)
            table = parquet.read_row_group(group, columns=[source.ext_id]).replace_schema_metadata(None)
            parquet.close()
            for batch in table.to_batches():  # text that is not UTF-8 would crash polars (see _check_text)
                _check_text(batch, path, next_row)
                next_row += batch.num_rows
        except (pa.ArrowException, OSError, UnicodeError) as exc:
            raise _damaged_row_group(source, path, exc, [source.ext_id], sizes, group, start) from exc
        yield _normalise(table)[source.ext_id]


def _selected(
    table: pa.Table | pa.RecordBatch, rows: pl.Series, ext_id: str, keep: RowSelector | None
) -> pl.DataFrame:
    """``table`` as a polars frame (:func:`_normalise`) with its ``__row`` numbers, only the rows ``keep`` selects."""
    if keep is not None:
        mask = keep(lambda: _normalise(table.select([ext_id]))[ext_id], rows)
        table = _arrow_filter(table, mask.to_arrow())
        rows = rows.filter(mask)
    return _normalise(table).with_columns(rows.alias(ROW))


def _arrow_filter(table: pa.Table | pa.RecordBatch, mask: pa.Array) -> pa.Table | pa.RecordBatch:
    """``table.filter(mask)`` through :func:`sync._arrow.call`: ``Table.filter`` imports pyarrow.compute (~80 ms,
    on the way to a lazy run's first request)."""
    filtered: pa.Table | pa.RecordBatch = arrow_call("filter", table, mask)
    return filtered


def _parquet_chunks(
    source: Source, path: Path, columns: list[str], keep: RowSelector | None = None
) -> Iterator[Chunk]:
    next_row = 1
    if _polars_reads(path, columns):
        # polars' own reader decodes straight into its columns: a third of the CPU time of pyarrow's reading, its
        # full validation and the conversion to polars. It checks what it decodes (text that is not UTF-8 is an
        # error, not a panic later). Whatever it cannot read, pyarrow's reading reads from the first row not yet
        # given, and says what is wrong (file, row, column) as it always has.
        frames = _polars_slices(path, columns)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError):
                break
            rows = pl.int_range(next_row, next_row + frame.height, dtype=pl.Int64, eager=True)
            next_row += frame.height
            yield Chunk(_selected_frame(_as_text(frame), rows, source.ext_id, keep))
    yield from _arrow_parquet_chunks(source, path, columns, keep, next_row)


def _polars_reads(path: Path, columns: list[str]) -> bool:
    """Whether polars' own reader gives ``columns`` of ``path`` as pyarrow's reading would (:func:`_plain` types)
    and reads its metadata without a panic (a key or value that is not UTF-8 makes it panic: pyarrow's reading
    drops the metadata instead)."""
    try:
        parquet = pq.ParquetFile(path)
        schema, metadata = parquet.schema_arrow, parquet.metadata.metadata or {}
        parquet.close()
        for key, value in metadata.items():
            key.decode("utf-8")
            value.decode("utf-8")
        return all(_plain(schema.field(c).type) and not _half(schema.field(c).type) for c in columns)
    except (pa.ArrowException, OSError, UnicodeError, KeyError):
        return False


def _half(dtype: pa.DataType) -> bool:
    """A half-precision float (or list of them): each reader widens it its own way."""
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return _half(dtype.value_type)
    return bool(pa.types.is_float16(dtype))


def _polars_slices(path: Path, columns: list[str]) -> Iterator[pl.DataFrame]:
    """``columns`` of ``path`` in frames of :data:`PARQUET_BATCH_ROWS` rows, read by polars: one slice of the file
    per frame (the reader skips the row groups before it), so memory holds one frame at a time."""
    metadata = pq.ParquetFile(path).metadata
    rows, step = metadata.num_rows, _parquet_batch_rows(metadata, columns)
    # No glob and no hive partitions: the path names one file, whatever characters it holds.
    scan = pl.scan_parquet(str(path), glob=False, hive_partitioning=False).select(columns)
    for start in range(0, rows, step):
        yield scan.slice(start, step).collect()


def _parquet_batch_rows(metadata: pq.FileMetaData, columns: list[str]) -> int:
    """Rows per chunk of a Parquet file: :data:`PARQUET_BATCH_ROWS`, fewer when that many rows of ``columns``
    would hold more than :data:`CHUNK_BYTES` (their uncompressed size in the footer, a file's mean), and never
    fewer than :data:`MIN_PARQUET_BATCH_ROWS`. A footer that cannot be read so (a damaged file: a column path
    that is not UTF-8, sizes that make no sense) gives the default: the reading that follows reports the damage
    with the file's name, as it always did."""
    wanted = set(columns)
    size = 0
    try:
        for g in range(metadata.num_row_groups):
            group = metadata.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.split(".", 1)[0] in wanted:
                    size += column.total_uncompressed_size
    except (pa.ArrowException, OSError, UnicodeError, ValueError):
        return PARQUET_BATCH_ROWS
    if size <= 0 or metadata.num_rows <= 0:
        return PARQUET_BATCH_ROWS
    step = CHUNK_BYTES * metadata.num_rows // size
    return max(MIN_PARQUET_BATCH_ROWS, min(PARQUET_BATCH_ROWS, step))


def _selected_frame(
    frame: pl.DataFrame, rows: pl.Series, ext_id: str, keep: RowSelector | None
) -> pl.DataFrame:
    """``frame`` (as :func:`_as_text` gives it) with its ``__row`` numbers, only the rows ``keep`` selects."""
    if keep is not None:
        mask = keep(lambda: frame[ext_id], rows)
        frame, rows = frame.filter(mask), rows.filter(mask)
    return frame.with_columns(rows.alias(ROW))


def _arrow_parquet_chunks(
    source: Source, path: Path, columns: list[str], keep: RowSelector | None = None, first_row: int = 1
) -> Iterator[Chunk]:
    """The chunks of a Parquet file read by pyarrow, from data row ``first_row`` on (the row groups before the
    one holding it are not read; its rows before it are read but not given)."""
    # One ParquetFile per row group: a single reader kept across row groups grows by several MB per row group
    # (measured with pyarrow 26 on a 10M-row file), a fresh one stays flat. The decoded columns of one row group
    # are the floor of memory use for Parquet input (writers' row groups are usually 100k-1M rows).
    sizes = _row_group_sizes(source, path)
    batch_rows = PARQUET_BATCH_ROWS
    with contextlib.suppress(pa.ArrowException, OSError, UnicodeError):  # a damaged footer fails below, named
        batch_rows = _parquet_batch_rows(pq.ParquetFile(path).metadata, columns)
    next_row = 1
    for group, size in enumerate(sizes):
        if next_row + size <= first_row:
            next_row += size
            continue
        group_start = next_row
        try:
            # Column types were checked with the header (_check_parquet_types): every mapped column can be sent.
            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns, row_groups=[group]):
                if next_row + batch.num_rows <= first_row:
                    next_row += batch.num_rows
                    continue
                if next_row < first_row:
                    batch = batch.slice(first_row - next_row)
                    next_row = first_row
                _check_text(batch, path, next_row)
                # Schema metadata (pandas/arrow notes) is not used, and polars panics on a damaged key.
                rows = pl.int_range(next_row, next_row + batch.num_rows, dtype=pl.Int64, eager=True)
                frame = _selected(batch.replace_schema_metadata(None), rows, source.ext_id, keep)
                next_row += batch.num_rows
                yield Chunk(frame)
            parquet.close()
        except (pa.ArrowException, OSError, UnicodeError) as exc:  # UnicodeError: damaged column names
            raise _damaged_row_group(source, path, exc, columns, sizes, group, group_start) from exc


def _row_group_sizes(source: Source, path: Path) -> list[int]:
    """The row count of each row group of a Parquet file (from its footer)."""
    try:
        parquet = pq.ParquetFile(path)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
        parquet.close()
    except (pa.ArrowException, OSError, UnicodeError) as exc:
        raise _unreadable(source, path, exc) from exc
    return sizes


def _damaged_row_group(
    source: Source,
    path: Path,
    exc: BaseException,
    columns: list[str],
    sizes: list[int],
    group: int,
    start: int,
) -> BadInputError:
    """The error for row group ``group`` (its first data row ``start``) that could not be read (``exc``): its rows
    and the first of ``columns`` that cannot be read alone (read again, one by one: on this error path only).
    The rows before it were read (and, in a run that began sending, may have been sent: docs/planning.md)."""
    column = None
    for name in columns:
        try:
            parquet = pq.ParquetFile(path)
            table = parquet.read_row_group(group, columns=[name])
            parquet.close()
            table.validate(full=True)
        except (pa.ArrowException, OSError, UnicodeError):
            column = name
            break
    if (
        isinstance(exc, OSError) and exc.errno is not None
    ):  # the system's error (EIO...), not the file's content
        what = f"cannot read file: {exc.strerror or exc}"
    else:
        # pyarrow raises OSError for a page header it cannot decode: the file's damage, as any ArrowException.
        what = (
            "not a readable Parquet file (truncated or corrupt?): "
            + (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        )
    end = start + sizes[group] - 1
    return BadInputError(
        str(path),
        f"rows {start}-{end} (row group {group + 1} of {len(sizes)}) cannot be read: {what}",
        row=start,
        column=column,
    )


def _check_text(batch: pa.RecordBatch, path: Path, first_row: int) -> None:
    """Raise BadInputError (file, row, column) for the first value of a binary column that is not UTF-8 text,
    and ArrowInvalid for a batch whose data are corrupt.

    pyarrow does not check what it decodes from Parquet pages: a damaged page can give string values that are not
    UTF-8, on which polars panics (a Rust panic, not an exception we could translate). A full validation first
    turns that into "not a readable Parquet file".
    """
    batch.validate(full=True)
    for field in batch.schema:
        if not (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)):
            continue
        try:
            batch.column(field.name).cast(pa.string())
        except pa.ArrowInvalid:
            for i, value in enumerate(batch.column(field.name).to_pylist()):
                try:
                    if value is not None:
                        value.decode("utf-8")
                except UnicodeDecodeError:
                    raise BadInputError(
                        str(path), "bytes that are not UTF-8 text", row=first_row + i, column=field.name
                    ) from None
            raise


def _csv_chunks(
    source: Source,
    path: Path,
    columns: list[str],
    names: list[str],
    keep: RowSelector | None = None,
    spill: Spill | None = None,
) -> Iterator[Chunk]:
    # Records with the wrong number of fields are skipped by pyarrow and reported here; their data row number is
    # the physical line number minus the header (exact unless an earlier value spans several lines).
    malformed: list[RejectedRow] = []
    skipped: list[int] = []
    id_position = names.index(source.ext_id)

    def on_invalid(row: pa_csv.InvalidRow) -> str:
        number = (row.number - 1) if row.number is not None else None
        if number is not None:
            skipped.append(number)
        reason = f"malformed CSV record: expected {row.expected_columns} fields, found {row.actual_columns}"
        spans_lines = bool(row.text) and ("\n" in row.text or "\r" in row.text)
        if spans_lines:
            # A quoted value ran over line breaks: the usual cause is a quote that is never closed, which
            # swallows the lines after it into this record.
            # How many: a quote left open near the end of a file swallows every row after it (up to a block or
            # two of them) without a record too large to read, and those rows are in no other reject.
            lines = len(row.text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n").split("\n"))
            reason += f"; a quoted value spans {lines} lines (a quote that is never closed?)"
        # A one-line record is one user's row: the value in the ID column's place names the user, so a snapshot
        # run does not take them for a user who left the export. A record over several lines may hide any
        # number of users, and so may a record whose ID value is uncertain: it names none (sync.state holds
        # every removal then).
        ext_id = None
        if not spans_lines:
            ext_id = _id_in_record(row.text, id_position, source.delimiter, row.expected_columns)
            if ext_id is None and id_position > 0 and row.text:
                reason += "; which value is the ID is uncertain (a value before it holds the delimiter?)"
        malformed.append(RejectedRow(str(path), number if number is not None else 0, None, reason, ext_id))
        return "skip"

    with _undecodable_rows(on_invalid) as undecodable:
        yield from _csv_read(
            source, path, columns, names, on_invalid, undecodable, malformed, skipped, keep, spill
        )


def _id_in_record(text: str | None, position: int, delimiter: str, expected: int) -> str | None:
    """The (trimmed) value at the ID column's position in a malformed one-line record of ``expected`` fields, or
    None when the record cannot say which value is the ID.

    A value before the ID column that holds the delimiter (``Ann, Jr`` unquoted) shifts the ID to the right, one
    that lost one shifts it to the left: with the ID column first nothing can, otherwise every value the shift
    could have brought into the ID's place must be the same. Before, the value in the ID's place was taken
    (``Jr``), the real user looked absent from the export and a snapshot run with ``removal: delete`` deleted
    them; now such a record names nobody, and sync.state holds the source's removals for the run."""
    if not text:
        return None
    fields = next(csv.reader([text], delimiter=delimiter), [])
    if position >= len(fields):
        return None  # too short to reach the ID column
    shift = len(fields) - expected
    lo, hi = (position, position + shift) if shift > 0 else (position + shift, position)
    if position == 0:
        lo = hi = 0
    values = {f.strip() for f in fields[max(lo, 0) : min(hi, len(fields) - 1) + 1]}
    if len(values) != 1:
        return None
    return values.pop() or None


def _csv_read(
    source: Source,
    path: Path,
    columns: list[str],
    names: list[str],
    on_invalid: Any,
    undecodable: list[BaseException],
    malformed: list[RejectedRow],
    skipped: list[int],
    keep: RowSelector | None = None,
    spill: Spill | None = None,
) -> Iterator[Chunk]:
    try:
        reader = pa_csv.open_csv(
            path,
            read_options=_csv_read_options(source),
            parse_options=pa_csv.ParseOptions(
                delimiter=source.delimiter,
                newlines_in_values=True,
                invalid_row_handler=_handed_to_arrow(on_invalid),
            ),
            convert_options=pa_csv.ConvertOptions(
                include_columns=columns,
                column_types={c: pa.string() for c in columns},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowException, OSError, UnicodeError) as exc:
        raise _unreadable(source, path, exc, names, undecodable=bool(undecodable)) from exc

    def parsed() -> Generator[tuple[pa.Table | None, pl.Series | None, tuple[RejectedRow, ...]], None, None]:
        """Each chunk as parsed, with its row numbers and the malformed records met parsing it: all three taken
        together, as the reader leaves them after the chunk (``on_invalid`` fills ``skipped`` and ``malformed``
        while the reader parses), so that the next chunk may be parsed on another thread meanwhile."""
        next_row = 1
        for batch in _coalesced(reader, source, path, names, undecodable):
            n = batch.num_rows
            if skipped:
                rows, next_row = _row_numbers(next_row, n, skipped)
                row_col = pl.Series(ROW, rows, dtype=pl.Int64)
            else:
                row_col = pl.int_range(next_row, next_row + n, dtype=pl.Int64, eager=True).alias(ROW)
                next_row += n
            found = tuple(malformed)
            malformed.clear()
            yield batch, row_col, found
        if malformed:
            yield None, None, tuple(malformed)

    # A head's reading (the one that spills: a lazy plan's first read of the file, on the way to the first
    # request) parses the next chunk on a worker thread while this one is spilled and its rows selected: pyarrow
    # parses without the GIL, so the two overlap on two cores (issue 13). Other readings parse in the caller's
    # thread, as they always did (the staging already reads on a thread of its own).
    chunks = ahead(parsed(), thread_name="pushsync-csv") if spill is not None else parsed()
    c1 = _c1_encoding(source.encoding)
    try:
        # Closed before the reader: a chunk still being parsed on the worker is waited for first.
        with contextlib.closing(chunks):
            for batch, row_col, found in chunks:
                if batch is None or row_col is None:
                    if spill is not None:
                        spill.add(None, None, found)
                    yield Chunk(
                        pl.DataFrame(schema={**{c: pl.String for c in columns}, ROW: pl.Int64}), found
                    )
                    continue
                if c1:
                    _check_c1(batch, row_col, path, source)
                if spill is not None:
                    spill.add(batch, row_col.to_arrow(), found)
                yield Chunk(_selected(batch, row_col, source.ext_id, keep), found)
    finally:
        reader.close()


_C1 = "[\u0080-\u009f]"
"""C1 control characters: what bytes 0x80-0x9F become in ISO 8859 encodings."""


def _c1_encoding(encoding: str) -> bool:
    """Whether ``encoding`` reads bytes 0x80-0x9F as C1 control characters (latin-1 and the other ISO 8859
    encodings), where the Windows code page a file usually is has letters and punctuation (cp1252: € ’ “ ”)."""
    return bytes(range(0x80, 0xA0)).decode(encoding, errors="replace") == "".join(map(chr, range(0x80, 0xA0)))


def _check_c1(batch: pa.Table, rows: pl.Series, path: Path, source: Source) -> None:
    """Raise BadInputError (file, row, column) for the first mapped value holding a C1 control character, in a
    file read in an encoding that makes them of bytes 0x80-0x9F (:func:`_c1_encoding`).

    A CRM export said to be latin-1 is nearly always Windows' cp1252: read as latin-1, ``Müller’s €5`` was sent
    as ``Müller\x92s \x805`` — invisible control characters in every such value, and no error. No text in
    latin-1 holds them, so the whole file is refused, as for a byte the encoding cannot decode.
    """
    frame = pl.from_arrow(batch)
    assert isinstance(frame, pl.DataFrame)
    for column in frame.columns:
        hits = frame[column].str.contains(_C1).fill_null(False)
        if hits.any():
            row = int(rows.filter(hits)[0])
            raise BadInputError(
                str(path),
                f"a control character (U+0080-U+009F) read as {source.encoding}: the file is likely a Windows "
                "code page (cp1252, with € ’ “ ” there; cp1254 for Turkish); set the source's 'encoding'",
                row=row,
                column=column,
            )


def _coalesced(
    reader: pa_csv.CSVStreamingReader,
    source: Source,
    path: Path,
    names: list[str],
    undecodable: list[BaseException],
) -> Iterator[pa.Table]:
    """Group pyarrow's small record batches into chunks of about CHUNK_ROWS rows (CHUNK_BYTES bytes, if less).

    Small CSV blocks keep pyarrow's read-ahead (and its memory pool) small; bigger chunks keep polars efficient.
    """
    pending: list[pa.RecordBatch] = []
    rows = size = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except (pa.ArrowException, UnicodeError) as exc:
            raise _unreadable(source, path, exc, names, undecodable=bool(undecodable)) from exc
        pending.append(batch)
        rows += batch.num_rows
        size += batch.nbytes
        if rows >= CHUNK_ROWS or size >= CHUNK_BYTES:
            yield pa.Table.from_batches(pending)
            pending, rows, size = [], 0, 0
    if pending:
        yield pa.Table.from_batches(pending)


def _row_numbers(start: int, count: int, skipped: list[int]) -> tuple[list[int], int]:
    """Data row numbers for ``count`` good records from ``start`` on, stepping over the skipped (malformed) ones."""
    out: list[int] = []
    taken = set(skipped)
    row = start
    while len(out) < count:
        if row not in taken:
            out.append(row)
        row += 1
    # Forget skipped rows we have passed: keeps the set small for files with many malformed records.
    skipped[:] = [s for s in skipped if s >= row]
    return out, row


def estimate_rows(source: Source, files: list[Path]) -> int:
    """A cheap estimate of a source's row count (Parquet metadata; CSV text size / 128 bytes) to size the staging.

    A CSV file pyarrow decompresses by its name (``users.csv.gz``) counts by the size of its text, not of the file:
    :func:`_text_size`."""
    total = 0
    for path in files:
        if source.format is FileFormat.PARQUET:
            try:
                total += pq.ParquetFile(path).metadata.num_rows
            except (pa.ArrowException, OSError, UnicodeError):
                total += 0  # the reader reports the damage, with the file's name
        else:
            total += _text_size(path) // 128
    return total


_CODEC_BY_NAME = {".gz": "gzip", ".bz2": "bz2", ".lz4": "lz4", ".zst": "zstd"}
"""The endings pyarrow's CSV reader decompresses a file by (as it matches them: case-sensitive), and the codec."""
_RATIO_SAMPLE_BYTES = 4 << 20
"""Bytes of text decompressed from the start of a compressed CSV file to measure its compression ratio."""


def _text_size(path: Path) -> int:
    """The size of a CSV file's text: its size, or for a compressed file (:data:`_CODEC_BY_NAME`) its size times
    the compression ratio of its first 4 MiB of text (a ``.csv.gz`` export compresses 4-10 times: counted by its
    size, its rows were a fifth or a tenth of what they are).

    Measured by decompressing the start, not read from gzip's trailer (ISIZE, the text's size in the last 4 bytes):
    that is the size modulo 4 GiB (a large export is larger, and would count as any size below), only the last
    member's in a concatenated gzip (``cat a.gz b.gz``), and gzip's alone; the sample works for every codec the
    reader takes. 4 MiB is tens of thousands of rows of the same columns (a ratio within a few per cent of the
    whole file's): ~10-20 ms of gzip, zstd or lz4 (bz2's ~0.2 s, small beside decompressing the file to read it).
    The compressed bytes it took are known to pyarrow's 64 KiB reads, so the ratio errs low by at most one of them
    (tests/test_reading.py holds the estimate within 10 % of the plain file's). A file shorter than the sample is
    measured whole."""
    size = path.stat().st_size
    codec = next((c for end, c in _CODEC_BY_NAME.items() if path.name.endswith(end)), None)
    if codec is None or size == 0:
        return size
    try:
        with pa.OSFile(str(path)) as raw, pa.CompressedInputStream(raw, codec) as text:
            sample = len(text.read(_RATIO_SAMPLE_BYTES))
            taken = raw.tell()
    except (pa.ArrowException, OSError):
        return size  # not what its name says: the reader reports it, with the file's name
    if sample < _RATIO_SAMPLE_BYTES or taken <= 0:
        return sample  # the whole text
    return size * sample // taken


def check_sources(job: Job) -> list[JobProblem]:
    """Problems with a job's input files: missing files, unreadable files, mapped columns absent from a header.

    Cheap: reads only headers / Parquet schemas. Used by ``pushsync validate``.
    """
    problems = []
    for i, source in enumerate(job.sources):
        try:
            files = expand_paths(source, workdir=job.workdir)
        except BadInputError as exc:
            problems.append(JobProblem(f"sources[{i}].path", str(exc)))
            continue
        for path in files:
            try:
                _check_header(source, path)
            except BadInputError as exc:
                problems.append(JobProblem(f"sources[{i}]", str(exc)))
    return problems
