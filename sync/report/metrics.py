"""Prometheus metrics for long runs: served on ``--metrics-port`` or written to a node_exporter textfile.

One :class:`RunMetrics` per run, with its *own* :class:`prometheus_client.CollectorRegistry` (never the global
default one: two runs in one process — or two tests — must not share counters). The dispatcher reports to it
through :class:`sync.dispatch.dispatch.DispatchObserver` (batch taken, attempt ended, batch done), so nothing in the
dispatcher knows about Prometheus.

Series (all prefixed ``pushsync_``, every one labelled ``job``; documented for operators in docs/operations.md):

============================================  =========  ===============================================
``requests_total{endpoint,status}``            counter    HTTP attempts; ``status`` is the HTTP status, or
                                                          ``none`` when no answer came (time-out, drop)
``ids_total{endpoint,outcome}``                counter    IDs of finished batches: ok | rejected | failed
``batches_total{endpoint,status}``             counter    finished batches: ok | rejected | failed
``rate_limited_responses_total{endpoint}``     counter    429 answers
``retries_total{endpoint}``                    counter    attempts that repeat a failed attempt
``request_latency_seconds{endpoint}``          histogram  time per attempt
``current_requests_per_second{endpoint}``      gauge      requests per second over the last ``window`` s
``budget_requests_per_second{endpoint}``       gauge      the endpoint's configured budget
``inflight_batches``                           gauge      batches taken by a worker and not yet finished
``run_info{run_id,platform}``                  gauge      always 1: which run these series describe
``run_start_time_seconds``                     gauge      Unix time the run started
``last_update_time_seconds``                   gauge      Unix time of the last attempt or result (staleness)
``exit_code``                                  gauge      the run's exit code, once it has ended
``last_success_time_seconds``                  gauge      Unix time the job last ended with exit 0
============================================  =========  ===============================================

The ``job`` label is added at collection time (:class:`_JobLabelled`), so every series carries it whichever
component created the series and whenever the run was bound; the ``*_created`` series prometheus_client adds
to counters and histograms are dropped there too (a batch job's series start with the run anyway).

Thread safety: the HTTP exporter scrapes from its own thread while the event loop records; prometheus_client's
metrics lock internally, and the sliding window behind ``current_rate`` has its own lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import tempfile
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    pushadd_to_gateway,
    start_http_server,
    write_to_textfile,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

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
    "pushsync_rate_limited_responses_total",
    "pushsync_retries_total",
    "pushsync_request_latency_seconds",
    "pushsync_current_requests_per_second",
    "pushsync_budget_requests_per_second",
    "pushsync_inflight_batches",
    "pushsync_run_info",
    "pushsync_run_start_time_seconds",
    "pushsync_last_update_time_seconds",
)
"""Every metric family a run exposes while it runs (the docs' table and the tests use this list)."""

FINAL_SERIES: tuple[str, ...] = ("pushsync_exit_code", "pushsync_last_success_time_seconds")
"""The families set when the run ends (:meth:`RunMetrics.finish`); ``last_success_time_seconds`` only after a
successful run, or carried over from an earlier textfile / left in place at the Pushgateway."""


class _JobLabelled:
    """A collector that serves another registry's families with ``job`` added to every sample and without the
    ``*_created`` samples (Prometheus' batch-job convention: every series of one job is found by ``job``)."""

    def __init__(self, inner: CollectorRegistry, job: Callable[[], str]) -> None:
        self._inner = inner  # where the metrics are created and recorded
        self._job = job  # read at each scrape: the run may be bound after its series were created

    def collect(self) -> list[Metric]:
        job = self._job()
        out = []
        for family in self._inner.collect():
            metric = Metric(family.name, family.documentation, family.type, family.unit)
            metric.samples = [
                s._replace(labels={"job": job, **s.labels})
                for s in family.samples
                if not s.name.endswith("_created")
            ]
            out.append(metric)
        return out


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
    """The metrics of one run, in a registry of their own. Implements :class:`sync.dispatch.dispatch.DispatchObserver`."""

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
        self._job = job  # the job label of every series
        self.instance: str | None = None
        """Set by a worker of a coordinated run (docs/scaling.md): its pushes are grouped by ``instance`` too, so
        the workers of one job do not overwrite each other's metrics in the Pushgateway."""
        inner = CollectorRegistry()
        self.registry = CollectorRegistry()
        """What is exposed: ``inner``'s families with the ``job`` label (see :class:`_JobLabelled`)."""
        self.registry.register(_JobLabelled(inner, lambda: self._job))
        self._targets: tuple[Path | None, str | None] = (
            None,
            None,
        )  # textfile, Pushgateway URL while exporting
        self._wall: Callable[[], float] = wall_clock  # Unix time for the *_time_seconds gauges
        self._window = _Window(window, clock)
        self._known: set[str] = set()  # endpoints whose current_rate gauge is wired to the window
        # Labelled children by their labels, looked up once: ``labels()`` builds and checks a key under a lock on
        # every call, which the hot path pays per attempt and per batch.
        self._children: dict[tuple[str, ...], Any] = {}
        self._budget_for = budget_for  # an endpoint's budget in requests/s, asked when it is first seen
        r = inner
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
        self.rate_limited = Counter(
            "pushsync_rate_limited_responses_total", "429 answers", ["endpoint"], registry=r
        )
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
            "pushsync_current_requests_per_second",
            f"Requests per second over the last {window:g} s",
            ["endpoint"],
            registry=r,
        )
        self.budget_rate = Gauge(
            "pushsync_budget_requests_per_second",
            "Configured rate budget, requests per second",
            ["endpoint"],
            registry=r,
        )
        self.inflight = Gauge("pushsync_inflight_batches", "Batches in flight", registry=r)
        self.run_info = Gauge(
            "pushsync_run_info",
            "The run these series describe (always 1)",
            ["run_id", "platform"],
            registry=r,
        )
        # Per batch, the in-flight count and the time of the last update are plain attributes the two gauges
        # read at scrape time: a gauge's set() or inc() takes a lock, which the hot path would pay per request.
        self._inflight = 0
        self._updated_at = 0.0
        self.inflight.set_function(lambda: self._inflight)
        self._done_seen: set[str] = set()  # endpoints whose three ids_total series exist
        self.started = Gauge("pushsync_run_start_time_seconds", "Unix time the run started", registry=r)
        self.updated = Gauge(
            "pushsync_last_update_time_seconds", "Unix time of the last attempt or result", registry=r
        )
        self.updated.set_function(lambda: self._updated_at)
        self._final = r  # finish() adds the end-of-run gauges here, so a running job does not show them yet
        self._exit_code: Gauge | None = None  # pushsync_exit_code, once finish() was called
        self._last_success: Gauge | None = None  # pushsync_last_success_time_seconds, when one is known
        self._carried_success: float | None = None  # an earlier run's last success, read from the textfile
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
        self._job = job
        self.run_info.clear()
        self.run_info.labels(run_id, platform).set(1)
        if budget_for is not None:
            self._budget_for = budget_for
            for endpoint in self._known:
                self.set_budget(endpoint, budget_for(endpoint))
        now = self._wall()
        self.started.set(now)
        self._updated_at = now

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
        self._inflight += 1

    def _child(self, family: Any, *labels: str) -> Any:
        key = (str(id(family)), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def on_attempt(self, attempt: Attempt) -> None:
        ep = attempt.endpoint
        self._endpoint(ep)
        self._window.add(ep)
        status = "none" if attempt.http_status is None else str(attempt.http_status)
        self._child(self.requests, ep, status).inc()
        self._child(self.latency, ep).observe(max(attempt.latency, 0.0))
        if attempt.outcome is AttemptOutcome.RATE_LIMITED:
            self._child(self.rate_limited, ep).inc()
        if attempt.retry:
            self._child(self.retries, ep).inc()
        self._updated_at = self._wall()

    def on_batch_done(self, batch: Batch, result: BatchResult) -> None:
        ep = batch.endpoint
        self._inflight -= 1
        rejected = len(result.rejected)
        failed = len(batch.ext_ids) - result.ok_ids - rejected if result.status is BatchStatus.FAILED else 0
        first = ep not in self._done_seen
        self._done_seen.add(ep)
        for outcome, n in (("ok", result.ok_ids), ("rejected", rejected), ("failed", failed)):
            if n or first:  # inc(0) creates the series: all three are present from the first result on
                self._child(self.ids, ep, outcome).inc(n)
        self._child(self.batches, ep, str(result.status)).inc()
        self._updated_at = self._wall()

    # -- exposing --------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def exporting(
        self,
        *,
        port: int | None = None,
        textfile: str | Path | None = None,
        pushgateway: str | None = None,
        host: str = "0.0.0.0",
        every: float = 10.0,
        server: MetricsServer | None = None,
    ) -> AsyncIterator[MetricsServer | None]:
        """Serve ``/metrics`` on ``port``, and/or rewrite ``textfile`` and push to ``pushgateway`` every ``every``
        seconds while the block runs; both are written once more on the way out, so they end with the run's
        final figures (and :meth:`finish` writes them again with the exit code). Yields the server (None
        without ``port``). A port already in use raises :class:`StateError` before anything runs. ``server``: an
        exporter :meth:`serve` started already (instead of ``port``); its caller closes it."""
        own = server is None and port is not None
        if own and port is not None:
            server = self.serve(port, host)
        self._targets = (None if textfile is None else Path(textfile), pushgateway)
        # Read before the first write replaces the file: a failed run carries the last success over.
        self._carried_success = _previous_success(self._targets[0])
        writer: asyncio.Task[None] | None = None
        try:
            if textfile is not None or pushgateway is not None:
                await asyncio.to_thread(self.publish)
                writer = asyncio.create_task(self._republish(every), name="metrics-publish")
            yield server
        finally:
            if writer is not None:
                writer.cancel()
                await asyncio.wait([writer])  # waits for the writer without swallowing our own cancellation
            # A thread: a slow Pushgateway must not hold the event loop (in-flight work may still be draining).
            await asyncio.shield(asyncio.to_thread(self.publish))
            if own and server is not None:
                server.close()

    async def _republish(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            # A thread: file and network I/O, and the event loop carries the run.
            await asyncio.to_thread(self.publish)

    def publish(self) -> None:
        """Write the textfile and push to the Pushgateway given to :meth:`exporting` (either, both or none).

        A Pushgateway that cannot be reached is logged, never fatal: metrics must not fail a sync."""
        textfile, gateway = self._targets
        if textfile is not None:
            try:
                self.write_textfile(textfile)
            except OSError as exc:  # a full disk, a directory removed meanwhile: the sync goes on
                from sync.logs import get_logger

                get_logger(job=self._job).warning(
                    "metrics.write_failed", path=str(textfile), error=f"{type(exc).__name__}: {exc}"
                )
        if gateway is not None:
            self.push(gateway)

    def push(self, gateway: str) -> None:
        """Push to a Prometheus Pushgateway, grouped by ``job`` (POST: a family this push lacks — the last
        success time after a failed run — keeps the value an earlier push left)."""
        from sync.logs import get_logger
        from sync.redact import redact

        try:
            pushadd_to_gateway(
                gateway,
                job=self._job or "pushsync",
                registry=self.registry,
                timeout=10,
                grouping_key={"instance": self.instance} if self.instance else None,
            )
        except (
            OSError,
            ValueError,
            http.client.HTTPException,
        ) as exc:  # URL errors are ValueError/HTTPException
            get_logger(job=self._job).warning("metrics.push_failed", error=redact(str(exc)))

    @staticmethod
    def check_pushgateway(url: str) -> None:
        """Raise :class:`StateError` (exit 2) when ``url`` cannot be a Pushgateway's address (a port that is no
        number, a broken IPv6 host, a scheme other than http/https), never repeating the URL (it may hold a
        credential). As prometheus_client, a URL without a scheme is ``http://``."""
        full = url.strip() if "://" in url else f"http://{url.strip()}"
        try:
            parts = urllib.parse.urlsplit(full)
            host, _ = parts.hostname, parts.port
        except ValueError as exc:
            raise StateError(f"--metrics-pushgateway is not a usable URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not host:
            raise StateError("--metrics-pushgateway must be an http:// or https:// URL with a host")

    async def finish(self, exit_code: int) -> None:
        """Record how the run ended (``pushsync_exit_code``; on exit 0 also ``pushsync_last_success_time_seconds``)
        and publish once more. Called by the runner after the run's summary is known."""
        if self._exit_code is None:
            self._exit_code = Gauge(
                "pushsync_exit_code", "The run's exit code (0 ok ... 5 crashed)", registry=self._final
            )
        self._exit_code.set(exit_code)
        last_success = self._wall() if exit_code == 0 else self._carried_success
        if last_success is not None:
            if self._last_success is None:
                self._last_success = Gauge(
                    "pushsync_last_success_time_seconds",
                    "Unix time the job last ended with exit code 0",
                    registry=self._final,
                )
            self._last_success.set(last_success)
        self._updated_at = self._wall()
        await asyncio.to_thread(self.publish)

    def serve(self, port: int, host: str = "0.0.0.0") -> MetricsServer:
        """Serve ``/metrics`` from prometheus_client's own thread (the event loop is not involved)."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:  # e.g. the port is taken: say so before anything is sent
            raise StateError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        except OverflowError as exc:  # --metrics-port 70000: a typo in a cron line, not a crash (exit 5)
            raise StateError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        return MetricsServer(host=host, port=server.server_port, server=server, thread=thread)

    @staticmethod
    def check_textfile(path: str | Path) -> None:
        """Raise :class:`StateError` (exit 2) when the textfile cannot be written — its directory cannot be made
        or written — without touching the file itself (it holds the last success time :meth:`exporting` keeps)."""
        path = Path(path)
        try:
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            if any(p.exists() and not p.is_dir() for p in path.parents):
                raise NotADirectoryError(errno.ENOTDIR, f"{path.parent} is not a directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
                pass
        except OSError as exc:
            raise StateError(f"cannot write the metrics textfile {path}: {exc.strerror or exc}") from None

    def write_textfile(self, path: str | Path) -> None:
        """Write the node_exporter textfile atomically (a temporary file renamed over ``path``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), self.registry)


def _previous_success(textfile: Path | None) -> float | None:
    """The last success time an earlier run of the job left in its textfile: a failed run must not erase it,
    or an alert on "no success for 2 days" would fire — or stay silent — for the wrong reason."""
    if textfile is None or not textfile.exists():
        return None
    try:
        for family in text_string_to_metric_families(textfile.read_text(encoding="utf-8")):
            if family.name == "pushsync_last_success_time_seconds" and family.samples:
                return float(family.samples[0].value)
    except (OSError, ValueError):  # unreadable or not ours: no earlier success known
        return None
    return None
