"""The columnar Netmera builder (issue 13): bodies are canonical JSON bytes, batch IDs are those of the row-by-row
builder it replaced, batch cutting carries runs across frames, origins stay columnar until read, and the client
sends the bytes as they are.

Compatibility: ``tests/fixtures/netmera_batch_ids.json`` holds the batch IDs the row-by-row builder gave on the
inputs of ``netmera_compat.py`` (tags in many groups, categories, events with attributes sorting around ``extId``
and ``name``, one-user endpoints, unset lists, nulls, unicode, row-keyed events; a plan, then three snapshot
diffs). The builder must give the same IDs in the same order: a run planned by the older version resumes.
The inputs hold 17 rows that add and remove one tag or push and pull one list value, which the builder now
rejects at plan time (the older one sent them): the IDs are compared with that check off, and what the check
changes is pinned by a test of its own (the recorded file is not written again from the new code).
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from sync._prefetch import ahead
from sync.config import Destination, load_job
from sync.ledger.ledger import Ledger
from sync.planning.planning import build_plan
from sync.planning.row_keys import ROW_KEY, pack, unpack
from sync.platforms._batches import EXT_ID, FILE, GROUP, ITEM, ROW, RowOrigins, _key_bytes, cut
from sync.platforms.netmera import requests as netmera_requests
from sync.platforms.netmera.client import NetmeraClient
from sync.platforms.netmera.requests import canonical_json, split_batch, stream_batches, streams_for
from sync.platforms.registry import platform_for
from sync.records import Batch, BatchResult, BatchStatus, RowRef, body_json
from sync.state import (
    RemovalAction,
    SnapshotSettings,
    StateStore,
    commit,
    compute_diff,
    rejected_users,
    snapshot_builder_for,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netmera_compat as compat

RECORDED = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures" / "netmera_batch_ids.json").read_text()
)


def _confirm_all(job: Any, diff: Any, batches: list[Batch]) -> None:
    with Ledger.open(job.workdir / "ledger.sqlite") as ledger:
        ledger.start_run(diff.run_id, job=job.name)
        for b in batches:
            ledger.record_planned(diff.run_id, b)
            ledger.record_sent(diff.run_id, b.batch_id)
            result = BatchResult(
                b.batch_id, b.endpoint, b.operation, BatchStatus.OK, 1, ok_ids=len(b.ext_ids)
            )
            ledger.record_result(diff.run_id, result)
        commit(
            StateStore(job.workdir, job.destination),
            job.sources,
            diff.directory,
            ledger,
            builder=snapshot_builder_for(job),
        )


def test_batch_ids_are_those_of_the_row_by_row_builder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recorded IDs, every one of them, from the builder's bodies and cutting alone: the inputs hold 17
    contradictory rows (a tag added and removed, a list value pushed and pulled), which the builder's plan-time
    check now rejects; the older builder sent them. The check is switched off here so that the bodies and the
    cutting are compared on the very rows the recorded file was made from — a rejected user shifts every later
    batch of its streams, so with the check on most multi-user batches differ for that reason alone. (The file
    is not written again from the new code: it would then prove nothing.) What the check changes, and that it
    changes nothing else, is :func:`test_the_row_check_rejects_the_contradictory_rows_and_changes_nothing_else`."""
    monkeypatch.delattr(netmera_requests, "check_rows")
    job = load_job(compat.write_inputs(tmp_path))
    with build_plan(job, rows_per_bucket=compat.ROWS_PER_BUCKET) as plan:
        assert len(plan.staged[0].parts) > 4  # several frames: runs continue from one frame into the next
        batches = list(plan.batches())
        assert compat.fingerprints(batches) == RECORDED["plan"]
        for b in batches:
            assert isinstance(b.body, bytes)
            assert b.body == canonical_json(json.loads(b.body))  # the canonical form, byte for byte
            assert b.batch_id == hashlib.sha256(b.endpoint.encode() + b"\n" + b.body).hexdigest()[:16]

    snap = tmp_path / "snap"
    snap.mkdir()
    job = load_job(compat.write_inputs(snap, snapshot=True))
    store = StateStore(job.workdir, job.destination)
    with build_plan(job, rows_per_bucket=compat.ROWS_PER_BUCKET) as plan:
        diff = compute_diff(
            store, plan.staged, "r1", batch_size=job.batch_sizes, builder=snapshot_builder_for(job)
        )
        first = list(diff.batches())
        assert compat.fingerprints(first) == RECORDED["snapshot_first"]
        _confirm_all(job, diff, first)
    job = load_job(compat.write_inputs(snap, users=140, seed=14, snapshot=True))
    with build_plan(job, rows_per_bucket=compat.ROWS_PER_BUCKET) as plan:
        second = compute_diff(
            store,
            plan.staged,
            "r2",
            batch_size=job.batch_sizes,
            force=True,
            builder=snapshot_builder_for(job),
        )
        assert compat.fingerprints(second.batches(record=False)) == RECORDED["snapshot_second"]
        settings_ = SnapshotSettings(removal=RemovalAction.DELETE)
        deleting = compute_diff(
            store,
            plan.staged,
            "r3",
            settings_,
            batch_size=job.batch_sizes,
            force=True,
            builder=snapshot_builder_for(job),
        )
        assert compat.fingerprints(deleting.batches(record=False)) == RECORDED["snapshot_delete"]


