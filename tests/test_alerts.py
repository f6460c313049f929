"""Alerts: a Slack-compatible ``{"text": ...}`` post when a run fails, rejects too much or is slower than usual;
a webhook that is down never fails the run; the URL is never written in the job nor shown in a log."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sync.config import Alerts, load_job
from sync.dispatch.dispatch import DispatchOutcome
from sync.errors import BadJobError, ExitCode
from sync.redact import redact, redact_pieces
from sync.report.alerts import alert_reasons, resolve_webhook
from sync.report.summary import RunSummary
from tests.test_cli_ops import _cli, _closed_port
from tests.test_cli_run import KEY_ENV, write_job

HOOK_ENV = "PUSHSYNC_TEST_ALERT_HOOK"


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.server.received.append(  # type: ignore[attr-defined]
            {"type": self.headers.get("Content-Type"), "body": json.loads(self.rfile.read(length))}
        )
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:  # quiet: pytest's output is for failures
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A real loopback HTTP server taking webhook posts: (URL with a secret-looking path, posts received)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield (
            f"http://127.0.0.1:{server.server_address[1]}/services/T0/B0/hookSecret0123456789",
            server.received,
        )  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _unreachable_job(tmp_path: Path) -> Path:
    job = write_job(tmp_path, f"http://127.0.0.1:{_closed_port()}/api", users=100)
    job.write_text(
        job.read_text(encoding="utf-8")
        + "  abort_after_connection_failures: 4\n  retry: {max_attempts: 2, base_delay: 0.01, max_delay: 0.02}\n"
        + f"alerts: {{webhook: {{env: {HOOK_ENV}}}, timeout: 2}}\n",
        encoding="utf-8",
    )
    return job


def test_a_failed_run_posts_the_alert(tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]) -> None:
    url, received = webhook
    done = _cli(
        "run", str(_unreachable_job(tmp_path)), "--progress", "none",
        cwd=tmp_path, env={KEY_ENV: "alert-test-key-0123456789", HOOK_ENV: url},
    )  # fmt: skip
    assert done.returncode == ExitCode.ABORTED, done.stderr
    assert len(received) == 1 and received[0]["type"] == "application/json"
    text = received[0]["body"]["text"]
    assert set(received[0]["body"]) == {"text"}
    assert "pushsync job cli, run " in text and "exit 3 (ABORTED)" in text and "cannot be reached" in text
    assert "alert-test-key-0123456789" not in text
    assert "hookSecret0123456789" not in done.stderr + done.stdout  # the webhook URL is a credential


def test_a_webhook_that_is_down_never_fails_the_run(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{_closed_port()}/hooks/downSecret0123456789"
    done = _cli(
        "run", str(_unreachable_job(tmp_path)), "--progress", "none",
        cwd=tmp_path, env={KEY_ENV: "alert-test-key-0123456789", HOOK_ENV: down},
    )  # fmt: skip
    assert done.returncode == ExitCode.ABORTED, done.stderr  # the run's own code, not a crash
    assert "alert.failed" in done.stderr and "Traceback" not in done.stderr
    assert "downSecret0123456789" not in done.stderr


def test_a_missing_webhook_variable_is_a_bad_job_before_sending(tmp_path: Path) -> None:
    done = _cli(
        "run", str(_unreachable_job(tmp_path)), "--progress", "none",
        cwd=tmp_path, env={KEY_ENV: "alert-test-key-0123456789", HOOK_ENV: ""},
    )  # fmt: skip
    assert done.returncode == ExitCode.BAD_JOB_OR_INPUT
    assert f"alerts.webhook: environment variable {HOOK_ENV} is not set" in done.stderr


def test_a_webhook_url_written_in_the_job_is_refused(tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9/api", users=4)
    job.write_text(
        job.read_text(encoding="utf-8") + 'alerts: {webhook: "https://hooks.example/T0/B0/x"}\n',
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as caught:
        load_job(job)
    assert [p.location for p in caught.value.problems] == ["alerts.webhook"]
    assert "hooks.example" not in str(caught.value)


def _summary(
    code: ExitCode, *, elapsed: float = 10.0, rows_rejected: int = 0, rows_read: int = 100
) -> RunSummary:
    outcome = DispatchOutcome.ABORTED if code is ExitCode.ABORTED else DispatchOutcome.COMPLETED
    return RunSummary(
        run_id="r1",
        job="j",
        outcome=outcome,
        exit_code=code,
        elapsed=elapsed,
        endpoints=(),
        rows_rejected=rows_rejected,
        batches_done=1,
        batches_unfinished=0,
        rows_read=rows_read,
    )


def test_when_a_run_alerts() -> None:
    alerts = Alerts(webhook_env="X")
    assert alert_reasons(alerts, _summary(ExitCode.OK), []) == []
    assert alert_reasons(alerts, _summary(ExitCode.PARTIAL, rows_rejected=1), []) == []
    assert alert_reasons(Alerts(on_partial=True), _summary(ExitCode.PARTIAL), []) == ["exit 1 (PARTIAL)"]
    assert alert_reasons(alerts, _summary(ExitCode.ABORTED), []) == ["exit 3 (ABORTED)"]
    share = alert_reasons(Alerts(max_rejected_share=0.05), _summary(ExitCode.PARTIAL, rows_rejected=6), [])
    assert share == ["6 rejected rows and refused IDs of 100 (6.00%), over alerts.max_rejected_share (5.00%)"]
    # Slower than usual: more than 2x the median of the last successful runs, once there are three of them.
    assert alert_reasons(alerts, _summary(ExitCode.OK, elapsed=25.0), [10.0, 11.0]) == []
    assert alert_reasons(alerts, _summary(ExitCode.OK, elapsed=20.0), [10.0, 9.0, 11.0]) == []
    slow = alert_reasons(alerts, _summary(ExitCode.OK, elapsed=25.0), [10.0, 9.0, 11.0, 500.0])
    assert slow == ["took 25.0 s, 2.4x the median 10.5 s of the last 4 successful runs"]


def test_a_resumed_run_alerts_like_any_other(
    tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = webhook
    job = _unreachable_job(tmp_path)
    env = {KEY_ENV: "alert-test-key-0123456789", HOOK_ENV: url}
    first = _cli("run", str(job), "--progress", "none", cwd=tmp_path, env=env)
    assert first.returncode == ExitCode.ABORTED, first.stderr
    listed = _cli("runs", str(job), "--output", "json", cwd=tmp_path, env=env)
    run_id = json.loads(listed.stdout)[0]["run_id"]
    resumed = _cli("resume", run_id, "--job", str(job), "--progress", "none", cwd=tmp_path, env=env)
    assert resumed.returncode == ExitCode.ABORTED, resumed.stderr
    assert len(received) == 2  # the first run's alert, then the resumed run's
    assert "exit 3 (ABORTED)" in received[1]["body"]["text"]


def test_the_webhook_url_is_a_secret_whole_and_its_key_in_pieces_not_its_scheme_or_host() -> None:
    """Registered in pieces, the whole URL had every 8-character run of it masked in what a platform answers:
    ``http://127.0.0.1:…`` read ``***`` after an alert's URL was resolved."""
    url = "http://127.0.0.1:8125/services/T0/B0/hookKeyKept0123456789"
    assert resolve_webhook(Alerts(webhook_env=HOOK_ENV), {HOOK_ENV: url}) == url
    answer = "HTTP 301: moved to http://127.0.0.1:8125/services/v2"
    assert redact_pieces(answer) == answer
    assert redact(f"POST {url}: refused") == "POST ***: refused"
    assert redact_pieces("it echoed hookKeyKept01234") == "it echoed ***"


