"""`POST /v1/responses`: OpenAI's Responses API, passed through to OpenAI-wire deployments.

Clients of the Responses API (the OpenAI Agents SDK, Codex, `client.responses.create`)
get the whole chain (auth, energy, tiers, downgrades, idempotency, usage rows) around an
upstream that serves `/responses` itself: the request body (only the API's own
parameters, `gateway/client_body.py`) goes out as it came, the answer or its SSE events
come back as the upstream sent them, and the usage (cached and reasoning tokens included)
is read from the `response` object or the stream's `response.completed` event.

A model whose deployments are not OpenAI-wire (served through litellm: Anthropic, Bedrock,
...) answers a 400 naming it: use /v1/chat/completions or /v1/messages for those.
`background: true` is refused (its cost could not be settled with the request), and so are
ids of objects stored at the upstream (`conversation`, `item_reference`, file, vector-store,
prompt and container ids: gateway/object_ids.py), where the gateway cannot tell whose they are.

A response the upstream stores (`store` is not false) is recorded in the gateway's store
(`stored_responses`: its id, the user, the model, the upstream's base URL), so that
`GET /v1/responses/{id}`, `GET /v1/responses/{id}/input_items` and
`DELETE /v1/responses/{id}` go to the upstream that holds it, and `previous_response_id`
continues it there, only for the user who created it: another user's id is a 404, as if
it did not exist (an upstream account shared by every tenant would otherwise hand one
user's conversation to another who learned its id).
"""

from __future__ import annotations

import re
from typing import Any, AsyncIterator, Callable

import orjson
import structlog
from aiohttp import web

from gateway.config import ModelEntry
from gateway.providers.base import UpstreamError
from gateway.client_body import validate_responses
from gateway.errors import ApiError, store_unavailable
from gateway.lifecycle import (
    StreamRelay,
    answer_json,
    body_reader,
    json_response,
    new_context,
    open_gated,
    relay_stream,
    run_request,
    send_now,
    usage_from,
)
from gateway.router import upstream_to_api_error, uses_native
from gateway.state import GATEWAY, Gateway, Snapshot
from plugins.base import RequestContext
from gateway.providers.openai import OPENAI_DEFAULT_BASE, RESPONSES_FAILED, RESPONSES_TERMINAL

log = structlog.get_logger("gateway.responses")

TERMINAL = RESPONSES_TERMINAL  # a whole answer (incomplete: max tokens)
FAILED = RESPONSES_FAILED
_RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
_ITEM_QUERY = ("after", "before", "limit", "order", "include[]", "include")  # input_items' parameters
_UPSTREAM = "responses"  # ctx.scratch namespace: the upstream that answered


def upstream_of(deployment: ModelEntry) -> str:
    """Where a deployment's stored responses live: its base URL (not its key, so that a
    rotated provider key still reaches what was stored before)."""
    return (deployment.litellm_params.api_base or OPENAI_DEFAULT_BASE).rstrip("/")


def _caller(ctx: Any) -> tuple[str, str]:
    identity = ctx.identity
    return ("", "") if identity is None else (identity.user_id, identity.workspace_id)


def _not_found(response_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No response with id '{response_id}' was found.", type="invalid_request_error",
                    param=param, code="response_not_found")


async def _owned(store: Any, ctx: Any, response_id: str, param: str | None = None) -> dict[str, Any]:
    """The stored response's record if the caller created it; else 404, whoever's it is
    (503 when the store cannot say: fails closed, and worth retrying)."""
    try:
        record = await store.stored_response(response_id) if _RESPONSE_ID.fullmatch(response_id) else None
    except Exception as exc:  # noqa: BLE001 — whatever the backend raises: the owner is unknown
        log.warning("stored_response_lookup_failed", request_id=ctx.request_id, error=type(exc).__name__)
        raise store_unavailable(ctx.request_id) from None
    if record is None or record["user_id"] != _caller(ctx)[0]:
        raise _not_found(response_id, param)
    return record


async def previous_upstream(store: Any, ctx: Any) -> Callable[[ModelEntry], bool] | None:
    """For a body with `previous_response_id`: the caller's own response, continued on the
    upstream that holds it (a filter of deployments for the router); None without one."""
    previous = ctx.body.get("previous_response_id")
    if previous is None:
        return None
    upstream = (await _owned(store, ctx, previous, "previous_response_id"))["upstream"]
    if not any(upstream_of(d) == upstream for d in ctx.config.deployments(ctx.model)):
        raise ApiError(400, f"The previous response '{previous}' is stored at an upstream that model "
                            f"'{ctx.model}' is not served by; continue it with the model that created it.",
                       param="previous_response_id", code="previous_response_elsewhere")
    return lambda deployment: upstream_of(deployment) == upstream


