"""The job-file loader: YAML, validated against the JSON Schema, then the semantic checks the schema cannot
express; every problem found is reported at once (:class:`BadJobError`)."""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import re
import zoneinfo
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sync.config._dispatch import parse_dispatch
from sync.config._env import interpolate_job
from sync.config._job import (
    Alerts,
    Coordination,
    Job,
    RemovalAction,
    SnapshotSettings,
    Source,
    SourceKind,
    SyncMode,
    TagAction,
    Thresholds,
    ValidationRules,
)
from sync.config._platforms import PlatformCatalog, PlatformRules, installed_platforms
from sync.config._settings import Destination, base_url_problem
from sync.config._sources import parse_source
from sync.config._sql import database_secret_problems
from sync.config._yaml import looks_like_a_key, read_job_yaml
from sync.errors import BadJobError, JobProblem

if TYPE_CHECKING:
    import jsonschema

SCHEMA_RESOURCE = ("schemas", "job.schema.json")
"""Where the JSON Schema every job file is validated against lives inside the ``sync`` package.

``sync/schemas`` is a symlink to the repository's top-level ``schemas/`` (the one copy); a wheel carries the
files as package data, so the schema is found through :mod:`importlib.resources` however pushsync is installed."""

_SECRET_LOOKING_KEYS = re.compile(r"(api_?key|apikey|token|password|passwd|secret_?key|key)$", re.IGNORECASE)
_SECRET_LOOKING_EXTRA = re.compile(
    r"(api[_-]?key|access[_-]?key|integration[_-]?key|private[_-]?key|secret([_-]?key)?|token|password|passwd"
    r"|authorization|bearer|credentials?)$",
    re.IGNORECASE,
)
"""Names of ``destination.extra`` settings that would hold a secret (``user_key: UserId`` is not one), written
with ``_`` or ``-`` (``X-Api-Key``, as the header is named) or as the header that carries one (``Authorization``)."""
_MAX_SCHEMA_MESSAGE = 200  # characters: a schema message quotes the value it refuses, which may be huge
_TYPE_NAMES = {
    "object": "a mapping (key: value)",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "empty",
}
_SECRET_HINT = "a job names where the secret lives ({env: NAME} or {file: PATH}), never the secret itself"


def secret_setting(name: str) -> bool:
    """Whether a ``destination.extra`` setting called ``name`` would hold a secret (the loader refuses it)."""
    return _SECRET_LOOKING_EXTRA.search(name) is not None


@functools.cache
def job_schema() -> dict[str, Any]:
    """The JSON Schema of a job file (``schemas/job.schema.json``), read once from the installed package."""
    text = resources.files("sync").joinpath(*SCHEMA_RESOURCE).read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


_NOT_SPACE_TO_RUST = frozenset("\x1c\x1d\x1e\x1f\x85")
"""The characters Python's ``re`` matches with ``\\s`` and jsonschema-rs (ECMA-262 regular expressions) does not,
found by trying every code point: a string holding one could pass ``[^\\s]+`` there and fail it here
(``base_url``). The other way round (U+FEFF) and ``$`` (which Python also matches before a final newline),
jsonschema-rs is the stricter, and its "invalid" is checked again by jsonschema."""


def _plain_json(document: Any) -> bool:
    """Whether ``document`` holds JSON's own types only (exact ``dict`` with ``str`` keys, ``list``, ``str``,
    finite ``float``, ``int`` within 64 bits, ``bool``, None) and no string :data:`_NOT_SPACE_TO_RUST` reads apart:
    then jsonschema-rs and jsonschema judge it alike. YAML can also make dates, tuples (``!!omap``), sets, bytes,
    NaN and huge integers, which the two libraries convert or type differently."""
    stack = [document]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is str:
            if not _NOT_SPACE_TO_RUST.isdisjoint(value):
                return False
        elif kind is dict:
            for key in value:
                if type(key) is not str or not _NOT_SPACE_TO_RUST.isdisjoint(key):
                    return False
            stack.extend(value.values())
        elif kind is list:
            stack.extend(value)
        elif kind is int:
            if not -(2**63) <= value < 2**63:
                return False
        elif kind is float:
            if not math.isfinite(value):
                return False
        elif value is not None and kind is not bool:
            return False
    return True


