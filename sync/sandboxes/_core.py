"""Platform-independent machinery shared by every sandbox (local emulator of a platform's REST API).

A sandbox is an ``aiohttp.web.Application`` whose API routes sit under one prefix (``/rest/3.0/`` for Netmera).
:class:`SandboxCore` wraps those routes with, in this order::

    route lookup ─ 404/405 ─┐
    authenticate ─ 401/403 ─┤  (platform hook; refused requests are not counted in any rate window)
    rate limit ─── 429 ─────┤  (fixed, clock-aligned windows; rejected requests do not consume quota)
    fault ──────── 500/503, slow, hang, drop, applied-then-500 (seeded, deterministic)
    handler ────── 2xx, or an :class:`ApiError` rendered by the platform
                            └─► stats (per endpoint and status), X-RateLimit-Remaining on limited endpoints

and adds the inspection routes under ``/_sandbox/`` (never rate-limited, never faulted, no API key):

* ``GET  /_sandbox/stats``             counters (see :meth:`SandboxStats.snapshot`)
* ``GET  /_sandbox/state?format=json`` the platform's whole state; ``format=parquet&table=NAME`` one table
* ``POST /_sandbox/reset``             empty the state and the counters (``?what=state|stats|all``)
* ``GET/POST /_sandbox/config``        read / change ``limits``, ``faults`` and ``seed`` at run time

A platform supplies an :class:`InspectableState`, an ``authenticate`` hook and a ``render_error`` hook; the
handlers raise :class:`ApiError` for every refusal. :func:`start_app` runs an app in-process on a host/port
(port 0 picks a free port). Time is read from an injectable clock, sleeps from an injectable ``sleep``.

This module is the sandboxes' one import point for the machinery. The parts live in modules of their own and are
re-exported here (the names in ``__all__`` are pinned by a test)::

    _limits.py  RateLimit, parse_limits, Admission, FixedWindowLimiter    (fixed-window rate limits)
    _faults.py  FaultKind, LatencySpec, FaultSpec, FaultDecision, FaultInjector   (seeded fault injection)
    _stats.py   SandboxStats                                              (counters, /_sandbox/stats)
    _core.py    ApiError, json_response, loads_json, InspectableState, SandboxCore (middleware,
                inspection routes), RunningServer, start_app              (this module)
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from sync.sandboxes._faults import (
    FaultDecision,
    FaultInjector,
    FaultKind,
    FaultSpec,
    LatencySpec,
)
from sync.sandboxes._limits import (
    Admission,
    Clock,
    FixedWindowLimiter,
    RateLimit,
    parse_limits,
)
from sync.sandboxes._stats import SandboxStats

__all__ = [
    "Admission",
    "ApiError",
    "FaultDecision",
    "FaultInjector",
    "FaultKind",
    "FaultSpec",
    "FixedWindowLimiter",
    "InspectableState",
    "LatencySpec",
    "RateLimit",
    "RunningServer",
    "SandboxCore",
    "SandboxStats",
    "json_response",
    "loads_json",
    "parse_limits",
    "start_app",
]

Sleep = Callable[[float], Awaitable[None]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

UNKNOWN_ENDPOINT = "<unknown>"
"""Stats key for requests to paths that match no route (keeps the counters bounded)."""


class ApiError(Exception):
    """A refusal the platform answers with an error body: HTTP ``status``, platform ``code`` and ``message``.

    Handlers raise it; the platform's ``render_error`` hook turns it into the platform's error body.
    """

    def __init__(
        self, status: int, code: int | str | None, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is out of a double's range")
    return value


def loads_json(raw: bytes | str) -> Any:
    """Parse a request body as JSON (RFC 8259) strictly: ``NaN``, ``Infinity`` and ``-Infinity`` raise
    ValueError, as every platform's JSON parser refuses them, whereas Python's ``json.loads`` accepts them (a
    sandbox would take a body the platform refuses, and its state would no longer dump as JSON). So does a
    number beyond a double's range (``1e400``), which Python reads as infinity: kept, it came back in an answer
    as ``Infinity``, which is not JSON. Also ValueError (UnicodeDecodeError) for bytes that are not UTF-8."""
    return json.loads(raw, parse_constant=_not_json, parse_float=_finite)


def json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON response built without aiohttp's slower ``json_response`` helper."""
    return web.Response(
        body=json.dumps(payload, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


# ------------------------------------------------------------------------------------------- the core


class InspectableState(Protocol):
    """What a platform's state offers to the inspection routes."""

    def dump(self) -> dict[str, Any]:
        """The whole state as JSON-ready data (ideally in the same shape the seed loader reads)."""
        ...

    def tables(self) -> Mapping[str, Any]:
        """The state as named polars DataFrames, for ``/_sandbox/state?format=parquet&table=NAME``."""
        ...

    def reset(self) -> None:
        """Empty the state (seeded data included)."""
        ...


Authenticate = Callable[[web.Request], str]
"""Returns the client's identity (the limiter key) or raises :class:`ApiError` (401/403)."""
RenderError = Callable[[ApiError], web.StreamResponse]


class SandboxCore:
    """Rate limits, faults, stats and inspection around a platform's API routes (see the module docstring).

    Build it, put :attr:`middleware` in the app's middlewares and call :meth:`add_inspection_routes`. API routes
    must be named after their endpoint (``router.add_post(path, handler, name="tagUsers")``); the endpoint name
    is the key for limits, faults and stats.
    """

    def __init__(
        self,
        *,
        api_prefix: str,
        authenticate: Authenticate,
        render_error: RenderError,
        limits: Mapping[str, RateLimit] | None = None,
        groups: Mapping[str, str] | None = None,
        faults: FaultSpec | None = None,
        seed: int = 0,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        stats_window: float = 60.0,
        rate_limit_error: Callable[[Admission], ApiError] | None = None,
        fault_error: Callable[[FaultKind], ApiError] | None = None,
    ) -> None:
        self.api_prefix = api_prefix
        self._authenticate = authenticate
        self._render_error = render_error
        self._sleep = sleep
        self._rate_limit_error = rate_limit_error or (
            lambda adm: ApiError(429, 429, f"rate limit exceeded; retry in {adm.retry_after} s")
        )
        self._fault_error = fault_error or (
            lambda kind: (
                ApiError(503, 503, "service unavailable")
                if kind is FaultKind.ERROR_503
                else ApiError(500, 500, "internal error")
            )
        )
        self.limiter = FixedWindowLimiter(limits, groups=groups, clock=clock)
        self.faults = FaultInjector(faults, seed)
        self.stats = SandboxStats(clock=clock, window_seconds=stats_window)
        self._closing = asyncio.Event()  # set on close: hung requests give up and drop their connection

    # -- configuration ----------------------------------------------------------------------------------

    def configure(
        self,
        *,
        limits: Mapping[str, RateLimit] | None = None,
        faults: FaultSpec | None = None,
        seed: int | None = None,
    ) -> None:
        """Change limits, faults and/or the fault seed at run time (None leaves a setting as it is)."""
        if limits is not None:
            self.limiter.set_limits(limits)
        self.faults.configure(faults, seed)

    def config_snapshot(self) -> dict[str, Any]:
        return {
            "limits": {name: limit.to_dict() for name, limit in sorted(self.limiter.limits.items())},
            "faults": self.faults.spec.to_dict(),
            "seed": self.faults.seed,
        }

    def apply_config(self, data: Mapping[str, Any]) -> None:
        """Apply a ``/_sandbox/config`` document: ``limits`` replaces all limits, ``faults`` merges into the
        current fault spec, ``seed`` restarts the fault sequence. Raises ValueError on a bad document."""
        if not isinstance(data, Mapping):
            raise ValueError("config must be a JSON object")
        unknown = sorted(set(data) - {"limits", "faults", "seed"})
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: ['faults', 'limits', 'seed']")
        limits = parse_limits(data["limits"]) if "limits" in data else None
        faults = None
        if "faults" in data:
            merged = self.faults.spec.to_dict()
            merged.update(data["faults"] or {})
            faults = FaultSpec.from_mapping(merged)
        seed = data.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise ValueError("seed must be an integer")
        self.configure(limits=limits, faults=faults, seed=seed)

    def reset_counters(self) -> None:
        """Clear stats, rate windows and the fault counter (the fault sequence starts again)."""
        self.stats.reset()
        self.limiter.reset()
        self.faults.reset()

    async def close(self) -> None:
        """Release hung requests (they drop their connection) so the server can stop at once."""
        self._closing.set()

    def reopen(self) -> None:
        """Undo :meth:`close` before serving again (hangs hold their requests again)."""
        self._closing.clear()

    # -- the middleware ---------------------------------------------------------------------------------

    @property
    def middleware(self) -> Middleware:
        """The aiohttp middleware to put in ``web.Application(middlewares=[...])``."""
        return self._middleware

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(self.api_prefix):
            return await handler(request)  # inspection and other routes: no limits, faults or stats
        stats = self.stats
        match_info = request.match_info
        http_exc = match_info.http_exception
        if http_exc is not None:
            endpoint = request.path[len(self.api_prefix) :] if http_exc.status == 405 else UNKNOWN_ENDPOINT
            stats.record(endpoint, http_exc.status)
            message = "method not allowed" if http_exc.status == 405 else "not found"
            allow = {"Allow": http_exc.headers["Allow"]} if "Allow" in http_exc.headers else None
            return self._render_error(ApiError(http_exc.status, http_exc.status, message, headers=allow))
        endpoint = match_info.route.name or request.path[len(self.api_prefix) :]
        try:
            key = self._authenticate(request)
        except ApiError as exc:
            stats.record(endpoint, exc.status)
            return self._render_error(exc)

        admission = self.limiter.acquire(endpoint, key)
        if admission is not None:
            if not admission.allowed:
                stats.record_rate_limited(endpoint)
                stats.record(endpoint, 429)
                error = self._rate_limit_error(admission)
                error.headers["Retry-After"] = str(admission.retry_after)
                error.headers["X-RateLimit-Remaining"] = "0"
                return self._render_error(error)
            stats.record_accepted(admission.bucket, admission.window_index, admission.window)
        else:
            stats.record_accepted(endpoint)

        decision = self.faults.next(endpoint)
        kind = decision.kind
        if kind is not FaultKind.NONE:
            stats.record_fault(kind)
            if kind is FaultKind.ERROR_500 or kind is FaultKind.ERROR_503:
                return self._finish(endpoint, self._render_error(self._fault_error(kind)), admission)
            if kind is FaultKind.SLOW:
                await self._sleep(decision.delay)
            elif kind is FaultKind.HANG:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self.faults.spec.hang_seconds)
                stats.record(endpoint, "hung")
                return self._drop(request)
            elif kind is FaultKind.DROP:
                stats.record(endpoint, "dropped")
                return self._drop(request)

        try:
            response = await handler(request)
        except ApiError as exc:
            response = self._render_error(exc)
        except web.HTTPException as exc:  # raised by aiohttp itself, e.g. 413 for a body over client_max_size
            response = self._render_error(ApiError(exc.status, exc.status, exc.reason))
        if kind is FaultKind.APPLIED_THEN_500:
            response = self._render_error(self._fault_error(FaultKind.ERROR_500))
        return self._finish(endpoint, response, admission)

    def _finish(
        self, endpoint: str, response: web.StreamResponse, admission: Admission | None
    ) -> web.StreamResponse:
        if admission is not None:
            response.headers["X-RateLimit-Remaining"] = str(admission.remaining)
        self.stats.record(endpoint, response.status)
        return response

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        # Abort (RST) rather than close: the client sees a dropped connection, never a partial response.
        transport = request.transport
        if transport is not None:
            transport.abort()
        return web.Response(status=500)  # never reaches the client: the transport is gone

    # -- inspection routes ------------------------------------------------------------------------------

    def add_inspection_routes(self, app: web.Application, state: InspectableState) -> None:
        """Add ``/_sandbox/stats``, ``/_sandbox/state``, ``/_sandbox/reset`` and ``/_sandbox/config``."""

        async def get_stats(_request: web.Request) -> web.StreamResponse:
            return json_response(self.stats.snapshot())

        async def get_state(request: web.Request) -> web.StreamResponse:
            fmt = request.query.get("format", "json")
            if fmt == "json":
                return json_response(state.dump())
            if fmt != "parquet":
                return json_response({"error": "format must be json or parquet"}, status=400)
            tables = state.tables()
            name = request.query.get("table") or next(iter(tables), "")
            if name not in tables:
                return json_response({"error": f"table must be one of {sorted(tables)}"}, status=400)
            buffer = io.BytesIO()
            tables[name].write_parquet(buffer)
            return web.Response(
                body=buffer.getvalue(),
                content_type="application/vnd.apache.parquet",
                headers={"Content-Disposition": f'attachment; filename="{name}.parquet"'},
            )

        async def post_reset(request: web.Request) -> web.StreamResponse:
            what = request.query.get("what", "all")
            if what not in ("all", "state", "stats"):
                return json_response({"error": "what must be all, state or stats"}, status=400)
            if what in ("all", "state"):
                state.reset()
            if what in ("all", "stats"):
                self.reset_counters()
            return json_response({"reset": what})

        async def get_config(_request: web.Request) -> web.StreamResponse:
            return json_response(self.config_snapshot())

        async def post_config(request: web.Request) -> web.StreamResponse:
            try:
                self.apply_config(json.loads(await request.read() or b"{}"))
            except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
                return json_response({"error": str(exc)}, status=400)
            return json_response(self.config_snapshot())

        app.router.add_get("/_sandbox/stats", get_stats)
        app.router.add_get("/_sandbox/state", get_state)
        app.router.add_post("/_sandbox/reset", post_reset)
        app.router.add_get("/_sandbox/config", get_config)
        app.router.add_post("/_sandbox/config", post_config)


# -------------------------------------------------------------------------------------------------- runner


@dataclass(frozen=True, slots=True)
class RunningServer:
    """An app served in-process: its runner (for :meth:`stop`), host, port and root URL (no trailing slash)."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def root_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_app(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Serve ``app`` in the running event loop on ``host:port`` (0 = a free port) and return where.

    Access logging is off: a log line per request would make the sandbox the benchmark's bottleneck.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple):
            bound = int(address[1])
            break
    return RunningServer(runner=runner, host=host, port=bound)
