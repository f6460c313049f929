"""The value parsers of row validation (:mod:`sync.planning.validation`): how each kind of column is typed and
judged, as polars expressions over the column's text, and the exact readings of texts their fast forms may not fit.

Value formats are listed in :mod:`sync.planning.validation` and docs/jobs.md.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from sync.config import Source, ValidationRules

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
_WHITE_SPACE = [
    *"\t\n\x0b\x0c\r \x85\xa0\u1680",
    *map(chr, range(0x2000, 0x200B)),
    *"\u2028\u2029\u202f\u205f\u3000",
]
"""The characters trimming removes: Unicode White_Space, as polars' strip_chars() sees it (a test holds the two
together)."""

# A parser maps a column's text (``s``: trimmed, null values nulled) to its typed values (``p``) and, given both,
# to the reasons a value is refused: ``(condition, message)`` pairs in precedence order, the first whose condition
# holds naming the problem. Values only matter on rows that pass: a row with a refused value is rejected whole.
# Where a fast form is exact for most texts (a plain date, a tidy list), a parser's _Fallback flags the texts it
# may not fit; those are read exactly after the chunk's query, those rows only.


@dataclass(frozen=True, slots=True)
class _Fallback:
    """The rows a parser's fast values may not fit, and how to read their texts exactly instead."""

    rows: Callable[[pl.Expr, pl.Expr], pl.Expr]
    """From ``(s, p)``: true where ``p`` may be wrong (false where it is exact)."""
    read: Callable[[pl.Series], tuple[pl.Series, pl.Series]]
    """Texts → their exact values and messages (null where a text is fine)."""


_Reason = tuple[pl.Expr, str | pl.Expr]
"""``(condition, message)``: a value is refused with ``message`` where ``condition`` is true."""


@dataclass(frozen=True, slots=True)
class _Parser:
    """How one check types and judges a column's text."""

    values: pl.Expr
    reasons: Callable[[pl.Expr, pl.Expr], list[_Reason]]
    refuses_nul: bool = False
    """Every text holding a NUL character is refused (it is no boolean, number, date, address...), so the flag need
    not look for NULs; the message, which names the NUL, still does."""
    fallback: _Fallback | None = None
    text: pl.Expr | None = None
    """The text the parser reads where it is not the column's (trimmed) text: the untrimmed text
    (:func:`_untrimmed_text`), whose texts its fast form takes only where they read the same trimmed, its fallback
    flagging every other text, read exactly (trimmed) after the query. Trimming every value of a column costs more
    than most checks of it."""


_NO_ERROR = pl.lit(None, pl.String)
_NUL = "contains a NUL character"


def _spellings(words: Sequence[str]) -> list[str]:
    """Every upper/lower-case spelling of ``words``.

    Matching these is matching ``to_lowercase()`` against the words (no character outside ASCII lower-cases to
    ASCII letters of them: tests/test_validation.py checks every code point), without lower-casing every value
    of a column first.
    """
    out: list[str] = []
    for word in words:
        cases = [(c.lower(), c.upper()) if c.lower() != c.upper() else (c,) for c in word]
        out += ["".join(spelling) for spelling in itertools.product(*cases)]
    return out


_TRUE_SPELLINGS = _spellings(_TRUE)
_FALSE_SPELLINGS = _spellings(_FALSE)
_TAG_ON_SPELLINGS = _spellings(_TAG_ACTIONS_ON)
_TAG_OFF_SPELLINGS = _spellings(_TAG_ACTIONS_OFF)


def _either(s: pl.Expr, yes: list[str], no: list[str]) -> pl.Expr:
    return pl.when(s.is_in(yes)).then(pl.lit(True)).when(s.is_in(no)).then(pl.lit(False)).otherwise(None)


def _text(s: pl.Expr, dtype: Any, source: Source, rules: ValidationRules) -> pl.Expr:
    if dtype != pl.String:
        return s
    return _no_nulls(s.str.strip_chars() if rules.trim else s, source)


_NOT_FINITE_TEXTS = ("nan", "inf", "-inf")
"""The texts :func:`float_text` gives a NaN or infinite float: no other float's text is one of them."""


def float_text(column: pl.Expr) -> pl.Expr:
    """The text of a float column's values (the reading keeps such a column a float): polars' own text (``2.5``,
    ``1e+20``; a float32's shortest, ``0.1``), but NaN as ``nan``.

    polars writes NaN as ``NaN``, one of the default null values: a typed NaN would be read as "no value" (and an
    attribute mapped with ``on_null: unset`` removed). It is a value that is not a number, as inf is: ``nan`` (as
    Python and polars spell inf, ``inf``), which the number parser refuses, and :func:`_typed_text` too."""
    return pl.when(column.is_nan()).then(pl.lit("nan")).otherwise(column.cast(pl.String))