@functools.cache
def _fast_validator() -> Any:
    """The job schema compiled by jsonschema-rs (draft 2020-12, formats not asserted, no network: as
    :class:`jsonschema.Draft202012Validator` without a format checker), or None when it is not installed.

    jsonschema-rs only says whether a job is valid, in ~0.1 ms after a ~3 ms import; jsonschema (~40 ms to import,
    ~2 ms to validate) gives the messages, so it is loaded only for a job that has problems (issue 13: start-up).
    Where the two could read a pattern apart, jsonschema-rs is the stricter (``$`` before a final newline,
    ``\\s``), except for :data:`_NOT_SPACE_TO_RUST`, which :func:`_plain_json` sends to jsonschema."""
    try:
        import jsonschema_rs
    except ImportError:  # a platform without its wheel: jsonschema alone, as before
        return None
    return jsonschema_rs.Draft202012Validator(job_schema(), validate_formats=False, offline=True)


def _schema_errors(raw: Any) -> list[jsonschema.ValidationError]:
    """Every way ``raw`` breaks the job schema, in document order; none for a valid job.

    A valid document (the common case) is recognised by jsonschema-rs; jsonschema, the reference, finds and
    describes the problems otherwise, so every message stays jsonschema's."""
    fast = _fast_validator()
    if fast is not None and _plain_json(raw):
        try:
            if fast.is_valid(raw):
                return []
        except Exception:  # a value it cannot convert: jsonschema decides, as for any doubt
            pass
    import jsonschema

    validator = jsonschema.Draft202012Validator(job_schema())
    return sorted(validator.iter_errors(raw), key=lambda e: [str(x) for x in e.absolute_path])


def _ends_with_a_line_break(document: Any) -> bool:
    """Whether a string of ``document`` ends with a line break (cheap: no schema is loaded for a job without)."""
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if value.endswith("\n"):
                return True
        elif isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def _line_break_errors(raw: Any) -> list[jsonschema.ValidationError]:
    """Every patterned setting (``^...$``) whose value matches only by Python's ``$`` matching before a final
    line break: ``name: "nightly\n"`` (a YAML ``|`` block, a ``${NAME}`` read from a file) passed the schema,
    and the line break reached the workdir's name, the variable looked up, the base URL requests are sent to.
    :func:`_schema_errors` judges as jsonschema does; this is the job loader's own rule on top."""
    if not _ends_with_a_line_break(raw):
        return []
    import jsonschema
    import jsonschema.validators

    def pattern(validator: Any, expected: str, instance: Any, schema: Any) -> Any:
        if (
            validator.is_type(instance, "string")
            and expected.endswith("$")
            and instance.endswith("\n")
            and re.search(expected, instance)
        ):
            yield jsonschema.ValidationError(f"ends with a line break (it must match {expected})")

    strict = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": pattern})
    return [e for e in strict(job_schema()).iter_errors(raw) if e.validator == "pattern"]


