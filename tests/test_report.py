"""The run report against a real run on the Netmera sandbox: its numbers equal the ledger's, it lists the
refused rows, it is self-contained (strict XML parse, no external reference), it escapes what it shows and it
never contains the secret. The headless-browser check is in ``test_report_browser``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from sync.config import load_job
from sync.demo import generate_users
from sync.ledger.ledger import Ledger
from sync.planning.planning import build_plan
from sync.records import AttemptOutcome, BatchStatus, RejectedRow
from sync.report.report import load_report, render_html, write_report
from sync.run import RunOptions, RunOutcome, run
from sync.sandboxes._core import FaultSpec, RateLimit
from sync.sandboxes.netmera import NetmeraSandbox, NetmeraSandboxConfig, UnknownExtId

KEY_ENV = "PUSHSYNC_TEST_NETMERA_KEY"
REFUSED_ID = "U0000037"
SANDBOX_TEST_KEY = "report-test-netmera-key-0123456789"
XHTML = "{http://www.w3.org/1999/xhtml}"


@dataclass(frozen=True, slots=True)
class ReportedRun:
    outcome: RunOutcome
    page: str
    path: Path
    api_key: str
    data: Path


def write_job(tmp_path: Path, url: str, *, users: int = 120) -> Path:
    """A job over ``users`` generated users plus two rows validation refuses (rows users+1 and users+2)."""
    data = tmp_path / "data" / "users.csv"
    generate_users(data, users, seed=7)
    with data.open("a", encoding="utf-8") as f:
        f.write("U9000001,Bad Score,Izmir,not-a-number,false,free,,true,false\n")
        f.write(",No Id,Izmir,3,false,free,,true,false\n")
    job = tmp_path / "job.yaml"
    job.write_text(
        f"""
version: 1
name: nightly-crm
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
  batch_size: 40
  concurrency: 4
  request_timeout: 0.5
  drain_timeout: 3
  budgets: {{"*": {{requests: 40, period: 0.5}}}}
  retry: {{max_attempts: 8, base_delay: 0.01, max_delay: 0.05}}
""",
        encoding="utf-8",
    )
    return job


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reported_run(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ReportedRun]:
    """One partial run shared by the module's tests (a run takes a couple of seconds): one ID refused by the
    platform (split out), two rows refused by validation, some 503s and — the server allowing less than the
    job's budget on one endpoint — some 429s."""
    tmp_path = tmp_path_factory.mktemp("reported-run")
    config = NetmeraSandboxConfig.from_mapping(
        {
            "api_key": SANDBOX_TEST_KEY,
            "unknown_ext_id": UnknownExtId.ERROR,
            # Below the job's budget of 40 per 0.5 s: the first batches of these endpoints meet 429s.
            "limits": {"setProfileAttributes": RateLimit(6, 0.5), "tagUsers": RateLimit(5, 0.5)},
            "faults": FaultSpec(error_503=0.1),
            "seed": 11,
        }
    )
    sandbox = NetmeraSandbox(config)
    url = await sandbox.start("127.0.0.1", 0)
    try:
        sandbox.state.ensure_users([f"U{i:07d}" for i in range(120) if f"U{i:07d}" != REFUSED_ID])
        job = load_job(write_job(tmp_path, url))
        outcome = await run(job, RunOptions(api_key=SANDBOX_TEST_KEY))
    finally:
        await sandbox.stop()
    out = write_report(outcome.ledger_path, outcome.run_id, tmp_path / "report.html")
    yield ReportedRun(
        outcome, out.read_text(encoding="utf-8"), out, SANDBOX_TEST_KEY, tmp_path / "data" / "users.csv"
    )


def parse(page: str) -> ET.Element:
    """The page is polyglot markup: a strict XML parser must accept it."""
    return ET.fromstring(page.removeprefix("<!DOCTYPE html>\n"))


def table_values(root: ET.Element) -> dict[str, dict[str, str]]:
    """endpoint -> field -> data-value of the per-endpoint table (absent: shown as '-')."""
    out: dict[str, dict[str, str]] = {}
    for tr in root.iter(f"{XHTML}tr"):
        endpoint = tr.get("data-endpoint")
        if endpoint is None:
            continue
        out[endpoint] = {
            td.get("data-field", ""): td.get("data-value", "-") for td in tr if td.get("data-field")
        }
    return out


