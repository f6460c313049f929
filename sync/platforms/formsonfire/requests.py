"""Forms On Fire push bodies, their JSON and XML serialisation, batch IDs. Pure functions: no I/O.

A batch body is the JSON-ready push *without* the credentials, e.g.
``{"UserExternalId": "u1", "Title": "Hi", "Body": "...", "Sound": true, "ExpirySecs": 3600}``: ``CompanyId``
and ``IntegrationKey`` are added by the connector when it serialises the request (:func:`serialise`), so the
integration key never reaches a batch, its ID, the ledger or a log line. One user per request: a batch names
exactly one user and is never split.

XML bodies follow the platform's (DataContract-style) rules: the root declares
``xmlns:i="http://www.w3.org/2001/XMLSchema-instance"``, child elements come in ordinal alphabetical order,
booleans are ``true``/``false``::

    <PushRequest xmlns:i="http://www.w3.org/2001/XMLSchema-instance"><Body>...</Body><CompanyId>42</CompanyId>
    <ExpirySecs>3600</ExpirySecs><IntegrationKey>...</IntegrationKey><Sound>true</Sound><Title>Hi</Title>
    <UserExternalId>u1</UserExternalId></PushRequest>
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any
from xml.sax.saxutils import escape

from sync.platforms.formsonfire import DEFAULT_XML_ROOT, ENDPOINT, XSI_NAMESPACE, BodyFormat, UserKey
from sync.records import Batch, Operation, Phase, RowRef

__all__ = [
    "CONTENT_TYPES",
    "batch_id_for",
    "make_batch",
    "push_body",
    "serialise",
    "split_batch",
    "to_json",
    "to_xml",
    "user_of",
]

CONTENT_TYPES: Mapping[BodyFormat, str] = {
    BodyFormat.JSON: "application/json",
    BodyFormat.XML: "application/xml",
}


def push_body(
    user_key: UserKey | str,
    user: str,
    *,
    title: str | None = None,
    body: str | None = None,
    sound: bool | None = None,
    expiry_secs: int | None = None,
) -> dict[str, Any]:
    """One push to one user; None fields are left out. ValueError for an empty user or a negative expiry."""
    key = UserKey(user_key)
    if not isinstance(user, str) or not user.strip():
        raise ValueError(f"{key.value} must be a non-empty string")
    out: dict[str, Any] = {key.value: user}
    if title is not None:
        out["Title"] = str(title)
    if body is not None:
        out["Body"] = str(body)
    if sound is not None:
        if not isinstance(sound, bool):
            raise ValueError("Sound must be true or false")
        out["Sound"] = sound
    if expiry_secs is not None:
        if isinstance(expiry_secs, bool) or not isinstance(expiry_secs, int) or expiry_secs < 0:
            raise ValueError("ExpirySecs must be a non-negative integer")
        out["ExpirySecs"] = expiry_secs
    return out


def user_of(body: Mapping[str, Any]) -> str:
    """The one user a push names (the first identifier present, in the order UserId, UserEmail, UserExternalId)."""
    for key in UserKey:
        value = body.get(key.value)
        if value:
            return str(value)
    raise ValueError("a push names no user (UserId, UserEmail or UserExternalId)")


def _with_credentials(body: Mapping[str, Any], company_id: int, integration_key: str) -> dict[str, Any]:
    return {**body, "CompanyId": int(company_id), "IntegrationKey": integration_key}


def to_json(body: Mapping[str, Any], company_id: int, integration_key: str) -> bytes:
    """The request as JSON (UTF-8)."""
    full = _with_credentials(body, company_id, integration_key)
    return json.dumps(full, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _xml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return escape(str(value))


def to_xml(
    body: Mapping[str, Any], company_id: int, integration_key: str, *, root: str = DEFAULT_XML_ROOT
) -> bytes:
    """The request as XML: ``xmlns:i`` on the root, elements in ordinal alphabetical order, UTF-8."""
    full = _with_credentials(body, company_id, integration_key)
    parts = [f'<{root} xmlns:i="{XSI_NAMESPACE}">']
    for name in sorted(full):  # ordinal order, as DataContract serialisers expect
        value = full[name]
        if value is None:
            parts.append(f'<{name} i:nil="true"/>')
        else:
            parts.append(f"<{name}>{_xml_text(value)}</{name}>")
    parts.append(f"</{root}>")
    return "".join(parts).encode("utf-8")


def serialise(
    body: Mapping[str, Any],
    fmt: BodyFormat,
    company_id: int,
    integration_key: str,
    *,
    xml_root: str = DEFAULT_XML_ROOT,
) -> tuple[bytes, str]:
    """``(payload, content type)`` for a push in ``fmt``."""
    if fmt is BodyFormat.JSON:
        return to_json(body, company_id, integration_key), CONTENT_TYPES[fmt]
    return to_xml(body, company_id, integration_key, root=xml_root), CONTENT_TYPES[fmt]


def batch_id_for(body: Mapping[str, Any], salt: str = "") -> str:
    """A stable batch ID: 16 hex digits of sha256 over the canonical body and ``salt``.

    Two identical pushes to one user in one file are two messages: the planner passes the row they came from as
    ``salt`` so they get different IDs (and the same IDs on every run of the same input)."""
    digest = hashlib.sha256(b"formsonfire\n" + ENDPOINT.encode() + b"\n")
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    digest.update(b"\n" + salt.encode("utf-8"))
    return digest.hexdigest()[:16]


def make_batch(body: Mapping[str, Any], *, origin: RowRef | None = None, salt: str | None = None) -> Batch:
    """Wrap one push in a :class:`Batch` (``salt`` defaults to the origin's ``path:row``)."""
    user = user_of(body)
    if salt is None:
        salt = f"{origin.path}:{origin.row}" if origin is not None else ""
    return Batch(
        batch_id=batch_id_for(body, salt),
        endpoint=ENDPOINT,
        operation=Operation.SEND_PUSH,
        body=dict(body),
        ext_ids=(user,),
        phase=Phase.CHANGES,
        origins={user: origin} if origin is not None else {},
    )


def split_batch(batch: Batch) -> tuple[Batch, Batch] | None:
    """A push names one user: there is nothing to split (always None; kept for the connector's protocol)."""
    del batch
    return None
