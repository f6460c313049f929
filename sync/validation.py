"""Row validation and typing, and the "last row wins" rule for duplicate IDs.

:func:`validate_chunk` turns a raw chunk (text columns from :mod:`sync.reading`) into a typed *clean* frame and a
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
import zlib
from collections.abc import Sequence
from typing import Any

import polars as pl

from sync.config import AttributeMapping, Source, SourceKind, ValidationRules, ValueType
from sync.reading import ROW

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


def canonical_key(ext_ids: pl.Series) -> pl.Series:
    """CRC-32 of each ID's UTF-8 bytes: the first sort key of the canonical order ``(key, ext_id)``.

    A published checksum rather than polars' hash, which may change between polars versions: batch contents
    and IDs must not change when a dependency is upgraded between a run and its resume.
    """
    return pl.Series(KEY, [zlib.crc32(x.encode("utf-8")) for x in ext_ids.to_list()], dtype=pl.UInt32)


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


# --- value parsers: (values, errors) with errors null where the value is fine -------------------------------

_Parsed = tuple[pl.Series, pl.Series]


def _err(mask: pl.Series, message: str) -> pl.Series:
    return pl.select(pl.when(mask).then(pl.lit(message)).otherwise(pl.lit(None, pl.String))).to_series()


def _no_errors(n: int) -> pl.Series:
    return pl.Series("err", [None] * n, dtype=pl.String)


def _text(series: pl.Series, source: Source, rules: ValidationRules) -> pl.Series:
    if series.dtype != pl.String:
        return series
    s = series.str.strip_chars() if rules.trim else series
    return pl.select(pl.when(s.is_in(list(source.null_values))).then(None).otherwise(s)).to_series()


def _parse_bool(s: pl.Series) -> _Parsed:
    low = s.str.to_lowercase()
    values = pl.select(
        pl.when(low.is_in(_TRUE)).then(True).when(low.is_in(_FALSE)).then(False).otherwise(None)
    ).to_series()
    return values, _err(s.is_not_null() & values.is_null(), "not a boolean (true/false, yes/no, 1/0)")


def _parse_number(s: pl.Series) -> _Parsed:
    values = s.cast(pl.Float64, strict=False)
    bad = s.is_not_null() & (
        values.is_null() | values.is_nan().fill_null(False) | values.is_infinite().fill_null(False)
    )
    return pl.select(pl.when(bad).then(None).otherwise(values)).to_series(), _err(bad, "not a number")


def _parse_date(s: pl.Series, timezone: str) -> _Parsed:
    if s.dtype == pl.Date:
        s = s.cast(pl.Datetime("ms"))
    if isinstance(s.dtype, pl.Datetime):
        dt = (
            s
            if s.dtype.time_zone
            else s.dt.replace_time_zone(timezone, ambiguous="earliest", non_existent="null")
        )
        return dt.dt.epoch("ms"), _err(
            s.is_not_null() & dt.is_null(), "not a valid time in the job's time zone"
        )
    norm = s.str.replace(" ", "T", literal=True).str.replace(r"[zZ]$", "+00:00")
    n = pl.col("v")

    def local(expr: pl.Expr) -> pl.Expr:
        return expr.dt.replace_time_zone(timezone, ambiguous="earliest", non_existent="null").dt.epoch("ms")

    values = (
        pl.DataFrame({"v": norm})
        .select(
            pl.coalesce(
                pl.when(n.str.len_chars() == 10).then(
                    local(n.str.to_date("%Y-%m-%d", strict=False).cast(pl.Datetime("ms")))
                ),
                n.str.to_datetime(
                    "%Y-%m-%dT%H:%M:%S%.f%z", strict=False, time_zone="UTC", time_unit="ms"
                ).dt.epoch("ms"),
                n.str.to_datetime("%Y-%m-%dT%H:%M%z", strict=False, time_zone="UTC", time_unit="ms").dt.epoch(
                    "ms"
                ),
                local(n.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", strict=False, time_unit="ms")),
                local(n.str.to_datetime("%Y-%m-%dT%H:%M", strict=False, time_unit="ms")),
            )
        )
        .to_series()
    )
    return values, _err(s.is_not_null() & values.is_null(), "not an ISO 8601 date or date-time")


def _parse_list(s: pl.Series, delimiter: str) -> _Parsed:
    if isinstance(s.dtype, pl.List):
        items = s.list.eval(pl.element().cast(pl.String).str.strip_chars()).list.eval(
            pl.element().filter(pl.element().is_not_null() & (pl.element() != ""))
        )
        return pl.select(pl.when(items.list.len() > 0).then(items)).to_series(), _no_errors(len(s))
    is_json = s.str.starts_with("[").fill_null(False)
    split = (
        s.str.split(delimiter)
        .list.eval(pl.element().str.strip_chars())
        .list.eval(pl.element().filter(pl.element() != ""))
    )
    errors = _no_errors(len(s))
    if is_json.any():
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
        split = pl.Series(s.name, parsed, dtype=pl.List(pl.String))
        errors = pl.Series("err", messages, dtype=pl.String)
    return pl.select(pl.when(split.list.len() > 0).then(split)).to_series(), errors


def _parse_string(s: pl.Series) -> _Parsed:
    return s.cast(pl.String), _no_errors(len(s))


def _parse(s: pl.Series, mapping: AttributeMapping, rules: ValidationRules) -> _Parsed:
    if isinstance(s.dtype, pl.List) and mapping.type is not ValueType.LIST:
        return pl.Series([None] * len(s), dtype=_DTYPE[mapping.type]), _err(
            s.is_not_null(), "a list where a single value is expected"
        )
    if mapping.type is ValueType.BOOLEAN:
        return _parse_bool(s)
    if mapping.type is ValueType.NUMBER:
        return _parse_number(s)
    if mapping.type is ValueType.DATE:
        return _parse_date(s, rules.timezone)
    if mapping.type is ValueType.LIST:
        return _parse_list(s, mapping.delimiter)
    return _parse_string(s)


def _parse_email(s: pl.Series) -> _Parsed:
    bad = s.is_not_null() & ~(s.str.contains(_EMAIL).fill_null(False) & (s.str.len_chars() <= 254))
    return pl.select(pl.when(bad).then(None).otherwise(s)).to_series(), _err(bad, "not a valid email address")


def _parse_msisdn(s: pl.Series) -> _Parsed:
    norm = s.str.replace_all(_MSISDN_SEPARATORS, "")
    bad = s.is_not_null() & ~norm.str.contains(_MSISDN).fill_null(False)
    return (
        pl.select(pl.when(bad).then(None).otherwise(norm)).to_series(),
        _err(bad, "not a valid MSISDN (optional +, then 8-15 digits)"),
    )


def _parse_action(s: pl.Series) -> _Parsed:
    low = s.str.to_lowercase()
    values = pl.select(
        pl.when(low.is_null())
        .then(True)
        .when(low.is_in(_TAG_ACTIONS_ON))
        .then(True)
        .when(low.is_in(_TAG_ACTIONS_OFF))
        .then(False)
        .otherwise(None)
    ).to_series()
    return values, _err(values.is_null(), "not a tag action (tag/untag, add/remove, +/-)")


def _required(s: pl.Series, message: str) -> _Parsed:
    return s, _err(s.is_null(), message)


def validate_chunk(
    raw: pl.DataFrame, source: Source, rules: ValidationRules, file_index: int, file_name: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Type and check one chunk. Returns ``(clean, rejects)``: the rows that passed, typed as
    :func:`clean_schema` says (minus ``__key``), and one rejects row per failed input row (first failing column;
    the reason lists every problem of the row)."""
    n = raw.height
    ext = _text(raw[source.ext_id], source, rules)
    checks: list[tuple[str, pl.Series, pl.Series]] = []  # (input column, typed values, errors)
    id_err = pl.select(
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
    ).to_series()
    checks.append((source.ext_id, ext, id_err))
    out: dict[str, pl.Series] = {}

    def add(column: str, name: str, parsed: _Parsed) -> None:
        values, errors = parsed
        raw_text = raw[column]
        if raw_text.dtype == pl.String:
            # A NUL character is binary junk (or a UTF-16 file read as UTF-8), never a value to send.
            nul = raw_text.str.contains("\x00", literal=True).fill_null(False)
            if nul.any():
                values = pl.select(pl.when(nul).then(None).otherwise(values)).to_series()
                errors = pl.select(
                    pl.when(nul).then(pl.lit("contains a NUL character")).otherwise(errors)
                ).to_series()
        out[name] = values
        checks.append((column, values, errors))

    if source.kind is SourceKind.TAGS:
        assert source.tag is not None
        add(source.tag, TAG, _required(_text(raw[source.tag], source, rules), "missing tag"))
        if source.action:
            add(source.action, ACTION, _parse_action(_text(raw[source.action], source, rules)))
        else:
            out[ACTION] = pl.Series(ACTION, [True] * n, dtype=pl.Boolean)
    if source.kind is SourceKind.EVENTS:
        assert source.event is not None
        add(source.event, EVENT, _required(_text(raw[source.event], source, rules), "missing event name"))
    for a in source.attributes:
        add(a.column, a.column, _parse(_text(raw[a.column], source, rules), a, rules))
    for t in source.tags:
        add(t.column, t.column, _parse_list(_text(raw[t.column], source, rules), t.delimiter))
    for c in source.opt_ins.columns():
        add(c, c, _parse_bool(_text(raw[c], source, rules)))
    if source.email:
        add(source.email, source.email, _parse_email(_text(raw[source.email], source, rules)))
    if source.msisdn:
        add(source.msisdn, source.msisdn, _parse_msisdn(_text(raw[source.msisdn], source, rules)))

    errs = pl.DataFrame({f"e{i}": e for i, (_, _, e) in enumerate(checks)})
    cols = [c for c, _, _ in checks]
    verdict = errs.select(
        pl.coalesce(
            [pl.when(pl.col(f"e{i}").is_not_null()).then(pl.lit(c)) for i, c in enumerate(cols)]
        ).alias("column"),
        pl.sum_horizontal([pl.col(f"e{i}").is_not_null() for i in range(len(cols))]).alias("n"),
        pl.coalesce([pl.col(f"e{i}") for i in range(len(cols))]).alias("first"),
        pl.concat_str(
            [
                pl.when(pl.col(f"e{i}").is_not_null()).then(pl.lit(f"{c}: ") + pl.col(f"e{i}"))
                for i, c in enumerate(cols)
            ],
            separator="; ",
            ignore_nulls=True,
        ).alias("all"),
    )
    bad = verdict["n"] > 0
    typed = pl.DataFrame(
        {EXT_ID: ext, FILE: pl.Series([file_index] * n, dtype=pl.Int32), ROW: raw[ROW], **out}
    )
    schema = {k: v for k, v in clean_schema(source).items() if k != KEY}
    clean = typed.filter(~bad).select([pl.col(k).cast(v) for k, v in schema.items()])
    rejects = pl.DataFrame(
        {
            "file": pl.Series([file_name] * n, dtype=pl.String),
            "row": raw[ROW],
            "column": verdict["column"],
            "reason": pl.select(
                pl.when(verdict["n"] > 1).then(verdict["all"]).otherwise(verdict["first"])
            ).to_series(),
            "ext_id": ext,
        }
    ).filter(bad)
    return clean, rejects


