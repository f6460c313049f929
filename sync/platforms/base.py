"""The platform seam: :class:`Platform` (one object per platform, found through :class:`Registry`), the
:class:`BatchBuilder` it makes for a job, and the :class:`PlatformClient` that sends its batches.

Everything the rest of pushsync knows about a platform goes through these three protocols; nothing outside a
platform's own package says ``if platform == "netmera"``. Adding a platform is one package under
``sync/platforms/`` with an object satisfying :class:`Platform`, plus one entry in :mod:`sync.platforms.registry`
(a test registers a fake one on a private :class:`Registry` and runs plan, run, resume and retry with it).

The data path through the seam::

    clean frames (polars, one hash bucket of rows)          -- sync.planning.planning
        └─ BatchBuilder.stream_batches(stream, frames, …)   -- the platform's builder: frames in, Batch out
              └─ PlatformClient.send(batch)                 -- the platform's client: one request per batch
                    └─ SendOutcome | FatalPlatformError | RetryableError | RejectedBatchError

A builder sees whole polars frames, never single rows, so it may build request bodies as columns (``struct
.json_encode``, ``concat_str``) and hand the dispatcher a :class:`sync.records.Batch` whose ``body`` is already
the encoded request ``bytes``; a client sends a ``bytes`` body as it is. Netmera's builder does (issue 13, with
:mod:`sync.platforms._encode` for the JSON text and :mod:`sync.platforms._batches` for the cutting); builders not
yet converted return JSON-ready objects that their client encodes. :func:`sync.records.body_json` reads either.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sync.config import Job, PlatformLimits, Source
from sync.errors import JobProblem
from sync.records import Batch, Operation, Phase

if TYPE_CHECKING:
    import polars as pl

__all__ = [
    "DELTA_DELETE",
    "DELTA_TAGS_ADDED",
    "DELTA_TAGS_REMOVED",
    "DELTA_UNSET",
    "GROUP",
    "PAYLOAD",
    "BatchBuilder",
    "ConnectionCheck",
    "Platform",
    "PlatformClient",
    "Registry",
    "SendOutcome",
    "SnapshotBuilder",
    "SnapshotStream",
    "Stream",
    "snapshot_builder",
    "unknown_settings",
]

GROUP = "__group"
"""Column of a stream's selected rows (:meth:`SnapshotStream.select`): the request group a row goes into — the
tag of a tag request — or ``""`` when the stream has one group."""
PAYLOAD = "__payload"
"""Column of a stream's selected rows: the value the row sends (an attribute struct, a category name, …)."""

# The snapshot delta (sync.state): a delta frame holds the source's own columns (only new or changed values, null
# where nothing changes) plus these four; a snapshot builder's streams read them.
DELTA_UNSET = "__unset"
"""List of attribute names to unset for the user."""
DELTA_TAGS_ADDED = "__tags_added"
"""List of tags to add."""
DELTA_TAGS_REMOVED = "__tags_removed"
"""List of tags to remove."""
DELTA_DELETE = "__delete"
"""True: delete the user (the job's removal action for a user who left the export)."""


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """A successful answer: the HTTP status, how long it took and the platform's response body (parsed)."""

    http_status: int
    latency: float
    body: object = None
    remaining: int | None = None
    """The server's ``X-RateLimit-Remaining``, when it sent one (rate budgets pause at 0)."""
    reset_after: float | None = None
    """Seconds until the platform's own rate window resets, when the connector knows it and ``remaining`` is
    0: the budget pauses that long instead of until its own (maybe shorter) period ends."""


