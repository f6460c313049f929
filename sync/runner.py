"""One run of a job: plan → dispatcher → ledger → summary. Used by ``pushsync run``, the demo and the tests.

:func:`run_job` is the one entry point; later commands (resume, retry, snapshot sync) extend it through its
keyword arguments (``batches`` to send a different stream than the plan's, ``client`` to reuse a connector).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import signal
import threading
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sync.budget import Budget
from sync.config import Job
from sync.dispatch import Dispatcher, DispatchObserver, DispatchOutcome, LaneSource
from sync.errors import BadJobError, ExitCode, InterruptedRunError, JobProblem, PushSyncError, RunStoppedError
from sync.ledger import Ledger, new_run_id
from sync.logs import get_logger
from sync.planning import Plan, build_plan
from sync.platforms.base import PlatformClient
from sync.progress import make_progress
from sync.records import Batch
from sync.redact import register_secret
from sync.summary import RunSummary, summarise

if TYPE_CHECKING:
    from sync.metrics import RunMetrics

__all__ = ["LEDGER_FILE", "RunOutcome", "StopSignals", "ledger_path_for", "make_client", "run_job"]

LEDGER_FILE = "ledger.sqlite"


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a run ended: its ID, the exit code for schedulers, the summary and where the ledger is."""

    run_id: str
    exit_code: ExitCode
    summary: RunSummary
    ledger_path: Path


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


_CONNECTORS: dict[str, tuple[str, str]] = {
    "netmera": ("sync.platforms.netmera.client", "NetmeraClient"),
    "notifyvisitors": ("sync.platforms.notifyvisitors.client", "NotifyVisitorsClient"),
    "formsonfire": ("sync.platforms.formsonfire.client", "FormsOnFireClient"),
}
"""Platform → (module, class) of its connector; imported on use so a run loads only its own platform's code."""


def make_client(job: Job, api_key: str) -> PlatformClient:
    """The connector for the job's platform."""
    try:
        module_name, class_name = _CONNECTORS[job.destination.platform]
    except KeyError:
        raise BadJobError(
            str(job.path), [JobProblem("destination.platform", "no connector for this platform yet")]
        ) from None
    client_class = getattr(importlib.import_module(module_name), class_name)
    client: PlatformClient = client_class(
        job.destination,
        api_key,
        timeout=job.dispatch.request_timeout,
        max_connections=max(job.dispatch.concurrency, 1),
    )
    return client


async def run_job(
    job: Job,
    *,
    api_key: str,
    workdir: Path | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = False,
    progress: Literal["auto", "bar", "log", "none"] = "none",
    observers: Sequence[DispatchObserver] = (),
    client: PlatformClient | None = None,
    budget_factory: Callable[[str], Budget] | None = None,
    batches: Callable[[Plan], Iterable[Batch] | AsyncIterable[Batch] | LaneSource] | None = None,
    metrics_port: int | None = None,
    metrics_textfile: Path | None = None,
    metrics_pushgateway: str | None = None,
    plan: Plan | None = None,
    run_id: str | None = None,
    expected: tuple[int, int] | None = None,
    signals: StopSignals | None = None,
) -> RunOutcome:
    """Plan the job, send it, record everything in the job's ledger and return the outcome.

    ``progress``: ``auto`` (a bar on a terminal, log lines otherwise), ``bar``, ``log`` or ``none``.
    ``metrics_port`` / ``metrics_textfile`` / ``metrics_pushgateway``: expose the run's Prometheus metrics
    (:mod:`sync.metrics`) while it lasts; a port that cannot be bound raises :class:`sync.errors.StateError` before anything is sent.
    ``plan``: a plan already built for ``job`` (run_job takes it over and closes it); ``run_id``: the ID to
    record the run under (default: a new one) — for callers that name the run before it starts.
    ``expected``: ``(requests, IDs)`` that ``batches`` will send, for the progress totals, when it sends
    something other than the plan (a snapshot diff); default: the plan's summary.
    ``batches`` may return batches in phase order (one queue) or a :class:`sync.dispatch.LaneSource`
    (per-endpoint lanes, as the plan itself is sent).
    ``handle_signals`` installs SIGINT/SIGTERM handlers for the whole run (:class:`StopSignals`): while the
    input is planned the first stops the run with nothing recorded (:class:`sync.errors.InterruptedRunError`);
    once sending began, the first sets ``stop`` (drain, then summary) and a second cancels what is still in
    flight. ``signals``: handlers a caller already installed (:func:`sync.resume.sync_job`), used instead.
    Raises :class:`sync.errors.BadInputError`/:class:`BadJobError` before anything is sent when the input or
    the job is unusable; platform errors never escape — they end up in the outcome.
    """
    register_secret(api_key)
    if workdir is not None:
        job = dataclasses.replace(job, workdir=workdir)
    # SIGINT/SIGTERM handlers this call installs (none when the caller gives ``signals``: it installed them).
    handlers = contextlib.ExitStack()
    if signals is None:
        signals = StopSignals(stop)
        if handle_signals:
            handlers.enter_context(signals.installed())
    with handlers:
        return await _run_job(
            job,
            api_key,
            signals,
            progress=progress,
            observers=observers,
            client=client,
            budget_factory=budget_factory,
            batches=batches,
            metrics_port=metrics_port,
            metrics_textfile=metrics_textfile,
            metrics_pushgateway=metrics_pushgateway,
            plan=plan,
            run_id=run_id,
            expected=expected,
        )


