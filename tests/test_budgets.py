"""Budgets (docs/budgets.md, gateway/budgets.py): ceilings in energy or USD per workspace, user
and key, over a calendar period in a time zone or for life, held in the same store transaction
as the energy on every billed surface; a hard limit refuses (429 budget_exceeded) or goes down
the ladder; soft limits alert once per threshold and period; managed by the CLI and /admin,
shown on the dashboard. Exactness across two processes is in tests/test_budgets_multiprocess.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import openai
import pytest
import yaml

from gateway import budgets as rules
from gateway.store.base import Budget
from tests.conftest import MASTER_KEY
from tests.test_alerts import SECRET, Receiver, documented_verify, endpoint, wait_for
from tests import test_mcp

BOTH = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
CHAIN = ["auth", "tier_policy", "energy"]
MSGS = [{"role": "user", "content": "hi"}]
ROOT = Path(__file__).resolve().parent.parent
fake_servers, mcp_gateway = test_mcp.fake_servers, test_mcp.mcp_gateway  # fixtures: an MCP gateway, its upstreams


def admin(gw, method: str, path: str, key: str = MASTER_KEY, **kw) -> httpx.Response:
    return httpx.request(method, gw.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kw)


def set_budget(gw, as_key: str = MASTER_KEY, **body) -> dict:
    answer = admin(gw, "POST", "/admin/budgets", as_key, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def budget_row(gw, budget_id: str) -> dict:
    rows = admin(gw, "GET", "/admin/budgets").json()
    return next(r for r in rows if r["id"] == budget_id)


def energy_plugin(gw):
    return next(p for p in gw.state.chain.plugins if p.name == "energy")


def chat(gw, key: str, model: str = "gpt-4o-mini", **kw):
    return gw.client(key).chat.completions.with_raw_response.create(model=model, messages=MSGS, **kw)


# ------------------------------------------------------------------ periods (pure)


def budget(period: str, timezone: str = "UTC", **kw) -> Budget:
    base = dict(id="bud_x", workspace_id="ws", scope="user", scope_id="u", unit="energy", amount=100, period=period,
                timezone=timezone, alerts=(), hard="refuse", created_at=0.0, updated_at=0.0)
    return Budget(**{**base, **kw})


@pytest.mark.parametrize("period, now, start, end", [
    ("day", "2026-03-10T23:59:59", "2026-03-10T00:00:00", "2026-03-11T00:00:00"),
    ("week", "2026-03-15T12:00:00", "2026-03-09T00:00:00", "2026-03-16T00:00:00"),  # a Sunday: from Monday
    ("month", "2026-12-31T23:00:00", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
    ("day", "2026-03-29T12:00:00", "2026-03-29T00:00:00", "2026-03-30T00:00:00"),  # 23 h: Berlin's DST starts
])
def test_a_period_runs_from_local_midnight_to_the_next_in_its_time_zone(period, now, start, end):
    zone = ZoneInfo("Europe/Berlin")
    at = lambda text: datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()  # noqa: E731
    assert rules.period_bounds(period, "Europe/Berlin", at(now)) == (at(start), at(end))
    assert rules.period_bounds("life", "Europe/Berlin", at(now)) == (0.0, None)


def test_alert_percentages_are_crossed_once_by_the_spend_that_reaches_them():
    b = budget("day", alerts=(50, 80, 100))
    assert rules.crossed(b, 40, 49) == []
    assert rules.crossed(b, 49, 50) == [50]
    assert rules.crossed(b, 50, 100) == [80, 100]
    assert rules.crossed(b, 100, 120) == []


# ------------------------------------------------------------------ through the gateway


@BOTH
def test_a_refusing_budget_answers_429_budget_exceeded_openai_shaped_and_never_retried(gateway_factory, store_url):
    gw = gateway_factory(plugins=CHAIN)
    user, key = gw.make_user(energy=100)
    b = set_budget(gw, user=user, unit="energy", amount=5, period="day")
    first = chat(gw, key)  # gpt-4o-mini costs 2
    assert first.headers["x-budget-remaining"] == "3" and first.headers["x-budget-unit"] == "energy"
    assert chat(gw, key).headers["x-budget-remaining"] == "1"
    with pytest.raises(openai.RateLimitError) as refused:
        chat(gw, key)
    answer = refused.value.response
    assert answer.status_code == 429 and answer.headers["x-should-retry"] == "false"
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "budget_exceeded" and error["type"] == "insufficient_quota"
    assert "has 1 left" in error["message"] and "needs 2" in error["message"]
    assert answer.headers["x-budget-remaining"] == "1" and answer.headers["x-energy-cost"] == "0"
    gw.settle()
    assert gw.balance(user) == 96  # the refused request took nothing
    row = budget_row(gw, b["id"])
    assert (row["spent"], row["remaining"]) == (4, 1)


@BOTH
def test_a_downgrading_budget_serves_the_cheaper_model_down_the_ladder_then_refuses(gateway_factory, store_url):
    gw = gateway_factory(plugins=CHAIN)
    user, key = gw.make_user(energy=100)
    set_budget(gw, user=user, unit="energy", amount=7, period="day", hard="downgrade")
    first = chat(gw, key, model="gpt-4o")  # 5 of 7
    assert first.parse().model and "x-model-downgraded-from" not in first.headers
    second = chat(gw, key, model="gpt-4o")  # 5 does not fit in 2: gpt-4o-mini (2) does
    assert second.headers["x-model-downgraded-from"] == "gpt-4o"
    assert "budget" in second.headers["x-model-downgrade-reason"]
    assert second.headers["x-energy-cost"] == "2" and second.headers["x-budget-remaining"] == "0"
    with pytest.raises(openai.RateLimitError) as refused:
        chat(gw, key, model="gpt-4o")
    assert refused.value.response.json()["error"]["code"] == "budget_exceeded"


@BOTH
def test_workspace_user_and_key_budgets_all_hold_and_the_tightest_is_in_the_header(gateway_factory, store_url):
    gw = gateway_factory(plugins=CHAIN)
    user, key = gw.make_user(energy=100)
    key_id = gw.run(gw.store.list_keys(user_id=user))[0].id
    set_budget(gw, workspace="acme", unit="energy", amount=100, period="month")
    set_budget(gw, user=user, unit="energy", amount=50, period="week")
    kb = set_budget(gw, key=key_id, unit="energy", amount=4, period="life")
    assert chat(gw, key).headers["x-budget-remaining"] == "2"  # the key's: 2 of 4 left (50%)
    chat(gw, key)
    with pytest.raises(openai.RateLimitError):
        chat(gw, key)
    gw.settle()
    spent = {r["scope"]: r["spent"] for r in admin(gw, "GET", "/admin/budgets").json()}
    assert spent == {"workspace": 4, "user": 4, "key": 4}
    # A second key of the same user is not under the first key's budget.
    other = admin(gw, "POST", f"/admin/users/{user}/keys", json={}).json()["api_key"]
    assert chat(gw, other).headers["x-budget-remaining"] == "44"  # the user's: 44 of 50 (88%) vs 94 of 100
    admin(gw, "DELETE", f"/admin/budgets/{kb['id']}")
    assert chat(gw, key).status_code == 200  # deleted: the key serves again (pushed, not after a TTL)


@BOTH
def test_a_usd_budget_holds_the_ceiling_and_settles_at_the_cost(gateway_factory, store_url, upstream):
    gw = gateway_factory(plugins=CHAIN)
    user, key = gw.make_user(energy=1000)
    b = set_budget(gw, user=user, unit="usd", amount="0.01", period="month", timezone="America/New_York")
    answer = chat(gw, key, max_tokens=100)
    # gpt-4o-mini: $0.15 / $0.60 per million: the hold is the prompt and 100 output tokens
    remaining = Decimal(answer.headers["x-budget-remaining"])
    assert answer.headers["x-budget-unit"] == "usd" and Decimal("0.0099") < remaining < Decimal("0.01")
    gw.settle()
    row = budget_row(gw, b["id"])
    cost = Decimal(11) * Decimal("0.15") / 10**6 + Decimal(7) * Decimal("0.6") / 10**6  # the fake's 11 + 7 tokens
    assert Decimal(str(row["spent"])) == cost
    assert Decimal(str(row["remaining"])) == Decimal("0.01") - cost


@BOTH
def test_every_billed_surface_counts_against_the_budget(gateway_factory, store_url):
    gw = gateway_factory(plugins=CHAIN)
    user, key = gw.make_user(energy=100)
    b = set_budget(gw, user=user, unit="energy", amount=100, period="day")
    client = gw.client(key)
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)  # 2
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True).close()  # 2 (cut: billed)
    client.embeddings.create(model="embed", input="hello")  # 1 (the default price)
    client.responses.create(model="gpt-4o-mini", input="hi")  # 2
    messages = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                          json={"model": "claude", "max_tokens": 20, "messages": MSGS}, timeout=30)
    assert messages.status_code == 200, messages.text  # 1 (the default price)
    assert messages.headers["x-budget-remaining"]
    gw.settle()
    assert budget_row(gw, b["id"])["spent"] == 100 - gw.balance(user) == 8


@BOTH
def test_a_cache_hit_is_billed_against_the_budget_at_its_price(gateway_factory, store_url, upstream):
    gw = gateway_factory(plugins=["auth", "tier_policy", {"name": "cache", "settings": {"models": ["gpt-4o-mini"]}},
                                  "energy"],
                         energy={"default_action": "ai_message",
                                 "actions": {"ai_message": {"default": 4, "cache_hit_price": 1}}})
    user, key = gw.make_user(energy=100)
    b = set_budget(gw, user=user, unit="energy", amount=100, period="day")
    usd = set_budget(gw, workspace="acme", unit="usd", amount=1, period="day")
    chat(gw, key, temperature=0)
    hit = chat(gw, key, temperature=0)
    assert hit.headers["x-cache"] == "HIT"
    assert upstream.count("/chat/completions") == 1
    assert hit.headers["x-energy-cost"] == "1"
    gw.settle()
    assert budget_row(gw, b["id"])["spent"] == 5
    cost = Decimal(11) * Decimal("0.15") / 10**6 + Decimal(7) * Decimal("0.6") / 10**6
    assert Decimal(str(budget_row(gw, usd["id"])["spent"])) == cost  # the hit paid the provider nothing


@BOTH
def test_a_failed_request_returns_its_hold(gateway_factory, store_url, upstream):
    from tests.fakes import Fault

    gw = gateway_factory(plugins=CHAIN)
    user, key = gw.make_user(energy=100)
    b = set_budget(gw, user=user, unit="energy", amount=10, period="day")
    upstream.push(Fault.status(400))
    with pytest.raises(openai.BadRequestError):
        chat(gw, key)
    gw.settle()
    assert budget_row(gw, b["id"])["spent"] == 0


def test_a_period_rolls_over_at_its_boundary(gateway_factory):
    gw = gateway_factory(plugins=CHAIN)
    user, key = gw.make_user(energy=100)
    set_budget(gw, user=user, unit="energy", amount=4, period="day", timezone="Asia/Tokyo")
    zone = ZoneInfo("Asia/Tokyo")
    midnight = datetime(2026, 6, 2, tzinfo=zone).timestamp()
    energy = energy_plugin(gw)
    energy.clock = lambda: midnight - 0.001  # the last moment of June 1st in Tokyo
    chat(gw, key)
    chat(gw, key)
    with pytest.raises(openai.RateLimitError):
        chat(gw, key)
    energy.clock = lambda: midnight  # June 2nd: a new period, a new spend
    assert chat(gw, key).headers["x-budget-remaining"] == "2"
    gw.settle()
    b = gw.run(gw.store.list_budgets())[0]
    assert gw.run(gw.store.budget_spent([(b.id, midnight - 86400), (b.id, midnight)])) == {
        (b.id, midnight - 86400): 4, (b.id, midnight): 2}


def test_soft_alerts_are_sent_once_per_threshold_and_period(gateway_factory, server_thread):
    receiver = server_thread.run(Receiver(fail_first=0).start())
    try:
        gw = gateway_factory(plugins=CHAIN, alerts={"endpoints": [endpoint(receiver)], "retry_base": 0.05,
                                                    "retry_max": 0.2})
        user, key = gw.make_user(energy=100)
        b = set_budget(gw, user=user, unit="energy", amount=8, period="day", alerts=[50, 100], hard="none")
        for _ in range(5):  # 2, 4 (50%), 6, 8 (100%), 10: over, not refused (hard: none)
            assert chat(gw, key).status_code == 200
        events = wait_for(lambda: len(receiver.of_type("budget.threshold_crossed")) >= 2 and
                          receiver.of_type("budget.threshold_crossed"), what="two budget alerts")
        gw.settle()
        wait_for(lambda: gw.run(gw.store.alert_deliveries(status="pending")) == [], what="nothing pending")
        events = receiver.of_type("budget.threshold_crossed")
        assert sorted(e["json"]["data"]["percent"] for e in events) == [50, 100]
        assert {e["json"]["data"]["budget"] for e in events} == {b["id"]}
        assert events[0]["json"]["workspace_id"] == b["workspace_id"]
        assert SECRET not in json.dumps([e["json"] for e in events])
        verify = documented_verify()
        assert all(verify(SECRET, e["signature"], e["body"]) for e in events)
        # The same crossing again (a refund, another process) is the same event: not sent twice.
        energy = energy_plugin(gw)
        energy.services.alerts.emit("budget.threshold_crossed", {"percent": 50}, workspace_id=b["workspace_id"],
                                    key=f"{b['id']}|{rules.period_bounds('day', 'UTC', energy.clock())[0]}|50")
        gw.run(asyncio.sleep(0.5))
        assert len(receiver.of_type("budget.threshold_crossed")) == 2
    finally:
        server_thread.run(receiver.stop())


# ------------------------------------------------------------------ administration


def test_a_workspace_admin_manages_only_its_workspaces_user_and_key_budgets(gateway_factory):
    gw = gateway_factory(plugins=CHAIN)
    _, admin_key = gw.make_user(workspace="acme", role="workspace_admin")
    mine, _ = gw.make_user(workspace="acme")
    theirs, _ = gw.make_user(workspace="globex")
    ours = set_budget(gw, admin_key, user=mine, unit="energy", amount=10, period="week")
    assert ours["scope"] == "user" and ours["scope_id"] == mine
    foreign = admin(gw, "POST", "/admin/budgets", admin_key, json={"user": theirs, "unit": "energy", "amount": 1,
                                                                   "period": "day"})
    assert foreign.status_code == 404 and foreign.json()["error"]["code"] == "not_found"
    whole = admin(gw, "POST", "/admin/budgets", admin_key, json={"workspace": "acme", "unit": "usd", "amount": 5,
                                                                 "period": "day"})
    assert whole.status_code == 403  # a workspace's own ceiling is the operator's
    theirs_budget = set_budget(gw, user=theirs, unit="energy", amount=3, period="day")
    assert [r["id"] for r in admin(gw, "GET", "/admin/budgets", admin_key).json()] == [ours["id"]]
    assert admin(gw, "GET", "/admin/budgets", admin_key, params={"workspace": "globex"}).status_code == 404
    assert admin(gw, "DELETE", f"/admin/budgets/{theirs_budget['id']}", admin_key).status_code == 404
    assert admin(gw, "DELETE", f"/admin/budgets/{ours['id']}", admin_key).json() == {"id": ours["id"], "deleted": True}
    rows = admin(gw, "GET", "/admin/audit", admin_key).json()
    assert [r["action"] for r in rows if r["action"].startswith("budget.")] == ["budget.delete", "budget.set"]


@pytest.mark.parametrize("body, param", [
    ({"user": "x", "unit": "eur", "amount": 1, "period": "day"}, "unit"),
    ({"user": "x", "unit": "energy", "amount": 1.5, "period": "day"}, "amount"),
    ({"user": "x", "unit": "usd", "amount": "0.0000000001", "period": "day"}, "amount"),
    ({"user": "x", "unit": "usd", "amount": -1, "period": "day"}, "amount"),
    ({"user": "x", "unit": "energy", "amount": 1, "period": "year"}, "period"),
    ({"user": "x", "unit": "energy", "amount": 1, "period": "day", "timezone": "Mars/Olympus"}, "timezone"),
    ({"user": "x", "unit": "energy", "amount": 1, "period": "day", "alerts": [0]}, "alerts"),
    ({"user": "x", "unit": "energy", "amount": 1, "period": "day", "hard": "maybe"}, "hard"),
    ({"unit": "energy", "amount": 1, "period": "day"}, "workspace"),
    ({"user": "x", "key": "y", "unit": "energy", "amount": 1, "period": "day"}, "workspace"),
    ({"user": "x", "unit": "energy", "amount": 1, "period": "day", "color": "red"}, "color"),
])
def test_a_bad_budget_is_a_400_naming_its_field(gateway_factory, body, param):
    gw = gateway_factory(plugins=CHAIN)
    answer = admin(gw, "POST", "/admin/budgets", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_setting_a_budget_again_changes_it_and_keeps_what_it_spent(gateway_factory):
    gw = gateway_factory(plugins=CHAIN)
    user, key = gw.make_user(energy=100)
    first = set_budget(gw, user=user, unit="energy", amount=4, period="day")
    chat(gw, key)
    second = set_budget(gw, user=user, unit="energy", amount=10, period="day", alerts="50,80")
    assert second["id"] == first["id"] and second["amount"] == 10 and second["alerts"] == [50, 80]
    gw.settle()
    assert budget_row(gw, first["id"])["spent"] == 2
    row = admin(gw, "GET", "/admin/audit").json()[0]
    assert row["action"] == "budget.set" and row["before"]["amount"] == 4 and row["after"]["amount"] == 10


def test_the_cli_sets_lists_and_deletes_budgets(tmp_path, upstream):
    from tests.conftest import base_config

    config = base_config(upstream, store_url=f"sqlite:///{tmp_path}/gw.db", plugins=CHAIN)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

    def gw(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "proxy.py"), *args, "--config", str(path)],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)

    assert gw("workspaces", "create", "acme").returncode == 0
    made = gw("budgets", "set", "--workspace", "acme", "--usd", "50", "--period", "week", "--timezone",
              "Europe/Berlin", "--alerts", "50,80,100", "--json")
    assert made.returncode == 0, made.stderr
    budget = json.loads(made.stdout)
    assert (budget["unit"], budget["amount"], budget["period"], budget["alerts"], budget["hard"]) == (
        "usd", 50, "week", [50, 80, 100], "refuse")
    listed = json.loads(gw("budgets", "list", "--json").stdout)
    assert [(b["id"], b["spent"], b["remaining"]) for b in listed] == [(budget["id"], 0, 50)]
    bad = gw("budgets", "set", "--workspace", "acme", "--usd", "x", "--period", "week")
    assert bad.returncode == 2 and "amount" in bad.stderr and "Traceback" not in bad.stderr
    assert gw("budgets", "delete", budget["id"]).returncode == 0
    assert json.loads(gw("budgets", "list", "--json").stdout) == []
    audit = json.loads(gw("audit", "--json").stdout)
    assert [r["action"] for r in audit[:2]] == ["budget.delete", "budget.set"] and audit[0]["via"] == "cli"


def test_the_dashboard_shows_the_budgets(gateway_factory):
    gw = gateway_factory(plugins=CHAIN)
    user, _ = gw.make_user(energy=100)
    set_budget(gw, user=user, unit="usd", amount=12.5, period="month")
    page = httpx.get(gw.url + "/dashboard", timeout=30).text
    assert 'id="budgets"' in page
    script = httpx.get(gw.url + "/dashboard/static/dashboard.js", timeout=30).text
    assert "/admin/budgets" in script


# ------------------------------------------------------------------ the store, and the previous release


def _store_case(store_url, body):
    from gateway.store import open_store

    async def go():
        async with open_store(store_url) as store:
            ws = await store.create_workspace("acme")
            user = await store.create_user(ws.id, "pro", energy=100)
            _, b = await store.set_budget(workspace_id=ws.id, scope="user", scope_id=user.id, unit="energy",
                                          amount=10, period="life", timezone="UTC", alerts=(), hard="refuse")
            return await body(store, user, b)

    return asyncio.run(go())


def _hold(b, amount):
    from gateway.store.base import BudgetHold

    return (BudgetHold(b.id, 0.0, b.amount, amount, True, b.unit),)


@BOTH
def test_a_hold_refused_by_its_budget_writes_nothing_and_one_that_fits_is_finished_once(store_url):
    async def body(store, user, b):
        refused = await store.reserve_energy(user.id, 3, "r-big", budgets=_hold(b, 11))
        assert (refused.ok, refused.budget_refused, refused.balance) == (False, b.id, 100)
        assert await store.ledger(user.id) and await store.balance(user.id) == 100
        ok = await store.reserve_energy(user.id, 3, "r1", budgets=_hold(b, 3))
        assert ok.ok and ok.budget_spent == (3,)
        assert await store.settle_energy("r1", 2) == 98  # a partial settlement: the hold too
        assert await store.refund_energy("r1") is None  # finished once: nothing more moves
        assert await store.budget_spent([(b.id, 0.0)]) == {(b.id, 0.0): 2}
        short = await store.reserve_energy(user.id, 500, "r2", budgets=_hold(b, 1))  # the energy refuses
        assert (short.ok, short.budget_refused) == (False, None)
        assert await store.budget_spent([(b.id, 0.0)]) == {(b.id, 0.0): 2}

    _store_case(store_url, body)


@BOTH
def test_holds_a_previous_release_left_open_follow_their_reservation(store_url):
    """A process of the previous release settles or refunds with the statements it knows (on
    PostgreSQL gw_finish and its settle statement, unchanged by migration 17), leaving the
    holds a new process made open: the sweeper's finish_orphan_holds finishes them as their
    reservation ended, once."""

    async def body(store, user, b):
        for request_id in ("old-refund", "old-settle"):
            assert (await store.reserve_energy(user.id, 2, request_id, budgets=_hold(b, 2))).ok
        old_reserved = await store.reserve_energy(user.id, 1, "old-plain")  # the old release's own reservation
        assert old_reserved.ok and old_reserved.budget_spent is None
        if store.dialect == "postgres":
            async with store.pool.acquire() as conn:
                await conn.fetchval("SELECT gw_finish($1, 'refunded', NULL, 'refund', NULL, $2)", "old-refund", 1.0)
                await conn.fetchval("SELECT gw_finish($1, 'settled', NULL, 'settle', NULL, $2)", "old-settle", 1.0)
                await conn.fetchval("SELECT gw_finish($1, 'settled', NULL, 'settle', NULL, $2)", "old-plain", 1.0)
        else:
            def old_release(db):  # the previous release's statements: the reservation alone
                db.execute("UPDATE reservations SET status = 'refunded' WHERE request_id = 'old-refund'")
                db.execute("UPDATE users SET energy = energy + 2 WHERE id = ?", (user.id,))
                db.execute("UPDATE reservations SET status = 'settled' WHERE request_id IN ('old-settle', 'old-plain')")
            await store._write(old_release)  # noqa: SLF001 — the test plays the old process
        assert await store.budget_spent([(b.id, 0.0)]) == {(b.id, 0.0): 4}  # the refunded hold still counted
        assert await store.finish_orphan_holds() == 2
        assert await store.finish_orphan_holds() == 0
        assert await store.budget_spent([(b.id, 0.0)]) == {(b.id, 0.0): 2}

    _store_case(store_url, body)


def test_a_service_keys_budget_caps_all_its_end_users_and_each_end_user_has_its_own(gateway_factory):
    """End users by the app's ids (docs/admin.md): the service key's budget counts every end
    user it acts for; an end user's own budget counts only them."""
    gw = gateway_factory(plugins=CHAIN, end_users={"tier": "free", "energy": 20})
    owner, _ = gw.make_user(tier="pro", energy=0)
    service = admin(gw, "POST", f"/admin/users/{owner}/keys", json={"service": True}).json()
    set_budget(gw, key=service["id"], unit="energy", amount=8, period="day")
    client = gw.client(service["api_key"])
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user="app-1")
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user="app-2")
    end_user = next(u for u in gw.run(gw.store.list_users()) if u.external_id == "app-2")
    set_budget(gw, user=end_user.id, unit="energy", amount=2, period="day")  # counts from now on
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user="app-2")
    with pytest.raises(openai.RateLimitError) as own:  # app-2's own budget: 2 of 2 spent
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user="app-2")
    assert own.value.code == "budget_exceeded" and "user budget" in own.value.response.json()["error"]["message"]
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user="app-3")  # the key's: 8 of 8
    with pytest.raises(openai.RateLimitError) as keys:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user="app-4")
    assert "key budget" in keys.value.response.json()["error"]["message"]