@runtime_checkable
class PlatformClient(Protocol):
    """Sends batches to one platform.

    ``send`` returns a :class:`SendOutcome` on success and otherwise raises exactly one of
    :class:`sync.errors.FatalPlatformError` (abort the run), :class:`sync.errors.RetryableError` (back off and
    retry) or :class:`sync.errors.RejectedBatchError` (record; split to isolate bad records).
    """

    platform: str

    async def send(self, batch: Batch) -> SendOutcome: ...

    def split(self, batch: Batch) -> tuple[Batch, Batch] | None:
        """Halve a batch by its external IDs, or None when it cannot be split further (one ID)."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ConnectionCheck(Protocol):
    """A client that can check its key and base URL with one harmless request (``pushsync doctor``)."""

    async def check(self) -> str:
        """Send one request that changes nothing; return what was checked. Raises
        :class:`sync.errors.FatalPlatformError` for a refused key or a wrong URL (401/403/404, a redirect) and
        :class:`sync.errors.RetryableError` when the server is unreachable or answers 5xx."""
        ...


class Stream(Protocol):
    """The requests of one operation from one source, as a builder describes them to the planner."""

    @property
    def operation(self) -> Operation: ...

    @property
    def phase(self) -> Phase: ...

    @property
    def endpoint(self) -> str: ...

    @property
    def columns(self) -> tuple[str, ...]:
        """The clean-frame columns the stream reads (besides ``__ext_id``, ``__file``, ``__row``)."""
        ...


class BatchBuilder(Protocol):
    """Turns a job's clean frames into batches: made per job by :meth:`Platform.builder`.

    Frames arrive in the planner's canonical order, each holding every row of its IDs; the same frames must
    always give the same batches with the same content-derived IDs (resume depends on it).

    Two optional hooks the planner uses when a builder has them: ``check_rows(source, clean, file_name) ->
    (clean, rejects)`` refuses rows valid in general that this platform cannot take (rejected rows at plan time,
    not refused requests later), and a stream's ``rank`` orders its lane within a phase (lower first). A platform
    with snapshot mode also gives ``snapshot_streams(source)``: the streams of the source's snapshot delta frames
    (:mod:`sync.state`), used with ``stream_batches`` like the planner's.
    """

    def streams_for(self, source: Source) -> Sequence[Stream]:
        """The streams of one source, in send order within a phase."""
        ...

    def stream_batches(
        self, stream: Any, frames: Iterable[pl.DataFrame], batch_size: int, files: Sequence[str]
    ) -> Iterator[Batch]:
        """The batches of ``stream``: at most ``batch_size`` IDs each; ``files`` resolves ``__file``."""
        ...

    def stream_counts(self, stream: Any, frames: Iterable[pl.DataFrame], batch_size: int) -> tuple[int, int]:
        """``(requests, ids)`` :meth:`stream_batches` would give, for the plan's summary."""
        ...

    def stream_sample(self, stream: Any, frames: Iterable[pl.DataFrame]) -> Any | None:
        """A request body from the stream's first few IDs (shown by ``pushsync plan``), or None when empty."""
        ...


class SnapshotStream(Stream, Protocol):
    """A stream of a snapshot delta: :mod:`sync.state` also maps confirmed batches back to the delta rows they
    carried, through :meth:`select`."""

    def select(self, frame: pl.DataFrame, items: bool = True) -> pl.DataFrame:
        """The rows of ``frame`` this stream sends: ``__ext_id, __file, __row``, :data:`GROUP` and, when
        ``items``, the rows' encoded item text (rows of one ID adjacent, in the frame's order) — the rows
        ``stream_batches`` cuts into batches. ``items=False`` skips the encoding (IDs and groups suffice)."""
        ...


@runtime_checkable
class SnapshotBuilder(BatchBuilder, Protocol):
    """A builder of a platform with ``snapshot_mode``: besides :class:`BatchBuilder`, the streams a source's
    snapshot *delta* frames make (the source's columns plus :data:`DELTA_UNSET`, :data:`DELTA_TAGS_ADDED`,
    :data:`DELTA_TAGS_REMOVED` and :data:`DELTA_DELETE`), in send order within a phase. Batches of these streams
    are made with the builder's own ``stream_batches``, ``stream_counts`` and ``stream_sample``."""

    def snapshot_streams(self, source: Source) -> Sequence[SnapshotStream]: ...

    def batch_group(self, batch: Batch) -> str:
        """The :data:`GROUP` of a batch of a snapshot stream (the tag of a tag request; ``""`` for a stream
        of one group): the run's batch map records it, so the commit finds the delta rows a batch carried."""
        ...


def snapshot_builder(builder: BatchBuilder) -> SnapshotBuilder | None:
    """``builder`` when it can build snapshot deltas (it has ``snapshot_streams``), else None."""
    return builder if isinstance(builder, SnapshotBuilder) else None


