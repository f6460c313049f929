"""Forms On Fire, one bad row must not cost the others (issue 18, items 1–5), against the strict sandbox.

* a value the platform cannot take (``ExpirySecs`` negative or not an Integer; in XML bodies a character XML 1.0
  cannot carry) is a rejected row found by ``plan`` (file, row, column), and the run sends the others; so is an
  ID of whitespace alone, which names no user (it stopped the run);
* XML bodies carry the text exactly (a carriage return survives the parser's end-of-line normalisation);
* a wrong key stops the run whatever in-body code the platform uses for it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest_formsonfire import FOF_COMPANY, FOF_KEY, FofFactory, RunningFormsOnFire, credentials

from sync.config import Job, load_job
from sync.errors import BadJobError, ExitCode, FatalPlatformError
from sync.ledger.ledger import Ledger
from sync.planning.planning import build_plan
from sync.platforms.formsonfire.client import FormsOnFireClient
from sync.platforms.formsonfire.requests import make_batch, push_body, to_xml
from sync.run import RunOptions, run


def write_job(
    tmp_path: Path, url: str, rows: list[dict[str, Any]], *, body_format: str = "json", **extra: str
) -> Job:
    """A job pushing ``rows`` (crm_id, title, message, expiry) from a Parquet file: exact strings, no CSV
    quoting in the way."""
    data = tmp_path / "pushes.parquet"
    pl.DataFrame(
        rows, schema={"crm_id": pl.String, "title": pl.String, "message": pl.String, "expiry": pl.String}
    ).write_parquet(data)
    more = "".join(f"\n    {k}: {v!r}" for k, v in extra.items())
    (tmp_path / "job.yaml").write_text(
        f"""
version: 1
name: fof-rows
destination:
  platform: formsonfire
  base_url: {url}
  secret: {{env: FOF_TEST_KEY}}
  verify_tls: false
  extra:
    company_id: "{FOF_COMPANY}"
    body_format: {body_format}
    user_key: UserExternalId{more}
defaults: {{ext_id: crm_id}}
sources:
  - name: pushes
    path: pushes.parquet
    attributes:
      title: {{attribute: Title}}
      message: {{attribute: Body}}
      expiry: {{attribute: ExpirySecs, type: number}}
dispatch:
  concurrency: 4
  retry: {{max_attempts: 3, base_delay: 0.01, max_delay: 0.05}}
