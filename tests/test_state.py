"""The snapshot differ, the confirmed-state store and the merge of confirmed batches (sync/state/).

Inputs go through the real reader, validator and planner staging (small CSV files); confirmations go through the
real SQLite ledger. Nothing is sent here: the end-to-end runs against the sandbox are in test_crash_resume.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import sync.state._store as state_store  # where the key-range size lives (the test shrinks it)
from sync.config import Job, load_job
from sync.errors import StateError
from sync.ledger.ledger import Ledger
from sync.planning.planning import build_plan
from sync.records import Batch, BatchResult, BatchStatus, Operation, RejectedId, body_json
from sync.state import (
    DiffCounts,
    RemovalAction,
    RemovalThresholdError,
    SnapshotDiff,
    SnapshotSettings,
    StateStore,
    commit,
    compute_diff,
    recover,
    snapshot_builder_for,
    snapshot_problems,
)

HEADER = "id,name,score,city,visits,segments,push,news,email"
BASE = [
    "u1,Ada,10,Paris,a|b,gold|vip,yes,no,ada@example.com",
    "u2,Bob,20,,c,silver,no,yes,bob@example.com",
    "u3,Cy,30,Rome,,,,,",
]

JOB = """\
version: 1
name: snap
workdir: work
destination:
  platform: netmera
  base_url: http://127.0.0.1:9/rest/3.0/
  secret: {env: NETMERA_API_KEY}
sources:
  - name: users
    path: users.csv
    ext_id: id
    attributes:
      name: string
      score: number
      city: {on_null: unset}
      visits: {type: list, mode: push}
    tags: {column: segments}
    opt_ins:
      push: push
      categories: {News: news}
    email: email
"""


def write_input(tmp_path: Path, rows: Iterable[str]) -> Job:
    (tmp_path / "job.yaml").write_text(JOB, encoding="utf-8")
    (tmp_path / "users.csv").write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return load_job(tmp_path / "job.yaml")


def diff(job: Job, run_id: str, settings: SnapshotSettings | None = None, **kwargs: Any) -> SnapshotDiff:
    store = StateStore(job.workdir, job.destination)
    with build_plan(job) as plan:
        return compute_diff(store, plan.staged, run_id, settings, builder=snapshot_builder_for(job), **kwargs)


def bodies(d: SnapshotDiff) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for batch in d.batches(record=False):
        out.setdefault(batch.endpoint, []).append(body_json(batch))
    return out


Outcome = Callable[[Batch], tuple[BatchStatus, tuple[str, ...]]]


def all_ok(_batch: Batch) -> tuple[BatchStatus, tuple[str, ...]]:
    return BatchStatus.OK, ()


def send(job: Job, d: SnapshotDiff, outcome: Outcome = all_ok) -> list[Batch]:
    """Record every batch of ``d`` in the job's real ledger with the outcome chosen per batch (no platform)."""
    sent = []
    with Ledger.open(job.workdir / "ledger.sqlite") as ledger:
        ledger.start_run(d.run_id, job=job.name)
        for batch in d.batches():
            status, refused = outcome(batch)
            ledger.record_planned(d.run_id, batch)
            ledger.record_sent(d.run_id, batch.batch_id)
            ledger.record_result(
                d.run_id,
                BatchResult(
                    batch.batch_id,
                    batch.endpoint,
                    batch.operation,
                    status,
                    attempts=1,
                    ok_ids=len(batch.ext_ids) - len(refused),
                    rejected=tuple(RejectedId(x, 5016, "refused") for x in refused),
                ),
            )
            sent.append(batch)
    return sent


def commit_run(job: Job, d: SnapshotDiff, settings: SnapshotSettings | None = None) -> None:
    store = StateStore(job.workdir, job.destination)
    with Ledger.open(job.workdir / "ledger.sqlite") as ledger:
        commit(store, job.sources, d.directory, ledger, settings, builder=snapshot_builder_for(job))


def sync_once(
    job: Job, run_id: str, settings: SnapshotSettings | None = None, outcome: Outcome = all_ok
) -> list[Batch]:
    d = diff(job, run_id, settings)
    sent = send(job, d, outcome)
    commit_run(job, d, settings)
    return sent


def state_rows(job: Job) -> dict[str, dict[str, Any]]:
    store = StateStore(job.workdir, job.destination)
    frame = store.read(job.sources[0])
    # Without the uncertain mark (test_a_change_that_landed_unconfirmed_is_undone_when_the_export_goes_back).
    return {r["__ext_id"]: r for r in frame.drop("__key", "__uncertain", strict=False).to_dicts()}


