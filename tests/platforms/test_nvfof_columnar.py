"""The columnar NotifyVisitors and Forms On Fire builders (issue 13) give exactly what the row-by-row Python code
gives, for arbitrary values (hypothesis):

* XML text: :func:`sync.platforms._xml.text` equals ``saxutils.escape(s, {"\\r": "&#13;"})`` and
  :func:`sync.platforms._xml.unsafe` finds exactly what :func:`xml_unsafe` finds, for any string;
* Forms On Fire: each push's batch ID is :func:`make_batch`'s for the same push and row, its body the canonical
  JSON, and in XML mode the request as sent (credentials spliced in by :class:`RequestWriter`) is
  :func:`to_xml`'s byte for byte;
* NotifyVisitors: each item's JSON text is the canonical JSON of what :meth:`Builder._item` (the Python
  reference) builds from the same row — E.164 clean-up, dates in the job's zones and formats, opt-in flags,
  lists, integral floats, values the platform refuses sent as they are; the packing (users per request, a
  user's run of events kept whole unless longer than a request, ``after`` across a cut run) equals the
  row-by-row packer's for any run lengths, batch size and split into frames, and the plan's counts equal the
  batches.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC
from typing import Any
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.config import AttributeMapping as Attribute
from sync.config import FileFormat, Source, SourceKind, ValueType
from sync.planning.row_keys import ROW_KEY
from sync.platforms import _xml
from sync.platforms.formsonfire import BodyFormat, UserKey
from sync.platforms.formsonfire import requests as fof
from sync.platforms.notifyvisitors import EVENT_CREATE, USER_CREATE
from sync.platforms.notifyvisitors import requests as nv
from sync.records import Batch, RowRef, body_json

SPECIAL = ["&", "<", ">", "\r", "\n", "\r\n", "\t", '"', "'", "]]>", "\x00", "\x07", "\x0b", "\x1f", "\ufffe"]
SPECIAL += ["\uffff", "\x7f", "\u2028", "é", "😀", "&amp;", "&#13;", "\x1c", "\u3000", "\xa0", " "]
texts = st.lists(
    st.one_of(st.sampled_from(SPECIAL), st.characters(exclude_categories=["Cs"])), max_size=12
).map("".join)
safe_texts = texts.filter(lambda s: fof.xml_unsafe(s) is None)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), texts), max_size=30))
def test_xml_text_and_unsafe_equal_the_python_rules(values: list[str | None]) -> None:
    frame = pl.DataFrame({"v": values}, schema={"v": pl.String})
    out = frame.select(_xml.text(pl.col("v")).alias("t"), _xml.unsafe(pl.col("v")).alias("u"))
    assert out["t"].to_list() == [None if v is None else escape(v, {"\r": "&#13;"}) for v in values]
    assert out["u"].to_list() == [v is not None and fof.xml_unsafe(v) is not None for v in values]


# --- Forms On Fire ------------------------------------------------------------------------------------------

FILES = ["/data/pushes.csv", "/data/more pushes.csv"]


def _push_source() -> Source:
    return Source(
        name="pushes",
        kind=SourceKind.USERS,
        paths=("pushes.csv",),
        format=FileFormat.CSV,
        ext_id="id",
        attributes=(
            Attribute("title", "Title"),
            Attribute("message", "Body"),
            Attribute("sound", "Sound", ValueType.BOOLEAN),
            Attribute("expiry", "ExpirySecs", ValueType.NUMBER),
        ),
    )


pushes = st.lists(
    st.tuples(
        texts.filter(lambda s: s.strip() != ""),
        st.one_of(st.none(), texts),
        st.one_of(st.none(), texts),
        st.one_of(st.none(), st.booleans()),
        st.one_of(st.none(), st.integers(0, 2**31 - 1).map(float)),
    ),
    min_size=1,
    max_size=12,
)
constants = st.fixed_dictionaries(
    {},
    optional={
        "Title": texts,
        "Body": texts,
        "Sound": st.booleans(),
        "ExpirySecs": st.integers(0, 2**31 - 1),
    },
)


@settings(max_examples=40, deadline=None)
@given(pushes, constants, st.sampled_from(list(UserKey)), st.sampled_from(list(BodyFormat)))
def test_formsonfire_pushes_equal_the_python_pushes(
    rows: list[tuple[str, str | None, str | None, bool | None, float | None]],
    fixed: dict[str, Any],
    user_key: UserKey,
    body_format: BodyFormat,
) -> None:
    if body_format is BodyFormat.XML:
        rows = [r for r in rows if not any(isinstance(v, str) and fof.xml_unsafe(v) for v in r)]
        fixed = {k: v for k, v in fixed.items() if not (isinstance(v, str) and fof.xml_unsafe(v))}
    builder = fof.Builder(user_key, fixed, body_format)
    source = _push_source()
    (stream,) = builder.streams_for(source)
    frame = pl.DataFrame(
        {
            "__ext_id": [r[0] for r in rows],
            "__file": [i % 2 for i in range(len(rows))],
            "__row": [i + 1 for i in range(len(rows))],
            "title": [r[1] for r in rows],
            "message": [r[2] for r in rows],
            "sound": [r[3] for r in rows],
            "expiry": [r[4] for r in rows],
            ROW_KEY: [7 * i + 1 for i in range(len(rows))],
        },
        schema={
            "__ext_id": pl.String,
            "__file": pl.Int32,
            "__row": pl.Int64,
            "title": pl.String,
            "message": pl.String,
            "sound": pl.Boolean,
            "expiry": pl.Float64,
            ROW_KEY: pl.UInt64,
        },
    )
    batches = list(builder.stream_batches(stream, [frame], 1, FILES))
    writer = fof.RequestWriter(body_format, 42, "k&y<>\r", xml_root="Push")
    assert len(batches) == len(rows)
    for i, (batch, row) in enumerate(zip(batches, rows, strict=True)):
        fields = dict(fixed)
        for name, value in zip(("Title", "Body", "Sound", "ExpirySecs"), row[1:], strict=True):
            if value is not None:
                fields[name] = value
        expiry = fields.get("ExpirySecs")
        push = fof.push_body(
            user_key,
            row[0],
            title=fields.get("Title"),
            body=fields.get("Body"),
            sound=fields.get("Sound"),
            expiry_secs=int(expiry) if expiry is not None else None,
        )
        origin = RowRef(FILES[i % 2], i + 1)
        reference = fof.make_batch(push, origin=origin)
        assert batch.batch_id == reference.batch_id
        assert batch.ext_ids == (row[0],) and dict(batch.origins) == {row[0]: origin}
        assert batch.row_keys == (7 * i + 1).to_bytes(8, "little")
        assert fof.push_of(batch.body) == push
        expected = fof.serialise(push, body_format, 42, "k&y<>\r", xml_root="Push")[0]
        if body_format is BodyFormat.XML:
            assert writer.payload(batch.body) == expected
        else:
            assert batch.body == reference.body
            assert json.loads(writer.payload(batch.body)) == json.loads(expected)


def test_request_writer_serialises_a_body_of_the_other_format_and_refuses_what_xml_cannot_carry() -> None:
    push = {"UserId": "u1", "Title": "T", "Sound": True}
    as_json = fof.canonical_json(push)
    xml_writer = fof.RequestWriter(BodyFormat.XML, 7, "key")
    assert xml_writer.payload(as_json) == fof.to_xml(push, 7, "key")
    json_writer = fof.RequestWriter(BodyFormat.JSON, 7, "key")
    elements = b"<Sound>true</Sound><Title>T</Title><UserId>u1</UserId>"
    assert json.loads(json_writer.payload(elements)) == {**push, "CompanyId": 7, "IntegrationKey": "key"}
    for writer, body in (
        (xml_writer, fof.canonical_json({"UserId": "u\x07"})),
        (fof.RequestWriter(BodyFormat.XML, 7, "k\x01"), elements),
    ):
        try:
            writer.payload(body)
        except ValueError as exc:
            assert "XML 1.0" in str(exc)
        else:
            raise AssertionError("a value XML cannot carry was serialised")


# --- NotifyVisitors -----------------------------------------------------------------------------------------

MS_1000 = -30610224000000  # 1000-01-01T00:00:00Z
MS_9999 = 253402214400000  # 9999-12-31T00:00:00Z
dates = st.one_of(
    st.integers(0, 2_000_000_000_000),
    st.integers(MS_1000 - 10**11, MS_1000 + 10**11),
    st.integers(MS_9999 - 10**10, MS_9999),
    st.integers(2_114_380_800_000 - 10**10, 2_114_380_800_000 + 10**10),
    st.sampled_from([0, -1, 951782400000, 1710034200000]),
)
floats = st.one_of(
    st.floats(allow_nan=False),
    st.integers(-(2**60), 2**60).map(float),
    st.sampled_from([0.0, -0.0, 1e-5, 1.5e-7, 1e16, 2.0**53, 0.1]),
)
mobiles = st.one_of(
    texts,
    st.from_regex(r"\A(\+|00)?[0-9 ().\-\x1c\u3000]{6,20}\Z"),
    st.sampled_from(["+919899999999", "0091 98999 99999", "+0123456789", "+1 (555) 0100-12"]),
)
user_ids = st.one_of(st.text(min_size=1, max_size=5), st.just("x" * 101), st.just("y" * 100))
long_or_text = st.one_of(texts, st.just("z" * 999), st.just("z" * 1000))


def _nv_user_source() -> Source:
    return Source(
        name="users",
        kind=SourceKind.USERS,
        paths=("users.csv",),
        format=FileFormat.CSV,
        ext_id="id",
        attributes=(
            Attribute("name", "name"),
            Attribute("score", "score", ValueType.NUMBER),
            Attribute("born", "birth_date", ValueType.DATE),
            Attribute("seen", "last_seen", ValueType.DATE),
            Attribute("member", "member", ValueType.BOOLEAN),
            Attribute("likes", "likes", ValueType.LIST),
            Attribute("phone", "mobile"),
            Attribute("opt", "email_opt_in", ValueType.BOOLEAN),
            Attribute("flag", "sms_opt_in"),
        ),
    )


def _python_items(builder: nv.Builder, stream: nv.Stream, frame: pl.DataFrame) -> list[str]:
    selected = builder._selected(stream, frame)
    rows = selected.select("__ext_id", "__file", "__row", *stream.columns).iter_rows()
    return [nv.canonical_json(builder._item(stream, row)).decode("utf-8") for row in rows]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            user_ids,
            st.one_of(st.none(), long_or_text),
            st.one_of(st.none(), floats),
            st.one_of(st.none(), dates),
            st.one_of(st.none(), dates),
            st.one_of(st.none(), st.booleans()),
            st.one_of(st.none(), st.lists(st.one_of(st.none(), texts), max_size=3)),
            st.one_of(st.none(), mobiles),
            st.one_of(st.none(), st.booleans()),
            st.one_of(st.none(), st.sampled_from(["yes", "No", " 1 ", "maybe", "off"])),
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(["UTC", "Asia/Kolkata", "America/New_York", "Pacific/Chatham"]),
)
def test_notifyvisitors_user_items_equal_the_python_items(rows: list[tuple[Any, ...]], zone: str) -> None:
    builder = nv.Builder(ZoneInfo(zone) if zone != "UTC" else UTC)
    (stream,) = builder.streams_for(_nv_user_source())
    columns = ["__ext_id", "name", "score", "born", "seen", "member", "likes", "phone", "opt", "flag"]
    schema: dict[str, Any] = {
        "__ext_id": pl.String,
        "name": pl.String,
        "score": pl.Float64,
        "born": pl.Int64,
        "seen": pl.Int64,
        "member": pl.Boolean,
        "likes": pl.List(pl.String),
        "phone": pl.String,
        "opt": pl.Boolean,
        "flag": pl.String,
    }
    frame = pl.DataFrame([dict(zip(columns, r, strict=True)) for r in rows], schema=schema)
    frame = frame.with_columns(
        pl.lit(0, pl.Int32).alias("__file"), pl.int_range(1, pl.len() + 1).alias("__row")
    )
    assert builder._items(stream, frame)["__item"].to_list() == _python_items(builder, stream, frame)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            user_ids,
            st.one_of(st.none(), st.text(max_size=3), st.just("e" * 49), st.just("e" * 50)),
            st.one_of(st.none(), long_or_text),
            st.one_of(st.none(), floats),
            dates,
            st.one_of(st.none(), dates),
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(list(nv.EVENT_TIME_FORMATS)),
    st.sampled_from(["UTC", "Asia/Kolkata", "Australia/Lord_Howe"]),
)
def test_notifyvisitors_event_items_equal_the_python_items(
    rows: list[tuple[Any, ...]], fmt: str, zone: str
) -> None:
    builder = nv.Builder(ZoneInfo("Asia/Kolkata"), event_tz=ZoneInfo(zone), event_time_format=fmt)
    source = Source(
        name="events",
        kind=SourceKind.EVENTS,
        paths=("events.csv",),
        format=FileFormat.CSV,
        ext_id="id",
        event="event",
        attributes=(
            Attribute("sku", "sku"),
            Attribute("amount", "amount", ValueType.NUMBER),
            Attribute("when", "event_time", ValueType.DATE),
            Attribute("seen", "seen", ValueType.DATE),
        ),
    )
    (stream,) = builder.streams_for(source)
    columns = ["__ext_id", "__event", "sku", "amount", "when", "seen"]
    schema = {c: pl.String for c in columns[:3]} | {"amount": pl.Float64, "when": pl.Int64, "seen": pl.Int64}
    frame = pl.DataFrame([dict(zip(columns, r, strict=True)) for r in rows], schema=schema)
    frame = frame.with_columns(
        pl.lit(0, pl.Int32).alias("__file"), pl.int_range(1, pl.len() + 1).alias("__row")
    )
    assert builder._items(stream, frame)["__item"].to_list() == _python_items(builder, stream, frame)


def _reference_packing(users: list[str], size: int) -> list[tuple[list[int], bool]]:
    """The row-by-row packer of before the columnar data plane: per request, its item positions and whether it
    shares a user with the request before."""
    out: list[tuple[list[int], bool]] = []
    current: list[int] = []

    def emit() -> None:
        nonlocal current
        shares = bool(out) and not {users[i] for i in current}.isdisjoint({users[i] for i in out[-1][0]})
        out.append((current, shares))
        current = []

    i = 0
    while i < len(users):
        j = i
        while j < len(users) and users[j] == users[i]:
            j += 1
        if current and len(current) + (j - i) > size:
            emit()
        for k in range(i, j):
            current.append(k)
            if len(current) == size:
                emit()
        i = j
    if current:
        emit()
    return out


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(1, 12), min_size=1, max_size=25),
    st.integers(1, 9),
    st.lists(st.integers(1, 24), max_size=4),
)
def test_notifyvisitors_packing_equals_the_row_by_row_packer(
    runs: list[int], size: int, cuts: list[int]
) -> None:
    users = [f"u{n}" for n, length in enumerate(runs) for _ in range(length)]
    source = Source(
        name="events",
        kind=SourceKind.EVENTS,
        paths=("events.csv",),
        format=FileFormat.CSV,
        ext_id="id",
        event="event",
        attributes=(Attribute("when", "event_time", ValueType.DATE),),
    )
    builder = nv.Builder(UTC)
    (stream,) = builder.streams_for(source)
    whole = pl.DataFrame(
        {
            "__ext_id": users,
            "__file": [0] * len(users),
            "__row": list(range(1, len(users) + 1)),
            "__event": ["e"] * len(users),
            "when": [1_700_000_000_000] * len(users),
            ROW_KEY: list(range(len(users))),
        },
        schema_overrides={"__file": pl.Int32, ROW_KEY: pl.UInt64},
    )
    # Frames hold whole users: cut at run boundaries only.
    bounds = sorted({sum(runs[:c]) for c in cuts if c < len(runs)} | {0, len(users)})
    frames = [whole.slice(a, b - a) for a, b in itertools.pairwise(bounds)]
    batches: list[Batch] = list(builder.stream_batches(stream, frames, size, ["/f.csv"]))
    expected = _reference_packing(users, size)
    assert [len(body_json(b)["nv"]) for b in batches] == [len(items) for items, _ in expected]
    assert [list(b.ext_ids) for b in batches] == [
        list(dict.fromkeys(users[i] for i in items)) for items, _ in expected
    ]
    assert [b.after is not None for b in batches] == [shares for _, shares in expected]
    for k, batch in enumerate(batches):
        assert batch.after in (None, batches[k - 1].batch_id)
        items, _ = expected[k]
        assert [r.row for r in batch.origins.rows] == [i + 1 for i in items]  # type: ignore[attr-defined]
        assert batch.row_keys == b"".join(i.to_bytes(8, "little") for i in items)
    listed = list(
        nv.iter_batches(
            EVENT_CREATE, [(json.loads(b), None) for b in _python_items(builder, stream, whole)], size
        )
    )
    assert [b.batch_id for b in listed] == [b.batch_id for b in batches]
    assert [b.after for b in listed] == [b.after for b in batches]
    assert builder.stream_counts(stream, frames, size) == (len(batches), sum(len(b.ext_ids) for b in batches))


def test_restrict_keeps_the_kept_items_rows_and_row_keys() -> None:
    from sync.platforms.registry import REGISTRY

    body = {"nv": [nv.event_item(u, "e", {"k": i}, "2024-01-01 00:00:00") for i, u in enumerate("abab")]}
    rows = [RowRef("f.csv", i + 1) for i in range(4)]
    keys = b"".join(i.to_bytes(8, "little") for i in (10, 11, 12, 13))
    batch = nv.make_batch(EVENT_CREATE, body, rows=rows, row_keys=keys, after="0123456789abcdef")
    cut = REGISTRY["notifyvisitors"].restrict(batch, {"b"})
    assert cut is not None and cut.ext_ids == ("b",) and cut.after == "0123456789abcdef"
    assert [i["attributes"]["k"] for i in body_json(cut)["nv"]] == [1, 3]
    assert cut.origins.rows == (rows[1], rows[3])  # type: ignore[attr-defined]
    assert cut.row_keys == keys[8:16] + keys[24:32]
    assert (
        nv.make_batch(USER_CREATE, {"nv": [nv.user_item("a", {})]}).body
        == b'{"nv":[{"userID":"a","user_attributes":{}}]}'
    )


def test_the_whitespace_and_noise_sets_are_pythons() -> None:
    """Polars' regex ``\\s`` is not Python's: the sets written out for the columns equal Python's, character
    for character (every code point but the surrogates)."""
    import re

    from sync.platforms._text import PY_SPACE_CHARS, PY_WHITESPACE
    from sync.platforms.notifyvisitors.checks import MOBILE_NOISE_CHARS

    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    found = pl.Series(chars).str.contains(f"^[{PY_WHITESPACE}]$")
    assert [c for c, hit in zip(chars, found, strict=True) if hit] == [c for c in chars if c.isspace()]
    assert sorted(PY_SPACE_CHARS) == [c for c in chars if c.isspace()]
    noise = re.compile(r"[\s().-]")
    assert sorted(MOBILE_NOISE_CHARS) == [c for c in chars if noise.fullmatch(c)]


def test_samples_are_the_first_bodies_as_objects() -> None:
    builder = fof.Builder(UserKey.USER_EXTERNAL_ID, {"Title": "Hi"}, BodyFormat.XML)
    (stream,) = builder.streams_for(_push_source())
    frame = pl.DataFrame(
        {"__ext_id": ["u2"], "__file": [1], "__row": [9], "title": [None], "message": ["a\rb"]},
        schema_overrides={"__file": pl.Int32, "__row": pl.Int64, "title": pl.String},
    ).with_columns(pl.lit(None, pl.Boolean).alias("sound"), pl.lit(5.0).alias("expiry"))
    assert builder.stream_sample(stream, [frame]) == {
        "UserExternalId": "u2",
        "Title": "Hi",
        "Body": "a\rb",
        "ExpirySecs": 5,
    }
    users = nv.Builder(UTC)
    (profiles,) = users.streams_for(_nv_user_source())
    rows = pl.DataFrame(
        {"__ext_id": ["a", "b", "c", "d"], "__file": [0, 0, 1, 1], "__row": [1, 2, 3, 4]},
        schema_overrides={"__file": pl.Int32},
    ).with_columns(
        *(pl.lit(None, pl.String).alias(c) for c in ("name", "phone", "flag")),
        *(pl.lit(None, pl.Int64).alias(c) for c in ("born", "seen")),
        pl.lit(None, pl.Float64).alias("score"),
        pl.lit(None, pl.Boolean).alias("opt"),
        pl.lit(None, pl.List(pl.String)).alias("likes"),
        pl.Series("member", [None, True, False, True]),
    )
    assert users.stream_sample(profiles, [rows.head(2), rows.tail(2)]) == {
        "nv": [
            {"userID": "b", "user_attributes": {"member": True}},
            {"userID": "c", "user_attributes": {"member": False}},
            {"userID": "d", "user_attributes": {"member": True}},
        ]
    }


def test_time_texts_skip_escaping_only_for_formats_that_write_nothing_to_escape() -> None:
    """A time format without a character JSON escapes is quoted as it is; one with a quote, a backslash or
    ``%t``/``%n`` (a tab, a line break) is escaped: the text is ``json.dumps``' either way."""
    from sync.platforms.notifyvisitors.requests import _time_text

    frame = pl.DataFrame({"t": [0, 86_400_000 * 400, None]}, schema={"t": pl.Int64})
    for fmt in ("%Y-%m-%d %H:%M:%S", '%Y"%m', "%Y\\%m", "%Y%t%m", "%Y%n%m", "%d/%m/%Y %Z"):
        local = pl.from_epoch(pl.col("t"), time_unit="ms").dt.replace_time_zone("UTC").dt.strftime(fmt)
        got = frame.select(_time_text(local, fmt)).to_series().to_list()
        raw = frame.select(local).to_series().to_list()
        assert got == [None if r is None else json.dumps(r, ensure_ascii=False) for r in raw], fmt
