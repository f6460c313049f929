"""sync.ledger.exporting: incremental Parquet/CSV writing (bounded row groups, all-or-nothing files), ID files, progress."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from structlog.testing import capture_logs

from sync.errors import BadInputError, PlatformError
from sync.ledger.exporting import (
    ExportFormat,
    LogExportProgress,
    RowWriter,
    format_for,
    iter_id_chunks,
    write_pages,
)

SCHEMA = pa.schema([("token", pa.string()), ("n", pa.int64()), ("ok", pa.bool_())])


@dataclass(frozen=True)
class P:
    rows: list[dict[str, Any]]
    total: int | None = None


async def pages(n_pages: int, size: int, *, fail_at: int | None = None) -> AsyncIterator[P]:
    for p in range(n_pages):
        if p == fail_at:
            raise RuntimeError("the platform went away")
        yield P(
            [{"token": f"t{p * size + i}", "n": p * size + i, "ok": i % 2 == 0} for i in range(size)],
            n_pages * size,
        )


def _partials(folder: Path) -> list[Path]:
    return list(folder.glob("*.partial"))


class Seen:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int | None]] = []
        self.closed = False

    def on_rows(self, written: int, total: int | None) -> None:
        self.calls.append((written, total))

    def close(self, *, completed: bool = True) -> None:
        self.closed = True
        self.completed = completed


@pytest.mark.parametrize("fmt", list(ExportFormat))
async def test_pages_are_written_in_order_with_progress(tmp_path: Path, fmt: ExportFormat) -> None:
    out = tmp_path / f"devices.{fmt.value}"
    seen = Seen()
    result = await write_pages(pages(7, 1000), out, SCHEMA, fmt, progress=seen, row_group_rows=2500)
    assert (result.rows, result.pages, result.format) == (7000, 7, fmt)
    frame = pl.read_parquet(out) if fmt is ExportFormat.PARQUET else pl.read_csv(out)
    assert frame["token"].to_list() == [f"t{i}" for i in range(7000)]
    assert frame["ok"].to_list()[:3] == [True, False, True]
    assert seen.calls == [(1000 * (i + 1), 7000) for i in range(7)] and seen.closed
    assert not _partials(tmp_path)


async def test_row_groups_are_bounded_so_memory_is(tmp_path: Path) -> None:
    out = tmp_path / "big.parquet"
    await write_pages(pages(20, 1000), out, SCHEMA, ExportFormat.PARQUET, row_group_rows=3000)
    meta = pq.ParquetFile(out).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(sizes) == 20_000 and max(sizes) == 3000  # never more than one group buffered


async def test_a_failed_export_leaves_no_file_behind(tmp_path: Path) -> None:
    out = tmp_path / "half.parquet"
    out.write_bytes(b"an older export")
    with pytest.raises(RuntimeError):
        await write_pages(pages(5, 100, fail_at=3), out, SCHEMA, ExportFormat.PARQUET)
    assert out.read_bytes() == b"an older export"  # the previous file is untouched
    assert not _partials(tmp_path)


def test_row_writer_refuses_rows_that_do_not_fit_the_schema(tmp_path: Path) -> None:
    with (
        pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)),
        RowWriter(tmp_path / "x.csv", SCHEMA, ExportFormat.CSV) as w,
    ):
        w.write([{"token": "a", "n": "not a number", "ok": True}])
    assert not (tmp_path / "x.csv").exists()


async def test_an_export_through_a_symlink_writes_the_linked_file_and_a_fifo_is_refused(
    tmp_path: Path,
) -> None:
    link = tmp_path / "devices.csv"
    link.symlink_to("real.csv")
    await write_pages(pages(2, 10), link, SCHEMA, ExportFormat.CSV)
    assert link.is_symlink() and pl.read_csv(tmp_path / "real.csv").height == 20
    os.mkfifo(tmp_path / "fifo.csv")
    with pytest.raises(BadInputError, match="exists and is not a regular file"):
        await write_pages(pages(2, 10), tmp_path / "fifo.csv", SCHEMA, ExportFormat.CSV)
    assert (tmp_path / "fifo.csv").is_fifo() and not _partials(tmp_path)


def test_format_follows_the_file_name_unless_declared() -> None:
    assert format_for(Path("a.csv")) is ExportFormat.CSV
    assert format_for(Path("a.parquet")) is ExportFormat.PARQUET
    assert format_for(Path("a.out")) is ExportFormat.PARQUET
    assert format_for(Path("a.parquet"), "csv") is ExportFormat.CSV


def test_ids_from_csv_parquet_and_text_in_chunks_without_repeats(tmp_path: Path) -> None:
    ids = [f"u{i}" for i in range(2500)] + ["u1", "", "u2"]
    csv = tmp_path / "ids.csv"
    pl.DataFrame({"name": ["x"] * len(ids), "customer": ids}).write_csv(csv)
    parquet = tmp_path / "ids.parquet"
    pl.DataFrame({"extId": ids}).write_parquet(parquet)
    text = tmp_path / "ids.txt"
    text.write_text("\n".join(ids) + "\n")
    for path, column in ((csv, "customer"), (parquet, None), (text, None)):
        chunks = list(iter_id_chunks(path, column, chunk=1000))
        assert [len(c) for c in chunks] == [1000, 1000, 500]
        assert [x for c in chunks for x in c] == [f"u{i}" for i in range(2500)]
    assert next(iter_id_chunks(csv, None))[0] == "x"  # no extId column: the first one
    with pytest.raises(BadInputError) as info:
        list(iter_id_chunks(csv, "nope"))
    assert "customer" in str(info.value) and info.value.column == "nope"
    with pytest.raises(BadInputError):
        list(iter_id_chunks(tmp_path / "missing.txt"))


def test_log_progress_lines_are_spaced_and_end_with_a_summary() -> None:
    now = [0.0]
    progress = LogExportProgress("device tokens", every=5, clock=lambda: now[0])
    with capture_logs() as logs:
        for i in range(1, 21):
            now[0] = float(i)
            progress.on_rows(i * 100, 2000)
        progress.close()
    events = [(e["event"], e["rows"]) for e in logs]
    assert events == [
        ("export.progress", 500),
        ("export.progress", 1000),
        ("export.progress", 1500),
        ("export.progress", 2000),
        ("export.done", 2000),
    ]
    assert logs[-1]["rows_per_second"] == 100.0


async def test_a_page_whose_values_do_not_fit_the_columns_is_a_platform_error_naming_the_column(
    tmp_path: Path,
) -> None:
    async def odd() -> AsyncIterator[P]:
        yield P([{"token": "t0", "n": 0, "ok": True}])
        yield P([{"token": "t1", "n": 1, "ok": True}, {"token": 12345, "n": 2**70, "ok": "yes"}])

    out = tmp_path / "odd.csv"
    with pytest.raises(PlatformError, match=r"page 2: .* 12345 \(int\) for the column 'token'") as caught:
        await write_pages(odd(), out, SCHEMA, ExportFormat.CSV)
    assert caught.value.exit_code == 3
    assert not out.exists() and not _partials(tmp_path)


async def test_a_failed_export_logs_stopped_not_done(tmp_path: Path) -> None:
    # A failed or interrupted export logged "export.done" (rows so far, info) after its file was removed:
    # a scheduler's log said done for an export that wrote nothing.
    with capture_logs() as logs, pytest.raises(RuntimeError):
        await write_pages(
            pages(5, 100, fail_at=3),
            tmp_path / "x.csv",
            SCHEMA,
            ExportFormat.CSV,
            progress=LogExportProgress("t"),
        )
    assert [(e["event"], e["log_level"], e["rows"]) for e in logs] == [("export.stopped", "warning", 300)]
    assert logs[0]["written"] is False
    with capture_logs() as logs:
        await write_pages(
            pages(2, 10), tmp_path / "x.csv", SCHEMA, ExportFormat.CSV, progress=LogExportProgress("t")
        )
    assert [(e["event"], e["rows"]) for e in logs] == [("export.done", 20)]


def test_a_name_that_says_compressed_needs_a_declared_format() -> None:
    # "tokens.csv.gz" got a Parquet file (the summary said "parquet" in passing; zcat failed on it).
    with pytest.raises(BadInputError, match=r"tokens\.csv\.gz: the name says compressed \(\.gz\)"):
        format_for(Path("tokens.csv.gz"))
    with pytest.raises(BadInputError, match="the name says compressed"):
        format_for(Path("tokens.ZST"))
    assert format_for(Path("tokens.csv.gz"), "parquet") is ExportFormat.PARQUET
    assert format_for(Path("crm.csv.parquet")) is ExportFormat.PARQUET  # the last suffix decides
    assert format_for(Path("v1.2.csv")) is ExportFormat.CSV


async def test_an_export_written_again_keeps_the_permissions_of_the_file_it_replaces(tmp_path: Path) -> None:
    # The file was renamed over with the umask's mode: a private export (chmod 600, e-mails and phone numbers)
    # came back readable by everyone (644) when written again.
    out = tmp_path / "users.csv"
    out.write_text("an older export")
    out.chmod(0o600)
    await write_pages(pages(2, 10), out, SCHEMA, ExportFormat.CSV)
    assert pl.read_csv(out).height == 20 and (out.stat().st_mode & 0o777) == 0o600
    fresh = tmp_path / "fresh.parquet"
    old_umask = os.umask(0o027)
    try:
        await write_pages(pages(1, 10), fresh, SCHEMA, ExportFormat.PARQUET)
    finally:
        os.umask(old_umask)
    assert (fresh.stat().st_mode & 0o777) == 0o640  # a new file: the umask's


def test_two_exports_to_one_file_at_once_each_write_a_whole_file_of_their_own(tmp_path: Path) -> None:
    # Both wrote into one shared "<name>.partial": the first to finish renamed it into place while the other
    # still wrote into it (seen with two CLI exports: one said "wrote 2 device tokens", exit 0, and the file held
    # 236,002 rows of both), and the other then failed "No such file or directory".
    out = tmp_path / "tokens.csv"
    with RowWriter(out, SCHEMA, ExportFormat.CSV) as slow:
        slow.write([{"token": "slow-1", "n": 1, "ok": True}])
        with RowWriter(out, SCHEMA, ExportFormat.CSV, row_group_rows=1) as quick:
            quick.write([{"token": "quick", "n": 0, "ok": False}])
        assert pl.read_csv(out)["token"].to_list() == ["quick"]
        slow.write([{"token": "slow-2", "n": 2, "ok": True}])
    assert pl.read_csv(out)["token"].to_list() == ["slow-1", "slow-2"]
    assert not _partials(tmp_path)