def test_first_run_sends_every_value_and_the_state_records_them(tmp_path: Path) -> None:
    job = write_input(tmp_path, BASE)
    d = diff(job, "r1")
    assert d.counts.users_new == 3 and d.counts.users_changed == 3 and d.counts.users_state == 0
    sent = bodies(d)
    assert sorted(b["tag"] for b in sent["tagUsers"]) == ["gold", "silver", "vip"]
    assert "unsetProfileAttributes" not in sent  # nothing was held before: nothing to unset
    profiles = {i["extId"]: i["profile"] for i in sent["setProfileAttributes"][0]}
    assert profiles == {
        "u1": {"name": "Ada", "score": 10, "city": "Paris"},
        "u2": {"name": "Bob", "score": 20},
        "u3": {"name": "Cy", "score": 30, "city": "Rome"},
    }
    send(job, d)
    commit_run(job, d)
    rows = state_rows(job)
    assert rows["u1"] == {
        "__ext_id": "u1",
        "attr:name": "Ada",
        "attr:score": 10.0,
        "attr:city": "Paris",
        "push:visits": ["a", "b"],
        "optin:push": True,
        "category:News": False,
        "email": "ada@example.com",
        "tags": ["gold", "vip"],
    }
    assert rows["u3"]["tags"] == [] and rows["u3"]["optin:push"] is None
    assert not d.directory.exists()  # committed: the pending delta is gone


def test_second_run_without_changes_sends_nothing(tmp_path: Path) -> None:
    job = write_input(tmp_path, BASE)
    sync_once(job, "r1")
    d = diff(job, "r2")
    assert d.counts == DiffCounts(users_current=3, users_state=3)
    assert list(d.batches(record=False)) == []
    assert d.request_counts() == {}


def test_changes_are_diffed_field_by_field(tmp_path: Path) -> None:
    job = write_input(tmp_path, BASE)
    sync_once(job, "r1")
    write_input(
        tmp_path,
        [
            "u1,Ada,11,,a|b|z,gold,yes,yes,ada@example.com",  # score, city emptied, visit z, vip gone, News on
            "u2,Bob,20,,c,silver,yes,yes,bob@new.example",  # push on, new e-mail
            "u3,Cy,30,Rome,,,,,",  # unchanged
        ],
    )
    d = diff(job, "r2")
    assert d.counts.users_changed == 2 and d.counts.users_unchanged == 1
    sent = bodies(d)
    assert sent["setProfileAttributes"] == [[{"extId": "u1", "profile": {"score": 11}}]]
    assert sent["unsetProfileAttributes"] == [[{"extId": "u1", "profile": ["city"]}]]
    assert sent["pushProfileAttributes"] == [[{"extId": "u1", "profile": {"visits": ["z"]}}]]
    assert sent["untagUsers"] == [{"tag": "vip", "extIds": ["u1"]}]
    assert "tagUsers" not in sent
    assert sent["setCategoryPreferences"] == [[{"extId": "u1", "category": "News", "enable": True}]]
    assert sent["enablePush"] == [{"extId": "u2"}]
    assert sent["updateEmail"] == [{"extId": "u2", "email": "bob@new.example"}]
    send(job, d)
    commit_run(job, d)
    assert list(diff(job, "r3").batches(record=False)) == []
    rows = state_rows(job)
    assert rows["u1"]["attr:city"] is None and rows["u1"]["tags"] == ["gold"]
    assert rows["u1"]["push:visits"] == ["a", "b", "z"]


def test_an_empty_cell_is_left_alone_unless_unset_is_configured(tmp_path: Path) -> None:
    job = write_input(tmp_path, BASE)
    sync_once(job, "r1")
    write_input(tmp_path, ["u1,,10,Paris,a|b,gold|vip,yes,no,ada@example.com", *BASE[1:]])
    assert bodies(diff(job, "r2")) == {}  # name: on_null skip
    sent = bodies(diff(job, "r3", SnapshotSettings(unset_on_empty=True)))
    assert sent == {"unsetProfileAttributes": [[{"extId": "u1", "profile": ["name"]}]]}


