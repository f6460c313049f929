"""Where log lines go when pushsync is embedded in another program (sync/logs.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent

_SECRET = "embedded-secret-0123456789"

_RUN = (
    "import asyncio, sys\n"
    "{before}"
    "from sync.config import load_job\n"
    "from sync.platforms.base import SendOutcome\n"
    "from sync.redact import register_secret\n"
    "from sync.run import RunOptions, run\n"
    "class Client:\n"
    "    platform = 'netmera'\n"
    "    async def send(self, batch):\n"
    "        return SendOutcome(http_status=200, latency=0.0)\n"
    "    def split(self, batch):\n"
    "        return None\n"
    "    async def aclose(self):\n"
    "        return None\n"
    "register_secret({secret!r})\n"
    "job = load_job({job!r})\n"
    "options = RunOptions(api_key={secret!r}, workdir={work!r}, client=Client())\n"
    "outcome = asyncio.run(run(job, options))\n"
    "from sync.logs import get_logger\n"
    "get_logger(job='embedded').info('embedded.done', key={secret!r})\n"
    "print('exit', int(outcome.exit_code))\n"
)


def _embedded_run(tmp_path: Path, before: str = "") -> subprocess.CompletedProcess[str]:
    for name in ("all_ops.yaml", "users.csv", "tags.csv", "events.csv", "deletions.csv"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    script = _RUN.format(
        before=before, secret=_SECRET, job=str(tmp_path / "all_ops.yaml"), work=str(tmp_path / "work")
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT, timeout=120
    )


def test_an_embedded_run_logs_to_stderr_not_into_the_programs_output(tmp_path: Path) -> None:
    """A program that runs a job through ``sync.run`` without configuring structlog: its stdout holds only what
    it printed; the run's log lines are JSON on stderr (not a terminal here), every secret masked."""
    done = _embedded_run(tmp_path)
    assert done.stdout.splitlines() == ["exit 0"], done.stdout
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    events = {line["event"] for line in lines}
    assert "embedded.done" in events, done.stderr
    assert any(event.startswith("run.") for event in events), events
    assert all(line["level"] in {"info", "warning", "error"} for line in lines)  # info by default, no debug
    assert _SECRET not in done.stderr


def test_a_program_that_configured_structlog_keeps_its_own_set_up(tmp_path: Path) -> None:
    """The defaults apply only where nobody configured structlog: a program's own configuration (here: every
    line to stdout, as plain key=value text) is left as it is."""
    before = (
        "import structlog\n"
        "structlog.configure(processors=[structlog.processors.KeyValueRenderer(key_order=['event'])],\n"
        "                    logger_factory=structlog.PrintLoggerFactory(file=sys.stdout))\n"
    )
    done = _embedded_run(tmp_path, before)
    out = done.stdout.splitlines()
    assert out[-1] == "exit 0"
    assert any(line.startswith("event='embedded.done'") for line in out), out
    assert not any(line.startswith("{") for line in done.stderr.splitlines()), done.stderr


def test_a_debug_run_logs_its_process_start_up_once(tmp_path: Path) -> None:
    """``run.startup`` (debug) tells when each step of the *process's* start-up was done: a program that embeds
    pushsync gets it with its first run's first batch, not again with a later run (which has no start-up)."""
    before = "from sync.logs import configure_logging\nconfigure_logging('debug', json=True)\n"
    again = "outcome = asyncio.run(run(job, options))\nprint('exit', int(outcome.exit_code))\n"
    for name in ("all_ops.yaml", "users.csv", "tags.csv", "events.csv", "deletions.csv"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    script = _RUN.format(
        before=before, secret=_SECRET, job=str(tmp_path / "all_ops.yaml"), work=str(tmp_path / "work")
    )
    done = subprocess.run(
        [sys.executable, "-c", script + again],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.stdout.splitlines() == ["exit 0", "exit 0"], done.stdout
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert [line["event"] for line in lines].count("run.start") == 2
    [startup] = [line for line in lines if line["event"] == "run.startup"]
    steps = list(startup["seconds"])
    # A run with its own client: no connector is loaded, none made.
    assert steps[-1] == "first_batch" and "client_made" in steps and "connector_imported" not in steps
    assert "job_loaded" not in steps  # the command line's steps: not an embedded run's
