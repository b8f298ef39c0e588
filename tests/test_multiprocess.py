"""Two gateway OS processes sharing one SQLite file never spend the same energy twice.

Everything is real: `python proxy.py serve` twice, users created with `python proxy.py
users create`, the openai SDK firing concurrently at both ports, one fake upstream.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import yaml

from gateway.store import open_store
from tests.conftest import MASTER_KEY
from tests.fakes import free_port

ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "hi"}]
REQUESTS = 60
AFFORDABLE = 25  # 3 energy each


def write_config(tmp_path: Path, upstream) -> tuple[Path, str]:
    store_url = f"sqlite:///{tmp_path}/shared.db"
    path = tmp_path / "config.yaml"
    model = {"litellm_params": {"model": "openai/gpt-4o-mini", "api_base": upstream.openai_base,
                                "api_key": "sk-upstream-openai-SECRET"}}
    path.write_text(yaml.safe_dump({
        "server": {"shutdown_grace": 5},
        "store": {"url": store_url},
        "auth": {"master_key": MASTER_KEY, "cache_ttl": "300s", "default_tier": "pro"},
        "retries": {"max_attempts": 1},
        "models": [{"name": "gpt-4o-mini", **model}],
        "tiers": {"pro": {"models": ["*"]}},
        "energy": {"default_action": "ai_message", "actions": {"ai_message": {"default": 3}}},
        "plugins": ["auth", "tier_policy", "energy"],
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


def test_two_processes_on_one_sqlite_file_spend_exactly_the_balance(tmp_path, upstream):
    config, store_url = write_config(tmp_path, upstream)
    # Interpreter start-up dominates: run the CLI and both servers side by side.
    workspace = cli_json(config, "workspaces", "create", "acme")
    ports = [free_port(), free_port()]
    servers = [subprocess.Popen([sys.executable, "proxy.py", "serve", "--config", str(config), "--port", str(port)],
                                cwd=ROOT, stdout=open(tmp_path / f"gw{port}.log", "w"), stderr=subprocess.STDOUT)
               for port in ports]
    try:
        finished_json(workspace)
        # One user: both processes contend for the same balance, the hardest case. Human
        # output here (every command's --json is covered in test_admin): the key, once.
        done = subprocess.run([sys.executable, "proxy.py", "users", "create", "--workspace", "acme", "--tier", "pro",
                               "--energy", str(AFFORDABLE * 3), "--config", str(config)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        fields = dict(line.split(None, 1) for line in done.stdout.splitlines() if line.strip())
        user = {"id": fields["id"], "api_key": fields["api_key"]}
        assert user["api_key"].startswith("gw-") and done.stdout.count(user["api_key"]) == 1
        assert "shown only once" in done.stderr
        for port, server in zip(ports, servers):
            wait_ready(port, server)

        async def fire() -> list[bool]:
            clients = [openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=user["api_key"],
                                          max_retries=0, timeout=60) for port in ports]

            async def one(client: openai.AsyncOpenAI) -> bool:
                try:
                    await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
                    return True
                except openai.RateLimitError as exc:
                    assert exc.code == "insufficient_energy"
                    return False

            try:
                return await asyncio.gather(*(one(clients[i % 2]) for i in range(REQUESTS)))
            finally:
                for client in clients:
                    await client.close()

        outcomes = asyncio.run(fire())
        assert outcomes.count(True) == AFFORDABLE
        # An overlapped reservation (plugins/energy.py) that the other process's spending
        # made fail has had its upstream call discarded, unbilled; only a request that ended
        # refused can have made one.
        calls = upstream.count("/chat/completions")
        assert AFFORDABLE <= calls <= AFFORDABLE + outcomes.count(False)
    finally:
        for server in servers:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
        codes = [server.wait(timeout=20) for server in servers]
    assert codes == [0, 0], [(tmp_path / f"gw{p}.log").read_text()[-2000:] for p in ports]

    async def ledger():
        async with open_store(store_url) as store:
            return await store.balance(user["id"]), await store.ledger(user["id"])

    balance, entries = asyncio.run(ledger())
    assert balance == 0
    assert sum(e.amount for e in entries) == balance
    assert Counter(e.kind for e in entries) == {"grant": 1, "reserve": AFFORDABLE, "settle": AFFORDABLE}
    assert all(e.balance_after >= 0 for e in entries)
