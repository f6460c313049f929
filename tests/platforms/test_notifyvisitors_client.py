"""The NotifyVisitors request builders (pure) and connector (against the real local sandbox)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest_notifyvisitors import NV_API_KEY, NV_BRAND_ID, NV_TOKEN, NvFactory, RunningNotifyVisitors
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sync.config import Destination, Job, RateBudgetSpec, RetryPolicy, load_job
from sync.errors import BadJobError, ExitCode, FatalPlatformError, RejectedBatchError, RetryableError
from sync.ledger.ledger import Ledger
from sync.platforms.base import PlatformClient
from sync.platforms.notifyvisitors import EVENT_CREATE, USER_CREATE
from sync.platforms.notifyvisitors.client import AuthMode, NotifyVisitorsClient, envelope_of
from sync.platforms.notifyvisitors.requests import (
    event_item,
    format_date,
    format_event_time,
    format_mobile,
    iter_batches,
    make_batch,
    opt_in_flag,
    split_batch,
    user_attributes,
    user_create_body,
    user_item,
)
from sync.records import Batch, Operation, RowRef, body_json
from sync.run import RunOptions, run
from sync.sandboxes._core import start_app

# --- request builders --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+919899999999", "+919899999999"),
        ("+1 (415) 555-0123", "+14155550123"),
        ("0044 20 7946 0958", "+442079460958"),
        ("+49.30.1234567", "+49301234567"),
    ],
)
def test_format_mobile_normalises_to_e164(raw: str, expected: str) -> None:
    assert format_mobile(raw) == expected


@pytest.mark.parametrize(
    "raw", ["9899999999", "+0123456789", "+12", "+1234567890123456", "+91abc99999999", ""]
)
def test_format_mobile_refuses_what_is_not_e164(raw: str) -> None:
    with pytest.raises(ValueError, match=r"E\.164"):
        format_mobile(raw)


def test_dates_times_and_flags() -> None:
    assert format_date(date(1990, 2, 28)) == "1990-02-28"
    assert format_date("1990-02-28") == "1990-02-28"
    with pytest.raises(ValueError):
        format_date("28/02/1990")
    ist = timezone(timedelta(hours=5, minutes=30))
    assert format_event_time(datetime(2024, 1, 31, 17, 30, 5, tzinfo=ist)) == "2024-01-31 12:00:05"
    assert format_event_time(datetime(2024, 1, 31, 17, 30, 5)) == "2024-01-31 17:30:05"
    assert format_event_time("2024-01-31T17:30:05") == "2024-01-31 17:30:05"
    with pytest.raises(ValueError):
        format_event_time("2024-01-31 17:30")
    assert [opt_in_flag(v) for v in (True, False, "yes", "0", 1, "TRUE")] == ["1", "0", "1", "0", "1", "1"]
    with pytest.raises(ValueError):
        opt_in_flag("maybe")


async def test_years_before_1000_are_written_in_four_digits(
    nv_sandbox: RunningNotifyVisitors, tmp_path: Path
) -> None:
    # strftime wrote year 999 as "999-01-01", which is not yyyy-MM-dd: the platform refused the row with "must
    # be yyyy-MM-dd HH:mm:ss" though its date was a real one (a typo such as 0999 for 1999 is, too) — audit.
    assert format_date(date(999, 1, 1)) == "0999-01-01"
    assert format_event_time(datetime(999, 1, 1, 1, 2, 3, tzinfo=UTC)) == "0999-01-01 01:02:03"
    (tmp_path / "u.csv").write_text("id,born\nU1,0999-03-04\n", encoding="utf-8")
    (tmp_path / "e.csv").write_text("id,event,when\nU1,signup,0999-03-04 05:06:07\n", encoding="utf-8")
    (tmp_path / "job.yaml").write_text(
        f"""
version: 1
name: nv-old-years
destination:
  platform: notifyvisitors
  base_url: {nv_sandbox.url}
  secret: {{env: NV_TEST_KEY}}
  extra: {{brand_id: "{NV_BRAND_ID}", event_time_zone: UTC}}
defaults: {{ext_id: id}}
validation: {{timezone: UTC}}
sources:
  - {{name: users, path: u.csv, attributes: {{born: {{attribute: birth_date, type: date}}}}}}
  - name: events
    kind: events
    path: e.csv
    event: event
    attributes: {{when: {{attribute: event_time, type: date}}}}