async def _run_job(
    job: Job,
    api_key: str,
    signals: StopSignals,
    *,
    progress: Literal["auto", "bar", "log", "none"],
    observers: Sequence[DispatchObserver],
    client: PlatformClient | None,
    budget_factory: Callable[[str], Budget] | None,
    batches: Callable[[Plan], Iterable[Batch] | AsyncIterable[Batch] | LaneSource] | None,
    metrics_port: int | None,
    metrics_textfile: Path | None,
    metrics_pushgateway: str | None,
    plan: Plan | None,
    run_id: str | None,
    expected: tuple[int, int] | None,
) -> RunOutcome:
    log = get_logger(job=job.name)
    # Reading and validating is CPU and disk work: keep the loop free (a sandbox may share it in tests).
    if plan is None:
        plan = await asyncio.to_thread(build_plan, job, stop=signals.requested)
    own_client = client is None
    stop = signals.event
    sending = False  # True once the dispatcher may have sent a request: from then on, never exit 2
    try:
        if signals.interrupted():
            # Stopped after planning but before the run was recorded: leave no trace but the exit code.
            raise InterruptedRunError("interrupted before anything was sent; nothing was recorded")
        ledger_path = ledger_path_for(job)
        with Ledger.open(ledger_path) as ledger:
            run_id = run_id or new_run_id()
            ledger.start_run(run_id, job=job.name, job_path=str(job.path), platform=job.destination.platform)
            rows_rejected = ledger.record_rejected_rows(run_id, plan.rejected_rows())
            ledger.flush()
            if expected is None:
                summary_of_plan = plan.summary()
                expected = (summary_of_plan.total_requests, summary_of_plan.total_ids)
            total_requests, total_ids = expected
            bar = (
                make_progress(
                    total_ids=total_ids,
                    total_requests=total_requests,
                    enabled={"auto": None, "bar": True, "log": False}[progress],
                    job=job.name,
                    run=run_id,
                )
                if progress != "none"
                else None
            )
            metrics = (
                _metrics_for(job, run_id)
                if metrics_port is not None or metrics_textfile or metrics_pushgateway
                else None
            )
            watchers: list[DispatchObserver] = [*observers]
            if bar is not None:
                watchers.append(bar)
            if metrics is not None:
                watchers.append(metrics)
            sender = client if client is not None else make_client(job, api_key)
            dispatcher = Dispatcher(
                sender,
                job.dispatch,
                ledger=ledger,
                run_id=run_id,
                stop=stop,
                observers=watchers,
                budget_factory=budget_factory,
            )
            signals.dispatcher = dispatcher  # from here a signal drains (a first one already set ``stop``)
            log.info(
                "run.start",
                run=run_id,
                requests=total_requests,
                ids=total_ids,
            )
            try:
                async with (
                    metrics.exporting(
                        port=metrics_port, textfile=metrics_textfile, pushgateway=metrics_pushgateway
                    )
                    if metrics is not None
                    else contextlib.nullcontext()
                ):
                    # The plan itself is a lane source: each endpoint of a phase gets its own queue and workers.
                    sending = True
                    report = await dispatcher.run(batches(plan) if batches is not None else plan)
            finally:
                if bar is not None:
                    bar.close()
                if own_client:
                    await sender.aclose()
            summary = summarise(
                report,
                run_id=run_id,
                job=job.name,
                rows_rejected=rows_rejected,
                ledger=str(ledger_path),
                rejects=str(plan.rejects_path.resolve()),
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
        if cause is not None:
            # A full disk or an unwritable ledger after requests went out: exit 2 would tell the scheduler that
            # nothing was sent. The ledger holds what was confirmed; the run reads "running" and is resumed.
            raise RunStoppedError(
                f"run {run_id} stopped after it began sending: {cause}. What the platform confirmed is in the "
                f"ledger: fix the cause, then `pushsync resume {run_id}` (or run the job again)"
            ) from exc
        raise
    finally:
        signals.dispatcher = None
        plan.close()
    return RunOutcome(run_id=run_id, exit_code=summary.exit_code, summary=summary, ledger_path=ledger_path)


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
    from sync.metrics import RunMetrics  # prometheus_client only when metrics are asked for

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
