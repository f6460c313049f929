"""``pushsync resume``, ``retry`` and ``state show``, through the CLI entry point, against the Netmera sandbox
running as a separate process."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import structlog

from sync.cli import main
from tests.conftest import NetmeraProcess, stop_sandbox_process
from tests.netmera_e2e import netmera_job
from tests.test_crash_resume import expected_users, job_text, sandbox_users, write_users


def _post_config(sandbox: NetmeraProcess, doc: dict[str, Any]) -> None:
    req = urllib.request.Request(
        f"{sandbox.root_url}/_sandbox/config",
        data=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def _stats(sandbox: NetmeraProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{sandbox.root_url}/_sandbox/stats", timeout=10) as resp:
        return dict(json.loads(resp.read()))


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    # main() configures structlog to print to the (captured, then closed) stderr of this test: later tests in
    # the same process must not inherit that stream.
    yield
    structlog.reset_defaults()


@pytest.fixture
def workspace(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, NetmeraProcess]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETMERA_API_KEY", netmera_sandbox_process.api_key)
    return tmp_path, netmera_sandbox_process


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_retry_replays_only_the_failed_batches(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, sandbox = workspace
    (tmp / "job.yaml").write_text(job_text(sandbox.url, "changes"), encoding="utf-8")
    rows = write_users(tmp, range(200))
    _post_config(sandbox, {"faults": {"error_500": 1.0, "endpoints": ["tagUsers"]}})
    code, out, _ = run_cli(capsys, "run", "job.yaml", "--progress", "none", "--output", "json")
    assert code == 1
    run_id = json.loads(out)["run_id"]
    assert sandbox_users(sandbox) != expected_users(rows)  # the tags are missing
    _post_config(sandbox, {"faults": {"error_500": 0.0}})
    before = _stats(sandbox)["requests"]
    code, out, err = run_cli(
        capsys, "retry", run_id, "--job", "job.yaml", "--progress", "none", "--output", "json"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["replay"]["skipped_confirmed"] > 0 and doc["replay"]["sent"] == doc["totals"]["requests"]
    after = _stats(sandbox)["requests"]
    resent = {ep for ep, by_status in after.items() if by_status != before.get(ep)}
    assert resent == {"tagUsers"}
    assert sandbox_users(sandbox) == expected_users(rows)
    # `runs` and `show` say which run the retry retried, and where both sent.
    retry_id = doc["run_id"]
    code, out, _ = run_cli(capsys, "runs", "job.yaml", "--output", "json")
    listed = {r["run_id"]: r for r in json.loads(out)}
    assert (listed[retry_id]["origin"], listed[retry_id]["origin_mode"]) == (run_id, "retry")
    assert listed[run_id]["origin"] is None
    assert listed[run_id]["destination"] == listed[retry_id]["destination"]
    assert listed[run_id]["destination"].startswith("netmera-")
    code, out, _ = run_cli(capsys, "runs", "job.yaml")
    assert code == 0 and f"retry {run_id}" in " ".join(out.split())
    code, out, _ = run_cli(capsys, "show", retry_id, "--job", "job.yaml")
    assert code == 0 and f"retry of run {run_id} · to netmera-" in out


def test_a_second_retry_resends_nothing_the_first_confirmed(
    workspace: tuple[Path, NetmeraProcess],
    netmera_process_factory: Callable[..., NetmeraProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A retry cuts each refused batch down to its refused IDs: a batch with an ID of its own. Once a retry has
    # confirmed that cut, retrying the same run again must not send it again (the audit saw every retry resend
    # the same 30 IDs), and a resume must not either.
    tmp, _ = workspace
    rows = write_users(tmp, range(200))
    unknown = {f"user{i:05d}" for i in range(190, 200)}
    seed = {"users": [{"extId": r[0]} for r in rows if r[0] not in unknown]}
    (tmp / "seed.json").write_text(json.dumps(seed), encoding="utf-8")
    (tmp / "strict.yaml").write_text("unknown_ext_id: error\n", encoding="utf-8")
    strict = netmera_process_factory(
        "--config", str(tmp / "strict.yaml"), "--seed-file", str(tmp / "seed.json")
    )
    (tmp / "job.yaml").write_text(job_text(strict.url, "changes"), encoding="utf-8")
    code, out, err = run_cli(capsys, "run", "job.yaml", "--progress", "none", "--output", "json")
    assert code == 1, err
    run_id = json.loads(out)["run_id"]
    # The cause fixed: the platform now creates unknown users (the sandbox restarted, at the same address: a
    # retry of a run that sent to another base URL is refused, as another destination's).
    stop_sandbox_process(strict.process)
    created = netmera_process_factory("--port", str(urlsplit(strict.url).port))
    assert created.url == strict.url
    retry = ("retry", run_id, "--job", "job.yaml", "--progress", "none", "--output", "json")
    code, out, err = run_cli(capsys, *retry)
    assert code == 0, err
    first = json.loads(out)
    assert first["replay"]["cut_to_refused"] > 0 and first["totals"]["requests"] > 0
    assert sandbox_users(created) == expected_users([r for r in rows if r[0] in unknown])
    before = _stats(created)["requests"]
    code, out, err = run_cli(capsys, *retry)
    assert code == 0, err
    second = json.loads(out)
    assert second["totals"]["requests"] == 0 and second["replay"]["sent"] == 0
    assert (
        second["replay"]["skipped_confirmed"]
        == first["replay"]["skipped_confirmed"] + first["replay"]["sent"]
    )
    code, out, err = run_cli(capsys, "resume", run_id, "--job", "job.yaml", "--progress", "none")
    assert code == 0 and "nothing to resume" in out, err
    assert _stats(created)["requests"] == before


def test_resume_and_retry_take_latest_as_show_does(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    # `show latest`, `report latest` and `ledger-export latest` took it; `resume latest` said "no run latest".
    tmp, sandbox = workspace
    (tmp / "job.yaml").write_text(job_text(sandbox.url, "changes"), encoding="utf-8")
    write_users(tmp, range(50))
    code, out, err = run_cli(capsys, "run", "job.yaml", "--progress", "none", "--output", "json")
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    code, out, err = run_cli(capsys, "resume", "latest", "--job", "job.yaml", "--progress", "none")
    assert code == 0 and f"run {run_id} finished (done): nothing to resume" in out, (out, err)
    code, out, err = run_cli(
        capsys, "resume", "latest", "--workdir", "work", "--progress", "none"
    )  # no --job
    assert code == 0 and f"run {run_id} finished (done): nothing to resume" in out, (out, err)
    code, out, err = run_cli(
        capsys, "retry", "latest", "--job", "job.yaml", "--progress", "none", "--output", "json"
    )
    assert code == 0, err
    assert json.loads(out)["resumed_from"] == run_id and json.loads(out)["totals"]["requests"] == 0


def test_state_show_lists_users_fields_and_tags(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, sandbox = workspace
    (tmp / "job.yaml").write_text(job_text(sandbox.url, "snapshot"), encoding="utf-8")
    write_users(tmp, range(64))
    assert run_cli(capsys, "run", "job.yaml", "--progress", "none")[0] == 0
    code, out, _ = run_cli(capsys, "state", "show", "job.yaml", "--output", "json")
    assert code == 0
    doc = json.loads(out)
    users = doc["sources"]["users"]
    assert doc["mode"] == "snapshot" and doc["pending_runs"] == []
    assert users["users"] == 64
    assert users["fields"]["attr:name"] == 64 and users["fields"]["attr:city"] == 64 - 13  # i % 5 == 0: empty
    assert users["tags"] == {"gold": 32, "silver": 32, "beta": 32}
    code, text, _ = run_cli(capsys, "state", "show", "job.yaml")
    assert "64 users" in text and "gold (32)" in text


def test_retry_full_refresh_sends_everything_again(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, sandbox = workspace
    (tmp / "job.yaml").write_text(job_text(sandbox.url, "snapshot"), encoding="utf-8")
    rows = write_users(tmp, range(100))
    code, out, _ = run_cli(capsys, "run", "job.yaml", "--progress", "none", "--output", "json")
    first = json.loads(out)
    assert code == 0 and first["totals"]["requests"] > 0
    code, out, _ = run_cli(capsys, "run", "job.yaml", "--progress", "none", "--output", "json")
    assert json.loads(out)["totals"]["requests"] == 0
    code, out, err = run_cli(
        capsys,
        "retry",
        first["run_id"],
        "--job",
        "job.yaml",
        "--full-refresh",
        "--progress",
        "none",
        "--output",
        "json",
    )
    assert code == 0, err
    again = json.loads(out)
    # everything again, plus one unset request for the users with an empty city
    assert again["totals"]["requests"] == first["totals"]["requests"] + 1
    assert sandbox_users(sandbox) == expected_users(rows)


def test_resume_of_an_unknown_run_is_an_error(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, sandbox = workspace
    (tmp / "job.yaml").write_text(job_text(sandbox.url, "snapshot"), encoding="utf-8")
    write_users(tmp, range(10))
    code, _, err = run_cli(capsys, "resume", "20990101T000000Z-dead", "--job", "job.yaml")
    assert code == 2 and "no run 20990101T000000Z-dead" in err
    code, _, err = run_cli(capsys, "resume", "20990101T000000Z-dead")
    assert code == 2 and "give --job JOB" in err


def test_plan_shows_the_diff_of_a_snapshot_job(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, sandbox = workspace
    (tmp / "job.yaml").write_text(
        job_text(sandbox.url, "snapshot", removal="untag", share=0.5), encoding="utf-8"
    )
    write_users(tmp, range(300))
    code, out, _ = run_cli(capsys, "plan", "job.yaml", "--output", "json")
    first = json.loads(out)
    assert code == 0 and first["mode"] == "snapshot" and first["diff"]["users_new"] == 300
    assert run_cli(capsys, "run", "job.yaml", "--progress", "none")[0] == 0
    write_users(tmp, range(290), churn=1)  # 3 scores changed (i % 100 == 7), 10 users left
    before = _stats(sandbox)["requests_total"]
    code, out, _ = run_cli(capsys, "plan", "job.yaml", "--output", "json")
    doc = json.loads(out)
    assert doc["diff"]["users_changed"] == 3 and doc["diff"]["values_set"] == 3
    assert (
        doc["diff"]["users_left"] == 10 and doc["diff"]["users_removed"] == 10 - 10 // 8
    )  # user 288: no tags
    assert {e["endpoint"] for e in doc["endpoints"]} == {"setProfileAttributes", "untagUsers"}
    code, text, _ = run_cli(capsys, "plan", "job.yaml")
    assert (
        "Snapshot diff against the confirmed state" in text
        and "3 changed" in text
        and "within the threshold" in text
    )
    assert _stats(sandbox)["requests_total"] == before  # plan sends nothing
    code, out, _ = run_cli(capsys, "state", "show", "job.yaml", "--output", "json")
    assert json.loads(out)["pending_runs"] == []  # and leaves nothing behind


def test_job_files_declare_the_mode_and_the_snapshot_options(tmp_path: Path) -> None:
    from sync.config import RemovalAction, SyncMode, load_job
    from sync.errors import BadJobError

    (tmp_path / "job.yaml").write_text(
        job_text("http://127.0.0.1:9/rest/3.0/", "snapshot", removal="delete", share=0.02), encoding="utf-8"
    )
    job = load_job(tmp_path / "job.yaml")
    assert job.mode is SyncMode.SNAPSHOT
    assert job.snapshot.removal is RemovalAction.DELETE and job.snapshot.max_removal_share == 0.02
    assert (
        load_job_text(tmp_path, job_text("http://127.0.0.1:9/rest/3.0/", "changes")).mode is SyncMode.CHANGES
    )
    bad = job_text("http://127.0.0.1:9/rest/3.0/", "snapshot").replace(
        "sources:\n", "sources:\n  - {name: buys, kind: events, path: e.csv, ext_id: id, event: name}\n"
    )
    with pytest.raises(BadJobError) as info:
        load_job_text(tmp_path, bad)
    assert [p.location for p in info.value.problems] == ["sources[0].kind"]
    assert "snapshot mode takes users exports only" in str(info.value.problems[0])
    text = job_text("http://127.0.0.1:9/rest/3.0/", "changes") + "snapshot: {removal: untag}\n"
    with pytest.raises(BadJobError, match="only used with mode: snapshot"):
        load_job_text(tmp_path, text)
    text = job_text("http://127.0.0.1:9/rest/3.0/", "snapshot", removal="purge")
    with pytest.raises(BadJobError, match="purge"):
        load_job_text(tmp_path, text)


def load_job_text(tmp_path: Path, text: str) -> Any:
    from sync.config import load_job

    (tmp_path / "other.yaml").write_text(text, encoding="utf-8")
    return load_job(tmp_path / "other.yaml")


def test_resume_of_a_completed_run_says_there_is_nothing_to_resume(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, sandbox = workspace
    (tmp / "job.yaml").write_text(job_text(sandbox.url, "changes"), encoding="utf-8")
    write_users(tmp, range(50))
    code, out, _ = run_cli(capsys, "run", "job.yaml", "--progress", "none", "--output", "json")
    assert code == 0
    run_id = json.loads(out)["run_id"]
    code, out, err = run_cli(capsys, "resume", run_id, "--job", "job.yaml", "--progress", "none")
    assert code == 0, err
    assert f"run {run_id} finished (done): nothing to resume" in out
    code, out, _ = run_cli(capsys, "runs", "job.yaml", "--output", "json")
    assert [r["run_id"] for r in json.loads(out)] == [run_id]  # no new, empty run recorded


def test_resume_of_an_interrupted_full_refresh_finishes_the_full_refresh(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, sandbox = workspace
    (tmp / "job.yaml").write_text(job_text(sandbox.url, "snapshot"), encoding="utf-8")
    rows = write_users(tmp, range(100))
    code, out, _ = run_cli(capsys, "run", "job.yaml", "--progress", "none", "--output", "json")
    first = json.loads(out)
    assert code == 0 and first["totals"]["requests"] > 0
    # The full refresh fails on every request: nothing of it is confirmed.
    _post_config(sandbox, {"faults": {"error_500": 1.0}})
    code, out, _ = run_cli(
        capsys, "run", "job.yaml", "--full-refresh", "--progress", "none", "--output", "json"
    )
    refresh = json.loads(out)
    assert code == 1 and refresh["totals"]["ids_ok"] == 0
    _post_config(sandbox, {"faults": {"error_500": 0.0}})
    code, out, err = run_cli(
        capsys, "resume", refresh["run_id"], "--job", "job.yaml", "--progress", "none", "--output", "json"
    )
    assert code == 0, err
    resumed = json.loads(out)
    # The state already holds every user: an ordinary diff would send nothing; the full refresh sends all
    # again (plus one unset request for the users with an empty city).
    assert resumed["totals"]["requests"] == first["totals"]["requests"] + 1
    assert sandbox_users(sandbox) == expected_users(rows)
    from sync.ledger.ledger import Ledger

    with Ledger.open(tmp / "work" / "ledger.sqlite") as ledger:
        info = ledger.run(resumed["run_id"])
    assert info is not None and info.full_refresh  # a resume of this resume finishes the full refresh too


def test_the_state_line_says_what_its_unconfirmed_batches_are(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, sandbox = workspace
    (tmp / "job.yaml").write_text(job_text(sandbox.url, "snapshot"), encoding="utf-8")
    write_users(tmp, range(100))
    _post_config(sandbox, {"faults": {"error_500": 1.0, "endpoints": ["tagUsers"]}})
    code, out, _ = run_cli(capsys, "run", "job.yaml", "--progress", "none")
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith("state: "))
    # Every failed batch is counted as not confirmed, split into unfinished (none: the run was not stopped)
    # and failed or refused, so that the summary's "batches unfinished" cannot seem to contradict it.
    assert "batches unfinished" not in out
    assert " batches not confirmed (0 unfinished, " in line and "will be sent again" not in line
    n = int(line.split("; ")[1].split(" ")[0])
    assert n > 0 and f"(0 unfinished, {n} failed or refused)" in line


def test_state_show_escapes_control_characters_of_the_tags(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """A tag is written as the export holds it: one holding ESC[2J (or a CR) printed raw by ``state show``
    cleared (rewrote) the operator's terminal. The text shows it escaped; the JSON keeps the exact value."""
    tmp, sandbox = workspace
    (tmp / "job.yaml").write_text(job_text(sandbox.url, "snapshot"), encoding="utf-8")
    lines = ["id,name,score,city,segments,mail,news", 'user1,Ann,1,Paris,"x\x1b[2Jred|new\rline",yes,true']
    (tmp / "users.csv").write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
    assert run_cli(capsys, "run", "job.yaml", "--progress", "none")[0] == 0
    code, text, _ = run_cli(capsys, "state", "show", "job.yaml")
    assert code == 0
    assert "\x1b" not in text and "\r" not in text
    assert "x\\x1b[2Jred (1)" in text and "new\\rline (1)" in text
    code, out, _ = run_cli(capsys, "state", "show", "job.yaml", "--output", "json")
    assert json.loads(out)["sources"]["users"]["tags"] == {"new\rline": 1, "x\x1b[2Jred": 1}


def test_plan_refuses_removals_per_source_as_the_run_does(
    workspace: tuple[Path, NetmeraProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """The run checks ``max_removal_share`` per source; the plan checked the sum over sources, so 10 of a small
    source's 100 users leaving (10 %) hid among a big source's 1,000 (0.9 %): the plan said "within the
    threshold" and the run was refused. Now the plan names the source the run refuses."""
    tmp, sandbox = workspace
    sources = (
        "  - {name: small, path: small.csv, ext_id: id, tags: {column: segs}}\n"
        "  - {name: big, path: big.csv, ext_id: id, attributes: {name: string}}\n"
    )
    job = netmera_job(
        sandbox.url,
        name="two-sources",
        head="mode: snapshot\nsnapshot: {removal: untag, max_removal_share: 0.05}\n",
        sources=sources,
        dispatch="  batch_size: 500\n",
    )
    (tmp / "job.yaml").write_text(job, encoding="utf-8")
    (tmp / "big.csv").write_text("id,name\n" + "".join(f"B{i},n\n" for i in range(1000)), encoding="utf-8")
    (tmp / "small.csv").write_text("id,segs\n" + "".join(f"S{i},t\n" for i in range(100)), encoding="utf-8")
    assert run_cli(capsys, "run", "job.yaml", "--progress", "none")[0] == 0
    (tmp / "small.csv").write_text("id,segs\n" + "".join(f"S{i},t\n" for i in range(90)), encoding="utf-8")

    code, text, _ = run_cli(capsys, "plan", "job.yaml")
    assert code == 0 and "refused without --force: source 'small'" in text
    code, out, _ = run_cli(capsys, "plan", "job.yaml", "--output", "json")
    assert json.loads(out)["diff"]["removals_refused_sources"] == ["small"]
    code, _, err = run_cli(capsys, "run", "job.yaml", "--progress", "none")
    assert code == 2 and "source 'small': 10 of 100 users" in err
