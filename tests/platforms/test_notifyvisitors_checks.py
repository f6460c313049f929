"""NotifyVisitors values the platform refuses are rejected rows of the plan (``Builder.check_rows``,
``sync/platforms/notifyvisitors/checks.py``), not refused items found by sending:

* a plan over a small CSV lists a bad ``mobile``, an over-long text, a bad ``email``, ``birth_date`` and opt-in
  flag and an over-long event name as rejected rows (file, row, input column, reason) and sends the other rows;
* a run against the sandbox spends no request on them (counted at the sandbox) and every good user lands;
* for arbitrary rows (hypothesis) and on the batch-ID compatibility inputs, the plan rejects a row exactly when
  the sandbox refuses the item the builder makes of it — and the items of the other rows are unchanged, byte for
  byte;
* the polars forms of the rules read text as the sandbox's and the builder's Python code do (e-mail pattern,
  flags' case and whitespace, ``strptime`` dates).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import nvfof_compat as compat
import polars as pl
import pytest
from conftest_notifyvisitors import NV_API_KEY, NV_BRAND_ID, NvFactory
from hypothesis import given, settings
from hypothesis import strategies as st
from test_nvfof_columnar import dates, floats, mobiles, texts

from sync.config import AttributeMapping as Attribute
from sync.config import FileFormat, Source, SourceKind, ValueType, load_job
from sync.errors import ExitCode
from sync.ledger.ledger import Ledger
from sync.planning._parsers import _EMAIL as validation_email
from sync.planning.planning import build_plan
from sync.platforms.notifyvisitors import E164_PATTERN, EVENT_CREATE, MAX_STRING_LENGTH, USER_CREATE
from sync.platforms.notifyvisitors import checks as nvc
from sync.platforms.notifyvisitors import requests as nv
from sync.records import Batch, body_json
from sync.run import RunOptions, run
from sync.sandboxes import notifyvisitors as sandbox_module
from sync.sandboxes._core import ApiError
from sync.sandboxes.notifyvisitors import NotifyVisitorsSandbox, NotifyVisitorsSandboxConfig

JOB = """
version: 1
name: nv-checks
destination:
  platform: notifyvisitors
  base_url: {url}
  secret: {{env: NV_TEST_KEY}}
  extra: {{brand_id: "{brand}"}}
defaults: {{ext_id: id}}
sources:
  - name: users
    path: users.csv
    attributes:
      name: string
      mail: {{attribute: email}}
      born: {{attribute: birth_date}}
      news: {{attribute: email_opt_in}}
    msisdn: phone
  - name: events
    kind: events
    path: events.csv
    event: event
    attributes:
      sku: string
      when: {{attribute: event_time, type: date}}
