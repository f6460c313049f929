"""The job as loaded: its sources and how their columns map to operations, validation rules, sync mode."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from sync.config._settings import Destination, DispatchSettings
from sync.config._sql import SqlInput

DEFAULT_NULL_VALUES: tuple[str, ...] = ("", "NULL", "null", "NaN", "N/A", "\\N")
"""Values read as "no value" unless a source names its own ``null_values``."""


class SourceKind(StrEnum):
    """What the rows of a source describe."""

    USERS = "users"
    """One row per user: attributes, tags, opt-ins, email/MSISDN updates (last row of an ID wins)."""
    TAGS = "tags"
    """A long table ``ext_id, tag[, action]``: one row per (user, tag) change."""
    EVENTS = "events"
    """One row per event: ``ext_id, event name, attributes...``; every row is sent."""
    DELETIONS = "deletions"
    """One row per user to delete permanently."""


class FileFormat(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"


class ValueType(StrEnum):
    """Types a mapped column can hold; see docs/jobs.md for the accepted spellings."""

    STRING = "string"
    NUMBER = "number"
    BOOLEAN = "boolean"
    DATE = "date"
    LIST = "list"


class AttributeMode(StrEnum):
    """How an attribute column reaches the profile."""

    SET = "set"
    """``setProfileAttributes``: overwrite the attribute."""
    PUSH = "push"
    """``pushProfileAttributes``: append the list's values to an array attribute."""
    PULL = "pull"
    """``pullProfileAttributes``: remove the list's values from an array attribute."""


class NullAction(StrEnum):
    """What an empty cell of a ``set`` attribute means."""

    SKIP = "skip"
    """Leave the attribute as it is on the platform."""
    UNSET = "unset"
    """Remove the attribute (``unsetProfileAttributes``)."""


class TagAction(StrEnum):
    TAG = "tag"
    UNTAG = "untag"


@dataclass(frozen=True, slots=True)
class AttributeMapping:
    """One column mapped to a profile attribute (users sources) or an event attribute (events sources)."""

    column: str
    attribute: str
    type: ValueType = ValueType.STRING
    mode: AttributeMode = AttributeMode.SET
    on_null: NullAction = NullAction.SKIP
    delimiter: str = "|"
    """List values: the separator inside a cell (a cell starting with ``[`` is read as a JSON array instead)."""


@dataclass(frozen=True, slots=True)
class TagColumn:
    """A column holding a list of tags to add (``tag``) or remove (``untag``) for the row's user."""

    column: str
    delimiter: str = "|"
    action: TagAction = TagAction.TAG


@dataclass(frozen=True, slots=True)
class OptIns:
    """Boolean columns: true enables, false disables, empty leaves the setting alone."""

    push: str | None = None
    email: str | None = None
    sms: str | None = None
    categories: Mapping[str, str] = field(default_factory=dict)
    """Category name (as defined in the Netmera panel) → column."""

    def columns(self) -> tuple[str, ...]:
        named = [c for c in (self.push, self.email, self.sms) if c]
        return (*named, *self.categories.values())


@dataclass(frozen=True, slots=True)
class Source:
    """One input: where its files (or its database query) are, how to read them and how its columns map to
    operations."""

    name: str
    kind: SourceKind
    paths: tuple[str, ...]
    """Absolute paths or glob patterns (resolved against the job file's directory); globs expand at read time."""
    format: FileFormat
    ext_id: str
    delimiter: str = ","
    encoding: str = "utf-8"
    null_values: tuple[str, ...] = DEFAULT_NULL_VALUES
    attributes: tuple[AttributeMapping, ...] = ()
    tags: tuple[TagColumn, ...] = ()
    opt_ins: OptIns = field(default_factory=OptIns)
    email: str | None = None
    """users: column whose value is sent with ``updateEmail``."""
    msisdn: str | None = None
    """users: column whose value is sent with ``updateMsisdn``."""
    tag: str | None = None
    """tags: column holding the tag name."""
    action: str | None = None
    """tags: optional column saying tag/untag (also add/remove, +/-, true/false, 1/0); empty means tag."""
    event: str | None = None
    """events: column holding the event name."""
    sql: SqlInput | None = None
    """A database source: the query or table it reads (then ``paths`` is empty). See :mod:`sync.sources.reading_sql`."""

    def columns(self) -> tuple[str, ...]:
        """Every column the mapping reads, ext_id first, without duplicates (only these are read)."""
        cols = [self.ext_id, *(a.column for a in self.attributes), *(t.column for t in self.tags)]
        cols += [
            *self.opt_ins.columns(),
            *(c for c in (self.email, self.msisdn, self.tag, self.action, self.event) if c),
        ]
        return tuple(dict.fromkeys(cols))


