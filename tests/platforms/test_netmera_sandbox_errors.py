"""Every documented Netmera error is reproduced, with the body ``{"code": <int>, "error": "<message>"}``."""

from __future__ import annotations

from typing import Any

import pytest


async def test_missing_or_wrong_api_key_is_403_2010(netmera_sandbox: Any) -> None:
    body = {"tag": "T", "extIds": ["a"]}
    for headers in ({"Content-Type": "application/json"}, {"X-netmera-api-key": "wrong"}):
        reply = await netmera_sandbox.post("tagUsers", body, headers=headers)
        assert reply.status == 403
        assert reply.body == {"code": 2010, "error": "API key is invalid"}
    reply = await netmera_sandbox.get("getDeviceTokens", headers={})
    assert (reply.status, reply.body["code"]) == (403, 2010)
    assert not netmera_sandbox.sandbox.state.exists("a")


@pytest.mark.parametrize(
    "raw",
    [
        "{bad",
        "",
        "[1, 2",
        "\xff",
        '{"tag": "t", "extIds": ["a"], "weight": NaN}',
        '{"tag": Infinity}',
        # Beyond a double: Python read it as infinity, kept it, and answered it back as Infinity (not JSON).
        '{"tag": "t", "extIds": ["a"], "weight": 1e400}',
        '{"tag": "t", "extIds": ["a"], "weight": -1.5e309}',
    ],
)
async def test_malformed_json_is_400_2009(netmera_sandbox: Any, raw: str) -> None:
    reply = await netmera_sandbox.post("tagUsers", data=raw.encode("latin-1"))
    assert reply.status == 400
    assert reply.body == {"code": 2009, "error": "invalid JSON"}


@pytest.mark.parametrize(
    ("endpoint", "body", "field"),
    [
        ("tagUsers", {"extIds": ["a"]}, "tag"),
        ("tagUsers", {"tag": "Sport"}, "extIds"),
        ("untagUsers", {"tag": "Sport", "extIds": []}, "extIds"),
        ("deleteUsersPermanently", {}, "extIds"),
        ("setCategoryPreferences", [{"extId": "a", "category": "Shopping"}], "[0].enable"),
        ("setProfileAttributes", [{"extId": "a"}], "[0].profile"),
        ("unsetProfileAttributes", [{"profile": ["age"]}], "[0].extId"),
        ("deleteProfileAttributes", [{}], "[0].profile"),
        ("deleteProfileAttributeValue", [{"key": "k"}], "[0].value"),
        ("updateEmail", {"extId": "a"}, "email"),
        ("updateMsisdn", {"msisdn": "905"}, "extId"),
        ("fireEvents", [{"extId": "a"}], "[0].name"),
        ("sendPushApproval", [{}], "[0].messageId"),
        ("sendBulkNotification", {"target": {"extId": "a"}}, "message"),
        (
            "sendBulkNotification",
            {"message": {"platforms": ["IOS"]}, "target": {"extId": "a"}},
            "message.text",
        ),
        ("sendNotification", {"notificationKey": 1, "message": {"params": {}}}, "target"),
        ("disablePush", {}, "extId or deviceToken"),
        ("enableMail", {}, "extIds or emailList"),
        ("enableSms", {"extIds": ["a"], "msisdnList": ["1"]}, "extIds or msisdnList"),
    ],
)
async def test_missing_required_field_is_400_2020_naming_it(
    netmera_sandbox: Any, endpoint: str, body: Any, field: str
) -> None:
    reply = await netmera_sandbox.post(endpoint, body)
    assert reply.status == 400
    assert reply.body["code"] == 2020
    assert field in reply.body["error"]


@pytest.mark.parametrize(
    ("endpoint", "body", "field"),
    [
        ("tagUsers", {"tag": "T", "extIds": ["a", ""]}, "extIds[1]"),
        ("untagUsers", {"tag": "T", "extIds": [""]}, "extIds[0]"),
        ("deleteUsersPermanently", {"extIds": ["a", ""]}, "extIds[1]"),
        ("enableMail", {"extIds": ["", "a"]}, "extIds[0]"),
        ("disableSms", {"extIds": ["a", ""]}, "extIds[1]"),
        ("disableMail", {"emailList": ["a@example.com", ""]}, "emailList[1]"),
        ("enableSms", {"msisdnList": [""]}, "msisdnList[0]"),
    ],
)
async def test_an_empty_string_in_an_id_or_address_list_is_400_2020_and_changes_nothing(
    netmera_sandbox: Any, endpoint: str, body: Any, field: str
) -> None:
    """An empty extId names nobody: refused in an ``extIds`` list as it is as an array item's ``extId`` and as
    enablePush's ``extId``. It was accepted, and tagUsers created a user named ""."""
    reply = await netmera_sandbox.post(endpoint, body)
    assert (reply.status, reply.body["code"]) == (400, 2020)
    assert reply.body["error"] == f"missing required parameter: {field}"
    state = netmera_sandbox.sandbox.state
    assert state.users == {} and state.tags == {}


