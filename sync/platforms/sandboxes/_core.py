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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

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
    "parse_limits",
    "start_app",
]

Clock = Callable[[], float]
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


def json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON response built without aiohttp's slower ``json_response`` helper."""
    return web.Response(
        body=json.dumps(payload, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


# --------------------------------------------------------------------------------------------- rate limits


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``requests`` accepted requests per fixed window of ``window`` seconds, aligned to the clock.

    Window index = ``floor(clock() / window)``: a "100 per minute" limit resets at every minute boundary.
    """

    requests: int
    window: float = 60.0

    def __post_init__(self) -> None:
        if self.requests < 0 or self.window <= 0:
            raise ValueError(
                f"rate limit needs requests >= 0 and window > 0, got {self.requests}/{self.window}"
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RateLimit:
        """``{"requests": N, "window": seconds}``; ``"per_minute": N`` / ``"per_second": N`` are shorthands."""
        if "per_minute" in data:
            return cls(int(data["per_minute"]), 60.0)
        if "per_second" in data:
            return cls(int(data["per_second"]), 1.0)
        try:
            return cls(int(data["requests"]), float(data.get("window", 60.0)))
        except KeyError as exc:
            raise ValueError(f"rate limit needs 'requests' (got keys {sorted(data)})") from exc

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "window": self.window}


def parse_limits(data: Mapping[str, Any]) -> dict[str, RateLimit]:
    """Parse ``{endpoint_or_group: {"requests": N, "window": s}}`` (``"*"``: every endpoint not named)."""
    if not isinstance(data, Mapping):
        raise ValueError("limits must be an object mapping endpoint names to limits")
    out: dict[str, RateLimit] = {}
    for name, spec in data.items():
        if not isinstance(spec, Mapping):
            raise ValueError(f"limit for {name!r} must be an object")
        out[str(name)] = RateLimit.from_mapping(spec)
    return out


@dataclass(frozen=True, slots=True)
class Admission:
    """The limiter's answer for one request on a limited bucket."""

    allowed: bool
    remaining: int
    """Requests still accepted in the current window after this one."""
    reset_after: float
    """Seconds until the current window ends."""
    bucket: str
    window: float
    """Window length in seconds."""
    window_index: int
    count: int
    """Accepted requests in this window so far, this one included when allowed."""

    @property
    def retry_after(self) -> int:
        """``Retry-After`` value: whole seconds until the window resets, rounded up, at least 1."""
        return max(1, math.ceil(self.reset_after - 1e-9))


class FixedWindowLimiter:
    """Clock-aligned fixed-window counters per (bucket, client key).

    A bucket is an endpoint name, or a group name shared by several endpoints (``groups`` maps endpoint → group,
    e.g. NotifyVisitors' "User" limit covers every user endpoint). Lookup order: the endpoint's own limit, its
    group's limit, then ``"*"`` (which limits each endpoint separately). Rejected requests do not consume quota:
    that is how real "N per minute" limits behave, and it keeps the count of *accepted* requests ≤ N.
    """

    __slots__ = ("_clock", "_counters", "_groups", "_limits")

    def __init__(
        self,
        limits: Mapping[str, RateLimit] | None = None,
        *,
        groups: Mapping[str, str] | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._clock: Clock = clock  # wall time by default so windows align with the minute like real servers
        self._limits: dict[str, RateLimit] = dict(limits or {})
        self._groups: dict[str, str] = dict(groups or {})  # endpoint → shared bucket name
        self._counters: dict[
            tuple[str, str], list[int]
        ] = {}  # (bucket, key) → [window index, accepted count]

    @property
    def limits(self) -> dict[str, RateLimit]:
        return dict(self._limits)

    def set_limits(self, limits: Mapping[str, RateLimit]) -> None:
        """Replace the limits (counters of the current windows are kept)."""
        self._limits = dict(limits)

    def reset(self) -> None:
        self._counters.clear()

    def resolve(self, endpoint: str) -> tuple[str, RateLimit] | None:
        """The (bucket, limit) governing ``endpoint``, or None when it is not limited."""
        limit = self._limits.get(endpoint)
        if limit is not None:
            return endpoint, limit
        group = self._groups.get(endpoint)
        if group is not None and (limit := self._limits.get(group)) is not None:
            return group, limit
        limit = self._limits.get("*")
        if limit is not None:
            return endpoint, limit
        return None

    def acquire(self, endpoint: str, key: str = "") -> Admission | None:
        """Count one request for ``endpoint`` from client ``key``; None when the endpoint is not limited."""
        resolved = self.resolve(endpoint)
        if resolved is None:
            return None
        bucket, limit = resolved
        now = self._clock()
        index = math.floor(now / limit.window)
        reset_after = (index + 1) * limit.window - now
        counter = self._counters.get((bucket, key))
        if counter is None or counter[0] != index:
            counter = [index, 0]
            self._counters[(bucket, key)] = counter
        if counter[1] < limit.requests:
            counter[1] += 1
            return Admission(
                True, limit.requests - counter[1], reset_after, bucket, limit.window, index, counter[1]
            )
        return Admission(False, 0, reset_after, bucket, limit.window, index, counter[1])


# --------------------------------------------------------------------------------------------------- faults


class FaultKind(StrEnum):
    """What the fault injector does to one request."""

    NONE = "none"
    ERROR_500 = "error_500"
    ERROR_503 = "error_503"
    SLOW = "slow"
    """Answer normally after a delay drawn from the latency distribution."""
    HANG = "hang"
    """Never answer: hold the request ``hang_seconds`` (past any client time-out), then drop the connection."""
    DROP = "drop"
    """Close the connection without any response."""
    APPLIED_THEN_500 = "applied_then_500"
    """Apply the change, then answer 500 anyway: the ambiguous outcome a client must survive."""


_FAULT_ORDER = (
    FaultKind.ERROR_500,
    FaultKind.ERROR_503,
    FaultKind.SLOW,
    FaultKind.HANG,
    FaultKind.DROP,
    FaultKind.APPLIED_THEN_500,
)


@dataclass(frozen=True, slots=True)
class LatencySpec:
    """Delay of a ``slow`` answer: ``fixed`` (= ``low``), ``uniform`` in [low, high], or ``exponential``
    with ``mean`` (shifted by ``low``, capped at ``high``)."""

    distribution: str = "uniform"
    low: float = 0.05
    high: float = 1.0
    mean: float = 0.2

    def __post_init__(self) -> None:
        if self.distribution not in ("fixed", "uniform", "exponential"):
            raise ValueError(
                f"latency distribution must be fixed, uniform or exponential: {self.distribution!r}"
            )
        if self.low < 0 or self.high < self.low or self.mean <= 0:
            raise ValueError("latency needs 0 <= low <= high and mean > 0")

    def draw(self, u: float) -> float:
        """The delay for a uniform draw ``u`` in [0, 1)."""
        if self.distribution == "fixed":
            return self.low
        if self.distribution == "uniform":
            return self.low + (self.high - self.low) * u
        return min(self.high, self.low - self.mean * math.log1p(-u))


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """Shares (0..1, summing to at most 1) of API requests that get each fault; all zero = no faults."""

    error_500: float = 0.0
    error_503: float = 0.0
    slow: float = 0.0
    hang: float = 0.0
    drop: float = 0.0
    applied_then_500: float = 0.0
    latency: LatencySpec = field(default_factory=LatencySpec)
    hang_seconds: float = 60.0
    """How long a ``hang`` holds the request before dropping it (longer than any client time-out)."""
    endpoints: frozenset[str] | None = None
    """Only these endpoints get faults; None = every API endpoint."""

    def __post_init__(self) -> None:
        shares = [self.share(kind) for kind in _FAULT_ORDER]
        if any(s < 0 or s > 1 for s in shares) or sum(shares) > 1 + 1e-9:
            raise ValueError(f"fault shares must be in [0, 1] and sum to at most 1, got {shares}")
        if self.hang_seconds < 0:
            raise ValueError("hang_seconds must be >= 0")

    def share(self, kind: FaultKind) -> float:
        return float(getattr(self, kind.value))

    @property
    def active(self) -> bool:
        return any(self.share(kind) > 0 for kind in _FAULT_ORDER)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FaultSpec:
        """Build from JSON/YAML: the share fields, ``latency: {distribution, low, high, mean}``,
        ``hang_seconds`` and ``endpoints: [names]``. Unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise ValueError("faults must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault settings {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name == "latency":
                kwargs[name] = LatencySpec(**dict(value))
            elif name == "endpoints":
                kwargs[name] = None if value is None else frozenset(str(v) for v in value)
            else:
                kwargs[name] = float(value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {kind.value: self.share(kind) for kind in _FAULT_ORDER}
        out["latency"] = {
            "distribution": self.latency.distribution,
            "low": self.latency.low,
            "high": self.latency.high,
            "mean": self.latency.mean,
        }
        out["hang_seconds"] = self.hang_seconds
        out["endpoints"] = None if self.endpoints is None else sorted(self.endpoints)
        return out


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """The fault for request number ``n`` (``delay`` in seconds for ``slow``)."""

    n: int
    kind: FaultKind
    delay: float = 0.0


_NO_FAULT = FaultDecision(-1, FaultKind.NONE)


class FaultInjector:
    """Chooses a fault per request, deterministically from ``seed`` and a request counter.

    Request number ``n`` (counting only requests eligible for faults) always gets the same decision for the
    same seed and spec, so a failing run can be repeated exactly: :meth:`decide` is a pure function.
    """

    __slots__ = ("_active", "_counter", "_seed", "_spec")

    def __init__(self, spec: FaultSpec | None = None, seed: int = 0) -> None:
        self._spec: FaultSpec = spec or FaultSpec()
        self._active: bool = self._spec.active  # cached: checked on every request
        self._seed: int = seed
        self._counter: int = 0  # eligible requests seen so far; the next one is number _counter

    @property
    def spec(self) -> FaultSpec:
        return self._spec

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def counter(self) -> int:
        return self._counter

    def configure(self, spec: FaultSpec | None = None, seed: int | None = None) -> None:
        """Change the spec and/or seed; a new seed restarts the counter so the sequence repeats from the start."""
        if spec is not None:
            self._spec = spec
            self._active = spec.active
        if seed is not None:
            self._seed = seed
            self._counter = 0

    def reset(self) -> None:
        self._counter = 0

    def _uniforms(self, n: int) -> tuple[float, float]:
        digest = hashlib.blake2b(f"{self._seed}:{n}".encode(), digest_size=16).digest()
        scale = float(1 << 64)
        return int.from_bytes(digest[:8], "big") / scale, int.from_bytes(digest[8:], "big") / scale

    def decide(self, n: int, endpoint: str | None = None) -> FaultDecision:
        """The decision for request number ``n`` (pure: does not advance the counter)."""
        spec = self._spec
        if spec.endpoints is not None and endpoint not in spec.endpoints:
            return FaultDecision(n, FaultKind.NONE)
        u, v = self._uniforms(n)
        edge = 0.0
        for kind in _FAULT_ORDER:
            edge += spec.share(kind)
            if u < edge:
                delay = spec.latency.draw(v) if kind is FaultKind.SLOW else 0.0
                return FaultDecision(n, kind, delay)
        return FaultDecision(n, FaultKind.NONE)

    def next(self, endpoint: str | None = None) -> FaultDecision:
        """The decision for the next eligible request (advances the counter)."""
        if not self._active:
            return _NO_FAULT  # fast path: no hashing when faults are off
        if self._spec.endpoints is not None and endpoint not in self._spec.endpoints:
            return _NO_FAULT  # requests to other endpoints do not shift the sequence
        n = self._counter
        self._counter += 1
        return self.decide(n, endpoint)


# ---------------------------------------------------------------------------------------------------- stats


class SandboxStats:
    """Counters a test or benchmark reads back: requests per endpoint and status, the largest number of accepted
    requests in any window per bucket, 429s sent, faults injected per kind, IDs applied per operation."""

    __slots__ = ("_applied", "_clock", "_faults", "_rate_limited", "_requests", "_window_seconds", "_windows")

    def __init__(self, *, clock: Clock = time.time, window_seconds: float = 60.0) -> None:
        self._clock: Clock = clock
        self._window_seconds: float = window_seconds  # window for endpoints without a rate limit
        self._requests: dict[str, dict[str, int]] = {}  # endpoint → status ("200", "dropped"...) → count
        self._windows: dict[str, list[float]] = {}  # bucket → [window seconds, current index, count, max]
        self._rate_limited: dict[str, int] = {}  # endpoint → 429s sent
        self._faults: dict[str, int] = {}  # fault kind → count
        self._applied: dict[str, int] = {}  # operation → IDs (or items) applied

    def reset(self) -> None:
        for counters in (self._requests, self._windows, self._rate_limited, self._faults, self._applied):
            counters.clear()

    def record(self, endpoint: str, status: int | str) -> None:
        """Count one finished request (``status`` an HTTP status or ``"dropped"``/``"hung"``)."""
        per_status = self._requests.get(endpoint)
        if per_status is None:
            per_status = self._requests[endpoint] = {}
        key = str(status)
        per_status[key] = per_status.get(key, 0) + 1

    def record_accepted(
        self, bucket: str, window_index: int | None = None, window: float | None = None
    ) -> None:
        """Count one request accepted (past auth and rate limit) in its window of ``bucket``.

        With ``window_index`` from the limiter the count is exactly the limiter's; otherwise the default window
        applies, aligned to the clock in the same way."""
        seconds = window if window is not None else self._window_seconds
        index = window_index if window_index is not None else math.floor(self._clock() / seconds)
        entry = self._windows.get(bucket)
        if entry is None:
            self._windows[bucket] = [seconds, index, 1, 1]
            return
        if entry[1] != index or entry[0] != seconds:
            entry[0], entry[1], entry[2] = seconds, index, 1
        else:
            entry[2] += 1
        if entry[2] > entry[3]:
            entry[3] = entry[2]

    def record_rate_limited(self, endpoint: str) -> None:
        self._rate_limited[endpoint] = self._rate_limited.get(endpoint, 0) + 1

    def record_fault(self, kind: FaultKind) -> None:
        self._faults[kind.value] = self._faults.get(kind.value, 0) + 1

    def add_applied(self, operation: str, count: int) -> None:
        """Count ``count`` IDs (or items) applied by ``operation`` — also when the answer is then a fault."""
        self._applied[operation] = self._applied.get(operation, 0) + count

    def requests(self, endpoint: str, status: int | str | None = None) -> int:
        per_status = self._requests.get(endpoint, {})
        if status is None:
            return sum(per_status.values())
        return per_status.get(str(status), 0)

    def max_in_window(self, bucket: str) -> int:
        entry = self._windows.get(bucket)
        return int(entry[3]) if entry else 0

    def rate_limited(self, endpoint: str | None = None) -> int:
        if endpoint is None:
            return sum(self._rate_limited.values())
        return self._rate_limited.get(endpoint, 0)

    def faults(self, kind: FaultKind | None = None) -> int:
        if kind is None:
            return sum(self._faults.values())
        return self._faults.get(kind.value, 0)

    def applied(self, operation: str) -> int:
        return self._applied.get(operation, 0)

    def snapshot(self) -> dict[str, Any]:
        """Everything, JSON-ready (the body of ``GET /_sandbox/stats``)."""
        return {
            "requests": {ep: dict(sorted(st.items())) for ep, st in sorted(self._requests.items())},
            "requests_total": sum(sum(st.values()) for st in self._requests.values()),
            "max_in_window": {
                bucket: {"window_seconds": entry[0], "max": int(entry[3])}
                for bucket, entry in sorted(self._windows.items())
            },
            "rate_limited": dict(sorted(self._rate_limited.items())),
            "rate_limited_total": sum(self._rate_limited.values()),
            "faults": dict(sorted(self._faults.items())),
            "applied": dict(sorted(self._applied.items())),
        }


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
