"""Three ways to build the items of a ``setProfileAttributes`` body, side by side (issue 13; not merged).

pushsync builds each row's JSON object with one polars ``concat_str`` of its pieces (:mod:`sync.platforms._encode`:
constants and columns, ``{"extId":"…","profile":{"a":"…",…}},``). A profile of the 1M-user bench job puts that
concatenation among the largest single pieces of polars' work, so two other ways were tried on the same pieces,
for a frame of N rows of plain strings (an ID and six attributes, as ``gen_data`` makes them):

* ``concat_str`` — what the encoder does (:meth:`sync.platforms._encode.Text.expr`);
* ``arrow join`` — the same pieces evaluated by polars, copied to Arrow ``large_string`` arrays and joined by
  Arrow's ``binary_join_element_wise`` (the separator empty, constants as scalars), then handed back to polars;
* ``json_encode`` — polars' ``struct.json_encode`` of the nested struct (possible only here: every member a plain
  string; polars' own float, escaping and null rules differ from ``json.dumps`` elsewhere).

All three give the same bytes (checked). Prints each one's CPU seconds (this process, every thread; best of
``--rounds``, taken in turns) pinned to one core::

    .venv/bin/python bench/proto_items.py                  # 1,000,000 rows, 5 rounds
    .venv/bin/python bench/proto_items.py --rows 100000

Not a ``bench_*`` script (no target): it records why the encoder keeps ``concat_str`` (docs/run.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sync.platforms import _encode as enc

ATTRIBUTES = ("name", "surname", "city", "country", "language", "plan")


def frame_of(rows: int) -> pl.DataFrame:
    """An ID and six plain string attributes per row (no character JSON escapes, no nulls)."""
    i = pl.int_range(rows).cast(pl.String)
    return pl.select(
        pl.format("user-{}", i).alias("ext_id"),
        *(
            pl.format(f"{name}-{{}}", (pl.int_range(rows) * (k + 7) % 9973).cast(pl.String)).alias(name)
            for k, name in enumerate(ATTRIBUTES)
        ),
    )


def item_text(frame: pl.DataFrame) -> enc.Text:
    """The encoder's Text of each row's item, ending with the array separator (as the Netmera streams make it)."""
    members = {name: enc.column_text(frame, name) for name in ATTRIBUTES}
    profile = enc.obj_text(members, required=ATTRIBUTES)
    item = enc.obj_text(
        {"extId": enc.column_text(frame, "ext_id"), "profile": profile}, required=("extId", "profile")
    )
    return enc.Text((*item.parts, ","), item.skip_nulls)


def by_concat_str(frame: pl.DataFrame, text: enc.Text) -> pl.Series:
    return frame.select(text.expr()).to_series()


def by_arrow_join(frame: pl.DataFrame, text: enc.Text) -> pl.Series:
    merged_parts = text.pieces()
    exprs = [p for p in merged_parts if isinstance(p, pl.Expr)]
    values = frame.select(e.alias(f"p{i}") for i, e in enumerate(exprs))
    columns = iter(values.iter_columns())
    pieces = []
    for part in merged_parts:
        if isinstance(part, str):
            pieces.append(pa.scalar(part, pa.large_string()))
        else:
            arrow = next(columns).to_arrow()
            pieces.append(arrow if arrow.type == pa.large_string() else arrow.cast(pa.large_string()))
    import pyarrow.compute as pc

    joined = pc.binary_join_element_wise(
        *pieces,
        pa.scalar("", pa.large_string()),
        null_handling="skip" if text.skip_nulls else "emit_null",
    )
    return pl.Series("item", joined)


def by_json_encode(frame: pl.DataFrame, text: enc.Text) -> pl.Series:
    profile = pl.struct([pl.col(name) for name in sorted(ATTRIBUTES)]).alias("profile")
    item = pl.struct(pl.col("ext_id").alias("extId"), profile).struct.json_encode()
    return frame.select(pl.concat_str(item, pl.lit(","))).to_series()


WAYS: dict[str, Callable[[pl.DataFrame, enc.Text], pl.Series]] = {
    "concat_str": by_concat_str,
    "arrow join": by_arrow_join,
    "json_encode": by_json_encode,
}


def _cpu() -> float:
    return time.process_time()  # user + system of every thread, at the clock's resolution (os.times: 10 ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    frame = frame_of(args.rows)
    text = item_text(frame)
    reference = by_concat_str(frame, text)
    for name, way in WAYS.items():
        got = way(frame, text)
        if got.cast(pl.Binary).to_list() != reference.cast(pl.Binary).to_list():
            raise SystemExit(f"{name}: not the encoder's bytes")
    best = {name: float("inf") for name in WAYS}
    for _ in range(args.rounds):
        for name, way in WAYS.items():
            before = _cpu()
            way(frame, text)
            best[name] = min(best[name], _cpu() - before)
    pieces = len(text.pieces())
    print(
        f"{args.rows:,} rows, an item of {pieces} pieces (ID + 6 plain string attributes); CPU seconds on one core, "
        f"best of {args.rounds}; the same bytes from all three"
    )
    for name, seconds in best.items():
        print(f"  {name:12s} {seconds:6.3f} s  {seconds / best['concat_str']:5.2f}× concat_str")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