""",
        encoding="utf-8",
    )
    outcome = await run(load_job(tmp_path / "job.yaml"), RunOptions(api_key=NV_API_KEY))
    assert outcome.exit_code is ExitCode.OK
    state = nv_sandbox.sandbox.state
    assert state.users == {"U1": {"birth_date": "0999-03-04"}}
    assert [e.event_time for e in state.events] == ["0999-03-04 05:06:07"]
    # The sandbox reads yyyy as four digits, as the platform does: 999-03-04 is not a yyyy-MM-dd date.
    for when, status in (("0999-03-04 05:06:07", 200), ("999-03-04 05:06:07", 400)):
        event = {"userID": "U1", "event_name": "e", "event_time": when}
        assert (await nv_sandbox.post("event/create", {"nv": [event]})).status == status


async def test_a_user_id_over_100_characters_is_a_rejected_row_found_by_the_plan(
    nv_sandbox: RunningNotifyVisitors, tmp_path: Path
) -> None:
    # validation.max_id_length defaults to 256: a 101-character ID was sent, refused by the platform and
    # isolated by halving its request (audit); it is the row's own fault, so the plan finds it.
    long_id = "L" * 101
    (tmp_path / "u.csv").write_text(f"id,name\nU1,Ada\n{long_id},Bob\n", encoding="utf-8")
    (tmp_path / "e.csv").write_text(
        f"id,event,when\n{long_id},signup,2024-05-01 10:00:00\nU1,signup,2024-05-01 10:00:00\n",
        encoding="utf-8",
    )
    (tmp_path / "job.yaml").write_text(
        f"""
version: 1
name: nv-long-ids
destination:
  platform: notifyvisitors
  base_url: {nv_sandbox.url}
  secret: {{env: NV_TEST_KEY}}
  extra: {{brand_id: "{NV_BRAND_ID}"}}
defaults: {{ext_id: id}}
sources:
  - {{name: users, path: u.csv, attributes: {{name: string}}}}
  - name: events
    kind: events
    path: e.csv
    event: event
    attributes: {{when: {{attribute: event_time, type: date}}}}
