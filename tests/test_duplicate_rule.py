"""The duplicate rule: the newest row of an ID decides (sync.planning.validation.resolve_duplicates).

Files in path order, rows in file order. When an ID's newest row is valid it wins, as ever; when it was rejected
the ID is *held*: nothing is sent for it this run, its earlier rows are reported as held by that row, and a
snapshot run neither changes nor removes the user. The audit's case: ``U1,5,yes`` then ``U1,xx,no`` (score not a
number) sent row 1's push opt-in although the user's newest row opts out.

Runs go against the Netmera sandbox (in-process); the plan-level cases read the planner's batches and rejects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from sync.config import Job, load_job
from sync.ledger.ledger import Ledger
from sync.planning.planning import build_plan
from sync.records import BatchStatus, RejectedRow, body_json
from sync.run import RunOptions, run
from sync.sandboxes._core import FaultSpec

_JOB = """\
version: 1
name: newest
workdir: work
destination: {{platform: netmera, base_url: "{url}", secret: {{env: NETMERA_API_KEY}}}}
{extra}sources:
  - name: users
    path: "{path}"
    format: {fmt}
    ext_id: id
    attributes: {{score: number}}
    opt_ins: {{push: push}}
dispatch:
  batch_size: {batch_size}
  retry: {{max_attempts: 1}}
  request_timeout: 5
"""

_HELD = (
    "held back: the newest row of this external ID ({}) was rejected, so none of its rows is sent "
    "(the newest row decides)"
)


def _job(
    tmp_path: Path,
    files: dict[str, str],
    *,
    url: str = "http://127.0.0.1:9/rest/3.0/",
    path: str = "*.csv",
    extra: str = "",
    batch_size: int = 1000,
    fmt: str = "csv",
) -> Job:
    for name, rows in files.items():
        (tmp_path / name).write_text("id,score,push\n" + rows, encoding="utf-8")
    (tmp_path / "job.yaml").write_text(
        _JOB.format(url=url, path=path, extra=extra, batch_size=batch_size, fmt=fmt), encoding="utf-8"
    )
    return load_job(tmp_path / "job.yaml")


def _planned(job: Job, **kwargs: Any) -> tuple[dict[str, list[Any]], list[RejectedRow]]:
    """Per endpoint, the items (or IDs) planned, in order; and the rejected rows, as the rejects file lists them."""
    with build_plan(job, **kwargs) as plan:
        out: dict[str, list[Any]] = {}
        for batch in plan.batches():
            body = body_json(batch)
            out.setdefault(batch.endpoint, []).extend(body if isinstance(body, list) else [body])
        return out, list(plan.rejected_rows())


def _rejected(rows: list[RejectedRow]) -> list[tuple[str, int, str | None, str, str | None]]:
    return [(Path(r.path).name, r.row, r.column, r.reason, r.ext_id) for r in rows]


async def test_a_rejected_newest_row_holds_the_id_and_nothing_is_sent(
    tmp_path: Path, netmera_sandbox: Any
) -> None:
    """The audit's case end to end: U1's opt-in (row 1) is not sent, since U1's newest row (opting out) was
    rejected; the ledger and the rejects file name both rows. U2 goes through."""
    job = _job(tmp_path, {"users.csv": "U1,5,yes\nU1,xx,no\nU2,3,yes\n"}, url=netmera_sandbox.url)
    outcome = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    assert int(outcome.exit_code) == 1  # rows were rejected
    stats = netmera_sandbox.sandbox.stats
    assert stats.requests("enablePush") == 1 and stats.requests("disablePush") == 0  # U2's, nothing for U1
    state = netmera_sandbox.sandbox.state
    assert state.users.get("U1") is None  # no request named U1
    assert state.users["U2"].profile == {"score": 3}
    expected = [
        ("users.csv", 2, "score", "not a number", "U1"),
        ("users.csv", 1, "id", _HELD.format("row 2"), "U1"),
    ]
    with Ledger.open(outcome.ledger_path) as ledger:
        assert _rejected(ledger.rejected_rows(outcome.run_id)) == expected
    rejects = pl.read_csv(job.workdir / "rejects.csv", infer_schema=False)
    assert rejects.select("row", "reason", "ext_id").rows() == [
        (str(r), why, x) for _, r, _, why, x in expected
    ]
    assert outcome.summary.input is not None and outcome.summary.input.rows_clean == 1


def test_a_later_valid_row_after_a_rejected_one_still_wins(tmp_path: Path) -> None:
    job = _job(tmp_path, {"users.csv": "U1,xx,no\nU1,5,yes\n"})
    planned, rejects = _planned(job)
    assert planned == {
        "setProfileAttributes": [{"extId": "U1", "profile": {"score": 5}}],
        "enablePush": [{"extId": "U1"}],
    }
    assert _rejected(rejects) == [("users.csv", 1, "score", "not a number", "U1")]


def test_the_newest_files_rejected_row_holds_the_older_files_rows(tmp_path: Path) -> None:
    """Files are read in path order: b.csv's rejected row is U1's newest, and holds both of a.csv's rows (the
    reason names the file); U2's rejected row in a.csv is older than its valid row in b.csv, which wins."""
    job = _job(tmp_path, {"a.csv": "U1,5,yes\nU2,xx,no\nU1,6,yes\n", "b.csv": "U2,7,yes\nU1,xx,no\n"})
    planned, rejects = _planned(job)
    assert planned == {
        "setProfileAttributes": [{"extId": "U2", "profile": {"score": 7}}],
        "enablePush": [{"extId": "U2"}],
    }
    b = str(tmp_path / "b.csv")
    assert _rejected(rejects) == [
        ("a.csv", 2, "score", "not a number", "U2"),
        ("b.csv", 2, "score", "not a number", "U1"),
        ("a.csv", 1, "id", _HELD.format(f"row 2 of {b}"), "U1"),
        ("a.csv", 3, "id", _HELD.format(f"row 2 of {b}"), "U1"),
    ]


