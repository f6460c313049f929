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
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

import polars as pl
import pyarrow.parquet as pq

from sync.config import (
    Destination,
    NullAction,
    RemovalAction,
    SnapshotSettings,
    Source,
    SourceKind,
    TagAction,
    TagColumn,
)
from sync.errors import ExitCode, StateError
from sync.platforms.netmera import requests as netmera
from sync.reading import ROW
from sync.records import Batch, BatchStatus, Operation, Phase
from sync.validation import EXT_ID, FILE, KEY, clean_schema

__all__ = [
    "DELETE",
    "LEFT_FILE",
    "SEQ",
    "TAGS",
    "TAGS_ADDED",
    "TAGS_REMOVED",
    "UNSET",
    "DiffCounts",
    "FieldKind",
    "ManagedField",
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
    "managed_fields",
    "preview",
    "recover",
    "snapshot_problems",
    "snapshot_streams",
    "state_schema",
]

SEQ = "__seq"
"""Position of a delta row in the run's canonical order (maps a row to the batch that carried it)."""
TAGS = "tags"
TAGS_ADDED = "__tags_added"
TAGS_REMOVED = "__tags_removed"
UNSET = "__unset"
DELETE = "__delete"
LEFT_FILE = "<state: user no longer in the export>"
"""The origin named for a user that left the export (delta rows need an origin file)."""

ROWS_PER_RANGE = 150_000
"""Users (export or state, whichever is larger) per key range: the unit of work and memory of diff and commit."""
ROW_GROUP_ROWS = 32_768
"""Rows per Parquet row group of the state file: small, so a key range reads few rows it does not need."""
_KEY_SPACE = 1 << 32


class RemovalThresholdError(StateError):
    """More users would be removed than the job allows; nothing was sent. ``--force`` overrides."""


class FieldKind(StrEnum):
    """How a managed field is diffed and which operations confirm it."""

    SET = "set"
    APPEND = "push"
    REMOVE = "pull"
    FLAG = "flag"
    CATEGORY = "category"
    CONTACT = "contact"


@dataclass(frozen=True, slots=True)
class ManagedField:
    """One field of the state: its column there (``name``), the clean-frame column it comes from, its type, and
    the (operation, phase) pairs whose confirmation moves a new value (``on``) or a removal (``off``) into it."""

    name: str
    column: str
    kind: FieldKind
    dtype: Any
    on: tuple[Operation, Phase]
    off: tuple[Operation, Phase] | None = None
    attribute: str | None = None
    unset: bool = False


def _flag_name(op: Operation, phase: Phase) -> str:
    return f"ok:{op.value}:{int(phase)}"


_OK_DELETE = _flag_name(Operation.DELETE_USERS, Phase.DELETIONS)


def managed_fields(source: Source, settings: SnapshotSettings | None = None) -> list[ManagedField]:
    """The fields a users source manages, in a fixed order (tags are handled apart: see :data:`TAGS`)."""
    settings = settings or SnapshotSettings()
    types = clean_schema(source)
    changes = Phase.CHANGES
    fields: list[ManagedField] = []
    for a in source.attributes:
        dtype = types[a.column]
        if a.mode.value == "set":
            fields.append(
                ManagedField(
                    f"attr:{a.attribute}",
                    a.column,
                    FieldKind.SET,
                    dtype,
                    (Operation.SET_ATTRIBUTES, changes),
                    (Operation.UNSET_ATTRIBUTES, changes),
                    a.attribute,
                    a.on_null is NullAction.UNSET or settings.unset_on_empty,
                )
            )
        elif a.mode.value == "push":
            on = (Operation.PUSH_ATTRIBUTES, changes)
            fields.append(ManagedField(f"push:{a.attribute}", a.column, FieldKind.APPEND, dtype, on))
        else:
            on = (Operation.PULL_ATTRIBUTES, changes)
            fields.append(ManagedField(f"pull:{a.attribute}", a.column, FieldKind.REMOVE, dtype, on))
    opt = source.opt_ins
    for name, column, enable, disable in (
        ("push", opt.push, Operation.ENABLE_PUSH, Operation.DISABLE_PUSH),
        ("email", opt.email, Operation.ENABLE_EMAIL, Operation.DISABLE_EMAIL),
        ("sms", opt.sms, Operation.ENABLE_SMS, Operation.DISABLE_SMS),
    ):
        if column:
            fields.append(
                ManagedField(
                    f"optin:{name}",
                    column,
                    FieldKind.FLAG,
                    pl.Boolean,
                    (enable, changes),
                    (disable, Phase.OPT_OUT),
                )
            )
    for category, column in opt.categories.items():
        fields.append(
            ManagedField(
                f"category:{category}",
                column,
                FieldKind.CATEGORY,
                pl.Boolean,
                (Operation.SET_CATEGORIES, changes),
                (Operation.SET_CATEGORIES, Phase.OPT_OUT),
            )
        )
    if source.email:
        fields.append(
            ManagedField(
                "email", source.email, FieldKind.CONTACT, pl.String, (Operation.UPDATE_EMAIL, changes)
            )
        )
    if source.msisdn:
        fields.append(
            ManagedField(
                "msisdn", source.msisdn, FieldKind.CONTACT, pl.String, (Operation.UPDATE_MSISDN, changes)
            )
        )
    return fields


def _tag_columns(source: Source) -> list[str]:
    return [t.column for t in source.tags if t.action is TagAction.TAG]


