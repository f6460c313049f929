"""``pushsync init``: a first job file from a CSV or Parquet header that loads, plans and maps columns sensibly."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import polars as pl
import pytest

from sync.cli import main
from sync.config import load_job
from sync.errors import ExitCode
from sync.planning.planning import build_plan

CSV = (
    "customer_id,first_name,score,vip,birth_date,segments,email_opt_in,push_opt_in,email,phone,Home City\n"
    "C1,Ann,3.5,true,1990-01-02,gold|vip,true,false,a@x.io,+905551112233,İzmir\n"
    "C2,Bob,4,false,1985-05-06,silver,false,true,b@x.io,+905551112234,Bursa\n"
)


def test_init_maps_a_csv_header_to_a_job_that_loads_and_plans(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "exports").mkdir()
    data = tmp_path / "exports" / "users.csv"
    data.write_text(CSV, encoding="utf-8")
    out = tmp_path / "jobs" / "nightly.yaml"
    assert main(["init", str(data), "-o", str(out), "--name", "nightly crm"]) == 0
    assert "pushsync validate" in capsys.readouterr().out
    job = load_job(out)
    assert job.name == "nightly-crm"  # made a valid job name (it names the workdir)
    (source,) = job.sources
    assert source.ext_id == "customer_id"
    assert [Path(p).resolve() for p in source.paths] == [data.resolve()]
    text = out.read_text(encoding="utf-8")
    assert "path: ../exports/users.csv" in text  # relative to the job file, as job paths are
    for line in (
        "first_name: string",
        "score: number",
        "vip: boolean",
        "birth_date: date",
        '"Home City": string',
    ):
        assert line in text
    assert 'tags: [{column: segments, delimiter: "|"}]' in text
    assert "email: email_opt_in" in text and "push: push_opt_in" in text
    assert "email: email" in text and "msisdn: phone" in text
    assert "secret: {env: NETMERA_API_KEY}" in text
    plan = build_plan(job)
    try:
        summary = plan.summary()
        assert summary.rows_read == 2 and summary.rejected_count == 0
        assert {e.endpoint for e in summary.endpoints} >= {"setProfileAttributes", "tagUsers", "enableMail"}
    finally:
        plan.close()


def test_init_reads_parquet_types_and_takes_the_id_column_given(tmp_path: Path) -> None:
    data = tmp_path / "users.parquet"
    pl.DataFrame(
        {"uid": ["a", "b"], "account": ["x", "y"], "spend": [1.5, 2.0], "joined": [date(2020, 1, 1), None]}
    ).write_parquet(data)
    out = tmp_path / "job.yaml"
    assert main(["init", str(data), "-o", str(out), "--ext-id", "account"]) == 0
    text = out.read_text(encoding="utf-8")
    assert "ext_id: account" in text
    assert "uid: string" in text and "spend: number" in text and "joined: date" in text
    assert load_job(out).sources[0].ext_id == "account"


def test_init_never_overwrites_and_names_a_missing_id_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "users.csv"
    data.write_text(CSV, encoding="utf-8")
    out = tmp_path / "job.yaml"
    out.write_text("# mine\n", encoding="utf-8")
    assert main(["init", str(data), "-o", str(out)]) == ExitCode.BAD_JOB_OR_INPUT
    assert "exists; give --force" in capsys.readouterr().err and out.read_text() == "# mine\n"
    assert (
        main(["init", str(data), "-o", str(out), "--force", "--ext-id", "nope"]) == ExitCode.BAD_JOB_OR_INPUT
    )
    err = capsys.readouterr().err
    assert "no column 'nope'" in err and "customer_id" in err and out.read_text() == "# mine\n"
    assert main(["init", str(data), "-o", str(out), "--force"]) == 0
    assert load_job(out).sources[0].ext_id == "customer_id"


def test_init_names_the_file_asked_for_and_refuses_unusable_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_cli_report import unusable_outputs

    data = tmp_path / "users.csv"
    data.write_text(CSV, encoding="utf-8")
    # A header that maps to no operation: the error names the job file asked for, not a temporary one.
    (tmp_path / "ids.csv").write_text("id\nA\n", encoding="utf-8")
    out = tmp_path / "ids.yaml"
    assert main(["init", str(tmp_path / "ids.csv"), "-o", str(out)]) == ExitCode.BAD_JOB_OR_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"pushsync: error: {out}: 1 problem(s) in job file") and ".tmp" not in err, err
    assert not list(tmp_path.glob("*.yaml*"))
    (tmp_path / "outputs").mkdir()
    for target, reason in unusable_outputs(tmp_path / "outputs"):
        assert main(["init", str(data), "-o", str(target), "--force"]) == ExitCode.BAD_JOB_OR_INPUT
        err = capsys.readouterr().err
        assert err.startswith(f"pushsync: error: {target}: {reason}") and err.count("\n") == 1, err
    assert (tmp_path / "outputs" / "a-fifo").is_fifo()
    # Through a symlink: the linked file is written, the link stays, and the data path is relative to it.
    (tmp_path / "jobs").mkdir()
    link = tmp_path / "job.yaml"
    link.symlink_to(Path("jobs") / "nightly.yaml")
    assert main(["init", str(data), "-o", str(link)]) == 0
    assert link.is_symlink() and (tmp_path / "jobs" / "nightly.yaml").is_file()
    assert [Path(p).resolve() for p in load_job(link).sources[0].paths] == [data.resolve()]


# Per platform: what init needs beyond the file (account settings no header names) and what the plan sends.
_PLATFORM_ARGS = {
    "netmera": ([], {"setProfileAttributes", "tagUsers", "updateEmail", "updateMsisdn"}),
    "notifyvisitors": (["--extra", "brand_id=1000"], {"user/create"}),
    "formsonfire": (["--base-url", "https://eu.example.com/api/v2/", "--extra", "company_id=1000"], {"push"}),
}
PUSH_CSV = (
    "customer_id,title,message,sound,expiry_secs,email,phone,segments,Home City\n"
    "C1,Hi,Hello there,true,3600,a@x.io,+905551112233,gold|vip,İzmir\n"
    "C2,Yo,Welcome,false,600,b@x.io,+905551112234,silver,Bursa\n"
)


def test_init_offers_every_sync_platform() -> None:
    from sync.cli.init_cmd import _offered
    from sync.platforms.formsonfire.requests import MESSAGE_FIELDS
    from sync.platforms.registry import REGISTRY

    # Every platform a job can send to (a new one: give it a StarterJob); Meiro CDP's jobs are not such jobs.
    assert set(_offered()) == set(REGISTRY.names()) == set(_PLATFORM_ARGS)
    starter = REGISTRY["formsonfire"].limits.starter
    assert starter is not None and starter.fields is not None
    assert [f.attribute for f in starter.fields] == list(MESSAGE_FIELDS)  # every message field, and no other


@pytest.mark.parametrize("platform", sorted(_PLATFORM_ARGS))
def test_init_writes_a_job_each_platform_validates_and_plans(
    platform: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args, endpoints = _PLATFORM_ARGS[platform]
    data = tmp_path / "users.csv"
    data.write_text(PUSH_CSV, encoding="utf-8")
    out = tmp_path / "job.yaml"
    assert main(["init", str(data), "-o", str(out), "--platform", platform, *args]) == 0, (
        capsys.readouterr().err
    )
    job = load_job(out)
    assert job.destination.platform == platform and job.sources[0].ext_id == "customer_id"
    secret_env = job.destination.secret_env
    assert secret_env and secret_env.endswith(("_API_KEY", "_INTEGRATION_KEY"))
    monkeypatch.setenv(secret_env, "k3y-Never-In-The-File-0123456789")
    capsys.readouterr()
    assert main(["validate", str(out)]) == 0, capsys.readouterr().err
    text = out.read_text(encoding="utf-8")
    assert f"secret: {{env: {secret_env}}}" in text and "k3y-Never" not in text
    attributes = {a.column: a.attribute for a in job.sources[0].attributes}
    if (
        platform == "formsonfire"
    ):  # a push per row: the message fields only, the other columns named as left out
        assert attributes == {
            "title": "Title",
            "message": "Body",
            "sound": "Sound",
            "expiry_secs": "ExpirySecs",
        }
        assert "# not sent" in text and '"Home City"' in text
        assert job.destination.extra == {"company_id": "1000"}
    else:  # profiles: contact fields mapped, every other column an attribute of its own name
        assert job.sources[0].email == "email" and job.sources[0].msisdn == "phone"
        assert attributes["title"] == "title" and attributes["Home City"] == "Home City"
        assert ("segments" in attributes) is (platform == "notifyvisitors")  # no tags there: an attribute
    plan = build_plan(job)
    try:
        summary = plan.summary()
        assert summary.rows_read == 2 and summary.rejected_count == 0
        assert {e.endpoint for e in summary.endpoints} == endpoints
    finally:
        plan.close()


def test_init_leaves_out_a_column_named_like_an_attribute_a_contact_setting_fills(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """NotifyVisitors sends msisdn: as the attribute mobile. A file with a phone column (taken for msisdn:) and
    a mobile column made a job mapping both: before the load check it lost the mobile column's values without a
    word; with it, init stopped with that error and wrote nothing. Now the mobile column is left out, said in a
    comment, and the job validates."""
    data = tmp_path / "users.csv"
    data.write_text(
        "id,phone,mobile,email,city\nC1,+905551112233,+905551112299,a@x.io,Bursa\n", encoding="utf-8"
    )
    out = tmp_path / "job.yaml"
    argv = ["init", str(data), "-o", str(out), "--platform", "notifyvisitors", "--extra", "brand_id=1000"]
    assert main(argv) == 0, capsys.readouterr().err
    job = load_job(out)
    source = job.sources[0]
    assert source.msisdn == "phone" and {a.column for a in source.attributes} == {"city"}
    assert "# not sent: mobile (msisdn: phone fills notifyvisitors's mobile)" in out.read_text(
        encoding="utf-8"
    )
    monkeypatch.setenv(job.destination.secret_env or "", "k3y-0123456789")
    assert main(["validate", str(out)]) == 0, capsys.readouterr().err


def test_init_asks_for_what_no_header_names_and_never_writes_a_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "users.csv"
    data.write_text(PUSH_CSV, encoding="utf-8")
    out = tmp_path / "job.yaml"
    init = ["init", str(data), "-o", str(out), "--platform"]
    assert main([*init, "notifyvisitors"]) == ExitCode.BAD_JOB_OR_INPUT
    assert (
        "destination.extra.brand_id" in (err := capsys.readouterr().err) and "--extra brand_id=VALUE" in err
    )
    assert main([*init, "formsonfire", "--extra", "company_id=1"]) == ExitCode.BAD_JOB_OR_INPUT
    assert "--base-url: formsonfire has no one production address" in capsys.readouterr().err
    fof = [*init, "formsonfire", "--base-url", "https://eu.example.com/api/v2/"]
    assert main(fof) == ExitCode.BAD_JOB_OR_INPUT
    assert "--extra company_id=VALUE" in capsys.readouterr().err
    key = "s3cr3tIntegrationKey0123456789"
    assert (
        main([*fof, "--extra", "company_id=1", "--extra", f"integration_key={key}"])
        == ExitCode.BAD_JOB_OR_INPUT
    )
    err = capsys.readouterr().err
    assert "--extra integration_key: secrets may not be written" in err and key not in err
    with pytest.raises(SystemExit):  # not KEY=VALUE: a usage error that does not repeat the text
        main([*fof, "--extra", key])
    assert key not in capsys.readouterr().err
    assert not list(tmp_path.glob("*.yaml*"))
    # Forms On Fire sends a push per row: a file with no message column is refused, saying which names it takes.
    ids = tmp_path / "ids.csv"
    ids.write_text("customer_id,score\nC1,1\n", encoding="utf-8")
    fof[1] = str(ids)
    assert main([*fof, "--extra", "company_id=1"]) == ExitCode.BAD_JOB_OR_INPUT
    assert "no column is named like a formsonfire field (title, body" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.yaml*"))


def test_init_names_a_quoted_header_as_validate_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A header cell with a doubled quote (``"nick ""the"" name"``) is ``nick "the" name`` to the reader; polars
    kept the doubled quote, so init wrote a job that `pushsync validate` refused: a column not in the file."""
    data = tmp_path / "users.csv"
    data.write_text('customer_id,"nick ""the"" name",on,NO\nC1,Ann,x,y\n', encoding="utf-8")
    out = tmp_path / "job.yaml"
    assert main(["init", str(data), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["validate", str(out)]) == 0, capsys.readouterr().out
    job = load_job(out)
    assert [a.column for a in job.sources[0].attributes] == ['nick "the" name', "on", "NO"]


@pytest.mark.parametrize(
    ("name", "text", "written"),
    [
        ("users.tsv", "customer_id\tfirst_name\tcity\nC1\tAnn\tIzmir\n", 'delimiter: "\\t"'),
        ("users.csv", "customer_id;first_name;city\nC1;Ann;Izmir\n", 'delimiter: ";"'),
    ],
)
def test_init_writes_the_delimiter_it_read_the_file_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, written: str
) -> None:
    """A TSV file (read with tabs) got a job without a delimiter, which validate then read with commas: one
    column 'customer_id\\tfirst_name\\tcity', exit 2. A semicolon CSV (a European spreadsheet's export) made
    init fail with "maps no column to an operation"."""
    data = tmp_path / name
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "job.yaml"
    assert main(["init", str(data), "-o", str(out)]) == 0
    assert written in out.read_text(encoding="utf-8")
    capsys.readouterr()
    assert main(["validate", str(out)]) == 0, capsys.readouterr().out
    (source,) = load_job(out).sources
    assert source.ext_id == "customer_id"
    assert [a.column for a in source.attributes] == ["first_name", "city"]


def test_init_refuses_a_header_that_repeats_a_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """init wrote a job mapping 'name' and 'name_duplicated_0' (polars' renaming) and said "wrote"; validate then
    refused the file. It is refused by init, with the reader's words, and no job is written."""
    data = tmp_path / "users.csv"
    data.write_text("customer_id,name,city,name\nC1,Ann,Izmir,Bo\n", encoding="utf-8")
    out = tmp_path / "job.yaml"
    assert main(["init", str(data), "-o", str(out)]) == ExitCode.BAD_JOB_OR_INPUT
    assert "duplicate column name(s) in the header: name" in capsys.readouterr().err
    assert not out.exists()
