"""The store's money rules, proven on real databases (SQLite file and PostgreSQL).

Every test runs against both backends. Concurrency is tested the way production hits the
store: many asyncio tasks on one Store, two Store instances on one database (two gateway
processes' worth of connections) and, for real, two OS processes.

After every energy scenario `assert_ledger_consistent` checks the invariant that makes
the billing auditable: the balance equals the sum of the ledger, and each row's
balance_after is the running sum, never negative.

PostgreSQL: GATEWAY_TEST_PG_URL (default postgresql://postgres@127.0.0.1:5432/test); each
test gets its own schema, dropped afterwards. If the server is unreachable the postgres
variants are skipped (with the reason shown), never silently passed. Every PostgreSQL test
also runs through a PgBouncer in transaction pooling mode (the `pgbouncer` variant), as
production may run it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import secrets
import sqlite3
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
import pytest_asyncio

from gateway.store import (
    InsufficientEnergy,
    NotFound,
    Store,
    StoreConflict,
    StoreUnavailable,
    compute_refill,
    open_store,
)
from gateway.store.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from gateway.store import postgres as store_postgres
from gateway.store.postgres import RESERVE_IN_FLIGHT, PostgresStore
from gateway.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from gateway.store.sqlite import SQLiteStore
from tests.pgbouncer import pgbouncer_url

# Both backends carry the same migrations, version for version.
assert [v for v, _ in SQLITE_MIGRATIONS] == [v for v, _ in POSTGRES_MIGRATIONS]

PG_URL = os.environ.get("GATEWAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
T0 = 1_700_000_000.0  # a fixed "now" for tests that move time


# ----------------------------------------------------------------------- fixtures


@pytest_asyncio.fixture(params=["sqlite", "postgres", "pgbouncer"])
async def store_url(request, tmp_path):
    """A URL to an empty database of each backend; `pgbouncer`: PostgreSQL through a
    PgBouncer in transaction pooling mode (tests/pgbouncer.py), started for the test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/gateway.db"  # tmp_path is absolute: sqlite:////...
        return
    try:
        conn = await asyncpg.connect(PG_URL, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        if os.environ.get("CI"):  # CI has PostgreSQL (.ci/run starts it): never skip silently there
            pytest.fail(f"PostgreSQL unreachable at {PG_URL}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {exc}")
    await conn.close()
    schema = f"test_store_{secrets.token_hex(6)}"
    try:
        if request.param == "pgbouncer":
            with pgbouncer_url(schema, PG_URL) as url:
                yield url
        else:
            yield f"{PG_URL}?schema={schema}"
    finally:
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


@pytest_asyncio.fixture
async def store(store_url):
    s = open_store(store_url)
    await s.open()
    yield s
    await s.close()


@pytest_asyncio.fixture
async def user(store):
    ws = await store.create_workspace("acme")
    return await store.create_user(ws.id, "free", name="Ada", energy=100, now=T0)


async def assert_ledger_consistent(store: Store, user_id: str) -> None:
    entries = await store.ledger(user_id)
    running = 0
    for e in entries:
        running += e.amount
        assert e.balance_after == running, (e, running)
        assert e.balance_after >= 0
    assert await store.balance(user_id) == running
    assert [e.id for e in entries] == sorted(e.id for e in entries)


async def count_rows(url: str, table: str) -> int:
    """Counts with a raw connection, to check what the store wrote (not what it says)."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url[len("sqlite:///"):]) as db:
            return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    parts = urlsplit(url)  # ?schema=...[&pgbouncer=true]
    schema = parse_qs(parts.query)["schema"][-1]
    conn = await asyncpg.connect(parts._replace(query="").geturl(), statement_cache_size=0)
    try:
        return await conn.fetchval(f'SELECT count(*) FROM "{schema}".{table}')
    finally:
        await conn.close()


# --------------------------------------------------------------------- migrations


@pytest.mark.asyncio
async def test_migrations_are_idempotent_and_safe_when_two_processes_start(store_url):
    a, b = open_store(store_url), open_store(store_url)
    await asyncio.gather(a.open(), b.open())  # both race to migrate an empty database
    try:
        assert await a.ping() and await b.ping()
        assert await a.migrate() == []
        assert await b.migrate() == []
        assert await count_rows(store_url, "schema_migrations") == len(SQLITE_MIGRATIONS)
        ws = await a.create_workspace("acme")
        assert (await b.get_workspace("acme")) == ws
    finally:
        await a.close()
        await b.close()
    c = open_store(store_url)  # reopening an up-to-date database changes nothing
    async with c:
        assert await c.migrate() == []
        assert [w.name for w in await c.list_workspaces()] == ["acme"]
    assert await count_rows(store_url, "schema_migrations") == len(SQLITE_MIGRATIONS)


@pytest.mark.asyncio
async def test_sqlite_memory_url_works():
    async with open_store("sqlite:///:memory:") as s:
        ws = await s.create_workspace("mem")
        u = await s.create_user(ws.id, "free", energy=3)
        assert (await s.reserve_energy(u.id, 2, "r")).balance == 1
        await assert_ledger_consistent(s, u.id)


def test_open_store_urls(tmp_path):
    assert open_store("sqlite:///rel/path.db").path == "rel/path.db"
    assert open_store("sqlite:////abs/path.db").path == "/abs/path.db"
    pg = open_store("postgres://u@h:5432/db?schema=tenant_a")
    assert pg.schema == "tenant_a" and "schema" not in pg.dsn
    with pytest.raises(ValueError):
        open_store("postgresql://u@h/db?schema=bad;drop")
    with pytest.raises(ValueError):
        open_store("mysql://u@h/db")


@pytest.mark.asyncio
async def test_ping_false_when_closed(store):
    assert await store.ping()
    await store.close()
    assert not await store.ping()


# ------------------------------------------------------------ workspaces and users


@pytest.mark.asyncio
async def test_workspaces(store):
    ws = await store.create_workspace("acme", profile={"org": "Acme"}, ai_settings={"m": 1},
                                      now=T0)
    assert ws.id.startswith("ws_") and ws.created_at == T0
    assert await store.get_workspace(ws.id) == ws
    assert await store.get_workspace("acme") == ws
    assert await store.get_workspace("nope") is None

    with pytest.raises(StoreConflict):
        await store.create_workspace("acme")
    with pytest.raises(ValueError):
        await store.create_workspace("Not A Slug")
    assert await store.list_workspaces() == [ws]

    updated = await store.update_workspace(ws.id, ai_settings={"m": 2})
    assert updated.profile == {"org": "Acme"} and updated.ai_settings == {"m": 2}
    updated = await store.update_workspace(ws.id, profile={})
    assert updated.profile == {} and updated.ai_settings == {"m": 2}
    assert await store.get_workspace("acme") == updated
    with pytest.raises(NotFound):
        await store.update_workspace("ws_missing", profile={"x": 1})

    other = await store.create_workspace("beta")
    assert await store.list_workspaces() == [updated, other]


@pytest.mark.asyncio
async def test_users(store):
    ws = await store.create_workspace("acme")
    ws2 = await store.create_workspace("beta")
    u = await store.create_user(ws.id, "free", name="Ada", energy=50, now=T0)
    assert u.id.startswith("usr_") and u.energy == 50 and not u.disabled
    assert u.refilled_at is None and u.created_at == T0
    assert await store.get_user(u.id) == u
    assert await store.get_user("usr_missing") is None

    # initial energy is a grant in the ledger from the first moment
    [entry] = await store.ledger(u.id)
    assert (entry.kind, entry.amount, entry.balance_after) == ("grant", 50, 50)
    v = await store.create_user(ws2.id, "pro")
    assert await store.ledger(v.id) == []  # 0 energy: no row needed

    assert [x.id for x in await store.list_users()] == [u.id, v.id]
    assert [x.id for x in await store.list_users(ws2.id)] == [v.id]

    assert (await store.set_tier(u.id, "pro")).tier == "pro"
    assert (await store.set_user_disabled(u.id, True)).disabled
    assert (await store.get_user(u.id)).disabled

    with pytest.raises(NotFound):
        await store.create_user("ws_missing", "free")
    with pytest.raises(ValueError):
        await store.create_user(ws.id, "free", energy=-1)
    with pytest.raises(NotFound):
        await store.set_tier("usr_missing", "pro")
    assert len(await store.list_users()) == 2


# ------------------------------------------------------------------------ keys


@pytest.mark.asyncio
async def test_keys(store, user):
    plaintext, key = await store.create_key(user.id, role="workspace_admin", now=T0)
    assert plaintext.startswith("gw-") and len(plaintext) == 3 + 43
    assert key.prefix == plaintext[:10] and key.role == "workspace_admin"
    assert key.user_id == user.id and key.workspace_id == user.workspace_id
    assert key.revoked_at is None and key.created_at == T0

    ident = await store.lookup_key(plaintext)
    assert ident.key_id == key.id and ident.user_id == user.id and ident.tier == "free"
    assert ident.role == "workspace_admin" and not ident.revoked and not ident.user_disabled
    assert await store.lookup_key(plaintext + "x") is None
    assert await store.lookup_key("gw-unknown") is None

    await store.set_user_disabled(user.id, True)
    assert (await store.lookup_key(plaintext)).user_disabled

    # rotate: old key revoked, new one for the same user and role, atomically
    new_plain, new_key = await store.rotate_key(key.id, now=T0 + 1)
    assert new_plain != plaintext and new_key.role == "workspace_admin"
    assert (await store.lookup_key(plaintext)).revoked
    assert not (await store.lookup_key(new_plain)).revoked
    with pytest.raises(StoreConflict):
        await store.rotate_key(key.id)  # a revoked key cannot be brought back
    with pytest.raises(NotFound):
        await store.rotate_key("key_missing")

    # revoke is idempotent and keeps the first revocation time
    revoked = await store.revoke_key(new_key.id, now=T0 + 2)
    assert revoked.revoked_at == T0 + 2
    assert (await store.revoke_key(new_key.id, now=T0 + 3)).revoked_at == T0 + 2
    with pytest.raises(NotFound):
        await store.revoke_key("key_missing")

    with pytest.raises(ValueError):
        await store.create_key(user.id, role="root")
    with pytest.raises(NotFound):
        await store.create_key("usr_missing")

    ws2 = await store.create_workspace("beta")
    other = await store.create_user(ws2.id, "free")
    _, other_key = await store.create_key(other.id)
    assert [k.id for k in await store.list_keys(user_id=user.id)] == [key.id, new_key.id]
    assert [k.id for k in await store.list_keys(workspace_id=ws2.id)] == [other_key.id]
    assert len(await store.list_keys()) == 3


@pytest.mark.asyncio
async def test_rotate_race_issues_one_successor(store, user):
    _, key = await store.create_key(user.id)
    results = await asyncio.gather(*(store.rotate_key(key.id) for _ in range(5)),
                                   return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, StoreConflict) for r in results if isinstance(r, Exception))
    assert len(await store.list_keys(user_id=user.id)) == 2


# ---------------------------------------------------------------------- energy


@pytest.mark.asyncio
async def test_reserve_settle_refund_happy_paths(store, user):
    r = await store.reserve_energy(user.id, 30, "req-1", now=T0)
    assert (r.ok, r.balance, r.refilled) == (True, 70, 0)
    assert await store.settle_energy("req-1", 10) == 90  # 20 back

    await store.reserve_energy(user.id, 30, "req-2")
    assert await store.settle_energy("req-2") == 60  # as reserved: settle row of 0

    await store.reserve_energy(user.id, 30, "req-3")
    assert await store.refund_energy("req-3", reason="upstream 500") == 60

    await store.reserve_energy(user.id, 10, "req-4")
    assert await store.settle_energy("req-4", 999) == 50  # clamped to the reservation

    r = await store.reserve_energy(user.id, 0, "req-5")
    assert (r.ok, r.balance) == (True, 50)
    assert await store.settle_energy("req-5", 0) == 50

    r = await store.reserve_energy(user.id, 51, "req-6")
    assert (r.ok, r.balance) == (False, 50)
    assert await store.settle_energy("req-6") is None  # nothing was reserved

    kinds = [(e.kind, e.amount, e.request_id) for e in await store.ledger(user.id)]
    assert kinds == [
        ("grant", 100, None),
        ("reserve", -30, "req-1"), ("settle", 20, "req-1"),
        ("reserve", -30, "req-2"), ("settle", 0, "req-2"),
        ("reserve", -30, "req-3"), ("refund", 30, "req-3"),
        ("reserve", -10, "req-4"), ("settle", 0, "req-4"),
        ("reserve", 0, "req-5"), ("settle", 0, "req-5"),
    ]
    refund = [e for e in await store.ledger(user.id) if e.kind == "refund"][0]
    assert refund.reason == "upstream 500"
    await assert_ledger_consistent(store, user.id)


@pytest.mark.asyncio
async def test_energy_errors_change_nothing(store, user):
    await store.reserve_energy(user.id, 10, "dup")
    before = (await store.balance(user.id), await store.ledger(user.id))

    with pytest.raises(StoreConflict):
        await store.reserve_energy(user.id, 10, "dup")
    with pytest.raises(StoreConflict):  # even when the balance could not cover it
        await store.reserve_energy(user.id, 10_000, "dup")
    with pytest.raises(NotFound):
        await store.reserve_energy("usr_missing", 1, "x")
    with pytest.raises(ValueError):
        await store.reserve_energy(user.id, -1, "neg")
    with pytest.raises(ValueError):
        await store.settle_energy("dup", -5)
    with pytest.raises(ValueError):
        await store.grant_energy(user.id, -5)
    with pytest.raises(ValueError):
        await store.grant_energy(user.id, 0)
    with pytest.raises(ValueError):
        await store.grant_energy(user.id, 5, kind="refill")
    with pytest.raises(NotFound):
        await store.grant_energy("usr_missing", 5)
    with pytest.raises(InsufficientEnergy):
        await store.grant_energy(user.id, -91, kind="adjust")

    assert (await store.balance(user.id), await store.ledger(user.id)) == before
    assert await store.settle_energy("dup") == 90  # the original reservation is intact
    with pytest.raises(NotFound):
        await store.balance("usr_missing")


@pytest.mark.asyncio
async def test_grant_and_adjust(store, user):
    assert await store.grant_energy(user.id, 25, reason="promo") == 125
    assert await store.grant_energy(user.id, -125, kind="adjust", reason="chargeback") == 0
    assert await store.grant_energy(user.id, 7, kind="adjust") == 7
    tail = [(e.kind, e.amount, e.reason) for e in (await store.ledger(user.id))[1:]]
    assert tail == [("grant", 25, "promo"), ("adjust", -125, "chargeback"), ("adjust", 7, None)]
    await assert_ledger_consistent(store, user.id)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "first, second",
    [("settle", "settle"), ("refund", "settle"), ("settle", "refund"), ("refund", "refund")],
)
async def test_settle_and_refund_are_idempotent(store, user, first, second):
    await store.reserve_energy(user.id, 40, "req")

    async def do(action):
        if action == "settle":
            return await store.settle_energy("req", 15)
        return await store.refund_energy("req")

    after_first = await do(first)
    assert after_first == (85 if first == "settle" else 100)  # 100 - 15 charged
    assert await do(second) is None
    assert await store.balance(user.id) == after_first
    outcomes = [e for e in await store.ledger(user.id) if e.kind in ("settle", "refund")]
    assert len(outcomes) == 1
    await assert_ledger_consistent(store, user.id)
    assert await store.settle_energy("never-reserved") is None
    assert await store.refund_energy("never-reserved") is None


@pytest.mark.asyncio
async def test_concurrent_settles_and_refunds_pay_back_once(store, user):
    other = open_store(store.url)
    async with other:
        for i in range(5):
            await store.reserve_energy(user.id, 10, f"r{i}")
        calls = []
        for i in range(5):
            for s in (store, other):
                calls += [s.settle_energy(f"r{i}", 4), s.refund_energy(f"r{i}")]
        results = await asyncio.gather(*calls)
    assert sum(r is not None for r in results) == 5  # exactly one outcome per request
    outcomes = [e for e in await store.ledger(user.id) if e.kind in ("settle", "refund")]
    assert sorted(e.request_id for e in outcomes) == [f"r{i}" for i in range(5)]
    await assert_ledger_consistent(store, user.id)


@pytest.mark.asyncio
async def test_settle_many_settles_open_reservations_once(store, user):
    for i in range(4):
        await store.reserve_energy(user.id, 10, f"m{i}")
    await store.refund_energy("m1")
    await store.settle_energy("m2", 4)  # settled already: 6 back, must stay as it is
    # Open (m0, m3), refunded (m1), settled (m2), unknown, and a duplicate in one batch.
    assert await store.settle_many(["m0", "m1", "m2", "m3", "nope", "m0"]) == 2
    assert await store.settle_many(["m0", "m3"]) == 0  # never twice
    assert await store.settle_many([]) == 0
    assert await store.balance(user.id) == 100 - 10 - 4 - 10
    outcomes = {e.request_id: (e.kind, e.amount) for e in await store.ledger(user.id)
                if e.kind in ("settle", "refund")}
    assert outcomes == {"m0": ("settle", 0), "m1": ("refund", 10), "m2": ("settle", 6), "m3": ("settle", 0)}
    assert await store.refund_energy("m0") is None  # a settled reservation cannot be refunded
    assert await store.stale_reservations(time.time() + 10) == []
    await assert_ledger_consistent(store, user.id)


@pytest.mark.asyncio
async def test_concurrent_settle_many_and_refunds_pay_back_once(store, user):
    """Two stores (two processes' connections): batches and single refunds race on the same
    reservations, and on other users' reserves; each reservation gets exactly one outcome."""
    other = open_store(store.url)
    async with other:
        ids = [f"c{i}" for i in range(60)]
        for request_id in ids:
            await store.reserve_energy(user.id, 1, request_id)
        calls = [store.settle_many(ids[:40]), other.settle_many(ids[20:]),
                 store.settle_many(ids[::3])]
        calls += [other.refund_energy(i) for i in ids[::2]]
        calls += [store.reserve_energy(user.id, 1, f"x{i}") for i in range(10)]
        results = await asyncio.gather(*calls)
    settled = sum(results[:3])
    refunded = sum(r is not None for r in results[3:3 + 30])
    assert settled + refunded == 60
    outcomes = [e for e in await store.ledger(user.id) if e.kind in ("settle", "refund")]
    assert sorted(e.request_id for e in outcomes) == sorted(ids)
    assert await store.balance(user.id) == 100 - 60 + refunded - 10
    await assert_ledger_consistent(store, user.id)


@pytest.mark.asyncio
async def test_stale_reservations(store, user):
    await store.reserve_energy(user.id, 5, "old", now=T0)
    await store.reserve_energy(user.id, 5, "new", now=T0 + 100)
    await store.reserve_energy(user.id, 5, "done", now=T0)
    await store.settle_energy("done")
    assert await store.stale_reservations(T0 + 50) == ["old"]
    assert await store.refund_energy("old", reason="stale") == 90
    assert await store.stale_reservations(T0 + 50) == []
    await assert_ledger_consistent(store, user.id)


# ------------------------------------------------------------------ concurrency


@pytest.mark.asyncio
async def test_200_concurrent_reserves_on_one_store(store, user):
    results = await asyncio.gather(
        *(store.reserve_energy(user.id, 1, f"req-{i}") for i in range(200))
    )
    assert sum(r.ok for r in results) == 100
    assert all(r.balance >= 0 for r in results)
    assert await store.balance(user.id) == 0
    await assert_ledger_consistent(store, user.id)


@pytest.mark.asyncio
async def test_200_reserves_interleaved_across_two_stores(store, user):
    other = open_store(store.url)  # a second "process": its own connection(s)
    async with other:
        results = await asyncio.gather(
            *((store if i % 2 else other).reserve_energy(user.id, 1, f"req-{i}")
              for i in range(200))
        )
    assert sum(r.ok for r in results) == 100
    assert await store.balance(user.id) == 0
    await assert_ledger_consistent(store, user.id)
    assert await count_rows(store.url, "reservations") == 100


def _reserve_in_process(url: str, user_id: str, tag: str, n: int, barrier_dir: str) -> int:
    """Runs in a spawned process: open a Store, wait for the sibling, reserve n times."""

    async def run() -> int:
        async with open_store(url) as s:
            Path(barrier_dir, tag).touch()
            deadline = time.monotonic() + 30
            while len(os.listdir(barrier_dir)) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            results = await asyncio.gather(
                *(s.reserve_energy(user_id, 1, f"{tag}-{i}") for i in range(n))
            )
            return sum(r.ok for r in results)

    return asyncio.run(run())


@pytest.mark.asyncio
async def test_two_os_processes_never_overdraw(store, user, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        oks = await asyncio.gather(*(
            loop.run_in_executor(pool, _reserve_in_process, store.url, user.id, tag, 100,
                                 str(barrier))
            for tag in ("p1", "p2")
        ))
    assert sum(oks) == 100, oks
    assert await store.balance(user.id) == 0
    await assert_ledger_consistent(store, user.id)


# ---------------------------------------------------------------- lazy refill


def test_compute_refill_arithmetic():
    # first use starts the schedule now
    r = compute_refill(3, None, (10, 60.0), T0)
    assert (r.due, r.balance, r.delta, r.refilled_at) == (True, 10, 7, T0)
    # not yet due
    assert not compute_refill(3, T0, (10, 60.0), T0 + 59.999).due
    # whole periods only: 2.5 periods later -> advanced by 2
    r = compute_refill(3, T0, (10, 60.0), T0 + 150)
    assert (r.balance, r.refilled_at) == (10, T0 + 120)
    # exactly on the boundary
    assert compute_refill(0, T0, (10, 0.1), T0 + 0.3).refilled_at <= T0 + 0.3
    # above the allowance: nothing added, schedule still advances
    r = compute_refill(25, T0, (10, 60.0), T0 + 60)
    assert (r.due, r.balance, r.delta, r.refilled_at) == (True, 25, 0, T0 + 60)
    with pytest.raises(ValueError):
        compute_refill(0, None, (10, 0), T0)


@pytest.mark.asyncio
async def test_lazy_refill(store):
    ws = await store.create_workspace("acme")
    u = await store.create_user(ws.id, "free")
    day = 86_400.0
    allowance = (10, day)

    r = await store.reserve_energy(u.id, 4, "a", refill=allowance, now=T0)  # first use
    assert (r.ok, r.balance, r.refilled) == (True, 6, 10)
    assert (await store.get_user(u.id)).refilled_at == T0

    r = await store.reserve_energy(u.id, 1, "b", refill=allowance, now=T0 + day - 1)
    assert (r.ok, r.balance, r.refilled) == (True, 5, 0)  # not before a full period

    r = await store.reserve_energy(u.id, 1, "c", refill=allowance, now=T0 + 2.5 * day)
    assert (r.ok, r.balance, r.refilled) == (True, 9, 5)  # topped up to 10, not +10 per day
    assert (await store.get_user(u.id)).refilled_at == T0 + 2 * day  # whole periods

    # a grant above the allowance survives the next refill
    await store.grant_energy(u.id, 50)  # 59
    r = await store.reserve_energy(u.id, 1, "d", refill=allowance, now=T0 + 3 * day)
    assert (r.ok, r.balance, r.refilled) == (True, 58, 0)
    assert (await store.get_user(u.id)).refilled_at == T0 + 3 * day

    # a refused reservation still keeps the refill it triggered
    await store.grant_energy(u.id, -58, kind="adjust")
    r = await store.reserve_energy(u.id, 11, "e", refill=allowance, now=T0 + 4 * day)
    assert (r.ok, r.balance, r.refilled) == (False, 10, 10)
    assert await store.balance(u.id) == 10

    kinds = [(e.kind, e.amount) for e in await store.ledger(u.id)]
    assert kinds.count(("refill", 10)) == 2 and ("refill", 5) in kinds
    await assert_ledger_consistent(store, u.id)


@pytest.mark.asyncio
async def test_concurrent_refill_happens_once(store):
    ws = await store.create_workspace("acme")
    u = await store.create_user(ws.id, "free")
    other = open_store(store.url)
    async with other:
        results = await asyncio.gather(*(
            (store if i % 2 else other).reserve_energy(u.id, 1, f"r{i}", refill=(10, 60.0),
                                                       now=T0)
            for i in range(30)
        ))
    assert sum(r.ok for r in results) == 10
    assert sum(r.refilled for r in results) == 10
    await assert_ledger_consistent(store, u.id)


# ------------------------------------------------------------ idempotency keys


@pytest.mark.asyncio
async def test_idempotency_key_states(store, user):
    begin = store.begin_idempotent
    s = await begin(user.id, "k1", "req-1", fingerprint="fp", window=60, now=T0)
    assert (s.status, s.request_id) == ("new", "req-1")

    s = await begin(user.id, "k1", "req-2", fingerprint="fp", window=60, now=T0 + 1)
    assert (s.status, s.request_id) == ("in_flight", "req-1")
    s = await begin(user.id, "k1", "req-2", fingerprint="other", window=60, now=T0 + 1)
    assert (s.status, s.request_id) == ("mismatch", "req-1")

    assert not await store.finish_idempotent(user.id, "k1", 200, b"x", request_id="req-2")
    assert await store.finish_idempotent(user.id, "k1", 200, b'{"ok":1}', request_id="req-1")
    assert not await store.finish_idempotent(user.id, "k1", 500, b"again")  # already done
    s = await begin(user.id, "k1", "req-3", fingerprint="fp", window=60, now=T0 + 2)
    assert (s.status, s.status_code, s.body, s.request_id) == ("done", 200, b'{"ok":1}', "req-1")
    s = await begin(user.id, "k1", "req-3", fingerprint="other", window=60, now=T0 + 2)
    assert s.status == "mismatch"
    assert not await store.release_idempotent(user.id, "k1")  # a stored response stays

    # expired: the key is free again, for any fingerprint
    s = await begin(user.id, "k1", "req-4", fingerprint="new-fp", window=60, now=T0 + 60)
    assert (s.status, s.request_id, s.body) == ("new", "req-4", None)

    # released after a failed attempt: a retry runs again
    assert not await store.release_idempotent(user.id, "k1", request_id="req-1")
    assert await store.release_idempotent(user.id, "k1", request_id="req-4")
    s = await begin(user.id, "k1", "req-5", fingerprint="fp", window=60, now=T0 + 61)
    assert (s.status, s.request_id) == ("new", "req-5")

    # keys are per user
    ws = await store.get_workspace(user.workspace_id)
    other = await store.create_user(ws.id, "free")
    s = await begin(other.id, "k1", "req-6", fingerprint="fp", window=60, now=T0 + 61)
    assert s.status == "new"
    with pytest.raises(NotFound):
        await begin("usr_missing", "k1", "req-7", fingerprint="fp", window=60)


@pytest.mark.asyncio
async def test_concurrent_begin_idempotent_claims_once(store, user):
    other = open_store(store.url)
    async with other:
        states = await asyncio.gather(*(
            (store if i % 2 else other).begin_idempotent(
                user.id, "same-key", f"req-{i}", fingerprint="fp", window=60)
            for i in range(20)
        ))
    new = [s for s in states if s.status == "new"]
    assert len(new) == 1
    assert all(s.status == "in_flight" and s.request_id == new[0].request_id
               for s in states if s.status != "new")


# ----------------------------------------------------------------------- usage


@pytest.mark.asyncio
async def test_usage_insert_batch_and_duplicates(store):
    rows = [
        {"request_id": "r1", "user_id": "usr_a", "workspace_id": "ws_a", "action": "chat",
         "provider": "openai", "model": "gpt-4o-mini", "requested_model": "gpt-4o",
         "downgraded_from": "gpt-4o", "tokens_prompt": 10, "tokens_completion": 5,
         "tokens_total": 15, "cost_usd": 0.00123, "status": 200, "latency_ms": 812,
         "ttfb_ms": 120, "streamed": True, "energy_cost": 3, "cache_hit": False,
         "retries": 1, "usage_estimated": True, "created_at": T0},
        {"request_id": "r2", "workspace_id": "ws_b", "status": 502, "error_type": "upstream",
         "created_at": T0 + 10},
        {"request_id": "r1", "model": "duplicate in the same batch"},
    ]
    assert await store.insert_usage(rows) == 2
    assert await store.insert_usage(rows[:2]) == 0  # a retried flush writes nothing
    assert await store.insert_usage([]) == 0
    assert await count_rows(store.url, "ai_usage_logs") == 2

    got = await store.usage_rows()
    assert [r["request_id"] for r in got] == ["r1", "r2"]
    first = got[0]
    assert first["created_at"] == pytest.approx(T0, abs=1e-6)
    assert first["streamed"] is True and first["cache_hit"] is False
    assert first["usage_estimated"] is True and first["retries"] == 1
    assert first["cost_usd"] == Decimal("0.00123") and first["tokens_total"] == 15
    assert first["model"] == "gpt-4o-mini" and isinstance(first["id"], int)
    assert got[1]["tokens_total"] == 0 and got[1]["streamed"] is False  # defaults

    assert [r["request_id"] for r in await store.usage_rows(since=T0 + 5)] == ["r2"]
    assert [r["request_id"] for r in await store.usage_rows(workspace_id="ws_a")] == ["r1"]

    with pytest.raises(ValueError):
        await store.insert_usage([{"request_id": "r3", "modle": "typo"}])
    assert await count_rows(store.url, "ai_usage_logs") == 2


@pytest.mark.asyncio
async def test_a_large_usage_batch_is_prepared_in_slices_that_let_requests_run_between():
    """A flush carries up to a second's rows (thousands at load): preparing them in one go
    held the event loop ~10 ms per 500 rows, a stall every request then waited out."""
    from gateway.store import USAGE_SLICE, prepare_usage_rows

    ticks = 0
    done = False

    async def other_work() -> None:  # stands for the requests the loop is serving
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    other = asyncio.ensure_future(other_work())
    await asyncio.sleep(0)
    rows = [{"request_id": f"r{i}", "status": 200} for i in range(5 * USAGE_SLICE)]
    seen: list[int] = []
    try:
        prepared = await prepare_usage_rows(rows, T0, lambda r: (seen.append(ticks), r["request_id"])[1])
    finally:
        done = True
        await other
    assert prepared == [f"r{i}" for i in range(5 * USAGE_SLICE)]  # every row, in order
    assert len(set(seen)) == 5  # the other work ran between every two slices
    with pytest.raises(ValueError):
        await prepare_usage_rows([{"request_id": "x", "modle": "typo"}], T0, dict)


# ----------------------------------------------- grouped writes (SQLite write combiner)


@pytest_asyncio.fixture
async def sqlite_store(tmp_path):
    """Every operation on the database thread (reservations too): the grouping tests."""
    async with SQLiteStore(f"{tmp_path}/grouped.db", loop_writes=False) as s:
        yield s


class HoldDatabaseThread:
    """Parks the SQLite store's database thread so the next calls queue up behind it and
    are taken as ONE group; records the size of every write group it runs."""

    def __init__(self, store, monkeypatch):
        import threading

        from gateway.store import sqlite as store_sqlite

        self.store, self.groups = store, []
        self.entered, self.gate = threading.Event(), threading.Event()
        run_writes = store_sqlite._Database._run_writes

        def recording(db, writes, busy=None):
            self.groups.append(len(writes))
            return run_writes(db, writes, busy)

        monkeypatch.setattr(store_sqlite._Database, "_run_writes", staticmethod(recording))

    async def __aenter__(self):
        def park(db):
            self.entered.set()
            self.gate.wait(10)

        self.held = self.store._database.submit(park, (), False)
        await asyncio.get_running_loop().run_in_executor(None, self.entered.wait, 10)
        self.groups.clear()
        return self

    async def __aexit__(self, *exc):
        self.gate.set()
        await self.held


async def _grouped_scenario(store, user_id):
    """Energy calls whose outcomes include every kind of per-operation failure."""
    return [
        store.reserve_energy(user_id, 5, "a", now=T0),
        store.reserve_energy(user_id, 10_000, "dup", now=T0),  # StoreConflict
        store.reserve_energy("usr_missing", 1, "b", now=T0),  # NotFound
        store.settle_energy("dup", 4, now=T0),
        store.refund_energy("a", reason="upstream", now=T0),  # sees "a" from this group
        store.grant_energy(user_id, -1_000, kind="adjust", now=T0),  # InsufficientEnergy
        store.reserve_energy(user_id, 1_000, "too-big", now=T0),  # not ok, no row
        store.reserve_energy(user_id, 7, "c", now=T0),
        store.settle_energy("c", 99, now=T0),  # clamped to the reservation
        store.settle_energy("c", now=T0),  # already settled: None
        store.settle_energy("never", now=T0),
        store.insert_usage([{"request_id": "a", "user_id": user_id}], now=T0),
        store.insert_usage([{"request_id": "a", "modle": "typo"}], now=T0),  # ValueError
    ]


def _outcome(result):
    return type(result).__name__ if isinstance(result, Exception) else result


async def _one_by_one(calls) -> list:
    """Await the calls in order, each on its own: the reference a group must equal."""
    outcomes = []
    for call in calls:
        try:
            outcomes.append(_outcome(await call))
        except Exception as exc:
            outcomes.append(_outcome(exc))
    return outcomes


@pytest.mark.asyncio
async def test_a_failing_operation_in_a_group_leaves_the_others_applied(sqlite_store,
                                                                        tmp_path,
                                                                        monkeypatch):
    """One BEGIN IMMEDIATE..COMMIT carries the whole group; each call gets its own result
    or exception, exactly as if the calls had run one by one in order."""
    ws = await sqlite_store.create_workspace("acme")
    user = await sqlite_store.create_user(ws.id, "free", energy=100, now=T0)
    await sqlite_store.reserve_energy(user.id, 10, "dup", now=T0)

    async with HoldDatabaseThread(sqlite_store, monkeypatch) as hold:
        calls = await _grouped_scenario(sqlite_store, user.id)
        grouped = asyncio.gather(*calls, return_exceptions=True)
    grouped = [_outcome(r) for r in await grouped]
    assert hold.groups[0] == len(calls) - 1  # all but the ValueError (raised before queuing)

    async with open_store(f"sqlite:///{tmp_path}/one-by-one.db") as ref:
        ws2 = await ref.create_workspace("acme")
        user2 = await ref.create_user(ws2.id, "free", energy=100, now=T0)
        await ref.reserve_energy(user2.id, 10, "dup", now=T0)
        one_by_one = await _one_by_one(await _grouped_scenario(ref, user2.id))
        ref_ledger = await ref.ledger(user2.id)

    assert grouped == one_by_one
    assert grouped[1:3] == ["StoreConflict", "NotFound"] and grouped[5] == "InsufficientEnergy"
    ledger = await sqlite_store.ledger(user.id)
    strip = lambda es: [(e.request_id, e.kind, e.amount, e.balance_after, e.reason) for e in es]
    assert strip(ledger) == strip(ref_ledger)
    assert await sqlite_store.balance(user.id) == 100 - 4 - 7
    await assert_ledger_consistent(sqlite_store, user.id)


@pytest.mark.asyncio
async def test_a_group_never_reports_success_for_a_write_that_was_not_committed(
        sqlite_store, monkeypatch):
    """If the group's transaction fails as a whole (I/O error, COMMIT refused, ...), every
    write of the group gets the error and nothing of the group is stored."""
    ws = await sqlite_store.create_workspace("acme")
    user = await sqlite_store.create_user(ws.id, "free", energy=100, now=T0)
    async with HoldDatabaseThread(sqlite_store, monkeypatch) as hold:
        calls = [sqlite_store.reserve_energy(user.id, 1, f"r{i}") for i in range(5)]
        # The last write of the group ends the transaction under the combiner's feet,
        # as a failing disk would: the group cannot be committed.
        calls.append(sqlite_store._write(lambda db: db.execute("ROLLBACK")))
        grouped = asyncio.gather(*calls, return_exceptions=True)
    results = await grouped
    assert hold.groups[0] == 6
    assert all(isinstance(r, sqlite3.Error) for r in results), results
    assert await sqlite_store.balance(user.id) == 100
    assert await sqlite_store.stale_reservations(time.time() + 1) == []
    await assert_ledger_consistent(sqlite_store, user.id)
    assert (await sqlite_store.reserve_energy(user.id, 1, "after")).ok  # the store goes on


@pytest.mark.asyncio
async def test_500_concurrent_mixed_energy_operations(store, user):
    """Reserves, settles, refunds, racing outcomes and duplicate reserves from two Store
    instances at once: one outcome per reservation, balances exact, ledger consistent."""
    ws = await store.get_workspace(user.workspace_id)
    users = [user] + [await store.create_user(ws.id, "free", energy=10_000) for _ in range(3)]
    await store.grant_energy(user.id, 9_900)  # everyone starts at 10,000
    other = open_store(store.url)
    async with other:
        async def request(i):
            s = store if i % 2 else other
            rid, amount = f"req-{i}", 1 + i % 7
            calls = [s.reserve_energy(users[i % 4].id, amount, rid)]
            if i % 5 == 0:  # a duplicate reserve races the original: exactly one wins
                calls.append((other if i % 2 else store).reserve_energy(users[i % 4].id,
                                                                         amount, rid))
            reserved = await asyncio.gather(*calls, return_exceptions=True)
            outcomes = [s.settle_energy(rid, i % 3) if i % 3 else s.refund_energy(rid)]
            if i % 4 == 0 or i % 10 == 1:  # a racing second outcome: only one counts
                outcomes.append((other if i % 2 else store).refund_energy(rid))
            return reserved, await asyncio.gather(*outcomes)

        results = await asyncio.gather(*(request(i) for i in range(200)))
    n_ops = sum(len(r) + len(o) for r, o in results)
    assert n_ops >= 500
    reserves = [r for rs, _ in results for r in rs]
    assert sum(not isinstance(r, Exception) and r.ok for r in reserves) == 200
    assert all(isinstance(r, StoreConflict) for r in reserves if isinstance(r, Exception))
    assert sum(isinstance(r, StoreConflict) for r in reserves) == 40
    assert all(sum(b is not None for b in outs) == 1 for _, outs in results)

    for i, u in enumerate(users):
        charged = 0
        entries = await store.ledger(u.id)
        by_request = {}
        for e in entries:
            if e.request_id is not None:
                by_request.setdefault(e.request_id, []).append(e)
        for rid, es in by_request.items():
            [reserve] = [e for e in es if e.kind == "reserve"]
            [outcome] = [e for e in es if e.kind in ("settle", "refund")]
            n = int(rid.split("-")[1])
            if outcome.kind == "settle":
                assert outcome.amount == -reserve.amount - min(n % 3, -reserve.amount)
            else:
                assert outcome.amount == -reserve.amount
            charged += -(reserve.amount + outcome.amount)
        assert len(by_request) == 50
        assert await store.balance(u.id) == 10_000 - charged
        await assert_ledger_consistent(store, u.id)
    assert await store.stale_reservations(time.time() + 1) == []


@pytest.mark.asyncio
async def test_close_finishes_pending_operations(tmp_path):
    """Shutdown loses nothing: calls already made complete (and commit) before close()
    returns; calls after it fail fast instead of hanging."""
    url = f"sqlite:///{tmp_path}/close.db"
    s = open_store(url)
    await s.open()
    ws = await s.create_workspace("acme")
    u = await s.create_user(ws.id, "free", energy=1_000)
    tasks = [asyncio.ensure_future(s.reserve_energy(u.id, 1, f"r{i}")) for i in range(100)]
    tasks += [asyncio.ensure_future(s.insert_usage([{"request_id": f"r{i}"}]))
              for i in range(100)]
    await asyncio.sleep(0)  # every task has queued its call
    await asyncio.wait_for(s.close(), 10)
    assert all(t.done() and not t.cancelled() and t.exception() is None for t in tasks)
    assert not await s.ping()
    with pytest.raises(RuntimeError):
        await s.balance(u.id)
    await asyncio.wait_for(s.close(), 1)  # closing twice is harmless
    assert await count_rows(url, "reservations") == 100
    assert await count_rows(url, "ai_usage_logs") == 100
    async with open_store(url) as again:
        assert await again.balance(u.id) == 900
        await assert_ledger_consistent(again, u.id)


@pytest.mark.asyncio
async def test_a_call_whose_caller_is_cancelled_still_completes(sqlite_store, monkeypatch):
    """A settle must not depend on the caller staying around: once queued, it runs."""
    ws = await sqlite_store.create_workspace("acme")
    user = await sqlite_store.create_user(ws.id, "free", energy=100)
    await sqlite_store.reserve_energy(user.id, 30, "req")
    async with HoldDatabaseThread(sqlite_store, monkeypatch):
        task = asyncio.ensure_future(sqlite_store.settle_energy("req", 10))
        await asyncio.sleep(0)
        task.cancel()
    # Writes run in the order they were queued, so this second settle runs after the
    # cancelled one (a read could be served before it: nobody saw that settle return).
    assert await sqlite_store.settle_energy("req") is None
    assert await sqlite_store.balance(user.id) == 90
    await assert_ledger_consistent(sqlite_store, user.id)


# ------------------------------------------------ reservations on the loop's thread


@pytest_asyncio.fixture
async def loop_store(tmp_path):
    async with open_store(f"sqlite:///{tmp_path}/loop.db") as s:
        assert s._inline is not None  # the default for a file database
        yield s


def _record_groups(monkeypatch):
    """Records (connection is the loop's, group size) for every write group."""
    from gateway.store import sqlite as store_sqlite

    groups = []
    run_writes = store_sqlite._Database._run_writes

    def recording(db, writes, busy=None):
        groups.append((threading.current_thread() is threading.main_thread(), len(writes)))
        return run_writes(db, writes, busy)

    monkeypatch.setattr(store_sqlite._Database, "_run_writes", staticmethod(recording))
    return groups


@pytest.mark.asyncio
async def test_reservations_of_one_loop_turn_are_one_transaction_with_one_by_one_results(
        loop_store, tmp_path, monkeypatch):
    ws = await loop_store.create_workspace("acme")
    user = await loop_store.create_user(ws.id, "free", energy=20, now=T0)
    await loop_store.reserve_energy(user.id, 1, "dup", now=T0)

    def scenario(store, user_id):
        return [store.reserve_energy(user_id, 5, "a", now=T0),
                store.reserve_energy(user_id, 5, "dup", now=T0),  # StoreConflict
                store.reserve_energy("usr_missing", 1, "b", now=T0),  # NotFound
                store.reserve_energy(user_id, 50, "too-big", now=T0),  # not ok
                store.reserve_energy(user_id, 7, "c", now=T0),
                store.reserve_energy(user_id, 7, "d", now=T0)]  # 20-1-5-7 = 7: just enough

    groups = _record_groups(monkeypatch)
    together = [_outcome(r) for r in await asyncio.gather(*scenario(loop_store, user.id), return_exceptions=True)]
    assert groups == [(True, 6)]  # one group, run on the loop's (main) thread

    async with SQLiteStore(f"{tmp_path}/ref.db", loop_writes=False) as ref:
        ws2 = await ref.create_workspace("acme")
        user2 = await ref.create_user(ws2.id, "free", energy=20, now=T0)
        await ref.reserve_energy(user2.id, 1, "dup", now=T0)
        one_by_one = await _one_by_one(scenario(ref, user2.id))
        ref_ledger = await ref.ledger(user2.id)
    assert together == one_by_one
    assert together[1:3] == ["StoreConflict", "NotFound"]
    assert [r.ok for r in together if not isinstance(r, str)] == [True, False, True, True]
    strip = lambda es: [(e.request_id, e.kind, e.amount, e.balance_after) for e in es]
    assert strip(await loop_store.ledger(user.id)) == strip(ref_ledger)
    assert await loop_store.balance(user.id) == 0
    await assert_ledger_consistent(loop_store, user.id)


@pytest.mark.asyncio
async def test_a_locked_file_sends_reservations_to_the_thread_and_never_blocks_the_loop(loop_store):
    """Another process (here: another connection) holds the write lock. The loop's
    connection must not wait for it (the loop keeps running), and the reservations still
    complete, exactly once each, when the lock is released."""
    ws = await loop_store.create_workspace("acme")
    user = await loop_store.create_user(ws.id, "free", energy=100)
    other = sqlite3.connect(loop_store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        reserves = asyncio.gather(*(loop_store.reserve_energy(user.id, 1, f"r{i}") for i in range(10)))
        ticks = 0
        for _ in range(20):  # the loop stays responsive while the file is locked
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not reserves.done()
        assert loop_store.inline_fallbacks >= 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    results = await asyncio.wait_for(reserves, 15)
    assert all(r.ok for r in results)
    assert await loop_store.balance(user.id) == 90
    await assert_ledger_consistent(loop_store, user.id)


@pytest.mark.asyncio
async def test_write_behind_batches_are_written_in_short_transactions(loop_store, monkeypatch):
    """settle_many and insert_usage hold the file's lock one short chunk at a time (a batch
    held it for tens of ms under load while every reservation waited); settlements on the
    loop's connection, usage rows on the store thread; the results are those of one big
    transaction."""
    from gateway.store.sqlite import SETTLE_CHUNK, USAGE_CHUNK

    ws = await loop_store.create_workspace("acme")
    user = await loop_store.create_user(ws.id, "free", energy=1000)
    ids = [f"r{i}" for i in range(3 * SETTLE_CHUNK + 5)]
    for request_id in ids:
        await loop_store.reserve_energy(user.id, 2, request_id)
    groups = _record_groups(monkeypatch)
    assert await loop_store.settle_many(ids + ids[:3]) == len(ids)  # duplicates settle once
    assert groups == [(True, 1)] * 4  # four transactions, each on the loop's connection
    rows = [{"request_id": f"u{i}", "user_id": user.id, "status": 200} for i in range(2 * USAGE_CHUNK + 1)]
    groups.clear()
    assert await loop_store.insert_usage(rows) == len(rows)
    assert groups == [(False, 1)] * 3  # three, on the store thread
    assert await loop_store.insert_usage(rows) == 0  # a retried batch writes nothing twice
    assert await loop_store.settle_many(ids) == 0
    assert await loop_store.balance(user.id) == 1000 - 2 * len(ids)
    assert len(await loop_store.usage_rows()) == len(rows)
    await assert_ledger_consistent(loop_store, user.id)


@pytest.mark.asyncio
async def test_a_locked_file_sends_write_behind_chunks_to_the_thread(loop_store):
    ws = await loop_store.create_workspace("acme")
    user = await loop_store.create_user(ws.id, "free", energy=100)
    for i in range(40):
        await loop_store.reserve_energy(user.id, 1, f"r{i}")
    other = sqlite3.connect(loop_store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        settling = asyncio.ensure_future(loop_store.settle_many([f"r{i}" for i in range(40)]))
        for _ in range(10):  # the loop stays responsive while the file is locked
            await asyncio.sleep(0.01)
        assert not settling.done() and loop_store.inline_fallbacks >= 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await asyncio.wait_for(settling, 15) == 40
    assert await loop_store.stale_reservations(time.time() + 10) == []
    await assert_ledger_consistent(loop_store, user.id)


@pytest.mark.asyncio
async def test_reservations_of_one_loop_turn_equal_one_by_one_on_each_backend(store, tmp_path, monkeypatch):
    """The reservations of one loop turn go to PostgreSQL as one gw_reserve call (SQLite:
    one group on the loop's connection); every outcome, ledger row and balance equals
    reserving one at a time, refills, duplicates and unknown users included."""
    calls = []
    if isinstance(store, PostgresStore):
        call = PostgresStore._call_reserve

        async def recording(self, jobs):
            calls.append(len(jobs))
            return await call(self, jobs)

        monkeypatch.setattr(PostgresStore, "_call_reserve", recording)
    day = (10, 86400.0)

    async def setup(s):
        ws = await s.create_workspace("acme")
        a = await s.create_user(ws.id, "free", energy=20, now=T0)
        b = await s.create_user(ws.id, "free", energy=2, start_refill_period=True, now=T0)
        await s.reserve_energy(a.id, 1, "dup", now=T0)
        return a.id, b.id

    def scenario(s, a, b):
        later = T0 + 86400 * 2.5  # b is due a refill (top-up to 10) at its first reservation
        return [s.reserve_energy(b, 4, "b1", refill=day, now=later),
                s.reserve_energy(a, 5, "a1", now=T0),
                s.reserve_energy(a, 5, "dup", now=T0),  # StoreConflict
                s.reserve_energy(b, 4, "a1", refill=day, now=later),  # StoreConflict (a's id)
                s.reserve_energy("usr_missing", 1, "m", now=T0),  # NotFound
                s.reserve_energy(a, 50, "too-big", now=T0),  # not ok
                s.reserve_energy(b, 4, "b2", refill=day, now=later),  # no second refill
                s.reserve_energy(b, 4, "b3", refill=day, now=later),  # 10-4-4 = 2: short
                s.reserve_energy(a, 7, "c", now=T0),
                s.reserve_energy(a, 7, "d", now=T0)]  # 20-1-5-7 = 7: just enough

    a, b = await setup(store)
    calls.clear()
    together = [_outcome(r) for r in await asyncio.gather(*scenario(store, a, b), return_exceptions=True)]
    if isinstance(store, PostgresStore):
        assert calls == [10]  # one call, one round trip
    async with SQLiteStore(f"{tmp_path}/ref.db", loop_writes=False) as ref:
        ra, rb = await setup(ref)
        one_by_one = await _one_by_one(scenario(ref, ra, rb))
        ref_ledgers = [await ref.ledger(ra), await ref.ledger(rb)]
    assert together == one_by_one
    assert [r if isinstance(r, str) else (r.ok, r.balance, r.refilled) for r in together] == [
        (True, 6, 8), (True, 14, 0), "StoreConflict", "StoreConflict", "NotFound", (False, 14, 0),
        (True, 2, 0), (False, 2, 0), (True, 7, 0), (True, 0, 0)]
    strip = lambda es: [(e.request_id, e.kind, e.amount, e.balance_after, e.created_at) for e in es]
    assert [strip(await store.ledger(a)), strip(await store.ledger(b))] == [strip(x) for x in ref_ledgers]
    assert (await store.get_user(b)).refilled_at == T0 + 86400 * 2
    for user_id in (a, b):
        await assert_ledger_consistent(store, user_id)


@pytest.mark.asyncio
@pytest.mark.parametrize("store_url", ["postgres", "pgbouncer"], indirect=True)
async def test_postgres_reservations_queued_when_the_store_closes_still_run(store_url):
    store = open_store(store_url)
    await store.open()
    ws = await store.create_workspace("acme")
    user = await store.create_user(ws.id, "free", energy=100)
    pending = [asyncio.ensure_future(store.reserve_energy(user.id, 1, f"r{i}")) for i in range(5)]
    await asyncio.sleep(0)  # queued for this loop turn, not sent yet
    assert store._reserving
    await store.close()
    assert all(r.ok for r in [await p for p in pending])
    async with open_store(store_url) as again:
        assert await again.balance(user.id) == 95


def _hold_reserve_calls(monkeypatch, held_calls: int = RESERVE_IN_FLIGHT) -> tuple[list[int], asyncio.Event]:
    """The first `held_calls` gw_reserve calls wait for the event; the sizes of all calls."""
    sizes, release = [], asyncio.Event()
    call = PostgresStore._call_reserve

    async def held(self, jobs):
        sizes.append(len(jobs))
        if len(sizes) <= held_calls:
            await release.wait()
        return await call(self, jobs)

    monkeypatch.setattr(PostgresStore, "_call_reserve", held)
    return sizes, release


async def _reserve_in_turns(store, user_ids: list[str], prefix: str) -> list[asyncio.Future]:
    """A reservation of 1 for each of these users, each in a loop turn of its own."""
    pending = []
    for i, user_id in enumerate(user_ids):
        pending.append(asyncio.ensure_future(store.reserve_energy(user_id, 1, f"{prefix}{i}")))
        await asyncio.sleep(0.01)
    return pending


async def _more_users(store, user, count: int) -> list[str]:
    return [(await store.create_user(user.workspace_id, "free", energy=100)).id
            for _ in range(count)]


@pytest.mark.asyncio
@pytest.mark.parametrize("store_url", ["postgres", "pgbouncer"], indirect=True)
async def test_reservations_arriving_while_calls_are_in_flight_go_together(store, user, monkeypatch):
    """At most RESERVE_IN_FLIGHT gw_reserve calls at once: the reservations arriving
    meanwhile wait for one to return and go in one call."""
    monkeypatch.setattr(store_postgres, "RESERVE_STALLED", 60.0)  # slow calls, not stalled ones
    sizes, release = _hold_reserve_calls(monkeypatch)
    others = await _more_users(store, user, RESERVE_IN_FLIGHT)
    first = await _reserve_in_turns(store, others, "first")
    later = await _reserve_in_turns(store, [user.id] * 5, "later")
    assert sizes == [1] * RESERVE_IN_FLIGHT
    release.set()
    assert all(r.ok for r in await asyncio.gather(*first, *later))
    assert sizes == [1] * RESERVE_IN_FLIGHT + [5]
    assert await store.balance(user.id) == 100 - 5
    await assert_ledger_consistent(store, user.id)


@pytest.mark.asyncio
@pytest.mark.parametrize("store_url", ["postgres", "pgbouncer"], indirect=True)
async def test_a_users_reservations_wait_for_its_call_in_flight_others_do_not(store, user, monkeypatch):
    """A reservation whose user is in a call in flight waits for that call (it would wait
    on the user's row lock anyway) and goes with that user's others; another user's goes
    at once, in a call without them."""
    sizes, release = _hold_reserve_calls(monkeypatch, held_calls=1)
    (other,) = await _more_users(store, user, 1)
    held = await _reserve_in_turns(store, [user.id] * 4, "r")
    assert sizes == [1]
    assert (await store.reserve_energy(other, 1, "other")).ok
    assert sizes == [1, 1]
    release.set()
    assert all(r.ok for r in await asyncio.gather(*held))
    assert sizes == [1, 1, 3]
    assert [await store.balance(u) for u in (user.id, other)] == [96, 99]
    await assert_ledger_consistent(store, user.id)


@pytest.mark.asyncio
@pytest.mark.parametrize("store_url", ["postgres", "pgbouncer"], indirect=True)
async def test_calls_in_flight_past_reserve_stalled_do_not_hold_back_the_next(store, user, monkeypatch):
    """A call in flight longer than RESERVE_STALLED waits on something (a row lock), not
    for CPU: it stops counting toward RESERVE_IN_FLIGHT, and the reservations queued behind
    the cap go out then, not when the stalled calls return."""
    monkeypatch.setattr(store_postgres, "RESERVE_STALLED", 0.05)
    sizes, release = _hold_reserve_calls(monkeypatch)
    stalled = await _reserve_in_turns(store, await _more_users(store, user, RESERVE_IN_FLIGHT), "s")
    queued = asyncio.ensure_future(store.reserve_energy(user.id, 1, "queued"))
    try:
        await asyncio.sleep(0)
        assert store._reserving  # behind the cap: the calls in flight are not 0.05 s old yet
        assert (await asyncio.wait_for(queued, 5)).ok
        assert sizes == [1] * RESERVE_IN_FLIGHT + [1]
    finally:
        release.set()
    assert all(r.ok for r in await asyncio.gather(*stalled))


@pytest.mark.asyncio
@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
async def test_waiting_for_a_call_in_flight_counts_toward_the_store_timeout(store, user, monkeypatch):
    """store.timeout bounds a reservation from its arrival: one that waited it out behind
    its user's slow call in flight fails closed (StoreUnavailable) as that call does,
    without a call of its own, and nothing is reserved."""
    store.timeout = 0.2
    sizes, release = _hold_reserve_calls(monkeypatch)
    pending = await _reserve_in_turns(store, [user.id] * 2, "r")
    await asyncio.sleep(0.3)
    release.set()
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    assert [type(o) for o in outcomes] == [StoreUnavailable] * len(pending)
    assert sizes == [1]
    assert await store.balance(user.id) == 100
    await assert_ledger_consistent(store, user.id)


@asynccontextmanager
async def _row_locked_elsewhere(store_url: str, user_id: str) -> AsyncIterator[None]:
    """The user's row locked (FOR UPDATE) by another session's open transaction, as an
    admin's transaction or another process's slow call would hold it."""
    schema = parse_qs(urlsplit(store_url).query)["schema"][-1]
    holder = await asyncpg.connect(PG_URL)
    try:
        async with holder.transaction():
            await holder.execute(f'SELECT 1 FROM "{schema}".users WHERE id = $1 FOR UPDATE', user_id)
            yield
    finally:
        await holder.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("store_url", ["postgres", "pgbouncer"], indirect=True)
async def test_one_locked_user_row_does_not_block_other_users_reservations(store_url, store, user):
    """While one user's row is locked elsewhere and that user keeps sending, the calls in
    flight wait on the lock; another user's reservation still goes out in a call of its
    own and succeeds at once, instead of queueing behind them and riding in a group with
    the locked user's until store.timeout."""
    hot = await store.create_user(user.workspace_id, "free", name="hot", energy=1000)
    store.timeout = 1.0
    loop = asyncio.get_running_loop()
    hot_pending = []
    async with _row_locked_elsewhere(store_url, hot.id):
        for i in range(4):  # more than RESERVE_IN_FLIGHT calls' worth, a loop turn each
            hot_pending.append(asyncio.ensure_future(store.reserve_energy(hot.id, 1, f"hot{i}")))
            await asyncio.sleep(0.05)
        started = loop.time()
        other = await store.reserve_energy(user.id, 1, "other")
        waited = loop.time() - started
        for i in range(4, 8):  # the locked user keeps sending
            hot_pending.append(asyncio.ensure_future(store.reserve_energy(hot.id, 1, f"hot{i}")))
            await asyncio.sleep(0.05)
    assert other.ok and waited < 0.6, waited  # the lock's bound, not a speed one: timeout is 1.0
    await asyncio.gather(*hot_pending, return_exceptions=True)
    assert await store.balance(user.id) == 99
    for user_id in (user.id, hot.id):
        await assert_ledger_consistent(store, user_id)


@pytest.mark.asyncio
@pytest.mark.parametrize("store_url", ["postgres", "pgbouncer"], indirect=True)
async def test_after_a_call_times_out_on_a_locked_row_its_user_goes_alone(store_url, store, user):
    """A user whose call ran out of store.timeout (its row locked elsewhere) has its next
    reservations sent in a call of their own: another user's, arriving in the same loop
    turn, does not ride with them into the same lock."""
    hot = await store.create_user(user.workspace_id, "free", name="hot", energy=1000)
    store.timeout = 0.3
    others = []
    async with _row_locked_elsewhere(store_url, hot.id):
        first = store.reserve_energy_soon(hot.id, 1, "hot0")
        await asyncio.sleep(0.05)
        second = store.reserve_energy_soon(hot.id, 1, "hot1")  # waits for hot0's call
        # Arrives in the loop turn in which hot0's call times out, hot1 still queued.
        first.add_done_callback(
            lambda _: others.append(store.reserve_energy_soon(user.id, 1, "other")))
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        other = await others[0]
    assert [type(o) for o in outcomes] == [StoreUnavailable] * 2
    assert other.ok
    assert [await store.balance(u) for u in (user.id, hot.id)] == [99, 1000]
    for user_id in (user.id, hot.id):
        await assert_ledger_consistent(store, user_id)


@pytest.mark.asyncio
async def test_reservations_queued_when_the_store_closes_still_run(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/closing.db")
    await store.open()
    ws = await store.create_workspace("acme")
    user = await store.create_user(ws.id, "free", energy=100)
    pending = [asyncio.ensure_future(store.reserve_energy(user.id, 1, f"r{i}")) for i in range(5)]
    await asyncio.sleep(0)  # queued for this loop turn, not run yet
    assert store._inline_jobs  # still queued when close() starts
    await store.close()
    assert all(r.ok for r in [await p for p in pending])
    async with open_store(f"sqlite:///{tmp_path}/closing.db") as again:
        assert await again.balance(user.id) == 95


def test_an_in_flight_claim_left_by_a_dead_process_is_reclaimed_after_its_lease():
    """A crash between claim and finish must not block the key for the whole window."""
    from gateway.store import IN_FLIGHT_LEASE, idempotency_decision

    common = dict(stored_status="in_flight", stored_fingerprint="f", fingerprint="f", window=86400.0)
    assert idempotency_decision(stored_created_at=0.0, now=IN_FLIGHT_LEASE - 1, **common) == "in_flight"
    assert idempotency_decision(stored_created_at=0.0, now=IN_FLIGHT_LEASE, **common) == "reclaim"
    done = dict(common, stored_status="done")
    assert idempotency_decision(stored_created_at=0.0, now=IN_FLIGHT_LEASE + 1, **done) == "done"


@pytest.mark.asyncio
async def test_the_wal_is_checkpointed_off_the_working_connections(loop_store):
    """Neither working connection checkpoints (no COMMIT waits for an fsync); the
    checkpointer thread copies the WAL into the database file within a second or so."""
    main = Path(loop_store.path)
    before = main.stat().st_size
    rows = [{"request_id": f"w{i}", "model": "m" * 200} for i in range(3000)]
    await loop_store.insert_usage(rows)
    for _ in range(50):
        if main.stat().st_size > before + 500_000:
            break
        await asyncio.sleep(0.1)
    assert main.stat().st_size > before + 500_000  # the rows reached the main file
    with sqlite3.connect(loop_store.path) as db:
        assert db.execute("SELECT count(*) FROM ai_usage_logs").fetchone()[0] == 3000
