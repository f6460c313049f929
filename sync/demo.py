"""``pushsync demo`` / ``make demo``: the whole thing end to end against a local Netmera sandbox.

1. generate sample data (users with tags, five attributes and opt-ins) into ``demo-out/data/``;
2. start the Netmera sandbox in a subprocess (``python -m sync sandbox netmera --port 0``) with a rate limit
   of 40 requests per clock-aligned second per endpoint, and read its URL;
3. run ``jobs/demo.yaml`` against it (the sandbox's key passed through the variable the job names);
4. print the summary, check a sample of users through the API against the input, stop the sandbox.

Everything it writes goes under ``demo-out/`` in the current directory (data, sandbox settings, the job's
workdir), never next to the installed package: the job file ships inside the package (``sync/_demo/demo.yaml``,
a link to ``jobs/demo.yaml``) and its input path and workdir are pointed at ``demo-out/`` when it is loaded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl

from sync.config import Job, load_job
from sync.errors import ExitCode, StateError
from sync.run import RunOptions, RunOutcome, make_client, run

__all__ = ["demo_job", "expected_users", "generate_users", "run_demo", "start_sandbox_process"]

OUT_DIR = "demo-out"
"""Where the demo writes, relative to the current directory."""
_CITIES = ("Istanbul", "Ankara", "Izmir", "Bursa", "Antalya", "Konya")
_PLANS = ("free", "basic", "pro")
_SEGMENTS = ("newsletter", "gold", "silver", "churn-risk", "beta")


def generate_users(path: Path, n: int, *, seed: int = 42) -> pl.DataFrame:
    """Write ``n`` sample users to a CSV at ``path`` (deterministic for a seed) and return them."""
    rng = random.Random(seed)
    rows: dict[str, list[Any]] = {
        k: []
        for k in (
            "user_id",
            "name",
            "city",
            "score",
            "vip",
            "plan",
            "segments",
            "email_opt_in",
            "news_opt_in",
        )
    }
    for i in range(n):
        rows["user_id"].append(f"U{i:07d}")
        rows["name"].append(f"User {i}")
        rows["city"].append(rng.choice(_CITIES))
        rows["score"].append(rng.randint(0, 1000))
        rows["vip"].append(rng.random() < 0.1)
        rows["plan"].append(rng.choice(_PLANS))
        rows["segments"].append("|".join(s for s in _SEGMENTS if rng.random() < 0.3))
        rows["email_opt_in"].append(rng.random() < 0.7)
        rows["news_opt_in"].append(rng.random() < 0.5)
    frame = pl.DataFrame(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_csv(path)
    return frame


def expected_users(frame: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """What the platform must hold for each generated user after the demo job ran."""
    out: dict[str, dict[str, Any]] = {}
    for row in frame.iter_rows(named=True):
        out[row["user_id"]] = {
            "tags": sorted(s for s in (row["segments"] or "").split("|") if s),
            "profile": {
                "name": row["name"],
                "city": row["city"],
                "score": row["score"],
                "isVip": row["vip"],
                "plan": row["plan"],
            },
            "emailOptIn": row["email_opt_in"],
            "categories": {"News": row["news_opt_in"]},
        }
    return out


def start_sandbox_process(
    api_key: str, config: Mapping[str, Any], workdir: Path
) -> tuple[subprocess.Popen[str], str]:
    """Start the sandbox subprocess with ``config``; returns it and its base URL (the line it prints)."""
    config_path = workdir / "sandbox.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config), encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "sync", "sandbox", "netmera", "--port", "0", "--config", str(config_path)],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "NETMERA_SANDBOX_API_KEY": api_key},
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("http://"):
            return process, line.strip()
    stop_sandbox_process(process)
    raise StateError("the Netmera sandbox did not start (no URL line)")


def stop_sandbox_process(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


async def verify_sample(
    job: Job, api_key: str, sandbox_root: str, expected: Mapping[str, Mapping[str, Any]], *, sample: int = 20
) -> list[str]:
    """Compare a sample of users on the platform with the input; returns the differences (empty: all equal).

    Profiles and category preferences are read through the Netmera API; tags and e-mail opt-ins, which the
    API cannot read back, through the sandbox's inspection route."""
    ids = random.Random(7).sample(sorted(expected), min(sample, len(expected)))
    client = make_client(job, api_key)
    problems: list[str] = []
    state = await asyncio.to_thread(_sandbox_state, sandbox_root)
    users = {u["extId"]: u for u in state.get("users", [])}
    try:
        for ext_id in ids:
            want = expected[ext_id]
            get = client.get  # type: ignore[attr-defined]
            profile = (await get("getProfileAttributes", {"extId": ext_id}))["profile"]
            prefs = await get("getCategoryPreferences", {"externalId": ext_id})
            categories = {c["category"]: c["enable"] for c in prefs["categories"]}
            have = users.get(ext_id, {})
            got = {
                "tags": sorted(have.get("tags", [])),
                "profile": profile,
                "emailOptIn": have.get("emailOptIn"),
                "categories": categories,
            }
            for key, value in want.items():
                if got[key] != value:
                    problems.append(f"{ext_id}.{key}: platform has {got[key]!r}, input says {value!r}")
    finally:
        await client.aclose()
    return problems


