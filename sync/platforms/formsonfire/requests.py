"""Forms On Fire push bodies, their JSON and XML serialisation, batch IDs. Pure functions: no I/O.

A batch body is the JSON-ready push *without* the credentials, e.g.
``{"UserExternalId": "u1", "Title": "Hi", "Body": "...", "Sound": true, "ExpirySecs": 3600}``: ``CompanyId``
and ``IntegrationKey`` are added by the connector when it serialises the request (:func:`serialise`), so the
integration key never reaches a batch, its ID, the ledger or a log line. One user per request: a batch names
exactly one user and is never split.

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

import polars as pl

from sync.config import Job, Source, SourceKind, ValueType
from sync.errors import JobProblem
from sync.platforms.formsonfire import DEFAULT_XML_ROOT, ENDPOINT, XSI_NAMESPACE, BodyFormat, UserKey
from sync.records import Batch, Operation, Phase, RowRef
from sync.row_keys import ROW_KEY, pack
from sync.validation import REJECTS_SCHEMA

__all__ = [
    "CONTENT_TYPES",
    "MAX_EXPIRY_SECS",
    "MESSAGE_FIELDS",
    "Builder",
    "Stream",
    "batch_id_for",
    "for_job",
    "job_problems",
    "make_batch",
    "push_body",
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
_XML_UNSAFE_POLARS = "[\\x00-\\x08\\x0B\\x0C\\x0E-\\x1F\\x{FFFE}\\x{FFFF}]"
"""The same characters for polars (a Rust regex; valid UTF-8 holds no surrogates)."""

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


def batch_id_for(body: Mapping[str, Any], salt: str = "") -> str:
    """A stable batch ID: 16 hex digits of sha256 over the canonical body and ``salt``.

    Two identical pushes to one user in one file are two messages: the planner passes the row they came from as
    ``salt`` so they get different IDs (and the same IDs on every run of the same input)."""
    digest = hashlib.sha256(b"formsonfire\n" + ENDPOINT.encode() + b"\n")
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    digest.update(b"\n" + salt.encode("utf-8"))
    return digest.hexdigest()[:16]


def make_batch(
    body: Mapping[str, Any], *, origin: RowRef | None = None, salt: str | None = None, row_keys: bytes = b""
) -> Batch:
    """Wrap one push in a :class:`Batch` (``salt`` defaults to the origin's ``path:row``; ``row_keys``: the
    packed key of the row it came from, :mod:`sync.row_keys`)."""
    user = user_of(body)
    if salt is None:
        salt = f"{origin.path}:{origin.row}" if origin is not None else ""
    return Batch(
        batch_id=batch_id_for(body, salt),
        endpoint=ENDPOINT,
        operation=Operation.SEND_PUSH,
        body=dict(body),
        ext_ids=(user,),
        phase=Phase.CHANGES,
        origins={user: origin} if origin is not None else {},
        row_keys=row_keys,
    )


def split_batch(batch: Batch) -> tuple[Batch, Batch] | None:
    """A push names one user: there is nothing to split (always None; kept for the connector's protocol)."""
    del batch
    return None


# --- from clean frames to batches (the planner's builder) ----------------------------------------------------

_EXT_ID, _FILE, _ROW = "__ext_id", "__file", "__row"
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


@dataclass(frozen=True, slots=True)
class Stream:
    """The pushes of one users source: the clean-frame columns it reads and the message field of each."""

    columns: tuple[str, ...]
    fields: tuple[str, ...]
    operation: Operation = Operation.SEND_PUSH
    phase: Phase = Phase.CHANGES
    endpoint: str = ENDPOINT


class Builder:
    """Turns a Forms On Fire job's clean frames into one-push batches; made by :func:`for_job` for the planner.

    Each clean row (one per user: the last row of an ID wins) is one push to the user its external ID names as
    ``user_key``; a row's ``Title``/``Body``/``Sound``/``ExpirySecs`` columns override the job's constants.
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
        reason; the planner writes them to the rejects file): ``ExpirySecs`` must be a whole number from 0 to
        2,147,483,647 (an Integer: 1.5 is not rounded), and with XML bodies no text may hold a character XML
        1.0 cannot carry (JSON bodies carry any)."""
        checks: list[tuple[str, pl.Expr]] = []
        if self._xml:
            ids = pl.col(_EXT_ID).str.contains(_XML_UNSAFE_POLARS).fill_null(False)
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
                unsafe = value.str.contains(_XML_UNSAFE_POLARS).fill_null(False)
                checks.append((a.column, pl.when(unsafe).then(pl.lit(_XML_REASON))))
        if not checks:
            return clean, pl.DataFrame(schema=REJECTS_SCHEMA)
        found = clean.with_columns(
            pl.coalesce(
                [pl.when(error.is_not_null()).then(pl.lit(column)) for column, error in checks]
            ).alias("__column"),
            pl.coalesce([error for _, error in checks]).alias("__reason"),
        )
        bad = found["__reason"].is_not_null()
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

    def _body(self, stream: Stream, row: tuple[Any, ...]) -> dict[str, Any]:
        fields = dict(self._constants)
        for name, value in zip(stream.fields, row[3:], strict=True):
            if value is not None:
                fields[name] = value
        expiry = fields.get("ExpirySecs")
        return push_body(
            self._user_key,
            row[0],
            title=fields.get("Title"),
            body=fields.get("Body"),
            sound=fields.get("Sound"),
            expiry_secs=int(expiry) if expiry is not None else None,
        )

    def _rows(self, stream: Stream, frames: Iterable[pl.DataFrame]) -> Iterator[tuple[Any, ...]]:
        for frame in frames:
            yield from frame.select(_EXT_ID, _FILE, _ROW, *stream.columns).iter_rows()

    def _keyed_rows(
        self, stream: Stream, frames: Iterable[pl.DataFrame]
    ) -> Iterator[tuple[tuple[Any, ...], bytes]]:
        """Rows with the packed key of each (``b""`` for frames without :data:`sync.row_keys.ROW_KEY`)."""
        for frame in frames:
            rows = frame.select(_EXT_ID, _FILE, _ROW, *stream.columns).iter_rows()
            if ROW_KEY not in frame.columns:
                yield from ((row, b"") for row in rows)
                continue
            for row, key in zip(rows, frame[ROW_KEY], strict=True):
                yield row, pack((key,))

    def stream_batches(
        self, stream: Stream, frames: Iterable[pl.DataFrame], batch_size: int, files: Sequence[str]
    ) -> Iterator[Batch]:
        """One batch per user row (``batch_size`` is ignored: one user per request)."""
        del batch_size
        for row, key in self._keyed_rows(stream, frames):
            yield make_batch(self._body(stream, row), origin=RowRef(files[row[1]], row[2]), row_keys=key)

    def stream_counts(
        self, stream: Stream, frames: Iterable[pl.DataFrame], batch_size: int
    ) -> tuple[int, int]:
        del stream, batch_size
        rows = sum(frame.height for frame in frames)
        return rows, rows

    def stream_sample(self, stream: Stream, frames: Iterable[pl.DataFrame], max_ids: int = 1) -> Any | None:
        del max_ids
        for row in self._rows(stream, frames):
            return self._body(stream, row)
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


def job_problems(sources: Sequence[Source], extra: Mapping[str, str]) -> list[JobProblem]:
    """What a Forms On Fire job asks for that the platform cannot do (checked when the job is loaded)."""
    problems = []
    try:
        int(extra.get("company_id", ""))
    except ValueError:
        problems.append(JobProblem("destination.extra.company_id", "the CompanyId (an integer) is required"))
    for key, allowed in (
        ("body_format", [f.value for f in BodyFormat]),
        ("response_format", [f.value for f in BodyFormat]),
        ("user_key", [k.value for k in UserKey]),
    ):
        if key in extra and extra[key] not in allowed:
            problems.append(JobProblem(f"destination.extra.{key}", f"must be one of {', '.join(allowed)}"))
    if "expiry_secs" in extra and not (
        extra["expiry_secs"].isdigit() and int(extra["expiry_secs"]) <= MAX_EXPIRY_SECS
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
        if key in extra and not extra[key].isdigit():
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
