"""Resume and retry, on top of the ledger.

Batch IDs are content hashes (each platform's ``batch_id_for``): planning the same input again
gives the same batches with the same IDs, so "what is left of run R" is "the batches of a new plan that no run
since R has confirmed" — nor any run R replayed: each run made by resume or retry records its ``origin``, and
:func:`replay_plan` follows that chain back (a resume of an interrupted retry of a ``partial`` run counts what the
partial run confirmed). Runs recorded for another destination (one job file serving staging and production)
never count, and are never resumed automatically (:func:`unfinished_run`). Two modes:

* **resume** (``pushsync resume RUN``, and ``pushsync run`` after a run that did not finish): send what the ledger
  has not confirmed — batches never sent, batches that failed, batches whose answer was lost in a crash — but
  *not* a non-idempotent batch (``fireEvents``, ``pushProfileAttributes``) that may already have been applied
  (recorded ``sent`` or ``failed``: its outcome is unknown); those are *held* and reported. A refused batch
  (400) is not resent either: its refused rows need a fix first.
* **retry** (``pushsync retry RUN``): after the user fixed the cause, replay everything resume would, plus the held
  batches, plus the refused IDs of refused batches (each such batch cut down to its refused IDs).

Snapshot jobs need neither list: their state holds only confirmed changes, so after :func:`sync.state.recover`
merged a crashed run's confirmations, a fresh diff *is* the resume (and the retry). The orchestrator
(:func:`sync.run.run`) chooses between these batch sources.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import polars as pl

from sync.errors import StateError
from sync.planning.row_keys import ROW_KEY, unpack
from sync.planning.row_keys import SCHEME as ROW_KEY_SCHEME
from sync.planning.validation import EXT_ID
from sync.platforms.base import Platform
from sync.platforms.registry import REGISTRY
from sync.records import NON_IDEMPOTENT, Batch, BatchStatus, Phase

__all__ = [
    "NON_IDEMPOTENT",
    "UNFINISHED_STATUSES",
    "ReplayLanes",
    "ReplayMode",
    "ReplayPlan",
    "ReplayStats",
    "replay",
    "replay_plan",
    "restrict_batch",
    "unfinished_run",
]

# NON_IDEMPOTENT (defined with the operations in sync.records) is re-exported here for resume's callers.

UNFINISHED_STATUSES: frozenset[str] = frozenset({"running", "interrupted", "aborted"})
"""Ledger run statuses of a run that did not get through its plan (``running`` forever means it crashed)."""

_UNKNOWN = frozenset({BatchStatus.SENT.value, BatchStatus.FAILED.value})


class ReplayMode(StrEnum):
    RESUME = "resume"
    RETRY = "retry"


_STATS_LOCK = threading.Lock()
"""Guards :meth:`ReplayStats.add` (one lock for every stats object: the records stay plain dataclasses, which
``dataclasses.asdict`` copies; the increments are far too few for contention to matter)."""


@dataclass(slots=True)
class ReplayStats:
    """What a replay did with the batches (and the non-idempotent rows) of the new plan."""

    sent: int = 0
    skipped_confirmed: int = 0
    skipped_refused: int = 0
    held: int = 0
    """Non-idempotent batches with an unknown outcome, not resent (``pushsync retry`` sends them)."""
    cut_to_refused: int = 0
    rows_confirmed: int = 0
    """Non-idempotent rows (events, pushes) a run confirmed: never sent again, whatever else changed."""
    rows_held: int = 0
    """Non-idempotent rows sent without a known outcome: held by resume (``pushsync retry`` sends them)."""
    rows_refused: int = 0
    """Non-idempotent rows the platform refused: resume leaves them (``pushsync retry`` sends them)."""
    ids_deleted: int = 0
    """IDs left out of the batches of earlier phases because a run of the chain deleted the user (each batch
    counts its own; one naming only such IDs is not sent): sent now, they would re-create the user."""
    rows_deleted: int = 0
    """Non-idempotent rows (events, pushes) left out for the same reason."""

    def add(self, **counts: int) -> None:
        """Add to the named counts, atomically: one stats object is shared by a run's lanes, whose batches are
        pulled (and their rows filtered) in threads of their own at the same time."""
        with _STATS_LOCK:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def to_json(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "skipped_confirmed": self.skipped_confirmed,
            "skipped_refused": self.skipped_refused,
            "held": self.held,
            "cut_to_refused": self.cut_to_refused,
            "rows_confirmed": self.rows_confirmed,
            "rows_held": self.rows_held,
            "rows_refused": self.rows_refused,
            "ids_deleted": self.ids_deleted,
            "rows_deleted": self.rows_deleted,
        }


# Row classes of a non-idempotent row a run recorded (lower wins when runs disagree). A row of a rejected batch
# whose ID was not refused counts as confirmed; a refused one counts as rejected, or as planned when a retry
# after the run that recorded it was asked to send it (_ROW_REJECTED_RETRIED).
_ROW_CONFIRMED, _ROW_REJECTED, _ROW_UNKNOWN, _ROW_PLANNED, _ROW_REJECTED_RETRIED = 0, 1, 2, 3, 4
_ROW_CLASS = {
    BatchStatus.OK.value: _ROW_CONFIRMED,
    BatchStatus.REJECTED.value: _ROW_REJECTED,
    BatchStatus.SENT.value: _ROW_UNKNOWN,
    BatchStatus.FAILED.value: _ROW_UNKNOWN,
    BatchStatus.PLANNED.value: _ROW_PLANNED,
}
_RETRIED_CLASS = {_ROW_UNKNOWN: _ROW_PLANNED, _ROW_REJECTED: _ROW_REJECTED_RETRIED}
"""Row classes of a run before a retry in the replayed run's chain: the retry sends what it left unknown or refused."""
_ROWS_SCHEMA: dict[str, Any] = {ROW_KEY: pl.UInt64, "__batch": pl.UInt32, "__class": pl.UInt8}
_REFUSED_SCHEMA: dict[str, Any] = {"__batch": pl.UInt32, EXT_ID: pl.String}


