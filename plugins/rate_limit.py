"""rate_limit: requests and tokens per minute, per tier, overridable per user and workspace,
and per API key.

    tiers:
      free: {limits: {rpm: 20, tpm: 40000}}
      pro:  {limits: {rpm: 600}}
    rate_limits:
      redis_url: redis://127.0.0.1:6379/0   # shared by every gateway process; unset = per process
      on_backend_error: reject              # Redis down: reject (fail closed) or allow
      users: {usr_abc123: {rpm: 5}}          # replaces the tier's limits for that user
      workspaces: {acme: {rpm: 1000}}       # a cap on the whole workspace, on top of the users'
    plugins:
      - auth
      - rate_limit                          # after auth, before energy

A key created with its own `rpm` / `tpm` (`keys create --rpm 10`, docs/admin.md "Per-key
controls") is also held to them, on top of its user's and workspace's limits.

Fixed one-minute windows. A request counts against `rpm` when it is admitted (a rejected
one does not); its prompt+completion tokens count against `tpm` when it ends, and a
request is refused while the window's tokens are already at the limit. Over a limit:
429 `rate_limit_exceeded` with `Retry-After` and `retry-after-ms` (until the window
resets). Every answer carries OpenAI's `x-ratelimit-limit-requests`,
`x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests` and the `-tokens` trio,
for the caller's own (user) limits.

With Redis, the check-and-count is one Lua script: atomic across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.config import Limits
from plugins.base import Plugin, Reject, RequestContext

log = structlog.get_logger("gateway.rate_limit")
WINDOW = 60

# KEYS[1] requests counter, KEYS[2] tokens counter; ARGV[1] rpm limit (0 = none),
# ARGV[2] tpm limit (0 = none), ARGV[3] ttl. Returns {admitted, requests, tokens}.
_ADMIT_LUA = """
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
local tpm = tonumber(ARGV[2])
if tpm > 0 and tokens >= tpm then
  return {0, tonumber(redis.call('GET', KEYS[1]) or '0'), tokens}
end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
local rpm = tonumber(ARGV[1])
if rpm > 0 and n > rpm then
  redis.call('DECR', KEYS[1])
  return {0, n - 1, tokens}
end
return {1, n, tokens}
"""


@dataclass
class Verdict:
    admitted: bool
    requests: int
    tokens: int


class MemoryCounters:
    """Counters for one process (no redis_url). Same semantics as the Lua script."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._window = 0

    def _roll(self, window: int) -> None:
        if window != self._window:
            self._counts.clear()
            self._window = window

    async def admit(self, req_key: str, tok_key: str, rpm: int, tpm: int, window: int) -> Verdict:
        self._roll(window)
        tokens = self._counts.get(tok_key, 0)
        n = self._counts.get(req_key, 0)
        if (tpm and tokens >= tpm) or (rpm and n >= rpm):
            return Verdict(False, n, tokens)
        self._counts[req_key] = n + 1
        return Verdict(True, n + 1, tokens)

    async def add_tokens(self, tok_key: str, tokens: int, window: int) -> None:
        self._roll(window)
        self._counts[tok_key] = self._counts.get(tok_key, 0) + tokens

    async def close(self) -> None:
        pass


