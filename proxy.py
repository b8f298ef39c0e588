"""The gateway: `create_app(config)`, the HTTP handlers, the plugin chain runner, the CLI.

    python proxy.py                      # serve with ./config.yaml
    python proxy.py serve --config FILE  # same, explicit
    python proxy.py check-config [FILE]  # validate only; exit 1 on error
    python proxy.py users|keys|workspaces|energy|usage ...   # admin (see --help)

Plugins never import this module (it runs as `__main__`): the contract lives in
`plugins/base.py`, the machinery in `gateway/`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import itertools
import os
import re
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import orjson  # noqa: E402
import structlog  # noqa: E402
from aiohttp import web  # noqa: E402

from gateway.admin import Admin  # noqa: E402
from gateway.admin_api import admin_routes  # noqa: E402
from gateway.dashboard import dashboard_routes  # noqa: E402
from gateway import http_server  # noqa: E402
from gateway.client_body import (  # noqa: E402
    read_json,
    require_model,
    validate_chat,
    validate_embeddings,
    validate_responses,
)
from gateway.config import (  # noqa: E402
    RESTART_ONLY,
    Config,
    ConfigError,
    config_changes,
    load_config,
    redacted_config,
)
from gateway import anthropic_inbound, chat_stream, responses_inbound  # noqa: E402
from gateway.directory import Directory  # noqa: E402
from gateway.feedback import feedback_routes  # noqa: E402
from gateway.journal import EndingsJournal, journal_dir  # noqa: E402
from gateway.dispatch import StreamEnd, UpstreamError, use_blocking_executor  # noqa: E402
from gateway.errors import ApiError, internal_error, store_unavailable  # noqa: E402
from gateway.store import StoreUnavailable  # noqa: E402
from gateway.router import Router, upstream_to_api_error  # noqa: E402
from gateway.usage import finalize_usage, unpriced_models, usage_from_payload, warm_up  # noqa: E402
from plugins import build_plugins, plugin_class, validate_plugin_settings  # noqa: E402
from plugins.auth import bearer_token, is_master_key  # noqa: E402
from plugins.base import Plugin, RequestContext, Services, Usage  # noqa: E402

log = structlog.get_logger("gateway")

DEFAULT_CONFIG = "config.yaml"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


# --------------------------------------------------------------------------------------
# The plugin chain
# --------------------------------------------------------------------------------------

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
        body (`Plugin.needs_body`), or after them all; its ApiError rejects the request."""
        for plugin in self._request:
            if ctx.short_circuit is not None:
                break
            if read_body is not None and plugin.needs_body:
                await read_body()
                read_body = None
            try:
                await plugin.on_request(ctx)
            except ApiError:
                raise
            except StoreUnavailable:  # fail closed, and say so: a 503 worth retrying
                log.warning("plugin_request_store_unavailable", plugin=plugin.name, request_id=ctx.request_id)
                raise store_unavailable(ctx.request_id) from None
            except Exception:  # fail closed: a broken gate rejects, never admits
                log.exception("plugin_request_hook_failed", plugin=plugin.name, request_id=ctx.request_id)
                raise internal_error(ctx.request_id) from None
        if read_body is not None:
            await read_body()

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
        gateway/journal.py), so a crash right after cannot give the answer away. Fails open."""
        if self.journal is None or not self._journaling:
            return
        try:
            finalize_usage(ctx)
            records = {}
            for plugin in self._journaling:
                record = plugin.journal(ctx)
                if record is not None:
                    records[plugin.name] = record
            if records:
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
            finalize_usage(ctx)  # tokens (estimated if need be) and USD, for every plugin
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


# --------------------------------------------------------------------------------------
# App state
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """The config and the chain built from it. A request takes the current snapshot when it
    arrives and keeps it to its end, so a live reload never changes a request mid-way."""

    config: Config
    chain: Chain


@dataclass
class Gateway:
    snapshot: Snapshot
    router: Router
    store: Any = None
    directory: Directory | None = None
    started_at: float = field(default_factory=time.time)
    ready: bool = False
    config_path: str | None = None
    retired_plugins: list[Plugin] = field(default_factory=list)  # replaced by a reload

    @property
    def config(self) -> Config:
        return self.snapshot.config

    @property
    def chain(self) -> Chain:
        return self.snapshot.chain


GATEWAY = web.AppKey("gateway", Gateway)


def check_config(path: str | Path) -> Config:
    """Load and validate config.yaml, plugin settings included; raises ConfigError with
    every error found in one run (schema, environment, references, plugin settings)."""
    errors: list[str] = []
    config: Config | None = None
    try:
        config = load_config(path)
    except ConfigError as exc:
        errors.extend(exc.errors)
    entries = config.plugins if config is not None else _plugin_entries_of(path)
    errors.extend(e for e in validate_plugin_settings(entries) if e not in errors)
    if errors or config is None:
        raise ConfigError(errors)
    return config


def _plugin_entries_of(path: str | Path) -> list[Any]:
    """The plugin entries of a config that did not load as a whole (to check them too)."""
    import yaml

    from gateway.config import PluginEntry

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return []
    entries = []
    for item in (raw.get("plugins") if isinstance(raw, dict) else None) or []:
        try:
            entries.append(PluginEntry.model_validate(item))
        except Exception:  # noqa: BLE001 — its shape is already among the schema errors
            continue
    return entries


# --------------------------------------------------------------------------------------
# Request parsing
# --------------------------------------------------------------------------------------

_REQUEST_ID_PREFIX = "req_" + secrets.token_hex(6)
_request_counter = itertools.count(1)


def _new_request_id_prefix() -> None:
    global _REQUEST_ID_PREFIX, _request_counter
    _REQUEST_ID_PREFIX = "req_" + secrets.token_hex(6)
    _request_counter = itertools.count(1)


os.register_at_fork(after_in_child=_new_request_id_prefix)  # forked workers must not collide


def _request_id(request: web.Request) -> str:
    # Always ours: reservations and usage rows are keyed by it, so a client must not be
    # able to choose (or collide) it. A client's own id is echoed as X-Client-Request-Id.
    # A random per-process prefix plus a counter: unique across processes and restarts,
    # without a urandom syscall per request.
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter):010x}"


def _take_gateway_fields(ctx: RequestContext, request: web.Request) -> None:
    """`metadata.action` / `X-Action` and `prospect_id` are the gateway's, not the
    provider's: read them, then drop `metadata` so it never reaches the upstream."""
    metadata = ctx.body.pop("metadata", None) or {}
    action = metadata.get("action") or request.headers.get("X-Action")
    prospect = metadata.get("prospect_id") or request.headers.get("X-Prospect-Id")
    ctx.action = _clean_text(action) if action else None
    ctx.prospect_id = _clean_text(prospect) if prospect else None


