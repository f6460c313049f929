"""From clean frames to Netmera batches: one :class:`Stream` per operation of a source, bodies built as columns.

Private: import these from :mod:`sync.platforms.netmera.requests`, the builder module the planner and
:mod:`sync.state` use. The request shapes themselves are in :mod:`._shapes`.

The planner hands over a source's *clean frames* (typed, validated, deduplicated; see sync.planning.validation) in the
canonical order (key, ext_id). Each operation of a source is a Stream: a vectorised selection of the rows it sends,
each with a group (the tag for tagUsers) and its item — the JSON text the row adds to the body, built by polars
expressions (:mod:`sync.platforms._encode`) — and a body :class:`Shape` that wraps a batch's items. Batches are
consecutive runs of at most ``batch_size`` unique IDs per group in that order (:func:`sync.platforms._batches.cut`),
so their content (and IDs) do not depend on how the input was chunked, and the number of requests per group is
ceil(unique IDs / batch size). A body is the canonical JSON (sorted keys, no spaces, UTF-8) of the request: the
bytes sent, and the bytes hashed for the batch ID — the same bytes, hence the same IDs, as the row-by-row builder
made before the columnar data plane (issue 13).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any

import polars as pl

from sync.config import AttributeMode, NullAction, Source, SourceKind, TagAction
from sync.planning.row_keys import ROW_KEY
from sync.planning.validation import KEY
from sync.platforms import _encode as enc
from sync.platforms._batches import EXT_ID, FILE, GROUP, ITEM, ROW, cut, first_ids
from sync.platforms.netmera import MAX_IDS_PER_REQUEST
from sync.platforms.netmera._shapes import ENDPOINT_FOR, SINGLE_USER_ENDPOINTS, phase_for
from sync.records import Batch, Operation, Phase

__all__ = [
    "GROUP",
    "ITEM",
    "Shape",
    "Stream",
    "json_value",
    "snapshot_streams",
    "stream_batches",
    "stream_counts",
    "stream_sample",
    "streams_for",
]


class Shape(Enum):
    """How a batch's items become a request body."""

    ARRAY = "array"
    """``[item,...]``: one object per item (setProfileAttributes, fireEvents, ...)."""
    IDS = "ids"
    """``{"extIds":[id,...]}``: the items are the IDs' JSON strings."""
    TAG = "tag"
    """``{"extIds":[id,...],"tag":"<group>"}``."""
    ONE = "one"
    """The batch's one item is the body (one-user endpoints: ``{"extId":...}``)."""


def _envelope(shape: Shape, group: str) -> tuple[bytes, bytes]:
    """What comes before and after a batch's joined items in its body."""
    if shape is Shape.ARRAY:
        return b"[", b"]"
    if shape is Shape.IDS:
        return b'{"extIds":[', b"]}"
    if shape is Shape.TAG:
        return b'{"extIds":[', f'],"tag":{enc.key(group)}}}'.encode()
    return b"", b""


def _body(shape: Shape, group: str, items: bytes | memoryview) -> bytes:
    if shape is Shape.ONE:
        return bytes(items)
    before, after = _envelope(shape, group)
    return b"".join((before, items, after))


Items = bool | str
"""What a selector builds besides the IDs: nothing (False), each row's JSON text (True), or each row's JSON text
followed by a separator (a ``str``: an array stream's items each end with ``","``, so a batch's joined items are
a slice of the column's buffer, :func:`sync.platforms._batches.cut`'s ``ended``)."""

Select = Callable[[pl.DataFrame, Items], pl.DataFrame]


