"""The job's ``thresholds``: a few rejected rows or refused IDs within them exit 0, not 1 (one bad row must not
fail every night); failed batches never do; the summary says which threshold decided; shares outside 0..1 are
refused when the job is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
from reliability.workload import job_yaml

from sync.config import Thresholds, load_job
from sync.demo import generate_users
from sync.errors import BadJobError, ExitCode
from sync.report.summary import threshold_decision
from sync.run import RunOptions, run
from sync.sandboxes.netmera import UnknownExtId

KEY_ENV = "PUSHSYNC_TEST_NETMERA_KEY"


def _job(tmp_path: Path, url: str, *, users: int, thresholds: str, bad_ids: int = 0) -> Path:
    path = tmp_path / "data" / "users.csv"
    frame = generate_users(path, users, seed=users)
    if bad_ids:
        # IDs longer than validation.max_id_length (256): rejected by validation, each naming its row.
        ids = frame["user_id"].to_list()
        for i in range(bad_ids):
            ids[i] = "X" * 300
        frame.with_columns(pl.Series("user_id", ids)).write_csv(path)
    dispatch = "  concurrency: 4\n  retry: {max_attempts: 3, base_delay: 0.01, max_delay: 0.05}\n"
    text = job_yaml(url, name="t", key_env=KEY_ENV, batch_size=64, dispatch=dispatch)
    job = tmp_path / "job.yaml"
    job.write_text(text + (f"thresholds: {thresholds}\n" if thresholds else ""), encoding="utf-8")
    return job


@pytest.mark.parametrize(
    ("thresholds", "code", "said"),
    [
        ("", ExitCode.PARTIAL, None),  # today's behaviour without thresholds
        (
            "{max_rejected_share: 0.01}",
            ExitCode.OK,
            "2 rejected rows within thresholds.max_rejected_share (1.00%)",
        ),
        (
            "{max_rejected_rows: 1}",
            ExitCode.PARTIAL,
            "rejected rows: 2 over thresholds.max_rejected_rows (1)",
        ),
        ("{max_refused_ids: 100}", ExitCode.PARTIAL, "2 rejected rows, and no thresholds.max_rejected_rows"),
    ],
)
async def test_rejected_rows_within_a_threshold_exit_0(
    netmera_sandbox: Any, tmp_path: Path, thresholds: str, code: ExitCode, said: str | None
) -> None:
    job = load_job(_job(tmp_path, netmera_sandbox.url, users=400, thresholds=thresholds, bad_ids=2))
    outcome = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    summary = outcome.summary
    assert summary.rows_rejected == 2 and summary.rows_read == 400
    assert outcome.exit_code is code, summary.render_text()
    if said is None:
        assert summary.threshold is None
    else:
        assert summary.threshold is not None and said in summary.threshold
        assert said in summary.render_text() and summary.to_json()["threshold"] == summary.threshold


async def test_refused_ids_within_a_threshold_exit_0_and_failed_batches_never(
    netmera_sandbox_factory: Any, tmp_path: Path
) -> None:
    running = await netmera_sandbox_factory(unknown_ext_id=UnknownExtId.ERROR)
    job = load_job(_job(tmp_path, running.url, users=64, thresholds="{max_refused_share: 0.05}"))
    known = [u for u in pl.read_csv(tmp_path / "data" / "users.csv")["user_id"].to_list() if u != "U0000037"]
    running.sandbox.state.ensure_users(known)
    outcome = await run(job, RunOptions(api_key=running.api_key))
    summary = outcome.summary
    assert summary.ids_rejected >= 1 and summary.ids_failed == 0
    assert outcome.exit_code is ExitCode.OK, summary.render_text()
    assert summary.threshold is not None
    assert (
        f"{summary.ids_rejected} refused IDs within thresholds.max_refused_share (5.00%)" in summary.threshold
    )

    # The same refusals over a tighter share: partial, saying so.
    strict = load_job(_job(tmp_path, running.url, users=64, thresholds="{max_refused_ids: 0}"))
    again = await run(strict, RunOptions(api_key=running.api_key, full_refresh=True))
    assert again.exit_code is ExitCode.PARTIAL
    assert (
        again.summary.threshold is not None
        and "over thresholds.max_refused_ids (0)" in again.summary.threshold
    )


def test_a_failed_or_over_threshold_decision_is_worded() -> None:
    ok, said = threshold_decision(
        Thresholds(max_refused_share=0.01), rows_rejected=0, rows_read=10, ids_refused=3, ids_sent=100
    )
    assert (
        not ok and said == "exit 1: refused IDs: 3 of 100 (3.00%) over thresholds.max_refused_share (1.00%)"
    )
    ok, said = threshold_decision(
        Thresholds(max_rejected_rows=5, max_refused_ids=5),
        rows_rejected=5,
        rows_read=10,
        ids_refused=1,
        ids_sent=100,
    )
    assert ok and said == (
        "exit 0: 5 rejected rows within thresholds.max_rejected_rows (5); "
        "1 refused IDs within thresholds.max_refused_ids (5)"
    )


def test_a_share_outside_0_1_is_refused(tmp_path: Path) -> None:
    job = _job(
        tmp_path, "http://127.0.0.1:9", users=4, thresholds="{max_rejected_share: 1.5, max_refused_ids: -1}"
    )
    with pytest.raises(BadJobError) as caught:
        load_job(job)
    where = {p.location for p in caught.value.problems}
    assert {"thresholds.max_rejected_share", "thresholds.max_refused_ids"} <= where


@pytest.mark.parametrize(("share", "bad"), [(0.29, 29), (0.58, 58)])
async def test_rejected_rows_exactly_at_the_share_are_within_it(
    netmera_sandbox: Any, tmp_path: Path, share: float, bad: int
) -> None:
    """A share is "at most": exactly that share of the rows read rejected still exits 0 (0.29 * 100 is
    28.999999999999996 in floating point, which made 29 of 100 rows "over" 0.29)."""
    job = load_job(
        _job(
            tmp_path,
            netmera_sandbox.url,
            users=100,
            thresholds=f"{{max_rejected_share: {share}}}",
            bad_ids=bad,
        )
    )
    outcome = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    summary = outcome.summary
    assert summary.rows_rejected == bad and summary.rows_read == 100
    assert outcome.exit_code is ExitCode.OK, summary.render_text()
    assert (
        summary.threshold == f"exit 0: {bad} rejected rows within thresholds.max_rejected_share ({share:.2%})"
    )
    ok, said = threshold_decision(
        Thresholds(max_refused_share=share), rows_rejected=0, rows_read=0, ids_refused=bad, ids_sent=100
    )
    assert ok, said
    ok, said = threshold_decision(
        Thresholds(max_refused_share=share), rows_rejected=0, rows_read=0, ids_refused=bad + 1, ids_sent=100
    )
    assert not ok, said
