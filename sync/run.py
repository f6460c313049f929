"""One run of a job, whatever its mode: the orchestrator behind ``pushsync run``, ``resume``, ``retry``, the demo
and the tests.

:func:`run` takes the job and a :class:`RunOptions` value and does, in order:

1. **lock** the job's state directory (one run of a job at a time) and open the ledger — once for the run;
2. **choose the batch source** by mode: the plan itself (changes mode), the plan filtered by what the ledger
   confirmed (resume/retry, :mod:`sync.planning.resume`), or the diff from the confirmed state (snapshot mode,
   :mod:`sync.state`, after recovering what crashed runs confirmed);
3. **dispatch** it (:class:`sync.dispatch.dispatch.Dispatcher`), every result recorded in the ledger as it comes;
4. **record** the run's summary and, in snapshot mode, **commit** the confirmed part into the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import signal
import threading
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from sync._startup import mark_startup, startup_marks
from sync.config import Alerts, Job, SourceKind, SyncMode, same_destination, sample_notes, shared_fields
from sync.errors import (
    BadJobError,
    ExitCode,
    InterruptedRunError,
    JobProblem,
    PushSyncError,
    RunStoppedError,
    StateError,
)
from sync.ledger.ledger import Ledger, RunInfo, new_run_id
from sync.logs import get_logger
from sync.planning.planning import Plan, build_plan, check_workdir
from sync.planning.resume import ReplayLanes, ReplayMode, ReplayPlan, ReplayStats, replay_plan, unfinished_run
from sync.platforms.base import PlatformClient
from sync.platforms.registry import platform_for, preload_client
from sync.records import Batch
from sync.redact import redact, register_secret
from sync.report.progress import make_progress

# The state store's lock guards every run; the rest of the snapshot machinery (sync.state: the differ, the
# commit), the summary and the alerts are imported where a run reaches them, after its first request (issue 13).
from sync.state._store import StateStore

if TYPE_CHECKING:
    from sync.dispatch.budget import Budget
    from sync.dispatch.dispatch import Dispatcher, DispatchObserver, LaneSource
    from sync.report.metrics import RunMetrics
    from sync.report.summary import RunInput, RunSummary
    from sync.state import CommitReport, DiffCounts, SnapshotDiff

__all__ = ["LEDGER_FILE", "RunOptions", "RunOutcome", "StopSignals", "ledger_path_for", "make_client", "run"]

LEDGER_FILE = "ledger.sqlite"

Progress = Literal["auto", "bar", "log", "none"]
if TYPE_CHECKING:
    BatchSource = Iterable[Batch] | AsyncIterable[Batch] | LaneSource
    """What the dispatcher sends: batches in phase order (one queue) or per-endpoint lanes (the plan, a replay)."""

_DISPATCH = "sync.dispatch.dispatch"
"""The dispatcher's module (and with it the rest of sync.dispatch): imported where a run sends, after its plan's
head is ready — preloaded with the connector, on its thread, while the head is read (issue 13: start-up)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """How to run a job, beyond the job file itself (httpx's ``Limits``/``Timeout`` spirit: one small frozen value
    instead of keyword arguments passed through layers).

    Which batches: ``resume``/``retry`` name a run to resume or retry (changes mode); without them a changes
    job whose last run did not finish resumes it (``auto_resume``); ``full_refresh`` sends everything (changes)
    or ignores the confirmed state (snapshot); ``force`` passes snapshot mode's removal threshold.
    How it shows: ``progress`` (``auto``: a bar on a terminal, log lines otherwise), Prometheus metrics on
    ``metrics_port`` / in ``metrics_textfile`` while the run lasts (and to ``metrics_pushgateway`` at its end) (a port that cannot be bound raises
    :class:`sync.errors.StateError` before anything is sent). ``handle_signals``: SIGINT/SIGTERM handlers for the
    whole run (:class:`StopSignals`): while the input is read, planned or diffed the first stops the run with
    nothing recorded (:class:`sync.errors.InterruptedRunError`, exit 4); once sending began, the first drains and
    writes the summary, a second cancels what is in flight. ``stop``: an event that does the same as the first
    signal once sending began. ``client``, ``budget_factory``, ``observers``: seams for embedding and tests.
    """

    api_key: str = field(repr=False)
    """The platform's key (from :func:`sync.config.resolve_secret`); never printed."""
    workdir: Path | None = None
    """Overrides the job's workdir (state, ledger, rejects)."""
    run_id: str | None = None
    resume: str | None = None
    retry: str | None = None
    auto_resume: bool = True
    full_refresh: bool = False
    force: bool = False
    limit: int | None = None
    """A sample run (``--limit N``): of each source only the first N rows that pass validation
    (:func:`sync.planning.planning.build_plan`). Changes mode only: a snapshot run of a sample would read every other
    user as gone."""
    selection: str | None = None
    """How the caller cut the job down to some of its sources (``--select a``, ``--exclude b``), as the user wrote
    it; None: every source. Such a run (or a ``limit`` one) does not resume an unfinished run: it would end its
    chain unfinished (see :func:`_refuse_a_partial_resume`)."""
    progress: Progress = "none"
    handle_signals: bool = False
    metrics_port: int | None = None
    metrics_textfile: Path | None = None
    metrics_pushgateway: str | None = None
    """Push the run's metrics to this Prometheus Pushgateway URL when it ends (sync.report.metrics)."""
    alert_url: str | None = None
    """The job's alert webhook, resolved by the caller (:func:`sync.report.alerts.resolve_webhook`); None: no alerts."""
    stop: asyncio.Event | None = None
    client: PlatformClient | None = None
    budget_factory: Callable[[str], Budget] | None = None
    observers: Sequence[DispatchObserver] = ()
    database_url: str | None = field(default=None, repr=False)
    """A PostgreSQL URL: run as one worker of the job's run coordinated there (:mod:`sync.coordination`,
    docs/scaling.md); None: the embedded SQLite ledger, one process. Never printed (it may hold a password)."""


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a run ended: its ID, the exit code for schedulers, the summary, where the ledger is, and what resume,
    retry or the snapshot state did around it."""

    run_id: str
    exit_code: ExitCode
    summary: RunSummary
    ledger_path: Path | str
    """The SQLite ledger's path, or ``user@host:port/db`` of a coordination database."""
    mode: str = SyncMode.CHANGES.value
    resumed_from: str | None = None
    replay: ReplayStats | None = None
    diff: DiffCounts | None = None
    """Snapshot mode: what the diff found."""
    committed: CommitReport | None = None
    """Snapshot mode: what entered the state."""
    recovered: tuple[CommitReport, ...] = ()
    """Snapshot mode: commits of earlier runs that had not finished."""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mode": self.mode, **self.summary.to_json()}
        if self.resumed_from:
            doc["resumed_from"] = self.resumed_from
        if self.replay is not None:
            doc["replay"] = self.replay.to_json()
        if self.diff is not None:
            doc["diff"] = self.diff.to_json()
        if self.committed is not None:
            doc["state"] = {
                "batches_confirmed": self.committed.batches_confirmed,
                "batches_unconfirmed": self.committed.batches_unconfirmed,
                "users_updated": dict(self.committed.users_updated),
                "users": dict(self.committed.rows),
            }
        if self.recovered:
            doc["recovered_runs"] = [r.run_id for r in self.recovered]
        return doc

    def render_text(self) -> str:
        lines = [self.summary.render_text()]
        if self.resumed_from and self.replay is not None:
            r = self.replay
            lines.append(
                f"resumed run {self.resumed_from}: {r.sent} batches left to send, {r.skipped_confirmed} already "
                f"confirmed, "
                f"{r.skipped_refused} refused (see `pushsync retry`), {r.held} held (non-idempotent, outcome "
                f"unknown: `pushsync retry` sends them), {r.cut_to_refused} cut to their refused rows"
            )
            if r.ids_deleted or r.rows_deleted:
                lines.append(
                    f"deleted users: {r.ids_deleted} IDs and {r.rows_deleted} event/push rows left out (a run "
                    "deleted these users: sending them now would re-create them)"
                )
            if r.rows_confirmed or r.rows_held or r.rows_refused:
                lines.append(
                    f"events and pushes: {r.rows_confirmed} rows already confirmed (not sent again), "
                    f"{r.rows_held} held (sent, outcome unknown: `pushsync retry` sends them), {r.rows_refused} "
                    "refused (see `pushsync retry`)"
                )
        if self.recovered:
            lines.append("recovered unfinished run(s): " + ", ".join(r.run_id for r in self.recovered))
        if self.diff is not None:
            d = self.diff
            lines.append(
                f"snapshot: {d.users_current} users in the export, {d.users_state} in the state; {d.users_changed} "
                f"changed ({d.users_new} new), {d.users_unchanged} unchanged, {d.users_left} left "
                f"({d.users_removed} removed)"
            )
            if d.users_held:
                lines.append(
                    f"snapshot: {d.users_held} users missing from the clean export because their rows were "
                    "rejected: their state is kept and they are not removed (fix the rows: rejects.csv)"
                )
            if d.removals_held:
                lines.append(
                    f"snapshot: {d.removals_held} users left the export but were not removed: a rejected row names "
                    "no user we can trust (a malformed record), so it may be any of them. Fix the file, or run "
                    "with --force to remove them anyway"
                )
        if self.committed is not None:
            c = self.committed
            # The summary's "N batches unfinished" counts batches the stop left without an answer; they are
            # part of the unconfirmed ones here, with the failed and refused: say so, with both counts.
            unfinished = min(self.summary.batches_unfinished, c.batches_unconfirmed)
            lines.append(
                f"state: {sum(c.users_updated.values())} users updated from {c.batches_confirmed} confirmed "
                f"batches; {c.batches_unconfirmed} batches not confirmed ({unfinished} unfinished, "
                f"{c.batches_unconfirmed - unfinished} failed or refused): the next run sends their changes again"
            )
        return "\n".join(lines)