def test_an_id_whose_rows_are_all_rejected_and_a_missing_id_hold_nothing_else(tmp_path: Path) -> None:
    """A row without an ID names no user: it holds nobody. An ID with only rejected rows has nothing to hold."""
    job = _job(tmp_path, {"users.csv": "U1,5,yes\n,xx,no\nU3,xx,no\nU3,yy,no\n"})
    planned, rejects = _planned(job)
    assert planned["setProfileAttributes"] == [{"extId": "U1", "profile": {"score": 5}}]
    assert [(r.row, r.reason) for r in rejects] == [
        (2, "id: missing external ID; score: not a number"),
        (3, "not a number"),
        (4, "not a number"),
    ]


_TAGS_JOB = """\
version: 1
name: tags
workdir: work
destination: {platform: netmera, base_url: "http://127.0.0.1:9/rest/3.0/", secret: {env: NETMERA_API_KEY}}
sources:
  - name: tag-changes
    kind: tags
    path: tags.csv
    ext_id: id
    tag: tag
    action: action
"""


def test_a_tags_source_holds_per_id_and_tag(tmp_path: Path) -> None:
    """A tags source's rows are facts about one tag of a user each, deduplicated per (ID, tag): a rejected row
    holds its own ID and tag's earlier rows only. U1's vip rows are held by row 3 (an action that is neither tag
    nor untag); U1's news row and U2's vip row go through; a row without a tag (row 5) holds nothing."""
    (tmp_path / "tags.csv").write_text(
        "id,tag,action\nU1,vip,add\nU1,news,add\nU1,vip,maybe\nU2,vip,add\nU1,,remove\nU1,vip,add\nU1,vip,oops\n",
        encoding="utf-8",
    )
    (tmp_path / "job.yaml").write_text(_TAGS_JOB, encoding="utf-8")
    job = load_job(tmp_path / "job.yaml")
    planned, rejects = _planned(job)
    assert planned == {"tagUsers": [{"tag": "news", "extIds": ["U1"]}, {"tag": "vip", "extIds": ["U2"]}]}
    held = (
        "held back: the newest row of this external ID and tag (row 7) was rejected, so none of their rows is "
        "sent (the newest row decides)"
    )
    assert [(r.row, r.column, r.ext_id) for r in rejects[:3]] == [
        (3, "action", "U1"),
        (5, "tag", "U1"),
        (7, "action", "U1"),
    ]
    assert [(r.row, r.column, r.reason, r.ext_id) for r in rejects[3:]] == [
        (1, "id", held, "U1"),
        (6, "id", held, "U1"),
    ]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_held_ids_are_the_same_whether_the_plan_is_lazy_or_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """A changes run settles a head first and the rest as its lanes read (build_plan(lazy=True)), with the
    rejected rows' IDs staged apart: the batches, the rejects (held rows included) and the summary's counts are
    those of the plan settled at once, across many buckets and chunk files, whatever the format (CSV: malformed
    newest records too, found by the head's reading and by the staging's)."""
    import sync.planning._staging
    import sync.planning.planning

    ids = [f"user-{i:04d}" for i in range(3000)]
    frame = pl.DataFrame(
        {
            "id": ids,
            "score": [str(i) for i in range(3000)],
            "push": ["yes" if i % 2 else "no" for i in range(3000)],
        }
    )
    # Every 7th user gets a newer, rejected row (held); every 11th an older, rejected one (its valid row wins).
    newer = frame.filter(pl.int_range(pl.len()) % 7 == 0).with_columns(pl.lit("xx").alias("score"))
    older = frame.filter(pl.int_range(pl.len()) % 11 == 0).with_columns(pl.lit("yy").alias("score"))
    data = pl.concat([older, frame, newer])
    held_ids = set(newer["id"])
    if fmt == "csv":
        data.write_csv(tmp_path / "users.csv")
        with (tmp_path / "users.csv").open("a", encoding="utf-8") as fh:
            for i in range(0, 3000, 13):  # a field too many: the newest row of every 13th user, malformed
                fh.write(f"user-{i:04d},1,yes,extra\n")
                held_ids.add(f"user-{i:04d}")
    else:
        data.write_parquet(tmp_path / "users.parquet", row_group_size=700)
    job = _job(tmp_path, {}, path=f"users.{fmt}", fmt=fmt)
    with build_plan(job) as reference:
        expected = [(b.endpoint, b.batch_id) for b in reference.batches()]
        expected_rejects = list(reference.rejected_rows())
        expected_summary = reference.summary()
    held = [r for r in expected_rejects if r.reason.startswith("held back")]
    assert {r.ext_id for r in held} == held_ids and len(held) == len(held_ids)
    assert expected_summary.rows_clean == 3000 - len(held_ids)
    malformed = expected_summary.rows_read - len(data)  # the records appended to the CSV file
    assert malformed == (len(range(0, 3000, 13)) if fmt == "csv" else 0)
    assert len(expected_rejects) == len(newer) + len(older) + malformed + len(held)
    monkeypatch.setattr(sync.planning._staging, "STAGE_ROWS", 170)
    monkeypatch.setattr(sync.planning.planning, "HEAD_ROWS", 300)
    with build_plan(job, rows_per_bucket=40, lazy=True) as lazy:
        assert [(b.endpoint, b.batch_id) for b in lazy.batches()] == expected
        assert lazy.summary() == expected_summary
        assert sorted(lazy.rejected_rows(), key=_by_row) == sorted(expected_rejects, key=_by_row)


