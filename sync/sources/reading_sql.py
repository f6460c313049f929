"""Database sources: a SQL query (or a table) read in Arrow record batches, in bounded memory, into the same
chunks as a file (:class:`sync.sources.reading.Chunk`), so validation, duplicate resolution, the snapshot diff and the
planner treat both alike.

A source with ``database:`` names PostgreSQL (``postgresql://``), DuckDB (``duckdb:///file``) or SQLite
(``sqlite:///file``); the drivers are in :mod:`sync.sources._sql_drivers`. Where a file source has a file and a data row
number, a database source has its **label** — ``users (postgresql://crm@db:5432/crm, table crm.users)``: the
source's name, the database without its password, and the table (or the tables the query reads) — and the
**1-based position of the row in the query's result**. Rejected rows name both, plus the external ID (the stable
way to find the row: positions follow the query's ORDER BY, or the database's own order without one).

The URL comes from the job (a URL without a password) or from where the job says it lives (``{env: NAME}``,
``{file: PATH}``), resolved with :func:`sync.config.resolve_secret` when the source is opened. Every URL and
password resolved is registered with :mod:`sync.redact`, and every message built here is scrubbed of both.

Anything that makes the source unreadable — a wrong URL, a refused login, a syntax error, a missing table or
column, a column whose type cannot hold what it is mapped to, a connection lost mid-stream — raises one
:class:`BadInputError` naming the source (exit code 2; the planner reads every row before anything is sent).
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from sync.config import (
    DatabaseKind,
    Destination,
    Job,
    Source,
    SourceKind,
    ValueType,
    database_kind,
    resolve_secret,
)
from sync.errors import BadInputError, InterruptedRunError, JobProblem, SecretError
from sync.redact import register_secret, register_url
from sync.sources._sql_drivers import Column, Driver, DuckdbDriver, Failure, PostgresDriver, SqliteDriver
from sync.sources.reading import CHUNK_BYTES, CHUNK_ROWS, ROW, Chunk, _normalise

__all__ = ["SqlReader", "check_sql_sources"]

_CONNECT_TIMEOUT = "15"
"""Seconds libpq waits for a PostgreSQL server that does not answer (unless the URL sets connect_timeout)."""


@dataclass(frozen=True, slots=True)
class _Target:
    """A resolved database: its kind, the URL to connect with (secret), a display form without the password."""

    kind: DatabaseKind
    url: str = field(repr=False)
    display: str
    path: Path | None
    origin: str
    """Where the URL came from, for messages: ``the job file``, ``CRM_DATABASE_URL``, ``file /run/...``."""
    secrets: tuple[str, ...] = field(repr=False, default=())


def _origin(source: Source) -> str:
    assert source.sql is not None
    ref = source.sql.database
    if ref.url:
        return "the job file"
    named = [f"environment variable {ref.env}" if ref.env else "", f"file {ref.file}" if ref.file else ""]
    return " / ".join(n for n in named if n)


def _resolve(source: Source) -> _Target:
    assert source.sql is not None
    ref = source.sql.database
    origin = _origin(source)
    label = f"{source.name} (database from {origin})"
    if ref.url:
        url = ref.url
    else:
        # The same resolver as the destination's key: same rules (env first, then file), same messages.
        try:
            url = resolve_secret(
                Destination(platform="database", base_url="", secret_env=ref.env, secret_file=ref.file)
            )
        except SecretError as exc:
            raise SecretError(f"source {source.name!r}: the database URL: {exc}") from None
    # A URL written in the job holds no password (the loader refuses one) and is no secret; one from the
    # environment or a file may hold credentials in any form: all of it is masked where it appears whole, its
    # password (and a credential parameter's value) in pieces too — not its host or database, whose
    # 8-character runs would be masked in every platform answer naming them (sync.redact.register_url).
    written = url
    if database_kind(url) is DatabaseKind.POSTGRESQL:
        url = _libpq_userinfo(url)
    secrets = () if ref.url else register_url(url)
    if written != url and not ref.url:
        register_secret(written, pieces=False)  # its password is registered (in pieces) from the encoded form
        secrets = (*secrets, written)
    kind = database_kind(url)
    if kind is None:
        raise BadInputError(
            label,
            "not a database URL: use postgresql://..., duckdb:///path/file.duckdb or sqlite:///path/file.db",
        )
    if kind is DatabaseKind.POSTGRESQL:
        return _postgres_target(url, label, origin, secrets)
    rest = url.split("://", 1)[1] if "://" in url else ""
    if not rest.startswith("/") or len(rest) < 2:
        raise BadInputError(
            label,
            f"write {kind.value}:///relative/path or {kind.value}:////absolute/path (as SQLAlchemy does)",
        )
    path = Path(os.path.expanduser(urllib.parse.unquote(rest[1:].split("?", 1)[0])))
    if not path.is_absolute():
        path = Path(ref.base) / path
    return _Target(kind, url, f"{kind.value} file {path}", path, origin, secrets)


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^@/]*)@")
"""A URL's scheme and its user and password, read as libpq reads them: up to the first "@" before any "/"."""


