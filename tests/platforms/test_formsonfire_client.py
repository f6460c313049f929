"""The Forms On Fire push builders and serialisers (pure) and the connector (against the real local sandbox)."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest_formsonfire import FOF_COMPANY, FOF_KEY, FofFactory, RunningFormsOnFire
from structlog.testing import capture_logs

from sync.config import Destination, Job, RateBudgetSpec, RetryPolicy, load_job
from sync.errors import BadJobError, ExitCode, FatalPlatformError, RejectedBatchError, RetryableError
from sync.ledger.ledger import Ledger
from sync.platforms.base import PlatformClient
from sync.platforms.formsonfire import XSI_NAMESPACE, BodyFormat, UserKey
from sync.platforms.formsonfire.client import FormsOnFireClient, error_in_body
from sync.platforms.formsonfire.requests import (
    batch_id_for,
    make_batch,
    push_body,
    push_of,
    serialise,
    split_batch,
    to_json,
    to_xml,
    user_of,
)
from sync.records import Batch, Operation, RowRef
from sync.run import RunOptions, run

# --- builders and serialisers -------------------------------------------------------------------------------


def test_push_body_and_its_checks() -> None:
    body = push_body(UserKey.USER_EXTERNAL_ID, "crm-1", title="Hi", body="B", sound=True, expiry_secs=0)
    assert body == {"UserExternalId": "crm-1", "Title": "Hi", "Body": "B", "Sound": True, "ExpirySecs": 0}
    assert push_body("UserEmail", "a@example.test") == {"UserEmail": "a@example.test"}
    assert user_of(body) == "crm-1"
    for bad in (
        lambda: push_body("UserId", " "),
        lambda: push_body("UserId", "u", expiry_secs=-1),
        lambda: push_body("UserId", "u", expiry_secs=True),
        lambda: push_body("UserId", "u", sound="yes"),  # type: ignore[arg-type]
        lambda: push_body("Nickname", "u"),
    ):
        with pytest.raises(ValueError):
            bad()


def test_xml_has_the_namespace_and_alphabetical_elements() -> None:
    body = push_body("UserId", "u<1>", title="Tom & Jerry", sound=False, expiry_secs=5)
    raw = to_xml(body, 42, "k&y")
    root = ET.fromstring(raw)
    assert raw.startswith(f'<PushRequest xmlns:i="{XSI_NAMESPACE}">'.encode())
    names = [child.tag for child in root]
    assert names == sorted(names) == ["CompanyId", "ExpirySecs", "IntegrationKey", "Sound", "Title", "UserId"]
    assert root.findtext("Title") == "Tom & Jerry" and root.findtext("UserId") == "u<1>"
    assert root.findtext("Sound") == "false" and root.findtext("CompanyId") == "42"
    assert to_xml({"UserId": "u", "Title": None}, 1, "k").count(b'i:nil="true"') == 1
    assert json.loads(to_json(body, 42, "key")) == {**body, "CompanyId": 42, "IntegrationKey": "key"}
    payload, content_type = serialise(body, BodyFormat.XML, 42, "k", xml_root="Push")
    assert content_type == "application/xml" and payload.startswith(b"<Push ")


def test_batches_name_one_user_carry_no_credentials_and_have_stable_ids() -> None:
    body = push_body("UserExternalId", "crm-1", title="Hi")
    first = make_batch(body, origin=RowRef("pushes.csv", 3))
    again = make_batch(body, origin=RowRef("pushes.csv", 3))
    other_row = make_batch(body, origin=RowRef("pushes.csv", 4))
    assert first.batch_id == again.batch_id != other_row.batch_id
    assert first.batch_id == batch_id_for(body, "pushes.csv:3")
    assert first.ext_ids == ("crm-1",) and first.endpoint == "push" and first.operation is Operation.SEND_PUSH
    assert first.origins == {"crm-1": RowRef("pushes.csv", 3)}
    assert b"IntegrationKey" not in first.body and b"CompanyId" not in first.body
    assert (
        push_of(first.body) == body
        and first.body == json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    )
    assert split_batch(first) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"MessageId": 1}', None),
        (b"", None),
        (b'{"ResponseStatus": null}', None),
        (b'{"ResponseStatus": {"ErrorCode": "UserNotFound", "Message": "no"}}', ("UserNotFound", "no")),
        (b'{"ErrorCode": "X"}', ("X", "X")),
        (b'{"Error": "broken"}', ("Error", "broken")),
        (b'{"Success": false, "Message": "m"}', ("Error", "m")),
        (b"<R><ResponseStatus><ErrorCode>E</ErrorCode><Message>m</Message></ResponseStatus></R>", ("E", "m")),
        (b'<R xmlns="urn:x"><ResponseStatus><ErrorCode>E</ErrorCode></ResponseStatus></R>', ("E", "E")),
        (b"<R><MessageId>3</MessageId></R>", None),
    ],
)
def test_error_in_body(raw: bytes, expected: tuple[str, str] | None) -> None:
    assert error_in_body(raw) == expected


# --- the connector ------------------------------------------------------------------------------------------


def push(user: str = "crm-1", *, sound: bool | None = None, expiry_secs: int | None = None) -> Batch:
    return make_batch(
        push_body("UserExternalId", user, title="Hi", body="Body", sound=sound, expiry_secs=expiry_secs)
    )


@pytest.mark.parametrize(
    ("body_format", "response_format"), [("json", "json"), ("xml", "xml"), ("xml", "json")]
)
async def test_sends_json_or_xml(
    fof_sandbox: RunningFormsOnFire, body_format: str, response_format: str
) -> None:
    async with fof_sandbox.client(body_format=body_format, response_format=response_format) as client:
        assert isinstance(client, PlatformClient)
        outcome = await client.send(push(sound=True, expiry_secs=30))
    assert outcome.http_status == 200
    if response_format == "json":
        assert outcome.body == {"MessageId": 1}
    else:
        assert "<MessageId>1</MessageId>" in str(outcome.body)
    (received,) = fof_sandbox.sandbox.state.pushes
    assert (received.user, received.format, received.sound, received.expiry_secs) == (
        "api-1",
        body_format,
        True,
        30,
    )


async def test_in_body_errors_are_rejected_batches(fof_sandbox: RunningFormsOnFire) -> None:
    for body_format in ("json", "xml"):
        async with fof_sandbox.client(body_format=body_format) as client:
            with pytest.raises(RejectedBatchError) as info:
                await client.send(push("crm-404"))
            assert info.value.status == 200 and info.value.code == "UserNotFound"
            assert client.split(push("crm-404")) is None
    assert fof_sandbox.sandbox.state.pushes == []


async def test_wrong_credentials_inside_a_200_are_fatal_and_never_leak(
    fof_sandbox: RunningFormsOnFire,
) -> None:
    wrong = "wrong-integration-key-xyz"
    for destination, key in (
        (fof_sandbox.destination(), wrong),
        (fof_sandbox.destination(company_id="1"), FOF_KEY),
    ):
        async with FormsOnFireClient(destination, key, timeout=5) as client:
            with pytest.raises(FatalPlatformError) as info:
                await client.send(push())
        assert (
            info.value.code == "Unauthorized"
            and wrong not in str(info.value)
            and FOF_KEY not in str(info.value)
        )
    with pytest.raises(ValueError, match="company_id"):
        FormsOnFireClient(Destination("formsonfire", fof_sandbox.url), FOF_KEY)


async def test_wrong_credentials_inside_a_400_are_fatal_too(fof_sandbox_factory: FofFactory) -> None:
    # A server that reports in-body errors with 400 (the sandbox's error_status): Unauthorized was a rejected
    # push like a bad parameter, so with fatal_after: 0 every push of the run was refused one by one (exit 1)
    # instead of the run stopping at the first (exit 3).
    running = await fof_sandbox_factory(error_status=400)
    destination = running.destination(fatal_after="0")
    async with FormsOnFireClient(destination, "wrong-integration-key-xyz", timeout=5) as client:
        with pytest.raises(FatalPlatformError) as info:
            await client.send(push())
    assert (info.value.status, info.value.code) == (400, "Unauthorized")
    assert "wrong-integration-key-xyz" not in str(info.value) and "check the IntegrationKey" in str(
        info.value
    )
    async with FormsOnFireClient(destination, FOF_KEY, timeout=5) as client:
        with pytest.raises(RejectedBatchError) as refused:  # a user's own refusal under 400 stays a rejection
            await client.send(push("crm-404"))
    assert (refused.value.status, refused.value.code) == (400, "UserNotFound")


async def test_bad_parameters_are_rejected_and_transient_failures_retryable(
    fof_sandbox_factory: FofFactory,
) -> None:
    strict_root = await fof_sandbox_factory(xml_root="Push")
    async with strict_root.client(body_format="xml") as client:
        with pytest.raises(RejectedBatchError) as info:
            await client.send(push())
    assert info.value.status == 400 and info.value.code == "SerializationException"
    async with strict_root.client(body_format="xml", xml_root="Push") as client:
        assert (await client.send(push())).http_status == 200
    for fault, status in (("error_500", 500), ("error_503", 503), ("drop", None)):
        running = await fof_sandbox_factory(faults={fault: 1.0})
        async with running.client() as client:
            with pytest.raises(RetryableError) as retry:
                await client.send(push())
        assert retry.value.status == status
    limited = await fof_sandbox_factory(limits={"push": {"requests": 0, "window": 60}})
    async with limited.client(body_format="xml") as client:
        with pytest.raises(RetryableError) as retry:
            await client.send(push())
    assert retry.value.rate_limited and retry.value.remaining == 0 and retry.value.retry_after is not None


async def test_wrong_base_url_is_fatal(fof_sandbox: RunningFormsOnFire) -> None:
    destination = Destination(
        "formsonfire", fof_sandbox.root_url + "/api/v1/", extra={"company_id": str(FOF_COMPANY)}
    )
    async with FormsOnFireClient(destination, FOF_KEY, timeout=5) as client:
        with pytest.raises(FatalPlatformError) as info:
            await client.send(push())
    assert info.value.status == 404


async def test_an_error_in_a_200_is_found_in_camel_case_after_a_bom_or_at_the_xml_root(
    unused_tcp_port: int,
) -> None:
    """A small server answering 200 with an error in shapes the sandbox does not use: ServiceStack on .NET Core
    writes JSON in camelCase, .NET's UTF-8 writers may put a byte order mark before the XML, and an XML body may
    carry the error at its root as JSON bodies do. Each was read as no error: the push counted as sent."""
    from aiohttp import web

    answers = {
        "camel": (b'{"responseStatus":{"errorCode":"UserNotFound","message":"no such user"}}', "json"),
        "camel-top": (b'{"errorCode":"UserNotFound","message":"no such user"}', "json"),
        "camel-success": (b'{"success":false,"message":"no such user"}', "json"),
        "bom": (
            b"\xef\xbb\xbf<PushResponse><ResponseStatus><ErrorCode>UserNotFound</ErrorCode>"
            b"<Message>no such user</Message></ResponseStatus></PushResponse>",
            "xml",
        ),
        "xml-top": (
            b"<PushResponse><ErrorCode>UserNotFound</ErrorCode><Message>no such user</Message></PushResponse>",
            "xml",
        ),
        "xml-success": (
            b"<PushResponse><Success>false</Success><Message>no such user</Message></PushResponse>",
            "xml",
        ),
        "camel-key": (b'{"responseStatus":{"errorCode":"Unauthorized","message":"bad key"}}', "json"),
    }

    async def answer(request: web.Request) -> web.Response:
        user = json.loads(await request.read())["UserExternalId"]
        body, fmt = answers[user]
        return web.Response(body=body, content_type=f"application/{fmt}")

    app = web.Application()
    app.router.add_post("/api/v2/push", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    destination = Destination(
        "formsonfire", f"http://127.0.0.1:{unused_tcp_port}/api/v2/", extra={"company_id": str(FOF_COMPANY)}
    )
    try:
        for user in ("camel", "camel-top", "bom", "xml-top"):
            async with FormsOnFireClient(destination, FOF_KEY, timeout=5) as client:
                with pytest.raises(RejectedBatchError) as refused:
                    await client.send(push(user))
            assert (refused.value.code, refused.value.message) == ("UserNotFound", "no such user"), user
        for user in ("camel-success", "xml-success"):
            async with FormsOnFireClient(destination, FOF_KEY, timeout=5) as client:
                with pytest.raises(RejectedBatchError) as refused:
                    await client.send(push(user))
            assert (refused.value.code, refused.value.message) == ("Error", "no such user"), user
        async with FormsOnFireClient(destination, FOF_KEY, timeout=5) as client:
            with pytest.raises(FatalPlatformError) as fatal:
                await client.send(push("camel-key"))
        assert fatal.value.code == "Unauthorized" and FOF_KEY not in str(fatal.value)
    finally:
        await runner.cleanup()


# --- the example job end to end -----------------------------------------------------------------------------

EXAMPLE_JOB = Path(__file__).resolve().parents[2] / "jobs" / "formsonfire.yaml"


def example_job(url: str, workdir: Path, **extra: str) -> Job:
    """``jobs/formsonfire.yaml`` aimed at a sandbox, with fast retries and a budget above the sandbox's limit."""
    job = load_job(EXAMPLE_JOB)
    destination = dataclasses.replace(
        job.destination,
        base_url=url,
        extra={**job.destination.extra, "company_id": str(FOF_COMPANY), **extra},
    )
    dispatch = dataclasses.replace(
        job.dispatch,
        request_timeout=1.0,
        budgets={"push": RateBudgetSpec(requests=8, period=0.25)},
        retry=RetryPolicy(max_attempts=12, base_delay=0.01, max_delay=0.05),
    )
    return dataclasses.replace(job, destination=destination, dispatch=dispatch, workdir=workdir)


