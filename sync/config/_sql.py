"""A source that reads a database instead of files: where the database is (a URL, or where the URL lives) and
what to read from it (a query or a table). Read by :mod:`sync.sources.reading_sql`; documented in docs/jobs.md."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sync.errors import JobProblem

__all__ = [
    "DatabaseKind",
    "DatabaseRef",
    "SqlInput",
    "database_kind",
    "database_secret_problems",
    "parse_sql_input",
    "url_has_password",
]


class DatabaseKind(StrEnum):
    """The databases a source can read, named by their URL scheme."""

    POSTGRESQL = "postgresql"
    DUCKDB = "duckdb"
    SQLITE = "sqlite"


_SCHEMES: Mapping[str, DatabaseKind] = {
    "postgresql": DatabaseKind.POSTGRESQL,
    "postgres": DatabaseKind.POSTGRESQL,
    "duckdb": DatabaseKind.DUCKDB,
    "sqlite": DatabaseKind.SQLITE,
}

_TABLE = re.compile(
    r'^(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+")(?:\.(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+")){0,2}$'
)
"""``table`` / ``schema.table`` / ``catalog.schema.table``, each part a plain or double-quoted SQL identifier
(a name that needs no quoting, so it can be put in a statement as written)."""


@dataclass(frozen=True, slots=True)
class DatabaseRef:
    """Where a database source's URL comes from: written in the job (``url``: only a URL without a password) or
    read when the source is opened from an environment variable and/or a file (``env``/``file``, like a
    destination's secret). The resolved URL is never kept here."""

    url: str | None = None
    env: str | None = None
    file: str | None = None
    base: str = "."
    """The job file's directory: relative DuckDB and SQLite paths are resolved against it."""


@dataclass(frozen=True, slots=True)
class SqlInput:
    """What a database source reads: ``query`` (any SELECT) or every mapped column of ``table``."""

    database: DatabaseRef
    query: str | None = None
    table: str | None = None


def database_kind(url: str) -> DatabaseKind | None:
    """The database a URL names, from its scheme (``postgresql://``, ``duckdb:///``, ``sqlite:///``), or None."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    return _SCHEMES.get(scheme)


def url_has_password(url: str) -> bool:
    """True when the URL carries a password (``user:password@`` or a ``password=`` parameter)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return ":" in url.split("@", 1)[0].split("//", 1)[-1] and "@" in url
    if parts.password:
        return True
    return any(k.lower() == "password" for k, _ in urllib.parse.parse_qsl(parts.query))


_HINT = "a job names where a URL with a password lives ({env: NAME} or {file: PATH}), never the URL itself"


def database_secret_problems(raw: Mapping[str, Any]) -> list[JobProblem]:
    """Refuse a database URL with a password written into the job file (and a ``database`` value of a shape the
    schema would quote back in its message: it may be such a URL). Run before the schema, like the destination's
    secret check, so the schema's message — which repeats the value — is never shown for these locations."""
    sources = raw.get("sources")
    if not isinstance(sources, list):
        return []
    problems = []
    for i, source in enumerate(sources):
        spec = source.get("database") if isinstance(source, Mapping) else None
        if spec is None or isinstance(spec, Mapping):
            continue
        loc = f"sources[{i}].database"
        if not isinstance(spec, str):
            problems.append(
                JobProblem(loc, f"give a URL without a password, or {{env: NAME}} / {{file: PATH}}: {_HINT}")
            )
        elif url_has_password(spec):
            problems.append(JobProblem(loc, f"a password may not be written in a job file: {_HINT}"))
    return problems


def parse_sql_input(
    loc: str, raw: Mapping[str, Any], base: Path, problems: list[JobProblem]
) -> SqlInput | None:
    """The ``database`` / ``query`` / ``table`` keys of ``sources[i]`` (at ``loc``), problems appended to
    ``problems``; None when something is wrong. Messages never repeat the URL (it may hold a password)."""
    before = len(problems)
    spec = raw.get("database")
    ref: DatabaseRef | None = None
    if spec is None:
        problems.append(JobProblem(f"{loc}.database", "a source with a query or table names its database"))
    elif isinstance(spec, str):
        kind = database_kind(spec)
        if url_has_password(spec):  # normally reported by database_secret_problems already
            problems.append(
                JobProblem(f"{loc}.database", f"a password may not be written in a job file: {_HINT}")
            )
        elif kind is None:
            problems.append(
                JobProblem(
                    f"{loc}.database",
                    "not a database URL: use postgresql://..., duckdb:///path/file.duckdb or sqlite:///path/file.db",
                )
            )
        else:
            ref = DatabaseRef(url=spec, base=str(base))
    else:
        file = spec.get("file")
        ref = DatabaseRef(
            env=spec.get("env"),
            file=str(base / os.path.expanduser(file)) if file else None,
            base=str(base),
        )
    query, table = raw.get("query"), raw.get("table")
    if (query is None) == (table is None):
        problems.append(JobProblem(loc, "a database source gives exactly one of 'query' or 'table'"))
    if isinstance(query, str) and not query.strip().rstrip(";").strip():
        problems.append(JobProblem(f"{loc}.query", "the query is empty"))
    if isinstance(table, str) and not _TABLE.match(table):
        problems.append(
            JobProblem(
                f"{loc}.table",
                "not a table name: give table, schema.table or catalog.schema.table "
                '(quote a part that needs it: "My Table"); use query: for anything else',
            )
        )
    for key in ("path", "paths", "format", "delimiter", "encoding"):
        if key in raw:
            problems.append(JobProblem(f"{loc}.{key}", "not used by a source that reads a database"))
    if len(problems) != before or ref is None:
        return None
    return SqlInput(ref, query=query, table=table)
