"""Job configuration: frozen objects validated at load time.

The run-side settings (destination, rate budgets, retries, concurrency) are defined here; the job-file loader
(YAML validated against ``schemas/job.schema.json``) and the source/mapping objects live here too.
Only the CLI reads environment variables: secrets are resolved by :func:`resolve_secret`, called from the CLI.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import urllib.parse
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from sync.errors import BadJobError, JobProblem, SecretError

__all__ = [
    "AttributeMapping",
    "AttributeMode",
    "Destination",
    "DispatchSettings",
    "FileFormat",
    "Job",
    "NullAction",
    "OptIns",
    "RateBudgetSpec",
    "RemovalAction",
    "RetryPolicy",
    "SnapshotSettings",
    "Source",
    "SourceKind",
    "SyncMode",
    "TagAction",
    "TagColumn",
    "ValidationRules",
    "ValueType",
    "load_job",
    "resolve_secret",
]


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a job sends: the platform, its base URL and where the secret lives (never the secret itself)."""

    platform: str
    base_url: str
    secret_env: str | None = None
    secret_file: str | None = None
    verify_tls: bool = True
    """TLS certificate checks; only a job aimed at a local sandbox may turn them off."""
    extra: Mapping[str, str] = field(default_factory=dict)
    """Platform-specific, non-secret settings (e.g. a brand ID, a company ID)."""


@dataclass(frozen=True, slots=True)
class RateBudgetSpec:
    """At most ``requests`` requests per ``period`` seconds, counting every attempt (retries included)."""

    requests: int
    period: float

    @property
    def interval(self) -> float:
        return self.period / self.requests


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter: sleep uniform(0, min(max_delay, base_delay * 2**attempt))."""

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 300.0
    """A server's Retry-After above this is treated as absurd and capped."""


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """How hard a run may push: global and per-endpoint concurrency, time-outs, rate budgets."""

    concurrency: int = 8
    per_endpoint_concurrency: Mapping[str, int] = field(default_factory=dict)
    request_timeout: float = 30.0
    drain_timeout: float = 30.0
    queue_size: int = 64
    budgets: Mapping[str, RateBudgetSpec] = field(default_factory=dict)
    """Per endpoint (e.g. ``tagUsers``); the key ``"*"`` applies to endpoints not named."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def budget_for(self, endpoint: str) -> RateBudgetSpec | None:
        return self.budgets.get(endpoint) or self.budgets.get("*")


def resolve_secret(destination: Destination, environ: Mapping[str, str] | None = None) -> str:
    """Read the destination's secret from the environment variable or file the job names.

    Raises :class:`SecretError` naming the variable or file — never the value.
    """
    env = os.environ if environ is None else environ
    if destination.secret_env:
        value = env.get(destination.secret_env)
        if value:
            return value.strip()
        if not destination.secret_file:
            raise SecretError(f"environment variable {destination.secret_env} is not set or empty")
    if destination.secret_file:
        path = Path(os.path.expanduser(destination.secret_file))
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SecretError(f"cannot read secret file {path}: {exc.strerror}") from exc
        if not value:
            raise SecretError(f"secret file {path} is empty")
        return value
    raise SecretError("the job names no secret (destination.secret.env or destination.secret.file)")


# --- job files -----------------------------------------------------------------------------------------------

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "job.schema.json"
"""The JSON Schema every job file is validated against (``schemas/job.schema.json``)."""

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

_PLATFORM_MAX_BATCH = {"netmera": 1000, "notifyvisitors": 1000, "formsonfire": 1}

DEFAULT_NULL_VALUES: tuple[str, ...] = ("", "NULL", "null", "NaN", "N/A", "\\N")
"""Values read as "no value" unless a source names its own ``null_values``."""


class SourceKind(StrEnum):
    """What the rows of a source describe."""

    USERS = "users"
    """One row per user: attributes, tags, opt-ins, email/MSISDN updates (last row of an ID wins)."""
    TAGS = "tags"
    """A long table ``ext_id, tag[, action]``: one row per (user, tag) change."""
    EVENTS = "events"
    """One row per event: ``ext_id, event name, attributes...``; every row is sent."""
    DELETIONS = "deletions"
    """One row per user to delete permanently."""


class FileFormat(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"


class ValueType(StrEnum):
    """Types a mapped column can hold; see docs/jobs.md for the accepted spellings."""

    STRING = "string"
    NUMBER = "number"
    BOOLEAN = "boolean"
    DATE = "date"
    LIST = "list"


class AttributeMode(StrEnum):
    """How an attribute column reaches the profile."""

    SET = "set"
    """``setProfileAttributes``: overwrite the attribute."""
    PUSH = "push"
    """``pushProfileAttributes``: append the list's values to an array attribute."""
    PULL = "pull"
    """``pullProfileAttributes``: remove the list's values from an array attribute."""


