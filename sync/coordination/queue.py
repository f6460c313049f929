"""A run's batches as a queue in PostgreSQL: the leader puts, every worker claims.

* **Enqueue** (:func:`enqueue`, the leader): every batch of the run's batch source — the plan, a replay, phase
  by phase and lane by lane — becomes a row of the ledger's ``batches`` table with what a worker needs to send
  it (body, IDs, origins, ``after``, the lane's rank), then ``runs.planned`` is set. Batch IDs are content
  hashes, so a leader that took over from a dead one plans again and its inserts of the same batches are
  ignored (``ON CONFLICT DO NOTHING``).
* **Claim** (:class:`QueueLanes`, every worker, the leader too): ``UPDATE … WHERE (run_id, batch_id) IN
  (SELECT … FOR UPDATE SKIP LOCKED LIMIT n)`` sets ``claimed_by``; workers never wait on each other's locks.
  A claim is good while its worker's heartbeat is fresh (:class:`Membership`: one row per worker, renewed
  every ``lease / 3`` seconds): a worker that dies (kill -9, a lost machine) stops renewing and, ``lease``
  seconds later, its batches are claimable again — except those of non-idempotent operations already recorded
  ``sent``: their outcome is unknown, so they are *held* (``held``), exactly as resume holds them; ``pushsync
  retry`` sends them.
* **Lanes**: :class:`QueueLanes` is a :class:`sync.dispatch.dispatch.LaneSource`: per phase, one lane per endpoint
  (ranked as the plan ranked them), each an async iterator of claimed batches. A lane ends only when no batch of
  its phase and endpoint is left unfinished by anyone (polling while other workers still hold some), so a
  phase ends everywhere before any worker starts the next; a batch naming a predecessor (``after``) is claimed
  only once that predecessor is finished (or held).

Plain SQL rather than a queue library (procrastinate, pgqueuer): the queue *is* the ledger's batch table — one
row per batch whose status is the ledger's — so claiming and recording touch one row, and none of those
libraries shares a rate budget anyway (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from sync.coordination._db import SCHEMA, safe_message
from sync.errors import StateError
from sync.ledger.ledger import row_keys_row
from sync.logs import get_logger
from sync.records import NON_IDEMPOTENT, Batch, Operation, Phase, RowRef

if TYPE_CHECKING:
    from sync.coordination.ledger import PgLedger

__all__ = ["Membership", "QueueLanes", "decode_batch", "encode_batch", "enqueue", "heartbeat", "worker_id"]

S = SCHEMA
_NON_IDEMPOTENT = sorted(str(op) for op in NON_IDEMPOTENT)
_COLUMNS = "batch_id, endpoint, operation, phase, after_id, ext_ids, body_json, body_bytes, origins"


def worker_id() -> str:
    """This process's name among the workers: host, PID and a random part (PIDs repeat across pods)."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def encode_batch(batch: Batch) -> tuple[str, str | None, bytes | None, str]:
    """(ext_ids, body_json, body_bytes, origins) of a batch, as stored in the queue (JSON; bytes as they are)."""
    if isinstance(batch.body, bytes | bytearray):
        body_json, body_bytes = None, bytes(batch.body)
    else:
        body_json, body_bytes = json.dumps(batch.body, separators=(",", ":")), None
    origins = json.dumps({k: [v.path, v.row] for k, v in batch.origins.items()}, separators=(",", ":"))
    return json.dumps(batch.ext_ids, separators=(",", ":")), body_json, body_bytes, origins


def decode_batch(row: Sequence[Any]) -> Batch:
    """The :class:`Batch` a queue row holds (the columns of ``_COLUMNS``)."""
    batch_id, endpoint, operation, phase, after, ext_ids, body_json, body_bytes, origins = row
    body = bytes(body_bytes) if body_bytes is not None else json.loads(body_json)
    return Batch(
        batch_id=batch_id,
        endpoint=endpoint,
        operation=Operation(operation),
        body=body,
        ext_ids=tuple(json.loads(ext_ids)),
        phase=Phase(phase),
        origins={k: RowRef(p, r) for k, (p, r) in json.loads(origins or "{}").items()},
        after=after,
    )


def enqueue(
    conn: psycopg.Connection[Any], run_id: str, source: Any, *, chunk: int = 500, stop: Any = None
) -> int:
    """Insert every batch of ``source`` (a :class:`sync.dispatch.dispatch.LaneSource`, or an iterable of batches in
    phase order) into the queue of ``run_id``; returns how many batches the source gave. Runs in a thread."""
    rows: list[tuple[Any, ...]] = []
    keys: list[tuple[Any, ...]] = []
    total = 0

    def flush() -> None:
        if not rows:
            return
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {S}.batches (run_id, batch_id, endpoint, operation, phase, rank, after_id, n_ids, "
                "ext_ids, body_json, body_bytes, origins, status, planned_at) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'planned', %s) ON CONFLICT DO NOTHING",
                rows,
            )
            if keys:
                cur.executemany(
                    f"INSERT INTO {S}.batch_rows (run_id, batch_id, scheme, row_keys) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                    keys,
                )
        rows.clear()
        keys.clear()

    for rank, batch in _ranked_batches(source):
        if stop is not None and stop.is_set():
            break
        ext_ids, body_json, body_bytes, origins = encode_batch(batch)
        rows.append(
            (
                run_id,
                batch.batch_id,
                batch.endpoint,
                str(batch.operation),
                int(batch.phase),
                rank,
                batch.after,
                len(batch.ext_ids),
                ext_ids,
                body_json,
                body_bytes,
                origins,
                time.time(),
            )
        )
        if batch.row_keys:
            keys.append(row_keys_row(run_id, batch))
        total += 1
        if len(rows) >= chunk:
            flush()
    flush()
    return total


