"""Parquet reading by polars' own reader: the chunks equal pyarrow's reading (the reference, which also reports
what is wrong with a file), whatever the types, values, row groups and row selection; a file polars cannot read
part of is read by pyarrow from the first row not yet given."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync.config import Source, load_job
from sync.errors import BadInputError
from sync.sources import reading
from sync.sources.reading import PARQUET_BATCH_ROWS, ROW, iter_chunks

JOB = """
name: t
workdir: work
destination:
  platform: netmera
  base_url: http://127.0.0.1:8080/rest/3.0/
  secret: {{env: NETMERA_API_KEY}}
sources:
  - name: users
    path: {path}
    format: parquet
    ext_id: id
    attributes:
{attributes}
"""


def _source(tmp_path: Path, name: str, columns: dict[str, str]) -> Source:
    attributes = "\n".join(f"      {c}: {kind}" for c, kind in columns.items())
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(path=name, attributes=attributes), encoding="utf-8")
    return load_job(path).sources[0]


def _reference(source: Source, path: Path, keep: reading.RowSelector | None = None) -> pl.DataFrame:
    """The file's chunks as pyarrow's reading gives them, in one frame."""
    chunks = reading._arrow_parquet_chunks(source, path, list(source.columns()), keep)
    return pl.concat([c.frame for c in chunks])


def _read(source: Source, path: Path, keep: reading.RowSelector | None = None) -> pl.DataFrame:
    return pl.concat([c.frame for c in iter_chunks(source, path, keep=keep)])


def _every_third(ids: object, rows: pl.Series) -> pl.Series:
    return rows % 3 == 0


def test_a_large_file_in_row_groups_reads_as_pyarrow_reads_it(tmp_path: Path) -> None:
    rows = 2 * PARQUET_BATCH_ROWS + 1234
    frame = pl.DataFrame({"i": pl.int_range(rows, eager=True)}).select(
        pl.format("u{}", pl.col("i")).alias("id"),
        pl.when(pl.col("i") % 7 == 0).then(None).otherwise(pl.col("i") * 3).alias("n"),
        (pl.col("i") % 2 == 0).alias("b"),
        pl.format("  name {} \u00a0", pl.col("i")).alias("s"),
        pl.concat_list(pl.col("i").cast(pl.String), pl.lit("x")).alias("l"),
    )
    path = tmp_path / "users.parquet"
    # Row groups that do not line up with the chunks.
    pq.write_table(frame.to_arrow(), path, row_group_size=PARQUET_BATCH_ROWS // 3 + 17)
    source = _source(tmp_path, "users.parquet", {"n": "number", "b": "boolean", "s": "string", "l": "list"})
    assert reading._polars_reads(path, list(source.columns()))
    got = _read(source, path)
    assert got.height == rows
    assert got.equals(_reference(source, path))
    assert got[ROW].to_list() == list(range(1, rows + 1))
    kept = _read(source, path, keep=_every_third)
    assert kept.equals(_reference(source, path, keep=_every_third))
    assert kept[ROW].to_list() == list(range(3, rows + 1, 3))


_TYPES: dict[str, tuple[pa.DataType, st.SearchStrategy[object]]] = {
    "string": (pa.string(), st.text()),
    "large_string": (pa.large_string(), st.text()),
    "int64": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "int8": (pa.int8(), st.integers(-128, 127)),
    "uint64": (pa.uint64(), st.integers(0, 2**64 - 1)),
    "float64": (pa.float64(), st.floats(allow_nan=True, allow_infinity=True)),
    "float32": (pa.float32(), st.floats(width=32)),
    "bool": (pa.bool_(), st.booleans()),
    "date32": (pa.date32(), st.dates(dt.date(1, 1, 1), dt.date(9999, 12, 31))),
    "list_string": (pa.list_(pa.string()), st.lists(st.one_of(st.none(), st.text()), max_size=4)),
    "list_int": (pa.large_list(pa.int32()), st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4)),
}


def _drawn(data: st.DataObject, kind: str) -> tuple[pa.DataType, list[object]]:
    """A column of type ``kind`` (:data:`_TYPES`): its Arrow type and 1-20 values, nulls among them."""
    dtype, values = _TYPES[kind]
    return dtype, data.draw(st.lists(st.one_of(st.none(), values), min_size=1, max_size=20))


def _users_file(tmp_path: Path, ids: pa.Array, values: pa.Array, row_group: int) -> Path:
    """``users.parquet`` in ``tmp_path``: columns ``id`` and ``v``, in row groups of ``row_group`` rows."""
    path = tmp_path / "users.parquet"
    pq.write_table(pa.table({"id": ids, "v": values}), path, row_group_size=row_group)
    return path


def _drawn_files(kinds: list[str], examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A property test over files drawn by it: a column ``kind`` (one of ``kinds``, values by :func:`_drawn`
    from ``data``) in row groups of ``row_group`` (1-7) rows."""
    return lambda test: settings(
        max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )(given(kind=st.sampled_from(kinds), data=st.data(), row_group=st.integers(1, 7))(test))


@_drawn_files(sorted(_TYPES), examples=60)
def test_any_plain_column_reads_as_pyarrow_reads_it(
    tmp_path: Path, kind: str, data: st.DataObject, row_group: int
) -> None:
    dtype, column = _drawn(data, kind)
    ids = [f"u{i}" for i in range(len(column))]
    path = _users_file(tmp_path, pa.array(ids), pa.array(column, dtype), row_group)
    source = _source(tmp_path, "users.parquet", {"v": "list" if kind.startswith("list") else "string"})
    assert reading._polars_reads(path, list(source.columns()))
    assert _read(source, path).equals(_reference(source, path))