def field_text(root: ET.Element, field: str) -> str:
    for el in root.iter():
        if el.get("data-field") == field and el.tag != f"{XHTML}td":
            return "".join(el.itertext())
    raise AssertionError(f"no {field} in the page")


def ledger_numbers(ledger_path: Path, run_id: str) -> dict[str, dict[str, int]]:
    """Per endpoint, the figures recomputed from the ledger's public API."""
    out: dict[str, dict[str, int]] = {}
    with Ledger.open(ledger_path) as ledger:
        for b in ledger.batches(run_id):
            d = out.setdefault(
                b.endpoint,
                dict.fromkeys(
                    ("batches", "requests", "ids_ok", "ids_rejected", "ids_failed", "ids_unfinished"), 0
                ),
            )
            d["batches"] += 1
            d["requests"] += b.attempts
            d["ids_ok"] += b.ok_ids
            d["ids_rejected"] += b.rejected_ids
            if b.status is BatchStatus.FAILED:
                d["ids_failed"] += b.n_ids - b.ok_ids - b.rejected_ids
            if b.status in (BatchStatus.PLANNED, BatchStatus.SENT):
                d["ids_unfinished"] += b.n_ids
    return out


def test_the_report_numbers_equal_the_ledger(reported_run: ReportedRun) -> None:
    outcome = reported_run.outcome
    root = parse(reported_run.page)
    shown = table_values(root)
    want = ledger_numbers(outcome.ledger_path, outcome.run_id)
    assert set(shown) == {*want, "*"}
    for endpoint, fields in want.items():
        for name, value in fields.items():
            assert shown[endpoint][name] == str(value), (endpoint, name)
    for name in ("batches", "requests", "ids_ok", "ids_rejected", "ids_failed", "ids_unfinished"):
        assert shown["*"][name] == str(sum(f[name] for f in want.values())), name
    # ...and they are the dispatcher's own counts, as the run summary gives them.
    for e in outcome.summary.endpoints:
        assert shown[e.endpoint]["requests"] == str(e.requests)
        assert shown[e.endpoint]["ids_ok"] == str(e.ids_ok)
        assert shown[e.endpoint]["ids_rejected"] == str(e.ids_rejected)
        assert shown[e.endpoint]["ids_failed"] == str(e.ids_failed)
        assert shown[e.endpoint]["budget_rate"] == str(e.budget_rate)
    assert shown["setProfileAttributes"]["ids_rejected"] == "1"


def test_the_header_tells_what_happened(reported_run: ReportedRun) -> None:
    outcome = reported_run.outcome
    root = parse(reported_run.page)
    with Ledger.open(outcome.ledger_path) as ledger:
        info = ledger.run(outcome.run_id)
    assert info is not None and info.finished_at is not None
    assert field_text(root, "job") == "nightly-crm"
    assert field_text(root, "destination") == "netmera"
    assert field_text(root, "run_id") == outcome.run_id
    assert field_text(root, "status") == info.status == "partial"
    assert field_text(root, "exit_status") == "1 PARTIAL"
    assert field_text(root, "duration") == f"{info.finished_at - info.started_at:.1f} s"
    cards = {el.get("data-total"): el.get("data-value") for el in root.iter() if el.get("data-total")}
    assert cards["rows_rejected"] == "2"
    assert cards["ids_rejected"] == str(outcome.summary.ids_rejected) != "0"
    assert cards["ids_ok"] == str(outcome.summary.ids_ok)
    assert cards["requests"] == str(outcome.summary.requests)


