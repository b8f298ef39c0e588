"""Gateway CPU per request on the fast path: a repeatable number to compare changes by.

    .venv/bin/python bench/cpu_per_request.py [--seconds 10] [--runs 3] [--telemetry]

Starts bench/upstream.py and one gateway (`proxy.py serve`, config.yaml's plugin chain, a
temp SQLite store, a pro user with huge energy; the same set-up as bench.py's fast path),
then per run drives it with wrk at 32 connections for --seconds and reads the gateway's CPU time
(utime + stime from /proc/PID/stat) before and after. Throughput depends on how busy the
machine is; CPU per request much less so, which is why changes are compared by it.

With --telemetry a second gateway, the same but with every request traced to a local OTLP
collector (bench/collector.py), is driven in each run right after the first: its CPU per
request (the export thread's included) against the untraced one's is the cost of tracing.

With BENCH_STORE=postgres (bench/bench.py) the gateway runs on PostgreSQL, and the CPU of
the local server's processes is reported too, read the same way: the backends serving the
gateway's connections and the server's own processes (WAL writer, checkpointer, ...), not
the backends of other sessions (a test suite running meanwhile). A backend that ends
within a run takes its CPU with it: the store's pool keeps its connections open.
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

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds(clients: list[int]) -> float:
    """utime + stime of the local PostgreSQL's backends serving these processes' (pids)
    connections and of the server's own processes (WAL writer, checkpointer, ...): other
    sessions on the same server (a test suite, another bench) are left out."""
    ports = client_ports(clients)
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            if stat[stat.index("(") + 1:stat.rindex(")")] != "postgres":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().decode(errors="replace")  # "postgres: 15/main: user db 127.0.0.1(PORT) idle"
            if "[local]" in title:  # a backend of another session, on the Unix socket
                continue
            peer = title.rsplit("(", 1)[-1].split(")", 1)[0] if "(" in title else None
            if peer is not None and peer.isdigit() and int(peer) not in ports:  # another session's backend
                continue
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def client_ports(pids: list[int]) -> set[int]:
    """The local TCP ports of these processes' sockets (their ends of the database connections)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[9] in inodes:
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wrk_load(target: bench.Target, workdir: Path, seconds: float, connections: int) -> dict:
    """wrk for a fixed time (it cannot stop at a request count); the count comes back with the result."""
    headers = {"Content-Type": "application/json", **target.headers}
    script = workdir / "wrk-cpu.lua"
    script.write_text(f"""
wrk.method = "POST"
wrk.body = [==[{json.dumps(target.body)}]==]
{chr(10).join(f'wrk.headers["{k}"] = [==[{v}]==]' for k, v in headers.items())}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCHJSON {{"requests":%d,"duration_us":%d,"errors":%d}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout))
end
""")
    out = bench.run_child(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
                           "-s", str(script), target.url], timeout=seconds + 60)
    line = next(l for l in out.splitlines() if l.startswith("BENCHJSON "))
    return json.loads(line[len("BENCHJSON "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="per run (~20,000 requests at 2,000 req/s)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--telemetry", action="store_true",
                        help="also a gateway tracing every request to a local collector, each run")
    parser.add_argument("--py-spy", metavar="FILE", help="also record the first run with py-spy (raw format)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not on PATH")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-cpu-"))
    procs = bench.Processes(workdir)
    try:
        port = bench.free_port()
        upstream = f"http://127.0.0.1:{port}"
        up = procs.start("upstream", [bench.PYTHON, str(bench.BENCH_DIR / "upstream.py"), "--port", str(port)])
        bench.wait_http(upstream + "/health", up, 30, "upstream", procs, "upstream")
        base, key, pid = bench.start_gateway(procs, workdir, "fast", upstream, "auto")
        target = bench.Target("fast path", base + "/v1/chat/completions",
                              {"model": bench.GATEWAY_MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                               "max_tokens": 16},
                              {"Authorization": f"Bearer {key}"}, pid=pid)
        bench.smoke_check(target)
        wrk_load(target, workdir, 2, args.connections)  # warm-up: caches and lazily built paths
        traced = None
        if args.telemetry:
            collector_port = bench.free_port()
            coll = procs.start("collector", [bench.PYTHON, str(bench.BENCH_DIR / "collector.py"),
                                             "--port", str(collector_port)])
            bench.wait_http(f"http://127.0.0.1:{collector_port}/health", coll, 30, "collector", procs, "collector")
            t_base, t_key, t_pid = bench.start_gateway(procs, workdir, "traced", upstream, "auto",
                                                       collector=f"http://127.0.0.1:{collector_port}")
            traced = bench.Target("fast path +traces", t_base + "/v1/chat/completions", target.body,
                                  {"Authorization": f"Bearer {t_key}"}, pid=t_pid)
            bench.smoke_check(traced)
            wrk_load(traced, workdir, 2, args.connections)
        traced_per_request: list[float] = []
        per_request, pg_per_request = [], []
        on_postgres = os.environ.get("BENCH_STORE") == "postgres"
        for run in range(args.runs):
            time.sleep(1.5)  # let the accounting writer drain the warm-up
            spy = None
            if args.py_spy and run == 0:  # sampling costs the gateway CPU too: read that run's figure as inflated
                spy = procs.start("py-spy", [str(Path(bench.PYTHON).parent / "py-spy"), "record", "-p", str(pid),
                                             "-d", str(round(args.seconds)), "-r", "250", "-f", "raw",
                                             "-o", str(Path(args.py_spy).resolve())])
            before, pg_before = cpu_seconds(pid), postgres_cpu_seconds([pid])
            result = wrk_load(target, workdir, args.seconds, args.connections)
            time.sleep(1.5)  # the write-behind flush belongs to these requests
            if spy is not None:
                spy.wait(timeout=60)  # py-spy writes its file when its duration is over
            used = cpu_seconds(pid) - before  # idle CPU over the sleep is negligible
            pg_used = postgres_cpu_seconds([pid]) - pg_before
            us = used / result["requests"] * 1e6
            rps = result["requests"] / (result["duration_us"] / 1e6)
            per_request.append(us)
            pg = ""
            if on_postgres:
                pg_per_request.append(pg_used / result["requests"] * 1e6)
                pg = f", PostgreSQL CPU {pg_used:.2f}s = {pg_per_request[-1]:.1f} us/request"
            print(f"run {run + 1}: {result['requests']} requests, {result['errors']} errors, "
                  f"{rps:.0f} req/s, gateway CPU {used:.2f}s = {us:.1f} us/request{pg}", flush=True)
            if traced is not None:
                time.sleep(1.5)
                before = cpu_seconds(traced.pid)
                t_result = wrk_load(traced, workdir, args.seconds, args.connections)
                time.sleep(1.5)  # the export thread's last batches belong to these requests
                t_used = cpu_seconds(traced.pid) - before
                traced_per_request.append(t_used / t_result["requests"] * 1e6)
                t_rps = t_result["requests"] / (t_result["duration_us"] / 1e6)
                print(f"run {run + 1} traced: {t_result['requests']} requests, {t_result['errors']} errors, "
                      f"{t_rps:.0f} req/s ({t_rps / rps:.1%} of untraced), gateway CPU {t_used:.2f}s = "
                      f"{traced_per_request[-1]:.1f} us/request ({us / traced_per_request[-1]:.1%} of the "
                      f"untraced throughput per CPU)", flush=True)
        print(f"median: {statistics.median(per_request):.1f} us/request"
              + (f", PostgreSQL {statistics.median(pg_per_request):.1f} us/request" if on_postgres else ""))
        if traced_per_request:
            on, off = statistics.median(traced_per_request), statistics.median(per_request)
            print(f"median traced: {on:.1f} us/request: {off / on:.1%} of the untraced requests per CPU second")
    finally:
        procs.stop_all()
        bench.drop_pg_schemas()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