async def remember(store: Any, ctx: Any, payload: dict[str, Any]) -> None:
    """Record a response the upstream stored, before the client can ask for it again.
    Fails open: the answer stands (and is billed) if the record cannot be written."""
    response_id = payload.get("id")
    if not isinstance(response_id, str) or payload.get("store") is False or _UPSTREAM not in ctx._scratch:
        return
    user_id, workspace_id = _caller(ctx)
    try:
        await store.remember_response(response_id, user_id, workspace_id, ctx.model,
                                      ctx.scratch(_UPSTREAM)["upstream"])
    except Exception as exc:
        log.warning("stored_response_not_recorded", request_id=ctx.request_id, error=type(exc).__name__)


async def stored(router: Any, store: Any, ctx: Any, method: str, response_id: str, tail: str = "",
                 query: dict[str, str] | None = None) -> dict[str, Any]:
    """GET or DELETE a stored response (or GET its input items, `tail`), at the upstream
    that holds it, for the user who created it."""
    record = await _owned(store, ctx, response_id)
    config = ctx.config
    names = [record["model"], *(m for m in config.model_names() if m != record["model"])]
    deployments = [d for m in names for d in config.deployments(m)
                   if upstream_of(d) == record["upstream"] and router.dispatcher_for(d).serves_responses]
    if not deployments:
        raise ApiError(404, f"The response '{response_id}' is stored at an upstream no configured model uses "
                            f"any more.", type="invalid_request_error", code="response_not_found")
    args = "&".join(f"{k}={v}" for k, v in (query or {}).items() if k in _ITEM_QUERY and re.fullmatch(
        r"[A-Za-z0-9_.,\-]{1,200}", v))
    for deployment in deployments:  # the same upstream under several keys: the one that has it
        try:
            payload = await router.dispatcher_for(deployment).responses_stored(deployment, method, response_id,
                                                                               tail, args)
        except UpstreamError as err:
            if err.status == 404:
                continue
            raise upstream_to_api_error(err, 1) from None
        if payload.get("object") == "response":
            payload["model"] = record["model"]
        if method == "DELETE":
            await store.forget_response(response_id)
            log.info("stored_response_deleted", request_id=ctx.request_id, response_id=response_id,
                     user_id=record["user_id"], model=record["model"])
        return payload
    raise _not_found(response_id)


def _require_native(router: Any, model: str, deployment: ModelEntry) -> None:
    if not uses_native(deployment) or not router.dispatcher_for(deployment).serves_responses:
        raise ApiError(400, f"The model '{model}' is not served over the Responses API by this gateway; "
                            f"use /v1/chat/completions (or /v1/messages) for it.", param="model",
                       code="responses_not_supported")


async def create(router: Any, ctx: Any, only: Callable[[ModelEntry], bool] | None = None) -> dict[str, Any]:
    """A non-streamed response, retried and fallen back like a chat completion (on the
    deployments `only` accepts: see previous_upstream)."""

    async def call(model: str, deployment: ModelEntry) -> dict[str, Any]:
        _require_native(router, model, deployment)
        payload = await router.dispatcher_for(deployment).responses_create(deployment, ctx.body)
        ctx.scratch(_UPSTREAM)["upstream"] = upstream_of(deployment)
        return payload

    return await router.attempts(ctx, call, only)


async def open_stream(router: Any, ctx: Any, only: Callable[[ModelEntry], bool] | None = None) -> tuple[
        tuple[str, dict[str, Any], bytes], AsyncIterator]:
    """Retries until the upstream sent its first event; returns it and the rest."""

    async def call(model: str, deployment: ModelEntry) -> Any:
        _require_native(router, model, deployment)
        ctx.scratch(_UPSTREAM)["upstream"] = upstream_of(deployment)
        stream = router.dispatcher_for(deployment).responses_events(deployment, ctx.body)
        try:
            first = await router.timed(deployment, stream.__anext__(), "first_byte")
        except StopAsyncIteration:
            raise UpstreamError("truncated", "the upstream stream ended before any event") from None
        except BaseException:
            await stream.aclose()
            raise
        return first, stream

    return await router.attempts(ctx, call, only)


def error_event(err: ApiError) -> bytes:
    """The Responses API's stream error event."""
    body = err.body()["error"]
    return b"event: error\ndata: " + orjson.dumps({"type": "error", "code": body.get("code"),
                                                   "message": body["message"], "param": body.get("param")}) + b"\n\n"


