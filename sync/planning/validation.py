"""Row validation and typing, and the "last row wins" rule for duplicate IDs.

:func:`validate_chunk` turns a raw chunk (text columns from :mod:`sync.sources.reading`) into a typed *clean* frame and a
frame of rejected rows, all with vectorised polars expressions. :func:`resolve_duplicates` applies the duplicate
rule to all rows of a set of IDs at once. The clean frame is platform-neutral: one typed column per mapped column
plus ``__ext_id``, ``__file`` (index into the source's file list), ``__row`` and ``__key`` (the canonical order).

Value formats (see docs/jobs.md):

- boolean: ``true/false``, ``t/f``, ``yes/no``, ``y/n``, ``1/0``, ``on/off`` (any case);
- number: decimal or scientific notation with a dot (``12``, ``-3.5``, ``1e3``); kept as float64;
- date: ISO 8601 ``YYYY-MM-DD`` (midnight), ``YYYY-MM-DD[T ]HH:MM[:SS[.fff]]`` with optional ``Z`` or ``±HH:MM``;
  values without an offset are in the job's ``validation.timezone``; stored (and sent) as epoch milliseconds;
- list: a JSON array (``["a","b"]``) or text split on the mapping's delimiter (default ``|``), items trimmed,
  empty items dropped; an empty list counts as no value;
- email: ``local@domain.tld``, at most 254 characters; MSISDN: an optional ``+`` and 8-15 digits once spaces,
  dashes, dots and brackets are removed (sent without them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import polars as pl
import pyarrow as pa

from sync.config import AttributeMapping, Source, SourceKind, ValidationRules, ValueType
from sync.sources.reading import ROW

__all__ = [
    "ACTION",
    "EVENT",
    "EXT_ID",
    "FILE",
    "KEY",
    "REJECTS_SCHEMA",
    "TAG",
    "canonical_key",
    "clean_schema",
    "resolve_duplicates",
    "validate_chunk",
]

EXT_ID = "__ext_id"
FILE = "__file"
KEY = "__key"
TAG = "__tag"
ACTION = "__action"
EVENT = "__event"

REJECTS_SCHEMA: dict[str, Any] = {
    "file": pl.String,
    "row": pl.Int64,
    "column": pl.String,
    "reason": pl.String,
    "ext_id": pl.String,
}

_TRUE = ["true", "t", "yes", "y", "1", "on"]
_FALSE = ["false", "f", "no", "n", "0", "off"]
_TAG_ACTIONS_ON = ["tag", "add", "+", "true", "t", "yes", "y", "1"]
_TAG_ACTIONS_OFF = ["untag", "remove", "delete", "-", "false", "f", "no", "n", "0"]
_EMAIL = (
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_MSISDN = r"^\+?[0-9]{8,15}$"
_CONTROL = r"[\x00-\x1f\x7f-\x9f]"
"""C0/C1 control characters: never part of a real external ID (a tab, a line break from a quoted cell, NUL)."""
_INVISIBLE = r"\p{Cf}"
"""Unicode format characters: zero-width space/joiners, byte-order marks inside text, bidirectional controls
(U+202A-U+202E, U+2066-U+2069), soft hyphens. Invisible, so an ID holding one looks like another user's ID."""
_MSISDN_SEPARATORS = r"[\s\-().]"

_DTYPE: dict[ValueType, Any] = {
    ValueType.STRING: pl.String,
    ValueType.NUMBER: pl.Float64,
    ValueType.BOOLEAN: pl.Boolean,
    ValueType.DATE: pl.Int64,
    ValueType.LIST: pl.List(pl.String),
}


def _crc_table() -> pl.Series:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
        table.append(crc)
    return pl.Series("crc", table, dtype=pl.UInt32)


_CRC_TABLE = _crc_table()
"""The CRC-32 (IEEE 802.3, zlib's) table: the CRC of one byte."""