class NullAction(StrEnum):
    """What an empty cell of a ``set`` attribute means."""

    SKIP = "skip"
    """Leave the attribute as it is on the platform."""
    UNSET = "unset"
    """Remove the attribute (``unsetProfileAttributes``)."""


class TagAction(StrEnum):
    TAG = "tag"
    UNTAG = "untag"


@dataclass(frozen=True, slots=True)
class AttributeMapping:
    """One column mapped to a profile attribute (users sources) or an event attribute (events sources)."""

    column: str
    attribute: str
    type: ValueType = ValueType.STRING
    mode: AttributeMode = AttributeMode.SET
    on_null: NullAction = NullAction.SKIP
    delimiter: str = "|"
    """List values: the separator inside a cell (a cell starting with ``[`` is read as a JSON array instead)."""


@dataclass(frozen=True, slots=True)
class TagColumn:
    """A column holding a list of tags to add (``tag``) or remove (``untag``) for the row's user."""

    column: str
    delimiter: str = "|"
    action: TagAction = TagAction.TAG


@dataclass(frozen=True, slots=True)
class OptIns:
    """Boolean columns: true enables, false disables, empty leaves the setting alone."""

    push: str | None = None
    email: str | None = None
    sms: str | None = None
    categories: Mapping[str, str] = field(default_factory=dict)
    """Category name (as defined in the Netmera panel) → column."""

    def columns(self) -> tuple[str, ...]:
        named = [c for c in (self.push, self.email, self.sms) if c]
        return (*named, *self.categories.values())


@dataclass(frozen=True, slots=True)
class Source:
    """One input: where its files are, how to read them and how its columns map to operations."""

    name: str
    kind: SourceKind
    paths: tuple[str, ...]
    """Absolute paths or glob patterns (resolved against the job file's directory); globs expand at read time."""
    format: FileFormat
    ext_id: str
    delimiter: str = ","
    encoding: str = "utf-8"
    null_values: tuple[str, ...] = DEFAULT_NULL_VALUES
    attributes: tuple[AttributeMapping, ...] = ()
    tags: tuple[TagColumn, ...] = ()
    opt_ins: OptIns = field(default_factory=OptIns)
    email: str | None = None
    """users: column whose value is sent with ``updateEmail``."""
    msisdn: str | None = None
    """users: column whose value is sent with ``updateMsisdn``."""
    tag: str | None = None
    """tags: column holding the tag name."""
    action: str | None = None
    """tags: optional column saying tag/untag (also add/remove, +/-, true/false, 1/0); empty means tag."""
    event: str | None = None
    """events: column holding the event name."""

    def columns(self) -> tuple[str, ...]:
        """Every column the mapping reads, ext_id first, without duplicates (only these are read)."""
        cols = [self.ext_id, *(a.column for a in self.attributes), *(t.column for t in self.tags)]
        cols += [
            *self.opt_ins.columns(),
            *(c for c in (self.email, self.msisdn, self.tag, self.action, self.event) if c),
        ]
        return tuple(dict.fromkeys(cols))


@dataclass(frozen=True, slots=True)
class ValidationRules:
    """Input validation settings shared by every source."""

    max_id_length: int = 256
    timezone: str = "UTC"
    """Zone for dates and date-times without an offset; Netmera stores dates as epoch milliseconds."""
    trim: bool = True


class SyncMode(StrEnum):
    """How a job's input is read: as changes to send as given, or as the full current state (docs/sync.md)."""

    CHANGES = "changes"
    SNAPSHOT = "snapshot"


class RemovalAction(StrEnum):
    """Snapshot mode: what happens to users in the confirmed state that are no longer in the export."""

    NONE = "none"
    """Nothing: the platform keeps them as they are (and so does the state)."""
    UNTAG = "untag"
    """Untag the job's managed tags they hold (``untagUsers``)."""
    DELETE = "delete"
    """Delete them permanently (``deleteUsersPermanently``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotSettings:
    """The job's ``snapshot:`` options (used in snapshot mode)."""

    removal: RemovalAction = RemovalAction.NONE
    max_removal_share: float = 0.05
    """Refuse the run when more than this share of the state's users would be untagged or deleted."""
    unset_on_empty: bool = False
    """Every ``set`` attribute whose cell became empty is unset (an attribute's own ``on_null: unset`` also)."""


