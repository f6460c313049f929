"""``pushsync trace ID``: what happened to one external ID across runs (see :mod:`sync.ledger.trace`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sync.errors import ExitCode, printable

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``trace``."""
    trace = subparsers.add_parser(
        "trace", help="what happened to one external ID across runs: batches, answers, refusals, its rows"
    )
    trace.add_argument("ext_id", metavar="ID", help="the external ID, exactly as in the input")
    trace.add_argument("--job", type=Path, help="the job file whose ledger to read")
    trace.add_argument("--workdir", type=Path, help="a job's workdir (holds ledger.sqlite)")
    trace.add_argument("--output", choices=["text", "json"], default="text")
    from sync.cli._ledgers import add_database_url

    add_database_url(trace)
    trace.set_defaults(func=_trace)


def _trace(args: argparse.Namespace) -> int:
    from sync.cli._ledgers import database_url, ledger_paths
    from sync.ledger.trace import trace_id

    entries = []
    # Validation trims IDs unless the job says trim: false, so an ID copied from the input with spaces around it
    # (as the help asks) is in the ledger without them: both forms are looked for.
    trimmed = args.ext_id.strip()
    wanted = [args.ext_id, *([trimmed] if trimmed and trimmed != args.ext_id else [])]
    url = database_url(args, args.job)
    if url is not None:
        import tempfile

        from sync.config import load_job
        from sync.coordination import open_ledger

        # The trace reads SQLite: a temporary copy of the job's runs (every run without --job).
        with open_ledger(url) as pg, tempfile.TemporaryDirectory(prefix="pushsync-trace-") as tmp:
            job_name = load_job(args.job).name if args.job is not None else None
            copy = pg.copy_to_sqlite(Path(tmp) / "ledger.sqlite", job=job_name)
            for ext_id in wanted:
                entries.extend(trace_id(copy, ext_id))
    searched = ledger_paths(args.job, args.workdir) if url is None else []
    for path in searched:
        if path.exists():
            for ext_id in wanted:
                entries.extend(trace_id(path, ext_id))
    entries.sort(key=lambda e: -e.run_started_at)
    if args.output == "json":
        print(json.dumps([asdict(e) for e in entries], indent=2))
        return int(ExitCode.OK)
    if not entries:
        also = f" or {trimmed!r}" if len(wanted) > 1 else ""
        # Say where was looked: "give --job" to a user who gave it, or "no record" where the job has no ledger
        # yet (never run, or another workdir), sent them looking for a fault in the ID.
        if url is not None:
            where = "in the coordination database"
        elif args.job is None and args.workdir is None:
            where = "in the ledgers under the current directory (give --job JOB or --workdir DIR)"
        elif not any(path.exists() for path in searched):
            where = f"— no ledger at {printable(str(searched[0]))}: the job has not run there yet"
        else:
            where = f"in {printable(str(searched[0]))}"
        print(f"no record of ID {args.ext_id!r}{also} {where}")
        return int(ExitCode.OK)
    import sys

    from rich.console import Console
    from rich.markup import escape as markup

    def escape(text: str) -> str:
        # Control characters escaped: a platform's answer may hold an ESC, which would rewrite the terminal.
        return markup(printable(text))

    from rich.table import Table

    found = sorted({e.ext_id for e in entries if e.ext_id is not None})
    title = ", ".join(repr(x) if x != x.strip() else x for x in found)
    if found != [args.ext_id]:
        title += f" (asked: {args.ext_id!r})"
    table = Table(title=f"ID {escape(title)}", header_style="bold")
    for name in ("run", "started (UTC)", "what", "endpoint", "status", "detail", "row"):
        table.add_column(name)
    for e in entries:
        when = datetime.fromtimestamp(e.run_started_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        row = f"{e.path}:{e.row}" if e.path and e.row is not None else "-"
        table.add_row(
            escape(e.run_id), when, e.kind, escape(e.endpoint or "-"), e.status, escape(e.detail), escape(row)
        )
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200, highlight=False).print(table)
    return int(ExitCode.OK)