def canonical_key(ext_ids: pl.Series) -> pl.Series:
    """CRC-32 of each ID's UTF-8 bytes: the first sort key of the canonical order ``(key, ext_id)``.

    A published checksum rather than polars' hash, which may change between polars versions: batch contents
    and IDs must not change when a dependency is upgraded between a run and its resume. Equal to
    ``zlib.crc32(ext_id.encode())``, computed for all IDs at once: one table step per byte *position*, over every
    ID that long (IDs sorted by length, so the IDs still going are a prefix), not one Python call per ID.
    """
    n = len(ext_ids)
    if n == 0:
        return pl.Series(KEY, [], dtype=pl.UInt32)
    arrow = ext_ids.cast(pl.String).to_arrow()
    if isinstance(arrow, pa.ChunkedArray):
        arrow = arrow.combine_chunks()
    arrow = arrow.cast(pa.large_string())
    _validity, offsets_buffer, data_buffer = arrow.buffers()
    offsets = pl.Series(pa.Array.from_buffers(pa.int64(), n + 1, [None, offsets_buffer], offset=arrow.offset))
    data = pl.Series(
        pa.Array.from_buffers(pa.uint8(), data_buffer.size if data_buffer else 0, [None, data_buffer])
    )
    starts = offsets.slice(0, n)
    lengths = offsets.slice(1, n) - starts
    uniform = lengths.min() == lengths.max()
    order = None if uniform else lengths.arg_sort(descending=True)
    if order is not None:
        starts = starts.gather(order)
    ending = dict(lengths.value_counts().iter_rows())  # length -> IDs of that length
    crc = pl.repeat(0xFFFFFFFF, n, dtype=pl.UInt32, eager=True)
    finished: list[pl.Series] = []  # CRCs of IDs shorter than the position reached, longest last
    active = n
    longest = lengths.max()
    assert isinstance(longest, int)
    for position in range(longest):
        active -= ending.get(position, 0)
        if active < len(crc):
            finished.append(crc.slice(active))
            crc, starts = crc.slice(0, active), starts.slice(0, active)
        byte = data.gather(starts + position).cast(pl.UInt32)
        crc = _CRC_TABLE.gather((crc ^ byte) & 0xFF) ^ (crc // 256)
    keys = pl.concat([crc, *reversed(finished)]) ^ 0xFFFFFFFF
    if order is not None:
        keys = keys.gather(order.arg_sort())
    return keys.cast(pl.UInt32).alias(KEY)


def clean_schema(source: Source) -> dict[str, Any]:
    """Column names and types of a source's clean frame."""
    schema: dict[str, Any] = {KEY: pl.UInt32, EXT_ID: pl.String, FILE: pl.Int32, ROW: pl.Int64}
    if source.kind is SourceKind.TAGS:
        schema |= {TAG: pl.String, ACTION: pl.Boolean}
    if source.kind is SourceKind.EVENTS:
        schema[EVENT] = pl.String
    for a in source.attributes:
        schema[a.column] = _DTYPE[a.type]
    for t in source.tags:
        schema[t.column] = pl.List(pl.String)
    for c in source.opt_ins.columns():
        schema[c] = pl.Boolean
    for named in (source.email, source.msisdn):
        if named:
            schema[named] = pl.String
    return schema


# --- value parsers ---------------------------------------------------------------------------------------------
#
# A parser maps a column's text (``s``, trimmed, null values nulled) to its typed values and, given those values
# (``p``), to its error message (null where the value is fine). :func:`validate_chunk` evaluates them all in one
# lazy query per chunk, in three steps (texts, values, errors), each step's columns computed once and read by
# name in the next. Values only matter on rows without an error: a row with one is rejected as a whole.

_Parser = tuple[pl.Expr, Callable[[pl.Expr, pl.Expr], pl.Expr]]
"""``(values from s, error from (s, p))``."""
_NO_ERROR = pl.lit(None, pl.String)
_BOOLEANS = {**dict.fromkeys(_TRUE, True), **dict.fromkeys(_FALSE, False)}
_TAG_ACTIONS = {**dict.fromkeys(_TAG_ACTIONS_ON, True), **dict.fromkeys(_TAG_ACTIONS_OFF, False)}


def _err(mask: pl.Expr, message: str) -> pl.Expr:
    return pl.when(mask).then(pl.lit(message)).otherwise(_NO_ERROR)


def _text(s: pl.Expr, dtype: Any, source: Source, rules: ValidationRules) -> pl.Expr:
    if dtype != pl.String:
        return s
    s = s.str.strip_chars() if rules.trim else s
    if not source.null_values:
        return s
    return s.replace(list(source.null_values), None)


def _parse_bool(s: pl.Expr) -> _Parser:
    values = s.str.to_lowercase().replace_strict(_BOOLEANS, default=None, return_dtype=pl.Boolean)
    return values, lambda s, p: _err(s.is_not_null() & p.is_null(), "not a boolean (true/false, yes/no, 1/0)")


def _parse_number(s: pl.Expr) -> _Parser:
    def error(s: pl.Expr, p: pl.Expr) -> pl.Expr:
        bad = p.is_null() | p.is_nan().fill_null(False) | p.is_infinite().fill_null(False)
        return _err(s.is_not_null() & bad, "not a number")

    return s.cast(pl.Float64, strict=False), error


def _date_times(text: pl.Series, timezone: str) -> pl.Series:
    """ISO 8601 dates and date-times (text) as epoch milliseconds, null where none of the forms fits.

    The forms are tried in turn, each only on the values the ones before could not read: most columns hold one
    form, so most values are parsed once (a lazy ``coalesce`` would parse every value in every form).
    """

    def local(expr: pl.Expr) -> pl.Expr:
        return expr.dt.replace_time_zone(timezone, ambiguous="earliest", non_existent="null").dt.epoch("ms")

    v = pl.col("v")
    forms = [
        pl.when(v.str.len_chars() == 10).then(
            local(v.str.to_date("%Y-%m-%d", strict=False).cast(pl.Datetime("ms")))
        ),
        v.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%z", strict=False, time_zone="UTC", time_unit="ms").dt.epoch(
            "ms"
        ),
        v.str.to_datetime("%Y-%m-%dT%H:%M%z", strict=False, time_zone="UTC", time_unit="ms").dt.epoch("ms"),
        local(v.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", strict=False, time_unit="ms")),
        local(v.str.to_datetime("%Y-%m-%dT%H:%M", strict=False, time_unit="ms")),
    ]
    norm = text.str.replace(" ", "T", literal=True).str.replace(r"[zZ]$", "+00:00")
    out = pl.Series("v", [None] * len(norm), dtype=pl.Int64)
    todo = pl.DataFrame({"i": pl.int_range(len(norm), dtype=pl.UInt32, eager=True), "v": norm}).filter(
        pl.col("v").is_not_null()
    )
    for form in forms:
        if todo.is_empty():
            break
        parsed = todo.select("i", form.alias("ms"))
        done = parsed.filter(pl.col("ms").is_not_null())
        if done.height:
            out = out.scatter(done["i"], done["ms"])
            todo = todo.filter(parsed["ms"].is_null())
    return out


def _typed_date(s: pl.Expr, dtype: Any, timezone: str) -> _Parser:
    # A typed column (Parquet): no parsing, but a local time the zone skips (a DST gap) is no time at all.
    dt = s.cast(pl.Datetime("ms")) if dtype == pl.Date else s
    if not (isinstance(dtype, pl.Datetime) and dtype.time_zone):
        dt = dt.dt.replace_time_zone(timezone, ambiguous="earliest", non_existent="null")
    return dt.dt.epoch("ms"), lambda s, p: _err(
        s.is_not_null() & p.is_null(), "not a valid time in the job's time zone"
    )


def _parse_list(s: pl.Expr, dtype: Any, delimiter: str) -> _Parser:
    if isinstance(dtype, pl.List):
        items = s.list.eval(pl.element().cast(pl.String).str.strip_chars()).list.eval(
            pl.element().filter(pl.element().is_not_null() & (pl.element() != ""))
        )
    else:
        items = (
            s.str.split(delimiter)
            .list.eval(pl.element().str.strip_chars())
            .list.eval(pl.element().filter(pl.element() != ""))
        )
    return pl.when(items.list.len() > 0).then(items), lambda s, p: _NO_ERROR


def _json_lists(s: pl.Series, delimiter: str) -> tuple[pl.Series, pl.Series]:
    """A text column of a list mapping in which some values are JSON arrays: typed values and errors, per value
    in Python (JSON arrays are rare in CRM exports; chunks without one never come here)."""
    is_json = s.str.starts_with("[").fill_null(False)
    split = (
        s.str.split(delimiter)
        .list.eval(pl.element().str.strip_chars())
        .list.eval(pl.element().filter(pl.element() != ""))
    )
    parsed: list[list[str] | None] = []
    messages: list[str | None] = []
    for text, flag, plain in zip(s.to_list(), is_json.to_list(), split.to_list(), strict=True):
        if not flag:
            parsed.append(plain)
            messages.append(None)
            continue
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, list) or any(isinstance(v, dict | list) for v in value):
            parsed.append(None)
            messages.append("not a list (invalid JSON array)")
            continue
        texts = [v if isinstance(v, str) else json.dumps(v) for v in value if v is not None]
        parsed.append([t.strip() for t in texts if t.strip()])
        messages.append(None)
    values = pl.Series(s.name, parsed, dtype=pl.List(pl.String))
    return pl.select(pl.when(values.list.len() > 0).then(values)).to_series(), pl.Series(
        "err", messages, dtype=pl.String
    )


