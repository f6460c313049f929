"""The Meiro sandbox's in-memory state: push notifications (live or in the trash) and their exports.

An export moves ``waiting → running → finished`` (or ``error``, when seeded so) deterministically, counted either
in polls of that export (``GET .../exports/{id}``) or in seconds of the sandbox clock since it was created; see
:class:`Progression`. Transitions are materialised when an export is read, stamped in ``statuses_history``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sync.platforms.meiro import ExportStatus

__all__ = ["MeiroState", "Progression", "SandboxExport", "SandboxNotification", "meiro_time"]


class Progression(StrEnum):
    """What moves an export along [I: Meiro does not say how long exports take]."""

    POLLS = "polls"
    """``waiting``/``running`` last that many ``GET`` calls of the export (deterministic; the default)."""
    TIME = "time"
    """``waiting``/``running`` last that many seconds of the sandbox clock."""


def meiro_time(ts: float) -> str:
    """Meiro's timestamp format in export documents: ``2017-01-01 15:35:00`` (UTC)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _iso(ts: float) -> str:
    """The trash documents' format: ``2018-11-07T10:19:48Z``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True)
class SandboxExport:
    """One export and how it will end. ``waiting``/``running`` are polls or seconds (see :class:`Progression`)."""

    id: int
    notification_id: str
    name: str
    user_id: int
    created_at: float
    total: int
    excluded_invalid: int = 0
    excluded_by_frequency_cap: int = 0
    outcome: ExportStatus = ExportStatus.FINISHED
    """``finished`` or ``error``: where the export ends unless canceled."""
    waiting: float = 1.0
    running: float = 3.0
    segments: list[dict[str, Any]] = field(default_factory=list)
    status: ExportStatus = ExportStatus.WAITING
    polls: int = 0
    sent: int = 0
    history: dict[str, float] = field(default_factory=dict)
    cancel_due: float | None = None
    """A cancel was accepted but has not taken effect: the export becomes ``canceled`` once its progression
    units (polls, or seconds since it was created) reach this."""

    def units(self, now: float, progression: Progression) -> float:
        """How far the export has come: polls of it, or seconds of the sandbox clock since it was created."""
        return (now - self.created_at) if progression is Progression.TIME else float(self.polls)

    def advance(self, now: float, progression: Progression) -> None:
        """Materialise the transitions due by ``now`` (or by the poll count)."""
        if self.status.terminal:
            return
        time_based = progression is Progression.TIME
        units = self.units(now, progression)
        sendable = max(0, self.total - self.excluded_invalid - self.excluded_by_frequency_cap)

        def stamp(offset: float) -> float:
            return self.created_at + offset if time_based else now

        if self.cancel_due is not None:
            if units >= self.cancel_due:
                self.cancel(stamp(self.cancel_due))
            return  # [I] a stopping export sends nothing more and moves on only to canceled

        if self.status is ExportStatus.WAITING and units >= self.waiting:
            self.status = ExportStatus.RUNNING
            self.history[ExportStatus.RUNNING] = stamp(self.waiting)
        if self.status is ExportStatus.RUNNING:
            done = units - self.waiting
            if done >= self.running:
                self.status = self.outcome
                self.history[self.outcome] = stamp(self.waiting + self.running)
                if self.outcome is ExportStatus.FINISHED:
                    self.sent = sendable
                else:  # an export that fails stops half-way [I]
                    self.sent = sendable // 2
            elif self.running > 0:
                self.sent = math.floor(sendable * done / self.running)

    def cancel(self, now: float) -> None:
        self.status = ExportStatus.CANCELED
        self.history[ExportStatus.CANCELED] = now

    def to_api(self, notification_name: str) -> dict[str, Any]:
        """The documented export object."""
        finished = self.status is ExportStatus.FINISHED
        return {
            "id": self.id,
            "user_id": self.user_id,
            "segments": [dict(s) for s in self.segments],
            "segment_name": self.segments[0]["name"] if self.segments else None,
            "name": self.name or f"{notification_name} export {self.id}",
            "status": str(self.status),
            "stats": {"statuses_history": {k: meiro_time(v) for k, v in self.history.items()}},
            "message_counts": {
                "total": self.total,
                "sent": self.sent,
                # exclusions are only known once the export has gone through every recipient [I]
                "excluded_invalid": self.excluded_invalid if finished else 0,
                "excluded_by_frequency_cap": self.excluded_by_frequency_cap if finished else 0,
            },
            "created": meiro_time(self.created_at),
        }


@dataclass(slots=True)
class SandboxNotification:
    """A push notification: live, or in the trash. Its exports are reachable only while it is live [I]."""

    id: str
    name: str
    title_template: str = "title"
    body_template: str = "body"
    modified: float = 0.0
    modified_by: int = 1
    last_activation: float | None = None
    last_activation_by: int | None = None
    trashed: bool = False
    exports: dict[int, SandboxExport] = field(default_factory=dict)

    def to_api(self) -> dict[str, Any]:
        """The documented (trashed) push-notification object."""
        return {
            "id": self.id,
            "name": self.name,
            "title_template": self.title_template,
            "body_template": self.body_template,
            "modified": _iso(self.modified),
            "modified_by": self.modified_by,
            "last_activation": None if self.last_activation is None else _iso(self.last_activation),
            "last_activation_by": self.last_activation_by,
        }


class MeiroState:
    """All data of one Meiro sandbox; handlers validate first, then read or change it here."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        progression: Progression = Progression.POLLS,
        waiting: float = 1.0,
        running: float = 3.0,
        cancel_delay: float = 0.0,
    ) -> None:
        self._clock = clock
        self.progression = progression
        self.default_waiting = waiting
        self.default_running = running
        self.cancel_delay = cancel_delay  # polls (or seconds) a canceled export takes to stop; 0: at once
        self.notifications: dict[str, SandboxNotification] = {}
        self._next_export = 1

    def reset(self) -> None:
        self.notifications.clear()
        self._next_export = 1

    # -- building (seeding and tests; Meiro documents no API call that creates a push export) -------------

    def add_notification(
        self, name: str, *, notification_id: str | None = None, trashed: bool = False, **fields: Any
    ) -> SandboxNotification:
        nid = notification_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"meiro-sandbox:{name}"))
        if nid in self.notifications:
            raise ValueError(f"push notification {nid} already exists")
        fields.setdefault("modified", self._clock())
        notification = SandboxNotification(id=nid, name=name, trashed=trashed, **fields)
        self.notifications[nid] = notification
        return notification

    def add_export(
        self,
        notification_id: str,
        *,
        total: int = 100,
        excluded_invalid: int = 0,
        excluded_by_frequency_cap: int = 0,
        outcome: ExportStatus | str = ExportStatus.FINISHED,
        status: ExportStatus | str | None = None,
        waiting: float | None = None,
        running: float | None = None,
        name: str = "",
        user_id: int = 1,
        segments: list[dict[str, Any]] | None = None,
        export_id: int | None = None,
        created_at: float | None = None,
    ) -> SandboxExport:
        """Add an export (new ones start ``waiting``; ``status`` seeds one already in that state)."""
        notification = self.notifications[notification_id]
        outcome = ExportStatus(outcome)
        if outcome not in (ExportStatus.FINISHED, ExportStatus.ERROR):
            raise ValueError("an export's outcome is finished or error")
        eid = export_id if export_id is not None else self._next_export
        self._next_export = max(self._next_export, eid + 1)
        now = self._clock() if created_at is None else created_at
        export = SandboxExport(
            id=eid,
            notification_id=notification_id,
            name=name,
            user_id=user_id,
            created_at=now,
            total=total,
            excluded_invalid=excluded_invalid,
            excluded_by_frequency_cap=excluded_by_frequency_cap,
            outcome=outcome,
            waiting=self.default_waiting if waiting is None else waiting,
            running=self.default_running if running is None else running,
            segments=list(segments or [{"id": 1, "name": "all users", "type": "custom", "deleted": False}]),
        )
        export.history[ExportStatus.WAITING] = now
        if status is not None:
            self._force(export, ExportStatus(status), now)
        notification.exports[eid] = export
        return export

    @staticmethod
    def _force(export: SandboxExport, status: ExportStatus, now: float) -> None:
        sendable = max(0, export.total - export.excluded_invalid - export.excluded_by_frequency_cap)
        export.status = status
        if status is not ExportStatus.WAITING:
            export.history[ExportStatus.RUNNING] = now
        if status.terminal:
            export.history[status] = now
        export.sent = sendable if status is ExportStatus.FINISHED else 0
        if status is ExportStatus.ERROR:
            export.outcome = ExportStatus.ERROR

    # -- reading and changing -------------------------------------------------------------------------

    def live(self, notification_id: str) -> SandboxNotification | None:
        notification = self.notifications.get(notification_id)
        return None if notification is None or notification.trashed else notification

    def exports_newest_first(self, notification: SandboxNotification) -> list[SandboxExport]:
        now = self._clock()
        for export in notification.exports.values():
            export.advance(now, self.progression)
        return sorted(notification.exports.values(), key=lambda e: (e.created_at, e.id), reverse=True)

    def poll(self, export: SandboxExport) -> None:
        """One ``GET`` of the export: counts a poll, then applies the transitions now due."""
        export.polls += 1
        export.advance(self._clock(), self.progression)

    def settle(self, export: SandboxExport) -> None:
        """Apply the transitions due now without counting a poll (a cancel reads the export's state so)."""
        export.advance(self._clock(), self.progression)

    def cancel(self, export: SandboxExport) -> bool:
        """Cancel a waiting or running export: at once, or after ``cancel_delay`` polls (or seconds) during
        which it keeps its status. Returns whether this call changed anything (not already ended or stopping);
        the caller refuses an export that has ended."""
        now = self._clock()
        export.advance(now, self.progression)
        if export.status.terminal or export.cancel_due is not None:
            return False
        if self.cancel_delay <= 0:
            export.cancel(now)
        else:
            export.cancel_due = export.units(now, self.progression) + self.cancel_delay
        return True

    def trash(self, search: str | None) -> list[SandboxNotification]:
        """Trashed notifications, most recently modified first [I], filtered by name (case-insensitive) [I]."""
        needle = (search or "").casefold()
        items = [n for n in self.notifications.values() if n.trashed and needle in n.name.casefold()]
        return sorted(items, key=lambda n: (n.modified, n.id), reverse=True)

    def restore(self, notification: SandboxNotification) -> None:
        notification.trashed = False
        notification.modified = self._clock()

    # -- seeding and dumps ------------------------------------------------------------------------------

    def load(self, data: Mapping[str, Any]) -> None:
        """Seed from ``{"push_notifications": [{"id", "name", "trashed", "exports": [{...}]}]}``."""
        unknown = sorted(set(data) - {"push_notifications"})
        if unknown:
            raise ValueError(f"unknown seed sections {unknown}")
        for item in data.get("push_notifications", ()):
            item = dict(item)
            exports = item.pop("exports", ())
            name = str(item.pop("name"))
            nid = item.pop("id", None)
            notification = self.add_notification(
                name, notification_id=None if nid is None else str(nid), **item
            )
            for export in exports:
                spec = dict(export)
                if "id" in spec:
                    spec["export_id"] = int(spec.pop("id"))
                self.add_export(notification.id, **spec)

    def load_file(self, path: Path) -> None:
        self.load(json.loads(path.read_text(encoding="utf-8")))

    def dump(self) -> dict[str, Any]:
        """The whole state, JSON-ready, in the seed file's shape (plus each export's current status)."""
        out = []
        for n in self.notifications.values():
            out.append(
                {
                    "id": n.id,
                    "name": n.name,
                    "trashed": n.trashed,
                    "exports": [
                        {
                            "id": e.id,
                            "name": e.name,
                            "total": e.total,
                            "excluded_invalid": e.excluded_invalid,
                            "excluded_by_frequency_cap": e.excluded_by_frequency_cap,
                            "outcome": str(e.outcome),
                            "waiting": e.waiting,
                            "running": e.running,
                            "status": str(e.status),
                            "polls": e.polls,
                            "sent": e.sent,
                        }
                        for e in n.exports.values()
                    ],
                }
            )
        return {"push_notifications": out}

    def tables(self) -> dict[str, Any]:
        """``notifications`` and ``exports`` as polars DataFrames (for ``/_sandbox/state?format=parquet``)."""
        import polars as pl

        from sync.platforms.sandboxes._base import table  # with polars: only dumps need it

        notifications = list(self.notifications.values())
        exports = [e for n in notifications for e in n.exports.values()]
        return {
            "notifications": table(
                notifications,
                {"id": (pl.String, "id"), "name": (pl.String, "name"), "trashed": (pl.Boolean, "trashed")},
            ),
            "exports": table(
                exports,
                {
                    "notification_id": (pl.String, "notification_id"),
                    "id": (pl.Int64, "id"),
                    "status": (pl.String, lambda e: str(e.status)),
                    "polls": (pl.Int64, "polls"),
                    "total": (pl.Int64, "total"),
                    "sent": (pl.Int64, "sent"),
                },
            ),
        }
