"""One ``sources[i]`` entry of a job file read into a :class:`Source`, with the checks its mapping needs."""

from __future__ import annotations

import codecs
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sync.config._job import (
    DEFAULT_NULL_VALUES,
    AttributeMapping,
    AttributeMode,
    FileFormat,
    NullAction,
    OptIns,
    Source,
    SourceKind,
    TagAction,
    TagColumn,
    ValueType,
)
from sync.config._sql import parse_sql_input
from sync.errors import JobProblem

_ENDPOINTS_REQUIRING_LIST = (AttributeMode.PUSH, AttributeMode.PULL)
_SQL_KEYS = frozenset({"database", "query", "table"})
SQL_NULL_VALUES: tuple[str, ...] = ("",)
"""A database source's default ``null_values``: SQL NULL and empty text are "no value" (as an empty CSV cell);
text such as 'NULL' or 'N/A' stored in a column is a value unless the source lists it."""


def _attribute(column: str, spec: Any) -> AttributeMapping:
    if isinstance(spec, str):
        spec = {"type": spec}
    return AttributeMapping(
        column=column,
        attribute=spec.get("attribute", column),
        type=ValueType(spec.get("type", "string")),
        mode=AttributeMode(spec.get("mode", "set")),
        on_null=NullAction(spec.get("on_null", "skip")),
        delimiter=spec.get("delimiter", "|"),
    )


def _tag_columns(spec: Any) -> tuple[TagColumn, ...]:
    if spec is None:
        return ()
    items = [spec] if isinstance(spec, str | Mapping) else list(spec)
    out = []
    for item in items:
        if isinstance(item, str):
            item = {"column": item}
        out.append(
            TagColumn(
                item["column"],
                delimiter=item.get("delimiter", "|"),
                action=TagAction(item.get("action", "tag")),
            )
        )
    return tuple(out)


def _format_for(paths: tuple[str, ...], declared: str | None) -> FileFormat | None:
    if declared:
        return FileFormat(declared)
    suffixes = {Path(p).suffix.lower() for p in paths}
    if suffixes <= {".parquet", ".pq"}:
        return FileFormat.PARQUET
    if suffixes <= {".csv", ".tsv", ".txt"}:
        return FileFormat.CSV
    return None


_KIND_KEYS: Mapping[SourceKind, frozenset[str]] = {
    SourceKind.USERS: frozenset({"attributes", "tags", "opt_ins", "email", "msisdn"}),
    SourceKind.TAGS: frozenset({"tag", "action"}),
    SourceKind.EVENTS: frozenset({"event", "attributes"}),
    SourceKind.DELETIONS: frozenset(),
}
_MAPPING_KEYS = frozenset().union(*_KIND_KEYS.values())


