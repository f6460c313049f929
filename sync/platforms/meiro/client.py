"""The Meiro CDP connector: login, token refresh, push-notification exports and the trash.

Transport and the common status mapping are :mod:`sync.platforms._http`'s; what is Meiro's own is the
``X-Access-Token`` header and its renewal, the ``{"message"}`` error bodies, and the cases below that read a
status in the light of the call:

=====================================================  ==========================================================
answer                                                 raised
=====================================================  ==========================================================
2xx                                                    (parsed into :mod:`sync.platforms.meiro` records)
2xx with a body that is not JSON (a proxy's page)      :class:`RetryableError`
3xx (never followed: the password would go along)      :class:`FatalPlatformError`
401 on login                                           :class:`FatalPlatformError` "check MEIRO_EMAIL/password"
401 on a call                                          log in again once, repeat the call; then fatal
403                                                    :class:`FatalPlatformError` naming the missing feature
404 on an export / a trashed notification              :class:`FatalPlatformError` "... not found" (status 404)
4xx on cancel of an export that has ended              :class:`RejectedBatchError` "export N is already finished"
(or 200 answering it ``finished``/``error``)           (or "... ended in error", "... is already canceled"),
                                                       code ``export_finished``: its status is read to say which
other 4xx                                              :class:`RejectedBatchError` with Meiro's message
408, 429, 5xx, time-outs, dropped connections          :class:`RetryableError` (``retry_after`` parsed)
=====================================================  ==========================================================

The token (valid 8 h [D]) is refreshed with ``PATCH users/login`` once less than ``refresh_margin`` of its life
is left, judged on an injectable clock; a refresh refused with 401 falls back to a new login. Neither the
password nor any token ever appears in a message (both are registered with :mod:`sync.redact`).

Listings (:meth:`MeiroClient.iter_exports`, :meth:`MeiroClient.iter_trash`) page until nothing follows: Meiro names
no largest ``limit``, so a short page may be a capped one rather than the last; each page overlaps the one before
by an item, so items removed between two requests skip no other (:func:`_unique`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import quote

from sync.errors import FatalPlatformError, PlatformError, RejectedBatchError, RetryableError
from sync.platforms._http import (
    AnswerPolicy,
    ErrorBody,
    HttpAnswer,
    HttpClient,
    HttpSession,
    bounded,
    json_error,
)
from sync.platforms.meiro import (
    PLATFORM,
    TOKEN_TTL,
    Export,
    ExportPage,
    ExportStatus,
    TrashedNotification,
    TrashPage,
)
from sync.redact import register_secret

__all__ = ["MeiroClient", "MeiroCredentials"]

_TOKEN_HEADER = "X-Access-Token"
_T = TypeVar("_T")


def _read_error(raw: bytes, status: int) -> ErrorBody:
    # Meiro's ``{"message"}`` carries no code worth keeping: errors say what happened in words.
    return ErrorBody(json_error(raw, status)[1])


_ANSWERS = AnswerPolicy(
    _read_error,
    hints={
        401: "the token was refused even after a new login",
        403: "the Meiro user lacks a feature this call needs",
    },
    base_url_hint="check --base-url",  # the Meiro commands take the URL as an option, not from a job file
    rejection_names_request=True,  # one-off commands, not batches in a ledger: the message names the call
)
_LOGIN_ANSWERS = replace(_ANSWERS, hints={**_ANSWERS.hints, 401: "check the Meiro e-mail and password"})


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


class MeiroClient(HttpClient):
    """Talks to one Meiro instance (or its sandbox). Use ``async with`` or call :meth:`aclose`.

    ``base_url`` ends in ``/api/`` (``https://<instance>.meiro.io/api/``). ``clock`` is wall time in seconds
    (injectable: token expiry is judged on it). One HTTP session for the client's lifetime.
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
        base_url_hint: str = "check --base-url",
    ) -> None:
        self._session = HttpSession(
            base_url,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            timeout=timeout,
            verify_tls=verify_tls,
        )
        self._credentials = credentials
        # What a refusal blaming the base URL (a 404 of the API, a redirect) tells to check: the option of the
        # one-off commands, or the job file's base_url for `meiro run`.
        self._answers = replace(_ANSWERS, base_url_hint=base_url_hint)
        self._login_answers = replace(_LOGIN_ANSWERS, base_url_hint=base_url_hint)
        self._clock = clock
        self._token_ttl = token_ttl
        self._refresh_margin = min(refresh_margin, token_ttl / 2)
        self._token: str | None = None
        self._token_expires = 0.0  # clock time the current token stops working
        self._auth_lock = asyncio.Lock()  # one login/refresh at a time when calls run concurrently
        self.logins = 0
        self.refreshes = 0

    @property
    def token_expires_at(self) -> float:
        """Clock time the current token expires (0 before the first login)."""
        return self._token_expires

    # -- authentication --------------------------------------------------------------------------------

    async def login(self) -> None:
        """``POST users/login``; keeps the token for the following calls."""
        async with self._auth_lock:
            await self._login()

    async def _login(self) -> None:
        body = {"email": self._credentials.email, "password": self._credentials.password}
        answer = await self._session.request("POST", "users/login", endpoint="login", json_body=body)
        self._accept_token(self._checked(answer, answers=self._login_answers), answer.what)
        self.logins += 1

    async def refresh(self) -> None:
        """``PATCH users/login``: a fresh 8 h token (log in again if the server no longer knows the old one)."""
        async with self._auth_lock:
            await self._refresh()

    async def _refresh(self) -> None:
        if self._token is None:
            await self._login()
            return
        answer = await self._session.request(
            "PATCH", "users/login", endpoint="refresh", headers={_TOKEN_HEADER: self._token}
        )
        if answer.status == 401:
            await self._login()
            return
        self._accept_token(self._checked(answer), answer.what, keep=self._token)
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
    ) -> HttpAnswer:
        """One authenticated call; a 401 (token revoked or expired early) logs in again once."""
        for attempt in (1, 2):
            token = await self._ensure_token()
            answer = await self._session.request(
                method, path, endpoint=endpoint, params=params, headers={_TOKEN_HEADER: token}
            )
            if answer.status != 401 or attempt == 2:
                return answer
            async with self._auth_lock:
                if self._token == token:  # nobody has replaced it meanwhile
                    self._token = None
        raise AssertionError("unreachable")

    def _checked(
        self, answer: HttpAnswer, *, not_found: str | None = None, answers: AnswerPolicy | None = None
    ) -> Any:
        """The parsed body of a 2xx; otherwise the error the status calls for (see the module docstring).

        ``not_found`` names what a 404 means for this call (an export, a trashed notification) instead of
        blaming the base URL."""
        if answer.ok:
            return answer.expect_json()
        if answer.status == 404 and not_found:
            raise FatalPlatformError(f"{not_found}: {_read_error(answer.raw, 404).message}", status=404)
        raise (answers or self._answers).error(answer)

    async def _page(
        self,
        path: str,
        endpoint: str,
        key: str,
        params: Mapping[str, str],
        parse: Callable[[Mapping[str, Any]], _T],
        *,
        not_found: str | None = None,
    ) -> tuple[tuple[_T, ...], Mapping[str, Any]]:
        """One listing page: the items under ``key``, each parsed, and Meiro's ``selection_settings``."""
        answer = await self._call("GET", path, endpoint, params=params)
        body = self._checked(answer, not_found=not_found)
        items = body.get(key) if isinstance(body, Mapping) else None
        if not isinstance(items, list):
            raise RetryableError(f"{answer.what}: the answer holds no {key} list", status=answer.status)
        settings = body.get("selection_settings") or {}
        try:
            parsed = tuple(parse(item) for item in items if isinstance(item, Mapping))
        except ValueError as exc:
            # An item we cannot read (an export status the document does not list...) is an answer we cannot
            # use, as for a single export: it escaped as a ValueError, a traceback (and `meiro run` crashed,
            # leaving its run "running").
            raise RetryableError(f"{answer.what}: {bounded(str(exc))}", status=answer.status) from exc
        return parsed, settings

    async def list_exports(
        self, notification_id: str, *, limit: int | None = None, offset: int | None = None
    ) -> ExportPage:
        """``GET push_notifications/{id}/exports``: newest first; Meiro's default limit is 20."""
        items, settings = await self._page(
            f"push_notifications/{quote(notification_id, safe='')}/exports",
            "listExports",
            "push_notification_exports",
            _params(limit=limit, offset=offset),
            Export.from_api,
            not_found=f"push notification {notification_id} was not found",
        )
        return ExportPage(
            exports=items,
            limit=_int_setting(settings, "limit", limit),
            offset=_int_setting(settings, "offset", offset),
        )

    async def iter_exports(
        self, notification_id: str, *, page_size: int = 20, offset: int = 0
    ) -> AsyncIterator[Export]:
        """Every export from ``offset`` on (0: all), newest first, page by page (limit/offset) until the end.

        ``page_size`` is the ``limit`` asked for; a server may serve fewer per page (Meiro names no maximum),
        so the next offset is where the last page ended and only an empty page ends the listing. An export
        created while we page pushes the older ones one place down, so the next page would repeat one:
        exports already yielded are skipped by ID."""

        async def page(offset: int) -> Sequence[Export]:
            return (await self.list_exports(notification_id, limit=page_size, offset=offset)).exports

        async for export in _unique(page, lambda export: export.id, start=offset):
            yield export

    def _export_path(self, notification_id: str, export_id: int) -> str:
        return f"push_notifications/{quote(notification_id, safe='')}/exports/{int(export_id)}"

    async def get_export(self, notification_id: str, export_id: int) -> Export:
        """``GET push_notifications/{id}/exports/{export_id}``."""
        answer = await self._call("GET", self._export_path(notification_id, export_id), "getExport")
        body = self._checked(
            answer, not_found=f"export {export_id} of push notification {notification_id} was not found"
        )
        return self._export_of(body, answer)

    async def cancel_export(self, notification_id: str, export_id: int) -> Export:
        """``DELETE push_notifications/{id}/exports/{export_id}``: cancel a waiting or running export.

        Returns the export as Meiro answers it: ``canceled``, or still ``waiting``/``running`` when the cancel
        was accepted but the export has not stopped yet. An export that has already ended (finished, error,
        canceled) cannot be canceled: Meiro documents 400 for a finished one, and since a server may word (or
        not give) the refusal otherwise, the export's status is read to say which. Raised as
        :class:`RejectedBatchError` with code ``"export_finished"`` and a message naming the status; so is a
        2xx that answers the export ``finished`` or ``error`` (the cancel changed nothing)."""
        answer = await self._call("DELETE", self._export_path(notification_id, export_id), "cancelExport")
        if not answer.ok and answer.status != 404:
            refusal = self._answers.error(answer)
            if isinstance(refusal, RejectedBatchError):
                raise await self._cancel_refused(notification_id, export_id, refusal, answer)
        body = self._checked(
            answer, not_found=f"export {export_id} of push notification {notification_id} was not found"
        )
        export = self._export_of(body, answer)
        if export.status in (ExportStatus.FINISHED, ExportStatus.ERROR):
            raise _already_ended(notification_id, export_id, export.status, None, answer.status)
        return export

    async def _cancel_refused(
        self, notification_id: str, export_id: int, refusal: RejectedBatchError, answer: HttpAnswer
    ) -> RejectedBatchError:
        """The error for a refused cancel: "already ended" when the export has, else Meiro's own refusal."""
        meiro_says = _read_error(answer.raw, answer.status).message
        try:
            status: ExportStatus | None = (await self.get_export(notification_id, export_id)).status
        except PlatformError:
            # The refusal stands on its own; the documented wording still tells a finished export apart.
            status = ExportStatus.FINISHED if "finished" in meiro_says.lower() else None
        if status is None or not status.terminal:
            return refusal
        return _already_ended(notification_id, export_id, status, meiro_says, answer.status)

    @staticmethod
    def _export_of(body: Any, answer: HttpAnswer) -> Export:
        item = body.get("push_notification_export") if isinstance(body, Mapping) else None
        if not isinstance(item, Mapping):
            raise RetryableError(
                f"{answer.what}: the answer holds no push_notification_export", status=answer.status
            )
        try:
            return Export.from_api(item)
        except ValueError as exc:
            # The reason quotes what the server sent (an unknown status...): bounded and masked like any message.
            raise RetryableError(f"{answer.what}: {bounded(str(exc))}", status=answer.status) from exc

    async def list_trash(
        self, *, limit: int | None = None, offset: int | None = None, searched_text: str | None = None
    ) -> TrashPage:
        """``GET push_notifications/trash``: trashed push notifications, optionally searched by name."""
        items, settings = await self._page(
            "push_notifications/trash",
            "listTrash",
            "trashed_push_notifications",
            _params(limit=limit, offset=offset, searched_text=searched_text),
            TrashedNotification.from_api,
        )
        return TrashPage(
            items=items,
            limit=_int_setting(settings, "limit", limit),
            offset=_int_setting(settings, "offset", offset),
            searched_text=settings.get("searched_text", searched_text),
        )

    async def iter_trash(
        self, *, searched_text: str | None = None, page_size: int = 20, offset: int = 0
    ) -> AsyncIterator[TrashedNotification]:
        """Every trashed push notification (matching ``searched_text``) from ``offset`` on, page by page until
        the end (as :meth:`iter_exports`); repeats (the trash changing while we page) are skipped by ID."""

        async def page(offset: int) -> Sequence[TrashedNotification]:
            return (await self.list_trash(limit=page_size, offset=offset, searched_text=searched_text)).items

        async for item in _unique(page, lambda item: item.id, start=offset):
            yield item

    async def restore(self, notification_id: str) -> TrashedNotification:
        """``PATCH push_notifications/trash/{id}``: take a push notification out of the trash."""
        answer = await self._call(
            "PATCH", f"push_notifications/trash/{quote(notification_id, safe='')}", "restoreTrash"
        )
        body = self._checked(answer, not_found=f"push notification {notification_id} is not in the trash")
        item = body.get("push_notification") if isinstance(body, Mapping) else None
        if not isinstance(item, Mapping):
            raise RetryableError(
                f"{answer.what}: the answer holds no push_notification", status=answer.status
            )
        return TrashedNotification.from_api(item)


