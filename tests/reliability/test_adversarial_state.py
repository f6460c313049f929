"""Adversarial corpus, part A (issue #11): state, resume and exit codes — nothing lost, nothing sent twice.

Every case drives ``pushsync`` as a real process against a Netmera sandbox in its own process and checks what the
sandbox holds (and what it was asked) afterwards:

* a user whose row was rejected keeps their confirmed state and is never removed (snapshot mode);
* a non-idempotent row (an event) confirmed by a run is never sent again by a resume, however the input changed;
* the staging directory a killed run leaves behind is removed by the next run (never one a live run uses);
* an error after the first request went out never exits 2 ("nothing was sent");
* SIGTERM while the job is planned exits 4 with nothing half-recorded.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.conftest import REPO_ROOT, NetmeraProcess

# --- helpers -----------------------------------------------------------------------------------------------------


def pushsync(
    tmp: Path, sandbox: NetmeraProcess, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``python -m sync ARGS`` in ``tmp`` with the sandbox's key in ``NETMERA_API_KEY``."""
    return subprocess.Popen(
        [sys.executable, "-m", "sync", *args],
        cwd=tmp,
        env={**os.environ, "NETMERA_API_KEY": sandbox.api_key, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run(tmp: Path, sandbox: NetmeraProcess, *args: str) -> tuple[int, str, str]:
    return finish(pushsync(tmp, sandbox, *args, "--progress", "none"))


def inspect(sandbox: NetmeraProcess, route: str) -> Any:
    with urllib.request.urlopen(f"{sandbox.root_url}/_sandbox/{route}", timeout=30) as resp:
        return json.loads(resp.read())


def get_profile(sandbox: NetmeraProcess, ext_id: str) -> tuple[int, Any]:
    """``getProfileAttributes`` through the API, as a user would check: (HTTP status, body)."""
    request = urllib.request.Request(
        f"{sandbox.url}getProfileAttributes?extId={ext_id}", headers={"X-netmera-api-key": sandbox.api_key}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def requests_to(sandbox: NetmeraProcess, endpoint: str) -> int:
    return sum(inspect(sandbox, "stats")["requests"].get(endpoint, {}).values())


def requests_total(sandbox: NetmeraProcess) -> int:
    return int(inspect(sandbox, "stats")["requests_total"])


def ledger_rows(tmp: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{tmp / 'work' / 'ledger.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


# --- 1. a rejected row never removes its user ---------------------------------------------------------------------

USERS = 100


def snapshot_job(url: str, removal: str = "delete") -> str:
    return f"""\
version: 1
name: adversarial-snapshot
workdir: work
mode: snapshot
snapshot: {{removal: {removal}}}
destination:
  platform: netmera
  base_url: {url}
  secret: {{env: NETMERA_API_KEY}}
sources:
  - name: users
    path: users.csv
    ext_id: id
    attributes:
      name: string
      score: number
    tags: {{column: segments}}
dispatch:
  concurrency: 2
  request_timeout: 5
  retry: {{max_attempts: 2, base_delay: 0.01, max_delay: 0.05}}
"""


def user_lines(n: int = USERS) -> list[str]:
    return [f"user{i:03d},Name{i},{i},{'gold' if i % 2 else 'silver'}" for i in range(n)]


def write_users(tmp: Path, lines: list[str]) -> None:
    (tmp / "users.csv").write_text("id,name,score,segments\n" + "\n".join(lines) + "\n", encoding="utf-8")


def state_of(tmp: Path, ext_id: str) -> dict[str, Any]:
    (path,) = (tmp / "work" / "state").glob("netmera-*/users.parquet")
    rows = pl.read_parquet(path).filter(pl.col("__ext_id") == ext_id).to_dicts()
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.parametrize(
    ("removal", "broken"),
    [
        ("delete", "user007,Name7,seven,gold"),  # a typo in a number
        ("delete", "user007,Name7,7,gold,extra"),  # a field too many
        ("untag", "user007,Name7,seven,gold"),
    ],
    ids=["delete-typo", "delete-extra-field", "untag-typo"],
)
def test_a_rejected_row_keeps_its_user_and_their_confirmed_state(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess, removal: str, broken: str
) -> None:
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(snapshot_job(sandbox.url, removal), encoding="utf-8")
    lines = user_lines()
    write_users(tmp_path, lines)
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml")
    assert code == 0, (out, err)
    before = state_of(tmp_path, "user007")

    lines[7] = broken
    write_users(tmp_path, lines)
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml", "--output", "json")
    assert code == 1, (out, err)  # a rejected row: finished, with rows rejected
    doc = json.loads(out)
    assert doc["diff"]["users_held"] == 1 and doc["diff"]["users_removed"] == 0, doc["diff"]
    assert requests_to(sandbox, "deleteUsersPermanently") == 0
    assert requests_to(sandbox, "untagUsers") == 0
    status, body = get_profile(sandbox, "user007")
    assert status == 200 and body["profile"]["score"] == 7, (status, body)
    tags = {u["extId"]: u.get("tags", []) for u in inspect(sandbox, "state?format=json")["users"]}
    assert tags["user007"] == ["gold"]
    assert state_of(tmp_path, "user007") == before  # the commit kept the old confirmed state

    # Once the row is fixed nothing needs sending (its state was kept); a user truly gone is removed.
    lines[7] = user_lines()[7]
    write_users(tmp_path, lines[:-1])
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml", "--output", "json")
    assert code == 0, (out, err)
    doc = json.loads(out)
    assert doc["diff"]["users_removed"] == 1 and doc["diff"]["users_held"] == 0, doc["diff"]
    if removal == "delete":
        assert get_profile(sandbox, f"user{USERS - 1:03d}")[0] == 400
    assert get_profile(sandbox, "user007")[0] == 200


def test_a_rejected_row_that_names_no_user_holds_every_removal(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess
) -> None:
    """A quote never closed swallows the rows after it into one malformed record: nobody can tell which users
    it hid, so no user is removed this run (the output says so); ``--force`` removes them anyway."""
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(snapshot_job(sandbox.url), encoding="utf-8")
    lines = user_lines()
    write_users(tmp_path, lines)
    assert run(tmp_path, sandbox, "run", "job.yaml")[0] == 0

    # user097's name opens a quote that is never closed: user097 to user099 vanish into one malformed record;
    # user003 really left the export.
    broken = [*lines[:3], *lines[4:97], 'user097,"Name97,97,gold', *lines[98:]]
    write_users(tmp_path, broken)
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml", "--output", "json")
    assert code == 1, (out, err)
    doc = json.loads(out)
    assert doc["diff"]["users_removed"] == 0 and doc["diff"]["removals_held"] == 4, doc["diff"]
    assert requests_to(sandbox, "deleteUsersPermanently") == 0
    for ext_id in ("user003", "user097", "user098", "user099"):
        assert get_profile(sandbox, ext_id)[0] == 200, ext_id

    code, out, err = run(tmp_path, sandbox, "run", "job.yaml", "--output", "json", "--force")
    assert code == 1, (out, err)
    assert json.loads(out)["diff"]["users_removed"] == 4
    assert get_profile(sandbox, "user003")[0] == 400


def test_an_empty_id_cell_names_no_user_and_holds_nothing(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess
) -> None:
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(snapshot_job(sandbox.url), encoding="utf-8")
    lines = user_lines()
    write_users(tmp_path, lines)
    assert run(tmp_path, sandbox, "run", "job.yaml")[0] == 0
    write_users(tmp_path, [*lines[:3], *lines[4:], ",Nobody,1,gold"])
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml", "--output", "json")
    assert code == 1, (out, err)
    assert json.loads(out)["diff"]["users_removed"] == 1
    assert get_profile(sandbox, "user003")[0] == 400
