"""Run metrics: the exporter serves every documented series, values follow what the dispatcher reports, each run
has its own registry, the textfile is what node_exporter reads, and the docs list exactly the series served."""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sync.config import load_job
from sync.demo import generate_users
from sync.platforms.netmera.requests import make_batch, tag_body
from sync.records import Attempt, AttemptOutcome, Batch, BatchResult, BatchStatus, Operation, RejectedId
from sync.report.metrics import FINAL_SERIES, LATENCY_BUCKETS, SERIES, RunMetrics
from sync.run import RunOptions, run

REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    """Monotonic seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(text: str, job: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels but ``job``) -> value, from the exposition text. Every sample must carry the
    ``job`` label (``job``'s value when given), and no ``*_created`` sample may be there."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert "job" in s.labels, f"{s.name} has no job label"
            assert job is None or s.labels["job"] == job, (s.name, s.labels)
            assert not s.name.endswith("_created"), s.name
            labels = {k: v for k, v in s.labels.items() if k != "job"}
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


def families(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        # The parser strips the _total of counters; the documented names keep it.
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def feed(metrics: RunMetrics) -> None:
    """Two tag batches: one through at once, one after a 503 and a 429, with one refused ID."""
    first = make_batch(Operation.TAG, tag_body("gold", ["u1", "u2", "u3"]))
    second = make_batch(Operation.TAG, tag_body("silver", ["u4", "u5"]))
    ep = first.endpoint
    metrics.on_batch_start(first)
    metrics.on_batch_start(second)
    metrics.on_attempt(Attempt(first.batch_id, ep, 1, 3, 0.02, AttemptOutcome.OK, 200))
    metrics.on_batch_done(
        first, BatchResult(first.batch_id, ep, Operation.TAG, BatchStatus.OK, 1, 200, ok_ids=3)
    )
    metrics.on_attempt(Attempt(second.batch_id, ep, 1, 2, 0.3, AttemptOutcome.RETRYABLE, 503, "HTTP 503"))
    metrics.on_attempt(
        Attempt(second.batch_id, ep, 2, 2, 0.004, AttemptOutcome.RATE_LIMITED, 429, "HTTP 429")
    )
    metrics.on_attempt(Attempt(second.batch_id, ep, 3, 2, 7.0, AttemptOutcome.RETRYABLE, None, "no answer"))
    metrics.on_attempt(Attempt(second.batch_id, ep, 4, 2, 0.05, AttemptOutcome.OK, 200))
    rejected = (RejectedId("u5", 5016, "external id not found"),)
    metrics.on_batch_done(
        second,
        BatchResult(
            second.batch_id, ep, Operation.TAG, BatchStatus.REJECTED, 5, 400, ok_ids=1, rejected=rejected
        ),
    )


@pytest.fixture
def served() -> Iterator[tuple[RunMetrics, str, FakeClock]]:
    clock = FakeClock()
    metrics = RunMetrics(
        run_id="r-1", job="nightly", platform="netmera", budgets={"tagUsers": 20.0}, clock=clock
    )
    server = metrics.serve(0, host="127.0.0.1")
    try:
        yield metrics, server.url, clock
    finally:
        server.close()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return str(resp.read().decode())


def test_the_exporter_serves_every_documented_series(served: tuple[RunMetrics, str, FakeClock]) -> None:
    metrics, url, _ = served
    feed(metrics)
    text = scrape(url)
    assert families(text) >= set(SERIES)
    got = samples(text)
    ep = (("endpoint", "tagUsers"),)
    assert got[("pushsync_requests_total", (("endpoint", "tagUsers"), ("status", "200")))] == 2
    assert got[("pushsync_requests_total", (("endpoint", "tagUsers"), ("status", "503")))] == 1
    assert got[("pushsync_requests_total", (("endpoint", "tagUsers"), ("status", "429")))] == 1
    assert got[("pushsync_requests_total", (("endpoint", "tagUsers"), ("status", "none")))] == 1
    assert got[("pushsync_ids_total", (("endpoint", "tagUsers"), ("outcome", "ok")))] == 4
    assert got[("pushsync_ids_total", (("endpoint", "tagUsers"), ("outcome", "rejected")))] == 1
    assert got[("pushsync_ids_total", (("endpoint", "tagUsers"), ("outcome", "failed")))] == 0
    assert got[("pushsync_batches_total", (("endpoint", "tagUsers"), ("status", "rejected")))] == 1
    assert got[("pushsync_rate_limited_responses_total", ep)] == 1
    assert got[("pushsync_retries_total", ep)] == 3
    assert got[("pushsync_inflight_batches", ())] == 0
    assert got[("pushsync_budget_requests_per_second", ep)] == 20.0
    assert got[("pushsync_current_requests_per_second", ep)] == 5 / 10  # five attempts in the 10 s window
    assert got[("pushsync_request_latency_seconds_count", ep)] == 5
    assert got[("pushsync_request_latency_seconds_sum", ep)] == pytest.approx(7.374)
    assert got[("pushsync_request_latency_seconds_bucket", (*ep, ("le", "0.005")))] == 1
    assert got[("pushsync_request_latency_seconds_bucket", (*ep, ("le", "5.0")))] == 4
    assert got[("pushsync_request_latency_seconds_bucket", (*ep, ("le", "+Inf")))] == 5
    info = (("platform", "netmera"), ("run_id", "r-1"))
    assert got[("pushsync_run_info", info)] == 1


def test_in_flight_and_current_rate_follow_the_run(served: tuple[RunMetrics, str, FakeClock]) -> None:
    metrics, url, clock = served
    batch = make_batch(Operation.TAG, tag_body("gold", ["u1"]))
    metrics.on_batch_start(batch)
    for i in range(30):
        clock.now += 0.1
        metrics.on_attempt(
            Attempt(batch.batch_id, batch.endpoint, i + 1, 1, 0.01, AttemptOutcome.RETRYABLE, 503)
        )
    ep = (("endpoint", "tagUsers"),)
    got = samples(scrape(url))
    assert got[("pushsync_inflight_batches", ())] == 1
    assert got[("pushsync_current_requests_per_second", ep)] == pytest.approx(
        3.0
    )  # 30 attempts in the last 10 s
    clock.now += 8.55  # the window now starts 1.55 s after the first attempt: 15 attempts are left in it
    assert samples(scrape(url))[("pushsync_current_requests_per_second", ep)] == pytest.approx(1.5)
    clock.now += 60
    assert (
        samples(scrape(url))[("pushsync_current_requests_per_second", ep)] == 0
    )  # quiet endpoint: falls to zero


def test_each_run_has_its_own_registry() -> None:
    one, two = RunMetrics(run_id="a"), RunMetrics(run_id="b")
    batch = make_batch(Operation.TAG, tag_body("gold", ["u1"]))
    one.on_attempt(Attempt(batch.batch_id, batch.endpoint, 1, 1, 0.01, AttemptOutcome.OK, 200))
    key = ("pushsync_requests_total", (("endpoint", "tagUsers"), ("status", "200")))
    assert samples(_text(one))[key] == 1
    assert key not in samples(_text(two))


def _text(metrics: RunMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_the_textfile_is_what_node_exporter_reads(tmp_path: Path) -> None:
    metrics = RunMetrics(run_id="r-2", job="nightly", budgets={"tagUsers": 5.0})
    feed(metrics)
    path = tmp_path / "textfile" / "pushsync.prom"
    metrics.write_textfile(path)
    text = path.read_text()
    assert families(text) >= set(SERIES)
    assert samples(text) == samples(_text(metrics))
    assert not list(path.parent.glob("*.tmp*"))  # written through a temporary file, renamed


def test_the_docs_list_exactly_the_series_served() -> None:
    doc = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(pushsync_[a-z_]+)`", doc, flags=re.MULTILINE))
    assert documented == set(SERIES) | set(FINAL_SERIES)
    assert all(f"{b:g}" in doc for b in LATENCY_BUCKETS[:3])  # the buckets are documented too


async def test_exporting_serves_while_the_block_runs_and_leaves_the_final_textfile(tmp_path: Path) -> None:
    import asyncio

    metrics = RunMetrics(run_id="r-3", job="nightly", platform="netmera")
    path = tmp_path / "pushsync.prom"
    batch = make_batch(Operation.TAG, tag_body("gold", ["u1"]))
    key = ("pushsync_requests_total", (("endpoint", "tagUsers"), ("status", "200")))
    async with metrics.exporting(port=0, textfile=path, host="127.0.0.1", every=3600) as server:
        assert server is not None
        assert "pushsync_run_info" in path.read_text()  # written at once, before the first attempt
        metrics.on_attempt(Attempt(batch.batch_id, batch.endpoint, 1, 1, 0.01, AttemptOutcome.OK, 200))
        text = await asyncio.to_thread(scrape, server.url)
        assert samples(text)[key] == 1
        assert key not in samples(path.read_text())  # the next periodic write is an hour away
    assert samples(path.read_text())[key] == 1  # ...but the way out writes the final figures
    with pytest.raises(OSError):
        await asyncio.to_thread(scrape, server.url)  # the exporter is gone


def test_bind_names_the_run_and_asks_each_endpoint_its_budget() -> None:
    metrics = RunMetrics()
    batch = make_batch(Operation.TAG, tag_body("gold", ["u1"]))
    metrics.on_batch_start(batch)
    metrics.bind(run_id="r-4", job="j", platform="netmera", budget_for={"tagUsers": 2.5}.get)
    got = samples(_text(metrics), job="j")  # series created before bind() carry the bound job too
    assert got[("pushsync_run_info", (("platform", "netmera"), ("run_id", "r-4")))] == 1
    assert [k for k in got if k[0] == "pushsync_run_info"] == [
        ("pushsync_run_info", (("platform", "netmera"), ("run_id", "r-4")))
    ]
    assert got[("pushsync_budget_requests_per_second", (("endpoint", "tagUsers"),))] == 2.5


def test_a_taken_port_is_a_clear_error_before_anything_runs() -> None:
    from sync.errors import ExitCode, StateError

    first = RunMetrics().serve(0, host="127.0.0.1")
    try:
        with pytest.raises(StateError, match=f"cannot serve metrics on 127.0.0.1:{first.port}") as info:
            RunMetrics().serve(first.port, host="127.0.0.1")
        assert info.value.exit_code is ExitCode.BAD_JOB_OR_INPUT
    finally:
        first.close()


@pytest.mark.parametrize("port", [65536, 70000])
def test_a_port_out_of_range_is_a_clear_error_not_a_crash(port: int) -> None:
    """``--metrics-port 70000`` was "internal error: OverflowError ... a bug in pushsync" (exit 5)."""
    from sync.errors import ExitCode, StateError

    with pytest.raises(StateError, match=f"cannot serve metrics on 127.0.0.1:{port}: .*0-65535") as info:
        RunMetrics().serve(port, host="127.0.0.1")
    assert info.value.exit_code is ExitCode.BAD_JOB_OR_INPUT


class MidRunScraper:
    """A dispatch observer that scrapes the exporter once, when the first batch finishes: mid-run."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.text = ""

    def on_batch_start(self, batch: Batch) -> None:
        return None

    def on_attempt(self, attempt: Attempt) -> None:
        return None

    def on_batch_done(self, batch: Batch, result: BatchResult) -> None:
        if not self.text:
            self.text = scrape(self.url)  # the exporter has its own thread: the event loop may block on it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_real_run_serves_and_writes_the_documented_series(
    netmera_sandbox: Any, tmp_path: Path
) -> None:
    generate_users(tmp_path / "users.csv", 150, seed=3)
    (tmp_path / "job.yaml").write_text(
        f"""
version: 1
name: metered
workdir: work
destination: {{platform: netmera, base_url: "{netmera_sandbox.url}", secret: {{env: UNUSED_KEY}}}}
defaults: {{ext_id: user_id}}
sources:
  - {{name: users, path: users.csv, attributes: {{city: string, score: number}}, tags: {{column: segments, delimiter: "|"}}}}
dispatch:
  batch_size: 25
  concurrency: 3
  budgets: {{"*": {{requests: 50, period: 0.5}}, tagUsers: {{requests: 30, period: 0.5}}}}
""",
        encoding="utf-8",
    )
    port = free_port()
    scraper = MidRunScraper(f"http://127.0.0.1:{port}/metrics")
    textfile = tmp_path / "textfile" / "pushsync.prom"
    outcome = await run(
        load_job(tmp_path / "job.yaml"),
        RunOptions(
            api_key=netmera_sandbox.api_key, metrics_port=port, metrics_textfile=textfile, observers=[scraper]
        ),
    )
    assert families(scraper.text) >= set(SERIES)  # every documented series, while the run lasts
    mid = samples(scraper.text)
    assert mid[("pushsync_inflight_batches", ())] >= 1
    assert ("pushsync_run_info", (("platform", "netmera"), ("run_id", outcome.run_id))) in mid
    assert ("pushsync_exit_code", ()) not in mid  # set only once the run has ended
    final = samples(textfile.read_text(), job="metered")
    assert final[("pushsync_exit_code", ())] == int(outcome.exit_code) == 0
    assert final[("pushsync_last_success_time_seconds", ())] >= final[("pushsync_run_start_time_seconds", ())]
    assert families(textfile.read_text()) >= set(SERIES)
    assert final[("pushsync_inflight_batches", ())] == 0
    for e in outcome.summary.endpoints:
        ep = (("endpoint", e.endpoint),)
        requests = sum(
            v for (name, labels), v in final.items() if name == "pushsync_requests_total" and ep[0] in labels
        )
        assert requests == e.requests
        assert final[("pushsync_ids_total", (*ep, ("outcome", "ok")))] == e.ids_ok
        assert final[("pushsync_rate_limited_responses_total", ep)] == e.rate_limited
        assert final[("pushsync_retries_total", ep)] == e.retries
        assert final[("pushsync_request_latency_seconds_count", ep)] == e.requests
        assert final[("pushsync_budget_requests_per_second", ep)] == e.budget_rate
    assert final[("pushsync_budget_requests_per_second", (("endpoint", "tagUsers"),))] == 60.0
    with pytest.raises(OSError):
        scrape(scraper.url)  # the exporter stops with the run


