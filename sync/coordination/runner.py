"""One worker of a run coordinated through PostgreSQL: ``pushsync run JOB`` with a coordination database.

Every process runs the same steps (docs/scaling.md):

1. **connect** and check the schema (one clear error, exit 2, when the URL, the login or the server is wrong);
2. **join the job's live run**, or start one (a partial unique index allows one ``running`` run per job, so two
   processes starting at once end up in the same run); a new run resumes the job's last unfinished run, as
   ``pushsync run`` does with SQLite;
3. **plan, if leader**: whoever takes the run's advisory lock while the run is not planned yet reads the input,
   plans (or replays) and queues every batch (:func:`sync.coordination.queue.enqueue`); a leader that dies
   releases the lock with its connection and the next worker to try plans again (same batch IDs: nothing is
   queued twice);
4. **claim and send** the queued batches (:class:`sync.coordination.queue.QueueLanes`) through the usual
   dispatcher, with the job's budgets shared by every worker (:mod:`sync.coordination.budget`) and every
   record written to the PostgreSQL ledger;
5. **finish**: the worker that sees no batch left unfinished records the run's summary — built from the ledger,
   so it counts every worker's requests, the dead ones' included — and every worker prints that summary and
   exits with its code. A worker stopped by SIGINT/SIGTERM drains, gives its unsent claims back and exits 4;
   the others carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import psycopg

from sync.config import Job, SyncMode
from sync.coordination._db import SCHEMA, async_connect, connect, safe_message
from sync.coordination._seams import WorkerOptions, WorkerOutcome, WorkerSignals
from sync.coordination.budget import SharedBudgets
from sync.coordination.ledger import PgLedger
from sync.coordination.queue import Membership, QueueLanes, enqueue, heartbeat, worker_id
from sync.coordination.snapshot import commit_when_finished, plan_snapshot, snapshot_counts
from sync.dispatch.dispatch import (
    Dispatcher,
    DispatchObserver,
    DispatchOutcome,
    DispatchReport,
    EndpointStats,
)
from sync.errors import (
    ExitCode,
    InterruptedRunError,
    PushSyncError,
    RunStoppedError,
    StateError,
)
from sync.ledger.ledger import new_run_id
from sync.logs import get_logger
from sync.planning.planning import build_plan, check_workdir
from sync.planning.resume import ReplayLanes, ReplayMode, ReplayStats, replay_plan, unfinished_run
from sync.platforms.registry import platform_for
from sync.redact import redact
from sync.report.summary import RunInput, RunSummary, summarise

if TYPE_CHECKING:
    from sync.report.metrics import RunMetrics

__all__ = ["DEFAULT_LEASE", "run_coordinated", "run_summary_from_ledger"]

S = SCHEMA
DEFAULT_LEASE = 30.0
"""Seconds after its last heartbeat that a worker counts as dead and its batches are taken over."""
_LEADER_POLL = 0.5


async def run_coordinated(
    job: Job, options: WorkerOptions, url: str, signals: WorkerSignals
) -> WorkerOutcome:
    """Run ``job`` as one worker of its run in the coordination database at ``url`` (see the module docstring).

    Raises :class:`CoordinationError` (exit 2) before anything is sent when the database cannot be used."""
    lease = job.coordination.lease if job.coordination is not None else DEFAULT_LEASE
    log = get_logger(job=job.name)
    check_workdir(job.workdir)
    worker = worker_id()
    ledger = PgLedger.open(url, worker=worker)
    closers: list[Any] = [ledger]
    try:
        lead_conn = connect(url)
        closers.append(lead_conn)
        claim_conn = await async_connect(url)
        member_conn = await async_connect(url)
        budget_conn = await async_connect(url)
        closers += [claim_conn, member_conn, budget_conn]
        run_id, joined = _join_or_start(ledger, job, options)
        ended = _ended(ledger, run_id)
        if ended is not None:
            log.info("run.already_ended", run=run_id, status=ended)
            recorded = _planned_info_any(ledger, run_id)
            done = DispatchReport(
                outcome=DispatchOutcome.COMPLETED,
                endpoints={},
                elapsed=0.0,
                batches_done=0,
                batches_unfinished=0,
            )
            summary = run_summary_from_ledger(job, ledger, run_id, recorded, outcome=done)
            return WorkerOutcome(
                run_id=run_id, exit_code=summary.exit_code, summary=summary, ledger=ledger.path
            )
        log.info("worker.start", run=run_id, worker=worker, joined=joined)
        membership = Membership(member_conn, run_id, worker, lease)
        await membership.join()
        async with heartbeat(membership):
            planned = await _plan_when_leader(job, options, signals, ledger, lead_conn, run_id)
            if planned is None:  # stopped before anything was sent by this worker
                await membership.leave()
                raise InterruptedRunError("interrupted before anything was sent; nothing was recorded")
            report = await _work(
                job, options, signals, ledger, run_id, membership, claim_conn, budget_conn, planned
            )
            committed = None
            if job.mode is SyncMode.SNAPSHOT and report.outcome is DispatchOutcome.COMPLETED:
                # Before the run is recorded as ended: a new run of the job must diff against a state that
                # holds this one's confirmed changes.
                committed = await commit_when_finished(job, ledger, run_id)
            await membership.leave()
        summary, status = _finish(job, options, ledger, run_id, report, planned)
        if options.alert_url is not None and job.alerts is not None and status is not None:
            await _alert(job, options.alert_url, ledger, summary)
        held = held_batches(ledger, run_id)
        if held:
            log.warning(
                "run.held",
                run=run_id,
                batches=held,
                hint=f"non-idempotent batches a dead worker had sent (outcome unknown) were not sent again: "
                f"check the platform, then `pushsync retry {run_id}` sends them",
            )
        log.info("run.end", run=run_id, worker=worker, exit_code=int(summary.exit_code), finished_run=status)
        return WorkerOutcome(
            run_id=run_id,
            exit_code=summary.exit_code,
            summary=summary,
            ledger=ledger.path,
            resumed_from=planned.get("origin"),
            replay=ReplayStats(**planned["replay"]) if planned.get("replay") else None,
            diff=snapshot_counts(planned),
            committed=committed,
        )
    finally:
        for closer in reversed(closers):
            with contextlib.suppress(Exception):
                result = closer.close()
                if asyncio.iscoroutine(result):
                    await result


def _join_or_start(ledger: PgLedger, job: Job, options: WorkerOptions) -> tuple[str, bool]:
    """(run ID, joined) — the job's live run, or a new one (resuming the last unfinished run, if any)."""
    conn = ledger._conn
    if options.run_id is not None:
        # Every worker of one deployment names the same run (e.g. the Kubernetes Job's name): a worker started
        # again after the run ended reports it instead of starting the job over.
        info = ledger.run(options.run_id)
        if info is not None:
            if info.job != job.name:
                raise StateError(f"run {options.run_id} belongs to job {info.job}, not {job.name}")
            return options.run_id, True
    for _ in range(5):
        row = conn.execute(
            f"SELECT run_id FROM {S}.runs WHERE job = %s AND status = 'running'", (job.name,)
        ).fetchone()
        if row is not None:
            if options.resume or options.retry:
                raise StateError(
                    f"run {row[0]} of job {job.name} is live: join it with `pushsync run`, or resume/retry once "
                    "it has ended"
                )
            return str(row[0]), True
        origin = options.retry or options.resume
        if origin is not None and ledger.run(origin) is None:
            raise StateError(f"no run {origin} in {ledger.path}")
        if origin is None and options.auto_resume and not options.full_refresh:
            origin = unfinished_run(ledger, job.name)
        mode = None if origin is None else (ReplayMode.RETRY if options.retry else ReplayMode.RESUME).value
        info = ledger.run(origin) if origin is not None else None
        full_refresh = options.full_refresh or (info is not None and info.full_refresh)
        run_id = options.run_id or new_run_id()
        try:
            conn.execute(
                f"INSERT INTO {S}.runs (run_id, job, job_path, platform, started_at, status, full_refresh, origin, "
                "origin_mode) VALUES (%s, %s, %s, %s, %s, 'running', %s, %s, %s)",
                (
                    run_id,
                    job.name,
                    str(job.path),
                    job.destination.platform,
                    time.time(),
                    full_refresh,
                    origin,
                    mode,
                ),
            )
            return run_id, False
        except psycopg.errors.UniqueViolation:
            continue  # another worker started the run a moment ago: join it
    raise StateError(f"job {job.name}: could not start or join a run (runs are being started and ended fast)")


