"""`POST /v1/messages`: Anthropic's Messages API, inbound.

Anthropic-native clients (the `anthropic` SDKs, Claude Code) call the gateway as they
would call Anthropic. The request is translated to an OpenAI chat completions body and
runs the very same chain as `/v1/chat/completions` (auth by `x-api-key` or Bearer, energy,
tiers, downgrades, rate limits, idempotency, accounting); the answer, streamed or not, is
translated back: a `message` object, or Anthropic's SSE events (`message_start`,
`content_block_start/delta/stop`, `message_delta`, `message_stop`), tool use included.
Errors on this endpoint are Anthropic-shaped: `{"type": "error", "error": {"type", "message"}}`.

To an Anthropic upstream on the native path (gateway/providers/anthropic.py) the client's
body is passed through instead (its `cache_control`, `thinking`, `top_k` blocks intact;
only what the chain changed applied: the output bound, a system prompt a plugin set), and
the message or the SSE events go back as Anthropic sent them (the model renamed to the
public one); the chain still sees the OpenAI form, for usage and accounting. Other
upstreams (OpenAI-wire, litellm-served) get the translation.

Like the chat endpoint, only the API's own parameters are accepted (`MESSAGES_PARAMS`);
`top_k`, `thinking` and `service_tier`, which an OpenAI-wire model cannot take, reach an
Anthropic upstream and are dropped for the others.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, Awaitable

import orjson
import structlog
from aiohttp import web

from gateway.providers.anthropic import tool_input
from gateway.client_body import read_json, require_model, validate_chat
from gateway.errors import ApiError, bad_request
from gateway.object_ids import refuse_object_ids
from gateway.lifecycle import (
    Inbound,
    answer_json,
    answer_stream,
    body_reader,
    json_response,
    new_context,
    run_request,
    send_now,
)
from gateway.providers.base import Relayed, UpstreamError
from gateway.state import GATEWAY

log = structlog.get_logger("gateway")

MESSAGES_PARAMS = frozenset({
    "model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature", "top_p",
    "top_k", "tools", "tool_choice", "metadata", "thinking", "service_tier",
})
_DROPPED = ("top_k", "thinking", "service_tier")

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "invalid_request_error", 413: "request_too_large",
                415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                503: "overloaded_error", 529: "overloaded_error"}

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                 "content_filter": "refusal"}


def error_body(err: ApiError) -> dict[str, Any]:
    """The Anthropic shape of a gateway error (its OpenAI code kept in the message)."""
    kind = _ERROR_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    body = err.body()["error"]
    message = body["message"] + (f" ({body['code']})" if body.get("code") else "")
    return {"type": "error", "error": {"type": kind, "message": message}}


# --------------------------------------------------------------------------------------
# Request: Anthropic -> OpenAI chat completions
# --------------------------------------------------------------------------------------

def _text_of(blocks: Any, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise bad_request(f"{where} must be a string or an array of text blocks", param=where)
    texts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad_request(f"{where}[{i}] must be a text block", param=f"{where}[{i}]")
        texts.append(block["text"])
    return "\n".join(texts)


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64" and isinstance(source.get("data"), str):
        url = f"data:{source.get('media_type') or 'image/png'};base64,{source['data']}"
    elif isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise bad_request(f"{where}.source must be a base64 or url image source", param=f"{where}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    raise bad_request(f"{where}.content must be a string or an array of blocks", param=f"{where}.content")


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty array", param="messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise bad_request(f"{where}.role must be 'user' or 'assistant'", param=f"{where}.role")
        role, content = message["role"], message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad_request(f"{where}.content must be a string or an array of blocks", param=f"{where}.content")
        parts: list[dict[str, Any]] = []
        tool_calls: list[dict[str, Any]] = []
        tool_results: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            bwhere = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image" and role == "user":
                parts.append(_image_part(block, bwhere))
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                    raise bad_request(f"{bwhere} needs a string 'id' and 'name'", param=bwhere)
                tool_calls.append({"id": block["id"], "type": "function", "function": {
                    "name": block["name"], "arguments": orjson.dumps(block.get("input") or {}).decode()}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise bad_request(f"{bwhere}.tool_use_id must be a string", param=f"{bwhere}.tool_use_id")
                tool_results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                                     "content": _tool_result_text(block.get("content"), bwhere)})
            elif kind in ("thinking", "redacted_thinking"):
                continue  # a previous turn's reasoning: not something an OpenAI model takes back
            else:
                raise bad_request(f"{bwhere}: block type {kind!r} is not supported for role {role!r}", param=bwhere)
        out.extend(tool_results)  # answers to the previous assistant turn's calls come first
        if role == "assistant":
            text = "".join(p["text"] for p in parts if p["type"] == "text")
            entry: dict[str, Any] = {"role": "assistant", "content": text or None}
            if tool_calls:
                entry["tool_calls"] = tool_calls
            if text or tool_calls:
                out.append(entry)
        elif parts:
            out.append({"role": "user", "content": parts})
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise bad_request(f"tools[{i}] needs a string 'name'", param=f"tools[{i}]")
        if str(tool.get("type", "custom")).startswith("web_search_"):
            # A server tool: run and charged at Anthropic per use. It reaches an Anthropic
            # deployment in the client's own body, only where the model allows it
            # (gateway/hosted_tools.py); it has no OpenAI form.
            continue
        if tool.get("type", "custom") != "custom":
            # Other server tools (web_fetch, code_execution, MCP) run and are charged at
            # Anthropic per use, beyond tokens: the gateway does not bill them.
            raise bad_request(f"tools[{i}]: tool type {str(tool['type'])[:64]!r} is not supported by the gateway "
                              f"(only custom tools, with an input_schema)", param=f"tools[{i}].type",
                              code="unsupported_tool_type")
        function: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if not isinstance(choice, dict):
        raise bad_request("'tool_choice' must be an object", param="tool_choice")
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request("'tool_choice.type' must be auto, any, tool (with a name) or none", param="tool_choice")


def to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat completions body (400 if invalid)."""
    for key in body:
        if key not in MESSAGES_PARAMS:
            raise bad_request(f"{key}: Extra inputs are not permitted", param=key, code="unknown_parameter")
    refuse_object_ids("messages", body)  # the body as sent: it may be passed through to Anthropic whole
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad_request("'max_tokens' is required and must be a positive integer", param="max_tokens")
    messages = _messages(body.get("messages"))
    system = body.get("system")
    if system is not None:
        messages.insert(0, {"role": "system", "content": _text_of(system, "system")})
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages, "max_tokens": max_tokens}
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad_request("'stop_sequences' must be an array of strings", param="stop_sequences")
        out["stop"] = stops
    if body.get("tools") is not None:
        tools = _tools(body["tools"])
        if tools or not isinstance(body["tools"], list) or not body["tools"]:
            out["tools"] = tools
    if body.get("tool_choice") is not None:
        out["tool_choice"] = _tool_choice(body["tool_choice"])
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise bad_request("'metadata' must be an object", param="metadata")
        if isinstance(metadata.get("user_id"), str):
            out["user"] = metadata["user_id"]
        gateway_fields = {k: metadata[k] for k in ("action", "prospect_id") if k in metadata}
        if gateway_fields:
            out["metadata"] = gateway_fields
    if body.get("stream") is not None:
        if not isinstance(body["stream"], bool):
            raise bad_request("'stream' must be a boolean", param="stream")
        out["stream"] = body["stream"]
    return out


