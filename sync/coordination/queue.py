"""A run's batches as a queue in PostgreSQL: the leader puts, every worker claims.

* **Enqueue** (:func:`enqueue`, the leader): first every lane of the run's batch source — the plan, a replay —
  is listed (``lanes``: phase, endpoint, rank; ``runs.listed``), then, phase by phase and lane by lane, every
  batch becomes a row of the ledger's ``batches`` table with what a worker needs to send it (body, IDs,
  origins, ``after``, the lane's rank), committed in small transactions (every ``chunk`` batches or
  ``flush_every`` seconds, so workers can claim the first batches at once); the transaction holding a lane's
  last batch marks the lane ``queued``. Batch IDs are content hashes, so a leader that took over from a dead
  one plans again and its inserts of the same batches are ignored (``ON CONFLICT DO NOTHING``). The runner
  sets ``runs.planned`` once the input's counts are recorded too: the run's completion is decided only then.
* **Claim** (:class:`QueueLanes`, every worker, the leader too): ``UPDATE … WHERE (run_id, batch_id) IN
  (SELECT … FOR UPDATE SKIP LOCKED LIMIT n)`` sets ``claimed_by``; workers never wait on each other's locks.
  A claim is good while its worker's heartbeat is fresh (:class:`Membership`: one row per worker, renewed
  every ``lease / 3`` seconds): a worker that dies (kill -9, a lost machine) stops renewing and, ``lease``
  seconds later, its batches are claimable again — except those of non-idempotent operations already recorded
  ``sent``: their outcome is unknown, so they are *held* (``held``), exactly as resume holds them; ``pushsync
  retry`` sends them.
* **Lanes**: :class:`QueueLanes` is a :class:`sync.dispatch.dispatch.LaneSource`: per phase, one lane per endpoint
  as the leader listed them (ranked as the plan ranked them), each a :class:`sync.dispatch.dispatch.BatchPuller`:
  the dispatcher asks it for as many batches as it has workers waiting, and it claims no more — a worker
  never holds a claimed batch it has not begun sending. A lane ends only once the leader queued all of it
  and no batch of it is left unfinished by anyone (polling while the leader still plans or other workers
  still hold some), so a phase ends everywhere before any worker starts the next; a batch naming a
  predecessor (``after``) is claimed only once that predecessor is finished (or held).
* **A lost connection** (PostgreSQL restarted): claims, heartbeats and reaping run through a
  :class:`sync.coordination._db.Link`, which connects again and repeats the statement; a claim whose answer
  was lost is found again by its number (``claim_no``) instead of being made twice. Right after the server
  (re)started nobody counts as dead for one lease: every worker gets the time to connect again and beat.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from sync.coordination._db import SCHEMA, Link, safe_message
from sync.errors import StateError
from sync.ledger.ledger import row_keys_row
from sync.logs import get_logger
from sync.records import NON_IDEMPOTENT, Batch, Operation, Phase, RowRef

if TYPE_CHECKING:
    from sync.coordination.ledger import PgLedger

__all__ = [
    "Membership",
    "QueueLane",
    "QueueLanes",
    "decode_batch",
    "encode_batch",
    "enqueue",
    "heartbeat",
    "worker_id",
]

S = SCHEMA
_NON_IDEMPOTENT = sorted(str(op) for op in NON_IDEMPOTENT)
_COLUMNS = "batch_id, endpoint, operation, phase, after_id, ext_ids, body_json, body_bytes, origins"
_ANALYZE_AT = 500
"""Batches queued before the leader has the batches table analyzed (once per run)."""
_COLUMNS_OF_T = ", ".join(f"t.{c}" for c in _COLUMNS.split(", "))
_ROW_KEYS_OF_T = (
    f"(SELECT r.row_keys FROM {S}.batch_rows r WHERE r.run_id = t.run_id AND r.batch_id = t.batch_id)"
)
"""A claimed batch's row keys (non-idempotent batches): the halves of a split keep theirs, and the dispatcher
records those the platform confirmed (:attr:`sync.records.BatchResult.confirmed_rows`)."""


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
    return json.dumps(list(batch.ext_ids), separators=(",", ":")), body_json, body_bytes, origins


def decode_batch(row: Sequence[Any]) -> Batch:
    """The :class:`Batch` a queue row holds (the columns of ``_COLUMNS``, then optionally its row keys)."""
    batch_id, endpoint, operation, phase, after, ext_ids, body_json, body_bytes, origins = row[:9]
    row_keys = row[9] if len(row) > 9 else None
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
        row_keys=bytes(row_keys) if row_keys is not None else b"",
    )


def enqueue(
    conn: psycopg.Connection[Any],
    run_id: str,
    source: Any,
    *,
    chunk: int = 500,
    flush_every: float = 0.05,
    stop: Any = None,
) -> int:
    """List the lanes of ``source`` (a :class:`sync.dispatch.dispatch.LaneSource`, or an iterable of batches in
    phase order), then insert every batch into the queue of ``run_id``, lane by lane, marking each lane
    ``queued`` with its last batch; returns how many batches the source gave. Runs in a thread (the leader's
    planning); ``stop`` (a :class:`threading.Event`) ends it early, leaving the lanes not reached unqueued.

    A lane's first batch is committed at once, the others every ``flush_every`` seconds or ``chunk`` batches,
    so workers claim while the rest is planned. The source is read in this thread, on purpose: it may write
    through ``conn`` itself (snapshot mode records each batch's map line first), and a connection serves one
    thread at a time — so a batch made just before a slow stretch of planning waits for the next one."""
    lanes = _lanes_of(source)
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {S}.lanes (run_id, phase, endpoint, rank) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [(run_id, int(phase), endpoint, rank) for phase, endpoint, rank, _ in lanes],
        )
        cur.execute(f"UPDATE {S}.runs SET listed = TRUE WHERE run_id = %s", (run_id,))
    rows: list[tuple[Any, ...]] = []
    keys: list[tuple[Any, ...]] = []
    total = 0
    last_flush = time.monotonic()
    analyzed = False

    def flush(done: tuple[Phase, str] | None = None) -> None:
        nonlocal last_flush, analyzed
        with conn.transaction(), conn.cursor() as cur:
            if rows:
                cur.executemany(
                    f"INSERT INTO {S}.batches (run_id, batch_id, endpoint, operation, phase, rank, after_id, "
                    "n_ids, ext_ids, body_json, body_bytes, origins, status, planned_at) VALUES "
                    "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'planned', %s) ON CONFLICT DO NOTHING",
                    rows,
                )
            if keys:
                cur.executemany(
                    f"INSERT INTO {S}.batch_rows (run_id, batch_id, scheme, row_keys) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                    keys,
                )
            if done is not None:
                # With the lane's last batch: a worker that reads the lane as queued sees every batch of it.
                cur.execute(
                    f"UPDATE {S}.lanes SET queued = TRUE WHERE run_id = %s AND phase = %s AND endpoint = %s",
                    (run_id, int(done[0]), done[1]),
                )
        rows.clear()
        keys.clear()
        last_flush = time.monotonic()
        if not analyzed and total >= _ANALYZE_AT:
            # Statistics once the run has a good number of batches: with none (a new database) or with those
            # of a near-empty table, the planner may scan every batch of the run for each claim and each
            # predecessor it checks. Not sooner: statistics of a table of a few rows are worse than none.
            conn.execute(f"ANALYZE {S}.batches")
            analyzed = True

    for phase, endpoint, rank, batches in lanes:
        first = True  # the lane's first batch is committed alone: workers start the lane at once
        for batch in batches:
            if stop is not None and stop.is_set():
                flush()
                return total
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
            # Small transactions while batches come slowly; up to ``chunk`` batches in one while they pour in.
            if first or len(rows) >= chunk or time.monotonic() - last_flush >= flush_every:
                flush()
                first = False
        if stop is not None and stop.is_set():
            break
        flush(done=(phase, endpoint))
    return total


def _lanes_of(source: Any) -> list[tuple[Phase, str, int, Iterable[Batch]]]:
    """(phase, endpoint, rank, batches) of every lane of ``source``, phase by phase; the batches not read yet
    (a plan's lanes are lazy). A plain iterable of batches is grouped by phase and endpoint, in its order."""
    lanes_of = getattr(source, "lanes", None)
    if lanes_of is None:
        grouped: dict[tuple[Phase, str], list[Batch]] = {}
        for batch in source:
            grouped.setdefault((batch.phase, batch.endpoint), []).append(batch)
        return [(phase, endpoint, 0, batches) for (phase, endpoint), batches in grouped.items()]
    rank_of = getattr(source, "lane_rank", None)
    return [
        (phase, endpoint, rank_of(phase, endpoint) if rank_of is not None else 0, batches)
        for phase in Phase
        for endpoint, batches in lanes_of(phase)
    ]


class Membership:
    """This worker's row in ``workers`` and its heartbeat: claims are good while it is fresh.

    :meth:`beat` renews it (call it every ``lease / 3`` s); :meth:`reap` holds the non-idempotent ``sent``
    batches of dead workers and frees their other claims. ``link``: this worker's connection for heartbeats
    (made again if lost)."""

    def __init__(self, link: Link, run_id: str, worker: str, lease: float) -> None:
        self.link = link
        self.run_id = run_id
        self.worker = worker
        self.lease = lease

    async def join(self) -> None:
        """Add this worker's row (its heartbeat starts fresh)."""

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                f"INSERT INTO {S}.workers (worker_id, run_id, host, pid, started_at) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (worker_id) DO UPDATE SET heartbeat = clock_timestamp()",
                (self.worker, self.run_id, socket.gethostname(), os.getpid(), time.time()),
            )

        await self.link.run(work)

    async def beat(self) -> None:
        """Renew the heartbeat."""

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                f"UPDATE {S}.workers SET heartbeat = clock_timestamp() WHERE worker_id = %s", (self.worker,)
            )

        await self.link.run(work)

    async def leave(self) -> None:
        """Give back the claims not sent yet, and leave (the run's other workers take those over at once)."""

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                f"UPDATE {S}.batches SET claimed_by = NULL WHERE run_id = %s AND claimed_by = %s "
                "AND status = 'planned'",
                (self.run_id, self.worker),
            )
            await conn.execute(
                f"UPDATE {S}.workers SET finished_at = %s, heartbeat = clock_timestamp() - interval '1 day' "
                "WHERE worker_id = %s",
                (time.time(), self.worker),
            )

        await self.link.run(work)

    async def reap(self) -> int:
        """Hold the non-idempotent batches a dead worker recorded ``sent`` (outcome unknown) and free the others'
        claims; returns how many batches were held. Nobody counts as dead within a lease of the server's start:
        after a restart every worker's heartbeat is as old as the outage, and each needs a moment to connect
        again and beat."""
        dead = (
            f"SELECT worker_id FROM {S}.workers WHERE run_id = %s AND worker_id <> %s "
            "AND greatest(heartbeat, pg_postmaster_start_time()) < clock_timestamp() - make_interval(secs => %s)"
        )
        dead_params = (self.run_id, self.worker, self.lease)

        async def work(conn: psycopg.AsyncConnection[Any]) -> int:
            async with conn.transaction():
                cur = await conn.execute(
                    f"UPDATE {S}.batches SET held = TRUE, claimed_by = NULL WHERE run_id = %s AND status = 'sent' "
                    f"AND NOT held AND operation = ANY(%s) AND claimed_by IN ({dead})",
                    (self.run_id, _NON_IDEMPOTENT, *dead_params),
                )
                held = cur.rowcount
                await conn.execute(
                    f"UPDATE {S}.batches SET claimed_by = NULL WHERE run_id = %s AND status IN ('planned', 'sent') "
                    f"AND claimed_by IN ({dead})",
                    (self.run_id, *dead_params),
                )
            return max(held, 0)

        return await self.link.run(work)


