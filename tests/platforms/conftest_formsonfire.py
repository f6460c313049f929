"""Forms On Fire fixtures (imported by ``tests/platforms/conftest.py``): a real local sandbox on a free port.

* ``fof_sandbox_factory``  ``await factory(config=None, *, clock=None, **settings)`` → :class:`RunningFormsOnFire`
* ``fof_sandbox``          the default sandbox, seeded with :data:`FOF_USERS` (so unknown users are refused)
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from sandbox_fixtures import in_process_sandboxes

from sync.config import Destination
from sync.platforms.formsonfire.client import FormsOnFireClient
from sync.sandboxes.formsonfire import FormsOnFireSandbox, FormsOnFireSandboxConfig

FOF_KEY = "fof-test-integration-key-0123456789"
FOF_COMPANY = 777
FOF_USERS = (
    {"UserId": "api-1", "UserEmail": "ada@example.test", "UserExternalId": "crm-1"},
    {"UserId": "api-2", "UserEmail": "bob@example.test", "UserExternalId": "crm-2"},
    {"UserId": "api-3", "UserEmail": "cy@example.test", "UserExternalId": "crm-3"},
)


@dataclass(frozen=True, slots=True)
class FofReply:
    """Status, content type, raw body and headers; ``json``/``xml`` parse it."""

    status: int
    content_type: str
    raw: bytes
    headers: Mapping[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def xml(self) -> ET.Element:
        return ET.fromstring(self.raw)

    @property
    def error_code(self) -> str | None:
        """``ResponseStatus.ErrorCode`` in either format, or None."""
        if self.content_type == "application/json":
            status = self.json.get("ResponseStatus") or {}
            return status.get("ErrorCode")
        found = self.xml.find("ResponseStatus/ErrorCode")
        return found.text if found is not None else None


@dataclass(frozen=True, slots=True)
class RunningFormsOnFire:
    """An in-process sandbox: ``url`` ends in ``/api/v2/``."""

    url: str
    sandbox: FormsOnFireSandbox
    session: aiohttp.ClientSession

    @property
    def root_url(self) -> str:
        return self.url.removesuffix("/api/v2/")

    async def request(
        self,
        method: str,
        url: str,
        *,
        data: bytes | str | None = None,
        content_type: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> FofReply:
        headers = {"Content-Type": content_type} if content_type else {}
        # skip_auto_headers: without it aiohttp would add a Content-Type of its own to a body without one.
        async with self.session.request(
            method, url, data=data, headers=headers, params=params, skip_auto_headers=("Content-Type",)
        ) as resp:
            return FofReply(resp.status, resp.content_type, await resp.read(), resp.headers)

    async def push(
        self,
        data: bytes | str | Mapping[str, Any],
        *,
        content_type: str | None = "application/json",
        format: str | None = "json",
    ) -> FofReply:
        payload = json.dumps(data) if isinstance(data, Mapping) else data
        params = {"format": format} if format is not None else None
        return await self.request(
            "POST", self.url + "push", data=payload, content_type=content_type, params=params
        )

    async def inspect(self, method: str, route: str, body: Any = None) -> FofReply:
        data = None if body is None else json.dumps(body)
        return await self.request(method, f"{self.root_url}/_sandbox/{route}", data=data)

    def destination(self, **extra: str) -> Destination:
        return Destination(
            platform="formsonfire",
            base_url=self.url,
            verify_tls=False,
            extra={"company_id": str(FOF_COMPANY), **extra},
        )

    def client(self, *, body_format: str = "json", timeout: float = 5.0, **extra: str) -> FormsOnFireClient:
        return FormsOnFireClient(self.destination(body_format=body_format, **extra), FOF_KEY, timeout=timeout)


FofFactory = Callable[..., Awaitable[RunningFormsOnFire]]


def credentials(**fields: Any) -> dict[str, Any]:
    """A JSON push body with the test credentials and ``fields``."""
    return {"CompanyId": FOF_COMPANY, "IntegrationKey": FOF_KEY, **fields}


@pytest.fixture
async def fof_sandbox_factory() -> AsyncIterator[FofFactory]:
    """``await factory(config=None, *, clock=None, sleep=None, **settings)``; the test credentials and
    :data:`FOF_USERS` are the defaults (``users=()`` for none)."""
    defaults = {"integration_key": FOF_KEY, "company_id": FOF_COMPANY, "users": list(FOF_USERS)}

    def wrap(
        url: str, _config: Any, sandbox: FormsOnFireSandbox, session: aiohttp.ClientSession
    ) -> RunningFormsOnFire:
        return RunningFormsOnFire(url=url, sandbox=sandbox, session=session)

    async with in_process_sandboxes(FormsOnFireSandbox, FormsOnFireSandboxConfig, defaults, wrap) as start:
        yield start


@pytest.fixture
async def fof_sandbox(fof_sandbox_factory: FofFactory) -> RunningFormsOnFire:
    """The default sandbox: test credentials, three known users, no limits, no faults."""
    return await fof_sandbox_factory()
