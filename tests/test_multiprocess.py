"""Gateway OS processes sharing one store never spend the same energy twice.

Everything is real: `python proxy.py serve` two or three times, users created with `python
proxy.py users create`, the openai SDK firing concurrently at every port, one fake
upstream: two processes on one SQLite file, three on one PostgreSQL schema whose rate
limits are counted in one Redis.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
import redis
import yaml

from gateway.store import open_store
from tests.conftest import MASTER_KEY
from tests.fakes import free_port

ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "hi"}]
REQUESTS = 60
AFFORDABLE = 25  # 3 energy each
REDIS_URL = "redis://127.0.0.1:6379/0"


def write_config(tmp_path: Path, upstream, store_url: str | None = None,
                 plugins: tuple[str, ...] = ("auth", "tier_policy", "energy"), **extra: Any) -> tuple[Path, str]:
    store_url = store_url or f"sqlite:///{tmp_path}/shared.db"
    path = tmp_path / "config.yaml"
    model = {"litellm_params": {"model": "openai/gpt-4o-mini", "api_base": upstream.openai_base,
                                "api_key": "sk-upstream-openai-SECRET"}}
    path.write_text(yaml.safe_dump({
        "server": {"shutdown_grace": 5, "allow_unauthenticated": True},  # a partial chain, on 127.0.0.1
        "store": {"url": store_url},
        "auth": {"master_key": MASTER_KEY, "cache_ttl": "300s", "default_tier": "pro"},
        "retries": {"max_attempts": 1},
        "models": [{"name": "gpt-4o-mini", **model}],
        "tiers": {"pro": {"models": ["*"]}},
        "energy": {"default_action": "ai_message", "actions": {"ai_message": {"default": 3}}},
        "plugins": list(plugins),
        **extra,
    }))
    return path, store_url


def cli_json(config: Path, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "proxy.py", *argv, "--json", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished_json(process: subprocess.Popen):
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return json.loads(out)


def wait_ready(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the gateway process died at start-up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gateway on port {port} never became ready")


def start_servers(config: Path, tmp_path: Path, count: int) -> tuple[list[int], list[subprocess.Popen]]:
    ports = [free_port() for _ in range(count)]
    servers = [subprocess.Popen([sys.executable, "proxy.py", "serve", "--config", str(config), "--port", str(port)],
                                cwd=ROOT, stdout=open(tmp_path / f"gw{port}.log", "w"), stderr=subprocess.STDOUT)
               for port in ports]
    return ports, servers


def stop_servers(servers: list[subprocess.Popen], ports: list[int], tmp_path: Path) -> None:
    """SIGTERM to each (a graceful stop: in-flight endings run, the write-behind is flushed)."""
    for server in servers:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
    codes = [server.wait(timeout=20) for server in servers]
    assert codes == [0] * len(servers), [(tmp_path / f"gw{p}.log").read_text()[-2000:] for p in ports]


def create_user(config: Path, energy: int) -> dict[str, str]:
    """A pro user in workspace acme through the CLI's human output: the key, shown once."""
    done = subprocess.run([sys.executable, "proxy.py", "users", "create", "--workspace", "acme", "--tier", "pro",
                           "--energy", str(energy), "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    fields = dict(line.split(None, 1) for line in done.stdout.splitlines() if line.strip())
    user = {"id": fields["id"], "api_key": fields["api_key"]}
    assert user["api_key"].startswith("gw-") and done.stdout.count(user["api_key"]) == 1
    assert "shown only once" in done.stderr
    return user


def fire(ports: list[int], upstream, api_key: str, requests: int, affordable: int) -> None:
    """`requests` concurrent chat calls, round-robin over the ports: exactly `affordable`
    answered, the others refused for insufficient energy (anything else fails the test)."""

    async def go() -> list[bool]:
        clients = [openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key,
                                      max_retries=0, timeout=60) for port in ports]

        async def one(client: openai.AsyncOpenAI) -> bool:
            try:
                await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
                return True
            except openai.RateLimitError as exc:
                assert exc.code == "insufficient_energy"
                return False

        try:
            return await asyncio.gather(*(one(clients[i % len(clients)]) for i in range(requests)))
        finally:
            for client in clients:
                await client.close()

    outcomes = asyncio.run(go())
    assert outcomes.count(True) == affordable
    # An overlapped reservation (plugins/energy.py) that another process's spending made
    # fail has had its upstream call discarded, unbilled; only a request that ended
    # refused can have made one.
    calls = upstream.count("/chat/completions")
    assert affordable <= calls <= affordable + outcomes.count(False)


def assert_spent_exactly(store_url: str, user_id: str, affordable: int) -> None:
    """Balance 0 to the unit, the ledger sums to it, one reserve and one settle per answer."""

    async def ledger():
        async with open_store(store_url) as store:
            return await store.balance(user_id), await store.ledger(user_id)

    balance, entries = asyncio.run(ledger())
    assert balance == 0
    assert sum(e.amount for e in entries) == balance
    assert Counter(e.kind for e in entries) == {"grant": 1, "reserve": affordable, "settle": affordable}
    assert all(e.balance_after >= 0 for e in entries)


def test_two_processes_on_one_sqlite_file_spend_exactly_the_balance(tmp_path, upstream):
    config, store_url = write_config(tmp_path, upstream)
    # Interpreter start-up dominates: run the CLI and both servers side by side.
    workspace = cli_json(config, "workspaces", "create", "acme")
    ports, servers = start_servers(config, tmp_path, 2)
    try:
        finished_json(workspace)
        # One user: both processes contend for the same balance, the hardest case. Human
        # output here (every command's --json is covered in test_admin): the key, once.
        user = create_user(config, AFFORDABLE * 3)
        for port, server in zip(ports, servers):
            wait_ready(port, server)
        fire(ports, upstream, user["api_key"], REQUESTS, AFFORDABLE)
    finally:
        stop_servers(servers, ports, tmp_path)
    assert_spent_exactly(store_url, user["id"], AFFORDABLE)


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_three_processes_on_one_postgres_and_redis_spend_exactly_the_balance(tmp_path, upstream, store_url):
    """2N concurrent requests for N affordable, spread over three processes: N answered,
    the balance ends at 0, one usage row per request (after a graceful stop), and every
    request counted once in the shared Redis rate-limit counter."""
    affordable = 30
    prefix = f"gw:test:mp:{uuid.uuid4().hex[:10]}"
    config, store_url = write_config(
        tmp_path, upstream, store_url, plugins=("auth", "rate_limit", "tier_policy", "energy", "accounting"),
        tiers={"pro": {"models": ["*"], "limits": {"rpm": 10_000}}},
        rate_limits={"redis_url": REDIS_URL, "key_prefix": prefix})
    # The first process to start migrates the empty schema; the CLI waits for nothing.
    ports, servers = start_servers(config, tmp_path, 3)
    try:
        for port, server in zip(ports, servers):
            wait_ready(port, server)
        finished_json(cli_json(config, "workspaces", "create", "acme"))
        user = create_user(config, affordable * 3)
        fire(ports, upstream, user["api_key"], 2 * affordable, affordable)
    finally:
        stop_servers(servers, ports, tmp_path)
    assert_spent_exactly(store_url, user["id"], affordable)

    async def usage() -> Counter:
        schema = store_url.rsplit("schema=", 1)[1]
        conn = await asyncpg.connect(store_url.split("?", 1)[0])
        try:
            rows = await conn.fetch(f'SELECT status, energy_cost FROM "{schema}".ai_usage_logs WHERE user_id = $1',
                                    user["id"])
        finally:
            await conn.close()
        return Counter((r["status"], r["energy_cost"]) for r in rows)

    assert asyncio.run(usage()) == {(200, 3): affordable, (429, 0): affordable}
    counters = redis.Redis.from_url(REDIS_URL)
    try:
        keys = counters.keys(f"{prefix}:u:{user['id']}:r:*")
        assert sum(int(counters.get(key)) for key in keys) == 2 * affordable
        counters.delete(*keys, *counters.keys(f"{prefix}:*"))
    finally:
        counters.close()
