"""Rate limits: against a sandbox process enforcing fixed, clock-aligned windows on every endpoint,

* a run whose budget is configured **at** the platform's limit gets not one 429 over many windows, and uses the
  windows fully (the busiest window holds exactly the limit);
* a run whose budget is configured **above** the limit, against a platform that does not announce what is left
  (no ``X-RateLimit-Remaining``, like Netmera), does get 429s, recovers from them, and loses nothing.

Both end with the platform's state equal to the input. CI form: 20 requests per 0.5 s window, at least 10 windows
of the busiest endpoint. Long form (``--soak-long``): 20 per 1 s window, at least 60 windows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sync.config import load_job
from sync.demo import start_sandbox_process, stop_sandbox_process
from sync.errors import ExitCode
from sync.run import RunOptions, run

from .conftest import SandboxHttp
from .workload import compare_state, write_workload

SANDBOX_KEY = "limits-sandbox-key-77aa"
LIMIT = 20


def _window(soak_long: bool) -> float:
    return 1.0 if soak_long else 0.5


@pytest.fixture
def limited_sandbox(tmp_path: Path, soak_long: bool) -> Iterator[tuple[str, SandboxHttp]]:
    config = {
        "limits": {"*": {"requests": LIMIT, "window": _window(soak_long)}},
        "stats_window": _window(soak_long),
    }
    process, url = start_sandbox_process(SANDBOX_KEY, config, tmp_path / "sandbox")
    try:
        yield url, SandboxHttp(url.removesuffix("/rest/3.0/"))
    finally:
        stop_sandbox_process(process)


@dataclass(frozen=True, slots=True)
class LimitsRun:
    """What each limits test needs: the limited sandbox, the form (CI or long) and where figures go."""

    tmp_path: Path
    url: str
    http: SandboxHttp
    soak_long: bool
    figures: Callable[[str, Mapping[str, Any]], None]

    async def run(self, *, budget: int, users: int, url: str | None = None) -> dict[str, Any]:
        """Send ``users`` with ``budget`` requests per window to ``url`` (default: the sandbox itself)."""
        window = _window(self.soak_long)
        return await _run(
            self.tmp_path, url or self.url, self.http, budget=budget, window=window, users=users
        )


@pytest.fixture
def limits(
    tmp_path: Path,
    limited_sandbox: tuple[str, SandboxHttp],
    soak_long: bool,
    figures: Callable[[str, Mapping[str, Any]], None],
) -> LimitsRun:
    url, http = limited_sandbox
    return LimitsRun(tmp_path, url, http, soak_long, figures)


async def _run(
    tmp_path: Path, url: str, http: SandboxHttp, *, budget: int, window: float, users: int
) -> dict[str, Any]:
    job_path, frame = write_workload(
        tmp_path,
        url,
        users=users,
        batch_size=10,
        name="limits",
        dispatch=(
            "  concurrency: 8\n"
            "  request_timeout: 5\n"
            f'  budgets: {{"*": {{requests: {budget}, period: {window}}}}}\n'
            "  retry: {max_attempts: 30, base_delay: 0.02, max_delay: 0.5}\n"
        ),
    )
    outcome = await run(load_job(job_path), RunOptions(api_key=SANDBOX_KEY))
    stats = await asyncio.to_thread(http.stats)
    comparison = compare_state(await asyncio.to_thread(http.state), frame)
    busiest = max(stats["requests"], key=lambda e: stats["requests"][e].get("200", 0))
    return {
        "outcome": outcome,
        "comparison": comparison,
        "stats": stats,
        "figures": {
            "users": users,
            "limit": f"{LIMIT} per {window} s window per endpoint",
            "budget": f"{budget} per {window} s",
            "seconds": round(outcome.summary.elapsed, 1),
            "requests": outcome.summary.requests,
            "busiest_endpoint": busiest,
            "busiest_windows": stats["requests"][busiest].get("200", 0) / LIMIT,
            "max_accepted_in_a_window": {e: w["max"] for e, w in stats["max_in_window"].items()},
            "rate_limited_429_server": stats["rate_limited_total"],
            "rate_limited_429_client": sum(e.rate_limited for e in outcome.summary.endpoints),
            "retries": sum(e.retries for e in outcome.summary.endpoints),
            "lost_updates": comparison.lost,
            "exit_code": int(outcome.exit_code),
        },
    }


@pytest.mark.soak
async def test_a_budget_at_the_limit_never_gets_a_429(limits: LimitsRun) -> None:
    soak_long = limits.soak_long
    result = await limits.run(budget=LIMIT, users=8000 if soak_long else 1500)
    measured = result["figures"]
    limits.figures("limits_at_budget_long" if soak_long else "limits_at_budget", measured)
    outcome, stats = result["outcome"], result["stats"]
    assert outcome.exit_code is ExitCode.OK, outcome.summary.render_text()
    assert result["comparison"].lost == 0, result["comparison"].examples
    assert measured["busiest_windows"] >= (60 if soak_long else 10)
    assert stats["rate_limited_total"] == 0 and measured["rate_limited_429_client"] == 0
    # The budget is used, not just respected: the busiest window of the busiest endpoint is full.
    assert measured["max_accepted_in_a_window"][measured["busiest_endpoint"]] == LIMIT


class NoRemainingHeader:
    """A pass-through proxy in front of the sandbox that drops ``X-RateLimit-Remaining``: Netmera documents no
    rate limit, so a real run may learn of the limit only from 429s (``Retry-After`` is kept: it is plain HTTP).

    With the header, the budget pauses by itself when a window is used up and a budget set above the limit
    meets no 429 at all (``test_a_budget_above_the_limit_with_rate_headers_...`` shows that); without it, the
    429s come and the run must recover from them."""

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream.removesuffix("/rest/3.0/")
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> NoRemainingHeader:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = next(a[1] for a in self._runner.addresses if isinstance(a, tuple))
        self.url = f"http://127.0.0.1:{port}/rest/3.0/"
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._session is not None and self._runner is not None
        await self._runner.cleanup()
        await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        headers = {
            k: v for k, v in request.headers.items() if k.lower() in ("content-type", "x-netmera-api-key")
        }
        async with self._session.request(
            request.method, self._upstream + request.path_qs, data=await request.read(), headers=headers
        ) as upstream:
            body = await upstream.read()
            kept = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
            return web.Response(status=upstream.status, body=body, headers=kept)


@pytest.mark.soak
async def test_a_budget_above_the_limit_recovers_from_429s_without_loss(limits: LimitsRun) -> None:
    soak_long = limits.soak_long
    async with NoRemainingHeader(limits.url) as proxy:
        result = await limits.run(budget=3 * LIMIT, users=4000 if soak_long else 600, url=proxy.url)
    measured = result["figures"]
    limits.figures("limits_above_budget_long" if soak_long else "limits_above_budget", measured)
    outcome, stats = result["outcome"], result["stats"]
    assert (
        stats["rate_limited_total"] > 0 and measured["rate_limited_429_client"] > 0
    )  # the platform pushed back
    assert outcome.exit_code is ExitCode.OK, outcome.summary.render_text()
    assert (outcome.summary.ids_failed, outcome.summary.ids_rejected) == (0, 0)
    assert result["comparison"].lost == 0, result["comparison"].examples
    assert result["comparison"].unexpected == 0
    assert max(measured["max_accepted_in_a_window"].values()) <= LIMIT


@pytest.mark.soak
async def test_a_budget_above_the_limit_with_rate_headers_paces_itself(limits: LimitsRun) -> None:
    result = await limits.run(budget=3 * LIMIT, users=600)
    limits.figures("limits_above_budget_with_headers", result["figures"])
    outcome = result["outcome"]
    assert outcome.exit_code is ExitCode.OK, outcome.summary.render_text()
    assert result["comparison"].lost == 0 and result["comparison"].unexpected == 0
    assert max(result["figures"]["max_accepted_in_a_window"].values()) <= LIMIT