def test_failed_and_refused_ids_keep_their_old_state_and_are_sent_again(tmp_path: Path) -> None:
    job = write_input(tmp_path, BASE)

    def outcome(batch: Batch) -> tuple[BatchStatus, tuple[str, ...]]:
        if batch.operation is Operation.SET_ATTRIBUTES:
            return BatchStatus.REJECTED, ("u2",)  # the platform refused u2's profile, took the others
        if batch.operation is Operation.TAG and body_json(batch)["tag"] == "vip":
            return BatchStatus.FAILED, ()
        return BatchStatus.OK, ()

    sync_once(job, "r1", outcome=outcome)
    rows = state_rows(job)
    # A refused ID keeps its old state (the platform said no); a failed batch's outcome is unknown: its user's
    # row holds what was sent (vip) and is uncertain, so the next run sends the user's every value again.
    assert rows["u1"]["attr:name"] == "Ada" and rows["u1"]["tags"] == ["gold", "vip"]
    assert rows["u2"]["attr:name"] is None and rows["u2"]["email"] == "bob@example.com"
    uncertain = StateStore(job.workdir, job.destination).read(job.sources[0])
    assert sorted(uncertain.filter(pl.col("__uncertain"))["__ext_id"]) == ["u1"]
    d2 = diff(job, "r2")
    again = bodies(d2)
    assert again == {
        "enablePush": [{"extId": "u1"}],
        "pushProfileAttributes": [[{"extId": "u1", "profile": {"visits": ["a", "b"]}}]],
        "setCategoryPreferences": [[{"category": "News", "enable": False, "extId": "u1"}]],
        "setProfileAttributes": [
            [
                {"extId": "u1", "profile": {"city": "Paris", "name": "Ada", "score": 10}},
                {"extId": "u2", "profile": {"name": "Bob", "score": 20}},
            ]
        ],
        "tagUsers": [{"tag": "gold", "extIds": ["u1"]}, {"tag": "vip", "extIds": ["u1"]}],
        "updateEmail": [{"email": "ada@example.com", "extId": "u1"}],
    }
    send(job, d2)
    commit_run(job, d2)
    assert bodies(diff(job, "r3")) == {}  # all confirmed: certain again, nothing to send


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (RemovalAction.NONE, {}),
        (RemovalAction.UNTAG, {"untagUsers": [{"tag": "silver", "extIds": ["u2"]}]}),
        (RemovalAction.DELETE, {"deleteUsersPermanently": [{"extIds": ["u2"]}]}),
    ],
)
def test_users_that_left_the_export_get_the_removal_action(
    tmp_path: Path, action: RemovalAction, expected: dict[str, Any]
) -> None:
    settings = SnapshotSettings(removal=action, max_removal_share=0.5)
    job = write_input(tmp_path, BASE)
    sync_once(job, "r1", settings)
    write_input(tmp_path, [BASE[0], BASE[2]])
    d = diff(job, "r2", settings)
    assert d.counts.users_left == 1
    assert d.counts.users_removed == (0 if action is RemovalAction.NONE else 1)
    assert bodies(d) == expected
    send(job, d)
    commit_run(job, d, settings)
    rows = state_rows(job)
    if action is RemovalAction.DELETE:
        assert "u2" not in rows
    else:
        assert rows["u2"]["attr:name"] == "Bob"  # the platform still holds the profile
        assert rows["u2"]["tags"] == ([] if action is RemovalAction.UNTAG else ["silver"])
    assert list(diff(job, "r3", settings).batches(record=False)) == []


def test_removals_past_the_threshold_are_refused_unless_forced(tmp_path: Path) -> None:
    settings = SnapshotSettings(removal=RemovalAction.DELETE, max_removal_share=0.5)
    job = write_input(tmp_path, BASE)
    sync_once(job, "r1", settings)
    write_input(tmp_path, [BASE[0]])  # 2 of 3 users gone: 67% > 50%
    with pytest.raises(RemovalThresholdError, match=r"2 of 3 users .* --force"):
        diff(job, "r2", settings)
    store = StateStore(job.workdir, job.destination)
    assert store.pending() == [] and not (store.pending_root / "r2").exists()
    d = diff(job, "r3", settings, force=True)
    assert bodies(d) == {"deleteUsersPermanently": [{"extIds": sorted(["u2", "u3"], key=_canonical)}]}


def _canonical(ext_id: str) -> tuple[int, str]:
    import zlib

    return zlib.crc32(ext_id.encode()), ext_id


def test_full_refresh_ignores_the_state(tmp_path: Path) -> None:
    job = write_input(tmp_path, BASE)
    sync_once(job, "r1")
    d = diff(job, "r2", full_refresh=True)
    sent = bodies(d)
    assert sorted(b["tag"] for b in sent["tagUsers"]) == ["gold", "silver", "vip"]
    assert sent["unsetProfileAttributes"] == [[{"extId": "u2", "profile": ["city"]}]]
    assert d.counts.users_changed == 3


