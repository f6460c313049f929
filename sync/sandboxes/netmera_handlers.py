"""The Netmera sandbox's endpoint implementations: each validates the whole request, then changes
:class:`~.netmera_state.NetmeraState` (writes) or reads it. :class:`~.netmera.NetmeraSandbox` wires them to routes.

Write handlers take the parsed JSON body and return None (the configured success body) or a JSON-ready result;
read handlers take the request and return the JSON-ready answer. Every refusal is an :class:`ApiError`. In the
stateless mode (``NetmeraSandboxConfig.stateless``) a write handler returns right after its shape checks, having
counted what it names (:meth:`NetmeraHandlers._stateless`), and changes nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web

from sync.sandboxes._core import ApiError, SandboxCore
from sync.sandboxes.netmera_config import (
    EXT_ID_NOT_FOUND,
    MISSING_PARAMETER,
    NOT_AUTHORIZED,
    SEGMENT_NOT_FOUND,
    LastPage,
    NetmeraSandboxConfig,
    UnknownExtId,
    Validator,
    bool_query,
    missing,
)
from sync.sandboxes.netmera_state import PLATFORMS, Event, NetmeraState

__all__ = ["API_PREFIX", "NetmeraHandlers"]

API_PREFIX = "/rest/3.0/"


class NetmeraHandlers:
    """Endpoint implementations, mixed into :class:`~.netmera.NetmeraSandbox` (which sets these attributes)."""

    config: NetmeraSandboxConfig
    state: NetmeraState
    core: SandboxCore
    _check: Validator
    _clock: Callable[[], float]

    def _known(self, ext_ids: Any, *, create: bool = True) -> None:
        """Apply the unknown-extId policy to a write naming ``ext_ids`` (before any change is made).

        ``create=False``: the write itself creates the users (tagUsers: a tag member is a user)."""
        if self.config.unknown_ext_id is UnknownExtId.ERROR:
            unknown = self.state.unknown(ext_ids)
            if unknown:
                raise ApiError(400, EXT_ID_NOT_FOUND, f"external id not found ({len(unknown)} unknown)")
        elif create:
            self.state.ensure_users(ext_ids)

    def _existing(self, ext_id: str) -> None:
        """Reads never create users: an unknown extId is 400, code 5016."""
        if not self.state.exists(ext_id):
            raise ApiError(400, EXT_ID_NOT_FOUND, "external id not found")

    def _applied(self, operation: str, count: int) -> None:
        self.core.stats.add_applied(operation, count)

    def _stateless(self, operation: str, count: int) -> bool:
        """True in the stateless mode, after counting the write as applied: the caller then returns without
        touching the state (its shape checks are done)."""
        if not self.config.stateless:
            return False
        self._applied(operation, count)
        return True

    def _next_url(self, request: web.Request, endpoint: str, params: dict[str, Any]) -> str:
        root = (
            self.config.public_url.rstrip("/")
            if self.config.public_url
            else f"{request.scheme}://{request.host}"
        )
        query = "&".join(f"{k}={quote(str(v))}" for k, v in params.items())
        return f"{root}{API_PREFIX}{endpoint}?{query}"

    def _page_link(self, out: dict[str, Any], key: str, url: str | None) -> None:
        if url is not None:
            out[key] = url
        elif self.config.last_page is LastPage.NULL:
            out[key] = None

    # -- users and tags ------------------------------------------------------------------------------------

    def _delete_users(self, body: Any) -> None:
        ids = self._check.unique(self._check.strings(self._check.obj(body), "extIds"))
        if not self.config.delete_users_enabled:
            raise ApiError(403, NOT_AUTHORIZED, "not authorized: deleteUsersPermanently is not activated")
        if self._stateless("deleteUsersPermanently", len(ids)):
            return
        self._applied("deleteUsersPermanently", self.state.delete_users(ids))

    def _set_push(self, body: Any, permitted: bool, operation: str) -> None:
        check = self._check
        obj = check.obj(body)
        if ("extId" in obj) == ("deviceToken" in obj):
            raise ApiError(
                400, MISSING_PARAMETER, "missing required parameter: exactly one of extId or deviceToken"
            )
        if "extId" in obj:
            ext_id = check.string(obj, "extId")
            if self._stateless(operation, 1):
                return
            self._known((ext_id,))
            devices = self.state.devices_of(ext_id)
        else:
            token = check.string(obj, "deviceToken")
            if self._stateless(operation, 1):
                return
            device = self.state.devices.get(token)
            if device is None:
                if self.config.unknown_ext_id is UnknownExtId.ERROR:
                    raise ApiError(400, EXT_ID_NOT_FOUND, "device token not found")
                devices = []  # nothing to change; the token is not registered
            else:
                devices = [device]
        for device in devices:
            device.push_permitted = permitted
        self._applied(operation, len(devices))

    def _disable_push(self, body: Any) -> None:
        self._set_push(body, False, "disablePush")

    def _enable_push(self, body: Any) -> None:
        self._set_push(body, True, "enablePush")

    def _tag_users(self, body: Any) -> None:
        check = self._check
        obj = check.obj(body)
        tag = check.string(obj, "tag")
        ids = check.unique(check.strings(obj, "extIds"))
        if self._stateless("tagUsers", len(ids)):
            return
        self._known(ids, create=False)
        self.state.tag(tag, ids)
        self._applied("tagUsers", len(ids))

    def _untag_users(self, body: Any) -> None:
        check = self._check
        obj = check.obj(body)
        tag = check.string(obj, "tag")
        ids = check.unique(check.strings(obj, "extIds"))
        if self._stateless("untagUsers", len(ids)):
            return
        self._known(ids, create=False)  # untag keeps (or creates) every named user
        self.state.untag(tag, ids)
        self._applied("untagUsers", len(ids))

    def _items(self, body: Any, required: tuple[str, ...]) -> list[dict[str, Any]]:
        """An array body of objects, each with ``required`` keys present; ≤ max unique extIds."""
        check = self._check
        items = check.array(body)
        if self._items_well_formed(items, required):
            return items
        # Something is wrong: the item-by-item checks below name the first problem, in document order.
        for i, item in enumerate(items):
            check.obj(item, f"[{i}]")
            for name in required:
                if item.get(name) is None:
                    raise missing(f"[{i}].{name}")
        if "extId" in required:
            for i, item in enumerate(items):
                check.string(item, "extId", f"[{i}].")
            check.unique([item["extId"] for item in items])
        return items

    def _items_well_formed(self, items: list[Any], required: tuple[str, ...]) -> bool:
        """The checks of :meth:`_items` made column by column, with C-speed type tests (a 1000-item body costs
        a tenth of the item-by-item loop); True when every item passes, else False and nothing is said. The
        ID limit is checked (raised) here too when everything else passes."""
        if set(map(type, items)) != {dict}:
            return False
        columns = {name: [item.get(name) for item in items] for name in required}
        if any(None in column for column in columns.values()):
            return False
        ext_ids = columns.get("extId")
        if ext_ids is not None:
            if set(map(type, ext_ids)) != {str} or "" in ext_ids:
                return False
            self._check.unique(ext_ids)
        return True

    def _set_category_preferences(self, body: Any) -> None:
        items = self._items(body, ("extId", "category", "enable"))
        for i, item in enumerate(items):
            self._check.string(item, "category", f"[{i}].")
            self._check.boolean(item, "enable", f"[{i}].")
        defined = self.config.categories
        if defined is not None:
            # Only the panel's categories hold a preference: a name it does not define is refused, not kept.
            for i, item in enumerate(items):
                if item["category"] not in defined:
                    raise ApiError(
                        400,
                        MISSING_PARAMETER,
                        f"invalid parameter [{i}].category: not a category of the panel",
                    )
        if self._stateless("setCategoryPreferences", len(items)):
            return
        self._known([item["extId"] for item in items])
        for item in items:
            record = self.state.user(item["extId"])
            if record.categories is None:
                record.categories = {}
            record.categories[sys.intern(item["category"])] = item["enable"]  # one copy per category name
        self._applied("setCategoryPreferences", len(items))

    def _get_category_preferences(self, request: web.Request) -> dict[str, Any]:
        ext_id = request.query.get("externalId")
        if not ext_id:
            raise missing("externalId")
        push_permitted = bool_query(request, "pushPermitted")
        self._existing(ext_id)
        record = self.state.users.get(ext_id)
        categories = dict(record.categories or {}) if record is not None else {}
        if push_permitted:  # [I] pushPermitted=true: only the categories the user is opted in to
            categories = {k: v for k, v in categories.items() if v}
        return {
            "externalId": ext_id,
            "categories": [{"category": k, "enable": v} for k, v in sorted(categories.items())],
        }

    # -- profile attributes ------------------------------------------------------------------------------

    def _profiles(self, body: Any, kind: str) -> list[dict[str, Any]]:
        items = self._items(body, ("extId", "profile"))
        if kind == "object" and set(map(type, [item["profile"] for item in items])) == {dict}:
            return items  # every profile is an object: nothing more to check, nor to name
        for i, item in enumerate(items):
            profile = item["profile"]
            if kind == "keys":
                if type(profile) is not list or not all(type(k) is str for k in profile):
                    raise self._check.wrong(f"[{i}].profile", "an array of attribute names")
            else:
                self._check.obj(profile, f"[{i}].profile")
                if kind == "arrays":
                    for key, values in profile.items():
                        if type(values) is not list:
                            raise self._check.wrong(f"[{i}].profile.{key}", "an array")
        return items

    def _set_profile(self, body: Any) -> None:
        items = self._profiles(body, "object")
        if self._stateless("setProfileAttributes", len(items)):
            return
        self._known([item["extId"] for item in items])
        for item in items:
            self.state.user(item["extId"]).update_profile(item["profile"])
        self._applied("setProfileAttributes", len(items))

    def _unset_profile(self, body: Any) -> None:
        items = self._profiles(body, "keys")
        if self._stateless("unsetProfileAttributes", len(items)):
            return
        self._known([item["extId"] for item in items])
        for item in items:
            self.state.user(item["extId"]).unset_profile(item["profile"])
        self._applied("unsetProfileAttributes", len(items))

    def _array_op(self, body: Any, operation: str, push: bool) -> None:
        items = self._profiles(body, "arrays")
        if self._stateless(operation, len(items)):
            return
        # Unknown users are refused (``error``) or created by the change below, never before the checks: a
        # refused request must not leave the users it named behind.
        self._known([item["extId"] for item in items], create=False)
        for i, item in enumerate(items):  # check every target first: the request applies fully or not at all
            record = self.state.users.get(item["extId"])
            profile = record.profile if record is not None else None
            for key in item["profile"]:
                current = profile.get(key) if profile else None
                if current is not None and type(current) is not list:
                    raise ApiError(
                        400, self._check.type_code, f"[{i}].profile.{key}: attribute is not an array"
                    )
        for item in items:
            self.state.user(item["extId"]).change_profile_arrays(item["profile"], push=push)
        self._applied(operation, len(items))

    def _push_profile(self, body: Any) -> None:
        self._array_op(body, "pushProfileAttributes", push=True)

    def _pull_profile(self, body: Any) -> None:
        self._array_op(body, "pullProfileAttributes", push=False)

    def _delete_profile_attributes(self, body: Any) -> None:
        check = self._check
        names: set[str] = set()
        for i, item in enumerate(check.array(body)):
            obj = check.obj(item, f"[{i}]")
            profile = obj.get("profile")
            if profile is None:
                raise missing(f"[{i}].profile")
            if type(profile) is not list or not all(type(k) is str for k in profile):
                raise check.wrong(f"[{i}].profile", "an array of attribute names")
            names.update(profile)
        if self._stateless("deleteProfileAttributes", 0):
            return
        self._applied("deleteProfileAttributes", self.state.delete_profile_attributes(names))

    def _delete_profile_attribute_value(self, body: Any) -> None:
        check = self._check
        items = [body] if type(body) is dict else check.array(body)  # one public client sends an object [C]
        pairs = []
        for i, item in enumerate(items):
            obj = check.obj(item, f"[{i}]")
            key = check.string(obj, "key", f"[{i}].")
            if obj.get("value") is None:
                raise missing(f"[{i}].value")
            pairs.append((key, obj["value"]))
        if self._stateless("deleteProfileAttributeValue", 0):
            return
        # [I] a scalar attribute holding the value loses the attribute (see User.delete_profile_value)
        self._applied("deleteProfileAttributeValue", self.state.delete_profile_value(pairs))

    def _get_profile(self, request: web.Request) -> dict[str, Any]:
        ext_id = request.query.get("extId")
        if not ext_id:
            raise missing("extId")
        self._existing(ext_id)
        record = self.state.users.get(ext_id)
        return {"extId": ext_id, "profile": (record.profile_dict() or {}) if record is not None else {}}

    # -- devices and segments ----------------------------------------------------------------------------

    def _get_devices(self, request: web.Request) -> dict[str, Any]:
        ext_id = request.query.get("extId")
        if not ext_id:
            raise missing("extId")
        only_permitted = bool_query(request, "pushPermitted")
        self._existing(ext_id)
        devices = self.state.devices_of(ext_id)
        if only_permitted:
            devices = [d for d in devices if d.push_permitted]
        return {"extId": ext_id, "devices": [d.to_api() for d in devices]}

    def _get_device_tokens(self, request: web.Request) -> dict[str, Any]:
        size = self._check.query_int(request, "max", 10)
        offset = self._check.query_int(request, "offset", 0)
        if size == 0:
            raise self._check.wrong("max", "a positive integer")
        page, total = self.state.device_page(offset, size)
        out: dict[str, Any] = {}
        more = offset + size < total
        url = (
            self._next_url(request, "getDeviceTokens", {"offset": offset + size, "max": size})
            if more
            else None
        )
        self._page_link(out, "nextPage", url)
        out["total"] = total
        out["devices"] = [d.to_api() for d in page]
        return out

    @staticmethod
    def _os_header(request: web.Request) -> str:
        os_name = request.headers.get("X-netmera-os")
        if not os_name:
            raise missing("X-netmera-os header")
        if os_name.upper() not in PLATFORMS:
            raise ApiError(400, MISSING_PARAMETER, "invalid X-netmera-os header: expected IOS or ANDROID")
        return os_name.upper()

    def _get_segments(self, request: web.Request) -> dict[str, Any]:
        self._os_header(request)
        return {
            "list": [
                {"id": s.id, "name": s.name, "userCount": len(s.members), "type": s.type}
                for s in self.state.segments.values()
            ]
        }

    def _get_segment_users(self, request: web.Request) -> dict[str, Any]:
        check = self._check
        self._os_header(request)
        segment_id = check.query_int(request, "id", None)
        size = check.query_int(request, "max", 100)
        if size > 1000:
            raise ApiError(400, MISSING_PARAMETER, "max cannot be greater than 1000")
        size = max(size, 100)  # documented: "even if a value less than 100 is entered, it returns 100 users"
        offset = check.query_int(request, "offset", 0)
        segment = self.state.segments.get(segment_id)
        if segment is None:
            raise ApiError(400, SEGMENT_NOT_FOUND, "segment not found")
        users = self.state.users
        items = []
        for ext_id in segment.members[offset : offset + size]:
            record = users.get(ext_id)
            items.append(
                {
                    "externalId": ext_id,
                    "msisdn": record.msisdn if record is not None else None,
                    "email": record.email if record is not None else None,
                }
            )
        out: dict[str, Any] = {"name": segment.name, "list": items}
        more = offset + size < len(segment.members)
        params = {"id": segment.id, "max": size, "offset": offset + size}
        self._page_link(
            out,
            self.config.segment_next_page_field,
            self._next_url(request, "getSegmentUsers", params) if more else None,
        )
        return out

    # -- e-mail and SMS ----------------------------------------------------------------------------------

    def _opt(
        self, body: Any, list_key: str, index: dict[str, set[str]], attr: str, value: bool, op: str
    ) -> None:
        check = self._check
        obj = check.obj(body)
        if ("extIds" in obj) == (list_key in obj):
            raise ApiError(
                400, MISSING_PARAMETER, f"missing required parameter: exactly one of extIds or {list_key}"
            )
        if "extIds" in obj:
            ids = check.unique(check.strings(obj, "extIds"))
            if self._stateless(op, len(ids)):
                return
            self._known(ids)
        else:
            keys = check.unique(check.strings(obj, list_key), list_key)
            if self._stateless(op, 0):  # addresses name users only through the state
                return
            ids = self.state.owners(index, keys)  # [I] addresses no user holds are ignored
        for ext_id in ids:
            setattr(self.state.user(ext_id), attr, value)
        self._applied(op, len(ids))

    def _enable_mail(self, body: Any) -> None:
        self._opt(body, "emailList", self.state.emails, "email_opt_in", True, "enableMail")

    def _disable_mail(self, body: Any) -> None:
        self._opt(body, "emailList", self.state.emails, "email_opt_in", False, "disableMail")

    def _enable_sms(self, body: Any) -> None:
        self._opt(body, "msisdnList", self.state.msisdns, "sms_opt_in", True, "enableSms")

    def _disable_sms(self, body: Any) -> None:
        self._opt(body, "msisdnList", self.state.msisdns, "sms_opt_in", False, "disableSms")

    def _update_email(self, body: Any) -> None:
        obj = self._check.obj(body)
        ext_id = self._check.string(obj, "extId")
        email = self._check.string(obj, "email")
        if self._stateless("updateEmail", 1):
            return
        self._known((ext_id,))
        self.state.set_email(ext_id, email)
        self._applied("updateEmail", 1)

    def _update_msisdn(self, body: Any) -> None:
        obj = self._check.obj(body)
        ext_id = self._check.string(obj, "extId")
        msisdn = self._check.string(obj, "msisdn")
        if self._stateless("updateMsisdn", 1):
            return
        self._known((ext_id,))
        self.state.set_msisdn(ext_id, msisdn)
        self._applied("updateMsisdn", 1)

    # -- events and notifications --------------------------------------------------------------------------

    def _fire_events(self, body: Any) -> None:
        items = self._items(body, ("extId", "name"))
        for i, item in enumerate(items):
            self._check.string(item, "name", f"[{i}].")
        if self._stateless("fireEvents", len(items)):
            return
        self._known([item["extId"] for item in items])
        now = self._clock()
        self.state.events.extend(
            Event(
                item["extId"],
                item["name"],
                {k: v for k, v in item.items() if k not in ("extId", "name")},
                now,
            )
            for item in items
        )
        self._applied("fireEvents", len(items))

    def _target_ids(self, target: dict[str, Any], where: str) -> list[str]:
        """The extIds a target names: extId(s), deviceToken(s), a tag, a segment, or everyone [I]."""
        check = self._check
        state = self.state
        for key, tokens in (
            ("extId", False),
            ("extIds", False),
            ("deviceToken", True),
            ("deviceTokens", True),
        ):
            if key in target:
                value = target[key]
                values = [value] if type(value) is str else value
                if type(values) is not list or not values or not all(type(v) is str for v in values):
                    raise check.wrong(f"{where}.{key}", "a string or an array of strings")
                unique = check.unique(values, "device tokens" if tokens else "extIds")
                if tokens:
                    return [state.devices[t].ext_id for t in unique if t in state.devices]
                return [e for e in unique if state.exists(e)]
        if "tag" in target:
            return list(state.tags.get(check.string(target, "tag", where + "."), ()))
        if "segmentId" in target:
            segment = state.segments.get(check.integer(target, "segmentId", where + "."))
            if segment is None and self.config.stateless:
                return []  # no segment exists: not an error when nothing is kept
            if segment is None:
                raise ApiError(400, SEGMENT_NOT_FOUND, "segment not found")
            return list(segment.members)
        if target.get("sendToAll") is True:
            return state.all_ext_ids()
        raise missing(f"{where}.extId or {where}.deviceToken")

    def _send_bulk_notification(self, body: Any) -> dict[str, Any]:
        check = self._check
        obj = check.obj(body)
        if obj.get("message") is None:
            raise missing("message")
        if obj.get("target") is None:
            raise missing("target")
        message = check.obj(obj["message"], "message")
        target = check.obj(obj["target"], "target")
        check.string(message, "text", "message.")
        platforms = message.get("platforms")
        if platforms is None:
            raise missing("message.platforms")
        if type(platforms) is not list or not platforms or not all(p in PLATFORMS for p in platforms):
            raise check.wrong("message.platforms", "a non-empty array of IOS, ANDROID")
        ids = self._target_ids(target, "target")
        if self._stateless("sendBulkNotification", len(ids)):
            return {"notificationKey": self.state.reserve_key()}
        key = self.state.new_notification("bulk", message, target, ids)
        self._applied("sendBulkNotification", len(ids))
        return {"notificationKey": key}

    def _send_notification(self, body: Any) -> None:
        check = self._check
        requests = check.array(body) if type(body) is list else [check.obj(body)]
        plans = []
        for i, item in enumerate(requests):
            where = f"[{i}]" if type(body) is list else ""
            obj = check.obj(item, where or "body")
            prefix = f"{where}." if where else ""
            check.integer(obj, "notificationKey", prefix)
            if obj.get("target") is None:
                raise missing(prefix + "target")
            target = check.obj(obj["target"], prefix + "target")
            message = obj.get("message") or {}
            check.obj(message, prefix + "message")
            if "params" in message:
                check.obj(message["params"], prefix + "message.params")
            plans.append((obj, message, target, self._target_ids(target, prefix + "target")))
        if self._stateless("sendNotification", sum(len(plan[3]) for plan in plans)):
            return
        reached = 0
        for obj, message, target, ids in plans:
            self.state.new_notification(
                "transactional", {**message, "template": obj["notificationKey"]}, target, ids
            )
            reached += len(ids)
        self._applied("sendNotification", reached)

    def _send_push_approval(self, body: Any) -> None:
        check = self._check
        items = check.array(body)
        ids = [
            check.integer(check.obj(item, f"[{i}]"), "messageId", f"[{i}].") for i, item in enumerate(items)
        ]
        if self._stateless("sendPushApproval", len(ids)):
            return
        for message_id in ids:
            self.state.approvals.append(message_id)
            notification = self.state.notifications.get(message_id)
            if notification is not None:
                notification.approved = True
        self._applied("sendPushApproval", len(ids))

    def _notification(self, request: web.Request) -> Any:
        key = self._check.query_int(request, "notificationKey", None)
        notification = self.state.notifications.get(key)
        if notification is None:
            raise ApiError(400, MISSING_PARAMETER, "notification not found")  # [I] code undocumented
        return notification

    def _get_push_stats(self, request: web.Request) -> dict[str, Any]:
        n = self._notification(request)
        platforms = n.message.get("platforms") or sorted(n.sent) or list(PLATFORMS)
        return {
            "notificationKey": n.key,
            "status": n.status,
            "startDate": int(n.created_at * 1000),
            "endDate": int(n.created_at * 1000),
            "stats": [
                {"platform": p, "sent": n.sent.get(p, 0), "failed": 0, "clicked": 0} for p in platforms
            ],
        }

    def _get_push_result(self, request: web.Request) -> dict[str, Any]:
        """[I] shape: ``{"list": [{"platform", "sent"}], "nextPage"}`` with an opaque cursor (base-36 offset)."""
        n = self._notification(request)
        size = self._check.query_int(request, "max", 100)
        cursor = request.query.get("cursor", "")
        try:
            offset = int(cursor, 36) if cursor else 0
        except ValueError:
            raise self._check.wrong("cursor", "a cursor from nextPage") from None
        rows = sorted(n.sent.items())
        out: dict[str, Any] = {"list": [{"platform": p, "sent": c} for p, c in rows[offset : offset + size]]}
        more = offset + size < len(rows)
        params = {"notificationKey": n.key, "max": size, "cursor": _base36(offset + size)}
        self._page_link(out, "nextPage", self._next_url(request, "getPushResult", params) if more else None)
        return out


def _base36(value: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        value, rem = divmod(value, 36)
        out = digits[rem] + out
        if not value:
            return out