def _by_row(r: RejectedRow) -> tuple[int, str]:
    return r.row, r.reason


async def test_a_held_id_stays_held_on_resume_and_the_other_batches_keep_their_ids(
    tmp_path: Path, netmera_sandbox: Any
) -> None:
    """A run whose profile requests failed is resumed: the plan made again holds U001 as the first did (never
    sent), and the batches resumed are exactly those that failed (same batch IDs)."""
    rows = "".join(f"U{i:03d},{i},yes\n" for i in range(40)) + "U001,xx,no\n"
    job = _job(tmp_path, {"users.csv": rows}, url=netmera_sandbox.url, batch_size=10)
    sandbox = netmera_sandbox.sandbox
    sandbox.configure(faults=FaultSpec(error_500=1.0, endpoints=frozenset({"setProfileAttributes"})))
    first = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    assert int(first.exit_code) == 1
    with Ledger.open(first.ledger_path) as ledger:
        failed = {b.batch_id for b in ledger.batches(first.run_id, status=BatchStatus.FAILED)}
    assert len(failed) == 4  # 39 users, 10 a request
    sandbox.configure(faults=FaultSpec())
    resumed = await run(job, RunOptions(api_key=netmera_sandbox.api_key, resume=first.run_id))
    assert int(resumed.exit_code) == 1  # the rejected rows, reported again
    with Ledger.open(resumed.ledger_path) as ledger:
        sent = {b.batch_id for b in ledger.batches(resumed.run_id)}
        rejected = ledger.rejected_rows(resumed.run_id)
    assert sent == failed
    assert [(r.row, r.ext_id) for r in rejected] == [(41, "U001"), (2, "U001")]
    assert sandbox.state.users.get("U001") is None
    assert sandbox.state.users["U002"].profile == {"score": 2}


_SNAPSHOT = "mode: snapshot\nsnapshot: {removal: delete, max_removal_share: 1}\n"


