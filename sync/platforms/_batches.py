"""Cutting a stream's selected rows into batches, vectorised: Python touches each batch, never each ID.

A builder selects, per clean frame, the rows a stream sends (:data:`EXT_ID`, :data:`FILE`, :data:`ROW`, a
:data:`GROUP` — the tag of ``tagUsers``, ``""`` when the stream has none — the row's :data:`ITEM`, its JSON text
built with :mod:`sync.platforms._encode`, and for a non-idempotent stream its :data:`sync.planning.row_keys.ROW_KEY`), in
the canonical order where the rows of one ID are adjacent. :func:`cut` turns those frames into :class:`Cut` runs:

* per group, consecutive runs of at most ``size`` unique IDs, in row order;
* a run still open at the end of a frame continues in the next frame (batches do not depend on how the rows were
  split into frames);
* a run is complete when its group's next ID arrives; complete runs come out in the order of those arriving rows,
  the runs still open after the last frame at the end, in group order.

This is exactly the row-by-row loop the builders had before the columnar data plane (issue 13), so a batch holds
the same items — and has the same content-derived ID — as before.

A :class:`Cut` carries its items already joined (``item,item,...``): the builder wraps them in the request's
envelope and hashes the bytes. Its unique IDs come from one ``to_list`` per frame; the link from an ID to its input
row stays in polars columns (:class:`RowOrigins`) until something asks for it (a refused ID); row keys are packed
from the key column's buffer.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import polars as pl

from sync.planning.row_keys import ROW_KEY
from sync.records import RowRef

__all__ = ["EXT_ID", "FILE", "GROUP", "ITEM", "ROW", "Cut", "RowOrigins", "ahead", "cut", "first_ids"]

EXT_ID, FILE, ROW = "__ext_id", "__file", "__row"
GROUP = "__group"
"""The group of a row (a batch never mixes groups): the tag of a tag stream, ``""`` otherwise."""
ITEM = "__item"
"""The JSON text a row contributes to its batch's body (an array item, or an ID in an ``extIds`` list)."""

_NEW, _B, _I = "__new", "__b", "__i"
T = TypeVar("T")


class RowOrigins(Mapping[str, RowRef]):
    """A batch's external ID → the input row that produced its value (file and 1-based row), built from the
    batch's file-index and row columns only when first read: the dispatcher asks for the origins of refused IDs
    alone, so a batch that goes through never makes these objects."""

    __slots__ = ("_files", "_ids", "_map", "_names", "_rows")

    def __init__(
        self, ext_ids: Sequence[str], files: pl.Series, rows: pl.Series, names: Sequence[str]
    ) -> None:
        self._ids = ext_ids  # the batch's unique IDs, in order
        self._files = files  # per ID: the index of its input file in ``names``
        self._rows = rows  # per ID: its row number in that file
        self._names = names  # the source's input files
        self._map: dict[str, RowRef] | None = None  # built on first read

    def _built(self) -> dict[str, RowRef]:
        if self._map is None:
            names = self._names
            self._map = {
                x: RowRef(names[f], r)
                for x, f, r in zip(self._ids, self._files.to_list(), self._rows.to_list(), strict=True)
            }
        return self._map

    def __getitem__(self, ext_id: str) -> RowRef:
        return self._built()[ext_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())

    def __repr__(self) -> str:
        return f"RowOrigins({len(self._ids)} IDs)"

    def joined(self, other: RowOrigins) -> RowOrigins:
        """These origins followed by ``other``'s (a run continued in the next frame)."""
        return RowOrigins(
            (*self._ids, *other._ids),
            pl.concat([self._files, other._files]),
            pl.concat([self._rows, other._rows]),
            self._names,
        )


@dataclass(frozen=True, slots=True)
class Cut:
    """One batch's content: its group, its items' JSON texts joined with ``,`` (UTF-8), its unique IDs in order,
    where they came from and the packed keys of its rows (empty unless the rows carry :data:`ROW_KEY`)."""

    group: str
    items: bytes
    ext_ids: tuple[str, ...]
    origins: RowOrigins
    row_keys: bytes = b""

    def joined(self, other: Cut, *, first_only: bool) -> Cut:
        """This run continued by ``other`` (the same group, the next frame)."""
        items = self.items if first_only else b",".join((self.items, other.items))
        return Cut(
            self.group,
            items,
            self.ext_ids + other.ext_ids,
            self.origins.joined(other.origins),
            self.row_keys + other.row_keys,
        )


