"""Adversarial input files (issue #11, part C): nothing read twice, nothing sent wrong, no traceback, no abort.

* typed Parquet columns that do not fit their mapping (struct IDs and attributes, dates mapped as numbers,
  timestamps, lists, maps, durations) are refused before anything is read or sent — or accepted where the
  mapping fits, with the value the platform should get (the table in docs/jobs.md, "Column types");
* a symbolic link looping back under ``**`` reads each real file once; pushsync's own workdir files are never
  input; a glob matching only directories fails like a glob matching nothing;
* ``pushsync validate`` exits 0 every time, however the threads are scheduled at exit;
* a read-only workdir, a full disk while planning, a damaged snapshot state file and a non-text encoding each give
  one line on stderr with exit code 2 — never a traceback — and nothing is sent;
* external IDs with invisible characters (zero-width, BOM inside a value, bidirectional controls) are rejected
  rows; a file's own byte-order mark is not part of the first column name.

The read-only workdir and the full disk are real filesystem conditions: a small tmpfs mounted in a private mount
namespace (``unshare``), so nothing is mounted outside the test's own process.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sync.config import load_job
from sync.demo import start_sandbox_process, stop_sandbox_process
from sync.errors import BadInputError
from sync.planning.planning import build_plan
from sync.records import body_json

from .conftest import REPO_ROOT, SandboxHttp
from .corpus import KEY_ENV

SANDBOX_KEY = "adversarial-sandbox-key-8c2e"

_JOB = """\
version: 1
name: adversarial
workdir: {workdir}
{mode}destination: {{platform: netmera, base_url: "{url}", secret: {{env: {key_env}}}}}
sources:
  - name: users
    path: "{path}"
    ext_id: id
{mapping}dispatch:
  concurrency: 2
  request_timeout: 5
  retry: {{max_attempts: 2, base_delay: 0.01, max_delay: 0.05}}
