"""The run's leader: one worker plans the run (advisory lock), lists its lanes and queues its batches while
every worker — the leader too — already claims and sends (docs/scaling.md).

* :func:`lead` runs beside each worker's sending: it takes the leader's lock if nobody holds it while the run is
  not planned, plans (or replays) in a thread — lanes listed first (``runs.listed``), then every batch queued,
  then the input's counts recorded (``runs.planned``: planning done) — and returns the planned info once
  anyone planned the run. A leader that dies releases the lock with its connection; the next worker to try
  plans again (batch IDs are content hashes: nothing is queued twice). A lost connection is made again and
  planning starts over, for ``RECONNECT_FOR`` seconds at most.
* :func:`until_listed`: a worker starts its dispatcher once the lanes are listed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from sync.config import Job, SyncMode
from sync.coordination._db import (
    RECONNECT_FOR,
    SCHEMA,
    CoordinationError,
    connect,
    describe_url,
    lost_connection,
    safe_message,
)
from sync.coordination._seams import WorkerOptions, WorkerSignals
from sync.coordination.ledger import PgLedger
from sync.coordination.queue import enqueue
from sync.coordination.snapshot import plan_snapshot
from sync.errors import ExitCode, PushSyncError, StateError
from sync.ledger.ledger import rejected_row
from sync.logs import get_logger
from sync.planning.planning import build_plan
from sync.planning.resume import ReplayLanes, ReplayMode, ReplayStats, replay_plan
from sync.platforms.registry import platform_for
from sync.redact import redact

__all__ = ["lead", "stop_planner", "until_listed"]

S = SCHEMA
_T = TypeVar("_T")
LEADER_POLL = 0.5
"""Seconds between a waiting worker's looks for the leader's lock (or for planning to be done)."""
LISTED_POLL = 0.1
"""Seconds between looks for the run's lanes while the leader reads the input."""
PLANNER_STOP_WAIT = 15.0
"""Seconds a worker going down waits for its planning thread to stop (a slow query is cancelled in about one)."""


async def until_listed(
    ledger: PgLedger, run_id: str, signals: WorkerSignals, planner: asyncio.Task[dict[str, Any] | None]
) -> bool:
    """Wait until the leader listed the run's lanes (True), or a stop came first (False); the planner's error
    if it failed before listing (bad input: nothing was sent)."""
    while True:
        if planner.done() and (planner.cancelled() or planner.exception() is not None):
            await planner  # raises its error
        if _listed(ledger, run_id):
            return True
        if signals.interrupted() or (planner.done() and planner.result() is None):
            # Looked at again: the leader may have listed the lanes (and queued batches others sent) since the
            # look above, then stopped; that run is not "unplanned, nothing sent".
            return _listed(ledger, run_id)
        await asyncio.wait([planner], timeout=LISTED_POLL)


async def stop_planner(planner: asyncio.Task[dict[str, Any] | None], signals: WorkerSignals) -> None:
    """End :func:`lead`'s task when the worker goes down before planning is done (an error, its task cancelled):
    the planning thread is told to stop — the run's stop, which it looks at between chunks and batches and while
    a query runs — and waited for, at most ``PLANNER_STOP_WAIT`` seconds, then the task is cancelled. Merely
    cancelling the task let the thread plan on (a slow query ran to its end, and the process waited for it at
    exit) with its connection closed under it."""
    signals.requested.set()  # the worker stops: its planning does too
    await asyncio.wait([planner], timeout=PLANNER_STOP_WAIT)
    if not planner.done():
        planner.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await planner  # its error, if any, is not this worker's (the worker's own is being raised)


def _listed(ledger: PgLedger, run_id: str) -> bool:
    """Whether the run's lanes are listed (workers may claim); :class:`StateError` if the run ended before."""
    row = ledger._execute(
        f"SELECT listed, status, message FROM {S}.runs WHERE run_id = %s", (run_id,)
    ).fetchone()
    if row is None:
        raise StateError(f"run {run_id} disappeared from the coordination database")
    listed, status, message = row
    if not listed and status != "running":
        raise StateError(
            f"run {run_id} ended ({status}) before it was planned: {message or 'see pushsync show'}; fix the "
            "cause and run the job again"
        )
    return bool(listed)


