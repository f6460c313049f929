"""``pushsync init DATA_FILE``: write a first job file from a CSV or Parquet file's header.

The columns are read with polars (the header, and a sample of rows for the types) and mapped the way a data
engineer would start, as far as the platform (``--platform``, default netmera) takes them — its
:class:`sync.config.StarterJob` says what it takes: the external ID column by its name, opt-in columns to
opt-ins, e-mail and phone columns to the contact fields, a delimited segments/tags column to tags, and every
other column to a profile attribute of the type its values have (number, boolean, date, string) — or, for a
platform whose rows are messages (Forms On Fire), the columns named like its message fields to those fields. The
key is named by its environment variable, never written; the account settings no header names (a brand or
company ID) are given with ``--extra KEY=VALUE``. The file is checked with the same loader as ``pushsync
validate`` before it is written, and an existing file is never overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import os
import re
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sync._output import output_file, replaced_atomically
from sync.errors import BadInputError, BadJobError, ExitCode, JobProblem

if TYPE_CHECKING:
    from sync.config import PlatformLimits, StarterJob

__all__ = ["register", "suggest_job"]

_SAMPLE_ROWS = 10_000
_ID_NAMES = ("ext_id", "external_id", "externalid", "customer_id", "user_id", "userid", "customerid", "id")
_OPT_INS = {
    "push": ("push_opt_in", "push_optin", "push"),
    "email": ("email_opt_in", "email_optin"),
    "sms": ("sms_opt_in", "sms_optin"),
}
_EMAIL = ("email", "e_mail", "email_address", "mail")
_PHONE = ("msisdn", "phone", "mobile", "phone_number", "mobile_number", "gsm")
_TAGS = ("tags", "segments", "segment", "tag")


def _offered() -> dict[str, tuple[StarterJob, PlatformLimits]]:
    """Platform name → its :class:`sync.config.StarterJob` and limits (the budgets written), for every registered
    platform that offers a starter, in the registry's order."""
    from sync.platforms.registry import REGISTRY

    offered = {}
    for name in REGISTRY.names():
        limits = REGISTRY[name].limits
        if limits.starter is not None:
            offered[name] = (limits.starter, limits)
    return offered


