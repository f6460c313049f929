"""A coordinated run's summary, read from the PostgreSQL ledger: every worker's requests (a dead one's too), the
same :class:`sync.report.summary.RunSummary` one process prints — per endpoint, and per budget group
(``dispatch.budget_groups`` and the platform's default groups), like the SQLite run's summary.

Built by whichever worker finishes the run (or stops): what it counts is what the ledger holds, not what that
worker sent. Budget figures are those of the shared budgets (:mod:`sync.coordination.budget`): releases counted
per clock-aligned window from the attempts' send times; a 429 pauses every worker, so a group's ``429s`` are
those answered to any of its endpoints, by any worker.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sync.config import Job
from sync.coordination._db import SCHEMA
from sync.dispatch.budget import BudgetGroupStats, BudgetStats
from sync.dispatch.dispatch import DispatchReport, EndpointStats
from sync.redact import redact
from sync.report.summary import RunInput, RunSummary, summarise

if TYPE_CHECKING:
    from sync.coordination.ledger import PgLedger

__all__ = ["held_batches", "run_summary_from_ledger"]

S = SCHEMA


def run_summary_from_ledger(
    job: Job,
    ledger: PgLedger,
    run_id: str,
    planned: Mapping[str, Any],
    *,
    outcome: DispatchReport,
    margin_for: Callable[[str], float] | None = None,
) -> RunSummary:
    """The whole run's summary (every worker's requests, the dead ones' too), read from the ledger.

    ``planned``: what the leader recorded of the input (rows read, rejected...); ``outcome``: this worker's
    dispatch report (its outcome and fatal error); ``margin_for(group)``: the margin this worker keeps before a
    window's end for a group (its learned one), for the group lines."""
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
    sent_at = _send_times(ledger, run_id)
    for endpoint, s in stats.items():
        spec = job.dispatch.budgets.get(endpoint) or job.dispatch.budgets.get("*")
        if spec is None:
            groups = job.dispatch.groups_for(endpoint)
            spec = groups[0].budget if len(groups) == 1 else None
        if spec is None:
            continue
        s.budget_requests, s.budget_period = spec.requests, spec.period
        s.per_window = _per_window(sent_at.get(endpoint, []), spec.period)
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
        groups=_group_stats(job, stats, sent_at, margin_for),
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


def _send_times(ledger: PgLedger, run_id: str) -> dict[str, list[tuple[float, bool]]]:
    """(sent at, answered 429) of every attempt of the run, per endpoint."""
    out: dict[str, list[tuple[float, bool]]] = {}
    for endpoint, started, outcome in ledger._conn.execute(
        f"SELECT endpoint, started_at, outcome FROM {S}.attempts WHERE run_id = %s", (run_id,)
    ):
        out.setdefault(endpoint, []).append((float(started), outcome == "rate_limited"))
    return out


def _per_window(sent: list[tuple[float, bool]], period: float) -> dict[int, int]:
    """Releases per clock-aligned window of ``period`` seconds (retries and 429s included: each took a slot)."""
    windows: dict[int, int] = {}
    for started, _limited in sent:
        w = math.floor(started / period)
        windows[w] = windows.get(w, 0) + 1
    return windows


def _group_stats(
    job: Job,
    stats: Mapping[str, EndpointStats],
    sent_at: Mapping[str, list[tuple[float, bool]]],
    margin_for: Callable[[str], float] | None,
) -> tuple[BudgetGroupStats, ...]:
    """Every budget group that held an endpoint of the run, counted over every worker's attempts — the lines
    the SQLite run's summary prints from its budget pool (:meth:`sync.dispatch.budget.BudgetPool.group_report`).
    Pauses are not recorded per worker: ``paused_seconds`` is 0; the margin is this worker's."""
    out = []
    for group in job.dispatch.budget_groups:
        members = tuple(e for e in stats if group.holds(e))
        if not members:
            continue
        sent = [item for e in members for item in sent_at.get(e, [])]
        spec = group.budget
        out.append(
            BudgetGroupStats(
                group.name,
                members,
                spec.requests,
                spec.period,
                BudgetStats(
                    released=len(sent),
                    rate_limited=sum(1 for _, limited in sent if limited),
                    paused_seconds=0.0,
                    rate=spec.requests / spec.period,
                    ceiling=float(spec.requests),
                    period=spec.period,
                    margin=margin_for(group.name) if margin_for is not None else 0.0,
                    per_window=_per_window(sent, spec.period),
                ),
            )
        )
    return tuple(out)


def held_batches(ledger: PgLedger, run_id: str) -> int:
    """Batches held back (non-idempotent, sent by a worker that died: outcome unknown)."""
    row = ledger._execute(
        f"SELECT count(*) FROM {S}.batches WHERE run_id = %s AND held", (run_id,)
    ).fetchone()
    return int(row[0]) if row else 0


def _input_of(job: Job, planned: Mapping[str, Any]) -> RunInput:
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
