"""Finding a job's ledgers and a run in them, for the commands that look at past runs (``runs``, ``show``,
``report``, ``trace``, ``resume``/``retry``). Its own module so those command modules need not import each other."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sync.errors import BadInputError, StateError, printable

__all__ = [
    "DIED",
    "add_database_url",
    "database_url",
    "find_run",
    "ledger_paths",
    "local_copy",
    "name_the_dead",
    "not_the_ledger",
    "runs_of",
]


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


DIED = "died"
"""The status ``runs`` and ``show`` give a run recorded ``running`` that no process runs any more."""
DIED_MESSAGE = (
    "no process holds the job's lock: the run ended without recording its end (killed?); "
    "the next run of the job records it interrupted and sends what it left"
)


def runs_of(path: Path) -> list[Any]:
    """The runs of the SQLite ledger at ``path`` (:class:`sync.ledger.ledger.RunInfo`, newest first), a dead one
    named so (:func:`name_the_dead`)."""
    from sync.ledger.ledger import Ledger
    from sync.state import job_lock_held

    held = job_lock_held(path.parent)
    with Ledger.open(path, read_only=True) as ledger:
        infos = ledger.runs()
    return name_the_dead(path, infos, held)


def name_the_dead(path: Path, infos: list[Any], held_before: bool | None) -> list[Any]:
    """``infos`` read from the ledger at ``path``, a run recorded ``running`` given the status :data:`DIED` when no
    process holds its job's lock (:func:`sync.state.job_lock_held`) — a run killed (SIGKILL, the OOM killer, a
    power loss) records no end, and was listed ``running`` until the job's next run. ``held_before``: the lock
    as seen before the ledger was read; it is looked at again after, and a run is called dead only when both
    saw it free: a run that started between the two holds it at the second, one that ended between held it at
    the first. Unknown (not Linux): left as recorded."""
    if held_before is not False or not any(r.status == "running" for r in infos):
        return infos
    from sync.state import job_lock_held

    if job_lock_held(path.parent) is not False:
        return infos
    return [
        dataclasses.replace(r, status=DIED, message=DIED_MESSAGE) if r.status == "running" else r
        for r in infos
    ]


def find_run(run_id: str, paths: list[Path], *, named: bool = False) -> tuple[Path, str]:
    """(ledger, run ID) of ``run_id`` among the ledgers ``paths``; ``latest`` is the most recently started run.
    ``named``: the user named the ledger (``--job``, ``--workdir``, ``--ledger``): a miss then says which ledger was
    read, or that there is none yet, rather than asking for the option given."""
    from sync.ledger.ledger import Ledger

    best: tuple[float, Path, str] | None = None
    for path in paths:
        if not path.exists():
            continue
        with Ledger.open(path, read_only=True) as ledger:
            if run_id == "latest":
                runs = ledger.runs()
                if runs and (best is None or runs[0].started_at > best[0]):
                    best = (runs[0].started_at, path, runs[0].run_id)
            elif ledger.run(run_id) is not None:
                return path, run_id
    if best is not None:
        return best[1], best[2]
    what = "no run recorded" if run_id == "latest" else f"no run {run_id} found"
    if not named:
        raise StateError(f"{what} (give --job JOB or --workdir DIR)")
    # "(give --job ...)" to a user who gave it sent them looking at the option; say what was (not) read instead.
    where = ", ".join(printable(str(p)) for p in paths)
    if not any(path.exists() for path in paths):
        raise StateError(f"{what}: no ledger at {where} (the job has not run with this workdir yet)")
    raise StateError(f"{what} in {where}")


def not_the_ledger(out: Path, ledger: Path) -> None:
    """Refuse an output path (``-o``) that is the ledger the command reads, or its write-ahead log or shared
    memory: the page or the export was renamed over it, and the job's record of every run was gone (a read
    command had destroyed it; `runs` then said "file is not a database")."""
    from sync._output import output_file

    target = output_file(out).resolve()
    for name in (ledger.name, f"{ledger.name}-wal", f"{ledger.name}-shm", f"{ledger.name}-journal"):
        if target == (ledger.parent / name).resolve():
            raise BadInputError(str(out), "is the ledger this command reads (or its log): name another file")


def add_database_url(parser: Any) -> None:
    """``--database-url URL``: the coordination database (docs/scaling.md)."""
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="a PostgreSQL coordination database: several workers, one run (default: $PUSHSYNC_DATABASE_URL, "
        "or the job's coordination.database; prefer those: a command line is visible to other users)",
    )


def database_url(args: Any, job: Any = None) -> str | None:
    """The coordination database URL for these arguments (None: the SQLite ledgers). ``job``: a loaded job or a
    job file path, whose ``coordination.database`` counts when no flag is given."""
    from sync.coordination import resolve_database_url

    if isinstance(job, Path):
        from sync.config import load_job

        job = load_job(job)
    return resolve_database_url(job, getattr(args, "database_url", None))


@contextmanager
def local_copy(url: str, run_id: str) -> Iterator[tuple[Path, str]]:
    """(a temporary SQLite ledger holding ``run_id`` — ``latest``: the newest run — and its job's other runs,
    run ID) copied from the coordination database, for the tools that read SQLite (report, ledger-export)."""
    from sync.coordination import open_ledger

    with open_ledger(url) as ledger, tempfile.TemporaryDirectory(prefix="pushsync-ledger-") as tmp:
        if run_id == "latest":
            runs = ledger.runs()
            if not runs:
                raise StateError(f"no run recorded in {ledger.path}")
            run_id = runs[0].run_id
        info = ledger.run(run_id)
        if info is None:
            raise StateError(f"no run {run_id} in {ledger.path}")
        path = ledger.copy_to_sqlite(Path(tmp) / "ledger.sqlite", job=info.job)
        yield path, run_id
