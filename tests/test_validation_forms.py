"""Validation's cheaper forms (sync.planning._parsers) against what the exact readings give.

Dates read untrimmed, dates and lists finding NULs in their fast forms' scans, MSISDNs in a plain form chosen by a
chunk's head, booleans and numbers reading empty texts as they are: each must give the values, rejects and messages
the exact reading of the trimmed text gives, for any text, whitespace at its ends, NULs and null values.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from sync.config import Job, Source, load_job
from sync.planning import _parsers, validation
from sync.planning.validation import validate_chunk
from sync.sources.reading import ROW

JOB = """
name: t
workdir: work
destination:
  platform: netmera
  base_url: http://127.0.0.1:8080/rest/3.0/
  secret: {{env: NETMERA_API_KEY}}
validation: {{timezone: {timezone}}}
sources:
  - name: users
    path: users.csv
    ext_id: id{null_values}
    attributes:
      n: number
      b: boolean
      d: date
      l: list
    opt_ins: {{push: p}}
    msisdn: phone
"""
COLUMNS = ["id", "n", "b", "d", "l", "p", "phone"]


def _job(directory: Path, null_values: list[str] | None = None, timezone: str = "UTC") -> Job:
    extra = "" if null_values is None else f"\n    null_values: {json.dumps(null_values)}"
    path = directory / "job.yaml"
    path.write_text(JOB.format(timezone=timezone, null_values=extra), encoding="utf-8")
    return load_job(path)


def _raw(rows: list[dict[str, str | None]]) -> pl.DataFrame:
    frame = pl.DataFrame(
        {c: [r.get(c) for r in rows] for c in COLUMNS}, schema=dict.fromkeys(COLUMNS, pl.String)
    )
    return frame.with_columns(pl.int_range(1, len(rows) + 1, dtype=pl.Int64).alias(ROW))


def _validate(job: Job, raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    return validate_chunk(raw, job.sources[0], job.validation, 0, "users.csv")


def _trimmed(texts: list[str | None], source: Source) -> pl.Series:
    """The reference's text: trimmed as polars trims, null values nulled."""
    text = pl.Series(texts, dtype=pl.String).str.strip_chars()
    return pl.select(
        pl.when(pl.lit(text).is_in(list(source.null_values))).then(None).otherwise(pl.lit(text))
    ).to_series()


def test_the_white_space_list_is_what_trimming_removes() -> None:
    # A plain date read untrimmed holds none of these: every code point, through polars' strip_chars().
    points = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    stripped = pl.Series([p + "x" + p for p in points]).str.strip_chars()
    assert [p for p, s in zip(points, stripped.to_list(), strict=True) if s == "x"] == _parsers._WHITE_SPACE


_EDGES = st.text(st.sampled_from([*_parsers._WHITE_SPACE, "\x00", "\u200b", "\x1c", "z"]), max_size=2)
_DATE_CORES = st.one_of(
    st.sampled_from(
        [
            "2020-01-02",
            "2020-1-02",
            "2020-01-2",
            "2020-01- 2",
            "2020-01-\t2",
            "2020-01-\u00a02",
            "2020-1-\u00a01",
            "2020-02-30",
            "2020-01-02T03:04",
            "2020-01-02 03:04:05Z",
            "2020-01-02T03:04:05.5+03:00",
            "2020-01-0\x00",
            "2020-01-02\x00",
            "NULL",
            "",
        ]
    ),
    st.dates().map(str),
    st.text(st.sampled_from([*"0123456789-:T Zz+.", "\t", "\u3000", "\x00"]), max_size=20),
)
_DATES = st.one_of(st.none(), st.builds(lambda a, core, b: a + core + b, _EDGES, _DATE_CORES, _EDGES))
_NULL_VALUES = st.sampled_from([None, [], ["", "NULL", "2020-01-02"], ["\x00", "2020-01-0\x00", " NULL "]])