"""

LONG = "x" * (MAX_STRING_LENGTH + 1)  # 1000 characters: the platform takes fewer


def write_job(tmp_path: Path, url: str, users: list[str], events: list[str]) -> Path:
    (tmp_path / "users.csv").write_text("id,name,mail,born,news,phone\n" + "\n".join(users) + "\n", "utf-8")
    (tmp_path / "events.csv").write_text("id,event,sku,when\n" + "\n".join(events) + "\n", "utf-8")
    (tmp_path / "job.yaml").write_text(JOB.format(url=url, brand=NV_BRAND_ID), encoding="utf-8")
    return tmp_path / "job.yaml"


def good_user(i: int) -> str:
    return f"u{i},User {i},u{i}@example.com,1990-1-{i % 28 + 1},yes,+91 98999 {i:05d}"


def rejected_rows(rejects: Path) -> list[tuple[str, int, str, str, str]]:
    """The rows of a rejects file: (input file name, row, column, reason, ID), sorted."""
    frame = pl.read_csv(rejects, schema_overrides={"ext_id": pl.String})
    rows = frame.select("file", "row", "column", "reason", "ext_id").iter_rows()
    return sorted((Path(file).name, *rest) for file, *rest in rows)


# --- the plan -----------------------------------------------------------------------------------------------


def test_values_the_platform_refuses_are_rejected_rows_of_the_plan(tmp_path: Path) -> None:
    users = [good_user(i) for i in range(1, 4)]
    users[1] = "u2,Alan,alan@example.com,1990-06-23,no,98999 00002"  # no country code: not E.164
    users += [
        f"u4,{LONG},u4@example.com,,,",
        "u5,Grace,grace(at)example.com,,,",
        "u6,Linus,,1991-02-29,,",
        "u7,Tim,,,maybe,",
    ]
    events = ["u1,purchase,sku-1,2024-05-01 10:00:00", f"u1,{'e' * 50},sku-2,2024-05-01 10:01:00"]
    job = load_job(write_job(tmp_path, "http://127.0.0.1:9/api/v1/", users, events))
    sent: dict[str, list[Any]] = {USER_CREATE: [], EVENT_CREATE: []}
    with build_plan(job) as plan:
        for batch in plan.batches():
            sent[batch.endpoint] += body_json(batch)["nv"]
        rejects = rejected_rows(plan.rejects_path)
    not_e164 = (
        "mobile is not in E.164 (+, country code and number, 8 to 15 digits): NotifyVisitors refuses it, and "
        "pushsync does not guess a country"
    )
    assert rejects == [
        ("events.csv", 2, "event", "event name is 50 characters long: NotifyVisitors takes at most 49", "u1"),
        ("users.csv", 2, "phone", not_e164, "u2"),
        ("users.csv", 4, "name", "name is 1000 characters long: NotifyVisitors takes at most 999", "u4"),
        ("users.csv", 5, "mail", "email is not an e-mail address: NotifyVisitors refuses it", "u5"),
        ("users.csv", 6, "born", "birth_date is not a date as YYYY-MM-DD: NotifyVisitors refuses it", "u6"),
        ("users.csv", 7, "news", 'email_opt_in is not a yes/no value: NotifyVisitors takes "1" or "0"', "u7"),
    ]
    assert [item["userID"] for item in sent[USER_CREATE]] == ["u1", "u3"]
    assert sent[USER_CREATE][0]["user_attributes"] == {
        "name": "User 1",
        "email": "u1@example.com",
        "birth_date": "1990-01-02",
        "email_opt_in": "1",
        "mobile": "+919899900001",
    }
    assert [item["attributes"]["sku"] for item in sent[EVENT_CREATE]] == ["sku-1"]


async def test_rejected_values_cost_no_request_and_every_good_user_lands(
    nv_sandbox_factory: NvFactory, tmp_path: Path
) -> None:
    running = await nv_sandbox_factory(limits={})
    users = [good_user(i) for i in range(250)]
    users[7] = "u7,Bad Mobile,u7@example.com,,,4155550107"  # no + and country code
    users[120] = f"u120,{LONG},u120@example.com,,,"
    events = [f"u{i},signup,sku-{i},2024-05-01 10:00:00" for i in range(10)]
    events[3] = f"u3,signup,{LONG},2024-05-01 10:00:00"
    job = load_job(write_job(tmp_path, running.url, users, events))
    outcome = await run(job, RunOptions(api_key=NV_API_KEY))

    assert outcome.exit_code is ExitCode.PARTIAL  # rows were rejected; nothing sent was refused
    stats = running.sandbox.stats
    # 248 users in 100-user requests, 9 events in one: the requests of the good rows alone. Sent, the bad rows
    # cost their halvings: 29 user/create and 7 event/create requests.
    assert (stats.requests(USER_CREATE), stats.requests(EVENT_CREATE)) == (3, 1)
    assert outcome.summary.requests == 4 and outcome.summary.ids_rejected == 0
    landed = running.sandbox.state.users
    assert sorted(landed) == sorted(f"u{i}" for i in range(250) if i not in (7, 120))
    assert landed["u8"]["mobile"] == "+919899900008"
    assert sorted(e.attributes["sku"] for e in running.sandbox.state.events) == sorted(
        f"sku-{i}" for i in range(10) if i != 3
    )
    expected = [("events.csv", 4, "sku"), ("users.csv", 8, "phone"), ("users.csv", 121, "name")]
    assert [r[:3] for r in rejected_rows(job.workdir / "rejects.csv")] == expected
    with Ledger.open(outcome.ledger_path) as ledger:
        recorded = sorted((Path(r.path).name, r.row, r.column) for r in ledger.rejected_rows(outcome.run_id))
        assert ledger.refused_ids(outcome.run_id) == []
    assert recorded == expected


# --- the plan's verdict is the sandbox's --------------------------------------------------------------------


def sandbox_refuses(sandbox: NotifyVisitorsSandbox, endpoint: str, item: dict[str, Any]) -> bool:
    """Whether the sandbox refuses a request of this one item (its handlers' own checks, without HTTP)."""
    apply = sandbox._user_create if endpoint == USER_CREATE else sandbox._event_create
    try:
        apply({"nv": [item]})
    except ApiError:
        return True
    return False


def verdicts(builder: nv.Builder, source: Source, frame: pl.DataFrame) -> tuple[set[int], set[int], set[int]]:
    """``(rows rejected by check_rows, rows whose item the sandbox refuses, rows the builder sends)``."""
    _, rejects = builder.check_rows(source, frame, "f.csv")
    sandbox = NotifyVisitorsSandbox(NotifyVisitorsSandboxConfig(limits={}))
    (stream,) = builder.streams_for(source)
    items = builder._items(stream, frame)
    refused = {
        row
        for row, text in zip(items["__row"], items["__item"], strict=True)
        if sandbox_refuses(sandbox, stream.endpoint, json.loads(text))
    }
    return set(rejects["row"]), refused, set(items["__row"])


date_texts = st.one_of(
    st.from_regex(r"\A[0-9]{4}-[ 0-9]{1,3}-[ 0-9]{1,3}\Z"),
    st.sampled_from(["2024-01-05", "2024-1-5", "2024-02-29", "2023-02-29", "0000-01-01", "2024-01- 5"]),
    st.sampled_from(["1900-02-29", "2000-02-29", "2024-04-31", "2024-13-01", "05/01/2024", "20240105"]),
)
spaces = st.sampled_from(["", " ", "\x1c", "\u3000", "\x85"])
flag_texts = st.one_of(
    texts,
    st.tuples(spaces, st.sampled_from(sorted(nvc.FLAG_YES | nvc.FLAG_NO)), st.booleans(), spaces).map(
        lambda t: t[0] + (t[1].upper() if t[2] else t[1]) + t[3]
    ),
)
emails = st.one_of(
    st.sampled_from(
        ["a@b.co", "a b@c.de", "a@b", "@b.c", "a@@b.c", "a@b.c\n", "a@b.\x1c", "ä@ö.ü", "a@b.c."]
    ),
    st.from_regex(r"\A[a-z@. \x1c\u3000]{1,8}\Z"),
)
strings = st.one_of(texts, mobiles, emails, date_texts, flag_texts, st.just(LONG), st.just(LONG[1:]))
VALUES: dict[ValueType, tuple[Any, st.SearchStrategy[Any]]] = {
    ValueType.STRING: (pl.String, strings),
    ValueType.NUMBER: (
        pl.Float64,
        st.one_of(floats, st.sampled_from([0.01234567891, 919899999999.0, 1.0, 0.0])),
    ),
    ValueType.BOOLEAN: (pl.Boolean, st.booleans()),
    ValueType.DATE: (pl.Int64, dates),
    ValueType.LIST: (pl.List(pl.String), st.lists(st.one_of(st.none(), strings), max_size=3)),
}
USER_ATTRIBUTES = ("mobile", "email", "birth_date", "email_opt_in", "sms_opt_in", "note")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_the_plan_rejects_exactly_the_users_the_sandbox_refuses(data: st.DataObject) -> None:
    kinds = {name: data.draw(st.sampled_from(list(VALUES)), label=name) for name in USER_ATTRIBUTES}
    source = Source(
        name="users",
        kind=SourceKind.USERS,
        paths=("users.csv",),
        format=FileFormat.CSV,
        ext_id="id",
        attributes=tuple(Attribute(f"c_{name}", name, kind) for name, kind in kinds.items()),
    )
    n = data.draw(st.integers(1, 8), label="rows")
    columns: dict[str, Any] = {"__ext_id": [f"u{i}" for i in range(n)]}
    schema: dict[str, Any] = {"__ext_id": pl.String}
    for name, kind in kinds.items():
        dtype, values = VALUES[kind]
        columns[f"c_{name}"] = data.draw(
            st.lists(st.one_of(st.none(), values), min_size=n, max_size=n), label=name
        )
        schema[f"c_{name}"] = dtype
    frame = pl.DataFrame(columns, schema=schema).with_columns(
        pl.lit(0, pl.Int32).alias("__file"), pl.int_range(1, pl.len() + 1).alias("__row")
    )
    zone = data.draw(st.sampled_from(["UTC", "Asia/Kolkata", "America/New_York"]), label="zone")
    rejected, refused, sent = verdicts(nv.Builder(ZoneInfo(zone)), source, frame)
    assert rejected == refused and refused <= sent


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.text(min_size=1, max_size=3), st.text(min_size=45, max_size=55), st.just("e" * 49)),
            st.one_of(st.none(), texts, st.just(LONG), st.just(LONG[1:])),
            st.one_of(st.none(), floats),
            dates,
            st.one_of(st.none(), mobiles),
            st.one_of(st.none(), st.lists(st.one_of(st.none(), texts, st.just("y" * 600)), max_size=3)),
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(list(nv.EVENT_TIME_FORMATS)),
)
def test_the_plan_rejects_exactly_the_events_the_sandbox_refuses(
    rows: list[tuple[Any, ...]], fmt: str
) -> None:
    source = Source(
        name="events",
        kind=SourceKind.EVENTS,
        paths=("events.csv",),
        format=FileFormat.CSV,
        ext_id="id",
        event="event",
        attributes=(
            Attribute("sku", "sku"),
            Attribute("amount", "amount", ValueType.NUMBER),
            Attribute("when", "event_time", ValueType.DATE),
            Attribute("phone", "mobile"),  # no user rules for an event's attributes
            Attribute("tags", "tags", ValueType.LIST),
        ),
    )
    names = ["__event", "sku", "amount", "when", "phone", "tags"]
    schema = dict(
        zip(names, [pl.String, pl.String, pl.Float64, pl.Int64, pl.String, pl.List(pl.String)], strict=True)
    )
    frame = pl.DataFrame([dict(zip(names, r, strict=True)) for r in rows], schema=schema).with_columns(
        pl.format("u{}", pl.int_range(pl.len()) % 2).alias("__ext_id"),
        pl.lit(0, pl.Int32).alias("__file"),
        pl.int_range(1, pl.len() + 1).alias("__row"),
    )
    # The sandbox takes the job's event_time form (its own setting): the check is about the values.
    builder = nv.Builder(ZoneInfo("Asia/Kolkata"), event_time_format=fmt)
    _, rejects = builder.check_rows(source, frame, "f.csv")
    sandbox = NotifyVisitorsSandbox(NotifyVisitorsSandboxConfig(limits={}, event_time_format=fmt))
    (stream,) = builder.streams_for(source)
    items = builder._items(stream, frame)
    refused = {
        row
        for row, text in zip(items["__row"], items["__item"], strict=True)
        if sandbox_refuses(sandbox, EVENT_CREATE, json.loads(text))
    }
    assert set(rejects["row"]) == refused


