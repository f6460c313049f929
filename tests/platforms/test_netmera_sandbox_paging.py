"""Paging over a seeded set: getDeviceTokens (max/offset/nextPage/total) over 100k+ devices and getSegmentUsers
(max defaults to 100, less than 100 still returns 100, more than 1000 is refused)."""

from __future__ import annotations

from typing import Any

import polars as pl

from sync.sandboxes.netmera import NetmeraSandboxConfig

DEVICES = 120_000


async def follow(running: Any, url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    """Follow ``nextPage`` from ``url`` to the end; returns every page's body."""
    pages = []
    next_url: str | None = url
    while next_url:
        async with running.session.get(next_url, headers=headers) as resp:
            assert resp.status == 200
            body = await resp.json()
        pages.append(body)
        next_url = body.get("nextPage")
    return pages


async def test_device_tokens_defaults_and_documented_shape(netmera_sandbox: Any) -> None:
    netmera_sandbox.sandbox.state.add_synthetic(25, 1)
    reply = await netmera_sandbox.get("getDeviceTokens")
    assert reply.body["total"] == 25
    assert len(reply.body["devices"]) == 10  # max defaults to 10, offset to 0
    assert reply.body["nextPage"] == f"{netmera_sandbox.url}getDeviceTokens?offset=10&max=10"
    assert set(reply.body["devices"][0]) == {"platform", "token", "deviceModel", "pushPermitted"}
    last = await netmera_sandbox.get("getDeviceTokens", {"offset": "20", "max": "10"})
    assert len(last.body["devices"]) == 5 and "nextPage" not in last.body
    beyond = await netmera_sandbox.get("getDeviceTokens", {"offset": "100"})
    assert beyond.body == {"total": 25, "devices": []}


async def test_paging_over_120k_seeded_devices_from_a_parquet_file(
    netmera_sandbox_factory: Any, tmp_path: Any
) -> None:
    seed = tmp_path / "devices.parquet"
    pl.DataFrame(
        {
            "extId": [f"user-{i // 2}" for i in range(DEVICES)],
            "platform": ["IOS" if i % 2 else "ANDROID" for i in range(DEVICES)],
            "token": [f"token-{i:06d}" for i in range(DEVICES)],
            "deviceModel": ["Pixel 6"] * DEVICES,
            "pushPermitted": [i % 3 != 0 for i in range(DEVICES)],
        }
    ).write_parquet(seed)
    running = await netmera_sandbox_factory(
        NetmeraSandboxConfig(api_key="k" * 16, seed_file=seed),
    )
    pages = await follow(running, running.url + "getDeviceTokens?max=1000", running.headers)
    assert len(pages) == DEVICES // 1000
    assert all(page["total"] == DEVICES for page in pages)
    tokens = [d["token"] for page in pages for d in page["devices"]]
    assert tokens == [f"token-{i:06d}" for i in range(DEVICES)]  # every device once, in order, no gap
    assert sum(d["pushPermitted"] for page in pages for d in page["devices"]) == sum(
        i % 3 != 0 for i in range(DEVICES)
    )
    assert running.sandbox.state.user_count() == DEVICES // 2


async def test_paging_sees_changes_between_pages(netmera_sandbox: Any) -> None:
    state = netmera_sandbox.sandbox.state
    state.add_synthetic(30, 1)
    first = await netmera_sandbox.get("getDeviceTokens", {"max": "10"})
    await netmera_sandbox.post("disablePush", {"deviceToken": "tok-u15-0"})
    second = await netmera_sandbox.get("getDeviceTokens", {"max": "10", "offset": "10"})
    assert first.body["devices"][0]["token"] == "tok-u0-0"
    assert {d["token"]: d["pushPermitted"] for d in second.body["devices"]}["tok-u15-0"] is False


async def test_last_page_link_can_be_null(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(last_page="null")
    running.sandbox.state.add_synthetic(3, 1)
    reply = await running.get("getDeviceTokens")
    assert reply.body["nextPage"] is None


async def test_segment_users_paging_rules(netmera_sandbox: Any) -> None:
    members = [f"m{i}" for i in range(2_350)]
    netmera_sandbox.sandbox.state.load({"segments": [{"id": 7, "name": "big", "members": members}]})
    headers = {**netmera_sandbox.headers, "X-netmera-os": "ANDROID"}

    first = await netmera_sandbox.get("getSegmentUsers", {"id": "7"}, headers=headers)
    assert len(first.body["list"]) == 100  # default max 100
    small = await netmera_sandbox.get("getSegmentUsers", {"id": "7", "max": "10"}, headers=headers)
    assert len(small.body["list"]) == 100  # less than 100 still returns 100
    assert "max=100" in small.body["nextPage"]

    pages = await follow(netmera_sandbox, netmera_sandbox.url + "getSegmentUsers?id=7&max=1000", headers)
    assert [len(p["list"]) for p in pages] == [1000, 1000, 350]
    assert [u["externalId"] for p in pages for u in p["list"]] == members
    assert all(p["name"] == "big" for p in pages)


async def test_segment_next_page_field_is_configurable(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(segment_next_page_field="next")
    running.sandbox.state.load(
        {"segments": [{"id": 1, "name": "s", "members": [f"m{i}" for i in range(150)]}]}
    )
    reply = await running.get(
        "getSegmentUsers", {"id": "1"}, headers={**running.headers, "X-netmera-os": "IOS"}
    )
    assert "next" in reply.body and "nextPage" not in reply.body
