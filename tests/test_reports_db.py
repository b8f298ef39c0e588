"""Reports computed by the database (gateway/store/rollup.py) equal the old computation in
Python over every row of the window, on SQLite and PostgreSQL; percentiles are within 4%
of the exact value (tests/test_latency_percentiles.py has the distributions); retention drops raw rows but not the rollup; a store
made by the previous release is migrated without losing a row; an admin read in flight
does not hold up the store operations of /v1 requests.
"""

from __future__ import annotations

import asyncio
import math
import random
import sqlite3
import threading
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from gateway.admin import reports
from gateway.money import USD_ZERO, to_nano, usd
from gateway.store import open_store
from gateway.store.postgres import MIGRATIONS as PG_MIGRATIONS
from gateway.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from tests import test_store
from tests.test_store import PG_URL

store_url = test_store.store_url  # the fixture of both backends

NOW = 1_760_000_000.0 + 1234.5  # mid-hour, so windows start inside an hour (the raw-row edge)
DAY = 86400.0
FOUR = ("daily", "top-users", "actions", "weekly")  # the reports this file compares


# ------------------------------------------------- the old computation, kept as reference


# USD sums are exact (gateway/money.py): the reference sums Decimals and never rounds, but
# an average, by the money rule.
def _cost(row: dict[str, Any]) -> Decimal:
    return usd(row.get("cost_usd") or 0)


def _saved(row: dict[str, Any]) -> Decimal:
    return usd(row.get("saved_usd") or 0)


def ref_daily(rows):
    days: dict[str, dict[str, Any]] = {}
    for row in rows:
        date = datetime.fromtimestamp(row["created_at"], timezone.utc).strftime("%Y-%m-%d")
        d = days.setdefault(date, {"date": date, "requests": 0, "errors": 0, "tokens": 0, "cost_usd": USD_ZERO,
                                   "cache_hits": 0, "saved_usd": USD_ZERO})
        d["requests"] += 1
        d["errors"] += 1 if row.get("error_type") else 0
        d["tokens"] += int(row.get("tokens_total") or 0)
        d["cost_usd"] += _cost(row)
        d["cache_hits"] += 1 if row.get("cache_hit") else 0
        d["saved_usd"] += _saved(row)
    return sorted(days.values(), key=lambda d: d["date"])


def ref_top_users(rows, limit=10):
    users: dict[Any, dict[str, Any]] = {}
    for row in rows:
        u = users.setdefault(row.get("user_id"), {"user_id": row.get("user_id"), "workspace_id": row.get("workspace_id"),
                                                  "requests": 0, "tokens": 0, "cost_usd": USD_ZERO, "energy": 0})
        u["requests"] += 1
        u["tokens"] += int(row.get("tokens_total") or 0)
        u["cost_usd"] += _cost(row)
        u["energy"] += int(row.get("energy_cost") or 0)
    # the database breaks ties by user id (the old code by first appearance)
    ranked = sorted(users.values(), key=lambda u: (-u["cost_usd"], -u["requests"], u["user_id"] or ""))[:limit]
    return ranked


def ref_actions(rows):
    acc: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        acc[row.get("action")].append(row)
    out = []
    for action, items in acc.items():
        total = sum(_cost(r) for r in items)
        out.append({"action": action, "count": len(items), "total_cost_usd": total,
                    "avg_cost_usd": usd(total / len(items)),
                    "avg_tokens": round(sum(int(r.get("tokens_total") or 0) for r in items) / len(items), 1)})
    return sorted(out, key=lambda a: (-a["avg_cost_usd"], -a["count"], a["action"] or ""))


def ref_weekly(rows, threshold=None):
    weeks: dict[tuple[int, int], dict[str, Any]] = {}
    for row in rows:
        year, week = reports.iso_week(row["created_at"])
        w = weeks.setdefault((year, week), {"week": f"{year}-W{week:02d}", "requests": 0, "cost_usd": USD_ZERO})
        w["requests"] += 1
        w["cost_usd"] += _cost(row)
    out = []
    for key in sorted(weeks):
        w = weeks[key]
        w["threshold_usd"] = threshold
        w["over_threshold"] = threshold is not None and w["cost_usd"] > threshold
        out.append(w)
    return out


