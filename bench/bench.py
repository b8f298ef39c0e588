"""Gateway benchmark: throughput, latency, streaming and memory, each next to a baseline.

    make bench                       # full run (~3-4 minutes)
    BENCH_QUICK=1 make bench         # or `bench.py --quick`: shorter runs, 10,000 RSS requests

Everything runs on this machine in separate processes: a fake upstream (bench/upstream.py),
two gateways (`proxy.py serve`, the default plugin chain, a temp SQLite store) and the load
generator (`wrk` when on PATH, else bench/load.py). The targets compared:

    direct        the fake upstream itself: the baseline every latency is read against
    bare proxy    bench/passthrough.py, a 40-line aiohttp pass-through: the throughput and first-byte floor
    litellm-only  gateway, OpenAI-wire model with `dispatch: litellm`
    fast path     gateway, same model with `dispatch: auto` (native pass-through)
    anthropic     gateway, anthropic/claude-haiku-4-5 on the native Anthropic path (upstream speaks /v1/messages)
    messages      gateway, POST /v1/messages (an Anthropic client) to that model: passed through

The machine is shared and noisy, so the direct baseline is measured twice (first and last)
and every gateway figure is reported as a ratio or a delta against it.

Environment:
    BENCH_SECONDS=10         measured seconds per load phase (quick: 3)
    BENCH_RSS_REQUESTS=N     requests between the two RSS readings (default 100000; quick 10000)
    BENCH_RSS_MAX_SECONDS    cap on that phase (default 600; quick 120): fewer requests are reported
    BENCH_QUICK=1            same as --quick
    BENCH_LOADGEN=auto       auto | python | wrk (auto: wrk if on PATH)
    BENCH_STREAMS=20         streamed requests per target; BENCH_CHUNKS=10, BENCH_CHUNK_DELAY_MS=20
    BENCH_PLUGINS=a,b        run the gateways with only these plugins of config.yaml's chain (ablation)
    BENCH_TELEMETRY=0        same as --no-telemetry: skip the traced fast path. By default a third
                             gateway, the fast path with OpenTelemetry traces on (every request
                             sampled) to a local collector (bench/collector.py), is alternated with
                             the untraced one BENCH_TRACE_PAIRS times (default 8, quick 4; A B, B A,
                             ...), BENCH_TRACE_SECONDS each (default 5, quick 3): "fast path +traces",
                             its req/s (the median of the pairs' ratios) and CPU per request (the
                             exporter process's included) against the untraced fast path's, same run.
                             Twice with 2+ CPUs: judged with both gateways pinned to the first CPU and
                             the load generator, fake upstream and collector (other machines in
                             production) on the others, where the exporter process follows; then
                             shown with every process on every CPU (half the pairs)
    BENCH_TRACE_PIN=0        only the second: every process on every CPU, judged
    BENCH_STORE=sqlite       sqlite | postgres: the gateways' store (postgres: a fresh schema per
                             gateway in BENCH_PG_URL, default postgresql://postgres@127.0.0.1:5432/test,
                             dropped at the end)
Results: a table on stdout and bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PYTHON = sys.executable
RESULTS_FILE = BENCH_DIR / "results.json"

GATEWAY_MODEL = "bench-gpt"
ANTHROPIC_MODEL = "bench-claude"
HUGE_ENERGY = 10**12


def default_plugins() -> list[Any]:
    """config.yaml's plugin chain, as it is (order included): the bench follows the default."""
    import yaml

    return yaml.safe_load((ROOT / "config.yaml").read_text())["plugins"]


TARGETS = {  # the pass/fail column
    "fast_rps_min": 2500.0,
    "fast_rps_ratio_min": 0.45,
    "anthropic_rps_ratio_min": 0.50,  # of the fast path's req/s @32
    "anthropic_added_p50_ms_max": 0.3,  # over the fast path's p50 @1
    "messages_rps_ratio_min": 0.80,  # /v1/messages -> Anthropic, of the fast path's
    "native_rss_mib_max": 150.0,  # a gateway whose models are all native (no litellm import)
    "added_p50_ms_max": 0.5,
    "first_byte_delta_ms_max": 1.0,
    "rss_growth_pct_max": 10.0,
    "traced_rps_ratio_min": 0.85,  # the fast path with every request traced, of the untraced one's req/s
}


@dataclass
class Settings:
    quick: bool
    seconds: float
    warmup: float
    rss_requests: int
    loadgen: str
    streams: int
    chunks: int
    chunk_delay_ms: float
    rss_max_seconds: float = 600.0
    connections: int = 32
    telemetry: bool = True
    trace_pairs: int = 6
    trace_seconds: float = 5.0

    @classmethod
    def from_env(cls, args: argparse.Namespace) -> "Settings":
        quick = args.quick or os.environ.get("BENCH_QUICK", "") not in ("", "0")
        loadgen = args.loadgen or os.environ.get("BENCH_LOADGEN", "auto")
        if loadgen == "auto":
            loadgen = "wrk" if shutil.which("wrk") else "python"
        elif loadgen == "wrk" and not shutil.which("wrk"):
            sys.exit("BENCH_LOADGEN=wrk but wrk is not on PATH")
        return cls(
            quick=quick,
            seconds=float(os.environ.get("BENCH_SECONDS", 3 if quick else 10)),
            warmup=1.0 if quick else 2.0,
            rss_requests=int(os.environ.get("BENCH_RSS_REQUESTS", 10_000 if quick else 100_000)),
            loadgen=loadgen,
            streams=int(os.environ.get("BENCH_STREAMS", 10 if quick else 20)),
            chunks=int(os.environ.get("BENCH_CHUNKS", 10)),
            chunk_delay_ms=float(os.environ.get("BENCH_CHUNK_DELAY_MS", 20)),
            rss_max_seconds=float(os.environ.get("BENCH_RSS_MAX_SECONDS", 120 if quick else 600)),
            telemetry=not args.no_telemetry and os.environ.get("BENCH_TELEMETRY", "1") not in ("", "0"),
            trace_pairs=int(os.environ.get("BENCH_TRACE_PAIRS", 4 if quick else 8)),
            trace_seconds=float(os.environ.get("BENCH_TRACE_SECONDS", 3 if quick else 5)),
        )


