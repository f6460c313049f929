"""Snapshot sync: the confirmed state per job and destination, the differ, and the merge of confirmed batches.

A *snapshot* job reads the full current export every night; it must send only what changed. For each ``users``
source the worker keeps the **confirmed state** — what the platform is known to hold for each user and each
*managed field* (the attributes, tags, opt-ins, categories, e-mail and MSISDN the source maps) — in one Parquet
file, ``<workdir>/state/<platform>-<destination hash>/<source>.parquet``, one row per user sorted in the canonical
order ``(crc32(ext_id), ext_id)``, one typed column per field (tags as a sorted list).

A run goes:

1. :func:`compute_diff` joins the planner's clean frames with the state, one key range at a time (a range holds
   about :data:`ROWS_PER_RANGE` users, so memory does not grow with the export), and writes the **delta** —
   only the changed values, per user — to ``pending/<run_id>/`` *before anything is sent*. Users that left the
   export get the job's removal action (nothing, untag the managed tags, delete) behind a safety threshold.
2. :meth:`SnapshotDiff.batches` turns the delta into Netmera batches with the planner's own batch builders
   (same bodies, same content-derived batch IDs) and appends one line per batch to ``pending/<run_id>/batches
   .jsonl`` — its stream, group (tag) and first/last external ID — before the batch is handed to the dispatcher.
3. :func:`commit` maps the ledger's confirmed batches back to per-user fields — each delta row of a stream lies
   between the first and last ID of exactly one batch of that stream and group — and rewrites the state file
   (temp file + ``os.replace``). Only confirmed values move into the state: an ID whose batch failed or was
   refused keeps its old state, so the next run sends it again without anyone asking. A crashed run's pending
   directory is committed by :func:`recover` at the start of the next run (or ``pushsync resume``), so nothing
   confirmed is sent twice and nothing unconfirmed is lost. Committing twice is harmless: every merge rule is
   idempotent.

The names below are the package's public face, imported on first use; code inside sync/ on a run's way to its
first request imports the modules themselves.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sync.config import RemovalAction, SnapshotSettings
    from sync.state._commit import CommitReport, apply_confirmed, commit, recover
    from sync.state._delta import (
        RejectedUsers,
        RemovalThresholdError,
        SnapshotDiff,
        SourceDelta,
        compute_diff,
        rejected_users,
        snapshot_builder_for,
        snapshot_streams,
    )
    from sync.state._diff import DiffCounts, diff_frames
    from sync.state._lock import job_lock_held
    from sync.state._preview import preview
    from sync.state._store import (
        DELETE,
        LEFT_FILE,
        ROW_GROUP_ROWS,
        ROWS_PER_RANGE,
        SEQ,
        TAGS,
        TAGS_ADDED,
        TAGS_REMOVED,
        UNSET,
        FieldKind,
        ManagedField,
        StateStore,
        managed_fields,
        snapshot_problems,
        state_schema,
    )

_HOME = {
    "CommitReport": "sync.state._commit",
    "DELETE": "sync.state._store",
    "DiffCounts": "sync.state._diff",
    "FieldKind": "sync.state._store",
    "LEFT_FILE": "sync.state._store",
    "ManagedField": "sync.state._store",
    "ROWS_PER_RANGE": "sync.state._store",
    "ROW_GROUP_ROWS": "sync.state._store",
    "RejectedUsers": "sync.state._delta",
    "RemovalAction": "sync.config",
    "RemovalThresholdError": "sync.state._delta",
    "SEQ": "sync.state._store",
    "SnapshotDiff": "sync.state._delta",
    "SnapshotSettings": "sync.config",
    "SourceDelta": "sync.state._delta",
    "StateStore": "sync.state._store",
    "TAGS": "sync.state._store",
    "TAGS_ADDED": "sync.state._store",
    "TAGS_REMOVED": "sync.state._store",
    "UNSET": "sync.state._store",
    "apply_confirmed": "sync.state._commit",
    "commit": "sync.state._commit",
    "compute_diff": "sync.state._delta",
    "diff_frames": "sync.state._diff",
    "job_lock_held": "sync.state._lock",
    "managed_fields": "sync.state._store",
    "preview": "sync.state._preview",
    "recover": "sync.state._commit",
    "rejected_users": "sync.state._delta",
    "snapshot_builder_for": "sync.state._delta",
    "snapshot_problems": "sync.state._store",
    "snapshot_streams": "sync.state._delta",
    "state_schema": "sync.state._store",
}

__all__ = [
    "DELETE",
    "LEFT_FILE",
    "ROWS_PER_RANGE",
    "ROW_GROUP_ROWS",
    "SEQ",
    "TAGS",
    "TAGS_ADDED",
    "TAGS_REMOVED",
    "UNSET",
    "CommitReport",
    "DiffCounts",
    "FieldKind",
    "ManagedField",
    "RejectedUsers",
    "RemovalAction",
    "RemovalThresholdError",
    "SnapshotDiff",
    "SnapshotSettings",
    "SourceDelta",
    "StateStore",
    "apply_confirmed",
    "commit",
    "compute_diff",
    "diff_frames",
    "job_lock_held",
    "managed_fields",
    "preview",
    "recover",
    "rejected_users",
    "snapshot_builder_for",
    "snapshot_problems",
    "snapshot_streams",
    "state_schema",
]


def __getattr__(name: str) -> object:
    """A face name, imported from its module when first asked for: a changes run takes only the state store's
    lock (``sync.state._store``), not the differ and the commit (issue 13: start-up)."""
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
