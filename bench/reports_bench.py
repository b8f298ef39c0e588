"""`make bench-reports`: reports and /admin/metrics at millions of usage rows, under load.

For each store (SQLite file, PostgreSQL schema), seeds N usage rows spread over the last
35 days with set-based SQL (a recursive CTE / generate_series: no Python per row) and
builds the hourly rollup once (the store keeps it up to date on every later insert), then
starts `proxy.py serve` on it and, while a few clients keep sending /v1 requests to the
offline demo model, asks each report (daily, top-users, actions, weekly) and
/admin/metrics for 1, 7 and 30 days. Prints per call: its time, the gateway's RSS before
and after, and the worst /v1 latency of the requests sent while it ran (next to the worst
of a quiet second before it).

    make bench-reports                       # 10,000,000 rows per store
    BENCH_REPORT_ROWS=1000000 make bench-reports
    BENCH_REPORT_STORES=sqlite ...           # or postgres
    GATEWAY_BENCH_PG_URL=postgresql://postgres@127.0.0.1:5432/test (default)
    BENCH_REPORT_PG_SCHEMA=bench_reports (default)

Targets (docs/performance.md): every call <= 1 s at 10M rows, RSS growth <= 50 MB, no /v1 request
delayed by more than 50 ms. Seeded rows carry no ai_usage_request_ids claims (reports do
not read them).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # gateway; `bench` below is bench/bench.py (this directory)

import asyncpg  # noqa: E402
import httpx  # noqa: E402

from bench import HUGE_ENERGY, PYTHON, Processes, free_port, rss_kib, run_child, wait_http  # noqa: E402
from gateway.store import rollup as usage_rollup  # noqa: E402
from gateway.store import open_store  # noqa: E402

PG_URL = os.environ.get("GATEWAY_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
PG_SCHEMA = os.environ.get("BENCH_REPORT_PG_SCHEMA", "bench_reports")
MASTER = "sk-bench-master-key-0123456789"
SPAN_DAYS = 35
CHUNK = 500_000
CLIENTS = 4
TARGETS = {"seconds": 1.0, "rss_mb": 50.0, "delay_ms": 50.0}

# One generated row per i (0..N-1): 500 users in 10 workspaces, 4 models, 3 actions, 2% errors.
_COLUMNS = ("request_id, user_id, workspace_id, action, provider, model, requested_model, tokens_prompt,"
            " tokens_completion, tokens_total, cost_usd, status, error_type, latency_ms, ttfb_ms, energy_cost,"
            " cache_hit, retries, streamed, created_at")


def _values(dialect: str, now: float, n: int) -> str:
    ts = f"({now} - (i * {SPAN_DAYS * 86400.0} / {n}))"
    if dialect == "sqlite":
        created = f"strftime('%Y-%m-%dT%H:%M:%f', {ts}, 'unixepoch') || '000Z'"
        rnd = "abs(random() % {m})"
        flag = "(i % {m} = 0)"
    else:
        created = f"to_timestamp({ts})"
        rnd = "floor(random() * {m})::int"
        flag = "(i % {m} = 0)"
    # $0.000-0.099: SQLite keeps USD as INTEGER nano-dollars, PostgreSQL as numeric (gateway/money.py)
    cost = "(i % 100) * 1000000" if dialect == "sqlite" else "(i % 100) / 1000.0"
    models = "CASE i % 4 WHEN 0 THEN 'gpt-4o' WHEN 1 THEN 'gpt-4o-mini' WHEN 2 THEN 'claude' ELSE 'demo' END"
    return (f"'bench_' || i, 'usr_' || (i % 500), 'ws_' || (i % 10),"
            f" CASE i % 3 WHEN 0 THEN 'ai_message' WHEN 1 THEN 'email_draft' ELSE 'summary' END,"
            f" CASE i % 4 WHEN 2 THEN 'anthropic' ELSE 'openai' END, {models}, 'gpt-4o',"
            f" 200 + i % 300, 50 + i % 200, 250 + i % 300 + i % 200, {cost},"
            f" CASE WHEN i % 50 = 0 THEN 502 ELSE 200 END, CASE WHEN i % 50 = 0 THEN 'upstream_error' END,"
            f" 20 + {rnd.format(m=3000)}, 5 + {rnd.format(m=800)}, i % 7, {flag.format(m=5)}, i % 11 / 10,"
            f" {flag.format(m=3)}, {created}")


def seed_sqlite(path: str, n: int, now: float) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")
    db.execute("DROP TRIGGER IF EXISTS ai_usage_logs_rollup")  # rows in bulk, then the rollup in one GROUP BY
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        db.execute("BEGIN")
        db.execute(f"WITH RECURSIVE s(i) AS (SELECT {start} UNION ALL SELECT i + 1 FROM s WHERE i < {stop - 1})"
                   f" INSERT INTO ai_usage_logs ({_COLUMNS}) SELECT {_values('sqlite', now, n)} FROM s")
        db.execute("COMMIT")
        log(f"  sqlite: {stop:,} rows")
    db.execute("BEGIN")
    for sql in usage_rollup.backfill("sqlite"):
        db.execute(sql)
    # The fine latency histogram: insert_usage keeps it on SQLite (PostgreSQL: its trigger
    # counted the seeded rows already); the store was migrated empty, so all rows are live.
    for sql in usage_rollup.hist_keep("sqlite"):
        db.execute(sql)
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()


async def seed_postgres(n: int, now: float) -> None:
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": PG_SCHEMA})
    try:
        await conn.execute("SELECT ai_usage_partition(m) FROM generate_series(to_timestamp($1) - interval '40 days',"
                           " to_timestamp($1) + interval '31 days', interval '1 day') AS m", now)
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            await conn.execute(f"INSERT INTO ai_usage_logs ({_COLUMNS}) SELECT {_values('postgres', now, n)}"
                               f" FROM generate_series({start}, {stop - 1}) AS i")
            log(f"  postgres: {stop:,} rows")
        for sql in usage_rollup.backfill("postgres"):
            await conn.execute(sql)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def fresh_postgres() -> None:
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{PG_SCHEMA}" CASCADE')
    finally:
        await conn.close()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Load:
    """CLIENTS loops sending /v1 chat completions; every request's (start, end) is kept."""

    def __init__(self, base: str, key: str):
        self.base, self.key = base, key
        self.done: list[tuple[float, float]] = []
        self.errors = 0
        self._stop = False

    async def _loop(self) -> None:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(base_url=self.base, timeout=30,
                                     headers={"Authorization": f"Bearer {self.key}"}) as client:
            while not self._stop:
                t0 = time.monotonic()
                response = await client.post("/v1/chat/completions", json=body)
                self.done.append((t0, time.monotonic()))
                if response.status_code != 200:
                    self.errors += 1

    def worst_ms(self, start: float, end: float) -> float:
        """The slowest request that was in flight at any moment of [start, end]."""
        spans = [e - s for s, e in self.done if s <= end and e >= start]
        return max(spans) * 1000 if spans else float("nan")

    async def run(self) -> list[asyncio.Task]:
        return [asyncio.create_task(self._loop()) for _ in range(CLIENTS)]

    def stop(self) -> None:
        self._stop = True