def plan_items(job_file: Path) -> tuple[list[tuple[str, int, str]], set[tuple[str, int]]]:
    """Every item the plan sends, in order (input file, row, canonical JSON), and the rows it rejected."""
    with build_plan(load_job(job_file), rows_per_bucket=compat.ROWS_PER_BUCKET) as plan:
        items = []
        batch: Batch
        for batch in plan.batches():
            rows = batch.origins.rows  # type: ignore[attr-defined]
            for row, item in zip(rows, body_json(batch)["nv"], strict=True):
                items.append((Path(row.path).name, row.row, nv.canonical_json(item).decode()))
        rejects = {(name, row) for name, row, *_ in rejected_rows(plan.rejects_path)}
    return items, rejects


@pytest.mark.parametrize("variant", list(compat.NV_VARIANTS))
def test_on_the_compatibility_inputs_only_the_refused_items_go(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch-ID compatibility inputs hold every kind of value the platform refuses. Planned with the check,
    they give the items planned without it (the builder alone: tests/platforms/test_nvfof_batches.py) minus
    exactly those the sandbox refuses — the others byte for byte."""
    monkeypatch.setenv("NV_COMPAT_KEY", "k")
    job_file = compat.write_nv_inputs(tmp_path, variant)
    checked, rejected = plan_items(job_file)
    monkeypatch.delattr(nv.Builder, "check_rows")
    unchecked, rejected_before = plan_items(job_file)
    form = load_job(job_file).destination.extra.get("event_time_format", nv.DEFAULT_EVENT_TIME_FORMAT)
    sandbox = NotifyVisitorsSandbox(NotifyVisitorsSandboxConfig(limits={}, event_time_format=form))
    endpoint = {"users.csv": USER_CREATE, "legacy.csv": USER_CREATE, "events.csv": EVENT_CREATE}
    refused = {(f, r) for f, r, item in unchecked if sandbox_refuses(sandbox, endpoint[f], json.loads(item))}
    assert len(refused) > 50  # every rule has its rows: see nvfof_compat
    assert rejected - rejected_before == refused
    assert checked == [x for x in unchecked if x[:2] not in refused]


# --- the polars forms of the rules ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(emails, texts, texts.map(lambda s: f"a{s}@b.c"), texts.map(lambda s: f"a@b.c{s}"))))
def test_the_email_rule_is_the_sandboxs(values: list[str]) -> None:
    frame = pl.DataFrame({"v": values}, schema={"v": pl.String})
    found = frame.select(pl.col("v").str.contains(nvc._EMAIL)).to_series().to_list()
    assert found == [sandbox_module._EMAIL.fullmatch(v) is not None for v in values]


def test_flags_and_dates_read_text_as_python_does() -> None:
    # Lower case and whitespace: a text is a flag for polars exactly when it is for Python's strip().lower().
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    lowered = pl.Series(chars).str.to_lowercase().to_list()
    to_ascii = {c: low for c, low in zip(chars, lowered, strict=True) if low.isascii() and low.isalpha()}
    assert to_ascii == {c: c.lower() for c in chars if c.lower().isascii() and c.lower().isalpha()}
    flags = ["YES", "\x1c No\u3000", "\u212aeep", "İ", "of f", "1", " 0 ", "on\x85", "maybe", "TRUE"]
    texts_ = pl.Series(flags)
    refused = pl.DataFrame({"t": texts_}).select(nvc._not_a_flag(pl.col("t"))).to_series().to_list()

    def python_refuses(text: str) -> bool:
        try:
            nv.opt_in_flag(text)
        except ValueError:
            return True
        return False

    assert refused == [python_refuses(t) for t in flags]
    # Dates: what datetime.strptime reads; another script's digits are left to the builder (it reads them).
    days = ["2024-1-5", "2024-01- 5", " 2024-01-05", "2024-01-05 ", "2024-001-05", "2024-02-29", "2100-02-29"]
    days += ["2000-02-29", "0000-01-01", "0001-01-01", "9999-12-31", "2024-06-31", "2024-0-1", "٢٠٢٤-01-05"]
    frame = pl.DataFrame({"t": days})
    refused = frame.select(nvc._not_a_date(pl.col("t"))).to_series().to_list()

    def python_date(text: str) -> str | None:
        try:
            return nv.format_date(text)
        except ValueError:
            return None

    assert refused == [python_date(t) is None for t in days[:-1]] + [None]
    assert python_date("٢٠٢٤-01-05") == "2024-01-05"  # sent as a real date: not a row to reject


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.from_regex(r"\A\+?[0-9]{8,15}\Z"), max_size=20),
    st.lists(st.from_regex(validation_email, fullmatch=True).filter(lambda s: len(s) <= 254), max_size=3),
)
def test_the_validated_msisdn_and_email_columns_need_no_more_than_their_shortcuts(
    msisdns: list[str], emails_: list[str]
) -> None:
    """The ``msisdn:`` and ``email:`` columns were validated: the MSISDN check reads their form with byte tests
    (the full clean-up gives the same), and every address validation takes, the platform takes."""
    frame = pl.DataFrame({"m": [*msisdns, "+0123456789", "00123456789", "0012345678", "0091234567"]})
    shortcut = frame.select(nvc._validated_e164(pl.col("m"))).to_series()
    full = frame.select(nvc.e164_text(pl.col("m")).str.contains(E164_PATTERN)).to_series()
    assert shortcut.to_list() == full.to_list()
    assert all(sandbox_module._EMAIL.fullmatch(e) for e in emails_)


DATED_JOB = """
version: 1
name: nv-dates
destination:
  platform: notifyvisitors
  base_url: {url}
  secret: {{env: NV_TEST_KEY}}
  extra: {{brand_id: "{brand}"}}
defaults: {{ext_id: id}}
validation: {{timezone: Asia/Kolkata}}
sources:
  - name: users
    path: users.csv
    attributes:
      born: {{attribute: birth_date, type: date}}
      seen: {{attribute: last_seen, type: date}}
  - name: events
    kind: events
    path: events.csv
    event: event
    attributes:
      when: {{attribute: event_time, type: date}}
"""


async def test_a_date_outside_years_1_to_9999_where_it_is_written_is_a_rejected_row(
    nv_sandbox_factory: NvFactory, tmp_path: Path
) -> None:
    # 0001-01-01 at midnight in Asia/Kolkata is year 0 in UTC, 9999-12-31T23:00Z is year 10000 in Kolkata: the
    # builder's Python conversion raised on either (ValueError: year 0 is out of range; OverflowError) and the run
    # stopped as an internal error. Now rejected rows of the plan; the dates beside them, the edges that can be
    # written included, are sent.
    running = await nv_sandbox_factory(limits={})
    (tmp_path / "users.csv").write_text(
        "id,born,seen\n"
        "u1,1990-05-06,2024-01-01T10:00:00Z\n"
        "u2,0001-01-01,2024-01-01T10:00:00Z\n"
        "u3,1990-05-06,9999-12-31T23:00:00Z\n"
        "u4,0001-01-02,9999-12-31T18:00:00Z\n",
        "utf-8",
    )
    (tmp_path / "events.csv").write_text(
        "id,event,when\nu1,buy,2024-05-01 10:00:00\nu2,buy,0001-01-01 00:10:00\nu1,buy,9999-12-31 23:30:00\n",
        "utf-8",
    )
    (tmp_path / "job.yaml").write_text(DATED_JOB.format(url=running.url, brand=NV_BRAND_ID), "utf-8")
    job = load_job(tmp_path / "job.yaml")
    outcome = await run(job, RunOptions(api_key=NV_API_KEY))

    assert outcome.exit_code is ExitCode.PARTIAL  # rows were rejected; everything sent landed
    outside = (
        "falls outside years 0001-9999 in UTC or in time zone Asia/Kolkata: it cannot be written as "
        + ("NotifyVisitors takes dates")
    )
    assert [r[:4] for r in rejected_rows(job.workdir / "rejects.csv")] == [
        ("events.csv", 2, "when", f"event_time {outside}"),
        ("users.csv", 2, "born", f"birth_date {outside}"),
        ("users.csv", 3, "seen", f"last_seen {outside}"),
    ]
    users = running.sandbox.state.users
    assert sorted(users) == ["u1", "u4"]
    assert users["u4"]["birth_date"] == "0001-01-02"
    assert users["u4"]["last_seen"] == "9999-12-31 23:30:00"
    assert sorted(e.event_time for e in running.sandbox.state.events) == [
        "2024-05-01 10:00:00",
        "9999-12-31 23:30:00",
    ]
