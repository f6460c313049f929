"""Forms On Fire push bodies, their JSON and XML serialisation, batch IDs. Pure functions: no I/O.

A batch body is the encoded push *without* the credentials, as ``bytes`` in the job's body format: the canonical
JSON ``{"Body":"...","ExpirySecs":3600,"Sound":true,"Title":"Hi","UserExternalId":"u1"}`` or the XML elements
``<Body>...</Body><ExpirySecs>3600</ExpirySecs>...`` (no root). The planner's builder makes them as columns
(polars expressions: :mod:`sync.platforms._encode`, :mod:`sync.platforms._xml`); the connector adds
``CompanyId`` and ``IntegrationKey`` by splicing them into those bytes (:class:`RequestWriter`), so the
integration key never reaches a batch, its ID, the ledger or a log line, and no body is encoded twice. One user
per request: a batch names exactly one user and is never split. The batch ID hashes the canonical JSON of the
push and its row (:func:`batch_id_for`) whatever the body format — the IDs of the builder before the columnar
data plane (issue 13), so a run planned by an older version resumes.

XML bodies follow the platform's (DataContract-style) rules: the root declares
``xmlns:i="http://www.w3.org/2001/XMLSchema-instance"``, child elements come in ordinal alphabetical order,
booleans are ``true``/``false``::

    <PushRequest xmlns:i="http://www.w3.org/2001/XMLSchema-instance"><Body>...</Body><CompanyId>42</CompanyId>
    <ExpirySecs>3600</ExpirySecs><IntegrationKey>...</IntegrationKey><Sound>true</Sound><Title>Hi</Title>
    <UserExternalId>u1</UserExternalId></PushRequest>
"""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

import polars as pl

from sync.config import Job, Source, SourceKind, ValueType
from sync.errors import JobProblem
from sync.planning.row_keys import ROW_KEY
from sync.planning.validation import REJECTS_SCHEMA
from sync.platforms import _encode as enc
from sync.platforms import _xml
from sync.platforms._batches import _key_bytes
from sync.platforms._text import PY_WHITESPACE
from sync.platforms.base import unknown_settings
from sync.platforms.formsonfire import (
    DEFAULT_XML_ROOT,
    ENDPOINT,
    PLATFORM,
    XSI_NAMESPACE,
    BodyFormat,
    UserKey,
)
from sync.records import Batch, Operation, Phase, RowRef

__all__ = [
    "CONTENT_TYPES",
    "MAX_EXPIRY_SECS",
    "MESSAGE_FIELDS",
    "SETTINGS",
    "Builder",
    "OneOrigin",
    "RequestWriter",
    "Stream",
    "batch_id_for",
    "for_job",
    "job_problems",
    "make_batch",
    "push_body",
    "push_of",
    "serialise",
    "split_batch",
    "to_json",
    "to_xml",
    "user_of",
    "xml_unsafe",
]

MAX_EXPIRY_SECS = 2**31 - 1
"""``ExpirySecs`` is documented as an Integer: a 32-bit signed integer on the platform's (.NET) side [I]."""
_XML_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

CONTENT_TYPES: Mapping[BodyFormat, str] = {
    BodyFormat.JSON: "application/json",
    BodyFormat.XML: "application/xml",
}


def push_body(
    user_key: UserKey | str,
    user: str,
    *,
    title: str | None = None,
    body: str | None = None,
    sound: bool | None = None,
    expiry_secs: int | None = None,
) -> dict[str, Any]:
    """One push to one user; None fields are left out. ValueError for an empty user or a negative expiry."""
    key = UserKey(user_key)
    if not isinstance(user, str) or not user.strip():
        raise ValueError(f"{key.value} must be a non-empty string")
    out: dict[str, Any] = {key.value: user}
    if title is not None:
        out["Title"] = str(title)
    if body is not None:
        out["Body"] = str(body)
    if sound is not None:
        if not isinstance(sound, bool):
            raise ValueError("Sound must be true or false")
        out["Sound"] = sound
    if expiry_secs is not None:
        if isinstance(expiry_secs, bool) or not isinstance(expiry_secs, int) or expiry_secs < 0:
            raise ValueError("ExpirySecs must be a non-negative integer")
        out["ExpirySecs"] = expiry_secs
    return out