def test_a_crashed_run_is_recovered_from_its_pending_delta(tmp_path: Path) -> None:
    job = write_input(tmp_path, BASE)
    d = diff(job, "r1")
    # The run "dies" after its first two batches were confirmed: the others were never answered.
    with Ledger.open(job.workdir / "ledger.sqlite") as ledger:
        ledger.start_run("r1", job=job.name)
        for i, batch in enumerate(d.batches()):
            ledger.record_planned("r1", batch)
            if i < 2:
                ledger.record_result(
                    "r1", BatchResult(batch.batch_id, batch.endpoint, batch.operation, BatchStatus.OK, 1)
                )
            else:
                ledger.record_sent("r1", batch.batch_id)
    store = StateStore(job.workdir, job.destination)
    assert store.pending() == [d.directory]
    with (d.directory / "batches.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('{"s": "users", "b": "abc')  # the process died in the middle of a line
    with Ledger.open(job.workdir / "ledger.sqlite") as ledger:
        reports = recover(store, job.sources, ledger, builder=snapshot_builder_for(job))
    assert [r.batches_confirmed for r in reports] == [2]
    assert store.pending() == []
    with Ledger.open(job.workdir / "ledger.sqlite") as ledger:
        info = ledger.run("r1")
        assert info is not None and info.status == "interrupted" and info.exit_code == 4
    # Every user had a batch never answered: the platform may hold any of it, so each is uncertain and gets
    # every value again — the confirmed opt-outs (category News off for u1, disablePush u2) included, and an
    # unset of what the export leaves empty (u2's city), as a full refresh of those users would.
    frame = store.read(job.sources[0])
    assert frame["__uncertain"].to_list() == [True, True, True]
    d2 = diff(job, "r2")
    again = bodies(d2)
    assert again["disablePush"] == [{"extId": "u2"}] and len(again["setCategoryPreferences"]) == 2
    assert {i["extId"] for i in again["setProfileAttributes"][0]} == {"u1", "u2", "u3"}
    assert again["unsetProfileAttributes"] == [[{"extId": "u2", "profile": ["city"]}]]
    send(job, d2)
    commit_run(job, d2)
    assert bodies(diff(job, "r3")) == {}  # confirmed: certain again


def test_many_key_ranges_give_the_same_result_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        f"user{i},N{i},{i},C{i % 7},,{'gold' if i % 3 else 'silver'},{'yes' if i % 2 else 'no'},,"
        for i in range(200)
    ]
    changed = [r.replace(",gold,", ",silver,") if i % 10 == 0 else r for i, r in enumerate(rows)]
    results = []
    for name, per_range in (("one", 150_000), ("many", 16)):
        monkeypatch.setattr(state_store, "ROWS_PER_RANGE", per_range)
        (tmp_path / name).mkdir()
        job = write_input(tmp_path / name, rows)
        sync_once(job, "r1")
        write_input(tmp_path / name, changed)
        d = diff(job, "r2")
        assert (len(d.sources[0].parts) == 1) == (name == "one")
        results.append((state_rows(job), bodies(d), d.sources[0].bits))
    (state_one, sent_one, bits_one), (state_many, sent_many, bits_many) = results
    assert bits_one == 0 and bits_many == 4
    assert state_one == state_many
    assert sent_one == sent_many
    assert (
        sent_one["tagUsers"][0]["tag"] == "silver" and len(sent_one["tagUsers"][0]["extIds"]) == 13
    )  # i % 10 == 0, i % 3 != 0


def test_clean_frames_out_of_canonical_order_give_the_same_diff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sync.planning.planning import StagedSource
    from sync.planning.validation import clean_schema

    # Several key ranges, cut by position: a frame not sorted by key must be sorted first, not cut as it is.
    monkeypatch.setattr(state_store, "ROWS_PER_RANGE", 16)
    settings = SnapshotSettings(removal=RemovalAction.UNTAG, max_removal_share=1.0)
    job = write_input(tmp_path, MANY)
    sync_once(job, "r1", settings)
    rows = [r.replace(",C3,", ",Rome,") if r.startswith("user03") else r for r in MANY[:90]]
    write_input(tmp_path, rows)
    source = job.sources[0]
    store = StateStore(job.workdir, job.destination)
    builder = snapshot_builder_for(job)
    with build_plan(job) as plan:
        staged = plan.staged[0]
        frame = pl.concat(staged.frames(list(clean_schema(source))))
        expected = bodies(compute_diff(store, [staged], "sorted", settings, builder=builder))
        part = tmp_path / "shuffled.parquet"
        frame.sample(fraction=1.0, shuffle=True, seed=7).write_parquet(part)
        shuffled = StagedSource.from_parts(source, staged.files, (part,), frame.height, frame.height)
        d = compute_diff(store, [shuffled], "shuffled", settings, builder=builder)
    assert d.sources[0].bits == 3 and bodies(d) == expected
    assert d.counts.users_changed == 2 and d.counts.users_removed == 10  # user031 and user038: C3


def test_snapshot_mode_refuses_sources_it_cannot_diff(tmp_path: Path) -> None:
    job = write_input(tmp_path, BASE)
    assert snapshot_problems(job.sources[0]) == []
    from dataclasses import replace

    from sync.config import SourceKind, TagAction, TagColumn

    assert snapshot_problems(replace(job.sources[0], kind=SourceKind.EVENTS))
    assert snapshot_problems(replace(job.sources[0], tags=(TagColumn("x", action=TagAction.UNTAG),)))


def test_the_state_lock_keeps_two_runs_apart(tmp_path: Path) -> None:
    job = write_input(tmp_path, BASE)
    store = StateStore(job.workdir, job.destination)
    with store.lock(), pytest.raises(StateError, match="another run"), store.lock():
        pass
    with store.lock():  # released
        pass


def test_state_writes_are_atomic_and_per_destination(tmp_path: Path) -> None:
    job = write_input(tmp_path, BASE)
    sync_once(job, "r1")
    store = StateStore(job.workdir, job.destination)
    assert sorted(p.name for p in store.directory.iterdir() if p.is_file()) == [
        ".lock",
        "users.parquet",
    ] or sorted(p.name for p in store.directory.iterdir() if p.is_file()) == ["users.parquet"]
    from dataclasses import replace

    other = StateStore(
        job.workdir, replace(job.destination, base_url="https://restapi.netmera.com/rest/3.0/")
    )
    assert other.directory != store.directory and other.rows(job.sources[0]) == 0
    assert store.rows(job.sources[0]) == 3
    assert pl.read_parquet(store.path_for("users")).height == 3