def ref_dashboard(rows):
    total = len(rows)
    latencies = [r["latency_ms"] for r in rows if r.get("latency_ms") is not None]
    return {
        "totalRequests": total,
        "totalTokens": sum(int(r.get("tokens_total") or 0) for r in rows),
        "totalCost": sum(map(_cost, rows), USD_ZERO),
        "averageLatency": round(sum(latencies) / len(latencies), 2) if latencies else 0.0,
        "errorRate": round(sum(1 for r in rows if r.get("error_type")) / total, 4) if total else 0.0,
        "cacheHitRate": round(sum(1 for r in rows if r.get("cache_hit")) / total, 4) if total else 0.0,
        "cacheHits": sum(1 for r in rows if r.get("cache_hit")),
        "savedUsd": sum(map(_saved, rows), USD_ZERO),
        "providerDistribution": dict(Counter(r.get("provider") or "none" for r in rows)),
        "modelDistribution": dict(Counter(r.get("model") or "none" for r in rows)),
        "energySpent": sum(r["energy_cost"] for r in rows),
        "downgrades": sum(1 for r in rows if r.get("downgraded_from")),
        "retries": sum(r["retries"] for r in rows),
    }


def exact_percentile(values: list[int], p: float) -> int:
    """Nearest rank: the value at rank ceil(p/100 x n) of the sorted values."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


# ------------------------------------------------------------------------ seeded data


def seeded_rows(n: int = 400, seed: int = 7) -> list[dict[str, Any]]:
    """Rows over the last 40 days, costs in 1/64 USD (sums exact in floating point)."""
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        ts = NOW - rnd.uniform(0, 40 * DAY)
        error = rnd.random() < 0.1
        tokens = rnd.randint(0, 3000)
        user = rnd.choice(["usr_a", "usr_b", "usr_c", "usr_d", None])  # a user is in one workspace
        rows.append({
            "request_id": f"req_{i}", "user_id": user,
            "workspace_id": {"usr_a": "ws_1", "usr_b": "ws_1", None: None}.get(user, "ws_2"), "action": rnd.choice(["ai_message", "email_draft", None]),
            "provider": rnd.choice(["openai", "anthropic", None]), "model": rnd.choice(["gpt-4o", "claude", "mini"]),
            "requested_model": "gpt-4o", "downgraded_from": "gpt-4o" if rnd.random() < 0.1 else None,
            "tokens_prompt": tokens // 2, "tokens_completion": tokens - tokens // 2, "tokens_total": tokens,
            "tokens_cached": rnd.randint(0, 10),
            "cost_usd": None if rnd.random() < 0.05 else rnd.randint(0, 640) / 64,
            "status": 502 if error else 200, "error_type": "upstream_error" if error else None,
            "latency_ms": None if rnd.random() < 0.03 else int(rnd.lognormvariate(6, 1.2)),
            "ttfb_ms": int(rnd.lognormvariate(5, 1)), "energy_cost": 0 if error else rnd.randint(0, 9),
            "cache_hit": rnd.random() < 0.2, "retries": rnd.choice([0, 0, 0, 1, 2]), "created_at": ts,
        })
        if rows[-1]["cache_hit"]:  # what a hit would have cost; unknown (unpriced) for some
            rows[-1]["saved_usd"] = None if rnd.random() < 0.1 else rnd.randint(1, 640) / 64
    return rows


@pytest.mark.asyncio
@pytest.mark.parametrize("days", [1, 7, 30])
@pytest.mark.parametrize("workspace", [None, "ws_2"])
async def test_reports_from_the_database_equal_the_computation_over_every_row(store_url, days, workspace):
    rows = seeded_rows()
    async with open_store(store_url) as store:
        assert await store.insert_usage(rows) == len(rows)
        since = NOW - days * DAY
        window = [r for r in rows if r["created_at"] >= since and (workspace is None or r["workspace_id"] == workspace)]
        weekly_since = reports.week_start(since)
        weekly_window = [r for r in rows if r["created_at"] >= weekly_since
                         and (workspace is None or r["workspace_id"] == workspace)]
        got = {k: (await reports.build_report(store, k, days=days, workspace_id=workspace, now=NOW,
                                              threshold=50.0, limit=3))["rows"] for k in FOUR}
        assert got["daily"] == ref_daily(window)
        assert got["top-users"] == ref_top_users(window, 3)
        assert got["actions"] == ref_actions(window)
        assert got["weekly"] == ref_weekly(weekly_window, 50.0)

        board = await reports.dashboard(store, since, workspace)
        want = ref_dashboard(window)
        assert {k: board[k] for k in want} == want
        latencies = [r["latency_ms"] for r in window if r["latency_ms"] is not None]
        ttfbs = [r["ttfb_ms"] for r in window]
        assert board["percentilesApproximate"] is False
        for p in (50, 90, 95, 99):  # the fine histogram: within 4% (tests/test_latency_percentiles.py)
            assert abs(board[f"latencyP{p}"] - exact_percentile(latencies, p)) <= 0.04 * exact_percentile(latencies, p)
            assert abs(board[f"ttfbP{p}"] - exact_percentile(ttfbs, p)) <= 0.04 * exact_percentile(ttfbs, p)


@pytest.mark.asyncio
async def test_sqlite_and_postgres_give_the_same_reports(tmp_path):
    rows = seeded_rows(300, seed=11)
    schema = "test_reports_same"
    results = []
    for url in (f"sqlite:///{tmp_path}/same.db", f"{PG_URL}?schema={schema}"):
        try:
            async with open_store(url) as store:
                await store.insert_usage(rows)
                results.append([await reports.build_report(store, k, days=30, now=NOW) for k in FOUR]
                               + [await reports.dashboard(store, NOW - 30 * DAY)])
        finally:
            if url.startswith("postgresql"):
                conn = await asyncpg.connect(PG_URL)
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                await conn.close()
    assert results[0] == results[1]


def test_coarse_percentiles_are_interpolated_inside_the_bucket_holding_the_nearest_rank():
    """What a window the fine histogram does not cover reports (histogram_quantile style)."""
    from gateway.store.rollup import BUCKETS, coarse_percentile

    counts = [0] * BUCKETS
    counts[0], counts[4], counts[-1] = 50, 45, 5  # <=10 ms, (75, 100] ms, > 60 s
    assert coarse_percentile(counts, 50, 90_000) == 10.0  # rank 50: the last of the first bucket, (0, 10]
    assert coarse_percentile(counts, 10, 90_000) == 2.0  # rank 10 of 50 in (0, 10]
    assert coarse_percentile(counts, 51, 90_000) == round(75 + 25 / 45, 2)  # rank 1 of 45 in (75, 100]
    assert coarse_percentile(counts, 95, 90_000) == 100.0
    assert coarse_percentile(counts, 99, 90_000) == 84_000.0  # rank 4 of 5 in (60 s, largest seen]
    assert coarse_percentile(counts, 95, 80) == 80.0  # never above the largest value seen
    assert coarse_percentile([0] * BUCKETS, 50, 0) is None


# ------------------------------------------------------------------------- retention


@pytest.mark.asyncio
async def test_retention_drops_old_raw_rows_and_keeps_the_rollup(store_url):
    old = datetime(2024, 1, 15, tzinfo=timezone.utc).timestamp()
    recent = datetime(2024, 5, 10, tzinfo=timezone.utc).timestamp()
    rows = [{"request_id": f"old_{i}", "user_id": "usr_a", "cost_usd": 1.0, "created_at": old + i} for i in range(5)]
    rows += [{"request_id": f"new_{i}", "user_id": "usr_a", "cost_usd": 2.0, "created_at": recent + i} for i in range(3)]
    async with open_store(store_url) as store:
        await store.insert_usage(rows)
        dropped = await store.prune_usage(datetime(2024, 3, 1, tzinfo=timezone.utc).timestamp())
        assert dropped == 5
        assert sorted(r["request_id"] for r in await store.usage_rows()) == ["new_0", "new_1", "new_2"]
        totals = await store.usage_totals("user", old - 3600)  # hour-aligned: all from the rollup
        assert [(t["key"], t["requests"], t["cost_usd"]) for t in totals] == [("usr_a", 8, 11.0)]
        if store_url.startswith("postgresql"):
            names = [r["relname"] for r in await store.report_query(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'ai_usage_logs'::regclass", [])]
            assert "ai_usage_logs_p202401" not in names and "ai_usage_logs_p202405" in names


# ------------------------------------------------------------------------- migrations


def direct_pg(url: str) -> tuple[str, str]:
    """PostgreSQL itself and the schema of a PostgreSQL store URL, for a raw connection that
    sets things up or holds a lock: PgBouncer (the `pgbouncer` variant) refuses a
    search_path startup parameter, and its server connections are PG_URL's database."""
    return PG_URL, parse_qs(urlsplit(url).query)["schema"][-1]


