"""A CSV file's chunks as parsed, kept on disk so that a second pass over the file does not parse it again.

A lazy plan (:func:`sync.planning.build_plan` with ``lazy=True``) reads every row of a CSV file twice: first for
its *head* (the rows of the lowest keys, which can be anywhere in the file), then to stage it all. Parsing is
most of what reading CSV costs, so the first pass writes what it parsed — the mapped columns as Arrow, the row
numbers, the malformed records — chunk by chunk to uncompressed Arrow IPC streams in the plan's staging
directory (:class:`Spill`), and the second pass reads that back: the same chunks, without parsing anything.
Memory stays bounded by one chunk either way; the disk holds about the mapped columns' text until the second
pass has read them (the files are removed then).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc

from sync.records import RejectedRow

__all__ = ["Spill"]

_MALFORMED = pa.schema(
    [
        ("path", pa.string()),
        ("row", pa.int64()),
        ("column", pa.string()),
        ("reason", pa.string()),
        ("ext_id", pa.string()),
    ]
)


class Spill:
    """The chunks of one CSV file as the reader made them, written as they come (:meth:`add`), read back once
    (:meth:`chunks`) in the same order with the same row numbers and malformed records.

    Two Arrow IPC streams: ``path`` (the chunks' record batches, each with the row numbers as column
    ``row_column``) and ``path.malformed`` (one batch per chunk that came with malformed records). The chunk
    boundaries — how many batches and malformed records each chunk has — are kept here, a pair of integers per
    chunk. Readable once :meth:`finish` was called, i.e. once the whole file was read.
    """

    __slots__ = (
        "_chunks",
        "_complete",
        "_malformed_sink",
        "_malformed_writer",
        "_rows_sink",
        "_rows_writer",
        "malformed_path",
        "path",
        "row_column",
    )

    def __init__(self, path: Path, row_column: str) -> None:
        self.path = path
        self.malformed_path = path.with_name(path.name + ".malformed")
        self.row_column = row_column
        self._chunks: list[tuple[int, int]] = []  # per chunk: (record batches, malformed records)
        self._rows_sink: pa.NativeFile | None = None
        self._rows_writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._malformed_sink: pa.NativeFile | None = None
        self._malformed_writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._complete = False

    def add(self, table: pa.Table | None, rows: pa.Array | None, malformed: Sequence[RejectedRow]) -> None:
        """Append one chunk: ``table`` (the mapped columns as parsed; None for a chunk of malformed records
        only), ``rows`` (its data row numbers, int64) and the malformed records reported with it."""
        batches = 0
        if table is not None:
            assert rows is not None and len(rows) == table.num_rows
            offset = 0
            for batch in table.to_batches():
                with_rows = pa.RecordBatch.from_arrays(
                    [*batch.columns, rows.slice(offset, batch.num_rows)],
                    names=[*batch.schema.names, self.row_column],
                )
                offset += batch.num_rows
                if self._rows_writer is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._rows_sink = pa.OSFile(str(self.path), "wb")
                    self._rows_writer = pa.ipc.new_stream(self._rows_sink, with_rows.schema)
                self._rows_writer.write_batch(with_rows)
                batches += 1
        if malformed:
            if self._malformed_writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._malformed_sink = pa.OSFile(str(self.malformed_path), "wb")
                self._malformed_writer = pa.ipc.new_stream(self._malformed_sink, _MALFORMED)
            columns = list(
                zip(*((r.path, r.row, r.column, r.reason, r.ext_id) for r in malformed), strict=True)
            )
            self._malformed_writer.write_batch(
                pa.RecordBatch.from_arrays(
                    [pa.array(c, type=f.type) for c, f in zip(columns, _MALFORMED, strict=True)],
                    schema=_MALFORMED,
                )
            )
        self._chunks.append((batches, len(malformed)))

    def finish(self) -> None:
        """The file was read to its end: close the streams; :meth:`chunks` may read them."""
        self._close_writers()
        self._complete = True

    def discard(self) -> None:
        """Close and remove the streams (the reading that wrote them failed or stopped early)."""
        self._close_writers()
        self._chunks.clear()
        for path in (self.path, self.malformed_path):
            path.unlink(missing_ok=True)

    def _close_writers(self) -> None:
        for writer, sink in (
            (self._rows_writer, self._rows_sink),
            (self._malformed_writer, self._malformed_sink),
        ):
            try:
                if writer is not None:
                    writer.close()
            finally:
                if sink is not None:
                    sink.close()
        self._rows_writer = self._rows_sink = self._malformed_writer = self._malformed_sink = None

    def chunks(self) -> Iterator[tuple[pa.Table | None, tuple[RejectedRow, ...]]]:
        """The chunks, in the order they were added: ``(table, malformed)``, the table with the row numbers
        as its last column (None where :meth:`add` had none). Read once: the files are removed afterwards."""
        assert self._complete, "a spill is read only once the file was read to its end"
        with contextlib.ExitStack() as stack:
            stack.callback(self.discard)
            rows = malformed = None
            if self.path.exists():
                rows = pa.ipc.open_stream(stack.enter_context(pa.OSFile(str(self.path), "rb")))
            if self.malformed_path.exists():
                malformed = pa.ipc.open_stream(stack.enter_context(pa.OSFile(str(self.malformed_path), "rb")))
            for batches, bad in list(self._chunks):
                table = None
                if batches:
                    assert rows is not None
                    table = pa.Table.from_batches([rows.read_next_batch() for _ in range(batches)])
                records: tuple[RejectedRow, ...] = ()
                if bad:
                    assert malformed is not None
                    records = tuple(RejectedRow(**r) for r in malformed.read_next_batch().to_pylist())
                    assert len(records) == bad
                yield table, records
