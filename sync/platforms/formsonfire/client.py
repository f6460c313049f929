"""The Forms On Fire "POST Push API" connector: one push (one user) per request, JSON or XML per job.

Settings come from ``destination.extra``: ``company_id`` (required), ``body_format`` (``json``, default, or
``xml``), ``response_format`` (the ``format`` query parameter; default: the body format) and ``xml_root``; the
job's secret is the ``IntegrationKey``. Both credentials are written into each request body here, never into a
:class:`Batch`.

Transport and the common status mapping are :mod:`sync.platforms._http`'s. The platform answers most calls
with 200 and reports errors inside the body; their shape is not documented [I]. This connector reads the
ServiceStack-style ``ResponseStatus`` the sandbox sends (``{"ResponseStatus": {"ErrorCode", "Message"}}`` in
JSON, ``<ResponseStatus><ErrorCode>…`` in XML) and also a top-level ``ErrorCode``/``Error``/``Success: false``:

===========================================  =====================================================================
answer                                       raised
===========================================  =====================================================================
200 with no error in the body                (returns :class:`SendOutcome`; the body parsed when possible)
200, body not in the format asked (a page)   :class:`RetryableError` — not the platform's answer; empty is fine
200, error code in :data:`FATAL_ERROR_CODES`  :class:`FatalPlatformError` — wrong IntegrationKey or CompanyId:
(or ``extra.fatal_error_codes``)              every other push would be refused the same way
the first ``fatal_after`` answers (default    :class:`FatalPlatformError` — the credential error's code is not
10) all refused with one and the same code,   documented, so a wrong key may come back under any code; a run
before any push was accepted                  where every push fails alike is stopped, not spent
200 with any other error                     :class:`RejectedBatchError` (code and message from the body): the
                                             push is recorded as refused (one user: nothing to split)
400                                          :class:`RejectedBatchError` (bad parameters); fatal with a code of
                                             :data:`FATAL_ERROR_CODES`, as under a 200
401, 403, 404, 405                           :class:`FatalPlatformError` (credentials, or a wrong base URL)
3xx (never followed: the key is in a body)   :class:`FatalPlatformError`
408, 429, 5xx, time-outs, dropped connection  :class:`RetryableError`
===========================================  =====================================================================
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

from sync.config import Destination
from sync.errors import FatalPlatformError, RejectedBatchError, RetryableError
from sync.platforms._http import AnswerPolicy, ErrorBody, HttpClient, HttpSession, bounded
from sync.platforms.base import SendOutcome
from sync.platforms.formsonfire import DEFAULT_XML_ROOT, PLATFORM, BodyFormat
from sync.platforms.formsonfire.requests import RequestWriter, split_batch
from sync.records import Batch
from sync.redact import register_secret

__all__ = ["FATAL_AFTER", "FATAL_ERROR_CODES", "FormsOnFireClient", "error_in_body"]

FATAL_ERROR_CODES = frozenset({"Unauthorized", "Forbidden", "AuthenticationFailed", "InvalidIntegrationKey"})
"""In-body error codes that mean the credentials are wrong [I]: the run stops instead of refusing every push.
``destination.extra.fatal_error_codes`` (comma-separated) replaces this list."""
FATAL_AFTER = 10
"""Refusals with one and the same code, before any accepted push, that stop the run (``extra.fatal_after``)."""


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


_BOM = b"\xef\xbb\xbf"
"""A UTF-8 byte order mark: .NET's UTF-8 writers may put one before an answer (before the ``<`` or ``{``)."""


def _member(body: dict[str, Any], name: str) -> Any:
    """``body[name]`` by its PascalCase name or its camelCase one: ServiceStack on .NET Core writes JSON in
    camelCase (``responseStatus.errorCode``) by default, on .NET Framework in PascalCase."""
    value = body.get(name)
    return body.get(name[:1].lower() + name[1:]) if value is None else value


