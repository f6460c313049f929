"""``pushsync sandbox meiro``: run the Meiro CDP emulator until SIGINT/SIGTERM.

:mod:`sync.cli.sandbox_cmd` calls :func:`add_meiro` with its ``sandbox`` sub-command action (argparse offers no
public way to add to an existing one from outside). The sandbox user is ``--email`` (default
``sandbox@meiro.local``) with the password from ``$MEIRO_SANDBOX_PASSWORD``, else a random one printed once
(local sandbox credentials, so printing them is fine). When ready, the last line on stdout is the base URL,
flushed, so a script can start the sandbox as a subprocess and read where it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
from pathlib import Path
from typing import Any

import yaml

from sync.errors import BadJobError, JobProblem

__all__ = ["PASSWORD_ENV", "add_meiro"]

PASSWORD_ENV = "MEIRO_SANDBOX_PASSWORD"


def add_meiro(platforms: Any) -> None:
    """Add ``meiro`` to the ``sandbox`` command's platforms."""
    meiro = platforms.add_parser("meiro", help="the Meiro CDP sandbox (login, push exports, trash)")
    meiro.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    meiro.add_argument("--port", type=int, default=0, metavar="N", help="port (default 0: a free port)")
    meiro.add_argument(
        "--email", default="sandbox@meiro.local", help="the sandbox user (default sandbox@meiro.local)"
    )
    meiro.add_argument(
        "--config", type=Path, metavar="FILE", help="YAML/JSON: users, limits, faults, seed, progression..."
    )
    meiro.add_argument("--seed-file", type=Path, metavar="FILE", help="push notifications and exports (JSON)")
    meiro.set_defaults(func=_run)


def _load(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise BadJobError(str(path), [JobProblem("", f"cannot read sandbox config: {exc}")]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadJobError(str(path), [JobProblem("", "sandbox config must be a mapping")])
    return data


def _run(args: argparse.Namespace) -> int:
    from sync.platforms.sandboxes.meiro import MeiroSandbox, MeiroSandboxConfig, MeiroUser

    data = _load(args.config)
    password = os.environ.get(PASSWORD_ENV, "").strip()
    generated = not password and "users" not in data
    if generated:
        password = secrets.token_urlsafe(18)
    if "users" not in data:
        data["users"] = [MeiroUser(args.email, password)]
    try:
        config = MeiroSandboxConfig.from_mapping(data, seed_file=args.seed_file)
        sandbox = MeiroSandbox(config)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise BadJobError(str(args.config or args.seed_file), [JobProblem("", str(exc))]) from exc
    if generated:
        # A local sandbox password, printed once so the user can log in; never a production secret.
        print(
            f"user {args.email}, password (generated, set {PASSWORD_ENV} to choose one): {password}",
            flush=True,
        )
    asyncio.run(_serve(sandbox, args.host, args.port))
    return 0


async def _serve(sandbox: Any, host: str, port: int) -> None:
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