def parse_source(
    i: int, raw: Mapping[str, Any], defaults: Mapping[str, Any], base: Path, problems: list[JobProblem]
) -> Source | None:
    """The source at ``sources[i]``, or None when it has problems (each appended to ``problems``)."""
    loc = f"sources[{i}]"
    kind = SourceKind(raw.get("kind", "users"))
    before = len(problems)
    sql = parse_sql_input(loc, raw, base, problems) if _SQL_KEYS & set(raw) else None
    if not _SQL_KEYS & set(raw) and ("path" in raw) == ("paths" in raw):
        problems.append(
            JobProblem(loc, "give exactly one of 'path' or 'paths' (or 'database' with 'query' or 'table')")
        )
    patterns = [raw["path"]] if "path" in raw else list(raw.get("paths", []))
    paths = tuple(str(base / os.path.expanduser(p)) for p in patterns)
    fmt = _format_for(paths, raw.get("format", defaults.get("format")))
    if fmt is None and paths:
        problems.append(
            JobProblem(
                f"{loc}.format", "cannot tell the format from the file names; set format: csv or parquet"
            )
        )
    ext_id = raw.get("ext_id", defaults.get("ext_id"))
    if not ext_id:
        problems.append(
            JobProblem(f"{loc}.ext_id", "name the external-ID column (here or in defaults.ext_id)")
        )
    for key in sorted((_MAPPING_KEYS - _KIND_KEYS[kind]) & set(raw)):
        problems.append(JobProblem(f"{loc}.{key}", f"not used by a source of kind {kind.value!r}"))
    attributes = tuple(_attribute(c, s) for c, s in (raw.get("attributes") or {}).items())
    for a in attributes:
        aloc = f"{loc}.attributes.{a.column}"
        if a.mode in _ENDPOINTS_REQUIRING_LIST and a.type is not ValueType.LIST:
            problems.append(
                JobProblem(aloc, f"mode {a.mode.value!r} needs type 'list' (Netmera array attributes)")
            )
        if a.on_null is NullAction.UNSET and a.mode is not AttributeMode.SET:
            problems.append(JobProblem(aloc, "on_null: unset only applies to mode 'set'"))
        if kind is SourceKind.EVENTS and (
            a.mode is not AttributeMode.SET or a.on_null is not NullAction.SKIP
        ):
            problems.append(
                JobProblem(aloc, "event attributes take only 'attribute', 'type' and 'delimiter'")
            )
        if kind is SourceKind.EVENTS and a.attribute in ("extId", "name"):
            problems.append(
                JobProblem(
                    aloc, f"event attribute may not be called {a.attribute!r} (reserved by fireEvents)"
                )
            )
    targets: dict[tuple[str, str], str] = {}
    for a in attributes:
        target = (a.mode.value, a.attribute)
        if target in targets:
            problems.append(
                JobProblem(
                    f"{loc}.attributes.{a.column}",
                    f"attribute {a.attribute!r} is already mapped from column {targets[target]!r}",
                )
            )
        targets[target] = a.column
    opt = raw.get("opt_ins") or {}
    opt_ins = OptIns(
        push=opt.get("push"),
        email=opt.get("email"),
        sms=opt.get("sms"),
        categories=dict(opt.get("categories") or {}),
    )
    if kind is SourceKind.TAGS and not raw.get("tag"):
        problems.append(JobProblem(f"{loc}.tag", "a tags source names the column holding the tag"))
    if kind is SourceKind.EVENTS and not raw.get("event"):
        problems.append(
            JobProblem(f"{loc}.event", "an events source names the column holding the event name")
        )
    source = Source(
        name=raw["name"],
        kind=kind,
        paths=paths,
        format=fmt or FileFormat.CSV,
        ext_id=ext_id or "",
        delimiter=raw.get("delimiter", defaults.get("delimiter", ",")),
        encoding=raw.get("encoding", defaults.get("encoding", "utf-8")),
        null_values=tuple(
            raw.get(
                "null_values", defaults.get("null_values", SQL_NULL_VALUES if sql else DEFAULT_NULL_VALUES)
            )
        ),
        attributes=attributes,
        tags=_tag_columns(raw.get("tags")),
        opt_ins=opt_ins,
        email=raw.get("email"),
        msisdn=raw.get("msisdn"),
        tag=raw.get("tag"),
        action=raw.get("action"),
        event=raw.get("event"),
        sql=sql,
    )
    if kind is SourceKind.USERS and len(source.columns()) == 1:
        problems.append(
            JobProblem(loc, "maps no column to an operation (attributes, tags, opt_ins, email or msisdn)")
        )
    if ext_id and ext_id in source.columns()[1:]:
        problems.append(JobProblem(loc, f"the external-ID column {ext_id!r} is also mapped to an operation"))
    if source.encoding:
        try:
            codecs.lookup(source.encoding)
        except LookupError:
            problems.append(JobProblem(f"{loc}.encoding", f"unknown encoding {source.encoding!r}"))
        else:
            try:
                # hex, base64, zlib, rot13...: codecs Python knows that do not turn bytes into text.
                "".encode(source.encoding)
            except LookupError:
                problems.append(
                    JobProblem(
                        f"{loc}.encoding",
                        f"{source.encoding!r} is not a text encoding (e.g. utf-8, latin-1, cp1254, utf-16)",
                    )
                )
    return source if len(problems) == before else None