def _untrimmed_text(s: pl.Expr, source: Source, *, blanks_only: bool = False) -> pl.Expr:
    """``s`` untrimmed, with the null values nulled that are their own trimmed form: a text equal to one of those is
    a null value trimmed or not. Any other text that is a null value once trimmed has whitespace at an end, and
    the parsers reading this flag such a text for the exact reading. ``blanks_only``: only the empty text is
    nulled (for a parser that refuses every other null value: :func:`_refuses`), which a length tells."""
    exact = _own_trimmed_null_values(source)
    if blanks_only:
        return pl.when(s.str.len_bytes() == 0).then(None).otherwise(s) if "" in exact else s
    return pl.when(s.is_in(exact)).then(None).otherwise(s) if exact else s


def _own_trimmed_null_values(source: Source) -> list[str]:
    """The null values that are their own trimmed form."""
    return list(_trimmed_in_place(tuple(source.null_values)))


# The probes below run small polars queries (a few ms each) and are asked the same questions for every column
# of a kind and every query built (a chunk's forms, the refused rows' query): a run's first batch waits for
# them. Their answers depend on their arguments only — module-level parser builders and texts — so they are
# remembered (a lambda or closure is a new key each time: correct, merely not remembered usefully).
@functools.lru_cache(maxsize=64)
def _trimmed_in_place(values: tuple[str, ...]) -> tuple[str, ...]:
    texts = pl.Series(list(values), dtype=pl.String)
    return tuple(texts.filter(texts.str.strip_chars() == texts).to_list())


def _refuses(exact: Callable[[pl.Expr], _Parser], texts: Sequence[str]) -> bool:
    """Whether the parser ``exact`` builds refuses every one of ``texts``."""
    return _refuses_all(exact, tuple(texts))


@functools.lru_cache(maxsize=256)
def _refuses_all(exact: Callable[[pl.Expr], _Parser], texts: tuple[str, ...]) -> bool:
    if not texts:
        return True
    s, p = pl.col("s"), pl.col("p")
    parser = exact(s)
    frame = pl.DataFrame({"s": list(texts)}, schema={"s": pl.String}).with_columns(parser.values.alias("p"))
    refused = frame.select(pl.any_horizontal(c for c, _ in parser.reasons(s, p)).fill_null(False)).to_series()
    return bool(refused.all())


@functools.lru_cache(maxsize=64)
def _empty_is_null(exact: Callable[[pl.Expr], _Parser]) -> bool:
    """Whether the parser ``exact`` builds gives the empty text no value, as it gives a null text none."""
    parser = exact(pl.col("s"))
    frame = pl.DataFrame({"s": ["", None]}, schema={"s": pl.String}).select(parser.values.alias("p"))
    return frame["p"].null_count() == 2


def _no_nulls(s: pl.Expr, source: Source) -> pl.Expr:
    """``s`` (read twice: a query column, not an expression to compute) with the null values nulled."""
    if not source.null_values:
        return s
    # Not s.replace(null_values, None): a membership test and a mask are cheaper than a mapping.
    return pl.when(s.is_in(list(source.null_values))).then(None).otherwise(s)


def _parse_bool(s: pl.Expr) -> _Parser:
    return _Parser(
        _either(s, _TRUE_SPELLINGS, _FALSE_SPELLINGS),
        lambda s, p: [(s.is_not_null() & p.is_null(), "not a boolean (true/false, yes/no, 1/0)")],
        refuses_nul=True,
    )


def _untrimmed(
    exact: Callable[[pl.Expr], _Parser],
    s: pl.Expr,
    *,
    blanks: bool = False,
    fast_form: Callable[[pl.Expr], _Parser] | None = None,
) -> _Parser:
    """The parser ``exact`` builds, reading the untrimmed text ``s`` (:func:`_untrimmed_text`) with its own form
    or ``fast_form``: every text that refuses there is read exactly (trimmed, null values nulled) after the query,
    and gets the message ``exact`` gives it then, or its value. Only for a form that, for any text it accepts
    untrimmed, gives the value ``exact`` gives the trimmed text, and where no null value is that trimmed text: one
    whose accepted texts are their own trimmed form (a spelling, a number, an address: nothing of them is
    whitespace), or one that drops whitespace anyway (:func:`_msisdn_untrimmed`). ``blanks``: ``s`` holds empty
    texts, null values the form gives no value (:func:`_empty_is_null`); they are not read again."""
    fast = (fast_form or exact)(s)
    text, values = pl.col("s"), pl.col("p")
    slow = exact(text)
    message = _message(slow.reasons(text, values))

    def read(texts: pl.Series) -> tuple[pl.Series, pl.Series]:
        frame = (
            pl.LazyFrame({"s": texts})
            .with_columns(slow.values.alias("p"))
            .select("p", message.alias("m"))
            .collect()
        )
        return frame["p"], frame["m"]

    def rows(s: pl.Expr, p: pl.Expr) -> pl.Expr:
        refused = pl.any_horizontal(condition for condition, _ in fast.reasons(s, p))
        # An empty text is a null value, which the parser reads as one (no value): not one to read again.
        return (refused & (s.str.len_bytes() > 0) if blanks else refused).fill_null(False)

    return _Parser(
        fast.values,
        lambda s, p: [],
        refuses_nul=fast.refuses_nul,
        fallback=_Fallback(rows, read),
        text=s,
    )