def user_of(body: Mapping[str, Any]) -> str:
    """The one user a push names (the first identifier present, in the order UserId, UserEmail, UserExternalId)."""
    for key in UserKey:
        value = body.get(key.value)
        if value:
            return str(value)
    raise ValueError("a push names no user (UserId, UserEmail or UserExternalId)")


def _with_credentials(body: Mapping[str, Any], company_id: int, integration_key: str) -> dict[str, Any]:
    return {**body, "CompanyId": int(company_id), "IntegrationKey": integration_key}


def to_json(body: Mapping[str, Any], company_id: int, integration_key: str) -> bytes:
    """The request as JSON (UTF-8)."""
    full = _with_credentials(body, company_id, integration_key)
    return json.dumps(full, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def xml_unsafe(text: str) -> str | None:
    """The first character of ``text`` that XML 1.0 cannot carry at all (C0 controls other than tab, line feed
    and carriage return; U+FFFE, U+FFFF; lone surrogates), or None. No escape helps: ``&#7;`` is not
    well-formed either, so such a value can only travel in a JSON body."""
    found = _XML_UNSAFE.search(text)
    return found.group() if found else None


def _xml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    bad = xml_unsafe(text)
    if bad is not None:
        raise ValueError(f"U+{ord(bad):04X} cannot be carried by XML 1.0: send this push as JSON")
    # &, < and > as entities; a carriage return as a character reference, or every XML parser would read
    # "\r\n" back as "\n" (end-of-line normalisation) and the platform would receive a different text.
    return escape(text, {"\r": "&#13;"})


def to_xml(
    body: Mapping[str, Any], company_id: int, integration_key: str, *, root: str = DEFAULT_XML_ROOT
) -> bytes:
    """The request as XML: ``xmlns:i`` on the root, elements in ordinal alphabetical order, UTF-8; ``&``, ``<``,
    ``>`` and carriage returns escaped, so a parser reads back exactly the value. ValueError for a value XML 1.0
    cannot carry (:func:`xml_unsafe`; the planner rejects such rows before)."""
    full = _with_credentials(body, company_id, integration_key)
    parts = [f'<{root} xmlns:i="{XSI_NAMESPACE}">']
    for name in sorted(full):  # ordinal order, as DataContract serialisers expect
        value = full[name]
        if value is None:
            parts.append(f'<{name} i:nil="true"/>')
        else:
            parts.append(f"<{name}>{_xml_text(value)}</{name}>")
    parts.append(f"</{root}>")
    return "".join(parts).encode("utf-8")


def serialise(
    body: Mapping[str, Any],
    fmt: BodyFormat,
    company_id: int,
    integration_key: str,
    *,
    xml_root: str = DEFAULT_XML_ROOT,
) -> tuple[bytes, str]:
    """``(payload, content type)`` for a push in ``fmt``."""
    if fmt is BodyFormat.JSON:
        return to_json(body, company_id, integration_key), CONTENT_TYPES[fmt]
    return to_xml(body, company_id, integration_key, root=xml_root), CONTENT_TYPES[fmt]


def canonical_json(body: Mapping[str, Any]) -> bytes:
    """A push as canonical JSON (sorted keys, no insignificant whitespace, UTF-8): a JSON batch's body."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


_ID_PREFIX = b"formsonfire\n" + ENDPOINT.encode() + b"\n"


def batch_id_for(body: Mapping[str, Any] | bytes, salt: str = "") -> str:
    """A stable batch ID: 16 hex digits of sha256 over the canonical body (a push, or its canonical JSON
    ``bytes``) and ``salt``.

    Two identical pushes to one user in one file are two messages: the planner passes the row they came from as
    ``salt`` so they get different IDs (and the same IDs on every run of the same input)."""
    digest = hashlib.sha256(_ID_PREFIX)
    digest.update(body if isinstance(body, bytes) else canonical_json(body))
    digest.update(b"\n" + salt.encode("utf-8"))
    return digest.hexdigest()[:16]


class OneOrigin(Mapping[str, RowRef]):
    """A push's origin (its one user → the input row), its :class:`RowRef` made only when read: the dispatcher
    asks for the origins of refused pushes alone."""

    __slots__ = ("_path", "_row", "_user")

    def __init__(self, user: str, path: str, row: int) -> None:
        self._user, self._path, self._row = user, path, row

    def __getitem__(self, user: str) -> RowRef:
        if user != self._user:
            raise KeyError(user)
        return RowRef(self._path, self._row)

    def __iter__(self) -> Iterator[str]:
        return iter((self._user,))

    def __len__(self) -> int:
        return 1

    def __repr__(self) -> str:
        return f"OneOrigin({self._user!r}: {self._path}:{self._row})"


def make_batch(
    body: Mapping[str, Any], *, origin: RowRef | None = None, salt: str | None = None, row_keys: bytes = b""
) -> Batch:
    """Wrap one push (a JSON-ready object) in a :class:`Batch` whose body is its canonical JSON ``bytes``
    (``salt`` defaults to the origin's ``path:row``; ``row_keys``: the packed key of the row it came from,
    :mod:`sync.planning.row_keys`). The ID is the one the planner's builder gives the same push."""
    user = user_of(body)
    if salt is None:
        salt = f"{origin.path}:{origin.row}" if origin is not None else ""
    encoded = canonical_json(body)
    return Batch(
        batch_id=batch_id_for(encoded, salt),
        endpoint=ENDPOINT,
        operation=Operation.SEND_PUSH,
        body=encoded,
        ext_ids=(user,),
        phase=Phase.CHANGES,
        origins={user: origin} if origin is not None else {},
        row_keys=row_keys,
    )


def split_batch(batch: Batch) -> tuple[Batch, Batch] | None:
    """A push names one user: there is nothing to split (always None; kept for the connector's protocol)."""
    del batch
    return None


def _xml_value(name: str, text: str) -> Any:
    if name == "Sound":
        return text == "true"
    if name in ("ExpirySecs", "CompanyId"):
        return int(text)
    return text


def push_of(body: Mapping[str, Any] | bytes) -> dict[str, Any]:
    """A batch body as a JSON-ready push: canonical JSON or XML elements decoded (a cold path: a sample, a
    batch sent in the other body format, a test), an object as it is."""
    if isinstance(body, Mapping):
        return dict(body)
    raw = bytes(body)
    if raw[:1] == b"{":
        decoded: dict[str, Any] = json.loads(raw)
        return decoded
    root = ET.fromstring(b"<push>" + raw + b"</push>")  # the builder's own bytes, not untrusted input
    return {child.tag: _xml_value(child.tag, child.text or "") for child in root}


class RequestWriter:
    """The request bytes of a batch body with the credentials added, in one body format.

    A body in that format gets the credentials spliced in — a JSON body behind ``{``, the XML elements
    ``CompanyId`` and ``IntegrationKey`` at their places in ordinal order (after ``Body`` and after
    ``ExpirySecs``), inside the root — so the bytes the builder made are sent as they are; a body in the other
    format (or a JSON-ready object) is decoded and serialised (:func:`serialise`, a cold path). The result is
    what :func:`serialise` gives for the same push (the XML byte for byte; the JSON with the credentials first).
    """

    __slots__ = ("_company", "_fmt", "_json_prefix", "_key", "_key_element", "_root", "content_type")

    def __init__(
        self, fmt: BodyFormat, company_id: int, integration_key: str, *, xml_root: str = DEFAULT_XML_ROOT
    ) -> None:
        self._fmt = fmt
        self._company = int(company_id)
        self._key = integration_key
        self._root = xml_root
        self.content_type = CONTENT_TYPES[fmt]
        key_json = json.dumps(integration_key, ensure_ascii=False)
        self._json_prefix = f'{{"CompanyId":{self._company},"IntegrationKey":{key_json},'.encode()
        # An IntegrationKey XML cannot carry fails each XML request (as serialise does), not the client.
        self._key_element: bytes | None = None
        if xml_unsafe(integration_key) is None:
            self._key_element = f"<IntegrationKey>{_xml_text(integration_key)}</IntegrationKey>".encode()

    def payload(self, body: Mapping[str, Any] | bytes) -> bytes:
        """The request bytes of ``body``; ValueError for a value XML 1.0 cannot carry."""
        if not isinstance(body, Mapping):
            raw = bytes(body)
            is_json = raw[:1] == b"{"
            if self._fmt is BodyFormat.JSON and is_json:
                return self._json_prefix + raw[1:]
            if self._fmt is BodyFormat.XML and not is_json and self._key_element is not None:
                return self._xml(raw)
        return serialise(push_of(body), self._fmt, self._company, self._key, xml_root=self._root)[0]

    def _xml(self, elements: bytes) -> bytes:
        # The elements' text is escaped, so "<" starts a tag and never occurs inside a value.
        at = elements.find(b"</Body>")
        company_at = at + 7 if at >= 0 else 0
        at = elements.find(b"</ExpirySecs>")
        key_at = at + 13 if at >= 0 else company_at
        return b"".join(
            (
                f'<{self._root} xmlns:i="{XSI_NAMESPACE}">'.encode(),
                elements[:company_at],
                f"<CompanyId>{self._company}</CompanyId>".encode(),
                elements[company_at:key_at],
                self._key_element or b"",
                elements[key_at:],
                f"</{self._root}>".encode(),
            )
        )


# --- from clean frames to batches (the planner's builder) ----------------------------------------------------

_EXT_ID, _FILE, _ROW = "__ext_id", "__file", "__row"
_JSON, _XML_BODY, _HASHED = "__json", "__xml", "__hashed"
_XML_REASON = (
    "contains a character XML 1.0 cannot carry (a control character): use body_format: json to send it"
)
MESSAGE_FIELDS = ("Title", "Body", "Sound", "ExpirySecs")
"""Message fields a job sets per row (an attribute of that name) or for every push (``destination.extra``)."""
_EXTRA_KEYS = {"Title": "title", "Body": "body", "Sound": "sound", "ExpirySecs": "expiry_secs"}
_TRUE = frozenset({"true", "1", "yes", "y", "on"})
_FIELD_TYPES = {"Sound": ValueType.BOOLEAN, "ExpirySecs": ValueType.NUMBER}
"""Message fields that are not strings (the document: Sound Boolean, ExpirySecs Integer) and the column type
that carries them: a value of another type would be sent as text and refused."""
_BLANK = f"^[{PY_WHITESPACE}]*$"


@dataclass(frozen=True, slots=True)
class Stream:
    """The pushes of one users source: the clean-frame columns it reads and the message field of each."""

    columns: tuple[str, ...]
    fields: tuple[str, ...]
    operation: Operation = Operation.SEND_PUSH
    phase: Phase = Phase.CHANGES
    endpoint: str = ENDPOINT


def _python_str(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """``str(value)`` of each value (what a text field of another column type is sent as)."""
    if dtype == pl.String:
        return expr
    if dtype.is_float():
        x = expr.cast(pl.Float64)
        return (
            pl.when(x.is_nan())
            .then(pl.lit("nan"))
            .when(x.is_infinite())
            .then(pl.when(x > 0).then(pl.lit("inf")).otherwise(pl.lit("-inf")))
            .otherwise(enc.floating(x, integral_floats=False))
        )
    if dtype.is_integer():
        return expr.cast(pl.String)
    if dtype == pl.Boolean:
        return pl.when(expr).then(pl.lit("True")).when(~expr).then(pl.lit("False"))
    # Lists and the like: Python's own text of them (a job mapping such a column to a text field; rare).
    return expr.map_elements(str, return_dtype=pl.String)


class Builder:
    """Turns a Forms On Fire job's clean frames into one-push batches; made by :func:`for_job` for the planner.

    Each clean row (one per user: the last row of an ID wins) is one push to the user its external ID names as
    ``user_key``; a row's ``Title``/``Body``/``Sound``/``ExpirySecs`` columns override the job's constants. The
    bodies (canonical JSON, or XML elements) and the text each ID hashes are built as columns; Python makes one
    :class:`Batch` per push.
    """

    def __init__(
        self, user_key: UserKey, constants: Mapping[str, Any], body_format: BodyFormat = BodyFormat.JSON
    ) -> None:
        self._user_key = user_key
        self._constants = dict(constants)
        self._xml = body_format is BodyFormat.XML

    def check_rows(
        self, source: Source, clean: pl.DataFrame, file_name: str
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Split a validated chunk into the rows the platform can take and rejected rows (file, row, column,
        reason; the planner writes them to the rejects file): the ID must not be blank (whitespace alone names
        no user: validation lets it through with ``trim: false``, and the builder would stop the run on it),
        ``ExpirySecs`` must be a whole number from 0 to 2,147,483,647 (an Integer: 1.5 is not rounded), and with
        XML bodies no text may hold a character XML 1.0 cannot carry (JSON bodies carry any)."""
        blank = pl.col(_EXT_ID).str.contains(_BLANK)
        no_user = f"{self._user_key.value} is blank (whitespace alone): it names no user"
        checks: list[tuple[str, pl.Expr]] = [(source.ext_id, pl.when(blank).then(pl.lit(no_user)))]
        if self._xml:
            ids = _xml.unsafe(pl.col(_EXT_ID))
            checks.append((source.ext_id, pl.when(ids).then(pl.lit(_XML_REASON))))
        for a in source.attributes:
            value = pl.col(a.column)
            if a.attribute == "ExpirySecs" and clean.schema[a.column].is_float():
                checks.append(
                    (
                        a.column,
                        pl.when(value.is_nan() | value.is_infinite() | (value != value.floor()))
                        .then(
                            pl.lit(
                                "ExpirySecs must be a whole number of seconds (the platform takes an Integer)"
                            )
                        )
                        .when((value < 0) | (value > MAX_EXPIRY_SECS))
                        .then(pl.lit(f"ExpirySecs must be from 0 to {MAX_EXPIRY_SECS} seconds")),
                    )
                )
            elif self._xml and clean.schema[a.column] == pl.String:
                unsafe = _xml.unsafe(value)
                checks.append((a.column, pl.when(unsafe).then(pl.lit(_XML_REASON))))
        found = clean.with_columns(
            pl.coalesce(
                [pl.when(error.is_not_null()).then(pl.lit(column)) for column, error in checks]
            ).alias("__column"),
            pl.coalesce([error for _, error in checks]).alias("__reason"),
        )
        bad = found["__reason"].is_not_null()
        if not bad.any():  # most chunks: kept as they are
            return clean, pl.DataFrame(schema=REJECTS_SCHEMA)
        rejects = found.filter(bad).select(
            pl.lit(file_name, pl.String).alias("file"),
            pl.col(_ROW).cast(pl.Int64).alias("row"),
            pl.col("__column").alias("column"),
            pl.col("__reason").alias("reason"),
            pl.col(_EXT_ID).alias("ext_id"),
        )
        return clean.filter(~bad), rejects

    def streams_for(self, source: Source) -> list[Stream]:
        if source.kind is not SourceKind.USERS:
            raise ValueError(f"formsonfire takes users sources (one push per user), not {source.kind.value}")
        mapped = [(a.column, a.attribute) for a in source.attributes if a.attribute in MESSAGE_FIELDS]
        return [Stream(tuple(c for c, _ in mapped), tuple(f for _, f in mapped))]

    def _field(self, name: str, column: str | None, dtype: pl.DataType | None) -> tuple[pl.Expr, pl.Expr]:
        """``(JSON text, XML text)`` of one message field: the row's value, else the job's constant (null: the
        field is left out)."""
        constant = self._constants.get(name)
        if name == "Sound":
            texts = [] if constant is None else [pl.lit("true" if constant else "false")]
            if column is not None:
                if dtype != pl.Boolean:
                    raise ValueError("Sound must be true or false")
                texts.insert(0, enc.boolean(pl.col(column)))
            value = pl.coalesce(texts) if texts else pl.lit(None, pl.String)
            return value, value
        if name == "ExpirySecs":
            texts = [] if constant is None else [pl.lit(str(int(constant)))]
            if column is not None:
                if dtype is None or not dtype.is_numeric():
                    raise ValueError("ExpirySecs must be a non-negative integer")
                # check_rows keeps whole numbers from 0 to 2**31-1 alone: the cast is exact.
                texts.insert(0, pl.col(column).cast(pl.Int64).cast(pl.String))
            value = pl.coalesce(texts) if texts else pl.lit(None, pl.String)
            return value, value
        json_texts = [] if constant is None else [pl.lit(enc.key(str(constant)))]
        # The XML text only where it is sent (a JSON job's constant may hold what XML cannot carry).
        xml_texts = [] if constant is None or not self._xml else [pl.lit(_xml_text(str(constant)))]
        if column is not None:
            assert dtype is not None
            text = _python_str(pl.col(column), dtype)
            json_texts.insert(0, enc.string(text))
            xml_texts.insert(0, _xml.text(text))
        none = pl.lit(None, pl.String)
        return (pl.coalesce(json_texts) if json_texts else none), (
            pl.coalesce(xml_texts) if xml_texts else none
        )

    def _encoded(self, stream: Stream, frame: pl.DataFrame, files: Sequence[str]) -> pl.DataFrame:
        """Per row: ``__ext_id``, ``__file``, ``__row``, the body bytes (``__xml`` or ``__json``), the bytes
        its ID hashes after the prefix (``__hashed``: canonical JSON, a newline, ``path:row``) and the row key
        when the frame has one."""
        blank = pl.col(_EXT_ID).str.contains(_BLANK)
        if frame.select(blank.any()).item():
            raise ValueError(f"{self._user_key.value} must be a non-empty string")
        column_of = dict(zip(stream.fields, stream.columns, strict=True))
        user = self._user_key.value
        json_members = {user: enc.string(pl.col(_EXT_ID))}
        xml_members = {user: _xml.text(pl.col(_EXT_ID))}
        for name in MESSAGE_FIELDS:
            column = column_of.get(name)
            json_text, xml_text = self._field(name, column, frame.schema[column] if column else None)
            json_members[name] = json_text
            xml_members[name] = xml_text
        json_body = enc.obj(json_members)
        path = pl.col(_FILE).replace_strict(dict(enumerate(files)), return_dtype=pl.String)
        hashed = pl.concat_str(json_body, pl.lit("\n"), path, pl.lit(":"), pl.col(_ROW).cast(pl.String))
        out = [pl.col(_EXT_ID), pl.col(_FILE), pl.col(_ROW), hashed.cast(pl.Binary).alias(_HASHED)]
        if self._xml:
            elements = [_xml.element(name, xml_members[name]) for name in sorted(xml_members)]
            out.append(pl.concat_str(elements, ignore_nulls=True).cast(pl.Binary).alias(_XML_BODY))
        else:
            out.append(json_body.cast(pl.Binary).alias(_JSON))
        if ROW_KEY in frame.columns:
            out.append(pl.col(ROW_KEY))
        return frame.select(out)

    def stream_batches(
        self, stream: Stream, frames: Iterable[pl.DataFrame], batch_size: int, files: Sequence[str]
    ) -> Iterator[Batch]:
        """One batch per user row (``batch_size`` is ignored: one user per request)."""
        del batch_size
        body_column = _XML_BODY if self._xml else _JSON
        for frame in frames:
            if frame.is_empty():
                continue
            encoded = self._encoded(stream, frame, files)
            keys = _key_bytes(encoded[ROW_KEY]) if ROW_KEY in encoded.columns else b""
            rows = zip(
                encoded[_EXT_ID].to_list(),
                encoded[_FILE].to_list(),
                encoded[_ROW].to_list(),
                encoded[body_column].to_list(),
                encoded[_HASHED].to_list(),
                strict=True,
            )
            for i, (user, file, row, body, hashed) in enumerate(rows):
                yield Batch(
                    batch_id=hashlib.sha256(_ID_PREFIX + hashed).hexdigest()[:16],
                    endpoint=ENDPOINT,
                    operation=Operation.SEND_PUSH,
                    body=body,
                    ext_ids=(user,),
                    phase=Phase.CHANGES,
                    origins=OneOrigin(user, files[file], row),
                    row_keys=keys[8 * i : 8 * i + 8],
                )

    def stream_counts(
        self, stream: Stream, frames: Iterable[pl.DataFrame], batch_size: int
    ) -> tuple[int, int]:
        del stream, batch_size
        rows = sum(frame.height for frame in frames)
        return rows, rows

    def stream_sample(self, stream: Stream, frames: Iterable[pl.DataFrame], max_ids: int = 1) -> Any | None:
        del max_ids
        for frame in frames:
            if frame.is_empty():
                continue
            first = frame.head(1).with_columns(pl.lit(0, pl.Int32).alias(_FILE))  # the path is not shown
            hashed = self._encoded(stream, first, [""])[_HASHED][0]
            return json.loads(hashed[: hashed.rindex(b"\n")])
        return None


def _constant(name: str, raw: str) -> Any:
    if name == "Sound":
        return raw.strip().lower() in _TRUE
    if name == "ExpirySecs":
        return int(raw)
    return raw


def for_job(job: Job) -> Builder:
    """The planner's batch builder for a Forms On Fire job: ``destination.extra.user_key`` (``UserExternalId``
    by default, or ``UserId``/``UserEmail``) and the constants ``title``, ``body``, ``sound``, ``expiry_secs``."""
    extra = job.destination.extra
    constants = {
        name: _constant(name, extra[key]) for name, key in _EXTRA_KEYS.items() if extra.get(key) is not None
    }
    return Builder(
        UserKey(extra.get("user_key", UserKey.USER_EXTERNAL_ID.value)),
        constants,
        BodyFormat(extra.get("body_format") or BodyFormat.JSON),
    )


SETTINGS = (
    "company_id",
    "body_format",
    "response_format",
    "user_key",
    "xml_root",
    *_EXTRA_KEYS.values(),
    "fatal_error_codes",
    "fatal_after",
)
"""The ``destination.extra`` keys a Forms On Fire job may set (docs/formsonfire.md)."""
_FALSE = frozenset({"false", "0", "no", "n", "off"})
_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*")
"""An XML element name without a prefix (ASCII: what a DataContract's name is)."""
_DIGITS = re.compile(r"[0-9]+")
"""A whole number as ``int()`` reads it: ASCII digits (``str.isdigit`` also takes ``²``, which ``int()`` refuses)."""


def job_problems(sources: Sequence[Source], extra: Mapping[str, str]) -> list[JobProblem]:
    """What a Forms On Fire job asks for that the platform cannot do (checked when the job is loaded)."""
    problems = unknown_settings(extra, SETTINGS, PLATFORM)
    if "sound" in extra and extra["sound"].strip().lower() not in _TRUE | _FALSE:
        # Read as a flag, anything but a yes would send Sound false with every push.
        problems.append(JobProblem("destination.extra.sound", "must be true or false"))
    if "xml_root" in extra and not _XML_NAME.fullmatch(extra["xml_root"]):
        problems.append(
            JobProblem("destination.extra.xml_root", "must be an XML element name (e.g. PushRequest)")
        )
    try:
        company = int(extra.get("company_id", ""))
    except ValueError:
        problems.append(JobProblem("destination.extra.company_id", "the CompanyId (an integer) is required"))
    else:
        # An Integer like ExpirySecs: the platform cannot read a larger one (400 for every push, each recorded
        # as refused, until fatal_after blamed the key).
        if not -MAX_EXPIRY_SECS - 1 <= company <= MAX_EXPIRY_SECS:
            problems.append(
                JobProblem(
                    "destination.extra.company_id",
                    f"the CompanyId is an Integer: {company} is out of its range (up to {MAX_EXPIRY_SECS})",
                )
            )
    for key, allowed in (
        ("body_format", [f.value for f in BodyFormat]),
        ("response_format", [f.value for f in BodyFormat]),
        ("user_key", [k.value for k in UserKey]),
    ):
        if key in extra and extra[key] not in allowed:
            problems.append(JobProblem(f"destination.extra.{key}", f"must be one of {', '.join(allowed)}"))
    if "expiry_secs" in extra and not (
        _DIGITS.fullmatch(extra["expiry_secs"]) and int(extra["expiry_secs"]) <= MAX_EXPIRY_SECS
    ):
        problems.append(
            JobProblem(
                "destination.extra.expiry_secs", f"must be a whole number of seconds up to {MAX_EXPIRY_SECS}"
            )
        )
    if extra.get("body_format") == BodyFormat.XML.value:
        for key in ("title", "body"):
            if key in extra and xml_unsafe(extra[key]) is not None:
                problems.append(JobProblem(f"destination.extra.{key}", _XML_REASON))
    for key in ("fatal_after",):
        if key in extra and not _DIGITS.fullmatch(extra[key]):
            problems.append(JobProblem(f"destination.extra.{key}", "must be a whole number (0 turns it off)"))
    for i, source in enumerate(sources):
        loc = f"sources[{i}]"
        if source.kind is not SourceKind.USERS:
            problems.append(JobProblem(f"{loc}.kind", "formsonfire takes users sources (one push per row)"))
        if source.tags or source.opt_ins.columns() or source.email or source.msisdn:
            problems.append(
                JobProblem(
                    loc, "formsonfire sends pushes only: map columns to Title, Body, Sound, ExpirySecs"
                )
            )
        for a in source.attributes:
            where = f"{loc}.attributes.{a.column}"
            if a.attribute not in MESSAGE_FIELDS:
                problems.append(JobProblem(where, f"must map to one of {', '.join(MESSAGE_FIELDS)}"))
            elif a.attribute in _FIELD_TYPES and a.type is not _FIELD_TYPES[a.attribute]:
                problems.append(
                    JobProblem(where, f"{a.attribute} needs type: {_FIELD_TYPES[a.attribute].value}")
                )
    return problems
