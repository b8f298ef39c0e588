"""Micro-benchmark of the SQLite store's hot path: reserve_energy + settle_energy pairs/s.

    .venv/bin/python bench/store_bench.py                 # ~1 minute
    .venv/bin/python bench/store_bench.py --seconds 1 --rounds 1

Every gateway request reserves energy before the upstream call and settles (or refunds)
after it, so this pair is what the store must sustain (target: 2,500 requests/s on one
core for the whole gateway; >= 5,000 pairs/s for the store at concurrency 32).

Compared in the same run, on fresh temp database files, alternating so machine noise
hits every variant alike:

    old          the aiosqlite implementation (gateway/store/sqlite.py (gateway/store_sqlite.py at the old ref) at --old-ref, loaded
                 under another module name): one thread hop per statement, asyncio.Lock
    new FULL     the current gateway/store/sqlite.py (gateway/store_sqlite.py at the old ref) as shipped (synchronous=FULL)
    new NORMAL   the same with synchronous=NORMAL (what FULL costs)

Each variant runs at concurrency 1 (one task doing pairs back to back) and 32 (32 tasks,
like 32 requests in flight). Reported: pairs/s (median over rounds), CPU microseconds per
pair (process CPU, all threads) and the ratio new/old. The machine is shared: read the
ratios, not the absolute figures. After each run the ledger invariant is checked (sum of
ledger rows == balance for every user): a fast wrong store is not a result.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.store import sqlite as store_sqlite  # noqa: E402  (after the sys.path fix above)

# The last commit whose gateway/store_sqlite.py is the aiosqlite implementation.
OLD_REF = "5ee70f1"


def load_old_store(ref: str) -> ModuleType:
    source = subprocess.run(["git", "show", f"{ref}:gateway/store_sqlite.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("gateway._store_sqlite_old", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(source, f"{ref}:gateway/store_sqlite.py", "exec"), module.__dict__)
    return module


async def run_pairs(store_cls, path: str, concurrency: int, seconds: float) -> tuple[int, float]:
    """(pairs done, process CPU seconds) for `seconds` of `concurrency` tasks."""
    store = store_cls(path)
    await store.open()
    try:
        ws = await store.create_workspace("bench")
        users = [await store.create_user(ws.id, "free", energy=10**12)
                 for _ in range(min(concurrency, 8))]
        done = 0
        stop_at = 0.0

        async def worker(n: int) -> None:
            nonlocal done
            user_id = users[n % len(users)].id
            i = 0
            while time.perf_counter() < stop_at:
                request_id = f"w{n}-{i}"
                await store.reserve_energy(user_id, 5, request_id)
                await store.settle_energy(request_id, 3)
                i += 1
                done += 1

        # a short warm-up (statement caches, WAL file growth) outside the measurement
        stop_at = time.perf_counter() + min(0.3, seconds / 5)
        await asyncio.gather(*(worker(n + 1000) for n in range(concurrency)))
        done = 0
        cpu0 = time.process_time()
        stop_at = time.perf_counter() + seconds
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0

        for u in users:  # the invariant, checked on what was just written
            entries = await store.ledger(u.id)
            assert sum(e.amount for e in entries) == await store.balance(u.id), u.id
            assert entries[-1].balance_after == await store.balance(u.id)
        return done / elapsed, cpu / max(done, 1)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per variant (median)")
    parser.add_argument("--old-ref", default=OLD_REF, help="git ref of the old implementation")
    args = parser.parse_args()

    old = load_old_store(args.old_ref)

    def new_with(sync: str):
        class Store(store_sqlite.SQLiteStore):
            async def open(self) -> None:
                # SYNCHRONOUS is read when the database thread connects, inside open().
                saved, store_sqlite.SYNCHRONOUS = store_sqlite.SYNCHRONOUS, sync
                try:
                    await super().open()
                finally:
                    store_sqlite.SYNCHRONOUS = saved
        return Store

    variants = {
        "old": old.SQLiteStore,
        f"new {store_sqlite.SYNCHRONOUS}": store_sqlite.SQLiteStore,
        "new NORMAL" if store_sqlite.SYNCHRONOUS != "NORMAL" else "new FULL":
            new_with("NORMAL" if store_sqlite.SYNCHRONOUS != "NORMAL" else "FULL"),
    }
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        run = 0
        for _ in range(args.rounds):
            for concurrency in (1, 32):
                for name, cls in variants.items():
                    run += 1
                    path = os.path.join(tmp, f"run{run}.db")
                    rate, cpu = asyncio.run(run_pairs(cls, path, concurrency, args.seconds))
                    results.setdefault((name, concurrency), []).append((rate, cpu))
                    print(f"  {name:<11} c={concurrency:<3} {rate:9,.0f} pairs/s"
                          f"  {cpu * 1e6:7.0f} us CPU/pair", file=sys.stderr)

    print(f"\nreserve+settle pairs/s, median of {args.rounds} x {args.seconds:g}s "
          f"({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    print(f"{'variant':<12}{'c=1':>10}{'c=32':>10}{'CPU/pair c=1':>15}{'CPU/pair c=32':>15}")
    medians = {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
               for k, v in results.items()}
    for name in variants:
        r1, c1 = medians[(name, 1)]
        r32, c32 = medians[(name, 32)]
        print(f"{name:<12}{r1:>10,.0f}{r32:>10,.0f}{c1 * 1e6:>13.0f}us{c32 * 1e6:>13.0f}us")
    for name in list(variants)[1:]:
        print(f"ratio {name} / old: c=1 x{medians[(name, 1)][0] / medians[('old', 1)][0]:.1f}"
              f"   c=32 x{medians[(name, 32)][0] / medians[('old', 32)][0]:.1f}")


if __name__ == "__main__":
    main()