async def test_a_failed_run_keeps_the_last_success_time_of_the_textfile(tmp_path: Path) -> None:
    """The batch-job convention: an alert on "no success for a day" reads last_success_time_seconds, so a
    failed run records its exit code but must neither erase nor advance the last success."""
    path = tmp_path / "pushsync.prom"
    wall = [1_700_000_000.0]
    ok = RunMetrics(run_id="r-ok", job="nightly", wall_clock=lambda: wall[0])
    async with ok.exporting(textfile=path, every=3600):
        pass
    await ok.finish(0)
    first = samples(path.read_text(), job="nightly")
    assert first[("pushsync_exit_code", ())] == 0
    assert first[("pushsync_last_success_time_seconds", ())] == 1_700_000_000.0

    wall[0] += 86_400
    failed = RunMetrics(run_id="r-bad", job="nightly", wall_clock=lambda: wall[0])
    async with failed.exporting(textfile=path, every=3600):
        pass
    await failed.finish(3)
    second = samples(path.read_text(), job="nightly")
    assert second[("pushsync_exit_code", ())] == 3
    assert second[("pushsync_last_success_time_seconds", ())] == 1_700_000_000.0  # carried over, not now
    assert second[("pushsync_run_start_time_seconds", ())] == 1_700_086_400.0


