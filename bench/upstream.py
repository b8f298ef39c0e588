"""A minimal, fast fake upstream for the benchmark (not the test fake: no faults, no checks).

    python bench/upstream.py --port 9001 [--chunks 10] [--chunk-delay-ms 20]

POST /v1/chat/completions  OpenAI wire: a fixed small `chat.completion` with usage, or, with
                           `"stream": true`, SSE: `--chunks` content chunks `--chunk-delay-ms`
                           apart, a finish chunk, a usage chunk when
                           `stream_options.include_usage`, then `data: [DONE]`.
POST /v1/messages          Anthropic wire (non-stream), for the litellm path.
POST /v1/responses         OpenAI's Responses API (non-stream): a fixed small `response` with usage.
GET  /health               200, for the start-up wait.

Answers are pre-serialised so the upstream costs as little CPU as possible: the benchmark
measures the gateway, and everything shares two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

REPLY = "Hello from the bench upstream."
USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}

COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "gpt-bench",
    "system_fingerprint": "fp_bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY, "refusal": None},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": USAGE,
}).encode()

ANTHROPIC_MESSAGE = json.dumps({
    "id": "msg_bench", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
    "content": [{"type": "text", "text": REPLY}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 7, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": 0},
}).encode()


RESPONSE = json.dumps({
    "id": "resp_bench", "object": "response", "created_at": 1700000000, "status": "completed",
    "model": "gpt-bench", "error": None, "incomplete_details": None,
    "output": [{"type": "message", "id": "msg_bench", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": REPLY, "annotations": []}]}],
    "usage": {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 7,
              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 19},
}).encode()


def _chunk(choices: list, **extra) -> bytes:
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "gpt-bench", "system_fingerprint": "fp_bench", "choices": choices, **extra}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def make_app(chunks: int, chunk_delay: float) -> web.Application:
    content_chunks = [
        _chunk([{"index": 0, "delta": ({"role": "assistant", "content": f"w{i} "} if i == 0 else {"content": f"w{i} "}),
                 "logprobs": None, "finish_reason": None}])
        for i in range(chunks)]
    finish_chunk = _chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
    usage_chunk = _chunk([], usage=USAGE)

    async def chat(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        # Cheap check instead of a full parse on the hot non-streaming path.
        if b'"stream"' not in raw or not json.loads(raw).get("stream"):
            return web.Response(body=COMPLETION, content_type="application/json")
        body = json.loads(raw)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i, data in enumerate(content_chunks):
            if i and chunk_delay:
                await asyncio.sleep(chunk_delay)
            await resp.write(data)
        await resp.write(finish_chunk)
        if include_usage:
            await resp.write(usage_chunk)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def messages(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANTHROPIC_MESSAGE, content_type="application/json")

    async def responses(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=RESPONSE, content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/chat/completions", chat)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/messages", messages)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/responses", responses)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--chunk-delay-ms", type=float, default=20.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(args.chunks, args.chunk_delay_ms / 1000), host=args.host, port=args.port,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
