"""The native Azure OpenAI path: the OpenAI-wire pass-through (gateway/providers/openai.py) at Azure's
URLs, with the few rewrites litellm's Azure provider makes to a plain request.

Azure OpenAI speaks OpenAI's wire format; what differs is where and how to call it
(`{api_base}/openai/deployments/{deployment}/chat/completions?api-version=...` and an
`api-key` header: `gateway.providers.openai._endpoint`) and the content filter verdicts Azure adds
to answers, which litellm does not hand on (`gateway.providers.openai._without_azure_filters`).
On its way, litellm's Azure provider also rewrites a few things a client would notice
(tests/test_provider_parity.py holds both paths to the same request and answer):
`developer` messages become `system` ones, an assistant's `content: null` is left out,
`stop` keeps its first four sequences,
`tool_choice` without `tools` is dropped. Requests that litellm would treat in ways not
repeated here go to litellm (`covers()`): reasoning deployments (o1/o3/o4, gpt-5: their
own parameter rules), tool schemas with combinators or patterns (litellm flattens them),
`response_format`/`tool_choice` on API versions older than 2024-06, message parts beyond
text and images, `cache_control` breakpoints, and OpenAI parameters litellm does not
send to Azure.

Measured in one session (as gateway/providers/gemini.py's, same run): 188-191 us of CPU per
non-streamed call on this path against 4,100-4,305 us through litellm.
"""

from __future__ import annotations

import re
from typing import Any, AsyncIterator

import orjson

from gateway.config import ModelEntry
from gateway.providers.base import Translation
from gateway.providers.openai import azure_api_version, upstream_model

# The OpenAI parameters litellm sends to an Azure (non-reasoning) deployment as they are
# (AzureOpenAIConfig.get_supported_openai_params, less those with rules of their own).
_COVERED = frozenset({"model", "messages", "stream", "stream_options", "temperature", "top_p", "n", "stop",
                      "max_tokens", "max_completion_tokens", "tools", "tool_choice", "presence_penalty",
                      "frequency_penalty", "logit_bias", "user", "logprobs", "top_logprobs", "response_format",
                      "seed", "parallel_tool_calls"})
_REASONING = re.compile(r"o1|o3|o4|o_series/|gpt-5|gpt-6|gpt5_series")
_REWRITTEN_SCHEMA = (b'"anyOf"', b'"oneOf"', b'"allOf"', b'"pattern"')
_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
MAX_STOP_SEQUENCES = 4  # litellm keeps the first four (OpenAI's limit)


def _plain_content(content: Any) -> bool:
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(part, dict) and "cache_control" not in part and (
            (part.get("type") == "text" and isinstance(part.get("text"), str))
            or (part.get("type") == "image_url" and isinstance(part.get("image_url"), dict)))
        for part in content)


def covers(deployment: ModelEntry, body: dict[str, Any]) -> bool:
    """Whether sending `body` as it is (after `to_azure_body`) is what litellm would send."""
    if _REASONING.search(upstream_model(deployment)):
        return False
    extra = body.keys() - _COVERED
    if extra and not extra <= set(deployment.allow_extra_params):
        return False
    version = azure_api_version(deployment)
    if (body.get("tool_choice") is not None or isinstance(body.get("response_format"), dict)) \
            and re.match(r"\d{4}-\d{2}", version) and version[:7] < "2024-06":
        return False
    if isinstance(body.get("response_format"), dict) and re.search(r"gpt-?3[.-]?5", upstream_model(deployment)):
        return False
    for message in body.get("messages") or ():
        if not isinstance(message, dict) or not message.keys() <= _MESSAGE_KEYS:
            return False
        if not _plain_content(message.get("content")):
            return False
        if message.get("role") == "tool" and not isinstance(message.get("content"), str):
            return False
        if message.get("role") == "developer" and len(message) > 2:
            return False  # litellm keeps its role and content only
        if "__thought__" in str(message.get("tool_call_id") or "") or any(
                "__thought__" in str(call.get("id") or "") for call in message.get("tool_calls") or ()
                if isinstance(call, dict)):
            return False  # a Gemini tool call's signature, which litellm cuts off its id
    if body.get("tools") and any(marker in orjson.dumps(body["tools"]) for marker in _REWRITTEN_SCHEMA):
        return False
    return True


def _rewritten(message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    if message.get("role") == "developer":
        return {"role": "system", "content": message.get("content")}
    if message.get("role") == "assistant" and "content" in message and message["content"] is None:
        return {k: v for k, v in message.items() if k != "content"}
    return message


def to_azure_body(body: dict[str, Any]) -> dict[str, Any]:
    """litellm's rewrites of a covered request: developer -> system, an assistant's null
    content left out, stop[:4], no tool_choice without tools."""
    out = body
    messages = body.get("messages")
    if isinstance(messages, list) and any(_rewritten(m) is not m for m in messages):
        out = {**out, "messages": [_rewritten(m) for m in messages]}
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
        out = {**out, "stop": stop[:MAX_STOP_SEQUENCES]}
    if "tool_choice" in body and not body.get("tools"):
        out = {k: v for k, v in out.items() if k != "tool_choice"}
    return out


class AzureNativeDispatcher(Translation):
    """Azure OpenAI through the native dispatcher (its URLs, key header and filters live
    there) for what `covers()` accepts; litellm for the rest."""

    def covers(self, deployment: ModelEntry, body: dict[str, Any]) -> bool:
        return covers(deployment, body)

    async def translated_chat(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        return await self.native.chat(deployment, to_azure_body(body))

    def translated_stream(self, deployment: ModelEntry, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self.native.chat_stream(deployment, to_azure_body(body))

    async def embeddings(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        return await self.native.embeddings(deployment, body)
