"""Body building for NotifyVisitors and Forms On Fire (issue 13): every batch of a users + events job and of a
push job, built from the staged clean frames.

Data (generated once under ``bench/data/``, deterministic): NotifyVisitors ``--users`` users (name, score, birth
date, city, member flag, email, mobile, two opt-ins) and 5 events per user (name, amount, SKU, event_time);
Forms On Fire ``--users`` pushes (title, body, sound, expiry), XML bodies. Staging (reading, validation,
deduplication) is done first and not timed; what is timed is :meth:`sync.planning.planning.Plan.batches` from start to end
— reading the staged parts, building every item's JSON (or XML) text with polars expressions, cutting the
requests and hashing each body for its ID. Prints wall and process CPU time per platform, µs of CPU per item.

Targets (issue 13: Python touches each batch, not each ID; a 1000-ID request costs ≤ 1.5 ms of client CPU
everything included): NotifyVisitors **≤ 1.5 µs of CPU per item** built (≤ 1.5 ms per 1000-event request);
Forms On Fire, one request per push, **≤ 15 µs of CPU per push** (the Batch object, the sha256 and the bytes of
one request). Exit 1 on a miss. The load average is printed with the figures: a run on a busy machine is a
loaded-machine figure, not the target's.

    .venv/bin/python bench/bench_build_nvfof.py                  # 200,000 users, 1,000,000 events
    .venv/bin/python bench/bench_build_nvfof.py --users 20000    # shorter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import polars as pl

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _common import DATA  # noqa: E402  (this script's own directory is on sys.path)

from sync.config import load_job  # noqa: E402
from sync.planning.planning import build_plan  # noqa: E402

TARGET_NV_US_PER_ITEM = 1.5
TARGET_FOF_US_PER_PUSH = 15.0

NV_JOB = """\
version: 1
name: bench-nv
workdir: {work}
destination:
  platform: notifyvisitors
  base_url: http://127.0.0.1:9/api/v1/
  secret: {{env: BENCH_SECRET}}
  extra: {{brand_id: "1000"}}
defaults: {{ext_id: id}}
validation: {{timezone: Asia/Kolkata}}
sources:
  - name: users
    path: {users}
    attributes:
      name: string
      score: number
      birth_date: {{type: date}}
      city: string
      member: {{type: boolean}}
    email: email
    msisdn: mobile
    opt_ins: {{email: mail, sms: sms}}
  - name: events
    kind: events
    path: {events}
    event: event
    attributes:
      amount: number
      sku: string
      event_time: {{type: date}}
"""

FOF_JOB = """\
version: 1
name: bench-fof
workdir: {work}
destination:
  platform: formsonfire
  base_url: http://127.0.0.1:9/api/v2/
  secret: {{env: BENCH_SECRET}}
  extra: {{company_id: "42", body_format: xml, title: "Hello", sound: "true"}}
defaults: {{ext_id: id}}
sources:
  - name: pushes
    path: {pushes}
    attributes:
      title: {{attribute: Title}}
      message: {{attribute: Body}}
      sound: {{attribute: Sound, type: boolean}}
      expiry: {{attribute: ExpirySecs, type: number}}
