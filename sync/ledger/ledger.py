"""The run ledger: one embedded SQLite database per job (WAL), recording every run, batch and refused ID.

Each batch is a small state machine, ``planned → sent → ok | rejected | failed``; refused IDs (``batch_ids``)
and rows refused by validation (``rejected_rows``) are kept beside it. Writes are queued in memory the moment
they happen and committed in small transactions (every ``flush_every`` writes, and whenever the dispatcher
calls :meth:`Ledger.flush`, at least every ``flush_interval`` seconds): one commit per write would cap the
ledger near a thousand batches a second; small transactions keep it well above 3,000 (see
``tests/test_ledger.py``). WAL lets ``pushsync runs``/``show`` read while a run writes. A crash loses at most
the writes of the last flush interval; those batches read as *planned* or *sent* and resume sends them again.

The ledger runs in the event-loop thread: each commit is short (no fsync with ``synchronous=NORMAL`` in WAL
mode) and keeping it there means results are ordered exactly as the dispatcher saw them. A commit runs the queued
writes as ``executemany`` over each run of one statement, so a batch costs its four rows, not four Python calls
into SQLite.

A batch's external IDs are kept as one packed blob (:func:`pack_ids`: the IDs joined by line breaks, UTF-8, LZ4),
written with the planned row: a third of the JSON list of schema 4, in a quarter of its CPU, with no per-ID Python
work.
Only the IDs the platform refused get a row of their own (``batch_ids``, with the input row they came from).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Self

from sync.errors import StateError
from sync.planning.row_keys import SCHEME as ROW_KEY_SCHEME
from sync.records import Attempt, AttemptOutcome, Batch, BatchResult, BatchStatus, ExtIds, RejectedRow

if TYPE_CHECKING:  # type only: the ledger does not import the platform layer at run time
    from sync.platforms.meiro.poller import ExportWait

__all__ = [
    "RUN_COLUMNS",
    "SCHEMA_VERSION",
    "AttemptRow",
    "BatchRow",
    "Ledger",
    "LedgerBase",
    "LedgerDialect",
    "RunInfo",
    "RunLedger",
    "attempt_row",
    "batch_row_of",
    "connect_read_only",
    "finish_row",
    "holds_id",
    "new_run_id",
    "pack_ids",
    "refused_rows",
    "rejected_row",
    "result_row",
    "row_keys_row",
    "run_info_of",
    "sent_row",
    "unpack_ids",
]

SCHEMA_VERSION = 6
"""1: runs, batches, batch_ids, rejected_rows. 2: + attempts (one row per HTTP request). 3: + runs.full_refresh
(a resume honours the run's full refresh). 4: + batch_rows (the row keys of non-idempotent batches). 5:
``batches.ext_ids`` holds the packed IDs (:func:`pack_ids`) instead of a JSON array. 6: + runs.origin,
runs.origin_mode (the run a resume or retry replayed: resume follows the chain) and runs.destination (where the
run sent: a run of another destination is not resumed). Older ledgers are upgraded in place (version 4's JSON
lists are packed once, when the ledger is first opened for writing); their runs read with no origin and no
destination, as before."""

_LINES = b"\x01"
"""Packed-IDs tag: the IDs joined by ``\\n``, UTF-8 (no ID holds a line break: validation refuses controls)."""
_JSON = b"\x02"
"""Packed-IDs tag: a JSON array, for what the line form cannot hold (no IDs, an ID with a line break)."""
_LZ4_LINES = b"\x03"
"""Packed-IDs tag: the line form, LZ4-compressed (an LZ4 frame after the 4-byte little-endian raw length)."""
_COMPRESS_FROM = 512
"""Line forms from this many bytes are compressed. LZ4 (pyarrow's) takes 1000 IDs to a third of their size in
about 20 µs, less than SQLite spends writing the bytes it saves; zlib took 5× longer than it saved."""


def pack_ids(ext_ids: Sequence[str]) -> bytes:
    """A batch's external IDs as the ledger keeps them: one blob, read back by :func:`unpack_ids`.

    Joined by line breaks in C (no per-ID Python work); a JSON array when an ID holds a line break (the count of
    separators tells) or there are none. An :class:`sync.records.ExtIds` is joined already (the same bytes)."""
    if isinstance(ext_ids, ExtIds) and ext_ids:
        raw = ext_ids.lines()
    else:
        joined = "\n".join(ext_ids)
        if not ext_ids or joined.count("\n") != len(ext_ids) - 1:
            return _JSON + json.dumps(list(ext_ids)).encode("ascii")
        raw = joined.encode("utf-8", "surrogatepass")
    if len(raw) < _COMPRESS_FROM:
        return _LINES + raw
    return _LZ4_LINES + len(raw).to_bytes(4, "little") + _lz4().compress(raw, asbytes=True)


@functools.cache
def _lz4() -> Any:
    """pyarrow's LZ4 frame codec, made once (``pa.compress`` makes one per call: a fifth of its time on 1000 IDs).
    Imported on first use: a ledger reader that never packs does not need pyarrow."""
    import pyarrow as pa

    return pa.Codec("lz4")


def unpack_ids(packed: bytes | str | None) -> list[str]:
    """The IDs :func:`pack_ids` packed; also reads schema 4's JSON text (a ledger opened read-only is not
    upgraded) and None (no IDs)."""
    if packed is None:
        return []
    if isinstance(packed, str):  # schema 4 and older: a JSON array
        return [str(x) for x in json.loads(packed)]
    tag, body = packed[:1], packed[1:]
    if tag == _LZ4_LINES:
        import pyarrow as pa

        size = int.from_bytes(body[:4], "little")
        body = pa.decompress(body[4:], size, codec="lz4", asbytes=True)
        tag = _LINES
    if tag == _LINES:
        return body.decode("utf-8", "surrogatepass").split("\n")
    if tag == _JSON:
        return [str(x) for x in json.loads(body)]
    raise StateError(f"unknown packed-IDs format {tag!r} in the ledger")


def holds_id(packed: bytes | str | None, ext_id: str) -> bool:
    """Whether the IDs :func:`pack_ids` packed hold ``ext_id`` (a whole ID, not a piece of one): the same answer
    as ``ext_id in unpack_ids(packed)``, found by a search of the bytes, without making a string of every ID
    (``pushsync trace`` asks it of every batch of every run: 40,000 batches of 1,000 IDs took 3.3 s split)."""
    if not isinstance(packed, bytes) or "\n" in ext_id or packed[:1] not in (_LINES, _LZ4_LINES):
        return ext_id in unpack_ids(packed)  # the JSON forms, and an ID the line form cannot hold
    body = packed[1:]
    if packed[:1] == _LZ4_LINES:
        import pyarrow as pa

        body = pa.decompress(body[4:], int.from_bytes(body[:4], "little"), codec="lz4", asbytes=True)
    needle = ext_id.encode("utf-8", "surrogatepass")
    # Each ID is between line breaks or an end of the body: searched framed by line breaks on both sides.
    return b"\n" + needle + b"\n" in b"\n" + body + b"\n"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    job         TEXT NOT NULL,
    job_path    TEXT,
    platform    TEXT,
    started_at  REAL NOT NULL,
    finished_at REAL,
    status      TEXT NOT NULL,          -- running | done | partial | aborted | interrupted
    exit_code   INTEGER,
    message     TEXT,
    summary     TEXT,                   -- the run summary as JSON
    full_refresh INTEGER NOT NULL DEFAULT 0, -- 1: started with --full-refresh (a resume of it does one too)
    origin      TEXT,                   -- the run this one resumed or retried (NULL: a fresh plan)
    origin_mode TEXT,                   -- resume | retry
    destination TEXT                    -- where it sent: <platform>-<hash of base_url> (Destination.key)
);
CREATE TABLE IF NOT EXISTS batches (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    batch_id    TEXT NOT NULL,
    endpoint    TEXT NOT NULL,
    operation   TEXT NOT NULL,
    phase       INTEGER NOT NULL,
    n_ids       INTEGER NOT NULL,
    ext_ids     BLOB NOT NULL,          -- the external IDs the batch touches, packed (sync.ledger.ledger.pack_ids)
    status      TEXT NOT NULL,          -- planned | sent | ok | rejected | failed
    attempts    INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    code        TEXT,
    message     TEXT,
    ok_ids      INTEGER NOT NULL DEFAULT 0,
    rejected_ids INTEGER NOT NULL DEFAULT 0,
    planned_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    PRIMARY KEY (run_id, batch_id)
);
CREATE INDEX IF NOT EXISTS batches_status ON batches (run_id, status);
CREATE TABLE IF NOT EXISTS batch_ids (
    run_id      TEXT NOT NULL,
    batch_id    TEXT NOT NULL,
    ext_id      TEXT NOT NULL,
    code        TEXT,
    message     TEXT NOT NULL,
    origin_path TEXT,
    origin_row  INTEGER
);
CREATE INDEX IF NOT EXISTS batch_ids_run ON batch_ids (run_id);
CREATE TABLE IF NOT EXISTS rejected_rows (
    run_id      TEXT NOT NULL,
    path        TEXT NOT NULL,
    row         INTEGER NOT NULL,
    column_name TEXT,
    reason      TEXT NOT NULL,
    ext_id      TEXT
);
CREATE INDEX IF NOT EXISTS rejected_rows_run ON rejected_rows (run_id);
CREATE TABLE IF NOT EXISTS attempts (
    run_id      TEXT NOT NULL,
    batch_id    TEXT NOT NULL,          -- the (sub-)batch sent: a half of a split batch has its own ID
    endpoint    TEXT NOT NULL,
    attempt     INTEGER NOT NULL,       -- from 1 within the (sub-)batch; above 1 it is a retry
    n_ids       INTEGER NOT NULL,
    outcome     TEXT NOT NULL,          -- ok | rate_limited | retryable | rejected | fatal
    http_status INTEGER,                -- NULL: no answer (time-out, dropped connection)
    message     TEXT,
    started_at  REAL NOT NULL,          -- Unix time the request was sent
    latency     REAL NOT NULL           -- seconds until the answer (or the failure)
);
CREATE INDEX IF NOT EXISTS attempts_run ON attempts (run_id, endpoint);
CREATE TABLE IF NOT EXISTS batch_rows (     -- non-idempotent batches: the input rows they carry (sync.planning.row_keys)
    run_id      TEXT NOT NULL,
    batch_id    TEXT NOT NULL,
    scheme      TEXT NOT NULL,          -- how the keys were computed (sync.planning.row_keys.SCHEME)
    row_keys    BLOB NOT NULL,          -- 8-byte little-endian keys, back to back, one per row
    PRIMARY KEY (run_id, batch_id)
);
CREATE TABLE IF NOT EXISTS export_waits (   -- pushsync meiro wait / meiro run: one row per export waited for
    run_id          TEXT NOT NULL,
    platform        TEXT NOT NULL,
    notification_id TEXT NOT NULL,
    export_id       INTEGER NOT NULL,
    export_name     TEXT,
    outcome         TEXT NOT NULL,      -- finished | error | canceled | timed_out | failed
    status          TEXT,               -- the export's last status seen (NULL: never read)
    total           INTEGER NOT NULL,   -- message_counts
    sent            INTEGER NOT NULL,
    excluded_invalid INTEGER NOT NULL,
    excluded_by_frequency_cap INTEGER NOT NULL,
    polls           INTEGER NOT NULL,
    retries         INTEGER NOT NULL,
    started_at      REAL NOT NULL,
    finished_at     REAL NOT NULL,
    statuses_history TEXT,              -- JSON object: status -> platform timestamp
    message         TEXT                -- why a failed wait failed
);
CREATE INDEX IF NOT EXISTS export_waits_run ON export_waits (run_id);
"""

RUN_COLUMNS = (
    "run_id, job, job_path, platform, started_at, finished_at, status, exit_code, message, summary, full_refresh, "
    "origin, origin_mode, destination"
)
"""The columns of a run, in both ledgers (:func:`run_info_of` reads them in this order)."""
_INSERT_PLANNED = (
    "INSERT OR IGNORE INTO batches (run_id, batch_id, endpoint, operation, phase, n_ids, ext_ids, status, planned_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, 'planned', ?)"
)
_INSERT_ROW_KEYS = "INSERT OR IGNORE INTO batch_rows (run_id, batch_id, scheme, row_keys) VALUES (?, ?, ?, ?)"
_UPDATE_SENT = (
    "UPDATE batches SET status = 'sent', started_at = COALESCE(started_at, ?) "
    "WHERE run_id = ? AND batch_id = ? AND status IN ('planned', 'sent')"
)
_UPDATE_RESULT = (
    "UPDATE batches SET status = ?, attempts = ?, http_status = ?, code = ?, message = ?, ok_ids = ?, "
    "rejected_ids = ?, started_at = COALESCE(started_at, ?), finished_at = ? WHERE run_id = ? AND batch_id = ?"
)
_UPDATE_SENT_RESULT = (
    "UPDATE batches SET status = ?, attempts = ?, http_status = ?, code = ?, message = ?, ok_ids = ?, "
    "rejected_ids = ?, started_at = COALESCE(started_at, CASE WHEN status IN ('planned', 'sent') THEN ? END, ?), "
    "finished_at = ? WHERE run_id = ? AND batch_id = ?"
)
"""A batch's ``sent`` mark and its result in one statement, when a flush holds both (:func:`_fold_sent`): the
row is rewritten once instead of twice (with its packed IDs, that is most of what a result costs SQLite). It
leaves the row exactly as the two statements in turn would: ``sent`` only ever set ``started_at`` (when the row
was planned or sent), and the result then overwrites every other column it touched."""
_UPSERT_DONE = (
    "INSERT INTO batches (run_id, batch_id, endpoint, operation, phase, n_ids, ext_ids, planned_at, status, attempts, "
    "http_status, code, message, ok_ids, rejected_ids, started_at, finished_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, COALESCE(?, ?), ?) "
    "ON CONFLICT (run_id, batch_id) DO UPDATE SET status = excluded.status, attempts = excluded.attempts, "
    "http_status = excluded.http_status, code = excluded.code, message = excluded.message, ok_ids = excluded.ok_ids, "
    "rejected_ids = excluded.rejected_ids, "
    "started_at = COALESCE(batches.started_at, CASE WHEN batches.status IN ('planned', 'sent') THEN ? END, ?), "
    "finished_at = excluded.finished_at"
)
"""A batch's planned row, its ``sent`` mark and its result in one statement, when a flush holds all three
(:func:`_fold_sent`): the row, with its packed IDs, is written once instead of three times (SQLite rewrites a
whole row, blob included, on every update). A new row is what the three statements in turn make of it; a row
already there (an earlier flush planned it) is left by the insert, so the update does what :data:`_UPDATE_SENT`
then :data:`_UPDATE_RESULT` would (as :data:`_UPDATE_SENT_RESULT`)."""
_INSERT_REFUSED = "INSERT INTO batch_ids (run_id, batch_id, ext_id, code, message, origin_path, origin_row) VALUES (?, ?, ?, ?, ?, ?, ?)"
_INSERT_ATTEMPT = (
    "INSERT INTO attempts (run_id, batch_id, endpoint, attempt, n_ids, outcome, http_status, message, started_at, "
    "latency) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_EXPORT_WAIT = (
    "INSERT INTO export_waits (run_id, platform, notification_id, export_id, export_name, outcome, status, total, "
    "sent, excluded_invalid, excluded_by_frequency_cap, polls, retries, started_at, finished_at, statuses_history, "
    "message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_RUN = (
    "INSERT INTO runs (run_id, job, job_path, platform, started_at, status, full_refresh, origin, origin_mode, "
    "destination) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?)"
)
_FLUSH_ORDER = {
    sql: rank
    for rank, sql in enumerate(
        (_INSERT_RUN, _INSERT_PLANNED, _INSERT_ROW_KEYS, _UPDATE_SENT, _INSERT_ATTEMPT, _UPDATE_RESULT)
    )
}
"""Where a flush puts each kind of write: a run before its batches, a batch's planned row before its sent mark,
its attempts and its result (one batch's writes are always queued in that order, so sorting the queued writes
by kind keeps every batch's order). Any other write (refused IDs, rejected rows, a run's end) comes after these,
in the order it was queued."""


def _rank(write: tuple[str, Sequence[Any]]) -> int:
    return _FLUSH_ORDER.get(write[0], len(_FLUSH_ORDER))


def _fold_sent(writes: list[tuple[str, Sequence[Any]]]) -> list[tuple[str, Sequence[Any]]]:
    """``writes`` (sorted by :func:`_rank`) with each batch's ``sent`` mark folded into its result when both are
    there (:data:`_UPDATE_SENT_RESULT`), and its planned row too when that is there as well (:data:`_UPSERT_DONE`).

    Exact: sorted, a batch's planned row comes before its ``sent`` mark, which comes before its result, and
    nothing between them writes that batch's row (the other writes are other batches' rows, row keys, attempts,
    refused IDs). Only a batch with one of each in the flush is folded (the same batch ID queued twice is left
    as it is); a folded row goes where its planned row was (rows are inserted in plan order: their rowids are
    the order the ledger lists them in), the folded results before the other results — the writes around them
    touch other rows."""
    planned: dict[tuple[Any, Any], int] = {}  # (run, batch) -> index of its planned row; -1: more than one
    sent: dict[tuple[Any, Any], int] = {}  # (run, batch) -> index of its sent mark; -1: more than one
    results: dict[tuple[Any, Any], int] = {}  # (run, batch) -> index of its result; -1: more than one
    first = -1  # where the results start (contiguous: sorted by kind)
    for i, (sql, params) in enumerate(writes):
        if sql is _INSERT_PLANNED:
            key = (params[0], params[1])
            planned[key] = -1 if key in planned else i
        elif sql is _UPDATE_SENT:
            key = (params[1], params[2])
            sent[key] = -1 if key in sent else i
        elif sql is _UPDATE_RESULT:
            key = (params[-2], params[-1])
            results[key] = -1 if key in results else i
            first = i if first < 0 else first
    done: dict[
        int, tuple[str, Sequence[Any]]
    ] = {}  # planned row's index -> its upsert (planned, sent, result)
    merged: list[tuple[str, Sequence[Any]]] = []  # sent and result: one update each
    dropped: set[int] = set()
    for key, at in sent.items():
        result = results.get(key, -1)
        if at < 0 or result < 0:
            continue
        sent_at, outcome = writes[at][1][0], writes[result][1]
        row = planned.get(key, -1)
        if row >= 0:
            params = (*writes[row][1], *outcome[:7], sent_at, outcome[7], outcome[8], sent_at, outcome[7])
            done[row] = (_UPSERT_DONE, params)
        else:
            merged.append((_UPDATE_SENT_RESULT, (*outcome[:7], sent_at, *outcome[7:])))
        dropped.update((at, result))
    if not dropped:
        return writes
    out: list[tuple[str, Sequence[Any]]] = []
    for i, write in enumerate(writes):
        if i == first:
            out += merged
        if i in done:
            out.append(
                done[i]
            )  # in its planned row's place: batches are inserted (their rowids) in plan order
        elif i not in dropped:
            out.append(write)
    return out


def new_run_id(now: float | None = None) -> str:
    """A sortable, unique run ID: UTC timestamp plus a random suffix (``20261124T213000Z-3f9a``)."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(2)}"


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One run as listed by ``pushsync runs``."""

    run_id: str
    job: str
    platform: str | None
    started_at: float
    finished_at: float | None
    status: str
    exit_code: int | None
    message: str | None
    batches: int
    batches_by_status: dict[str, int]
    summary: dict[str, Any] | None
    full_refresh: bool = False
    """The run was started with ``--full-refresh`` (or resumed one that was)."""
    origin: str | None = None
    """The run this one resumed or retried (None: a fresh plan, or a ledger older than schema 6)."""
    origin_mode: str | None = None
    """``resume`` or ``retry`` (:class:`sync.planning.resume.ReplayMode`), with :attr:`origin`."""
    destination: str | None = None
    """Where the run sent (:attr:`sync.config.Destination.key`); None: recorded by an older pushsync."""


@dataclass(frozen=True, slots=True)
class BatchRow:
    """One batch as stored."""

    batch_id: str
    endpoint: str
    operation: str
    phase: int
    n_ids: int
    status: BatchStatus
    attempts: int
    http_status: int | None
    code: str | None
    message: str | None
    ok_ids: int
    rejected_ids: int


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One HTTP attempt as stored: the :class:`sync.records.Attempt` fields plus when it was sent (Unix time)."""

    batch_id: str
    endpoint: str
    attempt: int
    n_ids: int
    latency: float
    outcome: AttemptOutcome
    http_status: int | None
    message: str | None
    started_at: float

    @classmethod
    def of(cls, row: Sequence[Any]) -> AttemptRow:
        """From ``batch_id, endpoint, attempt, n_ids, latency, outcome, http_status, message, started_at``."""
        return cls(
            batch_id=row[0],
            endpoint=row[1],
            attempt=row[2],
            n_ids=row[3],
            latency=row[4],
            outcome=AttemptOutcome(row[5]),
            http_status=row[6],
            message=row[7],
            started_at=row[8],
        )


def batch_row_of(row: Sequence[Any]) -> BatchRow:
    """A :class:`BatchRow` from ``batch_id, endpoint, operation, phase, n_ids, status, attempts, http_status, code,
    message, ok_ids, rejected_ids`` (the columns both ledgers select)."""
    return BatchRow(
        batch_id=row[0],
        endpoint=row[1],
        operation=row[2],
        phase=row[3],
        n_ids=row[4],
        status=BatchStatus(row[5]),
        attempts=row[6],
        http_status=row[7],
        code=row[8],
        message=row[9],
        ok_ids=row[10],
        rejected_ids=row[11],
    )


def run_info_of(row: Sequence[Any], counts: dict[str, int]) -> RunInfo:
    """A :class:`RunInfo` from the :data:`RUN_COLUMNS` of a run and its batches counted by status."""
    run_id, job, _path, platform, started, finished, status, exit_code, message, summary, full = row[:11]
    origin, origin_mode, destination = row[11:14]
    return RunInfo(
        run_id=run_id,
        job=job,
        platform=platform,
        started_at=started,
        finished_at=finished,
        status=status,
        exit_code=exit_code,
        message=message,
        batches=sum(counts.values()),
        batches_by_status=counts,
        summary=json.loads(summary) if summary else None,
        full_refresh=bool(full),
        origin=origin,
        origin_mode=origin_mode,
        destination=destination,
    )


# -- row builders: the parameters of each ledger write, shared by the SQLite ledger and the PostgreSQL one
# (sync.coordination.ledger), which differ only in their SQL dialect. Each returns the parameters in the order of
# the matching statement's placeholders.


def sent_row(run_id: str, batch_id: str) -> tuple[Any, ...]:
    """``sent``: (now, run, batch) — for ``UPDATE … SET status = 'sent', started_at = COALESCE(started_at, ?)``."""
    return (time.time(), run_id, batch_id)


def result_row(run_id: str, result: BatchResult) -> tuple[Any, ...]:
    """A batch's final outcome: status, attempts, HTTP status, code, message, IDs ok, IDs refused, started,
    finished, then the key (run, batch)."""
    return (
        str(result.status),
        result.attempts,
        result.http_status,
        None if result.code is None else str(result.code),
        result.message or None,
        result.ok_ids,
        len(result.rejected),
        result.started_at or None,
        result.finished_at or time.time(),
        run_id,
        result.batch_id,
    )


def refused_rows(run_id: str, result: BatchResult) -> list[tuple[Any, ...]]:
    """One row per ID the platform refused: run, batch, ext ID, code, message, and the input row it came from."""
    out = []
    for rej in result.rejected:
        origin = rej.origin
        out.append(
            (
                run_id,
                result.batch_id,
                rej.ext_id,
                None if rej.code is None else str(rej.code),
                rej.message,
                origin.path if origin else None,
                origin.row if origin else None,
            )
        )
    return out


def attempt_row(run_id: str, attempt: Attempt, started_at: float) -> tuple[Any, ...]:
    """One HTTP attempt: run, batch, endpoint, attempt number, IDs, outcome, HTTP status, message, sent at
    (Unix time), latency."""
    return (
        run_id,
        attempt.batch_id,
        attempt.endpoint,
        attempt.attempt,
        attempt.n_ids,
        str(attempt.outcome),
        attempt.http_status,
        attempt.message or None,
        started_at,
        attempt.latency,
    )


def rejected_row(run_id: str, row: RejectedRow) -> tuple[Any, ...]:
    """A row validation refused: run, file, row, column, reason, ext ID."""
    return (run_id, row.path, row.row, row.column, row.reason, row.ext_id)


def row_keys_row(run_id: str, batch: Batch) -> tuple[Any, ...]:
    """The input rows a non-idempotent batch carries: run, batch, key scheme, keys (:mod:`sync.planning.row_keys`)."""
    return (run_id, batch.batch_id, ROW_KEY_SCHEME, batch.row_keys)


CONFIRMED_PART = "+ok"
"""Suffix of the ``batch_rows`` entry holding the rows of a failed batch's parts the platform confirmed
(:attr:`sync.records.BatchResult.confirmed_rows`): ``<batch_id>+ok``, with no ``batches`` row of its own."""


def confirmed_rows_row(run_id: str, result: BatchResult) -> tuple[Any, ...]:
    """The ``batch_rows`` entry of :attr:`sync.records.BatchResult.confirmed_rows` (read back as confirmed)."""
    return (run_id, result.batch_id + CONFIRMED_PART, ROW_KEY_SCHEME, result.confirmed_rows)


def finish_row(
    run_id: str, *, status: str, exit_code: int, message: str | None, summary: Any
) -> tuple[Any, ...]:
    """How a run ended: finished at, status, exit code, message, summary (JSON text), then the run."""
    return (time.time(), status, exit_code, message, None if summary is None else json.dumps(summary), run_id)


class RunLedger(Protocol):
    """What a run records and reads back, whichever database holds it: the SQLite :class:`Ledger` and the
    PostgreSQL :class:`sync.coordination.ledger.PgLedger` both satisfy it. The dispatcher writes through it
    (synchronously, between two awaits); resume, retry and the ledger commands read through it."""

    path: Any
    """Where the ledger lives, for messages: a file path, or ``user@host:port/db`` (never a URL)."""

    def flush(self) -> None: ...
    def maybe_flush(self) -> None: ...
    async def flush_async(self) -> None: ...
    async def maybe_flush_async(self) -> None: ...
    def sending(self) -> AbstractContextManager[None]: ...
    def close(self) -> None: ...
    def start_run(
        self,
        run_id: str,
        *,
        job: str,
        job_path: str | None = None,
        platform: str | None = None,
        full_refresh: bool = False,
        origin: str | None = None,
        origin_mode: str | None = None,
        destination: str | None = None,
    ) -> None: ...
    def finish_run(
        self, run_id: str, *, status: str, exit_code: int, message: str | None = None, summary: Any = None
    ) -> None: ...
    def record_planned(self, run_id: str, batch: Batch) -> None: ...
    def record_sent(self, run_id: str, batch_id: str) -> None: ...
    def record_result(self, run_id: str, result: BatchResult, *, origins: Any = None) -> None: ...
    def record_attempt(self, run_id: str, attempt: Attempt, *, started_at: float) -> None: ...
    def record_rejected_rows(self, run_id: str, rows: Iterable[RejectedRow]) -> int: ...
    def runs(self, job: str | None = None) -> list[RunInfo]: ...
    def run(self, run_id: str) -> RunInfo | None: ...
    def batches(self, run_id: str, *, status: BatchStatus | None = None) -> list[BatchRow]: ...
    def confirmed_ok(self, run_id: str) -> set[str]: ...
    def attempts(self, run_id: str) -> list[AttemptRow]: ...
    def batch_rows(self, run_ids: Sequence[str]) -> Iterator[tuple[str, str, str, str, bytes]]: ...
    def refused_ids(self, run_id: str) -> list[tuple[str, str, str | None, str]]: ...
    def answered_ids(self, run_id: str, phase: int) -> list[tuple[str, str, list[str]]]: ...
    def rejected_rows(self, run_id: str) -> list[RejectedRow]: ...
    def export_waits(self, run_id: str | None = None) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class LedgerDialect:
    """What the SQL of the two ledgers (SQLite here, PostgreSQL in :mod:`sync.coordination.ledger`) differs in,
    for the statements :class:`LedgerBase` writes once."""

    mark: str
    """The parameter placeholder: ``?`` (sqlite3) or ``%s`` (psycopg)."""
    tables: str
    """What goes before a table's name: nothing, or the schema and a dot."""
    batch_order: str
    """The column that keeps a run's batches in the order they were planned."""
    row_order: str
    """The column that keeps attempts, refused IDs and rejected rows in the order they were recorded."""


@functools.cache
def _render(dialect: LedgerDialect, template: str) -> str:
    """``template`` in ``dialect``: ``{p}`` a placeholder, ``{t}`` the table prefix, ``{batch_order}`` and
    ``{row_order}`` the ordering columns (rendered once per dialect and statement)."""
    return template.format(
        p=dialect.mark, t=dialect.tables, batch_order=dialect.batch_order, row_order=dialect.row_order
    )


_INSERT_REJECTED_ROW_SQL = "INSERT INTO {t}rejected_rows (run_id, path, row, column_name, reason, ext_id) VALUES ({p}, {p}, {p}, {p}, {p}, {p})"
_RUNS_SQL = f"SELECT {RUN_COLUMNS} FROM {{t}}runs"
_RUN_SQL = f"SELECT {RUN_COLUMNS} FROM {{t}}runs WHERE run_id = {{p}}"
_RUN_COUNTS_SQL = "SELECT status, COUNT(*) FROM {t}batches WHERE run_id = {p} GROUP BY status"
_BATCHES_SQL = (
    "SELECT batch_id, endpoint, operation, phase, n_ids, status, attempts, http_status, code, message, "
    "ok_ids, rejected_ids FROM {t}batches WHERE run_id = {p}"
)
_CONFIRMED_SQL = "SELECT batch_id FROM {t}batches WHERE run_id = {p} AND status = 'ok'"
_ATTEMPTS_SQL = (
    "SELECT batch_id, endpoint, attempt, n_ids, latency, outcome, http_status, message, started_at "
    "FROM {t}attempts WHERE run_id = {p} ORDER BY {row_order}"
)
_BATCH_ROWS_SQL = (
    "SELECT r.run_id, r.batch_id, b.status, r.scheme, r.row_keys FROM {t}batch_rows r "
    "LEFT JOIN {t}batches b ON b.run_id = r.run_id AND b.batch_id = r.batch_id WHERE r.run_id = {p}"
)
_REFUSED_SQL = (
    "SELECT batch_id, ext_id, code, message FROM {t}batch_ids WHERE run_id = {p} ORDER BY {row_order}"
)
_ANSWERED_IDS_SQL = (
    "SELECT batch_id, status, ext_ids FROM {t}batches WHERE run_id = {p} AND phase = {p} "
    "AND status IN ('ok', 'rejected')"
)
_REJECTED_SQL = "SELECT path, row, column_name, reason, ext_id FROM {t}rejected_rows WHERE run_id = {p} ORDER BY {row_order}"


class _Rows(Protocol):
    """A cursor's answer, as both drivers give it."""

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class LedgerBase:
    """What the SQLite :class:`Ledger` and the PostgreSQL :class:`sync.coordination.ledger.PgLedger` do alike: the
    readers (``runs``, ``show``, resume and retry read through them), the recording of rows refused by
    validation, written once over each ledger's :class:`LedgerDialect`, and closing. A ledger gives its dialect,
    how it runs one statement (:meth:`_execute`: PostgreSQL's reconnects), how it queues a write
    (:meth:`_queue`) and how it commits them (:meth:`flush`)."""

    __slots__ = ()
    _dialect: ClassVar[LedgerDialect]
    _conn: Any  # the ledger's connection (sqlite3's or psycopg's)

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> _Rows:
        raise NotImplementedError

    def _queue(self, sql: str, params: Sequence[Any]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Commit every queued write (each ledger's own)."""
        raise NotImplementedError

    def maybe_flush(self) -> None:
        """Commit the queued writes when they have waited long enough (each ledger's own)."""
        raise NotImplementedError

    async def flush_async(self) -> None:
        """:meth:`flush` for a caller on the event loop, which it may leave running while the ledger waits for its
        database (PostgreSQL's connection made again: :class:`sync.coordination.ledger.PgLedger`). SQLite's
        commit never waits for a server: it is :meth:`flush`."""
        self.flush()

    async def maybe_flush_async(self) -> None:
        """:meth:`maybe_flush`, the same way as :meth:`flush_async`."""
        self.maybe_flush()

    def sending(self) -> AbstractContextManager[None]:
        """Held by the dispatcher while it sends: a ledger that may lose its database connection then leaves
        the waiting for it to :meth:`flush_async` (writes stay queued meanwhile). Nothing for SQLite."""
        return nullcontext()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        # Leaving on an error: what is queued is written if it can be, but a write that fails now (the full
        # disk, or the database that stopped the run) must not replace the error on its way out, which says
        # what happened and sets the exit code (3, "stopped after it began sending", not 2, "nothing was sent").
        try:
            self.flush()
        except StateError:
            pass
        finally:
            self._conn.close()

    def close(self) -> None:
        """Commit what is queued and close (the connection is closed even when that last write fails)."""
        try:
            self.flush()
        finally:
            self._conn.close()

    def _sql(self, template: str) -> str:
        return _render(self._dialect, template)

    def record_rejected_rows(self, run_id: str, rows: Iterable[RejectedRow]) -> int:
        """Record rows refused by validation; returns how many."""
        sql = self._sql(_INSERT_REJECTED_ROW_SQL)
        n = 0
        for row in rows:
            self._queue(sql, rejected_row(run_id, row))
            n += 1
        return n

    def runs(self, job: str | None = None) -> list[RunInfo]:
        """Runs, newest first (optionally of one job)."""
        sql = self._sql(_RUNS_SQL) + (f" WHERE job = {self._dialect.mark}" if job else "")
        rows = self._execute(sql + " ORDER BY started_at DESC", (job,) if job else ()).fetchall()
        return [self._run_info(r) for r in rows]

    def run(self, run_id: str) -> RunInfo | None:
        """One run, or None when the ledger has no run ``run_id``."""
        row = self._execute(self._sql(_RUN_SQL), (run_id,)).fetchone()
        return None if row is None else self._run_info(row)

    def _run_info(self, row: Sequence[Any]) -> RunInfo:
        counts = dict(self._execute(self._sql(_RUN_COUNTS_SQL), (row[0],)).fetchall())
        return run_info_of(row, counts)

    def batches(self, run_id: str, *, status: BatchStatus | None = None) -> list[BatchRow]:
        """The batches of ``run_id`` (of one status), in the order they were planned."""
        sql = self._sql(_BATCHES_SQL)
        params: tuple[Any, ...] = (run_id,)
        if status is not None:
            sql += f" AND status = {self._dialect.mark}"
            params += (str(status),)
        rows = self._execute(f"{sql} ORDER BY {self._dialect.batch_order}", params).fetchall()
        return [batch_row_of(r) for r in rows]

    def confirmed_ok(self, run_id: str) -> set[str]:
        """Batch IDs of ``run_id`` the platform confirmed (status ok): what resume must not send again."""
        return {r[0] for r in self._execute(self._sql(_CONFIRMED_SQL), (run_id,))}

    def attempts(self, run_id: str) -> list[AttemptRow]:
        """Every HTTP attempt of ``run_id``, in the order they were recorded (they ended)."""
        rows = self._execute(self._sql(_ATTEMPTS_SQL), (run_id,)).fetchall()
        return [AttemptRow.of(r) for r in rows]

    def batch_rows(self, run_ids: Sequence[str]) -> Iterator[tuple[str, str, str, str, bytes]]:
        """``(run_id, batch_id, status, scheme, row_keys)`` of the keyed batches of ``run_ids``
        (non-idempotent batches planned from input rows; :mod:`sync.planning.row_keys`), and as ``ok`` the rows of
        the parts of a failed batch the platform confirmed (``<batch_id>+ok``, :data:`CONFIRMED_PART`)."""
        sql = self._sql(_BATCH_ROWS_SQL)
        for run_id in run_ids:
            for run, batch, status, scheme, keys in self._execute(sql, (run_id,)):
                if status is None:  # no batch of that ID: only a confirmed part's rows stand alone
                    if not batch.endswith(CONFIRMED_PART):
                        continue
                    status = BatchStatus.OK.value
                yield run, batch, status, scheme, bytes(keys)  # bytes(): psycopg may give a memoryview

    def refused_ids(self, run_id: str) -> list[tuple[str, str, str | None, str]]:
        """(batch_id, ext_id, code, message) of every ID the platform refused in ``run_id``."""
        return list(self._execute(self._sql(_REFUSED_SQL), (run_id,)))  # both drivers give tuples

    def answered_ids(self, run_id: str, phase: int) -> list[tuple[str, str, list[str]]]:
        """``(batch_id, status, external IDs)`` of the batches of ``phase`` the platform answered in ``run_id``
        (``ok`` or ``rejected``; a rejected batch's refused IDs are in :meth:`refused_ids`). Resume and retry
        read the deletions a run made with it (:func:`sync.planning.resume.replay_plan`)."""
        rows = self._execute(self._sql(_ANSWERED_IDS_SQL), (run_id, int(phase))).fetchall()
        # bytes(): psycopg may give a memoryview; PostgreSQL's ledger keeps the IDs as JSON text
        return [(b, str(s), unpack_ids(i if isinstance(i, str) else bytes(i))) for b, s, i in rows]

    def rejected_rows(self, run_id: str) -> list[RejectedRow]:
        """The rows validation refused in ``run_id``, in the order they were recorded."""
        return [RejectedRow(*r) for r in self._execute(self._sql(_REJECTED_SQL), (run_id,))]


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to the SQLite ledger at ``path``; :class:`StateError` if there is none or it is
    unreadable.

    SQLite reads a write-ahead-log database through a ``-shm`` file it creates beside it, so ``mode=ro`` fails in
    a folder we may not write (a ledger on a read-only mount, or another user's). There, with no log left
    beside the file (a run that ended checkpoints and removes it), the file holds every commit and is opened
    ``immutable``; with a log present a run may be writing, or died with commits only in the log: refused,
    naming the way out, rather than showing a stale ledger."""
    if not path.exists():
        raise StateError(f"{path}: no ledger there")
    uri = path.resolve().as_uri()
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)  # opens lazily: no error here
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("SELECT 1 FROM runs LIMIT 1")
        return conn
    except sqlite3.DatabaseError as exc:
        conn.close()  # an unclosed connection is a ResourceWarning, an error under our pytest settings
        if os.access(path.resolve().parent, os.W_OK) or not _read_only_folder_error(exc):
            raise StateError(f"{path}: cannot read the ledger: {exc}") from exc
    log = path.with_name(path.name + "-wal")
    if log.exists() and log.stat().st_size:
        raise StateError(
            f"{path}: cannot read the ledger: its folder is read-only and its write-ahead log ({log.name}) holds "
            "commits not in the file yet; copy the ledger with its -wal file to a writable folder"
        )
    try:
        conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        conn.execute("SELECT 1 FROM runs LIMIT 1")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StateError(f"{path}: cannot read the ledger: {exc}") from exc
    return conn


def _refuse_an_emptied_ledger(path: Path) -> None:
    """:class:`StateError` if ``path`` is a ledger file of 0 bytes with no write-ahead log holding its commits.

    SQLite takes an empty file for a new database, so a ledger truncated to nothing (``: > ledger.sqlite``, a
    copy or restore that failed on a full disk) would open as a fresh one: the next run would not know which
    runs died or what they confirmed, and would send everything again — events and pushes a second time. A
    ledger this code creates has its header written when it is opened (the WAL switch), before any run is
    recorded, so 0 bytes is damage (or, rarely, a first run killed in the instant between creating the file and
    that switch: nothing was recorded or sent then); removing the file is how a user starts a new ledger on
    purpose."""
    try:
        if not path.is_file() or path.stat().st_size:
            return
        log = path.with_name(path.name + "-wal")
        if log.is_file() and log.stat().st_size:
            return  # the log holds the pages: SQLite recovers them
    except OSError:
        return  # unreadable: the connection below reports it
    raise StateError(
        f"{path}: the ledger file is empty (0 bytes): it was truncated or a copy of it failed. A new ledger "
        "would forget which runs confirmed what and send everything again; restore it from a backup, or delete "
        f"the file (and {running_marker(path).name}, if there is one) to start a new ledger on purpose"
    )


def running_marker(path: Path) -> Path:
    """``<ledger>.running``: the ID of the run under way, written beside the ledger when the run is recorded and
    removed when its end is. Outside the ledger on purpose: it survives what the ledger may lose."""
    return path.with_name(path.name + ".running")


def _refuse_a_ledger_that_lost_its_run(conn: sqlite3.Connection, path: Path) -> None:
    """:class:`StateError` when the marker names a run this ledger does not hold.

    A run killed with its records still in the write-ahead log (``ledger.sqlite-wal``: SQLite folds it into the
    file later) lost them when only ``ledger.sqlite`` was kept — a copy or restore of the one file, a clean-up of
    "temporary" files — or when the ledger was replaced by an older copy: the next run knew of no died run and
    sent everything again, events and pushes a second time."""
    marker = running_marker(path)
    try:
        run_id = marker.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return  # no marker (the usual case), or unreadable: nothing to check against
    if not run_id or conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is not None:
        return
    conn.close()
    raise StateError(
        f"{path}: run {run_id} was recorded in this ledger when it began ({marker}), but the ledger does not "
        f"hold it: it was replaced or restored without its write-ahead log ({path.name}-wal). Restore the ledger's "
        f"files together; or delete {marker} to go on without that run's records (what it confirmed, its events "
        "and pushes too, may then be sent again)"
    )


def _read_only_folder_error(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc)
    return "readonly" in text or "unable to open" in text


class Ledger(LedgerBase):
    """A job's ledger. Open with :meth:`open`; use as a context manager or call :meth:`close`."""

    __slots__ = ("_conn", "_flush_every", "_flush_interval", "_last_flush", "_pending", "path", "writes")
    _dialect = LedgerDialect(mark="?", tables="", batch_order="rowid", row_order="rowid")

    def __init__(
        self, conn: sqlite3.Connection, path: Path, *, flush_every: int, flush_interval: float
    ) -> None:
        self._conn: sqlite3.Connection = conn
        self.path: Path = path
        self._pending: list[tuple[str, Sequence[Any]]] = []  # statements queued for the next transaction
        self._flush_every: int = flush_every  # commit once this many writes are queued
        self._flush_interval: float = flush_interval  # ...or when the oldest queued write is this old
        self._last_flush: float = time.monotonic()
        self.writes: int = 0  # writes committed, as queued (a sent mark folded into its result counts too)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        flush_every: int = 256,
        flush_interval: float = 0.05,
        read_only: bool = False,
    ) -> Ledger:
        """Open (creating if needed) the ledger at ``path``; refuses a ledger from a newer pushsync.

        ``read_only`` (``runs``, ``show``, ``ledger-export``): an existing ledger, read through
        :func:`connect_read_only` — also from a folder we may not write (a read-only mount)."""
        path = Path(path)
        _refuse_an_emptied_ledger(path)
        if read_only:
            conn = connect_read_only(path)
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is not None and row[0] == SCHEMA_VERSION:
                return cls(conn, path, flush_every=flush_every, flush_interval=flush_interval)
            conn.close()
            if row is not None and row[0] < SCHEMA_VERSION and not os.access(path.resolve().parent, os.W_OK):
                raise StateError(
                    f"{path}: ledger schema {row[0]} is older than this pushsync's ({SCHEMA_VERSION}) and its "
                    "folder is read-only: open it once where it can be upgraded (any command with write access)"
                )
            # An older ledger is upgraded first, as every command does; a newer one is refused below.
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                conn.close()
                raise StateError(
                    f"{path}: ledger schema {row[0]} is newer than this pushsync ({SCHEMA_VERSION})"
                )
            elif row[0] < SCHEMA_VERSION:
                _upgrade(conn)
            _refuse_a_ledger_that_lost_its_run(conn, path)
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{path}: cannot open the ledger: {exc}") from exc
        return cls(conn, path, flush_every=flush_every, flush_interval=flush_interval)

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """One statement on the ledger's connection (the readers of :class:`LedgerBase` read through it)."""
        return self._conn.execute(sql, params)

    # -- writing -----------------------------------------------------------------------------------------

    def _queue(self, sql: str, params: Sequence[Any]) -> None:
        self._pending.append((sql, params))
        if len(self._pending) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        """Commit every queued write in one transaction."""
        if not self._pending:
            self._last_flush = time.monotonic()
            return
        pending, self._pending = self._pending, []
        try:
            with self._transaction() as cur:
                # One executemany per statement: the writes are put in the order of a batch's state machine
                # (stable, so each kind keeps its own order), then each run of one statement goes in one call.
                pending.sort(key=_rank)
                for sql, group in itertools.groupby(_fold_sent(pending), key=itemgetter(0)):
                    cur.executemany(sql, [params for _sql, params in group])
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.path}: cannot write the ledger: {exc}") from exc
        self.writes += len(pending)
        self._last_flush = time.monotonic()

    def maybe_flush(self) -> None:
        """Flush when the oldest queued write has waited ``flush_interval`` seconds (call it often)."""
        if self._pending and time.monotonic() - self._last_flush >= self._flush_interval:
            self.flush()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    def start_run(
        self,
        run_id: str,
        *,
        job: str,
        job_path: str | None = None,
        platform: str | None = None,
        full_refresh: bool = False,
        origin: str | None = None,
        origin_mode: str | None = None,
        destination: str | None = None,
    ) -> None:
        """Record a new run (committed at once: ``pushsync runs`` shows it while it runs); ``full_refresh`` is
        kept so that resuming the run, should it not finish, does a full refresh too; ``origin`` (with
        ``origin_mode``) is the run it resumes or retries, so that resuming *it* counts what that one confirmed
        (:func:`sync.planning.resume.replay_plan`); ``destination`` where it sends."""
        self._queue(
            _INSERT_RUN,
            (
                run_id,
                job,
                job_path,
                platform,
                time.time(),
                int(full_refresh),
                origin,
                origin_mode,
                destination,
            ),
        )
        self.flush()
        # After the commit: a marker names only a run the ledger held. A safety net: the run goes on without it.
        with contextlib.suppress(OSError):
            running_marker(self.path).write_text(run_id + "\n", encoding="utf-8")

    def finish_run(
        self, run_id: str, *, status: str, exit_code: int, message: str | None = None, summary: Any = None
    ) -> None:
        """Record how the run ended, with its summary (JSON-ready), and commit."""
        self._queue(
            "UPDATE runs SET finished_at = ?, status = ?, exit_code = ?, message = ?, summary = ? WHERE run_id = ?",
            finish_row(run_id, status=status, exit_code=exit_code, message=message, summary=summary),
        )
        self.flush()
        marker = running_marker(self.path)
        try:
            if marker.read_text(encoding="utf-8").strip() == run_id:
                marker.unlink()
        except (OSError, UnicodeDecodeError):
            pass  # none (an older run's end, another run's marker): nothing to remove

    def record_planned(self, run_id: str, batch: Batch) -> None:
        self._queue(
            _INSERT_PLANNED,
            (
                run_id,
                batch.batch_id,
                batch.endpoint,
                str(batch.operation),
                int(batch.phase),
                len(batch.ext_ids),
                pack_ids(batch.ext_ids),
                time.time(),
            ),
        )

        if batch.row_keys:
            # Queued with the planned row, so the flush that makes a non-idempotent batch ``sent`` before its
            # request leaves also makes the rows it carries durable.
            self._queue(_INSERT_ROW_KEYS, row_keys_row(run_id, batch))

    def record_sent(self, run_id: str, batch_id: str) -> None:
        self._queue(_UPDATE_SENT, sent_row(run_id, batch_id))

    def record_result(self, run_id: str, result: BatchResult, *, origins: Any = None) -> None:
        """Record a batch's final outcome, each ID the platform refused, and the rows of its confirmed parts."""
        self._queue(_UPDATE_RESULT, result_row(run_id, result))
        if result.rejected:
            for params in refused_rows(run_id, result):
                self._queue(_INSERT_REFUSED, params)
        if result.confirmed_rows:
            self._queue(_INSERT_ROW_KEYS, confirmed_rows_row(run_id, result))

    def record_attempt(self, run_id: str, attempt: Attempt, *, started_at: float) -> None:
        """Record one HTTP attempt (``started_at``: Unix time it was sent)."""
        self._queue(_INSERT_ATTEMPT, attempt_row(run_id, attempt, started_at))

    def record_export_wait(self, run_id: str, wait: ExportWait, *, platform: str = "meiro") -> None:
        """Record how a wait for a platform export ended, with its message counts, and commit at once
        (waits are few and long: each is kept the moment it ends)."""
        counts = wait.message_counts
        self._queue(
            _INSERT_EXPORT_WAIT,
            (
                run_id,
                platform,
                wait.notification_id,
                wait.export_id,
                wait.export_name or None,
                str(wait.outcome),
                None if wait.status is None else str(wait.status),
                counts.total,
                counts.sent,
                counts.excluded_invalid,
                counts.excluded_by_frequency_cap,
                wait.polls,
                wait.retries,
                wait.started_at,
                wait.finished_at,
                json.dumps(dict(wait.statuses_history)),
                wait.message or None,
            ),
        )
        self.flush()

    def export_waits(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Recorded export waits (of one run, or all), oldest first, as JSON-ready dicts."""
        sql = "SELECT * FROM export_waits" + (" WHERE run_id = ?" if run_id else "") + " ORDER BY rowid"
        cur = self._conn.execute(sql, (run_id,) if run_id else ())
        names = [d[0] for d in cur.description]
        out = []
        for row in cur.fetchall():
            item = dict(zip(names, row, strict=True))
            item["statuses_history"] = json.loads(item["statuses_history"] or "{}")
            out.append(item)
        return out

    def export(
        self,
        run_id: str,
        out: str | Path,
        *,
        table: Literal["batches", "attempts", "refused-ids", "rejected-rows"] = "batches",
        fmt: Literal["parquet", "csv"] = "parquet",
    ) -> int:
        """Write one table of a run to Parquet or CSV for analysis; returns the number of rows written. Read and
        written a slice at a time (:mod:`sync.ledger.ledger_export`): a run of tens of thousands of batches is
        never held whole."""
        from sync.ledger.ledger_export import export_table

        if self.run(run_id) is None:
            raise StateError(f"no run {run_id} in {self.path}")
        return export_table(self._conn, run_id, Path(out), table, fmt, unpack_ids)


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a ledger of an older schema to :data:`SCHEMA_VERSION`, in one transaction (a failure leaves it as it
    was). Versions 1 and 2 lack ``runs.full_refresh`` (a development ledger of version 3 may too: it is looked
    up, not assumed); versions up to 5 lack ``runs.origin``, ``origin_mode`` and ``destination`` (NULL for
    their runs: no origin recorded, any destination); versions up to 4 hold each batch's IDs as a JSON array,
    packed here once. The other changes only added tables (created before this runs)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
        if "full_refresh" not in columns:
            conn.execute("ALTER TABLE runs ADD COLUMN full_refresh INTEGER NOT NULL DEFAULT 0")
        for column in ("origin", "origin_mode", "destination"):
            if column not in columns:
                conn.execute(f"ALTER TABLE runs ADD COLUMN {column} TEXT")
        # SQLite keeps a blob as a blob in a column declared TEXT, so the packed IDs go in place.
        conn.create_function("pushsync_pack_ids", 1, lambda text: pack_ids(unpack_ids(text)))
        conn.execute("UPDATE batches SET ext_ids = pushsync_pack_ids(ext_ids) WHERE typeof(ext_ids) = 'text'")
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
