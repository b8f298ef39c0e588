"""Budgets stay exact across gateway OS processes (docs/budgets.md): two `proxy.py serve`
processes on one SQLite file or one PostgreSQL schema, two users of one workspace (plenty of
energy each) under one workspace budget, 2N concurrent requests (half streamed) for N the
budget affords: exactly N answered, the others 429 budget_exceeded, the budget's spend and
the users' energy spent both exactly N requests' worth after a graceful stop.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import openai
import pytest

from gateway.store import open_store
from tests.test_multiprocess import (HELLO, cli_json, create_user, finished_json, start_servers, stop_servers,
                                     wait_ready, write_config)

BOTH = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
AFFORDABLE = 20  # 3 energy each


def fire(ports: list[int], keys: list[str], requests: int) -> list[str]:
    """`requests` concurrent chat calls over the ports and keys, every other one streamed:
    "ok" or the refusal's code for each."""

    async def go() -> list[str]:
        clients = [openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)
                   for port in ports for key in keys]

        async def one(i: int) -> str:
            client = clients[i % len(clients)]
            try:
                if i % 2:
                    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True,
                                                                  max_tokens=20)
                    async for _ in stream:
                        pass
                else:
                    await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=20)
                return "ok"
            except openai.RateLimitError as exc:
                return exc.code

        try:
            return await asyncio.gather(*(one(i) for i in range(requests)))
        finally:
            for client in clients:
                await client.close()

    return asyncio.run(go())


async def _spent(store_url: str, user_ids: list[str]) -> tuple[dict, list[int], list]:
    async with open_store(store_url) as store:
        budgets = await store.list_budgets()
        spent = await store.budget_spent([(b.id, 0.0) for b in budgets])
        balances = [await store.balance(u) for u in user_ids]
        holds = await store.report_query("SELECT status, COUNT(*) AS n FROM budget_holds GROUP BY status", [])
        assert {r["status"] for r in holds} <= {"settled"}, holds  # every hold finished with its request
        return {b.unit: spent[(b.id, 0.0)] for b in budgets}, balances, budgets


@BOTH
def test_two_processes_spend_a_workspace_budget_exactly_streamed_and_not(tmp_path, upstream, store_url):
    url = None if store_url.startswith("sqlite") else store_url
    config, store_url = write_config(tmp_path, upstream, url)
    ports, servers = start_servers(config, tmp_path, 2)
    try:
        for port, server in zip(ports, servers):
            wait_ready(port, server)
        finished_json(cli_json(config, "workspaces", "create", "acme"))
        users = [create_user(config, 1000), create_user(config, 1000)]
        finished_json(cli_json(config, "budgets", "set", "--workspace", "acme", "--energy", str(AFFORDABLE * 3),
                               "--period", "life"))
        outcomes = fire(ports, [u["api_key"] for u in users], 2 * AFFORDABLE)
    finally:
        stop_servers(servers, ports, tmp_path)
    assert outcomes.count("ok") == AFFORDABLE
    assert set(outcomes) == {"ok", "budget_exceeded"}
    spent, balances, _ = asyncio.run(_spent(store_url, [u["id"] for u in users]))
    assert spent == {"energy": AFFORDABLE * 3}
    assert 2000 - sum(balances) == AFFORDABLE * 3


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_a_usd_budget_is_never_passed_across_processes_and_ends_at_the_costs(tmp_path, upstream, store_url):
    """USD holds are each request's ceiling, settled at its cost: however the holds and
    settlements interleave across processes, the spend never passes the budget and ends at
    exactly the answered requests' cost."""
    config, store_url = write_config(tmp_path, upstream, store_url)
    ports, servers = start_servers(config, tmp_path, 2)
    try:
        for port, server in zip(ports, servers):
            wait_ready(port, server)
        finished_json(cli_json(config, "workspaces", "create", "acme"))
        users = [create_user(config, 1000), create_user(config, 1000)]
        finished_json(cli_json(config, "budgets", "set", "--workspace", "acme", "--usd", "0.0001", "--period",
                               "life"))
        outcomes = fire(ports, [u["api_key"] for u in users], 2 * AFFORDABLE)
    finally:
        stop_servers(servers, ports, tmp_path)
    answered = outcomes.count("ok")
    assert set(outcomes) <= {"ok", "budget_exceeded"} and 0 < answered < 2 * AFFORDABLE
    spent, balances, _ = asyncio.run(_spent(store_url, [u["id"] for u in users]))
    cost = Decimal(11) * Decimal("0.15") / 10**6 + Decimal(7) * Decimal("0.6") / 10**6  # the fake's tokens
    assert spent["usd"] == answered * int(cost * 10**9) <= 100_000
    assert 2000 - sum(balances) == answered * 3
