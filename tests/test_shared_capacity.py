"""No tenant can hold shared capacity.

litellm runs the synchronous half of every call on the loop's default executor
(`acompletion` -> `run_in_executor(None, completion)`). A call that blocks there (litellm's
`mock_timeout` did `time.sleep` in it; so may a provider's sync credential refresh) holds
a thread until it returns, whatever the router's timeouts say. With Python's default
executor (6 threads on 2 cores) six such calls stalled every litellm-dispatched model for
everyone, and a SIGTERM waited for them. `BlockingDispatcher` does what such a call does:
it parks a thread of the default executor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import yaml

from gateway.providers.base import Dispatcher
from gateway.router import Router
from tests.conftest import FULL_CHAIN
from tests.fakes import free_port
from tests.test_shutdown import ROOT, cli, wait_ready

MSGS = [{"role": "user", "content": "hi"}]
HOLD = 8.0  # seconds each blocking call keeps its thread
SLOW = 12  # concurrent blocking calls from one user: twice Python's default executor


class BlockingDispatcher(Dispatcher):
    """A provider whose calls block a default-executor thread for `hold` seconds."""

    def __init__(self, hold: float) -> None:
        self.hold = hold

    async def chat(self, deployment: Any, body: dict[str, Any]) -> dict[str, Any]:
        await asyncio.get_running_loop().run_in_executor(None, time.sleep, self.hold)
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "x", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "late"}, "finish_reason": "stop"}]}


def models(upstream: Any) -> list[dict[str, Any]]:
    return [
        {"name": "slow", "timeouts": {"first_byte": 1, "total": 2}, "litellm_params": {"model": "blocking/x"}},
        {"name": "fast", "dispatch": "litellm", "litellm_params": {
            "model": "openai/gpt-4o-mini", "api_base": upstream.openai_base, "api_key": "sk-upstream"}},
    ]


def test_one_users_blocked_calls_do_not_stall_another_users_requests(gateway_factory, upstream):
    gw = gateway_factory(router=Router(dispatchers={"blocking": BlockingDispatcher(HOLD)}),
                         plugins=FULL_CHAIN, models=models(upstream), tiers={"free": {"models": ["*"]},
                                                                           "pro": {"models": ["*"]}},
                         retries={"max_attempts": 1}, energy={"actions": {"ai_message": {"default": 1}}})
    _, hog = gw.make_user(workspace="hog", energy=100)
    _, other = gw.make_user(workspace="other", energy=100)

    def slow_call(_: int) -> tuple[float, int]:
        started = time.monotonic()
        try:
            gw.client(hog).chat.completions.create(model="slow", messages=MSGS)
            status = 200
        except openai.APIStatusError as exc:
            status = exc.status_code
        return time.monotonic() - started, status

    with concurrent.futures.ThreadPoolExecutor(SLOW) as pool:
        hogging = [pool.submit(slow_call, i) for i in range(SLOW)]
        time.sleep(0.5)  # every blocking call has taken its thread
        started = time.monotonic()
        answer = gw.client(other).chat.completions.create(model="fast", messages=MSGS)
        other_took = time.monotonic() - started
        results = [f.result() for f in hogging]
    assert answer.choices[0].message.content
    # Not stuck behind the blocked threads (which hold theirs for HOLD seconds).
    assert other_took < HOLD / 2, other_took
    # Each blocked request ended at its deployment's timeout, not when its thread came back.
    assert all(status == 504 for _, status in results), results
    assert all(took < HOLD - 2 for took, _ in results), results
    gw.settle()


HARNESS = """
import sys
import proxy
from gateway.router import Router
from tests.test_shared_capacity import BlockingDispatcher
proxy.Router = lambda: Router(dispatchers={"blocking": BlockingDispatcher(120)})
sys.exit(proxy.main(["serve", "--config", sys.argv[1]]))
"""


def test_sigterm_exits_within_the_grace_while_calls_block(upstream, tmp_path: Path):
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace": 2},
        "store": {"url": f"sqlite:///{tmp_path}/gateway.db"},
        "auth": {"master_key": "gw-master-capacity-0123456789", "default_tier": "free"},
        "retries": {"max_attempts": 1},
        "models": [{"name": "slow", "timeouts": {"first_byte": 300, "total": 300},
                    "litellm_params": {"model": "blocking/x"}}],
        "tiers": {"free": {"models": ["*"]}, "pro": {"models": ["*"]}},
        "energy": {"actions": {"ai_message": {"default": 1}}},
        "plugins": ["request_log", "auth", "tier_policy", "energy", "accounting"],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    harness = tmp_path / "serve_blocking.py"  # `proxy.py serve` with the blocking provider plugged in
    harness.write_text(HARNESS)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(harness), str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        cli(path, "workspaces", "create", "acme")
        user = json.loads(cli(path, "users", "create", "--workspace", "acme", "--tier", "pro", "--energy", "10",
                              "--json"))
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key=user["api_key"], max_retries=0, timeout=60)

        def call(_: int) -> str:
            try:
                client.chat.completions.create(model="slow", messages=MSGS)
                return "answered"
            except openai.APIStatusError as exc:
                return str(exc.status_code)
            except openai.APIConnectionError:
                return "no answer"

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            calls = [pool.submit(call, i) for i in range(3)]
            time.sleep(1.5)  # in flight, each holding a blocked thread
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            output, _ = proc.communicate(timeout=30)
            took = time.monotonic() - sent
            outcomes = [c.result() for c in calls]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    assert took < 2 + 8, took  # shutdown_grace plus a few seconds, not the 120 s the calls block
    assert "answered" not in outcomes
    import sqlite3

    db = sqlite3.connect(tmp_path / "gateway.db")
    try:  # the cut-off requests were refunded, and the books balance
        assert db.execute("SELECT COUNT(*) FROM reservations WHERE status = 'reserved'").fetchone()[0] == 0
        assert db.execute("SELECT energy FROM users WHERE id = ?", (user["id"],)).fetchone()[0] == 10
    finally:
        db.close()
