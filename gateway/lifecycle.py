"""The request lifecycle every inbound API shares: a context per request, the chain around
it (request hooks, exactly one ending), the model choice and the gate, then the answer:
`answer_json` for a whole answer, `relay_stream` for a stream.

An inbound adapter (`Inbound`; gateway/inbound/) says how its wire format writes answers,
stream events and errors; the lifecycle itself speaks no wire format but OpenAI's default.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import secrets
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import orjson
import structlog
from aiohttp import web

from gateway import chat_stream
from gateway.client_body import read_json, require_model
from gateway.errors import ApiError, internal_error
from gateway.providers.base import Relayed, StreamEnd, UpstreamError
from gateway.router import upstream_to_api_error
from gateway.batches import owned_files, refers_to_file
from gateway.state import GATEWAY, Gateway, Snapshot
from gateway.usage import record_unbilled_call, usage_from_payload
from plugins.base import RequestContext, Usage

log = structlog.get_logger("gateway")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


class Inbound:
    """One wire format a client speaks: how its answers, stream events and errors are
    written. This base is OpenAI's (chat completions, embeddings); gateway/inbound/ holds
    the others (Anthropic Messages, Responses)."""

    name = "openai"

    def error_body(self, err: ApiError) -> dict[str, Any]:
        return err.body()

    def answer_body(self, ctx: RequestContext, payload: dict[str, Any], raw: dict[str, Any] | None) -> dict[str, Any]:
        """The JSON the client gets: `payload` is the OpenAI form the chain saw, `raw` the
        upstream's own answer when it was passed through in the client's format."""
        return payload

    def stream_encoder(self, ctx: RequestContext) -> Any:
        """None for OpenAI's SSE chunks; else an object with chunk(), flush(), done()."""
        return None

    def error_event(self, err: ApiError) -> bytes:
        return b"data: " + orjson.dumps(err.body()) + b"\n\n"


OPENAI = Inbound()


_REQUEST_ID_PREFIX = "req_" + secrets.token_hex(6)
_request_counter = itertools.count(1)


def _new_request_id_prefix() -> None:
    global _REQUEST_ID_PREFIX, _request_counter
    _REQUEST_ID_PREFIX = "req_" + secrets.token_hex(6)
    _request_counter = itertools.count(1)


os.register_at_fork(after_in_child=_new_request_id_prefix)  # forked workers must not collide


def new_request_id(request: web.Request) -> str:
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
    ctx.action = clean_text(action) if action else None
    ctx.prospect_id = clean_text(prospect) if prospect else None


def clean_text(value: Any) -> str:
    """At most 128 characters of valid UTF-8 (aiohttp turns non-UTF-8 header bytes into
    lone surrogates, which would break every later encode)."""
    return str(value)[:128].encode("utf-8", "replace").decode("utf-8")


def new_context(request: web.Request, snap: Snapshot, endpoint: str, body: dict[str, Any]) -> RequestContext:
    config = snap.config  # the snapshot this request keeps to its end
    ctx = RequestContext(request_id=new_request_id(request), endpoint=endpoint,  # type: ignore[arg-type]
                         config=config, headers=request.headers, body=body)
    ctx.response_headers["X-Request-Id"] = ctx.request_id
    client_id = request.headers.get("X-Request-Id", "")
    if client_id and _REQUEST_ID_OK.match(client_id):
        ctx.response_headers["X-Client-Request-Id"] = client_id
    return ctx


# --------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------

def json_response(status: int, payload: dict[str, Any], headers: dict[str, str]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json",
                        headers=headers)


