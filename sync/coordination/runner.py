"""One worker of a run coordinated through PostgreSQL: ``pushsync run JOB`` with a coordination database.

Every process runs the same steps (docs/scaling.md):

1. **connect** and check the schema (one clear error, exit 2, when the URL, the login or the server is wrong);
2. **join the job's live run**, or start one (a partial unique index allows one ``running`` run per job, so two
   processes starting at once end up in the same run); a new run resumes the job's last unfinished run, as
   ``pushsync run`` does with SQLite;
3. **plan, if leader** (a task beside the sending): whoever takes the run's advisory lock while the run is not
   planned yet reads the input, lists the run's lanes, then plans (or replays) and queues every batch
   (:func:`sync.coordination.queue.enqueue`) and records the input's counts (``runs.planned``: planning done);
   a leader that dies releases the lock with its connection and the next worker to try plans again (same
   batch IDs: nothing is queued twice). A leader whose connection is lost connects again and plans again;
4. **claim and send** as soon as the lanes are listed — while the leader still queues — the queued batches
   (:class:`sync.coordination.queue.QueueLanes`) through the usual dispatcher, pulled only when one of its
   workers is free, with the job's budgets shared by every worker (:mod:`sync.coordination.budget`) and every
   record written to the PostgreSQL ledger. Claims, budget slots and heartbeats connect again when
   PostgreSQL restarts (:class:`sync.coordination._db.Link`), for ``RECONNECT_FOR`` seconds at most;
5. **finish**: the worker that sees no batch left unfinished, once planning is done, records the run's summary
   — built from the ledger, so it counts every worker's requests, the dead ones' included — and every worker
   prints that summary and exits with its code. A worker stopped by SIGINT/SIGTERM drains, gives its unsent
   claims back and exits 4; the others carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from typing import TYPE_CHECKING, Any

import psycopg

from sync.config import Job, SyncMode, same_destination
from sync.coordination._db import SCHEMA, Link, safe_message
from sync.coordination._seams import WorkerOptions, WorkerOutcome, WorkerSignals
from sync.coordination.budget import SharedBudgets
from sync.coordination.leader import lead, stop_planner, until_listed
from sync.coordination.ledger import PgLedger
from sync.coordination.queue import Membership, QueueLanes, heartbeat, worker_id
from sync.coordination.snapshot import commit_when_finished, snapshot_counts
from sync.coordination.summary import held_batches, run_summary_from_ledger
from sync.dispatch.dispatch import Dispatcher, DispatchObserver, DispatchOutcome, DispatchReport
from sync.errors import ExitCode, InterruptedRunError, RunStoppedError, StateError
from sync.ledger.ledger import new_run_id
from sync.logs import get_logger
from sync.planning.planning import check_workdir
from sync.planning.resume import ReplayMode, ReplayStats, unfinished_run
from sync.platforms.registry import platform_for
from sync.report.summary import RunSummary

if TYPE_CHECKING:
    from sync.report.metrics import MetricsServer, RunMetrics

__all__ = ["DEFAULT_LEASE", "run_coordinated", "run_summary_from_ledger"]

S = SCHEMA
DEFAULT_LEASE = 30.0
"""Seconds after its last heartbeat that a worker counts as dead and its batches are taken over."""


async def run_coordinated(
    job: Job, options: WorkerOptions, url: str, signals: WorkerSignals
) -> WorkerOutcome:
    """Run ``job`` as one worker of its run in the coordination database at ``url`` (see the module docstring).

    Raises :class:`CoordinationError` (exit 2) before anything is sent when the database cannot be used."""
    lease = job.coordination.lease if job.coordination is not None else DEFAULT_LEASE
    log = get_logger(job=job.name)
    check_workdir(job.workdir)
    # Before the run is joined or recorded, as a one-process run does (exit 2, nothing recorded): a worker that
    # found a taken port after it had started the run left it running for the next `pushsync run` to join.
    metrics, served = _checked_metrics(job, options)
    worker = worker_id()
    try:
        ledger = PgLedger.open(url, worker=worker)
    except BaseException:
        if served is not None:
            served.close()
        raise
    closers: list[Any] = [ledger] if served is None else [served, ledger]
    try:
        claim_link = await Link.open(url, what="claims")
        closers.append(claim_link)
        member_link = await Link.open(url, what="heartbeats")
        closers.append(member_link)
        budget_link = await Link.open(url, what="budget slots")
        closers.append(budget_link)
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
        membership = Membership(member_link, run_id, worker, lease)
        await membership.join()
        async with heartbeat(membership):
            # Planning runs beside the sending: this worker plans if it takes the leader's lock, and learns
            # when whoever leads is done; the run's completion waits for that.
            planner = asyncio.create_task(lead(job, options, signals, url, run_id), name="run-planner")
            try:
                interrupted: InterruptedRunError | None = None
                try:
                    listed = await until_listed(ledger, run_id, signals, planner)
                except InterruptedRunError as exc:
                    listed, interrupted = False, exc  # this worker led, and its reading of the input stopped
                if not listed:
                    await membership.leave()
                    # The run is recorded (running, not yet planned) whoever stopped: the next worker joins it.
                    raise InterruptedRunError(
                        f"run {run_id}: interrupted before anything was sent, the run not yet planned; it stays "
                        "recorded, and `pushsync run` joins it again and plans it"
                    ) from interrupted
                report, budgets = await _work(
                    job,
                    options,
                    signals,
                    ledger,
                    run_id,
                    membership,
                    (claim_link, budget_link),
                    planner,
                    (metrics, served),
                )
                report, planned = await _planning_done(run_id, ledger, report, planner)
            finally:
                if not planner.done():
                    await stop_planner(planner, signals)
            committed = None
            if job.mode is SyncMode.SNAPSHOT and report.outcome is DispatchOutcome.COMPLETED:
                # Once planning is done and before the run is recorded as ended: a new run of the job must
                # diff against a state that holds this one's confirmed changes.
                committed = await commit_when_finished(job, ledger, run_id)
            await membership.leave()
        summary, status = _finish(job, ledger, run_id, report, planned, budgets)
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
            _same_destination(job, options.run_id, info.destination, job.destination.key)
            return options.run_id, True
    destination = job.destination.key
    for _ in range(5):
        row = conn.execute(
            f"SELECT run_id, destination FROM {S}.runs WHERE job = %s AND status = 'running'", (job.name,)
        ).fetchone()
        if row is not None:
            _same_destination(job, str(row[0]), row[1], destination)
            if options.resume or options.retry:
                raise StateError(
                    f"run {row[0]} of job {job.name} is live: join it with `pushsync run`, or resume/retry once "
                    "it has ended"
                )
            return str(row[0]), True
        origin = options.retry or options.resume
        info = ledger.run(origin) if origin is not None else None
        if origin is not None and info is None:
            raise StateError(f"no run {origin} in {ledger.path}")
        if info is not None and not same_destination(info.destination, destination):
            raise StateError(
                f"run {origin} of job {job.name} sent to another destination ({info.destination}; this worker's "
                f"{job.destination.base_url} is {destination}): resume or retry it with the job pointed there; "
                "nothing was sent"
            )
        if origin is None and options.auto_resume and not options.full_refresh:
            # What another destination confirmed is not on this one: only this destination's unfinished run.
            origin = unfinished_run(ledger, job.name, destination)
            info = ledger.run(origin) if origin is not None else None
        mode = None if origin is None else (ReplayMode.RETRY if options.retry else ReplayMode.RESUME).value
        full_refresh = options.full_refresh or (info is not None and info.full_refresh)
        run_id = options.run_id or new_run_id()
        try:
            conn.execute(
                f"INSERT INTO {S}.runs (run_id, job, job_path, platform, destination, started_at, status, "
                "full_refresh, origin, origin_mode) VALUES (%s, %s, %s, %s, %s, %s, 'running', %s, %s, %s)",
                (
                    run_id,
                    job.name,
                    str(job.path),
                    job.destination.platform,
                    destination,
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


def _same_destination(job: Job, run_id: str, theirs: str | None, ours: str) -> None:
    """Refuse to join ``run_id`` when it sends elsewhere. One job file serving staging and production (its
    ``base_url`` from the environment) has one name: a worker of the one joined the other's live run, sent its
    batches to its own platform and confirmed them, so the other platform never got them — both exited 0."""
    if not same_destination(theirs, ours):
        raise StateError(
            f"run {run_id} of job {job.name} sends to another destination ({theirs}; this worker's "
            f"{job.destination.base_url} is {ours}): a job name is one run at a time in a coordination database — "
            "give the jobs of each destination their own name (or database); nothing was sent"
        )


async def _planning_done(
    run_id: str, ledger: PgLedger, report: DispatchReport, planner: asyncio.Task[dict[str, Any] | None]
) -> tuple[DispatchReport, dict[str, Any]]:
    """This worker's report and the run's planned info once planning is done (a completed worker waits for it:
    the run's completion is decided only then); a worker that stops takes what is recorded so far. Planning
    that fails meanwhile is handled as in :func:`_work` (:func:`_planning_failed`); planning stopped by a signal
    makes a completed report interrupted."""
    if report.outcome is DispatchOutcome.COMPLETED:
        try:
            info = await planner
        except Exception as exc:
            report = _planning_failed(run_id, report, exc)  # raises, unless an interrupt after this one sent
        else:
            if info is not None:
                return report, info
            # A signal stopped the planning (or the wait for it) before anyone recorded it done: this worker
            # sent all it could claim, but the run is not complete — it is interrupted (exit 4), not done.
            report = dataclasses.replace(report, outcome=DispatchOutcome.INTERRUPTED)
    elif planner.done() and not planner.cancelled() and planner.exception() is None:
        info = planner.result()
        if info is not None:
            return report, info
    return report, _planned_info_any(ledger, run_id)


def _planning_failed(run_id: str, report: DispatchReport, exc: BaseException) -> DispatchReport:
    """What this worker says when the planning beside its sending — this worker leading, after the run was
    listed: a worker leading again a run whose earlier leader stopped — ended with ``exc``; ``report``: its
    dispatcher's. Raises the error to show, or returns the report to summarize.

    * SIGINT/SIGTERM while the input was read (:class:`InterruptedRunError`) is no failure, and the run stays
      as it is — listed, its queued batches in the queue: exit 4 either way. A worker that sent nothing says
      so, and what happens to the run; one that sent gets the summary of any stopped worker (its report made
      interrupted: a dispatcher that had nothing left to send completed).
    * Another failure is raised as it is when this worker sent nothing (e.g. exit 2), else as
      :class:`RunStoppedError` (exit 3: never "nothing was sent")."""
    sent = any(s.requests for s in report.endpoints.values())
    if isinstance(exc, InterruptedRunError):
        if not sent:
            raise InterruptedRunError(
                f"run {run_id}: interrupted while the input was read; this worker sent nothing. What is queued "
                "stays in the run: other workers send it, and `pushsync run` joins the run again and plans the "
                "rest"
            ) from exc
        if report.outcome is DispatchOutcome.COMPLETED:
            report = dataclasses.replace(report, outcome=DispatchOutcome.INTERRUPTED)
        return report
    if not sent:
        raise exc  # nothing was sent by this worker: the error as it is (e.g. exit 2)
    raise RunStoppedError(
        f"run {run_id}: this worker stopped after it began sending: planning failed: {safe_message(exc)}"
    ) from exc


def _ended(ledger: PgLedger, run_id: str) -> str | None:
    """The status of ``run_id`` if it has ended (None while it runs)."""
    info = ledger.run(run_id)
    return None if info is None or info.status == "running" else info.status


def _planned_info_any(ledger: PgLedger, run_id: str) -> dict[str, Any]:
    row = ledger._execute(f"SELECT planned_info FROM {S}.runs WHERE run_id = %s", (run_id,)).fetchone()
    return dict(json.loads(row[0])) if row and row[0] else {}


async def _work(
    job: Job,
    options: WorkerOptions,
    signals: WorkerSignals,
    ledger: PgLedger,
    run_id: str,
    membership: Membership,
    links: tuple[Link, Link],
    planner: asyncio.Task[dict[str, Any] | None],
    exporter: tuple[RunMetrics | None, MetricsServer | None],
) -> tuple[DispatchReport, SharedBudgets]:
    """Claim and send until no batch is left (or a stop); the dispatcher's report of this worker's part, and
    the shared budgets it used. Planning may still run: its totals reach the progress display when it is
    done, and a planning failure drains this worker and stops it. ``links``: the claims' and the budget
    slots' connections; ``exporter``: the metrics checked before the run was joined, and their server."""
    claim_link, budget_link = links
    metrics, served = exporter
    watchers: list[DispatchObserver] = [*options.observers]
    bar = None
    if options.progress != "none":
        from sync.report.progress import make_progress

        bar = make_progress(
            total_ids=None,
            total_requests=None,
            enabled={"auto": None, "bar": True, "log": False}[options.progress],
            job=job.name,
            run=run_id,
        )
        watchers.append(bar)
        planner.add_done_callback(lambda task: _set_totals(task, bar))
    if metrics is not None:
        metrics.bind(
            run_id=run_id, job=job.name, platform=job.destination.platform, budget_for=job.dispatch.max_rate
        )
        metrics.instance = membership.worker  # one Pushgateway group per worker
        watchers.append(metrics)
    budgets = SharedBudgets(budget_link, job.dispatch, scope=job.name)
    own_client = options.client is None
    sender = options.client if options.client is not None else platform_for(job).client(job, options.api_key)
    # The queue's lanes hand batches out on demand (sync.dispatch.dispatch.BatchPuller): a batch is claimed
    # only when one of this worker's dispatcher workers is free to send it, so claims are never held unsent.
    source = QueueLanes(claim_link, ledger, membership, stop=signals.event)
    dispatcher = Dispatcher(
        sender,
        job.dispatch,
        ledger=ledger,
        run_id=run_id,
        stop=signals.event,
        observers=watchers,
        budget_factory=options.budget_factory or budgets.budget,
    )
    signals.dispatcher = dispatcher
    log = get_logger(job=job.name, run=run_id)
    planning_failed: BaseException | None = None
    try:
        async with (
            metrics.exporting(
                server=served, textfile=options.metrics_textfile, pushgateway=options.metrics_pushgateway
            )
            if metrics is not None
            else contextlib.nullcontext()
        ):
            sending = asyncio.create_task(dispatcher.run(source), name="dispatch")
            while not sending.done():
                await asyncio.wait(
                    [sending] if planner.done() else [sending, planner], return_when=asyncio.FIRST_COMPLETED
                )
                if planning_failed is None and planner.done() and not planner.cancelled():
                    planning_failed = planner.exception()
                    if planning_failed is not None:
                        # The run cannot complete: drain what is in flight, record it, then say why.
                        dispatcher.stop_event.set()
            try:
                report = sending.result()
            except Exception as exc:
                cause = _leaf(exc)
                log.error(
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
    if planning_failed is not None:
        report = _planning_failed(run_id, report, planning_failed)
    log.info(
        "worker.done",
        claimed=source.claimed,
        claim_ms=round(source.claim_seconds * 1000, 1),
        budget_acquisitions=budgets.acquisitions,
        budget_ms=round(budgets.seconds * 1000, 1),
        reconnections=claim_link.generation + budget_link.generation,
    )
    return report, budgets


def _set_totals(task: asyncio.Task[dict[str, Any] | None], progress: Any) -> None:
    """Give the progress display the run's totals once planning is done."""
    if task.cancelled() or task.exception() is not None:
        return
    info = task.result()
    if info is not None:
        progress.set_totals(int(info.get("ids", 0)), int(info.get("requests", 0)))


def _checked_metrics(job: Job, options: WorkerOptions) -> tuple[RunMetrics | None, MetricsServer | None]:
    """The worker's metrics (None when none are asked for), their textfile and Pushgateway URL checked and their
    port bound: :class:`sync.errors.StateError` (exit 2) for one that cannot be used. The run ID is bound later."""
    if (
        options.metrics_port is None
        and options.metrics_textfile is None
        and options.metrics_pushgateway is None
    ):
        return None, None
    from sync.report.metrics import RunMetrics  # prometheus_client only when metrics are asked for

    metrics = RunMetrics(job=job.name, platform=job.destination.platform, budget_for=job.dispatch.max_rate)
    if options.metrics_textfile is not None:
        metrics.check_textfile(options.metrics_textfile)
    if options.metrics_pushgateway is not None:
        metrics.check_pushgateway(options.metrics_pushgateway)
    return metrics, None if options.metrics_port is None else metrics.serve(options.metrics_port)


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
    ledger: PgLedger,
    run_id: str,
    report: DispatchReport,
    planned: dict[str, Any],
    budgets: SharedBudgets,
) -> tuple[RunSummary, str | None]:
    """The run's summary from the ledger; recorded (and the run ended) by the worker that finds nothing left
    once planning is done. Returns the summary and the status this worker recorded (None: it ended nothing)."""
    ledger.flush()
    conn = ledger._conn
    margin_for = budgets.group_margin
    if report.outcome is not DispatchOutcome.COMPLETED:
        # This worker stops (signal, 401/403): the others may carry on; an abort ends the run for everyone.
        summary = run_summary_from_ledger(job, ledger, run_id, planned, outcome=report, margin_for=margin_for)
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
        row = conn.execute(
            f"SELECT status, planned FROM {S}.runs WHERE run_id = %s FOR UPDATE", (run_id,)
        ).fetchone()
        summary = run_summary_from_ledger(job, ledger, run_id, planned, outcome=report, margin_for=margin_for)
        if row is None or row[0] != "running" or not row[1]:
            return summary, None  # ended by another worker, or planning not done (a stop came meanwhile)
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
