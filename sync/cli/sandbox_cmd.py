"""``pushsync sandbox netmera``: run a local emulator of a platform's API until SIGINT/SIGTERM.

The API key comes from ``--api-key``, else ``NETMERA_SANDBOX_API_KEY``, else a random one printed once at start
(a local sandbox key, so printing it is fine). When ready, the last line on stdout is the base URL, flushed, so a
script can start the sandbox as a subprocess and read where it listens.
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

__all__ = ["register"]

API_KEY_ENV = "NETMERA_SANDBOX_API_KEY"


def register(subparsers: Any) -> None:
    """Add ``sandbox netmera`` to the ``pushsync`` parser."""
    sandbox = subparsers.add_parser("sandbox", help="run a local, strict emulator of a platform's API")
    platforms = sandbox.add_subparsers(dest="platform", metavar="PLATFORM", required=True)
    netmera = platforms.add_parser("netmera", help="the Netmera REST API 3.0 sandbox")
    netmera.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    netmera.add_argument("--port", type=int, default=0, metavar="N", help="port (default 0: a free port)")
    netmera.add_argument(
        "--api-key", metavar="KEY", help=f"API key to accept (default: ${API_KEY_ENV}, else a random one)"
    )
    netmera.add_argument(
        "--config", type=Path, metavar="FILE", help="YAML/JSON file: limits, faults, seed, [I] choices"
    )
    netmera.add_argument(
        "--seed-file",
        type=Path,
        metavar="FILE",
        help="users/devices/segments to load (JSON, Parquet, or a dir)",
    )
    netmera.set_defaults(func=_run_netmera)
    from sync.cli.sandbox_meiro_cmd import add_meiro  # the Meiro sandbox's options live in their own module

    add_meiro(platforms)


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


def _run_netmera(args: argparse.Namespace) -> int:
    from sync.platforms.sandboxes.netmera import NetmeraSandbox, NetmeraSandboxConfig

    data = _load_config(args.config)
    key = args.api_key or os.environ.get(API_KEY_ENV) or data.get("api_key")
    generated = not key
    if generated:
        key = secrets.token_urlsafe(24)
    try:
        config = NetmeraSandboxConfig.from_mapping(data, api_key=key, seed_file=args.seed_file)
        sandbox = NetmeraSandbox(config)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise BadJobError(str(args.config or args.seed_file), [JobProblem("", str(exc))]) from exc
    if generated:
        # A local sandbox key, printed once so the user can configure a client; never a production secret.
        print(f"api key (generated, set {API_KEY_ENV} to choose one): {key}", flush=True)
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
