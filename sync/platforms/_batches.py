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

import bisect
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import polars as pl
import pyarrow as pa

from sync._arrow import call as arrow_call
from sync._prefetch import ahead
from sync.planning.row_keys import ROW_KEY
from sync.platforms import _encode as enc
from sync.records import ExtIds, RowRef

__all__ = ["EXT_ID", "FILE", "GROUP", "ITEM", "ROW", "Cut", "RowOrigins", "ahead", "cut", "first_ids"]

EXT_ID, FILE, ROW = "__ext_id", "__file", "__row"
GROUP = "__group"
"""The group of a row (a batch never mixes groups): the tag of a tag stream, ``""`` otherwise."""
ITEM = "__item"
"""The JSON text a row contributes to its batch's body (an array item, or an ID in an ``extIds`` list)."""

_NEW, _I = "__new", "__i"
T = TypeVar("T")


class RowOrigins(Mapping[str, RowRef]):
    """A batch's external ID → the input row that produced its value (file and 1-based row), built from the
    batch's file-index and row columns only when first read: the dispatcher asks for the origins of refused IDs
    alone, so a batch that goes through never makes these objects.

    ``files`` and ``rows`` hold one value per ID of ``ext_ids``, or are a whole frame's columns: then ``at``
    gives the positions of the frame's IDs in them (None: one row per ID) and ``span`` the range of those IDs
    that are this batch's — nothing is sliced or gathered until the origins are read."""

    __slots__ = ("_ids", "_map", "_names", "_parts")

    def __init__(
        self,
        ext_ids: Sequence[str],
        files: pl.Series,
        rows: pl.Series,
        names: Sequence[str],
        at: pl.Series | None = None,
        span: tuple[int, int] | None = None,
    ) -> None:
        self._ids = ext_ids  # the batch's unique IDs, in order
        # Per part (a run continued in the next frame has two or more): a frame's file-index and row columns,
        # the positions of its IDs in them and the range of those IDs that is this part's.
        self._parts: list[tuple[pl.Series, pl.Series, pl.Series | None, tuple[int, int] | None]] = [
            (files, rows, at, span)
        ]
        self._names = names  # the source's input files
        self._map: dict[str, RowRef] | None = None  # built on first read

    def _built(self) -> dict[str, RowRef]:
        if self._map is None:
            names = self._names
            files: list[int] = []
            rows: list[int] = []
            for file_column, row_column, at, span in self._parts:
                if span is not None:
                    lo, hi = span
                    if at is None:
                        file_column, row_column = (
                            file_column.slice(lo, hi - lo),
                            row_column.slice(lo, hi - lo),
                        )
                    else:
                        where = at.slice(lo, hi - lo)
                        file_column, row_column = file_column.gather(where), row_column.gather(where)
                files += file_column.to_list()
                rows += row_column.to_list()
            self._map = {x: RowRef(names[f], r) for x, f, r in zip(self._ids, files, rows, strict=True)}
        return self._map

    def __getitem__(self, ext_id: str) -> RowRef:
        return self._built()[ext_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())

    def __repr__(self) -> str:
        return f"RowOrigins({len(self._ids)} IDs)"

    def joined(self, other: RowOrigins, ext_ids: Sequence[str] | None = None) -> RowOrigins:
        """These origins followed by ``other``'s (a run continued in the next frame); ``ext_ids``: the joined
        IDs when the caller has them already."""
        both = RowOrigins.__new__(RowOrigins)
        both._ids = ext_ids if ext_ids is not None else _joined_ids(self._ids, other._ids)
        both._parts = self._parts + other._parts
        both._names = self._names
        both._map = None
        return both


def _joined_ids(first: Sequence[str], second: Sequence[str]) -> Sequence[str]:
    """Two runs' IDs one after the other: packed still when both are (:class:`ExtIds`), a tuple otherwise."""
    if isinstance(first, ExtIds) and isinstance(second, ExtIds):
        return first.joined(second)
    return (*first, *second)


