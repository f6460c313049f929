"""Meiro CDP: push-notification exports and the push-notification trash (seed 002, ``platforms.md`` §3).

Records shared by the connector (:mod:`.client`), the poller (:mod:`.poller`), the job file (:mod:`.job`) and
the emulator (:mod:`sync.platforms.sandboxes.meiro`); no I/O here. The API answers are parsed once, at the
boundary, into these frozen records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "EDIT_FEATURE",
    "PLATFORM",
    "TERMINAL_STATUSES",
    "TOKEN_TTL",
    "VIEW_FEATURE",
    "Export",
    "ExportPage",
    "ExportStatus",
    "MessageCounts",
    "TrashPage",
    "TrashedNotification",
]

PLATFORM = "meiro"
TOKEN_TTL = 8 * 3600.0
"""A login token expires 8 hours after it was issued [D]."""
VIEW_FEATURE = "push_notifications/view"
EDIT_FEATURE = "push_notifications/edit"


class ExportStatus(StrEnum):
    """Status of a push-notification export [D]."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ERROR = "error"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        """Whether the export can no longer change (finished, error, canceled)."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({ExportStatus.FINISHED, ExportStatus.ERROR, ExportStatus.CANCELED})


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _user_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class MessageCounts:
    """``message_counts`` of an export: messages in total, sent, and excluded (invalid, frequency cap)."""

    total: int = 0
    sent: int = 0
    excluded_invalid: int = 0
    excluded_by_frequency_cap: int = 0

    @classmethod
    def from_api(cls, data: Any) -> MessageCounts:
        if not isinstance(data, Mapping):
            return cls()
        return cls(
            _int(data.get("total")),
            _int(data.get("sent")),
            _int(data.get("excluded_invalid")),
            _int(data.get("excluded_by_frequency_cap")),
        )

    @property
    def done(self) -> int:
        """Messages dealt with so far: sent or excluded."""
        return self.sent + self.excluded_invalid + self.excluded_by_frequency_cap

    def to_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "sent": self.sent,
            "excluded_invalid": self.excluded_invalid,
            "excluded_by_frequency_cap": self.excluded_by_frequency_cap,
        }


@dataclass(frozen=True, slots=True)
class Export:
    """One push-notification export as the API describes it."""

    id: int
    status: ExportStatus
    name: str = ""
    user_id: int | None = None
    segment_names: tuple[str, ...] = ()
    message_counts: MessageCounts = field(default_factory=MessageCounts)
    statuses_history: Mapping[str, str] = field(default_factory=dict)
    created: str | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Export:
        """Parse one export object; raises ValueError when ``id`` or ``status`` is missing or unknown."""
        try:
            export_id = int(data["id"])
            status = ExportStatus(str(data["status"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a push notification export: {exc}") from exc
        segments = data.get("segments") or ()
        stats = data.get("stats") or {}
        history = stats.get("statuses_history") if isinstance(stats, Mapping) else None
        return cls(
            id=export_id,
            status=status,
            name=str(data.get("name") or ""),
            user_id=data.get("user_id") if isinstance(data.get("user_id"), int) else None,
            segment_names=tuple(str(s.get("name", "")) for s in segments if isinstance(s, Mapping)),
            message_counts=MessageCounts.from_api(data.get("message_counts")),
            statuses_history={str(k): str(v) for k, v in (history or {}).items() if v is not None},
            created=None if data.get("created") is None else str(data["created"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``--output json``)."""
        return {
            "id": self.id,
            "name": self.name,
            "status": str(self.status),
            "user_id": self.user_id,
            "segments": list(self.segment_names),
            "message_counts": self.message_counts.to_dict(),
            "statuses_history": dict(self.statuses_history),
            "created": self.created,
        }


@dataclass(frozen=True, slots=True)
class ExportPage:
    """One page of ``GET /push_notifications/{id}/exports`` and the ``selection_settings`` echoed back."""

    exports: tuple[Export, ...]
    limit: int | None
    offset: int | None


@dataclass(frozen=True, slots=True)
class TrashedNotification:
    """A push notification in the trash (its ``id`` is a UUID string)."""

    id: str
    name: str
    modified: str | None = None
    modified_by: int | None = None
    last_activation: str | None = None
    last_activation_by: int | None = None
    title_template: str | None = None
    body_template: str | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> TrashedNotification:
        try:
            notification_id = str(data["id"])
        except KeyError as exc:
            raise ValueError("not a push notification: no id") from exc

        def text(key: str) -> str | None:
            value = data.get(key)
            return None if value is None else str(value)

        return cls(
            id=notification_id,
            name=str(data.get("name") or ""),
            modified=text("modified"),
            modified_by=_user_id(data.get("modified_by")),
            last_activation=text("last_activation"),
            last_activation_by=_user_id(data.get("last_activation_by")),
            title_template=text("title_template"),
            body_template=text("body_template"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "modified": self.modified,
            "modified_by": self.modified_by,
            "last_activation": self.last_activation,
            "last_activation_by": self.last_activation_by,
            "title_template": self.title_template,
            "body_template": self.body_template,
        }


@dataclass(frozen=True, slots=True)
class TrashPage:
    """One page of ``GET /push_notifications/trash`` with its ``selection_settings``."""

    items: tuple[TrashedNotification, ...]
    limit: int | None
    offset: int | None
    searched_text: str | None
