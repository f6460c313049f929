"""The API key never leaks: not in a log line (at debug level, the most verbose), the summary, the ledger file's
bytes, the rejects file, the run report, the ledger exports, the metrics, nor in any error message — also when
the key is wrong. Keys come only from the environment or a file: a key written in the job file is refused, and
the command line takes none. TLS certificates are checked unless a job aimed at a local sandbox turns it off.

The runs go through the real CLI in a subprocess, against a Netmera sandbox process with faults on (so retries and
error messages are logged) and refusing unknown users (so the ledger holds refused IDs and their messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sync.cli import build_parser, main
from sync.config import Destination, load_job, resolve_secret
from sync.demo import start_sandbox_process, stop_sandbox_process
from sync.errors import BadJobError, ExitCode, SecretError
from sync.run import RunOptions, run
from sync.sandboxes.netmera import NetmeraSandbox, NetmeraSandboxConfig

from .conftest import REPO_ROOT

KEY_ENV = "PUSHSYNC_SECRETS_TEST_KEY"
USERS = 200
UNKNOWN = range(190, 200)
"""Users the sandbox does not know: it refuses them (400, code 5016), so refusals reach the ledger."""

_JOB = """\
version: 1
name: secrets
workdir: work
destination: {{platform: netmera, base_url: "{url}", secret: {secret}}}
defaults: {{ext_id: user_id}}
sources:
  - name: users
    path: users.csv
    attributes: {{name: string, score: number}}
    tags: {{column: segments, delimiter: "|"}}
dispatch:
  batch_size: 25
  concurrency: 4
  request_timeout: 1
  drain_timeout: 5
  budgets: {{"*": {{requests: 200, period: 1}}}}
  retry: {{max_attempts: 10, base_delay: 0.01, max_delay: 0.05}}
