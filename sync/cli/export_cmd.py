"""``pushsync export device-tokens | segments | segment-users | profiles``: write what Netmera holds to Parquet
or CSV, so users can audit the platform against their CRM.

The platform is named by ``--job JOB`` (its destination, secret, retry policy and time-out) or by ``--base-url``
with the API key in ``$NETMERA_API_KEY``. The file is written page by page (memory bounded) and appears only
when complete. Exit codes: 0 written · 2 bad job (or another platform's), secret, option, output or ID file ·
3 the platform refused (401/403...), stayed unreachable after the retries, or answered another shape than
documented.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from sync.cli._argtypes import seconds
from sync.errors import BadJobError, ExitCode, JobProblem

__all__ = ["API_KEY_ENV", "register"]

API_KEY_ENV = "NETMERA_API_KEY"
_WHAT = {
    "device-tokens": "device tokens",
    "segments": "segments",
    "segment-users": "segment users",
    "profiles": "profiles",
}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _base_url(text: str) -> str:
    """``--base-url`` held to a job file's rules for ``destination.base_url`` (the value is never repeated)."""
    from sync.config import base_url_problem

    problem = base_url_problem(text)
    if problem is not None:
        hint = f": the API key comes from ${API_KEY_ENV}" if "credentials" in problem else ""
        raise argparse.ArgumentTypeError(f"{problem} (the value is not shown){hint}")
    return text.strip()


