"""Refill: a tier's allowance (`refill: {amount, period}`) tops a balance up once per period,
and the bill stays exact around it, on both stores.

* Creation starts the first period, with the energy given (the tier's amount when none is).
* A refund never lifts a balance above what it would have been without the request: each
  refill since the reservation takes its top-up off what comes back. The yardstick in
  these tests is a *twin*: a user with the same history minus the failed request.
* A refill never takes energy away: a grant above the allowance survives it.
* Every change is a ledger row, and the rows add up to the balance.

The store is driven directly with a fake clock (`now=`); the first two tests go through
the gateway (admin path and a real request).
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from gateway.store import Store, open_store
from tests.conftest import MASTER

T0 = 1_700_000_000.0
DAY = 86_400.0
ALLOWANCE = (10, DAY)  # refill: {amount: 10, period: 1d}
HELLO = [{"role": "user", "content": "hi"}]

both_stores = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)


@pytest_asyncio.fixture
async def store(store_url):
    s = open_store(store_url)
    await s.open()
    yield s
    await s.close()


async def new_user(store: Store, energy: int = 10, name: str = "ada") -> str:
    """A user created at T0 on a tier with ALLOWANCE (as gateway/admin/operations.py creates them)."""
    ws = await store.get_workspace("acme") or await store.create_workspace("acme")
    user = await store.create_user(ws.id, "free", name=name, energy=energy, start_refill_period=True, now=T0)
    return user.id


async def assert_ledger_explains_balance(store: Store, user_id: str) -> None:
    running = 0
    for entry in await store.ledger(user_id):
        running += entry.amount
        assert entry.balance_after == running >= 0, entry
    assert await store.balance(user_id) == running


# ------------------------------------------------------------------ creation starts the period


@both_stores
def test_a_new_user_keeps_the_energy_given_until_the_first_period_ends(gateway_factory):
    """`users create --energy 3` on a tier with a daily refill of 1000: the first request
    leaves 2, not 999 (creation is the start of the period, not a request)."""
    gw = gateway_factory(tiers={"free": {"models": ["*"]},
                                "pro": {"models": ["*"], "refill": {"amount": 1000, "period": "1d"}}})
    user_id, key = gw.make_user(tier="pro", energy=3)
    user = gw.run(gw.store.get_user(user_id))
    assert user.refilled_at == user.created_at

    raw = gw.client(key).chat.completions.with_raw_response.create(model="demo", messages=HELLO)

    assert raw.headers["X-Energy-Remaining"] == "2"
    gw.settle()
    assert [(e.kind, e.amount) for e in gw.ledger(user_id)] == [("grant", 3), ("reserve", -1), ("settle", 0)]


@both_stores
def test_a_new_user_created_without_energy_starts_with_the_tier_amount(gateway_factory):
    """No energy given: the tier's refill amount, as a traceable grant; the period starts too.
    On a tier without a refill: 0, and no period."""
    gw = gateway_factory(tiers={"free": {"models": ["*"], "refill": {"amount": 10, "period": "1d"}},
                                "pro": {"models": ["*"]}})
    admin = gw.admin()
    gw.run(admin.create_workspace(MASTER, "acme"))

    on_refill = gw.run(admin.create_user(MASTER, "acme", "free"))
    no_refill = gw.run(admin.create_user(MASTER, "acme", "pro"))

    assert (on_refill["energy"], on_refill["refilled_at"]) == (10, on_refill["created_at"])
    assert [(e.kind, e.amount, e.reason) for e in gw.ledger(on_refill["id"])] == [("grant", 10, "initial energy")]
    assert (no_refill["energy"], no_refill["refilled_at"]) == (0, None)


@both_stores
async def test_the_first_top_up_comes_one_period_after_creation(store):
    user_id = await new_user(store, energy=3)

    before = await store.reserve_energy(user_id, 1, "a", refill=ALLOWANCE, now=T0 + DAY - 1)
    after = await store.reserve_energy(user_id, 1, "b", refill=ALLOWANCE, now=T0 + DAY)

    assert (before.balance, before.refilled) == (2, 0)
    assert (after.balance, after.refilled) == (9, 8)
    assert (await store.get_user(user_id)).refilled_at == T0 + DAY
    await assert_ledger_explains_balance(store, user_id)


@both_stores
async def test_a_user_without_a_period_is_topped_up_at_the_first_request(store):
    """Created on a tier without a refill, then moved to one: the first request tops up
    and starts the period (a tier change between two tiers with refills keeps the schedule)."""
    ws = await store.create_workspace("acme")
    user = await store.create_user(ws.id, "pro", energy=3, now=T0)
    await store.set_tier(user.id, "free")

    r = await store.reserve_energy(user.id, 1, "a", refill=ALLOWANCE, now=T0 + 60)

    assert (r.balance, r.refilled) == (9, 7)
    assert (await store.get_user(user.id)).refilled_at == T0 + 60


# ------------------------------------------------------------- refunds after a refill


@both_stores
async def test_a_refund_after_a_refill_does_not_lift_the_balance_above_the_allowance(store):
    """10/day, balance 10: reserve 1 (9); the day rolls over and the next request's refill
    tops up to 10; the first request fails. Its refund returns nothing: the refill already
    gave that 1 back (ended at 10, and 19 after a day of this, before the fix)."""
    user_id, twin_id = await new_user(store), await new_user(store, name="twin")
    await store.reserve_energy(user_id, 1, "failed", refill=ALLOWANCE, now=T0 + 60)
    for uid, request_id in ((user_id, "next"), (twin_id, "twin-next")):
        await store.reserve_energy(uid, 1, request_id, refill=ALLOWANCE, now=T0 + DAY + 1)

    balance = await store.refund_energy("failed", reason="upstream_error", now=T0 + DAY + 2)

    assert balance == 9 == await store.balance(twin_id)
    await assert_ledger_explains_balance(store, user_id)


@both_stores
async def test_a_refund_after_a_partial_top_up_returns_what_the_top_up_did_not_cover(store):
    """Reserve 3 at 10 (7), a grant of 1 (8), the refill adds 2 (10): the refund returns 1,
    which is where the twin stands (10 + 1 = 11: above the allowance, thanks to the grant)."""
    user_id, twin_id = await new_user(store), await new_user(store, name="twin")
    await store.reserve_energy(user_id, 3, "failed", refill=ALLOWANCE, now=T0 + 60)
    for uid in (user_id, twin_id):
        await store.grant_energy(uid, 1, now=T0 + 120)
        await store.reserve_energy(uid, 0, f"{uid}-next", refill=ALLOWANCE, now=T0 + DAY)

    balance = await store.refund_energy("failed", now=T0 + DAY + 1)

    assert balance == 11 == await store.balance(twin_id)


@both_stores
async def test_a_refund_across_a_refill_that_added_nothing_is_returned_in_full(store):
    """Above the allowance (a grant) the refill adds nothing, so the refund is whole."""
    user_id = await new_user(store)
    await store.grant_energy(user_id, 5, now=T0 + 1)  # 15
    await store.reserve_energy(user_id, 1, "failed", refill=ALLOWANCE, now=T0 + 60)  # 14
    r = await store.reserve_energy(user_id, 0, "next", refill=ALLOWANCE, now=T0 + DAY)
    assert r.refilled == 0

    assert await store.refund_energy("failed", now=T0 + DAY + 1) == 15


@both_stores
async def test_a_refund_with_no_refill_since_its_reservation_is_returned_in_full(store):
    """A refill *before* the reservation (in its own transaction) takes nothing off."""
    user_id = await new_user(store, energy=2)
    r = await store.reserve_energy(user_id, 4, "failed", refill=ALLOWANCE, now=T0 + DAY)
    assert (r.ok, r.refilled, r.balance) == (True, 8, 6)

    assert await store.refund_energy("failed", now=T0 + DAY + 1) == 10


@both_stores
async def test_a_partial_settlement_after_a_refill_returns_only_what_the_refill_did_not_cover(store):
    """Reserved 5, cost 2: the unused 3 would come back, but the refill since then topped
    up those 5 already. The twin spent 2 and was topped up to 10 too."""
    user_id, twin_id = await new_user(store), await new_user(store, name="twin")
    await store.reserve_energy(user_id, 5, "req", refill=ALLOWANCE, now=T0 + 60)  # 5
    await store.reserve_energy(twin_id, 2, "twin-req", refill=ALLOWANCE, now=T0 + 60)  # 8
    for uid in (user_id, twin_id):
        await store.reserve_energy(uid, 0, f"{uid}-next", refill=ALLOWANCE, now=T0 + DAY)

    balance = await store.settle_energy("req", final_amount=2, now=T0 + DAY + 1)

    assert balance == 10 == await store.balance(twin_id)


@both_stores
async def test_refunds_racing_a_refill_never_end_above_the_allowance(store):
    """Two connections (two gateway processes): ten requests reserved yesterday fail while
    ten new ones arrive, the first of which refills. Whatever the interleaving, no grant
    was made, so the balance never ends above the allowance, and the ledger adds up."""
    user_id = await new_user(store)
    for i in range(10):
        await store.reserve_energy(user_id, 1, f"old{i}", refill=ALLOWANCE, now=T0 + 60)
    assert await store.balance(user_id) == 0
    other = open_store(store.url)
    async with other:
        await asyncio.gather(*(
            (other if i % 2 else store).reserve_energy(user_id, 1, f"new{i}", refill=ALLOWANCE, now=T0 + DAY + 1)
            for i in range(10)
        ), *(
            (store if i % 2 else other).refund_energy(f"old{i}", now=T0 + DAY + 1) for i in range(10)
        ))
        for i in range(10):
            await store.refund_energy(f"new{i}", now=T0 + DAY + 2)

    assert await store.balance(user_id) <= 10
    await assert_ledger_explains_balance(store, user_id)


# ------------------------------------------------------------------------- grants


@both_stores
async def test_a_grant_above_the_allowance_survives_a_refill(store):
    user_id = await new_user(store)
    await store.grant_energy(user_id, 50, reason="bought a pack", now=T0 + 1)  # 60

    r = await store.reserve_energy(user_id, 1, "a", refill=ALLOWANCE, now=T0 + DAY)

    assert (r.balance, r.refilled) == (59, 0)
    assert (await store.get_user(user_id)).refilled_at == T0 + DAY  # the schedule moves on


# ------------------------------------------------------------------------- the ledger


@both_stores
async def test_ledger_rows_explain_every_change_around_a_refill(store):
    """Grant, reserve, refill, reserve, capped refund: one row each, the capped refund
    saying where the rest went, and the rows add up to the balance."""
    user_id = await new_user(store)
    await store.reserve_energy(user_id, 2, "failed", refill=ALLOWANCE, now=T0 + 60)
    await store.reserve_energy(user_id, 1, "next", refill=ALLOWANCE, now=T0 + DAY)
    await store.refund_energy("failed", reason="upstream_error", now=T0 + DAY + 1)

    rows = [(e.kind, e.request_id, e.amount, e.balance_after) for e in await store.ledger(user_id)]
    assert rows == [
        ("grant", None, 10, 10),
        ("reserve", "failed", -2, 8),
        ("refill", None, 2, 10),
        ("reserve", "next", -1, 9),
        ("refund", "failed", 0, 9),
    ]
    refund = (await store.ledger(user_id))[-1]
    assert refund.reason == "upstream_error; 2 not returned: a refill since the reservation covered it"
    await assert_ledger_explains_balance(store, user_id)