def _json_error(body: Any) -> tuple[str, str] | None:
    if not isinstance(body, dict):
        return None
    status = _member(body, "ResponseStatus")
    if isinstance(status, dict) and _member(status, "ErrorCode"):
        code = str(_member(status, "ErrorCode"))
        return code, str(_member(status, "Message") or code)
    if _member(body, "ErrorCode"):
        code = str(_member(body, "ErrorCode"))
        return code, str(_member(body, "Message") or _member(body, "Error") or code)
    if _member(body, "Error"):
        return "Error", str(_member(body, "Error"))
    if _member(body, "Success") is False:
        return "Error", str(_member(body, "Message") or "the platform reported a failure")
    return None


def _xml_error(raw: bytes) -> tuple[str, str] | None:
    try:
        root = ET.fromstring(raw)  # an answer from the configured platform, not untrusted user input
    except ET.ParseError:
        return None
    for element in root.iter():
        if _local(element.tag).lower() == "responsestatus":
            fields = {_local(child.tag).lower(): (child.text or "").strip() for child in element}
            if fields.get("errorcode"):
                return fields["errorcode"], fields.get("message") or fields["errorcode"]
    # The same top-level members as in JSON: the error body's shape is not documented [I].
    top = {_local(child.tag).lower(): (child.text or "").strip() for child in root}
    if top.get("errorcode"):
        return top["errorcode"], top.get("message") or top.get("error") or top["errorcode"]
    if top.get("error"):
        return "Error", top["error"]
    if top.get("success") == "false":
        return "Error", top.get("message") or "the platform reported a failure"
    return None


def error_in_body(raw: bytes) -> tuple[str, str] | None:
    """``(code, message)`` of an error reported inside an answer (JSON or XML, PascalCase or camelCase
    members, a byte order mark or not), or None when there is none."""
    text = raw.removeprefix(_BOM).lstrip()
    if not text:
        return None
    if text[:1] == b"<":
        return _xml_error(text)
    try:
        return _json_error(json.loads(text))
    except ValueError:
        return None


def _parsed(raw: bytes) -> Any:
    text = raw.removeprefix(_BOM).lstrip()
    if text[:1] in (b"{", b"["):
        try:
            return json.loads(text)
        except ValueError:
            return None
    return raw.decode("utf-8", "replace") if text else None


def _in_format(raw: bytes, fmt: BodyFormat) -> bool:
    """Whether a success body is empty or well-formed in the format asked for (``?format=``), and not a page."""
    text = raw.strip()
    if not text:
        return True  # success bodies are not documented [I]: an empty one is not a fault
    if fmt is BodyFormat.JSON:
        try:
            json.loads(text)
        except ValueError:
            return False
        return True
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return False
    return _local(root.tag).lower() != "html"


def _read_error(raw: bytes, status: int) -> ErrorBody:
    found = error_in_body(raw)
    if found is None:
        return ErrorBody(f"HTTP {status}", status)  # no code of the platform's own: the status stands in
    return ErrorBody(bounded(found[1]), found[0], f", {found[0]}")


_ANSWERS = AnswerPolicy(_read_error, hints={401: "check the IntegrationKey", 403: "check the IntegrationKey"})


