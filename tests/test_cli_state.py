"""``pushsync resume``, ``retry`` and ``state show``, through the CLI entry point, against the Netmera sandbox
running as a separate process."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sync.cli import main
from tests.conftest import NetmeraProcess
from tests.test_crash_resume import expected_users, job_text, sandbox_users, write_users


def _post_config(sandbox: NetmeraProcess, doc: dict[str, Any]) -> None:
    req = urllib.request.Request(
        f"{sandbox.root_url}/_sandbox/config",
        data=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def _stats(sandbox: NetmeraProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{sandbox.root_url}/_sandbox/stats", timeout=10) as resp:
        return dict(json.loads(resp.read()))


@pytest.fixture
def workspace(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, NetmeraProcess]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETMERA_API_KEY", netmera_sandbox_process.api_key)
    return tmp_path, netmera_sandbox_process


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_retry_replays_only_the_failed_batches(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, sandbox = workspace
    (tmp / "job.yaml").write_text(job_text(sandbox.url, "changes"), encoding="utf-8")
    rows = write_users(tmp, range(200))
    _post_config(sandbox, {"faults": {"error_500": 1.0, "endpoints": ["tagUsers"]}})
    code, out, _ = run_cli(capsys, "run", "job.yaml", "--progress", "none", "--output", "json")
    assert code == 1
    run_id = json.loads(out)["run_id"]
    assert sandbox_users(sandbox) != expected_users(rows)  # the tags are missing
    _post_config(sandbox, {"faults": {"error_500": 0.0}})
    before = _stats(sandbox)["requests"]
    code, out, err = run_cli(capsys, "retry", run_id, "--job", "job.yaml", "--progress", "none", "--output", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["replay"]["skipped_confirmed"] > 0 and doc["replay"]["sent"] == doc["totals"]["requests"]
    after = _stats(sandbox)["requests"]
    resent = {ep for ep, by_status in after.items() if by_status != before.get(ep)}
    assert resent == {"tagUsers"}
    assert sandbox_users(sandbox) == expected_users(rows)


def test_state_show_lists_users_fields_and_tags(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, sandbox = workspace
    (tmp / "job.yaml").write_text(job_text(sandbox.url, "snapshot"), encoding="utf-8")
    write_users(tmp, range(64))
    assert run_cli(capsys, "run", "job.yaml", "--progress", "none")[0] == 0
    code, out, _ = run_cli(capsys, "state", "show", "job.yaml", "--output", "json")
    assert code == 0
    doc = json.loads(out)
    users = doc["sources"]["users"]
    assert doc["mode"] == "snapshot" and doc["pending_runs"] == []
    assert users["users"] == 64
    assert users["fields"]["attr:name"] == 64 and users["fields"]["attr:city"] == 64 - 13  # i % 5 == 0: empty
    assert users["tags"] == {"gold": 32, "silver": 32, "beta": 32}
    code, text, _ = run_cli(capsys, "state", "show", "job.yaml")
    assert "64 users" in text and "gold (32)" in text


def test_retry_full_refresh_sends_everything_again(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, sandbox = workspace
    (tmp / "job.yaml").write_text(job_text(sandbox.url, "snapshot"), encoding="utf-8")
    rows = write_users(tmp, range(100))
    code, out, _ = run_cli(capsys, "run", "job.yaml", "--progress", "none", "--output", "json")
    first = json.loads(out)
    assert code == 0 and first["totals"]["requests"] > 0
    code, out, _ = run_cli(capsys, "run", "job.yaml", "--progress", "none", "--output", "json")
    assert json.loads(out)["totals"]["requests"] == 0
    code, out, err = run_cli(
        capsys, "retry", first["run_id"], "--job", "job.yaml", "--full-refresh", "--progress", "none", "--output", "json"
    )
    assert code == 0, err
    again = json.loads(out)
    # everything again, plus one unset request for the users with an empty city
    assert again["totals"]["requests"] == first["totals"]["requests"] + 1
    assert sandbox_users(sandbox) == expected_users(rows)


def test_resume_of_an_unknown_run_is_an_error(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, sandbox = workspace
    (tmp / "job.yaml").write_text(job_text(sandbox.url, "snapshot"), encoding="utf-8")
    write_users(tmp, range(10))
    code, _, err = run_cli(capsys, "resume", "20990101T000000Z-dead", "--job", "job.yaml")
    assert code == 2 and "no run 20990101T000000Z-dead" in err
    code, _, err = run_cli(capsys, "resume", "20990101T000000Z-dead")
    assert code == 2 and "give --job JOB" in err
