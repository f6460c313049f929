"""What the benchmarks share: a client and a server on cores of their own, the server started and read.

On a machine with two cores or more (and ``taskset``), a benchmark runs its client on the first core and the server
on the last, so that the client's CPU figure is its own and the server never competes with it; on one core both
share it (the figures then say less). The server is the Netmera sandbox in its stateless mode (``pushsync sandbox
netmera --stateless``: every request's shape checked strictly, nothing kept) or ``bench/bare_server.py`` (reads
each body whole, answers ``{}``), started in a process of its own; :func:`sandbox` reads and resets the sandbox's
``/_sandbox`` routes (its statistics).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Literal

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("PUSHSYNC_BENCH_DATA") or HERE / "data")
"""Where generated inputs are kept between runs (never committed); ``PUSHSYNC_BENCH_DATA`` moves it."""

Server = Literal["stateless", "bare"]


def cores() -> tuple[str | None, str | None]:
    """(client core, server core) for ``taskset``, or (None, None) on a machine without it or with one core."""
    n = os.cpu_count() or 1
    if n < 2 or shutil.which("taskset") is None:
        return None, None
    return "0", str(n - 1)


def pinned(core: str | None, command: list[str]) -> list[str]:
    """``command`` run on ``core`` (through ``taskset``), or as it is when ``core`` is None."""
    return ["taskset", "-c", core, *command] if core is not None else command


def pin_self(core: str | None) -> None:
    """Pin this process to ``core`` (None, or a system without affinity: left as it is)."""
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(core)})


def start_server(
    key: str,
    workdir: Path,
    *,
    kind: Server = "stateless",
    core: str | None = None,
    record: Path | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """Start the server (see the module docstring) on ``core``; returns the process and its base URL (the
    Netmera API root, ``…/rest/3.0/``). ``key`` is the API key the sandbox accepts (the bare server takes any).
    ``record`` (bare server only): the file it appends every request to (``bare_server.py --record``)."""
    if kind == "stateless":
        assert record is None, "only the bare server records requests"
        command = [sys.executable, "-m", "sync", "sandbox", "netmera", "--port", "0", "--stateless"]
    else:
        command = [sys.executable, str(HERE / "bare_server.py"), "--port", "0"]
        if record is not None:
            command += ["--record", str(record)]
    process = subprocess.Popen(
        pinned(core, command),
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "NETMERA_SANDBOX_API_KEY": key},
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("http://"):
            return process, line.strip()
    process.kill()
    raise SystemExit(f"the {kind} server did not start")


def stop_server(process: subprocess.Popen[str]) -> None:
    """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def sandbox(url: str, route: str, method: str = "GET", timeout: float = 30) -> dict[str, object]:
    """The JSON answer of the sandbox's ``/_sandbox/<route>`` (``url``: its API root or its own root)."""
    root = url.removesuffix("/").removesuffix("/rest/3.0")
    request = urllib.request.Request(
        f"{root}/_sandbox/{route}", method=method, data=b"" if method == "POST" else None
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        body: dict[str, object] = json.loads(resp.read())
    return body


def process_cpu(pid: int) -> float:
    """User+sys CPU seconds of process ``pid`` so far (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