async def _plan_when_leader(
    job: Job, options: WorkerOptions, signals: WorkerSignals, ledger: PgLedger, lead_conn: Any, run_id: str
) -> dict[str, Any] | None:
    """Wait until the run is planned, planning it when this worker takes the leader's lock; the run's planned
    info (rows read, expected requests...), or None when stopped first."""
    log = get_logger(job=job.name, run=run_id)
    while True:
        info = _planned_info(ledger, run_id)
        if info is not None:
            return info
        if signals.interrupted():
            return None
        got = lead_conn.execute(
            "SELECT pg_try_advisory_lock(hashtext(%s))", (f"pushsync.plan:{run_id}",)
        ).fetchone()
        if got and got[0]:
            try:
                info = _planned_info(ledger, run_id)
                if info is None:
                    log.info("run.leader", hint="planning and queueing the run's batches")
                    try:
                        planner = plan_snapshot if job.mode is SyncMode.SNAPSHOT else _plan_and_enqueue
                        info = await asyncio.to_thread(
                            planner, job, options, signals, ledger, lead_conn, run_id
                        )
                    except PushSyncError as exc:
                        if exc.exit_code is ExitCode.BAD_JOB_OR_INPUT:
                            # The input (or the job) cannot be planned: end the run, so the other workers stop
                            # waiting for a plan and say why, instead of each trying the same input in turn.
                            ledger.finish_run(
                                run_id,
                                status="aborted",
                                exit_code=int(exc.exit_code),
                                message=f"not planned: {redact(str(exc))}",
                            )
                        raise
                    if info is None:
                        return None
                return info
            finally:
                lead_conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (f"pushsync.plan:{run_id}",))
        await asyncio.sleep(_LEADER_POLL)


