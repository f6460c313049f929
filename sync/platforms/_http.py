"""The HTTP boundary every connector shares: one aiohttp session per client, one request at a time timed and
translated, and the status mapping common to every platform.

aiohttp stops here. Its exceptions become :mod:`sync.errors` types exactly once, in :meth:`HttpSession.request`
(``raise OurError(msg) from exc``); the error tree itself is drawn in ``sync/errors.py``::

    aiohttp / asyncio                          raised                   why
    TimeoutError (incl. ServerTimeoutError)    RetryableError           no answer in time: the next try may get one
    ClientConnectorCertificateError            FatalPlatformError       a refused certificate refuses every batch
    ClientSSLError, ssl.SSLError               FatalPlatformError       likewise (e.g. TLS to a plain-HTTP port)
    InvalidURL                                 FatalPlatformError       the job's base URL is wrong
    ClientConnectorError, ServerDisconnected   RetryableError,          refused, DNS, reset before an answer: no
                                               no_connection=True       answer at all (a run of these aborts)
    any other ClientError                      RetryableError           dropped connection, truncated
                                                                        answer: transient from where we stand

Proxies are the environment's, as curl and pip read them: ``HTTPS_PROXY`` / ``HTTP_PROXY`` by the base URL's scheme
(else ``ALL_PROXY``), none for a host ``NO_PROXY`` lists or a loopback address (a local sandbox); a proxy's
credentials (``http://user:password@proxy:3128``) are masked wherever a message could show them. aiohttp's own
``trust_env`` is not used: it also sends ``~/.netrc`` credentials to the platform.

Redirects are never followed, for every connector: a 3xx raises :class:`FatalPlatformError` naming where it
points. Following one would send the credentials (headers, or Forms On Fire's key and Meiro's password in the
body) to whatever address the server names, and would turn a POST into a bodiless GET that applies nothing yet
may answer 200. The job's base URL is to be set to the address the platform names instead.

Every other HTTP answer comes back as an :class:`HttpAnswer`; :meth:`AnswerPolicy.error` maps a non-2xx one the
same way for every platform, grouped by what the caller must do next::

    3xx                    FatalPlatformError     (raised by HttpSession.request itself, see above)
    401, 403, 404, 405     FatalPlatformError     credentials, permissions or a wrong base URL: no batch does better
    408, 429, 5xx          RetryableError         with ``retry_after`` (Retry-After) and ``remaining``
                                                  (X-RateLimit-Remaining), both parsed with the same guards
    other 4xx              RejectedBatchError     this batch's content was refused: record it, split it

Where platforms really differ, an :class:`AnswerPolicy` says so: how an error body reads (``read_error``), the
advice appended to fatal messages, and two small switches. What a platform reports *inside* a 2xx (NotifyVisitors'
envelope, Forms On Fire's ``ResponseStatus``) stays in its connector; a 2xx whose body must be JSON and is not
(an HTML page from a proxy, a cut-off answer) is :class:`RetryableError` (:meth:`HttpAnswer.expect_json`).
Every message starts with the request's description from :func:`sync.redact.describe_request` and never includes
headers, so no credential reaches it; what a server says is masked with :func:`sync.redact.redact_pieces` before
it is cut to :data:`MAX_MESSAGE` characters, so an echoed key leaves no piece behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import math
import os
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Self

import aiohttp

from sync.config import Destination
from sync.errors import FatalPlatformError, PlatformError, RejectedBatchError, RetryableError
from sync.platforms import _tls
from sync.redact import describe_request, redact, redact_pieces, register_secret

__all__ = [
    "FATAL_STATUSES",
    "MAX_MESSAGE",
    "AnswerPolicy",
    "ErrorBody",
    "HttpAnswer",
    "HttpClient",
    "HttpSession",
    "bounded",
    "json_error",
    "parse_json",
    "parse_remaining",
    "parse_retry_after",
]

FATAL_STATUSES = frozenset({401, 403, 404, 405})
"""Statuses no batch can do better on: credentials, permissions, or a base URL that names no API."""

MAX_MESSAGE = 300
"""Characters of a platform's error message kept: enough to read, bounded so a proxy's HTML page cannot flood."""

_SCANNED = 64 * 1024
"""Characters of a server's text masked before the message is cut: enough to hold any key whole around the
cut, bounded so a 10 MB page costs nothing."""

_JSON_HEADERS: Mapping[str, str] = {"Content-Type": "application/json"}
"""Sent with a body given as encoded JSON bytes (``data=`` bytes alone would go as application/octet-stream)."""

_DNS_CACHE_SECONDS = 300  # one session lives for a whole run: no need to resolve the API host every 10 s


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
        if when.tzinfo is None:
            # "-0000" (what Python's email.utils.formatdate writes by default) or no zone comes back naive, and a
            # naive datetime's timestamp() is local time: 30 s read as 5 h in New York. HTTP dates are UTC.
            when = when.replace(tzinfo=datetime.UTC)
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


def parse_json(raw: bytes) -> Any:
    """``raw`` parsed as JSON, or None when empty or not JSON (an error page is not worth an exception)."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def bounded(message: str) -> str:
    """A platform's message made safe to show: secrets (and any 8-character run of one) masked, *then* cut to
    at most :data:`MAX_MESSAGE` characters — cutting first could leave the start of an echoed key unmasked."""
    return redact_pieces(message[:_SCANNED])[:MAX_MESSAGE]


