"""Finding a job's ledgers and a run in them, for the commands that look at past runs (``runs``, ``show``,
``report``, ``trace``, ``resume``/``retry``). Its own module so those command modules need not import each other."""

from __future__ import annotations

from pathlib import Path

from sync.errors import StateError

__all__ = ["find_run", "ledger_paths"]


def ledger_paths(job: Path | None, workdir: Path | None, ledger: Path | None = None) -> list[Path]:
    """The ledgers to look in: the one named, the job's, or — with neither — every job workdir under the current
    directory (``.pushsync/*`` here, and beside job files one folder down, e.g. ``jobs/.pushsync/*``: the
    default workdir sits next to its job file)."""
    from sync.run import LEDGER_FILE, ledger_path_for

    if ledger is not None:
        return [ledger]
    if workdir is not None:
        return [workdir / LEDGER_FILE]
    if job is not None:
        from sync.config import load_job

        return [ledger_path_for(load_job(job))]
    cwd = Path.cwd()
    found = {*cwd.glob(f".pushsync/*/{LEDGER_FILE}"), *cwd.glob(f"*/.pushsync/*/{LEDGER_FILE}")}
    return sorted(found)


def find_run(run_id: str, paths: list[Path]) -> tuple[Path, str]:
    """(ledger, run ID) of ``run_id`` among the ledgers ``paths``; ``latest`` is the most recently started run."""
    from sync.ledger import Ledger

    best: tuple[float, Path, str] | None = None
    for path in paths:
        if not path.exists():
            continue
        with Ledger.open(path) as ledger:
            if run_id == "latest":
                runs = ledger.runs()
                if runs and (best is None or runs[0].started_at > best[0]):
                    best = (runs[0].started_at, path, runs[0].run_id)
            elif ledger.run(run_id) is not None:
                return path, run_id
    if best is not None:
        return best[1], best[2]
    what = "no run recorded" if run_id == "latest" else f"no run {run_id} found"
    raise StateError(f"{what} (give --job JOB or --workdir DIR)")