def replay_events(payload: dict[str, Any]) -> list[bytes]:
    """A stored response (an idempotent replay) as the two events that carry it whole."""
    return [b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, "sequence_number": i,
                                                                       "response": payload}) + b"\n\n"
            for i, name in enumerate(("response.created", "response.completed"))]


async def responses_create(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses (gateway/inbound/responses.py): passed through, the chain around it."""
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = new_context(request, snap, "responses", {})
    ctx.inbound = "responses"

    async def answer() -> web.StreamResponse:
        only = None if ctx.short_circuit is not None else await previous_upstream(gw.store, ctx)
        if ctx.stream:
            return await _responses_stream(request, gw, snap, ctx, only)

        async def dispatch(ctx: RequestContext) -> dict[str, Any]:
            payload = await create(gw.router, ctx, only)
            await remember(gw.store, ctx, payload)  # whose it is, also if the gate moves on
            return payload

        return await answer_json(request, gw, snap, ctx, dispatch=dispatch)

    return await run_request(request, snap, ctx, answer, body_reader(request, snap, ctx, validate_responses))


class ResponsesRelay(StreamRelay):
    """The Responses API's events, forwarded as they come (the upstream's own bytes); the
    answer is whole at `response.completed` (or `response.incomplete`: max tokens) and billed
    only then, refunded otherwise; `response.failed` or `error` is an upstream failure."""

    truncated = "the upstream stream ended before response.completed"
    cancelled = "cancelled before the answer was complete"

    def __init__(self, ctx: RequestContext, chain: Any, store: Any) -> None:
        super().__init__(ctx, chain)
        self.store = store  # None on a replay: the stored response is already remembered

    async def piece(self, event: tuple[str, dict[str, Any], bytes]) -> bytes:
        name, data, raw = event
        ctx = self.ctx
        if name == "response.output_text.delta" and isinstance(data.get("delta"), str):
            ctx.streamed_text.append(data["delta"])
        elif name == "response.created" and self.store is not None and isinstance(data.get("response"), dict):
            await remember(self.store, ctx, data["response"])
        if name in TERMINAL:
            if isinstance(data.get("response"), dict):  # the answer, as an idempotent replay gives it back
                ctx.response = {**data["response"], "model": ctx.model}
            ctx.usage = usage_from(data.get("response") or {})
            ctx.finish_reason = "stop" if name == "response.completed" else "length"
            self.final = True
        elif name in FAILED:
            self.failed = ApiError(502, "the upstream failed the response", type="server_error", code="upstream_error")
        return raw

    def complete(self) -> bool:
        return False  # the upstream ended without its terminal event

    def done(self) -> bytes:
        return b""

    def error_event(self, err: ApiError) -> bytes:
        return error_event(err)

    def billed_if_cut(self) -> bool:
        return self.ctx.stream_started and self.ctx.status == 200


async def _replayed_events(payload: dict[str, Any]) -> AsyncIterator[tuple[str, dict[str, Any], bytes]]:
    """A stored response (an idempotent replay), whole, as its two events."""
    created, completed = replay_events(payload)
    yield "response.created", {}, created
    yield "response.completed", {"response": payload}, completed


async def _responses_stream(request: web.Request, gw: Gateway, snap: Snapshot, ctx: RequestContext,
                            only: Callable[[Any], bool] | None) -> web.StreamResponse:
    """The Responses API's events through the one stream relay (gateway/lifecycle.py)."""
    if ctx.short_circuit is not None:
        upstream: Any = _replayed_events(ctx.short_circuit)
        first = await upstream.__anext__()
        store = None
    else:
        first, upstream = await open_gated(ctx, lambda ctx: open_stream(gw.router, ctx, only))
        store = gw.store
    return await relay_stream(request, snap, ctx, ResponsesRelay(ctx, snap.chain, store), first, upstream)


async def stored_response(request: web.Request) -> web.StreamResponse:
    """GET/DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items: at the upstream
    that stored it, for the user who created it (gateway/inbound/responses.py); free."""
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = new_context(request, snap, "responses.stored", {})
    ctx.inbound = "responses"

    async def answer() -> web.StreamResponse:
        tail = "/input_items" if request.path.endswith("/input_items") else ""
        payload = await stored(gw.router, gw.store, ctx, request.method,
                                                 request.match_info["response_id"], tail, dict(request.query))
        ctx.status = 200
        response = await send_now(request, json_response(200, payload, ctx.response_headers))
        await snap.chain.end(ctx, wait=False)
        return response

    return await run_request(request, snap, ctx, answer)
