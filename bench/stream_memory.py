"""Memory of one gateway process per thousand concurrent streams (the sizing in docs/containers.md).

    python bench/stream_memory.py [--streams 1000 2000] [--stream-seconds 10]

One gateway (the default plugin chain, SQLite, the fast path: bench/bench.py's set-up) in
front of bench/upstream.py, whose streams last `--stream-seconds` (20 chunks spread over
them). After a warm-up of 100 concurrent streams the gateway's RSS is the idle figure; then
N streams are opened at once and held while the upstream trickles them, the RSS sampled
every 0.1 s: the peak minus the idle figure, per thousand streams, is what a stream costs.
Every stream must end with `data: [DONE]`, or the run is an error.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

CHUNKS = 20


async def one_stream(session: aiohttp.ClientSession, url: str, key: str) -> bool:
    body = {"model": bench.GATEWAY_MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        data = await resp.read()
    return resp.status == 200 and data.rstrip().endswith(b"data: [DONE]")


async def hold_streams(base: str, key: str, pid: int, streams: int) -> dict:
    samples: list[int] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append(bench.rss_kib(pid)["VmRSS"])
            await asyncio.sleep(0.1)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        # warm-up: every code path and pool touched, at the concurrency of 100 streams
        assert all(await asyncio.gather(*(one_stream(session, base + "/v1/chat/completions", key)
                                          for _ in range(100))))
        await asyncio.sleep(1)
        idle = bench.rss_kib(pid)["VmRSS"]
        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        results = await asyncio.gather(*(one_stream(session, base + "/v1/chat/completions", key)
                                         for _ in range(streams)))
        done.set()
        await sampler
    if not all(results):
        raise RuntimeError(f"{results.count(False)} of {streams} streams did not end with [DONE]")
    peak = max(samples)
    return {"streams": streams, "idle_mib": idle / 1024, "peak_mib": peak / 1024,
            "mib_per_1000": (peak - idle) / 1024 / streams * 1000, "seconds": time.monotonic() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--stream-seconds", type=float, default=10.0)
    args = parser.parse_args()
    # Each stream holds a client and an upstream socket in the gateway: lift the fd limit
    # (inherited by the children) above the default 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(args.streams) * 3 + 1024
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, want), hard), hard))
    workdir = Path(tempfile.mkdtemp(prefix="stream-memory-"))
    procs = bench.Processes(workdir)
    try:
        port = bench.free_port()
        delay_ms = args.stream_seconds * 1000 / CHUNKS
        upstream = procs.start("upstream", [bench.PYTHON, str(bench.BENCH_DIR / "upstream.py"), "--port", str(port),
                                            "--chunks", str(CHUNKS), "--chunk-delay-ms", str(delay_ms)])
        upstream_url = f"http://127.0.0.1:{port}"
        bench.wait_http(upstream_url + "/health", upstream, 30, "upstream", procs, "upstream")
        rows = []
        for streams in args.streams:  # a fresh gateway for each count: no high-water mark carried over
            base, key, pid = bench.start_gateway(procs, workdir, f"streams{streams}", upstream_url, "auto")
            rows.append(asyncio.run(hold_streams(base, key, pid, streams)))
            procs.children[-1].terminate()
            procs.children[-1].wait(timeout=30)
    finally:
        procs.stop_all()
        bench.drop_pg_schemas()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'streams':>8} {'idle MiB':>9} {'peak MiB':>9} {'MiB / 1000 streams':>19} {'seconds':>8}")
    for row in rows:
        print(f"{row['streams']:>8} {row['idle_mib']:>9.1f} {row['peak_mib']:>9.1f} {row['mib_per_1000']:>19.1f}"
              f" {row['seconds']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
