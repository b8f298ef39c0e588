"""`/v1/batches`: OpenAI's Batch API (create, retrieve, list, cancel), owned per user.

Thin handlers over gateway/batches.py, which checks every line of the input file, reserves
the batch's energy, creates it at the upstream account holding the file, polls it and
settles it line by line at the provider's batch prices (docs/batches.md). A batch is the
user's who created it: any other id is a 404, the provider never asked.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.batches import BATCHES, MESSAGES, holder, public_batch
from gateway.client_body import read_json
from gateway.errors import ApiError, bad_request
from gateway.inbound.files import serve
from gateway.providers.base import UpstreamError
from gateway.router import upstream_to_api_error
from gateway.state import Gateway
from plugins.base import RequestContext


async def _owned(gw: Gateway, ctx: RequestContext, batch_id: str) -> dict[str, Any]:
    record = await gw.store.batch_record(batch_id=batch_id) if 0 < len(batch_id) <= 200 else None
    if record is None or record["user_id"] != ctx.identity.user_id or record["endpoint"] == MESSAGES:
        raise ApiError(404, f"No batch found with id '{batch_id[:200]}'.", param="batch_id", code="batch_not_found")
    return record


async def batches_create(request: web.Request) -> web.StreamResponse:
    """POST /v1/batches (gateway/inbound/batches.py)."""

    async def work(gw: Gateway, ctx: RequestContext) -> dict[str, Any]:
        body = await read_json(request, ctx.config.server.max_body_bytes)
        return await request.app[BATCHES].create(ctx, body)

    return await serve(request, "batches", work)


async def batches_list(request: web.Request) -> web.StreamResponse:
    """GET /v1/batches: the caller's own, newest first."""

    async def work(gw: Gateway, ctx: RequestContext) -> dict[str, Any]:
        raw = request.query.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            raise bad_request("'limit' must be an integer from 1 to 100", param="limit")
        limit = int(raw)
        rows = await gw.store.list_batches(ctx.identity.user_id, limit=limit + 1, after=request.query.get("after"))
        data = [public_batch(r) for r in rows[:limit]]
        return {"object": "list", "data": data, "has_more": len(rows) > limit,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    return await serve(request, "batches", work)


async def batch_retrieve(request: web.Request) -> web.StreamResponse:
    """GET /v1/batches/{batch_id}: as last polled (`finalizing` until settled)."""

    async def work(gw: Gateway, ctx: RequestContext) -> dict[str, Any]:
        return public_batch(await _owned(gw, ctx, request.match_info["batch_id"]))

    return await serve(request, "batches", work)


async def batch_cancel(request: web.Request) -> web.StreamResponse:
    """POST /v1/batches/{batch_id}/cancel: asked of the upstream; the poller settles what ran."""

    async def work(gw: Gateway, ctx: RequestContext) -> dict[str, Any]:
        record = await _owned(gw, ctx, request.match_info["batch_id"])
        if record["settled_at"] is not None:
            return public_batch(record)
        deployment = holder(ctx.config, record["model"], record["upstream"])
        if deployment is None:
            raise ApiError(404, "The batch runs at an upstream no configured model uses any more.",
                           code="batch_not_found")
        try:
            payload = await request.app[BATCHES].upstream.call(deployment, "POST",
                                                               f"/batches/{record['batch_id']}/cancel")
        except UpstreamError as err:
            raise upstream_to_api_error(err, 1) from None
        fields = {"status": str(payload.get("status") or "cancelling"), "payload": orjson.dumps(payload).decode()}
        # The poller may have settled it while the cancel was on its way: its settled state stays.
        if not await gw.store.update_batch(record["id"], fields, unsettled=True):
            return public_batch(await gw.store.batch_record(id=record["id"]))
        return public_batch({**record, **fields})

    return await serve(request, "batches", work)


def batches_routes() -> list[web.RouteDef]:
    return [web.post("/v1/batches", batches_create), web.get("/v1/batches", batches_list, allow_head=False),
            web.get("/v1/batches/{batch_id}", batch_retrieve, allow_head=False),
            web.post("/v1/batches/{batch_id}/cancel", batch_cancel)]
