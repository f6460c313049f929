"""The Forms On Fire push builders and serialisers (pure) and the connector (against the real local sandbox)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from conftest_formsonfire import FOF_COMPANY, FOF_KEY, FofFactory, RunningFormsOnFire

from sync.config import Destination
from sync.errors import FatalPlatformError, RejectedBatchError, RetryableError
from sync.platforms.base import PlatformClient
from sync.platforms.formsonfire import XSI_NAMESPACE, BodyFormat, UserKey
from sync.platforms.formsonfire.client import FormsOnFireClient, error_in_body
from sync.platforms.formsonfire.requests import (
    batch_id_for,
    make_batch,
    push_body,
    serialise,
    split_batch,
    to_json,
    to_xml,
    user_of,
)
from sync.records import Batch, Operation, RowRef

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
    assert "IntegrationKey" not in first.body and "CompanyId" not in first.body
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
