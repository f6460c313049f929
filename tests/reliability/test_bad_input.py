"""Bad input never becomes a traceback or a bad request: the corpus of broken files (``corpus.py``), each with its
exact outcome — rows rejected with the reason naming the column, or one BadInputError naming the file (and row and
column where they apply) and exit code 2 from the CLI, with no traceback.

Each case is checked twice: by the planner directly, and by ``pushsync run`` against a Netmera sandbox in its own
process, whose stats must show that only valid requests arrived (every answer a 200) and whose end state must hold
exactly the valid rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sync.cli import main
from sync.config import load_job
from sync.demo import start_sandbox_process, stop_sandbox_process
from sync.errors import BadInputError
from sync.planning.planning import build_plan
from sync.records import body_json

from .conftest import REPO_ROOT, SandboxHttp
from .corpus import CASES, KEY_ENV, Case, write_case

SANDBOX_KEY = "corpus-sandbox-key-5b1f"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, SandboxHttp]]:
    """One sandbox process for the module (reset before each case): ``(base URL, inspection routes)``."""
    process, url = start_sandbox_process(SANDBOX_KEY, {}, tmp_path_factory.mktemp("sandbox"))
    try:
        yield url, SandboxHttp(url.removesuffix("/rest/3.0/"))
    finally:
        stop_sandbox_process(process)


def _profiles(plan_batches: list[object]) -> dict[str, dict[str, object]]:
    return {
        item["extId"]: item["profile"]
        for batch in plan_batches
        if batch.endpoint == "setProfileAttributes"  # type: ignore[attr-defined]
        for item in body_json(batch)  # type: ignore[attr-defined]
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_the_planner_gives_the_exact_outcome(case: Case, tmp_path: Path) -> None:
    job = load_job(write_case(case, tmp_path))
    data_file = str(tmp_path / case.filename)
    if case.fatal is not None:
        with pytest.raises(BadInputError) as info:
            build_plan(job)
        error = info.value
        assert error.path == data_file
        assert case.fatal.message in error.reason, error.reason
        assert (error.row, error.column) == (case.fatal.row, case.fatal.column)
        assert not list((tmp_path / "work").glob("plan-*"))  # staging is cleaned up
        return
    with build_plan(job) as plan:
        rejects = list(plan.rejected_rows())
        batches = list(plan.batches())
    assert sorted((r.row, r.column or "") for r in rejects) == sorted(
        (e.row, e.column or "") for e in case.rejected
    )
    expected = {(e.row, e.column): e.reason for e in case.rejected}
    for rejected in rejects:
        assert rejected.path == data_file
        assert expected[(rejected.row, rejected.column)] in rejected.reason, rejected.reason
    assert {b.endpoint for b in batches} <= {"setProfileAttributes"}
    assert _profiles(list(batches)) == case.planned


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pushsync_run_sends_only_valid_rows_or_stops_with_one_error(
    case: Case,
    tmp_path: Path,
    sandbox: tuple[str, SandboxHttp],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, http = sandbox
    http.reset()
    job = write_case(case, tmp_path, url)
    monkeypatch.setenv(KEY_ENV, SANDBOX_KEY)
    code = main(["run", str(job), "--output", "json", "--progress", "none"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    if case.fatal is not None:
        assert code == 2
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, captured.err
        assert lines[0].startswith(f"pushsync: error: {tmp_path / case.filename}")
        assert case.fatal.message in lines[0]
        assert http.stats()["requests_total"] == 0  # nothing was sent
        return
    assert code == (1 if case.rejected else 0), captured.out + captured.err
    statuses = http.statuses()
    assert set(statuses) <= {"200"}, statuses  # no request the platform refused, none malformed
    users = http.state()["users"]
    assert {u["extId"]: u.get("profile", {}) for u in users} == case.planned


FATAL_SAMPLE = [c for c in CASES if c.name in ("mixed_encodings", "parquet_corrupt_data_page", "empty_file")]


@pytest.mark.parametrize("case", FATAL_SAMPLE, ids=lambda c: c.name)
def test_a_real_process_prints_one_line_and_exits_2(case: Case, tmp_path: Path) -> None:
    job = write_case(case, tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "sync", "--log-level", "debug", "plan", str(job)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, KEY_ENV: "unused-key-1234"},
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.count("\n") == 1 and str(tmp_path / case.filename) in done.stderr
    assert case.fatal is not None and case.fatal.message in done.stderr