def _ended(ledger: PgLedger, run_id: str) -> str | None:
    """The status of ``run_id`` if it has ended (None while it runs)."""
    info = ledger.run(run_id)
    return None if info is None or info.status == "running" else info.status


def _planned_info_any(ledger: PgLedger, run_id: str) -> dict[str, Any]:
    row = ledger._execute(f"SELECT planned_info FROM {S}.runs WHERE run_id = %s", (run_id,)).fetchone()
    return dict(json.loads(row[0])) if row and row[0] else {}


def _planned_info(ledger: PgLedger, run_id: str) -> dict[str, Any] | None:
    row = ledger._execute(
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
    job: Job, options: WorkerOptions, signals: WorkerSignals, ledger: PgLedger, conn: Any, run_id: str
) -> dict[str, Any] | None:
    """The leader's work (in a thread): plan (or replay), queue every batch, record the rejected rows and the
    planned info, in that order; None when a signal stopped it."""
    row = conn.execute(f"SELECT origin, origin_mode FROM {S}.runs WHERE run_id = %s", (run_id,)).fetchone()
    origin, mode = (row[0], row[1]) if row else (None, None)
    decisions = None
    if origin is not None and not (options.full_refresh and mode == ReplayMode.RETRY.value):
        decisions = replay_plan(
            ledger, origin, ReplayMode(mode or ReplayMode.RESUME.value), platform=platform_for(job)
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
                    [(run_id, r.path, r.row, r.column, r.reason, r.ext_id) for r in rejected],
                )
            conn.execute(
                f"UPDATE {S}.runs SET planned = TRUE, planned_info = %s WHERE run_id = %s",
                (json.dumps(info), run_id),
            )
    return info


