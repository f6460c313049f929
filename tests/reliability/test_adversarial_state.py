"""Adversarial corpus, part A (issue #11): state, resume and exit codes — nothing lost, nothing sent twice.

Every case drives ``pushsync`` as a real process against a Netmera sandbox in its own process and checks what the
sandbox holds (and what it was asked) afterwards:

* a user whose row was rejected keeps their confirmed state and is never removed (snapshot mode);
* a non-idempotent row (an event) confirmed by a run is never sent again by a resume, however the input changed;
* the staging directory a killed run leaves behind is removed by the next run (never one a live run uses);
* an error after the first request went out never exits 2 ("nothing was sent");
* SIGTERM while the job is planned exits 4 with nothing half-recorded.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from sync.config import load_job
from sync.ledger.ledger import unpack_ids
from sync.state import StateStore
from tests.conftest import NetmeraProcess
from tests.netmera_e2e import (
    PLAIN_USERS,
    finish,
    inspect,
    netmera_job,
    pushsync,
    requests_total,
    sandbox_users,
)

# --- helpers -----------------------------------------------------------------------------------------------------


def run(tmp: Path, sandbox: NetmeraProcess, *args: str) -> tuple[int, str, str]:
    return finish(pushsync(tmp, sandbox, *args, "--progress", "none"))


def get_profile(sandbox: NetmeraProcess, ext_id: str) -> tuple[int, Any]:
    """``getProfileAttributes`` through the API, as a user would check: (HTTP status, body)."""
    request = urllib.request.Request(
        f"{sandbox.url}getProfileAttributes?extId={ext_id}", headers={"X-netmera-api-key": sandbox.api_key}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def requests_to(sandbox: NetmeraProcess, endpoint: str) -> int:
    return sum(inspect(sandbox, "stats")["requests"].get(endpoint, {}).values())


def ledger_rows(tmp: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{tmp / 'work' / 'ledger.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


# --- 1. a rejected row never removes its user ---------------------------------------------------------------------

USERS = 100


def snapshot_job(url: str, removal: str = "delete") -> str:
    return netmera_job(
        url,
        name="adversarial-snapshot",
        head=f"mode: snapshot\nsnapshot: {{removal: {removal}}}\n",
        sources=PLAIN_USERS,
        dispatch="""\
  concurrency: 2
  request_timeout: 5
  retry: {max_attempts: 2, base_delay: 0.01, max_delay: 0.05}
