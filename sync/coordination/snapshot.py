"""Snapshot mode on PostgreSQL: the confirmed state, the runs' pending deltas and their batch maps in the
coordination database, so that workers on several machines share them (docs/scaling.md, docs/sync.md).

* **The state** (:class:`PgStateBackend`, a :class:`sync.state._store.StateBackend`): per job, destination and
  source, a head row (``state_heads``: the base's *generation*, the next segment's number, the user count) and
  Parquet chunks of at most :data:`sync.state.ROW_GROUP_ROWS` rows (``state_chunks``: segment 0 is the base,
  1, 2 … the overlay segments), each with the smallest and largest key it holds — a read of one key range
  fetches only the chunks that overlap it, as the file backend's row-group statistics skip the rest. Writing a
  segment or a new base (a compaction: the next generation, the old one deleted) is one transaction that locks
  the head row, so a reader sees it whole or not at all, and two writes never interleave. The read-diff and
  the commit of one job hold the job's state lock (an advisory lock, :meth:`PgStateBackend.lock`).
* **The pending delta** of a run (``snapshot_pending``: the files the diff wrote, uploaded in one transaction
  before any batch is queued) and its **batch map** (``snapshot_batches``: one line per batch, written before
  the batch enters the queue), so that whichever worker finishes the run can merge what was confirmed.
* **The run**: the leader (:func:`plan_snapshot`) merges the pending deltas of the job's ended runs, diffs the
  export against the state, uploads the delta and queues its batches; every worker sends; the worker that finds
  every batch finished merges the confirmed changes (:func:`commit_when_finished`), under the state lock and
  before the run is recorded as ended. A crash between sending and that commit leaves the delta pending: the
  run stays live and the next ``pushsync run`` joins it and commits, or — when the run ended otherwise — the
  next run's leader merges it first, exactly as :func:`sync.state.recover` does for a SQLite run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sync.config import Job, SourceKind
from sync.coordination._db import (
    SCHEMA,
    CoordinationError,
    connect,
    describe_url,
    ensure_schema,
    safe_message,
)
from sync.coordination._seams import WorkerOptions, WorkerSignals
from sync.coordination.ledger import PgLedger
from sync.coordination.queue import enqueue
from sync.errors import InterruptedRunError, PushSyncError, RunStoppedError, StateError
from sync.logs import get_logger
from sync.planning.planning import build_plan
from sync.planning.validation import KEY
from sync.records import Batch, Phase
from sync.state import (
    ROW_GROUP_ROWS,
    CommitReport,
    DiffCounts,
    SnapshotDiff,
    SourceDelta,
    StateStore,
    commit,
    compute_diff,
    rejected_users,
    snapshot_builder_for,
    snapshot_streams,
)
from sync.state._delta import _log_entry
from sync.state._store import READ_ERRORS, Bounds, Manifest, another_accounts_state, filtered

__all__ = [
    "STATE_LOCK_WAIT",
    "PgStateBackend",
    "account_job",
    "commit_when_finished",
    "ensure_snapshot_tables",
    "import_workdir_state",
    "move_state_scope",
    "other_account_scopes",
    "pending_runs",
    "pg_state_store",
    "plan_snapshot",
    "snapshot_counts",
    "state_scope",
]

S = SCHEMA
STATE_LOCK_WAIT = 900.0
"""Seconds a worker waits for the job's state lock (another worker diffing or committing a large state)."""
_LOCK_POLL = 0.2
_MAP_CHUNK = 200
"""Batches whose map lines are written in one statement, before any of them is handed to the queue."""
_BATCH_MAP = "batches.jsonl"
_COUNTS = "counts.json"

