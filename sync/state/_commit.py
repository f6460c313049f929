"""The merge of confirmed batches: the ledger's confirmed batches mapped back to per-user fields and merged
into the state (:func:`commit`; :func:`recover` for a crashed run's delta). Every rule is idempotent."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from sync.config import SnapshotSettings, Source
from sync.errors import ExitCode
from sync.planning.validation import EXT_ID, KEY
from sync.platforms.base import GROUP
from sync.records import BatchStatus, Operation, Phase
from sync.state._delta import _require, snapshot_streams
from sync.state._diff import conform_delta, empty_list
from sync.state._store import (
    COMPACT_SHARE,
    DELETED,
    MAX_SEGMENTS,
    OK_DELETE,
    SEQ,
    TAGS,
    UNCERTAIN,
    UNSET,
    FieldKind,
    StateStore,
    conform,
    flag_name,
    key_range,
    managed_fields,
    overlay,
    range_bits,
    state_schema,
)


def apply_confirmed(
    source: Source,
    state: pl.DataFrame | None,
    delta: pl.DataFrame,
    confirmations: pl.DataFrame,
    settings: SnapshotSettings | None = None,
    attempted: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The new state of one key range: ``state`` with the confirmed part of ``delta`` applied.

    ``confirmations`` has one row per confirmed item: ``__ext_id``, ``op`` (an :class:`Operation` value),
    ``phase`` (int) and ``group`` (the tag for tag/untag, else empty). A value moves into the state only when the
    operation that carries it is confirmed for that user; everything else keeps its old state. ``attempted``
    (the same columns): items sent whose outcome is unknown — see :func:`changed_rows`. Idempotent.
    """
    settings = settings or SnapshotSettings()
    schema = state_schema(source, settings)
    st = conform(state, schema)
    changed = changed_rows(source, st, delta, confirmations, settings, attempted)
    if changed.is_empty():
        return st
    return overlay(st, [changed], schema)