class QueueLanes:
    """The run's queue as a :class:`sync.dispatch.dispatch.LaneSource` (see the module docstring).

    ``link``: this worker's connection for claims (made again if lost); ``lanes(phase)`` reads the lanes the
    leader listed through the ``ledger``'s connection. ``claim``: the most batches one claim takes; ``poll``:
    seconds between looks while the leader still plans or other workers hold the last batches of a lane;
    ``sleep`` is injectable for tests."""

    def __init__(
        self,
        link: Link,
        ledger: PgLedger,
        membership: Membership,
        *,
        claim: int = 8,
        poll: float = 0.2,
        stop: asyncio.Event | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self._link = link
        self._ledger = ledger  # its connection reads the lanes (and is made again if the server restarts)
        # A batch this worker claimed is recorded sent only while it is still its claim: a worker stalled past
        # its lease must not send what another worker took over (PgLedger.flush checks it).
        ledger.claimer = membership.worker
        self._member = membership
        self._claim_n = claim
        self._cursor: dict[tuple[int, str], int] = {}  # lane → the last seq this worker claimed
        self._poll = poll
        self._stop = stop
        self._sleep = sleep
        self._ranks: dict[tuple[int, str], int] = {}
        self._claims = 0  # claims made: each claim's number marks the batches it took (claim_no)
        self.claimed = 0
        """Batches this worker claimed (for its log line)."""
        self.claim_seconds = 0.0
        """Time spent in claim statements (the benchmark's claim overhead)."""

    def lanes(self, phase: Phase) -> list[tuple[str, QueueLane]]:
        """One lane per endpoint the leader listed in ``phase`` (read with the synchronous connection: the
        dispatcher asks between two awaits; the runner starts the dispatcher once the lanes are listed)."""
        try:
            rows = self._ledger._execute(
                f"SELECT endpoint, rank FROM {S}.lanes WHERE run_id = %s AND phase = %s ORDER BY endpoint",
                (self._member.run_id, int(phase)),
            ).fetchall()
        except psycopg.Error as exc:
            raise StateError(f"coordination database: cannot read the queue ({safe_message(exc)})") from None
        out = []
        for endpoint, rank in rows:
            self._ranks[(int(phase), endpoint)] = int(rank)
            out.append((endpoint, QueueLane(self, phase, endpoint)))
        return out

    def lane_rank(self, phase: Phase, endpoint: str) -> int:
        """The lane's rank as the plan gave it (lower ranks finish first)."""
        return self._ranks.get((int(phase), endpoint), 0)

    async def take(self, phase: Phase, endpoint: str, n: int) -> list[Batch]:
        """Up to ``n`` batches of the lane, claimed now; waits (polling) only while none can be claimed and the
        lane is not over — the leader still queues it, or other workers hold its last batches. An empty list:
        the lane is over (or the worker stops)."""
        while True:
            if self._stop is not None and self._stop.is_set():
                return []
            batches = await self._take(phase, endpoint, n)
            if batches:
                return batches
            queued, unfinished = await self._lane_state(phase, endpoint)
            if queued and not unfinished:
                return []
            if unfinished:
                await self._member.reap()
            await self._sleep(self._poll)

    async def _take(self, phase: Phase, endpoint: str, n: int | None = None) -> list[Batch]:
        """Claim up to ``n`` (at most ``claim``) batches of the lane, in queue order. Claims continue after the
        last batch this worker took (a short index range, however many batches are done); only when that tail
        is empty does a claim look from the start again, for batches another worker gave back or left behind
        by dying."""
        started = time.perf_counter()
        lane = (int(phase), endpoint)
        want = max(1, min(n or self._claim_n, self._claim_n))
        after = self._cursor.get(lane, -1)
        rows = await self._claim(phase, endpoint, after, want)
        if not rows and after >= 0:
            rows = await self._claim(phase, endpoint, -1, want)
        self.claim_seconds += time.perf_counter() - started
        rows.sort(key=lambda r: r[-1])
        if rows:
            self._cursor[lane] = max(after, int(rows[-1][-1]))
        self.claimed += len(rows)
        return [decode_batch(r[:-1]) for r in rows]

    async def _claim(self, phase: Phase, endpoint: str, after: int, n: int) -> list[Any]:
        run_id, worker = self._member.run_id, self._member.worker
        self._claims += 1
        number = self._claims
        # The batches to claim are picked by an uncorrelated ARRAY(…) subquery, which PostgreSQL runs once.
        # Written ``WHERE batch_id IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)``, the planner may make it a
        # semi-join that runs the subquery again for every batch of the run, each run skipping the rows the
        # earlier ones locked — and one claim of n takes the whole lane (seen on a table not analyzed yet).
        sql = (
            f"UPDATE {S}.batches t SET claimed_by = %s, claim_no = %s WHERE t.run_id = %s AND t.batch_id = ANY(ARRAY("
            f"SELECT b.batch_id FROM {S}.batches b WHERE b.run_id = %s AND b.phase = %s AND b.endpoint = %s "
            "AND b.seq > %s AND b.status IN ('planned', 'sent') AND NOT b.held AND b.claimed_by IS NULL "
            f"AND (b.after_id IS NULL OR NOT EXISTS (SELECT 1 FROM {S}.batches p WHERE p.run_id = b.run_id "
            "AND p.batch_id = b.after_id AND p.status IN ('planned', 'sent') AND NOT p.held)) "
            f"ORDER BY b.seq LIMIT %s FOR UPDATE SKIP LOCKED)) RETURNING {_COLUMNS_OF_T}, {_ROW_KEYS_OF_T}, t.seq"
        )

        async def claim(conn: psycopg.AsyncConnection[Any]) -> list[Any]:
            cur = await conn.execute(sql, (worker, number, run_id, run_id, int(phase), endpoint, after, n))
            return await cur.fetchall()

        async def found_again(conn: psycopg.AsyncConnection[Any]) -> list[Any]:
            # The connection was lost with the claim's answer: if the claim was made, its batches are this
            # worker's now (nobody else will take them), so take them from the table rather than claim again.
            cur = await conn.execute(
                f"SELECT {_COLUMNS_OF_T}, {_ROW_KEYS_OF_T}, t.seq FROM {S}.batches t WHERE t.run_id = %s "
                "AND t.claimed_by = %s AND t.claim_no = %s AND t.status IN ('planned', 'sent')",
                (run_id, worker, number),
            )
            return await cur.fetchall() or await claim(conn)

        try:
            return await self._link.run(claim, again=found_again)
        except psycopg.Error as exc:
            raise StateError(f"coordination database: cannot claim batches ({safe_message(exc)})") from None

    async def _lane_state(self, phase: Phase, endpoint: str) -> tuple[bool, bool]:
        """(the leader queued the whole lane, batches of it are unfinished and not this worker's) — read in one
        statement, so a lane read as queued shows every batch of it. A run another worker finished is over;
        :class:`StateError` when it was aborted meanwhile (a 401 elsewhere, input the leader could not plan)."""
        run_id, worker = self._member.run_id, self._member.worker

        async def work(conn: psycopg.AsyncConnection[Any]) -> Any:
            cur = await conn.execute(
                f"SELECT l.queued, EXISTS (SELECT 1 FROM {S}.batches b WHERE b.run_id = l.run_id "
                "AND b.phase = l.phase AND b.endpoint = l.endpoint AND b.status IN ('planned', 'sent') "
                "AND NOT b.held AND b.claimed_by IS DISTINCT FROM %s), r.status, r.message "
                f"FROM {S}.runs r LEFT JOIN {S}.lanes l ON l.run_id = r.run_id AND l.phase = %s AND l.endpoint = %s "
                "WHERE r.run_id = %s",
                (worker, int(phase), endpoint, run_id),
            )
            return await cur.fetchone()

        try:
            row = await self._link.run(work)
        except psycopg.Error as exc:
            raise StateError(f"coordination database: cannot read the queue ({safe_message(exc)})") from None
        if row is None:
            raise StateError(f"run {run_id} disappeared from the coordination database")
        queued, unfinished, status, message = row
        if status in ("done", "partial"):
            return True, False  # another worker finished the run a moment ago: nothing is left here
        if status != "running":
            raise StateError(
                f"run {run_id} ended ({status}) while this worker was sending: {message or 'see pushsync show'}"
            )
        return bool(queued), bool(unfinished)


class QueueLane:
    """One lane of :class:`QueueLanes`: a :class:`sync.dispatch.dispatch.BatchPuller` (the dispatcher asks for as
    many batches as it has workers waiting) and, for other readers, an async iterator of claimed batches."""

    __slots__ = ("_endpoint", "_phase", "_queue")

    def __init__(self, queue: QueueLanes, phase: Phase, endpoint: str) -> None:
        self._queue = queue
        self._phase = phase
        self._endpoint = endpoint

    async def take(self, n: int) -> list[Batch]:
        """Up to ``n`` batches, claimed now; an empty list once the lane is over."""
        return await self._queue.take(self._phase, self._endpoint, n)

    async def __aiter__(self) -> AsyncIterator[Batch]:
        while batches := await self.take(1):
            for batch in batches:
                yield batch


@contextlib.asynccontextmanager
async def heartbeat(membership: Membership) -> AsyncIterator[None]:
    """Renew the worker's heartbeat every ``lease / 3`` seconds while the block runs."""
    log = get_logger(run=membership.run_id)

    async def beat() -> None:
        while True:
            await asyncio.sleep(membership.lease / 3)
            try:
                await membership.beat()
            except (psycopg.Error, StateError) as exc:
                # The database stayed away past the reconnection bound: the claims and the ledger stop the
                # worker with a clear error; keep trying meanwhile.
                log.warning("worker.heartbeat_failed", error=safe_message(exc))

    task = asyncio.create_task(beat(), name="worker-heartbeat")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
