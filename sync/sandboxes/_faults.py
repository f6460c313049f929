"""Fault injection of the sandboxes: which fault (if any) an API request gets, chosen deterministically.

:class:`FaultSpec` says what share of requests gets each :class:`FaultKind` (with :class:`LatencySpec` for slow
answers); :class:`FaultInjector` turns a seed and a request counter into a :class:`FaultDecision`, so the same seed
and the same requests always get the same faults. :class:`~._core.SandboxCore` applies the decision. Re-exported by
:mod:`._core`, the sandboxes' import point.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

__all__ = ["FaultDecision", "FaultInjector", "FaultKind", "FaultSpec", "LatencySpec"]


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
