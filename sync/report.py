"""The run report: one self-contained HTML file that tells, at a glance, what a run did.

:func:`load_report` reads a run from the job's ledger (read-only: its own ``mode=ro`` SQLite connection, so a
report can be built while a run writes) into a :class:`RunReport`; :func:`render_html` turns that into a page
with inline CSS and inline SVG charts drawn here — no script, no font, no CDN: it opens offline, from a mail
attachment or a CI artifact. Every string from the ledger passes through :func:`html.escape` and
:func:`sync.redact.redact`. The only personal data shown are the external IDs of refused rows.

Charts need the ledger's per-attempt records (the ``attempts`` table, one row per HTTP request). A ledger
written before that table existed still gives the header, the per-endpoint table, the errors and the refused
rows; the charts then say why they are missing.
"""

from __future__ import annotations

import html
import json
import math
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sync.errors import ExitCode, StateError
from sync.metrics import LATENCY_BUCKETS
from sync.redact import redact

__all__ = [
    "EndpointLine",
    "ErrorLine",
    "RefusedLine",
    "RunReport",
    "TimeBin",
    "load_report",
    "render_html",
    "write_report",
]

_MAX_ERRORS = 10  # rows of the "top errors" table
_MAX_REFUSED = 50  # rows of the "first refused rows" table
_MAX_MESSAGE = 240  # characters of one error message shown
_MAX_BINS = 120  # time bins across a chart


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

    def line(self, endpoint: str, budget_rate: float | None) -> EndpointLine:
        ordered = sorted(self.latencies)
        p50, p95 = _percentile(ordered, 50), _percentile(ordered, 95)
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
        )


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

    @property
    def duration(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started_at

    @property
    def exit_status(self) -> str:
        if self.exit_code is None:
            return "still running (or crashed)"
        try:
            return f"{self.exit_code} {ExitCode(self.exit_code).name}"
        except ValueError:
            return str(self.exit_code)

    def total(self, name: str) -> int:
        """Sum of one integer field of :class:`EndpointLine` over every endpoint (None counts as 0)."""
        return sum(getattr(e, name) or 0 for e in self.endpoints)


# -- reading -------------------------------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise StateError(f"{path}: no ledger there")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("SELECT 1 FROM runs LIMIT 1")
    except sqlite3.DatabaseError as exc:
        raise StateError(f"{path}: cannot read the ledger: {exc}") from exc
    return conn


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


def load_report(ledger_path: str | Path, run_id: str) -> RunReport:
    """Read ``run_id`` from the ledger at ``ledger_path`` (read-only). Raises :class:`StateError` if absent."""
    conn = _connect(Path(ledger_path))
    try:
        return _load(conn, run_id, Path(ledger_path))
    finally:
        conn.close()


def _load(conn: sqlite3.Connection, run_id: str, path: Path) -> RunReport:
    run = conn.execute(
        "SELECT job, platform, started_at, finished_at, status, exit_code, message, summary FROM runs "
        "WHERE run_id = ?",
        (run_id,),
    ).fetchone()
    if run is None:
        raise StateError(f"no run {run_id} in {path}")
    job, platform, started_at, finished_at, status, exit_code, message, summary_json = run
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
        "SELECT b.endpoint, i.code, i.message, COUNT(*) FROM batch_ids i JOIN batches b "
        "ON b.run_id = i.run_id AND b.batch_id = i.batch_id WHERE i.run_id = ? "
        "GROUP BY b.endpoint, i.code, i.message",
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
            "SELECT b.endpoint, i.origin_path, i.origin_row, i.ext_id, i.code, i.message FROM batch_ids i "
            "JOIN batches b ON b.run_id = i.run_id AND b.batch_id = i.batch_id WHERE i.run_id = ? "
            "ORDER BY i.rowid LIMIT ?",
            (run_id, _MAX_REFUSED),
        )
    ]
    return RunReport(
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


# -- writing -------------------------------------------------------------------------------------------------


def write_report(ledger_path: str | Path, run_id: str, out: str | Path) -> Path:
    """Build the report of ``run_id`` and write it to ``out`` (UTF-8); returns the path written."""
    page = render_html(load_report(ledger_path, run_id))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)  # a half-written page never sits where a person would open it
    return out


