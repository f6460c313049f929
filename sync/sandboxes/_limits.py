"""Rate limits of the sandboxes: fixed, clock-aligned windows counted per (bucket, client key).

:class:`RateLimit` is one limit ("N requests per window of S seconds"), :func:`parse_limits` reads a
``{endpoint_or_group: limit}`` document, :class:`FixedWindowLimiter` counts accepted requests and answers each one
with an :class:`Admission`. :class:`~._core.SandboxCore` asks the limiter once per API request, after
authentication and before fault injection. Re-exported by :mod:`._core`, the sandboxes' import point.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Admission", "Clock", "FixedWindowLimiter", "RateLimit", "parse_limits"]

Clock = Callable[[], float]
"""Seconds, read on every request (wall time by default; tests inject their own)."""


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
    e.g. NotifyVisitors' "User" limit covers every user endpoint; ``"*"`` maps every endpoint, e.g. to one limit
    for the whole account). Lookup order: the endpoint's own limit, its
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
        group = self._groups.get(endpoint) or self._groups.get("*")  # "*": a group of every endpoint
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
