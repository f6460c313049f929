"""``pushsync sandbox notifyvisitors`` and ``pushsync sandbox formsonfire``: run a local emulator until
SIGINT/SIGTERM.

These join the ``sandbox`` command that :mod:`sync.cli.sandbox_cmd` creates (or create it when that module is
absent). Credentials come from the options, else the environment variables below, else random ones printed once
at start (local sandbox credentials, so printing them is fine). When ready, the last line on stdout is the base
URL, flushed, so a script can start the sandbox as a subprocess and read where it listens.
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

__all__ = ["FOF_KEY_ENV", "NV_KEY_ENV", "NV_TOKEN_ENV", "register"]

NV_KEY_ENV = "NOTIFYVISITORS_SANDBOX_API_KEY"
NV_TOKEN_ENV = "NOTIFYVISITORS_SANDBOX_BEARER_TOKEN"
FOF_KEY_ENV = "FORMSONFIRE_SANDBOX_INTEGRATION_KEY"


def _platforms(subparsers: Any) -> Any:
    """The ``sandbox`` command's sub-command action, creating the command if no other module did."""
    sandbox = subparsers.choices.get("sandbox")
    if sandbox is None:
        sandbox = subparsers.add_parser("sandbox", help="run a local, strict emulator of a platform's API")
        return sandbox.add_subparsers(dest="platform", metavar="PLATFORM", required=True)
    for action in sandbox._actions:  # argparse offers no public way to reach an existing sub-command action
        if isinstance(action, argparse._SubParsersAction):
            return action
    return sandbox.add_subparsers(dest="platform", metavar="PLATFORM", required=True)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, metavar="N", help="port (default 0: a free port)")
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="YAML/JSON file: limits, faults, seed, [I] choices"
    )
    parser.add_argument("--seed-file", type=Path, metavar="FILE", help="JSON state to load at start")


def register(subparsers: Any) -> None:
    """Add ``sandbox notifyvisitors`` and ``sandbox formsonfire`` to the ``pushsync`` parser."""
    platforms = _platforms(subparsers)
    nv = platforms.add_parser("notifyvisitors", help="the NotifyVisitors REST API v1 sandbox")
    _common(nv)
    nv.add_argument(
        "--api-key", metavar="KEY", help=f"x-api-key to accept (default: ${NV_KEY_ENV}, else random)"
    )
    nv.add_argument("--brand-id", metavar="ID", help="x-brand-id to accept (default 1000)")
    nv.add_argument(
        "--bearer-token",
        metavar="TOKEN",
        help=f"Bearer token to accept (default: ${NV_TOKEN_ENV}, else random)",
    )
    nv.add_argument("--no-limits", action="store_true", help="turn the documented per-family rate limits off")
    nv.set_defaults(func=_run_notifyvisitors)
    fof = platforms.add_parser("formsonfire", help='the Forms On Fire "POST Push API" sandbox')
    _common(fof)
    fof.add_argument(
        "--integration-key",
        metavar="KEY",
        help=f"IntegrationKey to accept (default: ${FOF_KEY_ENV}, else random)",
    )
    fof.add_argument("--company-id", type=int, metavar="N", help="CompanyId to accept (default 1000)")
    fof.set_defaults(func=_run_formsonfire)


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
    if not isinstance(data, dict):
        raise BadJobError(str(path), [JobProblem("", "sandbox config must be a mapping")])
    return data


def _secret(given: str | None, env: str, data: dict[str, Any], key: str, label: str) -> str:
    value = given or os.environ.get(env) or data.get(key)
    if value:
        return str(value)
    value = secrets.token_urlsafe(24)
    # A local sandbox credential, printed once so the user can configure a client; never a production secret.
    print(f"{label} (generated, set {env} to choose one): {value}", flush=True)
    return value


def _run_notifyvisitors(args: argparse.Namespace) -> int:
    from sync.platforms.sandboxes.notifyvisitors import NotifyVisitorsSandbox, NotifyVisitorsSandboxConfig

    data = _load_config(args.config)
    key = _secret(args.api_key, NV_KEY_ENV, data, "api_key", "api key")
    token = _secret(args.bearer_token, NV_TOKEN_ENV, data, "bearer_token", "bearer token")
    if args.no_limits:
        data = {**data, "limits": {}}
    try:
        config = NotifyVisitorsSandboxConfig.from_mapping(
            data, api_key=key, bearer_token=token, brand_id=args.brand_id, seed_file=args.seed_file
        )
        sandbox = NotifyVisitorsSandbox(config)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise BadJobError(str(args.config or args.seed_file), [JobProblem("", str(exc))]) from exc
    print(f"brand id: {config.brand_id}", flush=True)
    asyncio.run(_serve(sandbox, args.host, args.port))
    return 0


def _run_formsonfire(args: argparse.Namespace) -> int:
    from sync.platforms.sandboxes.formsonfire import FormsOnFireSandbox, FormsOnFireSandboxConfig

    data = _load_config(args.config)
    key = _secret(args.integration_key, FOF_KEY_ENV, data, "integration_key", "integration key")
    try:
        config = FormsOnFireSandboxConfig.from_mapping(
            data, integration_key=key, company_id=args.company_id, seed_file=args.seed_file
        )
        sandbox = FormsOnFireSandbox(config)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise BadJobError(str(args.config or args.seed_file), [JobProblem("", str(exc))]) from exc
    print(f"company id: {config.company_id}", flush=True)
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
