"""``pushsync run | runs | show | ledger-export`` and the exit codes, against a sandbox in its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from sync.cli import main
from sync.demo import generate_users

KEY_ENV = "PUSHSYNC_CLI_TEST_KEY"
REPO_ROOT = Path(__file__).resolve().parent.parent


def write_job(
    tmp_path: Path, url: str, *, users: int = 200, budget: str = "{requests: 50, period: 0.5}"
) -> Path:
    generate_users(tmp_path / "data" / "users.csv", users)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"""
version: 1
name: cli
workdir: work
destination: {{platform: netmera, base_url: "{url}", secret: {{env: {KEY_ENV}}}}}
defaults: {{ext_id: user_id}}
sources:
  - name: users
    path: data/users.csv
    attributes: {{name: string, city: string, score: number, plan: string}}
    tags: {{column: segments, delimiter: "|"}}
    opt_ins: {{email: email_opt_in}}
dispatch:
  batch_size: 20
  concurrency: 4
  drain_timeout: 5
  budgets: {{"*": {budget}}}
""",
        encoding="utf-8",
    )
    return job


@pytest.fixture
def key_env(netmera_sandbox_process: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(KEY_ENV, netmera_sandbox_process.api_key)
    return netmera_sandbox_process


def test_run_then_runs_show_and_export(
    key_env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, key_env.url)
    assert main(["run", str(job), "--output", "json", "--progress", "none"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["exit_status"] == "OK" and summary["outcome"] == "completed"
    assert summary["totals"]["ids_failed"] == 0 and summary["totals"]["ids_ok"] > 200
    endpoint = summary["endpoints"][0]
    assert {"requests", "ids", "rate_limited", "retries", "achieved_rate", "budget", "latency_ms"} <= set(
        endpoint
    )
    run_id = summary["run_id"]

    assert main(["runs", str(job)]) == 0
    listing = capsys.readouterr().out
    assert run_id in listing and "done" in listing

    assert main(["show", run_id, "--job", str(job)]) == 0
    shown = capsys.readouterr().out
    assert f"run {run_id} of job cli" in shown and "ok" in shown

    out = tmp_path / "batches.csv"
    assert main(["ledger-export", run_id, "--job", str(job), "--format", "csv", "-o", str(out)]) == 0
    frame = pl.read_csv(out)
    assert frame.height == summary["totals"]["batches_done"]
    assert set(frame["status"].to_list()) == {"ok"}
    parquet = tmp_path / "batches.parquet"
    assert main(["ledger-export", run_id, "--workdir", str(tmp_path / "work"), "-o", str(parquet)]) == 0
    assert pl.read_parquet(parquet).height == frame.height


def test_ledger_export_to_an_unusable_path_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_cli_report import make_ledger, unusable_outputs

    make_ledger(tmp_path / "work" / "ledger.sqlite")
    workdir = str(tmp_path / "work")
    for out, reason in unusable_outputs(tmp_path):
        assert main(["ledger-export", "new", "--workdir", workdir, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pushsync: error: {out}: {reason}") and err.count("\n") == 1, err
    assert (tmp_path / "a-fifo").is_fifo()
    # Through a symlink: the linked file is written, the link stays.
    link = tmp_path / "rejects.csv"
    link.symlink_to("a-file")
    assert (
        main(
            [
                "ledger-export",
                "new",
                "--workdir",
                workdir,
                "--table",
                "rejected-rows",
                "--format",
                "csv",
                "-o",
                str(link),
            ]
        )
        == 0
    )
    assert link.is_symlink() and pl.read_csv(tmp_path / "a-file")["ext_id"].to_list() == ["C4"]
    assert not list(tmp_path.glob("*.partial"))


def test_run_text_summary(key_env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, key_env.url, users=50)
    assert main(["run", str(job), "--progress", "none"]) == 0
    text = capsys.readouterr().out
    assert "exit 0 (OK)" in text and "setProfileAttributes" in text and "p95 ms" in text


def test_bad_job_missing_secret_and_bad_key_exit_codes(
    key_env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nsources: []\n", encoding="utf-8")
    assert main(["run", str(bad)]) == 2
    job = write_job(tmp_path, key_env.url, users=20)
    monkeypatch.delenv(KEY_ENV)
    assert main(["run", str(job)]) == 2
    assert KEY_ENV in capsys.readouterr().err
    monkeypatch.setenv(KEY_ENV, "not-the-right-key-77")
    assert main(["run", str(job), "--progress", "none"]) == 3
    captured = capsys.readouterr()
    assert "aborted" in captured.out and "403" in captured.out
    assert "not-the-right-key-77" not in captured.out + captured.err


def test_show_unknown_run_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "nope", "--workdir", str(tmp_path)]) == 2
    assert "no run nope" in capsys.readouterr().err


def _read_until(process: subprocess.Popen[str], event: str) -> str:
    """Stderr lines until the JSON log line of ``event`` (the CLI logs at info when stderr is not a terminal):
    a signal sent then meets the run itself, not the interpreter still importing on a loaded machine."""
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if f'"event": "{event}"' in line:
            break
    return "".join(seen)


def test_sigint_drains_prints_the_summary_and_exits_4(netmera_sandbox_process: Any, tmp_path: Path) -> None:
    job = write_job(tmp_path, netmera_sandbox_process.url, users=400, budget="{requests: 5, period: 1}")
    process = subprocess.Popen(
        [sys.executable, "-m", "sync", "run", str(job), "--output", "json", "--progress", "log"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, KEY_ENV: netmera_sandbox_process.api_key},
    )
    try:
        before = _read_until(process, "run.progress")  # logged when the first batch is answered
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
        err = before + err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 4, err
    summary = json.loads(out)
    assert summary["outcome"] == "interrupted" and summary["exit_status"] == "INTERRUPTED"
    assert summary["totals"]["batches_done"] > 0 and summary["totals"]["batches_unfinished"] >= 0


def test_a_second_sigint_cancels_the_drain(netmera_sandbox_process: Any, tmp_path: Path) -> None:
    root = netmera_sandbox_process.root_url
    request = urllib.request.Request(
        f"{root}/_sandbox/config",
        data=json.dumps({"faults": {"hang": 1.0, "hang_seconds": 60}}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 200
    job = write_job(tmp_path, netmera_sandbox_process.url, users=100)
    text = job.read_text(encoding="utf-8").replace(
        "drain_timeout: 5", "drain_timeout: 60\n  request_timeout: 60"
    )
    job.write_text(text, encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "sync", "run", str(job), "--output", "json", "--progress", "none"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, KEY_ENV: netmera_sandbox_process.api_key},
    )
    try:
        before = _read_until(process, "run.start")
        time.sleep(1.0)  # requests are now hanging on the sandbox
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert process.poll() is None  # draining: the hung requests may still answer
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
        err = before + err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 4, err
    summary = json.loads(out)
    assert summary["outcome"] == "interrupted" and summary["totals"]["batches_done"] == 0
    assert "run.forced" in err


def test_run_writes_prometheus_metrics_to_a_textfile(
    key_env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, key_env.url, users=60)
    prom = tmp_path / "metrics" / "pushsync.prom"
    argv = ["run", str(job), "--output", "json", "--progress", "none", "--metrics-textfile", str(prom)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    text = prom.read_text(encoding="utf-8")
    sent = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pushsync_requests_total{")
    )
    assert sent == summary["totals"]["requests"] > 0
    assert f'run_id="{summary["run_id"]}"' in text


_STARTUP_STEPS = [
    "command_parsed",
    "run_imported",
    "job_loaded",
    "ledger_opened",
    "head_read",
    "head_validated",
    "head_settled",
    "plan_ready",
    "client_made",
    "first_batch",
]
"""The start-up steps of a run, in the order the run takes them; the connector's import (``connector_imported``)
is done beside them, on a thread of its own."""


def test_a_debug_run_logs_when_each_start_up_step_was_done(key_env: Any, tmp_path: Path) -> None:
    """``--log-level debug``: as its first batch is taken, a run logs ``run.startup`` — the seconds since the
    process started at which each step of its start-up was done, in the order they were (issue 13: where a slow
    start went). Not at the default level."""
    job = write_job(tmp_path, key_env.url, users=50)
    env = {**os.environ, KEY_ENV: key_env.api_key}

    def startup_lines(level: str) -> list[dict[str, Any]]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sync",
                "--log-level",
                level,
                "--log-json",
                "run",
                str(job),
                "--progress",
                "none",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
        return [line for line in lines if line["event"] == "run.startup"]

    [line] = startup_lines("debug")
    assert line["level"] == "debug"
    steps: dict[str, float] = line["seconds"]
    assert [s for s in steps if s != "connector_imported"] == _STARTUP_STEPS, steps
    assert "connector_imported" in steps
    seconds = list(steps.values())
    assert seconds == sorted(seconds) and seconds[0] > 0 and seconds[-1] < 60
    assert startup_lines("info") == []


def test_ledger_export_reads_back_exactly_in_either_format(
    key_env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # IDs holding a space, a comma, quotes and non-ASCII are sent as they are; the CSV export joined a batch's IDs
    # with spaces (so "U 1" read back as two IDs), and `-o batches.csv` without --format wrote Parquet bytes.
    import pyarrow.parquet as pq

    ids = ["U 1", "a,b", 'q"uote', "plain", "Ünï 😀"]
    bad_id = 'bad, "row"'
    job = write_job(tmp_path, key_env.url, users=1)
    users = tmp_path / "data" / "users.csv"
    header = users.read_text(encoding="utf-8").splitlines()[0]
    row = pl.read_csv(users).row(0, named=True)
    frame = pl.DataFrame([{**row, "user_id": x} for x in ids] + [{**row, "user_id": bad_id, "score": "x"}])
    frame.select(header.split(",")).write_csv(users)
    assert main(["run", str(job), "--output", "json", "--progress", "none"]) == 1
    run_id = json.loads(capsys.readouterr().out)["run_id"]

    def export(table: str, name: str) -> Path:
        out = tmp_path / name
        assert main(["ledger-export", run_id, "--job", str(job), "--table", table, "-o", str(out)]) == 0
        return out

    csv_file, parquet_file = export("batches", "batches.csv"), export("batches", "batches.parquet")
    assert csv_file.read_bytes()[:4] != b"PAR1" and parquet_file.read_bytes()[:4] == b"PAR1"
    from_csv = [json.loads(cell) for cell in pl.read_csv(csv_file)["ext_ids"].to_list()]
    from_parquet = pl.read_parquet(parquet_file)["ext_ids"].to_list()
    assert from_csv == from_parquet and sorted(from_parquet[0]) == sorted(ids)
    rejected = [export("rejected-rows", "rejected.csv"), export("rejected-rows", "rejected.parquet")]
    assert pl.read_csv(rejected[0])["ext_id"].to_list() == [bad_id]
    assert pl.read_parquet(rejected[1])["ext_id"].to_list() == [bad_id]
    # No ID was refused: the file still has its columns' types, as a run with refusals gives them.
    empty = pq.read_schema(export("refused-ids", "refused.parquet"))
    assert str(empty.field("ext_id").type) == "string" and str(empty.field("origin_row").type) == "int64"


def test_trace_finds_an_id_given_as_the_input_holds_it_with_spaces_around(
    key_env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Validation trims IDs (the job's default), so the ledger holds "U7"; `trace "  U7 "`, the ID exactly as in
    # the input as trace's help asks, said "no record".
    job = write_job(tmp_path, key_env.url, users=1)
    users = tmp_path / "data" / "users.csv"
    frame = pl.read_csv(users)
    frame.with_columns(pl.lit("  U7 ").alias("user_id")).write_csv(users)
    assert main(["run", str(job), "--output", "json", "--progress", "none"]) == 0
    run_id = json.loads(capsys.readouterr().out)["run_id"]

    assert main(["trace", "  U7 ", "--job", str(job), "--output", "json"]) == 0
    story = json.loads(capsys.readouterr().out)
    assert story and {(e["run_id"], e["ext_id"], e["status"]) for e in story} == {(run_id, "U7", "ok")}
    assert main(["trace", "  U7 ", "--job", str(job)]) == 0
    assert "ID U7 (asked: '  U7 ')" in capsys.readouterr().out
    assert main(["trace", " U8 ", "--job", str(job)]) == 0
    assert "no record of ID ' U8 ' or 'U8'" in capsys.readouterr().out


def test_trace_of_a_job_that_has_not_run_says_there_is_no_ledger(
    key_env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `trace ID --job JOB` for a job never run (or run with another workdir) said "no record of ID ... (give --job
    # JOB or --workdir DIR)": a hint to give what was given, and no word that there was nothing to search.
    job = write_job(tmp_path, key_env.url, users=1)
    assert main(["trace", "U0", "--job", str(job)]) == 0
    out = capsys.readouterr().out
    assert "no ledger at " in out and "has not run there yet" in out and "give --job" not in out
    assert main(["run", str(job), "--output", "json", "--progress", "none"]) == 0
    capsys.readouterr()
    assert main(["trace", "nobody", "--job", str(job)]) == 0
    out = capsys.readouterr().out
    assert "no record of ID 'nobody' in " in out and "ledger.sqlite" in out and "give --job" not in out
