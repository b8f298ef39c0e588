"""What a client's request body may be: read, parsed and checked before anything uses it.

A client's body is data, never a library's keyword arguments. Per endpoint, only the
parameters of the OpenAI API for that endpoint are accepted (`CHAT_PARAMS`,
`EMBEDDINGS_PARAMS`, copied from the `openai` package's typed params; tests/test_allowlist.py
fails when the SDK documents a parameter these lists lack, or when they hold one it does
not). Anything else is a 400 `unknown_parameter` naming it, unless the operator lets a
model take it as a provider body field (`models[].allow_extra_params`). Fields that would
choose the upstream or its credentials keep their own, louder 400 `forbidden_parameter`.

Why an allowlist: litellm turns every keyword it does not know into provider or callback
configuration. A body carrying `success_callback` + `langsmith_base_url` made litellm post
the prompt, the answer and the deployment's api_base to a URL of the client's choosing;
`mock_timeout` parked a worker thread of the shared executor per request. A denylist
cannot keep up with litellm's ~200 keywords; the OpenAI API's ~40 parameters can be named.

Every field the gateway itself reads is type-checked here, as are the OpenAI parameters'
top-level types, so a wrong type is a 400 naming the field, not a failure deeper down.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any, Iterable

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from gateway.errors import ApiError, bad_request
from gateway.object_ids import refuse_object_ids

# POST /v1/chat/completions: openai-python 3.57's CompletionCreateParams, plus `stream`.
CHAT_PARAMS = frozenset({
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "messages", "metadata", "modalities", "model",
    "moderation", "n", "parallel_tool_calls", "prediction", "presence_penalty",
    "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "reasoning_effort",
    "response_format", "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
    "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
    "verbosity", "web_search_options",
})
# POST /v1/embeddings: openai-python 3.57's EmbeddingCreateParams, plus the gateway's
# `metadata` (action, prospect_id), which the chat endpoint accepts too.
EMBEDDINGS_PARAMS = frozenset({"dimensions", "encoding_format", "input", "model", "user", "metadata"})

# POST /v1/responses: openai-python 3.57's ResponseCreateParams, plus `stream`.
RESPONSES_PARAMS = frozenset({
    "access_programs", "background", "background_options", "context_management", "conversation", "image",
    "include", "input", "instructions", "max_output_tokens", "max_tool_calls", "metadata", "model",
    "moderation", "parallel_tool_calls", "previous_response_id", "prompt", "prompt_cache_key",
    "prompt_cache_options", "prompt_cache_retention", "reasoning", "safety_identifier", "service_tier",
    "store", "stream", "stream_options", "temperature", "text", "tool_choice", "tools", "top_logprobs",
    "top_p", "truncation", "user",
})

# What a dispatcher may hand on. `metadata` is the gateway's (read, then removed from the
# body); to litellm it would be callback configuration, so it never reaches one.
DISPATCH_PARAMS = {
    "chat.completions": CHAT_PARAMS - {"metadata", "model"},
    "embeddings": EMBEDDINGS_PARAMS - {"metadata", "model"},
    "responses": RESPONSES_PARAMS - {"metadata", "model"},
}

# Body fields that would let a client choose the upstream, its credentials or a canned
# answer: refused with `forbidden_parameter` (also not allowed in allow_extra_params).
FORBIDDEN_FIELDS = frozenset({
    "api_base", "base_url", "api_key", "api_version", "custom_llm_provider",
    "mock_response", "mock_tool_calls", "azure_ad_token", "aws_access_key_id",
    "aws_secret_access_key", "aws_session_token", "vertex_credentials",
    "litellm_params", "extra_headers", "headers", "organization", "deployment_id",
    "input_cost_per_token", "output_cost_per_token", "litellm_logging_obj",
    "num_retries", "fallbacks", "timeout", "client", "proxy_server_request", "model_list",
})

# JSON nesting a body may have. Tool schemas nest, but not this deep; orjson refuses to
# write past 255 levels, so a deeper body would fail on its way upstream.
MAX_DEPTH = 64

# Request Content-Encodings aiohttp decodes as it reads (br needs a package we do not ship).
_DECODED_ENCODINGS = frozenset({"identity", "gzip", "x-gzip", "deflate"})
_VALID_ROLES = frozenset({"system", "user", "assistant", "tool", "function", "developer"})
_NUMBER = (int, float)
# Top-level types of the OpenAI parameters (null is always allowed: "not set").
_CHAT_TYPES: dict[str, tuple[type, ...]] = {
    "audio": (dict,), "frequency_penalty": _NUMBER, "function_call": (str, dict), "functions": (list,),
    "logit_bias": (dict,), "logprobs": (bool,), "max_completion_tokens": (int,), "max_tokens": (int,),
    "metadata": (dict,), "modalities": (list,), "moderation": (dict, bool, str), "n": (int,),
    "parallel_tool_calls": (bool,), "prediction": (dict,), "presence_penalty": _NUMBER,
    "prompt_cache_key": (str,), "prompt_cache_options": (dict,), "prompt_cache_retention": (str,),
    "reasoning_effort": (str,), "response_format": (dict,), "safety_identifier": (str,), "seed": (int,),
    "service_tier": (str,), "stop": (str, list), "store": (bool,), "stream": (bool,),
    "stream_options": (dict,), "temperature": _NUMBER, "tool_choice": (str, dict), "tools": (list,),
    "top_logprobs": (int,), "top_p": _NUMBER, "user": (str,), "verbosity": (str,),
    "web_search_options": (dict,),
}
_EMBEDDINGS_TYPES: dict[str, tuple[type, ...]] = {
    "dimensions": (int,), "encoding_format": (str,), "user": (str,), "metadata": (dict,),
}
_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number"}


async def read_json(request: web.Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, or a 400/413/415 ApiError."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding and encoding not in _DECODED_ENCODINGS:
        raise ApiError(415, f"Content-Encoding '{_clean_header(encoding)}' is not supported; "
                            f"send identity, gzip or deflate", code="unsupported_content_encoding")
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body is larger than the {limit} byte limit", code="request_too_large")
    try:
        # read(n) returns what is buffered so far: loop until EOF or just past the limit,
        # so a body uploaded in pieces (chunked, no Content-Length) is read whole.
        blocks, size = [], 0
        while size <= limit:
            block = await request.content.read(limit + 1 - size)
            if not block:
                break
            blocks.append(block)
            size += len(block)
        raw = b"".join(blocks)
    except (asyncio.TimeoutError, ConnectionError):
        raise bad_request("could not read the request body") from None
    except (RequestPayloadError, HttpProcessingError, zlib.error, ValueError, EOFError, OSError):
        # aiohttp decodes Content-Encoding (gzip, deflate, br) as it reads: a body that is
        # not what its header says fails here.
        encoding = _clean_header(request.headers.get("Content-Encoding", ""))
        raise bad_request(f"the request body could not be decoded as Content-Encoding '{encoding}'"
                          if encoding else "the request body could not be read",
                          code="invalid_content_encoding" if encoding else "invalid_body") from None
    if len(raw) > limit:
        raise ApiError(413, f"request body is larger than the {limit} byte limit", code="request_too_large")
    if not raw.strip():
        raise bad_request("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc.args[0] if exc.args else 'parse error'}") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH:  # fewer brackets cannot nest deeper: no walk
        check_nesting(body)
    return body


def _clean_header(value: str) -> str:
    return value[:40].encode("utf-8", "replace").decode("utf-8")


def check_nesting(body: dict[str, Any], limit: int = MAX_DEPTH) -> None:
    """400 when objects and arrays nest deeper than `limit` anywhere in the body."""
    stack: list[tuple[Any, int]] = [(v, 2) for v in body.values() if isinstance(v, (dict, list))]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise bad_request(f"the request body nests objects and arrays more than {limit} levels deep",
                              code="nesting_too_deep")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((v, depth + 1) for v in children if isinstance(v, (dict, list)))


def check_params(body: dict[str, Any], allowed: frozenset[str], extra: Iterable[str] = ()) -> None:
    """Forbidden fields, then fields that are neither the endpoint's nor opted in: 400."""
    unknown = [key for key in body if key not in allowed]
    if not unknown:
        return
    for key in unknown:
        if key in FORBIDDEN_FIELDS:
            raise bad_request(f"'{key}' is not allowed: the gateway chooses the upstream and its credentials",
                              param=key, code="forbidden_parameter")
    extras = frozenset(extra)
    for key in unknown:
        if key not in extras:
            raise bad_request(f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter")


def _check_types(body: dict[str, Any], types: dict[str, tuple[type, ...]]) -> None:
    for key, value in body.items():
        expected = types.get(key)
        if expected is None or value is None:
            continue
        wrong = not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected)
        if wrong:
            names = " or ".join(_TYPE_NAMES[t] for t in expected if t in _TYPE_NAMES)
            raise bad_request(f"'{key}' must be {names}", param=key, code="invalid_type")


