"""NotifyVisitors request bodies, value formats, batch IDs and batch splitting. Pure functions: no I/O.

Body shapes (seed 004, ``/work/shared/platforms.md`` §2)::

    user/create   {"nv": [{"userID": "u1", "user_attributes": {"email": "...", "mobile": "+9198...", ...}}]}
    event/create  {"nv": [{"userID": "u1", "event_name": "purchase", "attributes": {...},
                           "event_time": "2024-01-31 12:00:00"}]}

A ``user/create`` request carries at most :data:`MAX_USERS_PER_REQUEST` (100) users, an ``event/create`` request
at most :data:`MAX_EVENTS_PER_REQUEST` (1000) events. The value checks here are the ones the sandbox enforces
(and the platform documents), so the planner can refuse a bad row before anything is sent: ``userID`` ≤ 100
characters, attribute and event names < 50, string values < 1000, ``mobile`` in E.164, ``birth_date`` as
YYYY-MM-DD, ``event_time`` as ``yyyy-MM-dd HH:mm:ss``, opt-in flags as ``"1"``/``"0"``.
"""

from __future__ import annotations

import hashlib
import json
import re
import zoneinfo
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from typing import Any

import polars as pl

from sync.config import Job, Source, SourceKind, ValueType
from sync.errors import JobProblem
from sync.platforms.notifyvisitors import (
    DATE_ATTRIBUTES,
    DATE_FORMAT,
    E164_PATTERN,
    EVENT_CREATE,
    EVENT_TIME_FORMAT,
    MAX_EVENTS_PER_REQUEST,
    MAX_NAME_LENGTH,
    MAX_STRING_LENGTH,
    MAX_USER_ID_LENGTH,
    MAX_USERS_PER_REQUEST,
    OPT_IN_ATTRIBUTES,
    USER_CREATE,
)
from sync.records import Batch, Operation, Phase, RowRef
from sync.row_keys import ROW_KEY, pack
from sync.validation import REJECTS_SCHEMA

__all__ = [
    "DEFAULT_EVENT_TIME_FORMAT",
    "ENDPOINT_FOR",
    "EVENT_TIME_ATTRIBUTE",
    "EVENT_TIME_FORMATS",
    "MAX_ITEMS",
    "Builder",
    "ItemOrigins",
    "Stream",
    "batch_id_for",
    "canonical_json",
    "check_name",
    "check_user_id",
    "event_create_body",
    "event_item",
    "for_job",
    "format_date",
    "format_event_time",
    "format_mobile",
    "iter_batches",
    "job_problems",
    "make_batch",
    "operation_for",
    "opt_in_flag",
    "split_batch",
    "user_attributes",
    "user_create_body",
    "user_ids_in_body",
    "user_item",
]

ENDPOINT_FOR: Mapping[Operation, str] = {
    Operation.SET_ATTRIBUTES: USER_CREATE,
    Operation.FIRE_EVENTS: EVENT_CREATE,
}
"""The endpoint that carries each operation pushsync sends to NotifyVisitors."""

_OPERATION_FOR: Mapping[str, Operation] = {endpoint: op for op, endpoint in ENDPOINT_FOR.items()}

MAX_ITEMS: Mapping[str, int] = {USER_CREATE: MAX_USERS_PER_REQUEST, EVENT_CREATE: MAX_EVENTS_PER_REQUEST}
"""Items (users or events) per request, by endpoint."""

_E164 = re.compile(E164_PATTERN)
_MOBILE_NOISE = re.compile(r"[\s().-]")  # separators people type inside phone numbers
_TRUE = frozenset({"1", "true", "yes", "y", "t", "on"})
_FALSE = frozenset({"0", "false", "no", "n", "f", "off"})


def operation_for(endpoint: str) -> Operation:
    """The operation an endpoint carries; KeyError for endpoints pushsync does not send to."""
    return _OPERATION_FOR[endpoint]


# --- value formats -------------------------------------------------------------------------------------------


