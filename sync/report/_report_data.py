"""What the run report shows, and the read-only ledger queries that fill it (behind :mod:`sync.report.report`).

The records (:class:`RunReport` and its lines) are the report's data; :func:`read_run` fills them from an open
ledger connection. The connection is the report's own, opened by :func:`sync.ledger.ledger.connect_read_only` with SQLite's
``mode=ro``, so a report can be built while a run is still writing. Every message taken from the ledger passes
through :func:`sync.redact.redact` and is clipped here; escaping for HTML is the page's job.

Charts need the ledger's per-attempt records (the ``attempts`` table, one row per HTTP request). A ledger
written before that table existed still gives the header, the per-endpoint table, the errors and the refused
rows; ``has_attempts`` then says the charts are missing.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sync.errors import ExitCode, StateError
from sync.redact import redact
from sync.report.metrics import LATENCY_BUCKETS

_MAX_ERRORS = 10  # rows of the "top errors" table
_MAX_REFUSED = 50  # rows of the "first refused rows" table
_MAX_MESSAGE = 240  # characters of one error message shown
_MAX_BINS = 120  # time bins across a chart
_MAX_HISTORY = 10  # runs in the trend table
# The IDs a platform refused, each with the endpoint of its batch (``batch_ids`` does not repeat it).
_REFUSED_IDS = (
    "FROM batch_ids i JOIN batches b ON b.run_id = i.run_id AND b.batch_id = i.batch_id WHERE i.run_id = ?"
)


@dataclass(frozen=True, slots=True)
class EndpointLine:
    """One endpoint's totals, straight from the ledger. ``rate_limited``/``retries`` are None without
    per-attempt records; ``requests`` then falls back to the sum of the batches' attempt counts."""

    endpoint: str
    batches: int
    requests: int
    ids_ok: int
    ids_rejected: int
    ids_failed: int
    ids_unfinished: int
    rate_limited: int | None
    retries: int | None
    budget_rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    ids_per_second: float | None = None
    """IDs finished (ok, refused or failed) per second while the endpoint was sending (first request to last
    answer); None without per-attempt records."""


@dataclass(frozen=True, slots=True)
class HistoryLine:
    """One earlier (or this) run of the same job, for the trend table: how long, how much, how well."""

    run_id: str
    started_at: float
    seconds: float | None
    status: str
    exit_code: int | None
    requests: int | None
    ids_ok: int | None
    ids_refused: int | None
    rows_rejected: int | None


@dataclass(frozen=True, slots=True)
class ErrorLine:
    """One kind of error and how often it happened. ``kind``: refused ID, failed batch or retried attempt."""

    kind: str
    endpoint: str
    status: str
    message: str
    count: int


@dataclass(frozen=True, slots=True)
class RefusedLine:
    """A row refused by validation (``source='validation'``) or an ID refused by the platform at ``endpoint``."""

    source: str
    endpoint: str | None
    path: str | None
    row: int | None
    ext_id: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class TimeBin:
    """Attempts of one endpoint that started in one time bin (``index`` × the report's ``bin_seconds``)."""

    endpoint: str
    index: int
    requests: int
    rate_limited: int
    retries: int


@dataclass(slots=True)
class _Tally:
    """One endpoint's figures while they are read (becomes an :class:`EndpointLine`)."""

    batches: int = 0
    requests: int = 0
    ids_ok: int = 0
    ids_rejected: int = 0
    ids_failed: int = 0
    ids_unfinished: int = 0
    rate_limited: int | None = None
    retries: int | None = None
    latencies: list[float] = field(default_factory=list)
    active_seconds: float | None = None  # first request sent to last answer, from the attempts

    def line(self, endpoint: str, budget_rate: float | None) -> EndpointLine:
        ordered = sorted(self.latencies)
        p50, p95 = _percentile(ordered, 50), _percentile(ordered, 95)
        done = self.ids_ok + self.ids_rejected + self.ids_failed
        rate = done / self.active_seconds if self.active_seconds else None
        return EndpointLine(
            endpoint=endpoint,
            batches=self.batches,
            requests=self.requests,
            ids_ok=self.ids_ok,
            ids_rejected=self.ids_rejected,
            ids_failed=self.ids_failed,
            ids_unfinished=self.ids_unfinished,
            rate_limited=self.rate_limited,
            retries=self.retries,
            budget_rate=budget_rate,
            p50_ms=None if p50 is None else p50 * 1000,
            p95_ms=None if p95 is None else p95 * 1000,
            ids_per_second=rate,
        )


