"""The latency histogram's history backfill (gateway/store/backfill.py, `latency_histogram`):
rows per second at pace 1, the chunk sizes of a serving gateway or of ./gw migrate --backfill.

    python bench/latency_backfill_bench.py [--rows 1000000] [--stores sqlite,postgres] [--alone]

For each store: a store of this release with `--rows` usage rows over 60 days written by SQL
and rolled up (tests/test_upgrades.seed_usage: 50 users, one workspace, latencies 0-899
ms), the fine histogram emptied and its boundary put above every row (a store of the
release before migration 18), the backfill registered by the next start (late
registration, over [oldest id, live_from_id)), then the runner to its end; the dashboard
then reads the fine histogram (`percentilesApproximate` false). Its rate is quoted as
`Backfill.rows_per_second` (./gw migrate --plan's estimate). The database shares the
machine's cores with everything else: compare runs of one session.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402

from gateway.admin import reports  # noqa: E402
from gateway.store import backfill, open_store  # noqa: E402
from tests import test_upgrades  # noqa: E402
from tests.test_latency_percentiles import forget_histogram  # noqa: E402


async def one(kind: str, rows: int, alone: bool, folder: str) -> None:
    url = (f"sqlite:///{folder}/{uuid.uuid4().hex}.db" if kind == "sqlite"
           else f"{test_upgrades.PG_URL}?schema=bench_{uuid.uuid4().hex[:10]}")
    try:
        async with open_store(url):
            pass
        await asyncio.to_thread(test_upgrades.seed_usage, url, rows)
        await forget_histogram(url)
        await test_upgrades.sql(url, "DELETE FROM gw_backfills")
        backfill.BACKFILLS[:] = [b for b in backfill.BACKFILLS if b.name == "latency_histogram"]
        async with open_store(url) as store:
            started = time.monotonic()
            await backfill.BackfillRunner(store, pace=1.0, start_delay=0,
                                          chunk_seconds=backfill.CHUNK_SECONDS_ALONE if alone else None).run()
            took = time.monotonic() - started
            board = await reports.dashboard(store, time.time() - 62 * 86400)
        print(f"{kind}: {rows:,} rows in {took:.1f} s, {rows / took:,.0f} rows/s"
              f" ({'migrate --backfill' if alone else 'serving'} chunks);"
              f" percentilesApproximate {board['percentilesApproximate']}")
    finally:
        if kind == "postgres":
            conn = await asyncpg.connect(test_upgrades.PG_URL)
            await conn.execute(f"DROP SCHEMA IF EXISTS {url.split('schema=')[1]} CASCADE")
            await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--alone", action="store_true", help="the chunk sizes of ./gw migrate --backfill")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.stores.split(","):
            asyncio.run(one(kind, args.rows, args.alone, folder))


if __name__ == "__main__":
    main()
