"""What a dispatch reports: the per-endpoint counters, the run's report and outcome, and the observer protocol.

Private: import these from :mod:`sync.dispatch.dispatch`, the public face of dispatching. They live apart from the
dispatcher so that the sending (:mod:`sync.dispatch._sending`) and the orchestration (:mod:`sync.dispatch.dispatch`) share them
without importing each other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from sync.dispatch.budget import BudgetGroupStats
from sync.errors import FatalPlatformError
from sync.records import Attempt, Batch, BatchResult


class DispatchOutcome(StrEnum):
    """How a dispatch ended."""

    COMPLETED = "completed"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"


@dataclass(slots=True)
class EndpointStats:
    """Counters for one endpoint, accumulated during the run (the summary reads them)."""

    endpoint: str
    requests: int = 0
    batches: int = 0
    ids_ok: int = 0
    ids_rejected: int = 0
    ids_failed: int = 0
    rate_limited: int = 0
    retries: int = 0
    splits: int = 0
    first_request: float | None = None
    last_request: float | None = None
    latencies: list[float] = field(default_factory=list)
    """A uniform sample (reservoir) of at most :data:`sync.dispatch.dispatch.LATENCY_SAMPLE` request latencies, for
    p50/p95 in flat memory."""
    latency_count: int = 0
    per_window: dict[int, int] = field(default_factory=dict)
    """Requests per clock-aligned budget period (configured budgets only): what the server's windows saw."""
    budget_requests: int | None = None
    budget_period: float | None = None
    discovered_rate: float | None = None
    starved_windows: frozenset[int] = frozenset()
    """Budget periods in which the endpoint's budget had a free slot nobody asked for (the run had nothing to
    send): see :attr:`sync.dispatch.budget.BudgetStats.starved_windows`."""
    stalled_windows: frozenset[int] = frozenset()
    """Budget periods in which a stalled event loop released an attempt late (``BudgetStats``)."""


@dataclass(frozen=True, slots=True)
class DispatchReport:
    """What :meth:`sync.dispatch.dispatch.Dispatcher.run` hands back."""

    outcome: DispatchOutcome
    endpoints: dict[str, EndpointStats]
    elapsed: float
    batches_done: int
    batches_unfinished: int
    fatal: FatalPlatformError | None = None
    groups: tuple[BudgetGroupStats, ...] = ()
    """The budget groups that held an endpoint of the run, with their counters."""


class DispatchObserver(Protocol):
    """Told about each batch taken, each HTTP attempt and each finished batch, synchronously (the progress
    bar and :class:`sync.report.metrics.RunMetrics` implement it)."""

    def on_batch_start(self, batch: Batch) -> None: ...

    def on_attempt(self, attempt: Attempt) -> None: ...

    def on_batch_done(self, batch: Batch, result: BatchResult) -> None: ...


def sample_latency(stats: EndpointStats, latency: float, rng: random.Random, limit: int) -> None:
    """Count one request latency in ``stats``, keeping a uniform sample of at most ``limit`` of them."""
    stats.latency_count += 1
    if len(stats.latencies) < limit:
        stats.latencies.append(latency)
        return
    slot = rng.randrange(stats.latency_count)  # Algorithm R: keep each with probability k/n
    if slot < limit:
        stats.latencies[slot] = latency
