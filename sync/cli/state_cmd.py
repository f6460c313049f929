"""``pushsync resume RUN``, ``pushsync retry RUN [--full-refresh]``, ``pushsync state show|import JOB``.

* ``resume RUN``: finish a run that died (kill -9, machine lost) or was interrupted. Changes mode: plan again
  and send only the batches the ledger has not confirmed (non-idempotent batches whose outcome is unknown are
  held). Snapshot mode: merge what the ledger confirmed into the state, then send the rest of the diff.
* ``retry RUN``: after fixing the cause, replay the failed batches and the refused rows of a run (and the held
  ones). ``--full-refresh`` sends everything again, ignoring ledger and state.
* ``state show JOB``: the confirmed state of a snapshot job: users, fields held, tags, pending runs (from the
  coordination database when one is given: ``--database-url`` or ``PUSHSYNC_DATABASE_URL``).
* ``state import JOB``: copy the workdir's state into the coordination database (a snapshot job moving from one
  process onto several workers keeps what it confirmed).

Exit codes as for ``pushsync run`` (docs/run.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

from sync.errors import ExitCode, StateError, printable

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``resume``, ``retry`` and ``state``."""
    for name, help_text in (
        ("resume", "finish a run that died or was interrupted: send only what the ledger has not confirmed"),
        ("retry", "replay the failed batches and refused rows of a run (after fixing the cause)"),
    ):
        cmd = subparsers.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("run_id", metavar="RUN", help="a run ID, or 'latest'")
        cmd.add_argument("--job", type=Path, help="the job file (default: the one recorded with the run)")
        cmd.add_argument("--workdir", type=Path, help="a job's workdir (holds ledger.sqlite)")
        cmd.add_argument("--output", choices=["text", "json"], default="text")
        cmd.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto")
        from sync.cli._ledgers import add_database_url

        add_database_url(cmd)
        if name == "retry":
            cmd.add_argument(
                "--full-refresh",
                action="store_true",
                help="send everything again: ignore the ledger (changes mode) or the state (snapshot mode)",
            )
        cmd.add_argument(
            "--force", action="store_true", help="snapshot mode: remove users past the removal threshold"
        )
        cmd.set_defaults(func=_replay, replay=name)

    state = subparsers.add_parser("state", help="inspect the confirmed state of a snapshot job")
    state_sub = state.add_subparsers(dest="state_command", metavar="SUBCOMMAND", required=True)
    show = state_sub.add_parser("show", help="users, fields and tags held in the state; pending runs")
    show.add_argument("job", type=Path, help="the job file (YAML)")
    show.add_argument("--workdir", type=Path, help="override the job's workdir")
    show.add_argument("--output", choices=["text", "json"], default="text")
    from sync.cli._ledgers import add_database_url

    add_database_url(show)
    show.set_defaults(func=_show)
    imp = state_sub.add_parser(
        "import",
        help="copy the workdir's state into the coordination database (a job moving onto several workers)",
    )
    imp.add_argument("job", type=Path, help="the job file (YAML)")
    imp.add_argument("--workdir", type=Path, help="override the job's workdir")
    add_database_url(imp)
    imp.set_defaults(func=_import)
    rekey = state_sub.add_parser(
        "rekey",
        help="after a key rotation: make the state of the old key's account the new key's (nothing is sent)",
    )
    rekey.add_argument("job", type=Path, help="the job file (YAML); its secret must name the new key")
    rekey.add_argument(
        "--from",
        dest="from_key",
        metavar="DESTINATION",
        help="the old account's destination (as `state rekey` lists them) when the base URL has several",
    )
    rekey.add_argument("--workdir", type=Path, help="override the job's workdir")
    add_database_url(rekey)
    rekey.set_defaults(func=_rekey)


def _ledger_candidates(args: argparse.Namespace) -> list[Path]:
    from sync.cli._ledgers import ledger_paths

    return ledger_paths(None, args.workdir)


