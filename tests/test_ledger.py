"""The ledger: state machine, refused IDs, queries, exports, schema version, and write throughput."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from unittest import mock

import polars as pl
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sync.errors import StateError
from sync.ledger import ledger as ledger_module
from sync.ledger.ledger import SCHEMA_VERSION, Ledger, new_run_id, pack_ids, unpack_ids
from sync.ledger.trace import trace_id
from sync.records import (
    Attempt,
    AttemptOutcome,
    Batch,
    BatchResult,
    BatchStatus,
    Operation,
    Phase,
    RejectedId,
    RejectedRow,
    RowRef,
)


def _batch(i: int, n_ids: int = 3) -> Batch:
    ids = tuple(f"u{i}-{k}" for k in range(n_ids))
    return Batch(
        f"b{i:06d}", "tagUsers", Operation.TAG, {"tag": "t", "extIds": list(ids)}, ids, Phase.CHANGES
    )


def test_batches_move_through_the_state_machine_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "job" / "ledger.sqlite"
    run_id = new_run_id()
    with Ledger.open(path) as ledger:
        ledger.start_run(run_id, job="demo", platform="netmera")
        for i in range(3):
            ledger.record_planned(run_id, _batch(i))
        ledger.record_sent(run_id, "b000000")
        ledger.record_sent(run_id, "b000001")
        ledger.record_result(
            run_id, BatchResult("b000000", "tagUsers", Operation.TAG, BatchStatus.OK, 1, 200, ok_ids=3)
        )
        refused = RejectedId("u1-2", 5016, "external id not found", RowRef("users.csv", 7))
        ledger.record_result(
            run_id,
            BatchResult(
                "b000001",
                "tagUsers",
                Operation.TAG,
                BatchStatus.REJECTED,
                3,
                400,
                5016,
                "refused",
                2,
                (refused,),
            ),
        )
        ledger.record_rejected_rows(run_id, [RejectedRow("users.csv", 9, "email", "not an e-mail", "u9")])
        ledger.finish_run(run_id, status="partial", exit_code=1, summary={"requests": 2})

    with Ledger.open(path) as ledger:
        info = ledger.run(run_id)
        assert info is not None
        assert info.batches_by_status == {"ok": 1, "rejected": 1, "planned": 1}
        assert (info.status, info.exit_code, info.summary) == ("partial", 1, {"requests": 2})
        assert ledger.confirmed_ok(run_id) == {"b000000"}
        assert ledger.refused_ids(run_id) == [("b000001", "u1-2", "5016", "external id not found")]
        assert ledger.rejected_rows(run_id) == [RejectedRow("users.csv", 9, "email", "not an e-mail", "u9")]
        rows = {b.batch_id: b for b in ledger.batches(run_id)}
        assert rows["b000001"].status is BatchStatus.REJECTED
        assert (rows["b000001"].ok_ids, rows["b000001"].rejected_ids, rows["b000001"].attempts) == (2, 1, 3)
        assert [r.run_id for r in ledger.runs("demo")] == [run_id]
        assert ledger.runs("other") == []
        mode = ledger._conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


def test_writes_are_visible_to_another_reader_while_the_run_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger.open(path, flush_every=4)
    ledger.start_run("r1", job="j")
    for i in range(8):
        ledger.record_planned("r1", _batch(i))
    reader = sqlite3.connect(path)
    try:
        assert reader.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 8
        assert reader.execute("SELECT status FROM runs").fetchone()[0] == "running"
    finally:
        reader.close()
        ledger.close()


def test_export_batches_and_refused_ids_to_parquet_and_csv(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        ledger.start_run("r1", job="j")
        for i in range(5):
            ledger.record_planned("r1", _batch(i))
            ledger.record_result(
                "r1", BatchResult(f"b{i:06d}", "tagUsers", Operation.TAG, BatchStatus.OK, 1, 200)
            )
        ledger.flush()
        assert ledger.export("r1", tmp_path / "b.parquet") == 5
        assert ledger.export("r1", tmp_path / "b.csv", fmt="csv") == 5
        assert ledger.export("r1", tmp_path / "ids.csv", table="refused-ids", fmt="csv") == 0
        with pytest.raises(StateError, match="no run"):
            ledger.export("nope", tmp_path / "x.csv", fmt="csv")
    frame = pl.read_parquet(tmp_path / "b.parquet")
    assert frame["ext_ids"].to_list()[0] == ["u0-0", "u0-1", "u0-2"]
    assert set(frame["status"].to_list()) == {"ok"}
    assert json.loads(pl.read_csv(tmp_path / "b.csv")["ext_ids"][0]) == ["u0-0", "u0-1", "u0-2"]


def test_a_ledger_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    Ledger.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="newer"):
        Ledger.open(path)


def test_not_a_database_is_a_state_error(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="cannot open"):
        Ledger.open(path)


def test_every_write_of_a_long_run_lands_through_periodic_flushes(tmp_path: Path) -> None:
    """The write path a run uses (planned, sent, attempt, result, maybe_flush) loses nothing over thousands of
    batches. Its speed (3,000+ batches/s) is checked by bench/bench_ledger.py, not by a timed test."""
    batches = [_batch(i, n_ids=100) for i in range(6000)]
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        ledger.start_run("r1", job="j")
        for batch in batches:
            ledger.record_planned("r1", batch)
            ledger.record_sent("r1", batch.batch_id)
            ledger.record_attempt(
                "r1",
                Attempt(batch.batch_id, batch.endpoint, 1, 100, 0.01, AttemptOutcome.OK, 200),
                started_at=1.0,
            )
            ledger.record_result(
                "r1",
                BatchResult(
                    batch.batch_id, batch.endpoint, batch.operation, BatchStatus.OK, 1, 200, ok_ids=100
                ),
            )
            ledger.maybe_flush()
        ledger.flush()
        assert len(ledger.confirmed_ok("r1")) == 6000


def test_attempts_are_stored_and_exported_and_a_version_1_ledger_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    Ledger.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE attempts")
    conn.execute("UPDATE schema_version SET version = 1")
    conn.commit()
    conn.close()
    with Ledger.open(path) as ledger:
        ledger.start_run("r1", job="j")
        ledger.record_attempt(
            "r1",
            Attempt("b1", "tagUsers", 1, 5, 0.3, AttemptOutcome.RATE_LIMITED, 429, "slow down"),
            started_at=10.0,
        )
        ledger.record_attempt(
            "r1", Attempt("b1", "tagUsers", 2, 5, 0.1, AttemptOutcome.OK, 200), started_at=11.0
        )
        ledger.flush()
        rows = ledger.attempts("r1")
        assert [(a.attempt, a.outcome, a.http_status, a.message, a.started_at) for a in rows] == [
            (1, AttemptOutcome.RATE_LIMITED, 429, "slow down", 10.0),
            (2, AttemptOutcome.OK, 200, None, 11.0),
        ]
        assert ledger.export("r1", tmp_path / "a.csv", table="attempts", fmt="csv") == 2
        version = ledger._conn.execute("SELECT version FROM schema_version").fetchone()[0]
    assert version == SCHEMA_VERSION == 6
    assert pl.read_csv(tmp_path / "a.csv")["outcome"].to_list() == ["rate_limited", "ok"]


@pytest.mark.parametrize("keep", ["full_refresh", "batch_rows"])
def test_a_version_3_ledger_is_upgraded_to_hold_row_keys_and_full_refresh(tmp_path: Path, keep: str) -> None:
    # Version 3 had runs.full_refresh but no batch_rows; a development ledger of the row-key branch had the
    # table but not the column. Either is upgraded: a resume reads both.
    path = tmp_path / "l.sqlite"
    Ledger.open(path).close()
    conn = sqlite3.connect(path)
    if keep == "full_refresh":
        conn.execute("DROP TABLE batch_rows")
    else:
        conn.execute("ALTER TABLE runs DROP COLUMN full_refresh")
    conn.execute("UPDATE schema_version SET version = 3")
    conn.commit()
    conn.close()
    with Ledger.open(path) as ledger:
        ledger.start_run("r1", job="j", full_refresh=True)
        ledger.flush()
        info = ledger.run("r1")
        assert info is not None and info.full_refresh
        assert list(ledger.batch_rows(["r1"])) == []
        version = ledger._conn.execute("SELECT version FROM schema_version").fetchone()[0]
    assert version == SCHEMA_VERSION


def test_a_version_5_ledger_is_upgraded_to_record_origins_and_destinations(tmp_path: Path) -> None:
    # Version 6 added runs.origin, origin_mode and destination (in place): the runs of an older ledger read with
    # none of them, and new runs record them.
    path = tmp_path / "l.sqlite"
    Ledger.open(path).close()
    conn = sqlite3.connect(path)
    for column in ("origin", "origin_mode", "destination"):
        conn.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    conn.execute(
        "INSERT INTO runs (run_id, job, started_at, status, full_refresh) VALUES ('old', 'j', 1.0, 'partial', 0)"
    )
    conn.execute("UPDATE schema_version SET version = 5")
    conn.commit()
    conn.close()
    with Ledger.open(path) as ledger:
        old = ledger.run("old")
        assert old is not None and (old.origin, old.origin_mode, old.destination) == (None, None, None)
        ledger.start_run("new", job="j", origin="old", origin_mode="retry", destination="netmera-0123456789")
        new = ledger.run("new")
        assert new is not None
        assert (new.origin, new.origin_mode, new.destination) == ("old", "retry", "netmera-0123456789")
        version = ledger._conn.execute("SELECT version FROM schema_version").fetchone()[0]
    assert version == SCHEMA_VERSION


def _v4_ledger(path: Path, batches: list[Batch]) -> None:
    """A ledger as pushsync wrote it before schema 5: each batch's IDs a JSON array in ``batches.ext_ids``."""
    with Ledger.open(path) as ledger:
        ledger.start_run("r1", job="j")
        for batch in batches:
            ledger.record_planned("r1", batch)
            ledger.record_result(
                "r1", BatchResult(batch.batch_id, "tagUsers", Operation.TAG, BatchStatus.OK, 1, 200)
            )
    conn = sqlite3.connect(path)
    for batch in batches:
        conn.execute(
            "UPDATE batches SET ext_ids = ? WHERE batch_id = ?", (json.dumps(batch.ext_ids), batch.batch_id)
        )
    conn.execute("UPDATE schema_version SET version = 4")
    conn.commit()
    conn.close()


