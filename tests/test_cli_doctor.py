"""``pushsync doctor JOB`` and ``pushsync validate JOB --check-connection``: one harmless request through the
platform's own client, against the sandboxes (good key, wrong key, closed port, missing key)."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from sync.cli import main
from tests.conftest import NetmeraProcess
from tests.test_crash_resume import job_text, write_users


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the socket is: nothing listens there


def _requests(sandbox: NetmeraProcess) -> dict[str, dict[str, int]]:
    with urllib.request.urlopen(f"{sandbox.root_url}/_sandbox/stats", timeout=10) as resp:
        return dict(json.loads(resp.read())["requests"])


@pytest.fixture
def job(tmp_path: Path, netmera_sandbox_process: NetmeraProcess, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text(job_text(netmera_sandbox_process.url, "changes"), encoding="utf-8")
    write_users(tmp_path, range(5))
    return tmp_path / "job.yaml"


def test_doctor_accepts_a_good_key_with_one_read(
    job: Path,
    netmera_sandbox_process: NetmeraProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("NETMERA_API_KEY", netmera_sandbox_process.api_key)
    assert main(["doctor", str(job)]) == 0
    out = capsys.readouterr().out
    assert "OK — getDeviceTokens" in out and netmera_sandbox_process.api_key not in out
    # One read, nothing written.
    assert {ep: sum(by.values()) for ep, by in _requests(netmera_sandbox_process).items()} == {
        "getDeviceTokens": 1
    }


def test_doctor_refuses_a_wrong_key_without_printing_it(
    job: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "wrong-key-0123456789abcdef"
    monkeypatch.setenv("NETMERA_API_KEY", wrong)
    assert main(["doctor", str(job)]) == 3
    captured = capsys.readouterr()
    assert "refused" in captured.err and "HTTP 403" in captured.err and "API key is invalid" in captured.err
    assert wrong not in captured.err + captured.out


def test_doctor_refuses_a_base_url_that_names_no_api(
    tmp_path: Path,
    netmera_sandbox_process: NetmeraProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"{netmera_sandbox_process.root_url}/rest/9.9/"
    (tmp_path / "job.yaml").write_text(job_text(url, "changes"), encoding="utf-8")
    write_users(tmp_path, range(5))
    monkeypatch.setenv("NETMERA_API_KEY", netmera_sandbox_process.api_key)
    assert main(["doctor", "job.yaml"]) == 3
    err = capsys.readouterr().err
    assert "refused" in err and "HTTP 404" in err


def test_doctor_says_an_unreachable_server_is_not_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{_closed_port()}/rest/3.0/"
    (tmp_path / "job.yaml").write_text(job_text(url, "changes"), encoding="utf-8")
    write_users(tmp_path, range(5))
    monkeypatch.setenv("NETMERA_API_KEY", "some-key-0123456789abcdef")
    assert main(["doctor", "job.yaml"]) == 3
    err = capsys.readouterr().err
    assert "not usable" in err and "some-key-0123456789abcdef" not in err


def test_doctor_and_validate_report_a_missing_key_as_exit_2(
    job: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NETMERA_API_KEY", raising=False)
    assert main(["doctor", str(job)]) == 2
    assert "NETMERA_API_KEY" in capsys.readouterr().err
    assert main(["validate", str(job), "--check-connection"]) == 2


def test_validate_check_connection_sends_the_same_check(
    job: Path,
    netmera_sandbox_process: NetmeraProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("NETMERA_API_KEY", netmera_sandbox_process.api_key)
    assert main(["validate", str(job)]) == 0
    assert _requests(netmera_sandbox_process) == {}  # validate alone sends nothing
    assert main(["validate", str(job), "--check-connection"]) == 0
    assert "OK — getDeviceTokens" in capsys.readouterr().out
    monkeypatch.setenv("NETMERA_API_KEY", "wrong-key-0123456789abcdef")
    assert main(["validate", str(job), "--check-connection"]) == 3


def test_doctor_on_notifyvisitors_checks_reachability_and_says_the_key_is_not_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.sandbox_fixtures import start_sandbox_process, stop_sandbox_process

    monkeypatch.setenv("NOTIFYVISITORS_SANDBOX_API_KEY", "nv-doctor-key-0123456789")
    process, url = start_sandbox_process("notifyvisitors", "--brand-id", "1000")
    try:
        text = (Path(__file__).parents[1] / "jobs" / "notifyvisitors.yaml").read_text(encoding="utf-8")
        job = tmp_path / "nv.yaml"
        job.write_text(text.replace("http://127.0.0.1:8081/api/v1/", url), encoding="utf-8")
        monkeypatch.setenv("NOTIFYVISITORS_API_KEY", "nv-doctor-key-0123456789")
        assert main(["doctor", str(job)]) == 0
        out = capsys.readouterr().out
        assert "reachable" in out and "the key is not checked" in out
    finally:
        stop_sandbox_process(process)
    # The same job once the server is gone: unreachable.
    assert main(["doctor", str(job)]) == 3
    assert "not usable" in capsys.readouterr().err


def test_doctor_on_forms_on_fire_checks_reachability_and_says_the_key_is_not_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.sandbox_fixtures import start_sandbox_process, stop_sandbox_process

    monkeypatch.setenv("FORMSONFIRE_SANDBOX_INTEGRATION_KEY", "fof-doctor-key-0123456789")
    process, url = start_sandbox_process("formsonfire", "--company-id", "1000")
    try:
        text = (Path(__file__).parents[1] / "jobs" / "formsonfire.yaml").read_text(encoding="utf-8")
        job = tmp_path / "fof.yaml"
        job.write_text(text.replace("http://127.0.0.1:8082/api/v2/", url), encoding="utf-8")
        monkeypatch.setenv("FORMSONFIRE_INTEGRATION_KEY", "fof-doctor-key-0123456789")
        assert main(["doctor", str(job)]) == 0
        captured = capsys.readouterr()
        assert "reachable" in captured.out and "Forms On Fire has no read-only call" in captured.out
        assert "fof-doctor-key-0123456789" not in captured.out + captured.err
    finally:
        stop_sandbox_process(process)


@pytest.mark.parametrize("body", [b"", b"{}", b'{"status": "ok"}', b"[]"])
def test_doctor_says_a_base_url_answering_200_without_netmeras_answer_is_not_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], body: bytes
) -> None:
    # Another service behind the base URL (a catch-all proxy, a health endpoint) answering 200 to any path:
    # doctor said "OK — the key and the base URL are accepted", and the run or export then failed on it.
    with _another_service(body) as url:
        monkeypatch.chdir(tmp_path)
        (tmp_path / "job.yaml").write_text(job_text(url, "changes"), encoding="utf-8")
        write_users(tmp_path, range(5))
        monkeypatch.setenv("NETMERA_API_KEY", "some-key-0123456789abcdef")
        assert main(["doctor", "job.yaml"]) == 3
    captured = capsys.readouterr()
    assert "not usable" in captured.err and "without a devices list" in captured.err
    assert "OK" not in captured.out and "some-key-0123456789abcdef" not in captured.err


def test_an_answer_with_control_characters_cannot_rewrite_the_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every error a command ends with is printed by the CLI's one handler: a platform's words in it (here a
    403's) reached the terminal raw, and an escape sequence could clear or rewrite the screen. Now control
    characters are escaped; the message's own line breaks are kept."""
    body = json.dumps({"code": 2010, "error": "key revoked\x1b[2J\x1b[31m\rOK"}).encode()
    with _another_service(body, status=403) as url:
        monkeypatch.chdir(tmp_path)
        (tmp_path / "job.yaml").write_text(job_text(url, "changes"), encoding="utf-8")
        write_users(tmp_path, range(5))
        monkeypatch.setenv("NETMERA_API_KEY", "some-key-0123456789abcdef")
        assert main(["doctor", "job.yaml"]) == 3
    err = capsys.readouterr().err
    assert "key revoked" in err and "\x1b" not in err and "\r" not in err
    assert "\\x1b[2J" in err
    # The same through the CLI's handler, which prints every error a command ends with (here an export's).
    with _another_service(body, status=403) as url:
        (tmp_path / "job.yaml").write_text(job_text(url, "changes"), encoding="utf-8")
        assert (
            main(["export", "device-tokens", "--job", "job.yaml", "-o", "t.csv", "--progress", "none"]) == 3
        )
    err = capsys.readouterr().err
    assert err.startswith("pushsync: error:") and "key revoked" in err, err
    assert "\x1b" not in err and "\\x1b[2J" in err


@contextlib.contextmanager
def _another_service(body: bytes, status: int = 200) -> Iterator[str]:
    """A plain HTTP server (not Netmera) answering ``status`` with ``body`` to every GET; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/rest/3.0/"
    finally:
        server.shutdown()
        server.server_close()
