"""``pushsync report RUN -o report.html``: the run report, one self-contained HTML file (see docs/operations.md).

``RUN`` is a run ID or ``latest``. The ledger is found from ``--ledger PATH``, ``--job JOB`` (its workdir's
ledger) or ``--workdir DIR``; with none of them, every job workdir under the current directory (``.pushsync/*/``
and ``*/.pushsync/*/``) is searched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sync.cli._ledgers import DIED
from sync.errors import ExitCode, printable

if TYPE_CHECKING:
    from sync.records import RejectedRow

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``report``."""
    report = subparsers.add_parser(
        "report", help="write a run's report: one self-contained HTML page (charts, errors, refused rows)"
    )
    report.add_argument("run_id", metavar="RUN", help="a run ID, or 'latest'")
    report.add_argument("-o", "--out", type=Path, required=True, help="the HTML file to write")
    where = report.add_mutually_exclusive_group()
    where.add_argument("--job", type=Path, help="the job file whose ledger holds the run")
    where.add_argument("--ledger", type=Path, help="the ledger file (ledger.sqlite) itself")
    where.add_argument("--workdir", type=Path, help="a job's workdir (holds ledger.sqlite)")
    report.add_argument("--output", choices=["text", "json"], default="text", help="what to print on stdout")
    from sync.cli._ledgers import add_database_url

    add_database_url(report)
    report.set_defaults(func=_report)


def _locate(args: argparse.Namespace) -> tuple[Path, str]:
    """(ledger, run ID) for the arguments; ``latest`` is the most recently started run in those ledgers."""
    from sync.cli._ledgers import find_run, ledger_paths

    named = any(x is not None for x in (args.job, args.workdir, args.ledger))
    return find_run(args.run_id, ledger_paths(args.job, args.workdir, args.ledger), named=named)


def _report(args: argparse.Namespace) -> int:
    from sync.cli._ledgers import database_url, local_copy, name_the_dead, not_the_ledger
    from sync.report.report import load_report, save_report, write_report
    from sync.state import job_lock_held

    url = database_url(args, args.job)
    if url is not None:
        from sync.coordination import describe_url

        # The report reads SQLite: a copy of the job's runs, made for the page and removed after.
        with local_copy(url, args.run_id) as (copy, run_id):
            out = write_report(copy, run_id, args.out)
        ledger: Any = describe_url(url)
    else:
        ledger, run_id = _locate(args)
        not_the_ledger(args.out, ledger)
        # A run recorded running that no process runs any more died, as `runs` and `show` say (the page said
        # "running" for good). The coordinated runs' workers are elsewhere: their runs are shown as recorded.
        held = job_lock_held(ledger.parent)
        (report,) = name_the_dead(ledger, [load_report(ledger, run_id)], held)
        if report.status == DIED:  # no process holds the job's lock: no earlier run listed runs either
            history = tuple(
                dataclasses.replace(h, status=DIED) if h.status == "running" else h for h in report.history
            )
            report = dataclasses.replace(report, history=history)
        out = save_report(report, args.out)
    if args.output == "json":
        print(json.dumps({"run_id": run_id, "ledger": str(ledger), "report": str(out.resolve())}))
    else:
        print(f"wrote the report of run {run_id} to {out}")
    return int(ExitCode.OK)


# -- `pushsync runs` and `pushsync show` as rich tables (called by sync.cli.run_cmd) ---------------------------

_STATUS_STYLE = {
    "done": "green",
    "partial": "yellow",
    "aborted": "bold red",
    "interrupted": "magenta",
    DIED: "bold magenta",
}


def _console() -> Any:
    import sys

    from rich.console import Console

    # Not a terminal (a scheduler's log, a pipe): no colours, and wide enough that rows do not wrap.
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160, highlight=False)


def _when(ts: float | None) -> str:
    from datetime import UTC, datetime

    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _took(info: Any) -> str:
    if info.finished_at is None:
        return "-" if info.status == DIED else "running"
    seconds = info.finished_at - info.started_at
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _status(info: Any) -> str:
    style = _STATUS_STYLE.get(info.status, "")
    return f"[{style}]{info.status}[/]" if style else info.status


def _lineage(info: Any) -> str:
    """Where a run came from and where it sent: ``retry of run X · to netmera-… · full refresh`` (empty for a
    fresh run recorded by a pushsync older than ledger schema 6)."""
    parts = []
    if info.origin:
        parts.append(f"{info.origin_mode or 'replay'} of run {info.origin}")
    if info.destination:
        parts.append(f"to {info.destination}")
    if info.full_refresh:
        parts.append("full refresh")
    return " · ".join(parts)


