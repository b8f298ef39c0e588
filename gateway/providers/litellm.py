"""Dispatch: one upstream call to one deployment, behind a small interface.

`Dispatcher` knows how to talk to a provider; it does not retry, fall back or choose a
deployment (that is `gateway/router.py`). Failures are normalised into `UpstreamError`
so the router can decide what is retryable without knowing which library raised.

`LitellmDispatcher` translates for every provider litellm supports (the client speaks
OpenAI; Anthropic sees /v1/messages). A native OpenAI-wire pass-through can implement the
same interface.
"""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch prices at import

import structlog  # noqa: E402

from gateway.client_body import DISPATCH_PARAMS  # noqa: E402
from gateway.config import ModelEntry  # noqa: E402
from gateway.providers.base import (  # noqa: E402
    UPSTREAM_TRACE,
    Dispatcher,
    StreamEnd,
    UpstreamError,
    retry_after_seconds,
)
from gateway.errors import redact  # noqa: E402


@functools.lru_cache(maxsize=None)
def load_litellm() -> Any:
    """Import litellm on first use (~3 s): admin commands and the native path never pay it."""
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    litellm.drop_params = True  # a param one provider lacks is dropped, not an error
    return litellm


log = structlog.get_logger("gateway.dispatch")

# Threads of the loop's default executor, where litellm runs the synchronous half of every
# call (`acompletion` hands `completion()` to `run_in_executor(None, ...)`). Python's default
# is min(32, cores + 4): 6 here, so six calls that block in it (a slow credential refresh,
# a provider's sync client) stalled every litellm-dispatched model for everyone. Idle
# threads cost nothing; a blocked call holds one of 64, and the router's timeouts
# release the request waiting on it (the thread finishes on its own).
BLOCKING_THREADS = 64
_executors: dict[int, ThreadPoolExecutor] = {}


def use_blocking_executor(loop: asyncio.AbstractEventLoop) -> None:
    """Give `loop` a default executor of BLOCKING_THREADS threads (once per loop)."""
    if id(loop) in _executors:
        return
    executor = ThreadPoolExecutor(BLOCKING_THREADS, thread_name_prefix="gateway-blocking")
    loop.set_default_executor(executor)
    _executors[id(loop)] = executor


def _headers_of(exc: BaseException) -> dict[str, str]:
    for attr in ("litellm_response_headers", "headers"):
        headers = getattr(exc, attr, None)
        if headers:
            try:
                return {k.lower(): v for k, v in dict(headers).items()}
            except (TypeError, ValueError):
                pass
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers:
        try:
            return {k.lower(): v for k, v in dict(headers).items()}
        except (TypeError, ValueError):
            return {}
    return {}


def _upstream_message(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc)
    # litellm prefixes "litellm.RateLimitError: AnthropicException - ..."; keep the provider's words.
    for marker in ("Exception - ", "Error - "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return redact(text.strip())[:2000] or type(exc).__name__


def normalise_litellm_error(exc: BaseException) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    litellm = load_litellm()
    message = _upstream_message(exc)
    if isinstance(exc, (litellm.Timeout, asyncio.TimeoutError, TimeoutError)):
        return UpstreamError("timeout", "the upstream did not answer in time", status=504)
    lowered = message.lower()
    if "missing credentials" in lowered or "api_key client option must be set" in lowered:
        # No provider key configured for this deployment: an auth failure, not a blip.
        return UpstreamError("status", "no provider API key is configured for this deployment", status=401)
    if isinstance(exc, litellm.APIConnectionError):
        if "timeout" in lowered or "timed out" in lowered:
            return UpstreamError("timeout", "the upstream did not answer in time", status=504)
        # litellm reports unparseable bodies as connection errors too.
        if any(s in lowered for s in ("json", "decode", "expecting value", "choices", "validation")):
            return UpstreamError("bad_response", f"the upstream sent an invalid response: {message}")
        return UpstreamError("connection", f"could not reach the upstream: {message}")
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        headers = _headers_of(exc)
        return UpstreamError("status", message, status=status, retry_after=retry_after_seconds(headers),
                             error_type=getattr(exc, "type", None) or None)
    if isinstance(exc, (ValueError, KeyError, TypeError, AttributeError)):
        return UpstreamError("bad_response", f"the upstream sent an invalid response: {message}")
    return UpstreamError("connection", f"upstream call failed: {message}")


# Chunk and response fields OpenAI clients know; litellm adds private ones we drop.
_CHUNK_KEYS = ("id", "object", "created", "model", "system_fingerprint", "service_tier", "choices", "usage")
_CHOICE_DELTA_KEYS = ("role", "content", "tool_calls", "function_call", "refusal", "reasoning_content")


# Usage keys kept: OpenAI's (with the token-class details), and Anthropic's cache counts
# where litellm's translation puts them (top level, beside prompt_tokens_details, which
# it fills too). gateway/usage.py reads them without counting a class twice. litellm's
# own additions (its "cost" guess, "iterations", "speed", ...) are dropped.
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
               "completion_tokens_details", "cache_read_input_tokens", "cache_creation_input_tokens")


