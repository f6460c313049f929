"""``pushsync trace ID``: what happened to one external ID across a job's runs, read from the ledger.

Read-only (SQLite ``mode=ro``, like the run report), so it can be asked while a run is writing. For each run,
newest first: the batches that carried the ID (endpoint, operation, status, attempts, the answer), the
platform's refusal of it (code, message and the input row it came from), and input rows with that ID that
validation rejected (file, row, column, reason).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from sync.ledger.ledger import connect_read_only, holds_id
from sync.redact import redact

__all__ = ["TraceEntry", "trace_id"]


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One thing that happened to the ID in one run. ``kind``: ``batch``, ``refused`` or ``rejected row``."""

    run_id: str
    run_started_at: float
    job: str
    kind: str
    endpoint: str | None
    operation: str | None
    status: str
    detail: str
    path: str | None = None
    row: int | None = None
    ext_id: str | None = None
    """The ID as the ledger holds it (``trace`` also looks for an ID given with spaces around it trimmed)."""


def trace_id(ledger_path: Path, ext_id: str) -> list[TraceEntry]:
    """Every record of ``ext_id`` in the ledger at ``ledger_path``, newest run first (batches before refusals)."""
    conn = connect_read_only(ledger_path)
    try:
        return [dataclasses.replace(e, ext_id=ext_id) for e in _trace(conn, ext_id)]
    finally:
        conn.close()


def _trace(conn: sqlite3.Connection, ext_id: str) -> list[TraceEntry]:
    entries: list[TraceEntry] = []
    # Every batch's packed IDs are read and searched (as bytes): a full scan, fine for a question asked by a person.
    for (
        run_id,
        started,
        job,
        endpoint,
        operation,
        status,
        attempts,
        http,
        code,
        message,
        packed,
    ) in conn.execute(
        "SELECT b.run_id, r.started_at, r.job, b.endpoint, b.operation, b.status, b.attempts, b.http_status, "
        "b.code, b.message, b.ext_ids FROM batches b JOIN runs r ON r.run_id = b.run_id "
        "ORDER BY r.started_at DESC, b.rowid",
    ):
        if not holds_id(packed, ext_id):
            continue
        answer = "no answer" if http is None else f"HTTP {http}"
        parts = [f"{attempts} attempt{'s' if attempts != 1 else ''}", answer if attempts else "not sent"]
        if code:
            parts.append(f"code {code}")
        if message:
            parts.append(redact(message)[:200])
        entries.append(
            TraceEntry(run_id, started, job, "batch", endpoint, operation, status, ", ".join(parts))
        )
    for run_id, started, job, endpoint, operation, code, message, path, row in conn.execute(
        "SELECT i.run_id, r.started_at, r.job, b.endpoint, b.operation, i.code, i.message, i.origin_path, "
        "i.origin_row FROM batch_ids i JOIN runs r ON r.run_id = i.run_id "
        "LEFT JOIN batches b ON b.run_id = i.run_id AND b.batch_id = i.batch_id "
        "WHERE i.ext_id = ? ORDER BY r.started_at DESC, i.rowid",
        (ext_id,),
    ):
        detail = (f"code {code}: " if code else "") + redact(message)[:200]
        entries.append(
            TraceEntry(run_id, started, job, "refused", endpoint, operation, "refused", detail, path, row)
        )
    for run_id, started, job, path, row, column, reason in conn.execute(
        "SELECT x.run_id, r.started_at, r.job, x.path, x.row, x.column_name, x.reason FROM rejected_rows x "
        "JOIN runs r ON r.run_id = x.run_id WHERE x.ext_id = ? ORDER BY r.started_at DESC, x.rowid",
        (ext_id,),
    ):
        detail = (f"{column}: " if column else "") + redact(reason)[:200]
        entries.append(
            TraceEntry(run_id, started, job, "rejected row", None, None, "rejected", detail, path, row)
        )
    entries.sort(key=lambda e: -e.run_started_at)  # stable: within a run, batches, refusals, rejections
    return entries
