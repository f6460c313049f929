"""The /_sandbox/ routes: stats, state dump (JSON, Parquet), reset and run-time config."""

from __future__ import annotations

import io
from typing import Any

import polars as pl

from sync.sandboxes.netmera import NetmeraSandbox, NetmeraSandboxConfig


async def test_stats_route(netmera_sandbox_factory: Any) -> None:
    netmera_sandbox = await netmera_sandbox_factory(clock=lambda: 1000.0)  # one stats window for sure
    await netmera_sandbox.post("tagUsers", {"tag": "T", "extIds": ["a", "b", "c"]})
    await netmera_sandbox.post("tagUsers", {"tag": "T"})
    await netmera_sandbox.post("nothing", {})
    reply = await netmera_sandbox.inspect("GET", "stats")
    assert reply.status == 200
    assert reply.body["requests"] == {"<unknown>": {"404": 1}, "tagUsers": {"200": 1, "400": 1}}
    assert reply.body["requests_total"] == 3
    assert reply.body["applied"] == {"tagUsers": 3}
    assert reply.body["max_in_window"]["tagUsers"]["max"] == 2
    assert reply.body["rate_limited_total"] == 0 and reply.body["faults"] == {}


async def test_stats_stamp_the_first_request_until_a_reset(netmera_sandbox_factory: Any) -> None:
    # bench/bench_first_request.py reads this stamp instead of polling the sandbox while the run starts.
    now = [1000.0]
    netmera_sandbox = await netmera_sandbox_factory(clock=lambda: now[0])
    assert (await netmera_sandbox.inspect("GET", "stats")).body["first_request_at"] is None
    await netmera_sandbox.post("tagUsers", {"tag": "T", "extIds": ["a"]})
    now[0] = 1002.5
    await netmera_sandbox.post("tagUsers", {"tag": "T", "extIds": ["b"]})
    assert (await netmera_sandbox.inspect("GET", "stats")).body["first_request_at"] == 1000.0
    await netmera_sandbox.inspect("POST", "reset?what=stats")
    assert (await netmera_sandbox.inspect("GET", "stats")).body["first_request_at"] is None
    await netmera_sandbox.post("tagUsers", {"tag": "T", "extIds": ["c"]})
    assert (await netmera_sandbox.inspect("GET", "stats")).body["first_request_at"] == 1002.5


async def test_state_dump_json_round_trips_into_a_new_sandbox(netmera_sandbox: Any) -> None:
    state = netmera_sandbox.sandbox.state
    state.add_synthetic(3, 1)
    await netmera_sandbox.post("tagUsers", {"tag": "Sport", "extIds": ["u0", "new"]})
    await netmera_sandbox.post("setProfileAttributes", [{"extId": "u1", "profile": {"age": 3}}])
    await netmera_sandbox.post("updateEmail", {"extId": "u2", "email": "x@example.com"})
    await netmera_sandbox.post("enableMail", {"extIds": ["u2"]})
    await netmera_sandbox.post("fireEvents", [{"extId": "u0", "name": "login", "via": "app"}])
    reply = await netmera_sandbox.inspect("GET", "state")
    dump = reply.body
    assert {u["extId"] for u in dump["users"]} == {"u0", "u1", "u2", "new"}
    by_id = {u["extId"]: u for u in dump["users"]}
    assert by_id["new"] == {"extId": "new", "tags": ["Sport"]}
    assert by_id["u1"]["profile"] == {"age": 3}
    assert by_id["u2"]["email"] == "x@example.com" and by_id["u2"]["emailOptIn"] is True
    assert dump["events"][0]["name"] == "login" and dump["events"][0]["attributes"] == {"via": "app"}

    copy = NetmeraSandbox(NetmeraSandboxConfig())
    copy.state.load({k: v for k, v in dump.items() if k in ("users", "segments")})
    assert copy.state.dump()["users"] == sorted(dump["users"], key=lambda u: u["extId"] == "new")


async def test_state_dump_parquet_tables(netmera_sandbox: Any) -> None:
    netmera_sandbox.sandbox.state.add_synthetic(4, 2)
    await netmera_sandbox.post("tagUsers", {"tag": "T", "extIds": ["u0"]})
    async with netmera_sandbox.session.get(
        netmera_sandbox.root_url + "/_sandbox/state?format=parquet"
    ) as resp:
        assert resp.status == 200
        users = pl.read_parquet(io.BytesIO(await resp.read()))
    assert users.height == 4
    assert users.filter(pl.col("extId") == "u0")["tags"].to_list() == [["T"]]
    url = netmera_sandbox.root_url + "/_sandbox/state?format=parquet&table=devices"
    async with netmera_sandbox.session.get(url) as resp:
        devices = pl.read_parquet(io.BytesIO(await resp.read()))
    assert devices.height == 8
    assert devices.columns == ["extId", "platform", "token", "deviceModel", "pushPermitted"]
    bad = await netmera_sandbox.inspect("GET", "state", params={"format": "parquet", "table": "nope"})
    assert bad.status == 400
    bad = await netmera_sandbox.inspect("GET", "state", params={"format": "xml"})
    assert bad.status == 400