_DDL = f"""
CREATE TABLE IF NOT EXISTS {S}.state_heads (
    scope        TEXT NOT NULL,                -- job/platform-destination hash (sync.coordination.snapshot.state_scope)
    source       TEXT NOT NULL,
    generation   BIGINT NOT NULL,              -- the base's: a compaction writes the next one
    users        BIGINT NOT NULL,              -- users in the state (base and overlay)
    base_rows    BIGINT NOT NULL,
    next_segment INTEGER NOT NULL,             -- the number the next overlay segment gets
    updated_at   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (scope, source)
);
CREATE TABLE IF NOT EXISTS {S}.state_chunks (
    scope      TEXT NOT NULL,
    source     TEXT NOT NULL,
    generation BIGINT NOT NULL,
    segment    INTEGER NOT NULL,               -- 0: the base; n > 0: overlay segment n
    chunk      INTEGER NOT NULL,
    key_lo     BIGINT NOT NULL,                -- the smallest and largest __key of its rows
    key_hi     BIGINT NOT NULL,
    rows       INTEGER NOT NULL,
    data       BYTEA NOT NULL,                 -- Parquet
    PRIMARY KEY (scope, source, generation, segment, chunk)
);
CREATE TABLE IF NOT EXISTS {S}.snapshot_pending (
    scope  TEXT NOT NULL,
    run_id TEXT NOT NULL,
    path   TEXT NOT NULL,                      -- a file of the run's delta directory (meta.json, users/00003.parquet)
    data   BYTEA NOT NULL,
    PRIMARY KEY (run_id, path)
);
CREATE INDEX IF NOT EXISTS snapshot_pending_scope ON {S}.snapshot_pending (scope);
-- Parquet is compressed already (zstd): stored out of line as it is, PostgreSQL does not try to compress it again.
ALTER TABLE {S}.state_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
ALTER TABLE {S}.snapshot_pending ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS {S}.snapshot_batches (
    run_id   TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    entry    TEXT NOT NULL,                    -- the batch's line of the delta's batch map (sync.state._delta)
    PRIMARY KEY (run_id, batch_id)
);
"""


_TABLES = ("state_heads", "state_chunks", "snapshot_pending", "snapshot_batches")


def ensure_snapshot_tables(conn: psycopg.Connection[Any], url: str) -> None:
    """Create the snapshot tables when missing (added to schema version 1 in place: a database made by a
    pushsync without snapshot mode gains them on first use), under the schema's advisory lock; the schema
    itself is checked (or created) first, and one written by a newer pushsync refused. Once the tables are
    there, only that is looked up: the schema's own ``CREATE INDEX IF NOT EXISTS`` would wait for the
    workers writing to the queue."""
    try:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s AND table_name = ANY(%s)",
            (SCHEMA, list(_TABLES)),
        ).fetchone()
        if row is not None and int(row[0]) == len(_TABLES):
            return
        ensure_schema(conn, url)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('pushsync.schema'))")
            conn.execute(_DDL)
    except CoordinationError:
        raise
    except psycopg.Error as exc:
        raise CoordinationError(
            f"coordination database {describe_url(url)}: cannot create the snapshot state's tables "
            f"({safe_message(exc)}); the user needs CREATE on the database"
        ) from None


def state_scope(job: Job) -> str:
    """The key of the job's state in the database: the job's name and the destination (a job pointed at a
    sandbox must never believe what it sent there is in production), as the workdir's state directory is named."""
    return f"{job.name}/{job.destination.key}"


@contextlib.contextmanager
def _database(where: str) -> Iterator[None]:
    """psycopg's errors as one :class:`StateError` naming the state (never the URL)."""
    try:
        yield
    except psycopg.Error as exc:
        raise StateError(f"snapshot state {where}: {safe_message(exc)}") from None