def test_preview_shows_the_diff_and_writes_nothing(tmp_path: Path) -> None:
    from sync.state import preview

    job = write_input(tmp_path, BASE)
    sync_once(job, "r1")
    write_input(tmp_path, ["u1,Ada,11,Paris,a|b,gold|vip,yes,no,ada@example.com", *BASE[1:]])
    store = StateStore(job.workdir, job.destination)
    state_before = store.read(job.sources[0])
    with build_plan(job) as plan:
        counts, summary, refused = preview(store, plan)
    assert (
        counts.users_changed == 1 and counts.values_set == 1 and counts.users_unchanged == 2 and refused == ()
    )
    assert [(e.endpoint, e.requests, e.ids) for e in summary.endpoints] == [("setProfileAttributes", 1, 1)]
    assert summary.samples == {"setProfileAttributes": [{"extId": "u1", "profile": {"score": 11}}]}
    assert store.pending() == [] and store.read(job.sources[0]).equals(state_before)


def test_recovery_survives_a_job_mapping_changed_since_the_crash(tmp_path: Path) -> None:
    job = write_input(tmp_path, BASE)
    d = diff(job, "r1")
    send(job, d)  # everything confirmed, but the run "died" before its commit
    changed = JOB.replace("      name: string\n", "      name: string\n      nick: string\n")
    (tmp_path / "job.yaml").write_text(changed, encoding="utf-8")
    (tmp_path / "users.csv").write_text(
        "\n".join([HEADER + ",nick", *(r + ",n" for r in BASE)]) + "\n", encoding="utf-8"
    )
    job2 = load_job(tmp_path / "job.yaml")
    store = StateStore(job2.workdir, job2.destination)
    with Ledger.open(job2.workdir / "ledger.sqlite") as ledger:
        recover(store, job2.sources, ledger, builder=snapshot_builder_for(job2))
    rows = state_rows(job2)
    assert rows["u1"]["attr:name"] == "Ada" and rows["u1"]["attr:nick"] is None
    assert bodies(diff(job2, "r2")) == {
        "setProfileAttributes": [[{"extId": x, "profile": {"nick": "n"}} for x in ("u1", "u3", "u2")]]
    }


# --- issue 13: the commit writes only what changed; the diff skips what certainly did not --------------------------

MANY = [
    f"user{i:03d},N{i},{i},C{i % 7},v{i % 3}|v{i % 5},{'gold|vip' if i % 3 else 'silver'},"
    f"{'yes' if i % 2 else 'no'},{'yes' if i % 4 else ''},u{i}@example.com"
    for i in range(100)
]


def test_a_small_commit_lays_a_segment_over_the_state_instead_of_rewriting_it(tmp_path: Path) -> None:
    settings = SnapshotSettings(removal=RemovalAction.DELETE, max_removal_share=0.5)
    job = write_input(tmp_path, MANY)
    sync_once(job, "r1", settings)
    store = StateStore(job.workdir, job.destination)
    source = job.sources[0]
    base = store.path_for(source).read_bytes()
    assert store.segment_count(source) == 0 and store.rows(source) == 100
    # Two users change, one leaves (deleted), one is new: 4 % of the state, under COMPACT_SHARE.
    rows = [r.replace("N5,", "Five,") if r.startswith("user005,") else r for r in MANY]
    rows = [r.replace(",gold|vip,", ",vip|bronze,") if r.startswith("user007,") else r for r in rows]
    rows = [r for r in rows if not r.startswith("user009,")] + ["user999,New,1,Oslo,,,yes,,new@example.com"]
    write_input(tmp_path, rows)
    sync_once(job, "r2", settings)
    assert store.path_for(source).read_bytes() == base  # the base file was not rewritten
    assert store.segment_count(source) == 1 and store.overlay_rows(source) == 4
    assert store.rows(source) == 100  # one deleted, one new
    state = state_rows(job)
    assert len(state) == 100 and "user009" not in state
    assert state["user005"]["attr:name"] == "Five" and state["user999"]["attr:name"] == "New"
    assert state["user007"]["tags"] == ["bronze", "vip"]
    assert state["user006"]["attr:name"] == "N6"  # an untouched user, read from the base
    # What the base plus the segment say is exactly what the next diff compares with: nothing to send.
    assert bodies(diff(job, "r3", settings)) == {}
    # The same state read one key range at a time, in canonical order.
    whole = store.read(source, settings)
    assert whole.equals(whole.sort(["__key", "__ext_id"]))
    assert whole.height == 100 and whole["__ext_id"].n_unique() == 100


