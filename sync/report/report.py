"""The run report: one self-contained HTML file that tells, at a glance, what a run did.

:func:`load_report` reads a run from the job's ledger (read-only: its own ``mode=ro`` SQLite connection, so a
report can be built while a run writes) into a :class:`RunReport`; :func:`render_html` turns that into a page
with inline CSS and inline SVG charts — no script, no font, no CDN: it opens offline, from a mail attachment or
a CI artifact; :func:`write_report` does both and writes the file. Every string from the ledger passes through
:func:`sync.redact.redact` and :func:`html.escape`. The only personal data shown are the external IDs of
refused rows.

This module is the public face; the work is done behind it, one module per concept:

- ``sync/report/_report_data.py``: the records below and the read-only ledger queries that fill them;
- ``sync/report/_report_html.py``: the page — CSS, header, tables and the inline SVG charts.

Charts need the ledger's per-attempt records (the ``attempts`` table, one row per HTTP request). A ledger
written before that table existed still gives the header, the per-endpoint table, the errors and the refused
rows; the charts then say why they are missing.
"""

from __future__ import annotations

from pathlib import Path

from sync._output import replaced_atomically
from sync.ledger.ledger import connect_read_only
from sync.report._report_data import (
    EndpointLine,
    ErrorLine,
    RefusedLine,
    RunReport,
    TimeBin,
    read_run,
)
from sync.report._report_html import render_page

__all__ = [
    "EndpointLine",
    "ErrorLine",
    "RefusedLine",
    "RunReport",
    "TimeBin",
    "load_report",
    "render_html",
    "save_report",
    "write_report",
]


def load_report(ledger_path: str | Path, run_id: str) -> RunReport:
    """Read ``run_id`` from the ledger at ``ledger_path`` (read-only). Raises :class:`StateError` if absent."""
    path = Path(ledger_path)
    conn = connect_read_only(path)
    try:
        return read_run(conn, run_id, path)
    finally:
        conn.close()


def render_html(report: RunReport) -> str:
    """The report page (a complete HTML document as a string)."""
    return render_page(report)


def write_report(ledger_path: str | Path, run_id: str, out: str | Path) -> Path:
    """Build the report of ``run_id`` and write it to ``out`` (UTF-8); returns the path written."""
    return save_report(load_report(ledger_path, run_id), out)


def save_report(report: RunReport, out: str | Path) -> Path:
    """Write the page of ``report`` to ``out`` (UTF-8); returns the path written."""
    page = render_html(report)
    out = Path(out)
    with replaced_atomically(out) as tmp:  # a half-written page never sits where a person would open it
        tmp.write_text(page, encoding="utf-8")
    return out
