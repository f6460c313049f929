"""The dispatcher and a real connector against small real HTTP servers that answer what a platform might: what
the ledger records, how the run ends and what it says."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from sync.config import Destination, DispatchSettings, RetryPolicy
from sync.dispatch.dispatch import Dispatcher, DispatchOutcome
from sync.ledger.ledger import Ledger
from sync.platforms.netmera.client import NetmeraClient
from sync.platforms.notifyvisitors.client import NotifyVisitorsClient
from sync.records import Batch, BatchStatus, Operation, Phase

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _batch(n: int) -> Batch:
    ids = [f"u{n}-{k}" for k in range(4)]
    body = json.dumps({"tag": "T", "extIds": ids}, separators=(",", ":")).encode()
    return Batch(
        hashlib.sha256(body).hexdigest()[:16], "tagUsers", Operation.TAG, body, tuple(ids), Phase.CHANGES
    )


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "retry_after"), [(429, "86400"), (503, "86400"), (429, "Fri, 31 Dec 2100 00:00:00 GMT")]
)
async def test_a_stated_wait_over_max_retry_after_stops_the_run_and_says_so(
    serve: Callable[[Handler], Awaitable[str]], tmp_path: Path, status: int, retry_after: str
) -> None:
    requests = 0

    async def quota_gone(request: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        await request.read()
        return web.json_response(
            {"error": "daily quota"}, status=status, headers={"Retry-After": retry_after}
        )

    url = await serve(quota_gone)
    ledger = Ledger.open(tmp_path / "l.sqlite")
    ledger.start_run("r", job="j")
    batches = [_batch(n) for n in range(12)]
    for batch in batches:
        ledger.record_planned("r", batch)
    settings = DispatchSettings(
        concurrency=2,
        queue_size=4,
        request_timeout=5.0,
        drain_timeout=2.0,
        # Before the fix each 429 paused 0.2 s and each 503 backed off, then asked again: 12 batches x 3 attempts.
        retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02, max_retry_after=0.2),
    )
    async with NetmeraClient(Destination("netmera", url), "KEY-never-shown-0123") as client:
        dispatcher = Dispatcher(client, settings, ledger=ledger, run_id="r", rng=random.Random(1))
        report = await dispatcher.run(batches)
    assert report.outcome is DispatchOutcome.ABORTED
    assert requests <= 2  # the requests already out when the first answer came; none is asked again
    fatal = report.fatal
    assert fatal is not None and fatal.status == status
    assert "the platform asks to wait" in fatal.message and "retry.max_retry_after (0.2 s)" in fatal.message
    assert "KEY-never" not in fatal.message
    rows = ledger.batches("r")
    failed = [b for b in rows if b.status is BatchStatus.FAILED]
    assert 1 <= len(failed) <= 2 and all(b.attempts == 1 for b in failed)
    assert not [b for b in rows if b.status is BatchStatus.OK]
    assert len([b for b in rows if b.status is BatchStatus.PLANNED]) == 12 - len(failed)  # resume sends them
    ledger.close()


async def test_notifyvisitors_estimated_wait_over_max_retry_after_does_not_stop_the_run(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    # NotifyVisitors sends no Retry-After: its client waits for the window's end, an estimate, which may be longer
    # than a job's retry.max_retry_after; only a wait the server stated stops a run.
    requests = 0

    async def once_limited(request: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        await request.read()
        if requests == 1:
            return web.json_response({"response": {"status": "error", "message": "Too many"}}, status=429)
        return web.json_response({"response": {"status": "success", "message": "success", "data": {}}})

    url = await serve(once_limited)
    body = json.dumps({"nv": [{"userID": "u1", "user_attributes": {"name": "A"}}]}).encode()
    batch = Batch("b1", "user/create", Operation.SET_ATTRIBUTES, body, ("u1",), Phase.CHANGES)
    settings = DispatchSettings(
        concurrency=1,
        queue_size=1,
        request_timeout=5.0,
        drain_timeout=2.0,
        retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02, max_retry_after=0.05),
    )
    destination = Destination("notifyvisitors", url, extra={"brand_id": "7", "rate_window": "0.2"})
    async with NotifyVisitorsClient(destination, "KEY-never-shown-0123", wall_clock=lambda: 0.0) as client:
        # wall clock 0: the window's end is 0.2 s (+ margin) away, four times the 0.05 s limit
        report = await Dispatcher(client, settings, rng=random.Random(1)).run([batch])
    assert report.outcome is DispatchOutcome.COMPLETED and report.fatal is None
    assert requests == 2 and report.endpoints["user/create"].ids_ok == 1
