"""The trace exporter process: spans leave the gateway's process to be encoded and posted.

A traced request's spans are plain tuples (`SpanRecord`, built by gateway/telemetry.py
once the request ended); `ExportPipe` batches them, pickles each batch once and writes
it, non-blocking, to a child process (`python -m gateway.trace_export`, one per tracer,
started at the first span). The child rebuilds the OpenTelemetry SDK's `ReadableSpan`
objects and hands them to the SDK's `BatchSpanProcessor` with its `OTLPSpanExporter`: the
protobuf encoding and the HTTP posts, which hold the GIL for as long as the request's own
work, run on another core instead of in the gateway's event loop.

The child runs at nice 19, on the CPUs its gateway is not pinned to (`Placement`: where
the gateway is pinned to some CPUs, the encoding never takes theirs), and makes the SDK's
encoder reuse the protobuf it built for an attribute it saw before
(`reuse_encoded_attributes`: byte for byte the SDK's output, ~40% of its CPU saved).

Bounded, drop-and-count (`SPANS`, gateway_trace_spans_dropped_total):

* spans the child has not yet exported or failed are in flight; at `queue_size` of them
  (a slow or dead collector) a further span is dropped at once (`queue_full`);
* an export that fails in the child is counted when the child says so (`export_failed`);
* a child that dies takes what it held (`export_failed` too); the next span starts a new
  one, at most one start per `RESTART_EVERY` seconds (spans meanwhile: `export_failed`);
* at stop the pipe is closed, the child exports what it holds and leaves; what it did not
  within `export_timeout` is `shutdown`.

The child ignores SIGINT and SIGTERM (a terminal's Ctrl-C or a group kill reach it too):
it leaves when the gateway closes the pipe, which also happens when the gateway dies.

Wire: gateway -> child, frames of a 4-byte big-endian length and a pickle: the first is
the settings (endpoint, headers, ...), each further one a list of `SpanRecord`s. Child ->
gateway, lines of ASCII integers: "exported failed", cumulative, after each export.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("gateway.telemetry")

# Per process, across reloads (each reload may build a new exporter): spans exported, and
# spans dropped by reason ("queue_full": too many in flight, a slow or dead collector;
# "export_failed": the collector refused or never answered, or the exporter process died;
# "shutdown": still held at stop).
SPANS: collections.Counter[str] = collections.Counter()

# (name, kind, trace_id, span_id, parent_span_id or 0, parent_is_remote, trace_state header
# or None, start ns, end ns, attributes, events ((name, attributes, ns), ...), status code,
# status description or None): one span, as gateway/telemetry.py builds it.
SpanRecord = tuple

# The exporter's priority below the gateway's (nice 19: it runs on CPU the requests leave;
# a starved exporter's spans are dropped and counted, the requests are not slowed).
NICE = int(os.environ.get("GATEWAY_TRACE_EXPORT_NICE", "19"))
RESTART_EVERY = 5.0  # seconds between two starts of a child that died
_FLUSH_EVERY = 0.05  # seconds a span waits in the gateway before it is written to the pipe
_FLUSH_AT = 256  # spans: written at once
_PIPE_BYTES = 1 << 20  # F_SETPIPE_SZ: room for a few thousand spans in the kernel
_F_SETPIPE_SZ = 1031
_FRAME = struct.Struct(">I")
_ROOT = str(Path(__file__).resolve().parent.parent)


class _Child:
    """One exporter process and what it was given and settled (exported or failed)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.given = 0  # spans pickled for it: the event loop's thread
        self.settled = 0  # spans it reported: its reader thread
        self.ended = False  # its reader saw the end of its output
        self.detached = False  # the gateway no longer writes to it


