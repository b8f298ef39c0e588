"""Upgrades without downtime (docs/upgrades.md).

* The migrations from 17 on break none of the online rules (gateway/store/migrations.py).
* A store of the previous release (PREVIOUS, run from a git worktree of it, seeded with
  UPGRADE_ROWS usage rows: 2,000,000 unless GW_UPGRADE_ROWS says otherwise) is served by
  this release while its history is backfilled: /health and a /v1 request answer before
  the backfill is done, /admin/metrics says "backfilling, N%", a SIGKILL during the
  backfill resumes it where its last chunk committed (no chunk counted twice), and the
  backfilled rollup is exact once it completes. Marked `big_store` (a few minutes in all:
  `-m "not big_store"` leaves them out).
* The previous release and this one serve together on one PostgreSQL schema: money exact
  for 2N concurrent requests with N affordable, every answered request has its usage row.
* A usage row the database refuses stays in the endings journal at shutdown and is
  written by the next start; `serve` refuses a schema with a contract step it does not
  know, naming both versions; `./gw migrate --plan` says what will run.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
import yaml

from gateway import money
from gateway.admin import reports
from gateway.store import backfill, migrations, open_store, rollup
from gateway.store import postgres as store_postgres
from gateway.store.postgres import MIGRATIONS as PG_MIGRATIONS
from gateway.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from tests.fakes import free_port
from tests.upgrade_launcher import TEST_FAMILY, table_ddl

ROOT = Path(__file__).resolve().parent.parent
PREVIOUS = "fca89f3"  # the last release (docs/upgrades.md: which releases may overlap)
PG_URL = os.environ.get("GATEWAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
UPGRADE_ROWS = int(os.environ.get("GW_UPGRADE_ROWS", "2000000"))
MASTER = "gw-master-upgrades-0123456789"
ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


# ------------------------------------------------------------------ the static rules


@pytest.mark.parametrize("dialect, table", [("sqlite", SQLITE_MIGRATIONS), ("postgres", PG_MIGRATIONS)])
def test_migrations_from_17_on_are_bounded_and_expand_only(dialect, table):
    broken = {v: migrations.forbidden(sql) for v, sql in table if v >= migrations.CHECKED_FROM}
    assert {v: rules for v, rules in broken.items() if rules} == {}


@pytest.mark.parametrize("sql", [
    "ALTER TABLE ai_usage_logs ALTER COLUMN cost_usd TYPE numeric(20, 9)",
    "ALTER TABLE ai_usage_logs ADD COLUMN tenant text NOT NULL",
    "ALTER TABLE ai_usage_logs ADD COLUMN seen timestamptz DEFAULT now()",
    "ALTER TABLE ai_usage_logs DROP COLUMN prospect_id",
    "ALTER TABLE ai_usage_logs RENAME COLUMN action TO kind",
    "CREATE INDEX ai_usage_logs_model ON ai_usage_logs (model)",
    "CREATE UNIQUE INDEX IF NOT EXISTS ledger_x ON energy_ledger (request_id)",
    "INSERT INTO usage_rollup_new SELECT model, count(*) FROM ai_usage_logs GROUP BY model",
    "UPDATE ai_usage_logs SET tokens_total = tokens_prompt + tokens_completion",
    "DELETE FROM ai_usage_logs WHERE created_at < now()",
    "ALTER TABLE ai_usage_logs ADD CONSTRAINT positive CHECK (tokens_total >= 0)",
    "ALTER TABLE users ALTER COLUMN name SET NOT NULL",
])
def test_a_statement_that_locks_rewrites_or_reads_history_is_refused(sql):
    assert migrations.forbidden(sql)


@pytest.mark.parametrize("sql", [
    "CREATE TABLE budgets (id text PRIMARY KEY, amount bigint NOT NULL)",
    "ALTER TABLE ai_usage_logs ADD COLUMN budget_id text",
    "ALTER TABLE ai_usage_logs ADD COLUMN retried_calls bigint NOT NULL DEFAULT 0",
    "CREATE INDEX CONCURRENTLY ai_usage_logs_budget ON ai_usage_logs (budget_id);",
    "CREATE INDEX budgets_ws ON budgets (workspace_id)",
    "ALTER TABLE ai_usage_logs ADD CONSTRAINT positive CHECK (tokens_total >= 0) NOT VALID",
    "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN UPDATE ai_usage_logs SET x = 1; END $$",
])
def test_an_expand_only_bounded_statement_passes(sql):
    assert migrations.forbidden(sql) == []


def test_concurrent_indexes_leave_the_transaction():
    sql = "CREATE TABLE t (a int);\nCREATE UNIQUE INDEX CONCURRENTLY t_a ON t (a);\nSELECT 1;"
    inside, concurrent = migrations.split_concurrent(sql)
    assert "CONCURRENTLY" not in inside and "CREATE TABLE t" in inside
    assert concurrent == ["CREATE UNIQUE INDEX CONCURRENTLY t_a ON t (a)"]
    assert migrations.if_not_exists(concurrent[0]).startswith("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS t_a")


# ------------------------------------------------------------ helpers: stores, processes


async def _pg_available() -> None:
    try:
        conn = await asyncpg.connect(PG_URL, timeout=5)
        await conn.close()
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL unreachable at {PG_URL}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {exc}")


@pytest.fixture
def store_url(request, tmp_path):
    """`sqlite` or `postgres` (a schema of its own, dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/gateway.db"
        return
    asyncio.run(_pg_available())
    schema = "t_" + uuid.uuid4().hex[:12]
    yield f"{PG_URL}?schema={schema}"

    async def drop() -> None:
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory):
    """A git worktree of the previous release (the clone has the history), removed after."""
    path = tmp_path_factory.mktemp("previous") / "release"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), PREVIOUS], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)


