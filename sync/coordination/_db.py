"""Connecting to the coordination database: one clear error for a wrong URL, a refused login or a server that
cannot be reached, with the password never in it; the schema created, migrated or refused.

psycopg 3 is the driver (see docs/scaling.md for why not asyncpg): the ledger keeps the synchronous interface
the dispatcher calls between two awaits (:class:`sync.ledger.ledger.Ledger`), and the queue and the shared budgets are
asynchronous — psycopg offers both with one API, one set of types and one error hierarchy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import psycopg

from sync.coordination._urls import CoordinationError, check_url, describe_url, register_url, safe_message
from sync.dispatch._rate_meter import _SLACK

__all__ = [
    "RECONNECT_FOR",
    "SCHEMA",
    "SCHEMA_VERSION",
    "CoordinationError",
    "Link",
    "async_connect",
    "backoff",
    "connect",
    "describe_url",
    "ensure_schema",
    "lost_connection",
    "safe_message",
]

T = TypeVar("T")

SCHEMA = "pushsync"
"""The PostgreSQL schema holding pushsync's tables (created when missing)."""

SCHEMA_VERSION = 3
"""1: runs, batches (the ledger and the queue in one table), attempts, batch_ids, rejected_rows, batch_rows,
workers, budgets. 2: + lanes (the run's lanes, listed before any batch is queued, each marked once every batch
of it is: workers send while the leader plans), runs.listed, batches.claim_no (a claim whose answer a lost
connection swallowed is found again). 3: + budgets.anchor, and ``take_slot`` places an aligned budget's slots
from it as one process does: the slots a stalled worker missed are caught up inside their window (an older
worker's ``take_slot`` would not, so it is refused)."""

RECONNECT_FOR = 30.0
"""Seconds a worker keeps trying to connect again after losing the coordination database (a restart, a
failover) before it stops; read when a connection is made, so a test may lower it."""

CONNECT_TIMEOUT = 10
"""Seconds a connection attempt may take before the server counts as unreachable."""


def _failure(url: str, exc: BaseException) -> CoordinationError:
    where = describe_url(url)
    message = safe_message(exc)
    lowered = message.lower()
    if "password" in lowered or "authentication" in lowered or "role" in lowered:
        hint = "the user or password is wrong: check the URL's credentials"
    elif "does not exist" in lowered:
        hint = "the database does not exist: create it (CREATE DATABASE) or fix the URL"
    else:
        hint = "the server cannot be reached: check host, port and that PostgreSQL is running"
    error = CoordinationError(f"coordination database {where}: {hint} ({message})")
    error.detail = message
    return error


def _kwargs() -> dict[str, Any]:
    return {"connect_timeout": CONNECT_TIMEOUT, "application_name": "pushsync"}