""",
        encoding="utf-8",
    )
    outcome = await run(load_job(tmp_path / "job.yaml"), RunOptions(api_key=NV_API_KEY))
    assert outcome.exit_code is ExitCode.PARTIAL
    assert outcome.summary.ids_rejected == 0  # nothing refused by the platform: nothing sent for them
    assert list(nv_sandbox.sandbox.state.users) == ["U1"]
    assert [e.user_id for e in nv_sandbox.sandbox.state.events] == ["U1"]
    with Ledger.open(outcome.ledger_path) as ledger:
        rejected = sorted(
            (Path(r.path).name, r.row, r.column, r.reason) for r in ledger.rejected_rows(outcome.run_id)
        )
    reason = "userID is 101 characters long: NotifyVisitors takes at most 100"
    assert rejected == [("e.csv", 1, "id", reason), ("u.csv", 2, "id", reason)]


def test_user_attributes_format_the_documented_fields() -> None:
    attrs = user_attributes(
        {
            "email": "a@example.test",
            "mobile": "+91 98999 99999",
            "birth_date": date(1990, 2, 28),
            "email_opt_in": True,
            "sms_opt_in": "no",
            "age": 34.0,
            "city": None,
        }
    )
    assert attrs == {
        "email": "a@example.test",
        "mobile": "+919899999999",
        "birth_date": "1990-02-28",
        "email_opt_in": "1",
        "sms_opt_in": "0",
        "age": 34,
    }
    with pytest.raises(ValueError, match="fewer than 50"):
        user_attributes({"a" * 50: 1})
    with pytest.raises(ValueError, match="fewer than 1000"):
        user_attributes({"bio": "x" * 1000})
    with pytest.raises(ValueError, match="userID"):
        user_item("u" * 101, {})
    with pytest.raises(ValueError, match="event name"):
        event_item("u", "e" * 50)


def test_iter_batches_respects_the_per_endpoint_limits() -> None:
    users = ((user_item(f"u{i}", {"n": i}), RowRef("users.csv", i + 1)) for i in range(250))
    batches = list(iter_batches(USER_CREATE, users))
    assert [len(body_json(b)["nv"]) for b in batches] == [100, 100, 50]
    assert all(b.operation is Operation.SET_ATTRIBUTES for b in batches)
    assert batches[0].origins["u5"] == RowRef("users.csv", 6)
    evs = ((event_item(f"u{i % 10}", "purchase", {"i": i}, "2024-01-01 00:00:00"), None) for i in range(2500))
    ebatches = list(iter_batches(EVENT_CREATE, evs))
    assert [len(body_json(b)["nv"]) for b in ebatches] == [1000, 1000, 500]
    assert (
        ebatches[0].ext_ids == tuple(f"u{i}" for i in range(10))
        and ebatches[0].operation is Operation.FIRE_EVENTS
    )
    with pytest.raises(ValueError):
        list(iter_batches(USER_CREATE, iter([]), batch_size=101))
    with pytest.raises(ValueError):
        make_batch(USER_CREATE, {"nv": [user_item(f"u{i}", {}) for i in range(101)]})


def test_batch_ids_are_stable_and_split_halves_the_items_in_order() -> None:
    body = {"nv": [event_item(u, "e", {"k": i}) for i, u in enumerate("aabbcd")]}
    batch = make_batch(EVENT_CREATE, body, origins={"a": RowRef("f", 1), "c": RowRef("f", 5)})
    assert batch.batch_id == make_batch(EVENT_CREATE, body).batch_id
    assert batch.ext_ids == ("a", "b", "c", "d")
    halves = split_batch(batch)
    assert halves is not None
    first, second = halves
    assert [i["userID"] for i in body_json(first)["nv"]] == ["a", "a", "b"]
    assert [i["userID"] for i in body_json(second)["nv"]] == ["b", "c", "d"]
    assert dict(first.origins) == {"a": RowRef("f", 1)} and dict(second.origins) == {"c": RowRef("f", 5)}
    assert first.batch_id != batch.batch_id
    single = make_batch(USER_CREATE, user_create_body([("x", {"a": 1})]))
    assert split_batch(single) is None


@given(users=st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=60))
def test_splitting_down_to_single_items_keeps_every_item_and_its_row_in_order(users: list[str]) -> None:
    items = [event_item(u, "e", {"n": i}) for i, u in enumerate(users)]
    rows = [RowRef("events.csv", i + 1) for i in range(len(items))]
    pending = [make_batch(EVENT_CREATE, {"nv": items}, rows=rows)]
    leaves = []
    while pending:  # as the dispatcher does: a stack, the first half on top
        batch = pending.pop()
        halves = split_batch(batch)
        if halves is None:
            assert len(body_json(batch)["nv"]) == 1
            leaves.append(batch)
        else:
            pending.extend(reversed(halves))
    # Every item once, in the original order, each naming its own row.
    assert [body_json(leaf)["nv"][0] for leaf in leaves] == items
    assert [leaf.origins[leaf.ext_ids[0]] for leaf in leaves] == rows


# --- the connector ------------------------------------------------------------------------------------------


def raw_batch(endpoint: str, items: list[dict[str, Any]]) -> Batch:
    """A batch built without the builders' checks, to send what the platform must refuse."""
    ids = tuple(dict.fromkeys(i["userID"] for i in items))
    return Batch(f"raw-{len(items)}", endpoint, Operation.SET_ATTRIBUTES, {"nv": items}, ids)


def good_users(n: int) -> Batch:
    return make_batch(USER_CREATE, user_create_body((f"u{i}", {"name": f"N{i}"}) for i in range(n)))


async def test_client_satisfies_the_protocol_and_sends_in_both_auth_modes(
    nv_sandbox: RunningNotifyVisitors,
) -> None:
    async with nv_sandbox.client() as client:
        assert isinstance(client, PlatformClient) and client.auth is AuthMode.API_KEY
        outcome = await client.send(good_users(3))
    assert outcome.http_status == 200 and outcome.remaining == 99
    assert envelope_of(outcome.body) == ("success", "success", {"created": 3, "updated": 0})
    async with nv_sandbox.client(auth="bearer") as bearer:
        events = make_batch(EVENT_CREATE, {"nv": [event_item("u1", "login", None, "2024-05-01 10:00:00")]})
        assert (await bearer.send(events)).remaining == 499
    assert len(nv_sandbox.sandbox.state.users) == 3 and nv_sandbox.sandbox.state.events[0].name == "login"


