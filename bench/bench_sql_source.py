"""Database sources into `pushsync plan`: rows/s from PostgreSQL and from DuckDB, peak RSS (target ≤ 512 MB), and
the ratio to the driver reading the same rows alone.

    .venv/bin/python bench/bench_sql_source.py                    # 1M rows, about 1-2 minutes
    .venv/bin/python bench/bench_sql_source.py --rows 10000000    # the 10M figure (about 15 minutes)
    .venv/bin/python bench/bench_sql_source.py --only duckdb
    .venv/bin/python bench/bench_sql_source.py --postgres-url postgresql://...   # an existing server (writes bench.users)

The users of bench/gen_data.py (cached as Parquet under bench/data/) become a typed table — score DOUBLE, vip and the
opt-ins BOOLEAN, birth_date DATE, the rest text — in a DuckDB file (cached) and in PostgreSQL (a throwaway server
started like the tests' fixture, unless --postgres-url names one). For each database, in subprocesses:

* **driver alone**: ADBC's ``fetch_record_batch`` (PostgreSQL) or DuckDB's ``to_arrow_reader`` over the same
  statement the source runs, counting rows;
* **plan**: ``pushsync plan --output json`` on a job whose users source reads the table (the mapping of
  jobs/example.yaml), its peak RSS measured like bench_plan_memory.py (psutil polling and the kernel's high-water
  mark).

Prints rows/s of each, the ratio, and the peak RSS; exits 1 when a plan's peak RSS is above the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import DATA  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))

from gen_data import write_job  # noqa: E402

LIMIT_MB = 512
URL_ENV = "BENCH_SQL_SOURCE_URL"

_TYPED = """
SELECT customer_id, first_name, last_name, email, phone, TRY_CAST(birth_date AS DATE) AS birth_date, city,
       TRY_CAST(score AS DOUBLE) AS score, TRY_CAST(vip AS BOOLEAN) AS vip, interests, segments,
       TRY_CAST(push_opt_in AS BOOLEAN) AS push_opt_in, TRY_CAST(email_opt_in AS BOOLEAN) AS email_opt_in,
       TRY_CAST(sms_opt_in AS BOOLEAN) AS sms_opt_in, TRY_CAST(promo_opt_in AS BOOLEAN) AS promo_opt_in,
       TRY_CAST(news_opt_in AS BOOLEAN) AS news_opt_in
FROM read_parquet('{path}')
"""

_WRAPPER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""

_DRIVER_ALONE = """
import os, sys, time
kind, target, statement = sys.argv[1:4]
t0 = time.monotonic()
rows = 0
if kind == "postgresql":
    import adbc_driver_postgresql.dbapi as pg
    with pg.connect(os.environ[target], autocommit=True) as conn, conn.cursor() as cur:
        cur.adbc_statement.set_options(**{"adbc.postgresql.batch_size_hint_bytes": str(8 << 20)})
        cur.execute(statement)
        for batch in cur.fetch_record_batch():
            rows += batch.num_rows
else:
    import duckdb
    con = duckdb.connect(target, read_only=True)
    con.execute("SET enable_progress_bar = false")
    for batch in con.sql(statement).to_arrow_reader(50_000):
        rows += batch.num_rows
