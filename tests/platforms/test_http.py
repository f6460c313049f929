"""The shared HTTP boundary (``sync.platforms._http``): transport failures against a real local server (the
Netmera sandbox), and the common status mapping on answers built as values."""

from __future__ import annotations

import json
import socket
import time
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web

from sync.errors import FatalPlatformError, RejectedBatchError, RetryableError
from sync.platforms._http import (
    MAX_MESSAGE,
    AnswerPolicy,
    ErrorBody,
    HttpAnswer,
    HttpSession,
    json_error,
    parse_retry_after,
)
from sync.redact import redact, register_secret
from sync.sandboxes._core import FaultSpec, start_app


def _answer(status: int, body: Any = None, headers: dict[str, str] | None = None) -> HttpAnswer:
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpAnswer("POST http://api.test/x endpoint=x", status, headers or {}, raw, 0.01)


def _code_error(raw: bytes, status: int) -> ErrorBody:
    code, message = json_error(raw, status)
    return ErrorBody(message, code, f", code {code}" if code is not None else "")


_POLICY = AnswerPolicy(_code_error, hints={401: "check the key", 403: "check its permissions"})


async def test_one_aiohttp_session_serves_every_request_until_closed(netmera_sandbox: Any) -> None:
    http = HttpSession(
        netmera_sandbox.url.removesuffix("/"), headers={"X-netmera-api-key": netmera_sandbox.api_key}
    )
    try:
        first = await http.request(
            "POST", "tagUsers", endpoint="tagUsers", json_body={"tag": "A", "extIds": ["u1"]}
        )
        session = http._session
        second = await http.request("GET", "getProfileAttributes", params={"extId": "u1"})
        assert http._session is session is not None
        assert (first.ok, second.ok) == (True, True) and first.latency > 0
        assert first.what == f"POST {netmera_sandbox.url}tagUsers endpoint=tagUsers"
        assert netmera_sandbox.sandbox.state.tags["A"] == {"u1"}
        await http.aclose()
        assert http._session is None
        assert (await http.request("GET", "getProfileAttributes", params={"extId": "u1"})).ok
        assert http._session is not session  # reopened after aclose
    finally:
        await http.aclose()


