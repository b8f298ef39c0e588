"""Latency percentiles an operator can trust (gateway/store/rollup.py, "The fine histogram"):
p50/p90/p95/p99 of latency and time to first byte are within 5% of the exact nearest-rank
percentile over the same rows (the fine histogram bounds the error at 4%), for uniform,
lognormal, bimodal, all-equal and tiny samples, on SQLite and PostgreSQL, from the store,
the /admin/metrics API (what the dashboard page reads) and `./gw usage metrics`.

History written before migration 18 is reported approximately (the coarse buckets,
interpolated, `percentilesApproximate`) until the backfill has added it; the backfill is
idempotent, resumable in any order, and safe from several callers at once.
"""

from __future__ import annotations

import asyncio
import math
import random
import sqlite3
import time
from typing import Any, Callable

import asyncpg
import httpx
import pytest
import yaml

from gateway.admin import reports
from gateway.store import backfill, migrations, open_store
from gateway.store import rollup
from tests import test_store
from tests.conftest import MASTER_KEY
from tests.test_reports import cli_json
from tests.test_reports_db import create_previous_release, direct_pg, exact_percentile

store_url = test_store.store_url  # the fixture of both backends

DAY = 86400.0
PERCENTILES = (50, 90, 95, 99)
TOLERANCE = 0.05  # what the issue asks; the histogram's bound is rollup.HIST_ALPHA (4%)


def lognormal(rnd: random.Random, n: int) -> list[int]:
    return [int(rnd.lognormvariate(7.6, 0.5)) for _ in range(n)]  # ~2,000 ms, as the issue's seed


def bimodal(rnd: random.Random, n: int) -> list[int]:
    """A fast mode (cache hits, ~120 ms) and a slow one (long answers, ~3,800 ms)."""
    return [max(1, int(rnd.gauss(120, 20) if rnd.random() < 0.7 else rnd.gauss(3800, 400))) for _ in range(n)]


DISTRIBUTIONS: dict[str, Callable[[random.Random], list[int]]] = {
    "uniform": lambda rnd: [rnd.randint(0, 5000) for _ in range(1500)],
    "lognormal": lambda rnd: lognormal(rnd, 1500),
    "bimodal": lambda rnd: bimodal(rnd, 1500),
    "heavy tail with zeros": lambda rnd: [0] * 50 + [int(rnd.paretovariate(1.2) * 40) for _ in range(1000)],
    "all equal": lambda rnd: [2078] * 300,
    "one row": lambda rnd: [2078],
    "two rows": lambda rnd: [7, 30_000],
    "three small rows": lambda rnd: [0, 1, 2],
}


def usage_rows(latencies: list[int], ttfbs: list[int | None], now: float, rnd: random.Random,
               prefix: str = "r", span: float = 3 * DAY) -> list[dict[str, Any]]:
    """One row per latency, over the last `span` seconds, in two workspaces."""
    return [{"request_id": f"{prefix}{i}", "user_id": f"usr_{i % 5}", "workspace_id": f"ws_{i % 2}",
             "action": "ai_message", "provider": "openai", "model": "gpt-4o", "status": 200,
             "latency_ms": lat, "ttfb_ms": ttfb, "created_at": now - rnd.uniform(0, span)}
            for i, (lat, ttfb) in enumerate(zip(latencies, ttfbs))]


def assert_within(board: dict[str, Any], rows: list[dict[str, Any]], tolerance: float = TOLERANCE) -> None:
    """Every percentile of `board` within `tolerance` of the exact one over `rows`."""
    for name, column in (("latency", "latency_ms"), ("ttfb", "ttfb_ms")):
        values = [r[column] for r in rows if r[column] is not None]
        for p in PERCENTILES:
            got = board[f"{name}P{p}"]
            if not values:
                assert got is None
                continue
            exact = exact_percentile(values, p)
            assert abs(got - exact) <= tolerance * exact, (name, p, got, exact)


