"""Routing: which deployment, how many attempts, when to wait, when to fall back.

For a public model the router tries its deployments in config order, cycling through
them, for at most `retries.max_attempts` calls; then each of the model's `fallbacks`
gets the same treatment. Between two calls to the *same* deployment it waits an
exponential backoff with full jitter, or the upstream's `Retry-After` / `retry-after-ms`
when given (capped by `retries.retry_after_max`). Moving to another deployment does not
wait: it is healthy as far as we know.

Retried: 429, 408, 5xx, connection errors, timeouts, unparseable responses, streams that
break before their first chunk. Not retried: other 4xx (the client's request is wrong;
it is passed through). A refused provider credential (401/403) moves on to the next
deployment without retrying the same one. A stream is never retried once its first
chunk was handed to the caller (the client may have seen bytes).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, AsyncIterator, Awaitable, Callable

from gateway.config import Config, ModelEntry
from gateway.dispatch import Dispatcher, LitellmDispatcher, UpstreamError, provider_of
from gateway.demo import DemoDispatcher
from gateway.native import NativeOpenAIDispatcher
from gateway.errors import ApiError, redact
from plugins.base import RequestContext

Sleep = Callable[[float], Awaitable[None]]


def upstream_to_api_error(err: UpstreamError, attempts: int) -> ApiError:
    """The client-facing error for an upstream failure we gave up on."""
    message = redact(err.message)
    if err.kind == "status" and err.status is not None and 400 <= err.status < 500 and not err.retryable and not err.is_auth:
        # The request itself is wrong: pass the upstream's words and status through.
        return ApiError(err.status, message, type=err.error_type or "invalid_request_error",
                        code="upstream_" + str(err.status) if err.status != 400 else None)
    suffix = f" (after {attempts} attempt{'s' if attempts != 1 else ''})"
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    if err.is_auth:
        return ApiError(502, "the upstream refused the gateway's provider credentials" + suffix,
                        type="server_error", code="upstream_auth_error")
    if err.kind == "timeout":
        return ApiError(504, "the upstream timed out" + suffix, type="server_error", code="upstream_timeout")
    if err.status in (429, 503):
        return ApiError(503, f"the upstream is overloaded or rate limited{suffix}: {message}",
                        type="server_error", code="upstream_unavailable", headers=headers)
    return ApiError(502, f"the upstream failed{suffix}: {message}", type="server_error", code="upstream_error",
                    headers=headers)


def uses_native(deployment: ModelEntry) -> bool:
    """`dispatch: auto` picks the native pass-through for OpenAI-wire upstreams."""
    if deployment.dispatch != "auto":
        return deployment.dispatch == "native"
    model = deployment.litellm_params.model
    return model.startswith("openai/") or "/" not in model


class Router:
    def __init__(self, dispatchers: dict[str, Dispatcher] | None = None, sleep: Sleep = asyncio.sleep):
        self.litellm: Dispatcher = LitellmDispatcher()
        self.native = NativeOpenAIDispatcher()
        self.dispatchers: dict[str, Dispatcher] = {"demo": DemoDispatcher(), **(dispatchers or {})}
        self._sleep = sleep

    def dispatcher_for(self, deployment: ModelEntry) -> Dispatcher:
        special = self.dispatchers.get(provider_of(deployment))
        if special is not None:
            return special
        return self.native if uses_native(deployment) else self.litellm

    async def close(self) -> None:
        await self.native.close()

    @staticmethod
    def models_to_try(config: Config, model: str) -> list[str]:
        out = [model]
        for fb in config.model_settings(model).fallbacks or []:
            if fb not in out:
                out.append(fb)
        return out

    def _backoff(self, config: Config, retry: int, err: UpstreamError) -> float:
        policy = config.retries
        if err.retry_after is not None:
            return min(err.retry_after, policy.retry_after_max)
        ceiling = min(policy.backoff_max, policy.backoff_base * (2 ** retry))
        return random.uniform(ceiling / 2, ceiling)  # jitter, never zero

    async def _attempts(self, ctx: RequestContext, call: Callable[[str, ModelEntry], Awaitable[Any]]) -> Any:
        """Run `call(public_model, deployment)` until it succeeds, following the policy."""
        config = ctx.config
        last: UpstreamError | None = None
        first_model = True
        for model in self.models_to_try(config, ctx.model):
            deployments = config.deployments(model)
            dead: set[int] = set()  # deployments whose credentials were refused
            tries_per_deployment = [0] * len(deployments)
            if not first_model:
                ctx.fallbacks += 1
            first_model = False
            index = 0
            for attempt in range(config.retries.max_attempts):
                live = [i for i in range(len(deployments)) if i not in dead]
                if not live:
                    break
                index = live[attempt % len(live)]
                deployment = deployments[index]
                if tries_per_deployment[index] > 0 and last is not None:
                    await self._sleep(self._backoff(config, tries_per_deployment[index] - 1, last))
                elif attempt > 0:
                    ctx.fallbacks += 1  # moved to another deployment of the same model
                tries_per_deployment[index] += 1
                ctx.attempts += 1
                ctx.model = model
                ctx.deployment = deployment.litellm_params.model
                ctx.provider = provider_of(deployment)
                try:
                    return await call(model, deployment)
                except UpstreamError as err:
                    last = err
                    if err.is_auth:
                        dead.add(index)
                        continue
                    if not err.retryable:
                        raise upstream_to_api_error(err, ctx.attempts) from None
        assert last is not None
        raise upstream_to_api_error(last, ctx.attempts) from None

    async def chat(self, ctx: RequestContext) -> dict[str, Any]:
        async def call(model: str, deployment: ModelEntry) -> dict[str, Any]:
            return await self.dispatcher_for(deployment).chat(deployment, ctx.body)

        return await self._attempts(ctx, call)

    async def embeddings(self, ctx: RequestContext) -> dict[str, Any]:
        async def call(model: str, deployment: ModelEntry) -> dict[str, Any]:
            return await self.dispatcher_for(deployment).embeddings(deployment, ctx.body)

        return await self._attempts(ctx, call)

    async def open_stream(self, ctx: RequestContext) -> tuple[dict[str, Any], AsyncIterator[dict[str, Any]]]:
        """Retries until the upstream produced its first chunk; returns it and the rest."""

        async def call(model: str, deployment: ModelEntry):
            stream = self.dispatcher_for(deployment).chat_stream(deployment, ctx.body)
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                await stream.aclose()
                raise UpstreamError("truncated", "the upstream stream ended before any data") from None
            except BaseException:
                await stream.aclose()
                raise
            return first, stream

        return await self._attempts(ctx, call)