async def lead(
    job: Job, options: WorkerOptions, signals: WorkerSignals, url: str, run_id: str
) -> dict[str, Any] | None:
    """Plan the run if this worker takes the leader's lock while the run is not planned; the run's planned
    info (rows read, expected requests...) once anyone planned it, or None when a signal stopped it first.

    A lost connection (PostgreSQL restarted) is made again and planning starts over — the lock went with the
    server's sessions, and batch IDs are content hashes, so nothing is queued twice — for ``RECONNECT_FOR``
    seconds at most."""
    log = get_logger(job=job.name, run=run_id)
    lock = f"pushsync.plan:{run_id}"
    conn: Any = None  # this worker's connection for the leader's lock and the queueing
    lost_since: float | None = None  # when the connection was found lost (None: it works)
    try:
        while True:
            if signals.interrupted():
                return None
            try:
                if conn is None:
                    conn = await asyncio.to_thread(connect, url)
                info = _planned_state(conn, run_id)
                if info is not None:
                    return info
                got = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (lock,)).fetchone()
                lost_since = None
                if got and got[0]:
                    try:
                        if _planned_state(conn, run_id) is None:
                            log.info("run.leader", hint="planning and queueing the run's batches")
                        return await _plan(job, options, signals, url, conn, run_id)
                    except asyncio.CancelledError:
                        # Cancelled while the planning thread still uses the connection: the thread closes it
                        # when it returns (_in_thread), the lock going with it. Using or closing a libpq
                        # connection under another thread's query is undefined behaviour.
                        conn = None
                        raise
                    finally:
                        if conn is not None:
                            with contextlib.suppress(psycopg.Error):
                                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (lock,))
            except (psycopg.OperationalError, psycopg.InterfaceError, CoordinationError) as exc:
                if isinstance(exc, psycopg.errors.QueryCanceled) and not (
                    conn is None or conn.closed or conn.broken
                ):
                    # The role's or the database's statement_timeout (or a DBA's pg_cancel_backend) on a connection
                    # that is fine: taken for a loss, planning started over and was cancelled again, forever.
                    raise StateError(
                        f"coordination database {describe_url(url)}: a statement of the run's planning was "
                        f"cancelled ({safe_message(exc)}); if the role or the database has a statement_timeout, "
                        "lift it for pushsync's user (ALTER ROLE … SET statement_timeout = 0)"
                    ) from None
                # The connection was lost (or cannot be made again yet): connect again and plan again.
                now = time.monotonic()
                lost_since = now if lost_since is None else lost_since
                if now - lost_since > RECONNECT_FOR:
                    raise lost_connection(describe_url(url), "planning", RECONNECT_FOR, exc) from None
                log.warning("run.leader_reconnecting", error=safe_message(exc))
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = None
            await asyncio.sleep(LEADER_POLL)
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


async def _plan(
    job: Job, options: WorkerOptions, signals: WorkerSignals, url: str, conn: Any, run_id: str
) -> dict[str, Any] | None:
    """The leader's planning (under the lock), in a thread; the planned info, or None when stopped. Input that
    cannot be planned ends the run, so the other workers stop waiting for a plan and say why, instead of each
    trying the same input in turn."""
    info = _planned_state(conn, run_id)
    if info is not None:
        return info
    try:
        if job.mode is SyncMode.SNAPSHOT:
            # The diff against the shared state (sync.coordination.snapshot); it reads only the URL of the
            # ledger it is given, and the run through ``conn``, this thread's connection.
            return await _in_thread(
                conn, plan_snapshot, job, options, signals, PgLedger(url, conn), conn, run_id
            )
        return await _in_thread(conn, _plan_and_enqueue, job, options, signals, url, conn, run_id)
    except PushSyncError as exc:
        if exc.exit_code is ExitCode.BAD_JOB_OR_INPUT:
            with conn.transaction():
                conn.execute(
                    f"UPDATE {S}.runs SET status = 'aborted', finished_at = %s, exit_code = %s, message = %s "
                    "WHERE run_id = %s AND status = 'running'",
                    (time.time(), int(exc.exit_code), f"not planned: {redact(str(exc))}", run_id),
                )
        raise


