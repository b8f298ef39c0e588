"""OpenTelemetry traces over OTLP/HTTP (gateway/telemetry.py, docs/telemetry.md).

A fake OTLP/HTTP collector on 127.0.0.1 decodes the ExportTraceServiceRequest protobufs the
gateway posts; a real gateway in front of the fake upstreams serves the OpenAI (and
Anthropic) SDKs. Each test reads the span tree one request produced.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web
from mcp.server.mcpserver import Context, MCPServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from gateway import trace_export
from gateway.telemetry import SPANS
from tests.conftest import FULL_CHAIN, base_config
from tests.fakes import Fault, free_port

SERVER, CLIENT = 2, 3  # Span.SpanKind values of the OTLP protobuf


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class FakeCollector:
    """An OTLP/HTTP trace receiver: POST /v1/traces, protobuf in, spans kept as dicts.
    `delay` makes every export wait that long before its answer (a slow collector)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.spans: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.posts = 0
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> "FakeCollector":
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _traces(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append({
                        "name": span.name, "kind": span.kind, "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                        "events": [{"name": e.name, "attributes": {a.key: _value(a.value) for a in e.attributes}}
                                   for e in span.events],
                        "status": span.status.code, "resource": resource,
                        "start": span.start_time_unix_nano, "end": span.end_time_unix_nano})
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def trace_of(self, request_id: str, clients: int = 1, timeout: float = 10.0) -> tuple[dict, list[dict]]:
        """The server span of the request with that id and its client spans (at least
        `clients` of them), in start order."""
        deadline = time.monotonic() + timeout
        while True:
            servers = [s for s in self.spans if s["attributes"].get("gateway.request_id") == request_id]
            if servers:
                server = servers[0]
                children = sorted((s for s in self.spans if s["parent"] == server["span_id"]), key=lambda s: s["start"])
                if len(children) >= clients:
                    return server, children
            if time.monotonic() > deadline:
                raise AssertionError(f"no complete trace for {request_id} ({len(self.spans)} spans received)")
            time.sleep(0.02)


@pytest.fixture
def collector(server_thread):
    fake = server_thread.run(FakeCollector().start())
    yield fake
    server_thread.run(fake.stop())


def telemetry(collector: FakeCollector | str, **settings: Any) -> dict[str, Any]:
    url = collector if isinstance(collector, str) else collector.url
    return {"otlp_endpoint": url, "export_interval": 0.05, "export_timeout": 2, **settings}


def chat(gw, key: str = "no-key", model: str = "gpt-4o-mini", **kw: Any) -> Any:
    return gw.client(key).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hello, secret-prompt-words"}], **kw)


def request_id_of(raw: Any) -> str:
    return raw.headers["x-request-id"]


def traceparent_of(recorded: Any) -> tuple[str, str, bool]:
    """(trace id, parent span id, sampled) of the traceparent an upstream received."""
    version, trace_id, span_id, flags = recorded.headers["traceparent"].split("-")
    assert version == "00"
    return trace_id, span_id, bool(int(flags, 16) & 1)


async def start_app(path: Any) -> tuple[web.AppRunner, web.Application, str]:
    """The gateway of the config file at `path`, as `proxy.py serve` builds it (reloadable)."""
    import proxy

    app = proxy.create_app(proxy.check_config(path), config_path=str(path))
    runner = web.AppRunner(app, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, app, f"http://127.0.0.1:{runner.addresses[0][1]}"


def events(span: dict) -> list[str]:
    return [e["name"] for e in span["events"]]


def assert_tree(server: dict, clients: list[dict], name: str, client_names: list[str]) -> None:
    """One SERVER span named `name` (a root) and its CLIENT
    children, in start order, named `client_names`, all in one trace."""
    assert server["kind"] == SERVER and server["name"] == name
    assert server["parent"] == ""  # a root: these clients send no traceparent
    assert [c["name"] for c in clients] == client_names
    for client in clients:
        assert client["kind"] == CLIENT and client["parent"] == server["span_id"]
        assert client["trace_id"] == server["trace_id"] and server["start"] <= client["start"]
        assert client["end"] <= server["end"]


# --------------------------------------------------------------------------------------
# The span tree
# --------------------------------------------------------------------------------------


def test_a_plain_call_is_one_server_span_with_one_client_span(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector, service_name="gw-test"))
    user_id, key = gw.make_user(energy=100)
    raw = chat(gw, key, max_tokens=50, temperature=0.5, extra_headers={"X-Action": "ai_message"})
    assert raw.parse().choices[0].message.content == "Hello from fake upstream"
    server, clients = collector.trace_of(request_id_of(raw))

    assert server["kind"] == SERVER and server["name"] == "chat gpt-4o-mini"
    assert server["resource"]["service.name"] == "gw-test"
    a = server["attributes"]
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == "gpt-4o-mini"
    assert a["gen_ai.request.max_tokens"] == 50 and a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.request.stream"] is False
    assert a["gen_ai.response.id"] == raw.parse().id
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.usage.input_tokens"] == 11 and a["gen_ai.usage.output_tokens"] == 7
    assert a["http.response.status_code"] == 200 and "error.type" not in a
    assert a["gateway.user"] == user_id and a["gateway.workspace"]
    assert a["gateway.action"] == "ai_message" and a["gateway.energy"] == 2
    assert a["gateway.cost_usd"] > 0 and a["gateway.cache_hit"] is False and a["gateway.attempts"] == 1
    assert "gen_ai.system" not in a  # the deprecated name
    # The plugins' request hooks that ran, in chain order, and how long each took.
    hooks = [p.name for p in gw.state.chain.plugins if p.overrides("on_request")]
    assert a["gateway.plugin.names"] == hooks and {"auth", "energy"} <= set(hooks)
    durations = a["gateway.plugin.durations_ms"]
    assert len(durations) == len(hooks) and all(isinstance(d, float) and d >= 0 for d in durations)
    assert "gateway.plugin.failed" not in a and server["events"] == []

    (client,) = clients
    assert client["kind"] == CLIENT and client["name"] == "chat gpt-4o-mini"
    assert client["trace_id"] == server["trace_id"]
    c = client["attributes"]
    assert c["gen_ai.provider.name"] == "openai" and c["gen_ai.request.model"] == "gpt-4o-mini"
    assert c["server.address"] == "127.0.0.1" and c["server.port"] == upstream.port
    assert c["gen_ai.usage.input_tokens"] == 11 and c["gen_ai.response.finish_reasons"] == ["stop"]
    # The upstream call carried the client span's own traceparent.
    assert traceparent_of(upstream.last) == (client["trace_id"], client["span_id"], True)


def test_an_overlapped_reservation_says_its_outcome(gateway_factory, collector, upstream):
    """The energy plugin overlaps the reservation with the upstream call once it knows the
    user's balance (the second request): the gate's outcome is on the server span."""
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user(energy=100)
    first, second = chat(gw, key), chat(gw, key)
    server, _ = collector.trace_of(request_id_of(first))
    assert "gateway.gate" not in server["attributes"]
    server, _ = collector.trace_of(request_id_of(second))
    assert server["attributes"]["gateway.gate"] == "passed"


def test_a_stream_ends_its_spans_when_the_stream_is_relayed(gateway_factory, collector, upstream):
    upstream.chunks = 4
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    with gw.client(key).chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True) as response:
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
        request_id = response.headers["x-request-id"]
    assert text == "Hello from fake upstream"
    server, (client,) = collector.trace_of(request_id)
    assert_tree(server, [client], "chat gpt-4o-mini", ["chat gpt-4o-mini"])
    a = server["attributes"]
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.usage.output_tokens"] == 7 and a["gen_ai.response.id"].startswith("chatcmpl")
    assert client["attributes"]["gen_ai.usage.output_tokens"] == 7
    assert client["end"] <= server["end"] and client["end"] - client["start"] > 0


