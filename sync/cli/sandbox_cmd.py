"""``pushsync sandbox PLATFORM``: run a local, strict emulator of a platform's API until SIGINT/SIGTERM.

One ``sandbox`` command, one subcommand per platform (:data:`COMMANDS`). Every platform takes ``--host``,
``--port``, ``--config`` (YAML/JSON settings) and ``--seed-file``; its credentials come from an option, else an
environment variable, else the config file, else a random one printed once when the sandbox is ready (a local
sandbox credential, so printing it is fine). When ready, the last line on stdout is the base URL, flushed, so a
script can start the sandbox as a subprocess and read where it listens. It runs until SIGINT or SIGTERM and
exits 0; a bad config or seed file exits 2 before anything is printed on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import secrets
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sync.errors import BadJobError, JobProblem

if TYPE_CHECKING:  # the sandboxes (and aiohttp) are imported only when one is run
    from sync.sandboxes._base import PlatformSandbox

__all__ = [
    "API_KEY_ENV",
    "COMMANDS",
    "FOF_KEY_ENV",
    "NV_KEY_ENV",
    "NV_TOKEN_ENV",
    "PASSWORD_ENV",
    "Credential",
    "SandboxCommand",
    "register",
]

API_KEY_ENV = "NETMERA_SANDBOX_API_KEY"
NV_KEY_ENV = "NOTIFYVISITORS_SANDBOX_API_KEY"
NV_TOKEN_ENV = "NOTIFYVISITORS_SANDBOX_BEARER_TOKEN"
FOF_KEY_ENV = "FORMSONFIRE_SANDBOX_INTEGRATION_KEY"
PASSWORD_ENV = "MEIRO_SANDBOX_PASSWORD"

_CONFIG_HELP = "YAML/JSON file: limits, faults, seed, [I] choices"

Built = tuple["PlatformSandbox[Any, Any]", list[str]]
Build = Callable[[argparse.Namespace, dict[str, Any], dict[str, str]], Built]
"""(parsed options, config document, credentials by setting) → (the sandbox, lines to print when it is ready).
May raise ValueError, TypeError, KeyError or OSError for a bad config or seed file."""


@dataclass(frozen=True, slots=True)
class Credential:
    """A secret the sandbox accepts: ``--<setting>``, else ``$env``, else ``setting`` in the config file, else a
    random one, printed once with ``label``."""

    setting: str
    """The config setting (and the option: ``api_key`` → ``--api-key``)."""
    env: str
    label: str
    help: str
    metavar: str = "KEY"


@dataclass(frozen=True, slots=True)
class SandboxCommand:
    """One ``pushsync sandbox <name>`` subcommand: its help, credentials, extra options and how to build it."""

    name: str
    help: str
    build: Build
    seed_help: str = "JSON state to load at start"
    config_help: str = _CONFIG_HELP
    credentials: tuple[Credential, ...] = ()
    options: Callable[[argparse.ArgumentParser], None] | None = None
    """Adds the platform's own options."""


# ---------------------------------------------------------------------------------------- the platforms


def _netmera_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stateless",
        action="store_true",
        help="check request shapes strictly but keep nothing and answer at once (for benchmarks)",
    )


def _netmera(args: argparse.Namespace, data: dict[str, Any], creds: dict[str, str]) -> Built:
    from sync.sandboxes.netmera import NetmeraSandbox, NetmeraSandboxConfig

    # None when not given: the config file's ``stateless`` then decides.
    stateless = True if args.stateless else None
    config = NetmeraSandboxConfig.from_mapping(data, **creds, seed_file=args.seed_file, stateless=stateless)
    notes = ["stateless: request shapes are checked, nothing is kept"] if config.stateless else []
    return NetmeraSandbox(config), notes


def _meiro_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--email", default="sandbox@meiro.local", help="the sandbox user (default sandbox@meiro.local)"
    )


def _meiro(args: argparse.Namespace, data: dict[str, Any], _creds: dict[str, str]) -> Built:
    from sync.sandboxes.meiro import MeiroSandbox, MeiroSandboxConfig, MeiroUser

    # Unless the config lists its users, there is one: --email, with $MEIRO_SANDBOX_PASSWORD or a generated one.
    notes = []
    if "users" not in data:
        password = os.environ.get(PASSWORD_ENV, "").strip()
        if not password:
            password = secrets.token_urlsafe(18)
            notes.append(
                f"user {args.email}, password (generated, set {PASSWORD_ENV} to choose one): {password}"
            )
        data["users"] = [MeiroUser(args.email, password)]
    config = MeiroSandboxConfig.from_mapping(data, seed_file=args.seed_file)
    return MeiroSandbox(config), notes


def _nv_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--brand-id", metavar="ID", help="x-brand-id to accept (default 1000)")
    parser.add_argument(
        "--no-limits", action="store_true", help="turn the documented per-family rate limits off"
    )


