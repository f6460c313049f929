"""Writing what a platform holds to Parquet or CSV, page by page, with progress.

:func:`write_pages` consumes an async stream of pages (lists of dict rows) and appends them with pyarrow's
incremental writers (:class:`pyarrow.parquet.ParquetWriter`, :class:`pyarrow.csv.CSVWriter`), so memory holds at
most one row group (``row_group_rows``) whatever the export's size. The file appears complete or not at all:
rows go to ``<name>.<random>.partial`` (one per writer) which is renamed over the target only when the stream ended
without error.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import AsyncIterable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from sync._output import keep_mode, output_file, reserve_beside
from sync.errors import BadInputError, PlatformError, printable
from sync.logs import get_logger

__all__ = [
    "ExportFormat",
    "ExportProgress",
    "ExportResult",
    "LogExportProgress",
    "PageLike",
    "RowWriter",
    "format_for",
    "iter_id_chunks",
    "make_export_progress",
    "write_pages",
]


class ExportFormat(StrEnum):
    PARQUET = "parquet"
    CSV = "csv"


_COMPRESSED = frozenset({".gz", ".gzip", ".bz2", ".xz", ".zst", ".zstd", ".zip", ".lz4", ".br", ".z"})


def format_for(path: Path, declared: str | None = None) -> ExportFormat:
    """The declared format, else the one the file name says (``.csv``/``.txt`` → CSV, anything else → Parquet).

    A name ending in a compression suffix (``tokens.csv.gz``) is refused unless the format is declared: read as
    "anything else" it got a Parquet file, which ``zcat`` or a CSV reader then fails on."""
    if declared:
        return ExportFormat(declared)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt"):
        return ExportFormat.CSV
    if suffix in _COMPRESSED:
        raise BadInputError(
            str(path),
            f"the name says compressed ({path.suffix}): compressed files are not written — name the file .csv "
            "or .parquet (Parquet is compressed already, zstd), or give --format csv|parquet",
        )
    return ExportFormat.PARQUET


class PageLike(Protocol):
    """What :func:`write_pages` reads from a page: its rows and, when known, the platform's total at that page
    (the whole export's, the same on every page unless the platform changed meanwhile)."""

    @property
    def rows(self) -> list[dict[str, Any]]: ...

    @property
    def total(self) -> int | None: ...


class ExportProgress(Protocol):
    """Told after each page is written: rows so far and the expected total (None when unknown); closed with
    ``completed`` False when the export failed or was interrupted (its file was not written)."""

    def on_rows(self, written: int, total: int | None) -> None: ...

    def close(self, *, completed: bool = True) -> None: ...


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What an export wrote."""

    path: Path
    format: ExportFormat
    rows: int
    pages: int
    seconds: float
    total_changed: tuple[int, int] | None = None
    """The platform's total on the first page and on the last, when they differ: the platform changed during
    the export, and paging by offset may have skipped or repeated rows where it changed."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": str(self.path),
            "format": str(self.format),
            "rows": self.rows,
            "pages": self.pages,
            "seconds": round(self.seconds, 3),
        }
        if self.total_changed is not None:
            out["total_changed"] = {"start": self.total_changed[0], "end": self.total_changed[1]}
        return out


