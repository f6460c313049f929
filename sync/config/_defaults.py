"""Per-platform defaults: rate budgets and batch sizes applied under a job's own ``dispatch`` settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sync.config._settings import RateBudgetSpec

PLATFORM_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    # Netmera documents no rate limit [D]; 20 requests/s per endpoint is a conservative default that still
    # moves 20,000 users/s through the 1000-ID endpoints. Jobs override per endpoint.
    "netmera": {"batch_size": 1000, "budgets": {"*": RateBudgetSpec(requests=20, period=1.0)}},
    # NotifyVisitors' documented per-minute limits (User API 100, Event API 500); the planner caps user/create
    # batches at 100 users and event/create at 1000 events.
    "notifyvisitors": {
        "batch_size": 1000,
        "budgets": {
            "user/create": RateBudgetSpec(requests=100, period=60.0),
            "event/create": RateBudgetSpec(requests=500, period=60.0),
        },
    },
    # Forms On Fire: one user per request; no documented limit, 10 requests/s is an assumption [I].
    "formsonfire": {"batch_size": 1, "budgets": {"*": RateBudgetSpec(requests=10, period=1.0)}},
}
"""Per-platform defaults applied under a job's own ``dispatch`` settings."""

PLATFORM_MAX_BATCH = {"netmera": 1000, "notifyvisitors": 1000, "formsonfire": 1}
"""Unique IDs per request each platform accepts at most; the loader refuses a larger ``batch_size``."""
