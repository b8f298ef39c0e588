"""The all-native gateway's RSS, alone: what `make bench`'s "all-native gateway RSS" check reads.

    python bench/rss_probe.py                        # this tree: RSS at start, after warm-up, after 10,000 requests
    python bench/rss_probe.py --root /path/to/tree   # another tree's proxy.py (an older commit's worktree)
    python bench/rss_probe.py --requests 0 --modules out.txt   # start only; the gateway's sys.modules to a file
    python bench/rss_probe.py --tracemalloc 40       # start only: the 40 source files holding the most memory

One fake upstream (bench/upstream.py) and one fast-path gateway (bench.gateway_config's
'fast' variant: both models native, workers 1, SQLite), started as `make bench` starts it.
The gateway runs through a tiny wrapper that runs the tree's proxy.py as `__main__` and, on
SIGUSR2, writes its `sys.modules` (and, with --tracemalloc, the top allocations by file), so
two trees can be compared module by module. Before the measured requests, the warm-up sends
what `make bench` sends the same gateway before its RSS phase (the three targets, some
streams, a few seconds of load each); --no-warm-up skips it. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402

WRAPPER = r"""
import os, runpy, signal, sys
root, out = sys.argv[1], sys.argv[2]
top = int(os.environ.get("RSS_PROBE_TRACEMALLOC", "0"))
if top:
    import tracemalloc
    tracemalloc.start(1)
def dump(signum, frame):
    with open(out + ".tmp", "w") as fh:
        fh.write("\n".join(sorted(sys.modules)) + "\n")
        if top:
            snap = tracemalloc.take_snapshot()
            fh.write("#tracemalloc\n")
            for stat in snap.statistics("filename")[:top]:
                fh.write(f"#{stat.size / 1024:10.0f} KiB {stat.count:8d} {stat.traceback[0].filename}\n")
    os.replace(out + ".tmp", out)
signal.signal(signal.SIGUSR2, dump)
os.chdir(root)
sys.path.insert(0, root)
sys.argv = [os.path.join(root, "proxy.py")] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def mib(values: dict[str, int]) -> dict[str, float]:
    return {k: round(v / 1024, 1) for k, v in values.items()}


def dump_modules(pid: int, path: Path) -> list[str]:
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return path.read_text().splitlines()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(bench.ROOT), help="source tree whose proxy.py runs")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--no-warm-up", action="store_true")
    parser.add_argument("--modules", help="write the gateway's sys.modules at start to this file")
    parser.add_argument("--tracemalloc", type=int, default=0, help="N: trace allocations from start, print top N files")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    workdir = Path(tempfile.mkdtemp(prefix="rss-probe-"))
    procs = bench.Processes(workdir)
    result: dict = {"root": str(root)}
    try:
        up_port = bench.free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        up = procs.start("upstream", [bench.PYTHON, str(bench.BENCH_DIR / "upstream.py"), "--port", str(up_port),
                                      "--chunks", "10", "--chunk-delay-ms", "20"])
        bench.wait_http(upstream + "/health", up, 30, "upstream", procs, "upstream")
        config = bench.gateway_config(workdir, "fast", upstream, "auto")
        # The tree's own plugin chain (an older tree may not know a newer plugin).
        import yaml

        data = json.loads(config.read_text())
        data["plugins"] = yaml.safe_load((root / "config.yaml").read_text())["plugins"]
        config.write_text(json.dumps(data, indent=2))
        bench.run_child([bench.PYTHON, "proxy.py", "workspaces", "create", "bench", "--json", "--config", str(config)],
                        timeout=120, root=root)
        key = bench.create_user(str(config), root)
        port = bench.free_port()
        wrapper = workdir / "wrapper.py"
        wrapper.write_text(WRAPPER)
        if args.tracemalloc:
            os.environ["RSS_PROBE_TRACEMALLOC"] = str(args.tracemalloc)
        modules_file = workdir / "modules.txt"
        gw = procs.start("gateway", [bench.PYTHON, str(wrapper), str(root), str(modules_file), "serve", "--config",
                                     str(config), "--port", str(port)], root)
        base = f"http://127.0.0.1:{port}"
        bench.wait_http(base + "/health/ready", gw, 120, "gateway", procs, "gateway")
        time.sleep(1)
        result["start"] = mib(status(gw.pid))
        modules = dump_modules(gw.pid, modules_file)
        names = [m for m in modules if not m.startswith("#")]
        result["modules_at_start"] = len(names)
        if args.modules:
            Path(args.modules).write_text("\n".join(names) + "\n")
        if args.tracemalloc:
            print("\n".join(m[1:] for m in modules if m.startswith("#")), file=sys.stderr)

        message = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
        auth = {"Authorization": f"Bearer {key}"}
        targets = [
            bench.Target("fast path", base + "/v1/chat/completions", {"model": bench.GATEWAY_MODEL, **message}, auth),
            bench.Target("anthropic", base + "/v1/chat/completions", {"model": bench.ANTHROPIC_MODEL, **message}, auth),
            bench.Target("messages", base + "/v1/messages", {"model": bench.ANTHROPIC_MODEL, **message},
                         {"x-api-key": key, "anthropic-version": "2023-06-01"}),
        ]
        for target in targets:
            bench.smoke_check(target)
        if args.requests and not args.no_warm_up:
            for target in targets:  # what `make bench --quick` sends before its RSS phase, shorter
                bench.python_load(target, 32, 2, 0)
            settings = argparse.Namespace(streams=10, chunks=10, chunk_delay_ms=20.0)
            bench.measure_stream(settings, targets[0])
        result["warm"] = mib(status(gw.pid))
        if args.requests:
            run = bench.python_load(targets[0], 32, 120, 0, requests=args.requests)
            time.sleep(2)  # the accounting writer flushes at least once a second
            result["after"] = mib(status(gw.pid))
            result["requests"], result["errors"], result["rps"] = run["requests"], run["errors"], run["rps"]
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
