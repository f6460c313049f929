"""The fake platform's sandbox (``tests/fake_platform.py``): what a platform's sandbox module gives
``pushsync sandbox`` — a ``SANDBOX_COMMAND`` — and nothing else. Its one endpoint answers ``upsert`` for the key
it was started with."""

from __future__ import annotations

import argparse
from typing import Any

from aiohttp import web

from sync.sandboxes._command import Built, Credential, SandboxCommand

KEY_ENV = "FAKE_SANDBOX_KEY"


class FakeSandbox:
    """A bare aiohttp server: ``POST /upsert`` with ``X-Key`` answers the IDs it got."""

    def __init__(self, key: str) -> None:
        self._key = key
        self._runner: web.AppRunner | None = None

    async def _upsert(self, request: web.Request) -> web.Response:
        if request.headers.get("X-Key") != self._key:
            return web.json_response({"error": "bad key"}, status=401)
        users = (await request.json())["users"]
        return web.json_response({"accepted": [u["id"] for u in users]})

    async def start(self, host: str, port: int) -> str:
        app = web.Application()
        app.router.add_post("/upsert", self._upsert)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        return f"http://{host}:{bound}/"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _build(_args: argparse.Namespace, _data: dict[str, Any], creds: dict[str, str]) -> Built:
    return FakeSandbox(creds["key"]), ["the fake platform's sandbox"]  # type: ignore[return-value]


SANDBOX_COMMAND = SandboxCommand(
    "fake",
    "the fake platform's sandbox",
    _build,
    credentials=(Credential("key", KEY_ENV, "key", "key to accept"),),
)