def _job_of_run(args: argparse.Namespace) -> Path:
    """The job file recorded with the run (read-only look into the ledger's runs table)."""
    from sync.cli._ledgers import database_url

    url = database_url(args)
    if url is not None:
        from sync.coordination import open_ledger

        with open_ledger(url) as pg:
            row = pg._execute(
                "SELECT job_path FROM pushsync.runs WHERE run_id = %s", (args.run_id,)
            ).fetchone()
        if row and row[0]:
            return Path(row[0])
        raise StateError(f"no run {args.run_id} found in the coordination database: give --job JOB")
    from sync.ledger.ledger import connect_read_only

    for path in _ledger_candidates(args):
        try:
            conn = connect_read_only(path)  # a ledger in a read-only folder too
        except StateError:
            continue
        try:
            row = conn.execute("SELECT job_path FROM runs WHERE run_id = ?", (args.run_id,)).fetchone()
        except sqlite3.DatabaseError:
            row = None
        finally:
            conn.close()
        if row and row[0]:
            return Path(row[0])
    raise StateError(
        f"no run {args.run_id} found: give --job JOB (and --workdir DIR if the job's is not used)"
    )


def _replay(args: argparse.Namespace) -> int:
    from sync.cli._ledgers import database_url
    from sync.config import load_job, resolve_secret
    from sync.run import RunOptions, run

    if args.run_id == "latest" and args.job is None:
        # The coordination database's newest run when one is named (as `show latest` takes it), else the workdirs'.
        args.run_id = _latest_run(args, None, database_url(args))
    job = load_job(args.job if args.job is not None else _job_of_run(args))
    url = database_url(args, job)
    if args.run_id == "latest":
        args.run_id = _latest_run(args, job, url)
    retry = args.replay == "retry"
    if not retry:
        done = _nothing_to_resume(job, args, url)
        if done is not None:
            print(done)
            return int(ExitCode.OK)
    from sync.report.alerts import resolve_webhook

    options = RunOptions(
        api_key=resolve_secret(job.destination),
        workdir=args.workdir,
        resume=None if retry else args.run_id,
        retry=args.run_id if retry else None,
        full_refresh=bool(getattr(args, "full_refresh", False)),
        force=args.force,
        handle_signals=True,
        progress=args.progress,
        # A resumed or retried run alerts like any other (resolved before anything is sent, as for `run`).
        alert_url=resolve_webhook(job.alerts) if job.alerts is not None else None,
        database_url=url,
    )
    outcome = asyncio.run(run(job, options))
    if args.output == "json":
        print(json.dumps(outcome.to_json(), indent=2))
    else:
        print(outcome.render_text())
    return int(outcome.exit_code)


def _latest_run(args: argparse.Namespace, job: Any, url: str | None) -> str:
    """``latest`` (as ``show``, ``report`` and ``ledger-export`` take it): the most recently started run of the
    job's ledger (the coordination database's, with one; of every job without ``--job``), or — without ``--job``
    and a database — of the workdirs searched."""
    from sync.cli._ledgers import find_run, ledger_paths

    if url is not None:
        from sync.coordination import open_ledger

        with open_ledger(url) as pg:
            runs = pg.runs(job.name if job is not None else None)
        if not runs:
            of = f" of job {job.name!r}" if job is not None else ""
            raise StateError(f"no run{of} recorded in the coordination database")
        return str(runs[0].run_id)
    named = args.job is not None or args.workdir is not None
    return find_run("latest", ledger_paths(args.job, args.workdir), named=named)[1]


def _nothing_to_resume(job: Any, args: argparse.Namespace, url: str | None = None) -> str | None:
    """Why resuming the run would send nothing (it finished, and no batch of it is left unconfirmed), or None.

    Without this, ``resume`` of a completed run recorded a new, empty run. Only ``done`` and ``partial`` runs
    qualify; a ``partial`` run whose failed batches are unconfirmed is still worth resuming."""
    import dataclasses

    from sync.config import same_destination
    from sync.ledger.ledger import Ledger
    from sync.planning.resume import UNFINISHED_STATUSES, replay_plan
    from sync.run import ledger_path_for

    if args.workdir is not None:
        job = dataclasses.replace(job, workdir=args.workdir)
    path = ledger_path_for(job)
    if url is None and not path.exists():
        return None  # run() names the missing run
    if url is not None:
        from sync.coordination import open_ledger

        opened: Any = open_ledger(url)
    else:
        opened = Ledger.open(path)
    with opened as ledger:
        info = ledger.run(args.run_id)
        if info is None or info.status in UNFINISHED_STATUSES:
            return None
        if not same_destination(info.destination, job.destination.for_readable_account().key):
            return None  # another destination's run: run() refuses it, in one line
        decisions = replay_plan(ledger, args.run_id)
        if decisions.unknown:
            return None
    refused = (
        f"; {len(decisions.refused)} refused batch(es) need a fix and `pushsync retry {args.run_id}`"
        if decisions.refused
        else ""
    )
    return f"run {args.run_id} finished ({info.status}): nothing to resume{refused}"


