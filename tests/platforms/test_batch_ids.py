"""A batch's IDs without a Python string per ID (issue 13): :class:`sync.records.ExtIds` behaves as the tuple it
replaces, the ledger packs it as it packed the tuple, batches carrying it go through the coordination queue, and
the Netmera builder's extIds items made from the joined IDs are the bytes the per-row items gave.
"""

from __future__ import annotations

import json
import operator
import pickle
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from batch_frames import frames_cut_at
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.config import load_job
from sync.coordination.queue import decode_batch, encode_batch
from sync.ledger.ledger import pack_ids, unpack_ids
from sync.planning.planning import build_plan
from sync.platforms._batches import EXT_ID, ITEM, cut
from sync.records import Batch, ExtIds, Operation, body_json

# Any text but lone surrogates (not UTF-8) and line breaks (ExtIds' separator).
_ID = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ID, max_size=12), st.data())
def test_ext_ids_read_compare_hash_and_pickle_as_their_tuple(ids: list[str], data: Any) -> None:
    packed, plain = ExtIds.of(ids), tuple(ids)
    assert packed == plain and plain == packed and operator.ne(packed, plain) is False
    assert len(packed) == len(plain) and list(packed) == ids and bool(packed) is bool(plain)
    assert packed.lines() == "\n".join(ids).encode("utf-8")
    for i in range(-len(ids), len(ids)):
        assert ExtIds.of(ids)[i] == plain[i]  # a fresh one: the first and last read the bytes alone
    start, stop, step = data.draw(st.tuples(st.integers(-14, 14), st.integers(-14, 14), st.integers(1, 3)))
    assert packed[start:stop:step] == plain[start:stop:step]
    with pytest.raises(IndexError):
        packed[len(ids)]
    assert hash(packed) == hash(plain) and {packed: 1}[plain] == 1
    assert pickle.loads(pickle.dumps(packed)) == packed
    assert all(x in packed for x in ids)
    probe = ids[0] + "\x00" if ids else "x"  # an ID too where the IDs are ["", "\x00"]
    assert (probe in packed) is (probe in plain)
    more = data.draw(st.lists(_ID, max_size=4))
    assert packed.joined(ExtIds.of(more)) == plain + tuple(more)
    assert packed != tuple(more) or ids == more
    assert packed.count(ids[0]) == ids.count(ids[0]) if ids else packed.count("") == 0


def test_ext_ids_refuse_a_line_break_and_an_impossible_count() -> None:
    with pytest.raises(ValueError, match="line break"):
        ExtIds.of(["a", "b\nc"])
    with pytest.raises(ValueError):
        ExtIds(b"a", 0)
    assert ExtIds(b"", 1) == ("",) and ExtIds(b"", 0) == ()
    assert ExtIds.of(["a"]) != ["a"]  # like a tuple: a list is not equal


@settings(max_examples=200, deadline=None)
@given(st.lists(_ID, max_size=1200))
def test_the_ledger_packs_ext_ids_as_it_packs_the_tuple(ids: list[str]) -> None:
    packed = pack_ids(ExtIds.of(ids))
    assert packed == pack_ids(tuple(ids))
    assert unpack_ids(packed) == ids


def test_a_batch_with_ext_ids_goes_through_the_coordination_queue() -> None:
    batch = Batch("b1", "tagUsers", Operation.TAG, b'{"extIds":["a","b"],"tag":"t"}', ExtIds.of(["a", "b"]))
    back = decode_batch((batch.batch_id, batch.endpoint, batch.operation, 1, None, *encode_batch(batch)))
    assert back.ext_ids == ("a", "b") and back.body == batch.body


# --- extIds items from the joined IDs ---------------------------------------------------------------------------

_ANY_ID = st.sampled_from(["a", "b1", "Ü", 'q"', "back\\", "t\x01", "nl\nx", "😀", "c", "d"])


@st.composite
def _frames(draw: Any) -> tuple[list[pl.DataFrame], int]:
    """Selected frames of an extIds stream: IDs in order (unique in a frame, sometimes repeated on a second row
    of the same group), in several groups."""
    ids = draw(st.lists(_ANY_ID, unique=True, max_size=10))
    rows = [
        (x, group, i, json.dumps(x, ensure_ascii=False))
        for i, x in enumerate(ids)
        for group in draw(st.lists(st.sampled_from(["", "g", "h"]), min_size=1, max_size=3))
    ]
    frames = frames_cut_at(rows, sorted(draw(st.sets(st.integers(0, len(rows)), max_size=3))))
    return frames, draw(st.integers(1, 4))


@settings(max_examples=300, deadline=None)
@given(_frames())
def test_ext_id_items_made_from_the_joined_ids_are_the_per_row_items(
    case: tuple[list[pl.DataFrame], int],
) -> None:
    frames, size = case
    want = [(c.group, c.items, tuple(c.ext_ids), dict(c.origins)) for c in cut(frames, size, ["f.csv"])]
    # Without items (as a stream selects them for an extIds body): ITEM is not read.
    bare = [f.with_columns(pl.lit(None, pl.String).alias(ITEM)) for f in frames]
    runs = list(cut(bare, size, ["f.csv"], id_items=True))
    assert [(c.group, c.items, tuple(c.ext_ids), dict(c.origins)) for c in runs] == want
    for run in runs:
        # Packed, unless an ID of the run's frame holds a line break (then a tuple).
        if any("\n" in x for x in run.ext_ids):
            assert isinstance(run.ext_ids, tuple)
        elif not any(f[EXT_ID].str.contains("\n").any() for f in frames):
            assert isinstance(run.ext_ids, ExtIds)


def test_a_tag_repeated_in_a_users_list_is_sent_once(tmp_path: Path) -> None:
    (tmp_path / "users.csv").write_text("id,tags\nu1,a|b|a\nu2,b\nu3,\n", encoding="utf-8")
    (tmp_path / "job.yaml").write_text(
        "version: 1\nname: t\nworkdir: work\n"
        "destination: {platform: netmera, base_url: 'http://127.0.0.1:9/rest/3.0/', secret: {env: K}}\n"
        "sources:\n  - name: users\n    path: users.csv\n    ext_id: id\n"
        "    tags: [{column: tags, delimiter: '|'}]\n",
        encoding="utf-8",
    )
    with build_plan(load_job(tmp_path / "job.yaml")) as plan:
        tagged = {body_json(b)["tag"]: (body_json(b)["extIds"], b.ext_ids) for b in plan.batches()}
    assert tagged == {"a": (["u1"], ("u1",)), "b": (["u1", "u2"], ("u1", "u2"))}
