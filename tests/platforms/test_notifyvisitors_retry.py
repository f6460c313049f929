"""``pushsync retry`` of a partly refused NotifyVisitors batch resends only the refused users (counted at the
sandbox): the platform's own :meth:`restrict` cuts ``{"nv": [...]}`` bodies, as Netmera's cuts its own."""

from __future__ import annotations

from pathlib import Path

from conftest_notifyvisitors import BLOCKED, NV_API_KEY, NV_BRAND_ID, NvFactory

from sync.config import load_job
from sync.errors import ExitCode
from sync.platforms.notifyvisitors import USER_CREATE
from sync.platforms.registry import REGISTRY
from sync.records import body_json
from sync.run import RunOptions, run


def _job(tmp_path: Path, url: str) -> Path:
    # The platform refuses u3's name (ChoosyNotifyVisitors): valid input the plan cannot find fault with.
    (tmp_path / "users.csv").write_text(
        f"id,name,mobile\nu1,Ada,+14155550101\nu2,Alan,+14155550102\nu3,{BLOCKED},+14155550103\n",
        encoding="utf-8",
    )
    job = tmp_path / "nv.yaml"
    job.write_text(
        "version: 1\nname: nv-retry\nworkdir: work\n"
        f"destination: {{platform: notifyvisitors, base_url: '{url}', secret: {{env: NV_KEY}},"
        f" verify_tls: false, extra: {{brand_id: '{NV_BRAND_ID}'}}}}\n"
        "sources:\n  - {name: users, path: users.csv, ext_id: id, attributes: {name: string}, msisdn: mobile}\n"
        "dispatch: {retry: {max_attempts: 3, base_delay: 0.01, max_delay: 0.02}}\n",
        encoding="utf-8",
    )
    return job


def test_restrict_keeps_only_the_named_users_items() -> None:
    from sync.platforms.notifyvisitors.requests import make_batch

    nv = REGISTRY["notifyvisitors"]
    body = {"nv": [{"userID": u, "user_attributes": {"name": u}} for u in ("u1", "u2", "u3")]}
    batch = make_batch(USER_CREATE, body)
    cut = nv.restrict(batch, {"u2"})
    assert cut is not None and cut.ext_ids == ("u2",) and body_json(cut) == {"nv": [body["nv"][1]]}
    assert cut.batch_id != batch.batch_id
    assert nv.restrict(batch, {"zz"}) is None and nv.restrict(batch, {"u1", "u2", "u3"}) is batch


async def test_retry_resends_only_the_refused_user(nv_choosy_factory: NvFactory, tmp_path: Path) -> None:
    running = await nv_choosy_factory(errors_in_body=True)
    job = load_job(_job(tmp_path, running.url))
    first = await run(job, RunOptions(api_key=NV_API_KEY))
    assert first.exit_code is ExitCode.PARTIAL and first.summary.ids_rejected == 1
    assert sorted(running.sandbox.state.users) == ["u1", "u2"]
    before = running.sandbox.stats.requests(USER_CREATE)
    retried = await run(job, RunOptions(api_key=NV_API_KEY, retry=first.run_id))
    assert retried.replay is not None and retried.replay.cut_to_refused == 1
    # One request naming u3 alone (refused again: its name is still blocked); u1 and u2 are not sent again.
    assert running.sandbox.stats.requests(USER_CREATE) - before == 1
    assert retried.summary.ids_rejected == 1 and retried.summary.requests == 1
