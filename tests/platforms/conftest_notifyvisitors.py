"""NotifyVisitors fixtures (imported by ``tests/platforms/conftest.py``): a real local sandbox on a free port.

* ``nv_sandbox_factory``  ``await factory(config=None, *, clock=None, **settings)`` → :class:`RunningNotifyVisitors`
* ``nv_sandbox``          the default sandbox (documented rate limits on, no faults)
* ``nv_choosy_factory``   the same factory for :class:`ChoosyNotifyVisitors`: the sandbox with one refusal more, of a
                          value pushsync's plan cannot know is bad (the dispatcher's isolation of refused items)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from sandbox_fixtures import in_process_sandboxes

from sync.config import Destination
from sync.platforms.notifyvisitors.client import NotifyVisitorsClient
from sync.sandboxes._core import ApiError
from sync.sandboxes.notifyvisitors import NotifyVisitorsSandbox, NotifyVisitorsSandboxConfig

NV_API_KEY = "nv-test-api-key-0123456789"
NV_BRAND_ID = "4242"
NV_TOKEN = "nv-test-bearer-token-9876543210"


@dataclass(frozen=True, slots=True)
class NvReply:
    """Status, parsed JSON body (None when not JSON) and headers of one answer."""

    status: int
    body: Any
    headers: Mapping[str, str]

    @property
    def envelope(self) -> dict[str, Any]:
        response: dict[str, Any] = self.body["response"]
        return response


@dataclass(frozen=True, slots=True)
class RunningNotifyVisitors:
    """An in-process sandbox: ``url`` ends in ``/api/v1/``; ``post`` signs requests in either auth mode."""

    url: str
    sandbox: NotifyVisitorsSandbox
    session: aiohttp.ClientSession

    @property
    def root_url(self) -> str:
        return self.url.removesuffix("/api/v1/")

    def auth_headers(self, mode: str = "api_key") -> dict[str, str]:
        if mode == "bearer":
            return {"Authorization": f"Bearer {NV_TOKEN}"}
        if mode == "none":
            return {}
        return {"x-api-key": NV_API_KEY, "x-brand-id": NV_BRAND_ID}

    async def request(
        self,
        method: str,
        url: str,
        *,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> NvReply:
        async with self.session.request(method, url, data=data, headers=dict(headers or {})) as resp:
            raw = await resp.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = None
            return NvReply(resp.status, parsed, resp.headers)

    async def post(
        self,
        endpoint: str,
        body: Any = None,
        *,
        auth: str = "api_key",
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> NvReply:
        sent = {"Content-Type": "application/json", **self.auth_headers(auth), **(headers or {})}
        payload = data if data is not None else json.dumps(body)
        return await self.request("POST", self.url + endpoint, data=payload, headers=sent)

    async def inspect(self, method: str, route: str, body: Any = None) -> NvReply:
        data = None if body is None else json.dumps(body)
        return await self.request(method, f"{self.root_url}/_sandbox/{route}", data=data)

    def destination(self, **extra: str) -> Destination:
        """A destination aimed at this sandbox (api-key mode with the test brand unless ``extra`` says)."""
        return Destination(
            platform="notifyvisitors",
            base_url=self.url,
            verify_tls=False,
            extra={"brand_id": NV_BRAND_ID, **extra},
        )

    def client(self, *, auth: str = "api_key", timeout: float = 5.0) -> NotifyVisitorsClient:
        secret = NV_TOKEN if auth == "bearer" else NV_API_KEY
        return NotifyVisitorsClient(self.destination(auth=auth), secret, timeout=timeout)


NvFactory = Callable[..., Awaitable[RunningNotifyVisitors]]

BLOCKED = "blocked-by-the-platform"
"""A value :class:`ChoosyNotifyVisitors` refuses wherever it is: valid by every documented rule."""


class ChoosyNotifyVisitors(NotifyVisitorsSandbox):
    """The sandbox with one rule of the platform's own that no document states: an item holding the value
    :data:`BLOCKED` (a user's attribute or an event's) refuses its request, as any documented rule does. The plan
    cannot find such a value, so this is how a test makes the platform refuse one item of a batch."""

    def _user_create(self, body: Any) -> dict[str, Any]:
        self._refuse_blocked(body, "user_attributes")
        return super()._user_create(body)

    def _event_create(self, body: Any) -> dict[str, Any]:
        self._refuse_blocked(body, "attributes")
        return super()._event_create(body)

    @staticmethod
    def _refuse_blocked(body: Any, field: str) -> None:
        # A malformed body gets the sandbox's own answer.
        items = body.get("nv") if isinstance(body, dict) else None
        for i, item in enumerate(items if isinstance(items, list) else ()):
            attributes = item.get(field) if isinstance(item, dict) else None
            if isinstance(attributes, dict) and BLOCKED in attributes.values():
                raise ApiError(400, 400, f"invalid resource: nv[{i}].{field}: blocked")


def _wrap(
    url: str, _config: Any, sandbox: NotifyVisitorsSandbox, session: aiohttp.ClientSession
) -> RunningNotifyVisitors:
    return RunningNotifyVisitors(url=url, sandbox=sandbox, session=session)


_DEFAULTS = {"api_key": NV_API_KEY, "brand_id": NV_BRAND_ID, "bearer_token": NV_TOKEN}


@pytest.fixture
async def nv_sandbox_factory() -> AsyncIterator[NvFactory]:
    """``await factory(config=None, *, clock=None, sleep=None, **settings)`` starts a sandbox on a free port;
    all are stopped (and their sessions closed) at teardown."""
    async with in_process_sandboxes(
        NotifyVisitorsSandbox, NotifyVisitorsSandboxConfig, _DEFAULTS, _wrap
    ) as start:
        yield start


@pytest.fixture
async def nv_choosy_factory() -> AsyncIterator[NvFactory]:
    """:func:`nv_sandbox_factory` for :class:`ChoosyNotifyVisitors`."""
    async with in_process_sandboxes(
        ChoosyNotifyVisitors, NotifyVisitorsSandboxConfig, _DEFAULTS, _wrap
    ) as start:
        yield start


@pytest.fixture
async def nv_sandbox(nv_sandbox_factory: NvFactory) -> RunningNotifyVisitors:
    """A sandbox with the default config (documented limits on)."""
    return await nv_sandbox_factory()
