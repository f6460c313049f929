"""Sending a plan's batches: lanes per endpoint through a bounded channel, rate budgets and budget groups,
retries, splitting on 400, and the achieved-rate meter.

Modules: ``dispatch``, ``_sending``, ``_channel``, ``_dispatch_records``, ``budget``, ``_rate_meter``.

The names below are the stage's public face, imported on first use; code inside sync/ imports
the modules themselves.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sync.dispatch.budget import Budget, BudgetClosedError, BudgetGroupStats, RateBudget
    from sync.dispatch.dispatch import (
        Dispatcher,
        DispatchObserver,
        DispatchOutcome,
        DispatchReport,
        EndpointStats,
        LaneSource,
    )

_HOME = {
    "Budget": "sync.dispatch.budget",
    "BudgetClosedError": "sync.dispatch.budget",
    "BudgetGroupStats": "sync.dispatch.budget",
    "DispatchObserver": "sync.dispatch.dispatch",
    "DispatchOutcome": "sync.dispatch.dispatch",
    "DispatchReport": "sync.dispatch.dispatch",
    "Dispatcher": "sync.dispatch.dispatch",
    "EndpointStats": "sync.dispatch.dispatch",
    "LaneSource": "sync.dispatch.dispatch",
    "RateBudget": "sync.dispatch.budget",
}

__all__ = [
    "Budget",
    "BudgetClosedError",
    "BudgetGroupStats",
    "DispatchObserver",
    "DispatchOutcome",
    "DispatchReport",
    "Dispatcher",
    "EndpointStats",
    "LaneSource",
    "RateBudget",
]


def __getattr__(name: str) -> object:
    """A face name, imported from its module when first asked for."""
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
