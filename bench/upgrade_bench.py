"""Upgrade bench: the previous release's store served by this one, and /v1 while it backfills.

    python bench/upgrade_bench.py [--rows 2000000] [--stores sqlite,postgres] [--pace 0.25] [--seconds 20]

For each store: a store made by the previous release (a git worktree of
tests/test_upgrades.PREVIOUS, its own CLI) with `--rows` usage rows (SQL, as the test
seeds them), then this release started on it with the test backfill registered
(tests/upgrade_launcher.py, a rollup of the history by model, as a migration's backfill):

* start -> /health and one /v1 answer, beside the same start on an empty store (what the
  process costs anyway: imports, litellm's warm-up);
* /v1 latency (4 clients in a loop, non-streamed, bench/upstream.py answering at once)
  for `--seconds` while the backfill runs at `--pace`, then for `--seconds` once it is done;
* the backfill's rate (rows per second) at that pace.

Everything shares the machine's cores (the gateway, the database, the upstream, the
clients): compare the columns of one run, not runs of different days. Quoted in
docs/upgrades.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import test_upgrades as t  # noqa: E402
from tests.fakes import free_port  # noqa: E402
from tests.upgrade_launcher import table_ddl  # noqa: E402


class Upstream:
    def __init__(self, port: int) -> None:
        self.openai_base = f"http://127.0.0.1:{port}/v1"


async def probe(url: str, key: str, seconds: float, clients: int = 4) -> list[float]:
    """Latencies (ms) of /v1 chat completions, `clients` in a loop for `seconds`."""
    out: list[float] = []
    end = time.monotonic() + seconds
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    async def client() -> None:
        async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
            while time.monotonic() < end:
                started = time.perf_counter()
                r = await http.post(url + "/v1/chat/completions", json=body)
                if r.status_code == 200:
                    out.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(client() for _ in range(clients)))
    return out


def stats(ms: list[float]) -> str:
    if not ms:
        return "no answers"
    ms = sorted(ms)
    return (f"n={len(ms)} p50={statistics.median(ms):.1f} p99={ms[int(len(ms) * 0.99) - 1]:.1f}"
            f" max={ms[-1]:.1f} ms")


def time_to_serve(config: Path, url: str, key: str, script: str) -> tuple[float, subprocess.Popen]:
    started = time.monotonic()
    with open(config.with_suffix(".log"), "w") as log:  # not a pipe: nobody reads it while probing
        proc = subprocess.Popen([sys.executable, script, "serve", "--config", str(config)], cwd=ROOT, env=t.ENV,
                                stdout=log, stderr=subprocess.STDOUT, text=True)
    t.wait_health(url, proc)
    t.ask(url, key)
    return time.monotonic() - started, proc


def run_store(kind: str, rows: int, pace: float, seconds: float, previous: Path, upstream: Upstream,
              work: Path) -> None:
    if kind == "sqlite":
        store_url = f"sqlite:///{work}/{kind}.db"
    else:
        store_url = f"{t.PG_URL}?schema=bench_{uuid.uuid4().hex[:10]}"
    try:
        # Baseline: this release on an empty store.
        empty_url = f"sqlite:///{work}/empty.db" if kind == "sqlite" else f"{store_url}_empty"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = t.write_config(work, f"{kind}-empty", upstream, empty_url, port)
        t.run_cli(ROOT, config, "workspaces", "create", "acme")
        key = __import__("json").loads(t.run_cli(ROOT, config, "users", "create", "--workspace", "acme", "--tier",
                                                 "pro", "--energy", "1000000000", "--json").stdout)["api_key"]
        empty_start, proc = time_to_serve(config, url, key, "proxy.py")
        t.stop(proc)

        _, key = t.previous_store(previous, work, upstream, store_url, energy=1_000_000_000)
        seeding = time.monotonic()
        t.seed_usage(store_url, rows)
        seeding = time.monotonic() - seeding
        for ddl in table_ddl(kind):
            asyncio.run(t.sql(store_url, ddl))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = t.write_config(work, f"{kind}-upgraded", upstream, store_url, port, backfill_pace=pace)
        upgraded_start, proc = time_to_serve(config, url, key, "tests/upgrade_launcher.py")
        try:
            began = t.backfill_state(store_url)
            during = asyncio.run(probe(url, key, seconds))
            mid = t.backfill_state(store_url)
            while t.backfill_state(store_url)["finished_at"] is None:
                time.sleep(0.5)
            done = t.backfill_state(store_url)
            after = asyncio.run(probe(url, key, seconds))
        finally:
            t.stop(proc)
        took = done["finished_at"] - (done["started_at"] or done["finished_at"])
        print(f"\n{kind}: {rows:,} usage rows of {t.PREVIOUS} (seeded in {seeding:.0f} s), pace {pace:g}")
        print(f"  start -> /health + one /v1 answer: empty store {empty_start:.2f} s,"
              f" upgraded store {upgraded_start:.2f} s (backfill at {t.backfill.percent(began)}%)")
        print(f"  /v1 while backfilling ({t.backfill.percent(mid)}% after {seconds:g} s): {stats(during)}")
        print(f"  /v1 after the backfill:                {stats(after)}")
        print(f"  backfill: {done['done_rows']:,} rows in {took:.1f} s = {done['done_rows'] / max(took, 1e-9):,.0f}"
              f" rows/s at pace {pace:g}")
    finally:
        if kind == "postgres":
            async def drop() -> None:
                import asyncpg

                conn = await asyncpg.connect(t.PG_URL)
                try:
                    for schema in (store_url.split("schema=")[1], store_url.split("schema=")[1] + "_empty"):
                        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
                finally:
                    await conn.close()

            asyncio.run(drop())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--pace", type=float, default=0.25)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    work = Path(tempfile.mkdtemp(prefix="gw-upgrade-bench-"))
    previous = work / "previous"
    subprocess.run(["git", "worktree", "add", "--detach", str(previous), t.PREVIOUS], cwd=ROOT, check=True,
                   capture_output=True)
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "bench/upstream.py", "--port", str(port)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        for kind in args.stores.split(","):
            run_store(kind, args.rows, args.pace, args.seconds, previous, Upstream(port), work)
    finally:
        upstream.send_signal(signal.SIGTERM)
        upstream.wait()
        subprocess.run(["git", "worktree", "remove", "--force", str(previous)], cwd=ROOT, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