def window(rows: list[dict[str, Any]], since: float, workspace: str | None = None) -> list[dict[str, Any]]:
    return [r for r in rows if r["created_at"] >= since and (workspace is None or r["workspace_id"] == workspace)]


# ------------------------------------------------------------------------ the mapping


def test_every_whole_ms_value_is_reported_within_4_percent_of_itself():
    """The bound is a property of the buckets, not of a sample: checked for every value
    from 0 to 20,000 ms and every 97th up to 10,000,000 ms (2.8 hours)."""
    for value in [*range(0, 20_001), *range(20_000, 10_000_001, 97)]:
        shown = rollup.hist_percentile({rollup.hist_bucket(value): 1}, 50, largest=10**12)
        assert abs(shown - value) <= rollup.HIST_ALPHA * value + 0.005, (value, shown)  # +0.005: 2 decimals


def test_small_whole_values_are_reported_exactly():
    """Below ~12 ms a bucket spans at most one whole ms: the value itself, not a midpoint."""
    for value in range(0, 13):
        assert rollup.hist_percentile({rollup.hist_bucket(value): 3}, 95, largest=10**6) == value


def test_a_percentile_is_never_above_the_largest_value_seen():
    assert rollup.hist_percentile({rollup.hist_bucket(2078): 10}, 99, largest=10**6) > 2080  # the bucket's value
    assert rollup.hist_percentile({rollup.hist_bucket(2078): 10}, 99, largest=2080) == 2080


def test_the_gaps_and_merges_of_backfilled_ranges():
    assert rollup.hist_gaps(0, 100, []) == [(0, 100)]
    assert rollup.hist_gaps(0, 100, [(10, 20), (50, 200)]) == [(0, 10), (20, 50)]
    assert rollup.hist_gaps(10, 20, [(0, 30)]) == []
    assert rollup.hist_merge(20, 50, [(0, 20), (50, 60), (70, 80)]) == ([0, 50], (0, 60))
    assert rollup.hist_merge(100, 110, [(0, 20)]) == ([], (100, 110))
    assert rollup.hist_union([(150, 401), (1, 281), (500, 600), (600, 700)]) == [(1, 401), (500, 700)]


# --------------------------------------------------------------- the store, both backends


@pytest.mark.asyncio
@pytest.mark.parametrize("distribution", list(DISTRIBUTIONS))
async def test_percentiles_are_within_5_percent_of_the_exact_nearest_rank(store_url, distribution):
    rnd = random.Random(distribution)
    latencies = DISTRIBUTIONS[distribution](rnd)
    ttfbs = [None if rnd.random() < 0.1 else int(v * rnd.uniform(0.05, 0.5)) for v in latencies]
    now = time.time()
    rows = usage_rows(latencies, ttfbs, now, rnd)
    async with open_store(store_url) as store:
        assert await store.insert_usage(rows) == len(rows)
        # 7 days: whole days, hours and the raw rows of the first partial hour; 1 day: hours and raw rows
        for since, workspace in ((now - 7 * DAY, None), (now - DAY, None), (now - 7 * DAY, "ws_1")):
            board = await reports.dashboard(store, since, workspace)
            assert board["percentilesApproximate"] is False
            assert_within(board, window(rows, since, workspace))


@pytest.mark.asyncio
async def test_an_empty_window_has_no_percentiles(store_url):
    async with open_store(store_url) as store:
        board = await reports.dashboard(store, time.time() - DAY)
        assert [board[f"latencyP{p}"] for p in PERCENTILES] == [None] * 4
        assert board["percentilesApproximate"] is False