def test_messages_count_cached_tokens_in_the_input_tokens(gateway_factory, collector, upstream):
    """Anthropic's input_tokens leaves the cache reads and writes out; the convention's
    gen_ai.usage.input_tokens holds them all."""
    upstream.prompt_tokens, upstream.cached_tokens, upstream.cache_write_tokens = 10, 30, 5
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    sdk = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=20)
    raw = sdk.messages.with_raw_response.create(model="claude", max_tokens=64,
                                                messages=[{"role": "user", "content": "hi"}])
    server, (client,) = collector.trace_of(raw.headers["x-request-id"])
    assert_tree(server, [client], "chat claude", ["chat claude-haiku-4-5"])
    a = server["attributes"]
    assert server["name"] == "chat claude" and a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.usage.input_tokens"] == 45
    assert a["gen_ai.usage.cache_read.input_tokens"] == 30
    assert a["gen_ai.usage.cache_creation.input_tokens"] == 5
    assert a["gen_ai.usage.output_tokens"] == 7
    assert client["attributes"]["gen_ai.provider.name"] == "anthropic"
    assert upstream.last.headers["traceparent"].split("-")[2] == client["span_id"]


def test_responses_are_traced_like_chat(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    raw = gw.client(key).responses.with_raw_response.create(model="gpt-4o-mini", input="hi")
    server, (client,) = collector.trace_of(raw.headers["x-request-id"])
    assert_tree(server, [client], "chat gpt-4o-mini", ["chat gpt-4o-mini"])
    assert server["attributes"]["gateway.endpoint"] == "responses"
    assert server["attributes"]["gen_ai.usage.input_tokens"] > 0
    assert client["kind"] == CLIENT and upstream.last.path.endswith("/responses")
    assert "traceparent" in upstream.last.headers


def test_a_retry_then_a_fallback_are_three_client_spans(gateway_factory, collector, upstream):
    models = base_config(upstream, store_url="sqlite:///unused")["models"]
    models[0]["fallbacks"] = ["gpt-4o-mini"]
    gw = gateway_factory(models=models, telemetry=telemetry(collector),
                         retries={"max_attempts": 2, "backoff_base": 0.01, "backoff_max": 0.02})
    _, key = gw.make_user(tier="pro")
    upstream.push(Fault.status(500), Fault.status(503))
    raw = chat(gw, key, model="gpt-4o")
    server, clients = collector.trace_of(request_id_of(raw), clients=3)
    assert_tree(server, clients, "chat gpt-4o", ["chat gpt-4o", "chat gpt-4o", "chat gpt-4o-mini"])
    assert [c["attributes"]["gateway.model"] for c in clients] == ["gpt-4o", "gpt-4o", "gpt-4o-mini"]
    assert [c["attributes"].get("error.type") for c in clients] == ["500", "503", None]
    assert [c["status"] for c in clients] == [2, 2, 0]  # STATUS_CODE_ERROR, ERROR, UNSET
    assert [c["attributes"]["gateway.attempt"] for c in clients] == [1, 2, 3]
    a = server["attributes"]
    assert a["gateway.attempts"] == 3 and a["gateway.fallbacks"] == 1
    assert a["gen_ai.request.model"] == "gpt-4o" and a["gen_ai.response.model"] == "gpt-4o-mini"
    # Each attempt sent its own span as the parent.
    sent = [r.headers["traceparent"].split("-")[2] for r in upstream.requests[-3:]]
    assert sent == [c["span_id"] for c in clients]


def test_a_downgrade_is_on_the_server_span(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user(tier="free")
    raw = chat(gw, key, model="gpt-4o")
    assert raw.headers["x-model-downgraded-from"] == "gpt-4o"
    server, (client,) = collector.trace_of(request_id_of(raw))
    assert_tree(server, [client], "chat gpt-4o", ["chat gpt-4o-mini"])  # named as asked, served by the cheaper
    a = server["attributes"]
    assert a["gateway.downgraded_from"] == "gpt-4o" and a["gen_ai.response.model"] == "gpt-4o-mini"
    assert "gateway.downgrade" in events(server)
    assert client["attributes"]["gateway.model"] == "gpt-4o-mini"


def test_insufficient_energy_is_a_server_span_without_a_client_span(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user(energy=0)
    with pytest.raises(Exception) as excinfo:
        chat(gw, key)
    assert excinfo.value.status_code == 429
    request_id = excinfo.value.response.headers["x-request-id"]
    server, clients = collector.trace_of(request_id, clients=0)
    assert_tree(server, [], "chat gpt-4o-mini", [])
    time.sleep(0.2)  # a client span, had there been one, would have been exported with it
    assert [s for s in collector.spans if s["parent"] == server["span_id"]] == []
    a = server["attributes"]
    assert a["http.response.status_code"] == 429 and a["error.type"] == "insufficient_energy"
    assert a["gateway.energy"] == 0
    assert a["gateway.plugin.names"][-1] == a["gateway.plugin.failed"] == "energy"
    assert a["gateway.plugin.error_type"] == "insufficient_energy"
    assert upstream.count() == 0


def test_a_cache_hit_has_no_client_span(gateway_factory, collector, upstream):
    plugins = ["auth", "tier_policy", {"name": "cache", "settings": {"models": ["gpt-4o-mini"]}}, "energy"]
    gw = gateway_factory(plugins=plugins, telemetry=telemetry(collector))
    _, key = gw.make_user()
    first = chat(gw, key, temperature=0)
    second = chat(gw, key, temperature=0)
    assert second.headers["x-cache"] == "HIT"
    _, (miss_client,) = collector.trace_of(request_id_of(first))
    server, _ = collector.trace_of(request_id_of(second), clients=0)
    assert_tree(server, [], "chat gpt-4o-mini", [])
    time.sleep(0.2)
    assert [s for s in collector.spans if s["parent"] == server["span_id"]] == []
    assert server["attributes"]["gateway.cache_hit"] is True
    assert "cache" in server["attributes"]["gateway.plugin.names"] and "gateway.cache" in events(server)
    assert upstream.count() == 1


def test_a_client_disconnect_ends_the_spans(gateway_factory, collector, upstream, server_thread):
    upstream.chunks, upstream.chunk_delay = 20, 0.05
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()

    with httpx.Client(timeout=10) as http:
        with http.stream("POST", gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "gpt-4o-mini", "stream": True,
                               "messages": [{"role": "user", "content": "hi"}]}) as response:
            request_id = response.headers["x-request-id"]
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break  # the client leaves after the first chunk
    server, (client,) = collector.trace_of(request_id)
    assert_tree(server, [client], "chat gpt-4o-mini", ["chat gpt-4o-mini"])
    assert server["attributes"]["gateway.client_disconnected"] is True
    assert client["end"] > 0 and client["parent"] == server["span_id"] and client["kind"] == CLIENT
    assert client["status"] == 0 and server["status"] == 0  # the client left: no error of the gateway's


def test_a_client_traceparent_is_continued(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector, sample_ratio=0.0, client_sampling="honor"))
    _, key = gw.make_user()
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    raw = chat(gw, key, extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    server, (client,) = collector.trace_of(request_id_of(raw))
    # client_sampling: honor: sampled by its parent, whatever the ratio says (ParentBased).
    assert server["trace_id"] == trace_id and server["parent"] == parent
    assert client["trace_id"] == trace_id
    assert upstream.last.headers["traceparent"].startswith(f"00-{trace_id}-")


def test_the_litellm_path_sends_the_traceparent_too(gateway_factory, collector, upstream):
    models = base_config(upstream, store_url="sqlite:///unused")["models"]
    models[1]["dispatch"] = "litellm"
    gw = gateway_factory(models=models, telemetry=telemetry(collector))
    _, key = gw.make_user()
    raw = chat(gw, key)
    _, (client,) = collector.trace_of(request_id_of(raw))
    assert traceparent_of(upstream.last) == (client["trace_id"], client["span_id"], True)


def test_sample_ratio_zero_exports_nothing_and_sends_an_unsampled_traceparent(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector, sample_ratio=0.0))
    _, key = gw.make_user()
    chat(gw, key)
    time.sleep(0.3)
    assert collector.spans == []
    assert traceparent_of(upstream.last)[2] is False


# --------------------------------------------------------------------------------------
# Off the request path, and nothing secret
# --------------------------------------------------------------------------------------


def test_without_an_endpoint_nothing_is_traced(gateway_factory, upstream):
    gw = gateway_factory()
    assert gw.state.snapshot.telemetry is None
    _, key = gw.make_user()
    chat(gw, key)
    assert "traceparent" not in upstream.last.headers


def test_a_dead_collector_changes_nothing_for_the_client(gateway_factory, upstream):
    before = SPANS["export_failed"]
    gw = gateway_factory(telemetry=telemetry(f"http://127.0.0.1:{free_port()}", export_timeout=0.5))
    _, key = gw.make_user()
    started = time.monotonic()
    for _ in range(5):
        assert chat(gw, key).parse().choices[0].message.content == "Hello from fake upstream"
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 10
    while SPANS["export_failed"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert SPANS["export_failed"] > before


def test_a_slow_collector_drops_spans_and_counts_them(gateway_factory, server_thread, upstream):
    slow = server_thread.run(FakeCollector(delay=3.0).start())
    try:
        before = SPANS["queue_full"]
        gw = gateway_factory(plugins=["metrics", *FULL_CHAIN],
                             telemetry=telemetry(slow, queue_size=4, batch_size=2, export_timeout=5))
        _, key = gw.make_user()
        timings = []
        for _ in range(10):
            started = time.monotonic()
            assert chat(gw, key).parse().choices[0].message.content
            timings.append(time.monotonic() - started)
        assert max(timings) < 1.0  # never waits for the collector
        assert SPANS["queue_full"] > before
        scrape = urllib.request.urlopen(gw.url + "/metrics", timeout=5).read().decode()
        assert 'gateway_trace_spans_dropped_total{reason="queue_full"}' in scrape
    finally:
        server_thread.run(slow.stop())


def _exporter_of(gw) -> Any:
    """The traced gateway's exporter process (gateway/trace_export.py), once started."""
    child = gw.state.snapshot.telemetry.pipe.child
    assert child is not None
    return child.proc


def test_spans_are_exported_by_a_process_of_their_own(gateway_factory, collector, upstream):
    """Encoding and posting run in the exporter process, not in the gateway's: the
    collector's posts come from it, and a SIGTERM meant for the gateway's process group
    does not end it (it leaves when the gateway closes its pipe)."""
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    collector.trace_of(request_id_of(chat(gw, key)))
    exporter = _exporter_of(gw)
    assert exporter.pid != os.getpid() and exporter.poll() is None
    os.kill(exporter.pid, signal.SIGTERM)  # ignored
    server, (client,) = collector.trace_of(request_id_of(chat(gw, key)))
    assert _exporter_of(gw).pid == exporter.pid and exporter.poll() is None
    assert server["resource"]["service.name"] == "ai-gateway" and client["kind"] == CLIENT


def test_a_killed_exporter_process_drops_what_it_held_and_is_restarted(gateway_factory, collector, upstream,
                                                                       monkeypatch):
    """The exporter process dies holding two spans (one request's: the export interval is an
    hour, a batch is four spans): they are counted as export_failed, the requests go on
    unharmed, and the next spans start a new exporter that exports them."""
    monkeypatch.setattr(trace_export, "RESTART_EVERY", 0.0)
    gw = gateway_factory(plugins=["metrics", *FULL_CHAIN],
                         telemetry=telemetry(collector, export_interval="1h", batch_size=4))
    _, key = gw.make_user()
    held = chat(gw, key)
    deadline = time.monotonic() + 10
    while gw.state.snapshot.telemetry.pipe.child is None and time.monotonic() < deadline:
        time.sleep(0.02)
    exporter = _exporter_of(gw)
    time.sleep(0.5)  # the pipe's 50 ms flush: the child holds the two spans
    failed_before = SPANS["export_failed"]
    exporter.kill()
    exporter.wait()

    first, second = chat(gw, key), chat(gw, key)  # four spans: a full batch for the new exporter
    assert first.parse().choices[0].message.content == second.parse().choices[0].message.content
    collector.trace_of(request_id_of(first))
    collector.trace_of(request_id_of(second))
    assert _exporter_of(gw).pid != exporter.pid
    deadline = time.monotonic() + 10
    while SPANS["export_failed"] - failed_before < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert SPANS["export_failed"] - failed_before == 2
    assert not [s for s in collector.spans if s["attributes"].get("gateway.request_id") == request_id_of(held)]
    scrape = urllib.request.urlopen(gw.url + "/metrics", timeout=5).read().decode()
    assert 'gateway_trace_spans_dropped_total{reason="export_failed"}' in scrape
    # The collector has the spans before the exporter's counts reach the gateway (its reader thread).
    pipe = gw.state.snapshot.telemetry.pipe
    deadline = time.monotonic() + 10
    while pipe.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pipe.in_flight == 0


def test_no_key_and_no_prompt_in_any_span(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector, headers={"Authorization": "Bearer otlp-secret-token"}))
    _, key = gw.make_user()
    raw = chat(gw, key)
    collector.trace_of(request_id_of(raw))
    dump = repr(collector.spans)
    for secret in (key, "sk-upstream-openai-SECRET", "otlp-secret-token", "secret-prompt-words",
                   "Hello from fake upstream"):
        assert secret not in dump
    # The exporter's own headers reached the collector (and only the collector).
    assert collector.headers[0]["authorization"] == "Bearer otlp-secret-token"
    from gateway.config import redacted_config
    assert redacted_config(gw.state.config)["telemetry"]["headers"] == {"Authorization": "***"}


def test_capture_content_puts_the_conversation_in_the_span(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector, capture_content=True))
    _, key = gw.make_user()
    raw = chat(gw, key)
    server, _ = collector.trace_of(request_id_of(raw))
    assert "secret-prompt-words" in server["attributes"]["gen_ai.input.messages"]
    assert "Hello from fake upstream" in server["attributes"]["gen_ai.output.messages"]
    assert key not in repr(collector.spans)


