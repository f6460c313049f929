"""The run report's page (behind :mod:`sync.report.report`): one HTML document with inline CSS and inline SVG charts.

No script, no font, no CDN: the page opens offline, from a mail attachment or a CI artifact. It is written as
polyglot markup (well-formed XML as well as HTML5) so a test can parse it strictly. Every string shown passes
through :func:`html.escape` here; the messages were already redacted and clipped when they were read.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import UTC, datetime

from sync.errors import printable
from sync.report._report_data import RunReport
from sync.report.metrics import LATENCY_BUCKETS

# -- the page ------------------------------------------------------------------------------------------------

_STATUS_COLOURS = {
    "done": "#15803d",
    "partial": "#b45309",
    "aborted": "#b91c1c",
    "interrupted": "#475569",
    "died": "#86198f",
}
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
.multiples{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:0 10px}
tr.this td{background:#eff6ff}
.chart svg{display:block;width:100%;height:auto}
.note{color:#475569;font-size:13px}.mono{font-family:ui-monospace,monospace}
footer{color:#64748b;font-size:12px;margin-top:32px}
"""


def _esc(value: object) -> str:
    # Control characters escaped first (sync.errors.printable): a platform's answer may hold an ESC or a NUL,
    # which XML forbids, so the page was no longer well-formed.
    return html.escape(printable(str(value)), quote=True)


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


def render_page(report: RunReport) -> str:
    """The report page of ``report``: a complete HTML document as a string."""
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
        "<h2>Input</h2>",
        _input(report),
        "<h2>Per endpoint</h2>",
        _endpoint_table(report),
        "<h2>Requests over time</h2>",
        _charts(report),
        "<h2>Recent runs of this job</h2>",
        _history(report),
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
    # Imported when needed: the package's __init__ stays free to import from the report without a cycle.
    from sync import __version__

    return __version__


def _now() -> float:
    return datetime.now(UTC).timestamp()


def _header(r: RunReport) -> str:
    rows = [
        ("Job", r.job, "job"),
        ("Destination", r.platform or "-", "destination"),
        ("Started", _when(r.started_at), "started"),
        ("Finished", _when(r.finished_at), "finished"),
        ("Duration", _duration(r.duration), "duration"),
        ("Exit status", r.exit_status, "exit_status"),
    ]
    if r.origin:
        # As `pushsync show` says: a resume or a retry sends only what the run it replays left.
        rows.append(("Continues", f"run {r.origin} ({r.origin_mode or 'resume'})", "origin"))
    if r.message:
        rows.append(("Message", r.message, "message"))
    items = "".join(f'<dt>{_esc(k)}</dt><dd data-field="{f}">{_esc(v)}</dd>' for k, v, f in rows)
    return f"<dl>{items}</dl>"


def _input(r: RunReport) -> str:
    i = r.input
    if i is None:
        return '<p class="note">This run\'s summary holds no input figures (a run of an older pushsync).</p>'
    rows: list[tuple[str, str, object]] = [
        ("rows_read", "Rows read", f"{i.rows_read:,}"),
        ("rows_clean", "Rows clean", f"{i.rows_clean:,}"),
        ("input_rows_rejected", "Rows rejected by validation", f"{i.rows_rejected:,}"),
        ("duplicates_dropped", "Duplicate rows dropped", f"{i.duplicates_dropped:,}"),
        ("mode", "Mode", i.mode),
        ("destination_platform", "Platform", i.platform),
        ("destination_host", "Base URL host", i.host),
    ]
    if i.snapshot is not None:
        rows += [(f"snapshot_{k}", f"Users {k}", f"{v:,}") for k, v in i.snapshot]
    items = "".join(f'<dt>{_esc(label)}</dt><dd data-field="{f}">{_esc(v)}</dd>' for f, label, v in rows)
    return f'<dl class="input">{items}</dl>'


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
    if r.ids_per_second is not None:
        html_cards += (
            f'<div class="card" data-total="ids_per_second" data-value="{r.ids_per_second}">'
            f"<b>{_num(r.ids_per_second)}</b><span>IDs per second, start to finish</span></div>"
        )
    return f'<div class="cards">{html_cards}</div>'


