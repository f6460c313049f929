"""``pushsync run | runs | show | ledger-export | demo``: send a job, and look at what runs did.

Exit codes (documented for schedulers in docs/run.md): 0 all went through · 1 done, some rows rejected or
failed · 2 bad job or input (nothing sent) · 3 aborted (401/403...) · 4 interrupted (SIGINT/SIGTERM, drained).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sync.errors import ExitCode
from sync.records import BatchStatus

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``run``, ``runs``, ``show``, ``ledger-export`` and ``demo``."""
    run = subparsers.add_parser("run", help="send a job's changes to its platform and record every outcome")
    run.add_argument("job", type=Path, help="the job file (YAML)")
    run.add_argument("--output", choices=["text", "json"], default="text", help="summary format on stdout")
    run.add_argument("--workdir", type=Path, help="where the ledger and rejects live (default: the job's)")
    run.add_argument(
        "--progress",
        choices=["auto", "bar", "log", "none"],
        default="auto",
        help="a bar on a terminal, log lines otherwise (auto)",
    )
    run.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="serve Prometheus /metrics while the run lasts"
    )
    run.add_argument(
        "--metrics-textfile",
        type=Path,
        metavar="PATH",
        help="write Prometheus metrics for node_exporter (*.prom)",
    )
    run.add_argument(
        "--metrics-pushgateway",
        metavar="URL",
        help="push Prometheus metrics to this Pushgateway during and after the run (short-lived pods, cron)",
    )
    run.add_argument(
        "--full-refresh",
        action="store_true",
        help="send everything: ignore the snapshot state, and do not resume an unfinished run (docs/sync.md)",
    )
    run.add_argument(
        "--force", action="store_true", help="snapshot mode: remove users past the removal threshold"
    )
    from sync.cli.plan_cmd import add_source_selection, positive_int

    add_source_selection(run)
    run.add_argument(
        "--limit",
        type=positive_int,
        metavar="N",
        help="a sample run: of each source only the first N rows that pass validation (changes mode)",
    )
    from sync.cli._ledgers import add_database_url

    add_database_url(run)
    run.add_argument(
        "--run-id",
        metavar="ID",
        help="the run's ID (default: a new one); with a coordination database, every worker naming the same ID "
        "joins that run, and one started after it ended reports it instead of starting over (docs/scaling.md)",
    )
    run.set_defaults(func=_run)

    runs = subparsers.add_parser("runs", help="list the runs recorded in a job's ledger")
    runs.add_argument(
        "job", type=Path, nargs="?", help="the job file (default: every ledger under .pushsync/)"
    )
    runs.add_argument("--workdir", type=Path, help="a job's workdir (holds ledger.sqlite)")
    runs.add_argument("--output", choices=["text", "json"], default="text")
    add_database_url(runs)
    runs.set_defaults(func=_runs)

    show = subparsers.add_parser("show", help="show one run: summary, batches by status, refused IDs")
    show.add_argument("run_id", metavar="RUN", help="a run ID, or 'latest'")
    show.add_argument("--job", type=Path, help="the job file whose ledger holds the run")
    show.add_argument("--workdir", type=Path, help="a job's workdir (holds ledger.sqlite)")
    show.add_argument("--output", choices=["text", "json"], default="text")
    add_database_url(show)
    show.set_defaults(func=_show)

    export = subparsers.add_parser(
        "ledger-export", help="export a run's batches or rejects to Parquet or CSV"
    )
    export.add_argument("run_id", metavar="RUN", help="a run ID, or 'latest'")
    export.add_argument(
        "--table", choices=["batches", "attempts", "refused-ids", "rejected-rows"], default="batches"
    )
    export.add_argument(
        "--format", choices=["parquet", "csv"], help="default: from the file name (.csv → csv, else parquet)"
    )
    export.add_argument("-o", "--out", type=Path, required=True, help="the file to write")
    export.add_argument("--job", type=Path, help="the job file whose ledger holds the run")
    export.add_argument("--workdir", type=Path, help="a job's workdir (holds ledger.sqlite)")
    add_database_url(export)
    export.set_defaults(func=_export)

    demo = subparsers.add_parser(
        "demo", help="generate sample data, run jobs/demo.yaml against a local sandbox"
    )
    demo.add_argument("--users", type=int, default=10000, help="sample users to generate (default 10000)")
    demo.add_argument("--output", choices=["text", "json"], default="text")
    demo.set_defaults(func=_demo)