def test_the_telemetry_section_is_validated():
    from gateway.config import ConfigError, load_config_data

    config = {"models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}],
              "telemetry": {"otlp_endpoint": "grpc://collector:4317", "sample_ratio": 2}}
    with pytest.raises(ConfigError) as excinfo:
        load_config_data(config)
    text = "\n".join(excinfo.value.errors)
    assert "telemetry.otlp_endpoint" in text and "telemetry.sample_ratio" in text


def test_a_reload_turns_tracing_on_and_the_stop_flushes_what_is_queued(server_thread, upstream, store_url,
                                                                        tmp_path, collector):
    """telemetry is reloaded with the config; spans still queued at stop are exported then
    (an export interval longer than the test: only the flush at stop can send them)."""
    import yaml

    import proxy

    data = base_config(upstream, store_url=store_url, plugins=[])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))

    runner, app, url = server_thread.run(start_app(path))
    try:
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert "traceparent" not in upstream.last.headers

        data["telemetry"] = telemetry(collector, export_interval="1h")
        path.write_text(yaml.safe_dump(data))
        assert server_thread.run(proxy.reload_config(app, reason="test")) is True
        raw = sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini",
                                                            messages=[{"role": "user", "content": "hi"}])
        assert "traceparent" in upstream.last.headers
        time.sleep(0.3)
        assert collector.spans == []  # queued, the next export is an hour away
        exporter = app[proxy.GATEWAY].snapshot.telemetry.pipe.child.proc
    finally:
        server_thread.run(runner.cleanup(), timeout=30)
    server, (client,) = collector.trace_of(request_id_of(raw), timeout=2)
    assert client["kind"] == CLIENT
    assert exporter.poll() == 0  # the exporter process left with the gateway


