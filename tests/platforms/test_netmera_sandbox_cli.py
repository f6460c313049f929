"""``pushsync sandbox netmera`` as a separate process: URL line, key handling, config and seed files, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "sync", "sandbox", "netmera", "--port", "0"]


@pytest.fixture
def bare_process() -> Iterator[Callable[[dict[str, str]], subprocess.Popen[str]]]:
    """Start the command with a given environment and no ``--api-key``; killed at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(env: dict[str, str]) -> subprocess.Popen[str]:
        process = subprocess.Popen(COMMAND, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()


async def test_process_fixture_serves_the_api(netmera_sandbox_process: Any) -> None:
    assert netmera_sandbox_process.url.endswith("/rest/3.0/")
    headers = {"X-netmera-api-key": netmera_sandbox_process.api_key}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            netmera_sandbox_process.url + "tagUsers", json={"tag": "T", "extIds": ["a", "b"]}, headers=headers
        ) as resp:
            assert resp.status == 200
        async with session.get(netmera_sandbox_process.root_url + "/_sandbox/stats") as resp:
            assert (await resp.json())["applied"] == {"tagUsers": 2}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_cleanly(netmera_sandbox_process: Any, sig: signal.Signals) -> None:
    netmera_sandbox_process.process.send_signal(sig)
    assert netmera_sandbox_process.process.wait(timeout=5) == 0


def test_generated_key_is_printed_once_before_the_url(bare_process: Any) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NETMERA_SANDBOX_API_KEY"}
    process = bare_process(env)
    key_line = process.stdout.readline()
    url_line = process.stdout.readline()
    assert key_line.startswith("api key (generated")
    assert url_line.startswith("http://127.0.0.1:") and url_line.strip().endswith("/rest/3.0/")
    key = key_line.rsplit(" ", 1)[1].strip()
    request = urllib.request.Request(url_line.strip() + "getDeviceTokens", headers={"X-netmera-api-key": key})
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 200


def test_key_from_environment(bare_process: Any) -> None:
    process = bare_process({**os.environ, "NETMERA_SANDBOX_API_KEY": "from-env-key-123"})
    url = process.stdout.readline().strip()
    assert url.startswith("http://")  # no key line: the key was given
    request = urllib.request.Request(
        url + "getDeviceTokens", headers={"X-netmera-api-key": "from-env-key-123"}
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert json.loads(resp.read()) == {"total": 0, "devices": []}


async def test_config_and_seed_files(netmera_process_factory: Any, tmp_path: Path) -> None:
    config = tmp_path / "sandbox.yaml"
    config.write_text(
        "limits:\n  tagUsers: {requests: 100, window: 86400}\nfaults:\n  error_503: 0.0\nseed: 3\n"
        "unknown_ext_id: error\n",
        encoding="utf-8",
    )
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"users": [{"extId": "seeded", "tags": ["VIP"]}]}), encoding="utf-8")
    running = netmera_process_factory("--config", str(config), "--seed-file", str(seed))
    headers = {"X-netmera-api-key": running.api_key}
    async with aiohttp.ClientSession() as session:
        async with session.get(running.root_url + "/_sandbox/config") as resp:
            body = await resp.json()
        assert body["limits"] == {"tagUsers": {"requests": 100, "window": 86400.0}} and body["seed"] == 3
        async with session.post(
            running.url + "tagUsers", json={"tag": "T", "extIds": ["seeded", "other"]}, headers=headers
        ) as resp:
            assert resp.status == 400
            assert (await resp.json())["code"] == 5016  # unknown_ext_id: error, from the config file
        async with session.post(
            running.url + "tagUsers", json={"tag": "T", "extIds": ["seeded"]}, headers=headers
        ) as resp:
            assert resp.status == 200
            # a day-long window (wall clock in a subprocess): both requests fall in the same one
            assert resp.headers["X-RateLimit-Remaining"] == "98"  # the refused request counted too


def test_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("faults:\n  error_500: 3\n", encoding="utf-8")
    result = subprocess.run(
        [*COMMAND, "--config", str(config)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2
    assert "bad.yaml" in result.stderr and result.stdout == ""
    # A sandbox's config is no job file: the message says which file it is (it said "in job file").
    assert "problem(s) in sandbox config" in result.stderr and "job file" not in result.stderr


def test_a_port_in_use_exits_2_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [*COMMAND[:-1], str(port)]
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert result.stderr == (
        f"pushsync: error: cannot listen on 127.0.0.1:{port}: port {port} is in use; "
        "give another --port (0: a free one)\n"
    )
    assert result.stdout == ""
