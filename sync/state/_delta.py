"""The delta of a run: :func:`compute_diff` writes it under ``pending/<run_id>/`` before anything is sent, and
:class:`SnapshotDiff` turns it into batches (recording each in the run's batch map before it is yielded)."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import polars as pl

from sync._prefetch import ahead
from sync.config import Job, RemovalAction, SnapshotSettings, Source
from sync.errors import InterruptedRunError, StateError
from sync.planning.validation import EXT_ID, FILE, KEY, clean_schema
from sync.platforms.base import SnapshotBuilder, snapshot_builder
from sync.records import Batch, Operation, Phase
from sync.sources.reading import ROW
from sync.state._diff import DiffCounts, diff_and_state
from sync.state._store import (
    LEFT_FILE,
    SEQ,
    Layers,
    StateStore,
    key_range,
    managed_fields,
    range_bits,
    snapshot_problems,
    tag_columns,
)


class RemovalThresholdError(StateError):
    """More users would be removed than the job allows; nothing was sent. ``--force`` overrides."""


def snapshot_streams(source: Source, builder: Any = None) -> list[Any]:
    """The request streams a source's delta frames make, as the platform's snapshot builder defines them
    (``builder``: the job's :class:`sync.platforms.base.SnapshotBuilder`, :func:`snapshot_builder_for`)."""
    return list(_require(builder).snapshot_streams(source))


def _require(builder: Any) -> SnapshotBuilder:
    if builder is None:
        raise StateError(
            "a snapshot diff needs the job's batch builder: pass builder=snapshot_builder_for(job)"
        )
    found = snapshot_builder(builder)
    if found is None:
        raise StateError(f"the batch builder {builder!r} makes no snapshot streams (no snapshot_streams)")
    return found


def snapshot_builder_for(job: Job) -> SnapshotBuilder:
    """The snapshot builder of ``job``'s platform (:func:`sync.platforms.registry.platform_for`); a
    :class:`sync.errors.StateError` when the platform has no snapshot mode."""
    from sync.platforms.registry import platform_for

    platform = platform_for(job)
    builder = snapshot_builder(platform.builder(job)) if platform.snapshot_mode else None
    if builder is None:
        raise StateError(f"platform {platform.name!r} has no snapshot mode: use mode 'changes'")
    return builder


def _log_entry(delta: SourceDelta, stream: Any, batch: Batch, builder: SnapshotBuilder) -> str:
    """One ``batches.jsonl`` line: what :func:`commit` needs to map a confirmed batch back to its rows."""
    group = builder.batch_group(batch)
    entry = {
        "s": delta.source.name,
        "b": batch.batch_id,
        "o": stream.operation.value,
        "p": int(stream.phase),
        "g": group,
        "f": batch.ext_ids[0],
        "l": batch.ext_ids[-1],
    }
    return json.dumps(entry)


def _by_range(
    frames: Iterable[pl.DataFrame], bits: int, empty: pl.DataFrame
) -> Iterator[tuple[int, pl.DataFrame]]:
    """Re-cut frames of disjoint, increasing key ranges (the planner's buckets, each in canonical order) into
    this module's ranges. Cut by position (the keys are sorted), so no row is copied: a filter would copy every
    column of the buffer twice per range."""
    it = iter(frames)
    buf = empty
    exhausted = False
    for r in range(1 << bits):
        _, hi = key_range(r, bits)
        while not exhausted and (buf.is_empty() or buf[KEY][-1] < hi):
            nxt = next(it, None)
            if nxt is None:
                exhausted = True
            elif nxt.height:
                nxt = nxt.select(empty.columns)
                if not nxt[KEY].is_sorted():  # not from the planner: cut by position only once sorted
                    nxt = nxt.sort([KEY, EXT_ID])
                buf = pl.concat([buf, nxt], how="vertical_relaxed") if buf.height else nxt
        cut = int(buf[KEY].search_sorted(hi, side="left"))
        yield r, buf.slice(0, cut)
        buf = buf.slice(cut)


def _range_reads(
    store: StateStore,
    source: Source,
    frames: Iterable[pl.DataFrame],
    bits: int,
    empty: pl.DataFrame,
    settings: SnapshotSettings,
) -> Iterator[tuple[int, pl.DataFrame, Layers]]:
    """Per key range: its number, the export's rows and the state's layers (what the diff of a range reads)."""
    for r, current in _by_range(frames, bits, empty):
        lo, hi = key_range(r, bits)
        yield r, current, store.layers(source, lo, hi, settings)


@dataclass(frozen=True, slots=True)
class RejectedUsers:
    """The users a source's rejected rows name: a snapshot diff must not take them for users who left.

    ``ext_ids``: the IDs of rejected rows (unique, one column ``__ext_id``); ``unidentified``: rejected rows that
    name no ID we can trust — a malformed record spanning several lines (a quote never closed swallows the rows
    after it), or an ID refused for what it holds (an invisible character, a NUL, a control character): the
    user it was meant for (``U7`` for ``U7`` + a zero-width space) is not the ID written, and would otherwise be
    taken for a user who left. A row whose ID cell is empty names no user and counts in neither.
    """

    ext_ids: pl.DataFrame
    unidentified: int = 0


def rejected_users(rejects_path: Path, staged: Sequence[Any]) -> dict[str, RejectedUsers]:
    """Per source name, the users its rejected rows name (read from the plan's rejects file: ``file, row,
    column, reason, ext_id``; a source's rows are those of its files)."""
    columns = {
        "file": pl.String,
        "row": pl.String,
        "column": pl.String,
        "reason": pl.String,
        "ext_id": pl.String,
    }
    rejects = (
        pl.read_csv(rejects_path, schema=columns, has_header=True)
        if rejects_path.is_file() and rejects_path.stat().st_size
        else pl.DataFrame(schema=columns)
    )
    out: dict[str, RejectedUsers] = {}
    for st in staged:
        source: Source = st.source
        mine = rejects.filter(pl.col("file").is_in(list(st.files)))
        ids = mine.filter(pl.col("ext_id").is_not_null()).select(pl.col("ext_id").alias(EXT_ID)).unique()
        # An empty ID cell ("missing external ID") names nobody; any other row without an ID could be anyone,
        # and so could a row whose ID itself was refused (the rejects file gives the ID as written).
        on_id = pl.col("column").eq_missing(pl.lit(source.ext_id))
        unidentified = mine.filter(
            (pl.col("ext_id").is_null() & ~on_id) | (pl.col("ext_id").is_not_null() & on_id)
        ).height
        out[source.name] = RejectedUsers(ids, unidentified)
    return out


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
    builder: Any = None
    """The job's :class:`sync.platforms.base.SnapshotBuilder`: the streams and batches of the delta."""

    @property
    def refused_sources(self) -> tuple[str, ...]:
        """The sources whose removals a run refuses without ``--force`` (the threshold is per source)."""
        return tuple(s.source.name for s in self.sources if removals_refused(s.counts, self.settings))

    @property
    def counts(self) -> DiffCounts:
        total = DiffCounts()
        for s in self.sources:
            total = total + s.counts
        return total

    def _size(self, endpoint: str) -> int:
        # As Job.batch_size_for; the builder caps it at its platform's largest batch.
        return self.batch_size.get(endpoint) or self.batch_size.get("*") or 1000

    def _streams(self, delta: SourceDelta) -> list[Any]:
        return snapshot_streams(delta.source, self.builder)

    def lanes(self, phase: Phase) -> list[tuple[str, Iterator[Batch]]]:
        """The phase's batches per endpoint (a :class:`sync.dispatch.dispatch.LaneSource`), so a snapshot run sends every
        endpoint of a phase at once, as a changes run does; phases stay in order (opt-outs first). Each batch is
        recorded in ``batches.jsonl`` before it is yielded, as :meth:`batches` does (each lane appends whole
        lines through its own handle)."""
        by_endpoint: dict[str, list[tuple[SourceDelta, Any]]] = {}
        for delta in self.sources:
            for stream in self._streams(delta):
                if stream.phase is phase:
                    by_endpoint.setdefault(stream.endpoint, []).append((delta, stream))
        return [(endpoint, self._lane(pairs)) for endpoint, pairs in by_endpoint.items()]

    def _lane(self, pairs: list[tuple[SourceDelta, Any]]) -> Iterator[Batch]:
        builder = _require(self.builder)
        with (self.directory / "batches.jsonl").open("a", encoding="utf-8") as log:
            for delta, stream in pairs:
                size = self._size(stream.endpoint)
                for batch in builder.stream_batches(stream, delta.frames(), size, delta.files):
                    log.write(_log_entry(delta, stream, batch, builder) + "\n")
                    log.flush()  # to the OS: survives kill -9 of this process
                    yield batch

    def batches(self, *, record: bool = True) -> Iterator[Batch]:
        """Every batch of the delta, phase by phase; each is recorded in ``batches.jsonl`` before it is yielded
        (so a crash can never leave a sent batch that :func:`commit` cannot map back)."""
        builder = _require(self.builder)
        log: IO[str] | None = (
            (self.directory / "batches.jsonl").open("a", encoding="utf-8") if record else None
        )
        try:
            for phase in Phase:
                for delta in self.sources:
                    for stream in self._streams(delta):
                        if stream.phase is not phase:
                            continue
                        size = self._size(stream.endpoint)
                        for batch in builder.stream_batches(stream, delta.frames(), size, delta.files):
                            if log is not None:
                                log.write(_log_entry(delta, stream, batch, builder) + "\n")
                                log.flush()  # to the OS: survives kill -9 of this process
                            yield batch
        finally:
            if log is not None:
                log.close()

    def request_counts(self) -> dict[tuple[Phase, str, Operation], tuple[int, int]]:
        """``(requests, ids)`` per phase, endpoint and operation, without building bodies."""
        builder = _require(self.builder)
        out: dict[tuple[Phase, str, Operation], tuple[int, int]] = {}
        for delta in self.sources:
            for stream in self._streams(delta):
                requests, ids = builder.stream_counts(stream, delta.frames(), self._size(stream.endpoint))
                if requests:
                    key = (stream.phase, stream.endpoint, stream.operation)
                    old = out.get(key, (0, 0))
                    out[key] = (old[0] + requests, old[1] + ids)
        return out

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def removals_refused(counts: DiffCounts, settings: SnapshotSettings) -> bool:
    """Whether one source's removals pass ``max_removal_share`` (the run refuses them without ``--force``)."""
    return bool(counts.users_removed) and counts.removal_share > settings.max_removal_share


def compute_diff(
    store: StateStore,
    staged: Sequence[Any],
    run_id: str,
    settings: SnapshotSettings | None = None,
    *,
    full_refresh: bool = False,
    force: bool = False,
    batch_size: Mapping[str, int] | None = None,
    rejected: Mapping[str, RejectedUsers] | None = None,
    refuse: bool = True,
    stop: threading.Event | None = None,
    directory: Path | None = None,
    builder: Any = None,
) -> SnapshotDiff:
    """Diff every staged users source (``Plan.staged``: objects with ``source``, ``files``, ``rows_clean`` and
    ``frames(columns)``) against the confirmed state and write the delta under ``pending/<run_id>/``.

    Raises :class:`RemovalThresholdError` (and keeps nothing) when a source would remove more than
    ``max_removal_share`` of its state's users and ``force`` is not given.

    ``rejected`` (:func:`rejected_users`): per source, the users whose rows validation rejected. Such a user is
    not in the clean frames but did not leave the export: their state is kept and they are not removed. When a
    rejected row names no user we can trust, nobody is removed from that source this run unless ``force``.
    ``refuse=False`` (the plan preview) never raises for the threshold: the counts show it. ``stop`` (set by a
    signal handler) ends the diff at the next key range with :class:`sync.errors.InterruptedRunError`, keeping
    nothing. ``directory``: where the delta goes instead of ``pending/<run_id>/`` (a preview, which no run must
    recover). ``builder``: the job's snapshot builder (:func:`snapshot_builder_for`), which makes the delta's
    streams and batches; required.
    """
    _require(builder)
    settings = settings or SnapshotSettings()
    directory = directory if directory is not None else store.pending_root / run_id
    directory.mkdir(parents=True, exist_ok=False)
    meta: dict[str, Any] = {"run_id": run_id, "full_refresh": full_refresh, "sources": {}}
    deltas: list[SourceDelta] = []
    try:
        for st in staged:
            source: Source = st.source
            problems = snapshot_problems(source)
            if problems:
                raise StateError(f"source {source.name!r}: {problems[0]}")
            bits = range_bits(max(int(st.rows_clean), store.rows(source)))
            files = (*st.files, LEFT_FILE)
            columns = list(dict.fromkeys(f.column for f in managed_fields(source, settings)))
            columns += [c for c in tag_columns(source) if c not in columns]
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
            held = (rejected or {}).get(source.name)
            version = store.version(source)
            captured = not full_refresh
            # Closed on the way out, so an error or a stop leaves no read running behind it.
            with closing(
                ahead(
                    _range_reads(store, source, st.frames([KEY, *columns]), bits, empty, settings),
                    thread_name="snapshot-read",
                )
            ) as ranges:
                for r, current, state in ranges:
                    if stop is not None and stop.is_set():
                        raise InterruptedRunError("interrupted while the export was diffed; nothing was sent")
                    delta, c, before = diff_and_state(
                        source,
                        current,
                        state,
                        settings,
                        full_refresh=full_refresh,
                        left_file=len(st.files),
                        held=held.ext_ids if held is not None else None,
                        hold_removals=held is not None and held.unidentified > 0 and not force,
                    )
                    counts = counts + c
                    if delta.height:
                        delta = delta.with_columns(
                            pl.int_range(seq, seq + delta.height, dtype=pl.Int64).alias(SEQ)
                        )
                        seq += delta.height
                        parts[r] = part_dir / f"{r:05d}.parquet"
                        delta.write_parquet(parts[r], compression="zstd")
                        if before is not None:
                            # The state rows of the delta's users, as the diff read them: the commit merges into
                            # these instead of reading the state again (see sync.state._commit._merge).
                            before.write_parquet(part_dir / f"{r:05d}.state.parquet", compression="zstd")
                        else:
                            captured = False
            if refuse and not force and removals_refused(counts, settings):
                raise RemovalThresholdError(
                    f"source {source.name!r}: {counts.users_removed} of "
                    f"{counts.users_state - counts.users_left + counts.users_removed} users in the state (not "
                    f"counting those removed before: {counts.removal_share:.1%}) left the export and would be "
                    f"{'deleted' if settings.removal is RemovalAction.DELETE else 'untagged'}; the job allows "
                    f"{settings.max_removal_share:.1%}. Nothing was sent. Check the export, or run with --force."
                )
            meta["sources"][source.name] = {
                "bits": bits,
                "state_version": version if captured else None,
                "files": list(files),
                "parts": {str(r): p.name for r, p in parts.items()},
            }
            deltas.append(SourceDelta(source, files, bits, parts, counts))
        (directory / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return SnapshotDiff(run_id, directory, tuple(deltas), settings, dict(batch_size or {}), builder)