"""


def _data(users: int) -> tuple[Path, Path, Path]:
    data = DATA
    data.mkdir(parents=True, exist_ok=True)
    paths = (
        data / f"nv-users-{users}.csv",
        data / f"nv-events-{users}.csv",
        data / f"fof-pushes-{users}.csv",
    )
    if all(p.exists() for p in paths):
        return paths
    i = pl.col("i")
    base = pl.select(pl.int_range(0, users).alias("i"))
    base.select(
        pl.format("crm-{}", i).alias("id"),
        pl.format("Name {} Ünal", i).alias("name"),
        ((i % 1000) / 4).alias("score"),
        pl.format("19{}-0{}-1{}", (i % 90 + 10), (i % 9 + 1), (i % 9)).alias("birth_date"),
        pl.lit(["İstanbul", "Mumbai", 'say "hi"', "a&b"]).list.get(i % 4).alias("city"),
        (i % 3 == 0).alias("member"),
        pl.format("user{}@example.com", i).alias("email"),
        pl.format("+9198{}", (i % 100_000_000).cast(pl.String).str.zfill(8)).alias("mobile"),
        (i % 2 == 0).alias("mail"),
        (i % 5 == 0).alias("sms"),
    ).write_csv(paths[0])
    two = lambda e: e.cast(pl.String).str.zfill(2)  # noqa: E731
    pl.select(pl.int_range(0, users * 5).alias("i")).select(
        pl.format("crm-{}", i // 5).alias("id"),
        pl.lit(["purchase", "view", "refund"]).list.get(i % 3).alias("event"),
        ((i % 997) / 8).alias("amount"),
        pl.format("SKU-{}", i % 5000).alias("sku"),
        pl.format("2024-05-{} 10:{}:00", two(i % 28 + 1), two(i % 60)).alias("event_time"),
    ).write_csv(paths[1])
    base.select(
        pl.format("crm-{}", i).alias("id"),
        pl.format("Offer <{}> & more", i % 50).alias("title"),
        pl.format("Line one\r\nline two for {}", i).alias("message"),
        (i % 2 == 0).alias("sound"),
        (i % 86400).cast(pl.Float64).alias("expiry"),
    ).write_csv(paths[2])
    return paths


def _time(job_text: str, out: Path) -> dict[str, float]:
    job_file = out / "job.yaml"
    job_file.write_text(job_text, encoding="utf-8")
    job = load_job(job_file)
    with build_plan(job) as plan:
        batches = items = 0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for batch in plan.batches():
            batches += 1
            items += batch.body.count(b'"userID"') if batch.endpoint != "push" else 1
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
    return {
        "batches": batches,
        "items": items,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "cpu_us_per_item": round(cpu / max(items, 1) * 1e6, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("BENCH_SECRET", "bench-key")
    users_csv, events_csv, pushes_csv = _data(args.users)
    out = HERE / "out" / "build_nvfof"
    (out / "nv").mkdir(parents=True, exist_ok=True)
    (out / "fof").mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    nv = _time(NV_JOB.format(work=out / "nv" / "work", users=users_csv, events=events_csv), out / "nv")
    fof = _time(FOF_JOB.format(work=out / "fof" / "work", pushes=pushes_csv), out / "fof")
    load_after = os.getloadavg()[0]
    loaded = max(load_before, load_after) > 1.5
    missed = nv["cpu_us_per_item"] > TARGET_NV_US_PER_ITEM or fof["cpu_us_per_item"] > TARGET_FOF_US_PER_PUSH
    report = {
        "users": args.users,
        "notifyvisitors": nv,
        "formsonfire_xml": fof,
        "targets": {
            "notifyvisitors_cpu_us_per_item": TARGET_NV_US_PER_ITEM,
            "formsonfire_cpu_us_per_push": TARGET_FOF_US_PER_PUSH,
        },
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "loaded_machine": loaded,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"NotifyVisitors, {args.users:,} users + {args.users * 5:,} events: {nv['batches']:,} requests, {nv['items']:,} items"
        )
        print(
            f"  built in {nv['wall_seconds']} s wall, {nv['cpu_seconds']} s CPU ({nv['cpu_us_per_item']} µs CPU per item); target ≤ {TARGET_NV_US_PER_ITEM} µs"
        )
        print(f"Forms On Fire (XML), {args.users:,} pushes: {fof['batches']:,} requests")
        print(
            f"  built in {fof['wall_seconds']} s wall, {fof['cpu_seconds']} s CPU ({fof['cpu_us_per_item']} µs CPU per push); target ≤ {TARGET_FOF_US_PER_PUSH} µs"
        )
        note = " — a LOADED-machine figure, not the target's" if loaded else ""
        print(f"  load average {load_before:.2f} → {load_after:.2f} (2 cores){note}")
        print("  MISSED" if missed else "  OK")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
