"""Money is decimal end to end (docs/billing.md, "Money and rounding"): a cost is rounded
once, half-even to 1e-9 USD, where it is computed; the stores keep it exactly (PostgreSQL
numeric, SQLite integer nano-dollars); reports and the admin JSON sum it exactly and
answer JSON numbers; the migration from the float columns keeps every row.

Real gateway (openai SDK -> gateway -> fake upstream on 127.0.0.1), real SQLite file and
real PostgreSQL schema.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import httpx
import pytest

from gateway.admin import reports
from gateway.money import json_default, usd
from gateway.store import open_store
from tests.conftest import FULL_CHAIN, MASTER_KEY
from tests.test_accounting import HELLO, models
from tests.test_reports_db import DAY, create_previous_release

BOTH = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
CHAIN = [*FULL_CHAIN, {"name": "accounting", "settings": {"flush_interval": 0.05}}]
# $0.1 per million input tokens, $0.0001 per million output tokens: 1,000,000 input tokens
# cost 0.1, 2,000,000 cost 0.2, 30 output tokens 0.000000003. As binary floats the sum is
# 0.30000000300000004, and a report rounded to 6 decimals said 0.3.
PRICING = {"input_per_million": 0.1, "output_per_million": 0.0001}
TOKENS = ((1_000_000, 0), (2_000_000, 0), (0, 30))  # (prompt, completion) of each request
COSTS = [Decimal("0.1"), Decimal("0.2"), Decimal("0.000000003")]
TOTAL = Decimal("0.300000003")


def admin_json(gw: Any, path: str) -> tuple[Any, Any]:
    """The admin answer parsed twice: its numbers as Decimals (exact), and as plain JSON
    (so a number sent as a string shows up as a str)."""
    response = httpx.get(gw.url + path, headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=10)
    assert response.status_code == 200, response.text
    return json.loads(response.text, parse_float=Decimal, parse_int=Decimal), response.json()


@BOTH
def test_costs_are_stored_and_summed_exactly_in_reports_and_the_admin_json(gateway_factory, upstream, store_url):
    gw = gateway_factory(plugins=CHAIN, models=models(upstream, pricing=PRICING))
    _, key = gw.make_user(energy=1000)
    client = gw.client(key)
    for upstream.prompt_tokens, upstream.completion_tokens in TOKENS:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    gw.settle()
    rows = gw.run(gw.store.usage_rows())
    assert [r["cost_usd"] for r in rows] == COSTS
    assert all(isinstance(r["cost_usd"], Decimal) for r in rows)
    prices = json.loads(rows[0]["unit_prices"], parse_float=Decimal)
    assert (prices["input"], prices["output"]) == (Decimal("0.1"), Decimal("0.0001"))  # per million, exact

    for kind, field in (("daily", "cost_usd"), ("top-users", "cost_usd"), ("actions", "total_cost_usd"),
                        ("weekly", "cost_usd")):
        report = gw.run(reports.build_report(gw.store, kind, days=1))
        assert [r[field] for r in report["rows"]] == [TOTAL], kind
        exact, plain = admin_json(gw, f"/admin/usage/{kind}?days=1")
        assert [r[field] for r in exact["rows"]] == [TOTAL], kind
        assert all(isinstance(r[field], float) for r in plain["rows"]), f"{kind}: USD must be a JSON number"
    actions, _ = admin_json(gw, "/admin/usage/actions?days=1")
    assert actions["rows"][0]["avg_cost_usd"] == Decimal("0.100000001")  # 0.300000003 / 3, the money rule

    exact, plain = admin_json(gw, "/admin/metrics")
    assert (exact["totalCost"], exact["savedUsd"]) == (TOTAL, 0)
    assert isinstance(plain["totalCost"], float)
    assert [u["cost_usd"] for u in exact["topUsers"]] == [TOTAL]


@BOTH
@pytest.mark.asyncio
async def test_the_migration_keeps_every_float_row_and_converts_it_by_the_money_rule(store_url):
    """A store of the release before (migrations 1-9: binary-float USD, rollups built) is
    migrated: every row kept, each cost the decimal of its float rounded to 1e-9, and the
    reports (read from the converted rollups) equal the sum of the converted rows."""
    base = datetime(2025, 3, 3, tzinfo=timezone.utc).timestamp()
    floats = [0.1, 0.2, 0.1 + 0.2, None, 1e-10, 0.000123456789012, 12.5, 2.675, 1234.567891234]
    rows = [{"request_id": f"r{i}", "user_id": f"usr_{i % 2}", "workspace_id": "ws_1", "action": "ai_message",
             "model": "gpt-4o", "cost_usd": cost, "latency_ms": 100 + i, "tokens_total": 10 * i,
             "created_at": base + i * 5 * 3600} for i, cost in enumerate(floats)]
    await create_previous_release(store_url, rows, through=9)
    async with open_store(store_url) as store:
        got = await store.usage_rows()
        assert [r["request_id"] for r in got] == [r["request_id"] for r in rows]
        assert [r["id"] for r in got] == list(range(1, len(rows) + 1))
        expected = [None if f is None else usd(f) for f in floats]
        assert [r["cost_usd"] for r in got] == expected
        assert expected[:3] == [Decimal("0.1"), Decimal("0.2"), Decimal("0.3")]  # not 0.30000000000000004
        assert expected[4] == 0 and expected[5] == Decimal("0.000123457")
        assert all(r["cost_usd"] is None or isinstance(r["cost_usd"], Decimal) for r in got)
        total = sum(e for e in expected if e is not None)
        totals = (await store.usage_totals(None, base - 3600, now=base + 3 * DAY))[0]
        assert (totals["requests"], totals["cost_usd"], totals["unpriced"]) == (len(rows), total, 1)
        users = await store.usage_totals("user", base - 3600, now=base + 3 * DAY, measures=("cost_usd",))
        assert {u["key"]: u["cost_usd"] for u in users} == {
            f"usr_{k}": sum(e for i, e in enumerate(expected) if e is not None and i % 2 == k) for k in (0, 1)}
        # new rows go on exactly, in the same rollups
        assert await store.insert_usage([{"request_id": "new", "user_id": "usr_0", "workspace_id": "ws_1",
                                          "cost_usd": Decimal("0.000000001"), "created_at": base + 3600}]) == 1
        after = (await store.usage_totals(None, base - 3600, now=base + 3 * DAY))[0]
        assert after["cost_usd"] == total + Decimal("0.000000001")
        report = await reports.build_report(store, "weekly", days=7, now=base + 3 * DAY)
        assert sum(w["cost_usd"] for w in report["rows"]) == total + Decimal("0.000000001")
        assert await store.migrate() == []


def test_usd_rounds_once_half_even_to_a_nanodollar_and_json_writes_a_number():
    assert usd(Decimal("0.0000000025")) == Decimal("0.000000002")  # half-even: ties to the even digit
    assert usd(Decimal("0.0000000035")) == Decimal("0.000000004")
    assert usd(0.1 + 0.2) == Decimal("0.3")  # a float is read at its shortest repr
    assert json.loads(json.dumps(None)) is None
    import orjson

    text = orjson.dumps({"cost_usd": usd("0.300000003"), "zero": usd(0)}, default=json_default)
    assert text == b'{"cost_usd":0.300000003,"zero":0}'