_EXACT_INTEGERS = 2**53
"""Every integer up to this magnitude is a float64; past it, not every one is (2**53 + 1 reads as 2**53)."""
_TOO_SMALL = "too small to represent: it would be sent as 0"
_LOSES_PRECISION = (
    "an integer past 2^53 loses precision as a number (it would be sent rounded); map the column as a string "
    "to send it exactly"
)

_DECIMAL_LOSES_PRECISION = (
    "a decimal past 2^53 loses precision as a number (its fraction or last digits would be sent rounded); map "
    "the column as a string to send it exactly"
)


def _parse_number(s: pl.Expr) -> _Parser:
    def reasons(s: pl.Expr, p: pl.Expr) -> list[_Reason]:
        bad = ~p.is_finite().fill_null(False)  # no number, NaN or infinite
        # A zero from a literal whose digits before the exponent are not all zero: it underflowed (1e-400).
        underflow = (p == 0) & s.str.contains(r"^[^eE]*[1-9]")
        # An integer literal past 2**53 whose float is another integer (9007199254740993 reads as ...992). A
        # number column is sent as a JSON number read as a float64 (ours, and most JSON readers'): refused,
        # rather than sent exactly to a platform that would round it anyway.
        # (Past 128 bits, neither side casts: refused, as no float64 of that size is read back as its literal.)
        literal = s.str.contains(r"^[+-]?[0-9]+$")
        exact = s.str.strip_chars_start("+").cast(pl.Int128, strict=False)
        rounded = p.cast(pl.Int128, strict=False)
        differs = exact.is_null() | rounded.is_null() | (exact != rounded)
        lossy = (p.abs() >= _EXACT_INTEGERS) & literal & differs
        # A decimal past 2**53 (a database's numeric(38, 2) amount, 123456789012345678.90): no float64 that size
        # holds a fraction, nor every integer part. Refused when its integer part or a non-zero fraction would
        # be lost; a zero fraction of an integer a float64 holds (100000000000000000000.00) is sent.
        digits = s.str.extract(r"^[+-]?([0-9]+)\.[0-9]*$", 1)  # null: no decimal literal
        whole = digits.cast(pl.Int128, strict=False)
        fraction = s.str.contains(r"\.[0-9]*[1-9]")
        lossy_decimal = (
            (p.abs() >= _EXACT_INTEGERS)
            & digits.is_not_null()
            & (whole.is_null() | p.abs().cast(pl.Int128, strict=False).ne_missing(whole) | fraction)
        )
        return [
            (s.is_not_null() & bad, "not a number"),
            (underflow.fill_null(False), _TOO_SMALL),
            (lossy.fill_null(False), _LOSES_PRECISION),
            (lossy_decimal.fill_null(False), _DECIMAL_LOSES_PRECISION),
        ]

    return _Parser(s.cast(pl.Float64, strict=False), reasons, refuses_nul=True)


def _fast_number(s: pl.Expr) -> _Parser:
    """A fast form of :func:`_parse_number` (for :func:`_untrimmed`): the same values, refusing (for the exact
    reading, those rows only) every text that is not a finite number, every zero but the text ``0``, and every
    number from 2**53 on — two comparisons of the values instead of the exact form's searches of every text."""

    def reasons(s: pl.Expr, p: pl.Expr) -> list[_Reason]:
        odd = ~p.is_finite().fill_null(False) | ((p == 0) & (s != "0")) | (p.abs() >= _EXACT_INTEGERS)
        return [(s.is_not_null() & odd.fill_null(True), "not a plain number")]

    return _Parser(s.cast(pl.Float64, strict=False), reasons, refuses_nul=True)


_NOT_A_DATE = "not an ISO 8601 date or date-time"
_YEAR_ZERO = (
    "year 0000: no calendar year (ISO 8601 allows it only by agreement; a placeholder for an unknown date?)"
)
_BEFORE_YEAR_ONE = (
    "a year before 0001 (BC): no date a platform reads as meant (a placeholder for an unknown date?)"
)
_OUT_OF_RANGE = (
    "a year past 9999, or out of any calendar's range: no date a platform reads as meant (a placeholder for "
    "'never'?)"
)
_LEAP_SECOND = "second 60 (a leap second): epoch milliseconds have none, it would be sent as the next minute"
_MS_PER_DAY = 86_400_000
_YEAR_ONE_MS = -62_135_596_800_000
"""0001-01-01T00:00Z in epoch milliseconds. A plain date read before it (minus a day: a zone east of UTC) may be
year 0000, which the exact reading refuses."""