@pytest.mark.parametrize(
    ("body_format", "response_format"), [("xml", "json"), ("json", "json"), ("xml", "xml")]
)
async def test_example_job_end_to_end_with_faults_and_limits(
    fof_sandbox_factory: FofFactory, tmp_path: Path, body_format: str, response_format: str
) -> None:
    running = await fof_sandbox_factory(
        limits={"push": {"requests": 1, "window": 0.25}},  # the job's budget allows 8: 429s must happen
        faults={
            "error_500": 0.2,
            "error_503": 0.1,
            "drop": 0.1,
            "slow": 0.1,
            "latency": {"low": 0.01, "high": 0.05},
        },
        seed=5,
    )
    job = example_job(
        running.url, tmp_path / "work", body_format=body_format, response_format=response_format
    )
    with capture_logs() as logs:
        outcome = await run(job, RunOptions(api_key=FOF_KEY))
    assert logs and FOF_KEY not in repr(logs) and FOF_KEY not in json.dumps(outcome.summary.to_json())

    assert outcome.exit_code is ExitCode.PARTIAL  # crm-404 is not a user of the company
    pushes = {p.user: p for p in running.sandbox.state.pushes}
    assert len(running.sandbox.state.pushes) == 3  # no fault here applies a push twice
    assert {u: (p.title, p.body, p.sound, p.expiry_secs, p.format, p.by) for u, p in pushes.items()} == {
        "api-1": (
            "Inspection due",
            "Your site inspection form is due today.",
            True,
            3600,
            body_format,
            "UserExternalId",
        ),
        "api-2": (
            "Message from the office",
            "Please sync your device.",
            True,
            86400,
            body_format,
            "UserExternalId",
        ),
        "api-3": ("Shift change", "Your shift starts at 07:00.", False, 600, body_format, "UserExternalId"),
    }
    stats = running.sandbox.stats.snapshot()
    assert stats["rate_limited_total"] > 0 and sum(stats["faults"].values()) > 0
    assert stats["max_in_window"]["push"]["max"] <= 1
    assert (
        outcome.summary.ids_ok == 3 and outcome.summary.ids_rejected == 1 and outcome.summary.ids_failed == 0
    )
    with Ledger.open(outcome.ledger_path) as ledger:
        refused = ledger.refused_ids(outcome.run_id)
    assert [(r[1], r[2]) for r in refused] == [("crm-404", "UserNotFound")]
    assert FOF_KEY not in outcome.ledger_path.read_bytes().decode("latin-1")


