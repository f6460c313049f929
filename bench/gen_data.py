"""Generate synthetic CRM exports (users with attributes, tags and opt-ins) for benchmarks and demos.

    .venv/bin/python bench/gen_data.py --rows 1000000 --format csv --out bench/data/users.csv

The data are deterministic (the same ``rows`` and ``seed`` give the same bytes) and written in slices, so memory
stays flat whatever the row count. Columns match the ``users`` source of ``jobs/example.yaml``::

    customer_id, first_name, last_name, email, phone, birth_date, city, score, vip, interests, segments,
    push_opt_in, email_opt_in, sms_opt_in, promo_opt_in, news_opt_in, crm_note

``bad_every`` puts an invalid value in one row out of that many (a bad email, date, number or MSISDN, or a missing
ID, in turn); ``duplicate_every`` repeats an earlier customer with a changed score. Importable:
:func:`generate_users` and :func:`write_job`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
from _common import DATA

__all__ = ["USERS_COLUMNS", "generate_users", "users_frame", "write_job"]

USERS_COLUMNS = (
    "customer_id",
    "first_name",
    "last_name",
    "email",
    "phone",
    "birth_date",
    "city",
    "score",
    "vip",
    "interests",
    "segments",
    "push_opt_in",
    "email_opt_in",
    "sms_opt_in",
    "promo_opt_in",
    "news_opt_in",
    "crm_note",
)

_FIRST = [
    "Ada",
    "Alan",
    "Grace",
    "Linus",
    "Barbara",
    "Ken",
    "Edsger",
    "Margaret",
    "Donald",
    "Frances",
    "John",
    "Radia",
]
_LAST = [
    "Lovelace",
    "Turing",
    "Hopper",
    "Torvalds",
    "Liskov",
    "Thompson",
    "Dijkstra",
    "Hamilton",
    "Knuth",
    "Allen",
]
_CITIES = [
    "Istanbul",
    "Ankara",
    "Izmir",
    "Bursa",
    "Antalya",
    "Konya",
    "Adana",
    "Eskisehir",
    "",
    "Berlin",
    "Paris",
]
_INTERESTS = ["shopping", "books", "sports", "music", "travel", "games", "food", ""]
_SEGMENTS = ["gold", "silver", "bronze", "newsletter", "vip", "churn-risk", "beta"]
_FLAGS = ["yes", "no", "true", "false", "1", "0", ""]
SLICE_ROWS = 500_000


def _pick(values: list[str], seed_expr: pl.Expr) -> pl.Expr:
    return pl.lit(pl.Series(values)).gather(seed_expr % len(values))


def users_frame(
    start: int, stop: int, *, seed: int = 1, bad_every: int = 1000, duplicate_every: int = 1000
) -> pl.DataFrame:
    """Rows ``start..stop`` (0-based) of the synthetic export, as text columns."""
    i = pl.col("i")

    def rnd(salt: int) -> pl.Expr:
        # A cheap, deterministic per-row pseudo-random number (Knuth's multiplicative hash).
        return ((i + salt * 7919 + seed * 104729) * 2654435761) % 4294967296

    frame = pl.DataFrame({"i": pl.int_range(start, stop, dtype=pl.Int64, eager=True)})
    dup = (i % duplicate_every == duplicate_every - 1) & (i > duplicate_every)
    cust = pl.when(dup).then(i - duplicate_every // 2).otherwise(i)
    bad_kind = pl.when(i % bad_every == bad_every // 2).then((i // bad_every) % 5).otherwise(-1)
    out = frame.select(
        pl.when(bad_kind == 0)
        .then(pl.lit(""))
        .otherwise(pl.format("C{}", cust.cast(pl.String).str.zfill(9)))
        .alias("customer_id"),
        _pick(_FIRST, rnd(1)).alias("first_name"),
        _pick(_LAST, rnd(2)).alias("last_name"),
        pl.when(bad_kind == 1)
        .then(pl.lit("not-an-email"))
        .otherwise(pl.format("user{}@example.com", cust))
        .alias("email"),
        pl.when(bad_kind == 2)
        .then(pl.lit("12"))
        .otherwise(pl.format("+90{}", (5_000_000_000 + rnd(3) % 999_999_999).cast(pl.String)))
        .alias("phone"),
        pl.when(bad_kind == 3)
        .then(pl.lit("31/12/1990"))
        .otherwise((pl.date(1950, 1, 1) + pl.duration(days=rnd(4) % 20000)).cast(pl.String))
        .alias("birth_date"),
        _pick(_CITIES, rnd(5)).alias("city"),
        pl.when(bad_kind == 4)
        .then(pl.lit("lots"))
        .when(dup)
        .then(pl.lit("99.5"))
        .otherwise((rnd(6) % 10000 / 100).cast(pl.String))
        .alias("score"),
        _pick(["true", "false"], rnd(7)).alias("vip"),
        pl.concat_str([_pick(_INTERESTS, rnd(8)), _pick(_INTERESTS, rnd(9))], separator="|")
        .str.strip_chars("|")
        .alias("interests"),
        pl.concat_str([_pick(_SEGMENTS, rnd(10)), _pick(_SEGMENTS, rnd(11))], separator="|").alias(
            "segments"
        ),
        _pick(_FLAGS, rnd(12)).alias("push_opt_in"),
        _pick(_FLAGS, rnd(13)).alias("email_opt_in"),
        _pick(_FLAGS, rnd(14)).alias("sms_opt_in"),
        _pick(_FLAGS, rnd(15)).alias("promo_opt_in"),
        _pick(_FLAGS, rnd(16)).alias("news_opt_in"),
        pl.when(dup).then(pl.lit("updated")).otherwise(pl.lit("")).alias("crm_note"),
    )
    return out


def generate_users(
    path: str | Path,
    rows: int,
    *,
    fmt: str = "csv",
    seed: int = 1,
    bad_every: int = 1000,
    duplicate_every: int = 1000,
) -> Path:
    """Write ``rows`` synthetic users to ``path`` (CSV or Parquet), slice by slice. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer: pq.ParquetWriter | None = None
    with path.open("wb") as fh:
        for start in range(0, max(rows, 1), SLICE_ROWS):
            stop = min(rows, start + SLICE_ROWS)
            frame = users_frame(start, stop, seed=seed, bad_every=bad_every, duplicate_every=duplicate_every)
            if fmt == "csv":
                frame.write_csv(fh, include_header=start == 0)
            else:
                table = frame.to_arrow()
                if writer is None:
                    writer = pq.ParquetWriter(fh, table.schema, compression="zstd")
                writer.write_table(table)
        if writer is not None:
            writer.close()
    return path


