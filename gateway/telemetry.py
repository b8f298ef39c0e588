"""Traces of every call over OTLP/HTTP: OpenTelemetry GenAI spans (docs/telemetry.md).

    telemetry:
      otlp_endpoint: http://127.0.0.1:4318      # unset: no tracing, no cost
      headers: {Authorization: os.environ/OTLP_AUTH}
      sample_ratio: 1.0
      client_sampling: ignore                   # or honor: a client's sampled flag decides
      capture_content: false

One SERVER span per request, opened and closed by the request lifecycle
(gateway/lifecycle.py `run_request`): its attributes say what the request was, what
served it and what it cost, the plugins' request hooks included (their names and
durations as two array attributes); decisions off the fast path are its events. One
CLIENT span per upstream attempt (gateway/router.py `Router.attempts`), so retries and fallbacks show as
siblings. A client's W3C `traceparent` is continued; each attempt sends its own to the
upstream (`UPSTREAM_TRACE`, read by the native HTTP client and the litellm dispatcher).

A request's spans are recorded as plain values while it runs (no SDK span objects, no
context switches) and become span records once it ended: ids from the SDK's id generator,
the decision to record from its sampler (TraceIdRatioBased; ParentBased only with
`client_sampling: honor`: by default a client's sampled flag does not make the operator
pay for its spans, docs/telemetry.md "Sampling"). Off the request
path and out of the gateway's process: the records go to the exporter process
(gateway/trace_export.py), which builds the SDK's ReadableSpans and exports them with its
BatchSpanProcessor and OTLP/HTTP exporter. Bounded: a dead or slow collector leaves spans in
flight, and beyond `queue_size` further spans are dropped and counted (`SPANS`, exposed by
the metrics plugin as gateway_trace_spans_dropped_total), never waited for. With tracing
off, `Snapshot.telemetry` is None and the hot path pays one attribute check per hook site.

Attributes follow the GenAI semantic conventions (experimental; `gen_ai.provider.name`, not
the deprecated `gen_ai.system`); the gateway's own are under `gateway.`. Never a key or a
header: prompt and completion text only with `capture_content: true`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from time import time_ns
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit

import orjson

from gateway.providers.base import UPSTREAM_TRACE, UpstreamError
from gateway.trace_export import SPANS, ExportPipe

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.config import ModelEntry, TelemetryConfig
    from plugins.base import RequestContext

__all__ = ["SPANS", "Telemetry", "RequestTrace", "build_telemetry", "retire_telemetry", "telemetry_cleanup"]

log = logging.getLogger("gateway.telemetry")
# A client's malformed traceparent or tracestate is ignored (a new trace; no tracestate passed
# on), not logged: the SDK's warnings would quote the client's header, once per request.
for _name in ("opentelemetry.trace.propagation.tracecontext", "opentelemetry.trace.span"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# The litellm provider prefix -> the convention's gen_ai.provider.name.
_PROVIDER_NAMES = {
    "openai": "openai", "anthropic": "anthropic", "azure": "azure.ai.openai", "azure_ai": "azure.ai.inference",
    "gemini": "gcp.gemini", "vertex_ai": "gcp.vertex_ai", "bedrock": "aws.bedrock", "groq": "groq",
    "mistral": "mistral_ai", "cohere": "cohere", "deepseek": "deepseek", "xai": "x_ai",
    "perplexity": "perplexity", "watsonx": "ibm.watsonx.ai",
}


def provider_name(provider: str | None) -> str | None:
    if provider is None:
        return None
    return _PROVIDER_NAMES.get(provider, provider)


TOOL_ENDPOINT = "mcp.tools/call"  # plugins/base.py TOOL_ENDPOINTS: an MCP tools/call


def operation_of(endpoint: str) -> str:
    """gen_ai.operation.name: embeddings, execute_tool (an MCP tools/call), or chat for
    every conversation API."""
    if endpoint == "embeddings":
        return "embeddings"
    return "execute_tool" if endpoint == TOOL_ENDPOINT else "chat"


@functools.lru_cache(maxsize=256)
def _server_of(api_base: str | None) -> tuple[str, int] | None:
    if not api_base:
        return None
    parts = urlsplit(api_base)
    if not parts.hostname:
        return None
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def traces_url(endpoint: str) -> str:
    """`otlp_endpoint` is the collector's base URL (OTEL_EXPORTER_OTLP_ENDPOINT's meaning);
    the traces path is added unless it is there already."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class Telemetry:
    """The tracer built from `telemetry:` (one per config generation that changed it).

    A request's spans are recorded as plain values while it runs (`RequestTrace`) and
    become span records once it ended, handed to the exporter process (gateway/trace_export.py),
    where the SDK's ReadableSpan objects are built and its OTLP/HTTP exporter encodes and
    posts them. Ids come from the SDK's id generator, the decision to record from its sampler.
    The SDK is imported here, not by the module: a gateway without `telemetry:` never loads
    it (~45 modules, ~3 MiB of RSS; docs/performance.md)."""

    def __init__(self, settings: "TelemetryConfig"):
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import get_current_span
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.settings = settings
        self.capture_content = settings.capture_content
        assert settings.otlp_endpoint is not None
        # `client_sampling: honor`: ParentBased, a client's traceparent decides; without one
        # (no SDK span is ever current in the gateway) its root sampler does, called
        # directly. `ignore` (the default): the root sampler decides every request.
        self.root_sampler = TraceIdRatioBased(settings.sample_ratio)
        self.sampler = ParentBased(self.root_sampler)
        self.honor_client = settings.client_sampling == "honor"
        self.ids = RandomIdGenerator()
        self.propagator = TraceContextTextMapPropagator()
        self.span_of = get_current_span
        self.active = 0  # requests started and not yet finished on this tracer (a reload waits for them)
        self.stopped = False
        self._stopping: asyncio.Future | None = None
        self.pipe = ExportPipe({
            "endpoint": traces_url(settings.otlp_endpoint), "headers": dict(settings.headers),
            "service_name": settings.service_name, "queue_size": settings.queue_size,
            "batch_size": min(settings.batch_size, settings.queue_size),
            "export_interval": settings.export_interval, "export_timeout": settings.export_timeout,
        }, settings.queue_size)

    def start(self, ctx: "RequestContext", request: "web.Request",
              carrier: Mapping[str, Any] | None = None) -> "RequestTrace":
        """The request's SERVER span, continuing the client's `traceparent` if it sent one
        (in its headers, or in `carrier`: an MCP request's `params._meta`)."""
        headers: Any = request.headers
        if "traceparent" not in headers and carrier is not None and isinstance(carrier.get("traceparent"), str):
            headers = {key: carrier[key] for key in ("traceparent", "tracestate") if isinstance(carrier.get(key), str)}
        parent_context = None
        trace_id = parent_id = 0
        trace_state = None
        if "traceparent" in headers:
            parent_context = self.propagator.extract(headers)
            parent = self.span_of(parent_context).get_span_context()
            if parent.is_valid:
                trace_id, parent_id = parent.trace_id, parent.span_id
                trace_state = parent.trace_state.to_header() or None
            else:
                parent_context = None
        if not trace_id:
            trace_id = self.ids.generate_trace_id()
        if parent_context is None:
            sampled = self.root_sampler.should_sample(None, trace_id, ctx.endpoint).decision.is_sampled()
        elif self.honor_client:
            sampled = self.sampler.should_sample(parent_context, trace_id, ctx.endpoint).decision.is_sampled()
        else:
            # The operator's ratio, on an id the client did not choose: TraceIdRatioBased
            # reads the trace id's low bits, and a client picks its trace id (one ending in
            # zeros would be kept at any ratio). The client's trace is continued either way.
            sampled = self.root_sampler.should_sample(
                None, self.ids.generate_trace_id(), ctx.endpoint).decision.is_sampled()
        self.active += 1
        trace = RequestTrace(self, trace_id, self.ids.generate_span_id(), parent_id, trace_state, sampled)
        if sampled:
            trace.attributes = {"gateway.request_id": ctx.request_id, "gateway.endpoint": ctx.endpoint,
                                "http.request.method": request.method, "url.path": request.path}
        return trace

    async def flush_and_stop(self) -> None:
        """Export what is queued and stop. The exporter process is given at most
        `export_timeout` seconds (waited for in a daemon thread: a dead collector neither
        holds the stop nor the loop's executor); what it did not export is counted as
        dropped ("shutdown"). Once: a later call waits for the first."""
        if self._stopping is None:
            self.stopped = True
            self._stopping = asyncio.ensure_future(self._flush_and_stop())
        await asyncio.shield(self._stopping)

    async def _flush_and_stop(self) -> None:
        self.pipe.stop_taking()
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def run() -> None:
            try:
                self.pipe.close(self.settings.export_timeout)
            except Exception:  # noqa: BLE001
                log.exception("trace flush failed")
            finally:
                try:
                    loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
                except RuntimeError:  # the loop is gone: nobody waits any more
                    pass

        threading.Thread(target=run, name="trace-flush", daemon=True).start()
        await asyncio.wait_for(asyncio.shield(done), self.settings.export_timeout + 5)

    async def retire(self, retired: list["Telemetry"], poll: float = 0.1) -> None:
        """A reload replaced this tracer: once the requests it started have ended (their
        spans submitted), it exports what it holds and its exporter process leaves; it is
        then taken off `retired` (the tracers the stop flushes)."""
        try:
            while self.active > 0 and not self.stopped:
                await asyncio.sleep(poll)
            await self.flush_and_stop()
        finally:
            if self in retired:
                retired.remove(self)


