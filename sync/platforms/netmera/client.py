"""The Netmera REST API 3.0 connector: sends batches, reads profiles and segments, translates every answer.

Transport and the common status mapping are :mod:`sync.platforms._http`'s; what is Netmera's own is the error
body ``{"code": <int>, "error": "<message>"}`` (its code lands on the raised error and in the message) and the
advice given with fatal answers. Nothing above this module sees aiohttp:

============================================  =================================================================
answer                                        raised
============================================  =================================================================
2xx                                           (returns :class:`SendOutcome`)
2xx with a body that is not JSON (a page)     :class:`RetryableError` — not the API's answer; empty is fine
3xx (never followed)                          :class:`FatalPlatformError` — credentials stay with the base URL
401, 403; 404/405 (wrong base URL)            :class:`FatalPlatformError` — retrying cannot help any batch
400, 413, 409, 422 and other 4xx              :class:`RejectedBatchError` with Netmera's ``code`` and ``error``
408, 429, 5xx                                 :class:`RetryableError` (``retry_after``/``remaining`` parsed)
time-out, connection refused/reset/dropped    :class:`RetryableError` (no status)
TLS certificate refused, invalid URL          :class:`FatalPlatformError`
============================================  =================================================================

Messages are built by :func:`sync.redact.describe_request` and never include headers (the API key travels in
``X-netmera-api-key``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sync.config import Destination
from sync.errors import PlatformError
from sync.platforms._http import (
    AnswerPolicy,
    ErrorBody,
    HttpClient,
    HttpSession,
    json_error,
    parse_remaining,
    parse_retry_after,
)
from sync.platforms.base import SendOutcome
from sync.platforms.netmera import PLATFORM
from sync.platforms.netmera.requests import split_batch
from sync.records import Batch
from sync.redact import describe_request, register_secret

# parse_remaining and parse_retry_after live in sync.platforms._http; named here too, where they started.
__all__ = ["NetmeraClient", "parse_remaining", "parse_retry_after"]

_AUTH_HEADER = "X-netmera-api-key"


def _read_error(raw: bytes, status: int) -> ErrorBody:
    code, message = json_error(raw, status)
    return ErrorBody(message, code, f", code {code}" if code is not None else "")


_ANSWERS = AnswerPolicy(
    _read_error, hints={401: "check the API key", 403: "check the API key and its permissions"}
)


class NetmeraClient(HttpClient):
    """Sends :class:`Batch` objects to Netmera (or its sandbox). Use ``async with`` or call :meth:`aclose`.

    One HTTP session for the client's lifetime (:class:`sync.platforms._http.HttpSession`); ``timeout`` bounds
    each request from connect to last byte; TLS certificates are verified unless the destination says
    ``verify_tls: false`` (only for a local sandbox).
    """

    platform = PLATFORM

    def __init__(
        self, destination: Destination, api_key: str, *, timeout: float = 30.0, max_connections: int = 100
    ) -> None:
        if not api_key:
            raise ValueError("an API key is required")
        register_secret(api_key)
        self._session = HttpSession.for_destination(
            destination,
            headers={_AUTH_HEADER: api_key, "Content-Type": "application/json"},
            timeout=timeout,
            max_connections=max_connections,
        )

    def split(self, batch: Batch) -> tuple[Batch, Batch] | None:
        """Halve a batch by its external IDs (None for a single ID)."""
        return split_batch(batch)

    async def send(self, batch: Batch) -> SendOutcome:
        """POST the batch's body to its endpoint; see the module docstring for what is raised.

        The builder's body is the request's canonical JSON ``bytes``: sent as they are (``Content-Type:
        application/json``), never encoded again. An object body (a batch made by hand) is encoded here."""
        body = batch.body
        encoded = body if isinstance(body, bytes) else None
        answer = _ANSWERS.check(
            await self._session.request(
                "POST",
                batch.endpoint,
                endpoint=batch.endpoint,
                batch_id=batch.batch_id,
                data=encoded,
                json_body=None if encoded is not None else body,
            )
        )
        # Success bodies are not documented [I]: empty is fine, but a page that is not JSON is not the API's.
        return SendOutcome(answer.status, answer.latency, answer.expect_json(), answer.remaining)

    async def check(self) -> str:
        """One harmless read (``getDeviceTokens``, one row): the key and the base URL are right when it answers
        2xx with a devices list; 401/403/404 and redirects raise :class:`sync.errors.FatalPlatformError`, a 2xx
        that is not getDeviceTokens' answer :class:`sync.errors.PlatformError` (``pushsync doctor``)."""
        body = await self.get("getDeviceTokens", {"max": "1", "offset": "0"})
        if not isinstance(body, Mapping) or not isinstance(body.get("devices"), list):
            # A 2xx that is not getDeviceTokens' answer (empty, {}, a status page's JSON) comes from another
            # service behind the base URL (a catch-all proxy, a health endpoint): a run would not get through.
            what = describe_request(
                "GET", self._session.base_url + "getDeviceTokens", endpoint="getDeviceTokens"
            )
            raise PlatformError(
                f"{what}: answered 2xx without a devices list — not Netmera's answer; the base URL names another "
                "service (check destination.base_url: Netmera's ends in /rest/3.0/)"
            )
        return "getDeviceTokens (one row, read only) answered: the key and the base URL are accepted"

    async def get(
        self,
        endpoint: str,
        params: Mapping[str, str] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """GET a read endpoint (``getProfileAttributes``, ``getDevices``...) and return the parsed body.

        ``headers`` are added to the session's (e.g. ``X-netmera-os`` for the segment reads)."""
        answer = await self._session.request(
            "GET", endpoint, endpoint=endpoint, params=params, headers=headers
        )
        return _ANSWERS.check(answer).expect_json()