def write_config(tmp_path: Path, name: str, upstream: Any, store_url: str, port: int, **store: Any) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace": 3},
        "store": {"url": store_url, "journal_dir": str(tmp_path / f"journal-{name}"), **store},
        "auth": {"master_key": MASTER, "default_tier": "free"},
        "retries": {"max_attempts": 1},
        "models": [{"name": "gpt-4o-mini", "litellm_params": {
            "model": "openai/gpt-4o-mini", "api_base": upstream.openai_base, "api_key": "sk-upstream"}}],
        "tiers": {"free": {"models": ["gpt-4o-mini"]}, "pro": {"models": ["*"]}},
        "energy": {"actions": {"ai_message": {"default": 1}}},
        "plugins": ["request_log", "auth", "tier_policy", "energy", "accounting"],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(cwd: Path, config: Path, *args: str, script: str = "proxy.py", check: bool = True
            ) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, script, *args, "--config", str(config)], cwd=cwd, env=ENV,
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def start(cwd: Path, config: Path, script: str = "proxy.py") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, script, "serve", "--config", str(config)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> str:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway died: {proc.stdout.read() if proc.stdout else ''}"[-3000:])
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("gateway never answered /health")


def ask(url: str, key: str) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
    return client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])


async def sql(store_url: str, statement: str, *args: Any) -> list[tuple]:
    """One statement on the store's database, outside any gateway."""
    if store_url.startswith("sqlite:///"):
        db = sqlite3.connect(store_url[len("sqlite:///"):], timeout=30)
        try:
            rows = db.execute(statement, args).fetchall()
            db.commit()
            return rows
        finally:
            db.close()
    schema = store_url.split("schema=")[1]
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        numbered = statement
        for i in range(statement.count("?")):
            numbered = numbered.replace("?", f"${i + 1}", 1)
        return [tuple(r) for r in await conn.fetch(numbered, *args)]
    finally:
        await conn.close()


