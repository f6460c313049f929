"""The NotifyVisitors sandbox: both auth modes, the documented limits and formats, the envelope, per-family rate
limits with X-RateLimit-Remaining, seeded faults, stats and inspection — over real HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest_notifyvisitors import NV_BRAND_ID, NvFactory, RunningNotifyVisitors
from sandbox_fixtures import start_sandbox_process, stop_sandbox_process

from sync.cli import main
from sync.sandboxes._core import FaultSpec, RateLimit


class FakeClock:
    """A settable clock for the sandbox's rate windows: tests move time instead of sleeping."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def users(n: int, **attrs: Any) -> dict[str, Any]:
    return {"nv": [{"userID": f"u{i}", "user_attributes": {"name": f"User {i}", **attrs}} for i in range(n)]}


def events(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "nv": [
            {"userID": f"u{i % 7}", "event_name": "purchase", "attributes": {"amount": i}, **extra}
            for i in range(n)
        ]
    }


async def test_user_create_in_api_key_mode_stores_users_and_answers_the_envelope(
    nv_sandbox: RunningNotifyVisitors,
) -> None:
    body = {
        "nv": [
            {
                "userID": "1234",
                "user_attributes": {
                    "name": "John",
                    "email": "john@example.test",
                    "mobile": "+919899999999",
                    "birth_date": "1990-02-28",
                    "email_opt_in": "1",
                    "sms_opt_in": "0",
                    "score": 7.5,
                },
            }
        ]
    }
    reply = await nv_sandbox.post("user/create", body)
    assert reply.status == 200
    assert reply.envelope["status"] == "success" and reply.envelope["message"] == "success"
    assert reply.envelope["data"] == {"created": 1, "updated": 0}
    assert reply.headers["X-RateLimit-Remaining"] == "99"  # User API: 100 per minute
    assert nv_sandbox.sandbox.state.users["1234"]["mobile"] == "+919899999999"
    # Given keys are overwritten, the others kept.
    again = await nv_sandbox.post(
        "user/create", {"nv": [{"userID": "1234", "user_attributes": {"name": "Jo"}}]}
    )
    assert again.envelope["data"] == {"created": 0, "updated": 1}
    assert nv_sandbox.sandbox.state.users["1234"]["name"] == "Jo"
    assert nv_sandbox.sandbox.state.users["1234"]["email"] == "john@example.test"


async def test_bearer_mode_is_accepted(nv_sandbox: RunningNotifyVisitors) -> None:
    reply = await nv_sandbox.post("user/create", users(2), auth="bearer")
    assert reply.status == 200 and reply.envelope["status"] == "success"
    assert set(nv_sandbox.sandbox.state.users) == {"u0", "u1"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": "wrong", "x-brand-id": NV_BRAND_ID},
        {"x-api-key": "nv-test-api-key-0123456789"},  # brand missing
        {"x-api-key": "nv-test-api-key-0123456789", "x-brand-id": "1"},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": "Basic bnY6bnY="},
    ],
    ids=["none", "wrong-key", "no-brand", "wrong-brand", "wrong-token", "basic"],
)
async def test_bad_auth_is_401_in_the_envelope_and_changes_nothing(
    nv_sandbox: RunningNotifyVisitors, headers: dict[str, str]
) -> None:
    reply = await nv_sandbox.post("user/create", users(1), auth="none", headers=headers)
    assert reply.status == 401
    assert reply.envelope == {"data": {}, "message": "invalid auth", "status": "error"}
    assert nv_sandbox.sandbox.state.users == {}


async def test_bearer_is_refused_when_no_token_is_configured(nv_sandbox_factory: NvFactory) -> None:
    running = await nv_sandbox_factory(bearer_token=None)
    assert (await running.post("user/create", users(1), auth="bearer")).status == 401
    assert (await running.post("user/create", users(1))).status == 200


async def test_batch_size_limits(nv_sandbox: RunningNotifyVisitors) -> None:
    assert (await nv_sandbox.post("user/create", users(100))).status == 200
    too_many = await nv_sandbox.post("user/create", users(101))
    assert too_many.status == 400
    assert "at most 100 users" in too_many.envelope["message"]
    assert len(nv_sandbox.sandbox.state.users) == 100
    assert (await nv_sandbox.post("event/create", events(1000))).status == 200
    too_many_events = await nv_sandbox.post("event/create", events(1001))
    assert too_many_events.status == 400 and "at most 1000 events" in too_many_events.envelope["message"]
    assert len(nv_sandbox.sandbox.state.events) == 1000


