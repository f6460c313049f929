"""The Forms On Fire sandbox's in-memory state: the company's known users (indexed by each identifier) and every
push received; loading from and dumping to JSON (the shape of ``GET /_sandbox/state``) and polars tables."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from sync.platforms.formsonfire import UserKey

__all__ = ["FormsOnFireState", "KnownUser", "Push"]


@dataclass(frozen=True, slots=True)
class KnownUser:
    """A user of the company: any of its three identifiers can target it."""

    user_id: str
    email: str | None = None
    external_id: str | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> KnownUser:
        """``{"UserId", "UserEmail", "UserExternalId"}`` (UserId required)."""
        if not data.get("UserId"):
            raise ValueError("a known user needs a UserId")
        for key in ("UserEmail", "UserExternalId"):
            # Indexed as text (an e-mail address lower-cased): a number here failed later, as a 500 of
            # POST /_sandbox/users, or a seed file refused in an AttributeError's words.
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValueError(f"a known user's {key} must be a string, not {data[key]!r}")
        return cls(str(data["UserId"]), data.get("UserEmail"), data.get("UserExternalId"))

    def to_dict(self) -> dict[str, Any]:
        return {"UserId": self.user_id, "UserEmail": self.email, "UserExternalId": self.external_id}


@dataclass(frozen=True, slots=True)
class Push:
    """One accepted push: the user it reached (their UserId when known, else ``<Key>:<value>``) and the message."""

    message_id: int
    user: str
    by: str
    """The identifier field the request used (``UserId``, ``UserEmail`` or ``UserExternalId``)."""
    title: str | None
    body: str | None
    sound: bool | None
    expiry_secs: int | None
    format: str
    received_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "MessageId": self.message_id,
            "User": self.user,
            "By": self.by,
            "Title": self.title,
            "Body": self.body,
            "Sound": self.sound,
            "ExpirySecs": self.expiry_secs,
            "Format": self.format,
            "ReceivedAt": self.received_at,
        }


class FormsOnFireState:
    """Known users (indexed by each identifier) and the pushes received, in order."""

    __slots__ = ("_index", "pushes", "users")

    def __init__(self) -> None:
        self.users: dict[str, KnownUser] = {}
        self._index: dict[tuple[str, str], str] = {}  # (identifier field, value) → UserId
        self.pushes: list[Push] = []

    def reset(self) -> None:
        self.users.clear()
        self._index.clear()
        self.pushes.clear()

    def add_users(self, users: Iterable[KnownUser]) -> None:
        for user in users:
            self.users[user.user_id] = user
            self._index[(UserKey.USER_ID.value, user.user_id)] = user.user_id
            if user.email:
                self._index[(UserKey.USER_EMAIL.value, user.email.lower())] = user.user_id
            if user.external_id:
                self._index[(UserKey.USER_EXTERNAL_ID.value, user.external_id)] = user.user_id

    def find(self, key: str, value: str) -> str | None:
        """The UserId ``key = value`` names, or None (e-mail addresses compare case-insensitively [I])."""
        return self._index.get((key, value.lower() if key == UserKey.USER_EMAIL.value else value))

    def pushes_for(self, user: str) -> list[Push]:
        return [p for p in self.pushes if p.user == user]

    def load(self, data: Mapping[str, Any]) -> None:
        """Load ``{"users": [{"UserId", "UserEmail", "UserExternalId"}], "pushes": [...]}`` (the dump's shape)."""
        unknown = sorted(set(data) - {"users", "pushes"})
        if unknown:  # another platform's seed file would otherwise start an empty sandbox without a word
            raise ValueError(f"unknown seed sections {unknown} (this sandbox takes users and pushes)")
        self.add_users(KnownUser.from_mapping(u) for u in data.get("users") or ())
        for item in data.get("pushes") or ():
            self.pushes.append(
                Push(
                    int(item["MessageId"]),
                    str(item["User"]),
                    str(item["By"]),
                    item.get("Title"),
                    item.get("Body"),
                    item.get("Sound"),
                    item.get("ExpirySecs"),
                    str(item.get("Format", "json")),
                    float(item.get("ReceivedAt", 0.0)),
                )
            )

    def load_file(self, path: Path) -> None:
        self.load(json.loads(path.read_text(encoding="utf-8")))

    def dump(self) -> dict[str, Any]:
        return {
            "users": [u.to_dict() for u in self.users.values()],
            "pushes": [p.to_dict() for p in self.pushes],
        }

    def tables(self) -> dict[str, pl.DataFrame]:
        """``users`` and ``pushes`` as polars frames."""
        users = pl.DataFrame(
            [u.to_dict() for u in self.users.values()],
            schema={"UserId": pl.String, "UserEmail": pl.String, "UserExternalId": pl.String},
            orient="row",
        )
        pushes = pl.DataFrame(
            [p.to_dict() for p in self.pushes],
            schema={
                "MessageId": pl.Int64,
                "User": pl.String,
                "By": pl.String,
                "Title": pl.String,
                "Body": pl.String,
                "Sound": pl.Boolean,
                "ExpirySecs": pl.Int64,
                "Format": pl.String,
                "ReceivedAt": pl.Float64,
            },
            orient="row",
        )
        return {"users": users, "pushes": pushes}