def seed_usage(store_url: str, rows: int) -> None:
    """`rows` usage rows over the last 60 days, written straight by SQL (a recursive CTE on
    SQLite, generate_series on PostgreSQL), and added to the rollups as the previous
    release's insert_usage would have (its schema, version 16): the history of a store in
    service."""
    span = 60 * 86400
    now = int(time.time())
    rolled = rollup.backfill("sqlite" if store_url.startswith("sqlite") else "postgres",
                             families=rollup.as_of(16))
    if store_url.startswith("sqlite:///"):
        db = sqlite3.connect(store_url[len("sqlite:///"):])
        db.create_function("gw_usd_nano", 1, lambda v: None if v is None else money.to_nano(v))
        db.execute(
            "INSERT INTO ai_usage_logs (request_id, user_id, workspace_id, model, provider, action, tokens_prompt,"
            " tokens_completion, tokens_total, cost_usd, status, latency_ms, created_at)"
            " WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            " SELECT 'seed-' || i, 'u' || (i % 50), 'ws', CASE i % 3 WHEN 0 THEN 'gpt-4o-mini' WHEN 1 THEN 'gpt-4o'"
            " ELSE 'claude' END, 'openai', 'ai_message', i % 70, i % 30, i % 100, (i % 1000) * 1000, 200, i % 900,"
            " strftime('%Y-%m-%dT%H:%M:%S', ? + i * ? / ?, 'unixepoch') || '.000000Z' FROM n",
            (rows, now - span, span, rows))
        for statement in rolled:
            db.execute(statement)
        db.commit()
        db.close()
        return

    async def go() -> None:
        schema = store_url.split("schema=")[1]
        conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
        try:
            await conn.execute("SELECT DISTINCT ai_usage_partition(now() - d * interval '1 day')"
                               " FROM generate_series(0, 61) AS d")
            await conn.execute(
                "INSERT INTO ai_usage_logs (request_id, user_id, workspace_id, model, provider, action, tokens_prompt,"
                " tokens_completion, tokens_total, cost_usd, status, latency_ms, created_at)"
                " SELECT 'seed-' || i, 'u' || (i % 50), 'ws', CASE i % 3 WHEN 0 THEN 'gpt-4o-mini' WHEN 1 THEN"
                " 'gpt-4o' ELSE 'claude' END, 'openai', 'ai_message', i % 70, i % 30, i % 100, (i % 1000) / 1e6, 200,"
                " i % 900, to_timestamp($2::float8 + i * $3::float8 / $1)"
                " FROM generate_series(1, $1) AS i", rows, float(now - span), float(span))
            for statement in rolled:
                await conn.execute(statement)
            await conn.execute("ANALYZE ai_usage_logs")
        finally:
            await conn.close()

    asyncio.run(go())


def previous_store(previous: Path, tmp_path: Path, upstream: Any, store_url: str, *, energy: int = 100
                   ) -> tuple[str, str]:
    """A store made by the previous release's own code: a workspace and a user. (user id, key)"""
    config = write_config(tmp_path, "previous-cli", upstream, store_url, free_port())
    run_cli(previous, config, "workspaces", "create", "acme")
    user = json.loads(run_cli(previous, config, "users", "create", "--workspace", "acme", "--tier", "pro",
                              "--energy", str(energy), "--json").stdout)
    versions = asyncio.run(sql(store_url, "SELECT max(version) FROM schema_migrations"))[0][0]
    assert versions == 16, "the previous release's schema"
    return user["user_id"] if "user_id" in user else user["id"], user["api_key"]


def backfill_state(store_url: str, name: str = "test_rollup_models") -> dict[str, Any]:
    rows = asyncio.run(sql(store_url, f"SELECT {', '.join(backfill.STATE_COLUMNS)} FROM gw_backfills"
                                      " WHERE name = ?", name))
    return dict(zip(backfill.STATE_COLUMNS, rows[0])) if rows else {}