def json_error(raw: bytes, status: int) -> tuple[int | str | None, str]:
    """``(code, message)`` of a JSON error body — ``{"code", "error"}`` (Netmera) or ``{"message"}`` (Meiro) —
    else the start of whatever text came back; the message redacted and bounded, ``HTTP <status>`` when empty."""
    body = parse_json(raw)
    if isinstance(body, dict):
        code = body.get("code")
        message = body.get("error") or body.get("message")
        if not isinstance(code, int | str):
            code = None
        if isinstance(message, str) and message:
            return code, bounded(message)
        return code, f"HTTP {status}"
    text = bounded(raw[:_SCANNED].decode("utf-8", "replace").strip()).strip()
    return None, text or f"HTTP {status}"


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """Any HTTP answer (success or not) to the request ``what`` describes: status, headers, raw body, latency."""

    what: str
    """The request's redacted description (:func:`sync.redact.describe_request`); starts every error message."""
    status: int
    headers: Mapping[str, str]
    raw: bytes
    latency: float
    """Seconds from sending the request to the last byte of the answer."""

    @property
    def ok(self) -> bool:
        """True for a 2xx."""
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body parsed as JSON, or None when empty or not JSON."""
        return parse_json(self.raw)

    def expect_json(self) -> Any:
        """The body parsed as JSON, or None when empty; a body that is not JSON raises :class:`RetryableError`.

        For a 2xx from an API whose answers are JSON: an HTML page (a proxy's, a captive portal's, a login
        page) or a cut-off answer is not the API's answer, so nothing can be told from it. Retrying is right
        — the proxy may pass the next try, and the writes are idempotent — and bounded by the retry policy.
        The message gives the content type and size, never the page (it may echo a header)."""
        raw = self.raw
        if raw == b"{}":  # what most write endpoints answer: no decoder for it, at every request
            return {}
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise RetryableError(
                f"{self.what}: HTTP {self.status} with a body that is not JSON "
                f"({self.content_type or 'no content type'}, {len(self.raw)} bytes): a proxy's or login page, "
                "or a cut-off answer — not the API's",
                status=self.status,
            ) from None

    @property
    def content_type(self) -> str:
        """The media type of ``Content-Type`` (no parameters), bounded and masked; empty when absent."""
        value = self.headers.get("Content-Type", "").split(";", 1)[0].strip()
        return redact_pieces(value[:80])

    @property
    def remaining(self) -> int | None:
        """``X-RateLimit-Remaining``, when the server sent a usable one."""
        return parse_remaining(self.headers.get("X-RateLimit-Remaining"))

    @property
    def retry_after(self) -> float | None:
        """``Retry-After`` in seconds, when the server sent a usable one."""
        return parse_retry_after(self.headers.get("Retry-After"))


def proxy_for(base_url: str) -> str | None:
    """The proxy the environment names for requests to ``base_url`` (see the module docstring), or None.

    Without it pushsync went straight to the platform from behind a company's proxy, and every request failed to
    connect (exit 3 after ``abort_after_connection_failures``). Its password, if the URL holds one, is registered
    with the redactor."""
    import ipaddress
    import urllib.request

    proxies = urllib.request.getproxies_environment()
    parts = urllib.parse.urlsplit(base_url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # not in typeshed; stdlib's
    if not proxy or loopback or bypass(host, proxies):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy  # HTTP_PROXY=proxy:3128, as curl reads it
    with contextlib.suppress(ValueError):
        password = urllib.parse.urlsplit(proxy).password
        if password:
            register_secret(password)
    return proxy


class HttpSession:
    """One connector's HTTP boundary: a base URL and one :class:`aiohttp.ClientSession` for the client's life.

    The session is opened on first use, inside the running loop (aiohttp binds it to the loop), and again after
    :meth:`aclose`. ``timeout`` bounds each request from connect to last byte; ``max_connections`` caps the pool;
    TLS certificates are verified unless ``verify_tls`` is False (the job loader allows that only for a local
    sandbox). ``headers`` go with every request (credentials included: they never reach a message).
    """

    __slots__ = ("_base_url", "_headers", "_max_connections", "_proxy", "_session", "_timeout", "_verify_tls")

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        verify_tls: bool = True,
        max_connections: int = 100,
    ) -> None:
        self._base_url: str = base_url if base_url.endswith("/") else base_url + "/"  # paths are appended
        self._headers: dict[str, str] = dict(headers or {})  # sent with every request
        self._timeout: float = timeout  # seconds per request, also quoted in the time-out message
        self._verify_tls: bool = verify_tls  # False only for a local sandbox with a self-signed certificate
        self._max_connections: int = max_connections  # pool size: the dispatcher's concurrency
        self._session: aiohttp.ClientSession | None = None  # opened lazily, inside the running loop
        self._proxy: str | None = proxy_for(
            self._base_url
        )  # the environment's proxy for the base URL, if any

    @classmethod
    def for_destination(
        cls,
        destination: Destination,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        max_connections: int = 100,
    ) -> Self:
        """A session to a job's destination. Its base URL and TLS choice are read here only, so the one switch
        that turns certificate checks off (``verify_tls: false``) is honoured in one place."""
        return cls(
            destination.base_url,
            headers=headers,
            timeout=timeout,
            verify_tls=destination.verify_tls,
            max_connections=max_connections,
        )

    @property
    def base_url(self) -> str:
        """The API root, ending in ``/``."""
        return self._base_url

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if not _tls.plain_http(self._base_url):
                # The TLS context this session's requests use has its CA certificates before the first one, also
                # when the connector was imported with their loading put off (sync/platforms/_tls.py).
                _tls.load_deferred(verifying=self._verify_tls)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections, ssl=self._verify_tls, ttl_dns_cache=_DNS_CACHE_SECONDS
                ),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers=self._headers,
                json_serialize=lambda obj: json.dumps(obj, separators=(",", ":"), ensure_ascii=False),
            )
        return self._session

    async def reachable(self) -> int:
        """GET the base URL itself and return the status of whatever answered: DNS, the TCP connection and TLS
        (certificate verified) all worked. For platforms with no read-only call (``pushsync doctor``): the
        status says nothing about the key. A redirect raises as for every request; no answer raises
        :class:`RetryableError`."""
        answer = await self.request("GET", "", endpoint="base URL")
        if answer.status >= 500:
            raise RetryableError(f"{answer.what}: HTTP {answer.status}", status=answer.status)
        return answer.status

    async def request(
        self,
        method: str,
        path: str,
        *,
        endpoint: str | None = None,
        batch_id: str | None = None,
        json_body: Any = None,
        data: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpAnswer:
        """Send one request to ``base_url + path`` and return whatever HTTP answer came, timed.

        ``endpoint`` and ``batch_id`` name the request in messages; ``json_body`` is sent as compact UTF-8 JSON
        — or, when it is ``bytes`` (a body the columnar builders already encoded), as it is, with ``Content-Type:
        application/json``, never decoded or encoded again — and ``data`` as it is; ``headers`` are added to the
        session's. Transport failures raise as the module docstring draws; mapping the status is the caller's
        (:meth:`AnswerPolicy.error`)."""
        if type(json_body) is bytes:
            # Encoded JSON: aiohttp's ``json=`` would encode it once more on the event loop (12 % of a run's CPU
            # before issue 13). ``data=`` bytes is sent as one buffer; the Content-Type stays JSON's.
            data, json_body = json_body, None
            headers = _JSON_HEADERS if headers is None else {**_JSON_HEADERS, **headers}
        url = self._base_url + path
        what = describe_request(method, url, endpoint=endpoint, batch_id=batch_id)
        session = self._open()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with session.request(
                method,
                url,
                json=json_body,
                data=data,
                params=params,
                headers=headers,
                allow_redirects=False,  # see the module docstring: credentials never follow a redirect
                proxy=self._proxy,
            ) as resp:
                if 300 <= resp.status < 400:
                    raise _redirect_error(what, url, resp.status, resp.headers.get("Location"))
                raw = await resp.read()
                return HttpAnswer(what, resp.status, resp.headers, raw, loop.time() - started)
        except TimeoutError as exc:
            raise RetryableError(f"{what}: no answer within {self._timeout:g} s") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise FatalPlatformError(
                f"{what}: TLS certificate refused: {redact(str(exc.certificate_error))}"
            ) from exc
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise FatalPlatformError(f"{what}: TLS error: {redact(str(exc))}") from exc
        except aiohttp.InvalidURL as exc:
            raise FatalPlatformError(f"{what}: invalid URL") from exc
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            # No answer at all (refused, DNS, reset before a status line): counted, a run of them aborts the run.
            raise RetryableError(
                f"{what}: connection failed: {type(exc).__name__}{_why(exc)}", no_connection=True
            ) from exc
        except aiohttp.ClientError as exc:
            # Refused, reset or dropped connections, and truncated answers: transient from where we stand.
            raise RetryableError(f"{what}: connection failed: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        """Close the aiohttp session (a later request opens a new one)."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def _why(exc: aiohttp.ClientConnectorError | aiohttp.ServerDisconnectedError) -> str:
    """The system's reason a connection was not made, as ``" (Connection refused)"``, or ``""``.

    The class name alone ("ClientConnectorError") left a user who ran `pushsync doctor` before starting the sandbox
    to guess between a refused port, an unknown host and a firewall; the reason names none of the request's data."""
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, socket.gaierror):
        text = os_error.strerror or ""
    elif isinstance(os_error, OSError) and os_error.errno:
        text = os.strerror(os_error.errno)
    else:
        return ""
    return f" ({text})" if text else ""


