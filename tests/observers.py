"""Dispatch observers the tests share.

* :class:`StopAfter`  sets a run's ``stop`` once ``n`` batches are done: the run drains and ends interrupted, as
                      after a first SIGINT
"""

from __future__ import annotations

import asyncio

from sync.records import Attempt, Batch, BatchResult


class StopAfter:
    """Sets ``stop`` once ``n`` batches are done: the run drains and ends interrupted, like a SIGINT."""

    def __init__(self, stop: asyncio.Event, n: int) -> None:
        self.stop, self.n, self.done = stop, n, 0

    def on_batch_start(self, batch: Batch) -> None:
        return None

    def on_attempt(self, attempt: Attempt) -> None:
        return None

    def on_batch_done(self, batch: Batch, result: BatchResult) -> None:
        self.done += 1
        if self.done == self.n:
            self.stop.set()
