"""The run summary: per endpoint requests, IDs ok/rejected/failed, 429s, retries, achieved rate against the
budget and p50/p95 latency; the outcome and the exit code. Rendered as text for people and JSON for scripts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sync.config import Thresholds
from sync.dispatch.budget import BudgetGroupStats
from sync.dispatch.dispatch import DispatchOutcome, DispatchReport, EndpointStats
from sync.errors import ExitCode

__all__ = [
    "EndpointReport",
    "GroupReport",
    "RunInput",
    "RunSummary",
    "exit_code_for",
    "percentile",
    "summarise",
    "threshold_decision",
]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class EndpointReport:
    """One endpoint's line of the summary."""

    endpoint: str
    requests: int
    batches: int
    ids_ok: int
    ids_rejected: int
    ids_failed: int
    rate_limited: int
    retries: int
    splits: int
    achieved_rate: float | None
    """Requests per second as the server's windows saw them (mean over the busy budget periods);
    without a configured budget, between the first and last request. None with too few requests."""
    budget_rate: float | None
    """The configured budget in requests per second (None: none configured)."""
    budget: str | None
    """The budget as configured, e.g. ``100/60s``; ``discovered 12.5/1s`` when found from 429s."""
    p50_ms: float | None
    p95_ms: float | None
    max_per_window: int | None = None
    """The most requests sent in one clock-aligned budget period (configured budgets only)."""
    budget_bound_rate: float | None = None
    """Like ``achieved_rate``, over the budget periods in which an attempt always waited for the budget and
    the event loop released it on time (not those in which the run had nothing to send to this endpoint, nor
    those of a stalled loop): the rate the budget itself reached."""

    @property
    def utilisation(self) -> float | None:
        if self.achieved_rate is None or not self.budget_rate:
            return None
        return self.achieved_rate / self.budget_rate

    windows: int = 0
    """Busy budget periods other than the first and last (the ones the rates are measured over)."""
    windows_starved: int = 0
    """Of those, periods in which the run had nothing to send for a while (not the budget's doing)."""
    windows_stalled: int = 0
    """Of those, periods in which a stalled event loop released an attempt late (not the budget's doing)."""

    @property
    def budget_bound_utilisation(self) -> float | None:
        if self.budget_bound_rate is None or not self.budget_rate:
            return None
        return self.budget_bound_rate / self.budget_rate

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "requests": self.requests,
            "batches": self.batches,
            "ids": {"ok": self.ids_ok, "rejected": self.ids_rejected, "failed": self.ids_failed},
            "rate_limited": self.rate_limited,
            "retries": self.retries,
            "splits": self.splits,
            "achieved_rate": _round(self.achieved_rate),
            "budget": self.budget,
            "budget_rate": _round(self.budget_rate),
            "utilisation": _round(self.utilisation),
            "budget_bound_utilisation": _round(self.budget_bound_utilisation),
            "windows": {
                "measured": self.windows,
                "starved": self.windows_starved,
                "stalled": self.windows_stalled,
            },
            "max_per_window": self.max_per_window,
            "latency_ms": {"p50": _round(self.p50_ms), "p95": _round(self.p95_ms)},
        }


