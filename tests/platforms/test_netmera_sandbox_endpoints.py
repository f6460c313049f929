"""Every request body of the Netmera seed documents (000, 001) is accepted, with its documented effect on state;
read calls return the current state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sync.sandboxes.netmera_config import NetmeraSandboxConfig
from sync.sandboxes.netmera_state import Device

SEED_USERS = {
    "users": [
        {
            "extId": "id1",
            "devices": [
                {
                    "platform": "ANDROID",
                    "token": "a1b2c3d4e5f6g7",
                    "deviceModel": "Pixel 5",
                    "pushPermitted": True,
                },
                {
                    "platform": "IOS",
                    "token": "ios-token-1",
                    "deviceModel": "iPhone 13",
                    "pushPermitted": True,
                },
            ],
            "email": "john@example.com",
            "msisdn": "905312345678",
        },
        {
            "extId": "id2",
            "devices": [
                {
                    "platform": "IOS",
                    "token": "ios-token-2",
                    "deviceModel": "iPhone 12",
                    "pushPermitted": False,
                }
            ],
        },
    ],
    "segments": [{"id": 5883, "name": "segment", "type": "PRODUCT_SEGMENT", "members": ["id1", "id2"]}],
}


async def seeded(factory: Any) -> Any:
    running = await factory()
    running.sandbox.state.load(SEED_USERS)
    return running


async def test_tag_and_untag_users(netmera_sandbox: Any) -> None:
    reply = await netmera_sandbox.post("tagUsers", {"tag": "Sport", "extIds": ["id1", "id2"]})
    assert (reply.status, reply.body) == (200, {})
    state = netmera_sandbox.sandbox.state
    assert state.tags["Sport"] == {"id1", "id2"}
    assert state.exists("id1") and state.exists("id2")  # created on first sight (the default [I] choice)

    reply = await netmera_sandbox.post("untagUsers", {"tag": "Sport", "extIds": ["id1"]})
    assert reply.status == 200
    assert state.tags["Sport"] == {"id2"}
    assert state.tags_of("id1") == []
    assert netmera_sandbox.sandbox.stats.applied("tagUsers") == 2
    assert netmera_sandbox.sandbox.stats.applied("untagUsers") == 1
    reply = await netmera_sandbox.get("getProfileAttributes", {"extId": "id1"})
    assert (reply.status, reply.body) == (200, {"extId": "id1", "profile": {}})  # untagged, still a user


async def test_duplicate_ext_ids_count_once(netmera_sandbox: Any) -> None:
    reply = await netmera_sandbox.post("tagUsers", {"tag": "T", "extIds": ["x", "x", "y"]})
    assert reply.status == 200
    assert netmera_sandbox.sandbox.stats.applied("tagUsers") == 2


async def test_disable_and_enable_push_by_ext_id_and_token(netmera_sandbox_factory: Any) -> None:
    running = await seeded(netmera_sandbox_factory)
    assert (await running.post("disablePush", {"extId": "id1"})).status == 200
    devices = (await running.get("getDevices", {"extId": "id1"})).body["devices"]
    assert [d["pushPermitted"] for d in devices] == [False, False]  # all devices of the user

    assert (await running.post("enablePush", {"deviceToken": "ios-token-1"})).status == 200
    devices = (await running.get("getDevices", {"extId": "id1"})).body["devices"]
    assert {d["token"]: d["pushPermitted"] for d in devices} == {"a1b2c3d4e5f6g7": False, "ios-token-1": True}

    only = (await running.get("getDevices", {"extId": "id1", "pushPermitted": "true"})).body
    assert only == {
        "extId": "id1",
        "devices": [
            {"platform": "IOS", "token": "ios-token-1", "deviceModel": "iPhone 13", "pushPermitted": True}
        ],
    }


async def test_category_preferences(netmera_sandbox: Any) -> None:
    body = [
        {"extId": "id1", "category": "Shopping", "enable": True},
        {"extId": "id1", "category": "Promotion", "enable": False},
    ]
    assert (await netmera_sandbox.post("setCategoryPreferences", body)).status == 200
    reply = await netmera_sandbox.get("getCategoryPreferences", {"externalId": "id1"})
    assert reply.body == {
        "externalId": "id1",
        "categories": [{"category": "Promotion", "enable": False}, {"category": "Shopping", "enable": True}],
    }
    reply = await netmera_sandbox.get(
        "getCategoryPreferences", {"externalId": "id1", "pushPermitted": "true"}
    )
    assert reply.body["categories"] == [{"category": "Shopping", "enable": True}]


async def test_a_category_the_panel_does_not_define_is_refused_when_the_panel_is_configured(
    netmera_sandbox_factory: Any, tmp_path: Path
) -> None:
    """A preference is kept only for a category "defined in Netmera panel" (seed 001). With the panel's categories
    configured, a request naming another one is refused whole and nothing is kept: a job whose mapping misspells
    a category (``Promotions`` for the panel's ``Promotion``) ran ok against the sandbox, which kept the
    preference, while the platform would hold no such opt-out."""
    from sync.config import load_job
    from sync.run import RunOptions, run

    with pytest.raises(ValueError, match="categories must be a list"):
        NetmeraSandboxConfig.from_mapping({"categories": "Promotion"})
    running = await netmera_sandbox_factory(categories=["Shopping", "Promotion"])
    assert running.sandbox.config.categories == frozenset({"Shopping", "Promotion"})
    state = running.sandbox.state
    good = {"extId": "id1", "category": "Shopping", "enable": True}
    reply = await running.post(
        "setCategoryPreferences", [good, {"extId": "id2", "category": "Promotions", "enable": False}]
    )
    assert (reply.status, reply.body) == (
        400,
        {"code": 2020, "error": "invalid parameter [1].category: not a category of the panel"},
    )
    assert state.users == {}  # nothing of the request was applied
    assert (await running.post("setCategoryPreferences", [good])).status == 200
    assert state.users["id1"].categories == {"Shopping": True}

    (tmp_path / "users.csv").write_text("id,promo\nu1,false\nu2,no\n", encoding="utf-8")
    (tmp_path / "job.yaml").write_text(
        f"""version: 1
name: categories
workdir: work
destination: {{platform: netmera, base_url: "{running.url}", secret: {{env: NETMERA_API_KEY}}}}
sources:
  - name: users
    path: users.csv
    ext_id: id
    opt_ins: {{categories: {{Promotions: promo}}}}
dispatch: {{retry: {{max_attempts: 1}}}}
""",
        encoding="utf-8",
    )
    result = await run(load_job(tmp_path / "job.yaml"), RunOptions(api_key=running.api_key))
    assert result.summary.ids_ok == 0 and result.summary.ids_rejected == 2
    assert state.users["id1"].categories == {"Shopping": True} and "u1" not in state.users


async def test_set_profile_keeps_other_keys(netmera_sandbox: Any) -> None:
    body = [
        {"extId": "id1", "profile": {"name": "John", "age": 34}},
        {"extId": "id2", "profile": {"name": "John"}},
    ]
    assert (await netmera_sandbox.post("setProfileAttributes", body)).status == 200
    assert (
        await netmera_sandbox.post("setProfileAttributes", [{"extId": "id1", "profile": {"age": 35}}])
    ).status == 200
    reply = await netmera_sandbox.get("getProfileAttributes", {"extId": "id1"})
    assert reply.body == {"extId": "id1", "profile": {"name": "John", "age": 35}}


async def test_unset_profile_removes_keys(netmera_sandbox: Any) -> None:
    await netmera_sandbox.post(
        "setProfileAttributes", [{"extId": "id1", "profile": {"name": "J", "age": 3, "x": 1}}]
    )
    await netmera_sandbox.post("setProfileAttributes", [{"extId": "id2", "profile": {"name": "K", "age": 4}}])
    body = [{"extId": "id1", "profile": ["age"]}, {"extId": "id2", "profile": ["age", "name"]}]
    assert (await netmera_sandbox.post("unsetProfileAttributes", body)).status == 200
    assert (await netmera_sandbox.get("getProfileAttributes", {"extId": "id1"})).body["profile"] == {
        "name": "J",
        "x": 1,
    }
    assert (await netmera_sandbox.get("getProfileAttributes", {"extId": "id2"})).body["profile"] == {}


async def test_push_and_pull_array_attributes(netmera_sandbox: Any) -> None:
    push = [{"extId": "id1", "profile": {"lastVisitedCategories": ["shopping"]}}]
    assert (await netmera_sandbox.post("pushProfileAttributes", push)).status == 200
    push = [{"extId": "id1", "profile": {"lastVisitedCategories": ["promotion", "news"]}}]
    assert (await netmera_sandbox.post("pushProfileAttributes", push)).status == 200
    profile = (await netmera_sandbox.get("getProfileAttributes", {"extId": "id1"})).body["profile"]
    assert profile == {"lastVisitedCategories": ["shopping", "promotion", "news"]}

    pull = [{"extId": "id1", "profile": {"lastVisitedCategories": ["promotion"]}}]
    assert (await netmera_sandbox.post("pullProfileAttributes", pull)).status == 200
    profile = (await netmera_sandbox.get("getProfileAttributes", {"extId": "id1"})).body["profile"]
    assert profile == {"lastVisitedCategories": ["shopping", "news"]}


async def test_push_onto_a_non_array_attribute_is_refused_and_changes_nothing(netmera_sandbox: Any) -> None:
    await netmera_sandbox.post("setProfileAttributes", [{"extId": "id1", "profile": {"name": "John"}}])
    body = [
        {"extId": "id2", "profile": {"tags": ["a"]}},
        {"extId": "id1", "profile": {"name": ["x"]}},
    ]
    for endpoint in ("pushProfileAttributes", "pullProfileAttributes"):
        reply = await netmera_sandbox.post(endpoint, body)
        assert reply.status == 400
        assert "not an array" in reply.body["error"]
    assert netmera_sandbox.sandbox.state.users.get("id2") is None  # nothing applied, not even the valid item
    reply = await netmera_sandbox.post("pushProfileAttributes", [{"extId": "id1", "profile": {"name": "x"}}])
    assert reply.status == 400  # values to push must be an array too


async def test_a_refused_push_or_pull_leaves_no_user_it_named_behind(netmera_sandbox: Any) -> None:
    """A push/pull refused because one target attribute is not an array changed nothing, as documented — but
    the users the request named were created before the check: a user never set afterwards existed, and
    getProfileAttributes answered 200 ``{}`` for them instead of 5016."""
    state = netmera_sandbox.sandbox.state
    await netmera_sandbox.post("setProfileAttributes", [{"extId": "id1", "profile": {"name": "John"}}])
    body = [{"extId": "new", "profile": {"likes": ["a"]}}, {"extId": "id1", "profile": {"name": ["x"]}}]
    for endpoint in ("pushProfileAttributes", "pullProfileAttributes"):
        reply = await netmera_sandbox.post(endpoint, body)
        assert (reply.status, reply.body["code"]) == (400, 2009)
        assert not state.exists("new")
    reply = await netmera_sandbox.get("getProfileAttributes", {"extId": "new"})
    assert (reply.status, reply.body["code"]) == (400, 5016)
    # An accepted request still creates the users it names.
    assert (await netmera_sandbox.post("pushProfileAttributes", body[:1])).status == 200
    assert state.users["new"].profile == {"likes": ["a"]}  # type: ignore[union-attr]


async def test_delete_profile_attributes_for_all_users(netmera_sandbox: Any) -> None:
    body = [
        {"extId": "id1", "profile": {"name": "A", "age": 1, "city": "X"}},
        {"extId": "id2", "profile": {"age": 2}},
    ]
    await netmera_sandbox.post("setProfileAttributes", body)
    assert (
        await netmera_sandbox.post("deleteProfileAttributes", [{"profile": ["name", "age"]}])
    ).status == 200
    assert (await netmera_sandbox.get("getProfileAttributes", {"extId": "id1"})).body["profile"] == {
        "city": "X"
    }
    assert (await netmera_sandbox.get("getProfileAttributes", {"extId": "id2"})).body["profile"] == {}


async def test_delete_profile_attribute_value_array_body_and_single_object(netmera_sandbox: Any) -> None:
    body = [
        {"extId": "id1", "profile": {"lastVisitedProducts": ["shirt", "hat"]}},
        {"extId": "id2", "profile": {"lastVisitedProducts": ["shirt"]}},
    ]
    await netmera_sandbox.post("pushProfileAttributes", body)
    reply = await netmera_sandbox.post(
        "deleteProfileAttributeValue", [{"key": "lastVisitedProducts", "value": "shirt"}]
    )
    assert reply.status == 200
    assert (await netmera_sandbox.get("getProfileAttributes", {"extId": "id1"})).body["profile"] == {
        "lastVisitedProducts": ["hat"]
    }
    reply = await netmera_sandbox.post(
        "deleteProfileAttributeValue", {"key": "lastVisitedProducts", "value": "hat"}
    )
    assert reply.status == 200  # the single-object form one public client sends [C]
    assert (await netmera_sandbox.get("getProfileAttributes", {"extId": "id1"})).body["profile"] == {
        "lastVisitedProducts": []
    }


async def test_get_segments_and_segment_users(netmera_sandbox_factory: Any) -> None:
    running = await seeded(netmera_sandbox_factory)
    reply = await running.get("getSegments", headers={**running.headers, "X-netmera-os": "IOS"})
    assert reply.body == {
        "list": [{"id": 5883, "name": "segment", "userCount": 2, "type": "PRODUCT_SEGMENT"}]
    }
    reply = await running.get(
        "getSegmentUsers", {"id": "5883"}, headers={**running.headers, "X-netmera-os": "IOS"}
    )
    assert reply.body == {
        "name": "segment",
        "list": [
            {"externalId": "id1", "msisdn": "905312345678", "email": "john@example.com"},
            {"externalId": "id2", "msisdn": None, "email": None},
        ],
    }


async def test_mail_opt_in_and_update(netmera_sandbox: Any) -> None:
    state = netmera_sandbox.sandbox.state
    assert (
        await netmera_sandbox.post("updateEmail", {"extId": "your_extId", "email": "a@example.com"})
    ).status == 200
    assert state.users["your_extId"].email == "a@example.com"
    assert (await netmera_sandbox.post("enableMail", {"extIds": ["your_extId"]})).status == 200
    assert state.users["your_extId"].email_opt_in is True
    assert (await netmera_sandbox.post("disableMail", {"emailList": ["a@example.com"]})).status == 200
    assert state.users["your_extId"].email_opt_in is False
    assert (
        await netmera_sandbox.post("updateEmail", {"extId": "your_extId", "email": "b@example.com"})
    ).status == 200
    assert "a@example.com" not in state.emails  # the old address no longer finds the user


async def test_sms_opt_in_and_update(netmera_sandbox: Any) -> None:
    state = netmera_sandbox.sandbox.state
    assert (
        await netmera_sandbox.post("updateMsisdn", {"extId": "u", "msisdn": "905550000000"})
    ).status == 200
    assert (await netmera_sandbox.post("enableSms", {"msisdnList": ["905550000000"]})).status == 200
    assert state.users["u"].sms_opt_in is True
    assert (await netmera_sandbox.post("disableSms", {"extIds": ["u"]})).status == 200
    assert state.users["u"].sms_opt_in is False
    assert state.users["u"].msisdn == "905550000000"


async def test_fire_events_records_attributes(netmera_sandbox: Any) -> None:
    body = [{"extId": "id1", "name": "purchase", "amount": 12.5}, {"extId": "id2", "name": "login"}]
    assert (await netmera_sandbox.post("fireEvents", body)).status == 200
    events = netmera_sandbox.sandbox.state.events
    assert [(e.ext_id, e.name, e.attributes) for e in events] == [
        ("id1", "purchase", {"amount": 12.5}),
        ("id2", "login", {}),
    ]


async def test_bulk_notification_stats_and_approval(netmera_sandbox_factory: Any) -> None:
    running = await seeded(netmera_sandbox_factory)
    body = {
        "message": {"title": "Hi", "platforms": ["IOS", "ANDROID"], "text": "Hello"},
        "target": {"extIds": ["id1", "id2"]},
    }
    reply = await running.post("sendBulkNotification", body)
    assert reply.status == 200
    key = reply.body["notificationKey"]
    assert isinstance(key, int)
    stats = (await running.get("getPushStats", {"notificationKey": str(key)})).body
    assert stats["notificationKey"] == key
    assert stats["status"] == "FINISHED"
    # id1 has an opted-in Android and iOS device; id2's only device is opted out
    assert stats["stats"] == [
        {"platform": "IOS", "sent": 1, "failed": 0, "clicked": 0},
        {"platform": "ANDROID", "sent": 1, "failed": 0, "clicked": 0},
    ]
    assert (await running.post("sendPushApproval", [{"messageId": key}])).status == 200
    assert running.sandbox.state.notifications[key].approved is True
    assert (await running.post("sendPushApproval", [{"messageId": 0}])).status == 200
    assert running.sandbox.state.approvals == [key, 0]


async def test_send_notification_object_and_array_forms(netmera_sandbox_factory: Any) -> None:
    running = await seeded(netmera_sandbox_factory)
    one = {"notificationKey": 7, "message": {"params": {"name": "John"}}, "target": {"extId": "id1"}}
    assert (await running.post("sendNotification", one)).status == 200
    many = [
        {"notificationKey": 7, "message": {"params": {}}, "target": {"extId": ["id1", "id2"]}},
        {"notificationKey": 8, "message": {"params": {}}, "target": {"deviceToken": ["ios-token-2"]}},
    ]
    assert (await running.post("sendNotification", many)).status == 200
    assert running.sandbox.stats.applied("sendNotification") == 1 + 2 + 1
    assert len(running.sandbox.state.notifications) == 3


async def test_delete_users_permanently_removes_everything(netmera_sandbox_factory: Any) -> None:
    running = await seeded(netmera_sandbox_factory)
    await running.post("tagUsers", {"tag": "Sport", "extIds": ["id1", "id2"]})
    await running.post("fireEvents", [{"extId": "id1", "name": "x"}])
    assert (await running.post("deleteUsersPermanently", {"extIds": ["id1"]})).status == 200
    state = running.sandbox.state
    assert not state.exists("id1")
    assert "a1b2c3d4e5f6g7" not in state.devices
    assert state.tags["Sport"] == {"id2"}
    assert state.events == []
    assert state.segments[5883].members == ["id2"]
    reply = await running.get("getProfileAttributes", {"extId": "id1"})
    assert (reply.status, reply.body["code"]) == (400, 5016)


async def test_get_push_result_pages_with_an_opaque_cursor(netmera_sandbox_factory: Any) -> None:
    running = await seeded(netmera_sandbox_factory)
    body = {"message": {"platforms": ["IOS", "ANDROID"], "text": "t"}, "target": {"sendToAll": True}}
    key = (await running.post("sendBulkNotification", body)).body["notificationKey"]
    first = await running.get("getPushResult", {"notificationKey": str(key), "max": "1"})
    assert first.body["list"] == [{"platform": "ANDROID", "sent": 1}]
    assert "offset" not in first.body["nextPage"]  # opaque: a cursor, not an offset
    async with running.session.get(first.body["nextPage"], headers=running.headers) as resp:
        second = await resp.json()
    assert second == {"list": [{"platform": "IOS", "sent": 1}]}


async def test_reads_reflect_seeded_devices(netmera_sandbox: Any) -> None:
    state = netmera_sandbox.sandbox.state
    state.add_device(Device("z", "ANDROID", "tok-z", "Pixel 6", True))
    reply = await netmera_sandbox.get("getDevices", {"extId": "z"})
    assert reply.body == {
        "extId": "z",
        "devices": [
            {"platform": "ANDROID", "token": "tok-z", "deviceModel": "Pixel 6", "pushPermitted": True}
        ],
    }