# --------------------------------------------------------------------------------------
# Processes: every child is in its own process group and is killed on the way out
# --------------------------------------------------------------------------------------

class Processes:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.children: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], root: Path = ROOT) -> subprocess.Popen:
        out = open(self.workdir / f"{name}.out", "wb")
        err = open(self.workdir / f"{name}.err", "wb")
        proc = subprocess.Popen(argv, cwd=root, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=child_env())
        out.close()
        err.close()
        self.children.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        self.children.clear()

    def log_tail(self, name: str, lines: int = 20) -> str:
        chunks = []
        for suffix in ("err", "out"):
            path = self.workdir / f"{name}.{suffix}"
            if path.exists():
                chunks.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(chunks)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env.pop("GATEWAY_MASTER_KEY", None)
    return env


def run_child(argv: list[str], timeout: float, root: Path = ROOT) -> str:
    """A short-lived child (CLI, load generator), bounded in time; its stdout."""
    proc = subprocess.Popen(argv, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True, env=child_env())
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # timeout, Ctrl-C: never leave it running
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {proc.returncode}:\n{err.decode(errors='replace')[-2000:]}")
    return out.decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str, procs: Processes, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} during start-up:\n{procs.log_tail(name)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s:\n{procs.log_tail(name)}")


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


# --------------------------------------------------------------------------------------
# Set-up: upstream and gateways
# --------------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    url: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    pid: int | None = None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def child_pids(pid: int) -> list[int]:
    """The process's children (the trace exporter process of a traced gateway)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found += [int(p) for p in fh.read().split()]
    except OSError:
        pass
    return found


def children_cpu_seconds(pid: int) -> float:
    """utime + stime of the process's live children (a child that ends takes its CPU with it)."""
    total = 0.0
    for child in child_pids(pid):
        try:
            total += cpu_seconds(child)
        except OSError:
            continue
    return total


PG_SCHEMAS: list[str] = []  # made by store_url, dropped by drop_pg_schemas


def store_url(workdir: Path, variant: str) -> str:
    if os.environ.get("BENCH_STORE", "sqlite") != "postgres":
        return "sqlite:///" + str(workdir / f"{variant}.db")
    schema = f"bench_{variant}_{os.getpid()}_{len(PG_SCHEMAS)}".replace("-", "_")  # fast-this: not a schema name
    PG_SCHEMAS.append(schema)
    return f"{os.environ.get('BENCH_PG_URL', 'postgresql://postgres@127.0.0.1:5432/test')}?schema={schema}"


def drop_pg_schemas() -> None:
    if not PG_SCHEMAS:
        return
    import asyncio

    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"))
        try:
            for schema in PG_SCHEMAS:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())
    PG_SCHEMAS.clear()


def gateway_config(workdir: Path, variant: str, upstream: str, dispatch: str,
                   collector: str | None = None) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": 8080, "shutdown_grace": 2, "workers": 1},
        "store": {"url": store_url(workdir, variant)},
        "auth": {"default_tier": "pro"},
        "models": [
            {"name": GATEWAY_MODEL, "dispatch": dispatch,
             "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": upstream + "/v1",
                                "api_key": "sk-bench-upstream", "timeout": 30}},
            {"name": ANTHROPIC_MODEL,
             "litellm_params": {"model": "anthropic/claude-haiku-4-5", "api_base": upstream,
                                "api_key": "sk-ant-bench-upstream", "timeout": 30}},
        ],
        "tiers": {"pro": {"models": ["*"], "refill": {"amount": 1000, "period": "1d"}}},  # no rate limits
        "energy": {"default_action": "ai_message", "unknown_action": "reject",
                   "actions": {"ai_message": {"default": 1}}},
        "plugins": default_plugins(),
    }
    if os.environ.get("BENCH_PLUGINS"):  # ablation: e.g. BENCH_PLUGINS=auth,energy (comma-separated names)
        config["plugins"] = [p for p in config["plugins"]
                             if (p if isinstance(p, str) else p["name"]) in os.environ["BENCH_PLUGINS"].split(",")]
        config["server"]["allow_unauthenticated"] = True  # a partial chain on 127.0.0.1, stated (docs/operations.md)
    if collector is not None:  # every request traced, exported to the local collector
        config["telemetry"] = {"otlp_endpoint": collector, "sample_ratio": 1.0}
    path = workdir / f"{variant}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def start_gateway(procs: Processes, workdir: Path, variant: str, upstream: str, dispatch: str,
                  root: Path = ROOT, collector: str | None = None) -> tuple[str, str, int]:
    """Workspace + pro user via the CLI, then `proxy.py serve`; (base url, api key, pid). `root`: the
    source tree whose proxy.py runs (another release's worktree, to compare against); `collector`:
    an OTLP endpoint every request is traced to."""
    config = str(gateway_config(workdir, variant, upstream, dispatch, collector))
    run_child([PYTHON, "proxy.py", "workspaces", "create", "bench", "--json", "--config", config], timeout=120,
              root=root)
    api_key = create_user(config, root)
    base, pid = serve(procs, config, f"gateway-{variant}", root)
    return base, api_key, pid


