"""The Meiro CDP connector: login, token refresh, push-notification exports and the trash.

Session handling and transport-error translation are the Netmera connector's (:func:`new_session`,
:func:`fetch`); the HTTP statuses map onto the error tree here:

=====================================================  ==========================================================
answer                                                 raised
=====================================================  ==========================================================
2xx                                                    (parsed into :mod:`sync.platforms.meiro` records)
401 on login                                           :class:`FatalPlatformError` "check MEIRO_EMAIL/password"
401 on a call                                          log in again once, repeat the call; then fatal
403                                                    :class:`FatalPlatformError` naming the missing feature
404 on an export / a trashed notification              :class:`FatalPlatformError` "... not found" (status 404)
400 on cancel of a finished export                     :class:`RejectedBatchError` "export N is already finished"
other 4xx                                              :class:`RejectedBatchError` with Meiro's message
408, 429, 5xx, time-outs, dropped connections          :class:`RetryableError` (``retry_after`` parsed)
=====================================================  ==========================================================

The token (valid 8 h [D]) is refreshed with ``PATCH users/login`` once less than ``refresh_margin`` of its life
is left, judged on an injectable clock; a refresh refused with 401 falls back to a new login. Neither the
password nor any token ever appears in a message (both are registered with :mod:`sync.redact`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from sync.errors import FatalPlatformError, RejectedBatchError, RetryableError
from sync.platforms.meiro import (
    PLATFORM,
    TOKEN_TTL,
    Export,
    ExportPage,
    TrashedNotification,
    TrashPage,
)
from sync.platforms.netmera.client import HttpAnswer, error_message, fetch, new_session
from sync.redact import describe_request, register_secret

__all__ = ["MeiroClient", "MeiroCredentials"]

_TOKEN_HEADER = "X-Access-Token"


class MeiroCredentials:
    """E-mail and password of a Meiro user. ``repr`` never shows the password."""

    __slots__ = ("email", "password")

    def __init__(self, email: str, password: str) -> None:
        if not email or not password:
            raise ValueError("a Meiro e-mail and password are required")
        register_secret(password)
        self.email = email
        self.password = password

    def __repr__(self) -> str:
        return f"MeiroCredentials(email={self.email!r}, password=***)"


class MeiroClient:
    """Talks to one Meiro instance (or its sandbox). Use ``async with`` or call :meth:`aclose`.

    ``base_url`` ends in ``/api/`` (``https://<instance>.meiro.io/api/``). ``clock`` is wall time in seconds
    (injectable: token expiry is judged on it). One aiohttp session for the client's lifetime.
    """

    platform = PLATFORM

    def __init__(
        self,
        base_url: str,
        credentials: MeiroCredentials,
        *,
        timeout: float = 30.0,
        verify_tls: bool = True,
        clock: Callable[[], float] = time.time,
        token_ttl: float = TOKEN_TTL,
        refresh_margin: float = 900.0,
    ) -> None:
        self._base_url = base_url if base_url.endswith("/") else base_url + "/"
        self._credentials = credentials
        self._timeout = timeout
        self._verify_tls = verify_tls
        self._clock = clock
        self._token_ttl = token_ttl
        self._refresh_margin = min(refresh_margin, token_ttl / 2)
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._token_expires = 0.0  # clock time the current token stops working
        self._auth_lock = asyncio.Lock()  # one login/refresh at a time when calls run concurrently
        self.logins = 0
        self.refreshes = 0

    async def __aenter__(self) -> MeiroClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def token_expires_at(self) -> float:
        """Clock time the current token expires (0 before the first login)."""
        return self._token_expires

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = new_session(
                headers={"Content-Type": "application/json", "Accept": "application/json"},
                timeout=self._timeout,
                verify_tls=self._verify_tls,
            )
        return self._session

    # -- authentication --------------------------------------------------------------------------------

    async def login(self) -> None:
        """``POST users/login``; keeps the token for the following calls."""
        async with self._auth_lock:
            await self._login()

    async def _login(self) -> None:
        url = self._base_url + "users/login"
        what = describe_request("POST", url, endpoint="login")
        body = {"email": self._credentials.email, "password": self._credentials.password}
        answer = await fetch(
            self._get_session(), "POST", url, what, timeout_seconds=self._timeout, json_body=body
        )
        if answer.status == 401:
            _, message = error_message(answer.raw, answer.status)
            raise FatalPlatformError(
                f"{what}: HTTP 401: {message} (check the Meiro e-mail and password)", status=401
            )
        self._accept_token(self._checked(answer, what), what)
        self.logins += 1

    async def refresh(self) -> None:
        """``PATCH users/login``: a fresh 8 h token (log in again if the server no longer knows the old one)."""
        async with self._auth_lock:
            await self._refresh()

    async def _refresh(self) -> None:
        if self._token is None:
            await self._login()
            return
        url = self._base_url + "users/login"
        what = describe_request("PATCH", url, endpoint="refresh")
        answer = await fetch(
            self._get_session(),
            "PATCH",
            url,
            what,
            timeout_seconds=self._timeout,
            headers={_TOKEN_HEADER: self._token},
        )
        if answer.status == 401:
            await self._login()
            return
        self._accept_token(self._checked(answer, what), what, keep=self._token)
        self.refreshes += 1

    def _accept_token(self, body: Any, what: str, *, keep: str | None = None) -> None:
        token = body.get("token") if isinstance(body, Mapping) else None
        if token is None and keep is not None:
            token = keep  # [I] a refresh that answers no token extends the one we hold
        if not isinstance(token, str) or not token:
            raise FatalPlatformError(f"{what}: the answer holds no token")
        register_secret(token)
        self._token = token
        self._token_expires = self._clock() + self._token_ttl

    async def ensure_token(self, valid_for: float = 0.0) -> None:
        """Make sure the token will still be valid ``valid_for`` seconds from now (plus the refresh margin):
        refresh it now if not. A caller about to pause (the poller) calls this so the token is refreshed with
        PATCH before it expires, rather than found expired (and replaced by a new login) after the pause."""
        await self._ensure_token(valid_for)

    async def _ensure_token(self, valid_for: float = 0.0) -> str:
        async with self._auth_lock:
            if self._token is None:
                await self._login()
            elif self._clock() + valid_for >= self._token_expires - self._refresh_margin:
                if self._clock() >= self._token_expires:
                    await self._login()  # expired: a refresh would be refused
                else:
                    await self._refresh()
            assert self._token is not None
            return self._token

    # -- calls -----------------------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, endpoint: str, *, params: Mapping[str, str] | None = None
    ) -> tuple[HttpAnswer, str]:
        """One authenticated call; a 401 (token revoked or expired early) logs in again once."""
        url = self._base_url + path
        what = describe_request(method, url, endpoint=endpoint)
        session = self._get_session()
        for attempt in (1, 2):
            token = await self._ensure_token()
            answer = await fetch(
                session,
                method,
                url,
                what,
                timeout_seconds=self._timeout,
                params=params,
                headers={_TOKEN_HEADER: token},
            )
            if answer.status != 401 or attempt == 2:
                return answer, what
            async with self._auth_lock:
                if self._token == token:  # nobody has replaced it meanwhile
                    self._token = None
        raise AssertionError("unreachable")

    def _checked(self, answer: HttpAnswer, what: str, *, not_found: str | None = None) -> Any:
        """The parsed body of a 2xx; otherwise the error the status calls for (see the module docstring)."""
        status = answer.status
        if 200 <= status < 300:
            return answer.json()
        _, message = error_message(answer.raw, status)
        text = f"{what}: HTTP {status}: {message}"
        if status == 401:
            raise FatalPlatformError(f"{text} (the token was refused even after a new login)", status=status)
        if status == 403:
            raise FatalPlatformError(
                f"{text} (the Meiro user lacks a feature this call needs)", status=status
            )
        if status == 404:
            raise FatalPlatformError(
                f"{not_found}: {message}" if not_found else f"{text} (check --base-url)", status=404
            )
        if status == 405:
            raise FatalPlatformError(f"{text} (check --base-url)", status=status)
        if status in (408, 429) or status >= 500:
            raise RetryableError(
                text, status=status, retry_after=answer.retry_after, remaining=answer.remaining
            )
        raise RejectedBatchError(text, status=status)

    async def list_exports(
        self, notification_id: str, *, limit: int | None = None, offset: int | None = None
    ) -> ExportPage:
        """``GET push_notifications/{id}/exports``: newest first; Meiro's default limit is 20."""
        params = {k: str(v) for k, v in (("limit", limit), ("offset", offset)) if v is not None}
        answer, what = await self._call(
            "GET",
            f"push_notifications/{quote(notification_id, safe='')}/exports",
            "listExports",
            params=params,
        )
        body = self._checked(answer, what, not_found=f"push notification {notification_id} was not found")
        items = body.get("push_notification_exports") if isinstance(body, Mapping) else None
        if not isinstance(items, list):
            raise RetryableError(
                f"{what}: the answer holds no push_notification_exports list", status=answer.status
            )
        settings = body.get("selection_settings") or {}
        return ExportPage(
            exports=tuple(Export.from_api(item) for item in items if isinstance(item, Mapping)),
            limit=settings.get("limit") if isinstance(settings.get("limit"), int) else limit,
            offset=settings.get("offset") if isinstance(settings.get("offset"), int) else offset,
        )

    async def iter_exports(self, notification_id: str, *, page_size: int = 20) -> AsyncIterator[Export]:
        """Every export, newest first, page by page (limit/offset) until a short page.

        An export created while we page pushes the older ones one place down, so the next page would repeat
        one: exports already yielded are skipped by ID."""
        offset = 0
        seen: set[int] = set()
        while True:
            page = await self.list_exports(notification_id, limit=page_size, offset=offset)
            for export in page.exports:
                if export.id not in seen:
                    seen.add(export.id)
                    yield export
            if len(page.exports) < page_size:
                return
            offset += page_size

    def _export_path(self, notification_id: str, export_id: int) -> str:
        return f"push_notifications/{quote(notification_id, safe='')}/exports/{int(export_id)}"

    async def get_export(self, notification_id: str, export_id: int) -> Export:
        """``GET push_notifications/{id}/exports/{export_id}``."""
        answer, what = await self._call("GET", self._export_path(notification_id, export_id), "getExport")
        body = self._checked(
            answer, what, not_found=f"export {export_id} of push notification {notification_id} was not found"
        )
        return self._export_of(body, what, answer.status)

    async def cancel_export(self, notification_id: str, export_id: int) -> Export:
        """``DELETE push_notifications/{id}/exports/{export_id}``: cancel a waiting or running export.

        A finished export cannot be canceled: Meiro answers 400, raised as :class:`RejectedBatchError` with
        code ``"export_finished"`` and a message saying so."""
        answer, what = await self._call(
            "DELETE", self._export_path(notification_id, export_id), "cancelExport"
        )
        if answer.status == 400:
            _, message = error_message(answer.raw, 400)
            if "finished" in message.lower():
                raise RejectedBatchError(
                    f"export {export_id} of push notification {notification_id} is already finished; "
                    f"it cannot be canceled (Meiro: {message})",
                    status=400,
                    code="export_finished",
                )
        body = self._checked(
            answer, what, not_found=f"export {export_id} of push notification {notification_id} was not found"
        )
        return self._export_of(body, what, answer.status)

    @staticmethod
    def _export_of(body: Any, what: str, status: int) -> Export:
        item = body.get("push_notification_export") if isinstance(body, Mapping) else None
        if not isinstance(item, Mapping):
            raise RetryableError(f"{what}: the answer holds no push_notification_export", status=status)
        try:
            return Export.from_api(item)
        except ValueError as exc:
            raise RetryableError(f"{what}: {exc}", status=status) from exc

    async def list_trash(
        self, *, limit: int | None = None, offset: int | None = None, searched_text: str | None = None
    ) -> TrashPage:
        """``GET push_notifications/trash``: trashed push notifications, optionally searched by name."""
        params = {
            k: str(v)
            for k, v in (("limit", limit), ("offset", offset), ("searched_text", searched_text))
            if v is not None
        }
        answer, what = await self._call("GET", "push_notifications/trash", "listTrash", params=params)
        body = self._checked(answer, what)
        items = body.get("trashed_push_notifications") if isinstance(body, Mapping) else None
        if not isinstance(items, list):
            raise RetryableError(
                f"{what}: the answer holds no trashed_push_notifications list", status=answer.status
            )
        settings = body.get("selection_settings") or {}
        return TrashPage(
            items=tuple(TrashedNotification.from_api(i) for i in items if isinstance(i, Mapping)),
            limit=settings.get("limit") if isinstance(settings.get("limit"), int) else limit,
            offset=settings.get("offset") if isinstance(settings.get("offset"), int) else offset,
            searched_text=settings.get("searched_text", searched_text),
        )

    async def iter_trash(
        self, *, searched_text: str | None = None, page_size: int = 20
    ) -> AsyncIterator[TrashedNotification]:
        """Every trashed push notification (matching ``searched_text``), page by page; repeats (the trash
        changing while we page) are skipped by ID."""
        offset = 0
        seen: set[str] = set()
        while True:
            page = await self.list_trash(limit=page_size, offset=offset, searched_text=searched_text)
            for item in page.items:
                if item.id not in seen:
                    seen.add(item.id)
                    yield item
            if len(page.items) < page_size:
                return
            offset += page_size

    async def restore(self, notification_id: str) -> TrashedNotification:
        """``PATCH push_notifications/trash/{id}``: take a push notification out of the trash."""
        answer, what = await self._call(
            "PATCH", f"push_notifications/trash/{quote(notification_id, safe='')}", "restoreTrash"
        )
        body = self._checked(
            answer, what, not_found=f"push notification {notification_id} is not in the trash"
        )
        item = body.get("push_notification") if isinstance(body, Mapping) else None
        if not isinstance(item, Mapping):
            raise RetryableError(f"{what}: the answer holds no push_notification", status=answer.status)
        return TrashedNotification.from_api(item)
