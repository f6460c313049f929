"""Typed, frozen records passed between pipeline stages: operations, batches and their results.

These are the contracts between the planner (which makes :class:`Batch` objects), the dispatcher (which sends
them through a :class:`sync.platforms.base.PlatformClient`) and the ledger (which records :class:`BatchResult`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, overload

__all__ = [
    "NON_IDEMPOTENT",
    "Attempt",
    "AttemptOutcome",
    "Batch",
    "BatchResult",
    "BatchStatus",
    "ExtIds",
    "Operation",
    "Phase",
    "RejectedId",
    "RejectedRow",
    "RowRef",
    "body_json",
]


class Operation(StrEnum):
    """What a batch does to the users it names. Values are stable: they are stored in the ledger."""

    TAG = "tag"
    UNTAG = "untag"
    SET_ATTRIBUTES = "set_attributes"
    UNSET_ATTRIBUTES = "unset_attributes"
    PUSH_ATTRIBUTES = "push_attributes"
    PULL_ATTRIBUTES = "pull_attributes"
    SET_CATEGORIES = "set_categories"
    ENABLE_PUSH = "enable_push"
    DISABLE_PUSH = "disable_push"
    ENABLE_EMAIL = "enable_email"
    DISABLE_EMAIL = "disable_email"
    ENABLE_SMS = "enable_sms"
    DISABLE_SMS = "disable_sms"
    UPDATE_EMAIL = "update_email"
    UPDATE_MSISDN = "update_msisdn"
    FIRE_EVENTS = "fire_events"
    DELETE_USERS = "delete_users"
    SEND_PUSH = "send_push"
    """One push notification to one user (Forms On Fire "POST Push API")."""


NON_IDEMPOTENT: frozenset[Operation] = frozenset(
    {Operation.FIRE_EVENTS, Operation.PUSH_ATTRIBUTES, Operation.SEND_PUSH}
)
"""Operations that change the platform again when repeated (an event recorded twice, a value appended twice, a
push delivered twice). The dispatcher commits their ``sent`` record before the request goes out, and resume holds
back those whose outcome is unknown. Every other operation sets a value, a tag or a flag: repeating it is safe."""


class Phase(IntEnum):
    """Send order. Every batch of a phase completes before the next phase starts.

    Opt-outs go first, so a user who opted out never receives a message triggered by another change of the same
    run; deletions go last, so nothing re-creates a user after it was deleted.
    """

    OPT_OUT = 0
    CHANGES = 1
    DELETIONS = 2


@dataclass(frozen=True, slots=True)
class RowRef:
    """Where a value came from in the user's own files: path and 1-based data row number (header excluded)."""

    path: str
    row: int


class ExtIds(Sequence[str]):
    """A batch's external IDs, kept as their UTF-8 text joined by line breaks (one ``bytes`` object, not one
    Python string per ID): the form the columnar builders cut from an Arrow buffer and the ledger stores
    (:meth:`lines`, :func:`sync.ledger.ledger.pack_ids`).

    An immutable ``Sequence[str]``: ``len``, ``[0]`` and ``[-1]`` read the bytes alone; any other read splits
    them into strings once (kept). Equal to a tuple — or another :class:`ExtIds` — with the same IDs in the same
    order, and hashed like that tuple; a slice is a tuple. No ID may hold a line break (:meth:`of` checks; a
    builder whose IDs do uses a tuple instead).
    """

    __slots__ = ("_lines", "_n", "_strings")

    def __init__(self, lines: bytes, n: int) -> None:
        """``lines``: ``n`` IDs' UTF-8 text joined by ``\\n`` (the caller vouches that no ID holds one)."""
        if n < 0 or (n == 0 and lines):
            raise ValueError(f"{n} IDs cannot be {len(lines)} bytes")
        self._lines = bytes(lines)
        self._n = n
        self._strings: tuple[str, ...] | None = None

    @classmethod
    def of(cls, ext_ids: Iterable[str]) -> ExtIds:
        """The IDs ``ext_ids`` in this form; :class:`ValueError` if one holds a line break."""
        ids = tuple(ext_ids)
        if any("\n" in x for x in ids):
            raise ValueError("an external ID holds a line break")
        return cls("\n".join(ids).encode("utf-8"), len(ids))

    def lines(self) -> bytes:
        """The IDs' UTF-8 text joined by ``\\n`` (``"\\n".join(ids).encode()``, made without a string per ID)."""
        return self._lines

    def joined(self, other: ExtIds) -> ExtIds:
        """These IDs followed by ``other``'s."""
        if not other._n:
            return self
        if not self._n:
            return other
        return ExtIds(b"\n".join((self._lines, other._lines)), self._n + other._n)

    def _all(self) -> tuple[str, ...]:
        if self._strings is None:
            self._strings = tuple(self._lines.decode("utf-8").split("\n")) if self._n else ()
        return self._strings

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...

    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        if isinstance(index, slice):
            return self._all()[index]
        if self._strings is None and self._n:
            # The first and last IDs (a state delta's bounds) without splitting the rest.
            if index in (0, -self._n):
                return self._lines.partition(b"\n")[0].decode("utf-8")
            if index in (-1, self._n - 1):
                return self._lines.rpartition(b"\n")[2].decode("utf-8")
        return self._all()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __contains__(self, value: object) -> bool:
        return value in self._all()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ExtIds):
            return self._n == other._n and self._lines == other._lines
        if isinstance(other, tuple):
            return self._all() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._all())

    def __repr__(self) -> str:
        return f"ExtIds({self._all()!r})"

    def __reduce__(self) -> tuple[type[ExtIds], tuple[bytes, int]]:
        return ExtIds, (self._lines, self._n)