class RowWriter:
    """Appends dict rows to a Parquet or CSV file with a fixed schema; rows are buffered up to one row group.

    Use as a context manager: on a clean exit the partial file is renamed to ``path``; on an error it is removed.
    """

    def __init__(
        self, path: Path, schema: pa.Schema, fmt: ExportFormat, *, row_group_rows: int = 64_000
    ) -> None:
        self.path = path
        self.schema = schema
        self.format = fmt
        self.rows = 0
        # Both set on entering, from the file a symlink names: a path with no name (``.``, ``/``, an empty
        # ``-o ''``) has no sibling to name here, and is refused there as a directory.
        self._target = path  # the file renamed over at the end
        self._partial = path  # where the rows go until then
        self._row_group_rows = row_group_rows
        self._buffer: list[pa.RecordBatch] = []  # batches not yet written, fewer than row_group_rows rows
        self._buffered = 0
        self._writer: pq.ParquetWriter | pa_csv.CSVWriter | None = None

    def __enter__(self) -> RowWriter:
        # A symlink's file, not the link, is replaced; a device or a directory is refused (sync._output).
        target = output_file(self.path)
        self._target = target
        reserved: Path | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._partial = reserved = reserve_beside(target, ".partial")
            if self.format is ExportFormat.PARQUET:
                self._writer = pq.ParquetWriter(self._partial, self.schema, compression="zstd")
            else:
                self._writer = pa_csv.CSVWriter(self._partial, self.schema)
            keep_mode(target, self._partial)
        except OSError as exc:
            if reserved is not None:  # __exit__ does not run when __enter__ raises
                with contextlib.suppress(OSError):
                    reserved.unlink(missing_ok=True)
            raise BadInputError(str(self.path), f"cannot write the export: {exc.strerror or exc}") from exc
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        renamed = False
        try:
            if exc_type is None:
                self._flush()
            if self._writer is not None:
                writer, self._writer = self._writer, None
                writer.close()  # writes what it still buffers (a Parquet footer): it can fail as a write does
            if exc_type is None:
                os.replace(self._partial, self._target)
                renamed = True
        except OSError as error:
            if exc_type is None:  # else the error that stopped the export is the one to tell
                raise BadInputError(
                    str(self.path), f"cannot write the export: {error.strerror or error}"
                ) from error
        finally:
            if not renamed:
                with contextlib.suppress(OSError):
                    self._partial.unlink(missing_ok=True)

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        batch = pa.RecordBatch.from_pylist(list(rows), schema=self.schema)
        self._buffer.append(batch)
        self._buffered += batch.num_rows
        self.rows += batch.num_rows
        if self._buffered >= self._row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer or self._writer is None:
            return
        table = pa.Table.from_batches(self._buffer, schema=self.schema)
        self._buffer, self._buffered = [], 0
        try:
            self._writer.write_table(table)
        except OSError as exc:
            raise BadInputError(str(self.path), f"cannot write the export: {exc.strerror or exc}") from exc


async def write_pages(
    pages: AsyncIterable[PageLike],
    path: Path,
    schema: pa.Schema,
    fmt: ExportFormat,
    *,
    progress: ExportProgress | None = None,
    row_group_rows: int = 64_000,
    clock: Callable[[], float] = time.monotonic,
) -> ExportResult:
    """Write every page's rows to ``path``; returns what was written. The file is complete or absent."""
    started = clock()
    count = 0
    total: int | None = None
    first_total: int | None = None
    completed = False
    try:
        with RowWriter(path, schema, fmt, row_group_rows=row_group_rows) as writer:
            async for page in pages:
                try:
                    writer.write(page.rows)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                    # The rows are the platform's answer: a value of another type than documented (a number
                    # where text is, "7" for an id) is the platform's doing — exit 3 naming it, not a crash.
                    raise _misfit(page.rows, schema, count + 1) from exc
                count += 1
                if page.total is not None:
                    total = page.total
                    first_total = total if first_total is None else first_total
                if progress is not None:
                    progress.on_rows(writer.rows, total)
        completed = True  # the file is in place
    finally:
        if progress is not None:
            progress.close(completed=completed)
    # Offset paging over a platform that changed meanwhile (users deleted, devices added) shifts every later
    # page: rows are skipped or repeated while the count can still look right, so say it.
    changed = (
        (first_total, total)
        if first_total is not None and total is not None and first_total != total
        else None
    )
    return ExportResult(path, fmt, writer.rows, count, clock() - started, changed)


