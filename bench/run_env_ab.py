"""The CPU of ``pushsync run`` under environment settings, side by side: one setting against another, alternating.

Runs :mod:`bench_handwritten`'s job (1M users × tags + 6 attributes, clean rows) against ``bench/bare_server.py``
(the server on one core, the run pinned to the other), once per setting per round, and prints each run's CPU
(user + system, from ``RUSAGE_CHILDREN``), its minor page faults, and each setting's median. A setting is
``default`` (the environment as it is) or ``VAR=value[;VAR=value…]`` added to it. Not a ``bench_*`` script:
``make bench`` does not run it. Used for the allocators' settings of ``sync.cli.entry`` (docs/run.md)::

    .venv/bin/python bench/run_env_ab.py --rounds 6 default "MIMALLOC_ALLOW_THP=1"
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
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


def _environment(setting: str) -> dict[str, str]:
    env = dict(os.environ)
    if setting != "default":
        for pair in setting.split(";"):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="+", help="default, or VAR=value[;VAR=value...]")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--users", type=int, default=1_000_000)
    args = parser.parse_args()

    from bench_handwritten import JOB, run_command
    from gen_data import generate_users

    out = HERE / "out" / "run_env_ab"
    out.mkdir(parents=True, exist_ok=True)
    data = DATA / f"users-clean-{args.users}.csv"
    if not data.exists():
        generate_users(data, args.users, bad_every=10**12, duplicate_every=10**12)
    client, server_core = cores()
    key = "bench-" + secrets.token_hex(12)
    server, url = start_server(key, out, kind="bare", core=server_core)
    spent: dict[str, list[float]] = {s: [] for s in args.settings}
    try:
        for _ in range(args.rounds):
            for setting in args.settings:
                workdir = out / "work"
                shutil.rmtree(workdir, ignore_errors=True)
                job = out / "job.yaml"
                job.write_text(JOB.format(workdir=workdir, url=url, data=data), encoding="utf-8")
                env = {**_environment(setting), "BENCH_NETMERA_KEY": key}
                command = run_command(job)
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                done = subprocess.run(pinned(client, command), env=env, capture_output=True, text=True)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                if done.returncode != 0:
                    raise SystemExit(f"pushsync run exited {done.returncode}:\n{done.stderr[-3000:]}")
                user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
                spent[setting].append(user + system)
                print(
                    f"{setting:40s} CPU {user + system:5.2f} s (user {user:.2f}, system {system:.2f}), "
                    f"{after.ru_minflt - before.ru_minflt:,} minor faults; load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    finally:
        stop_server(server)
    print(f"machine: {os.uname().machine}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    for setting, values in spent.items():
        print(
            f"{setting:40s} median {statistics.median(values):.2f} CPU-s of {sorted(round(v, 2) for v in values)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