def _nonexistent(timezone: str) -> str:
    """The message of a local time that ``timezone`` skips (a daylight-saving gap)."""
    return (
        f"this local time does not exist in time zone {timezone} (the clocks skip it: daylight saving time)"
    )


def _local(expr: pl.Expr, timezone: str) -> pl.Expr:
    """Naive date-times read in ``timezone``, as epoch milliseconds (null for a time the zone skips)."""
    if timezone == "UTC":  # no gaps, no folds: the naive value is the UTC one
        return expr.dt.epoch("ms")
    return expr.dt.replace_time_zone(timezone, ambiguous="earliest", non_existent="null").dt.epoch("ms")


def _day(v: pl.Expr, timezone: str) -> pl.Expr:
    """``YYYY-MM-DD`` text as the epoch milliseconds of its midnight in ``timezone``."""
    date = v.str.to_date("%Y-%m-%d", strict=False, cache=False)
    if timezone == "UTC":
        return date.cast(pl.Int64) * _MS_PER_DAY
    return _local(date.cast(pl.Datetime("ms")), timezone)


def _date_times(timezone: str) -> Callable[[pl.Series], tuple[pl.Series, pl.Series]]:
    """Read ISO 8601 dates and date-times: texts → (epoch milliseconds, messages).

    The forms are tried in turn on the text with ``T`` for its first space and ``+00:00`` for a final ``Z``.
    """

    v = pl.col("v")
    day = v.str.len_chars() == 10
    forms = [
        pl.when(day).then(_day(v, timezone)),
        v.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%z", strict=False, time_zone="UTC", time_unit="ms").dt.epoch(
            "ms"
        ),
        v.str.to_datetime("%Y-%m-%dT%H:%M%z", strict=False, time_zone="UTC", time_unit="ms").dt.epoch("ms"),
        _local(v.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", strict=False, time_unit="ms"), timezone),
        _local(v.str.to_datetime("%Y-%m-%dT%H:%M", strict=False, time_unit="ms"), timezone),
    ]
    # The local forms without the zone: where one reads a text the zone's forms do not, the time is in a gap.
    naive = pl.coalesce(
        pl.when(day).then(v.str.to_date("%Y-%m-%d", strict=False, cache=False).cast(pl.Datetime("ms"))),
        v.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", strict=False, time_unit="ms"),
        v.str.to_datetime("%Y-%m-%dT%H:%M", strict=False, time_unit="ms"),
    )
    s = pl.col("s")
    normal = s.str.replace(" ", "T", literal=True).str.replace(r"[zZ]$", "+00:00")

    def read(text: pl.Series) -> tuple[pl.Series, pl.Series]:
        p = pl.col("p")
        frame = (
            pl.LazyFrame({"s": text})
            .with_columns(normal.alias("v"))
            .with_columns(pl.coalesce(forms).alias("p"))
            .select(
                "p",
                # The lenient forms may take a text with a NUL in it; it is no date.
                pl.when(s.str.contains("\x00", literal=True))
                .then(pl.lit(_NUL))
                # polars reads year 0000 (1 BC) and second 60 (as the next minute): neither is a date to send.
                .when(p.is_not_null() & pl.col("v").str.starts_with("0000"))
                .then(pl.lit(_YEAR_ZERO))
                .when(p.is_not_null() & pl.col("v").str.starts_with("-"))  # chrono's %Y reads a signed year
                .then(pl.lit(_BEFORE_YEAR_ONE))
                .when(p.is_not_null() & pl.col("v").str.contains(r"^[0-9-]+T[0-9]{2}:[0-9]{2}:60"))
                .then(pl.lit(_LEAP_SECOND))
                .when(s.is_not_null() & p.is_null() & naive.is_not_null())
                .then(pl.lit(_nonexistent(timezone)))
                .when(s.is_not_null() & p.is_null())
                .then(pl.lit(_NOT_A_DATE))
                .alias("m"),
            )
            .collect()
        )
        return frame["p"], frame["m"]

    return read


