"""Nothing is lost under every fault at once: a run against a Netmera sandbox process with 5xx answers, slow
answers (some past the client's time-out), answers that never come, dropped connections, changes applied and then
answered with a 500, and 429 storms (a tight rate limit switched on for a moment every few seconds) — all
together — ends with the platform's state equal to the input, every user and every field.

The figures (requests, faults injected by kind, 429s, retries, duplicates, lost updates) are printed in pytest's
terminal summary and, under ``--soak-long``, written to ``bench/out/reliability/faults_soak.json``.
CI form: 6,000 users in well under a minute. Long form (``make soak``): 100,000 users.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from sync.config import load_job
from sync.demo import start_sandbox_process, stop_sandbox_process
from sync.errors import ExitCode
from sync.run import RunOptions, run

from .conftest import SandboxHttp
from .workload import compare_state, duplicates, write_workload

SANDBOX_KEY = "soak-sandbox-key-91c2"
FAULTS: Mapping[str, Any] = {
    "error_500": 0.04,
    "error_503": 0.04,
    "slow": 0.05,
    "latency": {"distribution": "uniform", "low": 0.0, "high": 1.5},  # above 1 s: past the client's time-out
    "hang": 0.01,
    "hang_seconds": 3,
    "drop": 0.02,
    "applied_then_500": 0.03,
}
NO_FAULTS = {k: 0 for k in ("error_500", "error_503", "slow", "hang", "drop", "applied_then_500")}
STORM = {"*": {"requests": 0, "window": 1}}
"""During a storm every request gets a 429 (with ``Retry-After: 1``). A tight but non-zero limit would not do: the
client reads ``X-RateLimit-Remaining: 0`` on the one accepted request and waits for the next window by itself."""


@pytest.fixture
def faulty_sandbox(tmp_path: Path) -> Iterator[tuple[str, SandboxHttp]]:
    process, url = start_sandbox_process(
        SANDBOX_KEY, {"faults": dict(FAULTS), "seed": 2026}, tmp_path / "sandbox"
    )
    try:
        yield url, SandboxHttp(url.removesuffix("/rest/3.0/"))
    finally:
        stop_sandbox_process(process)


async def storms(http: SandboxHttp, *, first: float, every: float, length: float, count: list[int]) -> None:
    """Switch the storm limit on for ``length`` seconds, ``first`` seconds from now and then every ``every``
    seconds, until cancelled."""
    try:
        await asyncio.sleep(first)
        while True:
            await asyncio.to_thread(http.configure, {"limits": STORM})
            count[0] += 1
            await asyncio.sleep(length)
            await asyncio.to_thread(http.configure, {"limits": {}})
            await asyncio.sleep(every - length)
    finally:
        # Runs on cancellation too (shielded from it by the thread): leave the sandbox without a limit.
        await asyncio.shield(asyncio.to_thread(http.configure, {"limits": {}}))


@pytest.mark.soak
async def test_every_fault_at_once_loses_nothing(
    tmp_path: Path,
    faulty_sandbox: tuple[str, SandboxHttp],
    soak_long: bool,
    figures: Callable[[str, Mapping[str, Any]], None],
) -> None:
    url, http = faulty_sandbox
    users, batch_size = (100_000, 50) if soak_long else (6_000, 40)
    job_path, frame = write_workload(
        tmp_path,
        url,
        users=users,
        batch_size=batch_size,
        dispatch=(
            "  concurrency: 8\n"
            "  request_timeout: 1\n"
            "  drain_timeout: 10\n"
            '  budgets: {"*": {requests: 500, per: 1s}}\n'
            "  retry: {max_attempts: 40, base_delay: 0.02, max_delay: 0.5, max_retry_after: 2}\n"
        ),
    )
    job = load_job(job_path)
    storm_count = [0]
    started = time.monotonic()
    storm_task = asyncio.create_task(storms(http, first=1.0, every=4.0, length=1.2, count=storm_count))
    try:
        outcome = await run(job, RunOptions(api_key=SANDBOX_KEY))
    finally:
        storm_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await storm_task
    elapsed = time.monotonic() - started
    await asyncio.to_thread(http.configure, {"faults": NO_FAULTS, "limits": {}})
    stats = await asyncio.to_thread(http.stats)
    state = await asyncio.to_thread(http.state)

    summary = outcome.summary
    comparison = compare_state(state, frame)
    dupes = duplicates(stats, summary.ids_ok)
    faults = {k: v for k, v in stats["faults"].items() if v}
    measured = {
        "users": users,
        "batch_size": batch_size,
        "seconds": round(elapsed, 1),
        "requests_sent": summary.requests,
        "requests_seen_by_sandbox": stats["requests_total"],
        "faults_injected": faults,
        "faults_total": sum(faults.values()),
        "storms": storm_count[0],
        "rate_limited_429": stats["rate_limited_total"],
        "retries": sum(e.retries for e in summary.endpoints),
        "ids_sent": summary.ids_ok,
        "duplicates": dupes,
        "lost_updates": comparison.lost,
        "unexpected_users": comparison.unexpected,
        "exit_code": int(outcome.exit_code),
    }
    figures("faults_soak_long" if soak_long else "faults_soak", measured)

    assert outcome.exit_code is ExitCode.OK, summary.render_text()
    assert (summary.ids_failed, summary.ids_rejected) == (0, 0)
    assert comparison.lost == 0, comparison.examples
    assert comparison.unexpected == 0
    # Every fault mode really happened in this run, 429 storms included, and was survived by retrying.
    assert set(faults) == {"error_500", "error_503", "slow", "hang", "drop", "applied_then_500"}, faults
    assert stats["rate_limited_total"] > 0 and storm_count[0] >= 1
    assert measured["retries"] >= faults["error_500"] + faults["error_503"] + faults["drop"]
    # A duplicate comes only from an ambiguous outcome: applied, then a 500 or an answer past the time-out.
    assert 0 <= dupes <= (faults["applied_then_500"] + faults["slow"]) * batch_size
