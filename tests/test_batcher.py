"""WriteBehind (gateway/batcher.py): what the usage log and energy settlements rely on."""

from __future__ import annotations

import asyncio

import pytest

from gateway.batcher import WriteBehind


class Sink:
    def __init__(self, fail_times: int = 0, gate: asyncio.Event | None = None):
        self.batches: list[list[int]] = []
        self.fail_times = fail_times
        self.gate = gate
        self.calls = 0

    async def write(self, batch: list[int]) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_times > 0:
            self.fail_times -= 1
            raise ConnectionError("database is down")
        self.batches.append(list(batch))

    @property
    def items(self) -> list[int]:
        return [i for b in self.batches for i in b]


async def test_a_full_batch_is_written_without_waiting_for_the_interval():
    sink = Sink()
    wb = WriteBehind("t", sink.write, batch_size=3, flush_interval=60, max_pending=100)
    wb.start()
    for i in range(7):
        await wb.put(i)
    for _ in range(100):
        if len(sink.items) >= 6:
            break
        await asyncio.sleep(0.01)
    assert sink.batches[:2] == [[0, 1, 2], [3, 4, 5]]
    assert wb.depth == 1  # 6 waits for the interval (or flush/close)
    await wb.close()
    assert sink.items == list(range(7)) and wb.depth == 0 and wb.written == 7


async def test_a_partial_batch_is_written_after_the_interval():
    sink = Sink()
    wb = WriteBehind("t", sink.write, batch_size=100, flush_interval=0.05, max_pending=100)
    wb.start()
    await wb.put(1)
    for _ in range(100):
        if sink.items:
            break
        await asyncio.sleep(0.01)
    assert sink.items == [1]
    await wb.close()


async def test_flush_writes_everything_queued_before_it():
    sink = Sink()
    wb = WriteBehind("t", sink.write, batch_size=100, flush_interval=60, max_pending=1000)
    wb.start()
    for i in range(5):
        await wb.put(i)
    await asyncio.wait_for(wb.flush(), 5)
    assert sink.items == list(range(5)) and wb.depth == 0
    await wb.close()


async def test_a_failed_write_is_retried_and_nothing_is_lost():
    sink = Sink(fail_times=2)
    wb = WriteBehind("t", sink.write, batch_size=2, flush_interval=0.01, max_pending=100)
    wb.start()
    for i in range(4):
        await wb.put(i)
    await asyncio.wait_for(wb.close(), 10)
    assert sorted(sink.items) == [0, 1, 2, 3]
    assert sink.calls == 4  # two failures, then both batches


async def test_a_slow_database_applies_back_pressure():
    gate = asyncio.Event()
    sink = Sink(gate=gate)
    wb = WriteBehind("t", sink.write, batch_size=2, flush_interval=0.01, max_pending=4)
    wb.start()
    await wb.put(0)
    for _ in range(100):  # the writer takes [0] after the interval, and blocks on the database
        if sink.calls:
            break
        await asyncio.sleep(0.01)
    for i in range(1, 5):  # 4 pending: the limit
        await asyncio.wait_for(wb.put(i), 1)
    blocked = asyncio.ensure_future(wb.put(99))
    await asyncio.sleep(0.1)
    assert not blocked.done() and wb.depth == 5
    gate.set()
    await asyncio.wait_for(blocked, 5)
    await wb.close()
    assert sorted(sink.items) == [0, 1, 2, 3, 4, 99]


async def test_put_after_close_is_refused():
    sink = Sink()
    wb = WriteBehind("t", sink.write, batch_size=2, flush_interval=0.01, max_pending=4)
    wb.start()
    await wb.close()
    with pytest.raises(RuntimeError):
        await wb.put(1)
