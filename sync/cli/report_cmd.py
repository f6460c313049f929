"""``pushsync report RUN -o report.html``: the run report, one self-contained HTML file (see docs/operations.md).

``RUN`` is a run ID or ``latest``. The ledger is found from ``--ledger PATH``, ``--job JOB`` (its workdir's
ledger) or ``--workdir DIR``; with none of them, every ``.pushsync/*/ledger.sqlite`` under the current directory
is searched.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sync.errors import ExitCode, StateError

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
    report.set_defaults(func=_report)


def _candidates(args: argparse.Namespace) -> list[Path]:
    from sync.runner import LEDGER_FILE, ledger_path_for

    if args.ledger is not None:
        return [args.ledger]
    if args.workdir is not None:
        return [args.workdir / LEDGER_FILE]
    if args.job is not None:
        from sync.config import load_job

        return [ledger_path_for(load_job(args.job))]
    return sorted(Path.cwd().glob(f".pushsync/*/{LEDGER_FILE}"))


def _locate(args: argparse.Namespace) -> tuple[Path, str]:
    """(ledger, run ID) for the arguments; ``latest`` is the most recently started run in those ledgers."""
    from sync.ledger import Ledger

    best: tuple[float, Path, str] | None = None
    for path in _candidates(args):
        if not path.exists():
            continue
        with Ledger.open(path) as ledger:
            if args.run_id == "latest":
                runs = ledger.runs()
                if runs and (best is None or runs[0].started_at > best[0]):
                    best = (runs[0].started_at, path, runs[0].run_id)
            elif ledger.run(args.run_id) is not None:
                return path, args.run_id
    if best is not None:
        return best[1], best[2]
    what = "no run recorded" if args.run_id == "latest" else f"no run {args.run_id} found"
    raise StateError(f"{what} (give --job JOB, --workdir DIR or --ledger PATH)")


def _report(args: argparse.Namespace) -> int:
    from sync.report import write_report

    ledger, run_id = _locate(args)
    out = write_report(ledger, run_id, args.out)
    if args.output == "json":
        print(json.dumps({"run_id": run_id, "ledger": str(ledger), "report": str(out.resolve())}))
    else:
        print(f"wrote the report of run {run_id} to {out}")
    return int(ExitCode.OK)
