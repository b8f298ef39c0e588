"""The plugin chain: runs the plugins in config order, fails closed on requests and open on
endings, and guarantees exactly one ending per request (plugins/base.py states the contract).

Endings of answered requests run behind the answers, in batches (`Chain.end(wait=False)`);
`Inflight` counts the requests that still owe theirs, so shutdown drains them before the
store closes.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Awaitable, Callable

import structlog

from gateway.errors import ApiError, internal_error, store_unavailable
from gateway.journal import EndingsJournal
from gateway.store import StoreUnavailable
from gateway.usage import finalize_usage
from plugins.base import Plugin, RequestContext

log = structlog.get_logger("gateway")

BEHIND_DELAY = 0.02  # seconds an answered request's ending waits (Chain._run_behind)
MAX_BEHIND = 10_000  # answered requests whose endings wait; beyond, a handler runs its own


class Chain:
    """Runs the plugins in config order and guarantees exactly one ending per request.

    See `plugins/base.py` for the contract. Only plugins that override a hook are called
    for it, so an idle hook costs nothing per request or per chunk.
    """

    def __init__(self, plugins: list[Plugin], inflight: "Inflight | None" = None,
                 journal: EndingsJournal | None = None):
        self.plugins = plugins
        self.journal = journal  # shared by every generation of the chain, like inflight
        self._journaling = [p for p in plugins if p.overrides("journal")]
        self._request = [p for p in plugins if p.overrides("on_request")]
        self._chunk = [p for p in plugins if p.overrides("on_stream_chunk")]
        self._response = [p for p in plugins if p.overrides("on_response")]
        self._error = [p for p in plugins if p.overrides("on_error")]
        # Shared by every generation of the chain (live reload), so drain() sees them all.
        self.inflight = inflight if inflight is not None else Inflight()
        self._behind: collections.deque[RequestContext] = collections.deque()  # answered, not ended
        self._behind_task: asyncio.Task | None = None

    @property
    def wants_chunks(self) -> bool:
        return bool(self._chunk)

    async def run_request(self, ctx: RequestContext,
                          read_body: Callable[[], Awaitable[None]] | None = None) -> None:
        """Request hooks in order. `read_body` runs before the first plugin that needs the
        body (`Plugin.needs_body`), or after them all, or when a plugin asks for it
        (`ctx.need_body()`); its ApiError rejects the request."""
        trace = ctx.trace
        ctx.body_reader = read_body
        for plugin in self._request:
            if ctx.short_circuit is not None:
                break
            if plugin.needs_body and ctx.body_reader is not None:
                await ctx.need_body()
            started = time.perf_counter() if trace is not None else 0.0
            try:
                await plugin.on_request(ctx)
                if trace is not None:
                    trace.phase(plugin.name, started)
            except ApiError as err:
                if trace is not None:
                    trace.phase(plugin.name, started, err)
                raise
            except StoreUnavailable:  # fail closed, and say so: a 503 worth retrying
                log.warning("plugin_request_store_unavailable", plugin=plugin.name, request_id=ctx.request_id)
                raise store_unavailable(ctx.request_id) from None
            except Exception as exc:  # fail closed: a broken gate rejects, never admits
                if trace is not None:
                    trace.phase(plugin.name, started, exc)
                log.exception("plugin_request_hook_failed", plugin=plugin.name, request_id=ctx.request_id)
                raise internal_error(ctx.request_id) from None
        await ctx.need_body()

    async def run_chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> None:
        for plugin in self._chunk:
            try:
                await plugin.on_stream_chunk(ctx, chunk)
            except Exception:  # fail open
                log.exception("plugin_chunk_hook_failed", plugin=plugin.name, request_id=ctx.request_id)

    async def _run_ending(self, ctx: RequestContext) -> None:
        failed = ctx.error is not None
        for plugin in self._error if failed else self._response:
            try:
                await (plugin.on_error(ctx) if failed else plugin.on_response(ctx))
            except Exception:  # fail open
                log.exception("plugin_ending_hook_failed", plugin=plugin.name, request_id=ctx.request_id,
                              hook="on_error" if failed else "on_response")
        segment = ctx._scratch.get("core.journal")
        if segment is not None:
            EndingsJournal.ended(segment["segment"])  # its writes are queued behind it now

    def answered(self, ctx: RequestContext) -> None:
        """The answer is about to leave: journal what the endings will write (see
        gateway/journal.py), so a crash right after cannot give the answer away. Fails open.
        The journal hooks run also without a journal (energy settles its cost there)."""
        if not self._journaling:
            return
        try:
            finalize_usage(ctx)
            ctx._scratch["core.finalized"] = {"inputs": _usage_inputs(ctx)}
            records = {}
            for plugin in self._journaling:
                record = plugin.journal(ctx)
                if record is not None:
                    records[plugin.name] = record
            if records and self.journal is not None:
                segment = self.journal.record(ctx.request_id, records)
                if segment is not None:
                    ctx._scratch["core.journal"] = {"segment": segment}
        except Exception:
            log.exception("journal_record_failed", request_id=ctx.request_id)

    def pending_writes(self) -> int:
        return sum(plugin.pending_writes() for plugin in self.plugins)

    def enter(self, ctx: RequestContext) -> None:
        """The request entered the chain: it now owes exactly one ending."""
        self.inflight.enter()

    async def end(self, ctx: RequestContext, error: ApiError | None = None, *, wait: bool = True) -> None:
        """Run the ending once. Shielded: a cancelled handler (client gone, shutdown) does
        not cut billing short; `drain()` waits for every request still owing its ending.

        `wait=False` (an answer already sent): the ending runs behind it, so the
        connection's next request does not wait for settlement, usage row, metrics and log."""
        if ctx.ended_at is not None:
            return
        ctx.ended_at = time.monotonic()
        if error is not None:
            ctx.error = error
            ctx.status = error.status
        elif ctx.status is None:
            ctx.status = 200
        try:
            # tokens (estimated if need be) and USD, for every plugin; an answer journaled
            # since had them finalized by answered(), and unless what they depend on moved
            # (an error, more text, another usage), that result stands: not computed twice
            finalized = ctx._scratch.get("core.finalized")
            if finalized is None or ctx.error is not None or finalized["inputs"] != _usage_inputs(ctx):
                finalize_usage(ctx)
        except Exception:
            log.exception("finalize_usage_failed", request_id=ctx.request_id)
        if not wait and not ctx.end_promptly and len(self._behind) < MAX_BEHIND:
            self._behind.append(ctx)
            if self._behind_task is None:
                self._behind_task = asyncio.ensure_future(self._run_behind())
                self.inflight.track(self._behind_task, leaves=False)
            return
        task = asyncio.ensure_future(self._run_ending(ctx))
        self.inflight.track(task)
        if wait:
            await asyncio.shield(task)

    async def _run_behind(self) -> None:
        """Endings of answered requests, in batches: they wait BEHIND_DELAY so that the
        requests arriving meanwhile are served first, then run one after the other in one
        task instead of one task each. Measured (bench/, quick runs): 1 ms -> 20 ms took
        the fast path from ~3,200 to ~4,000 req/s at 32 connections and its added p50 at
        1 connection from ~0.53 to ~0.35 ms: the work is the same, but it no longer lands
        in the middle of every request."""
        try:
            while self._behind:
                await asyncio.sleep(BEHIND_DELAY)
                while self._behind:
                    ctx = self._behind.popleft()
                    try:
                        await self._run_ending(ctx)
                    finally:
                        self.inflight.leave()
        finally:
            self._behind_task = None
            if self._behind:  # cancelled mid-batch (loop shutting down): run the rest now
                self._behind_task = asyncio.ensure_future(self._run_behind())
                self.inflight.track(self._behind_task, leaves=False)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every request that entered the chain has run its ending."""
        return await self.inflight.wait_idle(timeout)

    async def flush(self) -> None:
        """Every plugin writes what it holds behind the answers (usage rows, settlements)."""
        for plugin in self.plugins:
            await plugin.flush()

    async def startup(self) -> None:
        for plugin in self.plugins:
            await plugin.startup()

    async def shutdown(self) -> None:
        for plugin in reversed(self.plugins):
            try:
                await plugin.shutdown()
            except Exception:
                log.exception("plugin_shutdown_failed", plugin=plugin.name)


def _usage_inputs(ctx: RequestContext) -> tuple:
    """What gateway/usage.py's finalize_usage reads off a request that may change between
    the answer's journal and its ending (the config, body and endpoint do not): compared by
    equality (the same usage or response object is equal to itself at once; another one
    equal in value gives the same result)."""
    return (ctx.usage, ctx.response, ctx.error, ctx.short_circuit is None, ctx.stream, ctx.finish_reason,
            len(ctx.streamed_text), len(ctx.streamed_reasoning), ctx.attempts, ctx.model, ctx.deployment,
            len(ctx.unbilled_calls))


class Inflight:
    """Requests that entered the chain and have not finished their ending yet."""

    def __init__(self) -> None:
        self.count = 0
        self._endings: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def track(self, task: asyncio.Task, leaves: bool = True) -> None:
        """`task` runs endings: referenced until done, so one nobody awaits is never
        garbage-collected. `leaves`: it is one request's ending, which leaves when done
        (a batch task calls leave() per request itself)."""
        self._endings.add(task)
        task.add_done_callback(self._ended if leaves else self._endings.discard)

    def _ended(self, task: asyncio.Task) -> None:
        self._endings.discard(task)
        self.leave()

    def leave(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self.count = 0
            self._idle.set()

    async def wait_idle(self, timeout: float | None = None) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False
