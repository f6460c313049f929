"""Row validation (sync.planning.validation): the one-query fast path against the exact, per-row readings.

validate_chunk flags refused rows in one lazy query, reads plain dates and tidy lists in a fast form, reads the
other texts exactly afterwards (only those rows), and writes messages for the refused rows only. These tests hold
that to what a row gives on its own and to the exact readings, for arbitrary mixes of good and bad values.
"""

from __future__ import annotations

import json
import string
import sys
import zlib
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from sync.config import Job, Source, load_job
from sync.planning import _parsers, validation
from sync.planning.validation import REJECTS_SCHEMA, validate_chunk
from sync.sources.reading import ROW

JOB = """
name: t
workdir: work
destination:
  platform: netmera
  base_url: http://127.0.0.1:8080/rest/3.0/
  secret: {{env: NETMERA_API_KEY}}
validation: {{max_id_length: 12, timezone: {timezone}}}
sources:
  - name: users
    path: users.csv
    ext_id: id
    attributes:
      s: string
      n: number
      b: boolean
      d: date
      l: list
    tags: [{{column: t, delimiter: ","}}]
    opt_ins: {{push: p}}
    email: email
    msisdn: phone
  - {{name: changes, kind: tags, path: changes.csv, ext_id: id, tag: tag, action: action}}
"""
COLUMNS = ["id", "s", "n", "b", "d", "l", "t", "p", "email", "phone"]


def _job(directory: Path, timezone: str = "UTC") -> Job:
    path = directory / f"job-{timezone.replace('/', '-')}.yaml"
    path.write_text(JOB.format(timezone=timezone), encoding="utf-8")
    return load_job(path)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    return _job(tmp_path_factory.mktemp("validation"))


@pytest.fixture(scope="module")
def new_york(tmp_path_factory: pytest.TempPathFactory) -> Job:
    return _job(tmp_path_factory.mktemp("validation-tz"), "America/New_York")


def _raw(rows: list[dict[str, str | None]], columns: list[str]) -> pl.DataFrame:
    frame = pl.DataFrame(
        {c: [r.get(c) for r in rows] for c in columns}, schema=dict.fromkeys(columns, pl.String)
    )
    return frame.with_columns(pl.int_range(1, len(rows) + 1, dtype=pl.Int64).alias(ROW))