async def forget_histogram(url: str) -> None:
    """What migration 18 finds on a store with history: no fine counts, the boundary above
    every row (an older release's rows)."""
    sql = ["DELETE FROM usage_latency_hist", "DELETE FROM usage_latency_hist_daily",
           "UPDATE usage_latency_hist_coverage SET live_from_id = (SELECT MAX(id) + 1 FROM ai_usage_logs)"]
    if url.startswith("sqlite"):
        db = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
        for statement in sql:
            db.execute(statement)
        db.close()
        return
    base, schema = direct_pg(url)
    conn = await asyncpg.connect(base, server_settings={"search_path": schema})
    try:
        for statement in sql:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_history_before_migration_18_is_approximate_until_the_backfill_adds_it(store_url):
    """A store of the previous release (migrations up to 17) with rows: after migration 18
    its history is reported from the coarse buckets, interpolated, and flagged; rows written
    since are kept live; the backfill, in chunks out of order and repeated, makes the
    window covered and every percentile within 5%."""
    rnd = random.Random(18)
    now = time.time()
    old = [{"request_id": f"old{i}", "user_id": "usr_a", "workspace_id": "ws_1", "action": "ai_message",
            "model": "gpt-4o", "cost_usd": 0.0, "latency_ms": v, "tokens_total": 10,
            "created_at": now - rnd.uniform(0, 4 * DAY)} for i, v in enumerate(lognormal(rnd, 400))]
    await create_previous_release(store_url, old, through=rollup.HIST_IN - 1)
    for r in old:
        r["ttfb_ms"] = None  # not among the columns the previous release's rows were written with
    async with open_store(store_url) as store:
        coverage = await store.latency_histogram_coverage()
        assert coverage["live_from_id"] == 401 and coverage["pending"] == [(1, 401)] and not coverage["complete"]
        new = usage_rows(bimodal(rnd, 200), [None] * 200, now, rnd, prefix="new", span=DAY)
        assert await store.insert_usage(new) == 200
        rows, since = old + new, now - 7 * DAY

        board = await reports.dashboard(store, since)
        assert board["percentilesApproximate"] is True
        latencies = sorted(r["latency_ms"] for r in rows)
        for p in PERCENTILES:  # the coarse bucket's bounds around the exact value
            exact = exact_percentile(latencies, p)
            upper = next((b for b in rollup.LATENCY_BOUNDS_MS if exact <= b), max(latencies))
            lower = max([0, *(b for b in rollup.LATENCY_BOUNDS_MS if b < exact)])
            assert lower <= board[f"latencyP{p}"] <= upper

        assert await store.backfill_latency_histogram(200, 300) == 100
        assert await store.backfill_latency_histogram(250, 350) == 50  # only the part not added yet
        assert await store.backfill_latency_histogram(200, 300) == 0  # a repeated chunk adds nothing
        assert await store.backfill_latency_histogram(401, 10_000) == 0  # kept live: never added again
        assert (await store.latency_histogram_coverage())["pending"] == [(1, 200), (350, 401)]
        assert (await reports.dashboard(store, since))["percentilesApproximate"] is True  # still partial
        assert await store.run_latency_histogram_backfill(chunk=64) == 250
        coverage = await store.latency_histogram_coverage()
        assert coverage["complete"] and coverage["backfilled"] == [(1, 401)]

        board = await reports.dashboard(store, since)
        assert board["percentilesApproximate"] is False
        assert_within(board, rows)
        assert_within(await reports.dashboard(store, now - DAY), window(rows, now - DAY))


async def _previous_release_with_history(store_url: str, rnd: random.Random, now: float, n: int = 400
                                        ) -> list[dict[str, Any]]:
    """A store of the release before migration 18 (migrations up to 17) with `n` usage rows."""
    old = [{"request_id": f"old{i}", "user_id": "usr_a", "workspace_id": f"ws_{i % 2}", "action": "ai_message",
            "model": "gpt-4o", "cost_usd": 0.0, "latency_ms": v, "tokens_total": 10,
            "created_at": now - rnd.uniform(0, 4 * DAY)} for i, v in enumerate(lognormal(rnd, n))]
    await create_previous_release(store_url, old, through=rollup.HIST_IN - 1)
    for r in old:
        r["ttfb_ms"] = None  # not among the columns the previous release's rows were written with
    return old