""",
        encoding="utf-8",
    )
    return load_job(tmp_path / "job.yaml")


def row(user: str, *, title: str = "Hi", message: str = "Body", expiry: str | None = "60") -> dict[str, Any]:
    return {"crm_id": user, "title": title, "message": message, "expiry": expiry}


@pytest.mark.parametrize("body_format", ["json", "xml"])
async def test_an_expiry_the_platform_cannot_take_is_a_rejected_row_and_the_run_goes_on(
    fof_sandbox_factory: FofFactory, tmp_path: Path, body_format: str
) -> None:
    running = await fof_sandbox_factory(users=(), unknown_user="accept")
    rows = [
        row("crm-1"),
        row("crm-2", expiry="-5"),  # item 1: a negative expiry crashed the whole run
        row("crm-3", expiry="1.5"),  # item 2: sent as 1
        row("crm-4", expiry="3000000000"),  # above Int32
        row("crm-5", expiry="0"),
        row("crm-6", expiry=None),
    ]
    job = write_job(tmp_path, running.url, rows, body_format=body_format)
    with build_plan(job) as plan:  # plan finds them: nothing is sent to learn it
        rejected = [(r.row, r.column, r.ext_id) for r in plan.rejected_rows()]
        assert plan.summary().total_requests == 3
    assert rejected == [(2, "expiry", "crm-2"), (3, "expiry", "crm-3"), (4, "expiry", "crm-4")]

    outcome = await run(job, RunOptions(api_key=FOF_KEY))
    assert outcome.exit_code is ExitCode.PARTIAL
    pushes = {p.user: p.expiry_secs for p in running.sandbox.state.pushes}
    assert pushes == {"UserExternalId:crm-1": 60, "UserExternalId:crm-5": 0, "UserExternalId:crm-6": None}
    with Ledger.open(outcome.ledger_path) as ledger:
        rows_ = ledger.rejected_rows(outcome.run_id)
    assert sorted((r.ext_id, r.column) for r in rows_) == [
        ("crm-2", "expiry"),
        ("crm-3", "expiry"),
        ("crm-4", "expiry"),
    ]
    assert all("ExpirySecs" in r.reason for r in rows_)


@pytest.mark.parametrize("body_format", ["json", "xml"])
async def test_a_blank_id_is_a_rejected_row_not_the_end_of_the_run(
    fof_sandbox_factory: FofFactory, tmp_path: Path, body_format: str
) -> None:
    # With trim: false validation keeps an ID of spaces; the builder raised ValueError on it and the run died.
    running = await fof_sandbox_factory(users=(), unknown_user="accept")
    write_job(tmp_path, running.url, [row("crm-1"), row(" \u3000 "), row("crm-3")], body_format=body_format)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        job_file.read_text(encoding="utf-8") + "validation: {trim: false}\n", encoding="utf-8"
    )
    outcome = await run(load_job(job_file), RunOptions(api_key=FOF_KEY))
    assert outcome.exit_code is ExitCode.PARTIAL
    assert sorted(p.user for p in running.sandbox.state.pushes) == [
        "UserExternalId:crm-1",
        "UserExternalId:crm-3",
    ]
    with Ledger.open(outcome.ledger_path) as ledger:
        rejected = [(r.row, r.column, r.reason) for r in ledger.rejected_rows(outcome.run_id)]
    assert rejected == [(2, "crm_id", "UserExternalId is blank (whitespace alone): it names no user")]


async def test_xml_bodies_carry_the_text_exactly(fof_sandbox_factory: FofFactory, tmp_path: Path) -> None:
    running = await fof_sandbox_factory(users=(), unknown_user="accept")
    texts = {
        "crm-1": "line1\r\nline2",
        "crm-2": "cr\ronly",
        "crm-3": "tabs\tand\nnewlines  inside",  # (the job trims cells at their ends: validation.trim)
        "crm-4": "Tom & Jerry <b>]]></b> \"quoted\" 'single' ünïcödé 😀",
        "crm-5": "crlf at the end\r\n.",
    }
    rows = [row(user, title=text, message=text + "!") for user, text in texts.items()]
    outcome = await run(
        write_job(tmp_path, running.url, rows, body_format="xml"), RunOptions(api_key=FOF_KEY)
    )
    assert outcome.exit_code is ExitCode.OK
    got = {p.user.removeprefix("UserExternalId:"): (p.title, p.body) for p in running.sandbox.state.pushes}
    assert got == {user: (text, text + "!") for user, text in texts.items()}
    assert all(p.format == "xml" for p in running.sandbox.state.pushes)


@pytest.mark.parametrize("expiry", [1.5, 2**31, -(2**31) - 1])
async def test_the_sandbox_refuses_an_expiry_that_is_not_a_32_bit_integer(
    fof_sandbox: RunningFormsOnFire, expiry: float
) -> None:
    reply = await fof_sandbox.push(credentials(UserExternalId="crm-1", ExpirySecs=expiry))
    assert (reply.status, reply.error_code) == (400, "SerializationException")
    xml = f'<PushRequest xmlns:i="http://www.w3.org/2001/XMLSchema-instance"><CompanyId>{FOF_COMPANY}</CompanyId>'
    xml += f"<ExpirySecs>{expiry}</ExpirySecs><IntegrationKey>{FOF_KEY}</IntegrationKey>"
    xml += "<UserExternalId>crm-1</UserExternalId></PushRequest>"
    reply = await fof_sandbox.push(xml, content_type="application/xml", format="json")
    assert (reply.status, reply.error_code) == (400, "SerializationException")
    assert fof_sandbox.sandbox.state.pushes == []


def test_xml_serialisation_round_trips_and_refuses_what_xml_cannot_carry() -> None:
    body = push_body("UserExternalId", "u1", title="a\r\nb\rc", body="x & y")
    root = ET.fromstring(to_xml(body, 1, "key"))
    assert (root.findtext("Title"), root.findtext("Body")) == ("a\r\nb\rc", "x & y")
    with pytest.raises(ValueError, match="U\\+0007"):
        to_xml(push_body("UserExternalId", "u1", title="bell\x07"), 1, "key")


@pytest.mark.parametrize("body_format", ["xml", "json"])
async def test_characters_xml_cannot_carry_are_rejected_rows_in_xml_mode_only(
    fof_sandbox_factory: FofFactory, tmp_path: Path, body_format: str
) -> None:
    running = await fof_sandbox_factory(users=(), unknown_user="accept")
    rows = [
        row("crm-1"),
        row("crm-2", title="bell\x07"),
        row("crm-3", message="nul-ish\x1b[0m"),
        row("crm-4"),
    ]
    job = write_job(tmp_path, running.url, rows, body_format=body_format)
    outcome = await run(job, RunOptions(api_key=FOF_KEY))
    with Ledger.open(outcome.ledger_path) as ledger:
        rejected = sorted((r.ext_id, r.column) for r in ledger.rejected_rows(outcome.run_id))
        refused = ledger.refused_ids(outcome.run_id)
    assert refused == []  # nothing reached the platform to be refused there
    users = sorted(p.user.removeprefix("UserExternalId:") for p in running.sandbox.state.pushes)
    if body_format == "xml":
        assert outcome.exit_code is ExitCode.PARTIAL
        assert rejected == [("crm-2", "title"), ("crm-3", "message")]
        assert users == ["crm-1", "crm-4"]
    else:  # JSON carries them
        assert outcome.exit_code is ExitCode.OK and rejected == []
        assert users == ["crm-1", "crm-2", "crm-3", "crm-4"]
        titles = {p.user: p.title for p in running.sandbox.state.pushes}
        assert titles["UserExternalId:crm-2"] == "bell\x07"


def test_job_problems_for_message_fields_and_constants(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("id,e,s\n1,5,true\n", encoding="utf-8")
    (tmp_path / "job.yaml").write_text(
        """