def _empty_rows() -> pl.DataFrame:
    return pl.DataFrame(schema=_ROWS_SCHEMA)


def _empty_refused() -> pl.DataFrame:
    return pl.DataFrame(schema=_REFUSED_SCHEMA)


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """What the ledger knows about a run and every later run of the same job, batch ID by batch ID."""

    mode: ReplayMode
    run_id: str
    runs: tuple[str, ...]
    confirmed: frozenset[str]
    """Batch IDs some run confirmed (``ok``)."""
    unknown: frozenset[str]
    """Batch IDs sent (or failed after being sent) and never confirmed: the platform may have applied them."""
    refused: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Batch ID → the external IDs the platform refused in it (batches recorded ``rejected``)."""
    retried_refused: frozenset[str] = frozenset()
    """Refused batches a retry in the chain of the run replayed was asked to send again (cut down to their refused
    IDs): a resume of that retry sends them too, as the retry would have."""
    platform: Platform | None = None
    """The platform the runs sent to: it cuts a refused batch down to its refused IDs and names the operations
    that must not be repeated blindly."""
    rows: pl.DataFrame = field(default_factory=_empty_rows)
    """Non-idempotent rows the runs recorded: ``__row_key``, the batch that carried it (``__batch``, an index)
    and the batch's outcome as a row class (confirmed, rejected, unknown, planned)."""
    refused_rows: pl.DataFrame = field(default_factory=_empty_refused)
    """``(__batch, __ext_id)``: the IDs refused in the rejected keyed batches."""
    deleted: frozenset[str] = frozenset()
    """External IDs the runs deleted (a deletions batch answered ``ok``, or ``rejected`` without refusing that
    ID). A run sends deletions last, so that nothing re-creates a deleted user; a replay sends these IDs nothing
    of an earlier phase (a failed update sent after the deletion would bring the user back)."""
    deleted_column: pl.Series = field(default_factory=lambda: pl.Series(EXT_ID, [], pl.String))
    """:attr:`deleted` as a column, made once: the keyed frames of a plan are filtered with it chunk by chunk."""

    def _restrict(self, batch: Batch, ext_ids: Iterable[str]) -> Batch | None:
        if self.platform is None:
            raise StateError(
                f"run {self.run_id} does not record its platform: cannot cut its refused batches"
            )
        return self.platform.restrict(batch, ext_ids)

    def _cut_to_refused(self, batch: Batch) -> Batch | None:
        """``batch`` cut down to the IDs still refused, or None when it names none of them.

        A retry sends a refused batch's cut under an ID of its own (a hash of the cut's content), so the runs
        after it recorded the *cut*, not the batch: follow the cuts while a later run refused them again (each
        cut is smaller), so that the caller can skip a cut a later run confirmed and a cut refused in part is
        cut down once more, instead of every retry sending the first cut again."""
        seen: set[str] = set()
        cut: Batch | None = batch
        while cut is not None and cut.batch_id in self.refused and cut.batch_id not in seen:
            seen.add(cut.batch_id)  # a cut naming only refused IDs is the batch itself: stop there
            cut = self._restrict(cut, self.refused[cut.batch_id])
        return cut

    def _non_idempotent(self, batch: Batch) -> bool:
        ops = self.platform.non_idempotent if self.platform is not None else NON_IDEMPOTENT
        return batch.operation in ops

    def keep_rows(self, frame: pl.DataFrame, stats: ReplayStats | None = None) -> pl.DataFrame:
        """The rows of a keyed clean frame (a non-idempotent stream's, :mod:`sync.planning.row_keys`) still to send.

        A row a run confirmed is never sent again — also when other rows were added, removed or reordered
        since, which changes every batch (and batch ID) around it. Resume also leaves rows sent without a known
        outcome (held) and rows the platform refused; retry sends those. In a rejected batch, the rows of the
        IDs not refused count as confirmed.
        """
        stats = stats if stats is not None else ReplayStats()
        frame = self._without_deleted_rows(frame, stats)
        if self.rows.is_empty() or frame.is_empty():
            return frame
        indexed = frame.with_row_index("__i")
        refused = self.refused_rows.with_columns(pl.lit(True).alias("__refused"))
        row_class = pl.col("__class")
        hits = (
            indexed.select("__i", EXT_ID, ROW_KEY)
            .join(self.rows, on=ROW_KEY, how="inner")
            .join(refused, on=["__batch", EXT_ID], how="left")
            .with_columns(
                pl.when(
                    row_class.is_in([_ROW_REJECTED, _ROW_REJECTED_RETRIED])
                    & ~pl.col("__refused").fill_null(False)
                )
                .then(pl.lit(_ROW_CONFIRMED, pl.UInt8))
                .when(row_class == _ROW_REJECTED_RETRIED)
                .then(pl.lit(_ROW_PLANNED, pl.UInt8))
                .otherwise(row_class)
                .alias("__class")
            )
            .group_by("__i")
            .agg(pl.col("__class").min())
        )
        counts = dict(hits.group_by("__class").len().iter_rows())
        skip = {_ROW_CONFIRMED}
        if self.mode is ReplayMode.RESUME:
            stats.add(
                rows_confirmed=counts.get(_ROW_CONFIRMED, 0),
                rows_refused=counts.get(_ROW_REJECTED, 0),
                rows_held=counts.get(_ROW_UNKNOWN, 0),
            )
            skip |= {_ROW_REJECTED, _ROW_UNKNOWN}
        else:
            stats.add(rows_confirmed=counts.get(_ROW_CONFIRMED, 0))
        dropped = hits.filter(pl.col("__class").is_in(list(skip))).select("__i")
        return indexed.join(dropped, on="__i", how="anti").sort("__i").drop("__i")

    def _without_deleted_rows(self, frame: pl.DataFrame, stats: ReplayStats) -> pl.DataFrame:
        """``frame`` without the rows of users the runs deleted (keyed rows are dropped before batches are cut,
        so that the batches keep their rows' keys)."""
        if not self.deleted or frame.is_empty():
            return frame
        kept = frame.filter(~pl.col(EXT_ID).is_in(self.deleted_column.implode()))
        if kept.height < frame.height:
            stats.add(rows_deleted=frame.height - kept.height)
        return kept

    def _without_deleted(self, batch: Batch, stats: ReplayStats) -> Batch | None:
        """``batch`` without the IDs the runs deleted (None when it names nothing else); deletions as they are."""
        if not self.deleted or batch.phase is Phase.DELETIONS:
            return batch
        keep = [x for x in batch.ext_ids if x not in self.deleted]
        if len(keep) == len(batch.ext_ids):
            return batch
        stats.add(ids_deleted=len(batch.ext_ids) - len(keep))
        return self._restrict(batch, keep) if keep else None

    def decide(self, batch: Batch, stats: ReplayStats | None = None) -> Batch | None:
        """The batch to send in place of ``batch`` (itself, or cut down to its refused IDs, or to the IDs the
        runs did not delete), or None to skip it."""
        stats = stats if stats is not None else ReplayStats()
        bid = batch.batch_id
        if bid in self.confirmed:
            stats.add(skipped_confirmed=1)
            return None
        if bid in self.refused:
            if self.mode is ReplayMode.RESUME and bid not in self.retried_refused:
                stats.add(skipped_refused=1)
                return None
            cut = self._cut_to_refused(batch)
            if cut is None or cut.batch_id in self.confirmed:
                stats.add(skipped_confirmed=1)
                return None
            cut = self._without_deleted(cut, stats)
            if cut is None:
                return None
            stats.add(cut_to_refused=1, sent=1)
            return cut
        if self.mode is ReplayMode.RESUME and bid in self.unknown and self._non_idempotent(batch):
            stats.add(held=1)
            return None
        chosen = self._without_deleted(batch, stats)
        if chosen is not None:
            stats.add(sent=1)
        return chosen


