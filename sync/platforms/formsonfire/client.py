"""The Forms On Fire "POST Push API" connector: one push (one user) per request, JSON or XML per job.

Settings come from ``destination.extra``: ``company_id`` (required), ``body_format`` (``json``, default, or
``xml``), ``response_format`` (the ``format`` query parameter; default: the body format) and ``xml_root``; the
job's secret is the ``IntegrationKey``. Both credentials are written into each request body here, never into a
:class:`Batch`.

Answers map onto the error tree (``sync/errors.py``) here, at the boundary. The platform answers most calls
with 200 and reports errors inside the body; their shape is not documented [I]. This connector reads the
ServiceStack-style ``ResponseStatus`` the sandbox sends (``{"ResponseStatus": {"ErrorCode", "Message"}}`` in
JSON, ``<ResponseStatus><ErrorCode>…`` in XML) and also a top-level ``ErrorCode``/``Error``/``Success: false``:

===========================================  =====================================================================
answer                                       raised
===========================================  =====================================================================
200 with no error in the body                (returns :class:`SendOutcome`; the body parsed when possible)
200, error code in :data:`FATAL_ERROR_CODES`  :class:`FatalPlatformError` — wrong IntegrationKey or CompanyId:
                                             every other push would be refused the same way
200 with any other error                     :class:`RejectedBatchError` (code and message from the body): the
                                             push is recorded as refused (one user: nothing to split)
400                                          :class:`RejectedBatchError` (bad parameters)
401, 403, 404, 405                           :class:`FatalPlatformError` (credentials, or a wrong base URL)
408, 429, 5xx, time-outs, dropped connection  :class:`RetryableError`
===========================================  =====================================================================
"""

from __future__ import annotations

import asyncio
import json
import ssl
import xml.etree.ElementTree as ET
from typing import Any

import aiohttp

from sync.config import Destination
from sync.errors import FatalPlatformError, RejectedBatchError, RetryableError
from sync.platforms.base import SendOutcome
from sync.platforms.formsonfire import DEFAULT_XML_ROOT, PLATFORM, BodyFormat
from sync.platforms.formsonfire.requests import serialise, split_batch
from sync.platforms.netmera.client import parse_remaining, parse_retry_after
from sync.records import Batch
from sync.redact import describe_request, redact, register_secret

__all__ = ["FATAL_ERROR_CODES", "FormsOnFireClient", "error_in_body"]

FATAL_ERROR_CODES = frozenset({"Unauthorized", "Forbidden", "AuthenticationFailed", "InvalidIntegrationKey"})
"""In-body error codes that mean the credentials are wrong [I]: the run stops instead of refusing every push."""

_FATAL_STATUSES = frozenset({401, 403, 404, 405})
_MAX_MESSAGE = 300


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _json_error(body: Any) -> tuple[str, str] | None:
    if not isinstance(body, dict):
        return None
    status = body.get("ResponseStatus") or body.get("responseStatus")
    if isinstance(status, dict) and status.get("ErrorCode"):
        return str(status["ErrorCode"]), str(status.get("Message") or status["ErrorCode"])
    if body.get("ErrorCode"):
        return str(body["ErrorCode"]), str(body.get("Message") or body.get("Error") or body["ErrorCode"])
    if body.get("Error"):
        return "Error", str(body["Error"])
    if body.get("Success") is False:
        return "Error", str(body.get("Message") or "the platform reported a failure")
    return None


def _xml_error(raw: bytes) -> tuple[str, str] | None:
    try:
        root = ET.fromstring(raw)  # an answer from the configured platform, not untrusted user input
    except ET.ParseError:
        return None
    for element in root.iter():
        if _local(element.tag) == "ResponseStatus":
            fields = {_local(child.tag): (child.text or "").strip() for child in element}
            if fields.get("ErrorCode"):
                return fields["ErrorCode"], fields.get("Message") or fields["ErrorCode"]
    return None


