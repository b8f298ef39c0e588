"""cache: an exact response cache for chat completions, opt-in per model and per action.

    plugins:
      - auth
      - tier_policy
      - name: cache                 # after tier_policy, before energy
        settings:
          models: [gpt-4o-mini]     # which public models are cached ("*": all) ...
          actions: [faq_answer]     # ... and/or which actions (metadata.action / X-Action)
          ttl: 1h
          max_bytes: 64MB           # in-process LRU bound (memory backend)
          max_entry_bytes: 1MB      # larger answers are not stored
          backend: memory           # or redis: shared by every gateway process and replica
          redis_url: redis://127.0.0.1:6379/0
          key_prefix: gw:cache
          cache_sampled: false      # true: cache temperature > 0 answers too
          workspaces:               # per workspace (name or id): off, or another ttl
            acme: {enabled: false}
      - energy
    energy:
      actions:
        faq_answer: {default: 2, cache_hit_price: 0}   # what a hit costs (default: the full price)

What is cached: a chat completion of a listed model or action that can be repeated. The
key is the workspace, the public model that serves the request (after the tier's
downgrades) and the request body with its keys sorted, minus the fields that do not change
the answer (`metadata`, `user`, `stream`, `stream_options`). An answer never crosses
workspaces. Not cached (X-Cache: BYPASS): sampled requests (`temperature` > 0, which
OpenAI's default of 1 is, unless `cache_sampled: true`; `n > 1` sampled, always).

Exact replay: only an answer the cache can give back whole, in either form, is stored.
A hit equals the miss's answer field for field (every choice of `n > 1`, each choice's
logprobs, finish reason, refusal, tool calls, `system_fingerprint`, `service_tier`, usage)
except `id`, `created` and the cache headers (gateway/chat_stream.py assembles a stream
and replays a stored answer). Not stored: an answer with fewer choices than `n`; one
without a field the request asked for (`logprobs`, `top_logprobs`: a stream that did not
carry them); a stream with parts not assembled here (tool calls, audio, annotations) or a
JSON answer with parts a replayed stream would not carry; an answer that failed or was
cut off, or whose usage the provider did not report (a hit's row must carry the real
tokens); an answer passed through in the client's own format (POST /v1/messages to an
Anthropic upstream: a hit would be the gateway's translation of it, without its
`thinking` blocks, citations, `stop_sequence`, `usage.cache_creation`, `service_tier` or
events as Anthropic sent them).

A stream is answered from the cache as a stream (one chunk per choice, the usage chunk
when asked, `[DONE]`), a JSON request from a cached stream, and the other way round.
`Cache-Control: no-cache` skips the lookup and refreshes the entry; `no-store` neither
reads nor writes. Every cacheable request's answer carries `X-Cache: HIT | MISS | BYPASS`.

A hit's usage row has `cache_hit = true`, cost 0, the tokens the answer had (token classes
included) and `saved_usd`, what those tokens would have cost at the model's prices
(gateway/usage.py), which /admin/metrics and the dashboard sum; energy is the action's
`cache_hit_price`. Concurrent identical misses in one process make one
upstream call: the others wait for it and are served its answer as hits.

A broken cache never fails a request: lookups and stores fail open (logged).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from typing import Any

import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.chat_stream import StreamAssembler, replayable
from gateway.config import parse_duration
from gateway.providers.base import Relayed
from gateway.usage import openai_usage
from plugins.base import Plugin, RequestContext

log = structlog.get_logger("gateway.cache")

_IGNORED_FIELDS = ("metadata", "user", "stream", "stream_options")
_SIZES = {"": 1, "b": 1, "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3}


def _bytes(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    number = text.rstrip("kmgb")
    unit = text[len(number):]
    if unit not in _SIZES or not number.replace(".", "", 1).isdigit():
        raise ValueError(f"expected a size like 64MB, got {value!r}")
    return int(float(number) * _SIZES[unit])


class WorkspaceCache(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = True
    ttl: float | None = None

    @field_validator("ttl", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return None if v is None else parse_duration(v)


class CacheSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    models: list[str] = Field(default_factory=list)
    actions: list[str] = Field(default_factory=list)
    ttl: float = 3600.0
    max_bytes: int = 64 * 1024 ** 2
    max_entry_bytes: int = 1024 ** 2
    backend: str = "memory"
    redis_url: str | None = None
    key_prefix: str = "gw:cache"
    cache_sampled: bool = False
    wait_for_leader: float = 120.0  # seconds an identical miss waits for the first one's answer
    workspaces: dict[str, WorkspaceCache] = Field(default_factory=dict)

    @field_validator("ttl", "wait_for_leader", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("max_bytes", "max_entry_bytes", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return _bytes(v)

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in ("memory", "redis"):
            raise ValueError("must be memory or redis")
        return v


class MemoryBackend:
    """An in-process LRU bounded by the bytes it holds."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()

    async def get(self, key: str) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[0] < time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return found[1]

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._drop(key)
        self._entries[key] = (time.monotonic() + ttl, value)
        self.size += len(value)
        while self.size > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self.size -= len(found[1])

    async def close(self) -> None:
        self._entries.clear()


