"""Rate limits: N requests per fixed, clock-aligned window per endpoint; 429 with Retry-After and
X-RateLimit-Remaining; rejected requests consume no quota; stats keep the largest accepted count per window."""

from __future__ import annotations

from typing import Any

import pytest

from sync.sandboxes._core import FixedWindowLimiter, RateLimit, parse_limits


class FakeClock:
    """A settable clock: tests move time instead of sleeping."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_windows_are_aligned_to_the_clock() -> None:
    clock = FakeClock(119.0)
    limiter = FixedWindowLimiter({"tagUsers": RateLimit(2, 60.0)}, clock=clock)
    first = limiter.acquire("tagUsers", "k")
    assert first is not None and first.allowed and first.remaining == 1
    assert first.window_index == 1 and first.reset_after == pytest.approx(1.0)
    assert limiter.acquire("tagUsers", "k").allowed  # type: ignore[union-attr]
    clock.now = 120.0  # a new minute begins: the window resets even though only 1 s passed
    again = limiter.acquire("tagUsers", "k")
    assert again is not None and again.allowed and again.window_index == 2 and again.remaining == 1


def test_rejected_requests_do_not_consume_quota_and_retry_after_rounds_up() -> None:
    clock = FakeClock(100.2)
    limiter = FixedWindowLimiter({"*": RateLimit(1, 10.0)}, clock=clock)
    assert limiter.acquire("a").allowed  # type: ignore[union-attr]
    for _ in range(5):
        denied = limiter.acquire("a")
        assert denied is not None and not denied.allowed and denied.remaining == 0
        assert denied.retry_after == 10  # 9.8 s left, rounded up
        assert denied.count == 1  # the rejected requests were not counted
    clock.now = 109.999
    assert limiter.acquire("a").retry_after == 1  # type: ignore[union-attr]
    clock.now = 110.0
    assert limiter.acquire("a").allowed  # type: ignore[union-attr]


def test_lookup_order_endpoint_group_star_and_per_key_counters() -> None:
    clock = FakeClock(0.5)
    limiter = FixedWindowLimiter(
        {"tagUsers": RateLimit(1, 1.0), "user": RateLimit(2, 1.0), "*": RateLimit(5, 1.0)},
        groups={"user/create": "user", "user/update": "user"},
        clock=clock,
    )
    assert limiter.resolve("tagUsers") == ("tagUsers", RateLimit(1, 1.0))
    assert limiter.resolve("user/update") == ("user", RateLimit(2, 1.0))
    assert limiter.resolve("fireEvents") == (
        "fireEvents",
        RateLimit(5, 1.0),
    )  # "*" limits each endpoint alone
    assert limiter.acquire("user/create").allowed  # type: ignore[union-attr]
    assert limiter.acquire("user/update").allowed  # type: ignore[union-attr]
    assert not limiter.acquire("user/create").allowed  # type: ignore[union-attr]  # the group's quota is shared
    assert limiter.acquire("tagUsers", "key-a").allowed  # type: ignore[union-attr]
    assert limiter.acquire("tagUsers", "key-b").allowed  # type: ignore[union-attr]  # separate per key
    assert FixedWindowLimiter({}, clock=clock).acquire("tagUsers") is None


def test_parse_limits_shorthands_and_errors() -> None:
    assert parse_limits({"a": {"per_minute": 100}, "b": {"requests": 3, "window": 2}}) == {
        "a": RateLimit(100, 60.0),
        "b": RateLimit(3, 2.0),
    }
    with pytest.raises(ValueError):
        parse_limits({"a": {"window": 2}})
    with pytest.raises(ValueError):
        parse_limits({"a": {"requests": 1, "window": 0}})


async def test_429_with_headers_over_http(netmera_sandbox_factory: Any) -> None:
    clock = FakeClock(120.5)
    running = await netmera_sandbox_factory(clock=clock, limits={"tagUsers": {"requests": 3, "window": 60}})
    body = {"tag": "T", "extIds": ["a"]}
    remaining = []
    for _ in range(3):
        reply = await running.post("tagUsers", body)
        assert reply.status == 200
        remaining.append(reply.headers["X-RateLimit-Remaining"])
    assert remaining == ["2", "1", "0"]

    reply = await running.post("tagUsers", body)
    assert reply.status == 429
    assert reply.headers["Retry-After"] == "60"  # 59.5 s to the next minute, rounded up
    assert reply.headers["X-RateLimit-Remaining"] == "0"
    assert reply.body["code"] == 429 and "rate limit" in reply.body["error"]

    other = await running.post("untagUsers", body)  # not limited: no header
    assert other.status == 200 and "X-RateLimit-Remaining" not in other.headers

    clock.now = 151.0
    assert (await running.post("tagUsers", body)).headers["Retry-After"] == "29"
    clock.now = 180.0
    reply = await running.post("tagUsers", body)
    assert (reply.status, reply.headers["X-RateLimit-Remaining"]) == (200, "2")

    stats = running.sandbox.stats
    assert stats.max_in_window("tagUsers") == 3
    assert stats.rate_limited("tagUsers") == 2
    assert stats.requests("tagUsers", 429) == 2
    assert stats.requests("tagUsers", 200) == 4


async def test_remaining_header_on_errors_of_a_limited_endpoint(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(clock=FakeClock(0.0), limits={"*": {"requests": 5, "window": 1}})
    reply = await running.post("tagUsers", {"tag": "T"})
    assert (reply.status, reply.headers["X-RateLimit-Remaining"]) == (400, "4")
    reply = await running.get("getDeviceTokens")
    assert (reply.status, reply.headers["X-RateLimit-Remaining"]) == (200, "4")  # its own counter


async def test_forbidden_requests_are_not_counted(netmera_sandbox_factory: Any) -> None:
    running = await netmera_sandbox_factory(
        clock=FakeClock(0.0), limits={"tagUsers": {"requests": 1, "window": 1}}
    )
    for _ in range(3):
        assert (await running.post("tagUsers", {"tag": "T", "extIds": ["a"]}, headers={})).status == 403
    assert (await running.post("tagUsers", {"tag": "T", "extIds": ["a"]})).status == 200


async def test_max_in_window_tracks_the_busiest_window(netmera_sandbox_factory: Any) -> None:
    clock = FakeClock(10.0)
    running = await netmera_sandbox_factory(clock=clock, limits={"tagUsers": {"requests": 10, "window": 1}})
    for t, n in ((10.1, 4), (11.2, 7), (12.0, 2)):
        clock.now = t
        for _ in range(n):
            await running.post("tagUsers", {"tag": "T", "extIds": ["a"]})
    assert running.sandbox.stats.max_in_window("tagUsers") == 7
    snapshot = running.sandbox.stats.snapshot()
    assert snapshot["max_in_window"]["tagUsers"] == {"window_seconds": 1.0, "max": 7}


async def test_concurrent_burst_never_exceeds_the_limit(netmera_sandbox_factory: Any) -> None:
    import asyncio

    running = await netmera_sandbox_factory(
        clock=FakeClock(5.0), limits={"tagUsers": {"requests": 10, "window": 60}}
    )
    replies = await asyncio.gather(
        *(running.post("tagUsers", {"tag": "T", "extIds": [f"u{i}"]}) for i in range(30))
    )
    assert sorted(r.status for r in replies) == [200] * 10 + [429] * 20
    assert running.sandbox.stats.max_in_window("tagUsers") == 10
    assert len(running.sandbox.state.tags["T"]) == 10
