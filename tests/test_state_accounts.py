"""One base URL, several accounts: Netmera's test app and live app answer at the same address, and the API key
names the app. The snapshot state and the ledger's runs are per account (``Destination.key``), never per base URL
alone; the key itself is recorded nowhere."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sync.config import account_fingerprint, same_destination
from sync.errors import StateError

JOB = """\
version: 1
name: accounts
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
    attributes: {{city: string}}
"""


@contextlib.asynccontextmanager
async def one_host(apps: Mapping[str, Any]) -> AsyncIterator[str]:
    """A base URL in front of several sandboxes, each request going to the one whose key it carries (as
    Netmera's one REST host serves every app); an unknown key is refused as Netmera refuses it."""
    session = aiohttp.ClientSession()

    async def forward(request: web.Request) -> web.Response:
        app = apps.get(request.headers.get("X-netmera-api-key", ""))
        if app is None:
            return web.json_response({"code": 2010, "error": "API key invalid"}, status=403)
        async with session.request(
            request.method,
            app.url + request.match_info["tail"],
            params=request.query,
            data=await request.read(),
            headers={k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")},
        ) as answer:
            body = await answer.read()
            return web.Response(body=body, status=answer.status, content_type=answer.content_type)

    server = web.Application()
    server.router.add_route("*", "/rest/3.0/{tail:.*}", forward)
    runner = web.AppRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/rest/3.0/"
    finally:
        await runner.cleanup()
        await session.close()


async def test_the_live_app_gets_every_user_after_the_test_app_behind_the_same_base_url(
    tmp_path: Path,
    netmera_sandbox_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A snapshot job run against the test app, then with the live app's key (one job file, one workdir, the key
    from the environment): the state was the base URL's, so the live run read what the test app had confirmed,
    found nothing changed and sent nothing — the live app never got the users, and the run said OK. Now the
    account is part of the destination: the live app gets every user, the test app's state stays its own."""
    from sync.cli import main
    from sync.config import load_job
    from sync.ledger.ledger import Ledger
    from sync.run import RunOptions, run

    test_key, live_key = "test-app-key-0123456789", "live-app-key-9876543210"
    test_app = await netmera_sandbox_factory(api_key=test_key)
    live_app = await netmera_sandbox_factory(api_key=live_key)
    (tmp_path / "users.csv").write_text("id,city\nU1,Paris\nU2,Oslo\nU3,Rome\n", encoding="utf-8")
    async with one_host({test_key: test_app, live_key: live_app}) as url:
        job_file = tmp_path / "job.yaml"
        job_file.write_text(JOB.format(url=url), encoding="utf-8")
        monkeypatch.chdir(tmp_path)
        job = load_job(job_file)

        def profiles(app: Any) -> dict[str, Any]:
            return {u: dict(app.sandbox.state.user(u).profile or {}) for u in ("U1", "U2", "U3")}

        first = await run(job, RunOptions(api_key=test_key))
        assert int(first.exit_code) == 0 and profiles(test_app)["U2"] == {"city": "Oslo"}
        assert profiles(live_app)["U1"] == {}  # the live app has not heard of U1

        # A rotated key cannot be told from another app's: the run asks, sending nothing (it sent nothing
        # and said "nothing changed", exit 0: the live app never got the users).
        with pytest.raises(StateError, match="state rekey") as asked:
            await run(job, RunOptions(api_key=live_key))
        assert int(asked.value.exit_code) == 2 and "--full-refresh" in str(asked.value)
        assert profiles(live_app)["U1"] == {} and live_key not in str(asked.value)
        live = await run(job, RunOptions(api_key=live_key, full_refresh=True))  # another app: start it
        assert int(live.exit_code) == 0
        assert live.diff is not None and live.diff.users_new == 3
        assert (
            profiles(live_app)
            == profiles(test_app)
            == {
                "U1": {"city": "Paris"},
                "U2": {"city": "Oslo"},
                "U3": {"city": "Rome"},
            }
        )
        again = await run(job, RunOptions(api_key=test_key))  # the test app's state is still its own
        assert again.diff is not None and (again.diff.users_new, again.diff.users_changed) == (0, 0)

        states = sorted(p.name for p in (tmp_path / "work" / "state").iterdir())
        accounts = sorted(job.destination.for_account(k).key for k in (test_key, live_key))
        assert states == accounts and all(k.startswith(job.destination.url_key + "-") for k in states)
        with Ledger.open(live.ledger_path) as ledger:
            recorded = {r.run_id: r.destination for r in ledger.runs("accounts")}
        assert recorded[live.run_id] == job.destination.for_account(live_key).key != recorded[first.run_id]
        files = [p for p in (tmp_path / "work").rglob("*") if p.is_file()]
        assert not any(k.encode() in p.read_bytes() for p in files for k in (test_key, live_key))

        # `state show` without the key cannot tell which account: it says so, naming the variable.
        monkeypatch.delenv("NETMERA_API_KEY", raising=False)
        assert main(["state", "show", str(job_file)]) == 2
        err = capsys.readouterr().err
        assert "2 accounts of netmera" in err and "NETMERA_API_KEY" in err and test_key not in err
        monkeypatch.setenv("NETMERA_API_KEY", live_key)
        assert main(["state", "show", str(job_file), "--output", "json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["sources"]["users"]["users"] == 3
        assert shown["state_dir"].endswith(job.destination.for_account(live_key).key)


async def test_a_state_recorded_by_the_base_url_alone_is_taken_over_by_the_accounts_run(
    tmp_path: Path, netmera_sandbox_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A workdir of an older pushsync holds ``state/<platform>-<url hash>``: the first run that knows its account
    takes it over (renamed), so an upgrade does not send every user again."""
    from sync.config import load_job
    from sync.run import RunOptions, run

    app = await netmera_sandbox_factory()
    (tmp_path / "users.csv").write_text("id,city\nU1,Paris\nU2,Oslo\n", encoding="utf-8")
    (tmp_path / "job.yaml").write_text(JOB.format(url=app.url), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    job = load_job(tmp_path / "job.yaml")
    assert int((await run(job, RunOptions(api_key=app.api_key))).exit_code) == 0
    root = tmp_path / "work" / "state"
    mine = root / job.destination.for_account(app.api_key).key
    mine.rename(root / job.destination.url_key)  # as an older pushsync named it

    again = await run(job, RunOptions(api_key=app.api_key))
    assert int(again.exit_code) == 0 and again.summary.requests == 0
    assert again.diff is not None and again.diff.users_changed == again.diff.users_new == 0
    assert sorted(p.name for p in root.iterdir()) == [mine.name]


async def test_after_a_key_rotation_state_rekey_keeps_the_state_and_nothing_is_sent_again(
    tmp_path: Path,
    netmera_sandbox_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same app with a new key (both keys valid for a while): the run asks rather than sending every user
    again (``push`` attributes would be appended twice); `pushsync state rekey JOB` with the new key in the
    environment makes the old key's state the new key's, and the next run sends nothing."""
    from sync.cli import main
    from sync.config import load_job
    from sync.run import RunOptions, run

    old_key, new_key = "old-app-key-0123456789", "new-app-key-9876543210"
    app = await netmera_sandbox_factory(api_key=old_key)
    (tmp_path / "users.csv").write_text("id,city\nU1,Paris\nU2,Oslo\n", encoding="utf-8")
    async with one_host({old_key: app, new_key: app}) as url:
        job_file = tmp_path / "job.yaml"
        job_file.write_text(JOB.format(url=url), encoding="utf-8")
        monkeypatch.chdir(tmp_path)
        job = load_job(job_file)
        assert int((await run(job, RunOptions(api_key=old_key))).exit_code) == 0
        with pytest.raises(StateError, match="state rekey"):
            await run(job, RunOptions(api_key=new_key))

        monkeypatch.setenv("NETMERA_API_KEY", new_key)
        assert main(["plan", str(job_file), "--output", "json"]) == 0  # plan says what run will ask
        (note,) = [n for n in json.loads(capsys.readouterr().out)["notes"] if "state rekey" in n]
        assert "`pushsync run` will refuse" in note and new_key not in note
        assert main(["state", "rekey", str(job_file)]) == 0
        out = capsys.readouterr().out
        old, new = (job.destination.for_account(k).key for k in (old_key, new_key))
        assert f"the state of {old} is now {new}'s" in out and "nothing was sent" in out
        assert main(["state", "rekey", str(job_file)]) == 2  # nothing left to move
        assert "nothing to rekey" in capsys.readouterr().err

        again = await run(job, RunOptions(api_key=new_key))
        assert int(again.exit_code) == 0 and again.summary.requests == 0
        assert again.diff is not None and again.diff.users_state == 2


@pytest.mark.parametrize(
    ("platform", "extra", "same", "other"),
    [
        (
            "notifyvisitors",
            {"brand_id": "1000"},
            {"event_time_zone": "Europe/Istanbul"},
            {"brand_id": "2000"},
        ),
        ("formsonfire", {"company_id": "7"}, {"expiry_secs": "60"}, {"company_id": "8"}),
    ],
)
def test_only_the_settings_that_name_the_account_are_part_of_the_destination(
    platform: str, extra: dict[str, str], same: dict[str, str], other: dict[str, str]
) -> None:
    """A brand or company ID names the account, with the key; a time zone or a message default does not:
    changing one made the job "another destination", whose crashed run was not resumed (events and pushes sent
    again)."""
    from dataclasses import replace

    from sync.config import Destination

    base = Destination(platform, "https://api.example.com/", secret_env="K", extra=extra)
    key = base.for_account("k3y").key
    assert replace(base, extra={**extra, **same}).for_account("k3y").key == key
    assert replace(base, extra={**extra, **other}).for_account("k3y").key != key
    assert base.for_account("another-k3y").key != key


def test_destinations_match_by_account_and_older_records_match_any_account() -> None:
    base = "netmera-0123456789"
    a, b = f"{base}-{account_fingerprint('key-a')}", f"{base}-{account_fingerprint('key-b')}"
    assert a != b and not same_destination(a, b)
    assert same_destination(base, a) and same_destination(a, base)  # recorded before accounts, or not known
    assert same_destination(None, a) and same_destination(a, a)
    assert not same_destination("netmera-9999999999", a)
    # The brand or company ID of a platform's account is part of it too; the fingerprint is 8 hex digits.
    assert account_fingerprint("k", {"brand_id": "1"}) != account_fingerprint("k", {"brand_id": "2"})
    assert len(account_fingerprint("k")) == 8