"""


def _write_data(directory: Path) -> None:
    lines = ["user_id,name,score,segments"]
    for i in range(USERS):
        score = "not-a-number" if i in (7, 70, 170) else str(i)
        lines.append(f"U{i:04d},User {i},{score},{'gold|beta' if i % 2 else 'silver'}")
    (directory / "users.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_job(directory: Path, url: str, secret: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _write_data(directory)
    job = directory / "job.yaml"
    job.write_text(_JOB.format(url=url, secret=secret), encoding="utf-8")
    return job


@pytest.fixture(scope="module")
def api_key() -> str:
    return "psk_live_" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def faulty_sandbox(tmp_path_factory: pytest.TempPathFactory, api_key: str) -> Iterator[str]:
    """A sandbox process with every fault kind on and unknown users refused; yields its base URL."""
    directory = tmp_path_factory.mktemp("sandbox")
    seed = directory / "seed.json"
    known = [{"extId": f"U{i:04d}"} for i in range(USERS) if i not in UNKNOWN]
    seed.write_text(json.dumps({"users": known}), encoding="utf-8")
    config = {
        "faults": {
            "error_500": 0.05,
            "error_503": 0.05,
            "drop": 0.03,
            "applied_then_500": 0.03,
            "hang": 0.01,
            "hang_seconds": 2,
            "slow": 0.05,
            "latency": {"distribution": "uniform", "low": 0.0, "high": 0.05},
        },
        "seed": 11,
        "unknown_ext_id": "error",
        "seed_file": str(seed),
    }
    process, url = start_sandbox_process(api_key, config, directory)
    try:
        yield url
    finally:
        stop_sandbox_process(process)


def cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync", "--log-level", "debug", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
    )


def leaks(key: str, texts: list[str], root: Path, skip: set[Path]) -> list[str]:
    """Where ``key`` appears: in any of ``texts`` or any file under ``root`` (bytes, as UTF-8 and UTF-16)."""
    found = [f"output #{i}" for i, t in enumerate(texts) if key in t]
    needles = [key.encode("utf-8"), key.encode("utf-16-le")]
    for path in sorted(root.rglob("*")):
        if path.is_file() and path not in skip:
            data = path.read_bytes()
            if any(n in data for n in needles):
                found.append(str(path))
    return found


def everything_about_the_run(
    job: Path, run_id: str, capsys: pytest.CaptureFixture[str]
) -> tuple[list[str], dict[str, Any]]:
    """Run every command that reads the ledger (show, runs, report, each export); return what they printed."""
    outputs: list[str] = []
    work = job.parent / "work"
    commands = [
        ["show", run_id, "--job", str(job)],
        ["show", run_id, "--job", str(job), "--output", "json"],
        ["runs", str(job), "--output", "json"],
        ["report", run_id, "--job", str(job), "-o", str(work / "report.html")],
    ] + [
        [
            "ledger-export",
            run_id,
            "--job",
            str(job),
            "--table",
            table,
            "--format",
            "csv",
            "-o",
            str(work / f"{table}.csv"),
        ]
        for table in ("batches", "attempts", "refused-ids", "rejected-rows")
    ]
    for command in commands:
        assert main(command) == 0, command
        captured = capsys.readouterr()
        outputs += [captured.out, captured.err]
    shown = json.loads(outputs[2])
    return outputs, shown


@pytest.mark.parametrize("where", ["env", "file", "env-snapshot-mode"])
def test_a_known_key_appears_nowhere(
    where: str, tmp_path: Path, faulty_sandbox: str, api_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env: dict[str, str] = {}
    if where.startswith("env"):
        secret = f"{{env: {KEY_ENV}}}"
        env[KEY_ENV] = api_key
    else:
        secret = "{file: secret/netmera.key}"
        (tmp_path / "secret").mkdir()
        (tmp_path / "secret" / "netmera.key").write_text(api_key + "\n", encoding="utf-8")
    job = write_job(tmp_path, faulty_sandbox, secret)
    if where == "env-snapshot-mode":  # snapshot mode also writes the confirmed state under the workdir
        job.write_text("mode: snapshot\n" + job.read_text(encoding="utf-8"), encoding="utf-8")
    prom = tmp_path / "work" / "metrics.prom"
    done = cli(
        ["run", str(job), "--output", "json", "--progress", "log", "--metrics-textfile", str(prom)],
        tmp_path,
        env,
    )
    # Exit 1 (partial): rows rejected by validation, IDs refused by the platform.
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    summary = json.loads(done.stdout)
    totals = summary["totals"]
    # The run met everything that produces messages: retries after faults, refusals, rejected rows.
    assert sum(e["retries"] for e in summary["endpoints"]) > 0
    assert totals["ids_rejected"] >= len(UNKNOWN)
    assert totals["rows_rejected"] == 3 and totals["ids_failed"] == 0
    debug_lines = [line for line in done.stderr.splitlines() if '"level": "debug"' in line]
    assert len(debug_lines) > 20  # debug logging really was on: one line per batch at least
    outputs, shown = everything_about_the_run(job, summary["run_id"], capsys)
    assert shown["refused_ids"], "the ledger holds the platform's refusals and their messages"
    assert (tmp_path / "work" / "report.html").stat().st_size > 1000
    assert (tmp_path / "work" / "rejects.csv").read_text(encoding="utf-8").count("\n") == 4
    assert prom.is_file()
    # `retry` reads the key too, and sends the refused IDs again (refused again: the sandbox still lacks them).
    replay = cli(
        ["retry", summary["run_id"], "--job", str(job), "--output", "json", "--progress", "log"],
        tmp_path,
        env,
    )
    assert replay.returncode == 1 and "Traceback" not in replay.stderr, replay.stderr[-3000:]
    assert json.loads(replay.stdout)["totals"]["ids_rejected"] >= len(UNKNOWN)
    skip = {tmp_path / "secret" / "netmera.key"}
    texts = [done.stdout, done.stderr, replay.stdout, replay.stderr, *outputs]
    assert leaks(api_key, texts, tmp_path, skip) == []


def test_a_wrong_key_appears_in_no_error_message(
    tmp_path: Path, faulty_sandbox: str, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "psk_live_" + secrets.token_hex(16)
    job = write_job(tmp_path, faulty_sandbox, f"{{env: {KEY_ENV}}}")
    done = cli(["run", str(job), "--output", "json", "--progress", "log"], tmp_path, {KEY_ENV: wrong})
    assert done.returncode == int(ExitCode.ABORTED), done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert "403" in summary["message"] and "API key" in summary["message"]
    outputs, _ = everything_about_the_run(job, summary["run_id"], capsys)
    assert leaks(wrong, [done.stdout, done.stderr, *outputs], tmp_path, set()) == []


LITERAL = "psk_live_literal_0123456789abcdef"


@pytest.mark.parametrize(
    ("destination", "location"),
    [
        (f'secret: "{LITERAL}"', "destination.secret"),
        (f'secret: {{env: {KEY_ENV}}}, api_key: "{LITERAL}"', "destination.api_key"),
        (f'secret: {{env: {KEY_ENV}}}, extra: {{token: "{LITERAL}"}}', "destination.extra.token"),
        (
            f'secret: {{env: {KEY_ENV}}}, base_url: "https://u:{LITERAL}@example.com/rest/3.0/"',
            "destination.base_url",
        ),
        (
            f'secret: {{env: {KEY_ENV}}}, base_url: "https://example.com/rest/3.0/?api_key={LITERAL}"',
            "destination.base_url",
        ),
    ],
)
def test_a_key_written_in_the_job_file_is_refused(
    destination: str,
    location: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _write_data(tmp_path)
    if "base_url" not in destination:
        destination = 'base_url: "http://127.0.0.1:9/rest/3.0/", ' + destination
    job = tmp_path / "job.yaml"
    job.write_text(
        "version: 1\n"
        f"destination: {{platform: netmera, {destination}}}\n"
        "sources:\n  - {name: u, path: users.csv, ext_id: user_id, attributes: {name: string}}\n",
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(job)
    assert location in [p.location for p in info.value.problems]
    assert LITERAL not in str(info.value)
    monkeypatch.setenv(KEY_ENV, "the-real-key-from-the-environment")
    for command in (["run", str(job)], ["validate", str(job)], ["plan", str(job)]):
        assert main(command) == 2
        captured = capsys.readouterr()
        assert location in captured.out + captured.err
        assert LITERAL not in captured.out + captured.err


def test_keys_come_only_from_the_environment_or_a_file(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="names no secret"):
        resolve_secret(Destination("netmera", "http://127.0.0.1:9/"), environ={})
    with pytest.raises(SecretError) as info:
        resolve_secret(Destination("netmera", "http://127.0.0.1:9/", secret_env="NOPE"), environ={})
    assert "NOPE" in str(info.value)
    empty = tmp_path / "empty.key"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(SecretError, match="is empty"):
        resolve_secret(Destination("netmera", "http://127.0.0.1:9/", secret_file=str(empty)), environ={})
    # The environment wins over the file; the file is used when the variable is unset.
    key_file = tmp_path / "k.key"
    key_file.write_text("from-file-1234\n", encoding="utf-8")
    both = Destination("netmera", "http://127.0.0.1:9/", secret_env="K", secret_file=str(key_file))
    assert resolve_secret(both, environ={"K": "from-env-1234"}) == "from-env-1234"
    assert resolve_secret(both, environ={}) == "from-file-1234"
    # No command takes a key on the command line, where it would land in shell history and `ps`.
    for action in build_parser()._subparsers._group_actions[0].choices["run"]._actions:  # type: ignore[union-attr]
        assert not any("key" in o or "secret" in o or "token" in o for o in action.option_strings)


# --- TLS ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def self_signed(tmp_path: Path) -> ssl.SSLContext:
    """A server TLS context with a freshly made self-signed certificate for 127.0.0.1 (no CA trusts it)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert)),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@contextlib.asynccontextmanager