def _key_bytes(keys: pl.Series) -> bytes:
    """A UInt64 column as 8-byte little-endian integers back to back (:func:`sync.planning.row_keys.pack`'s form)."""
    if not keys.len():
        return b""
    values = keys.cast(pl.UInt64).rechunk().to_arrow()
    buffer = values.buffers()[1]
    assert buffer is not None and values.null_count == 0
    data = buffer.to_pybytes()[8 * values.offset : 8 * (values.offset + len(values))]
    if sys.byteorder == "big":
        swapped = array("Q", data)
        swapped.byteswap()
        data = swapped.tobytes()
    return data


def _ranked(selected: pl.DataFrame, open_runs: Mapping[str, tuple[int, str]], size: int) -> pl.DataFrame:
    """``selected`` sorted by group (stably: row order within a group), with each row's run number ``__b``
    within its group (0: the run still open from earlier frames, when there is one) and ``__new`` (first row of
    an ID)."""
    frame = selected.with_row_index(_I)
    groups = frame[GROUP]
    if groups.len() and not (groups == groups[0]).all():
        # Stable sort on the groups' integer codes (sorting the strings themselves is several times slower):
        # rows of a group become adjacent, in frame order; the code order itself does not matter. One thread:
        # a frame is small, and the pool's hand-offs cost more than the sort on a busy machine.
        codes = pl.col(GROUP).cast(pl.Categorical).to_physical()
        frame = frame.sort(codes, maintain_order=True, multithreaded=False)
    # The runs still open from earlier frames matter at each group's first row alone (its count of IDs, and
    # whether that row's ID is the open run's last one): looked up in Python for those few rows, then spread over
    # each group's rows by its segment number (integers only: no per-row lookup of the group's string).
    start = (pl.col(GROUP) != pl.col(GROUP).shift(1)).fill_null(True)
    frame = frame.with_columns(start.alias("__start"))
    starts = frame["__start"].arg_true()
    at_groups = frame[GROUP].gather(starts).to_list()
    at_ids = frame[EXT_ID].gather(starts).to_list()
    counts: list[int] = []
    fresh: list[bool] = []
    for group, ext_id in zip(at_groups, at_ids, strict=True):
        count, last = open_runs.get(group, (0, None))
        counts.append(count)
        fresh.append(ext_id != last)
    segment = pl.col("__start").cast(pl.Int64).cum_sum() - 1
    per_group = pl.DataFrame(
        {"__c0": pl.Series(counts, dtype=pl.Int64), "__fresh": pl.Series(fresh, dtype=pl.Boolean)}
    )
    frame = frame.with_columns(segment.alias("__seg"))
    frame = frame.with_columns(
        pl.lit(per_group["__c0"]).gather(pl.col("__seg")).alias("__c0"),
        pl.when(pl.col("__start"))
        .then(pl.lit(per_group["__fresh"]).gather(pl.col("__seg")))
        .otherwise((pl.col(EXT_ID) != pl.col(EXT_ID).shift(1)).fill_null(True))
        .alias(_NEW),
    )
    running = pl.col(_NEW).cast(pl.Int64).cum_sum()
    # The IDs counted before this group's first row in the frame: subtracted so ranks start at 1 per group.
    before = pl.when(pl.col("__start")).then(running - pl.col(_NEW).cast(pl.Int64)).forward_fill()
    rank = running - before
    run = (pl.col("__c0") + rank - 1) // size
    frame = frame.with_columns(run.clip(lower_bound=0).alias(_B))
    # The runs are contiguous now: number them, so that aggregating groups by one integer.
    boundary = (pl.col(_B) != pl.col(_B).shift(1)) | pl.col("__start")
    return frame.with_columns(boundary.fill_null(True).cast(pl.UInt32).cum_sum().alias("__run"))


