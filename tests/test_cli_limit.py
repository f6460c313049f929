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


SAMPLE_JOB = """\
version: 1
name: sample
workdir: work
destination:
  platform: netmera
  base_url: {url}
  secret: {{env: NETMERA_API_KEY}}
sources:
  - {{name: users, path: users.csv, ext_id: id, attributes: {{name: string}}}}
  - {{name: purchases, kind: events, path: events.csv, ext_id: id, event: event}}
  - {{name: leavers, kind: deletions, path: deleted.csv, ext_id: id}}
"""


def test_a_sample_of_events_and_deletions_says_what_it_cannot_take_back(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`run --limit` sent the sample's events (which the next full run sends again) and deleted the sample's
    users for good without a word: the warning was in docs/run.md only. `plan` and `run` now say so, per source."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETMERA_API_KEY", netmera_sandbox_process.api_key)
    (tmp_path / "job.yaml").write_text(SAMPLE_JOB.format(url=netmera_sandbox_process.url), encoding="utf-8")
    (tmp_path / "users.csv").write_text("id,name\na,Ann\nb,Bob\n", encoding="utf-8")
    (tmp_path / "events.csv").write_text("id,event\na,login\nb,login\n", encoding="utf-8")
    (tmp_path / "deleted.csv").write_text("id\nx\ny\n", encoding="utf-8")
    assert main(["plan", "job.yaml", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "Note: --limit sends its events (source purchases), which are not idempotent" in out
    assert "Note: --limit deletes the first users of source leavers for good" in out
    assert "users)" not in out  # sets are harmless: no note
    assert (
        main(["plan", "job.yaml", "--limit", "1", "--exclude", "purchases,leavers", "--output", "json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["notes"] == []
    assert main(["plan", "job.yaml"]) == 0
    assert "--limit" not in capsys.readouterr().out
    assert main(["run", "job.yaml", "--limit", "1", "--progress", "none"]) == 0
    warnings = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"run.sample"' in line]
    assert [w["level"] for w in warnings] == ["warning", "warning"]
    assert "--exclude purchases" in warnings[0]["note"] and "--exclude leavers" in warnings[1]["note"]
