"""Snapshot mode with ``removal: delete``: a malformed CSV record never deletes the user it was written for
(sync/sources/reading.py ``_id_in_record``, sync/state holding removals), end to end against the Netmera sandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

JOB = """\
version: 1
name: leavers
workdir: work
mode: snapshot
snapshot: {{removal: delete}}
destination:
  platform: netmera
  base_url: {url}
  secret: {{env: NETMERA_API_KEY}}
sources:
  - name: users
    path: users.csv
    ext_id: id
    attributes: {{name: string, score: number}}
"""


def _users(header: str, rows: list[str]) -> str:
    return "\n".join([header, *rows]) + "\n"


async def test_a_value_holding_the_delimiter_before_the_id_column_does_not_delete_the_user(
    tmp_path: Path, netmera_sandbox_factory: Any
) -> None:
    """`Ann, Jr` unquoted before the ID column gives a record a field too many: the value in the ID's place was
    ` Jr`, so the real user (U7) looked absent from the export and was deleted for good (1 % of the state: within
    the 5 % threshold). Now a record whose ID value is uncertain names nobody and the source's removals wait."""
    from sync.config import load_job
    from sync.run import RunOptions, run

    sandbox = await netmera_sandbox_factory()
    state = sandbox.sandbox.state
    (tmp_path / "job.yaml").write_text(JOB.format(url=sandbox.url), encoding="utf-8")
    rows = [f"N{i},U{i},{i}" for i in range(100)]
    (tmp_path / "users.csv").write_text(_users("name,id,score", rows), encoding="utf-8")
    job = load_job(tmp_path / "job.yaml")
    first = await run(job, RunOptions(api_key=sandbox.api_key))
    assert int(first.exit_code) == 0 and state.exists("U7")

    rows[7] = "Ann, Jr,U7,7"
    (tmp_path / "users.csv").write_text(_users("name,id,score", rows), encoding="utf-8")
    second = await run(job, RunOptions(api_key=sandbox.api_key))
    assert int(second.exit_code) == 1  # the rejected row
    assert state.exists("U7")  # was deleted by deleteUsersPermanently
    assert second.diff is not None and second.diff.removals_held == 1 and second.diff.users_removed == 0
    assert sandbox.sandbox.core.stats.requests("deleteUsersPermanently") == 0


@pytest.mark.parametrize(
    ("header", "record", "named"),
    [
        ("id,name,score", "U7,Ann, Jr,7", "U7"),  # the ID column first: nothing can shift it
        ("name,id,score", "Ann, Jr,U7,7", None),  # a value before it holds the delimiter: Jr or U7?
        ("name,id,score", "Ann,U7,7,", None),  # a field too many: the extra one may be before the ID
        ("score,name,id", "1,Ann,U7,,", None),  # the ID column last, two fields too many
        ("name,id,score,city", "Ann,U7", None),  # too short: the ID may have moved left
        ("name,id,score", "Ann", None),  # too short to reach the ID column
        ("name,id,score", "U7,U7,U7,7", "U7"),  # every place the ID could be holds the same value
    ],
)
def test_a_malformed_record_names_the_user_only_when_its_id_is_certain(
    tmp_path: Path, header: str, record: str, named: str | None
) -> None:
    from sync.config import load_job
    from sync.planning.planning import build_plan

    (tmp_path / "job.yaml").write_text(JOB.format(url="http://127.0.0.1:9/rest/3.0/"), encoding="utf-8")
    columns = header.split(",")
    padding = {"name": "N", "id": "U1", "score": "1", "city": "C"}
    (tmp_path / "users.csv").write_text(
        _users(header, [",".join(padding[c] for c in columns), record]), encoding="utf-8"
    )
    with build_plan(load_job(tmp_path / "job.yaml")) as plan:
        rejected = list(plan.rejected_rows())
    assert [(r.row, r.ext_id) for r in rejected] == [(2, named)]
    assert rejected[0].reason.startswith("malformed CSV record")