async def _tls_sandbox(self_signed: ssl.SSLContext) -> AsyncIterator[tuple[str, NetmeraSandbox, int]]:
    """A Netmera sandbox served over TLS with ``self_signed``: its key, the sandbox and its port."""
    key = "tls-test-key-" + secrets.token_hex(8)
    sandbox = NetmeraSandbox(NetmeraSandboxConfig(api_key=key))
    sandbox.core.reopen()
    runner = web.AppRunner(sandbox.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self_signed)
    await site.start()
    try:
        yield key, sandbox, next(a[1] for a in runner.addresses if isinstance(a, tuple))
    finally:
        await sandbox.core.close()
        await runner.cleanup()


async def test_tls_certificates_are_checked_unless_a_sandbox_job_turns_it_off(
    tmp_path: Path, self_signed: ssl.SSLContext
) -> None:
    async with _tls_sandbox(self_signed) as (key, sandbox, port):
        url = f"https://127.0.0.1:{port}/rest/3.0/"
        checked = load_job(write_job(tmp_path / "checked", url, f"{{env: {KEY_ENV}}}"))
        assert checked.destination.verify_tls is True  # the default
        outcome = await run(checked, RunOptions(api_key=key))
        assert outcome.exit_code is ExitCode.ABORTED
        assert "certificate" in (outcome.summary.message or "").lower()
        assert sandbox.stats.snapshot()["requests_total"] == 0  # nothing reached the server
        assert key not in (outcome.summary.message or "")

        unchecked_path = write_job(tmp_path / "unchecked", url, f"{{env: {KEY_ENV}}}")
        text = unchecked_path.read_text(encoding="utf-8").replace(
            "secret: {env:", "verify_tls: false, secret: {env:"
        )
        unchecked_path.write_text(text, encoding="utf-8")
        unchecked = load_job(unchecked_path)
        assert unchecked.destination.verify_tls is False
        outcome = await run(unchecked, RunOptions(api_key=key))
        assert (
            outcome.exit_code is ExitCode.PARTIAL
        )  # three rows rejected by validation; the rest went through
        assert sandbox.state.user_count() == USERS - 3