""",
    )


def user_lines(n: int = USERS) -> list[str]:
    return [f"user{i:03d},Name{i},{i},{'gold' if i % 2 else 'silver'}" for i in range(n)]


def write_users(tmp: Path, lines: list[str]) -> None:
    (tmp / "users.csv").write_text("id,name,score,segments\n" + "\n".join(lines) + "\n", encoding="utf-8")


def state_of(tmp: Path, ext_id: str) -> dict[str, Any]:
    # Through the store: the base file plus the overlay segments later commits laid over it.
    job = load_job(tmp / "job.yaml")
    store = StateStore(job.workdir, job.destination)
    assert store.path_for(job.sources[0]).is_file()
    rows = store.read(job.sources[0]).filter(pl.col("__ext_id") == ext_id).to_dicts()
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.parametrize(
    ("removal", "broken"),
    [
        ("delete", "user007,Name7,seven,gold"),  # a typo in a number
        ("delete", "user007,Name7,7,gold,extra"),  # a field too many
        ("untag", "user007,Name7,seven,gold"),
    ],
    ids=["delete-typo", "delete-extra-field", "untag-typo"],
)
def test_a_rejected_row_keeps_its_user_and_their_confirmed_state(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess, removal: str, broken: str
) -> None:
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(snapshot_job(sandbox.url, removal), encoding="utf-8")
    lines = user_lines()
    write_users(tmp_path, lines)
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml")
    assert code == 0, (out, err)
    before = state_of(tmp_path, "user007")

    lines[7] = broken
    write_users(tmp_path, lines)
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml", "--output", "json")
    assert code == 1, (out, err)  # a rejected row: finished, with rows rejected
    status, body = get_profile(sandbox, "user007")
    assert status == 200 and body["profile"]["score"] == 7, (status, body)
    assert requests_to(sandbox, "deleteUsersPermanently") == 0
    assert requests_to(sandbox, "untagUsers") == 0
    tags = {u["extId"]: u.get("tags", []) for u in inspect(sandbox, "state?format=json")["users"]}
    assert tags["user007"] == ["gold"]
    assert state_of(tmp_path, "user007") == before  # the commit kept the old confirmed state
    doc = json.loads(out)
    assert doc["diff"]["users_held"] == 1 and doc["diff"]["users_removed"] == 0, doc["diff"]

    # Once the row is fixed nothing needs sending (its state was kept); a user truly gone is removed.
    lines[7] = user_lines()[7]
    write_users(tmp_path, lines[:-1])
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml", "--output", "json")
    assert code == 0, (out, err)
    doc = json.loads(out)
    assert doc["diff"]["users_removed"] == 1 and doc["diff"]["users_held"] == 0, doc["diff"]
    if removal == "delete":
        assert get_profile(sandbox, f"user{USERS - 1:03d}")[0] == 400
    assert get_profile(sandbox, "user007")[0] == 200


def test_a_rejected_row_that_names_no_user_holds_every_removal(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess
) -> None:
    """A quote never closed swallows the rows after it into one malformed record: nobody can tell which users
    it hid, so no user is removed this run (the output says so); ``--force`` removes them anyway."""
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(snapshot_job(sandbox.url), encoding="utf-8")
    lines = user_lines()
    write_users(tmp_path, lines)
    assert run(tmp_path, sandbox, "run", "job.yaml")[0] == 0

    # user097's name opens a quote that is never closed: user097 to user099 vanish into one malformed record;
    # user003 really left the export.
    broken = [*lines[:3], *lines[4:97], 'user097,"Name97,97,gold', *lines[98:]]
    write_users(tmp_path, broken)
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml", "--output", "json")
    assert code == 1, (out, err)
    doc = json.loads(out)
    assert doc["diff"]["users_removed"] == 0 and doc["diff"]["removals_held"] == 4, doc["diff"]
    assert requests_to(sandbox, "deleteUsersPermanently") == 0
    for ext_id in ("user003", "user097", "user098", "user099"):
        assert get_profile(sandbox, ext_id)[0] == 200, ext_id

    code, out, err = run(tmp_path, sandbox, "run", "job.yaml", "--output", "json", "--force")
    assert code == 1, (out, err)
    assert json.loads(out)["diff"]["users_removed"] == 4
    assert get_profile(sandbox, "user003")[0] == 400


@pytest.mark.parametrize(
    "written", ["user007\u200b", "user007\u0000", "user\u0007007"], ids=["zwsp", "nul", "bel"]
)
def test_a_row_whose_id_is_refused_holds_every_removal(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess, written: str
) -> None:
    """An ID refused for what it holds (a zero-width space, a NUL, a control character) is not the user it was
    meant for: user007, missing from the clean rows, was deleted. Nobody can tell which user the row meant, so
    no user is removed this run, as for a malformed record."""
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(snapshot_job(sandbox.url), encoding="utf-8")
    lines = user_lines()
    write_users(tmp_path, lines)
    assert run(tmp_path, sandbox, "run", "job.yaml")[0] == 0

    lines[7] = lines[7].replace("user007", written, 1)
    write_users(tmp_path, lines)
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml", "--output", "json")
    assert code == 1, (out, err)
    doc = json.loads(out)
    assert doc["diff"]["users_removed"] == 0 and doc["diff"]["removals_held"] == 1, doc["diff"]
    assert requests_to(sandbox, "deleteUsersPermanently") == 0
    assert get_profile(sandbox, "user007")[0] == 200


def test_an_empty_id_cell_names_no_user_and_holds_nothing(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess
) -> None:
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(snapshot_job(sandbox.url), encoding="utf-8")
    lines = user_lines()
    write_users(tmp_path, lines)
    assert run(tmp_path, sandbox, "run", "job.yaml")[0] == 0
    write_users(tmp_path, [*lines[:3], *lines[4:], ",Nobody,1,gold"])
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml", "--output", "json")
    assert code == 1, (out, err)
    assert json.loads(out)["diff"]["users_removed"] == 1
    assert get_profile(sandbox, "user003")[0] == 400


# --- 3. a killed run's staging directory is removed by the next one ----------------------------------------------


def changes_job(url: str, *, batch: int = 50, budget: str = "") -> str:
    budgets = f"  budgets: {{'*': {{requests: {budget}, per: 1s}}}}\n" if budget else ""
    return netmera_job(
        url,
        name="adversarial-changes",
        sources=PLAIN_USERS,
        dispatch=f"""\
  concurrency: 2
  batch_size: {batch}
  request_timeout: 5
  drain_timeout: 2
{budgets}""",
    )


def write_many_users(tmp: Path, n: int) -> None:
    lines = [f"u{i:06d},N{i},{i},{'a|b' if i % 2 else 'c'}" for i in range(n)]
    (tmp / "users.csv").write_text("id,name,score,segments\n" + "\n".join(lines) + "\n", encoding="utf-8")


def ok_batches(tmp: Path) -> int:
    try:
        return int(ledger_rows(tmp, "SELECT COUNT(*) FROM batches WHERE status = 'ok'")[0][0])
    except sqlite3.Error:
        return 0


def run_killed_once_confirmed(tmp: Path, sandbox: NetmeraProcess, batches: int) -> None:
    """``pushsync run job.yaml`` in ``tmp``, SIGKILLed once its ledger holds ``batches`` confirmed batches (or
    after 60 s, or when it ended)."""
    proc = pushsync(tmp, sandbox, "run", "job.yaml", "--progress", "none")
    deadline = time.monotonic() + 60
    while proc.poll() is None and ok_batches(tmp) < batches and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    finish(proc)


def staging_dirs(tmp: Path) -> list[Path]:
    return sorted((tmp / "work").glob("plan-*"))


def test_the_next_run_removes_the_staging_directory_a_killed_run_left(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess
) -> None:
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(changes_job(sandbox.url, budget="40"), encoding="utf-8")
    write_many_users(tmp_path, 3000)
    left: list[list[Path]] = []
    for _ in range(2):
        confirmed = ok_batches(tmp_path)
        proc = pushsync(tmp_path, sandbox, "run", "job.yaml", "--progress", "none")
        deadline = time.monotonic() + 60
        while proc.poll() is None and ok_batches(tmp_path) < confirmed + 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        left.append(staging_dirs(tmp_path))
    # Each kill leaves its run's staging directory (the size of the input); the next run removes it.
    assert len(left[0]) == 1 and len(left[1]) == 1 and left[0] != left[1], left
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml")
    assert code == 0, (out, err)
    assert staging_dirs(tmp_path) == []


def test_a_staging_directory_in_use_is_never_removed(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess
) -> None:
    """A plan held open by one process survives the clean-up of another (``pushsync plan`` cleans up too)."""
    from sync.config import load_job
    from sync.planning.planning import build_plan

    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(changes_job(sandbox.url), encoding="utf-8")
    write_many_users(tmp_path, 500)
    with build_plan(load_job(tmp_path / "job.yaml")) as live:
        (mine,) = staging_dirs(tmp_path)
        code, out, err = finish(pushsync(tmp_path, sandbox, "plan", "job.yaml"))
        assert code == 0, (out, err)
        assert mine.is_dir()
        assert sum(len(b.ext_ids) for b in live.batches()) == 500 + 250 * 3  # profiles, tags a, b, c
    assert staging_dirs(tmp_path) == []


def test_a_diff_a_killed_run_never_finished_is_removed_by_the_next_run(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess
) -> None:
    """A snapshot run killed while it diffs leaves ``pending/<run>/`` without ``meta.json`` (nothing of it was
    sent); the next run, holding the job's lock, removes it. ``pushsync plan`` keeps its preview delta inside its
    own staging directory, so it leaves nothing in ``pending/`` either."""
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(snapshot_job(sandbox.url), encoding="utf-8")
    write_users(tmp_path, user_lines())
    assert run(tmp_path, sandbox, "run", "job.yaml")[0] == 0
    (pending,) = (tmp_path / "work" / "state").glob("netmera-*")
    dead = pending / "pending" / "20260101T000000Z-dead" / "users"
    dead.mkdir(parents=True)
    (dead / "00000.parquet").write_bytes(b"half a delta")
    code, out, err = finish(pushsync(tmp_path, sandbox, "plan", "job.yaml"))
    assert code == 0, (out, err)
    assert [p.name for p in (pending / "pending").iterdir()] == ["20260101T000000Z-dead"]
    assert run(tmp_path, sandbox, "run", "job.yaml")[0] == 0
    assert list((pending / "pending").iterdir()) == []


# --- 4. an error after the first request never exits 2 ------------------------------------------------------------


def test_a_disk_that_fills_mid_run_does_not_exit_2_and_a_resume_finishes(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess
) -> None:
    """The job's files may not grow past 2.5 MB (RLIMIT_FSIZE, as a full disk would stop them): the staging
    files fit (one sorted chunk of 20,000 rows is ~1.8 MB), the ledger's do not, and the run dies part-way
    through. Exit 2 means "nothing was sent"; requests went out, so it is 3 (aborted), and the next run (with
    room again) finishes the job."""
    import resource

    sandbox = netmera_sandbox_process
    # A budget far above Netmera's default 20/s: ~2,500 requests of 20 IDs, which the default spaces over 75 s.
    (tmp_path / "job.yaml").write_text(changes_job(sandbox.url, batch=20, budget="2000"), encoding="utf-8")
    write_many_users(tmp_path, 20000)

    def small_disk() -> None:
        signal.signal(
            signal.SIGXFSZ, signal.SIG_IGN
        )  # a write past the limit fails (EFBIG) like ENOSPC would
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_500_000, 2_500_000))

    proc = pushsync(tmp_path, sandbox, "run", "job.yaml", "--progress", "none", preexec_fn=small_disk)
    code, out, err = finish(proc)
    sent = requests_total(sandbox)
    assert sent > 0, (code, out, err)
    assert code == 3, (code, out, err)
    assert "Traceback" not in err and "resume" in err, err
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml")
    assert code == 0, (out, err)
    assert requests_total(sandbox) > sent  # the first run died part-way: the resume sent the rest
    users = {u["extId"]: u for u in inspect(sandbox, "state?format=json")["users"]}
    assert len(users) == 20000
    assert users["u019999"]["profile"] == {"name": "N19999", "score": 19999}


# --- 5. SIGTERM while the job is planned -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["changes", "snapshot"])
def test_sigterm_while_planning_exits_4_with_nothing_recorded(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess, mode: str
) -> None:
    sandbox = netmera_sandbox_process
    job = changes_job(sandbox.url)
    if mode == "snapshot":
        job = job.replace("workdir: work\n", "workdir: work\nmode: snapshot\n")
    (tmp_path / "job.yaml").write_text(job, encoding="utf-8")
    write_many_users(tmp_path, 400_000)  # a few seconds of planning
    proc = pushsync(tmp_path, sandbox, "run", "job.yaml", "--progress", "none")
    deadline = time.monotonic() + 60
    while not staging_dirs(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "planning ended before the signal"
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 4, (code, out, err)
    assert "Traceback" not in err, err
    assert requests_total(sandbox) == 0
    assert staging_dirs(tmp_path) == []
    ledger = tmp_path / "work" / "ledger.sqlite"
    assert not ledger.exists() or ledger_rows(tmp_path, "SELECT run_id FROM runs") == []
    state = list((tmp_path / "work" / "state").glob("*/pending/*")) + list(
        (tmp_path / "work" / "state").glob("*/*.parquet")
    )
    assert state == []


# --- 2. a confirmed event is never sent again, however the export changed before the resume -----------------------

EVENTS = 5000
EVENT_BATCH = 100


def events_job(url: str) -> str:
    return netmera_job(
        url,
        name="adversarial-events",
        sources="""\
  - name: events
    kind: events
    path: events.csv
    ext_id: id
    event: event
    attributes:
      amount: number