class StopSignals:
    """What SIGINT/SIGTERM do to a run, from its first step (reading the input) to its last (the state commit).

    Before sending begins, the first signal stops the run at the next chunk the planner reads (or key range
    the differ diffs): :class:`sync.errors.InterruptedRunError`, nothing recorded, exit 4. Once the dispatcher
    runs, the first signal drains in-flight batches and a second cancels them (exit 4 either way).
    Install with :meth:`installed` (inside the event loop)."""

    __slots__ = ("dispatcher", "event", "requested")

    def __init__(self, event: asyncio.Event | None = None) -> None:
        self.event: asyncio.Event = event if event is not None else asyncio.Event()  # the dispatcher's stop
        self.requested: threading.Event = threading.Event()  # read by the planning and diff threads
        self.dispatcher: Dispatcher | None = None  # set while the run sends

    def interrupted(self) -> bool:
        """True once SIGINT/SIGTERM asked the run to stop."""
        return self.requested.is_set()

    def on_signal(self, sig: signal.Signals) -> None:
        """The loop's handler for SIGINT/SIGTERM."""
        self.requested.set()
        if self.dispatcher is not None:
            _on_signal(self.dispatcher, sig)
            return
        if not self.event.is_set():
            get_logger().warning("run.stopping", signal=sig.name, hint="stopping before anything is sent")
        self.event.set()

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle SIGINT/SIGTERM with :meth:`on_signal` while the block runs (then the defaults again)."""
        loop = asyncio.get_running_loop()
        # Only the main thread receives signals (and may install handlers): a run driven from another thread
        # (an embedding application, a test) keeps that thread's defaults.
        sigs = (
            (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
        )
        for sig in sigs:
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            yield self
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)


def ledger_path_for(job: Job) -> Path:
    """The job's ledger: ``<workdir>/ledger.sqlite``."""
    return job.workdir.resolve() / LEDGER_FILE


