"""Prometheus metrics for long runs: served on ``--metrics-port`` or written to a node_exporter textfile.

One :class:`RunMetrics` per run, with its *own* :class:`prometheus_client.CollectorRegistry` (never the global
default one: two runs in one process — or two tests — must not share counters). The dispatcher reports to it
through :class:`sync.dispatch.DispatchObserver` (batch taken, attempt ended, batch done), so nothing in the
dispatcher knows about Prometheus.

Series (all prefixed ``pushsync_``; documented for operators in docs/operations.md):

==========================================  =========  =================================================
``requests_total{endpoint,status}``          counter    HTTP attempts; ``status`` is the HTTP status, or
                                                        ``none`` when no answer came (time-out, drop)
``ids_total{endpoint,outcome}``              counter    IDs of finished batches: ok | rejected | failed
``batches_total{endpoint,status}``           counter    finished batches: ok | rejected | failed
``rate_limited_total{endpoint}``             counter    429 answers
``retries_total{endpoint}``                  counter    attempts that repeat a failed attempt
``request_latency_seconds{endpoint}``        histogram  time per attempt
``current_rate{endpoint}``                   gauge      requests per second over the last ``window`` s
``budget_rate{endpoint}``                    gauge      the endpoint's configured budget, requests per second
``inflight_batches``                         gauge      batches taken by a worker and not yet finished
``run_info{run_id,job,platform}``            gauge      always 1: which run these series describe
``run_start_time_seconds``                   gauge      Unix time the run started
``last_update_time_seconds``                 gauge      Unix time of the last attempt or result (staleness)
==========================================  =========  =================================================

Thread safety: the HTTP exporter scrapes from its own thread while the event loop records; prometheus_client's
metrics lock internally, and the sliding window behind ``current_rate`` has its own lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
    write_to_textfile,
)

from sync.errors import StateError
from sync.records import Attempt, AttemptOutcome, Batch, BatchResult, BatchStatus

__all__ = [
    "LATENCY_BUCKETS",
    "SERIES",
    "MetricsServer",
    "RunMetrics",
]

# Seconds. Shared with the run report's latency histogram so both tell the same story.
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

SERIES: tuple[str, ...] = (
    "pushsync_requests_total",
    "pushsync_ids_total",
    "pushsync_batches_total",
    "pushsync_rate_limited_total",
    "pushsync_retries_total",
    "pushsync_request_latency_seconds",
    "pushsync_current_rate",
    "pushsync_budget_rate",
    "pushsync_inflight_batches",
    "pushsync_run_info",
    "pushsync_run_start_time_seconds",
    "pushsync_last_update_time_seconds",
)
"""Every metric family a run exposes (the docs' table and the tests use this list)."""


class _Window:
    """Timestamps of recent requests per endpoint, for a requests-per-second gauge read at scrape time."""

    __slots__ = ("_clock", "_lock", "_seconds", "_times")

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self._seconds: float = seconds  # width of the sliding window
        self._clock: Callable[[], float] = clock  # monotonic seconds; injectable so tests never sleep
        self._times: dict[str, deque[float]] = {}  # endpoint -> request times within the window
        self._lock = threading.Lock()  # the exporter thread reads while the event loop appends

    def add(self, endpoint: str) -> None:
        now = self._clock()
        with self._lock:
            times = self._times.setdefault(endpoint, deque())
            times.append(now)
            self._trim(times, now)

    def rate(self, endpoint: str) -> float:
        now = self._clock()
        with self._lock:
            times = self._times.get(endpoint)
            if not times:
                return 0.0
            self._trim(times, now)
            return len(times) / self._seconds

    def _trim(self, times: deque[float], now: float) -> None:
        horizon = now - self._seconds
        while times and times[0] <= horizon:
            times.popleft()


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running exporter: ``port`` is the bound port (useful with ``port=0``); call :meth:`close`."""

    host: str
    port: int
    server: WSGIServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and join the exporter thread."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class RunMetrics:
    """The metrics of one run, in a registry of their own. Implements :class:`sync.dispatch.DispatchObserver`."""

    def __init__(
        self,
        *,
        run_id: str = "",
        job: str = "",
        platform: str = "",
        budgets: Mapping[str, float | None] | None = None,
        budget_for: Callable[[str], float | None] | None = None,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = CollectorRegistry()
        self._wall: Callable[[], float] = wall_clock  # Unix time for the *_time_seconds gauges
        self._window = _Window(window, clock)
        self._known: set[str] = set()  # endpoints whose current_rate gauge is wired to the window
        self._budget_for = budget_for  # an endpoint's budget in requests/s, asked when it is first seen
        r = self.registry
        self.requests = Counter(
            "pushsync_requests_total",
            "HTTP attempts by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.ids = Counter(
            "pushsync_ids_total", "IDs of finished batches by outcome", ["endpoint", "outcome"], registry=r
        )
        self.batches = Counter(
            "pushsync_batches_total", "Finished batches by status", ["endpoint", "status"], registry=r
        )
        self.rate_limited = Counter("pushsync_rate_limited_total", "429 answers", ["endpoint"], registry=r)
        self.retries = Counter(
            "pushsync_retries_total", "Attempts that repeat a failed attempt", ["endpoint"], registry=r
        )
        self.latency = Histogram(
            "pushsync_request_latency_seconds",
            "Time per HTTP attempt",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.current_rate = Gauge(
            "pushsync_current_rate",
            f"Requests per second over the last {window:g} s",
            ["endpoint"],
            registry=r,
        )
        self.budget_rate = Gauge(
            "pushsync_budget_rate", "Configured rate budget, requests per second", ["endpoint"], registry=r
        )
        self.inflight = Gauge("pushsync_inflight_batches", "Batches in flight", registry=r)
        self.run_info = Gauge(
            "pushsync_run_info",
            "The run these series describe (always 1)",
            ["run_id", "job", "platform"],
            registry=r,
        )
        self.started = Gauge("pushsync_run_start_time_seconds", "Unix time the run started", registry=r)
        self.updated = Gauge(
            "pushsync_last_update_time_seconds", "Unix time of the last attempt or result", registry=r
        )
        self.bind(run_id=run_id, job=job, platform=platform)
        for endpoint, rate in (budgets or {}).items():
            self.set_budget(endpoint, rate)

    def bind(
        self,
        *,
        run_id: str,
        job: str,
        platform: str,
        budget_for: Callable[[str], float | None] | None = None,
    ) -> None:
        """Say which run the series describe (the runner calls it once the run has its ID)."""
        self.run_info.clear()
        self.run_info.labels(run_id, job, platform).set(1)
        if budget_for is not None:
            self._budget_for = budget_for
            for endpoint in self._known:
                self.set_budget(endpoint, budget_for(endpoint))
        now = self._wall()
        self.started.set(now)
        self.updated.set(now)

    # -- recording -------------------------------------------------------------------------------------------

    def _endpoint(self, endpoint: str) -> None:
        if endpoint not in self._known:
            self._known.add(endpoint)
            # Read at scrape time, so the gauge falls to 0 when the endpoint goes quiet.
            self.current_rate.labels(endpoint).set_function(lambda: self._window.rate(endpoint))
            # Create the children now, so a scrape shows 0 rather than no series before the first 429/retry.
            self.rate_limited.labels(endpoint)
            self.retries.labels(endpoint)
            if self._budget_for is not None:
                self.set_budget(endpoint, self._budget_for(endpoint))

    def set_budget(self, endpoint: str, rate: float | None) -> None:
        """The endpoint's budget in requests per second (None: no budget configured, the series is absent)."""
        if rate is not None and endpoint != "*":
            self._endpoint(endpoint)
            self.budget_rate.labels(endpoint).set(rate)

    def on_batch_start(self, batch: Batch) -> None:
        self._endpoint(batch.endpoint)
        self.inflight.inc()

    def on_attempt(self, attempt: Attempt) -> None:
        ep = attempt.endpoint
        self._endpoint(ep)
        self._window.add(ep)
        status = "none" if attempt.http_status is None else str(attempt.http_status)
        self.requests.labels(ep, status).inc()
        self.latency.labels(ep).observe(max(attempt.latency, 0.0))
        if attempt.outcome is AttemptOutcome.RATE_LIMITED:
            self.rate_limited.labels(ep).inc()
        if attempt.retry:
            self.retries.labels(ep).inc()
        self.updated.set(self._wall())

    def on_batch_done(self, batch: Batch, result: BatchResult) -> None:
        ep = batch.endpoint
        self.inflight.dec()
        rejected = len(result.rejected)
        failed = len(batch.ext_ids) - result.ok_ids - rejected if result.status is BatchStatus.FAILED else 0
        for outcome, n in (("ok", result.ok_ids), ("rejected", rejected), ("failed", failed)):
            self.ids.labels(ep, outcome).inc(n)  # inc(0) still creates the series: all three always present
        self.batches.labels(ep, str(result.status)).inc()
        self.updated.set(self._wall())

    # -- exposing --------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def exporting(
        self,
        *,
        port: int | None = None,
        textfile: str | Path | None = None,
        host: str = "0.0.0.0",
        every: float = 10.0,
    ) -> AsyncIterator[MetricsServer | None]:
        """Serve ``/metrics`` on ``port`` and/or rewrite ``textfile`` every ``every`` seconds while the block runs;
        the textfile is written once more on the way out, so it ends with the run's final figures. Yields the
        server (None without ``port``). A port already in use raises :class:`OSError` before anything runs."""
        server = self.serve(port, host) if port is not None else None
        writer: asyncio.Task[None] | None = None
        try:
            if textfile is not None:
                self.write_textfile(textfile)
                writer = asyncio.create_task(self._rewrite(textfile, every), name="metrics-textfile")
            yield server
        finally:
            if writer is not None:
                writer.cancel()
                await asyncio.wait([writer])  # waits for the writer without swallowing our own cancellation
            if textfile is not None:
                self.write_textfile(textfile)
            if server is not None:
                server.close()

    async def _rewrite(self, textfile: str | Path, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            # A thread: the write is file I/O, and the event loop carries the run.
            await asyncio.to_thread(self.write_textfile, textfile)

    def serve(self, port: int, host: str = "0.0.0.0") -> MetricsServer:
        """Serve ``/metrics`` from prometheus_client's own thread (the event loop is not involved)."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:  # e.g. the port is taken: say so before anything is sent
            raise StateError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        return MetricsServer(host=host, port=server.server_port, server=server, thread=thread)

    def write_textfile(self, path: str | Path) -> None:
        """Write the node_exporter textfile atomically (a temporary file renamed over ``path``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), self.registry)
