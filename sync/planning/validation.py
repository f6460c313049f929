"""Row validation and typing, and the "newest row decides" rule for duplicate IDs.

:func:`validate_chunk` turns a raw chunk (text columns from :mod:`sync.sources.reading`, floats, dates and lists
kept typed) into a typed *clean* frame and a frame of rejected rows, all with vectorised polars expressions;
:func:`rejected_ids` keeps the rejected rows that name an ID, for the duplicate rule. :func:`resolve_duplicates`
applies the duplicate rule to all rows of a set of IDs at once. The clean frame is platform-neutral: one typed
column per mapped column plus ``__ext_id``, ``__file`` (index into the source's file list), ``__row`` and
``__key`` (the canonical order).

Value formats (see docs/jobs.md):

- boolean: ``true/false``, ``t/f``, ``yes/no``, ``y/n``, ``1/0``, ``on/off`` (any case);
- number: decimal or scientific notation with a dot (``12``, ``-3.5``, ``1e3``); kept as float64, so a literal it
  would change is refused: one that underflows to 0 (``1e-400``), an integer past 2**53 it rounds;
- date: ISO 8601 ``YYYY-MM-DD`` (midnight), ``YYYY-MM-DD[T ]HH:MM[:SS[.fff]]`` with optional ``Z`` or ``±HH:MM``;
  values without an offset are in the job's ``validation.timezone``; stored (and sent) as epoch milliseconds;
  not year 0000 or a signed year before it, second 60, or a local time the zone skips (a typed date or
  timestamp column: not a year of 0 or less, nor a local time the zone skips);
- list: a JSON array (``["a","b"]``) or text split on the mapping's delimiter (default ``|``), items trimmed,
  empty items dropped; an empty list counts as no value;
- string: any text; a typed column's value as its text (a float's ``2.5``), but not a float's NaN or infinity;
- email: ``local@domain.tld``, at most 254 characters; MSISDN: an optional ``+`` and 8-15 digits once spaces,
  dashes, dots and brackets are removed (sent without them).
"""

from __future__ import annotations

import functools
import operator
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa

from sync.config import AttributeMapping, Source, SourceKind, ValidationRules, ValueType
from sync.planning._parsers import (
    _MSISDN,
    _NUL,
    _empty_is_null,
    _fast_number,
    _id_read_again,
    _id_reasons,
    _id_refused,
    _ids,
    _message,
    _mostly,
    _msisdn_untrimmed,
    _no_nulls,
    _own_trimmed_null_values,
    _parse_action,
    _parse_bool,
    _parse_date,
    _parse_email,
    _parse_list,
    _parse_msisdn,
    _parse_number,
    _Parser,
    _plain_msisdn,
    _plain_texts,
    _put,
    _Reason,
    _refuses,
    _required,
    _text,
    _typed_date,
    _typed_list,
    _typed_text,
    _untrimmed,
    _untrimmed_text,
    float_text,
    tidy_ids,
    tidy_lists,
    tidy_texts,
)
from sync.records import RejectedRow
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
    "rejected_ids",
    "rejected_schema",
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


_LONG_ID = 256
"""Bytes: IDs longer than this are keyed one at a time (:func:`zlib.crc32`). The tables grow with the longest ID
keyed (1 KiB per byte), and IDs this long are rare enough that a call each costs less than tables for them."""
_PAIRED = 40
"""Bytes: IDs of an even length up to this (zero-padded numbers, UUIDs) are read two bytes at a time, through
tables of 65,536 entries (256 KiB per pair of bytes, built once the length is met)."""


