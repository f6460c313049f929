"""A strict, stateful local emulator of the Forms On Fire "POST Push API" (see ``docs/formsonfire.md``).

``POST /api/v2/push?format=json|xml`` takes one push for one user, as JSON (``Content-Type: application/json``)
or XML (``application/xml``, ``text/xml`` — or no Content-Type at all). Checks, in order:

========================================================  ======  ==================================================
request                                                   HTTP    body (in the ``format`` asked for)
========================================================  ======  ==================================================
``format`` other than json/xml                            400     ``ResponseStatus.ErrorCode = InvalidFormat``
other Content-Type                                        400     ``UnsupportedMediaType``
body not JSON/XML; XML root without ``xmlns:i``; XML      400     ``SerializationException``
elements not in alphabetical order; a field of the
wrong type, an Integer outside 32 bits (bad parameters)
wrong ``CompanyId`` or ``IntegrationKey``                 200     ``Unauthorized`` (``auth_error_code``)
no ``UserId``/``UserEmail``/``UserExternalId``             200     ``UserRequired``
a user not in the known-users list (when it applies)      200     ``UserNotFound``
accepted                                                  200     ``{"MessageId": n}``
wrong method / unknown path                               405/404 ``MethodNotAllowed`` / ``NotFound``
========================================================  ======  ==================================================

The error body is [I] — the vendor says only that most errors come back as 200 with the error inside. The sandbox
uses the ServiceStack convention the API's ``?format=`` parameter and XML rules point to::

    {"ResponseStatus": {"ErrorCode": "UserNotFound", "Message": "...", "Errors": []}}
    <PushResponse xmlns:i="..."><ResponseStatus><ErrorCode>UserNotFound</ErrorCode><Errors/>
        <Message>...</Message></ResponseStatus></PushResponse>

Without ``format`` the answer uses the request body's format [I]. Known users can be seeded (config ``users``,
a seed file, or ``POST /_sandbox/users``); an unknown user is an error only when some are known, unless
``unknown_user`` says ``error`` or ``accept``. Limits (none by default: none are documented), faults, stats and
the ``/_sandbox/`` routes come from :mod:`._core`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import hmac
import io
import json
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar
from xml.sax.saxutils import escape

from aiohttp import web

from sync.platforms.formsonfire import ENDPOINT, XSI_NAMESPACE, BodyFormat, UserKey
from sync.sandboxes._base import PlatformSandbox, SandboxSettings
from sync.sandboxes._command import FOF_KEY_ENV, Built, Credential, SandboxCommand
from sync.sandboxes._core import ApiError, json_response, loads_json
from sync.sandboxes.formsonfire_state import FormsOnFireState, KnownUser, Push

__all__ = [
    "API_PREFIX",
    "FormsOnFireSandbox",
    "FormsOnFireSandboxConfig",
    "FormsOnFireState",
    "KnownUser",
    "UnknownUser",
    "XmlOrder",
]

API_PREFIX = "/api/v2/"
_FIELD_TYPES: Mapping[str, type] = {
    "Body": str,
    "CompanyId": int,
    "ExpirySecs": int,
    "IntegrationKey": str,
    "Sound": bool,
    "Title": str,
    "UserEmail": str,
    "UserExternalId": str,
    "UserId": str,
}
_JSON_TYPES = frozenset({"application/json", "text/json"})
_XML_TYPES = frozenset({"application/xml", "text/xml"})
_XSI_NIL = f"{{{XSI_NAMESPACE}}}nil"

# The format the answer to the current request uses; set by the outermost middleware so that errors rendered by
# the core (404, 405, 429, faults) come back in the format the client asked for.
_answer_format: contextvars.ContextVar[BodyFormat] = contextvars.ContextVar(
    "fof_answer_format", default=BodyFormat.JSON
)


class UnknownUser(StrEnum):
    """What a push to a user the sandbox does not know does [I]."""

    AUTO = "auto"
    """An in-body ``UserNotFound`` when any users are known (seeded); accepted when none are (default)."""
    ERROR = "error"
    ACCEPT = "accept"


class XmlOrder(StrEnum):
    """What XML elements out of alphabetical order do [I]."""

    ERROR = "error"
    """400 ``SerializationException`` (default: strict)."""
    DROP = "drop"
    """Ignore each element that comes after a later-sorting one, as .NET's DataContractSerializer does."""


