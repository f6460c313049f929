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
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sync.budget import Budget
from sync.config import Job
from sync.dispatch import Dispatcher, DispatchObserver, DispatchOutcome, LaneSource
from sync.errors import BadJobError, ExitCode, JobProblem, PushSyncError, RunStoppedError
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

__all__ = ["LEDGER_FILE", "RunOutcome", "ledger_path_for", "make_client", "run_job"]

LEDGER_FILE = "ledger.sqlite"


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a run ended: its ID, the exit code for schedulers, the summary and where the ledger is."""

    run_id: str
    exit_code: ExitCode
    summary: RunSummary
    ledger_path: Path


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
    plan: Plan | None = None,
    run_id: str | None = None,
    expected: tuple[int, int] | None = None,
) -> RunOutcome:
    """Plan the job, send it, record everything in the job's ledger and return the outcome.

    ``progress``: ``auto`` (a bar on a terminal, log lines otherwise), ``bar``, ``log`` or ``none``.
    ``metrics_port`` / ``metrics_textfile``: expose the run's Prometheus metrics (:mod:`sync.metrics`) while it
    lasts; a port that cannot be bound raises :class:`sync.errors.StateError` before anything is sent.
    ``plan``: a plan already built for ``job`` (run_job takes it over and closes it); ``run_id``: the ID to
    record the run under (default: a new one) — for callers that name the run before it starts.
    ``expected``: ``(requests, IDs)`` that ``batches`` will send, for the progress totals, when it sends
    something other than the plan (a snapshot diff); default: the plan's summary.
    ``batches`` may return batches in phase order (one queue) or a :class:`sync.dispatch.LaneSource`
    (per-endpoint lanes, as the plan itself is sent).
    ``handle_signals`` installs SIGINT/SIGTERM handlers: the first sets ``stop`` (drain, then summary), a
    second cancels what is still in flight.
    Raises :class:`sync.errors.BadInputError`/:class:`BadJobError` before anything is sent when the input or
    the job is unusable; platform errors never escape — they end up in the outcome.
    """
    register_secret(api_key)
    if workdir is not None:
        job = dataclasses.replace(job, workdir=workdir)
    log = get_logger(job=job.name)
    # Reading and validating is CPU and disk work: keep the loop free (a sandbox may share it in tests).
    if plan is None:
        plan = await asyncio.to_thread(build_plan, job)
    own_client = client is None
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    sending = False  # True once the dispatcher may have sent a request: from then on, never exit 2
    try:
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
            metrics = _metrics_for(job, run_id) if metrics_port is not None or metrics_textfile else None
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
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, _on_signal, dispatcher, sig)
                    installed.append(sig)
            log.info(
                "run.start",
                run=run_id,
                requests=total_requests,
                ids=total_ids,
            )
            try:
                async with (
                    metrics.exporting(port=metrics_port, textfile=metrics_textfile)
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
    except (PushSyncError, OSError) as exc:
        if sending and (not isinstance(exc, PushSyncError) or exc.exit_code is ExitCode.BAD_JOB_OR_INPUT):
            # A full disk or an unwritable ledger after requests went out: exit 2 would tell the scheduler that
            # nothing was sent. The ledger holds what was confirmed; the run reads "running" and is resumed.
            raise RunStoppedError(
                f"run {run_id} stopped after it began sending: {exc}. What the platform confirmed is in the "
                f"ledger: fix the cause, then `pushsync resume {run_id}` (or run the job again)"
            ) from exc
        raise
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        plan.close()
    return RunOutcome(run_id=run_id, exit_code=summary.exit_code, summary=summary, ledger_path=ledger_path)


def _metrics_for(job: Job, run_id: str) -> RunMetrics:
    from sync.metrics import RunMetrics  # prometheus_client only when metrics are asked for

    def budget_rate(endpoint: str) -> float | None:
        spec = job.dispatch.budget_for(endpoint)
        return None if spec is None else spec.requests / spec.period

    return RunMetrics(run_id=run_id, job=job.name, platform=job.destination.platform, budget_for=budget_rate)


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