def register(subparsers: Any) -> None:
    """Add ``export`` and its four subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--job", type=Path, help="a job file: its destination, secret, retry policy and time-out"
    )
    where.add_argument(
        "--base-url", type=_base_url, help=f"the Netmera REST API 3.0 base URL (API key from ${API_KEY_ENV})"
    )
    common.add_argument("-o", "--out", type=Path, required=True, help="the file to write")
    common.add_argument(
        "--format", choices=["parquet", "csv"], help="default: from the file name (.csv → csv, else parquet)"
    )
    common.add_argument("--timeout", type=seconds, help="seconds per request (default: the job's, else 30)")
    common.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto")
    common.add_argument("--output", choices=["text", "json"], default="text", help="summary format on stdout")

    export = subparsers.add_parser(
        "export", help="write Netmera's device tokens, segments, segment users or profiles to Parquet/CSV"
    )
    kinds = export.add_subparsers(dest="what", metavar="WHAT", required=True)

    tokens = kinds.add_parser("device-tokens", parents=[common], help="every device token (getDeviceTokens)")
    tokens.add_argument(
        "--page-size", type=_positive, default=1000, help="devices per request (default 1000)"
    )
    tokens.set_defaults(func=_run)

    segments = kinds.add_parser("segments", parents=[common], help="the segments of the panel (getSegments)")
    segments.add_argument(
        "--os", action="append", choices=["IOS", "ANDROID"], type=str.upper, help="repeatable; default both"
    )
    segments.set_defaults(func=_run)

    users = kinds.add_parser(
        "segment-users", parents=[common], help="the users of one segment (getSegmentUsers)"
    )
    users.add_argument("segment_id", type=int, metavar="SEGMENT_ID")
    users.add_argument("--os", required=True, choices=["IOS", "ANDROID"], type=str.upper)
    users.add_argument(
        "--page-size", type=_positive, default=1000, help="users per request, 100..1000 (default 1000)"
    )
    users.set_defaults(func=_run)

    profiles = kinds.add_parser(
        "profiles",
        parents=[common],
        help="profile attributes of the users listed in a file (getProfileAttributes)",
    )
    profiles.add_argument(
        "--ids", type=Path, required=True, help="CSV/Parquet (a column of extIds) or one per line"
    )
    profiles.add_argument("--id-column", help="column holding the extIds (default extId, else the first)")
    profiles.add_argument("--concurrency", type=_positive, default=8, help="requests in flight (default 8)")
    profiles.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    result = asyncio.run(_export(args))
    if result.total_changed is not None:
        start, end = result.total_changed
        print(
            f"pushsync: warning: the platform's total changed during the export ({start} at the start, {end} at "
            "the end): paging by offset may have skipped or repeated rows where it changed; export again at a "
            "quieter time for a consistent file",
            file=sys.stderr,
        )
    if args.output == "json":
        print(json.dumps({"what": args.what, **result.to_dict()}, indent=2))
    else:
        print(
            f"wrote {result.rows} {_WHAT[args.what]} to {result.path} ({result.format}, {result.pages} pages, "
            f"{result.seconds:.1f} s)"
        )
    return int(ExitCode.OK)


async def _export(args: argparse.Namespace) -> Any:
    import pyarrow as pa

    from sync.config import Destination, RetryPolicy, load_job, resolve_secret
    from sync.ledger.exporting import format_for, iter_id_chunks, make_export_progress, write_pages
    from sync.logs import get_logger
    from sync.platforms.netmera.client import NetmeraClient
    from sync.platforms.netmera.reads import (
        ReadSettings,
        device_token_pages,
        profile_pages,
        segment_pages,
        segment_user_pages,
    )

    if args.job is not None:
        job = load_job(args.job)
        destination = job.destination
        if destination.platform != "netmera":
            # Its key would go out as Netmera's header, to that platform's address, for an answer that is no
            # Netmera read's.
            raise BadJobError(
                str(args.job),
                [
                    JobProblem(
                        "destination.platform",
                        f"is {destination.platform}: pushsync export reads Netmera only; give a Netmera job, "
                        f"or --base-url with ${API_KEY_ENV}",
                    )
                ],
            )
        api_key = resolve_secret(destination)
        retry, timeout = job.dispatch.retry, job.dispatch.request_timeout
    else:
        destination = Destination("netmera", args.base_url, secret_env=API_KEY_ENV)
        # A job's reader: a key with a line break or a control character inside is refused (exit 2), never
        # handed to aiohttp, which raises on it as a header injection (an internal error, exit 5).
        api_key = resolve_secret(destination)
        retry, timeout = RetryPolicy(), 30.0
    fmt = format_for(args.out, args.format)
    log = get_logger(export=_WHAT[args.what])

    def on_retry(attempt: int, error: Any, delay: float) -> None:
        # Said as it happens: a Retry-After of minutes, or a platform down, otherwise looks like a hung export.
        log.warning(
            "export.retry",
            attempt=attempt,
            max_attempts=retry.max_attempts,
            status=error.status,
            error=str(error),
            retry_in_seconds=round(delay, 2),
        )

    settings = ReadSettings(retry=retry, on_retry=on_retry)
    progress = make_export_progress(_WHAT[args.what], args.progress)
    string, boolean, integer = pa.string(), pa.bool_(), pa.int64()
    async with NetmeraClient(destination, api_key, timeout=args.timeout or timeout) as client:
        if args.what == "device-tokens":
            schema = pa.schema(
                [("platform", string), ("token", string), ("deviceModel", string), ("pushPermitted", boolean)]
            )
            pages: Any = device_token_pages(client, page_size=args.page_size, settings=settings)
        elif args.what == "segments":
            schema = pa.schema(
                [("os", string), ("id", integer), ("name", string), ("userCount", integer), ("type", string)]
            )
            pages = segment_pages(client, args.os or ("IOS", "ANDROID"), settings=settings)
        elif args.what == "segment-users":
            schema = pa.schema([("externalId", string), ("msisdn", string), ("email", string)])
            pages = segment_user_pages(
                client, args.segment_id, args.os, page_size=args.page_size, settings=settings
            )
        else:
            schema = pa.schema(
                [("extId", string), ("found", boolean), ("profile", string), ("error", string)]
            )
            chunks = iter_id_chunks(args.ids, args.id_column, chunk=max(64, args.concurrency * 32))
            pages = profile_pages(client, chunks, concurrency=args.concurrency, settings=settings)
        return await write_pages(pages, args.out, schema, fmt, progress=progress)
