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
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import structlog

from gateway.config import Config, ModelEntry
from gateway.providers.base import Dispatcher, UpstreamError, deployment_secrets, provider_of
from gateway.providers.litellm import LitellmDispatcher
from gateway.providers.demo import DemoDispatcher
from gateway.providers.anthropic import AnthropicNativeDispatcher
from gateway.providers.azure import AzureNativeDispatcher
from gateway.providers.gemini import GeminiNativeDispatcher
from gateway.providers.openai import NativeOpenAIDispatcher
from gateway.errors import ApiError, redact
from gateway.usage import admit
from plugins.base import RequestContext

log = structlog.get_logger("gateway.router")

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
        if err.error_type == "missing_key":
            return ApiError(502, message, type="server_error", code="upstream_auth_error")
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
    """`dispatch: auto` picks the native pass-through for OpenAI-wire upstreams (Azure
    OpenAI's, at its own URLs, is `deployment.native_path() == "azure"`)."""
    return deployment.uses_native()


def uses_anthropic_native(deployment: ModelEntry) -> bool:
    """`dispatch: auto` (or `native`) serves `anthropic/...` models by the native Anthropic
    translation (gateway/providers/anthropic.py) when the deployment sets no other
    litellm_params (which only litellm would know how to apply)."""
    return (deployment.dispatch != "litellm" and deployment.litellm_params.model.startswith("anthropic/")
            and not deployment.litellm_params.model_extra)


