"""How ``pushsync run`` ends its process: :func:`sync.cli.exit_now` skips the interpreter's teardown, never what
the process still owes (``atexit`` handlers, buffered output, a non-daemon thread's work)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# A module-level object whose finaliser only the interpreter's teardown runs: it tells the two exits apart.
PRELUDE = """
import atexit, sys, threading
from sync.cli import exit_now

class Teardown:
    def __del__(self):
        sys.stdout.write("teardown ran\\n")
        sys.stdout.flush()

kept = Teardown()
atexit.register(lambda: sys.stdout.write("atexit ran\\n"))
"""


def _telling_the_teardown(folder: Path) -> dict[str, str]:
    """The environment of a ``python -m sync`` whose interpreter's teardown, if it runs, writes "teardown ran" on
    stderr: a finaliser made by a ``sitecustomize`` module written in ``folder``."""
    (folder / "sitecustomize.py").write_text(
        "import os\n"
        "class Teardown:\n"
        "    def __del__(self):\n"
        "        os.write(2, b'teardown ran\\n')\n"
        "kept = Teardown()\n",
        encoding="utf-8",
    )
    return {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_exit_now_skips_the_teardown_but_keeps_atexit_output_and_the_code() -> None:
    done = _python(
        """
        sys.stdout.write("summary\\n")  # buffered (a pipe): must reach the reader all the same
        exit_now(3)
        """
    )
    assert done.returncode == 3
    assert done.stdout.splitlines() == ["summary", "atexit ran"]


def test_a_normal_exit_runs_the_teardown() -> None:
    # The reference for the test above: without exit_now the same process runs the finaliser at its end.
    done = _python("sys.exit(3)")
    assert done.returncode == 3
    assert done.stdout.splitlines() == ["atexit ran", "teardown ran"]


def test_exit_now_waits_for_a_non_daemon_thread_like_a_normal_exit() -> None:
    done = _python(
        """
        started = threading.Event()
        release = threading.Event()

        def work():
            started.set()
            release.wait()
            sys.stdout.write("thread done\\n")

        threading.Thread(target=work).start()
        started.wait()
        threading.Timer(0.05, release.set).start()  # the thread still runs when exit_now is called
        exit_now(1)
        """
    )
    assert done.returncode == 1
    assert "thread done" in done.stdout.splitlines()


def test_exit_now_waits_for_an_executor_left_open_and_still_skips_the_teardown() -> None:
    # An executor never shut down (its idle worker is a non-daemon thread) with a task still running: exit_now
    # waits for the task as a normal exit does — threading's own shutdown — and still skips the teardown. It
    # used to fall back to a normal exit whenever such a thread was alive, and the teardown's C++ destructors
    # then met Arrow's thread pools at work (an interrupted plan: SIGABRT after "interrupted").
    done = _python(
        """
        import time
        from concurrent.futures import ThreadPoolExecutor

        def work():
            time.sleep(0.1)
            sys.stdout.write("task done\\n")

        pool = ThreadPoolExecutor(1)
        pool.submit(work)
        exit_now(1)
        """
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == ["task done", "atexit ran"]


def test_python_m_sync_run_ends_through_exit_now(tmp_path: Path) -> None:
    # `python -m sync run` (and the `pushsync` script) end with exit_now: a job that fails its checks still
    # prints its error and exits 2, and the interpreter's teardown does not run (a finaliser registered by a
    # module the run imports never prints).
    job = tmp_path / "job.yaml"
    job.write_text("name: broken\n", encoding="utf-8")
    env = _telling_the_teardown(tmp_path)

    def command(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sync", name, str(job)],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    for name in ("run", "plan"):
        run = command(name)
        assert run.returncode == 2
        assert "pushsync: error" in run.stderr
        assert "teardown ran" not in run.stderr, name
    # The same process for another command (validate) ends normally: the teardown runs.
    other = command("validate")
    assert other.returncode == 2
    assert "teardown ran" in other.stderr


def test_exit_now_leaves_an_output_it_cannot_write_to_the_normal_exit() -> None:
    # stdout on a full device, buffered: the summary cannot be written. A normal exit says so and fails (120);
    # exit_now must end the same way, not as a silent success.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    def ending(how: str) -> subprocess.CompletedProcess[str]:
        with open("/dev/full", "w") as full:
            return subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"import sys\nfrom sync.cli import exit_now\nprint('summary')\n{how}(0)\n",
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
                check=False,
            )

    normal, quick = ending("sys.exit"), ending("exit_now")
    assert normal.returncode == quick.returncode == 120
    assert "No space left on device" in normal.stderr
    assert "No space left on device" in quick.stderr


def _threshold_around_entry(command: str) -> tuple[int, int]:
    """The collector's youngest-generation threshold before ``sync.cli.entry`` and as it leaves it for
    ``pushsync COMMAND`` (the command's own work left out)."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import gc, sys
                import sync.cli as cli

                before = gc.get_threshold()[0]

                def main(argv):
                    print(before, gc.get_threshold()[0], flush=True)
                    return 0

                cli.main = main
                sys.argv = ["pushsync", "{command}", "job.yaml"]
                cli.entry()
                """
            ),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    before, during = done.stdout.split()
    return int(before), int(during)


def test_a_run_process_collects_reference_cycles_less_often_than_pythons_default() -> None:
    from sync.cli import COLLECT_EVERY

    before, during = _threshold_around_entry("run")
    assert before < COLLECT_EVERY
    assert during == COLLECT_EVERY
    # Any other command keeps Python's own setting.
    before, during = _threshold_around_entry("validate")
    assert during == before


@pytest.mark.parametrize(("command", "deferred"), [("run", True), ("plan", False), ("doctor", False)])
def test_only_a_run_process_loads_ca_certificates_when_a_tls_context_is_used(
    command: str, deferred: bool
) -> None:
    """``pushsync run`` lets its connector's TLS contexts load the system's CA certificates only when its job uses
    them (sync/platforms/_tls.py, tests/test_imports.py); a program embedding pushsync and the other commands keep
    aiohttp's own loading at import."""
    script = textwrap.dedent(
        f"""
        import sys
        import sync.cli as cli
        from sync.platforms import _tls

        before = _tls.DEFER

        def main(argv):
            print(before, _tls.DEFER, flush=True)
            return 0

        cli.main = main
        sys.argv = ["pushsync", "{command}", "job.yaml"]
        cli.entry()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", str(deferred)]


def test_sigterm_before_a_command_handles_signals_is_exit_4_with_one_line(tmp_path: Path) -> None:
    """A scheduler's SIGTERM while pushsync starts, or while a command without handlers of its own reads
    (``validate`` blocked on a job file that is a FIFO here): exit 4 and "pushsync: interrupted", as docs/run.md
    says of a signal — not the default termination (exit 143, -15 to Python, nothing said)."""
    import signal
    import time

    fifo = tmp_path / "job.yaml"
    os.mkfifo(fifo)
    # An interrupted command ends through exit_now (no teardown: see sync.cli.exit_now).
    env = _telling_the_teardown(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "sync", "validate", str(fifo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        # Until it blocks opening the FIFO (no writer): the kernel's wait for the other end.
        wchan = Path(f"/proc/{process.pid}/wchan")
        deadline = time.monotonic() + 60
        while "partner" not in wchan.read_text():
            assert process.poll() is None and time.monotonic() < deadline, "never blocked on the FIFO"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 4, err
    assert err.strip() == "pushsync: interrupted"


@pytest.mark.parametrize(("given", "in_force"), [(None, "0"), ("1", "1")])
def test_the_entry_point_runs_arrows_allocator_on_small_pages_unless_told(
    tmp_path: Path, given: str | None, in_force: str
) -> None:
    # mimalloc (pyarrow's memory pool) says which allow_thp it runs with (MIMALLOC_VERBOSE): 0 from the entry
    # point (huge pages zeroed over and over: docs/run.md), or what the environment says.
    (tmp_path / "users.csv").write_text("id,name\nU1,Ada\n", encoding="utf-8")
    job = tmp_path / "job.yaml"
    job.write_text(
        "version: 1\nname: pages\nworkdir: work\n"
        "destination: {platform: netmera, base_url: 'http://127.0.0.1:9/rest/3.0/', secret: {env: NETMERA_API_KEY}}\n"
        "sources:\n  - {name: users, path: users.csv, ext_id: id, attributes: {name: string}}\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k != "MIMALLOC_ALLOW_THP"}
    env["MIMALLOC_VERBOSE"] = "1"
    if given is not None:
        env["MIMALLOC_ALLOW_THP"] = given
    done = subprocess.run(
        [sys.executable, "-m", "sync", "validate", str(job)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"option 'allow_thp': {in_force}" in done.stderr
