"""`pushsync validate` and `pushsync plan`, through the real command line entry point."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from sync.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = Path("jobs") / "example.yaml"  # a copy in the test's directory (see _scratch_cwd)
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def _scratch_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Jobs without a workdir key write into .pushsync/ beside the job file: plan a copy of the example jobs, so
    # nothing is written into the source tree.
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs", ignore=shutil.ignore_patterns(".pushsync"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NETMERA_API_KEY", raising=False)


def test_validate_the_example_job(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "'example'" in out
    assert "NETMERA_API_KEY is not set" in out  # a note, not an error: plan and validate need no secret


def test_validate_and_plan_note_a_field_two_users_sources_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two users sources setting the same field: a user in both got whichever request landed last, Paris or
    # Berlin from one run to the next (connectors audit). Told, not refused: sources of different users are sound.
    (tmp_path / "eu.csv").write_text("id,city,push,tags\nU1,Paris,yes,a|b\n", encoding="utf-8")
    (tmp_path / "de.csv").write_text("id,city,push,tags\nU1,Berlin,no,c\n", encoding="utf-8")
    job = tmp_path / "job.yaml"
    job.write_text(
        "version: 1\nname: regions\nworkdir: work\n"
        "destination: {platform: netmera, base_url: 'http://127.0.0.1:9/rest/3.0/', secret: {env: NETMERA_API_KEY}}\n"
        "sources:\n"
        "  - {name: eu, path: eu.csv, ext_id: id, attributes: {city: string, tags: {attribute: seen, type: list,"
        " mode: push}}, opt_ins: {push: push}}\n"
        "  - {name: de, path: de.csv, ext_id: id, attributes: {city: string, tags: {attribute: seen, type: list,"
        " mode: push}}, opt_ins: {push: push}}\n",
        encoding="utf-8",
    )
    assert main(["validate", str(job)]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: ") and "is set by sources" in line]
    assert [n.split(" is set by")[0] for n in notes] == ["note: attribute city", "note: the push opt-in"]
    assert "eu, de" in notes[0] and "one source with several files" in notes[0]
    assert main(["validate", str(job), "--output", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["notes"]) == 2
    assert main(["plan", str(job)]) == 0
    assert "Note: attribute city is set by sources eu, de" in capsys.readouterr().out

    # One source, the same files: the newest row decides, nothing to say.
    job.write_text(
        job.read_text(encoding="utf-8").split("  - {name: eu")[0]
        + "  - {name: all, path: '*.csv', ext_id: id, attributes: {city: string}, opt_ins: {push: push}}\n",
        encoding="utf-8",
    )
    assert main(["validate", str(job), "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []


def test_validate_notes_a_coordination_database_url_that_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """validate said OK for a job whose ``coordination.database`` variable was unset; ``run`` then stopped."""
    (tmp_path / "users.csv").write_text("id,city\nU1,Paris\n", encoding="utf-8")
    job = tmp_path / "job.yaml"
    head = (
        "version: 1\nname: scaled\nworkdir: work\n"
        "destination: {platform: netmera, base_url: 'http://127.0.0.1:9/rest/3.0/', secret: {env: NETMERA_API_KEY}}\n"
        "sources:\n  - {name: users, path: users.csv, ext_id: id, attributes: {city: string}}\n"
    )
    monkeypatch.setenv("NETMERA_API_KEY", "k")
    monkeypatch.delenv("PUSHSYNC_TEST_SYNC_DB", raising=False)
    job.write_text(head + "coordination: {database: {env: PUSHSYNC_TEST_SYNC_DB}}\n", encoding="utf-8")
    assert main(["validate", str(job)]) == 0
    out = capsys.readouterr().out
    assert "note: environment variable PUSHSYNC_TEST_SYNC_DB (coordination.database) is not set" in out
    job.write_text(head + "coordination: {database: {file: sync-db-url}}\n", encoding="utf-8")
    assert main(["validate", str(job)]) == 0
    assert (
        f"note: file {tmp_path / 'sync-db-url'} (coordination.database) does not exist"
        in capsys.readouterr().out
    )
    monkeypatch.setenv("PUSHSYNC_TEST_SYNC_DB", "postgresql://db.example/sync")
    job.write_text(head + "coordination: {database: {env: PUSHSYNC_TEST_SYNC_DB}}\n", encoding="utf-8")
    assert main(["validate", str(job)]) == 0
    assert "coordination.database" not in capsys.readouterr().out


def test_validate_notes_a_secret_file_run_could_not_read_a_key_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A directory was said not to exist, an empty key file and a variable holding only spaces passed unnoted:
    # validate said OK, then `pushsync run` stopped on the secret.
    job = tmp_path / "jobs" / "keyed.yaml"
    example = (tmp_path / "jobs" / "example.yaml").read_text(encoding="utf-8")
    job.write_text(example.replace("{env: NETMERA_API_KEY}", "{file: netmera.key}"), encoding="utf-8")
    key = tmp_path / "jobs" / "netmera.key"
    key.mkdir()
    assert main(["validate", str(job), "--no-files"]) == 0
    assert f"note: secret file {key} is a directory, not a file;" in capsys.readouterr().out
    key.rmdir()
    key.write_text("", encoding="utf-8")
    assert main(["validate", str(job), "--no-files"]) == 0
    assert f"note: secret file {key} is empty;" in capsys.readouterr().out
    key.write_text("k" * 8 + "\r\n", encoding="utf-8")
    assert main(["validate", str(job), "--no-files"]) == 0
    assert "note:" not in capsys.readouterr().out  # a key and its line break: what a key file holds
    monkeypatch.setenv("NETMERA_API_KEY", "   ")
    assert main(["validate", str(EXAMPLE), "--no-files"]) == 0
    assert "NETMERA_API_KEY is not set or empty;" in capsys.readouterr().out


def test_validate_reports_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "destination: {platform: netmera, base_url: x, secret: hunter2-literal}\n"
        "sources:\n  - {name: u, path: u.csv, attributes: {a: integer}}\nextra: 1\n",
        encoding="utf-8",
    )
    assert main(["validate", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "problem(s)" in out
    for location in (
        "destination.secret",
        "destination.base_url",
        "sources[0].attributes.a",
        "unknown key(s) 'extra'",
    ):
        assert location in out
    assert "hunter2-literal" not in out

    assert main(["validate", str(bad), "--output", "json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is False and len(doc["problems"]) >= 4
    assert all(set(p) == {"location", "message"} for p in doc["problems"])


def test_validate_checks_the_input_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(FIXTURES, tmp_path / "job")
    (tmp_path / "job" / "events.csv").write_text("id,event\nu1,x\n", encoding="utf-8")
    (tmp_path / "job" / "deletions.csv").unlink()
    assert main(["validate", str(tmp_path / "job" / "all_ops.yaml")]) == 2
    out = capsys.readouterr().out
    assert "'amount', 'sku'" in out and "events.csv" in out
    assert "deletions.csv" in out and "file not found" in out
    assert main(["validate", "--no-files", str(tmp_path / "job" / "all_ops.yaml")]) == 0


def test_plan_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "nothing was sent" in out
    assert "Rows: 24 read, 16 clean, 8 rejected" in out
    # the workdir sits beside the job file; shown relative to the current directory, or absolute
    assert "Rejects file: jobs/.pushsync/example/rejects.csv" in out
    assert "users.csv row 4, column email: not a valid email address" in out
    for endpoint in (
        "tagUsers",
        "setProfileAttributes",
        "setCategoryPreferences",
        "disablePush",
        "enableMail",
    ):
        assert endpoint in out
    assert "estimated duration" in out
    assert 'tagUsers: {"extIds": [' in out and '"tag": ' in out  # a sample payload (keys in canonical order)
    assert Path("jobs/.pushsync/example/rejects.csv").is_file()


def test_plan_json_for_scripts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rejects = tmp_path / "r.csv"
    assert main(["plan", str(EXAMPLE), "--output", "json", "--rejects", str(rejects)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["job"] == "example" and doc["rejects_path"] == str(rejects)
    assert doc["rows"] == {"read": 24, "clean": 16, "rejected": 8, "duplicates_dropped": 0}
    assert doc["requests"] == sum(e["requests"] for e in doc["endpoints"])
    assert doc["estimated_seconds"] > 0
    assert {e["phase"] for e in doc["endpoints"]} == {"opt_out", "changes", "deletions"}
    assert doc["endpoints"][0]["phase"] == "opt_out" and doc["endpoints"][-1]["phase"] == "deletions"
    assert doc["samples"]["deleteUsersPermanently"] == {"extIds": ["C011", "C010"]}
    assert len(doc["rejected_sample"]) == 8
    assert doc["rejected_sample"][0] == {
        "file": str(Path("jobs/data/users.csv").resolve()),
        "row": 4,
        "column": "email",
        "reason": "not a valid email address",
        "ext_id": "C004",
    }


def test_plan_with_a_directory_as_rejects_file_names_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `plan --rejects DIR` read the whole input, then said "cannot write the job's working files (DIR): Is a
    # directory; check the workdir": the workdir was fine, the --rejects path was not.
    assert main(["plan", str(EXAMPLE), "--rejects", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: is a directory; name a file to write" in err and "workdir" not in err


def test_plan_of_an_unreadable_file_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(FIXTURES, tmp_path / "job")
    (tmp_path / "job" / "users.csv").write_bytes("id,name\nu1,Müller\n".encode("utf-16"))
    assert main(["plan", str(tmp_path / "job" / "all_ops.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "users.csv" in err and "encoding" in err


def test_plan_table_lists_endpoints_in_send_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Opt-outs are sent first; the table a person reads must list them first too (snapshot mode's diff included)."""
    (tmp_path / "users.csv").write_text(
        "id,name,seg,push,mail\nu1,Ann,a|b,1,0\nu2,Bob,b,0,1\n", encoding="utf-8"
    )
    job = tmp_path / "job.yaml"
    job.write_text(
        "version: 1\nname: order\nmode: snapshot\n"
        "destination: {platform: netmera, base_url: 'http://127.0.0.1:9/rest/3.0/', secret: {env: NETMERA_API_KEY}}\n"
        "sources:\n  - name: users\n    path: users.csv\n    ext_id: id\n"
        "    attributes: {name: string}\n    tags: [{column: seg, delimiter: '|'}]\n"
        "    opt_ins: {push: push, email: mail}\n",
        encoding="utf-8",
    )
    assert main(["plan", str(job)]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.split()[:1] in (["opt_out"], ["changes"])]
    assert rows.count("opt_out") >= 2 and "changes" in rows
    assert rows == sorted(rows, key=lambda phase: phase != "opt_out")


