"""A local OTLP/HTTP trace receiver for the benchmark's traced gateway (`bench.py --telemetry`).

    python bench/collector.py --port 4318

POST /v1/traces   decodes each ExportTraceServiceRequest (as a collector would) and counts its spans
GET  /stats       {"posts": N, "spans": N}
GET  /health      200, for the start-up wait
"""

from __future__ import annotations

import argparse

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

ANSWER = ExportTraceServiceResponse().SerializeToString()


def make_app() -> web.Application:
    stats = {"posts": 0, "spans": 0}

    async def traces(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        stats["posts"] += 1
        stats["spans"] += sum(len(s.spans) for r in message.resource_spans for s in r.scope_spans)
        return web.Response(body=ANSWER, content_type="application/x-protobuf")

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", get_stats)
    app.router.add_get("/health", health)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    web.run_app(make_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)
