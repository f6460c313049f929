"""End to end against Netmera sandbox processes: ``pushsync`` as a child process, the job files and the users CSV
of those tests, and what the sandbox holds afterwards. Shared by tests/test_crash_resume.py,
tests/test_coordination.py and tests/reliability/test_adversarial_state.py (and the CLI tests that reuse their
users), so a job's shape or a launch detail is written once.

* :func:`netmera_job`       a job file's text: Netmera at ``url``, a users source, a dispatch section
* :data:`FULL_USERS`        the users source with attributes, tags and opt-ins (:func:`write_users`' columns)
* :data:`PLAIN_USERS`       a users source with name, score and tags only
* :func:`pushsync`          ``python -m sync ARGS`` in a directory, with the sandbox's key; :func:`finish` waits
* :func:`inspect`           a sandbox inspection route (``stats``, ``state?format=json``); :func:`applied`,
                            :func:`requests_total`, :func:`sandbox_users`
* :func:`write_users`, :func:`expected_users`, :func:`minimal_applications`: the users CSV and what a sandbox
  must hold once it was sent
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT, NetmeraProcess

__all__ = [
    "FULL_USERS",
    "PLAIN_USERS",
    "TAGS",
    "applied",
    "expected_users",
    "finish",
    "inspect",
    "minimal_applications",
    "netmera_job",
    "pushsync",
    "requests_total",
    "sandbox_users",
    "user_row",
    "write_users",
]

TAGS = ("gold", "silver", "beta")

FULL_USERS = """\
  - name: users
    path: users.csv
    ext_id: id
    attributes:
      name: string
      score: number
      city: {on_null: unset}
    tags: {column: segments}
    opt_ins:
      email: mail
      categories: {News: news}
"""
"""The source of :func:`write_users`' CSV: attributes (an empty city unsets it), tags, an opt-in, a category."""

PLAIN_USERS = """\
  - name: users
    path: users.csv
    ext_id: id
    attributes:
      name: string
      score: number
    tags: {column: segments}
"""
"""A source of ``id,name,score,segments`` rows."""


def netmera_job(
    url: str, *, name: str, dispatch: str, sources: str = FULL_USERS, head: str = "", tail: str = ""
) -> str:
    """A job file: ``head`` (e.g. ``mode: snapshot``) after the workdir, Netmera at ``url`` with its key in
    ``NETMERA_API_KEY``, ``sources``, ``tail`` (e.g. ``coordination:``), then ``dispatch:`` with the given
    (indented) lines."""
    return (
        f"version: 1\nname: {name}\nworkdir: work\n{head}destination:\n  platform: netmera\n  base_url: {url}\n"
        f"  secret: {{env: NETMERA_API_KEY}}\nsources:\n{sources}{tail}dispatch:\n{dispatch}"
    )


def pushsync(
    tmp: Path, sandbox: NetmeraProcess | str, *args: str, env: dict[str, str] | None = None, **popen: Any
) -> subprocess.Popen[str]:
    """``python -m sync ARGS`` in ``tmp`` with the sandbox's key (or the key given) in ``NETMERA_API_KEY``;
    ``env`` adds variables, ``popen`` passes options to :class:`subprocess.Popen` (e.g. ``preexec_fn``)."""
    key = sandbox if isinstance(sandbox, str) else sandbox.api_key
    return subprocess.Popen(
        [sys.executable, "-m", "sync", *args],
        cwd=tmp,
        env={**os.environ, "NETMERA_API_KEY": key, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    """Wait for the process: (exit code, stdout, stderr)."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def inspect(sandbox: NetmeraProcess, route: str) -> Any:
    """A sandbox inspection route under ``/_sandbox/`` (``stats``, ``state?format=json``), parsed."""
    with urllib.request.urlopen(f"{sandbox.root_url}/_sandbox/{route}", timeout=30) as resp:
        return json.loads(resp.read())


def applied(sandbox: NetmeraProcess) -> dict[str, int]:
    """ID applications per endpoint the sandbox made (a duplicate counts again)."""
    return dict(inspect(sandbox, "stats")["applied"])


def requests_total(sandbox: NetmeraProcess) -> int:
    return int(inspect(sandbox, "stats")["requests_total"])


def user_row(i: int, churn: int = 0) -> list[str]:
    """User ``i``'s row of :func:`write_users` (``churn``: 1 changes the score of one user in a hundred)."""
    tags = [t for k, t in enumerate(TAGS) if (i >> k) & 1]
    score = i % 97 + (1000 if churn and i % 100 == 7 else 0)
    city = "" if i % 5 == 0 else f"city{i % 13}"
    mail = ["yes", "no", ""][i % 3]
    news = ["true", "false", "", "true"][i % 4]
    return [f"user{i:05d}", f"Name{i}", str(score), city, "|".join(tags), mail, news]


def write_users(directory: Path, ids: range, churn: int = 0) -> list[list[str]]:
    """``users.csv`` for :data:`FULL_USERS`; returns its rows."""
    rows = [user_row(i, churn) for i in ids]
    lines = ["id,name,score,city,segments,mail,news", *(",".join(r) for r in rows)]
    (directory / "users.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def expected_users(rows: list[list[str]]) -> dict[str, dict[str, Any]]:
    """What the sandbox must hold once ``rows`` were sent (as :func:`sandbox_users` reads it)."""
    out = {}
    for ext_id, name, score, city, segments, mail, news in rows:
        profile: dict[str, Any] = {"name": name, "score": int(score)}
        if city:
            profile["city"] = city
        user: dict[str, Any] = {"tags": sorted(segments.split("|")) if segments else [], "profile": profile}
        if news:
            user["categories"] = {"News": news == "true"}
        if mail:
            user["emailOptIn"] = mail == "yes"
        out[ext_id] = user
    return out


def sandbox_users(sandbox: NetmeraProcess) -> dict[str, dict[str, Any]]:
    """The users the sandbox holds, in the shape of :func:`expected_users`."""
    doc = inspect(sandbox, "state?format=json")
    out = {}
    for u in doc["users"]:
        item: dict[str, Any] = {"tags": sorted(u.get("tags", [])), "profile": u.get("profile", {})}
        if u.get("categories"):
            item["categories"] = u["categories"]
        if u.get("emailOptIn") is not None:
            item["emailOptIn"] = u["emailOptIn"]
        out[u["extId"]] = item
    return out


def minimal_applications(rows: list[list[str]], mode: str) -> int:
    """ID applications a crash-free first run makes: one profile per user, one per tag, category and opt-in; in
    changes mode also one unset per empty city (snapshot mode knows the platform holds no city yet)."""
    users = expected_users(rows)
    unsets = sum(1 for r in rows if not r[3]) if mode == "changes" else 0
    return unsets + sum(
        1 + len(u["tags"]) + ("categories" in u) + ("emailOptIn" in u) for u in users.values()
    )
