"""What a budget costs the store's hot path: reserve + settle pairs/s with and without a hold.

    .venv/bin/python bench/budget_bench.py sqlite:///tmp/budget_bench.db
    .venv/bin/python bench/budget_bench.py "postgresql://postgres@127.0.0.1:5432/test?schema=budget_bench"

Eight users of one workspace, 32 pairs in flight, alternating "plain" (no budget) and
"budget" (one workspace budget over every request: the worst case, one budget row every
reservation locks) so machine noise hits both alike. A budget's hold is written in the same
transaction as the energy (docs/budgets.md); on PostgreSQL a reservation with holds goes
through gw_reserve_b (the budget rows locked, then gw_reserve per element), so a workspace
budget serializes the workspace's reservations on its row, as one user's energy does on
theirs. Settles here are one call each (the gateway batches them, settle_many).
"""

from __future__ import annotations

import asyncio
import sys
import time

from gateway.store import BudgetHold, open_store


async def main(url: str, pairs: int = 3000, concurrency: int = 32, rounds: int = 2) -> None:
    store = open_store(url)
    await store.open()
    try:
        ws = await store.create_workspace(f"bench-{int(time.time())}")
        users = [await store.create_user(ws.id, "pro", energy=10**12) for _ in range(8)]
        _, budget = await store.set_budget(workspace_id=ws.id, scope="workspace", scope_id=ws.id, unit="energy",
                                           amount=10**15, period="life", timezone="UTC", alerts=(), hard="refuse")
        hold = (BudgetHold(budget.id, 0.0, budget.amount, 1, True, "energy"),)
        for round_ in range(rounds):
            for label, holds in (("plain", ()), ("budget", hold)):
                gate = asyncio.Semaphore(concurrency)
                started = time.perf_counter()

                async def pair(i: int) -> None:
                    request_id = f"{label}-{round_}-{i}"
                    async with gate:
                        await store.reserve_energy(users[i % len(users)].id, 1, request_id, budgets=holds)
                        await store.settle_energy(request_id)

                await asyncio.gather(*(pair(i) for i in range(pairs)))
                elapsed = time.perf_counter() - started
                print(f"{label:6} round {round_}: {pairs} reserve+settle in {elapsed:.2f} s = {pairs / elapsed:.0f}/s")
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "sqlite:///tmp/budget_bench.db"))
