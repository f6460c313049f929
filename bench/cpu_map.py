"""Where ``pushsync run``'s client CPU goes, phase by phase, on :mod:`bench_handwritten`'s job (issue 13).

The job (N users × tags + 6 attributes, clean rows) is first taken apart in a process of its own, pinned to the
client's core, each phase timed as the CPU seconds (user + sys) of the whole process — its threads and polars'
and pyarrow's pools included — from the end of the phase before:

* ``imports``: the interpreter's start and the modules a run's planning needs (sync's, polars, pyarrow; not
  aiohttp);
* ``head``: :func:`sync.planning.planning.build_plan` with ``lazy=True``, what a run does before its first
  request: every CSV row parsed (and spilled), the head's rows validated and settled;
* ``staging``: :meth:`Plan.settle`: the spill read back, every row validated, sorted chunks written, every
  bucket settled;
* ``batches``: every batch of every lane built — bucket files read, items encoded, runs cut, bodies joined,
  batch IDs hashed;
* ``ledger``: those batches recorded as a run records them (planned, sent, one attempt, the result) in a new
  ledger.

Then ``pushsync run`` itself sends the job to ``bench/bare_server.py`` (or the stateless Netmera sandbox,
``--server stateless``) on the other core; its CPU comes from ``RUSAGE_CHILDREN``. What the run costs beyond
the phases — sending (aiohttp, the dispatcher, the budget), aiohttp's import, the run's own start and end — is
printed as the rest. Best of ``--rounds`` for each figure; on a shared machine say so with the figures (CPU
seconds follow the neighbours' load less than wall times, but they do follow it).

    .venv/bin/python bench/cpu_map.py                       # 1,000,000 users, 3 rounds
    .venv/bin/python bench/cpu_map.py --users 100000 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    DATA,
    cores,
    pinned,
    start_server,
    stop_server,
)

PHASES = ("imports", "head", "staging", "batches", "ledger")


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def phases(job_path: Path) -> dict[str, float]:
    """The CPU seconds of each of :data:`PHASES` for the job at ``job_path`` (run in this process)."""
    out: dict[str, float] = {}
    mark = 0.0  # from the process's start: the interpreter's own start counts, as in a run

    def lap(name: str) -> None:
        nonlocal mark
        now = _cpu()
        out[name] = now - mark
        mark = now

    from sync.config import load_job
    from sync.ledger.ledger import Ledger
    from sync.planning.planning import build_plan
    from sync.records import Attempt, AttemptOutcome, Batch, BatchResult, BatchStatus, Phase

    lap("imports")
    job = load_job(job_path)
    plan = build_plan(job, lazy=True)
    lap("head")
    plan.settle()
    lap("staging")
    batches: list[Batch] = [b for phase in Phase for _, lane in plan.lanes(phase) for b in lane]
    lap("batches")
    with Ledger.open(job.workdir / "cpu-map-ledger.sqlite") as ledger:
        ledger.start_run("cpu-map", job=job.name)
        for b in batches:
            ledger.record_planned("cpu-map", b)
            ledger.record_sent("cpu-map", b.batch_id)
            ledger.record_attempt(
                "cpu-map",
                Attempt(b.batch_id, b.endpoint, 1, len(b.ext_ids), 0.01, AttemptOutcome.OK, 200),
                started_at=time.time(),
            )
            ledger.record_result(
                "cpu-map",
                BatchResult(
                    b.batch_id, b.endpoint, b.operation, BatchStatus.OK, 1, 200, ok_ids=len(b.ext_ids)
                ),
            )
            ledger.maybe_flush()
    lap("ledger")
    plan.close()
    out["requests"] = float(len(batches))
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", choices=("bare", "stateless"), default="bare")
    parser.add_argument("--phases-of", type=Path, help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args()
    if args.phases_of is not None:
        print(json.dumps(phases(args.phases_of)))
        return 0

    # Here, not at the top: the child that times the phases imports nothing it does not time.
    from bench_handwritten import JOB, run_command
    from gen_data import generate_users

    out = HERE / "out" / "cpu_map"
    out.mkdir(parents=True, exist_ok=True)
    data = DATA / f"users-clean-{args.users}.csv"
    if not data.exists():
        generate_users(data, args.users, bad_every=10**12, duplicate_every=10**12)
    client_core, server_core = cores()
    key = "bench-" + secrets.token_hex(12)
    env = {**os.environ, "BENCH_NETMERA_KEY": key}
    server, url = start_server(key, out, kind=args.server, core=server_core)
    best: dict[str, float] = {}
    requests = 0
    try:
        for _ in range(args.rounds):
            for what in ("phases", "run"):
                workdir = out / f"work-{what}"
                shutil.rmtree(workdir, ignore_errors=True)
                job = out / f"job-{what}.yaml"
                job.write_text(JOB.format(workdir=workdir, url=url, data=data), encoding="utf-8")
                command = (
                    [sys.executable, str(Path(__file__).resolve()), "--phases-of", str(job)]
                    if what == "phases"
                    else run_command(job)
                )
                before = _children_cpu()
                done = subprocess.run(pinned(client_core, command), capture_output=True, text=True, env=env)
                spent = _children_cpu() - before
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
                figures = json.loads(done.stdout) if what == "phases" else {"run": spent}
                if what == "phases":
                    requests = int(figures.pop("requests"))
                for name, value in figures.items():
                    best[name] = min(value, best.get(name, value))
    finally:
        stop_server(server)

    per = 1000 / max(requests, 1)
    print(
        f"{args.users:,} users × (tags + 6 attributes), {requests:,} requests; client on core {client_core}, "
        f"{args.server} server on core {server_core}; CPU seconds, best of {args.rounds}"
    )
    print(f"  machine: {os.uname().machine}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    for name in PHASES:
        print(f"  {name:10s} {best[name]:6.2f} s  {best[name] * per:5.2f} ms/request")
    rest = best["run"] - sum(best[name] for name in PHASES)
    print(
        f"  {'the rest':10s} {rest:6.2f} s  {rest * per:5.2f} ms/request  (sending, aiohttp's import, start, end)"
    )
    print(f"  {'run':10s} {best['run']:6.2f} s  {best['run'] * per:5.2f} ms/request  (pushsync run, whole)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
