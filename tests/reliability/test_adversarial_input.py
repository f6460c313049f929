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

from sync.cli import main
from sync.config import load_job
from sync.demo import start_sandbox_process, stop_sandbox_process
from sync.errors import BadInputError
from sync.planning import build_plan

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
) -> Path:
    """Write a job reading ``path`` with the source lines ``mapping`` (each indented four spaces)."""
    job = directory / "job.yaml"
    job.write_text(
        _JOB.format(
            workdir=workdir, mode=mode, url=url, key_env=KEY_ENV, path=path, mapping=mapping
        ),
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
        return
    with build_plan(job) as plan:
        rejects = list(plan.rejected_rows())
        sent = {
            item["extId"]: item["profile"]
            for batch in plan.batches()
            if batch.endpoint == "setProfileAttributes"
            for item in batch.body
        }
    if expected == _ROW_REJECTED:
        assert [(r.row, r.column) for r in rejects] == [(1, "value")] and sent == {}
    elif expected is None:
        assert rejects == [] and sent == {}
    else:
        assert rejects == [] and sent == {"u1": {"value": expected}}


@pytest.mark.parametrize("kind", ["struct", "float", "boolean", "date", "timestamp", "list", "map", "duration"])
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
        sent = sorted((batch.endpoint, str(batch.body)) for batch in plan.batches())
    assert sent == [
        ("disablePush", str({"extId": "u2"})),
        ("enablePush", str({"extId": "u1"})),
        ("tagUsers", str({"tag": "eu", "extIds": ["u1"]})),
        ("tagUsers", str({"tag": "gold", "extIds": ["u1"]})),
        ("updateMsisdn", str({"extId": "u1", "msisdn": "905551234567"})),
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
