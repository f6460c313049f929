"""Netmera reads, page by page: device tokens, segments, segment users and users' profile attributes.

Every reader is an async generator of :class:`Page` objects (rows as plain dicts, in the documented shapes), so
a caller writes each page out before the next is fetched — memory stays bounded whatever the platform holds.
Each request goes through :class:`NetmeraClient` (one session, errors translated) and is retried on
:class:`RetryableError` with :func:`sync.platforms.retrying.retry_call`; a page is always asked for by its
offset, so a retried page is the same page: nothing is duplicated or skipped.

``nextPage`` links are followed by their *query* (``offset``/``max``), always against the configured base URL:
the API key is never sent to whatever host a link might name.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sync.config import RetryPolicy
from sync.errors import PlatformError, RejectedBatchError, RetryableError
from sync.platforms.netmera.client import NetmeraClient
from sync.platforms.retrying import Sleep, retry_call

__all__ = [
    "DEVICE_COLUMNS",
    "OS_VALUES",
    "PROFILE_COLUMNS",
    "SEGMENT_COLUMNS",
    "SEGMENT_USER_COLUMNS",
    "Page",
    "ReadSettings",
    "device_token_pages",
    "profile_pages",
    "segment_pages",
    "segment_user_pages",
]

OS_VALUES = ("IOS", "ANDROID")
DEVICE_COLUMNS = ("platform", "token", "deviceModel", "pushPermitted")
SEGMENT_COLUMNS = ("os", "id", "name", "userCount", "type")
SEGMENT_USER_COLUMNS = ("externalId", "msisdn", "email")
PROFILE_COLUMNS = ("extId", "found", "profile", "error")
_EXT_ID_NOT_FOUND = 5016
_SEGMENT_PAGE_MAX = 1000  # getSegmentUsers refuses max > 1000 [D]
_SEGMENT_PAGE_MIN = 100  # ...and answers 100 rows for any max below 100 [D]


@dataclass(frozen=True, slots=True)
class Page:
    """One page of rows. ``total`` is the platform's total when it reports one (getDeviceTokens does)."""

    rows: list[dict[str, Any]]
    offset: int
    total: int | None = None