async def test_bad_credentials_are_fatal_and_never_leak(nv_sandbox: RunningNotifyVisitors) -> None:
    wrong_key = "wrong-api-key-abcdef"
    client = NotifyVisitorsClient(nv_sandbox.destination(), wrong_key, timeout=5)
    with pytest.raises(FatalPlatformError) as info:
        await client.send(good_users(1))
    await client.aclose()
    assert info.value.status == 401 and "invalid auth" in str(info.value)
    assert wrong_key not in str(info.value) and NV_API_KEY not in str(info.value)
    with pytest.raises(ValueError, match="brand_id"):
        NotifyVisitorsClient(Destination("notifyvisitors", nv_sandbox.url), NV_API_KEY)
    bearer = NotifyVisitorsClient(nv_sandbox.destination(auth="bearer"), NV_TOKEN + "x", timeout=5)
    with pytest.raises(FatalPlatformError):
        await bearer.send(good_users(1))
    await bearer.aclose()


async def test_refusals_as_400_or_inside_a_200_are_rejected_batches(nv_sandbox_factory: NvFactory) -> None:
    bad = raw_batch(USER_CREATE, [{"userID": "u1", "user_attributes": {"mobile": "12345"}}])
    for errors_in_body, status in ((False, 400), (True, 200)):
        running = await nv_sandbox_factory(errors_in_body=errors_in_body)
        async with running.client() as client:
            with pytest.raises(RejectedBatchError) as info:
                await client.send(bad)
        assert info.value.status == status and "mobile" in info.value.message


async def test_splitting_isolates_the_refused_users(nv_sandbox_factory: NvFactory) -> None:
    running = await nv_sandbox_factory(errors_in_body=True)
    # u5's number is not E.164: the one user the platform refuses
    items: list[dict[str, Any]] = [
        {"userID": f"u{i}", "user_attributes": {"mobile": "555-0100" if i == 5 else "+14155550100"}}
        for i in range(8)
    ]
    pending = [raw_batch(USER_CREATE, items)]
    refused: list[str] = []
    async with running.client() as client:
        while pending:
            part = pending.pop()
            try:
                await client.send(part)
            except RejectedBatchError:
                halves = client.split(part)
                if halves is None:
                    refused.extend(part.ext_ids)
                else:
                    pending.extend(halves)
    assert refused == ["u5"]
    assert sorted(running.sandbox.state.users) == sorted(f"u{i}" for i in range(8) if i != 5)


async def test_nothing_left_in_a_minute_that_ended_before_the_answer_does_not_pause_the_next(
    nv_sandbox_factory: NvFactory,
) -> None:
    """``X-RateLimit-Remaining: 0`` on the answer to a minute's last request, arriving after that minute's end:
    the client asked to wait for the end of the minute the answer came in — a whole minute of the budget lost.
    Only an answer within the minute it was sent in asks for a wait now."""
    from sync.platforms.notifyvisitors.client import NotifyVisitorsClient

    outcomes = []
    for sent, answered in ((119.9, 120.2), (130.0, 130.1)):  # across a minute's end; within one
        running = await nv_sandbox_factory(limits={"user": {"requests": 1, "window": 3600}})
        times = iter([sent, answered, answered])
        client = NotifyVisitorsClient(
            running.destination(), NV_API_KEY, timeout=5.0, wall_clock=times.__next__
        )
        async with client:
            outcomes.append(await client.send(good_users(1)))
    crossed, within = outcomes
    assert crossed.remaining == 0 and crossed.reset_after is None
    assert within.remaining == 0 and within.reset_after is not None and 0 < within.reset_after <= 61


async def test_429_is_retryable_with_remaining(nv_sandbox_factory: NvFactory) -> None:
    running = await nv_sandbox_factory(limits={"user": {"requests": 1, "window": 3600}})
    async with running.client() as client:
        first = await client.send(good_users(1))
        with pytest.raises(RetryableError) as info:
            await client.send(good_users(1))
    # Nothing left this minute: both say how long until the platform's minute resets (no Retry-After sent).
    assert first.remaining == 0 and first.reset_after is not None and 0 < first.reset_after <= 61
    assert info.value.rate_limited and info.value.remaining == 0
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 61
    with_header = await nv_sandbox_factory(
        limits={"user": {"requests": 0, "window": 3600}}, retry_after_header=True
    )
    async with with_header.client() as client:
        with pytest.raises(RetryableError) as info:
            await client.send(good_users(1))
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 3600


@pytest.mark.parametrize("fault", ["error_500", "error_503", "drop"])
async def test_faults_are_retryable(nv_sandbox_factory: NvFactory, fault: str) -> None:
    running = await nv_sandbox_factory(limits={}, faults={fault: 1.0})
    async with running.client() as client:
        with pytest.raises(RetryableError) as info:
            await client.send(good_users(1))
    assert info.value.status == {"error_500": 500, "error_503": 503, "drop": None}[fault]


