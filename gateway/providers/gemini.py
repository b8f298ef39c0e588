"""The native Gemini path: OpenAI chat completions to the Gemini API's generateContent and
back, over the gateway's own HTTP client, without litellm's per-call overhead.

Why the native API and not Google's OpenAI-compatible endpoint: litellm's `gemini/...`
provider speaks generateContent, so this translation and litellm answer from the same
upstream responses, and tests/test_provider_parity.py holds them to the same client-visible
results (text, tool calls, finish reasons, usage with its cached and reasoning tokens)
and to the same request reaching Google. The OpenAI-compatible endpoint reports usage and
finish reasons its own way, which a client switching paths would see.

What is translated here, as litellm does it: system/developer prompts (`systemInstruction`,
for models litellm's map says take one; litellm serves the others), text and
base64 images, tool calls and tool results, `tools` with plain JSON schemas, `tool_choice`,
`max_tokens`, `temperature`, `top_p`, `stop` (Gemini takes four), `seed` and
`response_format: json_object`. Anything else (`n > 1`, penalties, logprobs, audio,
reasoning settings, schemas with $ref/anyOf/..., image URLs litellm would download,
Gemini's image, speech and live models) goes to litellm as before: `covers()`.

Measured in one session (2-core machine shared with others; the dispatchers of one Router
in one process with tests/fakes.FakeUpstream, 300 sequential non-streamed calls after 20
warm-ups, CPU by getrusage, the fake's own answer included): 198-231 us of CPU per call
here, against 3,303-3,435 us through litellm; a bare aiohttp request to the same fake costs
236 us, so the translation itself is within the noise.

Gemini 3 signs its thinking, and refuses a tool call sent back without its signature:
the signature travels in the tool call's id (`call_..__thought__<signature>`) and its
`provider_specific_fields`, as litellm does it, so a client that sends the call back
sends it back; a call without one gets litellm's placeholder.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, AsyncIterator

import orjson

from gateway import price_map
from gateway.config import ModelEntry
from gateway.providers.base import StreamEnd, TargetCache, Translation, UpstreamError, json_object, release_or_close
from gateway.errors import redact
from gateway.providers.openai import call_timeouts
from gateway.providers.http import Target, UpstreamProtocolError

GEMINI_DEFAULT_BASE = "https://generativelanguage.googleapis.com/v1beta"
GEMINI_3_DEFAULT_BASE = "https://generativelanguage.googleapis.com/v1alpha"  # litellm's, for Gemini 3+
# A tool call's id carries Gemini's thought signature after this (litellm's convention), so
# that a client sending the call back sends the signature back; Gemini 3 refuses a call without.
THOUGHT_SIGNATURE_SEPARATOR = "__thought__"
# What litellm sends when a Gemini 3 call has no signature (base64 of
# "skip_thought_signature_validator"; Google's documented last resort).
DUMMY_THOUGHT_SIGNATURE = "c2tpcF90aG91Z2h0X3NpZ25hdHVyZV92YWxpZGF0b3I="
MAX_STOP_SEQUENCES = 4  # Gemini's limit; litellm keeps the first four
# litellm's map of Gemini finish reasons (litellm_core_utils/core_helpers.py); unknown ones are "stop".
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "CONTINUATION": "length", "SAFETY": "content_filter",
           "RECITATION": "content_filter", "LANGUAGE": "content_filter", "OTHER": "content_filter",
           "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
           "IMAGE_SAFETY": "content_filter", "IMAGE_PROHIBITED_CONTENT": "content_filter",
           "NO_IMAGE": "content_filter", "IMAGE_RECITATION": "content_filter", "IMAGE_OTHER": "content_filter",
           "ESCALATION": "content_filter"}
# Finish reasons for which litellm answers no content at all (get_flagged_finish_reasons).
_FLAGGED = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
                      "IMAGE_PROHIBITED_CONTENT"})
# Body fields this translation serves; any other field sends the request to litellm.
_COVERED = frozenset({"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                      "temperature", "top_p", "stop", "tools", "tool_choice", "response_format", "seed", "n",
                      "user"})  # user: litellm drops it for Gemini, as here
# JSON schema keywords passed as they are; additionalProperties and $schema are dropped (as litellm does).
_SCHEMA_KEYS = frozenset({"type", "properties", "required", "description", "items", "enum"})
_SCHEMA_DROPPED = ("additionalProperties", "$schema")
_SCHEMA_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array"})
# Gemini 1.x/2.x (litellm's test for "older than Gemini 3", which changes URLs and tool calls).
_BEFORE_GEMINI_3 = re.compile(r"^gemini-(?:[12](?:\.\d+)?|exp|(?:pro|flash)(?!-(?:lite-)?latest$))(?:-|$)")
# The Gemini 3+ chat models served here (not image, speech or live ones).
_GEMINI_3_CHAT = re.compile(r"^gemini-(?:[3-9]|\d\d)(?:\.\d+)?-(?:pro|flash)(?:-lite)?(?:-preview)?(?:-\d\d-\d\d)?$")


# What litellm reads in a Gemini error message to status it (exception_mapping_utils's
# _map_vertex_exception): Google answers a bad key with 400 INVALID_ARGUMENT, for one.
_STATUS_BY_MESSAGE = (("API key not valid.", 401), ("429 Quota exceeded", 429), ("Quota exceeded for", 429),
                      ("Resource exhausted", 429), ("The response was blocked.", 400),
                      ("None Unknown Error.", 500), ("Content has no parts.", 500))


def litellm_status(err: UpstreamError) -> UpstreamError:
    """An upstream HTTP error with the status litellm would give it (the router decides on
    retries, other deployments and the client's status by it)."""
    if err.kind == "status":
        for words, status in _STATUS_BY_MESSAGE:
            if words in err.message:
                err.status = status
                break
    return err


def _model(deployment: ModelEntry) -> str:
    model = deployment.litellm_params.model
    return model.split("/", 1)[1] if model.startswith("gemini/") else model


def _plain_schema(schema: Any) -> bool:
    if not isinstance(schema, dict) or schema.get("type") not in _SCHEMA_TYPES:
        return False
    if any(key not in _SCHEMA_KEYS and key not in _SCHEMA_DROPPED for key in schema):
        return False
    if schema.get("enum") is not None and (schema["type"] != "string" or not all(
            isinstance(v, str) and v for v in schema["enum"])):
        return False
    if "items" in schema and not _plain_schema(schema["items"]):
        return False
    properties = schema.get("properties")
    if properties is not None and (not isinstance(properties, dict)
                                   or not all(_plain_schema(p) for p in properties.values())):
        return False
    return True


def _content_covered(content: Any) -> bool:
    if content is None or isinstance(content, str):
        return True
    if not isinstance(content, list):
        return False
    for part in content:
        if not isinstance(part, dict):
            return False
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            continue
        image = part.get("image_url") if part.get("type") == "image_url" else None
        url = image.get("url") if isinstance(image, dict) else image
        if not (isinstance(url, str) and url.startswith("data:") and ";base64," in url) \
                or (isinstance(image, dict) and image.keys() - {"url"}):
            return False
    return True


def covers(deployment: ModelEntry, body: dict[str, Any]) -> bool:
    """Whether this translation serves the request as litellm would (else litellm does)."""
    if not body.keys() <= _COVERED or (body.get("n") or 1) > 1:
        return False
    name = _model(deployment).lower()
    if not (_BEFORE_GEMINI_3.match(name) or _GEMINI_3_CHAT.match(name)):
        return False
    info = price_map.model_info(deployment.litellm_params.model) or {}
    if info.get("supports_sampling_params") is False and ("temperature" in body or "top_p" in body):
        return False  # litellm drops them for such a model
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text", "json_object"):
        return False
    system_instruction = info.get("supports_system_messages")
    for message in body.get("messages") or ():
        if system_instruction is not True and isinstance(message, dict) and message.get("role") in ("system",
                                                                                                      "developer"):
            return False  # litellm's map (or its guess, for a model the map lacks) decides where it goes
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user",
                                                                         "assistant", "tool"):
            return False
        if message.get("function_call") or not _content_covered(message.get("content")):
            return False
        for call in message.get("tool_calls") or ():
            arguments = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
            try:
                json.loads(arguments or "{}")
            except (TypeError, ValueError):
                return False
        if message["role"] == "tool" and str(message.get("content") or "")[:5].lower() == "data:":
            return False  # litellm sends a data URL tool result as the image it is
        if message["role"] in ("system", "developer", "tool") and not isinstance(message.get("content"), str) \
                and not all(p.get("type") == "text" for p in message.get("content") or ()):
            return False
    for tool in body.get("tools") or ():
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return False
        if function.keys() - {"name", "description", "parameters"}:
            return False  # strict, ...
        if function.get("parameters") is not None and not _plain_schema(function["parameters"]):
            return False
    return True


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in schema.items() if k not in _SCHEMA_DROPPED}
    if "items" in out:
        out["items"] = _schema(out["items"])
    if "properties" in out:
        if out["properties"]:
            out["properties"] = {name: _schema(p) for name, p in out["properties"].items()}
        else:
            del out["properties"]  # Gemini refuses an OBJECT with empty properties
    return out


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content or () if isinstance(p, dict))


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts = []
    for part in content or ():
        if part.get("type") == "text":
            parts.append({"text": part.get("text", "")})
        else:
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            media, data = url[5:].split(";base64,", 1)
            parts.append({"inline_data": {"data": data, "mime_type": media}})
    return parts