def _already_ended(
    notification_id: str, export_id: int, status: ExportStatus, meiro_says: str | None, http_status: int
) -> RejectedBatchError:
    what = f"export {export_id} of push notification {notification_id}"
    if status is ExportStatus.CANCELED:
        text = f"{what} is already canceled; there is nothing to cancel"
    elif status is ExportStatus.ERROR:
        text = f"{what} already ended in error; it cannot be canceled"
    else:
        text = f"{what} is already finished; it cannot be canceled"
    if meiro_says:
        text += f" (Meiro: {meiro_says})"
    return RejectedBatchError(text, status=http_status, code="export_finished")


def _params(**values: object) -> dict[str, str]:
    """Query parameters from the keyword arguments that are set."""
    return {name: str(value) for name, value in values.items() if value is not None}


def _int_setting(settings: Mapping[str, Any], name: str, asked: int | None) -> int | None:
    """Meiro's echo of a paging setting when it is an int, else what we asked for."""
    value = settings.get(name)
    return value if isinstance(value, int) else asked


async def _unique(
    page: Callable[[int], Awaitable[Sequence[_T]]], key: Callable[[_T], Hashable], *, start: int = 0
) -> AsyncIterator[_T]:
    """Every item of a limit/offset listing from offset ``start`` on, each ``key`` once, page by page.

    A page shorter than the ``limit`` asked for does not mean the end: Meiro names no maximum ``limit``, and
    a server that caps it (echoing the cap in ``selection_settings``, or not at all) serves short pages all
    along. So each page starts where the last one ended — one item early, on the last item already listed (the
    anchor), which tells whether the listing moved between the two requests:

    * the anchor on the new page: nothing was lost. Items added above it since (an export created, a
      notification trashed) push it down and bring back items already listed: keys already yielded are
      skipped;
    * the anchor not on the new page: items above it were removed meanwhile (a notification restored from the
      trash), everything after moved up, and the items that moved past the offset would be skipped. The
      listing steps back a page at a time until it finds the anchor again, or starts over at ``start`` (when
      the anchor itself went);
    * only the anchor (nothing after it): the end of the listing, one request after the last page.

    A server that ignores ``offset`` answers every request with the first page again: three such answers in a
    row, with nothing new, end the listing (a listing gaining items at the top exactly as fast as it is paged
    would look the same, three requests running). A page of one item cannot overlap: the next offset is right
    after it, and a page of one that brings nothing new ends the listing."""
    offset = start
    step = 0  # how far the last forward move went: a step back goes as far
    anchor: Hashable | None = None
    first: list[Hashable] | None = None  # the keys of the first page
    again = 0  # answers in a row that were the first page again, with nothing new
    seen: set[Hashable] = set()
    while True:
        items = await page(offset)
        keys = [key(item) for item in items]
        if anchor is not None and offset > start and anchor not in keys:
            offset = max(start, offset - max(step, 1))  # items above the anchor were removed: look further up
            continue
        fresh = 0
        for item, item_key in zip(items, keys, strict=True):
            if item_key not in seen:
                seen.add(item_key)
                fresh += 1
                yield item
        if not keys or keys == [anchor]:
            return
        if first is None:
            first = keys
        again = again + 1 if offset > start and not fresh and keys == first else 0
        if again >= 3:
            return
        if len(keys) >= 2:
            anchor, step = keys[-1], len(keys) - 1
        elif fresh:
            anchor, step = None, 1
        else:
            return
        offset += step