def _run(args: argparse.Namespace) -> int:
    from sync._startup import mark_startup
    from sync.cli._ledgers import database_url
    from sync.cli.plan_cmd import selected_job
    from sync.config import resolve_secret
    from sync.run import RunOptions, run

    mark_startup("run_imported")
    job = selected_job(args)
    mark_startup("job_loaded")
    url = database_url(args, job)
    if args.run_id is not None and url is None:
        from sync.errors import StateError

        raise StateError("--run-id names a run that several workers share: it needs a coordination database")
    api_key = resolve_secret(job.destination)
    alert_url = None
    if job.alerts is not None:
        # Resolved before anything is sent: a job that asks for alerts and cannot post them is misconfigured.
        # Imported only then: the alerts module (urllib.request, the summary) is not on a plain run's start-up.
        from sync.report.alerts import resolve_webhook

        alert_url = resolve_webhook(job.alerts)
    # Snapshot jobs send only the diff from the confirmed state; a changes job whose last run did not finish
    # resumes it (docs/sync.md).
    options = RunOptions(
        api_key=api_key,
        workdir=args.workdir,
        full_refresh=args.full_refresh,
        force=args.force,
        limit=args.limit,
        selection=" ".join(
            f"{option} {','.join(value)}"
            for option, value in (("--select", args.select), ("--exclude", args.exclude))
            if value
        )
        or None,
        handle_signals=True,
        progress=args.progress,
        metrics_port=args.metrics_port,
        metrics_textfile=args.metrics_textfile,
        metrics_pushgateway=args.metrics_pushgateway,
        alert_url=alert_url,
        database_url=url,
        run_id=args.run_id,
    )
    outcome = asyncio.run(run(job, options))
    text = json.dumps(outcome.to_json(), indent=2) if args.output == "json" else outcome.render_text()
    try:
        print(text, flush=True)
    except (
        BrokenPipeError
    ):  # nobody reads the summary any more; the run's exit code still tells what happened
        from sync.cli import _silence_stdout

        _silence_stdout()
    return int(outcome.exit_code)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _runs(args: argparse.Namespace) -> int:
    infos = []
    from sync.cli._ledgers import database_url, ledger_paths, runs_of

    url = database_url(args, args.job)
    if url is not None:
        from sync.config import load_job
        from sync.coordination import open_ledger

        with open_ledger(url) as pg:
            infos.extend(pg.runs(load_job(args.job).name if args.job is not None else None))
    for path in ledger_paths(args.job, args.workdir) if url is None else []:
        if path.exists():
            infos.extend(runs_of(path))
    infos.sort(key=lambda r: r.started_at, reverse=True)
    if args.output == "json":
        print(json.dumps([_run_json(r) for r in infos], indent=2))
        return int(ExitCode.OK)
    if not infos:
        print("no runs recorded")
        return int(ExitCode.OK)
    from sync.cli.report_cmd import print_runs  # the rich tables live beside `pushsync report`

    print_runs(infos)
    return int(ExitCode.OK)