_RETIRING: set[asyncio.Future] = set()  # strong references to the retire() tasks


def retire_telemetry(tracer: Telemetry, retired: list[Telemetry]) -> None:
    """gateway/reload.py: `tracer` was replaced; flushed and stopped once its requests ended."""
    retired.append(tracer)
    task = asyncio.ensure_future(tracer.retire(retired))
    _RETIRING.add(task)
    task.add_done_callback(_RETIRING.discard)


def build_telemetry(settings: "TelemetryConfig") -> Telemetry | None:
    return Telemetry(settings) if settings.otlp_endpoint else None


# opentelemetry.trace.SpanKind's and StatusCode's values (the exporter process turns them
# back into the enums, gateway/trace_export.py): plain ints, so the module needs no SDK.
_SERVER, _CLIENT = 1, 2  # SpanKind.SERVER, SpanKind.CLIENT
_UNSET, _ERROR = 0, 2  # StatusCode.UNSET, StatusCode.ERROR


class Attempt:
    """One upstream call's CLIENT span while it runs, and the `UPSTREAM_TRACE` it set."""

    __slots__ = ("span_id", "token", "name", "start", "attributes")

    def __init__(self, span_id: int, token: Any, name: str = "", start: int = 0,
                 attributes: dict[str, Any] | None = None):
        self.span_id = span_id
        self.token = token
        self.name = name
        self.start = start
        self.attributes = attributes