def _libpq_userinfo(url: str) -> str:
    """``url`` with the "#", "?", "[" and "]" of its user and password percent-encoded (libpq decodes them).

    libpq takes a password as written up to the "@" (``postgresql://crm:Zq#9?kL@db/crm`` logs in), where a URL
    parser ends the host at the "#" or "?": such a generated password was refused as a URL that "cannot be
    parsed", or read as the host and port (``crm:1234``), shown in every message naming the source."""
    found = _USERINFO.match(url)
    if found is None or not re.search(r"[#?\[\]]", found.group(2)):
        return url
    userinfo = re.sub(r"[#?\[\]]", lambda m: f"%{ord(m.group()):02X}", found.group(2))
    return f"{found.group(1)}{userinfo}@{url[found.end() :]}"


def _postgres_target(url: str, label: str, origin: str, secrets: tuple[str, ...]) -> _Target:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        raise BadInputError(label, f"the PostgreSQL URL from {origin} cannot be parsed") from None
    user = urllib.parse.unquote(parts.username or "")
    # The hosts and ports as written: libpq takes several (db1:5432,db2:5432?target_session_attrs=read-only, a
    # standby and its fallback), which urllib's port refused, so such a URL "cannot be parsed"; libpq checks them.
    where = parts.netloc.rpartition("@")[2]
    display = f"postgresql://{user + '@' if user else ''}{where}{parts.path}"
    names = {k for k, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)}
    # Named in pg_stat_activity for the DBA; and a server that never answers fails instead of hanging.
    added = [
        (k, v)
        for k, v in (("application_name", "pushsync"), ("connect_timeout", _CONNECT_TIMEOUT))
        if k not in names
    ]
    # The URL's own parameters are kept as written, only ours appended: decoded and encoded again, a space
    # (options=-c%20statement_timeout%3D5min) came back as "+", which libpq reads as a plus sign.
    query = "&".join(q for q in (parts.query, urllib.parse.urlencode(added)) if q)
    scheme = "postgresql"
    full = urllib.parse.urlunsplit((scheme, parts.netloc, parts.path, query, ""))
    return _Target(DatabaseKind.POSTGRESQL, full, display, None, origin, (*secrets, full))


_TABLES_IN_QUERY = re.compile(
    r'\b(?:from|join)\s+((?:"[^"]+"|[A-Za-z_][\w$]*)(?:\.(?:"[^"]+"|[A-Za-z_][\w$]*))*)', re.I
)


_FINAL_SEMICOLON = re.compile(r"[\s;]*;[ \t]*(--[^\n]*)?\s*$")
"""A query's final semicolon(s), and the comment after them on the last line."""


def _keep_comment(found: re.Match[str]) -> str:
    return f" {found.group(1)}" if found.group(1) else ""


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- column types ----------------------------------------------------------------------------------------------