class _FakePushgateway:
    """A Pushgateway stand-in on loopback (its own thread): records each push's method, path and body."""

    def __init__(self) -> None:
        import http.server
        import threading

        pushes = self.pushes = []  # type: list[tuple[str, str, str]]

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                pushes.append((self.command, self.path, body))
                self.send_response(202)
                self.end_headers()

            do_POST = do_PUT = _record

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


async def test_metrics_are_pushed_to_a_pushgateway_grouped_by_job(
    netmera_sandbox: Any, tmp_path: Path
) -> None:
    """Short-lived pods push instead of exposing a port: during the run, and once more with the exit code."""
    generate_users(tmp_path / "users.csv", 40, seed=5)
    (tmp_path / "job.yaml").write_text(
        f"""
version: 1
name: pushed
destination: {{platform: netmera, base_url: "{netmera_sandbox.url}", secret: {{env: UNUSED_KEY}}}}
defaults: {{ext_id: user_id}}
sources:
  - {{name: users, path: users.csv, attributes: {{city: string}}}}
""",
        encoding="utf-8",
    )
    gateway = _FakePushgateway()
    try:
        outcome = await run(
            load_job(tmp_path / "job.yaml"),
            RunOptions(api_key=netmera_sandbox.api_key, metrics_pushgateway=gateway.url),
        )
    finally:
        gateway.close()
    assert outcome.exit_code == 0
    assert len(gateway.pushes) >= 3  # at the start, on the way out, and with the exit code
    assert {(method, path) for method, path, _ in gateway.pushes} == {("POST", "/metrics/job/pushed")}
    last = samples(gateway.pushes[-1][2], job="pushed")
    assert last[("pushsync_exit_code", ())] == 0
    assert ("pushsync_last_success_time_seconds", ()) in last
    assert last[("pushsync_ids_total", (("endpoint", "setProfileAttributes"), ("outcome", "ok")))] == 40
    assert samples(gateway.pushes[0][2], job="pushed").get(("pushsync_exit_code", ())) is None


