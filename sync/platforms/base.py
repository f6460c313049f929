"""Protocols every platform connector implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from sync.records import Batch

__all__ = ["PlatformClient", "SendOutcome"]


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """A successful answer: the HTTP status, how long it took and the platform's response body (parsed)."""

    http_status: int
    latency: float
    body: object = None
    remaining: int | None = None
    """The server's ``X-RateLimit-Remaining``, when it sent one (rate budgets pause at 0)."""
    reset_after: float | None = None
    """Seconds until the platform's own rate window resets, when the connector knows it and ``remaining`` is
    0: the budget pauses that long instead of until its own (maybe shorter) period ends."""


@runtime_checkable
class PlatformClient(Protocol):
    """Sends batches to one platform.

    ``send`` returns a :class:`SendOutcome` on success and otherwise raises exactly one of
    :class:`sync.errors.FatalPlatformError` (abort the run), :class:`sync.errors.RetryableError` (back off and
    retry) or :class:`sync.errors.RejectedBatchError` (record; split to isolate bad records).
    """

    platform: str

    async def send(self, batch: Batch) -> SendOutcome: ...

    def split(self, batch: Batch) -> tuple[Batch, Batch] | None:
        """Halve a batch by its external IDs, or None when it cannot be split further (one ID)."""
        ...

    async def aclose(self) -> None: ...