def assert_latency_exact(store_url: str) -> None:
    """The dashboard over the whole history reads the fine latency histogram (its counts
    equal the rollup's: no row counted twice, none missed) and every percentile is within
    5% of the exact nearest-rank one over the rows (docs/usage.md "Latency percentiles")."""
    async def board() -> dict[str, Any]:
        async with open_store(store_url) as store:
            return await reports.dashboard(store, time.time() - 62 * 86400)

    shown = asyncio.run(board())
    assert shown["percentilesApproximate"] is False
    for name, column in (("latency", "latency_ms"), ("ttfb", "ttfb_ms")):
        n = asyncio.run(sql(store_url, f"SELECT count({column}) FROM ai_usage_logs"))[0][0]
        for p in (50, 90, 95, 99):
            if not n:
                assert shown[f"{name}P{p}"] is None
                continue
            rank = max(1, math.ceil(p / 100 * n))
            exact = asyncio.run(sql(store_url, f"SELECT {column} FROM ai_usage_logs WHERE {column} IS NOT NULL"
                                               f" ORDER BY {column} LIMIT 1 OFFSET {rank - 1}"))[0][0]
            assert abs(shown[f"{name}P{p}"] - exact) <= 0.05 * exact, (name, p, shown[f"{name}P{p}"], exact)


# -------------------------------------------------- the previous release's store, upgraded


@pytest.mark.big_store
@pytest.mark.timeout(900)
@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_a_previous_release_store_serves_at_once_and_its_backfill_survives_sigkill(
        previous_release, upstream, store_url, tmp_path):
    _, key = previous_store(previous_release, tmp_path, upstream, store_url, energy=1000)
    seed_usage(store_url, UPGRADE_ROWS)
    dialect = "sqlite" if store_url.startswith("sqlite") else "postgres"
    for ddl in table_ddl(dialect):  # the backfill's tables, as its migration would make them
        asyncio.run(sql(store_url, ddl))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path, "current", upstream, store_url, port, backfill_pace=1.0)

    plan = run_cli(ROOT, config, "migrate", "--plan", script="tests/upgrade_launcher.py").stdout
    assert "20  background backfills (gw_backfills)" in plan
    assert f"test_rollup_models (migration 20): {UPGRADE_ROWS:,} rows" in plan
    assert f"latency_histogram (migration 18): {UPGRADE_ROWS:,} rows" in plan

    started = time.monotonic()
    proc = start(ROOT, config, script="tests/upgrade_launcher.py")
    try:
        wait_health(url, proc)
        answer = ask(url, key)
        serving = time.monotonic() - started
        assert answer.choices[0].message.content
        state = backfill_state(store_url)
        assert state["finished_at"] is None, "served before the history was backfilled"
        print(f"\n{dialect}: {UPGRADE_ROWS:,} rows of the previous release, /health and /v1 answered"
              f" {serving:.2f} s after start (backfill at {backfill.percent(state)}%)")
        metrics = httpx.get(url + "/admin/metrics", headers={"Authorization": f"Bearer {MASTER}"}).json()
        assert metrics["backfill"]["note"].startswith("backfilling, ")
        assert {b["name"] for b in metrics["backfill"]["backfills"]} == {"latency_histogram", "test_rollup_models"}

        total = state["hi"] - state["lo"]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # a part of it done, then SIGKILL
            state = backfill_state(store_url)
            if state["done_rows"] >= total * 0.2 or state["finished_at"] is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc, signal.SIGKILL)
    killed = backfill_state(store_url)
    assert killed["finished_at"] is None and killed["done_rows"] > 0, killed

    proc = start(ROOT, config, script="tests/upgrade_launcher.py")
    try:
        wait_health(url, proc)
        resumed = backfill_state(store_url)
        assert resumed["next_id"] <= killed["next_id"] and resumed["done_rows"] >= killed["done_rows"]
        assert resumed["started_at"] == killed["started_at"], "resumed, not started over"
        deadline = time.monotonic() + 600
        while any(backfill_state(store_url, name)["finished_at"] is None
                  for name in ("test_rollup_models", "latency_histogram")):
            assert time.monotonic() < deadline, "the backfills never finished"
            time.sleep(0.2)
        metrics = httpx.get(url + "/admin/metrics", headers={"Authorization": f"Bearer {MASTER}"}).json()
        assert metrics["backfill"] is None
    finally:
        stop(proc)
    done = backfill_state(store_url)
    history = asyncio.run(sql(store_url, "SELECT count(*) FROM ai_usage_logs WHERE id >= ? AND id < ?",
                              done["lo"], done["hi"]))[0][0]
    assert done["done_rows"] == history == UPGRADE_ROWS, "every row of the history once, none twice"
    for grain, table in TEST_FAMILY.tables.items():
        rolled = asyncio.run(sql(store_url, f"SELECT model, sum(requests), sum(tokens_total), sum(cost_usd)"
                                            f" FROM {table} GROUP BY model ORDER BY model"))
        raw = asyncio.run(sql(store_url, "SELECT model, count(*), sum(tokens_total), sum(cost_usd)"
                                         " FROM ai_usage_logs WHERE id >= ? AND id < ? GROUP BY model ORDER BY model",
                              done["lo"], done["hi"]))
        assert [tuple(r) for r in rolled] == [tuple(r) for r in raw], grain
    latency = backfill_state(store_url, "latency_histogram")
    assert latency["done_rows"] == UPGRADE_ROWS and latency["hi"] == latency["lo"] + UPGRADE_ROWS
    assert_latency_exact(store_url)


