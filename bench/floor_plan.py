"""What polars alone does of ``pushsync plan``'s work: the floor ``bench_plan.py --floor`` compares with.

The least a planner written with polars must do for ``bench_plan.py``'s job (``gen_data.write_job``: an ID,
6 attributes, a tag list, 5 opt-ins, email and MSISDN), in one lazy query over the whole file, in memory, on
every core: read the 16 mapped columns, trim the IDs, parse the date, the number and the six booleans, check
the email and the MSISDN against a pattern, split the two lists, drop rows whose ID is empty, keep the last row
of each ID. No rejects file (rows, columns and reasons), no canonical order, no batches, no request counts and
no bound on memory — each of which ``pushsync plan`` does — so no planner can beat it on this machine::

    .venv/bin/python bench/floor_plan.py bench/data/users-10000000.parquet

Prints one JSON line: rows read and kept, wall seconds from interpreter start (imports included), CPU seconds
(user + system, every thread) and peak RSS in MB.
"""

from __future__ import annotations

import json
import resource
import sys
import time

STARTED = time.monotonic()

import polars as pl  # noqa: E402

TRUE = ["true", "yes", "1", "y", "t", "on"]
FALSE = ["false", "no", "0", "n", "f", "off"]
BOOLEANS = ["vip", "push_opt_in", "email_opt_in", "sms_opt_in", "promo_opt_in", "news_opt_in"]
EMAIL = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
MSISDN = r"^\+?[0-9]{8,15}$"


def _boolean(name: str) -> pl.Expr:
    text = pl.col(name).str.to_lowercase()
    return (
        pl.when(text.is_in(TRUE)).then(True).when(text.is_in(FALSE)).then(False).otherwise(None).alias(name)
    )


def query(path: str) -> pl.LazyFrame:
    """The floor's query over ``path`` (CSV or Parquet)."""
    scan = pl.scan_parquet(path) if path.endswith(".parquet") else pl.scan_csv(path, infer_schema=False)
    return (
        scan.select(
            pl.col("customer_id").str.strip_chars(),
            "first_name",
            "last_name",
            "city",
            pl.col("birth_date").str.strip_chars().str.to_date("%Y-%m-%d", strict=False),
            pl.col("score").cast(pl.Float64, strict=False),
            *(_boolean(name) for name in BOOLEANS),
            pl.col("email").str.contains(EMAIL).alias("email_ok"),
            pl.col("phone").str.contains(MSISDN).alias("phone_ok"),
            pl.col("interests").str.split("|"),
            pl.col("segments").str.split("|"),
        )
        .filter(pl.col("customer_id").str.len_bytes() > 0)
        .filter(pl.col("customer_id").is_last_distinct())
    )


def main(path: str) -> int:
    rows = pl.scan_parquet(path) if path.endswith(".parquet") else pl.scan_csv(path, infer_schema=False)
    read = rows.select(pl.len()).collect().item()
    kept = query(path).collect()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "rows": read,
                "kept": kept.height,
                "seconds": round(time.monotonic() - STARTED, 3),
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
