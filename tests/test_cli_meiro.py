"""``pushsync meiro ...`` and ``pushsync sandbox meiro`` end to end against the Meiro sandbox, including the
example job ``jobs/meiro.yaml`` with faults and rate limits on. The sandbox runs in-process; the CLI in a worker
thread with its own event loop (as in its own process), on real time with short intervals."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sync.cli import main
from sync.ledger.ledger import Ledger
from sync.sandboxes.meiro import MeiroSandbox, MeiroSandboxConfig, MeiroUser

REPO = Path(__file__).resolve().parent.parent
EMAIL, PASSWORD = "cli@example.test", "cli-meiro-password-42"
WELCOME = "983d437d-eac6-423b-beb5-40a619be332f"
TEASER = "5c1f0b52-8d4e-4a8e-9f3a-2f6f1d0c7b21"


StartMeiro = Callable[..., Awaitable[MeiroSandbox]]


@pytest.fixture
async def meiro_factory(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[StartMeiro]:
    """``await start(**settings)``: the sandbox seeded like the example job expects, with more sandbox
    settings (``max_limit``, ``cancel_delay``...); credentials in the environment the CLI reads."""
    started: list[MeiroSandbox] = []

    async def start(**settings: Any) -> MeiroSandbox:
        config = MeiroSandboxConfig.from_mapping(
            {
                "users": [MeiroUser(EMAIL, PASSWORD)],
                "seed_file": REPO / "jobs" / "data" / "meiro_sandbox.json",
                **settings,
            }
        )
        sandbox = MeiroSandbox(config)
        started.append(sandbox)
        url = await sandbox.start("127.0.0.1", 0)
        monkeypatch.setenv("MEIRO_BASE_URL", url)
        monkeypatch.setenv("MEIRO_EMAIL", EMAIL)
        monkeypatch.setenv("MEIRO_PASSWORD", PASSWORD)
        return sandbox

    yield start
    for sandbox in started:
        await sandbox.stop()


@pytest.fixture
async def meiro(meiro_factory: StartMeiro) -> MeiroSandbox:
    """The sandbox with its default settings."""
    return await meiro_factory()


def _ledger_waits(workdir: Path) -> list[dict[str, Any]]:
    with Ledger.open(workdir / "ledger.sqlite") as ledger:
        return ledger.export_waits()


def _ledger_runs(workdir: Path) -> list[Any]:
    with Ledger.open(workdir / "ledger.sqlite") as ledger:
        return ledger.runs()


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_login_check_and_bad_credentials(
    meiro: MeiroSandbox, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("meiro", "login-check", "--output", "json") == 0
    assert json.loads(capsys.readouterr().out)["logged_in"] is True
    monkeypatch.setenv("MEIRO_PASSWORD", "not-the-password-777")
    assert await cli("meiro", "login-check") == 3
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "e-mail and password" in err and "not-the-password-777" not in err
    monkeypatch.delenv("MEIRO_PASSWORD")
    assert await cli("meiro", "login-check") == 2
    assert "MEIRO_PASSWORD" in capsys.readouterr().err


async def test_password_file_and_exports_listing(
    meiro: MeiroSandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MEIRO_PASSWORD")
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    state = meiro.state
    for i in range(30):
        state.add_export(TEASER, total=i, created_at=2_000_000_000 + i)
    assert (
        await cli("meiro", "exports", TEASER, "--all", "--password-file", str(secret), "--output", "json")
        == 0
    )
    ids = [e["id"] for e in json.loads(capsys.readouterr().out)]
    assert len(ids) == 32 == len(set(ids)) and ids[:2] == [133, 132]
    assert (
        await cli(
            "meiro", "exports", TEASER, "--limit", "5", "--offset", "28", "--password-file", str(secret)
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["export", "status"] and len(lines) == 5  # header + the 4 oldest
    assert await cli("meiro", "exports", "no-such-notification", "--password-file", str(secret)) == 3
    assert "push notification no-such-notification was not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"), [(b"\xff" + PASSWORD.encode(), "is not UTF-8 text"), (b"\n", "is empty")]
)
async def test_a_password_file_that_cannot_be_used_is_named(
    meiro: MeiroSandbox,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    message: str,
) -> None:
    # Bytes that are not UTF-8 were a traceback (exit 5); an empty file said "give --password-file" (audit).
    monkeypatch.delenv("MEIRO_PASSWORD")
    secret = tmp_path / "pw"
    secret.write_bytes(content)
    assert await cli("meiro", "login-check", "--password-file", str(secret)) == 2
    err = capsys.readouterr().err
    assert f"{secret} {message}" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [("exports", TEASER), ("trash",)])
async def test_a_page_of_zero_is_refused_not_shown_as_empty(
    meiro: MeiroSandbox, command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    # Meiro answers limit=0 with no items: "no exports" / "the trash is empty" while both hold some (audit).
    with pytest.raises(SystemExit) as exited:
        await cli("meiro", *command, "--limit", "0")
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert "--limit: must be at least 1" in captured.err and captured.out == ""


async def test_wait_shows_progress_records_counts_and_exits_by_outcome(
    meiro: MeiroSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    code = await cli("meiro", "wait", WELCOME, "100", "--interval", "0.01", "--workdir", str(work))
    assert code == 0
    captured = capsys.readouterr()
    assert "export 100: running, 0 of 1200 sent" in captured.err
    assert "export 100: finished, 1100 of 1200 sent (100 %)" in captured.err
    assert captured.out.strip().endswith("1100 of 1200 sent, 12 invalid, 88 over the frequency cap")
    meiro.state.add_export(WELCOME, total=10, outcome="error")
    assert await cli("meiro", "wait", WELCOME, "104", "--interval", "0.01", "--workdir", str(work)) == 1
    records = _ledger_waits(work)
    assert [(r["export_id"], r["outcome"], r["status"]) for r in records] == [
        (100, "finished", "finished"),
        (104, "error", "error"),
    ]
    counts = {k: records[0][k] for k in ("total", "sent", "excluded_invalid", "excluded_by_frequency_cap")}
    assert counts == {"total": 1200, "sent": 1100, "excluded_invalid": 12, "excluded_by_frequency_cap": 88}
    assert set(records[0]["statuses_history"]) == {"waiting", "running", "finished"}
    runs = _ledger_runs(work)  # each wait is a run of its own: exit 0 "done", exit 1 "partial"
    assert [(r.job, r.platform, r.status, r.exit_code) for r in reversed(runs)] == [
        ("meiro-wait", "meiro", "done", 0),
        ("meiro-wait", "meiro", "partial", 1),
    ]
    assert (
        await cli(
            "meiro", "wait", WELCOME, "101", "--interval", "10", "--timeout", "0.05", "--workdir", str(work)
        )
        == 1
    )
    assert "timed_out" in capsys.readouterr().out


async def test_cancel_and_a_finished_export_says_so(
    meiro: MeiroSandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("meiro", "cancel", WELCOME, "101") == 0
    assert capsys.readouterr().out.strip() == f"export 101 of {WELCOME}: canceled"
    assert await cli("meiro", "cancel", TEASER, "102") == 1
    err = capsys.readouterr().err
    assert f"export 102 of push notification {TEASER} is already finished; it cannot be canceled" in err
    assert await cli("meiro", "cancel", TEASER, "999") == 3
    assert "was not found" in capsys.readouterr().err


async def test_trash_search_and_restore(meiro: MeiroSandbox, capsys: pytest.CaptureFixture[str]) -> None:
    assert await cli("meiro", "trash", "--search", "winter", "--output", "json") == 0
    found = json.loads(capsys.readouterr().out)
    assert [n["name"] for n in found] == ["Old winter sale"]
    assert await cli("meiro", "restore", found[0]["id"]) == 0
    assert capsys.readouterr().out.startswith(f"restored {found[0]['id']} (Old winter sale)")
    assert await cli("meiro", "trash", "--all") == 0
    assert "Old summer sale" in (out := capsys.readouterr().out) and "winter" not in out
    assert await cli("meiro", "restore", found[0]["id"]) == 3


def _example_job(tmp_path: Path, url: str, **changes: Any) -> Path:
    """jobs/meiro.yaml aimed at the sandbox, with its workdir in tmp_path (like ``pushsync demo`` does)."""
    doc = yaml.safe_load((REPO / "jobs" / "meiro.yaml").read_text())
    doc.update(base_url=url, workdir=str(tmp_path / "work"), **changes)
    path = tmp_path / "meiro.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_the_example_job_end_to_end_with_faults_and_limits(
    meiro: MeiroSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    meiro.configure(limits={"getExport": _limit(6, 1.0)}, faults=_faults(), seed=3)
    job = _example_job(
        tmp_path,
        meiro.url or "",
        wait={"interval": 0.02, "max_wait": 30, "concurrency": 3},
        retry={"max_attempts": 12, "base_delay": 0.01, "max_delay": 0.05},
    )
    assert await cli("meiro", "run", str(job), "--output", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True
    waits = {w["export_id"]: w for w in doc["waits"]}
    assert set(waits) == {100, 101, 103}  # "latest: true" picked the teaser's newest export
    assert all(w["outcome"] == "finished" for w in waits.values())
    assert waits[103]["message_counts"] == {
        "total": 5200,
        "sent": 5160,
        "excluded_invalid": 40,
        "excluded_by_frequency_cap": 0,
    }
    stats = meiro.stats
    assert (
        stats.faults() > 0 and stats.rate_limited("getExport") > 0 and stats.max_in_window("getExport") <= 6
    )
    assert sum(w["retries"] for w in waits.values()) > 0
    records = _ledger_waits(tmp_path / "work")
    assert sorted(r["export_id"] for r in records) == [100, 101, 103]
    assert {r["run_id"] for r in records} == {doc["run_id"]}
    assert {r["outcome"] for r in records} == {"finished"}
    (run,) = _ledger_runs(tmp_path / "work")
    assert (run.run_id, run.job, run.status, run.exit_code) == (doc["run_id"], "meiro-exports", "done", 0)
    assert run.summary is not None and len(run.summary["waits"]) == 3
    ledger_bytes = (tmp_path / "work" / "ledger.sqlite").read_bytes()
    assert PASSWORD.encode() not in ledger_bytes  # nor any secret in the ledger
    assert await cli("meiro", "waits", "--workdir", str(tmp_path / "work"), "--run", doc["run_id"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 3 and any(
        "export 103 of" in line and "5160 of 5200 sent" in line for line in listed
    )


async def test_a_job_with_a_failing_export_exits_1_and_says_why(
    meiro: MeiroSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    meiro.state.add_export(TEASER, export_id=200, outcome="error", total=8)
    job = _example_job(
        tmp_path,
        meiro.url or "",
        wait={"interval": 0.01},
        exports=[{"notification": TEASER, "export": 200}, {"notification": TEASER, "export": 404}],
    )
    assert await cli("meiro", "run", str(job)) == 1
    out = capsys.readouterr().out
    assert "0 of 2 exports finished" in out and "export 200 of" in out and ": error after" in out
    assert f"export 404 of push notification {TEASER} was not found" in out
    records = sorted(
        _ledger_waits(tmp_path / "work"), key=lambda r: r["export_id"]
    )  # in the order they ended
    assert [(r["export_id"], r["outcome"], r["status"]) for r in records] == [
        (200, "error", "error"),
        (404, "failed", None),
    ]
    assert "was not found" in records[1]["message"]
    (run,) = _ledger_runs(tmp_path / "work")
    assert (run.status, run.exit_code) == ("partial", 1)


async def test_a_run_refused_by_meiro_is_recorded_as_aborted(
    meiro: MeiroSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEIRO_PASSWORD", "wrong-password-for-the-job")
    job = _example_job(tmp_path, meiro.url or "", wait={"interval": 0.01})
    assert await cli("meiro", "run", str(job)) == 3
    assert "HTTP 401" in capsys.readouterr().err
    (run,) = _ledger_runs(tmp_path / "work")
    assert (run.status, run.exit_code) == ("aborted", 3) and "HTTP 401" in (run.message or "")
    assert "wrong-password-for-the-job" not in (run.message or "") and _ledger_waits(tmp_path / "work") == []


async def test_a_run_whose_login_is_refused_by_a_wrong_base_url_is_aborted(
    meiro: MeiroSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # base_url without its /api/: the login answered 404, and each export was recorded as failed ("could not
    # be waited for"), exit 1, as if Meiro had refused each of them.
    job = _example_job(tmp_path, (meiro.url or "").removesuffix("api/"), wait={"interval": 0.01})
    assert await cli("meiro", "run", str(job)) == 3
    err = capsys.readouterr().err
    # the job file's setting, not the one-off commands' option (it said "check --base-url")
    assert "HTTP 404" in err and f"(check base_url in {job})" in err and "--base-url" not in err
    (run,) = _ledger_runs(tmp_path / "work")
    assert (run.status, run.exit_code) == ("aborted", 3) and "users/login" in (run.message or "")
    assert _ledger_waits(tmp_path / "work") == []


async def test_a_bad_job_file_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "bad.yaml"
    job.write_text(
        "platform: meiro\nbase_url: ftp://x\ncredentials: {email: a@b.c, password: hunter2}\nexports: [{notification: n}]\nwat: 1\n"
    )
    assert await cli("meiro", "run", str(job)) == 2
    err = capsys.readouterr().err
    for where in ("wat: unknown key", "base_url:", "credentials.password:", "exports[0]: give exactly one"):
        assert where in err
    assert "hunter2" not in err


async def test_a_job_file_with_nan_or_infinite_seconds_lists_them_as_problems(
    meiro: MeiroSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # YAML's .nan passed the "positive" check (NaN <= 0 is false): wait.interval .nan slept forever after the
    # first poll, retry.base_delay .nan made every back-off a NaN sleep.
    job = tmp_path / "nan.yaml"
    job.write_text(
        "platform: meiro\ncredentials: {email_env: MEIRO_EMAIL, password: {env: MEIRO_PASSWORD}}\n"
        f"base_url: {os.environ['MEIRO_BASE_URL']}\n"
        "wait: {interval: .nan, max_wait: .inf}\nrequest_timeout: .nan\nretry: {base_delay: .nan}\n"
        f"exports: [{{notification: {WELCOME}, export: 101}}]\nworkdir: {tmp_path / 'work'}\n"
    )
    assert await cli("meiro", "run", str(job)) == 2
    err = capsys.readouterr().err
    for where in ("wait.interval", "wait.max_wait", "request_timeout", "retry.base_delay"):
        assert f"{where}: must be a positive number" in err
    assert not (tmp_path / "work").exists()


async def test_an_export_listed_twice_in_a_job_is_a_problem(
    meiro: MeiroSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was waited for twice at once, recorded twice and counted twice: "2 of 2 exports finished".
    job = tmp_path / "twice.yaml"
    job.write_text(
        "platform: meiro\ncredentials: {email_env: MEIRO_EMAIL, password: {env: MEIRO_PASSWORD}}\n"
        f"base_url: {os.environ['MEIRO_BASE_URL']}\nworkdir: {tmp_path / 'work'}\nexports:\n"
        f"  - {{notification: {WELCOME}, export: 101}}\n  - {{notification: {TEASER}, latest: true}}\n"
        f"  - {{notification: {WELCOME}, export: 101}}\n  - {{notification: {TEASER}, latest: true}}\n"
        f"  - {{notification: {WELCOME}, export: 100}}\n"
    )
    assert await cli("meiro", "run", str(job)) == 2
    err = capsys.readouterr().err
    assert "exports[2]: the same as exports[0]: list each export once" in err
    assert "exports[3]: the same as exports[1]" in err and "exports[4]" not in err
    assert not (tmp_path / "work").exists()


def test_sandbox_meiro_runs_as_a_process_and_prints_its_url(tmp_path: Path) -> None:
    env = {**os.environ, "MEIRO_SANDBOX_PASSWORD": "proc-password-1234", "PYTHONUNBUFFERED": "1"}
    seed = str(REPO / "jobs" / "data" / "meiro_sandbox.json")
    process = subprocess.Popen(
        [sys.executable, "-m", "sync", "sandbox", "meiro", "--port", "0", "--seed-file", seed],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api/")
        env_cli = {
            **env,
            "MEIRO_BASE_URL": url,
            "MEIRO_EMAIL": "sandbox@meiro.local",
            "MEIRO_PASSWORD": "proc-password-1234",
        }
        done = subprocess.run(
            [sys.executable, "-m", "sync", "meiro", "exports", WELCOME, "--output", "json"],
            cwd=REPO,
            env=env_cli,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert [e["id"] for e in json.loads(done.stdout)] == [101, 100]
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
        if process.stdout is not None:
            process.stdout.close()


def _limit(requests: int, window: float) -> Any:
    from sync.sandboxes._core import RateLimit

    return RateLimit(requests, window)


def _faults() -> Any:
    from sync.sandboxes._core import FaultSpec

    return FaultSpec(error_500=0.15, error_503=0.1, drop=0.05)


async def test_all_pages_of_a_server_that_caps_limit(
    meiro_factory: StartMeiro, capsys: pytest.CaptureFixture[str]
) -> None:
    meiro = await meiro_factory(max_limit=10)
    for i in range(23):
        meiro.state.add_export(TEASER, total=i, created_at=2_000_000_000 + i)
        if i < 21:
            meiro.state.add_notification(f"Trashed {i}", trashed=True, modified=2_000_000_000 + i)
    assert await cli("meiro", "exports", TEASER, "--all", "--output", "json") == 0
    ids = [e["id"] for e in json.loads(capsys.readouterr().out)]
    assert len(ids) == 25 == len(set(ids))  # not the 10 of the first page
    assert await cli("meiro", "trash", "--all", "--limit", "50", "--output", "json") == 0
    names = [n["name"] for n in json.loads(capsys.readouterr().out)]
    assert len(names) == 23 and {"Old summer sale", "Old winter sale", "Trashed 0"} <= set(names)
    assert await cli("meiro", "exports", TEASER, "--limit", "50") == 0  # one page: say that more may follow
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 11
    assert (
        "Meiro serves at most 10 per page (asked for 50); use --all, or --offset, for the rest"
        in captured.err
    )


async def test_all_from_an_offset_starts_there(
    meiro_factory: StartMeiro, capsys: pytest.CaptureFixture[str]
) -> None:
    # --all ignored --offset without a word: every export (and the whole trash) was listed from the start.
    meiro = await meiro_factory(max_limit=4)
    for i in range(10):
        meiro.state.add_export(TEASER, total=i, created_at=2_000_000_000 + i)
    assert await cli("meiro", "exports", TEASER, "--all", "--output", "json") == 0
    newest_first = [e["id"] for e in json.loads(capsys.readouterr().out)]
    assert await cli("meiro", "exports", TEASER, "--all", "--offset", "3", "--output", "json") == 0
    assert [e["id"] for e in json.loads(capsys.readouterr().out)] == newest_first[3:]
    assert await cli("meiro", "trash", "--all", "--offset", "1", "--output", "json") == 0
    assert [n["name"] for n in json.loads(capsys.readouterr().out)] == ["Old summer sale"]
    assert await cli("meiro", "trash", "--all", "--offset", "2") == 0
    assert capsys.readouterr().out == "no trashed push notification at offset 2\n"


async def test_a_run_against_an_unreachable_meiro_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MEIRO_EMAIL", EMAIL)
    monkeypatch.setenv("MEIRO_PASSWORD", PASSWORD)
    job = _example_job(
        tmp_path,
        f"http://127.0.0.1:{port}/api/",
        wait={"interval": 0.01},
        retry={"max_attempts": 2, "base_delay": 0.01, "max_delay": 0.02},
    )
    assert await cli("meiro", "run", str(job)) == 3
    err = capsys.readouterr().err
    assert "Meiro did not answer (check base_url and the network)" in err and "connection failed" in err
    (run,) = _ledger_runs(tmp_path / "work")
    assert (run.status, run.exit_code) == ("aborted", 3) and _ledger_waits(tmp_path / "work") == []


async def test_cancel_of_an_export_that_ended_in_error_or_was_canceled_exits_1(
    meiro: MeiroSandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    meiro.state.add_export(TEASER, export_id=300, status="error")
    assert await cli("meiro", "cancel", TEASER, "300") == 1
    err = capsys.readouterr().err
    assert f"export 300 of push notification {TEASER} already ended in error; it cannot be canceled" in err
    assert "http" not in err
    assert await cli("meiro", "cancel", WELCOME, "101") == 0
    capsys.readouterr()
    assert await cli("meiro", "cancel", WELCOME, "101") == 1
    err = capsys.readouterr().err
    assert f"export 101 of push notification {WELCOME} is already canceled; there is nothing to cancel" in err


async def test_a_cancel_accepted_but_not_yet_effective_says_so(
    meiro_factory: StartMeiro, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    meiro = await meiro_factory(cancel_delay=2)
    assert await cli("meiro", "cancel", WELCOME, "100") == 0
    assert capsys.readouterr().out.strip() == (
        f"export 100 of {WELCOME}: cancel accepted; the export is stopping (Meiro still says waiting). "
        f"Run `pushsync meiro wait {WELCOME} 100` to see it canceled."
    )
    assert await cli("meiro", "cancel", WELCOME, "101", "--output", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["id"], doc["status"], doc["cancel"]) == (101, "waiting", "stopping")
    work = tmp_path / "work"
    assert await cli("meiro", "wait", WELCOME, "100", "--interval", "0.01", "--workdir", str(work)) == 1
    assert ": canceled after 2 polls" in capsys.readouterr().out
    assert meiro.state.notifications[WELCOME].exports[100].sent == 0


async def test_a_latest_entry_with_no_export_says_no_export(
    meiro: MeiroSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = meiro.state.add_notification("Never exported", notification_id="never-exported")
    job = _example_job(
        tmp_path,
        meiro.url or "",
        wait={"interval": 0.01},
        exports=[{"notification": empty.id, "latest": True}, {"notification": TEASER, "export": 102}],
    )
    assert await cli("meiro", "run", str(job)) == 1
    out = capsys.readouterr().out
    assert "  no export: push notification never-exported has no export to wait for" in out
    assert "export -1" not in out
    assert await cli("meiro", "run", str(job), "--output", "json") == 1
    doc = json.loads(capsys.readouterr().out)
    none = next(w for w in doc["waits"] if w["notification_id"] == empty.id)
    assert (none["export_id"], none["outcome"]) == (None, "failed")
    finished = next(w for w in doc["waits"] if w["export_id"] == 102)
    assert finished["message"] is None
    work = str(tmp_path / "work")
    assert await cli("meiro", "waits", "--workdir", work, "--run", doc["run_id"]) == 0
    listed = capsys.readouterr().out
    assert "no export: push notification never-exported has no export to wait for" in listed
    assert "export -1" not in listed
    assert await cli("meiro", "waits", "--workdir", work, "--run", doc["run_id"], "--output", "json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted((r["export_id"] is None, r["message"]) for r in rows) == [
        (False, None),
        (True, "push notification never-exported has no export to wait for"),
    ]


async def test_wait_and_waits_show_the_same_record(
    meiro: MeiroSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    assert await cli("meiro", "wait", TEASER, "102", "--workdir", str(work), "--output", "json") == 0
    waited = json.loads(capsys.readouterr().out)
    assert await cli("meiro", "waits", "--workdir", str(work), "--output", "json") == 0
    (row,) = json.loads(capsys.readouterr().out)
    for key in ("run_id", "notification_id", "export_id", "export_name", "outcome", "status", "message"):
        assert waited[key] == row[key], key
    assert waited["message"] is None


async def test_trash_says_when_nothing_matches_and_shows_every_field(
    meiro: MeiroSandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("meiro", "trash", "--search", "spring") == 0
    assert capsys.readouterr().out.strip() == "no trashed push notification matches 'spring'"
    assert await cli("meiro", "trash", "--offset", "5") == 0
    assert capsys.readouterr().out.strip() == "no trashed push notification at offset 5"
    meiro.state.add_notification(
        "Spring sale", trashed=True, last_activation=1_900_000_000, last_activation_by=5, modified_by=3
    )
    assert await cli("meiro", "trash", "--search", "spring", "--output", "json") == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert (item["last_activation"], item["last_activation_by"], item["modified_by"]) == (
        "2030-03-17T17:46:40Z",
        5,
        3,
    )
    assert await cli("meiro", "restore", item["id"], "--output", "json") == 0
    restored = json.loads(capsys.readouterr().out)
    assert restored["last_activation_by"] == 5 and set(restored) == set(item)
    assert await cli("meiro", "trash", "--search", "spring") == 0
    assert "no trashed push notification matches 'spring'" in capsys.readouterr().out


async def test_names_typed_in_meiro_cannot_rewrite_what_the_listings_show(
    meiro: MeiroSandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    # An export or push notification name is typed by a Meiro user: printed raw, "\r" moved the cursor back
    # over the row and an escape sequence (ESC[2K: erase the line) wiped it on the terminal.
    meiro.state.add_export(TEASER, name="weekly\r\x1b[2Kexport 1 finished", created_at=2_000_000_000)
    trashed = meiro.state.add_notification("Old\nfake-id  Spring sale", trashed=True)
    assert await cli("meiro", "exports", TEASER) == 0
    out = capsys.readouterr().out
    assert "weekly\\r\\x1b[2Kexport 1 finished" in out and "\x1b" not in out and "\r" not in out
    assert await cli("meiro", "trash") == 0
    out = capsys.readouterr().out
    assert "Old\\nfake-id  Spring sale" in out and "\nfake-id" not in out
    assert await cli("meiro", "restore", trashed.id) == 0
    assert capsys.readouterr().out == f"restored {trashed.id} (Old\\nfake-id  Spring sale)\n"
    assert await cli("meiro", "exports", TEASER, "--output", "json") == 0  # JSON escapes them itself
    assert "weekly\r\x1b[2Kexport 1 finished" in [e["name"] for e in json.loads(capsys.readouterr().out)]


async def test_meiros_own_words_in_a_refusal_or_a_retry_cannot_rewrite_the_terminal(
    unused_tcp_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A small server whose messages hold an escape sequence: a cancel's refusal quotes Meiro's words, and
    `wait` prints each retry's error; both reached the terminal raw."""
    from aiohttp import web

    polls = 0

    async def login(request: web.Request) -> web.Response:
        return web.json_response({"token": "lenient-token-0003"})

    async def cancel(request: web.Request) -> web.Response:
        return web.json_response({"message": "Finished\x1b[2K export cannot be canceled"}, status=400)

    async def get(request: web.Request) -> web.Response:
        nonlocal polls
        polls += 1
        if polls == 1:
            return web.json_response({"message": "busy\x1b[2K\rall good"}, status=503)
        return web.json_response({"push_notification_export": {"id": 7, "status": "finished"}})

    app = web.Application()
    app.router.add_post("/api/users/login", login)
    app.router.add_delete("/api/push_notifications/{nid}/exports/{eid}", cancel)
    app.router.add_get("/api/push_notifications/{nid}/exports/{eid}", get)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    monkeypatch.setenv("MEIRO_BASE_URL", f"http://127.0.0.1:{unused_tcp_port}/api/")
    monkeypatch.setenv("MEIRO_EMAIL", EMAIL)
    monkeypatch.setenv("MEIRO_PASSWORD", PASSWORD)
    try:
        assert await cli("meiro", "wait", "n1", "7", "--interval", "0.01", "--workdir", str(tmp_path)) == 0
        err = capsys.readouterr().err
        assert "busy\\x1b[2K\\rall good" in err and "\x1b" not in err and "\r" not in err
        polls = 1  # the export reads back finished
        assert await cli("meiro", "cancel", "n1", "7") == 1
        err = capsys.readouterr().err
        assert "(Meiro: Finished\\x1b[2K export cannot be canceled)" in err and "\x1b" not in err
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://{user}:hunter2-pw@{host}/api/", "credentials may not be written in the URL"),
        ("http://{host}/api/#token=hunter2-pw", "takes no query string or fragment"),
        ("ftp://{host}/api/?hunter2-pw", "must be an http:// or https:// URL"),
    ],
)
@pytest.mark.parametrize("given", ["option", "environment", "job"])
async def test_a_base_url_with_credentials_or_not_http_is_refused_without_echoing_it(
    meiro: MeiroSandbox,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    url: str,
    problem: str,
    given: str,
) -> None:
    # Taken as given, such a URL reached the request: `pushsync: error: POST http://u:hunter2-pw@host/api/users/
    # login ...` printed the password (exit 3), and ftp:// was tried as a connection. Now it is refused (exit 2)
    # before any request, naming what is wrong and not the value.
    host = os.environ["MEIRO_BASE_URL"].split("//", 1)[1].split("/", 1)[0]
    bad = url.format(user=EMAIL.split("@")[0], host=host)
    if given == "option":
        code = await cli("meiro", "login-check", "--base-url", bad)
    elif given == "environment":
        monkeypatch.setenv("MEIRO_BASE_URL", bad)
        code = await cli("meiro", "login-check")
    else:
        code = await cli("meiro", "run", str(_example_job(tmp_path, bad)))
    assert code == 2
    err = capsys.readouterr().err
    assert problem in err and "hunter2" not in err, err
    assert meiro.stats.snapshot()["requests_total"] == 0  # refused before any request


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--interval", "0"),  # polled without a pause: ~15,000 requests in the 6 s an export ran
        ("--interval", "-1"),
        ("--interval", "nan"),  # slept forever after the first poll
        ("--timeout", "0"),
        ("--timeout", "nan"),
        ("--request-timeout", "0"),  # aiohttp reads a time-out of 0 as none: a request could hang forever
        ("--request-timeout", "inf"),
    ],
)
async def test_a_wait_interval_or_timeout_that_is_not_a_positive_number_is_refused(
    meiro: MeiroSandbox, tmp_path: Path, option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        await cli("meiro", "wait", WELCOME, "101", "--workdir", str(tmp_path), f"{option}={value}")
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert f"{option}: must be a positive number of seconds" in captured.err and captured.out == ""
    assert not (tmp_path / "ledger.sqlite").exists()  # refused before any run or request