async def test_example_job_aborts_on_a_wrong_integration_key(
    fof_sandbox_factory: FofFactory, tmp_path: Path
) -> None:
    running = await fof_sandbox_factory()
    outcome = await run(example_job(running.url, tmp_path / "work"), RunOptions(api_key="not-the-key-123"))
    assert outcome.exit_code is ExitCode.ABORTED
    assert running.sandbox.state.pushes == []


async def test_example_job_against_the_sandbox_the_readme_starts_refuses_crm_404(
    fof_sandbox_factory: FofFactory, tmp_path: Path
) -> None:
    # README: `pushsync sandbox formsonfire ... --seed-file jobs/data/formsonfire_sandbox.json`. Without known
    # users the sandbox accepted crm-404 and the run ended 0, while the README promises exit 1 and the sample
    # row says "Nobody has this external ID".
    seed = EXAMPLE_JOB.parent / "data" / "formsonfire_sandbox.json"
    running = await fof_sandbox_factory(users=(), seed_file=seed)
    outcome = await run(example_job(running.url, tmp_path / "work"), RunOptions(api_key=FOF_KEY))
    assert outcome.exit_code is ExitCode.PARTIAL
    assert sorted(p.user for p in running.sandbox.state.pushes) == ["api-1", "api-2", "api-3"]
    with Ledger.open(outcome.ledger_path) as ledger:
        assert [(r[1], r[2]) for r in ledger.refused_ids(outcome.run_id)] == [("crm-404", "UserNotFound")]


