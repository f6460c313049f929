"""The columnar JSON encoder (sync/platforms/_encode.py) gives exactly the bytes of the canonical ``json.dumps``.

Property tests (hypothesis): for arbitrary values of every dtype a clean frame can hold — unicode, control
characters, quotes, backslashes, U+007F and U+2028, empty strings, floats of every magnitude (tiny, huge,
subnormal, integral, -0.0, NaN, infinities), 64-bit integers, booleans, nulls, lists and structs — the encoder's
text equals ``json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` of the value as
``Series.to_list()`` returns it, after the platforms' normalisation (integral floats below 2**53 as integers).
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.platforms import _encode as encode

SPECIAL = [
    '"',
    "\\",
    "\x00",
    "\x01",
    "\x08",
    "\t",
    "\n",
    "\x0b",
    "\x0c",
    "\r",
    "\x1f",
    "\x7f",
    "\u2028",
    "\u2029",
]
SPECIAL += ["é", "😀", "\ufeff", "\u0085", "/", "<", "'"]
texts = st.text(alphabet=st.one_of(st.sampled_from(SPECIAL), st.characters(exclude_categories=["Cs"])))
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e-3, max_value=1e-3),
    st.floats(min_value=-(2.0**60), max_value=2.0**60),
    st.integers(-(2**60), 2**60).map(float),
    st.sampled_from([0.0, -0.0, 1e-5, 1.5e-7, 1e16, 1e22, 2.0**53, -(2.0**53) + 1, 5e-324, 0.1, 1e-4]),
)
ints = st.integers(-(2**63), 2**63 - 1)


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def normalised(value: Any) -> Any:
    """The platforms' normalisation (Netmera's ``json_value``): integral floats below 2**53 as integers."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [normalised(v) for v in value]
    if isinstance(value, dict):
        return {k: normalised(v) for k, v in value.items()}
    return value


def encoded(series: pl.Series, **kwargs: Any) -> list[bytes | None]:
    out = pl.DataFrame({"v": series}).select(encode.value(pl.col("v"), series.dtype, **kwargs)).to_series()
    return [None if text is None else text.encode("utf-8") for text in out.to_list()]


def expected(series: pl.Series, *, normalise: bool = True) -> list[bytes | None]:
    return [None if v is None else canonical(normalised(v) if normalise else v) for v in series.to_list()]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), texts), max_size=30))
def test_strings(values: list[str | None]) -> None:
    series = pl.Series(values, dtype=pl.String)
    assert encoded(series) == expected(series)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), floats), max_size=30))
def test_floats_normalised_and_plain(values: list[float | None]) -> None:
    series = pl.Series(values, dtype=pl.Float64)
    assert encoded(series) == expected(series)
    assert encoded(series, integral_floats=False) == expected(series, normalise=False)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), floats), max_size=20))
def test_float32_is_the_double_python_sees(values: list[float | None]) -> None:
    series = pl.Series(values, dtype=pl.Float64).cast(pl.Float32)
    assert encoded(series) == expected(series)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), ints), max_size=30), st.lists(st.integers(0, 2**64 - 1), max_size=10))
def test_integers_of_every_width(signed: list[int | None], unsigned: list[int]) -> None:
    series = pl.Series(signed, dtype=pl.Int64)
    assert encoded(series) == expected(series)
    big = pl.Series(unsigned, dtype=pl.UInt64)
    assert encoded(big) == expected(big)
    for dtype in (pl.Int8, pl.Int16, pl.Int32, pl.UInt8, pl.UInt32):
        small = pl.Series([v for v in signed if v is not None], dtype=pl.Int64).cast(dtype, strict=False)
        assert encoded(small) == expected(small)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.none(), st.booleans()), max_size=20))