def _show(args: argparse.Namespace) -> int:
    import dataclasses

    from sync.cli._ledgers import database_url
    from sync.config import load_job
    from sync.state import StateStore

    job = load_job(args.job)
    if args.workdir is not None:
        job = dataclasses.replace(job, workdir=args.workdir)
    # The state is per account: the one the job's secret names, when it can be read (Destination.key).
    job = dataclasses.replace(job, destination=job.destination.for_readable_account())
    url = database_url(args, job)
    if url is None:
        store = StateStore(job.workdir, job.destination)
        return _print_state(args, job, store, str(store.directory), [p.name for p in store.pending()])
    # A coordinated job's state is in the coordination database (sync.coordination.snapshot).
    from sync.coordination._db import describe_url
    from sync.coordination.ledger import PgLedger
    from sync.coordination.snapshot import account_job, pending_runs, pg_state_store, state_scope

    with PgLedger.open(url) as ledger:  # checks (or creates) the schema, as every command does
        conn = ledger._conn
        store = pg_state_store(job, conn, url)
        job = account_job(job, conn)
        where = f"coordination database {describe_url(url)}, job state {state_scope(job)}"
        return _print_state(args, job, store, where, pending_runs(conn, state_scope(job)))


def _import(args: argparse.Namespace) -> int:
    import dataclasses

    from sync.cli._ledgers import database_url
    from sync.config import load_job

    job = load_job(args.job)
    if args.workdir is not None:
        job = dataclasses.replace(job, workdir=args.workdir)
    job = dataclasses.replace(job, destination=job.destination.for_readable_account())
    url = database_url(args, job)
    if url is None:
        raise StateError(
            "state import copies the workdir's state into a coordination database: give --database-url or set "
            "PUSHSYNC_DATABASE_URL (docs/scaling.md)"
        )
    from sync.coordination._db import describe_url
    from sync.coordination.ledger import PgLedger
    from sync.coordination.snapshot import import_workdir_state

    with PgLedger.open(url) as ledger:
        copied = import_workdir_state(job, ledger._conn, url)
    for name, users in copied.items():
        print(f"source {name}: {users} users copied into {describe_url(url)}")
    return int(ExitCode.OK)


def _rekey(args: argparse.Namespace) -> int:
    """``pushsync state rekey JOB``: the job's key was rotated (the same app, a new key): the state kept for the
    old key's account becomes the new key's, so the next snapshot run sends only what changed (a new account
    starts empty: every user sent again, ``push`` attributes appended twice). Refused when the new key's account
    has a state already, or when there is no other account's state (or several, without ``--from``)."""
    import dataclasses

    from sync.cli._ledgers import database_url
    from sync.config import load_job, resolve_secret

    job = load_job(args.job)
    if args.workdir is not None:
        job = dataclasses.replace(job, workdir=args.workdir)
    job = dataclasses.replace(job, destination=job.destination.for_account(resolve_secret(job.destination)))
    here = job.destination.key
    url = database_url(args, job)
    if url is None:
        from sync.state import StateStore
        from sync.state._store import other_accounts

        others = other_accounts(job.workdir, job.destination)
        old = _rekey_source(job, others, args.from_key)
        target = StateStore(job.workdir, job.destination).directory
        if target.exists() and any(p.name != ".lock" for p in target.iterdir()):
            raise StateError(
                f"the account this job's key names ({here}) has a state already ({target}): nothing moved"
            )
        account = old.removeprefix(job.destination.url_key + "-")
        with StateStore(job.workdir, dataclasses.replace(job.destination, account=account)).lock():
            # Under the old account's lock: no run of it is under way (its lock file moves with it).
            if target.exists():
                (target / ".lock").unlink(missing_ok=True)
                target.rmdir()
            (target.parent / old).rename(target)
        print(f"the state of {old} is now {here}'s ({target}); nothing was sent")
        return int(ExitCode.OK)
    from sync.coordination._db import describe_url
    from sync.coordination.ledger import PgLedger
    from sync.coordination.snapshot import ensure_snapshot_tables, move_state_scope, other_account_scopes

    with PgLedger.open(url) as ledger:
        ensure_snapshot_tables(ledger._conn, url)
        others = other_account_scopes(job, ledger._conn)
        old = _rekey_source(job, others, args.from_key)
        move_state_scope(job, ledger._conn, old)
    print(f"the state of {old} is now {here}'s (job {job.name} in {describe_url(url)}); nothing was sent")
    return int(ExitCode.OK)