class RedisBackend:
    """Shared by every process pointing at the same Redis; its maxmemory policy bounds it."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self.client = redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)

    async def get(self, key: str) -> bytes | None:
        return await self.client.get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self.client.set(key, value, px=max(1, int(ttl * 1000)))

    async def close(self) -> None:
        await self.client.aclose()


def cache_key(prefix: str, workspace_id: str, model: str, body: dict[str, Any],
              inbound: dict[str, Any] | None = None) -> str:
    """`inbound`: the client's own body on another API's endpoint (POST /v1/messages), which
    may be passed through with fields its OpenAI form lacks (`thinking`, `top_k`, blocks'
    fields): they change the answer, so they are in the key."""
    request = {k: v for k, v in body.items() if k not in _IGNORED_FIELDS and k != "model"}
    parts: list[Any] = [workspace_id, model, request]
    if inbound is not None:
        parts.append({k: v for k, v in inbound.items() if k not in _IGNORED_FIELDS and k != "model"})
    digest = hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{prefix}:{digest}"


def _repeatable(body: dict[str, Any], cache_sampled: bool) -> bool:
    n = body.get("n")
    temperature = body.get("temperature")
    sampled = temperature is None or temperature > 0  # OpenAI's default temperature is 1
    if n is not None and n > 1 and sampled:
        return False
    return cache_sampled or not sampled


def _answer_of(ctx: RequestContext, streamed: StreamAssembler | None) -> dict[str, Any] | None:
    """The complete answer to store, as a chat.completion; None if it must not be (see
    "Exact replay" above). Its usage is the provider's, token classes included (a hit's
    row carries those tokens and the USD they would have cost): an answer whose usage was
    estimated is not stored."""
    if ctx.usage is None or ctx.usage.estimated:
        return None
    if ctx.stream:
        if streamed is None or not streamed.exact:
            return None
        payload = streamed.completion({"id": f"chatcmpl-cache-{ctx.request_id}", "created": int(time.time()),
                                       "model": ctx.model, "usage": openai_usage(ctx.usage)})
    else:
        payload = ctx.response
        if isinstance(payload, Relayed) and payload.raw is not None:
            return None  # passed through as the upstream sent it: a hit could only translate it
    if not payload or not payload.get("choices") or not replayable(payload):
        return None
    choices = payload["choices"]
    if len(choices) != (ctx.body.get("n") or 1) or any(not c.get("finish_reason") for c in choices):
        return None
    if ctx.body.get("logprobs") and not all(_has_logprobs(c, ctx.body.get("top_logprobs") or 0) for c in choices):
        return None
    return payload


def _has_logprobs(choice: dict[str, Any], top: int) -> bool:
    """The choice carries the logprobs a request asked for (`top`: top_logprobs per token)."""
    logprobs = choice.get("logprobs")
    tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(tokens, list) or (not tokens and (choice.get("message") or {}).get("content")):
        return False
    return not top or all(isinstance(t, dict) and t.get("top_logprobs") for t in tokens)


class ResponseCache(Plugin):
    name = "cache"
    Settings = CacheSettings

    def __init__(self, settings: CacheSettings, services: Any):
        super().__init__(settings, services)
        self.backend: MemoryBackend | RedisBackend | None = None
        self._leaders: dict[str, asyncio.Future] = {}
        self.hits = self.misses = self.bypasses = 0

    async def startup(self) -> None:
        if self.settings.backend == "redis":
            url = self.settings.redis_url or self.services.config.rate_limits.redis_url
            if not url:
                raise ValueError("plugins cache: backend redis needs settings.redis_url (or rate_limits.redis_url)")
            self.backend = RedisBackend(url)
        else:
            self.backend = MemoryBackend(self.settings.max_bytes)

    async def shutdown(self) -> None:
        if self.backend is not None:
            await self.backend.close()

    async def _applies(self, ctx: RequestContext) -> WorkspaceCache | None:
        if ctx.endpoint not in ("chat.completions", "messages") or ctx.identity is None \
                or not ctx.candidates:
            return None  # chat completions (also /v1/messages, translated to one) only
        settings = self.settings
        model, action = ctx.candidates[0], ctx.action or ctx.config.energy.default_action
        if not ("*" in settings.models or model in settings.models or action in settings.actions):
            return None
        workspace = settings.workspaces.get(ctx.identity.workspace_id)
        if workspace is None and settings.workspaces and self.services.directory is not None:
            found = await self.services.directory.workspace(ctx.identity.workspace_id)
            if found is not None:
                workspace = settings.workspaces.get(found.name)
        workspace = workspace or WorkspaceCache()
        return workspace if workspace.enabled else None

    async def on_request(self, ctx: RequestContext) -> None:
        workspace = await self._applies(ctx)
        if workspace is None:
            return
        control = (ctx.headers.get("Cache-Control") or "").lower()
        if "no-store" in control or not _repeatable(ctx.body, self.settings.cache_sampled):
            self.bypasses += 1
            ctx.response_headers["X-Cache"] = "BYPASS"
            return
        model = ctx.candidates[0]
        key = cache_key(self.settings.key_prefix, ctx.identity.workspace_id, model, ctx.body, ctx.inbound_body)
        scratch = ctx.scratch(self.name)
        scratch["key"], scratch["model"] = key, model
        scratch["ttl"] = workspace.ttl if workspace.ttl is not None else self.settings.ttl
        ctx.response_headers["X-Cache"] = "MISS"
        if "no-cache" in control:
            scratch["lead"] = self._lead(key)
            return
        found = await self._lookup(key)
        if found is None:
            leader = self._leaders.get(key)
            if leader is not None:  # an identical request is on its way upstream: wait for it
                try:
                    found = await asyncio.wait_for(asyncio.shield(leader), self.settings.wait_for_leader)
                except TimeoutError:
                    found = None  # the first one is slow: go upstream too
        if found is None:
            scratch["lead"] = self._lead(key)
            self.misses += 1
            return
        self.hits += 1
        ctx.cache_hit, ctx.cache_hit_model = found, model

    def _lead(self, key: str) -> asyncio.Future | None:
        if key in self._leaders:
            return None
        future = asyncio.get_running_loop().create_future()
        self._leaders[key] = future
        return future

    async def _lookup(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await self.backend.get(key)
            return orjson.loads(raw) if raw else None
        except Exception:  # noqa: BLE001 — fails open: a miss
            log.exception("cache_lookup_failed")
            return None

    def _release(self, ctx: RequestContext, answer: dict[str, Any] | None) -> None:
        scratch = ctx.scratch(self.name)
        lead = scratch.pop("lead", None)
        if lead is not None:
            self._leaders.pop(scratch["key"], None)
            if not lead.done():
                lead.set_result(answer)

    async def on_response(self, ctx: RequestContext) -> None:
        scratch = ctx.scratch(self.name)
        if "key" not in scratch or ctx.short_circuit is not None:
            self._release(ctx, None)
            return
        # A fallback's answer is not this key's.
        answer = _answer_of(ctx, scratch.get("stream")) if ctx.model == scratch["model"] else None
        self._release(ctx, answer)
        if answer is None:
            return
        raw = orjson.dumps(answer)
        if len(raw) > self.settings.max_entry_bytes:
            return
        try:
            await self.backend.set(scratch["key"], raw, scratch["ttl"])
        except Exception:  # noqa: BLE001 — fails open
            log.exception("cache_store_failed")

    async def on_stream_chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> None:
        scratch = ctx.scratch(self.name)
        if "key" not in scratch or ctx.short_circuit is not None:
            return
        streamed = scratch.get("stream")
        if streamed is None:
            streamed = scratch["stream"] = StreamAssembler()
        if isinstance(chunk, Relayed) and chunk.raw:
            streamed.exact = False  # the upstream's own events went to the client: not replayable as such
        try:
            streamed.add(chunk)
        except Exception:
            streamed.exact = False  # a chunk it could not read: the answer is not stored
            raise

    async def on_error(self, ctx: RequestContext) -> None:
        self._release(ctx, None)
