"""`POST /v1/responses`: OpenAI's Responses API, passed through to OpenAI-wire deployments.

Clients of the Responses API (the OpenAI Agents SDK, Codex, `client.responses.create`)
get the whole chain (auth, energy, tiers, downgrades, idempotency, usage rows) around an
upstream that serves `/responses` itself: the request body (only the API's own
parameters, `gateway/client_body.py`) goes out as it came, the answer or its SSE events
come back as the upstream sent them, and the usage (cached and reasoning tokens included)
is read from the `response` object or the stream's `response.completed` event.

A model whose deployments are not OpenAI-wire (served through litellm: Anthropic, Bedrock,
...) answers a 400 naming it: use /v1/chat/completions or /v1/messages for those.
`background: true` is refused (its cost could not be settled with the request).
Retrieving or deleting a stored response (`GET/DELETE /v1/responses/{id}`) is not served yet.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from gateway.config import ModelEntry
from gateway.dispatch import UpstreamError
from gateway.errors import ApiError
from gateway.native import _ERROR_BODY, _error_from, _json_object
from gateway.upstream_http import UpstreamProtocolError

TERMINAL = ("response.completed", "response.incomplete")  # a whole answer (incomplete: max tokens)
FAILED = ("response.failed", "error")


def _require_native(router: Any, model: str, deployment: ModelEntry) -> None:
    from gateway.router import uses_native

    if not uses_native(deployment) or router.dispatcher_for(deployment) is not router.native:
        raise ApiError(400, f"The model '{model}' is not served over the Responses API by this gateway; "
                            f"use /v1/chat/completions (or /v1/messages) for it.", param="model",
                       code="responses_not_supported")


async def create(router: Any, ctx: Any) -> dict[str, Any]:
    """A non-streamed response, retried and fallen back like a chat completion."""

    async def call(model: str, deployment: ModelEntry) -> dict[str, Any]:
        _require_native(router, model, deployment)
        payload = await router.native._post_json(deployment, "/responses", ctx.body, "responses")
        if not isinstance(payload.get("output"), list):
            raise UpstreamError("bad_response", "the upstream response had no output")
        return payload

    return await router._attempts(ctx, call)


async def open_stream(router: Any, ctx: Any) -> tuple[tuple[str, dict[str, Any], bytes], AsyncIterator]:
    """Retries until the upstream sent its first event; returns it and the rest."""

    async def call(model: str, deployment: ModelEntry) -> Any:
        _require_native(router, model, deployment)
        stream = _events(router.native, deployment, ctx.body)
        try:
            first = await router._timed(deployment, stream.__anext__(), "first_byte")
        except StopAsyncIteration:
            raise UpstreamError("truncated", "the upstream stream ended before any event") from None
        except BaseException:
            await stream.aclose()
            raise
        return first, stream

    return await router._attempts(ctx, call)


async def _events(native: Any, deployment: ModelEntry, body: dict[str, Any]) -> AsyncIterator[
        tuple[str, dict[str, Any], bytes]]:
    """(event name, its data, its raw bytes as the client gets them), as they arrive."""
    target, headers, total, connect = native._target(deployment, "/responses", stream=True)
    try:
        async with asyncio.timeout(total):
            resp = await native._send(target, headers, native._body(deployment, {**body, "stream": True},
                                                                     "responses"), connect)
    except TimeoutError:
        raise UpstreamError("timeout", "the upstream did not answer in time", status=504) from None
    finished = False
    try:
        if resp.status >= 400:
            raw = await resp.read(_ERROR_BODY)
            finished = True
            raise _error_from(resp.status, resp.headers, raw)
        name, data = "", b""
        async for line in resp.iter_lines():
            line = line.rstrip(b"\r\n")
            if line.startswith(b"event:"):
                name = line[6:].strip().decode("utf-8", "replace")
            elif line.startswith(b"data:"):
                data = line[5:].strip()
            elif not line.strip() and data:
                parsed = _json_object(data, "stream event")
                name = name or str(parsed.get("type") or "")
                yield name, parsed, b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"
                if name in TERMINAL or name in FAILED:
                    finished = True
                    return
                name, data = "", b""
        raise UpstreamError("truncated", "the upstream stream ended before response.completed")
    except (UpstreamProtocolError, OSError) as exc:
        raise UpstreamError("truncated", f"the upstream stream broke off: {type(exc).__name__}") from None
    finally:
        if finished:
            resp.release()
        else:
            resp.close()


def error_event(err: ApiError) -> bytes:
    """The Responses API's stream error event."""
    import orjson

    body = err.body()["error"]
    return b"event: error\ndata: " + orjson.dumps({"type": "error", "code": body.get("code"),
                                                   "message": body["message"], "param": body.get("param")}) + b"\n\n"


def replay_events(payload: dict[str, Any]) -> list[bytes]:
    """A stored response (an idempotent replay) as the two events that carry it whole."""
    import orjson

    return [b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, "sequence_number": i,
                                                                       "response": payload}) + b"\n\n"
            for i, name in enumerate(("response.created", "response.completed"))]
