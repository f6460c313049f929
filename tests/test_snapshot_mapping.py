"""Snapshot mode when the job's mapping changes between runs, against the Netmera sandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

JOB = """\
version: 1
name: mapping
workdir: work
mode: snapshot
destination:
  platform: netmera
  base_url: {url}
  secret: {{env: NETMERA_API_KEY}}
sources:
  - name: users
    path: users.csv
    ext_id: id
    attributes: {{code: {code}, flag: {flag}}}
"""


async def test_a_type_changed_in_the_mapping_sends_every_value_again_in_the_new_type(
    tmp_path: Path, netmera_sandbox_factory: Any
) -> None:
    """The state held the old type's values and was cast to the new type: the string "007" read as the number 7,
    so after ``code: string`` became ``code: number`` nothing was sent and the platform kept "007"; and a string
    cannot be cast to a boolean at all: after ``flag: string`` became ``flag: boolean`` every run ended with an
    internal error (exit 5) until the state was deleted by hand. Now a column stored with another type is
    unknown: every value is sent again, in the new type, and the next run sends nothing."""
    from sync.config import load_job
    from sync.run import RunOptions, run

    sandbox = await netmera_sandbox_factory()
    state = sandbox.sandbox.state
    job_file = tmp_path / "job.yaml"
    (tmp_path / "users.csv").write_text("id,code,flag\nU1,007,yes\nU2,12,no\n", encoding="utf-8")
    job_file.write_text(JOB.format(url=sandbox.url, code="string", flag="string"), encoding="utf-8")
    assert int((await run(load_job(job_file), RunOptions(api_key=sandbox.api_key))).exit_code) == 0
    assert dict(state.user("U1").profile or {}) == {"code": "007", "flag": "yes"}

    job_file.write_text(JOB.format(url=sandbox.url, code="number", flag="boolean"), encoding="utf-8")
    job = load_job(job_file)
    changed = await run(job, RunOptions(api_key=sandbox.api_key))
    assert int(changed.exit_code) == 0
    assert changed.diff is not None and changed.diff.users_changed == 2
    assert dict(state.user("U1").profile or {}) == {"code": 7, "flag": True}
    assert dict(state.user("U2").profile or {}) == {"code": 12, "flag": False}

    again = await run(job, RunOptions(api_key=sandbox.api_key))
    assert again.diff is not None and again.diff.users_changed == 0
