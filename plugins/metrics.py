"""metrics: Prometheus metrics at GET /metrics.

    plugins:
      - metrics                     # first in the list, so in-flight counts every request
        settings:
          path: /metrics
          require_key: false          # true: scrapes need `Authorization: Bearer <master key>`
          latency_buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]

Like Prometheus exporters, /metrics is open by default: bind the gateway to a private
address or set `require_key: true` and give Prometheus the master key
(`authorization: {credentials_file: ...}` in its scrape config).

Each gateway has its own registry (tests start many). Labels are public model names,
providers, HTTP statuses and fixed words: never a key, a user id or a prompt, so label
cardinality stays bounded and nothing secret can leak into a scrape.

    gateway_requests_total{endpoint,model,provider,status}
    gateway_tokens_total{model,direction="prompt"|"completion"}
    gateway_cost_usd_total{model}
    gateway_cache_saved_usd_total{model}  what answers served without the provider would have cost
    gateway_energy_total{event="reserved"|"settled"|"refunded"}
    gateway_downgrades_total{from_model,to_model}
    gateway_retries_total{model}         upstream calls beyond the first
    gateway_fallbacks_total{model}
    gateway_in_flight_requests
    gateway_request_latency_seconds{endpoint,stream}       histogram
    gateway_time_to_first_byte_seconds{endpoint,stream}    histogram
    gateway_usage_write_queue_depth      rows waiting for the database (accounting)
    gateway_trace_spans_exported_total   trace spans the OTLP collector took (docs/telemetry.md)
    gateway_trace_spans_dropped_total{reason="queue_full"|"export_failed"|"shutdown"}
                                         spans a slow or dead collector lost (never waited for)
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import ApiError
from gateway.telemetry import SPANS
from plugins.auth import bearer_token, is_master_key
from plugins.base import TOOL_ENDPOINTS, Plugin, RequestContext

disable_created_metrics()  # the *_created series only add noise to every scrape

DEFAULT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class MetricsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = "/metrics"
    require_key: bool = False
    latency_buckets: list[float] = Field(default_factory=lambda: list(DEFAULT_BUCKETS), min_length=1)


class _TraceSpans:
    """The tracer's export counts (gateway/telemetry.py), per process, read at each scrape."""

    def collect(self) -> Any:
        exported = CounterMetricFamily("gateway_trace_spans_exported", "Trace spans the OTLP collector took")
        exported.add_metric([], SPANS["exported"])
        yield exported
        dropped = CounterMetricFamily("gateway_trace_spans_dropped",
                                      "Trace spans dropped: collector slow or down (queue_full, export_failed) "
                                      "or still queued at stop (shutdown)", labels=["reason"])
        for reason in ("queue_full", "export_failed", "shutdown"):
            dropped.add_metric([reason], SPANS[reason])
        yield dropped


