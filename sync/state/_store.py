"""The confirmed state: what it holds for a users source (the managed fields, the schema, the key ranges) and
where (:class:`StateStore`: a Parquet base per source plus small overlay segments, atomic writes, the job's
lock). Where the bytes live is a :class:`StateBackend`: the job's workdir (:class:`FileBackend`, the default) or
PostgreSQL for workers on several machines (:class:`sync.coordination.snapshot.PgStateBackend`).

A commit changes about as many users as the run sent (1 % of a nightly export); rewriting a 10M-row base for
that would cost more than the diff. So a commit appends the new rows of the users it changed — whole rows, and a
tombstone for a deleted user — as one *segment* (``<source>.segments/<n>.parquet``, listed in
``<source>.manifest.json``), and readers lay the segments over the base, the latest segment winning per user.
When the segments hold more than :data:`COMPACT_SHARE` of the base's rows (or :data:`MAX_SEGMENTS` files), the
commit folds them into a new base, range by range. Every step is atomic (temporary file, fsync, rename) and
laying a segment over a base that already holds it changes nothing, so a crash between any two steps is
harmless.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from sync.config import Destination, NullAction, SnapshotSettings, Source, SourceKind, TagAction
from sync.errors import StateError
from sync.planning.validation import EXT_ID, KEY, clean_schema
from sync.platforms.base import DELTA_DELETE, DELTA_TAGS_ADDED, DELTA_TAGS_REMOVED, DELTA_UNSET
from sync.records import Operation, Phase

SEQ = "__seq"
"""Position of a delta row in the run's canonical order (maps a row to the batch that carried it)."""
TAGS = "tags"
# The delta's own columns are the platform seam's (a snapshot builder's streams read them).
TAGS_ADDED = DELTA_TAGS_ADDED
TAGS_REMOVED = DELTA_TAGS_REMOVED
UNSET = DELTA_UNSET
DELETE = DELTA_DELETE
LEFT_FILE = "<state: user no longer in the export>"
"""The origin named for a user that left the export (delta rows need an origin file)."""

ROWS_PER_RANGE = 250_000
"""Users (export or state, whichever is larger) per key range: the unit of work and memory of diff and commit."""
ROW_GROUP_ROWS = 32_768
"""Rows per Parquet row group of the state file: small, so a key range reads few rows it does not need."""
DELETED = "__deleted"
"""In an overlay segment: the user was deleted (a tombstone; the row's other values mean nothing)."""
UNCERTAIN = "__uncertain"
"""The platform may hold something else than the row says: a request for the user went out and its outcome is
unknown (a 500 after every retry, no answer, a run killed with it in flight). The row holds what was sent (but a
tag removal, or a deletion, which it keeps as before); the next diff sends the export's every value for the user,
equal or not, and the removals of what the row holds and the export does not (:mod:`sync.state._diff`), until a
run confirms them."""
COMPACT_SHARE = 0.10
"""Overlay rows (summed over segments) above this share of the base's rows make the commit fold them into the
base: the diff reads at most this much more than the state, and a full rewrite comes once every
``COMPACT_SHARE / churn`` runs (every ten runs at 1 % churn)."""
MAX_SEGMENTS = 32
"""More overlay segments than this are folded into the base too (many tiny runs)."""


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


def flag_name(op: Operation, phase: Phase) -> str:
    """The column that says an (operation, phase) was confirmed for a user, in the merge."""
    return f"ok:{op.value}:{int(phase)}"


OK_DELETE = flag_name(Operation.DELETE_USERS, Phase.DELETIONS)


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


def tag_columns(source: Source) -> list[str]:
    """The source's tag columns (their union is the user's managed tags)."""
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
    if tag_columns(source):
        schema[TAGS] = pl.List(pl.String)
    schema[UNCERTAIN] = pl.Boolean  # null (a state written before it existed) is False
    return schema


_OWN_COLUMNS = frozenset({KEY, EXT_ID, TAGS, UNCERTAIN, DELETED})
"""State columns that are not a job's field: their type never follows the job's mapping."""