def make_client(job: Job, api_key: str) -> PlatformClient:
    """The connector for the job's platform (:meth:`sync.platforms.base.Platform.client`)."""
    return platform_for(job).client(job, api_key)


async def run(job: Job, options: RunOptions) -> RunOutcome:
    """Run ``job`` once, by its mode, and return the outcome (see the module docstring for the steps).

    Raises :class:`sync.errors.BadInputError`/:class:`BadJobError` before anything is sent when the input or the
    job is unusable, :class:`sync.errors.StateError` when the state or the named run cannot be used; platform
    errors never escape — they end up in the outcome. A job with ``alerts`` is alerted of those errors too.
    """
    try:
        return await _run(job, options)
    except Exception as exc:
        # The nightly export that did not land (exit 2), a full disk after sending began (3), a crash (5): a run
        # that ends without a summary needs a person as much as one that aborted (docs/operations.md "Alerts").
        if options.alert_url is not None and job.alerts is not None:
            from sync.report.alerts import post_failure_alert

            await post_failure_alert(options.alert_url, job.name, exc, within=job.alerts.timeout)
        raise


async def _run(job: Job, options: RunOptions) -> RunOutcome:
    register_secret(options.api_key)
    if options.limit is not None and job.mode is SyncMode.SNAPSHOT:
        raise BadJobError(
            str(job.path),
            [
                JobProblem(
                    "--limit",
                    "not available in snapshot mode: the diff would read every user after the sample as removed "
                    "from the export; try a sample with a copy of the job in changes mode",
                )
            ],
        )
    if options.limit is not None and options.limit < 1:
        raise BadJobError(str(job.path), [JobProblem("--limit", "must be at least 1")])
    if options.workdir is not None:
        job = dataclasses.replace(job, workdir=Path(options.workdir))
    # The account the key names is part of the destination: a live app's run must not take what the test app
    # (same base URL, another key) confirmed as sent, nor resume its run (Destination.key).
    job = dataclasses.replace(job, destination=job.destination.for_account(options.api_key))
    platform_for(job)  # an unknown platform fails before the workdir is touched
    if options.client is None:
        # The connector's imports (aiohttp, ~0.1 s of CPU that holds the interpreter) load in a thread from here:
        # beside the lock, the ledger's opening and the reading of the input, which wait on the disk or decode
        # without the interpreter, instead of between the plan and the first request (issue 13).
        preload_client(job, then=(_DISPATCH,))
    # One set of SIGINT/SIGTERM handlers for the whole run — planning, diff, sending, commit — so a signal
    # before sending stops with nothing recorded (exit 4) instead of killing the process mid-way.
    signals = StopSignals(options.stop)
    with signals.installed() if options.handle_signals else contextlib.nullcontext():
        if options.database_url is not None:
            # Several workers, one run: the ledger, the queue and the budgets live in PostgreSQL.
            from sync.coordination import run_coordinated

            worker = await run_coordinated(job, options, options.database_url, signals)
            return RunOutcome(
                run_id=worker.run_id,
                exit_code=worker.exit_code,
                summary=worker.summary,
                ledger_path=worker.ledger,
                mode=job.mode.value,
                resumed_from=worker.resumed_from,
                replay=worker.replay,
                diff=worker.diff,
                committed=worker.committed,
            )
        # A read-only or full workdir: one clear error before the lock, ledger, plan.
        check_workdir(job.workdir)
        store = StateStore(job.workdir, job.destination)
        # The lock makes every run found "running" in the ledger a dead one (one run of a job at a time).
        with store.lock(), Ledger.open(ledger_path_for(job)) as ledger:
            mark_startup("ledger_opened")
            origin = options.retry or options.resume
            origin_info = ledger.run(origin) if origin is not None else None
            if origin is not None and origin_info is None:
                raise StateError(f"no run {origin} in {ledger.path}")
            if origin_info is not None:
                _refuse_another_destination(job, origin_info, ledger)
            # Resuming (or retrying) an interrupted --full-refresh finishes the full refresh: in snapshot mode
            # the diff ignores the state again (else the rest would quietly become an ordinary diff), and the
            # new run records the flag so that a resume of it does the same. A changes plan is every row anyway.
            inherited = origin_info is not None and origin_info.full_refresh
            if job.mode is SyncMode.SNAPSHOT:
                if inherited:
                    options = dataclasses.replace(options, full_refresh=True)
                return await _run_snapshot(job, options, signals, store, ledger)
            return await _run_changes(job, options, signals, ledger, record_full_refresh=inherited)


