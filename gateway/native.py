"""The native fast path: OpenAI-wire upstreams without litellm.

For deployments whose upstream already speaks the OpenAI wire format (OpenAI itself and
OpenAI-compatible servers: vLLM, llama.cpp, Ollama's /v1, ...), translating through litellm
costs ~3 ms of CPU per call for nothing. This dispatcher sends the request body as it is
(with the deployment's model name and key), over one pooled aiohttp session, and parses
only what the gateway needs: the JSON answer, or each SSE line of a stream as it arrives.

Same interface and same failure vocabulary (`UpstreamError`) as the litellm dispatcher, so
retries, fallbacks and every plugin behave identically on both paths. litellm remains the
dispatcher for providers that need translation, and the source of prices and token counts.

Chosen per deployment (`dispatch: auto | native | litellm`); `auto` means native for
`openai/...` models (and bare model names), litellm for everything else.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import aiohttp
import orjson

from gateway.config import ModelEntry
from gateway.dispatch import UpstreamError, retry_after_seconds
from gateway.errors import redact

OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"
_DONE = b"[DONE]"


def upstream_model(deployment: ModelEntry) -> str:
    model = deployment.litellm_params.model
    return model.split("/", 1)[1] if model.startswith("openai/") else model


def _error_from(status: int, headers: Any, raw: bytes) -> UpstreamError:
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


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    """A JSON object from the upstream, or a retryable bad_response."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamError("bad_response", f"the upstream sent a {what} that is not JSON") from None
    if not isinstance(value, dict):
        raise UpstreamError("bad_response", f"the upstream sent a {what} that is not a JSON object")
    return value


class NativeOpenAIDispatcher:
    """OpenAI wire format, pass-through. One shared, pooled ClientSession per gateway."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._targets: dict[tuple[int, str, bool], tuple[ModelEntry, str, dict[str, str], aiohttp.ClientTimeout]] = {}

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(
                connector=connector, json_serialize=lambda o: orjson.dumps(o).decode(), auto_decompress=True,
                skip_auto_headers=("User-Agent",))
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def _target(self, deployment: ModelEntry, path: str,
                stream: bool = False) -> tuple[str, dict[str, str], aiohttp.ClientTimeout]:
        # Built once per deployment and path (a config reload brings new ModelEntry objects).
        key = (id(deployment), path, stream)
        cached = self._targets.get(key)
        if cached is not None and cached[0] is deployment:
            return cached[1], dict(cached[2]), cached[3]
        params = deployment.litellm_params
        base = (params.api_base or OPENAI_DEFAULT_BASE).rstrip("/")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if params.api_key:
            headers["Authorization"] = f"Bearer {params.api_key}"
        timeouts = deployment.timeouts
        total = min(params.timeout or timeouts.total, timeouts.total)
        if not stream:
            # A non-streamed answer must arrive within first_byte (as the router enforces for
            # litellm); streams get first_byte and idle from the router, per chunk.
            total = min(total, timeouts.first_byte)
        timeout = aiohttp.ClientTimeout(total=total, sock_connect=min(timeouts.connect, total))
        if len(self._targets) > 1024:
            self._targets.clear()
        self._targets[key] = (deployment, base + path, headers, timeout)
        return base + path, dict(headers), timeout

    def _body(self, deployment: ModelEntry, body: dict[str, Any]) -> bytes:
        payload = dict(body)
        payload["model"] = upstream_model(deployment)
        return orjson.dumps(payload)

    async def _post_json(self, deployment: ModelEntry, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url, headers, timeout = self._target(deployment, path)
        try:
            async with self.session().post(url, data=self._body(deployment, body), headers=headers,
                                           timeout=timeout) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise _error_from(resp.status, resp.headers, raw)
        except UpstreamError:
            raise
        except asyncio.TimeoutError:
            raise UpstreamError("timeout", f"the upstream did not answer within {timeout.total:g}s",
                                status=504) from None
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamError("bad_response", f"the upstream response was cut off: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError("connection", f"could not reach the upstream: {type(exc).__name__}") from None
        return _json_object(raw, "response")

    async def chat(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        payload = await self._post_json(deployment, "/chat/completions", body)
        if not isinstance(payload.get("choices"), list) or not payload["choices"]:
            raise UpstreamError("bad_response", "the upstream response had no choices")
        return payload

    async def embeddings(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        payload = await self._post_json(deployment, "/embeddings", body)
        if not isinstance(payload.get("data"), list) or not payload["data"]:
            raise UpstreamError("bad_response", "the upstream embeddings response had no data")
        return payload

    async def chat_stream(self, deployment: ModelEntry, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        url, headers, timeout = self._target(deployment, "/chat/completions", stream=True)
        headers["Accept"] = "text/event-stream"
        payload = dict(body)
        payload["stream"] = True
        try:
            resp = await self.session().post(url, data=self._body(deployment, payload), headers=headers,
                                             timeout=timeout)
        except asyncio.TimeoutError:
            raise UpstreamError("timeout", "the upstream did not answer in time", status=504) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError("connection", f"could not reach the upstream: {type(exc).__name__}") from None
        done = False
        try:
            if resp.status >= 400:
                raise _error_from(resp.status, resp.headers, await resp.read())
            async for line in resp.content:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, ": keep-alive" comments, "event:" lines
                data = line[5:].strip()
                if data == _DONE:
                    done = True
                    break
                chunk = _json_object(data, "stream chunk")
                if "error" in chunk and "choices" not in chunk:
                    err = chunk["error"]
                    message = err.get("message") if isinstance(err, dict) else str(err)
                    raise UpstreamError("truncated", f"the upstream stream failed: {redact(str(message))}")
                yield chunk
            if not done:
                raise UpstreamError("truncated", "the upstream stream ended without [DONE]")
        except UpstreamError:
            raise
        except asyncio.TimeoutError:
            raise UpstreamError("timeout", "the upstream stream stalled", status=504) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError("truncated", f"the upstream stream broke off: {type(exc).__name__}") from None
        finally:
            if done:
                resp.release()  # fully read: the connection goes back to the pool
            else:
                resp.close()  # abandoned or broken mid-body: never reuse this connection