class CircuitBreaker:
    """Per deployment, per process: after `failures` consecutive transient failures the
    deployment is skipped for `cooldown` seconds, so requests go to healthy deployments
    instead of burning retries on a dead one. After the cool-down it is tried again
    (half-open): one success closes it, one failure opens it for another cool-down.

    `on_change(opened, details)` is told when a deployment's breaker opens (not again while
    it stays open through half-open retries) and when it closes: the alerts
    (gateway/alerts.py) turn these into provider.circuit_opened / _closed events."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._failures: dict[str, int] = {}
        self._open_until: dict[str, float] = {}
        self.on_change: Callable[[bool, dict[str, Any]], None] | None = None

    @staticmethod
    def key(deployment: ModelEntry) -> str:
        p = deployment.litellm_params
        return f"{deployment.name}|{p.model}|{p.api_base or ''}"

    def is_open(self, deployment: ModelEntry) -> bool:
        until = self._open_until.get(self.key(deployment))
        return until is not None and self.clock() < until

    def retry_in(self, deployments: list[ModelEntry]) -> float:
        now = self.clock()
        waits = [self._open_until.get(self.key(d), now) - now for d in deployments]
        return max(0.0, min(waits)) if waits else 0.0

    def success(self, deployment: ModelEntry) -> None:
        key = self.key(deployment)
        self._failures.pop(key, None)
        if self._open_until.pop(key, None) is not None:
            log.info("deployment_recovered", model=deployment.name, deployment=deployment.litellm_params.model)
            self._tell(False, deployment, {})

    def failure(self, deployment: ModelEntry, config: Config) -> None:
        key = self.key(deployment)
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        if count >= config.retries.breaker_failures and config.retries.breaker_cooldown > 0:
            was_open = key in self._open_until  # half-open: still the same outage
            self._open_until[key] = self.clock() + config.retries.breaker_cooldown
            log.warning("deployment_cooling_down", model=deployment.name, deployment=deployment.litellm_params.model,
                        consecutive_failures=count, cooldown_s=config.retries.breaker_cooldown)
            if not was_open:
                self._tell(True, deployment, {"consecutive_failures": count,
                                              "cooldown_s": config.retries.breaker_cooldown})

    def _tell(self, opened: bool, deployment: ModelEntry, details: dict[str, Any]) -> None:
        if self.on_change is None:
            return
        # The deployment as config names it: never its api_base (it may carry a credential).
        details = {"model": deployment.name, "deployment": deployment.litellm_params.model, **details}
        try:
            self.on_change(opened, details)
        except Exception:  # noqa: BLE001 — an alert never breaks routing
            log.exception("breaker_alert_failed")


class Router:
    def __init__(self, dispatchers: dict[str, Dispatcher] | None = None, sleep: Sleep = asyncio.sleep):
        self.litellm: Dispatcher = LitellmDispatcher()
        self.native = NativeOpenAIDispatcher()
        self.anthropic = AnthropicNativeDispatcher(self.native, self.litellm)
        self.azure = AzureNativeDispatcher(self.native, self.litellm)
        self.gemini = GeminiNativeDispatcher(self.native, self.litellm)
        self.dispatchers: dict[str, Dispatcher] = {"demo": DemoDispatcher(), **(dispatchers or {})}
        self.breaker = CircuitBreaker()
        self._sleep = sleep

    def dispatcher_for(self, deployment: ModelEntry) -> Dispatcher:
        special = self.dispatchers.get(provider_of(deployment))
        if special is not None:
            return special
        if uses_anthropic_native(deployment):
            return self.anthropic
        path = deployment.native_path()
        if path == "azure":
            return self.azure
        if path == "gemini":
            return self.gemini
        return self.native if path == "openai" else self.litellm

    async def warm_up(self, config: Config, timeout: float = 30.0) -> None:
        """Before the first request: one mock call through litellm per provider it serves
        (see LitellmDispatcher.warm_up). Fails open: a failed warm-up only means a slower
        first call."""
        seen: set[str] = set()
        for entry in config.models:
            provider = provider_of(entry)
            warm = getattr(self.dispatcher_for(entry), "warm_up", None)
            if warm is None or provider in seen:
                continue
            seen.add(provider)
            try:
                async with asyncio.timeout(timeout):
                    await warm(entry)
            except Exception as exc:  # noqa: BLE001
                log.info("litellm_warm_up_failed", provider=provider, error=type(exc).__name__)

    async def close(self) -> None:
        await self.native.close()

    @staticmethod
    def models_to_try(config: Config, model: str, allowed: set[str] | None = None) -> list[str]:
        """`model`, then its configured fallbacks that the request may use (tier, price)."""
        out = [model]
        for fb in config.model_settings(model).fallbacks or []:
            if fb not in out and (allowed is None or fb in allowed):
                out.append(fb)
        return out

    def _backoff(self, config: Config, retry: int, err: UpstreamError) -> float:
        policy = config.retries
        if err.retry_after is not None:
            return min(err.retry_after, policy.retry_after_max)
        ceiling = min(policy.backoff_max, policy.backoff_base * (2 ** retry))
        return random.uniform(ceiling / 2, ceiling)  # jitter, never zero

    async def attempts(self, ctx: RequestContext, call: Callable[[str, ModelEntry], Awaitable[Any]],
                        only: Callable[[ModelEntry], bool] | None = None) -> Any:
        """Run `call(public_model, deployment)` until it succeeds, following the policy;
        with `only`, on the deployments it accepts (a stored response's upstream)."""
        config = ctx.config
        trace = ctx.trace  # gateway/telemetry.py: one client span per attempt
        if ctx.deployment_filter is not None:  # the account holding the caller's files (gateway/batches.py)
            narrow, wanted = ctx.deployment_filter, only
            only = narrow if wanted is None else (lambda d: wanted(d) and narrow(d))
        last: UpstreamError | None = None
        cooling: list[ModelEntry] = []
        first_model = True
        first_refusal: ApiError | None = None
        for model in self.models_to_try(config, ctx.model, ctx.fallback_allowed):
            deployments = config.deployments(model)
            if only is not None:
                deployments = [d for d in deployments if only(d)]
                if not deployments:
                    continue
            # Skip deployments whose circuit is open; they are retried after the cool-down.
            dead: set[int] = {i for i, d in enumerate(deployments) if self.breaker.is_open(d)}
            cooling.extend(d for i, d in enumerate(deployments) if i in dead)
            tries_per_deployment = [0] * len(deployments)
            if not first_model:
                ctx.fallbacks += 1
            first_model = False
            for attempt in range(config.retries.max_attempts):
                live = [i for i in range(len(deployments)) if i not in dead]
                if not live:
                    break
                index = live[attempt % len(live)]
                deployment = deployments[index]
                missing = config.missing_key(deployment)
                if missing is not None:
                    # No network call that would fail as a DNS or 401 error and trip the
                    # breaker: the deployment cannot work until its key is set.
                    last = UpstreamError("status", f"no provider API key is configured for model '{model}': "
                                                   f"the environment variable {missing} is not set",
                                         status=401, error_type="missing_key")
                    dead.add(index)
                    continue
                refused = admit(ctx, model, deployment, takes_inbound_tools=(
                    ctx.inbound_body is not None and self.dispatcher_for(deployment).passes_through))
                if refused is not None:  # a price it cannot bill: never served (gateway/usage.py)
                    first_refusal = first_refusal or refused
                    dead.add(index)
                    continue
                if tries_per_deployment[index] > 0 and last is not None:
                    await self._sleep(self._backoff(config, tries_per_deployment[index] - 1, last))
                elif attempt > 0:
                    ctx.fallbacks += 1  # moved to another deployment of the same model
                tries_per_deployment[index] += 1
                ctx.attempts += 1
                ctx.model = model
                ctx.deployment = deployment.litellm_params.model
                ctx.provider = provider_of(deployment)
                attempt = trace.attempt(ctx, model, deployment) if trace is not None else None
                try:
                    result = await call(model, deployment)
                except UpstreamError as err:
                    _mask_credentials(err, deployment)
                    if attempt is not None:
                        trace.attempt_failed(attempt, err)
                    last = err
                    if err.retryable or err.is_auth:
                        self.breaker.failure(deployment, config)
                    if err.is_auth:
                        dead.add(index)
                        continue
                    if not err.retryable:
                        raise upstream_to_api_error(err, ctx.attempts) from None
                    continue
                except BaseException as exc:  # cancelled, or a bug: the span ends all the same
                    if attempt is not None:
                        trace.attempt_failed(attempt, exc)
                    raise
                if attempt is not None:
                    trace.attempt_ok(attempt, result)
                self.breaker.success(deployment)
                return result
        if first_refusal is not None and ctx.attempts == 0:
            raise first_refusal
        if last is None:  # every deployment was cooling down: fail fast, say when to retry
            wait = max(1, round(self.breaker.retry_in(cooling)))
            raise ApiError(503, f"every deployment of '{ctx.model}' is cooling down after repeated failures",
                           type="server_error", code="upstream_unavailable", headers={"Retry-After": str(wait)})
        raise upstream_to_api_error(last, ctx.attempts) from None

    @staticmethod
    async def timed(deployment: ModelEntry, call: Awaitable[Any], which: str = "total") -> Any:
        limit = getattr(deployment.timeouts, which)
        try:
            async with asyncio.timeout(limit):
                return await call
        except TimeoutError:
            raise UpstreamError("timeout", f"the upstream exceeded its {which.replace('_', ' ')} timeout "
                                           f"({limit:g}s)", status=504) from None

    async def chat(self, ctx: RequestContext) -> dict[str, Any]:
        async def call(model: str, deployment: ModelEntry) -> dict[str, Any]:
            dispatcher = self.dispatcher_for(deployment)
            if dispatcher.times_itself:  # enforces the same limit on its own call: cheaper
                return await dispatcher.chat(deployment, ctx.body)
            limit = min(deployment.timeouts.total, deployment.timeouts.first_byte)
            try:
                async with asyncio.timeout(limit):
                    if dispatcher.passes_through and ctx.inbound_body is not None:
                        return await dispatcher.messages(deployment, ctx)
                    return await dispatcher.chat(deployment, ctx.body)
            except TimeoutError:
                raise UpstreamError("timeout", f"the upstream did not answer within {limit:g}s",
                                    status=504) from None

        return await self.attempts(ctx, call)

    async def embeddings(self, ctx: RequestContext) -> dict[str, Any]:
        async def call(model: str, deployment: ModelEntry) -> dict[str, Any]:
            return await self.timed(deployment, self.dispatcher_for(deployment).embeddings(deployment, ctx.body))

        return await self.attempts(ctx, call)

    async def open_stream(self, ctx: RequestContext) -> tuple[dict[str, Any], AsyncIterator[dict[str, Any]]]:
        """Retries until the upstream produced its first chunk; returns it and the rest."""

        async def call(model: str, deployment: ModelEntry):
            dispatcher = self.dispatcher_for(deployment)
            if dispatcher.passes_through and ctx.inbound_body is not None:
                stream = dispatcher.messages_stream(deployment, ctx)
            else:
                stream = dispatcher.chat_stream(deployment, ctx.body)
            try:
                first = await self.timed(deployment, stream.__anext__(), "first_byte")
            except StopAsyncIteration:
                await stream.aclose()
                raise UpstreamError("truncated", "the upstream stream ended before any data") from None
            except BaseException:
                await stream.aclose()
                raise
            return first, _Masked(stream, deployment)

        return await self.attempts(ctx, call)


def _mask_credentials(err: UpstreamError, deployment: ModelEntry) -> None:
    """Mask the deployment's configured credentials in the error, whichever dispatcher
    raised it: an upstream may echo the key it was given in its error message."""
    secrets = deployment_secrets(deployment)
    if secrets:
        err.message = redact(err.message, secrets)
        err.args = (err.message,)


class _Masked:
    """The rest of a stream, its mid-stream errors masked like `_mask_credentials`. A class,
    not an async generator: `aclose()` must close the upstream even if never iterated."""

    def __init__(self, stream: AsyncIterator[dict[str, Any]], deployment: ModelEntry):
        self._stream = stream
        self._deployment = deployment
        self._deadline = time.monotonic() + deployment.timeouts.total

    def __aiter__(self) -> "_Masked":
        return self

    async def __anext__(self) -> dict[str, Any]:
        # The deployment's idle (between chunks) and total timeouts apply to every chunk.
        idle = self._deployment.timeouts.idle
        limit = max(0.0, min(idle, self._deadline - time.monotonic()))
        try:
            async with asyncio.timeout(limit):
                return await self._stream.__anext__()
        except TimeoutError:
            which = "idle" if limit == idle else "total"
            raise UpstreamError("timeout", f"the upstream stream stalled ({which} timeout, {limit:g}s)",
                                status=504) from None
        except UpstreamError as err:
            _mask_credentials(err, self._deployment)
            raise

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()