def test_a_version_4_ledger_has_its_id_lists_packed_and_still_traces_and_exports(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    batches = [_batch(i) for i in range(3)]
    _v4_ledger(path, batches)
    # Read-only readers (trace, the report) meet the JSON form before any upgrade.
    assert [e.kind for e in trace_id(path, "u1-2")] == ["batch"]
    with Ledger.open(path) as ledger:
        kinds = ledger._conn.execute("SELECT DISTINCT typeof(ext_ids) FROM batches").fetchall()
        version = ledger._conn.execute("SELECT version FROM schema_version").fetchone()[0]
        assert ledger.export("r1", tmp_path / "b.parquet") == 3
    assert (kinds, version) == ([("blob",)], SCHEMA_VERSION)
    assert pl.read_parquet(tmp_path / "b.parquet")["ext_ids"].to_list() == [list(b.ext_ids) for b in batches]
    assert [(e.kind, e.status) for e in trace_id(path, "u1-2")] == [("batch", "ok")]
    assert trace_id(path, "u1-") == []  # a whole ID, not a piece of one


def test_a_batch_of_1000_ids_is_kept_in_a_fraction_of_its_json(tmp_path: Path) -> None:
    ids = tuple(f"customer-{i:07d}" for i in range(1000))
    batch = Batch("b1", "tagUsers", Operation.TAG, b"{}", ids, Phase.CHANGES)
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        ledger.start_run("r1", job="j")
        ledger.record_planned("r1", batch)
        ledger.flush()
        (stored,) = ledger._conn.execute("SELECT ext_ids FROM batches").fetchone()
    assert isinstance(stored, bytes)
    assert len(stored) * 3 < len(json.dumps(ids))
    assert unpack_ids(stored) == list(ids)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(max_size=12), max_size=40) | st.lists(st.text(max_size=3), min_size=200, max_size=400)
)
def test_packed_ids_read_back_exactly(ids: list[str]) -> None:
    # Line breaks, empty IDs, no IDs, long lists (compressed) and any Unicode: the IDs come back as they went in.
    assert unpack_ids(pack_ids(tuple(ids))) == ids


