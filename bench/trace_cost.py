"""What tracing one fast-path request costs, in CPU, without the gateway around it.

    .venv/bin/python bench/trace_cost.py [--requests 20000] [--rounds 5]

Replays one fast-path request's telemetry calls (gateway/telemetry.py: the server span
opened, eight request hooks timed, the overlapped reservation's gate, one attempt with its
traceparent and answer, the end) `--requests` times in an event loop, exporting for real:
the exporter process (gateway/trace_export.py) encodes and posts every span to a local
collector (bench/collector.py). Reported per request, the minimum over `--rounds`: the
gateway's CPU (this process: recording, the attributes, pickling and writing to the pipe)
and the exporter process's (rebuilding the SDK's spans, its OTLP encoding and posts), read
from /proc, which other load on the machine disturbs little. `--sample-ratio 0` gives the
cost of a request the sampler dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

import bench  # noqa: E402
from cpu_per_request import children_cpu_seconds  # noqa: E402

from gateway.config import TelemetryConfig, load_config_data  # noqa: E402
from plugins.base import Usage  # noqa: E402
from gateway.telemetry import SPANS, Telemetry  # noqa: E402
from plugins.testing import make_ctx  # noqa: E402

HOOKS = ("auth", "rate_limit", "tier_policy", "experiments", "cache", "energy", "accounting", "metrics")
ANSWER = {"id": "chatcmpl-0123456789abcdef", "object": "chat.completion", "model": "gpt-4o-mini",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


def bare_request(config) -> tuple:
    """What one_request does besides tracing (the context and the request it reads), timed
    alone and subtracted."""
    ctx = make_ctx(config=config, body={"max_tokens": 16})
    return ctx, SimpleNamespace(headers={}, method="POST", path="/v1/chat/completions")


def one_request(telemetry: Telemetry, config, deployment) -> None:
    ctx, request = bare_request(config)
    trace = telemetry.start(ctx, request)  # type: ignore[arg-type]
    for hook in HOOKS:  # a hook's 5-60 us, as on the fast path (each duration is a new value)
        trace.phase(hook, time.perf_counter() - random.uniform(5e-6, 6e-5))
    ctx.provider, ctx.attempts = "openai", 1
    attempt = trace.attempt(ctx, ctx.model, deployment)
    answer = {**ANSWER, "id": f"chatcmpl-{random.getrandbits(96):024x}"}  # each answer's own id
    trace.attempt_ok(attempt, answer)
    trace.gate("passed", None)
    ctx.status, ctx.response = 200, answer
    ctx.usage = Usage(prompt_tokens=random.randint(8, 400), completion_tokens=random.randint(1, 200))
    ctx.energy_cost, ctx.deployment = 2, deployment.litellm_params.model
    trace.finish(ctx)


async def run_round(telemetry: Telemetry, config, deployment, requests: int) -> tuple[float, float]:
    child_before = children_cpu_seconds(os.getpid())
    before = time.process_time()
    for i in range(requests):
        one_request(telemetry, config, deployment)
        if i % 64 == 63:
            await asyncio.sleep(0)  # the flush timer runs, as between a server's requests
    await asyncio.sleep(0.1)
    mine = time.process_time() - before
    # The exporter is done with this round when every span is exported.
    deadline = time.monotonic() + 120
    while telemetry.pipe.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    theirs = children_cpu_seconds(os.getpid()) - child_before
    return mine / requests * 1e6, theirs / requests * 1e6


async def main_async(args: argparse.Namespace, collector: str) -> None:
    config = load_config_data({"models": [{"name": "gpt-4o-mini", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": "http://127.0.0.1:9/v1", "api_key": "sk-x"}}]})
    deployment = config.deployments("gpt-4o-mini")[0]
    telemetry = Telemetry(TelemetryConfig(otlp_endpoint=collector, sample_ratio=args.sample_ratio,
                                          queue_size=args.requests * 2 + 10))
    one_request(telemetry, config, deployment)  # starts the exporter process
    await asyncio.sleep(2)
    results = [await run_round(telemetry, config, deployment, args.requests) for _ in range(args.rounds)]
    bare = []
    for _ in range(args.rounds):
        before = time.process_time()
        for _ in range(args.requests):
            bare_request(config)
        bare.append((time.process_time() - before) / args.requests * 1e6)
    await telemetry.flush_and_stop()
    gateway_us = min(r[0] for r in results) - min(bare)
    exporter_us = min(r[1] for r in results)
    print("rounds (gateway, with the request context's making, + exporter process): "
          + "; ".join(f"{g:.1f} + {e:.1f}" for g, e in results) + f"; the context's making alone {min(bare):.1f}")
    print(f"per request (min of {args.rounds} rounds of {args.requests}, sample_ratio {args.sample_ratio}): "
          f"gateway {gateway_us:.1f} us, exporter process {exporter_us:.1f} us; "
          f"spans exported {SPANS['exported']}, dropped {SPANS['queue_full'] + SPANS['export_failed']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sample-ratio", type=float, default=1.0)
    args = parser.parse_args()
    procs = bench.Processes(Path(tempfile.mkdtemp(prefix="trace-cost-")))
    try:
        port = bench.free_port()
        coll = procs.start("collector", [bench.PYTHON, str(BENCH_DIR / "collector.py"), "--port", str(port)])
        bench.wait_http(f"http://127.0.0.1:{port}/health", coll, 30, "collector", procs, "collector")
        asyncio.run(main_async(args, f"http://127.0.0.1:{port}"))
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