def _parse_date(s: pl.Expr, timezone: str, *, untrimmed: bool = False, refuses_nul: bool = False) -> _Parser:
    """Dates and date-times. ``untrimmed``: ``s`` is read as :func:`_untrimmed_text` gives it. ``refuses_nul``:
    the query need not look for NULs in the column (no null value holds one, so every text with one is read
    exactly, and refused)."""
    # Most date columns hold plain dates (ten characters, no space, no Z): read as a date in one parse, with the
    # first form of _date_times (for such a text the normal form is the text itself). The other texts (a NUL
    # among them: the lenient date-time parsers may take one) are read with every form after the query, as few as
    # they are, and trimmed. Untrimmed, a plain date holds no whitespace at all: it is its own trimmed form
    # (polars' date parser takes a leading tab, which trimming would have removed first).
    odd = [*(_WHITE_SPACE if untrimmed else [" "]), "z", "Z", "\x00"]
    plain = (s.str.len_chars() == 10) & ~s.str.contains_any(odd)
    # A plain date read before year 1 (a comparison of the values, not a search of the texts) may be year 0000:
    # read exactly, which refuses it.
    early = _YEAR_ONE_MS - _MS_PER_DAY
    return _Parser(
        _day(pl.when(plain).then(s), timezone),
        lambda s, p: [],
        refuses_nul=refuses_nul,
        fallback=_Fallback(lambda s, p: s.is_not_null() & (p.is_null() | (p < early)), _date_times(timezone)),
        text=s if untrimmed else None,  # the fallback's test reads the same text, not a trimmed one
    )


def _typed_date(s: pl.Expr, dtype: Any, timezone: str) -> _Parser:
    """A typed date or date-time column (Parquet, a database): no parsing, but what a text would be refused for
    as a date, its value is refused for too — a local time the zone skips (a DST gap) is no time at all, and a
    year of 0 or less (pyarrow's date32 and polars hold them) is 1 BC or earlier, and one past 9999 (a text date
    of five digits is no ISO 8601 date either) — or so far off that no calendar year can be read from it, which
    polars gives as null — was sent as epoch milliseconds no platform reads as meant, past 2**53 even. The year
    is the one the value is held in (its own zone's, as a text's is the one written), read in one vectorised
    step."""
    dt = s.cast(pl.Datetime("ms")) if dtype == pl.Date else s
    if not (isinstance(dtype, pl.Datetime) and dtype.time_zone):
        dt = dt.dt.replace_time_zone(timezone, ambiguous="earliest", non_existent="null")

    def reasons(s: pl.Expr, p: pl.Expr) -> list[_Reason]:
        year = s.dt.year()
        return [
            ((year > 9999) | (s.is_not_null() & year.is_null()), _OUT_OF_RANGE),
            ((year == 0).fill_null(False), _YEAR_ZERO),
            ((year < 0).fill_null(False), _BEFORE_YEAR_ONE),
            (s.is_not_null() & p.is_null(), _nonexistent(timezone)),
        ]

    return _Parser(dt.dt.epoch("ms"), reasons)


def _split(s: pl.Expr, delimiter: str) -> pl.Expr:
    """Text split on ``delimiter``, items trimmed, empty items dropped; null for no item."""
    items = (
        s.str.split(delimiter)
        .list.eval(pl.element().str.strip_chars())
        .list.eval(pl.element().filter(pl.element() != ""))
    )
    return pl.when(items.list.len() > 0).then(items)


_NOT_A_NUMBER_ITEM = "a list item is not a number (NaN or infinite)"


def _typed_list(s: pl.Expr, *, floats: bool = False) -> _Parser:
    """A typed list column (Parquet, a database): items as text. ``floats``: a list of floats, whose NaN or
    infinite item is refused as such a value is (``not a number``), never sent as the text ``NaN``."""
    items = s.list.eval(pl.element().cast(pl.String).str.strip_chars()).list.eval(
        pl.element().filter(pl.element().is_not_null() & (pl.element() != ""))
    )

    def reasons(s: pl.Expr, p: pl.Expr) -> list[_Reason]:
        if not floats:
            return []
        odd = s.list.eval(pl.element().is_not_null() & ~pl.element().is_finite()).list.any()
        return [(odd.fill_null(False), _NOT_A_NUMBER_ITEM)]

    return _Parser(pl.when(items.list.len() > 0).then(items), reasons)