def test_last_update_and_ids_series_follow_attempts_and_results() -> None:
    """The last-update gauge is the wall time of the last attempt or result (read at scrape time), and an
    endpoint's three ids series exist from its first result on, zeros included."""
    wall = FakeClock()
    metrics = RunMetrics(run_id="r-1", job="nightly", platform="netmera", wall_clock=wall)
    server = metrics.serve(0, host="127.0.0.1")
    try:
        assert samples(scrape(server.url))[("pushsync_last_update_time_seconds", ())] == 1000.0
        batch = make_batch(Operation.TAG, tag_body("gold", ["u1", "u2"]))
        metrics.on_batch_start(batch)
        wall.now = 1005.0
        metrics.on_attempt(Attempt(batch.batch_id, batch.endpoint, 1, 2, 0.01, AttemptOutcome.OK, 200))
        got = samples(scrape(server.url))
        assert got[("pushsync_last_update_time_seconds", ())] == 1005.0
        assert got[("pushsync_inflight_batches", ())] == 1
        ep = (("endpoint", "tagUsers"),)
        assert not any(name == "pushsync_ids_total" for name, _ in got)
        wall.now = 1007.5
        result = BatchResult(
            batch.batch_id, batch.endpoint, batch.operation, BatchStatus.OK, 1, 200, None, "", 2, ()
        )
        metrics.on_batch_done(batch, result)
        got = samples(scrape(server.url))
        assert got[("pushsync_last_update_time_seconds", ())] == 1007.5
        assert got[("pushsync_inflight_batches", ())] == 0
        assert got[("pushsync_ids_total", (*ep, ("outcome", "ok")))] == 2
        assert got[("pushsync_ids_total", (*ep, ("outcome", "rejected")))] == 0
        assert got[("pushsync_ids_total", (*ep, ("outcome", "failed")))] == 0
    finally:
        server.close()