async def test_events_are_recorded_with_their_time(nv_sandbox: RunningNotifyVisitors) -> None:
    body = {
        "nv": [
            {
                "userID": "u1",
                "event_name": "Purchase",
                "attributes": {"sku": "A1"},
                "event_time": "2024-01-31 23:59:59",
            },
            {"userID": "u1", "event_name": "purchase"},  # names are case-sensitive: a different event
        ]
    }
    reply = await nv_sandbox.post("event/create", body)
    assert reply.status == 200 and reply.envelope["data"] == {"events": 2}
    assert reply.headers["X-RateLimit-Remaining"] == "499"  # Event API: 500 per minute
    first, second = nv_sandbox.sandbox.state.events
    assert (first.name, first.event_time, dict(first.attributes)) == (
        "Purchase",
        "2024-01-31 23:59:59",
        {"sku": "A1"},
    )
    assert (second.name, second.event_time) == ("purchase", None)


GOOD_USER: dict[str, Any] = {"userID": "x", "user_attributes": {"name": "n"}}


@pytest.mark.parametrize(
    ("endpoint", "item", "where"),
    [
        ("user/create", {"userID": "u" * 101, "user_attributes": {}}, "nv[1].userID"),
        ("user/create", {"userID": "", "user_attributes": {}}, "nv[1].userID"),
        ("user/create", {"userID": 12, "user_attributes": {}}, "nv[1].userID"),
        ("user/create", {"userID": "ok"}, "nv[1].user_attributes"),
        ("user/create", {"userID": "ok", "user_attributes": {"a" * 50: "v"}}, "attribute name"),
        (
            "user/create",
            {"userID": "ok", "user_attributes": {"bio": "x" * 1000}},
            "nv[1].user_attributes.bio",
        ),
        ("user/create", {"userID": "ok", "user_attributes": {"mobile": "9899999999"}}, "mobile"),
        ("user/create", {"userID": "ok", "user_attributes": {"mobile": "+91 98999 99999"}}, "mobile"),
        ("user/create", {"userID": "ok", "user_attributes": {"birth_date": "28/02/1990"}}, "birth_date"),
        ("user/create", {"userID": "ok", "user_attributes": {"birth_date": "1990-02-30"}}, "birth_date"),
        ("user/create", {"userID": "ok", "user_attributes": {"email_opt_in": "yes"}}, "email_opt_in"),
        ("user/create", {"userID": "ok", "user_attributes": {"sms_opt_in": 1}}, "sms_opt_in"),
        ("user/create", {"userID": "ok", "user_attributes": {"email": "not-an-address"}}, "email"),
        ("user/create", {"userID": "ok", "user_attributes": {"tags": ["a"]}}, "tags"),
        ("event/create", {"userID": "ok", "event_name": "e" * 50}, "nv[1].event_name"),
        ("event/create", {"userID": "ok"}, "nv[1].event_name"),
        (
            "event/create",
            {"userID": "ok", "event_name": "e", "event_time": "2024-01-31T10:00:00"},
            "event_time",
        ),
        ("event/create", {"userID": "ok", "event_name": "e", "event_time": "2024-01-31 10:00"}, "event_time"),
        (
            "event/create",
            {"userID": "ok", "event_name": "e", "attributes": {"v": "x" * 1000}},
            "attributes.v",
        ),
    ],
)
async def test_documented_rules_refuse_the_whole_request_with_400(
    nv_sandbox: RunningNotifyVisitors, endpoint: str, item: dict[str, Any], where: str
) -> None:
    first = GOOD_USER if endpoint == "user/create" else {"userID": "x", "event_name": "fine"}
    reply = await nv_sandbox.post(endpoint, {"nv": [first, item]})
    assert reply.status == 400
    assert reply.envelope["status"] == "error"
    assert reply.envelope["message"].startswith("invalid resource: ") and where in reply.envelope["message"]
    # All or nothing: the good first item was not applied either.
    assert nv_sandbox.sandbox.state.users == {} and nv_sandbox.sandbox.state.events == []


@pytest.mark.parametrize("attributes", [[], "", 0, False, ["sku", "A1"]])
async def test_event_attributes_that_are_not_an_object_are_refused(
    nv_sandbox: RunningNotifyVisitors, attributes: Any
) -> None:
    """A falsy non-object was read as "no attributes" and the event recorded."""
    item = {"userID": "ok", "event_name": "e", "attributes": attributes}
    reply = await nv_sandbox.post("event/create", {"nv": [item]})
    assert reply.status == 400
    assert reply.envelope["message"] == "invalid resource: nv[0].attributes: must be an object"
    assert nv_sandbox.sandbox.state.events == []
    # Absent or null still means none.
    for event in (
        {"userID": "ok", "event_name": "e"},
        {"userID": "ok", "event_name": "e", "attributes": None},
    ):
        assert (await nv_sandbox.post("event/create", {"nv": [event]})).status == 200


