"""An event batch split on a 400 whose parts end differently: the parts the platform confirmed are recorded row
by row (``BatchResult.confirmed_rows``), so resume and retry never send their events again — end to end against
the Netmera sandbox, with the SQLite ledger and the PostgreSQL one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sync.sandboxes._faults import FaultInjector, FaultKind, FaultSpec
from sync.sandboxes.netmera_config import UnknownExtId

JOB = """\
version: 1
name: split-events
workdir: work
destination:
  platform: netmera
  base_url: {url}
  secret: {{env: NETMERA_API_KEY}}
sources:
  - name: purchases
    kind: events
    path: events.csv
    ext_id: id
    event: event
    attributes: {{amount: number}}
dispatch:
  retry: {{max_attempts: 1}}
  request_timeout: 5
"""

# The whole batch is refused (an unknown user), its first half goes through, its second half gets a 503.
_SPEC = FaultSpec(error_503=0.5, endpoints=frozenset({"fireEvents"}))
_SEED = next(
    s
    for s in range(1000)
    if [FaultInjector(_SPEC, s).decide(n, "fireEvents").kind for n in range(3)]
    == [FaultKind.NONE, FaultKind.NONE, FaultKind.ERROR_503]
)


@pytest.mark.parametrize("ledger_in", ["sqlite", "postgresql"])
async def test_a_retry_does_not_resend_the_events_of_the_parts_of_a_split_batch_that_went_through(
    tmp_path: Path, netmera_sandbox_factory: Any, request: pytest.FixtureRequest, ledger_in: str
) -> None:
    """A 400 splits the batch; one half is applied (200), the other fails (503): the batch is `failed`, and every
    row of it counted as unknown — `pushsync retry` sent the applied half's events a second time. Now only the
    failed half's rows are held by resume and sent by retry; every event lands once."""
    from sync.config import load_job
    from sync.run import RunOptions, run

    sandbox = await netmera_sandbox_factory(unknown_ext_id=UnknownExtId.ERROR)
    sandbox.sandbox.state.ensure_users(["a", "b", "c", "d", "e"])
    sandbox.sandbox.configure(faults=_SPEC, seed=_SEED)
    events = sandbox.sandbox.state.events
    (tmp_path / "job.yaml").write_text(JOB.format(url=sandbox.url), encoding="utf-8")
    rows = [("a", 1), ("b", 2), ("b", 3), ("c", 4), ("d", 5), ("e", 6), ("e", 7), ("e", 8), ("ghost", 9)]
    lines = "".join(f"{ext_id},purchase,{amount}\n" for ext_id, amount in rows)
    (tmp_path / "events.csv").write_text("id,event,amount\n" + lines, encoding="utf-8")
    job = load_job(tmp_path / "job.yaml")
    url = request.getfixturevalue("postgres_url") if ledger_in == "postgresql" else None

    first = await run(job, RunOptions(api_key=sandbox.api_key, database_url=url))
    assert int(first.exit_code) == 1 and first.summary.ids_failed > 0
    applied = Counter((e.ext_id, e.attributes["amount"]) for e in events)
    assert 0 < len(applied) < len(rows) - 1  # one half landed, the other did not
    sandbox.sandbox.configure(faults=FaultSpec())

    retried = await run(job, RunOptions(api_key=sandbox.api_key, retry=first.run_id, database_url=url))
    assert retried.replay is not None and retried.replay.rows_confirmed == len(applied)
    landed = Counter((e.ext_id, e.attributes["amount"]) for e in events)
    assert landed == Counter(r for r in rows if r[0] != "ghost")  # each once: the applied half was sent twice