def test_booleans(values: list[bool | None]) -> None:
    series = pl.Series(values, dtype=pl.Boolean)
    assert encoded(series) == expected(series)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.lists(st.one_of(st.none(), texts), max_size=5)), max_size=15),
    st.lists(st.one_of(st.none(), st.lists(st.one_of(st.none(), floats), max_size=5)), max_size=15),
    st.lists(st.lists(st.lists(ints, max_size=3), max_size=3), max_size=5),
)
def test_lists(strings: list[Any], numbers: list[Any], nested: list[Any]) -> None:
    for series in (
        pl.Series(strings, dtype=pl.List(pl.String)),
        pl.Series(numbers, dtype=pl.List(pl.Float64)),
        pl.Series(nested, dtype=pl.List(pl.List(pl.Int64))),
    ):
        assert encoded(series) == expected(series)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_structs_sort_their_keys(data: st.DataObject) -> None:
    names = data.draw(st.lists(texts, min_size=1, max_size=5, unique=True))
    kinds = data.draw(
        st.lists(st.sampled_from(["s", "f", "i", "b", "l"]), min_size=len(names), max_size=len(names))
    )
    strategy = {
        "s": (texts, pl.String),
        "f": (floats, pl.Float64),
        "i": (ints, pl.Int64),
        "b": (st.booleans(), pl.Boolean),
        "l": (st.lists(texts, max_size=3), pl.List(pl.String)),
    }
    schema = {n: strategy[k][1] for n, k in zip(names, kinds, strict=True)}
    row = st.fixed_dictionaries(
        {n: st.one_of(st.none(), strategy[k][0]) for n, k in zip(names, kinds, strict=True)}
    )
    rows = data.draw(st.lists(row, max_size=10))
    frame = pl.DataFrame(rows, schema=schema, orient="row")
    series = frame.select(pl.struct(pl.all()).alias("v")).to_series()
    assert encoded(series) == expected(series)
    # obj() leaves null members out, as the platforms' bodies do. Columns are referred to by plain names: a key
    # may be one polars reads as a pattern ("*", "^...$"), which the encoder never takes as a column name.
    columns = frame.rename({n: f"c{i}" for i, n in enumerate(names)})
    members = {n: encode.value(pl.col(f"c{i}"), schema[n]) for i, n in enumerate(names)}
    got = columns.select(encode.obj(members)).to_series().to_list()
    want = [canonical({k: normalised(v) for k, v in r.items() if v is not None}) for r in frame.to_dicts()]
    assert [g.encode("utf-8") for g in got] == want


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), texts), st.one_of(st.none(), floats)), max_size=10))
def test_fixed_arrays(rows: list[tuple[str | None, float | None]]) -> None:
    frame = pl.DataFrame(rows, schema={"s": pl.String, "f": pl.Float64}, orient="row")
    items = [encode.string(pl.col("s")), encode.floating(pl.col("f"))]
    kept = frame.select(encode.array(items)).to_series().to_list()
    nulls = frame.select(encode.array(items, drop_nulls=False)).to_series().to_list()
    assert kept == [canonical([normalised(v) for v in r if v is not None]).decode() for r in rows]
    assert nulls == [canonical([normalised(v) for v in r]).decode() for r in rows]


def test_known_differences_from_polars_text_are_fixed() -> None:
    """The cases where polars' own text is not Python's: tiny floats, one-digit exponents, specials."""
    values = [1e-05, 1.5e-07, 0.0001, 1e16, -0.0, 1e22, float("nan"), float("inf"), float("-inf")]
    series = pl.Series(values)
    assert [t.decode() for t in encoded(series) if t] == [
        "1e-05",
        "1.5e-07",
        "0.0001",
        "1e+16",
        "0",
        "1e+22",
        "NaN",
        "Infinity",
        "-Infinity",
    ]
    assert encoded(pl.Series(["\x7f\u2028\x1f"])) == [b'"\x7f\xe2\x80\xa8\\u001f"']
    assert encode.key('a"b') == '"a\\"b"'


def test_struct_fields_named_like_polars_patterns_are_encoded() -> None:
    """A struct field named ``*`` or ``^...$`` is a key like any other (polars would expand it as a pattern if
    the encoder looked it up by name)."""
    frame = pl.DataFrame({"*": [1, None], "^a.*$": ["x", 'y"'], "b": [0.5, 2.0]})
    series = frame.select(pl.struct(pl.all()).alias("v")).to_series()
    assert encoded(series) == expected(series)


