"""What schedulers and on-call engineers rely on (issue: fail fast, say why, exit codes that never lie):
a crash has its own exit code, a closed pipe is no traceback, ``latest`` works everywhere a run is named, the
default workdir follows the job file, and a scheduler's log gets progress lines without any flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sync.cli import main
from sync.errors import ExitCode
from tests.test_cli_run import KEY_ENV, key_env, write_job

__all__ = ["key_env"]  # the fixture, re-used from the run tests

REPO_ROOT = Path(__file__).resolve().parent.parent


def _cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sync", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kw,
    )


def test_the_airflow_example_uses_airflow_3_import_paths() -> None:
    text = (REPO_ROOT / "examples" / "airflow_dag.py").read_text(encoding="utf-8")
    imports = [line for line in text.splitlines() if line.startswith(("from airflow", "import airflow"))]
    assert "from airflow.sdk import DAG, task" in imports
    assert "from airflow.providers.standard.operators.bash import BashOperator" in imports
    assert not any(line.startswith(("from airflow.operators", "from airflow.decorators")) for line in imports)


def test_a_crash_exits_5_never_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An unexpected exception used to exit 1, the "partial" code, which the Airflow wrapper maps to success."""

    def explode(args: Any) -> int:
        raise RuntimeError("unexpected state 42")

    monkeypatch.setattr("sync.cli.run_cmd._runs", explode)
    assert main(["runs"]) == ExitCode.CRASHED == 5
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: unexpected state 42" in err
    assert "Traceback" in err and "explode" in err  # the traceback, for the bug report


def test_the_airflow_wrapper_fails_on_a_crash() -> None:
    text = (REPO_ROOT / "examples" / "airflow_dag.py").read_text(encoding="utf-8")
    wrapper = text.split('SYNC_COMMAND = r"""', 1)[1].split('"""', 1)[0]
    for rc, expected in ((0, 0), (1, 0), (2, 2), (3, 3), (4, 4), (5, 5)):
        script = wrapper.replace('summary="$(pushsync run', f'summary="$(exit {rc}; pushsync run', 1)
        done = subprocess.run(
            ["bash", "-c", script],
            env={"PATH": os.environ["PATH"], "JOB": "j", "WORKDIR": "w"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == expected, (rc, done.stderr)


def test_show_latest_export_latest_and_a_closed_pipe(key_env: Any, tmp_path: Path) -> None:
    job = write_job(tmp_path, key_env.url, users=40)
    env = {KEY_ENV: key_env.api_key}
    ran = _cli("run", str(job), "--output", "json", "--progress", "none", cwd=tmp_path, env=env)
    assert ran.returncode == 0, ran.stderr
    run_id = json.loads(ran.stdout)["run_id"]

    shown = _cli("show", "latest", "--job", str(job), "--output", "json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["run_id"] == run_id
    exported = _cli(
        "ledger-export",
        "latest",
        "--job",
        str(job),
        "-o",
        str(tmp_path / "b.csv"),
        "--format",
        "csv",
        cwd=tmp_path,
    )
    assert exported.returncode == 0, exported.stderr

    # `show … | head -1`: the reader closes the pipe early; no BrokenPipeError traceback, and exit 0.
    piped = subprocess.run(
        f"{sys.executable} -m sync show latest --job {job} --output json | head -1; exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )
    assert piped.stdout.strip() == "{"
    assert piped.returncode == 0 and "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr


def test_the_default_workdir_is_beside_the_job_file(key_env: Any, tmp_path: Path) -> None:
    """A cron job started from another directory must find its ledger (and snapshot state) again."""
    job = write_job(tmp_path / "project", key_env.url, users=30)
    text = job.read_text(encoding="utf-8").replace("workdir: work\n", "")
    job.write_text(text, encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {KEY_ENV: key_env.api_key}
    first = _cli("run", str(job), "--output", "json", "--progress", "none", cwd=elsewhere, env=env)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "project" / ".pushsync" / "cli" / "ledger.sqlite").exists()
    assert not (elsewhere / ".pushsync").exists()
    listed = _cli("runs", str(job), "--output", "json", cwd=tmp_path / "project")
    assert [r["run_id"] for r in json.loads(listed.stdout)] == [json.loads(first.stdout)["run_id"]]
    # and with no job named, from the job's folder's parent: the ledger beside the job file is found
    listed = _cli("runs", "--output", "json", cwd=tmp_path / "project")
    assert len(json.loads(listed.stdout)) == 1


def test_progress_lines_reach_a_scheduler_log_by_default(key_env: Any, tmp_path: Path) -> None:
    """Not on a terminal and with no flag: the run.start/run.progress/run.end lines are in stderr (JSON)."""
    job = write_job(tmp_path, key_env.url, users=150, budget="{requests: 40, period: 1}")
    done = _cli("run", str(job), "--output", "json", cwd=tmp_path, env={KEY_ENV: key_env.api_key})
    assert done.returncode == 0, done.stderr
    events = [json.loads(line)["event"] for line in done.stderr.splitlines() if line.startswith("{")]
    assert events[0] == "run.start" and events[-1] == "run.end"
    assert "run.progress" in events  # the run takes a few seconds under its budget: at least one line


def _closed_port() -> int:
    """A loopback port nothing listens on: bound, then released."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_server_aborts_with_exit_3_naming_the_url(tmp_path: Path) -> None:
    """A closed port used to run for minutes (every retry of every batch) without a line on stderr."""
    url = f"http://127.0.0.1:{_closed_port()}/api"
    job = write_job(tmp_path, url, users=400)
    job.write_text(
        job.read_text(encoding="utf-8")
        + "  abort_after_connection_failures: 12\n  retry: {max_attempts: 3, base_delay: 0.02, max_delay: 0.05}\n",
        encoding="utf-8",
    )
    done = _cli(
        "run", str(job), "--progress", "none", "--output", "json",
        cwd=tmp_path, env={KEY_ENV: "sEcReT-KeY-0123456789"},
    )  # fmt: skip
    assert done.returncode == ExitCode.ABORTED == 3, done.stderr
    assert f"127.0.0.1:{url.rsplit(':', 1)[1]}" in done.stderr  # host, port and path named for on-call
    assert "cannot be reached" in done.stderr and "12 requests in a row" in done.stderr
    assert "batch.failed" in done.stderr  # a failed batch is a warning, not a debug line
    assert "sEcReT-KeY-0123456789" not in done.stderr + done.stdout
    summary = json.loads(done.stdout)
    assert summary["exit_status"] == "ABORTED" and "cannot be reached" in summary["message"]
    # Stopped after the streak, not after every retry of every batch.
    assert summary["totals"]["requests"] < 40


def test_the_help_names_every_kind_of_input(capsys: pytest.CaptureFixture[str]) -> None:
    # `pushsync --help` said "CRM exports (CSV/Parquet)": a user with the CRM in PostgreSQL read that pushsync
    # could not read it, while a source's `database:` reads PostgreSQL, DuckDB and SQLite (docs/jobs.md).
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "CSV/Parquet files, or a query on PostgreSQL, DuckDB or SQLite" in text