class PgStateBackend:
    """The confirmed state of one job and destination in PostgreSQL (see the module docstring).

    ``conn``: a synchronous autocommit connection, used from one thread at a time; ``scope``:
    :func:`state_scope`; ``where``: the database as :func:`sync.coordination._db.describe_url` names it."""

    __slots__ = ("_conn", "lock_wait", "scope", "where")

    def __init__(
        self, conn: psycopg.Connection[Any], scope: str, where: str, *, lock_wait: float = STATE_LOCK_WAIT
    ) -> None:
        self._conn = conn
        self.scope = scope
        self.where = where
        self.lock_wait = lock_wait

    def describe(self, name: str) -> str:
        return f"{self.where} (job state {self.scope}, source {name})"

    def _head(self, name: str, *, for_update: bool = False) -> tuple[int, int, int, int] | None:
        """(generation, users, base rows, next segment) of the source, or None before its first write."""
        row = self._conn.execute(
            f"SELECT generation, users, base_rows, next_segment FROM {S}.state_heads WHERE scope = %s AND "
            f"source = %s{' FOR UPDATE' if for_update else ''}",
            (self.scope, name),
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    def exists(self, name: str) -> bool:
        with _database(self.describe(name)):
            head = self._head(name)
        return head is not None and head[0] > 0

    def base_rows(self, name: str) -> int:
        with _database(self.describe(name)):
            head = self._head(name)
        return 0 if head is None else head[2]

    def manifest(self, name: str) -> Manifest | None:
        with _database(self.describe(name)):
            head = self._head(name)
            if head is None:
                return None
            segments = self._conn.execute(
                f"SELECT segment, sum(rows) FROM {S}.state_chunks WHERE scope = %s AND source = %s AND "
                "generation = %s AND segment > 0 GROUP BY segment ORDER BY segment",
                (self.scope, name, head[0]),
            ).fetchall()
        if not segments:
            return None
        return Manifest(head[1], head[3], tuple((f"{int(s):06d}", int(n)) for s, n in segments))

    def _chunks(self, name: str, bounds: Bounds) -> list[tuple[int, bytes]]:
        """(segment, Parquet bytes) of the chunks of the current generation overlapping ``bounds``, in order."""
        head = self._head(name)
        if head is None:
            return []
        sql = (
            f"SELECT segment, data FROM {S}.state_chunks WHERE scope = %s AND source = %s AND generation = %s"
        )
        params: tuple[Any, ...] = (self.scope, name, head[0])
        if bounds is not None:
            sql += " AND key_hi >= %s AND key_lo < %s"
            params += (bounds[0], bounds[1])
        rows = self._conn.execute(sql + " ORDER BY segment, chunk", params).fetchall()
        return [(int(s), bytes(d)) for s, d in rows]

    @contextlib.contextmanager
    def _damage_reported(self, name: str) -> Iterator[None]:
        try:
            yield
        except READ_ERRORS as exc:
            detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise StateError(
                f"the snapshot state in {self.describe(name)} cannot be read ({detail}); `pushsync run "
                "--full-refresh` sends every user of the export again and writes a new state"
            ) from exc

    def read(
        self, name: str, bounds: Bounds, ext_ids: pl.Series | None
    ) -> tuple[pl.DataFrame | None, list[pl.DataFrame]]:
        with _database(self.describe(name)):
            head = self._head(name)
            chunks = self._chunks(name, bounds)
        base: list[pl.DataFrame] = []
        segments: dict[int, list[pl.DataFrame]] = {}
        with self._damage_reported(name):
            for segment, data in chunks:
                frame = filtered(pl.scan_parquet(io.BytesIO(data)), bounds, ext_ids).collect()
                (base if segment == 0 else segments.setdefault(segment, [])).append(frame)
        stacked = [pl.concat(parts, how="vertical_relaxed") for _, parts in sorted(segments.items())]
        if base:
            return pl.concat(base, how="vertical_relaxed"), stacked
        return (None if head is None or head[0] == 0 else pl.DataFrame()), stacked

    def scan(self, name: str) -> tuple[pl.LazyFrame | None, list[pl.LazyFrame]]:
        with _database(self.describe(name)):
            chunks = self._chunks(name, None)
        base: list[pl.LazyFrame] = []
        segments: dict[int, list[pl.LazyFrame]] = {}
        with self._damage_reported(name):
            for segment, data in chunks:
                lazy = pl.scan_parquet(io.BytesIO(data))
                lazy.collect_schema()  # damaged bytes fail here, with the state named
                (base if segment == 0 else segments.setdefault(segment, [])).append(lazy)
        stacked = [pl.concat(parts, how="vertical_relaxed") for _, parts in sorted(segments.items())]
        return (pl.concat(base, how="vertical_relaxed") if base else None), stacked

    def _insert_chunks(self, name: str, generation: int, segment: int, tables: Iterable[pa.Table]) -> int:
        """Insert ``tables`` as chunks of at most ROW_GROUP_ROWS rows; returns the rows."""
        rows = chunk = 0
        for table in tables:
            for offset in range(0, table.num_rows, ROW_GROUP_ROWS):
                part = table.slice(offset, ROW_GROUP_ROWS)
                keys = part.column(KEY)
                buffer = io.BytesIO()
                # Dictionary pages as the file backend writes them: names, flags and tags repeat.
                pq.write_table(part, buffer, compression="zstd", use_dictionary=True)
                self._conn.execute(
                    f"INSERT INTO {S}.state_chunks (scope, source, generation, segment, chunk, key_lo, key_hi, "
                    "rows, data) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        self.scope,
                        name,
                        generation,
                        segment,
                        chunk,
                        pc.min(keys).as_py(),
                        pc.max(keys).as_py(),
                        part.num_rows,
                        buffer.getvalue(),
                    ),
                )
                chunk += 1
                rows += part.num_rows
        return rows

    def write_base(self, name: str, tables: Iterable[pa.Table], schema: pa.Schema) -> int:
        with _database(self.describe(name)), self._conn.transaction():
            head = self._head(name, for_update=True)
            old = head[0] if head is not None else 0
            # ``tables`` may read the state as it goes (a compaction): those reads see the old generation,
            # since the head names the new one only once every chunk of it is in.
            rows = self._insert_chunks(name, old + 1, 0, tables)
            self._conn.execute(
                f"INSERT INTO {S}.state_heads (scope, source, generation, users, base_rows, next_segment, "
                "updated_at) VALUES (%s, %s, %s, %s, %s, 1, %s) ON CONFLICT (scope, source) DO UPDATE SET "
                "generation = EXCLUDED.generation, users = EXCLUDED.users, base_rows = EXCLUDED.base_rows, "
                "next_segment = 1, updated_at = EXCLUDED.updated_at",
                (self.scope, name, old + 1, rows, rows, time.time()),
            )
            self._conn.execute(
                f"DELETE FROM {S}.state_chunks WHERE scope = %s AND source = %s AND generation <> %s",
                (self.scope, name, old + 1),
            )
        return rows

    def append_segment(self, name: str, rows: pl.DataFrame, users: int) -> int:
        with _database(self.describe(name)), self._conn.transaction():
            head = self._head(name, for_update=True)
            if head is None:
                self._conn.execute(
                    f"INSERT INTO {S}.state_heads (scope, source, generation, users, base_rows, next_segment, "
                    "updated_at) VALUES (%s, %s, 0, 0, 0, 1, %s)",
                    (self.scope, name, time.time()),
                )
                head = (0, 0, 0, 1)
            generation, _, _, number = head
            self._insert_chunks(name, generation, number, [rows.to_arrow()])
            self._conn.execute(
                f"UPDATE {S}.state_heads SET users = %s, next_segment = %s, updated_at = %s WHERE scope = %s "
                "AND source = %s",
                (users, number + 1, time.time(), self.scope, name),
            )
            row = self._conn.execute(
                f"SELECT coalesce(sum(rows), 0) FROM {S}.state_chunks WHERE scope = %s AND source = %s AND "
                "generation = %s AND segment > 0",
                (self.scope, name, generation),
            ).fetchone()
        return int(row[0]) if row else 0

    def version(self, name: str) -> str:
        with _database(self.describe(name)):
            head = self._head(name)
        return "-/0" if head is None else f"{head[0]}/{head[3]}"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The job's state lock (a session advisory lock): held while a leader merges and diffs and while a
        worker commits; waits up to ``lock_wait`` seconds for another worker to finish."""
        key = f"pushsync.state:{self.scope}"
        deadline = time.monotonic() + self.lock_wait
        with _database(self.where):
            while True:
                got = self._conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
                if got and got[0]:
                    break
                if time.monotonic() >= deadline:
                    raise StateError(
                        f"the snapshot state of {self.scope} in {self.where} stayed locked by another worker "
                        f"for {self.lock_wait:.0f} s (a diff or a commit of this job); run the job again"
                    )
                time.sleep(_LOCK_POLL)  # in a worker thread: the event loop carries on
        try:
            yield
        finally:
            with contextlib.suppress(psycopg.Error):  # a lost connection released the lock already
                self._conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))


def pg_state_store(job: Job, conn: psycopg.Connection[Any], url: str) -> StateStore:
    """The job's :class:`sync.state.StateStore` kept in the coordination database (tables created if missing).
    ``job``'s destination should name its account (:func:`account_job`): this takes a state recorded by the
    base URL alone over as the account's, as the workdir's does (:func:`sync.state.state_directory`)."""
    ensure_snapshot_tables(conn, url)
    job = account_job(job, conn)
    return StateStore(
        job.workdir, job.destination, backend=PgStateBackend(conn, state_scope(job), describe_url(url))
    )


def other_account_scopes(job: Job, conn: psycopg.Connection[Any]) -> list[str]:
    """The destination keys of the other accounts at the job's platform and base URL whose state the database
    holds for the job, sorted (as :func:`sync.state._store.other_accounts` for a workdir)."""
    prefix = f"{job.name}/{job.destination.url_key}-"
    try:
        rows = conn.execute(
            f"SELECT DISTINCT scope FROM {S}.state_heads WHERE starts_with(scope, %s) AND scope <> %s",
            (prefix, state_scope(job)),
        ).fetchall()
    except psycopg.Error as exc:
        raise StateError(f"the snapshot state of job {job.name}: {safe_message(exc)}") from None
    return sorted(str(r[0]).removeprefix(f"{job.name}/") for r in rows)


def move_state_scope(job: Job, conn: psycopg.Connection[Any], old: str) -> None:
    """Make the state kept for the job under the destination key ``old`` (another account at the same base URL:
    the key was rotated) the state of the job's own account (``pushsync state rekey``). Refused when the job's
    account has a state already, or a run of the old account holds its state lock."""
    scope, source = state_scope(job), f"{job.name}/{old}"
    where = f"the snapshot state of job {job.name}"
    try:
        held = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (f"pushsync.state:{source}",))
        if not held.fetchone()[0]:  # type: ignore[index]
            raise StateError(f"{where} for {old} is in use by a run: nothing moved")
        try:
            with conn.transaction():
                taken = conn.execute(f"SELECT 1 FROM {S}.state_heads WHERE scope = %s LIMIT 1", (scope,))
                if taken.fetchone() is not None:
                    raise StateError(
                        f"the account this job's key names ({job.destination.key}) has a state already: "
                        "nothing moved"
                    )
                for table in ("state_heads", "state_chunks", "snapshot_pending"):
                    conn.execute(f"UPDATE {S}.{table} SET scope = %s WHERE scope = %s", (scope, source))
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (f"pushsync.state:{source}",))
    except psycopg.Error as exc:
        raise StateError(f"{where}: {safe_message(exc)}") from None


def account_job(job: Job, conn: psycopg.Connection[Any]) -> Job:
    """``job`` with a destination whose :func:`state_scope` is the one its state is kept under in the database.

    With the account known (the secret read), a state kept under the base URL alone (by a pushsync that did
    not tell accounts apart) is moved under the account's scope, and ``job`` is returned as it is. Without it,
    the base URL's one scope is found (several accounts' are refused, naming the secret to set)."""
    destination = job.destination
    legacy = f"{job.name}/{destination.url_key}"
    tables = ("state_heads", "state_chunks", "snapshot_pending")
    try:
        if destination.account is not None:
            scope = state_scope(job)
            with conn.transaction():
                found = conn.execute(
                    f"SELECT scope FROM {S}.state_heads WHERE scope IN (%s, %s) UNION "
                    f"SELECT scope FROM {S}.snapshot_pending WHERE scope IN (%s, %s)",
                    (scope, legacy, scope, legacy),
                ).fetchall()
                if {r[0] for r in found} == {legacy}:
                    for table in tables:
                        conn.execute(f"UPDATE {S}.{table} SET scope = %s WHERE scope = %s", (scope, legacy))
            return job
        # Only scopes holding a state: a run with a mistyped key leaves its account's pending delta.
        rows = conn.execute(
            f"SELECT DISTINCT scope FROM {S}.state_heads WHERE scope = %s OR starts_with(scope, %s)",
            (legacy, legacy + "-"),
        ).fetchall()
    except psycopg.Error as exc:
        raise StateError(f"the snapshot state of job {job.name}: {safe_message(exc)}") from None
    scopes = sorted({str(r[0]) for r in rows})
    if legacy in scopes or not scopes:
        return job
    if len(scopes) > 1:
        raise StateError(
            f"the coordination database holds the snapshot states of {len(scopes)} accounts of "
            f"{destination.platform} at {destination.url_key} for job {job.name}: make the job's secret "
            f"({destination.secret_env or destination.secret_file}) readable so that pushsync knows which"
        )
    account = scopes[0].removeprefix(legacy + "-")
    return dataclasses.replace(job, destination=dataclasses.replace(destination, account=account))


# -- pending deltas --------------------------------------------------------------------------------------------


def pending_runs(conn: psycopg.Connection[Any], scope: str) -> list[str]:
    """The runs of the job whose delta is pending (uploaded, not merged yet), oldest first."""
    rows = conn.execute(
        f"SELECT p.run_id FROM {S}.snapshot_pending p LEFT JOIN {S}.runs r ON r.run_id = p.run_id "
        "WHERE p.scope = %s AND p.path = 'meta.json' ORDER BY r.started_at NULLS FIRST, p.run_id",
        (scope,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def _upload(conn: psycopg.Connection[Any], scope: str, diff: SnapshotDiff) -> None:
    """Store the diff's directory (its parts, the state rows it read, meta.json) and its counts, in one
    transaction: another worker can then merge the run's confirmed batches, or a new leader queue them."""
    counts = {d.source.name: dataclasses.asdict(d.counts) for d in diff.sources}
    files = sorted(p for p in diff.directory.rglob("*") if p.is_file() and p.name != _BATCH_MAP)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(f"DELETE FROM {S}.snapshot_pending WHERE run_id = %s", (diff.run_id,))
        for path in files:
            cur.execute(
                f"INSERT INTO {S}.snapshot_pending (scope, run_id, path, data) VALUES (%s, %s, %s, %s)",
                (scope, diff.run_id, path.relative_to(diff.directory).as_posix(), path.read_bytes()),
            )
        cur.execute(
            f"INSERT INTO {S}.snapshot_pending (scope, run_id, path, data) VALUES (%s, %s, %s, %s)",
            (scope, diff.run_id, _COUNTS, json.dumps(counts).encode()),
        )


