"""Fixtures of the reliability suite (issue #7).

* ``soak_long``      True under ``--soak-long`` (``make soak``): tests scale up to their long form
* ``figures``        ``figures(name, mapping)`` records measured figures; they are printed in pytest's terminal
                     summary (so ``make soak`` shows them without ``-s``) and, under ``--soak-long``, written to
                     ``bench/out/reliability/<name>.json``
* ``sandbox_http``   small JSON-over-HTTP helpers for a sandbox's ``/_sandbox/`` routes (stats, state, config)

The ``--soak-long`` option itself is registered in ``tests/conftest.py``: pytest parses options before it loads
the conftest files of sub-directories.
"""

from __future__ import annotations

import json
import platform
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
FIGURES_DIR = REPO_ROOT / "bench" / "out" / "reliability"

_FIGURES = pytest.StashKey[list[tuple[str, dict[str, Any]]]]()


@pytest.fixture
def soak_long(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--soak-long"))


@pytest.fixture
def figures(
    request: pytest.FixtureRequest, soak_long: bool
) -> Iterator[Callable[[str, Mapping[str, Any]], None]]:
    recorded = request.config.stash.setdefault(_FIGURES, [])

    def record(name: str, values: Mapping[str, Any]) -> None:
        doc = {"machine": machine(), **values}
        recorded.append((name, doc))
        if soak_long:
            FIGURES_DIR.mkdir(parents=True, exist_ok=True)
            (FIGURES_DIR / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")

    yield record


def machine() -> str:
    import os

    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    recorded = config.stash.get(_FIGURES, [])
    if not recorded:
        return
    terminalreporter.section("reliability figures")
    for name, doc in recorded:
        terminalreporter.write_line(f"{name}: {json.dumps(doc)}")


def http_json(method: str, url: str, body: Any = None, *, timeout: float = 30.0) -> Any:
    """One JSON request with the standard library (the tests drive sandboxes in other processes with it)."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


class SandboxHttp:
    """The ``/_sandbox/`` routes of a sandbox at ``root`` (its URL without ``/rest/3.0/``)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = http_json("GET", f"{self.root}/_sandbox/stats")
        return result

    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = http_json("GET", f"{self.root}/_sandbox/state?format=json", timeout=120)
        return result

    def reset(self) -> None:
        http_json("POST", f"{self.root}/_sandbox/reset?what=all")

    def configure(self, doc: Mapping[str, Any]) -> None:
        http_json("POST", f"{self.root}/_sandbox/config", dict(doc))

    def statuses(self) -> dict[str, int]:
        """HTTP status (or ``dropped``/``hung``) → requests, over every endpoint."""
        out: dict[str, int] = {}
        for per_status in self.stats()["requests"].values():
            for status, n in per_status.items():
                out[status] = out.get(status, 0) + n
        return out


@pytest.fixture
def sandbox_http() -> Callable[[str], SandboxHttp]:
    return SandboxHttp
