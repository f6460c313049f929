"""The requests counted from the staging area's buckets: the shortcuts Netmera's count takes (IDs counted as
integers, tags straight from their lists, categories from the IDs) give exactly what the plain form gives."""

from __future__ import annotations

import functools
import zlib
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.config import Source, load_job
from sync.planning._staging import canonical_order
from sync.planning.validation import KEY, canonical_key
from sync.platforms.netmera import _streams as netmera_streams

_JOB = """\
version: 1
name: staging
workdir: work
destination: {platform: netmera, base_url: "http://127.0.0.1:8080/rest/3.0/", secret: {env: NETMERA_API_KEY}}
sources:
  - name: users
    path: users.csv
    ext_id: id
    attributes:
      name: string
      city: {on_null: unset}
      likes: {type: list, mode: push, delimiter: ";"}
    tags: [{column: tags, delimiter: ";"}, {column: more_tags, delimiter: ";"}]
    opt_ins:
      push: push
      categories: {Promo: promo, News: news}
  - name: deletions
    kind: deletions
    path: deletions.csv
    ext_id: id
"""

# "plumless" and "buckeroo" share a CRC-32: two IDs of one key.
_IDS = ["plumless", "buckeroo", "a", "b", "c", "user-1", "user-2"]


@functools.cache
def _sources(directory: str) -> tuple[Source, ...]:
    path = Path(directory) / "job.yaml"
    path.write_text(_JOB, encoding="utf-8")
    return load_job(path).sources


def _frame(rows: list[tuple[str, str | None, bool | None]]) -> pl.DataFrame:
    """Clean rows in read order (two files, rows ascending), keyed, with the users source's columns."""
    n = len(rows)
    tags = [["t1", "t2"], ["t2"], None, ["t1", "t3", "t1"]]
    frame = pl.DataFrame(
        {
            "__ext_id": [r[0] for r in rows],
            "__file": [i * 2 // max(1, n) for i in range(n)],
            "__row": list(range(1, n + 1)),
            "name": [r[1] for r in rows],
            "city": [None if r[1] is None else r[1].upper() for r in rows],
            "likes": [tags[i % 4] for i in range(n)],
            "tags": [tags[(i + 1) % 4] for i in range(n)],
            "more_tags": [tags[(i + 2) % 4] for i in range(n)],
            "push": [r[2] for r in rows],
            "promo": [r[2] for r in rows],
            "news": [None if r[2] is None else not r[2] for r in rows],
        },
        schema={
            "__ext_id": pl.String,
            "__file": pl.Int32,
            "__row": pl.Int64,
            "name": pl.String,
            "city": pl.String,
            "likes": pl.List(pl.String),
            "tags": pl.List(pl.String),
            "more_tags": pl.List(pl.String),
            "push": pl.Boolean,
            "promo": pl.Boolean,
            "news": pl.Boolean,
        },
    )
    return frame.with_columns(canonical_key(frame["__ext_id"])).select(KEY, pl.all().exclude(KEY))


_ROWS = st.lists(
    st.tuples(st.sampled_from(_IDS), st.sampled_from(["x", "y", None]), st.sampled_from([True, False, None])),
    max_size=60,
)


def _counted_plainly(
    stream: netmera_streams.Stream, frames: list[pl.DataFrame], size: int
) -> tuple[int, int]:
    """``(requests, ids)`` as the selected rows' unique IDs per group give them, text and all."""
    size = netmera_streams._size(stream, size)  # one ID per request to a one-user endpoint
    per_group: dict[str, int] = {}
    for frame in frames:
        selected = stream.select(frame, False)
        for group, n in selected.group_by(netmera_streams.GROUP).agg(pl.col("__ext_id").n_unique()).rows():
            per_group[group] = per_group.get(group, 0) + n
    return sum(-(-n // size) for n in per_group.values()), sum(per_group.values())


@settings(max_examples=100, deadline=None)
@given(rows=_ROWS, size=st.sampled_from([1, 2, 3, 1000]))
def test_requests_counted_from_integer_ids_are_those_of_the_ids_themselves(
    tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[str, str | None, bool | None]], size: int
) -> None:
    """Netmera's count numbers each frame's IDs (from their keys when every row is an ID of its own, else from
    the IDs) and counts those: every stream of a users source — profiles, unsets, categories (two rows per ID),
    flags, tags of two columns with a tag listed twice — counts what its selected IDs give, for frames of one
    row per ID or of several (an ID in many rows, two IDs of one key), with their keys or without."""
    directory = tmp_path_factory.mktemp("counts")
    source = _sources(str(directory))[0]
    ordered = canonical_order(_frame(rows))
    one_each = ordered.unique("__ext_id", keep="last", maintain_order=True)
    halves = [ordered.filter(pl.col(KEY) < 2**31), ordered.filter(pl.col(KEY) >= 2**31)]
    for frames in ([ordered], [one_each], halves, []):
        for stream in netmera_streams.streams_for(source):
            expected = _counted_plainly(stream, frames, size)
            assert netmera_streams.stream_counts(stream, frames, size) == expected
            unkeyed = [f.drop(KEY) for f in frames]
            assert netmera_streams.stream_counts(stream, unkeyed, size) == expected


def test_two_ids_of_one_key_are_two_ids_when_counted(tmp_path: Path) -> None:
    """Rows whose keys repeat are not taken for one ID each by their keys: two IDs of one CRC-32, one row
    each, are two IDs, and one ID's two rows are one."""
    assert zlib.crc32(b"plumless") == zlib.crc32(b"buckeroo")
    frame = _frame([("plumless", "x", True), ("buckeroo", "x", True), ("a", "x", True), ("a", "y", True)])
    stream = next(
        s
        for s in netmera_streams.streams_for(_sources(str(tmp_path))[0])
        if s.operation.value == "set_attributes"
    )
    assert netmera_streams.stream_counts(stream, [canonical_order(frame)], 1000) == (1, 3)
