"""Where rows come from: files (CSV, Parquet) and databases (PostgreSQL, DuckDB, SQLite) → Arrow record batches,
streamed, only the mapped columns, with the column types checked against the mapping.

Modules: ``reading``, ``reading_sql``, ``_sql_drivers``, ``_column_types``.

The names below are the stage's public face, imported on first use; code inside sync/ imports
the modules themselves.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sync.sources.reading import ROW, Chunk, check_sources, expand_paths, iter_chunks
    from sync.sources.reading_sql import SqlReader, check_sql_sources

_HOME = {
    "Chunk": "sync.sources.reading",
    "ROW": "sync.sources.reading",
    "SqlReader": "sync.sources.reading_sql",
    "check_sources": "sync.sources.reading",
    "check_sql_sources": "sync.sources.reading_sql",
    "expand_paths": "sync.sources.reading",
    "iter_chunks": "sync.sources.reading",
}

__all__ = ["ROW", "Chunk", "SqlReader", "check_sources", "check_sql_sources", "expand_paths", "iter_chunks"]


def __getattr__(name: str) -> object:
    """A face name, imported from its module when first asked for."""
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
