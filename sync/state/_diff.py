"""The differ: one key range of the export against the same range of the confirmed state (pure)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import polars as pl

from sync.config import RemovalAction, SnapshotSettings, Source
from sync.planning.validation import EXT_ID, FILE, KEY, clean_schema
from sync.sources.reading import ROW
from sync.state._store import (
    DELETE,
    TAGS,
    TAGS_ADDED,
    TAGS_REMOVED,
    UNCERTAIN,
    UNSET,
    FieldKind,
    Layers,
    conform,
    managed_fields,
    state_schema,
    tag_columns,
)


@dataclass(frozen=True, slots=True)
class DiffCounts:
    """What a diff found (summed over ranges and sources)."""

    users_current: int = 0
    users_state: int = 0
    users_new: int = 0
    users_changed: int = 0
    users_left: int = 0
    """Users of the state missing from the export (not counting :attr:`users_held`)."""
    users_removed: int = 0
    """Users that left the export and get the removal action (untag or delete)."""
    users_held: int = 0
    """Users of the state missing from the clean export because their row was rejected: state kept, not removed."""
    removals_held: int = 0
    """Users missing from the export not removed because a rejected row names no user (it may be any of them)."""
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

    @property
    def removal_share(self) -> float:
        """:attr:`users_removed` as a share of the users a removal could still change: the state's users but
        those who left earlier and hold nothing left to remove (untagged by an earlier run, or ``removal: none``).

        ``max_removal_share`` is checked against it. Of the whole state, years of users untagged and kept there
        outgrew the live ones, and a truncated export untagging every live user passed the threshold."""
        live = self.users_state - self.users_left + self.users_removed
        return self.users_removed / max(live, 1)

    def to_json(self) -> dict[str, int]:
        out = dataclasses.asdict(self)
        out["users_unchanged"] = self.users_unchanged
        return out


def empty_list() -> pl.Expr:
    """An empty string list (the value of a missing list, so set operations see no nulls)."""
    return pl.lit([], pl.List(pl.String))


def none_if_empty(expr: pl.Expr) -> pl.Expr:
    """``expr``, or null where the list is empty (null means \"nothing to send\" in a delta)."""
    return pl.when(expr.list.len() > 0).then(expr)


def _fingerprint(expr: pl.Expr, is_list: bool) -> pl.Expr:
    """A u64 standing for a value in the comparison: equal values give equal fingerprints. A list is taken as
    a set: the wrapping sum of its elements' hashes, so order does not matter (a duplicate changes it: a false
    alarm, settled by the exact comparison)."""
    if is_list:
        return expr.list.eval(pl.element().hash()).list.sum().fill_null(0)
    return expr.hash()


def _id_hash(expr: pl.Expr) -> pl.Expr:
    """The ID's part of a signature (a function of its own, so a test can make two IDs collide)."""
    return expr.hash()


_MIX = 0x9E3779B97F4A7C15
"""Odd multiplier of the signature's polynomial (wrapping u64 arithmetic): a change of one value always
changes the signature, since multiplying by an odd number is a bijection modulo 2**64."""


def _signatures(source: Source, settings: SnapshotSettings) -> tuple[pl.Expr, pl.Expr]:
    """The u64 *signature* of a user's row, on the export side and on the state side: the hashes of the ID and
    of every managed value (lists as sets, the tag columns as one set) combined as a polynomial. Equal rows
    give equal signatures on both sides; different rows almost surely (2**-64) different ones.

    A null in the export means "no change" for most fields, whatever the state holds; a signature cannot say
    that, so such a row (a value emptied in the export but kept in the state) differs and goes to the exact
    comparison, which finds nothing to send."""
    fields = managed_fields(source, settings)
    current: list[pl.Expr] = [_id_hash(pl.col(EXT_ID))]
    state: list[pl.Expr] = [_id_hash(pl.col(EXT_ID))]
    for f in fields:
        is_list = f.kind in (FieldKind.APPEND, FieldKind.REMOVE)
        current.append(_fingerprint(pl.col(f.column), is_list))
        # The same type on both sides: a hash depends on it.
        state.append(_fingerprint(pl.col(f.name).cast(f.dtype), is_list))
    tag_cols = tag_columns(source)
    if tag_cols:
        tags = pl.concat_list([pl.col(c).fill_null(empty_list()) for c in tag_cols])
        current.append(_fingerprint(tags, True))
        state.append(_fingerprint(pl.col(TAGS), True))
    # An uncertain state row never matches: its user goes to the exact comparison, which sends every value.
    current.append(pl.lit(0, pl.UInt64))
    state.append(pl.col(UNCERTAIN).fill_null(False).cast(pl.UInt64))

    def combine(hashes: list[pl.Expr]) -> pl.Expr:
        acc = hashes[0]
        for h in hashes[1:]:
            acc = acc * pl.lit(_MIX, pl.UInt64) + h
        return acc.alias("__sig")

    return combine(current), combine(state)


def _unchanged_skipped(
    source: Source,
    current: pl.DataFrame,
    st: pl.DataFrame,
    settings: SnapshotSettings,
    live: pl.DataFrame | None = None,
    replaced: pl.Series | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, int] | None:
    """Drop the users whose row certainly did not change, before the exact comparison.

    Each side's rows get a 64-bit signature (:func:`_signatures`: the ID and every managed value); an export
    row whose signature the state holds, and that state row, are the same user with the same values — two
    membership tests over one u64 column per side, no join and no string or list copied. Because a signature
    could collide, the matched users are checked exactly: both frames are in canonical order, so the matched
    rows of both sides must name the same IDs in the same order (one string comparison); when they do not (a
    collision, or frames not in canonical order) this returns None and the exact comparison takes every row.
    Returns ``(current rows to compare, state rows to compare, users skipped)``, or None when nothing is
    skipped.

    With an overlay (:class:`sync.state._store.Layers`), ``st`` is the base, ``live`` the overlay's rows and
    ``replaced`` marks the base rows it supersedes: those base rows match nothing, the overlay's rows are
    compared exactly (they are few), the rest line up with the base as it is — no merged copy of the state is
    made.
    """
    if current.is_empty() or st.is_empty():
        return None
    c_expr, s_expr = _signatures(source, settings)
    c_sig = current.select(c_expr).to_series()
    s_sig = st.select(s_expr).to_series()
    if replaced is not None and replaced.any():
        same_c = c_sig.is_in(s_sig.filter(~replaced).implode())
        same_s = s_sig.is_in(c_sig.implode()) & ~replaced
    else:
        replaced = None
        same_c = c_sig.is_in(s_sig.implode())
        same_s = s_sig.is_in(c_sig.implode())
    skipped = int(same_c.sum())
    if skipped == 0:
        return None
    # The exact check of the match: the same users, one to one, in the same (canonical) order.
    if int(same_s.sum()) != skipped or not current.get_column(EXT_ID).filter(same_c).equals(
        st.get_column(EXT_ID).filter(same_s)
    ):
        return None
    # Gathered by position (a few percent of the rows), not filtered by mask: a mask filter copies-scans every
    # wide column, a gather touches only the rows taken.
    keep_s = ~same_s if replaced is None else ~(same_s | replaced)
    old = st[keep_s.arg_true()]
    if live is not None and live.height:
        old = pl.concat([old, live], how="vertical_relaxed")
    return current[(~same_c).arg_true()], old, skipped


def diff_frames(
    source: Source,
    current: pl.DataFrame,
    state: pl.DataFrame | Layers | None,
    settings: SnapshotSettings | None = None,
    *,
    full_refresh: bool = False,
    left_file: int = -1,
    held: pl.DataFrame | None = None,
    hold_removals: bool = False,
) -> tuple[pl.DataFrame, DiffCounts]:
    """Compare one key range of the export's clean frame with the same range of the confirmed state.

    ``current`` has ``__key, __ext_id, __file, __row`` and the source's mapped columns (typed, one row per user);
    ``state`` the :func:`state_schema` columns (None: no state yet), or the range's :class:`Layers` (base and
    overlay apart, as :meth:`sync.state.StateStore.layers` reads them). Returns the **delta** — one row per user with
    something to send, in canonical order: the source's columns holding only new or changed values (null where
    nothing changes), plus ``__unset`` (attribute names to unset), ``__tags_added``, ``__tags_removed`` and
    ``__delete``; users that left the export carry ``__file = left_file`` — and the counts.
    ``full_refresh`` ignores the state: every current value is sent, every empty unset-attribute is unset.
    ``held``: IDs (``__ext_id``, unique) whose rows were rejected — such a user missing from ``current`` keeps
    the state as it is, with no removal; ``hold_removals``: no user missing from ``current`` is removed (a
    rejected row names no user, so any of them may be in it).
    """
    delta, counts, _ = diff_and_state(
        source,
        current,
        state,
        settings,
        full_refresh=full_refresh,
        left_file=left_file,
        held=held,
        hold_removals=hold_removals,
    )
    return delta, counts


def diff_and_state(
    source: Source,
    current: pl.DataFrame,
    state: pl.DataFrame | Layers | None,
    settings: SnapshotSettings | None = None,
    *,
    full_refresh: bool = False,
    left_file: int = -1,
    held: pl.DataFrame | None = None,
    hold_removals: bool = False,
) -> tuple[pl.DataFrame, DiffCounts, pl.DataFrame | None]:
    """:func:`diff_frames`, and the state rows of the users in the delta (what the commit merges their
    confirmed changes into: kept with the delta, it need not read the state again); None with ``full_refresh``."""
    settings = settings or SnapshotSettings()
    schema = state_schema(source, settings)
    layered = state if isinstance(state, Layers) else None
    if full_refresh:
        st = conform(None, schema)
    elif layered is not None:
        st = conform(layered.base, schema)
    else:
        st = conform(state, schema)  # type: ignore[arg-type]
    narrowed = None
    if not full_refresh:
        narrowed = (
            _unchanged_skipped(source, current, st, settings)
            if layered is None
            else _unchanged_skipped(
                source, current, st, settings, conform(layered.live, schema), layered.replaced
            )
        )
    if narrowed is None:
        if layered is not None and not full_refresh:
            st = conform(layered.merged(), schema)
        delta, counts = _diff_exact(
            source, current, st, settings, full_refresh, left_file, held, hold_removals
        )
        return delta, counts, None if full_refresh else _rows_of(st, delta)
    cur, old, skipped = narrowed
    delta, counts = _diff_exact(source, cur, old, settings, full_refresh, left_file, held, hold_removals)
    # The users skipped are in the export and in the state, unchanged.
    return delta, counts + DiffCounts(users_current=skipped, users_state=skipped), _rows_of(old, delta)


def _rows_of(state: pl.DataFrame, delta: pl.DataFrame) -> pl.DataFrame:
    """The rows of ``state`` naming a user of ``delta``, in canonical order."""
    return state.join(delta.select(EXT_ID), on=EXT_ID, how="semi").sort([KEY, EXT_ID])


def _diff_exact(
    source: Source,
    current: pl.DataFrame,
    st: pl.DataFrame,
    settings: SnapshotSettings,
    full_refresh: bool,
    left_file: int,
    held: pl.DataFrame | None,
    hold_removals: bool,
) -> tuple[pl.DataFrame, DiffCounts]:
    """The comparison itself, per field, on ``current`` and the conformed state rows ``st``."""
    fields = managed_fields(source, settings)
    schema = state_schema(source, settings)
    tag_cols = tag_columns(source)
    cur_cols = [pl.col(KEY), pl.col(EXT_ID), pl.col(FILE), pl.col(ROW)]
    cur_cols += [pl.col(f.column).alias(f"c:{f.name}") for f in fields]
    if tag_cols:
        # A set, compared with set operations only: sorting lists row by row is slow in polars.
        tags = pl.concat_list([pl.col(c).fill_null(empty_list()) for c in tag_cols])
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
    if held is not None and held.height:
        lazy = lazy.join(
            held.lazy().select(EXT_ID).with_columns(pl.lit(True).alias("__held")), on=EXT_ID, how="left"
        )
    else:
        lazy = lazy.with_columns(pl.lit(None, pl.Boolean).alias("__held"))
    present = pl.col(FILE).is_not_null()
    known = pl.col("__known").fill_null(False)
    # A user whose last requests' outcome is unknown: every value of the export is sent, equal or not.
    uncertain = pl.col(f"s:{UNCERTAIN}").fill_null(False)
    # Missing from the export because its row was rejected is not "left the export": the user keeps their state.
    absent_held = ~present & pl.col("__held").fill_null(False)

    out: dict[str, pl.Expr] = {}
    unset_names: list[pl.Expr] = []
    for f in fields:
        c, s = pl.col(f"c:{f.name}"), pl.col(f"s:{f.name}")
        if f.kind in (FieldKind.APPEND, FieldKind.REMOVE):
            new = pl.when(uncertain).then(c).otherwise(c.list.set_difference(s.fill_null(empty_list())))
            out[f.column] = pl.when(present & c.is_not_null()).then(none_if_empty(new))
            continue
        out[f.column] = pl.when(present & c.is_not_null() & (c.ne_missing(s) | uncertain)).then(c)
        if f.kind is FieldKind.SET and f.unset:
            in_state = s.is_not_null() | pl.lit(full_refresh) | uncertain
            unset_names.append(pl.when(present & c.is_null() & in_state).then(pl.lit(f.attribute)))
    out[UNSET] = (
        none_if_empty(pl.concat_list(unset_names).list.drop_nulls())
        if unset_names
        else pl.lit(None, pl.List(pl.String))
    )
    leaver = ~present & ~pl.col("__held").fill_null(False) & pl.lit(not hold_removals)
    if tag_cols:
        ct, stt = pl.col(f"c:{TAGS}"), pl.col(f"s:{TAGS}").fill_null(empty_list())
        added = pl.when(uncertain).then(ct).otherwise(ct.list.set_difference(stt))
        out[TAGS_ADDED] = pl.when(present).then(none_if_empty(added))
        gone = none_if_empty(stt.list.set_difference(ct))
        if settings.removal is RemovalAction.UNTAG:
            out[TAGS_REMOVED] = pl.when(present).then(gone).when(leaver).then(none_if_empty(stt))
        else:
            out[TAGS_REMOVED] = pl.when(present).then(gone)
    else:
        out[TAGS_ADDED] = out[TAGS_REMOVED] = pl.lit(None, pl.List(pl.String))
    removing = settings.removal is not RemovalAction.NONE and not full_refresh
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
        total(~present & ~pl.col("__held").fill_null(False)).alias("users_left"),
        total(leaver & pl.col("__changed")).alias("users_removed"),
        total(absent_held).alias("users_held"),
        total(~present & ~pl.col("__held").fill_null(False) & pl.lit(hold_removals and removing)).alias(
            "removals_held"
        ),
        total(of_kind(FieldKind.SET)).alias("values_set"),
        pl.col(f"d:{UNSET}").list.len().sum().alias("values_unset"),
        total(of_kind(FieldKind.APPEND, FieldKind.REMOVE)).alias("values_appended"),
        pl.col(f"d:{TAGS_ADDED}").list.len().sum().alias("tags_added"),
        pl.col(f"d:{TAGS_REMOVED}").list.len().sum().alias("tags_removed"),
        total(of_kind(FieldKind.FLAG, FieldKind.CATEGORY)).alias("opt_in_changes"),
        total(of_kind(FieldKind.CONTACT)).alias("contact_updates"),
    ).row(0, named=True)
    counts = DiffCounts(**{k: int(v or 0) for k, v in stats.items()})
    delta_types = {**clean_schema(source), **DELTA_EXTRA}
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


DELTA_EXTRA: dict[str, Any] = {
    UNSET: pl.List(pl.String),
    TAGS_ADDED: pl.List(pl.String),
    TAGS_REMOVED: pl.List(pl.String),
    DELETE: pl.Boolean,
}


def conform_delta(source: Source, delta: pl.DataFrame) -> pl.DataFrame:
    """A pending delta read back for the job as it is now: a column the job maps since the delta was written
    reads as "no change" (the job's mapping may change between a crash and its recovery)."""
    wanted = {**clean_schema(source), **DELTA_EXTRA}
    missing = [pl.lit(None, dtype).alias(name) for name, dtype in wanted.items() if name not in delta.columns]
    return delta.with_columns(missing) if missing else delta
