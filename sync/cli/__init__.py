"""The ``pushsync`` command line.

Each group of subcommands lives in its own module with a ``register(subparsers)`` function that adds its parsers
and sets ``func`` (called with the parsed namespace, returning an exit code). Only the CLI reads environment
variables and turns :class:`sync.errors.PushSyncError` into a message and an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from sync.errors import ExitCode, PushSyncError, printable_lines
from sync.redact import redact

__all__ = ["build_parser", "entry", "main"]

# Subcommand modules, in the order their commands appear in --help. A module listed here that does not exist
# yet is skipped, so the CLI works while parts of it are being built.
_COMMAND_MODULES = (
    "sync.cli.init_cmd",
    "sync.cli.plan_cmd",
    "sync.cli.doctor_cmd",
    "sync.cli.run_cmd",
    "sync.cli.state_cmd",
    "sync.cli.export_cmd",
    "sync.cli.report_cmd",
    "sync.cli.trace_cmd",
    "sync.cli.platform_cmd",
    "sync.cli.sandbox_cmd",
    "sync.cli.meiro_cmd",
)
_ALONE = {"run": "sync.cli.run_cmd", "plan": "sync.cli.plan_cmd", "validate": "sync.cli.plan_cmd"}
"""Commands whose parser :func:`main` builds with their own module's only: every module's parsers cost a run's
start-up what it does not use (``init`` and ``sandbox`` list every platform, which imports each of them)."""
_QUICK_EXIT = frozenset({"run", "plan"})
"""Commands after which :func:`entry` ends the process at once (:func:`exit_now`): everything they owe the user
is written and closed when :func:`main` returns, so the interpreter's teardown is only a delay. Any command
interrupted (exit 4) ends so too: its native libraries' threads may still be at work (see :func:`exit_now`)."""
_GLOBAL_FLAGS = ("--log-json",)
_GLOBAL_OPTIONS = ("--log-level",)  # take a value


def _version() -> str:
    """The installed distribution's version (one source: ``sync.__version__``, which the build reads)."""
    import importlib.metadata  # only for --version: it reads the installed distributions

    try:
        return importlib.metadata.version("pushsync")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from sync import __version__

        return __version__


