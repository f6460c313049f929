"""Meiro job files: "wait for these push-notification exports and record how they ended".

Meiro's API creates no push exports (they are started in the Meiro UI) and takes no user data, so a Meiro job
is not a sync of CRM rows: it names exports to watch, and ``pushsync meiro run JOB`` waits for each one and
records its outcome and message counts. The file is validated at load time; every problem is listed::

    version: 1
    name: meiro-exports
    platform: meiro
    base_url: https://acme.meiro.io/api/
    credentials:
      email_env: MEIRO_EMAIL            # or  email: analyst@example.com
      password: {env: MEIRO_PASSWORD}   # or  password: {file: ~/.meiro-password}
    workdir: .pushsync/meiro-exports    # relative to the job file
    wait: {interval: 10, max_wait: 3600, concurrency: 4}
    request_timeout: 30
    retry: {max_attempts: 8, base_delay: 0.5, max_delay: 30}
    exports:
      - {notification: 983d437d-eac6-423b-beb5-40a619be332f, export: 100}
      - {notification: 983d437d-eac6-423b-beb5-40a619be332f, latest: true}   # its newest export

Only the CLI reads the environment: :func:`resolve_credentials` is called from it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sync.config import (
    Destination,
    RetryPolicy,
    base_url_problem,
    looks_like_a_key,
    read_job_yaml,
    resolve_secret,
)
from sync.errors import BadJobError, JobProblem, SecretError
from sync.platforms.meiro.client import MeiroCredentials
from sync.platforms.meiro.poller import ExportRef

__all__ = ["MeiroJob", "load_meiro_job", "resolve_credentials"]

_TOP = {
    "version",
    "name",
    "description",
    "platform",
    "base_url",
    "verify_tls",
    "credentials",
    "workdir",
    "wait",
    "request_timeout",
    "retry",
    "exports",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PASTED = "looks like a password or key, not {what} (the value is not shown): name where the password lives"
_LOCAL = re.compile(r"^https?://(127\.0\.0\.1|localhost|\[::1\])[:/]")


@dataclass(frozen=True, slots=True)
class MeiroJob:
    """A loaded, validated Meiro job file. Secrets are named (env/file), never held."""

    name: str
    path: Path
    base_url: str
    exports: tuple[ExportRef, ...]
    workdir: Path
    email: str | None = None
    email_env: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    verify_tls: bool = True
    interval: float = 10.0
    max_wait: float | None = 3600.0
    concurrency: int = 4
    request_timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


def _number(
    raw: Mapping[str, Any], key: str, where: str, problems: list[JobProblem], *, positive: bool = True
) -> Any:
    value = raw.get(key)
    if value is None:
        return None
    # NaN passed "<= 0" (a wait.interval of .nan slept forever after the first poll), and .inf never ends.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or (positive and value <= 0)
    ):
        problems.append(JobProblem(f"{where}{key}", "must be a positive number"))
        return None
    return value


def load_meiro_job(path: str | Path) -> MeiroJob:
    """Read and validate a Meiro job file; raises :class:`BadJobError` listing every problem."""
    job_path = Path(path)
    raw = read_job_yaml(job_path)
    if not isinstance(raw, Mapping):
        raise BadJobError(str(job_path), [JobProblem("", "a job file is a YAML mapping (key: value)")])
    problems: list[JobProblem] = []
    for key in sorted(set(raw) - _TOP):
        problems.append(JobProblem(str(key), "unknown key"))
    if raw.get("version", 1) != 1:
        problems.append(JobProblem("version", "must be 1"))
    if raw.get("platform") != "meiro":
        problems.append(JobProblem("platform", "must be 'meiro'"))
    name = raw.get("name") or re.sub(r"[^A-Za-z0-9_.-]", "_", job_path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(JobProblem("name", "letters, digits, '_', '.', '-' (at most 64)"))
    base_url = raw.get("base_url")
    problem = base_url_problem(base_url) if isinstance(base_url, str) else "is required"
    if problem is not None or not isinstance(base_url, str):
        # Not repeated: every error about a request names its URL, and one holding a password would print it.
        problems.append(JobProblem("base_url", f"an http(s) URL ending in /api/: {problem}"))
        base_url = ""
    verify_tls = raw.get("verify_tls", True)
    if not isinstance(verify_tls, bool):
        problems.append(JobProblem("verify_tls", "must be true or false"))
    elif not verify_tls and base_url and not _LOCAL.match(base_url):
        problems.append(JobProblem("verify_tls", "TLS checks may only be turned off for a local sandbox"))

    creds = raw.get("credentials")
    email = email_env = password_env = password_file = None
    if not isinstance(creds, Mapping):
        problems.append(
            JobProblem(
                "credentials", "name the e-mail (email or email_env) and the password ({env} or {file})"
            )
        )
    else:
        for key in sorted(set(creds) - {"email", "email_env", "password"}):
            problems.append(JobProblem(f"credentials.{key}", "unknown key"))
        email, email_env = creds.get("email"), creds.get("email_env")
        if (email is None) == (email_env is None):
            problems.append(JobProblem("credentials", "give exactly one of email or email_env"))
        if email_env is not None and (not isinstance(email_env, str) or not _ENV.match(email_env)):
            problems.append(JobProblem("credentials.email_env", "an environment variable name"))
        password = creds.get("password")
        if not isinstance(password, Mapping) or not password or set(password) - {"env", "file"}:
            problems.append(
                JobProblem("credentials.password", "{env: NAME} or {file: PATH}: never the password itself")
            )
        else:
            password_env, password_file = password.get("env"), password.get("file")
            if password_env is not None and (
                not isinstance(password_env, str) or not _ENV.match(password_env)
            ):
                problems.append(JobProblem("credentials.password.env", "an environment variable name"))
            elif isinstance(password_env, str) and looks_like_a_key(password_env):
                # A password pasted where its variable's name belongs: "... is not set" would print it.
                problems.append(
                    JobProblem("credentials.password.env", _PASTED.format(what="a variable's name"))
                )
            if password_file is not None:
                password_file = str(job_path.resolve().parent / os.path.expanduser(str(password_file)))
                if looks_like_a_key(str(password.get("file"))) and not Path(password_file).exists():
                    problems.append(
                        JobProblem("credentials.password.file", _PASTED.format(what="a file's path"))
                    )
                    password_file = None

    wait = raw.get("wait") or {}
    if not isinstance(wait, Mapping):
        problems.append(JobProblem("wait", "must be a mapping"))
        wait = {}
    for key in sorted(set(wait) - {"interval", "max_wait", "concurrency"}):
        problems.append(JobProblem(f"wait.{key}", "unknown key"))
    interval = _number(wait, "interval", "wait.", problems) or 10.0
    max_wait = _number(wait, "max_wait", "wait.", problems) if "max_wait" in wait else 3600.0
    concurrency = wait.get("concurrency", 4)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        problems.append(JobProblem("wait.concurrency", "must be a positive integer"))
        concurrency = 4
    timeout = _number(raw, "request_timeout", "", problems) or 30.0
    retry_raw = raw.get("retry") or {}
    retry = RetryPolicy()
    if not isinstance(retry_raw, Mapping) or set(retry_raw) - {
        "max_attempts",
        "base_delay",
        "max_delay",
        "max_retry_after",
    }:
        problems.append(JobProblem("retry", "keys: max_attempts, base_delay, max_delay, max_retry_after"))
    else:
        values = {k: _number(retry_raw, k, "retry.", problems) for k in retry_raw}
        if all(v is not None for v in values.values()):
            kwargs: dict[str, Any] = {
                k: int(v) if k == "max_attempts" else float(v) for k, v in values.items()
            }
            retry = RetryPolicy(**kwargs)

    refs: list[ExportRef] = []
    listed: dict[ExportRef, int] = {}  # each export (or notification's newest) → its first entry
    exports = raw.get("exports")
    if not isinstance(exports, list) or not exports:
        problems.append(JobProblem("exports", "list the exports to wait for"))
        exports = []
    for i, item in enumerate(exports):
        where = f"exports[{i}]"
        if not isinstance(item, Mapping) or set(item) - {"notification", "export", "latest"}:
            problems.append(
                JobProblem(where, "{notification: ID, export: N} or {notification: ID, latest: true}")
            )
            continue
        notification = item.get("notification")
        if not isinstance(notification, str | int) or isinstance(notification, bool) or not str(notification):
            problems.append(JobProblem(f"{where}.notification", "the push notification's ID is required"))
            continue
        export, latest = item.get("export"), item.get("latest", False)
        if (export is None) == (latest is not True):
            problems.append(JobProblem(where, "give exactly one of export: N or latest: true"))
            continue
        if export is not None and (isinstance(export, bool) or not isinstance(export, int) or export < 0):
            problems.append(JobProblem(f"{where}.export", "an export ID (a non-negative integer)"))
            continue
        ref = ExportRef(str(notification), export)
        if ref in listed:
            # Waited for twice at once and counted twice in the summary ("2 of 2 exports finished").
            problems.append(JobProblem(where, f"the same as exports[{listed[ref]}]: list each export once"))
            continue
        listed[ref] = i
        refs.append(ref)
    if problems:
        raise BadJobError(str(job_path), problems)
    base = job_path.resolve().parent
    workdir = base / raw["workdir"] if raw.get("workdir") else base / ".pushsync" / str(name)
    return MeiroJob(
        name=str(name),
        path=job_path.resolve(),
        base_url=base_url if base_url.endswith("/") else base_url + "/",
        exports=tuple(refs),
        workdir=workdir,
        email=email,
        email_env=email_env,
        password_env=password_env,
        password_file=password_file,
        verify_tls=verify_tls,
        interval=float(interval),
        max_wait=None if max_wait is None else float(max_wait),
        concurrency=concurrency,
        request_timeout=float(timeout),
        retry=retry,
    )


def resolve_credentials(job: MeiroJob, environ: Mapping[str, str] | None = None) -> MeiroCredentials:
    """Read the e-mail and password the job names (CLI only). Raises :class:`SecretError` naming where."""
    env = os.environ if environ is None else environ
    email = job.email
    if email is None:
        email = env.get(job.email_env or "", "").strip()
        if not email:
            raise SecretError(f"environment variable {job.email_env} (the Meiro e-mail) is not set or empty")
    password = resolve_secret(
        Destination("meiro", job.base_url, secret_env=job.password_env, secret_file=job.password_file), env
    )
    return MeiroCredentials(email, password)
