"""idempotency: a client retrying with the same `Idempotency-Key` is never charged twice.

    energy:
      idempotency_window: 24h       # how long a key is remembered
    plugins:
      - auth
      - idempotency                 # after auth, BEFORE energy
      - energy

Keys are per user. The first request with a key claims it atomically in the store.
A retry while the first is still running gets 409 `idempotency_key_in_use` (the OpenAI
SDKs retry 409 after a back-off, by which time the first has finished). A retry after
it succeeded gets the first result again (`Idempotent-Replayed: true`), without a new
upstream call or charge; a stream is replayed as a short stream. A retry after the
first *failed* runs normally: failures refund, so there is nothing to protect. The same
key with a different body is a client bug: 422 `idempotency_key_reused`.

A claim whose process died mid-request is taken over after a lease longer than any request
the config's timeouts and retries allow (`Config.longest_request` plus a minute, at least
15 minutes); `idempotency_window` shorter than the longest request is a config error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time

import orjson

from gateway.chat_stream import StreamAssembler
from gateway.store import IN_FLIGHT_LEASE
from gateway.usage import openai_usage
from plugins.base import TOOL_ENDPOINTS, Plugin, Reject, RequestContext

MAX_KEY_LENGTH = 255


def fingerprint(ctx: RequestContext) -> str:
    """The request as the client sent it. Gateway rewrites (the workspace prompt and
    defaults, recorded by workspace_prompt before it rewrites) are not the client's: a
    retry of the same request must match even if the workspace settings changed since."""
    client_body = ctx.scratch("workspace_prompt").get("client_body")
    if client_body is not None:
        body = dict(client_body)
    else:
        body = dict(ctx.body)
        body["model"] = ctx.requested_model
    digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    if ctx.inbound_body is not None:  # another API's body: what its OpenAI form lacks counts too
        digest.update(orjson.dumps(ctx.inbound_body, option=orjson.OPT_SORT_KEYS))
    digest.update(f"|{ctx.endpoint}|{ctx.action}".encode())
    return digest.hexdigest()


def completion_from_stream(ctx: RequestContext) -> dict:
    """What a streamed request produced, as the non-streamed completion it amounts to (for
    replays): every choice of a chat stream whole, as gateway/chat_stream.py assembled it.
    A choice the stream never finished (its client left) keeps `finish_reason: null`, and
    one it never began is there so, so a replayed stream refuses a cut-off answer."""
    usage = None if ctx.usage is None else openai_usage(ctx.usage)
    assembled = ctx.stream_assembler
    if assembled is not None and assembled.choices:
        response = assembled.completion({"id": assembled.id or f"chatcmpl-{ctx.request_id}",
                                         "created": assembled.created or int(time.time()), "model": ctx.model})
        for index in range(len(response["choices"]), ctx.body.get("n") or 1):
            response["choices"].append({"index": index, "message": {"role": "assistant", "content": None},
                                        "logprobs": None, "finish_reason": None})
    else:  # a stream the core does not assemble (another API's events): its text
        response = {
            "id": f"chatcmpl-{ctx.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": ctx.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(ctx.streamed_text)},
                         "logprobs": None, "finish_reason": ctx.finish_reason}],
        }
    if usage is not None:
        response["usage"] = usage
    return response


class Idempotency(Plugin):
    name = "idempotency"

    async def on_request(self, ctx: RequestContext) -> None:
        key = ctx.headers.get("Idempotency-Key")
        if not key or ctx.identity is None or not ctx.billed or ctx.endpoint in TOOL_ENDPOINTS:
            return  # a tool call is not replayed: its answer is the upstream's, live (docs/mcp.md)
        if len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
            raise Reject(400, f"Idempotency-Key must be printable ASCII of at most {MAX_KEY_LENGTH} characters.",
                         param="Idempotency-Key", code="invalid_idempotency_key")
        claiming = asyncio.ensure_future(self.services.store.begin_idempotent(
            ctx.identity.user_id, key, ctx.request_id, fingerprint=fingerprint(ctx),
            window=ctx.config.energy.idempotency_window, lease=ctx.config.outlasting_requests(IN_FLIGHT_LEASE)))
        try:
            state = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            # Cancelled while the store writes the claim (it completes anyway): release it,
            # or retries would get 409 until the lease runs out.
            with contextlib.suppress(Exception):
                if (await claiming).status == "new":
                    await self.services.store.release_idempotent(ctx.identity.user_id, key,
                                                                 request_id=ctx.request_id)
            raise
        if state.status == "new":
            ctx.scratch(self.name)["key"] = key
            ctx.end_promptly = True  # a retry must find the stored answer, not "in progress"
            if ctx.stream:
                ctx.stream_assembler = StreamAssembler()  # the replay gives back every choice whole
        elif state.status == "in_flight":
            raise Reject(409, "A request with this Idempotency-Key is still in progress; retry shortly.",
                         type="invalid_request_error", code="idempotency_key_in_use")
        elif state.status == "mismatch":
            raise Reject(422, "This Idempotency-Key was already used with a different request.",
                         type="invalid_request_error", code="idempotency_key_reused")
        else:  # done: replay the first outcome
            ctx.short_circuit = orjson.loads(state.body)
            ctx.model = ctx.short_circuit.get("model") or ctx.requested_model
            ctx.candidates = [ctx.model]
            ctx.response_headers["Idempotent-Replayed"] = "true"
            # The chain stops here (energy never runs), yet every answer to an
            # authenticated request says what it cost and what is left.
            ctx.response_headers["X-Energy-Cost"] = "0"
            ctx.response_headers["X-Energy-Remaining"] = str(await self.services.store.balance(ctx.identity.user_id))
            ctx.response_headers["X-Original-Request-Id"] = state.request_id

    async def on_response(self, ctx: RequestContext) -> None:
        key = ctx.scratch(self.name).get("key")
        if key is None:
            return
        # A client that left mid-stream was charged; its retry gets the replay, not a 2nd charge.
        body = ctx.response if ctx.response is not None else completion_from_stream(ctx)
        await self.services.store.finish_idempotent(ctx.identity.user_id, key, 200, orjson.dumps(body),
                                                    request_id=ctx.request_id)

    async def on_error(self, ctx: RequestContext) -> None:
        key = ctx.scratch(self.name).get("key")
        if key is not None:
            await self.services.store.release_idempotent(ctx.identity.user_id, key, request_id=ctx.request_id)
