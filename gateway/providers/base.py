"""What every provider shares: the `Dispatcher` protocol the router calls, the one error type
(`UpstreamError`) every provider's failures are normalised into, the one end-of-stream rule
(`StreamEnd`), and small facts about a deployment.

A provider module (openai, azure, gemini, anthropic, litellm, demo) implements `Dispatcher`;
the router asks a dispatcher what it can do (`Dispatcher.passes_through`) rather than
comparing it with a known instance.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, AsyncIterator, Callable, Generic, TypeVar

import orjson

from gateway.config import ModelEntry
from gateway.errors import redact

ERROR_BODY_LIMIT = 1024 * 1024  # an error answer is read (and its connection reused) up to this size

# W3C trace-context headers (traceparent, tracestate) for the upstream call the current task
# makes: set per attempt by the router when tracing is on (gateway/telemetry.py), sent by the
# native HTTP client and passed to litellm as extra_headers. None (the default): nothing sent.
UPSTREAM_TRACE: ContextVar[dict[str, str] | None] = ContextVar("upstream_trace", default=None)


class UpstreamError(Exception):
    """A failed upstream call, normalised.

    kind: "status" (the upstream answered with an HTTP error), "connection" (refused,
    reset, nothing sent), "timeout", "bad_response" (not parseable as the expected format),
    "truncated" (a stream ended without its final chunk), "dropped" (the request was sent,
    then the connection closed before any answer: the upstream may have processed, and
    billed, it — so it is neither retried nor counted by the circuit breaker).
    """

    def __init__(self, kind: str, message: str, *, status: int | None = None,
                 retry_after: float | None = None, error_type: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.error_type = error_type

    @property
    def retryable(self) -> bool:
        if self.kind in ("connection", "timeout", "bad_response", "truncated"):
            return True
        return self.status is not None and (self.status == 429 or self.status >= 500 or self.status == 408)

    @property
    def is_auth(self) -> bool:
        """Our provider credentials were refused: another deployment may still work."""
        return self.kind == "status" and self.status in (401, 403)

    def __repr__(self) -> str:
        return f"UpstreamError({self.kind}, status={self.status}, {self.message[:80]!r})"


class Relayed(dict):
    """An OpenAI-shaped answer or stream chunk (what the chain sees: usage, cache, replays)
    that also carries what the upstream sent in the client's own wire format (`raw`), when
    dispatch passed the client's body through: Anthropic's message dict for a whole answer,
    the SSE bytes of its events for a stream piece. One value, no side channel: the inbound
    adapter writes `raw` where it has it (gateway/inbound/anthropic.py), the chain reads the
    dict. A piece of nothing (`choices: []`) carries an event that has no OpenAI form (a ping,
    a block's start or stop): the client still gets it when it comes."""

    __slots__ = ("raw",)

    def __init__(self, openai: dict[str, Any], raw: Any) -> None:
        super().__init__(openai)
        self.raw = raw


class StreamEnd:
    """One end-of-stream rule for every path: a stream is complete when every choice it
    carried has its `finish_reason`. A `[DONE]` (or Anthropic's `message_stop`) missing
    after that, or the connection closing there, is logged, not treated as a cut: the
    client has the whole answer and is billed for it. A choice left open is a cut-off
    answer (an error event, and a refund)."""

    __slots__ = ("open", "seen")

    def __init__(self) -> None:
        self.open: set[int] = set()
        self.seen = False

    def observe(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            if choice.get("finish_reason"):
                self.open.discard(index)
            elif index not in self.open:
                self.open.add(index)
            self.seen = True

    @property
    def complete(self) -> bool:
        return self.seen and not self.open


class Dispatcher:
    """One upstream API. The router calls `chat`, `chat_stream` and `embeddings`, and asks
    the dispatcher what else it can do through the flags below, never by identity."""

    # Enforces the deployment's total / first-byte timeouts on its own call (the router
    # need not wrap it in asyncio.timeout: cheaper on the fast path).
    times_itself = False
    # Can send an inbound request of the client's own wire format as the client sent it
    # (`messages`, `messages_stream`: Anthropic's /v1/messages to Anthropic), answering
    # `Relayed` pieces.
    passes_through = False
    # Serves OpenAI's Responses API (`responses_create`, `responses_events`, `responses_stored`).
    serves_responses = False

    async def chat(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed chat completion, as an OpenAI `chat.completion` dict."""
        raise UpstreamError("status", "this provider does not serve chat completions", status=400)

    def chat_stream(self, deployment: ModelEntry, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Chunks as OpenAI `chat.completion.chunk` dicts, as they arrive. The iterator
        must be closed (`aclose`) by the caller when abandoned."""
        raise UpstreamError("status", "this provider does not stream chat completions", status=400)

    async def embeddings(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI embeddings `list` dict."""
        raise UpstreamError("status", "this provider does not serve embeddings", status=400)


def provider_of(deployment: ModelEntry) -> str:
    model = deployment.litellm_params.model
    return model.split("/", 1)[0] if "/" in model else "openai"


def retry_after_seconds(headers: dict[str, str]) -> float | None:
    """`retry-after-ms` (OpenAI) wins over `retry-after` (seconds; HTTP-date ignored)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            return None
    return None


def deployment_secrets(deployment: ModelEntry) -> tuple[str, ...]:
    """The credential values configured for a deployment, whatever their shape (an Azure
    key has no `sk-` prefix for the pattern-based `redact` to catch). The router masks them
    in every upstream error message: an upstream may echo back the key it was given."""
    params = deployment.litellm_params.model_dump(exclude_none=True)
    return tuple(str(v) for k, v in params.items()
                 if isinstance(v, str) and any(w in k.lower() for w in ("key", "secret", "token", "password", "credential")))


def error_from_status(status: int, headers: Any, raw: bytes) -> UpstreamError:
    message = ""
    error_type = None
    try:
        payload = orjson.loads(raw)
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            message = str(error.get("message") or "")
            error_type = error.get("type")
        elif isinstance(error, str):
            message = error
    except orjson.JSONDecodeError:
        message = raw[:500].decode("utf-8", "replace")
    lowered = {k.lower(): v for k, v in headers.items()}
    return UpstreamError("status", redact(message) or f"upstream returned HTTP {status}", status=status,
                         retry_after=retry_after_seconds(lowered), error_type=error_type)


def json_object(raw: bytes, what: str) -> dict[str, Any]:
    """A JSON object from the upstream, or a retryable bad_response."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamError("bad_response", f"the upstream sent a {what} that is not JSON") from None
    if not isinstance(value, dict):
        raise UpstreamError("bad_response", f"the upstream sent a {what} that is not a JSON object")
    return value


T = TypeVar("T")


class TargetCache(Generic[T]):
    """A provider's per-deployment upstream target (URL, proxy, header bytes, timeouts),
    built once by `build(deployment, *key)`: keyed by the deployment object and the key,
    checked against the object (a config reload brings new ones), bounded."""

    __slots__ = ("_build", "_entries", "_limit")

    def __init__(self, build: Callable[..., T], limit: int = 1024) -> None:
        self._build = build
        self._entries: dict[tuple, tuple[ModelEntry, T]] = {}
        self._limit = limit

    def get(self, deployment: ModelEntry, *key: Any) -> T:
        entry = self._entries.get((id(deployment), *key))
        if entry is not None and entry[0] is deployment:
            return entry[1]
        value = self._build(deployment, *key)
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[(id(deployment), *key)] = (deployment, value)
        return value


def release_or_close(response: Any, finished: bool) -> None:
    """The one connection rule of every upstream stream: back to the pool only when the
    answer was read to its end; closed otherwise (cut off, failed, abandoned by the client),
    since a connection left mid-body can never be reused."""
    if finished:
        response.release()
    else:
        response.close()


class Translation(Dispatcher):
    """A provider whose OpenAI-chat translation is ours (Anthropic's Messages, Gemini's
    generateContent, Azure's rewrites), sent over the native HTTP client (`native`): what
    `covers` accepts goes natively, the rest and embeddings through litellm, which knows
    every parameter (`litellm`)."""

    def __init__(self, native: Any, litellm: Any) -> None:
        self.native = native
        self.litellm = litellm

    def covers(self, deployment: ModelEntry, body: dict[str, Any]) -> bool:
        """Whether the native translation serves this body exactly as litellm would."""
        return True

    async def translated_chat(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        return await self.litellm.chat(deployment, body)

    def translated_stream(self, deployment: ModelEntry, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self.litellm.chat_stream(deployment, body)

    async def chat(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        if not self.covers(deployment, body):
            return await self.litellm.chat(deployment, body)
        return await self.translated_chat(deployment, body)

    def chat_stream(self, deployment: ModelEntry, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if not self.covers(deployment, body):
            return self.litellm.chat_stream(deployment, body)
        return self.translated_stream(deployment, body)

    async def embeddings(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        return await self.litellm.embeddings(deployment, body)