async def test_a_hung_request_times_out_as_retryable(nv_sandbox_factory: NvFactory) -> None:
    running = await nv_sandbox_factory(limits={}, faults={"hang": 1.0, "hang_seconds": 5})
    async with running.client(timeout=0.3) as client:
        with pytest.raises(RetryableError, match="no answer within"):
            await client.send(good_users(1))


async def test_wrong_base_url_is_fatal(nv_sandbox: RunningNotifyVisitors) -> None:
    destination = Destination("notifyvisitors", nv_sandbox.root_url + "/api/v9/", extra={"brand_id": "4242"})
    async with NotifyVisitorsClient(destination, NV_API_KEY, timeout=5) as client:
        with pytest.raises(FatalPlatformError) as info:
            await client.send(good_users(1))
    assert info.value.status == 404


@pytest.fixture
async def not_an_api() -> AsyncIterator[str]:
    """A local server that answers 200 with an HTML page (a captive proxy, a maintenance page)."""

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text="<html>maintenance</html>", content_type="text/html")

    app = web.Application()
    app.router.add_post("/api/v1/user/create", page)
    server = await start_app(app)
    yield server.root_url + "/api/v1/"
    await server.stop()


async def test_a_200_without_the_envelope_is_retryable(not_an_api: str) -> None:
    destination = Destination("notifyvisitors", not_an_api, extra={"brand_id": "1"})
    async with NotifyVisitorsClient(destination, NV_API_KEY, timeout=5) as client:
        with pytest.raises(RetryableError, match="without the response envelope"):
            await client.send(good_users(1))


def test_envelope_of() -> None:
    assert envelope_of({"response": {"status": "Error", "message": "m", "data": {}}}) == ("error", "m", {})
    assert envelope_of({"status": "success"}) is None
    assert envelope_of([1]) is None


def test_dates_in_user_attributes_are_formatted_for_datetimes_too() -> None:
    assert user_attributes({"birth_date": datetime(1990, 2, 28, 13, 0, tzinfo=UTC)}) == {
        "birth_date": "1990-02-28"
    }


# --- the example job end to end -----------------------------------------------------------------------------

EXAMPLE_JOB = Path(__file__).resolve().parents[2] / "jobs" / "notifyvisitors.yaml"


def example_job(url: str, workdir: Path, **extra: str) -> Job:
    """``jobs/notifyvisitors.yaml`` aimed at a sandbox, with fast retries and budgets that overrun the sandbox's
    (small) limits so that 429s happen."""
    job = load_job(EXAMPLE_JOB)
    # The sandbox below counts in quarter-second windows, not minutes: the client must know (rate_window).
    extra = {"rate_window": "0.25", **extra}
    destination = dataclasses.replace(job.destination, base_url=url, extra={**job.destination.extra, **extra})
    dispatch = dataclasses.replace(
        job.dispatch,
        request_timeout=1.0,
        budgets={
            "user/create": RateBudgetSpec(requests=8, period=0.25),
            "event/create": RateBudgetSpec(requests=8, period=0.25),
        },
        budget_groups=(),  # the documented per-family groups (per minute) would make the test last minutes
        retry=RetryPolicy(max_attempts=12, base_delay=0.01, max_delay=0.05),
    )
    return dataclasses.replace(
        job, destination=destination, dispatch=dispatch, workdir=workdir, batch_sizes={"*": 2}
    )