class RedisCounters:
    """The Lua script's check-and-count per request, and the token counts, sent to Redis
    together: what the requests of one loop turn (and those arriving while a batch is on
    the wire) ask goes as one pipeline, one batch at a time. redis-py spends ~130 µs of CPU
    on a command sent alone and ~25 µs on one of 30 pipelined (measured on this machine),
    and one connection carries the batch: the pool's 100 connections no longer cap the
    requests a process may have in flight (the 101st failed as "Redis down")."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self.client = redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._sha = hashlib.sha1(_ADMIT_LUA.encode()).hexdigest()
        self._admits: list[tuple[str, str, int, int, asyncio.Future]] = []
        self._tokens: dict[str, int] = {}
        self._sending: asyncio.Task | None = None

    async def admit(self, req_key: str, tok_key: str, rpm: int, tpm: int, window: int) -> Verdict:
        future = asyncio.get_running_loop().create_future()
        self._admits.append((req_key, tok_key, rpm, tpm, future))
        self._kick()
        admitted, n, tokens = await future
        return Verdict(bool(admitted), int(n), int(tokens))

    async def add_tokens(self, tok_key: str, tokens: int, window: int) -> None:
        """Counted with the next batch (a token count is not waited for)."""
        self._tokens[tok_key] = self._tokens.get(tok_key, 0) + tokens
        self._kick()

    def _kick(self) -> None:
        if self._sending is None:
            self._sending = asyncio.get_running_loop().create_task(self._send_all())

    async def _send_all(self) -> None:
        try:
            await asyncio.sleep(0)  # the rest of this loop turn's requests join the batch
            while self._admits or self._tokens:
                admits, self._admits = self._admits, []
                tokens, self._tokens = self._tokens, {}
                await self._send(admits, tokens)
        finally:
            self._sending = None

    async def _send(self, admits: list[tuple[str, str, int, int, asyncio.Future]], tokens: dict[str, int],
                    reloaded: bool = False) -> None:
        from redis.exceptions import NoScriptError

        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for req_key, tok_key, rpm, tpm, _ in admits:
                    pipe.evalsha(self._sha, 2, req_key, tok_key, rpm, tpm, WINDOW * 2)
                for key, count in tokens.items():
                    pipe.incrby(key, count)
                    pipe.expire(key, WINDOW * 2)
                results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 — Redis away: each request applies on_backend_error
            for *_, future in admits:
                if not future.done():
                    future.set_exception(exc)
            if tokens:
                log.warning("rate_limit_tokens_not_counted", keys=len(tokens), error=type(exc).__name__)
            return
        unscripted = [a for a, r in zip(admits, results) if isinstance(r, NoScriptError)]
        if unscripted and not reloaded:  # a restarted Redis forgot the script: load it, send those again
            try:
                await self.client.script_load(_ADMIT_LUA)
            except Exception:  # noqa: BLE001 — the retry below reports it
                pass
            await self._send(unscripted, {}, reloaded=True)
        for admit, result in zip(admits, results):
            future = admit[4]
            if future.done() or (isinstance(result, NoScriptError) and not reloaded):
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def close(self) -> None:
        """Sends what is still queued (token counts of requests that just ended), then closes."""
        if self._sending is not None:
            with contextlib.suppress(Exception):
                await self._sending
        if self._tokens:
            with contextlib.suppress(Exception):
                await self._send([], dict(self._tokens))
        await self.client.aclose()


def _reset(seconds: float) -> str:
    """OpenAI's duration style: '12s', '1m0s'."""
    seconds = max(0, math.ceil(seconds))
    return f"{seconds // 60}m{seconds % 60}s" if seconds >= 60 else f"{seconds}s"


