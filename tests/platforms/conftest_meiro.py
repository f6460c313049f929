"""Meiro fixtures (imported by ``tests/platforms/conftest.py``): a real local Meiro sandbox on a free port.

* ``meiro_sandbox_factory``  ``await factory(config=None, *, clock=None, **settings)`` → :class:`RunningMeiro`
* ``meiro_sandbox``          the default sandbox (polls progression) on a :class:`FakeClock`

The clock is shared by the sandbox (token expiry, time progression, rate windows) and the clients and pollers
built with ``running.client()``: ``await clock.sleep(s)`` moves it forward at once, so nothing sleeps for real.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from sandbox_fixtures import SandboxPool

from sync.platforms.meiro.client import MeiroClient, MeiroCredentials
from sync.sandboxes.meiro import MeiroSandbox, MeiroSandboxConfig, MeiroUser

MEIRO_EMAIL = "analyst@example.test"
MEIRO_PASSWORD = "meiro-test-password-0123"
VIEWER_EMAIL = "viewer@example.test"
VIEWER_PASSWORD = "viewer-test-password-0123"
EPOCH = 1_800_000_000.0  # 2027-01-15: a fixed wall-clock start, so timestamps are deterministic


class FakeClock:
    """Wall-clock seconds that move only when someone sleeps on it (or :meth:`advance` is called)."""

    def __init__(self, start: float = EPOCH) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)  # still a real suspension point, so other tasks run


@dataclass(frozen=True, slots=True)
class MeiroReply:
    status: int
    body: Any
    headers: Mapping[str, str]


@dataclass
class RunningMeiro:
    """An in-process Meiro sandbox: ``url`` ends in ``/api/``; ``sandbox`` to seed and inspect."""

    url: str
    sandbox: MeiroSandbox
    clock: FakeClock
    session: aiohttp.ClientSession
    clients: list[MeiroClient] = field(default_factory=list)

    @property
    def root_url(self) -> str:
        return self.url.removesuffix("/api/")

    def credentials(self, email: str = MEIRO_EMAIL, password: str = MEIRO_PASSWORD) -> MeiroCredentials:
        return MeiroCredentials(email, password)

    def client(self, email: str = MEIRO_EMAIL, password: str = MEIRO_PASSWORD, **kw: Any) -> MeiroClient:
        """A connector on the shared fake clock (closed at teardown)."""
        kw.setdefault("clock", self.clock)
        kw.setdefault("timeout", 5.0)
        client = MeiroClient(self.url, MeiroCredentials(email, password), **kw)
        self.clients.append(client)
        return client

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Any = None,
        data: bytes | None = None,
        params: Mapping[str, str] | None = None,
    ) -> MeiroReply:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["X-Access-Token"] = token
        payload = data if data is not None else (None if body is None else json.dumps(body).encode())
        async with self.session.request(
            method, self.url + path, data=payload, params=params, headers=headers
        ) as resp:
            raw = await resp.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = None
            return MeiroReply(resp.status, parsed, resp.headers)

    async def login(self, email: str = MEIRO_EMAIL, password: str = MEIRO_PASSWORD) -> str:
        reply = await self.request("POST", "users/login", body={"email": email, "password": password})
        assert reply.status == 200, reply.body
        token: str = reply.body["token"]
        return token

    async def inspect(self, method: str, route: str, **kw: Any) -> MeiroReply:
        async with self.session.request(method, f"{self.root_url}/_sandbox/{route}", **kw) as resp:
            raw = await resp.read()
            return MeiroReply(resp.status, json.loads(raw) if raw.startswith(b"{") else raw, resp.headers)


MeiroFactory = Callable[..., Awaitable[RunningMeiro]]

TEST_USERS = (
    MeiroUser(MEIRO_EMAIL, MEIRO_PASSWORD, id=7),
    MeiroUser(VIEWER_EMAIL, VIEWER_PASSWORD, frozenset({"push_notifications/view"}), id=8),
)


@pytest.fixture
async def meiro_sandbox_factory() -> AsyncIterator[MeiroFactory]:
    """Start Meiro sandboxes (two test users: an analyst with every feature, a viewer without edit)."""
    pool: SandboxPool[RunningMeiro] = SandboxPool()
    started: list[RunningMeiro] = []

    async def start(
        config: MeiroSandboxConfig | None = None, *, clock: FakeClock | None = None, **settings: Any
    ) -> RunningMeiro:
        clock = clock or FakeClock()
        if config is None:
            config = MeiroSandboxConfig.from_mapping({"users": TEST_USERS, **settings})
        sandbox = MeiroSandbox(config, clock=clock, sleep=clock.sleep)
        running = await pool.serve(sandbox, lambda url, session: RunningMeiro(url, sandbox, clock, session))
        started.append(running)
        return running

    yield start
    for running in started:  # the connectors close before the sessions and sandboxes under them
        for client in running.clients:
            await client.aclose()
    await pool.aclose()


@pytest.fixture
async def meiro_sandbox(meiro_sandbox_factory: MeiroFactory) -> RunningMeiro:
    """A Meiro sandbox with the default config and the two test users, on a fake clock."""
    return await meiro_sandbox_factory()