def test_sigterm_while_staging_stops_the_plan_and_removes_its_staging(tmp_path: Path) -> None:
    # A scheduler stops a job with SIGTERM: the plan stops as on SIGINT (exit 4), removing gigabytes of staging
    # rather than leaving them to the next plan.
    from tests.netmera_e2e import pushsync, write_users
    from tests.test_crash_resume import job_text

    job = tmp_path / "sigterm"
    job.mkdir()
    (job / "job.yaml").write_text(job_text("http://127.0.0.1:9/rest/3.0/", "changes"), encoding="utf-8")
    write_users(job, range(400_000))
    process = pushsync(job, "unused-key", "plan", "job.yaml")
    try:
        deadline = time.monotonic() + 60
        while not list((job / "work").glob("plan-*")) and process.poll() is None:
            assert time.monotonic() < deadline, "the plan never began staging"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 4, err
    assert "pushsync: interrupted" in err
    assert not list((job / "work").glob("plan-*"))


def test_plan_notes_the_users_a_run_both_changes_and_deletes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A deletions file that lists users other sources of the run change (here: the wrong export, the active
    users) showed only as `deleteUsersPermanently … 3 IDs`: those users would get their changes, then be deleted
    for good. The plan now says how many each source shares with the deletions, in text and JSON."""
    (tmp_path / "job.yaml").write_text(
        """\