""",
        dispatch=f"""\
  concurrency: 2
  batch_size: {EVENT_BATCH}
  request_timeout: 5
  drain_timeout: 5
  budgets: {{'*': {{requests: 10, per: 1s}}}}
""",
    )


def event_lines(n: int = EVENTS) -> list[str]:
    # Several identical events per user: the occurrence index tells them apart.
    return [f"c{i % 1700:05d},purchase,{i % 3}" for i in range(n)]


def write_events(tmp: Path, lines: list[str]) -> None:
    (tmp / "events.csv").write_text("id,event,amount\n" + "\n".join(lines) + "\n", encoding="utf-8")


def events_held(sandbox: NetmeraProcess) -> dict[tuple[str, float], int]:
    """(user, amount) → events recorded by the sandbox."""
    out: dict[tuple[str, float], int] = {}
    for event in inspect(sandbox, "state?format=json")["events"]:
        key = (event["extId"], float(event["attributes"].get("amount", -1)))
        out[key] = out.get(key, 0) + 1
    return out


def expected_events(lines: list[str]) -> dict[tuple[str, float], int]:
    out: dict[tuple[str, float], int] = {}
    for line in lines:
        ext_id, _event, amount = line.split(",")
        out[(ext_id, float(amount))] = out.get((ext_id, float(amount)), 0) + 1
    return out


@pytest.mark.parametrize("change", ["one-event-added", "rows-reordered-and-one-removed"])
def test_a_resume_after_the_export_changed_never_resends_a_confirmed_event(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess, change: str
) -> None:
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(events_job(sandbox.url), encoding="utf-8")
    lines = event_lines()
    write_events(tmp_path, lines)
    proc = pushsync(tmp_path, sandbox, "run", "job.yaml", "--progress", "none")
    deadline = time.monotonic() + 60
    while proc.poll() is None and ok_batches(tmp_path) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # drain: every batch sent has a known outcome
    code, out, err = finish(proc)
    assert code == 4, (code, out, err)
    (run_id,) = [r[0] for r in ledger_rows(tmp_path, "SELECT run_id FROM runs")]
    confirmed = sum(n for (n,) in ledger_rows(tmp_path, "SELECT ok_ids FROM batches WHERE status = 'ok'"))
    applied_before = int(inspect(sandbox, "stats")["applied"]["fireEvents"])
    assert 0 < applied_before == sum(events_held(sandbox).values()) < EVENTS

    if change == "one-event-added":
        # A user whose rows sort first in the canonical order: every batch after it shifts by one row.
        lines = ["a0,purchase,9", *lines]
    else:
        # Reordered, and one confirmed row removed: it stays sent, once (nothing is "unsent").
        (ids,) = ledger_rows(tmp_path, "SELECT ext_ids FROM batches WHERE status = 'ok' LIMIT 1")[0]
        removed = next(line for line in lines if line.startswith(unpack_ids(ids)[0] + ","))
        lines = [line for line in lines[::-1] if line != removed]
    write_events(tmp_path, lines)
    code, out, err = run(tmp_path, sandbox, "resume", run_id, "--job", "job.yaml", "--output", "json")
    assert code == 0, (out, err)
    held = events_held(sandbox)
    wanted = expected_events(lines)
    if change != "one-event-added":
        ext_id, _event, amount = removed.split(",")
        wanted[(ext_id, float(amount))] = wanted.get((ext_id, float(amount)), 0) + 1
    assert held == wanted  # every event exactly once: none lost, none sent twice
    replay = json.loads(out)["replay"]
    assert replay["rows_confirmed"] >= confirmed > 0, replay


def test_a_ledger_emptied_after_a_kill_is_refused_rather_than_started_afresh(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess
) -> None:
    """A ledger truncated to 0 bytes (``: > ledger.sqlite``, a restore that failed) after a run was killed: SQLite
    would open it as a new ledger, and the next run — knowing of no died run — sent every event again."""
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(events_job(sandbox.url), encoding="utf-8")
    write_events(tmp_path, event_lines(2000))
    run_killed_once_confirmed(tmp_path, sandbox, 3)
    ledger = tmp_path / "work" / "ledger.sqlite"
    ledger.write_bytes(b"")
    for log in (ledger.with_name("ledger.sqlite-wal"), ledger.with_name("ledger.sqlite-shm")):
        log.unlink(missing_ok=True)
    sent = requests_total(sandbox)
    assert sent > 0

    commands = (
        ["run", "job.yaml", "--progress", "none"],
        ["resume", "latest", "--job", "job.yaml", "--progress", "none"],
        ["runs", "job.yaml"],
    )
    for command in commands:
        code, out, err = finish(pushsync(tmp_path, sandbox, *command))
        assert code == 2, (command, code, out, err)
        assert err.count("\n") == 1 and "ledger file is empty (0 bytes)" in err and str(ledger) in err, err
    assert requests_total(sandbox) == sent  # nothing sent again
    assert ledger.stat().st_size == 0  # not turned into a new ledger either


def test_a_ledger_kept_without_its_write_ahead_log_after_a_kill_is_refused(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess
) -> None:
    """A run killed with its records still in ``ledger.sqlite-wal``, and only ``ledger.sqlite`` kept (a copy or
    restore of the one file, a clean-up of "temporary" files): the killed run vanished, and the next run sent
    every event again. The ``ledger.sqlite.running`` marker, written beside the ledger when a run is recorded and
    removed when its end is, names the run the ledger lost: the run is refused, nothing is sent; deleting the
    marker is the way on, on purpose."""
    sandbox = netmera_sandbox_process
    (tmp_path / "job.yaml").write_text(events_job(sandbox.url), encoding="utf-8")
    write_events(tmp_path, event_lines(2000))
    run_killed_once_confirmed(tmp_path, sandbox, 3)
    ledger = tmp_path / "work" / "ledger.sqlite"
    marker = ledger.with_name("ledger.sqlite.running")
    killed = marker.read_text(encoding="utf-8").strip()
    for log in (ledger.with_name("ledger.sqlite-wal"), ledger.with_name("ledger.sqlite-shm")):
        log.unlink(missing_ok=True)
    sent = requests_total(sandbox)
    assert sent > 0 and killed

    code, out, err = finish(pushsync(tmp_path, sandbox, "run", "job.yaml", "--progress", "none"))
    assert code == 2 and err.count("\n") == 1, (code, out, err)
    assert f"run {killed} was recorded in this ledger" in err and str(marker) in err and "-wal" in err, err
    assert requests_total(sandbox) == sent  # nothing sent again
    # Deleting the marker is going on without the lost run, on purpose: the run goes ahead (and ends, marker gone).
    marker.unlink()
    code, out, err = finish(pushsync(tmp_path, sandbox, "run", "job.yaml", "--progress", "none"))
    assert code == 0, err
    assert not marker.exists()


def test_a_snapshot_diff_left_by_a_killed_run_whose_ledger_was_lost_sends_its_users_again(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess
) -> None:
    """A snapshot run killed mid-send, then its ledger deleted: the recovery of its pending diff found no run in
    the ledger and took every batch as never sent. What the platform applied (score 2) was not in the state, so an
    export back at the state's values (score 1) sent nothing and those users kept score 2 — lost updates."""
    sandbox = netmera_sandbox_process
    job = snapshot_job(sandbox.url).replace(
        "  concurrency: 2\n",
        "  concurrency: 2\n  batch_size: 20\n  budgets: {'*': {requests: 10, per: 1s}}\n",
    )
    (tmp_path / "job.yaml").write_text(job, encoding="utf-8")
    first = [f"user{i:03d},Name{i},1,gold" for i in range(600)]
    write_users(tmp_path, first)
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml")
    assert code == 0, (out, err)

    write_users(tmp_path, [line.replace(",1,", ",2,") for line in first])
    confirmed = ok_batches(tmp_path)
    run_killed_once_confirmed(tmp_path, sandbox, confirmed + 3)
    scores = {ext_id: u["profile"]["score"] for ext_id, u in sandbox_users(sandbox).items()}
    assert 0 < sum(score == 2 for score in scores.values()) < 600  # part of the run landed
    # Deleted on purpose, the run marker with it (alone, the marker makes the next run refuse to go on without
    # the killed run's records: test_a_ledger_kept_without_its_write_ahead_log_after_a_kill_is_refused).
    for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm", "ledger.sqlite.running"):
        (tmp_path / "work" / name).unlink(missing_ok=True)

    write_users(tmp_path, first)
    code, out, err = run(tmp_path, sandbox, "run", "job.yaml")
    assert code == 0, (out, err)
    scores = {ext_id: u["profile"]["score"] for ext_id, u in sandbox_users(sandbox).items()}
    assert scores == {f"user{i:03d}": 1 for i in range(600)}