async def test_the_command_line_checks_tls_certificates_against_the_users_ca_settings(
    tmp_path: Path, self_signed: ssl.SSLContext
) -> None:
    """``pushsync run`` loads the system's CA certificates only into the TLS context its job uses
    (sync/platforms/_tls.py): over https it still refuses a certificate no trusted CA signed, and trusts one
    that the user's own CA settings name (``SSL_CERT_FILE``), as OpenSSL reads them."""
    (tmp_path / "no-certs").mkdir()

    async def pushsync_run(job: Path, key: str, ca_file: Path) -> tuple[int, str]:
        env = {
            **os.environ,
            KEY_ENV: key,
            "SSL_CERT_FILE": str(ca_file),
            "SSL_CERT_DIR": str(tmp_path / "no-certs"),
        }
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "sync", "run", str(job), "--progress", "none", "--output", "json"),
            env=env,
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode is not None
        return process.returncode, out.decode() + err.decode()

    async with _tls_sandbox(self_signed) as (key, sandbox, port):
        job = write_job(tmp_path / "job", f"https://127.0.0.1:{port}/rest/3.0/", f"{{env: {KEY_ENV}}}")
        code, output = await pushsync_run(job, key, Path(ssl.get_default_verify_paths().openssl_cafile))
        assert code == ExitCode.ABORTED, output
        assert "certificate" in output.lower()
        assert sandbox.stats.snapshot()["requests_total"] == 0  # refused before any request went out

        # The server's own certificate, trusted.
        code, output = await pushsync_run(job, key, tmp_path / "cert.pem")
        assert code == ExitCode.PARTIAL, output  # three rows rejected by validation; the rest went through
        assert sandbox.state.user_count() == USERS - 3


