"""The Netmera sandbox's stateless mode (``stateless: true``, ``pushsync sandbox netmera --stateless``): every
write's shape is checked exactly as in the stateful mode, nothing is kept, and what the writes name is counted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sync.sandboxes.netmera import NetmeraSandboxConfig, UnknownExtId

WRITES: list[tuple[str, Any, int]] = [
    ("tagUsers", {"tag": "VIP", "extIds": ["a", "b", "a"]}, 2),
    ("untagUsers", {"tag": "VIP", "extIds": ["a"]}, 1),
    ("setProfileAttributes", [{"extId": "a", "profile": {"city": "Izmir", "score": 1.5}}], 1),
    ("unsetProfileAttributes", [{"extId": "a", "profile": ["city"]}], 1),
    ("pushProfileAttributes", [{"extId": "a", "profile": {"pets": ["cat"]}}], 1),
    ("pullProfileAttributes", [{"extId": "a", "profile": {"pets": ["cat"]}}], 1),
    ("setCategoryPreferences", [{"extId": "a", "category": "news", "enable": True}], 1),
    ("disablePush", {"extId": "a"}, 1),
    ("enablePush", {"deviceToken": "tok"}, 1),
    ("enableMail", {"extIds": ["a", "b"]}, 2),
    ("disableSms", {"msisdnList": ["+905551112233"]}, 0),
    ("updateEmail", {"extId": "a", "email": "a@example.com"}, 1),
    ("updateMsisdn", {"extId": "a", "msisdn": "+905551112233"}, 1),
    ("fireEvents", [{"extId": "a", "name": "purchase", "amount": 3}], 1),
    ("deleteUsersPermanently", {"extIds": ["a"]}, 1),
    ("deleteProfileAttributes", [{"profile": ["city"]}], 0),
    ("deleteProfileAttributeValue", [{"key": "pets", "value": "cat"}], 0),
    ("sendPushApproval", [{"messageId": 7}], 1),
    (
        "sendBulkNotification",
        {"message": {"text": "hi", "platforms": ["IOS"]}, "target": {"segmentId": 99}},
        0,
    ),
    ("sendNotification", {"notificationKey": 1, "target": {"extId": "a"}}, 0),
]

BAD_BODIES: list[tuple[str, Any]] = [
    ("tagUsers", {"extIds": ["a"]}),
    ("tagUsers", {"tag": "VIP", "extIds": ["a", 3]}),
    ("tagUsers", {"tag": "VIP", "extIds": [f"u{i}" for i in range(1001)]}),
    ("setProfileAttributes", []),
    ("setProfileAttributes", [{"extId": "a", "profile": {"x": 1}}, {"extId": "b"}]),
    ("setProfileAttributes", [{"extId": "a", "profile": {"x": 1}}, {"extId": "", "profile": {}}]),
    ("setProfileAttributes", [{"extId": "a", "profile": {"x": 1}}, {"extId": 5, "profile": {}}]),
    ("setProfileAttributes", [{"extId": "a", "profile": {"x": 1}}, "not an object"]),
    ("setProfileAttributes", [{"extId": "a", "profile": ["x"]}]),
    ("setProfileAttributes", [{"extId": f"u{i}", "profile": {}} for i in range(1001)]),
    ("pushProfileAttributes", [{"extId": "a", "profile": {"pets": "cat"}}]),
    ("unsetProfileAttributes", [{"extId": "a", "profile": [1]}]),
    ("setCategoryPreferences", [{"extId": "a", "category": "news", "enable": "yes"}]),
    ("disablePush", {"extId": "a", "deviceToken": "t"}),
    ("updateEmail", {"extId": "a"}),
    ("fireEvents", [{"extId": "a"}]),
    ("sendPushApproval", [{"messageId": "7"}]),
    ("sendBulkNotification", {"message": {"text": "hi", "platforms": ["WEB"]}, "target": {"extId": "a"}}),
]


@pytest.mark.parametrize(("endpoint", "body", "counted"), WRITES, ids=[w[0] for w in WRITES])
async def test_every_write_is_accepted_counted_and_forgotten(
    netmera_sandbox_factory: Any, endpoint: str, body: Any, counted: int
) -> None:
    running = await netmera_sandbox_factory(stateless=True)
    reply = await running.post(endpoint, body)
    assert reply.status == 200, reply.body
    stats = (await running.inspect("GET", "stats")).body
    assert stats["applied"].get(endpoint, 0) == counted
    state = running.sandbox.state
    assert (state.users, state.tags, state.events, state.notifications, state.approvals) == (
        {},
        {},
        [],
        {},
        [],
    )


@pytest.mark.parametrize(("endpoint", "body"), BAD_BODIES)
async def test_a_bad_shape_gets_the_stateful_mode_s_answer(
    netmera_sandbox_factory: Any, endpoint: str, body: Any
) -> None:
    stateless = await netmera_sandbox_factory(stateless=True)
    stateful = await netmera_sandbox_factory()
    got, want = await stateless.post(endpoint, body), await stateful.post(endpoint, body)
    assert got.status == want.status == 400
    assert got.body == want.body
    assert stateless.sandbox.state.users == {}


async def test_bad_json_and_content_type_are_refused_as_ever(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(stateless=True)
    bad_json = await running.post("tagUsers", data=b'{"tag": "VIP", "extIds": ["a"')
    plain = await running.post(
        "tagUsers",
        data=b'{"tag":"VIP","extIds":["a"]}',
        headers={"X-netmera-api-key": running.api_key, "Content-Type": "text/plain"},
    )
    no_key = await running.post("tagUsers", {"tag": "VIP", "extIds": ["a"]}, headers={})
    assert (bad_json.status, bad_json.body["code"]) == (400, 2009)
    assert plain.status == 415
    assert no_key.status == 403


async def test_reads_answer_as_for_an_empty_platform(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(stateless=True)
    assert (await running.post("tagUsers", {"tag": "VIP", "extIds": ["a"]})).status == 200
    profile = await running.get("getProfileAttributes", {"extId": "a"})
    tokens = await running.get("getDeviceTokens")
    assert (profile.status, profile.body["code"]) == (400, 5016)
    assert tokens.body == {"total": 0, "devices": []}


def test_a_stateless_sandbox_refuses_what_needs_state(tmp_path: Path) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"users": []}), encoding="utf-8")
    with pytest.raises(ValueError, match="seed_file"):
        NetmeraSandboxConfig(stateless=True, seed_file=seed)
    with pytest.raises(ValueError, match="unknown_ext_id"):
        NetmeraSandboxConfig.from_mapping({"stateless": True, "unknown_ext_id": "error"})
    assert NetmeraSandboxConfig(unknown_ext_id=UnknownExtId.ERROR).stateless is False


async def test_the_cli_option_starts_a_stateless_sandbox(netmera_process_factory: Any) -> None:
    running = netmera_process_factory("--stateless")
    headers = {"X-netmera-api-key": running.api_key}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            running.url + "tagUsers", json={"tag": "T", "extIds": ["a", "b"]}, headers=headers
        ) as resp:
            assert resp.status == 200
        async with session.post(running.url + "tagUsers", json={"tag": "T"}, headers=headers) as resp:
            assert (resp.status, (await resp.json())["code"]) == (400, 2020)
        async with session.get(running.root_url + "/_sandbox/stats") as resp:
            assert (await resp.json())["applied"] == {"tagUsers": 2}
        async with session.get(running.root_url + "/_sandbox/state?format=json") as resp:
            assert (await resp.json())["users"] == []