class _VersionAction(argparse.Action):
    """``--version``, as argparse's own action, with the version looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **_: Any) -> None:
        super().__init__(
            option_strings,
            dest=dest,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show program's version number and exit",
        )

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> None:
        print(f"pushsync {_version()}")
        parser.exit()


def _command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names when only the global options precede it, else None (help, an error)."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in _GLOBAL_OPTIONS:
            i += 2
        elif word in _GLOBAL_FLAGS or word.startswith(tuple(f"{o}=" for o in _GLOBAL_OPTIONS)):
            i += 1
        elif word.startswith("-"):
            return None
        else:
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``pushsync`` parser; with ``command`` (one of :data:`_ALONE`), holding that command's module only."""
    parser = argparse.ArgumentParser(
        prog="pushsync",
        description=(
            "Keep a push-notification platform in step with CRM exports (CSV/Parquet files, or a query on "
            "PostgreSQL, DuckDB or SQLite)."
        ),
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument(
        "--log-level",
        default="auto",
        choices=["auto", "debug", "info", "warning", "error"],
        help="auto (default): info when stderr is not a terminal (progress lines for schedulers), else warning",
    )
    parser.add_argument(
        "--log-json", action="store_true", default=None, help="JSON log lines even on a terminal"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (_ALONE[command],) if command in _ALONE else _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return int(ExitCode.BAD_JOB_OR_INPUT)
    from sync._startup import mark_startup
    from sync.logs import configure_logging

    configure_logging(_log_level(args.log_level), json=args.log_json)
    mark_startup("command_parsed")
    try:
        return int(args.func(args))
    except PushSyncError as exc:
        # A platform's or a database's words may be in it: no control character reaches the terminal raw.
        print(f"pushsync: error: {printable_lines(redact(str(exc)))}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("pushsync: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        # The reader of our stdout went away (`pushsync show RUN | head`): that is its choice, not our failure.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again at exit.
        _silence_stdout()
        return int(ExitCode.OK)
    except Exception as exc:  # a bug: never let it look like "partial" (exit 1) to a scheduler
        import traceback

        print(
            f"pushsync: internal error: {type(exc).__name__}: {printable_lines(redact(str(exc)))}\n"
            "This is a bug in pushsync (or its environment), not in the job: what reached the ledger before it "
            "stays there. Please report it with the traceback below.",
            file=sys.stderr,
        )
        frames = "".join(traceback.format_exception(exc))
        print(redact(frames), file=sys.stderr)
        return int(ExitCode.CRASHED)


def entry() -> NoReturn:
    """The ``pushsync`` executable and ``python -m sync``: :func:`main` on the process's arguments, then the exit.

    After ``run`` and ``plan`` (:data:`_QUICK_EXIT`), and after any command interrupted, the process ends at once
    (:func:`exit_now`) instead of through the interpreter's teardown, which frees every module, object and
    buffer one by one: about 0.1 s of CPU after the run's last answer and its summary (0.3 s and more of wall
    time on a core shared with other work), in the wall time of every run. The run has closed its ledger,
    rejects file and connections by then, and printed its summary.
    """
    # SIGTERM as SIGINT until a command installs its own handlers (run, plan, sandbox): a scheduler stopping
    # pushsync while it starts, or while `validate` or `report` reads, gets exit 4 and one line, as docs/run.md
    # says — not the default termination (exit 143, nothing said) — and the files being written are cleaned up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    argv = sys.argv[1:]
    _small_pages_for_arrow()
    if _command(argv) == "run":
        _collect_less()
        _load_certificates_when_used()
    try:
        code = main(argv)
    except KeyboardInterrupt:  # while the command's module was imported, before main's own handling
        print("pushsync: interrupted", file=sys.stderr)
        code = int(ExitCode.INTERRUPTED)
    if _command(argv) in _QUICK_EXIT or code == ExitCode.INTERRUPTED:
        exit_now(code)
    sys.exit(code)


COLLECT_EVERY = 100_000
"""Net allocations between two passes of the cyclic garbage collector over its youngest objects in a ``pushsync
run`` process (Python's default: 700). See :func:`_collect_less`."""


def _small_pages_for_arrow() -> None:
    """Let Arrow's allocator (mimalloc, pyarrow's default memory pool) back its memory with ordinary 4 KiB pages
    instead of transparent huge pages, in a pushsync process (``MIMALLOC_ALLOW_THP=0``).

    mimalloc reserves a 1 GiB arena advised ``MADV_HUGEPAGE``: every first touch of a 2 MiB page of it has the
    kernel zero all 2 MiB, and mimalloc gives memory back (``purge``) milliseconds after it is freed, so a run
    that reads and decodes its input block after block zeroes fresh huge pages over and over. In a 1M-user
    ``pushsync run`` (``perf record -e cpu-clock``) the kernel's ``clear_page_erms`` under huge-page faults was
    11 % of the CPU samples; with 4 KiB pages the run took 2-10 % less CPU, a quarter less system time
    (``bench/run_env_ab.py``, docs/run.md). Set by the entry point before pyarrow is imported (mimalloc reads its
    options when the library loads), and only when the user has not set it: a program embedding pushsync keeps
    its own."""
    import os

    if "pyarrow" not in sys.modules:
        os.environ.setdefault("MIMALLOC_ALLOW_THP", "0")


def _collect_less() -> None:
    """Let the cyclic garbage collector run less often in this process (a run's, which ends when the run does).

    A run makes millions of short-lived objects that reference counting frees at once (batches and their records,
    frames, asyncio's handles) and hardly any reference cycles. At Python's default the collector made ~170
    passes in a 1M-user run — the young objects walked each time, those that survive them walked again in the
    older generations' passes, and one full pass over every object of every module imported — 0.055–0.078 s of
    the run's CPU (gc callbacks, loaded 2-core machine); with a pass every 100,000 net allocations, 0.004 s.
    Cycles still go: later, and the few a run makes are small. The process's own setting, made by its entry
    point only: a program that runs jobs through :func:`sync.run.run` keeps its own."""
    import gc

    _young, middle, old = gc.get_threshold()
    gc.set_threshold(COLLECT_EVERY, middle, old)


def _load_certificates_when_used() -> None:
    """Let this process's connector load the system's CA certificates into a TLS context only when a request will
    use it (:mod:`sync.platforms._tls`): a ``pushsync run`` against a plain-http sandbox uses none, and the import
    of aiohttp that loads both of its contexts costs ~0.06 s of CPU more on the way to the first request (issue
    13). The process's own setting, made by its entry point only: every HTTP session of a run loads what it uses
    before it opens, whereas a program embedding pushsync may use aiohttp's default contexts itself."""
    from sync.platforms import _tls

    _tls.DEFER = True


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` without the interpreter's teardown, once nothing else is owed.

    What the teardown does that matters still happens, in its order: the non-daemon threads are waited for as a
    normal exit waits for them (``threading``'s own shutdown: its exit hooks — idle executor workers told to
    stop — then every such thread joined), the ``atexit`` handlers run (logging's flush, temporary
    directories, coverage), then ``stdout`` and ``stderr`` are flushed. What is skipped is the freeing of every
    module and object, and the C++ static destructors of the native libraries: torn down while a native thread
    was still at work (a read-ahead an interrupted read left in Arrow's thread pools), they ended an interrupted
    ``pushsync plan`` with ``terminate called without an active exception`` (SIGABRT) after it had said
    "interrupted". An output that cannot be written (a full disk) is left to a normal exit, which reports it as
    it always does."""
    import atexit
    import os
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter's exit calls first (CPython)
    if shutdown is None or threading.current_thread() is not threading.main_thread():
        sys.exit(code)
    shutdown()
    atexit._run_exitfuncs()  # each handler once: they are unregistered as they run
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except ValueError:  # closed: nothing buffered is left to write
            continue
        except OSError:
            sys.exit(code)
    os._exit(code)


def _log_level(level: str) -> str:
    """``auto`` (the default): ``info`` when stderr is not a terminal, so a scheduler's log gets the run's
    progress lines; ``warning`` on a terminal, where the progress bar shows the same."""
    if level != "auto":
        return level
    return "warning" if sys.stderr.isatty() else "info"


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout already closed or not a real file: nothing left to flush
        pass
