"""The ledger on PostgreSQL: the same records and the same interface as :class:`sync.ledger.ledger.Ledger` (SQLite),
shared by every worker of a job.

The batches table is also the run's queue (:mod:`sync.coordination.queue`): the leader inserts each planned
batch with what a worker needs to send it (body, IDs, origins, order), so :meth:`record_planned` has nothing
left to do; ``sent`` and the result update the same row. Writes are queued and committed in small transactions,
as in SQLite (every ``flush_every`` writes, at least every ``flush_interval`` seconds, and before a
non-idempotent request leaves). A lost connection (PostgreSQL restarted) is made again for ``reconnect_for``
seconds (:data:`sync.coordination._db.RECONNECT_FOR`) with the queued writes kept; past that, :class:`sync.errors.StateError` (the run stops, exit 3 once
sending began). While the dispatcher sends (:meth:`PgLedger.sending`) that wait happens on a worker thread
(:meth:`PgLedger.flush_async`), never on the event loop. Reads (``runs``, ``show``, resume/retry) use the same
connection.

The connection is synchronous (psycopg's) on purpose: the dispatcher records results synchronously between two
awaits, so a cancellation can never fall between an answer and its record; a flush is one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg

from sync.coordination._db import (
    RECONNECT_FOR,
    SCHEMA,
    CoordinationError,
    backoff,
    connect,
    describe_url,
    lost_connection,
    safe_message,
)
from sync.errors import StateError
from sync.ledger.ledger import (
    RUN_COLUMNS,
    Ledger,
    LedgerBase,
    LedgerDialect,
    attempt_row,
    confirmed_rows_row,
    finish_row,
    refused_rows,
    result_row,
    sent_row,
)
from sync.records import Attempt, Batch, BatchResult

__all__ = ["PgLedger"]

S = SCHEMA
_UPDATE_SENT = (
    f"UPDATE {S}.batches SET status = 'sent', started_at = COALESCE(started_at, %s) "
    "WHERE run_id = %s AND batch_id = %s AND status IN ('planned', 'sent')"
)
_UPDATE_RESULT = (
    f"UPDATE {S}.batches SET status = %s, attempts = %s, http_status = %s, code = %s, message = %s, ok_ids = %s, "
    "rejected_ids = %s, started_at = COALESCE(started_at, %s), finished_at = %s, "
    "confirmations = confirmations + 1 WHERE run_id = %s AND batch_id = %s"
)
_LOST_CLAIMS = (
    f"SELECT batch_id FROM {S}.batches WHERE run_id = %s AND batch_id = ANY(%s) "
    "AND claimed_by IS DISTINCT FROM %s ORDER BY seq"
)
_INSERT_REFUSED = (
    f"INSERT INTO {S}.batch_ids (run_id, batch_id, ext_id, code, message, origin_path, origin_row) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s)"
)
_INSERT_CONFIRMED_ROWS = (
    f"INSERT INTO {S}.batch_rows (run_id, batch_id, scheme, row_keys) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT DO NOTHING"
)
_INSERT_ATTEMPT = (
    f"INSERT INTO {S}.attempts (run_id, batch_id, endpoint, attempt, n_ids, outcome, http_status, message, "
    "started_at, latency, worker) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


class PgLedger(LedgerBase):
    """A job's ledger in PostgreSQL (see the module docstring); the same methods as :class:`sync.ledger.ledger.Ledger`
    (the readers and the recording of rejected rows are theirs, :class:`sync.ledger.ledger.LedgerBase`, in this
    ledger's SQL dialect).

    Open with :meth:`open`; use as a context manager or call :meth:`close`. ``path`` is a description of the
    database (``user@host:port/db``) for messages: never the URL, which may hold a password."""

    _dialect = LedgerDialect(mark="%s", tables=f"{S}.", batch_order="seq", row_order="id")

    def __init__(
        self,
        url: str,
        conn: psycopg.Connection[Any],
        *,
        worker: str | None = None,
        flush_every: int = 256,
        flush_interval: float = 0.05,
        reconnect_for: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        self._url = url
        self._conn = conn
        self.path: str = describe_url(url)
        self.worker = worker
        """The worker recording attempts (kept with each attempt: which process sent what)."""
        self._pending: list[tuple[str, Sequence[Any]]] = []
        self._flush_every = flush_every
        self._flush_interval = flush_interval
        self._reconnect_for = RECONNECT_FOR if reconnect_for is None else reconnect_for
        self._clock = clock  # injectable, with ``sleep``: tests of the reconnection need not wait
        self._sleep = sleep
        self._last_flush = time.monotonic()
        self.writes = 0
        # While the dispatcher sends (sending()), a lost connection is made again on a worker thread, not on the
        # event loop: when the connection was found lost (None: it is not), and the reconnection under way.
        self._sending = False
        self._lost: float | None = None
        self._reconnecting: asyncio.Future[None] | None = None  # settled by the thread below
        self._reconnect_thread: threading.Thread | None = None
        self.claimer: str | None = None
        """The worker whose claims the batches recorded ``sent`` must be (set by the queue that claims them,
        :class:`sync.coordination.queue.QueueLanes`); None: no check."""
        self._sent: dict[str, list[str]] = {}  # run → batches recorded sent, their claim not checked yet

    @classmethod
    def open(cls, url: str, *, worker: str | None = None, reconnect_for: float | None = None) -> PgLedger:
        """Connect (creating or checking the schema); raises :class:`CoordinationError` with a clear message."""
        from sync.coordination._db import ensure_schema

        conn = connect(url)
        try:
            ensure_schema(conn, url)
        except BaseException:
            conn.close()
            raise
        return cls(url, conn, worker=worker, reconnect_for=reconnect_for)

    # -- connection ----------------------------------------------------------------------------------------

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        """One statement, reconnecting once if the connection was lost (a read may simply be repeated)."""
        try:
            return self._conn.execute(sql, params)
        except psycopg.OperationalError:
            self._reconnect()
            try:
                return self._conn.execute(sql, params)
            except psycopg.Error as exc:
                raise StateError(f"ledger {self.path}: {safe_message(exc)}") from None

    def _reconnect(self, since: float | None = None) -> None:
        """Connect again within ``reconnect_for`` seconds of ``since`` (the clock's time the connection was found
        lost; now when None), or :class:`StateError`. Blocking: outside :meth:`sending` it runs on the caller's
        thread, which waits with nothing recorded until the database is back; while the dispatcher sends,
        :meth:`flush_async` runs it on a worker thread, so that the event loop goes on (see there)."""
        deadline = (self._clock() if since is None else since) + self._reconnect_for
        last: BaseException | None = None
        with contextlib.suppress(psycopg.Error, OSError):
            self._conn.close()
        for delay in backoff():
            try:
                self._conn = connect(self._url)
                return
            except CoordinationError as exc:
                last = exc
            if self._clock() + delay > deadline:
                assert last is not None
                raise self._gave_up(last)
            self._sleep(delay)

    # -- writing -------------------------------------------------------------------------------------------

    def _queue(self, sql: str, params: Sequence[Any]) -> None:
        self._pending.append((sql, params))
        if len(self._pending) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        """Commit every queued write in one transaction (retried whole after a reconnect).

        While the dispatcher sends (:meth:`sending`), a lost connection is not made again here: the writes stay
        queued and the ledger notes the loss, and :meth:`flush_async` (the dispatcher's flusher, and the flush
        before a non-idempotent request leaves) connects again off the event loop and commits them — or raises
        :class:`StateError` once ``reconnect_for`` seconds have passed."""
        if self._lost is not None:
            if self._sending:
                self._check_lost()
                return
            thread = self._reconnect_thread
            if thread is not None:
                thread.join()  # one a cancelled flush_async left running: never two connecting at once
            if self._lost is not None:
                self._reconnect(self._lost)  # the dispatcher is done: wait here, as outside a run
                self._lost = None
        if not self._pending:
            self._last_flush = time.monotonic()
            return
        pending = self._pending
        for attempt in (1, 2):
            try:
                # Pipeline mode: every statement sent at once, one wait for the answers — a flush holds the
                # event loop for about one round trip, however many writes it commits.
                with self._conn.pipeline(), self._conn.transaction(), self._conn.cursor() as cur:
                    for sql, params in pending:
                        cur.execute(sql, params)
                    lost = self._lost_claims(cur)
                break
            except psycopg.OperationalError as exc:
                if attempt == 2:
                    raise StateError(f"ledger {self.path}: cannot write ({safe_message(exc)})") from None
                if self._sending:
                    self._lost = self._clock()
                    return
                self._reconnect()
            except psycopg.Error as exc:
                raise StateError(f"ledger {self.path}: cannot write ({safe_message(exc)})") from None
        self._pending = []
        self._sent = {}
        self.writes += len(pending)
        self._last_flush = time.monotonic()
        if lost:
            raise self._claims_taken(lost)

    def _lost_claims(self, cur: psycopg.Cursor[Any]) -> list[tuple[str, str]]:
        """(run, batch) of the batches recorded ``sent`` in this flush that are no longer this worker's claim.

        A worker stopped (SIGSTOP, a frozen VM) for longer than the lease counts as dead: another worker frees
        its claims and sends those batches. Woken up, its dispatcher goes on with the batches it held — those
        waiting for a budget slot among them, still ``planned`` — and would send them a second time (events
        fired twice). The flush before a non-idempotent request leaves is where that is caught."""
        if self.claimer is None or not self._sent:
            return []
        lost: list[tuple[str, str]] = []
        for run_id, batch_ids in self._sent.items():
            cur.execute(_LOST_CLAIMS, (run_id, batch_ids, self.claimer))
            lost += [(run_id, str(row[0])) for row in cur.fetchall()]
        return lost

    def _claims_taken(self, lost: list[tuple[str, str]]) -> StateError:
        """The error that stops a worker whose claims another worker took over (see :meth:`_lost_claims`)."""
        run_id = lost[0][0]
        shown = ", ".join(batch for _, batch in lost[:3]) + (
            f" and {len(lost) - 3} more" if len(lost) > 3 else ""
        )
        return StateError(
            f"run {run_id}: this worker's claim on batch {shown} was taken over by another worker — its heartbeat "
            "had stopped for longer than the lease (the process was stopped or stalled); it stops without sending "
            "what it held, so that nothing is sent twice"
        )

    def _gave_up(self, last: BaseException) -> StateError:
        """The error once the database stayed away for ``reconnect_for`` seconds (``last``: why it did)."""
        return StateError(str(lost_connection(self.path, "the ledger", self._reconnect_for, last)))

    def _check_lost(self) -> None:
        """:class:`StateError` when the connection has been lost for longer than ``reconnect_for`` seconds."""
        if self._lost is not None and self._clock() - self._lost > self._reconnect_for:
            raise self._gave_up(CoordinationError("not connected"))

    def maybe_flush(self) -> None:
        """Flush when the oldest queued write has waited ``flush_interval`` seconds (call it often)."""
        if self._pending and time.monotonic() - self._last_flush >= self._flush_interval:
            self.flush()

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """While the dispatcher sends: a lost connection is made again by :meth:`flush_async`, off the event loop.

        Made again on the loop, the wait would stop every other coroutine, those of this worker's other
        connections (claims, budget slots, heartbeat) among them. One of those caught half-way through connecting
        — its socket accepted by a PostgreSQL that is shutting down, its first message not yet sent — holds that
        shutdown for the server's ``authentication_timeout`` (60 s by default), past this ledger's own
        ``reconnect_for``: the worker then gave up on a restart it caused to last (seen under load)."""
        self._sending = True
        try:
            yield
        finally:
            self._sending = False

    async def flush_async(self) -> None:
        """Commit every queued write; when the connection is lost, connect again on a worker thread while the
        event loop goes on (see :meth:`sending`), then commit. :class:`StateError` after ``reconnect_for``
        seconds without the database."""
        while True:
            self.flush()
            if self._lost is None:
                return
            if self._reconnecting is None or self._reconnecting.done():
                # One reconnection at a time, shared by every caller (shielded: a caller cancelled while it
                # waits leaves it running, and flush() outside sending() joins its thread before anything else).
                self._reconnecting = self._start_reconnecting(self._lost)
            await asyncio.shield(self._reconnecting)

    def _start_reconnecting(self, since: float) -> asyncio.Future[None]:
        """:meth:`_reconnect` on a thread of its own; the future is settled on the event loop when it is done.
        The thread clears the loss once the new connection is in place: until then the event loop's thread
        touches no connection (:meth:`flush` sees the loss and leaves the writes queued), after it the thread
        touches none."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle(error: BaseException | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        def work() -> None:
            error: BaseException | None = None
            try:
                self._reconnect(since)
                self._lost = None
            except BaseException as exc:  # StateError past reconnect_for: raised by the awaiting caller
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                loop.call_soon_threadsafe(settle, error)

        self._reconnect_thread = threading.Thread(target=work, name="pushsync-ledger-reconnect", daemon=True)
        self._reconnect_thread.start()
        return done

    async def maybe_flush_async(self) -> None:
        """:meth:`maybe_flush`, connecting again as :meth:`flush_async` does when the connection is lost."""
        self.maybe_flush()
        if self._lost is not None:
            await self.flush_async()

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
        """Record a new run (committed at once)."""
        self._queue(
            f"INSERT INTO {S}.runs (run_id, job, job_path, platform, started_at, status, full_refresh, origin, "
            "origin_mode, destination) VALUES (%s, %s, %s, %s, %s, 'running', %s, %s, %s, %s)",
            (run_id, job, job_path, platform, time.time(), full_refresh, origin, origin_mode, destination),
        )
        self.flush()

    def finish_run(
        self, run_id: str, *, status: str, exit_code: int, message: str | None = None, summary: Any = None
    ) -> None:
        """Record how the run ended, with its summary (JSON-ready), and commit."""
        self._queue(
            f"UPDATE {S}.runs SET finished_at = %s, status = %s, exit_code = %s, message = %s, summary = %s "
            "WHERE run_id = %s",
            finish_row(run_id, status=status, exit_code=exit_code, message=message, summary=summary),
        )
        self.flush()

    def record_planned(self, run_id: str, batch: Batch) -> None:
        """Nothing to do: the leader queued the batch (:func:`sync.coordination.queue.enqueue`), which is its
        ``planned`` record."""

    def record_sent(self, run_id: str, batch_id: str) -> None:
        """Record a batch's first request as leaving; with :attr:`claimer` set, the flush that writes it checks
        that the batch is still this worker's claim (:class:`StateError` when another worker took it over)."""
        if self.claimer is not None:
            self._sent.setdefault(run_id, []).append(batch_id)
        self._queue(_UPDATE_SENT, sent_row(run_id, batch_id))

    def record_result(self, run_id: str, result: BatchResult, *, origins: Any = None) -> None:
        """Record a batch's final outcome, each ID the platform refused, and the rows of its confirmed parts."""
        self._queue(_UPDATE_RESULT, result_row(run_id, result))
        if result.rejected:
            for params in refused_rows(run_id, result):
                self._queue(_INSERT_REFUSED, params)
        if result.confirmed_rows:
            self._queue(_INSERT_CONFIRMED_ROWS, confirmed_rows_row(run_id, result))

    def record_attempt(self, run_id: str, attempt: Attempt, *, started_at: float) -> None:
        """Record one HTTP attempt (``started_at``: Unix time it was sent), with the worker that sent it."""
        self._queue(_INSERT_ATTEMPT, (*attempt_row(run_id, attempt, started_at), self.worker))

    # -- reading (the rest is LedgerBase's) -----------------------------------------------------------

    def export_waits(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Export waits are recorded by ``pushsync meiro``, which keeps its ledger in SQLite: none here."""
        return []

    # -- a local copy for the SQLite-reading tools --------------------------------------------------------

    def copy_to_sqlite(
        self, path: Path, *, run_ids: Sequence[str] | None = None, job: str | None = None
    ) -> Path:
        """Write the runs of ``job`` (or ``run_ids``; neither: every run) with their batches, attempts and refusals
        into a new SQLite ledger at ``path``: ``pushsync report``, ``trace`` and ``ledger-export`` read that copy."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        Ledger.open(path).close()  # the SQLite schema
        where: str
        params: tuple[Any, ...]
        if job is not None:
            where, params = "job = %s", (job,)
        elif run_ids is not None:
            where, params = "run_id = ANY(%s)", (list(run_ids),)
        else:  # every run
            where, params = "TRUE", ()
        runs = self._execute(f"SELECT {RUN_COLUMNS} FROM {S}.runs WHERE {where}", params).fetchall()
        ids = [r[0] for r in runs]
        conn = sqlite3.connect(path)
        try:
            with conn:
                marks = ", ".join("?" * len(RUN_COLUMNS.split(",")))
                conn.executemany(
                    f"INSERT INTO runs ({RUN_COLUMNS}) VALUES ({marks})",
                    [(*r[:10], int(bool(r[10])), *r[11:]) for r in runs],
                )
                copies = {
                    "batches": (
                        "run_id, batch_id, endpoint, operation, phase, n_ids, ext_ids, status, attempts, "
                        "http_status, code, message, ok_ids, rejected_ids, planned_at, started_at, finished_at",
                        "seq",
                    ),
                    "attempts": (
                        "run_id, batch_id, endpoint, attempt, n_ids, outcome, http_status, message, started_at, latency",
                        "id",
                    ),
                    "batch_ids": ("run_id, batch_id, ext_id, code, message, origin_path, origin_row", "id"),
                    "rejected_rows": ("run_id, path, row, column_name, reason, ext_id", "id"),
                    "batch_rows": ("run_id, batch_id, scheme, row_keys", "run_id"),
                }
                for table, (columns, order) in copies.items():
                    marks = ", ".join("?" * len(columns.split(",")))
                    with self._conn.cursor() as cur:
                        cur.execute(
                            f"SELECT {columns} FROM {S}.{table} WHERE run_id = ANY(%s) ORDER BY {order}",
                            (ids,),
                        )
                        while chunk := cur.fetchmany(5000):
                            conn.executemany(
                                f"INSERT INTO {table} ({columns}) VALUES ({marks})",
                                [
                                    tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                                    for row in chunk
                                ],
                            )
        finally:
            conn.close()
        return path