@dataclass(frozen=True, slots=True)
class GroupReport:
    """One budget group's line of the summary: requests of all its endpoints, 429s, use of its budget."""

    group: str
    endpoints: tuple[str, ...]
    requests: int
    """Attempts released under the group (retries included), every endpoint of it together."""
    rate_limited: int
    """429s answered to any endpoint of the group (each paused the whole group)."""
    budget: str
    """The group's budget, e.g. ``20/1s``."""
    budget_rate: float
    achieved_rate: float | None
    """Requests per second as the server's windows saw them: the mean over the busy windows without the
    first and last (partial) ones; the busiest window's when the run fits in one or two."""
    max_per_window: int | None
    paused_seconds: float
    margin_ms: float
    """The margin kept before each window's end at the end of the run (learned unless the job fixed it)."""
    budget_bound_rate: float | None = None
    """Like ``achieved_rate``, over the windows in which an attempt always waited for the group and the event
    loop released it on time (not those in which the run had nothing to send, nor those of a stalled loop):
    the rate the budget itself reached."""

    @property
    def utilisation(self) -> float | None:
        return None if self.achieved_rate is None else self.achieved_rate / self.budget_rate

    windows: int = 0
    """Busy budget periods other than the first and last (the ones the rates are measured over)."""
    windows_starved: int = 0
    """Of those, periods in which the run had nothing to send for a while (not the budget's doing)."""
    windows_stalled: int = 0
    """Of those, periods in which a stalled event loop released an attempt late (not the budget's doing)."""

    @property
    def budget_bound_utilisation(self) -> float | None:
        return None if self.budget_bound_rate is None else self.budget_bound_rate / self.budget_rate

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "endpoints": list(self.endpoints),
            "requests": self.requests,
            "rate_limited": self.rate_limited,
            "budget": self.budget,
            "budget_rate": _round(self.budget_rate),
            "achieved_rate": _round(self.achieved_rate),
            "utilisation": _round(self.utilisation),
            "budget_bound_utilisation": _round(self.budget_bound_utilisation),
            "windows": {
                "measured": self.windows,
                "starved": self.windows_starved,
                "stalled": self.windows_stalled,
            },
            "max_per_window": self.max_per_window,
            "paused_seconds": _round(self.paused_seconds),
            "margin_ms": _round(self.margin_ms, 1),
        }


def _busy_rate(
    per_window: Mapping[int, int], period: float, leave_out: frozenset[int] = frozenset()
) -> float | None:
    """Requests per second over the busy windows without the first and last (partial) ones and those in
    ``leave_out``; the busiest window's when there are only one or two. None with no window left."""
    if not per_window:
        return None
    busy = sorted(per_window)
    full = [per_window[w] for w in busy[1:-1] if w not in leave_out]
    if full:
        return sum(full) / len(full) / period
    if len(busy) > 2:
        return None  # every full window was left out
    return float(max(per_window.values())) / period


def _interior(per_window: Mapping[int, int], windows: frozenset[int]) -> int:
    """How many of ``windows`` are busy windows other than the first and last."""
    busy = sorted(per_window)[1:-1]
    return sum(1 for w in busy if w in windows)


