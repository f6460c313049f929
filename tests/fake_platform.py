"""A whole platform in a page: what adding one takes (a :class:`sync.platforms.base.Platform` and a registry
entry), used by ``tests/test_platform_registry.py``.

Its one endpoint upserts users' attributes; its builder builds each request body as bytes with polars (the shape
the columnar data plane takes), and its client keeps what it accepted in memory and refuses the IDs it is told to.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from sync.config import Job, PlatformLimits, RateBudgetSpec, Source, SourceKind
from sync.errors import JobProblem, RejectedBatchError, RetryableError
from sync.platforms.base import BatchBuilder, PlatformClient, SendOutcome
from sync.records import Batch, Operation, Phase, RowRef

ENDPOINT = "upsert"


@dataclass(frozen=True, slots=True)
class FakeStream:
    columns: tuple[str, ...]
    names: tuple[str, ...]
    operation: Operation = Operation.SET_ATTRIBUTES
    phase: Phase = Phase.CHANGES
    endpoint: str = ENDPOINT


def _ids_of(body: bytes) -> list[str]:
    return [item["id"] for item in json.loads(body)["users"]]


def make_batch(body: bytes, origins: Mapping[str, RowRef]) -> Batch:
    ids = tuple(_ids_of(body))
    return Batch(
        batch_id=hashlib.sha256(body).hexdigest()[:16],  # content-derived, as resume needs
        endpoint=ENDPOINT,
        operation=Operation.SET_ATTRIBUTES,
        body=body,
        ext_ids=ids,
        origins={x: origins[x] for x in ids if x in origins},
    )


class FakeBuilder:
    def streams_for(self, source: Source) -> Sequence[FakeStream]:
        return [
            FakeStream(
                tuple(a.column for a in source.attributes), tuple(a.attribute for a in source.attributes)
            )
        ]

    def _bodies(
        self, stream: FakeStream, frame: pl.DataFrame, size: int
    ) -> Iterator[tuple[bytes, pl.DataFrame]]:
        items = frame.select(
            "__ext_id",
            "__file",
            "__row",
            pl.struct(
                pl.col("__ext_id").alias("id"),
                *(pl.col(c).alias(n) for c, n in zip(stream.columns, stream.names, strict=True)),
            )
            .struct.json_encode()
            .alias("item"),
        )
        for chunk in items.iter_slices(size):
            joined = chunk.select(pl.col("item").str.join(","))["item"][0]
            yield f'{{"users":[{joined}]}}'.encode(), chunk

    def stream_batches(
        self, stream: Any, frames: Iterable[pl.DataFrame], batch_size: int, files: Sequence[str]
    ) -> Iterator[Batch]:
        for frame in frames:
            for body, chunk in self._bodies(stream, frame, batch_size):
                origins = {
                    x: RowRef(files[f], r)
                    for x, f, r in chunk.select("__ext_id", "__file", "__row").iter_rows()
                }
                yield make_batch(body, origins)

    def stream_counts(self, stream: Any, frames: Iterable[pl.DataFrame], batch_size: int) -> tuple[int, int]:
        heights = [f.height for f in frames]
        return sum(-(-h // batch_size) for h in heights), sum(heights)

    def stream_sample(self, stream: Any, frames: Iterable[pl.DataFrame]) -> Any | None:
        for frame in frames:
            for body, _ in self._bodies(stream, frame.head(3), 3):
                return json.loads(body)
        return None


@dataclass
class FakeServer:
    """What the fake platform holds and was sent: ``users`` accepted, ``requests`` (the IDs of every request)."""

    refuse: set[str] = field(default_factory=set)
    fail_once: set[str] = field(default_factory=set)
    """IDs whose first request answers like a 503 (retried by the dispatcher)."""
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[list[str]] = field(default_factory=list)


class FakeClient:
    platform = "fake"

    def __init__(self, server: FakeServer) -> None:
        self._server = server

    async def send(self, batch: Batch) -> SendOutcome:
        assert isinstance(batch.body, bytes)  # the client sends the builder's bytes as they are
        items = json.loads(batch.body)["users"]
        self._server.requests.append([item["id"] for item in items])
        if bad := [i["id"] for i in items if i["id"] in self._server.refuse]:
            raise RejectedBatchError(f"refused {len(bad)} user(s)", status=400, code="bad-user")
        if again := [i["id"] for i in items if i["id"] in self._server.fail_once]:
            self._server.fail_once -= set(again)
            raise RetryableError("busy", status=503)
        for item in items:
            self._server.users[item["id"]] = {k: v for k, v in item.items() if k != "id"}
        return SendOutcome(http_status=200, latency=0.0)

    def split(self, batch: Batch) -> tuple[Batch, Batch] | None:
        return FAKE.split(batch)

    async def aclose(self) -> None:
        return None


class FakePlatform:
    name = "fake"
    limits = PlatformLimits(
        max_batch=10, default_batch_size=10, default_budgets={"*": RateBudgetSpec(requests=1000, period=1.0)}
    )
    snapshot_mode = False
    non_idempotent: frozenset[Operation] = frozenset()
    sandbox = None

    def __init__(self) -> None:
        self.server = FakeServer()

    def job_problems(self, sources: Sequence[Source], extra: Mapping[str, str]) -> list[JobProblem]:
        return [
            JobProblem(f"sources[{i}].kind", "fake takes users sources")
            for i, s in enumerate(sources)
            if s.kind is not SourceKind.USERS
        ]

    def builder(self, job: Job) -> BatchBuilder:
        return FakeBuilder()

    def client(self, job: Job, api_key: str) -> PlatformClient:
        return FakeClient(self.server)

    def _rebuild(self, batch: Batch, keep: frozenset[str]) -> Batch:
        items = [i for i in json.loads(batch.body)["users"] if i["id"] in keep]
        body = json.dumps({"users": items}, separators=(",", ":")).encode()
        return make_batch(body, batch.origins)

    def restrict(self, batch: Batch, ext_ids: Iterable[str]) -> Batch | None:
        keep = frozenset(ext_ids) & frozenset(batch.ext_ids)
        if not keep:
            return None
        return batch if keep == frozenset(batch.ext_ids) else self._rebuild(batch, keep)

    def split(self, batch: Batch) -> tuple[Batch, Batch] | None:
        if len(batch.ext_ids) < 2:
            return None
        half = len(batch.ext_ids) // 2
        return self._rebuild(batch, frozenset(batch.ext_ids[:half])), self._rebuild(
            batch, frozenset(batch.ext_ids[half:])
        )


FAKE = FakePlatform()