@dataclass(frozen=True, slots=True)
class FormsOnFireSandboxConfig(SandboxSettings):
    """Everything a Forms On Fire sandbox can be told. Build from YAML/JSON with :meth:`from_mapping`.

    Also ``limits`` (none documented, none by default; e.g. ``{"push": {"per_second": 10}}``), ``faults``,
    ``seed``, ``stats_window`` and ``seed_file`` (JSON ``{"users": [...], "pushes": [...]}``, the shape of
    ``GET /_sandbox/state``) from :class:`SandboxSettings`.
    """

    integration_key: str = "fof-sandbox-key"
    company_id: int = 1000
    users: tuple[KnownUser, ...] = ()
    unknown_user: UnknownUser = UnknownUser.AUTO
    xml_root: str | None = None
    """[I] Required name of the XML root element; None accepts any."""
    xml_order: XmlOrder = XmlOrder.ERROR
    error_status: int = 200
    """[I] HTTP status of errors reported inside the body (documented: most are 200)."""
    auth_error_code: str = "Unauthorized"
    """[I] The in-body error code of a wrong ``CompanyId`` or ``IntegrationKey``: the vendor documents none, so
    a client must not depend on it (tests set another)."""

    _enums: ClassVar[Mapping[str, type[StrEnum]]] = {"unknown_user": UnknownUser, "xml_order": XmlOrder}

    @classmethod
    def _convert(cls, kwargs: dict[str, Any]) -> None:
        if "users" in kwargs:
            kwargs["users"] = tuple(
                u if isinstance(u, KnownUser) else KnownUser.from_mapping(u) for u in kwargs["users"] or ()
            )
        if "company_id" in kwargs:
            kwargs["company_id"] = int(kwargs["company_id"])
            if kwargs["company_id"] not in _INT32:
                # A request can never carry it (an Integer): the sandbox would refuse every push with a 400.
                raise ValueError(f"company_id must fit an Integer (32 bits), not {kwargs['company_id']}")


# ------------------------------------------------------------------------------------------- parsing


def _bad(message: str, code: str = "SerializationException") -> ApiError:
    return ApiError(400, code, message)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


_XML_SPACE = " \t\r\n"
"""The only whitespace XML knows (``str.strip()`` would also take NBSP and the other Unicode spaces)."""
_XML_INT = re.compile(r"[+-]?[0-9]+")
"""XML Schema's integer: ASCII digits with an optional sign. Python's ``int()`` also takes ``1_000`` and other
scripts' digits (``٣``), which .NET's ``XmlConvert.ToInt32`` refuses."""
_INT32 = range(-(2**31), 2**31)
"""The document's Integer fields are .NET ``int``: a value outside it does not deserialise [I]."""


