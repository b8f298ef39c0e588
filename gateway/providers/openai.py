"""The native fast path: OpenAI-wire upstreams without litellm.

For deployments whose upstream already speaks the OpenAI wire format (OpenAI itself and
OpenAI-compatible servers: vLLM, llama.cpp, Ollama's /v1, ...), translating through litellm
costs ~3 ms of CPU per call for nothing. This dispatcher sends the request body as it is
(with the deployment's model name and key), over one pool of keep-alive connections
(gateway/providers/http.py), and parses
only what the gateway needs: the JSON answer, or each SSE line of a stream as it arrives.

Same interface and same failure vocabulary (`UpstreamError`) as the litellm dispatcher, so
retries, fallbacks and every plugin behave identically on both paths. litellm remains the
dispatcher for providers that need translation, and the source of prices and token counts.

Chosen per deployment (`dispatch: auto | native | litellm`); `auto` means native for
`openai/...` models (and bare model names), and for `azure/...` ones at Azure OpenAI's URLs
(`_endpoint`; gateway/providers/azure.py decides per request), litellm for everything else
but Anthropic and Gemini, which have translations of their own (gateway/providers/anthropic.py,
gateway/providers/gemini.py).

What reaches the upstream from the deployment's `litellm_params`, as litellm would send it:
`api_key` (Authorization), `organization` (OpenAI-Organization), `extra_headers`/`headers`,
and body defaults (`max_tokens`, `temperature`, ..., `extra_body`'s fields), each only when
the client's body lacks that field. Any other litellm_param on a native deployment is a
config error (gateway/config.py), never silently dropped. `proxy:` (or the environment's
HTTPS_PROXY/NO_PROXY) picks the egress proxy.

Redirects: 307/308 to the same origin are followed (at most `MAX_REDIRECTS`, the body sent
again); to another origin, or 301/302/303, they are an error: the API key must not follow
a redirect elsewhere, and a POST turned into a GET is not the call that was asked for.
"""

from __future__ import annotations

import asyncio
import re
import os
from typing import Any, AsyncIterator
from urllib.parse import urljoin

import orjson
import structlog

from gateway.client_body import DISPATCH_PARAMS
from gateway.config import ModelEntry
from gateway.providers.base import (
    ERROR_BODY_LIMIT,
    Dispatcher,
    StreamEnd,
    TargetCache,
    UpstreamError,
    error_from_status,
    json_object,
    release_or_close,
)
from gateway.errors import redact
from gateway.config import NATIVE_BODY_DEFAULTS
from gateway.providers.http import (
    MAX_BODY,
    Response,
    Target,
    UpstreamConnectionError,
    UpstreamDroppedError,
    UpstreamHTTP,
    UpstreamProtocolError,
)

log = structlog.get_logger("gateway.native")

OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"
AZURE_DEFAULT_API_VERSION = "2025-02-01-preview"  # litellm.AZURE_DEFAULT_API_VERSION, its default
_AZURE_V1 = ("v1", "latest", "preview")  # the version-less /openai/v1 API (litellm: an OpenAI client)
_PASSED = {endpoint: params | {"model"} for endpoint, params in DISPATCH_PARAMS.items()}  # model: replaced
_DONE = b"[DONE]"
# The Responses API's stream: the events that end it whole (incomplete: max tokens), or failed.
RESPONSES_TERMINAL = ("response.completed", "response.incomplete")
RESPONSES_FAILED = ("response.failed", "error")
RESPONSES_EVENT_NAME = re.compile(r"[A-Za-z0-9_.]{1,100}")  # response.output_text.delta, error, ...
MAX_REDIRECTS = 3


def _body_defaults(deployment: ModelEntry, endpoint: str) -> dict[str, Any]:
    """The body fields the deployment's litellm_params set for `endpoint` (extra_body's first)."""
    extra = deployment.litellm_params.model_extra or {}
    allowed = _PASSED[endpoint]
    defaults = dict(extra.get("extra_body") or {})
    defaults.update({k: v for k, v in extra.items() if k in NATIVE_BODY_DEFAULTS and k in allowed})
    return defaults


async def _drain(response: Response) -> None:
    """Read a small answer we do not use, so its connection can be reused."""
    try:
        await response.read(64 * 1024)
    except UpstreamProtocolError:
        response.close()
        return
    response.release()


def upstream_model(deployment: ModelEntry) -> str:
    """The body's `model`: OpenAI's model name, or an Azure deployment's name."""
    model = deployment.litellm_params.model
    return model.split("/", 1)[1] if model.startswith(("openai/", "azure/")) else model