# --------------------------------------------------------------------------------------
# Every API and path: embeddings, the native Anthropic path, token classes, tools
# --------------------------------------------------------------------------------------


def children_of(collector: FakeCollector, server: dict) -> list[dict]:
    return [s for s in collector.spans if s["parent"] == server["span_id"]]


def test_embeddings_are_an_embeddings_span_tree(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    raw = gw.client(key).embeddings.with_raw_response.create(model="embed", input="hello")
    server, (client,) = collector.trace_of(raw.headers["x-request-id"])
    assert server["kind"] == SERVER and server["name"] == "embeddings embed" and server["parent"] == ""
    a = server["attributes"]
    assert a["gen_ai.operation.name"] == "embeddings" and a["gen_ai.request.model"] == "embed"
    assert a["gen_ai.provider.name"] == "openai" and a["gen_ai.usage.input_tokens"] > 0
    assert client["kind"] == CLIENT and client["name"] == "embeddings text-embedding-3-small"
    assert client["parent"] == server["span_id"] and client["trace_id"] == server["trace_id"]
    assert client["attributes"]["gen_ai.operation.name"] == "embeddings"
    assert upstream.last.path.endswith("/embeddings")
    assert traceparent_of(upstream.last) == (client["trace_id"], client["span_id"], True)


def test_the_native_anthropic_path_counts_cache_tokens_and_sends_the_traceparent(gateway_factory, collector,
                                                                                  upstream):
    """A Claude model through /v1/chat/completions on the native path (not litellm): the
    upstream gets the client span's traceparent; input tokens hold the cache reads and writes."""
    upstream.prompt_tokens, upstream.cached_tokens, upstream.cache_write_tokens = 10, 30, 5
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    raw = chat(gw, key, model="claude")
    assert upstream.last.path.endswith("/v1/messages")  # Anthropic's own API: the native path
    server, (client,) = collector.trace_of(request_id_of(raw))
    assert server["name"] == "chat claude" and client["name"] == "chat claude-haiku-4-5"
    for span in (server, client):
        a = span["attributes"]
        assert a["gen_ai.provider.name"] == "anthropic"
        assert a["gen_ai.usage.input_tokens"] == 45, span["kind"]
        assert a["gen_ai.usage.output_tokens"] == 7
    a = server["attributes"]
    assert a["gen_ai.usage.cache_read.input_tokens"] == 30 and a["gen_ai.usage.cache_creation.input_tokens"] == 5
    assert traceparent_of(upstream.last) == (client["trace_id"], client["span_id"], True)


def test_a_native_anthropic_stream_counts_cache_tokens_too(gateway_factory, collector, upstream):
    upstream.prompt_tokens, upstream.cached_tokens, upstream.cache_write_tokens = 10, 30, 5
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    with gw.client(key).chat.completions.with_streaming_response.create(
            model="claude", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True}) as response:
        list(response.parse())
        request_id = response.headers["x-request-id"]
    server, (client,) = collector.trace_of(request_id)
    assert server["attributes"]["gen_ai.usage.input_tokens"] == 45
    assert client["attributes"]["gen_ai.usage.input_tokens"] == 45
    assert traceparent_of(upstream.last)[1] == client["span_id"]


def test_reasoning_tokens_are_their_own_attribute(gateway_factory, collector, upstream):
    upstream.reasoning_tokens = 3
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    raw = chat(gw, key)
    server, _ = collector.trace_of(request_id_of(raw))
    assert server["attributes"]["gen_ai.usage.reasoning.output_tokens"] == 3


def test_a_messages_stream_is_a_tree_too(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    sdk = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=20)
    with sdk.messages.with_streaming_response.create(model="claude", max_tokens=64, stream=True,
                                                     messages=[{"role": "user", "content": "hi"}]) as response:
        for _ in response.iter_lines():
            pass
        request_id = response.headers["x-request-id"]
    server, (client,) = collector.trace_of(request_id)
    assert server["name"] == "chat claude" and server["attributes"]["gen_ai.request.stream"] is True
    assert server["attributes"]["gateway.endpoint"] == "messages"
    assert client["parent"] == server["span_id"] and client["kind"] == CLIENT
    assert server["attributes"]["gen_ai.usage.output_tokens"] == 7
    assert traceparent_of(upstream.last)[1] == client["span_id"]


# --------------------------------------------------------------------------------------
# Statuses: 5xx is an error of the gateway, a client's 4xx is not (HTTP server semconv)
# --------------------------------------------------------------------------------------

STATUS_UNSET, STATUS_ERROR = 0, 2


def test_an_upstream_5xx_is_an_error_on_both_spans(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector), retries={"max_attempts": 1})
    _, key = gw.make_user()
    upstream.push(Fault.status(500))
    with pytest.raises(openai.APIStatusError) as excinfo:
        chat(gw, key)
    assert excinfo.value.status_code >= 500
    server, (client,) = collector.trace_of(excinfo.value.response.headers["x-request-id"])
    assert client["status"] == STATUS_ERROR and client["attributes"]["error.type"] == "500"
    assert client["attributes"]["http.response.status_code"] == 500
    assert server["status"] == STATUS_ERROR
    assert server["attributes"]["http.response.status_code"] == excinfo.value.status_code
    assert server["attributes"]["error.type"]


