"""Gateway CPU per request on the fast path: a repeatable number to compare changes by.

    .venv/bin/python bench/cpu_per_request.py [--seconds 10] [--runs 3]

Starts bench/upstream.py and one gateway (`proxy.py serve`, config.yaml's plugin chain, a
temp SQLite store, a pro user with huge energy; the same set-up as bench.py's fast path),
then per run drives it with wrk at 32 connections for --seconds and reads the gateway's CPU time
(utime + stime from /proc/PID/stat) before and after. Throughput depends on how busy the
machine is; CPU per request much less so, which is why changes are compared by it.

    .venv/bin/python bench/cpu_per_request.py --paths fast,anthropic,messages,responses \
        --against ../perf-old --seconds 5 --runs 5

--paths picks what is driven, each on the same gateway: `fast` (an OpenAI-wire model on the
native path), `anthropic` (a Claude model through /v1/chat/completions), `messages` (POST
/v1/messages from an Anthropic client, passed through) and `responses` (POST /v1/responses to
the OpenAI-wire model). --against DIR also starts a gateway from another source tree (a
worktree of the previous release: `git worktree add --detach DIR COMMIT`, with its .venv) on
the same upstream, and alternates the two per run and path (A, B, then B, A, ...): on a
shared machine only a comparison in one session, alternated, means anything. The medians
per path and tree, and their ratio, are printed at the end.

With --telemetry a third gateway, this tree with every request traced to a local OTLP
collector (bench/collector.py), is alternated with the others: its CPU per request (the
export thread's included) against the untraced one's is the cost of tracing.

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

CLOCK_TICKS = bench.CLOCK_TICKS


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


cpu_seconds, children_cpu_seconds = bench.cpu_seconds, bench.children_cpu_seconds


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


PATHS = ("fast", "anthropic", "messages", "responses")


def traced_dropped(target: bench.Target) -> str:
    """The traced gateway's dropped spans so far, by reason, from its /metrics."""
    import urllib.request

    base = target.url.split("/v1/", 1)[0]
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
            lines = resp.read().decode().splitlines()
    except OSError as exc:
        return f"? ({exc})"
    return ", ".join(line.split("{", 1)[1].replace('"}', "").replace('reason="', "")
                     for line in lines if line.startswith("gateway_trace_spans_dropped_total{")) or "none"