def test_an_unknown_packed_form_is_a_state_error() -> None:
    with pytest.raises(StateError, match="packed-IDs format"):
        unpack_ids(b"\x7fnot ours")


def test_one_flush_of_interleaved_writes_lands_every_batch_in_its_final_state(tmp_path: Path) -> None:
    # A flush groups the queued writes by kind (one executemany each): every batch must still end as its own
    # writes say, the attempts keep the order they ended in, and refused IDs and the run's end land too.
    with Ledger.open(tmp_path / "l.sqlite", flush_every=10_000, flush_interval=3600) as ledger:
        ledger.start_run("r1", job="j")
        for i in range(4):
            ledger.record_planned("r1", _batch(i))
        for i in (2, 0, 3):
            ledger.record_sent("r1", f"b{i:06d}")
            for attempt in (1, 2):
                ledger.record_attempt(
                    "r1",
                    Attempt(f"b{i:06d}", "tagUsers", attempt, 3, 0.1, AttemptOutcome.OK, 200),
                    started_at=float(10 * i + attempt),
                )
        refused = RejectedId("u0-1", 5016, "external id not found", RowRef("users.csv", 2))
        ledger.record_result(
            "r1",
            BatchResult(
                "b000000", "tagUsers", Operation.TAG, BatchStatus.REJECTED, 2, 400, 5016, "x", 2, (refused,)
            ),
        )
        ledger.record_result(
            "r1", BatchResult("b000002", "tagUsers", Operation.TAG, BatchStatus.OK, 2, 200, ok_ids=3)
        )
        ledger.finish_run("r1", status="interrupted", exit_code=4)
        statuses = {b.batch_id: b.status for b in ledger.batches("r1")}
        order = [(a.batch_id, a.attempt) for a in ledger.attempts("r1")]
        refused_ids = ledger.refused_ids("r1")
        info = ledger.run("r1")
    assert statuses == {
        "b000000": BatchStatus.REJECTED,
        "b000001": BatchStatus.PLANNED,
        "b000002": BatchStatus.OK,
        "b000003": BatchStatus.SENT,
    }
    assert order == [
        ("b000002", 1),
        ("b000002", 2),
        ("b000000", 1),
        ("b000000", 2),
        ("b000003", 1),
        ("b000003", 2),
    ]
    assert refused_ids == [("b000000", "u0-1", "5016", "external id not found")]
    assert info is not None and info.status == "interrupted"