def test_a_bad_request_is_a_server_span_with_error_type_and_status_unset(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    with pytest.raises(openai.BadRequestError) as excinfo:
        chat(gw, key, temperature="hot")
    server, clients = collector.trace_of(excinfo.value.response.headers["x-request-id"], clients=0)
    assert clients == [] and server["kind"] == SERVER
    assert server["status"] == STATUS_UNSET  # a 4xx of a server span is the client's error
    assert server["attributes"]["http.response.status_code"] == 400 and server["attributes"]["error.type"]
    assert upstream.count() == 0


def test_an_unknown_model_name_chosen_by_the_client_is_bounded(gateway_factory, collector, upstream):
    """The span name is low-cardinality: a model the gateway does not serve is not put in
    it, and its attribute is cut short (a client can send 60 KB of model name)."""
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    with pytest.raises(openai.NotFoundError) as excinfo:
        chat(gw, key, model="x" * 50_000)
    server, _ = collector.trace_of(excinfo.value.response.headers["x-request-id"], clients=0)
    assert server["name"] == "chat"
    assert len(server["attributes"]["gen_ai.request.model"]) <= 256
    assert server["status"] == STATUS_UNSET and server["attributes"]["error.type"] == "model_not_found"


# --------------------------------------------------------------------------------------
# A client's trace context, seen by an attacker holding a valid key
# --------------------------------------------------------------------------------------

CLIENT_TRACE, CLIENT_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def test_by_default_a_clients_sampled_flag_does_not_force_sampling(gateway_factory, collector, upstream):
    """client_sampling: ignore (the default): the operator's sample_ratio decides, even for a
    trace id crafted to pass TraceIdRatioBased (low bits zero); the client's trace id is
    still continued upstream (unsampled)."""
    gw = gateway_factory(telemetry=telemetry(collector, sample_ratio=0.000001))
    assert gw.state.snapshot.telemetry.settings.client_sampling == "ignore"
    _, key = gw.make_user()
    crafted = "0" * 31 + "1"
    for trace_id in (CLIENT_TRACE, crafted):
        chat(gw, key, extra_headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"})
        assert traceparent_of(upstream.last)[0] == trace_id and traceparent_of(upstream.last)[2] is False
    time.sleep(0.3)
    assert collector.spans == []


def test_ignore_still_continues_the_clients_trace_when_the_gateway_samples(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector, client_sampling="ignore"))
    _, key = gw.make_user()
    raw = chat(gw, key, extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"})  # unsampled
    server, (client,) = collector.trace_of(request_id_of(raw))
    assert server["trace_id"] == CLIENT_TRACE and server["parent"] == CLIENT_SPAN
    assert traceparent_of(upstream.last) == (CLIENT_TRACE, client["span_id"], True)


def test_honor_lets_the_clients_flag_decide(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector, sample_ratio=1.0, client_sampling="honor"))
    _, key = gw.make_user()
    chat(gw, key, extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"})
    assert traceparent_of(upstream.last) == (CLIENT_TRACE, traceparent_of(upstream.last)[1], False)
    time.sleep(0.3)
    assert collector.spans == []


def test_malformed_trace_context_is_dropped_never_forwarded_raw(gateway_factory, collector, upstream, caplog):
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    good = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    cases = [
        ({"traceparent": "00-" + "z" * 32 + "-" + CLIENT_SPAN + "-01"}, None, None),
        ({"traceparent": "x" * 4000}, None, None),
        ({"traceparent": f"00-{'0' * 32}-{CLIENT_SPAN}-01"}, None, None),
        ({"traceparent": good + "-extra"}, None, None),  # version 00 has no more fields
        ({"traceparent": good, "tracestate": ",".join(f"k{i}=v" for i in range(33))}, CLIENT_TRACE, None),
        ({"traceparent": good, "tracestate": "a=" + "x" * 600}, CLIENT_TRACE, None),
        ({"traceparent": good, "tracestate": "a=b, bad member!, c=d"}, CLIENT_TRACE, None),
        ({"traceparent": good, "tracestate": "vendor=ok ,  other=1"}, CLIENT_TRACE, "vendor=ok,other=1"),
        ({"traceparent": good, "tracestate": ",".join(f"k{i}=v" for i in range(32))}, CLIENT_TRACE,
         ",".join(f"k{i}=v" for i in range(32))),
    ]
    for headers, trace_id, state in cases:
        raw = chat(gw, key, extra_headers=headers)
        assert raw.parse().choices[0].message.content == "Hello from fake upstream"
        sent = upstream.last.headers
        sent_trace = traceparent_of(upstream.last)[0]
        assert sent_trace == trace_id if trace_id else sent_trace != CLIENT_TRACE, headers
        assert sent.get("tracestate") == state, headers
        if state is not None:
            assert len(state) <= 512 and state.count(",") < 32
    assert "bad member" not in caplog.text and "x" * 100 not in caplog.text


# --------------------------------------------------------------------------------------
# capture_content: the conversation on every API, never a key
# --------------------------------------------------------------------------------------


def test_content_is_not_captured_by_default_on_any_api(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    raw = gw.client(key).responses.with_raw_response.create(model="gpt-4o-mini", input="secret-prompt-words")
    server, _ = collector.trace_of(raw.headers["x-request-id"])
    assert "gen_ai.input.messages" not in server["attributes"] and "secret-prompt-words" not in repr(collector.spans)


def test_capture_content_on_a_stream_messages_and_responses(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector, capture_content=True))
    _, key = gw.make_user()
    with gw.client(key).chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "stream secret-prompt-words"}],
            stream=True) as response:
        list(response.parse())
        stream_id = response.headers["x-request-id"]
    sdk = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=20)
    messages = sdk.messages.with_raw_response.create(
        model="claude", max_tokens=64, messages=[{"role": "user", "content": "messages secret-prompt-words"}])
    responses = gw.client(key).responses.with_raw_response.create(model="gpt-4o-mini",
                                                                  input="responses secret-prompt-words",
                                                                  instructions="be brief, secret-instructions")
    for request_id, said in ((stream_id, "stream"), (messages.headers["x-request-id"], "messages"),
                             (responses.headers["x-request-id"], "responses")):
        server, _ = collector.trace_of(request_id)
        a = server["attributes"]
        assert f"{said} secret-prompt-words" in a["gen_ai.input.messages"], said
        assert "Hello from fake upstream" in a["gen_ai.output.messages"], said
    assert "secret-instructions" in a["gen_ai.system_instructions"]  # the Responses request's
    assert key not in repr(collector.spans)


def test_capture_content_never_records_a_key(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector, capture_content=True,
                                             headers={"Authorization": "Bearer otlp-secret-token"}))
    _, key = gw.make_user()
    raw = chat(gw, key, extra_headers={"X-Api-Key": key, "Cookie": f"session={key}"})
    collector.trace_of(request_id_of(raw))
    with pytest.raises(openai.BadRequestError) as excinfo:  # a key in the body is refused, and not traced
        chat(gw, key, extra_body={"api_key": key})
    collector.trace_of(excinfo.value.response.headers["x-request-id"], clients=0)
    dump = repr(collector.spans)
    for secret in (key, "sk-upstream-openai-SECRET", "otlp-secret-token"):
        assert secret not in dump


# --------------------------------------------------------------------------------------
# MCP tool calls
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traced_mcp():
    from tests.test_mcp import UPSTREAM_SECRET, FakeMcp

    server = MCPServer("search")

    @server.tool()
    def web(query: str, ctx: Context) -> str:
        """Search the web; says the trace context its call carried in params._meta."""
        meta = ctx.request_context.meta or {}
        return f"results for {query}; traceparent={meta.get('traceparent')}"

    @server.tool()
    def fail() -> str:
        """Always fails."""
        raise ValueError("boom")

    fake = FakeMcp(server, required_auth=UPSTREAM_SECRET)
    yield fake
    fake.stop()