def check_user_id(user_id: str) -> str:
    """``userID`` must be a non-empty string of at most 100 characters (ValueError otherwise)."""
    if not isinstance(user_id, str) or not user_id:
        raise ValueError("userID must be a non-empty string")
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise ValueError(f"userID is {len(user_id)} characters long (at most {MAX_USER_ID_LENGTH})")
    return user_id


def check_name(name: str, what: str = "attribute name") -> str:
    """Attribute and event names: non-empty and fewer than 50 characters (ValueError otherwise)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} {name[:20]!r}... is {len(name)} characters (fewer than 50 allowed)")
    return name


def format_mobile(value: str) -> str:
    """A phone number in E.164 (``+919899999999``). Spaces, dots, dashes and brackets are removed and a leading
    ``00`` becomes ``+``; anything else that is not E.164 (no country code, letters, too short or long) raises
    ValueError — the platform refuses it and guessing a country would send to the wrong person."""
    cleaned = _MOBILE_NOISE.sub("", str(value))
    if cleaned.startswith("00"):
        cleaned = "+" + cleaned[2:]
    if not _E164.match(cleaned):
        raise ValueError("mobile is not in E.164 (+ country code and number, 8 to 15 digits)")
    return cleaned


def format_date(value: date | str) -> str:
    """A date as YYYY-MM-DD; strings must already be valid dates in that format."""
    if isinstance(value, datetime):
        return value.date().strftime(DATE_FORMAT)
    if isinstance(value, date):
        return value.strftime(DATE_FORMAT)
    try:
        return datetime.strptime(str(value), DATE_FORMAT).date().strftime(DATE_FORMAT)
    except ValueError:
        raise ValueError(f"date {str(value)[:30]!r} is not YYYY-MM-DD") from None


def format_event_time(value: datetime | str, tz: tzinfo | None = None, fmt: str = EVENT_TIME_FORMAT) -> str:
    """An ``event_time`` without an offset, in ``fmt`` (:data:`EVENT_TIME_FORMATS`; default
    ``yyyy-MM-dd HH:mm:ss``). An aware datetime is first converted to ``tz`` (UTC by default): NotifyVisitors
    takes no offset in this form, so the zone is the job's choice (docs/notifyvisitors.md); naive datetimes are
    sent as they are. Strings must already be a time in either form (``T`` or a space between the parts)."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(tz or UTC)
        return value.strftime(fmt)
    text = str(value).replace("T", " ", 1)
    try:
        return datetime.strptime(text, EVENT_TIME_FORMAT).strftime(fmt)
    except ValueError:
        raise ValueError(f"event_time {str(value)[:30]!r} is not yyyy-MM-dd HH:mm:ss") from None


def opt_in_flag(value: bool | int | str) -> str:
    """An opt-in flag as NotifyVisitors takes it: ``"1"`` or ``"0"``."""
    if isinstance(value, bool):
        return "1" if value else "0"
    text = str(value).strip().lower()
    if text in _TRUE:
        return "1"
    if text in _FALSE:
        return "0"
    raise ValueError(f"opt-in flag {str(value)[:20]!r} is not a yes/no value")