class ExportPipe:
    """The gateway's end: `submit()` and `flush()` from the event loop's thread, `close()`
    at stop."""

    def __init__(self, settings: dict[str, Any], queue_size: int):
        self.settings = settings
        self.queue_size = queue_size
        self.accepted = 0  # spans taken by submit()
        self.settled = 0  # spans exported, failed or lost: under _lock
        self.pending: list[SpanRecord] = []
        self.out = bytearray()  # pickled frames not yet in the pipe
        self.child: _Child | None = None
        self.started_at = -RESTART_EVERY
        self.closed = False
        self.final = False  # close() counted what was left: nothing is counted after it
        self._timer: Any = None
        self._lock = threading.Lock()
        self._said_at = 0.0

    @property
    def in_flight(self) -> int:
        return self.accepted - self.settled

    # --- the request path -------------------------------------------------------------

    def submit(self, spans: list[SpanRecord]) -> None:
        """Take one request's spans, or drop and count them: never blocks."""
        if self.closed:  # a request that ended after the stop began
            SPANS["shutdown"] += len(spans)
            return
        if self.accepted - self.settled + len(spans) > self.queue_size:
            SPANS["queue_full"] += len(spans)
            return
        self.accepted += len(spans)
        self.pending.extend(spans)
        if len(self.pending) >= _FLUSH_AT:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(_FLUSH_EVERY, self._timed_flush)
            except RuntimeError:  # no loop in this thread: write now
                self.flush()

    def _timed_flush(self) -> None:
        self._timer = None
        self.flush()
        if (self.pending or self.out) and not self.closed:  # the pipe was full: again shortly
            self._timer = asyncio.get_running_loop().call_later(_FLUSH_EVERY, self._timed_flush)

    def flush(self) -> None:
        """Pickle what is pending as one frame, write what the pipe takes now."""
        if self.pending:
            spans, self.pending = self.pending, []
            child = self.child
            if child is None or child.proc.poll() is not None:
                child = self._start()
            if child is None:
                self._lose(len(spans))
            else:
                payload = pickle.dumps(spans, protocol=pickle.HIGHEST_PROTOCOL)
                self.out += _FRAME.pack(len(payload))
                self.out += payload
                child.given += len(spans)
        if self.out and self.child is not None:
            try:
                written = os.write(self.child.proc.stdin.fileno(), self.out)  # type: ignore[union-attr]
            except BlockingIOError:
                return  # the pipe is full: the next flush
            except OSError:  # BrokenPipeError: it died
                self._detach()
                return
            del self.out[:written]

    # --- the child ----------------------------------------------------------------------

    def _start(self) -> _Child | None:
        """A new exporter process (the old one, if any, is let go), or None while the last
        start is less than RESTART_EVERY ago."""
        if self.child is not None:
            self._detach()
        now = time.monotonic()
        if now - self.started_at < RESTART_EVERY:
            return None
        self.started_at = now
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))}
        try:
            proc = subprocess.Popen([sys.executable, "-m", "gateway.trace_export"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, env=env, cwd=_ROOT)
        except OSError:
            log.exception("trace_exporter_start_failed")
            return None
        assert proc.stdin is not None
        try:
            fcntl.fcntl(proc.stdin.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
        except OSError:  # a smaller pipe only fills sooner
            pass
        os.set_blocking(proc.stdin.fileno(), False)
        payload = pickle.dumps(self.settings)
        self.out = bytearray(_FRAME.pack(len(payload)) + payload)
        self.child = child = _Child(proc)
        threading.Thread(target=self._read_counts, args=(child,), name="trace-export-counts", daemon=True).start()
        return child

    def _read_counts(self, child: _Child) -> None:
        """The child's cumulative counts, into SPANS and `settled`, until it ends."""
        assert child.proc.stdout is not None
        exported = failed = 0
        for line in child.proc.stdout:
            try:
                now_exported, now_failed = map(int, line.split())
            except ValueError:
                continue
            with self._lock:
                SPANS["exported"] += now_exported - exported
                SPANS["export_failed"] += now_failed - failed
                child.settled += (now_exported - exported) + (now_failed - failed)
                self.settled += (now_exported - exported) + (now_failed - failed)
            if now_failed > failed:
                self._say("trace export failed: %d spans dropped (collector down or refusing?)", now_failed - failed)
            exported, failed = now_exported, now_failed
        child.proc.wait()
        child.proc.stdout.close()
        with self._lock:
            child.ended = True
            self._settle_ended(child)

    def _detach(self) -> None:
        """The child died (or cannot be written to): what waits for it in `out` and what it
        held are lost; the next flush starts another."""
        child, self.child = self.child, None
        if child is None:
            return
        self.out = bytearray()
        if not self.closed:
            self._say("trace exporter process ended (exit %s): restarted", child.proc.poll())
        try:
            child.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        with self._lock:
            child.detached = True
            self._settle_ended(child)

    def _settle_ended(self, child: _Child) -> None:
        """Once a child has ended and been let go (under _lock): its unsettled spans are lost."""
        if child.ended and child.detached and not self.final:
            lost, child.given = max(0, child.given - child.settled), child.settled
            self.settled += lost
            SPANS["export_failed"] += lost

    def _lose(self, count: int) -> None:
        with self._lock:
            self.settled += count
            SPANS["export_failed"] += count

    def _say(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._said_at > 60:
            self._said_at = now
            log.warning(message, *args)

    # --- stop ---------------------------------------------------------------------------

    def stop_taking(self) -> None:
        """At stop, in the event loop's thread: what is pending is pickled, nothing more is taken."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        self.closed = True

    def close(self, timeout: float) -> None:
        """After `stop_taking()`, blocking (a thread of its own): write what is left, close
        the pipe and let the child export what it holds, for at most `timeout` seconds;
        what it did not is counted as `shutdown`."""
        deadline = time.monotonic() + timeout
        child = self.child
        if child is not None:
            fd = child.proc.stdin.fileno()  # type: ignore[union-attr]
            try:
                while self.out and time.monotonic() < deadline:
                    try:
                        del self.out[:os.write(fd, self.out)]
                    except BlockingIOError:
                        select.select([], [fd], [], max(0.0, deadline - time.monotonic()))
            except OSError:
                pass
            try:
                child.proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
            end = time.monotonic() + 2  # its reader takes its last counts
            while not child.ended and time.monotonic() < end:
                time.sleep(0.01)
        with self._lock:
            unsent = max(0, self.accepted - self.settled)
            self.settled += unsent
            SPANS["shutdown"] += unsent
            self.final = True
        if unsent:
            log.warning("trace flush at stop: %d spans not exported", unsent)


# --------------------------------------------------------------------------------------
# The child: python -m gateway.trace_export
# --------------------------------------------------------------------------------------


def _read_exact(stream: Any, size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


def _read_frame(stream: Any) -> Any:
    head = _read_exact(stream, _FRAME.size)
    if head is None:
        return None
    payload = _read_exact(stream, _FRAME.unpack(head)[0])
    return None if payload is None else pickle.loads(payload)


# Attributes whose value is new in every span: not worth keeping encoded.
_UNIQUE_VALUES = frozenset({"gateway.request_id", "gen_ai.response.id", "gateway.plugin.durations_ms",
                            "gateway.cost_usd", "gen_ai.input.messages", "gen_ai.output.messages"})
_CACHED_ATTRIBUTES = 4096


def reuse_encoded_attributes() -> bool:
    """Make the SDK's span encoder reuse the protobuf it built for an attribute it saw before.

    The OTLP encoder (opentelemetry-exporter-otlp-proto-common) builds two protobuf
    messages from Python for every attribute of every span (~2.5 us each: most of the
    exporter's CPU); a gateway's spans repeat most of theirs (operation, provider, models,
    user, workspace, tier, deployment, the plugins' names...). Here each (key, type, value)
    is encoded once by the SDK's own `_encode_key_value` and its message reused: the
    encoder copies it into each span (protobuf repeated fields copy what they are given),
    so the result is byte for byte the SDK's (tests/test_telemetry.py compares). Bounded:
    at `_CACHED_ATTRIBUTES` entries the cache starts again. False (and the SDK's encoder
    left alone) if its internals are not where this release of the SDK keeps them."""
    try:
        from opentelemetry.exporter.otlp.proto.common._internal import _encode_key_value
        from opentelemetry.exporter.otlp.proto.common._internal import trace_encoder
    except ImportError:
        return False
    if not callable(getattr(trace_encoder, "_encode_attributes", None)):
        return False
    original = trace_encoder._encode_attributes
    cache: dict[tuple, Any] = {}

    def encode_attributes(attributes: Any) -> list:
        if not attributes:
            return []
        out = []
        for key, value in attributes.items():
            kind = type(value)
            if key in _UNIQUE_VALUES or kind not in _SCALARS and not (kind is list and value and type(value[0]) is str):
                memo = None
            else:
                memo = (key, kind, tuple(value) if kind is list else value)
                try:
                    encoded = cache.get(memo)
                except TypeError:  # an unhashable element (not the gateway's own attributes)
                    memo = encoded = None
                if encoded is not None:
                    out.append(encoded)
                    continue
            try:
                encoded = _encode_key_value(key, value)
            except Exception:  # noqa: BLE001 — what the SDK's own loop does: logged, left out
                out.extend(original({key: value}))
                continue
            if memo is not None:
                if len(cache) >= _CACHED_ATTRIBUTES:
                    cache.clear()
                cache[memo] = encoded
            out.append(encoded)
        return out

    trace_encoder._encode_attributes = encode_attributes
    return True


_SCALARS = frozenset({str, bool, int, float})


class Placement:
    """The exporter's CPUs: those the gateway's process is not pinned to.

    Where the gateway is pinned to some of the machine's CPUs (taskset, a cpuset, one
    worker per core), the exporter runs on the others, so that it never takes the cores the
    requests are served on nor pollutes their caches; where the gateway may run anywhere, so
    may the exporter (at its low priority). Looked at again every `every` seconds while
    spans arrive: a gateway pinned (or unpinned) while it runs moves its exporter too."""

    def __init__(self, parent: int, every: float = 1.0):
        self.parent = parent
        self.every = every
        self.checked = -every
        self.seen: frozenset[int] | None = None
        self.cpus: frozenset[int] | None = None  # where this process runs now (None: anywhere)

    def check(self, now: float) -> None:
        if now - self.checked < self.every:
            return
        self.checked = now
        try:
            gateway = frozenset(os.sched_getaffinity(self.parent))
        except (OSError, AttributeError):  # the gateway is gone, or no affinity on this OS
            return
        if gateway == self.seen:
            return
        self.seen = gateway
        everywhere = frozenset(range(os.cpu_count() or 1))
        apart = everywhere - gateway
        try:
            os.sched_setaffinity(0, apart or everywhere)  # the kernel keeps it within the cpuset
            self.cpus = frozenset(os.sched_getaffinity(0)) if apart else None
        except OSError:  # none of the others is allowed here: stay where the gateway is
            self.cpus = None


def child_main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        os.nice(NICE)
    except OSError:
        pass
    for name in ("opentelemetry.exporter.otlp.proto.http", "opentelemetry.exporter.otlp.common",
                 "opentelemetry.sdk._shared_internal", "opentelemetry.attributes"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    reuse_encoded_attributes()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

    source, sink = sys.stdin.buffer, sys.stdout
    settings = _read_frame(source)
    if settings is None:
        return 0
    counts = {"exported": 0, "failed": 0}
    count_lock = threading.Lock()

    class Counting(SpanExporter):
        def __init__(self, exporter: SpanExporter):
            self.exporter = exporter

        def export(self, spans: Any) -> SpanExportResult:
            try:
                result = self.exporter.export(spans)
            except Exception:  # noqa: BLE001 — a broken collector never breaks the exporter
                result = SpanExportResult.FAILURE
            with count_lock:
                counts["exported" if result is SpanExportResult.SUCCESS else "failed"] += len(spans)
                try:
                    sink.write(f"{counts['exported']} {counts['failed']}\n")
                    sink.flush()
                except (OSError, ValueError):  # the gateway is gone
                    pass
            return result

        def shutdown(self) -> None:
            self.exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return True

    exporter = OTLPSpanExporter(endpoint=settings["endpoint"], headers=settings["headers"],
                                timeout=settings["export_timeout"])
    # The gateway bounds what is in flight to queue_size: this queue never drops.
    processor = BatchSpanProcessor(Counting(exporter), max_queue_size=settings["queue_size"] + settings["batch_size"],
                                   schedule_delay_millis=settings["export_interval"] * 1000,
                                   max_export_batch_size=settings["batch_size"],
                                   export_timeout_millis=settings["export_timeout"] * 1000)
    class _Resource(Resource):  # the encoder hashes the resource once per span: hashed once here
        def __init__(self, resource: Resource):
            super().__init__(resource.attributes, resource.schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    resource = _Resource(Resource.create({"service.name": settings["service_name"]}))
    scope = InstrumentationScope("gateway")
    sampled = TraceFlags(TraceFlags.SAMPLED)
    kinds = {k.value: k for k in SpanKind}
    statuses = {s.value: s for s in StatusCode}
    states: dict[str | None, TraceState | None] = {None: None}

    def state_of(header: str | None) -> TraceState | None:
        if header not in states:
            if len(states) > 1024:
                states.clear()
                states[None] = None
            states[header] = TraceState.from_header([header])
        return states[header]

    placement = Placement(os.getppid())
    placement.check(time.monotonic())
    while True:
        records = _read_frame(source)
        if records is None:
            break
        placement.check(time.monotonic())
        for (name, kind, trace_id, span_id, parent_id, parent_remote, trace_state, start, end,
             attributes, events, status, description) in records:
            state = state_of(trace_state)
            processor.on_end(ReadableSpan(
                name=name,
                context=SpanContext(trace_id, span_id, False, sampled, state),
                parent=SpanContext(trace_id, parent_id, parent_remote, sampled, state) if parent_id else None,
                resource=resource, attributes=attributes,
                events=[Event(n, a, t) for n, a, t in events] if events else (),
                kind=kinds[kind], status=Status(statuses[status], description),
                start_time=start, end_time=end, instrumentation_scope=scope))
    processor.shutdown()  # exports everything still queued
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
