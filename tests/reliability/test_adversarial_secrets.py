"""Adversarial corpus, part B of issue #11: secrets, redirects and job files.

* **Redirects**: no connector follows a redirect. An API that answers 301/302/303/307/308 towards another origin
  (another port on loopback is another origin) never receives the credentials — header (Netmera,
  NotifyVisitors, Meiro's token), body (Forms On Fire's IntegrationKey, Meiro's password) — and a redirected
  write is never recorded as a success: the run aborts (exit 3) and no batch is ``ok``.
* **Echoed keys**: a platform that echoes the key in an error message, past the 300 characters kept, leaves no
  8-character piece of it in the ledger, its exports or the summary (mask first, then cut).
* **Job files**: a key pasted where the variable's name or the file's path belongs is refused by ``validate``,
  ``plan`` and ``run`` without being repeated; duplicate YAML keys are refused naming the key and its line; a
  YAML alias bomb is refused at once, without echoing its expansion; ``per: 0s`` is refused by ``validate``.
* **Keys themselves**: a key holding a line break is one clear error (exit 2) that does not print it; a key
  file readable by everyone is warned about.
* **A 200 that is not the API's answer** (an HTML page, truncated JSON) is retried a bounded number of times,
  then the batch fails with a short message that does not quote the page.

The servers here are small aiohttp applications on loopback: they are what is being tested against (a redirector,
a page-serving proxy, an echoing API), not mocks of pushsync's code.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from sync.cli import main
from sync.config import Destination, load_job, resolve_secret
from sync.errors import BadJobError, ExitCode, FatalPlatformError, RetryableError
from sync.ledger.ledger import Ledger
from sync.platforms._http import MAX_MESSAGE, bounded
from sync.platforms.formsonfire.client import FormsOnFireClient
from sync.platforms.formsonfire.requests import make_batch as fof_batch
from sync.platforms.formsonfire.requests import push_body
from sync.platforms.meiro.client import MeiroClient, MeiroCredentials
from sync.platforms.meiro.job import load_meiro_job
from sync.platforms.netmera.client import NetmeraClient
from sync.platforms.notifyvisitors.client import NotifyVisitorsClient
from sync.records import Batch, BatchStatus, Operation
from sync.redact import register_secret
from sync.run import RunOptions, run
from sync.sandboxes._core import start_app

KEY_ENV = "PUSHSYNC_ADVERSARIAL_KEY"
PIECE = 8
"""No run of this many characters of a key may be stored or printed."""


def new_key(prefix: str = "psk_live_") -> str:
    return prefix + secrets.token_hex(16)


def pieces(key: str) -> list[str]:
    """Every run of :data:`PIECE` characters of ``key``."""
    return [key[i : i + PIECE] for i in range(len(key) - PIECE + 1)]


def leaked_pieces(key: str, text: str) -> list[str]:
    return [p for p in pieces(key) if p in text]


def files_holding_pieces(key: str, root: Path) -> list[str]:
    """Files under ``root`` holding any piece of ``key`` (UTF-8 bytes)."""
    needles = [p.encode() for p in pieces(key)]
    return [
        str(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and any(n in path.read_bytes() for n in needles)
    ]


# --- small loopback servers --------------------------------------------------------------------------------------


@dataclass
class Seen:
    """What one server received: method, path, headers and body of every request."""

    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)

    def holds(self, key: str) -> bool:
        return any(
            key in json.dumps(headers) or key.encode() in body for _m, _p, headers, body in self.requests
        )


Serve = Callable[[Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(handler)``: one aiohttp server on a free loopback port answering every request with
    ``handler``; returns its root URL. Every server started is stopped at teardown."""
    started = []

    async def start(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = await start_app(app)
        started.append(server)
        return str(server.root_url)

    yield start
    for server in started:
        await server.stop()


def recording(seen: Seen, answer: Callable[[web.Request], web.StreamResponse]) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        seen.requests.append((request.method, request.path, dict(request.headers), await request.read()))
        return answer(request)

    return handler


def _api_like(_request: web.Request) -> web.StreamResponse:
    # Good enough for every connector to call it a success: Netmera's {}, NotifyVisitors' envelope, a Forms On
    # Fire body without an error, a Meiro login token.
    body = {
        "response": {"status": "success", "message": "ok", "data": {}},
        "token": "stolen-token-0123456789",
    }
    return web.json_response(body)


async def redirector(serve: Serve, status: int, target_root: str) -> str:
    """A server that answers every request with ``status`` and ``Location: <target_root><same path>``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(status=status, headers={"Location": target_root + request.path_qs})

    return await serve(handler)


Connect = Callable[[str, str], Awaitable[None]]
"""``await connect(root_url, key)``: one credentialed call by a connector to the API at ``root_url``."""


async def _netmera(root: str, key: str) -> None:
    batch = Batch("b-netmera", "tagUsers", Operation.TAG, {"tag": "A", "extIds": ["u1"]}, ("u1",))
    async with NetmeraClient(Destination("netmera", root + "/rest/3.0/"), key, timeout=5) as client:
        await client.send(batch)


async def _notifyvisitors(root: str, key: str) -> None:
    body = {"nv": [{"userID": "u1", "user_attributes": {"name": "A"}}]}
    batch = Batch("b-nv", "user/create", Operation.SET_ATTRIBUTES, body, ("u1",))
    destination = Destination("notifyvisitors", root + "/api/v1/", extra={"brand_id": "7"})
    async with NotifyVisitorsClient(destination, key, timeout=5) as client:
        await client.send(batch)


async def _formsonfire(root: str, key: str) -> None:
    destination = Destination("formsonfire", root + "/api/v2/", extra={"company_id": "1"})
    async with FormsOnFireClient(destination, key, timeout=5) as client:
        await client.send(fof_batch(push_body("UserExternalId", "crm-1", title="Hi")))


async def _meiro(root: str, key: str) -> None:
    async with MeiroClient(root + "/api/", MeiroCredentials("a@example.test", key), timeout=5) as client:
        await client.login()


CONNECTORS: dict[str, Connect] = {
    "netmera": _netmera,
    "notifyvisitors": _notifyvisitors,
    "formsonfire": _formsonfire,
    "meiro": _meiro,
}


# --- item 3: credentials never follow a redirect --------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("platform", sorted(CONNECTORS))
async def test_no_connector_sends_credentials_through_a_redirect(
    platform: str, status: int, serve: Serve
) -> None:
    key = new_key(f"{platform}-key-")
    elsewhere = Seen()
    target = await serve(recording(elsewhere, _api_like))
    origin = await redirector(serve, status, target)
    with pytest.raises(FatalPlatformError) as info:
        await CONNECTORS[platform](origin, key)
    message = str(info.value)
    assert elsewhere.requests == []  # the other origin heard nothing: neither the key nor the body
    assert not elsewhere.holds(key)
    assert f"HTTP {status}" in message and "redirect" in message and target in message
    assert "base" in message  # says what to change (the base URL) instead of following
    assert key not in message


async def test_a_meiro_token_does_not_follow_a_redirect_after_login(serve: Serve) -> None:
    """The login is answered; the next call (with ``X-Access-Token``) is redirected elsewhere."""
    token = "tok-" + secrets.token_hex(16)
    elsewhere = Seen()
    target = await serve(recording(elsewhere, _api_like))

    async def meiro(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.path.endswith("/users/login"):
            return web.json_response({"token": token})
        return web.Response(status=307, headers={"Location": target + request.path_qs})

    root = await serve(meiro)
    async with MeiroClient(
        root + "/api/", MeiroCredentials("a@example.test", new_key()), timeout=5
    ) as client:
        with pytest.raises(FatalPlatformError, match="HTTP 307 redirect"):
            await client.get_export("n1", 1)
    assert elsewhere.requests == [] and token not in json.dumps(elsewhere.requests, default=str)


async def test_a_redirect_within_the_same_origin_is_not_followed_either(serve: Serve) -> None:
    """Same host and port, another path: still not followed (a 301/302 turns a POST into a bodiless GET)."""
    key = new_key()
    seen = Seen()

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.requests.append((request.method, request.path, dict(request.headers), await request.read()))
        if request.path.startswith("/moved/"):
            return _api_like(request)
        return web.Response(status=301, headers={"Location": "/moved" + request.path})

    root = await serve(handler)
    with pytest.raises(FatalPlatformError, match="HTTP 301 redirect"):
        await _netmera(root, key)
    assert [path for _m, path, _h, _b in seen.requests] == ["/rest/3.0/tagUsers"]


# --- item 4: a redirected write is never a success --------------------------------------------------------------

_JOB = """\
version: 1
name: adversarial
workdir: work
destination: {{platform: netmera, base_url: "{url}", secret: {{env: {key_env}}}}}
defaults: {{ext_id: user_id}}
sources:
  - {{name: users, path: users.csv, attributes: {{name: string}}}}
dispatch:
  batch_size: 10
  concurrency: 2
  request_timeout: 5
  drain_timeout: 5
  retry: {{max_attempts: 3, base_delay: 0.001, max_delay: 0.002}}
"""


def write_job(directory: Path, url: str, *, users: int = 20) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = ["user_id,name"] + [f"U{i:03d},User {i}" for i in range(users)]
    (directory / "users.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    job = directory / "job.yaml"
    job.write_text(_JOB.format(url=url, key_env=KEY_ENV), encoding="utf-8")
    return job


@pytest.mark.parametrize("status", [301, 307])
async def test_a_redirected_run_is_aborted_and_no_batch_is_ok(
    status: int, serve: Serve, tmp_path: Path
) -> None:
    key = new_key()
    elsewhere = Seen()
    target = await serve(recording(elsewhere, _api_like))
    origin = await redirector(serve, status, target)
    job = load_job(write_job(tmp_path, origin + "/rest/3.0/"))
    outcome = await run(job, RunOptions(api_key=key))
    assert outcome.exit_code is ExitCode.ABORTED
    assert outcome.summary.ids_ok == 0
    assert "redirect" in (outcome.summary.message or "")
    assert elsewhere.requests == []
    with Ledger.open(outcome.ledger_path) as ledger:
        statuses = {b.status for b in ledger.batches(outcome.run_id)}
        assert BatchStatus.OK not in statuses and statuses
        assert ledger.confirmed_ok(outcome.run_id) == set()
    assert files_holding_pieces(key, tmp_path) == []


# --- item 5: an echoed key is masked before the message is cut ---------------------------------------------------


def test_a_message_is_masked_before_it_is_cut() -> None:
    key = new_key()
    register_secret(key)
    for pad in range(MAX_MESSAGE - len(key), MAX_MESSAGE):  # every cut through the key
        out = bounded("x" * pad + key + " is not a valid API key")
        assert leaked_pieces(key, out) == [] and len(out) <= MAX_MESSAGE
    # A server that echoes only part of the key: any 8 characters of it are masked, fewer are harmless.
    assert leaked_pieces(key, bounded(f"key {key[:12]}... refused; {key[-9:]}")) == []
    assert bounded("the ordinary message") == "the ordinary message"


async def test_a_key_echoed_by_the_platform_leaves_no_piece_in_ledger_or_exports(
    serve: Serve, tmp_path: Path
) -> None:
    key = new_key()
    calls = [0]

    async def echoing(request: web.Request) -> web.StreamResponse:
        await request.read()
        calls[0] += 1
        # The key lands around character 280: a message cut at 300 characters before masking keeps 20 of it.
        text = "x" * (MAX_MESSAGE - 20) + f" {request.headers.get('X-netmera-api-key')} is not allowed here"
        if calls[0] % 2:  # a retryable answer first (attempts.message), then a refusal (batches, refused IDs)
            return web.json_response({"code": 2001, "error": text}, status=500)
        return web.json_response({"code": 2020, "error": text}, status=400)

    root = await serve(echoing)
    job = load_job(write_job(tmp_path, root + "/rest/3.0/", users=4))
    outcome = await run(job, RunOptions(api_key=key))
    assert outcome.exit_code is ExitCode.PARTIAL
    with Ledger.open(outcome.ledger_path) as ledger:
        attempts = ledger.attempts(outcome.run_id)
        assert any(a.message and "x" * 50 in a.message for a in attempts)  # the messages were recorded
        stored = json.dumps(
            [a.message for a in attempts]
            + [b.message for b in ledger.batches(outcome.run_id)]
            + [list(r) for r in ledger.refused_ids(outcome.run_id)]
        )
    assert leaked_pieces(key, stored) == []
    for table in ("batches", "attempts", "refused-ids"):
        out = tmp_path / "work" / f"{table}.csv"
        command = ["ledger-export", outcome.run_id, "--job", str(job.path), "--table", table]
        assert await asyncio.to_thread(main, [*command, "--format", "csv", "-o", str(out)]) == 0
        assert out.stat().st_size > 0
    assert leaked_pieces(key, json.dumps(outcome.summary.message or "")) == []
    assert files_holding_pieces(key, tmp_path) == []


async def test_a_meiro_answer_quoting_the_password_is_masked_and_bounded(serve: Serve) -> None:
    password = new_key("meiro-pw-")

    async def meiro(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path.endswith("/users/login"):
            return web.json_response({"token": "tok-" + secrets.token_hex(12)})
        # An export whose status is not one Meiro documents, quoting the password (as a broken proxy might).
        echoed = json.loads(body or b"{}").get("password", password)
        return web.json_response({"push_notification_export": {"id": 1, "status": "y" * 290 + echoed}})

    root = await serve(meiro)
    async with MeiroClient(root + "/api/", MeiroCredentials("a@example.test", password), timeout=5) as client:
        with pytest.raises(RetryableError) as info:
            await client.get_export("n1", 1)
    assert leaked_pieces(password, str(info.value)) == [] and len(str(info.value)) < 500


# --- item 6: a key pasted into the job file is refused without being repeated -----------------------------------


def _job_text(secret: str) -> str:
    return (
        "version: 1\n"
        f'destination: {{platform: netmera, base_url: "http://127.0.0.1:9/rest/3.0/", secret: {secret}}}\n'
        "sources:\n  - {name: u, path: users.csv, ext_id: user_id, attributes: {name: string}}\n"
    )


PASTED = "psk_live_4f9c2e7a1b3d5f6e8a0c2b4d"
"""A key pasted into the job file. It matches the schema's pattern for variable names (letters, digits, _)."""


@pytest.mark.parametrize(
    ("secret", "location"),
    [
        (f'{{env: "{PASTED}"}}', "destination.secret.env"),  # a name-shaped key: accepted by the schema
        (f'{{env: "{PASTED.replace("_", "-")}"}}', "destination.secret.env"),  # refused by the schema
        (f'{{env: "{PASTED}=="}}', "destination.secret.env"),
        (f'{{env: ["{PASTED}"]}}', "destination.secret.env"),
        (f'{{env: {KEY_ENV}, "{PASTED}": 1}}', "destination.secret"),
        (f'{{file: "{PASTED}"}}', "destination.secret.file"),
    ],
)
def test_a_key_pasted_into_the_secret_is_refused_without_being_repeated(
    secret: str,
    location: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "users.csv").write_text("user_id,name\nU1,a\n", encoding="utf-8")
    job = tmp_path / "job.yaml"
    job.write_text(_job_text(secret), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(KEY_ENV, "the-real-key-from-the-environment")
    with pytest.raises(BadJobError) as info:
        load_job(job)
    assert location in [p.location for p in info.value.problems]
    assert PASTED[:PIECE] not in str(info.value) and PASTED[-PIECE:] not in str(info.value)
    for command in (["validate", str(job)], ["plan", str(job)], ["run", str(job)]):
        assert main(command) == int(ExitCode.BAD_JOB_OR_INPUT), command
        captured = capsys.readouterr()
        assert location in captured.err + captured.out
        assert leaked_pieces(PASTED, captured.out + captured.err) == [], command


def test_a_real_variable_name_and_file_path_are_still_accepted(tmp_path: Path) -> None:
    (tmp_path / "users.csv").write_text("user_id,name\nU1,a\n", encoding="utf-8")
    (tmp_path / "vault").mkdir()
    (tmp_path / "vault" / "4f9c2e7a1b3d5f6e8a0c2b4d.key").write_text("k" * 20, encoding="utf-8")
    job = tmp_path / "job.yaml"
    for secret in (
        "{env: NETMERA_API_KEY}",
        "{env: netmera_key_prod_2}",
        "{env: PUSHSYNC_NETMERA_API_KEY_2024}",
        "{file: secrets/netmera.key}",
        "{file: /run/secrets/netmera_api_key}",
        "{file: vault/4f9c2e7a1b3d5f6e8a0c2b4d.key}",  # a hash-like name, but the file is there
    ):
        job.write_text(_job_text(secret), encoding="utf-8")
        load_job(job)


@pytest.mark.parametrize(
    ("destination", "location"),
    [
        (f'"{PASTED}"', "destination"),
        (f'{{platform: netmera, base_url: "{PASTED}", secret: {{env: K}}}}', "destination.base_url"),
        (
            f'{{platform: "{PASTED}", base_url: "https://a.example/", secret: {{env: K}}}}',
            "destination.platform",
        ),
    ],
)
def test_no_schema_message_echoes_a_value_that_may_be_a_secret(
    destination: str, location: str, tmp_path: Path
) -> None:
    (tmp_path / "users.csv").write_text("user_id,name\nU1,a\n", encoding="utf-8")
    job = tmp_path / "job.yaml"
    job.write_text(
        "version: 1\n"
        f"destination: {destination}\n"
        "sources:\n  - {name: u, path: users.csv, ext_id: user_id, attributes: {name: string}}\n",
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(job)
    assert [p.location for p in info.value.problems] == [location]
    assert leaked_pieces(PASTED, str(info.value)) == []


# --- job files: duplicate keys, alias bombs, a zero-second budget ------------------------------------------------


def test_duplicate_keys_are_refused_naming_the_key_and_its_line(tmp_path: Path) -> None:
    (tmp_path / "users.csv").write_text("user_id,name\nU1,a\n", encoding="utf-8")
    job = tmp_path / "job.yaml"
    job.write_text(
        "version: 1\n"
        'destination: {platform: netmera, base_url: "https://a.example/rest/3.0/", secret: {env: K}}\n'
        "sources:\n  - {name: u, path: users.csv, ext_id: user_id, attributes: {name: string}}\n"
        'destination: {platform: netmera, base_url: "https://b.example/rest/3.0/", secret: {env: K}}\n',
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(job)
    text = str(info.value)
    assert "duplicate key 'destination'" in text and "line 5" in text and "line 2" in text
    # Nested, in block style: the second definition of a column would silently replace the first.
    job.write_text(
        "version: 1\n"
        "destination:\n  platform: netmera\n  base_url: https://a.example/rest/3.0/\n  secret: {env: K}\n"
        "sources:\n  - name: u\n    path: users.csv\n    ext_id: user_id\n"
        "    attributes:\n      name: string\n      name: number\n",
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(job)
    assert "duplicate key 'name'" in str(info.value) and "line 12" in str(info.value)


def test_duplicate_secret_keys_name_the_key_but_not_the_values(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(_job_text(f'{{env: K, env: "{PASTED}"}}'), encoding="utf-8")
    with pytest.raises(BadJobError) as info:
        load_job(job)
    assert "duplicate key 'env'" in str(info.value) and leaked_pieces(PASTED, str(info.value)) == []


_MEIRO_JOB = """\
version: 1
platform: meiro
base_url: http://127.0.0.1:9/api/
credentials: {{email_env: MEIRO_EMAIL, password: {password}}}
exports:
  - {{notification: n1, export: 1}}
"""


@pytest.mark.parametrize(
    ("text", "location", "said"),
    [
        (
            _MEIRO_JOB.format(password=f'{{env: "{PASTED}"}}'),
            "credentials.password.env",
            "looks like a password",
        ),
        (
            _MEIRO_JOB.format(password=f'{{file: "{PASTED}"}}'),
            "credentials.password.file",
            "looks like a password",
        ),
        (_MEIRO_JOB.format(password="{env: P}") + "platform: meiro\n", "line 7", "duplicate key 'platform'"),
        (
            _MEIRO_JOB.format(password=f'{{env: P, env: "{PASTED}"}}'),
            "line 4",
            "duplicate key 'env'",
        ),
    ],
    ids=["pasted-env", "pasted-file", "duplicate-top-level-key", "duplicate-secret-key"],
)
def test_a_meiro_job_file_is_read_the_same_way(text: str, location: str, said: str, tmp_path: Path) -> None:
    job = tmp_path / "meiro.yaml"
    job.write_text(text, encoding="utf-8")
    with pytest.raises(BadJobError) as info:
        load_meiro_job(job)
    assert any(p.location.startswith(location) and said in p.message for p in info.value.problems), str(
        info.value
    )
    assert leaked_pieces(PASTED, str(info.value)) == []


def _alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join(f"*a{i - 1}" for _ in range(9)) + "]")
    return "\n".join(lines) + f"\nversion: 1\ndestination: *a{levels}\n"


@pytest.mark.parametrize("levels", [7, 9])
def test_an_alias_bomb_is_refused_at_once_without_echoing_it(
    levels: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "bomb.yaml"
    job.write_text(_alias_bomb(levels), encoding="utf-8")
    started = time.monotonic()
    assert main(["validate", str(job)]) == int(ExitCode.BAD_JOB_OR_INPUT)
    elapsed = time.monotonic() - started
    captured = capsys.readouterr()
    assert "alias" in captured.out + captured.err
    assert len(captured.out) + len(captured.err) < 2000  # was 34 MB at 7 levels
    assert elapsed < 10  # was a hang at 9 levels (generous: the machine is shared)


def test_a_meiro_job_alias_bomb_is_refused_the_same_way(tmp_path: Path) -> None:
    job = tmp_path / "meiro.yaml"
    job.write_text(_alias_bomb(9).replace("destination:", "exports:"), encoding="utf-8")
    with pytest.raises(BadJobError, match="aliases") as info:
        load_meiro_job(job)
    assert len(str(info.value)) < 500


def test_ordinary_anchors_and_aliases_still_work(tmp_path: Path) -> None:
    (tmp_path / "users.csv").write_text("user_id,name,nick\nU1,a,b\n", encoding="utf-8")
    job = tmp_path / "job.yaml"
    job.write_text(
        "version: 1\n"
        "destination: {platform: netmera, base_url: 'https://a.example/rest/3.0/', secret: {env: K}}\n"
        "sources:\n"
        "  - {name: u, path: users.csv, ext_id: user_id, attributes: {name: &text {type: string}, nick: *text}}\n",
        encoding="utf-8",
    )
    assert [a.column for a in load_job(job).sources[0].attributes] == ["name", "nick"]


@pytest.mark.parametrize("per", ["0s", "0ms", "0.0h", "0.000s"])
def test_a_budget_over_zero_seconds_is_refused_by_validate(
    per: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "users.csv").write_text("user_id,name\nU1,a\n", encoding="utf-8")
    job = tmp_path / "job.yaml"
    job.write_text(
        _job_text("{env: K}") + f'dispatch:\n  budgets: {{"*": {{requests: 5, per: {per}}}}}\n',
        encoding="utf-8",
    )
    assert main(["validate", str(job)]) == int(ExitCode.BAD_JOB_OR_INPUT)
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert "dispatch.budgets.*.per" in said and "longer than 0" in said and "Traceback" not in said


# --- keys with line breaks; key files others can read --------------------------------------------------------------


@pytest.fixture
def listening() -> Iterator[str]:
    """A base URL whose port accepts connections (the kernel completes them) and never answers: enough for
    a request to get as far as writing its headers, where a key with a line break used to raise."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/rest/3.0/"


@pytest.mark.parametrize(
    ("where", "junk"),
    # The environment cannot hold a NUL: that one only comes from a file.
    [(w, j) for w in ("env", "file") for j in ("\n", "\r\n", "\r", "\x1b", "\u2028")] + [("file", "\x00")],
)
def test_a_key_with_a_line_break_or_control_character_is_one_clear_error(
    where: str,
    junk: str,
    tmp_path: Path,
    listening: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = new_key()
    bad = key[:20] + junk + key[20:]
    job = write_job(tmp_path, listening)
    if where == "file":
        (tmp_path / "k.key").write_bytes(bad.encode() + b"\n")
        job.write_text(job.read_text().replace(f"{{env: {KEY_ENV}}}", "{file: k.key}"), encoding="utf-8")
    else:
        monkeypatch.setenv(KEY_ENV, bad)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(job)]) == int(ExitCode.BAD_JOB_OR_INPUT)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert [line for line in captured.err.splitlines() if line.strip()] == [
        line for line in captured.err.splitlines() if line.startswith("pushsync: error:")
    ]
    assert "control character" in captured.err or "line break" in captured.err
    assert leaked_pieces(key, captured.out + captured.err) == []
    assert not (tmp_path / "work" / "ledger.sqlite").exists()  # refused before anything was recorded or sent


def test_a_trailing_line_break_in_a_key_file_is_normal(tmp_path: Path) -> None:
    for ending in ("\n", "\r\n", "\n\n", " \n"):
        path = tmp_path / "k.key"
        path.write_text("key-0123456789" + ending, encoding="utf-8")
        path.chmod(0o600)
        assert resolve_secret(Destination("netmera", "http://x/", secret_file=str(path)), environ={}) == (
            "key-0123456789"
        )


@pytest.fixture
def key_file(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    key = new_key()
    path = tmp_path / "netmera.key"
    path.write_text(key + "\n", encoding="utf-8")
    yield path, key


def test_a_key_file_everyone_can_read_is_warned_about(key_file: tuple[Path, str]) -> None:
    path, key = key_file
    destination = Destination("netmera", "http://x/", secret_file=str(path))
    path.chmod(0o644)
    with capture_logs() as logs:
        assert resolve_secret(destination, environ={}) == key
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and str(path) in json.dumps(warnings[0]) and "chmod 600" in json.dumps(warnings)
    assert key not in json.dumps(logs)
    for private in (0o600, 0o400, 0o640):
        path.chmod(private)
        with capture_logs() as logs:
            resolve_secret(destination, environ={})
        assert logs == [], oct(private)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


# --- a 200 that is not the API's answer ------------------------------------------------------------------------------

_PAGE = "<!DOCTYPE html><html><head><title>Sign in</title></head><body>" + "<p>proxy</p>" * 500


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(_PAGE, "text/html"), ('{"ok": true, "users": [1, 2', "application/json")],
    ids=["html-page", "truncated-json"],
)
async def test_a_200_that_is_not_json_is_retried_then_failed(
    body: str, content_type: str, serve: Serve, tmp_path: Path
) -> None:
    key = new_key()
    seen = Seen()
    # The page echoes the key, as a login page might echo the header it refused.
    root = await serve(
        recording(
            seen,
            lambda r: web.Response(
                text=body + r.headers.get("X-netmera-api-key", ""), content_type=content_type
            ),
        )
    )
    job = load_job(write_job(tmp_path, root + "/rest/3.0/", users=10))
    outcome = await run(job, RunOptions(api_key=key))
    assert outcome.exit_code is ExitCode.PARTIAL
    assert outcome.summary.ids_ok == 0
    assert len(seen.requests) == 3  # retry.max_attempts: bounded
    with Ledger.open(outcome.ledger_path) as ledger:
        (batch,) = ledger.batches(outcome.run_id)
        assert batch.status == BatchStatus.FAILED and batch.attempts == 3
        message = batch.message or ""
    assert "not JSON" in message and "200" in message
    assert len(message) < 400 and "<p>" not in message and '"users"' not in message
    assert files_holding_pieces(key, tmp_path) == []


@pytest.mark.parametrize(
    ("fmt", "page"),
    [("json", _PAGE), ("xml", _PAGE), ("xml", "<html><body><p>Sign in</p></body></html>")],
    ids=["json-page", "xml-page", "xml-well-formed-html"],
)
async def test_a_forms_on_fire_200_in_the_wrong_format_is_retried(fmt: str, page: str, serve: Serve) -> None:
    seen = Seen()
    root = await serve(recording(seen, lambda _r: web.Response(text=page, content_type="text/html")))
    destination = Destination("formsonfire", root + "/api/v2/", extra={"company_id": "1", "body_format": fmt})
    async with FormsOnFireClient(destination, new_key(), timeout=5) as client:
        with pytest.raises(RetryableError, match=f"not {fmt.upper()}") as info:
            await client.send(fof_batch(push_body("UserExternalId", "crm-1", title="Hi")))
    assert "<p>" not in str(info.value) and "text/html" in str(info.value)


async def test_an_empty_200_is_still_a_netmera_success(serve: Serve) -> None:
    """Netmera documents no success body for its writes [I]: an empty one is not a fault."""
    root = await serve(recording(Seen(), lambda _r: web.Response(status=200)))
    batch = Batch("b", "tagUsers", Operation.TAG, {"tag": "A", "extIds": ["u1"]}, ("u1",))
    async with NetmeraClient(Destination("netmera", root + "/rest/3.0/"), new_key(), timeout=5) as client:
        assert (await client.send(batch)).http_status == 200