def test_mcp_tool_calls_count_against_energy_and_usd_budgets(mcp_gateway):
    """An MCP tool call (docs/mcp.md) holds its energy and its `cost_usd` like a model call."""
    from mcp import MCPError

    gw = mcp_gateway()
    user, key = gw.make_user(tier="pro", energy=100)
    usd = set_budget(gw, user=user, unit="usd", amount="0.01", period="day")  # search costs $0.005 a call
    energy = set_budget(gw, workspace="acme", unit="energy", amount=100, period="day")

    async def work(client):
        served = [await client.call_tool("search__web", {"query": str(i)}) for i in range(2)]
        with pytest.raises(MCPError) as refused:
            await client.call_tool("search__web", {"query": "third"})
        return served, refused.value

    served, refused = test_mcp.call(gw, key, work)
    assert all(not r.is_error for r in served)
    assert refused.error.data["code"] == "budget_exceeded"
    gw.settle()
    assert Decimal(str(budget_row(gw, usd["id"])["spent"])) == Decimal("0.01")
    assert budget_row(gw, energy["id"])["spent"] == 4 == 100 - gw.balance(user)


def test_migration_17_only_adds_so_the_previous_release_keeps_running():
    """Rolling deploys (docs/budgets.md): migration 17 creates tables, indexes and functions; it
    alters no existing table and redefines none of the functions the previous release calls."""
    from gateway.store import postgres, sqlite

    pg = dict(postgres.MIGRATIONS)[17]
    lite = " ".join(dict(sqlite.MIGRATIONS)[17])
    for sql in (pg, lite):
        assert "ALTER TABLE" not in sql.upper() and "DROP " not in sql.upper()
    created = sorted(set(re.findall(r"CREATE (?:OR REPLACE )?FUNCTION (\w+)", pg)))
    assert created == ["gw_finish_b", "gw_finish_holds", "gw_reserve_b", "gw_settle_b"]
    assert "OR REPLACE" not in pg


