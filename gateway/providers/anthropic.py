"""The native Anthropic path: OpenAI chat completions to Anthropic's Messages API and back,
over the gateway's own HTTP client, without litellm's per-call overhead.

`litellm.acompletion` spends ~3 ms of CPU per call (request building, logging objects,
its executor hop) to do what this module does in a few dozen microseconds: translate the
OpenAI body to a Messages request, and the answer (or each SSE event) back to OpenAI's
shapes. `dispatch: auto` sends `anthropic/...` models here; requests using something this
translation does not cover (`n > 1`, `response_format` other than text, `logprobs`, audio,
the legacy `functions`) go to litellm as before, so every request still works.

Usage is reported as litellm reports it (tests/test_anthropic_parity.py holds both paths
to the same client-visible results): `prompt_tokens` includes the cache reads and writes,
which also appear in `prompt_tokens_details` and Anthropic's own top-level keys.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

import orjson

from gateway.config import ModelEntry
from gateway.providers.base import (
    Relayed,
    StreamEnd,
    TargetCache,
    Translation,
    UpstreamError,
    json_object,
    release_or_close,
)
from gateway.errors import redact
from gateway.providers.openai import call_timeouts
from gateway.providers.http import Target, UpstreamProtocolError

ANTHROPIC_DEFAULT_BASE = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # Anthropic requires one; models[].max_tokens_default sets the gateway's
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
           "refusal": "content_filter", "pause_turn": "stop"}


def covers(body: dict[str, Any]) -> bool:
    """Whether this translation serves the request as litellm would (else litellm does)."""
    if (body.get("n") or 1) > 1 or body.get("logprobs") or body.get("functions") or body.get("function_call"):
        return False
    if body.get("audio") or body.get("modalities") or body.get("prediction") or body.get("web_search_options"):
        return False
    fmt = body.get("response_format")
    return not (isinstance(fmt, dict) and fmt.get("type") not in (None, "text"))


def _model(deployment: ModelEntry) -> str:
    model = deployment.litellm_params.model
    return model.split("/", 1)[1] if model.startswith("anthropic/") else model


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content or ():
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "") if isinstance(part.get("image_url"), dict) \
                else str(part.get("image_url") or "")
            if url.startswith("data:") and ";base64," in url:
                media, data = url[5:].split(";base64,", 1)
                blocks.append({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}})
            else:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
    return blocks


def tool_input(raw: Any) -> dict[str, Any]:
    """An OpenAI tool call's `arguments` (a JSON string) as an Anthropic tool_use `input`
    (an object); what is not a JSON object becomes {}."""
    if isinstance(raw, dict):
        return raw
    try:
        value = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def to_messages_request(deployment: ModelEntry, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    system: list[str] = []
    messages: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if messages and messages[-1]["role"] == role:  # Anthropic alternates roles: merge runs
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for message in body.get("messages") or ():
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text(message.get("content")))
        elif role == "user":
            add("user", _blocks(message.get("content")))
        elif role == "assistant":
            blocks = _blocks(message.get("content"))
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                               "input": tool_input(function.get("arguments"))})
            if blocks:
                add("assistant", blocks)
        elif role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": message.get("tool_call_id"),
                          "content": _text(message.get("content"))}])
    request: dict[str, Any] = {"model": _model(deployment), "messages": messages,
                               "max_tokens": body.get("max_tokens") or body.get("max_completion_tokens")
                               or DEFAULT_MAX_TOKENS}
    if system:
        request["system"] = "\n".join(system)
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            request[key] = body[key]
    stop = body.get("stop")
    if stop:  # Anthropic refuses whitespace-only stop sequences (litellm drops them too)
        stops = [s for s in ([stop] if isinstance(stop, str) else stop) if isinstance(s, str) and s.strip()]
        if stops:
            request["stop_sequences"] = stops
    if body.get("tools"):
        request["tools"] = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                             "input_schema": t["function"].get("parameters") or {"type": "object", "properties": {}}}
                            for t in body["tools"] if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    choice = body.get("tool_choice")
    if choice is not None and request.get("tools"):
        if choice == "required":
            request["tool_choice"] = {"type": "any"}
        elif choice == "none":
            request["tool_choice"] = {"type": "none"}
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            request["tool_choice"] = {"type": "tool", "name": choice["function"].get("name")}
        else:
            request["tool_choice"] = {"type": "auto"}
        if body.get("parallel_tool_calls") is False:
            request["tool_choice"]["disable_parallel_tool_use"] = True
    if isinstance(body.get("user"), str):
        request["metadata"] = {"user_id": body["user"]}
    if stream:
        request["stream"] = True
    return request


_COUNTED = frozenset({"messages", "system", "tools", "tool_choice", "thinking"})  # what count_tokens takes
_FOLLOWS_BODY = frozenset({"model", "stream", "stream_options", "metadata", "user"})


def _system_text(system: Any) -> str:
    return system if isinstance(system, str) else "\n".join(
        b.get("text", "") for b in system or () if isinstance(b, dict) and b.get("type") == "text")


def passthrough_request(deployment: ModelEntry, body: dict[str, Any], inbound: dict[str, Any],
                        translated: dict[str, Any], *, stream: bool) -> dict[str, Any] | None:
    """The client's own Messages request for this deployment (POST /v1/messages to an
    Anthropic upstream): its blocks as sent (`cache_control`, `thinking`, documents'
    fields, `top_k` ...), with what the chain changed in the OpenAI body since it was
    translated (`translated`) applied: the output bound, sampling parameters, a system
    prompt a plugin set. None when the chain changed something else: then the request is
    translated from the OpenAI body like any other (correct, just not verbatim)."""
    request = {k: v for k, v in inbound.items() if k not in ("model", "metadata", "stream")}
    request["model"] = _model(deployment)
    user = (inbound.get("metadata") or {}).get("user_id")
    if isinstance(user, str):  # the gateway's own metadata fields (action, ...) stay here
        request["metadata"] = {"user_id": user}
    if stream:
        request["stream"] = True
    for key in body.keys() | translated.keys():
        new, old = body.get(key), translated.get(key)
        if new is old or key in _FOLLOWS_BODY:
            continue
        if key in ("max_tokens", "max_completion_tokens"):
            request["max_tokens"] = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
        elif key in ("temperature", "top_p"):
            if new is None:
                request.pop(key, None)
            else:
                request[key] = new
        elif key == "messages":
            if not isinstance(new, list):
                return None
            kept = [m for m in new if m.get("role") not in ("system", "developer")]
            was = [m for m in old if m.get("role") not in ("system", "developer")]
            if len(kept) != len(was) or any(a is not b for a, b in zip(kept, was)):
                return None  # the conversation itself was rewritten: translate it
            system = "\n".join(_text(m.get("content")) for m in new if m.get("role") in ("system", "developer"))
            if system != _system_text(inbound.get("system")):
                if system:
                    request["system"] = system
                else:
                    request.pop("system", None)
        else:
            return None
    return request


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    read = int(usage.get("cache_read_input_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + read + written
    completion = int(usage.get("output_tokens") or 0)
    details: dict[str, Any] = {"cached_tokens": read, "cache_creation_tokens": written}
    lifetimes = usage.get("cache_creation")
    if isinstance(lifetimes, dict):  # the writes by lifetime, 1-hour ones dearer: named as litellm names them
        details["cache_creation_token_details"] = {
            "ephemeral_5m_input_tokens": int(lifetimes.get("ephemeral_5m_input_tokens") or 0),
            "ephemeral_1h_input_tokens": int(lifetimes.get("ephemeral_1h_input_tokens") or 0)}
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": details,
           "cache_read_input_tokens": read, "cache_creation_input_tokens": written}
    if isinstance(usage.get("server_tool_use"), dict):  # hosted-tool uses, billed per use (as litellm keeps it)
        out["server_tool_use"] = usage["server_tool_use"]
    if isinstance(usage.get("service_tier"), str):  # the tier that served (standard, priority, batch): billed
        out["service_tier"] = usage["service_tier"]
    return out


def from_message(message: dict[str, Any], model: str) -> dict[str, Any]:
    text, calls = [], []
    for block in message.get("content") or ():
        if block.get("type") == "text":
            text.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": orjson.dumps(block.get("input") or {}).decode()}})
    out_message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        out_message["tool_calls"] = calls
    return {"id": message.get("id"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": out_message, "logprobs": None,
                         "finish_reason": _FINISH.get(message.get("stop_reason") or "end_turn", "stop")}],
            "usage": _usage(message.get("usage") or {})}


def _target_of(deployment: ModelEntry) -> tuple[Target, bytes, bytes]:
    """Where the deployment's Messages API is, and its header lines for a whole answer and
    for a stream."""
    params = deployment.litellm_params
    base = (params.api_base or ANTHROPIC_DEFAULT_BASE).rstrip("/")
    url = base if base.endswith("/messages") else base + ("/messages" if base.endswith("/v1") else "/v1/messages")
    lines = ["Content-Type: application/json", f"anthropic-version: {ANTHROPIC_VERSION}"]
    if params.api_key:
        lines.append(f"x-api-key: {params.api_key}")
    head = "".join(f"{line}\r\n" for line in lines)
    return (Target(url, proxy=getattr(deployment, "proxy", None)),
            (head + "Accept: application/json\r\n").encode("latin-1"),
            (head + "Accept: text/event-stream\r\n").encode("latin-1"))


class AnthropicNativeDispatcher(Translation):
    """Anthropic's Messages API over the shared native HTTP client; litellm for the rest."""

    passes_through = True  # POST /v1/messages to Anthropic as the client sent it

    def __init__(self, native: Any, litellm: Any) -> None:
        super().__init__(native, litellm)
        self._targets: TargetCache[tuple[Target, bytes, bytes]] = TargetCache(_target_of)

    def covers(self, deployment: ModelEntry, body: dict[str, Any]) -> bool:
        return covers(body)

    def _target(self, deployment: ModelEntry) -> tuple[Target, bytes, bytes]:
        return self._targets.get(deployment)

    async def translated_chat(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        message = await self._message(deployment, to_messages_request(deployment, body, stream=False))
        return from_message(message, _model(deployment))

    def translated_stream(self, deployment: ModelEntry, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream(deployment, to_messages_request(deployment, body, stream=True))

    async def _message(self, deployment: ModelEntry, request: dict[str, Any]) -> dict[str, Any]:
        target, headers, _ = self._target(deployment)
        total, connect = call_timeouts(deployment, False)
        message = await self.native.post_json(target, headers, orjson.dumps(request), total, connect)
        if not isinstance(message.get("content"), list):
            raise UpstreamError("bad_response", "the upstream response had no content")
        return message

    async def messages(self, deployment: ModelEntry, ctx: Any) -> dict[str, Any]:
        """POST /v1/messages: the client's request passed through (`passthrough_request`);
        returned as a `Relayed` answer: its OpenAI form for the chain (usage, cache,
        idempotent replays), the message as Anthropic sent it for the client."""
        request = passthrough_request(deployment, ctx.body, ctx.inbound_body, ctx.inbound_translated, stream=False)
        if request is None:
            return await self.chat(deployment, ctx.body)
        message = await self._message(deployment, request)
        return Relayed(from_message(message, _model(deployment)), {**message, "model": ctx.model})

    def messages_stream(self, deployment: ModelEntry, ctx: Any) -> AsyncIterator[dict[str, Any]]:
        """The streamed form of `messages`: OpenAI chunks for the chain, and in
        each piece a `Relayed` chunk carrying Anthropic's events as they came, for the client."""
        request = passthrough_request(deployment, ctx.body, ctx.inbound_body, ctx.inbound_translated, stream=True)
        if request is None:
            return self.chat_stream(deployment, ctx.body)
        return self._stream(deployment, request, relay=True, public_model=ctx.model)

    async def count_tokens(self, deployment: ModelEntry, body: dict[str, Any]) -> int:
        """POST /v1/messages/count_tokens at Anthropic: Claude's own count of the client's
        request (the fields the endpoint takes; model the deployment's)."""
        target, headers, _ = self._target(deployment)
        total, connect = call_timeouts(deployment, False)
        request = {k: v for k, v in body.items() if k in _COUNTED}
        request["model"] = _model(deployment)
        payload = await self.native.post_json(Target(target.url + "/count_tokens", proxy=target.proxy_url),
                                              headers, orjson.dumps(request), total, connect)
        tokens = payload.get("input_tokens")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise UpstreamError("bad_response", "the upstream's token count had no input_tokens")
        return tokens

    async def _stream(self, deployment: ModelEntry, request: dict[str, Any], relay: bool = False,
                      public_model: str = "") -> AsyncIterator[dict[str, Any]]:
        """Anthropic's events as OpenAI chunks; with `relay`, `Relayed` pieces: each carries
        its event's bytes as the client gets them (its message's model named `public_model`)."""
        target, _, headers = self._target(deployment)
        total, connect = call_timeouts(deployment, True)
        resp = await self.native.open_stream(target, headers, orjson.dumps(request), total, connect)
        finished = False
        end = StreamEnd()
        model = _model(deployment)
        base: dict[str, Any] = {"id": None, "object": "chat.completion.chunk", "created": int(time.time()),
                                "model": model}
        usage: dict[str, Any] = {}
        tools: dict[int, int] = {}  # Anthropic content block index -> OpenAI tool call index

        raw = b""  # the current event's bytes, for the first piece made of it

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return piece({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        def piece(openai: dict[str, Any]) -> dict[str, Any]:
            nonlocal raw
            if not relay:
                return openai
            out, raw = Relayed(openai, raw), b""
            return out

        try:
            data = b""
            async for line in resp.iter_lines():
                line = line.strip()
                if line.startswith(b"data:"):
                    data = line[5:].strip()
                    continue
                if line or not data:
                    continue  # "event:" lines (the data names its type too), comments
                event = json_object(data, "stream event")
                kind = event.get("type")
                if relay and isinstance(kind, str) and kind.isidentifier() and kind != "error":
                    if kind == "message_start" and isinstance(event.get("message"), dict):
                        data = orjson.dumps({**event, "message": {**event["message"], "model": public_model}})
                    elif b"\r" in data:  # JSON whitespace, but a line end to the client's SSE parser
                        data = orjson.dumps(event)
                    raw = b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"
                data = b""
                produced = True
                if kind == "message_start":
                    message = event.get("message") or {}
                    base["id"] = message.get("id")
                    usage.update(message.get("usage") or {})
                    first = chunk({"role": "assistant", "content": ""})
                    if relay:  # the prompt's tokens, known now: billed if the stream is cut
                        first["usage"] = _usage(usage)
                    yield first
                elif kind == "content_block_start":
                    block = event.get("content_block") or {}
                    if block.get("type") == "tool_use":
                        tools[event.get("index", 0)] = len(tools)
                        yield chunk({"tool_calls": [{"index": tools[event.get("index", 0)], "id": block.get("id"),
                                                     "type": "function", "function": {"name": block.get("name"),
                                                                                      "arguments": ""}}]})
                    else:
                        produced = False
                elif kind == "content_block_delta":
                    delta = event.get("delta") or {}
                    if delta.get("type") == "text_delta" and delta.get("text"):
                        yield chunk({"content": delta["text"]})
                    elif delta.get("type") == "input_json_delta" and event.get("index", 0) in tools:
                        yield chunk({"tool_calls": [{"index": tools[event.get("index", 0)],
                                                     "function": {"arguments": delta.get("partial_json", "")}}]})
                    elif delta.get("type") == "thinking_delta" and delta.get("thinking"):
                        yield chunk({"reasoning_content": delta["thinking"]})  # as litellm names it
                    else:
                        produced = False
                elif kind == "message_delta":
                    usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
                    reason = (event.get("delta") or {}).get("stop_reason")
                    final = chunk({}, _FINISH.get(reason or "end_turn", "stop"))
                    end.observe(final)
                    yield final
                    yield piece({**base, "choices": [], "usage": _usage(usage)})
                elif kind == "message_stop":
                    finished = True
                    if relay:
                        yield piece({**base, "choices": []})
                    return
                elif kind == "error":
                    error = event.get("error") or {}
                    raise UpstreamError("truncated", f"the upstream stream failed: {redact(str(error.get('message')))}")
                else:
                    produced = False
                if relay and not produced:
                    # An event with no OpenAI form (a ping, a block's start or stop, a
                    # signature): a piece of nothing carrying it, so the client gets the
                    # event now and the idle timer sees the stream alive.
                    yield piece({**base, "choices": []})
            if not end.complete:
                raise UpstreamError("truncated", "the upstream stream ended before message_delta")
        except UpstreamError:
            raise
        except (UpstreamProtocolError, OSError) as exc:
            if not end.complete:
                raise UpstreamError("truncated", f"the upstream stream broke off: {type(exc).__name__}") from None
        finally:
            release_or_close(resp, finished)