def _lists(delimiter: str) -> Callable[[pl.Series], tuple[pl.Series, pl.Series]]:
    """Read list texts, some of them maybe JSON arrays: texts → (lists, messages).

    JSON arrays are read per value in Python (they are rare in CRM exports; only texts starting with ``[`` are).
    A text holding a NUL character is refused (:data:`_NUL`), whatever else it is.
    """

    s = pl.col("s")

    def read(text: pl.Series) -> tuple[pl.Series, pl.Series]:
        nul = s.str.contains("\x00", literal=True).fill_null(False)
        frame = pl.DataFrame({"s": text}).select(
            _split(s, delimiter).alias("v"),
            pl.when(nul).then(pl.lit(_NUL)).otherwise(pl.lit(None, pl.String)).alias("m"),
            (s.str.starts_with("[").fill_null(False) & ~nul).alias("j"),
        )
        values, errors, rows = frame["v"], frame["m"], frame["j"].arg_true()
        if rows.is_empty():
            return values, errors
        parsed: list[list[str] | None] = []
        messages: list[str | None] = []
        for value in text.gather(rows).to_list():
            try:
                items = json.loads(value)
            except ValueError:
                items = None
            if not isinstance(items, list) or any(isinstance(v, dict | list) for v in items):
                parsed.append(None)
                messages.append("not a list (invalid JSON array)")
                continue
            texts = [v if isinstance(v, str) else json.dumps(v) for v in items if v is not None]
            parsed.append([t.strip() for t in texts if t.strip()] or None)
            messages.append(None)
        json_values = pl.Series(parsed, dtype=pl.List(pl.String))
        return _put(values, rows, json_values), errors.scatter(rows, pl.Series(messages, dtype=pl.String))

    return read


def _parse_list(s: pl.Expr, delimiter: str, *, refuses_nul: bool = False, tidy: bool = False) -> _Parser:
    """Lists of items in a text. ``refuses_nul``: the query need not look for NULs in the column (no null value
    holds one, so every text with one is read exactly, and refused). ``tidy``: no text of the chunk is untidy
    (:func:`tidy_lists`), so every one is split, and none read again."""
    # Most list texts are items and delimiters with nothing around them: split, and that is all. A text with a
    # blank or empty item (or a blank around an item, "a| b"), a JSON array, or a NUL character is read exactly
    # after the query (one regex scan for all of them; the exact reading refuses a NUL). Untrimmed: a text with
    # whitespace at an end is untidy (the regex's \s is the Unicode White_Space that trimming removes), so a tidy
    # text is its own trimmed form.
    # Tidy: no NUL either, so no flag looks for one; the fallback stays (flagging nothing) so that the checks'
    # fallbacks are those of the refused rows' query, which takes the per-text form.
    untidy = pl.lit(False) if tidy else s.str.contains(_untidy_list(delimiter)).fill_null(False)
    return _Parser(
        s.str.split(delimiter),
        lambda s, p: [],
        refuses_nul=refuses_nul or tidy,
        fallback=_Fallback(lambda s, p: untidy, _lists(delimiter)),
        text=s,
    )


def _parse_email(s: pl.Expr) -> _Parser:
    def reasons(s: pl.Expr, _p: pl.Expr) -> list[_Reason]:
        # An address the regex takes is ASCII: as many characters as bytes (a length in bytes costs less).
        valid = s.str.contains(_EMAIL).fill_null(False) & (s.str.len_bytes() <= 254)
        return [(s.is_not_null() & ~valid, "not a valid email address")]

    return _Parser(s, reasons, refuses_nul=True)


def _msisdn_untrimmed(null_values: Sequence[str]) -> bool:
    """Whether :func:`_parse_msisdn` may read untrimmed texts (:func:`_untrimmed`): it removes whitespace wherever
    it is, so a text and its trimmed form have the same number; a text it accepts is a null value once trimmed
    only when a null value is a number once its separators are removed (the default ones are not)."""
    return _no_number_among(tuple(null_values))


@functools.lru_cache(maxsize=64)
def _no_number_among(null_values: tuple[str, ...]) -> bool:
    values = pl.Series(list(null_values), dtype=pl.String)
    numbers = values.str.strip_chars().str.replace_all(_MSISDN_SEPARATORS, "").str.contains(_MSISDN)
    return not numbers.any()


def _parse_msisdn(s: pl.Expr) -> _Parser:
    return _Parser(
        s.str.replace_all(_MSISDN_SEPARATORS, ""),
        lambda s, p: [
            (
                s.is_not_null() & ~p.str.contains(_MSISDN).fill_null(False),
                "not a valid MSISDN (optional +, then 8-15 digits)",
            )
        ],
        refuses_nul=True,
    )


def _plain_msisdn(s: pl.Expr) -> _Parser:
    """A fast form of :func:`_parse_msisdn` (for :func:`_untrimmed`): a text that is an MSISDN as it is, with no
    separator to remove, is its own value, found with the one regex scan; it refuses every other text, for the
    exact reading. Saves removing separators from every text, where most have none."""
    return _Parser(
        s,
        lambda s, p: [(s.is_not_null() & ~s.str.contains(_MSISDN).fill_null(False), "not a plain MSISDN")],
        refuses_nul=True,
    )


def _mostly(texts: pl.Expr, form: str) -> pl.Expr:
    """Whether at least half the non-null texts of a sample (a chunk's head) are all of ``form`` (a regex): a
    fast form that takes those and leaves the rest to its exact reading is the quicker for that chunk."""
    return (texts.str.contains(form).mean() >= 0.5).fill_null(True)


