"""Write-behind: items queued in memory, written in batches by one background task.

Used for the per-request writes that need not block the answer: usage rows (accounting)
and energy settlements (energy). Per item, the request pays a list append; the database
sees one call per batch instead of one per request.

* A batch is written when `batch_size` items are pending, or at the latest
  `flush_interval` seconds after the previous write.
* Bounded: once `max_pending` items wait, `put()` waits for room (back-pressure from a
  slow database, never unbounded memory).
* A failed write is retried with backoff (0.1 s doubling to 5 s), the batch kept: a
  database outage delays the writes, it loses none. An item the writer refuses as
  invalid (ValueError/TypeError: a bug upstream of us) is logged and dropped alone.
* `flush()` writes what is pending now (tests, and anything that must read its own writes).
* `close()` writes everything still pending, then stops. It is called at shutdown after
  the in-flight requests have ended, so SIGTERM loses nothing. When the database stays
  unreachable (or refuses the rows) past the shutdown deadline, the items stay counted in
  `depth`: the endings journal then keeps its segments and the next start replays them
  (``write_behind_abandoned`` logs the count).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Awaitable, Callable, Generic, TypeVar

import structlog

T = TypeVar("T")

log = structlog.get_logger("gateway.batcher")


class WriteBehind(Generic[T]):
    def __init__(self, name: str, write: Callable[[list[T]], Awaitable[Any]], *,
                 batch_size: int, flush_interval: float, max_pending: int) -> None:
        self.name = name
        self._write_batch = write
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_pending = max(max_pending, 1)
        self.written = 0
        self.abandoned = 0  # items close() gave up on (left to the endings journal)
        self._pending: list[T] = []
        self._writing = 0
        self._wake = asyncio.Event()  # the writer: a batch is full, or closing
        self._room = asyncio.Event()  # producers: below max_pending again
        self._room.set()
        self._progress = asyncio.Event()  # flush(): a batch was written
        self._closing = False
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Items not yet in the database (pending plus the batch being written)."""
        return len(self._pending) + self._writing

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def put(self, item: T) -> None:
        if self._closing:  # a late ending (shutdown deadline passed): write it directly
            await self._write_batch([item])
            self.written += 1
            return
        while len(self._pending) >= self.max_pending:
            self._wake.set()  # full: write now, whatever batch_size says
            self._room.clear()
            await self._room.wait()
        self._pending.append(item)
        if len(self._pending) >= self.batch_size:
            self._wake.set()

    async def flush(self) -> None:
        """Write what is pending now, without waiting for the interval; returns once
        everything queued before the call is in the database."""
        goal = self.written + self.depth
        while self.written < goal:
            self._progress.clear()
            self._wake.set()
            await self._progress.wait()

    async def close(self, timeout: float | None = None,
                    spill: Callable[[list[T]], Awaitable[Any]] | None = None) -> None:
        """Write everything pending, then stop the writer. With a `timeout` (shutdown
        must end even when the database is gone), what is still unwritten after it is
        given up on and logged loudly (`write_behind_abandoned`, with the count), then
        handed to `spill` (a last resort elsewhere: the usage spool) if given; what that
        does not take stays pending, for the endings journal to keep."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            lost = self.depth
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            # Still counted in `depth` (the batch being written is put back): the endings
            # journal keeps its segments while anything is unwritten, so the next process
            # replays them (gateway/journal.py) instead of this shutdown dropping them.
            self.abandoned = lost
            log.error("write_behind_abandoned", writer=self.name, items=lost,
                      hint="the database did not take them before the shutdown deadline;"
                           " spooled, or kept in the endings journal, written by a later process")
            if spill is not None and self._pending:
                try:
                    await asyncio.wait_for(spill(list(self._pending)), 5.0)
                except Exception:  # noqa: BLE001 — the journal keeps them
                    log.exception("write_behind_spill_failed", writer=self.name, items=len(self._pending))
                else:
                    log.warning("write_behind_spooled", writer=self.name, items=len(self._pending),
                                hint="written by the next process whose database takes them")
                    self._pending.clear()

    async def _run(self) -> None:
        while True:
            if len(self._pending) < self.batch_size and not self._closing:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_interval):
                        await self._wake.wait()
            if not self._pending:
                if self._closing:
                    return
                continue
            batch = self._pending[:self.batch_size]
            del self._pending[:self.batch_size]
            self._writing = len(batch)
            self._room.set()
            try:
                await self._write_with_retry(batch)
            except asyncio.CancelledError:
                self._pending[:0] = batch  # not written: pending again (close() counts it)
                raise
            finally:
                self._writing = 0
            self.written += len(batch)
            self._progress.set()

    async def _write_with_retry(self, batch: list[T]) -> None:
        delay = 0.1
        while True:
            try:
                await self._write_batch(batch)
                return
            except asyncio.CancelledError:
                raise
            except (ValueError, TypeError):  # bad data, not a bad database: never passes
                await self._write_one_by_one(batch)
                return
            except Exception:  # the database is down or slow: keep the batch, retry
                log.exception("write_behind_failed", writer=self.name, items=len(batch), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _write_one_by_one(self, batch: list[T]) -> None:
        """A batch with an invalid item: write the valid ones, log and drop the others
        (retrying them would block every item behind them forever)."""
        if len(batch) > 1:
            for item in batch:
                await self._write_with_retry([item])  # an invalid one comes back here alone
            return
        try:
            await self._write_batch(batch)
        except (ValueError, TypeError) as exc:
            log.error("write_behind_item_dropped", writer=self.name, error=str(exc)[:300])