def connect(url: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """A synchronous connection, or :class:`CoordinationError`."""
    check_url(url)
    register_url(url)
    try:
        return psycopg.connect(url, autocommit=autocommit, **_kwargs())
    except (psycopg.Error, ValueError) as exc:
        raise _failure(url, exc) from None


async def async_connect(url: str, *, autocommit: bool = True) -> psycopg.AsyncConnection[Any]:
    """An asynchronous connection, or :class:`CoordinationError`."""
    check_url(url)
    register_url(url)
    try:
        return await psycopg.AsyncConnection.connect(url, autocommit=autocommit, **_kwargs())
    except (psycopg.Error, ValueError) as exc:
        raise _failure(url, exc) from None


_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS {SCHEMA}.runs (
    run_id       TEXT PRIMARY KEY,
    job          TEXT NOT NULL,
    job_path     TEXT,
    platform     TEXT,
    started_at   DOUBLE PRECISION NOT NULL,
    finished_at  DOUBLE PRECISION,
    status       TEXT NOT NULL,
    exit_code    INTEGER,
    message      TEXT,
    summary      TEXT,
    full_refresh BOOLEAN NOT NULL DEFAULT FALSE,
    planned      BOOLEAN NOT NULL DEFAULT FALSE,   -- planning done: every batch queued, the input's counts kept
    planned_info TEXT,                             -- JSON: rows read/rejected, expected requests (the summary's input)
    origin       TEXT,                             -- the run this one resumes or retries (NULL: a fresh plan)
    origin_mode  TEXT                              -- resume | retry
);
-- One live run per job: a second `pushsync run` of the job joins it.
CREATE UNIQUE INDEX IF NOT EXISTS runs_one_live ON {SCHEMA}.runs (job) WHERE status = 'running';
CREATE TABLE IF NOT EXISTS {SCHEMA}.batches (
    run_id       TEXT NOT NULL REFERENCES {SCHEMA}.runs(run_id),
    batch_id     TEXT NOT NULL,
    seq          BIGSERIAL,
    endpoint     TEXT NOT NULL,
    operation    TEXT NOT NULL,
    phase        INTEGER NOT NULL,
    rank         INTEGER NOT NULL DEFAULT 0,
    after_id     TEXT,
    n_ids        INTEGER NOT NULL,
    ext_ids      TEXT NOT NULL,
    body_json    TEXT,
    body_bytes   BYTEA,
    origins      TEXT,
    status       TEXT NOT NULL,
    held         BOOLEAN NOT NULL DEFAULT FALSE,   -- non-idempotent, sent by a worker that died: outcome unknown
    claimed_by   TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    http_status  INTEGER,
    code         TEXT,
    message      TEXT,
    ok_ids       INTEGER NOT NULL DEFAULT 0,
    rejected_ids INTEGER NOT NULL DEFAULT 0,
    confirmations INTEGER NOT NULL DEFAULT 0,      -- how many times a result was recorded (1 unless a bug)
    planned_at   DOUBLE PRECISION NOT NULL,
    started_at   DOUBLE PRECISION,
    finished_at  DOUBLE PRECISION,
    PRIMARY KEY (run_id, batch_id)
) WITH (fillfactor = 70);
-- No partial predicate on status, and room left in each page: claiming and recording change only columns no
-- index holds, so those updates are HOT (no index entry per update, no dead entries for claims to walk over).
CREATE INDEX IF NOT EXISTS batches_queue ON {SCHEMA}.batches (run_id, phase, endpoint, seq);
-- Version 2. The leader lists every lane of the run (listed) before it queues the first batch, and marks a lane
-- queued once its last batch is: workers claim while the leader still plans, and a lane ends only once queued.
ALTER TABLE {SCHEMA}.runs ADD COLUMN IF NOT EXISTS listed BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE {SCHEMA}.batches ADD COLUMN IF NOT EXISTS claim_no BIGINT;   -- the worker's claim that took it
-- The destination a run sends to (platform-<hash of the base URL>, as its snapshot state is keyed): a worker of
-- the same job name pointed elsewhere (staging and production) must not join it. NULL: started by a pushsync
-- that did not record it (joined as before). Additive: workers of schema version 3 without it keep working.
ALTER TABLE {SCHEMA}.runs ADD COLUMN IF NOT EXISTS destination TEXT;
CREATE TABLE IF NOT EXISTS {SCHEMA}.lanes (
    run_id   TEXT NOT NULL,
    phase    INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    rank     INTEGER NOT NULL DEFAULT 0,
    queued   BOOLEAN NOT NULL DEFAULT FALSE,     -- every batch of the lane is in the queue
    PRIMARY KEY (run_id, phase, endpoint)
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.batch_ids (
    id BIGSERIAL PRIMARY KEY, run_id TEXT NOT NULL, batch_id TEXT NOT NULL, ext_id TEXT NOT NULL, code TEXT,
    message TEXT NOT NULL, origin_path TEXT, origin_row INTEGER
);
CREATE INDEX IF NOT EXISTS batch_ids_run ON {SCHEMA}.batch_ids (run_id);
CREATE TABLE IF NOT EXISTS {SCHEMA}.rejected_rows (
    id BIGSERIAL PRIMARY KEY, run_id TEXT NOT NULL, path TEXT NOT NULL, row INTEGER NOT NULL, column_name TEXT,
    reason TEXT NOT NULL, ext_id TEXT
);
CREATE INDEX IF NOT EXISTS rejected_rows_run ON {SCHEMA}.rejected_rows (run_id);
CREATE TABLE IF NOT EXISTS {SCHEMA}.attempts (
    id BIGSERIAL PRIMARY KEY, run_id TEXT NOT NULL, batch_id TEXT NOT NULL, endpoint TEXT NOT NULL,
    attempt INTEGER NOT NULL, n_ids INTEGER NOT NULL, outcome TEXT NOT NULL, http_status INTEGER, message TEXT,
    started_at DOUBLE PRECISION NOT NULL, latency DOUBLE PRECISION NOT NULL, worker TEXT
);
CREATE INDEX IF NOT EXISTS attempts_run ON {SCHEMA}.attempts (run_id, endpoint);
CREATE TABLE IF NOT EXISTS {SCHEMA}.batch_rows (
    run_id TEXT NOT NULL, batch_id TEXT NOT NULL, scheme TEXT NOT NULL, row_keys BYTEA NOT NULL,
    PRIMARY KEY (run_id, batch_id)
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.workers (
    worker_id   TEXT PRIMARY KEY,
    run_id      TEXT NOT NULL,
    host        TEXT,
    pid         INTEGER,
    started_at  DOUBLE PRECISION NOT NULL,
    heartbeat   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    finished_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS workers_run ON {SCHEMA}.workers (run_id);
CREATE TABLE IF NOT EXISTS {SCHEMA}.budgets (
    scope        TEXT NOT NULL,                    -- the job (budgets of different jobs are separate)
    name         TEXT NOT NULL,                    -- an endpoint or a budget group
    win          BIGINT NOT NULL DEFAULT -1,       -- the clock-aligned window of the last release
    used         INTEGER NOT NULL DEFAULT 0,       -- releases in that window
    last_release DOUBLE PRECISION NOT NULL DEFAULT 0,
    paused_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    releases     BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, name)
);
-- Version 3 (aligned budgets): where the slots of the window of the last release start; that window's releases
-- in the second half of its zone (catching up) whose answer did not come before its edge, each holding a slot of
-- the next window; and the slots of that window held so for the window before's.
ALTER TABLE {SCHEMA}.budgets ADD COLUMN IF NOT EXISTS anchor DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE {SCHEMA}.budgets ADD COLUMN IF NOT EXISTS late INTEGER NOT NULL DEFAULT 0;
ALTER TABLE {SCHEMA}.budgets ADD COLUMN IF NOT EXISTS carried INTEGER NOT NULL DEFAULT 0;

-- One shared-budget acquisition in one round trip (sync.coordination.budget): lock the rows of the endpoint's
-- budget and of its groups (the caller sorts the names: no deadlock), find the earliest instant every one of
-- them allows, record the release in each, return (that instant, the database clock). p_now: the clock to use
-- instead of the database's (tests).
-- Aligned (the rules of one process, sync/dispatch/_rate_meter.py): the k-th release of a window may go from its
-- slot's time on, anchor + k x gap, the N slots filling the first (1 - slack) of the sending zone [start + lead,
-- end - margin); only inside that zone, at most N. A slot whose time has come goes at once, so the slots a
-- stalled worker missed are caught up, several at once, inside their window; never one of the next window
-- early, and a slot the zone's end overtook is gone. The anchor is the zone's start after a busy window (a late
-- first release is caught up), the first release after an idle window or a pause (a run that starts mid-window
-- is evenly spaced), and slots that fell in a pause are not caught up. A release in the second half of the zone
-- (catching up, nearer the edge) holds one slot of the next window until the worker says its answer came
-- before the edge (sync.coordination.budget): the server may have counted it there.
-- Version 2's function (no p_now) goes: a call with its seven arguments would be ambiguous.
DROP FUNCTION IF EXISTS {SCHEMA}.take_slot(
    TEXT, TEXT[], INTEGER[], DOUBLE PRECISION[], BOOLEAN[], DOUBLE PRECISION[], DOUBLE PRECISION[]
);
CREATE OR REPLACE FUNCTION {SCHEMA}.take_slot(
    p_scope TEXT, p_names TEXT[], p_requests INTEGER[], p_periods DOUBLE PRECISION[], p_aligns BOOLEAN[],
    p_margins DOUBLE PRECISION[], p_leads DOUBLE PRECISION[], p_now DOUBLE PRECISION DEFAULT NULL
) RETURNS TABLE (slot_at DOUBLE PRECISION, db_now DOUBLE PRECISION) AS $fn$
#variable_conflict use_column
DECLARE
    n INTEGER := array_length(p_names, 1);
    wins BIGINT[]; useds INTEGER[]; lasts DOUBLE PRECISION[]; pauses DOUBLE PRECISION[]; anchors DOUBLE PRECISION[];
    lates INTEGER[]; carrieds INTEGER[];
    t DOUBLE PRECISION; nxt DOUBLE PRECISION; cand DOUBLE PRECISION; gap DOUBLE PRECISION; a DOUBLE PRECISION;
    w BIGINT; start DOUBLE PRECISION; inwin INTEGER; r RECORD; l INTEGER; c INTEGER;
BEGIN
    db_now := coalesce(p_now, extract(epoch FROM clock_timestamp()));
    FOR i IN 1..n LOOP
        SELECT b.win, b.used, b.last_release, b.paused_until, b.anchor, b.late, b.carried INTO r
            FROM {SCHEMA}.budgets b WHERE b.scope = p_scope AND b.name = p_names[i] FOR UPDATE;
        wins[i] := r.win; useds[i] := r.used; lasts[i] := r.last_release; pauses[i] := r.paused_until;
        anchors[i] := r.anchor; lates[i] := r.late; carrieds[i] := r.carried;
    END LOOP;
    t := db_now;
    FOR k IN 1..16 LOOP                                   -- a common fixed point of every budget's schedule
        nxt := t;
        FOR i IN 1..n LOOP
            cand := greatest(t, pauses[i]);
            IF p_aligns[i] THEN
                gap := greatest(0, p_periods[i] - p_leads[i] - p_margins[i]) * (1 - {_SLACK}) / p_requests[i];
                -- Never before the last release: it may be reserved ahead, in the next window, once this one
                -- is full (a worker asking again before that window must not be given this one's N + 1st).
                cand := greatest(cand, lasts[i]);
                FOR j IN 1..4 LOOP                        -- at most a hop or two: the next window is free
                    w := floor(cand / p_periods[i]);
                    start := w * p_periods[i];
                    IF w = wins[i] THEN
                        inwin := useds[i] + carrieds[i];
                        cand := greatest(cand, anchors[i] + useds[i] * gap);
                    ELSE
                        inwin := CASE WHEN w = wins[i] + 1 THEN lates[i] ELSE 0 END;
                        cand := greatest(cand, start + p_leads[i]);
                    END IF;
                    EXIT WHEN inwin < p_requests[i] AND cand < start + p_periods[i] - p_margins[i];
                    cand := (w + 1) * p_periods[i] + p_leads[i];
                END LOOP;
            ELSE                                          -- N per T + margin, evenly spaced
                gap := (p_periods[i] + p_margins[i]) / p_requests[i];
                IF lasts[i] > 0 THEN cand := greatest(cand, lasts[i] + gap); END IF;
            END IF;
            nxt := greatest(nxt, cand);
        END LOOP;
        EXIT WHEN nxt <= t + 1e-9;
        t := nxt;
    END LOOP;
    FOR i IN 1..n LOOP
        w := wins[i]; a := anchors[i]; l := lates[i]; c := carrieds[i];
        IF p_aligns[i] THEN
            w := floor(t / p_periods[i])::BIGINT;
            gap := greatest(0, p_periods[i] - p_leads[i] - p_margins[i]) * (1 - {_SLACK}) / p_requests[i];
            IF w <> wins[i] THEN
                a := CASE WHEN wins[i] = w - 1 AND pauses[i] <= lasts[i]
                          THEN least(t, w * p_periods[i] + p_leads[i]) ELSE t END;
                c := CASE WHEN w = wins[i] + 1 THEN lates[i] ELSE 0 END;
                l := 0;
            ELSIF pauses[i] > lasts[i] THEN               -- the first release after a pause: no catching up
                a := greatest(a, t - useds[i] * gap);
            END IF;
            IF t >= w * p_periods[i] + p_leads[i] + gap * p_requests[i] THEN  -- the zone's second half
                l := l + 1;
            END IF;
        END IF;
        UPDATE {SCHEMA}.budgets SET used = CASE WHEN win = w THEN used + 1 ELSE 1 END, win = w, last_release = t,
            anchor = a, late = l, carried = c, releases = releases + 1
            WHERE scope = p_scope AND name = p_names[i];
    END LOOP;
    slot_at := t;
    RETURN NEXT;
END
$fn$ LANGUAGE plpgsql;
"""


def ensure_schema(conn: psycopg.Connection[Any], url: str) -> None:
    """Create the tables when missing; refuse a schema written by a newer pushsync, migrate an older one.

    Serialised with an advisory lock, so workers starting together do not race on ``CREATE``."""
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('pushsync.schema'))")
            exists = conn.execute(
                "SELECT 1 FROM information_schema.tables WHERE table_schema = %s AND table_name = 'schema_version'",
                (SCHEMA,),
            ).fetchone()
            found: int | None = None
            if exists:
                row = conn.execute(f"SELECT max(version) FROM {SCHEMA}.schema_version").fetchone()
                found = None if row is None else row[0]
            if found is not None and found > SCHEMA_VERSION:
                raise CoordinationError(
                    f"coordination database {describe_url(url)}: its pushsync schema is version {found}, newer "
                    f"than this pushsync understands ({SCHEMA_VERSION}); upgrade pushsync on every worker"
                )
            conn.execute(_DDL)
            if found is None:
                conn.execute(f"DELETE FROM {SCHEMA}.schema_version")
                conn.execute(f"INSERT INTO {SCHEMA}.schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
            elif found < SCHEMA_VERSION:
                # The DDL above added what is new (IF NOT EXISTS); the runs version 1 planned have every batch
                # queued: list their lanes, queued, so workers of this version can finish them.
                if found < 2:
                    conn.execute(
                        f"INSERT INTO {SCHEMA}.lanes (run_id, phase, endpoint, rank, queued) SELECT b.run_id, "
                        f"b.phase, b.endpoint, min(b.rank), TRUE FROM {SCHEMA}.batches b JOIN {SCHEMA}.runs r "
                        "ON r.run_id = b.run_id WHERE r.planned GROUP BY b.run_id, b.phase, b.endpoint "
                        "ON CONFLICT DO NOTHING"
                    )
                    conn.execute(f"UPDATE {SCHEMA}.runs SET listed = TRUE WHERE planned")
                conn.execute(f"UPDATE {SCHEMA}.schema_version SET version = %s", (SCHEMA_VERSION,))
    except CoordinationError:
        raise
    except psycopg.Error as exc:
        raise CoordinationError(
            f"coordination database {describe_url(url)}: cannot create or check pushsync's tables "
            f"({safe_message(exc)}); the user needs CREATE on the database"
        ) from None


# -- losing the connection mid-run -----------------------------------------------------------------------------


def backoff(first: float = 0.2, most: float = 2.0) -> Iterator[float]:
    """The waits between attempts to connect again: doubling from ``first`` up to ``most``."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, most)


def lost_connection(where: str, what: str, seconds: float, exc: BaseException) -> CoordinationError:
    """The error once the database stayed away past the bound (the password never in it)."""
    return CoordinationError(
        f"coordination database {where}: the connection for {what} was lost and could not be made again within "
        f"{seconds:g} s ({getattr(exc, 'detail', None) or safe_message(exc)})"
    )


def _is_lost(conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any], exc: psycopg.Error) -> bool:
    """Whether ``exc`` means the connection is gone (the server restarted, the network dropped), not that
    the statement was wrong."""
    if conn.closed or conn.broken:
        return True
    # A statement cancelled (the role's or the database's statement_timeout, a DBA's pg_cancel_backend) on a
    # connection that is fine is an OperationalError too; taken for a loss, it was repeated on a new connection
    # and cancelled again, forever.
    return isinstance(exc, psycopg.OperationalError) and not isinstance(exc, psycopg.errors.QueryCanceled)


class Link:
    """One asynchronous connection of a worker (claims, budget slots, heartbeats), made again when lost.

    :meth:`run` runs a unit of work on the connection, one at a time (psycopg allows one statement at a time
    per connection). When the connection turns out lost — PostgreSQL restarted, a failover, a dropped network —
    it connects again, waiting :func:`backoff` between attempts for ``reconnect_for`` seconds at most, then runs
    ``again`` (the work itself unless given: the work must be safe to repeat, or say how to finish what a lost
    answer left unknown). Past the bound: :class:`CoordinationError` naming the database, never the password.
    ``clock`` and ``sleep`` are injectable, so tests need not wait."""

    __slots__ = (
        "_clock",
        "_conn",
        "_lock",
        "_reconnect_for",
        "_sleep",
        "_url",
        "generation",
        "what",
        "where",
    )

    def __init__(
        self,
        url: str,
        conn: psycopg.AsyncConnection[Any],
        *,
        what: str,
        reconnect_for: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self._url = url
        self._conn = conn
        self.what = what
        """What the connection is for, in messages (``claims``, ``budget slots``, ``heartbeats``)."""
        self.where = describe_url(url)
        self._reconnect_for = RECONNECT_FOR if reconnect_for is None else reconnect_for
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()  # one unit of work at a time on the connection
        self.generation = 0
        """How many times the connection was made again."""

    @classmethod
    async def open(cls, url: str, *, what: str, **options: Any) -> Link:
        """Connect (one clear :class:`CoordinationError` when that fails) and wrap the connection."""
        return cls(url, await async_connect(url), what=what, **options)

    @property
    def conn(self) -> psycopg.AsyncConnection[Any]:
        """The current connection (a new one after a reconnection)."""
        return self._conn

    async def run(
        self,
        work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
        *,
        again: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]] | None = None,
    ) -> T:
        """``work(connection)``; on a lost connection, connect again and run ``again`` (else ``work``) once
        more. Other database errors are raised as they are (the caller says what failed)."""
        async with self._lock:
            step = work
            deadline: float | None = None  # the bound runs from the first loss
            while True:
                try:
                    return await step(self._conn)
                except psycopg.Error as exc:
                    if not _is_lost(self._conn, exc):
                        raise
                    if deadline is None:
                        deadline = self._clock() + self._reconnect_for
                    await self._reconnect(exc, deadline)
                step = again or work

    async def _reconnect(self, cause: BaseException, deadline: float) -> None:
        last: BaseException = cause
        with contextlib.suppress(psycopg.Error, OSError):
            await self._conn.close()
        for delay in backoff():
            try:
                self._conn = await async_connect(self._url)
                self.generation += 1
                return
            except CoordinationError as exc:
                last = exc
            if self._clock() + delay > deadline:
                raise lost_connection(self.where, self.what, self._reconnect_for, last) from None
            await self._sleep(delay)

    async def close(self) -> None:
        """Close the connection."""
        await self._conn.close()
