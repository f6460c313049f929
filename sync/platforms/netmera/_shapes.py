"""Netmera request shapes: endpoints and phases, body builders, batch IDs, batches and their halves.

Private: import these from :mod:`sync.platforms.netmera.requests` (which draws the body shapes). Pure
functions, no I/O, no polars. The planner's batches are built as columns by :mod:`._streams`, their bodies the
canonical JSON ``bytes``; the Python body builders here make the same bytes from Python values (a cut-down batch,
a test), through :func:`make_batch`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from sync.platforms.netmera import MAX_IDS_PER_REQUEST
from sync.records import Batch, Operation, Phase, RowRef, body_json

ENDPOINT_FOR: Mapping[Operation, str] = {
    Operation.TAG: "tagUsers",
    Operation.UNTAG: "untagUsers",
    Operation.SET_ATTRIBUTES: "setProfileAttributes",
    Operation.UNSET_ATTRIBUTES: "unsetProfileAttributes",
    Operation.PUSH_ATTRIBUTES: "pushProfileAttributes",
    Operation.PULL_ATTRIBUTES: "pullProfileAttributes",
    Operation.SET_CATEGORIES: "setCategoryPreferences",
    Operation.ENABLE_PUSH: "enablePush",
    Operation.DISABLE_PUSH: "disablePush",
    Operation.ENABLE_EMAIL: "enableMail",
    Operation.DISABLE_EMAIL: "disableMail",
    Operation.ENABLE_SMS: "enableSms",
    Operation.DISABLE_SMS: "disableSms",
    Operation.UPDATE_EMAIL: "updateEmail",
    Operation.UPDATE_MSISDN: "updateMsisdn",
    Operation.FIRE_EVENTS: "fireEvents",
    Operation.DELETE_USERS: "deleteUsersPermanently",
}
"""The Netmera endpoint (path under the base URL) that carries each operation."""

_OPERATION_FOR: Mapping[str, Operation] = {endpoint: op for op, endpoint in ENDPOINT_FOR.items()}

SINGLE_USER_ENDPOINTS: frozenset[str] = frozenset(
    {"enablePush", "disablePush", "updateEmail", "updateMsisdn"}
)
"""Endpoints that take exactly one user per request (``{"extId": ...}``); their batches cannot be split."""

ARRAY_BODY_ENDPOINTS: frozenset[str] = frozenset(
    {
        "setProfileAttributes",
        "unsetProfileAttributes",
        "pushProfileAttributes",
        "pullProfileAttributes",
        "setCategoryPreferences",
        "fireEvents",
    }
)
"""Endpoints whose body is a JSON array of per-user items, each with an ``extId``."""

# Opt-outs go first so that no change in the same run can reach a user who just opted out; deletions last so
# that nothing re-creates a deleted user. A setCategoryPreferences batch is an opt-out when every item disables.
_OPT_OUT_OPERATIONS = frozenset({Operation.DISABLE_PUSH, Operation.DISABLE_EMAIL, Operation.DISABLE_SMS})


def operation_for(endpoint: str) -> Operation:
    """The operation an endpoint carries (inverse of :data:`ENDPOINT_FOR`); KeyError for unknown endpoints."""
    return _OPERATION_FOR[endpoint]


def phase_for(operation: Operation, body: Any = None) -> Phase:
    """The send phase of a request: opt-outs first, deletions last, everything else in between.

    ``setCategoryPreferences`` is an opt-out when every item of ``body`` has ``"enable": false`` (the planner keeps
    category opt-outs and opt-ins in separate batches for exactly this reason).
    """
    if operation in _OPT_OUT_OPERATIONS:
        return Phase.OPT_OUT
    if operation is Operation.DELETE_USERS:
        return Phase.DELETIONS
    if (
        operation is Operation.SET_CATEGORIES
        and isinstance(body, list)
        and body
        and all(item.get("enable") is False for item in body)
    ):
        return Phase.OPT_OUT
    return Phase.CHANGES


# --- body builders -------------------------------------------------------------------------------------------


def tag_body(tag: str, ext_ids: Sequence[str]) -> dict[str, Any]:
    """``tagUsers`` / ``untagUsers``: one tag, many users."""
    return {"tag": tag, "extIds": list(ext_ids)}


def ext_ids_body(ext_ids: Sequence[str]) -> dict[str, Any]:
    """``enableMail``, ``disableMail``, ``enableSms``, ``disableSms``, ``deleteUsersPermanently``."""
    return {"extIds": list(ext_ids)}


def single_user_body(ext_id: str) -> dict[str, Any]:
    """``enablePush`` / ``disablePush`` for all devices of one user."""
    return {"extId": ext_id}


def update_email_body(ext_id: str, email: str) -> dict[str, Any]:
    """``updateEmail``: one user per request."""
    return {"extId": ext_id, "email": email}


def update_msisdn_body(ext_id: str, msisdn: str) -> dict[str, Any]:
    """``updateMsisdn``: one user per request."""
    return {"extId": ext_id, "msisdn": msisdn}


def set_attributes_body(items: Iterable[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """``setProfileAttributes``: ``(ext_id, {attribute: value})`` per user; given keys are overwritten."""
    return [{"extId": ext_id, "profile": dict(profile)} for ext_id, profile in items]


def unset_attributes_body(items: Iterable[tuple[str, Sequence[str]]]) -> list[dict[str, Any]]:
    """``unsetProfileAttributes``: ``(ext_id, [attribute, ...])`` per user."""
    return [{"extId": ext_id, "profile": list(keys)} for ext_id, keys in items]


def array_attributes_body(items: Iterable[tuple[str, Mapping[str, Sequence[Any]]]]) -> list[dict[str, Any]]:
    """``pushProfileAttributes`` / ``pullProfileAttributes``: ``(ext_id, {array_attribute: [values]})``."""
    return [
        {"extId": ext_id, "profile": {k: list(v) for k, v in profile.items()}} for ext_id, profile in items
    ]


def category_preferences_body(items: Iterable[tuple[str, str, bool]]) -> list[dict[str, Any]]:
    """``setCategoryPreferences``: ``(ext_id, category, enable)``; one user may have several items."""
    return [
        {"extId": ext_id, "category": category, "enable": bool(enable)} for ext_id, category, enable in items
    ]


def events_body(items: Iterable[tuple[str, str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """``fireEvents``: ``(ext_id, name, attributes)``; attributes sit beside ``extId`` and ``name``.

    An attribute named ``extId`` or ``name`` would overwrite the event's identity, so it is refused.
    """
    body = []
    for ext_id, name, attributes in items:
        clash = {"extId", "name"} & set(attributes)
        if clash:
            raise ValueError(f"event attribute(s) {sorted(clash)} clash with the event's own fields")
        body.append({"extId": ext_id, "name": name, **attributes})
    return body


# --- identity and batches ------------------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys, no insignificant whitespace, UTF-8: equal values give equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def batch_id_for(endpoint: str, body: Any) -> str:
    """A stable batch ID: the first 16 hex digits of sha256 over the endpoint, a newline and the canonical JSON
    body (``bytes`` are taken as that canonical form already: a batch's body).

    The same request always gets the same ID, across runs and machines, which resume and the ledger rely on.
    """
    digest = hashlib.sha256()
    digest.update(endpoint.encode("utf-8"))
    digest.update(b"\n")
    digest.update(body if isinstance(body, bytes) else canonical_json(body))
    return digest.hexdigest()[:16]


def tag_of(batch: Batch) -> str:
    """The tag a ``tagUsers`` / ``untagUsers`` batch sets, ``""`` for any other batch.

    Read from the end of the canonical body (``...],"tag":"<tag>"}``) without parsing its IDs."""
    body = batch.body
    if batch.operation not in (Operation.TAG, Operation.UNTAG):
        return ""
    if isinstance(body, bytes):
        at = body.rfind(b'],"tag":')
        tag = json.loads(body[at + 8 : -1])
    else:
        tag = body.get("tag", "")
    return str(tag)


def ext_ids_in_body(endpoint: str, body: Any) -> tuple[str, ...]:
    """The unique external IDs a body (a JSON-ready object, or its encoded ``bytes``) names, in order of first
    appearance."""
    if isinstance(body, bytes):
        body = json.loads(body)
    if isinstance(body, list):
        return tuple(dict.fromkeys(str(item["extId"]) for item in body))
    if isinstance(body, Mapping):
        if "extIds" in body:
            return tuple(dict.fromkeys(str(x) for x in body["extIds"]))
        if "extId" in body:
            return (str(body["extId"]),)
    raise ValueError(f"{endpoint}: body names no external IDs")


def make_batch(
    operation: Operation,
    body: Any,
    *,
    origins: Mapping[str, RowRef] | None = None,
    phase: Phase | None = None,
    row_keys: bytes = b"",
) -> Batch:
    """Wrap a body (a JSON-ready object) in a :class:`Batch` with its canonical JSON ``bytes``, endpoint,
    content-derived ID, unique ext IDs and phase (``row_keys``: the packed keys of the input rows it carries, for
    non-idempotent operations). The bytes and the ID are those the columnar builder gives the same request.

    Raises ValueError when the body names more unique IDs than one request may carry.
    """
    if isinstance(body, bytes):
        body = json.loads(body)
    endpoint = ENDPOINT_FOR[operation]
    ext_ids = ext_ids_in_body(endpoint, body)
    limit = 1 if endpoint in SINGLE_USER_ENDPOINTS else MAX_IDS_PER_REQUEST
    if len(ext_ids) > limit:
        raise ValueError(f"{endpoint}: {len(ext_ids)} unique external IDs in one request (limit {limit})")
    encoded = canonical_json(body)
    return Batch(
        batch_id=batch_id_for(endpoint, encoded),
        endpoint=endpoint,
        operation=operation,
        body=encoded,
        ext_ids=ext_ids,
        phase=phase_for(operation, body) if phase is None else phase,
        origins=dict(origins) if origins is not None else {},
        row_keys=row_keys,
    )


def split_batch(batch: Batch) -> tuple[Batch, Batch] | None:
    """Halve a batch by its external IDs, keeping every item of one ID in the same half.

    Used to isolate the records a platform refuses (400). Returns None when the batch names a single ID (or
    is a one-user endpoint). Halves keep the operation, phase and the origins of their IDs; their bodies are
    canonical JSON ``bytes`` and their IDs are derived from them with :func:`batch_id_for`.
    """
    body = body_json(batch)
    ids = ext_ids_in_body(batch.endpoint, body)
    if batch.endpoint in SINGLE_USER_ENDPOINTS or len(ids) < 2:
        return None
    first_ids = frozenset(ids[: len(ids) // 2])
    if isinstance(body, list):
        first_body: Any = [item for item in body if str(item["extId"]) in first_ids]
        second_body: Any = [item for item in body if str(item["extId"]) not in first_ids]
        if batch.row_keys and len(batch.row_keys) == 8 * len(body):
            # Each half keeps its items' row keys (one per item, in body order): the dispatcher records those of
            # the halves the platform confirmed, so that a retry of the batch does not send their events again.
            keys = [batch.row_keys[8 * i : 8 * i + 8] for i in range(len(body))]
            first = [str(item["extId"]) in first_ids for item in body]
            return (
                replace(
                    derived_batch(batch, first_body),
                    row_keys=b"".join(k for k, f in zip(keys, first, strict=True) if f),
                ),
                replace(
                    derived_batch(batch, second_body),
                    row_keys=b"".join(k for k, f in zip(keys, first, strict=True) if not f),
                ),
            )
    else:
        first_body = {**body, "extIds": [x for x in ids if x in first_ids]}
        second_body = {**body, "extIds": [x for x in ids if x not in first_ids]}
    return derived_batch(batch, first_body), derived_batch(batch, second_body)


def derived_batch(parent: Batch, body: Any) -> Batch:
    """A batch of ``parent``'s endpoint, operation and phase carrying ``body`` (a JSON-ready object, part of the
    parent's items): its canonical bytes, content-derived ID, and the origins of the IDs it keeps."""
    ext_ids = ext_ids_in_body(parent.endpoint, body)
    origins = {x: parent.origins[x] for x in ext_ids if x in parent.origins}
    encoded = canonical_json(body)
    return Batch(
        batch_id=batch_id_for(parent.endpoint, encoded),
        endpoint=parent.endpoint,
        operation=parent.operation,
        body=encoded,
        ext_ids=ext_ids,
        phase=parent.phase,
        origins=origins,
    )
