"""``pushsync meiro login-check | exports | wait | cancel | trash | restore | run | waits``: Meiro CDP push
exports. ``wait`` and ``run`` are ledger runs; each wait is recorded in the ledger's ``export_waits`` table.

Where and who: ``--base-url`` (else ``$MEIRO_BASE_URL``), the e-mail from ``--email`` (else ``$MEIRO_EMAIL``),
the password from ``--password-file`` (else ``$MEIRO_PASSWORD``) — never from the command line. ``run JOB``
takes all of that from a Meiro job file (:mod:`sync.platforms.meiro.job`).

Exit codes: 0 done (every export waited for finished; a cancel accepted) · 1 an export ended in error, was
canceled, timed out or could not be waited for; cancel of an export that had already ended · 2 bad job file,
missing credentials · 3 refused (401 bad credentials, 403 missing feature, 404 not found) or unreachable after
the retries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sync.cli._argtypes import seconds
from sync.errors import ExitCode, RejectedBatchError, SecretError, StateError, printable

__all__ = ["BASE_URL_ENV", "EMAIL_ENV", "PASSWORD_ENV", "register"]

BASE_URL_ENV = "MEIRO_BASE_URL"
EMAIL_ENV = "MEIRO_EMAIL"
PASSWORD_ENV = "MEIRO_PASSWORD"


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value}")
    return value


def _page_size(text: str) -> int:
    # Meiro answers limit=0 with an empty page, which the listing would print as "no exports" (or "the trash
    # is empty") while there are some: a page holds at least one.
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1 (the number per page)")
    return value


def register(subparsers: Any) -> None:
    """Add ``meiro`` and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", help=f"https://<instance>.meiro.io/api/ (default ${BASE_URL_ENV})")
    common.add_argument("--email", help=f"the Meiro user's e-mail (default ${EMAIL_ENV})")
    common.add_argument(
        "--password-file", type=Path, help=f"file holding the password (default ${PASSWORD_ENV})"
    )
    common.add_argument(
        "--request-timeout", type=seconds, default=30.0, help="seconds per request (default 30)"
    )
    common.add_argument("--output", choices=["text", "json"], default="text")

    meiro = subparsers.add_parser("meiro", help="Meiro CDP: push-notification exports and the trash")
    commands = meiro.add_subparsers(dest="meiro_command", metavar="COMMAND", required=True)

    check = commands.add_parser(
        "login-check", parents=[common], help="log in and say until when the token holds"
    )
    check.set_defaults(func=_sync(_login_check))

    exports = commands.add_parser("exports", parents=[common], help="list a push notification's exports")
    exports.add_argument("notification", metavar="NOTIFICATION")
    exports.add_argument("--limit", type=_page_size, help="exports per page (Meiro's default: 20)")
    exports.add_argument("--offset", type=_count, help="skip this many (newest first)")
    exports.add_argument("--all", action="store_true", help="every export (from --offset on), page by page")
    exports.set_defaults(func=_sync(_exports))

    wait = commands.add_parser(
        "wait", parents=[common], help="wait until an export is finished, error or canceled"
    )
    wait.add_argument("notification", metavar="NOTIFICATION")
    wait.add_argument("export", type=int, metavar="EXPORT")
    wait.add_argument("--interval", type=seconds, default=5.0, help="seconds between polls (default 5)")
    wait.add_argument("--timeout", dest="max_wait", type=seconds, help="give up after this many seconds")
    wait.add_argument(
        "--workdir", type=Path, default=Path(".pushsync/meiro"), help="where waits are recorded"
    )
    wait.set_defaults(func=_sync(_wait))

    cancel = commands.add_parser("cancel", parents=[common], help="cancel a waiting or running export")
    cancel.add_argument("notification", metavar="NOTIFICATION")
    cancel.add_argument("export", type=int, metavar="EXPORT")
    cancel.set_defaults(func=_sync(_cancel))

    trash = commands.add_parser("trash", parents=[common], help="list trashed push notifications")
    trash.add_argument("--search", help="only names containing this text (searched_text)")
    trash.add_argument("--limit", type=_page_size)
    trash.add_argument("--offset", type=_count)
    trash.add_argument("--all", action="store_true", help="every match (from --offset on), page by page")
    trash.set_defaults(func=_sync(_trash))

    restore = commands.add_parser(
        "restore", parents=[common], help="restore a push notification from the trash"
    )
    restore.add_argument("notification", metavar="ID")
    restore.set_defaults(func=_sync(_restore))

    run = commands.add_parser("run", help="wait for the exports a Meiro job file lists and record them")
    run.add_argument("job", type=Path, help="the Meiro job file (YAML), e.g. jobs/meiro.yaml")
    run.add_argument("--output", choices=["text", "json"], default="text")
    run.set_defaults(func=_sync(_run_job))

    waits = commands.add_parser("waits", help="show the export waits recorded in a ledger")
    where = waits.add_mutually_exclusive_group()
    where.add_argument("--job", type=Path, help="a Meiro job file (its workdir holds the ledger)")
    where.add_argument("--workdir", type=Path, help="the ledger's folder (default .pushsync/meiro)")
    waits.add_argument("--run", help="only this run")
    waits.add_argument("--output", choices=["text", "json"], default="text")
    waits.set_defaults(func=_waits)