# --------------------------------------------------------------------------------------
# Response: OpenAI -> Anthropic
# --------------------------------------------------------------------------------------

def _usage(usage: Any) -> dict[str, int]:
    """Anthropic's usage: input_tokens excludes the cache reads and writes."""
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    cached = getattr(usage, "cached_tokens", 0) or 0
    written = getattr(usage, "cache_write_tokens", 0) or 0
    return {"input_tokens": max(0, usage.prompt_tokens - cached - written), "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": written}


def from_openai(payload: dict[str, Any], model: str, usage: Any) -> dict[str, Any]:
    """An OpenAI chat completion as an Anthropic `message`."""
    choice = (payload.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or f"toolu_{secrets.token_hex(8)}",
                        "name": function.get("name"), "input": tool_input(function.get("arguments"))})
    return {"id": "msg_" + str(payload.get("id") or secrets.token_hex(12)), "type": "message", "role": "assistant",
            "model": model, "content": content,
            "stop_reason": _STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn"),
            "stop_sequence": None, "usage": _usage(usage)}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class StreamEncoder:
    """OpenAI chunks in, Anthropic SSE events out (for `proxy._stream`)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.started = False
        self.block = -1  # index of the open content block
        self.open_kind: str | None = None  # "text" or the OpenAI tool call index ("tool:N")
        self.stop_reason = "end_turn"
        self.relaying = False  # the pieces carry the upstream's own events (Relayed)

    def _start(self, chunk: dict[str, Any]) -> bytes:
        self.started = True
        message = {"id": "msg_" + str(chunk.get("id") or secrets.token_hex(12)), "type": "message",
                   "role": "assistant", "model": self.ctx.model, "content": [], "stop_reason": None,
                   "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
        return _event("message_start", {"type": "message_start", "message": message})

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.block += 1
        self.open_kind = kind
        return out + _event("content_block_start", {"type": "content_block_start", "index": self.block,
                                                    "content_block": block})

    def _close(self) -> bytes:
        if self.open_kind is None:
            return b""
        self.open_kind = None
        return _event("content_block_stop", {"type": "content_block_stop", "index": self.block})

    def unsent(self, chunk: dict[str, Any]) -> bytes:
        """What the client still gets of a chunk it is not sent as such (a usage-only
        chunk it did not ask for): a passed-through piece's own event."""
        if isinstance(chunk, Relayed):
            self.relaying = True
            return chunk.raw
        return b""

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        if isinstance(chunk, Relayed):  # an Anthropic upstream's own events, passed through
            self.relaying = True
            return chunk.raw
        out = b"" if self.started else self._start(chunk)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # Anthropic has one answer per message
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self.open_kind != "text":
                    out += self._open("text", {"type": "text", "text": ""})
                out += _event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                      "delta": {"type": "text_delta", "text": text}})
            for call in delta.get("tool_calls") or ():
                kind = f"tool:{call.get('index', 0)}"
                function = call.get("function") or {}
                if self.open_kind != kind:
                    out += self._open(kind, {"type": "tool_use", "id": call.get("id") or f"toolu_{secrets.token_hex(8)}",
                                             "name": function.get("name"), "input": {}})
                if function.get("arguments"):
                    out += _event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                          "delta": {"type": "input_json_delta",
                                                                    "partial_json": function["arguments"]}})
            if choice.get("finish_reason"):
                self.stop_reason = _STOP_REASONS.get(choice["finish_reason"], "end_turn")
        return out

    def done(self) -> bytes:
        if self.relaying:  # message_delta and message_stop came as the upstream's own
            return b""
        out = (b"" if self.started else self._start({})) + self._close()
        out += _event("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                                        "usage": _usage(self.ctx.usage)})
        return out + _event("message_stop", {"type": "message_stop"})

    @staticmethod
    def error(err: ApiError) -> bytes:
        return _event("error", error_body(err))


def count_tokens(body: dict[str, Any]) -> int:
    """`POST /v1/messages/count_tokens`: the prompt's tokens by litellm's (bundled) counter."""
    from gateway.price_map import count_messages

    request = to_openai({**body, "max_tokens": 1})
    return count_messages(request["messages"], "gpt-4o")


class AnthropicInbound(Inbound):
    """Anthropic's Messages format: answers and stream events as Anthropic shapes them,
    passed through as the upstream sent them when it was Anthropic."""

    name = "anthropic"

    def error_body(self, err: ApiError) -> dict[str, Any]:
        return error_body(err)

    def answer_body(self, ctx: Any, payload: dict[str, Any], raw: dict[str, Any] | None) -> dict[str, Any]:
        return raw or from_openai(payload, ctx.model, ctx.usage)

    def stream_encoder(self, ctx: Any) -> StreamEncoder:
        return StreamEncoder(ctx)

    def error_event(self, err: ApiError) -> bytes:
        return StreamEncoder.error(err)


ANTHROPIC = AnthropicInbound()


async def anthropic_messages(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages (gateway/inbound/anthropic.py): the chat chain, Anthropic's shapes."""
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = new_context(request, snap, "messages", {})
    ctx.inbound = "anthropic"

    def answer() -> Awaitable[web.StreamResponse]:
        if ctx.stream:
            return answer_stream(request, gw, snap, ctx, ANTHROPIC)
        return answer_json(request, gw, snap, ctx, ANTHROPIC)

    return await run_request(request, snap, ctx, answer,
                             body_reader(request, snap, ctx, validate_chat, to_openai), ANTHROPIC)


async def anthropic_count_tokens(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages/count_tokens: authenticated like every endpoint, free of charge."""
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = new_context(request, snap, "messages.count_tokens", {})
    ctx.inbound = "anthropic"

    async def answer() -> web.StreamResponse:
        body = await read_json(request, snap.config.server.max_body_bytes)
        model = require_model(body)
        to_openai({**body, "max_tokens": 1})  # the same checks as a message (400)
        tokens = None
        deployments = snap.config.deployments(model)
        # Claude's own count where the model's provider can give it; the local estimate else.
        upstream_count = getattr(gw.router.dispatcher_for(deployments[0]), "count_tokens", None) \
            if deployments else None
        if upstream_count is not None:
            try:
                tokens = await upstream_count(deployments[0], body)
            except UpstreamError as err:
                log.warning("count_tokens_estimated", request_id=ctx.request_id, model=model, error=err.message[:200])
        if tokens is None:
            tokens = await asyncio.get_running_loop().run_in_executor(None, count_tokens, body)
        ctx.status = 200
        response = await send_now(request, json_response(200, {"input_tokens": tokens}, ctx.response_headers))
        await snap.chain.end(ctx, wait=False)
        return response

    return await run_request(request, snap, ctx, answer, inbound=ANTHROPIC)
