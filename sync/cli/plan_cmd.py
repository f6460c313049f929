"""``pushsync validate JOB`` and ``pushsync plan JOB``: check a job and show what a run would send, sending nothing."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import yaml

from sync.config import Job, SyncMode, load_job, sample_notes, shared_fields
from sync.errors import BadInputError, BadJobError, ExitCode, JobProblem
from sync.planning.deletion_notes import deletes_and_changes, deletion_notes
from sync.planning.planning import ASSUMED_LATENCY, Plan, PlanSummary, build_plan
from sync.sources.reading import check_sources

__all__ = ["register"]

_REJECTS_SHOWN = 10


def register(subparsers: Any) -> None:
    """Add the ``validate`` and ``plan`` subcommands."""
    validate = subparsers.add_parser(
        "validate",
        help="check a job file (and the headers of its input files); report every problem",
        description="Check a job file against the schema and its input files' headers. Reports every problem.",
    )
    validate.add_argument("job", type=Path, help="the job file (YAML)")
    validate.add_argument("--output", choices=["text", "json"], default="text")
    validate.add_argument(
        "--no-files", action="store_true", help="check the job file only, not its input files"
    )
    validate.add_argument(
        "--check-connection",
        action="store_true",
        help="then check the key and base URL with one harmless request, as `pushsync doctor` does",
    )
    validate.set_defaults(func=_validate)

    plan = subparsers.add_parser(
        "plan",
        help="validate the input and show the requests a run would send (sends nothing)",
        description="Read and validate every input row and show the requests per endpoint, the rejected rows, "
        "an estimate of the run's duration and a sample payload per endpoint. Sends nothing.",
    )
    plan.add_argument("job", type=Path, help="the job file (YAML)")
    plan.add_argument("--output", choices=["text", "json"], default="text")
    plan.add_argument(
        "--rejects", type=Path, default=None, help="rejects CSV (default <workdir>/rejects.csv)"
    )
    plan.add_argument(
        "--full-refresh", action="store_true", help="snapshot mode: show the plan that ignores the state"
    )
    plan.add_argument(
        "--latency",
        type=float,
        default=ASSUMED_LATENCY,
        help=f"seconds per request assumed by the duration estimate (default {ASSUMED_LATENCY})",
    )
    add_source_selection(plan)
    plan.add_argument(
        "--limit",
        type=positive_int,
        metavar="N",
        help="plan a sample: of each source only the first N rows that pass validation (changes mode)",
    )
    from sync.cli._ledgers import add_database_url

    add_database_url(plan)  # snapshot mode: the confirmed state of a coordinated job is there
    plan.set_defaults(func=_plan)


def _problems_json(path: str, problems: list[dict[str, str]], notes: list[str] | None = None) -> str:
    doc: dict[str, Any] = {"job": path, "valid": not problems, "problems": problems}
    if notes is not None:
        doc["notes"] = notes
    return json.dumps(doc, indent=2)


def _is_meiro_job(path: str) -> bool:
    """A Meiro job (``platform: meiro`` at the top, no ``destination``) watches exports instead of sending rows:
    it has its own loader (:mod:`sync.platforms.meiro.job`). Anything unreadable goes to :func:`load_job`, which
    explains the problem."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and raw.get("platform") == "meiro" and "destination" not in raw


def _validate_meiro(args: argparse.Namespace, out: TextIO) -> int:
    from sync.platforms.meiro.job import load_meiro_job

    try:
        job = load_meiro_job(args.job)
    except BadJobError as exc:
        if args.output == "json":
            problems = [{"location": p.location, "message": p.message} for p in exc.problems]
            print(_problems_json(str(args.job), problems), file=out)
        else:
            _print_problems(str(args.job), exc.problems, out)
        return int(ExitCode.BAD_JOB_OR_INPUT)
    if args.output == "json":
        print(_problems_json(str(args.job), []), file=out)
    else:
        print(
            f"{args.job}: OK — Meiro job {job.name!r}, {len(job.exports)} export(s) to watch "
            "(`pushsync meiro run`)",
            file=out,
        )
    return int(ExitCode.OK)