async def test_a_hung_request_times_out_as_retryable(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(faults=FaultSpec(hang=1.0, hang_seconds=5.0))
    http = HttpSession(running.url, headers={"X-netmera-api-key": running.api_key}, timeout=0.2)
    try:
        with pytest.raises(RetryableError, match=r"^POST .*tagUsers: no answer within 0\.2 s$") as info:
            await http.request("POST", "tagUsers", json_body={"tag": "A", "extIds": ["u1"]})
    finally:
        await http.aclose()
    assert info.value.status is None and isinstance(info.value.__cause__, TimeoutError)


async def test_refused_connections_are_retryable_and_bad_urls_or_tls_fatal(netmera_sandbox: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cases = [
        (f"http://127.0.0.1:{port}/", RetryableError, "connection failed: ClientConnectorError"),
        ("http://127.0.0.1:99999/", FatalPlatformError, "invalid URL"),
        (netmera_sandbox.url.replace("http://", "https://"), FatalPlatformError, "TLS"),
    ]
    for base, error, text in cases:
        http = HttpSession(base, timeout=2.0)
        try:
            with pytest.raises(error, match=text) as info:
                await http.request("GET", "getProfileAttributes")
        finally:
            await http.aclose()
        assert info.value.__cause__ is not None  # translated once, the aiohttp exception kept as the cause


async def test_a_refused_connection_says_why() -> None:
    # "connection failed: ClientConnectorError" was all `pushsync doctor` said with the sandbox not started: the
    # system's reason (refused, unknown host) is what tells the user which to fix.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    http = HttpSession(f"http://127.0.0.1:{port}/", timeout=2.0)
    try:
        with pytest.raises(
            RetryableError, match=r"connection failed: ClientConnectorError \(Connection refused\)$"
        ):
            await http.request("GET", "getProfileAttributes")
    finally:
        await http.aclose()


@pytest.mark.parametrize(
    ("status", "error", "hint"),
    [
        (401, FatalPlatformError, "(check the key)"),
        (403, FatalPlatformError, "(check its permissions)"),
        (404, FatalPlatformError, "(check destination.base_url)"),
        (405, FatalPlatformError, "(check destination.base_url)"),
        (408, RetryableError, ""),
        (429, RetryableError, ""),
        (500, RetryableError, ""),
        (503, RetryableError, ""),
        (400, RejectedBatchError, ""),
        (413, RejectedBatchError, ""),
        (422, RejectedBatchError, ""),
    ],
)
def test_the_common_status_mapping(status: int, error: type[Exception], hint: str) -> None:
    found = _POLICY.error(_answer(status, {"code": 7, "error": "nope"}))
    assert type(found) is error and found.status == status and found.code == 7
    if error is RejectedBatchError:
        assert found.message == "nope"  # the platform's words, for the ledger
    else:
        assert str(found) == f"POST http://api.test/x endpoint=x: HTTP {status}, code 7: nope" + (
            f" {hint}" if hint else ""
        )


def test_retryable_answers_carry_retry_after_and_remaining_parsed_with_the_guards() -> None:
    limited = _POLICY.error(_answer(429, None, {"Retry-After": "3", "X-RateLimit-Remaining": "-4"}))
    assert isinstance(limited, RetryableError) and limited.rate_limited
    assert (limited.retry_after, limited.remaining) == (3.0, 0)
    bad = _POLICY.error(
        _answer(503, b"<html>busy</html>", {"Retry-After": "inf", "X-RateLimit-Remaining": "x"})
    )
    assert isinstance(bad, RetryableError) and (bad.retry_after, bad.remaining) == (None, None)
    assert str(bad).endswith("HTTP 503: <html>busy</html>")


def _remaining(policy: AnswerPolicy, answer: HttpAnswer) -> int | None:
    error = policy.error(answer)
    assert isinstance(error, RetryableError)
    return error.remaining


def test_the_switches_of_a_policy() -> None:
    exhausted = AnswerPolicy(_code_error, exhausted_on_429=True)
    assert _remaining(_POLICY, _answer(429)) is None
    assert _remaining(exhausted, _answer(429)) == 0  # no header: the window's budget is read as spent
    assert _remaining(exhausted, _answer(429, None, {"X-RateLimit-Remaining": "3"})) == 3
    assert _remaining(exhausted, _answer(503)) is None
    named = AnswerPolicy(_code_error, base_url_hint="check --base-url", rejection_names_request=True)
    assert (
        named.error(_answer(400, {"message": "bad"})).message
        == "POST http://api.test/x endpoint=x: HTTP 400: bad"
    )
    assert str(named.error(_answer(404))).endswith("HTTP 404: HTTP 404 (check --base-url)")


def test_check_passes_a_2xx_through_and_raises_the_rest() -> None:
    ok = _answer(201, {"a": 1})
    assert _POLICY.check(ok) is ok and ok.json() == {"a": 1}
    with pytest.raises(FatalPlatformError):
        _POLICY.check(_answer(401))


def test_json_error_reads_the_bodies_and_bounds_and_redacts_them() -> None:
    secret = "s3cret-token-in-a-body"
    register_secret(secret)
    assert json_error(b'{"code": 2020, "error": "tag missing"}', 400) == (2020, "tag missing")
    assert json_error(b'{"message": "no such export"}', 404) == (None, "no such export")
    assert json_error(b'{"code": [1], "error": ""}', 400) == (None, "HTTP 400")
    assert json_error(b"", 502) == (None, "HTTP 502")
    code, message = json_error(("x" * 1000).encode(), 500)
    assert code is None and message == "x" * MAX_MESSAGE
    assert secret not in json_error(json.dumps({"error": f"bad token {secret}"}).encode(), 401)[1]


async def test_encoded_json_bytes_go_out_as_they_are_with_a_json_content_type() -> None:
    # A body the columnar builders encoded is sent byte for byte: never decoded, re-encoded or re-spaced.
    seen: list[tuple[str, bytes]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Content-Type", ""), await request.read()))
        return web.Response(body=b"{}", content_type="application/json")

    app = web.Application()
    app.router.add_post("/api/{name}", record)
    server = await start_app(app)
    http = HttpSession(server.root_url + "/api")
    encoded = '{"tag": "é\\u00e9", "extIds":["a"]}'.encode()
    try:
        await http.request("POST", "tagUsers", json_body=encoded)
        await http.request("POST", "tagUsers", json_body={"tag": "é", "extIds": ["a"]})
        await http.request("POST", "tagUsers", json_body=encoded, headers={"X-Trace": "1"})
    finally:
        await http.aclose()
        await server.stop()
    assert seen == [
        ("application/json", encoded),
        ("application/json", '{"tag":"é","extIds":["a"]}'.encode()),
        ("application/json", encoded),
    ]


async def test_the_netmera_client_sends_a_bytes_body_batch(netmera_sandbox: Any) -> None:
    from sync.config import Destination
    from sync.platforms.netmera.client import NetmeraClient
    from sync.records import Batch, Operation

    body = b'[{"extId":"u1","profile":{"city":"Izmir"}},{"extId":"u2","profile":{"city":"Bursa"}}]'
    batch = Batch("b1", "setProfileAttributes", Operation.SET_ATTRIBUTES, body, ("u1", "u2"))
    async with NetmeraClient(Destination("netmera", netmera_sandbox.url), netmera_sandbox.api_key) as client:
        outcome = await client.send(batch)
    users = netmera_sandbox.sandbox.state.users
    assert outcome.http_status == 200
    assert {x: users[x].profile_dict() for x in ("u1", "u2")} == {
        "u1": {"city": "Izmir"},
        "u2": {"city": "Bursa"},
    }


@pytest.mark.parametrize(
    "raw", [b"{}", b"{ }", b" {}\n", b"", b"  ", b'{"a": [1, 2]}', b"[]", b"null", b"{}}", b"<html>", b"{}x"]
)
def test_expect_json_reads_a_bare_empty_object_as_json_does(raw: bytes) -> None:
    # ``{}`` (most write endpoints' answer) skips the decoder; the value is the decoder's, and anything else
    # still goes through it — an empty body is None, a page or cut-off answer is retryable.
    answer = _answer(200, raw)
    if not raw.strip():
        assert answer.expect_json() is None
        return
    try:
        expected = json.loads(raw)
    except ValueError:
        with pytest.raises(RetryableError, match="not JSON"):
            answer.expect_json()
        return
    first, second = answer.expect_json(), answer.expect_json()
    assert first == expected and type(first) is type(expected)
    if isinstance(first, dict):
        first["changed"] = True  # each call hands out its own object, as the decoder does
        assert second == expected


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Tokyo", "UTC"])
def test_a_retry_after_date_in_minus_0000_or_no_zone_is_utc_whatever_the_local_zone(
    zone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # email.utils.formatdate writes "-0000" by default; parsed naive, it was read as local time: a 60 s wait
    # became 5 h in New York (a stopped run, since a wait over retry.max_retry_after stops it) and a past date,
    # so no wait at all, in Tokyo.
    now = 1_800_000_000.0
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        for value in (
            formatdate(now + 60),
            formatdate(now + 60).removesuffix(" -0000"),
            formatdate(now + 60, usegmt=True),
        ):
            assert parse_retry_after(value, now=now) == pytest.approx(60.0), value
    finally:
        monkeypatch.undo()
        time.tzset()


async def test_requests_go_through_the_environments_proxy_with_its_credentials_unless_no_proxy_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Behind a company's proxy every request went straight to the platform and failed to connect (exit 3 after
    # abort_after_connection_failures): HTTP(S)_PROXY was ignored. A forward proxy gets the absolute URL.
    seen: list[tuple[str, str, str]] = []

    async def proxy(request: web.Request) -> web.Response:
        seen.append((request.host, request.path, request.headers.get("Proxy-Authorization", "")))
        return web.Response(body=b"{}", content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    server = await start_app(app)
    try:
        await _through_the_proxy_and_past_it(monkeypatch, server.root_url.rsplit(":", 1)[1], seen)
    finally:
        await server.stop()


async def _through_the_proxy_and_past_it(
    monkeypatch: pytest.MonkeyPatch, port: str, seen: list[tuple[str, str, str]]
) -> None:
    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "http_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://ops:proxy-pw-51@127.0.0.1:{port}")
    http = HttpSession(
        "http://netmera.invalid/rest/3.0/"
    )  # a name that resolves nowhere: only a proxy reaches it
    try:
        answer = await http.request("POST", "tagUsers", json_body={"tag": "t", "extIds": ["a"]})
    finally:
        await http.aclose()
    assert answer.status == 200
    ((host, path, auth),) = seen
    assert (host, path) == ("netmera.invalid", "/rest/3.0/tagUsers") and auth.startswith("Basic ")
    assert "proxy-pw-51" not in redact("proxy at http://ops:proxy-pw-51@127.0.0.1")  # masked in any message

    # NO_PROXY names the host (or a domain of it): straight there, which fails to connect here.
    monkeypatch.setenv("NO_PROXY", ".invalid")
    http = HttpSession("http://netmera.invalid/rest/3.0/")
    try:
        with pytest.raises(RetryableError, match="connection failed"):
            await http.request("POST", "tagUsers", json_body={"tag": "t", "extIds": ["a"]})
    finally:
        await http.aclose()
    assert len(seen) == 1


def test_a_loopback_base_url_never_goes_through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A local sandbox behind an HTTP_PROXY that NO_PROXY does not cover would be asked through the proxy.
    from sync.platforms._http import proxy_for

    for name in ("NO_PROXY", "no_proxy", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "proxy.example:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3129")
    assert proxy_for("http://127.0.0.1:8080/rest/3.0/") is None
    assert proxy_for("http://localhost:8080/rest/3.0/") is None
    assert proxy_for("http://[::1]:8080/rest/3.0/") is None
    assert proxy_for("http://api.example/rest/3.0/") == "http://proxy.example:3128"
    assert proxy_for("https://api.example/rest/3.0/") == "http://proxy.example:3129"
