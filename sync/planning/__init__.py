"""From read rows to the batches a run sends: typing, checks and duplicate resolution (validation), the
platform's builder (planning) and its staging area on disk, the row keys snapshot mode diffs on, and which batches a resume or retry sends.

Modules: ``planning``, ``_staging``, ``validation``, ``row_keys``, ``resume``.

The names below are the stage's public face, imported on first use; code inside sync/ imports
the modules themselves.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sync.planning.planning import (
        ASSUMED_LATENCY,
        EndpointSummary,
        Plan,
        PlanSummary,
        build_plan,
        check_workdir,
        estimate_duration,
    )
    from sync.planning.resume import (
        UNFINISHED_STATUSES,
        ReplayLanes,
        ReplayMode,
        ReplayPlan,
        ReplayStats,
        replay_plan,
        unfinished_run,
    )
    from sync.planning.row_keys import ROW_KEY, SCHEME
    from sync.planning.validation import EXT_ID, FILE, KEY, REJECTS_SCHEMA, clean_schema

_HOME = {
    "ASSUMED_LATENCY": "sync.planning.planning",
    "EXT_ID": "sync.planning.validation",
    "EndpointSummary": "sync.planning.planning",
    "FILE": "sync.planning.validation",
    "KEY": "sync.planning.validation",
    "Plan": "sync.planning.planning",
    "PlanSummary": "sync.planning.planning",
    "REJECTS_SCHEMA": "sync.planning.validation",
    "ROW_KEY": "sync.planning.row_keys",
    "ReplayLanes": "sync.planning.resume",
    "ReplayMode": "sync.planning.resume",
    "ReplayPlan": "sync.planning.resume",
    "ReplayStats": "sync.planning.resume",
    "SCHEME": "sync.planning.row_keys",
    "UNFINISHED_STATUSES": "sync.planning.resume",
    "build_plan": "sync.planning.planning",
    "check_workdir": "sync.planning.planning",
    "clean_schema": "sync.planning.validation",
    "estimate_duration": "sync.planning.planning",
    "replay_plan": "sync.planning.resume",
    "unfinished_run": "sync.planning.resume",
}

__all__ = [
    "ASSUMED_LATENCY",
    "EXT_ID",
    "FILE",
    "KEY",
    "REJECTS_SCHEMA",
    "ROW_KEY",
    "SCHEME",
    "UNFINISHED_STATUSES",
    "EndpointSummary",
    "Plan",
    "PlanSummary",
    "ReplayLanes",
    "ReplayMode",
    "ReplayPlan",
    "ReplayStats",
    "build_plan",
    "check_workdir",
    "clean_schema",
    "estimate_duration",
    "replay_plan",
    "unfinished_run",
]


def __getattr__(name: str) -> object:
    """A face name, imported from its module when first asked for."""
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