async def _work(
    job: Job,
    options: WorkerOptions,
    signals: WorkerSignals,
    ledger: PgLedger,
    run_id: str,
    membership: Membership,
    claim_conn: Any,
    budget_conn: Any,
    planned: dict[str, Any],
) -> DispatchReport:
    """Claim and send until no batch is left (or a stop); the dispatcher's report of this worker's part."""
    watchers: list[DispatchObserver] = [*options.observers]
    bar = None
    if options.progress != "none":
        from sync.report.progress import make_progress

        bar = make_progress(
            total_ids=int(planned.get("ids", 0)),
            total_requests=int(planned.get("requests", 0)),
            enabled={"auto": None, "bar": True, "log": False}[options.progress],
            job=job.name,
            run=run_id,
        )
        watchers.append(bar)
    wants_metrics = (
        options.metrics_port is not None
        or options.metrics_textfile is not None
        or options.metrics_pushgateway is not None
    )
    metrics = _metrics_for(job, run_id) if wants_metrics else None
    if metrics is not None:
        metrics.instance = membership.worker  # one Pushgateway group per worker
        watchers.append(metrics)
    budgets = SharedBudgets(budget_conn, job.dispatch, scope=job.name)
    own_client = options.client is None
    sender = options.client if options.client is not None else platform_for(job).client(job, options.api_key)
    source = QueueLanes(claim_conn, ledger, membership, stop=signals.event)
    # One batch per pull: the dispatcher reads an asynchronous lane until it has as many batches as its channel
    # has room for, and a lane of the queue waits (polling) while other workers hold the last batches of its
    # endpoint — with more room, batches this worker claimed would wait in that pull instead of being sent, and
    # workers polling for each other's batches would never finish. Claims are the queue's bound.
    settings = dataclasses.replace(job.dispatch, queue_size=1)
    dispatcher = Dispatcher(
        sender,
        settings,
        ledger=ledger,  # type: ignore[arg-type]
        run_id=run_id,
        stop=signals.event,
        observers=watchers,
        budget_factory=options.budget_factory or budgets.budget,
    )
    signals.dispatcher = dispatcher
    try:
        async with (
            metrics.exporting(
                port=options.metrics_port,
                textfile=options.metrics_textfile,
                pushgateway=options.metrics_pushgateway,
            )
            if metrics is not None
            else contextlib.nullcontext()
        ):
            try:
                report = await dispatcher.run(source)
            except Exception as exc:
                cause = _leaf(exc)
                get_logger(job=job.name, run=run_id).error(
                    "worker.failed", error=f"{type(cause).__name__}: {safe_message(cause)}", exc_info=cause
                )
                raise RunStoppedError(
                    f"run {run_id}: this worker stopped after it began sending: {safe_message(cause)}. What the "
                    "platform confirmed is in the ledger; other workers carry on, and `pushsync run` joins the run "
                    "again once the cause is fixed"
                ) from exc
            if metrics is not None:
                await metrics.finish(0 if report.outcome is DispatchOutcome.COMPLETED else 1)
    finally:
        signals.dispatcher = None
        if bar is not None:
            bar.close()
        if own_client:
            await sender.aclose()
    get_logger(job=job.name, run=run_id).info(
        "worker.done",
        claimed=source.claimed,
        claim_ms=round(source.claim_seconds * 1000, 1),
        budget_acquisitions=budgets.acquisitions,
        budget_ms=round(budgets.seconds * 1000, 1),
    )
    return report


