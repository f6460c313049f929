"""Every ``bench/bench_*.py`` script runs to its verdict on a small input (``make bench`` runs them at full size).

The benchmarks are not timed here: a small input may miss a target (exit 1 with the script's own miss line), but
a script that no longer works with the package — bench_snapshot.py's data lacked the state's ``__uncertain``
column for four sessions, so ``make bench`` stopped there with a traceback — fails this test, not the next
measurement.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# script: (small-input arguments, the line a target miss prints; exit 1 without it is a failure)
SMALL = {
    "bench_budget_e2e.py": (["--quick", "--users", "20000", "--limit", "endpoint", "--no-hog"], r"^MISS: "),
    "bench_build.py": (["--users", "20000"], r"^\s*MISSED$"),
    "bench_build_nvfof.py": (["--users", "5000"], r"^\s*MISSED$"),
    "bench_dispatch.py": (["--requests", "200"], r"^\s*TARGET MISSED$"),
    "bench_export.py": (["--devices", "20000"], r"^FAIL"),
    "bench_first_request.py": (["--rows", "20000"], r"^FAIL"),
    "bench_handwritten.py": (["--users", "20000"], r"^\s*TARGET MISSED$"),
    "bench_ledger.py": (["--batches", "500"], r"^FAIL"),
    "bench_plan.py": (["--rows", "20000", "--rows", "40000", "--format", "parquet"], r"^FAIL"),
    "bench_plan_memory.py": (["--rows", "50000"], r"^FAIL"),
    "bench_rate.py": (["--windows", "3", "--requests", "10"], r"^FAIL"),
    "bench_run.py": (["--users", "20000"], None),
    "bench_sandbox.py": (["--seconds", "1", "--users", "2000"], r"^FAIL: "),
    "bench_scale.py": (["--batches", "50", "--users", "2000", "--budget-users", "2000"], r"MISSED"),
    "bench_snapshot.py": (["--users", "20000"], r"^FAIL: "),
    "bench_snapshot_pg.py": (["--users", "20000"], None),
    "bench_sql_source.py": (["--rows", "20000"], r"^peak RSS limit .*: EXCEEDED$"),
}


def test_every_bench_script_is_covered() -> None:
    assert sorted(p.name for p in (REPO_ROOT / "bench").glob("bench_*.py")) == sorted(SMALL)


@pytest.mark.parametrize("script", sorted(SMALL))
def test_a_bench_script_runs_to_its_verdict_on_a_small_input(script: str, tmp_path: Path) -> None:
    args, miss = SMALL[script]
    # Inputs generated afresh in a directory of the test's own: not an earlier run's cache (made by older code),
    # nor a file another script's test is writing.
    data = tmp_path / "data"
    data.mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / script), *args],
        cwd=tmp_path,
        env={**os.environ, "PUSHSYNC_BENCH_DATA": str(data)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-4000:]
    assert proc.returncode in (0, 1), output[-4000:]
    if proc.returncode == 1:
        # Only a target missed on the small input, said by the script's own line.
        assert miss is not None and re.search(miss, output, re.MULTILINE), output[-4000:]
