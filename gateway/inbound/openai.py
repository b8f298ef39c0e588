"""OpenAI's own wire format, inbound: `POST /v1/chat/completions` (streamed or not),
`POST /v1/embeddings` and `GET /v1/models[/{model}]`.

Thin handlers over the shared lifecycle (gateway/lifecycle.py): a context, the body
reader with this endpoint's allowlist (gateway/client_body.py), then `answer_json` or
`answer_stream` (through the one `relay_stream`). OpenAI's format is the lifecycle's default `Inbound`.
"""

from __future__ import annotations

from typing import Awaitable

from aiohttp import web

from gateway.client_body import validate_chat, validate_embeddings
from gateway.errors import ApiError
from gateway.lifecycle import (
    answer_json,
    answer_stream,
    body_reader,
    clean_text,
    json_response,
    new_context,
    run_request,
    send_now,
)
from gateway.state import GATEWAY


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = new_context(request, snap, "chat.completions", {})

    def answer() -> Awaitable[web.StreamResponse]:
        return (answer_stream if ctx.stream else answer_json)(request, gw, snap, ctx)

    return await run_request(request, snap, ctx, answer, body_reader(request, snap, ctx, validate_chat))


async def embeddings(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = new_context(request, snap, "embeddings", {})

    def answer() -> Awaitable[web.StreamResponse]:
        return answer_json(request, gw, snap, ctx, dispatch=gw.router.embeddings)

    return await run_request(request, snap, ctx, answer, body_reader(request, snap, ctx, validate_embeddings))


async def list_models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models, and GET /v1/models/{model} (`client.models.retrieve`): the model if
    the caller's tier may use it, else 404 model_not_found (as for an unknown one)."""
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = new_context(request, snap, "models", {})
    ctx.visible_models = snap.config.model_names()
    wanted = request.match_info.get("model")

    async def answer() -> web.StreamResponse:
        created = int(gw.started_at)
        if wanted is not None:
            if wanted not in ctx.visible_models:
                raise ApiError(404, f"The model '{clean_text(wanted)}' does not exist or you do not have access to it.",
                               code="model_not_found", param="model")
            payload = {"id": wanted, "object": "model", "created": created, "owned_by": "gateway"}
        else:
            payload = {"object": "list", "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "gateway"}
                for name in ctx.visible_models]}
        ctx.status = 200
        response = await send_now(request, json_response(200, payload, ctx.response_headers))
        await snap.chain.end(ctx, wait=False)
        return response

    return await run_request(request, snap, ctx, answer)