def test_an_mcp_tool_call_is_an_execute_tool_span_tree(gateway_factory, collector, upstream, store_url,
                                                      traced_mcp, monkeypatch):
    from tests.test_mcp import UPSTREAM_SECRET, call, text_of

    monkeypatch.setenv("SEARCH_MCP_TOKEN", f"Bearer {UPSTREAM_SECRET}")
    raw = base_config(upstream, store_url=store_url, plugins=FULL_CHAIN,
                      telemetry=telemetry(collector, capture_content=True),
                      tiers={"free": {"models": ["demo"]}, "pro": {"models": ["*"], "mcp_tools": ["*"]}},
                      mcp_servers=[{"name": "search", "url": traced_mcp.url, "energy": 2,
                                    "headers": {"Authorization": "os.environ/SEARCH_MCP_TOKEN"}}])
    gw = gateway_factory(raw=raw)
    _, key = gw.make_user(tier="pro")

    async def work(client):
        return await client.call_tool("search__web", {"query": "otel"}), await client.call_tool("search__fail", {})

    ok, failed = call(gw, key, work)
    assert text_of(ok).startswith("results for otel") and failed.is_error
    deadline = time.monotonic() + 10
    while len([s for s in collector.spans if s["kind"] == SERVER]) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    servers = sorted((s for s in collector.spans if s["kind"] == SERVER), key=lambda s: s["start"])
    assert [s["name"] for s in servers] == ["execute_tool search__web", "execute_tool search__fail"]
    server, failed_server = servers
    a = server["attributes"]
    assert a["gen_ai.operation.name"] == "execute_tool" and a["gen_ai.tool.name"] == "search__web"
    assert a["mcp.method.name"] == "tools/call" and a["gateway.mcp_server"] == "search"
    assert a["gateway.energy"] == 2 and a["http.response.status_code"] == 200
    assert "gen_ai.request.model" not in a and "gen_ai.provider.name" not in a
    from gateway.telemetry import TOOL_ENDPOINT
    from plugins.base import TOOL_ENDPOINTS
    assert TOOL_ENDPOINTS == {TOOL_ENDPOINT}  # the one tool endpoint, as telemetry names it
    assert a["gen_ai.tool.call.arguments"] == '{"query":"otel"}'  # capture_content: true
    (client,) = collector.trace_of(a["gateway.request_id"])[1]
    assert client["kind"] == CLIENT and client["name"] == "execute_tool web" and client["status"] == STATUS_UNSET
    assert client["attributes"]["server.port"] == traced_mcp.port
    # The upstream's params._meta carried the client span's traceparent (the MCP convention).
    assert f"traceparent=00-{client['trace_id']}-{client['span_id']}-01" in text_of(ok)
    (failed_client,) = collector.trace_of(failed_server["attributes"]["gateway.request_id"])[1]
    assert failed_client["status"] == STATUS_ERROR and failed_client["attributes"]["error.type"] == "tool_error"
    assert failed_server["status"] == STATUS_ERROR and failed_server["attributes"]["gateway.energy"] == 0
    assert key not in repr(collector.spans) and UPSTREAM_SECRET not in repr(collector.spans)

    # An agent's trace context in params._meta (how the MCP SDK sends it) is continued.
    async def traced(client):
        return await client.call_tool("search__web", {"query": "agent"},
                                      meta={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})

    assert text_of(call(gw, key, traced)).startswith(f"results for agent; traceparent=00-{CLIENT_TRACE}-")
    deadline = time.monotonic() + 10
    while not [s for s in collector.spans if s["trace_id"] == CLIENT_TRACE and s["kind"] == SERVER]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (continued,) = [s for s in collector.spans if s["trace_id"] == CLIENT_TRACE and s["kind"] == SERVER]
    assert continued["parent"] == CLIENT_SPAN and continued["name"] == "execute_tool search__web"


# --------------------------------------------------------------------------------------
# Reloaded with the config; headers from the environment
# --------------------------------------------------------------------------------------


def test_a_reload_moves_endpoint_headers_and_ratio_and_flushes_the_old_exporter(
        server_thread, upstream, store_url, tmp_path, collector, monkeypatch, capfd, caplog):
    """A reload that changes telemetry: the new endpoint, headers (os.environ/, a Langfuse
    Basic auth) and sample ratio apply to the next request; the replaced exporter exports
    what it held (an hour-long export interval: only its flush can send it) and leaves,
    while the gateway keeps running. The header's value is in no log line and no span."""
    import base64

    import yaml

    import proxy

    secret = "Basic " + base64.b64encode(b"pk-lf-1234:sk-lf-SECRET-5678").decode()
    monkeypatch.setenv("LANGFUSE_OTLP_AUTH", secret)
    second = server_thread.run(FakeCollector().start())
    data = base_config(upstream, store_url=store_url, plugins=[],
                       telemetry=telemetry(collector, export_interval="1h"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))

    runner, app, url = server_thread.run(start_app(path))
    gw = app[proxy.GATEWAY]
    try:
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        def ask() -> str:
            return sdk.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]).headers["x-request-id"]

        held = ask()
        old = gw.snapshot.telemetry
        deadline = time.monotonic() + 10
        while old.pipe.child is None and time.monotonic() < deadline:
            time.sleep(0.02)
        old_exporter = old.pipe.child.proc
        time.sleep(0.3)
        assert collector.spans == []  # held by the old exporter: its next export is an hour away

        data["telemetry"] = telemetry(second, headers={"Authorization": "os.environ/LANGFUSE_OTLP_AUTH"})
        path.write_text(yaml.safe_dump(data))
        assert server_thread.run(proxy.reload_config(app, reason="test")) is True
        moved = ask()
        server, _ = second.trace_of(moved)
        assert second.headers[-1]["authorization"] == secret
        # The replaced tracer exported what it held and its exporter process left.
        collector.trace_of(held)
        old_exporter.wait(timeout=10)
        assert old not in gw.retired_telemetry and not [s for s in collector.spans
                                                        if s["attributes"].get("gateway.request_id") == moved]

        data["telemetry"] = telemetry(second, sample_ratio=0.0)
        path.write_text(yaml.safe_dump(data))
        assert server_thread.run(proxy.reload_config(app, reason="test")) is True
        unsampled = ask()
        assert traceparent_of(upstream.last)[2] is False
        time.sleep(0.3)
        assert not [s for s in second.spans if s["attributes"].get("gateway.request_id") == unsampled]
    finally:
        server_thread.run(runner.cleanup(), timeout=30)
        server_thread.run(second.stop())
    out, err = capfd.readouterr()
    for text in (out, err, caplog.text, repr(collector.spans), repr(second.spans)):
        assert secret not in text and "sk-lf-SECRET" not in text


def test_a_bad_telemetry_config_is_a_clear_error_at_load_without_the_secret(monkeypatch):
    from gateway.config import ConfigError, load_config_data

    monkeypatch.setenv("OTLP_AUTH", "Bearer otlp-secret\r\nX-Injected: 1")
    cases = {
        "http://collector:99999": "telemetry.otlp_endpoint",
        "http://user:otlp-secret@collector:4318": "credentials belong in telemetry.headers",
        "collector:4318": "telemetry.otlp_endpoint: expected an http:// or https:// URL",
    }
    for endpoint, said in cases.items():
        with pytest.raises(ConfigError) as excinfo:
            load_config_data({"models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}],
                              "telemetry": {"otlp_endpoint": endpoint}})
        text = "\n".join(excinfo.value.errors)
        assert said in text and "otlp-secret" not in text
    for headers, said in (({"Authorization": "os.environ/OTLP_AUTH"}, "the value of Authorization holds a control"),
                          ({"Bad Header": "x"}, "is not a valid HTTP header name"),
                          ({"Authorization": "os.environ/OTLP_UNSET_VARIABLE"},
                           "telemetry.headers.Authorization: environment variable OTLP_UNSET_VARIABLE is not set")):
        with pytest.raises(ConfigError) as excinfo:
            load_config_data({"models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}],
                              "telemetry": {"otlp_endpoint": "http://127.0.0.1:4318", "headers": headers}})
        text = "\n".join(excinfo.value.errors)
        assert said in text and "otlp-secret" not in text, text
    with pytest.raises(ConfigError) as excinfo:
        load_config_data({"models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}],
                          "telemetry": {"otlp_endpoint": "http://127.0.0.1:4318", "client_sampling": "always"}})
    assert "telemetry.client_sampling" in "\n".join(excinfo.value.errors)


def test_a_refusing_collector_is_logged_without_the_headers(gateway_factory, server_thread, upstream, caplog,
                                                            capfd):
    """The collector answers 401 (a wrong Langfuse key): spans are dropped and counted, the
    client sees nothing, the log says so without the header's value."""
    class Refusing(FakeCollector):
        async def _traces(self, request: web.Request) -> web.Response:
            self.posts += 1
            return web.Response(status=401, text="bad key")

    refusing = server_thread.run(Refusing().start())
    try:
        before = SPANS["export_failed"]
        gw = gateway_factory(telemetry=telemetry(refusing, headers={"Authorization": "Basic otlp-secret-value"}))
        _, key = gw.make_user()
        assert chat(gw, key).parse().choices[0].message.content == "Hello from fake upstream"
        deadline = time.monotonic() + 10
        while SPANS["export_failed"] == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert SPANS["export_failed"] > before and refusing.posts >= 1
    finally:
        server_thread.run(refusing.stop())
    out, err = capfd.readouterr()
    for text in (out, err, caplog.text):
        assert "otlp-secret-value" not in text


