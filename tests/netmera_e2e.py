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

Several workers of one job on PostgreSQL (tests/test_coordination.py, tests/test_coordination_snapshot.py):

* :func:`coordinated_job`   a job file of :data:`COORDINATED_BATCH` users a request, with a ``coordination:`` lease
* :func:`worker`            ``pushsync ARGS`` with ``PUSHSYNC_DATABASE_URL``; :func:`run_workers` starts several
                            ``run``s of the job at once, :func:`run_json` runs one and reads its JSON summary
* :func:`query`             SQL through psql, rows of strings; :func:`batch_counts` (batches confirmed, batches)
* :func:`kill_a_busy_worker` SIGKILL the worker holding the most batches once a share of them is confirmed
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT, NetmeraProcess
from tests.pg_fixture import PostgresServer

__all__ = [
    "COORDINATED_BATCH",
    "FULL_USERS",
    "PLAIN_USERS",
    "TAGS",
    "applied",
    "batch_counts",
    "coordinated_job",
    "expected_users",
    "finish",
    "inspect",
    "kill_a_busy_worker",
    "minimal_applications",
    "netmera_job",
    "pushsync",
    "query",
    "requests_total",
    "run_json",
    "run_workers",
    "sandbox_users",
    "user_row",
    "worker",
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


# -- several workers of one job on PostgreSQL ----------------------------------------------------------------------

COORDINATED_BATCH = 40
"""Users a request in :func:`coordinated_job`'s jobs (what duplicates bounds count in)."""


def coordinated_job(
    url: str,
    *,
    budget: str = "",
    lease: float = 2,
    concurrency: int = 4,
    name: str = "scale",
    head: str = "",
) -> str:
    """A job for several workers: :data:`FULL_USERS` to Netmera at ``url``, a ``coordination:`` lease, fast
    retries, ``budget`` (indented ``dispatch`` lines, e.g. ``budget_groups:``); ``head`` as :func:`netmera_job`'s
    (e.g. ``mode: snapshot``)."""
    return netmera_job(
        url,
        name=name,
        head=head,
        tail=f"coordination: {{lease: {lease}}}\n",
        dispatch=f"""\
  concurrency: {concurrency}
  batch_size: {COORDINATED_BATCH}
  request_timeout: 2
  drain_timeout: 2
  retry: {{max_attempts: 8, base_delay: 0.05, max_delay: 0.2}}
{budget}""",
    )


def worker(
    tmp: Path,
    sandbox: NetmeraProcess | str,
    db_url: str | None,
    *args: str,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """``pushsync ARGS`` with ``PUSHSYNC_DATABASE_URL``: one worker of the job's run (None: one process on
    SQLite)."""
    extra = {"PUSHSYNC_DATABASE_URL": db_url} if db_url else {}
    return pushsync(tmp, sandbox, *args, env={**extra, **(env or {})})


def run_workers(tmp: Path, sandbox: NetmeraProcess | str, db_url: str, n: int) -> list[subprocess.Popen[str]]:
    """``n`` workers started together, each ``pushsync run job.yaml`` with its summary as JSON on stdout."""
    return [
        worker(tmp, sandbox, db_url, "run", "job.yaml", "--progress", "none", "--output", "json")
        for _ in range(n)
    ]


def run_json(
    tmp: Path, sandbox: NetmeraProcess | str, db_url: str, *args: str
) -> tuple[int, dict[str, Any], str]:
    """One worker's ``pushsync run job.yaml ARGS`` to its end: (exit code, its JSON summary or {}, stderr)."""
    code, out, err = finish(
        worker(tmp, sandbox, db_url, "run", "job.yaml", "--progress", "none", "--output", "json", *args)
    )
    return code, (json.loads(out) if out.strip() else {}), err


def query(server: PostgresServer, url: str, sql: str) -> list[list[str]]:
    """The rows ``sql`` gives, each a list of strings (psql's unaligned output); RuntimeError when it fails
    (e.g. the tables are not there yet)."""
    return [line.split("|") for line in server.sql(url, sql).splitlines() if line]


def batch_counts(server: PostgresServer, url: str) -> tuple[int, int]:
    """(batches confirmed, batches) of every run in the database."""
    ok, total = query(
        server, url, "SELECT count(*) FILTER (WHERE status = 'ok'), count(*) FROM pushsync.batches"
    )[0]
    return int(ok), int(total)


def kill_a_busy_worker(
    server: PostgresServer,
    url: str,
    procs: list[subprocess.Popen[str]],
    *,
    share: int = 5,
    timeout: float = 90,
) -> subprocess.Popen[str]:
    """SIGKILL the worker of ``procs`` holding the most unfinished batches among those that have sent (their
    attempts are in the ledger), once ``1/share`` of the batches are confirmed, and reap it; returns it."""
    deadline = time.monotonic() + timeout
    seen: Any = None
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            ok, total = batch_counts(server, url)
            if not total or ok < total // share:
                continue
            # Only a worker whose attempts are in the ledger: one that claimed its first batches but has not
            # flushed an attempt yet (a late start on a loaded machine) is not "busy", and killing it would
            # leave no trace of its part in the run.
            busy = query(
                server,
                url,
                "SELECT claimed_by, count(*) FROM pushsync.batches WHERE status IN ('planned', 'sent') "
                "AND claimed_by IN (SELECT DISTINCT worker FROM pushsync.attempts) "
                "GROUP BY claimed_by ORDER BY 2 DESC",
            )
        except RuntimeError:
            continue  # the tables are not there yet
        seen = ((ok, total), busy)
        by_pid = {p.pid: p for p in procs}
        for claimed_by, _n in busy:
            victim = by_pid.get(int(claimed_by.split(":")[1]))
            if victim is not None:
                victim.send_signal(signal.SIGKILL)
                victim.communicate(timeout=30)
                return victim
    raise AssertionError(("no worker held batches to kill", seen, [p.pid for p in procs]))


def sandbox_faults(sandbox: NetmeraProcess, faults: dict[str, Any]) -> None:
    """Merge ``faults`` into a sandbox process's fault spec (``POST /_sandbox/config``), e.g. ``{"drop": 1.0}``."""
    request = urllib.request.Request(
        f"{sandbox.root_url}/_sandbox/config",
        data=json.dumps({"faults": faults}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 200