def _location(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _join(location: str, key: str) -> str:
    return f"{location}.{key}" if location else key


def _unknown_keys(extra: list[str], known: Any) -> str:
    """``unknown key(s) 'colour'``, each key with the known key it most likely misspells: a typo (``dispach``,
    ``concurency``) names what was meant instead of leaving the reader to search docs/jobs.md."""
    names = [str(k) for k in known]
    said = []
    for key in sorted(extra):
        if looks_like_a_key(str(key)):
            # A secret pasted as a mapping's key is not repeated, as nowhere else (docs/jobs.md "The secret").
            said.append("one with the shape of a secret (not shown)")
            continue
        close = difflib.get_close_matches(key, names, n=1)
        said.append(repr(key) + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown key(s) {', '.join(said)}"


def _kind(value: Any) -> str:
    for name, kind in (("object", Mapping), ("array", list), ("boolean", bool), ("string", str)):
        if isinstance(value, kind):
            return _TYPE_NAMES[name]
    if isinstance(value, int | float):
        return "a number"
    return "empty" if value is None else type(value).__name__


def _expected(error: jsonschema.ValidationError) -> str:
    types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
    return " or ".join(_TYPE_NAMES.get(str(t), str(t)) for t in types)


def _yaml_reading(error: jsonschema.ValidationError) -> str:
    """What to write instead, when a type problem comes from YAML 1.1 reading a value other than as it looks:
    ``NO`` (a country) is false, ``00123`` is 83, ``1:30`` is 90, and ``1e3`` is text. Empty otherwise."""
    types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
    value = error.instance
    schema: Any = error.schema
    if "string" in types and isinstance(value, bool):
        return '; YAML reads an unquoted yes, no, on, off, true or false as true or false: quote it ("NO")'
    if "string" in types and isinstance(value, int | float):
        if "(ms|s|m|h)" in str(schema.get("pattern", "")):
            return "; a period has a unit: 500ms, 1s, 1m or 1h (YAML reads 1:30 as 90)"
        return '; YAML reads an unquoted 00123 or 1:30 as a number: quote it ("00123")'
    if {"number", "integer"} & set(types) and isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return '; write the number unquoted and in full (1000, not "1000" or 1e3: YAML reads those as text)'
    return ""


def _schema_message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        schema: Any = error.schema
        instance: Any = error.instance
        extra = sorted(set(instance) - set(schema.get("properties", {})))
        return _unknown_keys(extra, schema.get("properties", {}))
    if error.validator == "oneOf" and error.context:
        # oneOf failures are noisy; the branch that got furthest explains the problem best.
        best = max(error.context, key=lambda e: len(e.absolute_path))
        return _schema_message(best)
    if error.validator == "type":
        # Said without quoting the value: it may be large (aliases) or hold what belongs elsewhere.
        return f"must be {_expected(error)}, not {_kind(error.instance)}{_yaml_reading(error)}"
    if isinstance(error.instance, str) and looks_like_a_key(error.instance):
        # A key pasted into the wrong place (base_url, platform...) is not repeated either.
        allowed: Any = error.validator_value
        expected = {
            "pattern": f"must match {allowed}",
            "enum": f"must be one of {', '.join(map(repr, allowed))}" if isinstance(allowed, list) else "",
        }.get(str(error.validator)) or "invalid"
        return f"{expected} (the value is not shown: it has the shape of a key)"
    if (
        error.validator == "pattern"
        and "(ms|s|m|h)" in str(error.validator_value)
        and not error.message.startswith("ends with a line break")  # _line_break_errors' own words
    ):
        # The regular expression says it to a reader of regular expressions only ('1d', '1 sec', '1,5s').
        return "not a period: a number and a unit, ms, s, m or h (500ms, 1s, 1.5m, 24h)"
    message = error.message
    return message if len(message) <= _MAX_SCHEMA_MESSAGE else message[: _MAX_SCHEMA_MESSAGE - 1] + "…"


def _secret_schema_message(error: jsonschema.ValidationError) -> str:
    """A schema problem under ``destination.secret`` said without the value (or key) refused: it may be the
    secret itself, pasted where its variable's name or file's path belongs."""
    unshown = "(the value is not shown: it may be the secret itself)"
    if error.validator == "additionalProperties":
        return f"takes only 'env' and 'file' {unshown}; {_SECRET_HINT}"
    if error.validator == "pattern" and list(error.absolute_path)[-1:] == ["env"]:
        return (
            "not the name of an environment variable (letters, digits and _, not starting with a digit) "
            f"{unshown}; {_SECRET_HINT}"
        )
    if error.validator == "type":
        return f"must be {_expected(error)}, not {_kind(error.instance)}"
    if error.validator in ("minLength", "minProperties"):
        return f"must not be empty; {_SECRET_HINT}"
    return f"invalid {unshown}; {_SECRET_HINT}"


def _secret_problems(raw: Mapping[str, Any], base: Path) -> list[JobProblem]:
    """Refuse a secret written into the job file, with a message that says what to do instead."""
    dest = raw.get("destination")
    if not isinstance(dest, Mapping):
        return []
    problems = []
    hint = _SECRET_HINT
    secret = dest.get("secret")
    if secret is not None and not isinstance(secret, Mapping):
        problems.append(JobProblem("destination.secret", f"looks like a literal secret: {hint}"))
    elif isinstance(secret, Mapping):
        # A key pasted where its variable's name (or its file's path) belongs would be printed by every
        # "variable not set" or "file not found" message after it: refused here, and never repeated.
        for field in ("env", "file"):
            value = secret.get(field)
            if not isinstance(value, str) or not looks_like_a_key(value):
                continue
            if field == "file" and (base / os.path.expanduser(value)).exists():
                continue  # a file that is there is a file, whatever its name looks like
            what = "the name of an environment variable" if field == "env" else "a file's path"
            problems.append(
                JobProblem(
                    f"destination.secret.{field}",
                    f"looks like a key, not {what} (the value is not shown); {hint}",
                )
            )
    for key in dest:
        if key != "secret" and _SECRET_LOOKING_KEYS.search(str(key)):
            problems.append(
                JobProblem(f"destination.{key}", f"secrets may not be written in a job file: {hint}")
            )
    extra = dest.get("extra")
    if isinstance(extra, Mapping):
        for key in extra:
            if secret_setting(str(key)):
                problems.append(
                    JobProblem(
                        f"destination.extra.{key}", f"secrets may not be written in a job file: {hint}"
                    )
                )
    base_url = dest.get("base_url")
    # The URL is printed in plans, summaries and logs: credentials in it would leak from there.
    problem = base_url_problem(base_url, scheme=False) if isinstance(base_url, str) else None
    if problem is not None:
        problems.append(JobProblem("destination.base_url", f"{problem}: {hint}"))
    return problems


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


def _sync_mode(
    raw: Mapping[str, Any], sources: list[Source], problems: list[JobProblem], rules: PlatformRules | None
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
    if mode is SyncMode.SNAPSHOT and rules is not None and not rules.snapshot_mode:
        problems.append(
            JobProblem(
                "mode",
                f"snapshot mode is not available for {rules.name}: its endpoints cannot be diffed and committed "
                "field by field; use mode 'changes' (every row is sent as given)",
            )
        )
    elif mode is SyncMode.SNAPSHOT:
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


def load_job(path: str | Path, *, platforms: PlatformCatalog | None = None) -> Job:
    """Read, validate and freeze a job file.

    ``platforms``: the platforms the job may name and whose checks it must pass (default: the registry,
    :mod:`sync.platforms.registry`). Raises :class:`BadJobError` listing *every* problem found (schema
    violations, semantic and platform checks), each with its location in the file, e.g.
    ``sources[1].attributes.birth_date``.
    """
    catalog = platforms if platforms is not None else installed_platforms()
    job_path = Path(path)
    raw = read_job_yaml(job_path)
    if not isinstance(raw, Mapping):
        raise BadJobError(str(job_path), [JobProblem("", "a job file is a YAML mapping (key: value)")])
    if "platform" in raw and "destination" not in raw:
        # A watch job (Meiro: `platform: meiro` at the top) is not a sync job: say so instead of listing every
        # key the sync job schema does not know.
        raise BadJobError(
            str(job_path),
            [
                JobProblem(
                    "platform",
                    f"a {raw['platform']!r} job watches exports rather than sending rows: check it with "
                    f"`pushsync validate`, run it with `pushsync {raw['platform']} run`",
                )
            ],
        )

    base = job_path.resolve().parent
    # ${NAME} references first: every check below (the base URL's literal-credential checks included) sees
    # the value the run will use.
    raw, env_problems = interpolate_job(raw)
    problems = (
        env_problems
        + _secret_problems(raw, base)
        + database_secret_problems(raw)
        + _coordination_problems(raw)
        + _non_finite_problems(raw)
    )
    quiet = {p.location for p in problems}
    for error in [*_schema_errors(raw), *_line_break_errors(raw)]:
        loc = _location(error.absolute_path)
        # A problem already explained by the secret check is not repeated in the schema's words.
        if any(loc == q or loc.startswith(q + ".") for q in quiet):
            continue
        if loc == "destination.secret" or loc.startswith("destination.secret."):
            problems.append(JobProblem(loc, _secret_schema_message(error)))
            continue
        if error.validator == "additionalProperties":
            schema: Any = error.schema
            instance: Any = error.instance
            extra = [
                k for k in instance if k not in schema.get("properties", {}) and _join(loc, k) not in quiet
            ]
            if extra:
                problems.append(JobProblem(loc, _unknown_keys(extra, schema.get("properties", {}))))
            continue
        if loc == "destination" and "destination.secret" in quiet and "secret" in error.message:
            continue
        problems.append(JobProblem(loc, _schema_message(error)))

    # Semantic checks run on every section the schema found sound, so one pass reports every problem.
    flagged = {p.location for p in problems}

    def sound(prefix: str) -> bool:
        return not any(f == prefix or f.startswith((prefix + ".", prefix + "[")) for f in flagged)

    name = raw.get("name") or re.sub(r"[^A-Za-z0-9_.-]", "_", job_path.stem)
    destination = (
        _destination(raw["destination"], base, problems)
        if "destination" in raw and sound("destination")
        else None
    )
    platform_rules: PlatformRules | None = None
    if destination is not None:
        platform_rules = catalog.get(destination.platform)
        if platform_rules is None:
            problems.append(
                JobProblem(
                    "destination.platform",
                    # The value is echoed only when it reads as a name: a pasted key must not reach the message.
                    "unknown platform"
                    + ("" if looks_like_a_key(destination.platform) else f" {destination.platform!r}")
                    + f" (one of: {', '.join(catalog.names())})",
                )
            )
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
        source = parse_source(i, src_raw, defaults, base, problems)
        if source is not None:
            sources.append(source)
    limits = platform_rules.limits if platform_rules is not None else None
    dispatch, sizes = parse_dispatch(
        (raw.get("dispatch") or {}) if sound("dispatch") else {},
        platform_rules.name if platform_rules is not None else "",
        limits,
        problems,
    )
    for endpoint, size in sizes.items():
        if platform_rules is not None and limits is not None and size > limits.max_batch:
            where = "dispatch.batch_size" + ("" if endpoint == "*" else f".{endpoint}")
            problems.append(
                JobProblem(
                    where,
                    f"{size} is above the {platform_rules.name} limit of {limits.max_batch} unique IDs per request",
                )
            )
    if platform_rules is not None and destination is not None and len(sources) == len(raw_sources):
        problems += platform_rules.job_problems(sources, destination.extra)
    mode, snapshot = _sync_mode(raw, sources, problems, platform_rules)
    if problems or destination is None:
        raise BadJobError(str(job_path), problems)
    # Beside the job file, like its input paths: a cron job started from another directory finds its ledger and
    # snapshot state again (a default under the current directory made it re-send everything).
    # ``~`` is the user's home, as in every other path of a job (a "~" directory beside the job file was made).
    workdir = base / os.path.expanduser(raw["workdir"]) if "workdir" in raw else base / ".pushsync" / name
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
        thresholds=Thresholds(**((raw.get("thresholds") or {}) if sound("thresholds") else {})),
        alerts=_alerts(raw["alerts"], base) if "alerts" in raw else None,
        coordination=_coordination(raw["coordination"], base) if "coordination" in raw else None,
    )


def _non_finite_problems(raw: Mapping[str, Any]) -> list[JobProblem]:
    """Refuse ``.nan`` and ``.inf`` (YAML's not-a-number and infinity) wherever a job holds them: JSON Schema's
    ``minimum``/``maximum`` pass NaN (every comparison with it is false), so a NaN threshold never tripped and a
    NaN or infinite timeout, delay or period reached the run."""
    problems = []
    stack: list[tuple[str, Any]] = [("", raw)]
    while stack:
        location, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(
                JobProblem(
                    location,
                    "must be a finite number, not "
                    + ("NaN (.nan)" if math.isnan(value) else "infinity (.inf)"),
                )
            )
        elif isinstance(value, Mapping):
            stack.extend((_join(location, str(k)), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{location}[{i}]", v) for i, v in enumerate(value))
    return sorted(problems, key=lambda p: p.location)


def _coordination_problems(raw: Mapping[str, Any]) -> list[JobProblem]:
    """Refuse ``coordination.database`` given as anything but ``{env:}``/``{file:}`` before the schema, whose
    message would repeat the value (a URL with its password)."""
    section = raw.get("coordination")
    if not isinstance(section, Mapping) or "database" not in section:
        return []
    if isinstance(section["database"], Mapping):
        return []
    return [
        JobProblem(
            "coordination.database",
            "give where the URL lives, {env: NAME} or {file: PATH}, never the URL itself (it holds a password; "
            "the value is not shown)",
        )
    ]


def _coordination(raw: Mapping[str, Any], base: Path) -> Coordination:
    """The schema-valid ``coordination`` section; a URL file is relative to the job file, like the key's."""
    database = raw.get("database") or {}
    return Coordination(
        database_env=database.get("env"),
        database_file=str(base / os.path.expanduser(database["file"])) if "file" in database else None,
        lease=float(raw.get("lease", 30.0)),
    )


def _alerts(raw: Mapping[str, Any], base: Path) -> Alerts:
    """The schema-valid ``alerts`` section; a webhook file is relative to the job file, like the key's."""
    hook = raw["webhook"]
    return Alerts(
        webhook_env=hook.get("env"),
        webhook_file=str(base / os.path.expanduser(hook["file"])) if "file" in hook else None,
        on_partial=bool(raw.get("on_partial", False)),
        max_rejected_share=raw.get("max_rejected_share"),
        slower_than_usual=float(raw.get("slower_than_usual", 2.0)),
        timeout=float(raw.get("timeout", 5.0)),
    )
