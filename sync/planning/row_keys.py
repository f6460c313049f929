"""Stable per-row keys for non-idempotent rows (events, pushed values, pushes), so resume confirms rows, not batches.

Batch IDs are content hashes of batches cut in the canonical order: one row added to the export shifts every
later batch, and a resume that skipped only *batches* it had confirmed would send every confirmed event again.
So each row of a non-idempotent stream (:data:`sync.records.NON_IDEMPOTENT`) gets a **row key** — a 64-bit hash
of the row's content (its external ID and the columns the stream sends) and of its *occurrence* among identical
rows (the first, second, … identical event of a user, in file and row order). The key does not change when other
rows are added, removed or reordered. The ledger stores the keys a batch carried (8 bytes per row,
``batch_rows``); resume drops the rows whose keys a run confirmed (:meth:`sync.planning.resume.ReplayPlan.keep_rows`).

Keys are polars hashes (computed as expressions, one column at a time): stable across processes and runs, not
across polars versions, so the ledger records :data:`SCHEME` with them and resume refuses keys of another scheme.
A false match needs two different rows with the same 64-bit key: about n·m / 2**64 for n rows planned and m
confirmed (5e-6 for ten million of each).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Sequence

import polars as pl
import pyarrow as pa

from sync.planning.validation import EXT_ID

__all__ = ["ROW_KEY", "SCHEME", "pack", "unpack", "with_row_keys"]

ROW_KEY = "__row_key"
"""The column holding a row's key (UInt64) in a clean frame of a non-idempotent stream."""
SCHEME = f"polars-{pl.__version__}/1"
"""How keys are computed: keys recorded under another scheme cannot be compared with this one's."""
_SEED = 0x5EED_0011


def with_row_keys(frame: pl.DataFrame, columns: Sequence[str]) -> pl.DataFrame:
    """``frame`` (a clean frame in canonical order: every row of an ID, in file and row order) with
    :data:`ROW_KEY`: the hash of ``(__ext_id, *columns)`` and of the row's occurrence among identical rows."""
    content = pl.struct([pl.col(EXT_ID), *(pl.col(c) for c in columns)]).hash(_SEED)
    # The occurrence is the position within a run of equal content hashes after a stable sort: a window
    # (``int_range().over(content)``) gives the same numbers but is several times slower with a group per row.
    position = pl.int_range(pl.len(), dtype=pl.UInt32)
    starts = (pl.col("__content") != pl.col("__content").shift(1)).fill_null(True)
    occurrence = position - pl.when(starts).then(position).forward_fill()
    key = pl.struct(pl.col("__content"), occurrence.alias("__occurrence")).hash(_SEED)
    return (
        frame.with_columns(
            content.alias("__content"), pl.int_range(pl.len(), dtype=pl.UInt32).alias("__order")
        )
        .sort("__content", maintain_order=True)
        .with_columns(key.alias(ROW_KEY))
        .sort("__order")
        .drop("__content", "__order")
    )


def pack(keys: Iterable[int]) -> bytes:
    """Keys as 8-byte little-endian integers, back to back (how the ledger stores a batch's rows)."""
    packed = array("Q", keys)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def unpack(blobs: Sequence[bytes]) -> pl.Series:
    """The keys of :func:`pack`-ed blobs, concatenated, as one UInt64 series (no Python object per key)."""
    data = b"".join(blobs)
    count = len(data) // 8
    array_ = pa.Array.from_buffers(pa.uint64(), count, [None, pa.py_buffer(data[: count * 8])])
    if sys.byteorder == "big":  # Arrow reads native order; the blobs are little-endian
        packed = array("Q", data[: count * 8])
        packed.byteswap()
        array_ = pa.Array.from_buffers(pa.uint64(), count, [None, pa.py_buffer(packed.tobytes())])
    series = pl.from_arrow(array_)
    assert isinstance(series, pl.Series)
    return series.alias(ROW_KEY)