@pytest.fixture
def only_this_release_backfills(monkeypatch):
    """The registry as released (tests/upgrade_launcher.py, imported by other test modules,
    registers a backfill of its own whose tables these stores do not have)."""
    monkeypatch.setattr(backfill, "BACKFILLS", [b for b in backfill.BACKFILLS if b.name != "test_rollup_models"])


def _latency_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    (state,) = [s for s in states if s["name"] == "latency_histogram"]
    return state


@pytest.mark.asyncio
async def test_the_migration_plan_lists_the_latency_backfill_of_a_store_before_migration_18(store_url, only_this_release_backfills):
    await _previous_release_with_history(store_url, random.Random(1), time.time(), n=120)
    store = open_store(store_url)
    await store.open(migrate=False)
    try:
        plan = await migrations.plan(store, 0.25)
    finally:
        await store.close()
    assert [m["version"] for m in plan["migrations"]][:1] == [rollup.HIST_IN]
    assert [(b["name"], b["migration"], b["rows"]) for b in plan["backfills"]] == \
           [("latency_histogram", rollup.HIST_IN, 120)]


@pytest.mark.asyncio
async def test_a_new_database_registers_no_latency_backfill_to_do(store_url, only_this_release_backfills):
    store = open_store(store_url)
    await store.open(migrate=False)
    try:
        assert (await migrations.plan(store, 0.25))["backfills"] == []
        await store.migrate()
        state = _latency_state(await store.backfill_states())
        assert state["lo"] == state["hi"] and state["finished_at"] is not None
        assert backfill.summary(await store.backfill_states()) is None
        assert (await store.latency_histogram_coverage())["complete"]
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_the_background_backfill_makes_history_before_migration_18_exact_and_resumes(store_url, only_this_release_backfills):
    """The framework's `latency_histogram` backfill (registered with migration 20 over
    [min id, live_from_id)) on a store of the release before migration 18: counted in
    "backfilling, N%", interrupted after two chunks (a SIGKILL leaves the committed ones)
    with a manual `backfill_latency_histogram` call in between, then resumed by another
    runner: every row counted once (the fine counts equal the rollup's, so the window is
    exact), every percentile within 5%."""
    rnd = random.Random(20)
    now = time.time()
    old = await _previous_release_with_history(store_url, rnd, now)
    async with open_store(store_url) as store:
        state = _latency_state(await store.backfill_states())
        assert (state["lo"], state["hi"], state["next_id"], state["finished_at"]) == (1, 401, 401, None)
        new = usage_rows(bimodal(rnd, 200), [None] * 200, now, rnd, prefix="new", span=DAY)
        assert await store.insert_usage(new) == 200
        rows, since = old + new, now - 7 * DAY
        progress = backfill.summary(await store.backfill_states())
        assert progress["note"].startswith("backfilling, 0%: usage_latency_hist, usage_latency_hist_daily")
        assert (await reports.dashboard(store, since))["percentilesApproximate"] is True

        job = backfill.by_name("latency_histogram")
        for _ in range(2):  # the first process: two chunks committed, then killed (its lease left)
            state = await store.backfill_step(job, "killed", 60, lease=30)
        assert state["next_id"] == 281 and state["done_rows"] == 120
        assert backfill.summary(await store.backfill_states())["percent"] == 30.0
        assert await store.backfill_latency_histogram(150, 300) == 131  # the old helper: only [150, 281)
        # Another process: waits for the dead one's lease, then takes over where it stopped.
        assert await store.backfill_step(job, "next", 60, lease=30) is None
        state = await store.backfill_step(job, "next", 60, lease=30, now=time.time() + 31)  # the lease expired
        assert state["next_id"] == 221 and state["done_rows"] == 180
        await backfill.BackfillRunner(store, pace=1.0, start_delay=0, owner="next").run()

        state = _latency_state(await store.backfill_states())
        assert state["finished_at"] is not None and state["done_rows"] == 400 and state["next_id"] == 1
        assert backfill.summary(await store.backfill_states()) is None
        coverage = await store.latency_histogram_coverage()
        assert coverage["complete"] and coverage["backfilled"] == [(1, 401)]
        board = await reports.dashboard(store, since)
        assert board["percentilesApproximate"] is False
        assert_within(board, rows)
        for ws in ("ws_0", "ws_1"):
            board = await reports.dashboard(store, now - DAY, ws)
            assert board["percentilesApproximate"] is False
            assert_within(board, window(rows, now - DAY, ws))