@pytest.mark.parametrize("timezone", ["UTC", "America/New_York"])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_DATES, min_size=1, max_size=30), null_values=_NULL_VALUES)
def test_dates_read_untrimmed_are_what_every_form_reads_trimmed(
    tmp_path_factory: pytest.TempPathFactory,
    timezone: str,
    texts: list[str | None],
    null_values: list[str] | None,
) -> None:
    # The reference: each text trimmed, null values nulled, read with every form in turn; a NUL in a text that is no
    # null value refuses it (the query's own test where a null value holds a NUL, the exact reading's otherwise).
    job = _job(tmp_path_factory.mktemp("dates"), null_values, timezone)
    source = job.sources[0]
    clean, rejects = _validate(job, _raw([{"id": f"u{i}", "d": t} for i, t in enumerate(texts)]))
    text = _trimmed(texts, source)
    values, messages = _parsers._date_times(timezone)(text)
    nul = ["\x00" in t if t is not None else False for t in texts]
    reasons = ["contains a NUL character" if z else m for m, z in zip(messages.to_list(), nul, strict=True)]
    assert clean[ROW].to_list() == [i + 1 for i, r in enumerate(reasons) if r is None]
    assert clean["d"].to_list() == [v for v, r in zip(values.to_list(), reasons, strict=True) if r is None]
    assert rejects.select("row", "column", "reason").rows() == [
        (i + 1, "d", r) for i, r in enumerate(reasons) if r is not None
    ]


_LIST_CORES = st.one_of(
    st.sampled_from(
        ["a|b", "a | b", "a||b", "|a", "[1]", '["x\\u0000"]', "a\x00b", "\x00", "NULL", "x\x00y", ""]
    ),
    st.text(st.sampled_from(["a", "|", "[", "]", '"', " ", "\t", "\x00", "\u3000"]), max_size=8),
)
_LISTS = st.one_of(st.none(), st.builds(lambda a, core, b: a + core + b, _EDGES, _LIST_CORES, _EDGES))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_LISTS, min_size=1, max_size=30), null_values=_NULL_VALUES)
def test_lists_with_nuls_are_refused_as_the_query_test_refused_them(
    tmp_path_factory: pytest.TempPathFactory, texts: list[str | None], null_values: list[str] | None
) -> None:
    # A list text with a NUL is read exactly, and refused there; the reference reads every text exactly, and refuses
    # a NUL in any text that is not a null value (any text at all where a null value holds a NUL: the raw column's
    # test).
    job = _job(tmp_path_factory.mktemp("lists"), null_values)
    source = job.sources[0]
    clean, rejects = _validate(job, _raw([{"id": f"u{i}", "l": t} for i, t in enumerate(texts)]))
    text = _trimmed(texts, source)
    values, messages = _parsers._lists("|")(text)
    raw_nul = any("\x00" in v for v in source.null_values)
    nul = [
        t is not None and "\x00" in t and (raw_nul or s is not None)
        for t, s in zip(texts, text.to_list(), strict=True)
    ]
    reasons = ["contains a NUL character" if z else m for m, z in zip(messages.to_list(), nul, strict=True)]
    assert clean[ROW].to_list() == [i + 1 for i, r in enumerate(reasons) if r is None]
    assert clean["l"].to_list() == [v for v, r in zip(values.to_list(), reasons, strict=True) if r is None]
    assert rejects.select("row", "column", "reason").rows() == [
        (i + 1, "l", r) for i, r in enumerate(reasons) if r is not None
    ]


_PLAIN_PHONES = [f"+90532{i:07d}" for i in range(300)]
_FORMATTED_PHONES = [f"+90 532 {i:03d} 45 67" for i in range(300)]
_PHONES = st.one_of(
    st.none(),
    st.sampled_from(["+905321234567", "905321234567", "+90 (532) 123-45.67", "1234567", "+1234567890123456"]),
    st.builds(
        lambda a, core, b: a + core + b,
        _EDGES,
        st.text(st.sampled_from([*"0123456789+-(). ", "\u00a0", "\x00", "\u0663"]), max_size=18),
        _EDGES,
    ),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_PHONES, min_size=1, max_size=30), null_values=_NULL_VALUES)
