"""A closeable bounded channel (AnyIO's memory object stream, in asyncio): the dispatcher's feeders send
batches into one per lane and its workers receive from it.

Closing the channel means *end of data*: receivers take what is still buffered, then their ``async for``
ends. :meth:`Channel.discard` drops what is buffered (a stop: batches no worker took stay ``planned``).
:meth:`Channel.statistics` tells what is buffered and who waits. Every wait is a future woken directly by the
other side — no polling, no end markers, no counters kept beside the buffer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Channel", "ChannelClosedError", "ChannelStatistics"]


class ChannelClosedError(Exception):
    """Sending into a closed channel."""


@dataclass(frozen=True, slots=True)
class ChannelStatistics:
    """What a channel holds: items buffered, the buffer's bound, tasks waiting to send or to receive."""

    buffered: int
    max_buffered: int
    waiting_senders: int
    waiting_receivers: int


class Channel(Generic[T]):
    """A FIFO of at most ``max_buffered`` items between tasks; see the module docstring."""

    __slots__ = ("_buffer", "_closed", "_demand_waiters", "_max", "_receivers", "_room_waiters")

    def __init__(self, max_buffered: int) -> None:
        if max_buffered < 1:
            raise ValueError("a channel needs room for at least one item")
        self._max = max_buffered
        self._buffer: deque[T] = deque()
        self._closed = False  # no more items will come
        self._receivers: deque[asyncio.Future[None]] = deque()  # receivers waiting for an item (or the end)
        self._room_waiters: deque[tuple[int, asyncio.Future[None]]] = (
            deque()
        )  # senders waiting for n free slots
        self._demand_waiters: deque[asyncio.Future[None]] = deque()  # senders waiting for a receiver to wait

    @property
    def free(self) -> int:
        """Items that may be sent now without waiting."""
        return self._max - len(self._buffer)

    def statistics(self) -> ChannelStatistics:
        """A snapshot of the channel's state."""
        return ChannelStatistics(
            len(self._buffer),
            self._max,
            sum(not f.done() for _, f in self._room_waiters),
            sum(not f.done() for f in self._receivers),
        )

    async def wait_room(self, n: int = 1) -> None:
        """Wait until at least ``min(n, max_buffered)`` items may be sent without waiting."""
        n = min(max(1, n), self._max)
        if self._closed:
            raise ChannelClosedError("send on a closed channel")
        if self.free >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._room_waiters.append((n, fut))
        await fut

    async def wait_demand(self) -> int:
        """Wait until nothing is buffered and a receiver waits; returns how many receivers wait. For a sender
        that makes (or claims) an item only when a receiver will take it at once."""
        while True:
            if self._closed:
                raise ChannelClosedError("send on a closed channel")
            if not self._buffer:
                waiting = sum(not f.done() for f in self._receivers)
                if waiting:
                    return waiting
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._demand_waiters.append(fut)
            await fut

    def send_nowait(self, item: T) -> None:
        """Buffer ``item``; the channel must have room (:meth:`wait_room`)."""
        if self._closed:
            raise ChannelClosedError("send on a closed channel")
        if not self.free:
            raise RuntimeError("channel full: wait_room() first")
        self._buffer.append(item)
        self._wake_receiver()

    async def send(self, item: T) -> None:
        """Buffer ``item``, waiting for room."""
        await self.wait_room(1)
        self.send_nowait(item)

    async def receive(self) -> T:
        """The next item; raises :class:`StopAsyncIteration` once the channel is closed and empty."""
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._receivers.append(fut)
            if self._demand_waiters:
                self._wake_demand()
            try:
                await fut
            except asyncio.CancelledError:
                # The item this receiver was woken for must reach another one.
                if fut.done() and not fut.cancelled():
                    self._wake_receiver()
                raise
        item = self._buffer.popleft()
        self._wake_senders()
        return item

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await self.receive()

    def close(self) -> None:
        """End of data: receivers take what is buffered, then stop; senders waiting for room fail."""
        self._closed = True
        while self._receivers:
            fut = self._receivers.popleft()
            if not fut.done():
                fut.set_result(None)
        while self._room_waiters:
            _, fut = self._room_waiters.popleft()
            if not fut.done():
                fut.set_exception(ChannelClosedError("channel closed"))
        self._wake_demand()

    def discard(self) -> int:
        """Drop every buffered item; returns how many."""
        dropped = len(self._buffer)
        self._buffer.clear()
        self._wake_senders()
        self._wake_demand()
        return dropped

    def _wake_demand(self) -> None:
        """Wake every sender waiting for demand: each looks again (or fails, the channel being closed)."""
        while self._demand_waiters:
            fut = self._demand_waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def _wake_receiver(self) -> None:
        while self._receivers:
            fut = self._receivers.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _wake_senders(self) -> None:
        while self._room_waiters:
            n, fut = self._room_waiters[0]
            if fut.done():
                self._room_waiters.popleft()
                continue
            if self.free < n:
                return
            self._room_waiters.popleft()
            fut.set_result(None)
