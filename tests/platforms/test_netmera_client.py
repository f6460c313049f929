"""NetmeraClient against the Netmera sandbox (a real local aiohttp server): answers map onto our errors."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from sync.config import Destination
from sync.errors import FatalPlatformError, RejectedBatchError, RetryableError
from sync.platforms.base import PlatformClient
from sync.platforms.netmera.client import NetmeraClient, parse_remaining, parse_retry_after
from sync.platforms.netmera.requests import make_batch, set_attributes_body, tag_body
from sync.records import Batch, Operation
from sync.sandboxes._core import FaultSpec, RateLimit


def _client(url: str, key: str, **kw: Any) -> NetmeraClient:
    return NetmeraClient(Destination("netmera", url, verify_tls=False), key, **kw)


def _tag(tag: str, ids: list[str]) -> Batch:
    return make_batch(Operation.TAG, tag_body(tag, ids))


async def test_batches_change_the_platform_and_one_session_is_reused(netmera_sandbox: Any) -> None:
    client = _client(netmera_sandbox.url, netmera_sandbox.api_key)
    assert isinstance(client, PlatformClient)
    try:
        outcome = await client.send(_tag("Sport", ["u1", "u2"]))
        session = client._session
        attrs = make_batch(
            Operation.SET_ATTRIBUTES, set_attributes_body([("u1", {"city": "Izmir", "score": 3})])
        )
        await client.send(attrs)
        assert client._session is session
        assert outcome.http_status == 200 and outcome.latency > 0
        assert netmera_sandbox.sandbox.state.tags["Sport"] == {"u1", "u2"}
        profile = await client.get("getProfileAttributes", {"extId": "u1"})
        assert profile == {"extId": "u1", "profile": {"city": "Izmir", "score": 3}}
    finally:
        await client.aclose()


async def test_a_bad_key_is_fatal_and_the_key_is_never_in_the_message(netmera_sandbox: Any) -> None:
    wrong_key = "wrong-key-abcdef-123456"
    async with _client(netmera_sandbox.url, wrong_key) as client:
        with pytest.raises(FatalPlatformError) as info:
            await client.send(_tag("Sport", ["u1"]))
    assert info.value.status == 403 and info.value.code == 2010
    assert "API key" in str(info.value) and wrong_key not in str(info.value)
    assert "tagUsers" in str(info.value)


async def test_a_refused_batch_carries_the_platform_code_and_message(netmera_sandbox: Any) -> None:
    async with _client(netmera_sandbox.url, netmera_sandbox.api_key) as client:
        bad = Batch("b1", "tagUsers", Operation.TAG, {"extIds": ["u1"]}, ("u1",))  # no "tag"
        with pytest.raises(RejectedBatchError) as info:
            await client.send(bad)
    assert (info.value.status, info.value.code) == (400, 2020)
    assert "tag" in info.value.message


async def test_429_is_retryable_with_retry_after_and_remaining(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(limits={"tagUsers": RateLimit(1, 60.0)})
    async with _client(running.url, running.api_key) as client:
        first = await client.send(_tag("A", ["u1"]))
        assert first.remaining == 0
        with pytest.raises(RetryableError) as info:
            await client.send(_tag("B", ["u1"]))
    err = info.value
    assert err.rate_limited and err.status == 429
    assert err.remaining == 0 and err.retry_after is not None and 0 < err.retry_after <= 60


async def test_5xx_is_retryable(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(faults=FaultSpec(error_503=1.0))
    async with _client(running.url, running.api_key) as client:
        with pytest.raises(RetryableError) as info:
            await client.send(_tag("A", ["u1"]))
    assert info.value.status == 503 and not info.value.rate_limited


async def test_a_hung_request_times_out_as_retryable(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(faults=FaultSpec(hang=1.0, hang_seconds=5.0))
    async with _client(running.url, running.api_key, timeout=0.2) as client:
        with pytest.raises(RetryableError, match=r"no answer within 0\.2 s"):
            await client.send(_tag("A", ["u1"]))


async def test_a_dropped_connection_is_retryable(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(faults=FaultSpec(drop=1.0))
    async with _client(running.url, running.api_key, timeout=2.0) as client:
        with pytest.raises(RetryableError, match="connection failed"):
            await client.send(_tag("A", ["u1"]))


async def test_connection_refused_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with _client(f"http://127.0.0.1:{port}/rest/3.0/", "some-key-1234", timeout=2.0) as client:
        with pytest.raises(RetryableError, match="connection failed"):
            await client.send(_tag("A", ["u1"]))


async def test_a_wrong_base_url_is_fatal(netmera_sandbox: Any) -> None:
    async with _client(netmera_sandbox.root_url + "/rest/2.0/", netmera_sandbox.api_key) as client:
        with pytest.raises(FatalPlatformError, match="base_url") as info:
            await client.send(_tag("A", ["u1"]))
    assert info.value.status == 404


async def test_tls_to_a_plain_http_server_is_fatal(netmera_sandbox: Any) -> None:
    url = netmera_sandbox.url.replace("http://", "https://")
    async with NetmeraClient(Destination("netmera", url), netmera_sandbox.api_key, timeout=2.0) as client:
        with pytest.raises(FatalPlatformError, match="TLS"):
            await client.send(_tag("A", ["u1"]))


def test_split_delegates_to_the_request_module() -> None:
    client = _client("http://127.0.0.1:1/rest/3.0/", "some-key-1234")
    halves = client.split(_tag("A", ["u1", "u2", "u3", "u4"]))
    assert halves is not None
    assert [h.ext_ids for h in halves] == [("u1", "u2"), ("u3", "u4")]
    assert client.split(_tag("A", ["u1"])) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        ("0.5", 0.5),
        ("0", None),
        ("-2", None),
        ("soon", None),
        (None, None),
        ("inf", None),
        ("1e9", 1e9),
    ],
)
def test_retry_after_is_parsed_and_guarded(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_retry_after_as_http_date() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert (
        parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now.timestamp())
        == 30
    )
    assert (
        parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now.timestamp())
        is None
    )


@pytest.mark.parametrize(("value", "expected"), [("5", 5), ("0", 0), ("-1", 0), ("x", None), (None, None)])
def test_remaining_is_parsed(value: str | None, expected: int | None) -> None:
    assert parse_remaining(value) == expected