def test_leaving_on_an_error_keeps_that_error_when_the_last_write_fails(tmp_path: Path) -> None:
    # A run stopped by a full disk after it began sending raises RunStoppedError (exit 3). The ledger's last
    # flush on the way out fails on the same full disk; its StateError (exit 2, "nothing was sent") must not
    # replace the error that is leaving (seen once in CI: exit 2 after requests went out).
    class Stopped(Exception):
        pass

    with pytest.raises(Stopped), Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        ledger.start_run("r1", job="j")
        ledger.flush()
        ledger.record_sent("r1", "b1")  # queued, written at the next flush
        ledger._conn.execute("PRAGMA query_only=1")  # the disk is full from here: every write fails
        raise Stopped
    # Leaving normally, the failing write is the error.
    ledger = Ledger.open(tmp_path / "other.sqlite")
    ledger.start_run("r1", job="j")
    ledger.flush()
    ledger.record_sent("r1", "b1")
    ledger._conn.execute("PRAGMA query_only=1")
    with pytest.raises(StateError, match="cannot write the ledger"):
        ledger.close()


def _ledger_rows(ledger: Ledger) -> list[tuple[object, ...]]:
    # In rowid order: the order the ledger lists a run's batches in (plan order) is part of what folding keeps.
    return ledger._conn.execute("SELECT * FROM batches ORDER BY rowid").fetchall()