class FormsOnFireClient(HttpClient):
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
        codes = extra.get("fatal_error_codes")
        self._fatal_codes = (
            frozenset(c.strip() for c in codes.split(",") if c.strip()) if codes else FATAL_ERROR_CODES
        )
        self._fatal_after = int(extra.get("fatal_after", FATAL_AFTER))
        # Until the first accepted push: the code every refusal so far carried and how many there were. Any
        # success, or a second code, ends the watch (the key works; refusals are about their rows).
        self._watching = self._fatal_after > 0
        self._first_code: str | None = None
        self._first_refusals = 0
        # The batch bodies are the pushes' bytes in the body format: the writer splices the credentials in.
        self._writer = RequestWriter(
            self.body_format, self._company_id, integration_key, xml_root=self._xml_root
        )
        # No session headers: the credentials travel in each body, the content type differs by body format.
        self._session = HttpSession.for_destination(
            destination,
            timeout=timeout,
            max_connections=max_connections,
        )

    async def check(self) -> str:
        """Forms On Fire has no read-only call (the push endpoint is its only documented call, and a write), so nothing can check the key without writing: one GET of the
        base URL checks DNS, the connection, TLS and that no redirect answers (``pushsync doctor``)."""
        status = await self._session.reachable()
        return (
            f"the base URL is reachable (HTTP {status}); Forms On Fire has no read-only call, so the key is not "
            "checked: the first batch of a run is"
        )

    def split(self, batch: Batch) -> tuple[Batch, Batch] | None:
        """One user per request: never split."""
        return split_batch(batch)

    async def send(self, batch: Batch) -> SendOutcome:
        """POST one push; see the module docstring for what is raised."""
        try:
            payload = self._writer.payload(batch.body)
        except ValueError as exc:  # a value XML cannot carry: the planner rejects such rows, this is a guard
            raise RejectedBatchError(str(exc), code="NotSerialisable") from None
        answer = await self._session.request(
            "POST",
            batch.endpoint,
            endpoint=batch.endpoint,
            batch_id=batch.batch_id,
            data=payload,
            params={"format": self.response_format.value},
            headers={"Content-Type": self._writer.content_type},
        )
        try:
            _ANSWERS.check(answer)
        except RejectedBatchError as exc:
            if exc.code in self._fatal_codes:
                # A credential error under a 400 (which status carries in-body errors is not documented [I]):
                # every push would be refused alike, as under a 200.
                raise self._credentials_refused(
                    answer.what, str(exc.code), exc.message, answer.status
                ) from None
            self._watch(answer.what, str(exc.code), exc.message, answer.status)
            raise
        found = error_in_body(answer.raw)
        if found is None:
            if not _in_format(answer.raw, self.response_format):
                # An HTML page from a proxy or a cut-off answer: not the platform's word, so not a success.
                raise RetryableError(
                    f"{answer.what}: HTTP {answer.status} with a body that is not "
                    f"{self.response_format.value.upper()} ({answer.content_type or 'no content type'}, "
                    f"{len(answer.raw)} bytes): a proxy's or login page, or a cut-off answer — not the API's",
                    status=answer.status,
                )
            self._watching = False
            return SendOutcome(answer.status, answer.latency, _parsed(answer.raw), answer.remaining)
        code, message = found[0], bounded(found[1])
        if code in self._fatal_codes:
            raise self._credentials_refused(answer.what, code, message, answer.status)
        self._watch(answer.what, code, message, answer.status)
        raise RejectedBatchError(message, status=answer.status, code=code)

    @staticmethod
    def _credentials_refused(what: str, code: str, message: str, status: int) -> FatalPlatformError:
        return FatalPlatformError(
            f"{what}: {code}: {message} (check the IntegrationKey and destination.extra.company_id)",
            status=status,
            code=code,
        )

    def _watch(self, what: str, code: str, message: str, status: int) -> None:
        """Count a refusal before the first accepted push; raise FatalPlatformError once ``fatal_after`` of
        them in a row carried the same code (a wrong key is refused alike for every user)."""
        if not self._watching:
            return
        if self._first_code is None:
            self._first_code = code
        elif code != self._first_code:
            self._watching = False
            return
        self._first_refusals += 1
        if self._first_refusals >= self._fatal_after:
            self._watching = False
            raise FatalPlatformError(
                f"{what}: the first {self._first_refusals} pushes were all refused with {code}: {message} — "
                "this looks like a wrong IntegrationKey or destination.extra.company_id (check them; if this "
                "code refuses single users, raise destination.extra.fatal_after or set it to 0)",
                status=status,
                code=code,
            )