class Platform(Protocol):
    """One platform: everything pushsync needs to know about it, in one object.

    * ``name``, ``limits`` (largest batch, one-user endpoints, default budgets and budget groups),
      ``snapshot_mode`` and :meth:`job_problems` — what the job loader checks (:class:`sync.config.PlatformRules`);
    * :meth:`builder` — frames in, batches out, bound to one job's settings (with ``snapshot_mode``, a
      :class:`SnapshotBuilder`: :mod:`sync.state` makes a snapshot run's requests through it);
    * :meth:`client` — the connector that sends them (aiohttp stays inside the platform's package);
    * :meth:`restrict` — a batch cut down to some of its IDs (``pushsync retry`` resends only the refused ones;
      the client's ``split`` halves a refused batch to isolate them in the first place);
    * ``non_idempotent`` — operations that change the platform again when repeated (resume holds them back);
    * ``sandbox`` — the dotted name of its local emulator's module (named, never imported: the emulators depend on
      the platform layer, not the other way round).
    """

    @property
    def name(self) -> str: ...

    @property
    def limits(self) -> PlatformLimits: ...

    @property
    def snapshot_mode(self) -> bool: ...

    @property
    def non_idempotent(self) -> frozenset[Operation]: ...

    @property
    def sandbox(self) -> str | None: ...

    def job_problems(self, sources: Sequence[Source], extra: Mapping[str, str]) -> list[JobProblem]: ...

    def builder(self, job: Job) -> BatchBuilder: ...

    def client(self, job: Job, api_key: str) -> PlatformClient: ...

    def restrict(self, batch: Batch, ext_ids: Iterable[str]) -> Batch | None:
        """``batch`` cut down to the items naming ``ext_ids`` (with a new content-derived ID), ``batch`` itself
        when it names no other ID, None when it names none of them."""
        ...


class _Deferred:
    """A platform registered by the function that imports it (:meth:`Registry.defer`)."""

    __slots__ = ("load",)

    def __init__(self, load: Callable[[], Platform]) -> None:
        self.load = load


class Registry:
    """The platforms a job may name, by name: the one place that lists them (:mod:`sync.platforms.registry`).

    A platform may be registered by name with a function that imports it (:meth:`defer`): a run imports only
    the platform its job names, not every platform's request shapes (and what they import) at start-up.
    """

    __slots__ = ("_platforms",)

    def __init__(self, platforms: Iterable[Platform] = ()) -> None:
        self._platforms: dict[str, Platform | _Deferred] = {}  # name → platform, in registration order
        for platform in platforms:
            self.register(platform)

    def register(self, platform: Platform) -> None:
        """Add ``platform``; a second platform of the same name is a programming error."""
        if platform.name in self._platforms:
            raise ValueError(f"platform {platform.name!r} is already registered")
        self._platforms[platform.name] = platform

    def defer(self, name: str, load: Callable[[], Platform]) -> None:
        """Add the platform ``name`` that ``load`` imports and returns, the first time it is asked for."""
        if name in self._platforms:
            raise ValueError(f"platform {name!r} is already registered")
        self._platforms[name] = _Deferred(load)

    def get(self, name: str) -> Platform | None:
        found = self._platforms.get(name)
        if not isinstance(found, _Deferred):
            return found
        platform = found.load()  # an import: two threads asking at once get the same module's object
        if platform.name != name:
            raise ValueError(f"platform {name!r} loads as {platform.name!r}")
        self._platforms[name] = platform
        return platform

    def __getitem__(self, name: str) -> Platform:
        platform = self.get(name)
        if platform is None:
            raise KeyError(name)
        return platform

    def names(self) -> tuple[str, ...]:
        return tuple(self._platforms)

    @contextlib.contextmanager
    def registered(self, platform: Platform) -> Iterator[Platform]:
        """``platform`` registered for the duration of a ``with`` block (a test's fake platform)."""
        self.register(platform)
        try:
            yield platform
        finally:
            del self._platforms[platform.name]


def unknown_settings(extra: Mapping[str, str], known: Iterable[str], platform: str) -> list[JobProblem]:
    """A problem for each ``destination.extra`` key the platform does not read: a misspelt setting
    (``event_time_zon``) would otherwise be ignored without a word and its default used, for every row."""
    names = sorted(known)
    problems = []
    for key in sorted(set(extra) - set(names)):
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        problems.append(
            JobProblem(
                f"destination.extra.{key}",
                f"{platform} has no such setting; {hint}it reads {', '.join(names)}",
            )
        )
    return problems