def snapshot_problems(source: Source) -> list[str]:
    """Why a source cannot be synced in snapshot mode (empty when it can); the job loader reports these."""
    if source.kind is not SourceKind.USERS:
        return [
            f"a {source.kind.value!r} source lists changes, not the full state: use mode 'changes' for it "
            "(a separate job), or map it into the users export"
        ]
    if any(t.action is TagAction.UNTAG for t in source.tags):
        return [
            "untag tag columns have no meaning in snapshot mode: tags missing from the export are untagged"
        ]
    return []


def state_schema(source: Source, settings: SnapshotSettings | None = None) -> dict[str, Any]:
    """Columns and types of the source's state file."""
    schema: dict[str, Any] = {KEY: pl.UInt32, EXT_ID: pl.String}
    for f in managed_fields(source, settings):
        schema[f.name] = f.dtype
    if _tag_columns(source):
        schema[TAGS] = pl.List(pl.String)
    return schema


def _conform(frame: pl.DataFrame | None, schema: Mapping[str, Any]) -> pl.DataFrame:
    """A state frame with exactly ``schema``: unknown columns dropped (no longer managed), new ones null, types cast
    leniently (a value that cannot be cast reads as unknown, so it is sent again)."""
    if frame is None:
        return pl.DataFrame(schema=dict(schema))
    return frame.select(
        [
            pl.col(name).cast(dtype, strict=False)
            if name in frame.columns
            else pl.lit(None, dtype).alias(name)
            for name, dtype in schema.items()
        ]
    )


# --- counts -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiffCounts:
    """What a diff found (summed over ranges and sources)."""

    users_current: int = 0
    users_state: int = 0
    users_new: int = 0
    users_changed: int = 0
    users_left: int = 0
    users_removed: int = 0
    """Users that left the export and get the removal action (untag or delete)."""
    values_set: int = 0
    values_unset: int = 0
    values_appended: int = 0
    tags_added: int = 0
    tags_removed: int = 0
    opt_in_changes: int = 0
    contact_updates: int = 0

    def __add__(self, other: DiffCounts) -> DiffCounts:
        return DiffCounts(
            *(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(DiffCounts))
        )

    @property
    def users_unchanged(self) -> int:
        return self.users_current - self.users_changed

    def to_json(self) -> dict[str, int]:
        out = dataclasses.asdict(self)
        out["users_unchanged"] = self.users_unchanged
        return out


# --- the differ (pure, one key range) ---------------------------------------------------------------------------


def _empty_list() -> pl.Expr:
    return pl.lit([], pl.List(pl.String))


def _none_if_empty(expr: pl.Expr) -> pl.Expr:
    return pl.when(expr.list.len() > 0).then(expr)


