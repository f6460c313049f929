"""Resume and retry, on top of the ledger.

Batch IDs are content hashes (each platform's ``batch_id_for``): planning the same input again
gives the same batches with the same IDs, so "what is left of run R" is "the batches of a new plan that no run
since R has confirmed". Two modes:

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

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sync.errors import StateError
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


@dataclass(slots=True)
class ReplayStats:
    """What a replay did with the batches of the new plan."""

    sent: int = 0
    skipped_confirmed: int = 0
    skipped_refused: int = 0
    held: int = 0
    """Non-idempotent batches with an unknown outcome, not resent (``pushsync retry`` sends them)."""
    cut_to_refused: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "skipped_confirmed": self.skipped_confirmed,
            "skipped_refused": self.skipped_refused,
            "held": self.held,
            "cut_to_refused": self.cut_to_refused,
        }


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
    platform: Platform | None = None
    """The platform the runs sent to: it cuts a refused batch down to its refused IDs and names the operations
    that must not be repeated blindly."""

    def _restrict(self, batch: Batch, ext_ids: Iterable[str]) -> Batch | None:
        if self.platform is None:
            raise StateError(
                f"run {self.run_id} does not record its platform: cannot cut its refused batches"
            )
        return self.platform.restrict(batch, ext_ids)

    def _non_idempotent(self, batch: Batch) -> bool:
        ops = self.platform.non_idempotent if self.platform is not None else NON_IDEMPOTENT
        return batch.operation in ops

    def decide(self, batch: Batch, stats: ReplayStats | None = None) -> Batch | None:
        """The batch to send in place of ``batch`` (itself, or cut down to its refused IDs), or None to skip it."""
        stats = stats if stats is not None else ReplayStats()
        bid = batch.batch_id
        if bid in self.confirmed:
            stats.skipped_confirmed += 1
            return None
        if bid in self.refused:
            if self.mode is ReplayMode.RESUME:
                stats.skipped_refused += 1
                return None
            cut = self._restrict(batch, self.refused[bid])
            if cut is None:
                stats.skipped_confirmed += 1
                return None
            stats.cut_to_refused += 1
            stats.sent += 1
            return cut
        if self.mode is ReplayMode.RESUME and bid in self.unknown and self._non_idempotent(batch):
            stats.held += 1
            return None
        stats.sent += 1
        return batch


def replay_plan(
    ledger: Any, run_id: str, mode: ReplayMode = ReplayMode.RESUME, *, platform: Platform | None = None
) -> ReplayPlan:
    """Read what ``run_id``, the unfinished runs just before it and every later run of its job did.
    ``ledger``: a :class:`sync.ledger.Ledger`; ``platform``: the job's (default: the one the ledger recorded).

    Later runs count too: resuming a run twice must not resend what the first resume confirmed, and a batch
    confirmed by any later run holds the same content (the ID is a hash of it). Earlier unfinished runs count
    because ``run_id`` may itself be a resume that skipped what they had confirmed.
    """
    info = ledger.run(run_id)
    if info is None:
        raise StateError(f"no run {run_id} in {ledger.path}")
    ordered = sorted(ledger.runs(info.job), key=lambda r: (r.started_at, r.run_id))
    start = next(i for i, r in enumerate(ordered) if r.run_id == run_id)
    # A run that resumed an unfinished one skipped what that one had confirmed, so its own ledger rows are not
    # the whole story: go back through the unfinished runs before it.
    while start > 0 and ordered[start - 1].status in UNFINISHED_STATUSES:
        start -= 1
    runs = [r.run_id for r in ordered[start:]]
    confirmed: set[str] = set()
    unknown: set[str] = set()
    rejected: set[str] = set()
    for rid in runs:
        for row in ledger.batches(rid):
            status = str(row.status)
            if status == BatchStatus.OK.value:
                confirmed.add(row.batch_id)
            elif status in _UNKNOWN:
                unknown.add(row.batch_id)
            elif status == BatchStatus.REJECTED.value:
                rejected.add(row.batch_id)
    refused: dict[str, set[str]] = {}
    for rid in runs:
        for batch_id, ext_id, _code, _message in ledger.refused_ids(rid):
            if batch_id in rejected and batch_id not in confirmed:
                refused.setdefault(batch_id, set()).add(ext_id)
    return ReplayPlan(
        mode=mode,
        run_id=run_id,
        runs=tuple(sorted(runs)),
        confirmed=frozenset(confirmed),
        unknown=frozenset(unknown - confirmed),
        refused={k: frozenset(v) for k, v in refused.items()},
        platform=platform if platform is not None else REGISTRY.get(info.platform or ""),
    )


def replay(batches: Iterable[Batch], plan: ReplayPlan, stats: ReplayStats | None = None) -> Iterator[Batch]:
    """The batches of a new plan that ``plan`` says to send (see :meth:`ReplayPlan.decide`)."""
    for batch in batches:
        chosen = plan.decide(batch, stats)
        if chosen is not None:
            yield chosen


@dataclass(frozen=True, slots=True)
class ReplayLanes:
    """A plan's per-endpoint lanes (:meth:`sync.planning.Plan.lanes`) with :func:`replay` applied to each, so a
    resumed run is sent like a fresh one: every endpoint of a phase at once (a :class:`sync.dispatch.LaneSource`).

    ``stats`` is shared by the lanes; the dispatcher pulls from one lane at a time, so the counts add up.
    """

    plan: Any
    """The :class:`sync.planning.Plan`."""
    decisions: ReplayPlan
    stats: ReplayStats | None = None

    def lanes(self, phase: Phase) -> list[tuple[str, Iterator[Batch]]]:
        return [
            (endpoint, replay(batches, self.decisions, self.stats))
            for endpoint, batches in self.plan.lanes(phase)
        ]

    def lane_rank(self, phase: Phase, endpoint: str) -> int:
        """The plan's rank for the lane (:meth:`sync.planning.Plan.lane_rank`): a resume keeps the order."""
        return int(self.plan.lane_rank(phase, endpoint))


def restrict_batch(batch: Batch, ext_ids: Iterable[str], platform: Platform) -> Batch | None:
    """``batch`` cut down to the items of ``ext_ids`` (a new content-derived ID), or None if it names none; the
    cutting is the platform's (:meth:`sync.platforms.base.Platform.restrict`)."""
    return platform.restrict(batch, ext_ids)


def unfinished_run(ledger: Any, job: str) -> str | None:
    """The run a new ``pushsync run`` of ``job`` should resume: the oldest of the runs since the last finished
    one, if the newest run did not finish (crashed, interrupted or aborted); else None."""
    found = None
    for info in ledger.runs(job):  # newest first
        if info.status not in UNFINISHED_STATUSES:
            break
        found = info.run_id
    return found
