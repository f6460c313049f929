"""Streaming readers and row validation: every kind of bad input, and files that cannot be read at all."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sync.config import Job, load_job
from sync.errors import BadInputError
from sync.planning.planning import build_plan
from sync.records import Operation, RejectedRow, body_json
from sync.sources.reading import ROW, check_sources, expand_paths, iter_chunks

JOB = """
name: t
workdir: work
destination:
  platform: netmera
  base_url: http://127.0.0.1:8080/rest/3.0/
  secret: {{env: NETMERA_API_KEY}}
validation: {{max_id_length: 8, timezone: Etc/GMT-3}}
sources:
  - name: users
    path: {path}
    ext_id: id
{extra}
    attributes:
      n: number
      b: boolean
      d: date
      l: list
      s: string
    opt_ins: {{push: p}}
    email: email
    msisdn: phone
"""
HEADER = "id,n,b,d,l,s,p,email,phone,unused\n"


def _job(
    tmp_path: Path, rows: str | bytes, *, name: str = "users.csv", extra: str = "", header: str = HEADER
) -> Job:
    data = tmp_path / name
    if isinstance(rows, bytes):
        data.write_bytes(rows)
    else:
        data.write_text(header + rows, encoding="utf-8")
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(path=name, extra=extra), encoding="utf-8")
    return load_job(path)


def _plan_rejects(job: Job) -> tuple[dict[int, RejectedRow], list[dict[str, object]]]:
    with build_plan(job) as plan:
        rejects = {r.row: r for r in plan.rejected_rows()}
        assert plan.rejected_count == len(rejects)
        attrs = [b for b in plan.batches() if b.operation is Operation.SET_ATTRIBUTES]
        items = [item for b in attrs for item in body_json(b)]
    return rejects, items


def test_reads_only_the_mapped_columns_with_row_numbers(tmp_path: Path) -> None:
    job = _job(tmp_path, "a,1,true,2020-01-01,x,s,1,a@b.co,+905312345601,zzz\nb,2,,,,,,,,\n")
    source = job.sources[0]
    chunks = list(iter_chunks(source, expand_paths(source)[0]))
    frame = pl.concat([c.frame for c in chunks])
    assert "unused" not in frame.columns
    assert frame[ROW].to_list() == [1, 2]
    assert set(frame.columns) == {*source.columns(), ROW}


def test_value_formats(tmp_path: Path) -> None:
    rows = (
        "a,12,YES,1989-10-14,x|y,hello,1,a@b.co,+90 (531) 234-5601,\n"
        'b,-3.5e1,off,2020-01-02T03:04:05Z,"[""p"", 2]",  padded  ,no,,,\n'
        "c,NULL,f,2020-01-02 03:04,,,,,905312345601,\n"
    )
    rejects, items = _plan_rejects(_job(tmp_path, rows))
    assert rejects == {}
    by_id = {i["extId"]: i["profile"] for i in items}
    # Dates without an offset are midnight in the job's zone (here UTC+3): 624315600000 is Netmera's own sample.
    assert by_id["a"] == {"n": 12, "b": True, "d": 624315600000, "l": ["x", "y"], "s": "hello"}
    assert by_id["b"] == {"n": -35, "b": False, "d": 1577934245000, "l": ["p", "2"], "s": "padded"}
    assert by_id["c"] == {"b": False, "d": 1577923440000}


@pytest.mark.parametrize(
    ("row", "column", "reason"),
    [
        (",1,,,,,,,,", "id", "missing external ID"),
        ("NULL,1,,,,,,,,", "id", "missing external ID"),
        ("abcdefghi,1,,,,,,,,", "id", "longer than 8 characters"),
        ("a,1x,,,,,,,,", "n", "not a number"),
        ("a,inf,,,,,,,,", "n", "not a number"),
        ("a,,maybe,,,,,,,", "b", "not a boolean"),
        ("a,,,14/10/1989,,,,,,", "d", "not an ISO 8601 date"),
        ("a,,,2020-02-30,,,,,,", "d", "not an ISO 8601 date"),
        ('a,,,,"[1, {}]",,,,,', "l", "invalid JSON array"),
        ("a,,,,[oops,,,,,", "l", "invalid JSON array"),
        ("a,,,,,,2,,,", "p", "not a boolean"),
        ("a,,,,,,,not-an-email,,", "email", "not a valid email address"),
        ("a,,,,,,,a@b,,", "email", "not a valid email address"),
        ("a,,,,,,,,1234567,", "phone", "not a valid MSISDN"),
        ("a,,,,,,,,+90531234560123456,", "phone", "not a valid MSISDN"),
        ("a,,,,,,,,phone,", "phone", "not a valid MSISDN"),
    ],
)
def test_each_kind_of_bad_value_is_rejected_and_the_rest_proceed(
    tmp_path: Path, row: str, column: str, reason: str
) -> None:
    rejects, items = _plan_rejects(_job(tmp_path, "ok,1,,,,,,,,\n" + row + "\nok2,2,,,,,,,,\n"))
    assert list(rejects) == [2]
    rejected = rejects[2]
    assert rejected.column == column and reason in rejected.reason
    assert rejected.path == str(tmp_path / "users.csv")
    assert sorted(i["extId"] for i in items) == ["ok", "ok2"]


def test_several_problems_in_one_row_are_all_named(tmp_path: Path) -> None:
    rejects, _ = _plan_rejects(_job(tmp_path, "a,x,maybe,,,,,bad,,\n"))
    assert rejects[1].column == "n"
    assert (
        rejects[1].reason
        == "n: not a number; b: not a boolean (true/false, yes/no, 1/0); email: not a valid email address"
    )


def test_duplicate_ids_last_row_wins(tmp_path: Path) -> None:
    rows = "a,1,,,,,,,,\nb,5,,,,,,,,\na,2,,,,,,,,\nb,5,,,,,,,,\na,3,,,,,,,,\n"
    job = _job(tmp_path, rows)
    with build_plan(job) as plan:
        rejects = list(plan.rejected_rows())
        summary = plan.summary()
        items = {
            i["extId"]: i["profile"]
            for b in plan.batches()
            if b.endpoint == "setProfileAttributes"
            for i in body_json(b)
        }
    assert items == {"a": {"n": 3}, "b": {"n": 5}}
    # Conflicting earlier rows of "a" are reported; the identical duplicate of "b" is dropped quietly.
    assert [(r.row, r.column, r.ext_id) for r in rejects] == [(1, "n", "a"), (3, "n", "a")]
    assert all("superseded by row 5 (last row wins)" in r.reason for r in rejects)
    assert summary.duplicates_dropped == 1


def test_an_invalid_newest_row_holds_its_id(tmp_path: Path) -> None:
    """The newest row of an ID decides: when it was rejected, nothing is sent for the ID (before, its last valid
    row was: data the user has since changed) and the earlier rows are reported as held by it."""
    rejects, items = _plan_rejects(_job(tmp_path, "a,1,,,,,,,,\na,oops,,,,,,,,\nb,2,,,,,,,,\n"))
    # Validation's rejects first, then those of the settling (as for superseded rows).
    assert [(r.row, r.column, r.ext_id, r.reason) for r in rejects.values()] == [
        (2, "n", "a", "not a number"),
        (
            1,
            "id",
            "a",
            "held back: the newest row of this external ID (row 2) was rejected, so none of its rows is sent "
            "(the newest row decides)",
        ),
    ]
    assert items == [{"extId": "b", "profile": {"n": 2}}]


def test_an_invalid_earlier_row_leaves_the_newest_valid_row(tmp_path: Path) -> None:
    rejects, items = _plan_rejects(_job(tmp_path, "a,oops,,,,,,,,\na,1,,,,,,,,\n"))
    assert [(r.row, r.reason) for r in rejects.values()] == [(1, "not a number")]
    assert items == [{"extId": "a", "profile": {"n": 1}}]


def test_malformed_csv_record_is_rejected_and_reading_goes_on(tmp_path: Path) -> None:
    rejects, items = _plan_rejects(_job(tmp_path, "a,1,,,,,,,,\nb,2,too,many,,,,,,,,,,\nc,3,,,,,,,,\n"))
    assert list(rejects) == [2] and "malformed CSV record" in rejects[2].reason
    assert {i["extId"]: i["profile"]["n"] for i in items} == {"a": 1, "c": 3}


def test_other_encodings_with_the_encoding_option(tmp_path: Path) -> None:
    latin = (HEADER + "a,1,,,,Müller,,,,\n").encode("latin-1")
    job = _job(tmp_path, latin, extra="    encoding: latin-1")
    _, items = _plan_rejects(job)
    assert items == [{"extId": "a", "profile": {"n": 1, "s": "Müller"}}]


@pytest.mark.parametrize(("declared", "right"), [("latin-1", "cp1252"), ("iso8859-9", "cp1254")])
def test_a_windows_export_read_as_iso_8859_is_refused_not_sent_with_control_characters(
    tmp_path: Path, declared: str, right: str
) -> None:
    # "Müller’s" from Excel (cp1252: ’ is byte 0x92) under encoding: latin-1 was sent as "Müller\x92s".
    rows = "a,1,,,,Müller,,,,\nb,2,,,,Müller’s,,,,\n"
    job = _job(tmp_path, (HEADER + rows).encode(right), extra=f"    encoding: {declared}")
    with pytest.raises(BadInputError) as info:
        build_plan(job)
    assert (info.value.row, info.value.column) == (2, "s")
    assert "U+0080-U+009F" in str(info.value) and "cp1252" in str(info.value)
    assert not list((tmp_path / "work").glob("plan-*"))
    # Declared as what it is, it is read as it is.
    _, items = _plan_rejects(_job(tmp_path, (HEADER + rows).encode(right), extra=f"    encoding: {right}"))
    assert sorted(i["profile"]["s"] for i in items) == ["Müller", "Müller’s"]


@pytest.mark.parametrize("encoding", ["latin-1", "cp1254"])
def test_a_utf8_byte_order_mark_under_another_encoding_is_refused_not_garbled(
    tmp_path: Path, encoding: str
) -> None:
    # Every byte sequence is Latin-1 text: read so, "Müller" was sent as "MÃ¼ller", without a word.
    utf8 = b"\xef\xbb\xbf" + (HEADER + "a,1,,,,Müller,,,,\n").encode("utf-8")
    job = _job(tmp_path, utf8, extra=f"    encoding: {encoding}")
    with pytest.raises(BadInputError) as info:
        build_plan(job)
    assert "UTF-8 byte-order mark" in str(info.value) and "'encoding: utf-8'" in str(info.value)
    assert str(tmp_path / "users.csv") in str(info.value)
    assert [p.location for p in check_sources(job)] == ["sources[0]"]
    # Declared as what it is, it is read as it is.
    _, items = _plan_rejects(_job(tmp_path, utf8, extra="    encoding: utf-8"))
    assert items == [{"extId": "a", "profile": {"n": 1, "s": "Müller"}}]


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ((HEADER + "a,1,,,,Müller,,,,\n").encode("latin-1"), "users.csv", "cannot decode the file as utf-8"),
        (b"", "users.csv", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "users.csv", "cannot decode"),
        (b"id;n;b\n1;2;3\n", "users.csv", "is the delimiter right?"),
        (b"PAR1\x00\x00garbage", "users.parquet", "not a readable Parquet file"),
    ],
)
def test_unreadable_file_gives_one_clear_error(
    tmp_path: Path, content: bytes, name: str, message: str
) -> None:
    job = _job(tmp_path, content, name=name)
    with pytest.raises(BadInputError) as info:
        build_plan(job)
    assert message in str(info.value)
    assert str(tmp_path / name) in str(info.value)
    assert "Traceback" not in str(info.value)
    assert not list((tmp_path / "work").glob("plan-*"))  # staging cleaned up


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    job = _job(tmp_path, "a,1,,,,,,\n", header="id,n,b,d,l,s,p,email\n")
    with pytest.raises(BadInputError) as info:
        build_plan(job)
    assert info.value.column == "phone"
    assert "'phone'" in str(info.value) and str(tmp_path / "users.csv") in str(info.value)
    assert [p.location for p in check_sources(job)] == ["sources[0]"]


def test_a_missing_column_says_which_name_differs_only_in_case_or_spaces(tmp_path: Path) -> None:
    # "Id " and " email" looked like the names the job maps in the list of the file's columns.
    job = _job(tmp_path, "a,1,,,,,,,,\n", header="Id ,n,b,d,l,s,p, email,phone,unused\n")
    with pytest.raises(BadInputError) as info:
        build_plan(job)
    assert info.value.column == "id"
    assert "the file has 'Id ' for 'id', ' email' for 'email' (names must match exactly" in str(info.value)


def test_a_missing_column_error_cuts_a_huge_column_name(tmp_path: Path) -> None:
    # A file that is not the export: one 300 KB "name" was repeated whole in the message.
    job = _job(tmp_path, "a,1\n", header="ID," + "x" * 300_000 + "\n")
    with pytest.raises(BadInputError) as info:
        build_plan(job)
    assert len(str(info.value)) < 1000
    assert "x" * 59 + "… (300000 characters)" in str(info.value)
    assert "'ID' for 'id'" in str(info.value)


def test_a_wide_export_whose_header_passes_64_kib_is_read(tmp_path: Path) -> None:
    # 6,000 custom fields: a header of ~120 KB, past the 64 KiB the header's reading took, which made it "not a
    # CSV file: it holds no line of text" for validate, plan and run alike.
    extra = [f"custom_field_{i:05d}" for i in range(6000)]
    header = HEADER.strip() + "," + ",".join(extra) + "\n"
    row = "a,1,true,2020-01-01,x,s,1,a@b.co,+905312345601,zzz" + "," * len(extra) + "\n"
    job = _job(tmp_path, row, header=header)
    assert check_sources(job) == []
    rejects, items = _plan_rejects(job)
    assert rejects == {}
    assert [item["extId"] for item in items] == ["a"]


def test_a_long_value_in_the_first_rows_is_read_not_called_larger_than_a_block(tmp_path: Path) -> None:
    # A 200 KB note (unmapped) in row 1 did not fit the header's 64 KiB block: "a record is larger than 1 MiB",
    # the whole file refused, although the reading (1 MiB blocks) takes it.
    job = _job(tmp_path, "a,1,,,,,,,," + "n" * 200_000 + "\nb,2,,,,,,,,\n")
    assert check_sources(job) == []
    rejects, items = _plan_rejects(job)
    assert rejects == {}
    assert sorted(item["extId"] for item in items) == ["a", "b"]


def test_an_id_too_long_for_a_csv_field_is_rejected_and_cut_in_the_rejects_file(tmp_path: Path) -> None:
    # Written whole, a 200,000-character ID made the rejects file unreadable to Python's CSV reader (128 KiB a
    # field): plan.rejected_rows() raised, and pushsync plan ended in an internal error (exit 5).
    job = _job(tmp_path, "U" * 200_000 + ",1,,,,,,,,\nb,x,,,,,,,,\n")
    rejects, _ = _plan_rejects(job)
    assert [(r.row, r.column) for r in rejects.values()] == [(1, "id"), (2, "n")]
    shown = rejects[1].ext_id
    assert shown is not None and shown == "U" * 4096 + "… (200000 characters)"


def test_a_header_longer_than_a_block_is_named_as_such(tmp_path: Path) -> None:
    extra = [f"custom_field_{i:05d}" for i in range(60000)]  # ~1.2 MB on one line
    job = _job(tmp_path, "", header=HEADER.strip() + "," + ",".join(extra) + "\n")
    with pytest.raises(BadInputError) as info:
        build_plan(job)
    assert "the header line is longer than 1 MiB" in str(info.value)
    assert "not a CSV file" not in str(info.value)


def test_truncated_parquet(tmp_path: Path) -> None:
    frame = pl.DataFrame({c: ["1"] * 1000 for c in HEADER.strip().split(",")})
    full = tmp_path / "full.parquet"
    frame.write_parquet(full)
    (tmp_path / "users.parquet").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    job = _job(tmp_path, (tmp_path / "users.parquet").read_bytes(), name="users.parquet")
    with pytest.raises(BadInputError, match="not a readable Parquet file"):
        build_plan(job)


def test_typed_parquet_columns(tmp_path: Path) -> None:
    import datetime as dt

    frame = pl.DataFrame(
        {
            "id": ["a", "b"],
            "n": [7, None],
            "b": [True, False],
            "d": [dt.date(1989, 10, 14), None],
            "l": [["x", "y"], []],
            "s": ["s", None],
            "p": [None, "yes"],
            "email": [None, None],
            "phone": [None, 905312345601],
        }
    )
    frame.write_parquet(tmp_path / "users.parquet")
    job = _job(tmp_path, (tmp_path / "users.parquet").read_bytes(), name="users.parquet")
    rejects, items = _plan_rejects(job)
    assert rejects == {}
    assert {i["extId"]: i["profile"] for i in items} == {
        "a": {"n": 7, "b": True, "d": 624315600000, "l": ["x", "y"], "s": "s"},
        "b": {"b": False},
    }


def _parquet_job(tmp_path: Path, table: pa.Table) -> Job:
    """The job of :data:`JOB` reading ``table`` (its unmapped columns filled with nulls) as users.parquet."""
    columns = {
        c: table[c] if c in table.column_names else pa.nulls(table.num_rows, pa.string())
        for c in HEADER.strip().split(",")
    }
    pq.write_table(pa.table(columns), tmp_path / "users.parquet")
    return _job(tmp_path, (tmp_path / "users.parquet").read_bytes(), name="users.parquet")


def test_a_typed_nan_is_not_a_number_not_no_value(tmp_path: Path) -> None:
    # A NaN of a float column is a value that is not a number, as inf is: rejected, never "no value" (which
    # "NaN", a default null value, would be, and on_null: unset would remove the attribute for).
    scores = pa.array([float("nan"), float("inf"), 1.5, None], pa.float64())
    rejects, items = _plan_rejects(
        _parquet_job(tmp_path, pa.table({"id": ["a", "b", "c", "d"], "n": scores}))
    )
    assert {r.row: (r.column, r.reason) for r in rejects.values()} == {
        1: ("n", "not a number"),
        2: ("n", "not a number"),
    }
    assert sorted(i["extId"] for i in items) == ["c"]
    # The text NaN in a CSV file is still a null value, as docs/jobs.md says.
    rejects, items = _plan_rejects(_job(tmp_path, "a,NaN,,,,,,,,\nb,nan,,,,,,,,\n"))
    assert [(r.row, r.reason) for r in rejects.values()] == [(2, "not a number")]


def test_a_nan_list_item_is_not_a_number_as_a_nan_value_is(tmp_path: Path) -> None:
    # A list of floats: a NaN or infinite item rejects its row ("NaN" was sent as an item); a null item is no
    # item, as ever.
    items = pa.array(
        [[1.5, float("nan")], [2.0, None], [float("-inf")], None, [0.25]], pa.list_(pa.float64())
    )
    rejects, sent = _plan_rejects(_parquet_job(tmp_path, pa.table({"id": list("abcde"), "l": items})))
    reason = "a list item is not a number (NaN or infinite)"
    assert {r.row: (r.column, r.reason) for r in rejects.values()} == {1: ("l", reason), 3: ("l", reason)}
    assert {i["extId"]: i["profile"] for i in sent} == {"b": {"l": ["2.0"]}, "e": {"l": ["0.25"]}}


def test_a_nan_in_a_float_column_mapped_as_a_string_is_not_sent_as_text(tmp_path: Path) -> None:
    # A float column mapped as a string: a NaN or infinite value was sent as the text "nan" or "-inf". It is a
    # value that is not a number, refused as it is where the column is mapped as a number; a null is no value.
    reason = "not a number (NaN or infinite), in a float column mapped as a string"
    values = pa.array([float("nan"), 2.5, float("-inf"), None], pa.float64())
    rejects, items = _plan_rejects(_parquet_job(tmp_path, pa.table({"id": list("abcd"), "s": values})))
    assert {r.row: (r.column, r.reason) for r in rejects.values()} == {1: ("s", reason), 3: ("s", reason)}
    assert {i["extId"]: i["profile"] for i in items} == {"b": {"s": "2.5"}}
    # A float32 column alike (its text is float32's shortest: 0.1, not 0.10000000149011612).
    values = pa.array([float("inf"), 0.1, float("nan")], pa.float32())
    rejects, items = _plan_rejects(_parquet_job(tmp_path, pa.table({"id": list("abc"), "s": values})))
    assert {r.row: (r.column, r.reason) for r in rejects.values()} == {1: ("s", reason), 3: ("s", reason)}
    assert {i["extId"]: i["profile"] for i in items} == {"b": {"s": "0.1"}}
    # The text "nan" in a CSV file is text, sent as it is to a string attribute ("NaN" is a null value).
    rejects, items = _plan_rejects(_job(tmp_path, "a,,,,,nan,,,,\nb,,,,,inf,,,,\n"))
    assert rejects == {}
    assert {i["extId"]: i["profile"] for i in items} == {"a": {"s": "nan"}, "b": {"s": "inf"}}


def test_a_typed_integer_past_2_53_is_refused_not_rounded(tmp_path: Path) -> None:
    # An int64 column mapped as a number: 9007199254740993 would be sent as ...992 (a float64).
    values = pa.array([9007199254740993, 9007199254740992, -(2**62) - 1, 7], pa.int64())
    rejects, sent = _plan_rejects(_parquet_job(tmp_path, pa.table({"id": list("abcd"), "n": values})))
    assert {r.row: r.column for r in rejects.values()} == {1: "n", 3: "n"}
    assert all("loses precision" in r.reason for r in rejects.values())
    assert {i["extId"]: i["profile"]["n"] for i in sent} == {"b": 2**53, "d": 7}


def test_a_typed_decimal_past_2_53_is_refused_not_rounded(tmp_path: Path) -> None:
    # A decimal128(38, 2) column mapped as a number: 123456789012345678.90 would be sent without its cents.
    import decimal

    values = pa.array(
        [decimal.Decimal("123456789012345678.90"), decimal.Decimal("1.50"), decimal.Decimal("1e20")],
        pa.decimal128(38, 2),
    )
    rejects, sent = _plan_rejects(_parquet_job(tmp_path, pa.table({"id": list("abc"), "n": values})))
    assert {r.row: r.column for r in rejects.values()} == {1: "n"}
    assert all("loses precision" in r.reason for r in rejects.values())
    assert {i["extId"]: i["profile"]["n"] for i in sent} == {"b": 1.5, "c": 1e20}


def test_control_characters_in_an_id_are_escaped_where_people_read_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The ID is refused (a control character); the rejects file and `pushsync plan` show it escaped, never raw.
    job = _job(tmp_path, 'U7\x00,1,,,,,,,,\n"U8\x1b[2J",2,,,,,,,,\nok,3,,,,,,,,\n')
    with build_plan(job) as plan:
        shown = [(r.row, r.ext_id) for r in plan.rejected_rows()]
        rejects_file = plan.rejects_path.read_bytes()
    assert shown == [(1, "U7\\x00"), (2, "U8\\x1b[2J")]
    assert b"\x00" not in rejects_file and b"\x1b" not in rejects_file
    assert b"U7\\x00" in rejects_file
    from sync.cli import main

    assert main(["plan", str(tmp_path / "job.yaml")]) == 0
    out = capsys.readouterr().out
    assert "(ext_id U7\\x00)" in out and "\x00" not in out and "\x1b" not in out


def test_a_message_escapes_the_control_characters_of_a_header() -> None:
    # The message shown escapes them; the error's fields keep the text as it is, for code that matches it.
    error = BadInputError("a\nb.csv", "column 'x\x00' is odd", column="x\x00")
    assert str(error) == "a\\nb.csv, column 'x\\x00': column 'x\\x00' is odd"
    assert (error.path, error.column) == ("a\nb.csv", "x\x00")


def test_decimal256_columns_read_as_decimal128_ones(tmp_path: Path) -> None:
    # polars cannot take a decimal256 column from Arrow (a Rust panic): pushsync reads it as its exact text.
    values = [Decimal("1.50"), Decimal("-1234567890123.25"), None]
    texts = [Decimal("7.00"), None, Decimal("2")]

    def plan(decimal: Callable[[int, int], pa.DataType]) -> list[dict[str, object]]:
        table = pa.table(
            {
                "id": ["a", "b", "c"],
                "n": pa.array(values, decimal(38, 2)),
                "s": pa.array(texts, decimal(38, 2)),
            }
        )
        rejects, items = _plan_rejects(_parquet_job(tmp_path, table))
        assert rejects == {}
        return sorted(items, key=lambda i: str(i["extId"]))

    wide = plan(pa.decimal256)
    assert wide == plan(pa.decimal128)
    assert wide[0] == {"extId": "a", "profile": {"n": 1.5, "s": "7.00"}}


def test_duplicate_parquet_column_names_are_refused_as_in_csv(tmp_path: Path) -> None:
    table = pa.table([pa.array(["a"]), pa.array(["1"]), pa.array(["2"])], names=["id", "n", "n"])
    pq.write_table(table, tmp_path / "users.parquet")
    job = _job(tmp_path, (tmp_path / "users.parquet").read_bytes(), name="users.parquet")
    message = f"{tmp_path / 'users.parquet'}: duplicate column name(s) in the header: n"
    with pytest.raises(BadInputError) as info:
        build_plan(job)
    assert str(info.value) == message
    assert [str(p) for p in check_sources(job)] == [f"sources[0]: {message}"]


def test_globs_are_read_in_path_order(tmp_path: Path) -> None:
    (tmp_path / "part-2.csv").write_text(HEADER + "a,2,,,,,,,,\n", encoding="utf-8")
    (tmp_path / "part-1.csv").write_text(HEADER + "a,1,,,,,,,,\n", encoding="utf-8")
    job = _job(tmp_path, HEADER, name="unused.csv")
    job.path.write_text(JOB.format(path="part-*.csv", extra=""), encoding="utf-8")
    job = load_job(job.path)
    rejects, items = _plan_rejects(job)
    assert items == [{"extId": "a", "profile": {"n": 2}}]
    assert rejects[1].path == str(tmp_path / "part-1.csv")
    assert "superseded by row 1 of " + str(tmp_path / "part-2.csv") in rejects[1].reason


def test_a_compressed_csv_is_estimated_by_its_text_not_its_file_size(tmp_path: Path) -> None:
    # The row estimate (a plan's staging: chunks kept in memory, a lazy run's first batches) counts a CSV file's
    # text at 128 bytes a row. A users.csv.gz was counted by its compressed size: a third of its rows here.
    import gzip
    import random

    from sync.sources.reading import estimate_rows

    rng = random.Random(7)
    header = "id,first_name,score,email,city,segments,joined\n"
    lines = [
        f"C{i:08d},Name{rng.randint(0, 9999)},{rng.random():.4f},user{i}@example.com,"
        f"City{rng.randint(0, 500)},{rng.choice(['gold', 'silver', 'vip'])}|{rng.choice(['a', 'b'])},"
        f"20{rng.randint(10, 24)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}\n"
        for i in range(120_000)
    ]
    text = (header + "".join(lines)).encode()
    assert len(text) > 2 * (4 << 20)  # past the sample the ratio is measured on
    plain = tmp_path / "export.csv"
    plain.write_bytes(text)
    packed = tmp_path / "export.csv.gz"
    packed.write_bytes(gzip.compress(text, compresslevel=1))  # gzip -1: quick to write, 3.4 times smaller
    assert packed.stat().st_size * 3 < len(text)
    job = _job(tmp_path, HEADER)
    source = job.sources[0]
    expected = estimate_rows(source, [plain])
    assert len(lines) / 2 < expected < len(lines) * 2  # ~74 bytes a row here, counted as 128
    estimated = estimate_rows(source, [packed])
    assert abs(estimated - expected) < expected / 10, (estimated, expected)
    assert len(lines) / 2 < estimated < len(lines) * 2
    # Other codecs pyarrow's reader takes by name; a file shorter than the sample is measured whole; one that is
    # not what its name says counts by its size (the reader reports it).
    small = text[: 1 << 20]
    for name, codec in (("export.csv.zst", "zstd"), ("small.csv.gz", "gzip"), ("small.csv.bz2", "bz2")):
        data = text if codec == "zstd" else small
        with pa.OSFile(str(tmp_path / name), "wb") as raw, pa.CompressedOutputStream(raw, codec) as out:
            out.write(data)
        got = estimate_rows(source, [tmp_path / name])
        assert abs(got - len(data) // 128) < len(data) // 1280, (name, got)
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(b"\x1f\x8b" + b"x" * 1000)
    assert estimate_rows(source, [broken]) == 1002 // 128


def test_missing_files_are_reported(tmp_path: Path) -> None:
    job = _job(tmp_path, "a,1,,,,,,,,\n")
    (tmp_path / "users.csv").unlink()
    with pytest.raises(BadInputError, match="file not found"):
        build_plan(job)
    assert "file not found" in check_sources(job)[0].message


_MALFORMED_LAST = HEADER + "a,1,,,,,,,,\nb,2,too,many,,,,,,,,,,\nc,3,,,,,,,,\n" + "x,few\n" * 3
_MALFORMED_OVER_TWO_LINES = HEADER + 'a,1,,,,"two\nlines",,,,,extra\nb,2,,,,,,,,\n'


@pytest.mark.parametrize(
    ("content", "malformed"),
    [
        (_MALFORMED_LAST, 4),  # malformed records, the last ones too
        (_MALFORMED_OVER_TWO_LINES, 1),
        (HEADER, 0),  # a header and no rows
        (HEADER.rstrip("\n"), 0),  # a header without a line break
    ],
)
def test_a_spilled_csv_file_reads_back_as_it_was_parsed(
    tmp_path: Path, content: str, malformed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a lazy plan's staging reads instead of parsing a CSV file again: the same chunks — frames, row numbers,
    # malformed records — as the parsing gave, chunk for chunk.
    import sync.sources.reading as reading

    monkeypatch.setattr(reading, "CHUNK_ROWS", 2)  # several chunks out of a few rows
    job = _job(tmp_path, content.encode())  # the file exactly as given (text rows get the header added)
    source, path = job.sources[0], tmp_path / "users.csv"
    parsed = list(iter_chunks(source, path))
    assert sum(len(c.malformed) for c in parsed) == malformed
    spill = reading.Spill(tmp_path / "spill" / "0.arrow", ROW)
    assert [(c.frame.to_dicts(), c.malformed) for c in iter_chunks(source, path, spill=spill)] == [
        (c.frame.to_dicts(), c.malformed) for c in parsed
    ]
    back = list(reading.spilled_chunks(source, spill))
    assert len(back) == len(parsed)
    for chunk, expected in zip(back, parsed, strict=True):
        assert chunk.frame.schema == expected.frame.schema
        assert chunk.frame.equals(expected.frame) and chunk.malformed == expected.malformed
    assert not list(tmp_path.glob("spill/*"))  # read once, then removed


def test_a_spilling_reading_parses_the_next_chunk_on_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lazy plan's head reads a CSV file with a spill, on the way to the first request: the next chunk is parsed
    # on a worker thread while the current one is spilled and selected (pyarrow parses without the GIL). Any
    # other reading parses in the caller's thread. Stopping early waits for the chunk under way.
    import threading

    import sync.sources.reading as reading

    monkeypatch.setattr(reading, "CSV_BLOCK_BYTES", 1 << 10)  # several blocks, each a chunk
    monkeypatch.setattr(reading, "CHUNK_ROWS", 2)
    rows = "".join(f"u{i},{i},,,,,,,,\n" if i % 50 else "x,few\n" for i in range(400))
    job = _job(tmp_path, rows)
    source, path = job.sources[0], tmp_path / "users.csv"
    threads: list[str] = []
    real = reading._coalesced

    def coalesced(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for table in real(*args, **kwargs):
            threads.append(threading.current_thread().name)
            yield table

    monkeypatch.setattr(reading, "_coalesced", coalesced)
    parsed = list(iter_chunks(source, path))
    assert len(parsed) > 2 and set(threads) == {threading.current_thread().name}
    threads.clear()
    spill = reading.Spill(tmp_path / "spill" / "0.arrow", ROW)
    chunks = iter_chunks(source, path, spill=spill)
    first = next(chunks)
    assert first.frame.equals(parsed[0].frame) and first.malformed == parsed[0].malformed
    chunks.close()  # the second chunk was being parsed meanwhile
    spill.discard()
    assert threads and all(name.startswith("pushsync-csv") for name in threads)