@pytest.mark.parametrize("auth", ["api_key", "bearer"])
async def test_example_job_end_to_end_with_faults_and_limits(
    nv_sandbox_factory: NvFactory, tmp_path: Path, auth: str
) -> None:
    running = await nv_sandbox_factory(
        brand_id="1000",
        # One request per quarter second per family, while the job's budgets allow eight: 429s must happen.
        limits={"user": {"requests": 1, "window": 0.25}, "event": {"requests": 1, "window": 0.25}},
        faults={
            "error_500": 0.15,
            "drop": 0.1,
            "applied_then_500": 0.1,
            "slow": 0.1,
            "latency": {"low": 0.01, "high": 0.05},
        },
        seed=11,
    )
    job = example_job(running.url, tmp_path / "work", auth=auth)
    secret = NV_TOKEN if auth == "bearer" else NV_API_KEY
    with capture_logs() as logs:
        outcome = await run(job, RunOptions(api_key=secret))
    assert logs and secret not in repr(logs)  # nor in the summary or the ledger (below)
    assert secret not in json.dumps(outcome.summary.to_json())

    # N005 refused by validation, N004 (a mobile without a country code) by the plan's NotifyVisitors check
    assert outcome.exit_code is ExitCode.PARTIAL
    users = running.sandbox.state.users
    assert sorted(users) == ["N001", "N002", "N003", "N006"]
    assert users["N002"] == {
        "name": "Alan Turing",
        "birth_date": "1990-06-23",
        "gender": "M",
        "city": "London",
        "score": 12.5,
        "email_opt_in": "1",
        "sms_opt_in": "1",
        "email": "alan@example.com",
        "mobile": "+442079460958",
    }
    assert (
        users["N003"]["score"] == 7 and users["N003"]["email_opt_in"] == "1" and "city" not in users["N003"]
    )
    assert "email_opt_in" not in users["N006"]
    # Every event arrived (an applied-then-500 answer may make a retry deliver one twice: at least once).
    seen = {
        (e.user_id, e.name, e.event_time, tuple(sorted(e.attributes.items())))
        for e in running.sandbox.state.events
    }
    assert seen == {
        ("N001", "purchase", "2024-05-01 10:00:00", (("amount", 19.99), ("sku", "BK-1"))),
        ("N001", "purchase", "2024-05-01 10:05:00", (("amount", 5), ("sku", "BK-2"))),
        ("N003", "add_to_cart", "2024-05-02 08:30:00", (("amount", 120), ("sku", "TV-9"))),
        ("N006", "signup", "2024-05-03 12:00:00", ()),
    }
    stats = running.sandbox.stats.snapshot()
    assert stats["rate_limited_total"] > 0 and sum(stats["faults"].values()) > 0
    assert all(entry["max"] <= 1 for entry in stats["max_in_window"].values())
    assert outcome.summary.ids_rejected == 0 and outcome.summary.ids_failed == 0  # nothing sent was refused
    with Ledger.open(outcome.ledger_path) as ledger:
        refused = ledger.refused_ids(outcome.run_id)
        rows = ledger.rejected_rows(outcome.run_id)
    assert refused == []
    assert sorted((r.ext_id, r.column, "E.164" in r.reason) for r in rows) == [
        ("N004", "mobile", True),
        ("N005", "birth_date", False),
    ]
    assert secret not in outcome.ledger_path.read_bytes().decode("latin-1")


async def test_example_job_aborts_on_a_wrong_key(nv_sandbox_factory: NvFactory, tmp_path: Path) -> None:
    running = await nv_sandbox_factory(brand_id="1000", limits={})
    outcome = await run(example_job(running.url, tmp_path / "work"), RunOptions(api_key="not-the-key-123"))
    assert outcome.exit_code is ExitCode.ABORTED
    assert running.sandbox.state.users == {}


def test_job_problems_are_reported_at_load(tmp_path: Path) -> None:
    (tmp_path / "u.csv").write_text("id,t\n1,a\n", encoding="utf-8")
    (tmp_path / "job.yaml").write_text(
        """
version: 1
destination: {platform: notifyvisitors, base_url: "http://127.0.0.1:1/api/v1/", secret: {env: X}}
defaults: {ext_id: id}
sources:
  - {name: u, path: u.csv, tags: t, opt_ins: {push: t}}
  - {name: d, kind: deletions, path: u.csv}
""",
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(tmp_path / "job.yaml")
    where = {p.location for p in info.value.problems}
    assert where == {"destination.extra.brand_id", "sources[0].tags", "sources[0].opt_ins", "sources[1].kind"}


def test_a_misspelt_setting_is_refused_at_load_not_ignored(tmp_path: Path) -> None:
    # event_time_zon was ignored without a word: every event went out in validation.timezone (audit).
    (tmp_path / "u.csv").write_text("id,t\n1,a\n", encoding="utf-8")
    (tmp_path / "job.yaml").write_text(
        """
version: 1
destination:
  platform: notifyvisitors
  base_url: "http://127.0.0.1:1/api/v1/"
  secret: {env: X}
  extra: {brand_id: "1", event_time_zon: UTC}
defaults: {ext_id: id}
sources:
  - {name: u, path: u.csv, attributes: {t: string}}
""",
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(tmp_path / "job.yaml")
    (problem,) = info.value.problems
    assert problem.location == "destination.extra.event_time_zon"
    assert "did you mean event_time_zone?" in problem.message
