"""The Netmera sandbox's in-memory state: users by extId, their devices, tags, profiles, preferences, e-mail and
SMS opt-ins, events, segments and notifications; plus seeding from a file and dumping (JSON or polars tables).

Built for volume (10M users in a few GB, tagUsers on 1000 IDs in well under a millisecond):

* A user exists when it has a record in ``users`` (extId → :class:`User`, or ``None`` for a bare user) **or** is
  a member of a tag. ``tagUsers`` on unknown extIds thus creates them by the one ``set.update`` that tags them:
  no lookup in a 10M-entry dict per ID (that lookup, memory-bound, was half the cost of a request).
* tags are ``tag → set of extIds``; the tags of one user are looked up on demand.
* devices are also indexed by token (``getDeviceTokens`` pages over them in insertion order).
* the records themselves are compact (:mod:`.netmera_records`, re-exported here).

The JSON dump has the same shape the seed loader reads, so a dump can seed another sandbox.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sync.sandboxes.netmera_records import PLATFORMS, Device, Event, Notification, Segment, User

__all__ = ["Device", "Event", "NetmeraState", "Notification", "Segment", "User"]


def _ms(ts: float) -> int:
    return int(ts * 1000)


class NetmeraState:
    """All data of one sandbox; the handlers in :mod:`.netmera` validate first, then call these mutators."""

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self.users: dict[str, User | None] = {}
        self.tags: dict[str, set[str]] = {}
        self.devices: dict[str, Device] = {}  # token → device, in registration order
        self.emails: dict[str, set[str]] = {}  # address → extIds (an address may be shared)
        self.msisdns: dict[str, set[str]] = {}
        self.events: list[Event] = []
        self.segments: dict[int, Segment] = {}
        self.notifications: dict[int, Notification] = {}
        self.approvals: list[int] = []
        self._next_key = 1
        self._device_list: list[Device] | None = None  # paging cache, rebuilt after devices change

    def reset(self) -> None:
        self.__init__(self._clock)  # type: ignore[misc]

    # -- users -----------------------------------------------------------------------------------------

    def exists(self, ext_id: str) -> bool:
        """Whether the user exists: it has a record or belongs to a tag."""
        return ext_id in self.users or any(ext_id in members for members in self.tags.values())

    def ensure_users(self, ext_ids: Iterable[str]) -> None:
        """Create (as bare users, no record) the users not seen yet."""
        users = self.users
        new = self.unknown(ext_ids)  # set operations run in C
        if new:
            users.update(dict.fromkeys(new))

    def user(self, ext_id: str) -> User:
        """The user's record, creating the user and/or record as needed."""
        record = self.users.get(ext_id)
        if record is None:
            record = self.users[ext_id] = User()
        return record

    def unknown(self, ext_ids: Iterable[str]) -> list[str]:
        """The extIds among ``ext_ids`` that no user has."""
        new = (ext_ids if isinstance(ext_ids, set) else set(ext_ids)).difference(self.users)
        for members in self.tags.values():
            if not new:
                break
            new = new.difference(members)  # iterates the small side (``-=`` would walk the whole tag)
        return list(new)

    def all_ext_ids(self) -> list[str]:
        """Every user: records first (in creation order), then tag-only users."""
        out = list(self.users)
        seen = set(self.users)
        for tag in sorted(self.tags):
            extra = self.tags[tag] - seen
            out.extend(sorted(extra))
            seen |= extra
        return out

    def user_count(self) -> int:
        return len(set(self.users).union(*self.tags.values()))

    def tags_of(self, ext_id: str) -> list[str]:
        return sorted(tag for tag, members in self.tags.items() if ext_id in members)

    def delete_users(self, ext_ids: set[str]) -> int:
        """Delete users with all their data (devices, tags, events, segment membership); returns how many."""
        present = [e for e in ext_ids if self.exists(e)]
        gone = set(present)
        for ext_id in present:
            record = self.users.pop(ext_id, None)
            if record is None:
                continue
            for device in record.device_tuple():
                self.devices.pop(device.token, None)
                self._device_list = None
            if record.email is not None:
                self._unindex(self.emails, record.email, ext_id)
            if record.msisdn is not None:
                self._unindex(self.msisdns, record.msisdn, ext_id)
        for members in self.tags.values():
            members.difference_update(gone)
        if gone:
            self.events = [ev for ev in self.events if ev.ext_id not in gone]
            for segment in self.segments.values():
                segment.members = [m for m in segment.members if m not in gone]
        return len(present)

    # -- tags ------------------------------------------------------------------------------------------

    def tag(self, tag: str, ext_ids: set[str]) -> None:
        members = self.tags.get(tag)
        if members is None:
            self.tags[tag] = set(ext_ids)
        else:
            members.update(ext_ids)

    def untag(self, tag: str, ext_ids: set[str]) -> None:
        """Remove the tag; the users stay (a tag-only user gets a bare entry so it does not vanish)."""
        kept = ext_ids.difference(self.users)
        if kept:
            self.users.update(dict.fromkeys(kept))
        members = self.tags.get(tag)
        if members is not None:
            members.difference_update(ext_ids)
            if not members:
                del self.tags[tag]

    # -- devices ---------------------------------------------------------------------------------------

    def add_device(self, device: Device) -> None:
        """Register a device (seeding only: the REST API has no call for it). A known token moves owner."""
        old = self.devices.pop(device.token, None)
        if old is not None:
            old_user = self.users.get(old.ext_id)
            if old_user is not None:
                old_user.devices = [d for d in old_user.device_tuple() if d.token != device.token]
        self.devices[device.token] = device
        self.user(device.ext_id).add_device(device)
        self._device_list = None

    def devices_of(self, ext_id: str) -> list[Device]:
        record = self.users.get(ext_id)
        return record.devices if record is not None else []

    def device_page(self, offset: int, count: int) -> tuple[list[Device], int]:
        """Devices ``offset .. offset+count`` in registration order, and the total."""
        if self._device_list is None:
            self._device_list = list(self.devices.values())
        return self._device_list[offset : offset + count], len(self._device_list)

    # -- profiles --------------------------------------------------------------------------------------

    def delete_profile_attributes(self, names: set[str]) -> int:
        """Remove the attributes from every user; returns how many attributes holding a value were removed."""
        return sum(r.delete_profile_attributes(names) for r in self.users.values() if r is not None)

    def delete_profile_value(self, pairs: list[tuple[str, Any]]) -> int:
        """Remove each (attribute, value) from every user (see :meth:`User.delete_profile_value`)."""
        return sum(r.delete_profile_value(pairs) for r in self.users.values() if r is not None)

    # -- e-mail / SMS ----------------------------------------------------------------------------------

    @staticmethod
    def _unindex(index: dict[str, set[str]], key: str, ext_id: str) -> None:
        owners = index.get(key)
        if owners is not None:
            owners.discard(ext_id)
            if not owners:
                del index[key]

    def set_email(self, ext_id: str, email: str) -> None:
        record = self.user(ext_id)
        if record.email is not None:
            self._unindex(self.emails, record.email, ext_id)
        record.email = email
        self.emails.setdefault(email, set()).add(ext_id)

    def set_msisdn(self, ext_id: str, msisdn: str) -> None:
        record = self.user(ext_id)
        if record.msisdn is not None:
            self._unindex(self.msisdns, record.msisdn, ext_id)
        record.msisdn = msisdn
        self.msisdns.setdefault(msisdn, set()).add(ext_id)

    def owners(self, index: dict[str, set[str]], keys: Iterable[str]) -> set[str]:
        out: set[str] = set()
        for key in keys:
            out.update(index.get(key, ()))
        return out

    # -- notifications ---------------------------------------------------------------------------------

    def reserve_key(self) -> int:
        """The next notification key (a stateless sandbox hands one out without recording a notification)."""
        key = self._next_key
        self._next_key += 1
        return key

    def new_notification(
        self, kind: str, message: dict[str, Any], target: Any, ext_ids: Iterable[str]
    ) -> int:
        """Record a notification; "sent" counts the opted-in devices of the targeted users, per platform."""
        key = self.reserve_key()
        sent: dict[str, int] = {}
        platforms = message.get("platforms")
        for ext_id in ext_ids:
            for device in self.devices_of(ext_id):
                if device.push_permitted and (not platforms or device.platform in platforms):
                    sent[device.platform] = sent.get(device.platform, 0) + 1
        self.notifications[key] = Notification(key, kind, message, target, self._clock(), sent=sent)
        return key

    # -- seeding ---------------------------------------------------------------------------------------

    def load(self, data: Mapping[str, Any]) -> None:
        """Add users, devices and segments from a document shaped like :meth:`dump` (unknown keys refused)."""
        unknown = sorted(set(data) - {"users", "devices", "segments", "events", "notifications", "approvals"})
        if unknown:
            raise ValueError(f"unknown seed sections {unknown}")
        for item in data.get("users", ()):
            self._load_user(item)
        for item in data.get("devices", ()):
            self.add_device(_device_from(item))
        for item in data.get("segments", ()):
            segment = Segment(
                int(item["id"]),
                str(item["name"]),
                str(item.get("type", "PRODUCT_SEGMENT")),
                [str(m) for m in item.get("members", ())],
            )
            self.ensure_users(segment.members)
            self.segments[segment.id] = segment

    def _load_user(self, item: Mapping[str, Any]) -> None:
        ext_id = str(item["extId"])
        self.ensure_users((ext_id,))
        for tag in item.get("tags", ()):
            self.tag(str(tag), {ext_id})
        for device in item.get("devices", ()):
            self.add_device(_device_from({**device, "extId": ext_id}))
        if item.get("profile"):
            self.user(ext_id).profile = dict(item["profile"])
        if item.get("categories"):
            self.user(ext_id).categories = {
                sys.intern(str(k)): bool(v) for k, v in item["categories"].items()
            }
        if item.get("email") is not None:
            self.set_email(ext_id, str(item["email"]))
        if item.get("msisdn") is not None:
            self.set_msisdn(ext_id, str(item["msisdn"]))
        if item.get("emailOptIn") is not None:
            self.user(ext_id).email_opt_in = bool(item["emailOptIn"])
        if item.get("smsOptIn") is not None:
            self.user(ext_id).sms_opt_in = bool(item["smsOptIn"])

    def load_file(self, path: Path) -> None:
        """Seed from ``.json`` (the :meth:`dump` shape), a ``.parquet`` table, or a directory holding
        ``users.parquet`` / ``devices.parquet`` / ``segments.parquet`` (any subset)."""
        if path.is_dir():
            for name in ("users", "devices", "segments"):
                table = path / f"{name}.parquet"
                if table.exists():
                    self._load_parquet(table, name)
            return
        if path.suffix == ".json":
            self.load(json.loads(path.read_text(encoding="utf-8")))
            return
        if path.suffix == ".parquet":
            self._load_parquet(path, None)
            return
        raise ValueError(f"seed file must be .json, .parquet or a directory: {path}")

    def _load_parquet(self, path: Path, kind: str | None) -> None:
        import polars as pl  # imported here: only seeding and dumps need it

        frame = pl.read_parquet(path)
        columns = set(frame.columns)
        if kind is None:  # a single file: its columns say what it holds
            kind = "devices" if "token" in columns else "segments" if "members" in columns else "users"
        if kind == "devices":
            ext = frame["extId"].cast(pl.String).to_list()
            tokens = frame["token"].cast(pl.String).to_list()
            platforms = frame["platform"].to_list() if "platform" in columns else ["ANDROID"] * len(ext)
            models = frame["deviceModel"].to_list() if "deviceModel" in columns else [None] * len(ext)
            # one string object per distinct platform/model, not one per device (saves ~100 B per device)
            platforms = [sys.intern(p) for p in platforms]
            models = [m if m is None else sys.intern(m) for m in models]
            permitted = frame["pushPermitted"].to_list() if "pushPermitted" in columns else [True] * len(ext)
            for e, p, t, m, pp in zip(ext, platforms, tokens, models, permitted, strict=True):
                self.add_device(Device(e, p, t, m, bool(pp)))
            return
        if kind == "segments":
            self.load({"segments": frame.to_dicts()})
            return
        for row in frame.iter_rows(named=True):
            if isinstance(row.get("profile"), str):
                row["profile"] = json.loads(row["profile"])
            if isinstance(row.get("categories"), str):
                row["categories"] = json.loads(row["categories"])
            self._load_user({k: v for k, v in row.items() if v is not None})

    def add_synthetic(
        self, users: int, devices_per_user: int = 1, *, prefix: str = "u", tag: str | None = None
    ) -> None:
        """Add ``users`` generated users (``{prefix}{i}``) with ``devices_per_user`` devices each (benchmarks)."""
        created = []  # the same string objects go into the tag: one copy of each extId, not two
        for i in range(users):
            ext_id = f"{prefix}{i}"
            created.append(ext_id)
            self.ensure_users((ext_id,))
            for d in range(devices_per_user):
                platform = PLATFORMS[(i + d) % 2]
                self.add_device(Device(ext_id, platform, f"tok-{prefix}{i}-{d}", "Model X", (i + d) % 7 != 0))
        if tag is not None:
            self.tag(tag, set(created))

    # -- dumping ---------------------------------------------------------------------------------------

    def user_dict(self, ext_id: str) -> dict[str, Any]:
        record = self.users.get(ext_id)
        out: dict[str, Any] = {"extId": ext_id, "tags": self.tags_of(ext_id)}
        if record is not None:
            out["devices"] = [d.to_api() for d in record.device_tuple()]
            out["profile"] = record.profile_dict() or {}
            out["categories"] = dict(record.categories or {})
            out["email"] = record.email
            out["emailOptIn"] = record.email_opt_in
            out["msisdn"] = record.msisdn
            out["smsOptIn"] = record.sms_opt_in
        return out

    def _tags_by_user(self) -> dict[str, list[str]]:
        by_user: dict[str, list[str]] = {}
        for tag in sorted(self.tags):
            for ext_id in self.tags[tag]:
                by_user.setdefault(ext_id, []).append(tag)
        return by_user

    def dump(self) -> dict[str, Any]:
        """The whole state, JSON-ready, in the seed file's shape (plus events, notifications, approvals)."""
        tags = self._tags_by_user()
        users = []
        for ext_id in self.all_ext_ids():
            record = self.users.get(ext_id)
            item: dict[str, Any] = {"extId": ext_id, "tags": tags.get(ext_id, [])}
            if record is not None:
                item["devices"] = [d.to_api() for d in record.device_tuple()]
                for key, value in (
                    ("profile", record.profile_dict()),
                    ("categories", record.categories),
                    ("email", record.email),
                    ("emailOptIn", record.email_opt_in),
                    ("msisdn", record.msisdn),
                    ("smsOptIn", record.sms_opt_in),
                ):
                    if value is not None:
                        item[key] = value
            users.append(item)
        return {
            "users": users,
            "segments": [
                {"id": s.id, "name": s.name, "type": s.type, "members": list(s.members)}
                for s in self.segments.values()
            ],
            "events": [
                {
                    "extId": e.ext_id,
                    "name": e.name,
                    "attributes": e.attributes,
                    "receivedAt": _ms(e.received_at),
                }
                for e in self.events
            ],
            "notifications": [
                {
                    "notificationKey": n.key,
                    "kind": n.kind,
                    "message": n.message,
                    "target": n.target,
                    "status": n.status,
                    "approved": n.approved,
                    "sent": n.sent,
                    "createdAt": _ms(n.created_at),
                }
                for n in self.notifications.values()
            ],
            "approvals": list(self.approvals),
        }

    def tables(self) -> dict[str, Any]:
        """The state as polars DataFrames: users (nested values as JSON text), devices, segments, events.

        Written to ``users.parquet``, ``devices.parquet`` and ``segments.parquet`` in one directory they seed a
        new sandbox (:meth:`load_file`)."""
        import polars as pl

        from sync.sandboxes._base import table  # with polars: only dumps need it

        tags = self._tags_by_user()
        rows = []
        for ext_id in self.all_ext_ids():
            r = self.users.get(ext_id) or User()
            rows.append(
                {
                    "extId": ext_id,
                    "tags": tags.get(ext_id, []),
                    "profile": json.dumps(r.profile_dict() or {}),
                    "categories": json.dumps(r.categories or {}),
                    "email": r.email,
                    "emailOptIn": r.email_opt_in,
                    "msisdn": r.msisdn,
                    "smsOptIn": r.sms_opt_in,
                }
            )
        user_schema: dict[str, Any] = {
            "extId": pl.String,
            "tags": pl.List(pl.String),
            "profile": pl.String,
            "categories": pl.String,
            "email": pl.String,
            "emailOptIn": pl.Boolean,
            "msisdn": pl.String,
            "smsOptIn": pl.Boolean,
        }
        devices = list(self.devices.values())
        return {
            "users": pl.DataFrame(rows, schema=user_schema),
            "devices": table(
                devices,
                {
                    "extId": (pl.String, "ext_id"),
                    "platform": (pl.String, "platform"),
                    "token": (pl.String, "token"),
                    "deviceModel": (pl.String, "device_model"),
                    "pushPermitted": (pl.Boolean, "push_permitted"),
                },
            ),
            "segments": table(
                list(self.segments.values()),
                {
                    "id": (pl.Int64, "id"),
                    "name": (pl.String, "name"),
                    "type": (pl.String, "type"),
                    "members": (pl.List(pl.String), lambda seg: list(seg.members)),
                },
            ),
            "events": table(
                self.events,
                {
                    "extId": (pl.String, "ext_id"),
                    "name": (pl.String, "name"),
                    "attributes": (pl.String, lambda e: json.dumps(e.attributes)),
                    "receivedAt": (pl.Int64, lambda e: _ms(e.received_at)),
                },
            ),
        }


def _device_from(item: Mapping[str, Any]) -> Device:
    model = item.get("deviceModel")
    return Device(
        str(item["extId"]),
        sys.intern(str(item.get("platform", "ANDROID"))),  # shared, not one copy per device
        str(item["token"]),
        None if model is None else sys.intern(str(model)),
        bool(item.get("pushPermitted", True)),
    )