def _sandbox_state(root: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{root}/_sandbox/state?format=json", timeout=30) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def demo_job(out: Path, base_url: str) -> Job:
    """The packaged demo job, reading ``out/data/users.csv``, working in ``out/work`` and sending to ``base_url``."""
    with resources.as_file(resources.files("sync").joinpath("_demo", "demo.yaml")) as path:
        job = load_job(path)
    data = str((out / "data" / "users.csv").resolve())
    return dataclasses.replace(
        job,
        destination=dataclasses.replace(job.destination, base_url=base_url),
        sources=tuple(dataclasses.replace(s, paths=(data,)) for s in job.sources),
        # Where `pushsync runs`, `report latest` and `trace` look without --job or --workdir (*/.pushsync/*/):
        # run from the demo's directory, they find its run.
        workdir=(out / ".pushsync" / job.name).resolve(),
    )


def run_demo(*, users: int = 10000, output: str = "text", directory: Path | None = None) -> int:
    """Run the demo under ``directory`` (default: the current directory); returns the run's exit code (or
    ABORTED when the end state differs from the input)."""
    out = (directory if directory is not None else Path.cwd()) / OUT_DIR
    data_path = out / "data" / "users.csv"
    frame = generate_users(data_path, users)
    # With --output json, stdout holds the summary alone (for jq, a scheduler); the demo's own lines go to stderr.
    notes = sys.stderr if output == "json" else sys.stdout
    print(f"generated {users} users -> {data_path}", file=notes, flush=True)
    api_key = "demo-" + secrets.token_hex(12)
    limits = {"*": {"requests": 40, "window": 1.0}}
    process, url = start_sandbox_process(api_key, {"limits": limits}, out)
    print(
        f"Netmera sandbox at {url} (40 requests per clock-aligned second per endpoint)",
        file=notes,
        flush=True,
    )
    try:
        job = demo_job(out, url)
        options = RunOptions(api_key=api_key, handle_signals=True, progress="auto", auto_resume=False)
        outcome: RunOutcome = asyncio.run(run(job, options))
        print(
            json.dumps(outcome.summary.to_json(), indent=2)
            if output == "json"
            else outcome.summary.render_text()
        )
        problems = asyncio.run(
            verify_sample(job, api_key, url.removesuffix("/rest/3.0/"), expected_users(frame))
        )
        if problems:
            print("end state differs from the input:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
            return int(ExitCode.ABORTED)
        print("verified: a sample of 20 users on the platform equals the input", file=notes, flush=True)
        return int(outcome.exit_code)
    finally:
        stop_sandbox_process(process)