@pytest.mark.asyncio
async def test_a_store_migrated_before_the_backfill_was_registered_gets_it_over_its_own_boundary(
        store_url, only_this_release_backfills, monkeypatch):
    """A store that went through migrations 18 and 20 with a release that did not register
    the latency backfill (rows written since, kept live): the next start registers it over
    [oldest id, live_from_id) from migration 18's record, not over the rows there now, so
    the live rows are not counted twice; the runner then makes the window exact."""
    rnd = random.Random(21)
    now = time.time()
    old = await _previous_release_with_history(store_url, rnd, now)
    released = backfill.BACKFILLS
    monkeypatch.setattr(backfill, "BACKFILLS", [])  # the release that migrated it
    async with open_store(store_url) as store:
        new = usage_rows(bimodal(rnd, 200), [None] * 200, now, rnd, prefix="new", span=DAY)
        assert await store.insert_usage(new) == 200
        assert await store.backfill_states() == []
    monkeypatch.setattr(backfill, "BACKFILLS", released)
    store = open_store(store_url)
    await store.open(migrate=False)
    try:
        plan = await migrations.plan(store, 0.25)
        assert plan["migrations"] == [] and [b["name"] for b in plan["backfills"]] == ["latency_histogram"]
        await store.migrate()
        state = _latency_state(await store.backfill_states())
        assert (state["lo"], state["hi"], state["finished_at"]) == (1, 401, None)
        await store.migrate()  # registered once
        assert len(await store.backfill_states()) == 1
        await backfill.BackfillRunner(store, pace=1.0, start_delay=0).run()
        assert _latency_state(await store.backfill_states())["done_rows"] == 400
        board = await reports.dashboard(store, now - 7 * DAY)
        assert board["percentilesApproximate"] is False
        assert_within(board, old + new)
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_backfills_running_at_once_count_each_row_once(store_url):
    rnd = random.Random(5)
    now = time.time()
    rows = usage_rows(lognormal(rnd, 600), lognormal(rnd, 600), now, rnd)
    async with open_store(store_url) as store:
        await store.insert_usage(rows)
        await forget_histogram(store_url)
        assert not (await store.latency_histogram_coverage())["complete"]
        chunks = [(lo, lo + 150) for lo in range(1, 601, 50)]  # overlapping, from several "processes"
        added = await asyncio.gather(*(store.backfill_latency_histogram(lo, hi) for lo, hi in chunks))
        assert sum(added) == 600
        assert (await store.latency_histogram_coverage())["complete"]
        board = await reports.dashboard(store, now - 7 * DAY)
        assert board["percentilesApproximate"] is False  # the fine counts equal the rollup's
        assert_within(board, rows)


