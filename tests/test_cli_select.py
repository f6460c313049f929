"""``--select`` / ``--exclude`` on ``pushsync plan`` and ``run`` (changes mode; refused in snapshot mode)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from sync.cli import main
from tests.conftest import NetmeraProcess
from tests.test_crash_resume import job_text, write_users

# A second source beside job_text's "users": the same file, tags only.
SECOND = """\
  - name: vip
    path: users.csv
    ext_id: id
    tags: {column: segments}
"""


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _job(tmp_path: Path, url: str, mode: str = "changes") -> Path:
    text = job_text(url, mode).replace("dispatch:\n", SECOND + "dispatch:\n", 1)
    (tmp_path / "job.yaml").write_text(text, encoding="utf-8")
    write_users(tmp_path, range(30))
    return tmp_path / "job.yaml"


def _plan_sources(capsys: pytest.CaptureFixture[str], *args: str) -> set[str]:
    assert main(["plan", *args, "--output", "json"]) == 0
    return set(json.loads(capsys.readouterr().out)["sources"])


def test_plan_select_and_exclude_keep_only_the_named_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = str(_job(tmp_path, "http://127.0.0.1:9/rest/3.0/"))
    assert _plan_sources(capsys, job) == {"users", "vip"}
    assert _plan_sources(capsys, job, "--select", "vip") == {"vip"}
    assert _plan_sources(capsys, job, "--select", "users,vip") == {"users", "vip"}
    assert _plan_sources(capsys, job, "--exclude", "vip") == {"users"}


def test_an_unknown_source_name_is_refused_listing_the_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = str(_job(tmp_path, "http://127.0.0.1:9/rest/3.0/"))
    assert main(["plan", job, "--select", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no source named 'nope'" in err and "users, vip" in err
    assert main(["run", job, "--exclude", "users,vip"]) == 2
    assert "no source left" in capsys.readouterr().err


def test_snapshot_mode_refuses_a_selection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = str(_job(tmp_path, "http://127.0.0.1:9/rest/3.0/", "snapshot"))
    assert main(["run", job, "--select", "users", "--progress", "none"]) == 2
    assert "not available in snapshot mode" in capsys.readouterr().err
    assert not (tmp_path / "work" / "ledger.sqlite").exists()  # refused before anything was recorded


def test_run_select_sends_only_the_selected_source(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("NETMERA_API_KEY", netmera_sandbox_process.api_key)
    job = str(_job(tmp_path, netmera_sandbox_process.url))
    code = main(["run", job, "--select", "vip", "--progress", "none", "--output", "json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert {e["endpoint"] for e in doc["endpoints"]} == {"tagUsers"}  # vip sends tags only