async def measure(base: str, key: str, pid: int) -> list[dict[str, Any]]:
    load = Load(base, key)
    tasks = await load.run()
    await asyncio.sleep(2)  # warm up
    calls = [(f"usage {kind} {days}d", f"/admin/usage/{kind}?days={days}")
             for days in (1, 7, 30) for kind in ("daily", "top-users", "actions", "weekly")]
    calls += [(f"metrics {days}d", f"/admin/metrics?window={days}d") for days in (1, 7, 30)]
    out = []
    async with httpx.AsyncClient(base_url=base, timeout=120, headers={"Authorization": f"Bearer {MASTER}"}) as admin:
        for name, path in calls:
            quiet_start = time.monotonic()
            await asyncio.sleep(1)
            quiet = load.worst_ms(quiet_start, time.monotonic())
            before = rss_kib(pid)["VmRSS"]
            t0 = time.monotonic()
            response = await admin.get(path)
            t1 = time.monotonic()
            await asyncio.sleep(0.2)  # requests in flight at the end finish
            after = rss_kib(pid)["VmRSS"]
            assert response.status_code == 200, (path, response.status_code, response.text[:300])
            out.append({"call": name, "seconds": t1 - t0, "rss_before_mb": before / 1024, "rss_after_mb": after / 1024,
                        "worst_v1_ms": load.worst_ms(t0, t1), "quiet_worst_v1_ms": quiet})
            log(f"  {name}: {t1 - t0:.3f} s")
            if path.startswith("/admin/metrics"):  # which histogram answered (the fine one when seeded)
                body = response.json()
                log(f"    latency p50/p95 {body['latencyP50']}/{body['latencyP95']} ms,"
                    f" approximate: {body['percentilesApproximate']}")
    load.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    log(f"  /v1 requests: {len(load.done):,}, non-200: {load.errors}")
    return out


