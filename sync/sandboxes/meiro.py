"""A strict, stateful local emulator of the Meiro CDP API: login, push-notification exports and the trash
(seed 002, ``platforms.md`` §3; see ``docs/meiro.md``).

Routes under ``/api/`` (route names are the endpoint names used for limits, faults and stats)::

    POST   users/login                                       login      {"email","password"} → {"token"}
    PATCH  users/login                                       refresh    → {"token"} (valid token required)
    GET    push_notifications/{id}/exports?limit&offset      listExports   (push_notifications/view)
    GET    push_notifications/{id}/exports/{export_id}       getExport     (push_notifications/view)
    DELETE push_notifications/{id}/exports/{export_id}       cancelExport  (push_notifications/edit; 400 once ended)
    GET    push_notifications/trash?limit&offset&searched_text  listTrash  (push_notifications/view [I])
    PATCH  push_notifications/trash/{id}                     restoreTrash  (push_notifications/edit)

Every call but ``login`` needs ``X-Access-Token`` (missing, unknown or expired → 401); a user without one of the
endpoint's features gets 403. Error bodies are ``{"message": "..."}``. ``max_limit`` caps page sizes and
``cancel_delay`` makes a cancel take effect later, as a server may that the document leaves room for. Rate limits, faults, stats and the
``/_sandbox/`` inspection routes come from :mod:`._core`. Choices where Meiro documents nothing are marked [I]
and are :class:`MeiroSandboxConfig` fields.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from aiohttp import web

from sync.platforms.meiro import EDIT_FEATURE, TOKEN_TTL, VIEW_FEATURE, ExportStatus
from sync.sandboxes._base import PlatformSandbox, SandboxSettings
from sync.sandboxes._command import PASSWORD_ENV, Built, SandboxCommand
from sync.sandboxes._core import ApiError, FaultKind, json_response, loads_json
from sync.sandboxes.meiro_state import MeiroState, Progression, SandboxExport

__all__ = [
    "API_PREFIX",
    "DEFAULT_FEATURES",
    "MeiroSandbox",
    "MeiroSandboxConfig",
    "MeiroUser",
    "Progression",
]

API_PREFIX = "/api/"
ALL_FEATURES = frozenset({VIEW_FEATURE, EDIT_FEATURE})

DEFAULT_FEATURES: Mapping[str, tuple[str, ...]] = {
    "listExports": (VIEW_FEATURE,),
    "getExport": (VIEW_FEATURE,),
    "cancelExport": (EDIT_FEATURE,),
    "listTrash": (VIEW_FEATURE,),  # [I] the seed names no feature for the trash list
    "restoreTrash": (EDIT_FEATURE,),
}
"""Endpoint → the features of which a user needs one [D, except listTrash]."""

EXPORT_NOT_FOUND = "Push notification export not found"
_DIGITS = re.compile(r"[0-9]+")
"""An ID or a count in a URL: ASCII digits. ``str.isdigit`` and ``int()`` also take ``²`` (which ``int()`` then
refuses: a 500) or ``١٠٠`` (read as 100), which a strict server does not."""
FINISHED_NOT_CANCELABLE = "Finished export cannot be canceled"


@dataclass(frozen=True, slots=True)
class MeiroUser:
    """A user who can log in, with the features (permissions) granted to them."""

    email: str
    password: str
    features: frozenset[str] = ALL_FEATURES
    id: int = 1

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> MeiroUser:
        features = data.get("features")
        return cls(
            email=str(data["email"]),
            password=str(data["password"]),
            features=ALL_FEATURES if features is None else frozenset(str(f) for f in features),
            id=int(data.get("id", 1)),
        )


@dataclass(frozen=True, slots=True)
class MeiroSandboxConfig(SandboxSettings):
    """Everything a Meiro sandbox can be told; :meth:`from_mapping` builds it from YAML/JSON.

    Also ``limits`` (per endpoint name or ``"*"`` [I: Meiro documents none]; off by default), ``faults``,
    ``seed``, ``stats_window`` and ``seed_file`` (JSON in the shape of :meth:`MeiroState.load`) from
    :class:`SandboxSettings`.
    """

    users: tuple[MeiroUser, ...] = (MeiroUser("sandbox@meiro.local", "sandbox-password"),)
    token_ttl: float = TOKEN_TTL
    """Seconds a token stays valid after login or refresh [D: 8 h]."""
    refresh_rotates: bool = True
    """[I] PATCH users/login answers a new token (the old one stops working); False: the same token, extended."""
    progression: Progression = Progression.POLLS
    waiting: float = 1.0
    """Polls (or seconds) a new export stays ``waiting`` [I]."""
    running: float = 3.0
    """Polls (or seconds) an export stays ``running`` [I]."""
    features: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_FEATURES))
    default_limit: int = 20
    """``limit`` when none is given [D: 20]."""
    max_limit: int | None = None
    """[I] The largest ``limit`` served: a larger one is capped and the cap echoed in ``selection_settings``
    (the document names no maximum, so a client must page by the echo; None: no cap)."""
    cancel_delay: float = 0.0
    """[I] Polls (or seconds) a canceled export keeps its status before it is ``canceled``: the DELETE then
    answers it still ``waiting``/``running``. 0: canceled at once."""

    _label: ClassVar[str] = "Meiro sandbox"
    _enums: ClassVar[Mapping[str, type[StrEnum]]] = {"progression": Progression}

    @classmethod
    def _convert(cls, kwargs: dict[str, Any]) -> None:
        if "users" in kwargs:
            kwargs["users"] = tuple(
                u if isinstance(u, MeiroUser) else MeiroUser.from_mapping(u) for u in kwargs["users"]
            )
        if "features" in kwargs:  # the document's features change the defaults, endpoint by endpoint
            kwargs["features"] = {
                **DEFAULT_FEATURES,
                **{str(k): tuple(v) for k, v in dict(kwargs["features"]).items()},
            }
        max_limit = kwargs.get("max_limit")
        if max_limit is not None and (
            isinstance(max_limit, bool) or not isinstance(max_limit, int) or max_limit < 1
        ):
            raise ValueError(f"max_limit must be a positive integer or null, not {max_limit!r}")
        cancel_delay = kwargs.get("cancel_delay", 0.0)
        if isinstance(cancel_delay, bool) or not isinstance(cancel_delay, int | float) or cancel_delay < 0:
            raise ValueError(f"cancel_delay must be a non-negative number, not {cancel_delay!r}")


_USER = web.RequestKey("meiro_user", MeiroUser)  # who the token belongs to, set by _authenticate
_TOKEN = web.RequestKey("meiro_token", str)  # the token the request came with (PATCH refresh needs it)


@dataclass(slots=True)
class _Token:
    user: MeiroUser
    expires_at: float


class MeiroSandbox(PlatformSandbox[MeiroSandboxConfig, MeiroState]):
    """The Meiro emulator: ``await sandbox.start(host, port)`` returns the base URL (ending ``/api/``).

    ``state`` is the live :class:`MeiroState`; ``stats`` the counters; ``configure`` changes limits and faults.
    """

    api_prefix = API_PREFIX

    def __init__(
        self,
        config: MeiroSandboxConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        config = config or MeiroSandboxConfig()
        self._users = {u.email: u for u in config.users}
        self._tokens: dict[str, _Token] = {}  # token → whose it is and until when it is valid
        super().__init__(
            config,
            MeiroState(
                clock,
                progression=config.progression,
                waiting=config.waiting,
                running=config.running,
                cancel_delay=config.cancel_delay,
            ),
            clock=clock,
            sleep=sleep,
            rate_limit_error=lambda adm: ApiError(
                429, 429, f"Too many requests; retry in {adm.retry_after} s"
            ),
            fault_error=_fault_error,
        )

    def revoke_tokens(self) -> None:
        """Forget every issued token (as a server restart would): clients must log in again."""
        self._tokens.clear()

    # -- plumbing --------------------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        r = app.router
        exports = API_PREFIX + "push_notifications/{notification_id}/exports"
        r.add_post(API_PREFIX + "users/login", self._login, name="login")
        r.add_patch(API_PREFIX + "users/login", self._refresh, name="refresh")
        r.add_get(
            API_PREFIX + "push_notifications/trash", self._list_trash, name="listTrash", allow_head=False
        )
        r.add_patch(
            API_PREFIX + "push_notifications/trash/{notification_id}", self._restore, name="restoreTrash"
        )
        r.add_get(exports, self._list_exports, name="listExports", allow_head=False)
        r.add_get(exports + "/{export_id}", self._get_export, name="getExport", allow_head=False)
        r.add_delete(exports + "/{export_id}", self._cancel_export, name="cancelExport")

    def _authenticate(self, request: web.Request) -> str:
        """Token check and feature check; returns the user's e-mail (the rate-limit key)."""
        endpoint = request.match_info.route.name or ""
        if endpoint == "login":
            return "login"  # logins are limited together, whoever attempts them
        token = request.headers.get("X-Access-Token")
        if not token:
            raise ApiError(401, None, "Missing X-Access-Token header")
        held = self._tokens.get(token)
        if held is None:
            raise ApiError(401, None, "Invalid access token")
        if self._clock() >= held.expires_at:
            del self._tokens[token]
            raise ApiError(401, None, "Access token expired")
        required = self.config.features.get(endpoint, ())
        if required and not held.user.features.intersection(required):
            raise ApiError(403, None, f"Missing feature: one of {', '.join(required)} is required")
        request[_USER] = held.user
        request[_TOKEN] = token
        return held.user.email

    def _render_error(self, error: ApiError) -> web.StreamResponse:
        return json_response({"message": error.message}, status=error.status, headers=error.headers)

    def _issue(self, user: MeiroUser) -> str:
        token = secrets.token_hex(20)
        self._tokens[token] = _Token(user, self._clock() + self.config.token_ttl)
        return token

    async def _json_object(self, request: web.Request) -> dict[str, Any]:
        try:
            body = loads_json(await request.read())
        except ValueError:  # also UnicodeDecodeError, NaN and Infinity
            raise ApiError(400, None, "Invalid JSON body") from None
        if not isinstance(body, dict):
            raise ApiError(400, None, "The body must be a JSON object")
        return body

    async def _login(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_object(request)
        email, password = body.get("email"), body.get("password")
        if not isinstance(email, str) or not email or not isinstance(password, str) or not password:
            raise ApiError(400, None, "email and password are required")
        user = self._users.get(email)
        if user is None or not hmac.compare_digest(password.encode(), user.password.encode()):
            raise ApiError(401, None, "Invalid email or password")
        return json_response({"token": self._issue(user)})

    async def _refresh(self, request: web.Request) -> web.StreamResponse:
        token = request[_TOKEN]
        held = self._tokens[token]
        if self.config.refresh_rotates:
            del self._tokens[token]
            return json_response({"token": self._issue(held.user)})
        held.expires_at = self._clock() + self.config.token_ttl
        return json_response({"token": token})

    def _query_int(self, request: web.Request, name: str) -> int | None:
        raw = request.query.get(name)
        if raw is None or raw == "":
            return None
        if not _DIGITS.fullmatch(raw):
            raise ApiError(400, None, f"{name} must be a non-negative integer")
        return int(raw)

    def _page_size(self, limit: int | None) -> int:
        """The ``limit`` served: the default when none is asked, capped at ``max_limit`` [I]."""
        size = self.config.default_limit if limit is None else limit
        cap = self.config.max_limit
        return size if cap is None else min(size, cap)

    def _export(self, request: web.Request) -> tuple[str, SandboxExport]:
        notification = self.state.live(request.match_info["notification_id"])
        raw_id = request.match_info["export_id"]
        export = None
        if notification is not None and _DIGITS.fullmatch(raw_id):
            export = notification.exports.get(int(raw_id))
        if notification is None or export is None:
            raise ApiError(404, None, EXPORT_NOT_FOUND)
        return notification.name, export

    async def _list_exports(self, request: web.Request) -> web.StreamResponse:
        limit = self._query_int(request, "limit")
        offset = self._query_int(request, "offset")
        notification = self.state.live(request.match_info["notification_id"])
        if notification is None:
            raise ApiError(404, None, "Push notification not found")  # [I] message
        items = self.state.exports_newest_first(notification)
        size = self._page_size(limit)
        start = offset or 0
        return json_response(
            {
                "push_notification_exports": [
                    e.to_api(notification.name) for e in items[start : start + size]
                ],
                "selection_settings": {"limit": size, "offset": offset},
            }
        )

    async def _get_export(self, request: web.Request) -> web.StreamResponse:
        name, export = self._export(request)
        self.state.poll(export)
        return json_response({"push_notification_export": export.to_api(name)})

    async def _cancel_export(self, request: web.Request) -> web.StreamResponse:
        name, export = self._export(request)
        self.state.settle(export)
        if export.status is ExportStatus.FINISHED:
            raise ApiError(400, None, FINISHED_NOT_CANCELABLE)
        if export.status.terminal:
            # [I] the document refuses only a finished export; an export that has ended otherwise cannot be
            # canceled either, and a strict server says so in words of its own (a client must not rely on them)
            raise ApiError(400, None, f"Export with status {export.status} cannot be canceled")
        if self.state.cancel(export):
            self.core.stats.add_applied("cancelExport", 1)
        return json_response({"push_notification_export": export.to_api(name)})

    async def _list_trash(self, request: web.Request) -> web.StreamResponse:
        limit = self._query_int(request, "limit")
        offset = self._query_int(request, "offset")
        searched = request.query.get("searched_text") or None
        items = self.state.trash(searched)
        size = self._page_size(limit)
        start = offset or 0
        return json_response(
            {
                "trashed_push_notifications": [n.to_api() for n in items[start : start + size]],
                "selection_settings": {"limit": size, "offset": start, "searched_text": searched},
            }
        )

    async def _restore(self, request: web.Request) -> web.StreamResponse:
        notification = self.state.notifications.get(request.match_info["notification_id"])
        if notification is None or not notification.trashed:
            raise ApiError(404, None, "Trashed push notification not found")  # [I] message
        self.state.restore(notification)
        self.core.stats.add_applied("restoreTrash", 1)
        return json_response({"push_notification": notification.to_api()})


def _fault_error(kind: FaultKind) -> ApiError:
    if kind is FaultKind.ERROR_503:
        return ApiError(503, None, "Service unavailable")
    return ApiError(500, None, "Internal server error")


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--email", default="sandbox@meiro.local", help="the sandbox user (default sandbox@meiro.local)"
    )


def _command(args: argparse.Namespace, data: dict[str, Any], _creds: dict[str, str]) -> Built:
    # Unless the config lists its users, there is one: --email, with $MEIRO_SANDBOX_PASSWORD or a generated one.
    notes = []
    if "users" not in data:
        password = os.environ.get(PASSWORD_ENV, "").strip()
        if not password:
            password = secrets.token_urlsafe(18)
            notes.append(
                f"user {args.email}, password (generated, set {PASSWORD_ENV} to choose one): {password}"
            )
        data["users"] = [MeiroUser(args.email, password)]
    config = MeiroSandboxConfig.from_mapping(data, seed_file=args.seed_file)
    return MeiroSandbox(config), notes


SANDBOX_COMMAND = SandboxCommand(
    "meiro",
    "the Meiro CDP sandbox (login, push exports, trash)",
    _command,
    seed_help="push notifications and exports (JSON)",
    config_help="YAML/JSON: users, limits, faults, seed, progression...",
    options=_options,
)
"""``pushsync sandbox meiro``."""