class RequestTrace:
    """One request's spans: `ctx.trace` while tracing is on (plugins/base.py). Recorded as
    plain values; `finish` turns them into span records for the exporter process."""

    __slots__ = ("telemetry", "trace_id", "span_id", "parent_id", "trace_state", "recording", "start_ns",
                 "attributes", "events", "spans", "open_stream", "response_id", "answer", "plugins", "plugin_ms", "extra")

    def __init__(self, telemetry: Telemetry, trace_id: int, span_id: int, parent_id: int,
                 trace_state: str | None, sampled: bool):
        self.telemetry = telemetry
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id  # the client's span (its traceparent), or 0
        self.trace_state = trace_state  # the client's tracestate header, passed on
        # False for a request the sampler dropped: nothing is computed for its attributes,
        # only the (unsampled) traceparent of each attempt is sent upstream.
        self.recording = sampled
        self.start_ns = time_ns()
        self.attributes: dict[str, Any] = {}
        self.events: list[tuple[str, dict[str, Any], int]] = []
        self.spans: list[tuple] = []  # the ended CLIENT spans' records
        self.open_stream: Attempt | None = None  # the CLIENT span of the stream being relayed
        self.response_id: str | None = None
        self.answer: tuple[Any, dict[str, Any]] | None = None  # the last answer and its attributes
        # The request hooks that ran, in chain order, and how long each took: two array
        # attributes of the server span at its end (an event each cost ~10x as much).
        self.plugins: list[str] = []
        self.plugin_ms: list[float] = []
        self.extra: dict[str, Any] = {}  # further attributes for the server span's end

    # --- the gateway's work ----------------------------------------------------------

    def phase(self, name: str, started: float, error: BaseException | None = None) -> None:
        """A plugin's request hook ran (`started`: its time.perf_counter())."""
        if not self.recording:
            return
        self.plugins.append(name)
        self.plugin_ms.append(round((time.perf_counter() - started) * 1000, 3))
        if error is not None:
            self.extra["gateway.plugin.failed"] = name
            self.extra["gateway.plugin.error_type"] = getattr(error, "code", None) or type(error).__name__

    def gate(self, outcome: str, moved_to: str | None) -> None:
        """An overlapped check's outcome (`ctx.gate`): passed, moved, or its error's code."""
        if not self.recording:
            return
        self.extra["gateway.gate"] = outcome
        if moved_to is not None:
            self.extra["gateway.gate_moved_to"] = moved_to

    def event(self, name: str, attributes: Mapping[str, Any]) -> None:
        """A decision off the fast path (a downgrade, a cache hit), timed as an event."""
        if not self.recording:
            return
        self.events.append((name, {k: v for k, v in attributes.items() if v is not None}, time_ns()))

    # --- upstream attempts -----------------------------------------------------------

    def attempt(self, ctx: "RequestContext", model: str, deployment: "ModelEntry") -> Attempt:
        """A CLIENT span for one call to `deployment`; the call carries its traceparent."""
        self._close_stream(discarded=True)  # a gate that moved the request dispatches again
        span_id = self.telemetry.ids.generate_span_id()
        token = UPSTREAM_TRACE.set(self._carrier(span_id))
        if not self.recording:  # an unsampled child: only its traceparent is used
            return Attempt(span_id, token)
        params = deployment.litellm_params
        upstream_model = params.model.split("/", 1)[1] if "/" in params.model else params.model
        operation = operation_of(ctx.endpoint)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation, "gen_ai.request.model": upstream_model,
            "gateway.model": model, "gateway.deployment": params.model, "gateway.attempt": ctx.attempts}
        provider = provider_name(ctx.provider)
        if provider is not None:
            attributes["gen_ai.provider.name"] = provider
        server = _server_of(params.api_base)
        if server is not None:
            attributes["server.address"], attributes["server.port"] = server
        return Attempt(span_id, token, f"{operation} {upstream_model}", time_ns(), attributes)

    def tool_call(self, server: str, tool: str, url: str | None) -> tuple[Attempt, dict[str, str]]:
        """A CLIENT span for one MCP tools/call to `server` (gateway/inbound/mcp.py), and
        the trace context the call carries in its `params._meta` (the MCP convention)."""
        span_id = self.telemetry.ids.generate_span_id()
        carrier = self._carrier(span_id)
        if not self.recording:
            return Attempt(span_id, None), carrier
        attributes: dict[str, Any] = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
                                      "mcp.method.name": "tools/call", "gateway.mcp_server": server}
        address = _server_of(url)
        if address is not None:
            attributes["server.address"], attributes["server.port"] = address
        return Attempt(span_id, None, f"execute_tool {tool}", time_ns(), attributes), carrier

    def tool_call_ended(self, attempt: Attempt, error: str | None = None) -> None:
        """The tools/call answered (`error`: its failure's code, or `tool_error` for a
        result the tool marked isError)."""
        if not self.recording:
            return
        if error is None:
            self._end(attempt)
            return
        assert attempt.attributes is not None
        attempt.attributes["error.type"] = error
        self._end(attempt, _ERROR, error)

    def _carrier(self, span_id: int) -> dict[str, str]:
        """The W3C trace-context headers that make the span `span_id` the upstream call's
        parent (as the SDK's TraceContextTextMapPropagator writes them, without building a
        context for it: version 00, the ids in hex, the sampled flag, the client's tracestate)."""
        carrier = {"traceparent": f"00-{self.trace_id:032x}-{span_id:016x}-{'01' if self.recording else '00'}"}
        if self.trace_state:
            carrier["tracestate"] = self.trace_state
        return carrier

    def _end(self, attempt: Attempt, status: int = _UNSET, description: str | None = None) -> None:
        self.spans.append((attempt.name, _CLIENT, self.trace_id, attempt.span_id, self.span_id, False,
                           self.trace_state, attempt.start, time_ns(), attempt.attributes, None, status, description))

    def attempt_failed(self, attempt: Attempt, err: BaseException) -> None:
        UPSTREAM_TRACE.reset(attempt.token)
        if not self.recording:
            return
        attributes = attempt.attributes
        assert attributes is not None
        if isinstance(err, UpstreamError):
            attributes["error.type"] = str(err.status) if err.kind == "status" else err.kind
            attributes["gateway.retryable"] = err.retryable
            if err.status is not None:
                attributes["http.response.status_code"] = err.status
            self._end(attempt, _ERROR, err.kind)
        else:
            attributes["error.type"] = type(err).__name__
            self._end(attempt, _ERROR)

    def attempt_ok(self, attempt: Attempt, result: Any) -> None:
        """JSON answers end their span here, with the answer's attributes; a stream's span
        stays open until the stream was relayed (`finish`)."""
        UPSTREAM_TRACE.reset(attempt.token)
        if not self.recording:
            return
        attributes = attempt.attributes
        assert attributes is not None
        if isinstance(result, tuple):  # (first chunk, the rest): Router.open_stream
            first = result[0] if isinstance(result[0], dict) else {}
            self.response_id = first.get("id") or self.response_id
            if first.get("model"):
                attributes["gen_ai.response.model"] = first["model"]
            self.open_stream = attempt
            return
        if isinstance(result, dict):
            answer = _answer_attributes(result)
            attributes.update(answer)
            self.answer = (result, answer)
            self.response_id = result.get("id") or self.response_id
        self._end(attempt)

    def _close_stream(self, discarded: bool = False, attributes: Mapping[str, Any] | None = None,
                      error: str | None = None) -> None:
        """End the relayed stream's CLIENT span; `error`: the stream broke (its code)."""
        attempt, self.open_stream = self.open_stream, None
        if attempt is None:
            return
        assert attempt.attributes is not None
        if discarded:
            attempt.attributes["gateway.discarded"] = True
        elif attributes:
            attempt.attributes.update(attributes)
        if error is not None:
            attempt.attributes["error.type"] = error
            self._end(attempt, _ERROR, error)
        else:
            self._end(attempt)

    # --- the end -----------------------------------------------------------------------

    def finish(self, ctx: "RequestContext") -> None:
        """The answer (or error) is sent: the server span's attributes and end, then every
        span of the request to the exporter."""
        self.telemetry.active -= 1
        if not self.recording:
            return
        try:
            attributes = self.attributes
            attributes.update(_request_attributes(ctx, self.answer))
            if self.response_id and "gen_ai.response.id" not in attributes:
                attributes["gen_ai.response.id"] = self.response_id
            if self.plugins:
                attributes["gateway.plugin.names"] = self.plugins
                attributes["gateway.plugin.durations_ms"] = self.plugin_ms
            if self.extra:
                attributes.update(self.extra)
            if self.telemetry.capture_content:
                attributes.update(_content_attributes(ctx))
            if self.open_stream is not None:
                # A stream that broke after its first chunk (the upstream cut it, timed out,
                # sent garbage) is the upstream call's failure too; a client that left is not.
                broke = ctx.error is not None and ctx.error.status >= 500 and not ctx.client_disconnected
                self._close_stream(attributes={k: v for k, v in attributes.items()
                                               if k.startswith("gen_ai.usage.") or k in _STREAM_KEYS},
                                   error=(ctx.error.code or ctx.error.type) if broke else None)
            operation = attributes.get("gen_ai.operation.name")
            name = f"{operation} {ctx.requested_model}" if operation and _served(ctx) else operation or ctx.endpoint
            status, description = _UNSET, None
            if ctx.error is not None and ctx.error.status >= 500:
                status, description = _ERROR, ctx.error.code or ctx.error.type
            spans = self.spans
            spans.append((name, _SERVER, self.trace_id, self.span_id, self.parent_id, True, self.trace_state,
                          self.start_ns, time_ns(), attributes, self.events or None, status, description))
            self.telemetry.pipe.submit(spans)
        except Exception:  # noqa: BLE001 — tracing fails open
            log.exception("trace_finish_failed")