def _download(conn: psycopg.Connection[Any], run_id: str, directory: Path) -> None:
    """Write the run's pending delta and its batch map into ``directory`` (as :func:`sync.state.compute_diff`
    and the diff's lanes would have left them in the workdir)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = conn.execute(f"SELECT path FROM {S}.snapshot_pending WHERE run_id = %s", (run_id,)).fetchall()
    for (path,) in paths:
        target = directory / path
        if directory.resolve() not in target.resolve().parents:
            raise StateError(f"pending delta of run {run_id}: a stored file name {path!r} is not usable")
        # One file at a time: a first load's delta may be hundreds of megabytes in all.
        row = conn.execute(
            f"SELECT data FROM {S}.snapshot_pending WHERE run_id = %s AND path = %s", (run_id, path)
        ).fetchone()
        if row is None:
            raise StateError(f"pending delta of run {run_id}: {path} was removed while it was read")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bytes(row[0]))
    with conn.cursor() as cur, (directory / _BATCH_MAP).open("w", encoding="utf-8") as log:
        cur.execute(f"SELECT entry FROM {S}.snapshot_batches WHERE run_id = %s", (run_id,))
        while chunk := cur.fetchmany(5000):
            log.writelines(entry + "\n" for (entry,) in chunk)


def _drop(conn: psycopg.Connection[Any], run_id: str) -> None:
    with conn.transaction():
        conn.execute(f"DELETE FROM {S}.snapshot_pending WHERE run_id = %s", (run_id,))
        conn.execute(f"DELETE FROM {S}.snapshot_batches WHERE run_id = %s", (run_id,))


def _pending_diff(job: Job, run_id: str, directory: Path, builder: Any) -> SnapshotDiff:
    """The :class:`SnapshotDiff` of a downloaded pending delta (a leader taking over from one that died after
    the upload queues the same batches again instead of diffing a state that may have moved on)."""
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    counts = json.loads((directory / _COUNTS).read_text(encoding="utf-8"))
    by_name = {s.name: s for s in job.sources}
    deltas = []
    for name, info in meta["sources"].items():
        source = by_name.get(name)
        if source is None:
            continue  # the source left the job since: its changes are no longer sent
        parts = {int(r): directory / name / p for r, p in info["parts"].items()}
        found = DiffCounts(**counts.get(name, {}))
        deltas.append(SourceDelta(source, tuple(info["files"]), int(info["bits"]), parts, found))
    return SnapshotDiff(run_id, directory, tuple(deltas), job.snapshot, dict(job.batch_sizes), builder)


def _merge_pending(
    conn: psycopg.Connection[Any], store: StateStore, job: Job, ledger: Any, builder: Any, run_id: str
) -> CommitReport | None:
    """Merge the confirmed part of ``run_id``'s pending delta into the state and drop the delta (None: it has
    none). The caller holds the state lock. Merging twice is harmless (every merge rule is idempotent), so a
    crash between the merge and the drop only repeats the merge."""
    if run_id not in pending_runs(conn, state_scope(job)):
        return None
    with tempfile.TemporaryDirectory(prefix=".pushsync-delta-", dir=job.workdir) as tmp:
        directory = Path(tmp) / run_id
        _download(conn, run_id, directory)
        report = commit(store, job.sources, directory, ledger, job.snapshot, builder=builder)
    _drop(conn, run_id)
    return report


def _recover(
    conn: psycopg.Connection[Any], store: StateStore, job: Job, ledger: Any, builder: Any, live: str
) -> list[CommitReport]:
    """Merge the pending deltas of the job's runs that ended (aborted, or marked ended by hand) before the
    live run ``live`` diffs; the live run's own delta is left alone."""
    reports = []
    for run_id in pending_runs(conn, state_scope(job)):
        if run_id == live:
            continue
        info = ledger.run(run_id)
        if info is not None and info.status == "running":
            continue  # another live run of this scope (never: one live run per job); its finisher commits
        report = _merge_pending(conn, store, job, ledger, builder, run_id)
        if report is not None:
            reports.append(report)
    return reports


