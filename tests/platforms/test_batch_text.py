"""How a batch's text is cut without a join of its own (issue 13's client CPU): an array stream's items each end
with their comma, so a run's items are a slice of the selection's buffer — the same bytes the joined items gave —
and the escape checks' fast path for letters and digits answers as the full scan does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from batch_frames import frames_cut_at
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.config import load_job
from sync.planning.planning import build_plan
from sync.platforms import _encode as enc
from sync.platforms._batches import EXT_ID, FILE, GROUP, ITEM, ROW, _Values, _Views, cut
from sync.platforms.netmera._streams import Shape, _body, stream_batches, streams_for
from sync.records import Operation


@st.composite
def _array_frames(draw: Any) -> tuple[list[pl.DataFrame], int]:
    """Selected frames of an array stream: one group, IDs in order, an ID sometimes on two adjacent rows (its
    items both sent), split into frames at ID boundaries (a frame holds every row of its IDs)."""
    ids = draw(
        st.lists(st.sampled_from(["a", "b1", "Ü", 'q"', "c", "d", "e", "😀"]), unique=True, max_size=9)
    )
    rows = [
        (x, "", i, json.dumps({"extId": x, "k": k}, ensure_ascii=False))
        for i, x in enumerate(ids)
        for k in range(draw(st.integers(1, 2)))
    ]
    frames = frames_cut_at(rows, sorted(draw(st.sets(st.integers(0, len(rows)), max_size=3))))
    return frames, draw(st.integers(1, 4))


@settings(max_examples=300, deadline=None)
@given(_array_frames())
def test_ended_items_cut_as_the_joined_items(case: tuple[list[pl.DataFrame], int]) -> None:
    frames, size = case
    want = [(c.group, c.items, tuple(c.ext_ids), dict(c.origins)) for c in cut(frames, size, ["f.csv"])]
    ended = [f.with_columns(pl.concat_str(pl.col(ITEM), pl.lit(","))) for f in frames]
    got = [
        (c.group, c.items, tuple(c.ext_ids), dict(c.origins)) for c in cut(ended, size, ["f.csv"], ended=True)
    ]
    assert got == want


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40_000),
    st.lists(st.tuples(st.integers(0, 39_999), st.integers(1, 3000)), min_size=1, max_size=20),
    st.sampled_from(["built", "sliced", "gathered", "short"]),
)
def test_ended_items_read_in_place_are_the_items_copied(
    n: int, runs: list[tuple[int, int]], how: str
) -> None:
    """A run's ended items read where polars keeps them (:class:`_Views`: string views into its buffers, a run
    of rows one slice of a buffer, or a few where it crosses into the next) are the bytes of the items copied
    into one array (:class:`_Values`) — for a column made by a concatenation (written row after row into
    buffers of growing size: large ones cross several) and a slice of one; rows not back to back (gathered:
    one stretch a row) and short values (kept inside their views) are not read in place."""
    ids = pl.int_range(n, eager=True).alias("i").to_frame()
    item = (
        pl.format("{},", pl.col("i"))
        if how == "short"
        else pl.concat_str(pl.lit('{"extId":"user-'), pl.col("i").cast(pl.String), pl.lit('","ü":"é😀"},'))
    )
    column = ids.select(item.alias(ITEM)).to_series()
    if how == "sliced":
        column = column.slice(n // 3)
    elif how == "gathered":
        column = column.gather(pl.int_range(column.len(), eager=True).reverse())
    views = _Views.of(column)
    if how == "short" or (how == "gathered" and column.len() > 64):  # in views, or a stretch a row: copied
        assert views is None
        return
    assert views is not None
    copied = _Values(column)
    for lo, length in runs:
        lo = lo % column.len()
        hi = min(column.len(), lo + length)
        assert bytes(views.ended(lo, hi)) == bytes(copied.ended(lo, hi))


def test_ended_items_refuse_items_without_their_comma() -> None:
    frame = pl.DataFrame(
        {EXT_ID: ["a", "b"], GROUP: ["", ""], ITEM: ['{"x":1}', '{"x":2}'], FILE: [0, 0], ROW: [1, 2]},
        schema={EXT_ID: pl.String, GROUP: pl.String, ITEM: pl.String, FILE: pl.Int32, ROW: pl.Int64},
    )
    with pytest.raises(ValueError, match="comma"):
        list(cut([frame], 10, ["f.csv"], ended=True))
    with pytest.raises(ValueError, match="neither"):
        list(cut([frame], 10, ["f.csv"], ended=True, id_items=True))


def test_every_array_stream_selects_its_items_ended_and_no_other_stream_does(tmp_path: Path) -> None:
    (tmp_path / "users.csv").write_text(
        'id,name,score,tags,news,push\nu1,Ann,1.0,a,true,true\nu2,,2.5,,false,false\n"u""3","Bo\nb",,b|a,,true\n',
        encoding="utf-8",
    )
    (tmp_path / "job.yaml").write_text(
        "version: 1\nname: t\nworkdir: work\n"
        "destination: {platform: netmera, base_url: 'http://127.0.0.1:9/rest/3.0/', secret: {env: K}}\n"
        "sources:\n  - name: users\n    path: users.csv\n    ext_id: id\n"
        "    attributes: {name: {attribute: name, on_null: unset}, score: number}\n"
        "    tags: [{column: tags, delimiter: '|'}]\n"
        "    opt_ins: {push: push, categories: {News: news}}\n",
        encoding="utf-8",
    )
    with build_plan(load_job(tmp_path / "job.yaml")) as plan:
        (staged,) = plan.staged
        seen = set()
        for stream in streams_for(staged.source):
            (frame,) = staged.frames(stream.columns)
            if stream.shape is not Shape.ARRAY:
                with pytest.raises(ValueError, match="only an array"):
                    stream.select_ended(frame)
                continue
            seen.add(stream.operation)
            plain, ended = stream.select(frame), stream.select_ended(frame)
            assert ended[ITEM].to_list() == [t + "," for t in plain[ITEM].to_list()]
            # The bodies made from the ended items are those the joined plain items make, batch for batch.
            want = [_body(stream.shape, run.group, run.text) for run in cut([plain], 2, staged.files)]
            got = [b.body for b in stream_batches(stream, [frame], 2, staged.files)]
            assert got == want and got
    assert seen == {Operation.SET_ATTRIBUTES, Operation.UNSET_ATTRIBUTES, Operation.SET_CATEGORIES}


_CHARS = st.sampled_from([enc.ESCAPED_BYTES, b"\n", b"a\n", b"0", b""])


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=40), st.text("abcXYZ019", max_size=40).map(str.encode)), _CHARS)
def test_holds_any_is_a_membership_test(raw: bytes, chars: bytes) -> None:
    assert enc.holds_any(raw, chars) is any(b in raw for b in chars)