print(rows, time.monotonic() - t0)
"""


def measured(cmd: list[str], out: Path, env: dict[str, str]) -> tuple[str, float, float]:
    """Run ``cmd`` under the RSS wrapper; returns (stdout, seconds, peak RSS in MB). Raises on failure."""
    report = out / "maxrss.txt"
    report.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRAPPER, str(report), *cmd],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watched = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            for child in watched.children(recursive=True):
                peak = max(peak, child.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}: {stderr[-2000:]}")
    kernel = int(report.read_text()) * 1024 if report.exists() else 0
    return stdout, elapsed, max(peak, kernel) / 2**20


def parquet_users(rows: int) -> Path:
    data = DATA / f"users-{rows}.parquet"
    if not data.exists():
        tmp = data.with_suffix(".tmp")
        gen = [sys.executable, str(HERE / "gen_data.py"), "--rows", str(rows), "--format", "parquet"]
        subprocess.run([*gen, "--out", str(tmp)], check=True, stdout=subprocess.DEVNULL)
        tmp.rename(data)
    return data


def duckdb_users(rows: int, parquet: Path) -> Path:
    import duckdb

    path = DATA / f"users-{rows}.duckdb"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        con = duckdb.connect(str(tmp))
        con.execute("CREATE SCHEMA bench")
        con.execute(f"CREATE TABLE bench.users AS {_TYPED.format(path=parquet)}")
        con.close()
        tmp.rename(path)
    return path


def postgres_load(url: str, duck: Path) -> None:
    import adbc_driver_postgresql.dbapi as pg
    import duckdb

    source = duckdb.connect(str(duck), read_only=True)
    with pg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CREATE SCHEMA IF NOT EXISTS bench")
        cur.execute("DROP TABLE IF EXISTS bench.users")
        cur.adbc_ingest(
            "users",
            source.sql("SELECT * FROM bench.users").to_arrow_reader(100_000),
            mode="create",
            db_schema_name="bench",
        )
        cur.execute("ANALYZE bench.users")
    source.close()


def job_for(path: Path, database: str) -> Path:
    job = write_job(path, "/unused.parquet", name=path.stem, workdir=str(path.parent / f"work-{path.stem}"))
    text = job.read_text(encoding="utf-8").replace(
        "    path: /unused.parquet\n", f"    database: {database}\n    table: bench.users\n"
    )
    job.write_text(text, encoding="utf-8")
    return job


def bench_one(
    name: str,
    kind: str,
    target: str,
    database: str,
    rows: int,
    out: Path,
    env: dict[str, str],
    limit_mb: float,
) -> bool:
    """Measure the driver alone and the plan on one database; print the line; True when within the limit."""
    job = job_for(out / f"bench-sql-{name}.yaml", database)
    from sync.config import load_job
    from sync.sources.reading_sql import SqlReader

    os.environ.update(env)
    statement = SqlReader(load_job(job).sources[0]).statement
    alone, _, alone_mb = measured([sys.executable, "-c", _DRIVER_ALONE, kind, target, statement], out, env)
    read, driver_seconds = alone.split()[-2:]
    assert int(read) == rows, (read, rows)
    stdout, plan_seconds, plan_mb = measured(
        [sys.executable, "-m", "sync", "plan", str(job), "--output", "json"], out, env
    )
    doc = json.loads(stdout)
    assert doc["rows"]["read"] == rows, doc["rows"]
    driver_rate = rows / float(driver_seconds)
    plan_rate = rows / plan_seconds
    print(
        f"{name:>10}: plan {plan_seconds:6.1f} s = {plan_rate:>9,.0f} rows/s, peak RSS {plan_mb:4.0f} MB "
        f"({doc['requests']:,} requests, {doc['rows']['rejected']:,} rejected rows) | driver alone "
        f"{float(driver_seconds):5.1f} s = {driver_rate:>10,.0f} rows/s, peak RSS {alone_mb:4.0f} MB | "
        f"plan/driver {plan_rate / driver_rate:.1%}"
    )
    return plan_mb <= limit_mb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--only", choices=["postgresql", "duckdb"])
    parser.add_argument("--postgres-url", help="an existing server's URL (default: start a throwaway one)")
    parser.add_argument("--limit-mb", type=float, default=LIMIT_MB)
    args = parser.parse_args(argv)

    out = HERE / "out"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    parquet = parquet_users(args.rows)
    duck = duckdb_users(args.rows, parquet)
    print(
        f"machine: {platform.machine()}, {psutil.cpu_count()} CPU(s), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM (shared with other work); "
        f"{args.rows:,} rows (data ready in {time.monotonic() - t0:.1f} s)"
    )
    ok = True
    env = dict(os.environ)
    if args.only in (None, "duckdb"):
        ok &= bench_one(
            "duckdb", "duckdb", str(duck), f"duckdb:///{duck}", args.rows, out, env, args.limit_mb
        )
    if args.only in (None, "postgresql"):
        server = root = None
        url = args.postgres_url
        if url is None:
            from pg_fixture import find_postgres_bin, start_postgres

            bin_dir = find_postgres_bin()
            if bin_dir is None:
                print("no PostgreSQL binaries: install postgresql or give --postgres-url")
                return 1
            server, root = start_postgres(bin_dir)
            url = server.new_database()
        try:
            t1 = time.monotonic()
            postgres_load(url, duck)
            print(f"(PostgreSQL table loaded in {time.monotonic() - t1:.1f} s)")
            env[URL_ENV] = url
            ok &= bench_one(
                "postgresql", "postgresql", URL_ENV, f"{{env: {URL_ENV}}}", args.rows, out, env, args.limit_mb
            )
        finally:
            if server is not None and root is not None:
                server.stop()
                shutil.rmtree(root, ignore_errors=True)
    print(f"peak RSS limit {args.limit_mb:.0f} MB: {'OK' if ok else 'EXCEEDED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
