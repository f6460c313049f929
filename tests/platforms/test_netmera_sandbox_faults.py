"""Faults: seeded (repeatable) 500/503, slow answers, hangs, dropped connections and applied-then-500."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from sync.sandboxes._core import FaultInjector, FaultKind, FaultSpec, LatencySpec

BODY = {"tag": "T", "extIds": ["a", "b"]}


def test_decisions_are_a_pure_function_of_seed_and_counter() -> None:
    spec = FaultSpec(error_500=0.1, error_503=0.1, slow=0.1, hang=0.05, drop=0.05, applied_then_500=0.1)
    first = FaultInjector(spec, seed=42)
    second = FaultInjector(spec, seed=42)
    run1 = [first.next("tagUsers") for _ in range(2000)]
    run2 = [second.next("tagUsers") for _ in range(2000)]
    assert run1 == run2
    assert [d.n for d in run1[:3]] == [0, 1, 2]
    assert first.decide(17, "tagUsers") == run1[17]
    other = [FaultInjector(spec, seed=43).decide(n, "tagUsers").kind for n in range(2000)]
    assert other != [d.kind for d in run1]


def test_shares_are_respected() -> None:
    spec = FaultSpec(error_500=0.2, error_503=0.1, drop=0.05)
    injector = FaultInjector(spec, seed=7)
    kinds = [injector.next("x").kind for _ in range(20_000)]
    assert kinds.count(FaultKind.ERROR_500) / 20_000 == pytest.approx(0.2, abs=0.015)
    assert kinds.count(FaultKind.ERROR_503) / 20_000 == pytest.approx(0.1, abs=0.01)
    assert kinds.count(FaultKind.DROP) / 20_000 == pytest.approx(0.05, abs=0.008)
    assert kinds.count(FaultKind.NONE) / 20_000 == pytest.approx(0.65, abs=0.015)


def test_latency_distributions_and_endpoint_filter() -> None:
    uniform = FaultInjector(FaultSpec(slow=1.0, latency=LatencySpec("uniform", 0.1, 0.3)), seed=1)
    delays = [uniform.next("x").delay for _ in range(500)]
    assert all(0.1 <= d <= 0.3 for d in delays) and max(delays) - min(delays) > 0.15
    expo = FaultInjector(FaultSpec(slow=1.0, latency=LatencySpec("exponential", 0.0, 5.0, 0.2)), seed=1)
    delays = [expo.next("x").delay for _ in range(5000)]
    assert sum(delays) / len(delays) == pytest.approx(0.2, rel=0.1)
    assert FaultInjector(FaultSpec(slow=1.0, latency=LatencySpec("fixed", 0.5)), 1).next("x").delay == 0.5

    only = FaultInjector(FaultSpec(error_500=1.0, endpoints=frozenset({"tagUsers"})), seed=1)
    assert only.next("untagUsers").kind is FaultKind.NONE
    assert only.counter == 0  # other endpoints do not shift the sequence
    assert only.next("tagUsers").kind is FaultKind.ERROR_500


def test_invalid_specs_are_refused() -> None:
    with pytest.raises(ValueError):
        FaultSpec(error_500=0.7, drop=0.5)
    with pytest.raises(ValueError):
        FaultSpec.from_mapping({"eror_500": 0.1})
    with pytest.raises(ValueError):
        LatencySpec("normal")


@pytest.mark.parametrize(("share", "status"), [("error_500", 500), ("error_503", 503)])
async def test_5xx_faults_change_nothing(netmera_sandbox_factory: Any, share: str, status: int) -> None:
    running = await netmera_sandbox_factory(faults={share: 1.0})
    reply = await running.post("tagUsers", BODY)
    assert reply.status == status
    assert reply.body["code"] == 2001
    assert running.sandbox.state.tags == {}
    assert running.sandbox.stats.faults(FaultKind(share)) == 1
    stats = await running.inspect("GET", "stats")  # the inspection routes are never faulted
    assert stats.status == 200


async def test_applied_then_500_applies_the_change(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(faults={"applied_then_500": 1.0})
    reply = await running.post("tagUsers", BODY)
    assert reply.status == 500 and reply.body["code"] == 2001
    assert running.sandbox.state.tags["T"] == {"a", "b"}
    assert running.sandbox.stats.applied("tagUsers") == 2
    assert running.sandbox.stats.faults(FaultKind.APPLIED_THEN_500) == 1


async def test_slow_answers_wait_the_drawn_latency(netmera_sandbox_factory: Any) -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    running = await netmera_sandbox_factory(
        sleep=fake_sleep,
        faults={"slow": 1.0, "latency": {"distribution": "uniform", "low": 2.0, "high": 4.0}},
    )
    for _ in range(3):
        assert (await running.post("tagUsers", BODY)).status == 200
    assert len(slept) == 3 and all(2.0 <= s <= 4.0 for s in slept)
    expected = [running.sandbox.core.faults.decide(n, "tagUsers").delay for n in range(3)]
    assert slept == expected


async def test_real_latency_is_observable(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(
        faults={"slow": 1.0, "latency": {"distribution": "fixed", "low": 0.2}}
    )
    start = time.perf_counter()
    assert (await running.post("tagUsers", BODY)).status == 200
    assert time.perf_counter() - start >= 0.2


async def test_drop_closes_the_connection_without_an_answer(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(faults={"drop": 1.0})
    with pytest.raises(aiohttp.ClientConnectionError):
        await running.post("tagUsers", BODY)
    assert running.sandbox.state.tags == {}
    assert running.sandbox.stats.requests("tagUsers", "dropped") == 1


async def test_hang_never_answers_until_the_client_gives_up(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(faults={"hang": 1.0, "hang_seconds": 60})
    timeout = aiohttp.ClientTimeout(total=0.3)
    start = time.perf_counter()
    with pytest.raises(TimeoutError):
        async with running.session.post(
            running.url + "tagUsers", json=BODY, headers=running.headers, timeout=timeout
        ):
            pass
    assert time.perf_counter() - start < 2
    assert running.sandbox.state.tags == {}
    start = time.perf_counter()
    await running.sandbox.stop()  # releases the hung handler at once
    assert time.perf_counter() - start < 2
    assert running.sandbox.stats.requests("tagUsers", "hung") == 1


async def test_a_short_hang_ends_in_a_dropped_connection(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(faults={"hang": 1.0, "hang_seconds": 0.1})
    with pytest.raises(aiohttp.ClientConnectionError):
        await running.post("tagUsers", BODY)


async def test_the_same_seed_repeats_the_same_outcomes(netmera_sandbox_factory: Any) -> None:
    faults = {"error_500": 0.2, "error_503": 0.2, "applied_then_500": 0.2}
    outcomes = []
    for _ in range(2):
        running = await netmera_sandbox_factory(faults=faults, seed=99)
        statuses = [
            (await running.post("tagUsers", {"tag": "T", "extIds": [f"u{i}"]})).status for i in range(40)
        ]
        outcomes.append((statuses, sorted(running.sandbox.state.tags.get("T", ()))))
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0][0]) == {200, 500, 503}


async def test_faults_apply_only_to_listed_endpoints(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(faults={"error_503": 1.0, "endpoints": ["untagUsers"]})
    assert (await running.post("tagUsers", BODY)).status == 200
    assert (await running.post("untagUsers", BODY)).status == 503


async def test_faults_come_after_auth_and_rate_limit(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(
        clock=lambda: 30.0, faults={"error_500": 1.0}, limits={"tagUsers": {"requests": 1}}
    )
    assert (await running.post("tagUsers", BODY, headers={})).status == 403
    assert (await running.post("tagUsers", BODY)).status == 500
    assert (await running.post("tagUsers", BODY)).status == 429
    assert running.sandbox.stats.faults() == 1