@dataclass(frozen=True, slots=True)
class Job:
    """A loaded, validated job file. Build it with :func:`load_job`."""

    name: str
    path: Path
    destination: Destination
    dispatch: DispatchSettings
    workdir: Path
    sources: tuple[Source, ...]
    validation: ValidationRules = field(default_factory=ValidationRules)
    batch_sizes: Mapping[str, int] = field(default_factory=dict)
    """Unique IDs per request, per endpoint; ``"*"`` for endpoints not named (platform default applied)."""
    mode: SyncMode = SyncMode.CHANGES
    snapshot: SnapshotSettings = field(default_factory=SnapshotSettings)

    def batch_size_for(self, endpoint: str) -> int:
        return self.batch_sizes.get(endpoint) or self.batch_sizes.get("*") or 1000


_SECRET_LOOKING_KEYS = re.compile(r"(api_?key|apikey|token|password|passwd|secret_?key|key)$", re.IGNORECASE)
_SECRET_LOOKING_EXTRA = re.compile(
    r"(api_?key|access_?key|integration_?key|private_?key|secret(_?key)?|token|password|passwd)$",
    re.IGNORECASE,
)
"""Names of ``destination.extra`` settings that would hold a secret (``user_key: UserId`` is not one)."""
_PER = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_ENDPOINTS_REQUIRING_LIST = (AttributeMode.PUSH, AttributeMode.PULL)


def _schema() -> dict[str, Any]:
    with SCHEMA_PATH.open(encoding="utf-8") as fh:
        loaded: dict[str, Any] = json.load(fh)
    return loaded