def test_a_file_named_with_glob_characters_is_read_as_one_file(tmp_path: Path) -> None:
    frame = pl.DataFrame({"id": ["a", "b"], "v": ["1", "2"]})
    frame.write_parquet(tmp_path / "users[1].parquet")
    frame.with_columns(pl.lit("other").alias("v")).write_parquet(tmp_path / "users1.parquet")
    path = tmp_path / "users[1].parquet"
    got = pl.concat(list(reading._polars_slices(path, ["id", "v"])))
    assert got.equals(frame)


def test_a_half_float_column_is_read_by_pyarrow(tmp_path: Path) -> None:
    # Each reader widens float16 its own way: such a column is left to pyarrow's reading.
    path = tmp_path / "users.parquet"
    pq.write_table(
        pa.table({"id": pa.array(["a"]), "v": pa.array([1.5], pa.float16())}), path, store_schema=True
    )
    assert not reading._polars_reads(path, ["id", "v"])
    assert reading._polars_reads(path, ["id"])


def _damaged_in_second_row_group(tmp_path: Path, rows: int, row_group: int) -> Path:
    """``users.parquet`` (``id`` = ``user-00000000``…, ``v``; uncompressed, in row groups of ``row_group`` rows)
    with the start of its second row group's ID column (its first page) damaged."""
    frame = pl.DataFrame({"id": [f"user-{i:08d}" for i in range(rows)], "v": [f"v{i}" for i in range(rows)]})
    path = tmp_path / "users.parquet"
    pq.write_table(frame.to_arrow(), path, row_group_size=row_group, compression="none")
    data = bytearray(path.read_bytes())
    second = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = second.data_page_offset + 40
    for i in range(start, start + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_damage_after_the_first_chunks_is_reported_by_pyarrow_after_the_rows_before_it(
    tmp_path: Path,
) -> None:
    path = _damaged_in_second_row_group(tmp_path, PARQUET_BATCH_ROWS + 5000, PARQUET_BATCH_ROWS)
    source = _source(tmp_path, "users.parquet", {"v": "string"})
    given: list[pl.DataFrame] = []
    with pytest.raises(BadInputError, match=r"users\.parquet") as raised:
        for chunk in iter_chunks(source, path):
            given.append(chunk.frame)
    reference: list[pl.DataFrame] = []
    with pytest.raises(BadInputError) as expected:
        for chunk in reading._arrow_parquet_chunks(source, path, list(source.columns())):
            reference.append(chunk.frame)
    assert str(raised.value) == str(expected.value)
    assert pl.concat(given).equals(pl.concat(reference))
    assert pl.concat(given)[ROW].to_list() == list(range(1, PARQUET_BATCH_ROWS + 1))


def _ids_by_pyarrow(source: Source, path: Path) -> pl.Series:
    return _reference(source, path)[source.ext_id]


@_drawn_files(["string", "large_string", "int64", "int8", "uint64"], examples=40)
def test_the_ids_read_alone_are_the_ids_pyarrows_reading_gives(
    tmp_path: Path, kind: str, data: st.DataObject, row_group: int
) -> None:
    # read_ids (a lazy run's head picks its rows by them) reads the ID column by polars' reader: the same IDs,
    # one row group at a time, as pyarrow's reading of the whole file gives them.
    dtype, ids = _drawn(data, kind)
    path = _users_file(tmp_path, pa.array(ids, dtype), pa.array([str(i) for i in range(len(ids))]), row_group)
    source = _source(tmp_path, "users.parquet", {"v": "string"})
    groups = reading.read_ids(source, path)
    assert groups is not None
    got = list(groups)
    assert [len(g) for g in got] == [min(row_group, len(ids) - i) for i in range(0, len(ids), row_group)]
    assert pl.concat(got).equals(_ids_by_pyarrow(source, path))


def test_the_ids_of_a_plain_file_are_read_without_pyarrows_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pyarrow's reading of the ID column, its full validation and conversion cost ~0.25 CPU-s per 1M IDs on the
    # way to a lazy run's first request; polars' reader a fifth of it.
    path = tmp_path / "users.parquet"
    frame = pl.DataFrame({"id": [f"user-{i}" for i in range(3000)], "v": ["x"] * 3000})
    pq.write_table(frame.to_arrow(), path, row_group_size=1000)
    source = _source(tmp_path, "users.parquet", {"v": "string"})

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("pyarrow read a row group")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", refused)
    groups = reading.read_ids(source, path)
    assert groups is not None
    assert pl.concat(list(groups)).to_list() == frame["id"].to_list()


def test_damaged_ids_are_reported_by_pyarrow_after_the_row_groups_before_them(tmp_path: Path) -> None:
    path = _damaged_in_second_row_group(tmp_path, 3000, 1000)
    source = _source(tmp_path, "users.parquet", {"v": "string"})
    given: list[pl.Series] = []
    groups = reading.read_ids(source, path)
    assert groups is not None
    with pytest.raises(BadInputError, match=r"users\.parquet") as raised:
        for group in groups:
            given.append(group)
    with pytest.raises(BadInputError) as expected:
        list(reading._arrow_parquet_chunks(source, path, list(source.columns())))
    assert str(raised.value) == str(expected.value)
    assert [len(g) for g in given] == [1000]
    assert given[0].to_list() == [f"user-{i:08d}" for i in range(1000)]