def test_the_refused_rows_and_top_errors_are_listed(reported_run: ReportedRun) -> None:
    root = parse(reported_run.page)
    rows = [
        ["".join(td.itertext()) for td in tr]
        for tr in root.iter(f"{XHTML}tr")
        if tr.get("data-source") is not None
    ]
    validation = [r for r in rows if r[0] == "validation"]
    data = str(reported_run.data)
    assert [r[1:4] for r in validation] == [["-", data, "121"], ["-", data, "122"]]
    assert "score" in validation[0][5] and validation[0][4] == "U9000001"
    assert "external ID" in validation[1][5]
    platform = [r for r in rows if r[0] == "platform"]
    refused_at = {
        e.endpoint: e.ids_rejected for e in reported_run.outcome.summary.endpoints if e.ids_rejected
    }
    assert sorted(r[1] for r in platform) == sorted(e for e, n in refused_at.items() for _ in range(n))
    for row in platform:
        assert row[2:5] == [data, str(int(REFUSED_ID[1:]) + 1), REFUSED_ID]
        assert "5016" in row[5]
    errors = [
        (tr.get("data-kind"), "".join(tr[0].itertext()), "".join(tr[4].itertext()))
        for tr in root.iter(f"{XHTML}tr")
        if tr.get("data-kind")
    ]
    # One line per kind of error, not one per batch: the request description before the answer is dropped.
    assert all("batch=" not in m and "http://" not in m for _, _, m in errors)
    refused = [(count, message) for kind, count, message in errors if kind == "refused ID"]
    assert sum(int(c) for c, _ in refused) == reported_run.outcome.summary.ids_rejected
    assert all("5016" in m or "not found" in m.lower() for _, m in refused)


def test_the_page_is_self_contained_and_keeps_the_secret(reported_run: ReportedRun) -> None:
    page = reported_run.page
    assert reported_run.api_key not in page
    # Nothing to fetch: no src/href, no CSS url() or @import, no script at all.
    assert not re.search(r"\s(src|href)\s*=", page)
    assert "url(" not in page and "@import" not in page and "<script" not in page
    assert page.count("<svg") == len(parse(page).findall(".//{http://www.w3.org/2000/svg}svg"))


def test_strings_from_the_ledger_are_escaped(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.sqlite"
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("r1", job="<script>alert('job')</script>", platform="netmera")
        ledger.record_rejected_rows(
            "r1", [RejectedRow("a&b.csv", 3, "email", '<img src=x onerror=alert(1)> & "quoted"', "<id>")]
        )
        ledger.finish_run("r1", status="partial", exit_code=1, message="</dd><h1>injected</h1>")
    page = render_html(load_report(ledger_path, "r1"))
    root = parse(page)  # would fail if any of it were unescaped markup
    assert "<script" not in page and "<img" not in page and "<h1>injected" not in page
    assert "&lt;script&gt;alert(&#x27;job&#x27;)&lt;/script&gt;" in page
    assert field_text(root, "message") == "</dd><h1>injected</h1>"
    assert "No request was made" in page or "no per-attempt records" in page


def test_an_unknown_run_or_ledger_is_a_state_error(tmp_path: Path) -> None:
    from sync.errors import StateError

    with pytest.raises(StateError, match="no ledger"):
        load_report(tmp_path / "missing.sqlite", "r1")
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        ledger.start_run("r1", job="j")
    with pytest.raises(StateError, match="no run r2"):
        load_report(tmp_path / "ledger.sqlite", "r2")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    profile = tempfile.mkdtemp(dir=tmp_path, prefix="chromium-")
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it: see .ci/run)")
def test_the_page_opens_in_headless_chromium_without_errors(
    reported_run: ReportedRun, tmp_path: Path
) -> None:
    url = reported_run.path.resolve().as_uri()
    dom = chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # Chromium logs every console message (errors, failed loads, CSP violations) as INFO:CONSOLE lines.
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    # What the browser built is the report: the same totals, one SVG per chart the page holds.
    summary = reported_run.outcome.summary
    assert f'data-total="requests" data-value="{summary.requests}"' in dom.stdout
    assert f'data-total="ids_ok" data-value="{summary.ids_ok}"' in dom.stdout
    assert dom.stdout.count("<svg") == reported_run.page.count("<svg")
    shot = tmp_path / "report.png"
    png = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert png.returncode == 0, png.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_per_attempt_figures_equal_the_ledger_and_the_dispatcher(reported_run: ReportedRun) -> None:
    outcome = reported_run.outcome
    shown = table_values(parse(reported_run.page))
    with Ledger.open(outcome.ledger_path) as ledger:
        attempts = ledger.attempts(outcome.run_id)
    for e in outcome.summary.endpoints:
        mine = [a for a in attempts if a.endpoint == e.endpoint]
        assert shown[e.endpoint]["requests"] == str(len(mine)) == str(e.requests)
        limited = sum(a.outcome is AttemptOutcome.RATE_LIMITED for a in mine)
        assert shown[e.endpoint]["rate_limited"] == str(limited) == str(e.rate_limited)
        assert shown[e.endpoint]["retries"] == str(sum(a.attempt > 1 for a in mine)) == str(e.retries)
    # The scenario did hit the server's limit and its 503s, so the charts have something to show.
    assert int(shown["*"]["rate_limited"]) > 0 and int(shown["*"]["retries"]) > int(
        shown["*"]["rate_limited"]
    )