@BOTH
def test_a_usd_budget_holds_every_choice_a_request_asks_for(gateway_factory, store_url):
    # The attack: n=50 choices held the ceiling of one (its max_tokens once); the provider
    # bills all 50, so a request could spend far past a refusing USD budget.
    gw = gateway_factory(plugins=CHAIN)
    user, key = gw.make_user(energy=1000)
    set_budget(gw, user=user, unit="usd", amount="0.001", period="month")
    chat(gw, key, max_tokens=100)  # one choice: ~$0.00006 held, fits
    with pytest.raises(openai.RateLimitError) as refused:
        chat(gw, key, max_tokens=100, n=50)  # 50 x 100 output tokens at $0.60/M = $0.003
    assert refused.value.code == "budget_exceeded"


def test_a_usd_budget_holds_the_hosted_tools_a_request_asks_for(gateway_factory, upstream):
    # The attack: a request with an allowed web search held its tokens only; the search's
    # per-use price ($0.025 here) was settled on top, past a refusing USD budget.
    from tests.test_chat import only_models

    model = {"name": "m", "hosted_tools": {"web_search": {}}, "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": upstream.openai_base, "api_key": "sk-upstream-openai-SECRET"}}
    gw = gateway_factory(plugins=CHAIN, **only_models([model]))
    user, key = gw.make_user(energy=1000)
    set_budget(gw, user=user, unit="usd", amount="0.01", period="month")
    chat(gw, key, model="m", max_tokens=10)  # tokens only: fits
    with pytest.raises(openai.RateLimitError) as refused:
        chat(gw, key, model="m", max_tokens=10, web_search_options={"search_context_size": "high"})
    assert refused.value.code == "budget_exceeded"
