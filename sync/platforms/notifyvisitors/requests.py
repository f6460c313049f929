"""NotifyVisitors request bodies, value formats, batch IDs and batch splitting. Pure functions: no I/O.

Body shapes (seed 004, ``/work/shared/platforms.md`` §2)::

    user/create   {"nv": [{"userID": "u1", "user_attributes": {"email": "...", "mobile": "+9198...", ...}}]}
    event/create  {"nv": [{"userID": "u1", "event_name": "purchase", "attributes": {...},
                           "event_time": "2024-01-31 12:00:00"}]}

A ``user/create`` request carries at most :data:`MAX_USERS_PER_REQUEST` (100) users, an ``event/create`` request
at most :data:`MAX_EVENTS_PER_REQUEST` (1000) events. The value checks are the ones the sandbox enforces (and
the platform documents) — ``userID`` ≤ 100 characters, attribute and event names < 50, string values < 1000,
``mobile`` in E.164, ``email`` an address [I], ``birth_date`` as YYYY-MM-DD, ``event_time`` as ``yyyy-MM-dd
HH:mm:ss``, opt-in flags as ``"1"``/``"0"`` — here for single values, and on columns in :mod:`.checks`, so that
the planner rejects a bad row (:meth:`Builder.check_rows`) before anything is sent.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import math
import re
import zoneinfo
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any

import polars as pl

from sync.config import Job, Source, SourceKind, ValueType
from sync.errors import JobProblem
from sync.planning.row_keys import ROW_KEY
from sync.platforms import _encode as enc
from sync.platforms._batches import _key_bytes
from sync.platforms._row_checks import split_by_checks
from sync.platforms.base import unknown_settings
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
    PLATFORM,
    USER_CREATE,
)
from sync.platforms.notifyvisitors.checks import FLAG_NO, FLAG_YES, e164_text, joined_list, refusal
from sync.records import Batch, Operation, Phase, RowRef

__all__ = [
    "DEFAULT_EVENT_TIME_FORMAT",
    "ENDPOINT_FOR",
    "EVENT_TIME_ATTRIBUTE",
    "EVENT_TIME_FORMATS",
    "MAX_ITEMS",
    "SETTINGS",
    "Builder",
    "ItemOrigins",
    "Stream",
    "batch_id_for",
    "canonical_json",
    "check_name",
    "check_user_id",
    "cut_points",
    "event_create_body",
    "event_item",
    "for_job",
    "format_date",
    "format_event_time",
    "format_mobile",
    "item_rows",
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
    "write_time",
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
_MOBILE_NOISE = re.compile(r"[\s().-]")  # separators people type inside phone numbers (checks.e164_text too)


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


def write_time(moment: date, fmt: str) -> str:
    """``moment.strftime(fmt)`` with the year in four digits, as ``yyyy`` means: C's ``strftime`` (Python's, on
    Linux) writes year 999 as ``999``, a text the platform's ``yyyy-MM-dd`` does not read (0999-01-01 is)."""
    return moment.strftime(fmt.replace("%Y", f"{moment.year:04d}"))


def format_date(value: date | str) -> str:
    """A date as YYYY-MM-DD; strings must already be valid dates in that format."""
    if isinstance(value, datetime):
        return write_time(value.date(), DATE_FORMAT)
    if isinstance(value, date):
        return write_time(value, DATE_FORMAT)
    try:
        return write_time(datetime.strptime(str(value), DATE_FORMAT).date(), DATE_FORMAT)
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
        return write_time(value, fmt)
    text = str(value).replace("T", " ", 1)
    try:
        return write_time(datetime.strptime(text, EVENT_TIME_FORMAT), fmt)
    except ValueError:
        raise ValueError(f"event_time {str(value)[:30]!r} is not yyyy-MM-dd HH:mm:ss") from None


def opt_in_flag(value: bool | int | str) -> str:
    """An opt-in flag as NotifyVisitors takes it: ``"1"`` or ``"0"``."""
    if isinstance(value, bool):
        return "1" if value else "0"
    text = str(value).strip().lower()
    if text in FLAG_YES:
        return "1"
    if text in FLAG_NO:
        return "0"
    raise ValueError(f"opt-in flag {str(value)[:20]!r} is not a yes/no value")