def _column(name: str, stored: Any, wanted: Any) -> pl.Expr:
    """State column ``name`` as ``wanted``: null (unknown) when it was stored with another type.

    The job changed the field's type: what the state holds is a value of the old type, which the platform still
    holds too, so it is not the new value even when it reads as one (the string "007" is not the number 7; casting
    made them equal and nothing was sent), and a string cannot even be cast to a boolean (every run failed with
    an internal error). Unknown, every value is sent again in the new type."""
    if stored is None:
        return pl.lit(None, wanted).alias(name)
    if stored == wanted or stored == pl.Null or name in _OWN_COLUMNS:
        # pushsync's own columns are cast as before: a key or an ID read as null would lose the user.
        return pl.col(name).cast(wanted, strict=False)
    return pl.lit(None, wanted).alias(name)


def conform(frame: pl.DataFrame | None, schema: Mapping[str, Any]) -> pl.DataFrame:
    """A state frame with exactly ``schema``: unknown columns dropped (no longer managed), new ones null, and a
    column stored with another type than ``schema``'s null (a type changed in the job: sent again)."""
    if frame is None:
        return pl.DataFrame(schema=dict(schema))
    stored = frame.schema
    return frame.select([_column(name, stored.get(name), dtype) for name, dtype in schema.items()])