def test_tls_checks_cannot_be_turned_off_for_a_remote_platform(tmp_path: Path) -> None:
    job = write_job(tmp_path, "https://restapi.netmera.com/rest/3.0/", f"{{env: {KEY_ENV}}}")
    text = job.read_text(encoding="utf-8").replace("secret: {env:", "verify_tls: false, secret: {env:")
    job.write_text(text, encoding="utf-8")
    with pytest.raises(BadJobError) as info:
        load_job(job)
    assert [p.location for p in info.value.problems] == ["destination.verify_tls"]


# --- Forms On Fire: the key travels inside every request body ---------------------------------------------------

FOF_KEY_ENV = "PUSHSYNC_SECRETS_FOF_KEY"
_FOF_JOB = """\
version: 1
name: fof-secrets
workdir: work
destination:
  platform: formsonfire
  base_url: "{url}"
  secret: {{env: {key_env}}}
  extra: {{company_id: "1000", body_format: {fmt}, user_key: UserExternalId}}
defaults: {{ext_id: crm_id}}
sources:
  - name: pushes
    path: pushes.csv
    attributes:
      title: {{attribute: Title}}
      message: {{attribute: Body}}
dispatch:
  concurrency: 4
  request_timeout: 1
  drain_timeout: 5
  retry: {{max_attempts: 10, base_delay: 0.01, max_delay: 0.05}}
"""


@pytest.fixture(scope="module")
def fof_sandbox(tmp_path_factory: pytest.TempPathFactory, api_key: str) -> Iterator[str]:
    """A Forms On Fire sandbox process knowing users crm-0..crm-49 (others: UserNotFound), with faults on."""
    directory = tmp_path_factory.mktemp("fof")
    config = directory / "fof.json"
    config.write_text(
        json.dumps(
            {
                "company_id": 1000,
                "users": [{"UserId": f"u{i}", "UserExternalId": f"crm-{i}"} for i in range(50)],
                "faults": {"error_500": 0.05, "drop": 0.03, "applied_then_500": 0.03},
                "seed": 5,
            }
        ),
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "sync", "sandbox", "formsonfire", "--port", "0", "--config", str(config)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "FORMSONFIRE_SANDBOX_INTEGRATION_KEY": api_key},
    )
    assert process.stdout is not None
    url = ""
    for line in process.stdout:
        if line.startswith("http://"):
            url = line.strip()
            break
    try:
        assert url, "the Forms On Fire sandbox did not start"
        yield url
    finally:
        stop_sandbox_process(process)


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_a_key_sent_inside_request_bodies_appears_nowhere(
    fmt: str, tmp_path: Path, fof_sandbox: str, api_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = ["crm_id,title,message"] + [f"crm-{i},Hello {i},Message {i}" for i in range(55)]
    (tmp_path / "pushes.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    job = tmp_path / "job.yaml"
    job.write_text(_FOF_JOB.format(url=fof_sandbox, key_env=FOF_KEY_ENV, fmt=fmt), encoding="utf-8")
    done = cli(["run", str(job), "--output", "json", "--progress", "log"], tmp_path, {FOF_KEY_ENV: api_key})
    # Exit 1: five users are unknown to the platform (UserNotFound); the other 50 pushes went through.
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert (summary["totals"]["ids_ok"], summary["totals"]["ids_rejected"]) == (50, 5)
    outputs, shown = everything_about_the_run(job, summary["run_id"], capsys)
    assert len(shown["refused_ids"]) == 5
    wrong = "fof_" + secrets.token_hex(16)
    bad = cli(["run", str(job), "--output", "json", "--progress", "log"], tmp_path, {FOF_KEY_ENV: wrong})
    assert bad.returncode == int(ExitCode.ABORTED), bad.stderr[-3000:]
    texts = [done.stdout, done.stderr, bad.stdout, bad.stderr, *outputs]
    assert leaks(api_key, texts, tmp_path, set()) == []
    assert leaks(wrong, texts, tmp_path, set()) == []