def _redirect_error(what: str, url: str, status: int, location: str | None) -> FatalPlatformError:
    """The error for a redirect: where it points (without query or fragment, masked), and what to do."""
    if location:
        try:
            parts = urllib.parse.urlsplit(urllib.parse.urljoin(url, location.strip()))
            target = redact_pieces(urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))
        except ValueError:
            target = "an address that is not a valid URL"
    else:
        target = "nowhere (no Location header)"
    return FatalPlatformError(
        f"{what}: HTTP {status} redirect to {target[:MAX_MESSAGE]}: not followed — credentials are never sent "
        "to another address, and a redirected write is not applied; if the platform moved, set the base URL "
        "to the address it names",
        status=status,
    )


class HttpClient:
    """Base of the connectors: owns an :class:`HttpSession` as ``_session``; ``async with`` closes it."""

    _session: HttpSession

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client's HTTP session."""
        await self._session.aclose()


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """What an error answer's body says, as a platform's :attr:`AnswerPolicy.read_error` reads it."""

    message: str
    """Redacted and bounded (:func:`bounded`); ``HTTP <status>`` when the body says nothing usable."""
    code: int | str | None = None
    """Carried by the raised error as :attr:`sync.errors.PlatformError.code`."""
    label: str = ""
    """How the code reads in the message, right after ``HTTP <status>`` (``", code 2010"``); empty: left out."""