def _ranked_batches(source: Any) -> Iterator[tuple[int, Batch]]:
    """(lane rank, batch) for every batch of ``source``, phase by phase."""
    lanes = getattr(source, "lanes", None)
    if lanes is None:
        for batch in source:
            yield 0, batch
        return
    rank_of = getattr(source, "lane_rank", None)
    for phase in Phase:
        for endpoint, batches in lanes(phase):
            rank = rank_of(phase, endpoint) if rank_of is not None else 0
            for batch in batches:
                yield rank, batch


class Membership:
    """This worker's row in ``workers`` and its heartbeat: claims are good while it is fresh.

    :meth:`beat` renews it (call it every ``lease / 3`` s); :meth:`reap` holds the non-idempotent ``sent``
    batches of dead workers and frees their other claims."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], run_id: str, worker: str, lease: float) -> None:
        self.conn = conn
        self.run_id = run_id
        self.worker = worker
        self.lease = lease
        # Lanes reap and the heartbeat beats concurrently: one statement (or transaction) at a time.
        self._lock = asyncio.Lock()

    async def join(self) -> None:
        async with self._lock:
            await self.conn.execute(
                f"INSERT INTO {S}.workers (worker_id, run_id, host, pid, started_at) VALUES (%s, %s, %s, %s, %s)",
                (self.worker, self.run_id, socket.gethostname(), os.getpid(), time.time()),
            )

    async def beat(self) -> None:
        async with self._lock:
            await self.conn.execute(
                f"UPDATE {S}.workers SET heartbeat = clock_timestamp() WHERE worker_id = %s", (self.worker,)
            )

    async def leave(self) -> None:
        """Give back the claims not sent yet, and leave (the run's other workers take those over at once)."""
        async with self._lock:
            await self._leave()

    async def _leave(self) -> None:
        await self.conn.execute(
            f"UPDATE {S}.batches SET claimed_by = NULL WHERE run_id = %s AND claimed_by = %s AND status = 'planned'",
            (self.run_id, self.worker),
        )
        await self.conn.execute(
            f"UPDATE {S}.workers SET finished_at = %s, heartbeat = clock_timestamp() - interval '1 day' "
            "WHERE worker_id = %s",
            (time.time(), self.worker),
        )

    async def reap(self) -> int:
        """Hold the non-idempotent batches a dead worker recorded ``sent`` (outcome unknown) and free the others'
        claims; returns how many batches were held."""
        dead = (
            f"SELECT worker_id FROM {S}.workers WHERE run_id = %s AND heartbeat < clock_timestamp() - "
            "make_interval(secs => %s)"
        )
        async with self._lock, self.conn.transaction():
            cur = await self.conn.execute(
                f"UPDATE {S}.batches SET held = TRUE, claimed_by = NULL WHERE run_id = %s AND status = 'sent' "
                f"AND NOT held AND operation = ANY(%s) AND claimed_by IN ({dead})",
                (self.run_id, _NON_IDEMPOTENT, self.run_id, self.lease),
            )
            held = cur.rowcount
            await self.conn.execute(
                f"UPDATE {S}.batches SET claimed_by = NULL WHERE run_id = %s AND status IN ('planned', 'sent') "
                f"AND claimed_by IN ({dead})",
                (self.run_id, self.run_id, self.lease),
            )
        return max(held, 0)


class QueueLanes:
    """The run's queue as a :class:`sync.dispatch.dispatch.LaneSource` (see the module docstring).

    ``conn``: this worker's asynchronous connection for claims; ``lanes(phase)`` reads which endpoints the phase
    has through the ``ledger``'s connection (the leader finished queueing before workers start). ``poll``: seconds between looks while other workers
    hold the last batches of a lane."""

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        ledger: PgLedger,
        membership: Membership,
        *,
        claim: int = 4,
        poll: float = 0.2,
        stop: asyncio.Event | None = None,
    ) -> None:
        self._conn = conn
        self._ledger = ledger  # its connection reads the lanes (and is made again if the server restarts)
        self._member = membership
        self._claim_n = claim
        self._cursor: dict[tuple[int, str], int] = {}  # lane → the last seq this worker claimed
        self._poll = poll
        self._stop = stop
        self._lock = asyncio.Lock()  # one statement at a time on the connection
        self._ranks: dict[tuple[int, str], int] = {}
        self.claimed = 0
        """Batches this worker claimed (for its log line)."""
        self.claim_seconds = 0.0
        """Time spent in claim statements (the benchmark's claim overhead)."""

    def lanes(self, phase: Phase) -> list[tuple[str, AsyncIterator[Batch]]]:
        """One lane per endpoint with batches in ``phase`` (read with the synchronous connection: the dispatcher
        asks between two awaits)."""
        try:
            rows = self._ledger._execute(
                f"SELECT endpoint, min(rank) FROM {S}.batches WHERE run_id = %s AND phase = %s GROUP BY endpoint "
                "ORDER BY endpoint",
                (self._member.run_id, int(phase)),
            ).fetchall()
        except psycopg.Error as exc:
            raise StateError(f"coordination database: cannot read the queue ({safe_message(exc)})") from None
        out = []
        for endpoint, rank in rows:
            self._ranks[(int(phase), endpoint)] = int(rank)
            out.append((endpoint, self._lane(phase, endpoint)))
        return out

    def lane_rank(self, phase: Phase, endpoint: str) -> int:
        return self._ranks.get((int(phase), endpoint), 0)

    async def _lane(self, phase: Phase, endpoint: str) -> AsyncIterator[Batch]:
        while True:
            if self._stop is not None and self._stop.is_set():
                return
            batches = await self._take(phase, endpoint)
            if batches:
                for batch in batches:
                    yield batch
                continue
            if not await self._others_hold(phase, endpoint):
                return
            await self._member.reap()
            await asyncio.sleep(self._poll)

    async def _take(self, phase: Phase, endpoint: str) -> list[Batch]:
        """Claim up to ``claim`` batches of the lane, in queue order. Claims continue after the last batch this
        worker took (a short index range, however many batches are done); only when that tail is empty does a
        claim look from the start again, for batches another worker gave back or left behind by dying."""
        started = time.perf_counter()
        lane = (int(phase), endpoint)
        after = self._cursor.get(lane, -1)
        rows = await self._claim(phase, endpoint, after)
        if not rows and after >= 0:
            rows = await self._claim(phase, endpoint, -1)
        self.claim_seconds += time.perf_counter() - started
        rows.sort(key=lambda r: r[-1])
        if rows:
            self._cursor[lane] = max(after, int(rows[-1][-1]))
        self.claimed += len(rows)
        return [decode_batch(r[:-1]) for r in rows]

    async def _claim(self, phase: Phase, endpoint: str, after: int) -> list[Any]:
        run_id, worker = self._member.run_id, self._member.worker
        sql = (
            f"UPDATE {S}.batches SET claimed_by = %s WHERE run_id = %s AND batch_id IN ("
            f"SELECT b.batch_id FROM {S}.batches b WHERE b.run_id = %s AND b.phase = %s AND b.endpoint = %s "
            "AND b.seq > %s AND b.status IN ('planned', 'sent') AND NOT b.held AND b.claimed_by IS NULL "
            f"AND (b.after_id IS NULL OR NOT EXISTS (SELECT 1 FROM {S}.batches p WHERE p.run_id = b.run_id "
            "AND p.batch_id = b.after_id AND p.status IN ('planned', 'sent') AND NOT p.held)) "
            f"ORDER BY b.seq LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING {_COLUMNS}, seq"
        )
        try:
            async with self._lock:
                cur = await self._conn.execute(
                    sql, (worker, run_id, run_id, int(phase), endpoint, after, self._claim_n)
                )
                return await cur.fetchall()
        except psycopg.Error as exc:
            raise StateError(f"coordination database: cannot claim batches ({safe_message(exc)})") from None

    async def _others_hold(self, phase: Phase, endpoint: str) -> bool:
        """Whether batches of this lane are unfinished and not this worker's (others may finish or drop them)."""
        try:
            async with self._lock:
                cur = await self._conn.execute(
                    f"SELECT 1 FROM {S}.batches WHERE run_id = %s AND phase = %s AND endpoint = %s "
                    "AND status IN ('planned', 'sent') AND NOT held AND claimed_by IS DISTINCT FROM %s LIMIT 1",
                    (self._member.run_id, int(phase), endpoint, self._member.worker),
                )
                return await cur.fetchone() is not None
        except psycopg.Error as exc:
            raise StateError(f"coordination database: cannot read the queue ({safe_message(exc)})") from None


@contextlib.asynccontextmanager
async def heartbeat(membership: Membership) -> AsyncIterator[None]:
    """Renew the worker's heartbeat every ``lease / 3`` seconds while the block runs."""
    log = get_logger(run=membership.run_id)

    async def beat() -> None:
        while True:
            await asyncio.sleep(membership.lease / 3)
            try:
                await membership.beat()
            except psycopg.Error as exc:
                # The database is away (restarting?): the ledger's writes will say so; keep trying.
                log.warning("worker.heartbeat_failed", error=safe_message(exc))

    task = asyncio.create_task(beat(), name="worker-heartbeat")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