def _scalar(name: str, value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # 34 not 34.0
    if isinstance(value, str) and len(value) > MAX_STRING_LENGTH:
        raise ValueError(f"value of {name!r} is {len(value)} characters (fewer than 1000 allowed)")
    if isinstance(value, datetime):
        return value.strftime(EVENT_TIME_FORMAT)
    if isinstance(value, date):
        return value.strftime(DATE_FORMAT)
    if value is not None and not isinstance(value, str | int | float | bool):
        raise ValueError(f"value of {name!r} must be a string, number or boolean")
    return value


def user_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes in the platform's formats: ``mobile`` → E.164, ``birth_date`` → YYYY-MM-DD, opt-in flags →
    ``"1"``/``"0"``, integral floats → integers; None values are left out (nothing to set). ValueError names
    the first attribute that cannot be sent."""
    out: dict[str, Any] = {}
    for name, value in attributes.items():
        check_name(name)
        if value is None:
            continue
        if name == "mobile":
            out[name] = format_mobile(value)
        elif name in DATE_ATTRIBUTES:
            out[name] = format_date(value)
        elif name in OPT_IN_ATTRIBUTES:
            out[name] = opt_in_flag(value)
        else:
            out[name] = _scalar(name, value)
    return out


def _event_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in attributes.items():
        check_name(name)
        if value is not None:
            out[name] = _scalar(name, value)
    return out


# --- items and bodies ----------------------------------------------------------------------------------------


def user_item(user_id: str, attributes: Mapping[str, Any]) -> dict[str, Any]:
    """One ``user/create`` item (values formatted and checked by :func:`user_attributes`)."""
    return {"userID": check_user_id(user_id), "user_attributes": user_attributes(attributes)}


def event_item(
    user_id: str,
    event_name: str,
    attributes: Mapping[str, Any] | None = None,
    event_time: datetime | str | None = None,
    *,
    tz: tzinfo | None = None,
    fmt: str = EVENT_TIME_FORMAT,
) -> dict[str, Any]:
    """One ``event/create`` item (``event_time`` formatted by :func:`format_event_time`). Left out when None —
    only for callers of their own: the planner rejects an event row without a time (docs/notifyvisitors.md)."""
    item: dict[str, Any] = {
        "userID": check_user_id(user_id),
        "event_name": check_name(event_name, "event name"),
        "attributes": _event_attributes(attributes or {}),
    }
    if event_time is not None:
        item["event_time"] = format_event_time(event_time, tz, fmt)
    return item


def user_create_body(items: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """``user/create`` from ``(user_id, attributes)`` pairs."""
    return {"nv": [user_item(user_id, attrs) for user_id, attrs in items]}


def event_create_body(
    items: Iterable[tuple[str, str, Mapping[str, Any], datetime | str | None]],
) -> dict[str, Any]:
    """``event/create`` from ``(user_id, event_name, attributes, event_time)`` tuples."""
    return {"nv": [event_item(u, name, attrs, when) for u, name, attrs, when in items]}


# --- identity and batches ------------------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys, no insignificant whitespace, UTF-8: equal values give equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def batch_id_for(endpoint: str, body: Any) -> str:
    """A stable batch ID: 16 hex digits of sha256 over the platform, endpoint and canonical body."""
    digest = hashlib.sha256(b"notifyvisitors\n")
    digest.update(endpoint.encode("utf-8"))
    digest.update(b"\n")
    digest.update(canonical_json(body))
    return digest.hexdigest()[:16]


def user_ids_in_body(body: Any) -> tuple[str, ...]:
    """The unique ``userID`` values of a body, in order of first appearance."""
    items = body.get("nv") if isinstance(body, Mapping) else None
    if not isinstance(items, list):
        raise ValueError('a NotifyVisitors body is {"nv": [...]}')
    return tuple(dict.fromkeys(str(item["userID"]) for item in items))


class ItemOrigins(Mapping[str, RowRef]):
    """The origins of a batch whose items may name a user more than once (events): the row of each item, in
    body order (:attr:`rows`). As a mapping (``Batch.origins``) a user's row is their last item's, so once a
    refused batch is split down to one item, the refusal names exactly the row that item came from."""

    __slots__ = ("_by_user", "rows")

    def __init__(self, items: Sequence[Mapping[str, Any]], rows: Sequence[RowRef | None]) -> None:
        if len(items) != len(rows):
            raise ValueError("one row (or None) per item")
        self.rows: tuple[RowRef | None, ...] = tuple(rows)
        self._by_user: dict[str, RowRef] = {
            str(item["userID"]): row for item, row in zip(items, rows, strict=True) if row is not None
        }

    def __getitem__(self, user: str) -> RowRef:
        return self._by_user[user]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_user)

    def __len__(self) -> int:
        return len(self._by_user)

    def __repr__(self) -> str:
        return f"ItemOrigins({self._by_user!r})"


def make_batch(
    endpoint: str,
    body: Any,
    *,
    origins: Mapping[str, RowRef] | None = None,
    rows: Sequence[RowRef | None] | None = None,
    after: str | None = None,
    row_keys: bytes = b"",
) -> Batch:
    """Wrap a body in a :class:`Batch`. ValueError when it holds more items than the endpoint takes.

    ``rows`` (one per item) gives the batch :class:`ItemOrigins`; otherwise ``origins`` maps users to rows.
    ``after`` names the batch this one must follow (``Batch.after``); ``row_keys``: the packed keys of its
    input rows (:mod:`sync.row_keys`)."""
    limit = MAX_ITEMS[endpoint]
    count = len(body["nv"])
    if count == 0 or count > limit:
        raise ValueError(f"{endpoint}: {count} items in one request (1 to {limit})")
    ids = user_ids_in_body(body)
    kept: Mapping[str, RowRef]
    if rows is not None:
        kept = ItemOrigins(body["nv"], rows)
    else:
        kept = {x: origins[x] for x in ids if x in origins} if origins else {}
    return Batch(
        batch_id=batch_id_for(endpoint, body),
        endpoint=endpoint,
        operation=operation_for(endpoint),
        body=body,
        ext_ids=ids,
        phase=Phase.CHANGES,
        origins=kept,
        after=after,
        row_keys=row_keys,
    )


def iter_batches(
    endpoint: str,
    items: Iterable[tuple[dict[str, Any], RowRef | None]],
    batch_size: int | None = None,
) -> Iterator[Batch]:
    """Batches of at most ``batch_size`` items (default and ceiling: the endpoint's limit), in input order.

    Each item comes with the row it was built from (or None). A run of consecutive items of one user (the
    planner's order keeps a user's events together, in file order) is not cut across requests unless it is
    longer than a request holds: the batch so far is sent without it. A batch that shares a user with the
    batch before it names that batch in ``after``, so the dispatcher sends it only once the earlier one has
    finished and the user's events reach the platform in order."""
    return _keyed_batches(endpoint, ((item, origin, None) for item, origin in items), batch_size)


def _keyed_batches(
    endpoint: str,
    items: Iterable[tuple[dict[str, Any], RowRef | None, int | None]],
    batch_size: int | None = None,
) -> Iterator[Batch]:
    """:func:`iter_batches` of items that may carry their input row's key (:mod:`sync.row_keys`): each batch
    keeps the keys of the items it holds."""
    limit = MAX_ITEMS[endpoint]
    size = limit if batch_size is None else batch_size
    if not 1 <= size <= limit:
        raise ValueError(f"{endpoint}: batch size must be 1..{limit}, got {size}")
    packer = _Packer(endpoint, size)
    run: list[tuple[dict[str, Any], RowRef | None, int | None]] = []  # the current user's consecutive items
    for item, origin, key in items:
        if run and str(item["userID"]) != str(run[0][0]["userID"]):
            yield from packer.place(run)
            run = []
        run.append((item, origin, key))
    if run:
        yield from packer.place(run)
    if packer.items:
        yield packer.emit()


class _Packer:
    """Fills requests for :func:`iter_batches`: the batch being filled, and the last one sent."""

    __slots__ = ("endpoint", "items", "keys", "previous", "rows", "size")

    def __init__(self, endpoint: str, size: int) -> None:
        self.endpoint = endpoint
        self.size = size  # items per request
        self.items: list[dict[str, Any]] = []  # of the batch being filled
        self.rows: list[RowRef | None] = []  # the row of each of those items
        self.keys: list[int] = []  # the row keys of those items (keyed input only: sync.row_keys)
        self.previous: Batch | None = None  # the batch sent last: a batch sharing a user with it follows it

    def place(self, run: list[tuple[dict[str, Any], RowRef | None, int | None]]) -> Iterator[Batch]:
        """Add one user's run of items: whole when it fits, else after sending what is there; a run longer
        than a request fills whole requests first (each following the one before)."""
        if self.items and len(self.items) + len(run) > self.size:
            yield self.emit()
        for item, origin, key in run:
            self.items.append(item)
            self.rows.append(origin)
            if key is not None:
                self.keys.append(key)
            if len(self.items) == self.size:
                yield self.emit()

    def emit(self) -> Batch:
        """The batch filled so far (not empty); starts the next."""
        previous = self.previous
        users = {str(item["userID"]) for item in self.items}
        after = previous.batch_id if previous is not None and not users.isdisjoint(previous.ext_ids) else None
        batch = make_batch(
            self.endpoint, {"nv": self.items}, rows=self.rows, after=after, row_keys=pack(self.keys)
        )
        self.items, self.rows, self.keys, self.previous = [], [], [], batch
        return batch


def split_batch(batch: Batch) -> tuple[Batch, Batch] | None:
    """Halve a batch by its items, in body order: refusals are isolated down to the single item (one event of a
    user, not all of them), and the first half is sent before the second, so a user's events keep their
    order. Each half keeps the rows of its own items. None when the batch holds a single item."""
    items = batch.body["nv"]
    if len(items) < 2:
        return None
    middle = len(items) // 2
    origins = batch.origins
    if isinstance(origins, ItemOrigins):
        rows: Sequence[RowRef | None] = origins.rows
    else:  # one row per user: each item gets its user's
        rows = [origins.get(str(item["userID"])) for item in items]
    first = make_batch(batch.endpoint, {"nv": items[:middle]}, rows=rows[:middle], after=batch.after)
    second = make_batch(batch.endpoint, {"nv": items[middle:]}, rows=rows[middle:])
    return first, second


# --- from clean frames to batches (the planner's builder) ----------------------------------------------------
#
# The planner hands over a source's clean frames (typed, validated, deduplicated; see sync.validation) in the
# canonical order. A users source becomes one user/create stream (one item per user), an events source one
# event/create stream (one item per row). Batches are consecutive runs of at most 100 users / 1000 events in
# that order, so their content and IDs do not depend on how the input was chunked.

_EXT_ID, _FILE, _ROW, _EVENT = "__ext_id", "__file", "__row", "__event"
EVENT_TIME_ATTRIBUTE = "event_time"
"""An events source's attribute with this name becomes the event's ``event_time`` (not an attribute)."""
EVENT_TIME_FORMATS: Mapping[str, str] = {
    "yyyy-MM-dd HH:mm:ss": EVENT_TIME_FORMAT,
    "yyyy-MM-ddTHH:mm:ss": "%Y-%m-%dT%H:%M:%S",
}
"""``destination.extra.event_time_format`` → strftime pattern. Both forms carry no offset: the vendor's pages
show ``yyyy-MM-dd HH:mm:ss`` for events and ``yyyy-MM-ddTHH:mm:ss`` (with a ``+0000`` example) in general."""
DEFAULT_EVENT_TIME_FORMAT = "yyyy-MM-dd HH:mm:ss"
_TRUE_SETTING = frozenset({"true", "yes", "1", "on"})
_FALSE_SETTING = frozenset({"false", "no", "0", "off"})


@dataclass(frozen=True, slots=True)
class Stream:
    """The requests of one source: its endpoint, the clean-frame columns it reads and what each names."""

    operation: Operation
    columns: tuple[str, ...]
    names: tuple[str, ...]
    """The attribute name of each column after the first ``skip`` (``__event`` for events)."""
    types: tuple[ValueType, ...]
    skip: int = 0
    phase: Phase = Phase.CHANGES
    rank: int = 0
    """Within the phase, lanes of a lower rank finish first: profiles (0) before events (1) by default."""

    @property
    def endpoint(self) -> str:
        return ENDPOINT_FOR[self.operation]


class Builder:
    """Turns a NotifyVisitors job's clean frames into batches; made by :func:`for_job` for the planner.

    Values are converted to the platform's formats here: opt-in booleans → ``"1"``/``"0"``, ``date`` columns →
    ``YYYY-MM-DD`` (``birth_date``) or ``yyyy-MM-dd HH:mm:ss`` in the job's time zone (``event_time``: in
    ``event_time_format`` and ``event_time_zone``), integral numbers → integers, ``mobile`` → E.164. A value that
    cannot be converted is sent as it is, so the platform refuses that item and the dispatcher records it with
    the platform's reason (the batch is split down to the item). An event row without a time is rejected at
    plan (:meth:`check_rows`).
    """

    def __init__(
        self,
        tz: tzinfo,
        *,
        event_tz: tzinfo | None = None,
        event_time_format: str = DEFAULT_EVENT_TIME_FORMAT,
        events_after_users: bool = True,
    ) -> None:
        self._tz = tz
        self._event_tz = event_tz or tz
        self._event_fmt = EVENT_TIME_FORMATS[event_time_format]
        self._events_rank = 1 if events_after_users else 0

    def streams_for(self, source: Source) -> list[Stream]:
        """One stream per source: ``user/create`` for users, ``event/create`` for events (after the profiles
        unless the job says ``events_after_users: false``)."""
        if source.kind is SourceKind.EVENTS:
            return [
                Stream(
                    Operation.FIRE_EVENTS,
                    (_EVENT, *(a.column for a in source.attributes)),
                    tuple(a.attribute for a in source.attributes),
                    tuple(a.type for a in source.attributes),
                    skip=1,
                    rank=self._events_rank,
                )
            ]
        if source.kind is not SourceKind.USERS:
            raise ValueError(f"notifyvisitors takes users and events sources, not {source.kind.value}")
        mapped = [(a.column, a.attribute, a.type) for a in source.attributes]
        for column, name in ((source.opt_ins.email, "email_opt_in"), (source.opt_ins.sms, "sms_opt_in")):
            if column:
                mapped.append((column, name, ValueType.BOOLEAN))
        for column, name in ((source.email, "email"), (source.msisdn, "mobile")):
            if column:
                mapped.append((column, name, ValueType.STRING))
        return [
            Stream(
                Operation.SET_ATTRIBUTES,
                tuple(c for c, _, _ in mapped),
                tuple(n for _, n, _ in mapped),
                tuple(t for _, _, t in mapped),
            )
        ]

    def check_rows(
        self, source: Source, clean: pl.DataFrame, file_name: str
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """An event row without a time is a rejected row (file, row, column): sent without ``event_time`` the
        platform would date it when it arrives — a retry or a resume later — not when it happened."""
        column = next((a.column for a in source.attributes if a.attribute == EVENT_TIME_ATTRIBUTE), None)
        if source.kind is not SourceKind.EVENTS or column is None:
            return clean, pl.DataFrame(schema=REJECTS_SCHEMA)
        missing = clean[column].is_null()
        rejects = clean.filter(missing).select(
            pl.lit(file_name, pl.String).alias("file"),
            pl.col(_ROW).cast(pl.Int64).alias("row"),
            pl.lit(column, pl.String).alias("column"),
            pl.lit("event_time is missing: every event is sent with the time it happened", pl.String).alias(
                "reason"
            ),
            pl.col(_EXT_ID).alias("ext_id"),
        )
        return clean.filter(~missing), rejects

    def _value(self, name: str, kind: ValueType, value: Any) -> Any:
        if value is None:
            return None
        if kind is ValueType.DATE:
            moment = datetime.fromtimestamp(value / 1000, UTC)
            if name == EVENT_TIME_ATTRIBUTE:
                return moment  # formatted with the event's zone and format in _item
            return moment.astimezone(self._tz).strftime(
                DATE_FORMAT if name in DATE_ATTRIBUTES else EVENT_TIME_FORMAT
            )
        if kind is ValueType.BOOLEAN and name in OPT_IN_ATTRIBUTES:
            return opt_in_flag(value)
        if isinstance(value, list):
            return ",".join(map(str, value))  # [I] NotifyVisitors attributes hold no arrays
        return value

    def _item(self, stream: Stream, row: tuple[Any, ...]) -> dict[str, Any]:
        user_id = row[0]
        values = {
            name: self._value(name, kind, value)
            for name, kind, value in zip(stream.names, stream.types, row[3 + stream.skip :], strict=True)
        }
        attrs = {k: v for k, v in values.items() if v is not None}
        if stream.operation is Operation.SET_ATTRIBUTES:
            if isinstance(attrs.get(EVENT_TIME_ATTRIBUTE), datetime):  # only events have an event_time
                attrs[EVENT_TIME_ATTRIBUTE] = (
                    attrs[EVENT_TIME_ATTRIBUTE].astimezone(self._tz).strftime(EVENT_TIME_FORMAT)
                )
            try:
                return user_item(user_id, attrs)
            except ValueError:
                return {"userID": user_id, "user_attributes": attrs}
        when = attrs.pop(EVENT_TIME_ATTRIBUTE, None)
        if isinstance(when, datetime):
            when = format_event_time(when, self._event_tz, self._event_fmt)
        try:
            return event_item(user_id, row[3], attrs, when, fmt=self._event_fmt)
        except ValueError:
            item = {"userID": user_id, "event_name": row[3], "attributes": attrs}
            return item if when is None else {**item, "event_time": when}

    def _selected(self, stream: Stream, frame: pl.DataFrame) -> pl.DataFrame:
        # A frame of a non-idempotent stream carries its rows' keys (sync.row_keys): kept last, for the batch.
        keys = [ROW_KEY] if ROW_KEY in frame.columns else []
        selected = frame.select(_EXT_ID, _FILE, _ROW, *stream.columns, *keys)
        if stream.operation is Operation.SET_ATTRIBUTES and stream.columns:
            # A user row with nothing to set sends nothing.
            selected = selected.filter(pl.any_horizontal(pl.col(list(stream.columns)).is_not_null()))
        return selected

    def _rows(self, stream: Stream, frames: Iterable[pl.DataFrame]) -> Iterator[tuple[Any, ...]]:
        for frame in frames:
            yield from self._selected(stream, frame).drop(ROW_KEY, strict=False).iter_rows()

    def stream_batches(
        self, stream: Stream, frames: Iterable[pl.DataFrame], batch_size: int, files: Sequence[str]
    ) -> Iterator[Batch]:
        """Batches of at most ``batch_size`` items (capped at the endpoint's limit), in canonical order."""
        size = min(batch_size, MAX_ITEMS[stream.endpoint])

        def items() -> Iterator[tuple[dict[str, Any], RowRef, int | None]]:
            for frame in frames:
                selected = self._selected(stream, frame)
                keyed = ROW_KEY in selected.columns
                for row in selected.iter_rows():
                    key = row[-1] if keyed else None
                    values = row[:-1] if keyed else row
                    yield self._item(stream, values), RowRef(files[row[1]], row[2]), key

        yield from _keyed_batches(stream.endpoint, items(), size)

    def stream_counts(
        self, stream: Stream, frames: Iterable[pl.DataFrame], batch_size: int
    ) -> tuple[int, int]:
        """``(requests, ids)`` :meth:`stream_batches` gives: the same packing (a user's run of items is not cut
        unless it is longer than a request), computed from each user's item count."""
        size = min(batch_size, MAX_ITEMS[stream.endpoint])
        requests = ids = filled = 0
        last: list[str] = []  # users of the batch being filled
        for frame in frames:
            selected = frame
            if stream.operation is Operation.SET_ATTRIBUTES and stream.columns:
                selected = frame.filter(pl.any_horizontal(pl.col(list(stream.columns)).is_not_null()))
            if not selected.height:
                continue
            # Runs of one user, in the frame's (canonical) order: one Python step per user, not per item.
            runs = selected.select(pl.col(_EXT_ID).rle()).unnest(_EXT_ID)
            for run, user in runs.iter_rows():
                if filled and filled + run > size:
                    requests, ids = requests + 1, ids + len(set(last))
                    filled, last = 0, []
                while run:
                    take = min(run, size - filled)
                    filled, run = filled + take, run - take
                    last.append(user)
                    if filled == size:
                        requests, ids = requests + 1, ids + len(set(last))
                        filled, last = 0, []
        if filled:
            requests, ids = requests + 1, ids + len(set(last))
        return requests, ids

    def stream_sample(self, stream: Stream, frames: Iterable[pl.DataFrame], max_ids: int = 3) -> Any | None:
        """A request body built from the stream's first ``max_ids`` items, or None when it is empty."""
        items = []
        for row in self._rows(stream, frames):
            items.append(self._item(stream, row))
            if len(items) >= max_ids:
                break
        return {"nv": items} if items else None


def _setting_flag(extra: Mapping[str, str], key: str, default: bool) -> bool | None:
    """A yes/no setting of ``destination.extra``; None when it is neither."""
    raw = extra.get(key)
    if raw is None:
        return default
    text = str(raw).strip().lower()
    return True if text in _TRUE_SETTING else False if text in _FALSE_SETTING else None


def for_job(job: Job) -> Builder:
    """The planner's batch builder for a NotifyVisitors job: dates in the job's ``validation.timezone``;
    ``event_time`` in ``destination.extra.event_time_zone`` (default: that same zone) and
    ``event_time_format``; events after profiles unless ``events_after_users: false``."""
    extra = job.destination.extra
    tz = zoneinfo.ZoneInfo(job.validation.timezone)
    zone = extra.get("event_time_zone")
    return Builder(
        tz,
        event_tz=zoneinfo.ZoneInfo(zone) if zone else tz,
        event_time_format=extra.get("event_time_format", DEFAULT_EVENT_TIME_FORMAT),
        events_after_users=bool(_setting_flag(extra, "events_after_users", True)),
    )


def job_problems(sources: Sequence[Source], extra: Mapping[str, str]) -> list[JobProblem]:
    """What a NotifyVisitors job asks for that the platform cannot do (checked when the job is loaded)."""
    problems = []
    auth = extra.get("auth", "api_key")
    if auth not in ("api_key", "bearer"):
        problems.append(JobProblem("destination.extra.auth", "must be api_key or bearer"))
    elif auth == "api_key" and not extra.get("brand_id"):
        problems.append(JobProblem("destination.extra.brand_id", "api_key authentication needs the brand ID"))
    if extra.get("event_time_format", DEFAULT_EVENT_TIME_FORMAT) not in EVENT_TIME_FORMATS:
        problems.append(
            JobProblem(
                "destination.extra.event_time_format", f"must be one of {', '.join(EVENT_TIME_FORMATS)}"
            )
        )
    if extra.get("event_time_zone"):
        try:
            zoneinfo.ZoneInfo(extra["event_time_zone"])
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            problems.append(
                JobProblem("destination.extra.event_time_zone", "not a time zone name (e.g. UTC)")
            )
    if _setting_flag(extra, "events_after_users", True) is None:
        problems.append(JobProblem("destination.extra.events_after_users", "must be true or false"))
    if "rate_window" in extra:
        try:
            if not float(extra["rate_window"]) > 0:
                raise ValueError
        except ValueError:
            problems.append(
                JobProblem("destination.extra.rate_window", "must be a number of seconds above 0")
            )
    for i, source in enumerate(sources):
        loc = f"sources[{i}]"
        if source.kind not in (SourceKind.USERS, SourceKind.EVENTS):
            problems.append(JobProblem(f"{loc}.kind", "notifyvisitors takes users and events sources"))
        if source.tags:
            problems.append(JobProblem(f"{loc}.tags", "notifyvisitors has no tags"))
        if source.opt_ins.push or source.opt_ins.categories:
            problems.append(
                JobProblem(
                    f"{loc}.opt_ins",
                    "notifyvisitors takes only email and sms opt-ins (email_opt_in, sms_opt_in)",
                )
            )
        if source.kind is SourceKind.EVENTS:
            times = [a for a in source.attributes if a.attribute == EVENT_TIME_ATTRIBUTE]
            if not times:
                problems.append(
                    JobProblem(
                        f"{loc}.attributes",
                        "map a column to event_time (type: date): every event is sent with its time",
                    )
                )
            elif times[0].type is not ValueType.DATE:
                problems.append(
                    JobProblem(f"{loc}.attributes.{times[0].column}", "event_time needs type: date")
                )
        for a in source.attributes:
            where = f"{loc}.attributes.{a.column}"
            if a.mode.value != "set" or a.on_null.value != "skip":
                problems.append(
                    JobProblem(where, "notifyvisitors attributes are only set (no push, pull or unset)")
                )
            if len(a.attribute) > MAX_NAME_LENGTH:
                problems.append(JobProblem(where, "attribute names must be fewer than 50 characters"))
    return problems