def test_job_problems_are_reported_at_load(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("id,t\n1,a\n", encoding="utf-8")
    (tmp_path / "job.yaml").write_text(
        """
version: 1
destination:
  platform: formsonfire
  base_url: "http://127.0.0.1:1/api/v2/"
  secret: {env: X}
  extra: {body_format: yaml, user_key: Nickname}
defaults: {ext_id: id}
sources:
  - {name: p, path: p.csv, attributes: {t: {attribute: Subject}}}
  - {name: e, kind: events, path: p.csv, event: t}
dispatch: {batch_size: 10}
""",
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(tmp_path / "job.yaml")
    where = {p.location for p in info.value.problems}
    assert where == {
        "dispatch.batch_size",
        "destination.extra.company_id",
        "destination.extra.body_format",
        "destination.extra.user_key",
        "sources[0].attributes.t",
        "sources[1].kind",
    }


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        # read as a flag, anything but a yes sent Sound false with every push
        ('sound: "ture"', "must be true or false"),
        # ignored without a word: every push went out as JSON
        ("body_fromat: xml", "did you mean body_format?"),
        # every XML body was not well-formed, every push refused
        ('xml_root: "Push Request"', "must be an XML element name"),
    ],
)
def test_settings_that_would_change_every_push_are_refused_at_load(
    tmp_path: Path, setting: str, message: str
) -> None:
    (tmp_path / "p.csv").write_text("id,t\n1,a\n", encoding="utf-8")
    (tmp_path / "job.yaml").write_text(
        f"""
version: 1
destination:
  platform: formsonfire
  base_url: "http://127.0.0.1:1/api/v2/"
  secret: {{env: X}}
  extra: {{company_id: "1", {setting}}}
defaults: {{ext_id: id}}
sources:
  - {{name: p, path: p.csv, attributes: {{t: {{attribute: Title}}}}}}
""",
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(tmp_path / "job.yaml")
    (problem,) = info.value.problems
    assert problem.location == f"destination.extra.{setting.split(':')[0]}"
    assert message in problem.message


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        # str.isdigit() took "²" and int() then raised: validate printed a traceback (exit 5), not the problem
        ('expiry_secs: "²"', "must be a whole number of seconds"),
        # passed validation, then the client's int() raised when the run started
        ('fatal_after: "³"', "must be a whole number"),
    ],
)
def test_a_number_setting_with_a_digit_int_cannot_read_is_a_job_problem_not_a_crash(
    tmp_path: Path, setting: str, message: str
) -> None:
    (tmp_path / "p.csv").write_text("id,t\n1,a\n", encoding="utf-8")
    (tmp_path / "job.yaml").write_text(
        f"""
version: 1
destination:
  platform: formsonfire
  base_url: "http://127.0.0.1:1/api/v2/"
  secret: {{env: X}}
  extra: {{company_id: "1", {setting}}}
defaults: {{ext_id: id}}
sources:
  - {{name: p, path: p.csv, attributes: {{t: {{attribute: Title}}}}}}
""",
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(tmp_path / "job.yaml")
    (problem,) = info.value.problems
    assert problem.location == f"destination.extra.{setting.split(':')[0]}"
    assert message in problem.message


def test_a_company_id_beyond_an_integer_is_refused_at_load(tmp_path: Path) -> None:
    # A typo (one digit too many) went out with every push: the platform cannot read CompanyId beyond an
    # Integer (the sandbox: 400 SerializationException), so each push was recorded as refused until fatal_after
    # stopped the run blaming the IntegrationKey.
    (tmp_path / "p.csv").write_text("id,t\n1,a\n", encoding="utf-8")
    (tmp_path / "job.yaml").write_text(
        """
version: 1
destination:
  platform: formsonfire
  base_url: "http://127.0.0.1:1/api/v2/"
  secret: {env: X}
  extra: {company_id: "21474836470"}
defaults: {ext_id: id}
sources:
  - {name: p, path: p.csv, attributes: {t: {attribute: Title}}}
""",
        encoding="utf-8",
    )
    with pytest.raises(BadJobError) as info:
        load_job(tmp_path / "job.yaml")
    (problem,) = info.value.problems
    assert problem.location == "destination.extra.company_id"
    assert "21474836470 is out of its range (up to 2147483647)" in problem.message
