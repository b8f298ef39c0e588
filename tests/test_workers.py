"""`server.workers: N`: N forked processes share one port, spend energy exactly, and stop
cleanly; the supervisor restarts a worker that dies.

Real processes: `python proxy.py serve --workers 2`, the openai SDK firing concurrently,
one fake upstream, one SQLite file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import openai

from gateway.store import open_store
from tests.fakes import free_port
from tests.test_multiprocess import AFFORDABLE, HELLO, ROOT, cli_json, finished_json, wait_ready, write_config


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return {int(p) for p in fh.read().split()}
    except OSError:
        return set()


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_workers_share_one_port_spend_exactly_restart_the_dead_and_stop_cleanly(tmp_path, upstream):
    config, store_url = write_config(tmp_path, upstream)
    finished_json(cli_json(config, "workspaces", "create", "acme"))
    user = finished_json(cli_json(config, "users", "create", "--workspace", "acme", "--tier", "pro",
                                  "--energy", str(AFFORDABLE * 3)))
    port = free_port()
    log = open(tmp_path / "workers.log", "w")
    server = subprocess.Popen([sys.executable, "proxy.py", "serve", "--config", str(config), "--port", str(port),
                               "--workers", "2"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, server, timeout=60)
        _wait_for(lambda: len(_children(server.pid)) == 2)
        workers = _children(server.pid)
        # Each worker has its own request-id prefix; wait until both answer on the port.
        seen: set[str] = set()

        def both_listening() -> bool:
            response = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5,
                                 headers={"Authorization": f"Bearer {user['api_key']}", "Connection": "close"})
            seen.add(response.headers["x-request-id"][:16])
            return len(seen) == 2

        _wait_for(both_listening, timeout=60)

        async def fire() -> list:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=user["api_key"],
                                        max_retries=0, timeout=30)

            async def one():
                try:
                    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO)
                    return raw.headers["x-request-id"]
                except openai.RateLimitError as exc:
                    return exc.status_code

            return await asyncio.gather(*(one() for _ in range(AFFORDABLE * 2)))

        results = asyncio.run(fire())
        served = [r for r in results if isinstance(r, str)]
        assert len(served) == AFFORDABLE and results.count(429) == AFFORDABLE
        assert {request_id[:16] for request_id in served} <= seen  # only our two workers answered

        async def books() -> tuple[int, int]:
            store = open_store(store_url)
            await store.open()
            try:
                return await store.balance(user["id"]), sum(e.amount for e in await store.ledger(user["id"]))
            finally:
                await store.close()

        assert asyncio.run(books()) == (0, 0)

        # A worker that dies is replaced; the port keeps answering.
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: victim not in _children(server.pid) and len(_children(server.pid)) == 2, timeout=60)
        _wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200, timeout=60)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "workers.log").read_text()[-2000:]
    assert not _children(server.pid)
