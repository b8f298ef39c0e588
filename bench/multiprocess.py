"""Throughput of 1, 2 and 3 gateway processes on one PostgreSQL (and one Redis).

    .venv/bin/python bench/multiprocess.py [--seconds 10] [--runs 2] [--processes 1,2,3]
    make bench-multiprocess

Starts bench/upstream.py and three gateways (`proxy.py serve`, config.yaml's plugin chain,
the fast path; the set-up of bench.py's fast path) on one store: a fresh PostgreSQL schema
in BENCH_PG_URL (dropped at the end), or one SQLite file with `--store sqlite`. Their rate
limits are counted in one Redis (`--redis`, '' for none; limits too high to refuse
anything), as several gateways would share them. Each gateway serves its own user, as a
fleet serves many: one user's row would be one lock that every process queues on.

Per phase, one wrk drives the first N gateways, one wrk thread per gateway (each thread's
connections go to its own gateway with its own user's key), at --connections in total
(rounded up to a multiple of N); the idle gateways cost nothing. Phases alternate (1, 2, 3,
1, 2, 3, ...) so every count sees the same machine. Per phase: req/s, p50/p99 under that
load, the gateways' CPU per request (all of them, summed) and, on PostgreSQL, the server's
(the gateways' backends and the server's own processes, as bench/cpu_per_request.py reads it).

On a small machine the gateways, PostgreSQL, Redis, the upstream and wrk share the cores:
more processes than free cores cannot add throughput, only show what contention costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import cpu_per_request  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"

# Each wrk thread, in the order wrk makes them, to its own gateway with its own key
# (thread:set makes `api_key` a global of that thread's script).
THREADS_LUA = """
local gateways = {{ {gateways} }}
local made = 0
function setup(thread)
  made = made + 1
  local g = gateways[(made - 1) % #gateways + 1]
  thread.addr = wrk.lookup("127.0.0.1", g.port)[1]
  thread:set("api_key", g.key)
end
function init(args)
  wrk.headers["Authorization"] = "Bearer " .. api_key
end
"""


def start_gateways(procs: bench.Processes, workdir: Path, upstream: str, count: int,
                   redis_url: str) -> list[tuple[int, str, int]]:
    """`count` gateways on one store, a user each; [(port, api key, pid)]."""
    path = bench.gateway_config(workdir, "multi", upstream, "auto")
    config = json.loads(path.read_text())
    if redis_url:
        config["tiers"]["pro"]["limits"] = {"rpm": 10**9}
        config["rate_limits"] = {"redis_url": redis_url, "key_prefix": f"gw:bench:{os.getpid()}"}
    path.write_text(json.dumps(config, indent=2))
    bench.run_child([bench.PYTHON, "proxy.py", "workspaces", "create", "bench", "--json", "--config", str(path)],
                    timeout=120)
    keys = [bench.create_user(str(path)) for _ in range(count)]
    gateways = []
    for i, key in enumerate(keys):
        base, pid = bench.serve(procs, str(path), f"gateway-{i + 1}")
        gateways.append((int(base.rsplit(":", 1)[1]), key, pid))
    return gateways


def measure(gateways: list[tuple[int, str, int]], used: int, connections: int, seconds: float,
            workdir: Path, on_postgres: bool) -> dict:
    """One phase: wrk on the first `used` gateways; throughput, latency, CPU per request."""
    port, key, _ = gateways[0]
    target = bench.Target(f"multi{used}", f"http://127.0.0.1:{port}/v1/chat/completions",
                          {"model": bench.GATEWAY_MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                           "max_tokens": 16}, {"Authorization": f"Bearer {key}"})
    lua = THREADS_LUA.format(gateways=", ".join(f'{{port = "{p}", key = "{k}"}}' for p, k, _ in gateways[:used]))
    connections = -(-connections // used) * used
    pids = [pid for _, _, pid in gateways]
    time.sleep(1.5)  # the previous phase's write-behind drains first
    before, pg_before = sum(map(cpu_per_request.cpu_seconds, pids)), cpu_per_request.postgres_cpu_seconds(pids)
    result = bench.wrk_load(target, connections, seconds, 0, workdir, threads=used, lua=lua)
    time.sleep(1.5)  # the write-behind flush belongs to these requests
    cpu = sum(map(cpu_per_request.cpu_seconds, pids)) - before
    row = {"processes": used, "connections": connections, "requests": result["requests"], "rps": result["rps"],
           "errors": result["errors"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
           "gateway_cpu_us": round(cpu / result["requests"] * 1e6, 1)}
    if on_postgres:
        row["postgres_cpu_us"] = round((cpu_per_request.postgres_cpu_seconds(pids) - pg_before)
                                       / result["requests"] * 1e6, 1)
    return row


def print_rows(rows: list[dict]) -> None:
    header = ["processes", "conns", "req/s", "errors", "p50", "p99", "gateway CPU/req", "PostgreSQL CPU/req"]
    table = [[str(r["processes"]), str(r["connections"]), f"{r['rps']:,.0f}", f"{r['errors']:.0f}",
              f"{r['p50_ms']:.1f} ms", f"{r['p99_ms']:.1f} ms", f"{r['gateway_cpu_us']:.0f} us",
              f"{r['postgres_cpu_us']:.0f} us" if "postgres_cpu_us" in r else "-"] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    for line in [header, ["-" * w for w in widths], *table]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,3", help="gateway counts to measure, comma-separated")
    parser.add_argument("--seconds", type=float, default=10, help="per phase")
    parser.add_argument("--runs", type=int, default=2, help="rounds of the alternated phases")
    parser.add_argument("--connections", type=int, default=32, help="in total, over the gateways in use")
    parser.add_argument("--store", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--redis", default=REDIS_URL, help="rate-limit counters' Redis ('' for per-process ones)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not on PATH")
    counts = [int(n) for n in args.processes.split(",")]
    os.environ["BENCH_STORE"] = args.store  # bench.store_url reads it
    workdir = Path(tempfile.mkdtemp(prefix="gateway-multi-"))
    procs = bench.Processes(workdir)
    rows: list[dict] = []
    try:
        port = bench.free_port()
        upstream = f"http://127.0.0.1:{port}"
        up = procs.start("upstream", [bench.PYTHON, str(bench.BENCH_DIR / "upstream.py"), "--port", str(port)])
        bench.wait_http(upstream + "/health", up, 30, "upstream", procs, "upstream")
        gateways = start_gateways(procs, workdir, upstream, max(counts), args.redis)
        bench.log(f"{len(gateways)} gateways on {args.store}; warm-up")
        measure(gateways, max(counts), args.connections, 3, workdir, False)  # caches and lazy paths of every gateway
        for run in range(args.runs):
            for used in counts:
                rows.append(measure(gateways, used, args.connections, args.seconds, workdir,
                                    args.store == "postgres"))
                bench.log(f"run {run + 1}, {used} process(es): {json.dumps(rows[-1])}")
    finally:
        procs.stop_all()
        bench.drop_pg_schemas()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{args.store}, {os.cpu_count()} CPUs, {args.seconds:.0f}s per phase, every phase:")
    print_rows(rows)
    print("\nmedian per count:")
    medians = []
    for n in counts:
        mine = [r for r in rows if r["processes"] == n]
        medians.append({k: v if k in ("processes", "connections") else statistics.median(r[k] for r in mine)
                        for k, v in mine[0].items()})
    print_rows(medians)
    return 0


if __name__ == "__main__":
    sys.exit(main())