def create_user(config: str, root: Path = ROOT) -> str:
    """A pro user with huge energy in the bench workspace, via the CLI; its API key."""
    created = json.loads(run_child([PYTHON, "proxy.py", "users", "create", "--workspace", "bench", "--tier", "pro",
                                    "--energy", str(HUGE_ENERGY), "--json", "--config", config], timeout=120,
                                   root=root))
    return created["api_key"]


def serve(procs: Processes, config: str, name: str, root: Path = ROOT) -> tuple[str, int]:
    """`proxy.py serve` on a free port, once ready; (base url, pid)."""
    port = free_port()
    proc = procs.start(name, [PYTHON, "proxy.py", "serve", "--config", config, "--port", str(port)], root)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health/ready", proc, 120, name, procs, name)
    return base, proc.pid


def smoke_check(target: Target) -> None:
    """One request before any load: a misconfigured target must fail loudly, not bench 401s."""
    request = urllib.request.Request(target.url, data=json.dumps(target.body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **target.headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            payload = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{target.name}: smoke request failed: HTTP {exc.code} {exc.read()[:500]!r}") from None
    if not payload.get("choices") and not payload.get("content") and not payload.get("output"):
        # OpenAI's chat answer, Anthropic's message or a Responses answer
        raise RuntimeError(f"{target.name}: smoke request returned no answer: {payload}")


# --------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------

def python_load(target: Target, connections: int, seconds: float, warmup: float, requests: int = 0) -> dict:
    argv = [PYTHON, str(BENCH_DIR / "load.py"), "load", "--url", target.url, "--body", json.dumps(target.body),
            "-c", str(connections), "--duration", str(seconds), "--warmup", str(warmup)]
    if requests:
        argv += ["--requests", str(requests)]
    for name, value in target.headers.items():
        argv += ["--header", f"{name}: {value}"]
    timeout = warmup + seconds + 60
    return json.loads(run_child(argv, timeout=timeout))


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def wrk_load(target: Target, connections: int, seconds: float, warmup: float, workdir: Path,
             threads: int = 1, lua: str = "") -> dict:
    """wrk at `connections` (split over `threads`); `lua` is added to the script (e.g. a
    setup() that sends each thread somewhere else, as bench/multiprocess.py does)."""
    headers = {"Content-Type": "application/json", **target.headers}
    script = workdir / f"wrk-{target.name}.lua"
    script.write_text(WRK_SCRIPT.format(
        body=json.dumps(target.body),
        headers="\n".join(f'wrk.headers["{k}"] = [==[{v}]==]' for k, v in headers.items())) + lua)
    base = ["wrk", f"-t{threads}", f"-c{connections}", "--timeout", "30s", "-s", str(script)]
    if warmup > 0:
        run_child(base + [f"-d{max(1, round(warmup))}s", target.url], timeout=warmup + 60)
    out = run_child(base + [f"-d{max(1, round(seconds))}s", target.url], timeout=seconds + 60)
    line = next(l for l in out.splitlines() if l.startswith("BENCHJSON "))
    raw = json.loads(line[len("BENCHJSON "):])
    elapsed = raw["duration_us"] / 1e6
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    ms = lambda us: round(us / 1000, 3)  # noqa: E731
    return {"generator": "wrk", "connections": connections, "duration_s": round(elapsed, 3),
            "requests": raw["requests"], "rps": round(raw["requests"] / elapsed, 1), "errors": errors,
            "non_200": raw["status"], "p50_ms": ms(raw["p50_us"]), "p90_ms": ms(raw["p90_us"]),
            "p99_ms": ms(raw["p99_us"]), "max_ms": ms(raw["max_us"]), "mean_ms": ms(raw["mean_us"])}


def measure_load(settings: Settings, target: Target, connections: int, workdir: Path) -> dict:
    if settings.loadgen == "wrk":
        return wrk_load(target, connections, settings.seconds, settings.warmup, workdir)
    return python_load(target, connections, settings.seconds, settings.warmup)


def measure_stream(settings: Settings, target: Target) -> dict:
    body = {**target.body, "stream": True, "stream_options": {"include_usage": True}}
    argv = [PYTHON, str(BENCH_DIR / "load.py"), "stream", "--url", target.url, "--body", json.dumps(body),
            "--streams", str(settings.streams)]
    for name, value in target.headers.items():
        argv += ["--header", f"{name}: {value}"]
    per_stream = settings.chunks * settings.chunk_delay_ms / 1000 + 1
    raw = json.loads(run_child(argv, timeout=60 + (settings.streams + 3) * per_stream))
    streams = raw["streams"]
    failed = [s for s in streams if s["status"] != 200 or s["error"] or not any(s["content"])]
    ok = [s for s in streams if s not in failed]
    first_bytes = [s["arrivals_ms"][0] for s in ok]
    gaps: list[float] = []
    batched_streams = 0
    content_chunks = []
    for s in ok:
        times = [t for t, has in zip(s["arrivals_ms"], s["content"]) if has]
        content_chunks.append(len(times))
        stream_gaps = [b - a for a, b in zip(times, times[1:])]
        gaps.extend(stream_gaps)
        # Batched: a content chunk arrived with its predecessor instead of a delay later.
        if any(g < settings.chunk_delay_ms / 2 for g in stream_gaps) or len(times) < settings.chunks:
            batched_streams += 1
    return {
        "streams": len(streams), "failed": len(failed),
        "first_byte_p50_ms": round(statistics.median(first_bytes), 3) if first_bytes else None,
        "first_byte_min_ms": round(min(first_bytes), 3) if first_bytes else None,
        "content_chunks_min": min(content_chunks) if content_chunks else 0,
        "gap_min_ms": round(min(gaps), 3) if gaps else None,
        "gap_p50_ms": round(statistics.median(gaps), 3) if gaps else None,
        "gap_max_ms": round(max(gaps), 3) if gaps else None,
        "batched_streams": batched_streams,
        "batched": batched_streams > 0 or bool(failed),
    }


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def verdicts(results: dict) -> list[dict]:
    rows = results["targets"]
    fast = rows["fast path"]
    out = []

    def check(name: str, measured: str, target: str, ok: bool | None) -> None:
        out.append({"check": name, "measured": measured, "target": target,
                    "result": "n/a" if ok is None else ("PASS" if ok else "FAIL")})

    # Issue 5 reads the ratio against a bare aiohttp pass-through (the Python floor), not
    # against the upstream itself; both ratios are in the table.
    rps, ratio = fast["rps_32"], fast.get("ratio_vs_bare")
    check("fast path throughput @32", f"{fmt(rps)} req/s, {fmt(ratio and ratio * 100)}% of bare pass-through",
          f">= {TARGETS['fast_rps_min']:.0f} req/s and >= {TARGETS['fast_rps_ratio_min']:.0%}",
          rps is not None and ratio is not None and rps >= TARGETS["fast_rps_min"]
          and ratio >= TARGETS["fast_rps_ratio_min"])
    added = fast.get("added_p50_ms")
    check("fast path added p50 @1", f"{fmt(added, '.3f')} ms", f"<= {TARGETS['added_p50_ms_max']} ms",
          added is not None and added <= TARGETS["added_p50_ms_max"])
    delta = fast.get("stream_first_byte_delta_ms")
    floor = rows.get("bare proxy", {}).get("stream_first_byte_delta_ms")
    check("fast path stream first byte", f"+{fmt(delta, '.3f')} ms vs upstream (bare pass-through +{fmt(floor, '.3f')})",
          f"<= {TARGETS['first_byte_delta_ms_max']} ms", delta is not None and delta <= TARGETS["first_byte_delta_ms_max"])
    batched = [name for name, row in rows.items() if row.get("stream_batched")]
    measured_streams = [name for name, row in rows.items() if row.get("stream_batched") is not None]
    check("chunks never batched", "batched: " + (", ".join(batched) or "none") + f" (of {', '.join(measured_streams)})",
          "none", not batched)
    fast_rps = fast.get("rps_32")
    for name, key in (("anthropic", "anthropic_rps_ratio_min"), ("messages", "messages_rps_ratio_min")):
        row = rows.get(name, {})
        share = row["rps_32"] / fast_rps if fast_rps and row.get("rps_32") else None
        added_p50 = (row["p50_1_ms"] - fast["p50_1_ms"]) if row.get("p50_1_ms") is not None and \
            fast.get("p50_1_ms") is not None else None
        check(f"{name} throughput @32", f"{fmt(row.get('rps_32'))} req/s, {fmt(share and share * 100)}% of the fast "
              f"path (p50 @1 {'+' if (added_p50 or 0) >= 0 else ''}{fmt(added_p50, '.3f')} ms over it)",
              f">= {TARGETS[key]:.0%}" + (f", p50 within {TARGETS['anthropic_added_p50_ms_max']} ms"
                                          if name == "anthropic" else ""),
              share is not None and share >= TARGETS[key] and (
                  name != "anthropic" or (added_p50 is not None and added_p50 <= TARGETS["anthropic_added_p50_ms_max"])))
    traced = rows.get("fast path +traces")
    if traced is not None:
        share = traced.get("ratio_vs_fast")
        spans = (traced.get("collector") or {}).get("spans")
        cpu = traced.get("gateway_cpu_us") or {}
        pinned = traced.get("layout") == "pinned"
        check("fast path with every request traced @32" + (", gateways on a CPU of their own" if pinned else ""),
              f"{fmt(share and share * 100)}% (the median of {len(traced.get('pair_ratios') or [])} alternated pairs: "
              f"{', '.join(f'{r:.0%}' for r in traced.get('pair_ratios') or [])}; medians "
              f"{fmt(traced.get('traced_rps_32'))} vs {fmt(traced.get('fast_rps_32'))} req/s untraced = "
              f"{fmt((traced.get('ratio_of_medians') or 0) * 100)}%); CPU/request: gateway "
              f"{fmt(cpu.get('traced'))} vs {fmt(cpu.get('fast'))} us = {fmt(traced.get('cpu_ratio_gateway'), '.2f')}x, "
              f"+ exporter process {fmt(traced.get('exporter_cpu_us'))} us = "
              f"{fmt(traced.get('cpu_ratio_with_exporter'), '.2f')}x; spans dropped {fmt(traced.get('dropped'), '.0f')} "
              f"({fmt(spans, 'd')} at the collector over the whole run, {fmt(traced.get('dropped_total'), '.0f')} dropped)",
              f">= {TARGETS['traced_rps_ratio_min']:.0%}, none dropped",
              share is not None and share >= TARGETS["traced_rps_ratio_min"] and traced.get("dropped") == 0)
        shared = traced.get("shared")
        if shared:  # the same alternation with every process on every CPU: shown, not judged
            scpu = shared.get("gateway_cpu_us") or {}
            check("  the same, every process on every CPU",
                  f"{fmt((shared.get('ratio_vs_fast') or 0) * 100)}% (pairs: "
                  f"{', '.join(f'{r:.0%}' for r in shared.get('pair_ratios') or [])}; medians "
                  f"{fmt(shared.get('traced_rps_32'))} vs {fmt(shared.get('fast_rps_32'))} req/s); CPU/request: "
                  f"gateway {fmt(scpu.get('traced'))} vs {fmt(scpu.get('fast'))} us, + exporter process "
                  f"{fmt(shared.get('exporter_cpu_us'))} us = {fmt(shared.get('cpu_ratio_with_exporter'), '.2f')}x; "
                  f"spans dropped {fmt(shared.get('dropped'), '.0f')}",
                  "(shown)", None)
    rss = results.get("rss", {})
    after_mib = rss.get("after_kib", 0) / 1024 if rss.get("after_kib") else None
    check("all-native gateway RSS", f"{fmt(after_mib, '.1f')} MiB after {rss.get('requests', 0):,} requests",
          f"<= {TARGETS['native_rss_mib_max']:.0f} MiB", after_mib is not None and after_mib <= TARGETS["native_rss_mib_max"])
    growth = rss.get("growth_pct")
    check("fast path RSS growth", f"{fmt(growth, '.1f')}% over {rss.get('requests', 0):,} requests "
          f"({fmt(rss.get('before_kib', 0) / 1024, '.1f')} -> {fmt(rss.get('after_kib', 0) / 1024, '.1f')} MiB)",
          f"< {TARGETS['rss_growth_pct_max']:.0f}%", growth is not None and growth < TARGETS["rss_growth_pct_max"])
    return out


def cpu_layout() -> tuple[set[int], set[int]] | None:
    """(the gateways' CPU, the others) for the traces comparison, or None with fewer than two
    CPUs or BENCH_TRACE_PIN=0."""
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2 or os.environ.get("BENCH_TRACE_PIN", "1") in ("", "0"):
        return None
    first = min(cpus)
    return {first}, cpus - {first}


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` on `cpus` (threads it starts later inherit it)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that just ended
            pass


def spans_dropped(base: str) -> float:
    """gateway_trace_spans_dropped_total (every reason) from a traced gateway's /metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        return sum(float(line.rsplit(" ", 1)[1]) for line in resp.read().decode().splitlines()
                   if line.startswith("gateway_trace_spans_dropped_total"))


def trace_comparison(settings: Settings, fast: Target, traced: Target, info: dict, workdir: Path,
                     layout: tuple[set[int], set[int]] | None = None) -> dict:
    """The untraced and the traced fast path alternated `trace_pairs` times (A B, B A, ...) at
    32 connections, each run's req/s and CPU per request read from /proc: the gateway's, the
    traced one's exporter process's (gateway/trace_export.py) and the collector's. On a shared
    machine only such an alternation, in one run, says what tracing costs.

    `layout` (gateway CPUs, the others): both gateways pinned to the first, as a gateway
    deployed on cores of its own; the load generator, the fake upstream and the collector,
    which in production are other machines, to the others, where the traced gateway's exporter
    process moves too (it runs on the CPUs its gateway is not pinned to). Without it
    everything shares every CPU."""
    everywhere = os.sched_getaffinity(0)
    if layout is not None:
        for pid in (fast.pid, traced.pid):
            pin(pid, layout[0])  # type: ignore[arg-type]
        for pid in (info["upstream_pid"], info["collector_pid"]):
            pin(pid, layout[1])
        os.sched_setaffinity(0, layout[1])  # this process: the load generators it starts
    try:
        dropped = spans_dropped(info["base"])
        out = _trace_comparison(settings, fast, traced, info, workdir)
        out["dropped"] = spans_dropped(info["base"]) - dropped
        return out
    finally:
        if layout is not None:
            for pid in (fast.pid, traced.pid, info["upstream_pid"], info["collector_pid"]):
                pin(pid, everywhere)  # type: ignore[arg-type]
            os.sched_setaffinity(0, everywhere)


def _trace_comparison(settings: Settings, fast: Target, traced: Target, info: dict, workdir: Path) -> dict:
    runs: dict[str, list[dict]] = {"fast": [], "traced": []}
    # Short runs, many pairs: the machine's weather changes within minutes. No warm-up per run:
    # the CPU read covers the measured requests only.
    quiet = Settings(**{**settings.__dict__, "warmup": 0.0, "seconds": settings.trace_seconds})
    for target in (fast, traced):
        measure_load(Settings(**{**settings.__dict__, "seconds": settings.warmup, "warmup": 0.0}), target,
                     settings.connections, workdir)
    for pair in range(settings.trace_pairs):
        order = [("fast", fast), ("traced", traced)]
        for label, target in (order if pair % 2 == 0 else order[::-1]):
            log(f"{target.name} (traces comparison {pair + 1}/{settings.trace_pairs}): "
                f"{settings.connections} connections, {settings.trace_seconds:.0f}s")
            assert target.pid is not None
            before = (cpu_seconds(target.pid), children_cpu_seconds(target.pid), cpu_seconds(info["collector_pid"]))
            many = measure_load(quiet, target, settings.connections, workdir)
            time.sleep(1.5)  # the exporter's last batch of this run (export every second)
            after = (cpu_seconds(target.pid), children_cpu_seconds(target.pid), cpu_seconds(info["collector_pid"]))
            count = max(1, many.get("requests") or round(many["rps"] * many["duration_s"]))
            runs[label].append({"rps": many["rps"], "errors": many["errors"],
                                "gateway_us": round((after[0] - before[0]) / count * 1e6, 1),
                                "exporter_us": round((after[1] - before[1]) / count * 1e6, 1),
                                "collector_us": round((after[2] - before[2]) / count * 1e6, 1) if label == "traced" else 0.0})
    med = lambda label, key: statistics.median(r[key] for r in runs[label])  # noqa: E731
    fast_rps, traced_rps = med("fast", "rps"), med("traced", "rps")
    pair_ratios = [round(t["rps"] / f["rps"], 3) for f, t in zip(runs["fast"], runs["traced"]) if f["rps"]]
    fast_cpu = med("fast", "gateway_us")
    traced_cpu = med("traced", "gateway_us")
    return {"comparison": runs, "fast_rps_32": fast_rps, "traced_rps_32": traced_rps,
            # Each pair ran back to back: the median of their ratios is the least disturbed by drift.
            "ratio_vs_fast": statistics.median(pair_ratios) if pair_ratios else None,
            "ratio_of_medians": round(traced_rps / fast_rps, 3) if fast_rps else None, "pair_ratios": pair_ratios,
            "gateway_cpu_us": {"fast": fast_cpu, "traced": traced_cpu},
            "cpu_ratio_gateway": round(traced_cpu / fast_cpu, 3) if fast_cpu else None,
            "exporter_cpu_us": med("traced", "exporter_us"), "collector_cpu_us": med("traced", "collector_us"),
            "cpu_ratio_with_exporter": round((traced_cpu + med("traced", "exporter_us")) / fast_cpu, 3)
            if fast_cpu else None}


def print_report(results: dict) -> None:
    s = results["settings"]
    print()
    print(f"gateway benchmark  (load generator: {s['loadgen']}, {s['seconds']:.0f}s per phase, "
          f"{s['connections']} conns; {os.cpu_count()} CPUs; load average {results['loadavg_start']} -> "
          f"{results['loadavg_end']})")
    header = ["target", "req/s @32", "errors", "vs direct", "vs bare", "p50 @1", "p99 @1", "added p50",
              "stream 1st byte", "delta 1st byte", "chunk gap p50/min", "batched"]
    table = []
    for name, row in results["targets"].items():
        table.append([
            name, fmt(row.get("rps_32")), fmt(row.get("errors"), "d"),
            fmt(row.get("ratio_vs_direct") and row["ratio_vs_direct"] * 100, ".1f") + "%" if name != "direct" else "100%",
            (fmt(row["ratio_vs_bare"] * 100, ".1f") + "%") if row.get("ratio_vs_bare") else
            ("100%" if name == "bare proxy" else "-"),
            fmt(row.get("p50_1_ms"), ".3f") + " ms", fmt(row.get("p99_1_ms"), ".3f") + " ms",
            ("+" + fmt(row.get("added_p50_ms"), ".3f") + " ms") if name != "direct" else "baseline",
            fmt(row.get("stream_first_byte_ms"), ".3f") + (" ms" if row.get("stream_first_byte_ms") is not None else ""),
            ("+" + fmt(row.get("stream_first_byte_delta_ms"), ".3f") + " ms") if name not in ("direct",) and
            row.get("stream_first_byte_delta_ms") is not None else ("baseline" if name == "direct" else "-"),
            (fmt(row.get("stream_gap_p50_ms"), ".1f") + "/" + fmt(row.get("stream_gap_min_ms"), ".1f") + " ms")
            if row.get("stream_gap_p50_ms") is not None else "-",
            ("yes" if row.get("stream_batched") else "no") if row.get("stream_batched") is not None else "-",
        ])
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    d = results["direct_runs"]
    print(f"\ndirect baseline drift: {fmt(d['rps_32'][0])} -> {fmt(d['rps_32'][1])} req/s @32, "
          f"p50 {fmt(d['p50_1_ms'][0], '.3f')} -> {fmt(d['p50_1_ms'][1], '.3f')} ms @1 (first and last phase; "
          f"mean used as the baseline)")
    fast, lit = results["targets"]["fast path"], results["targets"]["litellm-only"]
    if fast.get("rps_32") and lit.get("rps_32"):
        print(f"fast path vs litellm-only: {fast['rps_32'] / lit['rps_32']:.2f}x throughput, "
              f"p50 @1 {fmt(fast.get('p50_1_ms'), '.3f')} vs {fmt(lit.get('p50_1_ms'), '.3f')} ms")
    print(f"stream: upstream sends {s['chunks']} chunks {s['chunk_delay_ms']:.0f} ms apart; "
          f"'batched' = a content chunk arrived < {s['chunk_delay_ms'] / 2:.0f} ms after the previous one")
    print()
    checks = results["checks"]
    widths = [max(len(k), *(len(c[k]) for c in checks)) for k in ("check", "measured", "target", "result")]
    for c in [{"check": "check", "measured": "measured", "target": "target", "result": "result"}] + checks:
        print("  ".join(c[k].ljust(w) for k, w in zip(("check", "measured", "target", "result"), widths)))
    print(f"\nwritten to {RESULTS_FILE.relative_to(ROOT)}")


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(settings: Settings, workdir: Path, procs: Processes) -> dict:
    loadavg_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    upstream_port = free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    log(f"starting the fake upstream on :{upstream_port}; work dir {workdir}")
    up = procs.start("upstream", [PYTHON, str(BENCH_DIR / "upstream.py"), "--port", str(upstream_port),
                                  "--chunks", str(settings.chunks), "--chunk-delay-ms", str(settings.chunk_delay_ms)])
    wait_http(upstream_url + "/health", up, 30, "upstream", procs, "upstream")

    log("starting gateways (litellm-only, fast path)")
    lit_base, lit_key, lit_pid = start_gateway(procs, workdir, "litellm", upstream_url, "litellm")
    fast_base, fast_key, fast_pid = start_gateway(procs, workdir, "fast", upstream_url, "auto")

    traced: dict[str, Any] = {}
    if settings.telemetry:
        collector_url = f"http://127.0.0.1:{free_port()}"
        log(f"starting the OTLP collector on {collector_url} and the traced fast path")
        coll = procs.start("collector", [PYTHON, str(BENCH_DIR / "collector.py"), "--port", collector_url.rsplit(":", 1)[1]])
        wait_http(collector_url + "/health", coll, 30, "collector", procs, "collector")
        traced_base, traced_key, traced_pid = start_gateway(procs, workdir, "traced", upstream_url, "auto",
                                                            collector=collector_url)
        traced.update(collector=collector_url, base=traced_base, pid=traced_pid, collector_pid=coll.pid,
                      upstream_pid=up.pid)

    bare_port = free_port()
    bare = procs.start("bare pass-through", [PYTHON, str(BENCH_DIR / "passthrough.py"), "--port", str(bare_port),
                                             "--upstream", upstream_url])
    wait_http(f"http://127.0.0.1:{bare_port}/health", bare, 30, "bare pass-through", procs, "bare pass-through")

    message = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
    targets = {
        "bare proxy": Target("bare proxy", f"http://127.0.0.1:{bare_port}/v1/chat/completions",
                             {"model": "gpt-4o-mini", **message}, pid=bare.pid),
        "direct": Target("direct", upstream_url + "/v1/chat/completions", {"model": "gpt-4o-mini", **message},
                         pid=up.pid),
        "litellm-only": Target("litellm-only", lit_base + "/v1/chat/completions", {"model": GATEWAY_MODEL, **message},
                               {"Authorization": f"Bearer {lit_key}"}, pid=lit_pid),
        "fast path": Target("fast path", fast_base + "/v1/chat/completions", {"model": GATEWAY_MODEL, **message},
                            {"Authorization": f"Bearer {fast_key}"}, pid=fast_pid),
        "anthropic": Target("anthropic", fast_base + "/v1/chat/completions", {"model": ANTHROPIC_MODEL, **message},
                            {"Authorization": f"Bearer {fast_key}"}, pid=fast_pid),
        "messages": Target("messages", fast_base + "/v1/messages", {"model": ANTHROPIC_MODEL, **message},
                           {"x-api-key": fast_key, "anthropic-version": "2023-06-01"}, pid=fast_pid),
    }
    if settings.telemetry:
        targets["fast path +traces"] = Target("fast path +traces", traced["base"] + "/v1/chat/completions",
                                              {"model": GATEWAY_MODEL, **message},
                                              {"Authorization": f"Bearer {traced_key}"}, pid=traced["pid"])
    for target in targets.values():
        smoke_check(target)

    rows: dict[str, dict] = {name: {} for name in targets}
    direct_runs: dict[str, list] = {"rps_32": [], "p50_1_ms": [], "p99_1_ms": []}

    def load_phase(name: str) -> None:
        target = targets[name]
        log(f"{name}: {settings.connections} connections, {settings.seconds:.0f}s")
        many = measure_load(settings, target, settings.connections, workdir)
        log(f"{name}: 1 connection, {settings.seconds:.0f}s")
        one = measure_load(settings, target, 1, workdir)
        if name == "direct":
            direct_runs["rps_32"].append(many["rps"])
            direct_runs["p50_1_ms"].append(one["p50_ms"])
            direct_runs["p99_1_ms"].append(one["p99_ms"])
            direct_runs.setdefault("raw", []).append({"c32": many, "c1": one})
            return
        rows[name].update(rps_32=many["rps"], errors=many["errors"] + one["errors"], p50_32_ms=many["p50_ms"],
                          p99_32_ms=many["p99_ms"], p50_1_ms=one["p50_ms"], p99_1_ms=one["p99_ms"],
                          raw={"c32": many, "c1": one})

    # Direct first and last: the drift between the two is the noise floor of this run.
    phases = ["direct", "bare proxy", "litellm-only", "fast path", "anthropic", "messages", "direct"]
    for name in phases:
        load_phase(name)
    if settings.telemetry:
        traced_row = rows["fast path +traces"]
        layout = cpu_layout()
        if layout is not None:
            log(f"traces comparison, gateways on CPU {sorted(layout[0])}, the rest on {sorted(layout[1])}")
        traced_row.update(trace_comparison(settings, targets["fast path"], targets["fast path +traces"], traced,
                                           workdir, layout))
        traced_row["layout"] = "pinned" if layout is not None else "shared"
        if layout is not None:  # and as it runs where nothing is pinned: every process on every CPU
            log("traces comparison, every process on every CPU")
            shown = Settings(**{**settings.__dict__, "trace_pairs": max(2, settings.trace_pairs // 2)})
            traced_row["shared"] = trace_comparison(shown, targets["fast path"], targets["fast path +traces"],
                                                    traced, workdir)
        log(f"fast path +traces: 1 connection, {settings.seconds:.0f}s")
        one = measure_load(settings, targets["fast path +traces"], 1, workdir)
        traced_row.update(rps_32=traced_row["traced_rps_32"], p50_1_ms=one["p50_ms"], p99_1_ms=one["p99_ms"],
                          errors=sum(r["errors"] for r in traced_row["comparison"]["traced"]) + one["errors"])
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    rows["direct"].update(rps_32=round(mean(direct_runs["rps_32"]), 1),
                          errors=sum(r["c32"]["errors"] + r["c1"]["errors"] for r in direct_runs["raw"]),
                          p50_1_ms=round(mean(direct_runs["p50_1_ms"]), 3),
                          p99_1_ms=round(mean(direct_runs["p99_1_ms"]), 3))
    base = rows["direct"]
    for name, row in rows.items():
        if name == "direct":
            continue
        row["ratio_vs_direct"] = round(row["rps_32"] / base["rps_32"], 3) if base["rps_32"] else None
        row["added_p50_ms"] = round(row["p50_1_ms"] - base["p50_1_ms"], 3)
        row["added_p99_ms"] = round(row["p99_1_ms"] - base["p99_1_ms"], 3)
    bare_rps = rows["bare proxy"].get("rps_32")
    for name in ("litellm-only", "fast path", "anthropic", "messages", "fast path +traces"):
        if name not in rows:
            continue
        if bare_rps and rows[name].get("rps_32"):
            rows[name]["ratio_vs_bare"] = round(rows[name]["rps_32"] / bare_rps, 3)
    if rows["litellm-only"].get("rps_32"):
        rows["fast path"]["ratio_vs_litellm"] = round(rows["fast path"]["rps_32"] / rows["litellm-only"]["rps_32"], 2)

    # The bare pass-through's stream is the floor: what one more aiohttp hop adds on this machine.
    for name in ("direct", "bare proxy", "fast path", "litellm-only"):
        log(f"{name}: {settings.streams} streams of {settings.chunks} chunks, {settings.chunk_delay_ms:.0f} ms apart")
        stream = measure_stream(settings, targets[name])
        rows[name].update(stream_first_byte_ms=stream["first_byte_p50_ms"], stream_gap_p50_ms=stream["gap_p50_ms"],
                          stream_gap_min_ms=stream["gap_min_ms"], stream_batched=stream["batched"], stream=stream)
    for name in ("bare proxy", "fast path", "litellm-only"):
        rows[name]["stream_first_byte_delta_ms"] = round(
            rows[name]["stream_first_byte_ms"] - rows["direct"]["stream_first_byte_ms"], 3)

    log(f"fast path RSS: {settings.rss_requests:,} requests at {settings.connections} connections")
    before = rss_kib(fast_pid)
    # Capped in time: a slow gateway reports fewer requests (shown) instead of running for ever.
    rss_run = python_load(targets["fast path"], settings.connections, settings.rss_max_seconds, 0,
                          requests=settings.rss_requests)
    time.sleep(2)  # the accounting writer flushes at least once a second
    after = rss_kib(fast_pid)
    rss = {"requests": rss_run["requests"], "errors": rss_run["errors"], "rps": rss_run["rps"],
           "before_kib": before["VmRSS"], "after_kib": after["VmRSS"], "hwm_after_kib": after.get("VmHWM"),
           "growth_pct": round((after["VmRSS"] - before["VmRSS"]) / before["VmRSS"] * 100, 2)}

    if settings.telemetry:
        traced_row = rows["fast path +traces"]
        time.sleep(3)  # the last batches leave (export every second)
        with urllib.request.urlopen(traced["collector"] + "/stats", timeout=10) as resp:
            traced_row["collector"] = json.loads(resp.read())
        traced_row["dropped_total"] = spans_dropped(traced["base"])

    results = {
        "settings": settings.__dict__, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "loadavg_start": loadavg_start, "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "targets": rows, "direct_runs": {k: v for k, v in direct_runs.items() if k != "raw"}, "rss": rss,
        "pids": {name: t.pid for name, t in targets.items()}, "workdir": str(workdir),
    }
    results["checks"] = verdicts(results)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description="Gateway benchmark (see the module docstring).")
    parser.add_argument("--quick", action="store_true", help="short phases, 10,000 RSS requests")
    parser.add_argument("--loadgen", choices=("auto", "python", "wrk"))
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, SQLite)")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    parser.add_argument("--telemetry", action="store_true", help="(the default) also the fast path with every "
                        "request traced to a local OTLP collector, alternated with the untraced one")
    parser.add_argument("--no-telemetry", action="store_true", help="skip the traced fast path")
    args = parser.parse_args()
    settings = Settings.from_env(args)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    procs = Processes(workdir)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        results = run(settings, workdir, procs)
    except KeyboardInterrupt:
        log("interrupted; stopping every child")
        return 130
    except Exception as exc:  # noqa: BLE001 — report, clean up, fail
        log(f"failed: {exc}")
        return 1
    finally:
        procs.stop_all()
        drop_pg_schemas()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    RESULTS_FILE.write_text(json.dumps(results, indent=2))
    print_report(results)
    missed = any(c["result"] == "FAIL" for c in results["checks"])
    return 2 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
