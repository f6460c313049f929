"""The NotifyVisitors connector: sends ``user/create`` and ``event/create`` batches, translates every answer.

Authentication (either, chosen by the job's ``destination.extra.auth``):

* ``api_key`` (default): headers ``x-api-key: <secret>`` and ``x-brand-id: <destination.extra.brand_id>``;
* ``bearer`` (partner apps): ``Authorization: Bearer <secret>``.

Every answer is the envelope ``{"response": {"data": {...}, "message": "...", "status": "success"|"error"}}``.
Transport and the common status mapping are :mod:`sync.platforms._http`'s; the envelope (its ``message`` in
every error, its ``status`` inside a 2xx) and the advice given with fatal answers are this connector's:

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
                                                ``Retry-After`` when sent; NotifyVisitors documents none, so
                                                then until the platform's minute resets (below)
408, 5xx, time-outs, dropped connections        :class:`RetryableError`
==============================================  ================================================================

Messages are built by :func:`sync.redact.describe_request` and never include headers.

``X-RateLimit-Remaining: 0`` means "nothing more this minute": the platform counts per API family in minutes
(seed 004: "how many more requests you can make in that minute"), whatever budget the job sets. So a success
with 0 left carries ``reset_after`` and a 429 without ``Retry-After`` carries ``retry_after``: the seconds until
the next wall-clock minute (``destination.extra.rate_window`` seconds, default 60) plus a margin for clock skew,
and the endpoint's budget pauses that long instead of probing on its own (maybe much shorter) period. That the
window is aligned to the clock minute is [I]; if it is not, the next request meets one more 429 and waits again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from sync.config import Destination
from sync.errors import RejectedBatchError, RetryableError
from sync.platforms._http import AnswerPolicy, ErrorBody, HttpClient, HttpSession, bounded, parse_json
from sync.platforms.base import SendOutcome
from sync.platforms.notifyvisitors import PLATFORM
from sync.platforms.notifyvisitors.requests import split_batch
from sync.records import Batch
from sync.redact import register_secret

__all__ = ["RATE_WINDOW", "AuthMode", "NotifyVisitorsClient", "envelope_of"]

RATE_WINDOW = 60.0
"""Seconds in the platform's rate-limit window: every documented limit is per minute."""


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


def _message(envelope: tuple[str, str, Any] | None, status: int) -> str:
    return bounded(envelope[1]) if envelope and envelope[1] else f"HTTP {status}"


def _read_error(raw: bytes, status: int) -> ErrorBody:
    # The envelope has no error code of its own: the HTTP status stands in for one.
    return ErrorBody(_message(envelope_of(parse_json(raw)), status), status)


_ANSWERS = AnswerPolicy(
    _read_error,
    hints={
        401: "check the API key and brand ID, or the access token",
        403: "check the API key's permissions",
    },
    exhausted_on_429=True,
)


class NotifyVisitorsClient(HttpClient):
    """Sends :class:`Batch` objects to NotifyVisitors (or its sandbox). Use ``async with`` or :meth:`aclose`.

    ``destination.base_url`` is the API root (``https://analytics.notifyvisitors.com/api/v1/``); a batch's
    endpoint (``user/create``) is appended. One HTTP session for the client's lifetime.
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
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not secret:
            raise ValueError("an API key or access token is required")
        self._window = float(destination.extra.get("rate_window") or RATE_WINDOW)
        self._wall_clock = wall_clock  # the platform's windows are wall-clock minutes
        register_secret(secret)
        mode = AuthMode(auth or destination.extra.get("auth") or AuthMode.API_KEY)
        brand = brand_id or destination.extra.get("brand_id")
        if mode is AuthMode.API_KEY:
            if not brand:
                raise ValueError("api_key authentication needs destination.extra.brand_id")
            headers = {"x-api-key": secret, "x-brand-id": str(brand)}
        else:
            headers = {"Authorization": f"Bearer {secret}"}
        self.auth = mode
        self._session = HttpSession.for_destination(
            destination,
            headers={**headers, "Content-Type": "application/json", "Accept": "application/json"},
            timeout=timeout,
            max_connections=max_connections,
        )

    async def check(self) -> str:
        """NotifyVisitors has no read-only call (its API documents only user/create and event/create, both writes), so nothing can check the key without writing: one GET of the
        base URL checks DNS, the connection, TLS and that no redirect answers (``pushsync doctor``)."""
        status = await self._session.reachable()
        return (
            f"the base URL is reachable (HTTP {status}); NotifyVisitors has no read-only call, so the key is not "
            "checked: the first batch of a run is"
        )

    def split(self, batch: Batch) -> tuple[Batch, Batch] | None:
        """Halve a batch by its user IDs (None for a single user)."""
        return split_batch(batch)

    def until_window_reset(self) -> float:
        """Seconds until the platform's current rate window ends, plus a margin for clock skew (1 s per
        minute): what nothing-left-this-minute costs."""
        now = self._wall_clock()
        end = (math.floor(now / self._window) + 1) * self._window
        return end - now + min(1.0, self._window / 60)

    async def send(self, batch: Batch) -> SendOutcome:
        """POST the batch's body to its endpoint; see the module docstring for what is raised."""
        # The planner's bodies are the request's canonical JSON bytes: sent as they are, never encoded again.
        body = batch.body
        encoded = isinstance(body, bytes | bytearray | memoryview)
        sent_at = self._wall_clock()
        answer = await self._session.request(
            "POST",
            batch.endpoint,
            endpoint=batch.endpoint,
            batch_id=batch.batch_id,
            data=bytes(body) if encoded else None,
            json_body=None if encoded else body,
        )
        if not answer.ok:
            error = _ANSWERS.error(answer)
            if isinstance(error, RetryableError) and error.rate_limited and error.retry_after is None:
                error.retry_after = self.until_window_reset()
                error.retry_after_estimated = True  # the window's end, not a wait the server stated
            raise error
        body = answer.json()
        envelope = envelope_of(body)
        if envelope is None:
            raise RetryableError(
                f"{answer.what}: HTTP {answer.status} without the response envelope", status=answer.status
            )
        if envelope[0] != "success":
            # A refusal reported inside a 200: the content was refused, exactly like a 400.
            raise RejectedBatchError(
                _message(envelope, answer.status), status=answer.status, code=envelope[0]
            )
        remaining = answer.remaining
        # Nothing left in the minute the request was sent in: a wait for that minute's end — unless the answer came
        # after it (a slow answer to the minute's last request), when waiting for the *next* minute's end wasted a
        # whole minute of the budget. (Counted in the new minute instead, the next request meets a 429, which
        # waits.)
        same_minute = math.floor(sent_at / self._window) == math.floor(self._wall_clock() / self._window)
        reset_after = self.until_window_reset() if remaining == 0 and same_minute else None
        return SendOutcome(answer.status, answer.latency, body, remaining, reset_after)