def replay_plan(
    ledger: Any, run_id: str, mode: ReplayMode = ReplayMode.RESUME, *, platform: Platform | None = None
) -> ReplayPlan:
    """Read what ``run_id``, the runs it replayed (its chain of origins), the unfinished runs just before each of
    them and every later run of its job did, on its destination.
    ``ledger``: a :class:`sync.ledger.ledger.Ledger`; ``platform``: the job's (default: the one the ledger recorded).

    Later runs count too: resuming a run twice must not resend what the first resume confirmed, and a batch
    confirmed by any later run holds the same content (the ID is a hash of it). Earlier runs count because
    ``run_id`` may itself be a resume or a retry that skipped what they had confirmed: the run it replayed (its
    recorded ``origin``), the one *that* replayed, and so on — whatever their status (a retry is made of a
    ``partial`` run, which no walk through unfinished runs reaches) — and the unfinished runs before each (a
    resume counted them too; ledgers older than schema 6 record no origin, and this is all there is to go by).
    Runs recorded for another destination (:attr:`sync.ledger.ledger.RunInfo.destination`) never count: what
    staging confirmed is not on production.
    """
    info = ledger.run(run_id)
    if info is None:
        raise StateError(f"no run {run_id} in {ledger.path}")
    ordered = [
        r
        for r in sorted(ledger.runs(info.job), key=lambda r: (r.started_at, r.run_id))
        if _same_destination(r.destination, info.destination)
    ]
    index = {r.run_id: i for i, r in enumerate(ordered)}
    start = index[run_id]
    chain = {run_id}
    # The newest retry in the chain: it was asked to send what the runs before it left held or refused.
    retry_at: int | None = None
    at: str | None = run_id
    while at is not None:
        if retry_at is None and ordered[index[at]].origin_mode == ReplayMode.RETRY.value:
            retry_at = index[at]
        # A run that resumed an unfinished one skipped what that one had confirmed, so its own ledger rows are
        # not the whole story: go back through the unfinished runs before it...
        i = index[at]
        while i > 0 and ordered[i - 1].status in UNFINISHED_STATUSES:
            i -= 1
        start = min(start, i)
        # ...and to the run it replayed (which skipped what *its* origin confirmed, and so on).
        at = ordered[index[at]].origin
        if at is None or at in chain or at not in index:  # none, a loop, or another job's or destination's
            break
        chain.add(at)
    runs = [r.run_id for r in ordered[start:]]
    # Resuming a retry finishes the retry: what the runs before it left held (outcome unknown) or refused, the
    # user asked it to send (`pushsync retry`); only what it, and the runs after it, left unknown is held.
    retried = frozenset(r.run_id for r in ordered[start:retry_at]) if retry_at is not None else frozenset()
    confirmed: set[str] = set()
    unknown: set[str] = set()
    rejected: set[str] = set()
    rejected_before: set[str] = set()  # rejected by a run before the retry
    for rid in runs:
        for row in ledger.batches(rid):
            status = str(row.status)
            if status == BatchStatus.OK.value:
                confirmed.add(row.batch_id)
            elif status in _UNKNOWN:
                if rid not in retried:
                    unknown.add(row.batch_id)
            elif status == BatchStatus.REJECTED.value:
                (rejected_before if rid in retried else rejected).add(row.batch_id)
    retried_refused = rejected_before - rejected
    rejected |= rejected_before
    refused: dict[str, set[str]] = {}
    deleted: set[str] = set()
    for rid in runs:
        refused_here = ledger.refused_ids(rid)
        for batch_id, ext_id, _code, _message in refused_here:
            if batch_id in rejected and batch_id not in confirmed:
                refused.setdefault(batch_id, set()).add(ext_id)
        deleted |= _deleted_ids(ledger, rid, refused_here)
    rows, refused_rows = _recorded_rows(ledger, runs, retried)
    return ReplayPlan(
        mode=mode,
        run_id=run_id,
        runs=tuple(sorted(runs)),
        confirmed=frozenset(confirmed),
        unknown=frozenset(unknown - confirmed),
        refused={k: frozenset(v) for k, v in refused.items()},
        retried_refused=frozenset(retried_refused & refused.keys()),
        platform=platform if platform is not None else REGISTRY.get(info.platform or ""),
        rows=rows,
        refused_rows=refused_rows,
        deleted=frozenset(deleted),
        deleted_column=pl.Series(EXT_ID, sorted(deleted), pl.String),
    )