@dataclass(frozen=True, slots=True)
class InputLine:
    """What the run read and where it sent (the run summary's ``input``; absent for runs of older versions)."""

    rows_read: int
    rows_clean: int
    rows_rejected: int
    duplicates_dropped: int
    mode: str
    platform: str
    host: str
    snapshot: tuple[tuple[str, int], ...] | None
    """Snapshot mode: (users new, changed, unchanged, left, removed) as (name, count) pairs."""


_SNAPSHOT_KEYS = ("new", "changed", "unchanged", "left", "removed")


def _input(summary_json: str | None) -> InputLine | None:
    """The run summary's input section, or None when the run (or an older pushsync) stored none."""
    if not summary_json:
        return None
    try:
        raw = json.loads(summary_json).get("input")
        if not isinstance(raw, dict):
            return None
        rows, dest, snap = raw["rows"], raw["destination"], raw.get("snapshot")
        return InputLine(
            rows_read=int(rows["read"]),
            rows_clean=int(rows["clean"]),
            rows_rejected=int(rows["rejected"]),
            duplicates_dropped=int(rows["duplicates_dropped"]),
            mode=str(raw["mode"]),
            platform=str(dest["platform"]),
            host=redact(str(dest["host"])),
            snapshot=None if not isinstance(snap, dict) else tuple((k, int(snap[k])) for k in _SNAPSHOT_KEYS),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # a damaged summary: the rest of the page still stands


@dataclass(frozen=True, slots=True)
class RunReport:
    """Everything the page shows, read from the ledger."""

    run_id: str
    job: str
    platform: str | None
    started_at: float
    finished_at: float | None
    status: str
    exit_code: int | None
    message: str | None
    endpoints: tuple[EndpointLine, ...]
    rows_rejected: int
    ids_refused: int
    errors: tuple[ErrorLine, ...]
    refused: tuple[RefusedLine, ...]
    has_attempts: bool
    bin_seconds: float
    bins: tuple[TimeBin, ...]
    latency_counts: tuple[int, ...]
    """Attempts per latency bucket: ``LATENCY_BUCKETS`` upper bounds, then one bucket for anything slower."""
    history: tuple[HistoryLine, ...] = ()
    """This run and the job's runs before it in the same ledger, newest first (at most ``_MAX_HISTORY``)."""
    input: InputLine | None = None
    """What the run read and where it sent; None for runs whose summary holds none."""
    origin: str | None = None
    """The run this one resumed or retried (``pushsync resume`` / ``retry``); None for a fresh plan."""
    origin_mode: str | None = None
    """``resume`` or ``retry`` (with :attr:`origin`)."""

    @property
    def duration(self) -> float | None:
        """Seconds from start to finish; None while the run has no finish time (running, or crashed)."""
        return None if self.finished_at is None else self.finished_at - self.started_at

    @property
    def exit_status(self) -> str:
        """The exit code as shown: ``1 PARTIAL``, the bare number if pushsync has no name for it."""
        if self.exit_code is None:
            # "died" is sync.cli._ledgers.DIED: the CLI names a run no process runs any more so.
            if self.status == "died":
                return "none: the run ended without recording it"
            return "still running (or crashed)"
        try:
            return f"{self.exit_code} {ExitCode(self.exit_code).name}"
        except ValueError:
            return str(self.exit_code)

    def total(self, name: str) -> int:
        """Sum of one integer field of :class:`EndpointLine` over every endpoint (None counts as 0)."""
        return sum(getattr(e, name) or 0 for e in self.endpoints)

    @property
    def ids_per_second(self) -> float | None:
        """IDs finished per second over the whole run (start to finish); None while it has no finish time."""
        done = self.total("ids_ok") + self.total("ids_rejected") + self.total("ids_failed")
        return done / self.duration if self.duration else None


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
    return row is not None


def _clip(text: str | None) -> str:
    text = redact(text or "")
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def _bin_width(span: float, at_least: float = 0.0) -> float:
    """The smallest "round" bin width of at least ``at_least`` seconds that draws ``span`` seconds in at most
    ``_MAX_BINS`` bins."""
    for width in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if width >= at_least and span / width <= _MAX_BINS:
            return float(width)
    return max(3600.0 * math.ceil(span / 3600 / _MAX_BINS), at_least)


def read_run(conn: sqlite3.Connection, run_id: str, path: Path) -> RunReport:
    """Everything the report shows about ``run_id``; ``path`` names the ledger in the error if the run is absent."""
    run = conn.execute(
        "SELECT job, platform, started_at, finished_at, status, exit_code, message, summary FROM runs "
        "WHERE run_id = ?",
        (run_id,),
    ).fetchone()
    if run is None:
        raise StateError(f"no run {run_id} in {path}")
    job, platform, started_at, finished_at, status, exit_code, message, summary_json = run
    # A ledger of an older pushsync, read without upgrading it, has no origin columns (its runs have none).
    origin, origin_mode = (
        conn.execute("SELECT origin, origin_mode FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if any(col[1] == "origin" for col in conn.execute("PRAGMA table_info(runs)"))
        else (None, None)
    )
    budgets, longest_period = _budgets(summary_json)

    per_endpoint: dict[str, _Tally] = {}
    for endpoint, batches, attempts, ok, rejected, failed, unfinished in conn.execute(
        "SELECT endpoint, COUNT(*), SUM(attempts), SUM(ok_ids), SUM(rejected_ids), "
        "SUM(CASE WHEN status = 'failed' THEN n_ids - ok_ids - rejected_ids ELSE 0 END), "
        "SUM(CASE WHEN status IN ('planned', 'sent') THEN n_ids ELSE 0 END) "
        "FROM batches WHERE run_id = ? GROUP BY endpoint ORDER BY MIN(rowid)",
        (run_id,),
    ):
        per_endpoint[endpoint] = _Tally(
            batches=batches,
            requests=attempts or 0,
            ids_ok=ok or 0,
            ids_rejected=rejected or 0,
            ids_failed=failed or 0,
            ids_unfinished=unfinished or 0,
        )
    # Per-attempt records exist for this run — or it made no request at all. (A ledger started by an older
    # pushsync gains the table when a newer one opens it, but its old runs have no rows there.)
    has_attempts = _has_table(conn, "attempts") and (
        conn.execute("SELECT 1 FROM attempts WHERE run_id = ? LIMIT 1", (run_id,)).fetchone() is not None
        or not any(t.requests for t in per_endpoint.values())
    )
    bins: list[TimeBin] = []
    latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
    bin_seconds = 1.0
    errors: list[ErrorLine] = []
    if has_attempts:
        bin_seconds = _read_attempts(
            conn, run_id, started_at, longest_period, per_endpoint, bins, latency_counts, errors
        )

    endpoints = [t.line(name, budgets.get(name)) for name, t in per_endpoint.items()]

    for endpoint, code, msg, n in conn.execute(
        f"SELECT b.endpoint, i.code, i.message, COUNT(*) {_REFUSED_IDS} GROUP BY b.endpoint, i.code, i.message",
        (run_id,),
    ):
        errors.append(ErrorLine("refused ID", endpoint, f"code {code}" if code else "-", _clip(msg), n))
    for endpoint, http_status, msg, n in conn.execute(
        "SELECT endpoint, http_status, message, COUNT(*) FROM batches WHERE run_id = ? AND status = 'failed' "
        "GROUP BY endpoint, http_status, message",
        (run_id,),
    ):
        errors.append(ErrorLine("failed batch", endpoint, _status_text(http_status), _error_text(msg), n))
    errors.sort(key=lambda e: (-e.count, e.kind, e.endpoint, e.message))

    rows_rejected = conn.execute("SELECT COUNT(*) FROM rejected_rows WHERE run_id = ?", (run_id,)).fetchone()[
        0
    ]
    ids_refused = conn.execute("SELECT COUNT(*) FROM batch_ids WHERE run_id = ?", (run_id,)).fetchone()[0]
    refused = [
        RefusedLine("validation", None, p, r, x, _clip(f"{c}: {why}" if c and not why.startswith(c) else why))
        for p, r, c, why, x in conn.execute(
            "SELECT path, row, column_name, reason, ext_id FROM rejected_rows WHERE run_id = ? "
            "ORDER BY rowid LIMIT ?",
            (run_id, _MAX_REFUSED),
        )
    ]
    refused += [
        RefusedLine("platform", e, p, r, x, _clip(f"code {c}: {m}" if c else m))
        for e, p, r, x, c, m in conn.execute(
            f"SELECT b.endpoint, i.origin_path, i.origin_row, i.ext_id, i.code, i.message {_REFUSED_IDS} "
            "ORDER BY i.rowid LIMIT ?",
            (run_id, _MAX_REFUSED),
        )
    ]
    return RunReport(
        history=_history(conn, job, started_at),
        run_id=run_id,
        job=job,
        platform=platform,
        started_at=started_at,
        finished_at=finished_at,
        status=status,
        exit_code=exit_code,
        message=_error_text(message) if message else None,
        endpoints=tuple(endpoints),
        rows_rejected=rows_rejected,
        ids_refused=ids_refused,
        errors=tuple(errors[:_MAX_ERRORS]),
        refused=tuple(refused[:_MAX_REFUSED]),
        has_attempts=has_attempts,
        bin_seconds=bin_seconds,
        bins=tuple(bins),
        latency_counts=tuple(latency_counts),
        input=_input(summary_json),
        origin=origin,
        origin_mode=origin_mode,
    )


def _read_attempts(
    conn: sqlite3.Connection,
    run_id: str,
    run_start: float,
    min_bin: float,
    per_endpoint: dict[str, _Tally],
    bins: list[TimeBin],
    latency_counts: list[int],
    errors: list[ErrorLine],
) -> float:
    """Fill the per-attempt figures; returns the bin width chosen."""
    for endpoint, n, limited, retries in conn.execute(
        "SELECT endpoint, COUNT(*), SUM(outcome = 'rate_limited'), SUM(attempt > 1) FROM attempts "
        "WHERE run_id = ? GROUP BY endpoint",
        (run_id,),
    ):
        t = per_endpoint.setdefault(endpoint, _Tally())
        t.requests, t.rate_limited, t.retries = n, limited or 0, retries or 0
    for t in per_endpoint.values():
        if t.rate_limited is None:  # no attempt recorded for this endpoint
            t.requests, t.rate_limited, t.retries = 0, 0, 0
    for endpoint, first, last in conn.execute(
        "SELECT endpoint, MIN(started_at), MAX(started_at + latency) FROM attempts WHERE run_id = ? "
        "GROUP BY endpoint",
        (run_id,),
    ):
        per_endpoint[endpoint].active_seconds = max(last - first, 1e-3)
    for endpoint, latency in conn.execute(
        "SELECT endpoint, latency FROM attempts WHERE run_id = ?", (run_id,)
    ):
        per_endpoint[endpoint].latencies.append(latency)
        latency_counts[_bucket(latency)] += 1
    span_row = conn.execute(
        "SELECT MAX(started_at + latency) FROM attempts WHERE run_id = ?", (run_id,)
    ).fetchone()
    span = max((span_row[0] or run_start) - run_start, 0.0)
    width = _bin_width(span, min_bin)
    for endpoint, index, n, limited, retries in conn.execute(
        "SELECT endpoint, CAST(MAX(started_at - ?, 0) / ? AS INTEGER) AS bin, COUNT(*), "
        "SUM(outcome = 'rate_limited'), SUM(attempt > 1) FROM attempts WHERE run_id = ? "
        "GROUP BY endpoint, bin ORDER BY endpoint, bin",
        (run_start, width, run_id),
    ):
        bins.append(TimeBin(endpoint, index, n, limited, retries))
    grouped: dict[tuple[str, str, str, str], int] = {}
    for endpoint, http_status, outcome, msg, n in conn.execute(
        "SELECT endpoint, http_status, outcome, message, COUNT(*) FROM attempts WHERE run_id = ? "
        "AND outcome IN ('rate_limited', 'retryable') GROUP BY endpoint, http_status, outcome, message",
        (run_id,),
    ):
        kind = "rate limited (429)" if outcome == "rate_limited" else "retried attempt"
        key = (kind, endpoint, _status_text(http_status), _error_text(msg))
        grouped[key] = grouped.get(key, 0) + n
    errors.extend(ErrorLine(*key, count=n) for key, n in grouped.items())
    return width


def _history(conn: sqlite3.Connection, job: str, started_at: float) -> tuple[HistoryLine, ...]:
    """The job's runs up to this one, newest first, with the totals their summaries recorded."""
    lines = []
    for run_id, started, finished, status, exit_code, summary_json in conn.execute(
        "SELECT run_id, started_at, finished_at, status, exit_code, summary FROM runs "
        "WHERE job = ? AND started_at <= ? ORDER BY started_at DESC LIMIT ?",
        (job, started_at, _MAX_HISTORY),
    ):
        try:
            totals = json.loads(summary_json).get("totals", {}) if summary_json else {}
        except ValueError:
            totals = {}
        lines.append(
            HistoryLine(
                run_id=run_id,
                started_at=started,
                seconds=None if finished is None else finished - started,
                status=status,
                exit_code=exit_code,
                requests=totals.get("requests"),
                ids_ok=totals.get("ids_ok"),
                ids_refused=totals.get("ids_rejected"),
                rows_rejected=totals.get("rows_rejected"),
            )
        )
    return tuple(lines)


def _error_text(message: str | None) -> str:
    return _clip(_REQUEST_PREFIX.sub("", message or "") or "no answer")


def _bucket(latency: float) -> int:
    for i, upper in enumerate(LATENCY_BUCKETS):
        if latency <= upper:
            return i
    return len(LATENCY_BUCKETS)


def _budgets(summary_json: str | None) -> tuple[dict[str, float | None], float]:
    """Per-endpoint budgets (requests per second) from the run summary the runner stored, and the longest
    budget period (``40/0.5s`` → 0.5): chart bins are never shorter, or a legal burst would cross the line."""
    if not summary_json:
        return {}, 0.0
    try:
        summary = json.loads(summary_json)
    except ValueError:
        return {}, 0.0
    endpoints = [e for e in summary.get("endpoints", []) if "endpoint" in e]
    periods = [float(m[1]) for e in endpoints if (m := _BUDGET.fullmatch(e.get("budget") or ""))]
    return {e["endpoint"]: e.get("budget_rate") for e in endpoints}, max(periods, default=0.0)


_BUDGET = re.compile(r"\d+/([0-9.]+)s")
# What the client puts before a platform's answer ("POST http://host/rest/3.0/tagUsers endpoint=tagUsers
# batch=ab12…: HTTP 503 …"): dropped so that one kind of error is counted once, not once per batch.
_REQUEST_PREFIX = re.compile(r"\b(?:GET|POST|PUT|PATCH|DELETE) \S+(?: endpoint=\S+)?(?: batch=\S+)?: ")


def _status_text(http_status: int | None) -> str:
    return "no answer" if http_status is None else f"HTTP {http_status}"