def changed_rows(
    source: Source,
    state: pl.DataFrame | None,
    delta: pl.DataFrame,
    confirmations: pl.DataFrame,
    settings: SnapshotSettings | None = None,
    attempted: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The new whole state rows of the users ``confirmations`` or ``attempted`` name (``state`` must hold at
    least their rows, if they have one), with :data:`DELETED` set for a confirmed deletion; canonical order.

    ``attempted``: items sent whose outcome is unknown (a batch failed after every retry, or was in flight when
    the run died). The platform may hold them or not, so the user's row is marked :data:`UNCERTAIN` and holds
    what was sent — but for a tag removal or a deletion, which it does not apply: the next diff then sends every
    value of the export for the user, and removes what the row holds and the export does not (the tags added, a
    value set, a tag whose removal was not confirmed). Without it a change that landed unconfirmed stayed on the
    platform once the export went back to the confirmed value: the diff saw nothing to send. A user all of
    whose items are confirmed is certain again. Idempotent."""
    settings = settings or SnapshotSettings()
    fields = managed_fields(source, settings)
    schema = state_schema(source, settings)
    st = conform(state, schema)
    out_schema = {**schema, DELETED: pl.Boolean}
    items = confirmations.with_columns(pl.lit(False).alias("__unc"))
    if attempted is not None and attempted.height:
        kept = pl.col("op").is_in([Operation.UNTAG.value, Operation.DELETE_USERS.value])
        items = pl.concat(
            [
                items,
                attempted.with_columns(
                    pl.when(kept).then(pl.lit("unknown")).otherwise(pl.col("op")).alias("op"),
                    pl.lit(True).alias("__unc"),
                ),
            ],
            how="vertical_relaxed",
        )
    if delta.is_empty() or items.is_empty():
        return pl.DataFrame(schema=out_schema)
    names = sorted(
        {flag_name(*f.on) for f in fields} | {flag_name(*f.off) for f in fields if f.off} | {OK_DELETE}
    )
    op, group = pl.col("op"), pl.col("group")
    flag = pl.format("ok:{}:{}", op, pl.col("phase").cast(pl.String))
    conf = (
        items.with_columns(flag.alias("__flag"))
        .group_by(EXT_ID)
        .agg(
            *[(pl.col("__flag") == n).any().alias(n) for n in names],
            group.filter(op == Operation.TAG.value).alias("__conf_added"),
            group.filter(op == Operation.UNTAG.value).alias("__conf_removed"),
            pl.col("__unc").any().alias("__unc_now"),
        )
    )
    d = delta.rename({c: f"d:{c}" for c in delta.columns if c not in (KEY, EXT_ID)}).join(
        conf, on=EXT_ID, how="inner"
    )
    j = st.join(d, on=[KEY, EXT_ID], how="right", coalesce=True)

    def ok(pair: tuple[Operation, Phase]) -> pl.Expr:
        return pl.col(flag_name(*pair)).fill_null(False)

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
            union = pl.concat_list([s.fill_null(empty_list()), dv]).list.unique().list.sort()
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
        added = pl.col("__conf_added").fill_null(empty_list())
        removed = pl.col("__conf_removed").fill_null(empty_list())
        tags = pl.concat_list([pl.col(TAGS).fill_null(empty_list()), added]).list.set_difference(removed)
        untouched = pl.col("__conf_added").is_null() & pl.col("__conf_removed").is_null()
        new.append(pl.when(untouched).then(pl.col(TAGS)).otherwise(tags.list.sort()).alias(TAGS))
    new.append(pl.col("__unc_now").fill_null(False).alias(UNCERTAIN))
    deleted = ok((Operation.DELETE_USERS, Phase.DELETIONS)).alias(DELETED)
    return j.select(pl.col(KEY), pl.col(EXT_ID), *new, deleted).select(list(out_schema)).sort([KEY, EXT_ID])


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
    """Add the delta positions of each batch's first and last external ID (an ID is in one delta row at most,
    so the parts' IDs are joined as one frame: two joins, not two per part)."""
    frames = [part.select(EXT_ID, SEQ) for part in parts]
    ids = (
        pl.concat(frames, how="vertical_relaxed", rechunk=True)
        if frames
        else pl.DataFrame(schema={EXT_ID: pl.String, SEQ: pl.Int64})
    )
    first = (
        batches.select("b", "f")
        .join(ids, left_on="f", right_on=EXT_ID)
        .select("b", pl.col(SEQ).alias("first"))
    )
    last = (
        batches.select("b", "l")
        .join(ids, left_on="l", right_on=EXT_ID)
        .select("b", pl.col(SEQ).alias("last"))
    )
    return batches.join(first, on="b", how="inner").join(last, on="b", how="inner")


_CONFIRMED = (BatchStatus.OK.value, BatchStatus.REJECTED.value)
_ITEMS: dict[str, Any] = {EXT_ID: pl.String, "op": pl.String, "phase": pl.Int64, "group": pl.String}
"""The columns of :func:`_confirmations`' items (and of an empty set of them)."""


def _counted(row: Any) -> bool:
    """Whether a batch row keeps its status for the commit: a failed batch whose last answer refused it (a 4xx
    but 408: the key, the request, the rate) was not applied — as if never sent; one that got no answer, or a
    5xx (which may come after the change was applied), has an unknown outcome."""
    if row.status is not BatchStatus.FAILED or row.http_status is None:
        return True
    return int(row.http_status) >= 500 or int(row.http_status) == 408


_UNKNOWN = (BatchStatus.SENT.value, BatchStatus.FAILED.value)
"""The batches whose outcome is unknown: sent without an answer (in flight when the run died), or failed after
every retry (a 500, no answer). A batch the ledger still holds as planned was not sent — but for the last
moments of a run killed before its ledger flushed the send (its flush interval, 50 ms)."""


def _confirmations(
    source: Source,
    delta: pl.DataFrame,
    batches: pl.DataFrame,
    refused: pl.DataFrame,
    builder: Any,
    statuses: Sequence[str] = _CONFIRMED,
) -> pl.DataFrame:
    """One row per (user, operation, phase, group) of ``delta`` whose batch the platform confirmed (or, with
    other ``statuses``, whose batch ended so: the attempts of unknown outcome).

    ``batches``: the run's batch map with ``first``/``last`` positions and the ledger ``status``; a batch's
    stream and group plus the positions of its first and last ID identify exactly the delta rows it carried.
    """
    out = []
    seqs = delta.select(EXT_ID, SEQ)
    for stream in snapshot_streams(source, builder):
        selected = stream.select(delta, False)  # IDs and groups only: no JSON text is built
        if selected.is_empty():
            continue
        rows = (
            selected.select(EXT_ID, pl.col(GROUP).alias("group")).join(seqs, on=EXT_ID, how="left").sort(SEQ)
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
        hit = hit.filter(pl.col("status").is_in(list(statuses)))
        hit = hit.join(refused, left_on=["b", EXT_ID], right_on=["batch_id", "ext_id"], how="anti")
        out.append(
            hit.select(
                EXT_ID,
                pl.lit(stream.operation.value).alias("op"),
                pl.lit(int(stream.phase), pl.Int64).alias("phase"),
                "group",
            )
        )
    return pl.concat(out) if out else pl.DataFrame(schema=_ITEMS)


def _attempted(
    source: Source, delta: pl.DataFrame, batches: pl.DataFrame, refused: pl.DataFrame, builder: Any
) -> pl.DataFrame:
    """The items of ``delta`` sent in batches of unknown outcome (:data:`_UNKNOWN`); none read when the run had
    no such batch (the usual case: the streams' selection is not made twice)."""
    if not batches.get_column("status").is_in(list(_UNKNOWN)).any():
        return pl.DataFrame(schema=_ITEMS)
    return _confirmations(source, delta, batches, refused, builder, _UNKNOWN)


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
    *,
    builder: Any = None,
) -> CommitReport:
    """Merge the confirmed batches of the pending run in ``directory`` into the state, then remove the directory.

    ``ledger`` is a :class:`sync.ledger.ledger.Ledger` (``confirmed_ok(run_id)``, ``batches(run_id, status=)``,
    ``refused_ids(run_id)``); ``builder`` the job's snapshot builder (:func:`sync.state.snapshot_builder_for`),
    whose streams made the run's batches.
    Only the users the confirmed batches touch are read and written (an overlay segment of the state).
    """
    _require(builder)
    settings = settings or SnapshotSettings()
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    run_id = meta["run_id"]
    ledger.flush()  # results still queued in this process count too
    # Only the confirmed batches (ok, or rejected: every ID not refused went through) are looked up: a first
    # load makes hundreds of thousands of batches, and a record object for each costs more than the merge.
    ok = list(ledger.confirmed_ok(run_id))
    # And the batches whose outcome is unknown (sent without an answer, or failed after every retry): their
    # users' rows are marked uncertain (changed_rows). A batch still "planned" was never sent.
    others = {
        status: [r.batch_id for r in ledger.batches(run_id, status=status) if _counted(r)]
        for status in (BatchStatus.REJECTED, BatchStatus.SENT, BatchStatus.FAILED)
    }
    ids = ok + [b for batch_ids in others.values() for b in batch_ids]
    labels = [BatchStatus.OK.value] * len(ok)
    labels += [status.value for status, batch_ids in others.items() for _ in batch_ids]
    statuses = pl.DataFrame(
        {"b": ids, "status": labels}, schema={"b": pl.String, "status": pl.String}
    ).unique("b")
    all_batches = _batch_map(directory)
    if ledger.run(run_id) is None:
        # The ledger has no record of the run whose diff is pending: it was deleted, emptied or replaced since
        # the run died (a run is recorded before its first request). Whatever the platform applied is unknown,
        # so every batch the run put in its map counts as sent without an answer: its users' rows are marked
        # uncertain and the next diff sends them again. Counted as "planned" (never sent), a change the platform
        # applied was taken as not made, and a later export back at the state's values sent nothing: lost.
        statuses = all_batches.select(pl.col("b").unique(), status=pl.lit(BatchStatus.SENT.value))
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
        good = batches.filter(pl.col("status").is_in(list(_CONFIRMED)))
        confirmed_total += good.height
        unconfirmed_total += batches.height - good.height
        if batches.is_empty():
            rows[name] = store.rows(source)
            updated[name] = 0
            continue
        # Every batch, the unconfirmed too: their users' rows are marked uncertain (changed_rows).
        batches = _with_seqs(batches, (pl.read_parquet(p, columns=[EXT_ID, SEQ]) for p in parts.values()))
        # The state rows the diff read for the delta's users, when the state has not been written since.
        captured = info.get("state_version") is not None and info["state_version"] == store.version(source)
        updated[name], rows[name] = _merge(
            store, source, bits, parts, batches, refused, settings, builder, captured
        )
    shutil.rmtree(directory, ignore_errors=True)
    return CommitReport(run_id, confirmed_total, unconfirmed_total, updated, rows)


MERGE_CHUNK_ROWS = 200_000
"""Delta rows merged in one piece by an overlay commit (memory stays flat however many users changed)."""


def _merge(
    store: StateStore,
    source: Source,
    bits: int,
    parts: Mapping[int, Path],
    batches: pl.DataFrame,
    refused: pl.DataFrame,
    settings: SnapshotSettings,
    builder: Any,
    captured: bool = False,
) -> tuple[int, int]:
    """Merge one source's confirmed changes; returns ``(users updated, users in the state)``.

    A delta small beside the state (at most :data:`COMPACT_SHARE` of its rows) becomes an overlay segment: only
    the users it touches are read (the ID filter pushed into the Parquet reader) and written, a few key ranges at a
    time. A larger one (a first load, a full refresh) rewrites the base range by range. Past its share the
    overlay is folded into a new base. ``captured``: the diff kept the state rows of the delta's users beside
    each part (``NNNNN.state.parquet``) and the state was not written since: they are merged into instead of
    reading the state again."""
    base = store.base_rows(source)
    sizes = {r: pq.ParquetFile(p).metadata.num_rows for r, p in parts.items()}
    if base == 0 or sum(sizes.values()) > COMPACT_SHARE * base:
        counter = [0]
        ranges = _merged_ranges(store, source, bits, parts, batches, refused, settings, builder, counter)
        rows = store.write(source, ranges, settings)
        return counter[0], rows
    pieces: list[pl.DataFrame] = []
    updated = added = removed = 0
    chunk: list[int] = []
    order = sorted(parts)
    for i, r in enumerate(order):
        chunk.append(r)
        if i + 1 < len(order) and sum(sizes[c] for c in chunk) + sizes[order[i + 1]] <= MERGE_CHUNK_ROWS:
            continue
        delta = conform_delta(
            source, pl.concat([pl.read_parquet(parts[c]) for c in chunk], how="vertical_relaxed")
        )
        lo, hi = key_range(chunk[0], bits)[0], key_range(chunk[-1], bits)[1]
        done, chunk = chunk, []
        conf = _confirmations(source, delta, batches, refused, builder)
        attempted = _attempted(source, delta, batches, refused, builder)
        if conf.is_empty() and attempted.is_empty():
            continue
        ids = pl.concat([conf.get_column(EXT_ID), attempted.get_column(EXT_ID)]).unique()
        if captured:
            kept = [parts[c].with_name(parts[c].stem + ".state.parquet") for c in done]
            before = conform(
                pl.concat([pl.read_parquet(k) for k in kept], how="vertical_relaxed"),
                state_schema(source, settings),
            ).join(ids.to_frame(EXT_ID), on=EXT_ID, how="semi")
        else:
            before = store.users(source, lo, hi, ids, settings)
        changed = changed_rows(source, before, delta, conf, settings, attempted)
        existed = changed.get_column(EXT_ID).is_in(before.get_column(EXT_ID).implode())
        gone = changed.get_column(DELETED)
        added += int((~existed & ~gone).sum())
        removed += int((existed & gone).sum())
        updated += ids.len()
        pieces.append(changed)
    users = store.rows(source) + added - removed
    if not pieces:
        return 0, users
    overlay_rows = store.append(source, pl.concat(pieces), users, settings)
    if overlay_rows > COMPACT_SHARE * base or store.segment_count(source) > MAX_SEGMENTS:
        rbits = range_bits(max(users, base))
        ranges = (store.slice(source, *key_range(r, rbits), settings) for r in range(1 << rbits))
        users = store.write(source, ranges, settings)
    return updated, users


def _merged_ranges(
    store: StateStore,
    source: Source,
    bits: int,
    parts: Mapping[int, Path],
    batches: pl.DataFrame,
    refused: pl.DataFrame,
    settings: SnapshotSettings,
    builder: Any,
    counter: list[int],
) -> Iterator[pl.DataFrame]:
    """The new state, key range by key range (ranges without delta are copied); counts users touched."""
    for r in range(1 << bits):
        lo, hi = key_range(r, bits)
        state = store.slice(source, lo, hi, settings)
        if r not in parts:
            yield state
            continue
        delta = conform_delta(source, pl.read_parquet(parts[r]))
        conf = _confirmations(source, delta, batches, refused, builder)
        attempted = _attempted(source, delta, batches, refused, builder)
        counter[0] += pl.concat([conf.get_column(EXT_ID), attempted.get_column(EXT_ID)]).n_unique()
        yield apply_confirmed(source, state, delta, conf, settings, attempted)


def recover(
    store: StateStore,
    sources: Sequence[Source],
    ledger: Any,
    settings: SnapshotSettings | None = None,
    *,
    builder: Any = None,
) -> list[CommitReport]:
    """Commit every pending run left by a crash (oldest first): what the ledger confirmed enters the state.

    A recovered run still marked ``running`` in the ledger died: it is marked ``interrupted`` (exit code 4), so
    ``pushsync runs`` does not show it as running forever. Call it holding the job's lock: a diff that a killed
    run never finished (no ``meta.json``: nothing of it was sent) is removed first.
    """
    reports = []
    store.remove_unfinished_diffs()
    for directory in store.pending():
        report = commit(store, sources, directory, ledger, settings, builder=builder)
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