def _tool_response(content: str) -> dict[str, Any]:
    """A tool result as Gemini's functionResponse.response: a JSON object as it is, anything
    else as {"content": text}."""
    if content.strip().startswith("{"):
        try:
            value = json.loads(content)
        except ValueError:
            value = None
        if isinstance(value, dict) and '"$ref"' not in content:
            return value
    return {"content": content}


def gemini_3(deployment: ModelEntry) -> bool:
    return not _BEFORE_GEMINI_3.match(_model(deployment).lower())


def _signature(call: dict[str, Any]) -> str | None:
    """The thought signature a client sends back with a tool call: where litellm put it
    (provider_specific_fields, the call's or its function's), else after the id's separator."""
    for fields in (call.get("provider_specific_fields"), (call.get("function") or {}).get("provider_specific_fields")):
        if isinstance(fields, dict) and fields.get("thought_signature"):
            return fields["thought_signature"]
    call_id = call.get("id")
    if isinstance(call_id, str) and THOUGHT_SIGNATURE_SEPARATOR in call_id:
        return call_id.split(THOUGHT_SIGNATURE_SEPARATOR, 1)[1]
    return None


def _function_call(call: dict[str, Any], first: bool, newer: bool) -> dict[str, Any]:
    """An assistant's tool call as a function_call part, as litellm builds it: Gemini 3
    gets the call's id (without its signature) and, on the message's first call, a
    signature (the dummy when the client sent none)."""
    function = call.get("function") or {}
    arguments = function.get("arguments")
    part: dict[str, Any] = {"function_call": {
        "name": function.get("name") or "",
        "args": {"type": "object"} if arguments == "" else json.loads(arguments or "{}")}}
    clean_id = (call.get("id") or "").split(THOUGHT_SIGNATURE_SEPARATOR, 1)[0] if newer else ""
    if clean_id:
        part["function_call"]["id"] = clean_id
    signature = _signature(call) or (DUMMY_THOUGHT_SIGNATURE if newer and first else None)
    if signature:
        part["thoughtSignature"] = signature
    return part