async def _run_changes(
    job: Job, options: RunOptions, signals: StopSignals, ledger: Ledger, *, record_full_refresh: bool = False
) -> RunOutcome:
    origin = options.retry or options.resume
    if origin is None and options.auto_resume and not options.full_refresh:
        origin = _unfinished_run_here(job, ledger)
        if origin is not None:
            _refuse_a_partial_resume(job, options, origin)
    decisions: ReplayPlan | None = None
    # A resume of a full refresh sends what the full refresh left (its plan is every row anyway); only
    # `retry --full-refresh` asks to send everything again.
    if origin is not None and not (options.full_refresh and options.retry):
        mode = ReplayMode.RETRY if options.retry else ReplayMode.RESUME
        decisions = replay_plan(ledger, origin, mode, platform=platform_for(job))
        _mark_dead(ledger, decisions.runs)
    # Lazy: sending starts once the head of the input (its lowest keys) is read, validated and settled; the rest
    # is validated, staged and settled in a worker thread a few buckets ahead of the lanes. Nothing a changes run
    # guarantees needs the whole input settled first: every guarantee is per ID, and all the rows of an ID are
    # in one bucket.
    plan = await asyncio.to_thread(
        functools.partial(build_plan, job, limit=options.limit, stop=signals.requested, lazy=True)
    )
    mark_startup("plan_ready")
    stats = ReplayStats() if decisions is not None else None
    # A replay is sent like a fresh run: per-endpoint lanes, each filtered by what the ledger says.
    source: BatchSource = plan if decisions is None else ReplayLanes(plan, decisions, stats)
    outcome = await _dispatch(
        job,
        options,
        signals,
        ledger,
        plan,
        source,
        run_id=options.run_id or new_run_id(),
        full_refresh=options.full_refresh or record_full_refresh,
        origin=None if decisions is None else (decisions.run_id, decisions.mode),
    )
    return dataclasses.replace(outcome, resumed_from=origin if decisions is not None else None, replay=stats)


