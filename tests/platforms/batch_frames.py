"""Selected frames for the batch-cutting property tests (test_batch_ids, test_batch_text)."""

from __future__ import annotations

import polars as pl

from sync.platforms._batches import EXT_ID, FILE, GROUP, ITEM, ROW

Row = tuple[str, str, int, str]
"""An ID, its group, its row number and its item text."""


def frames_cut_at(rows: list[Row], cuts: list[int]) -> list[pl.DataFrame]:
    """``rows`` (in order) as selected frames, cut at the sorted positions ``cuts`` — each moved on past the rows
    of the ID it falls in, since a frame holds every row of its IDs (the planner's buckets)."""
    frames, start = [], 0
    for c in [*cuts, len(rows)]:
        while 0 < c < len(rows) and rows[c][0] == rows[c - 1][0]:
            c += 1
        part = rows[start:c] if c > start else []
        start = max(start, c)
        frames.append(
            pl.DataFrame(
                {
                    EXT_ID: [x for x, _, _, _ in part],
                    GROUP: [g for _, g, _, _ in part],
                    ITEM: [item for _, _, _, item in part],
                    FILE: [0] * len(part),
                    ROW: [r for _, _, r, _ in part],
                },
                schema={EXT_ID: pl.String, GROUP: pl.String, ITEM: pl.String, FILE: pl.Int32, ROW: pl.Int64},
            )
        )
    return frames