def _group_report(group: BudgetGroupStats) -> GroupReport:
    per_window = group.stats.per_window
    return GroupReport(
        group=group.name,
        endpoints=group.endpoints,
        requests=group.stats.released,
        rate_limited=group.stats.rate_limited,
        budget=f"{group.requests}/{group.period:g}s",
        budget_rate=group.requests / group.period,
        achieved_rate=_busy_rate(per_window, group.period),
        max_per_window=max(per_window.values()) if per_window else None,
        paused_seconds=group.stats.paused_seconds,
        margin_ms=group.stats.margin * 1000,
        budget_bound_rate=_busy_rate(
            per_window, group.period, group.stats.starved_windows | group.stats.stalled_windows
        ),
        windows=max(0, len(per_window) - 2),
        windows_starved=_interior(per_window, group.stats.starved_windows),
        windows_stalled=_interior(per_window, group.stats.stalled_windows),
    )


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunInput:
    """What the run read and where it sent, kept in the run summary (the ledger's ``runs.summary``) for the
    report: rows read/clean/rejected, duplicates dropped, the sync mode, the destination (platform and the base
    URL's host, never a path, query or key) and, in snapshot mode, what the diff found."""

    rows_read: int
    rows_clean: int
    rows_rejected: int
    duplicates_dropped: int
    mode: str
    platform: str
    host: str
    snapshot: dict[str, int] | None = None
    """Snapshot mode: users new, changed (not new), unchanged, left the export, and removed (untag/delete)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": {
                "read": self.rows_read,
                "clean": self.rows_clean,
                "rejected": self.rows_rejected,
                "duplicates_dropped": self.duplicates_dropped,
            },
            "mode": self.mode,
            "destination": {"platform": self.platform, "host": self.host},
            "snapshot": self.snapshot,
        }


@dataclass(frozen=True, slots=True)
class RunSummary:
    """Everything ``pushsync run`` prints at the end."""

    run_id: str
    job: str
    outcome: DispatchOutcome
    exit_code: ExitCode
    elapsed: float
    endpoints: tuple[EndpointReport, ...]
    rows_rejected: int
    batches_done: int
    batches_unfinished: int
    message: str | None = None
    ledger: str | None = None
    rejects: str | None = None
    threshold: str | None = None
    """Which of the job's ``thresholds`` decided between exit 0 and 1, and why (None: none was involved)."""
    rows_read: int | None = None
    input: RunInput | None = None
    groups: tuple[GroupReport, ...] = ()
    """The budget groups that held an endpoint of the run (``dispatch.budget_groups``, platform defaults)."""

    @property
    def requests(self) -> int:
        return sum(e.requests for e in self.endpoints)

    @property
    def ids_ok(self) -> int:
        return sum(e.ids_ok for e in self.endpoints)

    @property
    def ids_rejected(self) -> int:
        return sum(e.ids_rejected for e in self.endpoints)

    @property
    def ids_failed(self) -> int:
        return sum(e.ids_failed for e in self.endpoints)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "job": self.job,
            "outcome": str(self.outcome),
            "exit_code": int(self.exit_code),
            "exit_status": self.exit_code.name,
            "elapsed_seconds": round(self.elapsed, 3),
            "message": self.message,
            "threshold": self.threshold,
            "totals": {
                "requests": self.requests,
                "batches_done": self.batches_done,
                "batches_unfinished": self.batches_unfinished,
                "ids_ok": self.ids_ok,
                "ids_rejected": self.ids_rejected,
                "ids_failed": self.ids_failed,
                "rows_rejected": self.rows_rejected,
                "rows_read": self.rows_read,
            },
            "endpoints": [e.to_json() for e in self.endpoints],
            "budget_groups": [g.to_json() for g in self.groups],
            "ledger": self.ledger,
            "rejects": self.rejects,
            "input": None if self.input is None else self.input.to_json(),
        }

    def render_text(self) -> str:
        lines = [
            f"run {self.run_id} of job {self.job}: {self.outcome} in {self.elapsed:.1f} s "
            f"-> exit {int(self.exit_code)} ({self.exit_code.name})",
        ]
        if self.message:
            lines.append(f"  {self.message}")
        if self.threshold:
            lines.append(f"  {self.threshold}")
        header = (
            f"  {'endpoint':<24}{'requests':>9}{'ids ok':>10}{'rejected':>9}{'failed':>8}{'429s':>6}"
            f"{'retries':>8}{'rate/s':>9}  {'budget':<16}{'max/win':>8}{'p50 ms':>8}{'p95 ms':>8}"
        )
        lines.append(header)
        for e in self.endpoints:
            rate = "-" if e.achieved_rate is None else f"{e.achieved_rate:.2f}"
            util = "" if e.utilisation is None else f" ({e.utilisation:.0%})"
            lines.append(
                f"  {e.endpoint:<24}{e.requests:>9}{e.ids_ok:>10}{e.ids_rejected:>9}{e.ids_failed:>8}"
                f"{e.rate_limited:>6}{e.retries:>8}{rate:>9}  {(e.budget or '-') + util:<16}"
                f"{'-' if e.max_per_window is None else e.max_per_window:>8}{_ms(e.p50_ms):>8}{_ms(e.p95_ms):>8}"
            )
        if self.groups:
            lines.append(
                f"  {'budget group':<24}{'requests':>9}{'429s':>6}{'rate/s':>9}  {'budget':<16}{'max/win':>8}"
                f"{'margin':>8}  endpoints"
            )
        for g in self.groups:
            rate = "-" if g.achieved_rate is None else f"{g.achieved_rate:.2f}"
            util = "" if g.utilisation is None else f" ({g.utilisation:.0%})"
            lines.append(
                f"  {g.group:<24}{g.requests:>9}{g.rate_limited:>6}{rate:>9}  {g.budget + util:<16}"
                f"{'-' if g.max_per_window is None else g.max_per_window:>8}{g.margin_ms:>6.0f}ms  "
                + ", ".join(g.endpoints)
            )
        lines.append(
            f"  total: {self.requests} requests, {self.ids_ok} IDs ok, {self.ids_rejected} rejected by the "
            f"platform, {self.ids_failed} failed, {self.rows_rejected} input rows rejected"
            + (f", {self.batches_unfinished} batches unfinished" if self.batches_unfinished else "")
        )
        if self.ledger:
            lines.append(f"  ledger: {self.ledger}")
        if self.rejects and self.rows_rejected:
            lines.append(f"  rejected rows: {self.rejects}")
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def exit_code_for(outcome: DispatchOutcome, *, problems: int) -> ExitCode:
    """Aborted → 3, interrupted → 4, completed with rejected/failed rows → 1, else 0 (see docs/run.md)."""
    if outcome is DispatchOutcome.ABORTED:
        return ExitCode.ABORTED
    if outcome is DispatchOutcome.INTERRUPTED:
        return ExitCode.INTERRUPTED
    return ExitCode.PARTIAL if problems else ExitCode.OK


