"""``pushsync doctor JOB``: check a job's key and base URL with one harmless request, before a run depends on them.

The request is the platform's own (:class:`sync.platforms.base.ConnectionCheck`): Netmera reads one device
token; NotifyVisitors and Forms On Fire have no read-only call, so only DNS, the connection, TLS and the absence
of a redirect are checked there (the output says so). ``pushsync validate JOB --check-connection`` does the same
after validating. Exit codes: 0 fine · 2 the job or its key is missing/unusable · 3 the key was refused
(401/403), the URL is wrong (404, a redirect) or the server cannot be reached. The key is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any, TextIO

from sync.errors import ExitCode, printable_lines

__all__ = ["check_connection", "register"]


def register(subparsers: Any) -> None:
    """Add ``doctor``."""
    doctor = subparsers.add_parser(
        "doctor",
        help="check the job's key and base URL with one harmless request",
        description="Load the job, resolve its key, and send one request that changes nothing (Netmera: read "
        "one device token; NotifyVisitors, Forms On Fire: reach the base URL only — they have no read-only "
        "call). Exit 0 fine, 2 missing key or bad job, 3 refused key, wrong URL or unreachable server.",
    )
    doctor.add_argument("job", type=Path, help="the job file (YAML)")
    doctor.set_defaults(func=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    from sync.config import load_job

    return check_connection(load_job(args.job), sys.stdout)


def check_connection(job: Any, out: TextIO) -> int:
    """Resolve ``job``'s key and send its platform's check request; print the outcome, return the exit code.

    A missing key raises :class:`sync.errors.SecretError` (exit 2, printed by the CLI); what the platform or the
    network answers is printed here (to stderr when it failed), with the key masked."""
    from sync.config import resolve_secret
    from sync.errors import FatalPlatformError, PlatformError
    from sync.platforms.base import ConnectionCheck
    from sync.redact import redact
    from sync.run import make_client

    key = resolve_secret(job.destination)
    client = make_client(job, key)
    where = f"{job.destination.platform} at {redact(job.destination.base_url)}"

    async def probe() -> str:
        try:
            if not isinstance(client, ConnectionCheck):
                return "no connection check for this platform"
            return await client.check()
        finally:
            await client.aclose()

    try:
        what = asyncio.run(probe())
    except FatalPlatformError as exc:
        print(f"{job.name}: {where}: refused — {printable_lines(redact(str(exc)))}", file=sys.stderr)
        return int(ExitCode.ABORTED)
    except PlatformError as exc:
        # No answer (closed port, DNS, time-out), 5xx, or a 4xx to a request that cannot be wrong: the run
        # would not get through either.
        print(f"{job.name}: {where}: not usable — {printable_lines(redact(str(exc)))}", file=sys.stderr)
        return int(ExitCode.ABORTED)
    print(f"{job.name}: {where}: OK — {what}", file=out)
    return int(ExitCode.OK)
