"""A throwaway PostgreSQL server for the tests: one per test session, a fresh database per test.

* ``postgres_server``  (session) the running server: :class:`PostgresServer`; ``new_database()`` makes a database
                       owned by a password-protected role and returns its URL; ``sql(url, text)`` runs SQL with psql
* ``postgres_url``     (function) a URL for a fresh database of its own: ``postgresql://pushsync:PASSWORD@127.0.0.1:PORT/db_N``

The server runs from the PostgreSQL binaries on PATH or under /usr/lib/postgresql/<version>/bin, in a temporary
directory, on a free loopback port, as the ``postgres`` user when the tests run as root (``initdb`` refuses root).
Without PostgreSQL binaries the tests that use it are skipped — except under ``CI=true``, where they fail: CI
installs PostgreSQL (``.ci/run``) and must run them. Import the fixtures into a conftest (tests/conftest.py does).
"""

from __future__ import annotations

import glob
import itertools
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "find_postgres_bin", "postgres_server", "postgres_url"]

ROLE = "pushsync"
"""The password-protected role every test database belongs to (not a superuser)."""


def find_postgres_bin() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``psql``: PATH first, then Debian's versioned folders."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        folder = Path(on_path).resolve().parent
        if (folder / "psql").exists():
            return folder
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]), reverse=True
    )
    return Path(versions[0]).parent if versions else None


def _ephemeral_start() -> int:
    """The lowest port the kernel hands out to outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port() -> int:
    """A free loopback port below the ephemeral range. A port the kernel picks (bind to 0) is an ephemeral one:
    while the server is down for a restart, an outgoing connection of any process may be given it, and the
    server cannot listen on it again until that connection ends (CI once lost its server so, mid-suite)."""
    top = max(_ephemeral_start(), 10_001)
    for _ in range(200):
        port = secrets.randbelow(top - 10_000) + 10_000
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        found: int = sock.getsockname()[1]
        return found


@dataclass
class PostgresServer:
    """A running throwaway server. ``admin_password`` is the ``postgres`` superuser's, ``password`` the role's."""

    bin_dir: Path
    data_dir: Path
    port: int
    password: str
    admin_password: str
    run_as: list[str]
    options: str = ""
    """The ``postgres`` options it was started with (port, socket folder, settings): a restart keeps them."""
    log: Path = Path("/dev/null")
    _counter: Iterator[int] = field(default_factory=itertools.count)

    def url(self, database: str, *, user: str = ROLE, password: str | None = None) -> str:
        """A URL for ``database`` (as the test role unless ``user`` says otherwise)."""
        secret = (
            password if password is not None else (self.password if user == ROLE else self.admin_password)
        )
        return f"postgresql://{user}:{secret}@127.0.0.1:{self.port}/{database}"

    def admin_url(self, database: str = "postgres") -> str:
        """A superuser URL (to terminate backends, inspect pg_stat_activity...)."""
        return self.url(database, user="postgres")

    def sql(self, url: str, text: str) -> str:
        """Run SQL (several statements allowed) with psql against ``url``; returns psql's unaligned output."""
        done = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                text,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout

    def new_database(self) -> str:
        """Create an empty database owned by the test role; returns the role's URL for it."""
        name = f"db_{next(self._counter)}"
        self.sql(self.admin_url(), f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url(name)

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: at once, as a crash; ``fast``: ending the sessions cleanly). A fast
        stop that does not finish becomes an immediate one."""
        if self._pg_ctl("-m", mode, "-w", "stop") != 0 and mode != "immediate":
            self._pg_ctl("-m", "immediate", "-w", "stop")

    def start(self) -> None:
        """Start it again after :meth:`stop`, on the same port; tried again for up to ~20 s (the port may still
        be held a moment), then RuntimeError with the end of the server's log — never a silent failure that
        every later test would meet as "connection refused"."""
        for _attempt in range(40):
            if self._pg_ctl("-o", self.options, "-l", str(self.log), "-w", "start") == 0:
                return
            time.sleep(0.5)
        tail = self.log.read_text(encoding="utf-8", errors="replace")[-2000:] if self.log.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start again: {tail}")

    def restart(self) -> None:
        """Restart it (every session ends, as when an administrator restarts PostgreSQL): a fast stop, then
        :meth:`start`."""
        self.stop("fast")
        self.start()

    def _pg_ctl(self, *args: str) -> int:
        # The server's output goes to its log file: not a pipe of ours, which a server started here would
        # keep open after pg_ctl returned.
        return subprocess.run(
            [*self.run_as, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
            check=False,
        ).returncode


def start_postgres(bin_dir: Path) -> tuple[PostgresServer, Path]:
    """Start a server in a new temporary directory; returns it and the directory (remove it after stopping)."""
    root = Path(tempfile.mkdtemp(prefix="pushsync-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        # initdb and postgres refuse to run as root: run them as the postgres user, who must own the folder.
        shutil.chown(root, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    admin_password, password = secrets.token_hex(12), secrets.token_hex(12)
    pwfile = root / "pw"
    pwfile.write_text(admin_password + "\n", encoding="utf-8")
    if run_as:
        shutil.chown(pwfile, "postgres")
    data = root / "data"
    subprocess.run(
        [
            *run_as,
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    for _attempt in range(5):
        port = _free_port()
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        started = subprocess.run(
            [
                *run_as,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(root / "log"),
                "-w",
                "start",
            ],
            capture_output=True,
            timeout=120,
            check=False,
        )
        if started.returncode == 0:
            break
    else:
        log = (root / "log").read_text(encoding="utf-8", errors="replace") if (root / "log").exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {log[-2000:]}")
    server = PostgresServer(bin_dir, data, port, password, admin_password, run_as, options, root / "log")
    server.sql(server.admin_url(), f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'")
    return server, root


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (see the module docstring)."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("CI is set but no PostgreSQL binaries were found (.ci/run installs them)")
        pytest.skip("no PostgreSQL binaries (initdb) on this machine; CI installs them")
    server, root = start_postgres(bin_dir)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh, empty database of this test's own (owned by the password-protected test role)."""
    return postgres_server.new_database()