def test_msisdns_in_the_plain_form_are_what_the_separators_form_gives(
    tmp_path_factory: pytest.TempPathFactory, texts: list[str | None], null_values: list[str] | None
) -> None:
    # The same texts after a head of plain numbers (the plain form: a text that is an MSISDN as it is is its value,
    # every other text read exactly) and after a head of formatted ones (separators removed from every text): the
    # same values, rejects and messages for them.
    job = _job(tmp_path_factory.mktemp("phones"), null_values)
    source = job.sources[0]
    outcomes = []
    for head, form in ((_PLAIN_PHONES, frozenset({"plain-msisdn"})), (_FORMATTED_PHONES, frozenset())):
        rows = [{"id": f"h{i}", "phone": p} for i, p in enumerate(head)]
        rows += [{"id": f"u{i}", "phone": t} for i, t in enumerate(texts)]
        clean, rejects = _validate(job, _raw(rows))
        if _parsers._msisdn_untrimmed(source.null_values):  # else the trimmed form, with no choice
            # The form the head chose: the query of the chunk's schema with that hint held (and whichever tidy
            # forms its texts allowed: validation._Query.tidy).
            key = (id(source), id(job.validation), tuple(_raw(rows).schema.items()), False)
            assert any(
                k[:4] == key and frozenset(n for n in k[4] if not n.startswith("tidy:")) == form
                for k in validation._QUERIES
            )
        outcomes.append(
            (
                clean.filter(pl.col(ROW) > len(head)).select("__ext_id", "phone"),
                rejects.filter(pl.col("row") > len(head)).select("row", "column", "reason", "ext_id"),
            )
        )
    (plain_clean, plain_rejects), (formatted_clean, formatted_rejects) = outcomes
    assert_frame_equal(plain_clean, formatted_clean)
    assert_frame_equal(plain_rejects, formatted_rejects)
    # And what the exact reading of each trimmed text gives.
    text = _trimmed(texts, source)
    numbers = text.str.replace_all(_parsers._MSISDN_SEPARATORS, "")
    good = numbers.str.contains(_parsers._MSISDN).fill_null(False)
    refused = [
        t is not None and ("\x00" in t or not ok) and s is not None
        for t, s, ok in zip(texts, text.to_list(), good.to_list(), strict=True)
    ]
    assert plain_clean["phone"].to_list() == [
        n for n, r in zip(numbers.to_list(), refused, strict=True) if not r
    ]
    assert plain_rejects["row"].to_list() == [len(_PLAIN_PHONES) + i + 1 for i, r in enumerate(refused) if r]


@pytest.mark.parametrize(
    ("null_values", "refused"),
    [(None, False), ([], True), (["NULL"], True), (["", "NULL"], False)],
)
def test_empty_booleans_and_numbers_are_no_value_where_the_empty_text_is_a_null_value(
    tmp_path: Path, null_values: list[str] | None, refused: bool
) -> None:
    # Read as they are (no column with the empty text nulled first): no value where "" is a null value, refused
    # where it is not.
    job = _job(tmp_path, null_values)
    rows = [{"id": "u1", "n": "", "b": "", "p": ""}, {"id": "u2", "n": "1.5", "b": "Yes", "p": "0"}]
    clean, rejects = _validate(job, _raw(rows))
    if refused:
        assert clean.select("__ext_id", "n", "b", "p").rows() == [("u2", 1.5, True, False)]
        assert rejects.select("row", "column", "reason").rows() == [
            (
                1,
                "n",
                "n: not a number; b: not a boolean (true/false, yes/no, 1/0); "
                "p: not a boolean (true/false, yes/no, 1/0)",
            )
        ]
    else:
        assert clean.select("__ext_id", "n", "b", "p").rows() == [
            ("u1", None, None, None),
            ("u2", 1.5, True, False),
        ]
        assert rejects.is_empty()