async def _in_thread(conn: Any, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a thread of its own that uses ``conn``, awaited; if the awaiting task is cancelled, the
    thread keeps the connection and closes it when ``fn`` returns (it stops at the run's stop, which the runner
    sets before it cancels: :func:`stop_planner`)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pushsync-leader")
    done = pool.submit(contextvars.copy_context().run, fn, *args)
    pool.shutdown(wait=False)  # the thread ends once ``fn`` returns
    try:
        return await asyncio.wrap_future(done)  # cancelling it leaves a running ``fn`` running
    except asyncio.CancelledError:
        # Runs in the planning thread as it ends (or here, if it has ended already).
        done.add_done_callback(lambda _: conn.close())
        raise


def _planned_state(conn: Any, run_id: str) -> dict[str, Any] | None:
    """The run's planned info once planning is done, else None; :class:`StateError` if it ended unplanned."""
    row = conn.execute(
        f"SELECT planned, planned_info, status, message FROM {S}.runs WHERE run_id = %s", (run_id,)
    ).fetchone()
    if row is None:
        raise StateError(f"run {run_id} disappeared from the coordination database")
    if row[0]:
        return dict(json.loads(row[1] or "{}"))
    if row[2] != "running":
        raise StateError(
            f"run {run_id} ended ({row[2]}) before it was planned: {row[3] or 'see pushsync show'}; fix the cause "
            "and run the job again"
        )
    return None


def _plan_and_enqueue(
    job: Job, options: WorkerOptions, signals: WorkerSignals, url: str, conn: Any, run_id: str
) -> dict[str, Any] | None:
    """The leader's work (in a thread): plan (or replay), list the lanes and queue every batch, record the
    rejected rows and the planned info, in that order; None when a signal stopped it."""
    row = conn.execute(f"SELECT origin, origin_mode FROM {S}.runs WHERE run_id = %s", (run_id,)).fetchone()
    origin, mode = (row[0], row[1]) if row else (None, None)
    decisions = None
    if origin is not None and not (options.full_refresh and mode == ReplayMode.RETRY.value):
        # Read through a ledger of its own: the worker's ledger is the event loop's, which sends meanwhile.
        with PgLedger(url, connect(url)) as reads:
            decisions = replay_plan(
                reads, origin, ReplayMode(mode or ReplayMode.RESUME.value), platform=platform_for(job)
            )
    plan = build_plan(job, limit=options.limit, stop=signals.requested)
    with plan:
        stats = ReplayStats() if decisions is not None else None
        source: Any = plan if decisions is None else ReplayLanes(plan, decisions, stats)
        queued = enqueue(conn, run_id, source, stop=signals.requested)
        if signals.interrupted():
            return None
        summary = plan.summary()
        staged = plan.staged
        rejected = list(plan.rejected_rows())
        info = {
            "rows_read": sum(s.rows_read for s in staged),
            "rows_clean": sum(s.rows_clean for s in staged),
            "rows_rejected": len(rejected),
            "duplicates_dropped": sum(s.duplicates_dropped for s in staged),
            "requests": summary.total_requests if decisions is None else queued,
            "ids": summary.total_ids,
            "batches": queued,
            "rejects": str(plan.rejects_path.resolve()),
            "origin": origin,
            "replay": None if stats is None else dataclasses.asdict(stats),
        }
        with conn.transaction():
            conn.execute(f"DELETE FROM {S}.rejected_rows WHERE run_id = %s", (run_id,))
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {S}.rejected_rows (run_id, path, row, column_name, reason, ext_id) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    [rejected_row(run_id, r) for r in rejected],
                )
            conn.execute(
                f"UPDATE {S}.runs SET planned = TRUE, planned_info = %s WHERE run_id = %s",
                (json.dumps(info), run_id),
            )
    return info
