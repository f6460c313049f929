"""``pushsync report`` on the command line, and the scheduler examples (Airflow DAG, Kubernetes CronJob): the DAG
parses and its bash wrapper, run for real against a sandbox, maps exit codes and pushes one JSON line; the
manifest holds the fields operators rely on and its job file loads."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from sync.cli import main
from sync.config import load_job
from sync.ledger.ledger import Ledger
from sync.records import RejectedRow

REPO = Path(__file__).resolve().parent.parent
DAG = REPO / "examples" / "airflow_dag.py"
MANIFEST = REPO / "examples" / "k8s-cronjob.yaml"


def make_ledger(path: Path) -> None:
    """Two runs written through the ledger's public API: ``old`` (done) and ``new`` (partial)."""
    with Ledger.open(path) as ledger:
        ledger.start_run("old", job="nightly", platform="netmera")
        ledger.finish_run("old", status="done", exit_code=0)
        ledger.start_run("new", job="nightly", platform="netmera")
        ledger.record_rejected_rows(
            "new", [RejectedRow("users.csv", 4, "email", "not an e-mail address", "C4")]
        )
        ledger.finish_run("new", status="partial", exit_code=1)


def test_report_writes_the_page_of_the_run_named(tmp_path: Path, capsys: Any) -> None:
    ledger = tmp_path / "work" / "ledger.sqlite"
    make_ledger(ledger)
    out = tmp_path / "out" / "old.html"
    assert main(["report", "old", "--ledger", str(ledger), "-o", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert 'data-field="run_id">old<' in page and 'data-field="status">done<' in page
    assert "wrote the report of run old" in capsys.readouterr().out


def test_the_report_of_a_retry_names_the_run_it_continued(tmp_path: Path) -> None:
    # `pushsync show` said which run a resume or retry replayed; its report did not, so a page read alone showed
    # a run of a few requests with no hint that it finished another.
    ledger = tmp_path / "work" / "ledger.sqlite"
    make_ledger(ledger)
    with Ledger.open(ledger) as writing:
        writing.start_run("again", job="nightly", platform="netmera", origin="new", origin_mode="retry")
        writing.finish_run("again", status="done", exit_code=0)
    for run_id, shown in (("again", "run new (retry)"), ("old", None)):
        out = tmp_path / f"{run_id}.html"
        assert main(["report", run_id, "--ledger", str(ledger), "-o", str(out)]) == 0
        page = out.read_text(encoding="utf-8")
        if shown is None:
            assert 'data-field="origin"' not in page
        else:
            assert f'data-field="origin">{shown}<' in page


def test_report_latest_from_a_workdir_with_json_output(tmp_path: Path, capsys: Any) -> None:
    make_ledger(tmp_path / "work" / "ledger.sqlite")
    out = tmp_path / "latest.html"
    assert (
        main(["report", "latest", "--workdir", str(tmp_path / "work"), "-o", str(out), "--output", "json"])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["run_id"] == "new" and Path(doc["report"]) == out.resolve()
    page = out.read_text(encoding="utf-8")
    assert 'data-field="status">partial<' in page and "not an e-mail address" in page


def test_report_of_an_unknown_run_exits_2(tmp_path: Path, capsys: Any) -> None:
    make_ledger(tmp_path / "work" / "ledger.sqlite")
    out = tmp_path / "x.html"
    assert main(["report", "nope", "--workdir", str(tmp_path / "work"), "-o", str(out)]) == 2
    assert "no run nope found" in capsys.readouterr().err
    assert not out.exists()


def test_a_run_not_found_in_a_named_ledger_says_which_ledger_was_read(tmp_path: Path, capsys: Any) -> None:
    # `report/show/ledger-export RUN --workdir DIR` (or --job) that found no run said "(give --job JOB or --workdir
    # DIR)" to a user who had given it, and nothing about a workdir holding no ledger at all (a job not run yet).
    work = tmp_path / "work"
    make_ledger(work / "ledger.sqlite")
    out = tmp_path / "x.html"
    assert main(["report", "nope", "--workdir", str(work), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"no run nope found in {work / 'ledger.sqlite'}" in err and "give --job" not in err
    assert main(["show", "latest", "--workdir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert (
        f"no run recorded: no ledger at {tmp_path / 'empty' / 'ledger.sqlite'}" in err
        and "give --job" not in err
    )
    assert main(["ledger-export", "nope", "--workdir", str(work), "-o", str(tmp_path / "x.csv")]) == 2
    assert "give --job" not in capsys.readouterr().err


def unusable_outputs(folder: Path) -> list[tuple[Path, str]]:
    """Output paths (``-o``) nothing can be written to, made in ``folder``, each with the reason pushsync gives:
    a directory, a FIFO (as a device: a rename over it would replace it) and a path under a regular file."""
    (folder / "a-folder").mkdir()
    os.mkfifo(folder / "a-fifo")
    (folder / "a-file").write_text("x", encoding="utf-8")
    return [
        (folder / "a-folder", "is a directory"),
        (folder / "a-fifo", "exists and is not a regular file"),
        (folder / "a-file" / "out", "cannot write the file: Not a directory"),
    ]


def test_report_to_an_unusable_path_is_one_line_and_exit_2(tmp_path: Path, capsys: Any) -> None:
    ledger = tmp_path / "work" / "ledger.sqlite"
    make_ledger(ledger)
    for out, reason in unusable_outputs(tmp_path):
        assert main(["report", "old", "--ledger", str(ledger), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pushsync: error: {out}: {reason}") and err.count("\n") == 1, err
    assert (tmp_path / "a-fifo").is_fifo() and (tmp_path / "a-folder").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-fifo", "a-file", "a-folder", "work"]


def test_report_through_a_symlink_writes_the_linked_file(tmp_path: Path) -> None:
    ledger = tmp_path / "work" / "ledger.sqlite"
    make_ledger(ledger)
    (tmp_path / "pages").mkdir()
    link = tmp_path / "latest.html"
    link.symlink_to(Path("pages") / "old.html")  # not there yet: the report makes it
    assert main(["report", "old", "--ledger", str(ledger), "-o", str(link)]) == 0
    assert link.is_symlink() and 'data-field="run_id">old<' in (tmp_path / "pages" / "old.html").read_text()
    assert main(["report", "new", "--ledger", str(ledger), "-o", str(link)]) == 0
    assert link.is_symlink() and 'data-field="run_id">new<' in (tmp_path / "pages" / "old.html").read_text()
    assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == ["old.html"]


# -- the Airflow example ---------------------------------------------------------------------------------------


def dag_constants() -> dict[str, Any]:
    """The DAG file's module-level string constants, read without importing Airflow."""
    tree = ast.parse(DAG.read_text(encoding="utf-8"), filename=str(DAG))
    out: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return out


def test_the_airflow_dag_parses_and_pushes_the_summary_to_xcom() -> None:
    source = DAG.read_text(encoding="utf-8")
    tree = ast.parse(source)
    compile(tree, str(DAG), "exec")
    calls = {
        kw.value.value: call
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "BashOperator"
        for kw in call.keywords
        if kw.arg == "task_id" and isinstance(kw.value, ast.Constant)
    }
    assert set(calls) == {"sync_users", "report"}
    sync_kwargs = {kw.arg: kw.value for kw in calls["sync_users"].keywords}
    assert ast.literal_eval(sync_kwargs["do_xcom_push"]) is True
    assert ast.literal_eval(sync_kwargs["skip_on_exit_code"]) is None
    report_kwargs = {kw.arg: kw.value for kw in calls["report"].keywords}
    assert ast.literal_eval(report_kwargs["trigger_rule"]) == "all_done"
    constants = dag_constants()
    assert "--output json" in constants["SYNC_COMMAND"]
    assert "pushsync report latest" in constants["REPORT_COMMAND"]


def _wrapper_env(tmp_path: Path, job: Path, api_key: str) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent  # holds pushsync and python3
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "JOB": str(job),
        "WORKDIR": str(tmp_path / "work"),
        "REPORTS": str(tmp_path / "reports"),
        "PUSHSYNC_TEST_NETMERA_KEY": api_key,
    }


def _write_job(tmp_path: Path, url: str, *, bad_row: bool) -> Path:
    data = tmp_path / "data" / "users.csv"
    data.parent.mkdir(parents=True, exist_ok=True)
    rows = ["user_id,city,score", "U1,Izmir,3", "U2,Bursa,5"] + (["U3,Konya,not-a-number"] if bad_row else [])
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    job = tmp_path / "job.yaml"
    job.write_text(
        f"""
version: 1
name: airflow-example
workdir: work
destination: {{platform: netmera, base_url: "{url}", secret: {{env: PUSHSYNC_TEST_NETMERA_KEY}}}}
defaults: {{ext_id: user_id}}
sources:
  - {{name: users, path: data/users.csv, attributes: {{city: string, score: number}}}}
dispatch: {{concurrency: 2, request_timeout: 2}}
""",
        encoding="utf-8",
    )
    return job


def run_wrapper(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_airflow_wrapper_maps_exit_codes_and_pushes_one_json_line(
    tmp_path: Path, netmera_sandbox_process: Any
) -> None:
    constants = dag_constants()
    sandbox = netmera_sandbox_process
    # Partial (one row refused by validation): the task succeeds and XCom gets the summary saying PARTIAL.
    env = _wrapper_env(tmp_path, _write_job(tmp_path, sandbox.url, bad_row=True), sandbox.api_key)
    partial = run_wrapper(constants["SYNC_COMMAND"], env)
    assert partial.returncode == 0, partial.stderr[-2000:]
    summary = json.loads(partial.stdout.splitlines()[-1])
    assert (summary["exit_code"], summary["exit_status"]) == (1, "PARTIAL")
    assert summary["totals"]["rows_rejected"] == 1 and summary["totals"]["ids_ok"] >= 2
    assert (tmp_path / "work" / "metrics" / "pushsync.prom").read_text().count("pushsync_requests_total") > 0
    # The report task then writes the page of that run.
    report = run_wrapper(constants["REPORT_COMMAND"].replace("{{ ds }}", "2026-11-24"), env)
    assert report.returncode == 0, report.stderr[-2000:]
    page = (tmp_path / "reports" / "nightly-crm-2026-11-24.html").read_text(encoding="utf-8")
    assert f'data-field="run_id">{summary["run_id"]}<' in page
    # A bad job (its input file is missing): the task fails with 2, and XCom still gets one JSON line.
    (tmp_path / "data" / "users.csv").unlink()
    bad = run_wrapper(constants["SYNC_COMMAND"], env)
    assert bad.returncode == 2
    assert json.loads(bad.stdout.splitlines()[-1]) == {"exit_code": 2, "exit_status": "NO_SUMMARY"}


# -- the Kubernetes example ------------------------------------------------------------------------------------


@pytest.fixture
def manifests() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if d]
    return {d["kind"]: d for d in docs}


def test_the_cronjob_runs_one_at_a_time_and_retries_only_what_a_retry_can_fix(
    manifests: dict[str, dict[str, Any]],
) -> None:
    cron = manifests["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    rules = job["podFailurePolicy"]["rules"]
    no_retry = {code for r in rules if r["action"] == "FailJob" for code in r["onExitCodes"]["values"]}
    assert no_retry == {1, 2, 3, 5}  # 4 (interrupted) and kills (OOM) count against backoffLimit
    assert job["backoffLimit"] >= 1
    assert all(r["onExitCodes"]["containerName"] == "pushsync" for r in rules if "onExitCodes" in r)
    (container,) = pod["containers"]
    assert container["name"] == "pushsync"
    args = container["args"]
    assert args[:2] == ["run", "/etc/pushsync/job.yaml"]
    assert args[args.index("--output") + 1] == "json"
    # A pod that lives as long as its run pushes its metrics: nobody would scrape it in time.
    assert args[args.index("--metrics-pushgateway") + 1].startswith("http")
    assert "--metrics-port" not in args and "ports" not in container
    # The input reaches the work volume before pushsync starts, where the job reads it.
    (fetch,) = pod["initContainers"]
    assert {m["mountPath"] for m in fetch["volumeMounts"]} == {"/var/lib/pushsync"}
    assert "/var/lib/pushsync/inbox/" in fetch["args"]


def test_the_dockerfile_installs_the_wheel_and_runs_pushsync_as_non_root() -> None:
    text = (REPO / "examples" / "Dockerfile").read_text(encoding="utf-8")
    assert "pip wheel" in text and "pip install --no-cache-dir /wheels/*.whl" in text
    assert 'ENTRYPOINT ["pushsync"]' in text  # exec form: SIGTERM reaches pushsync, which drains
    assert "USER 10001" in text
    copies = [
        line.split()[1] for line in text.splitlines() if line.startswith("COPY") and "--from" not in line
    ]
    # what a wheel build needs, and nothing secret: the package and the files its data links point to
    assert {"sync", "schemas", "pyproject.toml", "jobs/demo.yaml"} <= set(copies)
    repo = Path(__file__).resolve().parent.parent
    for link in (repo / "sync" / "schemas", repo / "sync" / "_demo" / "demo.yaml"):
        if link.is_symlink():
            target = link.resolve().relative_to(repo).as_posix()
            assert any(target == c or target.startswith(c + "/") for c in copies), target


def test_the_cronjob_wires_the_secret_the_job_names_and_a_volume_for_the_ledger(
    manifests: dict[str, dict[str, Any]],
) -> None:
    cron = manifests["CronJob"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    with tempfile.TemporaryDirectory() as tmp:
        job_file = Path(tmp) / "job.yaml"
        job_file.write_text(manifests["ConfigMap"]["data"]["job.yaml"], encoding="utf-8")
        job = load_job(job_file)
    env = {e["name"]: e for e in container["env"]}
    assert job.destination.secret_env is not None
    ref = env[job.destination.secret_env]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and "value" not in env[job.destination.secret_env]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/etc/pushsync"]]["configMap"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
    work = volumes[mounts["/var/lib/pushsync"]]["persistentVolumeClaim"]["claimName"]
    assert work == manifests["PersistentVolumeClaim"]["metadata"]["name"]
    assert str(job.workdir).startswith("/var/lib/pushsync/")  # the ledger lives on the claim
    # SIGTERM drains in-flight batches: the grace period must outlast the drain.
    assert pod["terminationGracePeriodSeconds"] > job.dispatch.drain_timeout


# -- `pushsync runs` and `pushsync show` -----------------------------------------------------------------------


def cells(text: str, first: str) -> list[str]:
    """The cells of the table row that starts with ``first`` (rich draws columns with │)."""
    for line in text.splitlines():
        parts = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if parts and parts[0] == first:
            return parts
    raise AssertionError(f"no row {first!r} in:\n{text}")


def test_runs_and_show_read_at_a_glance_and_as_json(
    tmp_path: Path, netmera_sandbox_process: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    sandbox = netmera_sandbox_process
    job = _write_job(tmp_path, sandbox.url, bad_row=True)
    monkeypatch.setenv("PUSHSYNC_TEST_NETMERA_KEY", sandbox.api_key)
    assert main(["run", str(job), "--output", "json", "--progress", "none"]) == 1
    summary = json.loads(capsys.readouterr().out)
    run_id, totals = summary["run_id"], summary["totals"]

    assert main(["runs", str(job)]) == 0
    row = cells(capsys.readouterr().out, run_id)
    assert row[1] == "airflow-example" and row[4] == "partial" and row[5] == "1"
    assert row[6:11] == [
        f"{totals[k]:,}" for k in ("requests", "ids_ok", "ids_rejected", "ids_failed", "rows_rejected")
    ]
    assert main(["runs", str(job), "--output", "json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["run_id"] == run_id and listed["exit_code"] == 1
    # The figures of the table, for scripts ("the same for scripts": the JSON had the batches by status only).
    assert listed["totals"] == totals and listed["seconds"] == pytest.approx(
        summary["elapsed_seconds"], abs=1
    )

    assert main(["show", run_id, "--job", str(job)]) == 0
    shown = capsys.readouterr().out
    assert f"run {run_id} of job airflow-example (netmera): partial, exit 1 PARTIAL" in shown
    for e in summary["endpoints"]:
        row = cells(shown, e["endpoint"])
        assert row[1:4] == [f"{e['requests']:,}", f"{e['ids']['ok']:,}", f"{e['ids']['rejected']:,}"]
    assert f"pushsync report {run_id}" in shown
    # The rows validation rejected, as the README says show lists them (it listed only refused IDs: audit).
    assert totals["rows_rejected"] > 0
    assert f"{totals['rows_rejected']:,} input rows rejected (first 20)" in shown
    assert main(["show", run_id, "--job", str(job), "--output", "json"]) == 0
    shown_json = json.loads(capsys.readouterr().out)
    assert shown_json["summary"]["totals"] == totals
    assert len(shown_json["rejected_rows"]) == totals["rows_rejected"]
    assert set(shown_json["rejected_rows"][0]) == {"file", "row", "column", "reason", "ext_id"}

    out = tmp_path / "report.html"
    assert main(["report", "latest", "--job", str(job), "-o", str(out)]) == 0
    assert f'data-field="run_id">{run_id}<' in out.read_text(encoding="utf-8")


def test_show_of_a_run_without_batches_says_none_were_recorded(tmp_path: Path, capsys: Any) -> None:
    # It printed "batches: " and nothing after it.
    ledger = tmp_path / "work" / "ledger.sqlite"
    make_ledger(ledger)
    assert main(["show", "old", "--workdir", str(ledger.parent)]) == 0
    assert "  batches: none recorded" in capsys.readouterr().out


def test_runs_and_show_name_a_run_no_process_runs_any_more_died(tmp_path: Path, capsys: Any) -> None:
    # A run killed with SIGKILL (or by the OOM killer) records no end: `runs` listed it "running" until the
    # job's next run (audit). While a process holds the job's lock it is running; once none does, it died.
    from sync.config import Destination
    from sync.state import StateStore

    workdir = tmp_path / "work"
    with Ledger.open(workdir / "ledger.sqlite") as ledger:
        ledger.start_run("killed", job="nightly", platform="netmera")
    store = StateStore(workdir, Destination(platform="netmera", base_url="http://127.0.0.1:9/rest/3.0/"))

    def listed() -> dict[str, Any]:
        assert main(["runs", "--workdir", str(workdir), "--output", "json"]) == 0
        (run,) = json.loads(capsys.readouterr().out)
        return dict(run)

    with store.lock():  # the run's process, alive
        assert listed()["status"] == "running"
        assert main(["show", "killed", "--workdir", str(workdir)]) == 0
        assert "killed of job nightly (netmera): running" in capsys.readouterr().out
    run = listed()
    assert run["status"] == "died" and "killed?" in run["message"]
    assert main(["runs", "--workdir", str(workdir)]) == 0
    assert cells(capsys.readouterr().out, "killed")[3:5] == ["-", "died"]
    assert main(["show", "killed", "--workdir", str(workdir)]) == 0
    shown = capsys.readouterr().out
    assert "killed of job nightly (netmera): died" in shown and "the next run of the job" in shown


def test_the_report_of_a_run_no_process_runs_any_more_says_it_died(tmp_path: Path) -> None:
    # `runs` and `show` said "died" for a run killed without recording its end; its report said "running" and
    # "still running (or crashed)" for good.
    from sync.config import Destination
    from sync.state import StateStore

    workdir = tmp_path / "work"
    with Ledger.open(workdir / "ledger.sqlite") as ledger:
        ledger.start_run("done", job="nightly", platform="netmera")
        ledger.finish_run("done", status="done", exit_code=0)
        ledger.start_run("killed", job="nightly", platform="netmera")
    store = StateStore(workdir, Destination(platform="netmera", base_url="http://127.0.0.1:9/rest/3.0/"))
    out = tmp_path / "report.html"

    def page() -> str:
        assert main(["report", "latest", "--workdir", str(workdir), "-o", str(out)]) == 0
        return out.read_text(encoding="utf-8")

    with store.lock():  # the run's process, alive
        alive = page()
    assert 'data-field="status">running<' in alive and "still running" in alive
    dead = page()
    assert 'data-field="status">died<' in dead and "killed?" in dead
    assert 'data-field="exit_status">none: the run ended without recording it<' in dead
    assert '<tr class="this" data-run="killed"><td class="mono">killed</td>' in dead
    assert "<td>running</td>" not in dead and "<td>died</td>" in dead


def test_control_characters_in_a_platforms_answer_are_escaped_in_show_trace_and_the_report(
    tmp_path: Path, capsys: Any
) -> None:
    # A platform's refusal (or a proxy's error page) may echo a value holding an ESC or a NUL. `show` and
    # `trace` wrote it raw to the terminal (ESC[2J cleared the screen) and the report was no longer well-formed
    # XML (the page is polyglot markup).
    import xml.etree.ElementTree as ET

    from sync.records import Batch, BatchResult, BatchStatus, Operation, Phase, RejectedId, RowRef

    hostile = "bad value \x1b[2J\x00\x08 <b>"
    workdir = tmp_path / "work"
    with Ledger.open(workdir / "ledger.sqlite") as ledger:
        ledger.start_run("r1", job="nightly", platform="netmera")
        for i in (0, 1):
            ids = (f"U{i}", f"V{i}")
            ledger.record_planned("r1", Batch(f"b{i}", "tagUsers", Operation.TAG, b"{}", ids, Phase.CHANGES))
        refused = RejectedId("U0", 2009, hostile, RowRef("users.csv", 2))
        ledger.record_result(
            "r1",
            BatchResult(
                "b0", "tagUsers", Operation.TAG, BatchStatus.REJECTED, 1, 400, 2009, hostile, 1, (refused,)
            ),
        )
        ledger.record_result(
            "r1",
            BatchResult(
                "b1", "tagUsers", Operation.TAG, BatchStatus.FAILED, 3, 502, None, f"HTTP 502: {hostile}"
            ),
        )
        ledger.finish_run("r1", status="partial", exit_code=1, message=f"stopped: {hostile}")

    shown = []
    for command in (["show", "r1"], ["runs"], ["trace", "U0"], ["trace", "U1"]):
        assert main([*command, "--workdir", str(workdir)]) == 0
        shown.append(capsys.readouterr().out)
    assert not any(c in text for text in shown for c in "\x1b\x00\x08")
    assert "bad value \\x1b[2J\\x00\\x08 <b>" in shown[0] and "\\x1b[2J" in shown[2] + shown[3]

    out = tmp_path / "report.html"
    assert main(["report", "r1", "--workdir", str(workdir), "-o", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    ET.fromstring(page)  # well-formed: it raised "not well-formed (invalid token)"
    assert "bad value \\x1b[2J\\x00\\x08 &lt;b&gt;" in page


def test_after_the_demo_runs_report_and_trace_find_its_run_from_where_it_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # The demo's workdir was demo-out/work, which the read commands do not search without --job/--workdir:
    # right after `pushsync demo`, `pushsync runs` said "no runs recorded" and `report latest` "no run recorded".
    from sync.demo import run_demo

    monkeypatch.chdir(tmp_path)
    assert run_demo(users=60, output="json") == 0
    run_id = json.loads(capsys.readouterr().out)[
        "run_id"
    ]  # stdout is the summary alone (it had the demo's lines)
    assert main(["runs", "--output", "json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [run_id]
    assert main(["report", "latest", "-o", "report.html"]) == 0
    assert f"wrote the report of run {run_id}" in capsys.readouterr().out
    assert main(["trace", "U0000001", "--output", "json"]) == 0
    assert {e["run_id"] for e in json.loads(capsys.readouterr().out)} == {run_id}


def test_report_and_ledger_export_refuse_to_write_over_the_ledger_they_read(
    tmp_path: Path, capsys: Any
) -> None:
    # `-o` naming the ledger (or its log, or a link to it): the page or the export was renamed over it, exit 0,
    # and every later command said "file is not a database": the job's record of its runs was gone.
    ledger = tmp_path / "work" / "ledger.sqlite"
    make_ledger(ledger)
    (tmp_path / "link.sqlite").symlink_to(ledger)
    before = ledger.read_bytes()
    for out in (ledger, tmp_path / "work" / ".." / "work" / "ledger.sqlite-wal", tmp_path / "link.sqlite"):
        for command in (["report", "new", "-o", str(out)], ["ledger-export", "new", "-o", str(out)]):
            assert main([*command, "--workdir", str(tmp_path / "work")]) == 2
            err = capsys.readouterr().err
            assert (
                err
                == f"pushsync: error: {out}: is the ledger this command reads (or its log): name another file\n"
            )
    assert ledger.read_bytes() == before
    assert main(["runs", "--workdir", str(tmp_path / "work"), "--output", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