@dataclass(frozen=True, slots=True)
class Batch:
    """One request to a platform, ready to serialise.

    ``batch_id`` is stable: the same input always gives the same batches with the same IDs (a content hash), which
    resume and the ledger depend on. ``body`` is the request body: the encoded ``bytes`` a columnar builder made
    (canonical JSON for Netmera and NotifyVisitors, sent as they are, never encoded again, and hashed for
    ``batch_id``; for Forms On Fire the push in the job's body format, JSON or XML elements, which its client
    sends with the credentials spliced in), or a JSON-ready object (a platform's own test double), which its
    client encodes; code that needs a JSON body as an object on a cold path (a plan's sample, a split, a trace, a
    test) reads it with :func:`body_json` (Forms On Fire's XML with ``push_of``). ``ext_ids`` are the unique
    external IDs the request touches (at most the platform's limit), in order: a tuple, or an :class:`ExtIds`
    (a columnar builder's: one ``bytes`` object, not a string per ID) — read them as a ``Sequence[str]``.
    ``origins`` maps an external ID to the input row that produced its value, so failures can be explained in
    terms of the user's rows (may be empty; a columnar builder's is lazy — built from the batch's row columns on
    first read, which only refused IDs cause). ``after``
    orders it behind another batch. ``row_keys``: for a non-idempotent operation planned from input rows, the
    stable keys of the rows it carries (:mod:`sync.planning.row_keys`, 8 bytes each), which the ledger keeps so a resume
    confirms rows, not batches.
    """

    batch_id: str
    endpoint: str
    operation: Operation
    body: Any
    ext_ids: Sequence[str]
    phase: Phase = Phase.CHANGES
    origins: Mapping[str, RowRef] = field(default_factory=dict)
    after: str | None = None
    """The ``batch_id`` of an earlier batch of the same plan that must be finished before this one is sent
    (its items continue that batch's per-user sequence, e.g. one user's events in file order); None when the
    batch may go in parallel with any other. A predecessor this run does not send (a resume skipped it) is no
    constraint."""
    row_keys: bytes = b""


def body_json(batch: Batch) -> Any:
    """The batch's body as a JSON-ready object: encoded ``bytes`` parsed (a cold path: plan samples, splitting a
    refused batch, traces, tests), an object body as it is."""
    body = batch.body
    if isinstance(body, bytes | bytearray | memoryview):
        return json.loads(bytes(body))
    return body


class BatchStatus(StrEnum):
    """Ledger state machine of a batch: planned → sent → ok | rejected | failed."""

    PLANNED = "planned"
    SENT = "sent"
    OK = "ok"
    REJECTED = "rejected"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RejectedId:
    """An external ID the platform refused, with the platform's code and message."""

    ext_id: str
    code: int | str | None
    message: str
    origin: RowRef | None = None


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The final outcome of one batch (after retries and splitting)."""

    batch_id: str
    endpoint: str
    operation: Operation
    status: BatchStatus
    attempts: int
    http_status: int | None = None
    code: int | str | None = None
    message: str = ""
    ok_ids: int = 0
    rejected: Sequence[RejectedId] = ()
    started_at: float = 0.0
    finished_at: float = 0.0
    confirmed_rows: bytes = b""
    """A non-idempotent batch split on a 400 that did not end ``ok``: the row keys (:mod:`sync.planning.row_keys`)
    of the parts the platform did confirm, so that a retry does not send their events again with the rest."""


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """An input row refused by validation before anything was sent."""

    path: str
    row: int
    column: str | None
    reason: str
    ext_id: str | None = None


class AttemptOutcome(StrEnum):
    """How one HTTP attempt ended. Values are stable: they are stored in the ledger's ``attempts`` table."""

    OK = "ok"
    RATE_LIMITED = "rate_limited"
    """429: the endpoint's budget pauses; the attempt is retried."""
    RETRYABLE = "retryable"
    """5xx, time-out or dropped connection: retried with backoff."""
    REJECTED = "rejected"
    """400 and other 4xx: the content was refused (the batch is split to isolate the refused IDs)."""
    FATAL = "fatal"
    """401/403 and the like: the run aborts."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One HTTP request the dispatcher made for a (sub-)batch: what the run report's charts and the metrics
    are built from. ``attempt`` counts from 1 within the (sub-)batch; above 1 it is a retry. ``latency`` is in
    seconds; ``http_status`` is None when no answer came (time-out, dropped connection)."""

    batch_id: str
    endpoint: str
    attempt: int
    n_ids: int
    latency: float
    outcome: AttemptOutcome
    http_status: int | None = None
    message: str = ""

    @property
    def retry(self) -> bool:
        return self.attempt > 1
