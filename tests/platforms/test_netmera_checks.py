"""Rows of a Netmera users source that contradict themselves are refused at plan time
(:func:`sync.platforms.netmera.requests.check_rows`).

A row that adds and removes the same tag (``segs=Sport|VIP``, ``drop=Sport`` with ``action: untag``), or pushes
and pulls the same value of one list attribute, sent ``tagUsers`` and ``untagUsers`` (``push``/``pull``) side by
side in one phase: the sandbox held the tag after some runs of the same input and not after others. Such a row
is now a rejected row naming its file, row and columns, and nothing of it is sent; runs of the job agree with
each other and with its plan. In snapshot mode the row holds its user: the state stays as it was.

Runs go against the Netmera sandbox (in-process); the snapshot case goes through the real staging and ledger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from sync.config import Job, load_job
from sync.ledger.ledger import Ledger
from sync.planning.planning import build_plan
from sync.records import RejectedRow, body_json
from sync.run import RunOptions, run
from sync.state import StateStore

_JOB = """\
version: 1
name: contradictions
workdir: work
destination: {{platform: netmera, base_url: "{url}", secret: {{env: NETMERA_API_KEY}}}}
sources:
  - name: users
    path: users.csv
    ext_id: id
    attributes:
      name: string
      likes: {{type: list, mode: push}}
      dislikes: {{attribute: likes, type: list, mode: pull}}
{tags}{extra}dispatch:
  batch_size: 1000
  retry: {{max_attempts: 1}}
  request_timeout: 5
"""
_TAGS = """\
    tags:
      - {column: segs}
      - {column: drop, action: untag}
"""
_SNAPSHOT = "mode: snapshot\nsnapshot: {removal: delete, max_removal_share: 1}\n"
_HEADER = "id,name,likes,dislikes,segs,drop"
_ROWS = [
    "U1,Ada,,,Sport|VIP,Sport",  # adds and removes Sport
    "U2,Bob,a|b,b,,",  # pushes and pulls b
    "U3,Cy,a,c,Sport,News",  # nothing contradicts
    "U4,Di,x,x,VIP,VIP",  # both: the tags are named first
]
_TAG_REASON = (
    "segs adds and drop removes the same tag: tagUsers and untagUsers would be sent side by side, and the user "
    "would hold the tag after some runs and not after others"
)
_LIST_REASON = (
    "likes pushes and dislikes pulls the same value of attribute likes: pushProfileAttributes and "
    "pullProfileAttributes would be sent side by side, and the value would be there after some runs and not "
    "after others"
)
_EXPECTED = [
    ("users.csv", 1, "drop", _TAG_REASON, "U1"),
    ("users.csv", 2, "dislikes", _LIST_REASON, "U2"),
    ("users.csv", 4, "drop", _TAG_REASON, "U4"),
]


def _job(
    directory: Path,
    rows: list[str],
    *,
    url: str = "http://127.0.0.1:9/rest/3.0/",
    tags: bool = True,
    extra: str = "",
) -> Job:
    directory.mkdir(parents=True, exist_ok=True)
    header = _HEADER if tags else _HEADER.removesuffix(",segs,drop")
    (directory / "users.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    (directory / "job.yaml").write_text(
        _JOB.format(url=url, tags=_TAGS if tags else "", extra=extra), encoding="utf-8"
    )
    return load_job(directory / "job.yaml")


def _rejected(rows: list[RejectedRow]) -> list[tuple[str, int, str | None, str, str | None]]:
    return sorted((Path(r.path).name, r.row, r.column, r.reason, r.ext_id) for r in rows)


def _planned(job: Job) -> tuple[dict[str, list[Any]], list[RejectedRow]]:
    with build_plan(job) as plan:
        out: dict[str, list[Any]] = {}
        for batch in plan.batches():
            out.setdefault(batch.endpoint, []).append(body_json(batch))
        return out, list(plan.rejected_rows())


def test_a_contradictory_row_is_rejected_naming_file_row_and_columns(tmp_path: Path) -> None:
    planned, rejects = _planned(_job(tmp_path, _ROWS))
    assert _rejected(rejects) == _EXPECTED
    # Nothing of a rejected row is planned: U3's requests alone (its tag and list values do not meet).
    assert planned == {
        "setProfileAttributes": [[{"extId": "U3", "profile": {"name": "Cy"}}]],
        "pushProfileAttributes": [[{"extId": "U3", "profile": {"likes": ["a"]}}]],
        "pullProfileAttributes": [[{"extId": "U3", "profile": {"likes": ["c"]}}]],
        "tagUsers": [{"tag": "Sport", "extIds": ["U3"]}],
        "untagUsers": [{"tag": "News", "extIds": ["U3"]}],
    }


def test_a_contradictory_newest_row_holds_its_user_and_a_fixed_newer_row_wins(tmp_path: Path) -> None:
    """The duplicate rule applies as to any rejected row: U1's contradictory newest row holds its older row;
    U2's contradictory older row is overruled by its newer, fixed one."""
    rows = ["U1,Ada,,,Sport,", "U1,Ada,,,Sport,Sport", "U2,Bob,b,b,,", "U2,Bob,b,,,"]
    planned, rejects = _planned(_job(tmp_path, rows))
    assert sorted((r.row, r.column, r.ext_id) for r in rejects) == [
        (1, "id", "U1"),  # held back by row 2
        (2, "drop", "U1"),
        (3, "dislikes", "U2"),
    ]
    assert planned == {
        "setProfileAttributes": [[{"extId": "U2", "profile": {"name": "Bob"}}]],
        "pushProfileAttributes": [[{"extId": "U2", "profile": {"likes": ["b"]}}]],
    }