version: 1
name: leavers
workdir: work
destination: {platform: netmera, base_url: "http://127.0.0.1:9/rest/3.0/", secret: {env: NETMERA_API_KEY}}
sources:
  - {name: users, path: users.csv, ext_id: id, attributes: {name: string}}
  - {name: purchases, kind: events, path: events.csv, ext_id: id, event: event}
  - {name: leavers, kind: deletions, path: deleted.csv, ext_id: id}
""",
        encoding="utf-8",
    )
    (tmp_path / "users.csv").write_text("id,name\na,Ann\nb,Bob\nc,Cy\n", encoding="utf-8")
    (tmp_path / "events.csv").write_text("id,event\na,login\na,logout\nz,login\n", encoding="utf-8")
    (tmp_path / "deleted.csv").write_text("id\na\nb\nx\n", encoding="utf-8")
    assert main(["plan", "job.yaml"]) == 0
    out = capsys.readouterr().out
    assert (
        "Note: source leavers deletes 3 users, some of whom this run also changes or sends events for "
        "(2 by users, 1 by purchases)"
    ) in out
    assert "deleteUsersPermanently" in out and "Requests" in out  # the counts are made as before
    assert main(["plan", "job.yaml", "--output", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [n for n in doc["notes"] if n.startswith("source leavers")] and doc["ids"] == 3 + 2 + 3
    (tmp_path / "deleted.csv").write_text("id\nx\n", encoding="utf-8")
    assert main(["plan", "job.yaml", "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []
