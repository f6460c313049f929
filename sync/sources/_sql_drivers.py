"""The three database drivers behind :mod:`sync.sources.reading_sql`, one small class each, and the translation of their
exceptions into :class:`BadInputError` (once, here), with every message scrubbed of the URL and its password.

* PostgreSQL: ``adbc-driver-postgresql`` (the ``pushsync[postgres]`` extra). Rows arrive as Arrow record batches
  decoded from ``COPY (query) TO STDOUT (FORMAT binary)``; the reader pulls one batch (about
  :data:`PG_BATCH_BYTES`) at a time from the socket, so memory does not grow with the table. The session is
  read-only (``default_transaction_read_only``): a sync never writes to the CRM.
* DuckDB: ``duckdb`` (the ``pushsync[duckdb]`` extra), file opened read-only, ``relation.to_arrow_reader``.
* SQLite: the standard library's ``sqlite3`` (no extra), file opened read-only, ``fetchmany``; SQLite's values
  carry no declared type, so each batch's columns are turned into text here (see :meth:`SqliteDriver.batches`).

Each driver is opened on a resolved URL, used from one thread at a time, and closed; ``schema`` reads no row.
``cancel`` is the exception: called from another thread, it stops the statement running (PostgreSQL's cancel
request, DuckDB's and SQLite's ``interrupt``), whose read then fails.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import tempfile
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import pyarrow as pa

from sync.errors import BadInputError
from sync.redact import redact

__all__ = [
    "DUCKDB_MEMORY_LIMIT",
    "PG_BATCH_BYTES",
    "SQLITE_BATCH_BYTES",
    "Column",
    "Driver",
    "DuckdbDriver",
    "Failure",
    "PostgresDriver",
    "Scrub",
    "SqliteDriver",
]

PG_BATCH_BYTES = 8 << 20
"""Bytes of COPY data the PostgreSQL driver decodes into one record batch."""

SQLITE_BATCH_BYTES = 16 << 20
"""About the most bytes (as Arrow arrays) of one SQLite batch, at the previous batch's mean row width."""
_SQLITE_FIRST_ROWS = 1024
"""Rows of a SQLite result's first batch, which measures the width of its rows."""

DUCKDB_BATCH_ROWS = 2048
"""Rows per Arrow batch read from DuckDB (one of its vectors), whatever the chunk size asked: a batch holds every
column of the result, mapped or not, and was 50k rows whatever their width — 40k rows of 12 KB made a plan peak at
776 MB (586 MB at 8,192 rows, 404 MB at 2,048: tests/test_planning.py). The reader joins batches into chunks by
rows and bytes (CHUNK_ROWS, CHUNK_BYTES). Measured with bench/bench_sql_source.py --only duckdb (1M narrow rows,
2 cores): the plan as fast (7.6–8.5 s against 9.0 s at 50k), its peak 25–35 MB higher (426–436 MB against
393–402 MB)."""

DUCKDB_MEMORY_LIMIT = "64MB"
"""What DuckDB may hold while it runs a source's query; a sort or join larger than this spills to disk. Its
buffer pool also caches the table's blocks up to this: measured on a 10M-row table, RSS of a scan flat at 246 MB
with 64 MB, 305 MB with 128 MB; an ORDER BY over the 10M rows still runs (spilling) at 255 MB."""

Scrub = Callable[[str], str]
"""Removes the URL and its password from a driver's message."""


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a result: its name, its Arrow type (None when the database gives none before the rows are
    read: SQLite) and the database's own name for the type, for messages."""

    name: str
    type: pa.DataType | None
    type_name: str


class Driver(Protocol):
    """An open connection to one database (see the module docstring)."""

    remote: bool
    """The database runs in another process (a server): worth reading ahead while a chunk is validated."""

    def schema(self, statement: str) -> list[Column]:
        """The result's columns, without reading its rows."""
        ...

    def estimate_rows(self, statement: str) -> int:
        """About how many rows the statement gives (sizes the planner's hash buckets)."""
        ...

    def batches(self, statement: str, rows: int) -> Generator[pa.RecordBatch, None, None]:
        """The result, streamed in record batches (of about ``rows`` rows where the driver counts rows)."""
        ...

    def cancel(self) -> None:
        """Stop the statement running, from another thread (a stop asked for): its read fails soon after."""
        ...

    def close(self) -> None: ...