def targets(base: str, key: str, pid: int, label: str) -> dict[str, bench.Target]:
    """The paths on one gateway, by their --paths name."""
    chat = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
    bearer = {"Authorization": f"Bearer {key}"}
    return {
        "fast": bench.Target(f"{label} fast path", base + "/v1/chat/completions",
                             {"model": bench.GATEWAY_MODEL, **chat}, bearer, pid=pid),
        "anthropic": bench.Target(f"{label} anthropic via chat", base + "/v1/chat/completions",
                                  {"model": bench.ANTHROPIC_MODEL, **chat}, bearer, pid=pid),
        "messages": bench.Target(f"{label} messages", base + "/v1/messages", {"model": bench.ANTHROPIC_MODEL, **chat},
                                 {"x-api-key": key, "anthropic-version": "2023-06-01"}, pid=pid),
        "responses": bench.Target(f"{label} responses", base + "/v1/responses",
                                  {"model": bench.GATEWAY_MODEL, "input": "Say hello.", "max_output_tokens": 16},
                                  bearer, pid=pid),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="per run (~20,000 requests at 2,000 req/s)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--paths", default="fast", help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--against", metavar="DIR", help="another source tree (the previous release), alternated")
    parser.add_argument("--telemetry", action="store_true",
                        help="also this tree tracing every request to a local collector, alternated")
    parser.add_argument("--py-spy", metavar="FILE", help="also record the first run with py-spy (raw format)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not on PATH")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if unknown := [p for p in paths if p not in PATHS]:
        sys.exit(f"unknown path(s) {', '.join(unknown)}: pick from {', '.join(PATHS)}")
    trees = {"this": bench.ROOT}
    if args.against:
        trees = {"against": Path(args.against).resolve(), "this": bench.ROOT}
    workdir = Path(tempfile.mkdtemp(prefix="gateway-cpu-"))
    procs = bench.Processes(workdir)
    try:
        port = bench.free_port()
        upstream = f"http://127.0.0.1:{port}"
        up = procs.start("upstream", [bench.PYTHON, str(bench.BENCH_DIR / "upstream.py"), "--port", str(port)])
        bench.wait_http(upstream + "/health", up, 30, "upstream", procs, "upstream")
        gateways = {}
        for label, root in trees.items():
            base, key, pid = bench.start_gateway(procs, workdir, f"fast-{label}", upstream, "auto", root)
            gateways[label] = targets(base, key, pid, label)
        if args.telemetry:
            collector_port = bench.free_port()
            coll = procs.start("collector", [bench.PYTHON, str(bench.BENCH_DIR / "collector.py"),
                                             "--port", str(collector_port)])
            bench.wait_http(f"http://127.0.0.1:{collector_port}/health", coll, 30, "collector", procs, "collector")
            base, key, pid = bench.start_gateway(procs, workdir, "fast-traced", upstream, "auto",
                                                 collector=f"http://127.0.0.1:{collector_port}")
            gateways["traced"] = targets(base, key, pid, "traced")
        for label, by_path in gateways.items():
            for path in paths:
                bench.smoke_check(by_path[path])
                wrk_load(by_path[path], workdir, 2, args.connections)  # warm-up: caches and lazily built paths
        per_request: dict[tuple[str, str], list[float]] = {(l, p): [] for l in gateways for p in paths}
        # With --telemetry: the exporter process's and the collector's CPU per traced request.
        exporter_per_request: list[float] = []
        collector_per_request: list[float] = []
        throughput: dict[tuple[str, str], list[float]] = {(l, p): [] for l in gateways for p in paths}
        pg_per_request: dict[tuple[str, str], list[float]] = {(l, p): [] for l in gateways for p in paths}
        on_postgres = os.environ.get("BENCH_STORE") == "postgres"
        for run in range(args.runs):
            order = list(gateways) if run % 2 == 0 else list(reversed(gateways))  # A, B then B, A
            for path in paths:
                for label in order:
                    target = gateways[label][path]
                    pid = target.pid
                    time.sleep(1.5)  # let the accounting writer drain the previous load
                    spy = None
                    if args.py_spy and run == 0 and path == paths[0] and label == os.environ.get("BENCH_SPY_LABEL", "this"):
                        # sampling costs the gateway CPU too: read that run's figure as inflated
                        spy = procs.start("py-spy", [shutil.which("py-spy") or str(Path(bench.PYTHON).parent / "py-spy"), "record", "-p",
                                                     str(pid), "-d", str(round(args.seconds)), "-r", "250", "-f",
                                                     "raw", "-o", str(Path(args.py_spy).resolve())])
                    before, pg_before = cpu_seconds(pid), postgres_cpu_seconds([pid])
                    side_before = (children_cpu_seconds(pid), cpu_seconds(coll.pid)) if label == "traced" else None
                    result = wrk_load(target, workdir, args.seconds, args.connections)
                    time.sleep(1.5)  # the write-behind flush belongs to these requests
                    if spy is not None:
                        spy.wait(timeout=60)  # py-spy writes its file when its duration is over
                    used = cpu_seconds(pid) - before  # idle CPU over the sleep is negligible
                    pg_used = postgres_cpu_seconds([pid]) - pg_before
                    us = used / max(1, result["requests"]) * 1e6
                    rps = result["requests"] / (result["duration_us"] / 1e6)
                    per_request[label, path].append(us)
                    throughput[label, path].append(rps)
                    side = ""
                    if side_before is not None:
                        exporter = (children_cpu_seconds(pid) - side_before[0]) / max(1, result["requests"]) * 1e6
                        collector = (cpu_seconds(coll.pid) - side_before[1]) / max(1, result["requests"]) * 1e6
                        exporter_per_request.append(exporter)
                        collector_per_request.append(collector)
                        side = f", exporter process {exporter:.1f}, collector {collector:.1f} us/request"
                    pg = ""
                    if on_postgres:
                        pg_per_request[label, path].append(pg_used / max(1, result["requests"]) * 1e6)
                        pg = f", PostgreSQL CPU {pg_used:.2f}s = {pg_per_request[label, path][-1]:.1f} us/request"
                    print(f"run {run + 1} {target.name}: {result['requests']} requests, {result['errors']} errors, "
                          f"{rps:.0f} req/s, gateway CPU {used:.2f}s = {us:.1f} us/request{side}{pg}", flush=True)
        for path in paths:
            medians = {label: statistics.median(per_request[label, path]) for label in gateways}
            line = ", ".join(f"{label} {value:.1f}" for label, value in medians.items())
            if on_postgres:
                line += "; PostgreSQL " + ", ".join(
                    f"{label} {statistics.median(pg_per_request[label, path]):.1f}" for label in gateways)
            if "against" in medians:
                line += f"; this/against {medians['this'] / medians['against']:.3f}"
            if "traced" in medians:
                line += f"; traced/this {medians['traced'] / medians['this']:.3f}"
                if exporter_per_request:
                    line += (f"; exporter process {statistics.median(exporter_per_request):.1f}, "
                             f"collector {statistics.median(collector_per_request):.1f}")
                rps = {label: statistics.median(throughput[label, path]) for label in ("this", "traced")}
                line += (f"; req/s this {rps['this']:.0f}, traced {rps['traced']:.0f} "
                         f"({rps['traced'] / rps['this']:.1%}); spans dropped {traced_dropped(gateways['traced'][path])}")
            print(f"median {path} ({args.runs} runs): {line} us/request")
    finally:
        procs.stop_all()
        bench.drop_pg_schemas()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