def test_a_run_of_some_sources_or_a_sample_does_not_end_the_resume_of_a_killed_run(
    tmp_path: Path, netmera_sandbox_process: NetmeraProcess
) -> None:
    """After a killed run, ``pushsync run --select users`` (or ``--limit``) resumed only its part and finished:
    the next full run found no unfinished run, planned afresh and sent every event the killed run had confirmed
    a second time. Such a run is now refused (exit 2, nothing sent) while a run waits to be resumed."""
    sandbox = netmera_sandbox_process
    job = events_job(sandbox.url).replace(
        "dispatch:\n",
        "  - name: users\n    path: users.csv\n    ext_id: id\n    attributes:\n      name: string\ndispatch:\n",
    )
    (tmp_path / "job.yaml").write_text(job, encoding="utf-8")
    lines = event_lines(2000)
    write_events(tmp_path, lines)
    (tmp_path / "users.csv").write_text("id,name\n" + "".join(f"c{i:05d},N{i}\n" for i in range(50)), "utf-8")
    run_killed_once_confirmed(tmp_path, sandbox, 3)
    (run_id,) = [r[0] for r in ledger_rows(tmp_path, "SELECT run_id FROM runs")]
    sent = requests_total(sandbox)
    assert 0 < sum(events_held(sandbox).values()) < len(lines)

    for cut in (["--select", "users"], ["--exclude", "events"], ["--limit", "5"]):
        code, out, err = run(tmp_path, sandbox, "run", "job.yaml", *cut)
        assert code == 2, (cut, out, err)
        assert err.count("\n") == 1 and f"run {run_id} of job adversarial-events did not finish" in err, err
        assert f"pushsync resume {run_id}" in err and " ".join(cut) in err, err
    assert requests_total(sandbox) == sent

    code, out, err = run(tmp_path, sandbox, "run", "job.yaml")
    assert code == 0, (out, err)
    assert events_held(sandbox) == expected_events(lines)  # every event exactly once