def test_migrate_applies_the_schema_step_and_with_backfill_runs_the_history_to_its_end(
        previous_release, upstream, tmp_path):
    store_url = f"sqlite:///{tmp_path}/gateway.db"
    previous_store(previous_release, tmp_path, upstream, store_url)
    seed_usage(store_url, 5000)
    for ddl in table_ddl("sqlite"):
        asyncio.run(sql(store_url, ddl))
    config = write_config(tmp_path, "current", upstream, store_url, free_port())
    plan = json.loads(run_cli(ROOT, config, "migrate", "--plan", "--json", script="tests/upgrade_launcher.py").stdout)
    pending = [v for v, _ in SQLITE_MIGRATIONS if v > 16]
    assert [m["version"] for m in plan["migrations"]] == pending and 20 in pending
    assert plan["schema"] == {"applied": 16, "known": pending[-1], "newerExpandOnly": []}
    assert [(b["name"], b["migration"], b["rows"]) for b in plan["backfills"]] == \
           [("latency_histogram", 18, 5000), ("test_rollup_models", 20, 5000)]
    out = run_cli(ROOT, config, "migrate", "--backfill", script="tests/upgrade_launcher.py").stdout
    assert f"applied migrations {', '.join(map(str, pending))} in " in out
    assert "  test_rollup_models: 100% (5,000 rows)" in out and out.rstrip().endswith("backfills complete")
    assert "  latency_histogram: 100% (5,000 rows)" in out
    assert backfill_state(store_url)["finished_at"] is not None
    assert backfill_state(store_url, "latency_histogram")["finished_at"] is not None
    assert_latency_exact(store_url)
    again = run_cli(ROOT, config, "migrate", script="tests/upgrade_launcher.py").stdout
    assert "migrations to apply: none" in again and "schema up to date" in again


# ------------------------------------------------------------ rolling deploy, both releases