def _parse_action(s: pl.Expr) -> _Parser:
    values = (
        pl.when(s.is_null()).then(pl.lit(True)).otherwise(_either(s, _TAG_ON_SPELLINGS, _TAG_OFF_SPELLINGS))
    )
    return _Parser(
        values,
        lambda s, p: [(p.is_null(), "not a tag action (tag/untag, add/remove, +/-)")],
        refuses_nul=True,
    )


def _required(s: pl.Expr, message: str) -> _Parser:
    return _Parser(s, lambda s, p: [(s.is_null(), message)])


def _id_reasons(ext: pl.Expr, rules: ValidationRules) -> list[_Reason]:
    return [
        (ext.is_null(), "missing external ID"),
        (
            ext.str.len_chars() > rules.max_id_length,
            f"external ID longer than {rules.max_id_length} characters",
        ),
        (
            ext.str.contains(_CONTROL).fill_null(False),
            "external ID contains a control character (tab, line break, NUL...)",
        ),
        (
            ext.str.contains(_INVISIBLE).fill_null(False),
            "external ID contains an invisible character (zero-width, byte-order mark or bidirectional control): "
            "it would look like another ID without being equal to it",
        ),
    ]


def _id_refused(ext: pl.Expr, rules: ValidationRules) -> pl.Expr:
    """Whether any of :func:`_id_reasons` holds, with one scan of the text for both kinds of character."""
    odd = ext.str.contains(f"{_CONTROL}|{_INVISIBLE}").fill_null(False)
    return ext.is_null() | (ext.str.len_chars() > rules.max_id_length) | odd


_NOT_A_NUMBER_TEXT = "not a number (NaN or infinite), in a float column mapped as a string"


def _typed_text(s: pl.Expr) -> _Parser:
    """A float column (Parquet, a database) mapped as a string, read as its text (:func:`float_text`, null values
    nulled). A NaN or infinite value is refused, as it is where the column is mapped as a number, never sent as
    the text ``nan`` or ``inf``: the column's type says it is a float that is not a number, where a CSV file's
    text ``nan`` is text, and sent as such."""
    return _Parser(s, lambda s, p: [(s.is_in(_NOT_FINITE_TEXTS).fill_null(False), _NOT_A_NUMBER_TEXT)])


def _plain_texts(u: pl.Expr, *, refuses_nul: bool, tidy: bool = False) -> _Parser:
    """Text values read untrimmed (:func:`_untrimmed_text`): one regex scan flags the texts with whitespace at an
    end, read exactly (trimmed, null values nulled) after the query, and those with a NUL, refused there; every
    other text is its own trimmed form. ``refuses_nul`` as for :func:`_parse_list`. ``tidy``: no text of the
    chunk has whitespace at an end or a NUL (:func:`tidy_texts`): each is its own
    trimmed form, and none is read again."""
    s = pl.col("s")
    nul = pl.when(s.str.contains("\x00", literal=True)).then(pl.lit(_NUL))

    def read(texts: pl.Series) -> tuple[pl.Series, pl.Series]:
        frame = pl.DataFrame({"s": texts}).select(s.alias("p"), nul.alias("m"))
        return frame["p"], frame["m"]

    # Tidy: as for _parse_list.
    untidy = pl.lit(False) if tidy else u.str.contains(_untidy_text()).fill_null(False)
    return _Parser(
        u,
        lambda s, p: [],
        refuses_nul=refuses_nul or tidy,
        fallback=_Fallback(lambda s, p: untidy, read),
        text=u,
    )


def _id_read_again(u: pl.Expr, rules: ValidationRules, *, tidy: bool = False) -> pl.Expr:
    """The untrimmed IDs (:func:`_untrimmed_text`) to read exactly, trimmed (:func:`_ids`): those
    :func:`_id_refused` flags, and those with whitespace at an end (which may pass once trimmed), found in the same
    regex scan. A missing one is missing trimmed too (refused without another reading); any other ID is its own
    trimmed form, and passes. ``tidy``: no ID of the chunk has whitespace at an end or a character the check
    refuses (:func:`tidy_ids`): only the length is left to check."""
    long = (u.str.len_chars() > rules.max_id_length).fill_null(False)
    if tidy:
        return long
    return long | u.str.contains(_odd_id()).fill_null(False)