def _refuse_another_destination(job: Job, origin: RunInfo, ledger: Ledger) -> None:
    """``pushsync resume/retry RUN`` of a run that sent to another destination: refused before anything is sent.
    One job file serving staging and production (``base_url`` from the environment) shares a name and a ledger;
    replaying staging's run on production would skip what staging confirmed (production never got it)."""
    if not same_destination(origin.destination, job.destination.key):
        raise StateError(
            f"run {origin.run_id} of job {job.name} sent to another destination ({origin.destination}; this "
            f"job's {redact(job.destination.base_url)} is {job.destination.key}): resume or retry it with the job "
            f"pointed there, or run the job for this destination afresh; nothing was sent (ledger {ledger.path})"
        )


def _refuse_a_partial_resume(job: Job, options: RunOptions, origin: str) -> None:
    """:class:`StateError` (nothing sent) when a run of some sources or a sample would resume ``origin``.

    Such a run resumes only its part, then finishes: the next ``pushsync run`` finds no unfinished run, plans
    afresh and sends everything ``origin`` had confirmed again — its events and pushes a second time."""
    cut = [
        c for c in (options.selection, f"--limit {options.limit}" if options.limit is not None else None) if c
    ]
    if not cut:
        return
    raise StateError(
        f"run {origin} of job {job.name} did not finish, and a run with {' '.join(cut)} would end its resume with "
        f"the rest unsent (the next full run would then send again what {origin} confirmed: events twice). "
        f"Finish it first: pushsync resume {origin} (or pushsync run without {', '.join(cut)})"
    )


def _unfinished_run_here(job: Job, ledger: Ledger) -> str | None:
    """The unfinished run of ``job`` a new run resumes (:func:`sync.planning.resume.unfinished_run`) — one that
    sent to this job's destination. The job's newest unfinished run, when it sent elsewhere, is left alone, and
    the log says so: this run plans afresh instead of skipping what the other destination confirmed."""
    here = job.destination.key
    origin = unfinished_run(ledger, job.name, here)
    elsewhere = unfinished_run(ledger, job.name)
    if elsewhere is not None and elsewhere != origin:
        info = ledger.run(elsewhere)
        if info is not None and not same_destination(info.destination, here):
            get_logger(job=job.name).warning(
                "run.not_resumed",
                unfinished=elsewhere,
                destination=info.destination,
                hint=f"run {elsewhere} did not finish, but it sent to another destination ({info.destination}; "
                f"this job's is {here}): not resumed here"
                + (f"; resuming run {origin} of this destination instead" if origin else "; planning afresh"),
            )
    return origin


async def _run_snapshot(
    job: Job, options: RunOptions, signals: StopSignals, store: StateStore, ledger: Ledger
) -> RunOutcome:
    from sync.state import commit, compute_diff, recover, rejected_users, snapshot_builder_for
    from sync.state._store import another_accounts_state, other_accounts

    users = [s for s in job.sources if s.kind is SourceKind.USERS]
    if not options.full_refresh and not any(store.exists(s) for s in users):
        others = other_accounts(job.workdir, job.destination)
        if others:
            raise another_accounts_state(others, job.destination, job.path)
    origin = options.retry or options.resume
    # Snapshot jobs need no replay list: the state holds only confirmed changes, so once the crashed runs'
    # confirmations are merged, a fresh diff *is* the resume (and the retry).
    builder = snapshot_builder_for(job)  # the platform's snapshot streams make the diff's requests
    recovered = tuple(recover(store, job.sources, ledger, job.snapshot, builder=builder))
    plan = await asyncio.to_thread(build_plan, job, stop=signals.requested)
    run_id = options.run_id or new_run_id()
    try:
        diff: SnapshotDiff = await asyncio.to_thread(
            compute_diff,
            store,
            plan.staged,
            run_id,
            job.snapshot,
            full_refresh=options.full_refresh,
            force=options.force,
            batch_size=job.batch_sizes,
            rejected=rejected_users(plan.rejects_path, plan.staged),
            stop=signals.requested,
            builder=builder,
        )
    except BaseException:
        plan.close()
        raise
    # A crash from here on leaves pending/<run_id>: the next run recovers what the ledger confirmed.
    counts = await asyncio.to_thread(diff.request_counts)
    expected = (sum(r for r, _ in counts.values()), sum(i for _, i in counts.values()))
    # The diff is sent like a changes run: per-endpoint lanes, phase by phase.
    try:
        outcome = await _dispatch(
            job,
            options,
            signals,
            ledger,
            plan,
            diff,
            run_id=run_id,
            expected=expected,
            full_refresh=options.full_refresh,
            diff_counts=diff.counts,
            origin=None
            if origin is None
            else (origin, ReplayMode.RETRY if options.retry else ReplayMode.RESUME),
        )
    except InterruptedRunError:
        diff.discard()  # stopped before the run was recorded: nothing was sent, nothing to merge
        raise
    try:
        committed = await asyncio.to_thread(
            functools.partial(commit, builder=builder),
            store,
            job.sources,
            diff.directory,
            ledger,
            job.snapshot,
        )
    except (PushSyncError, OSError) as exc:
        # Requests went out: never exit 2. The delta stays pending; the next run merges what was confirmed.
        raise RunStoppedError(
            f"run {run_id}: its confirmed changes could not be merged into the state ({exc}); the next run "
            "of the job merges them (nothing confirmed is sent again)"
        ) from exc
    return dataclasses.replace(
        outcome,
        mode=SyncMode.SNAPSHOT.value,
        resumed_from=origin,
        diff=diff.counts,
        committed=committed,
        recovered=recovered,
    )


