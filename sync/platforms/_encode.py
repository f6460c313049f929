"""Canonical JSON text of polars columns, as polars expressions: request bodies are built without a Python object
per value.

Every function here returns a ``String`` expression whose value is, byte for byte (UTF-8), what

    json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

gives for the row's value ``v`` as ``Series.to_list()`` returns it — after one normalisation the platforms ask for
(``integral_floats``, on by default): a float with an integral value below 2**53 in magnitude is written as the
integer (``34`` not ``34.0``; ``-0.0`` as ``0``). A null value gives a null text (a member left out, an item
skipped); :func:`or_null` turns it into the JSON ``null``. The property tests in ``tests/platforms/test_encode.py``
hold the equality for arbitrary values.

Where polars' own text differs from Python's json, an expression fixes it (never a per-value Python call):

* strings: ``"`` and ``\\`` are escaped, control characters U+0000–U+001F become ``\\n``, ``\\r``, ``\\t``, ``\\b``,
  ``\\f`` or ``\\u00xx`` (lower-case hex); everything else (U+007F, U+2028, astral characters) is written as is;
* floats: polars prints the shortest round-trip digits as Python does, but writes ``0.00001`` where Python writes
  ``1e-05`` (below 1e-4 Python switches to an exponent) and ``1.5e-7`` where Python writes ``1.5e-07`` (two
  exponent digits at least); NaN and ±infinity give ``NaN``, ``Infinity`` and ``-Infinity`` as ``json.dumps``
  does — not valid JSON, which is why validation refuses them before any body is built (``not a number``);
* integers of any width and sign: polars' decimal text is Python's.

Supported dtypes: String (and Categorical/Enum), signed and unsigned integers, Float32/Float64, Boolean, Null,
List/Array of these (nested too) and Struct (an object, members in sorted key order; :func:`value` keeps null
members as ``null`` like ``json.dumps`` of a dict, :func:`obj` leaves them out as the platforms' bodies do).
Dates, times and decimals have no JSON form in ``json.dumps`` either: :class:`TypeError`. Clean frames hold dates
as epoch milliseconds (Int64) already.

Object keys are Python strings known when the expression is built (attribute names from the job): they are
encoded once with :func:`key`. Most of the time goes into copying strings, one copy per concatenation: a
:class:`Text` keeps a value's pieces apart so that an object whose member is sure to be present (``required``: an
ID) takes them into its own concatenation (:func:`string_text`, :func:`obj_text`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl
import pyarrow as pa

if TYPE_CHECKING:
    from polars._typing import PolarsDataType

__all__ = [
    "ESCAPED_BYTES",
    "MAX_EXACT_INT",
    "Member",
    "Text",
    "array",
    "boolean",
    "column_text",
    "floating",
    "holds_any",
    "integer",
    "key",
    "list_array",
    "obj",
    "obj_text",
    "or_null",
    "plain_strings",
    "string",
    "string_text",
    "value",
]

MAX_EXACT_INT = 2**53
"""Floats with an integral value below this magnitude are written as integers (``integral_floats``)."""

# json.dumps(ensure_ascii=False) escapes exactly these: the quote, the backslash and U+0000..U+001F.
_ESCAPED = ['"', "\\"] + [chr(c) for c in range(0x20)]
_ESCAPES = [json.dumps(c)[1:-1] for c in _ESCAPED]
# Python writes floats below 1e-4 in magnitude with an exponent; polars writes some of them as 0.0000ddd.
# The UTF-8 bytes of those characters: no byte of a multi-byte sequence is below 0x80, so a buffer without any of
# these holds no value that needs escaping.
_ESCAPED_BYTES = "".join(_ESCAPED).encode("ascii")
ESCAPED_BYTES = _ESCAPED_BYTES
"""The bytes of the characters JSON escapes (the quote, the backslash, U+0000–U+001F): UTF-8 text without any
of them is its JSON string's content as it is."""
_SMALL_FIXED = r"^(-?)0\.(0{4,})([1-9])([0-9]*)$"
_SHORT_EXPONENT = r"e([+-])([0-9])$"


