"""``--limit N`` on ``plan`` and ``run``: a sample of the first N valid rows of each source (changes mode)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from sync.cli import main
from tests.conftest import NetmeraProcess
from tests.test_crash_resume import expected_users, job_text, sandbox_users, write_users


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def test_plan_limit_counts_the_first_valid_rows_of_each_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text(job_text("http://127.0.0.1:9/rest/3.0/", "changes"), encoding="utf-8")
    write_users(tmp_path, range(200))
    assert main(["plan", "job.yaml", "--limit", "15", "--output", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sources"]["users"]["rows_clean"] == 15
    with pytest.raises(SystemExit) as info:
        main(["plan", "job.yaml", "--limit", "0"])
    assert info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_run_limit_sends_a_sample_then_a_full_run_sends_the_rest(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETMERA_API_KEY", netmera_sandbox_process.api_key)
    (tmp_path / "job.yaml").write_text(job_text(netmera_sandbox_process.url, "changes"), encoding="utf-8")
    rows = write_users(tmp_path, range(120))
    code = main(["run", "job.yaml", "--limit", "10", "--progress", "none", "--output", "json"])
    assert code == 0
    sample = json.loads(capsys.readouterr().out)
    users = sandbox_users(netmera_sandbox_process)
    assert len(users) == 10  # only the sample reached the platform
    assert main(["runs", "job.yaml", "--output", "json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [sample["run_id"]]  # recorded
    assert main(["run", "job.yaml", "--progress", "none"]) == 0
    capsys.readouterr()
    assert sandbox_users(netmera_sandbox_process) == expected_users(rows)


def test_snapshot_mode_refuses_a_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETMERA_API_KEY", "some-key-0123456789abcdef")
    (tmp_path / "job.yaml").write_text(job_text("http://127.0.0.1:9/rest/3.0/", "snapshot"), encoding="utf-8")
    write_users(tmp_path, range(20))
    assert main(["run", "job.yaml", "--limit", "5", "--progress", "none"]) == 2
    assert "not available in snapshot mode" in capsys.readouterr().err
    assert main(["plan", "job.yaml", "--limit", "5"]) == 2
    assert not (tmp_path / "work" / "ledger.sqlite").exists()
