"""Per-platform defaults and facts the loader checks against: rate budgets, budget groups, batch sizes, and the
endpoint names a job may use under ``dispatch``.

Plain data on purpose: each platform declares these (a platform object may carry them later); a test checks
the endpoint lists against the platforms' own operation tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sync.config._settings import BudgetGroupSpec, RateBudgetSpec

PLATFORM_ENDPOINTS: Mapping[str, tuple[str, ...]] = {
    "netmera": (
        "tagUsers",
        "untagUsers",
        "setProfileAttributes",
        "unsetProfileAttributes",
        "pushProfileAttributes",
        "pullProfileAttributes",
        "setCategoryPreferences",
        "enablePush",
        "disablePush",
        "enableMail",
        "disableMail",
        "enableSms",
        "disableSms",
        "updateEmail",
        "updateMsisdn",
        "fireEvents",
        "deleteUsersPermanently",
    ),
    "notifyvisitors": ("user/create", "event/create"),
    "formsonfire": ("push",),
}
"""Every endpoint each platform's connector sends to: the names a job may use under ``dispatch.budgets``,
``batch_size``, ``per_endpoint_concurrency`` and ``budget_groups`` (besides ``"*"``)."""

PLATFORM_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    # Netmera documents no rate limit [D]; 20 requests/s per endpoint is a conservative default that still
    # moves 20,000 users/s through the 1000-ID endpoints. Jobs override per endpoint, or add an account-wide
    # group when their server counts the whole API key.
    "netmera": {"batch_size": 1000, "budgets": {"*": RateBudgetSpec(requests=20, period=1.0)}},
    # NotifyVisitors documents its limits per API family (User API 100/min, Event API 500/min), shared by every
    # endpoint of the family: budget groups. The planner caps user/create batches at 100 users and event/create
    # at 1000 events.
    "notifyvisitors": {
        "batch_size": 1000,
        "budgets": {},
        "budget_groups": (
            BudgetGroupSpec("user", RateBudgetSpec(requests=100, period=60.0), ("user/create",)),
            BudgetGroupSpec("event", RateBudgetSpec(requests=500, period=60.0), ("event/create",)),
        ),
    },
    # Forms On Fire: one user per request; no documented limit, 10 requests/s is an assumption [I].
    "formsonfire": {"batch_size": 1, "budgets": {"*": RateBudgetSpec(requests=10, period=1.0)}},
}
"""Per-platform defaults applied under a job's own ``dispatch`` settings (a job's group of the same name
replaces the default group)."""

PLATFORM_MAX_BATCH = {"netmera": 1000, "notifyvisitors": 1000, "formsonfire": 1}
"""Unique IDs per request each platform accepts at most; the loader refuses a larger ``batch_size``."""