def _first_lines(text: str, limit: int = 2) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[:limit])


@dataclass(frozen=True, slots=True)
class Failure:
    """Turns a driver exception into our error for one source: ``label`` names it, ``scrub`` cleans messages."""

    label: str
    scrub: Scrub

    def __call__(self, message: str, exc: BaseException | None = None, **where: Any) -> NoReturn:
        error = BadInputError(self.label, redact(self.scrub(message)), **where)
        if exc is None:
            raise error
        raise error from None  # the driver's exception text may quote the URL: it is not chained


# --- PostgreSQL ------------------------------------------------------------------------------------------------

_PG_ERROR_LINE = re.compile(r"(?:ERROR|FATAL):\s+(.*)")


def _pg_detail(exc: BaseException) -> str:
    """The server's own sentence (``relation "x" does not exist``) or libpq's, without ADBC's wrapping."""
    text = str(exc)
    found = _PG_ERROR_LINE.search(text)
    if found:
        detail = found.group(1).strip()
    else:
        detail = re.sub(r"^[A-Z_]+: (\[libpq\] )?(Failed to connect: )?", "", text.strip())
        detail = _first_lines(detail)
    code = getattr(exc, "sqlstate", None)
    return f"{detail} (SQLSTATE {code})" if code else detail


class PostgresDriver:
    """PostgreSQL through ADBC (see the module docstring)."""

    remote = True

    def __init__(self, url: str, fail: Failure, *, origin: str) -> None:
        try:
            import adbc_driver_manager
            import adbc_driver_postgresql.dbapi as pg
        except ImportError:
            fail(
                "reading PostgreSQL needs the adbc-driver-postgresql package: pip install 'pushsync[postgres]'"
            )
        self._errors: tuple[type[BaseException], ...] = (
            adbc_driver_manager.Error,
            pa.ArrowException,
            OSError,
        )
        self._fail = fail
        try:
            self._conn = pg.connect(url, autocommit=True)
        except self._errors as exc:
            detail = _pg_detail(exc)
            if "password authentication failed" in detail or getattr(exc, "sqlstate", None) == "28P01":
                fail(f"the database refused the login: {detail}; check the URL in {origin}", exc)
            fail(f"cannot connect to the database: {detail}", exc)
        try:
            with self._conn.cursor() as cur:
                cur.execute("SET default_transaction_read_only = on")
        except self._errors as exc:
            self.close()
            fail(f"cannot set up the session: {_pg_detail(exc)}", exc)

    def schema(self, statement: str) -> list[Column]:
        try:
            with self._conn.cursor() as cur:
                schema = cur.adbc_execute_schema(statement)
        except self._errors as exc:
            self._fail(f"the database refused the query: {_pg_detail(exc)}", exc)
        out = []
        for field in schema:
            meta = field.metadata or {}
            type_name = (meta.get(b"POSTGRESQL:type") or str(field.type).encode()).decode()
            out.append(Column(field.name, field.type, type_name))
        return out

    def estimate_rows(self, statement: str) -> int:
        # An exact count, not the planner's estimate: the count sizes the planner's hash buckets, and an estimate
        # that is far too low (a set-returning function, stale statistics) would put millions of rows in one
        # bucket. Counting costs the server one more pass, small beside reading and validating every row.
        try:
            with self._conn.cursor() as cur:
                cur.execute(f"SELECT count(*) FROM ({statement}) AS q")
                row = cur.fetchone()
        except self._errors as exc:
            self._fail(f"the database refused the query: {_pg_detail(exc)}", exc)
        return int(row[0]) if row else 0

    def batches(self, statement: str, rows: int) -> Generator[pa.RecordBatch, None, None]:
        read = 0
        try:
            with self._conn.cursor() as cur:
                cur.adbc_statement.set_options(
                    **{"adbc.postgresql.batch_size_hint_bytes": str(PG_BATCH_BYTES)}
                )
                cur.execute(statement)
                reader = cur.fetch_record_batch()
                try:
                    for batch in reader:
                        read += batch.num_rows
                        yield batch
                finally:
                    reader.close()
        except self._errors as exc:
            if read:
                # The server's ERROR ends the statement (a statement timeout, a division by zero at some row); a
                # FATAL, or no message of the server's, the session: "connection failed" said so of both.
                lost = not re.search(r"\bERROR:", str(exc))
                what = "the database connection failed" if lost else "the query failed"
                self._fail(f"{what} after {read} rows: {_pg_detail(exc)}", exc)
            self._fail(f"the database refused the query: {_pg_detail(exc)}", exc)

    def cancel(self) -> None:
        # libpq's cancel request, on a connection of its own: the server ends the query (and the COPY) and the
        # reading thread gets "canceling statement due to user request". A connection already lost has no query.
        with contextlib.suppress(*self._errors):
            self._conn.adbc_cancel()

    def close(self) -> None:
        # A connection the server already dropped fails to close: the error that matters was raised before.
        with contextlib.suppress(*self._errors):
            self._conn.close()


