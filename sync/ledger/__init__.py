"""The record of runs, batches, attempts and refused IDs (embedded SQLite), its export and its trace of one ID.

Modules: ``ledger``, ``exporting``, ``trace``.

The names below are the stage's public face, imported on first use; code inside sync/ imports
the modules themselves.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sync.ledger.exporting import format_for, iter_id_chunks, make_export_progress, write_pages
    from sync.ledger.ledger import AttemptRow, BatchRow, Ledger, RunInfo, new_run_id
    from sync.ledger.trace import trace_id

_HOME = {
    "AttemptRow": "sync.ledger.ledger",
    "BatchRow": "sync.ledger.ledger",
    "Ledger": "sync.ledger.ledger",
    "RunInfo": "sync.ledger.ledger",
    "format_for": "sync.ledger.exporting",
    "iter_id_chunks": "sync.ledger.exporting",
    "make_export_progress": "sync.ledger.exporting",
    "new_run_id": "sync.ledger.ledger",
    "trace_id": "sync.ledger.trace",
    "write_pages": "sync.ledger.exporting",
}

__all__ = [
    "AttemptRow",
    "BatchRow",
    "Ledger",
    "RunInfo",
    "format_for",
    "iter_id_chunks",
    "make_export_progress",
    "new_run_id",
    "trace_id",
    "write_pages",
]


def __getattr__(name: str) -> object:
    """A face name, imported from its module when first asked for."""
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