def register(subparsers: Any) -> None:
    """Add ``init``."""
    init = subparsers.add_parser("init", help="write a first job file from a CSV or Parquet file's header")
    init.add_argument("data", type=Path, help="a CSV or Parquet export of users")
    init.add_argument(
        "-o", "--out", type=Path, default=Path("job.yaml"), help="the job file (default job.yaml)"
    )
    init.add_argument("--name", help="the job's name (default: the data file's name)")
    init.add_argument("--ext-id", help="the column with the external ID (default: guessed from the names)")
    offered = _offered()
    init.add_argument(
        "--platform",
        choices=sorted(offered),
        default="netmera" if "netmera" in offered else next(iter(offered)),
        help="the destination (default netmera)",
    )
    init.add_argument(
        "--base-url", help="the platform's API address (default: its production address, where it has one)"
    )
    init.add_argument(
        "--extra",
        action="append",
        type=_setting,
        default=[],
        metavar="KEY=VALUE",
        help="a destination.extra setting of the platform, e.g. brand_id=1000 (notifyvisitors), "
        "company_id=1000 (formsonfire); repeatable; never a secret",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing job file")
    init.set_defaults(func=_init)


def _setting(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError("must be KEY=VALUE")  # the text itself is not shown: it may be a key
    return key.strip(), value


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def _read_sample(path: Path) -> Any:
    import polars as pl

    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pl.scan_parquet(path).head(_SAMPLE_ROWS).collect()
        separator = _separator(path)
        frame = pl.read_csv(
            path,
            n_rows=_SAMPLE_ROWS,
            separator=separator,
            infer_schema_length=_SAMPLE_ROWS,
            try_parse_dates=True,
        )
        return _named_as_read(frame, path, separator)
    except (OSError, pl.exceptions.PolarsError) as exc:
        kind = "Parquet" if suffix in (".parquet", ".pq") else "CSV"
        raise BadInputError(str(path), f"cannot read it as {kind}: {str(exc).splitlines()[0]}") from exc


def _separator(path: Path) -> str:
    """The CSV file's delimiter: a tab for ``.tsv``; else a comma, unless the header holds none and does hold
    ``;`` (a European spreadsheet's export), a tab or ``|`` — the one it holds most of."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    with path.open("rb") as fh:
        header = fh.read(1 << 16).decode("utf-8", errors="replace").splitlines()[:1]
    line = header[0] if header else ""
    counts = {sep: line.count(sep) for sep in (";", "\t", "|")}
    best = max(counts, key=lambda sep: counts[sep])
    return best if "," not in line and counts[best] else ","


def _named_as_read(frame: Any, path: Path, separator: str) -> Any:
    """``frame`` with the column names a run reads from ``path``'s header: polars keeps a quoted header's doubled
    quote (``"q""t"`` is ``q""t`` to it, ``q"t`` to the reader), so the job named a column validate then could not
    find. Left as polars read it when the reader cannot read the header or sees another number of columns;
    :class:`BadInputError` when a name is repeated."""
    from sync.config import FileFormat, Source, SourceKind
    from sync.errors import PushSyncError
    from sync.sources.reading import read_columns

    source = Source("init", SourceKind.USERS, (str(path),), FileFormat.CSV, "", delimiter=separator)
    try:
        names = read_columns(source, path)
    except PushSyncError:
        return frame
    dupes = sorted(n for n, count in Counter(names).items() if count > 1)
    if dupes:
        # A run refuses such a file (which column would it send?): said now, not by validating the job written.
        raise BadInputError(str(path), f"duplicate column name(s) in the header: {', '.join(dupes)}")
    if len(names) != frame.width:
        return frame
    return frame.rename(dict(zip(frame.columns, names, strict=True)))


def _kind(dtype: Any) -> str:
    import polars as pl

    if dtype == pl.Boolean:
        return "boolean"
    if dtype.is_numeric():
        return "number"
    if dtype in (pl.Date, pl.Datetime) or isinstance(dtype, pl.Datetime):
        return "date"
    return "string"


def _delimiter(values: list[str]) -> str | None:
    """The list delimiter a text column uses, if most of its non-empty values contain the same one."""
    filled = [v for v in values if v]
    for candidate in ("|", ";"):
        if filled and sum(candidate in v for v in filled) >= len(filled) / 2:
            return candidate
    return None


def suggest_job(
    data: Path,
    job_path: Path,
    *,
    name: str,
    platform: str,
    ext_id: str | None,
    base_url: str | None = None,
    extra: Sequence[tuple[str, str]] = (),
) -> str:
    """The YAML text of a first job for ``data`` sending to ``platform``, to be written at ``job_path``.

    ``base_url``: the API's address (default: the platform's production address); ``extra``: its
    ``destination.extra`` settings. :class:`BadJobError` when the platform needs an address and none is given, or
    a setting's name says it would hold a secret."""
    from sync.config import secret_setting

    starter, limits = _offered()[platform]
    base_url = base_url or starter.base_url
    if not base_url:
        raise BadJobError(
            str(job_path),
            [
                JobProblem(
                    "--base-url",
                    f"{platform} has no one production address: give your account's API address "
                    f"({starter.reference})",
                )
            ],
        )
    secrets = [
        JobProblem(
            f"--extra {key}",
            "secrets may not be written in a job file: the job names the "
            f"environment variable that holds it ({starter.secret_env})",
        )
        for key, _ in extra
        if secret_setting(key)
    ]
    if secrets:
        raise BadJobError(str(job_path), secrets)
    frame = _read_sample(data)
    columns = list(frame.columns)
    if not columns:
        raise BadInputError(str(data), "no columns")
    by_norm = {_norm(c): c for c in columns}
    if ext_id is None:
        ext_id = next((by_norm[n] for n in _ID_NAMES if n in by_norm), None) or next(
            (c for c in columns if _norm(c).endswith("_id")), columns[0]
        )
    elif ext_id not in columns:
        raise BadInputError(str(data), f"no column {ext_id!r} (columns: {', '.join(columns)})")
    used = {ext_id}

    def take(names: Sequence[str]) -> str | None:
        """The first column not mapped yet whose name is one of ``names``; marked as mapped."""
        col = next((by_norm[n] for n in names if n in by_norm and by_norm[n] not in used), None)
        if col:
            used.add(col)
        return col

    opt_ins: dict[str, str] = {}
    for channel, names in _OPT_INS.items():
        col = take(names) if channel in starter.opt_ins else None
        if col:
            opt_ins[channel] = col
    email = take(_EMAIL) if "email" in starter.contact_fields else None
    phone = take(_PHONE) if "msisdn" in starter.contact_fields else None
    tags = None
    for n in _TAGS if starter.tags else ():
        col = by_norm.get(n)
        if col and col not in used and _kind(frame.schema[col]) == "string":
            tags = (col, _delimiter(frame[col].drop_nulls().cast(str).to_list()) or "|")
            used.add(col)
            break
    q = _quote
    shadowed: dict[str, str] = {}  # column -> the setting that fills the attribute of its name
    mapped_settings: dict[str, str | None] = {}
    if starter.fields is None:
        # A column named like an attribute a contact or opt-in setting fills from another column (NotifyVisitors'
        # mobile, beside a phone column taken for msisdn:) would fill it twice: the platform refuses such a job.
        mapped_settings = {"email": email, "msisdn": phone, **{f"opt_ins.{c}": v for c, v in opt_ins.items()}}
        shadowed = {
            c: starter.filled_by[c]
            for c in columns
            if c not in used and mapped_settings.get(starter.filled_by.get(c, ""))
        }
        attributes = [
            f"      {q(c)}: {_kind(frame.schema[c])}" for c in columns if c not in used and c not in shadowed
        ]
        attributes_note = "column: type (the profile attribute has the column's name)"
        left_out: list[str] = []
    else:
        mapped = [(col, f) for f in starter.fields if (col := take(f.names))]
        if not mapped:
            suggested = ", ".join(f.names[0] for f in starter.fields)
            raise BadInputError(
                str(data),
                f"no column is named like a {platform} field ({suggested}): rename one, or write the job by hand "
                f"({starter.reference})",
            )
        attributes = [f"      {q(c)}: {{attribute: {f.attribute}, type: {f.type}}}" for c, f in mapped]
        attributes_note = f"column: the {platform} field it fills"
        left_out = [q(c) for c in columns if c not in used]

    # Relative to the job file, as every path in a job is; absolute only across drives.
    try:
        data_ref = Path(os.path.relpath(data.resolve(), job_path.resolve().parent)).as_posix()
    except ValueError:
        data_ref = str(data.resolve())
    references = dict.fromkeys(("docs/jobs.md", starter.reference))
    lines = [
        f"# A first job for {data.name}, written by `pushsync init` from its header and {len(frame):,} sample rows.",
        "# Check the mapping, then: pushsync validate "
        + q(job_path.name)
        + " && pushsync plan "
        + q(job_path.name),
        f"# Reference: {', '.join(references)}",
        "version: 1",
        f"name: {q(name)}",
        "",
        "destination:",
        f"  platform: {platform}",
        f"  base_url: {q(base_url)}",
        f"  secret: {{env: {starter.secret_env}}}        # where the API key lives - never the key itself",
    ]
    settings = dict(extra)  # given twice: the last one counts, as for any repeated option
    if settings or starter.extra_hints:
        lines.append(f"  {'' if settings else '# '}extra:")
        lines += [f"    {q(key)}: {q(value, force=True)}" for key, value in settings.items()]
        lines += [f"    # {hint}" for hint in starter.extra_hints if hint.partition(":")[0] not in settings]
    lines += [
        "",
        "sources:",
        "  - name: users",
        f"    path: {q(data_ref)}",
        f"    ext_id: {q(ext_id)}",
    ]
    if data.suffix.lower() not in (".parquet", ".pq") and (separator := _separator(data)) != ",":
        # The job reads the file with the delimiter init read it with (a job's default is a comma).
        lines.append(f"    delimiter: {q(separator, force=True)}")
    if attributes:
        lines.append(f"    attributes:                       # {attributes_note}")
        lines += attributes
    if shadowed:
        lines += textwrap.wrap(
            "not sent: "
            + ", ".join(
                f"{q(c)} ({setting}: {q(str(mapped_settings[setting]))} fills {platform}'s {c})"
                for c, setting in shadowed.items()
            ),
            width=110,
            initial_indent="    # ",
            subsequent_indent="    #   ",
            break_on_hyphens=False,
        )
    if left_out:
        fields = ", ".join(f.attribute for f in starter.fields or ())
        lines += textwrap.wrap(
            f"not sent ({platform} takes {fields} only): {', '.join(left_out)}",
            width=110,
            initial_indent="    # ",
            subsequent_indent="    #   ",
            break_on_hyphens=False,
        )
    if tags:
        lines.append(f"    tags: [{{column: {q(tags[0])}, delimiter: {q(tags[1], force=True)}}}]")
    if opt_ins:
        lines.append("    opt_ins:")
        lines += [f"      {channel}: {q(col)}" for channel, col in opt_ins.items()]
    if email:
        lines.append(f"    email: {q(email)}")
    if phone:
        lines.append(f"    msisdn: {q(phone)}")
    lines += ["", "dispatch:", "  concurrency: 8"]
    if limits.default_budgets:
        lines.append("  budgets:")
        lines += [
            f"    {q(endpoint, force=True)}: {{requests: {spec.requests}, per: {spec.period:g}s}}"
            "      # set to what your account allows"
            for endpoint, spec in limits.default_budgets.items()
        ]
    for group in limits.default_budget_groups:  # the documented limits, which the platform's defaults are
        lines.append(
            f"  # budget group {group.name}: {group.budget.requests} per {group.budget.period:g}s over "
            f"{', '.join(group.endpoints)} (documented; budget_groups: changes it)"
        )
    lines.append("")
    return "\n".join(lines)


def _quote(value: str, *, force: bool = False) -> str:
    """A YAML scalar: bare when safe, double-quoted (JSON string rules) otherwise."""
    import json

    if (
        not force
        and re.fullmatch(r"[A-Za-z_./][A-Za-z0-9_.\-/]*", value)
        and value.lower() not in ("true", "false", "yes", "no", "on", "off", "null", "y", "n")
    ):
        return value
    return json.dumps(value, ensure_ascii=False)


def _init(args: argparse.Namespace) -> int:
    from sync.config import load_job

    if not args.data.exists():
        raise BadInputError(str(args.data), "no such file")
    output_file(args.out)  # a directory or a device is refused as such, --force or not
    if args.out.exists() and not args.force:
        raise BadInputError(str(args.out), "exists; give --force to overwrite it")
    # A job name names its workdir: letters, digits, _ . - (the schema's rule), so anything else becomes "-".
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", args.name or args.data.stem).strip("-._")[:64] or "job"
    text = suggest_job(
        args.data,
        args.out,
        name=name,
        platform=args.platform,
        ext_id=args.ext_id,
        base_url=args.base_url,
        extra=args.extra,
    )
    with replaced_atomically(args.out) as tmp:
        tmp.write_text(text, encoding="utf-8")
        try:
            load_job(tmp)  # the same checks as `pushsync validate`: never leave a job file that does not load
        except BadJobError as exc:
            # Checked as a temporary file; the user asked for args.out, which is the file to name. A platform
            # setting missing or wrong (a brand ID) is one to give on this command line: say how.
            problems = [
                JobProblem(p.location, f"{p.message} (pushsync init: --extra {key}=VALUE)")
                if (key := p.location.removeprefix("destination.extra.")) != p.location
                else p
                for p in exc.problems
            ]
            raise BadJobError(str(args.out), problems) from None
    print(
        f"wrote {args.out}; review the mapping, then: pushsync validate {args.out} && pushsync plan {args.out}"
    )
    return int(ExitCode.OK)