def diff_frames(
    source: Source,
    current: pl.DataFrame,
    state: pl.DataFrame | None,
    settings: SnapshotSettings | None = None,
    *,
    full_refresh: bool = False,
    left_file: int = -1,
) -> tuple[pl.DataFrame, DiffCounts]:
    """Compare one key range of the export's clean frame with the same range of the confirmed state.

    ``current`` has ``__key, __ext_id, __file, __row`` and the source's mapped columns (typed, one row per user);
    ``state`` the :func:`state_schema` columns (None: no state yet). Returns the **delta** — one row per user with
    something to send, in canonical order: the source's columns holding only new or changed values (null where
    nothing changes), plus ``__unset`` (attribute names to unset), ``__tags_added``, ``__tags_removed`` and
    ``__delete``; users that left the export carry ``__file = left_file`` — and the counts.
    ``full_refresh`` ignores the state: every current value is sent, every empty unset-attribute is unset.
    """
    settings = settings or SnapshotSettings()
    fields = managed_fields(source, settings)
    schema = state_schema(source, settings)
    tag_cols = _tag_columns(source)
    st = _conform(None if full_refresh else state, schema)
    cur_cols = [pl.col(KEY), pl.col(EXT_ID), pl.col(FILE), pl.col(ROW)]
    cur_cols += [pl.col(f.column).alias(f"c:{f.name}") for f in fields]
    if tag_cols:
        # A set, compared with set operations only: sorting lists row by row is slow in polars.
        tags = pl.concat_list([pl.col(c).fill_null(_empty_list()) for c in tag_cols])
        cur_cols.append(tags.alias(f"c:{TAGS}"))
    cur = current.select(cur_cols)
    st = st.rename({n: f"s:{n}" for n in schema if n not in (KEY, EXT_ID)}).with_columns(
        pl.lit(True).alias("__known")
    )
    # One lazy query: polars fuses the join with the per-field expressions. Joined on the ID alone (the key is a
    # function of it): a one-column string join is cheaper; the key is coalesced from either side.
    lazy = (
        cur.lazy()
        .join(st.lazy().rename({KEY: "__skey"}), on=EXT_ID, how="full", coalesce=True)
        .with_columns(pl.coalesce(KEY, "__skey").alias(KEY))
    )
    present = pl.col(FILE).is_not_null()
    known = pl.col("__known").fill_null(False)

    out: dict[str, pl.Expr] = {}
    unset_names: list[pl.Expr] = []
    for f in fields:
        c, s = pl.col(f"c:{f.name}"), pl.col(f"s:{f.name}")
        if f.kind in (FieldKind.APPEND, FieldKind.REMOVE):
            new = c.list.set_difference(s.fill_null(_empty_list()))
            out[f.column] = pl.when(present & c.is_not_null()).then(_none_if_empty(new))
            continue
        out[f.column] = pl.when(present & c.is_not_null() & c.ne_missing(s)).then(c)
        if f.kind is FieldKind.SET and f.unset:
            held = s.is_not_null() | pl.lit(full_refresh)
            unset_names.append(pl.when(present & c.is_null() & held).then(pl.lit(f.attribute)))
    out[UNSET] = (
        _none_if_empty(pl.concat_list(unset_names).list.drop_nulls())
        if unset_names
        else pl.lit(None, pl.List(pl.String))
    )
    leaver = ~present
    if tag_cols:
        ct, stt = pl.col(f"c:{TAGS}"), pl.col(f"s:{TAGS}").fill_null(_empty_list())
        out[TAGS_ADDED] = pl.when(present).then(_none_if_empty(ct.list.set_difference(stt)))
        gone = _none_if_empty(stt.list.set_difference(ct))
        if settings.removal is RemovalAction.UNTAG:
            out[TAGS_REMOVED] = pl.when(present).then(gone).when(leaver).then(_none_if_empty(stt))
        else:
            out[TAGS_REMOVED] = pl.when(present).then(gone)
    else:
        out[TAGS_ADDED] = out[TAGS_REMOVED] = pl.lit(None, pl.List(pl.String))
    out[DELETE] = leaver if settings.removal is RemovalAction.DELETE and not full_refresh else pl.lit(False)
    changed_any = [pl.col(f"d:{n}").is_not_null() for n in out if n != DELETE] + [pl.col(f"d:{DELETE}")]
    j = (
        lazy.with_columns([e.alias(f"d:{n}") for n, e in out.items()])
        .with_columns(pl.any_horizontal(changed_any).alias("__changed"))
        .collect()
    )

    def total(expr: pl.Expr) -> pl.Expr:
        return expr.cast(pl.Int64).sum()

    def of_kind(*kinds: FieldKind) -> pl.Expr:
        cols = [pl.col(f"d:{f.column}").is_not_null() for f in fields if f.kind in kinds]
        return pl.sum_horizontal(cols) if cols else pl.lit(0)

    stats = j.select(
        total(present).alias("users_current"),
        total(known).alias("users_state"),
        total(present & ~known).alias("users_new"),
        total(present & pl.col("__changed")).alias("users_changed"),
        total(leaver).alias("users_left"),
        total(leaver & pl.col("__changed")).alias("users_removed"),
        total(of_kind(FieldKind.SET)).alias("values_set"),
        pl.col(f"d:{UNSET}").list.len().sum().alias("values_unset"),
        total(of_kind(FieldKind.APPEND, FieldKind.REMOVE)).alias("values_appended"),
        pl.col(f"d:{TAGS_ADDED}").list.len().sum().alias("tags_added"),
        pl.col(f"d:{TAGS_REMOVED}").list.len().sum().alias("tags_removed"),
        total(of_kind(FieldKind.FLAG, FieldKind.CATEGORY)).alias("opt_in_changes"),
        total(of_kind(FieldKind.CONTACT)).alias("contact_updates"),
    ).row(0, named=True)
    counts = DiffCounts(**{k: int(v or 0) for k, v in stats.items()})
    delta_types = {**clean_schema(source), **_DELTA_EXTRA}
    # Lists are sorted only here, on the changed rows: polars sorts lists row by row, slowly, and set operations
    # give an order that is not guaranteed. Sorted lists make request bodies (and batch IDs) reproducible.
    sets = {TAGS_ADDED, TAGS_REMOVED} | {
        f.column for f in fields if f.kind in (FieldKind.APPEND, FieldKind.REMOVE)
    }
    delta = (
        j.filter(pl.col("__changed"))
        .sort([KEY, EXT_ID])
        .select(
            pl.col(KEY),
            pl.col(EXT_ID),
            pl.col(FILE).fill_null(left_file).cast(pl.Int32),
            pl.col(ROW).fill_null(0).cast(pl.Int64),
            *[
                (pl.col(f"d:{n}").list.sort() if n in sets else pl.col(f"d:{n}"))
                .cast(delta_types[n])
                .alias(n)
                for n in out
            ],
        )
    )
    return delta, counts


_DELTA_EXTRA: dict[str, Any] = {
    UNSET: pl.List(pl.String),
    TAGS_ADDED: pl.List(pl.String),
    TAGS_REMOVED: pl.List(pl.String),
    DELETE: pl.Boolean,
}


def _conform_delta(source: Source, delta: pl.DataFrame) -> pl.DataFrame:
    """A pending delta read back for the job as it is now: a column the job maps since the delta was written
    reads as "no change" (the job's mapping may change between a crash and its recovery)."""
    wanted = {**clean_schema(source), **_DELTA_EXTRA}
    missing = [pl.lit(None, dtype).alias(name) for name, dtype in wanted.items() if name not in delta.columns]
    return delta.with_columns(missing) if missing else delta


# --- the merge of confirmed changes (pure, one key range) ----------------------------------------------------------


