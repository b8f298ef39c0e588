"""SIGTERM under load: `python proxy.py serve` lets in-flight requests finish, runs their
endings, drains the write-behind usage queue and exits 0. Every request that got an HTTP
answer has exactly one usage row; every reservation is settled or refunded; the energy
ledger adds up to the balance.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

from tests.fakes import Fault, free_port

ROOT = Path(__file__).resolve().parent.parent
MASTER = "gw-master-shutdown-0123456789"
REQUESTS = 50
LATE = 10  # fired after SIGTERM


def write_config(tmp_path: Path, upstream: Any, port: int) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace": 15},
        "store": {"url": f"sqlite:///{tmp_path}/gateway.db"},
        "auth": {"master_key": MASTER, "default_tier": "free"},
        "retries": {"max_attempts": 2, "backoff_base": 0.01, "backoff_max": 0.05},
        "models": [{"name": "gpt-4o-mini", "litellm_params": {
            "model": "openai/gpt-4o-mini", "api_base": upstream.openai_base, "api_key": "sk-upstream"}}],
        "tiers": {"free": {"models": ["gpt-4o-mini"]}, "pro": {"models": ["*"]}},
        "energy": {"actions": {"ai_message": {"default": 2}}},
        # flush_interval 1 s (the default): rows are still queued when SIGTERM lands
        "plugins": ["metrics", "request_log", "auth", "idempotency", "tier_policy", "energy", "accounting"],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(config: Path, *args: str) -> str:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    result = subprocess.run([sys.executable, "proxy.py", *args, "--config", str(config)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "gateway died"
        try:
            if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("gateway never became ready")


async def fire(base_url: str, key: str, upstream: Any, proc: subprocess.Popen) -> list[int | None]:
    """REQUESTS concurrent calls (half streamed); SIGTERM once most reached the upstream.
    Returns the HTTP status each got from the gateway, None for no answer at all."""

    async def one(client: openai.AsyncOpenAI, i: int) -> int | None:
        messages = [{"role": "user", "content": f"request {i}"}]
        try:
            if i % 2:
                raw = await client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=messages, stream=True)
                try:
                    async for _ in raw.parse():
                        pass
                except openai.APIError:
                    pass  # the answer started (status known); how it ended is the row's business
                return raw.http_response.status_code
            raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
            return raw.http_response.status_code
        except openai.APIStatusError as err:
            return err.status_code
        except openai.APIConnectionError:
            return None

    async def terminate_mid_flight() -> list[int | None]:
        deadline = time.monotonic() + 20
        while upstream.count("/chat/completions") < REQUESTS * 0.6 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        # Latecomers on new connections: refused (no answer, no row) or answered (a row).
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30) as late:
            return list(await asyncio.gather(*(one(late, REQUESTS + i) for i in range(LATE))))

    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30) as client:
        killer = asyncio.create_task(terminate_mid_flight())
        statuses = await asyncio.gather(*(one(client, i) for i in range(REQUESTS)))
        late = await killer
    return list(statuses) + late


def test_sigterm_under_load_loses_no_usage_row_and_no_energy(upstream, tmp_path):
    port = free_port()
    config = write_config(tmp_path, upstream, port)
    # Every upstream answer takes ~0.6 s: plenty of requests are in flight at SIGTERM.
    upstream.push(*[Fault.slow(0.4)] * REQUESTS)
    upstream.chunk_delay = 0.05
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    # The gateway starts (imports litellm) while the admin CLI creates its user: same SQLite file.
    proc = subprocess.Popen([sys.executable, "proxy.py", "serve", "--config", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        cli(config, "workspaces", "create", "acme")
        user = json.loads(cli(config, "users", "create", "--workspace", "acme", "--tier", "pro", "--energy",
                              "1000", "--json"))
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        statuses = asyncio.run(fire(url + "/v1", user["api_key"], upstream, proc))
        output, _ = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-3000:]

    answered = [s for s in statuses if s is not None]
    assert len(answered) >= REQUESTS * 0.6, statuses  # SIGTERM landed mid-flight, not before
    assert set(answered) == {200}, statuses  # an admitted request finishes; shutdown fails none of them
    db = sqlite3.connect(tmp_path / "gateway.db")
    try:
        rows = db.execute("SELECT request_id, status FROM ai_usage_logs").fetchall()
        assert len(rows) == len(answered), (statuses, rows)
        assert len({r[0] for r in rows}) == len(rows)
        assert sorted(r[1] for r in rows) == sorted(answered)
        open_reservations = db.execute("SELECT COUNT(*) FROM reservations WHERE status = 'reserved'").fetchone()[0]
        assert open_reservations == 0
        ledger_sum = db.execute("SELECT SUM(amount) FROM energy_ledger WHERE user_id = ?", (user["id"],)).fetchone()[0]
        balance = db.execute("SELECT energy FROM users WHERE id = ?", (user["id"],)).fetchone()[0]
        assert ledger_sum == balance
        assert balance == 1000 - 2 * sum(1 for r in rows if r[1] == 200)
    finally:
        db.close()