def call_timeouts(deployment: ModelEntry, stream: bool) -> tuple[float, float]:
    """(total, connect) seconds for one call: a non-streamed answer must arrive within
    first_byte (as the router enforces for litellm); streams get first_byte and idle from
    the router, per chunk."""
    timeouts = deployment.timeouts
    total = min(deployment.litellm_params.timeout or timeouts.total, timeouts.total)
    if not stream:
        total = min(total, timeouts.first_byte)
    return total, min(timeouts.connect, total)


def azure_api_version(deployment: ModelEntry) -> str:
    """The deployment's api_version, else AZURE_API_VERSION, else litellm's default."""
    return (deployment.litellm_params.model_extra or {}).get("api_version") or os.environ.get("AZURE_API_VERSION") \
        or AZURE_DEFAULT_API_VERSION


def _endpoint(deployment: ModelEntry, path: str) -> tuple[str, str | None]:
    """(URL, credential header line) of `path` (/chat/completions, /embeddings) for this
    deployment. Azure OpenAI, as litellm calls it: {api_base}/openai/deployments/{name}{path}
    ?api-version=... with an `api-key` header, or for the v1 API {api_base}/openai/v1{path}
    with a Bearer key."""
    params = deployment.litellm_params
    if not params.model.startswith("azure/"):
        base = (params.api_base or OPENAI_DEFAULT_BASE).rstrip("/")
        return base + path, f"Authorization: Bearer {params.api_key}" if params.api_key else None
    base = (params.api_base or "").rstrip("/")
    version = azure_api_version(deployment)
    if version in _AZURE_V1:
        return (base if base.endswith("/openai/v1") else base + "/openai/v1") + path, \
            f"Authorization: Bearer {params.api_key}"
    if "/openai/deployments/" not in base:
        base += "/openai/deployments/" + upstream_model(deployment)
    return f"{base}{path}?api-version={version}", f"api-key: {params.api_key}"


def endpoint_url(deployment: ModelEntry, path: str) -> tuple[str, str | None]:
    """(URL, credential header line) of `path` at the deployment's upstream (the files and
    batches client, gateway/providers/openai_files.py, talks to the same account)."""
    return _endpoint(deployment, path)


def _without_azure_filters(answer: dict[str, Any]) -> dict[str, Any] | None:
    """An Azure answer or chunk as litellm hands it on: without the content filter verdicts
    (`prompt_filter_results`, each choice's `content_filter_results`), and None for the
    stream's opening chunk that carries nothing else."""
    choices = answer.get("choices")
    if not choices and not answer.get("usage") and "prompt_filter_results" in answer:
        return None
    answer.pop("prompt_filter_results", None)
    for choice in choices or ():
        choice.pop("content_filter_results", None)
    return answer


def _target_of(deployment: ModelEntry, path: str, stream: bool) -> tuple[Target, bytes, float, float]:
    params = deployment.litellm_params
    url, credential = _endpoint(deployment, path)
    lines = ["Content-Type: application/json",
             "Accept: text/event-stream" if stream else "Accept: application/json"]
    if credential:
        lines.append(credential)
    extra = params.model_extra or {}
    if extra.get("organization"):
        lines.append(f"OpenAI-Organization: {extra['organization']}")
    configured = {**(extra.get("headers") or {}), **(extra.get("extra_headers") or {})}
    if configured:  # they replace a default line of the same name (as litellm's do)
        names = {name.lower() for name in configured}
        lines = [line for line in lines if line.split(":", 1)[0].lower() not in names]
        lines.extend(f"{name}: {value}" for name, value in configured.items())
    total, connect = call_timeouts(deployment, stream)
    return (Target(url, proxy=deployment.proxy), "".join(f"{line}\r\n" for line in lines).encode("latin-1"),
            total, connect)