def test_dtypes_json_has_no_form_for_are_refused() -> None:
    with pytest.raises(TypeError, match="no JSON form"):
        encode.value(pl.col("d"), pl.Date())


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_objects_with_required_members_and_nested_texts(data: st.DataObject) -> None:
    """``required`` members (never null) join the object's own concatenation, nested objects and strings too:
    the text is the same as without, whichever members are left out around them."""
    names = data.draw(st.lists(texts.filter(lambda t: t != "inner"), min_size=1, max_size=6, unique=True))
    required = data.draw(st.sets(st.sampled_from(names)))
    nested = data.draw(st.sampled_from([*names, None]))
    rows = data.draw(
        st.lists(
            st.fixed_dictionaries(
                {n: (texts if n in required else st.one_of(st.none(), texts)) for n in names}
                | {"inner": st.one_of(st.none(), texts)}
            ),
            min_size=1,
            max_size=8,
        )
    )
    columns = {n: f"c{i}" for i, n in enumerate(names)}
    frame = pl.DataFrame(
        {**{c: [r[n] for r in rows] for n, c in columns.items()}, "inner": [r["inner"] for r in rows]},
        schema={**{c: pl.String for c in columns.values()}, "inner": pl.String},
    )
    members: dict[str, encode.Member] = {n: encode.string_text(pl.col(c)) for n, c in columns.items()}
    if nested is not None:  # one member is an object (always present) holding an optional string
        members[nested] = encode.obj_text({"x": encode.string(pl.col("inner"))})
    got = frame.select(encode.obj(members, required=required | ({nested} if nested else set()))).to_series()
    want = []
    for r in rows:
        item = {n: v for n, v in r.items() if n != "inner" and v is not None}
        if nested is not None:
            item[nested] = {"x": r["inner"]} if r["inner"] is not None else {}
        want.append(canonical(item).decode())
    assert got.to_list() == want


def column_encoded(series: pl.Series, **kwargs: Any) -> list[bytes | None]:
    """What :func:`encode.column_text` gives for the series as a frame's column (its per-frame expression)."""
    frame = pl.DataFrame({"v": series})
    text = encode.column_text(frame, "v", **kwargs)
    expr = text.expr() if isinstance(text, encode.Text) else text
    out = frame.select(expr.alias("t")).to_series()
    return [None if t is None else t.encode("utf-8") for t in out.to_list()]


plain = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], min_codepoint=0x20, exclude_characters='"\\')
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), texts), max_size=30), st.lists(st.one_of(st.none(), plain), max_size=30))
def test_column_text_of_strings_is_value_text(
    values: list[str | None], plain_values: list[str | None]
) -> None:
    """The per-frame string text (quotes alone when no value needs escaping) is exactly :func:`encode.value`'s,
    for frames that need escaping and frames that do not; a sliced (offset) column too."""
    for series in (pl.Series(values, dtype=pl.String), pl.Series(plain_values, dtype=pl.String)):
        assert column_encoded(series) == expected(series)
        assert column_encoded(series.slice(1)) == expected(series.slice(1))


def test_plain_strings_sees_every_character_json_escapes() -> None:
    assert encode.plain_strings(pl.Series(["Ada", "é😀\u2028\x7f", "", None], dtype=pl.String))
    assert encode.plain_strings(pl.Series([], dtype=pl.String))
    for c in ['"', "\\", *(chr(i) for i in range(0x20))]:
        assert not encode.plain_strings(pl.Series(["Ada", f"x{c}y"], dtype=pl.String)), repr(c)
    # Several chunks (a concatenated column): each is scanned.
    chunked = pl.concat([pl.Series(["a"]), pl.Series(['b"'])], rechunk=False)
    assert chunked.n_chunks() == 2 and not encode.plain_strings(chunked)
    with pytest.raises(TypeError, match="String series"):
        encode.plain_strings(pl.Series([1, 2]))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.none(), floats), max_size=30),
    st.lists(st.one_of(st.none(), st.integers(-(2**40), 2**40).map(float)), max_size=30),
    st.lists(
        st.one_of(st.none(), st.floats(min_value=0.5, max_value=1e9).filter(lambda f: f % 1)), max_size=30
    ),
)
def test_column_text_of_floats_is_value_text(
    mixed: list[float | None], whole: list[float | None], fractional: list[float | None]
) -> None:
    """Whichever branches a frame's floats let the per-frame expression leave out (all integral, none integral,
    tiny values, infinities, NaN), the text is :func:`encode.value`'s, normalised or not; Float32 too."""
    exact = whole + fractional  # integral and not, all below 2**53: the suffix strip's case
    for values in (mixed, whole, fractional, mixed + whole, exact, [0.0, *exact], [-0.0, *exact]):
        series = pl.Series(values, dtype=pl.Float64)
        assert column_encoded(series) == expected(series)
        assert column_encoded(series, integral_floats=False) == expected(series, normalise=False)
        single = series.cast(pl.Float32)
        assert column_encoded(single) == expected(single)