_ID, _TEXT, _NAME, _NUMBER, _BOOLEAN, _DATE, _LIST = "id", "text", "name", "number", "boolean", "date", "list"
_ROLE_WORDS = {
    _ID: "the external ID (text or integers)",
    _TEXT: "a text value",
    _NAME: "an e-mail address, MSISDN, tag or event name (text or integers)",
    _NUMBER: "a number",
    _BOOLEAN: "a boolean",
    _DATE: "a date",
    _LIST: "a list",
}
_FITS: dict[str, frozenset[str]] = {
    _ID: frozenset({"text", "integer", "whole decimal", "null"}),
    _TEXT: frozenset(
        {"text", "integer", "whole decimal", "decimal", "float", "boolean", "date", "timestamp", "null"}
    ),
    # As a Parquet file's (sync/sources/_column_types.py): a double phone number 905312345601.0 was sent as
    # 9053123456010 (its dot removed as a separator), a double's NaN as the tag or event name "nan".
    _NAME: frozenset({"text", "integer", "whole decimal", "null"}),
    _NUMBER: frozenset({"text", "integer", "whole decimal", "decimal", "float", "null"}),
    _BOOLEAN: frozenset({"text", "integer", "boolean", "null"}),
    _DATE: frozenset({"text", "date", "timestamp", "null"}),
    _LIST: frozenset({"text", "list", "null"}),
}
_ATTRIBUTE_ROLE = {
    ValueType.STRING: _TEXT,
    ValueType.NUMBER: _NUMBER,
    ValueType.BOOLEAN: _BOOLEAN,
    ValueType.DATE: _DATE,
    ValueType.LIST: _LIST,
}


def _roles(source: Source) -> list[tuple[str, str]]:
    """(column, role) for every column the source maps, the external ID first."""
    out = [(source.ext_id, _ID)]
    out += [(a.column, _ATTRIBUTE_ROLE[a.type]) for a in source.attributes]
    out += [(t.column, _LIST) for t in source.tags]
    out += [(c, _BOOLEAN) for c in source.opt_ins.columns()]
    out += [(c, _NAME) for c in (source.email, source.msisdn, source.tag, source.event) if c]
    if source.kind is SourceKind.TAGS and source.action:
        out.append((source.action, _BOOLEAN))
    return out