def _location(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _join(location: str, key: str) -> str:
    return f"{location}.{key}" if location else key


def _schema_message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        schema: Any = error.schema
        instance: Any = error.instance
        extra = sorted(set(instance) - set(schema.get("properties", {})))
        return f"unknown key(s) {', '.join(map(repr, extra))}"
    if error.validator == "oneOf" and error.context:
        # oneOf failures are noisy; the branch that got furthest explains the problem best.
        best = max(error.context, key=lambda e: len(e.absolute_path))
        return _schema_message(best)
    return error.message


def _secret_problems(raw: Mapping[str, Any]) -> list[JobProblem]:
    """Refuse a secret written into the job file, with a message that says what to do instead."""
    dest = raw.get("destination")
    if not isinstance(dest, Mapping):
        return []
    problems = []
    hint = "a job names where the secret lives ({env: NAME} or {file: PATH}), never the secret itself"
    secret = dest.get("secret")
    if secret is not None and not isinstance(secret, Mapping):
        problems.append(JobProblem("destination.secret", f"looks like a literal secret: {hint}"))
    for key in dest:
        if key != "secret" and _SECRET_LOOKING_KEYS.search(str(key)):
            problems.append(
                JobProblem(f"destination.{key}", f"secrets may not be written in a job file: {hint}")
            )
    extra = dest.get("extra")
    if isinstance(extra, Mapping):
        for key in extra:
            if _SECRET_LOOKING_EXTRA.search(str(key)):
                problems.append(
                    JobProblem(
                        f"destination.extra.{key}", f"secrets may not be written in a job file: {hint}"
                    )
                )
    base_url = dest.get("base_url")
    if isinstance(base_url, str):
        try:
            parts = urllib.parse.urlsplit(base_url)
            userinfo = "@" in parts.netloc
        except ValueError:
            parts, userinfo = None, False
        # The URL is printed in plans, summaries and logs: credentials in it would leak from there.
        if userinfo:
            problems.append(
                JobProblem("destination.base_url", f"credentials may not be written in the URL: {hint}")
            )
        elif parts is not None and (parts.query or parts.fragment):
            problems.append(
                JobProblem(
                    "destination.base_url",
                    f"a base URL takes no query string (endpoints are appended to it): {hint}",
                )
            )
    return problems


def _seconds(spec: Mapping[str, Any]) -> float:
    if "period" in spec:
        return float(spec["period"])
    match = _PER.match(str(spec.get("per", "1s")))
    assert match is not None  # the schema's pattern already checked it
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


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


def _source(
    i: int, raw: Mapping[str, Any], defaults: Mapping[str, Any], base: Path, problems: list[JobProblem]
) -> Source | None:
    loc = f"sources[{i}]"
    kind = SourceKind(raw.get("kind", "users"))
    before = len(problems)
    if ("path" in raw) == ("paths" in raw):
        problems.append(JobProblem(loc, "give exactly one of 'path' or 'paths'"))
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
        null_values=tuple(raw.get("null_values", defaults.get("null_values", DEFAULT_NULL_VALUES))),
        attributes=attributes,
        tags=_tag_columns(raw.get("tags")),
        opt_ins=opt_ins,
        email=raw.get("email"),
        msisdn=raw.get("msisdn"),
        tag=raw.get("tag"),
        action=raw.get("action"),
        event=raw.get("event"),
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
    return source if len(problems) == before else None


def _dispatch(raw: Mapping[str, Any], platform: str) -> tuple[DispatchSettings, dict[str, int]]:
    defaults = PLATFORM_DEFAULTS.get(platform, {})
    budgets: dict[str, RateBudgetSpec] = dict(defaults.get("budgets", {}))
    for endpoint, spec in (raw.get("budgets") or {}).items():
        budgets[endpoint] = RateBudgetSpec(requests=int(spec["requests"]), period=_seconds(spec))
    retry_raw = raw.get("retry") or {}
    retry_kwargs: dict[str, Any] = {
        k: (int(v) if k == "max_attempts" else float(v)) for k, v in retry_raw.items()
    }
    retry = RetryPolicy(**retry_kwargs)
    kwargs: dict[str, Any] = {
        k: raw[k] for k in ("concurrency", "request_timeout", "drain_timeout", "queue_size") if k in raw
    }
    settings = DispatchSettings(
        **kwargs,
        per_endpoint_concurrency=dict(raw.get("per_endpoint_concurrency") or {}),
        budgets=budgets,
        retry=retry,
    )
    sizes_raw = raw.get("batch_size", {})
    sizes = {"*": int(defaults.get("batch_size", 1000))}
    sizes.update(
        {"*": sizes_raw} if isinstance(sizes_raw, int) else {k: int(v) for k, v in sizes_raw.items()}
    )
    return settings, sizes


def _destination(dest_raw: Mapping[str, Any], base: Path, problems: list[JobProblem]) -> Destination:
    destination = Destination(
        platform=dest_raw["platform"],
        base_url=dest_raw["base_url"] if dest_raw["base_url"].endswith("/") else dest_raw["base_url"] + "/",
        secret_env=dest_raw["secret"].get("env"),
        secret_file=(
            str(base / os.path.expanduser(dest_raw["secret"]["file"]))
            if "file" in dest_raw["secret"]
            else None
        ),
        verify_tls=dest_raw.get("verify_tls", True),
        extra=dict(dest_raw.get("extra") or {}),
    )
    if not destination.verify_tls and not re.match(
        r"^https?://(127\.0\.0\.1|localhost|\[::1\])[:/]", destination.base_url
    ):
        problems.append(
            JobProblem("destination.verify_tls", "TLS checks may only be turned off for a local sandbox")
        )
    return destination


def _platform_problems(platform: str, sources: list[Source], extra: Mapping[str, str]) -> list[JobProblem]:
    """What the platform itself cannot do with these sources and settings (imported late: the platform layer
    imports this module)."""
    if platform == "notifyvisitors":
        from sync.platforms.notifyvisitors.requests import job_problems
    elif platform == "formsonfire":
        from sync.platforms.formsonfire.requests import job_problems
    else:
        return []
    return job_problems(sources, extra)


def _sync_mode(
    raw: Mapping[str, Any], sources: list[Source], problems: list[JobProblem]
) -> tuple[SyncMode, SnapshotSettings]:
    """``mode`` and ``snapshot``; in snapshot mode every source must be a users export without untag columns."""
    if any(p.location == "mode" or p.location.startswith("snapshot") for p in problems):
        return SyncMode.CHANGES, SnapshotSettings()  # the schema already reported what is wrong here
    mode = SyncMode(raw.get("mode", "changes"))
    snap = raw.get("snapshot") or {}
    settings = SnapshotSettings(
        removal=RemovalAction(snap.get("removal", "none")),
        max_removal_share=float(snap.get("max_removal_share", 0.05)),
        unset_on_empty=bool(snap.get("unset_on_empty", False)),
    )
    if mode is SyncMode.SNAPSHOT:
        for i, source in enumerate(sources):
            if source.kind is not SourceKind.USERS:
                problems.append(
                    JobProblem(
                        f"sources[{i}].kind",
                        f"a {source.kind.value!r} source lists changes, not the full state: snapshot mode takes "
                        "users exports only (send it with a job in mode 'changes')",
                    )
                )
            elif any(t.action is TagAction.UNTAG for t in source.tags):
                problems.append(
                    JobProblem(
                        f"sources[{i}].tags",
                        "untag columns have no meaning in snapshot mode: tags missing from the export are untagged",
                    )
                )
    elif "snapshot" in raw:
        problems.append(JobProblem("snapshot", "only used with mode: snapshot"))
    return mode, settings


def load_job(path: str | Path) -> Job:
    """Read, validate and freeze a job file.

    Raises :class:`BadJobError` listing *every* problem found (schema violations and semantic checks), each with
    its location in the file, e.g. ``sources[1].attributes.birth_date``.
    """
    job_path = Path(path)
    try:
        text = job_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadJobError(str(job_path), [JobProblem("", f"cannot read job file: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        raise BadJobError(str(job_path), [JobProblem("", "job file is not UTF-8 text")]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise BadJobError(str(job_path), [JobProblem(where, str(problem))]) from exc
    if not isinstance(raw, Mapping):
        raise BadJobError(str(job_path), [JobProblem("", "a job file is a YAML mapping (key: value)")])

    problems = _secret_problems(raw)
    quiet = {p.location for p in problems}
    validator = jsonschema.Draft202012Validator(_schema())
    for error in sorted(validator.iter_errors(raw), key=lambda e: [str(x) for x in e.absolute_path]):
        loc = _location(error.absolute_path)
        # A problem already explained by the secret check is not repeated in the schema's words.
        if any(loc == q or loc.startswith(q + ".") for q in quiet):
            continue
        if error.validator == "additionalProperties":
            schema: Any = error.schema
            instance: Any = error.instance
            extra = [
                k for k in instance if k not in schema.get("properties", {}) and _join(loc, k) not in quiet
            ]
            if extra:
                problems.append(JobProblem(loc, f"unknown key(s) {', '.join(map(repr, sorted(extra)))}"))
            continue
        if loc == "destination" and "destination.secret" in quiet and "secret" in error.message:
            continue
        problems.append(JobProblem(loc, _schema_message(error)))

    # Semantic checks run on every section the schema found sound, so one pass reports every problem.
    flagged = {p.location for p in problems}

    def sound(prefix: str) -> bool:
        return not any(f == prefix or f.startswith((prefix + ".", prefix + "[")) for f in flagged)

    base = job_path.resolve().parent
    name = raw.get("name") or re.sub(r"[^A-Za-z0-9_.-]", "_", job_path.stem)
    destination = (
        _destination(raw["destination"], base, problems)
        if "destination" in raw and sound("destination")
        else None
    )
    platform = destination.platform if destination else "netmera"
    rules_raw = (raw.get("validation") or {}) if sound("validation") else {}
    rules = ValidationRules(
        max_id_length=rules_raw.get("max_id_length", 256),
        timezone=rules_raw.get("timezone", "UTC"),
        trim=rules_raw.get("trim", True),
    )
    try:
        zoneinfo.ZoneInfo(rules.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        problems.append(JobProblem("validation.timezone", f"unknown time zone {rules.timezone!r}"))
    defaults = (raw.get("defaults") or {}) if sound("defaults") else {}
    sources = []
    seen: set[str] = set()
    raw_sources: list[Any] = raw["sources"] if isinstance(raw.get("sources"), list) else []
    for i, src_raw in enumerate(raw_sources):
        if not sound(f"sources[{i}]"):
            continue
        if src_raw["name"] in seen:
            problems.append(JobProblem(f"sources[{i}].name", f"duplicate source name {src_raw['name']!r}"))
        seen.add(src_raw["name"])
        source = _source(i, src_raw, defaults, base, problems)
        if source is not None:
            sources.append(source)
    dispatch, sizes = _dispatch((raw.get("dispatch") or {}) if sound("dispatch") else {}, platform)
    limit = _PLATFORM_MAX_BATCH.get(platform)
    for endpoint, size in sizes.items():
        if limit is not None and size > limit:
            where = "dispatch.batch_size" + ("" if endpoint == "*" else f".{endpoint}")
            problems.append(
                JobProblem(where, f"{size} is above the {platform} limit of {limit} unique IDs per request")
            )
    if destination is not None and len(sources) == len(raw_sources):
        problems += _platform_problems(platform, sources, destination.extra)
    mode, snapshot = _sync_mode(raw, sources, problems)
    if problems or destination is None:
        raise BadJobError(str(job_path), problems)
    workdir = base / raw["workdir"] if "workdir" in raw else Path.cwd() / ".pushsync" / name
    return Job(
        name=name,
        path=job_path.resolve(),
        destination=destination,
        dispatch=dispatch,
        workdir=workdir,
        sources=tuple(sources),
        validation=rules,
        batch_sizes=sizes,
        mode=mode,
        snapshot=snapshot,
    )