def _run_json(r: Any) -> dict[str, Any]:
    return {
        "run_id": r.run_id,
        "job": r.job,
        "platform": r.platform,
        "started_at": _when(r.started_at),
        "finished_at": _when(r.finished_at) if r.finished_at else None,
        "status": r.status,
        "exit_code": r.exit_code,
        "message": r.message,
        "seconds": None if r.finished_at is None else round(r.finished_at - r.started_at, 3),
        "batches": r.batches_by_status,
        # The figures the table shows (requests, IDs ok, refused, failed, rows rejected...): the run summary's
        # totals, None for a run that recorded none (running, died, or an older pushsync's).
        "totals": (r.summary or {}).get("totals"),
        "origin": r.origin,
        "origin_mode": r.origin_mode,
        "destination": r.destination,
        "full_refresh": r.full_refresh,
    }


def _find_run(args: argparse.Namespace) -> tuple[Path, str]:
    from sync.cli._ledgers import find_run, ledger_paths

    named = args.job is not None or args.workdir is not None
    return find_run(args.run_id, ledger_paths(args.job, args.workdir), named=named)


def _show(args: argparse.Namespace) -> int:
    from sync.cli._ledgers import database_url
    from sync.ledger.ledger import Ledger

    url = database_url(args, args.job)
    if url is not None:
        from sync.coordination import open_ledger

        opened: Any = open_ledger(url)
        run_id = args.run_id
        if run_id == "latest":
            runs = opened.runs()
            if not runs:
                from sync.errors import StateError

                opened.close()
                raise StateError(f"no run recorded in {opened.path}")
            run_id = runs[0].run_id
        held = None  # the coordinated runs' workers are elsewhere: told by the queue (docs/scaling.md)
    else:
        from sync.state import job_lock_held

        path, run_id = _find_run(args)
        held = job_lock_held(path.parent)
        opened = Ledger.open(path, read_only=True)
    with opened as ledger:
        info = ledger.run(run_id)
        if info is None:
            from sync.errors import StateError

            raise StateError(f"no run {run_id} found in {ledger.path}")
        assert info is not None
        if url is None:
            from sync.cli._ledgers import name_the_dead

            (info,) = name_the_dead(path, [info], held)
        refused = ledger.refused_ids(run_id)
        rejected = ledger.rejected_rows(run_id)
        unfinished = [
            b
            for b in ledger.batches(run_id)
            if b.status in (BatchStatus.FAILED, BatchStatus.SENT, BatchStatus.PLANNED)
        ]
    if args.output == "json":
        doc = _run_json(info)
        doc["summary"] = info.summary
        doc["refused_ids"] = [{"batch_id": b, "ext_id": x, "code": c, "message": m} for b, x, c, m in refused]
        doc["rejected_rows"] = [
            {"file": r.path, "row": r.row, "column": r.column, "reason": r.reason, "ext_id": r.ext_id}
            for r in rejected
        ]
        print(json.dumps(doc, indent=2))
        return int(ExitCode.OK)
    from sync.cli.report_cmd import print_show

    print_show(info, unfinished, refused, rejected)
    return int(ExitCode.OK)


def _export(args: argparse.Namespace) -> int:
    from sync.cli._ledgers import database_url, local_copy, not_the_ledger
    from sync.ledger.exporting import format_for
    from sync.ledger.ledger import Ledger

    # As `pushsync export` does: `-o refused.csv` without --format wrote Parquet bytes into refused.csv.
    fmt: Any = format_for(args.out, args.format).value  # "parquet" or "csv", as Ledger.export takes it
    url = database_url(args, args.job)
    if url is not None:
        with local_copy(url, args.run_id) as (path, run_id), Ledger.open(path) as ledger:
            rows = ledger.export(run_id, args.out, table=args.table, fmt=fmt)
        print(f"wrote {rows} rows to {args.out}")
        return int(ExitCode.OK)
    path, run_id = _find_run(args)
    not_the_ledger(args.out, path)
    with Ledger.open(path, read_only=True) as ledger:
        rows = ledger.export(run_id, args.out, table=args.table, fmt=fmt)
    print(f"wrote {rows} rows to {args.out}")
    return int(ExitCode.OK)


def _demo(args: argparse.Namespace) -> int:
    from sync.demo import run_demo

    return run_demo(users=args.users, output=args.output)