"""


def _job(
    directory: Path,
    path: str,
    mapping: str,
    *,
    url: str = "http://127.0.0.1:9/rest/3.0/",
    workdir: str = "work",
    mode: str = "",
    name: str = "job.yaml",
) -> Path:
    """Write a job reading ``path`` with the source lines ``mapping`` (each indented four spaces)."""
    job = directory / name
    job.write_text(
        _JOB.format(workdir=workdir, mode=mode, url=url, key_env=KEY_ENV, path=path, mapping=mapping),
        encoding="utf-8",
    )
    return job


def _parquet(path: Path, columns: Mapping[str, pa.Array]) -> None:
    pq.write_table(pa.table(dict(columns)), path)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, SandboxHttp]]:
    """One Netmera sandbox process for the module (reset by each test that uses it)."""
    process, url = start_sandbox_process(SANDBOX_KEY, {}, tmp_path_factory.mktemp("sandbox"))
    try:
        http = SandboxHttp(url.removesuffix("/rest/3.0/"))
        yield url, http
    finally:
        stop_sandbox_process(process)


def _run_cli(job: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``python -m sync ARGS JOB`` in a real process (so exit codes, stderr and aborts are the user's)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "sync", *args, str(job)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, KEY_ENV: SANDBOX_KEY},
    )


def _one_clear_error(done: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pushsync: error: "), done.stderr
    for part in parts:
        assert part in lines[0], lines[0]


# --- 7. typed Parquet columns × mapping types ---------------------------------------------------------------

_TYPED: dict[str, pa.Array] = {
    "text": pa.array(["Ann"]),
    "integer": pa.array([7]),
    "float": pa.array([1.5]),
    "boolean": pa.array([True]),
    "date": pa.array([dt.date(2020, 1, 2)]),
    "timestamp": pa.array([dt.datetime(2020, 1, 2, 3, 4)], pa.timestamp("us")),
    "timestamp_tz": pa.array([dt.datetime(2020, 1, 2, 3, 4)], pa.timestamp("ms", tz="UTC")),
    "time": pa.array([dt.time(3, 4)], pa.time64("us")),
    "duration": pa.array([dt.timedelta(seconds=5)], pa.duration("s")),
    "list": pa.array([["a", "b"]]),
    "list_of_structs": pa.array([[{"x": "a"}]]),
    "struct": pa.array([{"first": "Ann", "last": "Lee"}]),
    "map": pa.array([[("k", "v")]], pa.map_(pa.string(), pa.string())),
    "nulls": pa.nulls(1),
}
_JAN_2 = 1_577_923_200_000  # 2020-01-02T00:00Z in epoch milliseconds
_REFUSED = "refused"
_ROW_REJECTED = "row rejected"

# (column kind, mapping type) → what setProfileAttributes sends for the user (None: nothing), _REFUSED (the file,
# before anything is read) or _ROW_REJECTED (the row). The decision table of docs/jobs.md ("Column types").
ATTRIBUTE_OUTCOMES: dict[tuple[str, str], Any] = {
    ("text", "string"): "Ann",
    ("integer", "string"): "7",
    ("float", "string"): "1.5",
    ("boolean", "string"): "true",
    ("date", "string"): "2020-01-02",
    ("timestamp", "string"): _REFUSED,
    ("time", "string"): _REFUSED,
    ("duration", "string"): _REFUSED,
    ("list", "string"): _REFUSED,
    ("struct", "string"): _REFUSED,
    ("map", "string"): _REFUSED,
    ("nulls", "string"): None,
    ("integer", "number"): 7,
    ("float", "number"): 1.5,
    ("boolean", "number"): _REFUSED,
    ("date", "number"): _REFUSED,
    ("timestamp", "number"): _REFUSED,
    ("duration", "number"): _REFUSED,
    ("struct", "number"): _REFUSED,
    ("boolean", "boolean"): True,
    ("integer", "boolean"): _ROW_REJECTED,  # accepted as 1/0; 7 is neither: that row is rejected
    ("float", "boolean"): _REFUSED,
    ("date", "boolean"): _REFUSED,
    ("timestamp", "boolean"): _REFUSED,
    ("list", "boolean"): _REFUSED,
    ("date", "date"): _JAN_2,
    ("timestamp", "date"): _JAN_2 + (3 * 60 + 4) * 60_000,
    ("timestamp_tz", "date"): _JAN_2 + (3 * 60 + 4) * 60_000,
    ("integer", "date"): _REFUSED,
    ("float", "date"): _REFUSED,
    ("time", "date"): _REFUSED,
    ("duration", "date"): _REFUSED,
    ("struct", "date"): _REFUSED,
    ("list", "list"): ["a", "b"],
    ("text", "list"): ["Ann"],
    ("list_of_structs", "list"): _REFUSED,
    ("date", "list"): _REFUSED,
    ("struct", "list"): _REFUSED,
    ("map", "list"): _REFUSED,
}


@pytest.mark.parametrize(
    ("kind", "mapping"), list(ATTRIBUTE_OUTCOMES), ids=[f"{k}-as-{m}" for k, m in ATTRIBUTE_OUTCOMES]
)
def test_a_typed_parquet_column_is_sent_right_or_refused_with_file_and_column(
    kind: str, mapping: str, tmp_path: Path
) -> None:
    data = tmp_path / "users.parquet"
    _parquet(data, {"id": pa.array(["u1"]), "value": _TYPED[kind]})
    job = load_job(_job(tmp_path, "users.parquet", f"    attributes: {{value: {mapping}}}\n"))
    expected = ATTRIBUTE_OUTCOMES[(kind, mapping)]
    if expected == _REFUSED:
        with pytest.raises(BadInputError) as info:
            build_plan(job)
        assert (info.value.path, info.value.column) == (str(data), "value")
        assert f"cannot be sent as a {mapping} attribute" in info.value.reason
        article = "an" if info.value.reason.split(" ")[1][0] in "aeiou" else "a"  # "an integer column"
        assert info.value.reason.startswith(f"{article} "), info.value.reason
        return
    with build_plan(job) as plan:
        rejects = list(plan.rejected_rows())
        sent = {
            item["extId"]: item["profile"]
            for batch in plan.batches()
            if batch.endpoint == "setProfileAttributes"
            for item in body_json(batch)
        }
    if expected == _ROW_REJECTED:
        assert [(r.row, r.column) for r in rejects] == [(1, "value")] and sent == {}
    elif expected is None:
        assert rejects == [] and sent == {}
    else:
        assert rejects == [] and sent == {"u1": {"value": expected}}


@pytest.mark.parametrize(
    "kind", ["struct", "float", "boolean", "date", "timestamp", "list", "map", "duration"]
)
def test_an_id_column_of_the_wrong_type_is_refused(kind: str, tmp_path: Path) -> None:
    data = tmp_path / "users.parquet"
    _parquet(data, {"id": _TYPED[kind], "value": pa.array(["Ann"])})
    job = load_job(_job(tmp_path, "users.parquet", "    attributes: {value: string}\n"))
    with pytest.raises(BadInputError) as info:
        build_plan(job)
    assert (info.value.path, info.value.column) == (str(data), "id")


def test_lists_feed_tags_and_list_attributes_and_other_roles_refuse_what_does_not_fit(tmp_path: Path) -> None:
    data = tmp_path / "users.parquet"
    _parquet(
        data,
        {
            "id": pa.array(["u1", "u2"]),
            "segments": pa.array([["gold", "eu"], None]),
            "push": pa.array([True, False]),
            "phone": pa.array([905551234567, None]),
        },
    )
    mapping = "    tags: [{column: segments}]\n    opt_ins: {push: push}\n    msisdn: phone\n"
    with build_plan(load_job(_job(tmp_path, "users.parquet", mapping))) as plan:
        sent = sorted(
            (batch.endpoint, json.dumps(body_json(batch), sort_keys=True)) for batch in plan.batches()
        )
    assert sent == [
        ("disablePush", json.dumps({"extId": "u2"}, sort_keys=True)),
        ("enablePush", json.dumps({"extId": "u1"}, sort_keys=True)),
        ("tagUsers", json.dumps({"tag": "eu", "extIds": ["u1"]}, sort_keys=True)),
        ("tagUsers", json.dumps({"tag": "gold", "extIds": ["u1"]}, sort_keys=True)),
        ("updateMsisdn", json.dumps({"extId": "u1", "msisdn": "905551234567"}, sort_keys=True)),
    ]
    # A date column as an opt-in, a struct as tags: refused, naming the column.
    for column, values, mapping in (
        ("push", pa.array([dt.date(2020, 1, 2)] * 2), "    opt_ins: {push: push}\n"),
        ("segments", pa.array([{"a": "x"}] * 2), "    tags: [{column: segments}]\n"),
    ):
        _parquet(data, {"id": pa.array(["u1", "u2"]), column: values})
        with pytest.raises(BadInputError) as info:
            build_plan(load_job(_job(tmp_path, "users.parquet", mapping)))
        assert info.value.column == column


def test_a_struct_id_stops_the_run_with_exit_2_and_nothing_is_sent(
    tmp_path: Path, sandbox: tuple[str, SandboxHttp]
) -> None:
    url, http = sandbox
    http.reset()
    data = tmp_path / "users.parquet"
    _parquet(data, {"id": pa.array([{"sid": "sid-1"}]), "value": pa.array(["Ann"])})
    job = _job(tmp_path, "users.parquet", "    attributes: {value: string}\n", url=url)
    for command in (["validate"], ["plan"], ["run", "--progress", "none"]):
        done = _run_cli(job, *command)
        if command == ["validate"]:
            assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
            assert "column 'id'" in done.stdout and str(data) in done.stdout
            continue
        _one_clear_error(done, str(data), "column 'id'", "struct")
    assert http.stats()["requests_total"] == 0


# --- 8. symbolic links, pushsync's own files, directories ----------------------------------------------------


def _events_job(
    directory: Path, path: str, *, url: str = "http://127.0.0.1:9/rest/3.0/", name: str = "job.yaml"
) -> Path:
    return _job(directory, path, "    kind: events\n    event: event\n", url=url, name=name)


def _sent_events(job: Path) -> list[tuple[str, str]]:
    with build_plan(load_job(job)) as plan:
        return sorted(
            (item["extId"], item["name"])
            for batch in plan.batches()
            if batch.endpoint == "fireEvents"
            for item in body_json(batch)
        )


def test_a_symlink_loop_under_double_star_reads_each_file_once(
    tmp_path: Path, sandbox: tuple[str, SandboxHttp]
) -> None:
    sub = tmp_path / "data" / "sub"
    sub.mkdir(parents=True)
    (sub / "events.csv").write_text("id,event\nu1,buy\nu2,buy\n", encoding="utf-8")
    (sub / "loop").symlink_to("..")  # data/sub/loop -> data: a cycle
    (sub / "again").symlink_to(".")  # a second cycle: Python's ** alone would walk 2^40 paths
    (tmp_path / "data" / "same.csv").symlink_to(sub / "events.csv")  # another name for the same file
    os.link(sub / "events.csv", tmp_path / "data" / "hard.csv")  # and a hard link
    job = _events_job(tmp_path, "data/**/*.csv")
    assert _sent_events(job) == [("u1", "buy"), ("u2", "buy")]

    url, http = sandbox
    http.reset()
    done = _run_cli(_events_job(tmp_path, "data/**/*.csv", url=url), "run", "--progress", "none")
    assert done.returncode == 0, done.stderr
    assert http.stats()["applied"] == {"fireEvents": 2}


def test_pushsync_own_workdir_files_are_never_input(tmp_path: Path) -> None:
    (tmp_path / "users.csv").write_text("id,event\nu1,buy\n", encoding="utf-8")
    job = _events_job(tmp_path, "**/*.csv")  # matches work/rejects.csv after the first plan
    first = _sent_events(job)
    work = tmp_path / "work"
    assert (work / "rejects.csv").is_file()
    (work / "stale").mkdir()
    (work / "stale" / "leftover.csv").write_text("id,event\nghost,buy\n", encoding="utf-8")
    (tmp_path / "link.csv").symlink_to(work / "stale" / "leftover.csv")  # a link into the workdir counts too
    assert _sent_events(job) == first == [("u1", "buy")]
    # Named without a glob, a working file is refused rather than read.
    with pytest.raises(BadInputError, match="pushsync's own working files"):
        build_plan(load_job(_events_job(tmp_path, "work/rejects.csv", name="explicit.yaml")))
    # And the rejects file a plan writes elsewhere (plan --rejects) is not read as its input.
    with build_plan(load_job(job), rejects_path=tmp_path / "rejects-elsewhere.csv") as plan:
        assert plan.summary().rows_read == 1


def test_a_glob_matching_only_directories_fails_like_a_glob_matching_nothing(
    tmp_path: Path, sandbox: tuple[str, SandboxHttp]
) -> None:
    (tmp_path / "exports" / "2024.csv").mkdir(parents=True)  # a directory named like a file
    url, http = sandbox
    http.reset()
    job = _events_job(tmp_path, "exports/*.csv", url=url)
    with pytest.raises(BadInputError, match="no file matches this pattern") as info:
        build_plan(load_job(job))
    assert "only directories" in info.value.reason
    done = _run_cli(job, "run", "--progress", "none")
    _one_clear_error(done, "exports/*.csv", "no file matches this pattern")
    assert http.stats()["requests_total"] == 0
    done = _run_cli(job, "validate")
    assert done.returncode == 2 and "no file matches this pattern" in done.stdout


# --- validate never aborts at exit ---------------------------------------------------------------------------------


def test_validate_exits_0_every_time_whatever_the_threads_do_at_exit() -> None:
    # pyarrow's CSV reader read ahead on its own threads after the header was read; when a read-ahead ended during
    # interpreter shutdown the process aborted (exit 134, "terminate called without an active exception") in
    # 5-50 % of runs under load. Several processes at once make that load.
    job = REPO_ROOT / "jobs" / "example.yaml"

    def once(_: int) -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-m", "sync", "validate", str(job)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return done.returncode, done.stderr

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(once, range(24)))
    assert [code for code, _ in results] == [0] * len(results), [err for code, err in results if code]


# --- tracebacks before anything is sent ----------------------------------------------------------------------


def _in_private_tmpfs(mountpoint: Path, options: str) -> tuple[str, ...]:
    """A command prefix running the rest in a private mount namespace with a tmpfs at ``mountpoint``."""
    if shutil.which("unshare") is None:
        pytest.fail("the unshare command (util-linux) is needed to make a read-only or full filesystem")
    user = () if os.geteuid() == 0 else ("--map-root-user",)
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" && shift 2 && exec "$@"'
    return ("unshare", "--mount", *user, "sh", "-c", script, "sh", options, str(mountpoint))


def _users_csv(directory: Path, rows: int) -> None:
    with (directory / "users.csv").open("w", encoding="utf-8") as fh:
        fh.write("id,name\n")
        fh.writelines(f"user-{i:07d},name number {i} with some padding to fill pages\n" for i in range(rows))


def test_a_read_only_workdir_stops_with_one_clear_error(
    tmp_path: Path, sandbox: tuple[str, SandboxHttp]
) -> None:
    url, http = sandbox
    http.reset()
    _users_csv(tmp_path, 10)
    (tmp_path / "work").mkdir()
    job = _job(tmp_path, "users.csv", "    attributes: {name: string}\n", url=url)
    prefix = _in_private_tmpfs(tmp_path / "work", "ro,size=1m")
    for command in (["plan"], ["run", "--progress", "none"]):
        _one_clear_error(
            _run_cli(job, *command, prefix=prefix), "Read-only file system", str(tmp_path / "work")
        )
    assert http.stats()["requests_total"] == 0


def test_a_disk_filling_up_while_planning_stops_with_one_clear_error(
    tmp_path: Path, sandbox: tuple[str, SandboxHttp]
) -> None:
    url, http = sandbox
    http.reset()
    _users_csv(tmp_path, 60_000)  # ≈ 4 MB of input: staging outgrows a 512 KiB workdir mid-way
    (tmp_path / "work").mkdir()
    job = _job(tmp_path, "users.csv", "    attributes: {name: string}\n", url=url)
    prefix = _in_private_tmpfs(tmp_path / "work", "size=512k")
    for command in (["plan"], ["run", "--progress", "none"]):
        _one_clear_error(_run_cli(job, *command, prefix=prefix), "No space left on device")
    assert http.stats()["requests_total"] == 0
    # The rejects file on a full device (/dev/full answers every write with ENOSPC).
    _one_clear_error(_run_cli(job, "plan", "--rejects", "/dev/full"), "No space left on device")


def test_a_damaged_snapshot_state_file_stops_with_one_clear_error(
    tmp_path: Path, sandbox: tuple[str, SandboxHttp]
) -> None:
    url, http = sandbox
    http.reset()
    _users_csv(tmp_path, 10)
    job = _job(tmp_path, "users.csv", "    attributes: {name: string}\n", url=url, mode="mode: snapshot\n")
    assert _run_cli(job, "run", "--progress", "none").returncode == 0  # a first run writes the state
    states = list((tmp_path / "work" / "state").glob("*/users.parquet"))
    assert len(states) == 1
    whole = states[0].read_bytes()
    http.reset()
    for damaged in (whole[: len(whole) // 2], b"PAR1" + b"\x00" * 64 + b"PAR1", b""):
        states[0].write_bytes(damaged)
        for command in (["plan"], ["run", "--progress", "none"]):
            _one_clear_error(_run_cli(job, *command), "snapshot state file", str(states[0]), "cannot be read")
    assert http.stats()["requests_total"] == 0


@pytest.mark.parametrize("encoding", ["hex", "rot13", "base64", "zlib"])
def test_an_encoding_that_is_not_a_text_encoding_is_a_job_problem(encoding: str, tmp_path: Path) -> None:
    _users_csv(tmp_path, 3)
    job = _job(tmp_path, "users.csv", f"    encoding: {encoding}\n    attributes: {{name: string}}\n")
    for command in ("validate", "plan", "run"):
        done = _run_cli(job, command)
        assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout, done.stderr
        assert f"sources[0].encoding: {encoding!r} is not a text encoding" in done.stdout + done.stderr


# --- invisible characters in IDs -------------------------------------------------------------------------------


def test_ids_with_invisible_characters_are_rejected_and_a_file_bom_is_not_part_of_the_header(
    tmp_path: Path,
) -> None:
    rows = (
        "u1,A\n"
        "\ufeffu2,B\n"  # a byte-order mark inside the file: from concatenated exports
        "u\u200b3,C\n"  # zero-width space
        "u\u200d4,D\n"  # zero-width joiner
        "u\u202e5,E\n"  # right-to-left override: "u5" shown as something else
        "u\u20666,F\n"  # left-to-right isolate
        "u\u00ad7,G\n"  # soft hyphen
        "u 8,H\n"  # an inner space is a legitimate ID
    )
    (tmp_path / "users.csv").write_bytes(b"\xef\xbb\xbf" + ("id,name\n" + rows).encode("utf-8"))
    job = load_job(_job(tmp_path, "users.csv", "    attributes: {name: string}\n"))
    with build_plan(job) as plan:
        rejects = {r.row: r for r in plan.rejected_rows()}
        sent = {item["extId"] for b in plan.batches() for item in body_json(b)}
    assert sent == {"u1", "u 8"}
    assert sorted(rejects) == [2, 3, 4, 5, 6, 7]
    for r in rejects.values():
        assert r.column == "id" and "external ID contains an invisible character" in r.reason
    # The same in a Parquet file, and in a UTF-16 file (whose BOM the codec removes).
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ["p1", "p\u200b1"], "name": ["A", "B"]}), buffer)
    (tmp_path / "users.parquet").write_bytes(buffer.getvalue())
    with build_plan(load_job(_job(tmp_path, "users.parquet", "    attributes: {name: string}\n"))) as plan:
        assert [(r.row, r.column) for r in plan.rejected_rows()] == [(2, "id")]
    (tmp_path / "users16.csv").write_bytes(("id,name\nw1,A\n").encode("utf-16"))
    job16 = _job(tmp_path, "users16.csv", "    encoding: utf-16\n    attributes: {name: string}\n")
    with build_plan(load_job(job16)) as plan:
        assert [item["extId"] for b in plan.batches() for item in body_json(b)] == ["w1"]