_ONE_USER = frozenset({"enablePush", "disablePush", "updateEmail", "updateMsisdn"})
"""Endpoints of one user a request: a rejected user's batches go, no other batch shifts."""
_OTHER_SOURCES = frozenset({"fireEvents", "deleteUsersPermanently"})
"""Endpoints only the compat job's events and deletions sources send: the users source's row check leaves them be."""


def _contradictory_rows(users_csv: Path, *, untag: bool = True) -> set[tuple[int, str, str]]:
    """(row, column, ID) of the rows of the compat users file that add and remove a tag or push and pull a list
    value, found from the file itself (the check's expected rejects, by a second means)."""
    import csv

    def items(cell: str) -> set[str]:
        return {x.strip() for x in cell.split(";") if x.strip()}

    found = set()
    with users_csv.open(encoding="utf-8", newline="") as fh:
        for row, r in enumerate(csv.DictReader(fh), start=1):
            if untag and items(r["tags"]) & items(r["drop_tags"]):
                found.add((row, "drop_tags", r["id"]))
            elif items(r["likes"]) & items(r["dislikes"]):
                found.add((row, "dislikes", r["id"]))
    return found


def _check_rejects(plan: Any) -> set[tuple[int, str, str]]:
    return {(r.row, r.column, r.ext_id) for r in plan.rejected_rows() if "side by side" in (r.reason or "")}


def _untouched(prints: list[str], users: set[str], endpoints: frozenset[str]) -> list[str]:
    """The fingerprints of ``endpoints``' batches that name none of ``users`` — in a one-user batch the digest
    of its one ID tells (:func:`netmera_compat.fingerprints`)."""
    digests = {hashlib.sha256(x.encode()).hexdigest()[:12] for x in users}
    return [
        f
        for f in prints
        if f.split()[1] in endpoints and not (f.split()[3] == "1" and f.split()[4] in digests)
    ]