version: 1
destination:
  platform: formsonfire
  base_url: "http://127.0.0.1:1/api/v2/"
  secret: {env: X}
  extra: {company_id: "1", body_format: xml, title: "bell\\a", fatal_after: "-1", expiry_secs: "99999999999"}
defaults: {ext_id: id}
sources:
  - {name: p, path: p.csv, attributes: {e: {attribute: ExpirySecs}, s: {attribute: Sound}}}
""",
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(tmp_path / "job.yaml")
    assert {p.location for p in info.value.problems} == {
        "destination.extra.title",
        "destination.extra.fatal_after",
        "destination.extra.expiry_secs",
        "sources[0].attributes.e",
        "sources[0].attributes.s",
    }


async def test_a_wrong_key_stops_the_run_whatever_its_error_code(
    fof_sandbox_factory: FofFactory, tmp_path: Path
) -> None:
    # The credential error's code is not documented: this platform calls it something the client does not know.
    running = await fof_sandbox_factory(
        users=(), unknown_user="accept", auth_error_code="CredentialsRejected"
    )
    rows = [row(f"crm-{i}") for i in range(60)]
    outcome = await run(write_job(tmp_path, running.url, rows), RunOptions(api_key="not-the-key-123"))
    assert outcome.exit_code is ExitCode.ABORTED
    requests = running.sandbox.stats.requests("push")
    assert 10 <= requests <= 10 + 4  # fatal_after, plus what the four workers had in flight
    assert running.sandbox.state.pushes == []
    assert outcome.summary.to_json() and "not-the-key-123" not in str(outcome.summary.to_json())


async def test_the_fatal_codes_and_the_threshold_are_settings(fof_sandbox_factory: FofFactory) -> None:
    running = await fof_sandbox_factory(
        users=(), unknown_user="accept", auth_error_code="CredentialsRejected"
    )
    push = make_batch(push_body("UserExternalId", "crm-1", title="Hi"))
    listed = running.destination(fatal_error_codes="CredentialsRejected, Other", fatal_after="0")
    async with FormsOnFireClient(listed, "wrong-key-1234", timeout=5) as client:
        with pytest.raises(FatalPlatformError) as info:
            await client.send(push)  # the first answer: the code is listed
    assert info.value.code == "CredentialsRejected" and "wrong-key-1234" not in info.value.message


async def test_refusals_of_single_users_do_not_stop_the_run(
    fof_sandbox_factory: FofFactory, tmp_path: Path
) -> None:
    # The first rows name users the company does not have, then one it has: different refusals, or a success
    # before the threshold, keep the run going.
    running = await fof_sandbox_factory(unknown_user="error")
    rows = [row(f"ghost-{i}") for i in range(5)] + [row("crm-1"), row("crm-2")]
    outcome = await run(write_job(tmp_path, running.url, rows, fatal_after="6"), RunOptions(api_key=FOF_KEY))
    assert outcome.exit_code is ExitCode.PARTIAL
    assert sorted(p.user for p in running.sandbox.state.pushes) == ["api-1", "api-2"]
