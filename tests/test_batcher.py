"""WriteBehind (gateway/batcher.py): what the usage log and energy settlements rely on."""

from __future__ import annotations

import asyncio

from gateway.batcher import WriteBehind
from tests.fakes import eventually


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
    await eventually(lambda: len(sink.items) >= 6)
    assert sink.batches[:2] == [[0, 1, 2], [3, 4, 5]]
    assert wb.depth == 1  # 6 waits for the interval (or flush/close)
    await wb.close()
    assert sink.items == list(range(7)) and wb.depth == 0 and wb.written == 7


async def test_a_partial_batch_is_written_after_the_interval():
    sink = Sink()
    wb = WriteBehind("t", sink.write, batch_size=100, flush_interval=0.05, max_pending=100)
    wb.start()
    await wb.put(1)
    await eventually(lambda: sink.items)
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
    await eventually(lambda: sink.calls)  # the writer takes [0] after the interval, and blocks on the database
    for i in range(1, 5):  # 4 pending: the limit
        await asyncio.wait_for(wb.put(i), 1)
    blocked = asyncio.ensure_future(wb.put(99))
    await asyncio.sleep(0.1)
    assert not blocked.done() and wb.depth == 5
    gate.set()
    await asyncio.wait_for(blocked, 5)
    await wb.close()
    assert sorted(sink.items) == [0, 1, 2, 3, 4, 99]


async def test_put_after_close_writes_directly():
    """A late ending (shutdown deadline passed while it ran) is still written, not lost."""
    sink = Sink()
    wb = WriteBehind("t", sink.write, batch_size=2, flush_interval=0.01, max_pending=4)
    wb.start()
    await wb.close()
    await wb.put(1)
    assert sink.batches == [[1]] and wb.written == 1


async def test_a_full_buffer_is_written_at_once_even_below_batch_size():
    sink = Sink()
    wb = WriteBehind("t", sink.write, batch_size=500, flush_interval=60, max_pending=3)
    wb.start()
    for i in range(10):  # would wait a minute per batch if a full buffer did not wake the writer
        await asyncio.wait_for(wb.put(i), 2)
    await wb.close()
    assert sorted(sink.items) == list(range(10))


async def test_an_invalid_item_is_dropped_alone_and_the_rest_written():
    written = []

    async def write(batch):
        if any(i < 0 for i in batch):
            raise ValueError("negative")
        written.extend(batch)

    wb = WriteBehind("t", write, batch_size=4, flush_interval=0.01, max_pending=100)
    wb.start()
    for i in (1, -1, 2, 3, 4, 5):
        await wb.put(i)
    await asyncio.wait_for(wb.close(), 5)
    assert sorted(written) == [1, 2, 3, 4, 5]


async def test_close_gives_up_after_its_timeout_when_the_database_never_comes_back():
    sink = Sink(fail_times=10**9)
    wb = WriteBehind("t", sink.write, batch_size=2, flush_interval=0.01, max_pending=100)
    wb.start()
    for i in range(3):
        await wb.put(i)
    await asyncio.wait_for(wb.close(timeout=0.3), 5)  # returns: shutdown is not held hostage
    assert sink.items == [] and sink.calls >= 1