def to_generate_request(deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
    """The generateContent body litellm would send for `body` (one `covers()` accepts)."""
    newer = gemini_3(deployment)
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name (a tool result names its function)

    def add(role: str, parts: list[dict[str, Any]], results: bool = False) -> None:
        # Consecutive turns of one role are merged; tool results are merged only with tool results.
        last = contents[-1] if contents else None
        if last is not None and last["role"] == role and last.get("_results", False) == results:
            last["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts, "_results": results})

    for message in body.get("messages") or ():
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.append({"text": _text(content)})
        elif role == "user":
            add("user", _parts(content))
        elif role == "assistant":
            parts = _parts(content)
            for index, call in enumerate(message.get("tool_calls") or ()):
                names[call.get("id")] = (call.get("function") or {}).get("name") or ""
                parts.append(_function_call(call, index == 0, newer))
            if parts:
                add("model", parts)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            name = names.get(call_id) or message.get("name") or ""
            response: dict[str, Any] = {"name": name, "response": _tool_response(_text(content))}
            clean_id = call_id.split(THOUGHT_SIGNATURE_SEPARATOR, 1)[0] if newer and isinstance(call_id, str) else ""
            if clean_id:
                response["id"] = clean_id
            add("user", [{"function_response": response}], results=True)
    request: dict[str, Any] = {"contents": [{"role": c["role"], "parts": c["parts"]} for c in contents]}
    if system:
        request["system_instruction"] = {"parts": system}
    tools = [t["function"] for t in body.get("tools") or ()]
    if tools:
        declarations = []
        for function in tools:
            declaration = {"name": function["name"]}
            if function.get("description"):
                declaration["description"] = function["description"]
            if function.get("parameters") is not None:
                declaration["parameters"] = _schema(function["parameters"])
            declarations.append(declaration)
        request["tools"] = [{"function_declarations": declarations}]
    choice = body.get("tool_choice")
    if choice is not None and tools:
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            request["toolConfig"] = {"functionCallingConfig": {"mode": "ANY", "allowed_function_names": [name]}}
        elif choice in ("auto", "none", "required"):
            mode = {"auto": "AUTO", "none": "NONE", "required": "ANY"}[choice]
            request["toolConfig"] = {"functionCallingConfig": {"mode": mode}}
    config: dict[str, Any] = {}
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            config[key] = body[key]
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        config["response_mime_type"] = "application/json"
    stop = body.get("stop")
    if stop:
        config["stop_sequences"] = ([stop] if isinstance(stop, str) else list(stop))[:MAX_STOP_SEQUENCES]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit:
        config["max_output_tokens"] = limit
    if body.get("seed") is not None:
        config["seed"] = body["seed"]
    if body.get("n") is not None:
        config["candidate_count"] = body["n"]  # 1: covers() sends n > 1 to litellm
    if config:
        request["generationConfig"] = config
    return request


def _modalities(details: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for detail in details or ():
        modality = str(detail.get("modality", "")).upper()
        key = {"DOCUMENT": "text"}.get(modality, modality.lower())
        count = detail.get("tokenCount", 0)
        out[key] = out.get(key, 0) + (count if isinstance(count, int) else 0)
    return out


def usage_from(metadata: dict[str, Any]) -> dict[str, Any]:
    """Gemini's usageMetadata as litellm reports it (VertexGeminiConfig._calculate_usage),
    in the fields the gateway keeps: prompt_tokens includes the cached tokens (also in
    prompt_tokens_details.cached_tokens and cache_read_input_tokens); completion_tokens
    includes the thinking tokens (also in completion_tokens_details.reasoning_tokens)."""
    cached = metadata.get("cachedContentTokenCount")
    prompt = _modalities(metadata.get("promptTokensDetails"))
    cache = _modalities(metadata.get("cacheTokensDetails"))
    if cached is not None and "text" in prompt and "cacheTokensDetails" not in metadata:
        prompt["text"] -= cached
    if "video" in cache and "video" in prompt:
        prompt["video"] -= cache["video"]
    tool_use = metadata.get("toolUsePromptTokenCount") or None
    if "text" in prompt:
        prompt["text"] += tool_use or 0
    prompt_details: dict[str, Any] = {}
    if cached is not None:
        prompt_details["cached_tokens"] = cached
    if "cacheTokensDetails" in metadata and any(k in cache for k in ("text", "audio", "image")):
        prompt_details["cached_tokens_details"] = {f"{k}_tokens": cache.get(k) for k in ("text", "audio", "image")}
    for key in ("audio", "text", "image", "video"):
        if key in prompt:
            prompt_details[f"{key}_tokens"] = prompt[key]
    if tool_use:
        prompt_details["tool_use_tokens"] = tool_use
    candidates = metadata.get("candidatesTokenCount", 0)
    reasoning = metadata.get("thoughtsTokenCount")
    completion_details = {f"{k}_tokens": v for k, v in _modalities(metadata.get("candidatesTokensDetails")).items()
                          if k in ("text", "audio", "image", "video")}
    if candidates > 0 and "text_tokens" not in completion_details:
        completion_details["text_tokens"] = candidates - sum(completion_details.get(f"{k}_tokens", 0)
                                                             for k in ("image", "audio", "video"))
    if reasoning is not None:
        completion_details["reasoning_tokens"] = reasoning
    completion = candidates
    inclusive = metadata.get("promptTokenCount", 0) + candidates + (metadata.get("toolUsePromptTokenCount") or 0) \
        == metadata.get("totalTokenCount", 0)
    if reasoning and not inclusive:
        completion += reasoning
    usage: dict[str, Any] = {"prompt_tokens": metadata.get("promptTokenCount", 0) + (tool_use or 0),
                             "completion_tokens": completion, "total_tokens": metadata.get("totalTokenCount", 0)}
    if prompt_details:
        usage["prompt_tokens_details"] = prompt_details
    if completion_details:
        usage["completion_tokens_details"] = completion_details
    if cached is not None:
        usage["cache_read_input_tokens"] = cached
    return usage


def _tool_calls(parts: list[dict[str, Any]], first_index: int) -> list[dict[str, Any]]:
    """functionCall parts as OpenAI tool calls, as litellm reports them: Gemini's id (else
    call_ and a random hex), its thought signature after the id's separator and in
    provider_specific_fields."""
    calls = []
    for part in parts:
        call = part.get("functionCall")
        if isinstance(call, dict):
            tool_call: dict[str, Any] = {
                "id": call.get("id") or f"call_{uuid.uuid4().hex[:28]}", "type": "function",
                "function": {"name": call.get("name"), "arguments": json.dumps(call.get("args"), ensure_ascii=False)},
                "index": first_index + len(calls)}
            signature = part.get("thoughtSignature")
            if signature:
                tool_call["id"] += THOUGHT_SIGNATURE_SEPARATOR + signature
                tool_call["provider_specific_fields"] = {"thought_signature": signature}
            calls.append(tool_call)
    return calls


def _texts(parts: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    """(answer text, thought text) of a candidate's parts; None where there is none."""
    text = thought = None
    for part in parts:
        piece = part.get("text")
        if not isinstance(piece, str) or not piece:
            continue
        if part.get("thought") is True:
            thought = (thought or "") + piece
        else:
            text = (text or "") + piece
    return text, thought


def _chunk(base: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _finish(reason: str | None, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return _FINISH.get(reason, "stop") if reason else "stop"


def _filtered(response: dict[str, Any]) -> dict[str, Any]:
    """A blocked prompt or a flagged answer: no content, finish content_filter, as litellm
    reports it; but the usage whole, token classes included, as a streamed one is (litellm
    keeps only the three plain counts here: a flagged answer's thinking, which Google
    bills, went unbilled, and its cached prompt was priced as fresh)."""
    metadata = response.get("usageMetadata") or {}
    return {"id": f"chatcmpl-{uuid.uuid4()}", "object": "chat.completion", "created": int(time.time()),
            "model": response.get("modelVersion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": None}, "logprobs": None,
                         "finish_reason": "content_filter"}],
            "usage": usage_from(metadata)}


def from_response(response: dict[str, Any]) -> dict[str, Any]:
    """A generateContent answer as an OpenAI chat.completion."""
    candidates = response.get("candidates") or ()
    if "blockReason" in (response.get("promptFeedback") or {}) \
            or (candidates and candidates[0].get("finishReason") in _FLAGGED):
        return _filtered(response)
    choices = []
    for index, candidate in enumerate(candidates):
        parts = (candidate.get("content") or {}).get("parts") or []
        text, thought = _texts(parts)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thought is not None:
            message["reasoning_content"] = thought
        calls = _tool_calls(parts, 0)
        if calls:
            message["tool_calls"] = calls
        choices.append({"index": candidate.get("index", index), "message": message, "logprobs": None,
                        "finish_reason": _finish(candidate.get("finishReason"), bool(calls))})
    if not choices:
        raise UpstreamError("bad_response", "the upstream response had no candidates")
    answer = {"id": response.get("responseId") or f"chatcmpl-{uuid.uuid4()}", "object": "chat.completion",
              "created": int(time.time()), "model": response.get("modelVersion"), "choices": choices}
    if isinstance(response.get("usageMetadata"), dict):
        answer["usage"] = usage_from(response["usageMetadata"])
    return answer


def _targets_of(deployment: ModelEntry) -> tuple[Target, Target, bytes, bytes]:
    """generateContent and streamGenerateContent of the deployment's model, and the header
    lines for a whole answer and for a stream."""
    params = deployment.litellm_params
    default = GEMINI_3_DEFAULT_BASE if gemini_3(deployment) else GEMINI_DEFAULT_BASE
    url = f"{(params.api_base or default).rstrip('/')}/models/{_model(deployment)}"
    head = f"Content-Type: application/json\r\nx-goog-api-key: {params.api_key}\r\n"
    proxy = deployment.proxy
    return (Target(url + ":generateContent", proxy=proxy), Target(url + ":streamGenerateContent?alt=sse", proxy=proxy),
            (head + "Accept: application/json\r\n").encode("latin-1"),
            (head + "Accept: text/event-stream\r\n").encode("latin-1"))


class GeminiNativeDispatcher(Translation):
    """generateContent over the native dispatcher's connection pool (`NativeOpenAIDispatcher`)
    for what `covers()` accepts; litellm for the rest."""

    def __init__(self, native: Any, litellm: Any) -> None:
        super().__init__(native, litellm)
        self._targets: TargetCache[tuple[Target, Target, bytes, bytes]] = TargetCache(_targets_of)

    def covers(self, deployment: ModelEntry, body: dict[str, Any]) -> bool:
        return covers(deployment, body)

    def _target(self, deployment: ModelEntry, stream: bool) -> tuple[Target, bytes]:
        whole, streamed, whole_head, stream_head = self._targets.get(deployment)
        return (streamed, stream_head) if stream else (whole, whole_head)

    async def translated_chat(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        target, headers = self._target(deployment, False)
        total, connect = call_timeouts(deployment, False)
        try:
            response = await self.native.post_json(target, headers,
                                                   orjson.dumps(to_generate_request(deployment, body)), total, connect)
        except UpstreamError as err:
            raise litellm_status(err) from None
        return from_response(response)

    def translated_stream(self, deployment: ModelEntry, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream(deployment, to_generate_request(deployment, body))

    async def _stream(self, deployment: ModelEntry, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Each SSE event (a partial GenerateContentResponse) as OpenAI chunks; the last
        event's usageMetadata as the usage chunk. The body's end closes the stream."""
        target, headers = self._target(deployment, True)
        total, connect = call_timeouts(deployment, True)
        try:
            resp = await self.native.open_stream(target, headers, orjson.dumps(request), total, connect)
        except UpstreamError as err:
            raise litellm_status(err) from None
        finished = False
        end = StreamEnd()
        base: dict[str, Any] = {"id": None, "object": "chat.completion.chunk", "created": int(time.time()),
                                "model": _model(deployment)}
        metadata: dict[str, Any] | None = None
        calls = 0
        started = False
        try:
            async for line in resp.iter_lines():
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                event = json_object(line[5:].strip(), "stream event")
                if "error" in event and "candidates" not in event:
                    error = event["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    raise UpstreamError("truncated", f"the upstream stream failed: {redact(str(message))}")
                base["id"] = base["id"] or event.get("responseId")
                if isinstance(event.get("usageMetadata"), dict):
                    metadata = event["usageMetadata"]
                for candidate in (event.get("candidates") or ())[:1]:
                    parts = (candidate.get("content") or {}).get("parts") or []
                    text, thought = _texts(parts)
                    delta: dict[str, Any] = {} if started else {"role": "assistant"}
                    if text is not None:
                        delta["content"] = text
                    if thought is not None:
                        delta["reasoning_content"] = thought
                    tool_calls = _tool_calls(parts, calls)
                    if tool_calls:
                        delta["tool_calls"] = tool_calls
                        calls += len(tool_calls)
                    if len(delta) > (0 if started else 1):
                        started = True
                        yield _chunk(base, delta)
                    if candidate.get("finishReason"):
                        final = _chunk(base, {} if started else {"role": "assistant"},
                                       _finish(candidate["finishReason"], calls > 0))
                        started = True
                        end.observe(final)
                        yield final
            finished = True
            if not end.complete:
                raise UpstreamError("truncated", "the upstream stream ended before its finishReason")
            if metadata is not None:
                yield {**base, "choices": [], "usage": usage_from(metadata)}
        except UpstreamError:
            raise
        except (UpstreamProtocolError, OSError) as exc:
            if not end.complete:
                raise UpstreamError("truncated", f"the upstream stream broke off: {type(exc).__name__}") from None
            if metadata is not None:
                yield {**base, "choices": [], "usage": usage_from(metadata)}
        finally:
            release_or_close(resp, finished)