def test_ids_read_untrimmed_are_what_the_trimmed_ids_give(tmp_path: Path) -> None:
    # An ID with whitespace at an end is read exactly, trimmed, after the query, as a refused one is (missing, too
    # long, with a control or invisible character); the others are their own trimmed form. A source whose every
    # check reads again what it refuses flags no row in the query itself.
    path = tmp_path / "job.yaml"
    path.write_text(
        JOB.format(timezone="UTC", null_values="")
        .replace("    opt_ins: {push: p}\n    msisdn: phone\n", "")
        .replace("      b: boolean\n      d: date\n      l: list\n", ""),
        encoding="utf-8",
    )
    job = load_job(path)
    ids = [
        "u1",
        " u2",
        "u3\u3000",
        "\tu4\t",
        "",
        "  ",
        "NULL",
        " NULL ",
        "a\tb",
        " a\x00b",
        "x" * 257,
        "a\u200bb",
    ]
    raw = pl.DataFrame(
        {"id": ids, "n": ["1"] * len(ids), ROW: range(1, len(ids) + 1)},
        schema={"id": pl.String, "n": pl.String, ROW: pl.Int64},
    )
    clean, rejects = validate_chunk(raw, job.sources[0], job.validation, 0, "users.csv")
    assert clean.select("__ext_id", ROW).rows() == [("u1", 1), ("u2", 2), ("u3", 3), ("u4", 4)]
    control = "external ID contains a control character (tab, line break, NUL...)"
    assert rejects.select("row", "column", "reason", "ext_id").rows() == [
        (5, "id", "missing external ID", None),
        (6, "id", "missing external ID", None),
        (7, "id", "missing external ID", None),
        (8, "id", "missing external ID", None),
        (9, "id", control, "a\tb"),
        (10, "id", control, "a\x00b"),
        (11, "id", "external ID longer than 256 characters", "x" * 257),
        (
            12,
            "id",
            "external ID contains an invisible character (zero-width, byte-order mark or bidirectional control): "
            "it would look like another ID without being equal to it",
            "a\u200bb",
        ),
    ]


_TEXTS = st.one_of(
    st.none(),
    st.builds(
        lambda a, core, b: a + core + b,
        _EDGES,
        st.one_of(
            st.sampled_from(["Ann", "İstanbul", "NULL", "N/A", "x\x00y", "a b", ""]),
            st.text(st.sampled_from(["a", " ", "\t", "\u3000", "\x00", "\u200b", "|"]), max_size=6),
        ),
        _EDGES,
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(_TEXTS, _TEXTS), min_size=1, max_size=30), null_values=_NULL_VALUES)
def test_ids_and_texts_read_untrimmed_are_their_trimmed_texts(
    tmp_path_factory: pytest.TempPathFactory,
    rows: list[tuple[str | None, str | None]],
    null_values: list[str] | None,
) -> None:
    # The reference: each text trimmed, null values nulled; an ID refused as the ID's reasons say, a text value
    # refused where it holds a NUL (any text at all where a null value holds one: the raw column's test).
    path = tmp_path_factory.mktemp("texts") / "job.yaml"
    extra = "" if null_values is None else f"\n    null_values: {json.dumps(null_values)}"
    path.write_text(
        "name: t\nworkdir: work\ndestination:\n  platform: netmera\n"
        "  base_url: http://127.0.0.1:8080/rest/3.0/\n  secret: {env: NETMERA_API_KEY}\n"
        f"sources:\n  - name: users\n    path: users.csv\n    ext_id: id{extra}\n    attributes: {{s: string}}\n",
        encoding="utf-8",
    )
    job = load_job(path)
    source = job.sources[0]
    ids, texts = [r[0] for r in rows], [r[1] for r in rows]
    raw = pl.DataFrame(
        {"id": ids, "s": texts, ROW: range(1, len(rows) + 1)},
        schema={"id": pl.String, "s": pl.String, ROW: pl.Int64},
    )
    clean, rejects = validate_chunk(raw, source, job.validation, 0, "users.csv")
    trimmed_ids, trimmed_texts = _trimmed(ids, source), _trimmed(texts, source)
    id_messages = pl.select(
        _parsers._message(_parsers._id_reasons(pl.lit(trimmed_ids), job.validation)).alias("m")
    ).to_series()
    raw_nul = any("\x00" in v for v in source.null_values)
    text_messages = [
        "contains a NUL character" if t is not None and "\x00" in t and (raw_nul or s is not None) else None
        for t, s in zip(texts, trimmed_texts.to_list(), strict=True)
    ]
    expected_clean = [
        (i, s, n + 1)
        for n, (i, s, a, b) in enumerate(
            zip(
                trimmed_ids.to_list(),
                trimmed_texts.to_list(),
                id_messages.to_list(),
                text_messages,
                strict=True,
            )
        )
        if a is None and b is None
    ]
    assert clean.select("__ext_id", "s", ROW).rows() == expected_clean
    expected_rejects = []
    for n, (i, a, b) in enumerate(
        zip(trimmed_ids.to_list(), id_messages.to_list(), text_messages, strict=True)
    ):
        if a is not None and b is not None:
            expected_rejects.append((n + 1, "id", f"id: {a}; s: {b}", i))
        elif a is not None or b is not None:
            expected_rejects.append((n + 1, "id" if a else "s", a or b, i))
    assert rejects.select("row", "column", "reason", "ext_id").rows() == expected_rejects