def range_bits(rows: int) -> int:
    """Top bits of the key naming a range: about :data:`ROWS_PER_RANGE` users each, at most 2**16 ranges."""
    ranges = max(1, -(-rows // ROWS_PER_RANGE))
    return min(16, (ranges - 1).bit_length())


def key_range(r: int, bits: int) -> tuple[int, int]:
    """The keys ``[lo, hi)`` of range ``r`` when ``bits`` top bits name the range."""
    shift = 32 - bits
    return r << shift, (r + 1) << shift


@dataclass(frozen=True, slots=True)
class Layers:
    """A key range of the state as stored: the base rows, the overlay's live rows (the latest segment row per
    user, tombstones dropped; canonical order) and which base rows the overlay replaces or deletes. The diff
    uses them as they are (no merged copy); :meth:`merged` is the state itself."""

    base: pl.DataFrame
    live: pl.DataFrame
    replaced: pl.Series
    """Boolean per base row: the overlay holds a newer row for the user (or deleted them)."""

    def merged(self) -> pl.DataFrame:
        """The state of the range, in canonical order (a sorted merge)."""
        if not self.live.height and not self.replaced.any():
            return self.base
        return self.base.filter(~self.replaced).merge_sorted(self.live, [KEY, EXT_ID])


def layers(base: pl.DataFrame, segments: Sequence[pl.DataFrame], schema: Mapping[str, Any]) -> Layers:
    """``base`` (conformed, canonical order) and the ``segments`` to lay over it, in order: per user the latest
    segment's row wins, a :data:`DELETED` row removes the user."""
    segments = [s for s in segments if s.height]
    none = pl.Series(values=[False], dtype=pl.Boolean).new_from_index(0, base.height)
    if not segments:
        return Layers(base, conform(None, schema), none)
    with_flag = {**schema, DELETED: pl.Boolean}
    latest = (
        pl.concat([conform(s, with_flag) for s in segments], how="vertical_relaxed")
        .unique(EXT_ID, keep="last", maintain_order=True)
        .sort([KEY, EXT_ID])
    )
    # The replaced base rows, found by key first (an integer test over the base), then by ID among the few rows
    # whose key matches: a string membership test over every base row costs more than the rest of the read.
    same_key = base.get_column(KEY).is_in(latest.get_column(KEY).implode()).arg_true()
    replaced = none
    if same_key.len():
        ids = base.get_column(EXT_ID).gather(same_key)
        hit = same_key.filter(ids.is_in(latest.get_column(EXT_ID).implode()))
        if hit.len():
            replaced = none.clone().scatter(hit, True)
    live = latest.filter(~pl.col(DELETED).fill_null(False)).drop(DELETED)
    return Layers(base, live, replaced)


def overlay(base: pl.DataFrame, segments: Sequence[pl.DataFrame], schema: Mapping[str, Any]) -> pl.DataFrame:
    """``base`` (conformed, canonical order) with ``segments`` laid over it in order: per user the latest
    segment's row wins, a :data:`DELETED` row removes the user. Canonical order kept (a sorted merge)."""
    return layers(base, segments, schema).merged()


Bounds = tuple[int, int] | None
"""Keys ``[lo, hi)`` a read is limited to (None: every key)."""


def filtered(lazy: pl.LazyFrame, bounds: Bounds, ext_ids: pl.Series | None) -> pl.LazyFrame:
    """``lazy`` limited to the keys ``bounds`` and the IDs ``ext_ids`` (pushed into the Parquet reader)."""
    if bounds is not None:
        lazy = lazy.filter((pl.col(KEY) >= bounds[0]) & (pl.col(KEY) < bounds[1]))
    if ext_ids is not None:
        lazy = lazy.filter(pl.col(EXT_ID).is_in(ext_ids.implode()))
    return lazy


# PanicException: polars panics (a BaseException) on some damaged pages instead of raising.
READ_ERRORS = (OSError, pa.ArrowException, pl.exceptions.PolarsError, pl.exceptions.PanicException)
"""What reading damaged Parquet bytes raises (a backend turns them into one :class:`StateError`)."""


@contextmanager
def _damage_reported(path: Path) -> Iterator[None]:
    """Turn a state file that cannot be read (truncated, overwritten, not Parquet) into one StateError.

    The state is written atomically (a temporary file, fsync, rename), so this is damage from outside: a disk
    error, a restore gone wrong, a hand edit. Nothing is sent on top of a state we cannot read.
    """
    try:
        yield
    except READ_ERRORS as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise StateError(
            f"the snapshot state file {path} cannot be read ({detail}). Restore it from a backup, or move it "
            "aside to start from an empty state: the next run then sends every user of the export again"
        ) from exc


@dataclass(frozen=True, slots=True)
class Manifest:
    """A source's overlay as stored: users in the state (base and overlay together), the number the next
    segment gets, and the segments laid over the base, oldest first, as ``(name, rows)``."""

    rows: int
    next: int
    segments: tuple[tuple[str, int], ...]


class StateBackend(Protocol):
    """Where a job's confirmed state is kept, per source (``name``): a base (Parquet: whole rows in canonical
    order) and overlay segments laid over it. :class:`StateStore` holds the rules (schema, overlay, compaction);
    a backend only stores and returns frames. Every write is atomic: a reader sees a segment whole or not at
    all, a base replaced whole (its segments dropped with it) or not at all. :meth:`lock` serialises the
    read-diff-commit cycles of one job: two commits must never interleave."""

    def describe(self, name: str) -> str:
        """Where the source's state lives, for messages (a path; never a password)."""
        ...

    def exists(self, name: str) -> bool:
        """Whether the source has a base."""
        ...

    def base_rows(self, name: str) -> int:
        """Rows of the base alone (0 without one)."""
        ...

    def manifest(self, name: str) -> Manifest | None:
        """The source's overlay (None: the base alone is the state)."""
        ...

    def read(
        self, name: str, bounds: Bounds, ext_ids: pl.Series | None
    ) -> tuple[pl.DataFrame | None, list[pl.DataFrame]]:
        """The base's rows within ``bounds`` (and among ``ext_ids``; None without a base), and each segment's,
        oldest first — as stored (:class:`StateStore` conforms them to the job's schema)."""
        ...

    def scan(self, name: str) -> tuple[pl.LazyFrame | None, list[pl.LazyFrame]]:
        """The base and the segments (oldest first) as lazy queries, nothing read yet."""
        ...

    def write_base(self, name: str, tables: Iterable[pa.Table], schema: pa.Schema) -> int:
        """Replace the base with ``tables`` (canonical order, ``schema``) and drop the segments; the rows."""
        ...

    def append_segment(self, name: str, rows: pl.DataFrame, users: int) -> int:
        """Lay ``rows`` over the state as a new segment; ``users``: the state's users afterwards. Returns the
        overlay's rows (every segment's)."""
        ...

    def version(self, name: str) -> str:
        """A token that changes whenever the source's state is written (base replaced or a segment added)."""
        ...

    def lock(self) -> AbstractContextManager[None]:
        """Hold the job's state lock (a :class:`StateError` when it cannot be had)."""
        ...


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


class FileBackend:
    """The state in a directory of the job's workdir: ``<source>.parquet`` (the base), the segments in
    ``<source>.segments/<n>.parquet`` listed by ``<source>.manifest.json``, and ``.lock`` (an ``flock``)."""

    __slots__ = ("directory",)

    def __init__(self, directory: Path) -> None:
        self.directory: Path = directory

    def path_for(self, name: str) -> Path:
        """The base file of source ``name``."""
        return self.directory / f"{name}.parquet"

    def describe(self, name: str) -> str:
        return str(self.path_for(name))

    def exists(self, name: str) -> bool:
        return self.path_for(name).is_file()

    def _manifest_path(self, name: str) -> Path:
        return self.directory / f"{name}.manifest.json"

    def _segment_dir(self, name: str) -> Path:
        return self.directory / f"{name}.segments"

    def manifest(self, name: str) -> Manifest | None:
        path = self._manifest_path(name)
        if not path.is_file():
            return None
        with _damage_reported(path):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                segments = tuple((str(s["file"]), int(s["rows"])) for s in data["segments"])
                return Manifest(int(data["rows"]), int(data["next"]), segments)
            except (ValueError, KeyError, TypeError) as exc:
                raise OSError(f"overlay manifest damaged: {exc}") from exc

    def _segments(self, name: str) -> list[Path]:
        manifest = self.manifest(name)
        if manifest is None:
            return []
        return [self._segment_dir(name) / f for f, _ in manifest.segments]

    def base_rows(self, name: str) -> int:
        path = self.path_for(name)
        if not path.is_file():
            return 0
        with _damage_reported(path):
            return int(pq.ParquetFile(path).metadata.num_rows)

    def read(
        self, name: str, bounds: Bounds, ext_ids: pl.Series | None
    ) -> tuple[pl.DataFrame | None, list[pl.DataFrame]]:
        def scan(file: Path) -> pl.DataFrame:
            with _damage_reported(file):
                # Row-group statistics skip the rest of the file.
                return filtered(pl.scan_parquet(file), bounds, ext_ids).collect()

        path = self.path_for(name)
        return (scan(path) if path.is_file() else None), [scan(p) for p in self._segments(name)]

    def scan(self, name: str) -> tuple[pl.LazyFrame | None, list[pl.LazyFrame]]:
        path = self.path_for(name)
        base = None
        if path.is_file():
            with _damage_reported(path):
                pl.scan_parquet(path).collect_schema()  # a damaged file fails here, with its name
            base = pl.scan_parquet(path)
        return base, [pl.scan_parquet(p) for p in self._segments(name)]

    def write_base(self, name: str, tables: Iterable[pa.Table], schema: pa.Schema) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(name)
        tmp = path.with_suffix(".parquet.tmp")
        rows = 0
        # Dictionary pages: names, cities, flags and tags repeat, and a dictionary column decodes in about two
        # thirds of the time a plain one takes (the diff reads the whole state every run; the base is written
        # only by a compaction). LZ4, not zstd: it decompresses in about 60 % of the CPU time (the diff's
        # largest cost is reading the base) for a file about 40 % larger.
        with pq.ParquetWriter(tmp, schema, compression="lz4", use_dictionary=True) as writer:
            for table in tables:
                writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
                rows += table.num_rows
        _fsync(tmp)
        os.replace(tmp, path)
        # A crash here leaves the manifest listing segments the new base holds already: laying them over it
        # again changes nothing (whole rows, the latest winning), so removing them can come second.
        self._manifest_path(name).unlink(missing_ok=True)
        shutil.rmtree(self._segment_dir(name), ignore_errors=True)
        return rows

    def append_segment(self, name: str, rows: pl.DataFrame, users: int) -> int:
        manifest = self.manifest(name) or Manifest(0, 1, ())
        seg_dir = self._segment_dir(name)
        seg_dir.mkdir(parents=True, exist_ok=True)
        file = f"{manifest.next:06d}.parquet"
        tmp = seg_dir / f"{file}.tmp"
        rows.write_parquet(tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS, statistics=True)
        _fsync(tmp)
        os.replace(tmp, seg_dir / file)
        segments = [*manifest.segments, (file, rows.height)]
        doc = {
            "rows": users,
            "next": manifest.next + 1,
            "segments": [{"file": f, "rows": n} for f, n in segments],
        }
        # The manifest names the segment only once the segment is whole: a crash before this line leaves a
        # segment no reader sees (and the run's delta pending: its recovery writes the segment again).
        path = self._manifest_path(name)
        tmp_manifest = path.with_suffix(".json.tmp")
        tmp_manifest.write_text(json.dumps(doc), encoding="utf-8")
        _fsync(tmp_manifest)
        os.replace(tmp_manifest, path)
        return sum(n for _, n in segments)

    def version(self, name: str) -> str:
        path = self.path_for(name)
        base = f"{path.stat().st_size}:{path.stat().st_mtime_ns}" if path.is_file() else "-"
        manifest = self.manifest(name)
        return f"{base}/{manifest.next if manifest is not None else 0}"

    @contextmanager
    def lock(self) -> Iterator[None]:
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


def state_directory(workdir: Path, destination: Destination) -> Path:
    """``<workdir>/state/<platform>-<hash of the base URL>-<account>`` (:attr:`Destination.key`): the state's
    directory (and its runs' pending deltas) for one destination.

    Per destination and account: a job pointed at a sandbox must never believe what it sent there is in
    production, nor a job sent to a live app with the key of its test app (Netmera's apps share one base URL)
    believe what the test app confirmed is live. With the account known, a directory of the base URL alone —
    written by a pushsync that did not tell accounts apart — is taken as this account's (renamed to it: the
    account the job was run with then, as before). Without it (a command that has not read the secret), the
    base URL's one directory holding a state is found; several accounts' are refused, naming the secret."""
    root = Path(workdir) / "state"
    here = root / destination.key
    if destination.account is None:
        if here.is_dir():
            return here
        # Only directories holding a state: a run with a mistyped key leaves its account's lock and delta.
        found = (
            sorted(
                p for p in root.glob(f"{destination.url_key}-*") if p.is_dir() and any(p.glob("*.parquet"))
            )
            if root.is_dir()
            else []
        )
        if len(found) > 1:
            raise StateError(
                f"{root} holds the snapshot states of {len(found)} accounts of {destination.platform} at "
                f"{destination.url_key} ({', '.join(p.name for p in found)}): make the job's secret "
                f"({destination.secret_env or destination.secret_file}) readable so that pushsync knows which"
            )
        return found[0] if found else here
    legacy = root / destination.url_key
    if not here.exists() and legacy.is_dir():
        with contextlib.suppress(FileNotFoundError):  # another run took it over first: ``here`` is there now
            legacy.rename(here)
    return here


def other_accounts(workdir: Path, destination: Destination) -> list[str]:
    """The destination keys of the other accounts at ``destination``'s platform and base URL whose snapshot state
    the workdir holds (a directory with a base file), sorted."""
    root = Path(workdir) / "state"
    if not root.is_dir():
        return []
    here = destination.key
    return sorted(
        p.name
        for p in root.glob(f"{destination.url_key}-*")
        if p.name != here and p.is_dir() and any(p.glob("*.parquet"))
    )


def another_accounts_state(others: Sequence[str], destination: Destination, job_path: object) -> StateError:
    """The refusal of a snapshot run whose account has no state while another account's at the same base URL
    has: a rotated key (the same app: the state is to be kept) cannot be told from another app's key (test
    app, then live app: every user is to be sent), and guessing wrong either sends nothing to an app that has
    nothing, or sends everything again (``push`` attributes appended twice)."""
    return StateError(
        f"no snapshot state of the account this job's key names ({destination.key}), but one of another "
        f"account at the same base URL ({', '.join(others)}): if the key was rotated (the same app), "
        f"`pushsync state rekey {job_path}` keeps that state (nothing is sent again); if it is another app, "
        "`pushsync run --full-refresh` sends it every user and starts its own state; nothing was sent"
    )


class StateStore:
    """The confirmed state of one job for one destination, and the pending deltas of its runs.

    ``backend``: where the state is kept (default: :class:`FileBackend` in the workdir's state directory).
    The pending deltas of the runs (:meth:`pending`) are always the workdir's: a coordinated run keeps its own
    elsewhere (:mod:`sync.coordination.snapshot`)."""

    __slots__ = ("backend", "directory")

    def __init__(
        self, workdir: Path, destination: Destination, *, backend: StateBackend | None = None
    ) -> None:
        self.directory: Path = state_directory(workdir, destination)
        self.backend: StateBackend = backend if backend is not None else FileBackend(self.directory)

    def path_for(self, source: Source | str) -> Path:
        """The base file of a source in the workdir's state directory (where :class:`FileBackend` keeps it)."""
        name = source if isinstance(source, str) else source.name
        return self.directory / f"{name}.parquet"

    def describe(self, source: Source | str) -> str:
        """Where the source's state lives (for messages and ``pushsync state show``)."""
        return self.backend.describe(_name(source))

    def exists(self, source: Source | str) -> bool:
        """Whether the source has a state yet (a base)."""
        return self.backend.exists(_name(source))

    @property
    def pending_root(self) -> Path:
        return self.directory / "pending"

    def pending(self) -> list[Path]:
        """Pending run directories (deltas not yet committed), oldest first."""
        if not self.pending_root.is_dir():
            return []
        return sorted(p for p in self.pending_root.iterdir() if (p / "meta.json").is_file())

    def remove_unfinished_diffs(self) -> list[Path]:
        """Remove the pending directories of diffs that never finished — a run killed while it diffed leaves
        one without ``meta.json``, and nothing of it was sent (batches are made only from a finished diff).
        Only the holder of :meth:`lock` may call this: no other run of the job can be diffing then."""
        removed: list[Path] = []
        if not self.pending_root.is_dir():
            return removed
        for directory in sorted(self.pending_root.iterdir()):
            if directory.is_dir() and not directory.is_symlink() and not (directory / "meta.json").is_file():
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory)
        return removed

    def base_rows(self, source: Source | str) -> int:
        """Rows of the base alone (the overlay segments not counted)."""
        return self.backend.base_rows(_name(source))

    def overlay_rows(self, source: Source | str) -> int:
        """Rows of the overlay segments (a user changed in two commits counts twice)."""
        manifest = self.backend.manifest(_name(source))
        return sum(n for _, n in manifest.segments) if manifest is not None else 0

    def rows(self, source: Source | str) -> int:
        """Users in the state (base and overlay together)."""
        manifest = self.backend.manifest(_name(source))
        if manifest is not None:
            return manifest.rows
        return self.base_rows(source)

    def read(self, source: Source, settings: SnapshotSettings | None = None) -> pl.DataFrame:
        """The whole state of a source (for inspection and small jobs; runs read it by key range)."""
        return self._read(source, None, settings).merged()

    def slice(
        self, source: Source, lo: int, hi: int, settings: SnapshotSettings | None = None
    ) -> pl.DataFrame:
        """The state rows with ``lo <= __key < hi``, in canonical order; row-group statistics skip the rest of
        the base and of each segment."""
        return self._read(source, (lo, hi), settings).merged()

    def layers(self, source: Source, lo: int, hi: int, settings: SnapshotSettings | None = None) -> Layers:
        """The key range ``[lo, hi)`` as stored: base rows and overlay apart (what the diff reads)."""
        return self._read(source, (lo, hi), settings)

    def scan(self, source: Source, settings: SnapshotSettings | None = None) -> pl.LazyFrame:
        """The whole state as a lazy query, in no particular order (for counts over a large state: nothing is
        read until it is collected, and then only the columns asked for)."""
        schema = state_schema(source, settings)
        stored, segments = self.backend.scan(source.name)
        if stored is not None:
            found = stored.collect_schema()
            base = stored.select([_column(n, found.get(n), dtype) for n, dtype in schema.items()])
        else:
            base = pl.LazyFrame(schema=schema)
        if not segments:
            return base
        with_flag = {**schema, DELETED: pl.Boolean}

        def conformed(segment: pl.LazyFrame) -> pl.LazyFrame:
            found = segment.collect_schema()
            return segment.select([_column(n, found.get(n), dtype) for n, dtype in with_flag.items()])

        latest = (
            pl.concat([conformed(s).with_columns(pl.lit(i).alias("__seg")) for i, s in enumerate(segments)])
            .sort("__seg", maintain_order=True)
            .unique(EXT_ID, keep="last", maintain_order=True)
        )
        live = latest.filter(~pl.col(DELETED).fill_null(False)).select(list(schema))
        return pl.concat([base.join(latest.select(EXT_ID), on=EXT_ID, how="anti"), live])

    def users(
        self, source: Source, lo: int, hi: int, ext_ids: pl.Series, settings: SnapshotSettings | None = None
    ) -> pl.DataFrame:
        """The state rows of ``ext_ids`` in the key range ``[lo, hi)`` (the filter is pushed into the Parquet
        reader: other rows' values are not materialised)."""
        return self._read(source, (lo, hi), settings, ext_ids).merged()

    def _read(
        self,
        source: Source,
        bounds: Bounds,
        settings: SnapshotSettings | None,
        ext_ids: pl.Series | None = None,
    ) -> Layers:
        schema = state_schema(source, settings)
        base, segments = self.backend.read(source.name, bounds, ext_ids)
        return layers(conform(base, schema), segments, schema)

    def write(
        self, source: Source, frames: Iterable[pl.DataFrame], settings: SnapshotSettings | None = None
    ) -> int:
        """Replace a source's state with ``frames`` (in canonical order), atomically; the overlay segments are
        dropped (``frames`` must hold them already). Returns the row count."""
        schema = state_schema(source, settings)
        arrow_schema = pl.DataFrame(schema=schema).to_arrow().schema
        tables = (conform(f, schema).to_arrow().cast(arrow_schema) for f in frames if f.height)
        return self.backend.write_base(source.name, tables, arrow_schema)

    def append(
        self, source: Source, rows: pl.DataFrame, users: int, settings: SnapshotSettings | None = None
    ) -> int:
        """Lay ``rows`` (whole state rows of changed users, in canonical order, with :data:`DELETED`) over the
        state as a new segment; ``users`` is the state's user count afterwards. Returns the overlay's rows."""
        schema = {**state_schema(source, settings), DELETED: pl.Boolean}
        return self.backend.append_segment(source.name, conform(rows, schema), users)

    def version(self, source: Source | str) -> str:
        """A token that changes whenever the source's state is written (base replaced or a segment added)."""
        return self.backend.version(_name(source))

    def segment_count(self, source: Source | str) -> int:
        manifest = self.backend.manifest(_name(source))
        return len(manifest.segments) if manifest is not None else 0

    def lock(self) -> AbstractContextManager[None]:
        """Hold the job's state lock: two runs of one job at once would each believe the other's changes unsent."""
        return self.backend.lock()


def _name(source: Source | str) -> str:
    return source if isinstance(source, str) else source.name