class NativeOpenAIDispatcher(Dispatcher):
    """OpenAI wire format, pass-through. One shared connection pool per gateway
    (gateway/providers/http.py)."""


    times_itself = True  # the HTTP client enforces the call's timeouts itself
    serves_responses = True
    def __init__(self) -> None:
        self._http: UpstreamHTTP | None = None
        self._targets: TargetCache[tuple[Target, bytes, float, float]] = TargetCache(_target_of)

    def http(self) -> UpstreamHTTP:
        if self._http is None or self._http.closed:
            self._http = UpstreamHTTP()
        return self._http

    async def close(self) -> None:
        if self._http is not None and not self._http.closed:
            await self._http.close()

    def _target(self, deployment: ModelEntry, path: str,
                stream: bool = False) -> tuple[Target, bytes, float, float]:
        """(where, header lines, total timeout, connect timeout) for one deployment and
        path; built once (a config reload brings new ModelEntry objects)."""
        return self._targets.get(deployment, path, stream)

    def _body(self, deployment: ModelEntry, body: dict[str, Any], endpoint: str = "chat.completions") -> bytes:
        """The body as the upstream gets it: the OpenAI parameters, plus the fields this
        deployment opted in to (a fallback may not take what the requested model did)."""
        allowed = _PASSED[endpoint]
        if body.keys() <= allowed:
            payload = dict(body)
        else:
            extra = deployment.allow_extra_params
            payload = {k: v for k, v in body.items() if k in allowed or k in extra}
        if deployment.litellm_params.model_extra:
            for key, value in _body_defaults(deployment, endpoint).items():
                payload.setdefault(key, value)  # the client's own value wins
        payload["model"] = upstream_model(deployment)
        return orjson.dumps(payload)

    async def _send(self, target: Target, headers: bytes, body: bytes, connect_timeout: float,
                    method: str = "POST") -> Response:
        """The request sent and the final response's head received (same-origin 307/308
        followed); failures as UpstreamError. "dropped" (sent, then closed unanswered: the
        upstream may have processed it) is not retried by the router."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = await self.http().post(target, headers, body, connect_timeout=connect_timeout,
                                                  method=method)
            except UpstreamConnectionError as exc:
                raise UpstreamError("connection", f"could not reach the upstream: {exc}") from None
            except UpstreamDroppedError as exc:
                raise UpstreamError("dropped", f"{exc}; it may have been processed, so it is not retried") from None
            except UpstreamProtocolError as exc:
                raise UpstreamError("bad_response", f"the upstream response was not valid: {exc}") from None
            if not 300 <= response.status < 400 or response.status == 304:
                return response
            location = response.headers.get("Location", "")
            await _drain(response)
            following = None
            if response.status in (307, 308) and location:
                try:
                    following = Target(urljoin(target.url, location), proxy=target.proxy_url)
                except ValueError:
                    following = None
            if following is None or not following.same_origin(target):
                raise UpstreamError("status", f"the upstream redirected (HTTP {response.status}) to "
                                              f"{redact(location)[:200]!r}; only 307/308 to the same origin "
                                              f"are followed", status=response.status)
            target = following
        raise UpstreamError("status", f"the upstream redirected more than {MAX_REDIRECTS} times", status=502)

    async def _post_json(self, deployment: ModelEntry, path: str, body: dict[str, Any],
                         endpoint: str) -> dict[str, Any]:
        target, headers, total, connect = self._target(deployment, path)
        return await self.post_json(target, headers, self._body(deployment, body, endpoint), total, connect)

    async def post_json(self, target: Target, headers: bytes, payload: bytes, total: float,
                        connect: float, method: str = "POST") -> dict[str, Any]:
        """POST `payload` (or send it with another `method`), read the whole answer within
        `total`: its JSON object, or the UpstreamError it amounts to (also for the native
        Anthropic path)."""
        response = None
        try:
            async with asyncio.timeout(total):
                response = await self._send(target, headers, payload, connect, method)
                raw = await response.read(ERROR_BODY_LIMIT if response.status >= 400 else MAX_BODY)
            response.release()
        except TimeoutError:
            if response is not None:
                response.close()
            raise UpstreamError("timeout", f"the upstream did not answer within {total:g}s", status=504) from None
        except UpstreamProtocolError as exc:
            if response is not None:
                response.close()
            raise UpstreamError("bad_response", f"the upstream response was cut off: {exc}") from None
        except BaseException:
            if response is not None:
                response.close()
            raise
        if response.status >= 400:
            raise error_from_status(response.status, response.headers, raw)
        return json_object(raw, "response")

    async def open_stream(self, target: Target, headers: bytes, payload: bytes, total: float,
                          connect: float) -> Response:
        """POST `payload` and return the response whose head said 2xx, its body (a stream)
        unread; an error answer is read and raised as its UpstreamError (for translating
        dispatchers: gateway/providers/gemini.py)."""
        try:
            async with asyncio.timeout(total):
                response = await self._send(target, headers, payload, connect)
        except TimeoutError:
            raise UpstreamError("timeout", "the upstream did not answer in time", status=504) from None
        if response.status < 400:
            return response
        try:
            raw = await response.read(ERROR_BODY_LIMIT)
        except BaseException:
            response.close()
            raise
        response.release()
        raise error_from_status(response.status, response.headers, raw)

    async def responses_create(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        """POST /responses, not streamed: the response object as the upstream sent it."""
        payload = await self._post_json(deployment, "/responses", body, "responses")
        if not isinstance(payload.get("output"), list):
            raise UpstreamError("bad_response", "the upstream response had no output")
        return payload

    async def responses_stored(self, deployment: ModelEntry, method: str, response_id: str, tail: str = "",
                               query: str = "") -> dict[str, Any]:
        """GET or DELETE /responses/{id}[/input_items][?query] at the deployment's upstream."""
        target, headers, total, connect = self._target(deployment, "/responses")
        url = f"{target.url}/{response_id}{tail}" + (f"?{query}" if query else "")
        return await self.post_json(Target(url, proxy=deployment.proxy), headers, b"", total, connect,
                                    method=method)

    async def responses_events(self, deployment: ModelEntry, body: dict[str, Any]) -> AsyncIterator[
            tuple[str, dict[str, Any], bytes]]:
        """POST /responses streamed: (event name, its data, its raw bytes as the client gets
            them), as they arrive, until response.completed / incomplete / failed."""
        target, headers, total, connect = self._target(deployment, "/responses", stream=True)
        try:
            async with asyncio.timeout(total):
                resp = await self._send(target, headers, self._body(deployment, {**body, "stream": True},
                                                                         "responses"), connect)
        except TimeoutError:
            raise UpstreamError("timeout", "the upstream did not answer in time", status=504) from None
        finished = False
        try:
            if resp.status >= 400:
                raw = await resp.read(ERROR_BODY_LIMIT)
                finished = True
                raise error_from_status(resp.status, resp.headers, raw)
            name, data = "", b""
            async for line in resp.iter_lines():
                line = line.rstrip(b"\r\n")
                if line.startswith(b"event:"):
                    name = line[6:].strip().decode("utf-8", "replace")
                elif line.startswith(b"data:"):
                    data = line[5:].strip()
                elif not line.strip() and data:
                    parsed = json_object(data, "stream event")
                    name = str(parsed.get("type") or name or "")
                    if not RESPONSES_EVENT_NAME.fullmatch(name):
                        raise UpstreamError("bad_response", "the upstream sent an event with an invalid name")
                    if b"\r" in data:  # JSON whitespace, but a line end to the client's SSE parser
                        data = orjson.dumps(parsed)
                    yield name, parsed, b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"
                    if name in RESPONSES_TERMINAL or name in RESPONSES_FAILED:
                        finished = True
                        return
                    name, data = "", b""
            raise UpstreamError("truncated", "the upstream stream ended before response.completed")
        except (UpstreamProtocolError, OSError) as exc:
            raise UpstreamError("truncated", f"the upstream stream broke off: {type(exc).__name__}") from None
        finally:
            release_or_close(resp, finished)

    async def chat(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        payload = await self._post_json(deployment, "/chat/completions", body, "chat.completions")
        if not isinstance(payload.get("choices"), list) or not payload["choices"]:
            raise UpstreamError("bad_response", "the upstream response had no choices")
        if deployment.litellm_params.model.startswith("azure/"):
            _without_azure_filters(payload)
        return payload

    async def embeddings(self, deployment: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
        payload = await self._post_json(deployment, "/embeddings", body, "embeddings")
        if not isinstance(payload.get("data"), list) or not payload["data"]:
            raise UpstreamError("bad_response", "the upstream embeddings response had no data")
        return payload

    async def chat_stream(self, deployment: ModelEntry, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        target, headers, total, connect = self._target(deployment, "/chat/completions", stream=True)
        payload = dict(body)
        payload["stream"] = True
        try:
            async with asyncio.timeout(total):
                resp = await self._send(target, headers, self._body(deployment, payload), connect)
        except TimeoutError:
            raise UpstreamError("timeout", "the upstream did not answer in time", status=504) from None
        done = False
        end = StreamEnd()
        azure = deployment.litellm_params.model.startswith("azure/")
        try:
            if resp.status >= 400:
                raw = await resp.read(ERROR_BODY_LIMIT)
                done = True  # read to its end: the connection goes back to the pool
                raise error_from_status(resp.status, resp.headers, raw)
            async for line in resp.iter_lines():
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, ": keep-alive" comments, "event:" lines
                data = line[5:].strip()
                if data == _DONE:
                    done = True
                    break
                chunk = json_object(data, "stream chunk")
                if "error" in chunk and "choices" not in chunk:
                    err = chunk["error"]
                    message = err.get("message") if isinstance(err, dict) else str(err)
                    raise UpstreamError("truncated", f"the upstream stream failed: {redact(str(message))}")
                if azure and _without_azure_filters(chunk) is None:
                    continue
                end.observe(chunk)
                yield chunk
            if not done and not end.complete:
                raise UpstreamError("truncated", "the upstream stream ended before every choice finished")
            if not done:
                log.warning("upstream_stream_without_done", deployment=deployment.name,
                            note="every choice had finished: the answer is complete")
        except UpstreamError:
            raise
        except (UpstreamProtocolError, OSError) as exc:
            if not end.complete:
                raise UpstreamError("truncated", f"the upstream stream broke off: {type(exc).__name__}") from None
            log.warning("upstream_stream_without_done", deployment=deployment.name, error=type(exc).__name__,
                        note="the connection broke after every choice had finished: the answer is complete")
        finally:
            # [DONE] is final: nothing after it is waited for or can fail the answer. The
            # connection goes back to the pool once the body's end arrives (if it does).
            release_or_close(resp, done)