def _clean_usage(usage: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in _USAGE_KEYS:
        value = usage.get(key)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
        if value is not None:
            out[key] = value
    return out


def _clean_chunk(raw: dict[str, Any]) -> dict[str, Any]:
    chunk = {k: raw[k] for k in _CHUNK_KEYS if k in raw and raw[k] is not None}
    chunk["object"] = "chat.completion.chunk"
    if isinstance(chunk.get("usage"), dict):
        chunk["usage"] = _clean_usage(chunk["usage"])
    choices = []
    for choice in raw.get("choices") or []:
        delta = choice.get("delta") or {}
        choices.append({
            "index": choice.get("index", 0),
            "delta": {k: delta[k] for k in _CHOICE_DELTA_KEYS if delta.get(k) is not None},
            "logprobs": choice.get("logprobs"),
            "finish_reason": choice.get("finish_reason"),
        })
    chunk["choices"] = choices
    return chunk


def _clean_response(raw: dict[str, Any]) -> dict[str, Any]:
    out = {k: raw[k] for k in ("id", "object", "created", "model", "system_fingerprint", "service_tier", "choices", "usage") if raw.get(k) is not None}
    out["object"] = "chat.completion"
    choices = []
    for choice in raw.get("choices") or []:
        message = {k: v for k, v in (choice.get("message") or {}).items()
                   if v is not None and k in ("role", "content", "tool_calls", "function_call", "refusal", "annotations", "reasoning_content")}
        message.setdefault("role", "assistant")
        message.setdefault("content", None)
        choices.append({"index": choice.get("index", 0), "message": message,
                        "logprobs": choice.get("logprobs"), "finish_reason": choice.get("finish_reason")})
    out["choices"] = choices
    if isinstance(out.get("usage"), dict):
        out["usage"] = _clean_usage(out["usage"])
    return out


class LitellmDispatcher(Dispatcher):
    """Every provider, through litellm. Retries are ours (the router's), never litellm's."""

    def _kwargs(self, deployment: ModelEntry, body: dict[str, Any],
                endpoint: str = "chat.completions") -> dict[str, Any]:
        """litellm's keyword arguments: the OpenAI parameters of the body (nothing else
        from a client ever becomes a litellm argument: see gateway/client_body.py), the
        deployment's opted-in extra fields as provider body fields, then the config's."""
        allowed = DISPATCH_PARAMS[endpoint]
        kwargs = {k: v for k, v in body.items() if k in allowed}
        extra = {k: body[k] for k in deployment.allow_extra_params if k in body}
        if extra:
            kwargs["extra_body"] = extra
        kwargs.update(deployment.litellm_params.model_dump(exclude_none=True))  # config wins, always
        kwargs["num_retries"] = 0
        kwargs["max_retries"] = 0
        trace = UPSTREAM_TRACE.get()
        if trace is not None:  # tracing is on: the attempt's traceparent (gateway/telemetry.py)
            kwargs["extra_headers"] = {**trace, **(kwargs.get("extra_headers") or {})}
        return kwargs

    async def warm_up(self, deployment: ModelEntry) -> None:
        """One call through litellm's request path with a mock answer (no network). The
        first real call of a process otherwise pays litellm's lazy set-up (~0.5 s measured:
        534 ms for a first call, 47 ms after this), enough to trip a tight first_byte timeout."""
        kwargs = self._kwargs(deployment, {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 1})
        kwargs["mock_response"] = "ok"
        for slow in ("mock_delay", "mock_timeout"):  # a test deployment's; not for warming up
            kwargs.pop(slow, None)
        await load_litellm().acompletion(**kwargs)

    async def chat(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await load_litellm().acompletion(**self._kwargs(deployment, body))
        except Exception as exc:  # noqa: BLE001 — every failure becomes an UpstreamError
            raise normalise_litellm_error(exc) from None
        raw = response.model_dump() if hasattr(response, "model_dump") else dict(response)
        if not raw.get("choices"):
            raise UpstreamError("bad_response", "the upstream response had no choices")
        return _clean_response(raw)

    async def chat_stream(self, deployment: ModelEntry, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        kwargs = self._kwargs(deployment, body)
        kwargs["stream"] = True
        try:
            stream = await load_litellm().acompletion(**kwargs)
        except Exception as exc:  # noqa: BLE001
            raise normalise_litellm_error(exc) from None
        carried = False  # litellm skips unparseable lines and invents a final "stop" chunk
        end = StreamEnd()
        yielded = False
        try:
            async for chunk in stream:
                raw = chunk.model_dump() if hasattr(chunk, "model_dump") else dict(chunk)
                cleaned = _clean_chunk(raw)
                end.observe(cleaned)
                if not carried:
                    carried = bool(cleaned.get("usage")) or any(
                        c["delta"].get("content") or c["delta"].get("tool_calls") or c["delta"].get("function_call")
                        for c in cleaned["choices"])
                    if not carried and any(c.get("finish_reason") for c in cleaned["choices"]):
                        # A stream that "finishes" having carried nothing is a broken one:
                        # raise before any byte reaches the client, so it is retried.
                        raise UpstreamError("bad_response", "the upstream stream carried no data")
                yielded = True
                yield cleaned
        except Exception as exc:  # noqa: BLE001
            original = getattr(exc, "original_exception", None)
            if not yielded and "MidStream" in type(exc).__name__ and isinstance(original, Exception):
                # Some providers' HTTP errors (Gemini's 429/503) surface at the first chunk,
                # wrapped: before any chunk they are that error, as without streaming.
                raise normalise_litellm_error(original) from None
            err = normalise_litellm_error(exc)
            if end.complete and err.kind != "status":
                # The same rule as the native path (StreamEnd): the answer was whole.
                log.warning("upstream_stream_without_done", deployment=deployment.name, error=type(exc).__name__,
                            note="the stream broke after every choice had finished: the answer is complete")
                return
            # After the first chunk every failure is a stream that broke off (litellm
            # raises MidStreamFallbackError, status 500, for a cut connection).
            if err.kind in ("connection", "bad_response") or "MidStream" in type(exc).__name__:
                err = UpstreamError("truncated", f"the upstream stream broke off: {err.message}")
            raise err from None
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:  # noqa: BLE001 — closing a broken stream may fail again
                    pass

    async def embeddings(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        kwargs = self._kwargs(deployment, body, "embeddings")
        kwargs.pop("mock_response", None)
        try:
            response = await load_litellm().aembedding(**kwargs)
        except Exception as exc:  # noqa: BLE001
            raise normalise_litellm_error(exc) from None
        raw = response.model_dump() if hasattr(response, "model_dump") else dict(response)
        data = [{"object": "embedding", "index": d.get("index", i), "embedding": d.get("embedding")}
                for i, d in enumerate(raw.get("data") or [])]
        if not data:
            raise UpstreamError("bad_response", "the upstream embeddings response had no data")
        usage = raw.get("usage") or {}
        return {"object": "list", "data": data, "model": raw.get("model"),
                "usage": {"prompt_tokens": usage.get("prompt_tokens") or 0,
                          "total_tokens": usage.get("total_tokens") or 0}}