@dataclass(frozen=True, slots=True)
class AnswerPolicy:
    """The common status mapping (module docstring) with one platform's hooks: where platforms really differ.

    ``hints`` is the advice appended to a fatal status's message (``401: "check the API key"``); 404 and 405
    default to ``base_url_hint``. ``rejection_names_request`` starts a rejection's message with the request
    (Meiro's CLI prints it alone); ``exhausted_on_429`` reads a 429 without ``X-RateLimit-Remaining`` as 0
    left (NotifyVisitors sends neither header nor Retry-After: the budget then pauses until the window resets).
    """

    read_error: Callable[[bytes, int], ErrorBody]
    hints: Mapping[int, str] = field(default_factory=dict)
    base_url_hint: str = "check destination.base_url"
    rejection_names_request: bool = False
    exhausted_on_429: bool = False

    def error(self, answer: HttpAnswer) -> PlatformError:
        """The error a non-2xx ``answer`` calls for; the caller raises it."""
        status = answer.status
        body = self.read_error(answer.raw, status)
        text = f"{answer.what}: HTTP {status}{body.label}: {body.message}"
        if status in FATAL_STATUSES:
            hint = self.hints.get(status, self.base_url_hint)
            return FatalPlatformError(f"{text} ({hint})", status=status, code=body.code)
        if status in (408, 429) or status >= 500:
            remaining = answer.remaining
            if status == 429 and remaining is None and self.exhausted_on_429:
                remaining = 0
            return RetryableError(
                text, status=status, code=body.code, retry_after=answer.retry_after, remaining=remaining
            )
        # 400 and the other 4xx: this batch's content was refused; splitting it may isolate the records.
        message = text if self.rejection_names_request else body.message
        return RejectedBatchError(message, status=status, code=body.code)

    def check(self, answer: HttpAnswer) -> HttpAnswer:
        """``answer`` itself when it is a 2xx; otherwise raise the error its status calls for."""
        if not answer.ok:
            raise self.error(answer)
        return answer