_STREAM_KEYS = frozenset({"gen_ai.response.finish_reasons", "gen_ai.response.id"})
_MAX_CLIENT_TEXT = 256  # a name the client chose (model, tool, action), in an attribute


def _served(ctx: "RequestContext") -> bool:
    """The requested model (or tool) is one the gateway serves: a span name stays
    low-cardinality, never a string the client made up (it may be 60 KB long)."""
    name = ctx.requested_model
    if not name:
        return False
    if ctx.endpoint == TOOL_ENDPOINT:
        return ctx.config.mcp_tool(name) is not None
    return bool(ctx.config.deployments(name))


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _MAX_CLIENT_TEXT:
        return value[:_MAX_CLIENT_TEXT - 3] + "..."
    return value


def _answer_attributes(payload: Mapping[str, Any]) -> dict[str, Any]:
    """An upstream answer's id, model, finish reasons and usage (chat, Responses, embeddings)."""
    out: dict[str, Any] = {}
    if isinstance(payload.get("id"), str):
        out["gen_ai.response.id"] = payload["id"]
    if isinstance(payload.get("model"), str):
        out["gen_ai.response.model"] = payload["model"]
    reasons = [c.get("finish_reason") for c in payload.get("choices") or () if isinstance(c, dict)]
    reasons = [r for r in reasons if isinstance(r, str)]
    if not reasons and isinstance(payload.get("status"), str) and payload.get("object") == "response":
        reasons = [payload["status"]]
    if reasons:
        out["gen_ai.response.finish_reasons"] = reasons
    usage = payload.get("usage")
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(prompt, int):
            out["gen_ai.usage.input_tokens"] = prompt
        if isinstance(completion, int):
            out["gen_ai.usage.output_tokens"] = completion
    return out