def print_runs(infos: list[Any]) -> None:
    """The runs (:class:`sync.ledger.ledger.RunInfo`, newest first) as one table."""
    from rich.table import Table

    table = Table(title=None, header_style="bold", show_lines=False)
    # The origin column only when some listed run resumed or retried another: a plain history stays narrow.
    origins = any(r.origin for r in infos)
    for name, justify in (
        ("run", "left"),
        *((("of", "left"),) if origins else ()),
        ("job", "left"),
        ("started (UTC)", "left"),
        ("took", "right"),
        ("status", "left"),
        ("exit", "right"),
        ("requests", "right"),
        ("IDs ok", "right"),
        ("refused", "right"),
        ("failed", "right"),
        ("rows rejected", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=name in ("run", "of", "started (UTC)"))
    for r in infos:
        totals = (r.summary or {}).get("totals", {})

        def n(key: str, totals: dict[str, Any] = totals) -> str:
            return f"{totals[key]:,}" if key in totals else "-"

        of = [f"{r.origin_mode or 'replay'} {r.origin}" if r.origin else "-"] if origins else []
        table.add_row(
            _shown(r.run_id),
            *map(_shown, of),
            _shown(r.job),
            _when(r.started_at),
            _took(r),
            _status(r),
            "-" if r.exit_code is None else str(r.exit_code),
            n("requests"),
            n("ids_ok"),
            n("ids_rejected"),
            n("ids_failed"),
            n("rows_rejected"),
        )
    _console().print(table)


def print_show(
    info: Any,
    unfinished: list[Any],
    refused: list[tuple[str, str, str | None, str]],
    rejected: Sequence[RejectedRow] = (),
) -> None:
    """One run: what happened, per endpoint, unfinished batches, refused IDs and the input rows validation
    rejected (the first 20 of each)."""
    from rich.table import Table

    console = _console()
    summary = info.summary or {}
    exit_name = summary.get("exit_status") or ("-" if info.exit_code is None else "")
    console.print(
        f"[bold]run {_shown(info.run_id)}[/] of job [bold]{_shown(info.job)}[/] ({_shown(info.platform or '-')}): "
        f"{_status(info)}, exit {info.exit_code if info.exit_code is not None else '-'} {_shown(exit_name)}"
    )
    console.print(f"  started {_when(info.started_at)} UTC, took {_took(info)}")
    lineage = _lineage(info)
    if lineage:
        console.print(f"  {_shown(lineage)}")
    if info.message:
        console.print(f"  {_shown(info.message)}")
    batches = ", ".join(f"{n:,} {s}" for s, n in sorted(info.batches_by_status.items()))
    # A run that recorded no batch (stopped while planning, nothing to send) says so, not "batches: ".
    console.print(f"  batches: {batches or 'none recorded'}")
    endpoints = summary.get("endpoints", [])
    if endpoints:
        table = Table(header_style="bold")
        for name in (
            "endpoint",
            "requests",
            "IDs ok",
            "refused",
            "failed",
            "429s",
            "retries",
            "rate/s",
            "budget",
        ):
            table.add_column(name, justify="left" if name in ("endpoint", "budget") else "right")
        table.add_column("p50 ms", justify="right")
        table.add_column("p95 ms", justify="right")
        for e in endpoints:
            ids = e.get("ids", {})
            lat = e.get("latency_ms", {})
            table.add_row(
                _shown(e["endpoint"]),
                f"{e.get('requests', 0):,}",
                f"{ids.get('ok', 0):,}",
                f"{ids.get('rejected', 0):,}",
                f"{ids.get('failed', 0):,}",
                f"{e.get('rate_limited', 0):,}",
                f"{e.get('retries', 0):,}",
                _fmt(e.get("achieved_rate")),
                _shown(e.get("budget") or "-"),
                _fmt(lat.get("p50")),
                _fmt(lat.get("p95")),
            )
        console.print(table)
    if unfinished:
        table = Table(title=f"{len(unfinished):,} batches not ok (first 20)", header_style="bold")
        for name in ("batch", "endpoint", "status", "IDs", "message"):
            table.add_column(name, justify="right" if name == "IDs" else "left")
        for b in unfinished[:20]:
            table.add_row(
                _shown(b.batch_id),
                _shown(b.endpoint),
                str(b.status),
                str(b.n_ids),
                _shown(b.message or "no answer"),
            )
        console.print(table)
    if refused:
        table = Table(title=f"{len(refused):,} IDs refused by the platform (first 20)", header_style="bold")
        for name in ("external ID", "code", "message", "batch"):
            table.add_column(name)
        for batch_id, ext_id, code, message in refused[:20]:
            table.add_row(_shown(ext_id), _shown(code or "-"), _shown(message), _shown(batch_id))
        console.print(table)
    if rejected:
        table = Table(title=f"{len(rejected):,} input rows rejected (first 20)", header_style="bold")
        for name in ("file", "row", "column", "reason", "external ID"):
            table.add_column(name)
        for r in rejected[:20]:
            table.add_row(
                _shown(r.path), str(r.row), _shown(r.column or "-"), _shown(r.reason), _shown(r.ext_id or "-")
            )
        console.print(table)
    console.print(f"  the full report: pushsync report {_shown(info.run_id)} -o report.html")


def _shown(text: str) -> str:
    """``text`` for a rich table: its control characters escaped (:func:`sync.errors.printable`) and its markup
    taken literally. A platform's answer (a refusal, an error page through a proxy) may hold an ESC or a NUL:
    written raw, it rewrote the operator's terminal (``ESC[2J`` cleared it)."""
    from rich.markup import escape

    return escape(printable(text))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"
