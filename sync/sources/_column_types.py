"""Which typed (Parquet) columns each mapping accepts, checked from the schema before any row is read.

CSV columns are text, and text is parsed row by row (:mod:`sync.planning.validation`): a bad value rejects its row. A
Parquet column carries a type, and some types cannot become what a mapping sends: a struct would be sent as
``{"Ann","Lee"}``, a date mapped as a number as a day count, a float ID as ``"123.0"``. Such a column is refused
as a whole — one :class:`sync.errors.BadInputError` naming the file and the column, before anything is read or
sent — rather than turned into wrong data or rejected row by row. The table in docs/jobs.md ("Column types")
is this module's decision table; keep them in step.
"""

from __future__ import annotations

from enum import StrEnum

import pyarrow as pa

from sync.config import Source, ValueType

__all__ = ["Kind", "column_kind", "type_problems"]


class Kind(StrEnum):
    """What a column's Arrow type holds, as far as a mapping is concerned."""

    TEXT = "text"
    INTEGER = "integer"
    FLOAT = "floating-point"
    DECIMAL = "decimal"
    BOOLEAN = "boolean"
    DATE = "date"
    TIMESTAMP = "timestamp"
    TIME = "time-of-day"
    DURATION = "duration"
    NULL = "null"
    LIST = "list"
    NESTED_LIST = "list of lists, structs or dates"
    STRUCT = "struct"
    MAP = "map"
    OTHER = "other"


_SCALAR_ITEMS = frozenset({Kind.TEXT, Kind.INTEGER, Kind.FLOAT, Kind.DECIMAL, Kind.BOOLEAN, Kind.NULL})
"""Item kinds a list column may hold: each item becomes one text item of a list attribute or one tag."""


def column_kind(arrow_type: pa.DataType) -> Kind:
    """The :class:`Kind` of an Arrow type (dictionary-encoded columns count as their values)."""
    t = arrow_type
    if pa.types.is_dictionary(t):
        t = t.value_type
    checks = (
        (Kind.TEXT, (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)),
        # Binary is read as UTF-8 text; bytes that are not text are refused when read (file, row, column).
        (Kind.TEXT, (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)),
        (Kind.INTEGER, (pa.types.is_integer,)),
        (Kind.FLOAT, (pa.types.is_floating,)),
        (Kind.DECIMAL, (pa.types.is_decimal,)),
        (Kind.BOOLEAN, (pa.types.is_boolean,)),
        (Kind.DATE, (pa.types.is_date,)),
        (Kind.TIMESTAMP, (pa.types.is_timestamp,)),
        (Kind.TIME, (pa.types.is_time,)),
        (Kind.DURATION, (pa.types.is_duration,)),
        (Kind.NULL, (pa.types.is_null,)),
        (Kind.STRUCT, (pa.types.is_struct,)),
        (Kind.MAP, (pa.types.is_map,)),
    )
    for kind, predicates in checks:
        if any(p(t) for p in predicates):
            return kind
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return Kind.LIST if column_kind(t.value_type) in _SCALAR_ITEMS else Kind.NESTED_LIST
    return Kind.OTHER


# Role → kinds accepted. A kind not listed is refused for that role. NULL (a column with no value at all) is
# accepted everywhere: it sends nothing.
_ALWAYS = frozenset({Kind.NULL})
_ID = frozenset({Kind.TEXT, Kind.INTEGER}) | _ALWAYS
_ACCEPTED: dict[ValueType, frozenset[Kind]] = {
    ValueType.STRING: frozenset({Kind.TEXT, Kind.INTEGER, Kind.FLOAT, Kind.DECIMAL, Kind.BOOLEAN, Kind.DATE})
    | _ALWAYS,
    ValueType.NUMBER: frozenset({Kind.TEXT, Kind.INTEGER, Kind.FLOAT, Kind.DECIMAL}) | _ALWAYS,
    ValueType.BOOLEAN: frozenset({Kind.TEXT, Kind.INTEGER, Kind.BOOLEAN}) | _ALWAYS,
    ValueType.DATE: frozenset({Kind.TEXT, Kind.DATE, Kind.TIMESTAMP}) | _ALWAYS,
    ValueType.LIST: frozenset({Kind.TEXT, Kind.LIST}) | _ALWAYS,
}
_NAME = frozenset({Kind.TEXT, Kind.INTEGER}) | _ALWAYS
"""Tag names, event names, e-mail addresses and MSISDNs."""

