"""A platform's row checks applied to a chunk's clean rows (the planner's ``check_rows`` hook): shared by the
builders that refuse rows valid in general but not for them (NotifyVisitors' limits, Netmera's contradictions)."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from sync.planning.validation import REJECTS_SCHEMA
from sync.platforms._batches import EXT_ID, ROW

__all__ = ["split_by_checks"]


def split_by_checks(
    clean: pl.DataFrame, checks: Sequence[tuple[str, pl.Expr]], file_name: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(kept rows, rejects)``: ``checks`` are ``(column, reason)`` pairs, each reason an expression that is
    null where the row passes; a row refused by any is a reject (file, row, the first refusing check's column and
    reason, ID) and is not kept. Each reason is computed once, as a column; most chunks refuse no row and are
    returned as they are."""
    if not checks or clean.is_empty():
        return clean, pl.DataFrame(schema=REJECTS_SCHEMA)
    reasons = clean.select(reason.cast(pl.String).alias(str(i)) for i, (_, reason) in enumerate(checks))
    bad = reasons.select(pl.any_horizontal(pl.all().is_not_null())).to_series()
    if not bad.any():
        return clean, pl.DataFrame(schema=REJECTS_SCHEMA)
    found = pl.concat([clean.select(ROW, EXT_ID), reasons], how="horizontal").filter(bad)
    rejects = found.select(
        pl.lit(file_name, pl.String).alias("file"),
        pl.col(ROW).cast(pl.Int64).alias("row"),
        pl.coalesce(
            pl.when(pl.col(str(i)).is_not_null()).then(pl.lit(c)) for i, (c, _) in enumerate(checks)
        ).alias("column"),
        pl.coalesce(pl.col(str(i)) for i in range(len(checks))).alias("reason"),
        pl.col(EXT_ID).cast(pl.String).alias("ext_id"),
    )
    return clean.filter(~bad), rejects