def _endpoint_table(r: RunReport) -> str:
    if not r.endpoints:
        return '<p class="note">No batch was sent in this run.</p>'
    head = (
        "<tr><th>Endpoint</th><th class='n'>Batches</th><th class='n'>Requests</th><th class='n'>IDs ok</th>"
        "<th class='n'>Refused</th><th class='n'>Failed</th><th class='n'>Unfinished</th><th class='n'>429s</th>"
        "<th class='n'>Retries</th><th class='n'>Budget req/s</th><th class='n'>IDs/s</th><th class='n'>p50 ms</th>"
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
            + _cell("ids_per_second", e.ids_per_second)
            + _cell("p50_ms", e.p50_ms)
            + _cell("p95_ms", e.p95_ms)
            + "</tr>"
        )
    total = ['<tr class="total" data-endpoint="*"><td>all endpoints</td>']
    for name in ("batches", "requests", "ids_ok", "ids_rejected", "ids_failed", "ids_unfinished"):
        total.append(_cell(name, r.total(name)))
    for name in ("rate_limited", "retries"):
        total.append(_cell(name, r.total(name) if r.has_attempts else None))
    total.append("<td></td>")
    total.append(_cell("ids_per_second", r.ids_per_second))
    total.append("<td></td><td></td></tr>")
    return f"<table>{head}{''.join(rows)}{''.join(total)}</table>"


def _history(r: RunReport) -> str:
    """The job's last runs in this ledger: a trend of duration, requests and refusals (this run highlighted)."""
    if len(r.history) < 2:
        return '<p class="note">This is the first run of this job in this ledger.</p>'
    rows = []
    for h in r.history:
        this = ' class="this"' if h.run_id == r.run_id else ""
        rows.append(
            f'<tr{this} data-run="{_esc(h.run_id)}"><td class="mono">{_esc(h.run_id)}</td><td>{_esc(_when(h.started_at))}</td>'
            f"<td>{_esc(h.status)}</td>"
            + _cell("exit_code", h.exit_code)
            + _cell("seconds", h.seconds)
            + _cell("requests", h.requests)
            + _cell("ids_ok", h.ids_ok)
            + _cell("ids_refused", h.ids_refused)
            + _cell("rows_rejected", h.rows_rejected)
            + "</tr>"
        )
    table = (
        '<table class="history"><tr><th>Run</th><th>Started</th><th>Status</th><th class="n">Exit</th>'
        '<th class="n">Seconds</th><th class="n">Requests</th><th class="n">IDs ok</th><th class="n">Refused</th>'
        f'<th class="n">Rows rejected</th></tr>{"".join(rows)}</table>'
    )
    oldest_first = list(reversed(r.history))
    chart = _bar_chart(
        "Duration of the last runs (seconds, oldest first)",
        [_when(h.started_at)[5:16] for h in oldest_first],
        [round(h.seconds or 0) for h in oldest_first],
        "history",
    )
    return table + chart


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
_PLOT_W, _PLOT_H = _W - _ML - _MR, _H - _MT - _MB  # the plot area inside the margins
_AXIS_Y = _MT + _PLOT_H  # where the x axis runs: value 0 on every chart
# Rate charts take their endpoint's colour in turn (past eight endpoints the colours repeat).
_PALETTE = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569")


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
        f'<p class="note">Each point is one {_num(w)} s interval from the start of the run; each endpoint has '
        "its own scale, so a small one is as readable as a big one; dashed lines are the configured budgets "
        "(named in the legend when far above what was sent).</p>",
        '<div class="multiples">',
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
                f"{e.endpoint}: requests/s",
                [(e.endpoint, colour, values)],
                w,
                budget,
                chart_id=f"rate-{i}",
                width=440,
            )
        )
    parts.append("</div>")
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


def _y(value: float, y_ticks: list[float]) -> float:
    """Where ``value`` sits on a chart whose y axis runs from 0 to the last of ``y_ticks``."""
    return _MT + _PLOT_H * (1 - value / y_ticks[-1])


def _frame(
    title: str,
    chart_id: str,
    y_ticks: list[float],
    legend: list[tuple[str, str, bool]],
    width: int = _W,
    notes: Sequence[str] = (),
) -> list[str]:
    """The SVG's opening, title, legend and y grid; the caller adds the data, then :func:`_close` ends it.
    ``notes``: SVG elements put right under the title (an off-scale budget)."""
    svg = [
        f'<div class="chart" id="{_esc(chart_id)}"><svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {_H}" '
        f'role="img" aria-label="{_esc(title)}"><title>{_esc(title)}</title>',
        f'<text x="{_ML}" y="16" font-size="13" font-weight="600" fill="#0f172a">{_esc(title)}</text>',
        *notes,
    ]
    x = width - _MR
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
        y = _y(t, y_ticks)
        svg.append(
            f'<line x1="{_ML}" y1="{y:.1f}" x2="{width - _MR}" y2="{y:.1f}" stroke="#e2e8f0" />'
            f'<text x="{_ML - 6}" y="{y + 4:.1f}" font-size="11" fill="#475569" text-anchor="end">{_tick_label(t)}</text>'
        )
    return svg


