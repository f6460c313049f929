"""NotifyVisitors, one bad event must not cost the others (issue 18, items 6–10), against the strict sandbox.

* a refused ``event/create`` is split down to the single event, and the refusal names that event's row;
* a user's profile reaches the platform before their events (unless the job says otherwise);
* one user's events arrive in file order even when they span several requests;
* ``X-RateLimit-Remaining: 0`` pauses until the platform's minute (here: its window) resets, whatever the budget;
* ``event_time`` is always sent, offset-free, in the job's format and zone; an event without a time is a
  rejected row.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest_notifyvisitors import BLOCKED, NV_API_KEY, NV_BRAND_ID, NvFactory

from sync.config import Job, load_job
from sync.errors import BadJobError, ExitCode
from sync.ledger.ledger import Ledger
from sync.planning.planning import build_plan
from sync.records import body_json
from sync.run import RunOptions, run


def write_job(
    tmp_path: Path,
    url: str,
    users: str | None,
    events: str | None,
    *,
    extra: str = "",
    dispatch: str = "concurrency: 8",
    batch_sizes: str = "",
) -> Job:
    """A NotifyVisitors job over ``users.csv`` (customer_id,name) and ``events.csv``
    (customer_id,event,seq,sku,event_time), either left out when None."""
    sources = []
    if users is not None:
        (tmp_path / "users.csv").write_text(users, encoding="utf-8")
        sources.append("  - {name: users, path: users.csv, attributes: {name: string}}")
    if events is not None:
        (tmp_path / "events.csv").write_text(events, encoding="utf-8")
        sources.append(
            "  - name: events\n    kind: events\n    path: events.csv\n    event: event\n"
            "    attributes: {seq: number, sku: string, event_time: {type: date}}"
        )
    (tmp_path / "job.yaml").write_text(
        f"""
version: 1
name: nv-order
destination:
  platform: notifyvisitors
  base_url: {url}
  secret: {{env: NV_TEST_KEY}}
  extra: {{brand_id: "{NV_BRAND_ID}"{extra}}}
defaults: {{ext_id: customer_id}}
validation: {{timezone: Asia/Kolkata}}
sources:
{chr(10).join(sources)}
dispatch:
  {dispatch}
  retry: {{max_attempts: 6, base_delay: 0.01, max_delay: 0.05}}
  {batch_sizes}
