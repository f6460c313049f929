"""Sending one batch: rate budget and concurrency slot per attempt, retries, split-on-400, ledger records.

Private: :class:`sync.dispatch.dispatch.Dispatcher` (the public face) feeds the batches and runs the workers; each
worker hands its batch to the run's :class:`BatchSender`, which owns what every attempt shares — the
endpoints' budgets, caps and counters, the global cap on requests in flight, and the run's first fatal error.

Per batch (the rules are drawn in :mod:`sync.dispatch.dispatch`'s docstring): ``sent`` is recorded before the first
attempt — durably, for operations that are not idempotent — and each attempt and the final result the moment
they are known, synchronously, before the next ``await``. A 400 splits the batch (``client.split``) until the
refused IDs are isolated; a 401/403 closes every budget and sets the stop event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sync.config import DispatchSettings
from sync.dispatch._dispatch_records import DispatchObserver, EndpointStats, sample_latency
from sync.dispatch.budget import (
    Budget,
    BudgetClosedError,
    BudgetPool,
    Clock,
    EndpointBudget,
    RateBudget,
    clock_sleep,
    meter_of,
)
from sync.errors import FatalPlatformError, RejectedBatchError, RetryableError
from sync.ledger.ledger import RunLedger
from sync.logs import get_logger
from sync.platforms.base import PlatformClient
from sync.platforms.retrying import backoff_delay
from sync.records import (
    NON_IDEMPOTENT,
    Attempt,
    AttemptOutcome,
    Batch,
    BatchResult,
    BatchStatus,
    RejectedId,
)

_NOT_IDEMPOTENT = NON_IDEMPOTENT  # their ``sent`` record is committed before the request goes out

WHOLE_REFUSAL_IDS = 16
"""IDs of one batch, each sent alone and each refused word for word as the whole batch was, with no part of the
batch accepted, after which the refusal is taken as the request's (a job or account problem: an attribute the
platform does not know, a quota) rather than its rows'. Splitting a batch of n IDs every one of which is refused
takes 2n - 1 requests (1,999 for 1,000 IDs, at the rate budget: a 1M-user run would take days to learn what its
first batch said); the rule stops after about 16 x 2 + log2(n) of them."""


class _Deadlines:
    """The dispatcher's guard against a client that never answers: each attempt is cut off ``limit`` seconds
    after it began, as ``asyncio.timeout(limit)`` around it would (the attempt's task is cancelled, and that
    cancellation comes out of :meth:`watch`'s block as :class:`TimeoutError`) — through one loop timer for every
    attempt instead of one pushed into the loop's heap and cancelled per request. Every attempt has the same
    limit and begins later than the one before, so deadlines come in the order the attempts began: a FIFO,
    whose oldest open deadline the timer is set for."""

    __slots__ = ("_limit", "_loop", "_queue", "_timer")

    def __init__(self, limit: float) -> None:
        self._limit = limit
        self._loop: asyncio.AbstractEventLoop | None = None  # the running loop, on first use
        self._queue: deque[_Watch] = deque()  # attempts in the order they began; finished ones leave the head
        self._timer: asyncio.TimerHandle | None = None  # set for the head's deadline while there is one

    def watch(self) -> _Watch:
        """A context manager around one attempt (in the attempt's own task)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("an attempt must run in a task")
        watch = _Watch(self, task, loop.time() + self._limit)
        self._queue.append(watch)
        if self._timer is None:
            self._timer = loop.call_at(watch.deadline, self._expire)
        return watch

    def _settle(self) -> None:
        """Drop finished attempts from the head (attempts end about in the order they began)."""
        queue = self._queue
        while queue and queue[0].done:
            queue.popleft()
        if not queue and self._timer is not None:
            # Nothing open: no timer outlives the attempts (a run's end, or one request at a time).
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        """Cut off every open attempt whose deadline has come; set the timer for the next deadline."""
        self._timer = None
        assert self._loop is not None
        now = self._loop.time()
        queue = self._queue
        while queue and (queue[0].done or queue[0].deadline <= now):
            watch = queue.popleft()
            if not watch.done:
                watch.expired = True
                watch.task.cancel()
        if queue:
            self._timer = self._loop.call_at(queue[0].deadline, self._expire)


class _Watch:
    """One attempt under :class:`_Deadlines`: ``with`` it around the request."""

    __slots__ = ("_cancelling", "_owner", "deadline", "done", "expired", "task")

    def __init__(self, owner: _Deadlines, task: asyncio.Task[object], deadline: float) -> None:
        self._owner = owner
        self.task = task
        self.deadline = deadline  # loop time
        self._cancelling = task.cancelling()  # cancel requests pending on the task when the attempt began
        self.done = False  # the attempt's block was left
        self.expired = False  # the deadline came first: the task was cancelled for it

    def __enter__(self) -> _Watch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.done = True
        self._owner._settle()
        # As asyncio.timeout: the deadline's cancel request is withdrawn; only when no other one is pending
        # does its CancelledError become a TimeoutError (a stop's cancellation goes on as itself).
        if self.expired and self.task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


def _refused_whole(message: str, alone: int) -> str:
    """The failed part's message when a refusal was taken as the request's (:data:`WHOLE_REFUSAL_IDS`)."""
    how = (
        f"the whole batch and each of {alone} IDs sent alone got this same answer"
        if alone
        else "this endpoint gave whole batches and IDs sent alone this same answer"
    )
    return (
        f"{message} ({how}: taken as a refusal of the request, not of its rows, and not split further; fix the "
        "job or the account, then `pushsync retry RUN`)"
    )


class _Aborted(Exception):
    """Internal: the run was aborted while this batch waited; it is recorded as failed."""


class _NotSent(Exception):
    """Internal: a stop came while this batch waited for its first slot; it is not sent and stays planned."""


@dataclass(slots=True)
class Endpoint:
    """What every attempt at one endpoint shares: its rate budget, its concurrency cap and its counters."""

    budget: Budget
    cap: asyncio.Semaphore
    stats: EndpointStats
    refusal: tuple[int | None, int | str | None, str] | None = None
    """A refusal (status, code, message) the endpoint gave every ID sent alone (:data:`WHOLE_REFUSAL_IDS` of
    them, none accepted): the request's, not its rows'. Until a batch goes through, a batch refused with it is
    recorded failed instead of being split down to single IDs (2n - 1 requests for n IDs, every one refused)."""


class BatchSender:
    """Sends batches one at a time, for every worker of one run; see the module docstring."""

    def __init__(
        self,
        client: PlatformClient,
        settings: DispatchSettings,
        *,
        ledger: RunLedger | None,
        run_id: str,
        stop: asyncio.Event,
        observers: Sequence[DispatchObserver],
        budget_factory: Callable[[str], Budget] | None,
        clock: Clock | None,
        rng: random.Random,
        latency_sample: int,
    ) -> None:
        self._client = client
        self._settings = settings
        self._ledger = ledger
        self._run_id = run_id
        self._stop = stop  # the dispatcher's: read before a first attempt, set on a fatal error
        self._observers = tuple(observers)
        self._budget_factory = budget_factory or self._pooled_budget
        self._pool: BudgetPool | None = None  # the job's budgets and groups, made on first use
        self._clock: Clock | None = clock  # None until first needed: then the running loop
        self._rng = rng
        self._latency_sample = latency_sample  # latencies kept per endpoint
        self._log = get_logger(run=run_id, platform=client.platform)
        # The per-batch debug line is built only when it is written (its level is fixed when the logger is made).
        self._debug = bool(self._log.is_enabled_for(logging.DEBUG))
        self._endpoints: dict[str, Endpoint] = {}
        self._fatal: FatalPlatformError | None = None
        self._done = 0
        # Requests in a row that got no answer at all (refused, DNS, reset), over every endpoint: a server that
        # cannot be reached would otherwise burn every retry of every batch in silence.
        self._no_answer_streak = 0
        # The global cap on requests in flight, over every endpoint (lanes may have more workers than this).
        self._in_flight = asyncio.Semaphore(max(1, settings.concurrency))
        # The client has its own per-request time-out; this one is a guard against a client that forgets it.
        self._guard = settings.request_timeout * 2 + 1
        self._deadlines = _Deadlines(self._guard)

    @property
    def endpoints(self) -> dict[str, Endpoint]:
        """Every endpoint a batch was taken for, in order of first use."""
        return self._endpoints

    @property
    def fatal(self) -> FatalPlatformError | None:
        """The first fatal platform error (401/403), which aborted the run; None if there was none."""
        return self._fatal

    @property
    def done(self) -> int:
        """Batches whose final result is recorded."""
        return self._done

    def clock(self) -> Clock:
        """The run's clock: the injected one, else the running loop's."""
        if self._clock is None:
            self._clock = asyncio.get_running_loop()
        return self._clock

    def endpoint_cap(self, name: str) -> int:
        """The most requests to endpoint ``name`` in flight at once (``"*"``: for endpoints not named)."""
        caps = self._settings.per_endpoint_concurrency
        return caps.get(name, caps.get("*", self._settings.concurrency))

    def _endpoint(self, name: str) -> Endpoint:
        ep = self._endpoints.get(name)
        if ep is None:
            cap = self.endpoint_cap(name)
            ep = Endpoint(self._budget_factory(name), asyncio.Semaphore(max(1, cap)), EndpointStats(name))
            self._endpoints[name] = ep
        return ep

    def _pooled_budget(self, endpoint: str) -> Budget:
        if self._pool is None:
            self._pool = BudgetPool.from_settings(self._settings, clock=self.clock())
        return self._pool.budget(endpoint)

    def finishing(self, endpoint: str | None, on: bool = True) -> None:
        """Every batch of ``endpoint``'s lane (None: of a plain plan's phase, every endpoint) was taken by a
        worker (``on``): only their attempts are left, and its budget closes up the slots that remain, so the
        run's last window ends sooner (:meth:`sync.dispatch.budget.EndpointBudget.finishing`); ``on=False``: a
        lane of the endpoint starts (a later phase). Other budgets (the coordinated workers' shared ones) are
        left as they are."""
        names = list(self._endpoints) if endpoint is None else [endpoint]
        for name in names:
            ep = self._endpoints.get(name)
            if ep is not None and isinstance(ep.budget, EndpointBudget | RateBudget):
                ep.budget.finishing(on)

    @property
    def pool(self) -> BudgetPool | None:
        """The job's budgets and groups (None when a ``budget_factory`` made the budgets, or none was needed)."""
        return self._pool

    async def process(self, batch: Batch) -> None:
        """Send ``batch`` (split on 400, retried when retryable) and record its result; never raises for
        platform errors. A batch a stop kept from its first attempt is left ``planned``, uncounted."""
        clock = self.clock()
        ep = self._endpoint(batch.endpoint)
        stats = ep.stats
        stats.batches += 1
        started = clock.time()
        for observer in self._observers:
            observer.on_batch_start(batch)
        attempts = 0
        ok_ids = 0
        failed_ids = 0
        rejected: list[RejectedId] = []
        last_status: int | None = None
        last_code: int | str | None = None
        last_message = ""
        fatal: FatalPlatformError | None = None
        pending = [batch]  # a stack: halves of a refused batch are pushed back
        confirmed_rows: list[bytes] = []  # row keys of the parts of a split batch the platform confirmed
        refusal: tuple[int | None, int | str | None, str] | None = None  # the whole batch's, when refused
        alone = 0  # IDs sent alone and refused exactly as the whole batch was
        while pending:
            part = pending.pop()
            try:
                used, status = await self._send_with_retries(part, ep, first=part is batch)
                attempts += used
                last_status = status
                ok_ids += len(part.ext_ids)
                if part is not batch:
                    confirmed_rows.append(part.row_keys)
                else:
                    ep.refusal = None  # the endpoint takes a whole batch again
            except _AttemptsError as exc:
                attempts += exc.attempts
                err = exc.error
                last_status, last_code, last_message = err.status, err.code, err.message
                if isinstance(err, RejectedBatchError):
                    said = (err.status, err.code, err.message)
                    if part is batch:
                        refusal = said
                    if said == refusal and not ok_ids and (ep.refusal == said or alone >= WHOLE_REFUSAL_IDS):
                        # The request is refused, not its rows: the rest is failed (retry it once the job or
                        # the account is fixed), not split down to single IDs, and so are this endpoint's
                        # next batches that get the same answer.
                        ep.refusal = said
                        failed_ids += len(part.ext_ids) + sum(len(p.ext_ids) for p in pending)
                        pending.clear()
                        last_message = _refused_whole(err.message, alone)
                        continue
                    halves = self._client.split(part)
                    if halves is not None:
                        stats.splits += 1
                        pending.extend(reversed(halves))
                        continue
                    if said == refusal:
                        alone += len(part.ext_ids)
                    rejected.extend(
                        RejectedId(ext_id, err.code, err.message, part.origins.get(ext_id))
                        for ext_id in part.ext_ids
                    )
                elif isinstance(err, FatalPlatformError):
                    fatal = err
                    failed_ids += len(part.ext_ids) + sum(len(p.ext_ids) for p in pending)
                    pending.clear()
                else:
                    failed_ids += len(part.ext_ids)
            except _Aborted:
                failed_ids += len(part.ext_ids) + sum(len(p.ext_ids) for p in pending)
                pending.clear()
                last_message = "not sent: the run was aborted"
            except _NotSent:
                stats.batches -= (
                    1  # never sent: it stays planned, counted as unfinished, like a batch not taken
                )
                self._log.debug("batch.not_sent", endpoint=batch.endpoint, batch=batch.batch_id)
                return
        if failed_ids:
            status_ = BatchStatus.FAILED
        elif rejected:
            status_ = BatchStatus.REJECTED
        else:
            status_ = BatchStatus.OK
        result = BatchResult(
            batch_id=batch.batch_id,
            endpoint=batch.endpoint,
            operation=batch.operation,
            status=status_,
            attempts=attempts,
            http_status=last_status,
            code=None if status_ is BatchStatus.OK else last_code,
            message="" if status_ is BatchStatus.OK else last_message,
            ok_ids=ok_ids,
            rejected=tuple(rejected),
            started_at=started,
            finished_at=clock.time(),
            # A failed batch counts as unknown row by row on resume and retry; its parts that went through are
            # not (a retry sent their events a second time). A rejected one needs none: its unrefused IDs count.
            confirmed_rows=b"".join(confirmed_rows) if status_ is BatchStatus.FAILED else b"",
        )
        # Recorded synchronously: no await between knowing the result and writing it.
        stats.ids_ok += ok_ids
        stats.ids_rejected += len(rejected)
        stats.ids_failed += failed_ids
        if self._ledger is not None:
            self._ledger.record_result(self._run_id, result)
        self._done += 1
        for observer in self._observers:
            observer.on_batch_done(batch, result)
        if self._debug:
            self._log.debug(
                "batch.done",
                endpoint=batch.endpoint,
                batch=batch.batch_id,
                status=str(status_),
                attempts=attempts,
            )
        if status_ is BatchStatus.FAILED and attempts and fatal is None:
            # An on-call engineer must see why IDs failed without turning on debug logs.
            self._log.warning(
                "batch.failed",
                endpoint=batch.endpoint,
                batch=batch.batch_id,
                attempts=attempts,
                status=last_status,
                ids=failed_ids,
                error=last_message,
            )
        if fatal is not None and self._fatal is None:
            self._fatal = fatal
            self._log.error("run.abort", endpoint=batch.endpoint, status=fatal.status, error=fatal.message)
            # Abort at once: whoever waits for a slot gives up now; requests already in flight finish.
            for other in self._endpoints.values():
                other.budget.close()
            self._stop.set()

    async def _send_with_retries(self, part: Batch, ep: Endpoint, *, first: bool) -> tuple[int, int]:
        """Send one (sub-)batch until it succeeds; returns (attempts, HTTP status) or raises _AttemptsError.

        ``first``: this is the batch itself, not a half of it: its first attempt moves it to ``sent``.
        """
        clock = self.clock()
        policy = self._settings.retry
        stats = ep.stats
        meter = meter_of(ep.budget)
        attempt = 0
        while True:
            if self._fatal is not None:
                if attempt == 0:
                    raise _Aborted
                raise _AttemptsError(attempt, self._fatal)
            async with ep.cap:
                try:
                    await ep.budget.acquire()
                except BudgetClosedError:
                    if attempt == 0:
                        raise _Aborted from None
                    raise _AttemptsError(attempt, self._fatal or FatalPlatformError("run aborted")) from None
                released_at = clock.time()  # the margin before a window's end must cover release to arrival
                # The global slot is taken only once the budget released this attempt: a task waiting for a
                # slow endpoint's budget must not hold a slot that a fast endpoint could use.
                await self._in_flight.acquire()
                try:
                    if self._fatal is not None:  # the run aborted while this attempt waited for a slot
                        if attempt == 0:
                            raise _Aborted
                        raise _AttemptsError(attempt, self._fatal)
                    if first and attempt == 0 and self._stop.is_set():
                        # Stopping: only requests already out (and their retries) finish. With lanes, more
                        # batches wait for a slot than requests may be in flight; none of them starts now.
                        raise _NotSent
                    if first and attempt == 0 and self._ledger is not None:
                        self._ledger.record_sent(self._run_id, part.batch_id)
                        if part.operation in _NOT_IDEMPOTENT:
                            # Durable before the request leaves: a resume must know this batch may have been
                            # applied, or it would send the events (or pushed values) a second time.
                            await self._ledger.flush_async()
                    attempt += 1
                    stats.requests += 1
                    now = clock.time()
                    if stats.first_request is None:
                        stats.first_request = now
                    stats.last_request = now
                    if meter is not None and meter.ceiling is not None:
                        window = meter.window_of(now)
                        stats.per_window[window] = stats.per_window.get(window, 0) + 1
                    sent_at = time.time()
                    try:
                        with self._deadlines.watch():
                            outcome = await self._client.send(part)
                    except TimeoutError as exc:
                        error: RetryableError | RejectedBatchError | FatalPlatformError = RetryableError(
                            f"no answer within {self._guard:.0f} s"
                        )
                        error.__cause__ = exc
                    except (RetryableError, RejectedBatchError, FatalPlatformError) as exc:
                        error = exc
                    else:
                        ep.budget.observe(clock.time() - released_at)
                        self._sample_latency(stats, outcome.latency)
                        self._attempt_done(
                            Attempt(
                                part.batch_id,
                                part.endpoint,
                                attempt,
                                len(part.ext_ids),
                                outcome.latency,
                                AttemptOutcome.OK,
                                outcome.http_status,
                            ),
                            sent_at,
                        )
                        ep.budget.on_success(outcome.remaining, outcome.reset_after)
                        self._no_answer_streak = 0
                        return attempt, outcome.http_status
                    latency = clock.time() - now
                    if error.status is not None:  # an answer (a time-out or a dropped connection is none)
                        ep.budget.observe(clock.time() - released_at)
                        self._no_answer_streak = 0
                    self._sample_latency(stats, latency)
                    self._attempt_done(
                        Attempt(
                            part.batch_id,
                            part.endpoint,
                            attempt,
                            len(part.ext_ids),
                            latency,
                            _outcome_of(error),
                            error.status,
                            error.message,
                        ),
                        sent_at,
                    )
                finally:
                    self._in_flight.release()
            if isinstance(error, RetryableError) and error.no_connection:
                self._no_answer_streak += 1
                limit = self._settings.abort_after_connection_failures
                if limit and self._no_answer_streak >= limit and self._fatal is None:
                    raise _AttemptsError(
                        attempt,
                        FatalPlatformError(
                            f"the server cannot be reached: {self._no_answer_streak} requests in a row got no "
                            f"answer (last: {error.message}); check destination.base_url and the network"
                        ),
                    )
            if isinstance(error, RetryableError):
                if error.rate_limited:
                    stats.rate_limited += 1
                if _waits_too_long(error, policy.max_retry_after):
                    raise _AttemptsError(attempt, _too_long_to_wait(error, policy.max_retry_after))
                if error.rate_limited:
                    # The pause applies to the whole endpoint: every task's next acquire() waits for it.
                    ep.budget.on_rate_limited(error.retry_after, error.remaining)
                if attempt >= policy.max_attempts:
                    raise _AttemptsError(attempt, error)
                stats.retries += 1
                if not error.rate_limited:
                    # A 429 waits in the budget (its pause holds every task of the endpoint), not here.
                    await clock_sleep(clock, backoff_delay(policy, attempt, error, self._rng))
                continue
            raise _AttemptsError(attempt, error)

    def _attempt_done(self, attempt: Attempt, sent_at: float) -> None:
        """Record one HTTP attempt in the ledger and tell the observers (synchronously: before any await)."""
        if self._ledger is not None:
            self._ledger.record_attempt(self._run_id, attempt, started_at=sent_at)
        for observer in self._observers:
            observer.on_attempt(attempt)

    def _sample_latency(self, stats: EndpointStats, latency: float) -> None:
        sample_latency(stats, latency, self._rng, self._latency_sample)


def _waits_too_long(error: RetryableError, limit: float) -> bool:
    """The server stated (``Retry-After``) a wait longer than the job's ``retry.max_retry_after``."""
    wait = error.retry_after
    return wait is not None and wait > limit and not error.retry_after_estimated


def _too_long_to_wait(error: RetryableError, limit: float) -> FatalPlatformError:
    """The run's stop for a stated wait over ``limit``. Waiting ``limit`` and asking again, as before, met the
    same answer every time: a quota reset a day away kept a run knocking every 5 minutes for hours, every batch
    failing in the end, with no line saying why."""
    wait = error.retry_after or 0.0
    said = f"{wait:,.0f} s" + (f" ({wait / 3600:.1f} h)" if wait >= 3600 else "")
    return FatalPlatformError(
        f"{error.message}: the platform asks to wait {said} (Retry-After), longer than retry.max_retry_after "
        f"({limit:g} s): the run stops — resume it (pushsync resume RUN) after that time, or raise "
        "retry.max_retry_after to wait it out",
        status=error.status,
        code=error.code,
    )


def _outcome_of(error: RetryableError | RejectedBatchError | FatalPlatformError) -> AttemptOutcome:
    if isinstance(error, RetryableError):
        return AttemptOutcome.RATE_LIMITED if error.rate_limited else AttemptOutcome.RETRYABLE
    if isinstance(error, RejectedBatchError):
        return AttemptOutcome.REJECTED
    return AttemptOutcome.FATAL


class _AttemptsError(Exception):
    """Internal: a (sub-)batch ended in ``error`` after ``attempts`` attempts."""

    def __init__(
        self, attempts: int, error: RetryableError | RejectedBatchError | FatalPlatformError
    ) -> None:
        super().__init__(error.message)
        self.attempts = attempts
        self.error = error
