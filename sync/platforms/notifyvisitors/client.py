"""The NotifyVisitors connector: sends ``user/create`` and ``event/create`` batches, translates every answer.

Authentication (either, chosen by the job's ``destination.extra.auth``):

* ``api_key`` (default): headers ``x-api-key: <secret>`` and ``x-brand-id: <destination.extra.brand_id>``;
* ``bearer`` (partner apps): ``Authorization: Bearer <secret>``.

Every answer is the envelope ``{"response": {"data": {...}, "message": "...", "status": "success"|"error"}}``.
It maps onto the error tree (``sync/errors.py``) here, at the boundary:

==============================================  ================================================================
answer                                          raised
==============================================  ================================================================
2xx and ``status: success``                     (returns :class:`SendOutcome` with ``X-RateLimit-Remaining``)
2xx and ``status: error``                       :class:`RejectedBatchError` — the platform refused the content;
                                                resending the same request cannot change that, halving it
                                                isolates the users it refuses (the dispatcher splits)
2xx without the envelope (a proxy page...)      :class:`RetryableError` — not an answer from the API
401, 403; 404/405 (wrong base URL)              :class:`FatalPlatformError` — no batch can do better
400 and other 4xx                               :class:`RejectedBatchError` with the envelope's ``message``
429                                             :class:`RetryableError`, ``remaining`` from
                                                ``X-RateLimit-Remaining`` (0), ``retry_after`` from
                                                ``Retry-After`` when sent (NotifyVisitors documents none: the
                                                budget then pauses until the minute resets)
408, 5xx, time-outs, dropped connections        :class:`RetryableError`
==============================================  ================================================================

Messages are built by :func:`sync.redact.describe_request` and never include headers.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from enum import StrEnum
from typing import Any

import aiohttp

from sync.config import Destination
from sync.errors import FatalPlatformError, RejectedBatchError, RetryableError
from sync.platforms.base import SendOutcome
from sync.platforms.netmera.client import parse_remaining, parse_retry_after
from sync.platforms.notifyvisitors import PLATFORM
from sync.platforms.notifyvisitors.requests import split_batch
from sync.records import Batch
from sync.redact import describe_request, redact, register_secret

__all__ = ["AuthMode", "NotifyVisitorsClient", "envelope_of"]

_FATAL_STATUSES = frozenset({401, 403, 404, 405})
_MAX_MESSAGE = 300  # characters of an error message kept


class AuthMode(StrEnum):
    """How requests authenticate."""

    API_KEY = "api_key"
    """``x-api-key`` (the secret) and ``x-brand-id`` (``destination.extra.brand_id``)."""
    BEARER = "bearer"
    """``Authorization: Bearer <secret>`` (an access token granted to a partner app)."""


def envelope_of(body: Any) -> tuple[str, str, Any] | None:
    """``(status, message, data)`` of a ``{"response": {...}}`` envelope, or None when ``body`` is not one."""
    if not isinstance(body, dict):
        return None
    response = body.get("response")
    if not isinstance(response, dict) or not isinstance(response.get("status"), str):
        return None
    message = response.get("message")
    return response["status"].lower(), message if isinstance(message, str) else "", response.get("data")


class NotifyVisitorsClient:
    """Sends :class:`Batch` objects to NotifyVisitors (or its sandbox). Use ``async with`` or :meth:`aclose`.

    ``destination.base_url`` is the API root (``https://analytics.notifyvisitors.com/api/v1/``); a batch's
    endpoint (``user/create``) is appended. One :class:`aiohttp.ClientSession` for the client's lifetime.
    """

    platform = PLATFORM

    def __init__(
        self,
        destination: Destination,
        secret: str,
        *,
        auth: AuthMode | str | None = None,
        brand_id: str | None = None,
        timeout: float = 30.0,
        max_connections: int = 100,
    ) -> None:
        if not secret:
            raise ValueError("an API key or access token is required")
        register_secret(secret)
        mode = AuthMode(auth or destination.extra.get("auth") or AuthMode.API_KEY)
        brand = brand_id or destination.extra.get("brand_id")
        if mode is AuthMode.API_KEY:
            if not brand:
                raise ValueError("api_key authentication needs destination.extra.brand_id")
            self._headers = {"x-api-key": secret, "x-brand-id": str(brand)}
        else:
            self._headers = {"Authorization": f"Bearer {secret}"}
        self._headers["Content-Type"] = "application/json"
        self._headers["Accept"] = "application/json"
        self.auth = mode
        base = destination.base_url
        self._base_url = base if base.endswith("/") else base + "/"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._timeout_seconds = timeout
        self._verify_tls = destination.verify_tls
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> NotifyVisitorsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=self._verify_tls)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, headers=self._headers
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def split(self, batch: Batch) -> tuple[Batch, Batch] | None:
        """Halve a batch by its user IDs (None for a single user)."""
        return split_batch(batch)

    async def send(self, batch: Batch) -> SendOutcome:
        """POST the batch's body to its endpoint; see the module docstring for what is raised."""
        url = self._base_url + batch.endpoint
        what = describe_request("POST", url, endpoint=batch.endpoint, batch_id=batch.batch_id)
        payload = json.dumps(batch.body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        session = self._get_session()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with session.post(url, data=payload) as resp:
                raw = await resp.read()
                status = resp.status
                headers = resp.headers
        except TimeoutError as exc:
            raise RetryableError(f"{what}: no answer within {self._timeout_seconds:g} s") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise FatalPlatformError(f"{what}: TLS certificate refused") from exc
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise FatalPlatformError(f"{what}: TLS error: {redact(str(exc))}") from exc
        except aiohttp.InvalidURL as exc:
            raise FatalPlatformError(f"{what}: invalid URL") from exc
        except aiohttp.ClientError as exc:
            raise RetryableError(f"{what}: connection failed: {type(exc).__name__}") from exc
        latency = loop.time() - started
        remaining = parse_remaining(headers.get("X-RateLimit-Remaining"))
        body = _parse_json(raw)
        envelope = envelope_of(body)
        message = redact(envelope[1][:_MAX_MESSAGE]) if envelope and envelope[1] else f"HTTP {status}"
        if 200 <= status < 300:
            if envelope is None:
                raise RetryableError(f"{what}: HTTP {status} without the response envelope", status=status)
            if envelope[0] != "success":
                # A refusal reported inside a 200: the content was refused, exactly like a 400.
                raise RejectedBatchError(message, status=status, code=envelope[0])
            return SendOutcome(status, latency, body, remaining)
        text = f"{what}: HTTP {status}: {message}"
        if status in _FATAL_STATUSES:
            hint = {
                401: "check the API key and brand ID, or the access token",
                403: "check the API key's permissions",
            }.get(status, "check destination.base_url")
            raise FatalPlatformError(f"{text} ({hint})", status=status, code=status)
        if status == 429 or status == 408 or status >= 500:
            raise RetryableError(
                text,
                status=status,
                code=status,
                retry_after=parse_retry_after(headers.get("Retry-After")),
                remaining=0 if status == 429 and remaining is None else remaining,
            )
        raise RejectedBatchError(message, status=status, code=status)


def _parse_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None