@pytest.mark.parametrize(
    ("endpoint", "params", "field"),
    [
        ("getProfileAttributes", {}, "extId"),
        ("getDevices", {}, "extId"),
        ("getCategoryPreferences", {}, "externalId"),
        ("getPushStats", {}, "notificationKey"),
    ],
)
async def test_missing_query_parameter_is_400_2020(
    netmera_sandbox: Any, endpoint: str, params: Any, field: str
) -> None:
    reply = await netmera_sandbox.get(endpoint, params)
    assert (reply.status, reply.body["code"]) == (400, 2020)
    assert field in reply.body["error"]


@pytest.mark.parametrize(
    ("endpoint", "body", "field"),
    [
        ("tagUsers", {"tag": "T", "extIds": "a"}, "extIds"),
        ("tagUsers", {"tag": "T", "extIds": ["a", 1]}, "extIds"),
        ("tagUsers", {"tag": 5, "extIds": ["a"]}, "tag"),
        ("tagUsers", [{"tag": "T", "extIds": ["a"]}], "body"),
        ("setProfileAttributes", {"extId": "a", "profile": {}}, "body"),
        ("setProfileAttributes", [{"extId": "a", "profile": ["x"]}], "[0].profile"),
        ("unsetProfileAttributes", [{"extId": "a", "profile": {"x": 1}}], "[0].profile"),
        ("setCategoryPreferences", [{"extId": "a", "category": "c", "enable": "yes"}], "[0].enable"),
        ("sendPushApproval", [{"messageId": "1"}], "[0].messageId"),
        (
            "sendBulkNotification",
            {"message": {"text": "t", "platforms": ["WINDOWS"]}, "target": {}},
            "platforms",
        ),
        ("disablePush", {"extId": 12}, "extId"),
    ],
)
async def test_wrong_type_is_400(netmera_sandbox: Any, endpoint: str, body: Any, field: str) -> None:
    reply = await netmera_sandbox.post(endpoint, body)
    assert reply.status == 400
    assert reply.body["code"] == 2009  # the configurable type_error_code [I]
    assert field in reply.body["error"]
    assert netmera_sandbox.sandbox.state.users == {} and netmera_sandbox.sandbox.state.tags == {}


async def test_more_than_1000_unique_ext_ids_is_400(netmera_sandbox: Any) -> None:
    ids = [f"u{i}" for i in range(1001)]
    for endpoint, body in (
        ("tagUsers", {"tag": "T", "extIds": ids}),
        ("untagUsers", {"tag": "T", "extIds": ids}),
        ("deleteUsersPermanently", {"extIds": ids}),
        ("enableMail", {"extIds": ids}),
        ("setProfileAttributes", [{"extId": e, "profile": {"a": 1}} for e in ids]),
        ("fireEvents", [{"extId": e, "name": "x"} for e in ids]),
        ("sendNotification", {"notificationKey": 1, "target": {"extId": ids}}),
        ("sendNotification", {"notificationKey": 1, "target": {"deviceToken": ids}}),
    ):
        reply = await netmera_sandbox.post(endpoint, body)
        assert reply.status == 400, endpoint
        assert reply.body["code"] == 5022
        assert "1000" in reply.body["error"]
    assert netmera_sandbox.sandbox.state.user_count() == 0


async def test_exactly_1000_unique_ids_and_duplicates_are_accepted(netmera_sandbox: Any) -> None:
    ids = [f"u{i}" for i in range(1000)]
    reply = await netmera_sandbox.post("tagUsers", {"tag": "T", "extIds": ids + ids[:500]})
    assert reply.status == 200
    assert len(netmera_sandbox.sandbox.state.tags["T"]) == 1000


async def test_unknown_path_is_404_and_wrong_method_is_405(netmera_sandbox: Any) -> None:
    reply = await netmera_sandbox.post("tagUser", {"tag": "T", "extIds": ["a"]})
    assert (reply.status, reply.body) == (404, {"code": 404, "error": "not found"})
    reply = await netmera_sandbox.get("tagUsers")
    assert (reply.status, reply.body["code"], reply.headers["Allow"]) == (405, 405, "POST")
    reply = await netmera_sandbox.post("getDevices", {})
    assert reply.status == 405
    reply = await netmera_sandbox.request("GET", netmera_sandbox.root_url + "/rest/2.0/tagUsers")
    assert reply.status == 404