def _parse_email(s: pl.Expr) -> _Parser:
    def error(s: pl.Expr, _p: pl.Expr) -> pl.Expr:
        valid = s.str.contains(_EMAIL).fill_null(False) & (s.str.len_chars() <= 254)
        return _err(s.is_not_null() & ~valid, "not a valid email address")

    return s, error


def _parse_msisdn(s: pl.Expr) -> _Parser:
    return s.str.replace_all(_MSISDN_SEPARATORS, ""), lambda s, p: _err(
        s.is_not_null() & ~p.str.contains(_MSISDN).fill_null(False),
        "not a valid MSISDN (optional +, then 8-15 digits)",
    )


def _parse_action(s: pl.Expr) -> _Parser:
    values = (
        pl.when(s.is_null())
        .then(True)
        .otherwise(s.str.to_lowercase().replace_strict(_TAG_ACTIONS, default=None, return_dtype=pl.Boolean))
    )
    return values, lambda s, p: _err(p.is_null(), "not a tag action (tag/untag, add/remove, +/-)")


def _required(s: pl.Expr, message: str) -> _Parser:
    return s, lambda s, p: _err(s.is_null(), message)


def _id_error(ext: pl.Expr, rules: ValidationRules) -> pl.Expr:
    return (
        pl.when(ext.is_null())
        .then(pl.lit("missing external ID"))
        .when(ext.str.len_chars() > rules.max_id_length)
        .then(pl.lit(f"external ID longer than {rules.max_id_length} characters"))
        .when(ext.str.contains(_CONTROL).fill_null(False))
        .then(pl.lit("external ID contains a control character (tab, line break, NUL...)"))
        .when(ext.str.contains(_INVISIBLE).fill_null(False))
        .then(
            pl.lit(
                "external ID contains an invisible character (zero-width, byte-order mark or bidirectional "
                "control): it would look like another ID without being equal to it"
            )
        )
        .otherwise(_NO_ERROR)
    )