# -- the leader ------------------------------------------------------------------------------------------------


class _RecordedLanes:
    """The diff's batches as lanes (:class:`sync.dispatch.dispatch.LaneSource`, as :meth:`SnapshotDiff.lanes`
    makes them), each batch's map line written to ``snapshot_batches`` before the batch is handed on: the queue
    never holds a batch the commit could not map back to the delta rows it carried."""

    def __init__(self, diff: SnapshotDiff, conn: psycopg.Connection[Any]) -> None:
        self._diff = diff
        self._conn = conn

    def lanes(self, phase: Phase) -> list[tuple[str, Iterator[Batch]]]:
        by_endpoint: dict[str, list[tuple[SourceDelta, Any]]] = {}
        for delta in self._diff.sources:
            for stream in snapshot_streams(delta.source, self._diff.builder):
                if stream.phase is phase:
                    by_endpoint.setdefault(stream.endpoint, []).append((delta, stream))
        return [(endpoint, self._lane(pairs)) for endpoint, pairs in by_endpoint.items()]

    def _lane(self, pairs: Sequence[tuple[SourceDelta, Any]]) -> Iterator[Batch]:
        builder = self._diff.builder
        sizes = self._diff.batch_size
        held: list[tuple[Batch, str]] = []
        for delta, stream in pairs:
            size = sizes.get(stream.endpoint) or sizes.get("*") or 1000
            for batch in builder.stream_batches(stream, delta.frames(), size, delta.files):
                held.append((batch, _log_entry(delta, stream, batch, builder)))
                if len(held) >= _MAP_CHUNK:
                    yield from self._record(held)
                    held = []
        yield from self._record(held)

    def _record(self, held: list[tuple[Batch, str]]) -> Iterator[Batch]:
        if not held:
            return
        run_id = self._diff.run_id
        with self._conn.transaction(), self._conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {S}.snapshot_batches (run_id, batch_id, entry) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                [(run_id, batch.batch_id, entry) for batch, entry in held],
            )
        for batch, _ in held:
            yield batch