class RateLimit(Plugin):
    name = "rate_limit"
    needs_body = False  # a caller over its limit is refused before its body is parsed

    def __init__(self, settings: Any, services: Any):
        super().__init__(settings, services)
        self.counters: MemoryCounters | RedisCounters | None = None

    async def startup(self) -> None:
        url = self.services.config.rate_limits.redis_url
        self.counters = RedisCounters(url) if url else MemoryCounters()

    async def shutdown(self) -> None:
        if self.counters is not None:
            await self.counters.close()

    async def _scopes(self, ctx: RequestContext) -> list[tuple[str, Limits]]:
        """(counter key prefix, limits) for the user and, if capped, the API key and the workspace."""
        identity = ctx.identity
        cfg = ctx.config.rate_limits
        scopes: list[tuple[str, Limits]] = []
        user_limits = cfg.users.get(identity.user_id)
        if user_limits is None:
            tier = ctx.config.tiers.get(identity.tier)
            user_limits = tier.limits if tier is not None else None
        if user_limits is not None and (user_limits.rpm or user_limits.tpm):
            scopes.append((f"u:{identity.user_id}", user_limits))
        if identity.key_rpm or identity.key_tpm:
            scopes.append((f"k:{identity.key_id}", Limits(rpm=identity.key_rpm, tpm=identity.key_tpm)))
        if cfg.workspaces:
            ws_limits = cfg.workspaces.get(identity.workspace_id)
            if ws_limits is None and self.services.directory is not None:
                workspace = await self.services.directory.workspace(identity.workspace_id)
                if workspace is not None:
                    ws_limits = cfg.workspaces.get(workspace.name)
            if ws_limits is not None and (ws_limits.rpm or ws_limits.tpm):
                scopes.append((f"w:{identity.workspace_id}", ws_limits))
        return scopes

    async def on_request(self, ctx: RequestContext) -> None:
        if ctx.identity is None or not ctx.billed or self.counters is None:
            return
        scopes = await self._scopes(ctx)
        if not scopes:
            return
        now = time.time()
        window = int(now // WINDOW)
        reset_in = (window + 1) * WINDOW - now
        prefix = ctx.config.rate_limits.key_prefix
        admitted: list[str] = []
        first: Verdict | None = None  # the caller's own scope, once it admitted the request
        for scope, limits in scopes:
            req_key = f"{prefix}:{scope}:r:{window}"
            tok_key = f"{prefix}:{scope}:t:{window}"
            try:
                verdict = await self.counters.admit(req_key, tok_key, limits.rpm or 0, limits.tpm or 0, window)
            except Exception as exc:  # noqa: BLE001 — the counter backend is down
                if ctx.config.rate_limits.on_backend_error == "allow":
                    log.warning("rate_limit_backend_down", error=type(exc).__name__, admitting=True)
                    return
                raise Reject(503, "The rate limiter is unavailable; try again shortly.", type="server_error",
                             code="rate_limiter_unavailable", headers={"Retry-After": "1"}) from None
            if scope == scopes[0][0]:
                self._headers(ctx, limits, verdict, reset_in)
            if not verdict.admitted:
                await self._release(admitted, window)
                if first is not None:  # the first scope's count was just given back: say so
                    self._headers(ctx, scopes[0][1], Verdict(True, first.requests - 1, first.tokens), reset_in)
                which = "tokens" if limits.tpm and verdict.tokens >= limits.tpm else "requests"
                limit = limits.tpm if which == "tokens" else limits.rpm
                whose = {"w": "your workspace", "k": "this API key"}.get(scope[0], "you")
                raise Reject(429, f"Rate limit reached for {whose}: {limit} {which} per minute. "
                                  f"Retry in {math.ceil(reset_in)}s.",
                             type="rate_limit_exceeded", code="rate_limit_exceeded",
                             headers={"Retry-After": str(math.ceil(reset_in)),
                                      "retry-after-ms": str(int(reset_in * 1000))})
            if first is None:
                first = verdict
            admitted.append(req_key)
        ctx.scratch(self.name)["tok_keys"] = [f"{prefix}:{scope}:t:{window}" for scope, _ in scopes]
        ctx.scratch(self.name)["window"] = window

    async def _release(self, req_keys: list[str], window: int) -> None:
        """A later scope refused the request: un-count it from the scopes that admitted it."""
        for key in req_keys:
            try:
                if isinstance(self.counters, RedisCounters):
                    await self.counters.client.decr(key)
                elif isinstance(self.counters, MemoryCounters):
                    self.counters._counts[key] = max(0, self.counters._counts.get(key, 1) - 1)
            except Exception:  # noqa: BLE001
                log.warning("rate_limit_release_failed", key=key)

    @staticmethod
    def _headers(ctx: RequestContext, limits: Limits, verdict: Verdict, reset_in: float) -> None:
        h = ctx.response_headers
        if limits.rpm:
            h["x-ratelimit-limit-requests"] = str(limits.rpm)
            h["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - verdict.requests))
            h["x-ratelimit-reset-requests"] = _reset(reset_in)
        if limits.tpm:
            h["x-ratelimit-limit-tokens"] = str(limits.tpm)
            h["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - verdict.tokens))
            h["x-ratelimit-reset-tokens"] = _reset(reset_in)

    async def on_response(self, ctx: RequestContext) -> None:
        await self._count_tokens(ctx)

    async def on_error(self, ctx: RequestContext) -> None:
        await self._count_tokens(ctx)

    async def _count_tokens(self, ctx: RequestContext) -> None:
        scratch = ctx.scratch(self.name)
        keys = scratch.get("tok_keys")
        if not keys or ctx.usage is None or not ctx.usage.total_tokens or self.counters is None:
            return
        for key in keys:
            await self.counters.add_tokens(key, ctx.usage.total_tokens, scratch["window"])