def _validate(job: Job, source: Source, raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    return validate_chunk(raw, source, job.validation, 0, "users.csv")


def _one_by_one(job: Job, source: Source, raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The reference: each row validated alone (a row's outcome depends on that row only)."""
    cleans, rejects = [], []
    for i in range(raw.height):
        clean, bad = _validate(job, source, raw.slice(i, 1))
        cleans.append(clean)
        rejects.append(bad)
    return pl.concat(cleans), pl.concat([pl.DataFrame(schema=REJECTS_SCHEMA), *rejects])


# Values that pass and values that do not, for each kind of column, and some text around them.
_WS = [" ", "\t", "\u00a0", "\u3000"]
IDS = ["u1", " u2 ", "U-3", "", "NULL", "a\tb", "a\u200bb", "x" * 13, "é", "a\x00b"]
STRINGS = ["Ann", " Lee ", "", "N/A", "x\x00y", "İstanbul", "a|b"]
NUMBERS = ["1", "-3.5", "1e3", " 2 ", "1x", "inf", "nan", "", ".5", "1,5", "1\x00"]
BOOLEANS = [
    "true",
    "TRUE",
    "yEs",
    "y",
    "0",
    "off",
    "On",
    "maybe",
    "2",
    " no ",
    "tru\u212a",
    "\u212aey",
    "t\x00",
]
DATES = [
    "2020-01-02",
    "1989-10-14",
    "2020-02-30",
    "14/10/1989",
    "2020-01-02 03:04",
    "2020-01-02T03:04:05",
    "2020-01-02T03:04:05.123Z",
    "2020-01-02T03:04+03:00",
    "2020-01-02 03:04:05z",
    "2020-1-2",
    "2020-01- 2",
    "2020-03-08T02:30",
    "2020-11-01T01:30",
    "2020-01-0\x00",
    "",
]
LISTS = [
    "a|b",
    "a | b",
    "a||b",
    "|a|",
    "  ",
    "a",
    '["x", 1, true, null]',
    "[1, {}]",
    "[oops",
    "[]",
    "a\u00a0|b",
    "x\x00",
]
TAGS = ["vip,new", "vip, new", "vip,,new", ",", "gold", '["a","b"]', "a\u3000,b"]
EMAILS = ["a@b.co", " a@b.co ", "a@b", "not-an-email", "x" * 250 + "@b.co", "a\x00@b.co", ""]
PHONES = [
    "+905312345601",
    "+90 (531) 234-56.01",
    "1234567",
    "+90531234560123456",
    "phone",
    "905312345601\x00",
]

_ALPHABET = st.sampled_from(
    [*string.ascii_letters[:6], *string.digits[:4], "-", ":", "T", "Z", "|", ",", *_WS]
)


def _values(samples: list[str]) -> st.SearchStrategy[str | None]:
    return st.one_of(st.sampled_from(samples), st.none(), st.text(_ALPHABET, max_size=12))


ROWS = st.lists(
    st.fixed_dictionaries(
        {
            "id": st.one_of(st.sampled_from(IDS), st.text(string.ascii_letters, min_size=1, max_size=6)),
            "s": _values(STRINGS),
            "n": _values(NUMBERS),
            "b": _values(BOOLEANS),
            "d": _values(DATES),
            "l": _values(LISTS),
            "t": _values(TAGS),
            "p": _values(BOOLEANS),
            "email": _values(EMAILS),
            "phone": _values(PHONES),
        }
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ROWS)
def test_a_chunk_gives_what_its_rows_give_one_by_one(job: Job, rows: list[dict[str, str | None]]) -> None:
    # A whole chunk goes through the fast path (one query; fast forms; exact readings of the rows they may not fit;
    # messages for the refused rows only), each row alone through the same code with nothing else around it.
    source = job.sources[0]
    raw = _raw(rows, COLUMNS)
    clean, rejects = _validate(job, source, raw)
    one_clean, one_rejects = _one_by_one(job, source, raw)
    assert_frame_equal(clean, one_clean)
    assert_frame_equal(rejects, one_rejects)
    assert clean.height + rejects.height == raw.height
    assert set(clean[ROW]).isdisjoint(rejects["row"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ROWS)
def test_the_same_in_a_time_zone_with_gaps_and_folds(
    new_york: Job, rows: list[dict[str, str | None]]
) -> None:
    source = new_york.sources[0]
    raw = _raw(rows, COLUMNS)
    clean, rejects = _validate(new_york, source, raw)
    one_clean, one_rejects = _one_by_one(new_york, source, raw)
    assert_frame_equal(clean, one_clean)
    assert_frame_equal(rejects, one_rejects)


_DATE_TEXT = st.one_of(
    st.sampled_from(DATES),
    st.text(st.sampled_from([*"0123456789", "-", ":", "T", " ", "z", "Z", "+", ".", "\u00a0"]), max_size=26),
    st.dates().map(str),
    st.datetimes().map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat(sep=" ", timespec="minutes") + "Z"),
)


@pytest.mark.parametrize("timezone", ["UTC", "America/New_York"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_DATE_TEXT, min_size=1, max_size=30))
def test_plain_dates_read_fast_are_what_every_form_reads(
    tmp_path_factory: pytest.TempPathFactory, timezone: str, texts: list[str]
) -> None:
    # The fast form reads ten-character texts with no space and no Z as dates; every other text is read with every
    # form afterwards. Together: exactly what the forms read in turn give, for any text.
    job = _job(tmp_path_factory.mktemp("dates"), timezone)
    source = job.sources[0]
    raw = _raw([{"id": f"u{i}", "d": t} for i, t in enumerate(texts)], COLUMNS)
    clean, rejects = _validate(job, source, raw)
    stripped = pl.Series([t.strip() or None for t in texts], dtype=pl.String)  # trimmed; "" is a null value
    values, messages = _parsers._date_times(timezone)(stripped)
    nul = ["\x00" in t for t in texts]
    expected_ok = [m is None and not z for m, z in zip(messages.to_list(), nul, strict=True)]
    assert clean[ROW].to_list() == [i + 1 for i, ok in enumerate(expected_ok) if ok]
    assert clean["d"].to_list() == [v for v, ok in zip(values.to_list(), expected_ok, strict=True) if ok]
    assert rejects["reason"].to_list() == [
        "contains a NUL character" if z else m
        for m, z, ok in zip(messages, nul, expected_ok, strict=True)
        if not ok
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(
        st.text(st.sampled_from(["a", "b", "|", ",", "[", "]", '"', *_WS, "\u2028"]), max_size=10),
        min_size=1,
        max_size=30,
    )
)
def test_tidy_lists_split_fast_are_what_the_exact_reading_gives(job: Job, texts: list[str]) -> None:
    # Lists without blank or empty items are only split; every other text (and a JSON array) is read exactly.
    source = job.sources[0]
    raw = _raw([{"id": f"u{i}", "l": t} for i, t in enumerate(texts)], COLUMNS)
    clean, rejects = _validate(job, source, raw)
    text = pl.Series([t.strip() for t in texts], dtype=pl.String)
    text = pl.select(
        pl.when(pl.lit(text).is_in(list(source.null_values))).then(None).otherwise(pl.lit(text))
    ).to_series()
    values, messages = _parsers._lists("|")(text)
    ok = messages.is_null().to_list()
    assert clean[ROW].to_list() == [i + 1 for i, good in enumerate(ok) if good]
    assert clean["l"].to_list() == [v for v, good in zip(values.to_list(), ok, strict=True) if good]
    assert rejects["reason"].to_list() == [m for m in messages.to_list() if m is not None]


def test_a_chunk_of_json_arrays_mixed_with_plain_lists(job: Job) -> None:
    source = job.sources[0]
    texts = ["a|b", '["x", 1, true, null, " y "]', " c | d ", "[1, {}]", "[]", "e"]
    raw = _raw([{"id": f"u{i}", "l": t} for i, t in enumerate(texts)], COLUMNS)
    clean, rejects = _validate(job, source, raw)
    assert clean["l"].to_list() == [["a", "b"], ["x", "1", "true", "y"], ["c", "d"], None, ["e"]]
    assert rejects.select("row", "column", "reason").rows() == [(4, "l", "not a list (invalid JSON array)")]


def test_dates_and_date_times_mixed_in_one_column(job: Job) -> None:
    source = job.sources[0]
    texts = ["2020-01-02", "2020-01-02T03:04:05Z", "2020-01-02 03:04", "2020-02-30", "2020-01-02T03:04+03:00"]
    raw = _raw([{"id": f"u{i}", "d": t} for i, t in enumerate(texts)], COLUMNS)
    clean, rejects = _validate(job, source, raw)
    assert clean["d"].to_list() == [1577923200000, 1577934245000, 1577934240000, 1577923440000]
    assert rejects.select("row", "column", "reason").rows() == [(4, "d", "not an ISO 8601 date or date-time")]


@pytest.mark.parametrize("column", ["n", "b", "d", "email", "phone", "p", "s", "l", "t"])
def test_a_nul_character_rejects_the_row_whatever_the_column(job: Job, column: str) -> None:
    # Where no value with a NUL could pass (a number, a boolean...) the query does not look for NULs: the refused
    # row's message does, and names it.
    source = job.sources[0]
    good = {"n": "1", "b": "true", "d": "2020-01-02", "email": "a@b.co", "phone": "+905312345601", "p": "yes"}
    good |= {"s": "Ann", "l": "a|b", "t": "x,y"}
    raw = _raw(
        [{"id": "u1", **good}, {"id": "u2", **good, column: good[column][:2] + "\x00" + good[column][2:]}],
        COLUMNS,
    )
    clean, rejects = _validate(job, source, raw)
    assert clean["__ext_id"].to_list() == ["u1"]
    assert rejects.select("row", "column", "reason").rows() == [(2, column, "contains a NUL character")]


def test_tag_actions_in_any_case(job: Job) -> None:
    source = job.sources[1]
    actions = ["tag", "UNTAG", "Add", "-", "+", None, "Remove", "maybe", "de\u212aete", "DELETE"]
    raw = _raw(
        [{"id": f"u{i}", "tag": "vip", "action": a} for i, a in enumerate(actions)], ["id", "tag", "action"]
    )
    clean, rejects = _validate(job, source, raw)
    assert clean["__action"].to_list() == [True, False, True, False, True, True, False, False]
    assert rejects.select("row", "reason").rows() == [
        (8, "not a tag action (tag/untag, add/remove, +/-)"),
        (9, "not a tag action (tag/untag, add/remove, +/-)"),
    ]


@pytest.mark.parametrize(
    "words", [_parsers._TRUE + _parsers._FALSE, _parsers._TAG_ACTIONS_ON + _parsers._TAG_ACTIONS_OFF]
)
def test_case_spellings_are_lowercasing(words: list[str]) -> None:
    # Matching every case spelling equals lower-casing first only if no character outside ASCII lower-cases to
    # ASCII letters of the words (the Kelvin sign lower-cases to "k", which no word has).
    letters = {c for w in words for c in w.lower() if c.isalpha()}
    for point in range(0x80, sys.maxunicode + 1):
        lowered = chr(point).lower()
        assert not (lowered.isascii() and set(lowered) & letters), hex(point)
    spellings = set(_parsers._spellings(words))
    assert {s.lower() for s in spellings} == set(words)
    assert len(spellings) == sum(2 ** sum(c.isalpha() for c in w) for w in words)


_FIXED = st.integers(0, 24).flatmap(
    lambda k: st.lists(
        st.one_of(
            st.text(st.sampled_from(string.printable), min_size=k, max_size=k),
            st.text(st.sampled_from("éßü"), min_size=k // 2, max_size=k // 2).map(
                lambda t: t + "x" * (k % 2)
            ),
        ).filter(lambda t: len(t.encode()) == k),
        min_size=1,
        max_size=40,
    )
)


@settings(max_examples=100, deadline=None)
@given(ids=_FIXED)
def test_the_canonical_key_of_ids_of_one_length_is_zlib_crc32(ids: list[str]) -> None:
    # IDs of one byte length (zero-padded numbers, UUIDs) are read as one block, a byte column at a time.
    series = pl.Series(ids, dtype=pl.String)
    assert validation.canonical_key(series).to_list() == [zlib.crc32(x.encode()) for x in ids]
    assert validation.canonical_key(series.slice(1)).to_list() == [zlib.crc32(x.encode()) for x in ids[1:]]


_ANY_IDS = st.lists(
    st.one_of(
        st.text(max_size=12),  # short, of mixed lengths: any character, the empty ID included
        st.text(min_size=14, max_size=44),  # UUID-sized, past the two-bytes-at-a-time limit when multi-byte
        st.text(min_size=200, max_size=400),  # past the tables' limit (256 bytes): keyed one by one
        st.none(),  # a missing ID keys as an empty one
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ids=_ANY_IDS, skip=st.integers(0, 3))
def test_the_canonical_key_is_zlib_crc32_for_any_ids(ids: list[str | None], skip: int) -> None:
    # Mixed lengths are grouped by length (one block each, two bytes at a time where the block allows it);
    # a slice starts the bytes mid-buffer.
    series = pl.Series(ids, dtype=pl.String).slice(skip)
    key = validation.canonical_key(series)
    assert key.dtype == pl.UInt32 and key.name == validation.KEY
    assert key.to_list() == [zlib.crc32((x or "").encode()) for x in ids[skip:]]


def test_the_canonical_key_of_a_million_ids_is_zlib_crc32() -> None:
    # Blocks long enough to take every path at scale: one length (two bytes at a time), one length and empty
    # IDs, odd lengths, many lengths.
    ids = [f"C{i:09d}" for i in range(400_000)]
    odd = [f"{i:07d}" for i in range(200_000)]
    many = [f"{'x' * (i % 40)}{i}@example.com" for i in range(200_000)]
    for sample in (ids, [*ids[:1000], "", *ids[1000:]], odd, many, [*many, None, *odd]):
        series = pl.Series(sample, dtype=pl.String)
        assert validation.canonical_key(series).to_list() == [zlib.crc32((x or "").encode()) for x in sample]


# Every character trimming removes (Unicode White_Space, as polars' strip_chars() sees it), and some it keeps that
# look like it (Python's str.strip() removes the separators \x1c-\x1f; zero-width space, BOM, NUL).
_TRIMMED = [
    *"\t\n\x0b\x0c\r \x85\xa0\u1680",
    *map(chr, range(0x2000, 0x200B)),
    *"\u2028\u2029\u202f\u205f\u3000",
]
_KEPT = ["\x1c", "\x1f", "\u200b", "\ufeff", "\x00", "\u00b7"]
_EDGE = st.text(st.sampled_from([*_TRIMMED, *_KEPT]), max_size=3)
_CORES = [
    *BOOLEANS,
    *NUMBERS,
    *EMAILS,
    "1.5e-3",
    "-0",
    *LISTS,
    *TAGS,
    "NULL",
    "NaN",
    " NaN",
    "\\N",
    "NA",
    " NA ",
    "N/A",
    "N/A\t",
    "-",
    "\u00a0-",
    " 00000000",
    "+90 (531) 234-56.01 ",
    "",
    "Ko\u00e7",
    "Bar\u0131\u015f",
]
_UNTRIMMED = st.one_of(
    st.sampled_from(_CORES),
    st.builds(lambda a, core, b: a + core + b, _EDGE, st.sampled_from(_CORES), _EDGE),
    st.text(st.sampled_from([*_TRIMMED[:8], *_KEPT, "a", "y", "|", ",", "[", "]", '"', "1"]), max_size=8),
    st.text(max_size=6),
    st.none(),
)


def test_the_characters_trimming_removes_are_unicode_white_space() -> None:
    # The strategies above name them: polars' strip_chars() with no argument, on every code point.
    points = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    stripped = pl.Series([p + "x" + p for p in points]).str.strip_chars()
    assert [p for p, s in zip(points, stripped.to_list(), strict=True) if s == "x"] == _TRIMMED


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.fixed_dictionaries({c: _UNTRIMMED for c in ("b", "n", "l", "t", "p", "email", "phone")}),
        min_size=1,
        max_size=25,
    ),
    null_values=st.sampled_from(
        [None, ["", "NULL", " NA ", "\u00a0-", "N/A\t"], [], ["-", " +90 (531) 234-56.01"], ["00000000"]]
    ),
)
def test_columns_read_untrimmed_give_what_their_trimmed_texts_give(
    tmp_path_factory: pytest.TempPathFactory,
    rows: list[dict[str, str | None]],
    null_values: list[str] | None,
) -> None:
    # Booleans, numbers, email addresses, MSISDNs and lists are read untrimmed: their fast forms take only texts that
    # read the same trimmed (and are no null value then), and flag every other text for the exact reading. The reference is the chunk with every text trimmed first (the
    # old form: trim, then read), whatever the text, the whitespace at its ends and the null values.
    _assert_untrimmed_reads_as_trimmed(tmp_path_factory.mktemp("untrimmed"), rows, null_values)


@pytest.mark.parametrize(
    ("null_values", "text"),
    [
        (["00000000"], " 00000000"),  # a number once trimmed, and a null value: no value, not an MSISDN
        (["-", " +90 (531) 234-56.01"], "+90 (531) 234-56.01 "),
        ([" NA "], " NA "),  # a null value with whitespace is never met once trimmed
        (["NA"], "\u3000NA\t"),
        (["yes"], " yes"),
        (["1"], "1\u2028"),
        (None, "\tNaN"),
        (None, "NULL\u3000"),
        (["", "NaN", "a@b.co"], "a@b.co "),
    ],
)
def test_null_values_read_untrimmed_are_what_they_are_trimmed(
    tmp_path: Path, null_values: list[str] | None, text: str
) -> None:
    rows: list[dict[str, str | None]] = [
        {c: text for c in ("b", "n", "l", "t", "p", "email", "phone")},
        {c: text.strip() for c in ("b", "n", "l", "t", "p", "email", "phone")},
    ]
    _assert_untrimmed_reads_as_trimmed(tmp_path, rows, null_values)


def _assert_untrimmed_reads_as_trimmed(
    directory: Path, rows: list[dict[str, str | None]], null_values: list[str] | None
) -> None:
    path = directory / "job.yaml"
    extra = "" if null_values is None else f"\n    null_values: {json.dumps(null_values)}"
    path.write_text(
        JOB.format(timezone="UTC").replace("ext_id: id\n", f"ext_id: id{extra}\n", 1), encoding="utf-8"
    )
    job = load_job(path)
    source = job.sources[0]
    raw = _raw([{"id": f"u{i}", **row} for i, row in enumerate(rows)], COLUMNS)
    trimmed = raw.with_columns(pl.col(c).str.strip_chars() for c in COLUMNS)
    clean, rejects = _validate(job, source, raw)
    ref_clean, ref_rejects = _validate(job, source, trimmed)
    assert_frame_equal(clean, ref_clean)
    assert_frame_equal(rejects, ref_rejects)
    assert clean.height + rejects.height == raw.height


def test_the_parsers_probes_are_answered_once_per_question(monkeypatch: pytest.MonkeyPatch) -> None:
    # Building a source's validation query asks each column's parser the same questions (does it refuse these null
    # values? does it read the empty text as none?), for every column of a kind and every query built: answered
    # by small polars queries, ~0.08 CPU-s on the way to a run's first request when asked again each time.
    texts = ["none", "n/a", "-"]
    first = (
        _parsers._refuses(_parsers._parse_number, texts),
        _parsers._empty_is_null(_parsers._parse_number),
        _parsers._msisdn_untrimmed(texts),
    )

    class NoQueries:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("a probe ran a polars query again")

    monkeypatch.setattr(_parsers.pl, "DataFrame", NoQueries)
    monkeypatch.setattr(_parsers.pl, "Series", NoQueries)
    assert (
        _parsers._refuses(_parsers._parse_number, list(texts)),
        _parsers._empty_is_null(_parsers._parse_number),
        _parsers._msisdn_untrimmed(tuple(texts)),
    ) == first
    assert first == (True, True, True)


def test_a_date_that_cannot_be_sent_says_why(new_york: Job) -> None:
    # A local time in a daylight-saving gap, second 60 and year 0000 are refused with their own reason: polars
    # reads the last two (as the next minute, and as 1 BC), and the first read as "not an ISO 8601 date".
    source = new_york.sources[0]
    texts = [
        "2021-03-14T02:30:00",  # New York's clocks went from 02:00 to 03:00
        "2021-03-14 02:30",
        "2020-01-01T10:00:60",
        "2016-12-31T23:59:60Z",  # a real leap second: epoch milliseconds still have none
        "0000-01-01",
        "0000-06-15T10:00:00Z",
        "0001-01-01",  # the first year: sent
        "2021-03-14T03:30:00",
        "2020-01-01T10:00:59",
    ]
    raw = _raw([{"id": f"u{i}", "d": t} for i, t in enumerate(texts)], COLUMNS)
    clean, rejects = _validate(new_york, source, raw)
    gap = "this local time does not exist in time zone America/New_York (the clocks skip it"
    leap = "second 60 (a leap second): epoch milliseconds have none"
    zero = "year 0000: no calendar year"
    expected = [gap, gap, leap, leap, zero, zero]
    assert rejects["row"].to_list() == list(range(1, 7))
    assert set(rejects["column"]) == {"d"}
    for reason, start in zip(rejects["reason"].to_list(), expected, strict=True):
        assert reason.startswith(start), reason
    # New York kept local mean time (UTC-4:56:02) before 1883.
    assert clean["d"].to_list() == [-62135579038000, 1615707000000, 1577890859000]


def test_a_typed_date_before_year_one_is_refused_as_its_text_is(tmp_path: Path) -> None:
    # A Parquet date32 (and a timestamp) holds year 0 and negative years; passed through typed, year 0000 went out
    # as 1 BC while the same date written as text was refused. Refused alike now: file, row, column, the text's
    # reason; the valid dates beside them are sent.
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sync.planning.planning import build_plan

    epoch = dt.date(1970, 1, 1)
    year_zero = -719_528 + 59  # days from 1970-01-01 to 0000-03-01 (proleptic Gregorian)
    before = -719_528 - 365  # 0001-01-01 BC minus a year: year -1
    days = [(dt.date(1990, 5, 6) - epoch).days, year_zero, (dt.date(1, 1, 1) - epoch).days, before, None]
    ms = [d * 86_400_000 + 36_000_000 if d is not None else None for d in days]  # 10:00 on those days
    table = pa.table(
        {
            "id": [f"u{i}" for i in range(5)],
            "born": pa.array(days, pa.date32()),
            "seen": pa.array([ms[0], ms[2], ms[1], ms[2], None], pa.timestamp("ms", tz="UTC")),
        }
    )
    data = tmp_path / "typed.parquet"
    pq.write_table(table, data)
    job_file = tmp_path / "typed.yaml"
    job_file.write_text(
        "name: typed\nworkdir: work\n"
        'destination: {platform: netmera, base_url: "http://127.0.0.1:8080/rest/3.0/", secret: {env: K}}\n'
        "sources:\n  - name: users\n    path: typed.parquet\n    ext_id: id\n"
        "    attributes: {born: date, seen: date}\n",
        encoding="utf-8",
    )
    with build_plan(load_job(job_file)) as plan:
        rejects = [(Path(r.path).name, r.row, r.column, r.reason) for r in plan.rejected_rows()]
        clean = plan.summary().rows_clean
    zero = "year 0000: no calendar year (ISO 8601 allows it only by agreement; a placeholder for an unknown date?)"
    bc = "a year before 0001 (BC): no date a platform reads as meant (a placeholder for an unknown date?)"
    assert zero == _parsers._YEAR_ZERO  # the text path's own words
    assert sorted(rejects) == [
        ("typed.parquet", 2, "born", zero),
        ("typed.parquet", 3, "seen", zero),
        ("typed.parquet", 4, "born", bc),
    ]
    assert clean == 2  # 1990-05-06 and 0001-01-01 (the first year) are sent; a null date sends nothing


def test_a_typed_date_past_9999_or_out_of_any_calendar_is_refused(tmp_path: Path) -> None:
    # A date32 or timestamp column may hold a year past 9999 (a "never" placeholder such as 10000-01-01) or a
    # value no calendar year can be read from (polars' dt.year() gives null for it: -1e9 days, 2**62 ms). Both were
    # sent as epoch milliseconds — 4611686018427387904, past 2**53 — and the year checks, reading null, let them
    # pass. Refused with file, row and column; 9999-12-31 itself, the last day a text date can name, is sent.
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sync.planning.planning import build_plan

    last = (dt.date(9999, 12, 31) - dt.date(1970, 1, 1)).days
    days = [last, last + 1, -1_000_000_000, 5000]
    table = pa.table(
        {
            "id": ["u0", "u1", "u2", "u3"],
            "born": pa.array(days, pa.date32()),
            "seen": pa.array([0, 0, 0, 2**62], pa.int64()).cast(pa.timestamp("ms")),
        }
    )
    pq.write_table(table, tmp_path / "far.parquet")
    job_file = tmp_path / "far.yaml"
    job_file.write_text(
        "name: far\nworkdir: work\n"
        'destination: {platform: netmera, base_url: "http://127.0.0.1:8080/rest/3.0/", secret: {env: K}}\n'
        "sources:\n  - name: users\n    path: far.parquet\n    ext_id: id\n"
        "    attributes: {born: date, seen: date}\n",
        encoding="utf-8",
    )
    with build_plan(load_job(job_file)) as plan:
        rejects = sorted((r.row, r.column, r.reason) for r in plan.rejected_rows())
        clean = plan.summary().rows_clean
    far = _parsers._OUT_OF_RANGE
    assert rejects == [(2, "born", far), (3, "born", far), (4, "seen", far)]
    assert clean == 1  # 9999-12-31 and the epoch


def test_a_text_date_with_a_signed_year_before_one_is_refused(job: Job) -> None:
    # chrono's %Y reads "-0001": a negative year went out as 2 BC, where year 0000 was refused.
    raw = _raw(
        [
            {"id": f"u{i}", "d": t}
            for i, t in enumerate(["-001-01-01", "-0001-06-01 10:00", "+0001-01-01T00:00:00"])
        ],
        COLUMNS,
    )
    clean, rejects = _validate(job, job.sources[0], raw)
    assert rejects["row"].to_list() == [1, 2]
    assert set(rejects["reason"]) == {_parsers._BEFORE_YEAR_ONE}
    assert clean["d"].to_list() == [-62135596800000]


def test_a_plain_date_at_a_midnight_the_zone_skips(tmp_path: Path) -> None:
    # São Paulo's clocks went from 00:00 to 01:00 on 2018-11-04: that day has no midnight there.
    job = _job(tmp_path, "America/Sao_Paulo")
    raw = _raw([{"id": "u1", "d": "2018-11-04"}, {"id": "u2", "d": "2018-11-05"}], COLUMNS)
    clean, rejects = _validate(job, job.sources[0], raw)
    assert clean["__ext_id"].to_list() == ["u2"]
    assert rejects["reason"].to_list() == [
        "this local time does not exist in time zone America/Sao_Paulo (the clocks skip it: daylight saving time)"
    ]


def test_a_number_that_would_be_sent_wrong_is_refused(job: Job) -> None:
    # 1e-400 underflows to 0 and 9007199254740993 reads as ...992 in a float64: refused, never sent changed. A
    # zero written as a zero, and integers a float64 holds exactly, are sent.
    source = job.sources[0]
    texts = ["1e-400", "-0.5e-400", "9007199254740993", "+9007199254740993", "-9007199254740995"]
    texts += ["123456789012345678901234567890", "0", "0.000", "-0", "0e10", "1e-310", "9007199254740992"]
    texts += ["9007199254740994", "1e20", "100000000000000000000", " 12 "]
    raw = _raw([{"id": f"u{i}", "n": t} for i, t in enumerate(texts)], COLUMNS)
    clean, rejects = _validate(job, source, raw)
    small = "too small to represent: it would be sent as 0"
    lossy = "an integer past 2^53 loses precision as a number (it would be sent rounded)"
    assert rejects["row"].to_list() == [1, 2, 3, 4, 5, 6]
    for reason, start in zip(
        rejects["reason"].to_list(), [small, small, lossy, lossy, lossy, lossy], strict=True
    ):
        assert reason.startswith(start), reason
    assert clean["n"].to_list() == [0, 0, 0, 0, 1e-310, 2**53, 2**53 + 2, 1e20, 1e20, 12]


def test_a_decimal_past_2_53_is_refused_not_rounded(job: Job) -> None:
    # A numeric(38, 2) amount past 2^53 was sent as the float64 nearest it: its cents, or its last digits, lost.
    # A fraction of zeros on an integer a float64 holds, and decimals below 2^53, are sent.
    source = job.sources[0]
    texts = ["123456789012345678.90", "9007199254740994.5", "-9007199254740993.0", "1" * 40 + ".5"]
    texts += ["100000000000000000000.00", "9007199254740992.000", "12345.678901234567890", "-0.5"]
    raw = _raw([{"id": f"u{i}", "n": t} for i, t in enumerate(texts)], COLUMNS)
    clean, rejects = _validate(job, source, raw)
    assert rejects["row"].to_list() == [1, 2, 3, 4]
    assert all(r.startswith("a decimal past 2^53 loses precision") for r in rejects["reason"].to_list())
    assert clean["n"].to_list() == [1e20, 2**53, 12345.678901234567890, -0.5]
