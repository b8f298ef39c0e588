"""Soak (bounded): a few thousand mixed requests, streamed and not, on the native and
litellm paths, with injected upstream faults, 20 at a time. Afterwards: every request was
answered, one usage row per request, the energy ledger adds up to the balance, and the
gateway holds no more tasks, sockets or memory than before (a smoke check, not a benchmark).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter

import openai

from tests.fakes import Fault

N = 2400
CONCURRENCY = 20
MSGS = [{"role": "user", "content": "soak"}]
ACCOUNTING = {"name": "accounting", "settings": {"flush_interval": 0.05}}
ENERGY = 1_000_000
# Every 50th request queues one of these for whichever request reaches the upstream next.
FAULTS = [Fault.status(500), Fault.status(503), Fault.status(400), Fault.truncate(after_chunks=1),
          Fault.drop(), Fault.slow(0.2), Fault.garbage()]


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _tasks_on_loop() -> Counter[str]:
    """Tasks on the server loop, by coroutine. `RequestHandler.start` is one per open HTTP
    connection (keep-alive, gateway and fake upstream alike): bounded by the pools, not by N."""
    me = asyncio.current_task()
    return Counter(t.get_coro().__qualname__ for t in asyncio.all_tasks() if t is not me)


def split(tasks: Counter[str]) -> tuple[int, int]:
    """(connection tasks, every other task)."""
    connections = tasks["RequestHandler.start"]
    return connections, sum(tasks.values()) - connections


async def one_request(client: openai.AsyncOpenAI, i: int, rng: random.Random) -> str:
    """The outcome of request i: ok, or the error status/code the client got."""
    model = "claude" if i % 6 == 0 else "gpt-4o-mini"
    try:
        if i % 3 == 0:
            stream = await client.chat.completions.create(model=model, messages=MSGS, max_tokens=16, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        else:
            reply = await client.chat.completions.create(model=model, messages=MSGS, max_tokens=16)
            text = reply.choices[0].message.content
        return "ok" if text else "empty-200"
    except openai.APIStatusError as err:
        return f"http-{err.status_code}"
    except openai.APIError as err:  # an error event in a stream that had started
        return f"event-{(err.body or {}).get('code') if isinstance(err.body, dict) else 'unknown'}"


async def test_a_soak_answers_everything_bills_exactly_and_leaks_nothing(gateway_factory, upstream):
    gw = gateway_factory(plugins=["auth", "tier_policy", "energy", ACCOUNTING], tiers={"pro": {"models": ["*"]}},
                         energy={"default_action": "ai_message", "actions": {"ai_message": {"default": 1}}},
                         auth={"master_key": "gw-master-test-0123456789abcdef", "default_tier": "pro"})
    user_id, key = gw.make_user(tier="pro", energy=ENERGY)
    client = gw.aclient(key, timeout=30)
    rng = random.Random(7)

    # Warm up (first litellm call, pools), then take the baseline.
    for i in range(12):
        assert await one_request(client, i, rng) == "ok"
    gw.settle()
    while len(gw.run(gw.store.usage_rows())) < 12:  # the write-behind queue has flushed
        await asyncio.sleep(0.02)
    tasks_before = gw.run(_tasks_on_loop())
    fds_before, rss_before = open_fds(), rss_mb()
    rows_before = 12
    balance_before = gw.balance(user_id)

    outcomes: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(N):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            await worker_once()

    started = time.monotonic()
    # Two halves: the first warms every cache and pool (litellm, SQLite, allocator arenas);
    # memory must then stay flat through the second.
    halfway = N // 2

    async def half() -> None:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), timeout=60)

    async def worker_until(limit: int) -> None:
        while not queue.empty() and len(outcomes) < limit:
            await worker_once()

    async def worker_once() -> None:
        i = queue.get_nowait()
        if i % 50 == 25:
            upstream.push(rng.choice(FAULTS))
        outcomes.append(await one_request(client, i, rng))

    await asyncio.wait_for(asyncio.gather(*(worker_until(halfway) for _ in range(CONCURRENCY))), timeout=60)
    rss_warm = rss_mb()
    await half()
    elapsed = time.monotonic() - started
    await client.close()

    counts = Counter(outcomes)
    assert len(outcomes) == N  # every request answered
    assert counts["ok"] >= N * 0.95, counts
    assert set(counts) <= {"ok", "http-400", "http-502", "event-upstream_stream_truncated",
                           "event-upstream_error"}, counts

    # Billing: one row per request, the ledger adds up, successes paid exactly 1 each.
    gw.settle()
    deadline = time.monotonic() + 10
    while len(gw.run(gw.store.usage_rows())) < rows_before + N and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    rows = gw.run(gw.store.usage_rows())
    assert len(rows) - rows_before == N
    assert len({r["request_id"] for r in rows}) == len(rows)
    ledger = gw.ledger(user_id)
    balance = gw.balance(user_id)
    assert sum(e.amount for e in ledger) == balance == ledger[-1].balance_after
    assert balance_before - balance == counts["ok"]
    assert Counter(e.kind for e in ledger if e.kind in ("settle", "refund"))["refund"] == N - counts["ok"]

    # Nothing left behind: tasks on the server loop, sockets, memory.
    await asyncio.sleep(0.2)
    tasks_after = gw.run(_tasks_on_loop())
    connections, others = split(tasks_after)
    assert others <= split(tasks_before)[1] + 2, (tasks_before, tasks_after)  # no request left a task
    assert connections <= 2 * CONCURRENCY + 4, tasks_after  # idle keep-alive pools at most
    assert open_fds() <= fds_before + 4 * CONCURRENCY + 10  # both ends of those connections
    assert rss_mb() - rss_warm < 50, (rss_before, rss_warm, rss_mb())
    print(f"soak: {N} requests in {elapsed:.1f}s ({N / elapsed:.0f}/s), {dict(counts)}, "
          f"rss {rss_before:.0f} -> {rss_warm:.0f} (half-way) -> {rss_mb():.0f} MB")