async def test_unknown_ext_id_on_reads_is_400_5016(netmera_sandbox: Any) -> None:
    for endpoint, params in (
        ("getProfileAttributes", {"extId": "nobody"}),
        ("getDevices", {"extId": "nobody"}),
        ("getCategoryPreferences", {"externalId": "nobody"}),
    ):
        reply = await netmera_sandbox.get(endpoint, params)
        assert (reply.status, reply.body["code"]) == (400, 5016), endpoint
    assert not netmera_sandbox.sandbox.state.exists("nobody")  # reads never create users


async def test_unknown_ext_id_policy_error_refuses_the_whole_write(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(unknown_ext_id="error")
    running.sandbox.state.ensure_users(["known"])
    reply = await running.post("tagUsers", {"tag": "T", "extIds": ["known", "unknown"]})
    assert (reply.status, reply.body["code"]) == (400, 5016)
    assert "T" not in running.sandbox.state.tags
    reply = await running.post("tagUsers", {"tag": "T", "extIds": ["known"]})
    assert reply.status == 200
    reply = await running.post("disablePush", {"deviceToken": "no-such-token"})
    assert (reply.status, reply.body["code"]) == (400, 5016)


async def test_segment_errors(netmera_sandbox: Any) -> None:
    reply = await netmera_sandbox.get("getSegments")
    assert (reply.status, reply.body["code"]) == (400, 2020)
    assert "X-netmera-os" in reply.body["error"]
    reply = await netmera_sandbox.get(
        "getSegments", headers={**netmera_sandbox.headers, "X-netmera-os": "WINDOWS"}
    )
    assert reply.status == 400
    os_headers = {**netmera_sandbox.headers, "X-netmera-os": "ANDROID"}
    reply = await netmera_sandbox.get("getSegmentUsers", {"id": "42"}, headers=os_headers)
    assert (reply.status, reply.body["code"]) == (400, 5042)
    reply = await netmera_sandbox.get("getSegmentUsers", {}, headers=os_headers)
    assert (reply.status, reply.body["code"]) == (400, 2020)
    reply = await netmera_sandbox.get("getSegmentUsers", {"id": "abc"}, headers=os_headers)
    assert reply.status == 400
    netmera_sandbox.sandbox.state.load({"segments": [{"id": 1, "name": "s", "members": []}]})
    reply = await netmera_sandbox.get("getSegmentUsers", {"id": "1", "max": "1001"}, headers=os_headers)
    assert reply.status == 400
    assert "1000" in reply.body["error"]


async def test_delete_users_needs_activation_when_configured(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(delete_users_enabled=False)
    reply = await running.post("deleteUsersPermanently", {"extIds": ["a"]})
    assert (reply.status, reply.body["code"]) == (403, 2022)


async def test_bad_query_values_are_400(netmera_sandbox: Any) -> None:
    for params in ({"max": "ten"}, {"offset": "-1"}, {"max": "0"}):
        reply = await netmera_sandbox.get("getDeviceTokens", params)
        assert reply.status == 400, params
    netmera_sandbox.sandbox.state.ensure_users(["a"])
    reply = await netmera_sandbox.get("getDevices", {"extId": "a", "pushPermitted": "maybe"})
    assert reply.status == 400
    reply = await netmera_sandbox.get("getPushStats", {"notificationKey": "999"})
    assert reply.status == 400


async def test_body_over_the_size_limit_is_413(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(max_body_bytes=1000)
    reply = await running.post("tagUsers", {"tag": "T", "extIds": [f"user-{i}" for i in range(200)]})
    assert (reply.status, reply.body["code"]) == (413, 413)
    assert running.sandbox.stats.requests("tagUsers", 413) == 1


async def test_posts_need_a_json_content_type(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory()
    body = '{"tag": "T", "extIds": ["a"]}'
    for headers in (
        {"X-netmera-api-key": running.api_key},
        {**running.headers, "Content-Type": "text/plain"},
    ):
        reply = await running.post("tagUsers", data=body, headers=headers)
        assert (reply.status, reply.body["code"]) == (415, 2009)
    charset = {**running.headers, "Content-Type": "application/json; charset=utf-8"}
    assert (await running.post("tagUsers", data=body, headers=charset)).status == 200
    lenient = await netmera_sandbox_factory(require_json_content_type=False)
    assert (
        await lenient.post("tagUsers", data=body, headers={"X-netmera-api-key": lenient.api_key})
    ).status == 200
