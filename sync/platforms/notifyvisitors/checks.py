"""The values NotifyVisitors refuses, found at plan time: polars expressions over a clean frame's columns, for
:meth:`sync.platforms.notifyvisitors.requests.Builder.check_rows`.

The platform refuses a whole request for one bad item (seed 004; :mod:`sync.sandboxes.notifyvisitors` emulates it),
and the dispatcher then halves the batch until the item is isolated: about 2·log2(n) more requests per bad row.
So each rule the sandbox enforces per item is checked here on the value the builder *sends* for a column, after
its conversions (mobile numbers cleaned up, text dates and flags read leniently, lists joined with ``,``). A
value refused here is a value the builder would have sent as it is and the platform would have refused:

==================  ============================================================================================
attribute           refused when the value sent is
==================  ============================================================================================
any text            longer than :data:`MAX_STRING_LENGTH` (999) characters (a list: its items joined)
``mobile``          not E.164 (:data:`E164_PATTERN`) once separators are removed and a leading ``00`` becomes
                    ``+``; a number column's text too (``str(value)``, as the builder formats it)
``email``           not an address (:data:`EMAIL_PATTERN`), or not text
``birth_date``      not a ``date`` column and not a text ``strptime(text, "%Y-%m-%d")`` reads as a real day
opt-in flags        not a ``boolean`` column and not a yes/no word (:data:`FLAG_YES`, :data:`FLAG_NO`)
==================  ============================================================================================

The last four are ``user/create``'s rules: an event's attributes are free-form. ``userID``, event names and
``event_time`` are the builder's own checks. The source's ``email:`` and ``msisdn:`` columns were validated
already (:mod:`sync.planning.validation`), which makes their checks nothing and a few byte tests. A
``birth_date`` text whose year or day is written in another script's digits is not judged (Python reads them,
polars does not cast them): the builder converts it or sends it as it is, as before. Reasons name the attribute
and the rule, never the value (it may be personal data).
"""

from __future__ import annotations

import polars as pl

from sync.config import ValueType
from sync.platforms import _encode as enc
from sync.platforms._text import PY_SPACE_CHARS, PY_WHITESPACE
from sync.platforms.notifyvisitors import (
    DATE_ATTRIBUTES,
    E164_PATTERN,
    EMAIL_PATTERN,
    MAX_STRING_LENGTH,
    OPT_IN_ATTRIBUTES,
)

__all__ = ["FLAG_NO", "FLAG_YES", "MOBILE_NOISE_CHARS", "e164_text", "joined_list", "refusal"]

FLAG_YES = frozenset({"1", "true", "yes", "y", "t", "on"})
"""Texts an opt-in flag reads as ``"1"`` (after Python's ``strip().lower()``)."""
FLAG_NO = frozenset({"0", "false", "no", "n", "f", "off"})
"""Texts an opt-in flag reads as ``"0"``."""
MOBILE_NOISE_CHARS = [*PY_SPACE_CHARS, *"().-"]
"""The separators people type inside phone numbers (Python's ``[\\s().-]``) as characters: removed with one
Aho-Corasick pass, twice as fast as the regex."""
_NO_NOISE = [""] * len(MOBILE_NOISE_CHARS)

_EMAIL = EMAIL_PATTERN.replace(r"\s", PY_WHITESPACE)
""":data:`EMAIL_PATTERN` for polars, whose ``\\s`` is not Python's. (``$`` is the end of the text in both: the
sandbox matches the whole value.)"""
_DATE = r"^(\d{4})-(1[0-2]|0[1-9]|[1-9])-(3[01]|[12]\d|0[1-9]|[1-9]| [1-9])$"
"""What ``datetime.strptime(text, "%Y-%m-%d")`` reads (CPython's ``_strptime`` patterns: a month or day of one
digit or two, a day may be a space and a digit), as year, month and day."""
_SPECIAL = frozenset({"mobile", "email", *DATE_ATTRIBUTES, *OPT_IN_ATTRIBUTES})


def e164_text(text: pl.Expr) -> pl.Expr:
    """A phone number's text as :func:`.requests.format_mobile` makes it: separators removed, a leading ``00``
    made ``+``. (E.164 when it then matches :data:`E164_PATTERN`.)"""
    cleaned = text.str.replace_many(MOBILE_NOISE_CHARS, _NO_NOISE)
    return (
        pl.when(cleaned.str.starts_with("00"))
        .then(pl.concat_str(pl.lit("+"), cleaned.str.slice(2)))
        .otherwise(cleaned)
    )


def joined_list(column: pl.Expr) -> pl.Expr:
    """A list column's items joined with ``,`` (``str`` of each: ``None`` for a null item): NotifyVisitors
    attributes hold no arrays [I]."""
    return column.list.eval(pl.element().cast(pl.String).fill_null("None")).list.join(",")


def _python_text(column: pl.Expr, dtype: pl.DataType, kind: ValueType) -> pl.Expr | None:
    """The text the builder's Python code reads a value as (``str(value)``; a list joined); None for a ``date``
    column (written as a time of day: never a phone number, an address or a flag)."""
    if kind is ValueType.DATE and dtype.is_integer():
        return None
    if dtype == pl.String:
        return column
    if isinstance(dtype, pl.List):
        return joined_list(column)
    if dtype.is_float():
        return enc.floating(column, integral_floats=False)
    if dtype == pl.Boolean:
        return pl.when(column).then(pl.lit("True")).when(~column).then(pl.lit("False"))
    return column.cast(pl.String)