""",
        encoding="utf-8",
    )
    return load_job(tmp_path / "job.yaml")


def events_csv(rows: list[tuple[str, str, int, str, str]]) -> str:
    lines = ["customer_id,event,seq,sku,event_time"]
    lines += [f"{u},{name},{seq},{sku},{when}" for u, name, seq, sku, when in rows]
    return "\n".join(lines) + "\n"


async def test_a_refused_event_costs_only_itself_and_names_its_own_row(
    nv_choosy_factory: NvFactory, tmp_path: Path
) -> None:
    # The platform refuses the events holding a SKU it blocks: a refusal the plan cannot foresee (a value that
    # breaks a documented rule is a rejected row of the plan, never sent: tests/platforms/test_notifyvisitors_checks.py).
    running = await nv_choosy_factory(limits={})
    rows = []
    for u in range(1, 6):
        for k in range(3):
            bad = (u, k) in ((2, 1), (4, 2))
            rows.append(
                (f"u{u}", "purchase", u * 10 + k, BLOCKED if bad else f"sku-{k}", "2024-05-01 10:00:00")
            )
    job = write_job(tmp_path, running.url, None, events_csv(rows))
    outcome = await run(job, RunOptions(api_key=NV_API_KEY))

    assert outcome.exit_code is ExitCode.PARTIAL
    got = sorted((e.user_id, e.attributes["seq"]) for e in running.sandbox.state.events)
    want = sorted((u, seq) for u, _, seq, sku, _ in rows if sku != BLOCKED)
    assert got == want  # 13 valid events, none lost with the bad ones
    out = tmp_path / "refused.csv"
    with Ledger.open(outcome.ledger_path) as ledger:
        ledger.export(outcome.run_id, out, table="refused-ids", fmt="csv")
    refused = pl.read_csv(out).select("ext_id", "origin_row").rows()
    # Data rows are 1-based: u2's second event is row 5, u4's third is row 12.
    assert sorted(refused) == [("u2", 5), ("u4", 12)]
    assert outcome.summary.ids_rejected == 2


async def test_profiles_reach_the_platform_before_their_events(
    nv_sandbox_factory: NvFactory, tmp_path: Path
) -> None:
    # user/create is slow here (two requests per quarter second, one user per request), event/create is not.
    running = await nv_sandbox_factory(
        limits={"user": {"requests": 2, "window": 0.25}, "event": {"requests": 100, "window": 0.25}}
    )
    users = "customer_id,name\n" + "".join(f"u{i},User {i}\n" for i in range(12))
    events = events_csv([(f"u{i}", "signup", i, "s", "2024-05-01 10:00:00") for i in range(12)])
    job = write_job(
        tmp_path,
        running.url,
        users,
        events,
        extra=', rate_window: "0.25"',
        batch_sizes="batch_size: {user/create: 1}",
    )
    outcome = await run(job, RunOptions(api_key=NV_API_KEY))
    assert outcome.exit_code is ExitCode.OK
    events_seen = running.sandbox.state.events
    assert len(events_seen) == 12 and all(e.user_existed for e in events_seen)


async def test_events_may_go_with_the_profiles_when_the_job_says_so(
    nv_sandbox_factory: NvFactory, tmp_path: Path
) -> None:
    running = await nv_sandbox_factory(
        limits={"user": {"requests": 2, "window": 0.25}, "event": {"requests": 100, "window": 0.25}}
    )
    users = "customer_id,name\n" + "".join(f"u{i},User {i}\n" for i in range(12))
    events = events_csv([(f"u{i}", "signup", i, "s", "2024-05-01 10:00:00") for i in range(12)])
    job = write_job(
        tmp_path,
        running.url,
        users,
        events,
        extra=', rate_window: "0.25", events_after_users: "false"',
        batch_sizes="batch_size: {user/create: 1}",
    )
    with build_plan(job) as plan:
        assert {plan.lane_rank(p.phase, p.endpoint) for p in plan.summary().endpoints} == {0}
    outcome = await run(job, RunOptions(api_key=NV_API_KEY))
    assert outcome.exit_code is ExitCode.OK
    assert not all(e.user_existed for e in running.sandbox.state.events)  # sent at once, as asked


async def test_one_users_events_arrive_in_file_order_across_requests(
    nv_sandbox_factory: NvFactory, tmp_path: Path
) -> None:
    running = await nv_sandbox_factory(limits={}, faults={"latency": {"low": 0.0, "high": 0.04}}, seed=3)
    rows = [
        (f"u{u}", "step", k, "s", f"2024-05-01 10:{k:02d}:00")
        for k in range(7)  # the file interleaves users; each user's own events are in seq order
        for u in range(12)
    ]
    job = write_job(
        tmp_path, running.url, None, events_csv(rows), batch_sizes="batch_size: {event/create: 3}"
    )
    with build_plan(job) as plan:
        batches = list(plan.batches())
        summary = plan.summary()
    assert summary.total_requests == len(batches)  # plan's count is the packing's
    assert all(len(body_json(b)["nv"]) <= 3 for b in batches)
    assert sum(b.after is not None for b in batches) > 0  # users spanning requests follow their earlier batch
    outcome = await run(job, RunOptions(api_key=NV_API_KEY))
    assert outcome.exit_code is ExitCode.OK
    arrived: dict[str, list[int]] = {}
    for e in running.sandbox.state.events:
        arrived.setdefault(e.user_id, []).append(e.attributes["seq"])
    assert arrived == {f"u{u}": list(range(7)) for u in range(12)}


async def test_nothing_left_this_minute_pauses_until_the_platforms_window_resets(
    nv_sandbox_factory: NvFactory, tmp_path: Path
) -> None:
    # The platform takes 3 per (1 s) window; the job's budget is ten times that, per tenth of a second.
    running = await nv_sandbox_factory(limits={"user": {"requests": 3, "window": 1.0}})
    users = "customer_id,name\n" + "".join(f"u{i},User {i}\n" for i in range(9))
    job = write_job(
        tmp_path,
        running.url,
        users,
        None,
        extra=', rate_window: "1"',
        dispatch="concurrency: 1\n  budgets: {user/create: {requests: 10, per: 100ms}}",
        batch_sizes="batch_size: {user/create: 1}",
    )
    outcome = await run(job, RunOptions(api_key=NV_API_KEY))
    assert outcome.exit_code is ExitCode.OK
    assert sorted(running.sandbox.state.users) == [f"u{i}" for i in range(9)]
    assert running.sandbox.stats.rate_limited() == 0  # no probing on our own, shorter period


async def test_event_time_is_always_sent_in_the_jobs_format_and_zone(
    nv_sandbox_factory: NvFactory, tmp_path: Path
) -> None:
    running = await nv_sandbox_factory(limits={}, event_time_format="yyyy-MM-ddTHH:mm:ss")
    rows = [
        ("u1", "purchase", 1, "a", "2024-05-01T10:00:00+05:30"),
        ("u1", "purchase", 2, "b", "2024-05-01 10:00:00"),  # no offset: the job's time zone (Kolkata)
        ("u2", "purchase", 3, "c", ""),  # no time at all
        ("u3", "purchase", 4, "d", "2024-05-01T00:00:00Z"),
    ]
    job = write_job(
        tmp_path,
        running.url,
        None,
        events_csv(rows),
        extra=', event_time_format: "yyyy-MM-ddTHH:mm:ss", event_time_zone: UTC',
    )
    with build_plan(job) as plan:
        assert [(r.row, r.column, r.ext_id) for r in plan.rejected_rows()] == [(3, "event_time", "u2")]
    outcome = await run(job, RunOptions(api_key=NV_API_KEY))
    assert outcome.exit_code is ExitCode.PARTIAL  # the row without a time
    times = {e.attributes["seq"]: e.event_time for e in running.sandbox.state.events}
    assert times == {1: "2024-05-01T04:30:00", 2: "2024-05-01T04:30:00", 4: "2024-05-01T00:00:00"}


async def test_event_time_defaults_to_the_documented_form_in_the_jobs_zone(
    nv_sandbox_factory: NvFactory, tmp_path: Path
) -> None:
    running = await nv_sandbox_factory(limits={})
    rows = [("u1", "purchase", 1, "a", "2024-05-01T10:00:00Z")]
    outcome = await run(
        write_job(tmp_path, running.url, None, events_csv(rows)), RunOptions(api_key=NV_API_KEY)
    )
    assert outcome.exit_code is ExitCode.OK
    assert [e.event_time for e in running.sandbox.state.events] == ["2024-05-01 15:30:00"]  # Asia/Kolkata


def test_event_time_settings_are_checked_at_load(tmp_path: Path) -> None:
    (tmp_path / "e.csv").write_text("id,event,when\n1,a,2024-01-01\n", encoding="utf-8")
    (tmp_path / "job.yaml").write_text(
        """
