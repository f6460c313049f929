"""The dispatcher's closeable bounded channel: end of data by closing, bounded sends, discard on a stop."""

from __future__ import annotations

import asyncio

import pytest
from vtime import run_virtual

from sync.dispatch._channel import Channel, ChannelClosedError


def test_closing_ends_the_receivers_loop_after_what_is_buffered() -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        channel: Channel[int] = Channel(4)
        got: dict[str, list[int]] = {"a": [], "b": []}

        async def receiver(name: str) -> None:
            async for item in channel:
                got[name].append(item)
                await asyncio.sleep(0.01)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(receiver("a"))
            tg.create_task(receiver("b"))
            for i in range(10):
                await channel.send(i)
            channel.close()
        return got["a"], got["b"]

    a, b = run_virtual(scenario())
    assert sorted(a + b) == list(range(10)) and a and b


def test_sends_wait_for_room_and_the_buffer_never_exceeds_its_bound() -> None:
    async def scenario() -> int:
        channel: Channel[int] = Channel(3)
        most = 0

        async def producer() -> None:
            nonlocal most
            for i in range(20):
                await channel.send(i)
                most = max(most, channel.statistics().buffered)
            channel.close()

        async def consumer() -> None:
            async for _ in channel:
                await asyncio.sleep(0.1)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(producer())
            tg.create_task(consumer())
        return most

    assert run_virtual(scenario()) == 3


def test_wait_room_waits_for_n_free_slots_and_discard_frees_them() -> None:
    async def scenario() -> tuple[bool, int, int]:
        channel: Channel[int] = Channel(4)
        for i in range(4):
            channel.send_nowait(i)
        waiter = asyncio.create_task(channel.wait_room(2))
        await channel.receive()
        await asyncio.sleep(0)
        still_waiting = not waiter.done()
        dropped = channel.discard()
        await waiter
        return still_waiting, dropped, channel.free

    assert run_virtual(scenario()) == (True, 3, 4)


def test_a_closed_channel_refuses_sends_and_fails_waiting_senders() -> None:
    async def scenario() -> None:
        channel: Channel[int] = Channel(1)
        channel.send_nowait(1)
        blocked = asyncio.create_task(channel.send(2))
        await asyncio.sleep(0)
        channel.close()
        with pytest.raises(ChannelClosedError):
            await blocked
        with pytest.raises(ChannelClosedError):
            channel.send_nowait(3)
        assert await channel.receive() == 1
        with pytest.raises(StopAsyncIteration):
            await channel.receive()

    run_virtual(scenario())


def test_a_cancelled_receiver_passes_its_item_on() -> None:
    async def scenario() -> int:
        channel: Channel[int] = Channel(2)
        first = asyncio.create_task(channel.receive())
        second = asyncio.create_task(channel.receive())
        await asyncio.sleep(0)
        channel.send_nowait(7)  # wakes the first receiver...
        first.cancel()  # ...which is cancelled before it runs: the item must reach the second
        await asyncio.sleep(0)
        return await asyncio.wait_for(second, timeout=1.0)

    assert run_virtual(scenario()) == 7