def test_the_overlay_is_folded_into_the_base_past_its_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = write_input(tmp_path, MANY)
    sync_once(job, "r1")
    store = StateStore(job.workdir, job.destination)
    source = job.sources[0]
    rows = [r.replace("N1,", "One,") if r.startswith("user001,") else r for r in MANY]
    write_input(tmp_path, rows)
    sync_once(job, "r2")
    assert store.segment_count(source) == 1
    before = store.read(source)
    base = store.path_for(source).read_bytes()
    # The next commit takes the overlay past COMPACT_SHARE: one new base, no segment left.
    monkeypatch.setattr(state_store, "COMPACT_SHARE", 0.015)
    monkeypatch.setattr("sync.state._commit.COMPACT_SHARE", 0.015)
    write_input(tmp_path, [r.replace("N2,", "Two,") if r.startswith("user002,") else r for r in rows])
    sync_once(job, "r3")
    assert store.segment_count(source) == 0 and store.path_for(source).read_bytes() != base
    assert not (store.directory / "users.manifest.json").exists()
    after = store.read(source)
    assert after.filter(pl.col("__ext_id") != "user002").equals(
        before.filter(pl.col("__ext_id") != "user002")
    )
    assert state_rows(job)["user002"]["attr:name"] == "Two" and store.rows(source) == 100


def test_a_segment_written_by_a_commit_that_died_before_its_manifest_is_not_read(tmp_path: Path) -> None:
    job = write_input(tmp_path, MANY)
    sync_once(job, "r1")
    store = StateStore(job.workdir, job.destination)
    source = job.sources[0]
    write_input(tmp_path, [r.replace("N3,", "Three,") if r.startswith("user003,") else r for r in MANY])
    d = diff(job, "r2")
    send(job, d)
    # A stray segment (the commit died after writing it, before naming it in the manifest) changes nothing.
    stray = store.directory / "users.segments"
    stray.mkdir(parents=True)
    pl.DataFrame({"__key": [0], "__ext_id": ["user003"], "__deleted": [True]}).write_parquet(
        stray / "000001.parquet"
    )
    assert "user003" in state_rows(job)
    with Ledger.open(job.workdir / "ledger.sqlite") as ledger:
        (report,) = recover(store, job.sources, ledger, builder=snapshot_builder_for(job))
    assert report.users_updated == {"users": 1}
    assert state_rows(job)["user003"]["attr:name"] == "Three" and store.rows(source) == 100


@pytest.mark.parametrize("removal", [RemovalAction.NONE, RemovalAction.UNTAG, RemovalAction.DELETE])
def test_skipping_the_unchanged_users_gives_the_exact_diff(tmp_path: Path, removal: RemovalAction) -> None:
    from sync.planning.validation import clean_schema
    from sync.state._diff import _diff_exact, _unchanged_skipped, diff_frames
    from sync.state._store import conform, state_schema

    settings = SnapshotSettings(removal=removal, max_removal_share=1.0)
    job = write_input(tmp_path, MANY)
    sync_once(job, "r1", settings)
    edits = {
        "user001,": lambda r: r.replace("gold|vip", "vip|gold"),  # same set, other order: no change
        "user002,": lambda r: r.replace("gold|vip", "gold|vip|gold"),  # a duplicate: no change
        "user004,": lambda r: r.replace(",C4,", ",,"),  # city emptied: an unset
        "user005,": lambda r: r.replace(",v2|v0,", ",v2,"),  # a push list subset: nothing new
        "user008,": lambda r: r.replace(",v2|v3,", ",v2|v9,"),  # a new pushed value
        "user010,": lambda r: r.replace(",no,yes,", ",yes,,"),  # push on, news unknown
        "user011,": lambda r: r.replace("u11@example.com", ""),  # an e-mail emptied: no change
        "user012,": lambda r: r.replace(",silver,", ",,"),  # every tag removed
    }
    rows = []
    for r in MANY:
        for prefix, edit in edits.items():
            if r.startswith(prefix):
                r = edit(r)
        if not r.startswith("user013,"):  # user013 left
            rows.append(r)
    write_input(tmp_path, [*rows, "user500,New,5,,,,,,"])
    source = job.sources[0]
    store = StateStore(job.workdir, job.destination)
    state = store.read(source, settings)
    with build_plan(job) as plan:
        current = pl.concat(plan.staged[0].frames(list(clean_schema(source))))
    narrowed = _unchanged_skipped(source, current, conform(state, state_schema(source, settings)), settings)
    # Most users are skipped before the exact comparison; a list holding a duplicate ("v0|v0": one in five here)
    # is a false alarm that the exact comparison settles.
    assert narrowed is not None and narrowed[2] >= 70
    fast, fast_counts = diff_frames(source, current, state, settings, left_file=1)
    exact, exact_counts = _diff_exact(
        source, current, conform(state, state_schema(source, settings)), settings, False, 1, None, False
    )
    assert fast.equals(exact) and fast_counts == exact_counts
    assert set(fast["__ext_id"]) == {"user004", "user008", "user010", "user012", "user500"} | (
        {"user013"} if removal is not RemovalAction.NONE else set()
    )