version: 1
destination:
  platform: notifyvisitors
  base_url: "http://127.0.0.1:1/api/v1/"
  secret: {env: X}
  extra: {brand_id: "1", event_time_format: "dd/MM/yyyy", event_time_zone: Mars/Olympus,
          events_after_users: maybe, rate_window: "0"}
defaults: {ext_id: id}
sources:
  - {name: e, kind: events, path: e.csv, event: event}
  - {name: f, kind: events, path: e.csv, event: event, attributes: {when: {attribute: event_time}}}
""",
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(tmp_path / "job.yaml")
    assert {p.location for p in info.value.problems} == {
        "destination.extra.event_time_format",
        "destination.extra.event_time_zone",
        "destination.extra.events_after_users",
        "destination.extra.rate_window",
        "sources[0].attributes",
        "sources[1].attributes.when",
    }


@pytest.mark.parametrize("window", ["inf", "1e400", "-inf"])
def test_a_rate_window_without_end_is_refused_at_load(tmp_path: Path, window: str) -> None:
    """``rate_window: inf`` was loaded, and the first answer with nothing left this minute paused the endpoint
    for ever (the wait until the window's end was infinite)."""
    (tmp_path / "e.csv").write_text("id,event,when\n1,a,2024-01-01\n", encoding="utf-8")
    (tmp_path / "job.yaml").write_text(
        f"""
version: 1
destination:
  platform: notifyvisitors
  base_url: "http://127.0.0.1:1/api/v1/"
  secret: {{env: X}}
  extra: {{brand_id: "1", rate_window: "{window}"}}
defaults: {{ext_id: id}}
sources:
  - {{name: e, kind: events, path: e.csv, event: event, attributes: {{when: {{type: date, attribute: event_time}}}}}}
""",
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(tmp_path / "job.yaml")
    assert [p.location for p in info.value.problems] == ["destination.extra.rate_window"]


def test_an_attribute_named_like_a_mapped_field_is_refused_at_load(tmp_path: Path) -> None:
    """An attribute sent as ``email`` (or ``mobile``, an opt-in) from another column than the source's ``email:``
    went into the same ``user_attributes`` key: one address was dropped without a word."""
    (tmp_path / "u.csv").write_text(
        "id,em,work,tel,news\n1,a@x.io,b@x.io,+14155550100,yes\n", encoding="utf-8"
    )
    (tmp_path / "job.yaml").write_text(
        """
version: 1
destination:
  platform: notifyvisitors
  base_url: "http://127.0.0.1:1/api/v1/"
  secret: {env: X}
  extra: {brand_id: "1"}
defaults: {ext_id: id}
sources:
  - name: u
    path: u.csv
    attributes:
      work: {type: string, attribute: email}
      tel: {type: string, attribute: mobile}
      news: {type: boolean, attribute: email_opt_in}
    email: em
    msisdn: tel
    opt_ins: {email: em}
""",
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(tmp_path / "job.yaml")
    # tel is msisdn's own column: the same value, nothing is lost.
    assert [(p.location, p.message) for p in info.value.problems] == [
        (
            "sources[0].attributes.work",
            "attribute 'email' is already sent from column 'em' (email); map one column to it",
        ),
        (
            "sources[0].attributes.news",
            "attribute 'email_opt_in' is already sent from column 'em' (opt_ins.email); map one column to it",
        ),
    ]