async def test_a_taken_metrics_port_leaves_no_run_for_the_next_to_resume(
    netmera_sandbox: Any, tmp_path: Path
) -> None:
    """The port was bound after the run was recorded: exit 2 left a run "died" in the ledger, which the next run
    then "resumed" although nothing had been sent. Now the port is taken before the run is recorded."""
    from sync.errors import StateError
    from sync.ledger.ledger import Ledger

    _metered_job(tmp_path, netmera_sandbox.url, 40)
    job = load_job(tmp_path / "job.yaml")
    taken = RunMetrics().serve(0, host="127.0.0.1")
    try:
        with pytest.raises(StateError, match="cannot serve metrics on"):
            await run(job, RunOptions(api_key=netmera_sandbox.api_key, metrics_port=taken.port))
    finally:
        taken.close()
    with Ledger.open(tmp_path / "work" / "ledger.sqlite", read_only=True) as ledger:
        assert ledger.runs("metered") == []
    again = await run(job, RunOptions(api_key=netmera_sandbox.api_key))
    assert again.exit_code == 0 and again.resumed_from is None


class TextfileTaken:
    """A dispatch observer that puts a directory where the textfile is when the first batch finishes (the file
    cannot be replaced any more: a full disk or a removed mount behaves alike)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_batch_start(self, batch: Batch) -> None:
        return None

    def on_attempt(self, attempt: Attempt) -> None:
        return None

    def on_batch_done(self, batch: Batch, result: BatchResult) -> None:
        if not self.path.is_dir():
            self.path.unlink(missing_ok=True)
            self.path.mkdir()


async def test_a_textfile_that_cannot_be_written_is_exit_2_before_the_run_or_a_warning_during_it(
    netmera_sandbox: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--metrics-textfile under a file (or any unwritable place) was an "internal error ... a bug in pushsync"
    (exit 5) that left the run "died" for the next one to resume; a write failing mid-run failed the whole sync.
    Now: exit 2 before the run is recorded, and a ``metrics.write_failed`` warning during it."""
    from sync.errors import StateError
    from sync.ledger.ledger import Ledger

    _metered_job(tmp_path, netmera_sandbox.url, 40, "dispatch: {batch_size: 10}\n")
    job = load_job(tmp_path / "job.yaml")
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    bad = tmp_path / "a-file" / "pushsync.prom"
    with pytest.raises(
        StateError, match=f"cannot write the metrics textfile {bad}: .*a-file is not a directory"
    ):
        await run(job, RunOptions(api_key=netmera_sandbox.api_key, metrics_textfile=bad))
    with Ledger.open(tmp_path / "work" / "ledger.sqlite", read_only=True) as ledger:
        assert ledger.runs("metered") == []

    textfile = tmp_path / "prom" / "pushsync.prom"
    outcome = await run(
        job,
        RunOptions(
            api_key=netmera_sandbox.api_key, metrics_textfile=textfile, observers=[TextfileTaken(textfile)]
        ),
    )
    assert outcome.exit_code == 0 and outcome.summary.ids_ok == 40
    assert "metrics.write_failed" in capsys.readouterr().err


