"""One run of a job: plan → dispatcher → ledger → summary. Used by ``pushsync run``, the demo and the tests.

:func:`run_job` is the one entry point; later commands (resume, retry, snapshot sync) extend it through its
keyword arguments (``batches`` to send a different stream than the plan's, ``client`` to reuse a connector).
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sync.budget import Budget
from sync.config import Job
from sync.dispatch import Dispatcher, DispatchObserver, DispatchOutcome
from sync.errors import BadJobError, ExitCode, JobProblem
from sync.ledger import Ledger, new_run_id
from sync.logs import get_logger
from sync.planning import Plan, build_plan
from sync.platforms.base import PlatformClient
from sync.progress import make_progress
from sync.records import Batch
from sync.redact import register_secret
from sync.summary import RunSummary, summarise

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


def make_client(job: Job, api_key: str) -> PlatformClient:
    """The connector for the job's platform."""
    if job.destination.platform == "netmera":
        from sync.platforms.netmera.client import NetmeraClient

        return NetmeraClient(
            job.destination,
            api_key,
            timeout=job.dispatch.request_timeout,
            max_connections=max(job.dispatch.concurrency, 1),
        )
    raise BadJobError(
        str(job.path), [JobProblem("destination.platform", "no connector for this platform yet")]
    )


async def run_job(
    job: Job,
    *,
    api_key: str,
    workdir: Path | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = False,
    progress: Literal["auto", "bar", "log", "none"] = "none",
    observer: DispatchObserver | None = None,
    client: PlatformClient | None = None,
    budget_factory: Callable[[str], Budget] | None = None,
    batches: Callable[[Plan], Iterable[Batch] | AsyncIterable[Batch]] | None = None,
) -> RunOutcome:
    """Plan the job, send it, record everything in the job's ledger and return the outcome.

    ``progress``: ``auto`` (a bar on a terminal, log lines otherwise), ``bar``, ``log`` or ``none``.
    ``handle_signals`` installs SIGINT/SIGTERM handlers that set ``stop`` (drain, then summary).
    Raises :class:`sync.errors.BadInputError`/:class:`BadJobError` before anything is sent when the input or
    the job is unusable; platform errors never escape — they end up in the outcome.
    """
    register_secret(api_key)
    if workdir is not None:
        job = dataclasses.replace(job, workdir=workdir)
    log = get_logger(job=job.name)
    # Reading and validating is CPU and disk work: keep the loop free (a sandbox may share it in tests).
    plan = await asyncio.to_thread(build_plan, job)
    own_client = client is None
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    try:
        ledger_path = ledger_path_for(job)
        with Ledger.open(ledger_path) as ledger:
            run_id = new_run_id()
            ledger.start_run(run_id, job=job.name, job_path=str(job.path), platform=job.destination.platform)
            rows_rejected = ledger.record_rejected_rows(run_id, plan.rejected_rows())
            ledger.flush()
            summary_of_plan = plan.summary()
            bar = (
                make_progress(
                    total_ids=summary_of_plan.total_ids,
                    total_requests=summary_of_plan.total_requests,
                    enabled={"auto": None, "bar": True, "log": False}[progress],
                    job=job.name,
                    run=run_id,
                )
                if progress != "none"
                else None
            )
            sender = client if client is not None else make_client(job, api_key)
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, _on_signal, stop, sig)
                    installed.append(sig)
            log.info(
                "run.start",
                run=run_id,
                requests=summary_of_plan.total_requests,
                ids=summary_of_plan.total_ids,
            )
            try:
                dispatcher = Dispatcher(
                    sender,
                    job.dispatch,
                    ledger=ledger,
                    run_id=run_id,
                    stop=stop,
                    observer=observer or bar,
                    budget_factory=budget_factory,
                )
                report = await dispatcher.run(batches(plan) if batches is not None else plan.batches())
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
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        plan.close()
    return RunOutcome(run_id=run_id, exit_code=summary.exit_code, summary=summary, ledger_path=ledger_path)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    if not stop.is_set():
        get_logger().warning("run.stopping", signal=sig.name, hint="draining in-flight batches")
    stop.set()