async def test_reset(netmera_sandbox: Any) -> None:
    await netmera_sandbox.post("tagUsers", {"tag": "T", "extIds": ["a"]})
    reply = await netmera_sandbox.inspect("POST", "reset", params={"what": "stats"})
    assert reply.status == 200
    assert netmera_sandbox.sandbox.stats.requests("tagUsers") == 0
    assert netmera_sandbox.sandbox.state.exists("a")
    assert (await netmera_sandbox.inspect("POST", "reset")).status == 200
    assert not netmera_sandbox.sandbox.state.exists("a")
    assert (await netmera_sandbox.inspect("POST", "reset", params={"what": "everything"})).status == 400


async def test_config_route_changes_limits_and_faults_at_run_time(netmera_sandbox: Any) -> None:
    reply = await netmera_sandbox.inspect("GET", "config")
    assert reply.body["limits"] == {} and reply.body["faults"]["error_500"] == 0.0

    new = {
        "limits": {"tagUsers": {"requests": 1, "window": 3600}},
        "faults": {"error_503": 1.0, "endpoints": ["untagUsers"]},
    }
    reply = await netmera_sandbox.inspect("POST", "config", body=new)  # (a wall-clock hour: 2 requests fit)
    assert reply.status == 200
    assert reply.body["limits"] == {"tagUsers": {"requests": 1, "window": 3600.0}}
    body = {"tag": "T", "extIds": ["a"]}
    assert (await netmera_sandbox.post("tagUsers", body)).status == 200
    assert (await netmera_sandbox.post("tagUsers", body)).status in (
        429,
        200,
    )  # 200 only across an hour boundary
    assert (await netmera_sandbox.post("untagUsers", body)).status == 503

    reply = await netmera_sandbox.inspect(
        "POST", "config", body={"limits": {}, "faults": {"error_503": 0}, "seed": 5}
    )
    assert reply.body["seed"] == 5
    assert (await netmera_sandbox.post("untagUsers", body)).status == 200

    for bad in ({"faults": {"error_500": 2}}, {"limits": {"x": {}}}, {"what": 1}, {"seed": "x"}):
        reply = await netmera_sandbox.inspect("POST", "config", body=bad)
        assert reply.status == 400, bad
    reply = await netmera_sandbox.inspect("POST", "config", data="{bad")
    assert reply.status == 400


async def test_inspection_needs_no_key_and_is_not_counted(netmera_sandbox: Any) -> None:
    for _ in range(3):
        assert (await netmera_sandbox.inspect("GET", "stats")).status == 200
    assert netmera_sandbox.sandbox.stats.snapshot()["requests_total"] == 0


async def test_parquet_tables_in_a_directory_seed_a_new_sandbox(netmera_sandbox: Any, tmp_path: Any) -> None:
    state = netmera_sandbox.sandbox.state
    state.add_synthetic(5, 2)
    state.load({"segments": [{"id": 3, "name": "seg", "members": ["u1", "u2"]}]})
    await netmera_sandbox.post("tagUsers", {"tag": "T", "extIds": ["u0", "tag-only"]})
    await netmera_sandbox.post(
        "setProfileAttributes", [{"extId": "u3", "profile": {"list": [1, 2], "n": "x"}}]
    )
    await netmera_sandbox.post("updateMsisdn", {"extId": "u4", "msisdn": "905"})
    await netmera_sandbox.post("enableSms", {"extIds": ["u4"]})
    for name in ("users", "devices", "segments"):
        url = f"{netmera_sandbox.root_url}/_sandbox/state?format=parquet&table={name}"
        async with netmera_sandbox.session.get(url) as resp:
            assert resp.status == 200
            (tmp_path / f"{name}.parquet").write_bytes(await resp.read())

    copy = NetmeraSandbox(NetmeraSandboxConfig(seed_file=tmp_path))
    assert copy.state.dump()["users"] == state.dump()["users"]
    assert copy.state.dump()["segments"] == state.dump()["segments"]