def test_a_run_that_ends_with_an_error_alerts_too(
    tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    """The nightly export that did not land is exit 2 before any summary: it alerted nobody (docs: exit 2 and
    above always alert). Now one post names the job, the exit code and what to fix, never the webhook's key."""
    url, received = webhook
    job = _unreachable_job(tmp_path)
    (tmp_path / "data" / "users.csv").unlink()
    done = _cli(
        "run", str(job), "--progress", "none",
        cwd=tmp_path, env={KEY_ENV: "alert-test-key-0123456789", HOOK_ENV: url},
    )  # fmt: skip
    assert done.returncode == ExitCode.BAD_JOB_OR_INPUT, done.stderr
    assert len(received) == 1, done.stderr
    text = received[0]["body"]["text"]
    assert text.startswith("pushsync job cli: exit 2 (BAD_JOB_OR_INPUT): ") and "file not found" in text
    assert "users.csv" in text
    assert "hookSecret0123456789" not in done.stderr + done.stdout + text


def test_slack_markup_quoted_in_an_alert_is_escaped(
    tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    """An alert quotes what went wrong — here a missing file's path — and Slack reads ``<!channel>`` in a
    message's text as a mention of the whole channel, ``<!here>`` likewise: quoted text is escaped (``&``,
    ``<``, ``>``), as Slack's formatting guide asks."""
    url, received = webhook
    job = _unreachable_job(tmp_path)
    weird = tmp_path / "<!channel> & <!here|everyone>"
    (tmp_path / "data").rename(weird)
    text = job.read_text(encoding="utf-8").replace("path: data/users.csv", f'path: "{weird.name}/users.csv"')
    job.write_text(text, encoding="utf-8")
    (weird / "users.csv").unlink()
    done = _cli(
        "run", str(job), "--progress", "none",
        cwd=tmp_path, env={KEY_ENV: "alert-test-key-0123456789", HOOK_ENV: url},
    )  # fmt: skip
    assert done.returncode == ExitCode.BAD_JOB_OR_INPUT, done.stderr
    (posted,) = received
    text = posted["body"]["text"]
    assert "&lt;!channel&gt; &amp; &lt;!here|everyone&gt;" in text and "<" not in text, text


class _Redirecting(BaseHTTPRequestHandler):
    """Answers every POST with ``302 Found`` to ``/landing`` and every GET with 200 (a login or landing page)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(302)
        self.send_header("Location", "/landing")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.server.received.append(self.path)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


def test_a_redirecting_webhook_is_a_failed_alert_not_a_sent_one(tmp_path: Path) -> None:
    """urllib followed a 302 to a POST as a GET without the body: the alert was lost while the log said
    ``alert.sent`` (status 200). A redirect is not followed now: ``alert.failed`` names the 3xx."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirecting)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/services/T0/B0/movedSecret0123456789"
        done = _cli(
            "run", str(_unreachable_job(tmp_path)), "--progress", "none",
            cwd=tmp_path, env={KEY_ENV: "alert-test-key-0123456789", HOOK_ENV: url},
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert done.returncode == ExitCode.ABORTED, done.stderr
    assert server.received == []  # type: ignore[attr-defined]
    assert "alert.sent" not in done.stderr
    assert "alert.failed" in done.stderr and "HTTP Error 302" in done.stderr
    assert "movedSecret0123456789" not in done.stderr


@pytest.mark.parametrize(
    ("hook", "said"),
    [
        ("http://127.0.0.1:notaport/services/T0/B0/badSecret0123456789", "not a usable URL"),
        ("http://[::1/services/T0/B0/badSecret0123456789", "not a usable URL: Invalid IPv6 URL"),
        ("hooks.example/services/T0/B0/badSecret0123456789", "must be an http:// or https:// URL"),
    ],
)
def test_a_malformed_webhook_url_is_exit_2_before_sending(tmp_path: Path, hook: str, said: str) -> None:
    """A webhook URL whose port is no number made the post raise http.client.InvalidURL: the run that needed the
    alert ended as "internal error ... a bug in pushsync" (exit 5) instead of its own exit code. The URL is now
    checked with the rest of the job, before anything is sent, and never repeated."""
    done = _cli(
        "run", str(_unreachable_job(tmp_path)), "--progress", "none",
        cwd=tmp_path, env={KEY_ENV: "alert-test-key-0123456789", HOOK_ENV: hook},
    )  # fmt: skip
    assert done.returncode == ExitCode.BAD_JOB_OR_INPUT, done.stderr
    assert f"alerts.webhook: {said}" in done.stderr
    assert "run.start" not in done.stderr and "badSecret0123456789" not in done.stderr