def _validate(args: argparse.Namespace) -> int:
    out: TextIO = sys.stdout
    if _is_meiro_job(args.job):
        return _validate_meiro(args, out)
    try:
        job = load_job(args.job)
    except BadJobError as exc:
        problems = [{"location": p.location, "message": p.message} for p in exc.problems]
        if args.output == "json":
            print(_problems_json(str(args.job), problems), file=out)
        else:
            _print_problems(str(args.job), exc.problems, out)
        return int(ExitCode.BAD_JOB_OR_INPUT)
    file_problems = [] if args.no_files else check_sources(job) + _database_problems(job)
    notes = shared_fields(job)
    if args.output == "json":
        print(
            _problems_json(
                str(args.job), [{"location": p.location, "message": p.message} for p in file_problems], notes
            )
        )
        if not file_problems and getattr(args, "check_connection", False):
            from sync.cli.doctor_cmd import check_connection

            return check_connection(job, sys.stderr)  # stdout holds the JSON document only
        return int(ExitCode.BAD_JOB_OR_INPUT if file_problems else ExitCode.OK)
    if file_problems:
        _print_problems(str(args.job), file_problems, out)
        return int(ExitCode.BAD_JOB_OR_INPUT)
    print(
        f"{args.job}: OK — job {job.name!r}, {len(job.sources)} source(s), platform {job.destination.platform}",
        file=out,
    )
    _secret_note(job, out)
    for note in notes:
        print(f"note: {note}", file=out)
    if getattr(args, "check_connection", False):
        from sync.cli.doctor_cmd import check_connection

        return check_connection(job, out)
    return int(ExitCode.OK)


def _database_problems(job: Job) -> list[JobProblem]:
    """The database sources' problems (connection, query, columns), reading no row; imported only when a job
    has such a source."""
    if all(source.sql is None for source in job.sources):
        return []
    from sync.sources.reading_sql import check_sql_sources

    return check_sql_sources(job)


def _print_problems(path: str, problems: Any, out: TextIO) -> None:
    problems = list(problems)
    print(f"{path}: {len(problems)} problem(s):", file=out)
    for p in problems:
        print(f"  - {p}", file=out)


def _secret_file_problem(path: Path) -> str | None:
    """Why ``pushsync run`` could not read a key from ``path`` — told from the file's metadata, never its content
    (only run reads the secret) — or None. A directory was said not to exist, and an empty or unreadable file
    passed unnoted until the run stopped on it."""
    try:
        info = path.stat()
    except OSError:
        return "does not exist"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory, not a file"
    if not os.access(path, os.R_OK):
        return "cannot be read by this user"
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        return "is empty"
    return None


def _secret_note(job: Job, out: TextIO) -> None:
    # Only names are printed, never values: the CLI may look at the environment, the job may not.
    dest = job.destination
    # A variable holding only spaces is empty to the run, as one set to "" (resolve_secret strips the value).
    env_given = bool(dest.secret_env and os.environ.get(dest.secret_env, "").strip())
    if dest.secret_env and not env_given and not dest.secret_file:
        print(
            f"note: environment variable {dest.secret_env} is not set or empty; `pushsync run` will need it",
            file=out,
        )
    problem = _secret_file_problem(Path(dest.secret_file)) if dest.secret_file and not env_given else None
    if problem is not None:
        print(f"note: secret file {dest.secret_file} {problem}; `pushsync run` will need it", file=out)
    # The coordination database's URL is named like the key (docs/scaling.md): validate said OK, then run stopped.
    coordination = job.coordination
    env, file = (coordination.database_env, coordination.database_file) if coordination else (None, None)
    if env and not os.environ.get(env) and not (file and Path(file).is_file()):
        print(
            f"note: environment variable {env} (coordination.database) is not set; `pushsync run` will need it",
            file=out,
        )
    elif file and not env and not Path(file).is_file():
        print(
            f"note: file {file} (coordination.database) does not exist; `pushsync run` will need it", file=out
        )


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_source_selection(parser: Any) -> None:
    """``--select NAME[,NAME]`` and ``--exclude NAME[,NAME]`` (repeatable), for ``plan`` and ``run``."""
    parser.add_argument(
        "--select",
        action="append",
        metavar="NAME[,NAME]",
        help="only these sources (changes mode; unknown names are refused, listing the job's sources)",
    )
    parser.add_argument(
        "--exclude", action="append", metavar="NAME[,NAME]", help="every source but these (changes mode)"
    )