def serve(upstream: Any, tmp_path: Any, telemetry_settings: dict[str, Any], **server: Any) -> tuple[Any, str]:
    """`proxy.py serve` in a process of its own on a free port, once ready: (process, URL)."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from tests.test_shutdown import wait_ready

    port = free_port()
    data = base_config(upstream, store_url=f"sqlite:///{tmp_path}/gateway.db", plugins=[],
                       telemetry=telemetry_settings)
    data["server"] = {**data["server"], "host": "127.0.0.1", "port": port, "shutdown_grace": 5, **server}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "proxy.py", "serve", "--config", str(path)], cwd=root,
                            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def ask_once(url: str) -> str:
    """One chat completion on a connection of its own; its request id."""
    with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=20) as sdk:
        return sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]).headers["x-request-id"]


def stop(proc: Any) -> str:
    """SIGTERM; the process's output once it left."""
    try:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return output


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_to_a_real_gateway_exports_what_was_queued(upstream, collector, tmp_path, workers):
    """`proxy.py serve` in a process of its own, SIGTERM: the spans its exporter still held
    (an hour-long export interval: nothing was sent before) reach the collector, and the
    gateway and its exporter process leave. With two workers, each flushes its own."""
    proc, url = serve(upstream, tmp_path, telemetry(collector, export_interval="1h", export_timeout=5),
                      workers=workers)
    ids = [ask_once(url) for _ in range(10)]  # a connection each: with two workers, both serve some
    time.sleep(0.5)
    assert collector.spans == []  # queued in the exporter process
    output = stop(proc)
    assert proc.returncode == 0, output[-3000:]
    for request_id in ids:
        server, (client,) = collector.trace_of(request_id, timeout=2)
        assert server["kind"] == SERVER and client["kind"] == CLIENT
    assert "spans not exported" not in output


def test_sigterm_with_a_collector_that_never_answers_still_stops(upstream, server_thread, tmp_path):
    """The collector takes the export and never answers: the stop gives the exporter
    `export_timeout`, then goes on; the gateway leaves with exit 0 and says what it lost."""
    hanging = server_thread.run(FakeCollector(delay=3600).start())
    try:
        proc, url = serve(upstream, tmp_path, telemetry(hanging, export_interval="1h", export_timeout=1))
        ask_once(url)
        output = stop(proc)
    finally:
        server_thread.run(hanging.stop())
    assert proc.returncode == 0, output[-3000:]
    assert "trace flush at stop: 2 spans not exported" in output


# --------------------------------------------------------------------------------------
# Files and batches: traced as requests, never broken by tracing
# --------------------------------------------------------------------------------------

@pytest.fixture
def batch_provider(server_thread):
    from tests.fake_batches import FakeBatchProvider

    fake = server_thread.run(FakeBatchProvider().start())
    yield fake
    server_thread.run(fake.stop())


def test_files_and_batches_are_server_spans_named_by_their_endpoint(gateway_factory, batch_provider, collector):
    """A file upload and a batch create are requests like others (a server span, named by
    the endpoint: no model is called then); the lines run at the provider later, billed at
    settlement, and are not traced."""
    from tests.test_batches import chat_lines, start_batch

    models = [{"name": "gpt-4o-mini", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": batch_provider.base,
                                                         "api_key": "sk-fake-account-SECRET"}}]
    gw = gateway_factory(models=models, batches={"poll_interval": 0.05, "lease": 5},
                         energy={"actions": {"ai_message": {"default": 2}}},
                         tiers={"free": {"models": ["gpt-4o-mini"]}, "pro": {"models": ["*"]}},
                         telemetry=telemetry(collector))
    _, key = gw.make_user(energy=100)
    uploaded, batch = start_batch(gw.client(key), chat_lines(2))
    assert batch.status == "in_progress"
    deadline = time.monotonic() + 10
    while len([s for s in collector.spans if s["kind"] == SERVER]) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    servers = {s["attributes"]["gateway.endpoint"]: s for s in collector.spans if s["kind"] == SERVER}
    assert servers["files"]["name"] == "files" and servers["batches"]["name"] == "batches"
    for span in servers.values():
        assert span["attributes"]["http.response.status_code"] == 200 and span["status"] == STATUS_UNSET
        assert span["attributes"]["gateway.user"]
    assert key not in repr(collector.spans) and "sk-fake-account-SECRET" not in repr(collector.spans)


# --------------------------------------------------------------------------------------
# Every dispatch path carries the traceparent: native and litellm, stream or not
# --------------------------------------------------------------------------------------

PATHS = {
    "azure": ({"model": "azure/prod-gpt4o", "api_key": "azure-key-0123456789abcdef", "api_version": "2024-10-21"},
              "azure.ai.openai"),
    "gemini": ({"model": "gemini/gemini-2.5-flash", "api_key": "AIza-gemini-upstream-SECRET"}, "gcp.gemini"),
    "anthropic": ({"model": "anthropic/claude-haiku-4-5", "api_key": "sk-ant-upstream-SECRET"}, "anthropic"),
    "openai": ({"model": "openai/gpt-4o-mini", "api_key": "sk-upstream-openai-SECRET"}, "openai"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("dispatch", ["native", "litellm"])
@pytest.mark.parametrize("provider", list(PATHS))
def test_every_dispatch_path_sends_the_client_spans_traceparent(gateway_factory, collector, upstream, provider,
                                                                dispatch, stream):
    params, provider_name = PATHS[provider]
    models = [{"name": "m", "dispatch": dispatch, "litellm_params": {**params, "api_base": upstream.url}}]
    gw = gateway_factory(plugins=[], models=models, tiers={"free": {"models": ["*"]}},
                         energy={"actions": {"ai_message": {"default": 1}}}, telemetry=telemetry(collector))
    kind = gw.state.router.dispatcher_for(gw.config.deployments("m")[0])
    assert (kind is gw.state.router.litellm) == (dispatch == "litellm")
    client = gw.client("none")
    if stream:
        with client.chat.completions.with_streaming_response.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True) as response:
            list(response.parse())
            request_id = response.headers["x-request-id"]
    else:
        request_id = request_id_of(chat(gw, model="m"))
    server, (span,) = collector.trace_of(request_id)
    assert server["name"] == "chat m" and span["parent"] == server["span_id"]
    assert span["attributes"]["gen_ai.provider.name"] == server["attributes"]["gen_ai.provider.name"] == provider_name
    assert traceparent_of(upstream.last) == (span["trace_id"], span["span_id"], True)
    assert server["attributes"]["gen_ai.usage.output_tokens"] > 0


def test_a_stream_the_upstream_cuts_ends_its_client_span_in_error(gateway_factory, collector, upstream):
    upstream.chunks = 6
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    upstream.push(Fault.truncate(after_chunks=2))
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "gpt-4o-mini", "stream": True,
                               "messages": [{"role": "user", "content": "hi"}]}) as response:
            request_id = response.headers["x-request-id"]
            body = "".join(response.iter_text())
    assert '"error"' in body  # the stream's error event
    server, (client,) = collector.trace_of(request_id)
    assert client["status"] == STATUS_ERROR and client["attributes"]["error.type"]
    assert server["status"] == STATUS_ERROR and server["attributes"]["error.type"]


