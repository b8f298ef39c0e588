"""`/v1/messages/batches`: Anthropic's Message Batches API (create, retrieve, list, cancel,
results), owned per user, Anthropic-shaped errors. Thin handlers over
gateway/message_batches.py (the checks and the create) and gateway/batches.py (the poller
and the settlement, shared with OpenAI's batches)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.batches import BATCHES, MESSAGES, holder
from gateway.client_body import read_json
from gateway.errors import ApiError, bad_request
from gateway.inbound.anthropic import ANTHROPIC
from gateway.inbound.files import relay_lines, serve
from gateway.message_batches import MAX_INLINE_BYTES, create_message_batch, public_message_batch
from gateway.providers.base import UpstreamError
from gateway.router import upstream_to_api_error
from gateway.state import Gateway
from plugins.base import RequestContext


def _origin(request: web.Request) -> str:
    return str(request.url.origin())


async def _owned(gw: Gateway, ctx: RequestContext, batch_id: str) -> dict[str, Any]:
    record = await gw.store.batch_record(batch_id=batch_id) if 0 < len(batch_id) <= 200 else None
    if record is None or record["user_id"] != ctx.identity.user_id or record["endpoint"] != MESSAGES:
        raise ApiError(404, f"No message batch found with id '{batch_id[:200]}'.", type="not_found_error",
                       code="batch_not_found")
    return record


async def message_batches_create(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages/batches (gateway/inbound/message_batches.py)."""

    async def work(gw: Gateway, ctx: RequestContext) -> dict[str, Any]:
        body = await read_json(request, min(ctx.config.batches.max_file_bytes, MAX_INLINE_BYTES))
        return await create_message_batch(request.app[BATCHES], ctx, body, _origin(request))

    return await serve(request, "batches", work, ANTHROPIC)


async def message_batches_list(request: web.Request) -> web.StreamResponse:
    """GET /v1/messages/batches: the caller's own, newest first (`limit`, `after_id`)."""

    async def work(gw: Gateway, ctx: RequestContext) -> dict[str, Any]:
        raw = request.query.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= 1000:
            raise bad_request("'limit' must be an integer from 1 to 1000", param="limit")
        limit = int(raw)
        rows = await gw.store.list_batches(ctx.identity.user_id, limit=limit + 1,
                                           after=request.query.get("after_id"), messages=True)
        data = [public_message_batch(r, _origin(request)) for r in rows[:limit]]
        return {"data": data, "has_more": len(rows) > limit, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    return await serve(request, "batches", work, ANTHROPIC)


async def message_batch_retrieve(request: web.Request) -> web.StreamResponse:
    """GET /v1/messages/batches/{id}: as last polled (`in_progress` until settled)."""

    async def work(gw: Gateway, ctx: RequestContext) -> dict[str, Any]:
        return public_message_batch(await _owned(gw, ctx, request.match_info["batch_id"]), _origin(request))

    return await serve(request, "batches", work, ANTHROPIC)


async def message_batch_cancel(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages/batches/{id}/cancel: asked of Anthropic; the poller settles what ran."""

    async def work(gw: Gateway, ctx: RequestContext) -> dict[str, Any]:
        record = await _owned(gw, ctx, request.match_info["batch_id"])
        if record["settled_at"] is not None:
            return public_message_batch(record, _origin(request))
        deployment = holder(ctx.config, record["model"], record["upstream"], MESSAGES)
        if deployment is None:
            raise ApiError(404, "The batch runs at an upstream no configured model uses any more.",
                           type="not_found_error", code="batch_not_found")
        try:
            payload = await request.app[BATCHES].messages.call(deployment, "POST", f"/{record['batch_id']}/cancel")
        except UpstreamError as err:
            raise upstream_to_api_error(err, 1) from None
        fields = {"status": str(payload.get("processing_status") or "canceling"),
                  "payload": orjson.dumps(payload).decode()}
        # The poller may have settled it while the cancel was on its way: its settled state stays.
        if not await gw.store.update_batch(record["id"], fields, unsettled=True):
            return public_message_batch(await gw.store.batch_record(id=record["id"]), _origin(request))
        return public_message_batch({**record, **fields}, _origin(request))

    return await serve(request, "batches", work, ANTHROPIC)


async def message_batch_results(request: web.Request) -> web.StreamResponse:
    """GET /v1/messages/batches/{id}/results: once settled, streamed from Anthropic with the
    public model name in each message."""

    async def work(gw: Gateway, ctx: RequestContext) -> web.StreamResponse:
        record = await _owned(gw, ctx, request.match_info["batch_id"])
        if record["settled_at"] is None or record["status"] != "ended":
            raise bad_request(f"The message batch '{record['batch_id']}' has not ended yet; its results are not "
                              f"available.", code="batch_not_ended")
        deployment = holder(ctx.config, record["model"], record["upstream"], MESSAGES)
        if deployment is None:
            raise ApiError(404, "The batch ran at an upstream no configured model uses any more.",
                           type="not_found_error", code="batch_not_found")
        lines = request.app[BATCHES].messages.results(deployment, record["batch_id"])
        return await relay_lines(request, ctx, lines, "application/binary",
                                 lambda line: _public_line(line, record["model"]))

    return await serve(request, "batches", work, ANTHROPIC)


def _public_line(raw: bytes, model: str) -> bytes:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    message = ((line.get("result") or {}).get("message") if isinstance(line, dict) else None)
    if isinstance(message, dict) and "model" in message:
        message["model"] = model
    return orjson.dumps(line) + b"\n"


def message_batches_routes() -> list[web.RouteDef]:
    return [web.post("/v1/messages/batches", message_batches_create),
            web.get("/v1/messages/batches", message_batches_list, allow_head=False),
            web.get("/v1/messages/batches/{batch_id}", message_batch_retrieve, allow_head=False),
            web.post("/v1/messages/batches/{batch_id}/cancel", message_batch_cancel),
            web.get("/v1/messages/batches/{batch_id}/results", message_batch_results, allow_head=False)]