def _positive_int(body: dict[str, Any], key: str) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > 10_000_000:
        raise bad_request(f"'{key}' must be a positive integer", param=key)


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' is required and must be a non-empty string", param="model")
    return model


def _check_metadata(body: dict[str, Any]) -> None:
    metadata = body.get("metadata")
    if metadata is None:
        return
    for key in ("action", "prospect_id"):
        value = metadata.get(key)
        if value is not None and not isinstance(value, (str, int)):
            raise bad_request(f"'metadata.{key}' must be a string", param=f"metadata.{key}", code="invalid_type")


def validate_chat(body: dict[str, Any], extra: Iterable[str] = (), owned_files: frozenset[str] = frozenset()) -> None:
    """A chat completions body: its parameters, their types, the messages' shape."""
    check_params(body, CHAT_PARAMS, extra)
    _check_types(body, _CHAT_TYPES)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in _VALID_ROLES:
            raise bad_request(f"messages[{i}].role must be one of {sorted(_VALID_ROLES)}", param=f"messages[{i}].role")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad_request(f"messages[{i}].content must be a string or an array", param=f"messages[{i}].content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise bad_request(f"messages[{i}].content[{j}] must be an object with a string 'type'",
                                      param=f"messages[{i}].content[{j}]")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        _positive_int(body, key)
    stop = body.get("stop")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise bad_request("'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    options = body.get("stream_options")
    if options and options.get("include_usage") is not None and not isinstance(options["include_usage"], bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", param="stream_options.include_usage",
                          code="invalid_type")
    for key in ("tools", "functions"):
        for j, tool in enumerate(body.get(key) or ()):
            if not isinstance(tool, dict):
                raise bad_request(f"{key}[{j}] must be an object", param=f"{key}[{j}]", code="invalid_type")
    _check_metadata(body)
    refuse_object_ids("chat.completions", body, owned_files)


def validate_embeddings(body: dict[str, Any], extra: Iterable[str] = (), owned_files: frozenset[str] = frozenset()) -> None:
    """An embeddings body: a non-empty string, array of strings, or array(s) of token ids."""
    check_params(body, EMBEDDINGS_PARAMS, extra)
    _check_types(body, _EMBEDDINGS_TYPES)
    value = body.get("input")
    ok = (isinstance(value, str) and value) or (isinstance(value, list) and value and (
        all(isinstance(v, str) for v in value)
        or all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or all(isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
               for v in value)))
    if not ok:
        raise bad_request("'input' is required: a non-empty string, array of strings or array of token arrays",
                          param="input")
    _positive_int(body, "dimensions")
    _check_metadata(body)
    refuse_object_ids("embeddings", body)


_RESPONSES_TYPES: dict[str, tuple[type, ...]] = {
    "input": (str, list), "instructions": (str,), "max_output_tokens": (int,), "metadata": (dict,),
    "parallel_tool_calls": (bool,), "previous_response_id": (str,), "reasoning": (dict,), "store": (bool,),
    "stream": (bool,), "stream_options": (dict,), "temperature": _NUMBER, "text": (dict,),
    "tool_choice": (str, dict), "tools": (list,), "top_p": _NUMBER, "truncation": (str,), "user": (str,),
    "include": (list,), "background": (bool,), "service_tier": (str,), "prompt_cache_key": (str,),
    "safety_identifier": (str,), "top_logprobs": (int,), "max_tool_calls": (int,), "conversation": (str, dict),
}


def validate_responses(body: dict[str, Any], extra: Iterable[str] = (), owned_files: frozenset[str] = frozenset()) -> None:
    """A Responses API body: its parameters and their types; `input` required."""
    check_params(body, RESPONSES_PARAMS, extra)
    _check_types(body, _RESPONSES_TYPES)
    value = body.get("input")
    if not (isinstance(value, str) and value) and not (isinstance(value, list) and value):
        raise bad_request("'input' is required: a non-empty string or array", param="input")
    if body.get("background"):
        raise bad_request("'background' responses are not supported by the gateway (their cost could not be "
                          "settled with the request)", param="background", code="unsupported_parameter")
    refuse_object_ids("responses", body, owned_files)  # item_reference, conversation, file ids, ... (gateway/object_ids.py)
    _positive_int(body, "max_output_tokens")
    _check_metadata(body)
