"""The trace exporter process's own machinery (gateway/trace_export.py): the SDK's encoder
reusing what it encoded before, byte for byte the SDK's output, and the exporter placed on
the CPUs its gateway is not pinned to. The span trees themselves: tests/test_telemetry.py."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common._internal import trace_encoder
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

from gateway import trace_export
from tests.test_telemetry import FakeCollector, ask_once, serve, stop, telemetry


@pytest.fixture
def collector(server_thread):
    fake = server_thread.run(FakeCollector().start())
    yield fake
    server_thread.run(fake.stop())


def spans_of(attribute_sets: list[dict[str, Any]]) -> list[ReadableSpan]:
    resource = Resource.create({"service.name": "test"})
    scope = InstrumentationScope("gateway")
    out = []
    for n, attributes in enumerate(attribute_sets, start=1):
        context = SpanContext(n, n, False, TraceFlags(TraceFlags.SAMPLED))
        out.append(ReadableSpan(name=f"span {n}", context=context, resource=resource, attributes=attributes,
                                events=[Event("an event", dict(attributes), 5)] if n % 3 == 0 else (),
                                kind=SpanKind.SERVER, start_time=1, end_time=2, instrumentation_scope=scope))
    return out


# The same key with values equal in Python but not in OTLP (True == 1 == 1.0), arrays of
# strings (kept) and of numbers (not), values met again, values never met again, and
# values the gateway never sends (bytes, a mapping, nested and unhashable arrays, None).
ATTRIBUTES = [
    {"k": True, "n": 1, "f": 1.0, "s": "chat", "names": ["auth", "energy"], "ms": [0.012, 0.5]},
    {"k": 1, "n": True, "f": 1, "s": "chat", "names": ["auth", "energy"], "ms": [0.012, 0.5]},
    {"k": 1.0, "n": 1.0, "f": True, "s": "embeddings", "names": ["auth"], "ms": [1, 2]},
    {"k": False, "n": 0, "f": 0.0, "s": "", "names": [], "gateway.request_id": "req_1", "gen_ai.response.id": "x"},
    {"k": 0, "b": b"\x00\x01", "m": {"a": 1, "b": ["c"]}, "nested": ["a", ["b"]], "none": None},
    {"k": "True", "n": "1", "names": ["auth", "energy"], "gateway.request_id": "req_2", "big": 2 ** 62},
]


def test_reused_attribute_encoding_is_byte_for_byte_the_sdks(monkeypatch):
    """Every case encoded by the SDK alone, then with its results reused (twice: the second
    time from the cache, then again after the cache started over): the same bytes."""
    monkeypatch.setattr(trace_encoder, "_encode_attributes", trace_encoder._encode_attributes)  # restored after
    spans = spans_of(ATTRIBUTES * 3)
    expected = encode_spans(spans).SerializeToString()
    assert trace_export.reuse_encoded_attributes() is True
    assert trace_encoder._encode_attributes.__qualname__.startswith("reuse_encoded_attributes")
    assert encode_spans(spans).SerializeToString() == expected
    assert encode_spans(spans).SerializeToString() == expected  # from the cache
    monkeypatch.setattr(trace_export, "_CACHED_ATTRIBUTES", 3)  # starts over every third entry
    trace_export.reuse_encoded_attributes()
    assert encode_spans(spans).SerializeToString() == expected


def test_the_cache_is_bounded(monkeypatch):
    """A stream of values never met again (as many distinct as spans) keeps at most
    `_CACHED_ATTRIBUTES` encoded attributes."""
    monkeypatch.setattr(trace_encoder, "_encode_attributes", trace_encoder._encode_attributes)
    monkeypatch.setattr(trace_export, "_CACHED_ATTRIBUTES", 50)
    trace_export.reuse_encoded_attributes()
    spans = spans_of([{"gen_ai.usage.input_tokens": n, "gateway.user": f"usr_{n}"} for n in range(500)])
    encode_spans(spans)
    cache = next(c.cell_contents for c in trace_encoder._encode_attributes.__closure__
                 if isinstance(c.cell_contents, dict))
    assert 0 < len(cache) <= 50


# --------------------------------------------------------------------------------------
# Placement: the exporter runs where its gateway is not pinned
# --------------------------------------------------------------------------------------

def exporter_pid(gateway_pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = open(f"/proc/{gateway_pid}/task/{gateway_pid}/children").read().split()
        except OSError:
            children = []
        for child in children:
            if "gateway.trace_export" in open(f"/proc/{child}/cmdline").read().replace("\0", " "):
                return int(child)
        time.sleep(0.05)
    raise AssertionError("no exporter process")


def pin(pid: int, cpus: set[int]) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def affinity_becomes(pid: int, want: set[int], url: str, timeout: float = 15.0) -> set[int]:
    """Requests keep spans arriving (the exporter looks at its gateway's CPUs every second
    while they do) until `pid` runs on `want` or `timeout`; its CPUs."""
    deadline = time.monotonic() + timeout
    while True:
        ask_once(url)
        now = set(os.sched_getaffinity(pid))
        if now == want or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not os.path.exists("/proc/self/task"),
                    reason="needs two CPUs and Linux's /proc")
def test_the_exporter_runs_on_the_cpus_its_gateway_is_not_pinned_to(upstream, collector, tmp_path):
    """A real `proxy.py serve`: unpinned, its exporter may run anywhere; pinned to one CPU
    (taskset, as an operator would, while it runs), its exporter moves to the others;
    unpinned again, it may run anywhere again. Spans keep reaching the collector."""
    everywhere = set(os.sched_getaffinity(0))
    first = min(everywhere)
    proc, url = serve(upstream, tmp_path, telemetry(collector))
    try:
        ask_once(url)
        exporter = exporter_pid(proc.pid)
        assert set(os.sched_getaffinity(exporter)) == everywhere
        pin(proc.pid, {first})
        assert affinity_becomes(exporter, everywhere - {first}, url) == everywhere - {first}
        pin(proc.pid, everywhere)
        assert affinity_becomes(exporter, everywhere, url) == everywhere
        collector.trace_of(ask_once(url))
        assert exporter_pid(proc.pid) == exporter  # the same process throughout
    finally:
        output = stop(proc)
    assert proc.returncode == 0, output[-3000:]