def apply_confirmed(
    source: Source,
    state: pl.DataFrame | None,
    delta: pl.DataFrame,
    confirmations: pl.DataFrame,
    settings: SnapshotSettings | None = None,
) -> pl.DataFrame:
    """The new state of one key range: ``state`` with the confirmed part of ``delta`` applied.

    ``confirmations`` has one row per confirmed item: ``__ext_id``, ``op`` (an :class:`Operation` value),
    ``phase`` (int) and ``group`` (the tag for tag/untag, else empty). A value moves into the state only when the
    operation that carries it is confirmed for that user; everything else keeps its old state. Idempotent.
    """
    settings = settings or SnapshotSettings()
    fields = managed_fields(source, settings)
    schema = state_schema(source, settings)
    st = _conform(state, schema)
    if delta.is_empty() or confirmations.is_empty():
        return st
    names = sorted(
        {_flag_name(*f.on) for f in fields} | {_flag_name(*f.off) for f in fields if f.off} | {_OK_DELETE}
    )
    op, group = pl.col("op"), pl.col("group")
    flag = pl.format("ok:{}:{}", op, pl.col("phase").cast(pl.String))
    conf = (
        confirmations.with_columns(flag.alias("__flag"))
        .group_by(EXT_ID)
        .agg(
            *[(pl.col("__flag") == n).any().alias(n) for n in names],
            group.filter(op == Operation.TAG.value).alias("__conf_added"),
            group.filter(op == Operation.UNTAG.value).alias("__conf_removed"),
        )
    )
    d = delta.rename({c: f"d:{c}" for c in delta.columns if c not in (KEY, EXT_ID)}).join(
        conf, on=EXT_ID, how="inner"
    )
    # Only the touched users are recomputed (list operations cost per row); the others are kept as they are.
    untouched_rows = st.join(d.select(KEY, EXT_ID), on=[KEY, EXT_ID], how="anti")
    j = st.join(d, on=[KEY, EXT_ID], how="right", coalesce=True)

    def ok(pair: tuple[Operation, Phase]) -> pl.Expr:
        return pl.col(_flag_name(*pair)).fill_null(False)

    new: list[pl.Expr] = []
    for f in fields:
        s, dv = pl.col(f.name), pl.col(f"d:{f.column}")
        if f.kind is FieldKind.SET:
            assert f.off is not None
            unset = pl.col(f"d:{UNSET}").list.contains(pl.lit(f.attribute)).fill_null(False)
            expr = (
                pl.when(ok(f.on) & dv.is_not_null())
                .then(dv)
                .when(ok(f.off) & unset)
                .then(pl.lit(None, f.dtype))
                .otherwise(s)
            )
        elif f.kind in (FieldKind.APPEND, FieldKind.REMOVE):
            union = pl.concat_list([s.fill_null(_empty_list()), dv]).list.unique().list.sort()
            expr = pl.when(ok(f.on) & dv.is_not_null()).then(union).otherwise(s)
        elif f.kind in (FieldKind.FLAG, FieldKind.CATEGORY):
            assert f.off is not None
            expr = (
                pl.when(ok(f.on) & (dv == True))  # noqa: E712 - a null means "no change", not False
                .then(True)
                .when(ok(f.off) & (dv == False))  # noqa: E712
                .then(False)
                .otherwise(s)
            )
        else:
            expr = pl.when(ok(f.on) & dv.is_not_null()).then(dv).otherwise(s)
        new.append(expr.cast(f.dtype).alias(f.name))
    if TAGS in schema:
        added = pl.col("__conf_added").fill_null(_empty_list())
        removed = pl.col("__conf_removed").fill_null(_empty_list())
        tags = pl.concat_list([pl.col(TAGS).fill_null(_empty_list()), added]).list.set_difference(removed)
        untouched = pl.col("__conf_added").is_null() & pl.col("__conf_removed").is_null()
        new.append(pl.when(untouched).then(pl.col(TAGS)).otherwise(tags.list.sort()).alias(TAGS))
    deleted = ok((Operation.DELETE_USERS, Phase.DELETIONS))
    touched = j.filter(~deleted).select(pl.col(KEY), pl.col(EXT_ID), *new).select(list(schema))
    return pl.concat([untouched_rows, touched]).sort([KEY, EXT_ID])


# --- batches from the delta ---------------------------------------------------------------------------------


def _delta_source(source: Source) -> Source:
    """The source as the planner's stream builders should see a delta frame: values present are sent, nothing is
    unset for being empty (unsets come from ``__unset``), tags added and removed are two tag columns."""
    return dataclasses.replace(
        source,
        attributes=tuple(dataclasses.replace(a, on_null=NullAction.SKIP) for a in source.attributes),
        tags=(TagColumn(TAGS_ADDED), TagColumn(TAGS_REMOVED, action=TagAction.UNTAG)),
    )


def _list_rows(frame: pl.DataFrame, column: str) -> pl.DataFrame:
    return frame.filter(pl.col(column).list.len() > 0).select(
        EXT_ID, FILE, ROW, pl.lit("").alias(netmera.GROUP), pl.col(column).alias(netmera.PAYLOAD)
    )


def _flag_rows(frame: pl.DataFrame, column: str) -> pl.DataFrame:
    return frame.filter(pl.col(column).fill_null(False)).select(
        EXT_ID, FILE, ROW, pl.lit("").alias(netmera.GROUP), pl.lit(None, pl.Null).alias(netmera.PAYLOAD)
    )


