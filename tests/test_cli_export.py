"""``pushsync export ...`` end to end against a Netmera sandbox (in-process; the CLI runs in a worker thread with
its own event loop, as it would in its own process)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from sync.cli import main
from sync.sandboxes._core import FaultSpec, RateLimit


def _job(tmp_path: Path, url: str) -> Path:
    job = tmp_path / "audit.yaml"
    job.write_text(
        f"""
version: 1
name: audit
destination:
  platform: netmera
  base_url: {url}
  secret: {{env: AUDIT_NETMERA_KEY}}
defaults: {{ext_id: customer_id}}
sources:
  - name: users
    path: users.csv
    attributes: {{city: string}}
dispatch:
  request_timeout: 5
  retry: {{max_attempts: 10, base_delay: 0.005, max_delay: 0.05}}
"""
    )
    return job


def _files(folder: Path) -> list[Path]:
    return list(folder.iterdir())


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_device_tokens_to_parquet_with_the_key_from_the_environment(
    netmera_sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    netmera_sandbox.sandbox.state.add_synthetic(15_000, 2)
    monkeypatch.setenv("NETMERA_API_KEY", netmera_sandbox.api_key)
    out = tmp_path / "tokens.parquet"
    code = await cli(
        "export",
        "device-tokens",
        "--base-url",
        netmera_sandbox.url,
        "-o",
        str(out),
        "--progress",
        "none",
        "--output",
        "json",
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 30_000 and summary["format"] == "parquet" and summary["pages"] == 30
    frame = pl.read_parquet(out)
    assert frame.columns == ["platform", "token", "deviceModel", "pushPermitted"]
    assert frame["token"].n_unique() == 30_000
    assert frame["token"].to_list() == list(netmera_sandbox.sandbox.state.devices)


async def test_a_job_drives_every_export_with_faults_and_limits_on(
    netmera_sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = netmera_sandbox.sandbox.state
    members = [f"c{i}" for i in range(1_250)]
    state.load({"segments": [{"id": 9, "name": "buyers", "members": members}]})
    for i in range(0, 1_250, 5):
        state.user(members[i]).profile = {"city": f"City {i}"}
    state.add_synthetic(2_000, 1)
    netmera_sandbox.sandbox.configure(
        faults=FaultSpec(error_500=0.1, error_503=0.05, drop=0.02), seed=5, limits={"*": RateLimit(1000, 1.0)}
    )
    monkeypatch.setenv("AUDIT_NETMERA_KEY", netmera_sandbox.api_key)
    job = str(_job(tmp_path, netmera_sandbox.url))
    common = ("--job", job, "--progress", "none")

    assert (
        await cli("export", "device-tokens", *common, "-o", str(tmp_path / "d.csv"), "--page-size", "250")
        == 0
    )
    assert pl.read_csv(tmp_path / "d.csv")["token"].n_unique() == 2_000

    assert await cli("export", "segments", *common, "--os", "ios", "-o", str(tmp_path / "s.parquet")) == 0
    assert pl.read_parquet(tmp_path / "s.parquet").to_dicts() == [
        {"os": "IOS", "id": 9, "name": "buyers", "userCount": 1_250, "type": "PRODUCT_SEGMENT"}
    ]

    assert (
        await cli("export", "segment-users", "9", "--os", "ANDROID", *common, "-o", str(tmp_path / "u.csv"))
        == 0
    )
    assert pl.read_csv(tmp_path / "u.csv")["externalId"].to_list() == members

    ids = tmp_path / "crm.csv"
    pl.DataFrame({"customer_id": [*members[:100], "not-on-netmera"]}).write_csv(ids)
    out = tmp_path / "p.parquet"
    code = await cli(
        "export",
        "profiles",
        "--ids",
        str(ids),
        "--id-column",
        "customer_id",
        *common,
        "-o",
        str(out),
        "--format",
        "parquet",
    )
    assert code == 0
    profiles = pl.read_parquet(out)
    assert profiles.height == 101 and profiles["extId"].to_list()[-1] == "not-on-netmera"
    assert profiles.filter(pl.col("extId") == "c5")["profile"].to_list() == ['{"city": "City 5"}']
    assert profiles["found"].to_list()[-1] is False
    assert netmera_sandbox.sandbox.stats.faults() > 0
    assert "wrote 101 profiles" in capsys.readouterr().out


async def test_missing_or_wrong_keys_fail_clearly_and_write_nothing(
    netmera_sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tokens.parquet"
    monkeypatch.delenv("NETMERA_API_KEY", raising=False)
    assert await cli("export", "device-tokens", "--base-url", netmera_sandbox.url, "-o", str(out)) == 2
    assert "NETMERA_API_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("NETMERA_API_KEY", "a-wrong-key-4567")
    assert (
        await cli(
            "export", "device-tokens", "--base-url", netmera_sandbox.url, "-o", str(out), "--progress", "none"
        )
        == 3
    )
    err = capsys.readouterr().err
    assert "HTTP 403" in err and "a-wrong-key-4567" not in err
    assert not out.exists() and _files(tmp_path) == []  # not even a .partial file


async def test_a_value_of_another_type_than_documented_is_a_platform_error_naming_it_not_a_crash(
    netmera_sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sync.sandboxes.netmera_records import Segment

    # A platform that answers the id as text ("7") where Netmera documents a number: exit 5 and a traceback
    # ("a bug in pushsync") before; now exit 3 naming the column and the value, and no file.
    netmera_sandbox.sandbox.state.segments[7] = Segment("7", "buyers")  # type: ignore[arg-type]
    monkeypatch.setenv("NETMERA_API_KEY", netmera_sandbox.api_key)
    out = tmp_path / "segments.parquet"
    common = ("--base-url", netmera_sandbox.url, "--progress", "none")
    assert await cli("export", "segments", *common, "-o", str(out)) == 3
    err = capsys.readouterr().err
    assert "the platform answered '7' (str) for the column 'id', which holds int64" in err
    assert "internal error" not in err and "Traceback" not in err
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://audit:pw-s3cr3t-9@{host}/rest/3.0/", "credentials may not be written in the URL"),
        ("http://{host}/rest/3.0/?access_token=pw-s3cr3t-9", "takes no query string"),
        ("ftp://{host}/rest/3.0/#pw-s3cr3t-9", "must be an http:// or https:// URL"),
    ],
)
async def test_a_base_url_holding_credentials_or_not_http_is_refused_before_any_request_without_echoing_it(
    netmera_sandbox: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    url: str,
    reason: str,
) -> None:
    # Before: accepted as given; the password was printed in the 404's message (exit 3), and an ftp:// URL was
    # retried six times as a "connection failure". A job file's base_url was always held to these rules.
    monkeypatch.setenv("NETMERA_API_KEY", netmera_sandbox.api_key)
    host = netmera_sandbox.url.split("/")[2]
    out = tmp_path / "segments.csv"
    with pytest.raises(SystemExit) as exited:
        await cli("export", "segments", "--base-url", url.format(host=host), "-o", str(out))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert reason in err and "pw-s3cr3t-9" not in err
    assert netmera_sandbox.sandbox.stats.snapshot()["requests_total"] == 0 and _files(tmp_path) == []


@pytest.mark.parametrize("seconds", ["inf", "nan", "0", "-1"])
def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_refused(
    seconds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # "inf" was an internal error (OverflowError, exit 5); "nan" and "-1" were taken, "0" meant the default.
    with pytest.raises(SystemExit) as exited:
        main(["export", "segments", "--base-url", "http://127.0.0.1:1/", "-o", "x.csv", "--timeout", seconds])
    assert exited.value.code == 2
    assert "must be a positive number of seconds" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["", ".", "/"])
async def test_an_output_path_naming_a_directory_without_a_file_name_is_exit_2_not_a_crash(
    netmera_sandbox: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    out: str,
) -> None:
    # `-o .` (or '' or /) was an internal error: "ValueError: PosixPath('.') has an empty name", exit 5.
    monkeypatch.setenv("NETMERA_API_KEY", netmera_sandbox.api_key)
    monkeypatch.chdir(tmp_path)
    code = await cli("export", "segments", "--base-url", netmera_sandbox.url, "--progress", "none", "-o", out)
    assert code == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "internal error" not in err
    assert _files(tmp_path) == []


async def test_each_retry_is_logged_as_it_happens_with_the_status_and_the_wait(
    netmera_sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Retries were silent: an export waiting out a long Retry-After or a platform answering 503 said nothing
    # until it ended (no progress line comes between two pages), and looked hung.
    netmera_sandbox.sandbox.state.add_synthetic(300, 1)
    netmera_sandbox.sandbox.configure(faults=FaultSpec(error_503=0.5), seed=3)
    monkeypatch.setenv("AUDIT_NETMERA_KEY", netmera_sandbox.api_key)
    job = str(_job(tmp_path, netmera_sandbox.url))
    out = str(tmp_path / "d.csv")
    argv = ("--log-level", "warning", "--log-json", "export", "device-tokens", "--job", job, "-o", out)
    assert await cli(*argv, "--page-size", "100", "--progress", "none") == 0
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    retries = [line for line in lines if line["event"] == "export.retry"]
    assert retries and len(retries) == netmera_sandbox.sandbox.stats.faults()
    first = retries[0]
    assert first["level"] == "warning" and first["status"] == 503 and first["max_attempts"] == 10
    assert "getDeviceTokens: HTTP 503" in first["error"] and 0 <= first["retry_in_seconds"] <= 0.05
    assert netmera_sandbox.api_key not in json.dumps(lines)


async def test_a_job_of_another_platform_is_refused_before_its_key_is_sent(
    netmera_sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A NotifyVisitors job was exported from as if it were Netmera's: its key went out as X-netmera-api-key to
    # the job's base URL (exit 0 here, where that URL is a Netmera sandbox; a 404 against NotifyVisitors).
    text = (Path(__file__).parents[1] / "jobs" / "notifyvisitors.yaml").read_text(encoding="utf-8")
    job = tmp_path / "nv.yaml"
    job.write_text(text.replace("http://127.0.0.1:8081/api/v1/", netmera_sandbox.url), encoding="utf-8")
    monkeypatch.setenv("NOTIFYVISITORS_API_KEY", netmera_sandbox.api_key)
    out = tmp_path / "tokens.csv"
    assert await cli("export", "device-tokens", "--job", str(job), "-o", str(out), "--progress", "none") == 2
    err = capsys.readouterr().err
    assert "destination.platform: is notifyvisitors: pushsync export reads Netmera only" in err
    assert netmera_sandbox.sandbox.stats.snapshot()["requests_total"] == 0 and not out.exists()


@pytest.mark.parametrize("key", ["first-half-1234\nsecond-half-5678", "first-half-1234\x01second-half"])
async def test_a_key_in_the_environment_with_a_line_break_inside_is_exit_2_not_a_crash(
    netmera_sandbox: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    key: str,
) -> None:
    # With --base-url, $NETMERA_API_KEY went to aiohttp as it was: "internal error: ValueError: Forbidden control
    # character detected in headers", a traceback, exit 5. A job's key was always refused by resolve_secret.
    monkeypatch.setenv("NETMERA_API_KEY", key)
    out = tmp_path / "segments.csv"
    code = await cli(
        "export", "segments", "--base-url", netmera_sandbox.url, "-o", str(out), "--progress", "none"
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "environment variable NETMERA_API_KEY holds" in err and "the value is not shown" in err
    assert "internal error" not in err and "half" not in err
    assert netmera_sandbox.sandbox.stats.snapshot()["requests_total"] == 0 and _files(tmp_path) == []


async def test_a_text_id_file_with_a_byte_order_mark_finds_its_first_user(
    netmera_sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Notepad's "UTF-8 with BOM": the BOM was read as part of the first ID, so that user came out found=false.
    state = netmera_sandbox.sandbox.state
    state.load({"users": [{"extId": "c1", "profile": {"city": "Izmir"}}, {"extId": "c2"}]})
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"\xef\xbb\xbfc1\r\nc2\r\n")
    monkeypatch.setenv("NETMERA_API_KEY", netmera_sandbox.api_key)
    out = tmp_path / "p.parquet"
    common = ("--base-url", netmera_sandbox.url, "--progress", "none", "-o", str(out))
    assert await cli("export", "profiles", "--ids", str(ids), *common) == 0
    rows = pl.read_parquet(out).select("extId", "found", "profile").to_dicts()
    assert rows == [
        {"extId": "c1", "found": True, "profile": '{"city": "Izmir"}'},
        {"extId": "c2", "found": True, "profile": "{}"},
    ]


async def test_an_export_during_which_the_platform_changed_says_its_total_changed(
    netmera_sandbox: Any, tmp_path: Path
) -> None:
    # 1,000 users deleted while 300,000 devices were paged by offset: every later page shifted, 1,000 devices
    # that still existed were never read, the file held 299,000 rows (the new total, so it looked right) and the
    # export said nothing. Now the result says the total changed (the CLI warns; --output json has it).
    from sync.config import Destination
    from sync.ledger.exporting import ExportFormat, write_pages
    from sync.platforms.netmera.client import NetmeraClient
    from sync.platforms.netmera.reads import device_token_pages

    state = netmera_sandbox.sandbox.state
    state.add_synthetic(300, 1)
    async with NetmeraClient(Destination("netmera", netmera_sandbox.url), netmera_sandbox.api_key) as client:

        async def pages_while_users_leave() -> Any:
            async for page in device_token_pages(client, page_size=100):
                yield page
                if page.offset == 0:
                    state.delete_users({f"u{i}" for i in range(10)})  # already read: later pages shift by 10

        schema = pa.schema([(c, pa.string()) for c in ("platform", "token", "deviceModel")])
        schema = schema.append(pa.field("pushPermitted", pa.bool_()))
        result = await write_pages(pages_while_users_leave(), tmp_path / "d.csv", schema, ExportFormat.CSV)
    assert result.rows == 290 and result.total_changed == (300, 290)
    assert result.to_dict()["total_changed"] == {"start": 300, "end": 290}
    # A platform that did not change: nothing said.
    async with NetmeraClient(Destination("netmera", netmera_sandbox.url), netmera_sandbox.api_key) as client:
        pages = device_token_pages(client, page_size=100)
        again = await write_pages(pages, tmp_path / "e.csv", schema, ExportFormat.CSV)
    assert again.rows == 290 and again.total_changed is None and "total_changed" not in again.to_dict()


@pytest.mark.parametrize(("total", "exit_code"), [(5, 3), (None, 3), (2, 0)])
async def test_an_empty_device_page_that_links_a_next_page_is_refused_not_taken_for_the_end(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    total: int | None,
    exit_code: int,
) -> None:
    """A platform that answers an empty page at offset 2 of 5 devices with a link to offset 4: the export stopped
    there and wrote a file of 2 rows, exit 0, without a word — an export that looked complete. Now exit 3 and no
    file, as for getSegmentUsers; an empty page at or past ``total`` (the count fell meanwhile) still ends it."""
    from aiohttp import web

    def page(offset: int) -> dict[str, Any]:
        devices = [
            {"platform": "IOS", "token": f"t{i}", "deviceModel": "X", "pushPermitted": True}
            for i in range(offset, 2)
        ]
        body: dict[str, Any] = {"nextPage": f"/rest/3.0/getDeviceTokens?offset={offset + 2}&max=2"}
        if total is not None or offset == 0:
            body["total"] = total if offset else 5
        return {**body, "devices": devices}

    async def handle(request: web.Request) -> web.Response:
        return web.json_response(page(int(request.query["offset"])))

    app = web.Application()
    app.router.add_get("/rest/3.0/getDeviceTokens", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    monkeypatch.setenv("NETMERA_API_KEY", "k")
    out = tmp_path / "devices.csv"
    try:
        code = await cli(
            "export", "device-tokens", "--base-url", f"http://127.0.0.1:{port}/rest/3.0/",
            "--page-size", "2", "--progress", "none", "-o", str(out),
        )  # fmt: skip
    finally:
        await runner.cleanup()
    err = capsys.readouterr().err
    assert code == exit_code
    if exit_code:
        of_total = " of 5" if total else ""
        assert f"the page at offset 2{of_total} holds no devices but links a next page" in err
        assert _files(tmp_path) == []
    else:
        assert pl.read_csv(out)["token"].to_list() == ["t0", "t1"]
