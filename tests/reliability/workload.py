"""The workload of the soak, limits and crash tests: the demo's users (tags, five attributes, e-mail and category
opt-ins) written by :func:`sync.demo.generate_users`, a job sending them, and the comparison of a sandbox's end
state with the input, which counts *lost updates* (users whose state differs from their input row) and
*duplicates* (IDs a sandbox applied more than once: ambiguous outcomes that were retried).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from sync.demo import expected_users, generate_users

__all__ = ["KEY_ENV", "Comparison", "compare_state", "duplicates", "job_yaml", "write_workload"]

KEY_ENV = "PUSHSYNC_RELIABILITY_KEY"

_JOB = """\
version: 1
name: {name}
workdir: work
destination: {{platform: netmera, base_url: "{url}", secret: {{env: {key_env}}}}}
defaults: {{ext_id: user_id}}
sources:
  - name: users
    path: data/users.csv
    attributes:
      name: string
      city: string
      score: number
      vip: {{attribute: isVip, type: boolean}}
      plan: string
    tags: {{column: segments, delimiter: "|"}}
    opt_ins:
      email: email_opt_in
      categories: {{News: news_opt_in}}
dispatch:
  batch_size: {batch_size}
{dispatch}"""


def job_yaml(url: str, *, name: str, key_env: str, batch_size: int, dispatch: str) -> str:
    """The job sending the demo's users (``data/users.csv``) to the Netmera sandbox at ``url``, its key read from
    ``key_env``; ``dispatch`` is the rest of the ``dispatch:`` section (YAML lines indented two spaces)."""
    return _JOB.format(name=name, url=url, key_env=key_env, batch_size=batch_size, dispatch=dispatch)


def write_workload(
    directory: Path,
    url: str,
    *,
    users: int,
    batch_size: int,
    dispatch: str,
    name: str = "reliability",
    seed: int = 7,
) -> tuple[Path, pl.DataFrame]:
    """Write ``users`` generated users and a job sending them to ``url``; returns the job's path and the users.

    ``dispatch`` is the rest of the job's ``dispatch:`` section (YAML lines indented two spaces)."""
    frame = generate_users(directory / "data" / "users.csv", users, seed=seed)
    job = directory / "job.yaml"
    job.write_text(
        job_yaml(url, name=name, key_env=KEY_ENV, batch_size=batch_size, dispatch=dispatch), encoding="utf-8"
    )
    return job, frame


@dataclass(frozen=True, slots=True)
class Comparison:
    """A sandbox's end state against the input."""

    users: int
    lost: int
    """Input users whose platform state differs from their row (or who are missing)."""
    unexpected: int
    """Users on the platform that no input row names."""
    examples: tuple[str, ...]
    """The first few differences, for the assertion message."""


def compare_state(dump: Mapping[str, Any], frame: pl.DataFrame) -> Comparison:
    """Compare a sandbox state dump (``/_sandbox/state?format=json``) with the generated users."""
    want = expected_users(frame)
    have: dict[str, dict[str, Any]] = {}
    for user in dump["users"]:
        have[user["extId"]] = {
            "tags": sorted(user.get("tags", [])),
            "profile": user.get("profile", {}),
            "emailOptIn": user.get("emailOptIn"),
            "categories": user.get("categories", {}),
        }
    lost = 0
    examples: list[str] = []
    for ext_id, expected in want.items():
        got = have.get(ext_id)
        if got != expected:
            lost += 1
            if len(examples) < 5:
                examples.append(f"{ext_id}: platform has {got!r}, input says {expected!r}")
    unexpected = len(set(have) - set(want))
    return Comparison(users=len(want), lost=lost, unexpected=unexpected, examples=tuple(examples))


def duplicates(stats: Mapping[str, Any], ids_sent: int) -> int:
    """IDs the sandbox applied beyond the ``ids_sent`` a run needed: the same change applied twice because an
    ambiguous outcome (applied, then no or a 5xx answer) was retried."""
    return sum(int(n) for n in stats["applied"].values()) - ids_sent
