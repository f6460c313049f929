"""``pushsync ledger-export``: one table of a run, written to Parquet or CSV a slice of rows at a time.

A run's batches hold every ID it sent (up to 1,000 a batch, packed): a run of 40,000 batches holds 40 million
IDs. They are read with a cursor and written a slice at a time (:data:`SLICE_ROWS`, fewer for batches), so memory
holds one slice, never the run. Each table has a fixed schema, so an export of no rows, or of a column with no
value in this run, has the same column types as any other. CSV has no list type: a batch's ``ext_ids`` is one
cell holding a JSON array (an ID may hold a space or a comma; a JSON array reads back exactly).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from sync._output import replaced_atomically

__all__ = ["BATCH_SLICE_ROWS", "SLICE_ROWS", "TABLES", "export_table"]

Table = Literal["batches", "attempts", "refused-ids", "rejected-rows"]
Format = Literal["parquet", "csv"]

SLICE_ROWS = 50_000
"""Rows read and written at a time (attempts, refused IDs, rejected rows: a few hundred bytes a row)."""
BATCH_SLICE_ROWS = 1_000
"""Batches read and written at a time: up to a million IDs."""

_S, _I, _F = pa.string(), pa.int64(), pa.float64()
TABLES: dict[str, tuple[str, pa.Schema]] = {
    "batches": (
        "batches",
        pa.schema(
            [
                ("run_id", _S),
                ("batch_id", _S),
                ("endpoint", _S),
                ("operation", _S),
                ("phase", _I),
                ("n_ids", _I),
                ("ext_ids", pa.list_(_S)),
                ("status", _S),
                ("attempts", _I),
                ("http_status", _I),
                ("code", _S),
                ("message", _S),
                ("ok_ids", _I),
                ("rejected_ids", _I),
                ("planned_at", _F),
                ("started_at", _F),
                ("finished_at", _F),
            ]
        ),
    ),
    "attempts": (
        "attempts",
        pa.schema(
            [
                ("run_id", _S),
                ("batch_id", _S),
                ("endpoint", _S),
                ("attempt", _I),
                ("n_ids", _I),
                ("outcome", _S),
                ("http_status", _I),
                ("message", _S),
                ("started_at", _F),
                ("latency", _F),
            ]
        ),
    ),
    "refused-ids": (
        "batch_ids",
        pa.schema(
            [
                ("run_id", _S),
                ("batch_id", _S),
                ("ext_id", _S),
                ("code", _S),
                ("message", _S),
                ("origin_path", _S),
                ("origin_row", _I),
            ]
        ),
    ),
    "rejected-rows": (
        "rejected_rows",
        pa.schema(
            [
                ("run_id", _S),
                ("path", _S),
                ("row", _I),
                ("column_name", _S),
                ("reason", _S),
                ("ext_id", _S),
            ]
        ),
    ),
}
"""Each exported table: the ledger table it is read from and the schema it is written with."""


def export_table(
    conn: sqlite3.Connection,
    run_id: str,
    out: Path,
    table: Table,
    fmt: Format,
    unpack: Callable[[Any], list[str]],
) -> int:
    """Write ``table`` of ``run_id`` from the ledger ``conn`` to ``out``; returns the rows written. The file is
    written beside ``out`` and renamed over it at the end: a failed export leaves nothing half-written.
    ``unpack``: :func:`sync.ledger.ledger.unpack_ids`, given by the ledger (this module does not import it back)."""
    name, schema = TABLES[table]
    columns = ", ".join(schema.names)
    cursor = conn.execute(f"SELECT {columns} FROM {name} WHERE run_id = ? ORDER BY rowid", (run_id,))
    slice_rows = BATCH_SLICE_ROWS if table == "batches" else SLICE_ROWS
    file_schema = schema if fmt == "parquet" else _csv_schema(schema)
    written = 0
    with replaced_atomically(out, ".partial") as partial:
        writer: Any = (
            pq.ParquetWriter(partial, file_schema, compression="zstd")
            if fmt == "parquet"
            else pa_csv.CSVWriter(partial, file_schema)
        )
        try:
            for rows in _slices(cursor, slice_rows):
                writer.write_table(_slice(rows, schema, file_schema, unpack))
                written += len(rows)
        finally:
            writer.close()  # a Parquet footer: an empty export is still a file with its schema
    return written


def _slices(cursor: sqlite3.Cursor, size: int) -> Iterator[list[Any]]:
    while rows := cursor.fetchmany(size):
        yield rows


def _csv_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([(f.name, _S if pa.types.is_list(f.type) else f.type) for f in schema])


def _slice(
    rows: Sequence[Sequence[Any]],
    schema: pa.Schema,
    file_schema: pa.Schema,
    unpack: Callable[[Any], list[str]],
) -> pa.Table:
    arrays = []
    for i, (f, written_as) in enumerate(zip(schema, file_schema, strict=True)):
        values = [r[i] for r in rows]
        if pa.types.is_list(f.type):  # the packed IDs
            ids = [unpack(v) for v in values]
            if pa.types.is_list(written_as.type):
                arrays.append(pa.array(ids, type=written_as.type))
            else:
                arrays.append(pa.array([json.dumps(x, ensure_ascii=False) for x in ids], type=_S))
        elif f.type == _S:
            # SQLite keeps what it was given: a code written as a number reads back as one.
            arrays.append(
                pa.array([v if v is None or isinstance(v, str) else str(v) for v in values], type=_S)
            )
        else:
            arrays.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(arrays, schema=file_schema)