async def create_previous_release(url: str, rows: list[dict[str, Any]], through: int = 2) -> None:
    """The schema of the release before the rollup (migrations 1 and 2), with usage rows;
    with `through`, the later migrations up to that one applied after the rows were written
    (a store that went through every release since)."""
    cols = ["request_id", "user_id", "workspace_id", "action", "model", "cost_usd", "latency_ms",
            "tokens_total", "created_at"]
    if url.startswith("sqlite"):
        db = sqlite3.connect(url[len("sqlite:///"):])
        db.create_function("gw_usd_nano", 1, lambda v: None if v is None else to_nano(v))  # migration 10's
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")

        def apply(migrations):
            for version, statements in migrations:
                for sql in statements:
                    db.execute(sql)
                db.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))

        apply(SQLITE_MIGRATIONS[:2])
        for r in rows:
            ts = datetime.fromtimestamp(r["created_at"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            db.execute(f"INSERT INTO ai_usage_logs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                       [r[c] for c in cols[:-1]] + [ts])
        apply([m for m in SQLITE_MIGRATIONS[2:] if through is None or m[0] <= through])
        db.commit()
        db.close()
        return
    base, schema = direct_pg(url)
    conn = await asyncpg.connect(base, server_settings={"search_path": schema})
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, applied_at double precision)")

        async def apply(migrations):
            for version, sql in migrations:
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations VALUES ($1, 0)", version)

        await apply(PG_MIGRATIONS[:2])
        for r in rows:
            await conn.execute(f"INSERT INTO ai_usage_logs ({', '.join(cols)}) VALUES "
                               f"({', '.join(f'${i}' for i in range(1, len(cols) + 1))})",
                               *[r[c] for c in cols[:-1]], datetime.fromtimestamp(r["created_at"], timezone.utc))
        await apply([m for m in PG_MIGRATIONS[2:] if through is None or m[0] <= through])
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_store_of_the_previous_release_is_migrated_without_losing_a_row(store_url):
    base = datetime(2024, 4, 28, tzinfo=timezone.utc).timestamp()  # spans two months
    rows = [{"request_id": f"r{i}", "user_id": f"usr_{i % 3}", "workspace_id": "ws_1", "action": "ai_message",
             "model": "gpt-4o", "cost_usd": i / 8, "latency_ms": 100 + i, "tokens_total": 10 * i,
             "created_at": base + i * 6 * 3600} for i in range(20)]
    await create_previous_release(store_url, rows)
    async with open_store(store_url) as store:
        got = await store.usage_rows()
        assert [r["request_id"] for r in got] == [r["request_id"] for r in rows]
        assert [r["cost_usd"] for r in got] == [r["cost_usd"] for r in rows]
        assert [r["id"] for r in got] == list(range(1, 21))  # ids kept
        report = await reports.build_report(store, "top-users", days=30, now=base + 10 * DAY)
        assert report["rows"] == ref_top_users(rows)
        # a retried row (same request id, even stamped at another time) is not written twice
        retry = {**rows[3], "created_at": rows[3]["created_at"] + 40 * DAY}
        assert await store.insert_usage([retry]) == 0
        assert await store.insert_usage([{"request_id": "r_new", "created_at": base}]) == 1
        assert len(await store.usage_rows()) == 21
        assert (await store.usage_totals(None, base - 3600))[0]["requests"] == 21
        assert await store.migrate() == []


@pytest.mark.asyncio
async def test_migration_7_adds_saved_usd_to_a_store_with_rollups_without_losing_a_row(store_url):
    """A store of the release before `saved_usd` (migrations 1-6, its rollups built) moves
    forward: its rows and report numbers kept, their saved USD 0 (nothing was recorded),
    and new hits' saved USD summed by the rollups."""
    base = NOW - 3 * DAY
    rows = [{"request_id": f"r{i}", "user_id": f"usr_{i % 3}", "workspace_id": "ws_1", "action": "ai_message",
             "model": "gpt-4o", "cost_usd": i / 8, "latency_ms": 100 + i, "tokens_total": 10 * i,
             "created_at": base + i * 3600} for i in range(20)]
    await create_previous_release(store_url, rows, through=6)
    async with open_store(store_url) as store:
        got = await store.usage_rows()
        assert [(r["request_id"], r["cost_usd"], r["saved_usd"]) for r in got] == \
               [(r["request_id"], r["cost_usd"], None) for r in rows]
        before = (await store.usage_totals(None, base - 3600, now=NOW))[0]
        assert (before["requests"], before["cost_usd"], before["saved_usd"]) == (20, sum(i / 8 for i in range(20)), 0)
        hit = {"request_id": "r_hit", "workspace_id": "ws_1", "model": "gpt-4o", "cache_hit": True,
               "cost_usd": 0.0, "saved_usd": 0.375, "created_at": base + 3600.5}
        assert await store.insert_usage([hit]) == 1
        after = (await store.usage_totals(None, base - 3600, now=NOW))[0]
        assert (after["requests"], after["cache_hits"], after["saved_usd"]) == (21, 1, 0.375)
        assert await store.migrate() == []


@pytest.mark.asyncio
async def test_a_retried_batch_is_counted_once_in_rows_and_rollup(store_url):
    rows = seeded_rows(50)
    async with open_store(store_url) as store:
        assert await store.insert_usage(rows[:30]) == 30
        assert await store.insert_usage(rows) == 20  # the journal's replay of a written batch
        assert await store.insert_usage([{**rows[0], "created_at": NOW + 1}, {**rows[0]}]) == 0
        board = await reports.dashboard(store, NOW - 41 * DAY)
        assert board["totalRequests"] == 50
        assert board == {**board, **{k: v for k, v in ref_dashboard(rows).items()}}


# --------------------------------------------------------------- admin reads vs /v1 path


@pytest.mark.asyncio
async def test_an_admin_read_in_flight_does_not_hold_up_the_request_path(store_url):
    """While a report is stuck in the database, reservations, settlements and usage inserts
    (what /v1 requests do) complete; the report completes after it is let go."""
    async with open_store(store_url) as store:
        ws = await store.create_workspace("acme")
        user = await store.create_user(ws.id, "free", energy=100)
        await store.insert_usage(seeded_rows(20))
        release = threading.Event()
        if store_url.startswith("sqlite"):
            await store.report_query("SELECT 1", [])  # the read connection exists

            def stuck(db):
                release.wait(30)
                return db.execute("SELECT count(*) FROM ai_usage_logs").fetchone()[0]

            report = asyncio.ensure_future(store._reports.run(stuck))
        else:
            base, schema = direct_pg(store_url)
            holder = await asyncpg.connect(base, server_settings={"search_path": schema})
            await holder.execute("SELECT pg_advisory_lock(4242)")
            report = asyncio.ensure_future(store.report_query(
                "SELECT pg_advisory_lock_shared(4242), count(*) AS n FROM ai_usage_logs", []))
        await asyncio.sleep(0.05)
        assert not report.done()
        for i in range(20):
            await store.reserve_energy(user.id, 1, f"req_v1_{i}")
            await store.settle_energy(f"req_v1_{i}")
        assert await store.insert_usage([{"request_id": "req_v1_row", "created_at": NOW}]) == 1
        assert await store.balance(user.id) == 80
        assert not report.done()  # the report was in flight the whole time
        if store_url.startswith("sqlite"):
            release.set()
            assert await report == 21
        else:
            await holder.execute("SELECT pg_advisory_unlock(4242)")
            assert (await report)[0]["n"] == 20  # its snapshot: taken before the insert
            await holder.close()


def test_window_edges_are_exact():
    """A window starting mid-hour reads that hour's raw rows: rows a second before `since`
    are out, a second after are in (checked on SQLite through a real store)."""
    async def check(tmp):
        async with open_store(f"sqlite:///{tmp}") as store:
            since = NOW - DAY
            await store.insert_usage([{"request_id": "before", "created_at": since - 1},
                                      {"request_id": "after", "created_at": since + 1},
                                      {"request_id": "later", "created_at": since + timedelta(hours=3).seconds}])
            return (await store.usage_totals(None, since))[0]["requests"]

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        assert asyncio.run(check(f"{tmp}/edge.db")) == 2


def test_a_gateway_with_usage_retention_drops_old_rows_at_start(gateway_factory, store_url):
    """store.usage_retention: 90d -> rows from months before are gone soon after start, and
    /admin/metrics over a longer window still counts them (the rollup)."""
    import time

    from tests.test_accounting import CHAIN

    old = time.time() - 200 * DAY

    async def seed():
        async with open_store(store_url) as store:
            await store.insert_usage([{"request_id": f"old_{i}", "cost_usd": 1.0, "created_at": old + i}
                                      for i in range(4)])

    asyncio.run(seed())
    gw = gateway_factory(plugins=CHAIN, store={"url": store_url, "usage_retention": "90d"})
    deadline = time.monotonic() + 10
    while gw.run(gw.store.usage_rows()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.run(gw.store.usage_rows()) == []
    totals = gw.run(gw.store.usage_totals(None, old - 7200))
    assert totals[0]["requests"] == 4 and totals[0]["cost_usd"] == 4.0


def test_usage_retention_is_a_duration_of_at_least_a_day():
    from gateway.config import ConfigError, load_config_data

    base = {"models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}]}
    assert load_config_data({**base, "store": {"usage_retention": "90d"}}).store.usage_retention == 90 * DAY
    assert load_config_data(base).store.usage_retention is None
    with pytest.raises(ConfigError, match="usage_retention"):
        load_config_data({**base, "store": {"usage_retention": "1h"}})


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_v1_request_is_answered_while_an_admin_metrics_read_is_stuck(gateway_factory, upstream, store_url):
    """The report connection's thread is held; /admin/metrics waits for it, and a /v1
    request sent meanwhile is answered before the admin request is (SQLite: the reads that
    used to run on the store thread and the event loop)."""
    import httpx

    from tests.conftest import MASTER_KEY
    from tests.test_accounting import HELLO, start

    gw = start(gateway_factory, upstream)
    _, key = gw.make_user(energy=100)
    gw.run(gw.store.report_query("SELECT 1", []))  # the report connection and thread exist
    release = threading.Event()
    gw.store._reports._executor.submit(release.wait, 30)  # the thread is busy until released
    admin: dict[str, Any] = {}

    def ask_metrics() -> None:
        admin["response"] = httpx.get(gw.url + "/admin/metrics?window=30d", timeout=30,
                                      headers={"Authorization": f"Bearer {MASTER_KEY}"})

    asker = threading.Thread(target=ask_metrics)
    asker.start()
    try:
        answer = gw.client(key).chat.completions.create(model="gpt-4o", messages=HELLO)
        assert answer.choices[0].message.content
        assert gw.client(key).with_options(max_retries=0).models.list().data
        assert "response" not in admin and asker.is_alive()  # still waiting for its read
    finally:
        release.set()
        asker.join(30)
    assert admin["response"].status_code == 200
    assert "totalRequests" in admin["response"].json()