async def test_values_at_the_documented_bounds_are_accepted(nv_sandbox: RunningNotifyVisitors) -> None:
    item = {"userID": "u" * 100, "user_attributes": {"a" * 49: "x" * 999, "mobile": "+14155550123"}}
    assert (await nv_sandbox.post("user/create", {"nv": [item]})).status == 200
    event = {"userID": "u", "event_name": "e" * 49, "attributes": {"b" * 49: "y" * 999}}
    assert (await nv_sandbox.post("event/create", {"nv": [event]})).status == 200


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "not valid JSON"),
        # Python's json module reads these; no JSON parser (the platform's) does
        ('{"nv": [{"userID": "u", "user_attributes": {"score": NaN}}]}', "not valid JSON"),
        ('{"nv": [{"userID": "u", "user_attributes": {"score": -Infinity}}]}', "not valid JSON"),
        ('{"users": []}', 'expected {"nv": [...]}'),
        ('{"nv": []}', "is empty"),
    ],
)
async def test_malformed_bodies(nv_sandbox: RunningNotifyVisitors, data: str, message: str) -> None:
    reply = await nv_sandbox.post("user/create", data=data)
    assert reply.status == 400 and message in reply.envelope["message"]
    assert nv_sandbox.sandbox.state.users == {}


async def test_unknown_url_is_404_and_wrong_method_405(nv_sandbox: RunningNotifyVisitors) -> None:
    missing = await nv_sandbox.post("user/delete", users(1))
    assert missing.status == 404 and missing.envelope == {
        "data": {},
        "message": "invalid URL",
        "status": "error",
    }
    wrong = await nv_sandbox.request("GET", nv_sandbox.url + "user/create", headers=nv_sandbox.auth_headers())
    assert wrong.status == 405 and wrong.envelope["status"] == "error"


async def test_errors_in_body_mode_answers_200_with_status_error(nv_sandbox_factory: NvFactory) -> None:
    running = await nv_sandbox_factory(errors_in_body=True)
    reply = await running.post("user/create", users(101))
    assert reply.status == 200
    assert reply.envelope["status"] == "error" and "at most 100 users" in reply.envelope["message"]
    assert (await running.post("user/create", users(1), auth="none")).status == 401  # auth stays a 401


async def test_rate_limits_per_family_default_to_the_documented_ones(nv_sandbox_factory: NvFactory) -> None:
    clock = FakeClock(1_800_000_000.0)  # a minute boundary
    running = await nv_sandbox_factory(clock=clock)
    remaining = [
        int((await running.post("user/create", users(1))).headers["X-RateLimit-Remaining"])
        for _ in range(100)
    ]
    assert remaining == list(range(99, -1, -1))
    limited = await running.post("user/create", users(1))
    assert limited.status == 429
    assert limited.envelope == {"data": {}, "message": "rate limit exceeded", "status": "error"}
    assert limited.headers["X-RateLimit-Remaining"] == "0"
    assert "Retry-After" not in limited.headers  # only X-RateLimit-Remaining is documented
    # The Event family has its own quota.
    assert (await running.post("event/create", events(1))).headers["X-RateLimit-Remaining"] == "499"
    clock.now += 60  # next minute: the User quota is back
    assert (await running.post("user/create", users(1))).headers["X-RateLimit-Remaining"] == "99"
    stats = running.sandbox.stats.snapshot()
    assert stats["rate_limited"] == {"user/create": 1}
    assert stats["max_in_window"]["user"]["max"] == 100
    assert running.sandbox.config.limits["campaign"] == RateLimit(500, 60.0)
    assert running.sandbox.config.limits["reporting"] == RateLimit(50, 60.0)