# --- DuckDB ----------------------------------------------------------------------------------------------------


def _duck_detail(exc: BaseException) -> str:
    return _first_lines(str(exc), 1)


class DuckdbDriver:
    """A DuckDB file, opened read-only (see the module docstring)."""

    remote = False

    def __init__(self, path: Path, fail: Failure) -> None:
        try:
            import duckdb
        except ImportError:
            fail("reading DuckDB needs the duckdb package: pip install 'pushsync[duckdb]'")
        self._errors: tuple[type[BaseException], ...] = (duckdb.Error, pa.ArrowException)
        self._fail = fail
        if not path.is_file():
            fail(f"database file not found: {path}")
        # DuckDB may use 80 % of the machine's memory by default (a query with ORDER BY over a big table holds all
        # of it): cap it, and let it spill to a folder of ours (beside a read-only file it may not write).
        self._spill = tempfile.TemporaryDirectory(prefix="pushsync-duckdb-")
        config: dict[str, str | bool | int | float | list[str]] = {
            "memory_limit": DUCKDB_MEMORY_LIMIT,
            "temp_directory": self._spill.name,
            # One scanning thread keeps up with validation (the planner is the slower stage) and leaves the other
            # cores to polars; each extra thread also keeps its own malloc arena.
            "threads": 1,
        }
        try:
            self._conn = duckdb.connect(str(path), read_only=True, config=config)
            self._conn.execute("SET enable_progress_bar = false")  # it would draw on the user's terminal
        except self._errors as exc:
            self._spill.cleanup()
            fail(f"cannot open the DuckDB database {path}: {_duck_detail(exc)}", exc)

    def schema(self, statement: str) -> list[Column]:
        try:
            relation = self._conn.sql(f"SELECT * FROM ({statement}) AS q LIMIT 0")
            types = [str(t) for t in relation.types]
            schema = relation.to_arrow_table().schema
            # The names as the query gives them (a SELECT, as the sub-select has shown: its relation is only
            # bound, not run): in a sub-select DuckDB renames a name given twice (id, id_1), so a mapped column
            # named twice was not seen, and the reading took the last of the two.
            names = self._conn.sql(statement).columns
        except self._errors as exc:
            self._fail(f"the database refused the query: {_duck_detail(exc)}", exc)
        return [Column(n, f.type, t) for n, f, t in zip(names, schema, types, strict=True)]

    def estimate_rows(self, statement: str) -> int:
        # Counting is cheap in a columnar database, and exact.
        try:
            row = self._conn.execute(f"SELECT count(*) FROM ({statement}) AS q").fetchone()
        except self._errors as exc:
            self._fail(f"the database refused the query: {_duck_detail(exc)}", exc)
        return int(row[0]) if row else 0

    def batches(self, statement: str, rows: int) -> Generator[pa.RecordBatch, None, None]:
        read = 0
        try:
            reader = self._conn.sql(statement).to_arrow_reader(min(rows, DUCKDB_BATCH_ROWS))
            try:
                for batch in reader:
                    read += batch.num_rows
                    yield batch
            finally:
                reader.close()
        except self._errors as exc:
            what = f"the query failed after {read} rows" if read else "the database refused the query"
            self._fail(f"{what}: {_duck_detail(exc)}", exc)

    def cancel(self) -> None:
        with contextlib.suppress(*self._errors):
            self._conn.interrupt()

    def close(self) -> None:
        self._conn.close()
        self._spill.cleanup()