def _type_class(t: pa.DataType) -> str:
    if isinstance(t, pa.BaseExtensionType):
        name = getattr(t, "extension_name", "")
        if name in ("arrow.uuid", "arrow.json") or pa.types.is_string(t.storage_type):
            # PostgreSQL's numeric comes as text in an "opaque" extension: a decimal, not free text.
            return "decimal" if "numeric" in str(t) else "text"
        return "other"
    if pa.types.is_dictionary(t):
        return _type_class(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_decimal(t):
        return "whole decimal" if t.scale == 0 else "decimal"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        item = _type_class(t.value_type)
        return (
            "list" if item in ("text", "integer", "whole decimal", "decimal", "float", "boolean") else "other"
        )
    return "other"


def _type_problem(column: Column, role: str) -> str | None:
    if column.type is None:
        return None  # SQLite: checked value by value while reading
    if column.type_name in ("money", "_money"):
        # ADBC gives PostgreSQL's money as its integer count of cents: 12.50 arrived as 1250, sent a hundred
        # times too large (as a number or as text) without a word.
        return (
            f"column {column.name!r} is money in the query's result, which arrives as cents (12.50 as 1250); "
            f"convert it in the query (e.g. CAST({column.name} AS NUMERIC))"
        )
    found = _type_class(column.type)
    if found in _FITS[role]:
        return None
    target = {_NUMBER: "DOUBLE PRECISION", _BOOLEAN: "BOOLEAN", _DATE: "TIMESTAMP"}.get(role, "TEXT")
    if role == _NAME and found in ("float", "decimal"):
        target = "BIGINT"  # a phone number stored as a double: its digits (DuckDB's text of 1.0 is "1.0")
    convert = f"CAST({column.name} AS {target})"
    if found == "list" and target == "TEXT":
        # An array cast to text is '{a,b}' (PostgreSQL) or '[a, b]' (DuckDB), which would be sent as it is.
        convert = f"array_to_string({column.name}, '|')"
    return (
        f"column {column.name!r} is {column.type_name} in the query's result, which cannot hold "
        f"{_ROLE_WORDS[role]}; convert it in the query (e.g. {convert})"
    )


def _arrow_ready(array: pa.Array) -> pa.Array:
    """An array polars can take: extension types as their text, dictionaries decoded, UUIDs as canonical text."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    t = array.type
    if isinstance(t, pa.BaseExtensionType):
        storage = array.storage
        if getattr(t, "extension_name", "") == "arrow.uuid" or pa.types.is_fixed_size_binary(storage.type):
            hexed = pl.from_arrow(storage).bin.encode("hex")  # type: ignore[union-attr]
            text = pl.select(
                pl.concat_str(
                    [hexed.str.slice(a, b - a) for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))],
                    separator="-",
                )
            ).to_series()
            return text.to_arrow()
        return storage
    if pa.types.is_dictionary(t):
        return array.dictionary_decode()
    if pa.types.is_timestamp(t) and t.tz is not None and t.tz != "UTC":
        # DuckDB gives a TIMESTAMPTZ in the machine's time zone: mapped as a string, the same instant was sent
        # as "2024-03-01 05:00:00-05:00" from one host and "10:00:00+00:00" from another (every user changed,
        # in snapshot mode, when the job moved). In UTC, as PostgreSQL's arrive; the instants are the same.
        return array.cast(pa.timestamp(t.unit, "UTC"))
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and isinstance(t.value_type, pa.BaseExtensionType):
        # uuid[], numeric[], jsonb[]: items of an extension type, which polars cannot take (a uuid[] tags column
        # ended in "internal error: ComputeError: invalid utf8", exit 5). Their text, in the same lists; only
        # this slice's items are converted (a batch is cut in several slices).
        start, end = array.offsets[0].as_py(), array.offsets[-1].as_py()
        items = _arrow_ready(array.values.slice(start, end - start))
        lists = pa.ListArray if pa.types.is_list(t) else pa.LargeListArray
        return lists.from_arrays(pc.subtract(array.offsets, start), items, mask=array.is_null())
    return array


_SECOND_BOUNDS = (-62_135_596_800, 253_402_300_799)
"""0001-01-01T00:00:00 and 9999-12-31T23:59:59 in epoch seconds: the years a date can be sent (and shown) in."""
_UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _first_out_of_range(array: pa.Array) -> int | None:
    """The index of the first date or timestamp of ``array`` outside years 1-9999, or None.

    PostgreSQL's ``infinity`` and ``-infinity`` arrive so: ADBC adds the 2000 epoch to the server's sentinel and
    wraps around, into a day some five million years BC whichever the sign (DuckDB gives the largest values). Sent,
    they were a nonsense date on the user's profile; shown as text, polars panicked."""
    t = array.type
    if pa.types.is_date32(t):
        values = array.view(pa.int32())
        low, high = _SECOND_BOUNDS[0] // 86_400, _SECOND_BOUNDS[1] // 86_400
    elif pa.types.is_date64(t) or pa.types.is_timestamp(t):
        per_second = 1_000 if pa.types.is_date64(t) else _UNIT_PER_SECOND[t.unit]
        values = array.view(pa.int64())
        low = max(_SECOND_BOUNDS[0] * per_second, -(2**63))
        high = min((_SECOND_BOUNDS[1] + 1) * per_second - 1, 2**63 - 1)
    else:
        return None
    outside = pc.or_(pc.less(values, low), pc.greater(values, high))
    if not pc.any(outside).as_py():
        return None
    return int(pc.index(outside, True).as_py())


_NOT_FINITE = pa.array(["nan", "inf", "-inf"])
"""How ADBC writes PostgreSQL's numeric NaN, Infinity and -Infinity."""


def _first_not_finite(array: pa.Array) -> int | None:
    """The index of the first PostgreSQL numeric NaN or infinity of ``array`` (or of its first list holding
    one: numeric[]), or None. A float's is refused by validation, which knows the column is a float; a numeric
    arrives as text, and its NaN was sent as the text "nan" where it was mapped as a string or a list."""
    t = array.type
    lists = pa.types.is_list(t) or pa.types.is_large_list(t)
    item = t.value_type if lists else t
    if not (isinstance(item, pa.BaseExtensionType) and "numeric" in str(item)):
        return None
    values = array.flatten() if lists else array
    found = pc.is_in(values.storage, value_set=_NOT_FINITE)
    if not pc.any(found).as_py():
        return None
    first = int(pc.index(found, True).as_py())
    return int(pc.list_parent_indices(array)[first].as_py()) if lists else first


# --- the reader ------------------------------------------------------------------------------------------------

READ_AHEAD = 2
"""Record batches fetched ahead of the one being validated (each at most a driver batch: ~8 MB for PostgreSQL)."""

_POLL = 0.1
"""Seconds between two looks at the stop event while a batch is awaited: how late a stop is seen."""
_CANCEL_WAIT = 10.0
"""Seconds a cancelled read is given to end before the reader leaves it (and its connection) to the process's exit."""

_END = object()


class _Fetcher:
    """A driver's record batches, fetched in a thread of their own, so that the caller waits for them with a
    timeout and sees a stop (and Ctrl-C) while the database works, however long a batch takes.

    ``ahead`` batches are fetched beyond those asked for: a server then works while the previous chunk is
    validated, instead of waiting on a full socket; an in-process engine (``ahead=0``) fetches only what is asked
    for, as if read inline (it would compete with validation for the same cores, and hold more memory). Each batch
    asked for is a credit for the thread, so at most ``ahead + 1`` batches are ever in the queue (it needs no bound
    of its own). The generator is consumed, and closed, in the thread only (a driver is used from one thread at a
    time). Leaving early (:meth:`close`: a stop, an interrupt, an error in the caller, a reader closed after its
    first chunk) cancels the statement running (:meth:`sync.sources._sql_drivers.Driver.cancel`) and waits for
    the thread to end."""

    __slots__ = ("_batches", "_cancel", "_done", "_halt", "_queue", "_stop", "_thread", "_wanted")

    def __init__(
        self,
        batches: Generator[pa.RecordBatch, None, None],
        *,
        ahead: int,
        stop: threading.Event | None,
        cancel: Callable[[], bool],
    ) -> None:
        self._batches = batches  # consumed and closed by the thread only
        self._cancel = cancel  # cancels the driver's statement from the caller's thread; False: none yet
        self._stop = stop  # set by a signal handler (a run): seen within _POLL seconds
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()  # batches, then _END or an exception
        self._wanted = threading.Semaphore(ahead)  # batches the thread may fetch now
        self._halt = threading.Event()  # the caller left: fetch no more
        self._done = False  # the thread put its last item (and the caller took it)
        self._thread = threading.Thread(target=self._pump, name="pushsync-sql-read-ahead", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        last: object = _END
        try:
            while True:
                self._wanted.acquire()
                if self._halt.is_set():
                    break
                batch = next(self._batches, None)
                if batch is None:
                    break
                self._queue.put(batch)
        except BaseException as exc:  # handed to the caller, which raises it in its own thread
            last = exc
        finally:
            self._batches.close()
        self._queue.put(last)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        while True:
            self._wanted.release()
            while True:
                if self._stop is not None and self._stop.is_set():
                    raise InterruptedRunError(
                        "interrupted while the input was read; nothing was sent or recorded"
                    )
                try:
                    item = self._queue.get(timeout=_POLL)
                    break
                except queue.Empty:
                    continue
            if item is _END:
                self._done = True
                return
            if isinstance(item, BaseException):
                self._done = True
                raise item
            assert isinstance(item, pa.RecordBatch)
            yield item

    def close(self) -> bool:
        """Stop fetching (cancelling the statement if the thread is still at it) and wait for the thread; False
        when it did not end within :data:`_CANCEL_WAIT` seconds (its connection must not be closed under it), or
        was not waited for: still connecting, it has no statement to cancel (a server that does not answer
        would keep it for the connect timeout), and closes the connection it gets at once."""
        if not self._done:
            self._halt.set()
            self._wanted.release()  # wakes a thread waiting for a credit
            if self._thread.is_alive() and not self._cancel():
                return False
            deadline = time.monotonic() + _CANCEL_WAIT
            while not self._done:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return False
                # Batches fetched ahead are dropped; so is the cancelled read's error (the caller has its own).
                self._done = item is _END or isinstance(item, BaseException)
        self._thread.join()
        return True


class _Opened:
    """The driver a read opens in its fetching thread, reachable from the caller's thread to cancel its
    statement (:class:`_Fetcher`'s ``cancel``) and, once the thread has ended, to close it."""

    __slots__ = ("_cancelled", "_driver", "_lock")

    def __init__(self) -> None:
        self._driver: Driver | None = None  # once opened, until the read ends
        self._cancelled = False  # cancel was called: a driver opened after it is closed at once
        self._lock = threading.Lock()  # between the fetching thread's hold and the caller's cancel

    def hold(self, driver: Driver) -> bool:
        """Keep ``driver`` for :meth:`cancel`; False (``driver`` closed) when the read was cancelled meanwhile."""
        with self._lock:
            if not self._cancelled:
                self._driver = driver
                return True
        driver.close()
        return False

    def close(self) -> None:
        """Close the driver, if one was opened (once the fetching thread has ended)."""
        with self._lock:
            driver, self._driver = self._driver, None
        if driver is not None:
            driver.close()

    def cancel(self) -> bool:
        """Cancel the statement running on the driver (from the caller's thread); False when none is open yet."""
        with self._lock:
            self._cancelled = True
            driver = self._driver
        if driver is None:
            return False
        driver.cancel()
        return True


class SqlReader:
    """Reads one database source. Building it resolves the URL (no connection yet); each method opens its own
    connection and closes it."""

    def __init__(self, source: Source) -> None:
        if source.sql is None:
            raise ValueError(f"source {source.name!r} does not read a database")
        self.source = source
        self._target = _resolve(source)
        sql = source.sql
        if sql.table is not None:
            columns = ", ".join(_quote(c) for c in source.columns())
            self.statement = f"SELECT {columns} FROM {sql.table}"
            what = f"table {sql.table}"
        else:
            assert sql.query is not None
            # COPY (...) and sub-selects cannot end in a semicolon (nor in one before a final comment); and a last
            # line ending in a comment (-- ...) would comment out their closing parenthesis: the statement ends
            # with a line break.
            self.statement = _FINAL_SEMICOLON.sub(_keep_comment, sql.query.strip()) + "\n"
            tables = list(dict.fromkeys(m.group(1) for m in _TABLES_IN_QUERY.finditer(self.statement)))
            what = f"query on {', '.join(tables)}" if tables else "query"
        self.label = f"{source.name} ({self._target.display}, {what})"
        """How rejected rows and errors name this source (never with a password)."""
        self._fail = Failure(self.label, self._scrub)

    def _scrub(self, text: str) -> str:
        for secret in sorted(self._target.secrets, key=len, reverse=True):
            if len(secret) >= 4 or secret == self._target.url:
                text = text.replace(secret, "***")
        return text

    def _open(self) -> Driver:
        target = self._target
        if target.kind is DatabaseKind.POSTGRESQL:
            return PostgresDriver(target.url, self._fail, origin=target.origin)
        assert target.path is not None
        if target.kind is DatabaseKind.DUCKDB:
            return DuckdbDriver(target.path, self._fail)
        source = self.source
        named = {source.email: "an e-mail address", source.msisdn: "an MSISDN"}
        named |= {source.tag: "a tag name", source.event: "an event name"}
        names = {column: what for column, what in named.items() if column}
        return SqliteDriver(target.path, self._fail, id_column=source.ext_id, names=names)

    def check(self) -> list[Column]:
        """Check that the result has every mapped column, each of a type that fits its mapping, reading no row
        (PostgreSQL's schema call, DuckDB's and SQLite's LIMIT 0). Raises BadInputError; returns the columns.

        Read in a thread of its own, as :meth:`chunks` reads: an interrupt (Ctrl-C, SIGTERM) is seen while the
        schema call waits for a lock, and cancels it (``pushsync validate`` waited as long as the lock)."""
        opened = _Opened()
        columns: list[Column] = []
        fetcher = _Fetcher(self._schema(opened, columns), ahead=0, stop=None, cancel=opened.cancel)
        try:
            for _ in fetcher:
                pass
        finally:
            if fetcher.close():
                opened.close()
        self._check_columns(columns)
        return columns

    def _schema(self, opened: _Opened, columns: list[Column]) -> Generator[pa.RecordBatch, None, None]:
        """Adds the result's columns to ``columns``, in the fetching thread (:meth:`check`); gives no batch."""
        driver = self._open()
        if opened.hold(driver):
            columns += driver.schema(self.statement)
        yield from ()

    def _check_columns(self, columns: list[Column]) -> None:
        names = [c.name for c in columns]
        missing = [c for c in self.source.columns() if c not in names]
        if missing:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            folded = [m for m in missing if m.lower() in names]
            hint = (
                f"; unquoted names are folded to lower case: write AS {_quote(folded[0])} in the query"
                if folded
                else ""
            )
            self._fail(
                f"column(s) {', '.join(map(repr, missing))} named by source {self.source.name!r} are not in the "
                f"query's result (it has {len(names)} column(s): {shown}){hint}",
                column=missing[0],
            )
        doubled = sorted({c for c in self.source.columns() if names.count(c) > 1})
        if doubled:
            self._fail(
                f"the query's result has several columns named {', '.join(map(repr, doubled))}",
                column=doubled[0],
            )
        by_name = {c.name: c for c in columns}
        for name, role in _roles(self.source):
            problem = _type_problem(by_name[name], role)
            if problem:
                self._fail(problem, column=name)

    def estimate_rows(self) -> int:
        """How many rows the source gives (a count(*) of the query), to size the planner's hash buckets.

        Checks the query and its columns first (as :meth:`check`): the database's message for the query itself
        is clearer than for the count wrapped around it, and a wrong column is found before a long count."""
        driver = self._open()
        try:
            self._check_columns(driver.schema(self.statement))
            return driver.estimate_rows(self.statement)
        finally:
            driver.close()

    def chunks(self, stop: threading.Event | None = None) -> Iterator[Chunk]:
        """Stream the result in chunks of about :data:`sync.sources.reading.CHUNK_ROWS` rows: the mapped columns (as
        :func:`sync.sources.reading.iter_chunks` gives them) and ``__row``, the row's 1-based position in the result.

        ``stop`` (set by a signal handler) is looked at while the database works, every :data:`_POLL` seconds: the
        statement is cancelled and :class:`sync.errors.InterruptedRunError` raised. So is an interrupt (Ctrl-C, or
        SIGTERM in ``pushsync plan``): the query does not run on in the server after the process has gone."""
        opened = _Opened()
        fetcher = _Fetcher(
            self._batches(opened),
            ahead=READ_AHEAD if self._target.kind is DatabaseKind.POSTGRESQL else 0,
            stop=stop,
            cancel=opened.cancel,
        )
        try:
            wanted = list(self.source.columns())
            pending: list[pa.RecordBatch] = []
            rows = 0
            next_row = 1
            as_text = {c for c, role in _roles(self.source) if role in (_TEXT, _LIST)}
            # DuckDB and SQLite give UTF-8 only (SQLite's sqlite3 fails on other bytes); PostgreSQL gives what a
            # SQL_ASCII database holds, as it is.
            check_text = self._target.kind is DatabaseKind.POSTGRESQL
            for batch in fetcher:
                index = {name: i for i, name in enumerate(batch.schema.names)}
                if len(index) < batch.num_columns:
                    # A name given twice, which SQLite's LIMIT 0 sub-select renamed (id, id:1): refused as the
                    # schema's would be, not read from the last column of that name.
                    self._check_columns([Column(n, None, "") for n in batch.schema.names])
                # PostgreSQL's batches are sized in bytes: narrow rows make batches of 100k+ rows. Validation
                # works (and holds memory) per chunk, so cut them to the chunk size (slices copy nothing): of
                # CHUNK_ROWS rows, fewer when rows are wide (CHUNK_BYTES, at this batch's mean width).
                limit = max(1, min(CHUNK_ROWS, CHUNK_BYTES * batch.num_rows // max(1, batch.nbytes)))
                start = 0
                while start < batch.num_rows:
                    if rows >= limit:
                        yield self._chunk(pending, next_row)
                        next_row += rows
                        pending, rows = [], 0
                    piece = batch.slice(start, limit - rows)
                    start += piece.num_rows
                    for c in wanted:
                        self._refuse_out_of_range(piece.column(index[c]), c, next_row + rows)
                        if c in as_text:
                            self._refuse_not_finite(piece.column(index[c]), c, next_row + rows)
                    arrays = [_arrow_ready(piece.column(index[c])) for c in wanted]
                    if check_text:
                        for c, array in zip(wanted, arrays, strict=True):
                            self._refuse_invalid_text(array, c, next_row + rows)
                    pending.append(pa.RecordBatch.from_arrays(arrays, names=wanted))
                    rows += piece.num_rows
                    if rows >= limit:
                        yield self._chunk(pending, next_row)
                        next_row += rows
                        pending, rows = [], 0
            if pending:
                yield self._chunk(pending, next_row)
        finally:
            # The fetching thread must end before the driver closes; one that did not (a cancel the database
            # ignored) keeps the connection, which the process's exit closes (one still connecting closes it).
            if fetcher.close():
                opened.close()

    def _batches(self, opened: _Opened) -> Generator[pa.RecordBatch, None, None]:
        """The result's record batches, the connection opened and the columns checked first: all of it in the
        fetching thread, so that a stop is seen while the database works before the first row too — a schema
        call waiting for a lock (a migration's ALTER TABLE), which kept SIGTERM waiting as long as the lock."""
        driver = self._open()
        if not opened.hold(driver):
            return  # stopped while the connection was made
        self._check_columns(driver.schema(self.statement))
        yield from driver.batches(self.statement, CHUNK_ROWS)

    def _refuse_out_of_range(self, array: pa.Array, column: str, first_row: int) -> None:
        """Stop the read at a date outside years 1-9999 (:func:`_first_out_of_range`), naming its position: no
        platform can hold it, and nulling it would unset or skip the user's value without a word."""
        found = _first_out_of_range(array)
        if found is not None:
            self._fail(
                "a date outside years 1-9999 (PostgreSQL's 'infinity' or '-infinity'?); make it NULL or a real "
                f"date in the query (e.g. NULLIF({column}, 'infinity'))",
                row=first_row + found,
                column=column,
            )

    def _refuse_invalid_text(self, array: pa.Array, column: str, first_row: int) -> None:
        """Stop the read at a text that is not UTF-8, naming its position. A SQL_ASCII database stores bytes
        unchecked (Latin-1 names from an old application): such a value ended the plan in a Rust panic and a
        traceback (exit 1)."""
        lists = pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
        # A list's own items: validating a slice of a list validates its whole child array (other slices' too).
        first, last = (array.offsets[0].as_py(), array.offsets[-1].as_py()) if lists else (0, 0)
        try:
            # Checks UTF-8 (about 4 ms for 1M short texts).
            (array.values.slice(first, last - first) if lists else array).validate(full=True)
            return
        except pa.ArrowInvalid:
            pass
        found = 0  # which row, looked for only when there is one
        offsets = array.offsets.to_pylist() if lists else []
        for i in range(len(array)):
            row = array.values.slice(offsets[i], offsets[i + 1] - offsets[i]) if lists else array.slice(i, 1)
            try:
                row.validate(full=True)
            except pa.ArrowInvalid:
                found = i
                break
        self._fail(
            "a text that is not UTF-8 (a SQL_ASCII database holding another encoding?); correct it, or leave it "
            "out in the query",
            row=first_row + found,
            column=column,
        )

    def _refuse_not_finite(self, array: pa.Array, column: str, first_row: int) -> None:
        """Stop the read at a PostgreSQL numeric NaN or infinity read as text (:func:`_first_not_finite`), naming
        its position: as a float's, it is no value to send, and nulling it would skip the user's value."""
        found = _first_not_finite(array)
        if found is not None:
            fix = (
                f"remove it in the query (e.g. array_remove({column}, 'NaN'))"
                if pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
                else f"make it NULL in the query (e.g. NULLIF({column}, 'NaN'))"
            )
            self._fail(
                f"a numeric NaN or infinity, which would be sent as the text 'nan' or 'inf'; {fix}",
                row=first_row + found,
                column=column,
            )

    @staticmethod
    def _chunk(batches: list[pa.RecordBatch], first_row: int) -> Chunk:
        table = pa.Table.from_batches(batches)
        frame = _normalise(table.replace_schema_metadata(None))
        return Chunk(
            frame.with_columns(pl.int_range(first_row, first_row + table.num_rows, dtype=pl.Int64).alias(ROW))
        )


def check_sql_sources(job: Job) -> list[JobProblem]:
    """Problems with a job's database sources: the URL, the connection, the query and its columns' names and
    types — reading no row. Used by ``pushsync validate``."""
    problems = []
    for i, source in enumerate(job.sources):
        if source.sql is None:
            continue
        try:
            SqlReader(source).check()
        except (BadInputError, SecretError) as exc:
            problems.append(JobProblem(f"sources[{i}]", str(exc)))
    return problems
