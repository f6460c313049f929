"""Request bodies, batch IDs and splitting for Netmera (pure functions, no server needed)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sync.platforms.netmera import MAX_IDS_PER_REQUEST
from sync.platforms.netmera.requests import (
    ENDPOINT_FOR,
    SINGLE_USER_ENDPOINTS,
    array_attributes_body,
    batch_id_for,
    category_preferences_body,
    events_body,
    ext_ids_body,
    ext_ids_in_body,
    make_batch,
    operation_for,
    phase_for,
    set_attributes_body,
    single_user_body,
    split_batch,
    tag_body,
    unset_attributes_body,
    update_email_body,
    update_msisdn_body,
)
from sync.records import Batch, Operation, Phase, RowRef, body_json


def _canonical(item: object) -> str:
    return json.dumps(item, sort_keys=True)


def _origins(ids: list[str]) -> dict[str, RowRef]:
    return {x: RowRef("users.csv", i + 1) for i, x in enumerate(ids)}


NETMERA_OPERATIONS = {
    Operation.TAG,
    Operation.UNTAG,
    Operation.SET_ATTRIBUTES,
    Operation.UNSET_ATTRIBUTES,
    Operation.PUSH_ATTRIBUTES,
    Operation.PULL_ATTRIBUTES,
    Operation.SET_CATEGORIES,
    Operation.ENABLE_PUSH,
    Operation.DISABLE_PUSH,
    Operation.ENABLE_EMAIL,
    Operation.DISABLE_EMAIL,
    Operation.ENABLE_SMS,
    Operation.DISABLE_SMS,
    Operation.UPDATE_EMAIL,
    Operation.UPDATE_MSISDN,
    Operation.FIRE_EVENTS,
    Operation.DELETE_USERS,
}


def test_every_netmera_operation_has_an_endpoint_and_back() -> None:
    assert set(ENDPOINT_FOR) == NETMERA_OPERATIONS
    for op, endpoint in ENDPOINT_FOR.items():
        assert operation_for(endpoint) is op


def test_body_shapes_match_the_seed() -> None:
    assert tag_body("Sport", ["a", "b"]) == {"tag": "Sport", "extIds": ["a", "b"]}
    assert ext_ids_body(["a"]) == {"extIds": ["a"]}
    assert single_user_body("a") == {"extId": "a"}
    assert update_email_body("a", "a@x.io") == {"extId": "a", "email": "a@x.io"}
    assert update_msisdn_body("a", "+905312345678") == {"extId": "a", "msisdn": "+905312345678"}
    assert set_attributes_body([("a", {"name": "John", "dateOfBirth": 624315600000})]) == [
        {"extId": "a", "profile": {"name": "John", "dateOfBirth": 624315600000}}
    ]
    assert unset_attributes_body([("a", ["age"])]) == [{"extId": "a", "profile": ["age"]}]
    assert array_attributes_body([("a", {"lastVisited": ("shopping",)})]) == [
        {"extId": "a", "profile": {"lastVisited": ["shopping"]}}
    ]
    assert category_preferences_body([("a", "Shopping", True), ("a", "Promotion", False)]) == [
        {"extId": "a", "category": "Shopping", "enable": True},
        {"extId": "a", "category": "Promotion", "enable": False},
    ]
    assert events_body([("a", "purchase", {"amount": 3.5})]) == [
        {"extId": "a", "name": "purchase", "amount": 3.5}
    ]


def test_event_attributes_cannot_overwrite_identity() -> None:
    with pytest.raises(ValueError, match="extId"):
        events_body([("a", "purchase", {"extId": "b"})])


def test_batch_id_is_stable_and_content_derived() -> None:
    body = [{"extId": "a", "profile": {"x": 1, "y": "z"}}]
    same_reordered = [{"profile": {"y": "z", "x": 1}, "extId": "a"}]
    assert batch_id_for("setProfileAttributes", body) == batch_id_for("setProfileAttributes", same_reordered)
    assert len(batch_id_for("setProfileAttributes", body)) == 16
    assert batch_id_for("setProfileAttributes", body) != batch_id_for("pushProfileAttributes", body)
    assert batch_id_for("tagUsers", tag_body("t", ["a"])) != batch_id_for("tagUsers", tag_body("t", ["b"]))
    # Pinned: a change in the hashing would orphan every ledger written before it.
    assert batch_id_for("tagUsers", {"tag": "Sport", "extIds": ["id1", "id2"]}) == batch_id_for(
        "tagUsers", {"extIds": ["id1", "id2"], "tag": "Sport"}
    )


def test_phases() -> None:
    assert phase_for(Operation.DISABLE_PUSH) is Phase.OPT_OUT
    assert phase_for(Operation.DISABLE_EMAIL) is Phase.OPT_OUT
    assert phase_for(Operation.DISABLE_SMS) is Phase.OPT_OUT
    assert phase_for(Operation.DELETE_USERS) is Phase.DELETIONS
    assert phase_for(Operation.TAG) is Phase.CHANGES
    off = category_preferences_body([("a", "Promo", False)])
    mixed = category_preferences_body([("a", "Promo", False), ("b", "Promo", True)])
    assert phase_for(Operation.SET_CATEGORIES, off) is Phase.OPT_OUT
    assert phase_for(Operation.SET_CATEGORIES, mixed) is Phase.CHANGES


def test_make_batch_fills_ids_and_refuses_over_limit() -> None:
    ids = [f"u{i}" for i in range(MAX_IDS_PER_REQUEST)]
    batch = make_batch(Operation.TAG, tag_body("t", ids), origins=_origins(ids))
    assert batch.endpoint == "tagUsers" and batch.ext_ids == tuple(ids) and batch.phase is Phase.CHANGES
    assert batch.batch_id == batch_id_for("tagUsers", batch.body)
    with pytest.raises(ValueError, match="limit 1000"):
        make_batch(Operation.TAG, tag_body("t", [*ids, "one-more"]))
    # Several items of one user count once towards the limit.
    items = [(x, c, True) for x in ids for c in ("A", "B")]
    assert len(make_batch(Operation.SET_CATEGORIES, category_preferences_body(items)).ext_ids) == 1000
    with pytest.raises(ValueError, match="limit 1"):
        make_batch(Operation.ENABLE_PUSH, {"extIds": ["a", "b"]})


@pytest.mark.parametrize(
    ("operation", "body"),
    [
        (Operation.TAG, tag_body("Sport", ["a", "b", "c", "d", "e"])),
        (Operation.UNTAG, tag_body("Sport", ["a", "b", "c"])),
        (Operation.ENABLE_EMAIL, ext_ids_body(["a", "b", "c"])),
        (Operation.DISABLE_SMS, ext_ids_body(["a", "b"])),
        (Operation.DELETE_USERS, ext_ids_body(["a", "b", "c", "d"])),
        (Operation.SET_ATTRIBUTES, set_attributes_body([("a", {"n": 1}), ("b", {"n": 2}), ("c", {"n": 3})])),
        (Operation.UNSET_ATTRIBUTES, unset_attributes_body([("a", ["n"]), ("b", ["n", "m"])])),
        (Operation.PUSH_ATTRIBUTES, array_attributes_body([("a", {"l": ["x"]}), ("b", {"l": ["y"]})])),
        (
            Operation.SET_CATEGORIES,
            category_preferences_body(
                [("a", "S", True), ("b", "S", False), ("a", "P", False), ("c", "S", True), ("b", "P", True)]
            ),
        ),
        (
            Operation.FIRE_EVENTS,
            events_body(
                [("a", "e1", {}), ("b", "e1", {"v": 1}), ("a", "e2", {}), ("c", "e1", {}), ("d", "e3", {})]
            ),
        ),
    ],
)
def test_split_halves_by_ext_id_keeping_items_together(operation: Operation, body: object) -> None:
    batch = make_batch(operation, body, origins=_origins(["a", "b", "c", "d", "e"]))
    halves = split_batch(batch)
    assert halves is not None
    first, second = halves
    assert set(first.ext_ids).isdisjoint(second.ext_ids)
    assert first.ext_ids + second.ext_ids == batch.ext_ids
    assert len(first.ext_ids) == len(batch.ext_ids) // 2
    for half in halves:
        assert (
            half.operation is batch.operation
            and half.phase is batch.phase
            and half.endpoint == batch.endpoint
        )
        assert half.batch_id == batch_id_for(half.endpoint, half.body) != batch.batch_id
        assert half.ext_ids == ext_ids_in_body(half.endpoint, body_json(half))
        assert set(half.origins) == set(half.ext_ids)
        assert all(half.origins[x] == batch.origins[x] for x in half.ext_ids)
    if isinstance(body, list):
        # Every item survives, in its original order, with all items of one ID in the same half.
        assert sorted(map(_canonical, body_json(first) + body_json(second))) == sorted(map(_canonical, body))
        for x in batch.ext_ids:
            owner = first if x in first.ext_ids else second
            assert [i for i in body if i["extId"] == x] == [i for i in body_json(owner) if i["extId"] == x]
    else:
        assert isinstance(body, dict)
        assert {k: v for k, v in body_json(first).items() if k != "extIds"} == {
            k: v for k, v in body.items() if k != "extIds"
        }


def test_split_returns_none_for_one_id() -> None:
    assert split_batch(make_batch(Operation.TAG, tag_body("t", ["a"]))) is None
    one_user_many_items = category_preferences_body([("a", "S", True), ("a", "P", False)])
    assert split_batch(make_batch(Operation.SET_CATEGORIES, one_user_many_items)) is None
    for op in (Operation.ENABLE_PUSH, Operation.DISABLE_PUSH):
        assert split_batch(make_batch(op, single_user_body("a"))) is None
    assert split_batch(make_batch(Operation.UPDATE_EMAIL, update_email_body("a", "a@b.co"))) is None
    assert {
        ENDPOINT_FOR[o] for o in (Operation.UPDATE_MSISDN, Operation.ENABLE_PUSH)
    } <= SINGLE_USER_ENDPOINTS


def test_split_down_to_single_ids_is_deterministic() -> None:
    ids = [f"u{i:04d}" for i in range(1000)]
    batch = make_batch(Operation.ENABLE_SMS, ext_ids_body(ids))
    pending: list[Batch] = [batch]
    leaves: list[str] = []
    while pending:
        b = pending.pop()
        halves = split_batch(b)
        if halves is None:
            leaves.extend(b.ext_ids)
        else:
            assert halves == split_batch(b)
            pending.extend(halves)
    assert sorted(leaves) == ids


@given(
    items=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d", "e", "f"]), st.sampled_from(["S", "P", "N"]), st.booleans()
        ),
        min_size=1,
        max_size=30,
    )
)
def test_split_property_for_multi_item_bodies(items: list[tuple[str, str, bool]]) -> None:
    batch = make_batch(Operation.SET_CATEGORIES, category_preferences_body(items))
    halves = split_batch(batch)
    if len(batch.ext_ids) == 1:
        assert halves is None
        return
    assert halves is not None
    first, second = halves
    assert first.ext_ids + second.ext_ids == batch.ext_ids
    assert set(first.ext_ids).isdisjoint(second.ext_ids)
    assert len(body_json(first)) + len(body_json(second)) == len(body_json(batch))
    assert all(h.phase is batch.phase for h in halves)