def _within(
    count: int, of: int, limit: int | None, share: float | None, names: tuple[str, str]
) -> str | None:
    """Why ``count`` (out of ``of``) is over the limit or share set (None: within every one set)."""
    if limit is not None and count > limit:
        return f"{count} over thresholds.{names[0]} ({limit})"
    # Compared as a share (a correctly rounded division), not ``count > share * of``: 0.29 * 100 is
    # 28.999999999999996 in floating point, so 29 rows of 100 were "over" a max_rejected_share of 0.29.
    if share is not None and (count / of > share if of else count > 0):
        return f"{count} of {of} ({count / of if of else 1:.2%}) over thresholds.{names[1]} ({share:.2%})"
    return None


def threshold_decision(
    thresholds: Thresholds, *, rows_rejected: int, rows_read: int, ids_refused: int, ids_sent: int
) -> tuple[bool, str]:
    """Whether the rejected rows and refused IDs of a run that otherwise went through are within the job's
    thresholds, and a sentence saying which threshold decided. Only called with at least one threshold set and
    at least one rejected row or refused ID; a kind with none of its thresholds set is never within."""
    parts = []
    ok = True
    for count, of, limit, share, names, what in (
        (
            rows_rejected,
            rows_read,
            thresholds.max_rejected_rows,
            thresholds.max_rejected_share,
            ("max_rejected_rows", "max_rejected_share"),
            "rejected rows",
        ),
        (
            ids_refused,
            ids_sent,
            thresholds.max_refused_ids,
            thresholds.max_refused_share,
            ("max_refused_ids", "max_refused_share"),
            "refused IDs",
        ),
    ):
        if not count:
            continue
        if limit is None and share is None:
            ok = False
            parts.append(f"{count} {what}, and no thresholds.{names[0]} or {names[1]} is set")
            continue
        over = _within(count, of, limit, share, names)
        if over is not None:
            ok = False
            parts.append(f"{what}: {over}")
        else:
            set_ = " and ".join(
                f"thresholds.{n} ({v if isinstance(v, int) else f'{v:.2%}'})"
                for n, v in zip(names, (limit, share), strict=True)
                if v is not None
            )
            parts.append(f"{count} {what} within {set_}")
    return ok, ("exit 0: " if ok else "exit 1: ") + "; ".join(parts)


