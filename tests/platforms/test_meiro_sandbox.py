"""The Meiro sandbox over HTTP: login and tokens, features, exports (paging, progression, cancel), the trash,
limits, faults, stats and inspection."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from conftest_meiro import EPOCH, MEIRO_EMAIL, MEIRO_PASSWORD, VIEWER_EMAIL, VIEWER_PASSWORD, FakeClock

from sync.sandboxes._core import FaultSpec, RateLimit
from sync.sandboxes.meiro import MeiroSandboxConfig

NID = "983d437d-eac6-423b-beb5-40a619be332f"


def _seed(sandbox: Any, exports: int = 1, **kw: Any) -> None:
    state = sandbox.sandbox.state
    if NID not in state.notifications:
        state.add_notification("My push notification", notification_id=NID)
    for _ in range(exports):
        sandbox.clock.advance(1)  # distinct creation times: newest first is well defined
        state.add_export(NID, **kw)


async def test_login_issues_a_token_and_every_other_call_needs_it(meiro_sandbox: Any) -> None:
    bad = await meiro_sandbox.request("POST", "users/login", body={"email": MEIRO_EMAIL, "password": "nope"})
    assert (bad.status, bad.body) == (401, {"message": "Invalid email or password"})
    empty = await meiro_sandbox.request("POST", "users/login", body={"email": MEIRO_EMAIL})
    assert (empty.status, empty.body) == (400, {"message": "email and password are required"})
    broken = await meiro_sandbox.request("POST", "users/login", data=b"{not json")
    assert broken.status == 400 and broken.body == {"message": "Invalid JSON body"}
    nan = json.dumps({"email": MEIRO_EMAIL, "password": MEIRO_PASSWORD})[:-1].encode() + b', "remember": NaN}'
    not_json = await meiro_sandbox.request("POST", "users/login", data=nan)  # Python reads NaN; JSON has none
    assert not_json.status == 400 and not_json.body == {"message": "Invalid JSON body"}
    _seed(meiro_sandbox)
    missing = await meiro_sandbox.request("GET", f"push_notifications/{NID}/exports")
    assert (missing.status, missing.body) == (401, {"message": "Missing X-Access-Token header"})
    wrong = await meiro_sandbox.request("GET", f"push_notifications/{NID}/exports", token="abc")
    assert (wrong.status, wrong.body) == (401, {"message": "Invalid access token"})
    token = await meiro_sandbox.login()
    ok = await meiro_sandbox.request("GET", f"push_notifications/{NID}/exports", token=token)
    assert ok.status == 200 and len(ok.body["push_notification_exports"]) == 1


async def test_a_token_expires_after_8_hours_and_patch_refreshes_it(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox)
    path = f"push_notifications/{NID}/exports"
    token = await meiro_sandbox.login()
    meiro_sandbox.clock.advance(8 * 3600 - 1)
    assert (await meiro_sandbox.request("GET", path, token=token)).status == 200
    refreshed = await meiro_sandbox.request("PATCH", "users/login", token=token)
    assert refreshed.status == 200
    new = refreshed.body["token"]
    assert new != token  # refresh_rotates: the old token stops working
    assert (await meiro_sandbox.request("GET", path, token=token)).status == 401
    meiro_sandbox.clock.advance(8 * 3600 - 1)  # 16 h after the login: the refreshed token still works
    assert (await meiro_sandbox.request("GET", path, token=new)).status == 200
    meiro_sandbox.clock.advance(1)
    expired = await meiro_sandbox.request("GET", path, token=new)
    assert (expired.status, expired.body) == (401, {"message": "Access token expired"})
    late = await meiro_sandbox.request("PATCH", "users/login", token=new)
    assert late.status == 401  # an expired token cannot be refreshed: log in again


async def test_refresh_can_extend_the_same_token(meiro_sandbox_factory: Any) -> None:
    running = await meiro_sandbox_factory(refresh_rotates=False)
    token = await running.login()
    running.clock.advance(7 * 3600)
    reply = await running.request("PATCH", "users/login", token=token)
    assert reply.body == {"token": token}
    running.clock.advance(7 * 3600)  # 14 h after login, 7 h after the refresh
    assert (await running.request("GET", "push_notifications/trash", token=token)).status == 200


async def test_a_user_without_the_edit_feature_gets_403(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox)
    token = await meiro_sandbox.login(VIEWER_EMAIL, VIEWER_PASSWORD)
    path = f"push_notifications/{NID}/exports/1"
    assert (await meiro_sandbox.request("GET", path, token=token)).status == 200
    denied = await meiro_sandbox.request("DELETE", path, token=token)
    assert denied.status == 403
    assert "push_notifications/edit" in denied.body["message"]
    assert (
        await meiro_sandbox.request("PATCH", f"push_notifications/trash/{NID}", token=token)
    ).status == 403


async def test_exports_are_listed_newest_first_with_limit_and_offset(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox, exports=45)
    token = await meiro_sandbox.login()
    path = f"push_notifications/{NID}/exports"
    first = await meiro_sandbox.request("GET", path, token=token)
    ids = [e["id"] for e in first.body["push_notification_exports"]]
    assert ids == list(range(45, 25, -1))  # default limit 20, newest first
    assert first.body["selection_settings"] == {"limit": 20, "offset": None}
    seen: list[int] = []
    for offset in range(0, 50, 10):
        page = await meiro_sandbox.request(
            "GET", path, token=token, params={"limit": "10", "offset": str(offset)}
        )
        assert page.body["selection_settings"] == {"limit": 10, "offset": offset}
        seen += [e["id"] for e in page.body["push_notification_exports"]]
    assert seen == list(range(45, 0, -1))
    bad = await meiro_sandbox.request("GET", path, token=token, params={"limit": "-1"})
    assert (bad.status, bad.body) == (400, {"message": "limit must be a non-negative integer"})
    unknown = await meiro_sandbox.request("GET", "push_notifications/nope/exports", token=token)
    assert unknown.status == 404


async def test_an_export_progresses_by_polls_and_counts_its_messages(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox, total=123, excluded_invalid=3, excluded_by_frequency_cap=20, waiting=2, running=4)
    token = await meiro_sandbox.login()
    path = f"push_notifications/{NID}/exports/1"
    seen = []
    for _ in range(7):
        reply = await meiro_sandbox.request("GET", path, token=token)
        export = reply.body["push_notification_export"]
        seen.append((export["status"], export["message_counts"]["sent"]))
    assert seen == [
        ("waiting", 0),
        ("running", 0),
        ("running", 25),
        ("running", 50),
        ("running", 75),
        ("finished", 100),
        ("finished", 100),
    ]
    assert export["message_counts"] == {
        "total": 123,
        "sent": 100,
        "excluded_invalid": 3,
        "excluded_by_frequency_cap": 20,
    }
    assert set(export["stats"]["statuses_history"]) == {"waiting", "running", "finished"}
    assert set(export) >= {
        "id",
        "user_id",
        "segments",
        "name",
        "status",
        "stats",
        "message_counts",
        "created",
    }
    missing = await meiro_sandbox.request("GET", f"push_notifications/{NID}/exports/999", token=token)
    assert (missing.status, missing.body) == (404, {"message": "Push notification export not found"})


async def test_time_progression_and_a_seeded_error(meiro_sandbox_factory: Any) -> None:
    running = await meiro_sandbox_factory(progression="time", waiting=10, running=60)
    _seed(running, total=50)
    running.sandbox.state.add_export(NID, total=10, outcome="error", waiting=0, running=5)
    token = await running.login()
    get = lambda eid: running.request("GET", f"push_notifications/{NID}/exports/{eid}", token=token)  # noqa: E731
    assert (await get(1)).body["push_notification_export"]["status"] == "waiting"
    running.clock.advance(40)  # 10 s waiting + 30 of 60 s running
    half = (await get(1)).body["push_notification_export"]
    assert half["status"] == "running" and half["message_counts"]["sent"] == 25
    running.clock.advance(30)
    done = (await get(1)).body["push_notification_export"]
    assert done["status"] == "finished"
    assert done["stats"]["statuses_history"]["finished"] == "2027-01-15 08:01:11"  # created at EPOCH+1, +70 s
    assert (await get(2)).body["push_notification_export"]["status"] == "error"


async def test_cancel_a_running_export_but_not_a_finished_one(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox, exports=2)
    meiro_sandbox.sandbox.state.add_export(NID, status="finished", total=5)
    token = await meiro_sandbox.login()
    canceled = await meiro_sandbox.request("DELETE", f"push_notifications/{NID}/exports/1", token=token)
    assert canceled.status == 200
    assert canceled.body["push_notification_export"]["status"] == "canceled"
    again = await meiro_sandbox.request("GET", f"push_notifications/{NID}/exports/1", token=token)
    assert again.body["push_notification_export"]["status"] == "canceled"  # a canceled export stays so
    finished = await meiro_sandbox.request("DELETE", f"push_notifications/{NID}/exports/3", token=token)
    assert (finished.status, finished.body) == (400, {"message": "Finished export cannot be canceled"})
    gone = await meiro_sandbox.request("DELETE", f"push_notifications/{NID}/exports/77", token=token)
    assert (gone.status, gone.body) == (404, {"message": "Push notification export not found"})
    assert meiro_sandbox.sandbox.stats.applied("cancelExport") == 1


async def test_trash_list_search_paging_and_restore(meiro_sandbox: Any) -> None:
    state = meiro_sandbox.sandbox.state
    for i in range(25):
        meiro_sandbox.clock.advance(1)
        state.add_notification(f"{'Winter' if i % 2 else 'Summer'} sale {i}", trashed=True)
    live = state.add_notification("Live one")
    token = await meiro_sandbox.login()
    first = await meiro_sandbox.request("GET", "push_notifications/trash", token=token)
    assert len(first.body["trashed_push_notifications"]) == 20
    assert first.body["selection_settings"] == {"limit": 20, "offset": 0, "searched_text": None}
    assert first.body["trashed_push_notifications"][0]["name"] == "Summer sale 24"  # most recently modified
    winter = await meiro_sandbox.request(
        "GET",
        "push_notifications/trash",
        token=token,
        params={"searched_text": "winter", "limit": "5", "offset": "10"},
    )
    names = [n["name"] for n in winter.body["trashed_push_notifications"]]
    assert names == ["Winter sale 3", "Winter sale 1"]
    assert winter.body["selection_settings"] == {"limit": 5, "offset": 10, "searched_text": "winter"}
    item = first.body["trashed_push_notifications"][0]
    assert set(item) == {
        "id",
        "name",
        "title_template",
        "body_template",
        "modified",
        "modified_by",
        "last_activation",
        "last_activation_by",
    }
    restored = await meiro_sandbox.request("PATCH", f"push_notifications/trash/{item['id']}", token=token)
    assert restored.status == 200 and restored.body["push_notification"]["name"] == "Summer sale 24"
    assert not state.notifications[item["id"]].trashed
    twice = await meiro_sandbox.request("PATCH", f"push_notifications/trash/{item['id']}", token=token)
    assert twice.status == 404
    not_trashed = await meiro_sandbox.request("PATCH", f"push_notifications/trash/{live.id}", token=token)
    assert not_trashed.status == 404
    after = await meiro_sandbox.request(
        "GET", "push_notifications/trash", token=token, params={"limit": "100"}
    )
    assert len(after.body["trashed_push_notifications"]) == 24


async def test_exports_of_a_trashed_notification_are_not_found(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox)
    meiro_sandbox.sandbox.state.notifications[NID].trashed = True
    token = await meiro_sandbox.login()
    reply = await meiro_sandbox.request("GET", f"push_notifications/{NID}/exports/1", token=token)
    assert reply.status == 404


async def test_rate_limits_answer_429_with_retry_after_per_clock_window(meiro_sandbox_factory: Any) -> None:
    clock = FakeClock(EPOCH)  # EPOCH is a multiple of 10: windows start there
    running = await meiro_sandbox_factory(clock=clock, limits={"getExport": {"requests": 3, "window": 10}})
    _seed(running)
    token = await running.login()
    statuses = []
    for _ in range(5):
        reply = await running.request("GET", f"push_notifications/{NID}/exports/1", token=token)
        statuses.append(reply.status)
    assert statuses == [200, 200, 200, 429, 429]
    assert reply.body["message"].startswith("Too many requests")
    assert reply.headers["Retry-After"] == "9"  # the clock is 1 s into the window (the seed advanced it)
    assert reply.headers["X-RateLimit-Remaining"] == "0"
    clock.advance(9)
    assert (await running.request("GET", f"push_notifications/{NID}/exports/1", token=token)).status == 200
    stats = running.sandbox.stats
    assert stats.rate_limited("getExport") == 2 and stats.max_in_window("getExport") == 3
    assert stats.requests("login", 200) == 1


async def test_seeded_faults_are_deterministic_and_counted(meiro_sandbox_factory: Any) -> None:
    async def statuses(seed: int) -> list[int | str]:
        running = await meiro_sandbox_factory(seed=seed)
        _seed(running)
        token = await running.login()  # faults start after the login, so every poll below is eligible
        running.sandbox.configure(faults=FaultSpec(error_500=0.3, error_503=0.2, drop=0.1))
        out: list[int | str] = []
        for _ in range(40):
            try:
                reply = await running.request("GET", f"push_notifications/{NID}/exports/1", token=token)
            except aiohttp.ClientConnectionError:
                out.append("dropped")
                continue
            out.append(reply.status)
            if reply.status == 500:
                assert reply.body == {"message": "Internal server error"}
        stats = running.sandbox.stats
        # aiohttp repeats a GET once by itself when a reused connection is dropped, so the server may count
        # more faults than the client saw
        assert stats.faults() >= len(out) - out.count(200)
        assert stats.requests("getExport", "dropped") >= max(1, out.count("dropped"))
        return out

    first, second, other = await statuses(5), await statuses(5), await statuses(6)
    assert first == second != other  # the same seed gives the same faults, request by request
    assert {500, 503, 200} <= set(first)


async def test_fault_bodies_and_inspection_routes(meiro_sandbox_factory: Any, tmp_path: Any) -> None:
    seed_file = tmp_path / "meiro.json"
    seed_file.write_text(
        json.dumps(
            {
                "push_notifications": [
                    {
                        "id": NID,
                        "name": "Seeded",
                        "exports": [{"id": 100, "total": 10}, {"id": 101, "outcome": "error"}],
                    },
                    {"id": "t-1", "name": "Old", "trashed": True},
                ]
            }
        )
    )
    running = await meiro_sandbox_factory(
        MeiroSandboxConfig.from_mapping(
            {"users": [{"email": MEIRO_EMAIL, "password": MEIRO_PASSWORD}], "seed_file": str(seed_file)}
        )
    )
    token = await running.login()
    assert (await running.request("GET", f"push_notifications/{NID}/exports/100", token=token)).status == 200
    state = await running.inspect("GET", "state")
    exports = state.body["push_notifications"][0]["exports"]
    assert [(e["id"], e["polls"], e["outcome"]) for e in exports] == [(100, 1, "finished"), (101, 0, "error")]
    config = await running.inspect("POST", "config", json={"faults": {"error_503": 1.0}})
    assert config.status == 200 and config.body["faults"]["error_503"] == 1.0
    failed = await running.request("GET", f"push_notifications/{NID}/exports/100", token=token)
    assert (failed.status, failed.body) == (503, {"message": "Service unavailable"})
    stats = (await running.inspect("GET", "stats")).body
    assert stats["requests"]["getExport"] == {"200": 1, "503": 1} and stats["faults"] == {"error_503": 1}
    table = await running.inspect("GET", "state", params={"format": "parquet", "table": "exports"})
    assert table.status == 200 and isinstance(table.body, bytes) and table.body[:4] == b"PAR1"
    await running.inspect("POST", "reset")
    assert (await running.inspect("GET", "state")).body == {"push_notifications": []}


async def test_limits_and_faults_can_be_changed_while_running(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox)
    meiro_sandbox.sandbox.configure(limits={"*": RateLimit(1, 60)}, faults=FaultSpec(drop=0.0))
    token = await meiro_sandbox.login()
    assert (await meiro_sandbox.request("GET", "push_notifications/trash", token=token)).status == 200
    assert (await meiro_sandbox.request("GET", "push_notifications/trash", token=token)).status == 429


async def test_an_export_that_has_ended_cannot_be_canceled(meiro_sandbox: Any) -> None:
    _seed(meiro_sandbox, exports=2)
    meiro_sandbox.sandbox.state.add_export(NID, status="error", total=5)
    token = await meiro_sandbox.login()

    async def delete(eid: int) -> Any:
        return await meiro_sandbox.request("DELETE", f"push_notifications/{NID}/exports/{eid}", token=token)

    error = await delete(3)
    assert (error.status, error.body) == (400, {"message": "Export with status error cannot be canceled"})
    assert (await delete(1)).status == 200
    twice = await delete(1)
    assert (twice.status, twice.body) == (400, {"message": "Export with status canceled cannot be canceled"})
    # an export seeded to fail, polled until it has: refused too, its state unchanged
    meiro_sandbox.sandbox.state.add_export(NID, outcome="error", waiting=0, running=1, export_id=9)
    get = await meiro_sandbox.request("GET", f"push_notifications/{NID}/exports/9", token=token)
    assert get.body["push_notification_export"]["status"] == "error"
    assert (await delete(9)).status == 400
    assert meiro_sandbox.sandbox.state.notifications[NID].exports[9].status == "error"
    assert meiro_sandbox.sandbox.stats.applied("cancelExport") == 1


async def test_a_cancel_can_take_a_while_to_stop_the_export(meiro_sandbox_factory: Any) -> None:
    running = await meiro_sandbox_factory(cancel_delay=2, waiting=0, running=10)
    _seed(running, total=100)
    token = await running.login()
    path = f"push_notifications/{NID}/exports/1"
    assert (await running.request("GET", path, token=token)).body["push_notification_export"]["status"] == (
        "running"
    )
    accepted = await running.request("DELETE", path, token=token)
    assert accepted.status == 200
    assert accepted.body["push_notification_export"]["status"] == "running"  # accepted, not yet stopped
    again = await running.request("DELETE", path, token=token)  # a second cancel while it stops: same answer
    assert again.status == 200 and again.body["push_notification_export"]["status"] == "running"
    seen = []
    for _ in range(3):
        export = (await running.request("GET", path, token=token)).body["push_notification_export"]
        seen.append((export["status"], export["message_counts"]["sent"]))
    assert seen == [("running", 10), ("canceled", 10), ("canceled", 10)]  # stopped: nothing more sent
    assert "canceled" in export["stats"]["statuses_history"]
    assert running.sandbox.stats.applied("cancelExport") == 1


async def test_max_limit_caps_pages_and_echoes_the_cap(meiro_sandbox_factory: Any) -> None:
    running = await meiro_sandbox_factory(max_limit=10)
    _seed(running, exports=25)
    state = running.sandbox.state
    for i in range(23):
        running.clock.advance(1)
        state.add_notification(f"Trashed {i}", trashed=True)
    token = await running.login()
    asked = await running.request(
        "GET", f"push_notifications/{NID}/exports", token=token, params={"limit": "50", "offset": "20"}
    )
    assert len(asked.body["push_notification_exports"]) == 5
    assert asked.body["selection_settings"] == {"limit": 10, "offset": 20}
    default = await running.request("GET", f"push_notifications/{NID}/exports", token=token)
    assert len(default.body["push_notification_exports"]) == 10  # the default 20 is capped too
    assert default.body["selection_settings"] == {"limit": 10, "offset": None}
    trash = await running.request("GET", "push_notifications/trash", token=token, params={"limit": "100"})
    assert len(trash.body["trashed_push_notifications"]) == 10
    assert trash.body["selection_settings"] == {"limit": 10, "offset": 0, "searched_text": None}
    small = await running.request("GET", "push_notifications/trash", token=token, params={"limit": "3"})
    assert small.body["selection_settings"]["limit"] == 3  # below the cap: as asked


@pytest.mark.parametrize(
    "bad", [{"max_limit": 0}, {"max_limit": "10"}, {"cancel_delay": -1}, {"cancel_delay": True}]
)
def test_sandbox_settings_for_the_cap_and_the_cancel_delay_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        MeiroSandboxConfig.from_mapping(bad)
    config = MeiroSandboxConfig.from_mapping({"max_limit": 10, "cancel_delay": 1.5})
    assert (config.max_limit, config.cancel_delay) == (10, 1.5)


async def test_an_export_id_or_a_count_in_other_digits_is_refused_not_a_crash(meiro_sandbox: Any) -> None:
    # "²" passed str.isdigit() and int() raised: a 500 with a text page, not Meiro's {"message"}; "١٠٠"
    # (Arabic-Indic digits) was read as export 100, and limit=٣ as 3.
    _seed(meiro_sandbox, exports=3)
    token = await meiro_sandbox.login()
    for raw in ("%C2%B2", "%D9%A1"):
        reply = await meiro_sandbox.request("GET", f"push_notifications/{NID}/exports/{raw}", token=token)
        assert (reply.status, reply.body) == (404, {"message": "Push notification export not found"})
    for params in ({"limit": "٣"}, {"offset": "²"}, {"limit": "+3"}):
        listed = await meiro_sandbox.request(
            "GET", f"push_notifications/{NID}/exports", token=token, params=params
        )
        assert listed.status == 400 and listed.body["message"].endswith("must be a non-negative integer")