def snapshot_streams(source: Source) -> list[netmera.Stream]:
    """The request streams a source's delta frames make: the planner's streams plus unset and delete."""
    streams = netmera.streams_for(_delta_source(source))
    streams.append(
        netmera.Stream(
            Operation.UNSET_ATTRIBUTES,
            Phase.CHANGES,
            (UNSET,),
            lambda f: _list_rows(f, UNSET),
            lambda _g, rows: netmera.unset_attributes_body(rows),
        )
    )
    streams.append(
        netmera.Stream(
            Operation.DELETE_USERS,
            Phase.DELETIONS,
            (DELETE,),
            lambda f: _flag_rows(f, DELETE),
            lambda _g, rows: netmera.ext_ids_body([r[0] for r in rows]),
        )
    )
    return streams


# --- the store --------------------------------------------------------------------------------------------------


class StateStore:
    """The confirmed state of one job for one destination, and the pending deltas of its runs."""

    __slots__ = ("directory",)

    def __init__(self, workdir: Path, destination: Destination) -> None:
        digest = hashlib.sha256(destination.base_url.encode("utf-8")).hexdigest()[:10]
        # Per destination: a job pointed at a sandbox must never believe what it sent there is in production.
        self.directory: Path = Path(workdir) / "state" / f"{destination.platform}-{digest}"

    def path_for(self, source: Source | str) -> Path:
        name = source if isinstance(source, str) else source.name
        return self.directory / f"{name}.parquet"

    @property
    def pending_root(self) -> Path:
        return self.directory / "pending"

    def pending(self) -> list[Path]:
        """Pending run directories (deltas not yet committed), oldest first."""
        if not self.pending_root.is_dir():
            return []
        return sorted(p for p in self.pending_root.iterdir() if (p / "meta.json").is_file())

    def rows(self, source: Source | str) -> int:
        path = self.path_for(source)
        return pq.ParquetFile(path).metadata.num_rows if path.is_file() else 0

    def read(self, source: Source, settings: SnapshotSettings | None = None) -> pl.DataFrame:
        """The whole state of a source (for inspection and small jobs; runs read it by key range)."""
        path = self.path_for(source)
        return _conform(pl.read_parquet(path) if path.is_file() else None, state_schema(source, settings))

    def slice(
        self, source: Source, lo: int, hi: int, settings: SnapshotSettings | None = None
    ) -> pl.DataFrame:
        """The state rows with ``lo <= __key < hi``; row-group statistics skip the rest of the file."""
        path = self.path_for(source)
        schema = state_schema(source, settings)
        if not path.is_file():
            return _conform(None, schema)
        frame = pl.scan_parquet(path).filter((pl.col(KEY) >= lo) & (pl.col(KEY) < hi)).collect()
        return _conform(frame, schema)

    def write(
        self, source: Source, frames: Iterable[pl.DataFrame], settings: SnapshotSettings | None = None
    ) -> int:
        """Replace a source's state with ``frames`` (in canonical order), atomically. Returns the row count."""
        schema = state_schema(source, settings)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(source)
        tmp = path.with_suffix(".parquet.tmp")
        arrow_schema = pl.DataFrame(schema=schema).to_arrow().schema
        rows = 0
        with pq.ParquetWriter(tmp, arrow_schema, compression="zstd", use_dictionary=False) as writer:
            for frame in frames:
                if frame.height:
                    table = _conform(frame, schema).to_arrow().cast(arrow_schema)
                    writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
                    rows += frame.height
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return rows

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the job's state lock: two runs of one job at once would each believe the other's changes unsent."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "a+b") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise StateError(f"another run of this job holds {self.directory / '.lock'}") from exc
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --- the diff of a run ------------------------------------------------------------------------------------------