def _too_long(name: str, text: pl.Expr) -> pl.Expr:
    length = text.str.len_chars()
    # Null elsewhere: the message is made for the long texts alone.
    over = pl.when(length > MAX_STRING_LENGTH).then(length)
    return pl.concat_str(
        pl.lit(f"{name} is "),
        over.cast(pl.String),
        pl.lit(f" characters long: NotifyVisitors takes at most {MAX_STRING_LENGTH}"),
    )


def _not_a_date(text: pl.Expr) -> pl.Expr:
    """Where ``datetime.strptime(text, "%Y-%m-%d")`` fails: not of the form, or no real day (year 0000, 30
    February). Null (not judged) where the year or day is written in another script's digits, which Python
    reads and polars does not cast: the builder's Python code decides those (rare) values, as before."""
    parts = text.str.extract_groups(_DATE)
    year = parts.struct.field("1").cast(pl.Int32, strict=False)
    month = parts.struct.field("2").cast(pl.Int32)
    day = parts.struct.field("3").str.strip_chars_start(" ").cast(pl.Int32, strict=False)
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    last = (
        pl.when(month == 2)
        .then(pl.when(leap).then(29).otherwise(28))
        .when(month.is_in([4, 6, 9, 11]))
        .then(30)
        .otherwise(31)
    )
    formless = text.is_not_null() & parts.struct.field("1").is_null()
    return pl.when(formless).then(True).otherwise((year < 1) | (day > last))


def _not_a_flag(text: pl.Expr) -> pl.Expr:
    # Python's strip() and lower(): no character outside ASCII lowers into these ASCII words in either.
    words = sorted(FLAG_YES | FLAG_NO)
    return ~text.str.strip_chars(PY_SPACE_CHARS).str.to_lowercase().is_in(words)


def _validated_e164(msisdn: pl.Expr) -> pl.Expr:
    """Whether a validated MSISDN (:mod:`sync.planning.validation`: an optional ``+`` and 8 to 15 digits, the
    separators removed) is E.164 once :func:`e164_text` has made it: ``+`` and a digit other than 0, or ``00``, a
    digit other than 0 and 8 digits or more after the ``00``. Byte tests, eight times cheaper than the clean-up
    and the regex on the ``msisdn:`` column of every users row."""
    plus = msisdn.str.starts_with("+") & ~msisdn.str.starts_with("+0")
    return plus | (
        msisdn.str.starts_with("00") & ~msisdn.str.starts_with("000") & (msisdn.str.len_bytes() >= 10)
    )


def refusal(
    name: str, kind: ValueType, dtype: pl.DataType, column: str, *, user: bool, validated: bool = False
) -> pl.Expr | None:
    """Why NotifyVisitors refuses the value the builder sends for ``column`` (attribute ``name``, a ``kind``
    column of ``dtype`` in the clean frame; ``user``: of a ``user/create`` item): a reason per row, null where
    the platform takes it. None when it takes every value such a column holds.

    ``validated``: the column is the source's ``email:`` or ``msisdn:`` column, which validation has already
    read as an address (in a form stricter than the platform's: nothing more to check) or as an MSISDN."""
    col = pl.col(column)
    text = _python_text(col, dtype, kind)
    is_text = dtype == pl.String or isinstance(dtype, pl.List)
    if not user or name not in _SPECIAL:
        return _too_long(name, text) if is_text and text is not None else None
    if name == "mobile":
        reason = pl.lit(
            "mobile is not in E.164 (+, country code and number, 8 to 15 digits): NotifyVisitors refuses it, "
            "and pushsync does not guess a country"
        )
        if validated:
            return pl.when(~_validated_e164(col)).then(reason)
        if text is None:
            return pl.when(col.is_not_null()).then(reason)
        return pl.when(~e164_text(text).str.contains(E164_PATTERN)).then(reason)
    if name == "email":
        if validated:
            return None
        reason = pl.lit("email is not an e-mail address: NotifyVisitors refuses it")
        if not is_text or text is None:
            return pl.when(col.is_not_null()).then(reason)  # sent as a number, a flag or a time
        return pl.coalesce(pl.when(~text.str.contains(_EMAIL)).then(reason), _too_long(name, text))
    if name in DATE_ATTRIBUTES:
        if text is None:
            return None  # a date column: always written as a real YYYY-MM-DD
        not_a_date = f"{name} is not a date as YYYY-MM-DD: NotifyVisitors refuses it"
        return pl.when(_not_a_date(text)).then(pl.lit(not_a_date))
    # An opt-in flag.
    if dtype == pl.Boolean:
        return None  # "1" or "0", always
    reason = pl.lit(f'{name} is not a yes/no value: NotifyVisitors takes "1" or "0"')
    if text is None:
        return pl.when(col.is_not_null()).then(reason)
    return pl.when(_not_a_flag(text)).then(reason)
