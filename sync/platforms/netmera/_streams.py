"""From clean frames to Netmera batches: one :class:`Stream` per operation of a source.

Private: import these from :mod:`sync.platforms.netmera.requests`, the builder module the planner and
:mod:`sync.state` use. The request shapes themselves are in :mod:`._shapes`.

The planner hands over a source's *clean frames* (typed, validated, deduplicated; see sync.validation) in the
canonical order (key, ext_id). Each operation of a source is a Stream: a vectorised selection of the rows and
values it sends (with a group — the tag for tagUsers — and a payload), and a body builder. Batches are
consecutive runs of at most ``batch_size`` unique IDs per group in that order, so their content (and IDs) do not
depend on how the input was chunked, and the number of requests per group is ceil(unique IDs / batch size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import polars as pl

from sync.config import AttributeMode, NullAction, Source, SourceKind, TagAction
from sync.platforms.netmera import MAX_IDS_PER_REQUEST
from sync.platforms.netmera._shapes import (
    ENDPOINT_FOR,
    SINGLE_USER_ENDPOINTS,
    array_attributes_body,
    category_preferences_body,
    events_body,
    ext_ids_body,
    make_batch,
    phase_for,
    set_attributes_body,
    single_user_body,
    tag_body,
    unset_attributes_body,
    update_email_body,
    update_msisdn_body,
)
from sync.records import Batch, Operation, Phase, RowRef
from sync.row_keys import ROW_KEY, pack

GROUP = "__group"
PAYLOAD = "__payload"
_EXT_ID, _FILE, _ROW = "__ext_id", "__file", "__row"


@dataclass(frozen=True, slots=True)
class Stream:
    """The requests of one operation from one source.

    ``select`` maps a clean frame (with ``columns``) to rows ``__ext_id, __file, __row, __group, __payload``,
    rows of one ID adjacent; ``body`` builds a request body from a group and its ``(ext_id, payload)`` rows.
    """

    operation: Operation
    phase: Phase
    columns: tuple[str, ...]
    select: Callable[[pl.DataFrame], pl.DataFrame]
    body: Callable[[str, list[tuple[str, Any]]], Any]

    @property
    def endpoint(self) -> str:
        return ENDPOINT_FOR[self.operation]

    @property
    def single_user(self) -> bool:
        return self.endpoint in SINGLE_USER_ENDPOINTS


def json_value(value: Any) -> Any:
    """A clean-frame value as Netmera takes it: integral floats as integers (``34`` not ``34.0``)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [json_value(v) for v in value]
    return value


def _profile(payload: Mapping[str, Any]) -> dict[str, Any]:
    return {k: json_value(v) for k, v in payload.items() if v is not None}


def _rows(frame: pl.DataFrame, keep: pl.Expr, payload: pl.Expr, group: pl.Expr | None = None) -> pl.DataFrame:
    # A frame of a non-idempotent stream carries its rows' keys (sync.row_keys): they travel to the batch.
    keys = [pl.col(ROW_KEY)] if ROW_KEY in frame.columns else []
    return frame.filter(keep).select(
        pl.col(_EXT_ID),
        pl.col(_FILE),
        pl.col(_ROW),
        (group if group is not None else pl.lit("")).cast(pl.String).alias(GROUP),
        payload.alias(PAYLOAD),
        *keys,
    )


def _struct(columns: Sequence[tuple[str, str]]) -> pl.Expr:
    return pl.struct([pl.col(col).alias(name) for col, name in columns])


def _flag_stream(operation: Operation, column: str, want: bool) -> Stream:
    one = operation in (Operation.ENABLE_PUSH, Operation.DISABLE_PUSH)
    return Stream(
        operation,
        phase_for(operation),
        (column,),
        lambda f: _rows(f, pl.col(column) == want, pl.lit(None, pl.Null)),
        (lambda _g, rows: single_user_body(rows[0][0]))
        if one
        else (lambda _g, rows: ext_ids_body([r[0] for r in rows])),
    )


