"""Storage growth per million requests: the usage log, its request-id claims and the rollups.

    python bench/storage_growth.py [--rows 1000000] [--stores sqlite,postgres]

A store of this release gets `--rows` usage rows (SQL, as tests/test_upgrades.py seeds
them: 50 users, 3 models, one workspace, provider and action, over 60 days), then its
rollups are built from them as the live path would have. Prints bytes per usage row (table
and indexes) and the rollups' rows and bytes: the raw rows grow with the requests, the
rollups with hours x the keys seen in each hour (docs/upgrades.md quotes the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from gateway.store import backfill, open_store  # noqa: E402
from gateway.store import rollup  # noqa: E402
from tests import test_upgrades as t  # noqa: E402

ROLLUPS = [table for family in rollup.FAMILIES for table in family.tables.values()]


async def measure(kind: str, rows: int, work: Path) -> None:
    url = f"sqlite:///{work}/growth.db" if kind == "sqlite" else f"{t.PG_URL}?schema=growth_{uuid.uuid4().hex[:8]}"
    store = open_store(url)
    await store.open()
    await store.close()
    started = time.monotonic()
    await asyncio.get_running_loop().run_in_executor(None, t.seed_usage, url, rows)
    if kind == "postgres":
        await t.sql(url, "INSERT INTO ai_usage_request_ids (request_id, created_at)"
                         " SELECT request_id, created_at FROM ai_usage_logs")  # as the live insert claims them
    # The rollups built by a background backfill at pace 1 with the serving chunk size: the
    # rate ./gw migrate --plan divides by (backfill.ROWS_PER_SECOND).
    job = backfill.register(backfill.Backfill("growth_rollups", 0, backfill.rollup_chunk(rollup.FAMILIES)))
    await t.sql(url, backfill.registration_sql(kind, job, time.time()))
    store = open_store(url)
    await store.open()
    try:
        began = time.monotonic()
        await backfill.BackfillRunner(store, pace=1.0, start_delay=0).run()
        took = time.monotonic() - began
    finally:
        await store.close()
    print(f"\n{kind}: the rollups of {rows:,} rows backfilled in {took:.1f} s at pace 1: {rows / took:,.0f} rows/s")
    if kind == "sqlite":
        db = sqlite3.connect(url[len("sqlite:///"):])
        db.execute("VACUUM")
        try:
            sizes = dict(db.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
        except sqlite3.OperationalError:  # no dbstat in this build: the file only
            sizes = {}
        counts = {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in ROLLUPS}
        db.close()
        total = os.path.getsize(url[len("sqlite:///"):])
        log_bytes = sum(v for k, v in sizes.items() if "ai_usage_logs" in k or k.startswith("sqlite_autoindex_ai"))
        print(f"\nsqlite, {rows:,} rows (seeded and rolled up in {time.monotonic() - started:.0f} s):"
              f" file {total / 1e6:.0f} MB")
        if sizes:
            print(f"  ai_usage_logs with its indexes: {log_bytes / rows:.0f} bytes per row,"
                  f" {log_bytes / rows:.0f} MB per million requests")
            for table in ROLLUPS:
                print(f"  {table}: {counts[table]:,} rows, {sizes.get(table, 0) / 1e6:.1f} MB")
        return
    schema = url.split("schema=")[1]
    conn = await asyncpg.connect(t.PG_URL, server_settings={"search_path": schema})
    try:
        await conn.execute("VACUUM ANALYZE")
        parts = await conn.fetch("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                                 " WHERE i.inhparent = 'ai_usage_logs'::regclass")
        log_bytes = sum([await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", p["relname"])
                         for p in parts])
        ids = await conn.fetchval("SELECT pg_total_relation_size('ai_usage_request_ids')")
        print(f"\npostgres, {rows:,} rows (seeded and rolled up in {time.monotonic() - started:.0f} s):")
        print(f"  ai_usage_logs with its indexes: {log_bytes / rows:.0f} bytes per row,"
              f" {log_bytes / rows:.0f} MB per million requests; ai_usage_request_ids:"
              f" {ids / max(rows, 1):.0f} bytes per row")
        for table in ROLLUPS:
            n = await conn.fetchval(f"SELECT count(*) FROM {table}")
            size = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
            print(f"  {table}: {n:,} rows, {size / 1e6:.1f} MB, {size / max(n, 1):.0f} bytes per row")
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stores", default="sqlite,postgres")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        for kind in args.stores.split(","):
            asyncio.run(measure(kind, args.rows, Path(work)))


if __name__ == "__main__":
    main()
