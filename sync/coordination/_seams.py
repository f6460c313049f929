"""What a coordinated worker needs from the orchestrator (:mod:`sync.run`), as protocols: the run's options and
its stop signals. :mod:`sync.run` hands its own ``RunOptions`` and ``StopSignals`` over; this package never
imports :mod:`sync.run` (which imports it), so the import graph keeps one direction."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sync.dispatch.budget import Budget
from sync.dispatch.dispatch import Dispatcher, DispatchObserver
from sync.errors import ExitCode
from sync.planning.resume import ReplayStats
from sync.platforms.base import PlatformClient
from sync.report.summary import RunSummary
from sync.state import CommitReport, DiffCounts

__all__ = ["WorkerOptions", "WorkerOutcome", "WorkerSignals"]


class WorkerOptions(Protocol):
    """The part of :class:`sync.run.RunOptions` a worker reads."""

    @property
    def api_key(self) -> str: ...
    @property
    def run_id(self) -> str | None: ...
    @property
    def resume(self) -> str | None: ...
    @property
    def retry(self) -> str | None: ...
    @property
    def auto_resume(self) -> bool: ...
    @property
    def full_refresh(self) -> bool: ...
    @property
    def force(self) -> bool: ...
    @property
    def limit(self) -> int | None: ...
    @property
    def progress(self) -> str: ...
    @property
    def metrics_port(self) -> int | None: ...
    @property
    def metrics_textfile(self) -> Path | None: ...
    @property
    def metrics_pushgateway(self) -> str | None: ...
    @property
    def alert_url(self) -> str | None: ...
    @property
    def client(self) -> PlatformClient | None: ...
    @property
    def budget_factory(self) -> Callable[[str], Budget] | None: ...
    @property
    def observers(self) -> Sequence[DispatchObserver]: ...


class WorkerSignals(Protocol):
    """The part of :class:`sync.run.StopSignals` a worker uses."""

    event: asyncio.Event
    requested: threading.Event
    dispatcher: Dispatcher | None

    def interrupted(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class WorkerOutcome:
    """How this worker's part of the run ended: the run's summary (every worker's requests) and its exit code;
    :func:`sync.run.run` turns it into its ``RunOutcome``."""

    run_id: str
    exit_code: ExitCode
    summary: RunSummary
    ledger: str
    """``user@host:port/db`` of the coordination database (never the URL)."""
    resumed_from: str | None = None
    replay: ReplayStats | None = None
    diff: DiffCounts | None = None
    """Snapshot mode: what the leader's diff found."""
    committed: CommitReport | None = None
    """Snapshot mode: what this worker merged into the state (None: another worker did, or nobody yet)."""