def selected_job(args: argparse.Namespace) -> Job:
    """The job file of ``args.job``, cut down to ``--select``/``--exclude`` (:func:`sync.config.select_sources`)."""
    from sync.config import select_sources, split_names

    return select_sources(load_job(args.job), split_names(args.select), split_names(args.exclude))


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While the block runs, SIGTERM stops the command as SIGINT does (``KeyboardInterrupt``: the staging directory
    is removed, exit 4) instead of killing it where it stands: a scheduler (cron, Kubernetes, Airflow) stops a job
    with SIGTERM, and a plan of millions of rows may be staging gigabytes then."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (an embedding program's worker thread)
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _plan(args: argparse.Namespace) -> int:
    with _sigterm_interrupts():
        return _plan_interruptible(args)


def _plan_interruptible(args: argparse.Namespace) -> int:
    job = selected_job(args)
    if args.limit is not None and job.mode is SyncMode.SNAPSHOT:
        raise BadJobError(
            str(job.path), [JobProblem("--limit", "not available in snapshot mode (docs/run.md)")]
        )
    # A changes job's summary counts every request: counted while the buckets are settled (not read back) —
    # unless the deletion notes read the frames afterwards.
    overlaps = deletes_and_changes(job)
    count = job.mode is not SyncMode.SNAPSHOT and not overlaps
    if args.rejects is not None and Path(args.rejects).is_dir():
        # A directory given as --rejects failed after the whole input was read, as "cannot write the job's working
        # files (...); check the workdir": about the workdir, which was fine. Checked first. (A device is written
        # to as it is: --rejects /dev/null or /dev/stdout are a user's choice.)
        raise BadInputError(str(args.rejects), "is a directory; name a file to write (in it, say)")
    with build_plan(job, rejects_path=args.rejects, limit=args.limit, count=count) as plan:
        diff = None
        account_notes: list[str] = []
        if job.mode is SyncMode.SNAPSHOT:
            # Snapshot jobs send the difference from the confirmed state: show that (docs/sync.md).
            from sync.cli._ledgers import database_url
            from sync.state import StateStore, preview

            url = database_url(args, job)
            # The state is per account: the one the job's secret names, when it can be read (plan needs none).
            job = dataclasses.replace(job, destination=job.destination.for_readable_account())
            with contextlib.ExitStack() as stack:
                conn = None
                if url is None:
                    store = StateStore(job.workdir, job.destination)
                else:
                    # A coordinated job's state is in the coordination database (docs/scaling.md).
                    from sync.coordination.ledger import PgLedger
                    from sync.coordination.snapshot import pg_state_store

                    ledger = stack.enter_context(PgLedger.open(url))
                    conn = ledger._conn
                    store = pg_state_store(job, conn, url)
                account_notes = _account_notes(job, store, conn, args.full_refresh)
                diff, summary, refused = preview(
                    store, plan, job.snapshot, full_refresh=args.full_refresh, assumed_latency=args.latency
                )
        else:
            summary = plan.summary(assumed_latency=args.latency)
        if args.output == "json":
            doc = summary.to_json()
            for staged in plan.staged:
                if staged.source.sql is not None:
                    doc["sources"][staged.source.name]["database"] = staged.files[0]
            doc["rejected_sample"] = _rejects_sample(plan)
            doc["budget_groups"] = _group_estimates(job, summary)
            doc["notes"] = (
                _notes(job, args.limit) + (deletion_notes(plan.staged) if overlaps else []) + account_notes
            )
            if diff is not None:
                doc["mode"] = "snapshot"
                doc["diff"] = {**diff.to_json(), "removals_refused_sources": list(refused)}
            print(json.dumps(doc, indent=2, ensure_ascii=False))
        else:
            notes = (
                _notes(job, args.limit) + (deletion_notes(plan.staged) if overlaps else []) + account_notes
            )
            _print_plan(job, plan, summary, sys.stdout, notes)
            if diff is not None:
                _print_diff(job, diff, refused, sys.stdout)
    return int(ExitCode.OK)