_WHY: dict[Kind, str] = {
    Kind.STRUCT: 'a struct would be sent as its field values in braces, e.g. \'{"Ann","Lee"}\'',
    Kind.MAP: "a map has no single value to send",
    Kind.NESTED_LIST: "only lists of text, numbers or booleans can be sent",
    Kind.DATE: "a date would be sent as a count of days",
    Kind.TIMESTAMP: "a timestamp would be sent as a count of microseconds or as text in no agreed format",
    Kind.TIME: "a time of day has no agreed form on the platform",
    Kind.DURATION: "a duration has no unit the platform would know",
    Kind.FLOAT: "a number like 123 would be sent as '123.0'",
    Kind.DECIMAL: "a number like 123 would be sent as '123.00'",
    Kind.BOOLEAN: "true/false is not a value of this kind",
    Kind.INTEGER: "a whole number has no agreed meaning here (epoch seconds? milliseconds?)",
    Kind.LIST: "a list where a single value is expected",
    Kind.TEXT: "text is not a value of this kind",
    Kind.OTHER: "this type cannot be sent",
}


def _roles(source: Source) -> list[tuple[str, str, frozenset[Kind]]]:
    """(column, what the mapping sends it as, kinds accepted) for every mapped column."""
    roles: list[tuple[str, str, frozenset[Kind]]] = [(source.ext_id, "the external ID", _ID)]
    roles += [(a.column, f"a {a.type.value} attribute", _ACCEPTED[a.type]) for a in source.attributes]
    roles += [(t.column, "tags", _ACCEPTED[ValueType.LIST]) for t in source.tags]
    roles += [(c, "an opt-in (boolean)", _ACCEPTED[ValueType.BOOLEAN]) for c in source.opt_ins.columns()]
    named = (
        (source.email, "an e-mail address"),
        (source.msisdn, "an MSISDN"),
        (source.tag, "a tag name"),
        (source.event, "an event name"),
    )
    roles += [(c, what, _NAME) for c, what in named if c]
    if source.action:
        roles.append((source.action, "a tag action", _ACCEPTED[ValueType.BOOLEAN]))
    return roles


def type_problems(source: Source, schema: pa.Schema) -> list[tuple[str, str]]:
    """``(column, message)`` for each mapped column of ``schema`` whose type its mapping cannot send.

    Columns absent from the schema are left to the header check.
    """
    out = []
    for column, role, accepted in _roles(source):
        if column not in schema.names:
            continue
        arrow_type = schema.field(column).type
        kind = column_kind(arrow_type)
        if kind in accepted:
            continue
        why = _WHY.get(kind, _WHY[Kind.OTHER])
        if column == source.ext_id and kind in (Kind.FLOAT, Kind.DECIMAL):
            # The wording users of earlier versions know (and scripts may match).
            message = (
                f"the external-ID column holds {arrow_type} numbers, which would be sent as '123.0'; "
                "write it as text or integers"
            )
        else:
            article = "an" if kind.value[0] in "aeiou" else "a"  # an integer column
            message = f"{article} {kind.value} column ({arrow_type}) cannot be sent as {role}: {why}"
            if kind in (Kind.DATE, Kind.TIMESTAMP) and role != "the external ID":
                message += "; map it with type: date (sent as epoch milliseconds)"
            else:
                message += "; convert the column to text when writing the file"
        out.append((column, message))
    return out