@pytest.mark.parametrize("removal", [RemovalAction.UNTAG, RemovalAction.DELETE])
def test_a_signature_collision_between_two_users_is_caught_by_the_exact_comparison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, removal: RemovalAction
) -> None:
    from sync.planning.validation import clean_schema
    from sync.state import _diff
    from sync.state._store import conform, state_schema

    settings = SnapshotSettings(removal=removal, max_removal_share=1.0)
    job = write_input(tmp_path, MANY)
    sync_once(job, "r1", settings)
    # user013 left and user777 is new, with exactly user013's values: their rows differ only by the ID.
    twin = MANY[13].replace("user013,", "user777,", 1)
    write_input(tmp_path, [r for r in MANY if not r.startswith("user013,")] + [twin])
    source = job.sources[0]
    state = conform(
        StateStore(job.workdir, job.destination).read(source, settings), state_schema(source, settings)
    )
    with build_plan(job) as plan:
        current = pl.concat(plan.staged[0].frames(list(clean_schema(source))))
    exact, exact_counts = _diff._diff_exact(source, current, state, settings, False, 1, None, False)
    assert set(exact["__ext_id"]) == {"user013", "user777"}
    # Without the ID in it, the new user's signature is the leaver's: a 64-bit collision, forced.
    monkeypatch.setattr(_diff, "_id_hash", lambda expr: pl.lit(0, pl.UInt64))
    assert (
        _diff._unchanged_skipped(source, current, state, settings) is None
    )  # the ID check refused the match
    fast, fast_counts = _diff.diff_frames(source, current, state, settings, left_file=1)
    assert fast.equals(exact) and fast_counts == exact_counts
    assert fast_counts.users_new == 1 and fast_counts.users_removed == 1
    # The collision changes nothing that is sent: user777 gets every value, user013 its removal.
    sent = bodies(diff(job, "r2", settings))
    assert any("user777" in json.dumps(b) for b in sent["setProfileAttributes"])
    removed = "deleteUsersPermanently" if removal is RemovalAction.DELETE else "untagUsers"
    assert any("user013" in json.dumps(b) for b in sent[removed])


def test_a_row_emptied_in_the_export_is_compared_exactly_and_sends_nothing(tmp_path: Path) -> None:
    from sync.planning.validation import clean_schema
    from sync.state import _diff
    from sync.state._store import conform, state_schema

    settings = SnapshotSettings()
    job = write_input(tmp_path, MANY)
    sync_once(job, "r1", settings)
    # An e-mail emptied (null: "no change" for a contact field) — the signatures differ, the values do not.
    write_input(tmp_path, [r.replace("u7@example.com", "") if r.startswith("user007,") else r for r in MANY])
    source = job.sources[0]
    state = conform(
        StateStore(job.workdir, job.destination).read(source, settings), state_schema(source, settings)
    )
    with build_plan(job) as plan:
        current = pl.concat(plan.staged[0].frames(list(clean_schema(source))))
    narrowed = _diff._unchanged_skipped(source, current, state, settings)
    assert narrowed is not None
    candidates, _, skipped = narrowed
    assert "user007" in set(candidates["__ext_id"]) and skipped <= 99
    delta, counts = _diff.diff_frames(source, current, state, settings, left_file=1)
    assert delta.is_empty() and counts.users_changed == 0 and counts.users_unchanged == 100


def test_skipping_the_unchanged_users_over_an_overlay_gives_the_exact_diff(tmp_path: Path) -> None:
    from sync.planning.validation import clean_schema
    from sync.state._diff import _diff_exact, diff_frames
    from sync.state._store import conform, state_schema

    settings = SnapshotSettings(removal=RemovalAction.DELETE, max_removal_share=1.0)
    job = write_input(tmp_path, MANY)
    sync_once(job, "r1", settings)
    # A small commit: user002 renamed, user003 deleted, user600 added — an overlay segment over the base.
    rows = [r.replace("N2,", "Two,") if r.startswith("user002,") else r for r in MANY]
    rows = [r for r in rows if not r.startswith("user003,")] + ["user600,Six,6,,,,,,"]
    write_input(tmp_path, rows)
    sync_once(job, "r2", settings)
    store = StateStore(job.workdir, job.destination)
    source = job.sources[0]
    assert store.segment_count(source) == 1
    # The next export: user002 renamed again, user003 back, user600 unchanged, user004 changed, user005 left.
    nxt = [r.replace("Two,", "Deux,") if r.startswith("user002,") else r for r in rows]
    nxt = [r.replace(",C4,", ",Oslo,") if r.startswith("user004,") else r for r in nxt]
    nxt = [r for r in nxt if not r.startswith("user005,")] + [MANY[3]]
    write_input(tmp_path, nxt)
    layered = store.layers(source, 0, 1 << 32, settings)
    assert layered.live.height == 2 and int(layered.replaced.sum()) == 2
    with build_plan(job) as plan:
        current = pl.concat(plan.staged[0].frames(list(clean_schema(source))))
    fast, fast_counts = diff_frames(source, current, layered, settings, left_file=1)
    merged = conform(layered.merged(), state_schema(source, settings))
    assert merged.equals(store.read(source, settings))
    exact, exact_counts = _diff_exact(source, current, merged, settings, False, 1, None, False)
    assert fast.equals(exact) and fast_counts == exact_counts
    assert set(fast["__ext_id"]) == {"user002", "user003", "user004", "user005"}
    assert fast_counts.users_new == 1 and fast_counts.users_removed == 1


