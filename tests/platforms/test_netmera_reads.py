"""Netmera readers against the Netmera sandbox: 100k+ device tokens, segments, segment users and profiles,
paged with faults and rate limits on — nothing duplicated, nothing missing, order kept."""

from __future__ import annotations

import random
from typing import Any

import pytest
from conftest_meiro import FakeClock

from sync.config import Destination, RetryPolicy
from sync.errors import FatalPlatformError, PlatformError
from sync.platforms.netmera.client import NetmeraClient
from sync.platforms.netmera.reads import (
    ReadSettings,
    device_token_pages,
    profile_pages,
    segment_pages,
    segment_user_pages,
)
from sync.sandboxes._core import FaultSpec, RateLimit

FAULTS = FaultSpec(error_500=0.08, error_503=0.04, drop=0.03, applied_then_500=0.02)


def _client(running: Any, key: str | None = None) -> NetmeraClient:
    return NetmeraClient(Destination("netmera", running.url), key or running.api_key, timeout=5)


def _settings(clock: FakeClock, retries: list[Any] | None = None) -> ReadSettings:
    def note(attempt: int, error: Any, delay: float) -> None:
        if retries is not None:
            retries.append(error.status)

    return ReadSettings(
        retry=RetryPolicy(max_attempts=12, base_delay=0.2, max_delay=2),
        sleep=clock.sleep,
        rng=random.Random(4),
        on_retry=note,
    )


async def test_120k_device_tokens_with_faults_and_limits(netmera_sandbox_factory: Any) -> None:
    clock = FakeClock(1_800_000_000.0)
    running = await netmera_sandbox_factory(
        clock=clock, sleep=clock.sleep, faults=FAULTS, seed=11, limits={"getDeviceTokens": RateLimit(15, 1.0)}
    )
    running.sandbox.state.add_synthetic(60_000, 2)  # 120,000 devices
    expected = [d.token for d in running.sandbox.state.devices.values()]
    retries: list[Any] = []
    tokens: list[str] = []
    totals = set()
    async with _client(running) as client:
        async for page in device_token_pages(client, page_size=1000, settings=_settings(clock, retries)):
            assert page.offset == len(tokens)
            tokens += [row["token"] for row in page.rows]
            totals.add(page.total)
            assert set(page.rows[0]) == {"platform", "token", "deviceModel", "pushPermitted"}
    assert tokens == expected  # every device, once, in the platform's order
    assert totals == {120_000}
    stats = running.sandbox.stats
    assert stats.faults() > 0 and stats.rate_limited("getDeviceTokens") > 0
    assert 429 in retries and ({500, 503, None} & set(retries))
    assert stats.max_in_window("getDeviceTokens") <= 15
    # exactly one 200 per page: a faulted page (500/503/drop/applied-then-500) was asked for again
    assert stats.requests("getDeviceTokens", 200) == 120


async def test_next_page_is_followed_by_its_query_against_the_configured_host(
    netmera_sandbox_factory: Any,
) -> None:
    running = await netmera_sandbox_factory(public_url="http://elsewhere.invalid")
    running.sandbox.state.add_synthetic(2_500, 1)
    async with _client(running) as client:
        first = await client.get("getDeviceTokens", {"max": "1000"})
        assert first["nextPage"].startswith("http://elsewhere.invalid/")
        rows = [r async for p in device_token_pages(client, page_size=1000) for r in p.rows]
    assert len(rows) == 2_500 and len({r["token"] for r in rows}) == 2_500