def gateway(procs: Processes, workdir: Path, store: str, url: str) -> tuple[str, str, int]:
    config = {"server": {"host": "127.0.0.1", "port": 8080, "shutdown_grace": 2, "workers": 1},
              "store": {"url": url}, "auth": {"master_key": MASTER, "default_tier": "pro"},
              "models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}],
              "tiers": {"pro": {"models": ["*"], "refill": {"amount": 1000, "period": "1d"}}}}
    path = workdir / f"{store}.yaml"
    path.write_text(json.dumps(config))
    run_child([PYTHON, "proxy.py", "workspaces", "create", "bench", "--json", "--config", str(path)], timeout=300)
    created = json.loads(run_child([PYTHON, "proxy.py", "users", "create", "--workspace", "bench", "--tier", "pro",
                                    "--energy", str(HUGE_ENERGY), "--json", "--config", str(path)], timeout=300))
    port = free_port()
    proc = procs.start(f"gateway-{store}", [PYTHON, "proxy.py", "serve", "--config", str(path), "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", proc, 300, f"gateway ({store})", procs, f"gateway-{store}")
    return base, created["api_key"], proc.pid


def print_table(store: str, n: int, results: list[dict[str, Any]]) -> None:
    print(f"\n{store}, {n:,} usage rows")
    print(f"{'call':<22} {'time s':>7} {'RSS before MB':>14} {'after MB':>9} {'worst /v1 ms':>13} "
          f"{'(quiet) ms':>11}  verdict")
    for r in results:
        ok = (r["seconds"] <= TARGETS["seconds"] and r["rss_after_mb"] - r["rss_before_mb"] <= TARGETS["rss_mb"]
              and r["worst_v1_ms"] - r["quiet_worst_v1_ms"] <= TARGETS["delay_ms"])
        print(f"{r['call']:<22} {r['seconds']:>7.3f} {r['rss_before_mb']:>14.1f} {r['rss_after_mb']:>9.1f} "
              f"{r['worst_v1_ms']:>13.1f} {r['quiet_worst_v1_ms']:>11.1f}  {'ok' if ok else 'MISSED'}")
    sys.stdout.flush()


async def bench_store(store: str, n: int, workdir: Path) -> None:
    now = time.time()
    if store == "sqlite":
        url = f"sqlite:///{workdir}/reports.db"
    else:
        await fresh_postgres()
        url = f"{PG_URL}?schema={PG_SCHEMA}"
    async with open_store(url):  # the schema, migrated
        pass
    log(f"{store}: seeding {n:,} rows")
    t0 = time.monotonic()
    if store == "sqlite":
        await asyncio.to_thread(seed_sqlite, url[len("sqlite:///"):], n, now)
    else:
        await seed_postgres(n, now)
    log(f"{store}: seeded in {time.monotonic() - t0:.0f} s")
    procs = Processes(workdir)
    try:
        base, key, pid = await asyncio.to_thread(gateway, procs, workdir, store, url)
        results = await measure(base, key, pid)
    finally:
        procs.stop_all()
    print_table(store, n, results)
    if store == "postgres":
        await fresh_postgres()


def main() -> int:
    n = int(os.environ.get("BENCH_REPORT_ROWS", 10_000_000))
    stores = os.environ.get("BENCH_REPORT_STORES", "sqlite,postgres").split(",")
    with tempfile.TemporaryDirectory(prefix="bench-reports-") as tmp:
        for store in stores:
            asyncio.run(bench_store(store.strip(), n, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