@dataclass(frozen=True, slots=True)
class Cut:
    """One batch's content: its group, its items' JSON texts joined with ``,`` (UTF-8: :attr:`text`, a view of
    the frame's joined buffer — the body is built from it with one copy — or bytes; :attr:`items` as bytes), its
    unique IDs in order (an :class:`ExtIds` when no ID holds a line break, a tuple otherwise), where they came
    from and the packed keys of its rows (empty unless the rows carry :data:`ROW_KEY`)."""

    group: str
    text: bytes | memoryview
    ext_ids: Sequence[str]
    origins: RowOrigins
    row_keys: bytes = b""

    @property
    def items(self) -> bytes:
        """The joined items as ``bytes``."""
        return bytes(self.text)

    def joined(self, other: Cut, *, first_only: bool) -> Cut:
        """This run continued by ``other`` (the same group, the next frame)."""
        text = self.text if first_only else b",".join((self.text, other.text))
        ids = _joined_ids(self.ext_ids, other.ext_ids)
        return Cut(
            self.group,
            text,
            ids,
            self.origins.joined(other.origins, ids),
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


class _Joined:
    """A String column's values joined per run of rows — run ``i`` is rows ``[bounds[i], bounds[i + 1])`` —
    by ``sep``, in one Arrow kernel (``binary_join`` over a list view of the column, no copy to make the
    lists): :meth:`get` hands run ``i``'s UTF-8 bytes over as a view of that buffer, no per-value work in Python."""

    __slots__ = ("_base", "_data", "_offsets", "_values")

    def __init__(self, column: pl.Series | pa.Array, bounds: Sequence[int], sep: str) -> None:
        self._values = column if isinstance(column, pa.Array) else _large_strings(column)
        lists = pa.LargeListArray.from_arrays(pa.array(bounds, pa.int64()), self._values)
        joined = arrow_call("binary_join", lists, pa.scalar(sep, pa.large_string()))
        self._base, self._offsets, self._data = _buffers(joined)

    def holds(self, chars: bytes) -> bool:
        """Whether a value of the column holds one of the bytes ``chars`` (one scan of its buffer in C)."""
        base, offsets, data = _buffers(self._values)
        raw = data[offsets[base] : offsets[base + len(self._values)]].tobytes()
        return enc.holds_any(raw, chars)

    def get(self, i: int) -> memoryview:
        """Run ``i``'s values joined (a view: it keeps the joined buffer alive)."""
        at = self._base + i
        return self._data[self._offsets[at] : self._offsets[at + 1]]


class _Values:
    """A String column's values as UTF-8 bytes: one at a time (a one-user run's first item), or a run of rows
    back to back (items that each end with their separator)."""

    __slots__ = ("_base", "_data", "_offsets")

    def __init__(self, column: pl.Series) -> None:
        self._base, self._offsets, self._data = _buffers(_large_strings(column))

    def get(self, i: int) -> memoryview:
        """Row ``i``'s value (a view)."""
        at = self._base + i
        return self._data[self._offsets[at] : self._offsets[at + 1]]

    def ended(self, lo: int, hi: int) -> memoryview:
        """Rows ``[lo, hi)``'s values back to back, less the last one's final byte (a view): the values each end
        with their separator, so this is them joined by it."""
        base = self._base
        end = self._offsets[base + hi]
        if hi <= lo or self._data[end - 1 : end] != b",":
            raise ValueError(f"rows {lo}-{hi} of a selection do not each end with a comma")
        return self._data[self._offsets[base + lo] : end - 1]


_MAX_STRETCHES = 64
"""Stretches of back-to-back values past which a column is copied rather than read in place (a column whose
rows were moved, one stretch a row: slices per row would cost more than the copy)."""


class _Views:
    """A String column's values — each ending with its separator — read where polars keeps them: Arrow string
    views into its own data buffers, no copy of the text. A column built by one concatenation is written row
    after row into buffers of growing size, so a run of rows is one slice of a buffer, or a few where it crosses
    from one buffer into the next; :meth:`ended` is :meth:`_Values.ended`'s text without copying the column into
    one ``large_string`` array first (polars' conversion copies every value: about a tenth of building the bodies).

    :meth:`of` gives None where that does not hold — a value of 12 bytes or fewer (kept inside its view), a null,
    rows not back to back in their buffer (a filtered column, say) are not read this way; the caller copies the
    column then (:class:`_Values`)."""

    __slots__ = ("_base", "_data", "_starts", "_views")

    def __init__(self, views: memoryview, base: int, data: list[memoryview], starts: list[int]) -> None:
        self._views = views  # the views as int32: length, prefix, buffer index, offset (four per row)
        self._base = base  # the column's first row among the views
        self._data = data  # the data buffers
        self._starts = starts  # the rows (of the column) where a stretch of back-to-back values begins

    @classmethod
    def of(cls, column: pl.Series) -> _Views | None:
        """The views of ``column`` (one chunk, no nulls, every value longer than 12 bytes), or None."""
        if sys.byteorder != "little" or column.null_count() or column.n_chunks() != 1 or not column.len():
            return None
        arrow = column.to_arrow(compat_level=pl.CompatLevel.newest())
        if isinstance(arrow, pa.ChunkedArray):
            if arrow.num_chunks != 1:
                return None
            arrow = arrow.chunk(0)
        if arrow.type != pa.string_view():
            return None
        buffers = arrow.buffers()
        n, base = len(arrow), arrow.offset
        if buffers[1] is None or any(b is None for b in buffers[2:]):
            return None
        ints = pa.Array.from_buffers(pa.int32(), 4 * (base + n), [None, buffers[1]])
        frame = pl.from_arrow(pa.RecordBatch.from_arrays([ints], ["v"]))
        assert isinstance(frame, pl.DataFrame)
        v = pl.col("v")
        size, buffer, offset = v.gather_every(4, 0), v.gather_every(4, 2), v.gather_every(4, 3)
        facts = frame.select(
            size.slice(base, n).alias("s"), buffer.slice(base, n).alias("b"), offset.slice(base, n).alias("o")
        )
        # A row continues the stretch of the row before when its value starts in the same buffer where that
        # value ends.
        s, b, o = pl.col("s"), pl.col("b"), pl.col("o")
        begins = ((b != b.shift(1)) | (o != o.shift(1) + s.shift(1))).fill_null(True)
        shortest, stretches = facts.select(s.min(), begins.sum()).row(0)
        if shortest is None or shortest <= 12 or stretches > _MAX_STRETCHES:
            return None
        starts = facts.select(begins.arg_true()).to_series().to_list()
        return cls(memoryview(buffers[1]).cast("i"), base, [memoryview(d) for d in buffers[2:]], starts)

    def ended(self, lo: int, hi: int) -> bytes | memoryview:
        """Rows ``[lo, hi)``'s values back to back, less the last one's final byte (see :meth:`_Values.ended`): a
        view of a buffer, or the few slices it crosses joined."""
        if hi <= lo:
            raise ValueError(f"rows {lo}-{hi} of a selection do not each end with a comma")
        views, starts = self._views, self._starts
        pieces: list[memoryview] = []
        at = lo
        k = bisect.bisect_right(starts, lo) - 1  # the stretch holding row lo
        while at < hi:
            end = (
                min(hi, starts[k + 1]) if k + 1 < len(starts) else hi
            )  # one past the stretch's last row here
            first, last = 4 * (self._base + at), 4 * (self._base + end - 1)
            data = self._data[views[first + 2]]
            pieces.append(data[views[first + 3] : views[last + 3] + views[last]])
            at, k = end, k + 1
        if pieces[-1][-1:] != b",":
            raise ValueError(f"rows {lo}-{hi} of a selection do not each end with a comma")
        pieces[-1] = pieces[-1][:-1]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _large_strings(column: pl.Series) -> pa.Array:
    """A String column (no nulls) as one Arrow ``large_string`` array."""
    if column.null_count():
        raise ValueError(f"column {column.name} of a selection holds nulls")
    arrow = column.rechunk().to_arrow()
    if isinstance(arrow, pa.ChunkedArray):  # one chunk after rechunk
        arrow = arrow.combine_chunks()
    if arrow.type != pa.large_string():
        arrow = arrow.cast(pa.large_string())
    return arrow


def _buffers(strings: pa.Array) -> tuple[int, memoryview, memoryview]:
    """A ``large_string`` array's offset, offsets (as integers) and data, without a copy."""
    _, offsets, data = strings.buffers()
    empty = memoryview(b"")
    return (
        strings.offset,
        memoryview(offsets).cast("q") if offsets is not None else empty.cast("q"),
        memoryview(data) if data is not None else empty,
    )


def _group_hash() -> pl.Expr:
    """The key :func:`_group_runs` sorts a selection's rows by: its group's 64-bit hash (a function, so that a
    test can make every group collide)."""
    return pl.col(GROUP).hash()


def _group_runs(selected: pl.DataFrame) -> tuple[pl.DataFrame, pl.Series | None, list[tuple[str, int, int]]]:
    """``selected`` with each group's rows adjacent (a stable sort: frame order within a group), the frame
    position of each of its rows (None: not sorted, the positions are the rows' own) and its groups' row
    ranges ``(group, start, end)`` in that order."""
    groups = selected[GROUP]
    n = groups.len()
    first = groups[0]
    # Sorted groups with equal ends are one group (setProfileAttributes and the like: no string is compared).
    adjacent = groups.is_sorted()
    if adjacent and groups[n - 1] == first:
        return selected, None, [(first, 0, n)]
    if adjacent:
        frame, positions = selected, None
        runs = frame.select(pl.col(GROUP).rle()).unnest(GROUP)
        lengths, names = runs["len"].to_list(), runs["value"].to_list()
    else:
        # Rows of a group made adjacent, in frame order (the groups' order does not matter): a stable sort on
        # the groups' 64-bit hashes — a sort of integers, about 40 % less CPU than a partition by the strings
        # (a tag stream: 7 tags over 125,000 rows, 3.5 against 6 ms) — whose runs are then the groups. Should two
        # groups' hashes collide, their rows interleave, a group has two runs, and a stable partition by the
        # strings themselves does it instead.
        frame = selected.with_row_index(_I).sort(_group_hash(), maintain_order=True, multithreaded=False)
        runs = frame.select(pl.col(GROUP).rle()).unnest(GROUP)
        lengths, names = runs["len"].to_list(), runs["value"].to_list()
        if len(set(names)) != len(names):
            parts = selected.with_row_index(_I).partition_by(GROUP, maintain_order=True)
            frame = pl.concat(parts, rechunk=False)
            lengths, names = [p.height for p in parts], [p[GROUP][0] for p in parts]
        positions = frame[_I]
    spans: list[tuple[str, int, int]] = []
    at = 0
    for length, group in zip(lengths, names, strict=True):
        spans.append((group, at, at + length))
        at += length
    return frame, positions, spans


def _frame_cuts(
    selected: pl.DataFrame,
    open_runs: Mapping[str, tuple[int, str]],
    size: int,
    files: Sequence[str],
    first_only: bool,
    id_items: bool = False,
    ended: bool = False,
) -> list[tuple[str, bool, int, Cut]]:
    """The runs of one frame: ``(group, continues, first row, cut)`` per run, in group and run order.

    ``continues``: the run continues the group's run still open from earlier frames (``open_runs``: its count of
    IDs and last ID). ``first row``: the frame position of the run's first row (complete runs come out in the
    order of the rows that complete them).

    Arithmetic on the positions of the rows that bring a new ID (``starts``): in a group whose open run holds
    ``c0`` IDs, the group's ``j``-th new ID (from 0) starts a run when ``(c0 + j) % size == 0``, and the rows
    before its first such ID continue the open run. A run is then a range of rows (a group's rows are
    adjacent) and a range of new IDs; the runs' items and IDs are joined per range in Arrow.

    ``id_items``: each row's item is its ID's JSON string (:data:`ITEM` is not read): made from the runs' joined
    IDs when the frame allows (one row per ID, nothing to escape), by :func:`sync.platforms._encode.string`
    otherwise.

    ``ended``: each row's :data:`ITEM` ends with ``,`` — a run's items joined are then a slice of the column's
    buffer (less the last comma), not a join of their own.
    """
    if ended and (first_only or id_items):
        raise ValueError("ended items are neither one-user items nor IDs")
    frame, positions, spans = _group_runs(selected)
    n = frame.height
    # A row brings a new ID when its ID differs from the row before or it is its group's first row — unless
    # that first row continues the last ID of the group's open run (counted in an earlier frame).
    new = (pl.col(EXT_ID) != pl.col(EXT_ID).shift(1)).fill_null(True)
    if len(spans) > 1:
        new = new | (pl.col(GROUP) != pl.col(GROUP).shift(1)).fill_null(True)
    continued = [(g, s) for g, s, _ in spans if g in open_runs]
    at_first = frame[EXT_ID].gather([s for _, s in continued]).to_list() if continued else []
    repeated = [s for (g, s), x in zip(continued, at_first, strict=True) if x == open_runs[g][1]]
    if repeated:
        new = new & ~pl.int_range(n, dtype=pl.get_index_type()).is_in(repeated)
    starts = frame.select(pl.arg_where(new).alias(_NEW)).to_series()
    every_row = starts.len() == n  # one row per ID (the common case): ID positions are row numbers
    bounds = [s for _, s, _ in spans] + [n]
    at_bounds = (
        bounds if every_row else starts.search_sorted(pl.Series(bounds, dtype=starts.dtype), "left").to_list()
    )
    # Per group: the ID indices that start a run (k0 + j for the j above), found as rows below.
    run_ids: list[list[int]] = []
    for (group, _, _), k0, k1 in zip(spans, at_bounds, at_bounds[1:], strict=False):
        count = open_runs[group][0] if group in open_runs else 0
        run_ids.append(list(range(k0 + (-count) % size, k1, size)))
    flat = [k for ks in run_ids for k in ks]
    found = flat if every_row or not flat else starts.gather(flat).to_list()
    rows_of = dict(zip(flat, found, strict=True))
    # The pieces: (group, continues, first row, first ID index); each ends where the next begins.
    pieces: list[tuple[str, bool, int, int]] = []
    for (group, s, _), k0, ks in zip(spans, at_bounds, run_ids, strict=False):
        if not ks or rows_of[ks[0]] != s:
            # Rows before the group's first run start continue the open run (a group without one starts a run
            # at its first row, so these exist only after an earlier frame).
            assert group in open_runs
            pieces.append((group, True, s, k0))
        pieces += [(group, False, rows_of[k], k) for k in ks]
    if not pieces:
        return []
    row_bounds = [p[2] for p in pieces] + [n]
    id_bounds = [p[3] for p in pieces] + [at_bounds[-1]]
    unique = frame[EXT_ID] if every_row else frame[EXT_ID].gather(starts)
    unique_values = _large_strings(unique)
    ids: _Joined | None = _Joined(unique_values, id_bounds, "\n")
    assert ids is not None
    # IDs without a character JSON escapes (a line break is one) are their JSON strings' content as they are.
    plain_ids = not ids.holds(enc.ESCAPED_BYTES)
    plain: list[str] = []
    if not plain_ids and ids.holds(b"\n"):
        ids, plain = None, unique.to_list()  # an ID holds a line break: this frame's runs keep tuples of IDs
    quoted = id_items and plain_ids and every_row and not first_only
    items: _Joined | _Values | None = None
    views: _Views | None = None  # ended items read in place, where the column allows (else copied: items)
    if quoted:
        # One row per ID and nothing to escape: a run's items are its IDs joined by '","', between quotes.
        items = _Joined(unique_values, id_bounds, '","')
    else:
        column = frame.select(enc.string(pl.col(EXT_ID))).to_series() if id_items else frame[ITEM]
        views = _Views.of(column) if ended else None
        if views is None:
            items = _Values(column) if first_only or ended else _Joined(column, row_bounds, ",")
    at = None if every_row else starts
    id_files, id_rows = frame[FILE], frame[ROW]
    keys = _key_bytes(frame[ROW_KEY]) if ROW_KEY in frame.columns else b""
    first_rows = row_bounds[:-1]
    origin_rows = positions.gather(first_rows).to_list() if positions is not None else first_rows
    out = []
    for i, ((group, continues, r0, k0), first_row) in enumerate(zip(pieces, origin_rows, strict=True)):
        r1, k1 = row_bounds[i + 1], id_bounds[i + 1]
        lines = ids.get(i).tobytes() if ids is not None else b""
        if views is not None:
            text: bytes | memoryview = views.ended(r0, r1)
        elif quoted:
            assert items is not None
            text = b"".join((b'"', items.get(i), b'"'))
        elif first_only:
            # One-user requests send an ID's first row alone (a continuing piece adds nothing to the open run's).
            assert items is not None
            text = b"" if continues else items.get(r0)
        elif ended:
            assert isinstance(items, _Values)
            text = items.ended(r0, r1)
        else:
            assert items is not None
            text = items.get(i)
        run: Sequence[str] = ExtIds(lines, k1 - k0) if ids is not None else tuple(plain[k0:k1])
        origins = RowOrigins(run, id_files, id_rows, files, at, (k0, k1))
        out.append((group, continues, first_row, Cut(group, text, run, origins, keys[8 * r0 : 8 * r1])))
    return out


def cut(
    frames: Iterable[pl.DataFrame],
    size: int,
    files: Sequence[str],
    *,
    first_only: bool = False,
    id_items: bool = False,
    ended: bool = False,
) -> Iterator[Cut]:
    """The runs of at most ``size`` unique IDs per group of the selected ``frames`` (see the module docstring).

    ``files`` resolves :data:`FILE`. ``first_only``: a run's items are its first row's item alone (a one-user
    request whose ID has several rows sends the first, as the row loop did). ``id_items``: each row's item is
    its ID's JSON string (an ``extIds`` list), the frames' :data:`ITEM` is not read (select without items: no
    text is built per row when the IDs need no escaping). ``ended``: each row's :data:`ITEM` is its JSON text
    followed by ``,`` (a run's items are then a slice of the frame's item buffer, joined by no copy of their
    own; the cuts' texts are the same). ``frames`` is advanced on a worker
    thread one frame ahead (:func:`ahead`): a lazy selection encodes the next frame while this one is cut.
    """
    if size < 1:
        raise ValueError(f"a batch holds at least one ID (size {size})")
    open_cuts: dict[str, Cut] = {}  # per group: the run still open, carried into the next frame
    for selected in ahead(frames, thread_name="pushsync-build"):
        if selected.is_empty():
            continue
        open_runs = {g: (len(c.ext_ids), c.ext_ids[-1]) for g, c in open_cuts.items()}
        done: list[tuple[int, Cut]] = []  # (frame position of the row that completed it, run)
        pieces = _frame_cuts(selected, open_runs, size, files, first_only, id_items, ended)
        for k, (group, continues, first_row, piece) in enumerate(pieces):
            last_of_group = k + 1 == len(pieces) or pieces[k + 1][0] != group
            trigger = -1 if last_of_group else pieces[k + 1][2]
            if continues:
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