# --- tidy chunks: one scan of a column instead of one regex search per text ----------------------------------------
#
# Most chunks hold no text that a column's per-text regex flags (whitespace at an end, a NUL, an empty list item...).
# A regex search has a fixed cost per text however short the text (its setup), and a chunk's text columns were
# searched text by text: the largest single piece of polars' work on the 1M-user bench job. So before its query,
# a chunk's texts of each such column are joined into one string, separated by _SEPARATOR, and searched once with a
# pattern that flags what the per-text pattern flags at any text's start or end (_SEPARATOR standing for both):
# where it finds nothing, no text would be flagged, and the query takes the column's tidy form (no flag, no
# fallback). It may flag a chunk none of whose texts is untidy — a text holding _SEPARATOR itself — which then
# takes the per-text form: never the other way round.
_SEPARATOR = "\x01"
_START, _END = "^", "$"  # a text's ends, in a per-text pattern
_JOINED_START, _JOINED_END = r"(?:^|\x01)", r"(?:$|\x01)"  # the same in the texts joined by _SEPARATOR


def _untidy_text(start: str = _START, end: str = _END) -> str:
    """The pattern of a text read exactly (:func:`_plain_texts`): whitespace at an end, or a NUL."""
    return rf"{start}\s|\s{end}|\x00"


def _odd_id(start: str = _START, end: str = _END, control: str = _CONTROL) -> str:
    """The pattern of an external ID read exactly (:func:`_id_read_again`): whitespace at an end, a control or an
    invisible character."""
    return rf"{start}\s|\s{end}|{control}|{_INVISIBLE}"


def _untidy_list(delimiter: str, start: str = _START, end: str = _END) -> str:
    """The pattern of a list text read exactly (:func:`_parse_list`): a JSON array, a NUL, an empty or blank item, or
    whitespace around one."""
    d = pl.escape_regex(delimiter)
    return rf"{start}\[|\x00|(?:{start}|{d})(?:\s|{d}|{end})|\s(?:{d}|{end})"


def _tidy(column: pl.Expr, joined_pattern: str, *, separator_refused: bool = False) -> pl.Expr:
    """An aggregate: true when no text of ``column`` would be flagged, from one search of the texts joined by
    :data:`_SEPARATOR` for ``joined_pattern`` (a per-text pattern with its ends made :data:`_JOINED_START` and
    :data:`_JOINED_END`). ``separator_refused``: the per-text pattern flags the separator itself (a control
    character, left out of ``joined_pattern``), so the texts must not hold one: the joined string then holds
    exactly one between two texts."""
    joined = column.str.join(_SEPARATOR)
    tidy = ~joined.str.contains(joined_pattern)
    if separator_refused:
        between = (column.count().cast(pl.Int64) - 1).clip(lower_bound=0)  # separators between the texts
        tidy = tidy & (joined.str.count_matches(_SEPARATOR, literal=True) == between)
    return tidy.fill_null(False)


def tidy_texts(column: pl.Expr) -> pl.Expr:
    """:func:`_tidy` for :func:`_plain_texts`."""
    return _tidy(column, _untidy_text(_JOINED_START, _JOINED_END))


def tidy_ids(column: pl.Expr) -> pl.Expr:
    """:func:`_tidy` for :func:`_id_read_again` (the control characters but the separator, which is counted)."""
    control = _CONTROL.replace(r"\x00-", r"\x00\x02-")
    return _tidy(column, _odd_id(_JOINED_START, _JOINED_END, control), separator_refused=True)


def tidy_lists(column: pl.Expr, delimiter: str) -> pl.Expr:
    """:func:`_tidy` for :func:`_parse_list`."""
    return _tidy(column, _untidy_list(delimiter, _JOINED_START, _JOINED_END))


def _ids(rules: ValidationRules) -> Callable[[pl.Series], tuple[pl.Series, pl.Series]]:
    """Read external IDs exactly: (trimmed, null values nulled) texts → (the IDs, messages)."""
    s = pl.col("s")
    message = _message(_id_reasons(s, rules))

    def read(texts: pl.Series) -> tuple[pl.Series, pl.Series]:
        frame = pl.DataFrame({"s": texts}).select(s.alias("p"), message.alias("m"))
        return frame["p"], frame["m"]

    return read


def _message(reasons: list[_Reason]) -> pl.Expr:
    """The message of the first reason that holds, null where none does."""
    out = _NO_ERROR
    for condition, message in reversed(reasons):
        out = (
            pl.when(condition)
            .then(message if isinstance(message, pl.Expr) else pl.lit(message))
            .otherwise(out)
        )
    return out


def _put(series: pl.Series, rows: pl.Series, values: pl.Series) -> pl.Series:
    """``series`` with ``values`` at positions ``rows`` (a scatter that also works for list columns)."""
    values = values.cast(series.dtype)
    if not isinstance(series.dtype, pl.List):
        return series.clone().scatter(rows, values)
    n = len(series)
    index = pl.Series(range(n), dtype=pl.UInt32).scatter(
        rows, pl.Series(range(n, n + len(rows)), dtype=pl.UInt32)
    )
    return pl.concat([series, values]).gather(index).alias(series.name)
