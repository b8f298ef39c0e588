"""Closed-loop HTTP load generator for the benchmark; runs in its own process.

    python bench/load.py load   --url URL --body JSON [--header 'K: V'] -c 32 --duration 10 [--warmup 2]
    python bench/load.py load   --url URL --body JSON -c 32 --requests 100000
    python bench/load.py stream --url URL --body JSON --streams 20

`load`: C connections (one aiohttp connector, limit=C, keep-alive), each sending the next
request as soon as the previous answer is read, for a duration or a fixed request count.
`stream`: one streamed request at a time, recording the arrival time of every SSE `data:`
line, so the caller can see time to first byte and whether chunks arrived batched.
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter

import aiohttp


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def latency_summary(latencies: list[float]) -> dict:
    values = sorted(latencies)
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    return {"p50_ms": ms(percentile(values, 50)), "p90_ms": ms(percentile(values, 90)),
            "p99_ms": ms(percentile(values, 99)), "max_ms": ms(values[-1] if values else None),
            "mean_ms": ms(sum(values) / len(values) if values else None)}


def _session(connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections, force_close=False,
                                     keepalive_timeout=60)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30),
                                 skip_auto_headers=("User-Agent",))


async def closed_loop(args: argparse.Namespace, body: bytes, headers: dict[str, str]) -> dict:
    latencies: list[float] = []
    statuses: Counter = Counter()
    exceptions: Counter = Counter()
    async with _session(args.connections) as session:

        async def one(record: bool) -> None:
            started = time.perf_counter()
            try:
                async with session.post(args.url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                if record:
                    exceptions[type(exc).__name__] += 1
                return
            if record:
                latencies.append(time.perf_counter() - started)
                statuses[status] += 1

        async def run_for(seconds: float, record: bool) -> None:
            deadline = time.perf_counter() + seconds

            async def worker() -> None:
                while time.perf_counter() < deadline:
                    await one(record)

            await asyncio.gather(*(worker() for _ in range(args.connections)))

        if args.warmup > 0:
            await run_for(args.warmup, record=False)
        started = time.perf_counter()
        if args.requests:
            remaining = args.requests
            deadline = started + args.duration if args.duration > 0 else float("inf")  # a cap, not a target

            async def counted_worker() -> None:
                nonlocal remaining
                while remaining > 0 and time.perf_counter() < deadline:
                    remaining -= 1
                    await one(True)

            await asyncio.gather(*(counted_worker() for _ in range(args.connections)))
        else:
            await run_for(args.duration, record=True)
        elapsed = time.perf_counter() - started
    completed = sum(statuses.values())
    non_200 = completed - statuses.get(200, 0)
    return {"generator": "python", "connections": args.connections, "duration_s": round(elapsed, 3),
            "requests": completed, "rps": round(completed / elapsed, 1) if elapsed else 0.0,
            "errors": non_200 + sum(exceptions.values()), "non_200": non_200,
            "statuses": {str(k): v for k, v in statuses.items()}, "exceptions": dict(exceptions),
            **latency_summary(latencies)}


async def streams(args: argparse.Namespace, body: bytes, headers: dict[str, str]) -> dict:
    """Every stream: ms from send to each `data:` line; which lines carried content."""
    results = []
    async with _session(1) as session:
        for i in range(args.warmup_streams + args.streams):
            started = time.perf_counter()
            arrivals: list[float] = []
            content: list[bool] = []
            status = None
            error = None
            try:
                async with session.post(args.url, data=body, headers=headers) as resp:
                    status = resp.status
                    async for line in resp.content:  # one SSE line at a time, as it arrives
                        if not line.startswith(b"data:"):
                            continue
                        arrivals.append((time.perf_counter() - started) * 1000)
                        data = line[5:].strip()
                        has_content = False
                        if data != b"[DONE]":
                            try:
                                chunk = json.loads(data)
                                has_content = any((c.get("delta") or {}).get("content")
                                                  for c in chunk.get("choices") or ())
                            except ValueError:
                                pass
                        content.append(has_content)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                error = type(exc).__name__
            if i >= args.warmup_streams:
                results.append({"status": status, "error": error, "arrivals_ms": [round(a, 3) for a in arrivals],
                                "content": content})
    return {"generator": "python", "streams": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("load", "stream"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="the JSON request body")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("-c", "--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (load mode)")
    parser.add_argument("--requests", type=int, default=0, help="a fixed count instead of a duration")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unrecorded load first")
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--warmup-streams", type=int, default=3)
    args = parser.parse_args()
    headers = {"Content-Type": "application/json"}
    for item in args.header:
        name, _, value = item.partition(":")
        headers[name.strip()] = value.strip()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    body = args.body.encode()
    run = closed_loop if args.mode == "load" else streams
    result = asyncio.run(run(args, body, headers))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