async def _dispatch(
    job: Job,
    options: RunOptions,
    signals: StopSignals,
    ledger: Ledger,
    plan: Plan,
    source: BatchSource,
    *,
    run_id: str,
    expected: tuple[int, int] | None = None,
    full_refresh: bool = False,
    diff_counts: DiffCounts | None = None,
    origin: tuple[str, ReplayMode] | None = None,
) -> RunOutcome:
    """Send ``source`` (taking ``plan`` over: it is closed at the end), record the run in ``ledger``.

    ``expected``: ``(requests, IDs)`` for the progress totals when ``source`` is not the plan itself;
    ``full_refresh``: recorded with the run (a resume of it does a full refresh too); ``diff_counts``: what a
    snapshot diff found, for the run summary's input section."""
    from sync.dispatch.dispatch import Dispatcher, DispatchOutcome  # preloaded by then, unless embedded

    log = get_logger(job=job.name)
    stop = signals.event
    sending = False  # True once the dispatcher may have sent a request: from then on, never exit 2
    ledger_path = ledger_path_for(job)
    served = None  # the metrics exporter, bound before the run is recorded
    metrics: RunMetrics | None = None
    try:
        if signals.interrupted():
            # Stopped after planning but before the run was recorded: leave no trace but the exit code.
            raise InterruptedRunError("interrupted before anything was sent; nothing was recorded")
        wants_metrics = (
            options.metrics_port is not None
            or options.metrics_textfile is not None
            or options.metrics_pushgateway is not None
        )
        metrics = _metrics_for(job, run_id) if wants_metrics else None
        if metrics is not None and options.metrics_port is not None:
            # Bound before the run is recorded: a taken port (exit 2) left a run "died" in the ledger, which the
            # next run then "resumed" although nothing had been sent.
            served = metrics.serve(options.metrics_port)
        if metrics is not None and options.metrics_textfile is not None:
            # Likewise a textfile that cannot be written: exit 2 with nothing recorded, not a crash (exit 5).
            metrics.check_textfile(options.metrics_textfile)
        if metrics is not None and options.metrics_pushgateway is not None:
            metrics.check_pushgateway(options.metrics_pushgateway)  # a malformed URL crashed the run (exit 5)
        ledger.start_run(
            run_id,
            job=job.name,
            job_path=str(job.path),
            platform=job.destination.platform,
            full_refresh=full_refresh,
            origin=None if origin is None else origin[0],
            origin_mode=None if origin is None else origin[1].value,
            destination=job.destination.key,
        )
        # The rows refused so far (all of them for a settled plan). A lazy plan validates the rest of its input
        # and settles its buckets while the batches are sent: what it refuses meanwhile (validation's rejects,
        # conflicting duplicates) is recorded with the rest when the dispatcher is done.
        rows_rejected = ledger.record_rejected_rows(run_id, plan.rejected_rows(settled=False))
        rejects_recorded = rows_rejected
        ledger.flush()
        if expected is None and plan.settled:
            summary_of_plan = plan.summary()
            expected = (summary_of_plan.total_requests, summary_of_plan.total_ids)
        total_requests, total_ids = expected if expected is not None else (None, None)
        bar = (
            make_progress(
                total_ids=total_ids,
                total_requests=total_requests,
                enabled={"auto": None, "bar": True, "log": False}[options.progress],
                job=job.name,
                run=run_id,
            )
            if options.progress != "none"
            else None
        )
        watchers: list[DispatchObserver] = [*options.observers]
        if not _StartupLog.logged:
            watchers.append(_StartupLog(log))
        if bar is not None:
            watchers.append(bar)
        if metrics is not None:
            watchers.append(metrics)
        own_client = options.client is None
        sender = options.client if options.client is not None else make_client(job, options.api_key)
        mark_startup("client_made")
        dispatcher = Dispatcher(
            sender,
            job.dispatch,
            ledger=ledger,
            run_id=run_id,
            stop=stop,
            observers=watchers,
            budget_factory=options.budget_factory,
        )
        signals.dispatcher = dispatcher  # from here a signal drains (a first one already set ``stop``)
        log.info("run.start", run=run_id, requests=total_requests, ids=total_ids)
        for note in shared_fields(job):
            log.warning("job.shared_field", run=run_id, note=note)
        for note in sample_notes(job) if options.limit is not None else ():
            log.warning("run.sample", run=run_id, note=note)
        # The progress totals of a lazy plan: counted once its readers had every bucket settled.
        totals = (
            asyncio.create_task(_fill_totals(plan, bar, log, run_id), name="plan-totals")
            if bar is not None and expected is None
            else None
        )
        try:
            async with (
                metrics.exporting(
                    server=served,
                    textfile=options.metrics_textfile,
                    pushgateway=options.metrics_pushgateway,
                )
                if metrics is not None
                else contextlib.nullcontext()
            ):
                sending = True
                report = await dispatcher.run(source)
        finally:
            if totals is not None:
                totals.cancel()
            if bar is not None:
                bar.close()
            if own_client:
                await sender.aclose()
        if not plan.settled and not stop.is_set():
            # The lanes stopped early (an abort) or left a source unread: settle the rest, so the rejects file,
            # the ledger and the counts are complete. After a stop (a signal) the run ends now instead; what
            # the settled buckets rejected is recorded.
            await asyncio.to_thread(plan.settle)
        rows_rejected += ledger.record_rejected_rows(
            run_id, plan.rejected_rows(skip=rejects_recorded, settled=False)
        )
        from sync.report.summary import summarise  # after sending: not on the way to the first request

        summary = summarise(
            report,
            run_id=run_id,
            job=job.name,
            rows_rejected=rows_rejected,
            ledger=str(ledger_path),
            rejects=str(plan.rejects_path.resolve()),
            thresholds=job.thresholds,
            rows_read=sum(s.rows_read for s in plan.staged),
            input_=_input_of(job, plan, rows_rejected, diff_counts),
        )
        status = {
            DispatchOutcome.ABORTED: "aborted",
            DispatchOutcome.INTERRUPTED: "interrupted",
        }.get(report.outcome, "done" if summary.exit_code is ExitCode.OK else "partial")
        if metrics is not None:
            await metrics.finish(int(summary.exit_code))
        ledger.finish_run(
            run_id,
            status=status,
            exit_code=int(summary.exit_code),
            message=summary.message,
            summary=summary.to_json(),
        )
        if options.alert_url is not None and job.alerts is not None:
            await _alert(job.alerts, options.alert_url, ledger, summary)
        log.info(
            "run.end",
            run=run_id,
            outcome=str(report.outcome),
            exit_code=int(summary.exit_code),
            requests=summary.requests,
            ids_ok=summary.ids_ok,
            ids_rejected=summary.ids_rejected,
            ids_failed=summary.ids_failed,
            seconds=round(report.elapsed, 3),
        )
    except Exception as exc:
        cause = _local_failure(exc) if sending else None
        failure: Exception = exc
        if cause is not None:
            # A full disk or an unwritable ledger after requests went out: exit 2 would tell the scheduler that
            # nothing was sent. The ledger holds what was confirmed; the run reads "running" and is resumed.
            failure = RunStoppedError(
                f"run {run_id} stopped after it began sending: {cause}. What the platform confirmed is in the "
                f"ledger: fix the cause, then `pushsync resume {run_id}` (or run the job again)"
            )
        if metrics is not None and sending:
            # The exit code the process ends with: without it `pushsync_exit_code != 0` stays silent (a
            # Pushgateway even keeps the last run's 0), and the textfile loses the last success time.
            code = failure.exit_code if isinstance(failure, PushSyncError) else ExitCode.CRASHED
            await metrics.finish(int(code))
        if failure is not exc:
            raise failure from exc
        raise
    finally:
        signals.dispatcher = None
        if served is not None:
            served.close()
        plan.close()
    return RunOutcome(run_id=run_id, exit_code=summary.exit_code, summary=summary, ledger_path=ledger_path)


