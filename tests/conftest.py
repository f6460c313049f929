"""Shared fixtures. Sandboxes are real local aiohttp servers: tests talk HTTP to them, never to mocks.

* ``netmera_sandbox``          a Netmera sandbox in-process on a free port (default config)
* ``netmera_sandbox_factory``  start in-process sandboxes with a custom :class:`NetmeraSandboxConfig`
* ``netmera_sandbox_process``  a sandbox in a separate process (``python -m sync sandbox netmera --port 0``),
                               for tests that kill it (kill -9) or must not share the event loop
* ``netmera_process_factory``  start such processes with extra CLI arguments (``--config``, ``--seed-file``)
* ``postgres_server``          a throwaway PostgreSQL server for the session (tests/pg_fixture.py)
* ``postgres_url``             the URL of a fresh database on it, owned by a password-protected role
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from pg_fixture import postgres_server as postgres_server  # a throwaway PostgreSQL server (session)
from pg_fixture import postgres_url as postgres_url  # a fresh database of the test's own on it
from sandbox_fixtures import REPO_ROOT as REPO_ROOT  # re-exported: test_crash_resume imports it from here
from sandbox_fixtures import in_process_sandboxes, start_sandbox_process, stop_sandbox_process

from sync.platforms.sandboxes.netmera import NetmeraSandbox, NetmeraSandboxConfig


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """structlog's configuration is process-global: a CLI test that configures it (level, output stream) must not
    change what the next test logs or captures."""
    import structlog

    yield
    structlog.reset_defaults()


SANDBOX_TEST_KEY = "test-netmera-key-0123456789"


@dataclass(frozen=True, slots=True)
class Reply:
    """What a sandbox answered: status, parsed JSON body (None when empty or not JSON), headers."""

    status: int
    body: Any
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RunningNetmera:
    """An in-process Netmera sandbox: ``url`` ends in ``/rest/3.0/``; ``sandbox`` to configure and inspect.

    ``post``/``get`` call it with the right headers over one shared client session (closed at teardown)."""

    url: str
    api_key: str
    sandbox: NetmeraSandbox
    session: aiohttp.ClientSession

    @property
    def root_url(self) -> str:
        """Where ``/_sandbox/`` lives (the URL without ``/rest/3.0/``)."""
        return self.url.removesuffix("/rest/3.0/")

    @property
    def headers(self) -> dict[str, str]:
        return {"X-netmera-api-key": self.api_key, "Content-Type": "application/json"}

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        data: bytes | str | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        payload = data if data is not None else (None if body is None else json.dumps(body))
        sent_headers = dict(self.headers if headers is None else headers)
        async with self.session.request(
            method, url, data=payload, params=params, headers=sent_headers
        ) as resp:
            raw = await resp.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = None
            return Reply(resp.status, parsed, resp.headers)

    async def post(self, endpoint: str, body: Any = None, **kwargs: Any) -> Reply:
        return await self.request("POST", self.url + endpoint, body=body, **kwargs)

    async def get(self, endpoint: str, params: Mapping[str, str] | None = None, **kwargs: Any) -> Reply:
        return await self.request("GET", self.url + endpoint, params=params, **kwargs)

    async def inspect(self, method: str, route: str, **kwargs: Any) -> Reply:
        """Call an inspection route (``stats``, ``state``, ``reset``, ``config``) under ``/_sandbox/``."""
        return await self.request(method, f"{self.root_url}/_sandbox/{route}", headers={}, **kwargs)


NetmeraFactory = Callable[..., Awaitable[RunningNetmera]]


@pytest.fixture
async def netmera_sandbox_factory() -> AsyncIterator[NetmeraFactory]:
    """``await factory(config=None, *, clock=..., sleep=..., **config_fields)`` starts a sandbox on a free port;
    every one started is stopped (and its client session closed) at teardown."""
    defaults = {"api_key": SANDBOX_TEST_KEY}

    def wrap(
        url: str, config: NetmeraSandboxConfig, sandbox: NetmeraSandbox, session: aiohttp.ClientSession
    ) -> RunningNetmera:
        return RunningNetmera(url=url, api_key=config.api_key, sandbox=sandbox, session=session)

    async with in_process_sandboxes(NetmeraSandbox, NetmeraSandboxConfig, defaults, wrap) as start:
        yield start


@pytest.fixture
async def netmera_sandbox(netmera_sandbox_factory: NetmeraFactory) -> RunningNetmera:
    """A Netmera sandbox with the default config, in-process on a free port."""
    return await netmera_sandbox_factory()


@dataclass(frozen=True, slots=True)
class NetmeraProcess:
    """A sandbox running as a child process (``process`` can be killed; teardown cleans up either way)."""

    url: str
    api_key: str
    process: subprocess.Popen[str]

    @property
    def root_url(self) -> str:
        return self.url.removesuffix("/rest/3.0/")


def start_netmera_process(
    *extra_args: str, api_key: str = SANDBOX_TEST_KEY, timeout: float = 20.0
) -> NetmeraProcess:
    """Start ``python -m sync sandbox netmera --port 0`` and wait for the line with its URL."""
    process, url = start_sandbox_process("netmera", "--api-key", api_key, *extra_args, timeout=timeout)
    return NetmeraProcess(url=url, api_key=api_key, process=process)


@pytest.fixture
def netmera_process_factory() -> Iterator[Callable[..., NetmeraProcess]]:
    """``factory(*extra_cli_args, api_key=...)`` starts sandbox processes; all are stopped at teardown."""
    started: list[NetmeraProcess] = []

    def start(*extra_args: str, api_key: str = SANDBOX_TEST_KEY) -> NetmeraProcess:
        running = start_netmera_process(*extra_args, api_key=api_key)
        started.append(running)
        return running

    yield start
    for running in started:
        stop_sandbox_process(running.process)


@pytest.fixture
def netmera_sandbox_process(netmera_process_factory: Callable[..., NetmeraProcess]) -> NetmeraProcess:
    """A Netmera sandbox in a separate process; ``.url``, ``.api_key``, ``.process`` (e.g. to kill -9 it)."""
    return netmera_process_factory()


# --- the reliability suite's long form (tests/reliability/; `make soak`) ---------------------------------------
# pytest_addoption must live in the root conftest: options are parsed before sub-directory conftests load.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-long",
        action="store_true",
        default=False,
        help="run the reliability suite's long form (>= 100k users with every fault on; `make soak`)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: reliability soak tests (short in CI, long with --soak-long)")