class _Query:
    """The columns of one chunk's validation query, step by step (see the section comment)."""

    __slots__ = ("errors", "injected", "raw", "rules", "source", "texts", "values")

    def __init__(self, raw: pl.DataFrame, source: Source, rules: ValidationRules) -> None:
        self.raw = raw
        self.source = source
        self.rules = rules
        self.texts: dict[
            str, pl.Expr
        ] = {}  # step 1: "__t<i>" -> a raw column's text (and "__n<i>": its NULs)
        self.values: dict[str, pl.Expr] = {}  # step 2: "__p<i>" -> a check's typed values
        self.errors: list[tuple[str, pl.Expr]] = []  # step 3: (input column, error) per check, in check order
        self.injected: dict[str, pl.Series] = {}  # computed outside the query (JSON arrays, date-times)

    def text(self, column: str) -> pl.Expr:
        """The text of a raw column (one query column, however many checks read it)."""
        name = f"__t{list(self.raw.columns).index(column)}"
        if name not in self.texts:
            self.texts[name] = _text(pl.col(column), self.raw.schema[column], self.source, self.rules)
        return pl.col(name)

    def inject(self, series: pl.Series) -> pl.Expr:
        name = f"__x{len(self.injected)}"
        self.injected[name] = series
        return pl.col(name)

    def check(self, column: str, parser: _Parser) -> pl.Expr:
        """Add a check of ``column``; returns the expression of its typed values (in the final step)."""
        values, error = parser
        name = f"__p{len(self.values)}"
        self.values[name] = values
        failure = error(self.text(column), pl.col(name))
        if self.raw.schema[column] == pl.String:
            # A NUL character is binary junk (or a UTF-16 file read as UTF-8), never a value to send.
            nul = pl.col(column).str.contains("\x00", literal=True).fill_null(False)
            failure = pl.when(nul).then(pl.lit("contains a NUL character")).otherwise(failure)
        self.errors.append((column, failure))
        return pl.col(name)

    def list_values(self, column: str, delimiter: str) -> _Parser:
        dtype = self.raw.schema[column]
        if dtype == pl.String:
            text = self.raw.select(_text(pl.col(column), dtype, self.source, self.rules)).to_series()
            if text.str.starts_with("[").any():
                values, errors = _json_lists(text, delimiter)
                injected_errors = self.inject(errors)
                return self.inject(values), lambda s, p: injected_errors
        return _parse_list(self.text(column), dtype, delimiter)

    def parse(self, column: str, mapping: AttributeMapping) -> _Parser:
        dtype = self.raw.schema[column]
        s = self.text(column)
        if isinstance(dtype, pl.List) and mapping.type is not ValueType.LIST:
            return pl.lit(None, _DTYPE[mapping.type]), lambda s, p: _err(
                s.is_not_null(), "a list where a single value is expected"
            )
        if mapping.type is ValueType.BOOLEAN:
            return _parse_bool(s)
        if mapping.type is ValueType.NUMBER:
            return _parse_number(s)
        if mapping.type is ValueType.DATE:
            if dtype == pl.Date or isinstance(dtype, pl.Datetime):
                return _typed_date(s, dtype, self.rules.timezone)
            text = self.raw.select(_text(pl.col(column), dtype, self.source, self.rules)).to_series()
            return self.inject(_date_times(text, self.rules.timezone)), lambda s, p: _err(
                s.is_not_null() & p.is_null(), "not an ISO 8601 date or date-time"
            )
        if mapping.type is ValueType.LIST:
            return self.list_values(column, mapping.delimiter)
        return s.cast(pl.String), lambda s, p: _NO_ERROR