def _value_columns(source: Source) -> list[str]:
    return [c for c in clean_schema(source) if c not in (KEY, EXT_ID, FILE, ROW)]


def resolve_duplicates(
    frame: pl.DataFrame, source: Source, files: Sequence[str]
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Apply the duplicate rule to clean rows holding *every* row of their IDs.

    The last valid row of an ID wins (files in path order, rows in file order). An earlier row whose values
    differ from the winner's is reported as rejected, naming the winning row; an earlier row with the same values
    is dropped silently. Events are never deduplicated; a tags source deduplicates per (ID, tag).
    Returns ``(winners, rejects, identical_duplicates_dropped)``.
    """
    if source.kind is SourceKind.EVENTS or frame.is_empty():
        return frame, pl.DataFrame(schema=REJECTS_SCHEMA), 0
    key = [EXT_ID, TAG] if source.kind is SourceKind.TAGS else [EXT_ID]
    ordered = frame.sort([FILE, ROW])
    marked = ordered.with_columns(
        (pl.int_range(pl.len()).over(key) == pl.len().over(key) - 1).alias("__last")
    )
    if marked["__last"].all():
        return frame, pl.DataFrame(schema=REJECTS_SCHEMA), 0
    winners = marked.filter(pl.col("__last")).drop("__last")
    losers = marked.filter(~pl.col("__last")).drop("__last")
    values = [c for c in _value_columns(source) if c not in key]
    joined = losers.join(winners.select([*key, FILE, ROW, *values]), on=key, how="left", suffix="__w")
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
    conflicts = joined.filter(pl.col("__conflict"))
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