# -- the page ------------------------------------------------------------------------------------------------
# Written as polyglot markup (well-formed XML as well as HTML5) so a test can parse it strictly.

_PALETTE = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569")
_STATUS_COLOURS = {"done": "#15803d", "partial": "#b45309", "aborted": "#b91c1c", "interrupted": "#475569"}
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#0f172a;margin:0;background:#f8fafc}
main{max-width:960px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #cbd5e1;padding-bottom:4px}
.sub{color:#475569;margin:0 0 16px;font-family:ui-monospace,monospace}
.badge{display:inline-block;color:#fff;border-radius:4px;padding:2px 10px;font-weight:600;margin-left:8px;font-size:14px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}dt{color:#475569}dd{margin:0}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-top:16px}
.card{background:#fff;border:1px solid #e2e8f0;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}.card span{color:#475569;font-size:12px}
.card.bad b{color:#b91c1c}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border:1px solid #e2e8f0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f1f5f9;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:600;background:#f8fafc}
.chart{background:#fff;border:1px solid #e2e8f0;border-radius:6px;margin:8px 0;padding:4px}
.chart svg{display:block;width:100%;height:auto}
.note{color:#475569;font-size:13px}.mono{font-family:ui-monospace,monospace}
footer{color:#64748b;font-size:12px;margin-top:32px}
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def _int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.{digits}f}"


def _cell(field: str, value: int | float | None, *, digits: int = 1) -> str:
    shown = _int(value) if isinstance(value, int) or value is None else _num(value, digits)
    raw = "" if value is None else f' data-value="{value}"'
    return f'<td class="n" data-field="{field}"{raw}>{shown}</td>'


def render_html(report: RunReport) -> str:
    """The report page (a complete HTML document as a string)."""
    colour = _STATUS_COLOURS.get(report.status, "#475569")
    title = f"pushsync run {report.run_id} ({report.job})"
    out = [
        "<!DOCTYPE html>",
        '<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8" />',
        '<meta name="viewport" content="width=device-width, initial-scale=1" />',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f'<h1>Run report: {_esc(report.job)}<span class="badge" style="background:{colour}" '
        f'data-field="status">{_esc(report.status)}</span></h1>',
        f'<p class="sub" data-field="run_id">{_esc(report.run_id)}</p>',
        _header(report),
        _cards(report),
        "<h2>Per endpoint</h2>",
        _endpoint_table(report),
        "<h2>Requests over time</h2>",
        _charts(report),
        "<h2>Top errors</h2>",
        _errors_table(report),
        "<h2>First refused rows</h2>",
        _refused_table(report),
        f"<footer>Generated by pushsync {_esc(_version())} at {_esc(_when(_now()))} from the run's ledger. "
        "Times are UTC. This page contains no secret; the only personal data are the external IDs of refused "
        "rows.</footer>",
        "</main></body></html>",
    ]
    return "\n".join(out) + "\n"


def _version() -> str:
    from sync import __version__

    return __version__


def _now() -> float:
    return datetime.now(UTC).timestamp()


def _header(r: RunReport) -> str:
    rows = [
        ("Job", r.job),
        ("Destination", r.platform or "-"),
        ("Started", _when(r.started_at)),
        ("Finished", _when(r.finished_at)),
        ("Duration", _duration(r.duration)),
        ("Exit status", r.exit_status),
    ]
    if r.message:
        rows.append(("Message", r.message))
    fields = ("job", "destination", "started", "finished", "duration", "exit_status", "message")
    items = "".join(
        f'<dt>{_esc(k)}</dt><dd data-field="{f}">{_esc(v)}</dd>'
        for (k, v), f in zip(rows, fields, strict=False)
    )
    return f"<dl>{items}</dl>"


def _cards(r: RunReport) -> str:
    cards = [
        ("requests", "requests", r.total("requests"), False),
        ("ids_ok", "IDs ok", r.total("ids_ok"), False),
        ("ids_rejected", "IDs refused by the platform", r.total("ids_rejected"), True),
        ("ids_failed", "IDs failed", r.total("ids_failed"), True),
        ("ids_unfinished", "IDs not sent (unfinished)", r.total("ids_unfinished"), True),
        ("rows_rejected", "input rows rejected", r.rows_rejected, True),
    ]
    if r.has_attempts:
        cards += [
            ("rate_limited", "429 answers", r.total("rate_limited"), True),
            ("retries", "retries", r.total("retries"), False),
        ]
    html_cards = "".join(
        f'<div class="card{" bad" if bad and value else ""}" data-total="{key}" data-value="{value}">'
        f"<b>{value:,}</b><span>{_esc(label)}</span></div>"
        for key, label, value, bad in cards
    )
    return f'<div class="cards">{html_cards}</div>'


def _endpoint_table(r: RunReport) -> str:
    if not r.endpoints:
        return '<p class="note">No batch was sent in this run.</p>'
    head = (
        "<tr><th>Endpoint</th><th class='n'>Batches</th><th class='n'>Requests</th><th class='n'>IDs ok</th>"
        "<th class='n'>Refused</th><th class='n'>Failed</th><th class='n'>Unfinished</th><th class='n'>429s</th>"
        "<th class='n'>Retries</th><th class='n'>Budget req/s</th><th class='n'>p50 ms</th>"
        "<th class='n'>p95 ms</th></tr>"
    ).replace("'", '"')
    rows = []
    for e in r.endpoints:
        rows.append(
            f'<tr data-endpoint="{_esc(e.endpoint)}"><td class="mono">{_esc(e.endpoint)}</td>'
            + _cell("batches", e.batches)
            + _cell("requests", e.requests)
            + _cell("ids_ok", e.ids_ok)
            + _cell("ids_rejected", e.ids_rejected)
            + _cell("ids_failed", e.ids_failed)
            + _cell("ids_unfinished", e.ids_unfinished)
            + _cell("rate_limited", e.rate_limited)
            + _cell("retries", e.retries)
            + _cell("budget_rate", e.budget_rate, digits=2)
            + _cell("p50_ms", e.p50_ms)
            + _cell("p95_ms", e.p95_ms)
            + "</tr>"
        )
    total = ['<tr class="total" data-endpoint="*"><td>all endpoints</td>']
    for name in ("batches", "requests", "ids_ok", "ids_rejected", "ids_failed", "ids_unfinished"):
        total.append(_cell(name, r.total(name)))
    for name in ("rate_limited", "retries"):
        total.append(_cell(name, r.total(name) if r.has_attempts else None))
    total.append("<td></td><td></td><td></td></tr>")
    return f"<table>{head}{''.join(rows)}{''.join(total)}</table>"


def _errors_table(r: RunReport) -> str:
    if not r.errors:
        return '<p class="note">No errors.</p>'
    rows = "".join(
        f'<tr data-kind="{_esc(e.kind)}"><td class="n" data-field="count">{e.count:,}</td><td>{_esc(e.kind)}</td>'
        f'<td class="mono">{_esc(e.endpoint)}</td><td>{_esc(e.status)}</td><td>{_esc(e.message)}</td></tr>'
        for e in r.errors
    )
    return (
        '<table class="errors"><tr><th class="n">Count</th><th>Kind</th><th>Endpoint</th><th>Status</th>'
        f"<th>Message</th></tr>{rows}</table>"
    )


def _refused_table(r: RunReport) -> str:
    total = r.rows_rejected + r.ids_refused
    if not total:
        return '<p class="note">No row was refused.</p>'
    rows = "".join(
        f'<tr data-source="{_esc(x.source)}"><td>{_esc(x.source)}</td><td class="mono">{_esc(x.endpoint or "-")}</td>'
        f'<td class="mono">{_esc(x.path or "-")}</td>'
        f'<td class="n">{_int(x.row)}</td><td class="mono">{_esc(x.ext_id or "-")}</td><td>{_esc(x.reason)}</td></tr>'
        for x in r.refused
    )
    note = (
        f'<p class="note">{r.rows_rejected:,} input rows rejected by validation and {r.ids_refused:,} IDs refused '
        f"by the platform; the first {len(r.refused):,} are listed (all of them: <span class='mono'>pushsync "
        f"ledger-export {_esc(r.run_id)} --table rejected-rows|refused-ids</span>).</p>"
    ).replace("'", '"')
    return (
        f'{note}<table class="refused"><tr><th>Refused by</th><th>Endpoint</th><th>File</th><th class="n">Row</th>'
        f"<th>External ID</th><th>Reason</th></tr>{rows}</table>"
    )


# -- charts: inline SVG ----------------------------------------------------------------------------------------

_W, _H = 900, 210
_ML, _MR, _MT, _MB = 56, 16, 28, 34  # margins: left (y labels), right, top (title, legend), bottom (x labels)


def _charts(r: RunReport) -> str:
    if not r.has_attempts:
        return (
            '<p class="note">This ledger has no per-attempt records (it was written by an older pushsync), so '
            "there are no charts of requests, 429s and retries over time or of latency.</p>"
        )
    if not r.bins:
        return '<p class="note">No request was made in this run.</p>'
    n_bins = max(b.index for b in r.bins) + 1
    w = r.bin_seconds
    parts = [
        f'<p class="note">Each point is one {_num(w)} s interval from the start of the run; dashed lines are '
        "the configured budgets.</p>"
    ]
    for i, e in enumerate(r.endpoints):
        values = [0.0] * n_bins
        for b in r.bins:
            if b.endpoint == e.endpoint:
                values[b.index] = b.requests / w
        if not any(values):
            continue
        colour = _PALETTE[i % len(_PALETTE)]
        budget = [("budget", e.budget_rate)] if e.budget_rate else []
        parts.append(
            _line_chart(
                f"{e.endpoint}: requests per second",
                [(e.endpoint, colour, values)],
                w,
                budget,
                chart_id=f"rate-{i}",
            )
        )
    limited = [0.0] * n_bins
    retries = [0.0] * n_bins
    for b in r.bins:
        limited[b.index] += b.rate_limited
        retries[b.index] += b.retries
    parts.append(
        _line_chart(
            f"429 answers and retries per {_num(w)} s, all endpoints",
            [("429s", "#dc2626", limited), ("retries", "#d97706", retries)],
            w,
            [],
            chart_id="retries",
            counts=True,
        )
    )
    labels = [f"≤{_ms_label(b)}" for b in LATENCY_BUCKETS] + [f">{_ms_label(LATENCY_BUCKETS[-1])}"]
    parts.append(_bar_chart("Latency per attempt (all endpoints)", labels, list(r.latency_counts), "latency"))
    return "\n".join(parts)


def _ms_label(seconds: float) -> str:
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"


def _ticks(vmax: float, n: int = 4, *, integer: bool = False) -> list[float]:
    """Round tick values from 0 to at least ``vmax`` (whole steps only for counts)."""
    if vmax <= 0:
        return [0.0, 1.0]
    raw = vmax / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw and (not integer or m * mag >= 1))
    if integer and not float(step).is_integer():
        step = math.ceil(step)
    count = math.ceil(vmax / step - 1e-9)
    return [i * step for i in range(count + 1)]


def _tick_label(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}".rstrip("0")


def _time_label(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 120:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _frame(
    title: str, chart_id: str, y_ticks: list[float], y_of: Any, legend: list[tuple[str, str, bool]]
) -> list[str]:
    """The SVG's opening, title, legend and y grid; the caller adds the data and ``</svg>``."""
    svg = [
        f'<div class="chart" id="{_esc(chart_id)}"><svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" '
        f'role="img" aria-label="{_esc(title)}"><title>{_esc(title)}</title>',
        f'<text x="{_ML}" y="16" font-size="13" font-weight="600" fill="#0f172a">{_esc(title)}</text>',
    ]
    x = _W - _MR
    for label, colour, dashed in reversed(legend):
        text_w = 7 * len(label) + 4
        x -= text_w
        svg.append(f'<text x="{x}" y="16" font-size="12" fill="#334155">{_esc(label)}</text>')
        x -= 18
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        svg.append(
            f'<line x1="{x}" y1="12" x2="{x + 14}" y2="12" stroke="{colour}" stroke-width="2"{dash} />'
        )
        x -= 12
    for t in y_ticks:
        y = y_of(t)
        svg.append(
            f'<line x1="{_ML}" y1="{y:.1f}" x2="{_W - _MR}" y2="{y:.1f}" stroke="#e2e8f0" />'
            f'<text x="{_ML - 6}" y="{y + 4:.1f}" font-size="11" fill="#475569" text-anchor="end">{_tick_label(t)}</text>'
        )
    return svg


def _line_chart(
    title: str,
    series: list[tuple[str, str, list[float]]],
    bin_seconds: float,
    hlines: Sequence[tuple[str, float | None]],
    *,
    chart_id: str,
    counts: bool = False,
) -> str:
    """Step lines, one value per time bin, with optional dashed horizontal lines (budgets)."""
    n = max(len(v) for _, _, v in series)
    vmax = max([max(v) for _, _, v in series] + [h for _, h in hlines if h])
    y_ticks = _ticks(vmax * 1.05, integer=counts)
    plot_w, plot_h = _W - _ML - _MR, _H - _MT - _MB

    def x_of(i: float) -> float:
        return _ML + plot_w * i / n

    def y_of(v: float) -> float:
        return _MT + plot_h * (1 - v / y_ticks[-1])

    legend = [(label, colour, False) for label, colour, _ in series]
    legend += [(f"{label} {_num(h, 2)}/s", series[0][1], True) for label, h in hlines if h]
    svg = _frame(title, chart_id, y_ticks, y_of, legend)
    for t in _ticks(n * bin_seconds, 6):
        if t > n * bin_seconds:
            break
        x = x_of(t / bin_seconds)
        svg.append(
            f'<line x1="{x:.1f}" y1="{_MT + plot_h}" x2="{x:.1f}" y2="{_MT + plot_h + 4}" stroke="#94a3b8" />'
            f'<text x="{x:.1f}" y="{_H - 14}" font-size="11" fill="#475569" text-anchor="middle">'
            f"{_esc(_time_label(t))}</text>"
        )
    for label, h in hlines:
        if h:
            y = y_of(h)
            svg.append(
                f'<line x1="{_ML}" y1="{y:.1f}" x2="{_W - _MR}" y2="{y:.1f}" stroke="{series[0][1]}" '
                f'stroke-width="1.5" stroke-dasharray="5 3" data-line="{_esc(label)}" data-value="{h}">'
                f"<title>{_esc(label)}: {_num(h, 2)} per second</title></line>"
            )
    for label, colour, values in series:
        points: list[str] = []
        for i, v in enumerate(values):
            y = y_of(v)
            points.append(f"{x_of(i):.1f},{y:.1f} {x_of(i + 1):.1f},{y:.1f}")
        svg.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(points)}" '
            f'data-series="{_esc(label)}" data-sum="{sum(values):g}"><title>{_esc(label)}</title></polyline>'
        )
    svg.append(
        f'<line x1="{_ML}" y1="{_MT + plot_h}" x2="{_W - _MR}" y2="{_MT + plot_h}" stroke="#94a3b8" />'
    )
    svg.append("</svg></div>")
    return "".join(svg)


def _bar_chart(title: str, labels: list[str], values: list[int], chart_id: str) -> str:
    """Vertical bars with their counts on top (the latency histogram)."""
    y_ticks = _ticks(max(values) * 1.1 if any(values) else 1, integer=True)
    plot_w, plot_h = _W - _ML - _MR, _H - _MT - _MB

    def y_of(v: float) -> float:
        return _MT + plot_h * (1 - v / y_ticks[-1])

    svg = _frame(title, chart_id, y_ticks, y_of, [])
    slot = plot_w / len(values)
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        x = _ML + i * slot
        y = y_of(v)
        svg.append(
            f'<rect x="{x + 3:.1f}" y="{y:.1f}" width="{slot - 6:.1f}" height="{_MT + plot_h - y:.1f}" '
            f'fill="#2563eb" data-bucket="{_esc(label)}" data-value="{v}"><title>{_esc(label)}: {v:,} attempts'
            f"</title></rect>"
            f'<text x="{x + slot / 2:.1f}" y="{_H - 14}" font-size="10.5" fill="#475569" text-anchor="middle">'
            f"{_esc(label)}</text>"
        )
        if v:
            svg.append(
                f'<text x="{x + slot / 2:.1f}" y="{y - 3:.1f}" font-size="10.5" fill="#0f172a" '
                f'text-anchor="middle">{v:,}</text>'
            )
    svg.append(
        f'<line x1="{_ML}" y1="{_MT + plot_h}" x2="{_W - _MR}" y2="{_MT + plot_h}" stroke="#94a3b8" />'
    )
    svg.append("</svg></div>")
    return "".join(svg)