def _frame_cuts(
    frame: pl.DataFrame, files: Sequence[str], first_only: bool
) -> list[tuple[str, int, int, Cut]]:
    """The runs of a ranked frame: ``(group, run number, first row index, cut)`` in group and run order."""
    keyed = ROW_KEY in frame.columns
    # Joined in polars and handed over as UTF-8 bytes: the body is bytes, and no Python str is made per batch.
    item = (pl.col(ITEM).first() if first_only else pl.col(ITEM).str.join(",")).cast(pl.Binary)
    runs = frame.group_by("__run", maintain_order=True).agg(
        pl.col(GROUP).first(),
        pl.col(_B).first(),
        item.alias(ITEM),
        pl.len().alias("__rows"),
        pl.col(_NEW).sum().alias("__ids"),
        pl.col(_I).min().alias(_I),
    )
    firsts = frame.filter(pl.col(_NEW))
    ids: list[str] = firsts[EXT_ID].to_list()
    id_files, id_rows = firsts[FILE], firsts[ROW]
    keys = _key_bytes(frame[ROW_KEY]) if keyed else b""
    out = []
    at_id = at_row = 0
    for _run, group, b, items, n_rows, n_ids, first in runs.iter_rows():
        run_ids = tuple(ids[at_id : at_id + n_ids])
        origins = RowOrigins(run_ids, id_files.slice(at_id, n_ids), id_rows.slice(at_id, n_ids), files)
        packed = keys[8 * at_row : 8 * (at_row + n_rows)] if keyed else b""
        out.append((group, b, first, Cut(group, items, run_ids, origins, packed)))
        at_id += n_ids
        at_row += n_rows
    return out


_END = object()


def ahead(items: Iterable[T]) -> Iterator[T]:
    """``items``, each one made on a worker thread while the caller uses the one before.

    For frames whose making is polars work (reading, selecting, encoding: the GIL is released) and whose use is
    partly Python (cutting, hashing): the two overlap on a second core. At most one item is made ahead; closing
    the iterator early waits for that one to finish. An exception raised making an item is raised here."""
    source = iter(items)
    with ThreadPoolExecutor(1, thread_name_prefix="pushsync-build") as pool:
        pending = pool.submit(next, source, _END)
        while True:
            item = pending.result()
            if item is _END:
                return
            pending = pool.submit(next, source, _END)
            yield item  # type: ignore[misc]


def cut(
    frames: Iterable[pl.DataFrame], size: int, files: Sequence[str], *, first_only: bool = False
) -> Iterator[Cut]:
    """The runs of at most ``size`` unique IDs per group of the selected ``frames`` (see the module docstring).

    ``files`` resolves :data:`FILE`. ``first_only``: a run's items are its first row's item alone (a one-user
    request whose ID has several rows sends the first, as the row loop did). ``frames`` is advanced on a worker
    thread one frame ahead (:func:`ahead`): a lazy selection encodes the next frame while this one is cut.
    """
    if size < 1:
        raise ValueError(f"a batch holds at least one ID (size {size})")
    open_cuts: dict[str, Cut] = {}  # per group: the run still open, carried into the next frame
    for selected in ahead(frames):
        if selected.is_empty():
            continue
        open_runs = {g: (len(c.ext_ids), c.ext_ids[-1]) for g, c in open_cuts.items()}
        ranked = _ranked(selected, open_runs, size)
        done: list[tuple[int, Cut]] = []  # (index of the row that completed it, run)
        pieces = _frame_cuts(ranked, files, first_only)
        for k, (group, b, first_row, piece) in enumerate(pieces):
            last_of_group = k + 1 == len(pieces) or pieces[k + 1][0] != group
            trigger = -1 if last_of_group else pieces[k + 1][2]
            if b == 0 and group in open_cuts:
                piece = open_cuts.pop(group).joined(piece, first_only=first_only)
            elif group in open_cuts:
                # The open run was full: this frame's first ID of the group completed it.
                done.append((first_row, open_cuts.pop(group)))
            if last_of_group:
                open_cuts[group] = piece
            else:
                done.append((trigger, piece))
        done.sort(key=lambda pair: pair[0])
        for _, piece in done:
            yield piece
    for group in sorted(open_cuts):
        yield open_cuts[group]


def first_ids(selected: pl.DataFrame, limit: int) -> pl.DataFrame:
    """The rows of ``selected``'s first group that belong to its first ``limit`` IDs (a plan's sample)."""
    group = selected[GROUP][0]
    rows = selected.filter(pl.col(GROUP) == group)
    new = (pl.col(EXT_ID) != pl.col(EXT_ID).shift(1)).fill_null(True)
    return rows.filter(new.cast(pl.Int64).cum_sum() <= limit)