def _scalar(name: str, value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # 34 not 34.0
    if isinstance(value, str) and len(value) > MAX_STRING_LENGTH:
        raise ValueError(f"value of {name!r} is {len(value)} characters (fewer than 1000 allowed)")
    if isinstance(value, datetime):
        return write_time(value, EVENT_TIME_FORMAT)
    if isinstance(value, date):
        return write_time(value, DATE_FORMAT)
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


_ID_PREFIX = b"notifyvisitors\n"


def batch_id_for(endpoint: str, body: Any) -> str:
    """A stable batch ID: 16 hex digits of sha256 over the platform, endpoint and canonical body (a JSON-ready
    object, or its canonical JSON ``bytes``: a batch's body)."""
    digest = hashlib.sha256(_ID_PREFIX)
    digest.update(endpoint.encode("utf-8"))
    digest.update(b"\n")
    digest.update(body if isinstance(body, bytes) else canonical_json(body))
    return digest.hexdigest()[:16]


def _decoded(body: Any) -> Any:
    return json.loads(bytes(body)) if isinstance(body, bytes | bytearray | memoryview) else body


def user_ids_in_body(body: Any) -> tuple[str, ...]:
    """The unique ``userID`` values of a body (an object, or its encoded ``bytes``), in order of first
    appearance."""
    body = _decoded(body)
    items = body.get("nv") if isinstance(body, Mapping) else None
    if not isinstance(items, list):
        raise ValueError('a NotifyVisitors body is {"nv": [...]}')
    return tuple(dict.fromkeys(str(item["userID"]) for item in items))


_EXT_USER, _EXT_FILE, _EXT_ROW = "__ext_id", "__file", "__row"


class ItemOrigins(Mapping[str, RowRef]):
    """The origins of a batch whose items may name a user more than once (events): the row of each item, in
    body order (:attr:`rows`). As a mapping (``Batch.origins``) a user's row is their last item's, so once a
    refused batch is split down to one item, the refusal names exactly the row that item came from.

    The planner's batches keep the rows as polars columns (:meth:`of_columns`) until something reads them — a
    refused batch, a split — so a batch that goes through never makes these objects."""

    __slots__ = ("_by_user", "_columns", "_rows")

    def __init__(self, items: Sequence[Mapping[str, Any]], rows: Sequence[RowRef | None]) -> None:
        if len(items) != len(rows):
            raise ValueError("one row (or None) per item")
        self._columns: tuple[Sequence[tuple[pl.DataFrame, int, int]], Sequence[str]] | None = None
        self._rows: tuple[RowRef | None, ...] | None = tuple(rows)
        self._by_user: dict[str, RowRef] | None = {
            str(item["userID"]): row for item, row in zip(items, rows, strict=True) if row is not None
        }

    @classmethod
    def of_columns(cls, spans: Sequence[tuple[pl.DataFrame, int, int]], names: Sequence[str]) -> ItemOrigins:
        """Lazy origins: the items are the rows ``first..end`` of each frame (``__ext_id``, ``__file``: the
        index of the item's file in ``names``, ``__row``), in order."""
        self = cls.__new__(cls)
        self._columns, self._rows, self._by_user = (spans, names), None, None
        return self

    def _frame(self) -> pl.DataFrame:
        assert self._columns is not None
        spans = self._columns[0]
        return pl.concat([frame.slice(first, end - first) for frame, first, end in spans])

    @property
    def rows(self) -> tuple[RowRef | None, ...]:
        """The input row of each item, in body order."""
        if self._rows is None:
            assert self._columns is not None
            names = self._columns[1]
            frame = self._frame()
            self._rows = tuple(
                RowRef(names[f], r)
                for f, r in zip(frame[_EXT_FILE].to_list(), frame[_EXT_ROW].to_list(), strict=True)
            )
        return self._rows

    def _users(self) -> dict[str, RowRef]:
        if self._by_user is None:
            users = self._frame()[_EXT_USER].to_list()
            self._by_user = {user: row for user, row in zip(users, self.rows, strict=True) if row is not None}
        return self._by_user

    def __getitem__(self, user: str) -> RowRef:
        return self._users()[user]

    def __iter__(self) -> Iterator[str]:
        return iter(self._users())

    def __len__(self) -> int:
        return len(self._users())

    def __repr__(self) -> str:
        return f"ItemOrigins({self._users()!r})"


def make_batch(
    endpoint: str,
    body: Any,
    *,
    origins: Mapping[str, RowRef] | None = None,
    rows: Sequence[RowRef | None] | None = None,
    after: str | None = None,
    row_keys: bytes = b"",
) -> Batch:
    """Wrap a body (a JSON-ready object, or its canonical JSON ``bytes``) in a :class:`Batch` whose body is the
    canonical JSON ``bytes`` the planner's builder gives the same request. ValueError when it holds more items
    than the endpoint takes.

    ``rows`` (one per item) gives the batch :class:`ItemOrigins`; otherwise ``origins`` maps users to rows.
    ``after`` names the batch this one must follow (``Batch.after``); ``row_keys``: the packed keys of its
    input rows (:mod:`sync.planning.row_keys`)."""
    body = _decoded(body)
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
    encoded = canonical_json(body)
    return Batch(
        batch_id=batch_id_for(endpoint, encoded),
        endpoint=endpoint,
        operation=operation_for(endpoint),
        body=encoded,
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
    finished and the user's events reach the platform in order. (The planner's builder packs the same way
    with columns: :func:`cut_points`.)"""
    limit = MAX_ITEMS[endpoint]
    size = limit if batch_size is None else batch_size
    if not 1 <= size <= limit:
        raise ValueError(f"{endpoint}: batch size must be 1..{limit}, got {size}")
    listed = list(items)
    users = [str(item["userID"]) for item, _ in listed]
    if not users:
        return
    starts, _ = cut_points(_run_ends(pl.Series(users, dtype=pl.String)), len(users), size, 0)
    previous: Batch | None = None
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(listed)
        chunk = listed[start:end]
        shared = previous is not None and not set(users[start:end]).isdisjoint(previous.ext_ids)
        after = previous.batch_id if previous is not None and shared else None
        previous = make_batch(
            endpoint, {"nv": [item for item, _ in chunk]}, rows=[row for _, row in chunk], after=after
        )
        yield previous


def cut_points(ends: pl.Series, n: int, size: int, carried: int) -> tuple[list[int], bool]:
    """Where the requests of one frame start, packing as :func:`iter_batches` describes.

    ``ends`` are the (exclusive) end positions of the frame's runs of one user, ascending, the last ``n``;
    ``carried`` items of a batch left open by earlier frames come first (positions ``-carried..-1``; a frame
    starts with a new user). Returns the start of each request (the first ``-carried`` when that batch is
    continued) and whether the last one is still open (fewer than ``size`` items: the next frame may add to
    it). Python steps once per request: a binary search (over the column's buffer, no Python object per run)
    finds the last run that still fits."""
    if len(ends) == n:  # one item per user (profiles): requests are plain chunks
        starts = list(range(-carried, n, size))
        return starts, n - starts[-1] < size
    view = _int64_view(ends)
    starts = []
    start = -carried
    while True:
        i = bisect.bisect_right(view, start + size) - 1
        end = view[i] if i >= 0 else 0  # 0: where the frame (a new user) starts
        if end <= start:
            end = start + size  # one user's run longer than a request: cut inside it
        starts.append(start)
        if end >= n:
            return starts, end - start < size
        start = end


def _int64_view(values: pl.Series) -> memoryview:
    """An Int64 column's values as a read-only sequence of Python ints made on access (its Arrow buffer)."""
    arrow = values.cast(pl.Int64).rechunk().to_arrow()
    buffer = arrow.buffers()[1]
    assert buffer is not None
    return memoryview(buffer).cast("q")[arrow.offset : arrow.offset + len(values)]


def _run_ends(users: pl.Series) -> pl.Series:
    """The (exclusive) end positions of the runs of one user in ``users``, ascending."""
    starts = users.ne_missing(users.shift(1)).arg_true().cast(pl.Int64)
    return pl.concat([starts.slice(1), pl.Series([users.len()], dtype=pl.Int64)])


def split_batch(batch: Batch) -> tuple[Batch, Batch] | None:
    """Halve a batch by its items, in body order: refusals are isolated down to the single item (one event of a
    user, not all of them), and the first half is sent before the second, so a user's events keep their
    order. Each half keeps the rows of its own items. None when the batch holds a single item. (A cold path:
    the body is decoded.)"""
    items = _decoded(batch.body)["nv"]
    if len(items) < 2:
        return None
    middle = len(items) // 2
    rows = item_rows(batch, items)
    first = make_batch(batch.endpoint, {"nv": items[:middle]}, rows=rows[:middle], after=batch.after)
    second = make_batch(batch.endpoint, {"nv": items[middle:]}, rows=rows[middle:])
    return first, second


def item_rows(batch: Batch, items: Sequence[Mapping[str, Any]]) -> Sequence[RowRef | None]:
    """The input row of each of ``items`` (the batch's decoded items): its :class:`ItemOrigins`' rows, or each
    item's user's row."""
    origins = batch.origins
    if isinstance(origins, ItemOrigins):
        return origins.rows
    return [origins.get(str(item["userID"])) for item in items]


# --- from clean frames to batches (the planner's builder) ----------------------------------------------------
#
# The planner hands over a source's clean frames (typed, validated, deduplicated; see sync.planning.validation) in the
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


_ITEM, _BAD, _ODD, _B, _NEW = "__item", "__bad", "__odd", "__b", "__new"


_FIRST_MS = -30_610_137_600_000  # 1000-01-02T00:00:00Z
_LAST_MS = 2_114_380_800_000  # 2037-01-01T00:00:00Z


def _zone_name(tz: tzinfo) -> str | None:
    """The IANA name of a time zone (polars converts by name), None when it has none."""
    key = getattr(tz, "key", None)
    if isinstance(key, str):
        return key
    return "UTC" if tz == UTC else None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@functools.cache
def _writable_ms(tz: tzinfo) -> tuple[int, int]:
    """The first and last epoch milliseconds a date column's value can be written from in ``tz``: in years
    0001-9999 both in UTC (the builder reads it with :meth:`datetime.fromtimestamp`) and in ``tz`` (it writes the
    local time) — Python's own limits, so whatever the zone's offset then (its local mean time, before time
    zones), the plan and the builder agree."""

    def ms(moment: datetime) -> int:
        return (moment - _EPOCH) // timedelta(milliseconds=1)

    first = max(ms(datetime.min.replace(tzinfo=UTC)), ms(datetime.min.replace(tzinfo=tz)))
    last = min(ms(datetime.max.replace(tzinfo=UTC)), ms(datetime.max.replace(tzinfo=tz)))
    return first, last


def _unwritable_date(name: str, column: str, tz: tzinfo) -> pl.Expr:
    """Why a date column's value cannot be sent (null where it can): a time outside years 0001-9999 in UTC or in
    the zone it is written in (a 0001-01-01 placeholder in Asia/Kolkata is year 0 in UTC, 9999-12-31T23:00Z year
    10000 there). The builder's Python conversion raised on it and stopped the run."""
    first, last = _writable_ms(tz)
    zone = _zone_name(tz) or str(tz)
    return pl.when(~pl.col(column).is_between(first, last)).then(
        pl.lit(
            f"{name} falls outside years 0001-9999 in UTC or in time zone {zone}: it cannot be written as "
            "NotifyVisitors takes dates"
        )
    )


@dataclass(frozen=True, slots=True)
class _Attribute:
    """One attribute's JSON text as the platform takes it (``formatted``) and as it is (``as_is``, what an item
    that cannot be formatted sends: the platform refuses it with its reason; the planner's frames hold no such
    item, :meth:`Builder.check_rows` rejects its row), the rows where formatting fails
    (``bad``) and the rows the columns cannot build (``odd``: :meth:`Builder._item` does). ``None`` texts: every
    non-null value is odd."""

    formatted: enc.Member | None
    as_is: enc.Member | None
    bad: pl.Expr
    odd: pl.Expr
    present: bool = False
    """The texts are null exactly where the column is, and the frame's column has no null: an object takes them
    in as a required member (one string copy fewer)."""


def _time_text(local: pl.Expr, fmt: str) -> pl.Expr:
    """The JSON string of times written by ``strftime(fmt)``: a format without a character JSON escapes writes
    none (its fields are digits, names and zone abbreviations; ``%t`` and ``%n`` write a tab and a line break, so
    a format with them is escaped), so the text is put between quotes without the escaping pass; otherwise
    escaped as any string."""
    if "%t" not in fmt and "%n" not in fmt and enc.plain_strings(pl.Series([fmt], dtype=pl.String)):
        return pl.concat_str(pl.lit('"'), local, pl.lit('"'))
    return enc.string(local)


@dataclass(frozen=True, slots=True)
class _Piece:
    """The content of one request in the making: its items' JSON texts (UTF-8, joined with ``,`` in pieces),
    its users in order, where its items are (``(frame of __ext_id, __file, __row; first; end)`` per frame it
    spans: sliced only when its origins are read), its row keys and its item count."""

    texts: list[bytes]
    users: list[str]
    spans: list[tuple[pl.DataFrame, int, int]]
    keys: list[bytes]
    count: int

    def joined(self, other: _Piece) -> _Piece:
        """This request continued by ``other`` (the next frame's first items)."""
        same = bool(self.users and other.users and self.users[-1] == other.users[0])
        return _Piece(
            self.texts + other.texts,
            self.users + (other.users[1:] if same else other.users),
            self.spans + other.spans,
            self.keys + other.keys,
            self.count + other.count,
        )


class Builder:
    """Turns a NotifyVisitors job's clean frames into batches; made by :func:`for_job` for the planner.

    Values are converted to the platform's formats here: opt-in booleans → ``"1"``/``"0"``, ``date`` columns →
    ``YYYY-MM-DD`` (``birth_date``) or ``yyyy-MM-dd HH:mm:ss`` in the job's time zone (``event_time``: in
    ``event_time_format`` and ``event_time_zone``), integral numbers → integers, ``mobile`` → E.164. A row whose
    value the platform would refuse once converted — a ``mobile`` that is not E.164, a text of 1000 characters or
    more, an ``email`` that is not an address, a ``birth_date`` or opt-in flag that cannot be read, an ID or event
    name too long, an event without a time — is a rejected row of the plan (:meth:`check_rows`,
    :mod:`sync.platforms.notifyvisitors.checks`): it is never sent, and costs its request nothing. The builder
    itself still sends such a value as it is (frames that did not pass the plan's check: a caller of its own),
    so the platform refuses that item and the dispatcher records it with the platform's reason (the batch is
    split down to the item), as it does for a refusal the plan cannot foresee.

    Items are built as columns (:meth:`_items`, polars expressions; the bodies are their canonical JSON joined,
    as ``bytes``), requests cut with one Python step per request (:func:`cut_points`). :meth:`_item` is the
    row-by-row reference, used for the rows the columns leave to it (text dates and flags parsed leniently,
    dates outside 1000..2036) and by the property tests that hold the two equal.
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
        """Rows the platform refuses whatever the rest of their request holds are rejected rows (file, row,
        column, reason), found by ``pushsync plan`` rather than by the platform — which refuses the whole
        request, so the dispatcher would halve it down to the item (about 2·log2(n) requests per bad row):

        * an ID longer than ``userID`` may be (100 characters, whatever ``validation.max_id_length`` allows);
        * an event name longer than the platform takes (49 characters);
        * a value the platform refuses once converted (:func:`sync.platforms.notifyvisitors.checks.refusal`): a
          text of 1000 characters or more, a ``mobile`` that is not E.164 after clean-up, an ``email`` that is not
          an address, a ``birth_date`` or opt-in flag that cannot be read as one;
        * a date outside years 0001-9999 in UTC or in the zone it is written in (:func:`_unwritable_date`);
        * an event row without a time — sent without ``event_time`` the platform would date it when it arrives
          (a retry or a resume later), not when it happened.

        A row's reason is its first failed check, in that order (``column``: the job's input column)."""
        user_id = pl.col(_EXT_ID).str.len_chars()
        checks: list[tuple[str, pl.Expr]] = [
            (
                source.ext_id,
                pl.when(user_id > MAX_USER_ID_LENGTH).then(
                    pl.format(
                        "userID is {} characters long: NotifyVisitors takes at most {}",
                        user_id,
                        pl.lit(MAX_USER_ID_LENGTH),
                    )
                ),
            )
        ]
        events = source.kind is SourceKind.EVENTS
        if events and source.event:
            event_name = pl.col(_EVENT).str.len_chars()
            checks.append(
                (
                    source.event,
                    pl.when(event_name > MAX_NAME_LENGTH).then(
                        pl.format(
                            "event name is {} characters long: NotifyVisitors takes at most {}",
                            event_name,
                            pl.lit(MAX_NAME_LENGTH),
                        )
                    ),
                )
            )
        for stream in self.streams_for(source):
            user = stream.operation is Operation.SET_ATTRIBUTES
            columns = stream.columns[stream.skip :]
            for attribute, kind, column in zip(stream.names, stream.types, columns, strict=True):
                if kind is ValueType.DATE:
                    event_time = not user and attribute == EVENT_TIME_ATTRIBUTE
                    zone = self._event_tz if event_time else self._tz
                    checks.append((column, _unwritable_date(attribute, column, zone)))
                if not user and attribute == EVENT_TIME_ATTRIBUTE:
                    continue  # the event's time, not an attribute: checked below
                validated = (attribute, column) in (("email", source.email), ("mobile", source.msisdn))
                reason = refusal(
                    attribute, kind, clean.schema[column], column, user=user, validated=user and validated
                )
                if reason is not None:
                    checks.append((column, reason))
        when = next((a.column for a in source.attributes if a.attribute == EVENT_TIME_ATTRIBUTE), None)
        if events and when is not None:
            checks.append(
                (
                    when,
                    pl.when(pl.col(when).is_null()).then(
                        pl.lit("event_time is missing: every event is sent with the time it happened")
                    ),
                )
            )
        return split_by_checks(clean, checks, file_name)

    def _value(self, name: str, kind: ValueType, value: Any) -> Any:
        if value is None:
            return None
        if kind is ValueType.DATE:
            try:
                moment = datetime.fromtimestamp(value / 1000, UTC)
                if name == EVENT_TIME_ATTRIBUTE:
                    moment.astimezone(self._tz), moment.astimezone(self._event_tz)  # written in one of them
                    return moment  # formatted with the event's zone and format in _item
                return write_time(
                    moment.astimezone(self._tz), DATE_FORMAT if name in DATE_ATTRIBUTES else EVENT_TIME_FORMAT
                )
            except (ValueError, OverflowError):
                return value  # outside years 1-9999 (check_rows rejects such a row): sent as it is
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
                attrs[EVENT_TIME_ATTRIBUTE] = write_time(
                    attrs[EVENT_TIME_ATTRIBUTE].astimezone(self._tz), EVENT_TIME_FORMAT
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
        if stream.operation is Operation.SET_ATTRIBUTES and stream.columns:
            # A user row with nothing to set sends nothing.
            return frame.filter(pl.any_horizontal(pl.col(list(stream.columns)).is_not_null()))
        return frame

    def _local_time(self, column: str, tz: tzinfo, fmt: str) -> tuple[pl.Expr, pl.Expr] | None:
        """``(text, odd)`` of a date column (epoch milliseconds) as local time in ``tz`` and ``fmt``. Odd (built
        the Python way) outside 1000-01-02..2036-12-31 UTC: years below 1000 are written by
        :func:`write_time` (the text polars and Python write for them is not one to rely on), and
        polars' zone rules (chrono-tz) stop following a zone's daylight-saving rule after 2037, where Python's
        zoneinfo keeps applying it. None when ``tz`` has no IANA name polars knows."""
        name = _zone_name(tz)
        if name is None:
            return None
        local = (
            pl.from_epoch(pl.col(column), time_unit="ms")
            .dt.replace_time_zone("UTC")
            .dt.convert_time_zone(name)
        )
        odd = pl.col(column).is_not_null() & ~pl.col(column).is_between(_FIRST_MS, _LAST_MS, closed="left")
        return local.dt.strftime(fmt), odd

    def _attribute(
        self, stream: Stream, name: str, kind: ValueType, column: str, frame: pl.DataFrame
    ) -> _Attribute:
        """One attribute's JSON texts (formatted and as-is), the rows where formatting fails and the rows the
        columns cannot build (:meth:`_item` does: lenient parsing of text flags and dates, odd years). The
        texts of a plain column are chosen for ``frame``'s values (:func:`sync.platforms._encode.column_text`)."""
        dtype = frame.schema[column]
        col = pl.col(column)
        present = col.is_not_null()
        none = pl.lit(False)
        users = stream.operation is Operation.SET_ATTRIBUTES
        if kind is ValueType.DATE and dtype.is_integer():
            fmt = DATE_FORMAT if name in DATE_ATTRIBUTES else EVENT_TIME_FORMAT
            local = self._local_time(column, self._tz, fmt)
            if local is None or (users and name in ("mobile", *OPT_IN_ATTRIBUTES)):
                return _Attribute(None, None, none, present)
            text = _time_text(local[0], fmt)
            return _Attribute(text, text, none, local[1])
        if kind is ValueType.BOOLEAN and name in OPT_IN_ATTRIBUTES and dtype == pl.Boolean:
            flag = pl.when(col).then(pl.lit('"1"')).when(~col).then(pl.lit('"0"'))
            return _Attribute(flag, flag, none, none)
        value = col
        if isinstance(dtype, pl.List):
            value = joined_list(col)
            dtype = pl.String()
        if users and name == "mobile":
            if dtype != pl.String:
                return _Attribute(None, None, none, present)
            cleaned = e164_text(value)
            bad = present & ~cleaned.str.contains(E164_PATTERN)
            return _Attribute(enc.string(cleaned), enc.string(value), bad, none)
        if users and name in (*DATE_ATTRIBUTES, *OPT_IN_ATTRIBUTES):
            return _Attribute(None, None, none, present)  # text parsed leniently: the Python way
        # A plain column (not a list joined above): its text is chosen for this frame's values.
        plain = value is col
        whole = plain and frame.get_column(column).null_count() == 0
        if dtype == pl.String:
            string: enc.Member = enc.column_text(frame, column) if plain else enc.string(value)
            long = present & (value.str.len_chars() > MAX_STRING_LENGTH)
            return _Attribute(string, string, long, none, whole)
        if dtype.is_float():
            return _Attribute(
                enc.column_text(frame, column),
                enc.column_text(frame, column, integral_floats=False),
                none,
                none,
                whole,
            )
        if dtype.is_integer() or dtype == pl.Boolean:
            text = enc.value(value, dtype)
            return _Attribute(text, text, none, none, whole)
        return _Attribute(None, None, none, present)

    def _items(self, stream: Stream, frame: pl.DataFrame) -> pl.DataFrame:
        """The stream's rows of ``frame`` with each item's JSON text (``__item``): ``__ext_id``, ``__file``,
        ``__row``, ``__item`` and the row key when the frame has one. Built as columns; the rare rows the
        columns cannot build (see :meth:`_attribute`) are built by :meth:`_item`."""
        selected = self._selected(stream, frame)
        user_id = pl.col(_EXT_ID)
        bad = ~user_id.str.len_chars().is_between(1, MAX_USER_ID_LENGTH)
        odd: pl.Expr = pl.lit(False)
        formatted: dict[str, enc.Member] = {}
        as_is: dict[str, enc.Member] = {}
        present: set[str] = set()  # attributes whose text is never null in this frame
        when: pl.Expr | None = None
        columns = stream.columns[stream.skip :]
        for name, kind, column in zip(stream.names, stream.types, columns, strict=True):
            dtype = selected.schema[column]
            if stream.operation is Operation.FIRE_EVENTS and name == EVENT_TIME_ATTRIBUTE:
                local = (
                    self._local_time(column, self._event_tz, self._event_fmt) if dtype.is_integer() else None
                )
                if kind is not ValueType.DATE or local is None:
                    odd = odd | pl.col(column).is_not_null()
                    when = None
                else:
                    when, odd = _time_text(local[0], self._event_fmt), odd | local[1]
                formatted.pop(name, None)
                as_is.pop(name, None)
                present.discard(name)
                continue
            if not name or len(name) > MAX_NAME_LENGTH:
                bad = bad | pl.lit(True)  # as check_name refuses it: every item goes as it is
            attribute = self._attribute(stream, name, kind, column, selected)
            if attribute.formatted is None or attribute.as_is is None:
                formatted[name] = as_is[name] = pl.lit(None, pl.String)
                present.discard(name)
            else:
                formatted[name], as_is[name] = attribute.formatted, attribute.as_is
                if attribute.present:
                    present.add(name)
                else:
                    present.discard(name)
            bad, odd = bad | attribute.bad, odd | attribute.odd
        # userID and the attributes' object are never null: required members, built with fewer string copies.
        uid = enc.column_text(selected, _EXT_ID)
        required: tuple[str, ...]
        if stream.operation is Operation.SET_ATTRIBUTES:
            required = ("userID", "user_attributes")
            attrs = enc.obj_text(formatted, required=present)
            good = enc.obj({"userID": uid, "user_attributes": attrs}, required=required)
            fallback = enc.obj(
                {"userID": uid, "user_attributes": enc.obj_text(as_is, required=present)}, required=required
            )
        else:
            event = pl.col(_EVENT)
            bad = bad | ~event.str.len_chars().is_between(1, MAX_NAME_LENGTH).fill_null(False)
            name_text = enc.column_text(selected, _EVENT)
            if isinstance(name_text, enc.Text):
                name_text = name_text.expr()
            head: dict[str, enc.Member] = {"userID": uid, "event_name": enc.or_null(name_text)}
            if when is not None:
                head["event_time"] = when
            required = ("userID", "event_name", "attributes")
            attrs = enc.obj_text(formatted, required=present)
            good = enc.obj({**head, "attributes": attrs}, required=required)
            fallback = enc.obj(
                {**head, "attributes": enc.obj_text(as_is, required=present)}, required=required
            )
        keys = [pl.col(ROW_KEY)] if ROW_KEY in selected.columns else []
        items = selected.select(
            pl.col(_EXT_ID),
            pl.col(_FILE),
            pl.col(_ROW),
            good.alias(_ITEM),
            bad.fill_null(False).alias(_BAD),
            odd.fill_null(False).alias(_ODD),
            *keys,
        )
        bad_rows = items[_BAD]
        if bad_rows.any():
            # Items sent as they are (the platform refuses them): built for those rows alone.
            at = bad_rows.arg_true()
            fallbacks = selected[at].select(fallback).to_series()
            items = items.with_columns(items[_ITEM].scatter(at, fallbacks))
        odd_rows = items[_ODD]
        if odd_rows.any():
            # The Python way, for the rows that need it alone (their items replace the columns' ones).
            at = odd_rows.arg_true()
            rows = selected[at].select(_EXT_ID, _FILE, _ROW, *stream.columns).iter_rows()
            texts = [canonical_json(self._item(stream, row)).decode("utf-8") for row in rows]
            items = items.with_columns(items[_ITEM].scatter(at, texts))
        return items.drop(_BAD, _ODD)

    def _cuts(
        self, stream: Stream, frames: Iterable[pl.DataFrame], size: int, files: Sequence[str]
    ) -> Iterator[_Piece]:
        """The request contents of a stream, in order: its frames' items cut by :func:`cut_points`, a batch
        left open at the end of a frame continued in the next."""
        open_piece: _Piece | None = None
        for frame in frames:
            items = self._items(stream, frame)
            n = items.height
            if not n:
                continue
            ids = items[_EXT_ID]
            carried = open_piece.count if open_piece is not None else 0
            starts, still_open = cut_points(_run_ends(ids), n, size, carried)
            if open_piece is not None and len(starts) > 1 and starts[1] == 0:
                # The open request is full for this frame's first user: it goes as it is.
                yield open_piece
                open_piece, starts = None, starts[1:]
            bounds = [max(s, 0) for s in starts]
            marks = pl.zeros(n, pl.Int64, eager=True).alias(
                _B
            )  # 1 where a request starts: cum_sum numbers them
            number = (marks.scatter(bounds[1:], 1) if len(bounds) > 1 else marks).cum_sum()
            numbered = items.with_columns(number)
            first = pl.col(_EXT_ID).ne_missing(pl.col(_EXT_ID).shift(1)) | pl.col(_B).ne_missing(
                pl.col(_B).shift(1)
            )
            numbered = numbered.with_columns(first.alias(_NEW))
            runs = numbered.group_by(_B, maintain_order=True).agg(
                pl.col(_ITEM).str.join(",").cast(pl.Binary), pl.col(_NEW).sum().alias("__ids")
            )
            users: list[str] = numbered.filter(pl.col(_NEW))[_EXT_ID].to_list()
            keys = _key_bytes(items[ROW_KEY]) if ROW_KEY in items.columns else b""
            where = items.select(_EXT_ID, _FILE, _ROW)
            at_id = 0
            pieces = list(runs.iter_rows())
            for k, (_, text, n_ids) in enumerate(pieces):
                begin, end = bounds[k], bounds[k + 1] if k + 1 < len(bounds) else n
                piece = _Piece(
                    [text],
                    users[at_id : at_id + n_ids],
                    [(where, begin, end)],
                    [keys[8 * begin : 8 * end]],
                    end - begin,
                )
                at_id += n_ids
                if k == 0 and open_piece is not None:
                    piece = open_piece.joined(piece)
                if k + 1 == len(pieces) and still_open:
                    open_piece = piece
                else:
                    open_piece = None
                    yield piece
        if open_piece is not None:
            yield open_piece

    def stream_batches(
        self, stream: Stream, frames: Iterable[pl.DataFrame], batch_size: int, files: Sequence[str]
    ) -> Iterator[Batch]:
        """Batches of at most ``batch_size`` items (capped at the endpoint's limit), in canonical order, packed
        as :func:`iter_batches` describes. Each body is the request's canonical JSON as ``bytes`` (sent as is);
        the batch ID hashes those bytes."""
        size = min(batch_size, MAX_ITEMS[stream.endpoint])
        endpoint = stream.endpoint
        prefix = _ID_PREFIX + endpoint.encode("utf-8") + b"\n"
        previous: tuple[str, str] | None = None  # the last batch's ID and last user
        for piece in self._cuts(stream, frames, size, files):
            body = b'{"nv":[' + b",".join(piece.texts) + b"]}"
            batch_id = hashlib.sha256(prefix + body).hexdigest()[:16]
            # Items of one user are adjacent: a batch shares a user with the one before only across its start.
            after = previous[0] if previous is not None and previous[1] == piece.users[0] else None
            yield Batch(
                batch_id=batch_id,
                endpoint=endpoint,
                operation=stream.operation,
                body=body,
                ext_ids=tuple(piece.users),
                phase=stream.phase,
                origins=ItemOrigins.of_columns(piece.spans, files),
                after=after,
                row_keys=b"".join(piece.keys),
            )
            previous = (batch_id, piece.users[-1])

    def stream_counts(
        self, stream: Stream, frames: Iterable[pl.DataFrame], batch_size: int
    ) -> tuple[int, int]:
        """``(requests, ids)`` :meth:`stream_batches` gives: the same packing (:func:`cut_points`), from each
        frame's runs of one user, without building items."""
        size = min(batch_size, MAX_ITEMS[stream.endpoint])
        requests = ids = carried = 0
        for frame in frames:
            selected = self._selected(stream, frame)
            n = selected.height
            if not n:
                continue
            ends = _run_ends(selected[_EXT_ID])
            starts, still_open = cut_points(ends, n, size, carried)
            # A user counts once per request holding any of their items: once per run, plus once per cut
            # inside a run.
            inside = pl.Series([s for s in starts if s > 0], dtype=pl.Int64)
            ids += ends.len() + int((~inside.is_in(ends.implode())).sum())
            closed = len(starts) - (1 if still_open else 0)
            requests += closed
            carried = (n - starts[-1] if starts[-1] >= 0 else carried + n) if still_open else 0
        return requests + (1 if carried else 0), ids

    def stream_sample(self, stream: Stream, frames: Iterable[pl.DataFrame], max_ids: int = 3) -> Any | None:
        """A request body built from the stream's first ``max_ids`` items, or None when it is empty."""
        items: list[Any] = []
        for frame in frames:
            first = self._selected(stream, frame).head(max_ids - len(items))
            texts = self._items(stream, first)[_ITEM].to_list()
            items += [json.loads(text) for text in texts]
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


SETTINGS = ("auth", "brand_id", "event_time_format", "event_time_zone", "events_after_users", "rate_window")
"""The ``destination.extra`` keys a NotifyVisitors job may set (docs/notifyvisitors.md)."""


def job_problems(sources: Sequence[Source], extra: Mapping[str, str]) -> list[JobProblem]:
    """What a NotifyVisitors job asks for that the platform cannot do (checked when the job is loaded)."""
    problems = unknown_settings(extra, SETTINGS, PLATFORM)
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
            # Finite too: "inf" (or "1e400") made the first "nothing left this minute" a pause without end.
            if not 0 < float(extra["rate_window"]) < math.inf:
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
        if source.kind is SourceKind.USERS:
            problems.extend(_shadowed_attributes(source, loc))
    return problems


def _shadowed_attributes(source: Source, loc: str) -> list[JobProblem]:
    """Attributes named like a field the source's ``email:``, ``msisdn:`` or ``opt_ins`` already fill from
    another column: both went into one ``user_attributes`` key and the mapping's value silently won."""
    special = {
        "email": ("email", source.email),
        "mobile": ("msisdn", source.msisdn),
        "email_opt_in": ("opt_ins.email", source.opt_ins.email),
        "sms_opt_in": ("opt_ins.sms", source.opt_ins.sms),
    }
    problems = []
    for a in source.attributes:
        setting, column = special.get(a.attribute, ("", None))
        if column and column != a.column:
            problems.append(
                JobProblem(
                    f"{loc}.attributes.{a.column}",
                    f"attribute {a.attribute!r} is already sent from column {column!r} ({setting}); "
                    "map one column to it",
                )
            )
    return problems