def _request_attributes(ctx: "RequestContext", answered: tuple[Any, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The server span's attributes at the request's end; `answered`: an upstream answer
    whose attributes were already read (the client span's), reused if it is the response."""
    out: dict[str, Any] = {}
    if ctx.status is not None:
        out["http.response.status_code"] = ctx.status
    if ctx.error is not None:
        out["error.type"] = ctx.error.code or ctx.error.type
    if ctx.endpoint == TOOL_ENDPOINT:
        out["gen_ai.operation.name"] = "execute_tool"
        out["mcp.method.name"] = "tools/call"
        if ctx.requested_model:
            out["gen_ai.tool.name"] = _bounded(ctx.requested_model)
        if ctx.provider:
            out["gateway.mcp_server"] = ctx.provider
        out["gateway.energy"] = ctx.energy_cost if ctx.error is None else 0
        if ctx.cost_usd is not None:
            out["gateway.cost_usd"] = float(ctx.cost_usd)
    elif ctx.billed:
        out["gen_ai.operation.name"] = operation_of(ctx.endpoint)
        body = ctx.body
        if ctx.requested_model:
            out["gen_ai.request.model"] = _bounded(ctx.requested_model)
        if ctx.model:
            out["gen_ai.response.model"] = ctx.model
        provider = provider_name(ctx.provider)
        if provider is not None:
            out["gen_ai.provider.name"] = provider
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", body.get("max_output_tokens")))
        if isinstance(max_tokens, int):
            out["gen_ai.request.max_tokens"] = max_tokens
        for key in ("temperature", "top_p"):
            value = body.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out["gen_ai.request." + key] = float(value)
        out["gen_ai.request.stream"] = ctx.stream
        response = ctx.response
        if isinstance(response, dict):
            answer = answered[1] if answered is not None and answered[0] is response else _answer_attributes(response)
            for key in ("gen_ai.response.id", "gen_ai.response.finish_reasons"):
                if key in answer:
                    out[key] = answer[key]
        elif ctx.finish_reason:
            out["gen_ai.response.finish_reasons"] = [ctx.finish_reason]
        usage = ctx.usage
        if usage is not None:
            # OpenAI's convention, which the gateway's Usage keeps for every provider: the
            # prompt's cached and cache-written tokens are part of its input tokens (the
            # GenAI convention's too; Anthropic's own input_tokens leaves them out).
            out["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            out["gen_ai.usage.output_tokens"] = usage.completion_tokens
            if usage.cached_tokens:
                out["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
            if usage.cache_write_tokens:
                out["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
            if usage.reasoning_tokens:
                out["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
            if usage.estimated:
                out["gateway.usage_estimated"] = True
        out["gateway.energy"] = ctx.energy_cost if ctx.error is None else 0
        if ctx.cost_usd is not None:
            out["gateway.cost_usd"] = float(ctx.cost_usd)
        out["gateway.cache_hit"] = ctx.response_headers.get("X-Cache") == "HIT"
        out["gateway.attempts"] = ctx.attempts
        if ctx.fallbacks:
            out["gateway.fallbacks"] = ctx.fallbacks
        if ctx.downgraded_from:
            out["gateway.downgraded_from"] = ctx.downgraded_from
            if ctx.downgrade_reason:
                out["gateway.downgrade_reason"] = ctx.downgrade_reason
        if ctx.deployment:
            out["gateway.deployment"] = ctx.deployment
    identity = ctx.identity
    if identity is not None:
        out["gateway.user"] = identity.user_id
        out["gateway.workspace"] = identity.workspace_id
        out["gateway.tier"] = identity.tier
    for key, value in (("gateway.action", ctx.action), ("gateway.experiment", ctx.experiment),
                       ("gateway.variant", ctx.variant)):
        if value:
            out[key] = _bounded(value)
    if ctx.client_disconnected:
        out["gateway.client_disconnected"] = True
    if ctx.unbilled_calls:
        out["gateway.unbilled_calls"] = len(ctx.unbilled_calls)
    return out


MAX_CONTENT_CHARS = 64 * 1024  # one captured text attribute (a 4 MB prompt would fail its whole export batch)


def _captured(value: Any) -> str:
    """JSON of a captured conversation part, cut at MAX_CONTENT_CHARS (then no longer JSON:
    its end says how much was left out)."""
    text = orjson.dumps(value, default=str).decode()
    if len(text) <= MAX_CONTENT_CHARS:
        return text
    return text[:MAX_CONTENT_CHARS] + f"...[{len(text) - MAX_CONTENT_CHARS} more characters]"


def _content_attributes(ctx: "RequestContext") -> dict[str, Any]:
    """`capture_content: true`: the conversation in and the answer out, as the convention's
    gen_ai.input.messages / gen_ai.output.messages (JSON); a tool call's arguments as
    gen_ai.tool.call.arguments."""
    out: dict[str, Any] = {}
    body = ctx.body
    if ctx.endpoint == TOOL_ENDPOINT:
        if body.get("arguments") is not None:
            out["gen_ai.tool.call.arguments"] = _captured(body["arguments"])
        return out
    messages = body.get("messages") if "messages" in body else body.get("input")
    if messages is not None:
        out["gen_ai.input.messages"] = _captured(messages)
    if body.get("instructions") is not None:  # a Responses request's system prompt
        out["gen_ai.system_instructions"] = _captured(body["instructions"])
    response = ctx.response
    if isinstance(response, dict) and response.get("choices"):
        outputs = [c.get("message") for c in response["choices"] if isinstance(c, dict)]
        out["gen_ai.output.messages"] = _captured(outputs)
    elif isinstance(response, dict) and response.get("output") is not None:
        out["gen_ai.output.messages"] = _captured(response["output"])
    elif ctx.streamed_text:
        out["gen_ai.output.messages"] = _captured([{"role": "assistant", "content": "".join(ctx.streamed_text)}])
    return out


def telemetry_cleanup(gw: Any) -> Any:
    """The app's cleanup context (`app.cleanup_ctx`): at stop (SIGTERM included) every
    tracer flushes what is queued, each for at most `export_timeout` seconds."""

    async def telemetry_ctx(app: Any) -> Any:
        yield
        for tracer in [gw.snapshot.telemetry, *gw.retired_telemetry]:
            if tracer is not None:
                await tracer.flush_and_stop()

    return telemetry_ctx