def _account_notes(job: Job, store: Any, conn: Any, full_refresh: bool) -> list[str]:
    """What ``run`` will ask (sync.state._store.another_accounts_state) when the job's account has no snapshot state
    but another account's at the same base URL has one; nothing when the key could not be read."""
    from sync.config import SourceKind

    users = [s for s in job.sources if s.kind is SourceKind.USERS]
    if job.destination.account is None or full_refresh or any(store.exists(s) for s in users):
        return []
    if conn is None:
        from sync.state._store import other_accounts

        others = other_accounts(job.workdir, job.destination)
    else:  # a coordinated job's state, in the coordination database
        from sync.coordination.snapshot import other_account_scopes

        others = other_account_scopes(job, conn)
    if not others:
        return []
    return [
        f"no snapshot state of the account this job's key names, but one of another account at the same base "
        f"URL ({', '.join(others)}): `pushsync run` will refuse — after a key rotation `pushsync state rekey "
        f"{job.path}` keeps that state; for another app `--full-refresh` sends it every user"
    ]


def _print_diff(job: Job, d: Any, refused: tuple[str, ...], out: TextIO) -> None:
    settings = job.snapshot
    print("\nSnapshot diff against the confirmed state:", file=out)
    print(
        f"  users: {d.users_current} in the export, {d.users_state} in the state; {d.users_new} new, "
        f"{d.users_changed - d.users_new} changed, {d.users_unchanged} unchanged, {d.users_left} left the export",
        file=out,
    )
    print(
        f"  fields: {d.values_set} values to set, {d.values_unset} to clear, {d.values_appended} to push/pull; "
        f"tags: {d.tags_added} to add, {d.tags_removed} to remove; {d.opt_in_changes} opt-in changes, "
        f"{d.contact_updates} e-mail/MSISDN updates",
        file=out,
    )
    # The run checks the threshold per source: summed over sources, a small source's mass removal hid in a big
    # one's users and the plan said "within the threshold" of a run then refused.
    verdict = (
        f"refused without --force: source {', '.join(repr(n) for n in refused)}"
        if refused
        else "within the threshold"
    )
    print(
        f"  removal ({settings.removal.value}): {d.users_removed} users ({d.removal_share:.1%} of the state's users "
        f"not removed before; limit {settings.max_removal_share:.1%} per source: {verdict})",
        file=out,
    )
    if d.users_held:
        print(
            f"  held: {d.users_held} users whose rows were rejected keep their state (not removed)", file=out
        )
    if d.removals_held:
        print(
            f"  held: {d.removals_held} users left the export but are not removed: a rejected row names no "
            "user we can trust (--force removes them anyway)",
            file=out,
        )


def _rejects_sample(plan: Plan) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(plan.rejected_rows()):
        if i >= _REJECTS_SHOWN:
            break
        out.append({"file": r.path, "row": r.row, "column": r.column, "reason": r.reason, "ext_id": r.ext_id})
    return out