async def _spread(urls: list[str], key: str, n: int) -> list[tuple[int, str | None]]:
    """n concurrent requests, alternating between the gateways: (status, request id)."""
    async def one(i: int) -> tuple[int, str | None]:
        async with openai.AsyncOpenAI(base_url=urls[i % len(urls)] + "/v1", api_key=key, max_retries=0,
                                      timeout=60) as client:
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"request {i}"}])
                return raw.status_code, raw.headers.get("X-Request-Id")
            except openai.APIStatusError as exc:
                return exc.status_code, exc.response.headers.get("X-Request-Id")

    return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_the_previous_release_and_this_one_serve_one_postgres_schema_with_money_exact(
        previous_release, upstream, store_url, tmp_path):
    affordable = 40
    user_id, key = previous_store(previous_release, tmp_path, upstream, store_url, energy=affordable)
    ports = free_port(), free_port()
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    # As a deploy rolls: the previous release serves, this one starts beside it and migrates
    # the schema under it (expand-only), then both take the load.
    previous = start(previous_release, write_config(tmp_path, "previous", upstream, store_url, ports[1]))
    try:
        wait_health(urls[1], previous)
        current = start(ROOT, write_config(tmp_path, "current", upstream, store_url, ports[0]))
        try:
            wait_health(urls[0], current)
            assert asyncio.run(sql(store_url, "SELECT max(version) FROM schema_migrations"))[0][0] > 16
            results = asyncio.run(_spread(urls, key, 2 * affordable))
        finally:
            out_current = stop(current)
    finally:
        out_previous = stop(previous)
    assert "write_behind_abandoned" not in out_previous + out_current
    answered = [rid for status, rid in results if status == 200]
    assert len(answered) == affordable, sorted(s for s, _ in results)
    assert {s for s, _ in results} == {200, 429}
    balance = asyncio.run(sql(store_url, "SELECT energy FROM users WHERE id = ?", user_id))[0][0]
    ledger = asyncio.run(sql(store_url, "SELECT coalesce(sum(amount), 0) FROM energy_ledger WHERE user_id = ?",
                             user_id))[0][0]
    assert balance == 0 and ledger == 0
    logged = {r[0] for r in asyncio.run(sql(store_url, "SELECT request_id FROM ai_usage_logs WHERE status = 200"))}
    assert set(answered) <= logged, f"{len(set(answered) - logged)} answered requests without a usage row"
    both = asyncio.run(sql(store_url, "SELECT count(*) FROM ai_usage_logs"))[0][0]
    assert both == 2 * affordable, "one row per request, answered or refused, from both releases"


# ---------------------------------------------- a refused row survives, a newer schema refused


def _refusing_gateway(upstream, tmp_path, *, spool_refused: bool) -> tuple[str, Path, list[str], str]:
    """A gateway whose usage rows the database refuses (a trigger, as a schema the process
    does not fit would), three answered requests, then SIGTERM: (store url, config, ids, log)."""
    store_url = f"sqlite:///{tmp_path}/gateway.db"
    port = free_port()
    config = write_config(tmp_path, "first", upstream, store_url, port)
    run_cli(ROOT, config, "workspaces", "create", "acme")
    user = json.loads(run_cli(ROOT, config, "users", "create", "--workspace", "acme", "--tier", "pro",
                              "--energy", "10", "--json").stdout)
    for table in ("ai_usage_logs", *(("gw_usage_spool",) if spool_refused else ())):
        asyncio.run(sql(store_url, f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table}"
                                   " BEGIN SELECT RAISE(ABORT, 'refused by a newer schema'); END"))
    proc = start(ROOT, config)
    try:
        wait_health(f"http://127.0.0.1:{port}", proc)
        ids = [ask(f"http://127.0.0.1:{port}", user["api_key"]).id for _ in range(3)]
    finally:
        out = stop(proc)
    assert proc.returncode == 0, out[-2000:]
    assert "write_behind_abandoned" in out
    assert asyncio.run(sql(store_url, "SELECT count(*) FROM ai_usage_logs"))[0][0] == 0
    asyncio.run(sql(store_url, "DROP TRIGGER refuse_ai_usage_logs"))  # a process that fits the schema
    return store_url, config, ids, out