def _metrics_for(job: Job, run_id: str) -> RunMetrics:
    from sync.report.metrics import RunMetrics  # prometheus_client only when metrics are asked for

    return RunMetrics(
        run_id=run_id, job=job.name, platform=job.destination.platform, budget_for=job.dispatch.max_rate
    )


async def _alert(job: Job, url: str, ledger: PgLedger, summary: RunSummary) -> None:
    """Post an alert if the run needs a person (as :func:`sync.run.run` does; the usual duration is that of the
    job's last successful runs)."""
    from sync.report.alerts import alert_reasons, post_alert

    assert job.alerts is not None
    usual = [
        r.finished_at - r.started_at
        for r in ledger.runs(summary.job)
        if r.run_id != summary.run_id and r.exit_code == 0 and r.finished_at is not None
    ]
    reasons = alert_reasons(job.alerts, summary, usual)
    if reasons:
        await post_alert(url, summary, reasons, within=job.alerts.timeout)


def _leaf(exc: BaseException) -> BaseException:
    """The first exception inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _finish(
    job: Job,
    options: WorkerOptions,
    ledger: PgLedger,
    run_id: str,
    report: DispatchReport,
    planned: dict[str, Any],
) -> tuple[RunSummary, str | None]:
    """The run's summary from the ledger; recorded (and the run ended) by the worker that finds nothing left.
    Returns the summary and the status this worker recorded (None: it ended nothing)."""
    ledger.flush()
    conn = ledger._conn
    if report.outcome is not DispatchOutcome.COMPLETED:
        # This worker stops (signal, 401/403): the others may carry on; an abort ends the run for everyone.
        summary = run_summary_from_ledger(job, ledger, run_id, planned, outcome=report)
        if report.outcome is DispatchOutcome.ABORTED:
            with conn.transaction():
                conn.execute(
                    f"UPDATE {S}.runs SET status = 'aborted', finished_at = %s, exit_code = %s, message = %s, "
                    "summary = %s WHERE run_id = %s AND status = 'running'",
                    (
                        time.time(),
                        int(summary.exit_code),
                        summary.message,
                        json.dumps(summary.to_json()),
                        run_id,
                    ),
                )
            return summary, "aborted"
        return summary, None
    with conn.transaction():
        row = conn.execute(f"SELECT status FROM {S}.runs WHERE run_id = %s FOR UPDATE", (run_id,)).fetchone()
        summary = run_summary_from_ledger(job, ledger, run_id, planned, outcome=report)
        if row is None or row[0] != "running":
            return summary, None
        status = "done" if summary.exit_code is ExitCode.OK else "partial"
        conn.execute(
            f"UPDATE {S}.runs SET status = %s, finished_at = %s, exit_code = %s, message = %s, summary = %s "
            "WHERE run_id = %s",
            (
                status,
                time.time(),
                int(summary.exit_code),
                summary.message,
                json.dumps(summary.to_json()),
                run_id,
            ),
        )
    return summary, status


def run_summary_from_ledger(
    job: Job, ledger: PgLedger, run_id: str, planned: dict[str, Any], *, outcome: DispatchReport
) -> RunSummary:
    """The whole run's summary (every worker's requests, the dead ones' too), read from the ledger."""
    conn = ledger._conn
    stats: dict[str, EndpointStats] = {}

    def of(endpoint: str) -> EndpointStats:
        return stats.setdefault(endpoint, EndpointStats(endpoint))

    for endpoint, batches, ok, rejected, failed in conn.execute(
        f"SELECT endpoint, count(*) FILTER (WHERE status NOT IN ('planned')), sum(ok_ids), sum(rejected_ids), "
        f"sum(n_ids - ok_ids - rejected_ids) FILTER (WHERE status = 'failed') FROM {S}.batches WHERE run_id = %s "
        "GROUP BY endpoint ORDER BY min(seq)",
        (run_id,),
    ):
        s = of(endpoint)
        s.batches, s.ids_ok, s.ids_rejected, s.ids_failed = (
            int(batches),
            int(ok or 0),
            int(rejected or 0),
            int(failed or 0),
        )
    for endpoint, requests, limited, retries, first, last in conn.execute(
        f"SELECT endpoint, count(*), count(*) FILTER (WHERE outcome = 'rate_limited'), "
        f"count(*) FILTER (WHERE attempt > 1), min(started_at), max(started_at) FROM {S}.attempts "
        "WHERE run_id = %s GROUP BY endpoint",
        (run_id,),
    ):
        s = of(endpoint)
        s.requests, s.rate_limited, s.retries = int(requests), int(limited), int(retries)
        s.first_request, s.last_request = first, last
    for endpoint, latency in conn.execute(
        f"SELECT endpoint, latency FROM {S}.attempts WHERE run_id = %s ORDER BY id DESC LIMIT 100000",
        (run_id,),
    ):
        of(endpoint).latencies.append(float(latency))
        of(endpoint).latency_count += 1
    for endpoint, s in stats.items():
        spec = job.dispatch.budgets.get(endpoint) or job.dispatch.budgets.get("*")
        if spec is None:
            groups = [g for g in job.dispatch.budget_groups if g.holds(endpoint)]
            spec = groups[0].budget if len(groups) == 1 else None
        if spec is None:
            continue
        s.budget_requests, s.budget_period = spec.requests, spec.period
        for (started,) in conn.execute(
            f"SELECT started_at FROM {S}.attempts WHERE run_id = %s AND endpoint = %s", (run_id, endpoint)
        ):
            w = math.floor(started / spec.period)
            s.per_window[w] = s.per_window.get(w, 0) + 1
    counts = dict(
        conn.execute(
            f"SELECT status, count(*) FROM {S}.batches WHERE run_id = %s GROUP BY status", (run_id,)
        ).fetchall()
    )
    done = sum(int(n) for status, n in counts.items() if status in ("ok", "rejected", "failed"))
    unfinished = sum(int(n) for status, n in counts.items() if status in ("planned", "sent"))
    started_row = conn.execute(f"SELECT started_at FROM {S}.runs WHERE run_id = %s", (run_id,)).fetchone()
    report = DispatchReport(
        outcome=outcome.outcome,
        endpoints=stats,
        elapsed=time.time() - (started_row[0] if started_row else time.time()),
        batches_done=done,
        batches_unfinished=unfinished,
        fatal=outcome.fatal,
    )
    return summarise(
        report,
        run_id=run_id,
        job=job.name,
        rows_rejected=int(planned.get("rows_rejected", 0)),
        ledger=ledger.path,
        rejects=planned.get("rejects"),
        thresholds=job.thresholds,
        rows_read=int(planned.get("rows_read", 0)),
        input_=_input_of(job, planned),
    )


def held_batches(ledger: PgLedger, run_id: str) -> int:
    """Batches held back (non-idempotent, sent by a worker that died: outcome unknown)."""
    row = ledger._execute(
        f"SELECT count(*) FROM {S}.batches WHERE run_id = %s AND held", (run_id,)
    ).fetchone()
    return int(row[0]) if row else 0


def _input_of(job: Job, planned: dict[str, Any]) -> RunInput:
    """What the leader read, and where the run sends (the host only, as :func:`sync.run.run` records it)."""
    url = urlsplit(job.destination.base_url)
    try:
        port = url.port
    except ValueError:
        port = None
    return RunInput(
        rows_read=int(planned.get("rows_read", 0)),
        rows_clean=int(planned.get("rows_clean", 0)),
        rows_rejected=int(planned.get("rows_rejected", 0)),
        duplicates_dropped=int(planned.get("duplicates_dropped", 0)),
        mode=job.mode.value,
        platform=job.destination.platform,
        host=redact(url.hostname or "") + (f":{port}" if port else ""),
        snapshot=planned.get("snapshot_input"),
    )