async def test_a_run_stopped_after_sending_began_records_its_exit_code(
    netmera_sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that ended with an error once sending began (a full disk: exit 3) published its metrics without
    ``pushsync_exit_code`` and without the last success time: ``pushsync_exit_code != 0`` and "no success for a
    day" both went silent (the Pushgateway even kept the previous run's exit code 0). It records its exit code now,
    and carries the last success over, as a run that ended with a summary does."""
    import errno

    from reliability.workload import job_yaml

    from sync.errors import ExitCode, RunStoppedError
    from sync.planning._staging import Settler

    generate_users(tmp_path / "data" / "users.csv", 300, seed=5)
    dispatch = "  concurrency: 2\n  queue_size: 2\n"
    (tmp_path / "job.yaml").write_text(
        job_yaml(netmera_sandbox.url, name="t", key_env="UNUSED_KEY", batch_size=10, dispatch=dispatch),
        encoding="utf-8",
    )
    job = load_job(tmp_path / "job.yaml")
    textfile = tmp_path / "prom" / "pushsync.prom"
    ok = await run(job, RunOptions(api_key=netmera_sandbox.api_key, metrics_textfile=textfile))
    assert ok.exit_code == 0
    success = samples(textfile.read_text())[("pushsync_last_success_time_seconds", ())]

    monkeypatch.setattr("sync.planning.planning.ROWS_PER_BUCKET", 10)
    monkeypatch.setattr("sync.planning.planning.HEAD_ROWS", 10)
    real = Settler.settle_next

    def disk_full(self: Settler) -> None:
        if self.next >= 20:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path))
        real(self)

    monkeypatch.setattr(Settler, "settle_next", disk_full)
    with pytest.raises(RunStoppedError):
        await run(
            job, RunOptions(api_key=netmera_sandbox.api_key, metrics_textfile=textfile, full_refresh=True)
        )
    final = samples(textfile.read_text())
    assert final[("pushsync_exit_code", ())] == ExitCode.ABORTED
    assert final[("pushsync_last_success_time_seconds", ())] == success


@pytest.mark.parametrize(
    ("gateway", "said"),
    [
        ("http://pushgateway:notaport", "is not a usable URL"),
        ("http://[::1", "is not a usable URL: Invalid IPv6 URL"),
        ("http://pushgateway:99999", "is not a usable URL: Port out of range"),
        ("ftp://pushgateway:9091", "must be an http:// or https:// URL"),
    ],
)
async def test_a_malformed_pushgateway_url_is_exit_2_before_the_run(
    netmera_sandbox: Any, tmp_path: Path, gateway: str, said: str
) -> None:
    """``--metrics-pushgateway http://gw:notaport`` crashed the run ("internal error: InvalidURL ... a bug in
    pushsync", exit 5) and left it "died" in the ledger. Now: exit 2 before the run is recorded."""
    from sync.errors import ExitCode, StateError
    from sync.ledger.ledger import Ledger

    _metered_job(tmp_path, netmera_sandbox.url, 20)
    with pytest.raises(StateError, match=f"--metrics-pushgateway {said}") as info:
        await run(
            load_job(tmp_path / "job.yaml"),
            RunOptions(api_key=netmera_sandbox.api_key, metrics_pushgateway=gateway),
        )
    assert info.value.exit_code is ExitCode.BAD_JOB_OR_INPUT
    with Ledger.open(tmp_path / "work" / "ledger.sqlite", read_only=True) as ledger:
        assert ledger.runs("metered") == []


def _metered_job(tmp_path: Path, url: str, users: int, extra: str = "") -> None:
    """``tmp_path/job.yaml``: ``users`` generated users' cities to the sandbox at ``url`` (``extra``: more
    top-level lines, e.g. ``dispatch:``)."""
    generate_users(tmp_path / "users.csv", users, seed=3)
    (tmp_path / "job.yaml").write_text(
        f"""
version: 1
name: metered
workdir: work
destination: {{platform: netmera, base_url: "{url}", secret: {{env: UNUSED_KEY}}}}
defaults: {{ext_id: user_id}}
sources:
  - {{name: users, path: users.csv, attributes: {{city: string}}}}
{extra}""",
        encoding="utf-8",
    )
