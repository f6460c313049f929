"""The ``pushsync`` command line.

Each group of subcommands lives in its own module with a ``register(subparsers)`` function that adds its parsers
and sets ``func`` (called with the parsed namespace, returning an exit code). Only the CLI reads environment
variables and turns :class:`sync.errors.PushSyncError` into a message and an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Sequence

from sync.errors import ExitCode, PushSyncError
from sync.redact import redact

__all__ = ["build_parser", "main"]

# Subcommand modules, in the order their commands appear in --help. A module listed here that does not exist
# yet is skipped, so the CLI works while parts of it are being built.
_COMMAND_MODULES = (
    "sync.cli.plan_cmd",
    "sync.cli.run_cmd",
    "sync.cli.state_cmd",
    "sync.cli.export_cmd",
    "sync.cli.report_cmd",
    "sync.cli.platform_cmd",
    "sync.cli.sandbox_cmd",
    "sync.cli.meiro_cmd",
)


def _version() -> str:
    """The installed distribution's version (one source: ``sync.__version__``, which the build reads)."""
    try:
        return importlib.metadata.version("pushsync")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from sync import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pushsync",
        description="Keep a push-notification platform in step with CRM exports (CSV/Parquet).",
    )
    parser.add_argument("--version", action="version", version=f"pushsync {_version()}")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-json", action="store_true", default=None, help="JSON log lines even on a terminal"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return int(ExitCode.BAD_JOB_OR_INPUT)
    from sync.logs import configure_logging

    configure_logging(args.log_level, json=args.log_json)
    try:
        return int(args.func(args))
    except PushSyncError as exc:
        print(f"pushsync: error: {redact(str(exc))}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("pushsync: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