def test_the_charts_draw_the_ledger_attempts(reported_run: ReportedRun) -> None:
    root = parse(reported_run.page)
    svg = "{http://www.w3.org/2000/svg}"
    shown = table_values(root)
    charts = {div.get("id"): div for div in root.iter(f"{XHTML}div") if div.get("class") == "chart"}
    report = load_report(reported_run.outcome.ledger_path, reported_run.outcome.run_id)
    width = report.bin_seconds
    rate_charts = [c for name, c in charts.items() if name and name.startswith("rate-")]
    assert len(rate_charts) == len(report.endpoints)
    for chart in rate_charts:
        (line,) = chart.iter(f"{svg}polyline")
        endpoint = line.get("data-series", "")
        # Requests per second per bin, times the bin width, adds up to the endpoint's requests.
        assert float(line.get("data-sum", "")) * width == pytest.approx(
            int(shown[endpoint]["requests"]), rel=1e-4
        )
        # the budget: a dashed line on the chart's own scale, or named under the title when far above it
        budget = [el for el in chart.iter() if el.get("data-line") == "budget"]
        assert [b.get("data-value") for b in budget] == [shown[endpoint]["budget_rate"]]
        # each endpoint on its own scale: its busiest bin reaches at least a third of the plot's height (y grows
        # downwards from the top margin, 28, to the axis, 176), however small its traffic beside the others
        highest = min(float(point.split(",")[1]) for point in line.get("points", "").split())
        assert highest <= 176 - 148 / 3
    lines = {
        el.get("data-series"): float(el.get("data-sum", ""))
        for el in charts["retries"].iter(f"{svg}polyline")
    }
    assert lines == {"429s": int(shown["*"]["rate_limited"]), "retries": int(shown["*"]["retries"])}
    bars = [int(el.get("data-value", "")) for el in charts["latency"].iter(f"{svg}rect")]
    assert sum(bars) == int(shown["*"]["requests"])


def test_retried_attempts_are_counted_once_per_kind(reported_run: ReportedRun) -> None:
    outcome = reported_run.outcome
    root = parse(reported_run.page)
    shown = {
        ("".join(tr[2].itertext()), "".join(tr[3].itertext())): int("".join(tr[0].itertext()))
        for tr in root.iter(f"{XHTML}tr")
        if tr.get("data-kind") == "retried attempt"
    }
    with Ledger.open(outcome.ledger_path) as ledger:
        attempts = ledger.attempts(outcome.run_id)
    want: dict[tuple[str, str], int] = {}
    for a in attempts:
        if a.outcome is AttemptOutcome.RETRYABLE:
            key = (a.endpoint, f"HTTP {a.http_status}")
            want[key] = want.get(key, 0) + 1
    assert want and shown == want


async def test_an_aborted_run_says_why_and_never_shows_the_key(netmera_sandbox: Any, tmp_path: Path) -> None:
    bad_key = "wrong-key-never-shown-4242"
    job = load_job(write_job(tmp_path, netmera_sandbox.url, users=40))
    outcome = await run(job, RunOptions(api_key=bad_key))
    page = render_html(load_report(outcome.ledger_path, outcome.run_id))
    root = parse(page)
    assert field_text(root, "status") == "aborted"
    assert field_text(root, "exit_status") == "3 ABORTED"
    message = field_text(root, "message")
    assert message.startswith("aborted: HTTP 403") and "http://" not in message  # no request description
    assert bad_key not in page
    fatal = [tr for tr in root.iter(f"{XHTML}tr") if tr.get("data-kind") == "failed batch"]
    assert any("HTTP 403" in "".join(tr[3].itertext()) for tr in fatal)