def write_job(path: str | Path, data: str | Path, *, name: str = "bench", workdir: str | None = None) -> Path:
    """Write a job file mapping a generated users file like the ``users`` source of ``jobs/example.yaml``."""
    path = Path(path)
    data = Path(data).resolve()
    lines = [
        "version: 1",
        f"name: {name}",
        *([f"workdir: {workdir}"] if workdir else []),
        "destination:",
        "  platform: netmera",
        "  base_url: http://127.0.0.1:8080/rest/3.0/",
        "  secret: {env: NETMERA_API_KEY}",
        "sources:",
        "  - name: users",
        f"    path: {data}",
        "    ext_id: customer_id",
        "    attributes:",
        "      first_name: {attribute: name}",
        "      last_name: {attribute: surname}",
        "      birth_date: {attribute: dateOfBirth, type: date}",
        "      score: number",
        "      vip: {attribute: isVip, type: boolean}",
        "      city: {on_null: unset}",
        "      interests: {attribute: lastVisitedCategories, type: list, mode: push}",
        "    tags: [{column: segments, delimiter: '|'}]",
        "    opt_ins:",
        "      push: push_opt_in",
        "      email: email_opt_in",
        "      sms: sms_opt_in",
        "      categories: {Promotions: promo_opt_in, News: news_opt_in}",
        "    email: email",
        "    msisdn: phone",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--format", choices=["csv", "parquet"], default="csv")
    parser.add_argument("--out", type=Path, default=None, help="default bench/data/users-<rows>.<format>")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--job", type=Path, default=None, help="also write a job file mapping the data")
    args = parser.parse_args(argv)
    out = args.out or DATA / f"users-{args.rows}.{args.format}"
    generate_users(out, args.rows, fmt=args.format, seed=args.seed)
    print(f"wrote {args.rows} rows to {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if args.job:
        write_job(args.job, out)
        print(f"wrote job {args.job}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