def _notifyvisitors(args: argparse.Namespace, data: dict[str, Any], creds: dict[str, str]) -> Built:
    from sync.sandboxes.notifyvisitors import NotifyVisitorsSandbox, NotifyVisitorsSandboxConfig

    if args.no_limits:
        data = {**data, "limits": {}}
    config = NotifyVisitorsSandboxConfig.from_mapping(
        data, **creds, brand_id=args.brand_id, seed_file=args.seed_file
    )
    return NotifyVisitorsSandbox(config), [f"brand id: {config.brand_id}"]


def _fof_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--company-id", type=int, metavar="N", help="CompanyId to accept (default 1000)")


def _formsonfire(args: argparse.Namespace, data: dict[str, Any], creds: dict[str, str]) -> Built:
    from sync.sandboxes.formsonfire import FormsOnFireSandbox, FormsOnFireSandboxConfig

    config = FormsOnFireSandboxConfig.from_mapping(
        data, **creds, company_id=args.company_id, seed_file=args.seed_file
    )
    return FormsOnFireSandbox(config), [f"company id: {config.company_id}"]


COMMANDS: tuple[SandboxCommand, ...] = (
    SandboxCommand(
        "netmera",
        "the Netmera REST API 3.0 sandbox",
        _netmera,
        seed_help="users/devices/segments to load (JSON, Parquet, or a dir)",
        credentials=(
            Credential(
                "api_key", API_KEY_ENV, "api key", f"API key to accept (default: ${API_KEY_ENV}, else random)"
            ),
        ),
        options=_netmera_options,
    ),
    SandboxCommand(
        "meiro",
        "the Meiro CDP sandbox (login, push exports, trash)",
        _meiro,
        seed_help="push notifications and exports (JSON)",
        config_help="YAML/JSON: users, limits, faults, seed, progression...",
        options=_meiro_options,
    ),
    SandboxCommand(
        "notifyvisitors",
        "the NotifyVisitors REST API v1 sandbox",
        _notifyvisitors,
        credentials=(
            Credential(
                "api_key", NV_KEY_ENV, "api key", f"x-api-key to accept (default: ${NV_KEY_ENV}, else random)"
            ),
            Credential(
                "bearer_token",
                NV_TOKEN_ENV,
                "bearer token",
                f"Bearer token to accept (default: ${NV_TOKEN_ENV}, else random)",
                metavar="TOKEN",
            ),
        ),
        options=_nv_options,
    ),
    SandboxCommand(
        "formsonfire",
        'the Forms On Fire "POST Push API" sandbox',
        _formsonfire,
        credentials=(
            Credential(
                "integration_key",
                FOF_KEY_ENV,
                "integration key",
                f"IntegrationKey to accept (default: ${FOF_KEY_ENV}, else random)",
            ),
        ),
        options=_fof_options,
    ),
)
"""The platforms, in the order ``pushsync sandbox --help`` lists them."""


# ------------------------------------------------------------------------------------------ the command


def register(subparsers: Any) -> None:
    """Add ``sandbox`` with a subcommand per platform to the ``pushsync`` parser."""
    sandbox = subparsers.add_parser("sandbox", help="run a local, strict emulator of a platform's API")
    platforms = sandbox.add_subparsers(dest="platform", metavar="PLATFORM", required=True)
    for command in COMMANDS:
        parser = platforms.add_parser(command.name, help=command.help)
        parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=0, metavar="N", help="port (default 0: a free port)")
        for credential in command.credentials:
            option = "--" + credential.setting.replace("_", "-")
            parser.add_argument(
                option, dest=credential.setting, metavar=credential.metavar, help=credential.help
            )
        parser.add_argument("--config", type=Path, metavar="FILE", help=command.config_help)
        parser.add_argument("--seed-file", type=Path, metavar="FILE", help=command.seed_help)
        if command.options is not None:
            command.options(parser)
        parser.set_defaults(func=functools.partial(_run, command))


def _run(command: SandboxCommand, args: argparse.Namespace) -> int:
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
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise BadJobError(str(args.config or args.seed_file), [JobProblem("", str(exc))]) from exc
    # Printed only once the sandbox is built: a bad config prints nothing on stdout (the error goes to stderr).
    for line in [*notes, *more]:
        print(line, flush=True)
    asyncio.run(_serve(sandbox, args.host, args.port))
    return 0


def _load_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise BadJobError(str(path), [JobProblem("", f"cannot read sandbox config: {exc}")]) from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise BadJobError(str(path), [JobProblem("", "sandbox config must be a mapping")])
    return dict(data)


async def _serve(sandbox: PlatformSandbox[Any, Any], host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    url = await sandbox.start(host, port)
    print(url, flush=True)
    try:
        await stop.wait()
    finally:
        await sandbox.stop()