def validate_chunk(
    raw: pl.DataFrame, source: Source, rules: ValidationRules, file_index: int, file_name: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Type and check one chunk. Returns ``(clean, rejects)``: the rows that passed, typed as
    :func:`clean_schema` says (minus ``__key``), and one rejects row per failed input row (first failing column;
    the reason lists every problem of the row).

    One lazy query types and checks every column; the reasons are put together only for the rows that failed.
    """
    q = _Query(raw, source, rules)
    ext = q.text(source.ext_id)
    q.errors.append((source.ext_id, _id_error(ext, rules)))
    typed: dict[str, pl.Expr] = {EXT_ID: ext, FILE: pl.lit(file_index), ROW: pl.col(ROW)}
    if source.kind is SourceKind.TAGS:
        assert source.tag is not None
        typed[TAG] = q.check(source.tag, _required(q.text(source.tag), "missing tag"))
        typed[ACTION] = (
            q.check(source.action, _parse_action(q.text(source.action))) if source.action else pl.lit(True)
        )
    if source.kind is SourceKind.EVENTS:
        assert source.event is not None
        typed[EVENT] = q.check(source.event, _required(q.text(source.event), "missing event name"))
    # A name checked twice (an attribute that is also the email column) takes the last check's values.
    for a in source.attributes:
        typed[a.column] = q.check(a.column, q.parse(a.column, a))
    for t in source.tags:
        typed[t.column] = q.check(t.column, q.list_values(t.column, t.delimiter))
    for c in source.opt_ins.columns():
        typed[c] = q.check(c, _parse_bool(q.text(c)))
    if source.email:
        typed[source.email] = q.check(source.email, _parse_email(q.text(source.email)))
    if source.msisdn:
        typed[source.msisdn] = q.check(source.msisdn, _parse_msisdn(q.text(source.msisdn)))

    schema = {k: v for k, v in clean_schema(source).items() if k != KEY}
    errors = [f"__e{i}" for i in range(len(q.errors))]
    frame = (
        (raw.with_columns(**q.injected) if q.injected else raw)
        .lazy()
        .with_columns(**q.texts)
        .with_columns(**q.values)
        .select(
            *(typed[k].cast(v).alias(k) for k, v in schema.items()),
            *(error.alias(e) for (_, error), e in zip(q.errors, errors, strict=True)),
        )
        .with_columns(pl.any_horizontal(pl.col(e).is_not_null() for e in errors).alias("__bad"))
        .collect()
    )
    bad = frame["__bad"]
    if not bad.any():
        return frame.select(list(schema)), pl.DataFrame(schema=REJECTS_SCHEMA)
    clean = frame.filter(~bad).select(list(schema))
    cols = [column for column, _ in q.errors]
    failed = [pl.col(e) for e in errors]
    rejects = frame.filter(bad).select(
        pl.lit(file_name, pl.String).alias("file"),
        pl.col(ROW).cast(pl.Int64).alias("row"),
        pl.coalesce(
            [pl.when(e.is_not_null()).then(pl.lit(c)) for e, c in zip(failed, cols, strict=True)]
        ).alias("column"),
        pl.when(pl.sum_horizontal(e.is_not_null() for e in failed) > 1)
        .then(
            pl.concat_str(
                [
                    pl.when(e.is_not_null()).then(pl.lit(f"{c}: ") + e)
                    for e, c in zip(failed, cols, strict=True)
                ],
                separator="; ",
                ignore_nulls=True,
            )
        )
        .otherwise(pl.coalesce(failed))
        .alias("reason"),
        pl.col(EXT_ID).alias("ext_id"),
    )
    return clean, rejects


def _value_columns(source: Source) -> list[str]:
    return [c for c in clean_schema(source) if c not in (KEY, EXT_ID, FILE, ROW)]


def resolve_duplicates(
    frame: pl.DataFrame, source: Source, files: Sequence[str]
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Apply the duplicate rule to clean rows holding *every* row of their IDs, in the canonical order
    ``(__key, __ext_id, __file, __row)``.

    The last valid row of an ID wins (files in path order, rows in file order). An earlier row whose values
    differ from the winner's is reported as rejected, naming the winning row; an earlier row with the same values
    is dropped silently. Events are never deduplicated; a tags source deduplicates per (ID, tag).
    Returns ``(winners, rejects, identical_duplicates_dropped)``: the winners in the canonical order, the rejects
    in file and row order.
    """
    if source.kind is SourceKind.EVENTS or frame.is_empty():
        return frame, pl.DataFrame(schema=REJECTS_SCHEMA), 0
    tags = source.kind is SourceKind.TAGS
    key = [EXT_ID, TAG] if tags else [EXT_ID]
    # The rows of one ID (one ID and tag) next to each other, in file and row order: the canonical order does
    # that for an ID; a tag's rows of one ID are brought together by a stable sort on the tag.
    grouped = frame.sort([KEY, EXT_ID, TAG], maintain_order=True) if tags else frame
    last = pl.any_horizontal(pl.col(c).ne_missing(pl.col(c).shift(-1)) for c in key).fill_null(True)
    marked = grouped.with_columns(last.alias("__last"))
    if marked["__last"].all():
        return frame, pl.DataFrame(schema=REJECTS_SCHEMA), 0
    position = pl.int_range(pl.len(), dtype=pl.UInt32)
    marked = marked.with_columns(pl.when(pl.col("__last")).then(position).backward_fill().alias("__winner"))
    winners = marked.filter(pl.col("__last")).drop("__last", "__winner")
    if tags:
        winners = winners.sort([KEY, EXT_ID, FILE, ROW])
    losers = marked.filter(~pl.col("__last"))
    values = [c for c in _value_columns(source) if c not in key]
    won = marked.select(FILE, ROW, *values).gather(losers["__winner"])
    joined = losers.drop("__last", "__winner").with_columns(
        won.rename({c: f"{c}__w" for c in won.columns}).get_columns()
    )
    differs = [pl.col(c).ne_missing(pl.col(f"{c}__w")) for c in values]
    joined = joined.with_columns(
        (pl.any_horizontal(differs) if differs else pl.lit(False)).alias("__conflict"),
        pl.coalesce(
            [
                pl.lit(None, pl.String),
                *(pl.when(d).then(pl.lit(c)) for d, c in zip(differs, values, strict=True)),
            ]
        ).alias("__column"),
    )
    conflicts = joined.filter(pl.col("__conflict")).sort([FILE, ROW])
    file_names = dict(enumerate(files))
    rejects = conflicts.select(
        pl.col(FILE).replace_strict(file_names, return_dtype=pl.String).alias("file"),
        pl.col(ROW).alias("row"),
        pl.coalesce(pl.col("__column"), pl.lit(source.ext_id)).alias("column"),
        pl.when(pl.col(FILE) == pl.col(f"{FILE}__w"))
        .then(
            pl.format(
                "duplicate external ID with conflicting values: superseded by row {} (last row wins)",
                pl.col(f"{ROW}__w"),
            )
        )
        .otherwise(
            pl.format(
                "duplicate external ID with conflicting values: superseded by row {} of {} (last row wins)",
                pl.col(f"{ROW}__w"),
                pl.col(f"{FILE}__w").replace_strict(file_names, return_dtype=pl.String),
            )
        )
        .alias("reason"),
        pl.col(EXT_ID).alias("ext_id"),
    )
    return winners, rejects, losers.height - conflicts.height