def _users_streams(source: Source) -> list[Stream]:
    streams: list[Stream] = []
    by_mode = {mode: [a for a in source.attributes if a.mode is mode] for mode in AttributeMode}
    sets = by_mode[AttributeMode.SET]
    if sets:
        cols = [a.column for a in sets]
        streams.append(
            Stream(
                Operation.SET_ATTRIBUTES,
                Phase.CHANGES,
                tuple(cols),
                lambda f: _rows(
                    f,
                    pl.any_horizontal(pl.col(cols).is_not_null()),
                    _struct([(a.column, a.attribute) for a in sets]),
                ),
                lambda _g, rows: set_attributes_body((x, _profile(p)) for x, p in rows),
            )
        )
    unsets = [a for a in sets if a.on_null is NullAction.UNSET]
    if unsets:
        ucols = [a.column for a in unsets]
        names = pl.concat_list(
            [pl.when(pl.col(a.column).is_null()).then(pl.lit(a.attribute)) for a in unsets]
        ).list.drop_nulls()
        streams.append(
            Stream(
                Operation.UNSET_ATTRIBUTES,
                Phase.CHANGES,
                tuple(ucols),
                lambda f: _rows(f, pl.any_horizontal(pl.col(ucols).is_null()), names),
                lambda _g, rows: unset_attributes_body(rows),
            )
        )
    for mode, operation in (
        (AttributeMode.PUSH, Operation.PUSH_ATTRIBUTES),
        (AttributeMode.PULL, Operation.PULL_ATTRIBUTES),
    ):
        mapped = by_mode[mode]
        if mapped:
            mcols = [a.column for a in mapped]
            pairs = [(a.column, a.attribute) for a in mapped]
            streams.append(
                Stream(
                    operation,
                    Phase.CHANGES,
                    tuple(mcols),
                    partial(_present_rows, columns=mcols, pairs=pairs),
                    lambda _g, rows: array_attributes_body((x, _profile(p)) for x, p in rows),
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
                    partial(_category_rows, columns=ccols, names=names_of, want=want),
                    partial(_category_body, want=want),
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
    if source.email:
        email = source.email
        streams.append(
            Stream(
                Operation.UPDATE_EMAIL,
                Phase.CHANGES,
                (email,),
                lambda f: _rows(f, pl.col(email).is_not_null(), pl.col(email)),
                lambda _g, rows: update_email_body(*rows[0]),
            )
        )
    if source.msisdn:
        msisdn = source.msisdn
        streams.append(
            Stream(
                Operation.UPDATE_MSISDN,
                Phase.CHANGES,
                (msisdn,),
                lambda f: _rows(f, pl.col(msisdn).is_not_null(), pl.col(msisdn)),
                lambda _g, rows: update_msisdn_body(*rows[0]),
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
                    partial(_tag_rows, columns=tcols),
                    lambda g, rows: tag_body(g, [r[0] for r in rows]),
                )
            )
    return streams


def _present_rows(frame: pl.DataFrame, columns: list[str], pairs: list[tuple[str, str]]) -> pl.DataFrame:
    return _rows(frame, pl.any_horizontal(pl.col(columns).is_not_null()), _struct(pairs))


def _category_body(_group: str, rows: list[tuple[str, Any]], want: bool) -> Any:
    return category_preferences_body((x, c, want) for x, c in rows)


def _tag_table_rows(frame: pl.DataFrame, want: bool) -> pl.DataFrame:
    return _rows(frame, pl.col("__action") == want, pl.lit(None, pl.Null), pl.col("__tag"))


def _category_rows(
    frame: pl.DataFrame, columns: list[str], names: Mapping[str, str], want: bool
) -> pl.DataFrame:
    # unpivot stacks column after column; re-sorting on the frame position keeps each user's items adjacent and
    # in the job's category order.
    long = (
        frame.select(_EXT_ID, _FILE, _ROW, *columns)
        .with_row_index("__i")
        .unpivot(
            index=["__i", _EXT_ID, _FILE, _ROW], on=columns, variable_name="__col", value_name="__enable"
        )
        .filter(pl.col("__enable") == want)
        .sort("__i", maintain_order=True)
    )
    return long.select(
        _EXT_ID,
        _FILE,
        _ROW,
        pl.lit("").alias(GROUP),
        pl.col("__col").replace_strict(dict(names), return_dtype=pl.String).alias(PAYLOAD),
    )


def _tag_rows(frame: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    tags = pl.concat_list([pl.col(c).fill_null(pl.lit([], pl.List(pl.String))) for c in columns]).list.unique(
        maintain_order=True
    )
    return (
        frame.select(_EXT_ID, _FILE, _ROW, tags.alias(GROUP))
        .explode(GROUP)
        .filter(pl.col(GROUP).is_not_null())
        .with_columns(pl.lit(None, pl.Null).alias(PAYLOAD))
    )


def streams_for(source: Source) -> list[Stream]:
    """The Netmera requests a source produces, one :class:`Stream` per operation, in a fixed order."""
    if source.kind is SourceKind.USERS:
        return _users_streams(source)
    if source.kind is SourceKind.TAGS:
        return [
            Stream(
                op,
                Phase.CHANGES,
                ("__tag", "__action"),
                partial(_tag_table_rows, want=want),
                lambda g, rows: tag_body(g, [r[0] for r in rows]),
            )
            for op, want in ((Operation.TAG, True), (Operation.UNTAG, False))
        ]
    if source.kind is SourceKind.EVENTS:
        pairs = [(a.column, a.attribute) for a in source.attributes]
        return [
            Stream(
                Operation.FIRE_EVENTS,
                Phase.CHANGES,
                ("__event", *(c for c, _ in pairs)),
                lambda f: _rows(
                    f,
                    pl.lit(True),
                    pl.struct(pl.col("__event"), _struct(pairs).alias("a"))
                    if pairs
                    else pl.struct(pl.col("__event")),
                ),
                lambda _g, rows: events_body((x, p["__event"], _profile(p.get("a") or {})) for x, p in rows),
            )
        ]
    return [
        Stream(
            Operation.DELETE_USERS,
            Phase.DELETIONS,
            (),
            lambda f: _rows(f, pl.lit(True), pl.lit(None, pl.Null)),
            lambda _g, rows: ext_ids_body([r[0] for r in rows]),
        )
    ]


def stream_batches(
    stream: Stream, frames: Iterable[pl.DataFrame], batch_size: int, files: Sequence[str]
) -> Iterator[Batch]:
    """Turn a stream's clean frames into batches of at most ``batch_size`` unique IDs per group (one for
    one-user endpoints). Full batches come out as they fill; the rest at the end, in group order."""
    size = 1 if stream.single_user else min(batch_size, MAX_IDS_PER_REQUEST)
    pending: dict[str, list[tuple[str, Any]]] = {}
    origins: dict[str, dict[str, RowRef]] = {}
    last_id: dict[str, str] = {}
    keys: dict[str, list[int]] = {}  # per group: the row keys of the pending rows (keyed frames only)

    def emit(group: str) -> Batch:
        rows = pending.pop(group)
        body = stream.body(group, rows)
        packed = pack(keys.pop(group, ()))
        batch = make_batch(
            stream.operation, body, origins=origins.pop(group), phase=stream.phase, row_keys=packed
        )
        last_id.pop(group, None)
        return batch

    for frame in frames:
        selected = stream.select(frame)
        keyed = ROW_KEY in selected.columns
        for ext_id, file_index, row, group, payload, *key in selected.iter_rows():
            group_rows = pending.get(group)
            if group_rows is None:
                group_rows = pending[group] = []
                origins[group] = {}
            elif last_id[group] != ext_id and len(origins[group]) >= size:
                yield emit(group)
                group_rows = pending[group] = []
                origins[group] = {}
            group_rows.append((ext_id, payload))
            if keyed:
                keys.setdefault(group, []).append(key[0])
            origins[group].setdefault(ext_id, RowRef(files[file_index], row))
            last_id[group] = ext_id
    for group in sorted(pending):
        yield emit(group)


def stream_counts(stream: Stream, frames: Iterable[pl.DataFrame], batch_size: int) -> tuple[int, int]:
    """``(requests, ids)`` that :func:`stream_batches` would give, computed without building bodies.

    Frames must hold every row of their IDs (the planner's frames are whole hash buckets), so unique IDs add up.
    """
    size = 1 if stream.single_user else min(batch_size, MAX_IDS_PER_REQUEST)
    per_group: dict[str, int] = {}
    for frame in frames:
        counted = stream.select(frame).group_by(GROUP).agg(pl.col(_EXT_ID).n_unique().alias("n"))
        for group, n in counted.iter_rows():
            per_group[group] = per_group.get(group, 0) + n
    ids = sum(per_group.values())
    return sum(-(-n // size) for n in per_group.values()), ids


def stream_sample(stream: Stream, frames: Iterable[pl.DataFrame], max_ids: int = 3) -> Any | None:
    """A request body built from the stream's first ``max_ids`` IDs (of its first group), or None if it is empty."""
    for frame in frames:
        selected = stream.select(frame)
        if selected.is_empty():
            continue
        first_group = selected[GROUP][0]
        rows: list[tuple[str, Any]] = []
        seen: list[str] = []
        limit = 1 if stream.single_user else max_ids
        for ext_id, _f, _r, group, payload, *_key in selected.iter_rows():
            if group != first_group:
                continue
            if ext_id not in seen:
                if len(seen) >= limit:
                    break
                seen.append(ext_id)
            rows.append((ext_id, payload))
        return stream.body(first_group, rows)
    return None