class _Ticks:
    """A stand-in for the ``time`` module the ledger reads: wall time advances one second per reading, so two
    ledgers given the same writes record the same times."""

    def __init__(self) -> None:
        self._now = 1_000.0

    def time(self) -> float:
        self._now += 1.0
        return self._now

    def monotonic(self) -> float:
        return self._now


_WRITES = st.lists(
    st.tuples(
        st.sampled_from(["planned", "sent", "attempt", "result"]), st.integers(0, 2), st.integers(0, 5)
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(writes=_WRITES, flush_at=st.sets(st.integers(0, 40), max_size=4))
@example(writes=[("planned", 0, 0), ("sent", 0, 0), ("attempt", 0, 0), ("result", 0, 1)], flush_at=set())
@example(
    writes=[("planned", 0, 0), ("sent", 0, 0), ("result", 0, 0), ("sent", 0, 0), ("result", 0, 3)],
    flush_at=set(),
)
@example(writes=[("planned", 0, 0), ("sent", 0, 0), ("result", 0, 1), ("result", 0, 2)], flush_at={2})
@example(writes=[("planned", 0, 0), ("planned", 1, 0), ("sent", 1, 0), ("result", 1, 0)], flush_at=set())
def test_a_batch_sent_and_finished_in_one_flush_ends_as_without_folding(
    tmp_path_factory: pytest.TempPathFactory, writes: list[tuple[str, int, int]], flush_at: set[int]
) -> None:
    # A flush folds a batch's sent mark into its result (one row write instead of two). Whatever the writes and
    # wherever the flushes fall — a result with no sent mark, a sent mark with no result, the same batch sent or
    # finished twice, a result before its planned row — every row ends exactly as the flush without folding
    # (each write in turn, in the flush's order) leaves it, to the column.
    tmp = tmp_path_factory.mktemp("fold")
    rows = []
    for fold in (False, True):
        with (
            mock.patch.object(ledger_module, "time", _Ticks()),
            mock.patch.object(ledger_module, "_fold_sent", ledger_module._fold_sent if fold else list),
            Ledger.open(tmp / f"{fold}.sqlite", flush_every=10_000, flush_interval=3600) as ledger,
        ):
            ledger.start_run("r1", job="j")
            for n, (kind, i, v) in enumerate(writes):
                if n in flush_at:
                    ledger.flush()
                batch_id = f"b{i:06d}"
                if kind == "planned":
                    ledger.record_planned("r1", _batch(i))
                elif kind == "sent":
                    ledger.record_sent("r1", batch_id)
                elif kind == "attempt":
                    attempt = Attempt(batch_id, "tagUsers", v + 1, 3, 0.1, AttemptOutcome.OK, 200)
                    ledger.record_attempt("r1", attempt, started_at=float(n))
                else:
                    status = (BatchStatus.OK, BatchStatus.REJECTED, BatchStatus.FAILED)[v % 3]
                    result = BatchResult(
                        batch_id,
                        "tagUsers",
                        Operation.TAG,
                        status,
                        v + 1,
                        200,
                        None if status is BatchStatus.OK else v,
                        "" if status is BatchStatus.OK else f"m{v}",
                        3 - v % 3,
                        started_at=float(v) if v % 2 else 0.0,  # 0.0: unknown (the sent mark's time stays)
                        finished_at=100.0 + n,
                    )
                    ledger.record_result("r1", result)
            ledger.flush()
            rows.append(_ledger_rows(ledger))
    assert rows[1] == rows[0]


def _sent_and_accepted(ledger: Ledger) -> None:
    """Batch ``b000000`` of run ``r1`` sent and accepted whole, in one flush."""
    ledger.record_sent("r1", "b000000")
    ledger.record_result(
        "r1", BatchResult("b000000", "tagUsers", Operation.TAG, BatchStatus.OK, 1, 200, ok_ids=3)
    )
    ledger.flush()


def test_a_batch_sent_and_finished_in_one_flush_is_written_once(tmp_path: Path) -> None:
    # The sent mark and the result of one flush rewrite the batch's row (with its packed IDs) once, not twice.
    with Ledger.open(tmp_path / "l.sqlite", flush_every=10_000, flush_interval=3600) as ledger:
        ledger.start_run("r1", job="j")
        ledger.record_planned("r1", _batch(0))
        ledger.flush()
        before = ledger._conn.total_changes
        _sent_and_accepted(ledger)
        assert ledger._conn.total_changes - before == 1
        row = ledger._conn.execute("SELECT status, started_at FROM batches").fetchone()
    assert row[0] == "ok" and row[1] is not None


def test_a_batch_planned_sent_and_finished_in_one_flush_is_written_once(tmp_path: Path) -> None:
    # SQLite rewrites a whole row — the batch's packed IDs included — on every update: a batch whose planned row,
    # sent mark and result come in one flush (a fast platform's answer) is written once, by one upsert.
    with Ledger.open(tmp_path / "l.sqlite", flush_every=10_000, flush_interval=3600) as ledger:
        ledger.start_run("r1", job="j")
        before = ledger._conn.total_changes
        ledger.record_planned("r1", _batch(0))
        _sent_and_accepted(ledger)
        assert ledger._conn.total_changes - before == 1
        row = ledger._conn.execute("SELECT status, started_at, n_ids, ok_ids FROM batches").fetchone()
        packed = ledger._conn.execute("SELECT ext_ids FROM batches").fetchone()[0]
        assert ledger_module.unpack_ids(packed) == list(_batch(0).ext_ids)
    assert row[0] == "ok" and row[1] is not None and row[2:] == (3, 3)


def _without_write_override(argv: list[str]) -> list[str]:
    """``argv`` run so that folder permissions bind: root ignores them unless its DAC capabilities go."""
    import os
    import shutil

    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to run as root without CAP_DAC_OVERRIDE"
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", *argv]


def test_the_read_commands_read_a_ledger_in_a_folder_they_may_not_write(tmp_path: Path) -> None:
    """A ledger on a read-only mount (or another user's): SQLite's ``mode=ro`` still creates the write-ahead
    log's ``-shm`` file beside it, so ``runs``, ``show``, ``report`` and ``ledger-export`` failed with "attempt to
    write a readonly database". With no log left beside the file it is read as it is; with one (a run may be
    writing, or died with commits only in the log) the message says to copy both files."""
    import subprocess
    import sys

    work = tmp_path / "work"
    work.mkdir()
    with Ledger.open(work / "ledger.sqlite") as ledger:
        ledger.start_run("R1", job="ro-job")
        ledger.finish_run("R1", status="ok", exit_code=0)
    out = tmp_path / "out"
    out.mkdir()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = _without_write_override([sys.executable, "-m", "sync", *args])
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    work.chmod(0o555)
    try:
        runs = cli("runs", "--workdir", str(work), "--output", "json")
        assert runs.returncode == 0, runs.stderr
        assert [r["run_id"] for r in json.loads(runs.stdout)] == ["R1"]
        show = cli("show", "latest", "--workdir", str(work))
        assert show.returncode == 0 and "R1" in show.stdout, show.stderr
        report = cli("report", "R1", "--workdir", str(work), "-o", str(out / "r.html"))
        assert report.returncode == 0 and (out / "r.html").is_file(), report.stderr
        export = cli(
            "ledger-export", "R1", "--workdir", str(work), "-o", str(out / "b.csv"), "--format", "csv"
        )
        assert export.returncode == 0 and (out / "b.csv").is_file(), export.stderr
        assert sorted(p.name for p in work.iterdir()) == ["ledger.sqlite"]  # nothing written beside it

        work.chmod(0o755)
        (work / "ledger.sqlite-wal").write_bytes(b"\0" * 32)  # a log with commits the file may not hold
        work.chmod(0o555)
        held = cli("runs", "--workdir", str(work))
        assert held.returncode == 2, held.stderr
        assert "write-ahead log (ledger.sqlite-wal)" in held.stderr and "copy the ledger" in held.stderr
        assert "Traceback" not in held.stderr
    finally:
        work.chmod(0o755)


def test_exporting_a_run_of_many_batches_holds_a_slice_not_the_run(tmp_path: Path) -> None:
    # 6,000 batches of 1,000 IDs: the export read every row and every unpacked ID into Python lists and one polars
    # frame (measured on 40,000 such batches: 4.8 GB peak, 30 s). It now reads and writes a slice at a time.
    import subprocess
    import sys

    n_batches, per_batch = 6_000, 1_000
    with Ledger.open(tmp_path / "work" / "ledger.sqlite") as ledger:
        ledger.start_run("big", job="j")
        for i in range(n_batches):
            ids = tuple(f"customer-{i * per_batch + k:09d}" for k in range(per_batch))
            ledger.record_planned(
                "big", Batch(f"b{i:06d}", "tagUsers", Operation.TAG, b"{}", ids, Phase.CHANGES)
            )
        ledger.flush()
    out = tmp_path / "batches.parquet"
    command = [
        sys.executable,
        "-m",
        "sync",
        "ledger-export",
        "big",
        "--workdir",
        str(tmp_path / "work"),
        "-o",
        str(out),
    ]
    # A small wrapper runs the export and reports its peak RSS: this process's own children (other tests' sandboxes
    # and runs, under pytest-xdist) do not count.
    wrapper = (
        "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *command],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    peak_mb = int(done.stdout.split()[-1]) / 1024
    assert done.returncode == 0, done.stderr
    assert peak_mb < 450, f"peak RSS {peak_mb:.0f} MB"
    frame = pl.scan_parquet(out).select(pl.col("ext_ids").list.len().sum(), pl.len()).collect()
    assert frame.row(0) == (n_batches * per_batch, n_batches)


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(st.text(min_size=1, max_size=12), min_size=0, max_size=80, unique=True),
    probe=st.text(max_size=12),
)
@example(ids=["ab", "b"], probe="b")
@example(ids=["a", "b"], probe="a\nb")
@example(ids=[f"customer-{i:07d}" for i in range(200)], probe="customer-0000199")  # LZ4-packed
@example(ids=[f"customer-{i:07d}" for i in range(200)], probe="customer-000019")
def test_holds_id_answers_as_the_unpacked_ids_do(ids: list[str], probe: str) -> None:
    # trace searches every batch of every run with holds_id (bytes) instead of unpacking each batch's IDs
    packed = pack_ids(ids)
    assert ledger_module.holds_id(packed, probe) is (probe in ids)
    for member in ids[:3] + ids[-3:]:
        assert ledger_module.holds_id(packed, member)
    assert ledger_module.holds_id(json.dumps(ids), probe) is (probe in ids)  # schema 4's JSON text