def _clean_text(value: Any) -> str:
    """At most 128 characters of valid UTF-8 (aiohttp turns non-UTF-8 header bytes into
    lone surrogates, which would break every later encode)."""
    return str(value)[:128].encode("utf-8", "replace").decode("utf-8")


def _new_context(request: web.Request, snap: Snapshot, endpoint: str, body: dict[str, Any]) -> RequestContext:
    config = snap.config  # the snapshot this request keeps to its end
    ctx = RequestContext(request_id=_request_id(request), endpoint=endpoint,  # type: ignore[arg-type]
                         config=config, headers=request.headers, body=body)
    ctx.response_headers["X-Request-Id"] = ctx.request_id
    client_id = request.headers.get("X-Request-Id", "")
    if client_id and _REQUEST_ID_OK.match(client_id):
        ctx.response_headers["X-Client-Request-Id"] = client_id
    return ctx


# --------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------

def _json_response(status: int, payload: dict[str, Any], headers: dict[str, str]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json",
                        headers=headers)


def error_response(err: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    merged = {**(headers or {}), **err.headers}
    return _json_response(err.status, err.body(), merged)


async def _send(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Send now (so endings can run after the client has the answer)."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except (ConnectionError, asyncio.CancelledError):
        pass  # the client left; the request still ends normally
    return response


def _usage_from(payload: dict[str, Any]) -> Usage | None:
    """Token classes included (cached, cache write, reasoning, audio): gateway/usage.py."""
    return usage_from_payload(payload)


async def _fail(request: web.Request, snap: Snapshot, ctx: RequestContext, err: ApiError) -> web.StreamResponse:
    """Error endings run before the error is sent, so a refund shows in its headers."""
    await snap.chain.end(ctx, err)
    if ctx.inbound == "anthropic":
        return await _send(request, _json_response(err.status, anthropic_inbound.error_body(err),
                                                   {**ctx.response_headers, **err.headers}))
    return await _send(request, error_response(err, ctx.response_headers))


async def _run(request: web.Request, snap: Snapshot, ctx: RequestContext,
               answer: Callable[[], Awaitable[web.StreamResponse]],
               read_body: Callable[[], Awaitable[None]] | None = None) -> web.StreamResponse:
    """The chain around one request: request hooks (the body read before the first one
    that needs it), `answer()`, exactly one ending."""
    snap.chain.enter(ctx)
    try:
        await snap.chain.run_request(ctx, read_body)
        if ctx.short_circuit is None and ctx.endpoint != "models":
            if not ctx.candidates:
                raise ApiError(404, f"The model '{ctx.requested_model}' does not exist or you do not have access to it.",
                               code="model_not_found", param="model")
            _choose_model(ctx)
            if ctx.cache_hit is not None:
                _serve_cache_hit(ctx)
        return await answer()
    except ApiError as err:
        if ctx.ended_at is not None:  # the stream already ended itself
            raise
        return await _fail(request, snap, ctx, err)
    except asyncio.CancelledError:
        await snap.chain.end(ctx, ApiError(499, "the request was cancelled", type="server_error", code="cancelled"))
        raise
    except Exception:
        log.exception("request_failed", request_id=ctx.request_id)
        if ctx.ended_at is not None:
            raise
        return await _fail(request, snap, ctx, internal_error(ctx.request_id))


def _serve_cache_hit(ctx: RequestContext) -> None:
    """The response cache's answer serves the request if it is for the model the request
    hooks settled on (energy may have moved it to a cheaper one it could afford)."""
    if ctx.model == ctx.cache_hit_model:
        ctx.short_circuit = ctx.cache_hit
        ctx.response_headers["X-Cache"] = "HIT"
    else:
        ctx.cache_hit = None
        ctx.response_headers["X-Cache"] = "MISS"


def _bound_output_tokens(ctx: RequestContext) -> None:
    """The model's `max_tokens_default` when the client named no limit, its `max_tokens_cap`
    over a larger one (config.yaml models[]; an answer's length is its cost)."""
    settings = ctx.config.model_settings(ctx.model)
    default, cap = settings.max_tokens_default, settings.max_tokens_cap
    if default is None and cap is None:
        return
    body = ctx.body
    if ctx.inbound == "responses":
        key = "max_output_tokens"
    else:
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    if value is None:
        if default is not None:
            body[key] = default if cap is None else min(default, cap)
    elif cap is not None and isinstance(value, int) and value > cap:
        body[key] = cap
        ctx.response_headers["X-Max-Tokens-Capped"] = str(cap)


def _choose_model(ctx: RequestContext) -> None:
    ctx.model = ctx.candidates[0]
    if ctx.endpoint == "chat.completions":
        _bound_output_tokens(ctx)
    if ctx.model != ctx.requested_model:
        ctx.downgraded_from = ctx.requested_model
        ctx.response_headers["X-Model-Downgraded-From"] = ctx.requested_model
        if ctx.downgrade_reason:
            ctx.response_headers["X-Model-Downgrade-Reason"] = ctx.downgrade_reason


async def _pass_gate(ctx: RequestContext, dispatched: str) -> bool:
    """Wait for a request hook's overlapped check (`ctx.gate`, see plugins/base.py);
    raises its error. True when it moved the request to another model: dispatch again.

    `dispatched` is the model dispatch started with; `ctx.model` is the one that served
    (a fallback, perhaps). The gate moved the request only if it chose neither: comparing
    with the server alone re-ran the whole retry-and-fallback chain of a request a
    fallback had served (the upstream saw every attempt twice)."""
    gate, ctx.gate = ctx.gate, None
    error = await asyncio.shield(gate)  # a gate is resolved by its plugin, never cancelled by us
    if error is not None:
        raise error
    if ctx.candidates and ctx.candidates[0] not in (dispatched, ctx.model):
        _choose_model(ctx)
        return True
    return False


def _finish_success(ctx: RequestContext, payload: dict[str, Any]) -> None:
    payload["model"] = ctx.model  # the public model that actually served it
    ctx.response = payload
    ctx.usage = _usage_from(payload)
    ctx.status = 200


async def _complete(request: web.Request, gw: Gateway, snap: Snapshot, ctx: RequestContext) -> web.StreamResponse:
    dispatched = ctx.model
    payload = ctx.short_circuit if ctx.short_circuit is not None else await gw.router.chat(ctx)
    if ctx.gate is not None and await _pass_gate(ctx, dispatched):
        payload = await gw.router.chat(ctx)
    _finish_success(ctx, payload)
    ctx.first_byte_at = time.monotonic()
    snap.chain.answered(ctx)
    if ctx.inbound == "anthropic":  # as the upstream sent it, or translated
        payload = ctx.passthrough or anthropic_inbound.from_openai(payload, ctx.model, ctx.usage)
    response = await _send(request, _json_response(200, payload, ctx.response_headers))
    await snap.chain.end(ctx, wait=False)
    return response


_SSE_DONE = b"data: [DONE]\n\n"


class _EventStream(web.StreamResponse):
    """An SSE response whose headers leave with its first chunk, in one write: the first
    chunk is written right after `prepare()`, and a separate send for the headers cost
    about as much as the chunk's own (bench/: stream first byte)."""

    _send_headers_immediately = False


async def _replayed_stream(payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """A stored (idempotent or cached) completion, replayed as a stream: every choice whole
    (gateway/chat_stream.py)."""
    if not all(choice.get("finish_reason") for choice in payload.get("choices") or [{}]):
        # The first attempt's client left mid-stream: its answer is incomplete and must not be
        # replayed as if it were whole. It was charged once; only a new key runs it again.
        raise ApiError(409, "The request with this Idempotency-Key was cut off when its client disconnected "
                            "(and was charged once). Use a new Idempotency-Key to run it again.",
                       type="invalid_request_error", code="idempotency_key_incomplete")
    for chunk in chat_stream.replay(payload):
        yield chunk


async def _stream(request: web.Request, gw: Gateway, snap: Snapshot, ctx: RequestContext,
                  encoder: Any = None) -> web.StreamResponse:
    """The answer as a stream: OpenAI's chunks as they come, or, with an `encoder`
    (another inbound API's, e.g. gateway/anthropic_inbound.py), its events for them."""
    chain = snap.chain
    if ctx.short_circuit is not None:
        upstream = _replayed_stream(ctx.short_circuit)
        first = await upstream.__anext__()
    else:
        # Always ask for usage; the extra chunk is hidden from clients that did not.
        options = dict(ctx.body.get("stream_options") or {})
        options["include_usage"] = True
        ctx.body["stream_options"] = options
        dispatched = ctx.model
        first, upstream = await gw.router.open_stream(ctx)  # retried; nothing sent yet
        if ctx.gate is not None:
            try:
                moved = await _pass_gate(ctx, dispatched)
            except BaseException:
                await _close_quietly(upstream)
                raise
            if moved:
                await _close_quietly(upstream)
                first, upstream = await gw.router.open_stream(ctx)

    response = _EventStream(status=200, headers={
        **ctx.response_headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})
    error: ApiError | None = None
    end = StreamEnd()
    chunk: dict[str, Any] | None = first
    try:
        await response.prepare(request)
        while chunk is not None:
            if chunk.get("usage"):
                ctx.usage = _usage_from(chunk)
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                content = delta.get("content")
                if content:
                    ctx.streamed_text.append(content)
                elif delta.get("reasoning_content"):
                    ctx.streamed_reasoning.append(delta["reasoning_content"])
                if choice.get("finish_reason"):
                    ctx.finish_reason = choice["finish_reason"]
            end.observe(chunk)
            send = True
            if not ctx.client_wants_usage:
                if not chunk.get("choices"):
                    send = False  # the usage-only chunk the client did not ask for
                chunk.pop("usage", None)
            if send:
                chunk["model"] = ctx.model
                if chain.wants_chunks:
                    await chain.run_chunk(ctx, chunk)
                if encoder is None:
                    await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                else:
                    await response.write(encoder.chunk(chunk))
                if ctx.first_byte_at is None:
                    ctx.first_byte_at = time.monotonic()
                    ctx.stream_started = True
            elif encoder is not None:
                held = encoder.flush()  # the upstream's own events a passed-through stream holds
                if held:
                    await response.write(held)
            try:
                chunk = await upstream.__anext__()
            except StopAsyncIteration:
                chunk = None
        if not end.complete:
            raise UpstreamError("truncated", "the upstream stream ended before every choice finished")
        ctx.status = 200
        chain.answered(ctx)
        await response.write(_SSE_DONE if encoder is None else encoder.done())
    except UpstreamError as err:
        api_error = upstream_to_api_error(err, ctx.attempts)
        if err.kind == "truncated":
            api_error = ApiError(502, "the upstream stream broke off before the answer was complete",
                                 type="server_error", code="upstream_stream_truncated")
        error = api_error
        await _write_error_event(response, ctx, api_error)
    except (ConnectionError, RuntimeError):  # the client went away mid-stream
        ctx.client_disconnected = True
    except ApiError as err:
        error = err
        await _write_error_event(response, ctx, err)
    except Exception:
        log.exception("stream_failed", request_id=ctx.request_id)
        error = internal_error(ctx.request_id)
        await _write_error_event(response, ctx, error)
    except asyncio.CancelledError:
        ctx.client_disconnected = True
        await _close_quietly(upstream)
        await chain.end(ctx, None if ctx.stream_started else
                           ApiError(499, "cancelled before the stream started", type="server_error", code="cancelled"))
        raise
    finally:
        await _close_quietly(upstream)
    try:
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        ctx.client_disconnected = True
    # Tokens reached (or were produced for) the client: success, also when it left early.
    # The answer (or its error event) is sent: the ending runs behind it.
    await chain.end(ctx, error, wait=False)
    return response


async def _write_error_event(response: web.StreamResponse, ctx: RequestContext, err: ApiError) -> None:
    """A stream that fails after it started ends with an error event and no [DONE]: the
    OpenAI SDKs raise on it, so a cut-off answer never looks complete."""
    try:
        if ctx.inbound == "anthropic":
            await response.write(anthropic_inbound.StreamEncoder.error(err))
            return
        await response.write(b"data: " + orjson.dumps(err.body()) + b"\n\n")
    except (ConnectionError, RuntimeError):
        ctx.client_disconnected = True


async def _close_quietly(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is None:
        return
    try:
        await asyncio.shield(close())
    except (Exception, asyncio.CancelledError):
        pass


# --------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------

BodyCheck = Callable[[dict[str, Any], frozenset[str]], None]


def _body_reader(request: web.Request, snap: Snapshot, ctx: RequestContext, validate: BodyCheck,
                 translate: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Callable[[], Awaitable[None]]:
    """Reads, parses and checks the body into `ctx` when the chain first needs it: after
    the plugins that judge a request by its headers (auth), so an unknown caller's body is
    never parsed. Raises ApiError (400/413/415), which ends the request like any rejection."""

    async def read_body() -> None:
        body = await read_json(request, snap.config.server.max_body_bytes)
        if translate is not None:  # another API's request, as an OpenAI body
            ctx.inbound_body, body = body, translate(body)
            ctx.inbound_translated = dict(body)
        model = require_model(body)
        validate(body, snap.config.extra_params(model))
        ctx.body = body
        ctx.requested_model = ctx.model = model
        ctx.candidates = [model] if snap.config.deployments(model) else []
        _take_gateway_fields(ctx, request)
        ctx.stream = bool(body.get("stream"))
        ctx.client_wants_usage = ctx.stream and bool((body.get("stream_options") or {}).get("include_usage"))

    return read_body


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = _new_context(request, snap, "chat.completions", {})

    def answer() -> Awaitable[web.StreamResponse]:
        return (_stream if ctx.stream else _complete)(request, gw, snap, ctx)

    return await _run(request, snap, ctx, answer, _body_reader(request, snap, ctx, validate_chat))


async def responses_create(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses (gateway/responses_inbound.py): passed through, the chain around it."""
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = _new_context(request, snap, "chat.completions", {})
    ctx.inbound = "responses"

    async def answer() -> web.StreamResponse:
        only = None if ctx.short_circuit is not None else await responses_inbound.previous_upstream(gw.store, ctx)
        if ctx.stream:
            return await _responses_stream(request, gw, snap, ctx, only)
        dispatched = ctx.model
        payload = ctx.short_circuit if ctx.short_circuit is not None else \
            await responses_inbound.create(gw.router, ctx, only)
        if ctx.gate is not None and await _pass_gate(ctx, dispatched):
            payload = await responses_inbound.create(gw.router, ctx, only)
        if ctx.short_circuit is None:
            await responses_inbound.remember(gw.store, ctx, payload)
        payload["model"] = ctx.model
        ctx.response = payload
        ctx.usage = _usage_from(payload)
        ctx.status = 200
        ctx.first_byte_at = time.monotonic()
        snap.chain.answered(ctx)
        response = await _send(request, _json_response(200, payload, ctx.response_headers))
        await snap.chain.end(ctx, wait=False)
        return response

    return await _run(request, snap, ctx, answer, _body_reader(request, snap, ctx, validate_responses))


async def _responses_stream(request: web.Request, gw: Gateway, snap: Snapshot, ctx: RequestContext,
                            only: Callable[[Any], bool] | None) -> web.StreamResponse:
    """The Responses API's events, forwarded as they come; billed once `response.completed`
    (or `response.incomplete`) arrived, refunded otherwise."""
    chain = snap.chain
    if ctx.short_circuit is not None:
        upstream = None  # an idempotent replay: the stored response, whole
        created, completed = responses_inbound.replay_events(ctx.short_circuit)
        first = ("response.created", {}, created)
        pending = [("response.completed", {"response": ctx.short_circuit}, completed)]
    else:
        dispatched = ctx.model
        first, upstream = await responses_inbound.open_stream(gw.router, ctx, only)
        if ctx.gate is not None:
            try:
                moved = await _pass_gate(ctx, dispatched)
            except BaseException:
                await _close_quietly(upstream)
                raise
            if moved:
                await _close_quietly(upstream)
                first, upstream = await responses_inbound.open_stream(gw.router, ctx, only)
        pending = []
    response = _EventStream(status=200, headers={
        **ctx.response_headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})
    error: ApiError | None = None
    event: tuple[str, dict[str, Any], bytes] | None = first
    try:
        await response.prepare(request)
        while event is not None:
            name, data, raw = event
            if name == "response.output_text.delta" and isinstance(data.get("delta"), str):
                ctx.streamed_text.append(data["delta"])
            elif name == "response.created" and upstream is not None and isinstance(data.get("response"), dict):
                await responses_inbound.remember(gw.store, ctx, data["response"])
            if name in responses_inbound.TERMINAL:
                ctx.usage = _usage_from(data.get("response") or {})
                ctx.finish_reason = "stop" if name == "response.completed" else "length"
                ctx.status = 200
                chain.answered(ctx)
            await response.write(raw)
            if ctx.first_byte_at is None:
                ctx.first_byte_at = time.monotonic()
                ctx.stream_started = True
            if name in responses_inbound.FAILED:
                error = ApiError(502, "the upstream failed the response", type="server_error", code="upstream_error")
                break
            if name in responses_inbound.TERMINAL:
                break
            if pending:
                event = pending.pop(0)
                continue
            try:
                event = await upstream.__anext__() if upstream is not None else None
            except StopAsyncIteration:
                event = None
        if ctx.status != 200 and error is None:
            raise UpstreamError("truncated", "the upstream stream ended before response.completed")
    except UpstreamError as err:
        error = upstream_to_api_error(err, ctx.attempts)
        if err.kind == "truncated":
            error = ApiError(502, "the upstream stream broke off before the answer was complete",
                             type="server_error", code="upstream_stream_truncated")
        await _write_raw(response, ctx, responses_inbound.error_event(error))
    except (ConnectionError, RuntimeError):
        ctx.client_disconnected = True
    except Exception:
        log.exception("stream_failed", request_id=ctx.request_id)
        error = internal_error(ctx.request_id)
        await _write_raw(response, ctx, responses_inbound.error_event(error))
    except asyncio.CancelledError:
        ctx.client_disconnected = True
        await _close_quietly(upstream)
        await chain.end(ctx, None if ctx.stream_started and ctx.status == 200 else
                        ApiError(499, "cancelled before the answer was complete", type="server_error", code="cancelled"))
        raise
    finally:
        await _close_quietly(upstream)
    if error is not None:
        ctx.status = None
    try:
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        ctx.client_disconnected = True
    await chain.end(ctx, error, wait=False)
    return response


async def stored_response(request: web.Request) -> web.StreamResponse:
    """GET/DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items: at the upstream
    that stored it, for the user who created it (gateway/responses_inbound.py); free."""
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = _new_context(request, snap, "models", {})
    ctx.inbound = "responses"

    async def answer() -> web.StreamResponse:
        tail = "/input_items" if request.path.endswith("/input_items") else ""
        payload = await responses_inbound.stored(gw.router, gw.store, ctx, request.method,
                                                 request.match_info["response_id"], tail, dict(request.query))
        ctx.status = 200
        response = await _send(request, _json_response(200, payload, ctx.response_headers))
        await snap.chain.end(ctx, wait=False)
        return response

    return await _run(request, snap, ctx, answer)


async def _write_raw(response: web.StreamResponse, ctx: RequestContext, data: bytes) -> None:
    try:
        await response.write(data)
    except (ConnectionError, RuntimeError):
        ctx.client_disconnected = True


async def anthropic_messages(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages (gateway/anthropic_inbound.py): the chat chain, Anthropic's shapes."""
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = _new_context(request, snap, "chat.completions", {})
    ctx.inbound = "anthropic"

    def answer() -> Awaitable[web.StreamResponse]:
        if ctx.stream:
            return _stream(request, gw, snap, ctx, anthropic_inbound.StreamEncoder(ctx))
        return _complete(request, gw, snap, ctx)

    return await _run(request, snap, ctx, answer,
                      _body_reader(request, snap, ctx, validate_chat, anthropic_inbound.to_openai))


async def anthropic_count_tokens(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages/count_tokens: authenticated like every endpoint, free of charge."""
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = _new_context(request, snap, "models", {})
    ctx.inbound = "anthropic"

    async def answer() -> web.StreamResponse:
        body = await read_json(request, snap.config.server.max_body_bytes)
        model = require_model(body)
        anthropic_inbound.to_openai({**body, "max_tokens": 1})  # the same checks as a message (400)
        tokens = None
        deployments = snap.config.deployments(model)
        if deployments and gw.router.dispatcher_for(deployments[0]) is gw.router.anthropic:
            try:  # Claude's own count for a Claude model; the local estimate if it cannot say
                tokens = await gw.router.anthropic.count_tokens(deployments[0], body)
            except UpstreamError as err:
                log.warning("count_tokens_estimated", request_id=ctx.request_id, model=model, error=err.message[:200])
        if tokens is None:
            tokens = await asyncio.get_running_loop().run_in_executor(None, anthropic_inbound.count_tokens, body)
        ctx.status = 200
        response = await _send(request, _json_response(200, {"input_tokens": tokens}, ctx.response_headers))
        await snap.chain.end(ctx, wait=False)
        return response

    return await _run(request, snap, ctx, answer)


async def embeddings(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = _new_context(request, snap, "embeddings", {})

    async def answer() -> web.StreamResponse:
        dispatched = ctx.model
        payload = ctx.short_circuit if ctx.short_circuit is not None else await gw.router.embeddings(ctx)
        if ctx.gate is not None and await _pass_gate(ctx, dispatched):
            payload = await gw.router.embeddings(ctx)
        _finish_success(ctx, payload)
        ctx.first_byte_at = time.monotonic()
        snap.chain.answered(ctx)
        response = await _send(request, _json_response(200, payload, ctx.response_headers))
        await snap.chain.end(ctx, wait=False)
        return response

    return await _run(request, snap, ctx, answer, _body_reader(request, snap, ctx, validate_embeddings))


async def list_models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models, and GET /v1/models/{model} (`client.models.retrieve`): the model if
    the caller's tier may use it, else 404 model_not_found (as for an unknown one)."""
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = _new_context(request, snap, "models", {})
    ctx.visible_models = snap.config.model_names()
    wanted = request.match_info.get("model")

    async def answer() -> web.StreamResponse:
        created = int(gw.started_at)
        if wanted is not None:
            if wanted not in ctx.visible_models:
                raise ApiError(404, f"The model '{_clean_text(wanted)}' does not exist or you do not have access to it.",
                               code="model_not_found", param="model")
            payload = {"id": wanted, "object": "model", "created": created, "owned_by": "gateway"}
        else:
            payload = {"object": "list", "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "gateway"}
                for name in ctx.visible_models]}
        ctx.status = 200
        response = await _send(request, _json_response(200, payload, ctx.response_headers))
        await snap.chain.end(ctx, wait=False)
        return response

    return await _run(request, snap, ctx, answer)


async def health(request: web.Request) -> web.Response:
    return _json_response(200, {"status": "ok"}, {})


async def health_ready(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    store_ok = True
    if gw.store is not None:
        try:
            store_ok = await asyncio.wait_for(gw.store.ping(), timeout=2)
        except Exception:  # noqa: BLE001 — any failure means not ready
            store_ok = False
    ready = gw.ready and store_ok
    return _json_response(200 if ready else 503,
                          {"status": "ready" if ready else "not_ready", "config": "loaded",
                           "store": "ok" if store_ok else "unreachable", "models": len(gw.config.model_names())}, {})


@web.middleware
async def openai_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Whatever escapes a handler becomes an OpenAI-shaped error, never a traceback."""
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        message = {404: f"Unknown path {request.path}", 405: f"{request.method} is not allowed on {request.path}"}.get(
            exc.status, exc.reason)
        return error_response(ApiError(exc.status, message, code=code))
    except asyncio.CancelledError:
        raise
    except Exception:
        request_id = _request_id(request)
        log.exception("unhandled_error", path=request.path, request_id=request_id)
        return error_response(internal_error(request_id))


# --------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------

def create_app(config: Config, *, router: Router | None = None, store: Any = None,
               config_path: str | None = None) -> web.Application:
    """Build the gateway. `store` may be passed in (tests); otherwise it is opened from
    `config.store.url` at start-up and closed at cleanup. With `config_path`, SIGHUP and
    changes of that file reload the config live (see `reload_config`)."""
    app = http_server.Application(middlewares=[openai_errors], client_max_size=config.server.max_body_bytes + 1024,
                                  handler_args={"header_timeout": config.server.header_timeout})
    services = Services(store=store, config=config)
    plugins = build_plugins(config.plugins, services)
    services.plugins = plugins
    gw = Gateway(snapshot=Snapshot(config, Chain(plugins)), router=router or Router(), store=store,
                 config_path=config_path)
    app[GATEWAY] = gw
    app[SERVICES] = services
    owns_store = store is None

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        if owns_store:
            from gateway.store import open_store

            gw.store = open_store(config.store.url, **config.store.backend_options())
            await gw.store.open()
            services.store = gw.store
        services.directory = gw.directory = Directory(gw.store, config.auth.cache_ttl)
        yield
        if owns_store:
            await gw.store.close()

    async def plugins_ctx(app: web.Application) -> AsyncIterator[None]:
        missing = unpriced_models(config)
        if missing:
            log.warning("model_price_unknown", models=missing,
                        hint="set models[].pricing in config.yaml; their cost_usd is logged as null")
        keyless = {e.name: config.missing_key(e) for e in config.models if config.missing_key(e) is not None}
        if keyless:
            log.warning("provider_key_missing", models=keyless,
                        hint="these deployments answer 502 upstream_auth_error until the variable is set")
        await asyncio.get_running_loop().run_in_executor(None, warm_up)
        await gw.router.warm_up(config)
        # litellm leaves ~400k long-lived objects; without this every full collection walks
        # them all (0.5 s pauses under load). Freeze them out of the collector's sight.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)  # per-request garbage is short-lived; collect it in bulk
        journal = await _open_journal(config, gw)
        await gw.chain.startup()
        gw.ready = True
        yield
        gw.ready = False
        # aiohttp has already waited for the handlers; endings still running (billing)
        # finish before the plugins flush and the store closes.
        if not await gw.chain.drain(timeout=max(5.0, config.server.shutdown_grace)):
            log.error("shutdown_endings_unfinished", requests=gw.chain.inflight.count)
        await gw.chain.shutdown()
        for plugin in gw.retired_plugins:
            try:
                await plugin.shutdown()
            except Exception:
                log.exception("plugin_shutdown_failed", plugin=plugin.name)
        if journal is not None:
            pending = gw.chain.pending_writes() + sum(p.pending_writes() for p in gw.retired_plugins)
            await journal.close(None, pending)
        await gw.router.close()

    async def reload_ctx(app: web.Application) -> AsyncIterator[None]:
        from gateway import logs

        tasks: list[asyncio.Task] = [asyncio.create_task(logs.flush_forever())]
        if config_path is not None:
            loop = asyncio.get_running_loop()
            try:
                loop.add_signal_handler(signal.SIGHUP, lambda: tasks.append(
                    asyncio.ensure_future(reload_config(app, reason="SIGHUP"))))
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests) or no signals here: the file watcher remains
            tasks.append(asyncio.create_task(_watch_config_file(app, config_path)))
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        logs.flush()

    async def executor_ctx(app: web.Application) -> AsyncIterator[None]:
        use_blocking_executor(asyncio.get_running_loop())
        yield

    app.cleanup_ctx.append(executor_ctx)
    app.cleanup_ctx.append(store_ctx)
    app.cleanup_ctx.append(plugins_ctx)
    app.cleanup_ctx.append(reload_ctx)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", responses_create)
    app.router.add_post("/responses", responses_create)
    for prefix in ("/v1", ""):
        app.router.add_get(prefix + "/responses/{response_id}", stored_response, allow_head=False)
        app.router.add_delete(prefix + "/responses/{response_id}", stored_response)
        app.router.add_get(prefix + "/responses/{response_id}/input_items", stored_response, allow_head=False)
    app.router.add_post("/v1/messages", anthropic_messages)
    app.router.add_post("/v1/messages/count_tokens", anthropic_count_tokens)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", list_models)
    app.router.add_get("/models/{model:.+}", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/health/ready", health_ready)
    app.router.add_routes(admin_routes(lambda request: Admin(gw.store, gw.config, gw.directory)))
    app.router.add_get("/admin/config", admin_config)
    async def write_behind_now() -> None:  # feedback on an answer whose usage row is not written yet
        await gw.chain.drain(timeout=2.0)
        await gw.chain.flush()

    app.router.add_routes(feedback_routes(lambda: (gw.store, gw.directory, gw.config, write_behind_now)))
    app.router.add_routes(dashboard_routes(lambda request: Admin(gw.store, gw.config, gw.directory),
                                           lambda: gw.chain.inflight.count))
    for plugin in plugins:
        app.router.add_routes(plugin.routes())
    return app


async def _open_journal(config: Config, gw: Gateway) -> EndingsJournal | None:
    """The endings journal, when a plugin journals: replays what a dead process left
    (before the plugins start: the sweeper must not refund answered requests), then
    journals this process's answers."""
    plugins = gw.chain.plugins
    if not any(p.overrides("journal") for p in plugins):
        return None
    journal = EndingsJournal(journal_dir(config.store.url, config.store.journal_dir))
    journal.open()
    await journal.replay({p.name: p.replay for p in plugins if p.overrides("replay")})

    async def flush_all() -> None:
        for plugin in [*gw.chain.plugins, *gw.retired_plugins]:
            await plugin.flush()

    journal.start(flush_all)
    gw.chain.journal = journal
    return journal


SERVICES = web.AppKey("services", Services)
CONFIG_POLL_SECONDS = 1.0


async def reload_config(app: web.Application, reason: str = "manual") -> bool:
    """Validate config.yaml and, if valid, swap it in atomically. In-flight requests finish
    on the snapshot they started with. Invalid: keep serving the last good config."""
    gw, services = app[GATEWAY], app[SERVICES]
    if gw.config_path is None:
        return False
    loop = asyncio.get_running_loop()
    try:
        new = await loop.run_in_executor(None, check_config, gw.config_path)
    except ConfigError as exc:
        log.error("config_reload_rejected", reason=reason, path=gw.config_path, errors=exc.errors,
                  keeping="the last good config")
        return False
    old = gw.config
    changes = config_changes(old, new)
    if not changes:
        log.info("config_reload_unchanged", reason=reason)
        return True
    for section, keys in RESTART_ONLY.items():
        changed = [k for k in keys if getattr(getattr(old, section), k) != getattr(getattr(new, section), k)]
        if changed:
            log.warning("config_change_needs_restart", section=section, keys=changed)
    # Reuse plugin instances whose entry did not change (they keep queues, metrics, caches);
    # build and start the others. Replaced ones are shut down when the gateway stops.
    # A plugin whose start-up depends on a changed section is rebuilt too.
    rebuild = {"rate_limit"} if old.rate_limits.redis_url != new.rate_limits.redis_url else set()
    current = {(p.name, repr(e.settings)): p
               for p, e in zip(gw.chain.plugins, [e for e in old.plugins if e.enabled]) if p.name not in rebuild}
    plugins: list[Plugin] = []
    started: list[Plugin] = []
    previous_config, services.config = services.config, new  # new plugins start on the new config
    try:
        for entry in (e for e in new.plugins if e.enabled):
            key = (plugin_class(entry.name).name, repr(entry.settings))
            plugin = current.pop(key, None)
            if plugin is None:
                plugin = build_plugins([entry], services)[0]
                await plugin.startup()
                started.append(plugin)
                if plugin.routes():
                    log.warning("config_change_needs_restart", plugin=entry.name, why="its HTTP routes")
            plugins.append(plugin)
    except Exception:
        log.exception("config_reload_failed", reason=reason)
        services.config = previous_config
        for plugin in started:
            await plugin.shutdown()
        return False
    gw.retired_plugins.extend(current.values())
    services.plugins = plugins
    if gw.directory is not None:
        gw.directory.ttl = new.auth.cache_ttl
    gw.snapshot = Snapshot(new, Chain(plugins, inflight=gw.chain.inflight, journal=gw.chain.journal))
    log.info("config_reloaded", reason=reason, changes=changes)
    return True


async def _watch_config_file(app: web.Application, path: str) -> None:
    """Reload when the file's mtime or size changes (editors replace files; no inotify)."""
    def stamp() -> tuple[float, int] | None:
        try:
            st = os.stat(path)
            return (st.st_mtime, st.st_size)
        except OSError:
            return None

    last = stamp()
    while True:
        await asyncio.sleep(CONFIG_POLL_SECONDS)
        now = stamp()
        if now is not None and now != last:
            last = now
            await reload_config(app, reason="file changed")


async def admin_config(request: web.Request) -> web.Response:
    """GET /admin/config: the effective config, secrets redacted. Master key only."""
    gw = request.app[GATEWAY]
    token = bearer_token(request.headers.get("Authorization"))
    if token is None or not is_master_key(token, gw.config.auth.master_key):
        raise ApiError(401 if token is None else 403, "GET /admin/config needs the master key",
                       code="invalid_api_key" if token is None else "forbidden")
    return _json_response(200, redacted_config(gw.config), {})


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def configure_logging(level: str = "info") -> None:
    from gateway import logs

    logs.configure(level)


def _serve(args: argparse.Namespace) -> int:
    try:
        config = check_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    configure_logging()
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    workers = args.workers if args.workers is not None else config.server.workers
    log.info("gateway_starting", host=host, port=port, workers=workers, models=config.model_names(),
             plugins=[p.name for p in config.plugins if p.enabled], store=config.store.url.split("?")[0].split("@")[-1])
    if workers > 1:
        if port == 0:
            print("workers > 1 needs a fixed port", file=sys.stderr)
            return 1
        if any(p.name == "rate_limit" and p.enabled for p in config.plugins) and not config.rate_limits.redis_url:
            log.warning("rate_limits_per_process", hint="set rate_limits.redis_url so limits are shared by workers")
        return _supervise(args, config, host, port, workers)
    _run_worker(config, str(args.config), host, port, reuse_port=False)
    log.info("gateway_stopped")
    _leave_despite_blocked_threads()
    return 0


def _leave_despite_blocked_threads(wait: float = 2.0) -> None:
    """The store is closed and every ending ran; only threads still inside a blocking
    call (a litellm call the router gave up on) remain. Python would join them at exit,
    however long they take: shutdown must end within shutdown_grace, so leave without them."""
    import threading

    deadline = time.monotonic() + wait
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if stuck:
        log.warning("exit_without_blocked_threads", threads=stuck[:10], count=len(stuck))
        from gateway import logs

        logs.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def ready_line(config: Config, config_path: str, base: str) -> str:
    """The one human line printed once the gateway listens (the JSON logs carry the rest)."""
    store_shown = re.sub(r"(//[^/:@]*):[^/@]*@", r"\1@", config.store.url.split("?")[0])  # no password
    missing: dict[str, list[str]] = {}
    for entry in config.models:
        env = config.missing_key(entry)  # its api_key names an unset variable
        if env is not None:
            missing.setdefault(env, []).append(entry.name)
    keys = "; ".join(f"{', '.join(dict.fromkeys(names))} (no {env})" for env, names in missing.items())
    return (f"gateway ready on {base} · config {config_path} · store {store_shown} · "
            f"{len(config.model_names())} models" + (f", without keys: {keys}" if keys else "") +
            f" · dashboard {base}/dashboard")


def _run_worker(config: Config, config_path: str, host: str, port: int, *, reuse_port: bool) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    def print_ready(aiohttp_banner: str) -> None:  # "Running on http://host:port", the bound port
        bound = re.findall(r"https?://[^\s,]+", aiohttp_banner)
        # stderr: stdout carries one JSON log object per line, for log shippers.
        print(ready_line(config, config_path, bound[0] if bound else f"http://{host}:{port}"), file=sys.stderr,
              flush=True)

    web.run_app(create_app(config, config_path=config_path), host=host, port=port, reuse_port=reuse_port,
                shutdown_timeout=config.server.shutdown_grace, access_log=None, handle_signals=True,
                print=print_ready)


def _supervise(args: argparse.Namespace, config: Config, host: str, port: int, workers: int) -> int:
    """`server.workers: N`: N forked processes share the port (SO_REUSEPORT); the kernel
    spreads connections. State that must be exact (energy, usage) lives in the store, rate
    limits in Redis. This process forwards SIGTERM/SIGINT/SIGHUP and restarts a worker that
    dies unexpectedly."""
    children: dict[int, int] = {}
    stopping = False
    exit_codes: list[int] = []

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 0
            try:
                # A worker restarted after live edits must serve the file as it is now.
                try:
                    current = check_config(args.config)
                except ConfigError:
                    current = config
                _run_worker(current, str(args.config), host, port, reuse_port=True)
            except BaseException:  # noqa: BLE001 — report, then leave without running parent code
                log.exception("worker_crashed", slot=slot)
                code = 1
            os._exit(code)
        children[pid] = slot

    def forward(signum: int, frame: Any) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for slot in range(workers):
        spawn(slot)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        slot = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if stopping or slot is None:
            exit_codes.append(code)
            continue
        log.warning("worker_exited", slot=slot, pid=pid, exit_code=code, restarting=True)
        time.sleep(1)
        if not stopping:
            spawn(slot)
    log.info("gateway_stopped", workers=workers, exit_codes=exit_codes)
    # A worker still starting when SIGTERM came (before its loop installed the handler, e.g.
    # one just restarted) dies of the signal itself: it served nothing, so that is clean too.
    return 0 if all(c in (0, -signal.SIGTERM) for c in exit_codes) else 1


def _check(args: argparse.Namespace) -> int:
    try:
        config = check_config(args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.file}: OK ({len(config.model_names())} models, {len(config.tiers)} tiers, "
          f"{len(config.plugins)} plugins)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy.py", description="OpenAI-compatible AI gateway")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gateway (default)")
    serve.add_argument("--config", default=os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG))
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="processes sharing the port (default: server.workers)")
    serve.set_defaults(func=_serve)
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", nargs="?", default=os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG))
    check.set_defaults(func=_check)
    try:
        from gateway import admin_cli
    except ImportError:
        admin_cli = None
    if admin_cli is not None:
        admin_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["serve", *argv]
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
