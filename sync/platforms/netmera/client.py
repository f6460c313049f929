"""The Netmera REST API 3.0 connector: sends batches over one aiohttp session, translates every answer.

Answers map onto the error tree (``sync/errors.py``) here, at the boundary — nothing above sees aiohttp:

============================================  =================================================================
answer                                        raised
============================================  =================================================================
2xx                                           (returns :class:`SendOutcome`)
401, 403; 404/405 (wrong base URL)            :class:`FatalPlatformError` — retrying cannot help any batch
400, 413, 409, 422 and other 4xx              :class:`RejectedBatchError` with Netmera's ``code`` and ``error``
408, 429, 5xx                                 :class:`RetryableError` (``retry_after``/``remaining`` parsed)
time-out, connection refused/reset/dropped    :class:`RetryableError` (no status)
TLS certificate refused, invalid URL          :class:`FatalPlatformError`
============================================  =================================================================

Error bodies are ``{"code": <int>, "error": "<message>"}``. Messages are built by
:func:`sync.redact.describe_request` and never include headers (the API key travels in ``X-netmera-api-key``).
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from sync.config import Destination
from sync.errors import FatalPlatformError, RejectedBatchError, RetryableError
from sync.platforms.base import SendOutcome
from sync.platforms.netmera import PLATFORM
from sync.platforms.netmera.requests import split_batch
from sync.records import Batch
from sync.redact import describe_request, redact, register_secret

__all__ = [
    "HttpAnswer",
    "NetmeraClient",
    "error_message",
    "fetch",
    "new_session",
    "parse_remaining",
    "parse_retry_after",
]

_AUTH_HEADER = "X-netmera-api-key"
_FATAL_STATUSES = frozenset({401, 403, 404, 405})
_MAX_MESSAGE = 300  # characters of a non-JSON error body kept in a message


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None when absent, unparseable or not
    positive. Absurdly large values are returned as they are: the rate budget caps them."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds


def parse_remaining(value: str | None) -> int | None:
    """``X-RateLimit-Remaining`` as a non-negative int, or None."""
    if value is None:
        return None
    try:
        remaining = int(value.strip())
    except ValueError:
        return None
    return max(0, remaining)


class NetmeraClient:
    """Sends :class:`Batch` objects to Netmera (or its sandbox). Use ``async with`` or call :meth:`aclose`.

    One :class:`aiohttp.ClientSession` for the client's lifetime, created on first use inside the running loop;
    ``timeout`` bounds each request from connect to last byte; TLS certificates are verified unless the
    destination says ``verify_tls: false`` (only for a local sandbox).
    """

    platform = PLATFORM

    def __init__(
        self, destination: Destination, api_key: str, *, timeout: float = 30.0, max_connections: int = 100
    ) -> None:
        if not api_key:
            raise ValueError("an API key is required")
        register_secret(api_key)
        base = destination.base_url
        self._base_url = base if base.endswith("/") else base + "/"
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._timeout_seconds = timeout
        self._verify_tls = destination.verify_tls
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> NetmeraClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, ssl=self._verify_tls, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers={_AUTH_HEADER: self._api_key, "Content-Type": "application/json"},
                json_serialize=lambda obj: json.dumps(obj, separators=(",", ":"), ensure_ascii=False),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def split(self, batch: Batch) -> tuple[Batch, Batch] | None:
        """Halve a batch by its external IDs (None for a single ID)."""
        return split_batch(batch)

    async def send(self, batch: Batch) -> SendOutcome:
        """POST the batch's body to its endpoint; see the module docstring for what is raised."""
        url = self._base_url + batch.endpoint
        what = describe_request("POST", url, endpoint=batch.endpoint, batch_id=batch.batch_id)
        body = await self._request("POST", url, what, json_body=batch.body)
        return body

    async def get(
        self,
        endpoint: str,
        params: Mapping[str, str] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """GET a read endpoint (``getProfileAttributes``, ``getDevices``...) and return the parsed body.

        ``headers`` are added to the session's (e.g. ``X-netmera-os`` for the segment reads)."""
        url = self._base_url + endpoint
        outcome = await self._request(
            "GET", url, describe_request("GET", url, endpoint=endpoint), params=params, headers=headers
        )
        return outcome.body

    async def _request(
        self,
        method: str,
        url: str,
        what: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> SendOutcome:
        session = self._get_session()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with session.request(method, url, json=json_body, params=params, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
                headers = resp.headers
        except TimeoutError as exc:
            raise RetryableError(f"{what}: no answer within {self._timeout_seconds:g} s") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise FatalPlatformError(
                f"{what}: TLS certificate refused: {redact(str(exc.certificate_error))}"
            ) from exc
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise FatalPlatformError(f"{what}: TLS error: {redact(str(exc))}") from exc
        except aiohttp.InvalidURL as exc:
            raise FatalPlatformError(f"{what}: invalid URL") from exc
        except aiohttp.ClientError as exc:
            # Refused, reset or dropped connections, and truncated answers: transient from where we stand.
            raise RetryableError(f"{what}: connection failed: {type(exc).__name__}") from exc
        latency = loop.time() - started
        remaining = parse_remaining(headers.get("X-RateLimit-Remaining"))
        if 200 <= status < 300:
            return SendOutcome(status, latency, _parse_json(raw), remaining)
        code, message = _error_of(raw, status)
        text = f"{what}: HTTP {status}" + (f", code {code}" if code is not None else "") + f": {message}"
        if status in _FATAL_STATUSES:
            hint = {401: "check the API key", 403: "check the API key and its permissions"}.get(
                status, "check destination.base_url"
            )
            raise FatalPlatformError(f"{text} ({hint})", status=status, code=code)
        if status == 429 or status == 408 or status >= 500:
            raise RetryableError(
                text,
                status=status,
                code=code,
                retry_after=parse_retry_after(headers.get("Retry-After")),
                remaining=remaining,
            )
        # 400 and the other 4xx: this batch's content was refused; splitting it may isolate the records.
        raise RejectedBatchError(message, status=status, code=code)


def _parse_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _error_of(raw: bytes, status: int) -> tuple[int | str | None, str]:
    """Netmera's ``{"code", "error"}``, or the start of whatever else came back."""
    body = _parse_json(raw)
    if isinstance(body, dict):
        code = body.get("code")
        message = body.get("error") or body.get("message")
        if not isinstance(code, int | str):
            code = None
        if isinstance(message, str) and message:
            return code, redact(message[:_MAX_MESSAGE])
        return code, f"HTTP {status}"
    text = raw[:_MAX_MESSAGE].decode("utf-8", "replace").strip()
    return None, redact(text) or f"HTTP {status}"


# --- helpers shared with the other connectors (additive: the Meiro connector reuses them) --------------------


def new_session(
    *, headers: Mapping[str, str], timeout: float, verify_tls: bool = True, max_connections: int = 100
) -> aiohttp.ClientSession:
    """A client session configured like :class:`NetmeraClient`'s: one per client lifetime, compact JSON,
    TLS verified unless ``verify_tls`` is False. Call it inside the running loop."""
    connector = aiohttp.TCPConnector(limit=max_connections, ssl=verify_tls, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        headers=dict(headers),
        json_serialize=lambda obj: json.dumps(obj, separators=(",", ":"), ensure_ascii=False),
    )


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """Any HTTP answer (success or not): status, headers, raw body and latency in seconds."""

    status: int
    headers: Mapping[str, str]
    raw: bytes
    latency: float

    def json(self) -> Any:
        """The body parsed as JSON, or None when empty or not JSON."""
        return _parse_json(self.raw)

    @property
    def remaining(self) -> int | None:
        return parse_remaining(self.headers.get("X-RateLimit-Remaining"))

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("Retry-After"))


async def fetch(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    what: str,
    *,
    timeout_seconds: float,
    json_body: Any = None,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> HttpAnswer:
    """Send one request and return whatever HTTP answer came, translating transport failures the way
    :class:`NetmeraClient` does: time-outs and dropped/refused connections → :class:`RetryableError`; TLS
    and invalid-URL problems → :class:`FatalPlatformError`. ``what`` (from :func:`describe_request`) starts
    every message; mapping HTTP statuses onto errors is the caller's (each platform's) business."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with session.request(method, url, json=json_body, params=params, headers=headers) as resp:
            raw = await resp.read()
            return HttpAnswer(resp.status, resp.headers, raw, loop.time() - started)
    except TimeoutError as exc:
        raise RetryableError(f"{what}: no answer within {timeout_seconds:g} s") from exc
    except aiohttp.ClientConnectorCertificateError as exc:
        raise FatalPlatformError(
            f"{what}: TLS certificate refused: {redact(str(exc.certificate_error))}"
        ) from exc
    except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
        raise FatalPlatformError(f"{what}: TLS error: {redact(str(exc))}") from exc
    except aiohttp.InvalidURL as exc:
        raise FatalPlatformError(f"{what}: invalid URL") from exc
    except aiohttp.ClientError as exc:
        raise RetryableError(f"{what}: connection failed: {type(exc).__name__}") from exc


def error_message(raw: bytes, status: int) -> tuple[int | str | None, str]:
    """(code, message) of an error body: ``{"code", "error"}`` or ``{"message"}``, else the start of the
    text; redacted and bounded."""
    return _error_of(raw, status)
