"""The package's import graph: no cycles, and the layers point one way (docs/layout.md).

Every ``import`` statement counts, including those inside functions: a late import hides a cycle from Python,
not from the design.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "sync"


def _fresh_python(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``script`` run by a new interpreter from the repository (what it imports is what a fresh process does),
    with ``env`` added to the environment."""
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT.parent,
        env={**os.environ, **(env or {})},
    )


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path) -> Iterator[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


GRAPH: dict[str, set[str]] = {name: set(_imports(name, path)) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    """A cycle of the graph, ignoring edges to the root package ``sync`` (whose ``__init__`` is the public face
    and loads the platform registry; nothing below it imports it for structure)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node] - {"sync"}):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read() -> None:
    assert (
        "sync.platforms.netmera.requests" in GRAPH["sync.planning.planning"]
        or "sync.platforms.registry" in (GRAPH["sync.planning.planning"])
    )
    assert "sync.config" in GRAPH["sync.platforms.base"]


def test_no_import_cycle() -> None:
    assert _cycle() is None, " → ".join(_cycle() or [])


def _importers_of(prefix: str) -> dict[str, set[str]]:
    return {
        m: {t for t in targets if t == prefix or t.startswith(prefix + ".")} for m, targets in GRAPH.items()
    }


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("sync.config")))
def test_configuration_imports_no_platform(module: str) -> None:
    assert not {t for t in GRAPH[module] if t.startswith("sync.platforms")}


def test_only_the_cli_and_the_sandboxes_import_the_sandboxes() -> None:
    sandboxes = next(m for m in MODULES if m.endswith(".sandboxes"))
    offenders = {
        m
        for m, targets in _importers_of(sandboxes).items()
        if targets and not m.startswith((sandboxes, "sync.cli", "sync.demo"))
    }
    assert not offenders


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("sync.state")))
def test_snapshot_state_knows_no_platform_package(module: str) -> None:
    # Snapshot runs reach a platform through the Platform object and its builder (issue 12): only the seam
    # (sync.platforms.base) and the registry, never a platform's own package.
    reached = {t for t in GRAPH[module] if t.startswith("sync.platforms")}
    assert reached <= {"sync.platforms", "sync.platforms.base", "sync.platforms.registry"}, reached


def test_starting_a_run_loads_no_connector_until_it_is_preloaded() -> None:
    """The command line, the run module and a loaded job import no HTTP library (start-up stays short); a run
    preloads its platform's connector in a background thread while it reads the input (issue 13). So with the
    dispatcher (sync.dispatch), which a run needs only once its plan's head is ready: the run module does not
    import it, the preload does, after the connector."""

    job = Path(__file__).resolve().parent / "fixtures" / "all_ops.yaml"
    script = (
        "import sys\n"
        "import sync.cli, sync.cli.run_cmd, sync.cli.plan_cmd, sync.run\n"
        "from sync.config import load_job\n"
        "from sync.platforms.registry import preload_client\n"
        f"job = load_job({str(job)!r})\n"
        "before = ['aiohttp' in sys.modules, any(m.startswith('sync.dispatch.') for m in sys.modules)]\n"
        "thread = preload_client(job, then=(sync.run._DISPATCH,))\n"
        "assert thread is not None\n"
        "thread.join(60)\n"
        "print(*before, 'aiohttp' in sys.modules, 'sync.platforms.netmera.client' in sys.modules,"
        " 'sync.dispatch.dispatch' in sys.modules)\n"
    )
    done = _fresh_python(script)
    assert done.stdout.split() == ["False", "False", "True", "True", "True"], done.stderr


def test_a_lazy_run_makes_its_first_batches_without_importing_pyarrow_compute(tmp_path: Path) -> None:
    """Reading a CSV head and cutting the first batches call Arrow kernels by name (sync/_arrow.py): importing
    pyarrow.compute builds ~80 ms of wrappers on the way to the first request (issue 13)."""
    import shutil

    fixtures = Path(__file__).resolve().parent / "fixtures"
    for name in ("all_ops.yaml", "users.csv", "tags.csv", "events.csv", "deletions.csv"):
        shutil.copy(fixtures / name, tmp_path / name)
    job = tmp_path / "all_ops.yaml"
    script = (
        "import sys\n"
        "from sync.config import load_job\n"
        "from sync.planning.planning import build_plan\n"
        "from sync.records import Phase\n"
        f"job = load_job({str(job)!r})\n"
        "made = 0\n"
        "with build_plan(job, lazy=True) as plan:\n"
        "    for phase in Phase:\n"
        "        for _endpoint, batches in plan.lanes(phase):\n"
        "            made += next(batches, None) is not None\n"
        "print(made > 0, 'pyarrow.compute' in sys.modules)\n"
    )
    done = _fresh_python(script)
    assert done.stdout.split() == ["True", "False"], done.stderr


def test_a_job_loads_only_the_platform_it_names() -> None:
    """The registry imports a platform when a job names it (issue 13: start-up): a Netmera run does not load
    Forms On Fire's XML or NotifyVisitors' request shapes; a job naming no known platform still hears every name,
    and the commands that list the platforms still find each."""

    job = Path(__file__).resolve().parent / "fixtures" / "all_ops.yaml"
    script = (
        "import sys\n"
        "import sync.cli, sync.run\n"
        "from sync.config import load_job\n"
        "from sync.platforms.registry import REGISTRY, platform_for\n"
        "def loaded():\n"
        "    return sorted({m.split('.')[2] for m in sys.modules if m.count('.') >= 2 and m.startswith('sync.platforms.')"
        " and m.split('.')[2] in REGISTRY.names()})\n"
        "print(loaded())\n"
        f"platform_for(load_job({str(job)!r}))\n"
        "print(loaded(), 'xml.sax.saxutils' in sys.modules)\n"
        "print([REGISTRY[name].name for name in REGISTRY.names()], loaded())\n"
    )
    done = _fresh_python(script)
    assert done.stdout.splitlines() == [
        "[]",
        "['netmera'] False",
        "['netmera', 'notifyvisitors', 'formsonfire'] ['formsonfire', 'netmera', 'notifyvisitors']",
    ], done.stderr


def test_logging_loads_no_rich_and_still_renders_tracebacks() -> None:
    """structlog would import rich (~55 ms of start-up) for tracebacks our processors already turned into text:
    a run's imports leave it out, a logged exception still shows its traceback on the console, and rich still
    loads for the progress bar."""

    script = (
        "import sys\n"
        "import sync.cli, sync.run\n"
        "from sync.logs import configure_logging, get_logger\n"
        "print('rich' in sys.modules)\n"
        "configure_logging('info', json=False)\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    get_logger(job='j').exception('run.failed')\n"
        "from rich.progress import Progress\n"
        "print(Progress.__name__)\n"
    )
    done = _fresh_python(script)
    assert done.stdout.split() == ["False", "Progress"], done.stderr
    assert "run.failed" in done.stderr and "ZeroDivisionError: division by zero" in done.stderr
    assert "Traceback (most recent call last)" in done.stderr


def test_a_command_that_needs_one_module_builds_its_parser_alone() -> None:
    """``pushsync run``/``plan``/``validate`` build their own parsers only (not ``init``'s and ``sandbox``'s,
    which load every platform): the same parsers, the same help; other command lines get the whole parser."""
    import argparse

    import sync.cli

    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return dict(action.choices)

    every = subcommands(sync.cli.build_parser())
    for command in sync.cli._ALONE:
        alone = subcommands(sync.cli.build_parser(command))
        assert command in alone and set(alone) < set(every)
        assert alone[command].format_help() == every[command].format_help()
    assert sync.cli._command(["--log-level", "debug", "--log-json", "run", "job.yaml"]) == "run"
    assert sync.cli._command(["--log-level=info", "plan"]) == "plan"
    assert sync.cli._command(["--help", "run"]) is None and sync.cli._command([]) is None

    job = Path(__file__).resolve().parent / "fixtures" / "all_ops.yaml"
    script = (
        "import sys\n"
        "from sync.cli import main\n"
        f"code = main(['validate', {str(job)!r}])\n"
        "print(code, sorted(m for m in sys.modules if m.startswith(('sync.platforms.formsonfire', "
        "'sync.platforms.notifyvisitors', 'sync.sandboxes'))))\n"
    )
    done = _fresh_python(script)
    assert done.stdout.split("\n")[-2] == "0 []", (done.stdout, done.stderr)


def test_a_run_loads_its_job_without_the_modules_it_needs_only_later() -> None:
    """On the way to a run's first request (issue 13: start-up): a valid job is recognised by jsonschema-rs
    (jsonschema, ~40 ms, only words the problems of an invalid one); the alerts, the summary and the snapshot
    differ and commit are imported where a run reaches them, after sending. Each still loads when asked for."""

    job = Path(__file__).resolve().parent / "fixtures" / "all_ops.yaml"
    later = [
        "jsonschema",
        "sync.report.alerts",
        "sync.report.summary",
        "sync.state._commit",
        "sync.state._delta",
        "sync.state._diff",
        "urllib.request",
    ]
    script = (
        "import sys\n"
        "import sync.cli, sync.cli.run_cmd, sync.cli.plan_cmd, sync.run\n"
        "from sync.config import load_job\n"
        f"job = load_job({str(job)!r})\n"
        f"print(sorted(m for m in {later!r} if m in sys.modules))\n"
        "from sync.state import SnapshotDiff, StateStore, commit\n"
        "from sync.report.alerts import post_alert\n"
        f"print(sorted(m for m in {later!r} if m in sys.modules))\n"
    )
    done = _fresh_python(script)
    assert done.stdout.splitlines() == [
        "[]",
        "['sync.report.alerts', 'sync.report.summary', 'sync.state._commit', 'sync.state._delta', "
        "'sync.state._diff', 'urllib.request']",
    ], done.stderr


def test_every_name_of_the_state_face_loads() -> None:
    """``sync.state`` imports its modules on first use: every public name still resolves, to the module's own."""
    import sync.state

    for name in sync.state.__all__:
        assert getattr(sync.state, name) is not None
    assert sync.state.StateStore.__module__ == "sync.state._store"
    with pytest.raises(AttributeError):
        sync.state.no_such_name  # noqa: B018


def test_a_run_with_its_own_client_loads_no_connector(tmp_path: Path) -> None:
    """A run preloads its platform's connector (aiohttp) from its start, in a thread; an embedding application
    or a test that brings its own client (``RunOptions.client``) does not pay for it."""
    import shutil

    fixtures = Path(__file__).resolve().parent / "fixtures"
    for name in ("all_ops.yaml", "users.csv", "tags.csv", "events.csv", "deletions.csv"):
        shutil.copy(fixtures / name, tmp_path / name)
    script = (
        "import asyncio, sys\n"
        "from sync.config import load_job\n"
        "from sync.platforms.base import SendOutcome\n"
        "from sync.run import RunOptions, run\n"
        "class Client:\n"
        "    platform = 'netmera'\n"
        "    sent = 0\n"
        "    async def send(self, batch):\n"
        "        Client.sent += 1\n"
        "        return SendOutcome(http_status=200, latency=0.0)\n"
        "    def split(self, batch):\n"
        "        return None\n"
        "    async def aclose(self):\n"
        "        return None\n"
        f"job = load_job({str(tmp_path / 'all_ops.yaml')!r})\n"
        f"options = RunOptions(api_key='k' * 24, workdir={str(tmp_path / 'work')!r}, client=Client())\n"
        "outcome = asyncio.run(run(job, options))\n"
        "print(int(outcome.exit_code), Client.sent > 0, 'aiohttp' in sys.modules)\n"
    )
    done = _fresh_python(script)
    assert done.stdout.splitlines()[-1].split() == ["0", "True", "False"], (done.stdout, done.stderr)


def test_the_switch_interval_is_short_while_the_connector_loads_then_as_before() -> None:
    """While a run preloads its connector (an import that holds the GIL for ~0.2 s), the interpreter switches
    threads every 0.5 ms instead of 5 ms, so the input's reading gets the GIL back sooner between its steps; then
    the interval is Python's default again. A program that set an interval of its own keeps it throughout."""

    job = Path(__file__).resolve().parent / "fixtures" / "all_ops.yaml"
    script = (
        "import sys\n"
        "from sync.config import load_job\n"
        "from sync.platforms.registry import preload_client\n"
        f"job = load_job({str(job)!r})\n"
        "def during_and_after():\n"
        "    thread = preload_client(job)\n"
        "    during = sys.getswitchinterval()\n"
        "    thread.join(60)\n"
        "    return during, sys.getswitchinterval()\n"
        "print(*during_and_after())\n"
        "sys.setswitchinterval(0.002)\n"
        "print(*during_and_after())\n"
    )
    done = _fresh_python(script)
    assert done.stdout.splitlines() == ["0.0005 0.005", "0.002 0.002"], done.stderr


def test_a_run_process_loads_ca_certificates_only_into_the_tls_context_its_job_uses(tmp_path: Path) -> None:
    """aiohttp's import builds a verifying and a non-verifying TLS context, each loading the system's CA bundle
    (~0.03 s of CPU apiece, issue 13). In a ``pushsync run`` process (the command line's switch) a plain-http job
    loads none; an https job the verifying context's only, in the preload; any session over TLS loads its kind
    before it opens. The CA settings read are the user's (SSL_CERT_FILE here: a bundle of one certificate). A
    program that embeds pushsync, without the switch, gets aiohttp's contexts as aiohttp makes them."""
    bundle = tmp_path / "ca.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(tmp_path / "key.pem"), "-out", str(bundle), "-subj", "/CN=pushsync test CA"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    (tmp_path / "no-certs").mkdir()
    env = {"SSL_CERT_FILE": str(bundle), "SSL_CERT_DIR": str(tmp_path / "no-certs")}
    fixture = (Path(__file__).resolve().parent / "fixtures" / "all_ops.yaml").read_text(encoding="utf-8")
    plain = tmp_path / "plain.yaml"
    plain.write_text(fixture, encoding="utf-8")
    tls = tmp_path / "tls.yaml"
    tls.write_text(fixture.replace("http://127.0.0.1:8080/", "https://127.0.0.1:8443/"), encoding="utf-8")

    def loaded(job: Path, *, switch: bool) -> list[str]:
        script = (
            "import asyncio, ssl\n"
            "import sync.cli\n"
            f"if {switch}:\n"
            "    sync.cli._load_certificates_when_used()\n"
            "from sync.config import load_job\n"
            "from sync.platforms.registry import preload_client\n"
            f"thread = preload_client(load_job({str(job)!r}))\n"
            "assert thread is not None\n"
            "thread.join(60)\n"
            "from sync.platforms._http import HttpSession\n"
            "import aiohttp.connector as c\n"
            "def counts():\n"
            "    return [c._SSL_CONTEXT_VERIFIED.cert_store_stats()['x509_ca'],"
            " c._SSL_CONTEXT_UNVERIFIED.cert_store_stats()['x509_ca']]\n"
            "print(*counts(), 'set_default_verify_paths' in ssl.SSLContext.__dict__)\n"
            "async def open_one(url, verify_tls):\n"
            "    session = HttpSession(url, verify_tls=verify_tls)\n"
            "    session._open()\n"
            "    await session.aclose()\n"
            "    print(*counts())\n"
            "asyncio.run(open_one('http://127.0.0.1:9/', False))\n"
            "asyncio.run(open_one('https://127.0.0.1:9/', True))\n"
            "asyncio.run(open_one('https://127.0.0.1:9/', False))\n"
        )
        return _fresh_python(script, env).stdout.splitlines()

    assert loaded(plain, switch=True) == ["0 0 False", "0 0", "1 0", "1 1"]
    assert loaded(tls, switch=True) == ["1 0 False", "1 0", "1 0", "1 1"]
    assert loaded(plain, switch=False) == ["1 1 False", "1 1", "1 1", "1 1"]
    # The switch itself loads nothing: a command that makes no request never imports ssl.
    quiet = _fresh_python(
        "import sys, sync.cli\nsync.cli._load_certificates_when_used()\nprint('ssl' in sys.modules)"
    )
    assert quiet.stdout.split() == ["False"]