class _CrcTables:
    """The CRC-32 tables :func:`canonical_key` reads, grown (under a lock) to the longest ID keyed so far.

    CRC-32 is affine over GF(2): for a message ``m`` of ``L`` bytes, ``crc(m) = crc(0^L) ^ XOR_i D[L-1-i][m[i]]``,
    where ``D[d][v] = crc(v 0^d) ^ crc(0^(d+1))`` is what byte value ``v`` adds when ``d`` bytes follow it. So a
    byte's share is one table look-up, independent of the other bytes: the bytes at one position of many IDs
    of one length take one gather and one XOR, where the CRC's own recurrence takes a chain of operations per
    byte, one position after the other. Two bytes read as one little-endian 16-bit value ``w`` followed by
    ``d`` bytes add ``P[d/2][w] = D[d+1][w & 0xFF] ^ D[d][w >> 8]``: one look-up for both.
    """

    __slots__ = ("_lock", "distances", "pairs", "zeros")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # plans of two jobs may key IDs in two threads of one process
        self.distances: tuple[pl.Series, ...] = ()  # D[d], d < len(distances): 256 UInt32 values each
        self.zeros: tuple[int, ...] = (0,)  # zeros[L] = crc(0^L), L <= len(distances)
        self.pairs: tuple[pl.Series, ...] = ()  # P[j] (pairs of bytes 2j+1 and 2j from the end): 65,536 each

    def upto(self, length: int) -> tuple[tuple[pl.Series, ...], tuple[int, ...]]:
        """``(D, zeros)`` for IDs of up to ``length`` bytes (at most :data:`_LONG_ID`)."""
        distances, zeros = self.distances, self.zeros  # replaced together, under the lock: read once each
        if len(distances) >= length:
            return distances, zeros
        with self._lock:
            grown, crcs = list(self.distances), list(self.zeros)
            while len(grown) < length:
                # D[0] is the CRC table itself (the share of a last byte); D[d+1] is D[d] carried through one
                # more byte, a zero one (which adds nothing of its own: the map is linear).
                grown.append(
                    _CRC_TABLE if not grown else _CRC_TABLE.gather(grown[-1] & 0xFF) ^ (grown[-1] // 256)
                )
                crcs.append(zlib.crc32(b"\0", crcs[-1]))
            self.distances, self.zeros = tuple(grown), tuple(crcs)
            return self.distances, self.zeros

    def paired(self, length: int) -> tuple[pl.Series, ...]:
        """``P`` for IDs of ``length`` bytes (even, at most :data:`_PAIRED`)."""
        pairs = self.pairs
        if 2 * len(pairs) >= length:
            return pairs
        distances, _zeros = self.upto(length)
        with self._lock:
            grown = list(self.pairs)
            words = pl.int_range(0, 1 << 16, dtype=pl.UInt32, eager=True)
            while 2 * len(grown) < length:
                d = 2 * len(grown)
                grown.append(distances[d + 1].gather(words & 0xFF) ^ distances[d].gather(words // 256))
            self.pairs = tuple(grown)
            return self.pairs


_TABLES = _CrcTables()


def canonical_key(ext_ids: pl.Series) -> pl.Series:
    """CRC-32 of each ID's UTF-8 bytes: the first sort key of the canonical order ``(key, ext_id)``.

    A published checksum rather than polars' hash, which may change between polars versions: batch contents
    and IDs must not change when a dependency is upgraded between a run and its resume. Equal to
    ``zlib.crc32(ext_id.encode())`` (0 for a missing ID, as for an empty one), computed for all IDs at once
    (:class:`_CrcTables`): IDs of one byte length are one block of bytes, read a byte position at a time; IDs of
    mixed lengths are grouped by length first (one gather), which makes each length's IDs such a block.
    """
    n = len(ext_ids)
    if n == 0:
        return pl.Series(KEY, [], dtype=pl.UInt32)
    text = ext_ids.cast(pl.String)
    lengths = text.str.len_bytes().fill_null(0)
    shortest, longest = lengths.min(), lengths.max()
    assert isinstance(shortest, int) and isinstance(longest, int)
    if shortest == longest <= _LONG_ID:
        offsets, data = _utf8_buffers(text)
        return _uniform_crc(data, offsets[0], n, longest).alias(KEY)
    # The IDs grouped by length, ascending, so that each length's IDs are one block of the grouped IDs' bytes.
    # Empty IDs are left out: their CRC is 0.
    counts = [(length, count) for length, count in lengths.value_counts().sort(lengths.name).rows() if length]
    if not counts:
        return pl.repeat(0, n, dtype=pl.UInt32, eager=True).alias(KEY)
    if len(counts) == 1 and counts[0][0] <= _LONG_ID:
        # IDs of one length, and empty or missing ones: those filled up to that length make one block.
        length = counts[0][0]
        empty = pl.col("n") == 0
        lengths_and_ids = pl.DataFrame({"n": lengths, "t": text})
        filled = lengths_and_ids.select(pl.when(empty).then(pl.lit("\0" * length)).otherwise(pl.col("t")))
        offsets, data = _utf8_buffers(filled.to_series())
        block = _uniform_crc(data, offsets[0], n, length)
        return lengths_and_ids.select(
            pl.when(empty).then(0).otherwise(block).cast(pl.UInt32).alias(KEY)
        ).to_series()
    if len(counts) == 2:  # a pass per length costs less than a sort
        order = pl.concat([(lengths == length).arg_true() for length, _ in counts])
    else:
        order = lengths.arg_sort().slice(n - sum(count for _, count in counts))
    grouped = text.gather(order)
    offsets, data = _utf8_buffers(grouped)
    keys: list[pl.Series] = []
    first = 0
    for length, count in counts:
        if length > _LONG_ID:  # the longest come last: every ID from here on is long
            keys.append(
                pl.Series([zlib.crc32(x.encode()) for x in grouped.slice(first).to_list()], dtype=pl.UInt32)
            )
            break
        keys.append(_uniform_crc(data, offsets[first], count, length))
        first += count
    return pl.repeat(0, n, dtype=pl.UInt32, eager=True).scatter(order, pl.concat(keys)).alias(KEY)


def _utf8_buffers(text: pl.Series) -> tuple[pl.Series, pa.Buffer | None]:
    """The Arrow offsets (``len + 1`` of them, into the data) and the data buffer of a text column."""
    arrow = text.to_arrow()
    if isinstance(arrow, pa.ChunkedArray):
        arrow = arrow.combine_chunks()
    if arrow.type != pa.large_string():  # polars gives large strings; a cast imports pyarrow.compute (~80 ms)
        arrow = arrow.cast(pa.large_string())
    _validity, offsets, data = arrow.buffers()
    return _series(
        pa.Array.from_buffers(pa.int64(), len(arrow) + 1, [None, offsets], offset=arrow.offset)
    ), data


def _series(array: pa.Array) -> pl.Series:
    """``array`` as a polars Series, not copied. Through a record batch: ``pl.Series(array)`` imports
    pyarrow.compute (~80 ms, on the way to a run's first request) to check for dictionaries."""
    frame = pl.from_arrow(pa.RecordBatch.from_arrays([array], ["v"]))
    assert isinstance(frame, pl.DataFrame)
    return frame.to_series()


def _uniform_crc(data: pa.Buffer | None, start: int, n: int, length: int) -> pl.Series:
    """The CRC-32 of ``n`` IDs of ``length`` bytes each (at most :data:`_LONG_ID`), back to back in ``data`` from
    byte ``start``: byte ``i`` of every ID is every ``length``-th byte from ``i`` (a strided read); each adds
    its share, one gather from the table of its distance to the end. Two bytes at a time, where the length and
    the start are even (a 16-bit view of the bytes)."""
    if length == 0 or data is None:
        return pl.repeat(0, n, dtype=pl.UInt32, eager=True)
    distances, zeros = _TABLES.upto(length)
    # One query for the block: a Series method is a query of its own, whose overhead costs as much as its work
    # on a small block.
    if length % 2 == 0 and start % 2 == 0 and length <= _PAIRED:
        tables, step = _TABLES.paired(length), length // 2
        column = _series(pa.Array.from_buffers(pa.uint16(), n * step, [None, data], offset=start // 2))
    else:
        tables, step = distances, length
        column = _series(pa.Array.from_buffers(pa.uint8(), n * length, [None, data], offset=start))
    values = pl.col("v")
    shares = [
        pl.lit(tables[step - 1 - j]).gather(values.gather_every(step, j) if step > 1 else values)
        for j in range(step)
    ]
    crc = functools.reduce(operator.xor, shares)
    return pl.DataFrame({"v": column}).select((crc ^ zeros[length]).cast(pl.UInt32)).to_series()


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


# --- the validation query ----------------------------------------------------------------------------------------
#
# Each check's parser (sync/planning/_parsers.py) maps a column's text (``s``: trimmed, null values nulled) to its
# typed values (``p``) and to the reasons a value is refused. validate_chunk evaluates every parser of a chunk in
# one lazy query, in steps (trimmed texts, texts, values, then the typed columns and one "refused" flag per row),
# each step's columns computed once and read by name in the next. Two kinds of work wait until after that query,
# for the rows that need it only: the exact reading of texts a parser's fast form may not fit (a parser's
# fallback flags them in the query), and the messages, put together by the same parsers in a second query over
# the refused rows (most chunks have none; a message is a string per row and check where a flag is a bit). Most
# text columns are read untrimmed (a fast form takes only texts that are their own trimmed form; the others are
# read exactly, trimmed). Where a check has two exact forms, one quicker for some data (MSISDNs as they are, or
# with separators), a chunk's head chooses (a hint): the query is built once per choice.


@dataclass(frozen=True, slots=True)
class _Pending:
    """A check with a fallback: the rows to read again after the chunk's query (flagged in column ``rows``), or
    (the refused rows' query) every row, read before it into columns ``values`` and ``messages``."""

    column: str  # the input column
    values: str  # the query column of the check's values
    rows: str
    messages: str
    read: Callable[[pl.Series], tuple[pl.Series, pl.Series]]


class _Query:
    """The expressions of a validation query for chunks of one schema, step by step (see the section comment).

    Two kinds: ``messages=False`` (every row of a chunk) gives each row a flag, true where any check refuses it,
    and flags the rows to read again; ``messages=True`` (the refused rows) gives each check's message, reading
    every row with a fallback before the query. Built once per source and schema (:func:`_query`): expressions
    cost Python time, chunks only polars time.
    """

    __slots__ = (
        "flags",
        "gates",
        "held",
        "hints",
        "messages",
        "messages_step",
        "outputs",
        "pending",
        "positions",
        "reasons",
        "rejects_step",
        "rules",
        "schema",
        "source",
        "texts",
        "trimmed",
        "typed",
        "values",
    )

    def __init__(
        self,
        schema: pl.Schema,
        source: Source,
        rules: ValidationRules,
        *,
        messages: bool,
        held: frozenset[str] = frozenset(),
    ) -> None:
        self.schema = schema
        self.positions = {name: i for i, name in enumerate(schema)}
        self.source = source
        self.rules = rules
        self.messages = messages
        self.hints: dict[str, pl.Expr] = {}  # a check's choice of form -> whether a chunk's sample favours it
        self.gates: dict[str, pl.Expr] = {}  # a column's tidy form -> whether every text of a chunk allows it
        self.held = held  # the hints and gates that held for this query's chunks
        self.trimmed: dict[str, pl.Expr] = {}  # step 0: "__s<i>" -> a raw text column, trimmed
        self.texts: dict[str, pl.Expr] = {}  # step 1: "__t<i>" -> a raw column's text
        self.values: dict[str, pl.Expr] = {}  # step 2: "__p<i>" -> a check's typed values
        self.reasons: list[
            tuple[str, list[_Reason]]
        ] = []  # (input column, reasons) per check, in check order
        self.flags: list[pl.Expr] = []  # step 3: one holds wherever a reason does
        self.pending: list[
            tuple[_Pending, pl.Expr]
        ] = []  # checks with a fallback; step 3: the rows to read again
        self.typed = self._add_checks()  # the expression of each clean column but __file and __key
        # The clean column of each query column the typed columns are (a fallback's values are put there).
        self.outputs = {e.meta.output_name(): column for column, e in self.typed.items()}
        # The refused rows' query, after steps 1 and 2: messages, then the rejects columns (but "file").
        self.messages_step = self._messages_step() if messages else []
        self.rejects_step = self._rejects_step() if messages else []

    def text(self, column: str) -> pl.Expr:
        """The text of a raw column (one query column, however many checks read it)."""
        name = f"__t{self.positions[column]}"
        if name not in self.texts:
            if self.schema[column] == pl.String and self.rules.trim:
                # Trimmed in a step of its own, so that the null-value test and the mask read it computed once.
                self.trimmed[f"__s{self.positions[column]}"] = pl.col(column).str.strip_chars()
                self.texts[name] = _no_nulls(pl.col(f"__s{self.positions[column]}"), self.source)
            elif self.schema[column].is_float():
                # A float column is kept a float by the reading (so that a string mapping can refuse its NaN, which
                # a CSV file's text "nan" is not): its text, which is never padded.
                self.texts[name] = _no_nulls(float_text(pl.col(column)), self.source)
            else:
                self.texts[name] = _text(pl.col(column), self.schema[column], self.source, self.rules)
        return pl.col(name)

    def untrimmed(self, column: str, *, blanks_only: bool = False) -> pl.Expr:
        """The untrimmed text of a raw text column (:func:`_untrimmed_text`), for the parsers that read it; the
        text when there is nothing to trim (a typed column, or ``trim: false``)."""
        if self.schema[column] != pl.String or not self.rules.trim:
            return self.text(column)
        name = f"__{'b' if blanks_only else 'u'}{self.positions[column]}"
        if name not in self.texts:
            self.texts[name] = _untrimmed_text(pl.col(column), self.source, blanks_only=blanks_only)
        return pl.col(name)

    def check(self, column: str, parser: _Parser) -> pl.Expr:
        """Add a check of ``column``; returns the expression of its typed values (in the final step)."""
        name = f"__p{len(self.values)}"
        s, p = self.text(column) if parser.text is None else parser.text, pl.col(name)
        if parser.fallback is not None:
            k = len(self.pending)
            pending = _Pending(column, name, f"__f{k}", f"__m{k}", parser.fallback.read)
            self.pending.append((pending, parser.fallback.rows(s, p)))
            if self.messages:
                # The rows the fast form did not fit were read after the chunk's query: their messages come in a
                # column of the refused rows. Values are not needed here.
                message = pl.col(pending.messages)
                parser = _Parser(pl.lit(None), lambda s, p: [(message.is_not_null(), message)])
        self.values[name] = parser.values
        reasons = parser.reasons(s, p)
        self.flags += [condition for condition, _ in reasons]
        if self.schema[column] == pl.String:
            # A NUL character is binary junk (or a UTF-16 file read as UTF-8), never a value to send.
            nul = pl.col(column).cast(pl.Binary).bin.contains(b"\x00").fill_null(False)
            reasons = [(nul, _NUL), *reasons]
            if not parser.refuses_nul:
                self.flags.append(nul)
        self.reasons.append((column, reasons))
        return p

    def check_id(self) -> pl.Expr:
        """Add the external ID's check; returns its text."""
        column = self.source.ext_id
        if self.schema[column] == pl.String and self.rules.trim:
            # Read untrimmed: an ID with whitespace at an end, or one refused, is read exactly (trimmed) after the
            # query; every other is its own trimmed form. The refused rows' query reads them trimmed, as ever
            # (their messages are the exact reading's), and takes the IDs of the rejects from there.
            untrimmed = self.untrimmed(column)
            name = untrimmed.meta.output_name()
            k = len(self.pending)
            pending = _Pending(column, name, f"__f{k}", f"__m{k}", _ids(self.rules))
            tidy = self.tidy(column, "ids", tidy_ids(pl.col(column)))
            self.pending.append((pending, _id_read_again(untrimmed, self.rules, tidy=tidy)))
            if not self.messages:
                self.flags.append(untrimmed.is_null())
                return untrimmed
        ext = self.text(column)
        self.reasons.append((column, _id_reasons(ext, self.rules)))
        self.flags.append(_id_refused(ext, self.rules))
        return ext

    def nul_refused(self) -> bool:
        """Whether a parser that reads every text with a NUL exactly, and refuses it there, refuses every such
        text: unless a null value holds a NUL (a text that is one is no value, but the query's NUL test refuses
        it)."""
        return not any("\x00" in v for v in self.source.null_values)

    def list_values(self, column: str, delimiter: str) -> _Parser:
        if self.schema[column] == pl.String:
            tidy = self.tidy(column, f"lists-{delimiter}", tidy_lists(pl.col(column), delimiter))
            return _parse_list(self.untrimmed(column), delimiter, refuses_nul=self.nul_refused(), tidy=tidy)
        dtype = self.schema[column]
        floats = isinstance(dtype, pl.List) and dtype.inner is not None and dtype.inner.is_float()
        return _typed_list(self.text(column), floats=floats)

    def hint(self, name: str, favoured: pl.Expr) -> bool:
        """Whether a check takes the form ``name``, which a chunk's sample favours where ``favoured`` (an
        aggregate over a chunk's head) is true: both forms give the same, one sooner (:func:`validate_chunk`)."""
        if self.messages:
            return False
        self.hints[name] = favoured.alias(name)
        return name in self.held

    def tidy(self, column: str, form: str, gate: pl.Expr) -> bool:
        """Whether a text column's check takes its tidy ``form``: true where ``gate`` (an aggregate over a whole
        chunk, :func:`sync.planning._parsers.tidy_texts` and the like) finds no text the form would get wrong.
        Unlike a hint, the gate is exact — it reads every text of the chunk, before the query — so the tidy form
        flags nothing and reads nothing again. The refused rows' query takes the per-text form."""
        if self.messages:
            return False
        name = f"tidy:{form}:{column}"
        self.gates[name] = gate.alias(name)
        return name in self.held

    def fitted(
        self,
        column: str,
        exact: Callable[[pl.Expr], _Parser],
        fast_form: Callable[[pl.Expr], _Parser] | None = None,
    ) -> _Parser:
        """``exact``'s parser of ``column``, reading a text column untrimmed (:func:`_untrimmed`, with
        ``fast_form`` if any) where it would be trimmed."""
        if self.schema[column] == pl.String and self.rules.trim:
            # A form that refuses every null value but the empty text needs only that one nulled first (the
            # others are refused untrimmed, then read exactly): a length is cheaper than a membership test.
            form = fast_form or exact
            exact_null_values = _own_trimmed_null_values(self.source)
            others = [v for v in exact_null_values if v]
            if not _refuses(form, others):
                return _untrimmed(exact, self.untrimmed(column), fast_form=fast_form)
            if "" in exact_null_values and _empty_is_null(form):
                # Nor is the empty text nulled first, where the form gives it no value anyway: only not read
                # again (a length), where nulling it is a text column to build.
                return _untrimmed(exact, pl.col(column), blanks=True, fast_form=fast_form)
            return _untrimmed(exact, self.untrimmed(column, blanks_only=True), fast_form=fast_form)
        return exact(self.text(column))

    def parse(self, column: str, mapping: AttributeMapping) -> _Parser:
        dtype = self.schema[column]
        if isinstance(dtype, pl.List) and mapping.type is not ValueType.LIST:
            return _Parser(
                pl.lit(None, _DTYPE[mapping.type]),
                lambda s, p: [(s.is_not_null(), "a list where a single value is expected")],
            )
        if mapping.type is ValueType.BOOLEAN:
            return self.fitted(column, _parse_bool)
        if mapping.type is ValueType.NUMBER:
            return self.fitted(column, _parse_number, _fast_number)
        if mapping.type is ValueType.LIST:
            return self.list_values(column, mapping.delimiter)
        if mapping.type is ValueType.DATE:
            if dtype == pl.Date or isinstance(dtype, pl.Datetime):
                return _typed_date(self.text(column), dtype, self.rules.timezone)
            nul = self.nul_refused()
            if dtype == pl.String and self.rules.trim:
                untrimmed = self.untrimmed(column)
                return _parse_date(untrimmed, self.rules.timezone, untrimmed=True, refuses_nul=nul)
            return _parse_date(self.text(column), self.rules.timezone, refuses_nul=nul)
        if dtype.is_float():
            return _typed_text(self.text(column))
        if dtype == pl.String and self.rules.trim:
            tidy = self.tidy(column, "texts", tidy_texts(pl.col(column)))
            return _plain_texts(self.untrimmed(column), refuses_nul=self.nul_refused(), tidy=tidy)
        return _Parser(self.text(column).cast(pl.String), lambda s, p: [])

    def _add_checks(self) -> dict[str, pl.Expr]:
        source = self.source
        typed: dict[str, pl.Expr] = {EXT_ID: self.check_id(), ROW: pl.col(ROW)}
        if source.kind is SourceKind.TAGS:
            assert source.tag is not None
            typed[TAG] = self.check(source.tag, _required(self.text(source.tag), "missing tag"))
            typed[ACTION] = (
                self.check(source.action, _parse_action(self.text(source.action)))
                if source.action
                else pl.lit(True)
            )
        if source.kind is SourceKind.EVENTS:
            assert source.event is not None
            typed[EVENT] = self.check(source.event, _required(self.text(source.event), "missing event name"))
        # A name checked twice (an attribute that is also the email column) takes the last check's values.
        for a in source.attributes:
            typed[a.column] = self.check(a.column, self.parse(a.column, a))
        for t in source.tags:
            typed[t.column] = self.check(t.column, self.list_values(t.column, t.delimiter))
        for c in source.opt_ins.columns():
            typed[c] = self.check(c, self.fitted(c, _parse_bool))
        if source.email:
            typed[source.email] = self.check(source.email, self.fitted(source.email, _parse_email))
        if source.msisdn:
            if _msisdn_untrimmed(source.null_values):
                # Where most texts are MSISDNs as they are (no separators), the plain form takes them as they are
                # (a form for texts read untrimmed: a text column, trimmed).
                untrimmed = self.schema[source.msisdn] == pl.String and self.rules.trim
                plain = untrimmed and self.hint("plain-msisdn", _mostly(pl.col(source.msisdn), _MSISDN))
                msisdn = self.fitted(source.msisdn, _parse_msisdn, _plain_msisdn if plain else None)
            else:
                msisdn = _parse_msisdn(self.text(source.msisdn))
            typed[source.msisdn] = self.check(source.msisdn, msisdn)
        return typed

    def lazy(self, raw: pl.DataFrame) -> pl.LazyFrame:
        """Steps 1 and 2 (texts, values) over a chunk; step 3 selects from this."""
        return raw.lazy().with_columns(**self.trimmed).with_columns(**self.texts).with_columns(**self.values)

    def _messages_step(self) -> list[pl.Expr]:
        """Step 3 of the refused rows' query: the external ID, the row (a tags source's tag too: a refused row
        holds the earlier rows of its ID and tag, :func:`resolve_duplicates`) and each check's message."""
        return [
            self.typed[EXT_ID].cast(pl.String).alias(EXT_ID),
            pl.col(ROW),
            *([self.typed[TAG].cast(pl.String).alias(TAG)] if TAG in self.typed else []),
            *(_message(reasons).alias(f"__e{i}") for i, (_, reasons) in enumerate(self.reasons)),
        ]

    def _rejects_step(self) -> list[pl.Expr]:
        """After :meth:`_messages_step`: the rejects columns but ``file``."""
        failed = [(pl.col(f"__e{i}"), column) for i, (column, _) in enumerate(self.reasons)]
        return [
            pl.col(ROW).cast(pl.Int64).alias("row"),
            pl.coalesce([pl.when(e.is_not_null()).then(pl.lit(c)) for e, c in failed]).alias("column"),
            pl.when(pl.sum_horizontal(e.is_not_null() for e, _ in failed) > 1)
            .then(
                pl.concat_str(
                    [pl.when(e.is_not_null()).then(pl.lit(f"{c}: ") + e) for e, c in failed],
                    separator="; ",
                    ignore_nulls=True,
                )
            )
            .otherwise(pl.coalesce(e for e, _ in failed))
            .alias("reason"),
            pl.col(EXT_ID).alias("ext_id"),
            *([pl.col(TAG)] if TAG in self.typed else []),
        ]


_QUERIES: dict[tuple[int, int, tuple[tuple[str, Any], ...], bool, frozenset[str]], _Query] = {}
"""Recent queries, by source, rules, schema, kind and hints held (the objects are held, so their ids stay
theirs)."""
_QUERIES_LOCK = threading.Lock()  # plans of two jobs may be staged in two threads of one process


def _query(
    raw: pl.DataFrame,
    source: Source,
    rules: ValidationRules,
    *,
    messages: bool,
    held: frozenset[str] = frozenset(),
) -> _Query:
    """The validation query for ``raw``'s schema (and the hints ``held``): built once for the chunks of a file
    (or of a few sources)."""
    key = (id(source), id(rules), tuple(raw.schema.items()), messages, held)
    with _QUERIES_LOCK:
        query = _QUERIES.get(key)
        if query is None:
            query = _Query(raw.schema, source, rules, messages=messages, held=held)
            while len(_QUERIES) >= 16:
                _QUERIES.pop(next(iter(_QUERIES)))
            _QUERIES[key] = query
        return query


_REFUSED = "__refused"
_SAMPLE = 256
"""Rows: a chunk's head, whose texts choose between a check's forms (:meth:`_Query.hint`)."""


def _chunk_query(raw: pl.DataFrame, source: Source, rules: ValidationRules) -> _Query:
    """The validation query for the chunk ``raw``, with the forms its head favours (:meth:`_Query.hint`) and the
    tidy forms its texts allow (:meth:`_Query.tidy`): every form gives the same values and rejects, the chosen
    one sooner."""
    q = _query(raw, source, rules, messages=False)
    held: frozenset[str] = frozenset()
    if q.hints:
        sample = raw.head(_SAMPLE).select(*q.hints.values()).row(0, named=True)
        held = frozenset(name for name, favoured in sample.items() if favoured)
    if q.gates:
        # Over the whole chunk: a gate that holds lets a column's check skip its per-text search.
        gates = raw.select(*q.gates.values()).row(0, named=True)
        held |= frozenset(name for name, tidy in gates.items() if tidy)
    if held:
        q = _query(raw, source, rules, messages=False, held=held)
    return q


def validate_chunk(
    raw: pl.DataFrame, source: Source, rules: ValidationRules, file_index: int, file_name: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Type and check one chunk. Returns ``(clean, rejects)``: the rows that passed, typed as
    :func:`clean_schema` says (minus ``__key``), and one rejects row per failed input row (first failing column;
    the reason lists every problem of the row; a tags source's rejects carry the row's tag as ``__tag`` too, null
    when missing, for :func:`rejected_ids`).

    One lazy query types every column and flags the refused rows; the texts its fast forms may not fit are read
    again afterwards, and the reasons are put together for the refused rows only (:func:`_rejects`).
    """
    q = _chunk_query(raw, source, rules)
    schema = {k: v for k, v in clean_schema(source).items() if k != KEY}
    typed = q.typed | {FILE: pl.lit(file_index)}
    frame = (
        q.lazy(raw)
        .select(
            *(typed[k].cast(v).alias(k) for k, v in schema.items()),
            # No flag at all where every check reads again what it refuses (an ID and numbers, say).
            (pl.any_horizontal(q.flags).fill_null(False) if q.flags else pl.lit(False)).alias(_REFUSED),
            *(rows.alias(pending.rows) for pending, rows in q.pending),
        )
        .collect()
    )
    found: dict[str, pl.Series] = {}
    if q.pending:
        frame, found = _read_again(frame, raw, q)
    bad = frame[_REFUSED]
    if not bad.any():
        return frame.select(list(schema)), pl.DataFrame(schema=REJECTS_SCHEMA)
    refused = raw.filter(bad)
    if q.pending:
        refused = refused.with_columns(
            found[p.messages].filter(bad)
            if p.messages in found
            else pl.lit(None, pl.String).alias(p.messages)
            for p, _ in q.pending
        )
    return frame.filter(~bad).select(list(schema)), _rejects(refused, source, rules, file_name)


def _read_again(
    frame: pl.DataFrame, raw: pl.DataFrame, q: _Query
) -> tuple[pl.DataFrame, dict[str, pl.Series]]:
    """``frame`` with the rows each fallback flagged read exactly: their values put in place (where the check's
    values are a clean column), the rows with a message flagged as refused; and those messages, per fallback
    with any, as a column of ``frame``'s length."""
    # Which fallbacks flagged any row, in one query: most flag none, and an eager call is a query of its own,
    # whose overhead is most of the work on a chunk's few flagged rows.
    flagged = frame.select(pl.col(p.rows for p, _ in q.pending).any()).row(0)
    refused = frame[_REFUSED]
    found: dict[str, pl.Series] = {}
    for (pending, _), any_flagged in zip(q.pending, flagged, strict=True):
        if not any_flagged:
            continue
        mask = pl.lit(frame[pending.rows])
        texts = raw.select(
            mask.arg_true().alias("rows"),
            _text(pl.col(pending.column).filter(mask), pl.String, q.source, q.rules).alias("text"),
        )
        rows = texts["rows"]
        values, messages = pending.read(texts["text"])
        if messages.null_count() < len(messages):
            refused = refused.scatter(rows.filter(messages.is_not_null()), True)
            found[pending.messages] = (
                pl.repeat(None, frame.height, dtype=pl.String, eager=True)
                .scatter(rows, messages)
                .alias(pending.messages)
            )
        column = q.outputs.get(pending.values)
        if column is not None:
            frame = frame.replace_column(frame.get_column_index(column), _put(frame[column], rows, values))
    return frame.replace_column(frame.get_column_index(_REFUSED), refused), found


def _rejects(raw: pl.DataFrame, source: Source, rules: ValidationRules, file_name: str) -> pl.DataFrame:
    """One rejects row per row of ``raw`` (rows a check refused, with the messages of their fallback readings):
    the first failing column, and the reason (every problem of the row, each named by its column, when there is
    more than one)."""
    q = _query(raw, source, rules, messages=True)
    rejects = (
        q.lazy(raw)
        .select(*q.messages_step)
        .select(pl.lit(file_name, pl.String).alias("file"), *q.rejects_step)
    )
    out = rejects.collect()
    # The flags and the messages come from the same reasons: a refused row without a message is a bug here.
    assert out["reason"].null_count() == 0, "a row was refused without a reason"
    return out


def rejected_schema(source: Source) -> dict[str, Any]:
    """Column names and types of a source's *rejected IDs* (:func:`rejected_ids`): where each rejected row that
    names an ID (and, for a tags source, a tag) was, keyed like a clean row."""
    schema: dict[str, Any] = {KEY: pl.UInt32, EXT_ID: pl.String, FILE: pl.Int32, ROW: pl.Int64}
    if source.kind is SourceKind.TAGS:
        schema[TAG] = pl.String
    return schema


def rejected_ids(
    source: Source,
    file_index: int,
    rejects: pl.DataFrame | None = None,
    *,
    refused: pl.DataFrame | None = None,
    malformed: Sequence[RejectedRow] = (),
) -> pl.DataFrame | None:
    """The rejected rows of one chunk that name an external ID, as :func:`rejected_schema` says but for ``__key``,
    for :func:`resolve_duplicates` (None when there are none, or for an events source, which is never
    deduplicated). The caller keys them (:func:`canonical_key`), the rows of many chunks at once: keying has a
    fixed cost of about a millisecond, more than the rest of a chunk's few rejected rows cost.

    ``rejects``: validation's (:func:`validate_chunk`: the ``ext_id`` column, and ``__tag`` for a tags source);
    ``refused``: clean rows a platform's check refused (``check_rows``), with their clean columns; ``malformed``:
    the reader's malformed CSV records, a one-line record naming the (trimmed) value in the ID column's place —
    the user a snapshot diff holds for it too (docs/sync.md), so it holds that user's earlier rows here (not in a
    tags source: it names no tag). A row whose ID (for a tags source: whose tag) is missing names nothing and is
    left out. A row whose ID was refused for what it holds is kept: it can never equal a valid row's ID (validity
    depends on the ID's text alone, read the same way for both), so it holds nothing, and leaving it in spares a
    test here."""
    if source.kind is SourceKind.EVENTS:
        return None
    schema = rejected_schema(source)
    if rejects is not None:
        named = pl.col("ext_id").is_not_null()
        if TAG in schema:
            named &= pl.col(TAG).is_not_null()
        frame = (
            rejects.lazy()
            .filter(named)
            .select(
                pl.col("ext_id").alias(EXT_ID),
                pl.lit(file_index, pl.Int32).alias(FILE),
                pl.col("row").cast(pl.Int64).alias(ROW),
                *([pl.col(TAG).cast(pl.String)] if TAG in schema else []),
            )
            .collect()
        )
    elif refused is not None:
        frame = refused.select(c for c in schema if c != KEY)
    elif TAG not in schema:
        # Python objects already (the reader's), and few: a malformed record is a broken line of the file.
        named_rows = [(r.ext_id, r.row) for r in malformed if r.ext_id is not None]
        frame = pl.DataFrame(
            {
                EXT_ID: [x for x, _ in named_rows],
                FILE: [file_index] * len(named_rows),
                ROW: [n for _, n in named_rows],
            },
            schema={c: t for c, t in schema.items() if c != KEY},
        )
    else:
        return None
    if frame.is_empty():
        return None
    return frame


def _value_columns(source: Source) -> list[str]:
    return [c for c in clean_schema(source) if c not in (KEY, EXT_ID, FILE, ROW)]


def resolve_duplicates(
    frame: pl.DataFrame,
    source: Source,
    files: Sequence[str],
    rejected: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Apply the duplicate rule to clean rows holding *every* row of their IDs, in the canonical order
    ``(__key, __ext_id, __file, __row)``.

    The newest row of an ID decides (files in path order, rows in file order). When it is valid it wins: an
    earlier row whose values differ from it is reported as rejected, naming the winning row; an earlier row with
    the same values is dropped silently. When it was rejected (``rejected``: :func:`rejected_ids` of the same IDs,
    any order) the ID is *held*: none of its rows is sent, each is reported as rejected naming the rejected row
    that holds it — the user's newest data could not be read, and an older row may say the opposite (a push
    opt-in the user has since withdrawn). A rejected row older than the newest valid one changes nothing.

    Events are never deduplicated. A tags source deduplicates, and holds, per (ID, tag): each row is a fact
    about one tag of a user, so a rejected row holds the earlier rows of its own tag only (one with no tag holds
    nothing, as a row with no ID). Returns ``(winners, rejects, identical_duplicates_dropped)``: the winners in
    the canonical order, the rejects in file and row order.
    """
    empty = pl.DataFrame(schema=REJECTS_SCHEMA)
    if source.kind is SourceKind.EVENTS or frame.is_empty():
        return frame, empty, 0
    tags = source.kind is SourceKind.TAGS
    key = [EXT_ID, TAG] if tags else [EXT_ID]
    held: pl.DataFrame | None = None
    if rejected is not None and rejected.height:
        frame, held = _hold(frame, rejected, key, source)
    winners, conflicts, dropped = _last_wins(frame, source, key, tags)
    found = [f for f in (held, conflicts) if f is not None and f.height]
    if not found:
        return winners, empty, dropped
    merged = found[0] if len(found) == 1 else pl.concat(found).sort([FILE, ROW])
    file_names = dict(enumerate(files))

    def name(column: str) -> pl.Expr:
        return pl.col(column).replace_strict(file_names, return_dtype=pl.String)

    later = pl.col("__by_file") != pl.col(FILE)
    rejects = merged.select(
        name(FILE).alias("file"),
        pl.col(ROW).alias("row"),
        pl.col("__column").alias("column"),
        # The message names the row that decided (the winner, or the rejected row holding the ID), by its row
        # number, and by its file too when that is another one.
        pl.concat_str(
            pl.col("__before"),
            pl.lit("row "),
            pl.col("__by_row").cast(pl.String),
            pl.when(later).then(pl.lit(" of ") + name("__by_file")).otherwise(pl.lit("")),
            pl.col("__after"),
        ).alias("reason"),
        pl.col(EXT_ID).alias("ext_id"),
    )
    return winners, rejects, dropped


_HELD = (
    "held back: the newest row of this external ID ({}) was rejected, so none of its rows is sent "
    "(the newest row decides)"
)
_HELD_TAG = (
    "held back: the newest row of this external ID and tag ({}) was rejected, so none of their rows is sent "
    "(the newest row decides)"
)
_SUPERSEDED = "duplicate external ID with conflicting values: superseded by {} (last row wins)"


def _parts(message: str) -> tuple[pl.Expr, pl.Expr]:
    """The text of ``message`` before and after its ``{}`` (where the deciding row is named), as literals."""
    before, after = message.split("{}")
    return pl.lit(before).alias("__before"), pl.lit(after).alias("__after")


def _position(file: str, row: str) -> pl.Expr:
    """A row's place in the read order (files in path order, rows in file order) as one integer."""
    return pl.col(file).cast(pl.Int64) * (1 << 40) + pl.col(row)


def _hold(
    frame: pl.DataFrame, rejected: pl.DataFrame, key: list[str], source: Source
) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """``frame`` without the rows of the IDs (IDs and tags) whose newest row was rejected, and those rows as
    rejects (with the file and row of the rejected row holding them; None when no ID is held).

    Only the rows of IDs a rejected row names are looked at (a hash look-up per row, then a join of those few),
    so a bucket pays for its rejected rows, not for its clean ones."""
    named = frame[EXT_ID].is_in(rejected[EXT_ID].implode())
    if not named.any():
        # The common case: a rejected row names an ID no valid row has (a user with one row).
        return frame, None
    newest = (
        rejected.lazy()
        .sort(_position(FILE, ROW))
        .unique(key, keep="last")
        .select(*key, pl.col(FILE).alias("__by_file"), pl.col(ROW).alias("__by_row"))
    )
    held = (
        frame.select(*key, FILE, ROW)
        .with_row_index("__i")
        .filter(named)
        .lazy()
        .join(newest, on=key, how="inner")
        # Held when the rejected row comes after every valid row of the ID (a rejected row and a valid one are
        # never the same row).
        .filter(_position("__by_file", "__by_row") > _position(FILE, ROW).max().over(key))
        .collect()
    )
    if held.is_empty():
        return frame, None
    keep = pl.repeat(True, frame.height, dtype=pl.Boolean, eager=True).scatter(held["__i"], False)
    rejects = held.sort([FILE, ROW]).select(
        pl.col(FILE),
        pl.col(ROW),
        pl.lit(source.ext_id, pl.String).alias("__column"),
        *_parts(_HELD_TAG if TAG in key else _HELD),
        pl.col(EXT_ID),
        pl.col("__by_file").cast(pl.Int32),
        pl.col("__by_row").cast(pl.Int64),
    )
    return frame.filter(keep), rejects


def _last_wins(
    frame: pl.DataFrame, source: Source, key: list[str], tags: bool
) -> tuple[pl.DataFrame, pl.DataFrame | None, int]:
    """The last row of each ID (ID and tag) of ``frame`` (in the canonical order) wins: ``(winners, conflicts,
    identical_dropped)``, the conflicts being the earlier rows whose values differ, as :func:`_hold`'s rejects
    (None when there are none)."""
    if frame.is_empty():
        return frame, None, 0
    # The rows of one ID (one ID and tag) next to each other, in file and row order: the canonical order does
    # that for an ID; a tag's rows of one ID are brought together by a stable sort on the tag.
    grouped = frame.sort([KEY, EXT_ID, TAG], maintain_order=True) if tags else frame
    last = pl.any_horizontal(pl.col(c).ne_missing(pl.col(c).shift(-1)) for c in key).fill_null(True)
    marked = grouped.with_columns(last.alias("__last"))
    if marked["__last"].all():
        return frame, None, 0
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
    rejects = conflicts.select(
        pl.col(FILE),
        pl.col(ROW),
        pl.coalesce(pl.col("__column"), pl.lit(source.ext_id)).alias("__column"),
        *_parts(_SUPERSEDED),
        pl.col(EXT_ID),
        pl.col(f"{FILE}__w").alias("__by_file"),
        pl.col(f"{ROW}__w").alias("__by_row"),
    )
    return winners, rejects, losers.height - conflicts.height