def _sync(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        return int(asyncio.run(handler(args)))

    return run


def _client(args: argparse.Namespace) -> Any:
    from sync.config import Destination, base_url_problem, resolve_secret
    from sync.platforms.meiro.client import MeiroClient, MeiroCredentials

    base_url = args.base_url or os.environ.get(BASE_URL_ENV, "").strip()
    if not base_url:
        raise SecretError(f"give --base-url or set {BASE_URL_ENV}")
    problem = base_url_problem(base_url)
    if problem is not None:
        # Every error about a request names its URL: one holding a password would print it.
        where = "--base-url" if args.base_url else f"${BASE_URL_ENV}"
        raise SecretError(f"{where}: {problem} (the value is not shown)")
    email = args.email or os.environ.get(EMAIL_ENV, "").strip()
    if not email:
        raise SecretError(f"give --email or set {EMAIL_ENV}")
    if args.password_file is not None:
        # The job files' reader: a file that is empty, not UTF-8 or holds a line break inside is named as such
        # (it was "give --password-file", and a traceback for bytes that are not UTF-8).
        password = resolve_secret(Destination("meiro", base_url, secret_file=str(args.password_file)))
    else:
        password = os.environ.get(PASSWORD_ENV, "").strip()
    if not password:
        raise SecretError(
            f"give --password-file or set {PASSWORD_ENV} (the password is never a command-line argument)"
        )
    return MeiroClient(base_url, MeiroCredentials(email, password), timeout=args.request_timeout)


def _print(args: argparse.Namespace, doc: Any, text: str) -> None:
    print(json.dumps(doc, indent=2) if args.output == "json" else text)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def _login_check(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        await client.login()
        expires = client.token_expires_at
    doc = {"logged_in": True, "token_expires_at": _when(expires)}
    _print(
        args, doc, f"logged in; the token holds until {_when(expires)} (refreshed automatically before then)"
    )
    return int(ExitCode.OK)


def _export_line(e: Any) -> str:
    counts = e.message_counts
    return (
        f"{e.id:>8}  {e.status!s:<9} {counts.sent:>9}/{counts.total:<9} {counts.excluded_invalid:>8} "
        f"{counts.excluded_by_frequency_cap:>8}  {printable(e.created or '-'):<19}  {printable(e.name)}"
    )


def _note_capped(asked: int | None, served: int | None, count: int) -> None:
    """Say so when Meiro served a full page smaller than the one asked for: more may follow."""
    if asked is not None and served is not None and served < asked and count >= served:
        print(
            f"pushsync: Meiro serves at most {served} per page (asked for {asked}); "
            "use --all, or --offset, for the rest",
            file=sys.stderr,
        )


async def _exports(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        if args.all:
            items = [
                e
                async for e in client.iter_exports(
                    args.notification, page_size=args.limit or 20, offset=args.offset or 0
                )
            ]
        else:
            page = await client.list_exports(args.notification, limit=args.limit, offset=args.offset)
            items = list(page.exports)
            _note_capped(args.limit, page.limit, len(items))
    header = f"{'export':>8}  {'status':<9} {'sent/total':>19} {'invalid':>8} {'freq.cap':>8}  {'created':<19}  name"
    text = "\n".join([header, *(_export_line(e) for e in items)]) if items else "no exports"
    _print(args, [e.to_dict() for e in items], text)
    return int(ExitCode.OK)


class _PrintProgress:
    """Progress of a wait on stderr: a line whenever the status or the counts change, and each retry."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._last: tuple[Any, ...] | None = None

    def on_poll(self, export: Any, poll: int) -> None:
        counts = export.message_counts
        key = (export.status, counts.sent, counts.total)
        if key == self._last:
            return
        self._last = key
        share = f" ({100 * counts.done / counts.total:.0f} %)" if counts.total else ""
        print(
            f"{self._label}: {export.status}, {counts.sent} of {counts.total} sent{share}",
            file=sys.stderr,
            flush=True,
        )

    def on_retry(self, error: Any, delay: float) -> None:
        print(
            f"{self._label}: {printable(str(error))} — retrying in {delay:.1f} s", file=sys.stderr, flush=True
        )


def _wait_text(w: Any) -> str:
    counts = w.message_counts
    if not w.has_export:
        return f"no export: {printable(w.message)}"
    if w.outcome == "failed":
        return f"export {w.export_id} of {w.notification_id}: could not be waited for: {printable(w.message)}"
    return (
        f"export {w.export_id} of {w.notification_id}: {w.outcome} after {w.polls} polls"
        f"{f' and {w.retries} retries' if w.retries else ''}: {counts.sent} of {counts.total} sent, "
        f"{counts.excluded_invalid} invalid, {counts.excluded_by_frequency_cap} over the frequency cap"
    )


async def _wait(args: argparse.Namespace) -> int:
    from sync.ledger.ledger import Ledger, new_run_id
    from sync.platforms.meiro.poller import wait_for_export
    from sync.run import LEDGER_FILE

    run_id = new_run_id()
    with Ledger.open(args.workdir / LEDGER_FILE) as ledger:

        async def body() -> tuple[int, dict[str, Any], str]:
            async with _client(args) as client:
                wait = await wait_for_export(
                    client,
                    args.notification,
                    args.export,
                    interval=args.interval,
                    max_wait=args.max_wait,
                    progress=_PrintProgress(f"export {args.export}"),
                )
            ledger.record_export_wait(run_id, wait)
            code = ExitCode.OK if wait.outcome.ok else ExitCode.PARTIAL
            return code, {"run_id": run_id, **wait.to_dict()}, _wait_text(wait)

        code, doc, text = await _recorded_run(ledger, run_id, "meiro-wait", None, body)
    _print(args, doc, text)
    return code


async def _recorded_run(
    ledger: Any, run_id: str, job: str, job_path: str | None, body: Any
) -> tuple[int, Any, str]:
    """Run ``body`` as a ledger run: started, then finished as done/partial, aborted or interrupted."""
    from sync.errors import PushSyncError
    from sync.redact import redact

    ledger.start_run(run_id, job=job, job_path=job_path, platform="meiro")
    try:
        code, doc, text = await body()
    except PushSyncError as exc:
        ledger.finish_run(run_id, status="aborted", exit_code=int(exc.exit_code), message=redact(str(exc)))
        raise
    except (KeyboardInterrupt, asyncio.CancelledError):
        ledger.finish_run(run_id, status="interrupted", exit_code=int(ExitCode.INTERRUPTED))
        raise
    status = "done" if code == ExitCode.OK else "partial"
    ledger.finish_run(run_id, status=status, exit_code=int(code), summary=doc)
    return int(code), doc, text


async def _cancel(args: argparse.Namespace) -> int:
    from sync.platforms.meiro import ExportStatus

    async with _client(args) as client:
        try:
            export = await client.cancel_export(args.notification, args.export)
        except RejectedBatchError as exc:
            if exc.code != "export_finished":
                raise
            print(f"pushsync: {printable(exc.message)}", file=sys.stderr)  # it quotes Meiro's words
            return int(ExitCode.PARTIAL)
    what = f"export {export.id} of {args.notification}"
    if export.status is ExportStatus.CANCELED:
        doc, text = {**export.to_dict(), "cancel": "canceled"}, f"{what}: canceled"
    else:  # Meiro accepted the cancel but still answers the export as it was: it stops later
        doc = {**export.to_dict(), "cancel": "stopping"}
        text = (
            f"{what}: cancel accepted; the export is stopping (Meiro still says {export.status}). "
            f"Run `pushsync meiro wait {args.notification} {export.id}` to see it canceled."
        )
    _print(args, doc, text)
    return int(ExitCode.OK)


async def _trash(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        if args.all:
            items = [
                n
                async for n in client.iter_trash(
                    searched_text=args.search, page_size=args.limit or 20, offset=args.offset or 0
                )
            ]
        else:
            page = await client.list_trash(limit=args.limit, offset=args.offset, searched_text=args.search)
            items = list(page.items)
            _note_capped(args.limit, page.limit, len(items))
    if items:
        # Names are typed by Meiro's users: a line break or an escape sequence in one would rewrite the listing.
        text = "\n".join(
            f"{printable(n.id)}  {printable(n.modified or '-'):<20}  {printable(n.name)}" for n in items
        )
    elif args.search:
        text = f"no trashed push notification matches {args.search!r}"
    elif args.offset:
        text = f"no trashed push notification at offset {args.offset}"
    else:
        text = "the trash is empty"
    _print(args, [n.to_dict() for n in items], text)
    return int(ExitCode.OK)


async def _restore(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        restored = await client.restore(args.notification)
    _print(args, restored.to_dict(), f"restored {printable(restored.id)} ({printable(restored.name)})")
    return int(ExitCode.OK)


async def _run_job(args: argparse.Namespace) -> int:
    from sync.ledger.ledger import Ledger, new_run_id
    from sync.platforms.meiro.client import MeiroClient
    from sync.platforms.meiro.job import load_meiro_job, resolve_credentials
    from sync.platforms.meiro.poller import wait_for_exports
    from sync.run import LEDGER_FILE

    job = load_meiro_job(args.job)
    credentials = resolve_credentials(job)
    run_id = new_run_id()
    ledger_path = job.workdir / LEDGER_FILE
    with Ledger.open(ledger_path) as ledger:

        async def body() -> tuple[int, dict[str, Any], str]:
            client = MeiroClient(
                job.base_url,
                credentials,
                timeout=job.request_timeout,
                verify_tls=job.verify_tls,
                base_url_hint=f"check base_url in {args.job}",
            )
            async with client:
                waits = await wait_for_exports(
                    client,
                    job.exports,
                    run_id=run_id,
                    recorder=ledger,
                    concurrency=job.concurrency,
                    progress_for=lambda ref: _PrintProgress(str(ref)),
                    interval=job.interval,
                    max_wait=job.max_wait,
                    retry=job.retry,
                )
            ok = all(w.outcome.ok for w in waits)
            doc = {"run_id": run_id, "job": job.name, "ok": ok, "waits": [w.to_dict() for w in waits]}
            lines = [
                f"run {run_id} of {job.name}: {sum(w.outcome.ok for w in waits)} of {len(waits)} exports finished"
            ]
            lines += [f"  {_wait_text(w)}" for w in waits]
            lines.append(f"  recorded in {ledger_path}")
            return (ExitCode.OK if ok else ExitCode.PARTIAL), doc, "\n".join(lines)

        code, doc, text = await _recorded_run(ledger, run_id, job.name, str(job.path), body)
    _print(args, doc, text)
    return code


def _waits(args: argparse.Namespace) -> int:
    from sync.ledger.ledger import Ledger
    from sync.run import LEDGER_FILE

    if args.job is not None:
        from sync.platforms.meiro.job import load_meiro_job

        path = load_meiro_job(args.job).workdir / LEDGER_FILE
    else:
        path = (args.workdir or Path(".pushsync/meiro")) / LEDGER_FILE
    if not path.exists():
        raise StateError(f"no ledger at {path}")
    from sync.platforms.meiro.poller import NO_EXPORT

    with Ledger.open(path) as ledger:
        rows = ledger.export_waits(args.run)
    lines = []
    for r in rows:
        if r["export_id"] == NO_EXPORT:  # the ledger's column is NOT NULL: the marker stands for "none"
            r["export_id"] = None
            lines.append(f"{r['run_id']}  no export: {printable(r['message'] or '')}")
            continue
        lines.append(
            f"{r['run_id']}  export {r['export_id']} of {r['notification_id']}: {r['outcome']}, "
            f"{r['sent']} of {r['total']} sent, {r['excluded_invalid']} invalid, "
            f"{r['excluded_by_frequency_cap']} over the frequency cap"
            + (f" ({printable(r['message'])})" if r["message"] else "")
        )
    _print(args, rows, "\n".join(lines) or "no export waits recorded")
    return int(ExitCode.OK)