def _bits(rows: int) -> int:
    ranges = max(1, -(-rows // ROWS_PER_RANGE))
    return min(16, (ranges - 1).bit_length())


def _range(r: int, bits: int) -> tuple[int, int]:
    shift = 32 - bits
    return r << shift, (r + 1) << shift


def _by_range(
    frames: Iterable[pl.DataFrame], bits: int, empty: pl.DataFrame
) -> Iterator[tuple[int, pl.DataFrame]]:
    """Re-cut frames of disjoint, increasing key ranges (the planner's buckets) into this module's ranges."""
    it = iter(frames)
    buf = empty
    exhausted = False
    for r in range(1 << bits):
        _, hi = _range(r, bits)
        while not exhausted and (buf.is_empty() or buf[KEY].max() < hi):  # type: ignore[operator]
            nxt = next(it, None)
            if nxt is None:
                exhausted = True
            elif nxt.height:
                buf = (
                    pl.concat([buf, nxt.select(empty.columns)], how="vertical_relaxed")
                    if buf.height
                    else nxt.select(empty.columns)
                )
        yield r, buf.filter(pl.col(KEY) < hi)
        buf = buf.filter(pl.col(KEY) >= hi)


@dataclass(frozen=True, slots=True)
class SourceDelta:
    """The delta of one source: one Parquet part per key range with changes."""

    source: Source
    files: tuple[str, ...]
    """Input files, then :data:`LEFT_FILE`; ``__file`` of a delta row indexes this."""
    bits: int
    parts: Mapping[int, Path]
    counts: DiffCounts

    def frames(self) -> Iterator[pl.DataFrame]:
        for r in sorted(self.parts):
            yield pl.read_parquet(self.parts[r])


@dataclass(frozen=True, slots=True)
class SnapshotDiff:
    """The pending changes of one run. :meth:`batches` makes the requests; :func:`commit` merges what was
    confirmed. Lives in ``<state>/pending/<run_id>/`` until committed."""

    run_id: str
    directory: Path
    sources: tuple[SourceDelta, ...]
    settings: SnapshotSettings
    batch_size: Mapping[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> DiffCounts:
        total = DiffCounts()
        for s in self.sources:
            total = total + s.counts
        return total

    def _size(self, endpoint: str) -> int:
        return self.batch_size.get(endpoint) or self.batch_size.get("*") or netmera.MAX_IDS_PER_REQUEST

    def batches(self, *, record: bool = True) -> Iterator[Batch]:
        """Every batch of the delta, phase by phase; each is recorded in ``batches.jsonl`` before it is yielded
        (so a crash can never leave a sent batch that :func:`commit` cannot map back)."""
        log: IO[str] | None = (
            (self.directory / "batches.jsonl").open("a", encoding="utf-8") if record else None
        )
        try:
            for phase in Phase:
                for delta in self.sources:
                    for stream in snapshot_streams(delta.source):
                        if stream.phase is not phase:
                            continue
                        size = self._size(stream.endpoint)
                        for batch in netmera.stream_batches(stream, delta.frames(), size, delta.files):
                            if log is not None:
                                group = batch.body.get("tag", "") if isinstance(batch.body, dict) else ""
                                entry = {
                                    "s": delta.source.name,
                                    "b": batch.batch_id,
                                    "o": stream.operation.value,
                                    "p": int(stream.phase),
                                    "g": group,
                                    "f": batch.ext_ids[0],
                                    "l": batch.ext_ids[-1],
                                }
                                log.write(json.dumps(entry) + "\n")
                                log.flush()  # to the OS: survives kill -9 of this process
                            yield batch
        finally:
            if log is not None:
                log.close()

    def request_counts(self) -> dict[tuple[Phase, str, Operation], tuple[int, int]]:
        """``(requests, ids)`` per phase, endpoint and operation, without building bodies."""
        out: dict[tuple[Phase, str, Operation], tuple[int, int]] = {}
        for delta in self.sources:
            for stream in snapshot_streams(delta.source):
                requests, ids = netmera.stream_counts(stream, delta.frames(), self._size(stream.endpoint))
                if requests:
                    key = (stream.phase, stream.endpoint, stream.operation)
                    old = out.get(key, (0, 0))
                    out[key] = (old[0] + requests, old[1] + ids)
        return out

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def compute_diff(
    store: StateStore,
    staged: Sequence[Any],
    run_id: str,
    settings: SnapshotSettings | None = None,
    *,
    full_refresh: bool = False,
    force: bool = False,
    batch_size: Mapping[str, int] | None = None,
) -> SnapshotDiff:
    """Diff every staged users source (``Plan.staged``: objects with ``source``, ``files``, ``rows_clean`` and
    ``frames(columns)``) against the confirmed state and write the delta under ``pending/<run_id>/``.

    Raises :class:`RemovalThresholdError` (and keeps nothing) when a source would remove more than
    ``max_removal_share`` of its state's users and ``force`` is not given.
    """
    settings = settings or SnapshotSettings()
    directory = store.pending_root / run_id
    directory.mkdir(parents=True, exist_ok=False)
    meta: dict[str, Any] = {"run_id": run_id, "full_refresh": full_refresh, "sources": {}}
    deltas: list[SourceDelta] = []
    try:
        for st in staged:
            source: Source = st.source
            problems = snapshot_problems(source)
            if problems:
                raise StateError(f"source {source.name!r}: {problems[0]}")
            bits = _bits(max(int(st.rows_clean), store.rows(source)))
            files = (*st.files, LEFT_FILE)
            columns = list(dict.fromkeys(f.column for f in managed_fields(source, settings)))
            columns += [c for c in _tag_columns(source) if c not in columns]
            types = clean_schema(source)
            empty = pl.DataFrame(
                schema={KEY: pl.UInt32, EXT_ID: pl.String, FILE: pl.Int32, ROW: pl.Int64}
                | {c: types[c] for c in columns}
            )
            part_dir = directory / source.name
            part_dir.mkdir()
            parts: dict[int, Path] = {}
            counts = DiffCounts()
            seq = 0
            for r, current in _by_range(st.frames([KEY, *columns]), bits, empty):
                lo, hi = _range(r, bits)
                state = store.slice(source, lo, hi, settings)
                delta, c = diff_frames(
                    source, current, state, settings, full_refresh=full_refresh, left_file=len(st.files)
                )
                counts = counts + c
                if delta.height:
                    delta = delta.with_columns(
                        pl.int_range(seq, seq + delta.height, dtype=pl.Int64).alias(SEQ)
                    )
                    seq += delta.height
                    parts[r] = part_dir / f"{r:05d}.parquet"
                    delta.write_parquet(parts[r], compression="zstd")
            if (
                not force
                and counts.users_removed
                and counts.users_removed > settings.max_removal_share * max(counts.users_state, 1)
            ):
                raise RemovalThresholdError(
                    f"source {source.name!r}: {counts.users_removed} of {counts.users_state} users in the state "
                    f"({counts.users_removed / max(counts.users_state, 1):.1%}) left the export and would be "
                    f"{'deleted' if settings.removal is RemovalAction.DELETE else 'untagged'}; the job allows "
                    f"{settings.max_removal_share:.1%}. Nothing was sent. Check the export, or run with --force."
                )
            meta["sources"][source.name] = {
                "bits": bits,
                "files": list(files),
                "parts": {str(r): p.name for r, p in parts.items()},
            }
            deltas.append(SourceDelta(source, files, bits, parts, counts))
        (directory / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return SnapshotDiff(run_id, directory, tuple(deltas), settings, dict(batch_size or {}))


# --- commit: from the ledger's confirmed batches to the state --------------------------------------------------------


_MAP_SCHEMA: dict[str, Any] = {
    "s": pl.String,
    "b": pl.String,
    "o": pl.String,
    "p": pl.Int64,
    "g": pl.String,
    "f": pl.String,
    "l": pl.String,
}


def _batch_map(directory: Path) -> pl.DataFrame:
    """The run's batch map, read columnar (a first full load may have made hundreds of thousands of batches)."""
    path = directory / "batches.jsonl"
    data = path.read_bytes() if path.is_file() else b""
    # A line cut short by a crash never reached the dispatcher: drop it.
    data = data[: data.rfind(b"\n") + 1]
    if not data:
        return pl.DataFrame(schema=_MAP_SCHEMA)
    return pl.read_ndjson(io.BytesIO(data), schema=_MAP_SCHEMA)


def _with_seqs(batches: pl.DataFrame, parts: Iterable[pl.DataFrame]) -> pl.DataFrame:
    """Add the delta positions of each batch's first and last external ID."""
    firsts, lasts = [], []
    for part in parts:
        ids = part.select(EXT_ID, SEQ)
        firsts.append(
            batches.select("b", "f")
            .join(ids, left_on="f", right_on=EXT_ID)
            .select("b", pl.col(SEQ).alias("first"))
        )
        lasts.append(
            batches.select("b", "l")
            .join(ids, left_on="l", right_on=EXT_ID)
            .select("b", pl.col(SEQ).alias("last"))
        )
    schema = {"b": pl.String, "first": pl.Int64}
    first = pl.concat(firsts) if firsts else pl.DataFrame(schema=schema)
    last = pl.concat(lasts) if lasts else pl.DataFrame(schema={"b": pl.String, "last": pl.Int64})
    return batches.join(first, on="b", how="inner").join(last, on="b", how="inner")


def _confirmations(
    source: Source, delta: pl.DataFrame, batches: pl.DataFrame, refused: pl.DataFrame
) -> pl.DataFrame:
    """One row per (user, operation, phase, group) of ``delta`` whose batch the platform confirmed.

    ``batches``: the run's batch map with ``first``/``last`` positions and the ledger ``status``; a batch's
    stream and group plus the positions of its first and last ID identify exactly the delta rows it carried.
    """
    out = []
    seqs = delta.select(EXT_ID, SEQ)
    for stream in snapshot_streams(source):
        selected = stream.select(delta)
        if selected.is_empty():
            continue
        rows = (
            selected.select(EXT_ID, pl.col(netmera.GROUP).alias("group"))
            .join(seqs, on=EXT_ID, how="left")
            .sort(SEQ)
        )
        carried = (
            batches.filter((pl.col("o") == stream.operation.value) & (pl.col("p") == int(stream.phase)))
            .select(pl.col("g").alias("group"), "first", "last", "b", "status")
            .sort("first")
        )
        if carried.is_empty():
            continue
        hit = rows.join_asof(
            carried, left_on=SEQ, right_on="first", by="group", strategy="backward", check_sortedness=False
        ).filter(pl.col("b").is_not_null() & (pl.col(SEQ) <= pl.col("last")))
        hit = hit.filter(pl.col("status").is_in([BatchStatus.OK.value, BatchStatus.REJECTED.value]))
        hit = hit.join(refused, left_on=["b", EXT_ID], right_on=["batch_id", "ext_id"], how="anti")
        out.append(
            hit.select(
                EXT_ID,
                pl.lit(stream.operation.value).alias("op"),
                pl.lit(int(stream.phase), pl.Int64).alias("phase"),
                "group",
            )
        )
    schema = {EXT_ID: pl.String, "op": pl.String, "phase": pl.Int64, "group": pl.String}
    return pl.concat(out) if out else pl.DataFrame(schema=schema)


@dataclass(frozen=True, slots=True)
class CommitReport:
    """What one commit merged: per source, users whose state changed and the new row count."""

    run_id: str
    batches_confirmed: int
    batches_unconfirmed: int
    users_updated: Mapping[str, int]
    rows: Mapping[str, int]


def commit(
    store: StateStore,
    sources: Sequence[Source],
    directory: Path,
    ledger: Any,
    settings: SnapshotSettings | None = None,
) -> CommitReport:
    """Merge the confirmed batches of the pending run in ``directory`` into the state, then remove the directory.

    ``ledger`` is a :class:`sync.ledger.Ledger` (``batches(run_id)``, ``refused_ids(run_id)``).
    """
    settings = settings or SnapshotSettings()
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    run_id = meta["run_id"]
    ledger.flush()  # results still queued in this process count too
    recorded = ledger.batches(run_id)
    statuses = pl.DataFrame(
        {"b": [r.batch_id for r in recorded], "status": [str(r.status) for r in recorded]},
        schema={"b": pl.String, "status": pl.String},
    ).unique("b")
    all_batches = _batch_map(directory)
    refused_rows = ledger.refused_ids(run_id)
    refused = pl.DataFrame(
        {"batch_id": [r[0] for r in refused_rows], "ext_id": [r[1] for r in refused_rows]},
        schema={"batch_id": pl.String, "ext_id": pl.String},
    )
    by_name = {s.name: s for s in sources}
    confirmed_total = unconfirmed_total = 0
    updated: dict[str, int] = {}
    rows: dict[str, int] = {}
    for name, info in meta["sources"].items():
        source = by_name.get(name)
        if source is None:
            continue  # the source left the job: its state is no longer managed
        bits = int(info["bits"])
        parts = {int(r): directory / name / p for r, p in info["parts"].items()}
        batches = (
            all_batches.filter(pl.col("s") == name)
            .join(statuses, on="b", how="left")
            .with_columns(pl.col("status").fill_null(BatchStatus.PLANNED.value))
        )
        good = batches.filter(pl.col("status").is_in([BatchStatus.OK.value, BatchStatus.REJECTED.value]))
        confirmed_total += good.height
        unconfirmed_total += batches.height - good.height
        if good.is_empty():
            rows[name] = store.rows(source)
            updated[name] = 0
            continue
        batches = _with_seqs(good, (pl.read_parquet(p, columns=[EXT_ID, SEQ]) for p in parts.values()))
        counter = [0]
        ranges = _merged_ranges(store, source, bits, parts, batches, refused, settings, counter)
        rows[name] = store.write(source, ranges, settings)
        updated[name] = counter[0]
    shutil.rmtree(directory, ignore_errors=True)
    return CommitReport(run_id, confirmed_total, unconfirmed_total, updated, rows)


def _merged_ranges(
    store: StateStore,
    source: Source,
    bits: int,
    parts: Mapping[int, Path],
    batches: pl.DataFrame,
    refused: pl.DataFrame,
    settings: SnapshotSettings,
    counter: list[int],
) -> Iterator[pl.DataFrame]:
    """The new state, key range by key range (ranges without delta are copied); counts users touched."""
    for r in range(1 << bits):
        lo, hi = _range(r, bits)
        state = store.slice(source, lo, hi, settings)
        if r not in parts:
            yield state
            continue
        delta = _conform_delta(source, pl.read_parquet(parts[r]))
        conf = _confirmations(source, delta, batches, refused)
        counter[0] += conf.select(pl.col(EXT_ID).n_unique()).item()
        yield apply_confirmed(source, state, delta, conf, settings)


def recover(
    store: StateStore, sources: Sequence[Source], ledger: Any, settings: SnapshotSettings | None = None
) -> list[CommitReport]:
    """Commit every pending run left by a crash (oldest first): what the ledger confirmed enters the state.

    A recovered run still marked ``running`` in the ledger died: it is marked ``interrupted`` (exit code 4), so
    ``pushsync runs`` does not show it as running forever.
    """
    reports = []
    for directory in store.pending():
        report = commit(store, sources, directory, ledger, settings)
        info = ledger.run(report.run_id)
        if info is not None and info.status == "running":
            ledger.finish_run(
                report.run_id,
                status="interrupted",
                exit_code=int(ExitCode.INTERRUPTED),
                message=f"the run died; {report.batches_confirmed} confirmed batches were merged into the state "
                "and the rest is sent by the next run",
            )
        reports.append(report)
    return reports


def preview(
    store: StateStore,
    plan: Any,
    settings: SnapshotSettings | None = None,
    *,
    full_refresh: bool = False,
    assumed_latency: float | None = None,
) -> tuple[DiffCounts, Any]:
    """What a snapshot run of ``plan`` (a :class:`sync.planning.Plan`) would send, for ``pushsync plan``:
    the diff counts and a :class:`sync.planning.PlanSummary` of the delta's requests. Writes nothing lasting
    (the delta goes to a temporary pending directory, removed before returning); never refuses on the removal
    threshold (the counts show it)."""
    import secrets

    from sync.planning import ASSUMED_LATENCY, EndpointSummary, PlanSummary, estimate_duration

    latency = ASSUMED_LATENCY if assumed_latency is None else assumed_latency
    job = plan.job
    diff = compute_diff(
        store,
        plan.staged,
        f"plan-{secrets.token_hex(4)}",
        settings,
        full_refresh=full_refresh,
        force=True,
        batch_size=job.batch_sizes,
    )
    try:
        counts = diff.request_counts()
        samples: dict[str, Any] = {}
        for delta in diff.sources:
            for stream in snapshot_streams(delta.source):
                if stream.endpoint not in samples:
                    sample = netmera.stream_sample(stream, delta.frames())
                    if sample is not None:
                        samples[stream.endpoint] = sample
        durations = estimate_duration({k: v[0] for k, v in counts.items()}, job.dispatch, latency=latency)
        summary = PlanSummary(
            job=job.name,
            platform=job.destination.platform,
            base_url=job.destination.base_url,
            endpoints=tuple(
                EndpointSummary(ph, ep, op, n, ids, durations.get((ph, ep, op), 0.0))
                for (ph, ep, op), (n, ids) in counts.items()
            ),
            rows_read=sum(s.rows_read for s in plan.staged),
            rows_clean=sum(s.rows_clean for s in plan.staged),
            rejected_count=plan.rejected_count,
            rejects_path=str(plan.rejects_path),
            duplicates_dropped=sum(s.duplicates_dropped for s in plan.staged),
            estimated_seconds=durations.get(None, 0.0),
            samples=samples,
            sources={
                s.source.name: {"files": len(s.files), "rows_read": s.rows_read, "rows_clean": s.rows_clean}
                for s in plan.staged
            },
        )
        return diff.counts, summary
    finally:
        diff.discard()