def _typed(name: str, value: Any) -> Any:
    expected = _FIELD_TYPES.get(name)
    if expected is None or value is None:
        return value
    if type(value) is not expected:
        raise _bad(f"{name}: expected {expected.__name__}")
    if expected is int and value not in _INT32:
        raise _bad(f"{name}: out of range for an Integer")
    return value


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A JSON push as a dict of typed fields (unknown fields are ignored, as the platform's binder does [I])."""
    try:
        body = loads_json(raw)
    except ValueError:  # also NaN and Infinity, which no JSON parser takes
        raise _bad("the body is not valid JSON") from None
    if type(body) is not dict:
        raise _bad("the body must be a JSON object")
    return {name: _typed(name, value) for name, value in body.items() if name in _FIELD_TYPES}


def _xml_value(name: str, element: ET.Element) -> Any:
    if element.get(_XSI_NIL) == "true":
        return None
    if len(element):
        raise _bad(f"{name}: expected a value, not elements")
    text = element.text or ""
    expected = _FIELD_TYPES.get(name, str)
    if expected is bool:
        if text.strip(_XML_SPACE) not in ("true", "false"):
            raise _bad(f"{name}: expected true or false")
        return text.strip(_XML_SPACE) == "true"
    if expected is int:
        digits = text.strip(_XML_SPACE)
        if not _XML_INT.fullmatch(digits):
            raise _bad(f"{name}: expected an integer")
        return _typed(name, int(digits))
    return text


def parse_xml_body(raw: bytes, *, root_name: str | None, order: XmlOrder) -> dict[str, Any]:
    """An XML push as a dict of typed fields: the root must declare ``xmlns:i`` and its children must come in
    ordinal alphabetical order (``order`` says what happens otherwise)."""
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise _bad("DTDs are not accepted")
    declared: dict[str, str] = {}
    root: ET.Element | None = None
    try:
        for event, item in ET.iterparse(io.BytesIO(raw), events=("start-ns", "start")):
            if event == "start-ns":
                prefix, uri = item
                if root is None:  # only declarations on the root element count
                    declared[prefix] = uri
            elif root is None:
                root = item
    except ET.ParseError as exc:
        raise _bad(f"the body is not well-formed XML ({exc})") from None
    if root is None:
        raise _bad("the body is empty")
    if declared.get("i") != XSI_NAMESPACE:
        raise _bad(f'the root element must declare xmlns:i="{XSI_NAMESPACE}"')
    if root_name is not None and _local(root.tag) != root_name:
        raise _bad(f"the root element must be <{root_name}>")
    out: dict[str, Any] = {}
    last = ""
    for child in root:
        name = _local(child.tag)
        if name <= last:
            if order is XmlOrder.ERROR:
                raise _bad(f"element <{name}> is out of alphabetical order (after <{last}>)")
            continue  # DataContractSerializer skips members it no longer expects
        last = name
        if name in _FIELD_TYPES:
            out[name] = _xml_value(name, child)
    return out


# ------------------------------------------------------------------------------------------- rendering


def _xml_answer(payload: Mapping[str, Any]) -> bytes:
    def element(name: str, value: Any) -> str:
        if value is None:
            return f'<{name} i:nil="true"/>'
        if isinstance(value, Mapping):
            return f"<{name}>" + "".join(element(k, value[k]) for k in sorted(value)) + f"</{name}>"
        if isinstance(value, list):
            return (
                f"<{name}/>"
                if not value
                else f"<{name}>" + "".join(element("Error", v) for v in value) + f"</{name}>"
            )
        return f"<{name}>{escape(str(value))}</{name}>"

    inner = "".join(element(k, payload[k]) for k in sorted(payload))
    return f'<PushResponse xmlns:i="{XSI_NAMESPACE}">{inner}</PushResponse>'.encode()


def render(
    payload: Mapping[str, Any], fmt: BodyFormat, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An answer in ``fmt``."""
    if fmt is BodyFormat.JSON:
        return json_response(payload, status=status, headers=headers)
    return web.Response(
        body=_xml_answer(payload), status=status, content_type="application/xml", headers=headers
    )


def error_payload(code: str, message: str) -> dict[str, Any]:
    """The [I] error body: ServiceStack's ``ResponseStatus``."""
    return {"ResponseStatus": {"ErrorCode": code, "Message": message, "Errors": []}}


# ------------------------------------------------------------------------------------------- the sandbox


class FormsOnFireSandbox(PlatformSandbox[FormsOnFireSandboxConfig, FormsOnFireState]):
    """The Forms On Fire emulator: ``await sandbox.start(host, port)`` returns the base URL (ending ``/api/v2/``)."""

    api_prefix = API_PREFIX

    def __init__(
        self,
        config: FormsOnFireSandboxConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        config = config or FormsOnFireSandboxConfig()
        state = FormsOnFireState()
        state.add_users(config.users)  # before the seed file, which may add more
        self._key = config.integration_key.encode()
        super().__init__(
            config,
            state,
            clock=clock,
            sleep=sleep,
            rate_limit_error=lambda adm: ApiError(
                429, "TooManyRequests", f"rate limit exceeded; retry in {adm.retry_after} s"
            ),
            # outside the core's, so the core's own refusals (404, 405, 429, faults) use the format asked for
            middlewares=(_format_middleware,),
        )

    # -- plumbing --------------------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_post(API_PREFIX + ENDPOINT, self._push, name=ENDPOINT)
        app.router.add_post("/_sandbox/users", self._add_users)

    def _authenticate(self, request: web.Request) -> str:
        return str(self.config.company_id)  # the credentials are in the body: the handler checks them

    def _render_error(self, error: ApiError) -> web.StreamResponse:
        code = {
            404: "NotFound",
            405: "MethodNotAllowed",
            500: "InternalServerError",
            503: "ServiceUnavailable",
        }.get(error.status, str(error.code))
        if isinstance(error.code, str):
            code = error.code
        return render(error_payload(code, error.message), _answer_format.get(), error.status, error.headers)

    def _in_body(self, code: str, message: str, fmt: BodyFormat) -> web.Response:
        return render(error_payload(code, message), fmt, self.config.error_status)

    async def _add_users(self, request: web.Request) -> web.StreamResponse:
        """``POST /_sandbox/users`` with ``[{"UserId", "UserEmail", "UserExternalId"}]``: add known users."""
        try:
            items = json.loads(await request.read())
            users = [KnownUser.from_mapping(item) for item in items]
        except (ValueError, TypeError, AttributeError) as exc:
            return json_response({"error": f"expected a list of users: {exc}"}, status=400)
        self.state.add_users(users)
        return json_response({"users": len(self.state.users)})

    async def _push(self, request: web.Request) -> web.StreamResponse:
        fmt = _answer_format.get()
        requested = request.query.get("format")
        if requested and requested.lower() not in ("json", "xml"):
            raise _bad("format must be json or xml", "InvalidFormat")
        content_type = request.headers.get("Content-Type")
        media = content_type.split(";", 1)[0].strip().lower() if content_type else None
        raw = await request.read()
        if media in _JSON_TYPES:
            body = parse_json_body(raw)
            sent_as = "json"
        elif media is None or media in _XML_TYPES:
            body = parse_xml_body(raw, root_name=self.config.xml_root, order=self.config.xml_order)
            sent_as = "xml"
        else:
            raise _bad(
                f"Content-Type {media!r}: use application/json or application/xml", "UnsupportedMediaType"
            )

        key = body.get("IntegrationKey")
        if (
            body.get("CompanyId") != self.config.company_id
            or type(key) is not str
            or not hmac.compare_digest(key.encode(), self._key)
        ):
            return self._in_body(self.config.auth_error_code, "invalid CompanyId or IntegrationKey", fmt)
        target = next(((k.value, body[k.value]) for k in UserKey if body.get(k.value)), None)
        if target is None:
            return self._in_body(
                "UserRequired", "one of UserId, UserEmail or UserExternalId is required", fmt
            )
        by, value = target
        user = self.state.find(by, value)
        if user is None:
            policy = self.config.unknown_user
            if policy is UnknownUser.ERROR or (policy is UnknownUser.AUTO and self.state.users):
                return self._in_body("UserNotFound", f"no user with this {by}", fmt)
            user = f"{by}:{value}"
        push = Push(
            message_id=len(self.state.pushes) + 1,
            user=user,
            by=by,
            title=body.get("Title"),
            body=body.get("Body"),
            sound=body.get("Sound"),
            expiry_secs=body.get("ExpirySecs"),
            format=sent_as,
            received_at=self._clock(),
        )
        self.state.pushes.append(push)
        self.core.stats.add_applied(ENDPOINT, 1)
        return render({"MessageId": push.message_id}, fmt)


@web.middleware
async def _format_middleware(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    """Decide the answer's format before anything else, so every error (the core's too) uses it: ``format``
    when valid (JSON when it is not: the handler then refuses the request), else the request body's format."""
    requested = request.query.get("format")
    if requested:
        fmt = BodyFormat.JSON if requested.lower() not in ("json", "xml") else BodyFormat(requested.lower())
    else:
        content_type = request.headers.get("Content-Type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        fmt = BodyFormat.JSON if media in _JSON_TYPES else BodyFormat.XML
    token = _answer_format.set(fmt)
    try:
        response: web.StreamResponse = await handler(request)
        return response
    finally:
        _answer_format.reset(token)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--company-id", type=int, metavar="N", help="CompanyId to accept (default 1000)")


def _command(args: argparse.Namespace, data: dict[str, Any], creds: dict[str, str]) -> Built:
    config = FormsOnFireSandboxConfig.from_mapping(
        data, **creds, company_id=args.company_id, seed_file=args.seed_file
    )
    return FormsOnFireSandbox(config), [f"company id: {config.company_id}"]


SANDBOX_COMMAND = SandboxCommand(
    "formsonfire",
    'the Forms On Fire "POST Push API" sandbox',
    _command,
    credentials=(
        Credential(
            "integration_key",
            FOF_KEY_ENV,
            "integration key",
            f"IntegrationKey to accept (default: ${FOF_KEY_ENV}, else random)",
        ),
    ),
    options=_options,
)
"""``pushsync sandbox formsonfire``."""
