"""The offline demo model: answers without a network or a provider key.

Configured like any deployment, with `litellm_params.model: demo/<anything>`. It lets
`make run` and the README's curl example work on a fresh machine, and it is loudly
labelled: every answer starts with "[offline demo model]" so nobody mistakes it for a
real LLM.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from typing import Any, AsyncIterator

from gateway.config import ModelEntry
from gateway.providers.base import Dispatcher

LABEL = "[offline demo model]"


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _words(text: str) -> int:
    return max(1, len(text.split()))


def demo_reply(body: dict[str, Any]) -> str:
    said = _last_user_text(body).strip().replace("\n", " ")
    if len(said) > 200:
        said = said[:200] + "..."
    return (f"{LABEL} This gateway is running without provider keys, so this is a canned "
            f"answer. You said: \"{said}\". Add a provider key in config.yaml for real answers.")


def _usage(body: dict[str, Any], reply: str) -> dict[str, int]:
    prompt = sum(_words(str(m.get("content", ""))) for m in body.get("messages") or [] if isinstance(m, dict))
    completion = _words(reply)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class DemoDispatcher(Dispatcher):
    async def chat(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        reply = demo_reply(body)
        return {
            "id": f"chatcmpl-demo-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": deployment.litellm_params.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": _usage(body, reply),
        }

    async def chat_stream(self, deployment: ModelEntry, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        reply = demo_reply(body)
        base = {"id": f"chatcmpl-demo-{uuid.uuid4().hex[:12]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": deployment.litellm_params.model}
        words = reply.split(" ")
        for i, word in enumerate(words):
            delta: dict[str, Any] = {"content": word if i == 0 else " " + word}
            if i == 0:
                delta["role"] = "assistant"
            yield {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
            await asyncio.sleep(0)
        yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}
        yield {**base, "choices": [], "usage": _usage(body, reply)}

    async def embeddings(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for i, item in enumerate(items):
            digest = hashlib.sha256(str(item).encode()).digest()
            data.append({"object": "embedding", "index": i,
                         "embedding": [round(b / 255 - 0.5, 6) for b in digest[:16]]})
        tokens = sum(_words(str(x)) for x in items)
        return {"object": "list", "data": data, "model": deployment.litellm_params.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