def plan_snapshot(
    job: Job, options: WorkerOptions, signals: WorkerSignals, ledger: Any, conn: Any, run_id: str
) -> dict[str, Any] | None:
    """The leader's work for a snapshot run (in a thread; ``conn``: the leader's connection, which holds the
    run's planning lock): merge what ended runs of the job confirmed, diff the export against the state, upload
    the delta, queue its batches, record the rejected rows and the planned info. None when a signal stopped it.

    A leader that takes over from one that died after the upload queues the uploaded delta again (same batches,
    same IDs: nothing is queued twice) instead of diffing anew."""
    url = ledger._url
    log = get_logger(job=job.name, run=run_id)
    builder = snapshot_builder_for(job)
    store = pg_state_store(job, conn, url)
    # The ledger read through this thread's connection: the worker's own ledger connection belongs to its
    # event loop (a psycopg connection is not for two threads at once).
    reader = PgLedger(url, conn)
    row = conn.execute(f"SELECT full_refresh, origin FROM {S}.runs WHERE run_id = %s", (run_id,)).fetchone()
    full_refresh, origin = (bool(row[0]), row[1]) if row else (False, None)
    if not full_refresh and not any(store.exists(s) for s in job.sources if s.kind is SourceKind.USERS):
        others = other_account_scopes(job, conn)
        if others:
            raise another_accounts_state(others, job.destination, job.path)
    with tempfile.TemporaryDirectory(prefix=".pushsync-delta-", dir=job.workdir) as tmp:
        directory = Path(tmp) / run_id
        with store.lock():
            recovered = _recover(conn, store, job, reader, builder, run_id)
            if recovered:
                log.info("snapshot.recovered", runs=[r.run_id for r in recovered])
            plan = build_plan(job, stop=signals.requested)
            try:
                if run_id in pending_runs(conn, state_scope(job)):
                    _download(conn, run_id, directory)
                    diff = _pending_diff(job, run_id, directory, builder)
                else:
                    diff = compute_diff(
                        store,
                        plan.staged,
                        run_id,
                        job.snapshot,
                        full_refresh=full_refresh,
                        force=options.force,
                        batch_size=job.batch_sizes,
                        rejected=rejected_users(plan.rejects_path, plan.staged),
                        stop=signals.requested,
                        directory=directory,
                        builder=builder,
                    )
                    # Before any batch is queued: whoever finishes the run merges from this.
                    _upload(conn, state_scope(job), diff)
            except BaseException:
                plan.close()
                raise
        with plan:
            counts = diff.request_counts()
            queued = enqueue(conn, run_id, _RecordedLanes(diff, conn), stop=signals.requested)
            if signals.interrupted():
                return None
            staged = plan.staged
            rejected = list(plan.rejected_rows())
            found = diff.counts
            info = {
                "rows_read": sum(s.rows_read for s in staged),
                "rows_clean": sum(s.rows_clean for s in staged),
                "rows_rejected": len(rejected),
                "duplicates_dropped": sum(s.duplicates_dropped for s in staged),
                "requests": sum(n for n, _ in counts.values()),
                "ids": sum(i for _, i in counts.values()),
                "batches": queued,
                "rejects": str(plan.rejects_path.resolve()),
                "origin": origin,
                "replay": None,
                "snapshot": dataclasses.asdict(found),
                "snapshot_input": {
                    "new": found.users_new,
                    "changed": found.users_changed - found.users_new,
                    "unchanged": found.users_unchanged,
                    "left": found.users_left,
                    "removed": found.users_removed,
                },
                "recovered": [r.run_id for r in recovered],
            }
            with conn.transaction():
                conn.execute(f"DELETE FROM {S}.rejected_rows WHERE run_id = %s", (run_id,))
                with conn.cursor() as cur:
                    cur.executemany(
                        f"INSERT INTO {S}.rejected_rows (run_id, path, row, column_name, reason, ext_id) "
                        "VALUES (%s, %s, %s, %s, %s, %s)",
                        [(run_id, r.path, r.row, r.column, r.reason, r.ext_id) for r in rejected],
                    )
                conn.execute(
                    f"UPDATE {S}.runs SET planned = TRUE, planned_info = %s WHERE run_id = %s",
                    (json.dumps(info), run_id),
                )
    return info