def error_in_body(raw: bytes) -> tuple[str, str] | None:
    """``(code, message)`` of an error reported inside an answer (JSON or XML), or None when there is none."""
    text = raw.lstrip()
    if not text:
        return None
    if text[:1] == b"<":
        return _xml_error(text)
    try:
        return _json_error(json.loads(text))
    except ValueError:
        return None


def _parsed(raw: bytes) -> Any:
    text = raw.lstrip()
    if text[:1] in (b"{", b"["):
        try:
            return json.loads(text)
        except ValueError:
            return None
    return raw.decode("utf-8", "replace") if text else None


class FormsOnFireClient:
    """Sends one-push :class:`Batch` objects to the POST Push API (or its sandbox). Use ``async with``.

    ``destination.base_url`` is the API root (``https://<node>/api/v2/``); requests go to ``push?format=...``.
    """

    platform = PLATFORM

    def __init__(
        self,
        destination: Destination,
        integration_key: str,
        *,
        company_id: int | str | None = None,
        body_format: BodyFormat | str | None = None,
        response_format: BodyFormat | str | None = None,
        xml_root: str | None = None,
        timeout: float = 30.0,
        max_connections: int = 100,
    ) -> None:
        if not integration_key:
            raise ValueError("an IntegrationKey is required")
        register_secret(integration_key)
        extra = destination.extra
        company = company_id if company_id is not None else extra.get("company_id")
        try:
            self._company_id = int(str(company))
        except ValueError:
            raise ValueError("destination.extra.company_id must be an integer (the CompanyId)") from None
        self.body_format = BodyFormat(body_format or extra.get("body_format") or BodyFormat.JSON)
        self.response_format = BodyFormat(response_format or extra.get("response_format") or self.body_format)
        self._xml_root = xml_root or extra.get("xml_root") or DEFAULT_XML_ROOT
        self._key = integration_key
        base = destination.base_url
        self._base_url = base if base.endswith("/") else base + "/"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._timeout_seconds = timeout
        self._verify_tls = destination.verify_tls
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> FormsOnFireClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=self._verify_tls)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def split(self, batch: Batch) -> tuple[Batch, Batch] | None:
        """One user per request: never split."""
        return split_batch(batch)

    async def send(self, batch: Batch) -> SendOutcome:
        """POST one push; see the module docstring for what is raised."""
        url = self._base_url + batch.endpoint
        what = describe_request("POST", url, endpoint=batch.endpoint, batch_id=batch.batch_id)
        payload, content_type = serialise(
            batch.body, self.body_format, self._company_id, self._key, xml_root=self._xml_root
        )
        session = self._get_session()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with session.post(
                url,
                data=payload,
                params={"format": self.response_format.value},
                headers={"Content-Type": content_type},
            ) as resp:
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
        found = error_in_body(raw)
        code, message = (found[0], redact(found[1][:_MAX_MESSAGE])) if found else (None, f"HTTP {status}")
        if 200 <= status < 300:
            if found is None:
                return SendOutcome(
                    status, latency, _parsed(raw), parse_remaining(headers.get("X-RateLimit-Remaining"))
                )
            if code in FATAL_ERROR_CODES:
                raise FatalPlatformError(
                    f"{what}: {code}: {message} (check the IntegrationKey and destination.extra.company_id)",
                    status=status,
                    code=code,
                )
            raise RejectedBatchError(message, status=status, code=code)
        text = f"{what}: HTTP {status}" + (f", {code}" if code else "") + f": {message}"
        if status in _FATAL_STATUSES:
            hint = "check the IntegrationKey" if status in (401, 403) else "check destination.base_url"
            raise FatalPlatformError(f"{text} ({hint})", status=status, code=code or status)
        if status == 429 or status == 408 or status >= 500:
            raise RetryableError(
                text,
                status=status,
                code=code or status,
                retry_after=parse_retry_after(headers.get("Retry-After")),
                remaining=parse_remaining(headers.get("X-RateLimit-Remaining")),
            )
        raise RejectedBatchError(message, status=status, code=code or status)