async def _alert(alerts: Alerts, url: str, ledger: Ledger, summary: RunSummary) -> None:
    """Post an alert if this run needs a person; the usual duration is that of the job's last successful runs."""
    from sync.report.alerts import alert_reasons, post_alert  # urllib.request: only for jobs that alert

    usual = [
        r.finished_at - r.started_at
        for r in ledger.runs(summary.job)
        if r.run_id != summary.run_id and r.exit_code == 0 and r.finished_at is not None
    ]
    reasons = alert_reasons(alerts, summary, usual)
    if reasons:
        await post_alert(url, summary, reasons, within=alerts.timeout)


def _input_of(job: Job, plan: Plan, rows_rejected: int, diff: DiffCounts | None) -> RunInput:
    """What the run read and where it sends, for the summary (and so the report)."""
    url = urlsplit(job.destination.base_url)
    # The host only: a path or query may carry a token on some platforms, and userinfo is a credential.
    try:
        port = url.port
    except ValueError:  # a port out of range: the run has failed to connect already; name the host alone
        port = None
    host = redact(url.hostname or "") + (f":{port}" if port else "")
    snapshot = None
    if diff is not None:
        snapshot = {
            "new": diff.users_new,
            "changed": diff.users_changed - diff.users_new,
            "unchanged": diff.users_unchanged,
            "left": diff.users_left,
            "removed": diff.users_removed,
        }
    # Counts over the buckets settled: all of them, unless a stop ended the run before they were.
    rows_clean, duplicates_dropped = plan.settled_counts()
    from sync.report.summary import RunInput

    return RunInput(
        rows_read=sum(s.rows_read for s in plan.staged),
        rows_clean=rows_clean,
        rows_rejected=rows_rejected,
        duplicates_dropped=duplicates_dropped,
        mode=job.mode.value,
        platform=job.destination.platform,
        host=host,
        snapshot=snapshot,
    )


