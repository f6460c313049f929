"""Snapshot mode's removal threshold (``max_removal_share``) against the Netmera sandbox: which users it counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

JOB = """\
version: 1
name: thresholds
workdir: work
mode: snapshot
snapshot: {{removal: untag, max_removal_share: 0.05}}
destination:
  platform: netmera
  base_url: {url}
  secret: {{env: NETMERA_API_KEY}}
sources:
  - name: users
    path: users.csv
    ext_id: id
    attributes: {{name: string}}
    tags: {{column: segs, delimiter: "|"}}
"""


def _export(tmp_path: Path, ids: range) -> None:
    rows = ["id,name,segs", *(f"U{i},N{i},vip" for i in ids)]
    (tmp_path / "users.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


async def test_users_untagged_by_earlier_runs_do_not_dilute_the_removal_threshold(
    tmp_path: Path, netmera_sandbox_factory: Any
) -> None:
    """With ``removal: untag`` the users who left stay in the state. The threshold was a share of the whole
    state, so once those outnumbered the live users a truncated export untagged nearly every live user within
    the 5 %: here 20 of the 21 live users, 20 of the state's 400 (5.0 %). Now the share counts only the users a
    removal can still change: 20 of 21, refused, nothing sent."""
    from sync.config import load_job
    from sync.errors import ExitCode
    from sync.run import RunOptions, run
    from sync.state import RemovalThresholdError

    sandbox = await netmera_sandbox_factory()
    state = sandbox.sandbox.state
    (tmp_path / "job.yaml").write_text(JOB.format(url=sandbox.url), encoding="utf-8")
    job = load_job(tmp_path / "job.yaml")
    _export(tmp_path, range(400))
    assert int((await run(job, RunOptions(api_key=sandbox.api_key))).exit_code) == 0
    _export(
        tmp_path, range(21)
    )  # 379 users leave over time: a forced run untags them, they stay in the state
    assert int((await run(job, RunOptions(api_key=sandbox.api_key, force=True))).exit_code) == 0
    untags = sandbox.sandbox.core.stats.requests("untagUsers")

    _export(tmp_path, range(1))  # an upstream job failed half-way: 1 row of 21
    with pytest.raises(RemovalThresholdError, match="20 of 21 users") as refused:
        await run(job, RunOptions(api_key=sandbox.api_key))
    assert refused.value.exit_code is ExitCode.BAD_JOB_OR_INPUT
    assert sandbox.sandbox.core.stats.requests("untagUsers") == untags  # nothing untagged
    assert all(f"U{i}" in state.tags["vip"] for i in range(21))


@pytest.mark.parametrize(
    ("share", "leaving", "refused"), [(0.29, 29, False), (0.29, 30, True), (0.05, 5, False)]
)
async def test_removals_exactly_at_the_threshold_pass(
    tmp_path: Path, netmera_sandbox_factory: Any, share: float, leaving: int, refused: bool
) -> None:
    """ "More than max_removal_share" is exact at the boundary: 29 of 100 users at 0.29 pass. The run compared
    29 with 0.29 * 100 = 28.999999999999996 and refused them (exit 2), while pushsync plan said "within"."""
    from sync.config import load_job
    from sync.run import RunOptions, run
    from sync.state import RemovalThresholdError

    sandbox = await netmera_sandbox_factory()
    text = JOB.format(url=sandbox.url).replace("max_removal_share: 0.05", f"max_removal_share: {share}")
    (tmp_path / "job.yaml").write_text(text, encoding="utf-8")
    job = load_job(tmp_path / "job.yaml")
    _export(tmp_path, range(100))
    assert int((await run(job, RunOptions(api_key=sandbox.api_key))).exit_code) == 0
    _export(tmp_path, range(100 - leaving))
    if refused:
        with pytest.raises(RemovalThresholdError):
            await run(job, RunOptions(api_key=sandbox.api_key))
    else:
        result = await run(job, RunOptions(api_key=sandbox.api_key))
        assert int(result.exit_code) == 0 and result.diff is not None and result.diff.users_removed == leaving