@dataclass(frozen=True, slots=True)
class ValidationRules:
    """Input validation settings shared by every source."""

    max_id_length: int = 256
    timezone: str = "UTC"
    """Zone for dates and date-times without an offset; Netmera stores dates as epoch milliseconds."""
    trim: bool = True


class SyncMode(StrEnum):
    """How a job's input is read: as changes to send as given, or as the full current state (docs/sync.md)."""

    CHANGES = "changes"
    SNAPSHOT = "snapshot"


class RemovalAction(StrEnum):
    """Snapshot mode: what happens to users in the confirmed state that are no longer in the export."""

    NONE = "none"
    """Nothing: the platform keeps them as they are (and so does the state)."""
    UNTAG = "untag"
    """Untag the job's managed tags they hold (``untagUsers``)."""
    DELETE = "delete"
    """Delete them permanently (``deleteUsersPermanently``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotSettings:
    """The job's ``snapshot:`` options (used in snapshot mode)."""

    removal: RemovalAction = RemovalAction.NONE
    max_removal_share: float = 0.05
    """Refuse the run when more than this share of a source's state users (not counting those removed by earlier
    runs) would be untagged or deleted."""
    unset_on_empty: bool = False
    """Every ``set`` attribute whose cell became empty is unset (an attribute's own ``on_null: unset`` also)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Alerts:
    """The job's ``alerts:``: where the webhook URL lives (never the URL) and when to post (docs/operations.md)."""

    webhook_env: str | None = None
    webhook_file: str | None = None
    on_partial: bool = False
    """Also alert on exit 1; exit 2 and above always alert."""
    max_rejected_share: float | None = None
    """Alert when rejected rows plus refused IDs exceed this share of rows read plus IDs sent."""
    slower_than_usual: float = 2.0
    """Alert when the run took more than this many times the median of the job's last successful runs."""
    timeout: float = 5.0
    """Seconds a post may take."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Coordination:
    """The job's ``coordination:``: where the PostgreSQL URL lives (never the URL) and the workers' lease
    (docs/scaling.md). ``PUSHSYNC_DATABASE_URL`` / ``--database-url`` take effect without it."""

    database_env: str | None = None
    database_file: str | None = None
    lease: float = 30.0
    """Seconds after its last heartbeat that a worker counts as dead and its batches are taken over."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """The job's ``thresholds:``: how many rejected rows and refused IDs a run may have and still exit 0.

    None: not set. With none set (the default) any rejected row or refused ID makes the run partial (exit 1).
    Failed or unfinished batches are never within a threshold."""

    max_rejected_rows: int | None = None
    max_rejected_share: float | None = None
    """Of the rows read."""
    max_refused_ids: int | None = None
    max_refused_share: float | None = None
    """Of the IDs sent (ok + refused)."""

    @property
    def any(self) -> bool:
        """Whether any threshold is set."""
        return any(
            v is not None
            for v in (
                self.max_rejected_rows,
                self.max_rejected_share,
                self.max_refused_ids,
                self.max_refused_share,
            )
        )


@dataclass(frozen=True, slots=True)
class Job:
    """A loaded, validated job file. Build it with :func:`load_job`."""

    name: str
    path: Path
    destination: Destination
    dispatch: DispatchSettings
    workdir: Path
    sources: tuple[Source, ...]
    validation: ValidationRules = field(default_factory=ValidationRules)
    batch_sizes: Mapping[str, int] = field(default_factory=dict)
    """Unique IDs per request, per endpoint; ``"*"`` for endpoints not named (platform default applied)."""
    mode: SyncMode = SyncMode.CHANGES
    snapshot: SnapshotSettings = field(default_factory=SnapshotSettings)
    thresholds: Thresholds = field(default_factory=Thresholds)
    alerts: Alerts | None = None
    coordination: Coordination | None = None

    def batch_size_for(self, endpoint: str) -> int:
        return self.batch_sizes.get(endpoint) or self.batch_sizes.get("*") or 1000