@dataclass(frozen=True, slots=True)
class Stream:
    """The requests of one operation from one source.

    ``selector(frame, items)`` (called through :meth:`select`) maps a clean frame (with ``columns``) to rows ``__ext_id, __file, __row, __group``
    and, when ``items``, ``__item`` (the row's JSON text) — rows of one ID adjacent; a keyed frame's
    ``__row_key`` travels along. ``shape`` wraps a batch's items into its body.
    """

    operation: Operation
    phase: Phase
    columns: tuple[str, ...]
    selector: Select
    shape: Shape
    count_rows: Callable[[pl.DataFrame], pl.DataFrame] | None = None
    """For :func:`stream_counts`: the rows (``__ext_id``, and ``__group`` for a tag stream) whose unique IDs per
    group are what the selection's would be, made more cheaply than the selection (None: the selection)."""

    def select(self, frame: pl.DataFrame, items: bool = True) -> pl.DataFrame:
        """The rows of ``frame`` this stream sends (``items``: with their JSON text; counting needs none)."""
        return self.selector(frame, items)

    def select_ended(self, frame: pl.DataFrame) -> pl.DataFrame:
        """:meth:`select` with items, each followed by ``,`` (an :attr:`Shape.ARRAY` stream's, for
        :func:`stream_batches`: its batches' items are then slices of one buffer, not joined again)."""
        if self.shape is not Shape.ARRAY:
            raise ValueError(f"{self.endpoint}: only an array body's items end with a separator")
        return self.selector(frame, _SEPARATOR)

    @property
    def endpoint(self) -> str:
        return ENDPOINT_FOR[self.operation]

    @property
    def single_user(self) -> bool:
        return self.endpoint in SINGLE_USER_ENDPOINTS


def json_value(value: Any) -> Any:
    """A clean-frame value as Netmera takes it: integral floats as integers (``34`` not ``34.0``).

    The Python form of what :mod:`sync.platforms._encode` writes for a column (kept for code that builds a body
    from Python values)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [json_value(v) for v in value]
    return value


def _id_text(frame: pl.DataFrame) -> enc.Text:
    """The JSON text of the frame's IDs (never null: an ID is required in a clean frame), by the cheapest
    expression this frame's IDs allow (:func:`sync.platforms._encode.column_text`)."""
    text = enc.column_text(frame, EXT_ID)
    assert isinstance(text, enc.Text)
    return text


_SEPARATOR = ","
"""What ends each item of an array stream's selection for its batches (:meth:`Stream.select_ended`)."""


def _item(members: Mapping[str, enc.Member], required: tuple[str, ...] = ("extId",)) -> enc.Text:
    """A body item: an object whose ``required`` members are always there (fewer string copies)."""
    return enc.obj_text(members, required=required)


def _item_text(item: pl.Expr | enc.Text | None, items: Items) -> pl.Expr:
    """The :data:`ITEM` column's expression: ``item``'s text (null when ``items`` is False), followed by the
    separator when ``items`` is one — a constant piece of the item's own concatenation (:class:`enc.Text`), so
    it costs no copy."""
    if not items or item is None:
        return pl.lit(None, pl.String)
    end = items if isinstance(items, str) else ""
    if isinstance(item, enc.Text):
        return enc.Text((*item.parts, end), item.skip_nulls).expr()
    # An expression not made of pieces (never an array item's): a concatenation of its own.
    return pl.concat_str(item, pl.lit(end)) if end else item


def _rows(
    frame: pl.DataFrame,
    keep: pl.Expr | None,
    item: pl.Expr | enc.Text | None,
    items: Items,
    group: pl.Expr | None = None,
) -> pl.DataFrame:
    """The selected rows: those of ``frame`` that ``keep`` keeps (every row when None), with their item."""
    # A frame of a non-idempotent stream carries its rows' keys (sync.planning.row_keys): they travel to the batch.
    keys = [pl.col(ROW_KEY)] if ROW_KEY in frame.columns else []
    text = _item_text(item, items)
    if keep is not None:
        frame = frame.filter(keep)
    return frame.select(
        pl.col(EXT_ID),
        pl.col(FILE),
        pl.col(ROW),
        (group if group is not None else pl.lit("")).cast(pl.String).alias(GROUP),
        text.alias(ITEM),
        *keys,
    )