def key(name: str) -> str:
    """The JSON text of an object key (or of any constant string): ``"name"``, escaped."""
    return json.dumps(name, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Text:
    """JSON text kept as the pieces whose concatenation it is: constant strings and String expressions.

    Kept apart so that an enclosing object takes the pieces of a member it knows is present into its own single
    concatenation (one string copy per row instead of one per level: most of an encoder's time is copying).
    ``skip_nulls``: null pieces are left out (an object's optional members); otherwise a null piece makes the
    whole text null (a string of a null value). :meth:`expr` makes it one expression.
    """

    parts: tuple[str | pl.Expr, ...]
    skip_nulls: bool = False

    def pieces(self) -> list[str | pl.Expr]:
        """The parts as one concatenation takes them: neighbouring constants joined, empty ones left out."""
        merged: list[str | pl.Expr] = []
        for part in self.parts:
            if isinstance(part, str) and merged and isinstance(merged[-1], str):
                merged[-1] += part
            elif not (isinstance(part, str) and not part):
                merged.append(part)
        return merged

    def expr(self) -> pl.Expr:
        """The text as one String expression."""
        merged = self.pieces()
        if len(merged) == 1 and not isinstance(merged[0], str):
            return merged[0]
        pieces = [pl.lit(p) if isinstance(p, str) else p for p in merged]
        if not pieces:
            return pl.lit("")
        return pl.concat_str(pieces, ignore_nulls=self.skip_nulls)


Member = pl.Expr | Text
"""An object member's value: a JSON text expression, or a :class:`Text`."""


def _expr(value: Member) -> pl.Expr:
    return value.expr() if isinstance(value, Text) else value


def _parts(value: Member) -> tuple[str | pl.Expr, ...]:
    return value.parts if isinstance(value, Text) else (value,)


def string_text(expr: pl.Expr) -> Text:
    """:func:`string` as a :class:`Text` (null when the value is null), for an object to take in whole."""
    return Text(('"', expr.str.replace_many(_ESCAPED, _ESCAPES), '"'))


_ALNUM_BYTES = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def holds_any(raw: bytes, chars: bytes) -> bool:
    """Whether ``raw`` holds one of the bytes ``chars``, by one scan in C: text of ASCII letters and digits
    alone (most external IDs) is told by :meth:`bytes.isalnum`, which builds nothing (when no byte of ``chars``
    is a letter or a digit); any other by deleting ``chars`` (``bytes.translate``) and comparing lengths."""
    if raw.isalnum() and _ALNUM_BYTES.isdisjoint(chars):
        return False
    return len(raw.translate(None, chars)) != len(raw)


def plain_strings(series: pl.Series) -> bool:
    """True when no value of a String ``series`` holds a character JSON escapes (the quote, the backslash,
    U+0000–U+001F): each value's JSON text is then the value between quotes, and no replacing is needed.

    One scan of the Arrow data buffers in C (:func:`holds_any`), no per-value work: about a third of what the
    replacing costs, which is what a frame of plain values (nearly every real frame) saves. Bytes outside the
    values (a sliced buffer) can only make the answer False, never wrongly True."""
    if series.dtype != pl.String:
        raise TypeError(f"plain_strings takes a String series, not {series.dtype}")
    arrow = series.to_arrow()
    chunks = arrow.chunks if isinstance(arrow, pa.ChunkedArray) else [arrow]
    for chunk in chunks:
        data = chunk.buffers()[-1]
        if data is None:
            continue
        if holds_any(data.to_pybytes(), _ESCAPED_BYTES):
            return False
    return True


def _quoted(expr: pl.Expr) -> Text:
    """The JSON text of values known to need no escaping (:func:`plain_strings`)."""
    return Text(('"', expr, '"'))


def string(expr: pl.Expr) -> pl.Expr:
    """A JSON string literal of each value of a String expression (null stays null)."""
    return string_text(expr).expr()


def boolean(expr: pl.Expr) -> pl.Expr:
    """``true`` / ``false`` (null stays null)."""
    return (
        pl.when(expr)
        .then(pl.lit("true"))
        .when(~expr)
        .then(pl.lit("false"))
        .otherwise(pl.lit(None, pl.String))
    )


def integer(expr: pl.Expr) -> pl.Expr:
    """The decimal text of an integer expression (null stays null)."""
    return expr.cast(pl.String)


def floating(expr: pl.Expr, *, integral_floats: bool = True) -> pl.Expr:
    """Python's ``repr`` of each float (``json.dumps``' form), integral values below 2**53 as integers when
    ``integral_floats`` (null stays null)."""
    x = expr.cast(pl.Float64)
    text = x.cast(pl.String)
    # Only values below 1e-4 in magnitude are written differently; the fix-ups run on those alone (the others are
    # null in ``small``, which string kernels skip) so that the common case costs one cast.
    small = pl.when((x.abs() < 1e-4) & (x != 0)).then(text)
    parts = small.str.extract_groups(_SMALL_FIXED)
    digits = parts.struct.field("4")
    exponent = (parts.struct.field("2").str.len_chars() + 1).cast(pl.String).str.zfill(2)
    scientific = pl.concat_str(
        parts.struct.field("1"),
        parts.struct.field("3"),
        pl.when(digits != "").then(pl.concat_str(pl.lit("."), digits)).otherwise(pl.lit("")),
        pl.lit("e-"),
        exponent,
    )
    fixed = pl.coalesce(scientific, small.str.replace(_SHORT_EXPONENT, "e${1}0${2}"))
    # polars writes NaN as Python does; the infinities differ. Each fix-up is null where it does not apply.
    infinite = pl.when(x.is_infinite()).then(
        pl.when(x > 0).then(pl.lit("Infinity")).otherwise(pl.lit("-Infinity"))
    )
    if not integral_floats:
        return pl.coalesce(infinite, fixed, text)
    whole = x.is_finite() & (x == x.floor()) & (x.abs() < MAX_EXACT_INT)
    as_int = pl.when(whole).then(x).cast(pl.Int64).cast(pl.String)
    return pl.coalesce(as_int, infinite, fixed, text)


def _floating_for(series: pl.Series, *, integral_floats: bool) -> pl.Expr:
    """:func:`floating` of ``series``, without the branches its values never take (one small aggregation tells
    which): no fix-ups when no value is below 1e-4 in magnitude or infinite, no integer branch when no value is
    integral (or every one is), and a suffix strip instead of it when every value is below 2**53 in magnitude
    (and none is -0.0). The same text as :func:`floating`: each branch left out is null for every value."""
    x = pl.col(series.name).cast(pl.Float64)
    whole = x.is_finite() & (x == x.floor()) & (x.abs() < MAX_EXACT_INT)
    facts = series.to_frame().select(
        (((x.abs() < 1e-4) & (x != 0)) | x.is_infinite()).any().alias("fix"),
        whole.sum().alias("whole"),
        x.is_not_null().sum().alias("present"),
        (x.abs() < MAX_EXACT_INT).all().alias("exact"),
        ((x == 0) & (1.0 / x < 0)).any().alias("negative_zero"),
    )
    fix, n_whole, present, exact, negative_zero = facts.row(0)
    if fix:
        return floating(pl.col(series.name), integral_floats=integral_floats)
    text = x.cast(pl.String)
    if not integral_floats or not n_whole:
        return text
    as_int = x.cast(pl.Int64).cast(pl.String)
    if n_whole == present:
        return as_int
    if exact and not negative_zero:
        # Every value is below 2**53 in magnitude and none needs a fix-up: the text of an integral value is its
        # integer's digits and ".0" (Python's repr and polars' alike; no exponent below 1e16), and no other
        # value's text ends so. One suffix strip instead of a second cast and a coalesce. -0.0 would become
        # "-0" (json.dumps of the integer is "0"): left to the general form.
        return text.str.strip_suffix(".0")
    return pl.coalesce(pl.when(whole).then(x).cast(pl.Int64).cast(pl.String), text)


def column_text(frame: pl.DataFrame, name: str, *, integral_floats: bool = True) -> Member:
    """The JSON text of column ``name`` of ``frame`` — exactly :func:`value`'s, null where the value is null —
    by the cheapest expression this frame's values allow: String values that need no escaping
    (:func:`plain_strings`) go between quotes as they are (a :class:`Text`, for an object to take in whole), and
    a float column skips the fix-ups none of its values needs (see :func:`_floating_for`). Other dtypes: as
    :func:`value`. The expression is for ``frame`` alone (another frame's values may need the general one)."""
    series = frame.get_column(name)
    dtype = series.dtype
    if dtype == pl.String:
        if plain_strings(series):
            return _quoted(pl.col(name))
        return string_text(pl.col(name))
    if dtype.is_float():
        return _floating_for(series, integral_floats=integral_floats)
    if dtype == pl.Boolean and not series.null_count():
        # No null to keep: one branch fewer than boolean()'s.
        return pl.when(pl.col(name)).then(pl.lit("true")).otherwise(pl.lit("false"))
    return value(pl.col(name), dtype, integral_floats=integral_floats)


def or_null(expr: pl.Expr) -> pl.Expr:
    """A JSON text expression whose nulls become the JSON ``null``."""
    return expr.fill_null(pl.lit("null"))


def value(expr: pl.Expr, dtype: PolarsDataType, *, integral_floats: bool = True) -> pl.Expr:
    """The JSON text of an expression of type ``dtype`` (see the module docstring; null stays null).

    Raises :class:`TypeError` for a dtype JSON has no form for.
    """
    if dtype == pl.String:
        return string(expr)
    if isinstance(dtype, pl.Categorical | pl.Enum):
        return string(expr.cast(pl.String))
    if dtype == pl.Boolean:
        return boolean(expr)
    if dtype.is_integer():
        return integer(expr)
    if dtype.is_float():
        return floating(expr, integral_floats=integral_floats)
    if dtype == pl.Null:
        return expr.cast(pl.String)
    if isinstance(dtype, pl.List | pl.Array):
        inner = dtype.inner
        assert inner is not None
        listed = expr if isinstance(dtype, pl.List) else expr.arr.to_list()
        return list_array(listed, inner, integral_floats=integral_floats)
    if isinstance(dtype, pl.Struct):
        # Fields are taken by position: a field whose name polars reads as a pattern ("*", "^...$") would be
        # expanded, not looked up (polars panics on it).
        plain = [f"f{i}" for i in range(len(dtype.fields))]
        renamed = expr.struct.rename_fields(plain)
        members = {
            f.name: value(renamed.struct.field(p), f.dtype, integral_floats=integral_floats)
            for p, f in zip(plain, dtype.fields, strict=True)
        }
        whole = obj(members, drop_nulls=False)
        return pl.when(expr.is_null()).then(pl.lit(None, pl.String)).otherwise(whole)
    raise TypeError(f"no JSON form for a column of type {dtype}")


def list_array(expr: pl.Expr, inner: PolarsDataType, *, integral_floats: bool = True) -> pl.Expr:
    """The JSON array of each list of a List expression whose items are ``inner`` (null items as ``null``; a
    null list stays null)."""
    items = expr.list.eval(or_null(value(pl.element(), inner, integral_floats=integral_floats)))
    return pl.concat_str(pl.lit("["), items.list.join(","), pl.lit("]"))


def array(items: Iterable[pl.Expr], *, drop_nulls: bool = True) -> pl.Expr:
    """A JSON array of a fixed number of items, each a JSON text expression: null items are left out
    (``drop_nulls``) or written as ``null``."""
    texts = [item if drop_nulls else or_null(item) for item in items]
    if not texts:
        return pl.lit("[]")
    return pl.concat_str(pl.lit("["), pl.concat_str(texts, separator=",", ignore_nulls=True), pl.lit("]"))


def obj_text(
    members: Mapping[str, Member], *, drop_nulls: bool = True, required: Collection[str] = ()
) -> Text:
    """:func:`obj` as a :class:`Text` (never null), for an enclosing object to take in whole."""
    names = sorted(members)
    if not drop_nulls:
        members = {name: or_null(_expr(members[name])) for name in names}
        required = names
    anchor = next((i for i, name in enumerate(names) if name in required), None)
    if anchor is None:
        # No member is sure to be there: join those present with commas.
        present = [pl.concat_str(pl.lit(key(name) + ":"), _expr(members[name])) for name in names]
        if not present:
            return Text(("{}",))
        return Text(("{", pl.concat_str(present, separator=",", ignore_nulls=True), "}"), skip_nulls=True)
    # The first member sure to be there anchors the commas: members before it end with one, members after it
    # start with one, so any of the optional ones may be left out. A required member's pieces join the object's
    # own (a null piece among them would be left out silently: "required" is the caller's promise).
    parts: list[str | pl.Expr] = ["{"]
    for i, name in enumerate(names):
        before, after = ("," if i > anchor else ""), ("," if i < anchor else "")
        if name in required:
            parts += [before + key(name) + ":", *_parts(members[name]), after]
        else:
            spliced = _one_column(members[name])
            if spliced is not None:
                # A plain column between constants (a string that needs no escaping): its pieces join the
                # object's own concatenation, the constants made null with it (null pieces are skipped), so the
                # value is copied once instead of once more in a concatenation of its own.
                lead, column, trail = spliced
                there = column.is_not_null()
                parts += [
                    pl.when(there).then(pl.lit(f"{before}{key(name)}:{lead}")),
                    column,
                    pl.when(there).then(pl.lit(f"{trail}{after}")),
                ]
                continue
            value = _expr(members[name])
            parts.append(pl.concat_str(pl.lit(before + key(name) + ":"), value, pl.lit(after)))
    parts.append("}")
    return Text(tuple(parts), skip_nulls=True)


def _one_column(member: Member) -> tuple[str, pl.Expr, str] | None:
    """``(lead, column, trail)`` of a :class:`Text` that is a plain column between two constants and is null
    where the column is (``skip_nulls`` off), e.g. :func:`column_text`'s quoted plain strings; None for any
    other member."""
    if not isinstance(member, Text) or member.skip_nulls or len(member.parts) != 3:
        return None
    lead, column, trail = member.parts
    if not (isinstance(lead, str) and isinstance(trail, str) and isinstance(column, pl.Expr)):
        return None
    return (lead, column, trail) if column.meta.is_column() else None


def obj(members: Mapping[str, Member], *, drop_nulls: bool = True, required: Collection[str] = ()) -> pl.Expr:
    """A JSON object of ``members`` (key → JSON text), keys in sorted order as ``sort_keys`` sorts them.

    A null member is left out (``drop_nulls``, as the platforms' bodies leave out values a row does not have) or
    written as ``null``. An object whose every member is left out is ``{}``, never null. ``required`` names
    members that are never null (an ID): the object is then built with fewer string copies.
    """
    return obj_text(members, drop_nulls=drop_nulls, required=required).expr()