def _misfit(rows: Sequence[Mapping[str, Any]], schema: pa.Schema, page: int) -> PlatformError:
    """The error for a page whose values do not fit the export's columns, naming the first column and value
    that do not (found again column by column: Arrow's own message names neither)."""
    for field in schema:
        for row in rows:
            value = row.get(field.name)
            try:
                pa.array([value], type=field.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                shown = printable(repr(value))[:80]
                return PlatformError(
                    f"page {page}: the platform answered {shown} ({type(value).__name__}) for the column "
                    f"{field.name!r}, which holds {field.type}: not the documented shape; nothing was written"
                )
    return PlatformError(f"page {page}: the platform's answer does not fit the export's columns")


class LogExportProgress:
    """One structlog ``export.progress`` line every ``every`` seconds, and one at the end: ``export.done`` when
    the file was written, ``export.stopped`` (a warning) when the export failed or was interrupted — a
    scheduler's log must not say "done" for an export that left no file."""

    def __init__(self, what: str, *, every: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = get_logger(export=what)
        self._clock = clock
        self._every = every
        self._started = clock()
        self._next = self._started + every
        self._rows = 0
        self._total: int | None = None

    def on_rows(self, written: int, total: int | None) -> None:
        self._rows, self._total = written, total
        now = self._clock()
        if now >= self._next:
            self._next = now + self._every
            self._log.info("export.progress", rows=written, total=total, rows_per_second=self._rate(now))

    def _rate(self, now: float) -> float:
        return round(self._rows / max(now - self._started, 1e-9), 1)

    def close(self, *, completed: bool = True) -> None:
        fields = {"rows": self._rows, "total": self._total, "rows_per_second": self._rate(self._clock())}
        if completed:
            self._log.info("export.done", **fields)
        else:
            self._log.warning("export.stopped", **fields, written=False)


class _BarExportProgress:
    """A rich progress bar (rows, rate, ETA when the total is known)."""

    def __init__(self, what: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn(f"[bold]{what}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
        )
        self._task = self._progress.add_task(what, total=None)
        self._progress.start()

    def on_rows(self, written: int, total: int | None) -> None:
        self._progress.update(self._task, completed=written, total=total)

    def close(self, *, completed: bool = True) -> None:
        self._progress.stop()


def make_export_progress(what: str, mode: str = "auto") -> ExportProgress | None:
    """``bar`` (a rich bar on stderr), ``log`` (structlog lines), ``none``, or ``auto``: a bar on a terminal."""
    if mode == "none":
        return None
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return _BarExportProgress(what)
    return LogExportProgress(what)


def iter_id_chunks(path: Path, column: str | None = None, *, chunk: int = 1000) -> Iterator[list[str]]:
    """External IDs from a file, in chunks of at most ``chunk``, blanks and repeats skipped.

    ``.parquet`` and ``.csv`` files are read in record batches (never whole); ``column`` names the ID column
    (default ``extId`` when present, else the first column). Any other file holds one ID per line."""
    seen: set[str] = set()
    out: list[str] = []

    def take(values: Iterator[Any]) -> Iterator[list[str]]:
        nonlocal out
        for value in values:
            if value is None:
                continue
            ext_id = str(value).strip()
            if ext_id and ext_id not in seen:
                seen.add(ext_id)
                out.append(ext_id)
                if len(out) >= chunk:
                    yield out
                    out = []

    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            source = pq.ParquetFile(path)
            name = _id_column(source.schema_arrow.names, column, path)
            for batch in source.iter_batches(columns=[name], batch_size=64_000):
                yield from take(iter(batch.column(0).to_pylist()))
        elif suffix == ".csv":
            with pa_csv.open_csv(path) as probe:
                names = probe.schema.names
            name = _id_column(names, column, path)
            options = pa_csv.ConvertOptions(include_columns=[name], column_types={name: pa.string()})
            with pa_csv.open_csv(path, convert_options=options) as reader:
                for batch in reader:
                    yield from take(iter(batch.column(0).to_pylist()))
        else:
            # utf-8-sig: a BOM (Notepad's "UTF-8 with BOM") is not part of the first ID.
            with path.open(encoding="utf-8-sig") as fh:
                yield from take(iter(fh))
    except (OSError, pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise BadInputError(str(path), f"cannot read the IDs: {exc}") from exc
    if out:
        yield out


def _id_column(names: Sequence[str], column: str | None, path: Path) -> str:
    if column is not None:
        if column not in names:
            raise BadInputError(
                str(path), f"no column {column!r} (columns: {', '.join(names)})", column=column
            )
        return column
    if "extId" in names:
        return "extId"
    if not names:
        raise BadInputError(str(path), "the file has no columns")
    return names[0]