def _members(frame: pl.DataFrame, pairs: Sequence[tuple[str, str]]) -> tuple[dict[str, enc.Member], set[str]]:
    """Attribute name → the JSON text of its column in ``frame`` (:func:`sync.platforms._encode.column_text`),
    and the names whose column has no null in ``frame``: an object takes those into its own concatenation
    (one string copy fewer per value; a column's null count is known without a scan)."""
    members = {name: enc.column_text(frame, col) for col, name in pairs}
    present = {name for col, name in pairs if frame.get_column(col).null_count() == 0}
    return members, present


def _select_profile(frame: pl.DataFrame, items: Items, pairs: Sequence[tuple[str, str]]) -> pl.DataFrame:
    keep = pl.any_horizontal(pl.col([c for c, _ in pairs]).is_not_null())
    if not items:
        return _rows(frame, keep, None, items)
    if not all(frame.get_column(c).null_count() == 0 for c, _ in pairs):
        frame = frame.filter(keep)  # a row without a value sends nothing (the rest skip the copy)
    members, present = _members(frame, pairs)
    profile = enc.obj_text(members, required=present)
    item = _item({"extId": _id_text(frame), "profile": profile}, ("extId", "profile"))
    return _rows(frame, None, item, items)


def _select_unset(frame: pl.DataFrame, items: Items, pairs: Sequence[tuple[str, str]]) -> pl.DataFrame:
    columns = [c for c, _ in pairs]
    names = enc.array(pl.when(pl.col(c).is_null()).then(pl.lit(enc.key(name))) for c, name in pairs)
    item = _item({"extId": _id_text(frame), "profile": names}, ("extId", "profile")) if items else None
    return _rows(frame, pl.any_horizontal(pl.col(columns).is_null()), item, items)


def _select_flag(frame: pl.DataFrame, items: Items, column: str, want: bool, one: bool) -> pl.DataFrame:
    item = None
    if items:
        item = _item({"extId": _id_text(frame)}) if one else _id_text(frame).expr()
    return _rows(frame, pl.col(column) == want, item, items)


def _select_contact(frame: pl.DataFrame, items: Items, column: str, field: str) -> pl.DataFrame:
    item = None
    if items:
        item = _item({"extId": _id_text(frame), field: enc.string_text(pl.col(column))}, ("extId", field))
    return _rows(frame, pl.col(column).is_not_null(), item, items)


def _select_categories(
    frame: pl.DataFrame, items: Items, columns: list[str], names: Mapping[str, str], want: bool
) -> pl.DataFrame:
    # unpivot stacks column after column; re-sorting on the frame position keeps each user's items adjacent and
    # in the job's category order.
    long = (
        frame.select(EXT_ID, FILE, ROW, *columns)
        .with_row_index("__i")
        .unpivot(index=["__i", EXT_ID, FILE, ROW], on=columns, variable_name="__col", value_name="__enable")
        .filter(pl.col("__enable") == want)
        .sort("__i", maintain_order=True)
    )
    item: enc.Text | None = None
    if items:
        category = pl.col("__col").replace_strict(dict(names), return_dtype=pl.String)
        enable = enc.Text(("true" if want else "false",))
        item = _item(
            {"extId": _id_text(frame), "category": enc.string_text(category), "enable": enable},
            ("extId", "category", "enable"),
        )
    return long.select(EXT_ID, FILE, ROW, pl.lit("").alias(GROUP), _item_text(item, items).alias(ITEM))


def _select_tags(frame: pl.DataFrame, items: Items, columns: list[str]) -> pl.DataFrame:
    if len(columns) == 1:
        # One tag column: a user's tags are its list (a null list explodes to a null tag, dropped below); a
        # tag the list repeats is sent once, and lists without a repeat (nearly all) skip the hashing.
        tags = pl.col(columns[0])
        if _repeats(frame, columns[0]):
            tags = tags.list.unique(maintain_order=True)
    else:
        tags = pl.concat_list(
            [pl.col(c).fill_null(pl.lit([], pl.List(pl.String))) for c in columns]
        ).list.unique(maintain_order=True)
    # The ID's JSON text is made once per user, before a row per tag repeats it.
    item = _id_text(frame).expr() if items else pl.lit(None, pl.String)
    return (
        frame.select(EXT_ID, FILE, ROW, tags.alias(GROUP), item.alias(ITEM))
        .explode(GROUP)
        .filter(pl.col(GROUP).is_not_null())
        .select(EXT_ID, FILE, ROW, GROUP, ITEM)
    )


