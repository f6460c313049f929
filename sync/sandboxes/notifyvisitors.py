"""A strict, stateful local emulator of the NotifyVisitors REST API v1 (see ``docs/notifyvisitors.md``).

``POST /api/v1/user/create`` and ``POST /api/v1/event/create`` are validated the way seed 004 documents them
and change an in-memory :class:`NotifyVisitorsState`. Every answer is the envelope
``{"response": {"data": {...}, "message": "...", "status": "success"|"error"}}``:

=====================================================  =========  ==============================================
request                                                HTTP       message
=====================================================  =========  ==============================================
neither valid ``x-api-key`` + ``x-brand-id`` nor a     401        ``invalid auth``
valid ``Authorization: Bearer``
path that is not an endpoint                           404        ``invalid URL``
wrong method                                           405        ``method not allowed``
bad JSON, > 100 users / > 1000 events, a field that    400 [1]    ``invalid resource: <where>: <what>``
breaks a documented rule
over the family's rate limit                           429        ``rate limit exceeded``
=====================================================  =========  ==============================================

[1] ``errors_in_body=True`` answers these with 200 and ``status: error`` instead [I] — a client must treat both
as a refusal. A request is all or nothing: the first bad item refuses it whole [I].

Rate limits are per API family and brand (User 100/min, Event 500/min, Campaign 500/min, Reporting 50/min by
default; ``limits={}`` turns them off), in clock-aligned minutes; every answer on a limited endpoint carries
``X-RateLimit-Remaining``. Faults, stats and ``/_sandbox/`` inspection come from :mod:`._core`.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
from aiohttp import web

from sync.platforms.notifyvisitors import (
    DATE_ATTRIBUTES,
    DATE_FORMAT,
    E164_PATTERN,
    EMAIL_PATTERN,
    EVENT_CREATE,
    FAMILY_OF,
    MAX_EVENTS_PER_REQUEST,
    MAX_NAME_LENGTH,
    MAX_STRING_LENGTH,
    MAX_USER_ID_LENGTH,
    MAX_USERS_PER_REQUEST,
    OPT_IN_ATTRIBUTES,
    RATE_LIMITS_PER_MINUTE,
    USER_CREATE,
)
from sync.platforms.notifyvisitors.requests import EVENT_TIME_FORMATS, write_time
from sync.sandboxes._base import PlatformSandbox, SandboxSettings, table
from sync.sandboxes._command import NV_KEY_ENV, NV_TOKEN_ENV, Built, Credential, SandboxCommand
from sync.sandboxes._core import ApiError, RateLimit, json_response, loads_json

__all__ = [
    "API_PREFIX",
    "DEFAULT_LIMITS",
    "NotifyVisitorsSandbox",
    "NotifyVisitorsSandboxConfig",
    "NotifyVisitorsState",
    "envelope",
]

API_PREFIX = "/api/v1/"
DEFAULT_LIMITS: Mapping[str, RateLimit] = {
    family: RateLimit(per_minute, 60.0) for family, per_minute in RATE_LIMITS_PER_MINUTE.items()
}
"""The documented defaults, per API family (the limiter's group buckets)."""

# Whole values (fullmatch): "$" alone would also take a text ending in a line break.
_E164 = re.compile(E164_PATTERN)
_EMAIL = re.compile(EMAIL_PATTERN)
_OPT_IN_VALUES = frozenset({"1", "0"})


@dataclass(frozen=True, slots=True)
class NotifyVisitorsSandboxConfig(SandboxSettings):
    """Everything a NotifyVisitors sandbox can be told. Build from YAML/JSON with :meth:`from_mapping`.

    ``faults``, ``seed``, ``stats_window`` and ``seed_file`` (JSON in the shape of ``GET /_sandbox/state``:
    ``users``, ``events``) come from :class:`SandboxSettings`.
    """

    limits: Mapping[str, RateLimit] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    """Per family (``user``, ``event``, ``campaign``, ``reporting``) or endpoint; ``{}`` turns limits off."""
    api_key: str = "nv-sandbox-key"
    brand_id: str = "1000"
    bearer_token: str | None = None
    """Access token accepted as ``Authorization: Bearer``; None refuses bearer authentication."""
    errors_in_body: bool = False
    """[I] Answer refusals of content with 200 + ``status: error`` instead of 400."""
    retry_after_header: bool = False
    """[I] Add ``Retry-After`` to 429s; NotifyVisitors documents only ``X-RateLimit-Remaining``."""
    event_time_format: str = "yyyy-MM-dd HH:mm:ss"
    """The one ``event_time`` form accepted: ``yyyy-MM-dd HH:mm:ss`` (the event API's page) or
    ``yyyy-MM-ddTHH:mm:ss`` (the general date-format note, without its offset)."""
    max_users_per_request: int = MAX_USERS_PER_REQUEST
    max_events_per_request: int = MAX_EVENTS_PER_REQUEST

    @classmethod
    def _convert(cls, kwargs: dict[str, Any]) -> None:
        for name in ("api_key", "brand_id", "bearer_token"):  # YAML reads 1000 as a number
            if kwargs.get(name) is not None:
                kwargs[name] = str(kwargs[name])


def envelope(status: str, message: str, data: Any = None) -> dict[str, Any]:
    """The NotifyVisitors answer container."""
    return {"response": {"data": {} if data is None else data, "message": message, "status": status}}


# ------------------------------------------------------------------------------------------------ state


@dataclass(frozen=True, slots=True)
class Event:
    """One event as received (``event_time`` as sent, None when absent; ``received_at`` sandbox time;
    ``user_existed``: whether ``user/create`` had created the user before the event arrived)."""

    user_id: str
    name: str
    attributes: Mapping[str, Any]
    event_time: str | None
    received_at: float
    user_existed: bool = True


class NotifyVisitorsState:
    """Users (``userID`` → attributes; given keys are overwritten, others kept) and events in arrival order."""

    __slots__ = ("events", "users")

    def __init__(self) -> None:
        self.users: dict[str, dict[str, Any]] = {}
        self.events: list[Event] = []

    def reset(self) -> None:
        self.users.clear()
        self.events.clear()

    def upsert(self, user_id: str, attributes: Mapping[str, Any]) -> None:
        self.users.setdefault(user_id, {}).update(attributes)

    def load(self, data: Mapping[str, Any]) -> None:
        """Load ``{"users": [{"userID", "user_attributes"}], "events": [...]}`` (the dump's shape)."""
        unknown = sorted(set(data) - {"users", "events"})
        if unknown:  # another platform's seed file would otherwise start an empty sandbox without a word
            raise ValueError(f"unknown seed sections {unknown} (this sandbox takes users and events)")
        for item in data.get("users") or ():
            self.upsert(str(item["userID"]), dict(item.get("user_attributes") or {}))
        for item in data.get("events") or ():
            self.events.append(
                Event(
                    str(item["userID"]),
                    str(item["event_name"]),
                    dict(item.get("attributes") or {}),
                    item.get("event_time"),
                    float(item.get("received_at", 0.0)),
                    bool(item.get("user_existed", True)),
                )
            )

    def load_file(self, path: Path) -> None:
        self.load(json.loads(path.read_text(encoding="utf-8")))

    def dump(self) -> dict[str, Any]:
        return {
            "users": [{"userID": u, "user_attributes": dict(a)} for u, a in self.users.items()],
            "events": [
                {
                    "userID": e.user_id,
                    "event_name": e.name,
                    "attributes": dict(e.attributes),
                    "event_time": e.event_time,
                    "received_at": e.received_at,
                    "user_existed": e.user_existed,
                }
                for e in self.events
            ],
        }

    def tables(self) -> dict[str, pl.DataFrame]:
        """``users`` (userID, attributes as JSON text) and ``events``."""
        users = pl.DataFrame(
            {
                "userID": list(self.users),
                "user_attributes": [json.dumps(a, sort_keys=True) for a in self.users.values()],
            },
            schema={"userID": pl.String, "user_attributes": pl.String},
        )
        events = table(
            self.events,
            {
                "userID": (pl.String, "user_id"),
                "event_name": (pl.String, "name"),
                "attributes": (pl.String, lambda e: json.dumps(dict(e.attributes), sort_keys=True)),
                "event_time": (pl.String, "event_time"),
                "received_at": (pl.Float64, "received_at"),
                "user_existed": (pl.Boolean, "user_existed"),
            },
        )
        return {"users": users, "events": events}


# ------------------------------------------------------------------------------------------- validation


def _invalid(where: str, what: str) -> ApiError:
    return ApiError(400, 400, f"invalid resource: {where}: {what}")


def _user_id(item: dict[str, Any], where: str) -> str:
    value = item.get("userID")
    if type(value) is not str or not value:
        raise _invalid(f"{where}.userID", "required, a non-empty string")
    if len(value) > MAX_USER_ID_LENGTH:
        raise _invalid(f"{where}.userID", f"longer than {MAX_USER_ID_LENGTH} characters")
    return value


def _name(value: Any, where: str) -> str:
    if type(value) is not str or not value:
        raise _invalid(where, "required, a non-empty string")
    if len(value) > MAX_NAME_LENGTH:
        raise _invalid(where, "must be fewer than 50 characters")
    return value


def _attributes(value: Any, where: str, *, user: bool) -> dict[str, Any]:
    if type(value) is not dict:
        raise _invalid(where, "must be an object")
    for name, v in value.items():
        _name(name, f"{where} attribute name")
        at = f"{where}.{name}"
        if type(v) is str:
            if len(v) > MAX_STRING_LENGTH:
                raise _invalid(at, "string values must be fewer than 1000 characters")
        elif v is not None and type(v) not in (int, float, bool):
            raise _invalid(at, "must be a string, number or boolean")  # [I] no nested values
        if not user:
            continue
        if name == "mobile" and (type(v) is not str or not _E164.fullmatch(v)):
            raise _invalid(at, "must be in E.164 format (e.g. +919899999999)")
        if name == "email" and (type(v) is not str or not _EMAIL.fullmatch(v)):
            raise _invalid(at, "must be an e-mail address")
        if name in DATE_ATTRIBUTES and not _parses(v, DATE_FORMAT):
            raise _invalid(at, "must be a date as YYYY-MM-DD")
        if name in OPT_IN_ATTRIBUTES and v not in _OPT_IN_VALUES:
            raise _invalid(at, 'must be "1" or "0"')
    return value


def _parses(value: Any, fmt: str) -> bool:
    if type(value) is not str:
        return False
    try:
        # also refuses 2024-1-5; yyyy is four digits, 0999 too (strptime refuses 999)
        return write_time(datetime.strptime(value, fmt), fmt) == value
    except ValueError:
        return False


def _items(body: Any, limit: int, what: str) -> list[dict[str, Any]]:
    if type(body) is not dict or type(body.get("nv")) is not list:
        raise _invalid("body", 'expected {"nv": [...]}')
    items = body["nv"]
    if not items:
        raise _invalid("nv", "is empty")
    if len(items) > limit:
        raise _invalid("nv", f"at most {limit} {what} per request, got {len(items)}")
    for i, item in enumerate(items):
        if type(item) is not dict:
            raise _invalid(f"nv[{i}]", "must be an object")
    return items


# ------------------------------------------------------------------------------------------- the sandbox


class NotifyVisitorsSandbox(PlatformSandbox[NotifyVisitorsSandboxConfig, NotifyVisitorsState]):
    """The NotifyVisitors emulator: ``await sandbox.start(host, port)`` returns the base URL (ending ``/api/v1/``).

    ``state`` is the live :class:`NotifyVisitorsState`, ``stats`` the :class:`SandboxStats`, ``core`` the
    :class:`SandboxCore` (use :meth:`configure` to change limits and faults while running).
    """

    api_prefix = API_PREFIX

    def __init__(
        self,
        config: NotifyVisitorsSandboxConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        config = config or NotifyVisitorsSandboxConfig()
        self._key = config.api_key.encode()
        self._brand = config.brand_id.encode()
        self._token = config.bearer_token.encode() if config.bearer_token else None
        if config.event_time_format not in EVENT_TIME_FORMATS:
            raise ValueError(f"event_time_format must be one of {', '.join(EVENT_TIME_FORMATS)}")
        self._event_format = EVENT_TIME_FORMATS[config.event_time_format]
        super().__init__(
            config,
            NotifyVisitorsState(),
            clock=clock,
            sleep=sleep,
            groups=FAMILY_OF,
            rate_limit_error=lambda _admission: ApiError(429, 429, "rate limit exceeded"),
            client_max_size=16 * 1024 * 1024,
        )

    # -- plumbing --------------------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        # Unnamed routes: aiohttp route names cannot hold "/", and the core then keys limits, faults and stats
        # by the path under the prefix — exactly the endpoint name (``user/create``).
        app.router.add_post(API_PREFIX + USER_CREATE, self._handler(self._user_create))
        app.router.add_post(API_PREFIX + EVENT_CREATE, self._handler(self._event_create))

    def _authenticate(self, request: web.Request) -> str:
        """Either mode identifies the brand, which is the rate-limit key."""
        authorization = request.headers.get("Authorization", "")
        if authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip().encode()
            if self._token is not None and hmac.compare_digest(token, self._token):
                return self.config.brand_id
            raise ApiError(401, 401, "invalid auth")
        key = request.headers.get("x-api-key", "").encode()
        brand = request.headers.get("x-brand-id", "").encode()
        if key and brand and hmac.compare_digest(key, self._key) and hmac.compare_digest(brand, self._brand):
            return self.config.brand_id
        raise ApiError(401, 401, "invalid auth")

    def _render_error(self, error: ApiError) -> web.StreamResponse:
        status = error.status
        message = {404: "invalid URL", 405: "method not allowed"}.get(status, error.message)
        headers = dict(error.headers)
        if not self.config.retry_after_header:
            headers.pop("Retry-After", None)
        if status == 400 and self.config.errors_in_body:
            status = 200
        return json_response(envelope("error", message), status=status, headers=headers)

    def _handler(self, apply: Callable[[Any], dict[str, Any]]) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                body = loads_json(await request.read())
            except ValueError:  # also UnicodeDecodeError, NaN and Infinity
                raise _invalid("body", "not valid JSON") from None
            return json_response(envelope("success", "success", apply(body)))

        return handler

    def _user_create(self, body: Any) -> dict[str, Any]:
        items = _items(body, self.config.max_users_per_request, "users")
        checked = []
        for i, item in enumerate(items):  # all checks first: a refused request changes nothing
            user_id = _user_id(item, f"nv[{i}]")
            if "user_attributes" not in item:
                raise _invalid(f"nv[{i}].user_attributes", "required")
            attrs = _attributes(item["user_attributes"], f"nv[{i}].user_attributes", user=True)
            checked.append((user_id, attrs))
        created = 0
        for user_id, attrs in checked:
            created += user_id not in self.state.users
            self.state.upsert(user_id, {k: v for k, v in attrs.items() if v is not None})
        self.core.stats.add_applied(USER_CREATE, len(checked))
        return {"created": created, "updated": len(checked) - created}

    def _event_create(self, body: Any) -> dict[str, Any]:
        items = _items(body, self.config.max_events_per_request, "events")
        events = []
        now = self._clock()
        for i, item in enumerate(items):
            where = f"nv[{i}]"
            user_id = _user_id(item, where)
            name = _name(item.get("event_name"), f"{where}.event_name")
            # Absent or null: no attributes. Any other value must be an object: ``or {}`` took [], "", 0 and false
            # as "no attributes" and accepted a body the platform's object rule refuses.
            attributes = item.get("attributes")
            attrs = _attributes({} if attributes is None else attributes, f"{where}.attributes", user=False)
            when = item.get("event_time")
            if when is not None and not _parses(when, self._event_format):
                raise _invalid(f"{where}.event_time", f"must be {self.config.event_time_format}")
            # Whether the profile was there first: an event for a user not yet created is recorded, and this
            # says so (a client should create users before their events).
            events.append(Event(user_id, name, attrs, when, now, user_id in self.state.users))
        self.state.events.extend(events)
        self.core.stats.add_applied(EVENT_CREATE, len(events))
        return {"events": len(events)}


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--brand-id", metavar="ID", help="x-brand-id to accept (default 1000)")
    parser.add_argument(
        "--no-limits", action="store_true", help="turn the documented per-family rate limits off"
    )


def _command(args: argparse.Namespace, data: dict[str, Any], creds: dict[str, str]) -> Built:
    if args.no_limits:
        data = {**data, "limits": {}}
    config = NotifyVisitorsSandboxConfig.from_mapping(
        data, **creds, brand_id=args.brand_id, seed_file=args.seed_file
    )
    return NotifyVisitorsSandbox(config), [f"brand id: {config.brand_id}"]


SANDBOX_COMMAND = SandboxCommand(
    "notifyvisitors",
    "the NotifyVisitors REST API v1 sandbox",
    _command,
    credentials=(
        Credential(
            "api_key", NV_KEY_ENV, "api key", f"x-api-key to accept (default: ${NV_KEY_ENV}, else random)"
        ),
        Credential(
            "bearer_token",
            NV_TOKEN_ENV,
            "bearer token",
            f"Bearer token to accept (default: ${NV_TOKEN_ENV}, else random)",
            metavar="TOKEN",
        ),
    ),
    options=_options,
)
"""``pushsync sandbox notifyvisitors``."""
