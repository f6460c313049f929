"""Retrying one read call with :class:`sync.config.RetryPolicy`: exponential backoff with full jitter on
:class:`sync.errors.RetryableError` (429, 5xx, time-outs, dropped connections), honouring a sane Retry-After.

The dispatcher has its own loop (it also feeds rate budgets); this is for the read paths — paging exports,
polling Meiro exports — where one call at a time is retried. Sleep and randomness are injectable, so tests
never sleep for real.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sync.config import RetryPolicy
from sync.errors import RetryableError

__all__ = ["Sleep", "backoff_delay", "retry_call"]

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


def backoff_delay(policy: RetryPolicy, attempt: int, error: RetryableError, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    Full jitter: uniform(0, min(max_delay, base_delay * 2**(attempt-1))); a Retry-After up to
    ``policy.max_retry_after`` is a floor (a 429 says exactly when the window reopens)."""
    delay = rng.uniform(0, min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1)))
    if error.retry_after is not None and 0 < error.retry_after <= policy.max_retry_after:
        delay = max(delay, error.retry_after)
    return delay


async def retry_call(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    sleep: Sleep = asyncio.sleep,
    rng: random.Random | None = None,
    on_retry: Callable[[int, RetryableError, float], None] | None = None,
) -> T:
    """Await ``call()`` until it succeeds, at most ``policy.max_attempts`` times.

    Only :class:`RetryableError` is retried; the last one is re-raised when attempts run out. Other errors
    (fatal, rejected) propagate at once. ``on_retry(attempt, error, delay)`` is told of each retry."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except RetryableError as exc:
            if attempt >= policy.max_attempts:
                raise
            delay = backoff_delay(policy, attempt, exc, rng)
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            await sleep(delay)
