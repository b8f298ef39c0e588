"""SIGKILL under load: every answered request keeps its usage row and its settlement.

Settlements and usage rows are written behind the answers, in batches (here: 60 s and
30 s, so that nearly all of them are still in memory when the process is killed). The
endings journal (gateway/journal.py) written before each answer leaves is replayed at the
next start: every answered request is settled and has its row, none is refunded. The
requests that got no answer are the sweeper's: refunded, never billed.
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

import openai
import yaml

from tests.fakes import Fault, free_port
from tests.test_shutdown import ROOT, cli, wait_ready

MASTER = "gw-master-crash-0123456789"
REQUESTS = 60
PRICE = 2


def write_config(tmp_path: Path, upstream: Any, port: int) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace": 5},
        "store": {"url": f"sqlite:///{tmp_path}/gateway.db"},
        "auth": {"master_key": MASTER, "default_tier": "free"},
        "retries": {"max_attempts": 1},
        "models": [{"name": "gpt-4o-mini", "litellm_params": {
            "model": "openai/gpt-4o-mini", "api_base": upstream.openai_base, "api_key": "sk-upstream"}}],
        "tiers": {"free": {"models": ["gpt-4o-mini"]}, "pro": {"models": ["*"]}},
        "energy": {"actions": {"ai_message": {"default": PRICE}}},
        "plugins": ["request_log", "auth", "tier_policy",
                    {"name": "energy", "settings": {"settle_interval": "60s", "settle_batch": 100_000}},
                    {"name": "accounting", "settings": {"flush_interval": 30, "batch_size": 100_000,
                                                        "queue_size": 100_000}}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path) -> subprocess.Popen:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return subprocess.Popen([sys.executable, "proxy.py", "serve", "--config", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def fire(base_url: str, key: str, proc: subprocess.Popen) -> tuple[list[str], int]:
    """REQUESTS concurrent calls (half streamed); SIGKILL once half of them are answered.
    Returns the request ids of the complete answers, and how many got none."""
    answered: list[str] = []
    failed = 0

    async def one(client: openai.AsyncOpenAI, i: int) -> None:
        nonlocal failed
        messages = [{"role": "user", "content": f"request {i}"}]
        try:
            if i % 2:
                raw = await client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=messages, stream=True)
                chunks = [c async for c in raw.parse()]
                assert any(c.choices and c.choices[0].finish_reason for c in chunks)
            else:
                raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
                assert raw.parse().choices[0].finish_reason == "stop"
            answered.append(raw.headers["X-Request-Id"])
        except (openai.APIError, AssertionError):
            failed += 1

    async def kill_mid_flight() -> None:
        deadline = time.monotonic() + 30
        while len(answered) < REQUESTS // 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        proc.send_signal(signal.SIGKILL)

    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30) as client:
        killer = asyncio.create_task(kill_mid_flight())
        await asyncio.gather(*(one(client, i) for i in range(REQUESTS)))
        await killer
    return answered, failed


def test_sigkill_after_answers_loses_no_bill_and_gives_nothing_away(upstream, tmp_path):
    port = free_port()
    config = write_config(tmp_path, upstream, port)
    # Staggered answers: some are answered, some still in flight when the process dies.
    upstream.push(*[Fault.slow(0.02 * (i % 20)) for i in range(REQUESTS)])
    proc = start(config)
    try:
        cli(config, "workspaces", "create", "acme")
        user = json.loads(cli(config, "users", "create", "--workspace", "acme", "--tier", "pro",
                              "--energy", "1000", "--json"))
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        answered, failed = asyncio.run(fire(url + "/v1", user["api_key"], proc))
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(answered) >= REQUESTS // 2 and failed >= 1, (len(answered), failed)
    journal = Path(f"{tmp_path}/gateway.db.journal")
    assert list(journal.glob("endings-*.jsonl")), "the dead process left its journal"

    db = sqlite3.connect(tmp_path / "gateway.db")
    try:  # the proof that the batches were still in memory when it died
        written_before = db.execute("SELECT COUNT(*) FROM ai_usage_logs").fetchone()[0]
    finally:
        db.close()
    assert written_before < len(answered)

    proc = start(config)  # the restart replays the journal before it is ready
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert not list(journal.glob("endings-*.jsonl")), "replayed and cleaned up"

    async def sweep() -> None:  # what the sweeper does once stale_after has passed
        from gateway.store import open_store

        async with open_store(f"sqlite:///{tmp_path}/gateway.db") as store:
            for request_id in await store.stale_reservations(time.time() + 10 * 3600):
                await store.refund_energy(request_id, reason="stale")

    asyncio.run(sweep())
    db = sqlite3.connect(tmp_path / "gateway.db")
    try:
        rows = dict(db.execute("SELECT request_id, status FROM ai_usage_logs").fetchall())
        for request_id in answered:
            assert rows.get(request_id) == 200, request_id
        outcome = dict(db.execute("SELECT request_id, kind FROM energy_ledger WHERE kind IN ('settle', 'refund')"))
        assert all(outcome.get(r) == "settle" for r in answered), [outcome.get(r) for r in answered]
        billed = [r for r, kind in outcome.items() if kind == "settle"]
        assert sorted(billed) == sorted(answered)  # nothing unanswered was billed
        assert db.execute("SELECT COUNT(*) FROM reservations WHERE status = 'reserved'").fetchone()[0] == 0
        balance = db.execute("SELECT energy FROM users WHERE id = ?", (user["id"],)).fetchone()[0]
        ledger = db.execute("SELECT SUM(amount) FROM energy_ledger WHERE user_id = ?", (user["id"],)).fetchone()[0]
        assert balance == ledger == 1000 - PRICE * len(answered)
    finally:
        db.close()


def test_journal_segments_go_once_their_endings_are_in_the_database(gateway_factory, upstream, monkeypatch):
    from gateway import journal as journal_module
    from tests.conftest import FULL_CHAIN

    monkeypatch.setattr(journal_module, "ROTATE_SECONDS", 0.1)
    gw = gateway_factory(plugins=[*FULL_CHAIN, "accounting"])
    _, key = gw.make_user(energy=100)
    for _ in range(3):
        gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    directory = gw.state.chain.journal.directory
    entries = lambda: sum(len(p.read_bytes().splitlines()) for p in directory.glob("endings-*.jsonl"))  # noqa: E731
    assert entries() >= 1 or gw.run(gw.store.usage_rows())  # journaled (or already retired)
    deadline = time.monotonic() + 10
    while entries() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert entries() == 0
    assert len(gw.run(gw.store.usage_rows())) == 3


async def test_a_live_processs_segment_is_never_replayed_and_a_failed_replay_keeps_the_dead_one(tmp_path):
    from gateway.journal import EndingsJournal

    writer = EndingsJournal(tmp_path)
    writer.open()
    writer.record("req_1", {"energy": "req_1", "accounting": {"request_id": "req_1"}})
    starting = EndingsJournal(tmp_path)
    starting.open()
    assert starting.dead_segments() == []  # the writer holds its segment
    os.close(writer._current.fd)  # the writer dies
    dead = starting.dead_segments()
    assert len(dead) == 1

    async def refuse(records):
        raise ConnectionError("the store is down")

    assert await starting.replay({"energy": refuse}) == 0
    assert dead[0].exists()  # kept for the next start
    got: dict[str, list] = {}

    async def take(name, records):
        got[name] = records

    replayers = {name: (lambda records, name=name: take(name, records)) for name in ("energy", "accounting")}
    assert await starting.replay(replayers) == 1
    assert got == {"energy": ["req_1"], "accounting": [{"request_id": "req_1"}]}
    assert not dead[0].exists()