def test_a_commit_repeated_after_its_segment_was_written_changes_nothing(tmp_path: Path) -> None:
    import shutil

    job = write_input(tmp_path, MANY)
    sync_once(job, "r1")
    store = StateStore(job.workdir, job.destination)
    source = job.sources[0]
    rows = [r.replace("N7,", "Seven,") if r.startswith("user007,") else r for r in MANY]
    write_input(tmp_path, [*rows, "user700,New,7,,,,,,"])
    d = diff(job, "r2")
    assert (d.directory / "users" / "00000.state.parquet").is_file()  # the diff kept the rows it read
    send(job, d)
    kept = tmp_path / "kept"
    shutil.copytree(d.directory, kept)
    commit_run(job, d)
    after = store.read(source)
    # The process died after the segment and manifest were written, before the pending directory went: the
    # next run commits it again — against a state written since the diff, so from the state, not the kept rows.
    shutil.copytree(kept, d.directory)
    with Ledger.open(job.workdir / "ledger.sqlite") as ledger:
        (report,) = recover(store, job.sources, ledger, builder=snapshot_builder_for(job))
    assert report.users_updated == {"users": 2} and report.rows == {"users": 101}
    assert store.read(source).equals(after) and store.rows(source) == 101
    assert state_rows(job)["user007"]["attr:name"] == "Seven"


_UNCERTAIN_JOB = """\
version: 1
name: uncertain
workdir: work
mode: snapshot
destination: {{platform: netmera, base_url: "{url}", secret: {{env: NETMERA_API_KEY}}}}
sources:
  - name: users
    path: users.csv
    ext_id: id
    attributes:
      name: {{type: string, on_null: unset}}
    tags: {{column: segments}}
dispatch:
  retry: {{max_attempts: 1}}
  request_timeout: 5
"""


async def test_a_change_that_landed_unconfirmed_is_undone_when_the_export_goes_back(
    tmp_path: Path, netmera_sandbox_factory: Any
) -> None:
    """Export A, then B whose every request is applied but answered 500 (outcome unknown), then A again. The
    state kept A (nothing confirmed), so the third diff found nothing to send and the platform kept B for good
    (the audit: 9,035 of 20,000 users). Now B's users are uncertain: the third run sends A's every value and
    removes B's tags, and a fourth run sends nothing (the users are certain again)."""
    from sync.run import RunOptions, run
    from sync.sandboxes._core import FaultSpec

    sandbox = await netmera_sandbox_factory()
    (tmp_path / "job.yaml").write_text(_UNCERTAIN_JOB.format(url=sandbox.url), encoding="utf-8")
    users = tmp_path / "users.csv"

    def export(name: str, tag: str, empty: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        rows = [f"u{i:02d},{'' if i in empty else f'{name}{i}'},{tag}" for i in range(20)]
        users.write_text("id,name,segments\n" + "\n".join(rows) + "\n", encoding="utf-8")

    def held(i: int) -> tuple[Any, list[str]]:
        user = sandbox.sandbox.state.users.get(f"u{i:02d}")
        profile = user.profile if user is not None else None
        return (profile or {}).get("name"), sandbox.sandbox.state.tags_of(f"u{i:02d}")

    job = load_job(tmp_path / "job.yaml")
    export("A", "gold")
    assert int((await run(job, RunOptions(api_key=sandbox.api_key))).exit_code) == 0
    assert held(3) == ("A3", ["gold"])

    export("B", "silver", empty={5})  # u05's name emptied: unset
    sandbox.sandbox.configure(faults=FaultSpec(applied_then_500=1.0))
    second = await run(job, RunOptions(api_key=sandbox.api_key))
    assert int(second.exit_code) == 1  # every batch failed: applied, answered 500
    assert held(3) == ("B3", ["gold", "silver"]) or held(3) == ("B3", ["silver"])
    assert held(5)[0] is None

    sandbox.sandbox.configure(faults=FaultSpec())
    export("A", "gold")
    third = await run(job, RunOptions(api_key=sandbox.api_key))
    assert int(third.exit_code) == 0
    for i in range(20):
        assert held(i) == (f"A{i}", ["gold"]), i
    fourth = await run(job, RunOptions(api_key=sandbox.api_key))
    assert int(fourth.exit_code) == 0 and fourth.summary.requests == 0