def test_column_text_strips_the_integral_suffix_only_where_that_is_exact() -> None:
    """Integral and fractional values below 2**53 take the suffix strip; a -0.0 (stripped it would read "-0")
    or a value from 2**53 up (written as a float) keeps the general form; the text is value()'s each time."""
    cases = [
        ([1.0, 2.5, -3.0, 0.0, 9007199254740991.0, None], True),
        ([1.0, 2.5, -0.0], False),
        ([1.0, 2.5, 2.0**53], False),
        ([1.0, 2.5, float("nan")], False),
    ]
    for values, stripped in cases:
        series = pl.Series(values, dtype=pl.Float64)
        text = encode.column_text(pl.DataFrame({"v": series}), "v")
        assert ("strip_suffix" in str(text)) is stripped, values
        assert column_encoded(series) == expected(series)


def test_column_text_of_booleans_without_nulls_is_value_text() -> None:
    series = pl.Series([True, False, True])
    assert "otherwise" in str(encode.column_text(pl.DataFrame({"v": series}), "v"))
    assert column_encoded(series) == expected(series)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_objects_of_column_texts_with_optional_members(data: st.DataObject) -> None:
    """An object of per-frame column texts (plain strings between quotes, strings that need escaping,
    booleans, floats), each member optional (nulls in the frame) or present in every row, is the canonical
    JSON of each row's dict without its null members: a plain column that may be null joins the object's own
    concatenation with its constants (null where it is), and the text is still exact."""
    names = data.draw(st.lists(texts, min_size=1, max_size=5, unique=True))
    kinds = {n: data.draw(st.sampled_from(["plain", "text", "bool", "float"])) for n in names}
    optional = {n: data.draw(st.booleans()) for n in names}
    values = {"plain": plain, "text": texts, "bool": st.booleans(), "float": floats}
    dtypes = {"plain": pl.String, "text": pl.String, "bool": pl.Boolean, "float": pl.Float64}
    rows = data.draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    n: st.one_of(st.none(), values[kinds[n]]) if optional[n] else values[kinds[n]]
                    for n in names
                }
            ),
            min_size=1,
            max_size=8,
        )
    )
    columns = {n: f"c{i}" for i, n in enumerate(names)}
    frame = pl.DataFrame(
        {c: [r[n] for r in rows] for n, c in columns.items()},
        schema={c: dtypes[kinds[n]] for n, c in columns.items()},
    )
    members = {n: encode.column_text(frame, c) for n, c in columns.items()}
    present = {n for n, c in columns.items() if frame.get_column(c).null_count() == 0}
    got = frame.select(encode.obj(members, required=present)).to_series().to_list()
    want = [canonical({n: normalised(v) for n, v in r.items() if v is not None}).decode() for r in rows]
    assert got == want


def test_column_text_of_other_dtypes_is_value_text() -> None:
    for series in (
        pl.Series([1, None, -(2**63)], dtype=pl.Int64),
        pl.Series([True, None, False]),
        pl.Series([["a", 'b"'], None], dtype=pl.List(pl.String)),
    ):
        assert column_encoded(series) == expected(series)