def _repeats(frame: pl.DataFrame, column: str) -> bool:
    """Whether a list of ``frame``'s List column ``column`` holds a value twice (a null twice counts: as
    ``list.n_unique() < list.len()`` tells). A list of two values repeats one exactly when its first equals its
    last, told without hashing; only the lists of three values or more are hashed. Nearly every user has one or
    two tags, and hashing every list was three quarters of the tag stream's selection."""
    tags = pl.col(column)
    n = tags.list.len()
    pair, longer = frame.select(
        ((n == 2) & tags.list.first().eq_missing(tags.list.last())).any().alias("pair"),
        (n > 2).any().alias("longer"),
    ).row(0)
    if pair:
        return True
    if not longer:
        return False
    return bool(frame.filter(n > 2).select((tags.list.n_unique() < tags.list.len()).any()).item())


def _select_tag_table(frame: pl.DataFrame, items: Items, want: bool) -> pl.DataFrame:
    return _rows(
        frame, pl.col("__action") == want, _id_text(frame).expr() if items else None, items, pl.col("__tag")
    )


def _select_events(frame: pl.DataFrame, items: Items, pairs: Sequence[tuple[str, str]]) -> pl.DataFrame:
    # Attributes sit beside extId and name, all keys sorted together (the loader refuses an attribute named
    # extId or name, which would overwrite the event's identity).
    if not items:
        return _rows(frame, None, None, items)
    members, present = _members(frame, pairs)
    identity = {"extId": _id_text(frame), "name": enc.string_text(pl.col("__event"))}
    item = _item({**members, **identity}, ("extId", "name", *sorted(present)))
    return _rows(frame, None, item, items)


def _select_all(frame: pl.DataFrame, items: Items) -> pl.DataFrame:
    return _rows(frame, None, _id_text(frame).expr() if items else None, items)


def _flag_stream(operation: Operation, column: str, want: bool) -> Stream:
    one = operation in (Operation.ENABLE_PUSH, Operation.DISABLE_PUSH)
    return Stream(
        operation,
        phase_for(operation),
        (column,),
        partial(_select_flag, column=column, want=want, one=one),
        Shape.ONE if one else Shape.IDS,
    )