def _written(store_url: str, proc: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 60
    while asyncio.run(sql(store_url, "SELECT count(*) FROM ai_usage_logs WHERE status = 200"))[0][0] < count:
        assert proc.poll() is None and time.monotonic() < deadline, "the refused rows were never written"
        time.sleep(0.2)


def test_a_usage_row_the_database_refuses_is_spooled_at_shutdown_and_written_by_another_process(
        upstream, tmp_path):
    store_url, _, ids, out = _refusing_gateway(upstream, tmp_path, spool_refused=False)
    assert "write_behind_spooled" in out
    assert asyncio.run(sql(store_url, "SELECT count(*) FROM gw_usage_spool"))[0][0] == len(ids) == 3
    # Another process, with a journal of its own (another pod): the spool is in the database.
    port = free_port()
    proc = start(ROOT, write_config(tmp_path, "other", upstream, store_url, port))
    try:
        wait_health(f"http://127.0.0.1:{port}", proc)
        _written(store_url, proc, len(ids))
    finally:
        stop(proc)
    logged = {r[0] for r in asyncio.run(sql(store_url, "SELECT request_id FROM ai_usage_logs"))}
    assert len(logged) == 3 and asyncio.run(sql(store_url, "SELECT count(*) FROM gw_usage_spool"))[0][0] == 0


def test_a_usage_row_refused_and_not_spooled_stays_in_the_journal_for_the_next_start(upstream, tmp_path):
    store_url, config, ids, out = _refusing_gateway(upstream, tmp_path, spool_refused=True)
    assert "write_behind_spill_failed" in out and "journal_kept_for_replay" in out
    assert list((tmp_path / "journal-first").glob("endings-*.jsonl")), "kept in the journal"
    port = free_port()
    config = write_config(tmp_path, "first", upstream, store_url, port)  # the same journal directory
    proc = start(ROOT, config)  # the next start on that journal replays it
    try:
        wait_health(f"http://127.0.0.1:{port}", proc)
        _written(store_url, proc, len(ids))
    finally:
        stop(proc)
    assert not list((tmp_path / "journal-first").glob("endings-*.jsonl"))


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_serve_refuses_a_schema_with_a_contract_step_it_does_not_know_naming_both_versions(
        upstream, store_url, tmp_path):
    port = free_port()
    config = write_config(tmp_path, "current", upstream, store_url, port)
    run_cli(ROOT, config, "workspaces", "create", "acme")
    known = migrations.latest(v for v, _ in PG_MIGRATIONS)
    # A later release's expand-only step: this one still serves (a rolling deploy back).
    asyncio.run(sql(store_url, "INSERT INTO schema_migrations (version, applied_at, min_code) VALUES (?, 0, NULL)",
                    known + 5))
    proc = start(ROOT, config)
    try:
        wait_health(f"http://127.0.0.1:{port}", proc)
    finally:
        stop(proc)
    plan = run_cli(ROOT, config, "migrate", "--plan").stdout
    assert f"newer migrations, expand-only (this release serves on them): [{known + 5}]" in plan
    # Its contract step: only a gateway that knows known + 6 may serve.
    asyncio.run(sql(store_url, "INSERT INTO schema_migrations (version, applied_at, min_code) VALUES (?, 0, ?)",
                    known + 6, known + 6))
    result = subprocess.run([sys.executable, "proxy.py", "serve", "--config", str(config)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert (f"the store's schema is at version {known + 6}, which needs a gateway that knows schema version"
            f" {known + 6} or later; this gateway knows schema version {known}") in result.stderr
    assert "Traceback" not in result.stderr
    refused = run_cli(ROOT, config, "migrate", check=False)
    assert refused.returncode == 2 and f"this gateway knows schema version {known}" in refused.stderr
    admin = run_cli(ROOT, config, "workspaces", "list", check=False)  # the admin commands: the same words
    assert admin.returncode != 0 and f"this gateway knows schema version {known}" in admin.stderr
    assert "Traceback" not in admin.stderr


# ------------------------------------------------------------------ the machinery, in process


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_a_backfill_runs_once_across_runners_leased_chunk_by_chunk(store_url):
    store = open_store(store_url)
    await store.open()
    try:
        rows = [{"request_id": f"r{i}", "user_id": "u", "workspace_id": "ws", "model": f"m{i % 3}",
                 "tokens_total": i, "status": 200, "created_at": time.time() - 3600 + i} for i in range(3000)]
        await store.insert_usage(rows)
        for ddl in table_ddl(store.dialect):
            await sql(store_url, ddl)
        job = backfill.Backfill("twice_test", 20, backfill.rollup_chunk((TEST_FAMILY,)))
        await sql(store_url, backfill.registration_sql(store.dialect, job, time.time()))
        # Another owner's lease holds it: a step waits.
        assert await store.backfill_step(job, "a", 100, lease=30) is not None
        assert await store.backfill_step(job, "b", 100, lease=30) is None
        await sql(store_url, "UPDATE gw_backfills SET lease_until = 0 WHERE name = 'twice_test'")  # "a" died
        backfill.register(job)
        try:
            runners = [backfill.BackfillRunner(store, pace=1.0, start_delay=0, owner=o) for o in ("b", "c")]
            await asyncio.gather(*(r.run() for r in runners))
        finally:
            backfill.BACKFILLS.remove(job)
        (state,) = [s for s in await store.backfill_states() if s["name"] == "twice_test"]
        assert state["finished_at"] is not None and state["done_rows"] == 3000
        (requests, tokens), = await sql(store_url, "SELECT sum(requests), sum(tokens_total) FROM test_rollup_models")
        assert (requests, tokens) == (3000, sum(range(3000)))
    finally:
        await store.close()


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
async def test_a_migration_behind_a_long_lock_gives_up_with_a_clear_message(store_url, monkeypatch):
    store = open_store(store_url)
    await store.open()
    await store.close()
    schema = store_url.split("schema=")[1]
    # A store of the previous release: no min_code column yet, so the bootstrap alters the table.
    await sql(store_url, "ALTER TABLE schema_migrations DROP COLUMN min_code")
    monkeypatch.setattr(migrations, "LOCK_TIMEOUT", "100ms")
    monkeypatch.setattr(migrations, "LOCK_TRIES", 2)
    holder = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        await holder.execute("BEGIN; LOCK TABLE schema_migrations IN ACCESS SHARE MODE")  # a long report
        store = open_store(store_url)
        with pytest.raises(migrations.MigrationLockTimeout, match="could not take its locks in 2 tries"):
            await store.open()
        await holder.execute("ROLLBACK")
        store = open_store(store_url)
        await store.open()  # the lock gone: it goes through
        await store.close()
    finally:
        await holder.close()


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
async def test_a_concurrent_index_is_built_outside_the_transaction_and_rebuilt_if_invalid(store_url, monkeypatch):
    extra = (99, "CREATE TABLE gw_test_big (a int);\n"
                 "CREATE INDEX CONCURRENTLY gw_test_big_a ON gw_test_big (a);\n")
    monkeypatch.setattr(store_postgres, "MIGRATIONS", [*PG_MIGRATIONS, extra])
    store = open_store(store_url)
    await store.open()
    try:
        valid = await sql(store_url, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'gw_test_big_a'::regclass")
        assert valid == [(True,)]
        await sql(store_url, "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'gw_test_big_a'::regclass")
        await store.migrate()  # a build that died half-way: rebuilt
        valid = await sql(store_url, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'gw_test_big_a'::regclass")
        assert valid == [(True,)]
    finally:
        await store.close()


async def test_a_report_over_a_rollup_being_backfilled_says_so(tmp_path):
    store_url = f"sqlite:///{tmp_path}/gateway.db"
    store = open_store(store_url)
    await store.open()
    try:
        from gateway.admin.reports import build_report
        from gateway.store import rollup

        await store.insert_usage([{"request_id": f"r{i}", "model": "m", "status": 200, "created_at": time.time()}
                                  for i in range(10)])
        assert "backfill" not in await build_report(store, "daily")
        job = backfill.Backfill("rollup_rebuild_test", 20, backfill.rollup_chunk(rollup.FAMILIES), ("usage_rollup",))
        await sql(store_url, backfill.registration_sql("sqlite", job, time.time()))
        backfill.register(job)
        report = await build_report(store, "daily")
        assert report["backfill"]["note"].startswith("backfilling, 0%: usage_rollup without the history yet")
        assert report["backfill"]["backfills"][0]["name"] == "rollup_rebuild_test"
    finally:
        backfill.BACKFILLS[:] = [b for b in backfill.BACKFILLS if b.name != "rollup_rebuild_test"]
        await store.close()
