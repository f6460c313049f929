"""sync._output: files written where the user said, through a temporary file of the writer's own."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sync._output import replaced_atomically
from sync.cli import main


def test_a_file_written_again_keeps_the_permissions_of_the_file_it_replaces(tmp_path: Path) -> None:
    # A report or a ledger export made private (chmod 600: it holds e-mails, phone numbers, refused IDs) came
    # back readable by everyone (the umask's 644) when written again.
    out = tmp_path / "refused.csv"
    out.write_text("old\n")
    out.chmod(0o600)
    with replaced_atomically(out) as tmp:
        tmp.write_text("new\n")
    assert out.read_text() == "new\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    fresh = tmp_path / "fresh.csv"
    with replaced_atomically(fresh) as tmp:
        tmp.write_text("x\n")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~_umask()


def test_two_writers_of_one_file_each_write_a_temporary_file_of_their_own(tmp_path: Path) -> None:
    # One shared <name>.tmp let two commands writing the same file (a cron whose last run still goes) write into
    # one temporary file: the first renamed it into place while the second still wrote there.
    out = tmp_path / "report.html"
    with replaced_atomically(out) as first, replaced_atomically(out) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("first\n")
        second.write_text("second\n")
    assert out.read_text() == "first\n"  # the outer block ended last: its whole file is in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_a_failed_write_leaves_neither_its_temporary_file_nor_a_changed_target(tmp_path: Path) -> None:
    out = tmp_path / "job.yaml"
    out.write_text("kept\n")
    with pytest.raises(RuntimeError), replaced_atomically(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("stopped")
    assert out.read_text() == "kept\n" and sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_a_job_file_written_again_by_init_keeps_its_permissions(tmp_path: Path) -> None:
    # Through a command: `pushsync init --force` writes its job file with replaced_atomically, as `report` and
    # `ledger-export` write theirs.
    data = tmp_path / "users.csv"
    data.write_text("id,name\nU1,Ann\n")
    out = tmp_path / "job.yaml"
    out.write_text("# mine\n")
    out.chmod(0o640)
    assert main(["init", str(data), "-o", str(out), "--force"]) == 0
    assert "# mine" not in out.read_text() and stat.S_IMODE(out.stat().st_mode) == 0o640


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