def _rekey_source(job: Any, others: list[str], wanted: str | None) -> str:
    """The old account's destination key ``state rekey`` moves from: ``wanted``, or the one other account."""
    if wanted is not None:
        if wanted not in others:
            raise StateError(
                f"no snapshot state of {wanted} for job {job.name} at this base URL"
                + (f" (there are: {', '.join(others)})" if others else "")
            )
        return wanted
    if not others:
        raise StateError(
            f"no snapshot state of another account at this base URL for job {job.name}: nothing to rekey"
        )
    if len(others) > 1:
        raise StateError(
            f"the states of {len(others)} other accounts are kept for job {job.name} ({', '.join(others)}): "
            "name the old key's with --from"
        )
    return others[0]


def _print_state(args: argparse.Namespace, job: Any, store: Any, where: str, pending: list[str]) -> int:
    import polars as pl

    from sync.config import SourceKind
    from sync.state import TAGS, state_schema

    settings = getattr(job, "snapshot", None)
    doc: dict[str, Any] = {
        "job": job.name,
        "mode": str(getattr(job, "mode", "changes")),
        "state_dir": where,
        "pending_runs": pending,
        "sources": {},
    }
    for source in job.sources:
        if source.kind is not SourceKind.USERS:
            continue
        info: dict[str, Any] = {
            "path": store.describe(source),
            "users": store.rows(source),
            "fields": {},
            "tags": {},
        }
        if store.exists(source):
            schema = state_schema(source, settings)
            lazy = store.scan(source, settings)  # the base file with the overlay segments laid over it
            present = set(lazy.collect_schema().names())
            names = [
                n for n in schema if n in present and n not in ("__key", "__ext_id", "__uncertain", TAGS)
            ]
            if names:
                counts = lazy.select([pl.col(n).is_not_null().sum().alias(n) for n in names]).collect().row(0)
                info["fields"] = dict(zip(names, counts, strict=True))
            if TAGS in present:
                top = (
                    lazy.select(pl.col(TAGS).explode().drop_nulls())
                    .group_by(TAGS)
                    .len()
                    .sort(["len", TAGS], descending=[True, False])
                    .limit(20)
                    .collect()
                )
                info["tags"] = dict(top.iter_rows())
        doc["sources"][source.name] = info
    if args.output == "json":
        print(json.dumps(doc, indent=2))
        return int(ExitCode.OK)
    # Tags come from the export as written: an ESC or a CR in one, printed raw, rewrote the operator's terminal
    # (ESC[2J cleared it). The JSON output escapes them itself.
    print(f"state of job {printable(doc['job'])} ({doc['mode']} mode) in {printable(doc['state_dir'])}")
    if doc["pending_runs"]:
        print(f"  pending (not yet merged; the next run merges them): {', '.join(doc['pending_runs'])}")
    for name, info in doc["sources"].items():
        print(f"  source {name}: {info['users']} users")
        for field, n in info["fields"].items():
            print(f"    {printable(field):<32} {n:>10} users hold a value")
        if info["tags"]:
            print("    tags: " + ", ".join(f"{printable(t)} ({n})" for t, n in info["tags"].items()))
    return int(ExitCode.OK)