class Metrics(Plugin):
    name = "metrics"
    needs_body = False  # counts every request, also one refused for its body
    Settings = MetricsSettings

    def __init__(self, settings: MetricsSettings, services: Any):
        super().__init__(settings, services)
        r = self.registry = CollectorRegistry(auto_describe=True)
        buckets = sorted(settings.latency_buckets)
        self.requests = Counter("gateway_requests", "Requests by outcome",
                                ["endpoint", "model", "provider", "status"], registry=r)
        self.tokens = Counter("gateway_tokens", "Tokens", ["model", "direction"], registry=r)
        self.cost = Counter("gateway_cost_usd", "Provider cost in USD", ["model"], registry=r)
        self.saved = Counter("gateway_cache_saved_usd", "USD the cache's hits would have cost", ["model"], registry=r)
        self.energy = Counter("gateway_energy", "Energy movements", ["event"], registry=r)
        self.downgrades = Counter("gateway_downgrades", "Model downgrades", ["from_model", "to_model"], registry=r)
        self.retries = Counter("gateway_retries", "Upstream calls beyond the first", ["model"], registry=r)
        self.fallbacks = Counter("gateway_fallbacks", "Moves to another deployment or model", ["model"], registry=r)
        self.in_flight = Gauge("gateway_in_flight_requests", "Requests inside the chain", registry=r)
        # Read at scrape time: a plain counter per request instead of two locked Gauge updates.
        self._in_flight = 0
        self.in_flight.set_function(lambda: float(self._in_flight))
        self.latency = Histogram("gateway_request_latency_seconds", "Request latency",
                                 ["endpoint", "stream"], buckets=buckets, registry=r)
        self.ttfb = Histogram("gateway_time_to_first_byte_seconds", "Time to first byte",
                              ["endpoint", "stream"], buckets=buckets, registry=r)
        self.queue_depth = Gauge("gateway_usage_write_queue_depth", "Usage rows waiting for the database",
                                 registry=r)
        self.queue_depth.set_function(self._queue_depth)
        r.register(_TraceSpans())
        # Label values are bounded (models from config, statuses, fixed words), so is this.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), memoised: prometheus_client validates and locks per call."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _queue_depth(self) -> float:
        for plugin in self.services.plugins:
            if plugin.name == "accounting":
                return float(plugin.depth)
        return 0.0

    def routes(self) -> list[Any]:
        async def scrape(request: web.Request) -> web.Response:
            if self.settings.require_key:
                token = bearer_token(request.headers.get("Authorization"))
                # services.config follows live reloads: a rotated master key applies at once.
                if token is None or not is_master_key(token, self.services.config.auth.master_key):
                    raise ApiError(401, f"{self.settings.path} needs 'Authorization: Bearer <master key>' "
                                        "(metrics.require_key is true)", code="invalid_api_key")
            return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        return [web.get(self.settings.path, scrape)]

    async def on_request(self, ctx: RequestContext) -> None:
        self._in_flight += 1
        ctx.scratch(self.name)["counted"] = True

    async def on_response(self, ctx: RequestContext) -> None:
        self._observe(ctx)

    async def on_error(self, ctx: RequestContext) -> None:
        self._observe(ctx)

    def _observe(self, ctx: RequestContext) -> None:
        if ctx.scratch(self.name).pop("counted", False):
            self._in_flight -= 1
        if ctx.endpoint == "models":
            return
        if self.services.alerts is not None:
            self.services.alerts.observe_request(ctx.status)  # the error-rate alert's window
        # A label value comes from config, never from the client: a model the gateway does
        # not serve (whatever the client typed, a pasted key included) is "unknown".
        # An MCP tool (`server__tool`) counts once a server of the config exposed it.
        known = ctx.config.mcp_tool(ctx.model) is not None if ctx.endpoint in TOOL_ENDPOINTS \
            else ctx.config.deployments(ctx.model)
        model = ctx.model if ctx.model and known else "unknown"
        child = self._child
        child(self.requests, ctx.endpoint, model, ctx.provider or "none", str(ctx.status)).inc()
        stream = "true" if ctx.stream else "false"
        if ctx.latency_ms is not None:
            child(self.latency, ctx.endpoint, stream).observe(ctx.latency_ms / 1000)
        if ctx.ttfb_ms is not None:
            child(self.ttfb, ctx.endpoint, stream).observe(ctx.ttfb_ms / 1000)
        if ctx.usage is not None:
            child(self.tokens, model, "prompt").inc(ctx.usage.prompt_tokens)
            child(self.tokens, model, "completion").inc(ctx.usage.completion_tokens)
        if ctx.cost_usd:
            child(self.cost, model).inc(float(ctx.cost_usd))  # a Prometheus counter is a float
        if ctx.saved_usd:
            child(self.saved, model).inc(float(ctx.saved_usd))
        if ctx.energy_cost:
            child(self.energy, "reserved").inc(ctx.energy_cost)
            child(self.energy, "refunded" if ctx.error is not None else "settled").inc(ctx.energy_cost)
        if ctx.downgraded_from is not None:
            self.downgrades.labels(ctx.downgraded_from, model).inc()
        if ctx.attempts > 1:
            self.retries.labels(model).inc(ctx.attempts - 1)
        if ctx.fallbacks:
            self.fallbacks.labels(model).inc(ctx.fallbacks)