def _users_streams(source: Source) -> list[Stream]:
    streams: list[Stream] = []
    by_mode = {mode: [a for a in source.attributes if a.mode is mode] for mode in AttributeMode}
    sets = by_mode[AttributeMode.SET]
    if sets:
        pairs = [(a.column, a.attribute) for a in sets]
        streams.append(
            Stream(
                Operation.SET_ATTRIBUTES,
                Phase.CHANGES,
                tuple(c for c, _ in pairs),
                partial(_select_profile, pairs=pairs),
                Shape.ARRAY,
            )
        )
    unsets = [(a.column, a.attribute) for a in sets if a.on_null is NullAction.UNSET]
    if unsets:
        streams.append(
            Stream(
                Operation.UNSET_ATTRIBUTES,
                Phase.CHANGES,
                tuple(c for c, _ in unsets),
                partial(_select_unset, pairs=unsets),
                Shape.ARRAY,
            )
        )
    for mode, operation in (
        (AttributeMode.PUSH, Operation.PUSH_ATTRIBUTES),
        (AttributeMode.PULL, Operation.PULL_ATTRIBUTES),
    ):
        mapped = [(a.column, a.attribute) for a in by_mode[mode]]
        if mapped:
            streams.append(
                Stream(
                    operation,
                    Phase.CHANGES,
                    tuple(c for c, _ in mapped),
                    partial(_select_profile, pairs=mapped),
                    Shape.ARRAY,
                )
            )
    categories = list(source.opt_ins.categories.items())
    if categories:
        ccols = [c for _, c in categories]
        names_of = {c: name for name, c in categories}
        for want in (False, True):
            streams.append(
                Stream(
                    Operation.SET_CATEGORIES,
                    Phase.OPT_OUT if not want else Phase.CHANGES,
                    tuple(ccols),
                    partial(_select_categories, columns=ccols, names=names_of, want=want),
                    Shape.ARRAY,
                    partial(_category_ids, columns=ccols, want=want),
                )
            )
    opt = source.opt_ins
    for column, on, off in (
        (opt.push, Operation.ENABLE_PUSH, Operation.DISABLE_PUSH),
        (opt.email, Operation.ENABLE_EMAIL, Operation.DISABLE_EMAIL),
        (opt.sms, Operation.ENABLE_SMS, Operation.DISABLE_SMS),
    ):
        if column:
            streams += [_flag_stream(off, column, False), _flag_stream(on, column, True)]
    for column, operation, field in (
        (source.email, Operation.UPDATE_EMAIL, "email"),
        (source.msisdn, Operation.UPDATE_MSISDN, "msisdn"),
    ):
        if column:
            streams.append(
                Stream(
                    operation,
                    Phase.CHANGES,
                    (column,),
                    partial(_select_contact, column=column, field=field),
                    Shape.ONE,
                )
            )
    for action, operation in ((TagAction.TAG, Operation.TAG), (TagAction.UNTAG, Operation.UNTAG)):
        tcols = [t.column for t in source.tags if t.action is action]
        if tcols:
            streams.append(
                Stream(
                    operation,
                    Phase.CHANGES,
                    tuple(dict.fromkeys(tcols)),
                    partial(_select_tags, columns=tcols),
                    Shape.TAG,
                    partial(_tag_pairs, columns=tcols),
                )
            )
    return streams


def streams_for(source: Source) -> list[Stream]:
    """The Netmera requests a source produces, one :class:`Stream` per operation, in a fixed order."""
    if source.kind is SourceKind.USERS:
        return _users_streams(source)
    if source.kind is SourceKind.TAGS:
        return [
            Stream(op, Phase.CHANGES, ("__tag", "__action"), partial(_select_tag_table, want=want), Shape.TAG)
            for op, want in ((Operation.TAG, True), (Operation.UNTAG, False))
        ]
    if source.kind is SourceKind.EVENTS:
        pairs = [(a.column, a.attribute) for a in source.attributes]
        clash = {"extId", "name"} & {name for _, name in pairs}
        if clash:
            raise ValueError(f"event attribute(s) {sorted(clash)} clash with the event's own fields")
        return [
            Stream(
                Operation.FIRE_EVENTS,
                Phase.CHANGES,
                ("__event", *(c for c, _ in pairs)),
                partial(_select_events, pairs=pairs),
                Shape.ARRAY,
            )
        ]
    return [Stream(Operation.DELETE_USERS, Phase.DELETIONS, (), _select_all, Shape.IDS)]


# --- snapshot mode: the streams of a delta frame (sync.state) ------------------------------------------------


def _select_unset_list(frame: pl.DataFrame, items: Items, column: str) -> pl.DataFrame:
    item = None
    if items:
        profile = enc.list_array(pl.col(column), pl.String)
        item = _item({"extId": _id_text(frame), "profile": profile}, ("extId", "profile"))
    return _rows(frame, pl.col(column).list.len() > 0, item, items)


def _select_flagged(frame: pl.DataFrame, items: Items, column: str) -> pl.DataFrame:
    return _rows(frame, pl.col(column).fill_null(False), _id_text(frame).expr() if items else None, items)