def _deleted_ids(ledger: Any, run_id: str, refused: Iterable[tuple[str, str, Any, Any]]) -> set[str]:
    """The external IDs ``run_id`` deleted: those of its deletion batches the platform answered, but the IDs it
    refused in them."""
    refused_in: dict[str, set[str]] = {}
    for batch_id, ext_id, _code, _message in refused:
        refused_in.setdefault(batch_id, set()).add(ext_id)
    deleted: set[str] = set()
    for batch_id, _status, ext_ids in ledger.answered_ids(run_id, Phase.DELETIONS):
        deleted.update(set(ext_ids) - refused_in.get(batch_id, set()))
    return deleted


def _recorded_rows(
    ledger: Any, runs: Iterable[str], retried: frozenset[str] = frozenset()
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The non-idempotent rows ``runs`` recorded (:attr:`ReplayPlan.rows`) and the IDs refused in their
    rejected batches (:attr:`ReplayPlan.refused_rows`). The rows of ``retried`` runs (before a retry in the chain
    of the run replayed) that they left unknown or refused are the retry's to send: classed as planned."""
    runs = list(runs)
    batch_index: dict[tuple[str, str], int] = {}
    classes: list[int] = []
    counts: list[int] = []
    blobs: list[bytes] = []
    for run, batch_id, status, scheme, blob in ledger.batch_rows(runs):
        if scheme != ROW_KEY_SCHEME:
            raise StateError(
                f"run {run} recorded its events and pushes with row keys of {scheme}; this pushsync computes "
                f"them with {ROW_KEY_SCHEME}, so it cannot tell which were confirmed. Resume with the version "
                "that made the run, or `pushsync retry RUN --full-refresh` to send everything again"
            )
        batch_index[(run, batch_id)] = len(blobs)
        row_class = _ROW_CLASS.get(str(status), _ROW_PLANNED)
        if run in retried:
            row_class = _RETRIED_CLASS.get(row_class, row_class)
        classes.append(row_class)
        counts.append(len(blob) // 8)
        blobs.append(bytes(blob))
    if not blobs:
        return _empty_rows(), _empty_refused()
    per_batch = pl.DataFrame(
        {"__batch": range(len(blobs)), "__class": classes, "__n": counts},
        schema={"__batch": pl.UInt32, "__class": pl.UInt8, "__n": pl.UInt32},
    )
    rows = (
        per_batch.select(pl.col("__batch", "__class").repeat_by("__n"))
        .explode("__batch", "__class")
        .with_columns(unpack(blobs))
        .select(ROW_KEY, "__batch", "__class")
    )
    refused: list[tuple[int, str]] = []
    for run in runs:
        for batch_id, ext_id, _code, _message in ledger.refused_ids(run):
            index = batch_index.get((run, batch_id))
            if index is not None:
                refused.append((index, ext_id))
    refused_rows = (
        pl.DataFrame(refused, schema=_REFUSED_SCHEMA, orient="row") if refused else _empty_refused()
    )
    return rows, refused_rows


def replay(batches: Iterable[Batch], plan: ReplayPlan, stats: ReplayStats | None = None) -> Iterator[Batch]:
    """The batches of a new plan that ``plan`` says to send (see :meth:`ReplayPlan.decide`)."""
    for batch in batches:
        chosen = plan.decide(batch, stats)
        if chosen is not None:
            yield chosen


@dataclass(frozen=True, slots=True)
class ReplayLanes:
    """A plan's per-endpoint lanes (:meth:`sync.planning.planning.Plan.lanes`) with :func:`replay` applied to each, so a
    resumed run is sent like a fresh one: every endpoint of a phase at once (a :class:`sync.dispatch.dispatch.LaneSource`).

    ``stats`` is shared by the lanes, whose batches the dispatcher pulls in a thread per lane at the same time
    (and whose rows :meth:`ReplayPlan.keep_rows` filters in their builders' threads): it counts atomically.
    """

    plan: Any
    """The :class:`sync.planning.planning.Plan`."""
    decisions: ReplayPlan
    stats: ReplayStats | None = None

    def lanes(self, phase: Phase) -> list[tuple[str, Iterator[Batch]]]:
        def keep_rows(frame: pl.DataFrame) -> pl.DataFrame:
            return self.decisions.keep_rows(frame, self.stats)

        return [
            (endpoint, replay(batches, self.decisions, self.stats))
            for endpoint, batches in self.plan.lanes(phase, keep_rows=keep_rows)
        ]

    def lane_rank(self, phase: Phase, endpoint: str) -> int:
        """The plan's rank for the lane (:meth:`sync.planning.planning.Plan.lane_rank`): a resume keeps the order."""
        return int(self.plan.lane_rank(phase, endpoint))


def restrict_batch(batch: Batch, ext_ids: Iterable[str], platform: Platform) -> Batch | None:
    """``batch`` cut down to the items of ``ext_ids`` (a new content-derived ID), or None if it names none; the
    cutting is the platform's (:meth:`sync.platforms.base.Platform.restrict`)."""
    return platform.restrict(batch, ext_ids)


def unfinished_run(ledger: Any, job: str, destination: str | None = None) -> str | None:
    """The run a new ``pushsync run`` of ``job`` should resume: the oldest of the runs since the last finished
    one, if the newest run did not finish (crashed, interrupted or aborted); else None.

    ``destination`` (:attr:`sync.config.Destination.key`): only runs that sent there (or recorded no
    destination: an older pushsync's) count — one job file serving staging and production (``base_url`` from
    the environment) has one name and one ledger, and what staging confirmed is not on production."""
    found = None
    for info in ledger.runs(job):  # newest first
        if destination is not None and not _same_destination(info.destination, destination):
            continue
        if info.status not in UNFINISHED_STATUSES:
            break
        found = info.run_id
    return found


def _same_destination(theirs: str | None, ours: str | None) -> bool:
    """Whether a run recorded for ``theirs`` sent where ``ours`` sends (:func:`sync.config.same_destination`)."""
    from sync.config import same_destination

    return same_destination(theirs, ours)