async def test_segments_of_both_platforms(netmera_sandbox: Any) -> None:
    state = netmera_sandbox.sandbox.state
    state.load(
        {
            "segments": [
                {"id": 5883, "name": "segment", "members": ["a", "b"]},
                {"id": 7, "name": "vip", "members": ["a"]},
            ]
        }
    )
    async with _client(netmera_sandbox) as client:
        pages = [p async for p in segment_pages(client)]
    assert [p.rows for p in pages] == [
        [
            {"os": "IOS", "id": 5883, "name": "segment", "userCount": 2, "type": "PRODUCT_SEGMENT"},
            {"os": "IOS", "id": 7, "name": "vip", "userCount": 1, "type": "PRODUCT_SEGMENT"},
        ],
        [
            {"os": "ANDROID", "id": 5883, "name": "segment", "userCount": 2, "type": "PRODUCT_SEGMENT"},
            {"os": "ANDROID", "id": 7, "name": "vip", "userCount": 1, "type": "PRODUCT_SEGMENT"},
        ],
    ]
    with pytest.raises(ValueError, match="IOS or ANDROID"):
        async with _client(netmera_sandbox) as client:
            _ = [p async for p in segment_pages(client, ["WINDOWS"])]


@pytest.mark.parametrize("link", ["nextPage", "next"])
async def test_segment_users_with_max_offset_paging_and_faults(
    netmera_sandbox_factory: Any, link: str
) -> None:
    clock = FakeClock()
    running = await netmera_sandbox_factory(
        clock=clock, sleep=clock.sleep, faults=FAULTS, seed=2, segment_next_page_field=link, last_page="null"
    )
    members = [f"user-{i:05d}" for i in range(2_345)]
    running.sandbox.state.load({"segments": [{"id": 42, "name": "brand", "members": members}]})
    for i in range(0, 2_345, 100):
        running.sandbox.state.set_email(members[i], f"{members[i]}@example.test")
    got: list[dict[str, Any]] = []
    async with _client(running) as client:
        # page_size 50 is clamped to Netmera's minimum of 100; with link="next" the reader never sees
        # "nextPage" and pages by offset until a short page
        async for page in segment_user_pages(client, 42, "ios", page_size=50, settings=_settings(clock)):
            assert page.offset == len(got) and len(page.rows) <= 100
            got += page.rows
    assert [r["externalId"] for r in got] == members
    assert got[100] == {"externalId": "user-00100", "msisdn": None, "email": "user-00100@example.test"}
    assert running.sandbox.stats.requests("getSegmentUsers", 200) == 24


async def test_an_unknown_segment_is_refused(netmera_sandbox: Any) -> None:
    async with _client(netmera_sandbox) as client:
        with pytest.raises(PlatformError) as info:
            _ = [p async for p in segment_user_pages(client, 999, "ANDROID")]
    assert info.value.code == 5042


async def test_profiles_in_input_order_with_unknown_ids_and_faults(netmera_sandbox_factory: Any) -> None:
    clock = FakeClock()
    running = await netmera_sandbox_factory(clock=clock, sleep=clock.sleep, faults=FAULTS, seed=9)
    state = running.sandbox.state
    for i in range(300):
        state.ensure_users([f"c{i}"])
        state.user(f"c{i}").profile = {"name": f"N{i}", "age": i}
    ids = [f"c{i}" for i in range(300)] + ["ghost-1", "ghost-2"]
    chunks = [ids[i : i + 64] for i in range(0, len(ids), 64)]
    rows = []
    async with _client(running) as client:
        async for page in profile_pages(client, chunks, concurrency=6, settings=_settings(clock)):
            rows += page.rows
    assert [r["extId"] for r in rows] == ids
    assert rows[5] == {"extId": "c5", "found": True, "profile": '{"age": 5, "name": "N5"}', "error": None}
    assert rows[-1] == {"extId": "ghost-2", "found": False, "profile": None, "error": None}
    assert running.sandbox.stats.faults() > 0


async def test_a_bad_key_ends_a_profile_export_with_the_fatal_error(netmera_sandbox: Any) -> None:
    async with _client(netmera_sandbox, key="not-the-key-123456") as client:
        with pytest.raises(FatalPlatformError) as info:
            _ = [p async for p in profile_pages(client, [["a", "b", "c"]], concurrency=2)]
    assert info.value.status == 403