def snapshot_streams(source: Source) -> list[Stream]:
    """The request streams of a source's snapshot delta frames (:mod:`sync.state`): the planner's streams as a
    delta frame has them (values present are sent, nothing is unset for being empty, tags added and removed are
    two tag columns), then the unsets (``__unset``: a list of attribute names) and deletions (``__delete``)."""
    import dataclasses

    from sync.config import TagColumn
    from sync.platforms.base import DELTA_DELETE as DELETE
    from sync.platforms.base import DELTA_TAGS_ADDED as TAGS_ADDED
    from sync.platforms.base import DELTA_TAGS_REMOVED as TAGS_REMOVED
    from sync.platforms.base import DELTA_UNSET as UNSET

    delta = dataclasses.replace(
        source,
        attributes=tuple(dataclasses.replace(a, on_null=NullAction.SKIP) for a in source.attributes),
        tags=(TagColumn(TAGS_ADDED), TagColumn(TAGS_REMOVED, action=TagAction.UNTAG)),
    )
    return [
        *streams_for(delta),
        Stream(
            Operation.UNSET_ATTRIBUTES,
            Phase.CHANGES,
            (UNSET,),
            partial(_select_unset_list, column=UNSET),
            Shape.ARRAY,
        ),
        Stream(
            Operation.DELETE_USERS,
            Phase.DELETIONS,
            (DELETE,),
            partial(_select_flagged, column=DELETE),
            Shape.IDS,
        ),
    ]


# --- batches -------------------------------------------------------------------------------------------------


def _size(stream: Stream, batch_size: int) -> int:
    return 1 if stream.single_user else min(batch_size, MAX_IDS_PER_REQUEST)


def stream_batches(
    stream: Stream, frames: Iterable[pl.DataFrame], batch_size: int, files: Sequence[str]
) -> Iterator[Batch]:
    """Turn a stream's clean frames into batches of at most ``batch_size`` unique IDs per group (one for
    one-user endpoints). Full batches come out as they fill; the rest at the end, in group order.

    Each body is the request's canonical JSON as ``bytes`` (sent as is); the batch ID is the first 16 hex digits
    of sha256 over the endpoint, a newline and those bytes."""
    endpoint = stream.endpoint
    prefix = hashlib.sha256(endpoint.encode("utf-8") + b"\n")
    # An extIds list's items are the IDs' JSON strings: cut makes them from the IDs it joins anyway.
    id_items = stream.shape in (Shape.IDS, Shape.TAG)
    # An array's items each end with a comma: a batch's items are a slice of the column's buffer, not joined.
    ended = stream.shape is Shape.ARRAY
    selected = (
        stream.select_ended(frame) if ended else stream.select(frame, not id_items) for frame in frames
    )
    for run in cut(
        selected,
        _size(stream, batch_size),
        files,
        first_only=stream.shape is Shape.ONE,
        id_items=id_items,
        ended=ended,
    ):
        body = _body(stream.shape, run.group, run.text)
        digest = prefix.copy()
        digest.update(body)
        yield Batch(
            batch_id=digest.hexdigest()[:16],
            endpoint=endpoint,
            operation=stream.operation,
            body=body,
            ext_ids=run.ext_ids,
            phase=stream.phase,
            origins=run.origins,
            row_keys=run.row_keys,
        )