# Texts made of what the per-text patterns look at: whitespace (ASCII and not), NUL and other control characters
# (the separator the gates join with among them), an invisible character, list delimiters and brackets.
_GATE_TEXTS = st.one_of(
    st.none(),
    st.text(
        st.sampled_from([*"ab |,$[] \t", "\x00", "\x01", "\x1f", "\x85", "\u00a0", "\u200b", "\u3000"]),
        max_size=6,
    ),
)


def _flags(texts: list[str | None], pattern: str) -> list[bool]:
    """Which texts the per-text ``pattern`` flags (as the query's per-text form searches them)."""
    return pl.Series(texts, dtype=pl.String).str.contains(pattern).fill_null(False).to_list()


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(_GATE_TEXTS, max_size=8), delimiter=st.sampled_from(["|", ",", "$", "^", ". "]))
def test_a_tidy_gate_holds_only_where_no_text_is_flagged(texts: list[str | None], delimiter: str) -> None:
    # validation._Query.tidy: a chunk's column takes its tidy form (no per-text search) where the gate — one search
    # of the texts joined — holds. It must never hold where the per-text search flags a text; and where no text
    # holds the separator, it holds wherever no text is flagged (else it would save nothing).
    column = pl.col("t")
    frame = pl.DataFrame({"t": texts}, schema={"t": pl.String})
    cases = [
        (_parsers.tidy_texts(column), _parsers._untidy_text()),
        (_parsers.tidy_ids(column), _parsers._odd_id()),
        (_parsers.tidy_lists(column, delimiter), _parsers._untidy_list(delimiter)),
    ]
    for gate, pattern in cases:
        tidy = frame.select(gate.alias("g")).item()
        flagged = any(_flags(texts, pattern))
        assert not (tidy and flagged), (texts, pattern)
        present = [t for t in texts if t is not None]
        if present and not any(
            _parsers._SEPARATOR in t for t in present
        ):  # (no text: one empty string joined)
            assert tidy == (not flagged), (texts, pattern)


def test_a_chunk_of_tidy_texts_skips_the_per_text_searches(tmp_path: Path) -> None:
    # The forms a chunk's query takes: every tidy form where its column's texts allow it, the per-text form of a
    # column with one untidy text (and only of that column); the same values and rejects as one row at a time.
    job = _job(tmp_path)
    source = job.sources[0]
    rows = [{"id": f"u{i}", "l": "a|b", "phone": "+905321234567", "n": "1"} for i in range(20)]
    held = validation._chunk_query(_raw(rows), source, job.validation).held
    assert {"tidy:ids:id", "tidy:lists-|:l"} <= held
    for column, text in (("id", " u5"), ("l", "a||b"), ("id", "u\x015"), ("l", '["a"]')):
        untidy = [*rows[:5], {**rows[5], column: text}, *rows[6:]]
        q = validation._chunk_query(_raw(untidy), source, job.validation)
        gate = "tidy:ids:id" if column == "id" else "tidy:lists-|:l"
        other = "tidy:lists-|:l" if column == "id" else "tidy:ids:id"
        assert gate not in q.held and other in q.held, (column, text, q.held)
        clean, rejects = _validate(job, _raw(untidy))
        one_by_one = [
            _validate(job, _raw([r]).with_columns(pl.lit(i + 1, pl.Int64).alias(ROW)))
            for i, r in enumerate(untidy)
        ]
        assert clean.drop("__file").equals(pl.concat([c for c, _ in one_by_one]).drop("__file"))
        assert rejects.equals(pl.concat([r for _, r in one_by_one]))