async def _fill_totals(plan: Plan, progress: Any, log: Any, run_id: str) -> None:
    """Give the progress display the run's totals once the lazy plan's readers had every bucket settled."""
    try:
        if not await asyncio.to_thread(plan.wait_settled):
            return
        summary = await asyncio.to_thread(plan.summary)
    except Exception as exc:  # the lanes reading the same buckets report the failure
        log.debug("run.totals_unknown", run=run_id, error=type(exc).__name__)
        return
    progress.set_totals(summary.total_ids, summary.total_requests)
    log.info("run.planned", run=run_id, requests=summary.total_requests, ids=summary.total_ids)


class _StartupLog:
    """Logs, at debug level, when each step of the process's start-up was done (seconds since the process
    started, :func:`sync._startup.startup_marks`) as its first run takes its first batch: where a slow start went
    (issue 13). Once per process: a later run of a program that embeds pushsync has no start-up of its own."""

    __slots__ = ("_log",)
    logged = False  # by any run of this process

    def __init__(self, log: Any) -> None:
        self._log: Any = log

    def on_batch_start(self, batch: Batch) -> None:
        if self._log is None or _StartupLog.logged:  # logged already (or by a run beside this one)
            self._log = None
            return
        log, self._log = self._log, None
        _StartupLog.logged = True
        mark_startup("first_batch")
        log.debug("run.startup", seconds=startup_marks())

    def on_attempt(self, attempt: Any) -> None:
        return None

    def on_batch_done(self, batch: Batch, result: Any) -> None:
        return None


def _mark_dead(ledger: Ledger, runs: Iterable[str]) -> None:
    """Runs still ``running`` while we hold the job's lock died: record them as interrupted (exit code 4)."""
    for run_id in runs:
        info = ledger.run(run_id)
        if info is not None and info.status == "running":
            ledger.finish_run(
                run_id,
                status="interrupted",
                exit_code=int(ExitCode.INTERRUPTED),
                message="the run died; a later run resumes it",
            )


def _local_failure(exc: BaseException) -> BaseException | None:
    """The local failure (an OS error such as a full disk, or one of ours that would exit 2) in ``exc`` — itself
    or the first inside an exception group from the dispatcher's tasks — or None."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _local_failure(inner)
            if found is not None:
                return found
        return None
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, PushSyncError) and exc.exit_code is ExitCode.BAD_JOB_OR_INPUT:
        return exc
    return None


def _metrics_for(job: Job, run_id: str) -> RunMetrics:
    from sync.report.metrics import RunMetrics  # prometheus_client only when metrics are asked for

    return RunMetrics(
        run_id=run_id, job=job.name, platform=job.destination.platform, budget_for=job.dispatch.max_rate
    )


def _on_signal(dispatcher: Dispatcher, sig: signal.Signals) -> None:
    """First SIGINT/SIGTERM: stop feeding and drain. Second: cancel what is still in flight."""
    if not dispatcher.stop_event.is_set():
        get_logger().warning(
            "run.stopping", signal=sig.name, hint="draining in-flight batches; again to force"
        )
        dispatcher.stop_event.set()
    else:
        get_logger().warning("run.forced", signal=sig.name, hint="cancelling in-flight batches")
        dispatcher.force_stop()