def stream_counts(stream: Stream, frames: Iterable[pl.DataFrame], batch_size: int) -> tuple[int, int]:
    """``(requests, ids)`` that :func:`stream_batches` would give, computed without building bodies.

    Frames must hold every row of their IDs (the planner's frames are whole hash buckets), so unique IDs add up,
    and come in the canonical order (an ID's rows adjacent). Each frame's IDs are counted as small integers
    (:func:`_counting_frame`): the selection then copies no text, and counting unique integers is cheap.
    """
    size = _size(stream, batch_size)
    # Every stream but a tag stream has one group (""): its unique IDs are counted straight.
    grouped = stream.shape is Shape.TAG
    counted: list[pl.DataFrame] = []
    ids = 0
    for frame in frames:
        if frame.is_empty():
            continue
        numbered = _counting_frame(frame)
        if grouped:
            selected = _count_rows(stream, numbered)
            counted.append(selected.group_by(GROUP).agg(pl.col(EXT_ID).n_unique().alias("n")))
        else:
            selected = _count_rows(stream, numbered)
            ids += selected.get_column(EXT_ID).n_unique() if selected.height else 0
    if not grouped:
        return -(-ids // size), ids
    if not counted:
        return 0, 0
    per_group = pl.concat(counted).group_by(GROUP).agg(pl.col("n").sum())
    totals = per_group.select(
        ((pl.col("n") + size - 1) // size).sum().alias("requests"), pl.col("n").sum().alias("ids")
    )
    requests, total = totals.row(0)
    return int(requests or 0), int(total or 0)


def _count_rows(stream: Stream, frame: pl.DataFrame) -> pl.DataFrame:
    """The rows whose unique IDs (per group) :func:`stream_counts` counts: the stream's own count rows when it
    has them, its selection without items otherwise."""
    return stream.count_rows(frame) if stream.count_rows is not None else stream.select(frame, False)


def _tag_pairs(frame: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """A users source's tag stream's count rows: the (ID, tag) rows straight from its tag lists — what its
    selection gives but for a tag a list repeats, which a count of unique IDs per tag counts once anyway — so
    the lists need no check for repeats, which costs more than the rest of the count."""
    pairs = [frame.select(EXT_ID, pl.col(c).alias(GROUP)).explode(GROUP) for c in dict.fromkeys(columns)]
    return (pl.concat(pairs) if len(pairs) > 1 else pairs[0]).filter(pl.col(GROUP).is_not_null())


def _category_ids(frame: pl.DataFrame, columns: list[str], want: bool) -> pl.DataFrame:
    """A categories stream's count rows: the IDs with a category to set as it wants. Its selection makes a row
    per ID and category, in order, for the bodies; a count of unique IDs needs the IDs alone."""
    return frame.filter(pl.any_horizontal(pl.col(c) == want for c in columns)).select(EXT_ID)


def _counting_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with each ID replaced by its ordinal among the frame's IDs (rows of one ID are adjacent) and
    :data:`FILE` and :data:`ROW` by constants: what a selection without items needs to count unique IDs per
    group, with nothing to copy but integers (a selector reads neither, and builds no ID text then)."""
    ordinal: pl.Series | None = None
    if KEY in frame.columns:
        # The planner's frames carry their keys: rows of one ID share a key, so where every key differs from
        # the one before, every row is an ID of its own (a users source) — told from integers, not texts.
        keys = frame.get_column(KEY)
        if keys.ne_missing(keys.shift(1)).all():
            ordinal = pl.int_range(frame.height, dtype=pl.UInt32, eager=True)
    if ordinal is None:
        ids = frame.get_column(EXT_ID)
        starts = ids.ne_missing(ids.shift(1))  # an ID's first row (the frame's first row too)
        if starts.all():
            ordinal = pl.int_range(frame.height, dtype=pl.UInt32, eager=True)  # one row per ID
        else:
            ordinal = starts.cast(pl.UInt32).cum_sum()
    return frame.with_columns(
        ordinal.alias(EXT_ID),
        pl.lit(0, frame.schema[FILE]).alias(FILE),
        pl.lit(0, frame.schema[ROW]).alias(ROW),
    )


def stream_sample(stream: Stream, frames: Iterable[pl.DataFrame], max_ids: int = 3) -> Any | None:
    """A request body built from the stream's first ``max_ids`` IDs (of its first group), or None if it is empty."""
    for frame in frames:
        selected = stream.select(frame, True)
        if selected.is_empty():
            continue
        rows = first_ids(selected, 1 if stream.single_user else max_ids)
        items = rows[ITEM][0] if stream.shape is Shape.ONE else ",".join(rows[ITEM].to_list())
        return json.loads(_body(stream.shape, rows[GROUP][0], items.encode("utf-8")))
    return None