def _short(path: str) -> str:
    """``path`` relative to the current directory when it lies below it, else absolute — never ``../..``."""
    absolute = os.path.abspath(path)
    try:
        relative = os.path.relpath(absolute)
    except ValueError:  # another drive
        return absolute
    return absolute if relative.startswith("..") else relative


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _group_estimates(job: Job, summary: PlanSummary) -> list[dict[str, Any]]:
    """Each budget group holding an endpoint of the plan: its requests (all its endpoints together) and the
    least time its budget allows for them (the estimate above already counts it)."""
    out = []
    for group in job.dispatch.budget_groups:
        held = [e for e in summary.endpoints if group.holds(e.endpoint)]
        if not held:
            continue
        requests = sum(e.requests for e in held)
        out.append(
            {
                "group": group.name,
                "budget": f"{group.budget.requests}/{group.budget.period:g}s",
                "endpoints": sorted({e.endpoint for e in held}),
                "requests": requests,
                "estimated_seconds": round(requests * group.budget.interval, 3),
            }
        )
    return out


def _notes(job: Job, limit: int | None) -> list[str]:
    """The job's notes, and a sample's (``--limit``): what it sends that the next full run cannot take back."""
    return shared_fields(job) + (sample_notes(job) if limit is not None else [])


def _print_plan(job: Job, plan: Plan, summary: PlanSummary, out: TextIO, notes: list[str]) -> None:
    print(f"Plan for job {job.name!r} -> {summary.platform} {summary.base_url} (nothing was sent)", file=out)
    print(
        f"Rows: {summary.rows_read} read, {summary.rows_clean} clean, {summary.rejected_count} rejected, "
        f"{summary.duplicates_dropped} identical duplicate(s) dropped",
        file=out,
    )
    for staged in plan.staged:
        if staged.source.sql is not None:  # the database and table, never the password
            print(f"Source {staged.files[0]}: {staged.rows_read} rows read", file=out)
    print(f"Rejects file: {_short(summary.rejects_path)}", file=out)
    for note in notes:
        print(f"Note: {note}", file=out)
    databases = {s.files[0] for s in plan.staged if s.source.sql is not None}
    for r in _rejects_sample(plan):
        # A database source is named by its label, and its "row" is the position in the query's result.
        origin = f"{r['file']} result row" if r["file"] in databases else f"{_short(r['file'])} row"
        where = f"{origin} {r['row']}" + (f", column {r['column']}" if r["column"] else "")
        print(f"  {where}: {r['reason']}" + (f" (ext_id {r['ext_id']})" if r["ext_id"] else ""), file=out)
    if summary.rejected_count > _REJECTS_SHOWN:
        print(f"  ... and {summary.rejected_count - _REJECTS_SHOWN} more in the rejects file", file=out)
    print(file=out)
    header = ("Phase", "Endpoint", "Operation", "Requests", "IDs", "Est. time")
    table = [
        (
            e.phase.name.lower(),
            e.endpoint,
            e.operation.value,
            str(e.requests),
            str(e.ids),
            _duration(e.estimated_seconds),
        )
        for e in sorted(
            summary.endpoints, key=lambda e: e.phase
        )  # send order: opt-outs first, deletions last
    ]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    for line in [header, *table]:
        cells = [
            c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)
    print(
        f"Total: {summary.total_requests} request(s), {summary.total_ids} ID(s); estimated duration "
        f"{_duration(summary.estimated_seconds)} (rate budgets, concurrency {job.dispatch.concurrency}, no retries)",
        file=out,
    )
    for group in _group_estimates(job, summary):
        print(
            f"Budget group {group['group']} ({group['budget']}, shared by {', '.join(group['endpoints'])}): "
            f"{group['requests']} request(s), at least {_duration(group['estimated_seconds'])}",
            file=out,
        )
    if summary.samples:
        print("\nSample payloads (first IDs of each endpoint):", file=out)
        for endpoint, body in summary.samples.items():
            print(f"  {endpoint}: {json.dumps(body, ensure_ascii=False)}", file=out)
