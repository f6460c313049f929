"""The sandboxes' counters (:class:`SandboxStats`): requests per endpoint and status, the most accepted requests
in any window, 429s, injected faults and applied IDs. Read back by tests and benchmarks, and served at
``GET /_sandbox/stats``. Re-exported by :mod:`._core`, the sandboxes' import point.
"""

from __future__ import annotations

import math
import time
from typing import Any

from sync.sandboxes._faults import FaultKind
from sync.sandboxes._limits import Clock

__all__ = ["SandboxStats"]


class SandboxStats:
    """Counters a test or benchmark reads back: requests per endpoint and status, the largest number of accepted
    requests in any window per bucket, 429s sent, faults injected per kind, IDs applied per operation, and when
    the first request was answered."""

    __slots__ = (
        "_applied",
        "_clock",
        "_faults",
        "_first",
        "_rate_limited",
        "_requests",
        "_window_seconds",
        "_windows",
    )

    def __init__(self, *, clock: Clock = time.time, window_seconds: float = 60.0) -> None:
        self._clock: Clock = clock
        self._window_seconds: float = window_seconds  # window for endpoints without a rate limit
        self._requests: dict[str, dict[str, int]] = {}  # endpoint → status ("200", "dropped"...) → count
        self._windows: dict[str, list[float]] = {}  # bucket → [window seconds, current index, count, max]
        self._rate_limited: dict[str, int] = {}  # endpoint → 429s sent
        self._faults: dict[str, int] = {}  # fault kind → count
        self._applied: dict[str, int] = {}  # operation → IDs (or items) applied
        # The clock's time when the first request since the last reset was counted: a benchmark reads when the
        # first request came from it afterwards, instead of polling the sandbox (which takes CPU from the run).
        self._first: float | None = None

    def reset(self) -> None:
        for counters in (self._requests, self._windows, self._rate_limited, self._faults, self._applied):
            counters.clear()
        self._first = None

    def record(self, endpoint: str, status: int | str) -> None:
        """Count one finished request (``status`` an HTTP status or ``"dropped"``/``"hung"``)."""
        if self._first is None:
            self._first = self._clock()
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
            "first_request_at": self._first,
        }