def error_response(err: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    merged = {**(headers or {}), **err.headers}
    return json_response(err.status, err.body(), merged)


async def send_now(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Send now (so endings can run after the client has the answer)."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except (ConnectionError, asyncio.CancelledError):
        pass  # the client left; the request still ends normally
    return response


def usage_from(payload: dict[str, Any]) -> Usage | None:
    """Token classes included (cached, cache write, reasoning, audio): gateway/usage.py."""
    return usage_from_payload(payload)


async def fail(request: web.Request, snap: Snapshot, ctx: RequestContext, err: ApiError,
               inbound: Inbound = OPENAI) -> web.StreamResponse:
    """Error endings run before the error is sent, so a refund shows in its headers."""
    await snap.chain.end(ctx, err)
    return await send_now(request, json_response(err.status, inbound.error_body(err),
                                                 {**ctx.response_headers, **err.headers}))


async def run_request(request: web.Request, snap: Snapshot, ctx: RequestContext,
               answer: Callable[[], Awaitable[web.StreamResponse]],
               read_body: Callable[[], Awaitable[None]] | None = None,
               inbound: Inbound = OPENAI) -> web.StreamResponse:
    """The chain around one request: request hooks (the body read before the first one
    that needs it), `answer()`, exactly one ending. With tracing on, the request's server
    span opens here and closes once its answer or error is sent (gateway/telemetry.py)."""
    snap.chain.enter(ctx)
    if snap.telemetry is not None:
        ctx.trace = snap.telemetry.start(ctx, request)
    try:
        await snap.chain.run_request(ctx, read_body)
        if ctx.short_circuit is None and ctx.billed:
            if not ctx.candidates:
                raise ApiError(404, f"The model '{ctx.requested_model}' does not exist or you do not have access to it.",
                               code="model_not_found", param="model")
            choose_model(ctx)
            if ctx.cache_hit is not None:
                _serve_cache_hit(ctx)
        return await answer()
    except ApiError as err:
        if ctx.ended_at is not None:  # the stream already ended itself
            raise
        return await fail(request, snap, ctx, err, inbound)
    except asyncio.CancelledError:
        await snap.chain.end(ctx, ApiError(499, "the request was cancelled", type="server_error", code="cancelled"))
        raise
    except Exception:
        log.exception("request_failed", request_id=ctx.request_id)
        if ctx.ended_at is not None:
            raise
        return await fail(request, snap, ctx, internal_error(ctx.request_id), inbound)
    finally:
        if ctx.trace is not None:
            ctx.trace.finish(ctx)


def _serve_cache_hit(ctx: RequestContext) -> None:
    """The response cache's answer serves the request if it is for the model the request
    hooks settled on (energy may have moved it to a cheaper one it could afford)."""
    if ctx.model == ctx.cache_hit_model:
        ctx.short_circuit = ctx.cache_hit
        ctx.response_headers["X-Cache"] = "HIT"
    else:
        ctx.cache_hit = None
        ctx.response_headers["X-Cache"] = "MISS"
    if ctx.trace is not None:
        ctx.trace.event("gateway.cache", {"gateway.cache_hit": ctx.short_circuit is not None,
                                          "gateway.model": ctx.model})


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


def choose_model(ctx: RequestContext) -> None:
    ctx.model = ctx.candidates[0]
    if ctx.conversation:
        _bound_output_tokens(ctx)
    if ctx.model != ctx.requested_model:
        ctx.downgraded_from = ctx.requested_model
        ctx.response_headers["X-Model-Downgraded-From"] = ctx.requested_model
        if ctx.downgrade_reason:
            ctx.response_headers["X-Model-Downgrade-Reason"] = ctx.downgrade_reason
        if ctx.trace is not None:
            ctx.trace.event("gateway.downgrade", {"gateway.downgraded_from": ctx.requested_model,
                                                  "gateway.model": ctx.model,
                                                  "gateway.downgrade_reason": ctx.downgrade_reason})


async def pass_gate(ctx: RequestContext, dispatched: str, answer: dict[str, Any] | None) -> bool:
    """Wait for a request hook's overlapped check (`ctx.gate`, see plugins/base.py);
    raises its error. True when it moved the request to another model: dispatch again.
    Either way the upstream's `answer` (a stream's first chunk) is discarded, and the call
    is kept on `ctx.unbilled_calls`: the provider bills it, the usage row records it.

    `dispatched` is the model dispatch started with; `ctx.model` is the one that served
    (a fallback, perhaps). The gate moved the request only if it chose neither: comparing
    with the server alone re-ran the whole retry-and-fallback chain of a request a
    fallback had served (the upstream saw every attempt twice)."""
    gate, ctx.gate = ctx.gate, None
    error = await asyncio.shield(gate)  # a gate is resolved by its plugin, never cancelled by us
    if error is not None:
        if ctx.trace is not None:
            ctx.trace.gate(error.code or error.type, None)
        record_unbilled_call(ctx, answer)
        raise error
    if ctx.candidates and ctx.candidates[0] not in (dispatched, ctx.model):
        if ctx.trace is not None:
            ctx.trace.gate("moved", ctx.candidates[0])
        record_unbilled_call(ctx, answer)
        choose_model(ctx)
        return True
    if ctx.trace is not None:
        ctx.trace.gate("passed", None)
    return False


def finish_success(ctx: RequestContext, payload: dict[str, Any]) -> None:
    payload["model"] = ctx.model  # the public model that actually served it
    ctx.response = payload
    ctx.usage = usage_from(payload)
    ctx.status = 200


Dispatch = Callable[[RequestContext], Awaitable[dict[str, Any]]]


async def answer_json(request: web.Request, gw: Gateway, snap: Snapshot, ctx: RequestContext,
                      inbound: Inbound = OPENAI, dispatch: Dispatch | None = None) -> web.StreamResponse:
    """A whole answer, for every inbound API: `dispatch` (the router's chat by default;
    embeddings, a Responses create), again if the gate moved the request; the chain's view
    of it, the journal, the client's JSON in its wire format, the ending behind it."""
    dispatch = dispatch or gw.router.chat
    dispatched = ctx.model
    payload = ctx.short_circuit if ctx.short_circuit is not None else await dispatch(ctx)
    if ctx.gate is not None and await pass_gate(ctx, dispatched, payload):
        payload = await dispatch(ctx)
    finish_success(ctx, payload)
    ctx.first_byte_at = time.monotonic()
    snap.chain.answered(ctx)
    payload = inbound.answer_body(ctx, payload, payload.raw if isinstance(payload, Relayed) else None)
    response = await send_now(request, json_response(200, payload, ctx.response_headers))
    await snap.chain.end(ctx, wait=False)
    return response


_SSE_DONE = b"data: [DONE]\n\n"


async def open_gated(ctx: RequestContext, open_stream: Callable[[RequestContext], Awaitable[tuple[Any, Any]]]
                     ) -> tuple[Any, Any]:
    """Open the upstream stream (retried until its first piece), then pass the gate: nothing
    reaches the client before it passed; a gate that moved the request opens it again."""
    dispatched = ctx.model
    first, upstream = await open_stream(ctx)
    if ctx.gate is not None:
        try:  # a stream's first chunk: what the discarded call is counted by
            moved = await pass_gate(ctx, dispatched, first if isinstance(first, dict) else None)
        except BaseException:
            await close_quietly(upstream)
            raise
        if moved:
            await close_quietly(upstream)
            first, upstream = await open_stream(ctx)
    return first, upstream


def event_stream(ctx: RequestContext) -> "EventStream":
    """The SSE response every inbound API's stream is written to."""
    return EventStream(status=200, headers={
        **ctx.response_headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})


class EventStream(web.StreamResponse):
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


class StreamRelay:
    """How one inbound API's stream is relayed (the OpenAI chat one here; Anthropic's through
    an encoder of the chunks; the Responses API's in gateway/inbound/responses.py): each
    upstream piece observed into the context and encoded for the client, the piece that makes
    the answer whole recognised, its error events written. `relay_stream` runs the rest, the
    same for every API: the SSE response, the journal before the answer's end leaves, the
    billing rule when it is cut, exactly one ending."""

    # Why a stream cut short (the upstream ended early) is not a whole answer.
    truncated = "the upstream stream ended before every choice finished"
    cancelled = "cancelled before the stream started"

    def __init__(self, ctx: RequestContext, chain: Any, inbound: Inbound = OPENAI) -> None:
        self.ctx = ctx
        self.chain = chain
        self.inbound = inbound
        self.encoder = inbound.stream_encoder(ctx)
        self.end = StreamEnd()
        self.final = False  # the piece just observed made the answer whole (it is journaled, then sent)
        self.failed: ApiError | None = None  # the upstream said it failed (its event is sent, then the error)

    async def piece(self, chunk: dict[str, Any]) -> bytes:
        """Observe one upstream piece; the bytes the client gets for it (may be none)."""
        ctx = self.ctx
        if chunk.get("usage"):
            ctx.usage = usage_from(chunk)
        if ctx.stream_assembler is not None:  # the whole answer, rebuilt (idempotency keeps it)
            ctx.stream_assembler.add(chunk)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                ctx.streamed_text.append(content)
            elif delta.get("reasoning_content"):
                ctx.streamed_reasoning.append(delta["reasoning_content"])
            if choice.get("finish_reason"):
                ctx.finish_reason = choice["finish_reason"]
        self.end.observe(chunk)
        if not ctx.client_wants_usage:
            if not chunk.get("choices"):  # the usage-only chunk the client did not ask for
                # (a passed-through piece's own event still goes out)
                return b"" if self.encoder is None else self.encoder.unsent(chunk)
            chunk.pop("usage", None)
        chunk["model"] = ctx.model
        if self.chain.wants_chunks:
            await self.chain.run_chunk(ctx, chunk)
        if self.encoder is None:
            return b"data: " + orjson.dumps(chunk) + b"\n\n"
        return self.encoder.chunk(chunk)

    def complete(self) -> bool:
        """The upstream ended: was the answer whole (every choice finished)?"""
        return self.end.complete

    def done(self) -> bytes:
        return _SSE_DONE if self.encoder is None else self.encoder.done()

    def error_event(self, err: ApiError) -> bytes:
        return self.inbound.error_event(err)

    def billed_if_cut(self) -> bool:
        """A client gone mid-stream is billed when tokens reached (or were produced for) it."""
        return self.ctx.stream_started


async def answer_stream(request: web.Request, gw: Gateway, snap: Snapshot, ctx: RequestContext,
                        inbound: Inbound = OPENAI) -> web.StreamResponse:
    """A chat answer as a stream: OpenAI's chunks as they come, or, with the inbound
    adapter's encoder (another API's, e.g. gateway/inbound/anthropic.py), its events."""
    if ctx.short_circuit is not None:
        upstream: Any = _replayed_stream(ctx.short_circuit)
        first = await upstream.__anext__()
    else:
        # Always ask for usage; the extra chunk is hidden from clients that did not.
        options = dict(ctx.body.get("stream_options") or {})
        options["include_usage"] = True
        ctx.body["stream_options"] = options
        first, upstream = await open_gated(ctx, gw.router.open_stream)  # retried; nothing sent yet
    return await relay_stream(request, snap, ctx, StreamRelay(ctx, snap.chain, inbound), first, upstream)


async def relay_stream(request: web.Request, snap: Snapshot, ctx: RequestContext, relay: StreamRelay,
                       first: Any, upstream: Any) -> web.StreamResponse:
    """The one stream relay of every inbound API: `first` and the rest of `upstream`
    through `relay` to the client, as they come. The answer is journaled before its end
    leaves; a stream that breaks gets an error event, never a clean end; exactly one ending,
    run behind the answer, also when the client leaves (billed by `relay.billed_if_cut`)."""
    chain = snap.chain
    response = event_stream(ctx)
    error: ApiError | None = None
    piece: Any = first
    try:
        await response.prepare(request)
        while piece is not None:
            data = await relay.piece(piece)
            if relay.final and ctx.status != 200:  # whole: journaled before its end leaves
                ctx.status = 200
                chain.answered(ctx)
            if data:
                await response.write(data)
                if ctx.first_byte_at is None:
                    ctx.first_byte_at = time.monotonic()
                    ctx.stream_started = True
            if relay.failed is not None:
                error = relay.failed
                break
            if relay.final:
                break
            try:
                piece = await upstream.__anext__()
            except StopAsyncIteration:
                piece = None
        if error is None and ctx.status != 200:
            if not relay.complete():
                raise UpstreamError("truncated", relay.truncated)
            ctx.status = 200
            chain.answered(ctx)
            await response.write(relay.done())
    except UpstreamError as err:
        error = upstream_to_api_error(err, ctx.attempts)
        if err.kind == "truncated":
            error = ApiError(502, "the upstream stream broke off before the answer was complete",
                             type="server_error", code="upstream_stream_truncated")
        await write_raw(response, ctx, relay.error_event(error))
    except (ConnectionError, RuntimeError):  # the client went away mid-stream
        ctx.client_disconnected = True
    except ApiError as err:
        error = err
        await write_raw(response, ctx, relay.error_event(err))
    except Exception:
        log.exception("stream_failed", request_id=ctx.request_id)
        error = internal_error(ctx.request_id)
        await write_raw(response, ctx, relay.error_event(error))
    except asyncio.CancelledError:
        ctx.client_disconnected = True
        await close_quietly(upstream)
        await chain.end(ctx, None if relay.billed_if_cut() else
                        ApiError(499, relay.cancelled, type="server_error", code="cancelled"))
        raise
    finally:
        await close_quietly(upstream)
    if error is not None:
        ctx.status = None
    try:
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        ctx.client_disconnected = True
    # The answer (or its error event) is sent: the ending runs behind it.
    await chain.end(ctx, error, wait=False)
    return response


async def close_quietly(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is None:
        return
    try:
        await asyncio.shield(close())
    except (Exception, asyncio.CancelledError):
        pass


BodyCheck = Callable[..., None]  # (body, the model's extra params[, the caller's own file ids])


def body_reader(request: web.Request, snap: Snapshot, ctx: RequestContext, validate: BodyCheck,
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
        try:
            validate(body, snap.config.extra_params(model))
        except ApiError as refused:
            if not refers_to_file(refused):
                raise
            # Only a body naming a file pays for this: the caller's own files pass, on the
            # deployments that reach the account holding them (gateway/batches.py).
            owned = await owned_files(request.app[GATEWAY].store, ctx, body, model)
            if not owned:
                raise
            validate(body, snap.config.extra_params(model), owned)
        ctx.body = body
        ctx.requested_model = ctx.model = model
        ctx.candidates = [model] if snap.config.deployments(model) else []
        _take_gateway_fields(ctx, request)
        ctx.stream = bool(body.get("stream"))
        ctx.client_wants_usage = ctx.stream and bool((body.get("stream_options") or {}).get("include_usage"))

    return read_body


async def write_raw(response: web.StreamResponse, ctx: RequestContext, data: bytes) -> None:
    try:
        await response.write(data)
    except (ConnectionError, RuntimeError):
        ctx.client_disconnected = True