def test_a_file_that_is_not_a_ledger_gives_a_clear_error_and_leaks_no_connection(tmp_path: Path) -> None:
    """Any unclosed sqlite3 connection would surface as a ResourceWarning, an error under filterwarnings=error."""
    import gc

    import pytest

    from sync.errors import StateError
    from sync.report.report import load_report

    junk = tmp_path / "ledger.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError, match="cannot read the ledger"):
        load_report(junk, "r1")
    gc.collect()


# -- `pushsync trace ID` ----------------------------------------------------------------------------------------


def test_trace_tells_the_story_of_one_id(
    reported_run: ReportedRun, capsys: pytest.CaptureFixture[str]
) -> None:
    from sync.cli import main

    workdir = reported_run.outcome.ledger_path.parent
    assert main(["trace", REFUSED_ID, "--workdir", str(workdir), "--output", "json"]) == 0
    story = json.loads(capsys.readouterr().out)
    assert {e["run_id"] for e in story} == {reported_run.outcome.run_id}
    refused = [e for e in story if e["kind"] == "refused"]
    # refused by every endpoint that carried it (attributes, tags...), each naming its input row
    assert len(refused) == reported_run.outcome.summary.ids_rejected >= 1
    assert all(e["path"].endswith("users.csv") and e["row"] == 38 for e in refused)  # U0000037: row 38
    batches = [e for e in story if e["kind"] == "batch"]
    assert batches and all(e["endpoint"] for e in batches)
    assert any(e["status"] in ("rejected", "ok") for e in batches)

    # a row validation refused: the file, row and reason
    assert main(["trace", "U9000001", "--workdir", str(workdir), "--output", "json"]) == 0
    (rejected,) = json.loads(capsys.readouterr().out)
    assert rejected["kind"] == "rejected row" and rejected["row"] == 121 and "score" in rejected["detail"]

    # an ID that went through, as a table; and one never seen
    assert main(["trace", "U0000003", "--workdir", str(workdir)]) == 0
    table = capsys.readouterr().out
    assert "ok" in table and reported_run.outcome.run_id in table
    assert main(["trace", "nobody", "--workdir", str(workdir)]) == 0
    assert "no record of ID 'nobody'" in capsys.readouterr().out


def test_ids_per_second_and_the_trend_of_the_jobs_runs(reported_run: ReportedRun, tmp_path: Path) -> None:
    root = parse(reported_run.page)
    shown = table_values(root)
    report = load_report(reported_run.outcome.ledger_path, reported_run.outcome.run_id)
    for e in report.endpoints:
        assert e.ids_per_second is not None and e.ids_per_second > 0
        assert float(shown[e.endpoint]["ids_per_second"]) == pytest.approx(e.ids_per_second)
    assert float(shown["*"]["ids_per_second"]) == pytest.approx(report.ids_per_second)
    cards = {div.get("data-total"): div.get("data-value") for div in root.iter(f"{XHTML}div")}
    assert float(cards["ids_per_second"]) == pytest.approx(report.ids_per_second)
    # the first run of its job: no trend yet, and the page says so
    assert len(report.history) == 1 and "first run of this job" in reported_run.page


