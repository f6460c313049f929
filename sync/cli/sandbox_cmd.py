"""``pushsync sandbox PLATFORM``: run a local, strict emulator of a platform's API until SIGINT/SIGTERM.

The platforms are the registry's (:data:`sync.platforms.registry.REGISTRY`): each names its sandbox module
(:attr:`sync.platforms.base.Platform.sandbox`), whose ``SANDBOX_COMMAND`` (:class:`sync.sandboxes._command
.SandboxCommand`) says what the sandbox takes and how to build it; Meiro, a watch source rather than a
destination, is listed beside them. A sandbox module is imported only when its sandbox is started (or its
``--help`` asked for), so no other command loads aiohttp.

Every sandbox takes ``--host``, ``--port``, ``--config`` (YAML/JSON settings) and ``--seed-file``; its credentials
come from an option, else an environment variable, else the config file, else a random one printed once when the
sandbox is ready (a local sandbox credential, so printing it is fine). When ready, the last line on stdout is the
base URL, flushed, so a script can start the sandbox as a subprocess and read where it listens. It runs until
SIGINT or SIGTERM and exits 0; a bad config or seed file, or a port in use, exits 2 before anything is printed on
stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import secrets
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sync.errors import BadInputError, BadJobError, JobProblem, StateError
from sync.sandboxes._command import (
    API_KEY_ENV,
    FOF_KEY_ENV,
    NV_KEY_ENV,
    NV_TOKEN_ENV,
    PASSWORD_ENV,
    Credential,
    SandboxCommand,
    command_of,
)

if TYPE_CHECKING:  # the sandboxes (and aiohttp) are imported only when one is run
    from sync.sandboxes._base import PlatformSandbox

__all__ = [
    "API_KEY_ENV",
    "EXTRA_SANDBOXES",
    "FOF_KEY_ENV",
    "NV_KEY_ENV",
    "NV_TOKEN_ENV",
    "PASSWORD_ENV",
    "Credential",
    "SandboxCommand",
    "register",
    "sandbox_modules",
]

EXTRA_SANDBOXES: Mapping[str, str] = {"meiro": "sync.sandboxes.meiro"}
"""Sandboxes of services that are not sync destinations (no :class:`~sync.platforms.base.Platform`)."""


def sandbox_modules() -> dict[str, str]:
    """Sandbox name → its module: every registered platform with a sandbox, then :data:`EXTRA_SANDBOXES`."""
    from sync.platforms.registry import REGISTRY

    out: dict[str, str] = {}
    for name in REGISTRY.names():
        module = REGISTRY[name].sandbox
        if module is not None:
            out[name] = module
    for name, module in EXTRA_SANDBOXES.items():
        out.setdefault(name, module)
    return out


# ------------------------------------------------------------------------------------------ the command


def register(subparsers: Any) -> None:
    """Add ``sandbox PLATFORM [options]`` to the ``pushsync`` parser: the platforms are the registry's."""
    modules = sandbox_modules()
    sandbox = subparsers.add_parser(
        "sandbox",
        help="run a local, strict emulator of a platform's API",
        description="Run a local, strict emulator of a platform's API. Sandboxes: "
        + ", ".join(modules)
        + ". `pushsync sandbox PLATFORM --help` lists a sandbox's options.",
    )
    sandbox.add_argument("platform", metavar="PLATFORM", choices=list(modules), help=", ".join(modules))
    sandbox.add_argument(
        "options", nargs=argparse.REMAINDER, help="the sandbox's options (PLATFORM --help lists them)"
    )
    sandbox.set_defaults(func=_start)


def sandbox_parser(command: SandboxCommand) -> argparse.ArgumentParser:
    """The options of one sandbox: the common ones, its credentials and its own."""
    parser = argparse.ArgumentParser(prog=f"pushsync sandbox {command.name}", description=command.help)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, metavar="N", help="port (default 0: a free port)")
    for credential in command.credentials:
        option = "--" + credential.setting.replace("_", "-")
        parser.add_argument(option, dest=credential.setting, metavar=credential.metavar, help=credential.help)
    parser.add_argument("--config", type=Path, metavar="FILE", help=command.config_help)
    parser.add_argument("--seed-file", type=Path, metavar="FILE", help=command.seed_help)
    if command.options is not None:
        command.options(parser)
    return parser


def _start(args: argparse.Namespace) -> int:
    command = command_of(sandbox_modules()[args.platform])
    return _run(command, sandbox_parser(command).parse_args(args.options))


def _run(command: SandboxCommand, args: argparse.Namespace) -> int:
    from sync.sandboxes._base import SeedFileError  # the sandbox modules (aiohttp) are imported on demand

    data = _load_config(args.config)
    creds: dict[str, str] = {}
    notes: list[str] = []
    for credential in command.credentials:
        value = (
            getattr(args, credential.setting)
            or os.environ.get(credential.env)
            or data.get(credential.setting)
        )
        if not value:
            value = secrets.token_urlsafe(24)
            notes.append(f"{credential.label} (generated, set {credential.env} to choose one): {value}")
        creds[credential.setting] = str(value)
    try:
        sandbox, more = command.build(args, data, creds)
    except SeedFileError as exc:
        raise BadInputError(str(exc.path), exc.reason) from exc
    except (ValueError, TypeError, KeyError, OSError) as exc:
        what = "sandbox config" if args.config else "seed file"
        raise BadJobError(str(args.config or args.seed_file), [JobProblem("", str(exc))], what=what) from exc
    asyncio.run(_serve(sandbox, args.host, args.port, [*notes, *more]))
    return 0


def _load_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise BadJobError(
            str(path), [JobProblem("", f"cannot read sandbox config: {exc}")], what="sandbox config"
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise BadJobError(
            str(path), [JobProblem("", "sandbox config must be a mapping")], what="sandbox config"
        )
    return dict(data)


async def _serve(sandbox: PlatformSandbox[Any, Any], host: str, port: int, notes: list[str]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        url = await sandbox.start(host, port)
    except OSError as exc:
        await sandbox.stop()
        raise _cannot_listen(host, port, exc) from exc
    # Printed only once the sandbox listens: a bad config or a port in use prints nothing on stdout (the error
    # goes to stderr), and the URL is the last line.
    for line in notes:
        print(line, flush=True)
    print(url, flush=True)
    try:
        await stop.wait()
    finally:
        await sandbox.stop()


def _cannot_listen(host: str, port: int, exc: OSError) -> StateError:
    """The error for a sandbox that cannot listen on ``host:port`` (exit 2, as for the metrics server's port)."""
    if exc.errno == errno.EADDRINUSE:
        return StateError(
            f"cannot listen on {host}:{port}: port {port} is in use; give another --port (0: a free one)"
        )
    return StateError(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