def _close(svg: list[str], width: int = _W) -> str:
    """The x axis over the bars or lines already drawn, and the end of the chart :func:`_frame` began."""
    svg.append(f'<line x1="{_ML}" y1="{_AXIS_Y}" x2="{width - _MR}" y2="{_AXIS_Y}" stroke="#94a3b8" />')
    svg.append("</svg></div>")
    return "".join(svg)


def _line_chart(
    title: str,
    series: list[tuple[str, str, list[float]]],
    bin_seconds: float,
    hlines: Sequence[tuple[str, float | None]],
    *,
    chart_id: str,
    counts: bool = False,
    width: int = _W,
) -> str:
    """Step lines, one value per time bin, with optional dashed horizontal lines (budgets).

    The y scale fits the data: a budget line is drawn when it lies within twice the highest value, else it is
    named under the title (with the same ``data-line`` attribute), so a budget far above an endpoint's traffic
    no longer flattens that endpoint's line to the axis."""
    n = max(len(v) for _, _, v in series)
    data_max = max(max(v) for _, _, v in series)
    drawn = [(label, h) for label, h in hlines if h and (not data_max or h <= 2 * data_max)]
    off_scale = [(label, h) for label, h in hlines if h and (label, h) not in drawn]
    vmax = max([data_max] + [h for _, h in drawn if h])
    y_ticks = _ticks(vmax * 1.05, integer=counts)
    plot_w = width - _ML - _MR

    def x_of(i: float) -> float:
        return _ML + plot_w * i / n

    # A small multiple's title names its one series: its legend only explains the dashed budget line.
    legend = [(label, colour, False) for label, colour, _ in series] if width >= _W else []
    legend += [(f"{label} {_num(h, 2)}/s", series[0][1], True) for label, h in drawn if h]
    notes = [
        f'<text x="{_ML}" y="30" font-size="11" fill="#475569" data-line="{_esc(label)}" data-value="{h}">'
        f"{_esc(label)} {_num(h, 2)}/s, above this scale</text>"
        for label, h in off_scale
    ]
    svg = _frame(title, chart_id, y_ticks, legend, width, notes)
    for t in _ticks(n * bin_seconds, 6 if width >= _W else 4):
        if t > n * bin_seconds:
            break
        x = x_of(t / bin_seconds)
        svg.append(
            f'<line x1="{x:.1f}" y1="{_AXIS_Y}" x2="{x:.1f}" y2="{_AXIS_Y + 4}" stroke="#94a3b8" />'
            f'<text x="{x:.1f}" y="{_H - 14}" font-size="11" fill="#475569" text-anchor="middle">'
            f"{_esc(_time_label(t))}</text>"
        )
    for label, h in drawn:
        if h:
            y = _y(h, y_ticks)
            svg.append(
                f'<line x1="{_ML}" y1="{y:.1f}" x2="{width - _MR}" y2="{y:.1f}" stroke="{series[0][1]}" '
                f'stroke-width="1.5" stroke-dasharray="5 3" data-line="{_esc(label)}" data-value="{h}">'
                f"<title>{_esc(label)}: {_num(h, 2)} per second</title></line>"
            )
    for label, colour, values in series:
        points: list[str] = []
        for i, v in enumerate(values):
            y = _y(v, y_ticks)
            points.append(f"{x_of(i):.1f},{y:.1f} {x_of(i + 1):.1f},{y:.1f}")
        svg.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(points)}" '
            f'data-series="{_esc(label)}" data-sum="{sum(values):g}"><title>{_esc(label)}</title></polyline>'
        )
    return _close(svg, width)


def _bar_chart(title: str, labels: list[str], values: list[int], chart_id: str) -> str:
    """Vertical bars with their counts on top (the latency histogram)."""
    y_ticks = _ticks(max(values) * 1.1 if any(values) else 1, integer=True)
    svg = _frame(title, chart_id, y_ticks, [])
    slot = _PLOT_W / len(values)
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        x = _ML + i * slot
        y = _y(v, y_ticks)
        svg.append(
            f'<rect x="{x + 3:.1f}" y="{y:.1f}" width="{slot - 6:.1f}" height="{_AXIS_Y - y:.1f}" '
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
    return _close(svg)
