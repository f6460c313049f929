"""The platform registry: a fake platform (tests/fake_platform.py) registered with no edit anywhere else goes
through validate, plan, run, resume and retry; the loader asks each platform what it supports."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fake_platform import FAKE, FakePlatform
from observers import StopAfter

from sync.cli import main
from sync.config import load_job
from sync.errors import BadJobError, ExitCode
from sync.ledger.ledger import Ledger
from sync.planning.planning import build_plan
from sync.platforms.registry import REGISTRY
from sync.run import RunOptions, run

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def _fake_job(tmp_path: Path, users: int = 25) -> Path:
    rows = ["id,city"] + [f"u{i:02d},city{i}" for i in range(users)]
    (tmp_path / "users.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    job = tmp_path / "job.yaml"
    job.write_text(
        "version: 1\nname: fake-job\nworkdir: work\n"
        "destination: {platform: fake, base_url: 'http://127.0.0.1:9/', secret: {env: FAKE_KEY}}\n"
        "sources:\n  - {name: users, path: users.csv, ext_id: id, attributes: {city: string}}\n"
        "dispatch: {concurrency: 1, queue_size: 1, retry: {max_attempts: 3, base_delay: 0.001, max_delay: 0.002}}\n",
        encoding="utf-8",
    )
    return job


def test_an_unregistered_platform_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(BadJobError) as caught:
        load_job(_fake_job(tmp_path))
    assert [p.location for p in caught.value.problems] == ["destination.platform"]
    assert "unknown platform 'fake'" in str(caught.value) and "netmera" in str(caught.value)


async def test_a_fake_platform_goes_through_plan_run_resume_and_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[Path] = []
    real_open = Ledger.open

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("sync.run.Ledger.open", counting_open)
    server = FAKE.server
    server.refuse, server.users, server.requests = {"u07"}, {}, []
    with REGISTRY.registered(FAKE):
        job = load_job(_fake_job(tmp_path))
        assert job.batch_size_for("upsert") == 10 and job.dispatch.budget_for("upsert") is not None
        with build_plan(job) as plan:
            summary = plan.summary()
            assert (summary.total_requests, summary.total_ids) == (3, 25)
            assert summary.samples["upsert"]["users"][0].keys() == {"id", "city"}

        # 1. a run stopped after its first batch: interrupted, the rest unsent
        stop = asyncio.Event()
        first = await run(job, RunOptions(api_key="k", stop=stop, observers=[StopAfter(stop, 1)]))
        assert first.exit_code is ExitCode.INTERRUPTED and opened == [job.workdir.resolve() / "ledger.sqlite"]
        sent_first = {x for request in server.requests for x in request}

        # 2. the next run resumes it: only what the first did not confirm, the refused u07 isolated by splitting
        server.requests.clear()
        resumed = await run(job, RunOptions(api_key="k"))
        assert resumed.resumed_from == first.run_id and resumed.replay is not None
        assert resumed.exit_code is ExitCode.PARTIAL and resumed.summary.ids_rejected == (
            0 if "u07" in sent_first else 1
        )
        assert not ({x for r in server.requests for x in r} & (sent_first - {"u07"}))
        assert sorted(server.users) == [f"u{i:02d}" for i in range(25) if i != 7]
        assert len(opened) == 2  # one ledger connection per run

        # 3. the user fixes the cause; retry sends exactly the refused user, in one request
        server.refuse.clear()
        server.requests.clear()
        retried = await run(job, RunOptions(api_key="k", retry=first.run_id))
        assert (
            retried.exit_code is ExitCode.OK
            and retried.replay is not None
            and retried.replay.cut_to_refused == 1
        )
        assert server.requests == [["u07"]] and server.users["u07"] == {"city": "city7"}
        assert len(opened) == 3


@pytest.mark.parametrize("job_file", ["notifyvisitors.yaml", "formsonfire.yaml"])
def test_snapshot_mode_is_refused_for_platforms_without_it(
    job_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (JOBS / job_file).read_text(encoding="utf-8")
    job = tmp_path / job_file
    job.write_text(text.replace("version: 1\n", "version: 1\nmode: snapshot\n", 1), encoding="utf-8")
    assert main(["validate", "--no-files", str(job)]) == 2
    out = capsys.readouterr().out
    assert "mode: snapshot mode is not available for" in out and "use mode 'changes'" in out
    # Netmera keeps it: the same switch on its example job validates.
    netmera = tmp_path / "netmera.yaml"
    netmera.write_text(
        (JOBS / "demo.yaml")
        .read_text(encoding="utf-8")
        .replace("version: 1\n", "version: 1\nmode: snapshot\n", 1),
        encoding="utf-8",
    )
    assert main(["validate", "--no-files", str(netmera)]) == 0, capsys.readouterr().out


def test_every_registered_platform_declares_what_the_loader_and_resume_need() -> None:
    for name in REGISTRY.names():
        platform = REGISTRY[name]
        assert platform.name == name
        assert 1 <= platform.limits.default_batch_size <= platform.limits.max_batch
        assert platform.sandbox is not None and platform.sandbox.endswith("." + name)


# --- pushsync sandbox lists and starts the registry's platforms (issue 12) ---------------------------------------


class _FakeWithSandbox(FakePlatform):
    sandbox = "fake_sandbox"


def test_the_sandbox_command_lists_the_registry_s_platforms(capsys: pytest.CaptureFixture[str]) -> None:
    with REGISTRY.registered(_FakeWithSandbox()), pytest.raises(SystemExit) as exit_info:
        main(["sandbox", "--help"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    for name in (*REGISTRY.names(), "fake", "meiro"):
        assert name in listed
    with pytest.raises(SystemExit):  # without the registration there is no such sandbox
        main(["sandbox", "fake"])
    assert "invalid choice: 'fake'" in capsys.readouterr().err


def test_a_registered_platform_s_sandbox_starts_from_the_cli(tmp_path: Path) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    script = (
        "import sys; from test_platform_registry import _FakeWithSandbox; "
        "from sync.platforms.registry import REGISTRY; from sync.cli import main; "
        "REGISTRY.register(_FakeWithSandbox()); sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.getcwd()])}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "sandbox", "fake", "--port", "0", "--key", "k1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "the fake platform's sandbox"
        url = proc.stdout.readline().strip()
        request = urllib.request.Request(
            url + "upsert",
            data=json.dumps({"users": [{"id": "a"}, {"id": "b"}]}).encode(),
            headers={"X-Key": "k1", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.loads(answer.read()) == {"accepted": ["a", "b"]}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # closes the pipes