# --- SQLite ----------------------------------------------------------------------------------------------------


class SqliteDriver:
    """A SQLite file, opened read-only through the standard library (see the module docstring).

    SQLite declares no types a result must keep: a column may hold integers in one row and text in the next.
    Each batch's column becomes text (integers as digits, reals as Python prints them, text as is); a BLOB, or a
    real where the external ID, an e-mail address, MSISDN, tag or event name is read (it would be sent as '123.0'),
    stops the read with the row and column.
    """

    remote = False

    def __init__(
        self, path: Path, fail: Failure, *, id_column: str, names: dict[str, str] | None = None
    ) -> None:
        self._fail = fail
        # Where a REAL stops the read: the external ID, and the columns read as names (an e-mail address, an
        # MSISDN, a tag or event name), whose REAL 905312345601.0 would be sent as text with its dot — an MSISDN
        # with its dot removed as a separator, a digit too many —, as typed databases and Parquet refuse floats.
        self._whole = {**(names or {}), id_column: "the external ID"}
        if not path.is_file():
            fail(f"database file not found: {path}")
        try:
            self._conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
            )
            self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            fail(f"cannot open the SQLite database {path}: {exc}", exc)

    def schema(self, statement: str) -> list[Column]:
        try:
            cur = self._conn.execute(f"SELECT * FROM ({statement}) LIMIT 0")
        except sqlite3.Error as exc:
            self._fail(f"the database refused the query: {exc}", exc)
        return [Column(d[0], None, "sqlite") for d in cur.description]

    def estimate_rows(self, statement: str) -> int:
        try:
            row = self._conn.execute(f"SELECT count(*) FROM ({statement})").fetchone()
        except sqlite3.Error as exc:
            self._fail(f"the database refused the query: {exc}", exc)
        return int(row[0]) if row else 0

    def batches(self, statement: str, rows: int) -> Generator[pa.RecordBatch, None, None]:
        read = 0
        # The first batch is small: its width sizes the next ones (SQLITE_BATCH_BYTES), so rows of several KB
        # are not fetched 50,000 at a time, as Python objects and again as Arrow arrays.
        size = min(rows, _SQLITE_FIRST_ROWS)
        try:
            cur = self._conn.execute(statement)
            names = [d[0] for d in cur.description]
            while True:
                fetched = cur.fetchmany(size)
                if not fetched:
                    break
                columns = [self._text(names[i], [r[i] for r in fetched], read) for i in range(len(names))]
                read += len(fetched)
                batch = pa.RecordBatch.from_arrays(columns, names=names)
                size = max(1, min(rows, SQLITE_BATCH_BYTES * batch.num_rows // max(1, batch.nbytes)))
                yield batch
        except sqlite3.Error as exc:
            what = f"the query failed after {read} rows" if read else "the database refused the query"
            self._fail(f"{what}: {exc}", exc)

    def _text(self, name: str, values: list[Any], first: int) -> pa.Array:
        kinds = {type(v) for v in values}
        if kinds <= {str, type(None)}:
            return pa.array(values, pa.string())
        for i, v in enumerate(values):
            if isinstance(v, bytes):
                self._fail(
                    "a BLOB (binary) value; cast it to text in the query if it is text",
                    row=first + i + 1,
                    column=name,
                )
            if isinstance(v, float) and name in self._whole:
                self._fail(
                    f"{self._whole[name]} is a REAL number, which would be sent as {v!r}; store it as text or "
                    "INTEGER",
                    row=first + i + 1,
                    column=name,
                )
        return pa.array([v if v is None or isinstance(v, str) else repr(v) for v in values], pa.string())

    def cancel(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.interrupt()

    def close(self) -> None:
        self._conn.close()
