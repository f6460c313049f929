"""The least a Python client must do before its first request: the floor ``bench_budget_e2e.py`` compares with.

A hand-written client with the stack a user would reach for (polars + aiohttp, no validation, ledger, budgets or
retries): start the interpreter, import both, read the columns the bench job maps from the CSV, keep the last row
of each external ID, build the first ``tagUsers`` body of 1000 IDs and post it. It prints the wall time
(``time.time()``) at which the request was written, once its answer is in::

    .venv/bin/python bench/floor_client.py USERS.csv URL

Run under the same conditions as ``pushsync run`` (pinned to the worker's core beside the CPU hog), the time from
its start to that stamp is the start-up no Python client on this machine can beat; ``bench_budget_e2e.py`` turns
it into the best whole-command use any such client could reach.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp
import polars as pl

COLUMNS = ["customer_id", "first_name", "last_name", "birth_date", "score", "vip", "city", "segments"]


async def main(path: str, url: str) -> None:
    frame = pl.read_csv(path, columns=COLUMNS).unique(
        subset=["customer_id"], keep="last", maintain_order=True
    )
    first = frame.head(1000)
    body = json.dumps({"extIds": first["customer_id"].to_list(), "tags": ["vip"]}).encode()
    async with aiohttp.ClientSession() as session:
        sent = time.time()
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as answer:
            await answer.read()
    print(f"{sent:.6f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