# -- whoever finishes the run ------------------------------------------------------------------------------------


def _finished_sending(conn: psycopg.Connection[Any], run_id: str) -> bool:
    """Whether every batch of the run is queued and finished (or held: outcome unknown, not confirmed)."""
    row = conn.execute(
        f"SELECT r.planned, (SELECT count(*) FROM {S}.batches b WHERE b.run_id = r.run_id AND "
        f"b.status IN ('planned', 'sent') AND NOT b.held) FROM {S}.runs r WHERE r.run_id = %s",
        (run_id,),
    ).fetchone()
    return row is not None and bool(row[0]) and int(row[1]) == 0


def _commit_if_finished(job: Job, ledger: Any, run_id: str) -> CommitReport | None:
    url = ledger._url
    ledger.flush()  # this worker's last results count too
    conn = connect(url)
    try:
        store = pg_state_store(job, conn, url)
        with store.lock(), _database(describe_url(url)):
            if not _finished_sending(conn, run_id):
                return None  # batches are left: the worker that finishes them commits
            reader = PgLedger(url, conn)
            return _merge_pending(conn, store, job, reader, snapshot_builder_for(job), run_id)
    finally:
        conn.close()


async def commit_when_finished(job: Job, ledger: Any, run_id: str) -> CommitReport | None:
    """Merge the run's confirmed changes into the state if every batch of it is finished and nobody merged
    them yet (under the state lock); call it before the run is recorded as ended. Returns what was merged, or
    None (batches are left, or another worker merged). A failure after sending is exit 3, never 2: the delta
    stays pending, and running the job again merges it."""
    try:
        return await asyncio.to_thread(_commit_if_finished, job, ledger, run_id)
    except (PushSyncError, OSError) as exc:
        if isinstance(exc, InterruptedRunError):
            raise
        raise RunStoppedError(
            f"run {run_id}: its confirmed changes could not be merged into the snapshot state "
            f"({safe_message(exc)}); run the job again: it merges them (nothing confirmed is sent again)"
        ) from exc


