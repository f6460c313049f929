"""The Forms On Fire sandbox: JSON and XML bodies (xmlns:i, alphabetical order), the format parameter, credentials
in the body, errors inside 200s, 400/404/405, known users, faults, limits and inspection — over real HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest_formsonfire import FOF_COMPANY, FOF_KEY, FofFactory, RunningFormsOnFire, credentials
from sandbox_fixtures import start_sandbox_process, stop_sandbox_process

from sync.cli import main
from sync.platforms.formsonfire import XSI_NAMESPACE

NS = f'xmlns:i="{XSI_NAMESPACE}"'


def xml(*elements: str, root: str = "PushRequest", ns: str = NS) -> str:
    return f"<{root} {ns}>{''.join(elements)}</{root}>"


def creds_xml() -> tuple[str, str]:
    return f"<CompanyId>{FOF_COMPANY}</CompanyId>", f"<IntegrationKey>{FOF_KEY}</IntegrationKey>"


@pytest.mark.parametrize(
    ("field", "value", "user"),
    [
        ("UserId", "api-2", "api-2"),
        ("UserEmail", "BOB@example.test", "api-2"),
        ("UserExternalId", "crm-3", "api-3"),
    ],
)
async def test_json_push_by_each_identifier(
    fof_sandbox: RunningFormsOnFire, field: str, value: str, user: str
) -> None:
    reply = await fof_sandbox.push(
        credentials(**{field: value}, Title="Hi", Body="There", Sound=True, ExpirySecs=60)
    )
    assert reply.status == 200 and reply.content_type == "application/json"
    assert reply.json == {"MessageId": 1}
    (push,) = fof_sandbox.sandbox.state.pushes
    assert (push.user, push.by, push.title, push.body, push.sound, push.expiry_secs, push.format) == (
        user,
        field,
        "Hi",
        "There",
        True,
        60,
        "json",
    )


@pytest.mark.parametrize("content_type", ["application/xml", "text/xml; charset=utf-8", None])
async def test_xml_push_with_or_without_content_type(
    fof_sandbox: RunningFormsOnFire, content_type: str | None
) -> None:
    company, key = creds_xml()
    body = xml(
        "<Body>a &amp; b</Body>",
        company,
        "<ExpirySecs>30</ExpirySecs>",
        key,
        "<Sound>false</Sound>",
        '<Title i:nil="true"/>',
        "<UserExternalId>crm-1</UserExternalId>",
    )
    reply = await fof_sandbox.push(body, content_type=content_type, format="xml")
    assert reply.status == 200 and reply.content_type == "application/xml"
    assert reply.xml.tag == "PushResponse" and reply.xml.findtext("MessageId") == "1"
    (push,) = fof_sandbox.sandbox.state.pushes
    assert (push.user, push.body, push.sound, push.expiry_secs, push.title, push.format) == (
        "api-1",
        "a & b",
        False,
        30,
        None,
        "xml",
    )


async def test_format_parameter_chooses_the_answer_and_defaults_to_the_body_format(
    fof_sandbox: RunningFormsOnFire,
) -> None:
    company, key = creds_xml()
    body = xml(company, key, "<UserId>api-1</UserId>")
    as_json = await fof_sandbox.push(body, content_type="application/xml", format="json")
    assert as_json.content_type == "application/json" and as_json.json == {"MessageId": 1}
    default = await fof_sandbox.push(body, content_type="application/xml", format=None)
    assert default.content_type == "application/xml"
    json_default = await fof_sandbox.push(credentials(UserId="api-1"), format=None)
    assert json_default.content_type == "application/json"
    bad = await fof_sandbox.push(credentials(UserId="api-1"), format="yaml")
    assert bad.status == 400 and bad.error_code == "InvalidFormat"
    assert len(fof_sandbox.sandbox.state.pushes) == 3


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (xml(*creds_xml(), "<UserId>api-1</UserId>", ns=""), "xmlns:i"),
        (xml(*creds_xml(), "<UserId>api-1</UserId>", ns='xmlns:i="urn:other"'), "xmlns:i"),
        (xml(creds_xml()[1], creds_xml()[0], "<UserId>api-1</UserId>"), "out of alphabetical order"),
        (
            xml(*creds_xml(), "<UserId>api-1</UserId>", "<Title>late</Title>"),
            "<Title> is out of alphabetical order",
        ),
        (xml(*creds_xml(), "<Sound>yes</Sound>", "<UserId>api-1</UserId>"), "Sound: expected true or false"),
        (
            xml("<CompanyId>seven</CompanyId>", creds_xml()[1], "<UserId>api-1</UserId>"),
            "CompanyId: expected an integer",
        ),
        # int() reads these; XML Schema's (and .NET's) integer is ASCII digits with an optional sign
        (
            xml("<CompanyId>1_000</CompanyId>", creds_xml()[1], "<UserId>api-1</UserId>"),
            "CompanyId: expected",
        ),
        (
            xml(creds_xml()[0], "<ExpirySecs>\u0663</ExpirySecs>", creds_xml()[1], "<UserId>api-1</UserId>"),
            "ExpirySecs: expected",
        ),
        (
            xml(
                creds_xml()[0], "<ExpirySecs>\u00a030</ExpirySecs>", creds_xml()[1], "<UserId>api-1</UserId>"
            ),
            "ExpirySecs: expected",
        ),
        ("<PushRequest", "not well-formed"),
        ('<!DOCTYPE x [<!ENTITY a "b">]><x/>', "DTDs"),
    ],
)
async def test_bad_xml_is_400(fof_sandbox: RunningFormsOnFire, body: str, message: str) -> None:
    reply = await fof_sandbox.push(body, content_type="application/xml", format="xml")
    assert reply.status == 400 and reply.error_code == "SerializationException"
    assert message in (reply.xml.findtext("ResponseStatus/Message") or "")
    assert fof_sandbox.sandbox.state.pushes == []


async def test_drop_mode_ignores_out_of_order_elements_like_datacontract(
    fof_sandbox_factory: FofFactory,
) -> None:
    running = await fof_sandbox_factory(xml_order="drop")
    body = xml(*creds_xml(), "<UserId>api-1</UserId>", "<Title>dropped</Title>")
    reply = await running.push(body, content_type="application/xml", format="json")
    assert reply.status == 200
    assert running.sandbox.state.pushes[0].title is None


async def test_xml_root_name_can_be_required(fof_sandbox_factory: FofFactory) -> None:
    running = await fof_sandbox_factory(xml_root="Push")
    wrong = await running.push(xml(*creds_xml(), "<UserId>api-1</UserId>"), content_type="application/xml")
    assert wrong.status == 400
    right = await running.push(
        xml(*creds_xml(), "<UserId>api-1</UserId>", root="Push"), content_type="application/xml"
    )
    assert right.status == 200


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"CompanyId": "777"}, "CompanyId: expected int"),
        ({"Sound": "yes"}, "Sound: expected bool"),
        ({"ExpirySecs": 1.5}, "ExpirySecs"),
    ],
)
async def test_json_fields_of_the_wrong_type_are_400(
    fof_sandbox: RunningFormsOnFire, fields: dict[str, Any], message: str
) -> None:
    reply = await fof_sandbox.push({**credentials(UserId="api-1"), **fields})
    assert reply.status == 400 and reply.error_code == "SerializationException"
    assert message in reply.json["ResponseStatus"]["Message"]
    assert (await fof_sandbox.push("[1, 2]")).status == 400
    assert (await fof_sandbox.push("{nope")).status == 400


async def test_nan_and_infinity_are_not_json(fof_sandbox: RunningFormsOnFire) -> None:
    # Python's json module reads them, even in a field the binder ignores; the platform's parser does not.
    for constant in ("NaN", "Infinity"):
        body = json.dumps(credentials(UserId="api-1"))[:-1] + f', "Extra": {constant}}}'
        reply = await fof_sandbox.push(body)
        assert reply.status == 400 and reply.error_code == "SerializationException"
        assert "not valid JSON" in reply.json["ResponseStatus"]["Message"]
    assert fof_sandbox.sandbox.state.pushes == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"CompanyId": FOF_COMPANY, "IntegrationKey": "wrong", "UserId": "api-1"}, "Unauthorized"),
        ({"CompanyId": 1, "IntegrationKey": FOF_KEY, "UserId": "api-1"}, "Unauthorized"),
        ({"IntegrationKey": FOF_KEY, "UserId": "api-1"}, "Unauthorized"),
        (credentials(Title="nobody"), "UserRequired"),
        (credentials(UserId=""), "UserRequired"),
        (credentials(UserId="api-99"), "UserNotFound"),
        (credentials(UserEmail="nobody@example.test"), "UserNotFound"),
    ],
)
async def test_most_errors_are_200_with_the_error_in_the_body(
    fof_sandbox: RunningFormsOnFire, body: dict[str, Any], code: str
) -> None:
    as_json = await fof_sandbox.push(body)
    assert as_json.status == 200 and as_json.error_code == code
    assert set(as_json.json["ResponseStatus"]) == {"ErrorCode", "Message", "Errors"}
    as_xml = await fof_sandbox.push(body, format="xml")
    assert as_xml.status == 200 and as_xml.error_code == code
    assert fof_sandbox.sandbox.state.pushes == []


async def test_unknown_users_policy(fof_sandbox_factory: FofFactory) -> None:
    nobody_known = await fof_sandbox_factory(users=())
    assert (await nobody_known.push(credentials(UserExternalId="x1"))).json == {"MessageId": 1}
    assert nobody_known.sandbox.state.pushes[0].user == "UserExternalId:x1"
    strict = await fof_sandbox_factory(users=(), unknown_user="error")
    assert (await strict.push(credentials(UserExternalId="x1"))).error_code == "UserNotFound"
    lenient = await fof_sandbox_factory(unknown_user="accept")
    assert (await lenient.push(credentials(UserId="api-99"))).status == 200
    status = await fof_sandbox_factory(error_status=422)
    assert (await status.push(credentials(UserId="api-99"))).status == 422


async def test_other_content_types_wrong_methods_and_paths(fof_sandbox: RunningFormsOnFire) -> None:
    reply = await fof_sandbox.push(credentials(UserId="api-1"), content_type="text/plain")
    assert reply.status == 400 and reply.error_code == "UnsupportedMediaType"
    wrong_method = await fof_sandbox.request("GET", fof_sandbox.url + "push", params={"format": "xml"})
    assert wrong_method.status == 405 and wrong_method.error_code == "MethodNotAllowed"
    missing = await fof_sandbox.request(
        "POST", fof_sandbox.url + "pushes", data="{}", content_type="application/json"
    )
    assert missing.status == 404 and missing.error_code == "NotFound"


async def test_faults_and_limits(fof_sandbox_factory: FofFactory) -> None:
    faulty = await fof_sandbox_factory(faults={"error_503": 1.0})
    reply = await faulty.push(credentials(UserId="api-1"), format="xml")
    assert reply.status == 503 and reply.error_code == "ServiceUnavailable"
    applied = await fof_sandbox_factory(faults={"applied_then_500": 1.0})
    assert (await applied.push(credentials(UserId="api-1"))).status == 500
    assert len(applied.sandbox.state.pushes) == 1
    limited = await fof_sandbox_factory(limits={"push": {"requests": 2, "window": 3600}})
    statuses = [(await limited.push(credentials(UserId="api-1"))) for _ in range(3)]
    assert [r.status for r in statuses] == [200, 200, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in statuses] == ["1", "0", "0"]
    assert statuses[2].error_code == "TooManyRequests"


async def test_inspection_and_known_users_at_run_time(fof_sandbox: RunningFormsOnFire) -> None:
    added = await fof_sandbox.inspect("POST", "users", [{"UserId": "api-9", "UserExternalId": "crm-9"}])
    assert added.status == 200 and added.json == {"users": 4}
    assert (await fof_sandbox.push(credentials(UserExternalId="crm-9"))).status == 200
    assert (await fof_sandbox.inspect("POST", "users", [{"UserEmail": "x"}])).status == 400
    stats = (await fof_sandbox.inspect("GET", "stats")).json
    assert stats["requests"] == {"push": {"200": 1}} and stats["applied"] == {"push": 1}
    state = (await fof_sandbox.inspect("GET", "state")).json
    assert state["pushes"][0]["User"] == "api-9" and len(state["users"]) == 4
    parquet = await fof_sandbox.request(
        "GET", f"{fof_sandbox.root_url}/_sandbox/state?format=parquet&table=pushes"
    )
    assert parquet.status == 200 and parquet.raw[:4] == b"PAR1"
    assert (await fof_sandbox.inspect("POST", "reset")).status == 200
    assert fof_sandbox.sandbox.state.users == {} and fof_sandbox.sandbox.state.pushes == []


async def test_seed_file(fof_sandbox_factory: FofFactory, tmp_path: Any) -> None:
    path = tmp_path / "seed.json"
    path.write_text('{"users": [{"UserId": "s1", "UserEmail": "s@example.test"}]}', encoding="utf-8")
    running = await fof_sandbox_factory(users=(), seed_file=str(path))
    assert (await running.push(credentials(UserEmail="s@example.test"))).status == 200
    assert (await running.push(credentials(UserId="other"))).error_code == "UserNotFound"


async def test_cli_runs_the_sandbox_until_sigterm(tmp_path: Any) -> None:
    config = tmp_path / "fof.yaml"
    config.write_text("users:\n  - {UserId: cli-1, UserExternalId: ext-1}\n", encoding="utf-8")
    process, url = start_sandbox_process(
        "formsonfire", "--integration-key", "cli-key-123456", "--company-id", "9", "--config", str(config)
    )
    try:
        assert url.endswith("/api/v2/")
        async with aiohttp.ClientSession() as session:
            for user, code in (("ext-1", None), ("ext-2", "UserNotFound")):
                body = {"CompanyId": 9, "IntegrationKey": "cli-key-123456", "UserExternalId": user}
                async with session.post(url + "push", json=body, params={"format": "json"}) as resp:
                    answer = await resp.json()
                assert resp.status == 200 and (answer.get("ResponseStatus") or {}).get("ErrorCode") == code
    finally:
        assert stop_sandbox_process(process) == 0


@pytest.mark.parametrize(
    ("seed", "message"),
    [
        ({"users": "api-1"}, "not in the shape of GET /_sandbox/state"),  # was a traceback (AttributeError)
        ({"push_notifications": []}, "unknown seed sections ['push_notifications']"),  # was an empty sandbox
        ({"users": [{"UserEmail": "a@example.test"}]}, "a known user needs a UserId"),
        # was named only as ("'int' object has no attribute 'lower'")
        ({"users": [{"UserId": "u", "UserEmail": 5}]}, "a known user's UserEmail must be a string, not 5"),
    ],
)
def test_a_bad_seed_file_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: Any, message: str
) -> None:
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(seed), encoding="utf-8")
    assert main(["sandbox", "formsonfire", "--port", "0", "--seed-file", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"pushsync: error: {path}: {message}")
    assert "job file" not in captured.err and captured.out == ""


async def test_known_users_posted_with_a_number_for_an_identifier_are_400(
    fof_sandbox: RunningFormsOnFire,
) -> None:
    # POST /_sandbox/users answered 500 (the e-mail address is lower-cased when indexed)
    for user in ({"UserId": "api-8", "UserEmail": 8}, {"UserId": "api-8", "UserExternalId": 8}):
        added = await fof_sandbox.inspect("POST", "users", [user])
        assert added.status == 400 and "must be a string" in added.json["error"]
    assert len(fof_sandbox.sandbox.state.users) == 3


def test_a_company_id_no_request_can_carry_is_refused_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    # It started, and refused every push with 400 (CompanyId out of range for an Integer).
    assert main(["sandbox", "formsonfire", "--port", "0", "--company-id", "21474836470"]) == 2
    captured = capsys.readouterr()
    assert "company_id must fit an Integer (32 bits), not 21474836470" in captured.err and captured.out == ""