async def test_limits_can_be_changed_or_turned_off(nv_sandbox_factory: NvFactory) -> None:
    clock = FakeClock(1_800_000_000.0)
    off = await nv_sandbox_factory(clock=clock, limits={})
    reply = await off.post("user/create", users(1))
    assert reply.status == 200 and "X-RateLimit-Remaining" not in reply.headers
    running = await nv_sandbox_factory(clock=clock, retry_after_header=True)
    changed = await running.inspect("POST", "config", {"limits": {"user": {"requests": 2, "window": 10}}})
    assert changed.status == 200 and changed.body["limits"] == {"user": {"requests": 2, "window": 10.0}}
    statuses = [(await running.post("user/create", users(1))).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    limited = await running.post("user/create", users(1))
    assert limited.headers["Retry-After"] == "10"  # opted in with retry_after_header
    # event/create has no limit any more (the new document replaced every limit)
    assert "X-RateLimit-Remaining" not in (await running.post("event/create", events(1))).headers


async def test_seeded_faults_answer_5xx_in_the_envelope_deterministically(
    nv_sandbox_factory: NvFactory,
) -> None:
    spec = FaultSpec(error_500=0.3, error_503=0.2, applied_then_500=0.2)
    first = await nv_sandbox_factory(limits={}, faults=spec.to_dict(), seed=7)
    second = await nv_sandbox_factory(limits={}, faults=spec.to_dict(), seed=7)
    seq_a = [(await first.post("user/create", users(1))).status for _ in range(30)]
    seq_b = [(await second.post("user/create", users(1))).status for _ in range(30)]
    assert seq_a == seq_b
    assert {200, 500, 503} <= set(seq_a)
    reply = None
    for _ in range(30):
        reply = await first.post("user/create", users(1))
        if reply.status == 500:
            break
    assert reply is not None and reply.status == 500
    assert reply.envelope["status"] == "error"
    stats = first.sandbox.stats.snapshot()
    assert sum(stats["faults"].values()) == stats["requests"]["user/create"].get("500", 0) + stats[
        "requests"
    ]["user/create"].get("503", 0)


async def test_applied_then_500_applies_the_change(nv_sandbox_factory: NvFactory) -> None:
    running = await nv_sandbox_factory(limits={}, faults={"applied_then_500": 1.0})
    reply = await running.post("user/create", users(3))
    assert reply.status == 500 and reply.envelope["status"] == "error"
    assert set(running.sandbox.state.users) == {"u0", "u1", "u2"}
    assert running.sandbox.stats.applied("user/create") == 3


async def test_inspection_routes(nv_sandbox: RunningNotifyVisitors) -> None:
    await nv_sandbox.post("user/create", users(2))
    await nv_sandbox.post("event/create", events(3))
    stats = (await nv_sandbox.inspect("GET", "stats")).body
    assert stats["requests"] == {"event/create": {"200": 1}, "user/create": {"200": 1}}
    assert stats["applied"] == {"event/create": 3, "user/create": 2}
    state = (await nv_sandbox.inspect("GET", "state")).body
    assert [u["userID"] for u in state["users"]] == ["u0", "u1"]
    assert len(state["events"]) == 3 and state["events"][0]["event_name"] == "purchase"
    parquet = await nv_sandbox.request(
        "GET", f"{nv_sandbox.root_url}/_sandbox/state?format=parquet&table=events"
    )
    assert parquet.status == 200
    assert (await nv_sandbox.inspect("POST", "reset")).status == 200
    assert nv_sandbox.sandbox.state.users == {} and nv_sandbox.sandbox.stats.snapshot()["requests_total"] == 0


async def test_seed_file_loads_users(nv_sandbox_factory: NvFactory, tmp_path: Any) -> None:
    path = tmp_path / "seed.json"
    path.write_text('{"users": [{"userID": "s1", "user_attributes": {"name": "Seed"}}]}', encoding="utf-8")
    running = await nv_sandbox_factory(seed_file=str(path))
    assert running.sandbox.state.users == {"s1": {"name": "Seed"}}


async def test_cli_runs_the_sandbox_until_sigterm() -> None:
    process, url = start_sandbox_process(
        "notifyvisitors",
        "--api-key",
        "cli-key-123456",
        "--brand-id",
        "77",
        "--bearer-token",
        "cli-token-123456",
    )
    try:
        assert url.endswith("/api/v1/")
        async with aiohttp.ClientSession() as session:
            body = json.dumps(users(1))
            for headers in (
                {"x-api-key": "cli-key-123456", "x-brand-id": "77"},
                {"Authorization": "Bearer cli-token-123456"},
            ):
                async with session.post(url + "user/create", data=body, headers=headers) as resp:
                    assert resp.status == 200 and resp.headers["X-RateLimit-Remaining"] in ("99", "98")
    finally:
        assert stop_sandbox_process(process) == 0


@pytest.mark.parametrize(
    ("seed", "message"),
    [
        (
            {"users": [{"user_attributes": {}}]},
            "an entry lacks 'userID'",
        ),  # was "problem(s) in job file: 'userID'"
        ({"exports": []}, "unknown seed sections ['exports']"),  # was an empty sandbox, without a word
    ],
)
def test_a_bad_seed_file_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: Any, message: str
) -> None:
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(seed), encoding="utf-8")
    assert main(["sandbox", "notifyvisitors", "--port", "0", "--seed-file", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"pushsync: error: {path}: {message}")
    assert "job file" not in captured.err and captured.out == ""