def test_the_row_check_rejects_the_contradictory_rows_and_changes_nothing_else(tmp_path: Path) -> None:
    """The compat inputs planned with the row check on (as every run is): exactly the 17 contradictory rows of
    the users file are rejected (found here from the file itself), their users get no batch of the users
    source, and the batches no rejected row can shift — one-user requests of the other users, the events and
    deletions sources' — are the recorded ones, in order; so are the snapshot diffs' one-user requests. (A
    rejected user shifts the later multi-user batches of its streams: those are compared, check off, by
    :func:`test_batch_ids_are_those_of_the_row_by_row_builder`.)"""
    job = load_job(compat.write_inputs(tmp_path))
    expected = _contradictory_rows(tmp_path / "users.csv")
    assert len(expected) == 17
    users = {x for _, _, x in expected}
    with build_plan(job, rows_per_bucket=compat.ROWS_PER_BUCKET) as plan:
        batches = list(plan.batches())
        assert _check_rejects(plan) == expected
    users_only = {"setProfileAttributes", "pushProfileAttributes", "pullProfileAttributes", *_ONE_USER}
    assert not any(users & set(b.ext_ids) for b in batches if b.endpoint in users_only)
    kept = _ONE_USER | _OTHER_SOURCES
    prints = compat.fingerprints(batches)
    assert _untouched(prints, users, kept) == _untouched(RECORDED["plan"], users, kept)
    assert (
        len(_untouched(prints, users, kept)) > 100
    )  # most of the plan's one-user and other sources' batches

    snap = tmp_path / "snap"
    snap.mkdir()
    job = load_job(compat.write_inputs(snap, snapshot=True))
    store = StateStore(job.workdir, job.destination)
    with build_plan(job, rows_per_bucket=compat.ROWS_PER_BUCKET) as plan:
        first_rows = _contradictory_rows(snap / "users.csv", untag=False)
        assert _check_rejects(plan) == first_rows
        diff = compute_diff(
            store,
            plan.staged,
            "r1",
            batch_size=job.batch_sizes,
            builder=snapshot_builder_for(job),
            rejected=rejected_users(plan.rejects_path, plan.staged),
        )
        first = list(diff.batches())
        _confirm_all(job, diff, first)
    job = load_job(compat.write_inputs(snap, users=140, seed=14, snapshot=True))
    with build_plan(job, rows_per_bucket=compat.ROWS_PER_BUCKET) as plan:
        second_rows = _contradictory_rows(snap / "users.csv", untag=False)
        assert _check_rejects(plan) == second_rows
        second = compute_diff(
            store,
            plan.staged,
            "r2",
            batch_size=job.batch_sizes,
            force=True,
            builder=snapshot_builder_for(job),
            rejected=rejected_users(plan.rejects_path, plan.staged),
        )
        second_prints = compat.fingerprints(second.batches(record=False))
    # A user rejected in either run: not in the state after the first, or held in the second.
    held = {x for _, _, x in first_rows | second_rows}
    for name, prints in (("snapshot_first", compat.fingerprints(first)), ("snapshot_second", second_prints)):
        assert _untouched(prints, held, _ONE_USER) == _untouched(RECORDED[name], held, _ONE_USER), name
        assert _untouched(prints, held, _ONE_USER), name