async def test_runs_of_a_job_with_contradictory_rows_agree_with_each_other_and_the_plan(
    tmp_path: Path, netmera_sandbox_factory: Any
) -> None:
    """Six runs of the same input, each against a fresh sandbox, end with the same platform state (before the
    fix: Sport held after two of six runs); each run's rejects are the plan's, and it sent what was planned."""
    ends = []
    for i in range(6):
        sandbox = await netmera_sandbox_factory()
        job = _job(tmp_path / f"run{i}", _ROWS, url=sandbox.url)
        planned, plan_rejects = _planned(job)
        outcome = await run(job, RunOptions(api_key=sandbox.api_key))
        assert int(outcome.exit_code) == 1  # rows were rejected
        with Ledger.open(outcome.ledger_path) as ledger:
            assert _rejected(ledger.rejected_rows(outcome.run_id)) == _rejected(plan_rejects) == _EXPECTED
        rejects = pl.read_csv(job.workdir / "rejects.csv", infer_schema=False)
        assert sorted(rejects.select("row", "column", "ext_id").rows()) == [
            (str(r), c, x) for _, r, c, _, x in _EXPECTED
        ]
        stats = sandbox.sandbox.stats
        assert {e: stats.requests(e) for e in planned} == {e: len(b) for e, b in planned.items()}
        state = sandbox.sandbox.state
        assert all(state.users.get(x) is None for x in ("U1", "U2", "U4"))  # no request named them
        tags = {tag: sorted(ids) for tag, ids in state.tags.items() if ids}
        users = {x: dict(u.profile or {}) for x, u in state.users.items() if u is not None}
        ends.append((tags, users))
    assert ends[0] == ({"Sport": ["U3"]}, {"U3": {"name": "Cy", "likes": ["a"]}})
    assert all(end == ends[0] for end in ends)


async def test_a_contradictory_row_in_snapshot_mode_holds_the_users_state(
    tmp_path: Path, netmera_sandbox: Any
) -> None:
    """Snapshot mode (it takes no untag columns): U1's newest row pushes and pulls the same value, and is
    rejected. U1 is held as for any rejected row: no request names it — not its new name, not a deletion
    although the removal action deletes users missing from the clean export — and its state row stays."""
    url = netmera_sandbox.url
    job = _job(tmp_path, ["U1,Ada,a,", "U2,Bob,b,"], url=url, tags=False, extra=_SNAPSHOT)
    first = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    assert int(first.exit_code) == 0
    store = StateStore(job.workdir, job.destination)
    before = store.read(job.sources[0]).drop("__uncertain", strict=False)
    sandbox = netmera_sandbox.sandbox
    sandbox.stats.reset()  # the second run's requests alone

    job = _job(tmp_path, ["U1,Ann,b,b", "U2,Bob,b,"], url=url, tags=False, extra=_SNAPSHOT)
    second = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    assert int(second.exit_code) == 1  # a row was rejected
    with Ledger.open(second.ledger_path) as ledger:
        assert _rejected(ledger.rejected_rows(second.run_id)) == [
            ("users.csv", 1, "dislikes", _LIST_REASON, "U1")
        ]
    assert sandbox.stats.requests("deleteUsersPermanently") == 0
    assert sandbox.stats.requests("setProfileAttributes") == 0  # U1's name held, U2 unchanged
    assert sandbox.state.users["U1"] is not None and sandbox.state.users["U1"].profile == {
        "name": "Ada",
        "likes": ["a"],
    }
    assert store.read(job.sources[0]).drop("__uncertain", strict=False).equals(before)
