"""Anthropic's Message Batches (`/v1/messages/batches`): the same model as OpenAI's batches.

A message batch carries its requests inline (`requests: [{custom_id, params}]`), each
`params` a `/v1/messages` body. Each is checked as a single `/v1/messages` request would
be (the Messages allowlist, object ids refused, then the chat checks on its translation),
its model allowed for the caller's tier and key and served by an Anthropic deployment,
and rewritten with the upstream's model name. As for OpenAI batches (gateway/batches.py,
whose service, poller and settlement it shares): one model per batch, one energy
reservation, one usage row per `custom_id` at Anthropic's batch prices when the batch has
ended, the owner's alone (another's id is a 404, Anthropic not asked).

The body is read whole (it is the API's shape): at most `batches.max_file_bytes`, and
never more than MAX_INLINE_BYTES.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import orjson

from gateway.batches import MESSAGES, RESERVATION_PREFIX, BatchService, bound_line, line_usd_ceiling, may_use
from gateway.client_body import check_params, validate_chat
from gateway.errors import ApiError, bad_request
from gateway.inbound.anthropic import to_openai
from gateway.providers.anthropic_batches import (
    holds_message_batches,
    message_batches_account,
    upstream_model_name,
)
from gateway.providers.base import UpstreamError
from gateway.router import upstream_to_api_error
from gateway.usage import batch_prices

MAX_INLINE_BYTES = 32 * 1024 * 1024
CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
BATCH_FIELDS = ("id", "type", "processing_status", "request_counts", "ended_at", "created_at", "expires_at",
                "archived_at", "cancel_initiated_at", "results_url")


def _request_error(index: int, message: str, param: str | None = None) -> ApiError:
    return bad_request(f"requests[{index}]: {message}", param=f"requests[{index}]" + (f".{param}" if param else ""),
                       code="invalid_batch_line")


def public_message_batch(record: dict[str, Any], origin: str) -> dict[str, Any]:
    """Anthropic's batch object as the client sees it: `in_progress` until the gateway has
    settled it, then its results at the gateway (`results_url`)."""
    payload = orjson.loads(record["payload"]) if record.get("payload") else {}
    out = {k: payload.get(k) for k in BATCH_FIELDS if k in payload}
    out.update(id=record["batch_id"], type="message_batch", results_url=None)
    if record.get("settled_at") is None:
        if out.get("processing_status") == "ended":
            out["processing_status"] = "in_progress"
            out["ended_at"] = None
    elif out.get("processing_status") == "ended":
        out["results_url"] = f"{origin}/v1/messages/batches/{record['batch_id']}/results"
    return out


async def create_message_batch(service: BatchService, ctx: Any, body: dict[str, Any], origin: str) -> dict[str, Any]:
    """POST /v1/messages/batches: every request checked, the energy reserved, the batch created."""
    store, config = service.gw.store, ctx.config
    check_params(body, frozenset({"requests"}))
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        raise bad_request("'requests' must be a non-empty array", param="requests")
    if len(requests) > config.batches.max_lines:
        raise bad_request(f"a batch has at most {config.batches.max_lines} requests", param="requests")
    model, target, seen, upstream, usd_ceiling = None, None, set(), [], 0
    budgets = await service.budgets_over(ctx)
    count_usd = any(b.unit == "usd" for b in budgets)  # counting a prompt's tokens costs CPU: only for one
    action = service.action_of(ctx, None)
    for i, item in enumerate(requests):
        if not isinstance(item, dict) or set(item) - {"custom_id", "params"}:
            raise _request_error(i, "each request is an object with 'custom_id' and 'params'")
        custom_id, params = item.get("custom_id"), item.get("params")
        if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
            raise _request_error(i, "'custom_id' must be 1 to 64 letters, digits, '-' or '_'", "custom_id")
        if custom_id in seen:
            raise _request_error(i, f"the custom_id '{custom_id}' is used twice", "custom_id")
        if not isinstance(params, dict):
            raise _request_error(i, "'params' must be an object", "params")
        try:
            translated = to_openai(params)
            name = translated.get("model")
            if not isinstance(name, str) or not name:
                raise bad_request("'model' is required", param="model")
            validate_chat(translated, config.extra_params(name))
        except ApiError as err:
            raise _request_error(i, err.message, f"params.{err.param}" if err.param else "params") from None
        for refused in ("stream", "service_tier"):
            if params.get(refused) is not None:
                raise _request_error(i, f"'{refused}' is not accepted in a batch", f"params.{refused}")
        if model is None:
            if not may_use(ctx, name):
                raise _request_error(i, f"the model '{name[:64]}' does not exist or you do not have access to it",
                                     "params.model")
            target = next((d for d in config.deployments(name) if holds_message_batches(d)), None)
            if target is None:
                raise _request_error(i, f"the model '{name[:64]}' is not served by an Anthropic deployment",
                                     "params.model")
            model = name
        elif name != model:
            raise _request_error(i, f"every request of a batch names the same model ('{model}'), this one "
                                    f"'{name[:64]}'", "params.model")
        params = {k: v for k, v in params.items() if k != "metadata" or not isinstance(v, dict)}
        metadata = item["params"].get("metadata")
        if isinstance(metadata, dict) and "user_id" in metadata:  # Anthropic's own field; the gateway's are the batch's
            params["metadata"] = {"user_id": metadata["user_id"]}
        try:
            bound_line(config, "chat.completions", model, translated, "anthropic", params)
        except ApiError as err:
            raise _request_error(i, err.message, f"params.{err.param}" if err.param else "params") from None
        if count_usd:
            usd_ceiling += line_usd_ceiling(config, "chat.completions", model, translated)
        params["model"] = upstream_model_name(target)
        seen.add(custom_id)
        upstream.append({"custom_id": custom_id, "params": params})
    if batch_prices(config, model, target.litellm_params.model, 0) is None:
        raise bad_request(f"The model '{model}' has no known batch price; the gateway does not run a batch it cannot "
                          f"bill", param="requests", code="unpriced_batch")
    per_line = config.energy.cost(action, model) if service.meters_energy() else 0
    now = time.time()
    gw_id = RESERVATION_PREFIX + secrets.token_hex(12)
    row = {"id": gw_id, "batch_id": None, "user_id": ctx.identity.user_id, "workspace_id": ctx.identity.workspace_id,
           "model": model, "upstream": message_batches_account(target), "endpoint": MESSAGES, "input_file_id": "",
           "action": action, "energy_per_line": per_line, "status": "creating", "payload": None,
           "next_poll_at": now + 3600, "created_at": now}
    custom_ids = [item["custom_id"] for item in upstream]
    await store.insert_batch(row, custom_ids)
    reserved = await service.reserve(ctx, gw_id, per_line * len(custom_ids), usd_ceiling, budgets)
    try:
        payload = await service.messages.call(target, "POST", "", {"requests": upstream})
        if not isinstance(payload.get("id"), str):
            raise UpstreamError("bad_response", "the upstream's batch had no id")
    except UpstreamError as err:
        await service.abandon(gw_id, reserved, "batch_not_created")
        raise upstream_to_api_error(err, 1) from None
    except BaseException:
        await service.abandon(gw_id, reserved, "batch_not_created")
        raise
    fields = {"batch_id": payload["id"], "status": str(payload.get("processing_status") or "in_progress"),
              "payload": orjson.dumps(payload).decode(), "next_poll_at": time.time() + config.batches.poll_interval}
    await store.update_batch(gw_id, fields)
    ctx.response_headers["X-Energy-Cost"] = str(per_line * len(custom_ids))
    return public_message_batch({**row, **fields}, origin)