def test_row_keys_origins_and_splits_of_planned_batches(tmp_path: Path) -> None:
    job = load_job(compat.write_inputs(tmp_path))
    with build_plan(job, rows_per_bucket=compat.ROWS_PER_BUCKET) as plan:
        events = next(s for s in plan.staged if s.source.name == "events")
        stream = streams_for(events.source)[0]
        frames = list(plan._frames(events, stream, None))
        batches = list(stream_batches(stream, frames, compat.BATCH_SIZE, events.files))
        # Every keyed row travels with exactly one batch, in row order within it.
        keyed = pl.concat(frames)
        assert sorted(unpack([b.row_keys for b in batches]).to_list()) == sorted(keyed[ROW_KEY].to_list())
        assert sum(len(b.row_keys) // 8 for b in batches) == keyed.height
        # Origins are columns until read; then each ID's first row in its file.
        assert all(isinstance(b.origins, RowOrigins) and b.origins._map is None for b in batches)
        first_rows = keyed.group_by(EXT_ID).agg(pl.col(FILE).first(), pl.col(ROW).first())
        expected = {x: RowRef(events.files[f], r) for x, f, r in first_rows.iter_rows()}
        for b in batches:
            assert dict(b.origins) == {x: expected[x] for x in b.ext_ids}
        # Halves of a refused batch are canonical bytes with content-derived IDs, the platform's restrict too.
        big = max(batches, key=lambda b: len(b.ext_ids))
        halves = split_batch(big)
        assert halves is not None
        for half in halves:
            assert half.body == canonical_json(body_json(half))
            assert half.batch_id == hashlib.sha256(b"fireEvents\n" + half.body).hexdigest()[:16]
        assert body_json(halves[0]) + body_json(halves[1]) == body_json(big)
        cut_down = platform_for(job).restrict(big, big.ext_ids[:1])
        assert cut_down is not None and cut_down.ext_ids == big.ext_ids[:1]
        assert cut_down.body == canonical_json([i for i in body_json(big) if i["extId"] == big.ext_ids[0]])


# --- the cutting, against the row-by-row loop it replaced -------------------------------------------------------


def _row_by_row(
    rows: list[tuple[str, str, str, int, int, int]], size: int, files: list[str], first_only: bool
) -> list[tuple[str, str, tuple[str, ...], dict[str, RowRef], bytes]]:
    """The loop of the builder before issue 13 (``_streams.stream_batches``), on (id, group, item, file, row,
    key) rows: the oracle."""
    pending: dict[str, list[str]] = {}
    origins: dict[str, dict[str, RowRef]] = {}
    keys: dict[str, list[int]] = {}
    last: dict[str, str] = {}
    out = []

    def emit(group: str) -> tuple[str, str, tuple[str, ...], dict[str, RowRef], bytes]:
        items = pending.pop(group)
        found = origins.pop(group)
        last.pop(group, None)
        text = items[0] if first_only else ",".join(items)
        return group, text, tuple(found), found, pack(keys.pop(group, []))

    for ext_id, group, item, file_index, row, key in rows:
        if group not in pending:
            pending[group], origins[group] = [], {}
        elif last[group] != ext_id and len(origins[group]) >= size:
            out.append(emit(group))
            pending[group], origins[group] = [], {}
        pending[group].append(item)
        keys.setdefault(group, []).append(key)
        origins[group].setdefault(ext_id, RowRef(files[file_index], row))
        last[group] = ext_id
    out.extend(emit(group) for group in sorted(pending))
    return out


@st.composite
def _selected_rows(draw: Any) -> tuple[list[list[tuple[str, str, str, int, int, int]]], int, bool]:
    """Frames of selected rows: IDs in order, each with one or more rows (several groups, repeated groups),
    never split across frames (as the planner's buckets are)."""
    n_ids = draw(st.integers(0, 40))
    groups = draw(
        st.lists(
            st.sampled_from(
                ["", "a", "b", "é", 'q"'],
            ),
            min_size=1,
            max_size=4,
            unique=True,
        )
    )
    ids = []
    for i in range(n_ids):
        rows = []
        for r in range(draw(st.integers(1, 3))):
            group = draw(st.sampled_from(groups))
            rows.append((f"id{i:03d}", group, f'"{i}-{r}"', draw(st.integers(0, 1)), i * 10 + r, i * 100 + r))
        ids.append(rows)
    cuts = sorted(draw(st.sets(st.integers(0, n_ids), max_size=6)))
    frames, start = [], 0
    for c in [*cuts, n_ids]:
        frames.append([row for rows in ids[start:c] for row in rows])
        start = c
    return frames, draw(st.integers(1, 6)), draw(st.booleans())


_SELECTED_SCHEMA = {
    EXT_ID: pl.String,
    GROUP: pl.String,
    ITEM: pl.String,
    FILE: pl.Int32,
    ROW: pl.Int64,
    ROW_KEY: pl.UInt64,
}
"""The columns of a stream's selected rows, as the cutting takes them."""


@settings(max_examples=200, deadline=None)
@given(_selected_rows())
def test_cutting_equals_the_row_by_row_loop(case: tuple[list[list[Any]], int, bool]) -> None:
    frames, size, first_only = case
    files = ["a.csv", "b.csv"]
    schema = _SELECTED_SCHEMA
    selected = [pl.DataFrame(rows, schema=schema, orient="row") for rows in frames]
    got = [
        (c.group, c.items.decode(), c.ext_ids, dict(c.origins), c.row_keys)
        for c in cut(selected, size, files, first_only=first_only)
    ]
    want = _row_by_row([row for rows in frames for row in rows], size, files, first_only)
    assert got == want


def test_a_run_continues_in_the_next_frame_and_full_runs_come_out_when_the_next_id_arrives() -> None:
    def frame(rows: list[tuple[str, str]]) -> pl.DataFrame:
        return pl.DataFrame(
            {
                EXT_ID: [x for x, _ in rows],
                GROUP: [g for _, g in rows],
                ITEM: [f'"{x}"' for x, _ in rows],
                FILE: [0] * len(rows),
                ROW: list(range(len(rows))),
            },
            schema_overrides={FILE: pl.Int32},
        )

    frames = [frame([("a", "t"), ("b", "u"), ("c", "t")]), frame([("d", "t"), ("e", "u"), ("f", "t")])]
    runs = [(c.group, c.ext_ids) for c in cut(frames, 2, ["f.csv"])]
    # t: a,c full when d arrives (frame 2); t: d,f and u: b,e open at the end, in group order.
    assert runs == [("t", ("a", "c")), ("t", ("d", "f")), ("u", ("b", "e"))]


# --- the client sends the bytes -------------------------------------------------------------------------------


@pytest.fixture
async def recording_server() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """A local server that records each request's Content-Type and raw body and answers ``{}``."""
    seen: list[tuple[str, bytes]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Content-Type", ""), await request.read()))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/rest/3.0/{endpoint}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/rest/3.0/", seen
    finally:
        await runner.cleanup()


async def test_the_client_sends_the_body_bytes_as_they_are(
    tmp_path: Path, recording_server: tuple[str, list[tuple[str, bytes]]]
) -> None:
    url, seen = recording_server
    job = load_job(compat.write_inputs(tmp_path, users=30))
    with build_plan(job) as plan:
        batches = [b for b in plan.batches() if b.endpoint in ("setProfileAttributes", "tagUsers")][:5]
    client = NetmeraClient(Destination("netmera", url), "key-" + secrets.token_hex(12))
    try:
        for batch in batches:
            await client.send(batch)
    finally:
        await client.aclose()
    assert seen == [("application/json", b.body) for b in batches]


def test_counts_match_the_batches(tmp_path: Path) -> None:
    job = load_job(compat.write_inputs(tmp_path))
    with build_plan(job, rows_per_bucket=compat.ROWS_PER_BUCKET) as plan:
        summary = plan.summary()
        made: dict[str, list[int]] = {}
        for b in plan.batches():
            acc = made.setdefault(b.endpoint, [0, 0])
            acc[0] += 1
            acc[1] += len(b.ext_ids)
        counted: dict[str, list[int]] = {}
        for e in summary.endpoints:
            acc = counted.setdefault(e.endpoint, [0, 0])
            acc[0] += e.requests
            acc[1] += e.ids
        assert counted == made
        sample = summary.samples["tagUsers"]
        assert isinstance(sample, dict) and len(sample["extIds"]) <= 3 and isinstance(sample["tag"], str)


def test_bodies_of_shuffled_frames_are_unchanged(tmp_path: Path) -> None:
    """A different bucket size splits the same rows into other frames: the batches stay the same."""
    job = load_job(compat.write_inputs(tmp_path))
    with build_plan(job, rows_per_bucket=compat.ROWS_PER_BUCKET) as small:
        first = [(b.batch_id, b.body) for b in small.batches()]
    with build_plan(job, rows_per_bucket=random.Random(3).randint(500, 5000)) as large:
        assert [(b.batch_id, b.body) for b in large.batches()] == first


def test_frames_are_made_one_ahead_in_order_errors_reach_the_caller_and_closing_early_stops() -> None:
    made: list[int] = []

    def frames(fail_at: int | None = None) -> Iterator[int]:
        for i in range(5):
            if i == fail_at:
                raise ValueError("bad frame 3")
            made.append(i)
            yield i

    assert list(ahead(frames())) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="bad frame 3"):
        list(ahead(frames(fail_at=3)))
    made.clear()
    early = ahead(frames())
    assert next(early) == 0
    early.close()  # waits for the one frame made ahead, makes no more
    assert made == [0, 1]


def test_row_keys_are_packed_from_the_column_buffer_whatever_its_offset() -> None:
    keys = pl.Series([1, 2, 3, 2**64 - 1, 5], dtype=pl.UInt64)
    for part in (keys, keys.slice(2, 3), keys.slice(1, 0), pl.concat([keys.slice(3, 2), keys.slice(0, 2)])):
        assert _key_bytes(part) == pack(part.to_list())


def test_the_builder_gives_the_snapshot_streams(tmp_path: Path) -> None:
    """sync.state asks the platform's builder for the streams of a delta frame."""
    job = load_job(compat.write_inputs(tmp_path, snapshot=True))
    streams = platform_for(job).builder(job).snapshot_streams(job.sources[0])  # type: ignore[attr-defined]
    endpoints = [s.endpoint for s in streams]
    assert endpoints[-2:] == ["unsetProfileAttributes", "deleteUsersPermanently"]
    assert {"tagUsers", "untagUsers", "setProfileAttributes"} <= set(endpoints)
    assert "unsetProfileAttributes" not in endpoints[:-2]  # values present are set; unsets come from __unset


_TAG_LISTS = st.lists(
    st.none() | st.lists(st.none() | st.sampled_from(["a", "b", "c", "é"]), max_size=5), max_size=30
)


@settings(max_examples=300, deadline=None)
@given(_TAG_LISTS)
def test_a_tag_list_repeats_a_value_as_its_unique_count_tells(lists: list[list[str | None] | None]) -> None:
    """The tag stream's check for a list that holds a value twice (which then sends each of its tags once) tells
    lists of two by their ends and hashes only the longer ones: the same answer as counting unique values in
    every list — nulls, empty and null lists included."""
    from sync.platforms.netmera._streams import _repeats

    frame = pl.DataFrame({"tags": lists}, schema={"tags": pl.List(pl.String)})
    tags = pl.col("tags")
    want = bool(frame.select((tags.list.n_unique() < tags.list.len()).any()).item())
    assert _repeats(frame, "tags") is want


@pytest.mark.parametrize(
    ("lists", "want"),
    [
        ([["a", "b"], ["c", "c"]], True),  # a pair of equal tags
        ([["a", "b"], [None, None]], True),  # two nulls are a repeat too (as n_unique counts them)
        ([["a", "b"], ["a", None]], False),
        ([["a", "b", "a"], ["c"]], True),  # only a longer list repeats: the hashed branch
        ([["a", "b", "c"], ["b", "c"], []], False),
        ([None, ["a"]], False),
    ],
)
def test_repeated_tags_are_sent_once(lists: list[list[str | None] | None], want: bool) -> None:
    """A user's tag sent twice in its list goes once into that tag's request; lists without a repeat keep
    their order."""
    from sync.platforms.netmera._streams import _repeats, _select_tags

    frame = pl.DataFrame(
        {
            EXT_ID: [f"u{i}" for i in range(len(lists))],
            FILE: [0] * len(lists),
            ROW: list(range(1, len(lists) + 1)),
            "tags": lists,
        },
        schema={EXT_ID: pl.String, FILE: pl.Int32, ROW: pl.Int64, "tags": pl.List(pl.String)},
    )
    assert _repeats(frame, "tags") is want
    rows = _select_tags(frame, False, ["tags"])
    pairs = list(zip(rows[EXT_ID].to_list(), rows[GROUP].to_list(), strict=True))
    expected = [
        (f"u{i}", tag)
        for i, tags in enumerate(lists)
        for tag in (list(dict.fromkeys(tags)) if tags is not None else [])
        if tag is not None
    ]
    assert pairs == expected


def _interleaved_groups() -> tuple[list[pl.DataFrame], list[list[Any]]]:
    """Two frames of selected rows whose groups interleave (a tag stream's rows, one user after another)."""
    schema = _SELECTED_SCHEMA
    frames_rows = []
    for start in (0, 7):
        rows = []
        for i in range(start, start + 7):
            for j, group in enumerate(("a", "b") if i % 2 else ("c", "a", "é")):
                rows.append((f"id{i:02d}", group, f'"id{i:02d}"', 0, i + 1, 10 * i + j))
        frames_rows.append(rows)
    return [pl.DataFrame(rows, schema=schema, orient="row") for rows in frames_rows], frames_rows


def test_interleaved_groups_are_gathered_by_a_sort_not_a_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    """A selection whose groups interleave is grouped by a stable sort on the groups' hashes (cheaper than a
    partition by the strings), with the batches of the row-by-row loop."""

    def no_partition(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("partitioned by the group strings")

    monkeypatch.setattr(pl.DataFrame, "partition_by", no_partition)
    frames, rows = _interleaved_groups()
    files = ["a.csv"]
    got = [(c.group, c.items.decode(), c.ext_ids, dict(c.origins), c.row_keys) for c in cut(frames, 3, files)]
    want = _row_by_row([r for rs in rows for r in rs], 3, files, False)
    assert got == want


def test_groups_whose_hashes_collide_are_partitioned_by_their_strings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should two groups' hashes collide, their rows interleave after the sort: the strings themselves group
    them instead, and the batches are the same."""
    from sync.platforms import _batches

    monkeypatch.setattr(_batches, "_group_hash", lambda: pl.col(GROUP).hash() * 0)  # every group collides
    frames, rows = _interleaved_groups()
    files = ["a.csv"]
    got = [(c.group, c.items.decode(), c.ext_ids, dict(c.origins), c.row_keys) for c in cut(frames, 3, files)]
    want = _row_by_row([r for rs in rows for r in rs], 3, files, False)
    assert got == want