def test_captured_content_is_cut_at_64k_characters(gateway_factory, collector, upstream):
    """A client's 300 KB prompt would make its span, and the export batch holding it, too
    large for a collector: the captured attribute is cut, the span still arrives."""
    from gateway.telemetry import MAX_CONTENT_CHARS

    gw = gateway_factory(telemetry=telemetry(collector, capture_content=True),
                         server={"max_body_bytes": 1024 * 1024})
    _, key = gw.make_user()
    raw = gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "long " * 60_000}])
    server, _ = collector.trace_of(request_id_of(raw))
    captured = server["attributes"]["gen_ai.input.messages"]
    assert MAX_CONTENT_CHARS < len(captured) < MAX_CONTENT_CHARS + 100
    assert captured.endswith("more characters]") and captured.startswith('[{"role":"user","content":"long long')
    assert "Hello from fake upstream" in server["attributes"]["gen_ai.output.messages"]


def test_a_responses_stream_is_a_tree_with_its_usage(gateway_factory, collector, upstream):
    gw = gateway_factory(telemetry=telemetry(collector, capture_content=True))
    _, key = gw.make_user()
    with gw.client(key).responses.with_streaming_response.create(model="gpt-4o-mini", input="stream secret-prompt-words",
                                                                 stream=True) as response:
        for _ in response.iter_lines():
            pass
        request_id = response.headers["x-request-id"]
    server, (client,) = collector.trace_of(request_id)
    a = server["attributes"]
    assert server["name"] == "chat gpt-4o-mini" and a["gateway.endpoint"] == "responses"
    assert a["gen_ai.request.stream"] is True and a["gen_ai.usage.output_tokens"] > 0
    assert client["parent"] == server["span_id"] and client["end"] <= server["end"]
    assert "stream secret-prompt-words" in a["gen_ai.input.messages"]
    assert "Hello from fake upstream" in a["gen_ai.output.messages"]
    assert traceparent_of(upstream.last)[1] == client["span_id"]


def test_a_messages_pass_through_client_span_has_the_answers_attributes(gateway_factory, collector, upstream):
    upstream.prompt_tokens, upstream.cached_tokens, upstream.cache_write_tokens = 10, 30, 5
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    sdk = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=20)
    raw = sdk.messages.with_raw_response.create(model="claude", max_tokens=64,
                                                messages=[{"role": "user", "content": "hi"}])
    server, (client,) = collector.trace_of(raw.headers["x-request-id"])
    c = client["attributes"]
    assert c["gen_ai.usage.input_tokens"] == 45 and c["gen_ai.usage.output_tokens"] == 7
    assert c["gen_ai.response.id"] == raw.parse().id == server["attributes"]["gen_ai.response.id"]
    assert server["attributes"]["gen_ai.response.finish_reasons"]


def test_an_upstream_4xx_is_an_error_of_the_client_span_only(gateway_factory, collector, upstream):
    """The provider refused the request (400): an error of the CLIENT span (HTTP client
    convention), a 4xx the SERVER span leaves unset."""
    gw = gateway_factory(telemetry=telemetry(collector))
    _, key = gw.make_user()
    upstream.push(Fault.status(400))
    with pytest.raises(openai.BadRequestError) as excinfo:
        chat(gw, key)
    server, (client,) = collector.trace_of(excinfo.value.response.headers["x-request-id"])
    assert client["status"] == STATUS_ERROR and client["attributes"]["error.type"] == "400"
    assert server["status"] == STATUS_UNSET and server["attributes"]["http.response.status_code"] == 400
    assert server["attributes"]["error.type"]


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "untraced"])
def test_a_clients_raw_trace_headers_never_reach_the_upstream(gateway_factory, collector, upstream, traced):
    """Whatever the path (the /v1/messages pass-through, litellm), the upstream gets the
    gateway's trace context or none: never the client's headers as sent."""
    models = base_config(upstream, store_url="sqlite:///unused")["models"]
    models[1]["dispatch"] = "litellm"
    gw = gateway_factory(models=models, **({"telemetry": telemetry(collector)} if traced else {}))
    _, key = gw.make_user()
    raw_headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-evil", "tracestate": "a=b, bad member!"}
    sdk = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=20)
    sdk.messages.create(model="claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}],
                        extra_headers=raw_headers)
    passthrough = upstream.last.headers
    chat(gw, key, extra_headers=raw_headers)  # gpt-4o-mini through litellm
    through_litellm = upstream.last.headers
    for sent in (passthrough, through_litellm):
        assert sent.get("tracestate") is None
        if traced:
            assert CLIENT_TRACE not in sent["traceparent"] and not sent["traceparent"].endswith("-evil")
        else:
            assert "traceparent" not in sent


@pytest.mark.parametrize("dispatch", ["native", "litellm"])
def test_anthropic_input_tokens_include_the_cache_on_both_paths(gateway_factory, collector, upstream, dispatch):
    upstream.prompt_tokens, upstream.cached_tokens, upstream.cache_write_tokens = 10, 30, 5
    models = base_config(upstream, store_url="sqlite:///unused")["models"]
    models[2]["dispatch"] = dispatch  # claude
    gw = gateway_factory(models=models, telemetry=telemetry(collector))
    _, key = gw.make_user()
    raw = chat(gw, key, model="claude")
    server, (client,) = collector.trace_of(request_id_of(raw))
    assert server["attributes"]["gen_ai.usage.input_tokens"] == 45
    assert client["attributes"]["gen_ai.usage.input_tokens"] == 45
    assert server["attributes"]["gen_ai.usage.cache_read.input_tokens"] == 30
    assert server["attributes"]["gen_ai.usage.cache_creation.input_tokens"] == 5
    assert traceparent_of(upstream.last)[1] == client["span_id"]


def test_a_request_in_flight_at_a_reload_is_exported_by_the_tracer_it_started_on(
        server_thread, upstream, store_url, tmp_path, collector):
    """The reload replaces the tracer while a request is still waiting for the upstream: the
    old tracer stays until that request ended, exports its spans, then its exporter leaves."""
    import threading

    import yaml

    import proxy

    second = server_thread.run(FakeCollector().start())
    data = base_config(upstream, store_url=store_url, plugins=[], telemetry=telemetry(collector))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))

    runner, app, url = server_thread.run(start_app(path))
    gw = app[proxy.GATEWAY]
    try:
        request_id_of(chat_at(url))  # the old tracer's exporter process is running
        old = gw.snapshot.telemetry
        upstream.push(Fault.slow(1.5))
        answered: list[str] = []
        slow = threading.Thread(target=lambda: answered.append(request_id_of(chat_at(url))))
        slow.start()
        deadline = time.monotonic() + 10
        while old.active == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        data["telemetry"] = telemetry(second)
        path.write_text(yaml.safe_dump(data))
        assert server_thread.run(proxy.reload_config(app, reason="test")) is True
        assert old in gw.retired_telemetry and old.active == 1 and not old.stopped  # waits for the slow request
        slow.join(20)
        server, (client,) = collector.trace_of(answered[0])  # exported by the tracer it started on
        assert old.pipe.child is not None
        old.pipe.child.proc.wait(timeout=10)  # then the old exporter left
        deadline = time.monotonic() + 10
        while old in gw.retired_telemetry and time.monotonic() < deadline:  # the stop's last step
            time.sleep(0.02)
        assert old not in gw.retired_telemetry
        second.trace_of(request_id_of(chat_at(url)))
    finally:
        server_thread.run(runner.cleanup(), timeout=30)
        server_thread.run(second.stop())


def chat_at(url: str) -> Any:
    with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=20) as sdk:
        return sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini",
                                                             messages=[{"role": "user", "content": "hi"}])