@pytest.mark.asyncio
@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
async def test_rows_an_older_release_inserts_are_counted_on_postgresql(store_url):
    """During a rolling deploy the previous release inserts its rows with its own statement:
    the trigger counts them too, so the window stays covered."""
    rnd = random.Random(3)
    now = time.time()
    rows = usage_rows(lognormal(rnd, 100), lognormal(rnd, 100), now, rnd)
    async with open_store(store_url) as store:
        await store.insert_usage(rows[:50])
        base, schema = direct_pg(store_url)
        conn = await asyncpg.connect(base, server_settings={"search_path": schema})
        try:
            columns = ("request_id", "workspace_id", "latency_ms", "ttfb_ms", "created_at")
            for r in rows[50:]:  # one INSERT per row, as the release before the rollups did
                await conn.execute(
                    f"INSERT INTO ai_usage_logs ({', '.join(columns)}) VALUES ($1, $2, $3, $4, to_timestamp($5))",
                    *(r[c] for c in columns))
            # ... and the rollup rows its statement adds (its insert keeps them)
            for sql in rollup.backfill("postgres", where="id > 50"):
                await conn.execute(sql)
        finally:
            await conn.close()
        board = await reports.dashboard(store, now - 7 * DAY)
        assert board["totalRequests"] == 100 and board["percentilesApproximate"] is False
        assert_within(board, rows)


# ------------------------------------------------------ the API, the CLI, the page's source


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_the_api_and_the_cli_report_percentiles_within_5_percent(gateway_factory, upstream, tmp_path, capsys):
    """The numbers of /admin/metrics (the dashboard page's source) and `./gw usage metrics`
    against the exact percentiles of the seeded rows: a lognormal around 2 s and a bimodal
    workspace, as the issue's 6,889-request seed."""
    gw = gateway_factory()
    rnd = random.Random(6889)
    now = time.time()
    latencies = lognormal(rnd, 3000) + bimodal(rnd, 1000)
    rows = usage_rows(latencies, [int(v * rnd.uniform(0.1, 0.4)) for v in latencies], now, rnd)
    gw.make_user(workspace="acme")
    acme = gw.run(gw.store.get_workspace("acme")).id
    for r in rows:
        r["workspace_id"] = acme if r["workspace_id"] == "ws_0" else r["workspace_id"]
    assert gw.run(gw.store.insert_usage(rows)) == len(rows)

    response = httpx.get(gw.url + "/admin/metrics?window=7d", headers={"Authorization": f"Bearer {MASTER_KEY}"},
                         timeout=30)
    assert response.status_code == 200
    metrics = response.json()
    assert metrics["percentilesApproximate"] is False
    assert_within(metrics, window(rows, now - 7 * DAY))
    ws = httpx.get(gw.url + "/admin/metrics?window=1d&workspace=acme",
                   headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30).json()
    assert ws["workspaceId"] == acme
    assert_within(ws, window(rows, now - DAY, acme))

    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({"store": {"url": gw.config.store.url}, "models": [
        {"name": "demo", "litellm_params": {"model": "demo/offline"}}]}))
    cli = cli_json(capsys, config, "usage", "metrics", "--window", "7d")
    assert cli["percentilesApproximate"] is False
    assert_within(cli, window(rows, now - 7 * DAY))
    assert {k: cli[k] for k in cli if k.startswith(("latencyP", "ttfbP"))} == \
           {k: metrics[k] for k in metrics if k.startswith(("latencyP", "ttfbP"))}


def test_the_cli_refuses_a_bad_window(tmp_path, capsys):
    from proxy import main

    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({"store": {"url": f"sqlite:///{tmp_path}/g.db"}, "models": [
        {"name": "demo", "litellm_params": {"model": "demo/offline"}}]}))
    assert main(["usage", "metrics", "--window", "soon", "--config", str(config)]) == 2
    assert "window" in capsys.readouterr().err


def test_issue_numbers_are_now_within_5_percent():
    """The issue's figures, p50 3,000 ms for an exact 2,078 and p95 4,000 for 3,800, as the
    fine histogram reports them."""
    for exact in (2078, 3800):
        shown = rollup.hist_percentile({rollup.hist_bucket(exact): 1}, 50, largest=10**6)
        assert abs(shown - exact) / exact <= rollup.HIST_ALPHA
    assert math.isclose(rollup.HIST_GAMMA, 13 / 12)