async def test_a_held_user_is_neither_changed_nor_removed_in_snapshot_mode(
    tmp_path: Path, netmera_sandbox: Any
) -> None:
    """Snapshot mode: U1 is in the export, but its newest row was rejected. The user is present, just not
    trustworthy this run: no request names U1 (its older, valid row's score 6 is not sent; it is not deleted)
    and its state row stays as the last confirmed run left it."""
    from sync.state import StateStore

    job = _job(tmp_path, {"users.csv": "U1,5,yes\nU2,3,yes\n"}, url=netmera_sandbox.url, extra=_SNAPSHOT)
    first = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    assert int(first.exit_code) == 0
    store = StateStore(job.workdir, job.destination)
    before = store.read(job.sources[0])
    assert sorted(before["__ext_id"]) == ["U1", "U2"]
    sandbox = netmera_sandbox.sandbox
    sandbox.stats.reset()  # the second run's requests alone

    (tmp_path / "users.csv").write_text("id,score,push\nU1,6,yes\nU2,4,yes\nU1,xx,no\n", encoding="utf-8")
    second = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    assert int(second.exit_code) == 1  # rows were rejected
    assert sandbox.state.users["U1"].profile == {"score": 5}  # not 6
    assert sandbox.state.users["U2"].profile == {"score": 4}
    assert sandbox.stats.requests("deleteUsersPermanently") == 0
    assert sandbox.stats.requests("disablePush") == 0
    after = store.read(job.sources[0])
    assert (
        after.filter(pl.col("__ext_id") == "U1")
        .drop("__uncertain", strict=False)
        .equals(before.filter(pl.col("__ext_id") == "U1").drop("__uncertain", strict=False))
    )
    with Ledger.open(second.ledger_path) as ledger:
        rejected = ledger.rejected_rows(second.run_id)
    assert [(r.row, r.ext_id, r.reason) for r in rejected] == [
        (3, "U1", "not a number"),
        (1, "U1", _HELD.format("row 3")),
    ]


@pytest.mark.parametrize("lazy", [False, True])
def test_a_malformed_newest_record_holds_the_id_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lazy: bool
) -> None:
    """A one-line CSV record with a field too many names the value in the ID column's place (as a snapshot diff
    takes it, docs/sync.md): when it is that user's newest row, the user is held. A record spanning lines names
    nobody, and holds nobody."""
    import sync.planning.planning

    monkeypatch.setattr(sync.planning.planning, "HEAD_ROWS", 1)  # a lazy plan's head: a few keys, not all
    job = _job(tmp_path, {"users.csv": 'U1,5,yes\nU2,3,yes\nU1,4,no,extra\nU2,"x,no\nU2,4,yes\n'})
    planned, rejects = _planned(job, lazy=lazy)
    assert planned["setProfileAttributes"] == [{"extId": "U2", "profile": {"score": 3}}]
    assert [(r.row, r.ext_id, r.reason.split(":")[0]) for r in rejects] == [
        (3, "U1", "malformed CSV record"),
        (4, None, "malformed CSV record"),
        (1, "U1", "held back"),
    ]


def test_a_limited_sample_takes_its_users_newest_rows_from_the_rest_of_the_input(tmp_path: Path) -> None:
    """``--limit 2``: the sample is U1 and U2 (a.csv's first rows), and the newest row still decides for them.
    Reading used to stop at the sample: U1's push opt-in (a.csv) was sent although b.csv opts them out, and U2's
    row 1 although b.csv's newest row of U2 was rejected. U3 and U4 are not in the sample: their rows after it
    are neither sent nor reported."""
    job = _job(
        tmp_path,
        {
            "a.csv": "U1,5,yes\nU2,6,yes\nU3,7,yes\nU1,5,yes\n",
            "b.csv": "U4,xx,no\nU1,5,no\nU2,xx,no\nU3,8,no\n",
        },
    )
    planned, rejects = _planned(job, limit=2)
    assert planned == {
        "disablePush": [{"extId": "U1"}],
        "setProfileAttributes": [{"extId": "U1", "profile": {"score": 5}}],
    }
    b = str(tmp_path / "b.csv")
    assert _rejected(rejects)[0] == ("b.csv", 3, "score", "not a number", "U2")
    assert sorted(_rejected(rejects)[1:]) == [
        (
            "a.csv",
            1,
            "push",
            f"duplicate external ID with conflicting values: superseded by row 2 of {b} (last row wins)",
            "U1",
        ),
        ("a.csv", 2, "id", _HELD.format(f"row 3 of {b}"), "U2"),
        (
            "a.csv",
            4,
            "push",
            f"duplicate external ID with conflicting values: superseded by row 2 of {b} (last row wins)",
            "U1",
        ),
    ]


def test_a_limited_tags_sample_follows_its_id_and_tag_pairs(tmp_path: Path) -> None:
    """A tags source's sample is of (ID, tag) pairs: U1's vip tag (row 1) is removed again by row 4, so the
    sample untags it, as a full run would; U1's news rows and U2's are not in the sample of one."""
    (tmp_path / "tags.csv").write_text(
        "id,tag,action\nU1,vip,add\nU1,news,add\nU2,vip,add\nU1,vip,remove\nU1,news,remove\n",
        encoding="utf-8",
    )
    (tmp_path / "job.yaml").write_text(_TAGS_JOB, encoding="utf-8")
    planned, _ = _planned(load_job(tmp_path / "job.yaml"), limit=1)
    assert planned == {"untagUsers": [{"tag": "vip", "extIds": ["U1"]}]}