def _endpoint_report(stats: EndpointStats) -> EndpointReport:
    achieved = budget_rate = budget_bound = None
    budget = None
    max_per_window = max(stats.per_window.values()) if stats.per_window else None
    if stats.budget_requests and stats.budget_period:
        budget_rate = stats.budget_requests / stats.budget_period
        budget = f"{stats.budget_requests}/{stats.budget_period:g}s"
        if stats.per_window:
            # The rate the server's windows saw: the mean over the windows in which this endpoint was busy,
            # without the first and last (partial) ones — between phases an endpoint idles, which is not the
            # budget's doing; a run inside one or two windows is measured by its busiest window.
            achieved = _busy_rate(stats.per_window, stats.budget_period)
            budget_bound = _busy_rate(
                stats.per_window, stats.budget_period, stats.starved_windows | stats.stalled_windows
            )
    elif stats.discovered_rate is not None:
        budget = f"found {stats.discovered_rate:.3g}/s"
    if (
        achieved is None
        and stats.requests > 1
        and stats.first_request is not None
        and stats.last_request is not None
    ):
        span = stats.last_request - stats.first_request
        achieved = (stats.requests - 1) / span if span > 0 else None
    p50, p95 = percentile(stats.latencies, 50), percentile(stats.latencies, 95)
    return EndpointReport(
        endpoint=stats.endpoint,
        requests=stats.requests,
        batches=stats.batches,
        ids_ok=stats.ids_ok,
        ids_rejected=stats.ids_rejected,
        ids_failed=stats.ids_failed,
        rate_limited=stats.rate_limited,
        retries=stats.retries,
        splits=stats.splits,
        achieved_rate=achieved,
        budget_rate=budget_rate,
        budget=budget,
        p50_ms=None if p50 is None else p50 * 1000,
        p95_ms=None if p95 is None else p95 * 1000,
        max_per_window=max_per_window,
        budget_bound_rate=budget_bound,
        windows=max(0, len(stats.per_window) - 2),
        windows_starved=_interior(stats.per_window, stats.starved_windows),
        windows_stalled=_interior(stats.per_window, stats.stalled_windows),
    )


def summarise(
    report: DispatchReport,
    *,
    run_id: str,
    job: str,
    rows_rejected: int = 0,
    ledger: str | None = None,
    rejects: str | None = None,
    thresholds: Thresholds | None = None,
    rows_read: int | None = None,
    input_: RunInput | None = None,
) -> RunSummary:
    """Turn a dispatch report into the run summary, with its exit code.

    ``thresholds``: the job's; rejected rows (of ``rows_read``) and refused IDs within them do not make a run
    that otherwise went through partial."""
    endpoints = tuple(_endpoint_report(s) for s in report.endpoints.values())
    refused = sum(e.ids_rejected for e in endpoints)
    failed = sum(e.ids_failed for e in endpoints)
    problems = rows_rejected + refused + failed + report.batches_unfinished
    threshold = None
    if (
        thresholds is not None
        and thresholds.any
        and report.outcome is DispatchOutcome.COMPLETED
        and not failed
        and not report.batches_unfinished
        and (rows_rejected or refused)
    ):
        ok, threshold = threshold_decision(
            thresholds,
            rows_rejected=rows_rejected,
            rows_read=rows_read if rows_read is not None else rows_rejected,
            ids_refused=refused,
            ids_sent=sum(e.ids_ok for e in endpoints) + refused,
        )
        if ok:
            problems = 0
    message = None
    if report.fatal is not None:
        message = f"aborted: {report.fatal.message}"
    elif report.outcome is DispatchOutcome.INTERRUPTED:
        message = "interrupted: in-flight batches were drained; run again (or resume) to send the rest"
    return RunSummary(
        run_id=run_id,
        job=job,
        outcome=report.outcome,
        exit_code=exit_code_for(report.outcome, problems=problems),
        elapsed=report.elapsed,
        endpoints=endpoints,
        rows_rejected=rows_rejected,
        batches_done=report.batches_done,
        batches_unfinished=report.batches_unfinished,
        message=message,
        ledger=ledger,
        rejects=rejects,
        threshold=threshold,
        rows_read=rows_read,
        input=input_,
        groups=tuple(_group_report(g) for g in report.groups),
    )