@dataclass(frozen=True, slots=True)
class ReadSettings:
    """Retry policy, and the (injectable) sleep and randomness used between retries."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Sleep = asyncio.sleep
    rng: random.Random | None = None
    on_retry: Callable[[int, RetryableError, float], None] | None = None


async def _get(
    client: NetmeraClient,
    settings: ReadSettings,
    endpoint: str,
    params: Mapping[str, str],
    headers: Mapping[str, str] | None = None,
) -> Any:
    async def once() -> Any:
        return await client.get(endpoint, params, headers=headers)

    return await retry_call(
        once, settings.retry, sleep=settings.sleep, rng=settings.rng, on_retry=settings.on_retry
    )


def _next_params(link: Any, endpoint: str) -> dict[str, str] | None:
    """The query of a ``nextPage`` link (None when there is no next page)."""
    if not isinstance(link, str) or not link:
        return None
    parts = urlsplit(link)
    if parts.path and not parts.path.rstrip("/").endswith(endpoint):
        raise PlatformError(f"{endpoint}: nextPage points to another endpoint ({parts.path})")
    return {k: v[-1] for k, v in parse_qs(parts.query).items()}


def _offset(params: Mapping[str, str], endpoint: str) -> int:
    try:
        return int(params.get("offset", "0"))
    except ValueError:
        raise PlatformError(f"{endpoint}: nextPage has no numeric offset") from None


def _check_os(os_name: str) -> str:
    value = os_name.upper()
    if value not in OS_VALUES:
        raise ValueError(f"os must be IOS or ANDROID, not {os_name!r}")
    return value


async def device_token_pages(
    client: NetmeraClient, *, page_size: int = 1000, settings: ReadSettings | None = None
) -> AsyncIterator[Page]:
    """``getDeviceTokens`` from offset 0, following ``nextPage`` until there is none. An empty page ends the
    export when it has no link or starts at or past ``total``; one that links a next page below ``total`` (or
    without a total) is a :class:`PlatformError`, as for getSegmentUsers."""
    settings = settings or ReadSettings()
    params: dict[str, str] | None = {"max": str(page_size), "offset": "0"}
    offset = 0
    while params is not None:
        body = await _get(client, settings, "getDeviceTokens", params)
        if not isinstance(body, Mapping) or not isinstance(body.get("devices"), list):
            raise PlatformError("getDeviceTokens: the answer holds no devices list")
        devices = [d for d in body["devices"] if isinstance(d, Mapping)]
        total = body.get("total") if isinstance(body.get("total"), int) else None
        if devices:
            yield Page([{c: d.get(c) for c in DEVICE_COLUMNS} for d in devices], offset, total)
        following = _next_params(body.get("nextPage"), "getDeviceTokens")
        if following is None:
            return
        if not devices:
            if total is not None and offset >= total:
                return  # a link past the last device (the count changed meanwhile): nothing is left to read
            # The platform says more devices follow but answered none here: stopping would leave a short file
            # that looks complete (exit 0), and following the link can only skip or repeat rows.
            of_total = f" of {total}" if total is not None else ""
            raise PlatformError(
                f"getDeviceTokens: the page at offset {offset}{of_total} holds no devices but links a next page: "
                "the devices after it cannot be read by offset"
            )
        next_offset = _offset(following, "getDeviceTokens")
        if next_offset != offset + len(devices):
            # A link that skips or repeats rows would silently lose or duplicate devices: refuse it.
            raise PlatformError(
                f"getDeviceTokens: nextPage offset {next_offset} does not follow {offset} + {len(devices)} rows"
            )
        offset, params = next_offset, following


async def segment_pages(
    client: NetmeraClient, os_names: Iterable[str] = OS_VALUES, *, settings: ReadSettings | None = None
) -> AsyncIterator[Page]:
    """``getSegments`` for each OS (``X-netmera-os`` header): one page per OS, rows tagged with their ``os``."""
    settings = settings or ReadSettings()
    for os_name in os_names:
        os_value = _check_os(os_name)
        body = await _get(client, settings, "getSegments", {}, {"X-netmera-os": os_value})
        items = body.get("list") if isinstance(body, Mapping) else None
        if not isinstance(items, list):
            raise PlatformError("getSegments: the answer holds no list")
        rows = [
            {"os": os_value, **{c: s.get(c) for c in SEGMENT_COLUMNS[1:]}}
            for s in items
            if isinstance(s, Mapping)
        ]
        yield Page(rows, 0)  # one OS's count is not the export's total (and would read as a change of it)


async def segment_user_pages(
    client: NetmeraClient,
    segment_id: int,
    os_name: str,
    *,
    page_size: int = _SEGMENT_PAGE_MAX,
    settings: ReadSettings | None = None,
) -> AsyncIterator[Page]:
    """``getSegmentUsers`` with ``max``/``offset`` paging (following ``nextPage`` when the platform sends it).

    ``page_size`` is clamped to Netmera's documented 100..1000. Without links, paging stops at a short page."""
    settings = settings or ReadSettings()
    size = min(max(page_size, _SEGMENT_PAGE_MIN), _SEGMENT_PAGE_MAX)
    headers = {"X-netmera-os": _check_os(os_name)}
    params = {"id": str(segment_id), "max": str(size), "offset": "0"}
    offset = 0
    links_seen = False
    while True:
        body = await _get(client, settings, "getSegmentUsers", params, headers)
        items = body.get("list") if isinstance(body, Mapping) else None
        if not isinstance(items, list):
            raise PlatformError("getSegmentUsers: the answer holds no list")
        rows = [{c: u.get(c) for c in SEGMENT_USER_COLUMNS} for u in items if isinstance(u, Mapping)]
        if rows:
            yield Page(rows, offset)
        following = _next_params(body.get("nextPage"), "getSegmentUsers")
        if following is not None:
            links_seen = True
            next_offset = _offset(following, "getSegmentUsers")
            if next_offset != offset + len(rows) or not rows:
                raise PlatformError(
                    f"getSegmentUsers: nextPage offset {next_offset} does not follow {offset} + {len(rows)} rows"
                )
            params = {**params, **following, "id": str(segment_id)}
        elif links_seen or len(rows) < size:
            return  # the link disappeared (last page), or, without links, a short page was the last
        else:
            params = {**params, "offset": str(offset + len(rows))}
        offset += len(rows)


async def profile_pages(
    client: NetmeraClient,
    ext_ids: AsyncIterable[list[str]] | Iterable[list[str]],
    *,
    concurrency: int = 8,
    settings: ReadSettings | None = None,
) -> AsyncIterator[Page]:
    """``getProfileAttributes`` for every extId, ``concurrency`` requests at a time, one page per input chunk.

    Rows keep the input order: ``extId``, ``found`` (False for Netmera's 5016 "external id not found"),
    ``profile`` (the attributes as JSON text: their keys differ from user to user) and ``error`` (another
    refusal's message). Retryable failures are retried; fatal ones end the export."""
    settings = settings or ReadSettings()
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(ext_id: str) -> dict[str, Any]:
        async with gate:
            try:
                body = await _get(client, settings, "getProfileAttributes", {"extId": ext_id})
            except RejectedBatchError as exc:
                found_not = exc.code == _EXT_ID_NOT_FOUND
                return {
                    "extId": ext_id,
                    "found": False,
                    "profile": None,
                    "error": None if found_not else exc.message,
                }
        profile = body.get("profile") if isinstance(body, Mapping) else None
        return {
            "extId": ext_id,
            "found": True,
            "profile": json.dumps(
                profile if isinstance(profile, Mapping) else {}, ensure_ascii=False, sort_keys=True
            ),
            "error": None,
        }

    offset = 0
    async for chunk in _aiter_chunks(ext_ids):
        # One task per ID of this chunk only (chunks are bounded), gated to ``concurrency`` at a time.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(ext_id)) for ext_id in chunk]
        except ExceptionGroup as failed:
            # The caller acts on our error types (fatal → abort, exit code): surface the first one as is.
            first = failed.exceptions[0]
            if isinstance(first, PlatformError):
                raise first from failed
            raise
        rows = [task.result() for task in tasks]
        yield Page(rows, offset)
        offset += len(rows)


async def _aiter_chunks(chunks: AsyncIterable[list[str]] | Iterable[list[str]]) -> AsyncIterator[list[str]]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk
