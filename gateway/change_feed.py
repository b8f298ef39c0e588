"""Admin changes pushed into every process's Directory cache: a revoked key stops at once, everywhere.

The Directory (gateway/directory.py) caches identities for `auth.cache_ttl` seconds. An
admin change (revoke, rotate, key controls, tier, workspace settings) made by this process
clears its own entries at once; every other process — the other workers, the other
replicas, and the gateway a CLI command changed the store under — learns of it here:

* every change is published by the admin operations through the store
  (`Store.publish_change`): a one-row counter (`gw_changes`) is bumped and, on PostgreSQL,
  a NOTIFY names the target on the schema's channel;
* on PostgreSQL each process LISTENs on a connection of its own and forgets the named key,
  user or workspace when the notification arrives (milliseconds);
* on SQLite (and behind PgBouncer, where LISTEN cannot work, or while the listening
  connection is lost) each process reads the counter every `POLL_INTERVAL` seconds and
  clears its whole cache when it moved (admin changes are rare; a refill of the cache
  costs one indexed query per active key);
* while listening, the counter is still read every `LISTEN_CHECK_INTERVAL` seconds, a net
  for a notification missed while the connection was being made.

The TTL stays as the last fallback (a store that cannot be read at all).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

log = structlog.get_logger("gateway.change_feed")

POLL_INTERVAL = 0.5          # seconds between two reads of the change counter, without push
LISTEN_CHECK_INTERVAL = 5.0  # the same with push (a net), and between two attempts to listen


class ChangeFeed:
    def __init__(self, store: Any, directory: Any, *, poll_interval: float = POLL_INTERVAL) -> None:
        self.store = store
        self.directory = directory
        self.poll_interval = poll_interval
        self._task: asyncio.Task | None = None
        self._close_listener: Any = None
        self._lost = False
        self._stale = False  # a change may have been missed: clear once the store answers
        self._wake = asyncio.Event()

    def start(self) -> "ChangeFeed":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self._unlisten()

    # --- what a change does -------------------------------------------------------------

    def _on_change(self, target: str) -> None:
        kind, _, ident = target.partition(":")
        forget = {"key": self.directory.forget_key, "user": self.directory.forget_user,
                  "workspace": self.directory.forget_workspace}.get(kind)
        if forget is not None and ident:
            forget(ident)
        else:
            self.directory.clear()

    def _on_lost(self) -> None:
        self._lost = True
        self._wake.set()  # back to polling now, not after the listening interval
        # What changed while the connection was down is unknown: the cache is cleared when
        # the store answers again, not now (with the database away, a cleared cache would
        # turn every cached key into a lookup that cannot be made).
        self._stale = True

    # --- the loop -------------------------------------------------------------------------

    async def _listen(self) -> None:
        try:
            self._close_listener = await self.store.listen_changes(self._on_change, self._on_lost)
        except Exception as exc:  # noqa: BLE001 — no push for now: the counter is polled
            log.warning("change_feed_listen_failed", error=type(exc).__name__)
            self._close_listener = None
        self._lost = False

    async def _unlisten(self) -> None:
        close, self._close_listener = self._close_listener, None
        if close is not None:
            with contextlib.suppress(Exception):
                await close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        seen: int | None = None
        failing = False
        next_listen = loop.time()
        while True:
            if self._lost:
                await self._unlisten()
                self._lost = False
            if self._close_listener is None and loop.time() >= next_listen:
                next_listen = loop.time() + LISTEN_CHECK_INTERVAL
                await self._listen()
            try:
                counter = await self.store.change_counter()
            except Exception as exc:  # noqa: BLE001 — store away: the TTL is the fallback
                if not failing:  # once per outage, not every poll
                    log.warning("change_feed_read_failed", error=type(exc).__name__)
                failing = True
                counter = seen
            else:
                if failing:
                    log.info("change_feed_read_recovered")
                failing = False
                if self._stale:
                    self._stale = False
                    self.directory.clear()
            if seen is not None and counter != seen:
                self.directory.clear()
            seen = counter
            pushed = self._close_listener is not None and not self._lost
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), LISTEN_CHECK_INTERVAL if pushed else self.poll_interval)