def test_the_trend_lists_the_jobs_last_runs_with_this_one_highlighted(tmp_path: Path) -> None:
    from sync.ledger.ledger import Ledger

    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path) as ledger:
        for i, (status, code, requests) in enumerate([("done", 0, 10), ("partial", 1, 12), ("done", 0, 9)]):
            run_id = f"r{i}"
            ledger.start_run(run_id, job="nightly", job_path="j.yaml", platform="netmera")
            ledger.finish_run(
                run_id,
                status=status,
                exit_code=code,
                message=None,
                summary={
                    "totals": {"requests": requests, "ids_ok": 100, "ids_rejected": code, "rows_rejected": 0}
                },
            )
        ledger.start_run("other", job="another-job", job_path="o.yaml", platform="netmera")
    report = load_report(path, "r1")
    assert [h.run_id for h in report.history] == ["r1", "r0"]  # this run and the ones before it, of this job
    assert [h.requests for h in report.history] == [12, 10]
    page = parse(render_html(report))
    rows = {tr.get("data-run"): tr for tr in page.iter(f"{XHTML}tr") if tr.get("data-run")}
    assert set(rows) == {"r0", "r1"} and rows["r1"].get("class") == "this"
    assert [
        int(r.get("data-value", ""))
        for r in page.iter("{http://www.w3.org/2000/svg}rect")
        if r.get("data-bucket")
    ][-2:] == [round(h.seconds or 0) for h in reversed(report.history)]


def _input_fields(root: ET.Element) -> dict[str, str]:
    dl = next(el for el in root.iter(f"{XHTML}dl") if el.get("class") == "input")
    return {dd.get("data-field", ""): "".join(dd.itertext()) for dd in dl.iter(f"{XHTML}dd")}


def test_the_input_section_equals_the_plan(reported_run: ReportedRun) -> None:
    job = load_job(reported_run.data.parent.parent / "job.yaml")
    plan = build_plan(job)
    try:
        want = plan.summary()
    finally:
        plan.close()
    shown = _input_fields(parse(reported_run.page))
    assert shown["rows_read"] == f"{want.rows_read:,}" == "122"
    assert shown["rows_clean"] == f"{want.rows_clean:,}"
    assert shown["input_rows_rejected"] == f"{want.rejected_count:,}" == "2"
    assert shown["duplicates_dropped"] == f"{want.duplicates_dropped:,}"
    assert shown["mode"] == "changes" and shown["destination_platform"] == "netmera"
    host = job.destination.base_url.split("//", 1)[1].split("/", 1)[0]
    assert shown["destination_host"] == host  # the host only: no path, no key
    assert not any(k.startswith("snapshot_") for k in shown)
    # The figures come from the run summary stored in the ledger.
    with Ledger.open(reported_run.outcome.ledger_path) as ledger:
        info = ledger.run(reported_run.outcome.run_id)
    assert info is not None and info.summary is not None
    stored = info.summary["input"]
    assert stored["rows"] == {
        "read": want.rows_read,
        "clean": want.rows_clean,
        "rejected": want.rejected_count,
        "duplicates_dropped": want.duplicates_dropped,
    }


async def test_a_snapshot_runs_input_shows_the_diff(netmera_sandbox: Any, tmp_path: Path) -> None:
    path = write_job(tmp_path, netmera_sandbox.url, users=30)
    path.write_text(path.read_text(encoding="utf-8") + "mode: snapshot\n", encoding="utf-8")
    first = await run(load_job(path), RunOptions(api_key=netmera_sandbox.api_key))
    data = tmp_path / "data" / "users.csv"
    lines = data.read_text(encoding="utf-8").splitlines(keepends=True)
    # Drop one user (left), change one user's city (changed), add one (new).
    header, body = lines[0], lines[1:]
    body = [line for line in body if not line.startswith("U0000003,")]
    cols = body[0].split(",")
    cols[2] = "Elsewhere"
    body[0] = ",".join(cols)
    body.append("U8000001,New Person,Izmir,3,false,free,,true,false\n")
    data.write_text(header + "".join(body), encoding="utf-8")
    second = await run(load_job(path), RunOptions(api_key=netmera_sandbox.api_key))
    assert second.diff is not None
    out = write_report(second.ledger_path, second.run_id, tmp_path / "r.html")
    shown = _input_fields(parse(out.read_text(encoding="utf-8")))
    d = second.diff
    assert shown["mode"] == "snapshot"
    assert (shown["snapshot_new"], shown["snapshot_changed"], shown["snapshot_left"]) == ("1", "1", "1")
    assert shown["snapshot_unchanged"] == str(d.users_unchanged) and shown["snapshot_removed"] == "0"
    assert first.diff is not None and first.diff.users_new == 30  # the first run found everyone new
