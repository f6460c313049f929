"""Start and stop the platform sandboxes for the fixtures, so each platform's conftest only says what is its own.

* :func:`in_process_sandboxes`  the body of every ``<platform>_sandbox_factory``: a ``start`` that builds a
                                sandbox from a config (or defaults + settings), serves it on a free port and
                                stops it (and its client session) at teardown
* :class:`SandboxPool`          the lower level: serve an already built sandbox; used where ``start`` differs
* :func:`start_sandbox_process` ``python -m sync sandbox <platform> --port 0 ...`` as a child process
* :func:`stop_sandbox_process`  SIGTERM it (SIGKILL after 5 s)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent

R = TypeVar("R")


class Sandbox(Protocol):
    """What every in-process sandbox offers: serve on ``host:port`` (returns the base URL), stop."""

    async def start(self, host: str, port: int) -> str: ...

    async def stop(self) -> None: ...


class SandboxPool(Generic[R]):
    """In-process sandboxes served on free ports; :meth:`aclose` stops them all (sessions first)."""

    def __init__(self) -> None:
        self._started: list[tuple[Sandbox, aiohttp.ClientSession]] = []

    async def serve(self, sandbox: Sandbox, wrap: Callable[[str, aiohttp.ClientSession], R]) -> R:
        """Serve ``sandbox`` on ``127.0.0.1:0``; returns ``wrap(url, session)`` (a fresh client session)."""
        url = await sandbox.start("127.0.0.1", 0)
        session = aiohttp.ClientSession()
        self._started.append((sandbox, session))
        return wrap(url, session)

    async def aclose(self) -> None:
        for sandbox, session in self._started:
            await session.close()
            await sandbox.stop()


@asynccontextmanager
async def in_process_sandboxes(
    sandbox_type: Callable[..., Sandbox],
    config_type: Any,
    defaults: Mapping[str, Any],
    wrap: Callable[[str, Any, Any, aiohttp.ClientSession], R],
) -> AsyncIterator[Callable[..., Awaitable[R]]]:
    """Yield ``await start(config=None, *, clock=None, sleep=None, **settings)``.

    Without ``config``, ``config_type.from_mapping({**defaults, **settings})`` is used; ``clock``/``sleep`` go to
    the sandbox only when given (each sandbox has its own defaults). ``wrap(url, config, sandbox, session)``
    makes what ``start`` returns. Every sandbox started is stopped when the context exits."""
    pool: SandboxPool[R] = SandboxPool()

    async def start(
        config: Any = None,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        **settings: Any,
    ) -> R:
        if config is None:
            config = config_type.from_mapping({**defaults, **settings})
        extra: dict[str, Any] = {}
        if clock is not None:
            extra["clock"] = clock
        if sleep is not None:
            extra["sleep"] = sleep
        sandbox = sandbox_type(config, **extra)
        return await pool.serve(sandbox, lambda url, session: wrap(url, config, sandbox, session))

    try:
        yield start
    finally:
        await pool.aclose()


def start_sandbox_process(
    platform: str, *args: str, timeout: float = 20.0
) -> tuple[subprocess.Popen[str], str]:
    """``python -m sync sandbox <platform> --port 0 ...`` as a child process; returns it and its base URL (the
    first stdout line starting with ``http://``). The caller stops it (:func:`stop_sandbox_process`)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sync", "sandbox", platform, "--port", "0", *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()  # a key notice (if the key was generated) may come first
        if not line:
            break
        line = line.strip()
        if line.startswith("http://"):
            return process, line
    process.kill()
    process.wait()
    raise RuntimeError(f"the {platform} sandbox did not print its URL")


def stop_sandbox_process(process: subprocess.Popen[str]) -> int:
    """SIGTERM and wait (SIGKILL after 5 s); returns the exit code. A process already gone (a test killed it)
    is only reaped."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
    code = process.wait()
    if process.stdout is not None:
        process.stdout.close()
    return code