def snapshot_counts(planned: dict[str, Any]) -> DiffCounts | None:
    """What the run's diff found, from its planned info (None: not a snapshot run)."""
    found = planned.get("snapshot")
    return DiffCounts(**found) if isinstance(found, dict) else None


def import_workdir_state(job: Job, conn: psycopg.Connection[Any], url: str) -> dict[str, int]:
    """Copy the job's state from its workdir (the SQLite mode's) into the coordination database: a job moved onto
    several workers keeps what it confirmed instead of sending every value again (and appending its ``push``
    attributes twice). Refused when the workdir holds a run's unmerged changes (run the job once without the
    database: it merges them) or the database already holds a state for the job. Returns users per source."""
    from sync.config import SourceKind
    from sync.state._store import key_range, range_bits

    local = StateStore(job.workdir, job.destination)
    if local.pending():
        raise StateError(
            f"the workdir's state {local.directory} holds changes of runs not merged yet "
            f"({', '.join(p.name for p in local.pending())}): run the job once without a coordination database "
            "(it merges them), then import"
        )
    store = pg_state_store(job, conn, url)
    sources = [s for s in job.sources if s.kind is SourceKind.USERS and local.exists(s)]
    if not sources:
        raise StateError(f"no snapshot state for job {job.name} in {local.directory}: nothing to import")
    copied: dict[str, int] = {}
    with local.lock(), store.lock():
        taken = [s.name for s in sources if store.exists(s)]
        if taken:
            raise StateError(
                f"the coordination database already holds a state for job {job.name} (sources "
                f"{', '.join(taken)}): nothing imported; it is what coordinated runs confirmed"
            )
        for source in sources:
            bits = range_bits(local.rows(source))
            ranges = (local.slice(source, *key_range(r, bits), job.snapshot) for r in range(1 << bits))
            copied[source.name] = store.write(source, ranges, job.snapshot)
    return copied
